//! Ingestion idempotency: a caller that retries after a timeout passes the
//! same key (`record_click(…, idempotency_key)`, `conversions.external_id`)
//! and gets the first call's result instead of a second click or conversion.
//! Calls with one key are serialized by a transaction-level lock on the key,
//! so the second sees the first's row once it commits; a unique index backs it.

use pgrx::prelude::*;

use crate::error::{Error, Result};
use crate::locks;

/// Keys are the caller's (a UUID, an order id): at most this long.
pub const MAX_KEY_CHARS: usize = 200;

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
    locks::take(locks::IDEMPOTENCY_KEYS, hash as u32, pg_sys::ExclusiveLock);
    Ok(())
}
