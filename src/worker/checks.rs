//! Destination health checks in the worker's loop: now and then it looks for
//! the links that rules cover, claims the checks that are due while their
//! share of the HTTP threads is free, and records what they found, each in a
//! short transaction of its own (src/health_checks.rs). A failed transaction
//! costs a check, never a delivery.

use std::time::{Duration, Instant};

use super::{Worker, gate};
use crate::health_checks;
use crate::probe::Probed;
use crate::sender::Work;

/// How often the links rules cover are looked for: a new rule's or link's
/// first check waits at most this long.
const DISCOVER_EVERY: Duration = Duration::from_secs(10);
/// Checks use at most one thread in this many; deliveries keep the rest.
const THREAD_SHARE: usize = 4;

#[derive(Default)]
pub struct Checks {
    in_flight: usize,
    results: Vec<Probed>,
    /// When to claim due checks next (None: at once).
    next_scan: Option<Instant>,
    next_discovery: Option<Instant>,
}

impl Checks {
    /// Checks that may be in flight with `concurrency` threads.
    fn limit(concurrency: usize) -> usize {
        (concurrency / THREAD_SHARE).max(1)
    }

    /// When the loop must run to claim more: none while every slot is taken
    /// (a result arriving wakes it).
    pub fn next_wake(&self, concurrency: usize) -> Option<Instant> {
        (self.in_flight < Self::limit(concurrency))
            .then_some(self.next_scan)
            .flatten()
    }
}

impl Worker {
    pub(super) fn checked(&mut self, probed: Probed) {
        self.checks.in_flight = self.checks.in_flight.saturating_sub(1);
        self.checks.results.push(probed);
    }

    pub(super) fn run_checks(&mut self, now: Instant) {
        if !self.checks.results.is_empty() {
            let results = std::mem::take(&mut self.checks.results);
            // Lost if this fails: the next check finds the same again.
            if let Err(e) = gate::try_transaction(|| {
                if !super::extension::hold(self.extension) {
                    return Ok(0);
                }
                health_checks::record(&results)
            }) {
                self.warn_failure("recording destination checks", &e);
            }
        }
        let slots =
            Checks::limit(self.settings.limits.concurrency).saturating_sub(self.checks.in_flight);
        if slots == 0 || self.checks.next_scan.is_some_and(|t| now < t) {
            return;
        }
        let discover = self.checks.next_discovery.is_none_or(|t| now >= t);
        let (interval, timeout) = (
            self.settings.health_check_interval,
            self.settings.default_timeout,
        );
        let extension = self.extension;
        let claimed = gate::try_transaction(|| {
            if !super::extension::hold(extension)
                || crate::replication::receives_deliveries()?
                || !health_checks::installed()?
            {
                return Ok((Vec::new(), None)); // the publisher checks; or a schema from before 0.5.0
            }
            if discover {
                health_checks::discover()?;
            }
            health_checks::claim_due(slots, interval, timeout)
        });
        let now = Instant::now();
        if discover {
            self.checks.next_discovery = Some(now + DISCOVER_EVERY);
        }
        let next_discovery = self.checks.next_discovery.unwrap_or(now);
        match claimed {
            Ok((probes, next_due)) => {
                self.checks.in_flight += probes.len();
                for probe in probes {
                    self.pool.submit(Work::Check(probe));
                }
                let next = next_due.map_or(next_discovery, |d| now + d);
                self.checks.next_scan = Some(next.min(next_discovery));
            }
            Err(e) => {
                self.warn_failure("destination checks", &e);
                self.checks.next_scan = Some(next_discovery);
            }
        }
    }
}
