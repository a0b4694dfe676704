//! Delivery rows written straight into `linkhooks.deliveries`, without SPI.
//!
//! A saved SPI plan still pays, per click, for plan revalidation, a fresh
//! snapshot, a command-counter bump and a whole executor start-up and
//! shutdown. This writes the row through Postgres's own single-relation insert
//! (`ExecSimpleRelationInsert`, what logical replication applies rows with):
//! NOT NULL checks, every index entry (partial predicates included) and any
//! row triggers a DBA put on the table all still happen.
//!
//! Only the table's own columns are known here. If someone added a column
//! (with a default this code would not apply) or changed a type, `insert`
//! returns `None` and the caller falls back to a plain SQL INSERT.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use pgrx::prelude::*;
use pgrx::{FromDatum, IntoDatum, PgBox};

use crate::error::{Error, Result};
use crate::linkstore;

mod c {
    use pgrx::pg_sys::{Datum, FunctionCallInfo};
    unsafe extern "C-unwind" {
        /// The SQL function nextval(regclass), called through DirectFunctionCall1Coll
        /// (pgrx binds only a Rust wrapper, which cannot be passed as a PGFunction).
        pub fn nextval_oid(fcinfo: FunctionCallInfo) -> Datum;
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
    ("next_attempt_at", pg_sys::TIMESTAMPTZOID, Value::Now),
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
}

thread_local! {
    /// Forgotten on any relcache invalidation of the table (ALTER TABLE, DROP).
    static LAYOUT: RefCell<Option<Rc<Layout>>> = const { RefCell::new(None) };
    static FORGET_REGISTERED: Cell<bool> = const { Cell::new(false) };
}

unsafe extern "C-unwind" fn forget_layout(_: pg_sys::Datum, relid: pg_sys::Oid) {
    LAYOUT.with(|l| {
        let mut l = l.borrow_mut();
        if l.as_ref()
            .is_some_and(|known| relid == pg_sys::InvalidOid || relid == known.table)
        {
            *l = None;
        }
    });
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
    let fresh = Rc::new(read_layout()?);
    LAYOUT.with(|l| *l.borrow_mut() = Some(fresh.clone()));
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
        })
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
    let layout = layout()?;
    let Some(values) = &layout.values else {
        return Ok(None);
    };
    let event_uuid = uuid::Uuid::parse_str(event_id)
        .map_err(|e| Error::invalid("event_id", format!("must be a UUID ({e})")))?;
    let mut ids = Vec::with_capacity(rows.len());
    // SAFETY: the executor state, slot and relation are set up, used and torn
    // down here, in the current memory context, as execReplication.c's callers
    // do; every datum matches its attribute's type (checked in `read_layout`).
    unsafe {
        let lock = pg_sys::RowExclusiveLock as pg_sys::LOCKMODE;
        let rel = pg_sys::table_open(layout.table, lock);
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
        pg_sys::ExecOpenIndices(result_rel, false);
        pg_sys::AfterTriggerBeginQuery();
        let slot = pg_sys::table_slot_create(rel, &mut (*estate).es_tupleTable);
        let now = pg_sys::Datum::from(pg_sys::GetCurrentTransactionStartTimestamp());
        let uuid_datum = pgrx::Uuid::from_bytes(*event_uuid.as_bytes()).into_datum();
        let type_datum = event_type.into_datum();
        let pending = "pending".into_datum();
        for row in rows {
            let id = i64::from_datum(
                pg_sys::DirectFunctionCall1Coll(
                    Some(c::nextval_oid),
                    pg_sys::InvalidOid,
                    layout.id_sequence.into(),
                ),
                false,
            )
            .unwrap_or_default();
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
        pg_sys::ExecCloseIndices(result_rel);
        pg_sys::ExecResetTupleTable((*estate).es_tupleTable, false);
        pg_sys::FreeExecutorState(estate);
        pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
    }
    Ok(Some(ids))
}
