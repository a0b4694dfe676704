//! Logical replication: what a subscriber must do that ordinary triggers
//! cannot. Apply runs with `session_replication_role = replica`, where only
//! ENABLE REPLICA (or ALWAYS) triggers fire.
//!
//! - Links applied from a publisher invalidate every session's link cache
//!   here, as a local change would (`links_replicated`, a REPLICA trigger that
//!   does nothing else: the publisher already validated the row and emitted
//!   its event).
//! - A database that receives `deliveries` from a publisher sends none of
//!   them: the publisher's worker does. Its worker stays idle while any
//!   subscription here carries that table, and starts delivering what is
//!   pending once none does (the node took over).

use std::cell::Cell;

use pgrx::AllocatedByRust;
use pgrx::heap_tuple::PgHeapTuple;
use pgrx::prelude::*;

use crate::error::{Error, OrReport, Result};
use crate::linkstore;
use crate::triggers;

/// Fires only in replica role (logical-replication apply, a restore or an
/// edit run that way): tells every session that links changed, and keeps
/// `redirect_url` following the destination. Row and TRUNCATE.
#[pg_trigger]
fn links_replicated_trigger<'a>(
    trigger: &'a PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByRust>>, Error> {
    let on = || -> Result<Option<PgHeapTuple<'a, AllocatedByRust>>> {
        linkstore::links_changed(trigger)?;
        let row = match trigger.op().map_err(|e| Error::Column(e.to_string()))? {
            PgTriggerOperation::Delete => trigger.old().map(|r| r.into_owned()),
            PgTriggerOperation::Truncate => None,
            _ => trigger
                .new()
                .map(|r| triggers::with_redirect_url(r.into_owned())),
        };
        Ok(row)
    };
    Ok(on().or_report())
}

thread_local! {
    /// Whether a subscription here carries linkhooks.deliveries; None: look again.
    static RECEIVES: Cell<Option<bool>> = const { Cell::new(None) };
    static CALLBACK_REGISTERED: Cell<bool> = const { Cell::new(false) };
    /// The last answer logged, so the log says when it changes, not on every look.
    static ANNOUNCED: Cell<bool> = const { Cell::new(false) };
    /// Whether `pg_subscription_rel` changed since `subscriptions_changed` last asked.
    static CHANGED: Cell<bool> = const { Cell::new(false) };
}

/// Whether this database receives `linkhooks.deliveries` by logical
/// replication. Read from the catalog only after `pg_subscription_rel`
/// changed (a syscache callback), so the worker's loop pays a Cell read.
/// Call inside a transaction.
pub fn receives_deliveries() -> Result<bool> {
    if !CALLBACK_REGISTERED.replace(true) {
        // SAFETY: a callback for this process's life; it only clears a Cell.
        unsafe {
            pg_sys::CacheRegisterSyscacheCallback(
                pg_sys::SysCacheIdentifier::SUBSCRIPTIONRELMAP as i32,
                Some(forget),
                pg_sys::Datum::from(0),
            )
        };
    }
    if let Some(known) = RECEIVES.get() {
        return Ok(known);
    }
    let receives = Spi::connect(|client| {
        client
            .select(
                // The table or a partition of it (a publisher may publish its partitions).
                "SELECT EXISTS (SELECT FROM pg_catalog.pg_subscription_rel
                                 WHERE srrelid IN (SELECT relid FROM pg_catalog.pg_partition_tree(
                                                        pg_catalog.to_regclass('linkhooks.deliveries'))))",
                Some(1),
                &[],
            )?
            .first()
            .get_one::<bool>()
    })?
    .unwrap_or(false);
    if ANNOUNCED.replace(receives) != receives {
        if receives {
            log!(
                "pg_linkhooks: linkhooks.deliveries is replicated into this database by a logical-replication subscription; the worker sends nothing while it is (the publisher's worker delivers)"
            );
        } else {
            log!(
                "pg_linkhooks: linkhooks.deliveries is no longer replicated into this database; the worker delivers what is pending"
            );
        }
    }
    RECEIVES.set(Some(receives));
    Ok(receives)
}

/// Whether a logical-replication subscription here was created, changed or
/// dropped since the last call (from the first `receives_deliveries` on).
/// Rows its apply wrote carry the publisher's due times, which the worker's
/// claim floors did not foresee: the worker drops its floors on a change.
pub fn subscriptions_changed() -> bool {
    CHANGED.replace(false)
}

unsafe extern "C-unwind" fn forget(_: pg_sys::Datum, _: i32, _: u32) {
    RECEIVES.set(None);
    CHANGED.set(true);
}
