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
    row.attributes()
        .find(|(_, att)| is_named(att, name))
        .map(|(n, _)| n)
        .ok_or_else(|| no_such_column(name))
}

fn is_named(att: &pg_sys::FormData_pg_attribute, name: &str) -> bool {
    let (stored, wanted) = (&att.attname.data, name.as_bytes());
    !att.attisdropped
        && stored.len() > wanted.len()
        && stored[wanted.len()] == 0
        && stored.iter().zip(wanted).all(|(a, b)| *a as u8 == *b)
}

fn no_such_column(name: &str) -> Error {
    Error::Column(format!("{name}: no such column"))
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
    Ok(col::<pgrx::Array<&str>>(row, name)?.map(strings))
}

/// A text[] value's elements as strings, NULL elements dropped.
fn strings(array: pgrx::Array<&str>) -> Vec<String> {
    array.iter().flatten().map(str::to_string).collect()
}

/// The columns of the tuple in a slot, deformed once and read by name. A
/// column's type must be exactly the Rust type's: this skips pgrx's per-call
/// coercion checks and tuple walks, a quarter of the extension's CPU on a
/// cold-cache `resolve`.
pub struct SlotColumns {
    slot: *mut pg_sys::TupleTableSlot,
}

impl SlotColumns {
    /// # Safety
    /// `slot` holds a tuple and is neither changed nor dropped while this is used.
    pub unsafe fn new(slot: *mut pg_sys::TupleTableSlot) -> Self {
        unsafe {
            let natts = (*(*slot).tts_tupleDescriptor).natts;
            if i32::from((*slot).tts_nvalid) < natts {
                pg_sys::slot_getsomeattrs_int(slot, natts);
            }
        }
        SlotColumns { slot }
    }

    /// A column's position (0-based) and attribute.
    fn attribute(&self, name: &str) -> Result<(usize, &pg_sys::FormData_pg_attribute)> {
        // SAFETY: `new`'s contract keeps the slot and its descriptor alive.
        let attrs = unsafe {
            let desc = (*self.slot).tts_tupleDescriptor;
            (*desc).attrs.as_slice((*desc).natts as usize)
        };
        attrs
            .iter()
            .enumerate()
            .find(|(_, att)| is_named(att, name))
            .ok_or_else(|| no_such_column(name))
    }

    /// A column's value and null flag, as deformed in the slot.
    fn datum(&self, n: usize) -> (pg_sys::Datum, bool) {
        // SAFETY: `new` deformed every attribute, and `n` is one of them.
        unsafe {
            (
                *(*self.slot).tts_values.add(n),
                *(*self.slot).tts_isnull.add(n),
            )
        }
    }

    pub fn get<T: FromDatum + IntoDatum>(&self, name: &str) -> Result<Option<T>> {
        let (n, att) = self.attribute(name)?;
        if att.atttypid != T::type_oid() {
            return Err(Error::Column(format!(
                "{name}: its type (oid {}) is not the expected one (oid {})",
                att.atttypid.to_u32(),
                T::type_oid().to_u32()
            )));
        }
        let (datum, is_null) = self.datum(n);
        // SAFETY: the datum is of type T (checked above) and lives as long as the slot.
        Ok(unsafe { T::from_polymorphic_datum(datum, is_null, att.atttypid) })
    }

    /// A column of any type in its text form (for types pgrx cannot unbox, like inet).
    pub fn text(&self, name: &str) -> Result<Option<String>> {
        let (n, att) = self.attribute(name)?;
        let (datum, is_null) = self.datum(n);
        if is_null {
            return Ok(None);
        }
        // SAFETY: the type's own output function reads a datum of that type.
        let text = unsafe {
            let (mut output, mut varlena) = (pg_sys::Oid::INVALID, false);
            pg_sys::getTypeOutputInfo(att.atttypid, &mut output, &mut varlena);
            std::ffi::CStr::from_ptr(pg_sys::OidOutputFunctionCall(output, datum))
        };
        Ok(Some(text.to_string_lossy().into_owned()))
    }

    /// A text[] column as strings (NULL elements dropped).
    pub fn text_array(&self, name: &str) -> Result<Option<Vec<String>>> {
        Ok(self.get::<pgrx::Array<&str>>(name)?.map(strings))
    }
}

/// Column changes to one row, applied in one go: each single change re-forms
/// the whole tuple, and a click fills up to four columns.
#[derive(Default)]
pub struct Edits {
    columns: Vec<(NonZeroUsize, Option<pg_sys::Datum>)>,
}

impl Edits {
    /// Sets column `name` of the row that `columns` reads.
    pub fn set<T: IntoDatum>(&mut self, columns: &SlotColumns, name: &str, value: T) -> Result<()> {
        let (n, att) = columns.attribute(name)?;
        if !T::is_compatible_with(att.atttypid) {
            return Err(Error::Column(format!(
                "{name}: a {} cannot be stored in it",
                std::any::type_name::<T>()
            )));
        }
        let attnum = NonZeroUsize::new(n + 1).expect("attribute numbers start at 1");
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
