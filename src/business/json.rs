//! JSON of the business API: request validation and response bodies.
//!
//! Requests are read from simd-json's tape ([`with_json`]), never built
//! into a DOM: the DOM made one map and one string table per object, and
//! building and dropping it was ~2,100 instructions per batch item, the
//! largest share of a batch (docs/perf-notes/batch.md). Strings on the tape
//! borrow the request body, so a validated [`MessageRef`] copies nothing.

use std::cell::RefCell;

use esh3ar_shards::id::TrackingId;
use esh3ar_shards::Priority;
use simd_json::prelude::*;
use simd_json::tape::{Array, Value as Json};

use super::{ApiError, USER_ID_BYTES_MAX};
use crate::config::BusinessConfig;
use crate::http::conn::Request;
use crate::http::json_string;
use crate::shard::{MessageRef, StatusView};

/// Validates one message object of client `client`, accepted at `now_ms`.
/// The result borrows `to` and `body` from the request body.
pub fn new_message<'de>(
    value: Json<'_, 'de>,
    client: u32,
    business: &BusinessConfig,
    providers: &crate::outbound::ProvidersConfig,
    now_ms: u64,
) -> Result<MessageRef<'de>, ApiError> {
    let obj = value.as_object().ok_or_else(|| ApiError::invalid("a message must be a JSON object"))?;
    let mut to = None;
    let mut body = None;
    let mut priority = Priority::Normal;
    let mut ttl_seconds = business.default_ttl_seconds;
    let mut fallback = None;
    // In document order; a repeated key: the last one wins.
    for (key, v) in obj.iter() {
        match key {
            // `into_string`: the `&'de str` in the body (`as_str` borrows `v`).
            "to" => to = Some(v.into_string().ok_or_else(|| ApiError::invalid("`to` must be a string"))?),
            "body" => body = Some(v.into_string().ok_or_else(|| ApiError::invalid("`body` must be a string"))?),
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
    Ok(MessageRef {
        client,
        to,
        body: body.as_bytes(),
        priority,
        expires_at_ms: now_ms + ttl_seconds * 1000,
        accepted_at_ms: now_ms,
        fallback,
    })
}

/// `"fallback": {"after_seconds": 0.., "channels": ["whatsapp", "email"]}`;
/// `channels` defaults to every configured provider.
fn fallback_spec(
    v: Json<'_, '_>,
    business: &BusinessConfig,
    providers: &crate::outbound::ProvidersConfig,
) -> Result<crate::fallback::FallbackSpec, ApiError> {
    let obj = v.as_object().ok_or_else(|| ApiError::invalid("`fallback` must be an object"))?;
    let mut after = None;
    let mut channels = None;
    for (key, v) in obj.iter() {
        match key {
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
                let names: Option<Vec<&str>> = list.iter().map(|c| c.into_string()).collect();
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
pub fn batch_items<'t, 'de>(value: Json<'t, 'de>) -> Result<Array<'t, 'de>, ApiError> {
    let obj = value.as_object().ok_or_else(|| ApiError::invalid("body must be a JSON object"))?;
    if let Some(k) = obj.keys().find(|&k| k != "messages") {
        return Err(ApiError::invalid(format!("unknown field `{k}`")));
    }
    // A repeated `messages`: the first one counts (as the DOM's lookup did).
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
/// the limit keeps the validators' walks short whatever the input
/// (simd-json's own stage 2 is iterative).
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

/// Checks `body` (UTF-8, nesting, JSON syntax) and hands `f` the parsed
/// document as a view of simd-json's tape. Strings on the tape borrow
/// `body` (simd-json unescapes them in place), so what `f` returns may too.
///
/// The errors keep their order: not UTF-8, then nested too deep, then not
/// JSON. Nesting is read from the tape when the parse succeeds (for valid
/// JSON the bytes' bracket depth is the tape's depth); the byte scan, 500
/// instructions per batch item, runs only after a failed parse, over a
/// copy taken before it (a failed parse may have unescaped some strings in
/// place already, and the answer must depend on what the client sent).
pub fn with_json<'de, R>(body: &'de mut [u8], f: impl for<'t> FnOnce(Json<'t, 'de>) -> R) -> Result<R, ApiError> {
    if std::str::from_utf8(body).is_err() {
        return Err(ApiError::new(400, "invalid_utf8", "request body is not valid UTF-8"));
    }
    let too_deep = || ApiError::new(400, "malformed_json", "request body nests deeper than 16 levels");
    // The scratch is taken out of the thread-local for the parse, so `f`
    // may itself parse (it does not today) without a double borrow.
    let mut scratch = JSON_SCRATCH.with_borrow_mut(Option::take).unwrap_or_default();
    scratch.pristine.clear();
    scratch.pristine.extend_from_slice(body);
    let mut tape = std::mem::replace(&mut scratch.tape, simd_json::Tape(Vec::new())).reset();
    let result = match simd_json::fill_tape(body, &mut scratch.buffers, &mut tape) {
        Ok(()) if tape_nests_deeper_than(&tape.0, JSON_DEPTH_MAX) => Err(too_deep()),
        Ok(()) => Ok(f(tape.as_value())),
        Err(_) if nests_deeper_than(&scratch.pristine, JSON_DEPTH_MAX) => Err(too_deep()),
        Err(_) => Err(ApiError::new(400, "malformed_json", "request body is not valid JSON")),
    };
    scratch.tape = tape.reset();
    JSON_SCRATCH.set(Some(scratch));
    result
}

/// True if the parsed document nests arrays/objects deeper than `max`
/// (at most [`JSON_DEPTH_MAX`]). Iterative: no recursion on client input.
fn tape_nests_deeper_than(tape: &[simd_json::Node<'_>], max: usize) -> bool {
    assert!(max <= JSON_DEPTH_MAX, "depth {max} over the bound of the scan");
    // Where each open container's nodes end (exclusive), innermost last.
    let mut ends = [0usize; JSON_DEPTH_MAX];
    let mut depth = 0;
    for (i, node) in tape.iter().enumerate() {
        while depth > 0 && i >= ends[depth - 1] {
            depth -= 1;
        }
        if let simd_json::Node::Object { count, .. } | simd_json::Node::Array { count, .. } = node {
            if depth == max {
                return true;
            }
            ends[depth] = i + 1 + count;
            depth += 1;
        }
    }
    false
}

/// Initial size of the parser's scratch buffers: a typical single message.
const JSON_BUFFERS_BYTES_INITIAL: usize = 4096;

/// simd-json's scratch space: the buffers of both stages, the tape, and a
/// copy of the body as it arrived (for the error of a failed parse).
struct JsonScratch {
    buffers: simd_json::Buffers,
    pristine: Vec<u8>,
    /// Empty between parses (`'static`: it borrows nothing then).
    tape: simd_json::Tape<'static>,
}

impl Default for JsonScratch {
    fn default() -> Self {
        Self {
            buffers: simd_json::Buffers::new(JSON_BUFFERS_BYTES_INITIAL),
            pristine: Vec::with_capacity(JSON_BUFFERS_BYTES_INITIAL),
            tape: simd_json::Tape(Vec::new()),
        }
    }
}

thread_local! {
    /// simd-json's scratch buffers (aligned input copy, string buffer,
    /// structural indexes, stage-2 stack) and its tape, one set per shard
    /// thread and reused by every parse: without them each request
    /// allocated and freed five buffers. They grow to the largest body
    /// parsed on this thread, at most `business.max_body_bytes`.
    static JSON_SCRATCH: RefCell<Option<JsonScratch>> = const { RefCell::new(None) };
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

    fn test_config() -> (BusinessConfig, crate::outbound::ProvidersConfig) {
        let business = toml::from_str(r#"listen = "127.0.0.1:0""#).expect("a minimal [business] table");
        (business, crate::outbound::ProvidersConfig::default())
    }

    /// A batch request's error, or each item's `to` (accepted) or error message.
    fn answers(body: &[u8]) -> Result<Vec<Result<String, String>>, ApiError> {
        let (business, providers) = test_config();
        with_json(&mut body.to_vec(), |v| {
            let items = batch_items(v)?;
            Ok(items
                .iter()
                .map(|i| {
                    new_message(i, 7, &business, &providers, 1_000).map(|m| m.to.to_owned()).map_err(|e| e.message)
                })
                .collect())
        })
        .and_then(|r| r)
    }

    /// Every answer of the tape-based validation, one item each. (It
    /// replaced a DOM-based one; a differential proptest against that
    /// showed the same answers before the DOM code was removed.)
    #[test]
    fn every_item_gets_its_documented_answer() {
        let max_ttl = test_config().0.max_ttl_seconds;
        let ttl = format!("`ttl_seconds` must be an integer from 1 to {max_ttl}");
        let after = format!("`fallback.after_seconds` must be an integer from 0 to {max_ttl}");
        let bad_to = "`to` must be 1 to 256 bytes without control characters";
        let cases: &[(&str, Result<&str, &str>)] = &[
            (r#"{"to":"a\"b","body":"x\u00e9","priority":"low","ttl_seconds":60}"#, Ok("a\"b")),
            (r#"{"to":"a","body":"b","to":"d"}"#, Ok("d")), // the last repeated key wins
            (r#"{"body":"b","to":"\u00e9"}"#, Ok("é")),
            (r#"{"to":"","body":"y"}"#, Err(bad_to)),
            (r#"{"to":"a\u0001b","body":"y"}"#, Err(bad_to)),
            (r#"{"to":1,"body":"y"}"#, Err("`to` must be a string")),
            (r#"{"to":"a","body":null}"#, Err("`body` must be a string")),
            (r#"{"body":"y"}"#, Err("`to` is required")),
            (r#"{"to":"a"}"#, Err("`body` is required")),
            (r#"{"to":"a","body":""}"#, Err("`body` must not be empty")),
            (r#"{"to":"a","body":"b","priority":"HIGH"}"#, Err(r#"`priority` must be "high", "normal" or "low""#)),
            (r#"{"to":"a","body":"b","ttl_seconds":0}"#, Err(&ttl)),
            (r#"{"to":"a","body":"b","ttl_seconds":1.5}"#, Err(&ttl)),
            (r#"{"to":"a","body":"b","To":"x"}"#, Err("unknown field `To`")),
            // In document order: the first bad field is the one named.
            (r#"{"to":1,"x":2}"#, Err("`to` must be a string")),
            (r#"{"x":2,"to":1}"#, Err("unknown field `x`")),
            (r#"["a"]"#, Err("a message must be a JSON object")),
            (r#"{"to":"a","body":"b","fallback":[]}"#, Err("`fallback` must be an object")),
            (r#"{"to":"a","body":"b","fallback":{"z":1}}"#, Err("unknown field `fallback.z`")),
            (r#"{"to":"a","body":"b","fallback":{"after_seconds":-5}}"#, Err(&after)),
            (r#"{"to":"a","body":"b","fallback":{"channels":"x"}}"#, Err("`fallback.channels` must be an array")),
            (r#"{"to":"a","body":"b","fallback":{"channels":[1]}}"#, Err("`fallback.channels` must hold strings")),
            (
                r#"{"to":"a","body":"b","fallback":{"channels":[]}}"#,
                Err("`fallback.channels` must name at least one channel"),
            ),
            (r#"{"to":"a","body":"b","fallback":{}}"#, Err("`fallback.after_seconds` is required")),
            (
                r#"{"to":"a","body":"b","fallback":{"after_seconds":5}}"#,
                Err("`fallback` needs a provider, and none is configured"),
            ),
        ];
        for (item, want) in cases {
            let got = answers(format!(r#"{{"messages":[{item}]}}"#).as_bytes()).expect("a valid batch");
            let want = want.map(str::to_owned).map_err(str::to_owned);
            assert_eq!(got, [want], "item {item}");
        }
    }

    #[test]
    fn a_bad_batch_is_refused_whole() {
        let refused = |body: &[u8]| answers(body).expect_err("refused").message;
        assert_eq!(refused(br#"{"messages":[],"x":1}"#), "unknown field `x`");
        assert_eq!(refused(br#"{"messages":{}}"#), "`messages` must be an array");
        assert_eq!(refused(b"[]"), "body must be a JSON object");
        assert_eq!(refused(br#"{"messages":[{"to":"a","body":"b"}"#), "request body is not valid JSON");
        let utf8 = answers(b"{\"messages\":[{\"to\":\"a\",\"body\":\"\xff\"}]}").expect_err("refused");
        assert_eq!(utf8.code, "invalid_utf8");
        assert_eq!(refused(br#"{"messages":[]}"#), "`messages` must hold 1 to 1000 items");
    }

    /// Valid JSON of random shape: arrays, objects and strings with brackets in them.
    fn nested() -> impl Strategy<Value = String> {
        let leaf = prop_oneof![Just(r#""[{\"]""#.to_owned()), Just("1".to_owned()), Just(r#""x""#.to_owned())];
        leaf.prop_recursive(24, 64, 3, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..3).prop_map(|v| format!("[{}]", v.join(","))),
                proptest::collection::vec(inner, 0..3).prop_map(|v| {
                    let fields: Vec<String> = v.iter().enumerate().map(|(i, x)| format!(r#""k{i}":{x}"#)).collect();
                    format!("{{{}}}", fields.join(","))
                }),
            ]
        })
    }

    /// The error order of the checks `with_json` replaced: all three before the parse.
    fn check_order_reference(body: &[u8]) -> Option<&'static str> {
        if std::str::from_utf8(body).is_err() {
            return Some("invalid_utf8");
        }
        if nests_deeper_than(body, JSON_DEPTH_MAX) {
            return Some("nests");
        }
        simd_json::to_tape(&mut body.to_vec()).err().map(|_| "malformed")
    }

    fn check_order(body: &[u8]) -> Option<&'static str> {
        match with_json(&mut body.to_vec(), |_| ()) {
            Ok(()) => None,
            Err(e) if e.code == "invalid_utf8" => Some("invalid_utf8"),
            Err(e) if e.message.contains("nests") => Some("nests"),
            Err(_) => Some("malformed"),
        }
    }

    proptest! {
        #[test]
        fn tape_depth_matches_the_byte_scan_on_valid_json(doc in nested(), max in 0usize..=JSON_DEPTH_MAX) {
            let mut bytes = doc.clone().into_bytes();
            let tape = simd_json::to_tape(&mut bytes).expect("generated JSON is valid");
            prop_assert_eq!(tape_nests_deeper_than(&tape.0, max), nests_deeper_than(doc.as_bytes(), max), "{}", doc);
        }

        #[test]
        fn errors_keep_their_order(
            body in proptest::collection::vec(proptest::sample::select(b"[]{}\"\\:,1 a\xff".to_vec()), 0..60),
            deep in 0usize..24,
        ) {
            // Half of the cases start deep, so the nesting answer varies.
            let mut b = vec![b'['; deep];
            b.extend_from_slice(&body);
            prop_assert_eq!(check_order(&b), check_order_reference(&b), "{:?}", String::from_utf8_lossy(&b));
        }
    }

    #[test]
    fn a_failed_parse_is_judged_on_the_body_as_sent() {
        // Valid up to a bad atom at the end, with an escaped quote before
        // brackets: unescaped in place, the bytes would read 17 deep.
        let mut body = br#"{"a":"\"[[[[[[[[[[[[[[[[[[[[","b":tru}"#.to_vec();
        let err = with_json(&mut body, |_| ()).expect_err("not JSON");
        assert_eq!(err.message, "request body is not valid JSON");
        let mut deep = format!("{}1{}", "[".repeat(17), "]".repeat(17)).into_bytes();
        let err = with_json(&mut deep, |_| ()).expect_err("too deep");
        assert_eq!(err.message, "request body nests deeper than 16 levels");
        let mut sixteen = format!("{}1{}", "[".repeat(16), "]".repeat(16)).into_bytes();
        assert!(with_json(&mut sixteen, |_| ()).is_ok());
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
        assert!(with_json(&mut deep, |_| ()).is_err());
    }
}
