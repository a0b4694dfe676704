//! Subscription filters: which events a subscription receives. Parsed from
//! the `filters` jsonb once when subscriptions are cached. Pure logic.

use serde_json::Value;
use thiserror::Error;

use crate::milestones::{self, Counted, ThresholdError};
use crate::window;

/// Longest digest window: a day (the shortest is a window's, a minute).
const DIGEST_MAX_MINUTES: i64 = 24 * 60;

const KEYS: [&str; 7] = [
    "campaign",
    "tags",
    "countries",
    "device",
    "exclude_bots",
    "milestones",
    "digest",
];
const DEVICES: [&str; 5] = ["mobile", "tablet", "desktop", "bot", "unknown"];

#[derive(Debug, Error, PartialEq, Eq)]
pub enum FilterError {
    #[error("invalid filters: must be a JSON object")]
    NotObject,
    #[error(
        "invalid filters: unknown key '{0}' (allowed: campaign, tags, countries, device, exclude_bots, milestones, digest)"
    )]
    UnknownKey(String),
    #[error("invalid filters.{0}: must be a string or an array of non-empty strings")]
    NotStrings(&'static str),
    #[error("invalid filters.device: '{0}' is not one of mobile, tablet, desktop, bot, unknown")]
    Device(String),
    #[error("invalid filters.countries: '{0}' is not a two-letter country code")]
    Country(String),
    #[error("invalid filters.exclude_bots: must be true or false")]
    ExcludeBots,
    #[error(transparent)]
    Milestones(#[from] ThresholdError),
    #[error(
        "invalid filters.digest: must be a window from 1 minute to 1 day, like '5m' or '1 hour'"
    )]
    Digest,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filters {
    campaigns: Option<Vec<String>>,
    tags: Option<Vec<String>>,
    countries: Option<Vec<String>>,
    devices: Option<Vec<String>>,
    exclude_bots: bool,
    /// Milestone thresholds this subscription wants instead of the rules' lists.
    milestones: Option<Vec<i64>>,
    /// Minutes per link.clicks.digest, sent instead of one event per click.
    digest_minutes: Option<i64>,
}

impl Default for Filters {
    fn default() -> Self {
        Filters {
            campaigns: None,
            tags: None,
            countries: None,
            devices: None,
            exclude_bots: true,
            milestones: None,
            digest_minutes: None,
        }
    }
}

/// What a filter looks at in one event.
#[derive(Debug, Default, Clone, Copy)]
pub struct Facts<'a> {
    pub campaign: Option<&'a str>,
    pub tags: &'a [String],
    /// Present for click events only.
    pub click: Option<ClickFacts<'a>>,
    /// Present for milestone events only.
    pub milestone: Option<MilestoneFacts>,
}

#[derive(Debug, Clone, Copy)]
pub struct MilestoneFacts {
    pub threshold: i64,
    /// Whether the threshold is in the link's (or campaign's) list from the rules.
    pub listed: bool,
    pub counted: Counted,
}

#[derive(Debug, Clone, Copy)]
pub struct ClickFacts<'a> {
    pub country: Option<&'a str>,
    pub device: Option<&'a str>,
    pub is_bot: bool,
}

/// The facts of a stored event body other than a click's: its link's (or
/// campaign's) name and tags, and a milestone's threshold and counting.
#[derive(Debug, Default, PartialEq)]
pub struct StoredFacts {
    pub campaign: Option<String>,
    pub tags: Vec<String>,
    pub milestone: Option<(i64, Counted)>,
}

impl StoredFacts {
    pub fn of_body(body: &Value) -> StoredFacts {
        let data = &body["data"];
        let link = &data["link"];
        let campaign = link["campaign"]
            .as_str()
            .or_else(|| data["campaign"]["name"].as_str())
            .map(str::to_string);
        let tags = link["tags"]
            .as_array()
            .map(|t| {
                t.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let milestone = data["milestone"]["threshold"].as_i64().map(|threshold| {
            let counted = match data["milestone"]["counted"].as_str() {
                Some("all") => Counted::All,
                _ => Counted::Humans,
            };
            (threshold, counted)
        });
        StoredFacts {
            campaign,
            tags,
            milestone,
        }
    }

    /// As the filters read them; `listed`: whether a milestone came from the rules' lists.
    pub fn facts(&self, listed: bool) -> Facts<'_> {
        Facts {
            campaign: self.campaign.as_deref(),
            tags: &self.tags,
            click: None,
            milestone: self.milestone.map(|(threshold, counted)| MilestoneFacts {
                threshold,
                listed,
                counted,
            }),
        }
    }
}

impl Filters {
    pub fn parse(value: &Value) -> Result<Filters, FilterError> {
        let Value::Object(obj) = value else {
            return Err(FilterError::NotObject);
        };
        if let Some(key) = obj.keys().find(|k| !KEYS.contains(&k.as_str())) {
            return Err(FilterError::UnknownKey(key.clone()));
        }
        let strings = |key: &'static str| -> Result<Option<Vec<String>>, FilterError> {
            match obj.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) if !s.is_empty() => Ok(Some(vec![s.clone()])),
                Some(Value::Array(items)) => items
                    .iter()
                    .map(|v| v.as_str().filter(|s| !s.is_empty()).map(str::to_string))
                    .collect::<Option<Vec<_>>>()
                    .map(Some)
                    .ok_or(FilterError::NotStrings(key)),
                Some(_) => Err(FilterError::NotStrings(key)),
            }
        };
        let campaigns = strings("campaign")?;
        let tags = strings("tags")?;
        let countries = strings("countries")?
            .map(|list| {
                list.into_iter()
                    .map(|c| country_code(&c).ok_or(FilterError::Country(c)))
                    .collect::<Result<Vec<_>, _>>()
            })
            .transpose()?;
        let devices = strings("device")?;
        if let Some(bad) = devices
            .iter()
            .flatten()
            .find(|d| !DEVICES.contains(&d.as_str()))
        {
            return Err(FilterError::Device(bad.clone()));
        }
        let exclude_bots = match obj.get("exclude_bots") {
            None | Some(Value::Null) => true,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(FilterError::ExcludeBots),
        };
        let milestones = match obj.get("milestones") {
            None | Some(Value::Null) => None,
            Some(list) => Some(milestones::parse_thresholds("filters.milestones", list)?),
        };
        let digest_minutes = match obj.get("digest") {
            None | Some(Value::Null) => None,
            Some(value) => Some(
                value
                    .as_str()
                    .and_then(window::window_minutes)
                    .filter(|m| *m <= DIGEST_MAX_MINUTES)
                    .ok_or(FilterError::Digest)?,
            ),
        };
        Ok(Filters {
            campaigns,
            tags,
            countries,
            devices,
            exclude_bots,
            milestones,
            digest_minutes,
        })
    }

    /// The subscription's own milestone thresholds, and which clicks they count.
    pub fn milestones(&self) -> Option<(&[i64], Counted)> {
        self.milestones
            .as_deref()
            .map(|list| (list, self.counted()))
    }

    /// The digest window in minutes, for a subscription that asked for
    /// link.clicks.digest instead of one event per click.
    pub fn digest_minutes(&self) -> Option<i64> {
        self.digest_minutes
    }

    /// Subscriptions that receive bot clicks count them toward milestones too.
    fn counted(&self) -> Counted {
        if self.exclude_bots {
            Counted::Humans
        } else {
            Counted::All
        }
    }

    pub fn matches(&self, facts: &Facts) -> bool {
        let one_of = |allowed: &Option<Vec<String>>, got: Option<&str>| match allowed {
            None => true,
            Some(list) => got.is_some_and(|g| list.iter().any(|a| a.eq_ignore_ascii_case(g))),
        };
        if !one_of(&self.campaigns, facts.campaign) {
            return false;
        }
        if let Some(wanted) = &self.tags
            && !facts.tags.iter().any(|t| wanted.contains(t))
        {
            return false;
        }
        if let Some(m) = facts.milestone {
            let wanted = match &self.milestones {
                Some(list) => list.contains(&m.threshold),
                None => m.listed,
            };
            return m.counted == self.counted() && wanted;
        }
        match facts.click {
            Some(click) => {
                !(self.exclude_bots && click.is_bot)
                    && one_of(&self.countries, click.country)
                    && one_of(&self.devices, click.device)
            }
            None => true,
        }
    }
}

/// A two-letter ISO 3166-1 country code, upper-cased ("us" → "US"); None for anything else.
pub fn country_code(code: &str) -> Option<String> {
    (code.len() == 2 && code.chars().all(|ch| ch.is_ascii_alphabetic()))
        .then(|| code.to_ascii_uppercase())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn click<'a>(country: &'a str, device: &'a str, is_bot: bool) -> Option<ClickFacts<'a>> {
        Some(ClickFacts {
            country: Some(country),
            device: Some(device),
            is_bot,
        })
    }

    #[test]
    fn defaults_exclude_bots_only() {
        let f = Filters::parse(&json!({})).unwrap();
        assert!(f.matches(&Facts {
            click: click("US", "mobile", false),
            ..Default::default()
        }));
        assert!(!f.matches(&Facts {
            click: click("US", "bot", true),
            ..Default::default()
        }));
        let with_bots = Filters::parse(&json!({"exclude_bots": false})).unwrap();
        assert!(with_bots.matches(&Facts {
            click: click("US", "bot", true),
            ..Default::default()
        }));
    }

    #[test]
    fn milestones() {
        let at = |threshold, listed, counted| Facts {
            milestone: Some(MilestoneFacts {
                threshold,
                listed,
                counted,
            }),
            ..Default::default()
        };
        let default = Filters::parse(&json!({})).unwrap();
        assert!(default.matches(&at(100, true, Counted::Humans)));
        assert!(!default.matches(&at(100, false, Counted::Humans)));
        assert!(!default.matches(&at(100, true, Counted::All)));
        let own = Filters::parse(&json!({"milestones": [10, 20], "exclude_bots": false})).unwrap();
        assert!(own.matches(&at(10, false, Counted::All)));
        assert!(!own.matches(&at(100, true, Counted::All)));
        assert!(!own.matches(&at(10, false, Counted::Humans)));
        assert_eq!(own.milestones(), Some((&[10, 20][..], Counted::All)));
        assert_eq!(
            Filters::parse(&json!({"milestones": [20, 10]})),
            Err(FilterError::Milestones(ThresholdError::NotIncreasing(
                "filters.milestones",
                10,
                20
            )))
        );
    }

    #[test]
    fn digests() {
        let f = Filters::parse(&json!({"digest": "5m"})).unwrap();
        assert_eq!(f.digest_minutes(), Some(5));
        assert_eq!(
            Filters::parse(&json!({"digest": "90s"}))
                .unwrap()
                .digest_minutes(),
            Some(2)
        );
        for bad in [json!("10s"), json!("2d"), json!(5), json!("-5m")] {
            assert_eq!(
                Filters::parse(&json!({"digest": bad})),
                Err(FilterError::Digest)
            );
        }
    }

    #[test]
    fn each_filter() {
        let tags = vec!["social".to_string(), "ig".to_string()];
        let f = Filters::parse(&json!({"campaign": "winter", "tags": ["ig"], "countries": ["us", "DE"], "device": ["mobile"]}))
            .unwrap();
        let base = Facts {
            campaign: Some("winter"),
            tags: &tags,
            click: click("US", "mobile", false),
            milestone: None,
        };
        assert!(f.matches(&base));
        assert!(!f.matches(&Facts {
            campaign: Some("summer"),
            ..base
        }));
        assert!(!f.matches(&Facts {
            campaign: None,
            ..base
        }));
        assert!(!f.matches(&Facts { tags: &[], ..base }));
        assert!(!f.matches(&Facts {
            click: click("FR", "mobile", false),
            ..base
        }));
        assert!(!f.matches(&Facts {
            click: click("US", "desktop", false),
            ..base
        }));
        // click-only filters do not block non-click events
        assert!(f.matches(&Facts {
            click: None,
            ..base
        }));
    }

    #[test]
    fn shape_errors() {
        assert_eq!(Filters::parse(&json!([])), Err(FilterError::NotObject));
        assert_eq!(
            Filters::parse(&json!({"colour": "red"})),
            Err(FilterError::UnknownKey("colour".into()))
        );
        assert_eq!(
            Filters::parse(&json!({"tags": [1]})),
            Err(FilterError::NotStrings("tags"))
        );
        assert_eq!(
            Filters::parse(&json!({"tags": 5})),
            Err(FilterError::NotStrings("tags"))
        );
        assert_eq!(
            Filters::parse(&json!({"device": "phone"})),
            Err(FilterError::Device("phone".into()))
        );
        assert_eq!(
            Filters::parse(&json!({"countries": ["USA"]})),
            Err(FilterError::Country("USA".into()))
        );
        assert_eq!(
            Filters::parse(&json!({"exclude_bots": "yes"})),
            Err(FilterError::ExcludeBots)
        );
    }

    #[test]
    fn country_codes_are_two_letters_upper_cased() {
        assert_eq!(country_code("de").as_deref(), Some("DE"));
        assert_eq!(country_code("US").as_deref(), Some("US"));
        for bad in ["USA", "U", "", "1A", "ÜS"] {
            assert_eq!(country_code(bad), None, "{bad}");
        }
    }

    #[test]
    fn stored_bodies_give_their_facts() {
        let link = serde_json::json!({"type": "link.updated", "data": {"link": {"campaign": "spring", "tags": ["a", "b"]}}});
        assert_eq!(
            StoredFacts::of_body(&link),
            StoredFacts {
                campaign: Some("spring".into()),
                tags: vec!["a".into(), "b".into()],
                milestone: None
            }
        );
        let milestone = serde_json::json!({"data": {"campaign": {"name": "spring"},
            "milestone": {"threshold": 100, "counted": "all"}}});
        let facts = StoredFacts::of_body(&milestone);
        assert_eq!(facts.campaign.as_deref(), Some("spring"));
        assert_eq!(facts.milestone, Some((100, Counted::All)));
        assert_eq!(
            StoredFacts::of_body(&serde_json::json!({})),
            StoredFacts::default()
        );
    }
}
