//! `linkhooks.worker_status()`: is the worker delivering for this database?

use pgrx::prelude::*;

use crate::error::{Error, OrReport};
use crate::shared::{self, WorkerState};

/// Is the delivery worker running for this database, and how busy is it? One row.
///
/// `running` is true only in the database the worker serves (`database`
/// names it); `state` says what the worker is doing. Works on a standby and
/// in read-only transactions: it only reads.
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
    let database = crate::guc::string(&crate::guc::DATABASE);
    let worker = shared::worker_snapshot();
    // SAFETY: MyDatabaseId is this backend's database, set once at connection.
    let here = worker.database == unsafe { pg_sys::MyDatabaseId };
    let state = match worker.state {
        WorkerState::Stopped => "stopped",
        WorkerState::WaitingForDatabase => "waiting for its database",
        _ if worker.pid == 0 => "stopped",
        _ if !here => "serving another database",
        WorkerState::WaitingForExtension => "waiting for the extension",
        WorkerState::Delivering => "delivering",
    };
    let row = if worker.pid != 0 && here {
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
