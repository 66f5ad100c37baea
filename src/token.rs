//! Mobile tokens: JWT (RFC 7519) signed with HS256, `sub` = user id,
//! `exp` required. Minted by `esh3ar token`, checked on WebSocket connect.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Longest token we will look at.
pub const TOKEN_BYTES_MAX: usize = 4096;

/// Why a token was refused (each maps to a stable API error code).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token is malformed")]
    Malformed,
    #[error("token signature is invalid")]
    BadSignature,
    #[error("token has expired")]
    Expired,
    #[error("token algorithm must be HS256")]
    BadAlgorithm,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iat: Option<u64>,
}

/// Mints a token for `user` valid until `exp` (unix seconds).
pub fn mint(secret: &[u8], user: &str, iat: u64, exp: u64) -> String {
    let header = B64.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let claims = serde_json::to_vec(&Claims { sub: user.to_owned(), exp, iat: Some(iat) }).expect("claims serialize");
    let signing_input = format!("{header}.{}", B64.encode(claims));
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(signing_input.as_bytes());
    format!("{signing_input}.{}", B64.encode(mac.finalize().into_bytes()))
}

/// Verifies a token and returns its user id. The signature is checked in
/// constant time before the claims are trusted.
pub fn verify(secret: &[u8], token: &str, now_secs: u64) -> Result<String, TokenError> {
    if token.len() > TOKEN_BYTES_MAX {
        return Err(TokenError::Malformed);
    }
    let mut parts = token.split('.');
    let (Some(h), Some(c), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(TokenError::Malformed);
    };
    let header = B64.decode(h).map_err(|_| TokenError::Malformed)?;
    let header: serde_json::Value = serde_json::from_slice(&header).map_err(|_| TokenError::Malformed)?;
    if header.get("alg").and_then(|a| a.as_str()) != Some("HS256") {
        return Err(TokenError::BadAlgorithm);
    }
    let sig = B64.decode(s).map_err(|_| TokenError::Malformed)?;
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(&token.as_bytes()[..h.len() + 1 + c.len()]);
    mac.verify_slice(&sig).map_err(|_| TokenError::BadSignature)?;
    let claims = B64.decode(c).map_err(|_| TokenError::Malformed)?;
    let claims: Claims = serde_json::from_slice(&claims).map_err(|_| TokenError::Malformed)?;
    if claims.sub.is_empty() || claims.sub.len() > crate::business::USER_ID_BYTES_MAX {
        return Err(TokenError::Malformed);
    }
    if claims.exp <= now_secs {
        return Err(TokenError::Expired);
    }
    Ok(claims.sub)
}

#[cfg(test)]
mod tests {
    use super::*;
    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    #[test]
    fn mint_then_verify() {
        let t = mint(SECRET, "alice", 100, 200);
        assert_eq!(verify(SECRET, &t, 150), Ok("alice".to_owned()));
        assert_eq!(verify(SECRET, &t, 200), Err(TokenError::Expired));
        assert_eq!(verify(b"another secret of enough length!", &t, 150), Err(TokenError::BadSignature));
    }

    #[test]
    fn tampering_is_refused() {
        let t = mint(SECRET, "alice", 100, 200);
        let forged_claims = B64.encode(br#"{"sub":"mallory","exp":999}"#);
        let mut parts: Vec<&str> = t.split('.').collect();
        parts[1] = &forged_claims;
        assert_eq!(verify(SECRET, &parts.join("."), 150), Err(TokenError::BadSignature));
        assert_eq!(verify(SECRET, "a.b", 150), Err(TokenError::Malformed));
        assert_eq!(verify(SECRET, "", 150), Err(TokenError::Malformed));
        let none_alg = format!("{}.{}.", B64.encode(br#"{"alg":"none"}"#), parts[1]);
        assert_eq!(verify(SECRET, &none_alg, 150), Err(TokenError::BadAlgorithm));
    }
}
