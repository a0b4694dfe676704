//! Which due rows the worker may claim now. Pure logic.
//!
//! The worker claims only what its HTTP threads can start at once, so a
//! claimed row never waits in a queue behind slow requests (and its lease
//! never runs while it waits). Two limits keep slow endpoints from taking
//! every thread:
//! - one subscription has at most `per_subscription` requests in flight;
//! - subscriptions not proven fast (no finished attempt yet, the last one
//!   slow, or one running long now) share `concurrency - reserve` threads:
//!   the reserve is kept for endpoints that answer promptly, so 20 slow
//!   endpoints cannot make a fast endpoint's event wait for them.
//!
//! One exception: proven-fast subscriptions may hold up to `pipeline` rows
//! more than the threads, queued for the next free thread. Such a row waits
//! for a request to finish, and only unproven rows never queue, so the wait
//! is a fast request's. Without it every few rows cost a claim transaction:
//! beside an endpoint answering after 2 s a fast one got 0.41x its rate alone.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// An attempt slower than this makes its subscription "slow" until one is faster.
pub const SLOW: Duration = Duration::from_millis(1000);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub concurrency: usize,
    pub per_subscription: usize,
    /// Threads only proven-fast subscriptions may take.
    pub reserve: usize,
    /// Rows proven-fast subscriptions may hold beyond the threads.
    pub pipeline: usize,
}

impl Limits {
    pub fn new(concurrency: usize) -> Limits {
        let concurrency = concurrency.max(1);
        Limits {
            concurrency,
            per_subscription: (concurrency * 3 / 4).max(1),
            // One thread is no pool to reserve from.
            reserve: if concurrency >= 2 {
                (concurrency / 4).max(1)
            } else {
                0
            },
            pipeline: concurrency,
        }
    }
}

/// Requests in flight and how fast each subscription answered last.
#[derive(Default)]
pub struct Flights {
    /// delivery id → (subscription, when it was handed to a thread)
    running: HashMap<i64, (i64, Instant)>,
    /// subscription → duration of its last finished attempt
    last: HashMap<i64, Duration>,
}

/// What the next claim may take.
#[derive(Debug, PartialEq, Eq)]
pub struct Plan {
    /// The most rows the claim may take in all: threads free now, plus what
    /// is left of the pipeline (for proven-fast subscriptions only).
    pub free: usize,
    /// Of those, the most for subscriptions not proven fast.
    pub unproven_room: usize,
    /// Proven-fast subscriptions, sorted.
    pub fast: Vec<i64>,
    /// Subscriptions with requests in flight and how many, sorted by id.
    pub busy: Vec<(i64, i32)>,
}

impl Flights {
    pub fn start(&mut self, delivery_id: i64, subscription_id: i64, now: Instant) {
        self.running.insert(delivery_id, (subscription_id, now));
    }

    /// An attempt finished after `took`.
    pub fn finish(&mut self, delivery_id: i64, subscription_id: i64, took: Duration) {
        self.running.remove(&delivery_id);
        self.last.insert(subscription_id, took);
    }

    pub fn total(&self) -> usize {
        self.running.len()
    }

    /// Forget speeds of subscriptions no longer known (deleted, disabled).
    pub fn retain_subscriptions(&mut self, keep: impl Fn(i64) -> bool) {
        self.last.retain(|sub, _| keep(*sub));
    }

    pub fn plan(&self, limits: &Limits, now: Instant) -> Plan {
        // One pass over the requests in flight: how many per subscription, and
        // which have one running for `SLOW` or more.
        let mut per_sub: HashMap<i64, i32> = HashMap::new();
        let mut running_long: Vec<i64> = Vec::new();
        for (sub, started) in self.running.values() {
            *per_sub.entry(*sub).or_default() += 1;
            if now.saturating_duration_since(*started) >= SLOW {
                running_long.push(*sub);
            }
        }
        let mut fast: Vec<i64> = self
            .last
            .iter()
            .filter(|(sub, took)| **took < SLOW && !running_long.contains(sub))
            .map(|(sub, _)| *sub)
            .collect();
        fast.sort_unstable();
        let unproven_in_flight: usize = per_sub
            .iter()
            .filter(|(sub, _)| fast.binary_search(sub).is_err())
            .map(|(_, n)| *n as usize)
            .sum();
        let threads_free = limits.concurrency.saturating_sub(self.total());
        let free = (limits.concurrency + limits.pipeline).saturating_sub(self.total());
        let unproven_room = (limits.concurrency - limits.reserve)
            .saturating_sub(unproven_in_flight)
            .min(threads_free);
        let mut busy: Vec<(i64, i32)> = per_sub.into_iter().collect();
        busy.sort_unstable();
        Plan {
            free,
            unproven_room,
            fast,
            busy,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits() {
        assert_eq!(
            Limits::new(4),
            Limits {
                concurrency: 4,
                per_subscription: 3,
                reserve: 1,
                pipeline: 4
            }
        );
        assert_eq!(Limits::new(1).reserve, 0);
        assert_eq!(Limits::new(0).concurrency, 1);
        assert_eq!(Limits::new(32).reserve, 8);
    }

    #[test]
    fn slow_endpoints_leave_the_reserve_to_fast_ones() {
        let limits = Limits::new(4);
        let t0 = Instant::now();
        let mut f = Flights::default();
        // The fast endpoint answered in 5 ms before.
        f.start(1, 100, t0);
        f.finish(1, 100, Duration::from_millis(5));
        // Three slow endpoints (never seen before) take three threads.
        for (d, sub) in [(2, 1), (3, 2), (4, 3)] {
            f.start(d, sub, t0);
        }
        let plan = f.plan(&limits, t0 + Duration::from_millis(1500));
        assert_eq!(
            plan.free, 5,
            "one thread and the pipeline, for the fast endpoint"
        );
        assert_eq!(plan.unproven_room, 0, "the last thread is the reserve");
        assert_eq!(plan.fast, vec![100]);
        assert_eq!(plan.busy, vec![(1, 1), (2, 1), (3, 1)]);
    }

    #[test]
    fn an_attempt_running_long_makes_a_fast_endpoint_unproven() {
        let limits = Limits::new(4);
        let t0 = Instant::now();
        let mut f = Flights::default();
        f.start(1, 7, t0);
        f.finish(1, 7, Duration::from_millis(5));
        f.start(2, 7, t0);
        assert_eq!(f.plan(&limits, t0).fast, vec![7]);
        let later = f.plan(&limits, t0 + SLOW);
        assert!(later.fast.is_empty());
        assert_eq!(later.unproven_room, 2);
        f.finish(2, 7, Duration::from_secs(3));
        assert!(f.plan(&limits, t0 + SLOW).fast.is_empty(), "slow last time");
    }

    #[test]
    fn unproven_rows_never_wait_for_a_thread_and_fast_ones_for_one_round_at_most() {
        let limits = Limits::new(2);
        let t0 = Instant::now();
        let mut f = Flights::default();
        assert_eq!(
            f.plan(&limits, t0),
            Plan {
                free: 4,
                unproven_room: 1,
                fast: vec![],
                busy: vec![]
            }
        );
        f.start(1, 5, t0);
        f.start(2, 6, t0);
        let plan = f.plan(&limits, t0);
        assert_eq!(
            (plan.free, plan.unproven_room),
            (2, 0),
            "no thread free: only the pipeline"
        );
        f.start(3, 5, t0);
        f.start(4, 5, t0);
        assert_eq!(f.plan(&limits, t0).free, 0, "threads and pipeline full");
    }
}
