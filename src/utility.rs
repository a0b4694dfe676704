//! A ProcessUtility hook for the statements that concern the workers:
//!
//! - `CREATE EXTENSION pg_linkhooks` wakes the launcher when it commits, so
//!   that the new database gets its worker within a second, without a restart;
//! - `DROP EXTENSION` wakes this database's worker when it commits, so that it
//!   notices and stops;
//! - `DROP DATABASE`, `CREATE DATABASE ... TEMPLATE`, `ALTER DATABASE ...
//!   RENAME` and `... SET TABLESPACE` refuse to run while another session is
//!   connected to the database: its worker is held off and stopped first, and
//!   started again when the transaction ends if the database is still there;
//! - `COPY ... FROM` is a statement that may store several clicks (`statements`).

use std::ffi::{CStr, c_char};
use std::time::{Duration, Instant};

use pgrx::pg_sys::submodules::ffi::pg_guard_ffi_boundary;
use pgrx::prelude::*;

use crate::{shared, slots};

/// How long a statement holds a database's worker off at most (if its backend
/// dies without saying it is done). A worker started again after this waits
/// for the statement's lock on the database anyway.
const PAUSE_MS: i64 = 60_000;
/// How long a statement waits for the worker to stop.
const STOP_WAIT: Duration = Duration::from_secs(10);

static mut PREVIOUS: pg_sys::ProcessUtility_hook_type = None;

pub fn install() {
    // SAFETY: called once, in the postmaster's _PG_init, before any statement runs.
    unsafe {
        PREVIOUS = pg_sys::ProcessUtility_hook;
        pg_sys::ProcessUtility_hook = Some(process_utility);
    }
}

enum Statement {
    /// Needs this database with no other session connected.
    NeedsDatabaseAlone(pg_sys::Oid),
    CreatesExtension,
    DropsExtension,
    /// COPY FROM: may insert clicks (see `statements`).
    CopiesIn,
    Other,
}

#[pg_guard]
#[allow(clippy::too_many_arguments)]
unsafe extern "C-unwind" fn process_utility(
    pstmt: *mut pg_sys::PlannedStmt,
    query_string: *const c_char,
    read_only_tree: bool,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    query_env: *mut pg_sys::QueryEnvironment,
    dest: *mut pg_sys::DestReceiver,
    qc: *mut pg_sys::QueryCompletion,
) {
    let run = || {
        // SAFETY: the arguments Postgres gave us, passed on unchanged.
        unsafe {
            match PREVIOUS {
                Some(previous) => pg_guard_ffi_boundary(|| {
                    previous(
                        pstmt,
                        query_string,
                        read_only_tree,
                        context,
                        params,
                        query_env,
                        dest,
                        qc,
                    )
                }),
                None => pg_sys::standard_ProcessUtility(
                    pstmt,
                    query_string,
                    read_only_tree,
                    context,
                    params,
                    query_env,
                    dest,
                    qc,
                ),
            }
        }
    };
    // SAFETY: a planned utility statement's node, as Postgres built it.
    match unsafe { classify((*pstmt).utilityStmt) } {
        Statement::NeedsDatabaseAlone(database) => {
            hold_worker_off(database);
            run();
        }
        Statement::CreatesExtension => {
            run();
            shared::extension_created();
        }
        Statement::DropsExtension => {
            run();
            shared::wake_on_commit();
        }
        Statement::CopiesIn => {
            crate::statements::started(pstmt as usize, std::ptr::null_mut());
            run();
            crate::statements::finished(pstmt as usize);
        }
        Statement::Other => run(),
    }
}

/// Stops `database`'s worker and keeps the launcher from starting another
/// until `slots::unpause` (or `PAUSE_MS`); waits `STOP_WAIT` at most.
fn hold_worker_off(database: pg_sys::Oid) {
    if !slots::pause(database, PAUSE_MS) {
        return; // eight such statements at once: this one may find the worker connected
    }
    // Until the transaction ends: a database dropped is gone only once it commits.
    shared::unpause_at_end(database);
    slots::wake_launcher();
    let deadline = Instant::now() + STOP_WAIT;
    let mut cancelled = Vec::new();
    while slots::worker_connected(database) && Instant::now() < deadline {
        // A housekeeper leaves when its worker has, once its chore is done; a
        // long one (a backlog of clicks to count) is cancelled: it is redone later.
        for pid in slots::orphaned_housekeepers(database) {
            if !cancelled.contains(&pid) {
                cancel_statement(pid);
                cancelled.push(pid);
            }
        }
        crate::worker::wait_latch(Duration::from_millis(50));
    }
}

/// What `pg_cancel_backend` does, for a process of this cluster only.
fn cancel_statement(pid: i32) {
    // SAFETY: BackendPidGetProc reads the proc array; a pid that is no backend
    // of this cluster (one reused since) gets no signal.
    unsafe {
        if !pg_sys::BackendPidGetProc(pid).is_null() {
            libc::kill(pid, libc::SIGINT);
        }
    }
}

/// # Safety
/// `node` is a utility statement's parse node (or null).
unsafe fn classify(node: *mut pg_sys::Node) -> Statement {
    if node.is_null() || !shared::preloaded() {
        return Statement::Other;
    }
    // SAFETY: each cast follows the node's tag.
    unsafe {
        match (*node).type_ {
            pg_sys::NodeTag::T_CreateExtensionStmt => {
                let stmt = node.cast::<pg_sys::CreateExtensionStmt>();
                if text((*stmt).extname) == Some("pg_linkhooks") {
                    Statement::CreatesExtension
                } else {
                    Statement::Other
                }
            }
            pg_sys::NodeTag::T_DropStmt
                if (*node.cast::<pg_sys::DropStmt>()).removeType
                    == pg_sys::ObjectType::OBJECT_EXTENSION =>
            {
                Statement::DropsExtension
            }
            pg_sys::NodeTag::T_CopyStmt if (*node.cast::<pg_sys::CopyStmt>()).is_from => {
                Statement::CopiesIn
            }
            pg_sys::NodeTag::T_DropdbStmt => {
                database_alone((*node.cast::<pg_sys::DropdbStmt>()).dbname)
            }
            pg_sys::NodeTag::T_RenameStmt
                if (*node.cast::<pg_sys::RenameStmt>()).renameType
                    == pg_sys::ObjectType::OBJECT_DATABASE =>
            {
                database_alone((*node.cast::<pg_sys::RenameStmt>()).subname)
            }
            pg_sys::NodeTag::T_CreatedbStmt => {
                let options = (*node.cast::<pg_sys::CreatedbStmt>()).options;
                option(options, "template").map_or(Statement::Other, |t| database_alone(t))
            }
            pg_sys::NodeTag::T_AlterDatabaseStmt => {
                let stmt = node.cast::<pg_sys::AlterDatabaseStmt>();
                if option((*stmt).options, "tablespace").is_some() {
                    database_alone((*stmt).dbname)
                } else {
                    Statement::Other
                }
            }
            _ => Statement::Other,
        }
    }
}

/// # Safety
/// `name` is a NUL-terminated database name (or null).
unsafe fn database_alone(name: *const c_char) -> Statement {
    if name.is_null() {
        return Statement::Other;
    }
    // SAFETY: catalog lookups; missing_ok, so no error for an unknown name.
    let (oid, owned) = unsafe {
        let oid = pg_sys::get_database_oid(name, true);
        let owned =
            oid != pg_sys::InvalidOid && pg_sys::pg_database_ownercheck(oid, pg_sys::GetUserId());
        (oid, owned)
    };
    // Each of these statements needs the database's owner (or a superuser): anyone else
    // would only get to stop the worker, which is not theirs to stop, before the refusal.
    if owned {
        Statement::NeedsDatabaseAlone(oid)
    } else {
        Statement::Other
    }
}

/// The value of the DefElem named `name` in `options`, as a C string.
///
/// # Safety
/// `options` is a List of DefElem (or null).
unsafe fn option(options: *mut pg_sys::List, name: &str) -> Option<*const c_char> {
    if options.is_null() {
        return None;
    }
    // SAFETY: a List's `length` cells of pointers to DefElem nodes.
    unsafe {
        (0..(*options).length as usize)
            .map(|i| {
                (*(*options).elements.add(i))
                    .ptr_value
                    .cast::<pg_sys::DefElem>()
            })
            .find(|&def| text((*def).defname) == Some(name) && !(*def).arg.is_null())
            .map(|def| pg_sys::defGetString(def).cast_const())
    }
}

/// # Safety
/// `value` is NUL-terminated (or null).
unsafe fn text<'a>(value: *const c_char) -> Option<&'a str> {
    if value.is_null() {
        return None;
    }
    // SAFETY: as the caller promises.
    unsafe { CStr::from_ptr(value) }.to_str().ok()
}
