//! Transaction-level locks on advisory tags that no SQL call can take: their
//! fourth field is 3, and the `pg_advisory_*` functions use only 1 and 2. So
//! no role can hold one of these to stall the code that waits for it.

use pgrx::prelude::*;

/// The tag's second field, one per use ("LH"): idempotency keys of
/// `record_click` and `conversions.external_id`.
pub const IDEMPOTENCY_KEYS: u32 = 0x4C48;
/// "LA": the worker's attempt log (src/worker/health_log.rs).
pub const ATTEMPT_LOG: u32 = 0x4C41;

fn tag(class: u32, key: u32) -> pg_sys::LOCKTAG {
    pg_sys::LOCKTAG {
        // SAFETY: set for the whole session at connection.
        locktag_field1: unsafe { pg_sys::MyDatabaseId }.to_u32(),
        locktag_field2: class,
        locktag_field3: key,
        locktag_field4: 3,
        locktag_type: pg_sys::LockTagType::LOCKTAG_ADVISORY as u8,
        locktag_lockmethodid: pg_sys::USER_LOCKMETHOD as u8,
    }
}

/// Takes the lock in `mode` until the transaction ends, waiting for it as
/// `pg_advisory_xact_lock` does (lock_timeout bounds the wait).
pub fn take(class: u32, key: u32, mode: u32) {
    // SAFETY: a transaction-level lock, released when the transaction ends.
    unsafe { pg_sys::LockAcquire(&tag(class, key), mode as pg_sys::LOCKMODE, false, false) };
}

/// Takes it only if no other transaction holds it in a conflicting mode.
pub fn try_take(class: u32, key: u32, mode: u32) -> bool {
    // SAFETY: as `take`, without waiting.
    unsafe {
        pg_sys::LockAcquire(&tag(class, key), mode as pg_sys::LOCKMODE, false, true)
            != pg_sys::LockAcquireResult::LOCKACQUIRE_NOT_AVAIL
    }
}
