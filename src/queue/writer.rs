//! The executor state delivery rows are written with. A statement that stores
//! many clicks (`COPY`, a multi-row `INSERT`) keeps one open from its first
//! event to its end, so opening the partition and its indexes and building an
//! executor state are paid once per statement instead of once per click.
//!
//! A kept writer serves only the statement it was opened for, in the
//! subtransaction that statement runs in, while no relcache invalidation has
//! arrived; anything else gets a writer of its own, closed after its rows. The
//! statement's end closes its writer (`statement_ended`); an error that ends
//! the statement forgets it (`statement_forgotten`), since the abort frees its
//! memory and releases its relations.

use std::cell::RefCell;
use std::rc::Rc;

use pgrx::prelude::*;
use pgrx::{IntoDatum, PgBox, PgMemoryContexts};

use super::Queued;
use super::layout::{Indexes, Layout, Value};

mod c {
    use pgrx::pg_sys::Oid;
    unsafe extern "C-unwind" {
        /// What an identity column's default evaluates (commands/sequence.h): the
        /// next value, without the privilege check that SQL's nextval() makes.
        /// pgrx does not bind it; call it through `pg_guard_ffi_boundary`.
        pub fn nextval_internal(relid: Oid, check_permissions: bool) -> i64;
    }
}

/// Who may reuse a kept writer.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) struct Key {
    /// The running statement (`statements::current`).
    pub(super) statement: usize,
    pub(super) subxact: pg_sys::SubTransactionId,
    /// The relcache invalidations seen when it opened: one since may have moved
    /// the partition bounds, so the next row is routed afresh.
    pub(super) invalidations: u64,
}

/// An open insert into one relation of `deliveries`.
pub(super) struct Writer {
    estate: *mut pg_sys::EState,
    result_rel: *mut pg_sys::ResultRelInfo,
    slot: *mut pg_sys::TupleTableSlot,
    rel: pg_sys::Relation,
    /// Holds the relation and index references; closing runs under it.
    owner: pg_sys::ResourceOwner,
    /// Keeps the cached index state and partition check alive while in use.
    layout: Rc<Layout>,
    id_sequence: pg_sys::Oid,
    /// Row triggers a DBA put on the relation: each write is then a query of
    /// its own, whose end fires their AFTER triggers.
    triggers: bool,
}

thread_local! {
    static KEPT: RefCell<Option<(Key, Writer)>> = const { RefCell::new(None) };
}

impl Writer {
    /// Sets up the insert into `rel`, in memory of the current (sub)transaction
    /// when `kept` (the writer may outlive the caller's memory context), else in
    /// the caller's.
    ///
    /// # Safety
    /// `rel` is open and locked (closed by `close`); `layout` is its layout,
    /// with `values`.
    pub(super) unsafe fn open(
        rel: pg_sys::Relation,
        layout: Rc<Layout>,
        id_sequence: pg_sys::Oid,
        kept: bool,
    ) -> Writer {
        unsafe {
            let parent = if kept {
                pg_sys::CurTransactionContext
            } else {
                pg_sys::CurrentMemoryContext
            };
            let estate = PgMemoryContexts::For(parent).switch_to(|_| pg_sys::CreateExecutorState());
            // Everything else lives in the executor state's memory, freed with it.
            PgMemoryContexts::For((*estate).es_query_cxt).switch_to(|_| {
                let lock = pg_sys::RowExclusiveLock as pg_sys::LOCKMODE;
                let mut rte =
                    PgBox::<pg_sys::RangeTblEntry>::alloc_node(pg_sys::NodeTag::T_RangeTblEntry);
                rte.rtekind = pg_sys::RTEKind::RTE_RELATION;
                rte.relid = layout.table;
                rte.relkind = pg_sys::RELKIND_RELATION as std::ffi::c_char;
                rte.rellockmode = lock;
                pg_sys::ExecInitRangeTable(
                    estate,
                    pg_sys::lappend(std::ptr::null_mut(), rte.into_pg().cast()),
                );
                let result_rel =
                    PgBox::<pg_sys::ResultRelInfo>::alloc_node(pg_sys::NodeTag::T_ResultRelInfo)
                        .into_pg();
                pg_sys::InitResultRelInfo(result_rel, rel, 1, std::ptr::null_mut(), 0);
                if let Some(check) = &layout.check {
                    (*result_rel).ri_PartitionCheckExpr = check.state;
                }
                open_indexes(result_rel, layout.indexes.as_ref());
                let slot = pg_sys::table_slot_create(rel, &mut (*estate).es_tupleTable);
                Writer {
                    estate,
                    result_rel,
                    slot,
                    rel,
                    owner: pg_sys::CurrentResourceOwner,
                    triggers: !(*result_rel).ri_TrigDesc.is_null(),
                    layout,
                    id_sequence,
                }
            })
        }
    }

    /// Inserts one delivery per entry of `rows` for one event; their ids.
    pub(super) fn write(
        &self,
        event_uuid: uuid::Uuid,
        event_type: &str,
        signed_at: i64,
        rows: &[Queued],
    ) -> Vec<i64> {
        let values = self.layout.values.as_deref().unwrap_or_default();
        let mut ids = Vec::with_capacity(rows.len());
        // SAFETY: the state was set up by `open` and is not closed; every datum
        // matches its attribute's type (checked in `read_layout`).
        unsafe {
            let estate = self.estate;
            (*estate).es_output_cid = pg_sys::GetCurrentCommandId(true);
            if self.triggers {
                pg_sys::AfterTriggerBeginQuery();
            }
            let now = pg_sys::Datum::from(pg_sys::GetCurrentTransactionStartTimestamp());
            let due = pg_sys::Datum::from(super::due_stamp());
            let uuid_datum = pgrx::Uuid::from_bytes(*event_uuid.as_bytes()).into_datum();
            let type_datum = event_type.into_datum();
            let pending = "pending".into_datum();
            let slot = self.slot;
            for row in rows {
                let id = pg_sys::ffi::pg_guard_ffi_boundary(|| {
                    c::nextval_internal(self.id_sequence, false)
                });
                pg_sys::ExecClearTuple(slot);
                for (n, value) in values.iter().enumerate() {
                    let datum = match value {
                        Value::Id => Some(id.into()),
                        Value::EventId => uuid_datum,
                        Value::SubscriptionId => Some(row.subscription_id.into()),
                        Value::EventType => type_datum,
                        Value::Body => (&*row.body).into_datum(),
                        Value::SignedAt => Some(signed_at.into()),
                        Value::Signature => row.signature.as_str().into_datum(),
                        Value::Pending => pending,
                        Value::ZeroAttempts => Some(0i32.into()),
                        Value::Now => Some(now),
                        Value::DueStamp => Some(due),
                        Value::Null => None,
                    };
                    *(*slot).tts_values.add(n) = datum.unwrap_or(pg_sys::Datum::from(0));
                    *(*slot).tts_isnull.add(n) = datum.is_none();
                }
                pg_sys::ExecStoreVirtualTuple(slot);
                pg_sys::ExecSimpleRelationInsert(self.result_rel, estate, slot);
                // What the index entries and the partition check allocated.
                let per_tuple = (*estate).es_per_tuple_exprcontext;
                if !per_tuple.is_null() {
                    pg_sys::MemoryContextReset((*per_tuple).ecxt_per_tuple_memory);
                }
                ids.push(id);
            }
            if self.triggers {
                pg_sys::AfterTriggerEndQuery(estate);
            }
        }
        ids
    }

    /// Tears the insert down. The locks stay to the end of the transaction:
    /// releasing them cost every click a lock-table update.
    pub(super) fn close(self) {
        // SAFETY: what `open` set up, closed once (this consumes the writer),
        // under the resource owner that holds its references.
        unsafe {
            let current = pg_sys::CurrentResourceOwner;
            pg_sys::CurrentResourceOwner = self.owner;
            close_indexes(self.result_rel);
            // Relations the AFTER triggers' firing opened (`ExecGetTriggerResultRel`).
            pg_sys::ExecCloseResultRelations(self.estate);
            pg_sys::ExecResetTupleTable((*self.estate).es_tupleTable, false);
            pg_sys::FreeExecutorState(self.estate);
            pg_sys::table_close(self.rel, pg_sys::NoLock as pg_sys::LOCKMODE);
            pg_sys::CurrentResourceOwner = current;
        }
    }
}

/// Runs `write` with the writer kept for `key`, if there is one. A kept writer
/// of another key is closed first (its statement is still running, in this or
/// an enclosing subtransaction, so its resource owner is alive).
pub(super) fn with_kept<T>(key: Key, write: impl FnOnce(&Writer) -> T) -> Option<T> {
    // Taken out while it writes: a DBA's trigger on deliveries may run statements.
    let (held, writer) = KEPT.with(|k| k.borrow_mut().take())?;
    if held != key {
        writer.close();
        return None;
    }
    let written = write(&writer);
    keep(key, writer);
    Some(written)
}

/// Keeps `writer` for `key`'s statement's next events.
pub(super) fn keep(key: Key, writer: Writer) {
    let stale = KEPT.with(|k| k.borrow_mut().replace((key, writer)));
    if let Some((_, writer)) = stale {
        writer.close();
    }
}

/// A statement ended: closes its writer.
pub fn statement_ended(statement: usize) {
    let ended = KEPT.with(|k| {
        let mut kept = k.borrow_mut();
        match kept.as_ref() {
            Some((key, _)) if key.statement == statement => kept.take(),
            _ => None,
        }
    });
    if let Some((_, writer)) = ended {
        writer.close();
    }
}

/// An error ended a statement: forgets its writer, whose memory and
/// references the abort released.
pub fn statement_forgotten(statement: usize) {
    KEPT.with(|k| {
        let mut kept = k.borrow_mut();
        if kept
            .as_ref()
            .is_some_and(|(key, _)| key.statement == statement)
        {
            kept.take();
        }
    });
}

/// Opens the table's indexes into `result_rel`, with their cached `IndexInfo`s when there are.
///
/// # Safety
/// `result_rel` is initialized for the open deliveries table, whose layout `indexes` belongs to.
unsafe fn open_indexes(result_rel: *mut pg_sys::ResultRelInfo, indexes: Option<&Indexes>) {
    unsafe {
        let Some(indexes) = indexes else {
            return pg_sys::ExecOpenIndices(result_rel, false);
        };
        let n = indexes.oids.len();
        let descs =
            pg_sys::palloc(n.max(1) * size_of::<pg_sys::Relation>()).cast::<pg_sys::Relation>();
        for (i, oid) in indexes.oids.iter().enumerate() {
            *descs.add(i) = pg_sys::index_open(*oid, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
        }
        (*result_rel).ri_NumIndices = n as i32;
        (*result_rel).ri_IndexRelationDescs = descs;
        (*result_rel).ri_IndexRelationInfo = indexes.infos;
    }
}

/// Closes what `open_indexes` opened, keeping the locks.
///
/// # Safety
/// `result_rel`'s indexes were opened by `open_indexes`.
unsafe fn close_indexes(result_rel: *mut pg_sys::ResultRelInfo) {
    unsafe {
        for i in 0..(*result_rel).ri_NumIndices as usize {
            let index = *(*result_rel).ri_IndexRelationDescs.add(i);
            if !index.is_null() {
                pg_sys::index_close(index, pg_sys::NoLock as pg_sys::LOCKMODE);
            }
        }
    }
}
