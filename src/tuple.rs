//! Typed access to a heap tuple's columns by name, and batched changes to them.

use std::num::NonZeroUsize;

use pgrx::datum::{FromDatum, IntoDatum, UnboxDatum};
use pgrx::heap_tuple::PgHeapTuple;
use pgrx::{AllocatedByRust, PgTupleDesc, WhoAllocated, pg_sys};

use crate::error::{Error, Result};

/// A column's attribute number. Names are compared as bytes: pgrx's by-name
/// access converts every attribute name to UTF-8 on each call, which was a
/// tenth of a click's instructions.
pub fn attnum(row: &PgHeapTuple<'_, impl WhoAllocated>, name: &str) -> Result<NonZeroUsize> {
    let wanted = name.as_bytes();
    row.attributes()
        .find(|(_, att)| {
            let stored = &att.attname.data;
            !att.attisdropped
                && stored.len() > wanted.len()
                && stored[wanted.len()] == 0
                && stored.iter().zip(wanted).all(|(a, b)| *a as u8 == *b)
        })
        .map(|(n, _)| n)
        .ok_or_else(|| Error::Column(format!("{name}: no such column")))
}

/// A column's value, typed.
pub fn col<'t, T>(row: &'t PgHeapTuple<'_, impl WhoAllocated>, name: &str) -> Result<Option<T>>
where
    T: FromDatum + IntoDatum + UnboxDatum<As<'t> = T> + 't,
{
    row.get_by_index(attnum(row, name)?)
        .map_err(|e| Error::Column(format!("{name}: {e}")))
}

/// A text[] column as strings (NULL elements dropped).
pub fn text_array(
    row: &PgHeapTuple<'_, impl WhoAllocated>,
    name: &str,
) -> Result<Option<Vec<String>>> {
    Ok(col::<pgrx::Array<&str>>(row, name)?
        .map(|a| a.iter().flatten().map(str::to_string).collect()))
}

/// Column changes to one row, applied in one go: each single change re-forms
/// the whole tuple, and a click fills up to four columns.
#[derive(Default)]
pub struct Edits {
    columns: Vec<(NonZeroUsize, Option<pg_sys::Datum>)>,
}

impl Edits {
    pub fn set<T: IntoDatum>(
        &mut self,
        row: &PgHeapTuple<'_, impl WhoAllocated>,
        name: &str,
        value: T,
    ) -> Result<()> {
        let attnum = attnum(row, name)?;
        let type_oid = row
            .get_attribute_by_index(attnum)
            .map(|att| att.atttypid)
            .ok_or_else(|| Error::Column(format!("{name}: no such column")))?;
        if !T::is_compatible_with(type_oid) {
            return Err(Error::Column(format!(
                "{name}: a {} cannot be stored in it",
                std::any::type_name::<T>()
            )));
        }
        self.columns.push((attnum, value.into_datum()));
        Ok(())
    }

    /// The row with every change made. `tupdesc` must describe `row`.
    pub fn apply<'a>(
        self,
        row: PgHeapTuple<'a, AllocatedByRust>,
        tupdesc: pg_sys::TupleDesc,
    ) -> PgHeapTuple<'a, AllocatedByRust> {
        if self.columns.is_empty() {
            return row;
        }
        let mut numbers: Vec<i32> = self.columns.iter().map(|(n, _)| n.get() as i32).collect();
        let mut values: Vec<pg_sys::Datum> = self
            .columns
            .iter()
            .map(|(_, v)| v.unwrap_or(pg_sys::Datum::from(0)))
            .collect();
        let mut nulls: Vec<bool> = self.columns.iter().map(|(_, v)| v.is_none()).collect();
        // SAFETY: the caller passes the row's own descriptor; every attribute number came from
        // it and every value was type-checked against it in `set`. The new tuple is palloc'd in
        // the current context, like the one pgrx's own setters make.
        unsafe {
            let modified = pg_sys::heap_modify_tuple_by_cols(
                row.into_pg(),
                tupdesc,
                numbers.len() as i32,
                numbers.as_mut_ptr(),
                values.as_mut_ptr(),
                nulls.as_mut_ptr(),
            );
            PgHeapTuple::from_heap_tuple(PgTupleDesc::from_pg_unchecked(tupdesc), modified)
                .into_owned()
        }
    }
}
