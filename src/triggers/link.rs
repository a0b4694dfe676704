//! links: validates, keeps redirect_url, emits link.created/updated/deleted (and link.expired).

use super::*;

/// Columns users set; a change to any other column (counters) is internal and emits nothing.
const LINK_FIELDS: [&str; 11] = [
    "domain",
    "slug",
    "destination",
    "campaign",
    "tags",
    "utm",
    "expires_at",
    "max_clicks",
    "expired_url",
    "disabled",
    "metadata",
];

#[pg_trigger]
fn links_trigger<'a>(trigger: &'a PgTrigger<'a>) -> Result<Option<Row<'a>>, Error> {
    if let Some(row) = restored_row(trigger) {
        // Every link cache still learns of it, a standby's too.
        linkstore::links_changed(trigger).or_report();
        return Ok(row.map(with_redirect_url));
    }
    Ok(on_link(trigger).or_report())
}

/// The row with `redirect_url` derived from its destination and utm, for rows
/// stored without the checks (restore mode, replica role): a destination
/// changed that way would otherwise keep redirecting to the old one. A row
/// whose utm does not normalize keeps the redirect_url it came with.
pub fn with_redirect_url(mut row: Row<'_>) -> Row<'_> {
    let derived = || -> Result<Option<String>> {
        let Some(destination) = col::<String>(&row, "destination")? else {
            return Ok(None);
        };
        Ok(Some(redirect_url(&row, &destination)?))
    };
    if let Ok(Some(url)) = derived() {
        // Setting a text column of a row we own cannot fail but by a missing column.
        let _ = set(&mut row, "redirect_url", url);
    }
    row
}

/// What a row with this destination redirects to: the destination with the
/// row's utm (checked) appended.
fn redirect_url(row: &Row<'_>, destination: &str) -> Result<String> {
    let utm = match col::<JsonB>(row, "utm")? {
        Some(JsonB(v)) if !v.is_null() => links::normalize_utm(&v)?,
        _ => Map::new(),
    };
    Ok(links::redirect_url(destination, &utm)?)
}

fn on_link<'a>(trigger: &'a PgTrigger<'a>) -> Result<Option<Row<'a>>> {
    let row = match trigger.op().map_err(|e| Error::Column(e.to_string()))? {
        PgTriggerOperation::Insert => {
            let mut new = new_row(trigger)?;
            check_link(&mut new, None)?;
            emit_link_event(EventType::LinkCreated, &link_payload(&new)?, None)?;
            Some(new)
        }
        PgTriggerOperation::Update => {
            let old = old_row(trigger)?;
            let mut new = new_row(trigger)?;
            let changed = changed_fields(&old, &new, &LINK_FIELDS)?;
            if changed.is_empty() {
                // redirect_url is derived from destination and utm, which are checked;
                // written directly, it would bypass those checks and every event.
                if col::<String>(&old, "redirect_url")? != col::<String>(&new, "redirect_url")? {
                    return Err(Error::invalid(
                        "redirect_url",
                        "is kept by the extension from destination and utm; set those instead",
                    ));
                }
                return Ok(Some(new)); // counters: invisible to redirects' cache
            }
            check_link(&mut new, Some(&old))?;
            if changed
                .iter()
                .any(|f| *f == "max_clicks" || *f == "expires_at")
            {
                // A new limit may make the link active again: let link.expired fire anew.
                set(&mut new, "expired_at", None::<TimestampWithTimeZone>)?;
            }
            set(&mut new, "updated_at", transaction_now())?;
            let mut changes = Map::new();
            for f in &changed {
                let mut change = Map::new();
                change.insert("from".into(), field_value(&old, f)?);
                change.insert("to".into(), field_value(&new, f)?);
                changes.insert((*f).into(), Value::Object(change));
            }
            emit_link_event(
                EventType::LinkUpdated,
                &link_payload(&new)?,
                Some((changed, changes)),
            )?;
            Some(new)
        }
        PgTriggerOperation::Delete => {
            let old = old_row(trigger)?;
            emit_link_event(EventType::LinkDeleted, &link_payload(&old)?, None)?;
            Some(old)
        }
        // The statement-level links_truncated trigger: no row, no event.
        PgTriggerOperation::Truncate => None,
    };
    linkstore::links_changed(trigger)?;
    Ok(row)
}

/// Whether another link already has this (domain, slug).
fn slug_taken(domain: &str, slug: &str, id: i64) -> Result<bool> {
    Spi::connect(|client| -> Result<bool> {
        let rows = plans::query(
            client,
            "SELECT 1 FROM linkhooks.links WHERE domain = $1 AND slug = $2 AND id <> $3",
            &[TEXT, TEXT, INT8],
            &[domain.into(), slug.into(), id.into()],
        )?;
        Ok(!rows.is_empty())
    })
}

/// A random slug no link of `domain` has yet. A concurrent insert of the same
/// one would still be stopped by the unique index.
fn free_slug(domain: &str) -> Result<String> {
    for _ in 0..8 {
        let slug = links::random_slug();
        if !slug_taken(domain, &slug, 0)? {
            return Ok(slug);
        }
    }
    Err(Error::Duplicate(format!(
        "duplicate slug: no free generated slug found in domain '{domain}'; give one"
    )))
}

fn check_link(new: &mut Row<'_>, old: Option<&Row<'_>>) -> Result<()> {
    let domain: String = col(new, "domain")?.unwrap_or_default();
    let (slug, generated) = match col::<String>(new, "slug")? {
        Some(slug) => (slug, false),
        // Inserted without a slug (bulk link creation): a fresh random one, found free.
        None if old.is_none() => {
            let slug = free_slug(&domain)?;
            set(new, "slug", slug.as_str())?;
            (slug, true)
        }
        None => return Err(Error::invalid("slug", "must not be null")),
    };
    links::check_slug(&slug)?;
    if domain.len() > 253
        || !domain
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
    {
        return Err(Error::invalid(
            "domain",
            "must be '' (the default domain) or a host name such as go.acme.co",
        ));
    }
    let destination: String = col(new, "destination")?.unwrap_or_default();
    target::check_destination(&destination).map_err(LinkError::Destination)?;
    if let Some(expired_url) = col::<String>(new, "expired_url")? {
        target::check_destination(&expired_url).map_err(LinkError::ExpiredUrl)?;
    }
    check_finite(new, "expires_at", "NULL: the link never expires")?;
    if let Some(campaign) = col::<String>(new, "campaign")? {
        limits::check_text("campaign", &campaign, MAX_TEXT_CHARS)?;
    }
    if let Some(tags) = text_array(new, "tags")? {
        limits::check_tags(&tags)?;
    }
    if let Some(JsonB(metadata)) = col::<JsonB>(new, "metadata")? {
        limits::check_json("metadata", &metadata, MAX_JSON_BYTES)?;
    }
    let max_clicks: Option<i64> = col(new, "max_clicks")?;
    if let Some(m) = max_clicks.filter(|m| *m <= 0) {
        return Err(LinkError::MaxClicks(m).into());
    }
    let url = redirect_url(new, &destination)?;
    set(new, "redirect_url", url)?;

    let id: i64 = col(new, "id")?.unwrap_or_default();
    let key_changed = match old {
        None => !generated, // a generated slug was checked free already
        Some(old) => {
            col::<String>(old, "slug")?.as_deref() != Some(slug.as_str())
                || col::<String>(old, "domain")?.as_deref() != Some(domain.as_str())
        }
    };
    if key_changed && slug_taken(&domain, &slug, id)? {
        return Err(Error::Duplicate(format!(
            "duplicate slug: '{slug}' already exists in domain '{domain}' (slugs are unique per domain)"
        )));
    }
    // Links that gain a click limit start counting from the clicks they already have.
    let old_limit = match old {
        Some(old) => col::<i64>(old, "max_clicks")?,
        None => None,
    };
    if old.is_some() && max_clicks.is_some() && old_limit.is_none() {
        let count = Spi::get_one_with_args::<i64>(
            "SELECT count(*) FROM linkhooks.clicks WHERE link_id = $1",
            &[id.into()],
        )?
        .unwrap_or(0);
        set(new, "click_count", count)?;
    }
    Ok(())
}

fn link_payload(row: &Row<'_>) -> Result<LinkPayload> {
    let domain: String = col(row, "domain")?.unwrap_or_default();
    let slug: String = col(row, "slug")?.unwrap_or_default();
    Ok(LinkPayload {
        id: col(row, "id")?.unwrap_or_default(),
        short_url: LinkPayload::short_url(&domain, &slug, &guc::string(&guc::BASE_URL)),
        domain,
        slug,
        destination: col(row, "destination")?.unwrap_or_default(),
        campaign: col(row, "campaign")?,
        tags: text_array(row, "tags")?.unwrap_or_default(),
    })
}

/// What subscription filters see of a link event.
fn link_facts(link: &LinkPayload) -> Facts<'_> {
    Facts {
        campaign: link.campaign.as_deref(),
        tags: &link.tags,
        click: None,
        milestone: None,
    }
}

fn emit_link_event(
    kind: EventType,
    link: &LinkPayload,
    changed: Option<(Vec<&'static str>, Map<String, Value>)>,
) -> Result<()> {
    let facts = link_facts(link);
    let id = new_event_id();
    let at = unix_now_micros();
    let (changed, changes) = changed.unzip();
    let body = payload::envelope(
        &id,
        kind,
        at,
        LinkChangeData {
            link,
            changed,
            changes,
        },
    );
    events::emit(kind, &id, &facts, |_| body.clone())?;
    Ok(())
}

/// link.expired for a link whose time or click limit ran out.
pub fn emit_link_expired(link: &LinkPayload, reason: &'static str) -> Result<()> {
    let facts = link_facts(link);
    let id = new_event_id();
    let at = unix_now_micros();
    let body = payload::envelope(
        &id,
        EventType::LinkExpired,
        at,
        LinkExpiredData {
            link,
            reason,
            expired_at: payload::format_timestamp(at),
        },
    );
    events::emit(EventType::LinkExpired, &id, &facts, |_| body.clone())?;
    Ok(())
}
