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
//! Only the table's own columns are known here. If someone added a column
//! (with a default this code would not apply) or changed a type, `insert`
//! returns `None` and the caller falls back to a plain SQL INSERT.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use pgrx::prelude::*;
use pgrx::{IntoDatum, PgBox, PgMemoryContexts};

use crate::error::{Error, Result};
use crate::linkstore;

mod c {
    use pgrx::pg_sys::Oid;
    unsafe extern "C-unwind" {
        /// What an identity column's default evaluates (commands/sequence.h): the
        /// next value, without the privilege check that SQL's nextval() makes.
        /// pgrx does not bind it; call it through `pg_guard_ffi_boundary`.
        pub fn nextval_internal(relid: Oid, check_permissions: bool) -> i64;
    }
}

/// What goes into one attribute of a new delivery row.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Value {
    Id,
    EventId,
    SubscriptionId,
    EventType,
    Body,
    SignedAt,
    Signature,
    Pending,
    ZeroAttempts,
    Now,
    DueStamp,
    Null,
}

/// The table's columns as schema.sql creates them, with their types and what
/// a new row holds (schema.sql's defaults; keep the two in step).
const COLUMNS: [(&str, pg_sys::Oid, Value); 14] = [
    ("id", pg_sys::INT8OID, Value::Id),
    ("event_id", pg_sys::UUIDOID, Value::EventId),
    ("subscription_id", pg_sys::INT8OID, Value::SubscriptionId),
    ("event_type", pg_sys::TEXTOID, Value::EventType),
    ("body", pg_sys::TEXTOID, Value::Body),
    ("signed_at", pg_sys::INT8OID, Value::SignedAt),
    ("signature", pg_sys::TEXTOID, Value::Signature),
    ("status", pg_sys::TEXTOID, Value::Pending),
    ("attempts", pg_sys::INT4OID, Value::ZeroAttempts),
    ("next_attempt_at", pg_sys::TIMESTAMPTZOID, Value::DueStamp),
    ("created_at", pg_sys::TIMESTAMPTZOID, Value::Now),
    ("delivered_at", pg_sys::TIMESTAMPTZOID, Value::Null),
    ("last_status_code", pg_sys::INT4OID, Value::Null),
    ("last_error", pg_sys::TEXTOID, Value::Null),
];

/// A signed delivery ready to insert.
pub struct Queued {
    pub subscription_id: i64,
    pub body: Rc<str>,
    pub signature: String,
}

/// The deliveries table as this backend last saw it.
struct Layout {
    table: pg_sys::Oid,
    id_sequence: pg_sys::Oid,
    /// One entry per attribute (dropped ones are `Null`); `None` when the
    /// table has columns this module does not know.
    values: Option<Vec<Value>>,
    /// `None` when an index needs what `ExecOpenIndices` builds afresh.
    indexes: Option<Indexes>,
}

/// The table's indexes and their `IndexInfo`s, partial-index predicates
/// compiled: what `ExecOpenIndices` and the first index insert would build on
/// every click (a tenth of the delivery row's cost). Only plain b-tree
/// indexes: other access methods and expression indexes keep per-query state
/// in the `IndexInfo`.
struct Indexes {
    /// Holds the `IndexInfo`s; deleted with this.
    context: pg_sys::MemoryContext,
    oids: Vec<pg_sys::Oid>,
    /// `oids.len()` pointers, allocated in `context`.
    infos: *mut *mut pg_sys::IndexInfo,
}

impl Drop for Indexes {
    fn drop(&mut self) {
        // SAFETY: the context is ours; nothing points into it once its Layout is gone.
        unsafe { pg_sys::MemoryContextDelete(self.context) };
    }
}

thread_local! {
    /// Forgotten on any relcache invalidation of the table (ALTER TABLE, DROP).
    static LAYOUT: RefCell<Option<Rc<Layout>>> = const { RefCell::new(None) };
    static FORGET_REGISTERED: Cell<bool> = const { Cell::new(false) };
    /// Relcache invalidations seen, of any relation: one arriving while a
    /// layout is read (an index's flags changing) makes that layout stale.
    static INVALIDATIONS: Cell<u64> = const { Cell::new(0) };
}

unsafe extern "C-unwind" fn forget_layout(_: pg_sys::Datum, relid: pg_sys::Oid) {
    INVALIDATIONS.set(INVALIDATIONS.get().wrapping_add(1));
    LAYOUT.with(|l| {
        let mut l = l.borrow_mut();
        if l.as_ref().is_some_and(|known| {
            relid == pg_sys::InvalidOid
                || relid == known.table
                || known
                    .indexes
                    .as_ref()
                    .is_some_and(|i| i.oids.contains(&relid))
        }) {
            *l = None;
        }
    });
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

fn layout() -> Result<Rc<Layout>> {
    if let Some(known) = LAYOUT.with(|l| l.borrow().clone()) {
        return Ok(known);
    }
    if !FORGET_REGISTERED.replace(true) {
        // SAFETY: registering a callback for this backend's life; it only clears a RefCell.
        unsafe {
            pg_sys::CacheRegisterRelcacheCallback(Some(forget_layout), pg_sys::Datum::from(0))
        };
    }
    let seen = INVALIDATIONS.get();
    let fresh = Rc::new(read_layout()?);
    if INVALIDATIONS.get() == seen {
        LAYOUT.with(|l| *l.borrow_mut() = Some(fresh.clone()));
    }
    Ok(fresh)
}

fn read_layout() -> Result<Layout> {
    let table = linkstore::relations()?.deliveries;
    // SAFETY: the relation's descriptor is read while the relation is open and locked.
    unsafe {
        let rel = pg_sys::table_open(table, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let desc = (*rel).rd_att;
        let attrs = (*desc).attrs.as_slice((*desc).natts as usize);
        let mut values = Vec::with_capacity(attrs.len());
        let mut unknown_column = false;
        for att in attrs {
            if att.attisdropped {
                values.push(Value::Null);
                continue;
            }
            let name = std::ffi::CStr::from_ptr(att.attname.data.as_ptr()).to_bytes();
            match COLUMNS.iter().find(|(column, type_oid, _)| {
                name == column.as_bytes() && att.atttypid == *type_oid
            }) {
                Some((_, _, value)) => values.push(*value),
                None => unknown_column = true,
            }
        }
        let indexes = read_indexes(rel);
        pg_sys::table_close(rel, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let complete = !unknown_column && COLUMNS.iter().all(|(_, _, want)| values.contains(want));
        let id_sequence = match values.iter().position(|v| *v == Value::Id) {
            Some(n) if complete => pg_sys::getIdentitySequence(table, n as i16 + 1, true),
            _ => pg_sys::InvalidOid,
        };
        Ok(Layout {
            table,
            id_sequence,
            values: (complete && id_sequence != pg_sys::InvalidOid).then_some(values),
            indexes,
        })
    }
}

/// The open table's indexes, built once; `None` if any is not a plain b-tree.
///
/// # Safety
/// `rel` is open and locked.
unsafe fn read_indexes(rel: pg_sys::Relation) -> Option<Indexes> {
    unsafe {
        let context = pg_sys::AllocSetContextCreateInternal(
            pg_sys::CacheMemoryContext,
            c"pg_linkhooks deliveries indexes".as_ptr(),
            0,
            1024,
            8192,
        );
        let mut indexes = Indexes {
            context,
            oids: oids(pg_sys::RelationGetIndexList(rel)),
            infos: std::ptr::null_mut(),
        };
        let oids = &indexes.oids;
        let infos = PgMemoryContexts::For(context).switch_to(|_| {
            let lock = pg_sys::AccessShareLock as pg_sys::LOCKMODE;
            let infos = pg_sys::palloc(oids.len().max(1) * size_of::<*mut pg_sys::IndexInfo>())
                .cast::<*mut pg_sys::IndexInfo>();
            for (n, oid) in oids.iter().enumerate() {
                let index = pg_sys::index_open(*oid, lock);
                let info = pg_sys::BuildIndexInfo(index);
                let plain_btree = (*(*index).rd_rel).relam == pg_sys::BTREE_AM_OID
                    && (*info).ii_Expressions.is_null()
                    && (*info).ii_ExclusionOps.is_null();
                pg_sys::index_close(index, lock);
                if !plain_btree {
                    return None;
                }
                if !(*info).ii_Predicate.is_null() {
                    // What ExecPrepareQual does, in a context that outlives the query.
                    let predicate = pg_sys::expression_planner((*info).ii_Predicate.cast());
                    (*info).ii_PredicateState =
                        pg_sys::ExecInitQual(predicate.cast(), std::ptr::null_mut());
                }
                *infos.add(n) = info;
            }
            Some(infos)
        })?; // dropping `indexes` deletes the context
        indexes.infos = infos;
        Some(indexes)
    }
}

/// The OIDs of an OID list.
///
/// # Safety
/// `list` is NIL or an OID list.
unsafe fn oids(list: *mut pg_sys::List) -> Vec<pg_sys::Oid> {
    if list.is_null() {
        return Vec::new();
    }
    unsafe {
        let cells = std::slice::from_raw_parts((*list).elements, (*list).length as usize);
        cells.iter().map(|cell| cell.oid_value).collect()
    }
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
    // Locking the table first takes in any change to it or its indexes, so the
    // layout read next is current for as long as the lock is held.
    // SAFETY: opened and locked like a query's result relation; closed below or on error.
    let rel = unsafe { pg_sys::table_open(table, lock) };
    let layout = match layout() {
        Ok(layout) if layout.values.is_some() && layout.table == table => layout,
        other => {
            // SAFETY: the relation opened above; the lock stays to the end of the transaction.
            unsafe { pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE) };
            return other.map(|_| None);
        }
    };
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
        (*estate).es_output_cid = pg_sys::GetCurrentCommandId(true);
        open_indexes(result_rel, layout.indexes.as_ref());
        pg_sys::AfterTriggerBeginQuery();
        let slot = pg_sys::table_slot_create(rel, &mut (*estate).es_tupleTable);
        let now = pg_sys::Datum::from(pg_sys::GetCurrentTransactionStartTimestamp());
        let due = pg_sys::Datum::from(due_stamp());
        let uuid_datum = pgrx::Uuid::from_bytes(*event_uuid.as_bytes()).into_datum();
        let type_datum = event_type.into_datum();
        let pending = "pending".into_datum();
        for row in rows {
            let id = pg_sys::ffi::pg_guard_ffi_boundary(|| {
                c::nextval_internal(layout.id_sequence, false)
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
