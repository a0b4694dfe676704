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
    let rows: Vec<_> = if workers.is_empty() {
        let state = if !shared::preloaded() || slots::launcher_pid() == 0 {
            "stopped"
        } else if !allowlist::allows(&guc::served_databases(), &database) {
            "not in linkhooks.databases"
        } else {
            "starting"
        };
        vec![(
            false,
            None,
            database,
            None,
            None,
            queue_depth,
            state.to_string(),
        )]
    } else {
        workers
            .into_iter()
            .map(|worker| {
                let state = match worker.state {
                    SlotState::Delivering if worker.pid != 0 => "delivering",
                    SlotState::NoProcess => {
                        "waiting for a background worker slot (max_worker_processes)"
                    }
                    _ => "starting",
                };
                if state != "delivering" {
                    return (
                        false,
                        None,
                        database.clone(),
                        None,
                        None,
                        queue_depth,
                        state.to_string(),
                    );
                }
                let last_loop = pgrx::datum::TimestampWithTimeZone::try_from(
                    worker.last_loop_ms * 1000 - crate::triggers::PG_EPOCH_OFFSET_MICROS,
                )
                .ok();
                (
                    true,
                    Some(worker.pid),
                    database.clone(),
                    Some(worker.in_flight),
                    last_loop,
                    queue_depth,
                    state.to_string(),
                )
            })
            .collect()
    };
    TableIterator::new(rows)
}
