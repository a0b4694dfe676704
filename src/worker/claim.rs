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
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use pgrx::datum::TimestampWithTimeZone;
use pgrx::prelude::*;

use super::Worker;
use super::admission::Plan;
use crate::error::Result;
use crate::events::unix_now;
use crate::floors::{ClaimSeen, HORIZON_REUSE, Micros};
use crate::linkstore;
use crate::plans::{self, BOOL, FLOAT8, INT4_ARRAY, INT8, INT8_ARRAY, TEXT, TIMESTAMPTZ_ARRAY};
use crate::sender::Job;
use crate::shared;
use crate::signing::KeyRing;

/// How long a claim holds a row before another claim may take it.
pub const LEASE: Duration = Duration::from_secs(600);

/// How often the worker looks again at due rows another transaction holds.
const LOCKED_DUE_POLL: Duration = Duration::from_millis(200);

// The subscriptions the worker sends to are enabled and not paused. `paused` is
// 0.5.0's: on an older schema (a new library before ALTER EXTENSION UPDATE) the
// same statements run without it, so delivery goes on meanwhile.
const ENDPOINTS: &str = "SELECT id, url, secret, previous_secret,
        pg_catalog.date_part('epoch', previous_secret_expires_at)::bigint,
        signature_scheme, timeout_ms, max_attempts, xmin::text
 FROM linkhooks.subscriptions WHERE enabled AND NOT paused";
const NEXT_DUE: &str = "SELECT (pg_catalog.date_part('epoch', pg_catalog.min(c.next_attempt_at) - pg_catalog.now()) * 1000)::float8
                   FROM linkhooks.subscriptions s
                   LEFT JOIN ROWS FROM (pg_catalog.unnest($4::bigint[]), pg_catalog.unnest($5::timestamptz[])) AS fl(sub, floor)
                     ON fl.sub = s.id
                  CROSS JOIN LATERAL (
                        SELECT d.next_attempt_at FROM linkhooks.deliveries d
                         WHERE d.subscription_id = s.id AND d.status IN ('pending', 'delivering')
                           AND d.next_attempt_at >= COALESCE(fl.floor, '-infinity')
                         ORDER BY d.next_attempt_at
                         LIMIT 1) c
                  WHERE s.enabled AND NOT s.paused AND s.id <> ALL ($1)
                    AND (NOT $3 OR s.id IN (SELECT f.id FROM pg_catalog.unnest($2::bigint[]) AS f(id)))";
// Each eligible subscription's earliest due rows from its floor (see
// `floors`), at most its room under the cap (an index range each, so a busy
// subscription's backlog is never walked), merged in due order; only the rows
// chosen are locked. Returns the rows taken, then (with a NULL id) the rows
// walked past and not taken, with their due times, for the floors.
const CLAIM: &str = "WITH flying AS (
                SELECT f.sub, f.n FROM ROWS FROM (pg_catalog.unnest($2::bigint[]), pg_catalog.unnest($3::int[])) AS f(sub, n)),
             floors AS (
                SELECT f.sub, f.floor FROM ROWS FROM (pg_catalog.unnest($9::bigint[]), pg_catalog.unnest($10::timestamptz[])) AS f(sub, floor)),
             due AS (
                SELECT c.id, c.created_at, c.next_attempt_at, s.id AS sub FROM linkhooks.subscriptions s
                  LEFT JOIN flying f ON f.sub = s.id
                  LEFT JOIN floors fl ON fl.sub = s.id
                 CROSS JOIN LATERAL (
                       SELECT d.id, d.created_at, d.next_attempt_at FROM linkhooks.deliveries d
                        WHERE d.subscription_id = s.id AND d.status IN ('pending', 'delivering')
                          AND d.next_attempt_at >= COALESCE(fl.floor, '-infinity')
                          AND d.next_attempt_at <= pg_catalog.now()
                        ORDER BY d.next_attempt_at
                        LIMIT GREATEST($4 - COALESCE(f.n, 0), 0)) c
                 -- a hashed subplan: the fast list may be long
                 WHERE s.enabled AND NOT s.paused
                   AND (s.id IN (SELECT f.id FROM pg_catalog.unnest($5::bigint[]) AS f(id))) = $6
                 ORDER BY c.next_attempt_at
                 LIMIT $1),
             -- Rows are found by id and created_at, so each reads one partition's key.
             locked AS (
                SELECT d.id, d.created_at, d.status AS was, d.attempts AS attempt, d.subscription_id AS sub, d.next_attempt_at AS due_at,
                       d.next_attempt_at - pg_catalog.make_interval(secs => $7) AS leased_at
                  FROM linkhooks.deliveries d JOIN due USING (id, created_at)
                 WHERE d.status IN ('pending', 'delivering') AND d.next_attempt_at <= pg_catalog.now()
                   FOR UPDATE OF d SKIP LOCKED),
             -- A row still 'delivering' when its lease ran out was held by a worker that
             -- stopped mid-attempt: that attempt gets its row, so attempt numbers have no gaps.
             lost AS (
                INSERT INTO linkhooks.delivery_attempts (delivery_id, attempt, started_at, duration_ms, error, subscription_id)
                SELECT l.id, l.attempt, l.leased_at, 0, $8, l.sub FROM locked l WHERE l.was = 'delivering'),
             claimed AS (
                UPDATE linkhooks.deliveries d
                   SET status = 'delivering', attempts = d.attempts + 1,
                       next_attempt_at = pg_catalog.now() + pg_catalog.make_interval(secs => $7)
                  FROM locked, linkhooks.subscriptions sub
                 WHERE d.id = locked.id AND d.created_at = locked.created_at AND sub.id = d.subscription_id
             RETURNING d.id, d.subscription_id, d.event_id::text, d.body, d.attempts, sub.xmin::text, locked.due_at,
                       d.created_at)
        SELECT * FROM claimed
        UNION ALL
        SELECT NULL, due.sub, NULL, NULL, NULL, NULL, due.next_attempt_at, NULL FROM due
         WHERE due.id NOT IN (SELECT c.id FROM claimed c)";
static ENDPOINTS_BEFORE_0_5: LazyLock<String> = LazyLock::new(|| before_holds(ENDPOINTS));
static NEXT_DUE_BEFORE_0_5: LazyLock<String> = LazyLock::new(|| before_holds(NEXT_DUE));
static CLAIM_BEFORE_0_5: LazyLock<String> = LazyLock::new(|| before_holds(CLAIM));

fn before_holds(sql: &str) -> String {
    sql.replace(" AND NOT s.paused", "")
        .replace(" AND NOT paused", "")
}
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
    /// Reloads the subscriptions it delivers to (enabled, not paused) when they
    /// changed, when `ALTER EXTENSION … UPDATE` brought the 0.5.0 schema (its
    /// statements then apply), or when `force`.
    pub(super) fn refresh_endpoints(&mut self, force: bool) -> Result<()> {
        let generation = shared::config_generation();
        let holds = linkstore::subscriptions_hold_events();
        if !force && self.endpoints_generation == Some(generation) && holds == self.schema_holds {
            return Ok(());
        }
        let mut endpoints = HashMap::new();
        Spi::connect(|client| -> Result<()> {
            let rows = client.select(
                if holds {
                    ENDPOINTS
                } else {
                    ENDPOINTS_BEFORE_0_5.as_str()
                },
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
        // A subscription row written since (or restored, with its old queue) walks from the start once.
        let old = &self.endpoints;
        self.floors.retain(|sub| {
            matches!((old.get(&sub), endpoints.get(&sub)), (Some(a), Some(b)) if a.version == b.version)
        });
        self.endpoints = endpoints;
        self.endpoints_generation = Some(generation);
        self.schema_holds = holds;
        Ok(())
    }

    /// Claims what `plan` allows: first for subscriptions not proven fast (at
    /// most `unproven_room`), then for proven-fast ones with the threads left.
    pub(super) fn claim(&mut self, plan: &Plan) -> Result<Vec<Job>> {
        let limit = plan.free.min(self.settings.batch_size);
        let unproven_limit = plan.unproven_room.min(limit);
        // Read before the claims' snapshots: rows they cannot see are due after it.
        let horizon = self.horizon()?;
        let floors = FloorArgs::new(self.floors.for_claim(Instant::now()));
        let mut seen = ClaimSeen {
            horizon,
            ..ClaimSeen::default()
        };
        let mut rows = claim_rows(self, plan, unproven_limit, false, &floors, &mut seen)?;
        let mut filled = unproven_limit > 0 && rows.len() >= unproven_limit;
        let fast_limit = limit - rows.len();
        if fast_limit > 0 && !plan.fast.is_empty() {
            let fast = claim_rows(self, plan, fast_limit, true, &floors, &mut seen)?;
            filled |= fast.len() >= fast_limit;
            rows.extend(fast);
        }
        self.claim_seen = Some(seen);
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
                created_at: row.created_at,
                subscription_id: row.subscription_id,
                attempt: row.attempt,
                url: endpoint.url.clone(),
                event_id: row.event_id,
                body: row.body,
                keys: endpoint.keys.keys_at(now).cloned().collect(),
                hex_secret: endpoint.hex_secret.clone(),
                timeout: endpoint.timeout.unwrap_or(self.settings.default_timeout),
                require_https: self.settings.require_https,
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
            Some(self.next_due_time(plan, &jobs, &floors)?)
        };
        Ok(jobs)
    }

    /// When the earliest pending row of a subscription a claim could take
    /// comes due, at the latest the fallback poll. Subscriptions at their cap,
    /// and unproven ones when their share is taken, get a claim when an
    /// outcome frees a thread.
    fn next_due_time(&self, plan: &Plan, claimed: &[Job], floors: &FloorArgs) -> Result<Instant> {
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
                if self.schema_holds {
                    NEXT_DUE
                } else {
                    NEXT_DUE_BEFORE_0_5.as_str()
                },
                &[INT8_ARRAY, INT8_ARRAY, BOOL, INT8_ARRAY, TIMESTAMPTZ_ARRAY],
                &[
                    capped.into(),
                    plan.fast.clone().into(),
                    only_fast.into(),
                    floors.subscriptions.clone().into(),
                    floors.at.clone().into(),
                ],
            )?;
            Ok(rows.first().get(1)?)
        })?;
        let wait = match ms {
            None => super::IDLE_POLL,
            // Due already, yet the claim took nothing: another transaction holds those
            // rows (the claim skips them). Its commit or abort wakes no one, so poll, not spin.
            Some(ms) if ms <= 0.0 && claimed.is_empty() => LOCKED_DUE_POLL,
            Some(ms) => {
                Duration::from_millis(ms.clamp(1.0, super::IDLE_POLL.as_millis() as f64) as u64)
            }
        };
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
    created_at: Micros,
}

/// Makes rows a previous worker claimed but never finished due now (a row
/// someone holds keeps its lease). Their interrupted attempt gets its row in
/// `delivery_attempts`, so attempt numbers have no gaps.
pub fn release_abandoned() -> Result<()> {
    Spi::connect_mut(|client| -> Result<()> {
        client.update(
            "WITH abandoned AS (
                SELECT d.id, d.attempts, d.subscription_id,
                       d.next_attempt_at - pg_catalog.make_interval(secs => $1) AS leased_at
                  FROM linkhooks.deliveries d WHERE d.status = 'delivering'
                   FOR NO KEY UPDATE SKIP LOCKED),
             released AS (
                UPDATE linkhooks.deliveries d SET status = 'pending', next_attempt_at = pg_catalog.now()
                  FROM abandoned a WHERE d.id = a.id)
             INSERT INTO linkhooks.delivery_attempts (delivery_id, attempt, started_at, duration_ms, error, subscription_id)
             SELECT a.id, a.attempts, a.leased_at, 0, $2, a.subscription_id FROM abandoned a",
            None,
            &[LEASE.as_secs_f64().into(), INTERRUPTED.into()],
        )?;
        Ok(())
    })
}

/// The error recorded for an attempt whose worker stopped before it ended.
const INTERRUPTED: &str = "outcome unknown: the worker stopped during this attempt";

/// Claims up to `limit` due rows of enabled subscriptions that are (`fast`)
/// or are not (`!fast`) in `plan.fast`, each subscription under its cap.
fn claim_rows(
    worker: &Worker,
    plan: &Plan,
    limit: usize,
    fast: bool,
    floors: &FloorArgs,
    seen: &mut ClaimSeen,
) -> Result<Vec<Claimed>> {
    if limit == 0 {
        return Ok(Vec::new());
    }
    let (busy_subs, busy_n): (Vec<i64>, Vec<i32>) = plan.busy.iter().copied().unzip();
    Spi::connect_mut(|client| -> Result<Vec<Claimed>> {
        let rows = plans::execute(
            client,
            if worker.schema_holds {
                CLAIM
            } else {
                CLAIM_BEFORE_0_5.as_str()
            },
            &[
                INT8,
                INT8_ARRAY,
                INT4_ARRAY,
                INT8,
                INT8_ARRAY,
                BOOL,
                FLOAT8,
                TEXT,
                INT8_ARRAY,
                TIMESTAMPTZ_ARRAY,
            ],
            &[
                (limit as i64).into(),
                busy_subs.into(),
                busy_n.into(),
                (worker.settings.limits.per_subscription as i64).into(),
                plan.fast.clone().into(),
                fast.into(),
                LEASE.as_secs_f64().into(),
                INTERRUPTED.into(),
                floors.subscriptions.clone().into(),
                floors.at.clone().into(),
            ],
        )?;
        let mut claimed = Vec::new();
        for row in rows {
            let subscription_id: i64 = row.get(2)?.unwrap_or_default();
            let due_at = row
                .get::<TimestampWithTimeZone>(7)?
                .map_or(Micros::MIN, |t| t.into_inner());
            let Some(delivery_id) = row.get::<i64>(1)? else {
                seen.skipped.push((subscription_id, due_at));
                continue;
            };
            seen.taken.push((subscription_id, due_at));
            claimed.push(Claimed {
                delivery_id,
                subscription_id,
                event_id: row.get(3)?.unwrap_or_default(),
                body: row.get(4)?.unwrap_or_default(),
                attempt: row.get(5)?.unwrap_or(1),
                subscription_version: row.get(6)?.unwrap_or_default(),
                created_at: row
                    .get::<TimestampWithTimeZone>(8)?
                    .map_or(Micros::MIN, |t| t.into_inner()),
            });
        }
        Ok(claimed)
    })
}

/// The floors a claim starts from, as its statements take them.
struct FloorArgs {
    subscriptions: Vec<i64>,
    at: Vec<TimestampWithTimeZone>,
}

impl FloorArgs {
    fn new(floors: Vec<(i64, Micros)>) -> FloorArgs {
        // A floor that is no valid timestamp is left out: that walk starts at the beginning.
        let (subscriptions, at) = floors
            .into_iter()
            .filter_map(|(sub, f)| Some((sub, TimestampWithTimeZone::try_from(f).ok()?)))
            .unzip();
        FloorArgs { subscriptions, at }
    }
}

/// The oldest start among other transactions holding an id, or the clock
/// read before looking when none does (see `floors`); `None` while a prepared
/// transaction exists or a transaction's start cannot be read. Read at most
/// every `HORIZON_REUSE`.
impl Worker {
    fn horizon(&mut self) -> Result<Option<Micros>> {
        let now = Instant::now();
        if let Some((at, horizon)) = self.horizon
            && now.saturating_duration_since(at) < HORIZON_REUSE
        {
            return Ok(horizon);
        }
        // SAFETY: reads the clock, as clock_timestamp() does.
        let clock = unsafe { pg_sys::GetCurrentTimestamp() };
        self.floors.clock_read(clock);
        let horizon = Spi::connect(|client| -> Result<Option<Micros>> {
            // pg_stat_activity is read once per transaction unless cleared.
            client.select("SELECT pg_catalog.pg_stat_clear_snapshot()", None, &[])?;
            let rows = plans::query(client, HORIZON, &[], &[])?;
            let row = rows.first();
            if row.get::<bool>(1)?.unwrap_or(true) {
                return Ok(None);
            }
            let oldest = row.get::<TimestampWithTimeZone>(2)?.map(|t| t.into_inner());
            Ok(Some(oldest.map_or(clock, |t| t.min(clock))))
        })?;
        self.horizon = Some((now, horizon));
        Ok(horizon)
    }
}

const HORIZON: &str = "SELECT EXISTS (SELECT FROM pg_catalog.pg_prepared_xacts)
            OR EXISTS (SELECT FROM pg_catalog.pg_stat_activity a
                        WHERE a.backend_xid IS NOT NULL AND a.xact_start IS NULL),
       (SELECT pg_catalog.min(a.xact_start) FROM pg_catalog.pg_stat_activity a
         WHERE a.backend_xid IS NOT NULL AND a.pid <> pg_catalog.pg_backend_pid())";
