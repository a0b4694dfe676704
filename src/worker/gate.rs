//! Helpers of the worker processes: a session made safe once connected,
//! transactions whose errors are retried rather than fatal, waits and exits.

use std::panic::AssertUnwindSafe;
use std::time::Duration;

use pgrx::bgworkers::BackgroundWorker;
use pgrx::pg_sys::panic::CaughtError;
use pgrx::prelude::*;

use crate::error::Result;
use crate::events;
use crate::guc;

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

/// Exits with code 1, so that the postmaster starts the launcher again after
/// its restart time (code 0 would unregister it for good; the launcher starts
/// workers again itself). During a server shutdown the postmaster restarts
/// nothing, so code 1 there only adds a LOG line.
pub fn exit_for_restart() -> ! {
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
    // Safe: a lost worker commit only means a resend under the same id (a
    // transaction that creates an event commits synchronously: events.rs).
    ("synchronous_commit", "off"),
    // Compiling a short statement would cost it 100 ms, and a batch of the aggregator's
    // can look expensive enough to qualify.
    ("jit", "off"),
];

/// Applies `SESSION_SETTINGS` and names the session (`application_name`) for
/// the whole session (not only a transaction).
pub fn set_up_session(application_name: &str) {
    events::commit_events_durably();
    BackgroundWorker::transaction(|| {
        let name = [("application_name", application_name)];
        for (name, value) in SESSION_SETTINGS.iter().chain(&name) {
            let (name, value) = (
                std::ffi::CString::new(*name).expect("no NUL in a setting name"),
                std::ffi::CString::new(*value).expect("no NUL in a setting value"),
            );
            guc::set(&name, &value, false);
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
