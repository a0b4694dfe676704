//! When to try a delivery again: the retry schedule setting, jitter,
//! `Retry-After`, and what an HTTP outcome means. Pure logic.

use std::time::Duration;

use thiserror::Error;

use crate::duration;

pub const DEFAULT_SCHEDULE: &str = "1m,5m,30m,2h,24h";
/// Jitter applied to every scheduled delay: ±20%.
pub const JITTER: f64 = 0.2;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ScheduleError {
    #[error(
        "invalid linkhooks.retry_schedule: must be a comma-separated list of delays like '1m,5m,30m,2h,24h' (units ms, s, min, h, d, w); '{0}' is not one"
    )]
    Step(String),
    #[error("invalid linkhooks.retry_schedule: must list at least one delay")]
    Empty,
}

/// Parsed `linkhooks.retry_schedule`: the delay before each retry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    steps: Vec<Duration>,
}

impl Schedule {
    pub fn parse(text: &str) -> Result<Self, ScheduleError> {
        let steps = text
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| duration::parse(s).ok_or_else(|| ScheduleError::Step(s.to_string())))
            .collect::<Result<Vec<_>, _>>()?;
        if steps.is_empty() {
            return Err(ScheduleError::Empty);
        }
        Ok(Schedule { steps })
    }

    /// Attempts allowed when `linkhooks.max_attempts` is 0: one plus one per step.
    pub fn default_max_attempts(&self) -> i32 {
        self.steps.len() as i32 + 1
    }

    pub fn last_step(&self) -> Duration {
        *self.steps.last().expect("a schedule has at least one step")
    }

    /// Delay before the attempt after attempt number `attempt` (1-based),
    /// without jitter. A schedule shorter than the attempt count repeats its last step.
    pub fn base_delay(&self, attempt: i32) -> Duration {
        let idx = (attempt.max(1) as usize - 1).min(self.steps.len() - 1);
        self.steps[idx]
    }

    /// `base_delay` with ±20% jitter; `unit` is a random number in [0, 1).
    pub fn delay(&self, attempt: i32, unit: f64) -> Duration {
        self.base_delay(attempt)
            .mul_f64(1.0 - JITTER + 2.0 * JITTER * unit.clamp(0.0, 1.0))
    }
}

impl Default for Schedule {
    fn default() -> Self {
        Schedule::parse(DEFAULT_SCHEDULE).expect("the default schedule parses")
    }
}

/// A `Retry-After` header in seconds (the HTTP-date form is treated as absent).
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// What one HTTP attempt means for its delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Delivered,
    /// Try again after this delay.
    Retry(Duration),
    /// Out of attempts: a dead letter.
    Dead,
    /// 410 Gone: the receiver asked us to stop; the subscription is disabled.
    Gone,
}

/// Decides what follows an attempt. `status` is None when no response came
/// back (connect error, timeout).
pub fn judge(
    status: Option<u16>,
    retry_after: Option<Duration>,
    attempt: i32,
    max_attempts: i32,
    schedule: &Schedule,
    unit: f64,
) -> Verdict {
    match status {
        Some(200..=299) => return Verdict::Delivered,
        Some(410) => return Verdict::Gone,
        _ => {}
    }
    if attempt >= max_attempts {
        return Verdict::Dead;
    }
    let scheduled = schedule.delay(attempt, unit);
    match (status, retry_after) {
        (Some(429 | 503), Some(after)) => Verdict::Retry(after.min(schedule.last_step())),
        _ => Verdict::Retry(scheduled),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_default_schedule() {
        let s = Schedule::default();
        assert_eq!(s.base_delay(1), Duration::from_secs(60));
        assert_eq!(s.base_delay(2), Duration::from_secs(300));
        assert_eq!(s.base_delay(5), Duration::from_secs(86_400));
        assert_eq!(
            s.base_delay(9),
            Duration::from_secs(86_400),
            "a short schedule repeats its last step"
        );
        assert_eq!(s.default_max_attempts(), 6);
    }

    #[test]
    fn units_and_errors() {
        assert_eq!(
            Schedule::parse("10s, 2 minutes").map(|s| s.base_delay(2)),
            Ok(Duration::from_secs(120))
        );
        assert_eq!(
            Schedule::parse("1m, nope"),
            Err(ScheduleError::Step("nope".into()))
        );
        assert_eq!(Schedule::parse(" , "), Err(ScheduleError::Empty));
    }

    #[test]
    fn huge_durations_are_refused_not_panicked_on() {
        assert!(matches!(
            Schedule::parse("1m,100000000000d"),
            Err(ScheduleError::Step(_))
        ));
        // The longest accepted schedule step, with the most jitter, still fits an Instant.
        let s = Schedule::parse("3650d").unwrap();
        let delay = s.delay(1, 0.999_999);
        assert!(std::time::Instant::now().checked_add(delay).is_some());
    }

    #[test]
    fn jitter_stays_within_twenty_percent() {
        let s = Schedule::parse("100s").unwrap();
        assert_eq!(s.delay(1, 0.0), Duration::from_secs(80));
        assert_eq!(s.delay(1, 0.5), Duration::from_secs(100));
        assert!(s.delay(1, 0.999_999) <= Duration::from_secs(120));
    }

    #[test]
    fn verdicts() {
        let s = Schedule::parse("1s,10s").unwrap();
        assert_eq!(judge(Some(204), None, 1, 3, &s, 0.5), Verdict::Delivered);
        assert_eq!(judge(Some(410), None, 1, 3, &s, 0.5), Verdict::Gone);
        assert_eq!(
            judge(Some(500), None, 1, 3, &s, 0.5),
            Verdict::Retry(Duration::from_secs(1))
        );
        assert_eq!(
            judge(None, None, 2, 3, &s, 0.5),
            Verdict::Retry(Duration::from_secs(10))
        );
        assert_eq!(judge(Some(500), None, 3, 3, &s, 0.5), Verdict::Dead);
        assert_eq!(
            judge(Some(302), None, 1, 3, &s, 0.5),
            Verdict::Retry(Duration::from_secs(1)),
            "redirects are failures"
        );
        // Retry-After is honoured, capped by the schedule's last step
        let after = Some(Duration::from_secs(5));
        assert_eq!(
            judge(Some(429), after, 1, 3, &s, 0.5),
            Verdict::Retry(Duration::from_secs(5))
        );
        let long = Some(Duration::from_secs(3600));
        assert_eq!(
            judge(Some(503), long, 1, 3, &s, 0.5),
            Verdict::Retry(Duration::from_secs(10))
        );
        assert_eq!(parse_retry_after(" 7 "), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
    }
}
