//! Getting the worker to its database without a FATAL loop, and making its
//! session safe once there.
//!
//! `BackgroundWorkerInitializeConnection` FATALs on a missing database, and a
//! process can connect only once. So the worker starts in two steps: a
//! process connected to no database (shared catalogs only) waits, with a
//! WARNING once and a growing poll, until the database exists and accepts
//! connections, marks that in shared memory and exits with code 1; the
//! postmaster starts it again after the restart time, and that process, seeing
//! the mark, connects. A database dropped between the check and the connect
//! costs one FATAL, after which the next start checks again.

use std::panic::AssertUnwindSafe;
use std::time::Duration;

use pgrx::bgworkers::BackgroundWorker;
use pgrx::pg_sys::panic::CaughtError;
use pgrx::prelude::*;

use crate::error::Result;
use crate::guc;
use crate::shared::{self, WorkerState};

/// Polls for a missing database or extension: 1 s, doubling, at most this.
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// The next wait after `current`.
pub fn backoff(current: Duration) -> Duration {
    (current * 2).clamp(Duration::from_secs(1), MAX_BACKOFF)
}

/// Connects to `linkhooks.database`, or waits for it (see the module comment);
/// returns the database name. Exits the process unless connected.
pub fn connect() -> String {
    let database = guc::string(&guc::DATABASE);
    if shared::take_database_confirmed() {
        BackgroundWorker::connect_worker_to_spi(Some(&database), None);
        return database;
    }
    BackgroundWorker::connect_worker_to_spi(None, None);
    shared::set_worker_state(WorkerState::WaitingForDatabase);
    let mut database = database;
    let mut wait = Duration::ZERO;
    let mut warned = false;
    loop {
        if BackgroundWorker::sighup_received() {
            // SAFETY: reloading the configuration file between transactions, as backends do.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
            let name = guc::string(&guc::DATABASE);
            if name != database {
                database = name;
                warned = false;
                wait = Duration::ZERO;
            }
        }
        if BackgroundWorker::sigterm_received() {
            exit_for_restart();
        }
        match BackgroundWorker::transaction(|| database_state(&database)) {
            DatabaseState::Ready => {
                if warned {
                    log!(
                        "pg_linkhooks: database \"{database}\" exists now; the worker connects to it"
                    );
                }
                shared::set_database_confirmed(true);
                // Restarted after the restart time (1 s), connected this time.
                exit_for_restart();
            }
            state if !warned => {
                warning!(
                    "pg_linkhooks: linkhooks.database names \"{database}\", which {}; webhooks wait until it does (checked again every few seconds)",
                    match state {
                        DatabaseState::Missing => "does not exist",
                        _ => "does not accept connections",
                    }
                );
                warned = true;
            }
            _ => {}
        }
        wait = backoff(wait);
        wait_latch(wait);
    }
}

#[derive(PartialEq, Eq)]
enum DatabaseState {
    Missing,
    Closed,
    Ready,
}

fn database_state(name: &str) -> DatabaseState {
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
        let mut state = DatabaseState::Missing;
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
            let datname = std::ffi::CStr::from_ptr((*form).datname.data.as_ptr());
            if datname.to_bytes() == name.as_bytes() {
                // datconnlimit -2 marks a database whose DROP was interrupted.
                state = if (*form).datallowconn && (*form).datconnlimit != -2 {
                    DatabaseState::Ready
                } else {
                    DatabaseState::Closed
                };
                break;
            }
        }
        pg_sys::table_endscan(scan);
        pg_sys::table_close(rel, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        state
    }
}

/// Sleeps on the latch (signals wake it) for at most `wait`.
pub fn wait_latch(wait: Duration) {
    // SAFETY: our own latch; WL_EXIT_ON_PM_DEATH ends the process with the postmaster.
    unsafe {
        pg_sys::WaitLatch(
            pg_sys::MyLatch,
            (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
            wait.as_millis() as std::ffi::c_long,
            pg_sys::PG_WAIT_EXTENSION,
        );
        pg_sys::ResetLatch(pg_sys::MyLatch);
    }
    pgrx::check_for_interrupts!();
}

/// Exits so that the postmaster starts the worker again after its restart
/// time. Code 0 would unregister it for good (pg_terminate_backend and
/// DROP DATABASE ... WITH (FORCE) then stopped delivery until a server
/// restart); during a server shutdown the postmaster restarts nothing, so
/// code 1 there only adds a LOG line.
pub fn exit_for_restart() -> ! {
    shared::set_worker_state(WorkerState::Stopped);
    // SAFETY: proc_exit runs the exit callbacks and does not return.
    unsafe { pg_sys::proc_exit(1) };
    #[allow(unreachable_code)]
    {
        unreachable!("proc_exit returns")
    }
}

/// Settings of the worker's session, run once after connecting. The worker
/// runs as a superuser: with `pg_catalog, pg_temp` no object a database
/// owner creates (a `public.format(text, timestamptz)`, an operator) is
/// found before the built-in one, and every statement also qualifies
/// extension objects with `linkhooks.` and functions with `pg_catalog.`.
const SESSION_SETTINGS: &[(&str, &str)] = &[
    ("search_path", "pg_catalog, pg_temp"),
    // No lock wait longer than a second: row locks are taken with SKIP LOCKED
    // and what fails on a lock is retried (see worker::record), so an admin
    // transaction holding a row cannot stall delivery.
    ("lock_timeout", "1s"),
    // Safe: a lost worker commit only means a resend.
    ("synchronous_commit", "off"),
    // Compiling a short statement would cost it 100 ms, and a batch of the aggregator's
    // can look expensive enough to qualify.
    ("jit", "off"),
];

/// Applies `SESSION_SETTINGS` and names the session (`application_name`) for
/// the whole session (not only a transaction).
pub fn set_up_session(application_name: &str) {
    BackgroundWorker::transaction(|| {
        let name = [("application_name", application_name)];
        for (name, value) in SESSION_SETTINGS.iter().chain(&name) {
            let (name, value) = (
                std::ffi::CString::new(*name).expect("no NUL in a setting name"),
                std::ffi::CString::new(*value).expect("no NUL in a setting value"),
            );
            // SAFETY: setting a GUC for this session inside a transaction, as SET does.
            unsafe {
                pg_sys::set_config_option(
                    name.as_ptr(),
                    value.as_ptr(),
                    pg_sys::GucContext::PGC_SUSET,
                    pg_sys::GucSource::PGC_S_SESSION,
                    pg_sys::GucAction::GUC_ACTION_SET,
                    true,
                    0,
                    false,
                );
            }
        }
    });
}

/// Runs `body` in its own transaction. An error (a lock timeout, a
/// serialization failure, a bug) rolls the transaction back and is returned
/// as text instead of ending the worker: the caller keeps what it has not
/// recorded and tries again.
pub fn try_transaction<R>(body: impl FnOnce() -> Result<R>) -> std::result::Result<R, String> {
    // SAFETY: between transactions in a background worker, as BackgroundWorker::transaction does.
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    }
    let run = AssertUnwindSafe(|| match body() {
        Ok(value) => {
            // SAFETY: the snapshot pushed above; committing our own transaction.
            unsafe {
                pg_sys::PopActiveSnapshot();
                pg_sys::CommitTransactionCommand();
            }
            Ok(value)
        }
        Err(e) => Err(e.to_string()),
    });
    let result = PgTryBuilder::new(run)
        .catch_others(|caught| {
            Err(match caught {
                CaughtError::PostgresError(e)
                | CaughtError::ErrorReport(e)
                | CaughtError::RustPanic { ereport: e, .. } => e.message().to_string(),
            })
        })
        .execute();
    if result.is_err() {
        // SAFETY: the error state was flushed when the error was caught; this
        // rolls back whatever is left of the transaction (a no-op if none).
        unsafe { pg_sys::AbortCurrentTransaction() };
    }
    result
}
