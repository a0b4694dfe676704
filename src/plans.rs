//! Saved SPI plans, one per statement text, kept for the backend's life so
//! hot-path statements are parsed and planned once.

use std::cell::RefCell;
use std::collections::HashMap;

use pgrx::datum::{DatumWithOid, FromDatum, IntoDatum};
use pgrx::pg_sys::PgOid;
use pgrx::spi::{OwnedPreparedStatement, SpiClient, SpiTupleTable};

use crate::error::Result;

thread_local! {
    // Keyed by the statement's address (statement texts are 'static) and whether it
    // runs as mutating: a mutating plan takes a fresh snapshot each time, a read-only
    // one uses the caller's.
    static PLANS: RefCell<HashMap<(usize, bool), OwnedPreparedStatement>> = RefCell::new(HashMap::new());
}

fn take(
    client: &SpiClient<'_>,
    sql: &'static str,
    types: &[PgOid],
    mutating: bool,
) -> Result<OwnedPreparedStatement> {
    match PLANS.with(|p| p.borrow_mut().remove(&(sql.as_ptr() as usize, mutating))) {
        Some(plan) => Ok(plan),
        None if mutating => Ok(client.prepare_mut(sql, types)?.keep()),
        None => Ok(client.prepare(sql, types)?.keep()),
    }
}

fn put_back(sql: &'static str, mutating: bool, plan: OwnedPreparedStatement) {
    PLANS.with(|p| {
        p.borrow_mut()
            .insert((sql.as_ptr() as usize, mutating), plan)
    });
}

/// Runs a read-only statement with a saved plan.
pub fn query<'c>(
    client: &SpiClient<'c>,
    sql: &'static str,
    types: &[PgOid],
    args: &[DatumWithOid<'_>],
) -> Result<SpiTupleTable<'c>> {
    let plan = take(client, sql, types, false)?;
    let result = client.select(&plan, None, args);
    put_back(sql, false, plan);
    Ok(result?)
}

/// Runs a data-modifying statement with a saved plan.
pub fn execute<'c>(
    client: &mut SpiClient<'c>,
    sql: &'static str,
    types: &[PgOid],
    args: &[DatumWithOid<'_>],
) -> Result<SpiTupleTable<'c>> {
    let plan = take(client, sql, types, true)?;
    let result = client.update(&plan, None, args);
    put_back(sql, true, plan);
    Ok(result?)
}

/// The first column of the first row, or None when there is no row (pgrx's own
/// `get_one` reports "SpiTupleTable positioned before the start or after the end" then).
pub fn first<T: FromDatum + IntoDatum>(rows: SpiTupleTable<'_>) -> Result<Option<T>> {
    match rows.into_iter().next() {
        Some(row) => Ok(row.get(1)?),
        None => Ok(None),
    }
}

// Argument types, named once.
pub const TEXT: PgOid = PgOid::BuiltIn(pgrx::pg_sys::BuiltinOid::TEXTOID);
pub const INT4: PgOid = PgOid::BuiltIn(pgrx::pg_sys::BuiltinOid::INT4OID);
pub const INT8: PgOid = PgOid::BuiltIn(pgrx::pg_sys::BuiltinOid::INT8OID);
pub const BOOL: PgOid = PgOid::BuiltIn(pgrx::pg_sys::BuiltinOid::BOOLOID);
pub const UUID: PgOid = PgOid::BuiltIn(pgrx::pg_sys::BuiltinOid::UUIDOID);
pub const INTERVAL: PgOid = PgOid::BuiltIn(pgrx::pg_sys::BuiltinOid::INTERVALOID);
pub const TIMESTAMPTZ: PgOid = PgOid::BuiltIn(pgrx::pg_sys::BuiltinOid::TIMESTAMPTZOID);
pub const FLOAT8: PgOid = PgOid::BuiltIn(pgrx::pg_sys::BuiltinOid::FLOAT8OID);
pub const INT8_ARRAY: PgOid = PgOid::BuiltIn(pgrx::pg_sys::BuiltinOid::INT8ARRAYOID);
pub const INT4_ARRAY: PgOid = PgOid::BuiltIn(pgrx::pg_sys::BuiltinOid::INT4ARRAYOID);
pub const TEXT_ARRAY: PgOid = PgOid::BuiltIn(pgrx::pg_sys::BuiltinOid::TEXTARRAYOID);
pub const TIMESTAMPTZ_ARRAY: PgOid = PgOid::BuiltIn(pgrx::pg_sys::BuiltinOid::TIMESTAMPTZARRAYOID);
pub const FLOAT8_ARRAY: PgOid = PgOid::BuiltIn(pgrx::pg_sys::BuiltinOid::FLOAT8ARRAYOID);
