//! Row triggers: validate what is written, derive columns, and turn link
//! activity into events in the same transaction. Each trigger reads the row,
//! calls the pure rules, and reports the first broken rule as an SQL error.

use pgrx::datum::{AnyNumeric, FromDatum, IntoDatum, TimestampWithTimeZone, UnboxDatum};
use pgrx::heap_tuple::PgHeapTuple;
use pgrx::prelude::*;
use pgrx::{AllocatedByPostgres, AllocatedByRust, JsonB, PgTupleDesc};
use serde_json::{Map, Value};

use crate::error::{Error, OrReport, Result};
use crate::events::{self, unix_now_micros};
use crate::filters::{self, Facts, Filters};
use crate::guc;
use crate::idempotency;
use crate::limits::{self, MAX_JSON_BYTES, MAX_TEXT_CHARS, MAX_UTM_BYTES};
use crate::links::{self, LinkError, MAX_HEADER_LEN, truncate};
use crate::linkstore::{self, Claim, LinkRow};
use crate::partition_check;
use crate::payload::{
    self, CampaignData, CampaignPayload, Click, ConversionData, ConversionPayload, EventType,
    IpMode, LinkChangeData, LinkExpiredData, LinkPayload,
};
use crate::plans::{self, INT8, TEXT};
use crate::resolve;
use crate::rules;
use crate::shared;
use crate::statements;
use crate::signing::SigningKey;
use crate::target;
use crate::tuple::{
    Edits, SlotColumns, Xid8, attnum, col, has_column, null_in_not_null_column, text_array,
};
use crate::useragent;

type Row<'a> = PgHeapTuple<'a, AllocatedByRust>;

/// Microseconds between the Unix and Postgres epochs.
pub const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

fn set<T: IntoDatum>(row: &mut Row<'_>, name: &str, value: T) -> Result<()> {
    row.set_by_index(attnum(row, name)?, value)
        .map_err(|e| Error::Column(format!("{name}: {e}")))
}

/// Refuses infinity in a timestamp column: every epoch computed from it
/// downstream (event bodies, the worker's and maintenance's queries) would
/// overflow. `none` says what NULL means there instead.
fn check_finite(row: &Row<'_>, name: &'static str, none: &str) -> Result<()> {
    match col::<TimestampWithTimeZone>(row, name)? {
        Some(at) if !at.is_finite() => Err(Error::invalid(
            name,
            format!("must be a time, not infinity ({none})"),
        )),
        _ => Ok(()),
    }
}

fn unix_micros(ts: TimestampWithTimeZone) -> i64 {
    ts.into_inner() + PG_EPOCH_OFFSET_MICROS
}

fn transaction_now() -> TimestampWithTimeZone {
    // SAFETY: plain read of the transaction start time.
    let now = unsafe { pg_sys::GetCurrentTransactionStartTimestamp() };
    TimestampWithTimeZone::try_from(now).expect("the transaction start time is a valid timestamp")
}

fn new_event_id() -> String {
    events::new_event_id().to_string()
}

/// A uuid column's canonical text (pgrx's `Display` formats it byte by byte).
fn uuid_text(id: &pgrx::Uuid) -> String {
    uuid::Uuid::from_bytes(*id.as_bytes())
        .hyphenated()
        .to_string()
}

/// `linkhooks.restore` is on: a restore by the extension's owner (who may not
/// set session_replication_role) stores rows as dumped: no checks, no
/// derived columns, no events. The row a trigger then lets through.
fn restored_row<'a>(trigger: &'a PgTrigger<'a>) -> Option<Option<Row<'a>>> {
    guc::RESTORE
        .get()
        .then(|| trigger.new().or_else(|| trigger.old()).map(|r| r.into_owned()))
}

fn new_row<'a>(trigger: &'a PgTrigger<'a>) -> Result<Row<'a>> {
    trigger
        .new()
        .map(|r| r.into_owned())
        .ok_or_else(|| Error::Column("NEW".into()))
}

fn old_row<'a>(trigger: &'a PgTrigger<'a>) -> Result<Row<'a>> {
    trigger
        .old()
        .map(|r| r.into_owned())
        .ok_or_else(|| Error::Column("OLD".into()))
}

/// The fields whose values differ between OLD and NEW (typed comparison).
/// Runs `f` with pg_catalog alone on the search path for every name its
/// statements look up: what `SET search_path = pg_catalog, pg_temp` gives a
/// trigger function (minus pg_temp, which it never needs), without setting and
/// restoring the setting and recomputing the session's path afterwards, which
/// costs about 7k instructions per row. For the clicks trigger, the hot path;
/// the other trigger functions pin it with SET (sql/finalize.sql).
pub(super) fn with_catalog_search_path<T>(f: impl FnOnce() -> T) -> T {
    // SAFETY: PushOverrideSearchPath copies the list into its own memory. The pop
    // below runs at the same transaction nesting level: `f` leaves no
    // subtransaction open. If `f` raises an error, the (sub)transaction abort
    // pops the entry instead.
    unsafe {
        let mut path = pg_sys::OverrideSearchPath {
            schemas: pg_sys::lappend_oid(
                std::ptr::null_mut(),
                pg_sys::Oid::from(pg_sys::PG_CATALOG_NAMESPACE),
            ),
            addCatalog: false,
            addTemp: false,
            generation: 0,
        };
        pg_sys::PushOverrideSearchPath(&mut path);
    }
    let result = f();
    // SAFETY: pops the entry pushed above (see there).
    unsafe { pg_sys::PopOverrideSearchPath() };
    result
}

/// One field's value as the payload shows it (timestamps formatted like the envelope's).
pub(super) fn field_value(row: &Row<'_>, f: &str) -> Result<Value> {
    Ok(match f {
        "tags" => Value::from(text_array(row, f)?.unwrap_or_default()),
        "utm" | "metadata" => col::<JsonB>(row, f)?.map_or(Value::Null, |j| j.0),
        "expires_at" | "ends_at" | "completed_at" => col::<TimestampWithTimeZone>(row, f)?
            .map_or(Value::Null, |t| {
                payload::format_timestamp(unix_micros(t)).into()
            }),
        "max_clicks" | "click_goal" => col::<i64>(row, f)?.map_or(Value::Null, Value::from),
        "disabled" => col::<bool>(row, f)?.map_or(Value::Null, Value::from),
        _ => col::<String>(row, f)?.map_or(Value::Null, Value::from),
    })
}

pub(super) fn changed_fields(
    old: &Row<'_>,
    new: &Row<'_>,
    fields: &[&'static str],
) -> Result<Vec<&'static str>> {
    fn differs<T>(old: &Row<'_>, new: &Row<'_>, f: &str) -> Result<bool>
    where
        T: FromDatum + IntoDatum + for<'t> UnboxDatum<As<'t> = T> + PartialEq,
    {
        Ok(col::<T>(old, f)? != col::<T>(new, f)?)
    }
    let mut changed = Vec::new();
    for &f in fields {
        let different = match f {
            "tags" => text_array(old, f)? != text_array(new, f)?,
            "utm" | "metadata" => {
                col::<JsonB>(old, f)?.map(|j| j.0) != col::<JsonB>(new, f)?.map(|j| j.0)
            }
            "expires_at" | "ends_at" | "completed_at" => {
                differs::<TimestampWithTimeZone>(old, new, f)?
            }
            "max_clicks" | "click_goal" => differs::<i64>(old, new, f)?,
            "disabled" => differs::<bool>(old, new, f)?,
            _ => differs::<String>(old, new, f)?,
        };
        if different {
            changed.push(f);
        }
    }
    Ok(changed)
}

mod campaign;
mod click;
mod conversion;
mod link;
mod rule;
mod subscription;

pub use campaign::emit_campaign_completed;
pub use click::check_request;
pub use link::{emit_link_expired, with_redirect_url};
