//! Row triggers: validate what is written, derive columns, and turn link
//! activity into events in the same transaction. Each trigger reads the row,
//! calls the pure rules, and reports the first broken rule as an SQL error.

use pgrx::datum::{AnyNumeric, FromDatum, IntoDatum, TimestampWithTimeZone, UnboxDatum};
use pgrx::heap_tuple::PgHeapTuple;
use pgrx::prelude::*;
use pgrx::{AllocatedByPostgres, AllocatedByRust, JsonB, PgTupleDesc};
use serde_json::{Map, Value};

use crate::error::{Error, OrReport, Result};
use crate::events::{self, unix_now_micros};
use crate::filters::{ClickFacts, Facts, Filters};
use crate::guc;
use crate::limits::{self, MAX_JSON_BYTES, MAX_TEXT_CHARS, MAX_UTM_BYTES};
use crate::links::{self, LinkError, MAX_HEADER_LEN, truncate};
use crate::linkstore::{self, Claim, LinkRow};
use crate::payload::{
    self, CampaignData, CampaignPayload, Click, ConversionData, ConversionPayload, EventType,
    IpMode, LinkChangeData, LinkExpiredData, LinkPayload,
};
use crate::plans::{self, INT8, TEXT};
use crate::resolve;
use crate::shared;
use crate::signing::SigningKey;
use crate::target;
use crate::tuple::{Edits, SlotColumns, attnum, col, null_in_not_null_column, text_array};
use crate::useragent;

type Row<'a> = PgHeapTuple<'a, AllocatedByRust>;

/// Microseconds between the Unix and Postgres epochs.
pub const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

fn set<T: IntoDatum>(row: &mut Row<'_>, name: &str, value: T) -> Result<()> {
    row.set_by_index(attnum(row, name)?, value)
        .map_err(|e| Error::Column(format!("{name}: {e}")))
}

fn unix_micros(ts: TimestampWithTimeZone) -> i64 {
    ts.into_inner() + PG_EPOCH_OFFSET_MICROS
}

fn transaction_now() -> TimestampWithTimeZone {
    // SAFETY: plain read of the transaction start time.
    let now = unsafe { pg_sys::GetCurrentTransactionStartTimestamp() };
    TimestampWithTimeZone::try_from(now).expect("the transaction start time is a valid timestamp")
}

fn new_event_id() -> String {
    events::new_event_id().to_string()
}

/// A uuid column's canonical text (pgrx's `Display` formats it byte by byte).
fn uuid_text(id: &pgrx::Uuid) -> String {
    uuid::Uuid::from_bytes(*id.as_bytes())
        .hyphenated()
        .to_string()
}

fn new_row<'a>(trigger: &'a PgTrigger<'a>) -> Result<Row<'a>> {
    trigger
        .new()
        .map(|r| r.into_owned())
        .ok_or_else(|| Error::Column("NEW".into()))
}

fn old_row<'a>(trigger: &'a PgTrigger<'a>) -> Result<Row<'a>> {
    trigger
        .old()
        .map(|r| r.into_owned())
        .ok_or_else(|| Error::Column("OLD".into()))
}

// ---------------------------------------------------------------- links

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
    Ok(on_link(trigger).or_report())
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
            emit_link_event(EventType::LinkUpdated, &link_payload(&new)?, Some(changed))?;
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

/// The fields whose values differ between OLD and NEW (typed comparison).
fn changed_fields(
    old: &Row<'_>,
    new: &Row<'_>,
    fields: &[&'static str],
) -> Result<Vec<&'static str>> {
    fn differs<T>(old: &Row<'_>, new: &Row<'_>, f: &str) -> Result<bool>
    where
        T: FromDatum + IntoDatum + for<'t> UnboxDatum<As<'t> = T> + PartialEq,
    {
        Ok(col::<T>(old, f)? != col::<T>(new, f)?)
    }
    let mut changed = Vec::new();
    for &f in fields {
        let different = match f {
            "tags" => text_array(old, f)? != text_array(new, f)?,
            "utm" | "metadata" => {
                col::<JsonB>(old, f)?.map(|j| j.0) != col::<JsonB>(new, f)?.map(|j| j.0)
            }
            "expires_at" | "ends_at" | "completed_at" => {
                differs::<TimestampWithTimeZone>(old, new, f)?
            }
            "max_clicks" | "click_goal" => differs::<i64>(old, new, f)?,
            "disabled" => differs::<bool>(old, new, f)?,
            _ => differs::<String>(old, new, f)?,
        };
        if different {
            changed.push(f);
        }
    }
    Ok(changed)
}

fn check_link(new: &mut Row<'_>, old: Option<&Row<'_>>) -> Result<()> {
    let slug: String = col(new, "slug")?.unwrap_or_default();
    links::check_slug(&slug)?;
    let domain: String = col(new, "domain")?.unwrap_or_default();
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
    let utm = match col::<JsonB>(new, "utm")? {
        Some(JsonB(v)) if !v.is_null() => links::normalize_utm(&v)?,
        _ => Map::new(),
    };
    set(
        new,
        "redirect_url",
        links::redirect_url(&destination, &utm)?,
    )?;

    let id: i64 = col(new, "id")?.unwrap_or_default();
    let key_changed = match old {
        None => true,
        Some(old) => {
            col::<String>(old, "slug")?.as_deref() != Some(slug.as_str())
                || col::<String>(old, "domain")?.as_deref() != Some(domain.as_str())
        }
    };
    if key_changed {
        let taken = Spi::connect(|client| -> Result<bool> {
            let rows = plans::query(
                client,
                "SELECT 1 FROM linkhooks.links WHERE domain = $1 AND slug = $2 AND id <> $3",
                &[TEXT, TEXT, INT8],
                &[domain.as_str().into(), slug.as_str().into(), id.into()],
            )?;
            Ok(!rows.is_empty())
        })?;
        if taken {
            return Err(Error::Duplicate(format!(
                "duplicate slug: '{slug}' already exists in domain '{domain}' (slugs are unique per domain)"
            )));
        }
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

fn emit_link_event(
    kind: EventType,
    link: &LinkPayload,
    changed: Option<Vec<&'static str>>,
) -> Result<()> {
    let facts = Facts {
        campaign: link.campaign.as_deref(),
        tags: &link.tags,
        click: None,
    };
    let id = new_event_id();
    let at = unix_now_micros();
    let body = payload::envelope(&id, kind, at, LinkChangeData { link, changed });
    events::emit(kind, &id, &facts, |_| body.clone())?;
    Ok(())
}

/// link.expired for a link whose time or click limit ran out.
pub fn emit_link_expired(link: &LinkPayload, reason: &'static str) -> Result<()> {
    let facts = Facts {
        campaign: link.campaign.as_deref(),
        tags: &link.tags,
        click: None,
    };
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

// ---------------------------------------------------------------- clicks

#[pg_trigger]
fn clicks_trigger<'a>(
    trigger: &'a PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, Error> {
    Ok(Some(on_click(trigger).or_report()))
}

fn on_click<'a>(trigger: &'a PgTrigger<'a>) -> Result<PgHeapTuple<'a, AllocatedByPostgres>> {
    // SAFETY: in a BEFORE INSERT row trigger, tg_trigslot holds the new row (tg_trigtuple),
    // and nothing changes it while this trigger runs. Deformed once, read by name below.
    let new = unsafe { SlotColumns::new(trigger.trigger_data().tg_trigslot) };
    let link_id: i64 = new
        .get("link_id")?
        .ok_or_else(|| Error::invalid("link_id", "must not be null"))?;
    let source: String = new.get("source")?.unwrap_or_else(|| "link".into());
    let kind = match source.as_str() {
        "link" => EventType::LinkClicked,
        "qr" => EventType::QrScanned,
        other => {
            return Err(Error::invalid(
                "source",
                format!("must be 'link' or 'qr' (got '{other}')"),
            ));
        }
    };
    let (link, reached_limit) = match linkstore::take_preclaimed(link_id) {
        Some(found) => found,
        None => {
            let link = LinkRow::by_id(link_id)?.ok_or_else(|| {
                Error::NotFound(format!("invalid link_id: link {link_id} does not exist"))
            })?;
            let reached = match link.max_clicks {
                None => false,
                Some(max) => match linkstore::claim_click(link_id)? {
                    Claim::Taken { reached_limit } => reached_limit,
                    Claim::Full => {
                        return Err(Error::LimitReached(format!(
                            "link {link_id} ('{}') has reached its max_clicks of {max}; the click was not recorded",
                            link.slug
                        )));
                    }
                },
            };
            (link, reached)
        }
    };

    let mut edits = Edits::default();
    let (click, utm) = enrich_click(&new, source, &mut edits)?;
    let utm = match utm {
        Some(Value::Object(m)) => m,
        _ => link
            .utm
            .as_ref()
            .and_then(|u| links::normalize_utm(u).ok())
            .unwrap_or_default(),
    };
    let link_payload = link.payload();
    let facts = Facts {
        campaign: link.campaign.as_deref(),
        tags: &link.tags,
        click: Some(ClickFacts {
            country: click.country.as_deref(),
            device: click.device.as_deref(),
            is_bot: click.is_bot,
        }),
    };
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
        Ok(PgHeapTuple::from_heap_tuple(
            PgTupleDesc::from_pg_unchecked((*data.tg_relation).rd_att),
            row,
        ))
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
    let clicked_at = new
        .get::<TimestampWithTimeZone>("clicked_at")?
        .map_or_else(unix_now_micros, unix_micros);
    let ip = new.ip("ip")?;
    let user_agent = capped("user_agent", MAX_HEADER_LEN)?;
    let referer = capped("referer", MAX_HEADER_LEN)?;
    let country: Option<String> = new.get("country")?;
    let city: Option<String> = new.get("city")?;
    for (field, value) in [("country", &country), ("city", &city)] {
        if let Some(v) = value {
            limits::check_text(field, v, MAX_TEXT_CHARS)?;
        }
    }
    // Comes from the request like the headers: stored capped, not refused.
    let landing_url = capped("landing_url", target::MAX_URL_LEN)?;

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

pub fn emit_campaign_completed(campaign: CampaignPayload) -> Result<()> {
    let id = new_event_id();
    let name = campaign.name.clone();
    let body = payload::envelope(
        &id,
        EventType::CampaignCompleted,
        unix_now_micros(),
        CampaignData { campaign },
    );
    let facts = Facts {
        campaign: Some(&name),
        tags: &[],
        click: None,
    };
    events::emit(EventType::CampaignCompleted, &id, &facts, |_| body.clone())?;
    Ok(())
}

// ---------------------------------------------------------------- conversions

#[pg_trigger]
fn conversions_trigger<'a>(trigger: &'a PgTrigger<'a>) -> Result<Option<Row<'a>>, Error> {
    Ok(Some(on_conversion(trigger).or_report()))
}

fn on_conversion<'a>(trigger: &'a PgTrigger<'a>) -> Result<Row<'a>> {
    let mut row = new_row(trigger)?;
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
        let clicked_link = Spi::get_one_with_args::<i64>(
            "SELECT link_id FROM linkhooks.clicks WHERE id = $1",
            &[click_id.into()],
        )?
        .ok_or_else(|| {
            Error::NotFound(format!("invalid click_id: click {click_id} does not exist"))
        })?;
        match link_id {
            Some(given) if given != clicked_link => {
                return Err(Error::invalid(
                    "link_id",
                    format!("must match the click's link ({clicked_link}), got {given}"),
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
    };
    let link_payload = link.payload();
    let facts = Facts {
        campaign: link.campaign.as_deref(),
        tags: &link.tags,
        click: None,
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
    Ok(row)
}

// ---------------------------------------------------------------- campaigns

#[pg_trigger]
fn campaigns_trigger<'a>(trigger: &'a PgTrigger<'a>) -> Result<Option<Row<'a>>, Error> {
    Ok(Some(on_campaign(trigger).or_report()))
}

fn on_campaign<'a>(trigger: &'a PgTrigger<'a>) -> Result<Row<'a>> {
    let op = trigger.op().map_err(|e| Error::Column(e.to_string()))?;
    if matches!(op, PgTriggerOperation::Delete) {
        shared::config_changed();
        return old_row(trigger);
    }
    let mut new = new_row(trigger)?;
    let name: String = col(&new, "name")?.unwrap_or_default();
    if name.trim().is_empty() {
        return Err(Error::invalid("name", "must not be empty"));
    }
    limits::check_text("name", &name, MAX_TEXT_CHARS)?;
    let goal: Option<i64> = col(&new, "click_goal")?;
    if let Some(g) = goal.filter(|g| *g <= 0) {
        return Err(Error::invalid(
            "click_goal",
            format!("must be greater than 0 (got {g})"),
        ));
    }
    let goal_changed = match op {
        PgTriggerOperation::Update => {
            let old = old_row(trigger)?;
            let changed = changed_fields(
                &old,
                &new,
                &["name", "click_goal", "ends_at", "completed_at"],
            )?;
            if changed.is_empty() {
                return Ok(new); // a click counted toward the goal
            }
            changed.iter().any(|f| *f == "name" || *f == "click_goal")
        }
        _ => true,
    };
    if goal_changed && goal.is_some() {
        let count = Spi::get_one_with_args::<i64>(
            "SELECT count(*) FROM linkhooks.clicks c JOIN linkhooks.links l ON l.id = c.link_id WHERE l.campaign = $1",
            &[name.as_str().into()],
        )?
        .unwrap_or(0);
        set(&mut new, "click_count", count)?;
    }
    shared::config_changed();
    Ok(new)
}

// ---------------------------------------------------------------- subscriptions

#[pg_trigger]
fn subscriptions_trigger<'a>(trigger: &'a PgTrigger<'a>) -> Result<Option<Row<'a>>, Error> {
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
