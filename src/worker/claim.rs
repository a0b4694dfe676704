//! Endpoints, the claim, and leases.
//!
//! A claim takes only rows the HTTP threads can start at once (see
//! `admission`), so a claimed job is either in flight or its outcome is
//! waiting to be recorded. Its lease (`next_attempt_at` of a 'delivering'
//! row) must outlast that, or a later claim would take the row again while
//! the worker still holds it: the worker renews the leases of jobs it has
//! held for half a lease, whatever holds them (a long `timeout_ms`,
//! recording deferred by a lock). A restarted worker releases every row at once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgrx::pg_sys::PgOid;
use pgrx::prelude::*;

use super::Worker;
use super::admission::Plan;
use crate::error::Result;
use crate::events::unix_now;
use crate::plans::{self, FLOAT8, INT4_ARRAY, INT8, INT8_ARRAY};
use crate::sender::Job;
use crate::shared;
use crate::signing::KeyRing;

const BOOL: PgOid = PgOid::BuiltIn(pgrx::pg_sys::BuiltinOid::BOOLOID);

/// How long a claim holds a row before another claim may take it.
pub const LEASE: Duration = Duration::from_secs(600);
/// Rows claimed for a subscription that cannot be sent (its secret does not
/// parse) go back to 'pending' and come due again after this.
const UNSENDABLE_DELAY_SECS: f64 = 60.0;

/// A subscription as the worker needs it.
pub struct Endpoint {
    pub url: Arc<str>,
    pub keys: KeyRing,
    pub hex_secret: Option<Arc<str>>,
    pub timeout: Option<Duration>,
    pub max_attempts: Option<i32>,
    /// The row version (`xmin`) it was read from.
    pub version: String,
}

/// A job the worker holds: in flight, or its outcome not yet recorded.
pub struct Held {
    /// When its lease was last set.
    pub leased: Instant,
}

impl Worker {
    /// Reloads the enabled subscriptions when they changed (or when `force`).
    pub(super) fn refresh_endpoints(&mut self, force: bool) -> Result<()> {
        let generation = shared::config_generation();
        if !force && self.endpoints_generation == Some(generation) {
            return Ok(());
        }
        let mut endpoints = HashMap::new();
        Spi::connect(|client| -> Result<()> {
            let rows = client.select(
                "SELECT id, url, secret, previous_secret,
                        pg_catalog.date_part('epoch', previous_secret_expires_at)::bigint,
                        signature_scheme, timeout_ms, max_attempts, xmin::text
                 FROM linkhooks.subscriptions WHERE enabled",
                None,
                &[],
            )?;
            for row in rows {
                let secret: String = row.get(3)?.unwrap_or_default();
                let previous: Option<String> = row.get(4)?;
                let Ok(keys) = KeyRing::new(&secret, previous.as_deref(), row.get(5)?) else {
                    continue;
                };
                let hex = row.get::<String>(6)?.as_deref() == Some("hex");
                endpoints.insert(
                    row.get::<i64>(1)?.unwrap_or_default(),
                    Endpoint {
                        url: row.get::<String>(2)?.unwrap_or_default().into(),
                        hex_secret: hex.then(|| secret.clone().into()),
                        keys,
                        timeout: row
                            .get::<i32>(7)?
                            .map(|ms| Duration::from_millis(ms.max(1) as u64)),
                        max_attempts: row.get(8)?,
                        version: row.get::<String>(9)?.unwrap_or_default(),
                    },
                );
            }
            Ok(())
        })?;
        self.flights
            .retain_subscriptions(|sub| endpoints.contains_key(&sub));
        self.endpoints = endpoints;
        self.endpoints_generation = Some(generation);
        Ok(())
    }

    /// Claims what `plan` allows: first for subscriptions not proven fast (at
    /// most `unproven_room`), then for proven-fast ones with the threads left.
    pub(super) fn claim(&mut self, plan: &Plan) -> Result<Vec<Job>> {
        let limit = plan.free.min(self.settings.batch_size);
        let unproven_limit = plan.unproven_room.min(limit);
        let mut rows = claim_rows(self, plan, unproven_limit, false)?;
        let mut filled = unproven_limit > 0 && rows.len() >= unproven_limit;
        let fast_limit = limit - rows.len();
        if fast_limit > 0 && !plan.fast.is_empty() {
            let fast = claim_rows(self, plan, fast_limit, true)?;
            filled |= fast.len() >= fast_limit;
            rows.extend(fast);
        }
        if rows.iter().any(|r| {
            self.endpoints
                .get(&r.subscription_id)
                .is_none_or(|e| e.version != r.subscription_version)
        }) {
            // A subscription committed after the last refresh, or written without
            // its trigger (logical replication apply, TRUNCATE ... RESTART IDENTITY
            // and a new row under an old id): learn it now rather than drop its
            // rows or send them with what the worker knew before.
            self.refresh_endpoints(true)?;
        }
        let now = unix_now();
        let mut jobs = Vec::with_capacity(rows.len());
        let mut unsendable = Vec::new();
        for row in rows {
            let Some(endpoint) = self.endpoints.get(&row.subscription_id) else {
                unsendable.push(row.delivery_id);
                continue;
            };
            jobs.push(Job {
                delivery_id: row.delivery_id,
                subscription_id: row.subscription_id,
                attempt: row.attempt,
                url: endpoint.url.clone(),
                event_id: row.event_id,
                body: row.body,
                keys: endpoint.keys.keys_at(now).cloned().collect(),
                hex_secret: endpoint.hex_secret.clone(),
                timeout: endpoint.timeout.unwrap_or(self.settings.default_timeout),
            });
        }
        if !unsendable.is_empty() {
            warning!(
                "pg_linkhooks: {} deliveries belong to subscriptions whose secret cannot be read; they wait {UNSENDABLE_DELAY_SECS} s",
                unsendable.len()
            );
            Spi::run_with_args(
                "UPDATE linkhooks.deliveries
                    SET status = 'pending', attempts = attempts - 1,
                        next_attempt_at = pg_catalog.now() + pg_catalog.make_interval(secs => $2)
                  WHERE id OPERATOR(pg_catalog.=) ANY ($1) AND status = 'delivering'",
                &[unsendable.into(), UNSENDABLE_DELAY_SECS.into()],
            )?;
        }
        self.more_due = filled;
        self.next_due = if filled {
            None
        } else {
            Some(self.next_due_time(plan, &jobs)?)
        };
        Ok(jobs)
    }

    /// When the earliest pending row of a subscription a claim could take
    /// comes due, at the latest the fallback poll. Subscriptions at their cap,
    /// and unproven ones when their share is taken, get a claim when an
    /// outcome frees a thread.
    fn next_due_time(&self, plan: &Plan, claimed: &[Job]) -> Result<Instant> {
        let mut in_flight: HashMap<i64, usize> =
            plan.busy.iter().map(|(s, n)| (*s, *n as usize)).collect();
        let mut unproven = 0;
        for job in claimed {
            *in_flight.entry(job.subscription_id).or_default() += 1;
            if plan.fast.binary_search(&job.subscription_id).is_err() {
                unproven += 1;
            }
        }
        let capped: Vec<i64> = in_flight
            .iter()
            .filter(|(_, n)| **n >= self.settings.limits.per_subscription)
            .map(|(s, _)| *s)
            .collect();
        let only_fast = plan.unproven_room <= unproven;
        // Run as a mutating statement so it sees the rows this transaction just claimed.
        let ms = Spi::connect_mut(|client| -> Result<Option<f64>> {
            let rows = plans::execute(
                client,
                "SELECT (pg_catalog.date_part('epoch', pg_catalog.min(c.next_attempt_at) - pg_catalog.now()) * 1000)::float8
                   FROM linkhooks.subscriptions s
                  CROSS JOIN LATERAL (
                        SELECT d.next_attempt_at FROM linkhooks.deliveries d
                         WHERE d.subscription_id = s.id AND d.status IN ('pending', 'delivering')
                         ORDER BY d.next_attempt_at
                         LIMIT 1) c
                  WHERE s.enabled AND s.id <> ALL ($1)
                    AND (NOT $3 OR s.id IN (SELECT f.id FROM pg_catalog.unnest($2::bigint[]) AS f(id)))",
                &[INT8_ARRAY, INT8_ARRAY, BOOL],
                &[capped.into(), plan.fast.clone().into(), only_fast.into()],
            )?;
            Ok(rows.first().get(1)?)
        })?;
        let wait = ms.map_or(super::IDLE_POLL, |ms| {
            Duration::from_millis(ms.clamp(1.0, super::IDLE_POLL.as_millis() as f64) as u64)
        });
        Ok(Instant::now() + wait)
    }

    /// Extends the leases of jobs held for half a lease or more.
    pub(super) fn renew_leases(&mut self) -> Result<()> {
        let now = Instant::now();
        let old: Vec<i64> = self
            .held
            .iter()
            .filter(|(_, h)| now.saturating_duration_since(h.leased) >= LEASE / 2)
            .map(|(id, _)| *id)
            .collect();
        if old.is_empty() {
            return Ok(());
        }
        let renewed = Spi::connect_mut(|client| -> Result<Vec<i64>> {
            let rows = client.update(
                "UPDATE linkhooks.deliveries
                    SET next_attempt_at = pg_catalog.now() + pg_catalog.make_interval(secs => $2)
                  WHERE id IN (SELECT id FROM linkhooks.deliveries
                                WHERE id OPERATOR(pg_catalog.=) ANY ($1) AND status = 'delivering'
                                  FOR NO KEY UPDATE SKIP LOCKED)
              RETURNING id",
                None,
                &[old.into(), LEASE.as_secs_f64().into()],
            )?;
            rows.into_iter()
                .map(|r| Ok(r.get::<i64>(1)?.unwrap_or_default()))
                .collect()
        })?;
        for id in renewed {
            if let Some(h) = self.held.get_mut(&id) {
                h.leased = now;
            }
        }
        Ok(())
    }

    /// Due in a fallback when a lease is half used (checked each loop).
    pub(super) fn lease_renewal_due(&self, now: Instant) -> bool {
        self.held
            .values()
            .any(|h| now.saturating_duration_since(h.leased) >= LEASE / 2)
    }
}

/// One claimed row.
struct Claimed {
    delivery_id: i64,
    subscription_id: i64,
    event_id: String,
    body: String,
    attempt: i32,
    /// `xmin` of the subscription row the claim saw.
    subscription_version: String,
}

/// Claims up to `limit` due rows of enabled subscriptions that are (`fast`)
/// or are not (`!fast`) in `plan.fast`, each subscription under its cap.
fn claim_rows(worker: &Worker, plan: &Plan, limit: usize, fast: bool) -> Result<Vec<Claimed>> {
    if limit == 0 {
        return Ok(Vec::new());
    }
    let (busy_subs, busy_n): (Vec<i64>, Vec<i32>) = plan.busy.iter().copied().unzip();
    Spi::connect_mut(|client| -> Result<Vec<Claimed>> {
        let rows = plans::execute(
            client,
            // Each eligible subscription's earliest due rows, at most its room under the
            // cap (an index range each, so a busy subscription's backlog is never walked),
            // merged in due order; only the rows chosen are locked.
            "WITH flying AS (
                SELECT f.sub, f.n FROM ROWS FROM (pg_catalog.unnest($2::bigint[]), pg_catalog.unnest($3::int[])) AS f(sub, n)),
             due AS (
                SELECT c.id FROM linkhooks.subscriptions s
                  LEFT JOIN flying f ON f.sub = s.id
                 CROSS JOIN LATERAL (
                       SELECT d.id, d.next_attempt_at FROM linkhooks.deliveries d
                        WHERE d.subscription_id = s.id AND d.status IN ('pending', 'delivering')
                          AND d.next_attempt_at <= pg_catalog.now()
                        ORDER BY d.next_attempt_at
                        LIMIT GREATEST($4 - COALESCE(f.n, 0), 0)) c
                 -- a hashed subplan: the fast list may be long
                 WHERE s.enabled
                   AND (s.id IN (SELECT f.id FROM pg_catalog.unnest($5::bigint[]) AS f(id))) = $6
                 ORDER BY c.next_attempt_at
                 LIMIT $1),
             locked AS (
                SELECT d.id FROM linkhooks.deliveries d JOIN due USING (id)
                 WHERE d.status IN ('pending', 'delivering') AND d.next_attempt_at <= pg_catalog.now()
                   FOR UPDATE OF d SKIP LOCKED)
             UPDATE linkhooks.deliveries d
                SET status = 'delivering', attempts = d.attempts + 1,
                    next_attempt_at = pg_catalog.now() + pg_catalog.make_interval(secs => $7)
               FROM locked, linkhooks.subscriptions sub
              WHERE d.id = locked.id AND sub.id = d.subscription_id
           RETURNING d.id, d.subscription_id, d.event_id::text, d.body, d.attempts, sub.xmin::text",
            &[
                INT8,
                INT8_ARRAY,
                INT4_ARRAY,
                INT8,
                INT8_ARRAY,
                BOOL,
                FLOAT8,
            ],
            &[
                (limit as i64).into(),
                busy_subs.into(),
                busy_n.into(),
                (worker.settings.limits.per_subscription as i64).into(),
                plan.fast.clone().into(),
                fast.into(),
                LEASE.as_secs_f64().into(),
            ],
        )?;
        rows.into_iter()
            .map(|row| {
                Ok(Claimed {
                    delivery_id: row.get(1)?.unwrap_or_default(),
                    subscription_id: row.get(2)?.unwrap_or_default(),
                    event_id: row.get(3)?.unwrap_or_default(),
                    body: row.get(4)?.unwrap_or_default(),
                    attempt: row.get(5)?.unwrap_or(1),
                    subscription_version: row.get(6)?.unwrap_or_default(),
                })
            })
            .collect()
    })
}
