//! Destination health checks, the database side. `destination_checks` holds
//! one row per link that a `health_check` rule covers (its own, or its
//! campaign's): when it is checked next and what the last checks found. The
//! worker claims due rows, checks them on its threads (src/probe.rs) and
//! records the results here; a change of status queues `link.broken` or
//! `link.recovered` in the same transaction.

use std::time::Duration;

use pgrx::prelude::*;

use crate::destination::{self, CheckSettings, State, Status};
use crate::error::Result;
use crate::events::{self, new_event_id, unix_now_micros};
use crate::filters::Facts;
use crate::linkstore::LinkRow;
use crate::payload::{self, CheckPayload, EventType, LinkHealthData};
use crate::plans::{self, FLOAT8_ARRAY, INT4, INT8, INT8_ARRAY, TEXT, UUID};
use crate::probe::{Probe, Probed};
use crate::rules::{self, RuleSettings};

/// Whether the schema has health checks (0.5.0 on).
pub fn installed() -> Result<bool> {
    Ok(Spi::get_one::<bool>(
        "SELECT pg_catalog.to_regclass('linkhooks.destination_checks') IS NOT NULL",
    )?
    .unwrap_or(false))
}

/// Adds the active links a rule covers and drops rows whose link lost its
/// rule, was deleted, disabled or expired. Writes nothing when nothing changed.
pub fn discover() -> Result<()> {
    Spi::connect_mut(|client| -> Result<()> {
        plans::execute(
            client,
            "WITH covered AS (
                SELECT l.id, COALESCE(l.redirect_url, l.destination) AS url
                  FROM linkhooks.rules r JOIN linkhooks.links l ON l.id = r.link_id
                 WHERE r.kind = 'health_check'
                UNION
                SELECT l.id, COALESCE(l.redirect_url, l.destination)
                  FROM linkhooks.rules r JOIN linkhooks.links l ON l.campaign = r.campaign
                 WHERE r.kind = 'health_check' AND r.link_id IS NULL
             ), wanted AS (
                SELECT c.id, c.url FROM covered c JOIN linkhooks.links l ON l.id = c.id
                 WHERE NOT l.disabled AND l.expired_at IS NULL
                   AND (l.expires_at IS NULL OR l.expires_at > pg_catalog.now())
                   AND (l.max_clicks IS NULL OR l.click_count < l.max_clicks)
             ), gone AS (
                DELETE FROM linkhooks.destination_checks d
                 WHERE NOT EXISTS (SELECT 1 FROM wanted w WHERE w.id = d.link_id)
             )
             INSERT INTO linkhooks.destination_checks (link_id, url)
             SELECT id, url FROM wanted
             ON CONFLICT (link_id) DO NOTHING",
            &[],
            &[],
        )?;
        Ok(())
    })
}

/// Claims up to `limit` due checks. Each row's next check is set one
/// interval ahead now, so a check lost in a crash only waits for the next.
/// Also returns how long until the next row is due, if any is.
pub fn claim_due(
    limit: usize,
    default_interval: Duration,
    timeout: Duration,
) -> Result<(Vec<Probe>, Option<Duration>)> {
    Spi::connect_mut(|client| {
        let rows = plans::execute(
            client,
            "WITH due AS (
                SELECT link_id FROM linkhooks.destination_checks
                 WHERE next_check_at <= pg_catalog.now()
                 ORDER BY next_check_at LIMIT $1
                 FOR UPDATE SKIP LOCKED)
             SELECT l.id, COALESCE(l.redirect_url, l.destination),
                    (SELECT r.settings FROM linkhooks.rules r
                      WHERE r.kind = 'health_check'
                        AND (r.link_id = l.id OR (r.link_id IS NULL AND r.campaign = l.campaign))
                      ORDER BY r.link_id NULLS LAST LIMIT 1)
               FROM due JOIN linkhooks.links l ON l.id = due.link_id",
            &[INT8],
            &[(limit as i64).into()],
        )?;
        let mut probes = Vec::new();
        let (mut ids, mut intervals_ms) = (Vec::new(), Vec::new());
        for row in rows {
            let link_id: i64 = row.get(1)?.unwrap_or_default();
            let url: String = row.get(2)?.unwrap_or_default();
            // A rule changed or gone since the last discovery: the link waits for the next one.
            let settings = match row.get::<pgrx::JsonB>(3)? {
                Some(json) => match rules::check("health_check", true, false, &json.0) {
                    Ok(RuleSettings::HealthCheck(s)) => Some(s),
                    _ => None,
                },
                None => None,
            };
            let interval = settings
                .and_then(|s| s.interval)
                .unwrap_or(default_interval);
            ids.push(link_id);
            intervals_ms.push(interval.as_secs_f64() * 1000.0);
            if let Some(CheckSettings {
                method, failures, ..
            }) = settings
            {
                probes.push(Probe {
                    link_id,
                    url,
                    method,
                    failures_to_break: failures,
                    timeout,
                });
            }
        }
        let next = plans::execute(
            client,
            "WITH next AS (
                UPDATE linkhooks.destination_checks c
                   SET next_check_at = pg_catalog.now() + d.ms * interval '1 millisecond'
                  FROM unnest($1::bigint[], $2::float8[]) AS d(link_id, ms)
                 WHERE c.link_id = d.link_id)
             SELECT pg_catalog.date_part('epoch', next_check_at - pg_catalog.now())::float8
               FROM linkhooks.destination_checks
              WHERE link_id <> ALL ($1)
              ORDER BY next_check_at LIMIT 1",
            &[INT8_ARRAY, FLOAT8_ARRAY],
            &[ids.clone().into(), intervals_ms.clone().into()],
        )?;
        let after_others = plans::first::<f64>(next)?;
        // The rows just claimed are next due one interval from now.
        let after_claimed = intervals_ms
            .iter()
            .copied()
            .reduce(f64::min)
            .map(|ms| ms / 1000.0);
        let soonest = [after_others, after_claimed]
            .into_iter()
            .flatten()
            .reduce(f64::min)
            .map(|secs| Duration::from_secs_f64(secs.clamp(0.0, 86_400.0)));
        Ok((probes, soonest))
    })
}

/// Records what checks found and queues link.broken / link.recovered where
/// a link's status changed. Returns how many events were queued.
pub fn record(results: &[Probed]) -> Result<usize> {
    let mut queued = 0;
    for probed in results {
        let row = Spi::connect_mut(|client| -> Result<Option<(String, i32, String, i64)>> {
            let rows = plans::execute(
                client,
                "SELECT status, failures, url,
                        (pg_catalog.date_part('epoch', status_since) * 1000000)::bigint
                   FROM linkhooks.destination_checks WHERE link_id = $1 FOR UPDATE",
                &[INT8],
                &[probed.link_id.into()],
            )?;
            match rows.into_iter().next() {
                None => Ok(None), // its rule is gone
                Some(r) => Ok(Some((
                    r.get(1)?.unwrap_or_default(),
                    r.get(2)?.unwrap_or_default(),
                    r.get(3)?.unwrap_or_default(),
                    r.get(4)?.unwrap_or_default(),
                ))),
            }
        })?;
        let Some((status, failures, url, since_micros)) = row else {
            continue;
        };
        // A new destination starts a new run of failures.
        let failures = if url == probed.url { failures } else { 0 };
        let before = State {
            status: Status::parse(&status),
            failures,
        };
        let (after, change) = destination::step(before, probed.healthy, probed.failures_to_break);
        let event_id = match change {
            Some(change) => emit(probed, change, after, since_micros)?,
            None => None,
        };
        queued += usize::from(event_id.is_some());
        Spi::connect_mut(|client| -> Result<()> {
            plans::execute(
                client,
                "UPDATE linkhooks.destination_checks
                    SET url = $2, status = $3, failures = $4, http_status = $5, reason = $6,
                        checked_at = pg_catalog.to_timestamp($7::float8 / 1000000),
                        status_since = CASE WHEN status = $3 THEN status_since ELSE pg_catalog.now() END,
                        event_id = COALESCE($8, event_id)
                  WHERE link_id = $1",
                &[INT8, TEXT, TEXT, INT4, INT4, TEXT, INT8, UUID],
                &[
                    probed.link_id.into(),
                    probed.url.as_str().into(),
                    after.status.as_str().into(),
                    after.failures.into(),
                    probed.http_status.map(i32::from).into(),
                    probed.reason.as_deref().into(),
                    probed.checked_unix_micros.into(),
                    event_id.into(),
                ],
            )?;
            Ok(())
        })?;
    }
    Ok(queued)
}

/// Queues the event for a change; None when the link is gone.
fn emit(
    probed: &Probed,
    change: destination::Change,
    after: State,
    since_micros: i64,
) -> Result<Option<pgrx::Uuid>> {
    let Some(link) = LinkRow::by_id(probed.link_id)? else {
        return Ok(None);
    };
    let link = link.payload();
    let (kind, failures, broken_since) = match change {
        destination::Change::Broken => (EventType::LinkBroken, Some(after.failures), None),
        destination::Change::Recovered => (
            EventType::LinkRecovered,
            None,
            Some(payload::format_timestamp(since_micros)),
        ),
    };
    let id = new_event_id();
    let body = payload::envelope(
        &id.to_string(),
        kind,
        unix_now_micros(),
        LinkHealthData {
            link: &link,
            check: CheckPayload {
                url: &probed.url,
                http_status: probed.http_status,
                reason: probed.reason.as_deref(),
                failures,
                broken_since,
                checked_at: payload::format_timestamp(probed.checked_unix_micros),
            },
        },
    );
    let facts = Facts {
        campaign: link.campaign.as_deref(),
        tags: &link.tags,
        click: None,
        milestone: None,
    };
    events::emit(kind, &id.to_string(), &facts, |_| body.clone())?;
    Ok(Some(pgrx::Uuid::from_bytes(*id.as_bytes())))
}
