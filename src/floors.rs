//! Where the worker's claim starts each subscription's walk of the due index.
//!
//! While another session holds an old snapshot (an analyst's long report),
//! vacuum may not remove the index entries of rows delivered since, and a
//! walk from the start of a subscription's range visits every one of them on
//! every claim: delivery slows as the snapshot ages. A subscription's floor
//! is a due time below which it has no live due row and never will, so the
//! walk starts there and skips the dead entries.
//!
//! Why a floor holds: a claim walks `[floor, now]` in due order and takes a
//! prefix of it, so the rows it saw and left (cut by a limit) are due no
//! earlier than the last it took, except those it skipped (locked
//! elsewhere), whose due times are kept. Rows it could not see (committed
//! later) carry a due time read from the clock after their transaction got
//! its id (`queue::due_stamp`), so they are due no earlier than the
//! *horizon*: the oldest start among transactions holding an id when the
//! worker looked, or the time it looked. A floor is the least of the three.
//! A horizon read earlier is lower, so still valid: the worker reads it at
//! most every `HORIZON_REUSE`. With a prepared transaction (no start time to
//! read) there is no horizon and floors stay where they are. Rows a
//! logical-replication apply writes carry their publisher's due times, so
//! the worker drops every floor when a subscription here changes
//! (`replication::subscriptions_changed`). A walk from the
//! start every `SWEEP_EVERY` bounds what anything unforeseen (a row written
//! by hand with an old due time, a clock stepped back) could cost: a delay,
//! never a lost row.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// A horizon younger than this is used again rather than read.
pub const HORIZON_REUSE: Duration = Duration::from_millis(20);
/// How often a claim ignores the floors and walks from the start.
pub const SWEEP_EVERY: Duration = Duration::from_secs(300);

/// Microseconds since 2000-01-01 UTC, PostgreSQL's `TimestampTz`.
pub type Micros = i64;

/// What one claim saw, applied to the floors once its transaction commits.
#[derive(Default)]
pub struct ClaimSeen {
    /// `None`: no horizon could be read (a prepared transaction exists).
    pub horizon: Option<Micros>,
    /// (subscription, due time before the claim) of each row taken.
    pub taken: Vec<(i64, Micros)>,
    /// (subscription, due time) of each row the claim walked past but did not take.
    pub skipped: Vec<(i64, Micros)>,
}

#[derive(Default)]
pub struct Floors {
    by_subscription: HashMap<i64, Micros>,
    next_sweep: Option<Instant>,
    /// The last horizon's clock reading: one lower than it means the clock stepped back.
    last_clock: Micros,
}

impl Floors {
    /// The floors to claim with, as (subscription, floor); none on a sweep.
    pub fn for_claim(&mut self, now: Instant) -> Vec<(i64, Micros)> {
        if self.next_sweep.is_none_or(|t| now >= t) {
            self.next_sweep = Some(now + SWEEP_EVERY);
            return Vec::new();
        }
        self.by_subscription.iter().map(|(s, f)| (*s, *f)).collect()
    }

    /// Notes the clock reading behind a new horizon; a clock that went back
    /// makes every floor suspect, so they are dropped.
    pub fn clock_read(&mut self, clock: Micros) {
        if clock < self.last_clock {
            self.by_subscription.clear();
        }
        self.last_clock = clock;
    }

    /// Moves the floors of the subscriptions a committed claim walked.
    pub fn advance(&mut self, seen: ClaimSeen) {
        let Some(horizon) = seen.horizon else {
            return;
        };
        let mut highest_taken: HashMap<i64, Micros> = HashMap::new();
        for (sub, due) in seen.taken {
            let top = highest_taken.entry(sub).or_insert(due);
            *top = (*top).max(due);
        }
        let mut new: HashMap<i64, Micros> = highest_taken
            .into_iter()
            .map(|(sub, due)| (sub, due.min(horizon)))
            .collect();
        for (sub, due) in seen.skipped {
            let floor = new.entry(sub).or_insert(horizon);
            *floor = (*floor).min(due);
        }
        self.by_subscription.extend(new);
    }

    /// Drops the floors of subscriptions no longer delivered to.
    pub fn retain(&mut self, keep: impl Fn(i64) -> bool) {
        self.by_subscription.retain(|sub, _| keep(*sub));
    }

    #[cfg(test)]
    fn get(&self, sub: i64) -> Option<Micros> {
        self.by_subscription.get(&sub).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(
        horizon: Option<Micros>,
        taken: &[(i64, Micros)],
        skipped: &[(i64, Micros)],
    ) -> ClaimSeen {
        ClaimSeen {
            horizon,
            taken: taken.to_vec(),
            skipped: skipped.to_vec(),
        }
    }

    #[test]
    fn the_floor_is_the_last_row_taken_when_the_horizon_is_later() {
        let mut f = Floors::default();
        f.advance(seen(Some(1_000), &[(1, 100), (1, 300), (1, 200)], &[]));
        assert_eq!(f.get(1), Some(300));
    }

    #[test]
    fn the_horizon_caps_the_floor() {
        let mut f = Floors::default();
        f.advance(seen(Some(250), &[(1, 300)], &[]));
        assert_eq!(f.get(1), Some(250));
    }

    #[test]
    fn a_skipped_row_holds_the_floor_down() {
        let mut f = Floors::default();
        f.advance(seen(Some(1_000), &[(1, 300)], &[(1, 120)]));
        assert_eq!(f.get(1), Some(120));
        f.advance(seen(Some(1_000), &[], &[(2, 500)]));
        assert_eq!(f.get(2), Some(500));
    }

    #[test]
    fn without_a_horizon_nothing_moves() {
        let mut f = Floors::default();
        f.advance(seen(Some(1_000), &[(1, 300)], &[]));
        f.advance(seen(None, &[(1, 900)], &[]));
        assert_eq!(f.get(1), Some(300));
    }

    #[test]
    fn subscriptions_a_claim_did_not_walk_keep_their_floor() {
        let mut f = Floors::default();
        f.advance(seen(Some(1_000), &[(1, 300), (2, 400)], &[]));
        f.advance(seen(Some(2_000), &[(2, 1_500)], &[]));
        assert_eq!((f.get(1), f.get(2)), (Some(300), Some(1_500)));
    }

    #[test]
    fn the_first_claim_and_every_sweep_walk_from_the_start() {
        let mut f = Floors::default();
        let start = Instant::now();
        assert!(f.for_claim(start).is_empty());
        f.advance(seen(Some(1_000), &[(1, 300)], &[]));
        assert_eq!(f.for_claim(start), vec![(1, 300)]);
        assert!(f.for_claim(start + SWEEP_EVERY).is_empty());
        assert_eq!(f.for_claim(start + SWEEP_EVERY), vec![(1, 300)]);
    }

    #[test]
    fn a_clock_that_went_back_drops_every_floor() {
        let mut f = Floors::default();
        f.clock_read(5_000);
        f.advance(seen(Some(1_000), &[(1, 300)], &[]));
        f.clock_read(6_000);
        assert_eq!(f.get(1), Some(300));
        f.clock_read(5_999);
        assert_eq!(f.get(1), None);
    }

    #[test]
    fn retain_forgets_subscriptions() {
        let mut f = Floors::default();
        f.advance(seen(Some(1_000), &[(1, 300), (2, 300)], &[]));
        f.retain(|s| s == 2);
        assert_eq!((f.get(1), f.get(2)), (None, Some(300)));
    }
}
