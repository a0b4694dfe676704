//! Durations in settings: the short form ('30s', '7d') and PostgreSQL's
//! interval words ('7 days', '1 hour 30 minutes', '00:10:00'). Pure logic.

use std::time::Duration;

/// Longest duration any setting may name: 10 years. Longer ones are refused
/// (as invalid) rather than clamped, so a typo is reported; within this bound
/// `Instant + duration`, jitter and SQL intervals cannot overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 86_400);

/// What a duration looks like, for error messages.
pub const SYNTAX: &str = "a duration like '30s', '7d' or '7 days' (units ms, s, min, h, d, w; \
     a bare number is seconds; at most 3650 days)";

/// Parses a duration: one or more `<number><unit>` parts ("1h30m", "1 hour
/// 30 minutes", "250ms", "7 days"), an `hh:mm[:ss]` clock ("00:10:00", after
/// days as in "1 day 02:00:00"), or a bare number of seconds. None when
/// malformed, negative or longer than `MAX_DURATION`.
pub fn parse(text: &str) -> Option<Duration> {
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    let mut secs = 0.0_f64;
    while !rest.is_empty() {
        let (number, after) = split_number(rest)?;
        if let Some(clock) = after.strip_prefix(':') {
            // hh:mm[:ss], the last part of an interval.
            let (minutes, after) = split_number(clock)?;
            let (seconds, after) = match after.strip_prefix(':') {
                Some(s) => split_number(s)?,
                None => (0.0, after),
            };
            if !after.trim().is_empty() || minutes >= 60.0 || seconds >= 60.0 {
                return None;
            }
            secs += number * 3600.0 + minutes * 60.0 + seconds;
            break;
        }
        let after = after.trim_start();
        let unit_len = after
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        let unit_secs = match unit.to_ascii_lowercase().as_str() {
            // A bare number stands alone: "10" is ten seconds, "1h 10" is a typo.
            "" if secs == 0.0 && after.trim().is_empty() => 1.0,
            "ms" | "msec" | "msecs" | "millisecond" | "milliseconds" => 0.001,
            "s" | "sec" | "secs" | "second" | "seconds" => 1.0,
            "m" | "min" | "mins" | "minute" | "minutes" => 60.0,
            "h" | "hr" | "hrs" | "hour" | "hours" => 3600.0,
            "d" | "day" | "days" => 86_400.0,
            "w" | "week" | "weeks" => 7.0 * 86_400.0,
            _ => return None,
        };
        secs += number * unit_secs;
        rest = after.trim_start();
    }
    // Compared as f64 first: from_secs_f64 panics on values beyond u64 seconds.
    (secs.is_finite() && secs <= MAX_DURATION.as_secs_f64()).then(|| Duration::from_secs_f64(secs))
}

/// A retention: `never` (or nothing) keeps for ever, `Some(None)`; else a
/// duration, `Some(Some(d))`. None when malformed.
pub fn parse_retention(text: &str) -> Option<Option<Duration>> {
    let text = text.trim();
    if text.is_empty() || text.eq_ignore_ascii_case("never") {
        return Some(None);
    }
    parse(text).map(Some)
}

/// A leading non-negative decimal number and the text after it.
fn split_number(text: &str) -> Option<(f64, &str)> {
    let end = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, rest) = text.split_at(end);
    let value: f64 = number.parse().ok()?;
    value.is_finite().then_some((value, rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retentions_are_durations_or_never() {
        assert_eq!(parse_retention("never"), Some(None));
        assert_eq!(parse_retention(" Never "), Some(None));
        assert_eq!(parse_retention(""), Some(None));
        assert_eq!(
            parse_retention("400d"),
            Some(Some(Duration::from_secs(400 * 86_400)))
        );
        assert_eq!(parse_retention("forever"), None);
    }

    #[test]
    fn short_forms() {
        assert_eq!(parse("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse("2d"), Some(Duration::from_secs(172_800)));
        assert_eq!(parse("10"), Some(Duration::from_secs(10)));
        assert_eq!(parse("1h30m"), Some(Duration::from_secs(5400)));
    }

    #[test]
    fn postgres_interval_words_and_clocks() {
        assert_eq!(parse("7 days"), Some(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse("1 day"), Some(Duration::from_secs(86_400)));
        assert_eq!(parse("1 week"), Some(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse("1 hour 30 minutes"), Some(Duration::from_secs(5400)));
        assert_eq!(parse("30 Seconds"), Some(Duration::from_secs(30)));
        assert_eq!(parse("500 milliseconds"), Some(Duration::from_millis(500)));
        assert_eq!(parse("00:10:00"), Some(Duration::from_secs(600)));
        assert_eq!(parse("01:30"), Some(Duration::from_secs(5400)));
        assert_eq!(parse("1 day 02:00:00"), Some(Duration::from_secs(93_600)));
    }

    #[test]
    fn malformed_values_are_refused() {
        for bad in [
            "",
            " ",
            "banana",
            "5 parsecs",
            "-1s",
            "1h 10",
            "s",
            "1..2s",
            "00:61",
            "1:00 x",
            "7 days ago",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn huge_durations_are_refused_not_panicked_on() {
        assert_eq!(parse("100000000000d"), None);
        assert_eq!(parse("1e400"), None);
        assert_eq!(parse("99999999999999999999999999999s"), None);
        assert_eq!(parse("3650d"), Some(MAX_DURATION));
        assert_eq!(parse("3651 days"), None);
        assert_eq!(parse("99999999999999999999:00"), None);
    }
}
