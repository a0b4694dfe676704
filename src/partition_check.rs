//! Partition constraints compiled once per backend instead of once per statement.
//!
//! PostgreSQL re-checks a partition's constraint on every row that a BEFORE
//! ROW trigger could have changed, and compiles that check anew in every
//! statement (`ExecPartitionCheck`): about 11k instructions, 4–7% of a
//! one-row click `INSERT`. The compiled check depends only on the partition's
//! bounds, so `prime` hands the running statement a check compiled once, before
//! PostgreSQL looks. The delivery queue compiles its partitions' checks here too.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use pgrx::PgMemoryContexts;
use pgrx::prelude::*;

unsafe extern "C-unwind" {
    /// A partition's constraint (utils/partcache.h), a copy in the current
    /// memory context. pgrx does not bind it; call it through `pg_guard_ffi_boundary`.
    fn RelationGetPartitionQual(rel: pg_sys::Relation) -> *mut pg_sys::List;
}

/// A partition's constraint compiled in a memory context of its own, which
/// lives as long as this does.
pub struct Compiled {
    partition: pg_sys::Oid,
    context: pg_sys::MemoryContext,
    pub state: *mut pg_sys::ExprState,
}

impl Drop for Compiled {
    fn drop(&mut self) {
        // SAFETY: the context is ours; whoever used the state holds this alive.
        unsafe { pg_sys::MemoryContextDelete(self.context) };
    }
}

/// The partition's constraint, compiled as `ExecPartitionCheck` would for
/// every statement, in a context that outlives it.
///
/// # Safety
/// `rel` is an open, locked partition.
pub unsafe fn compile(rel: pg_sys::Relation) -> Compiled {
    unsafe {
        // Made under the current context and moved under CacheMemoryContext once
        // compiled (as the relcache builds its own entries): an error while
        // compiling frees it with the statement instead of leaking it for the session.
        let context = pg_sys::AllocSetContextCreateInternal(
            pg_sys::CurrentMemoryContext,
            c"pg_linkhooks partition check".as_ptr(),
            0,
            1024,
            8192,
        );
        let state = PgMemoryContexts::For(context).switch_to(|_| {
            let qual = pg_sys::ffi::pg_guard_ffi_boundary(|| RelationGetPartitionQual(rel));
            let planned = pg_sys::expression_planner(qual.cast());
            pg_sys::ExecInitCheck(planned.cast(), std::ptr::null_mut())
        });
        pg_sys::MemoryContextSetParent(context, pg_sys::CacheMemoryContext);
        Compiled {
            partition: (*rel).rd_id,
            context,
            state,
        }
    }
}

/// Partitions whose checks a session keeps from one transaction to the next
/// (a day's partition each, by default).
const MAX_KNOWN: usize = 16;

thread_local! {
    /// The checks `prime` compiled, oldest first, until a relcache invalidation
    /// of their partition. Within a transaction every check compiled stays
    /// here, so a transaction that goes round more partitions than `MAX_KNOWN`
    /// compiles each once; its end keeps the newest `MAX_KNOWN`.
    static KNOWN: RefCell<Vec<Rc<Compiled>>> = const { RefCell::new(Vec::new()) };
    /// Checks no longer known but perhaps still in a statement's result
    /// relation: freed when the transaction ends, which ends every statement.
    static RETIRED: RefCell<Vec<Rc<Compiled>>> = const { RefCell::new(Vec::new()) };
    static CALLBACKS_REGISTERED: Cell<bool> = const { Cell::new(false) };
    /// Relcache invalidations seen: one arriving while a check compiles may
    /// have changed the bounds it read.
    static INVALIDATIONS: Cell<u64> = const { Cell::new(0) };
}

/// Gives `rel`'s result relation in `estate`, if the executor routed rows to
/// it and has not compiled its partition check yet, the check compiled once.
///
/// # Safety
/// `estate` belongs to a running statement; `rel` is open and locked.
pub unsafe fn prime(estate: *mut pg_sys::EState, rel: pg_sys::Relation) {
    unsafe {
        if !(*(*rel).rd_rel).relispartition {
            return;
        }
        let routed = (*estate).es_tuple_routing_result_relations;
        if routed.is_null() {
            return;
        }
        let cells = std::slice::from_raw_parts((*routed).elements, (*routed).length as usize);
        let Some(result_rel) = cells
            .iter()
            .map(|cell| cell.ptr_value.cast::<pg_sys::ResultRelInfo>())
            .find(|r| (**r).ri_RelationDesc == rel)
        else {
            return;
        };
        if (*result_rel).ri_PartitionCheckExpr.is_null() {
            (*result_rel).ri_PartitionCheckExpr = known_check(rel).state;
        }
    }
}

/// # Safety
/// `rel` is an open, locked partition.
unsafe fn known_check(rel: pg_sys::Relation) -> Rc<Compiled> {
    let partition = unsafe { (*rel).rd_id };
    if let Some(known) = KNOWN.with(|k| {
        k.borrow()
            .iter()
            .find(|c| c.partition == partition)
            .cloned()
    }) {
        return known;
    }
    register_callbacks();
    let seen = INVALIDATIONS.get();
    // SAFETY: as the caller promises.
    let fresh = Rc::new(unsafe { compile(rel) });
    if INVALIDATIONS.get() == seen {
        KNOWN.with(|k| k.borrow_mut().push(fresh.clone()));
    } else {
        RETIRED.with(|r| r.borrow_mut().push(fresh.clone()));
    }
    fresh
}

fn register_callbacks() {
    if !CALLBACKS_REGISTERED.replace(true) {
        // SAFETY: registered once for the backend's life; they only move Rcs between RefCells.
        unsafe {
            pg_sys::CacheRegisterRelcacheCallback(Some(relation_changed), pg_sys::Datum::from(0));
            pg_sys::RegisterXactCallback(Some(transaction_ended), std::ptr::null_mut());
        }
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn relation_changed(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    INVALIDATIONS.set(INVALIDATIONS.get().wrapping_add(1));
    let stale: Vec<_> = KNOWN.with(|k| {
        let (stale, kept) = k
            .take()
            .into_iter()
            .partition(|c| relid == pg_sys::InvalidOid || c.partition == relid);
        k.replace(kept);
        stale
    });
    RETIRED.with(|r| r.borrow_mut().extend(stale));
}

#[pg_guard]
unsafe extern "C-unwind" fn transaction_ended(
    event: pg_sys::XactEvent::Type,
    _arg: *mut std::ffi::c_void,
) {
    use pg_sys::XactEvent::*;
    if matches!(
        event,
        XACT_EVENT_COMMIT
            | XACT_EVENT_ABORT
            | XACT_EVENT_PREPARE
            | XACT_EVENT_PARALLEL_COMMIT
            | XACT_EVENT_PARALLEL_ABORT
    ) {
        // Every statement has ended: no result relation holds a check any more.
        RETIRED.with(|r| r.borrow_mut().clear());
        KNOWN.with(|k| {
            let mut k = k.borrow_mut();
            let excess = k.len().saturating_sub(MAX_KNOWN);
            k.drain(..excess);
        });
    }
}
