//! The housekeeper: a second process beside the delivery worker that folds
//! committed clicks into counts and reactive events (src/aggregator.rs) and
//! runs maintenance, so that neither ever holds up a delivery (and on a
//! machine with two cores both go on at once). The delivery worker starts it
//! once its database has the extension and starts it again if it stops; it
//! exits when that worker does (the worker's slot shows another pid, or
//! none). With no process slot free (`max_worker_processes`), the delivery
//! worker does these chores itself between deliveries and says so.

use std::time::{Duration, Instant};

use pgrx::PgMemoryContexts;
use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BackgroundWorkerStatus, BgWorkerStartTime,
    DynamicBackgroundWorker, SignalWakeFlags,
};
use pgrx::prelude::*;

use super::extension::{self, Found};
use super::gate;
use super::settings;
use crate::slots;

/// How often it looks whether clicks or misses were committed since the
/// aggregator last ran (a read of shared memory); if so it runs it.
const AGGREGATE_CHECK: Duration = Duration::from_millis(250);
/// The aggregator runs at least this often anyway: thresholds re-arm, digest
/// windows end and misses come due with time, not with clicks.
const AGGREGATE_IDLE: Duration = Duration::from_secs(5);
/// A stopped housekeeper is started again after this.
const RESTART_AFTER: Duration = Duration::from_secs(1);
/// A lasting failure is logged once in this long.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// The chores and when each is due; run by the housekeeper, or by the
/// delivery worker when no housekeeper could start.
pub struct Chores {
    /// The delivery worker's slot, whose clicks generation says when to aggregate.
    slot: usize,
    next_maintenance: Instant,
    next_aggregation: Instant,
    /// When the aggregator last ran, and the clicks generation it saw then.
    aggregated: (Instant, Option<u64>),
    last_warning: Option<Instant>,
}

impl Chores {
    pub fn new(slot: usize) -> Chores {
        let now = Instant::now();
        Chores {
            slot,
            next_maintenance: now,
            next_aggregation: now,
            aggregated: (now, None),
            last_warning: None,
        }
    }

    /// Runs what is due, each in its own transaction (an error in one, a lock
    /// timeout, is logged and retried later); returns when to look again.
    pub fn run_due(&mut self, maintenance_every: Duration) -> Instant {
        let now = Instant::now();
        if now >= self.next_maintenance {
            if let Err(e) = gate::try_transaction(maintain) {
                self.warn("maintenance", &e);
            }
            self.next_maintenance = Instant::now()
                .checked_add(maintenance_every)
                .unwrap_or(now + AGGREGATE_IDLE);
        }
        if now >= self.next_aggregation {
            let generation = slots::clicks_generation(self.slot);
            let (last_run, seen) = self.aggregated;
            if seen != Some(generation) || now >= last_run + AGGREGATE_IDLE {
                if let Err(e) = gate::try_transaction(aggregate) {
                    self.warn("click aggregation", &e);
                }
                self.aggregated = (Instant::now(), Some(generation));
            }
            self.next_aggregation = Instant::now() + AGGREGATE_CHECK;
        }
        // A process must send its table statistics itself (at most once a second);
        // without them autovacuum never sees the rows these chores change.
        // SAFETY: called between transactions, as Postgres requires.
        unsafe { pg_sys::pgstat_report_stat(false) };
        self.next_maintenance.min(self.next_aggregation)
    }

    fn warn(&mut self, what: &str, error: &str) {
        if slots::worker_pid(self.slot) == 0 {
            return; // its worker left, and a DROP DATABASE cancelled this chore
        }
        let now = Instant::now();
        if self.last_warning.is_none_or(|t| now >= t + WARN_EVERY) {
            warning!("pg_linkhooks housekeeper: {what} failed and will be retried: {error}");
            self.last_warning = Some(now);
        }
    }
}

/// `run_maintenance()`: pruning, expiry, held rows, misses.
fn maintain() -> crate::error::Result<()> {
    if !installed("run_maintenance()")? || crate::replication::receives_deliveries()? {
        return Ok(()); // the publisher maintains what it sends; or no extension here (yet)
    }
    Spi::run("SELECT linkhooks.run_maintenance()").map_err(Into::into)
}

/// Counts the clicks committed since the last run and queues the events
/// they cause (src/aggregator.rs).
fn aggregate() -> crate::error::Result<()> {
    if !installed("run_aggregation()")? || crate::replication::receives_deliveries()? {
        return Ok(()); // the publisher counts what it sends; or a schema from before 0.5.0
    }
    Spi::run("SELECT linkhooks.run_aggregation()").map_err(Into::into)
}

/// Whether the extension is installed here (and now locked until the
/// transaction ends, see `extension`) with `function`.
fn installed(function: &str) -> crate::error::Result<bool> {
    let Found::Installed(oid) = extension::find()? else {
        return Ok(false);
    };
    if !extension::hold(oid) {
        return Ok(false);
    }
    Ok(Spi::get_one_with_args::<bool>(
        "SELECT pg_catalog.to_regprocedure('linkhooks.' || $1) IS NOT NULL",
        &[function.into()],
    )?
    .unwrap_or(false))
}

/// The delivery worker's handle on its housekeeper.
pub struct Housekeeper {
    /// The delivery worker's slot.
    slot: usize,
    handle: Option<DynamicBackgroundWorker>,
    /// No new start before this (after one stopped or could not start).
    hold_off: Option<Instant>,
    last_warning: Option<Instant>,
}

impl Housekeeper {
    pub fn new(slot: usize) -> Housekeeper {
        Housekeeper {
            slot,
            handle: None,
            hold_off: None,
            last_warning: None,
        }
    }

    /// Whether a housekeeper runs (or is starting); starts one if none does.
    /// False means the caller must do the chores itself.
    pub fn ensure(&mut self) -> bool {
        if let Some(handle) = &self.handle {
            match handle.pid() {
                Ok(_) | Err(BackgroundWorkerStatus::NotYetStarted) => return true,
                Err(_) => {
                    self.handle = None;
                    self.hold_off = Some(Instant::now() + RESTART_AFTER);
                }
            }
        }
        let now = Instant::now();
        if self.hold_off.is_some_and(|t| now < t) {
            return false;
        }
        // SAFETY: reading this process's own ids.
        let (database, pid) = unsafe { (pg_sys::MyDatabaseId, pg_sys::MyProcPid) };
        // The handle lives as long as this process, not the current memory context.
        // SAFETY: TopMemoryContext lasts for the process; nothing else runs meanwhile.
        let started = unsafe {
            PgMemoryContexts::TopMemoryContext.switch_to(|_| {
                BackgroundWorkerBuilder::new("pg_linkhooks housekeeper")
                    .set_type("pg_linkhooks housekeeper")
                    .set_library("pg_linkhooks")
                    .set_function("linkhooks_housekeeper_main")
                    .enable_spi_access()
                    .set_start_time(BgWorkerStartTime::RecoveryFinished)
                    .set_restart_time(None)
                    .set_extra(&format!("{} {pid} {}", database.to_u32(), self.slot))
                    .set_notify_pid(pid)
                    .load_dynamic()
            })
        };
        match started {
            Ok(handle) => {
                self.handle = Some(handle);
                true
            }
            Err(_) => {
                if self.last_warning.is_none_or(|t| now >= t + WARN_EVERY) {
                    warning!(
                        "pg_linkhooks: no background worker slot for the housekeeper (raise max_worker_processes); the delivery worker counts clicks and runs maintenance itself meanwhile"
                    );
                    self.last_warning = Some(now);
                }
                self.hold_off = Some(now + RESTART_AFTER);
                false
            }
        }
    }

    pub fn stop(&mut self) {
        if let Some(handle) = self.handle.take() {
            handle.terminate();
        }
    }
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn linkhooks_housekeeper_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let mut extra = BackgroundWorker::get_extra().split(' ');
    let mut next = || extra.next().and_then(|s| s.parse::<u32>().ok());
    let (Some(database), Some(parent), Some(slot)) = (next(), next(), next()) else {
        warning!("pg_linkhooks housekeeper: started without its database and worker");
        return;
    };
    let slot = slot as usize;
    if slot >= slots::MAX_WORKERS {
        warning!("pg_linkhooks housekeeper: started with slot {slot}, which does not exist");
        return;
    }
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(pg_sys::Oid::from(database)), None);
    // SAFETY: this process's own pid; the callback runs as it exits, however it exits.
    unsafe {
        slots::housekeeper_started(slot, pg_sys::Oid::from(database), pg_sys::MyProcPid);
        pg_sys::before_shmem_exit(Some(leave_slot), pg_sys::Datum::from(slot));
    }
    gate::set_up_session("pg_linkhooks housekeeper");
    let mut maintenance_every = settings::maintenance_every();
    let mut chores = Chores::new(slot);
    // It serves the worker that started it: once another runs (or none), it is done.
    while !BackgroundWorker::sigterm_received() && slots::worker_pid(slot) == parent as i32 {
        if BackgroundWorker::sighup_received() {
            // SAFETY: between transactions, as backends reload their configuration.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
            maintenance_every = settings::maintenance_every();
        }
        let due = chores.run_due(maintenance_every);
        gate::wait_latch(due.saturating_duration_since(Instant::now()));
    }
}

/// The housekeeper's exit: a DROP DATABASE stops waiting for it.
#[pg_guard]
unsafe extern "C-unwind" fn leave_slot(_code: i32, slot: pg_sys::Datum) {
    // SAFETY: this process's own pid.
    slots::housekeeper_stopped(slot.value(), unsafe { pg_sys::MyProcPid });
}
