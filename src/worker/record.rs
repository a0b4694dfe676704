//! Recording outcomes: delivery status, the attempt log, dead letters,
//! subscription health, and the subscriptions' own bookkeeping.
//!
//! Nothing here waits for a row another transaction holds. Delivery rows and
//! subscription rows are locked with SKIP LOCKED; what could not be written
//! now (an outcome whose row is locked, a dead-letter count for a locked
//! subscription) stays in memory and is written by a later transaction. Any
//! other lock wait ends at the session's lock_timeout (1 s), and the failed
//! transaction is retried with nothing lost (see `gate::try_transaction`).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use pgrx::datum::TimestampWithTimeZone;
use pgrx::prelude::*;

use super::Worker;
use crate::error::Result;
use crate::health::{self, HealthChange};
use crate::opsevents;
use crate::payload::{DeadDelivery, DisabledSubscription};
use crate::plans::{self, FLOAT8_ARRAY, INT4_ARRAY, INT8_ARRAY, TEXT_ARRAY, TIMESTAMPTZ_ARRAY};
use crate::retry::{self, Verdict};
use crate::sender::Outcome;

/// What the subscriptions table still has to learn, per subscription.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pending {
    /// A delivery succeeded: the run of dead letters starts again from 0.
    pub reset: bool,
    /// Dead letters since (or, without `reset`, on top of the stored count).
    pub dead: i32,
    /// The endpoint answered 410 Gone: disable the subscription.
    pub gone: bool,
}

/// Subscription updates not yet written (their rows were locked).
#[derive(Clone, Debug, Default)]
pub struct Bookkeeping(pub HashMap<i64, Pending>);

impl Bookkeeping {
    pub fn delivered(&mut self, sub: i64) {
        let p = self.0.entry(sub).or_default();
        p.reset = true;
        p.dead = 0;
    }

    pub fn dead(&mut self, sub: i64, gone: bool) {
        let p = self.0.entry(sub).or_default();
        p.dead += 1;
        p.gone |= gone;
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

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
            // A schema before 0.5.0 has neither the cursor nor subscription_minutes.
            if self.schema_holds {
                Spi::connect_mut(|client| {
                    plans::execute(client, COUNT_ATTEMPTS, &[], &[]).map(|_| ())
                })?;
            }
            self.health.uncounted = false;
            self.health.counted = Some(now);
        }
        Ok(())
    }

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
        // Written by `write_health`.
        self.health.attempts.extend(attempts);
        self.health.uncounted = true;
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

    /// Writes pending subscription bookkeeping to the rows it can lock now;
    /// the rest waits for a later transaction. Writes only real changes:
    /// writing subscriptions refreshes every backend's cache.
    pub(super) fn write_bookkeeping(&mut self) -> Result<()> {
        if self.bookkeeping.is_empty() {
            return Ok(());
        }
        let ids: Vec<i64> = self.bookkeeping.0.keys().copied().collect();
        let (resets, deads, gones): (Vec<bool>, Vec<i32>, Vec<bool>) = ids
            .iter()
            .map(|id| {
                let p = &self.bookkeeping.0[id];
                (p.reset, p.dead, p.gone)
            })
            .fold(
                (vec![], vec![], vec![]),
                |(mut r, mut d, mut g), (a, b, c)| {
                    r.push(a);
                    d.push(b);
                    g.push(c);
                    (r, d, g)
                },
            );
        let disable_after = self.settings.disable_after;
        let mut disabled = Vec::new();
        let (locked, existing) = Spi::connect_mut(|client| -> Result<(Vec<i64>, Vec<i64>)> {
            let locked: Vec<i64> = client
                .update(
                    "SELECT id FROM linkhooks.subscriptions
                      WHERE id OPERATOR(pg_catalog.=) ANY ($1)
                        FOR NO KEY UPDATE SKIP LOCKED",
                    None,
                    &[ids.clone().into()],
                )?
                .into_iter()
                .map(|r| Ok(r.get::<i64>(1)?.unwrap_or_default()))
                .collect::<Result<_>>()?;
            if !locked.is_empty() {
                let updated = client.update(
                    "WITH u AS (
                        SELECT u.id, u.reset, u.dead, u.gone
                          FROM ROWS FROM (pg_catalog.unnest($1::bigint[]), pg_catalog.unnest($2::bool[]), pg_catalog.unnest($3::int[]), pg_catalog.unnest($4::bool[])) AS u(id, reset, dead, gone)
                         WHERE u.id OPERATOR(pg_catalog.=) ANY ($5)),
                     n AS (
                        SELECT s.id, u.gone, u.dead, s.enabled AS was_enabled,
                               CASE WHEN u.reset THEN 0 ELSE s.consecutive_dead_letters END + u.dead AS run
                          FROM linkhooks.subscriptions s JOIN u ON u.id = s.id)
                     UPDATE linkhooks.subscriptions s
                        SET consecutive_dead_letters = n.run,
                            enabled = s.enabled AND NOT n.gone
                                      AND NOT ($6 > 0 AND n.dead > 0 AND n.run >= $6),
                            disabled_reason = CASE
                                WHEN s.enabled AND n.gone
                                    THEN pg_catalog.format('endpoint answered 410 Gone at %s', pg_catalog.now())
                                WHEN s.enabled AND $6 > 0 AND n.dead > 0 AND n.run >= $6
                                    THEN pg_catalog.format('disabled after %s dead letters in a row', n.run)
                                ELSE s.disabled_reason END
                       FROM n
                      WHERE s.id = n.id
                        AND (n.run <> s.consecutive_dead_letters OR (n.gone AND s.enabled))
                  RETURNING s.id, s.name, s.disabled_reason, n.was_enabled AND NOT s.enabled",
                    None,
                    &[
                        ids.clone().into(),
                        resets.into(),
                        deads.into(),
                        gones.into(),
                        locked.clone().into(),
                        disable_after.into(),
                    ],
                )?;
                for row in updated {
                    if row.get::<bool>(4)? == Some(true) {
                        disabled.push(DisabledSubscription {
                            id: row.get(1)?.unwrap_or_default(),
                            name: row.get(2)?.unwrap_or_default(),
                            reason: row.get(3)?.unwrap_or_default(),
                        });
                    }
                }
            }
            let existing: Vec<i64> = if locked.len() < ids.len() {
                client
                    .select(
                        "SELECT id FROM linkhooks.subscriptions WHERE id OPERATOR(pg_catalog.=) ANY ($1)",
                        None,
                        &[ids.clone().into()],
                    )?
                    .into_iter()
                    .map(|r| Ok(r.get::<i64>(1)?.unwrap_or_default()))
                    .collect::<Result<_>>()?
            } else {
                Vec::new()
            };
            Ok((locked, existing))
        })?;
        for subscription in disabled {
            // Names and reasons only: a subscription's URL may carry a token.
            log!(
                "pg_linkhooks: subscription {} ({}) disabled: {}",
                subscription.id,
                subscription.name,
                subscription.reason
            );
            opsevents::subscription_disabled(subscription)?;
        }
        // Written, or the subscription is gone: done. Locked by someone else: later.
        let locked: HashSet<i64> = locked.into_iter().collect();
        let existing: HashSet<i64> = existing.into_iter().collect();
        self.bookkeeping
            .0
            .retain(|id, _| !locked.contains(id) && existing.contains(id));
        Ok(())
    }
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
