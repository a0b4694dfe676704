//! Subscription health: the finished attempts folded into subscription_state,
//! and the attempt log counted into the per-minute and per-hour rollups, each
//! at most once a second.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use pgrx::prelude::*;

use super::Worker;
use crate::error::Result;
use crate::health::{self, HealthChange};
use crate::locks;
use crate::plans::{self, FLOAT8_ARRAY, INT4_ARRAY, INT8_ARRAY};

/// How often the worker writes one subscription's row of subscription_state,
/// and folds the new attempts into subscription_minutes.
const HEALTH_EVERY: Duration = Duration::from_secs(1);

/// Health not yet written: finished attempts not folded into
/// subscription_state, and whether attempts were logged since
/// subscription_minutes last counted them. Each row is written at most once a
/// second rather than once a batch: under a snapshot held elsewhere every
/// version of a row stays, and each write walks them all.
#[derive(Clone, Default)]
pub struct HealthLog {
    attempts: Vec<health::Attempt>,
    written: HashMap<i64, Instant>,
    uncounted: bool,
    counted: Option<Instant>,
}

impl HealthLog {
    /// When the row of a subscription with attempts waiting may be written next.
    fn due_for(&self, subscription_id: i64, now: Instant) -> Instant {
        self.written
            .get(&subscription_id)
            .map_or(now, |t| *t + HEALTH_EVERY)
    }

    /// When new attempts may be counted next, if any wait.
    fn count_due(&self, now: Instant) -> Option<Instant> {
        self.uncounted
            .then(|| self.counted.map_or(now, |t| t + HEALTH_EVERY))
    }

    /// Attempts just logged, for `write_health`.
    pub(super) fn logged(&mut self, attempts: Vec<health::Attempt>) {
        self.attempts.extend(attempts);
        self.uncounted = true;
    }

    /// When the earliest waiting write is due, if any waits.
    pub fn due_at(&self) -> Option<Instant> {
        let now = Instant::now();
        self.attempts
            .iter()
            .map(|a| self.due_for(a.subscription_id, now))
            .chain(self.count_due(now))
            .min()
    }
}

/// Folds the attempts logged since the cursor into subscription_minutes and
/// the delivering ones into the latency rollups by minute and hour
/// (subscription_health adds those not folded yet, so it is exact meanwhile).
/// Once a second, not with each batch: under a snapshot held elsewhere every
/// version of a row stays, and an hour's row would gather an hour of them.
const COUNT_ATTEMPTS: &str = "WITH new AS (
        SELECT a.id, a.subscription_id, a.started_at, a.status_code, a.latency_ms FROM linkhooks.delivery_attempts a
         WHERE a.id > coalesce((SELECT c.counted_id FROM linkhooks.attempt_cursor c FOR UPDATE), 0)),
     delivered AS (
        SELECT n.subscription_id, pg_catalog.date_trunc('minute', n.started_at, 'UTC') AS minute,
               linkhooks.latency_bucket(n.latency_ms) AS bucket, pg_catalog.count(*) AS deliveries
          FROM new n WHERE n.latency_ms IS NOT NULL AND n.subscription_id IS NOT NULL
         GROUP BY 1, 2, 3),
     by_minute AS (
        INSERT INTO linkhooks.subscription_latencies AS t (subscription_id, minute, bucket, deliveries)
        SELECT d.subscription_id, d.minute, d.bucket, d.deliveries FROM delivered d
        ON CONFLICT (subscription_id, minute, bucket) DO UPDATE SET deliveries = t.deliveries + excluded.deliveries),
     by_hour AS (
        INSERT INTO linkhooks.subscription_latency_hours AS t (subscription_id, hour, bucket, deliveries)
        SELECT d.subscription_id, pg_catalog.date_trunc('hour', d.minute, 'UTC'), d.bucket, pg_catalog.sum(d.deliveries)
          FROM delivered d GROUP BY 1, 2, 3
        ON CONFLICT (subscription_id, hour, bucket) DO UPDATE SET deliveries = t.deliveries + excluded.deliveries),
     counted AS (
        INSERT INTO linkhooks.subscription_minutes AS t (subscription_id, minute, attempts, succeeded)
        SELECT n.subscription_id, pg_catalog.date_trunc('minute', n.started_at, 'UTC'), pg_catalog.count(*),
               pg_catalog.count(*) FILTER (WHERE n.status_code BETWEEN 200 AND 299)
          FROM new n WHERE n.subscription_id IS NOT NULL
         GROUP BY 1, 2
        ON CONFLICT (subscription_id, minute) DO UPDATE
           SET attempts = t.attempts + excluded.attempts, succeeded = t.succeeded + excluded.succeeded)
INSERT INTO linkhooks.attempt_cursor AS c (counted_id)
SELECT m.top FROM (SELECT pg_catalog.max(n.id) AS top FROM new n) m WHERE m.top IS NOT NULL
    ON CONFLICT (single) DO UPDATE SET counted_id = excluded.counted_id";

impl Worker {
    /// Folds the finished attempts of each subscription whose row was last
    /// written a second ago or more (of every one when `all`) into
    /// subscription_state, and counts new attempts into subscription_minutes
    /// when a second has passed since the last time (or when `all`).
    pub(super) fn write_health(&mut self, all: bool) -> Result<()> {
        let now = Instant::now();
        let (due, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.health.attempts)
            .into_iter()
            .partition(|a| all || self.health.due_for(a.subscription_id, now) <= now);
        self.health.attempts = waiting;
        let changes = health::summarize(due);
        for change in &changes {
            self.health.written.insert(change.subscription_id, now);
        }
        self.health
            .written
            .retain(|_, t| now.saturating_duration_since(*t) < HEALTH_EVERY);
        update_health(changes)?;
        if self.health.count_due(now).is_some_and(|t| all || t <= now) {
            // Not while a sibling worker has attempts it has not committed: a second later.
            if count_attempt_log() {
                // A schema before 0.5.0 has neither the cursor nor subscription_minutes.
                if self.schema_holds {
                    Spi::connect_mut(|client| {
                        plans::execute(client, COUNT_ATTEMPTS, &[], &[]).map(|_| ())
                    })?;
                }
                self.health.uncounted = false;
            }
            self.health.counted = Some(now);
        }
        Ok(())
    }
}

/// The attempt log's lock (`locks`: no SQL call can take it). Every worker
/// transaction that may log attempts holds it shared from its start; counting
/// them takes it exclusively, without waiting. The cursor is an attempt id, and
/// a sibling worker (with `linkhooks.workers_per_database` above 1) may commit
/// attempts with ids below some already counted: the cursor would pass them,
/// and they would never count. A sibling that counts holds it to the end of
/// its (short) transaction; lock_timeout bounds the wait for it.
pub(super) fn share_attempt_log() {
    locks::take(locks::ATTEMPT_LOG, 0, pg_sys::ShareLock);
}

/// Whether no sibling worker is in a transaction that may log attempts (this
/// transaction's own shared hold does not conflict); then none can start one
/// until this transaction ends.
fn count_attempt_log() -> bool {
    locks::try_take(locks::ATTEMPT_LOG, 0, pg_sys::ExclusiveLock)
}

/// Folds one batch's health into subscription_state (a table only the worker
/// writes: writing subscriptions would refresh every backend's cache).
fn update_health(changes: Vec<HealthChange>) -> Result<()> {
    if changes.is_empty() {
        return Ok(());
    }
    let micros_to_secs = |t: Option<i64>| t.map(|t| t as f64 / 1e6);
    let ids: Vec<i64> = changes.iter().map(|c| c.subscription_id).collect();
    let successes: Vec<Option<f64>> = changes
        .iter()
        .map(|c| micros_to_secs(c.last_success_micros))
        .collect();
    let failures: Vec<Option<f64>> = changes
        .iter()
        .map(|c| micros_to_secs(c.last_failure_micros))
        .collect();
    let runs: Vec<i32> = changes.iter().map(|c| c.trailing_failures).collect();
    Spi::connect_mut(|client| {
        plans::execute(
            client,
            "INSERT INTO linkhooks.subscription_state AS s
                    (subscription_id, last_success_at, last_failure_at, consecutive_failures)
             SELECT id, pg_catalog.to_timestamp(ok), pg_catalog.to_timestamp(bad), run
               FROM ROWS FROM (pg_catalog.unnest($1::bigint[]), pg_catalog.unnest($2::float8[]), pg_catalog.unnest($3::float8[]), pg_catalog.unnest($4::int[])) AS u(id, ok, bad, run)
             ON CONFLICT (subscription_id) DO UPDATE
                SET last_success_at = COALESCE(EXCLUDED.last_success_at, s.last_success_at),
                    last_failure_at = COALESCE(EXCLUDED.last_failure_at, s.last_failure_at),
                    consecutive_failures = CASE WHEN EXCLUDED.last_success_at IS NOT NULL
                                                THEN EXCLUDED.consecutive_failures
                                                ELSE s.consecutive_failures + EXCLUDED.consecutive_failures END",
            &[INT8_ARRAY, FLOAT8_ARRAY, FLOAT8_ARRAY, INT4_ARRAY],
            &[ids.into(), successes.into(), failures.into(), runs.into()],
        )
        .map(|_| ())
    })
}
