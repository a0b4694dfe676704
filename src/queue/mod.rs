//! Delivery rows written straight into `linkhooks.deliveries`, without SPI.
//!
//! A saved SPI plan still pays, per click, for plan revalidation, a fresh
//! snapshot, a command-counter bump and a whole executor start-up and
//! shutdown. This writes the row through Postgres's own single-relation insert
//! (`ExecSimpleRelationInsert`, what logical replication applies rows with):
//! NOT NULL checks, every index entry (partial predicates included) and any
//! row triggers a DBA put on the table all still happen.
//!
//! Each backend also builds the index insert state once (the `IndexInfo`s,
//! partial-index predicates compiled), which the executor would build for every
//! statement, and builds it again when the table or any of its indexes changes.
//!
//! The table is partitioned by `created_at` (the transaction's start), so
//! every row of a transaction goes to one partition, which this finds in the
//! partition bounds (`routing`) and writes to directly, checking the
//! partition's constraint as the executor would (compiled once per partition).
//!
//! Only the table's own columns are known here. If someone added a column
//! (with a default this code would not apply), changed a type or partitioned
//! the table another way, `insert` returns `None` and the caller falls back to
//! a plain SQL INSERT.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use pgrx::prelude::*;
use pgrx::{IntoDatum, PgBox};

use crate::error::{Error, Result};
use crate::linkstore;

mod layout;
mod partitions;

use layout::{Indexes, Layout, Value, read_layout};
use partitions::{Routing, read_routing};

mod c {
    use pgrx::pg_sys::Oid;
    unsafe extern "C-unwind" {
        /// What an identity column's default evaluates (commands/sequence.h): the
        /// next value, without the privilege check that SQL's nextval() makes.
        /// pgrx does not bind it; call it through `pg_guard_ffi_boundary`.
        pub fn nextval_internal(relid: Oid, check_permissions: bool) -> i64;
    }
}

/// A signed delivery ready to insert.
pub struct Queued {
    pub subscription_id: i64,
    pub body: Rc<str>,
    pub signature: String,
}

thread_local! {
    /// Forgotten, with every layout, on any relcache invalidation of the
    /// table, a partition or an index of theirs (ALTER TABLE, ATTACH, DROP).
    static ROUTING: RefCell<Option<Rc<Routing>>> = const { RefCell::new(None) };
    static LAYOUTS: RefCell<Vec<Rc<Layout>>> = const { RefCell::new(Vec::new()) };
    static FORGET_REGISTERED: Cell<bool> = const { Cell::new(false) };
    /// Relcache invalidations seen, of any relation: one arriving while a
    /// layout is read (an index's flags changing) makes that layout stale.
    static INVALIDATIONS: Cell<u64> = const { Cell::new(0) };
}

unsafe extern "C-unwind" fn forget_layout(_: pg_sys::Datum, relid: pg_sys::Oid) {
    INVALIDATIONS.set(INVALIDATIONS.get().wrapping_add(1));
    let concerned = relid == pg_sys::InvalidOid
        || ROUTING.with(|r| r.borrow().as_ref().is_some_and(|r| r.table == relid))
        || LAYOUTS.with(|l| {
            l.borrow().iter().any(|known| {
                relid == known.table
                    || known
                        .indexes
                        .as_ref()
                        .is_some_and(|i| i.oids.contains(&relid))
            })
        });
    if concerned {
        ROUTING.with(|r| *r.borrow_mut() = None);
        LAYOUTS.with(|l| l.borrow_mut().clear());
    }
}

/// When a row this transaction queues comes due: the clock read once the
/// transaction holds its id, not the transaction's start. The worker starts
/// each subscription's walk of the due index at a floor (see `floors`) no later
/// than the oldest start among transactions holding an id when it looked; one
/// that takes its id after that reads the clock later, so its rows never fall
/// below a floor. Every writer of a due time a concurrent claim might not see
/// uses this.
pub fn due_stamp() -> pg_sys::TimestampTz {
    // SAFETY: assigns this transaction's id if it has none (the caller is about
    // to write a row, which would), then reads the clock.
    unsafe {
        pg_sys::GetCurrentTransactionId();
        pg_sys::GetCurrentTimestamp()
    }
}

/// `due_stamp` as SQL takes it.
pub fn due_at() -> pgrx::datum::TimestampWithTimeZone {
    pgrx::datum::TimestampWithTimeZone::try_from(due_stamp())
        .expect("the clock reads a valid timestamp")
}

fn register_forget() {
    if !FORGET_REGISTERED.replace(true) {
        // SAFETY: registering a callback for this backend's life; it only clears RefCells.
        unsafe {
            pg_sys::CacheRegisterRelcacheCallback(Some(forget_layout), pg_sys::Datum::from(0))
        };
    }
}

/// The table's routing, read afresh when it changed.
///
/// # Safety
/// `rel` is the deliveries table, open and locked.
unsafe fn routing_of(rel: pg_sys::Relation) -> Result<Rc<Routing>> {
    if let Some(known) = ROUTING.with(|r| r.borrow().clone()) {
        return Ok(known);
    }
    register_forget();
    let seen = INVALIDATIONS.get();
    // SAFETY: as the caller promises.
    let fresh = Rc::new(unsafe { read_routing(rel) }?);
    if INVALIDATIONS.get() == seen {
        ROUTING.with(|r| *r.borrow_mut() = Some(fresh.clone()));
    }
    Ok(fresh)
}

/// The layout of a relation rows go into, read afresh when it changed.
///
/// # Safety
/// `rel` is open and locked.
unsafe fn layout_of(rel: pg_sys::Relation) -> Rc<Layout> {
    let table = unsafe { (*rel).rd_id };
    if let Some(known) = LAYOUTS.with(|l| l.borrow().iter().find(|l| l.table == table).cloned()) {
        return known;
    }
    register_forget();
    let seen = INVALIDATIONS.get();
    // SAFETY: as the caller promises.
    let fresh = Rc::new(unsafe { read_layout(rel) });
    if INVALIDATIONS.get() == seen {
        LAYOUTS.with(|l| l.borrow_mut().push(fresh.clone()));
    }
    fresh
}

/// Inserts one delivery per entry of `rows` for one event and returns their ids,
/// or `None` when the table's layout is not the one this module knows.
pub fn insert(
    event_id: &str,
    event_type: &str,
    signed_at: i64,
    rows: &[Queued],
) -> Result<Option<Vec<i64>>> {
    let event_uuid = uuid::Uuid::parse_str(event_id)
        .map_err(|e| Error::invalid("event_id", format!("must be a UUID ({e})")))?;
    let table = linkstore::relations()?.deliveries;
    let lock = pg_sys::RowExclusiveLock as pg_sys::LOCKMODE;
    let close = |rel| {
        // SAFETY: a relation opened below; the lock stays to the end of the transaction.
        unsafe { pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE) }
    };
    // Locking the table first takes in any change to it, its partitions or
    // their indexes, so what is read next is current for as long as the lock
    // is held (maintain_partitions locks the table out while it attaches).
    // SAFETY: opened and locked like a query's result relation; closed below or on error.
    let parent = unsafe { pg_sys::table_open(table, lock) };
    // SAFETY: the table is open and locked.
    let routing = match unsafe { routing_of(parent) } {
        Ok(routing) if routing.known && routing.id_sequence != pg_sys::InvalidOid => routing,
        other => {
            close(parent);
            return other.map(|_| None);
        }
    };
    // SAFETY: reads the transaction's start time, which every row of it is created at.
    let now = unsafe { pg_sys::GetCurrentTransactionStartTimestamp() };
    let Some(target) = routing.target(now) else {
        close(parent);
        return Ok(None); // no partition holds it: the SQL INSERT raises the error
    };
    let rel = if target == table {
        parent
    } else {
        // SAFETY: as the table above; a partition found in its current bounds.
        unsafe { pg_sys::table_open(target, lock) }
    };
    // SAFETY: open and locked.
    let layout = unsafe { layout_of(rel) };
    if rel != parent {
        close(parent);
    }
    if layout.values.is_none() {
        close(rel);
        return Ok(None);
    }
    let values = layout.values.as_deref().unwrap_or_default();
    let mut ids = Vec::with_capacity(rows.len());
    // SAFETY: the executor state, slot and relation are set up, used and torn
    // down here, in the current memory context, as execReplication.c's callers
    // do; every datum matches its attribute's type (checked in `read_layout`).
    unsafe {
        let estate = pg_sys::CreateExecutorState();
        let mut rte = PgBox::<pg_sys::RangeTblEntry>::alloc_node(pg_sys::NodeTag::T_RangeTblEntry);
        rte.rtekind = pg_sys::RTEKind::RTE_RELATION;
        rte.relid = layout.table;
        rte.relkind = pg_sys::RELKIND_RELATION as std::ffi::c_char;
        rte.rellockmode = lock;
        pg_sys::ExecInitRangeTable(
            estate,
            pg_sys::lappend(std::ptr::null_mut(), rte.into_pg().cast()),
        );
        let result_rel =
            PgBox::<pg_sys::ResultRelInfo>::alloc_node(pg_sys::NodeTag::T_ResultRelInfo).into_pg();
        pg_sys::InitResultRelInfo(result_rel, rel, 1, std::ptr::null_mut(), 0);
        if let Some(check) = &layout.check {
            (*result_rel).ri_PartitionCheckExpr = check.state;
        }
        (*estate).es_output_cid = pg_sys::GetCurrentCommandId(true);
        open_indexes(result_rel, layout.indexes.as_ref());
        pg_sys::AfterTriggerBeginQuery();
        let slot = pg_sys::table_slot_create(rel, &mut (*estate).es_tupleTable);
        let now = pg_sys::Datum::from(now);
        let due = pg_sys::Datum::from(due_stamp());
        let uuid_datum = pgrx::Uuid::from_bytes(*event_uuid.as_bytes()).into_datum();
        let type_datum = event_type.into_datum();
        let pending = "pending".into_datum();
        for row in rows {
            let id = pg_sys::ffi::pg_guard_ffi_boundary(|| {
                c::nextval_internal(routing.id_sequence, false)
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
            pg_sys::ExecSimpleRelationInsert(result_rel, estate, slot);
            ids.push(id);
        }
        pg_sys::AfterTriggerEndQuery(estate);
        close_indexes(result_rel);
        pg_sys::ExecResetTupleTable((*estate).es_tupleTable, false);
        pg_sys::FreeExecutorState(estate);
        pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
    }
    Ok(Some(ids))
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

/// Closes what `open_indexes` opened. The index locks, like the table's, are
/// kept to the end of the transaction: releasing them cost every click a
/// lock-table update.
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
