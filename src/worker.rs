//! The delivery worker: claims due deliveries in short transactions, hands
//! them to the HTTP pool, and records outcomes in batches. Postgres is
//! touched only from this main thread. It sleeps on its latch (set by
//! committing transactions that queued deliveries) and on the pool's wake
//! socket, so idle it costs nothing and busy it never waits for a batch.

use std::collections::{HashMap, HashSet, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, SignalWakeFlags};
use pgrx::prelude::*;

use crate::error::{OrReport, Result};
use crate::events::{unix_now, unix_now_micros};
use crate::guc;
use crate::health::{self, HealthChange};
use crate::plans::{self, FLOAT8, FLOAT8_ARRAY, INT4_ARRAY, INT8, INT8_ARRAY, TEXT_ARRAY};
use crate::retry::{self, Schedule, Verdict};
use crate::sender::{Job, Outcome, Pool};
use crate::shared;
use crate::signing::KeyRing;

/// How long a claim holds a row before another claim may take it (only
/// matters if this worker dies; a restarted worker releases its rows at once).
const LEASE_SECS: f64 = 600.0;
/// Longest sleep when nothing is due: the fallback poll.
const IDLE_POLL: Duration = Duration::from_secs(5);
/// Outcomes are written in batches: when this many wait, or the oldest has waited `RECORD_DELAY`.
const RECORD_BATCH: usize = 200;
const RECORD_DELAY: Duration = Duration::from_millis(5);

/// Whether a commit (or a signal) set the latch since the last call; resets it.
/// Called before the claim it triggers, never after a wait: the wait may return
/// for an outcome on the pool's socket while a commit sets the latch, and
/// resetting it then lost that commit's wake-up until the next idle poll (5 s).
/// Reset here, a commit either happened before the reset (so the claim's
/// snapshot, taken after it, sees the row) or sets the latch again.
fn take_wakeup() -> bool {
    // SAFETY: MyLatch is this process's own latch; only its owner resets it.
    unsafe {
        let set = std::ptr::read_volatile(&(*pg_sys::MyLatch).is_set) != 0;
        if set {
            pg_sys::ResetLatch(pg_sys::MyLatch);
        }
        set
    }
}

pub fn register() {
    BackgroundWorkerBuilder::new("pg_linkhooks delivery worker")
        .set_type("pg_linkhooks")
        .set_library("pg_linkhooks")
        .set_function("linkhooks_worker_main")
        .enable_spi_access()
        .set_restart_time(Some(Duration::from_secs(1)))
        .load();
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn linkhooks_worker_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let database = guc::string(&guc::DATABASE);
    BackgroundWorker::connect_worker_to_spi(Some(&database), None);
    log!("pg_linkhooks worker started for database \"{database}\"");

    let allow_private = Arc::new(AtomicBool::new(guc::ALLOW_PRIVATE_TARGETS.get()));
    let user_agent = format!("pg_linkhooks/{}", env!("CARGO_PKG_VERSION"));
    let pool = match Pool::start(
        Settings::read().concurrency,
        allow_private.clone(),
        &user_agent,
    ) {
        Ok(pool) => pool,
        Err(e) => {
            warning!("pg_linkhooks worker could not start its HTTP threads: {e}");
            return;
        }
    };
    // SAFETY: MyLatch, MyProcPid and MyDatabaseId are this process's own, valid while it runs.
    unsafe {
        shared::set_worker(
            Some(pg_sys::MyLatch),
            pg_sys::MyProcPid,
            pg_sys::MyDatabaseId,
        )
    };
    let mut worker = Worker::new(pool, allow_private, database);
    worker.run();
    shared::set_worker(None, 0, pg_sys::InvalidOid);
    log!("pg_linkhooks worker stopped");
}

/// Settings the worker reads at start and on SIGHUP.
struct Settings {
    schedule: Schedule,
    max_attempts: i32,
    batch_size: usize,
    concurrency: usize,
    default_timeout: Duration,
    disable_after: i32,
    maintenance_every: Duration,
}

impl Settings {
    fn read() -> Settings {
        let schedule = Schedule::parse(&guc::string(&guc::RETRY_SCHEDULE)).unwrap_or_else(|e| {
            warning!(
                "{e}; using the default schedule {}",
                retry::DEFAULT_SCHEDULE
            );
            Schedule::default()
        });
        let max_attempts = match guc::MAX_ATTEMPTS.get() {
            0 => schedule.default_max_attempts(),
            n => n,
        };
        let maintenance_every = retry::parse_duration(&guc::string(&guc::MAINTENANCE_INTERVAL))
            .filter(|d| !d.is_zero())
            .unwrap_or(Duration::from_secs(30));
        Settings {
            schedule,
            max_attempts,
            batch_size: guc::BATCH_SIZE.get().max(1) as usize,
            concurrency: guc::HTTP_CONCURRENCY.get().max(1) as usize,
            default_timeout: Duration::from_millis(guc::DEFAULT_TIMEOUT_MS.get().max(1) as u64),
            disable_after: guc::DISABLE_AFTER_DEAD_LETTERS.get(),
            maintenance_every,
        }
    }

    /// Most requests one subscription may have in flight, so a slow endpoint
    /// cannot take every thread.
    fn per_subscription_cap(&self) -> usize {
        (self.concurrency * 3 / 4).max(1)
    }
}

/// A subscription as the worker needs it.
struct Endpoint {
    url: Arc<str>,
    keys: KeyRing,
    hex_secret: Option<Arc<str>>,
    timeout: Option<Duration>,
    max_attempts: Option<i32>,
}

struct Worker {
    settings: Settings,
    pool: Pool,
    allow_private: Arc<AtomicBool>,
    database: String,
    endpoints: HashMap<i64, Endpoint>,
    endpoints_generation: Option<u64>,
    /// Claimed but not yet sent, per subscription.
    queued: HashMap<i64, VecDeque<Job>>,
    in_flight: HashMap<i64, usize>,
    outcomes: Vec<Outcome>,
    /// When the oldest unrecorded outcome arrived.
    outcomes_since: Option<Instant>,
    /// The last claim filled its limit: more rows are probably due.
    more_due: bool,
    /// Subscriptions the last claim skipped; claim again when one of them has room.
    skipped: Vec<i64>,
    /// When to claim again even if nothing wakes us (a retry comes due, the fallback poll).
    next_due: Option<Instant>,
    next_maintenance: Instant,
    extension_ready: bool,
    wait_set: *mut pg_sys::WaitEventSet,
}

impl Worker {
    fn new(pool: Pool, allow_private: Arc<AtomicBool>, database: String) -> Worker {
        // SAFETY: a wait set in TopMemoryContext lives as long as the process; the
        // descriptors (our latch, the pool's socket) outlive it.
        let wait_set = unsafe {
            let set = pg_sys::CreateWaitEventSet(pg_sys::TopMemoryContext, 3);
            pg_sys::AddWaitEventToSet(
                set,
                pg_sys::WL_LATCH_SET as u32,
                -1,
                pg_sys::MyLatch,
                std::ptr::null_mut(),
            );
            pg_sys::AddWaitEventToSet(
                set,
                pg_sys::WL_EXIT_ON_PM_DEATH as u32,
                -1,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            );
            pg_sys::AddWaitEventToSet(
                set,
                pg_sys::WL_SOCKET_READABLE as u32,
                pool.wake_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            );
            set
        };
        Worker {
            settings: Settings::read(),
            pool,
            allow_private,
            database,
            endpoints: HashMap::new(),
            endpoints_generation: None,
            queued: HashMap::new(),
            in_flight: HashMap::new(),
            outcomes: Vec::new(),
            outcomes_since: None,
            more_due: true,
            skipped: Vec::new(),
            next_due: None,
            next_maintenance: Instant::now(),
            extension_ready: false,
            wait_set,
        }
    }

    fn run(&mut self) {
        let mut woken = true;
        let mut released = false;
        loop {
            if BackgroundWorker::sigterm_received() {
                self.shutdown();
                return;
            }
            if BackgroundWorker::sighup_received() {
                unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
                if guc::string(&guc::DATABASE) != self.database {
                    log!("pg_linkhooks: linkhooks.database changed; restarting the worker");
                    self.shutdown();
                    unsafe { pg_sys::proc_exit(1) };
                }
                self.settings = Settings::read();
                self.allow_private
                    .store(guc::ALLOW_PRIVATE_TARGETS.get(), Ordering::Relaxed);
                self.pool.resize(self.settings.concurrency);
                woken = true;
            }
            let arrived = self.pool.drain();
            let got_outcomes = !arrived.is_empty();
            for outcome in arrived {
                self.finish(outcome);
            }
            let now = Instant::now();
            let timer_due = self.next_due.is_some_and(|t| t <= now);
            // New work was committed: claim it as soon as the threads want more.
            self.more_due |= woken;
            let want_claim = timer_due
                || (self.hungry()
                    && (self.more_due || (got_outcomes && self.saturated() != self.skipped)));
            let maintenance_due = now >= self.next_maintenance;
            // Subscriptions changed: learn which before sending anything more (see refresh_endpoints).
            let subscriptions_changed = self.extension_ready
                && self.endpoints_generation != Some(shared::config_generation());
            // Few, larger transactions: outcomes wait for a batch, a claim or a short delay.
            let record_due = !self.outcomes.is_empty()
                && (want_claim
                    || self.outcomes.len() >= RECORD_BATCH
                    || self.outcomes_since.is_some_and(|t| now >= t + RECORD_DELAY)
                    || self.in_flight.is_empty());
            if want_claim || record_due || maintenance_due || subscriptions_changed {
                // An error aborts the transaction (so no claim is half-done) and
                // restarts the worker, which then releases the rows it held.
                let jobs = BackgroundWorker::transaction(AssertUnwindSafe(|| {
                    self.tick(want_claim, record_due, maintenance_due, &mut released)
                        .or_report()
                }));
                // A background worker must send its table statistics itself (at most once a
                // second); without them autovacuum never sees the dead rows it leaves.
                // SAFETY: called between transactions, as Postgres requires.
                unsafe { pg_sys::pgstat_report_stat(false) };
                self.enqueue(jobs);
                if maintenance_due {
                    self.next_maintenance = Instant::now() + self.settings.maintenance_every;
                }
            }
            self.dispatch();
            let in_flight: usize = self.in_flight.values().sum();
            shared::record_loop(in_flight as i64, unix_now_micros() / 1000);
            self.wait();
            woken = take_wakeup();
        }
    }

    /// One short transaction: record outcomes, claim due rows, maybe maintain.
    fn tick(
        &mut self,
        claim: bool,
        record: bool,
        maintain: bool,
        released: &mut bool,
    ) -> Result<Vec<Job>> {
        if !self.extension_ready {
            self.extension_ready =
                Spi::get_one::<bool>("SELECT to_regclass('linkhooks.deliveries') IS NOT NULL")?
                    .unwrap_or(false);
            if !self.extension_ready {
                self.more_due = false;
                self.next_due = Some(Instant::now() + IDLE_POLL);
                return Ok(Vec::new());
            }
        }
        if crate::replication::receives_deliveries()? {
            // A publisher's worker sends these rows; we must not send them again.
            self.more_due = false;
            self.next_due = Some(Instant::now() + IDLE_POLL);
            return Ok(Vec::new());
        }
        if !*released {
            // Rows a previous worker claimed but never finished are due now.
            Spi::run("SET synchronous_commit = off")?; // safe: a lost worker commit only means a resend
            // The claim must walk deliveries_due in order and stop at its limit. Its generic
            // plan, costed from an estimate of one due row, otherwise picks a sequential
            // scan and a sort of the whole backlog (120 ms instead of 2 ms at 50k rows).
            // Every other statement here is a lookup by key, which these settings favour too.
            Spi::run("SET enable_seqscan = off")?;
            Spi::run("SET enable_sort = off")?;
            // Compiling a short statement would cost it 100 ms (the settings above make every
            // plan look expensive enough to qualify).
            Spi::run("SET jit = off")?;
            Spi::run(
                "UPDATE linkhooks.deliveries SET next_attempt_at = now() WHERE status = 'delivering'",
            )?;
            *released = true;
        }
        self.refresh_endpoints()?;
        if record {
            self.record_outcomes()?;
        }
        let jobs = if claim { self.claim()? } else { Vec::new() };
        if maintain {
            Spi::run("SELECT linkhooks.run_maintenance()")?;
        }
        Ok(jobs)
    }

    fn refresh_endpoints(&mut self) -> Result<()> {
        let generation = shared::config_generation();
        if self.endpoints_generation == Some(generation) {
            return Ok(());
        }
        let mut endpoints = HashMap::new();
        Spi::connect(|client| -> Result<()> {
            let rows = client.select(
                "SELECT id, url, secret, previous_secret, extract(epoch FROM previous_secret_expires_at)::bigint,
                        signature_scheme, timeout_ms, max_attempts
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
                    },
                );
            }
            Ok(())
        })?;
        // Jobs claimed for a subscription since deleted or disabled are not sent. Their rows
        // stay claimed until the lease ends; then maintenance dead-letters a deleted
        // subscription's rows, and a disabled one's wait for it to be enabled again.
        self.queued.retain(|sub, _| endpoints.contains_key(sub));
        self.endpoints = endpoints;
        self.endpoints_generation = Some(generation);
        Ok(())
    }

    /// Subscriptions with a full round of requests already waiting to be sent
    /// (claiming more for them would only hold rows), in id order.
    fn saturated(&self) -> Vec<i64> {
        let cap = self.settings.per_subscription_cap();
        let mut subs: Vec<i64> = self
            .queued
            .iter()
            .filter(|(_, q)| q.len() >= cap)
            .map(|(sub, _)| *sub)
            .collect();
        subs.sort_unstable();
        subs
    }

    /// Jobs waiting for subscriptions that are not saturated.
    fn waiting(&self) -> usize {
        let cap = self.settings.per_subscription_cap();
        self.queued
            .values()
            .map(VecDeque::len)
            .filter(|n| *n < cap)
            .sum()
    }

    /// Too little is waiting to keep the threads busy: claim if more is due.
    fn hungry(&self) -> bool {
        self.waiting() < self.settings.concurrency
    }

    fn claim(&mut self) -> Result<Vec<Job>> {
        let saturated = self.saturated();
        let room = self.settings.batch_size.saturating_sub(self.waiting());
        if room == 0 {
            self.more_due = true;
            return Ok(Vec::new());
        }
        let now = unix_now();
        let mut jobs = Vec::new();
        Spi::connect_mut(|client| -> Result<()> {
            let rows = plans::execute(
                client,
                // Each enabled, unsaturated subscription's earliest due rows (an index range
                // each, so a saturated subscription's backlog is never walked), merged in
                // due order; only the rows chosen are locked.
                "WITH due AS (
                    SELECT c.id FROM linkhooks.subscriptions s
                     CROSS JOIN LATERAL (
                           SELECT d.id, d.next_attempt_at FROM linkhooks.deliveries d
                            WHERE d.subscription_id = s.id AND d.status IN ('pending', 'delivering')
                              AND d.next_attempt_at <= now()
                            ORDER BY d.next_attempt_at
                            LIMIT $1) c
                     WHERE s.enabled AND s.id <> ALL ($2)
                     ORDER BY c.next_attempt_at
                     LIMIT $1),
                 locked AS (
                    SELECT d.id FROM linkhooks.deliveries d JOIN due USING (id)
                     WHERE d.status IN ('pending', 'delivering') AND d.next_attempt_at <= now()
                       FOR UPDATE OF d SKIP LOCKED)
                 UPDATE linkhooks.deliveries d
                    SET status = 'delivering', attempts = d.attempts + 1,
                        next_attempt_at = now() + make_interval(secs => $3)
                   FROM locked WHERE d.id = locked.id
               RETURNING d.id, d.subscription_id, d.event_id::text, d.body, d.attempts",
                &[INT8, INT8_ARRAY, FLOAT8],
                &[
                    (room as i64).into(),
                    saturated.clone().into(),
                    LEASE_SECS.into(),
                ],
            )?;
            for row in rows {
                let subscription_id: i64 = row.get(2)?.unwrap_or_default();
                let Some(endpoint) = self.endpoints.get(&subscription_id) else {
                    continue;
                };
                jobs.push(Job {
                    delivery_id: row.get(1)?.unwrap_or_default(),
                    subscription_id,
                    attempt: row.get(5)?.unwrap_or(1),
                    url: endpoint.url.clone(),
                    event_id: row.get(3)?.unwrap_or_default(),
                    body: row.get(4)?.unwrap_or_default(),
                    keys: endpoint.keys.keys_at(now).cloned().collect(),
                    hex_secret: endpoint.hex_secret.clone(),
                    timeout: endpoint.timeout.unwrap_or(self.settings.default_timeout),
                });
            }
            Ok(())
        })?;
        self.more_due = jobs.len() >= room;
        self.next_due = if self.more_due {
            None
        } else {
            Some(self.next_due_time(&saturated)?)
        };
        self.skipped = saturated;
        Ok(jobs)
    }

    /// When the earliest pending row of a subscription we would claim for comes
    /// due, at the latest the fallback poll. Skipped subscriptions get a claim
    /// when they have room again.
    fn next_due_time(&self, skipped: &[i64]) -> Result<Instant> {
        // Run as a mutating statement so it sees the rows this transaction just claimed.
        let ms = Spi::connect_mut(|client| -> Result<Option<f64>> {
            let rows = plans::execute(
                client,
                "SELECT (extract(epoch FROM min(c.next_attempt_at) - now()) * 1000)::float8
                   FROM linkhooks.subscriptions s
                  CROSS JOIN LATERAL (
                        SELECT d.next_attempt_at FROM linkhooks.deliveries d
                         WHERE d.subscription_id = s.id AND d.status IN ('pending', 'delivering')
                         ORDER BY d.next_attempt_at
                         LIMIT 1) c
                  WHERE s.enabled AND s.id <> ALL ($1)",
                &[INT8_ARRAY],
                &[skipped.to_vec().into()],
            )?;
            Ok(rows.first().get(1)?)
        })?;
        let wait = ms.map_or(IDLE_POLL, |ms| {
            Duration::from_millis(ms.clamp(1.0, IDLE_POLL.as_millis() as f64) as u64)
        });
        Ok(Instant::now() + wait)
    }

    fn enqueue(&mut self, jobs: Vec<Job>) {
        for job in jobs {
            self.queued
                .entry(job.subscription_id)
                .or_default()
                .push_back(job);
        }
    }

    /// Sends queued jobs while their subscription is under its cap.
    fn dispatch(&mut self) {
        let cap = self.settings.per_subscription_cap();
        for (sub, queue) in self.queued.iter_mut() {
            let flying = self.in_flight.entry(*sub).or_insert(0);
            while *flying < cap {
                let Some(job) = queue.pop_front() else { break };
                *flying += 1;
                self.pool.submit(job);
            }
        }
        self.queued.retain(|_, q| !q.is_empty());
    }

    fn finish(&mut self, outcome: Outcome) {
        if let Some(n) = self.in_flight.get_mut(&outcome.subscription_id) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.in_flight.remove(&outcome.subscription_id);
            }
        }
        self.outcomes_since.get_or_insert_with(Instant::now);
        self.outcomes.push(outcome);
    }

    /// Writes every finished attempt: delivery status, attempt log, dead letters, subscription health.
    fn record_outcomes(&mut self) -> Result<()> {
        if self.outcomes.is_empty() {
            return Ok(());
        }
        let outcomes = std::mem::take(&mut self.outcomes);
        self.outcomes_since = None;
        let verdicts: Vec<Verdict> = outcomes.iter().map(|o| self.judge(o)).collect();
        // Only outcomes whose claim still stands count from here on.
        let kept = Spi::connect_mut(|client| -> Result<Vec<(&Outcome, &Verdict)>> {
            let updated = set_delivery_status(client, &outcomes, &verdicts)?;
            let kept: Vec<_> = outcomes
                .iter()
                .zip(&verdicts)
                .filter(|(o, _)| updated.contains(&o.delivery_id))
                .collect();
            log_attempts(client, &kept)?;
            add_dead_letters(client, &kept)?;
            Ok(kept)
        })?;

        let mut dead: HashMap<i64, i64> = HashMap::new();
        let mut delivered_subs = Vec::new();
        let mut gone_subs = Vec::new();
        let mut soonest_retry: Option<Duration> = None;
        for (o, verdict) in &kept {
            match verdict {
                Verdict::Delivered => delivered_subs.push(o.subscription_id),
                Verdict::Retry(d) => soonest_retry = Some(soonest_retry.map_or(*d, |s| s.min(*d))),
                Verdict::Dead => *dead.entry(o.subscription_id).or_default() += 1,
                Verdict::Gone => {
                    gone_subs.push(o.subscription_id);
                    *dead.entry(o.subscription_id).or_default() += 1;
                }
            }
        }
        if let Some(delay) = soonest_retry {
            // Wake for the earliest retry rather than the fallback poll.
            let due = Instant::now() + delay;
            self.next_due = Some(self.next_due.map_or(due, |t| t.min(due)));
        }
        let attempts = kept.iter().map(|(o, v)| health::Attempt {
            subscription_id: o.subscription_id,
            succeeded: matches!(v, Verdict::Delivered),
            finished_micros: o.finished_micros(),
        });
        self.update_health(
            &delivered_subs,
            &dead,
            &gone_subs,
            health::summarize(attempts),
        )
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

    fn update_health(
        &self,
        delivered: &[i64],
        dead: &HashMap<i64, i64>,
        gone: &[i64],
        changes: Vec<HealthChange>,
    ) -> Result<()> {
        // subscription_state, not subscriptions: writing subscriptions would refresh every backend's cache.
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
                 SELECT id, to_timestamp(ok), to_timestamp(bad), run
                   FROM unnest($1::bigint[], $2::float8[], $3::float8[], $4::int[]) AS u(id, ok, bad, run)
                 ON CONFLICT (subscription_id) DO UPDATE
                    SET last_success_at = coalesce(EXCLUDED.last_success_at, s.last_success_at),
                        last_failure_at = coalesce(EXCLUDED.last_failure_at, s.last_failure_at),
                        consecutive_failures = CASE WHEN EXCLUDED.last_success_at IS NOT NULL
                                                    THEN EXCLUDED.consecutive_failures
                                                    ELSE s.consecutive_failures + EXCLUDED.consecutive_failures END",
                &[INT8_ARRAY, FLOAT8_ARRAY, FLOAT8_ARRAY, INT4_ARRAY],
                &[ids.into(), successes.into(), failures.into(), runs.into()],
            )
            .map(|_| ())
        })?;
        if !delivered.is_empty() {
            Spi::run_with_args(
                "UPDATE linkhooks.subscriptions SET consecutive_dead_letters = 0
                  WHERE id = ANY ($1) AND consecutive_dead_letters <> 0",
                &[delivered.to_vec().into()],
            )?;
        }
        for (sub, n) in dead {
            Spi::run_with_args(
                "UPDATE linkhooks.subscriptions
                    SET consecutive_dead_letters = consecutive_dead_letters + $2,
                        enabled = enabled AND NOT ($3 > 0 AND consecutive_dead_letters + $2 >= $3),
                        disabled_reason = CASE WHEN enabled AND $3 > 0 AND consecutive_dead_letters + $2 >= $3
                                               THEN format('disabled after %s dead letters in a row', consecutive_dead_letters + $2)
                                               ELSE disabled_reason END
                  WHERE id = $1",
                &[(*sub).into(), (*n as i32).into(), self.settings.disable_after.into()],
            )?;
        }
        for sub in gone {
            Spi::run_with_args(
                "UPDATE linkhooks.subscriptions
                    SET enabled = false,
                        disabled_reason = format('endpoint answered 410 Gone at %s', now())
                  WHERE id = $1 AND enabled",
                &[(*sub).into()],
            )?;
        }
        Ok(())
    }

    /// Sleeps until the latch is set (new work committed, signal), an outcome
    /// arrives, or the next retry is due. Leaves the latch as it is: see `take_wakeup`.
    fn wait(&self) {
        let now = Instant::now();
        let timeout = if self.more_due && self.hungry() {
            Duration::ZERO
        } else {
            let until = |t: Instant| t.saturating_duration_since(now);
            let mut timeout = self
                .next_due
                .map_or(IDLE_POLL, until)
                .min(until(self.next_maintenance))
                .min(IDLE_POLL);
            if let Some(since) = self.outcomes_since {
                timeout = timeout.min(until(since + RECORD_DELAY));
            }
            timeout
        };
        let mut event = pg_sys::WaitEvent::default();
        // SAFETY: the wait set was built in `new` and lives for the process.
        unsafe {
            pg_sys::WaitEventSetWait(
                self.wait_set,
                timeout.as_millis() as i64,
                &mut event,
                1,
                pg_sys::PG_WAIT_EXTENSION,
            );
        }
        pgrx::check_for_interrupts!();
    }

    /// Stops promptly: waits briefly for requests in flight and records them.
    fn shutdown(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut in_flight: usize = self.in_flight.values().sum();
        while in_flight > 0 && Instant::now() < deadline {
            if let Some(outcome) = self
                .pool
                .wait_one(deadline.saturating_duration_since(Instant::now()))
            {
                self.finish(outcome);
                in_flight -= 1;
            }
        }
        if !self.outcomes.is_empty() && self.extension_ready {
            BackgroundWorker::transaction(AssertUnwindSafe(|| self.record_outcomes().or_report()));
        }
    }
}

/// Sets each delivery's status from its attempt's verdict, but only where the
/// row is still the claim the attempt was made for (same event, same attempt,
/// still delivering): a row marked dead by maintenance meanwhile, or a new row
/// that took a truncated one's id, is left alone. Returns the ids updated.
fn set_delivery_status(
    client: &mut pgrx::spi::SpiClient<'_>,
    outcomes: &[Outcome],
    verdicts: &[Verdict],
) -> Result<HashSet<i64>> {
    let ids: Vec<i64> = outcomes.iter().map(|o| o.delivery_id).collect();
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
        "UPDATE linkhooks.deliveries d
            SET status = u.status,
                next_attempt_at = CASE WHEN u.status = 'pending'
                                       THEN now() + u.delay_ms * interval '1 millisecond'
                                       ELSE d.next_attempt_at END,
                delivered_at = CASE WHEN u.status = 'delivered' THEN to_timestamp(u.finished) END,
                last_status_code = u.code,
                last_error = u.error
           FROM unnest($1::bigint[], $2::text[], $3::int[], $4::text[], $5::float8[], $6::int[], $7::text[], $8::float8[])
                AS u(id, event_id, attempt, status, delay_ms, code, error, finished)
          WHERE d.id = u.id AND d.event_id = u.event_id::uuid AND d.attempts = u.attempt
            AND d.status = 'delivering'
      RETURNING d.id",
        &[INT8_ARRAY, TEXT_ARRAY, INT4_ARRAY, TEXT_ARRAY, FLOAT8_ARRAY, INT4_ARRAY, TEXT_ARRAY, FLOAT8_ARRAY],
        &[
            ids.into(),
            events.into(),
            attempts.into(),
            statuses.into(),
            delays.into(),
            codes.into(),
            errors.into(),
            finished.into(),
        ],
    )?;
    let mut kept = HashSet::with_capacity(rows.len());
    for row in rows {
        kept.extend(row.get::<i64>(1)?);
    }
    Ok(kept)
}

/// Copies the deliveries that ran out of attempts (or were answered 410) to dead_letters.
fn add_dead_letters(
    client: &mut pgrx::spi::SpiClient<'_>,
    kept: &[(&Outcome, &Verdict)],
) -> Result<()> {
    let dead_ids: Vec<i64> = kept
        .iter()
        .filter(|(_, v)| matches!(v, Verdict::Dead | Verdict::Gone))
        .map(|(o, _)| o.delivery_id)
        .collect();
    if !dead_ids.is_empty() {
        plans::execute(
            client,
            "INSERT INTO linkhooks.dead_letters
                    (delivery_id, event_id, subscription_id, event_type, attempts, last_status_code, last_error)
             SELECT id, event_id, subscription_id, event_type, attempts, last_status_code, last_error
               FROM linkhooks.deliveries WHERE id = ANY ($1)
             ON CONFLICT (delivery_id) DO NOTHING",
            &[INT8_ARRAY],
            &[dead_ids.into()],
        )?;
    }
    Ok(())
}

/// Appends the attempts to the delivery log.
fn log_attempts(
    client: &mut pgrx::spi::SpiClient<'_>,
    kept: &[(&Outcome, &Verdict)],
) -> Result<()> {
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
    plans::execute(
        client,
        "INSERT INTO linkhooks.delivery_attempts
                (delivery_id, attempt, started_at, duration_ms, status_code, error, response_excerpt, subscription_id)
         SELECT id, n, to_timestamp(s), ms, code, err, ex, sub
           FROM unnest($1::bigint[], $2::int[], $3::float8[], $4::float8[], $5::int[], $6::text[], $7::text[], $8::bigint[])
                AS u(id, n, s, ms, code, err, ex, sub)",
        &[INT8_ARRAY, INT4_ARRAY, FLOAT8_ARRAY, FLOAT8_ARRAY, INT4_ARRAY, TEXT_ARRAY, TEXT_ARRAY, INT8_ARRAY],
        &[
            ids.into(),
            attempts.into(),
            started.into(),
            durations.into(),
            codes.into(),
            errors.into(),
            excerpts.into(),
            subscriptions.into(),
        ],
    )?;
    Ok(())
}
