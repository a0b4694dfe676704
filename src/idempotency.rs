//! Ingestion idempotency: a caller that retries after a timeout passes the
//! same key (`record_click(…, idempotency_key)`, `conversions.external_id`)
//! and gets the first call's result instead of a second click or conversion.
//! Calls with one key are serialized by a transaction-level lock on the key,
//! so the second sees the first's row once it commits; a unique index backs it.

use pgrx::prelude::*;

use crate::error::{Error, Result};

/// Keys are the caller's (a UUID, an order id): at most this long.
pub const MAX_KEY_CHARS: usize = 200;

/// Lock class of these keys ("LH"), apart from other users' locks.
const LOCK_CLASS: u32 = 0x4C48;
/// An advisory lock tag's fourth field: `pg_advisory_*` functions use 1 and
/// 2, so no SQL call can take (and hold, stalling a key's callers) this lock.
const PRIVATE_TAG: u16 = 3;

/// Checks `key` (named `field` in errors) and waits for any other transaction using it.
pub fn lock(field: &'static str, key: &str) -> Result<()> {
    if key.is_empty() || key.chars().count() > MAX_KEY_CHARS {
        return Err(Error::invalid(
            field,
            format!("must be 1 to {MAX_KEY_CHARS} characters"),
        ));
    }
    let hash = Spi::get_one_with_args::<i32>("SELECT pg_catalog.hashtext($1)", &[key.into()])?
        .unwrap_or_default();
    let tag = pg_sys::LOCKTAG {
        // SAFETY: set for the whole session at connection.
        locktag_field1: unsafe { pg_sys::MyDatabaseId }.to_u32(),
        locktag_field2: LOCK_CLASS,
        locktag_field3: hash as u32,
        locktag_field4: PRIVATE_TAG,
        locktag_type: pg_sys::LockTagType::LOCKTAG_ADVISORY as u8,
        locktag_lockmethodid: pg_sys::USER_LOCKMETHOD as u8,
    };
    // SAFETY: a transaction-level lock (released when it ends), as pg_advisory_xact_lock takes.
    unsafe {
        pg_sys::LockAcquire(
            &tag,
            pg_sys::ExclusiveLock as pg_sys::LOCKMODE,
            false,
            false,
        );
    }
    Ok(())
}
