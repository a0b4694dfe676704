//! The launcher: one process, connected to no database, that keeps a delivery
//! worker running in every database where the extension is installed (as
//! TimescaleDB's scheduler launcher does). It cannot see extensions without
//! connecting, so it starts a worker in each database it has not checked; a
//! worker that finds no extension says so in its slot and exits, and that
//! database is checked again only after a CREATE EXTENSION pg_linkhooks
//! commits there (src/utility.rs tells the launcher). It stops the worker of a database
//! that is dropped, leaves `linkhooks.databases`, or is needed alone by a
//! statement (DROP DATABASE), and starts again a worker that stopped.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use pgrx::PgMemoryContexts;
use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BackgroundWorkerStatus, BgWorkerStartTime,
    DynamicBackgroundWorker, SignalWakeFlags,
};
use pgrx::prelude::*;

use super::gate;
use crate::allowlist;
use crate::guc;
use crate::slots::{self, SlotState};

/// It reads pg_database whenever its latch is set, and at least this often
/// (for databases created, dropped or renamed).
const RESCAN: Duration = Duration::from_secs(5);
/// A worker that stopped (terminated, failed) is started again after this.
const RESTART_AFTER: Duration = Duration::from_secs(1);
/// With no background worker slot free, it tries again after this.
const NO_PROCESS_RETRY: Duration = Duration::from_secs(5);
/// How long a new launcher waits for the workers of the one before it to stop.
const ADOPT_WAIT: Duration = Duration::from_secs(10);
/// A lasting problem is logged once in this long.
const WARN_EVERY: Duration = Duration::from_secs(60);

pub fn register() {
    BackgroundWorkerBuilder::new("pg_linkhooks launcher")
        .set_type("pg_linkhooks launcher")
        .set_library("pg_linkhooks")
        .set_function("linkhooks_launcher_main")
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(Some(Duration::from_secs(1)))
        .load();
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn linkhooks_launcher_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    // Shared catalogs only: it reads pg_database and nothing else.
    BackgroundWorker::connect_worker_to_spi(None, None);
    // SAFETY: this process's own latch and pid, valid while it runs.
    unsafe { slots::launcher_started(pg_sys::MyLatch, pg_sys::MyProcPid) };
    adopt();
    let mut launcher = Launcher::default();
    launcher.run();
    slots::launcher_stopped();
    gate::exit_for_restart();
}

/// Workers started by a launcher that stopped see the new one and stop (see
/// `Worker::run`); their slots are then free for this one to hand out.
fn adopt() {
    let deadline = Instant::now() + ADOPT_WAIT;
    while slots::any_worker_connected() && Instant::now() < deadline {
        slots::wake_all_workers();
        gate::wait_latch(Duration::from_millis(100));
    }
    slots::free_all();
}

/// A row of pg_database.
struct Database {
    oid: pg_sys::Oid,
    name: String,
    /// Accepts connections and is no template.
    servable: bool,
}

/// What the launcher knows of one database.
#[derive(Default)]
struct Served {
    name: String,
    /// Its workers, by number: 0 looks for the extension and runs the housekeeper.
    members: Vec<Member>,
    /// Its worker found no extension when `extensions_created()` was this.
    no_extension_at: Option<u64>,
    /// A CREATE EXTENSION committed here since its worker started.
    created: bool,
    /// Said that the extension is missing in a database the allow-list names.
    warned_no_extension: bool,
    last_no_process_warning: Option<Instant>,
}

/// One of a database's workers.
#[derive(Default)]
struct Member {
    worker: Option<DynamicBackgroundWorker>,
    slot: Option<usize>,
    /// No new worker before this.
    hold_off: Option<Instant>,
}

impl Member {
    fn running(&self) -> bool {
        self.worker.is_some()
    }

    /// Asks a running worker to stop (reaped when it has), or frees an idle slot.
    fn stop(&mut self) {
        if let Some(pid) = self.worker.as_ref().and_then(|w| w.pid().ok()) {
            terminate(pid);
        } else if self.worker.is_none()
            && let Some(slot) = self.slot.take()
        {
            slots::free(slot);
        }
    }

    fn delivering(&self) -> bool {
        self.running()
            && self
                .slot
                .is_some_and(|s| slots::state(s) == SlotState::Delivering)
    }
}

#[derive(Default)]
struct Launcher {
    served: HashMap<pg_sys::Oid, Served>,
    /// Names in the allow-list that do not exist: each is logged once.
    warned_missing: HashSet<String>,
    last_no_slot_warning: Option<Instant>,
}

impl Launcher {
    fn run(&mut self) {
        loop {
            if BackgroundWorker::sigterm_received() {
                self.stop_all();
                return;
            }
            if BackgroundWorker::sighup_received() {
                // SAFETY: between transactions, as backends reload their configuration.
                unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
                self.warned_missing.clear();
            }
            for database in slots::take_created() {
                let served = self.served.entry(database).or_default();
                served.created = true; // if its worker is looking now, it may have looked too early
                served.no_extension_at = None;
            }
            self.reap();
            let databases = BackgroundWorker::transaction(list_databases);
            let wait = self.reconcile(&databases).map_or(RESCAN, |t| {
                t.saturating_duration_since(Instant::now()).min(RESCAN)
            });
            // The postmaster sets the latch when a worker started by us starts or stops;
            // backends set it after a CREATE EXTENSION or to pause a database.
            gate::wait_latch(wait);
        }
    }

    /// Notes the workers that stopped, and why, and frees their slots.
    fn reap(&mut self) {
        let allowed = guc::served_databases();
        for served in self.served.values_mut() {
            for member in &mut served.members {
                let stopped = member.worker.as_ref().is_some_and(|w| {
                    !matches!(w.pid(), Ok(_) | Err(BackgroundWorkerStatus::NotYetStarted))
                });
                if !stopped {
                    continue;
                }
                member.worker = None;
                let Some(slot) = member.slot.take() else {
                    continue;
                };
                // Created after the worker looked: look again.
                if slots::state(slot) == SlotState::NoExtension && !served.created {
                    served.no_extension_at = Some(slots::checked_generation(slot));
                    // Every database is checked when none is named: only a named one is a mistake.
                    if allowed.contains(&served.name) && !served.warned_no_extension {
                        warning!(
                            "pg_linkhooks: the extension is not installed in database \"{}\" (named in linkhooks.databases); run CREATE EXTENSION pg_linkhooks there. Webhooks wait until then",
                            served.name
                        );
                        served.warned_no_extension = true;
                    }
                } else {
                    member.hold_off = Some(Instant::now() + RESTART_AFTER);
                }
                slots::free(slot);
            }
        }
    }

    /// Starts and stops workers to match pg_database, the allow-list,
    /// `workers_per_database` and the pauses; returns when something held off is due.
    fn reconcile(&mut self, databases: &[Database]) -> Option<Instant> {
        let allowed = guc::served_databases();
        self.warn_missing(&allowed, databases);
        let created = slots::extensions_created();
        let per_database = guc::WORKERS_PER_DATABASE.get().max(1) as usize;
        let existing: HashSet<pg_sys::Oid> = databases.iter().map(|d| d.oid).collect();
        // Dropped databases: their workers were stopped or ended with them.
        self.served.retain(|oid, served| {
            let keep = existing.contains(oid) || served.members.iter().any(Member::running);
            if !keep {
                served.members.iter_mut().for_each(Member::stop);
            }
            keep
        });
        let mut next: Option<Instant> = None;
        let mut wake_at = |t: Instant| next = Some(next.map_or(t, |n: Instant| n.min(t)));
        let now = Instant::now();
        for database in databases {
            let wanted = if database.servable
                && allowlist::allows(&allowed, &database.name)
                && !slots::paused(database.oid)
            {
                per_database
            } else {
                0
            };
            let served = self.served.entry(database.oid).or_default();
            if served.name != database.name {
                served.name.clone_from(&database.name); // new, or renamed
            }
            served
                .members
                .iter_mut()
                .skip(wanted)
                .for_each(Member::stop);
            while served.members.len() > wanted
                && served
                    .members
                    .last()
                    .is_some_and(|m| !m.running() && m.slot.is_none())
            {
                served.members.pop();
            }
            if wanted == 0 {
                served.no_extension_at = None; // checked again when wanted again
                continue;
            }
            if served.no_extension_at.is_some_and(|at| at >= created) {
                continue;
            }
            if served.members.len() < wanted {
                served.members.resize_with(wanted, Member::default);
            }
            // Number 0 looks for the extension; the others start once it delivers.
            let leader_delivering = served.members[0].delivering();
            for (number, member) in served.members.iter_mut().enumerate().take(wanted) {
                if member.running() || (number > 0 && !leader_delivering) {
                    continue;
                }
                if let Some(t) = member.hold_off.filter(|t| now < *t) {
                    wake_at(t);
                    continue;
                }
                if number == 0 {
                    served.no_extension_at = None;
                    served.created = false;
                }
                match start(database, number, member) {
                    Started::Yes => continue,
                    Started::NoSlot => {
                        if self
                            .last_no_slot_warning
                            .is_none_or(|t| now >= t + WARN_EVERY)
                        {
                            warning!(
                                "pg_linkhooks: no delivery slot for database \"{}\": one server runs at most {} delivery workers; list the databases to serve in linkhooks.databases, or lower linkhooks.workers_per_database",
                                database.name,
                                slots::MAX_WORKERS
                            );
                            self.last_no_slot_warning = Some(now);
                        }
                    }
                    Started::NoProcess => {
                        if served
                            .last_no_process_warning
                            .is_none_or(|t| now >= t + WARN_EVERY)
                        {
                            warning!(
                                "pg_linkhooks: no background worker slot to start the pg_linkhooks worker for database \"{}\"; raise max_worker_processes (each database with the extension takes linkhooks.workers_per_database + 1, and the launcher one). Its webhooks wait until a slot is free",
                                database.name
                            );
                            served.last_no_process_warning = Some(now);
                        }
                    }
                }
                member.hold_off = Some(now + NO_PROCESS_RETRY);
                wake_at(now + NO_PROCESS_RETRY);
            }
        }
        next
    }

    /// A name in the allow-list that names no database is one WARNING (until the setting changes).
    fn warn_missing(&mut self, allowed: &[String], databases: &[Database]) {
        for name in allowed {
            let state = databases.iter().find(|d| &d.name == name);
            if state.is_some_and(|d| d.servable) || self.warned_missing.contains(name) {
                continue;
            }
            warning!(
                "pg_linkhooks: linkhooks.databases names \"{name}\", which {}; its webhooks wait until it does (checked again every few seconds)",
                if state.is_none() {
                    "does not exist"
                } else {
                    "does not accept connections"
                }
            );
            self.warned_missing.insert(name.clone());
        }
    }

    /// Terminates every worker and waits (briefly) for them to stop.
    fn stop_all(&mut self) {
        for served in self.served.values_mut() {
            served.members.iter_mut().for_each(Member::stop);
        }
        let deadline = Instant::now() + ADOPT_WAIT;
        while slots::any_worker_connected() && Instant::now() < deadline {
            gate::wait_latch(Duration::from_millis(100));
        }
    }
}

enum Started {
    Yes,
    /// Every slot of ours is taken.
    NoSlot,
    /// Every background worker slot of the server is taken.
    NoProcess,
}

fn start(database: &Database, number: usize, member: &mut Member) -> Started {
    let slot = match member.slot {
        Some(slot) => slot,
        None => match slots::assign(database.oid, number as u32) {
            Some(slot) => slot,
            None => return Started::NoSlot,
        },
    };
    member.slot = Some(slot);
    slots::set_state(slot, SlotState::Starting);
    // SAFETY: this process's own pid.
    let launcher = unsafe { pg_sys::MyProcPid };
    // The handle lives as long as this process, not the current memory context.
    // SAFETY: TopMemoryContext lasts for the process; nothing else runs meanwhile.
    let started = unsafe {
        PgMemoryContexts::TopMemoryContext.switch_to(|_| {
            BackgroundWorkerBuilder::new(&format!("pg_linkhooks worker {number} {}", database.name))
                .set_type("pg_linkhooks")
                .set_library("pg_linkhooks")
                .set_function("linkhooks_worker_main")
                .enable_spi_access()
                .set_restart_time(None)
                .set_argument(Some(pg_sys::Datum::from(slot)))
                .set_extra(&format!("{} {launcher} {number}", database.oid.to_u32()))
                .set_notify_pid(launcher)
                .load_dynamic()
        })
    };
    match started {
        Ok(worker) => {
            member.worker = Some(worker);
            Started::Yes
        }
        Err(_) => {
            slots::set_state(slot, SlotState::NoProcess);
            Started::NoProcess
        }
    }
}

fn terminate(pid: i32) {
    // SAFETY: a signal to a worker we started; SIGTERM asks it to stop after its in-flight requests.
    unsafe { libc::kill(pid, libc::SIGTERM) };
}

fn list_databases() -> Vec<Database> {
    // A heap scan of pg_database, as the autovacuum launcher does: a process
    // with no database cannot open catalog indexes that the shared relcache
    // init file does not hold yet (right after initdb it does not exist).
    // SAFETY: inside a transaction; pg_database is a shared, nailed catalog,
    // readable without a database; the scan and the relation are closed here.
    unsafe {
        let rel = pg_sys::table_open(
            pg_sys::DatabaseRelationId,
            pg_sys::AccessShareLock as pg_sys::LOCKMODE,
        );
        let scan = pg_sys::table_beginscan_catalog(rel, 0, std::ptr::null_mut());
        let mut databases = Vec::new();
        loop {
            let tuple = pg_sys::heap_getnext(scan, pg_sys::ScanDirection::ForwardScanDirection);
            if tuple.is_null() {
                break;
            }
            let header = (*tuple).t_data;
            let form = header
                .cast::<u8>()
                .add((*header).t_hoff as usize)
                .cast::<pg_sys::FormData_pg_database>();
            let name = std::ffi::CStr::from_ptr((*form).datname.data.as_ptr());
            databases.push(Database {
                oid: (*form).oid,
                name: name.to_string_lossy().into_owned(),
                // datconnlimit -2 marks a database whose DROP was interrupted.
                servable: (*form).datallowconn
                    && (*form).datconnlimit != -2
                    && !(*form).datistemplate,
            });
        }
        pg_sys::table_endscan(scan);
        pg_sys::table_close(rel, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        databases
    }
}
