//! The worker's settings, read at start and on SIGHUP.

use std::time::Duration;

use pgrx::prelude::*;

use super::admission::Limits;
use crate::duration;
use crate::guc;
use crate::retry::{self, Schedule};

pub struct Settings {
    pub schedule: Schedule,
    pub max_attempts: i32,
    pub limits: Limits,
    /// Most rows one claim takes (it also never takes more than the free threads).
    pub batch_size: usize,
    pub default_timeout: Duration,
    pub require_https: bool,
    pub disable_after: i32,
    pub maintenance_every: Duration,
    /// How often a health_check rule without its own interval checks a destination.
    pub health_check_interval: Duration,
}

impl Settings {
    pub fn read() -> Settings {
        let schedule = Schedule::parse(&guc::string(&guc::RETRY_SCHEDULE)).unwrap_or_else(|e| {
            warning!(
                "{e}; using the default schedule {}",
                retry::DEFAULT_SCHEDULE
            );
            Schedule::default()
        });
        let max_attempts = match guc::MAX_ATTEMPTS.get() {
            0 => schedule.default_max_attempts(),
            n => n,
        };
        // Checked when set (guc.rs): a fallback here only guards a bug.
        let health_check_interval = duration::parse(&guc::string(&guc::HEALTH_CHECK_INTERVAL))
            .filter(|d| !d.is_zero())
            .unwrap_or(Duration::from_secs(300));
        Settings {
            health_check_interval,
            schedule,
            max_attempts,
            batch_size: guc::BATCH_SIZE.get().max(1) as usize,
            // Each of a database's workers gets its share, so the per-subscription
            // cap (¾ of a worker's threads) also holds over all of them.
            limits: Limits::new(
                (guc::HTTP_CONCURRENCY.get().max(1) / guc::WORKERS_PER_DATABASE.get().max(1)).max(1)
                    as usize,
            ),
            default_timeout: Duration::from_millis(guc::DEFAULT_TIMEOUT_MS.get().max(1) as u64),
            require_https: guc::REQUIRE_HTTPS.get(),
            disable_after: guc::DISABLE_AFTER_DEAD_LETTERS.get(),
            maintenance_every: maintenance_every(),
        }
    }
}

/// `linkhooks.maintenance_interval` (checked when set: the fallback only guards a bug).
pub fn maintenance_every() -> Duration {
    let interval = guc::string(&guc::MAINTENANCE_INTERVAL);
    match duration::parse(&interval) {
        Some(d) if !d.is_zero() => d,
        _ => {
            warning!(
                "invalid linkhooks.maintenance_interval '{interval}': must be a positive duration up to 3650d like '30s'; using 30s"
            );
            Duration::from_secs(30)
        }
    }
}
