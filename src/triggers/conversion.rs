//! conversions: validates and emits link.converted.

use super::*;

#[pg_trigger]
fn conversions_trigger<'a>(trigger: &'a PgTrigger<'a>) -> Result<Option<Row<'a>>, Error> {
    if let Some(row) = restored_row(trigger) {
        return Ok(row);
    }
    Ok(on_conversion(trigger).or_report())
}

/// The row to store, or None to skip a repeat of an external id already recorded.
fn on_conversion<'a>(trigger: &'a PgTrigger<'a>) -> Result<Option<Row<'a>>> {
    let mut row = new_row(trigger)?;
    // (Absent before the 0.5.0 schema: a newer library serves an older schema until it is updated.)
    let external_id: Option<String> = match has_column(&row, "external_id") {
        true => col(&row, "external_id")?,
        false => None,
    };
    if let Some(key) = &external_id {
        idempotency::lock("external_id", key)?;
        if conversion_recorded(key)? {
            return Ok(None); // a caller's retry: the first one was recorded and announced
        }
    }
    let name: String = col(&row, "name")?.unwrap_or_default();
    if name.trim().is_empty() || name.chars().count() > 200 {
        return Err(Error::invalid("name", "must be 1 to 200 characters"));
    }
    if let Some(JsonB(metadata)) = col::<JsonB>(&row, "metadata")? {
        limits::check_json("metadata", &metadata, MAX_JSON_BYTES)?;
    }
    let currency: Option<String> = col(&row, "currency")?;
    if let Some(c) = &currency
        && !(c.len() == 3 && c.chars().all(|ch| ch.is_ascii_uppercase()))
    {
        return Err(Error::invalid(
            "currency",
            format!("must be a three-letter ISO 4217 code such as USD (got '{c}')"),
        ));
    }
    let click_id: Option<i64> = col(&row, "click_id")?;
    let mut link_id: Option<i64> = col(&row, "link_id")?;
    if let Some(click_id) = click_id {
        let clicked_link = Spi::connect(|client| {
            plans::first::<i64>(plans::query(
                client,
                "SELECT link_id FROM linkhooks.clicks WHERE id = $1",
                &[INT8],
                &[click_id.into()],
            )?)
        })?
        .ok_or_else(|| {
            Error::NotFound(format!("invalid click_id: click {click_id} does not exist"))
        })?;
        match link_id {
            Some(given) if given != clicked_link => {
                return Err(Error::invalid(
                    "link_id",
                    format!("must match the click's link, got {given}"),
                ));
            }
            _ => link_id = Some(clicked_link),
        }
        set(&mut row, "link_id", clicked_link)?;
    }
    let link_id = link_id
        .ok_or_else(|| Error::invalid("link_id", "a conversion needs link_id or click_id"))?;
    let link = LinkRow::by_id(link_id)?.ok_or_else(|| {
        Error::NotFound(format!("invalid link_id: link {link_id} does not exist"))
    })?;

    let event_id = col::<pgrx::Uuid>(&row, "event_id")?
        .map(|u| uuid_text(&u))
        .unwrap_or_else(new_event_id);
    check_finite(&row, "occurred_at", "leave it out for now()")?;
    let occurred_at = col::<TimestampWithTimeZone>(&row, "occurred_at")?
        .map_or_else(unix_now_micros, unix_micros);
    let conversion = ConversionPayload {
        id: event_id.clone(),
        click_id,
        name,
        amount: col::<AnyNumeric>(&row, "amount")?
            .and_then(|n| ConversionPayload::amount_from_numeric(&n.to_string())),
        currency,
        occurred_at: payload::format_timestamp(occurred_at),
        metadata: col::<JsonB>(&row, "metadata")?.map_or(Value::Object(Map::new()), |j| j.0),
        external_id,
    };
    let link_payload = link.payload();
    let facts = Facts {
        campaign: link.campaign.as_deref(),
        tags: &link.tags,
        click: None,
        milestone: None,
    };
    let body = payload::envelope(
        &event_id,
        EventType::LinkConverted,
        occurred_at,
        ConversionData {
            link: Some(&link_payload),
            conversion,
        },
    );
    events::emit(EventType::LinkConverted, &event_id, &facts, |_| {
        body.clone()
    })?;
    // The transaction's id, by which the aggregator counts the conversion into link_counts
    // (absent before the 0.5.0 schema).
    if has_column(&row, "txid") {
        set(&mut row, "txid", Xid8::of_this_transaction())?;
        shared::clicks_recorded();
    }
    Ok(Some(row))
}

/// Whether a committed conversion has this external id (read after its lock).
fn conversion_recorded(external_id: &str) -> Result<bool> {
    Spi::connect_mut(|client| {
        let rows = plans::execute(
            client,
            "SELECT 1 FROM linkhooks.conversions WHERE external_id = $1",
            &[TEXT],
            &[external_id.into()],
        )?;
        Ok(!rows.is_empty())
    })
}
