//! Rules for reactive events (`linkhooks.rules` rows): what a kind's settings
//! may hold. Pure logic; the rules trigger reports these errors.

use serde_json::Value;
use thiserror::Error;

use crate::destination::{self, CheckSettings, Method};
use crate::duration;
use crate::milestones::{self, ThresholdError};
use crate::window::{self, Spike, Threshold};

/// Rule kinds, with the settings keys each accepts.
const KINDS: [(&str, &[&str]); 4] = [
    ("milestones", &["thresholds"]),
    ("threshold", &["clicks", "window"]),
    (
        "spike",
        &["factor", "window", "baseline", "min_clicks", "per_country"],
    ),
    ("health_check", &["interval", "method", "failures"]),
];

/// A spike rule's defaults: 5× the previous day's rate over 10 minutes, at least 50 clicks.
const SPIKE_DEFAULTS: Spike = Spike {
    factor: 5.0,
    window_minutes: 10,
    baseline_minutes: 1440,
    min_clicks: 50,
    per_country: false,
};

#[derive(Debug, Error, PartialEq, Eq)]
pub enum RuleError {
    #[error(
        "invalid kind: '{0}' is not a rule kind (known: milestones, threshold, spike, health_check)"
    )]
    Kind(String),
    #[error("invalid link_id and campaign: a rule applies to one link or one campaign, not both")]
    BothScopes,
    #[error(
        "invalid link_id and campaign: a health_check rule names a link or a campaign (checks are opt-in, never for every link)"
    )]
    HealthScope,
    #[error("invalid settings: must be a JSON object")]
    NotObject,
    #[error("invalid settings: unknown key '{key}' for a {kind} rule (allowed: {allowed})")]
    UnknownKey {
        key: String,
        kind: &'static str,
        allowed: String,
    },
    #[error("invalid settings.{0}: required for a {1} rule")]
    Missing(&'static str, &'static str),
    #[error(transparent)]
    Thresholds(#[from] ThresholdError),
    #[error("invalid settings.clicks: must be a whole number greater than 0")]
    Clicks,
    #[error(
        "invalid settings.window: must be a duration from 1 minute to 7 days, like '10m' or '1 hour'"
    )]
    Window,
    #[error("invalid settings.factor: must be a number greater than 1")]
    Factor,
    #[error("invalid settings.baseline: must be a duration from the window to 7 days, like '24h'")]
    Baseline,
    #[error("invalid settings.min_clicks: must be a whole number greater than 0")]
    MinClicks,
    #[error("invalid settings.per_country: must be true or false")]
    PerCountry,
    #[error("invalid settings.interval: must be a duration from 1 second to 1 day, like '5m'")]
    Interval,
    #[error("invalid settings.method: must be 'HEAD' or 'GET'")]
    Method,
    #[error("invalid settings.failures: must be a whole number from 1 to 10")]
    Failures,
}

/// A checked rule's settings.
#[derive(Debug, Clone, PartialEq)]
pub enum RuleSettings {
    Milestones { thresholds: Vec<i64> },
    Threshold(Threshold),
    Spike(Spike),
    HealthCheck(CheckSettings),
}

pub fn check(
    kind: &str,
    has_link: bool,
    has_campaign: bool,
    settings: &Value,
) -> Result<RuleSettings, RuleError> {
    let (kind, allowed) = KINDS
        .iter()
        .find(|(k, _)| *k == kind)
        .ok_or_else(|| RuleError::Kind(kind.to_string()))?;
    if has_link && has_campaign {
        return Err(RuleError::BothScopes);
    }
    let Value::Object(obj) = settings else {
        return Err(RuleError::NotObject);
    };
    if let Some(key) = obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(RuleError::UnknownKey {
            key: key.clone(),
            kind,
            allowed: allowed.join(", "),
        });
    }
    let required = |key: &'static str| obj.get(key).ok_or(RuleError::Missing(key, kind));
    if *kind == "health_check" {
        if !has_link && !has_campaign {
            return Err(RuleError::HealthScope);
        }
        return health_check(obj);
    }
    if *kind == "spike" {
        let d = SPIKE_DEFAULTS;
        let factor = match obj.get("factor") {
            None => d.factor,
            Some(v) => v.as_f64().filter(|f| *f > 1.0).ok_or(RuleError::Factor)?,
        };
        let minutes = |key: &str, default: i64, error: RuleError| match obj.get(key) {
            None => Ok(default),
            Some(v) => v.as_str().and_then(window::window_minutes).ok_or(error),
        };
        let window_minutes = minutes("window", d.window_minutes, RuleError::Window)?;
        let baseline_minutes = minutes("baseline", d.baseline_minutes, RuleError::Baseline)?;
        if baseline_minutes < window_minutes {
            return Err(RuleError::Baseline);
        }
        let min_clicks = match obj.get("min_clicks") {
            None => d.min_clicks,
            Some(v) => v.as_i64().filter(|n| *n > 0).ok_or(RuleError::MinClicks)?,
        };
        let per_country = match obj.get("per_country") {
            None => d.per_country,
            Some(v) => v.as_bool().ok_or(RuleError::PerCountry)?,
        };
        return Ok(RuleSettings::Spike(Spike {
            factor,
            window_minutes,
            baseline_minutes,
            min_clicks,
            per_country,
        }));
    }
    if *kind == "threshold" {
        let clicks = required("clicks")?
            .as_i64()
            .filter(|n| *n > 0)
            .ok_or(RuleError::Clicks)?;
        let window_minutes = required("window")?
            .as_str()
            .and_then(window::window_minutes)
            .ok_or(RuleError::Window)?;
        return Ok(RuleSettings::Threshold(Threshold {
            clicks,
            window_minutes,
        }));
    }
    Ok(RuleSettings::Milestones {
        thresholds: milestones::parse_thresholds("settings.thresholds", required("thresholds")?)?,
    })
}

fn health_check(obj: &serde_json::Map<String, Value>) -> Result<RuleSettings, RuleError> {
    let d = CheckSettings::default();
    let interval = match obj.get("interval") {
        None => None,
        Some(v) => Some(
            v.as_str()
                .and_then(duration::parse)
                .filter(|i| (destination::MIN_INTERVAL..=destination::MAX_INTERVAL).contains(i))
                .ok_or(RuleError::Interval)?,
        ),
    };
    let method = match obj.get("method") {
        None => d.method,
        Some(v) => v
            .as_str()
            .and_then(Method::parse)
            .ok_or(RuleError::Method)?,
    };
    let failures = match obj.get("failures") {
        None => d.failures,
        Some(v) => v
            .as_i64()
            .filter(|n| (1..=destination::MAX_FAILURES).contains(n))
            .ok_or(RuleError::Failures)? as i32,
    };
    Ok(RuleSettings::HealthCheck(CheckSettings {
        interval,
        method,
        failures,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn milestone_rules() {
        assert_eq!(
            check("milestones", true, false, &json!({"thresholds": [10, 20]})),
            Ok(RuleSettings::Milestones {
                thresholds: vec![10, 20]
            })
        );
        assert_eq!(
            check("milestone", false, false, &json!({})),
            Err(RuleError::Kind("milestone".into()))
        );
        assert_eq!(
            check("milestones", true, true, &json!({"thresholds": [1]})),
            Err(RuleError::BothScopes)
        );
        assert_eq!(
            check("milestones", false, false, &json!({})),
            Err(RuleError::Missing("thresholds", "milestones"))
        );
        let unknown = check(
            "milestones",
            false,
            false,
            &json!({"thresholds": [1], "window": "1m"}),
        );
        assert_eq!(
            unknown.unwrap_err().to_string(),
            "invalid settings: unknown key 'window' for a milestones rule (allowed: thresholds)"
        );
        assert_eq!(
            check("milestones", false, false, &json!({"thresholds": [5, 1]}))
                .unwrap_err()
                .to_string(),
            "invalid settings.thresholds: thresholds must increase (1 comes after 5)"
        );
        assert_eq!(
            check("milestones", false, false, &json!([])),
            Err(RuleError::NotObject)
        );
    }

    #[test]
    fn spike_rules() {
        assert_eq!(
            check("spike", false, false, &json!({})),
            Ok(RuleSettings::Spike(SPIKE_DEFAULTS))
        );
        assert_eq!(
            check(
                "spike",
                true,
                false,
                &json!({"factor": 3, "window": "5m", "baseline": "1h", "min_clicks": 10, "per_country": true})
            ),
            Ok(RuleSettings::Spike(Spike {
                factor: 3.0,
                window_minutes: 5,
                baseline_minutes: 60,
                min_clicks: 10,
                per_country: true
            }))
        );
        for (settings, error) in [
            (json!({"factor": 1}), RuleError::Factor),
            (
                json!({"window": "1h", "baseline": "30m"}),
                RuleError::Baseline,
            ),
            (json!({"baseline": "30d"}), RuleError::Baseline),
            (json!({"min_clicks": 0}), RuleError::MinClicks),
            (json!({"per_country": "yes"}), RuleError::PerCountry),
        ] {
            assert_eq!(check("spike", false, false, &settings), Err(error));
        }
    }

    #[test]
    fn threshold_rules() {
        assert_eq!(
            check(
                "threshold",
                false,
                true,
                &json!({"clicks": 100, "window": "10m"})
            ),
            Ok(RuleSettings::Threshold(Threshold {
                clicks: 100,
                window_minutes: 10
            }))
        );
        for (settings, error) in [
            (json!({"clicks": 0, "window": "10m"}), RuleError::Clicks),
            (json!({"clicks": "100", "window": "10m"}), RuleError::Clicks),
            (json!({"clicks": 5, "window": "-10m"}), RuleError::Window),
            (json!({"clicks": 5, "window": "10s"}), RuleError::Window),
            (
                json!({"clicks": 5}),
                RuleError::Missing("window", "threshold"),
            ),
        ] {
            assert_eq!(check("threshold", false, false, &settings), Err(error));
        }
    }

    #[test]
    fn health_check_rules() {
        assert_eq!(
            check("health_check", true, false, &json!({})),
            Ok(RuleSettings::HealthCheck(CheckSettings::default()))
        );
        assert_eq!(
            check(
                "health_check",
                false,
                true,
                &json!({"interval": "30s", "method": "get", "failures": 1})
            ),
            Ok(RuleSettings::HealthCheck(CheckSettings {
                interval: Some(std::time::Duration::from_secs(30)),
                method: Method::Get,
                failures: 1
            }))
        );
        assert_eq!(
            check("health_check", false, false, &json!({})),
            Err(RuleError::HealthScope)
        );
        for (settings, error) in [
            (json!({"interval": "0s"}), RuleError::Interval),
            (json!({"interval": "2d"}), RuleError::Interval),
            (json!({"interval": 60}), RuleError::Interval),
            (json!({"method": "POST"}), RuleError::Method),
            (json!({"failures": 0}), RuleError::Failures),
            (json!({"failures": 11}), RuleError::Failures),
        ] {
            assert_eq!(check("health_check", true, false, &settings), Err(error));
        }
    }
}
