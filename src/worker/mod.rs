//! The delivery worker: claims due deliveries in short transactions, hands
//! them to the HTTP pool, and records outcomes in batches. Postgres is
//! touched only from this main thread. It sleeps on its latch (set by
//! committing transactions that queued deliveries) and on the pool's wake
//! socket, so idle it costs nothing and busy it never waits for a batch.
//!
//! - `gate`: reaching the database (no FATAL loop), the session's settings,
//!   transactions whose errors are retried rather than fatal;
//! - `admission`: how many rows a claim may take (pure logic);
//! - `claim`: endpoints, the claim, leases;
//! - `record`: outcomes, the attempt log, dead letters;
//! - `health_log`: subscription health and its rollups, once a second;
//! - `bookkeeping`: dead-letter runs and 410s written to subscriptions;
//! - `status`: `linkhooks.worker_status()`;
//! - `checks`: destination health checks between deliveries;
//! - `housekeeper`: the process that counts clicks and runs maintenance beside it;
//! - `launcher`: the process that starts a worker for every database with the extension.

mod admission;
mod bookkeeping;
mod checks;
mod claim;
mod extension;
mod gate;
mod health_log;
mod housekeeper;
mod launcher;
mod record;
mod settings;
mod status;

pub use gate::wait_latch;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use pgrx::bgworkers::{BackgroundWorker, SignalWakeFlags};
use pgrx::prelude::*;

use crate::error::Result;
use crate::floors::{ClaimSeen, Floors, Micros};
use crate::guc;
use crate::sender::{Done, Job, Outcome, Pool, Work};
use crate::shared;
use crate::slots::{self, SlotState};
use admission::Flights;
use bookkeeping::Bookkeeping;
use checks::Checks;
use claim::{Endpoint, Held};
use extension::Found;
use health_log::HealthLog;
use housekeeper::{Chores, Housekeeper};
use settings::Settings;

/// Longest sleep when nothing is due: the fallback poll.
const IDLE_POLL: Duration = Duration::from_secs(5);
/// Outcomes are written in batches: when this many wait, or the oldest has waited `RECORD_DELAY`.
const RECORD_BATCH: usize = 200;
const RECORD_DELAY: Duration = Duration::from_millis(5);
/// After a transaction failed (a lock timeout), wait this long before the next.
const RETRY_AFTER_ERROR: Duration = Duration::from_secs(1);

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
    launcher::register();
}

/// A delivery worker, started by the launcher for one database: its slot is
/// the argument; the database, the launcher's pid and its number among the
/// database's workers are the extra text.
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn linkhooks_worker_main(arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let slot = arg.value();
    let mut extra = BackgroundWorker::get_extra().split(' ');
    let mut next = || extra.next().and_then(|s| s.parse::<u32>().ok());
    let (Some(database), Some(launcher), Some(number)) = (next(), next(), next()) else {
        warning!("pg_linkhooks worker: started without its database and launcher");
        return;
    };
    if slot >= slots::MAX_WORKERS {
        warning!("pg_linkhooks worker: started with slot {slot}, which does not exist");
        return;
    }
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(pg_sys::Oid::from(database)), None);
    // SAFETY: registering an exit callback of this process; its argument is the slot.
    unsafe { pg_sys::before_shmem_exit(Some(leave_slot), pg_sys::Datum::from(slot)) };
    // SAFETY: MyLatch and MyProcPid are this process's own, valid while it runs.
    unsafe { slots::worker_started(slot, pg_sys::MyLatch, pg_sys::MyProcPid) };
    gate::set_up_session("pg_linkhooks worker");
    let database = BackgroundWorker::transaction(shared::my_database_name);

    let allow_private = Arc::new(AtomicBool::new(guc::ALLOW_PRIVATE_TARGETS.get()));
    let user_agent = format!("pg_linkhooks/{}", env!("CARGO_PKG_VERSION"));
    let settings = Settings::read();
    let pool = match Pool::start(
        settings.limits.concurrency,
        allow_private.clone(),
        &user_agent,
    ) {
        Ok(pool) => pool,
        Err(e) => {
            warning!("pg_linkhooks worker could not start its HTTP threads: {e}");
            gate::exit_for_restart();
        }
    };
    let place = Place {
        slot,
        launcher: launcher as i32,
        leader: number == 0,
    };
    let mut worker = Worker::new(pool, allow_private, database, settings, place);
    worker.run();
    // The launcher starts it again if it should run; code 0 keeps the log quiet.
    // SAFETY: proc_exit runs the exit callbacks (leave_slot) and does not return.
    unsafe { pg_sys::proc_exit(0) };
}

/// The worker's exit, however it happens: backends stop waking it.
#[pg_guard]
unsafe extern "C-unwind" fn leave_slot(_code: i32, slot: pg_sys::Datum) {
    // SAFETY: this process's own pid.
    slots::worker_stopped(slot.value(), unsafe { pg_sys::MyProcPid });
}

/// Where a worker stands among the processes.
pub struct Place {
    /// Its slot in shared memory.
    slot: usize,
    /// The launcher that started it.
    launcher: i32,
    /// Worker 0 of its database: it runs the housekeeper and the destination checks.
    leader: bool,
}

pub struct Worker {
    settings: Settings,
    pool: Pool,
    allow_private: Arc<AtomicBool>,
    database: String,
    place: Place,
    endpoints: HashMap<i64, Endpoint>,
    endpoints_generation: Option<u64>,
    /// The schema is 0.5.0's: subscription holds (`paused`, see claim.rs), health rollups (health_log.rs).
    schema_holds: bool,
    /// Requests in flight, and how fast each subscription answered.
    flights: Flights,
    /// Jobs claimed and not yet recorded, by delivery id (for lease renewal).
    held: HashMap<i64, Held>,
    outcomes: Vec<Outcome>,
    /// When the oldest unrecorded outcome arrived.
    outcomes_since: Option<Instant>,
    bookkeeping: Bookkeeping,
    health: HealthLog,
    /// The last claim filled its limit: more rows are probably due.
    more_due: bool,
    /// When to claim again even if nothing wakes us (a retry comes due, the fallback poll).
    next_due: Option<Instant>,
    /// Where each subscription's claim starts its walk (see `floors`); what the
    /// current transaction's claim saw, applied once it commits; the last horizon read.
    floors: Floors,
    claim_seen: Option<ClaimSeen>,
    horizon: Option<(Instant, Option<Micros>)>,
    housekeeper: Housekeeper,
    /// The housekeeper's chores, run here only while it cannot start; and when next due.
    chores: Chores,
    chores_due: Option<Instant>,
    checks: Checks,
    extension_ready: bool,
    /// The extension's oid, locked by each transaction (`extension::hold`).
    extension: pg_sys::Oid,
    /// The extension is not (or no longer) installed here: the worker stops.
    extension_missing: bool,
    /// It was installed when the worker started or since.
    extension_seen: bool,
    /// Rows a previous worker claimed but never finished were made due again.
    released: bool,
    /// After a failed transaction: no other before this.
    tick_hold_off: Option<Instant>,
    /// Outcomes whose rows another transaction held: not retried before this.
    record_hold_off: Option<Instant>,
    /// Last WARNING about a failed transaction, so a lasting failure logs once a minute.
    last_failure_warning: Option<Instant>,
    wait_set: *mut pg_sys::WaitEventSet,
}

impl Worker {
    fn new(
        pool: Pool,
        allow_private: Arc<AtomicBool>,
        database: String,
        settings: Settings,
        place: Place,
    ) -> Worker {
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
            settings,
            pool,
            allow_private,
            database,
            endpoints: HashMap::new(),
            endpoints_generation: None,
            schema_holds: true,
            flights: Flights::default(),
            held: HashMap::new(),
            outcomes: Vec::new(),
            outcomes_since: None,
            bookkeeping: Bookkeeping::default(),
            health: HealthLog::default(),
            more_due: true,
            next_due: None,
            floors: Floors::default(),
            claim_seen: None,
            horizon: None,
            housekeeper: Housekeeper::new(place.slot),
            chores: Chores::new(place.slot),
            chores_due: None,
            checks: Checks::default(),
            extension_ready: false,
            extension: pg_sys::InvalidOid,
            extension_missing: false,
            extension_seen: false,
            released: false,
            last_failure_warning: None,
            tick_hold_off: None,
            record_hold_off: None,
            wait_set,
            place,
        }
    }

    fn run(&mut self) {
        let mut woken = true;
        loop {
            // Also when the extension is gone, or the launcher that started us (a new
            // one hands out the slots afresh and starts workers of its own).
            if BackgroundWorker::sigterm_received()
                || self.extension_missing
                || slots::launcher_pid() != self.place.launcher
            {
                self.shutdown();
                return;
            }
            if BackgroundWorker::sighup_received() {
                // SAFETY: between transactions, as backends reload their configuration.
                unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
                self.settings = Settings::read();
                log!("pg_linkhooks: worker reloaded its settings");
                self.allow_private
                    .store(guc::ALLOW_PRIVATE_TARGETS.get(), Ordering::Relaxed);
                self.pool.resize(self.settings.limits.concurrency);
                woken = true;
            }
            let mut got_outcomes = false;
            for done in self.pool.drain() {
                match done {
                    Done::Delivered(outcome) => {
                        got_outcomes = true;
                        self.finish(outcome);
                    }
                    Done::Checked(probed) => self.checked(probed),
                }
            }
            let now = Instant::now();
            let plan = self.flights.plan(&self.settings.limits, now);
            let timer_due = self.next_due.is_some_and(|t| t <= now);
            // New work was committed: claim it as soon as a thread is free.
            self.more_due |= woken;
            let want_claim = if self.extension_ready {
                plan.free > 0 && (timer_due || self.more_due || got_outcomes)
            } else {
                timer_due || woken
            };
            // Subscriptions changed: learn which before sending anything more.
            let subscriptions_changed = self.extension_ready
                && self.endpoints_generation != Some(shared::config_generation());
            // Few, larger transactions: outcomes wait for a batch, a claim or a short delay.
            let record_due = !self.outcomes.is_empty()
                && self.record_hold_off.is_none_or(|t| now >= t)
                && (want_claim
                    || self.outcomes.len() >= RECORD_BATCH
                    || self.outcomes_since.is_some_and(|t| now >= t + RECORD_DELAY)
                    || self.flights.total() == 0);
            let other_due = (!self.bookkeeping.is_empty() && timer_due)
                || self.lease_renewal_due(now)
                || self.health.due_at().is_some_and(|t| now >= t);
            let held_off = self.tick_hold_off.is_some_and(|t| now < t);
            if !held_off && (want_claim || record_due || subscriptions_changed || other_due) {
                self.tick(want_claim, record_due, &plan);
                // A background worker must send its table statistics itself (at most once a
                // second); without them autovacuum never sees the dead rows it leaves.
                // SAFETY: called between transactions, as Postgres requires.
                unsafe { pg_sys::pgstat_report_stat(false) };
            }
            if self.extension_missing {
                continue; // stops at the top of the loop
            }
            self.chores_due = None;
            if self.extension_ready && self.place.leader && !self.housekeeper.ensure() {
                self.chores_due = Some(self.chores.run_due(self.settings.maintenance_every));
            }
            if self.extension_ready && self.place.leader {
                self.run_checks(Instant::now());
            }
            // Requests in flight: claimed rows beyond the threads wait in the pool's queue.
            let in_flight = self.flights.total().min(self.settings.limits.concurrency);
            slots::record_loop(self.place.slot, in_flight as i64);
            self.wait();
            woken = take_wakeup();
        }
    }

    /// One short transaction: record outcomes, write bookkeeping, claim due
    /// rows, send them. If it fails, nothing is lost: the outcomes and the
    /// bookkeeping stay in memory, the claim is rolled back, and the next
    /// transaction comes after `RETRY_AFTER_ERROR`.
    fn tick(&mut self, claim: bool, record: bool, plan: &admission::Plan) {
        let outcomes = if record {
            self.outcomes_since = None;
            std::mem::take(&mut self.outcomes)
        } else {
            Vec::new()
        };
        let saved_outcomes = outcomes.clone();
        let saved_bookkeeping = self.bookkeeping.clone();
        let saved_health = self.health.clone();
        let released = self.released;
        let result = gate::try_transaction(|| self.tick_body(claim, outcomes, plan));
        match result {
            Ok(jobs) => {
                if self.extension_ready && slots::state(self.place.slot) != SlotState::Delivering {
                    // After its first transaction (which released rows abandoned earlier):
                    // the launcher starts the database's other workers only now.
                    slots::set_state(self.place.slot, SlotState::Delivering);
                    slots::wake_launcher();
                }
                self.tick_hold_off = None;
                if let Some(seen) = self.claim_seen.take() {
                    self.floors.advance(seen);
                }
                self.dispatch(jobs)
            }
            Err(e) => {
                // DROP EXTENSION ends up here too: then the worker stops without a WARNING.
                if gate::try_transaction(|| self.check_extension()) != Ok(false) {
                    self.warn_failure("delivery bookkeeping", &e);
                }
                self.claim_seen = None; // rolled back: the floors stay where they were
                let mut outcomes = saved_outcomes;
                outcomes.append(&mut self.outcomes);
                if !outcomes.is_empty() {
                    self.outcomes_since.get_or_insert_with(Instant::now);
                }
                self.outcomes = outcomes;
                self.bookkeeping = saved_bookkeeping;
                self.health = saved_health;
                self.released = released;
                self.more_due = false;
                // Check the extension again first (DROP EXTENSION ends up here too).
                self.extension_ready = false;
                self.tick_hold_off = Some(Instant::now() + RETRY_AFTER_ERROR);
                self.next_due = self.tick_hold_off;
            }
        }
    }

    fn tick_body(
        &mut self,
        claim: bool,
        outcomes: Vec<Outcome>,
        plan: &admission::Plan,
    ) -> Result<Vec<Job>> {
        if self.extension_ready && !extension::hold(self.extension) {
            self.extension_ready = false; // dropped: find out what is there now
        }
        if !self.extension_ready && !self.check_extension()? {
            return Ok(Vec::new());
        }
        health_log::share_attempt_log();
        let receives = crate::replication::receives_deliveries()?;
        if crate::replication::subscriptions_changed() {
            // Replicated rows may be due below where the claims start walking.
            self.floors = Floors::default();
        }
        if receives {
            // A publisher's worker sends these rows; we must not send them again.
            self.more_due = false;
            self.next_due = Some(Instant::now() + IDLE_POLL);
            return Ok(Vec::new());
        }
        if !self.released {
            // Rows a previous worker claimed but never finished are due now (a row
            // someone holds keeps its lease). Not while another worker of this
            // database runs: its rows in flight look the same; a stopped worker's
            // rows then come due when their lease ends.
            if !slots::sibling_connected(shared::my_database(), self.place.slot) {
                claim::release_abandoned()?;
            }
            self.released = true;
        }
        self.refresh_endpoints(false)?;
        let recorded_any = !outcomes.is_empty();
        let retained = self.record_outcomes(outcomes)?;
        let mut again = !retained.is_empty();
        if again {
            // Their rows are held by another transaction: try again shortly.
            self.outcomes_since.get_or_insert_with(Instant::now);
            self.outcomes.extend(retained);
            self.record_hold_off = Some(Instant::now() + RETRY_AFTER_ERROR);
        } else if recorded_any {
            self.record_hold_off = None;
        }
        self.write_bookkeeping()?;
        again |= !self.bookkeeping.is_empty();
        self.renew_leases()?;
        self.write_health(false)?;
        let jobs = if claim { self.claim(plan)? } else { Vec::new() };
        if again {
            let at = Instant::now() + RETRY_AFTER_ERROR;
            self.next_due = Some(self.next_due.map_or(at, |t| t.min(at)));
        }
        if let Some(at) = self.health.due_at() {
            self.next_due = Some(self.next_due.map_or(at, |t| t.min(at)));
        }
        Ok(jobs)
    }

    /// Is the extension installed in our database? If not, the worker stops
    /// and says so in its slot: the launcher starts one again after a CREATE
    /// EXTENSION pg_linkhooks commits.
    fn check_extension(&mut self) -> Result<bool> {
        slots::checking_extension(self.place.slot);
        let found = extension::find()?;
        if let Found::LookAlike(why) = &found {
            warning!(
                "pg_linkhooks worker: database \"{}\" is not served: {why}",
                self.database
            );
        }
        if let Found::Installed(oid) = found
            && extension::hold(oid)
        {
            self.extension = oid;
            if !self.extension_seen {
                log!(
                    "pg_linkhooks worker delivering for database \"{}\"",
                    self.database
                );
            }
            self.extension_ready = true;
            self.extension_seen = true;
            self.floors = Floors::default(); // installed again, perhaps restored: nothing known holds
            return Ok(true);
        }
        if self.extension_seen {
            log!(
                "pg_linkhooks: the extension was dropped from database \"{}\"; its worker stops",
                self.database
            );
        }
        slots::set_state(self.place.slot, SlotState::NoExtension);
        self.extension_missing = true;
        self.more_due = false;
        Ok(false)
    }

    /// Hands claimed jobs to the threads: a claim never takes more than are free.
    fn dispatch(&mut self, jobs: Vec<Job>) {
        let now = Instant::now();
        for job in jobs {
            self.flights
                .start(job.delivery_id, job.subscription_id, now);
            self.held.insert(job.delivery_id, Held { leased: now });
            self.pool.submit(Work::Deliver(job));
        }
    }

    fn finish(&mut self, outcome: Outcome) {
        self.flights.finish(
            outcome.delivery_id,
            outcome.subscription_id,
            Duration::from_secs_f64(outcome.duration_ms.max(0.0) / 1000.0),
        );
        self.outcomes_since.get_or_insert_with(Instant::now);
        self.outcomes.push(outcome);
    }

    fn warn_failure(&mut self, what: &str, error: &str) {
        let now = Instant::now();
        if self
            .last_failure_warning
            .is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(60))
        {
            warning!("pg_linkhooks worker: {what} failed and will be retried: {error}");
            self.last_failure_warning = Some(now);
        }
    }

    /// Sleeps until the latch is set (new work committed, signal), an outcome
    /// arrives, or the next retry is due. Leaves the latch as it is: see `take_wakeup`.
    fn wait(&self) {
        let now = Instant::now();
        let free = self.flights.total() < self.settings.limits.concurrency;
        let timeout = if self.more_due && free && self.extension_ready {
            Duration::ZERO
        } else {
            let until = |t: Instant| t.saturating_duration_since(now);
            let mut timeout = self.next_due.map_or(IDLE_POLL, until).min(IDLE_POLL);
            if self.extension_ready {
                if let Some(t) = self.chores_due {
                    timeout = timeout.min(until(t));
                }
                if let Some(t) = self.checks.next_wake(self.settings.limits.concurrency) {
                    timeout = timeout.min(until(t));
                }
            }
            if let Some(since) = self.outcomes_since {
                let at = (since + RECORD_DELAY).max(self.record_hold_off.unwrap_or(since));
                timeout = timeout.min(until(at));
            }
            match self.tick_hold_off {
                Some(t) => timeout.max(until(t)),
                None => timeout,
            }
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
        self.housekeeper.stop();
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.flights.total() > 0 && Instant::now() < deadline {
            match self
                .pool
                .wait_one(deadline.saturating_duration_since(Instant::now()))
            {
                Some(outcome) => self.finish(outcome),
                None => break,
            }
        }
        if (!self.outcomes.is_empty() || self.health.due_at().is_some()) && self.extension_ready {
            let outcomes = std::mem::take(&mut self.outcomes);
            if let Err(e) = gate::try_transaction(|| {
                if !extension::hold(self.extension) {
                    return Ok(());
                }
                health_log::share_attempt_log();
                self.record_outcomes(outcomes)?;
                self.write_bookkeeping()?;
                self.write_health(true)
            }) {
                warning!(
                    "pg_linkhooks worker: outcomes not recorded at exit (their rows are sent again): {e}"
                );
            }
        }
    }
}
