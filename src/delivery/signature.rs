//! Standard Webhooks signatures: `v1,<base64(HMAC-SHA256(key, "{id}.{timestamp}.{body}"))>`.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

pub use crate::secret::{SigningKey, SigningKeyError};

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
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.expose()) else {
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
    fn changing_id_timestamp_or_body_changes_the_signature() {
        let k = SigningKey::from_bytes(b"0123456789abcdef".to_vec());
        let base = sign(&k, "id", 10, b"body");
        assert_ne!(base, sign(&k, "id2", 10, b"body"));
        assert_ne!(base, sign(&k, "id", 11, b"body"));
        assert_ne!(base, sign(&k, "id", 10, b"body!"));
    }
}
