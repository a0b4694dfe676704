//! Typed access to a heap tuple's columns by name.

use std::num::NonZeroUsize;

use pgrx::WhoAllocated;
use pgrx::datum::{FromDatum, IntoDatum, UnboxDatum};
use pgrx::heap_tuple::PgHeapTuple;

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
