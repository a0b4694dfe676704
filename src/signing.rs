//! Standard Webhooks v1 signatures (HMAC-SHA256 over `{id}.{timestamp}.{body}`
//! keyed with the base64 bytes after `whsec_`), the optional hex scheme, and
//! secret generation. Pure logic.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use thiserror::Error;

type HmacSha256 = Hmac<Sha256>;

pub const SECRET_PREFIX: &str = "whsec_";

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SecretError {
    #[error("invalid secret: must be 'whsec_' followed by base64 of 24 to 64 bytes")]
    Format,
}

/// A decoded signing key, with the HMAC already keyed: keying costs two
/// SHA-256 blocks, which every signature would otherwise pay again.
#[derive(Clone)]
pub struct SigningKey {
    bytes: Vec<u8>,
    keyed: HmacSha256,
}

impl PartialEq for SigningKey {
    fn eq(&self, other: &Self) -> bool {
        self.bytes == other.bytes
    }
}

impl Eq for SigningKey {}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningKey(..)") // never print key material
    }
}

impl SigningKey {
    /// Parses `whsec_<base64>`; the prefix is optional, as in the specification's libraries.
    pub fn parse(secret: &str) -> Result<Self, SecretError> {
        let b64 = secret.strip_prefix(SECRET_PREFIX).unwrap_or(secret);
        let bytes = B64.decode(b64).map_err(|_| SecretError::Format)?;
        if !(24..=64).contains(&bytes.len()) {
            return Err(SecretError::Format);
        }
        let keyed = HmacSha256::new_from_slice(&bytes).expect("HMAC accepts keys of any length");
        Ok(SigningKey { bytes, keyed })
    }

    /// HMAC-SHA256 of `{msg_id}.{timestamp}.{body}`.
    fn mac(&self, msg_id: &str, timestamp: i64, body: &str) -> HmacSha256 {
        let mut mac = self.keyed.clone();
        mac.update(msg_id.as_bytes());
        mac.update(b".");
        mac.update(itoa::Buffer::new().format(timestamp).as_bytes());
        mac.update(b".");
        mac.update(body.as_bytes());
        mac
    }

    /// `v1,<base64 signature>` for one message.
    pub fn sign(&self, msg_id: &str, timestamp: i64, body: &str) -> String {
        let mut signature = String::with_capacity(47);
        signature.push_str("v1,");
        B64.encode_string(
            self.mac(msg_id, timestamp, body).finalize().into_bytes(),
            &mut signature,
        );
        signature
    }
}

/// A subscription's signing keys: the current one and, during a secret
/// rotation's grace period, the previous one.
#[derive(Debug, Clone)]
pub struct KeyRing {
    current: SigningKey,
    /// The previous key and the Unix second its grace ends.
    previous: Option<(SigningKey, i64)>,
}

impl KeyRing {
    /// From the stored columns; a previous secret that does not parse is ignored.
    pub fn new(
        secret: &str,
        previous: Option<&str>,
        previous_until: Option<i64>,
    ) -> Result<Self, SecretError> {
        let previous = match (previous, previous_until) {
            (Some(s), Some(until)) => SigningKey::parse(s).ok().map(|k| (k, until)),
            _ => None,
        };
        Ok(KeyRing {
            current: SigningKey::parse(secret)?,
            previous,
        })
    }

    /// Keys that sign a message at `now` (Unix seconds).
    pub fn keys_at(&self, now: i64) -> impl Iterator<Item = &SigningKey> {
        let previous = self
            .previous
            .as_ref()
            .filter(|(_, until)| now < *until)
            .map(|(key, _)| key);
        std::iter::once(&self.current).chain(previous)
    }
}

/// A fresh secret: `whsec_` + base64 of 32 bytes from the operating system's CSPRNG.
pub fn generate_secret() -> String {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the operating system's random source failed");
    format!("{SECRET_PREFIX}{}", B64.encode(bytes))
}

/// The `webhook-signature` header: one `v1,…` entry per key, space separated
/// (several keys during a secret rotation's grace period).
pub fn signature_header<'k>(
    keys: impl IntoIterator<Item = &'k SigningKey>,
    msg_id: &str,
    timestamp: i64,
    body: &str,
) -> String {
    let mut header = String::new();
    for key in keys {
        if !header.is_empty() {
            header.push(' ');
        }
        header.push_str(&key.sign(msg_id, timestamp, body));
    }
    header
}

/// `X-Webhook-Signature` for the 'hex' scheme: hex(HMAC-SHA256(secret, body)),
/// keyed with the secret text exactly as stored (what such receivers expect).
pub fn hex_signature(secret: &str, body: &str) -> String {
    let mut mac =
        HmacSha256::new_from_slice(secret.as_bytes()).expect("HMAC accepts keys of any length");
    mac.update(body.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// Checks a `webhook-signature` header value (any of its space-separated
/// `v1,` entries) in constant time per entry.
pub fn verify(key: &SigningKey, msg_id: &str, timestamp: i64, body: &str, header: &str) -> bool {
    header
        .split_whitespace()
        .filter_map(|sig| sig.strip_prefix("v1,"))
        .any(|b64| {
            B64.decode(b64).is_ok_and(|given| {
                key.mac(msg_id, timestamp, body)
                    .verify_slice(&given)
                    .is_ok()
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    // Test vectors published with the Standard Webhooks specification.
    const VECTORS: [(&str, &str, i64, &str, &str); 2] = [
        (
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            r#"{"test": 2432232314}"#,
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
        ),
        (
            "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD",
            "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk",
            1649367553,
            r#"{"email":"test@example.com","username":"test_user"}"#,
            "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=",
        ),
    ];

    #[test]
    fn specification_vectors() {
        for (secret, id, ts, body, want) in VECTORS {
            let key = SigningKey::parse(secret).unwrap();
            assert_eq!(key.sign(id, ts, body), want);
            assert!(verify(&key, id, ts, body, want));
            assert!(!verify(&key, id, ts + 1, body, want));
            assert!(!verify(&key, id, ts, &format!("{body} "), want));
        }
    }

    #[test]
    fn rotation_header_carries_both_and_verifies_with_either() {
        let old = SigningKey::parse(VECTORS[0].0).unwrap();
        let new = SigningKey::parse(&generate_secret()).unwrap();
        let header = signature_header([&new, &old], "msg_1", 1700000000, "{}");
        assert_eq!(header.split(' ').count(), 2);
        assert!(verify(&old, "msg_1", 1700000000, "{}", &header));
        assert!(verify(&new, "msg_1", 1700000000, "{}", &header));
    }

    #[test]
    fn key_ring_signs_with_the_previous_key_only_during_its_grace() {
        let old = VECTORS[0].0;
        let ring = KeyRing::new(&generate_secret(), Some(old), Some(1_000)).unwrap();
        assert_eq!(ring.keys_at(999).count(), 2);
        assert_eq!(
            ring.keys_at(999).nth(1),
            Some(&SigningKey::parse(old).unwrap())
        );
        assert_eq!(ring.keys_at(1_000).count(), 1);
        assert_eq!(
            KeyRing::new(old, Some("garbage"), Some(i64::MAX))
                .unwrap()
                .keys_at(0)
                .count(),
            1
        );
        assert!(KeyRing::new("garbage", None, None).is_err());
    }

    #[test]
    fn generated_secrets_are_32_random_bytes() {
        let a = generate_secret();
        let b = generate_secret();
        assert!(a.starts_with("whsec_"));
        assert_ne!(a, b);
        assert_eq!(B64.decode(&a[6..]).unwrap().len(), 32);
        assert!(SigningKey::parse(&a).is_ok());
    }

    #[test]
    fn bad_secrets() {
        assert_eq!(
            SigningKey::parse("whsec_not base64!"),
            Err(SecretError::Format)
        );
        assert_eq!(
            SigningKey::parse("whsec_c2hvcnQ="),
            Err(SecretError::Format)
        );
        assert!(!format!("{:?}", SigningKey::parse(VECTORS[0].0).unwrap()).contains("MfKQ"));
    }

    #[test]
    fn hex_scheme() {
        // RFC 4231-style check computed independently: HMAC-SHA256("key", "The quick brown fox jumps over the lazy dog")
        assert_eq!(
            hex_signature("key", "The quick brown fox jumps over the lazy dog"),
            "f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8"
        );
    }
}
