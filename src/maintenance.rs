//! Periodic work the worker runs (and anyone may run by hand): time-based
//! link expiry, campaign completion by date or goal, orphaned deliveries,
//! and retention pruning in bounded batches.
//!
//! Every statement qualifies its names (`linkhooks.`, `pg_catalog.`) and
//! skips rows another transaction holds (they are handled by a later run), so
//! a run started by the worker never waits on an admin's open transaction.

use pgrx::prelude::*;
use serde_json::json;

use crate::error::{OrReport, Result};
use crate::events::unix_now_micros;
use crate::guc;
use crate::payload::{self, CampaignPayload, LinkPayload};
use crate::triggers;

/// Rows handled per task per run, so one run stays short.
const BATCH: i64 = 10_000;

/// Runs every maintenance task once; returns what each did.
#[pg_extern(volatile, security_definer)]
fn run_maintenance() -> pgrx::JsonB {
    let run = || -> Result<serde_json::Value> {
        // Tables of 0.5.0: a newer library runs against an older schema until it is updated.
        let current = crate::linkstore::relations()?.since_0_5;
        let since_0_5 = |task: fn() -> Result<i64>| if current { task() } else { Ok(0) };
        Ok(json!({
            "links_expired": expire_links()?,
            "campaigns_completed": complete_campaigns()?,
            "orphans_dead": kill_orphans()?,
            "held_expired": expire_held()?,
            "misses_dropped": since_0_5(crate::misses::cap_rows)?,
            "keys_pruned": since_0_5(prune_keys)?,
            "minutes_pruned": since_0_5(crate::thresholds::prune)?,
            "health_minutes_pruned": since_0_5(prune_health_minutes)?,
            "deliveries_pruned": prune(current)?,
            "dead_letters_pruned": prune_dead_letters()?,
            "partitions": if current { maintain_partitions()? } else { serde_json::Value::Null },
        }))
    };
    pgrx::JsonB(run().or_report())
}

/// The partitions of clicks, deliveries and delivery_attempts: made ahead,
/// dropped behind (sql/schema.sql, `maintain_partitions`).
fn maintain_partitions() -> Result<serde_json::Value> {
    let width = guc::partition_interval();
    let retention = guc::retention();
    let millis = |d: std::time::Duration| d.as_millis() as f64;
    let mut done = serde_json::Map::new();
    for (table, keep) in [
        ("clicks", guc::click_retention()),
        ("deliveries", retention),
        ("delivery_attempts", retention),
    ] {
        let report = Spi::get_one_with_args::<pgrx::JsonB>(
            "SELECT linkhooks.maintain_partitions($1, pg_catalog.now(), $2 * interval '1 millisecond',
                                                  $3 * interval '1 millisecond')",
            &[table.into(), millis(width).into(), keep.map(millis).into()],
        )?;
        done.insert(
            table.into(),
            report.map_or(serde_json::Value::Null, |j| j.0),
        );
    }
    Ok(done.into())
}

fn expire_links() -> Result<usize> {
    let base_url = guc::string(&guc::BASE_URL);
    let links: Vec<LinkPayload> = Spi::connect_mut(|client| -> Result<Vec<LinkPayload>> {
        let rows = client.update(
            "UPDATE linkhooks.links SET expired_at = pg_catalog.now()
              WHERE id IN (SELECT id FROM linkhooks.links
                            WHERE expired_at IS NULL AND expires_at <= pg_catalog.now()
                            LIMIT $1 FOR UPDATE SKIP LOCKED)
          RETURNING id, domain, slug, destination, campaign, tags",
            None,
            &[BATCH.into()],
        )?;
        rows.into_iter()
            .map(|r| crate::linkstore::payload_from_row(&r, &base_url))
            .collect()
    })?;
    for link in &links {
        triggers::emit_link_expired(link, "expires_at")?;
    }
    Ok(links.len())
}

fn complete_campaigns() -> Result<usize> {
    let done: Vec<CampaignPayload> = Spi::connect_mut(|client| -> Result<Vec<CampaignPayload>> {
        let rows = client.update(
            "UPDATE linkhooks.campaigns c SET completed_at = pg_catalog.now()
              WHERE c.name IN (SELECT name FROM linkhooks.campaigns
                              WHERE completed_at IS NULL
                                AND (ends_at <= pg_catalog.now() OR (click_goal IS NOT NULL AND click_count >= click_goal))
                                FOR NO KEY UPDATE SKIP LOCKED)
          RETURNING name, click_goal,
                    (SELECT pg_catalog.count(*) FROM linkhooks.clicks k JOIN linkhooks.links l ON l.id = k.link_id
                      WHERE l.campaign = c.name),
                    (pg_catalog.date_part('epoch', ends_at) * 1000000)::bigint,
                    click_goal IS NOT NULL AND click_count >= click_goal",
            None,
            &[],
        )?;
        rows.into_iter()
            .map(|r| {
                Ok(CampaignPayload {
                    name: r.get(1)?.unwrap_or_default(),
                    click_goal: r.get(2)?,
                    clicks: r.get(3)?.unwrap_or_default(),
                    ends_at: r.get::<i64>(4)?.map(payload::format_timestamp),
                    completed_at: payload::format_timestamp(unix_now_micros()),
                    reason: if r.get::<bool>(5)?.unwrap_or(false) {
                        "click_goal"
                    } else {
                        "ends_at"
                    },
                })
            })
            .collect()
    })?;
    let n = done.len();
    for campaign in done {
        triggers::emit_campaign_completed(campaign)?;
    }
    Ok(n)
}

/// Pending deliveries whose subscription was deleted can never be sent. The
/// subscriptions that have due rows are found by stepping through
/// `deliveries_due` one subscription at a time (a loose index scan), so a
/// large backlog costs one probe per subscription, not a scan of every row.
fn kill_orphans() -> Result<i64> {
    Ok(Spi::get_one_with_args::<i64>(
        "WITH RECURSIVE queued(subscription_id) AS (
            (SELECT subscription_id FROM linkhooks.deliveries
              WHERE status IN ('pending', 'delivering') ORDER BY subscription_id LIMIT 1)
            UNION ALL
            SELECT (SELECT d.subscription_id FROM linkhooks.deliveries d
                     WHERE d.status IN ('pending', 'delivering') AND d.subscription_id > q.subscription_id
                     ORDER BY d.subscription_id LIMIT 1)
              FROM queued q WHERE q.subscription_id IS NOT NULL
         ), orphaned AS (
            SELECT q.subscription_id FROM queued q
             WHERE q.subscription_id IS NOT NULL
               AND NOT EXISTS (SELECT 1 FROM linkhooks.subscriptions s WHERE s.id = q.subscription_id)
         ), gone AS (
            UPDATE linkhooks.deliveries d SET status = 'dead', last_error = 'subscription deleted'
             WHERE d.id IN (SELECT x.id FROM orphaned o JOIN linkhooks.deliveries x ON x.subscription_id = o.subscription_id
                             WHERE x.status IN ('pending', 'delivering')
                             LIMIT $1 FOR NO KEY UPDATE OF x SKIP LOCKED)
         RETURNING 1)
         SELECT pg_catalog.count(*) FROM gone",
        &[BATCH.into()],
    )?
    .unwrap_or(0))
}

/// Events held for a disabled or paused subscription longer than
/// linkhooks.hold_window become dead letters (replayable once it delivers again),
/// so a subscription left off holds at most a window's worth of events.
fn expire_held() -> Result<i64> {
    if !crate::linkstore::subscriptions_hold_events() {
        return Ok(0); // a schema from before 0.5.0, not updated yet
    }
    let window_ms = guc::hold_window_ms() as f64;
    Ok(Spi::get_one_with_args::<i64>(
        "WITH expired AS (
            UPDATE linkhooks.deliveries d
               SET status = 'dead',
                   last_error = 'held longer than linkhooks.hold_window while the subscription was disabled or paused'
             WHERE d.id IN (SELECT x.id FROM linkhooks.subscriptions s
                              JOIN linkhooks.deliveries x ON x.subscription_id = s.id
                             WHERE s.held_since IS NOT NULL AND x.status = 'pending'
                               AND x.created_at < pg_catalog.now() - $2 * interval '1 millisecond'
                             LIMIT $1 FOR NO KEY UPDATE OF x SKIP LOCKED)
         RETURNING d.id, d.event_id, d.subscription_id, d.event_type, d.attempts, d.last_status_code, d.last_error),
         lettered AS (
            INSERT INTO linkhooks.dead_letters (delivery_id, event_id, subscription_id, event_type, attempts,
                                                last_status_code, last_error)
            SELECT * FROM expired ON CONFLICT (delivery_id) DO NOTHING)
         SELECT pg_catalog.count(*) FROM expired",
        &[BATCH.into(), window_ms.into()],
    )?
    .unwrap_or(0))
}

/// Drops `subscription_health`'s minutes and hours older than 25 hours (it
/// reads the last 24).
fn prune_health_minutes() -> Result<i64> {
    Ok(Spi::get_one::<i64>(
        "WITH m AS (DELETE FROM linkhooks.subscription_minutes
                     WHERE minute < pg_catalog.now() - interval '25 hours' RETURNING 1),
              l AS (DELETE FROM linkhooks.subscription_latencies
                     WHERE minute < pg_catalog.now() - interval '25 hours' RETURNING 1),
              h AS (DELETE FROM linkhooks.subscription_latency_hours
                     WHERE hour < pg_catalog.now() - interval '25 hours' RETURNING 1)
         SELECT (SELECT pg_catalog.count(*) FROM m) + (SELECT pg_catalog.count(*) FROM l)
              + (SELECT pg_catalog.count(*) FROM h)",
    )?
    .unwrap_or(0))
}

/// Idempotency keys are kept as long as delivered deliveries (linkhooks.retention):
/// a retry later than that records a new click.
fn prune_keys() -> Result<i64> {
    let Some(retention) = guc::retention() else {
        return Ok(0); // prune() says why
    };
    Ok(Spi::get_one_with_args::<i64>(
        "WITH old AS (
            DELETE FROM linkhooks.click_keys
             WHERE key IN (SELECT key FROM linkhooks.click_keys
                            WHERE created_at < pg_catalog.now() - $1 * interval '1 millisecond'
                            LIMIT $2 FOR UPDATE SKIP LOCKED)
         RETURNING 1)
         SELECT pg_catalog.count(*) FROM old",
        &[(retention.as_millis() as f64).into(), BATCH.into()],
    )?
    .unwrap_or(0))
}

/// Deletes dead letters, with their dead delivery, once replayed longer ago than
/// linkhooks.retention (the replay is a delivery of its own), or, not replayed, once
/// older than linkhooks.dead_letter_retention (default never).
fn prune_dead_letters() -> Result<i64> {
    let Some(retention) = guc::retention() else {
        return Ok(0); // prune() says why
    };
    let millis = |d: std::time::Duration| d.as_millis() as f64;
    let mut pruned = delete_dead_letters(
        "replayed_at < pg_catalog.now() - $1 * interval '1 millisecond'",
        millis(retention),
    )?;
    if let Some(keep) = guc::dead_letter_retention() {
        pruned += delete_dead_letters(
            "replayed_at IS NULL AND died_at < pg_catalog.now() - $1 * interval '1 millisecond'",
            millis(keep),
        )?;
    }
    Ok(pruned)
}

/// One batch of dead letters matching `due` (a fixed condition on $1, milliseconds).
fn delete_dead_letters(due: &str, millis: f64) -> Result<i64> {
    Ok(Spi::get_one_with_args::<i64>(
        &format!(
            "WITH old AS (
                DELETE FROM linkhooks.dead_letters
                 WHERE delivery_id IN (SELECT delivery_id FROM linkhooks.dead_letters WHERE {due}
                                        LIMIT $2 FOR UPDATE SKIP LOCKED)
             RETURNING delivery_id),
             deliveries AS (
                DELETE FROM linkhooks.deliveries d USING old WHERE d.id = old.delivery_id AND d.status = 'dead')
             SELECT pg_catalog.count(*) FROM old"
        ),
        &[millis.into(), BATCH.into()],
    )?
    .unwrap_or(0))
}

/// Deletes delivered deliveries older than linkhooks.retention from the
/// default partition of deliveries (retention drops the dated partitions
/// whole, and moves there the rows delivered too recently to go with them);
/// before 0.5.0, from the table.
fn prune(partitioned: bool) -> Result<i64> {
    let Some(retention) = guc::retention() else {
        warning!("invalid linkhooks.retention; nothing pruned (use e.g. '7d')");
        return Ok(0);
    };
    let table = if partitioned {
        "linkhooks.deliveries_default"
    } else {
        "linkhooks.deliveries"
    };
    // Their attempts go with their partitions (maintain_partitions).
    Ok(Spi::get_one_with_args::<i64>(
        &format!(
            "WITH old AS (
                DELETE FROM {table}
                 WHERE id IN (SELECT id FROM {table}
                               WHERE status = 'delivered' AND delivered_at < pg_catalog.now() - $1 * interval '1 millisecond'
                               LIMIT $2 FOR UPDATE SKIP LOCKED)
             RETURNING id)
             SELECT pg_catalog.count(*) FROM old"
        ),
        &[(retention.as_millis() as f64).into(), BATCH.into()],
    )?
    .unwrap_or(0))
}
