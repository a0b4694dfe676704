//! `linkhooks.worker_status()`: is a worker delivering for this database?

use pgrx::prelude::*;

use crate::error::{Error, OrReport};
use crate::slots::{self, SlotState};
use crate::{allowlist, guc, shared};

/// Is the delivery worker running for this database, and how busy is it? One row.
///
/// Each database with the extension has a worker of its own (unless
/// `linkhooks.databases` leaves it out); `state` says what it is doing. Works
/// on a standby and in read-only transactions: it only reads.
#[pg_extern(volatile)]
fn worker_status() -> TableIterator<
    'static,
    (
        name!(running, bool),
        name!(pid, Option<i32>),
        name!(database, String),
        name!(in_flight, Option<i64>),
        name!(last_loop, Option<pgrx::datum::TimestampWithTimeZone>),
        name!(queue_depth, i64),
        name!(state, String),
    ),
> {
    let queue_depth = Spi::connect(|client| {
        client
            .select(
                "SELECT pg_catalog.count(*) FROM linkhooks.deliveries WHERE status IN ('pending', 'delivering')",
                None,
                &[],
            )?
            .first()
            .get_one::<i64>()
    })
    .map_err(Error::from)
    .or_report()
    .unwrap_or(0);
    let database = shared::my_database_name();
    let worker = shared::preloaded()
        .then(|| slots::view(shared::my_database()))
        .flatten();
    let state = match &worker {
        Some(w) if w.pid != 0 && w.state == SlotState::Delivering => "delivering",
        Some(w) if w.state == SlotState::NoProcess => {
            "waiting for a background worker slot (max_worker_processes)"
        }
        Some(_) => "starting",
        None if !shared::preloaded() || slots::launcher_pid() == 0 => "stopped",
        None if !allowlist::allows(&guc::served_databases(), &database) => {
            "not in linkhooks.databases"
        }
        None => "starting",
    };
    let row = if let Some(worker) = worker.filter(|_| state == "delivering") {
        let last_loop = pgrx::datum::TimestampWithTimeZone::try_from(
            worker.last_loop_ms * 1000 - crate::triggers::PG_EPOCH_OFFSET_MICROS,
        )
        .ok();
        (
            true,
            Some(worker.pid),
            database,
            Some(worker.in_flight),
            last_loop,
            queue_depth,
            state.to_string(),
        )
    } else {
        (
            false,
            None,
            database,
            None,
            None,
            queue_depth,
            state.to_string(),
        )
    };
    TableIterator::once(row)
}
