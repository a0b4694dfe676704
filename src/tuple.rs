//! Typed access to a heap tuple's columns by name, and batched changes to them.

use std::cell::Cell;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::num::NonZeroUsize;

use pgrx::datum::{FromDatum, IntoDatum, UnboxDatum};
use pgrx::heap_tuple::PgHeapTuple;
use pgrx::varlena::{vardata_any, varsize_any_exhdr};
use pgrx::{WhoAllocated, pg_sys};

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

/// Whether the row has this column (one added in a later schema than the installed one).
pub fn has_column(row: &PgHeapTuple<'_, impl WhoAllocated>, name: &str) -> bool {
    row.attributes().any(|(_, att)| is_named(att, name))
}

/// An `xid8` value (a full transaction id), which pgrx has no type for.
pub struct Xid8(u64);

impl Xid8 {
    /// This transaction's id: assigned now if it has none yet, as storing a
    /// row would assign it anyway.
    pub fn of_this_transaction() -> Self {
        // SAFETY: plain call, valid in any transaction.
        Self(unsafe { pg_sys::GetTopFullTransactionId() }.value)
    }
}

impl IntoDatum for Xid8 {
    fn into_datum(self) -> Option<pg_sys::Datum> {
        // Passed by value, as FullTransactionIdGetDatum does.
        Some(pg_sys::Datum::from(self.0))
    }

    fn type_oid() -> pg_sys::Oid {
        pg_sys::XID8OID
    }
}

/// A column's value, typed.
pub fn col<'t, T>(row: &'t PgHeapTuple<'_, impl WhoAllocated>, name: &str) -> Result<Option<T>>
where
    T: FromDatum + IntoDatum + UnboxDatum<As<'t> = T> + 't,
{
    row.get_by_index(attnum(row, name)?)
        .map_err(|e| Error::Column(format!("{name}: {e}")))
}

/// The first NOT NULL column that holds NULL. Checked before Postgres does: its
/// own error prints the whole row ("Failing row contains ..."), secrets included.
///
/// # Safety
/// `tuple` is a valid heap tuple of a relation whose descriptor is `desc`.
pub unsafe fn null_in_not_null_column(
    tuple: pg_sys::HeapTuple,
    desc: pg_sys::TupleDesc,
) -> Option<String> {
    // SAFETY: the caller's contract; the descriptor outlives this call.
    let attrs = unsafe { pgrx::PgTupleDesc::from_pg_unchecked(desc) };
    attrs
        .iter()
        .find(|att| {
            att.attnotnull
                && !att.attisdropped
                // SAFETY: the attribute number comes from the tuple's own descriptor.
                && unsafe { pg_sys::heap_attisnull(tuple, att.attnum as i32, desc) }
        })
        .map(|att| att.name().to_string())
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

/// The address in an inet value's bytes: family (`PGSQL_AF_INET` 2 or
/// `PGSQL_AF_INET6` 3, from utils/inet.h), netmask bits, then 4 or 16 address bytes.
fn inet_address(bytes: &[u8]) -> Option<IpAddr> {
    match bytes {
        [2, _, a @ ..] => Some(IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(a).ok()?))),
        [3, _, a @ ..] => Some(IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(a).ok()?))),
        _ => None,
    }
}

/// The columns of the tuple in a slot, deformed once and read by name. A
/// column's type must be exactly the Rust type's: this skips pgrx's per-call
/// coercion checks and tuple walks, a quarter of the extension's CPU on a
/// cold-cache `resolve`.
pub struct SlotColumns {
    slot: *mut pg_sys::TupleTableSlot,
    /// Where the next name lookup starts: just after the last column found.
    next: Cell<usize>,
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
        SlotColumns {
            slot,
            next: Cell::new(0),
        }
    }

    /// A column's position (0-based) and attribute.
    fn attribute(&self, name: &str) -> Result<(usize, &pg_sys::FormData_pg_attribute)> {
        // SAFETY: `new`'s contract keeps the slot and its descriptor alive.
        let attrs = unsafe {
            let desc = self.descriptor();
            (*desc).attrs.as_slice((*desc).natts as usize)
        };
        // Callers mostly read columns in table order, so each lookup starts where the
        // last one ended and usually matches at once; a full scan cost ~300 instructions.
        let start = self.next.get().min(attrs.len());
        let n = (start..attrs.len())
            .chain(0..start)
            .find(|&n| is_named(&attrs[n], name))
            .ok_or_else(|| no_such_column(name))?;
        self.next.set(n + 1);
        Ok((n, &attrs[n]))
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

    fn descriptor(&self) -> pg_sys::TupleDesc {
        // SAFETY: `new`'s contract keeps the slot and its descriptor alive.
        unsafe { (*self.slot).tts_tupleDescriptor }
    }

    /// Copies of every column's value and null flag.
    fn deformed(&self) -> (Vec<pg_sys::Datum>, Vec<bool>) {
        // SAFETY: `new` deformed all `natts` attributes into these arrays.
        unsafe {
            let natts = (*self.descriptor()).natts as usize;
            (
                std::slice::from_raw_parts((*self.slot).tts_values, natts).to_vec(),
                std::slice::from_raw_parts((*self.slot).tts_isnull, natts).to_vec(),
            )
        }
    }

    /// A column's value and null flag, once its type is checked to be `oid`.
    fn typed(&self, name: &str, oid: pg_sys::Oid) -> Result<(pg_sys::Datum, bool)> {
        let (n, att) = self.attribute(name)?;
        if att.atttypid != oid {
            return Err(Error::Column(format!(
                "{name}: its type (oid {}) is not the expected one (oid {})",
                att.atttypid.to_u32(),
                oid.to_u32()
            )));
        }
        Ok(self.datum(n))
    }

    pub fn get<T: FromDatum + IntoDatum>(&self, name: &str) -> Result<Option<T>> {
        let oid = T::type_oid();
        let (datum, is_null) = self.typed(name, oid)?;
        // SAFETY: the datum is of type T (checked) and lives as long as the slot.
        Ok(unsafe { T::from_polymorphic_datum(datum, is_null, oid) })
    }

    /// An inet column's address, its netmask dropped. Read from the datum: the
    /// output function and a parse back cost ten times as much.
    pub fn ip(&self, name: &str) -> Result<Option<IpAddr>> {
        let (datum, is_null) = self.typed(name, pg_sys::INETOID)?;
        if is_null {
            return Ok(None);
        }
        // SAFETY: the datum is an inet varlena (checked) that lives as long as the slot;
        // detoasting only copies it if it is compressed or out of line.
        let bytes = unsafe {
            let inet = pg_sys::pg_detoast_datum_packed(datum.cast_mut_ptr());
            std::slice::from_raw_parts(vardata_any(inet).cast::<u8>(), varsize_any_exhdr(inet))
        };
        inet_address(bytes)
            .map(Some)
            .ok_or_else(|| Error::Column(format!("{name}: malformed inet value")))
    }

    /// A text[] column as strings (NULL elements dropped). Checked against text[]'s
    /// oid directly: pgrx finds an array type's oid with a catalog lookup.
    pub fn text_array(&self, name: &str) -> Result<Option<Vec<String>>> {
        let (datum, is_null) = self.typed(name, pg_sys::TEXTARRAYOID)?;
        // SAFETY: the datum is a text[] (checked) and lives as long as the slot.
        let array = unsafe {
            pgrx::Array::<&str>::from_polymorphic_datum(datum, is_null, pg_sys::TEXTARRAYOID)
        };
        Ok(array.map(strings))
    }
}

/// Column changes to one row, applied in one go: each single change re-forms
/// the whole tuple, and a click fills up to four columns.
#[derive(Default)]
pub struct Edits {
    columns: Vec<(usize, Option<pg_sys::Datum>)>,
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
        self.columns.push((n, value.into_datum()));
        Ok(())
    }

    /// Sets an xid8 column (pgrx has no Rust type for it) to a full transaction id.
    /// Does nothing when the row has no such column (a schema before it was added).
    pub fn set_xid8(&mut self, columns: &SlotColumns, name: &str, value: Xid8) -> Result<()> {
        let Ok((n, att)) = columns.attribute(name) else {
            return Ok(());
        };
        if att.atttypid != pg_sys::XID8OID {
            return Err(Error::Column(format!("{name}: not an xid8 column")));
        }
        self.columns.push((n, value.into_datum()));
        Ok(())
    }

    /// The row with every change made: `original` itself when there is none,
    /// else a new tuple formed from the slot's already deformed values.
    ///
    /// # Safety
    /// `original` is the tuple in the slot that `columns` reads.
    pub unsafe fn apply(
        self,
        columns: &SlotColumns,
        original: pg_sys::HeapTuple,
    ) -> pg_sys::HeapTuple {
        if self.columns.is_empty() {
            return original;
        }
        let (mut values, mut nulls) = columns.deformed();
        for (n, value) in self.columns {
            values[n] = value.unwrap_or(pg_sys::Datum::from(0));
            nulls[n] = value.is_none();
        }
        // SAFETY: every position came from the slot's descriptor and every value was
        // type-checked against it in `set`. Like heap_modify_tuple, the new tuple keeps
        // the original's identity fields and is palloc'd in the current context.
        unsafe {
            let tuple = pg_sys::heap_form_tuple(
                columns.descriptor(),
                values.as_mut_ptr(),
                nulls.as_mut_ptr(),
            );
            (*(*tuple).t_data).t_ctid = (*(*original).t_data).t_ctid;
            (*tuple).t_self = (*original).t_self;
            (*tuple).t_tableOid = (*original).t_tableOid;
            tuple
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inet_bytes_give_the_address() {
        assert_eq!(
            inet_address(&[2, 32, 203, 0, 113, 7]),
            Some("203.0.113.7".parse().unwrap())
        );
        let v6: Ipv6Addr = "2001:db8::1".parse().unwrap();
        let mut bytes = vec![3, 64];
        bytes.extend(v6.octets());
        assert_eq!(inet_address(&bytes), Some(IpAddr::V6(v6)));
        assert_eq!(inet_address(&[2, 32, 1, 2, 3]), None);
        assert_eq!(inet_address(&[9, 0]), None);
    }
}
