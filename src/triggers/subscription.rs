//! subscriptions: validates what is written (URL, secret, filters) and refreshes every cache.

use super::*;

#[pg_trigger]
fn subscriptions_trigger<'a>(trigger: &'a PgTrigger<'a>) -> Result<Option<Row<'a>>, Error> {
    if let Some(row) = restored_row(trigger) {
        shared::config_changed(); // every cache still learns of it
        return Ok(row);
    }
    Ok(Some(on_subscription(trigger).or_report()))
}

fn on_subscription<'a>(trigger: &'a PgTrigger<'a>) -> Result<Row<'a>> {
    let op = trigger.op().map_err(|e| Error::Column(e.to_string()))?;
    shared::config_changed();
    if matches!(op, PgTriggerOperation::Delete) {
        return old_row(trigger);
    }
    let old = if matches!(op, PgTriggerOperation::Update) {
        Some(old_row(trigger)?)
    } else {
        None
    };
    // SAFETY: in a row trigger, tg_relation is the open relation and the new row
    // (tg_trigtuple for INSERT, tg_newtuple for UPDATE) is one of its tuples.
    let missing = unsafe {
        let data = trigger.trigger_data();
        let tuple = if old.is_some() {
            data.tg_newtuple
        } else {
            data.tg_trigtuple
        };
        null_in_not_null_column(tuple, (*data.tg_relation).rd_att)
    };
    if let Some(column) = missing {
        return Err(Error::invalid_field(column, "must not be null"));
    }
    let mut new = new_row(trigger)?;
    let name: String = col(&new, "name")?.unwrap_or_default();
    if name.trim().is_empty() {
        return Err(Error::invalid("name", "must not be empty"));
    }
    limits::check_text("name", &name, MAX_TEXT_CHARS)?;
    let url: String = col(&new, "url")?.unwrap_or_default();
    let url_changed = match &old {
        Some(old) => col::<String>(old, "url")?.as_deref() != Some(url.as_str()),
        None => true,
    };
    if url_changed {
        let allow_private = guc::ALLOW_PRIVATE_TARGETS.get();
        let own = if allow_private {
            Vec::new()
        } else {
            resolve::own_addresses()
        };
        target::check_webhook_url(&url, guc::REQUIRE_HTTPS.get(), allow_private, &own)
            .map_err(Error::Url)?;
    }
    SigningKey::parse(&col::<String>(&new, "secret")?.unwrap_or_default())?;
    check_finite(
        &new,
        "previous_secret_expires_at",
        "NULL: the previous secret signs no more",
    )?;
    if let Some(prev) = col::<String>(&new, "previous_secret")? {
        SigningKey::parse(&prev).map_err(|_| {
            Error::invalid("previous_secret", "must be 'whsec_' followed by base64")
        })?;
    }
    if let Some(types) = text_array(&new, "event_types")? {
        for t in types {
            if EventType::parse(&t).is_none() {
                let known: Vec<&str> = EventType::ALL.iter().map(|t| t.as_str()).collect();
                return Err(Error::invalid(
                    "event_types",
                    format!("'{t}' is not an event type (known: {})", known.join(", ")),
                ));
            }
        }
    }
    let filters = col::<JsonB>(&new, "filters")?.map_or(Value::Object(Map::new()), |j| j.0);
    limits::check_json("filters", &filters, MAX_JSON_BYTES)?;
    Filters::parse(&filters)?;
    let ip_mode: String = col(&new, "ip_mode")?.unwrap_or_default();
    if IpMode::parse(&ip_mode).is_none() {
        return Err(Error::invalid(
            "ip_mode",
            format!("must be 'full', 'anonymized' or 'omit' (got '{ip_mode}')"),
        ));
    }
    let scheme: String = col(&new, "signature_scheme")?.unwrap_or_default();
    if scheme != "standard" && scheme != "hex" {
        return Err(Error::invalid(
            "signature_scheme",
            format!("must be 'standard' or 'hex' (got '{scheme}')"),
        ));
    }
    if let Some(t) = col::<i32>(&new, "timeout_ms")?.filter(|t| !(100..=300_000).contains(t)) {
        return Err(Error::invalid(
            "timeout_ms",
            format!("must be between 100 and 300000 (got {t})"),
        ));
    }
    if let Some(m) = col::<i32>(&new, "max_attempts")?.filter(|m| !(1..=1000).contains(m)) {
        return Err(Error::invalid(
            "max_attempts",
            format!("must be between 1 and 1000 (got {m})"),
        ));
    }
    let delivers = |row: &Row<'_>| -> Result<bool> {
        Ok(col::<bool>(row, "enabled")?.unwrap_or(true)
            && !col::<bool>(row, "paused")?.unwrap_or(false))
    };
    // A schema from before 0.5.0 (not updated yet) has no holds.
    if attnum(&new, "held_since").is_ok() {
        let held_since = match &old {
            // Created disabled or paused: it receives nothing until it delivers.
            None => None,
            Some(_) if delivers(&new)? => None,
            // Held since it last delivered: its events queue for linkhooks.hold_window.
            Some(old) if delivers(old)? => Some(transaction_now()),
            Some(old) => col::<TimestampWithTimeZone>(old, "held_since")?,
        };
        set(&mut new, "held_since", held_since)?;
    }
    if let Some(old) = &old {
        let was_enabled = col::<bool>(old, "enabled")?.unwrap_or(true);
        if !was_enabled && col::<bool>(&new, "enabled")?.unwrap_or(true) {
            // Re-enabling starts a clean slate.
            set(&mut new, "disabled_reason", None::<String>)?;
            set(&mut new, "consecutive_dead_letters", 0i32)?;
        }
        set(&mut new, "updated_at", transaction_now())?;
    }
    Ok(new)
}
