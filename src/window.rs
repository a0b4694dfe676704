//! Click-rate rules over windows: `link.threshold` (N clicks within a window)
//! and `link.spike` (a window's clicks at least k times the trailing
//! baseline's rate, with a minimum volume). Each fires when its condition
//! starts to hold and re-arms once it has not held for a whole window, so one
//! burst or one episode fires once. Counts come from per-minute buckets, so
//! windows are whole minutes. Pure logic.

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

/// A spike: the clicks of the last `window_minutes` are at least `factor`
/// times what the `baseline_minutes` before them averaged per window, and at
/// least `min_clicks`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spike {
    pub factor: f64,
    pub window_minutes: i64,
    pub baseline_minutes: i64,
    pub min_clicks: i64,
    /// Each country of the link (or campaign) against its own baseline.
    pub per_country: bool,
}

impl Spike {
    /// Clicks per window the baseline period averaged.
    pub fn expected(&self, baseline_clicks: i64) -> f64 {
        baseline_clicks as f64 * self.window_minutes as f64 / self.baseline_minutes as f64
    }

    /// Whether `clicks` in the window, against `baseline_clicks` in the baseline period, is a spike.
    pub fn holds(&self, clicks: i64, baseline_clicks: i64) -> bool {
        clicks >= self.min_clicks && clicks as f64 >= self.factor * self.expected(baseline_clicks)
    }
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

/// The next step for a rule whose condition does (`reached`) or does not hold
/// at `now` (Unix seconds). `fired` is None while armed, else since when the
/// condition has not held (None: it has held ever since it fired).
pub fn step(reached: bool, window_minutes: i64, fired: Option<Option<i64>>, now: i64) -> Step {
    match fired {
        None if reached => Step::Fire,
        None => Step::Stay,
        Some(Some(_)) if reached => Step::BackAbove,
        Some(None) if reached => Step::Stay,
        Some(None) => Step::FellBelow(now),
        Some(Some(since)) if now - since >= window_minutes * 60 => Step::Rearm,
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

    fn count(fired: Option<Option<i64>>, clicks: i64, now: i64) -> Step {
        step(clicks >= RULE.clicks, RULE.window_minutes, fired, now)
    }

    #[test]
    fn fires_once_per_episode_and_rearms_after_a_quiet_window() {
        assert_eq!(count(None, 99, 0), Step::Stay);
        assert_eq!(count(None, 100, 0), Step::Fire);
        // Still high: nothing more.
        assert_eq!(count(Some(None), 250, 60), Step::Stay);
        // Falls below: the quiet window starts.
        assert_eq!(count(Some(None), 40, 120), Step::FellBelow(120));
        assert_eq!(count(Some(Some(120)), 40, 120 + 599), Step::Stay);
        // Back above within the window: the same episode goes on.
        assert_eq!(count(Some(Some(120)), 120, 300), Step::BackAbove);
        // Below for a whole window: armed again, and the next crossing fires.
        assert_eq!(count(Some(Some(120)), 10, 120 + 600), Step::Rearm);
        assert_eq!(count(None, 100, 2000), Step::Fire);
    }

    #[test]
    fn spikes_need_the_factor_and_the_volume() {
        let spike = Spike {
            factor: 5.0,
            window_minutes: 10,
            baseline_minutes: 1440,
            min_clicks: 50,
            per_country: false,
        };
        // 1,440 clicks a day is 10 per 10 minutes.
        assert_eq!(spike.expected(1440), 10.0);
        assert!(spike.holds(50, 1440));
        assert!(!spike.holds(49, 1440), "too few clicks");
        assert!(
            !spike.holds(400, 144_000),
            "a steady high-volume link: 400 against 1,000 expected"
        );
        assert!(spike.holds(60, 0), "a link with no history that gets busy");
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
