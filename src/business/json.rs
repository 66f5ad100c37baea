//! JSON of the business API: request validation and response bodies.

use esh3ar_shards::id::TrackingId;
use esh3ar_shards::Priority;
use simd_json::prelude::*;
use simd_json::BorrowedValue;

use super::{ApiError, USER_ID_BYTES_MAX};
use crate::config::BusinessConfig;
use crate::http::conn::Request;
use crate::http::json_string;
use crate::shard::{NewMessage, StatusView};

/// Validates one message object of client `client`, accepted at `now_ms`.
pub fn new_message(
    value: &BorrowedValue<'_>,
    client: u32,
    business: &BusinessConfig,
    providers: &crate::outbound::ProvidersConfig,
    now_ms: u64,
) -> Result<NewMessage, ApiError> {
    let obj = value.as_object().ok_or_else(|| ApiError::invalid("a message must be a JSON object"))?;
    let mut to = None;
    let mut body = None;
    let mut priority = Priority::Normal;
    let mut ttl_seconds = business.default_ttl_seconds;
    let mut fallback = None;
    for (key, v) in obj.iter() {
        match key.as_ref() {
            "to" => to = Some(v.as_str().ok_or_else(|| ApiError::invalid("`to` must be a string"))?),
            "body" => body = Some(v.as_str().ok_or_else(|| ApiError::invalid("`body` must be a string"))?),
            "priority" => {
                priority = v
                    .as_str()
                    .and_then(Priority::parse)
                    .ok_or_else(|| ApiError::invalid("`priority` must be \"high\", \"normal\" or \"low\""))?
            }
            "ttl_seconds" => {
                ttl_seconds = v.as_u64().filter(|&t| t >= 1 && t <= business.max_ttl_seconds).ok_or_else(|| {
                    ApiError::invalid(format!(
                        "`ttl_seconds` must be an integer from 1 to {}",
                        business.max_ttl_seconds
                    ))
                })?
            }
            "fallback" => fallback = Some(fallback_spec(v, business, providers)?),
            other => return Err(ApiError::invalid(format!("unknown field `{other}`"))),
        }
    }
    let to = to.ok_or_else(|| ApiError::invalid("`to` is required"))?;
    if to.is_empty() || to.len() > USER_ID_BYTES_MAX || to.chars().any(char::is_control) {
        return Err(ApiError::invalid(format!(
            "`to` must be 1 to {USER_ID_BYTES_MAX} bytes without control characters"
        )));
    }
    let body = body.ok_or_else(|| ApiError::invalid("`body` is required"))?;
    if body.is_empty() {
        return Err(ApiError::invalid("`body` must not be empty"));
    }
    Ok(NewMessage {
        client,
        to: to.to_owned(),
        body: body.as_bytes().to_vec(),
        priority,
        expires_at_ms: now_ms + ttl_seconds * 1000,
        accepted_at_ms: now_ms,
        fallback,
    })
}

/// `"fallback": {"after_seconds": 0.., "channels": ["whatsapp", "email"]}`;
/// `channels` defaults to every configured provider.
fn fallback_spec(
    v: &BorrowedValue<'_>,
    business: &BusinessConfig,
    providers: &crate::outbound::ProvidersConfig,
) -> Result<crate::fallback::FallbackSpec, ApiError> {
    let obj = v.as_object().ok_or_else(|| ApiError::invalid("`fallback` must be an object"))?;
    let mut after = None;
    let mut channels = None;
    for (key, v) in obj.iter() {
        match key.as_ref() {
            "after_seconds" => {
                after = Some(v.as_u64().filter(|&a| a <= business.max_ttl_seconds).ok_or_else(|| {
                    ApiError::invalid(format!(
                        "`fallback.after_seconds` must be an integer from 0 to {}",
                        business.max_ttl_seconds
                    ))
                })?)
            }
            "channels" => {
                let list = v.as_array().ok_or_else(|| ApiError::invalid("`fallback.channels` must be an array"))?;
                let names: Option<Vec<&str>> = list.iter().map(|c| c.as_str()).collect();
                let names = names.ok_or_else(|| ApiError::invalid("`fallback.channels` must hold strings"))?;
                channels = Some(
                    crate::fallback::parse_channels(names.into_iter(), providers)
                        .map_err(|m| ApiError::invalid(format!("`fallback.channels` {m}")))?,
                );
            }
            other => return Err(ApiError::invalid(format!("unknown field `fallback.{other}`"))),
        }
    }
    let after = after.ok_or_else(|| ApiError::invalid("`fallback.after_seconds` is required"))?;
    let channels = match channels {
        Some(c) => c,
        None => {
            let all = crate::fallback::default_channels(providers);
            if all.is_empty() {
                return Err(ApiError::invalid("`fallback` needs a provider, and none is configured"));
            }
            all
        }
    };
    Ok(crate::fallback::FallbackSpec { after_seconds: after as u32, channels })
}

/// The `messages` array of a batch request.
pub fn batch_items<'v, 'a>(value: &'v BorrowedValue<'a>) -> Result<&'v [BorrowedValue<'a>], ApiError> {
    let obj = value.as_object().ok_or_else(|| ApiError::invalid("body must be a JSON object"))?;
    if let Some(k) = obj.keys().find(|k| k.as_ref() != "messages") {
        return Err(ApiError::invalid(format!("unknown field `{k}`")));
    }
    let items = obj
        .get("messages")
        .and_then(|m| m.as_array())
        .ok_or_else(|| ApiError::invalid("`messages` must be an array"))?;
    if items.is_empty() || items.len() > super::BATCH_ITEMS_MAX {
        return Err(ApiError::invalid(format!("`messages` must hold 1 to {} items", super::BATCH_ITEMS_MAX)));
    }
    Ok(items)
}

pub fn check_json_content_type(req: &Request<'_>) -> Result<(), ApiError> {
    let ok = req.header(&req.head.content_type).is_some_and(|ct| {
        let mime = ct.split(|&b| b == b';').next().unwrap_or(ct).trim_ascii();
        mime.eq_ignore_ascii_case(b"application/json")
    });
    if ok {
        Ok(())
    } else {
        Err(ApiError::new(415, "unsupported_media_type", "Content-Type must be application/json"))
    }
}

/// Deepest nesting of arrays and objects a request may have. Ours need 3;
/// the limit keeps a recursive parser's stack use small whatever the input.
pub const JSON_DEPTH_MAX: usize = 16;

/// True if `body` nests arrays/objects deeper than `max` (strings skipped).
///
/// Strings are skipped eight bytes at a time (`find_quote_or_backslash`):
/// a byte-at-a-time walk cost ~13 instructions a byte, 14% of a batch's
/// instructions (docs/PERFORMANCE.md, "Hot path").
fn nests_deeper_than(body: &[u8], max: usize) -> bool {
    let mut depth = 0usize;
    let mut i = 0;
    while let Some(&b) = body.get(i) {
        i += 1;
        match b {
            b'"' => loop {
                // To the closing quote; a backslash escapes the next byte.
                let Some(at) = body.get(i..).and_then(find_quote_or_backslash) else { return false };
                let closing = body[i + at] == b'"';
                i += at + 1;
                if closing {
                    break;
                }
                i += 1;
            },
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// Index of the first `"` or `\` in `s`, eight bytes at a time.
fn find_quote_or_backslash(s: &[u8]) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    // Non-zero iff some byte of `w` equals `b` (exact for "any", which is
    // all it is used for; the position is found bytewise below).
    let holds = |w: u64, b: u8| {
        let x = w ^ (ONES * b as u64);
        x.wrapping_sub(ONES) & !x & HIGHS
    };
    let mut at = 0;
    for c in s.chunks_exact(8) {
        let w = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        if holds(w, b'"') | holds(w, b'\\') != 0 {
            break;
        }
        at += 8;
    }
    s[at..].iter().position(|&b| b == b'"' || b == b'\\').map(|i| at + i)
}

pub fn parse_json(body: &mut [u8]) -> Result<BorrowedValue<'_>, ApiError> {
    if std::str::from_utf8(body).is_err() {
        return Err(ApiError::new(400, "invalid_utf8", "request body is not valid UTF-8"));
    }
    if nests_deeper_than(body, JSON_DEPTH_MAX) {
        return Err(ApiError::new(400, "malformed_json", "request body nests deeper than 16 levels"));
    }
    JSON_BUFFERS
        .with_borrow_mut(|buffers| simd_json::to_borrowed_value_with_buffers(body, buffers))
        .map_err(|_| ApiError::new(400, "malformed_json", "request body is not valid JSON"))
}

/// Initial size of the parser's scratch buffers: a typical single message.
const JSON_BUFFERS_BYTES_INITIAL: usize = 4096;

thread_local! {
    /// simd-json's scratch buffers (aligned input copy, string buffer,
    /// structural indexes, stage-2 stack), one set per shard thread and
    /// reused by every parse: without them each request allocated and
    /// freed four buffers. They grow to the largest body parsed on this
    /// thread, at most `business.max_body_bytes`. `parse_json` is
    /// synchronous and never re-entered, so the borrow never conflicts.
    static JSON_BUFFERS: std::cell::RefCell<simd_json::Buffers> =
        std::cell::RefCell::new(simd_json::Buffers::new(JSON_BUFFERS_BYTES_INITIAL));
}

/// `{"id":"...","status":"accepted"}`.
pub fn accepted_json(id: TrackingId) -> Vec<u8> {
    let mut body = Vec::with_capacity(48);
    body.extend_from_slice(b"{\"id\":\"");
    body.extend_from_slice(&id.encode());
    body.extend_from_slice(b"\",\"status\":\"accepted\"}");
    body
}

/// `{"results":[...]}` of a batch.
pub fn batch_json(results: &[Result<TrackingId, ApiError>]) -> Vec<u8> {
    let mut body = Vec::with_capacity(16 + results.len() * 48);
    body.extend_from_slice(b"{\"results\":[");
    for (i, r) in results.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        match r {
            Ok(id) => {
                body.extend_from_slice(b"{\"id\":\"");
                body.extend_from_slice(&id.encode());
                body.extend_from_slice(b"\",\"status\":\"accepted\"}");
            }
            Err(e) => {
                body.extend_from_slice(b"{\"error\":{\"code\":");
                json_string(&mut body, e.code);
                body.extend_from_slice(b",\"message\":");
                json_string(&mut body, &e.message);
                body.extend_from_slice(b"}}");
            }
        }
    }
    body.extend_from_slice(b"]}");
    body
}

/// The body of `GET /v1/messages/{id}`.
pub fn status_json(id: TrackingId, v: &StatusView) -> Vec<u8> {
    let mut b = Vec::with_capacity(200 + v.to.len());
    let ms = |b: &mut Vec<u8>, v: u64| {
        if v == 0 {
            b.extend_from_slice(b"null");
        } else {
            b.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
        }
    };
    b.extend_from_slice(b"{\"id\":\"");
    b.extend_from_slice(&id.encode());
    b.extend_from_slice(b"\",\"to\":");
    json_string(&mut b, &v.to);
    b.extend_from_slice(b",\"status\":\"");
    b.extend_from_slice(v.status.as_str().as_bytes());
    b.extend_from_slice(b"\",\"priority\":\"");
    b.extend_from_slice(v.priority.as_str().as_bytes());
    b.extend_from_slice(b"\",\"attempts\":");
    b.extend_from_slice(itoa::Buffer::new().format(v.attempts).as_bytes());
    b.extend_from_slice(b",\"accepted_at\":");
    ms(&mut b, v.accepted_at_ms);
    b.extend_from_slice(b",\"delivered_at\":");
    ms(&mut b, v.delivered_at_ms);
    b.extend_from_slice(b",\"acked_at\":");
    ms(&mut b, v.acked_at_ms);
    if let Some(channel) = v.channel {
        b.extend_from_slice(b",\"channel\":\"");
        b.extend_from_slice(channel.as_bytes());
        b.push(b'"');
    }
    if let Some(id) = &v.provider_message_id {
        b.extend_from_slice(b",\"provider_message_id\":");
        json_string(&mut b, id);
    }
    if let Some(reason) = v.reason.as_str() {
        b.extend_from_slice(b",\"reason\":\"");
        b.extend_from_slice(reason.as_bytes());
        b.push(b'"');
    }
    b.push(b'}');
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The byte-at-a-time scan `nests_deeper_than` replaced: the reference.
    fn nests_deeper_than_bytewise(body: &[u8], max: usize) -> bool {
        let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
        for &b in body {
            if in_string {
                match (escaped, b) {
                    (true, _) => escaped = false,
                    (false, b'\\') => escaped = true,
                    (false, b'"') => in_string = false,
                    _ => {}
                }
                continue;
            }
            match b {
                b'"' => in_string = true,
                b'[' | b'{' => {
                    depth += 1;
                    if depth > max {
                        return true;
                    }
                }
                b']' | b'}' => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
        false
    }

    proptest! {
        #[test]
        fn nesting_scan_matches_the_bytewise_reference(
            body in proptest::collection::vec(proptest::sample::select(b"[]{}\"\\ax".to_vec()), 0..200),
            max in 0usize..6,
        ) {
            prop_assert_eq!(nests_deeper_than(&body, max), nests_deeper_than_bytewise(&body, max));
        }
    }

    #[test]
    fn nesting_depth_is_bounded_and_strings_do_not_count() {
        assert!(!nests_deeper_than(br#"{"messages":[{"to":"a","body":"[[[[[[[[[[[[[[[[[[[[[[[["}]}"#, 16));
        assert!(nests_deeper_than(&[b'['; 17], 16));
        assert!(!nests_deeper_than(&[b'['; 16], 16));
        assert!(!nests_deeper_than(br#"{"a":"\"[[[[[[[[[[[[[[[[[[[[[[[[[[[["}"#, 4));
        let mut deep = br#"{"to":"x","body":"y","z":"#.to_vec();
        deep.extend(std::iter::repeat_n(b'[', 100_000));
        assert!(nests_deeper_than(&deep, 16));
        assert!(parse_json(&mut deep).is_err());
    }
}
