//! Milestones: threshold lists, which thresholds a batch of clicks crossed,
//! and the settings of `milestones` rules. Pure logic.

use serde_json::Value;
use thiserror::Error;

/// Thresholds used where no rule sets a list.
pub const DEFAULT_THRESHOLDS: [i64; 11] = [
    100, 500, 1_000, 5_000, 10_000, 50_000, 100_000, 500_000, 1_000_000, 5_000_000, 10_000_000,
];

/// Longest threshold list a rule or a subscription may give.
pub const MAX_THRESHOLDS: usize = 100;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ThresholdError {
    #[error("invalid {0}: must be a non-empty array of whole numbers")]
    NotNumbers(&'static str),
    #[error("invalid {0}: at most {MAX_THRESHOLDS} thresholds")]
    TooMany(&'static str),
    #[error("invalid {0}: thresholds must be greater than 0 (got {1})")]
    NotPositive(&'static str, i64),
    #[error("invalid {0}: thresholds must increase ({1} comes after {2})")]
    NotIncreasing(&'static str, i64, i64),
}

/// A threshold list from JSON: a non-empty array of strictly increasing
/// positive integers. `field` names it in errors (e.g. `filters.milestones`).
pub fn parse_thresholds(field: &'static str, value: &Value) -> Result<Vec<i64>, ThresholdError> {
    let items = value
        .as_array()
        .filter(|a| !a.is_empty())
        .ok_or(ThresholdError::NotNumbers(field))?;
    if items.len() > MAX_THRESHOLDS {
        return Err(ThresholdError::TooMany(field));
    }
    let list = items
        .iter()
        .map(Value::as_i64)
        .collect::<Option<Vec<i64>>>()
        .ok_or(ThresholdError::NotNumbers(field))?;
    if let Some(bad) = list.iter().find(|t| **t <= 0) {
        return Err(ThresholdError::NotPositive(field, *bad));
    }
    if let Some(pair) = list.windows(2).find(|w| w[1] <= w[0]) {
        return Err(ThresholdError::NotIncreasing(field, pair[1], pair[0]));
    }
    Ok(list)
}

/// The thresholds in `thresholds` that a count going from `before` to
/// `after` reached: `before < t <= after`, in increasing order.
pub fn crossed(before: i64, after: i64, thresholds: &[i64]) -> Vec<i64> {
    thresholds
        .iter()
        .copied()
        .filter(|t| before < *t && *t <= after)
        .collect()
}

/// Which clicks a milestone counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Counted {
    /// Clicks not flagged as bots (the default).
    Humans,
    /// Every click: for subscriptions whose filters set `exclude_bots: false`.
    All,
}

impl Counted {
    pub fn as_str(self) -> &'static str {
        match self {
            Counted::Humans => "humans",
            Counted::All => "all",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn crossing() {
        let t = [100, 500, 1000];
        assert_eq!(crossed(99, 100, &t), vec![100]);
        assert_eq!(crossed(100, 101, &t), Vec::<i64>::new());
        // A burst crosses several at once; each fires.
        assert_eq!(crossed(50, 1200, &t), vec![100, 500, 1000]);
        assert_eq!(crossed(0, 0, &t), Vec::<i64>::new());
    }

    #[test]
    fn threshold_lists() {
        assert_eq!(
            parse_thresholds("f", &json!([1, 10, 100])),
            Ok(vec![1, 10, 100])
        );
        assert_eq!(
            parse_thresholds("f", &json!([])),
            Err(ThresholdError::NotNumbers("f"))
        );
        assert_eq!(
            parse_thresholds("f", &json!([1, "2"])),
            Err(ThresholdError::NotNumbers("f"))
        );
        assert_eq!(
            parse_thresholds("f", &json!([1.5])),
            Err(ThresholdError::NotNumbers("f"))
        );
        assert_eq!(
            parse_thresholds("f", &json!([0, 5])),
            Err(ThresholdError::NotPositive("f", 0))
        );
        assert_eq!(
            parse_thresholds("f", &json!([10, 5])),
            Err(ThresholdError::NotIncreasing("f", 5, 10))
        );
        assert_eq!(
            parse_thresholds("f", &json!([10, 10])),
            Err(ThresholdError::NotIncreasing("f", 10, 10))
        );
        let long: Vec<i64> = (1..=101).collect();
        assert_eq!(
            parse_thresholds("f", &json!(long)),
            Err(ThresholdError::TooMany("f"))
        );
        assert_eq!(
            ThresholdError::NotIncreasing("rules.settings.thresholds", 5, 10).to_string(),
            "invalid rules.settings.thresholds: thresholds must increase (5 comes after 10)"
        );
    }
}
