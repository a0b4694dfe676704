//! Keeps secrets out of what the attempt log stores and analysts read. A
//! receiver's answer or a transport error may quote the subscription URL
//! (which may carry a token, in its path, query or host name) or echo the
//! signatures just sent, often escaped: PHP's JSON writes `/` as `\/`, .NET's
//! `+` as `\u002B`, a form or log line percent-encodes them.

use percent_encoding::percent_decode_str;
use url::{Host, Url};

/// What replaces a quoted part of the subscription URL.
const URL_MARK: &str = "<url>";
/// What replaces an echoed signature.
const SIGNATURE_MARK: &str = "[signature]";
/// Path segments and query values at least this long are redacted on their
/// own: long enough to be a token, short enough to catch a short one.
const TOKEN_LEN: usize = 8;

/// The parts of one subscription URL that must not be quoted, longest first.
pub struct UrlSecrets(Vec<String>);

impl UrlSecrets {
    /// The URL as written and as normalized; its path with the query, the path
    /// and the query on their own (also percent-decoded); each path segment or
    /// query value of [`TOKEN_LEN`] characters or more; and its host name. An
    /// IP literal host stays: errors name the address they refused.
    pub fn of(url: &str) -> UrlSecrets {
        let raw = url.trim();
        let mut parts = vec![raw.to_string()];
        if let Some(scheme_end) = raw.find("://")
            && let Some(path_at) = raw[scheme_end + 3..].find('/')
        {
            parts.push(raw[scheme_end + 3 + path_at..].to_string());
        }
        if let Ok(parsed) = Url::parse(raw) {
            parts.push(parsed.as_str().to_string());
            if let Some(Host::Domain(name)) = parsed.host() {
                parts.push(name.to_string());
            }
            parts.push(parsed.path().to_string());
            parts.extend(parsed.query().map(str::to_string));
            parts.extend(
                parsed
                    .path_segments()
                    .into_iter()
                    .flatten()
                    .filter(|s| s.len() >= TOKEN_LEN)
                    .map(str::to_string),
            );
            parts.extend(
                parsed
                    .query_pairs()
                    .map(|(_, value)| value.into_owned())
                    .filter(|v| v.len() >= TOKEN_LEN),
            );
        }
        let decoded: Vec<String> = parts
            .iter()
            .map(|p| percent_decode_str(p).decode_utf8_lossy().into_owned())
            .collect();
        parts.extend(decoded);
        parts.retain(|p| p.len() > 1);
        parts.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        parts.dedup();
        UrlSecrets(parts)
    }

    /// `text` with every part replaced by `<url>`.
    pub fn redact(&self, text: String) -> String {
        self.0
            .iter()
            .fold(text, |text, part| replace_quoted(text, part, URL_MARK))
    }
}

/// `text` with each of `signatures` replaced by `[signature]`.
pub fn without_signatures<'s>(text: String, signatures: impl Iterator<Item = &'s str>) -> String {
    signatures
        .filter(|s| !s.is_empty())
        .fold(text, |text, s| replace_quoted(text, s, SIGNATURE_MARK))
}

/// `text` cut to at most `len` bytes, never inside a character.
pub fn cut(mut text: String, len: usize) -> String {
    let mut end = text.len().min(len);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text
}

/// Every quote of `secret` in `text` replaced by `mark`: ASCII letters in any
/// case, and `/`, `+` and `=` also JSON-escaped or percent-encoded.
fn replace_quoted(text: String, secret: &str, mark: &str) -> String {
    if secret.is_empty() {
        return text;
    }
    let mut out = String::new();
    let mut copied = 0;
    let mut at = 0;
    while at < text.len() {
        if let Some(len) = quoted_len(&text[at..], secret) {
            out.push_str(&text[copied..at]);
            out.push_str(mark);
            at += len;
            copied = at;
        } else {
            at += text[at..].chars().next().map_or(1, char::len_utf8);
        }
    }
    if copied == 0 {
        return text;
    }
    out.push_str(&text[copied..]);
    out
}

/// The length of the quote of `secret` that `text` starts with, if any.
fn quoted_len(text: &str, secret: &str) -> Option<usize> {
    let mut at = 0;
    for c in secret.chars() {
        let rest = &text[at..];
        let forms: &[&str] = match c {
            '/' => &["/", "\\/", "\\u002f", "\\u002F", "%2f", "%2F"],
            '+' => &["+", "\\u002b", "\\u002B", "%2b", "%2B"],
            '=' => &["=", "\\u003d", "\\u003D", "%3d", "%3D"],
            _ => {
                let next = rest.chars().next()?;
                if !next.eq_ignore_ascii_case(&c) {
                    return None;
                }
                at += next.len_utf8();
                continue;
            }
        };
        at += forms.iter().find(|form| rest.starts_with(**form))?.len();
    }
    Some(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    const URL: &str = "https://Hooks.Example.com/in/abcdef123456?token=SECRET%2BTOKEN&x=1";

    #[test]
    fn the_url_its_parts_and_its_host_are_redacted() {
        let secrets = UrlSecrets::of(URL);
        for (quoted, redacted) in [
            (format!("bad: {URL} failed"), "bad: <url> failed"),
            ("Cannot POST /in/abcdef123456".into(), "Cannot POST <url>"),
            (
                "webhook \"POST abcdef123456\" is not registered".into(),
                "webhook \"POST <url>\" is not registered",
            ),
            ("token SECRET+TOKEN expired".into(), "token <url> expired"),
            ("token SECRET%2BTOKEN expired".into(), "token <url> expired"),
            (
                "{\"path\":\"\\/in\\/abcdef123456?token=SECRET%2BTOKEN&x=1\"}".into(),
                "{\"path\":\"<url>\"}",
            ),
            (
                "certificate not valid for name \"hooks.example.com\"".into(),
                "certificate not valid for name \"<url>\"",
            ),
            ("x=1 in /in".into(), "x=1 in /in"),
        ] {
            assert_eq!(secrets.redact(quoted), redacted);
        }
        // An address the resolver refused is named, not hidden.
        assert_eq!(
            UrlSecrets::of("http://10.0.0.1/x").redact("non-public address 10.0.0.1".into()),
            "non-public address 10.0.0.1"
        );
    }

    #[test]
    fn signatures_are_redacted_however_a_receiver_escapes_them() {
        let sent = "K5oZfzN95Z9UVu1EsfQmfVNQhnkZ2pj9o9NDN/H+pI4=";
        for echoed in [
            sent.to_string(),
            sent.replace('/', "\\/"),
            sent.replace('+', "\\u002B").replace('=', "\\u003D"),
            sent.replace('/', "%2F")
                .replace('+', "%2B")
                .replace('=', "%3D"),
        ] {
            assert_eq!(
                without_signatures(format!("got v1,{echoed} ok"), [sent].into_iter()),
                "got v1,[signature] ok",
                "{echoed}"
            );
        }
        assert_eq!(
            without_signatures("é K5o".into(), [sent].into_iter()),
            "é K5o"
        );
    }

    #[test]
    fn a_cut_never_splits_a_character() {
        assert_eq!(cut("é".repeat(600), 1023).len(), 1022);
        assert_eq!(cut("abc".into(), 10), "abc");
    }
}
