//! clicks: enriches, enforces max_clicks, emits link.clicked/qr.scanned and counts campaign goals.

use std::cell::Cell;

use super::*;

#[pg_trigger]
fn clicks_trigger<'a>(
    trigger: &'a PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, Error> {
    if guc::RESTORE.get() {
        return Ok(trigger.new()); // restored as dumped (see restored_row)
    }
    if matches!(trigger.op(), Ok(PgTriggerOperation::Update)) {
        mark_moving(trigger).or_report();
        return Ok(trigger.new());
    }
    Ok(with_catalog_search_path(|| on_click(trigger)).or_report())
}

/// The click an `UPDATE` may be about to move into another partition.
/// PostgreSQL 15 moves a row by deleting it and inserting it there, which fires
/// the INSERT trigger as for a new click; the UPDATE fires this trigger for the
/// row just before, so the move claims, emits and counts nothing again.
#[derive(Clone, Copy, PartialEq)]
struct Moving {
    transaction: pg_sys::LocalTransactionId,
    id: i64,
    event_id: [u8; 16],
}

thread_local! {
    /// One row at a time: the executor moves each row before it updates the next.
    static MOVING: Cell<Option<Moving>> = const { Cell::new(None) };
}

fn local_transaction() -> pg_sys::LocalTransactionId {
    // SAFETY: MyProc is this backend's own, set up before any statement runs.
    unsafe { (*pg_sys::MyProc).lxid }
}

/// Notes the row an UPDATE may move, after the checks an INSERT makes of the
/// columns it may change (an UPDATE is the owner's, who may change any).
fn mark_moving(trigger: &PgTrigger<'_>) -> Result<()> {
    let new = new_row(trigger)?;
    clicked_at_micros(col(&new, "clicked_at")?)?;
    check_request(
        col::<String>(&new, "source")?
            .as_deref()
            .unwrap_or_default(),
        col::<String>(&new, "country")?.as_deref(),
        col::<String>(&new, "city")?.as_deref(),
        col::<String>(&new, "landing_url")?.as_deref(),
    )?;
    let moving = match (
        col::<i64>(&new, "id")?,
        col::<pgrx::Uuid>(&new, "event_id")?,
    ) {
        (Some(id), Some(event_id)) => Some(Moving {
            transaction: local_transaction(),
            id,
            event_id: *event_id.as_bytes(),
        }),
        _ => None,
    };
    MOVING.set(moving);
    Ok(())
}

/// Whether `new` is the row an UPDATE is moving; forgets the mark either way.
fn is_moving(new: &SlotColumns) -> Result<bool> {
    let Some(mark) = MOVING.take() else {
        return Ok(false);
    };
    Ok(mark.transaction == local_transaction()
        && new.get::<i64>("id")? == Some(mark.id)
        && new.get::<pgrx::Uuid>("event_id")?.map(|e| *e.as_bytes()) == Some(mark.event_id))
}

/// The row to store, or None to skip it (a record_click past max_clicks).
fn on_click<'a>(
    trigger: &'a PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>> {
    // SAFETY: in a BEFORE INSERT row trigger, tg_trigslot holds the new row (tg_trigtuple),
    // and nothing changes it while this trigger runs. Deformed once, read by name below.
    let new = unsafe { SlotColumns::new(trigger.trigger_data().tg_trigslot) };
    if is_moving(&new)? {
        return Ok(trigger.new()); // stored as it was, in the partition of its new time
    }
    if let Some(estate) = statements::executor_state() {
        // SAFETY: the running statement's state; tg_relation is the open partition the row goes to.
        unsafe { partition_check::prime(estate, trigger.trigger_data().tg_relation) };
    }
    let link_id: i64 = new
        .get("link_id")?
        .ok_or_else(|| Error::invalid("link_id", "must not be null"))?;
    let source: String = new.get("source")?.unwrap_or_else(|| "link".into());
    let kind = event_kind(&source)?;
    // record_click looked the link up already; its clicks past the limit are skipped.
    let (link, from_record_click) = match linkstore::take_stashed(link_id) {
        Some(link) => (link, true),
        None => (
            LinkRow::by_id(link_id)?.ok_or_else(|| {
                Error::NotFound(format!("invalid link_id: link {link_id} does not exist"))
            })?,
            false,
        ),
    };
    let reached_limit = match link.max_clicks {
        None => false,
        Some(max) => match linkstore::claim_click(link_id)? {
            Claim::Taken { reached_limit } => reached_limit,
            Claim::Full if from_record_click => return Ok(None),
            Claim::Full => {
                let refusal = || {
                    format!(
                        "link {link_id} ('{}') has reached its max_clicks of {max}; the click was not recorded",
                        link.slug
                    )
                };
                // In a statement storing several clicks, skipped as inserting them one by one would.
                if statements::skip_past_limit(refusal) {
                    return Ok(None);
                }
                return Err(Error::LimitReached(refusal()));
            }
        },
    };

    let mut edits = Edits::default();
    let (click, utm) = enrich_click(&new, source, &mut edits)?;
    // The transaction's id, by which the aggregator finds the clicks committed since
    // its last run. Set here rather than by a column default, which every INSERT
    // statement would parse and plan (about 8k instructions). Assigning the id costs
    // nothing extra: storing the row assigns it anyway.
    edits.set_xid8(&new, "txid", Xid8::of_this_transaction())?;
    shared::clicks_recorded();
    statements::click_stored();
    let utm = link.click_utm(utm);
    let link_payload = link.payload();
    let facts = link.click_facts(&click);
    events::emit(kind, &click.event_id, &facts, |mode: IpMode| {
        payload::click_body(kind, &link_payload, &click, &utm, mode)
    })?;

    if reached_limit {
        emit_link_expired(&link_payload, "max_clicks")?;
    }
    if let Some(campaign) = &link.campaign
        && events::cache()?.goal_campaigns.contains(campaign)
    {
        count_campaign_click(campaign)?;
    }
    // SAFETY: in a BEFORE INSERT row trigger, tg_trigtuple is the tuple in tg_trigslot
    // (which `new` reads) and tg_relation the open relation it belongs to. The executor
    // stores the returned tuple in place of the row, whether it is new or the same one.
    unsafe {
        let data = trigger.trigger_data();
        let row = edits.apply(&new, data.tg_trigtuple);
        Ok(Some(PgHeapTuple::from_heap_tuple(
            PgTupleDesc::from_pg_unchecked((*data.tg_relation).rd_att),
            row,
        )))
    }
}

/// Fills derived columns left NULL and caps oversized headers (as `edits`);
/// returns the click as the payload sees it, and its UTM values.
fn enrich_click(
    new: &SlotColumns,
    source: String,
    edits: &mut Edits,
) -> Result<(Click, Option<Value>)> {
    let mut capped = |name: &str, max: usize| -> Result<Option<String>> {
        let value: Option<String> = new.get(name)?;
        match value {
            Some(v) if truncate(&v, max).len() < v.len() => {
                let cut = truncate(&v, max).to_string();
                edits.set(new, name, cut.as_str())?;
                Ok(Some(cut))
            }
            other => Ok(other),
        }
    };
    // Columns are read in table order, which `SlotColumns` finds fastest.
    let event_id = new
        .get::<pgrx::Uuid>("event_id")?
        .map(|u| uuid_text(&u))
        .unwrap_or_else(new_event_id);
    let clicked_at = clicked_at_micros(new.get::<TimestampWithTimeZone>("clicked_at")?)?;
    let ip = new.ip("ip")?;
    let user_agent = capped("user_agent", MAX_HEADER_LEN)?;
    let referer = capped("referer", MAX_HEADER_LEN)?;
    let country_given: Option<String> = new.get("country")?;
    let city: Option<String> = new.get("city")?;
    if let Some(v) = &city {
        check_city(v)?;
    }
    // Comes from the request like the headers: stored capped, but it must be a URL.
    let landing_url = capped("landing_url", target::MAX_URL_LEN)?;
    if let Some(url) = &landing_url {
        check_landing_url(url)?;
    }
    let country = match country_given {
        None => None,
        Some(given) => {
            let code = country_code(&given)?;
            if code != given {
                edits.set(new, "country", code.as_str())?;
            }
            Some(code)
        }
    };

    let info = useragent::classify(user_agent.as_deref());
    let mut fill = |name: &str, derived: Option<String>| -> Result<Option<String>> {
        match new.get::<String>(name)? {
            Some(given) => Ok(Some(given)),
            None => {
                if let Some(d) = &derived {
                    edits.set(new, name, d.as_str())?;
                }
                Ok(derived)
            }
        }
    };
    let device = fill("device", Some(info.device.to_string()))?;
    let browser = fill("browser", info.browser.clone())?;
    let os = fill("os", info.os.clone())?;
    let is_bot = match new.get::<bool>("is_bot")? {
        Some(b) => b,
        None => {
            edits.set(new, "is_bot", info.is_bot)?;
            info.is_bot
        }
    };
    let mut utm = new.get::<JsonB>("utm")?.map(|j| j.0);
    if let Some(given) = &utm {
        limits::check_json("utm", given, MAX_UTM_BYTES)?;
        links::normalize_utm(given)?; // a link's rules: its payloads carry it the same way
    }
    if utm.is_none()
        && let Some(landing) = landing_url
        && let Some(from_landing) = links::utm_from_landing_url(&landing)
    {
        edits.set(new, "utm", JsonB(Value::Object(from_landing.clone())))?;
        utm = Some(Value::Object(from_landing));
    }

    let click = Click {
        event_id,
        clicked_at_micros: clicked_at,
        ip,
        user_agent,
        referer,
        country,
        city,
        device,
        browser,
        os,
        is_bot,
        source,
    };
    Ok((click, utm))
}

/// Counts a click toward its campaign's goal; the click that reaches it emits
/// campaign.completed (the row lock makes that exactly once).
fn count_campaign_click(campaign: &str) -> Result<()> {
    let done = Spi::connect_mut(|client| -> Result<Option<CampaignPayload>> {
        let rows = plans::execute(
            client,
            "UPDATE linkhooks.campaigns
                SET click_count = click_count + 1,
                    completed_at = CASE WHEN click_count + 1 >= click_goal THEN now() END
              WHERE name = $1 AND completed_at IS NULL AND click_goal IS NOT NULL
          RETURNING completed_at IS NOT NULL, click_goal, click_count,
                    (extract(epoch FROM ends_at) * 1000000)::bigint",
            &[TEXT],
            &[campaign.into()],
        )?;
        let Some(row) = rows.into_iter().next() else {
            return Ok(None);
        };
        if !row.get::<bool>(1)?.unwrap_or(false) {
            return Ok(None);
        }
        Ok(Some(CampaignPayload {
            name: campaign.to_string(),
            click_goal: row.get(2)?,
            clicks: row.get(3)?.unwrap_or_default(),
            ends_at: row.get::<i64>(4)?.map(payload::format_timestamp),
            completed_at: payload::format_timestamp(unix_now_micros()),
            reason: "click_goal",
        }))
    })?;
    if let Some(campaign) = done {
        emit_campaign_completed(campaign)?;
    }
    Ok(())
}

/// The checks the INSERT trigger makes of a click's request fields, for where
/// it does not run: a `record_click` that records no click (the link is
/// unknown or inactive: the call is refused the same way whatever the link's
/// state) and an UPDATE of a click.
pub fn check_request(
    source: &str,
    country: Option<&str>,
    city: Option<&str>,
    landing_url: Option<&str>,
) -> Result<()> {
    event_kind(source)?;
    if let Some(country) = country {
        country_code(country)?;
    }
    if let Some(city) = city {
        check_city(city)?;
    }
    if let Some(url) = landing_url {
        check_landing_url(url)?;
    }
    Ok(())
}

/// A click's time in Unix microseconds (now when NULL): a time since 2000.
fn clicked_at_micros(at: Option<TimestampWithTimeZone>) -> Result<i64> {
    let micros = match at {
        None => unix_now_micros(),
        Some(at) if at.is_finite() => unix_micros(at),
        Some(_) => return Err(Error::invalid("clicked_at", "must be a time, not infinity")),
    };
    if micros < limits::EARLIEST_CLICK_MICROS {
        return Err(Error::invalid(
            "clicked_at",
            "must be on or after 2000-01-01 00:00 UTC",
        ));
    }
    Ok(micros)
}

fn event_kind(source: &str) -> Result<EventType> {
    match source {
        "link" => Ok(EventType::LinkClicked),
        "qr" => Ok(EventType::QrScanned),
        other => Err(Error::invalid(
            "source",
            format!(
                "must be 'link' or 'qr' (got '{}')",
                links::truncate(other, 20)
            ),
        )),
    }
}

fn country_code(given: &str) -> Result<String> {
    filters::country_code(given).ok_or_else(|| {
        let shown = links::truncate(given, 20);
        Error::invalid(
            "country",
            format!("must be a two-letter ISO 3166-1 code such as US (got '{shown}')"),
        )
    })
}

fn check_city(city: &str) -> Result<()> {
    limits::check_text("city", city, MAX_TEXT_CHARS)?;
    Ok(())
}

fn check_landing_url(url: &str) -> Result<()> {
    if links::is_web_url(url) {
        return Ok(());
    }
    Err(Error::invalid(
        "landing_url",
        "must be an absolute http(s) URL, the one the visitor requested",
    ))
}
