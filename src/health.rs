//! Per-subscription delivery health from one batch of finished attempts: the
//! last success, the last failure, and the run of failures since the last
//! success. The worker folds the batches of each second into `linkhooks.subscription_state`.

use std::collections::BTreeMap;

/// One finished HTTP attempt, in the order attempts finished.
#[derive(Clone)]
pub struct Attempt {
    pub subscription_id: i64,
    pub succeeded: bool,
    pub finished_micros: i64,
}

/// What one batch changes for one subscription.
#[derive(Debug, PartialEq, Default)]
pub struct HealthChange {
    pub subscription_id: i64,
    pub last_success_micros: Option<i64>,
    pub last_failure_micros: Option<i64>,
    /// Failures after the batch's last success. When the batch has a success
    /// this replaces the stored run; otherwise it extends it.
    pub trailing_failures: i32,
}

/// Summarises a batch, one change per subscription (ordered by id).
pub fn summarize(attempts: impl IntoIterator<Item = Attempt>) -> Vec<HealthChange> {
    let mut by_subscription: BTreeMap<i64, HealthChange> = BTreeMap::new();
    for a in attempts {
        let change = by_subscription
            .entry(a.subscription_id)
            .or_insert_with(|| HealthChange {
                subscription_id: a.subscription_id,
                ..Default::default()
            });
        if a.succeeded {
            change.last_success_micros = Some(
                change
                    .last_success_micros
                    .map_or(a.finished_micros, |t| t.max(a.finished_micros)),
            );
            change.trailing_failures = 0;
        } else {
            change.last_failure_micros = Some(
                change
                    .last_failure_micros
                    .map_or(a.finished_micros, |t| t.max(a.finished_micros)),
            );
            change.trailing_failures += 1;
        }
    }
    by_subscription.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt(subscription_id: i64, succeeded: bool, finished_micros: i64) -> Attempt {
        Attempt {
            subscription_id,
            succeeded,
            finished_micros,
        }
    }

    #[test]
    fn failures_after_the_last_success_are_counted() {
        let changes = summarize([
            attempt(1, false, 10),
            attempt(1, true, 20),
            attempt(1, false, 30),
            attempt(1, false, 40),
        ]);
        assert_eq!(
            changes,
            vec![HealthChange {
                subscription_id: 1,
                last_success_micros: Some(20),
                last_failure_micros: Some(40),
                trailing_failures: 2
            }]
        );
    }

    #[test]
    fn a_success_last_clears_the_run() {
        let changes = summarize([attempt(7, false, 10), attempt(7, true, 20)]);
        assert_eq!(changes[0].trailing_failures, 0);
        assert_eq!(changes[0].last_failure_micros, Some(10));
    }

    #[test]
    fn subscriptions_are_kept_apart() {
        let changes = summarize([
            attempt(2, false, 5),
            attempt(1, true, 6),
            attempt(2, false, 7),
        ]);
        assert_eq!(changes.len(), 2);
        assert_eq!(
            (
                changes[0].subscription_id,
                changes[0].trailing_failures,
                changes[0].last_failure_micros
            ),
            (1, 0, None)
        );
        assert_eq!(
            (
                changes[1].subscription_id,
                changes[1].trailing_failures,
                changes[1].last_success_micros
            ),
            (2, 2, None)
        );
    }
}
