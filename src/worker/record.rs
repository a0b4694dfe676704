//! Recording outcomes: delivery status, the attempt log and dead letters.
//! What they teach the subscriptions waits in `health_log` and `bookkeeping`.
//!
//! Nothing here waits for a row another transaction holds. Delivery rows and
//! subscription rows are locked with SKIP LOCKED; what could not be written
//! now (an outcome whose row is locked, a dead-letter count for a locked
//! subscription) stays in memory and is written by a later transaction. Any
//! other lock wait ends at the session's lock_timeout (1 s), and the failed
//! transaction is retried with nothing lost (see `gate::try_transaction`).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use pgrx::datum::TimestampWithTimeZone;
use pgrx::prelude::*;

use super::Worker;
use crate::error::Result;
use crate::health;
use crate::opsevents;
use crate::payload::DeadDelivery;
use crate::plans::{self, FLOAT8_ARRAY, INT4_ARRAY, INT8_ARRAY, TEXT_ARRAY, TIMESTAMPTZ_ARRAY};
use crate::retry::{self, Verdict};
use crate::sender::Outcome;

impl Worker {
    /// Writes the finished attempts. Returns the outcomes whose delivery row
    /// another transaction holds: they are recorded by a later call.
    pub(super) fn record_outcomes(&mut self, outcomes: Vec<Outcome>) -> Result<Vec<Outcome>> {
        if outcomes.is_empty() {
            return Ok(outcomes);
        }
        let verdicts: Vec<Verdict> = outcomes.iter().map(|o| self.judge(o)).collect();
        let (updated, busy, dead) = Spi::connect_mut(|client| -> Result<_> {
            let updated = set_delivery_status(client, &outcomes, &verdicts)?;
            let busy = if updated.len() < outcomes.len() {
                still_claimed(client, &outcomes, &updated)?
            } else {
                HashSet::new()
            };
            // Only outcomes whose claim still stands count from here on.
            let kept: Vec<_> = outcomes
                .iter()
                .zip(&verdicts)
                .filter(|(o, _)| updated.contains_key(&o.delivery_id))
                .collect();
            log_attempts(client, &kept, &updated, self.schema_holds)?;
            let dead = add_dead_letters(client, &kept)?;
            Ok((updated, busy, dead))
        })?;
        for delivery in dead {
            opsevents::delivery_dead(delivery)?;
        }

        let mut soonest_retry: Option<Duration> = None;
        let mut attempts = Vec::new();
        let mut retained = Vec::new();
        for (o, verdict) in outcomes.into_iter().zip(verdicts) {
            if busy.contains(&o.delivery_id) {
                retained.push(o);
                continue;
            }
            self.held.remove(&o.delivery_id);
            if !updated.contains_key(&o.delivery_id) {
                continue;
            }
            match verdict {
                Verdict::Delivered => self.bookkeeping.delivered(o.subscription_id),
                Verdict::Retry(d) => soonest_retry = Some(soonest_retry.map_or(d, |s| s.min(d))),
                Verdict::Dead => self.bookkeeping.dead(o.subscription_id, false),
                Verdict::Gone => self.bookkeeping.dead(o.subscription_id, true),
            }
            attempts.push(health::Attempt {
                subscription_id: o.subscription_id,
                succeeded: matches!(verdict, Verdict::Delivered),
                finished_micros: o.finished_micros(),
            });
        }
        if let Some(delay) = soonest_retry {
            // Wake for the earliest retry rather than the fallback poll.
            let due = std::time::Instant::now() + delay;
            self.next_due = Some(self.next_due.map_or(due, |t| t.min(due)));
        }
        self.health.logged(attempts);
        Ok(retained)
    }

    fn judge(&self, o: &Outcome) -> Verdict {
        let max_attempts = self
            .endpoints
            .get(&o.subscription_id)
            .and_then(|e| e.max_attempts)
            .unwrap_or(self.settings.max_attempts);
        retry::judge(
            o.status,
            o.retry_after,
            o.attempt,
            max_attempts,
            &self.settings.schedule,
            rand::random::<f64>(),
        )
    }
}

/// Sets each delivery's status from its attempt's verdict, but only where the
/// row is still the claim the attempt was made for (same event, same attempt,
/// still delivering): a row marked dead by maintenance meanwhile, or a new row
/// that took a truncated one's id, is left alone. A row another transaction
/// holds is skipped (see `still_claimed`). Returns the ids updated, with the
/// latency (creation to delivery, ms) of those delivered.
fn set_delivery_status(
    client: &mut pgrx::spi::SpiClient<'_>,
    outcomes: &[Outcome],
    verdicts: &[Verdict],
) -> Result<Updated> {
    let ids: Vec<i64> = outcomes.iter().map(|o| o.delivery_id).collect();
    let created: Vec<Option<TimestampWithTimeZone>> = outcomes
        .iter()
        .map(|o| TimestampWithTimeZone::try_from(o.created_at).ok())
        .collect();
    let events: Vec<&str> = outcomes.iter().map(|o| o.event_id.as_str()).collect();
    let attempts: Vec<i32> = outcomes.iter().map(|o| o.attempt).collect();
    let (statuses, delays): (Vec<&str>, Vec<Option<f64>>) = verdicts
        .iter()
        .map(|v| match v {
            Verdict::Delivered => ("delivered", None),
            Verdict::Retry(d) => ("pending", Some(d.as_secs_f64() * 1000.0)),
            Verdict::Dead | Verdict::Gone => ("dead", None),
        })
        .unzip();
    let codes: Vec<Option<i32>> = outcomes.iter().map(|o| o.status.map(i32::from)).collect();
    let errors: Vec<Option<&str>> = outcomes.iter().map(|o| o.error.as_deref()).collect();
    let finished: Vec<f64> = outcomes
        .iter()
        .map(|o| o.finished_micros() as f64 / 1e6)
        .collect();
    let rows = plans::execute(
        client,
        "WITH u AS (
            SELECT * FROM ROWS FROM (pg_catalog.unnest($1::bigint[]), pg_catalog.unnest($2::text[]), pg_catalog.unnest($3::int[]), pg_catalog.unnest($4::text[]), pg_catalog.unnest($5::float8[]), pg_catalog.unnest($6::int[]), pg_catalog.unnest($7::text[]), pg_catalog.unnest($8::float8[]), pg_catalog.unnest($9::timestamptz[]))
                AS u(id, event_id, attempt, status, delay_ms, code, error, finished, created_at)),
         -- By id and created_at, so each row reads one partition's key.
         locked AS (
            SELECT d.id FROM linkhooks.deliveries d JOIN u ON d.id = u.id AND d.created_at = u.created_at
               FOR NO KEY UPDATE OF d SKIP LOCKED)
         UPDATE linkhooks.deliveries d
            SET status = u.status,
                -- Finished rows show when they finished, not the claim's lease.
                next_attempt_at = CASE WHEN u.status = 'pending'
                                       THEN pg_catalog.now() + u.delay_ms * interval '1 millisecond'
                                       ELSE pg_catalog.to_timestamp(u.finished) END,
                delivered_at = CASE WHEN u.status = 'delivered' THEN pg_catalog.to_timestamp(u.finished) END,
                last_status_code = u.code,
                last_error = u.error
           FROM u JOIN locked ON locked.id = u.id
          WHERE d.id = u.id AND d.created_at = u.created_at AND d.event_id = u.event_id::uuid AND d.attempts = u.attempt
            AND d.status = 'delivering'
      RETURNING d.id, pg_catalog.date_part('epoch', d.delivered_at - d.created_at) * 1000",
        &[
            INT8_ARRAY,
            TEXT_ARRAY,
            INT4_ARRAY,
            TEXT_ARRAY,
            FLOAT8_ARRAY,
            INT4_ARRAY,
            TEXT_ARRAY,
            FLOAT8_ARRAY,
            TIMESTAMPTZ_ARRAY,
        ],
        &[
            ids.into(),
            events.into(),
            attempts.into(),
            statuses.into(),
            delays.into(),
            codes.into(),
            errors.into(),
            finished.into(),
            created.into(),
        ],
    )?;
    let mut kept = HashMap::with_capacity(rows.len());
    for row in rows {
        if let Some(id) = row.get::<i64>(1)? {
            kept.insert(id, row.get::<f64>(2)?);
        }
    }
    Ok(kept)
}

/// Of the outcomes not written, those whose row is still their claim: another
/// transaction held the row (SKIP LOCKED passed it), so they wait for a later
/// call. The others' claims are gone (see `set_delivery_status`).
fn still_claimed(
    client: &mut pgrx::spi::SpiClient<'_>,
    outcomes: &[Outcome],
    updated: &Updated,
) -> Result<HashSet<i64>> {
    let rest: Vec<&Outcome> = outcomes
        .iter()
        .filter(|o| !updated.contains_key(&o.delivery_id))
        .collect();
    let ids: Vec<i64> = rest.iter().map(|o| o.delivery_id).collect();
    let events: Vec<&str> = rest.iter().map(|o| o.event_id.as_str()).collect();
    let attempts: Vec<i32> = rest.iter().map(|o| o.attempt).collect();
    let rows = client.select(
        "SELECT d.id FROM linkhooks.deliveries d
           JOIN ROWS FROM (pg_catalog.unnest($1::bigint[]), pg_catalog.unnest($2::text[]), pg_catalog.unnest($3::int[])) AS u(id, event_id, attempt)
             ON d.id = u.id AND d.event_id = u.event_id::uuid AND d.attempts = u.attempt
          WHERE d.status = 'delivering'",
        None,
        &[ids.into(), events.into(), attempts.into()],
    )?;
    let mut busy = HashSet::new();
    for row in rows {
        busy.extend(row.get::<i64>(1)?);
    }
    Ok(busy)
}

/// Copies the deliveries that ran out of attempts (or were answered 410) to
/// dead_letters; returns the ones copied, for `delivery.dead`.
fn add_dead_letters(
    client: &mut pgrx::spi::SpiClient<'_>,
    kept: &[(&Outcome, &Verdict)],
) -> Result<Vec<DeadDelivery>> {
    let dead_ids: Vec<i64> = kept
        .iter()
        .filter(|(_, v)| matches!(v, Verdict::Dead | Verdict::Gone))
        .map(|(o, _)| o.delivery_id)
        .collect();
    if dead_ids.is_empty() {
        return Ok(Vec::new());
    }
    let rows = plans::execute(
        client,
        "INSERT INTO linkhooks.dead_letters
                (delivery_id, event_id, subscription_id, event_type, attempts, last_status_code, last_error)
         SELECT id, event_id, subscription_id, event_type, attempts, last_status_code, last_error
           FROM linkhooks.deliveries WHERE id OPERATOR(pg_catalog.=) ANY ($1)
         ON CONFLICT (delivery_id) DO NOTHING
         RETURNING delivery_id, event_id::text, event_type, subscription_id, attempts, last_status_code, last_error",
        &[INT8_ARRAY],
        &[dead_ids.into()],
    )?;
    rows.into_iter()
        .map(|r| {
            Ok(DeadDelivery {
                id: r.get(1)?.unwrap_or_default(),
                event_id: r.get(2)?.unwrap_or_default(),
                event_type: r.get(3)?.unwrap_or_default(),
                subscription_id: r.get(4)?.unwrap_or_default(),
                attempts: r.get(5)?.unwrap_or_default(),
                last_status_code: r.get(6)?,
                last_error: r.get(7)?,
            })
        })
        .collect()
}

/// Delivery rows written, by id, with the latency in ms of those delivered.
type Updated = HashMap<i64, Option<f64>>;

/// Appends the attempts to the delivery log, with the latency of those that
/// delivered (`updated`; a schema before 0.5.0 has no column for it).
fn log_attempts(
    client: &mut pgrx::spi::SpiClient<'_>,
    kept: &[(&Outcome, &Verdict)],
    updated: &Updated,
    with_latency: bool,
) -> Result<()> {
    if kept.is_empty() {
        return Ok(());
    }
    let ids: Vec<i64> = kept.iter().map(|(o, _)| o.delivery_id).collect();
    let subscriptions: Vec<i64> = kept.iter().map(|(o, _)| o.subscription_id).collect();
    let attempts: Vec<i32> = kept.iter().map(|(o, _)| o.attempt).collect();
    let started: Vec<f64> = kept
        .iter()
        .map(|(o, _)| o.started_unix_micros as f64 / 1e6)
        .collect();
    let durations: Vec<f64> = kept.iter().map(|(o, _)| o.duration_ms).collect();
    let codes: Vec<Option<i32>> = kept.iter().map(|(o, _)| o.status.map(i32::from)).collect();
    let errors: Vec<Option<&str>> = kept.iter().map(|(o, _)| o.error.as_deref()).collect();
    let excerpts: Vec<Option<&str>> = kept.iter().map(|(o, _)| o.excerpt.as_deref()).collect();
    let latencies: Vec<Option<f64>> = kept
        .iter()
        .map(|(o, _)| updated.get(&o.delivery_id).copied().flatten())
        .collect();
    plans::execute(
        client,
        if with_latency {
            "INSERT INTO linkhooks.delivery_attempts
                    (delivery_id, attempt, started_at, duration_ms, status_code, error, response_excerpt, subscription_id, latency_ms)
             SELECT id, n, pg_catalog.to_timestamp(s), ms, code, err, ex, sub, lat
               FROM ROWS FROM (pg_catalog.unnest($1::bigint[]), pg_catalog.unnest($2::int[]), pg_catalog.unnest($3::float8[]), pg_catalog.unnest($4::float8[]), pg_catalog.unnest($5::int[]), pg_catalog.unnest($6::text[]), pg_catalog.unnest($7::text[]), pg_catalog.unnest($8::bigint[]), pg_catalog.unnest($9::float8[]))
                    AS u(id, n, s, ms, code, err, ex, sub, lat)"
        } else {
            "INSERT INTO linkhooks.delivery_attempts
                    (delivery_id, attempt, started_at, duration_ms, status_code, error, response_excerpt, subscription_id)
             SELECT id, n, pg_catalog.to_timestamp(s), ms, code, err, ex, sub
               FROM ROWS FROM (pg_catalog.unnest($1::bigint[]), pg_catalog.unnest($2::int[]), pg_catalog.unnest($3::float8[]), pg_catalog.unnest($4::float8[]), pg_catalog.unnest($5::int[]), pg_catalog.unnest($6::text[]), pg_catalog.unnest($7::text[]), pg_catalog.unnest($8::bigint[]))
                    AS u(id, n, s, ms, code, err, ex, sub)"
        },
        &[
            INT8_ARRAY,
            INT4_ARRAY,
            FLOAT8_ARRAY,
            FLOAT8_ARRAY,
            INT4_ARRAY,
            TEXT_ARRAY,
            TEXT_ARRAY,
            INT8_ARRAY,
            FLOAT8_ARRAY,
        ],
        &[
            ids.into(),
            attempts.into(),
            started.into(),
            durations.into(),
            codes.into(),
            errors.into(),
            excerpts.into(),
            subscriptions.into(),
            latencies.into(),
        ],
    )?;
    Ok(())
}
