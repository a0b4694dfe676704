//! State shared between backends and the worker through shared memory, and
//! the per-transaction hooks that use it: wake this database's workers when a
//! transaction that queued deliveries commits (never before, never on
//! rollback), the launcher when one created the extension, and tell every
//! backend that subscriptions, campaign goals or links changed.

use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use pgrx::prelude::*;
use pgrx::{PgAtomic, pg_shmem_init};

static CONFIG_GENERATION: PgAtomic<AtomicU64> =
    unsafe { PgAtomic::new(c"linkhooks_config_generation") };
static LINKS_GENERATION: PgAtomic<AtomicU64> =
    unsafe { PgAtomic::new(c"linkhooks_links_generation") };

/// Set in the postmaster's `_PG_init` when loaded through shared_preload_libraries;
/// inherited by every backend it forks.
static PRELOADED: AtomicBool = AtomicBool::new(false);

pub fn init() {
    pg_shmem_init!(CONFIG_GENERATION);
    pg_shmem_init!(LINKS_GENERATION);
    crate::slots::init();
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

/// This backend's database.
pub fn my_database() -> pg_sys::Oid {
    // SAFETY: MyDatabaseId is this backend's database, set once at connection.
    unsafe { pg_sys::MyDatabaseId }
}

/// This backend's database's name (in a transaction: it reads the catalog).
pub fn my_database_name() -> String {
    // SAFETY: get_database_name returns a palloc'd copy, or NULL for a database just dropped.
    unsafe {
        let name = pg_sys::get_database_name(pg_sys::MyDatabaseId);
        if name.is_null() {
            String::new()
        } else {
            std::ffi::CStr::from_ptr(name)
                .to_string_lossy()
                .into_owned()
        }
    }
}

thread_local! {
    static HOOK_REGISTERED: Cell<bool> = const { Cell::new(false) };
    static WAKE_ON_COMMIT: Cell<bool> = const { Cell::new(false) };
    static CONFIG_CHANGED: Cell<bool> = const { Cell::new(false) };
    static LINKS_CHANGED: Cell<bool> = const { Cell::new(false) };
    static CLICKS_RECORDED: Cell<bool> = const { Cell::new(false) };
    static EXTENSION_CREATED: Cell<bool> = const { Cell::new(false) };
    /// Databases whose workers this transaction holds off (src/utility.rs).
    static PAUSED: RefCell<Vec<pg_sys::Oid>> = const { RefCell::new(Vec::new()) };
}

/// This transaction recorded clicks, conversions or misses: the aggregator counts them once it commits.
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

/// This transaction ran CREATE EXTENSION pg_linkhooks: the launcher starts a
/// worker for this database once it commits.
pub fn extension_created() {
    register_hook();
    EXTENSION_CREATED.set(true);
}

/// Lets `database`'s worker start again when this transaction ends.
pub fn unpause_at_end(database: pg_sys::Oid) {
    register_hook();
    PAUSED.with_borrow_mut(|paused| paused.push(database));
}

fn unpause_all() {
    let paused = PAUSED.take();
    for &database in &paused {
        crate::slots::unpause(database);
    }
    if !paused.is_empty() {
        crate::slots::wake_launcher();
    }
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
            if WAKE_ON_COMMIT.replace(false) && preloaded() {
                // Only this database's worker: waking another costs it a pointless transaction.
                crate::slots::wake(my_database());
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
            if CLICKS_RECORDED.replace(false) && preloaded() {
                crate::slots::clicks_committed(my_database());
            }
            if EXTENSION_CREATED.replace(false) && preloaded() {
                crate::slots::extension_created(my_database());
            }
            unpause_all();
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
            EXTENSION_CREATED.set(false);
            unpause_all();
            if CONFIG_CHANGED.replace(false) {
                crate::events::invalidate_cache();
            }
        }
        _ => {}
    }
}
