//! `linkhooks.worker_status()`: is a worker delivering for this database?

use pgrx::prelude::*;

use crate::error::{Error, OrReport};
use crate::slots::{self, SlotState};
use crate::{allowlist, guc, shared};

/// Are this database's delivery workers running, and how busy are they? One
/// row per worker (`linkhooks.workers_per_database`), or one saying why none runs.
///
/// Each database with the extension has workers of its own (unless
/// `linkhooks.databases` leaves it out); `state` says what each is doing. Works
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
    let workers = if shared::preloaded() {
        slots::view(shared::my_database())
    } else {
        Vec::new()
    };
    // A row for a database with no worker delivering: only why.
    let idle = |state: &str| {
        let state = state.to_string();
        (
            false,
            None,
            database.clone(),
            None,
            None,
            queue_depth,
            state,
        )
    };
    let rows: Vec<_> = if workers.is_empty() {
        vec![idle(
            if !shared::preloaded() || slots::launcher_pid() == 0 {
                "stopped"
            } else if !allowlist::allows(&guc::served_databases(), &database) {
                "not in linkhooks.databases"
            } else {
                "starting"
            },
        )]
    } else {
        workers
            .into_iter()
            .map(|worker| match worker.state {
                SlotState::Delivering if worker.pid != 0 => {
                    let last_loop = pgrx::datum::TimestampWithTimeZone::try_from(
                        worker.last_loop_ms * 1000 - crate::triggers::PG_EPOCH_OFFSET_MICROS,
                    )
                    .ok();
                    let (pid, in_flight) = (Some(worker.pid), Some(worker.in_flight));
                    let state = "delivering".to_string();
                    (
                        true,
                        pid,
                        database.clone(),
                        in_flight,
                        last_loop,
                        queue_depth,
                        state,
                    )
                }
                SlotState::NoProcess => {
                    idle("waiting for a background worker slot (max_worker_processes)")
                }
                _ => idle("starting"),
            })
            .collect()
    };
    TableIterator::new(rows)
}
