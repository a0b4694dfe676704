//! Destination health checks (`link.broken`, `link.recovered`): what a
//! `health_check` rule asks for, what an answer means, and when a link's
//! status changes. Pure logic; the worker makes the requests (src/probe.rs)
//! and keeps the state (src/health_checks.rs).

use std::time::Duration;

/// Most failed checks in a row a rule may wait for before a link is broken.
pub const MAX_FAILURES: i64 = 10;
/// Shortest and longest interval a rule may ask for.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);
pub const MAX_INTERVAL: Duration = Duration::from_secs(86_400);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Method {
    /// HEAD, then GET if the destination does not allow HEAD (405, 501).
    #[default]
    Head,
    Get,
}

impl Method {
    pub fn parse(text: &str) -> Option<Method> {
        match text.to_ascii_uppercase().as_str() {
            "HEAD" => Some(Method::Head),
            "GET" => Some(Method::Get),
            _ => None,
        }
    }
}

/// A `health_check` rule's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckSettings {
    /// None: `linkhooks.health_check_interval`.
    pub interval: Option<Duration>,
    pub method: Method,
    /// Failed checks in a row that make a link broken.
    pub failures: i32,
}

impl Default for CheckSettings {
    fn default() -> Self {
        CheckSettings {
            interval: None,
            method: Method::Head,
            failures: 2,
        }
    }
}

/// An answer's verdict: any status below 400 (a redirect is an answer) is healthy.
pub fn status_is_healthy(status: u16) -> bool {
    status < 400
}

/// HEAD refused as a method: ask again with GET.
pub fn head_refused(status: u16) -> bool {
    matches!(status, 405 | 501)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Not checked yet, or failing fewer times in a row than the rule allows.
    Unknown,
    Healthy,
    Broken,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Unknown => "unknown",
            Status::Healthy => "healthy",
            Status::Broken => "broken",
        }
    }

    pub fn parse(text: &str) -> Status {
        match text {
            "healthy" => Status::Healthy,
            "broken" => Status::Broken,
            _ => Status::Unknown,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct State {
    pub status: Status,
    /// Failed checks since the last healthy one.
    pub failures: i32,
}

/// What a check changed that subscribers hear about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Broken,
    Recovered,
}

/// The state after one check. A link is broken once `failures_to_break`
/// checks in a row failed (from any status: a destination dead from the
/// start is news too) and recovers at its first healthy check; a link that
/// was never broken becomes healthy silently.
pub fn step(state: State, healthy: bool, failures_to_break: i32) -> (State, Option<Change>) {
    if healthy {
        let change = (state.status == Status::Broken).then_some(Change::Recovered);
        let next = State {
            status: Status::Healthy,
            failures: 0,
        };
        return (next, change);
    }
    let failures = state.failures.saturating_add(1);
    if state.status == Status::Broken {
        return (State { failures, ..state }, None);
    }
    if failures >= failures_to_break.max(1) {
        let next = State {
            status: Status::Broken,
            failures,
        };
        return (next, Some(Change::Broken));
    }
    (State { failures, ..state }, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NEW: State = State {
        status: Status::Unknown,
        failures: 0,
    };

    fn run(checks: &[bool], failures_to_break: i32) -> Vec<Option<Change>> {
        let mut state = NEW;
        checks
            .iter()
            .map(|&healthy| {
                let (next, change) = step(state, healthy, failures_to_break);
                state = next;
                change
            })
            .collect()
    }

    #[test]
    fn broken_after_enough_failures_in_a_row_then_recovered_once() {
        use Change::*;
        assert_eq!(
            run(&[true, false, true, false, false, false, true, true], 2),
            vec![
                None,
                None,
                None,
                None,
                Some(Broken),
                None,
                Some(Recovered),
                None
            ]
        );
    }

    #[test]
    fn a_destination_dead_from_the_start_is_reported() {
        assert_eq!(run(&[false], 1), vec![Some(Change::Broken)]);
        // And a healthy first check is no news.
        assert_eq!(run(&[true], 1), vec![None]);
    }

    #[test]
    fn failures_are_counted_while_broken() {
        let (state, _) = step(NEW, false, 1);
        let (state, change) = step(state, false, 1);
        assert_eq!(
            (state, change),
            (
                State {
                    status: Status::Broken,
                    failures: 2
                },
                None
            )
        );
    }

    #[test]
    fn answers() {
        assert!(status_is_healthy(200) && status_is_healthy(301) && status_is_healthy(304));
        assert!(!status_is_healthy(404) && !status_is_healthy(500));
        assert!(head_refused(405) && !head_refused(404));
        assert_eq!(Method::parse("get"), Some(Method::Get));
        assert_eq!(Method::parse("POST"), None);
        assert_eq!(Status::parse(Status::Broken.as_str()), Status::Broken);
    }
}
