//! Click-rate thresholds (`link.threshold`): N clicks within a window, fired
//! when the count reaches N and re-armed once it has stayed below N for a
//! whole window, so one burst fires once. Counts come from per-minute buckets,
//! so windows are whole minutes. Pure logic.

use std::time::Duration;

use crate::duration;

/// Shortest and longest window a threshold may have.
pub const MIN_WINDOW: Duration = Duration::from_secs(60);
pub const MAX_WINDOW: Duration = Duration::from_secs(7 * 86_400);

/// N clicks within a window of whole minutes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Threshold {
    pub clicks: i64,
    pub window_minutes: i64,
}

/// A window from its text ('10m', '1 hour'), rounded up to whole minutes;
/// None when it is not a duration or outside MIN_WINDOW..=MAX_WINDOW.
pub fn window_minutes(text: &str) -> Option<i64> {
    let d = duration::parse(text).filter(|d| (MIN_WINDOW..=MAX_WINDOW).contains(d))?;
    Some(d.as_secs().div_ceil(60) as i64)
}

/// What one evaluation does to a threshold's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Nothing changes.
    Stay,
    /// Armed and reached: fire, and remember it fired.
    Fire,
    /// Fired and fell below N: remember since when (Unix seconds).
    FellBelow(i64),
    /// Fired, had fallen below, and is back at N or above: forget when it fell.
    BackAbove,
    /// Below N for a whole window: armed again.
    Rearm,
}

/// The next step for a threshold whose window holds `count` clicks at `now`
/// (Unix seconds). `fired` is None while armed, else since when the count has
/// been below N (None: it has not fallen below since it fired).
pub fn step(rule: Threshold, fired: Option<Option<i64>>, count: i64, now: i64) -> Step {
    let reached = count >= rule.clicks;
    match fired {
        None if reached => Step::Fire,
        None => Step::Stay,
        Some(Some(_)) if reached => Step::BackAbove,
        Some(None) if reached => Step::Stay,
        Some(None) => Step::FellBelow(now),
        Some(Some(since)) if now - since >= rule.window_minutes * 60 => Step::Rearm,
        Some(Some(_)) => Step::Stay,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULE: Threshold = Threshold {
        clicks: 100,
        window_minutes: 10,
    };

    #[test]
    fn fires_once_per_episode_and_rearms_after_a_quiet_window() {
        assert_eq!(step(RULE, None, 99, 0), Step::Stay);
        assert_eq!(step(RULE, None, 100, 0), Step::Fire);
        // Still high: nothing more.
        assert_eq!(step(RULE, Some(None), 250, 60), Step::Stay);
        // Falls below: the quiet window starts.
        assert_eq!(step(RULE, Some(None), 40, 120), Step::FellBelow(120));
        assert_eq!(step(RULE, Some(Some(120)), 40, 120 + 599), Step::Stay);
        // Back above within the window: the same episode goes on.
        assert_eq!(step(RULE, Some(Some(120)), 120, 300), Step::BackAbove);
        // Below for a whole window: armed again, and the next crossing fires.
        assert_eq!(step(RULE, Some(Some(120)), 10, 120 + 600), Step::Rearm);
        assert_eq!(step(RULE, None, 100, 2000), Step::Fire);
    }

    #[test]
    fn windows_are_whole_minutes_within_bounds() {
        assert_eq!(window_minutes("10m"), Some(10));
        assert_eq!(window_minutes("90s"), Some(2));
        assert_eq!(window_minutes("1 hour"), Some(60));
        assert_eq!(window_minutes("7d"), Some(7 * 1440));
        assert_eq!(window_minutes("30s"), None);
        assert_eq!(window_minutes("8d"), None);
        assert_eq!(window_minutes("-5m"), None);
        assert_eq!(window_minutes("soon"), None);
    }
}
