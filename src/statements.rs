//! Clicks past their link's `max_clicks` in statements that store several
//! clicks (`COPY`, multi-row `INSERT`, `INSERT … SELECT`, `MERGE`).
//!
//! A one-row `INSERT` of a click past the limit is refused. Refusing a whole
//! batch for one such click would lose the batch's valid clicks, so a statement
//! skips those clicks instead and stores the rest: the same rows as inserting
//! the clicks one by one. A statement that stored none of its clicks is refused
//! as the one-row `INSERT` is, with the same error, when it finishes.
//!
//! The executor and utility hooks keep a stack of the running statements that
//! can insert rows; the clicks trigger counts into the innermost one and primes
//! its partition check (`partition_check`), and the delivery queue keeps its
//! insert open for it until it ends (`Observer`).

use std::cell::RefCell;
use std::sync::OnceLock;

use pgrx::pg_sys::submodules::ffi::pg_guard_ffi_boundary;
use pgrx::prelude::*;

use crate::error::Error;

/// A running statement that may insert clicks.
struct Statement {
    /// Its QueryDesc or (for COPY) PlannedStmt, as an identity.
    id: usize,
    /// The subtransaction it runs in: an abort there forgets it.
    subxact: pg_sys::SubTransactionId,
    /// Its executor state; null for COPY, which keeps its own.
    estate: *mut pg_sys::EState,
    stored: u64,
    skipped: u64,
    /// The first skipped click's refusal, raised if nothing was stored.
    refusal: Option<String>,
}

thread_local! {
    static RUNNING: RefCell<Vec<Statement>> = const { RefCell::new(Vec::new()) };
}

static mut PREVIOUS_START: pg_sys::ExecutorStart_hook_type = None;
static mut PREVIOUS_FINISH: pg_sys::ExecutorFinish_hook_type = None;
static OBSERVER: OnceLock<Observer> = OnceLock::new();

/// Told, with its id, of every statement that leaves the stack.
pub struct Observer {
    /// It finished.
    pub ended: fn(usize),
    /// An error ended it: the abort released its memory and relations.
    pub forgotten: fn(usize),
}

/// The innermost running statement that may insert rows.
pub struct Running {
    /// Its QueryDesc or (for COPY) PlannedStmt, as an identity.
    pub id: usize,
    /// The subtransaction it started in.
    pub subxact: pg_sys::SubTransactionId,
}

/// Installs the executor hooks, the (sub)transaction callbacks that forget
/// statements an error ended, and `observer`. COPY is followed by `utility`'s hook.
pub fn install(observer: Observer) {
    let _ = OBSERVER.set(observer);
    // SAFETY: called once, in the postmaster's _PG_init, before any statement runs.
    unsafe {
        PREVIOUS_START = pg_sys::ExecutorStart_hook;
        pg_sys::ExecutorStart_hook = Some(executor_start);
        PREVIOUS_FINISH = pg_sys::ExecutorFinish_hook;
        pg_sys::ExecutorFinish_hook = Some(executor_finish);
        pg_sys::RegisterXactCallback(Some(on_xact_event), std::ptr::null_mut());
        pg_sys::RegisterSubXactCallback(Some(on_subxact_event), std::ptr::null_mut());
    }
}

/// A click past its limit: true if it is skipped (a statement that may store
/// others runs), false if it must be refused now.
pub fn skip_past_limit(refusal: impl FnOnce() -> String) -> bool {
    RUNNING.with(|r| match r.borrow_mut().last_mut() {
        Some(s) => {
            s.skipped += 1;
            s.refusal.get_or_insert_with(refusal);
            true
        }
        None => false,
    })
}

/// The innermost running statement that may insert rows, if any.
pub fn current() -> Option<Running> {
    RUNNING.with(|r| {
        r.borrow().last().map(|s| Running {
            id: s.id,
            subxact: s.subxact,
        })
    })
}

/// The executor state of the innermost running statement that may insert
/// rows, unless it is a COPY. Valid while that statement runs: it leaves the
/// stack when it finishes or an error ends it.
pub fn executor_state() -> Option<*mut pg_sys::EState> {
    RUNNING.with(|r| r.borrow().last().map(|s| s.estate).filter(|e| !e.is_null()))
}

/// A click the trigger lets through.
pub fn click_stored() {
    RUNNING.with(|r| {
        if let Some(s) = r.borrow_mut().last_mut() {
            s.stored += 1;
        }
    });
}

/// A statement that may insert clicks starts (`estate` null for COPY).
pub fn started(id: usize, estate: *mut pg_sys::EState) {
    // SAFETY: reads the current subtransaction's id.
    let subxact = unsafe { pg_sys::GetCurrentSubTransactionId() };
    RUNNING.with(|r| {
        r.borrow_mut().push(Statement {
            id,
            subxact,
            estate,
            stored: 0,
            skipped: 0,
            refusal: None,
        })
    });
}

/// A statement finished: refuses it if it skipped clicks and stored none,
/// else tells how many it skipped.
pub fn finished(id: usize) {
    let Some(done) = RUNNING.with(|r| {
        let mut r = r.borrow_mut();
        let at = r.iter().rposition(|s| s.id == id)?;
        Some(r.remove(at))
    }) else {
        return;
    };
    if let Some(observer) = OBSERVER.get() {
        (observer.ended)(id);
    }
    match done.refusal {
        Some(refusal) if done.stored == 0 => Error::LimitReached(refusal).report(),
        Some(_) => pgrx::notice!(
            "pg_linkhooks: {} click(s) past their link's max_clicks were not recorded",
            done.skipped
        ),
        None => {}
    }
}

/// # Safety
/// `query` is a QueryDesc the executor is starting.
unsafe fn may_insert(query: *mut pg_sys::QueryDesc, eflags: i32) -> bool {
    // SAFETY: a started query's planned statement.
    unsafe {
        let planned = (*query).plannedstmt;
        eflags & pg_sys::EXEC_FLAG_EXPLAIN_ONLY as i32 == 0
            && !planned.is_null()
            && (matches!(
                (*planned).commandType,
                pg_sys::CmdType::CMD_INSERT | pg_sys::CmdType::CMD_MERGE
            ) || (*planned).hasModifyingCTE)
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn executor_start(query: *mut pg_sys::QueryDesc, eflags: i32) {
    // SAFETY: the arguments Postgres gave us, passed on unchanged.
    unsafe {
        match PREVIOUS_START {
            Some(previous) => pg_guard_ffi_boundary(|| previous(query, eflags)),
            None => pg_sys::standard_ExecutorStart(query, eflags),
        }
        if may_insert(query, eflags) {
            started(query as usize, (*query).estate);
        }
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn executor_finish(query: *mut pg_sys::QueryDesc) {
    // SAFETY: the argument Postgres gave us, passed on unchanged.
    unsafe {
        match PREVIOUS_FINISH {
            Some(previous) => pg_guard_ffi_boundary(|| previous(query)),
            None => pg_sys::standard_ExecutorFinish(query),
        }
    }
    finished(query as usize);
}

#[pg_guard]
unsafe extern "C-unwind" fn on_xact_event(
    event: pg_sys::XactEvent::Type,
    _arg: *mut std::ffi::c_void,
) {
    use pg_sys::XactEvent::*;
    if matches!(
        event,
        XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_ABORT | XACT_EVENT_COMMIT | XACT_EVENT_PREPARE
    ) {
        forget(RUNNING.with(|r| r.take()));
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_subxact_event(
    event: pg_sys::SubXactEvent::Type,
    aborted: pg_sys::SubTransactionId,
    _parent: pg_sys::SubTransactionId,
    _arg: *mut std::ffi::c_void,
) {
    if event == pg_sys::SubXactEvent::SUBXACT_EVENT_ABORT_SUB {
        // Statements of the aborted subtransaction and of those it started.
        let ended = RUNNING.with(|r| {
            let (kept, ended): (Vec<_>, Vec<_>) =
                r.take().into_iter().partition(|s| s.subxact < aborted);
            r.replace(kept);
            ended
        });
        forget(ended);
    }
}

/// Tells the observer of statements an error (or, defensively, the
/// transaction's end) took off the stack.
fn forget(statements: Vec<Statement>) {
    if let Some(observer) = OBSERVER.get() {
        for statement in statements {
            (observer.forgotten)(statement.id);
        }
    }
}
