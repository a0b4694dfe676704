//! Rules for links: slugs, UTM parameters and the URL a redirect goes to.
//! Pure logic; the `triggers` module applies it when rows are written.

use serde_json::{Map, Value};
use thiserror::Error;
use url::Url;

use crate::target::{self, UrlError};

pub const MAX_SLUG_LEN: usize = 64;
/// User agents and referers longer than this are stored truncated.
pub const MAX_HEADER_LEN: usize = 1024;
/// The UTM keys we append to destinations and read from landing URLs.
pub const UTM_KEYS: [&str; 5] = ["source", "medium", "campaign", "content", "term"];

#[derive(Debug, Error, PartialEq, Eq)]
pub enum LinkError {
    #[error("invalid slug: {0}")]
    Slug(&'static str),
    #[error("invalid destination: {0}")]
    Destination(UrlError),
    #[error("invalid expired_url: {0}")]
    ExpiredUrl(UrlError),
    #[error("invalid max_clicks: must be greater than 0 (got {0})")]
    MaxClicks(i64),
    #[error("invalid utm: {0}")]
    Utm(String),
}

/// Why a redirect request found no active link (`link.miss`, `link_misses.reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MissReason {
    Unknown,
    Expired,
    Limit,
    Disabled,
}

impl MissReason {
    pub const NAMES: &'static str = "unknown, expired, limit, disabled";

    pub fn as_str(self) -> &'static str {
        match self {
            MissReason::Unknown => "unknown",
            MissReason::Expired => "expired",
            MissReason::Limit => "limit",
            MissReason::Disabled => "disabled",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        [
            MissReason::Unknown,
            MissReason::Expired,
            MissReason::Limit,
            MissReason::Disabled,
        ]
        .into_iter()
        .find(|r| r.as_str() == name)
    }
}

/// Requested slugs are kept in `link_misses` cut to this many characters
/// (no link's slug is longer than `MAX_SLUG_LEN`; a scanner's may be).
pub const MAX_MISSED_SLUG_LEN: usize = 2 * MAX_SLUG_LEN;

pub fn check_slug(slug: &str) -> Result<(), LinkError> {
    if slug.is_empty() {
        return Err(LinkError::Slug("must not be empty"));
    }
    if slug.chars().count() > MAX_SLUG_LEN {
        return Err(LinkError::Slug("must be at most 64 characters"));
    }
    if !slug
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(LinkError::Slug(
            "may contain only A-Z, a-z, 0-9, '-' and '_'",
        ));
    }
    Ok(())
}

/// The longest UTM value: every redirect and every click's body carries them.
pub const MAX_UTM_VALUE_CHARS: usize = 400;

/// Normalises a link's `utm` object: keys may be given as `source` or
/// `utm_source`; values must be strings of at most [`MAX_UTM_VALUE_CHARS`].
/// Returns `{"source": .., ...}`.
pub fn normalize_utm(utm: &Value) -> Result<Map<String, Value>, LinkError> {
    let Value::Object(obj) = utm else {
        return Err(LinkError::Utm("must be a JSON object".into()));
    };
    let mut out = Map::new();
    for (key, value) in obj {
        let short = key.strip_prefix("utm_").unwrap_or(key);
        if !UTM_KEYS.contains(&short) {
            return Err(LinkError::Utm(format!(
                "unknown key '{key}' (allowed: source, medium, campaign, content, term, optionally prefixed utm_)"
            )));
        }
        match value {
            Value::String(s) if s.chars().count() > MAX_UTM_VALUE_CHARS => {
                return Err(LinkError::Utm(format!(
                    "'{key}' must be at most {MAX_UTM_VALUE_CHARS} characters (got {})",
                    s.chars().count()
                )));
            }
            Value::String(s) if !s.is_empty() => {
                out.insert(short.to_string(), Value::String(s.clone()));
            }
            Value::String(_) | Value::Null => {}
            _ => return Err(LinkError::Utm(format!("'{key}' must be a string"))),
        }
    }
    Ok(out)
}

/// The URL a redirect sends people to: the destination with the link's UTM
/// values appended. Parameters the destination already carries win, and the
/// fragment stays where it is.
pub fn redirect_url(destination: &str, utm: &Map<String, Value>) -> Result<String, LinkError> {
    let mut url = target::check_destination(destination).map_err(LinkError::Destination)?;
    if utm.is_empty() {
        return Ok(url.into());
    }
    let existing: Vec<String> = url.query_pairs().map(|(k, _)| k.into_owned()).collect();
    let additions: Vec<(String, &str)> = UTM_KEYS
        .iter()
        .filter_map(|k| {
            utm.get(*k)
                .and_then(Value::as_str)
                .map(|v| (format!("utm_{k}"), v))
        })
        .filter(|(k, _)| !existing.contains(k))
        .collect();
    if !additions.is_empty() {
        url.query_pairs_mut().extend_pairs(additions);
    }
    Ok(url.into())
}

/// UTM values carried in a landing URL's query string, as a JSON object with
/// short keys; `None` when the URL has none (or is not a URL).
pub fn utm_from_landing_url(landing_url: &str) -> Option<Map<String, Value>> {
    let url = Url::parse(landing_url).ok()?;
    let mut out = Map::new();
    for (key, value) in url.query_pairs() {
        if let Some(short) = key.strip_prefix("utm_")
            && UTM_KEYS.contains(&short)
            && !value.is_empty()
        {
            out.insert(short.to_string(), Value::String(value.into_owned()));
        }
    }
    (!out.is_empty()).then_some(out)
}

/// Length of a generated slug: 62^7 ≈ 3.5 × 10^12 slugs, so a collision is
/// rare even among millions of links (and is checked anyway).
pub const GENERATED_SLUG_LEN: usize = 7;

/// A random slug of letters and digits, for links inserted without one.
pub fn random_slug() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    (0..GENERATED_SLUG_LEN)
        .map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// Whether a landing URL is an absolute http(s) URL (what a browser requested).
pub fn is_web_url(text: &str) -> bool {
    url::Url::parse(text).is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.has_host())
}

/// Cuts `s` to at most `max` characters, on a character boundary.
pub fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s; // no more bytes than `max`, so no more characters: skip counting them
    }
    match s.char_indices().nth(max) {
        Some((idx, _)) => &s[..idx],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn slugs() {
        assert!(check_slug("winter-sale_2026").is_ok());
        assert_eq!(check_slug(""), Err(LinkError::Slug("must not be empty")));
        assert!(check_slug(&"a".repeat(64)).is_ok());
        assert!(check_slug(&"a".repeat(65)).is_err());
        for bad in ["has space", "slash/slug", "ünïcode", "dot.slug", "q?x"] {
            assert!(check_slug(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn utm_merge_keeps_query_and_fragment() {
        let utm = normalize_utm(&json!({"utm_source": "instagram", "medium": "social"})).unwrap();
        assert_eq!(
            redirect_url("https://acme.com/sale?ref=1#top", &utm).unwrap(),
            "https://acme.com/sale?ref=1&utm_source=instagram&utm_medium=social#top"
        );
        // the destination's own utm_source wins
        assert_eq!(
            redirect_url("https://acme.com/?utm_source=mail", &utm).unwrap(),
            "https://acme.com/?utm_source=mail&utm_medium=social"
        );
        assert_eq!(
            redirect_url("https://acme.com/x", &Map::new()).unwrap(),
            "https://acme.com/x"
        );
        let spaced = normalize_utm(&json!({"campaign": "winter sale & more"})).unwrap();
        assert_eq!(
            redirect_url("https://acme.com/", &spaced).unwrap(),
            "https://acme.com/?utm_campaign=winter+sale+%26+more"
        );
    }

    #[test]
    fn utm_validation() {
        assert!(normalize_utm(&json!([1])).is_err());
        assert!(normalize_utm(&json!({"utm_bogus": "x"})).is_err());
        assert!(normalize_utm(&json!({"source": 3})).is_err());
        assert_eq!(normalize_utm(&json!({"source": ""})).unwrap().len(), 0);
        let longest = "é".repeat(MAX_UTM_VALUE_CHARS);
        assert!(normalize_utm(&json!({ "source": longest })).is_ok());
        let err = normalize_utm(&json!({ "utm_term": "x".repeat(MAX_UTM_VALUE_CHARS + 1) }))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("'utm_term' must be at most 400 characters"),
            "{err}"
        );
    }

    #[test]
    fn landing_url_utm() {
        let utm =
            utm_from_landing_url("https://acme.com/?utm_source=ig&utm_campaign=w%20s&x=1").unwrap();
        assert_eq!(
            Value::Object(utm),
            json!({"source": "ig", "campaign": "w s"})
        );
        assert_eq!(utm_from_landing_url("https://acme.com/?x=1"), None);
        assert_eq!(utm_from_landing_url("not a url"), None);
    }

    #[test]
    fn truncation_respects_characters() {
        assert_eq!(truncate("héllo", 2), "hé");
        assert_eq!(truncate("abc", 10), "abc");
    }

    #[test]
    fn landing_urls_must_be_web_urls() {
        assert!(is_web_url("https://acme.com/sale?utm_source=x"));
        assert!(is_web_url("http://127.0.0.1:8080/"));
        for bad in [
            "not a url",
            "javascript:alert(1)",
            "mailto:a@b.co",
            "/relative",
            "https://",
        ] {
            assert!(!is_web_url(bad), "{bad}");
        }
    }

    #[test]
    fn generated_slugs_are_valid_and_differ() {
        let a = random_slug();
        assert_eq!(a.len(), GENERATED_SLUG_LEN);
        assert!(check_slug(&a).is_ok());
        assert_ne!(a, random_slug());
    }
}
