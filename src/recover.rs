//! `recover(subscription_id, since, until)`: queues again, for one
//! subscription, the events of a time range that it should have received
//! and has no delivery for — it was disabled longer than the hold window,
//! created later, or its filters left them out then. Each keeps its event id
//! (the `webhook-id`), so a receiver that saw one already can tell.
//!
//! The range must lie within `linkhooks.retention`: older delivered rows are
//! pruned, so what the subscription got could not be told from what it
//! missed. Clicks and QR scans are rebuilt from `clicks` (in the
//! subscription's IP mode, with the link as it is now); every other event is
//! taken from the body another subscription was sent, which holds no IP.

use std::net::IpAddr;

use pgrx::datum::TimestampWithTimeZone;
use pgrx::prelude::*;
use serde_json::{Value, json};

use crate::duration;
use crate::error::{Error, OrReport, Result};
use crate::events::{self, CachedSubscription};
use crate::filters::StoredFacts;
use crate::guc;
use crate::linkstore::LinkRow;
use crate::payload::{self, Click, EventType};

/// Most events one call queues; `continue_from` says where the next call starts.
const MAX_RECOVERED: i64 = 100_000;

/// One event to queue again, in order of occurrence.
struct Missed {
    at_micros: i64,
    kind: EventType,
    event_id: String,
    body: String,
}

#[pg_extern(volatile, security_definer)]
fn recover(
    subscription_id: Option<i64>,
    since: Option<TimestampWithTimeZone>,
    until: default!(Option<TimestampWithTimeZone>, "NULL"),
) -> pgrx::JsonB {
    let run = || -> Result<Value> {
        let id =
            subscription_id.ok_or_else(|| Error::invalid("subscription_id", "must not be null"))?;
        let since = since.ok_or_else(|| Error::invalid("since", "must not be null"))?;
        check_range(id, since, until)?;
        let cache = events::cache()?;
        let Some(sub) = cache.subscriptions.iter().find(|s| s.id == id) else {
            return Err(Error::invalid(
                "subscription_id",
                "the subscription was disabled longer ago than linkhooks.hold_window: enable it first",
            ));
        };
        let (clicks, clicks_full) = missed_clicks(sub, since, until)?;
        let (others, others_full) = missed_others(sub, since, until)?;
        // Where a source stopped at the cap, later events of the other may be
        // ahead of its unread ones: queue only what comes before, in order.
        let cutoff = [(clicks_full, clicks.last()), (others_full, others.last())]
            .into_iter()
            .filter_map(|(full, last)| last.filter(|_| full).map(|e| e.at_micros))
            .min();
        let mut missed: Vec<Missed> = clicks.into_iter().chain(others).collect();
        missed.retain(|m| cutoff.is_none_or(|c| m.at_micros < c));
        missed.sort_by_key(|m| m.at_micros);
        let mut queued = 0;
        for m in missed {
            queued += i64::from(events::emit_to(id, m.kind, &m.event_id, m.body)?);
        }
        Ok(json!({
            "queued": queued,
            "complete": cutoff.is_none(),
            "continue_from": cutoff.map(payload::format_timestamp),
        }))
    };
    pgrx::JsonB(run().or_report())
}

fn check_range(
    id: i64,
    since: TimestampWithTimeZone,
    until: Option<TimestampWithTimeZone>,
) -> Result<()> {
    let retention = guc::string(&guc::RETENTION);
    let retention_ms = duration::parse(&retention).map_or(0.0, |d| d.as_secs_f64() * 1000.0);
    let row = Spi::get_three_with_args::<bool, bool, bool>(
        "SELECT EXISTS (SELECT FROM linkhooks.subscriptions WHERE id = $1),
                $2 >= pg_catalog.now() - $4 * interval '1 millisecond',
                $2 < COALESCE($3, pg_catalog.now())",
        &[id.into(), since.into(), until.into(), retention_ms.into()],
    )?;
    match row {
        (Some(false), _, _) => Err(Error::NotFound(format!(
            "invalid subscription_id: subscription {id} does not exist"
        ))),
        (_, Some(false), _) => Err(Error::invalid(
            "since",
            format!(
                "must be within linkhooks.retention ({retention}) of now: older delivered rows are pruned, so what the subscription got could not be told from what it missed"
            ),
        )),
        (_, _, Some(false)) => Err(Error::invalid("until", "must be after since")),
        _ => Ok(()),
    }
}

/// Clicks and QR scans in the range the subscription has no delivery for,
/// rebuilt as it would have received them; and whether the cap was reached.
fn missed_clicks(
    sub: &CachedSubscription,
    since: TimestampWithTimeZone,
    until: Option<TimestampWithTimeZone>,
) -> Result<(Vec<Missed>, bool)> {
    Spi::connect(|client| {
        let rows = client.select(
            "SELECT c.event_id::text, c.link_id, (pg_catalog.date_part('epoch', c.clicked_at) * 1000000)::bigint,
                    pg_catalog.host(c.ip), c.user_agent, c.referer, c.country, c.city, c.device, c.browser,
                    c.os, COALESCE(c.is_bot, false), c.source, c.utm
               FROM linkhooks.clicks c
              WHERE c.clicked_at >= $2 AND c.clicked_at < COALESCE($3, pg_catalog.now())
                AND NOT EXISTS (SELECT FROM linkhooks.deliveries d
                                 WHERE d.event_id = c.event_id AND d.subscription_id = $1)
              ORDER BY c.clicked_at, c.id
              LIMIT $4",
            None,
            &[sub.id.into(), since.into(), until.into(), MAX_RECOVERED.into()],
        )?;
        let full = rows.len() as i64 >= MAX_RECOVERED;
        let mut missed = Vec::new();
        for r in rows {
            let source: String = r.get(13)?.unwrap_or_default();
            let kind = match source.as_str() {
                "qr" => EventType::QrScanned,
                _ => EventType::LinkClicked,
            };
            let link_id: i64 = r.get(2)?.unwrap_or_default();
            // A digest subscription got digests instead; a deleted link's clicks have no body to rebuild.
            if !sub.wants(kind) || sub.digest_minutes.is_some() {
                continue;
            }
            let Some(link) = LinkRow::by_id(link_id)? else {
                continue;
            };
            let click = Click {
                event_id: r.get(1)?.unwrap_or_default(),
                clicked_at_micros: r.get(3)?.unwrap_or_default(),
                ip: r.get::<String>(4)?.and_then(|ip| ip.parse::<IpAddr>().ok()),
                user_agent: r.get(5)?,
                referer: r.get(6)?,
                country: r.get(7)?,
                city: r.get(8)?,
                device: r.get(9)?,
                browser: r.get(10)?,
                os: r.get(11)?,
                is_bot: r.get(12)?.unwrap_or(false),
                source,
            };
            if !sub.filters().matches(&link.click_facts(&click)) {
                continue;
            }
            let utm = link.click_utm(r.get::<pgrx::JsonB>(14)?.map(|j| j.0));
            let body = payload::click_body(kind, &link.payload(), &click, &utm, sub.ip_mode);
            missed.push(Missed {
                at_micros: click.clicked_at_micros,
                kind,
                event_id: click.event_id,
                body,
            });
        }
        Ok((missed, full))
    })
}

/// Every other event in the range that another subscription was sent and
/// this one has no delivery for; and whether the cap was reached.
fn missed_others(
    sub: &CachedSubscription,
    since: TimestampWithTimeZone,
    until: Option<TimestampWithTimeZone>,
) -> Result<(Vec<Missed>, bool)> {
    Spi::connect(|client| {
        // One body per event: for a milestone, preferably one sent for the rules'
        // lists rather than for another subscription's own (`listed` below).
        let rows = client.select(
            "SELECT event_id, event_type, body, at, own_list FROM (
                SELECT DISTINCT ON (d.event_id) d.event_id::text, d.event_type, d.body,
                       (pg_catalog.date_part('epoch', d.created_at) * 1000000)::bigint AS at,
                       COALESCE(s.filters ? 'milestones', false) AS own_list
                  FROM linkhooks.deliveries d
                  LEFT JOIN linkhooks.subscriptions s ON s.id = d.subscription_id
                 WHERE d.created_at >= $2 AND d.created_at < COALESCE($3, pg_catalog.now())
                   AND d.event_type <> ALL ('{link.clicked,qr.scanned,webhook.test,link.clicks.digest}')
                   AND NOT EXISTS (SELECT FROM linkhooks.deliveries m
                                    WHERE m.event_id = d.event_id AND m.subscription_id = $1)
                 ORDER BY d.event_id, own_list, d.id) one
              ORDER BY at, event_id
              LIMIT $4",
            None,
            &[sub.id.into(), since.into(), until.into(), MAX_RECOVERED.into()],
        )?;
        let full = rows.len() as i64 >= MAX_RECOVERED;
        let mut missed = Vec::new();
        for r in rows {
            let Some(kind) = r.get::<String>(2)?.as_deref().and_then(EventType::parse) else {
                continue;
            };
            let body: String = r.get(3)?.unwrap_or_default();
            let parsed: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
            let stored = StoredFacts::of_body(&parsed);
            let listed = !r.get::<bool>(5)?.unwrap_or(false);
            if !sub.wants(kind) || !sub.filters().matches(&stored.facts(listed)) {
                continue;
            }
            missed.push(Missed {
                at_micros: r.get(4)?.unwrap_or_default(),
                kind,
                event_id: r.get(1)?.unwrap_or_default(),
                body,
            });
        }
        Ok((missed, full))
    })
}
