//! Size limits on what users write, so that no row, event body or worker
//! claim grows without bound. Pure logic; the triggers apply it.

use serde_json::Value;
use thiserror::Error;

/// Largest `metadata` (links, conversions) and `filters` (subscriptions), as JSON text.
pub const MAX_JSON_BYTES: usize = 16 * 1024;
/// Largest explicit `utm` object on a click, as JSON text.
pub const MAX_UTM_BYTES: usize = 2 * 1024;
/// Names and short free text: city, country, campaign, a tag, a subscription name.
pub const MAX_TEXT_CHARS: usize = 200;
/// Tags on one link.
pub const MAX_TAGS: usize = 50;
/// The earliest `clicked_at` a click may have, 2000-01-01 00:00 UTC in Unix
/// microseconds: an older time is an input error, and a year before 1 AD would
/// give two days' partitions one name, stopping partition maintenance.
pub const EARLIEST_CLICK_MICROS: i64 = 946_684_800_000_000;
/// Default of `linkhooks.max_body_bytes`: the largest event body queued.
pub const DEFAULT_MAX_BODY_BYTES: i32 = 64 * 1024;

#[derive(Debug, Error, PartialEq, Eq)]
#[error("invalid {field}: {rule}")]
pub struct TooLarge {
    pub field: &'static str,
    pub rule: String,
}

/// A JSON value no larger than `max` bytes as text.
pub fn check_json(field: &'static str, value: &Value, max: usize) -> Result<(), TooLarge> {
    let len = serde_json::to_string(value).map_or(usize::MAX, |s| s.len());
    if len > max {
        return Err(TooLarge {
            field,
            rule: format!("must be at most {max} bytes as JSON (got {len})"),
        });
    }
    Ok(())
}

/// Free text of at most `max` characters.
pub fn check_text(field: &'static str, value: &str, max: usize) -> Result<(), TooLarge> {
    // No more bytes than `max` means no more characters: skip counting them.
    if value.len() <= max {
        return Ok(());
    }
    let chars = value.chars().count();
    if chars > max {
        return Err(TooLarge {
            field,
            rule: format!("must be at most {max} characters (got {chars})"),
        });
    }
    Ok(())
}

/// A link's tags: at most `MAX_TAGS`, each short text.
pub fn check_tags(tags: &[String]) -> Result<(), TooLarge> {
    if tags.len() > MAX_TAGS {
        return Err(TooLarge {
            field: "tags",
            rule: format!("must have at most {MAX_TAGS} tags (got {})", tags.len()),
        });
    }
    tags.iter()
        .try_for_each(|t| check_text("tags", t, MAX_TEXT_CHARS))
}

/// An event body within `linkhooks.max_body_bytes`.
pub fn check_body(event_type: &str, len: usize, max: usize) -> Result<(), TooLarge> {
    if len > max {
        return Err(TooLarge {
            field: "event body",
            rule: format!(
                "the {event_type} event would be {len} bytes, over linkhooks.max_body_bytes ({max}); shorten its free text or metadata"
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_over_the_limit_names_the_field_and_size() {
        assert_eq!(check_json("metadata", &json!({"a": 1}), 100), Ok(()));
        let big = json!({ "x": "y".repeat(200) });
        let err = check_json("metadata", &big, 100).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid metadata: must be at most 100 bytes as JSON (got 208)"
        );
    }

    #[test]
    fn text_counts_characters_not_bytes() {
        assert_eq!(check_text("city", &"é".repeat(200), 200), Ok(()));
        let err = check_text("city", &"é".repeat(201), 200).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid city: must be at most 200 characters (got 201)"
        );
    }

    #[test]
    fn tags_are_bounded_in_number_and_length() {
        let many: Vec<String> = (0..51).map(|i| i.to_string()).collect();
        assert!(check_tags(&many[..50]).is_ok());
        assert_eq!(check_tags(&many).unwrap_err().field, "tags");
        assert!(check_tags(&["x".repeat(201)]).is_err());
    }

    #[test]
    fn body_over_the_setting_is_refused() {
        assert_eq!(check_body("link.clicked", 100, 100), Ok(()));
        let err = check_body("link.converted", 101, 100).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("invalid event body: the link.converted event would be 101 bytes")
        );
    }
}
