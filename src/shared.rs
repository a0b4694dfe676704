//! State shared between backends and the worker through shared memory, and
//! the per-transaction hooks that use it: wake the worker when a transaction
//! that queued deliveries commits (never before, never on rollback), and tell
//! every backend that subscriptions, campaign goals or links changed.

use std::cell::Cell;
use std::sync::atomic::{
    AtomicBool, AtomicI32, AtomicI64, AtomicU32, AtomicU64, AtomicUsize, Ordering,
};

use pgrx::prelude::*;
use pgrx::{PgAtomic, pg_shmem_init};

static WORKER_LATCH: PgAtomic<AtomicUsize> = unsafe { PgAtomic::new(c"linkhooks_worker_latch") };
static WORKER_PID: PgAtomic<AtomicI32> = unsafe { PgAtomic::new(c"linkhooks_worker_pid") };
static WORKER_DATABASE: PgAtomic<AtomicU32> =
    unsafe { PgAtomic::new(c"linkhooks_worker_database") };
static WORKER_IN_FLIGHT: PgAtomic<AtomicI64> =
    unsafe { PgAtomic::new(c"linkhooks_worker_in_flight") };
static WORKER_LAST_LOOP_MS: PgAtomic<AtomicI64> =
    unsafe { PgAtomic::new(c"linkhooks_worker_last_loop") };
static WORKER_STATE: PgAtomic<AtomicU32> = unsafe { PgAtomic::new(c"linkhooks_worker_state") };
/// Set by a worker that found its database, for the restarted worker that connects to it.
static DATABASE_CONFIRMED: PgAtomic<AtomicBool> =
    unsafe { PgAtomic::new(c"linkhooks_worker_database_confirmed") };
static CONFIG_GENERATION: PgAtomic<AtomicU64> =
    unsafe { PgAtomic::new(c"linkhooks_config_generation") };
static LINKS_GENERATION: PgAtomic<AtomicU64> =
    unsafe { PgAtomic::new(c"linkhooks_links_generation") };
/// Moves when a transaction that recorded clicks or misses in the worker's database commits.
static CLICKS_GENERATION: PgAtomic<AtomicU64> =
    unsafe { PgAtomic::new(c"linkhooks_clicks_generation") };

/// Set in the postmaster's `_PG_init` when loaded through shared_preload_libraries;
/// inherited by every backend it forks.
static PRELOADED: AtomicBool = AtomicBool::new(false);

pub fn init() {
    pg_shmem_init!(WORKER_LATCH);
    pg_shmem_init!(WORKER_PID);
    pg_shmem_init!(WORKER_DATABASE);
    pg_shmem_init!(WORKER_IN_FLIGHT);
    pg_shmem_init!(WORKER_LAST_LOOP_MS);
    pg_shmem_init!(WORKER_STATE);
    pg_shmem_init!(DATABASE_CONFIRMED);
    pg_shmem_init!(CONFIG_GENERATION);
    pg_shmem_init!(LINKS_GENERATION);
    pg_shmem_init!(CLICKS_GENERATION);
    PRELOADED.store(true, Ordering::Relaxed);
}

pub fn preloaded() -> bool {
    PRELOADED.load(Ordering::Relaxed)
}

/// Generation of subscriptions and campaign goals; 0 when not preloaded.
pub fn config_generation() -> u64 {
    if preloaded() {
        CONFIG_GENERATION.get().load(Ordering::Acquire)
    } else {
        0
    }
}

/// Generation of the links' user-visible columns; bumped when a change commits.
pub fn links_generation() -> u64 {
    if preloaded() {
        LINKS_GENERATION.get().load(Ordering::Acquire)
    } else {
        0
    }
}

/// Called by the worker when it starts (Some) and stops (None), with the database it serves.
pub fn set_worker(latch: Option<*mut pg_sys::Latch>, pid: i32, database: pg_sys::Oid) {
    if !preloaded() {
        return;
    }
    // Before the latch: a backend that sees the latch also sees its database.
    WORKER_DATABASE
        .get()
        .store(database.to_u32(), Ordering::Relaxed);
    WORKER_LATCH
        .get()
        .store(latch.map_or(0, |l| l as usize), Ordering::Release);
    WORKER_PID
        .get()
        .store(if latch.is_some() { pid } else { 0 }, Ordering::Release);
}

pub fn record_loop(in_flight: i64, now_ms: i64) {
    if preloaded() {
        WORKER_IN_FLIGHT.get().store(in_flight, Ordering::Relaxed);
        WORKER_LAST_LOOP_MS.get().store(now_ms, Ordering::Relaxed);
    }
}

/// What the worker is doing, for `worker_status().state`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u32)]
pub enum WorkerState {
    Stopped = 0,
    WaitingForDatabase = 1,
    WaitingForExtension = 2,
    Delivering = 3,
}

pub fn set_worker_state(state: WorkerState) {
    if preloaded() {
        WORKER_STATE.get().store(state as u32, Ordering::Relaxed);
    }
}

/// Marks (or takes, clearing it) "the database exists": see `worker::gate`.
pub fn set_database_confirmed(confirmed: bool) {
    if preloaded() {
        DATABASE_CONFIRMED.get().store(confirmed, Ordering::Release);
    }
}

pub fn take_database_confirmed() -> bool {
    preloaded() && DATABASE_CONFIRMED.get().swap(false, Ordering::AcqRel)
}

/// The worker as shared memory shows it.
pub struct WorkerSnapshot {
    /// 0 when no worker is connected to a database.
    pub pid: i32,
    pub database: pg_sys::Oid,
    pub in_flight: i64,
    pub last_loop_ms: i64,
    pub state: WorkerState,
}

pub fn worker_snapshot() -> WorkerSnapshot {
    if !preloaded() {
        return WorkerSnapshot {
            pid: 0,
            database: pg_sys::InvalidOid,
            in_flight: 0,
            last_loop_ms: 0,
            state: WorkerState::Stopped,
        };
    }
    let state = match WORKER_STATE.get().load(Ordering::Relaxed) {
        1 => WorkerState::WaitingForDatabase,
        2 => WorkerState::WaitingForExtension,
        3 => WorkerState::Delivering,
        _ => WorkerState::Stopped,
    };
    WorkerSnapshot {
        pid: WORKER_PID.get().load(Ordering::Acquire),
        database: pg_sys::Oid::from(WORKER_DATABASE.get().load(Ordering::Relaxed)),
        in_flight: WORKER_IN_FLIGHT.get().load(Ordering::Relaxed),
        last_loop_ms: WORKER_LAST_LOOP_MS.get().load(Ordering::Relaxed),
        state,
    }
}

/// Whether this backend is in the database the worker serves.
fn in_workers_database() -> bool {
    // SAFETY: MyDatabaseId is this backend's database, set once at connection.
    WORKER_DATABASE.get().load(Ordering::Relaxed) == unsafe { pg_sys::MyDatabaseId }.to_u32()
}

/// How many transactions that recorded clicks or misses committed in the worker's
/// database: the worker runs the click aggregator when it moves (a read, no signal).
pub fn clicks_generation() -> u64 {
    if preloaded() {
        CLICKS_GENERATION.get().load(Ordering::Acquire)
    } else {
        0
    }
}

fn wake_worker() {
    if !preloaded() {
        return;
    }
    let latch = WORKER_LATCH.get().load(Ordering::Acquire);
    // Only the worker's own database has deliveries it will claim; waking it for
    // another's costs a signal per commit and a pointless transaction in the worker.
    let ours = in_workers_database();
    if latch != 0 && ours {
        // SAFETY: the latch lives in the worker's PGPROC in shared memory, mapped
        // at the same address in every backend; SetLatch on another process's
        // latch is how Postgres itself wakes processes.
        unsafe { pg_sys::SetLatch(latch as *mut pg_sys::Latch) };
    }
}

thread_local! {
    static HOOK_REGISTERED: Cell<bool> = const { Cell::new(false) };
    static WAKE_ON_COMMIT: Cell<bool> = const { Cell::new(false) };
    static CONFIG_CHANGED: Cell<bool> = const { Cell::new(false) };
    static LINKS_CHANGED: Cell<bool> = const { Cell::new(false) };
    static CLICKS_RECORDED: Cell<bool> = const { Cell::new(false) };
}

/// This transaction recorded clicks or misses: the aggregator counts them once it commits.
pub fn clicks_recorded() {
    if !CLICKS_RECORDED.get() {
        register_hook();
        CLICKS_RECORDED.set(true);
    }
}

/// Wake the worker when this transaction commits.
pub fn wake_on_commit() {
    register_hook();
    WAKE_ON_COMMIT.set(true);
}

/// This transaction changed subscriptions or campaign goals: drop this
/// backend's cache now (so later rows in the transaction see the change) and
/// every backend's when it commits.
pub fn config_changed() {
    register_hook();
    CONFIG_CHANGED.set(true);
    crate::events::invalidate_cache();
}

/// This transaction changed a link: this backend bypasses its link cache until
/// the transaction ends, and every backend's cache goes stale when it commits.
pub fn links_changed() {
    register_hook();
    LINKS_CHANGED.set(true);
}

pub fn links_changed_in_transaction() -> bool {
    LINKS_CHANGED.get()
}

fn register_hook() {
    if !HOOK_REGISTERED.replace(true) {
        unsafe { pg_sys::RegisterXactCallback(Some(on_xact_event), std::ptr::null_mut()) };
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_xact_event(
    event: pg_sys::XactEvent::Type,
    _arg: *mut std::ffi::c_void,
) {
    use pg_sys::XactEvent::*;
    match event {
        XACT_EVENT_COMMIT | XACT_EVENT_PARALLEL_COMMIT => {
            if WAKE_ON_COMMIT.replace(false) {
                wake_worker();
            }
            if CONFIG_CHANGED.replace(false) {
                if preloaded() {
                    CONFIG_GENERATION.get().fetch_add(1, Ordering::AcqRel);
                }
                crate::events::invalidate_cache();
            }
            // After the commit is visible to new snapshots, so a reload sees it.
            if LINKS_CHANGED.replace(false) && preloaded() {
                LINKS_GENERATION.get().fetch_add(1, Ordering::AcqRel);
            }
            if CLICKS_RECORDED.replace(false) && preloaded() && in_workers_database() {
                CLICKS_GENERATION.get().fetch_add(1, Ordering::AcqRel);
            }
        }
        // COMMIT PREPARED runs in whichever backend, without this one's flags.
        XACT_EVENT_PRE_PREPARE if LINKS_CHANGED.get() || CONFIG_CHANGED.get() => {
            pgrx::error!(
                "pg_linkhooks: PREPARE TRANSACTION is not supported after changing links, campaigns or subscriptions"
            )
        }
        XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_ABORT | XACT_EVENT_PREPARE => {
            WAKE_ON_COMMIT.set(false);
            LINKS_CHANGED.set(false);
            CLICKS_RECORDED.set(false);
            if CONFIG_CHANGED.replace(false) {
                crate::events::invalidate_cache();
            }
        }
        _ => {}
    }
}
