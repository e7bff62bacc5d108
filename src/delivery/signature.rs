//! Standard Webhooks signatures: `v1,<base64(HMAC-SHA256(key, "{id}.{timestamp}.{body}"))>`.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// The prefix Standard Webhooks puts in front of the base64 key.
const SECRET_PREFIX: &str = "whsec_";

/// A decoded signing key. Its `Debug` never shows the key.
#[derive(Clone)]
pub struct SigningKey(Vec<u8>);

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningKey(***)")
    }
}

/// Why a signing secret could not be used. Never carries the secret itself.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SigningKeyError {
    /// The part after `whsec_` (or the whole value) is not base64.
    #[error(
        "the signing secret is not base64 (optionally prefixed with whsec_); use a secret like whsec_ followed by base64 of 24 to 64 random bytes (e.g. `openssl rand -base64 32`)"
    )]
    NotBase64,
    /// The secret decodes to no bytes at all.
    #[error(
        "the signing secret is empty; set it to whsec_ followed by base64 of 24 to 64 random bytes"
    )]
    Empty,
}

impl SigningKey {
    /// Parses `whsec_<base64>` or plain base64.
    pub fn parse(secret: &str) -> Result<SigningKey, SigningKeyError> {
        let encoded = secret.trim();
        let encoded = encoded.strip_prefix(SECRET_PREFIX).unwrap_or(encoded);
        let bytes = STANDARD
            .decode(encoded)
            .map_err(|_| SigningKeyError::NotBase64)?;
        if bytes.is_empty() {
            return Err(SigningKeyError::Empty);
        }
        Ok(SigningKey(bytes))
    }

    /// A key from raw bytes (tests, generated keys).
    pub fn from_bytes(bytes: Vec<u8>) -> SigningKey {
        SigningKey(bytes)
    }
}

/// The three Standard Webhooks headers for one message signed now: `webhook-id`,
/// `webhook-timestamp` (unix seconds) and `webhook-signature`.
pub fn webhook_headers(
    secret: &SigningKey,
    msg_id: &str,
    body: &[u8],
) -> [(&'static str, String); 3] {
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    [
        ("webhook-id", msg_id.to_owned()),
        ("webhook-timestamp", ts.to_string()),
        ("webhook-signature", sign(secret, msg_id, ts, body)),
    ]
}

/// The `webhook-signature` header value for one message.
pub fn sign(secret: &SigningKey, msg_id: &str, timestamp: i64, body: &[u8]) -> String {
    // HMAC accepts keys of any length, so this cannot fail; the fallback keeps the
    // no-panic rule without an `expect`.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&secret.0) else {
        return String::from("v1,");
    };
    mac.update(msg_id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let code = mac.finalize().into_bytes();
    format!("v1,{}", STANDARD.encode(code))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn official_standard_webhooks_vector_matches() {
        let key = SigningKey::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let sig = sign(
            &key,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn plain_base64_secret_equals_prefixed_secret() {
        let a = SigningKey::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let b = SigningKey::parse("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        assert_eq!(sign(&a, "m", 1, b"x"), sign(&b, "m", 1, b"x"));
    }

    #[test]
    fn changing_id_timestamp_or_body_changes_the_signature() {
        let k = SigningKey::from_bytes(b"0123456789abcdef".to_vec());
        let base = sign(&k, "id", 10, b"body");
        assert_ne!(base, sign(&k, "id2", 10, b"body"));
        assert_ne!(base, sign(&k, "id", 11, b"body"));
        assert_ne!(base, sign(&k, "id", 10, b"body!"));
    }

    #[test]
    fn bad_secrets_are_rejected_without_echoing_them() {
        let err = SigningKey::parse("whsec_not*base64!").unwrap_err();
        assert_eq!(err, SigningKeyError::NotBase64);
        assert!(!err.to_string().contains("not*base64!"));
        assert_eq!(
            SigningKey::parse("whsec_").unwrap_err(),
            SigningKeyError::Empty
        );
        assert!(!format!("{:?}", SigningKey::from_bytes(b"hunter2".to_vec())).contains("hunter2"));
    }
}
