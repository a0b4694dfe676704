//! pg_linkhooks: short links, click tracking and signed webhooks delivered by
//! a background worker inside PostgreSQL.

use pgrx::prelude::*;

// Pure logic: no Postgres inside, plain unit tests.
mod allowlist;
mod destination;
mod doorkeeper;
mod duration;
mod filters;
mod floors;
mod health;
mod latency;
mod limits;
mod links;
mod milestones;
mod payload;
mod probe;
mod rate;
mod resolve;
mod retry;
mod routing;
mod rules;
mod scrub;
mod sender;
mod signing;
mod tally;
mod target;
mod useragent;
mod window;

// The pgrx layer: SQL in, SQL out.
mod aggregator;
mod api;
mod digests;
mod error;
mod events;
mod guc;
mod health_checks;
mod idempotency;
mod linkstore;
mod locks;
mod maintenance;
mod minutes;
mod misses;
mod operator;
mod opsevents;
mod partition_check;
mod plans;
mod queue;
mod recover;
mod replication;
mod shared;
mod slots;
mod statements;
mod thresholds;
mod triggers;
mod tuple;
mod utility;
mod worker;

pgrx::pg_module_magic!();

pgrx::extension_sql_file!("../sql/schema.sql", name = "schema", bootstrap);
pgrx::extension_sql_file!("../sql/views.sql", name = "views", requires = [api::latency_bucket]);
pgrx::extension_sql_file!("../sql/access.sql", name = "access");
pgrx::extension_sql_file!("../sql/finalize.sql", name = "finalize", finalize);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    error::quiet_backtraces();
    guc::register();
    if unsafe { !pg_sys::process_shared_preload_libraries_in_progress } {
        pgrx::warning!(
            "pg_linkhooks is not in shared_preload_libraries: webhooks will not be delivered until it is added and the server restarted"
        );
        return;
    }
    shared::init();
    utility::install();
    statements::install(statements::Observer {
        ended: queue::statement_ended,
        forgotten: queue::statement_forgotten,
    });
    worker::register();
}

#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![
            "shared_preload_libraries = 'pg_linkhooks'",
            "linkhooks.databases = 'pgrx_tests'",
            "linkhooks.base_url = 'https://go.acme.co'",
        ]
    }
}
