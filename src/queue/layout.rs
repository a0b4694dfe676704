//! The relations delivery rows are written into (the table, or each of its
//! partitions): which column gets what, their indexes' insert state and a
//! partition's constraint, built once per backend (see the parent module).

use pgrx::PgMemoryContexts;
use pgrx::prelude::*;
use std::ffi::CStr;

use crate::partition_check::{self, Compiled};

/// What goes into one attribute of a new delivery row.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Value {
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

/// A relation rows are written into (the table, or one of its partitions).
pub(super) struct Layout {
    pub(super) table: pg_sys::Oid,
    /// One entry per attribute (dropped ones are `Null`); `None` when the
    /// table has columns this module does not know.
    pub(super) values: Option<Vec<Value>>,
    /// `None` when an index needs what `ExecOpenIndices` builds afresh.
    pub(super) indexes: Option<Indexes>,
    /// A partition's constraint, compiled.
    pub(super) check: Option<Compiled>,
}

/// The table's indexes and their `IndexInfo`s, partial-index predicates
/// compiled: what `ExecOpenIndices` and the first index insert would build on
/// every click (a tenth of the delivery row's cost). Only plain b-tree
/// indexes: other access methods and expression indexes keep per-query state
/// in the `IndexInfo`.
pub(super) struct Indexes {
    /// Holds the `IndexInfo`s; deleted with this.
    context: pg_sys::MemoryContext,
    pub(super) oids: Vec<pg_sys::Oid>,
    /// `oids.len()` pointers, allocated in `context`.
    pub(super) infos: *mut *mut pg_sys::IndexInfo,
}

impl Drop for Indexes {
    fn drop(&mut self) {
        // SAFETY: the context is ours; nothing points into it once its Layout is gone.
        unsafe { pg_sys::MemoryContextDelete(self.context) };
    }
}

/// # Safety
/// `rel` is open and locked.
pub(super) unsafe fn read_layout(rel: pg_sys::Relation) -> Layout {
    unsafe {
        let desc = (*rel).rd_att;
        let attrs = (*desc).attrs.as_slice((*desc).natts as usize);
        let mut values = Vec::with_capacity(attrs.len());
        let mut unknown_column = false;
        for att in attrs {
            if att.attisdropped {
                values.push(Value::Null);
                continue;
            }
            let name = CStr::from_ptr(att.attname.data.as_ptr()).to_bytes();
            match COLUMNS.iter().find(|(column, type_oid, _)| {
                name == column.as_bytes() && att.atttypid == *type_oid
            }) {
                Some((_, _, value)) => values.push(*value),
                None => unknown_column = true,
            }
        }
        let complete = !unknown_column && COLUMNS.iter().all(|(_, _, want)| values.contains(want));
        let plain_table = (*(*rel).rd_rel).relkind == pg_sys::RELKIND_RELATION as std::ffi::c_char;
        Layout {
            table: (*rel).rd_id,
            values: (complete && plain_table && inserts_simply(rel)).then_some(values),
            indexes: read_indexes(rel),
            check: (*(*rel).rd_rel)
                .relispartition
                .then(|| partition_check::compile(rel)),
        }
    }
}

/// Whether a SQL INSERT into `rel` does nothing beyond what
/// `ExecSimpleRelationInsert` does: no rule, no statement trigger or transition
/// table (it fires row triggers only), and no BEFORE ROW trigger, which could
/// skip the row or change its id behind the ids `insert` returns.
///
/// # Safety
/// `rel` is open and locked.
pub(super) unsafe fn inserts_simply(rel: pg_sys::Relation) -> bool {
    unsafe {
        if (*(*rel).rd_rel).relhasrules {
            return false;
        }
        let triggers = (*rel).trigdesc;
        triggers.is_null()
            || !((*triggers).trig_insert_before_row
                || (*triggers).trig_insert_instead_row
                || (*triggers).trig_insert_before_statement
                || (*triggers).trig_insert_after_statement
                || (*triggers).trig_insert_new_table)
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
