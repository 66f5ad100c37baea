//! Standard Webhooks 1.0 signatures: `webhook-signature: v1,<base64 HMAC-SHA256
//! of "{id}.{timestamp}.{body}">`, keyed with the bytes after `whsec_`.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Shortest and longest decoded secret (bytes), as the issue fixes them.
pub const SECRET_BYTES_MIN: usize = 24;
pub const SECRET_BYTES_MAX: usize = 64;
/// The prefix every secret is written with.
pub const SECRET_PREFIX: &str = "whsec_";

/// A webhook signing key. Never printed: `Debug` shows `whsec_***`, and
/// there is no `Display`.
#[derive(Clone)]
pub struct Secret {
    key: Vec<u8>,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("whsec_***")
    }
}

impl Secret {
    /// Parses `whsec_<base64 of 24 to 64 bytes>`. The error never quotes the input.
    pub fn parse(text: &str) -> Result<Secret, String> {
        let b64 = text.strip_prefix(SECRET_PREFIX).ok_or_else(|| format!("must start with {SECRET_PREFIX:?}"))?;
        let key = STANDARD.decode(b64).map_err(|_| format!("must be {SECRET_PREFIX} followed by base64"))?;
        if !(SECRET_BYTES_MIN..=SECRET_BYTES_MAX).contains(&key.len()) {
            return Err(format!("decodes to {} bytes; must be {SECRET_BYTES_MIN} to {SECRET_BYTES_MAX}", key.len()));
        }
        Ok(Secret { key })
    }

    /// The `webhook-signature` header value for one attempt.
    pub fn sign(&self, webhook_id: &str, timestamp_s: u64, body: &[u8]) -> String {
        // HMAC accepts keys of any length: new_from_slice cannot fail for Hmac<Sha256>.
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&self.key) else {
            unreachable!("HMAC takes keys of any length")
        };
        mac.update(webhook_id.as_bytes());
        mac.update(b".");
        mac.update(itoa::Buffer::new().format(timestamp_s).as_bytes());
        mac.update(b".");
        mac.update(body);
        let mut out = String::with_capacity(3 + 44);
        out.push_str("v1,");
        STANDARD.encode_string(mac.finalize().into_bytes(), &mut out);
        out
    }
}

/// Whether `id` can be a `webhook-id`: 1 to 255 bytes of visible ASCII
/// (a header value, and unambiguous in the signed string).
pub fn is_valid_webhook_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 255 && id.bytes().all(|b| b.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_standard_webhooks_reference_vector() {
        // From standard-webhooks' own test suite (libraries/javascript, python).
        let s = Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let sig = s.sign("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, br#"{"test": 2432232314}"#);
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn secrets_are_checked_and_never_shown() {
        assert!(Secret::parse("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").is_err());
        assert!(Secret::parse("whsec_not base64!").is_err());
        assert!(Secret::parse(&format!("whsec_{}", STANDARD.encode([7u8; 23]))).is_err());
        assert!(Secret::parse(&format!("whsec_{}", STANDARD.encode([7u8; 65]))).is_err());
        let s = Secret::parse(&format!("whsec_{}", STANDARD.encode([7u8; 64]))).unwrap();
        assert_eq!(format!("{s:?}"), "whsec_***");
    }

    #[test]
    fn webhook_ids_are_visible_ascii() {
        assert!(is_valid_webhook_id("msg_01HX.abc"));
        assert!(!is_valid_webhook_id(""));
        assert!(!is_valid_webhook_id("a b"));
        assert!(!is_valid_webhook_id("a\r\nx: y"));
        assert!(!is_valid_webhook_id(&"a".repeat(256)));
    }
}
