//! The business API (and the admin listener) over real sockets against the
//! real binary: routes, validation, every error code, HTTP framing limits,
//! keep-alive, pipelining, concurrency and per-user ordering.
mod common;
use common::*;

use std::collections::HashSet;
use std::io::Write;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

// ---------------------------------------------------------------- helpers

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

fn text(r: &Response) -> String {
    String::from_utf8_lossy(&r.body).into_owned()
}

/// Asserts `r` is `status` with exactly `{"error":{"code":code,"message":<non-empty>}}`.
#[track_caller]
fn assert_error(r: &Response, status: u16, code: &str) {
    assert_eq!(r.status, status, "expected {status} {code}, body: {}", text(r));
    assert_eq!(r.header("content-type"), Some("application/json"), "{:?}", r.headers);
    let j = r.json();
    let top = j.as_object().expect("error body is an object");
    assert_eq!(top.len(), 1, "error body has only `error`: {j}");
    let e = j["error"].as_object().expect("`error` is an object");
    assert_eq!(e.len(), 2, "`error` has code and message only: {j}");
    assert_eq!(j["error"]["code"], code, "{j}");
    let msg = j["error"]["message"].as_str().expect("message is a string");
    assert!(!msg.is_empty(), "{j}");
}

/// Like [`assert_error`], and the message mentions `needle`.
#[track_caller]
fn assert_error_mentions(r: &Response, status: u16, code: &str, needle: &str) {
    assert_error(r, status, code);
    let msg = r.json()["error"]["message"].as_str().unwrap().to_owned();
    assert!(msg.contains(needle), "error message {msg:?} should mention {needle:?}");
}

/// Asserts a 202 `{"id","status":"accepted"}` and returns the id.
#[track_caller]
fn accepted_id(r: &Response) -> String {
    assert_eq!(r.status, 202, "body: {}", text(r));
    assert_eq!(r.header("content-type"), Some("application/json"));
    let j = r.json();
    assert_eq!(j.as_object().unwrap().len(), 2, "{j}");
    assert_eq!(j["status"], "accepted", "{j}");
    let id = j["id"].as_str().expect("id is a string").to_owned();
    assert_id_shape(&id);
    id
}

#[track_caller]
fn assert_id_shape(id: &str) {
    assert!(
        !id.is_empty() && id.len() <= 32 && id.bytes().all(|b| b.is_ascii_alphanumeric()),
        "tracking id {id:?} is not a short URL-safe token"
    );
}

/// POST /v1/messages with an arbitrary JSON value, as the test client.
fn post_value(c: &mut Client, v: &Value) -> Response {
    c.request("POST", "/v1/messages", Some(API_KEY), Some(&v.to_string()))
}

fn post_batch(c: &mut Client, v: &Value) -> Response {
    c.request("POST", "/v1/messages/batch", Some(API_KEY), Some(&v.to_string()))
}

/// A request with exactly the given header lines (plus Host) and body.
fn raw_request(method: &str, path: &str, headers: &[&str], body: &[u8]) -> Vec<u8> {
    let mut r = format!("{method} {path} HTTP/1.1\r\nHost: test\r\n");
    for h in headers {
        r += h;
        r += "\r\n";
    }
    r += "\r\n";
    let mut r = r.into_bytes();
    r.extend_from_slice(body);
    r
}

/// A POST /v1/messages with auth, content type and length set, and `body` bytes.
fn post_bytes(body: &[u8]) -> Vec<u8> {
    raw_request(
        "POST",
        "/v1/messages",
        &[
            &format!("Authorization: Bearer {API_KEY}"),
            "Content-Type: application/json",
            &format!("Content-Length: {}", body.len()),
        ],
        body,
    )
}

fn exchange(c: &mut Client, bytes: &[u8]) -> Response {
    c.send_raw(bytes);
    c.read_response().unwrap_or_else(|e| panic!("no response: {e}"))
}

/// Writes, ignoring errors: the server may close while we still write.
fn write_lenient(c: &mut Client, bytes: &[u8]) {
    let _ = c.stream.write_all(bytes);
    let _ = c.stream.flush();
}

/// Asserts the engine process is still running.
#[track_caller]
fn assert_alive(engine: &mut Engine) {
    assert!(engine.child.try_wait().unwrap().is_none(), "engine exited; stderr: {:?}", engine.stderr_lines());
}

/// The part of an encoded tracking id that holds the home shard for
/// small sequence numbers (ids are 80-bit `shard << 64 | seq` in fixed-width
/// base32 whose alphabet is in ASCII order; see shards/src/id.rs).
fn home_prefix(id: &str) -> &str {
    &id[..4]
}

// ------------------------------------------------------- single messages

#[test]
fn post_then_get_shows_every_field() {
    let setup = Setup::new(&Opts::default());
    let engine = setup.start();
    let mut c = engine.client();
    let before = now_ms();
    let id = accepted_id(&c.send("alice", "hello"));
    let after = now_ms();

    let r = c.get_status(&id);
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(r.header("content-type"), Some("application/json"));
    let j = r.json();
    let keys: HashSet<&str> = j.as_object().unwrap().keys().map(|k| k.as_str()).collect();
    let want: HashSet<&str> =
        ["id", "to", "status", "priority", "attempts", "accepted_at", "delivered_at", "acked_at"].into();
    assert_eq!(keys, want, "{j}");
    assert_eq!(j["id"], id.as_str());
    assert_eq!(j["to"], "alice");
    assert_eq!(j["status"], "accepted");
    assert_eq!(j["priority"], "normal");
    assert_eq!(j["attempts"], 0);
    assert!(j["delivered_at"].is_null(), "{j}");
    assert!(j["acked_at"].is_null(), "{j}");
    let at = j["accepted_at"].as_u64().expect("accepted_at is ms");
    assert!((before..=after).contains(&at), "accepted_at {at} not within the request ({before}..={after})");

    // A query string does not change the resource.
    let r = c.request("GET", &format!("/v1/messages/{id}?verbose=1"), Some(API_KEY), None);
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["id"], id.as_str());

    // A second message gets another id.
    let id2 = accepted_id(&c.send("alice", "again"));
    assert_ne!(id, id2);
}

#[test]
fn recipient_text_round_trips_exactly() {
    let setup = Setup::new(&Opts::default());
    let engine = setup.start();
    let mut c = engine.client();
    for to in ["zoë 🚀", "quote\"back\\slash/slash", "space in name", "ümläut-ÄÖÜ-日本語"] {
        let id = accepted_id(&post_value(&mut c, &json!({"to": to, "body": "x"})));
        let r = c.get_status(&id);
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["to"], to);
    }
    // 256 bytes is the longest user id (here in 2-byte characters).
    let long = "é".repeat(128);
    assert_eq!(long.len(), 256);
    let id = accepted_id(&post_value(&mut c, &json!({"to": long, "body": "x"})));
    assert_eq!(c.get_status(&id).json()["to"], long.as_str());
    let r = post_value(&mut c, &json!({"to": format!("{long}a"), "body": "x"}));
    assert_error_mentions(&r, 400, "invalid_field", "`to`");
}

#[test]
fn priority_is_honoured_and_validated() {
    let setup = Setup::new(&Opts::default());
    let engine = setup.start();
    let mut c = engine.client();
    for p in ["high", "normal", "low"] {
        let id = accepted_id(&post_value(&mut c, &json!({"to": "bob", "body": "b", "priority": p})));
        let r = c.get_status(&id);
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["priority"], p);
    }
    for bad in [json!("urgent"), json!("HIGH"), json!(""), json!(0), json!(null), json!(["high"])] {
        let r = post_value(&mut c, &json!({"to": "bob", "body": "b", "priority": bad}));
        assert_error_mentions(&r, 400, "invalid_field", "priority");
    }
}

#[test]
fn ttl_is_validated() {
    let setup = Setup::new(&Opts::default());
    let engine = setup.start();
    let mut c = engine.client();
    let max = 30 * 24 * 3600u64; // the default business.max_ttl_seconds
    for ok in [1, 60, max] {
        let id = accepted_id(&post_value(&mut c, &json!({"to": "carol", "body": "b", "ttl_seconds": ok})));
        assert_eq!(c.get_status(&id).status, 200);
    }
    for bad in [json!(0), json!(max + 1), json!(-1), json!(1.5), json!("60"), json!(null), json!(u64::MAX)] {
        let r = post_value(&mut c, &json!({"to": "carol", "body": "b", "ttl_seconds": bad}));
        assert_error_mentions(&r, 400, "invalid_field", "ttl_seconds");
    }
}

#[test]
fn message_fields_are_validated() {
    let setup = Setup::new(&Opts::default());
    let engine = setup.start();
    let mut c = engine.client();
    let cases: Vec<(Value, &str)> = vec![
        (json!({"body": "b"}), "`to`"),
        (json!({"to": "dave"}), "`body`"),
        (json!({}), "`to`"),
        (json!({"to": 5, "body": "b"}), "`to`"),
        (json!({"to": null, "body": "b"}), "`to`"),
        (json!({"to": "dave", "body": 5}), "`body`"),
        (json!({"to": "dave", "body": {"a": 1}}), "`body`"),
        (json!({"to": "", "body": "b"}), "`to`"),
        (json!({"to": "dave", "body": ""}), "`body`"),
        (json!({"to": "da\nve", "body": "b"}), "`to`"),
        (json!({"to": "da\u{7f}ve", "body": "b"}), "`to`"),
        (json!({"to": "x".repeat(257), "body": "b"}), "`to`"),
        (json!({"to": "dave", "body": "b", "subject": "s"}), "subject"),
        (json!({"to": "dave", "body": "b", "To": "dave"}), "To"),
        (json!([{"to": "dave", "body": "b"}]), "object"),
        (json!("to dave"), "object"),
        (json!(42), "object"),
        (json!(null), "object"),
    ];
    for (v, needle) in cases {
        let r = post_value(&mut c, &v);
        assert_eq!(r.status, 400, "{v} was accepted: {}", text(&r));
        assert_error_mentions(&r, 400, "invalid_field", needle);
    }
    // After all those refusals the same connection still accepts messages,
    // and a body may hold control characters and quotes.
    let id = accepted_id(&post_value(&mut c, &json!({"to": "dave", "body": "line1\nline2\t\"q\"\u{0}"})));
    assert_eq!(c.get_status(&id).status, 200);
}

#[test]
fn get_is_scoped_to_the_client_and_unknown_ids_are_404() {
    let setup = Setup::new(&Opts::default());
    let engine = setup.start();
    let mut c = engine.client();
    let id = accepted_id(&c.send("erin", "secret"));

    // Another client's key: not found (existence is not leaked).
    let r = c.request("GET", &format!("/v1/messages/{id}"), Some(OTHER_KEY), None);
    assert_error(&r, 404, "not_found");
    // Back to the owner on the same connection (the auth cache must follow).
    assert_eq!(c.get_status(&id).status, 200);
    // The other client's own message is invisible to us, visible to it.
    let r = c.request("POST", "/v1/messages", Some(OTHER_KEY), Some(r#"{"to":"erin","body":"from other"}"#));
    let other_id = accepted_id(&r);
    assert_error(&c.get_status(&other_id), 404, "not_found");
    let r = c.request("GET", &format!("/v1/messages/{other_id}"), Some(OTHER_KEY), None);
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["to"], "erin");

    // Ids that were never issued, or are not ids at all.
    let zeros = "0".repeat(id.len());
    let mut bumped = id.clone().into_bytes();
    let last = bumped.last_mut().unwrap();
    *last = if *last == b'z' { b'y' } else { b'z' };
    let bumped = String::from_utf8(bumped).unwrap();
    let long = format!("{id}0");
    let upper = id.to_uppercase();
    for bad in [
        "nope",
        "zzzzzzzzzzzzzzzz",
        zeros.as_str(),
        bumped.as_str(),
        long.as_str(),
        &id[..id.len() - 1],
        upper.as_str(),
        "%00%ff",
        "________________",
    ] {
        if bad == id {
            continue;
        }
        let r = c.get_status(bad);
        assert_error(&r, 404, "not_found");
    }
    // The connection survived all of it.
    assert_eq!(c.get_status(&id).status, 200);
}

// ------------------------------------------------------------------ batch

/// Users whose home shards cover all of `0..shards` (several per shard).
fn users_over_shards(shards: usize, per_shard: usize) -> Vec<String> {
    let mut by_shard = vec![Vec::new(); shards];
    let mut i = 0;
    while by_shard.iter().any(|v| v.len() < per_shard) {
        let u = format!("user-{i}");
        let s = esh3ar::route(&u, shards);
        if by_shard[s].len() < per_shard {
            by_shard[s].push(u);
        }
        i += 1;
    }
    // Interleave so consecutive items go to different shards.
    let mut out = Vec::new();
    for k in 0..per_shard {
        for v in &by_shard {
            out.push(v[k].clone());
        }
    }
    out
}

#[test]
fn batch_results_follow_item_order_across_shards() {
    let shards = 4;
    let setup = Setup::new(&Opts { shards, ..Opts::default() });
    let engine = setup.start();
    let mut c = engine.client();
    let users = users_over_shards(shards, 5);
    let priorities = ["high", "normal", "low"];
    // Valid items interleaved with invalid ones.
    let mut items = Vec::new();
    let mut expect: Vec<Option<(String, &str)>> = Vec::new();
    for (i, u) in users.iter().enumerate() {
        let p = priorities[i % 3];
        items.push(json!({"to": u, "body": format!("m{i}"), "priority": p}));
        expect.push(Some((u.clone(), p)));
        if i % 4 == 1 {
            items.push(json!({"to": u, "body": "x", "priority": "urgent"}));
            expect.push(None);
        }
        if i % 7 == 3 {
            items.push(json!("not an object"));
            expect.push(None);
        }
        if i % 5 == 0 {
            items.push(json!({"to": u}));
            expect.push(None);
        }
    }
    let before = now_ms();
    let r = post_batch(&mut c, &json!({ "messages": items }));
    assert_eq!(r.status, 202, "{}", text(&r));
    let j = r.json();
    assert_eq!(j.as_object().unwrap().len(), 1, "{j}");
    let results = j["results"].as_array().expect("results array");
    assert_eq!(results.len(), items.len());

    let mut ids = HashSet::new();
    let mut prefix_of_shard: Vec<HashSet<String>> = vec![HashSet::new(); shards];
    for (i, (res, exp)) in results.iter().zip(&expect).enumerate() {
        match exp {
            Some((to, p)) => {
                assert_eq!(res["status"], "accepted", "item {i}: {res}");
                let id = res["id"].as_str().unwrap().to_owned();
                assert_id_shape(&id);
                assert!(ids.insert(id.clone()), "duplicate id {id}");
                // Every id is retrievable and is the message at that position.
                let g = c.get_status(&id);
                assert_eq!(g.status, 200, "item {i}: {}", text(&g));
                let g = g.json();
                assert_eq!(g["to"], to.as_str(), "item {i} shows another message");
                assert_eq!(g["priority"], *p, "item {i}");
                assert!(g["accepted_at"].as_u64().unwrap() >= before);
                prefix_of_shard[esh3ar::route(to, shards)].insert(home_prefix(&id).to_owned());
            }
            None => {
                assert!(res.get("id").is_none(), "item {i} was accepted: {res}");
                let e = &res["error"];
                assert_eq!(e["code"], "invalid_field", "item {i}: {res}");
                assert!(!e["message"].as_str().unwrap().is_empty());
            }
        }
    }
    // Ids carry the recipient's home shard: one shard, one prefix; four
    // shards, four different prefixes.
    let all: HashSet<String> = prefix_of_shard
        .iter()
        .map(|s| {
            assert_eq!(s.len(), 1, "ids of one home shard differ in shard: {s:?}");
            s.iter().next().unwrap().clone()
        })
        .collect();
    assert_eq!(all.len(), shards, "ids of different shards look alike");
}

#[test]
fn batch_limits_and_shape() {
    let setup = Setup::new(&Opts::default());
    let engine = setup.start();
    let mut c = engine.client();

    let r = post_batch(&mut c, &json!({"messages": []}));
    assert_error_mentions(&r, 400, "invalid_field", "messages");

    let item = json!({"to": "u", "body": "b"});
    let over: Vec<Value> = (0..1001).map(|_| item.clone()).collect();
    let r = post_batch(&mut c, &json!({ "messages": over }));
    assert_error_mentions(&r, 400, "invalid_field", "1000");

    for bad in [
        json!({}),
        json!({"messages": "x"}),
        json!({"messages": {"to": "u", "body": "b"}}),
        json!({"messages": null}),
        json!({"messages": [item.clone()], "extra": 1}),
        json!([item.clone()]),
        json!("messages"),
    ] {
        let r = post_batch(&mut c, &bad);
        assert_error(&r, 400, "invalid_field");
    }
    let r = c.request("POST", "/v1/messages/batch", Some(API_KEY), Some(r#"{"messages":[{"to":"u","body":"b"}"#));
    assert_error(&r, 400, "malformed_json");

    // Exactly 1000 items: all accepted, all distinct, spot-checked by GET.
    let users: Vec<Value> = (0..1000).map(|i| json!({"to": format!("u{}", i % 37), "body": format!("{i}")})).collect();
    let r = post_batch(&mut c, &json!({ "messages": users }));
    assert_eq!(r.status, 202, "{}", text(&r));
    let results = r.json()["results"].as_array().unwrap().clone();
    assert_eq!(results.len(), 1000);
    let ids: HashSet<String> = results.iter().map(|x| x["id"].as_str().expect("accepted").to_owned()).collect();
    assert_eq!(ids.len(), 1000, "ids are not distinct");
    for i in [0usize, 1, 36, 37, 500, 998, 999] {
        let id = results[i]["id"].as_str().unwrap();
        let g = c.get_status(id);
        assert_eq!(g.status, 200);
        assert_eq!(g.json()["to"], format!("u{}", i % 37));
    }

    // A batch where every item is invalid still answers per item.
    let r = post_batch(&mut c, &json!({"messages": [{"to": "u"}, 7]}));
    assert_eq!(r.status, 202, "{}", text(&r));
    let res = r.json()["results"].as_array().unwrap().clone();
    assert_eq!(res.len(), 2);
    for x in res {
        assert_eq!(x["error"]["code"], "invalid_field", "{x}");
    }

    // The batch endpoint needs auth and a JSON content type too.
    let r = c.request("POST", "/v1/messages/batch", None, Some(r#"{"messages":[{"to":"u","body":"b"}]}"#));
    assert_error(&r, 401, "unauthorized");
    let body = br#"{"messages":[{"to":"u","body":"b"}]}"#;
    let req = raw_request(
        "POST",
        "/v1/messages/batch",
        &[
            &format!("Authorization: Bearer {API_KEY}"),
            "Content-Type: text/plain",
            &format!("Content-Length: {}", body.len()),
        ],
        body,
    );
    assert_error(&exchange(&mut c, &req), 415, "unsupported_media_type");
}

// ------------------------------------------------------------ error codes

#[test]
fn malformed_json_and_invalid_utf8() {
    let setup = Setup::new(&Opts::default());
    let engine = setup.start();
    let mut c = engine.client();
    for body in [
        &b"{"[..],
        b"{\"to\":\"a\",\"body\":\"b\"",
        b"{\"to\":\"a\" \"body\":\"b\"}",
        b"{to:\"a\",body:\"b\"}",
        b"{\"to\":\"a\",\"body\":\"b\"} trailing",
        b"{\"to\":\"a\",\"body\":\"b\"}{}",
        b"",
        b"   ",
        b"nul",
    ] {
        let r = exchange(&mut c, &post_bytes(body));
        assert_error(&r, 400, "malformed_json");
    }
    for body in [
        &b"{\"to\":\"a\",\"body\":\"\xff\"}"[..],
        b"{\"to\":\"\xc3\x28\",\"body\":\"b\"}",
        b"\xef\xbb\xbf\xed\xa0\x80", // UTF-16 surrogate encoded in UTF-8
    ] {
        let r = exchange(&mut c, &post_bytes(body));
        assert_error(&r, 400, "invalid_utf8");
    }
    // Valid UTF-8 bytes straight in the JSON work.
    let id = accepted_id(&exchange(&mut c, &post_bytes("{\"to\":\"ünï\",\"body\":\"ok\"}".as_bytes())));
    assert_eq!(c.get_status(&id).json()["to"], "ünï");
}

#[test]
fn unauthorized_is_401_with_www_authenticate() {
    let setup = Setup::new(&Opts::default());
    let engine = setup.start();
    let mut c = engine.client();
    let body = r#"{"to":"frank","body":"b"}"#;
    let len = format!("Content-Length: {}", body.len());
    let bad_auth: Vec<Option<String>> = vec![
        None,
        Some("Bearer wrong-key-0123456789abcdef".into()),
        Some(format!("Bearer {API_KEY}x")),
        Some(format!("Bearer {}", &API_KEY[..API_KEY.len() - 1])),
        Some(format!("Basic {API_KEY}")),
        Some(format!("Token {API_KEY}")),
        Some(API_KEY.to_owned()),
        Some(format!("Bearer{API_KEY}")),
        Some("Bearer ".into()),
        Some("Bearer".into()),
        Some(String::new()),
    ];
    for auth in &bad_auth {
        let mut headers = vec!["Content-Type: application/json", len.as_str()];
        let h;
        if let Some(a) = auth {
            h = format!("Authorization: {a}");
            headers.push(&h);
        }
        let r = exchange(&mut c, &raw_request("POST", "/v1/messages", &headers, body.as_bytes()));
        assert_error(&r, 401, "unauthorized");
        assert_eq!(
            r.header("www-authenticate").map(str::to_ascii_lowercase),
            Some("bearer".into()),
            "auth {auth:?}: {:?}",
            r.headers
        );
        // A GET is refused the same way.
        let r = exchange(
            &mut c,
            &raw_request(
                "GET",
                "/v1/messages/0000000000000000",
                &auth
                    .as_ref()
                    .map(|a| vec![format!("Authorization: {a}")])
                    .unwrap_or_default()
                    .iter()
                    .map(String::as_str)
                    .collect::<Vec<_>>(),
                b"",
            ),
        );
        assert_error(&r, 401, "unauthorized");
        assert!(r.header("www-authenticate").is_some());
    }
    // 401 does not close the connection; the scheme is case-insensitive.
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let auth = format!("Authorization: {scheme} {API_KEY}");
        let r = exchange(
            &mut c,
            &raw_request("POST", "/v1/messages", &[&auth, "Content-Type: application/json", &len], body.as_bytes()),
        );
        accepted_id(&r);
    }
    // A good key then a bad one on the same connection: the bad one is refused.
    accepted_id(&c.send("frank", "ok"));
    let r = c.request("POST", "/v1/messages", Some("nope-nope-nope-nope-nope"), Some(body));
    assert_error(&r, 401, "unauthorized");
    accepted_id(&c.send("frank", "ok again"));
}

#[test]
fn unknown_paths_are_404_and_wrong_methods_405_with_allow() {
    let setup = Setup::new(&Opts::default());
    let engine = setup.start();
    let mut c = engine.client();
    let id = accepted_id(&c.send("gina", "b"));

    for path in [
        "/",
        "/v1",
        "/v1/message",
        "/v2/messages",
        "/v1/messages/",
        "/v1/messages/a/b",
        &format!("/v1/messages/{id}/"),
        "/V1/MESSAGES",
        "/healthz",
    ] {
        let r = c.request("GET", path, Some(API_KEY), None);
        assert_error(&r, 404, "not_found");
    }
    let cases: Vec<(&str, String, &str)> = vec![
        ("GET", "/v1/messages".into(), "POST"),
        ("PUT", "/v1/messages".into(), "POST"),
        ("DELETE", "/v1/messages".into(), "POST"),
        ("GET", "/v1/messages/batch".into(), "POST"),
        ("PATCH", "/v1/messages/batch".into(), "POST"),
        ("DELETE", format!("/v1/messages/{id}"), "GET"),
        ("PUT", format!("/v1/messages/{id}"), "GET"),
        ("POST", format!("/v1/messages/{id}"), "GET"),
    ];
    for (method, path, allow) in &cases {
        let body = (*method != "GET" && *method != "DELETE").then_some("{}");
        let r = c.request(method, path, Some(API_KEY), body);
        assert_error(&r, 405, "method_not_allowed");
        assert_eq!(r.header("allow"), Some(*allow), "{method} {path}: {:?}", r.headers);
    }
    // The message was not deleted, and the connection is still usable.
    assert_eq!(c.get_status(&id).status, 200);
}

#[test]
fn length_required_is_411_and_closes() {
    let setup = Setup::new(&Opts::default());
    let engine = setup.start();
    let auth = format!("Authorization: Bearer {API_KEY}");

    // POST without Content-Length.
    let mut c = engine.client();
    let r = exchange(&mut c, &raw_request("POST", "/v1/messages", &[&auth, "Content-Type: application/json"], b""));
    assert_error(&r, 411, "length_required");

    // Transfer-Encoding: chunked alone (the body cannot be framed: closed).
    let mut c = engine.client();
    let r = exchange(
        &mut c,
        &raw_request(
            "POST",
            "/v1/messages",
            &[&auth, "Content-Type: application/json", "Transfer-Encoding: chunked"],
            b"",
        ),
    );
    assert_error(&r, 411, "length_required");
    assert!(c.is_closed_within(Duration::from_secs(3)));

    // Also on the batch endpoint.
    let mut c = engine.client();
    let r =
        exchange(&mut c, &raw_request("POST", "/v1/messages/batch", &[&auth, "Content-Type: application/json"], b""));
    assert_error(&r, 411, "length_required");

    // Nothing was half-accepted: the engine still works.
    accepted_id(&engine.client().send("hank", "b"));
}

#[test]
fn both_content_length_and_transfer_encoding_is_400_and_closes() {
    let setup = Setup::new(&Opts::default());
    let engine = setup.start();
    let auth = format!("Authorization: Bearer {API_KEY}");
    let body = br#"{"to":"ivan","body":"smuggled"}"#;
    let len = format!("Content-Length: {}", body.len());
    for extra in [
        vec![len.as_str(), "Transfer-Encoding: chunked"],
        vec!["Transfer-Encoding: chunked", len.as_str()],
        vec![len.as_str(), "Transfer-Encoding: identity"],
        vec![len.as_str(), "Content-Length: 3"],
        vec!["Content-Length: +31"],
        vec!["Content-Length: -1"],
        vec!["Content-Length: 0x1f"],
        vec!["Content-Length: 31, 31"],
        vec!["Content-Length : 31"],
        vec!["Content-Length: 31", "transfer-encoding: CHUNKED"],
        vec!["Content-Length: 3", " 1"],
        vec!["Content-Length: 31\0"],
    ] {
        let mut c = engine.client();
        // A valid request first shows the connection was fine before.
        accepted_id(&c.send("ivan", "before"));
        let mut headers = vec![auth.as_str(), "Content-Type: application/json"];
        headers.extend(extra.iter().copied());
        // The head alone is refused; no body is sent (unread bytes would
        // turn the server's close into a reset).
        let r = exchange(&mut c, &raw_request("POST", "/v1/messages", &headers, b""));
        assert_error(&r, 400, "bad_request");
        assert!(c.is_closed_within(Duration::from_secs(3)), "connection left open after {extra:?}");
    }
}

#[test]
fn body_over_max_body_bytes_is_413_and_closes() {
    let max = 1024;
    let setup = Setup::new(&Opts { max_body_bytes: max, ..Opts::default() });
    let engine = setup.start();
    let mut c = engine.client();

    // A body of exactly max_body_bytes is accepted.
    let skeleton = r#"{"to":"judy","body":""}"#;
    let pad = "p".repeat(max - skeleton.len());
    let exact = format!(r#"{{"to":"judy","body":"{pad}"}}"#);
    assert_eq!(exact.len(), max);
    let id = accepted_id(&exchange(&mut c, &post_bytes(exact.as_bytes())));
    assert_eq!(c.get_status(&id).status, 200);

    // One byte more is refused from the head alone (the body is never sent).
    let head = raw_request(
        "POST",
        "/v1/messages",
        &[
            &format!("Authorization: Bearer {API_KEY}"),
            "Content-Type: application/json",
            &format!("Content-Length: {}", max + 1),
        ],
        b"",
    );
    let r = exchange(&mut c, &head);
    assert_error(&r, 413, "payload_too_large");
    assert!(c.is_closed_within(Duration::from_secs(3)));

    // A huge declared length too.
    let mut c = engine.client();
    let head = raw_request(
        "POST",
        "/v1/messages/batch",
        &[
            &format!("Authorization: Bearer {API_KEY}"),
            "Content-Type: application/json",
            "Content-Length: 999999999999",
        ],
        b"",
    );
    assert_error(&exchange(&mut c, &head), 413, "payload_too_large");
    assert!(c.is_closed_within(Duration::from_secs(3)));
}

#[test]
fn large_body_near_the_default_limit_round_trips() {
    let setup = Setup::new(&Opts::default()); // max_body_bytes 65536
    let engine = setup.start();
    let mut c = engine.client();
    let big = "B".repeat(65536 - 100);
    let id = accepted_id(&c.send("kate", &big));
    assert_eq!(c.get_status(&id).status, 200);
    // And a small request right after on the same connection.
    accepted_id(&c.send("kate", "small"));
}

#[test]
fn content_type_must_be_json_415() {
    let setup = Setup::new(&Opts::default());
    let engine = setup.start();
    let mut c = engine.client();
    let body = br#"{"to":"leo","body":"b"}"#;
    let auth = format!("Authorization: Bearer {API_KEY}");
    let len = format!("Content-Length: {}", body.len());
    for ct in [
        None,
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        Some("application/jsonx"),
        Some("json"),
        Some(""),
    ] {
        let mut headers = vec![auth.as_str(), len.as_str()];
        let h;
        if let Some(ct) = ct {
            h = format!("Content-Type: {ct}");
            headers.push(&h);
        }
        let r = exchange(&mut c, &raw_request("POST", "/v1/messages", &headers, body));
        assert_error(&r, 415, "unsupported_media_type");
    }
    // Parameters and case do not matter; the connection stayed open.
    for ct in ["application/json; charset=utf-8", "Application/JSON", "application/json ; charset=UTF-8"] {
        let h = format!("Content-Type: {ct}");
        let r = exchange(&mut c, &raw_request("POST", "/v1/messages", &[&auth, &len, &h], body));
        accepted_id(&r);
    }
}

#[test]
fn oversized_head_is_431_and_closes() {
    let setup = Setup::new(&Opts::default());
    let mut engine = setup.start();
    let auth = format!("Authorization: Bearer {API_KEY}");
    let body = br#"{"to":"mia","body":"b"}"#;
    let len = format!("Content-Length: {}", body.len());

    // A head just under 8 KiB is fine.
    let filler = format!("X-Filler: {}", "f".repeat(7600));
    let req = raw_request("POST", "/v1/messages", &[&auth, "Content-Type: application/json", &len, &filler], body);
    let mut c = engine.client();
    accepted_id(&exchange(&mut c, &req));

    // Over 8 KiB: one long header.
    let filler = format!("X-Filler: {}", "f".repeat(9000));
    let req = raw_request("POST", "/v1/messages", &[&auth, "Content-Type: application/json", &len, &filler], body);
    let mut c = engine.client();
    write_lenient(&mut c, &req);
    let r = c.read_response().expect("a 431 before the close");
    assert_error(&r, 431, "headers_too_large");
    assert!(c.is_closed_within(Duration::from_secs(3)));

    // Over 8 KiB: many small headers (still under 64 of them).
    let many: Vec<String> = (0..40).map(|i| format!("X-H{i}: {}", "v".repeat(250))).collect();
    let mut headers: Vec<&str> = vec![&auth, "Content-Type: application/json", &len];
    headers.extend(many.iter().map(String::as_str));
    let mut c = engine.client();
    write_lenient(&mut c, &raw_request("POST", "/v1/messages", &headers, body));
    let r = c.read_response().expect("a 431 before the close");
    assert_error(&r, 431, "headers_too_large");
    assert!(c.is_closed_within(Duration::from_secs(3)));

    assert_alive(&mut engine);
    accepted_id(&engine.client().send("mia", "still here"));
}

#[test]
fn more_than_64_headers_is_431_and_closes() {
    let setup = Setup::new(&Opts::default());
    let engine = setup.start();
    let auth = format!("Authorization: Bearer {API_KEY}");
    let body = br#"{"to":"ned","body":"b"}"#;
    let len = format!("Content-Length: {}", body.len());
    let build = |total: usize| {
        // Host + the 3 below + fillers = total header fields.
        let fillers: Vec<String> = (0..total - 4).map(|i| format!("X-F{i}: y")).collect();
        let mut headers: Vec<&str> = vec![&auth, "Content-Type: application/json", &len];
        headers.extend(fillers.iter().map(String::as_str));
        raw_request("POST", "/v1/messages", &headers, body)
    };
    // Exactly 64 fields are allowed.
    let mut c = engine.client();
    accepted_id(&exchange(&mut c, &build(64)));
    // 65 are not.
    let mut c = engine.client();
    write_lenient(&mut c, &build(65));
    let r = c.read_response().expect("a 431 before the close");
    assert_error(&r, 431, "headers_too_large");
    assert!(c.is_closed_within(Duration::from_secs(3)));
    // 200 fields: same.
    let mut c = engine.client();
    write_lenient(&mut c, &build(200));
    let r = c.read_response().expect("a 431 before the close");
    assert_error(&r, 431, "headers_too_large");
    assert!(c.is_closed_within(Duration::from_secs(3)));
}

#[test]
fn stalled_requests_get_408_and_close() {
    let setup = Setup::new(&Opts { request_timeout_ms: 500, ..Opts::default() });
    let engine = setup.start();
    let body = br#"{"to":"olga","body":"b"}"#;
    let full = post_bytes(body);

    // Stalls mid-body.
    let mut c = engine.client();
    c.send_raw(&full[..full.len() - 5]);
    let t = Instant::now();
    let r = c.read_response().expect("a 408");
    assert_error(&r, 408, "request_timeout");
    assert!(
        t.elapsed() >= Duration::from_millis(350) && t.elapsed() < Duration::from_secs(3),
        "408 after {:?}",
        t.elapsed()
    );
    assert!(c.is_closed_within(Duration::from_secs(3)));

    // Stalls mid-head.
    let mut c = engine.client();
    c.send_raw(b"POST /v1/messages HTTP/1.1\r\nHost: test\r\nContent-Ty");
    let r = c.read_response().expect("a 408");
    assert_error(&r, 408, "request_timeout");
    assert!(c.is_closed_within(Duration::from_secs(3)));

    // Stalls after a first complete request on a keep-alive connection.
    let mut c = engine.client();
    accepted_id(&c.send("olga", "first"));
    c.send_raw(&full[..20]);
    let r = c.read_response().expect("a 408");
    assert_error(&r, 408, "request_timeout");
    assert!(c.is_closed_within(Duration::from_secs(3)));

    // Trickling bytes does not extend the deadline: it runs from the first byte.
    let mut c = engine.client();
    let t = Instant::now();
    let mut got = None;
    for b in full.iter().take(40) {
        if c.stream.write_all(&[*b]).is_err() {
            break;
        }
        if c.is_closed_within(Duration::from_millis(100)) {
            got = Some(t.elapsed());
            break;
        }
    }
    let closed_after = got.expect("a trickled request was never cut off");
    assert!(closed_after < Duration::from_millis(2500), "trickle cut only after {closed_after:?}");

    // An idle connection (no byte sent) is not a stalled request: after
    // more than request_timeout it still serves.
    let mut c = engine.client();
    std::thread::sleep(Duration::from_millis(900));
    accepted_id(&c.send("olga", "after idle"));
    // And a request that completes in time is served normally.
    let mut c = engine.client();
    c.send_raw(&full[..10]);
    std::thread::sleep(Duration::from_millis(150));
    accepted_id(&exchange(&mut c, &full[10..]));
}

// ----------------------------------------------- keep-alive and pipelining

#[test]
fn keep_alive_serves_500_requests_on_one_connection() {
    let setup = Setup::new(&Opts::default());
    let engine = setup.start();
    let mut c = engine.client();
    let mut ids = Vec::new();
    for i in 0..300 {
        let id = accepted_id(&c.send(&format!("ka-{}", i % 7), &format!("m{i}")));
        ids.push(id);
    }
    let distinct: HashSet<&String> = ids.iter().collect();
    assert_eq!(distinct.len(), ids.len());
    for (i, id) in ids.iter().enumerate().take(250) {
        let r = c.get_status(id);
        assert_eq!(r.status, 200, "request {}", 300 + i);
        assert_eq!(r.json()["to"], format!("ka-{}", i % 7));
        assert!(r.header("connection").is_none(), "{:?}", r.headers);
    }
    // 550 requests later the connection is still open.
    accepted_id(&c.send("ka-0", "last"));
}

#[test]
fn fifty_pipelined_requests_in_one_write() {
    let setup = Setup::new(&Opts::default());
    let engine = setup.start();
    let mut c = engine.client();
    let mut batch = Vec::new();
    for i in 0..50 {
        let body = json!({"to": format!("pipe-{}", i % 5), "body": format!("p{i}")}).to_string();
        batch.extend(Client::request_bytes("POST", "/v1/messages", Some(API_KEY), Some(&body)));
    }
    c.send_raw(&batch); // one write_all of all 50
    let mut ids = Vec::new();
    for i in 0..50 {
        let r = c.read_response().unwrap_or_else(|e| panic!("response {i}: {e}"));
        ids.push(accepted_id(&r));
    }
    let distinct: HashSet<&String> = ids.iter().collect();
    assert_eq!(distinct.len(), 50, "pipelined ids are not distinct");

    // Pipeline the 50 GETs too; each answers for its own message, in order.
    let mut gets = Vec::new();
    for id in &ids {
        gets.extend(Client::request_bytes("GET", &format!("/v1/messages/{id}"), Some(API_KEY), None));
    }
    c.send_raw(&gets);
    for (i, id) in ids.iter().enumerate() {
        let r = c.read_response().unwrap();
        assert_eq!(r.status, 200, "{}", text(&r));
        let j = r.json();
        assert_eq!(j["id"], id.as_str(), "response {i} out of order");
        assert_eq!(j["to"], format!("pipe-{}", i % 5));
    }
    // The same connection then serves a plain request.
    accepted_id(&c.send("pipe-0", "after"));
}

#[test]
fn pipelined_errors_do_not_disturb_the_requests_after_them() {
    let setup = Setup::new(&Opts::default());
    let engine = setup.start();
    let mut c = engine.client();
    let ok = |to: &str| {
        Client::request_bytes("POST", "/v1/messages", Some(API_KEY), Some(&json!({"to": to, "body": "b"}).to_string()))
    };
    let mut w = Vec::new();
    w.extend(ok("p1"));
    w.extend(Client::request_bytes("GET", "/nope", Some(API_KEY), None));
    w.extend(ok("p2"));
    w.extend(Client::request_bytes("POST", "/v1/messages", Some(API_KEY), Some("{not json")));
    w.extend(Client::request_bytes("POST", "/v1/messages", None, Some(r#"{"to":"p","body":"b"}"#)));
    w.extend(Client::request_bytes("GET", "/v1/messages", Some(API_KEY), None));
    w.extend(Client::request_bytes("GET", "/v1/messages/zzzzzzzzzzzzzzzz", Some(API_KEY), None));
    w.extend(ok("p3"));
    c.send_raw(&w);
    let id1 = accepted_id(&c.read_response().unwrap());
    assert_error(&c.read_response().unwrap(), 404, "not_found");
    let id2 = accepted_id(&c.read_response().unwrap());
    assert_error(&c.read_response().unwrap(), 400, "malformed_json");
    assert_error(&c.read_response().unwrap(), 401, "unauthorized");
    assert_error(&c.read_response().unwrap(), 405, "method_not_allowed");
    assert_error(&c.read_response().unwrap(), 404, "not_found");
    let id3 = accepted_id(&c.read_response().unwrap());
    for (id, to) in [(&id1, "p1"), (&id2, "p2"), (&id3, "p3")] {
        let r = c.get_status(id);
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["to"], to);
    }
}

#[test]
fn pipelined_framing_error_answers_earlier_requests_then_closes() {
    let setup = Setup::new(&Opts::default());
    let engine = setup.start();
    let mut c = engine.client();
    let ok = |to: &str| {
        Client::request_bytes("POST", "/v1/messages", Some(API_KEY), Some(&json!({"to": to, "body": "b"}).to_string()))
    };
    let mut w = Vec::new();
    w.extend(ok("f1"));
    w.extend(ok("f2"));
    w.extend(raw_request(
        "POST",
        "/v1/messages",
        &[
            &format!("Authorization: Bearer {API_KEY}"),
            "Content-Type: application/json",
            "Content-Length: 5",
            "Transfer-Encoding: chunked",
        ],
        b"",
    ));
    w.extend(ok("f3-never"));
    c.send_raw(&w);
    let a = accepted_id(&c.read_response().unwrap());
    let b = accepted_id(&c.read_response().unwrap());
    assert_error(&c.read_response().unwrap(), 400, "bad_request");
    assert!(c.read_response().is_err(), "a request after a framing error was answered");
    let mut c = engine.client();
    assert_eq!(c.get_status(&a).status, 200);
    assert_eq!(c.get_status(&b).status, 200);
}

#[test]
fn connection_close_and_http_1_0_close_after_the_response() {
    let setup = Setup::new(&Opts::default());
    let engine = setup.start();
    let body = br#"{"to":"pam","body":"b"}"#;
    let auth = format!("Authorization: Bearer {API_KEY}");
    let len = format!("Content-Length: {}", body.len());

    // Connection: close, with a second request pipelined behind it.
    let mut c = engine.client();
    let mut w = raw_request(
        "POST",
        "/v1/messages",
        &[&auth, "Content-Type: application/json", &len, "Connection: close"],
        body,
    );
    w.extend(post_bytes(body));
    c.send_raw(&w);
    let r = c.read_response().unwrap();
    accepted_id(&r);
    assert_eq!(r.header("connection"), Some("close"));
    assert!(c.read_response().is_err(), "served a request after Connection: close");

    // A client that half-closes after its request still gets the answer.
    let mut c = engine.client();
    c.send_raw(&post_bytes(body));
    c.stream.shutdown(std::net::Shutdown::Write).unwrap();
    accepted_id(&c.read_response().expect("answer after half-close"));
    assert!(c.is_closed_within(Duration::from_secs(3)));

    // HTTP/1.0 defaults to close.
    let mut c = engine.client();
    let mut req = post_bytes(body);
    let pos = req.windows(8).position(|w| w == b"HTTP/1.1").unwrap();
    req[pos..pos + 8].copy_from_slice(b"HTTP/1.0");
    let r = exchange(&mut c, &req);
    accepted_id(&r);
    assert_eq!(r.header("connection"), Some("close"));
    assert!(c.is_closed_within(Duration::from_secs(3)));

    // An error response on a closing request also closes.
    let mut c = engine.client();
    let r = exchange(&mut c, &raw_request("GET", "/nope", &["Connection: close"], b""));
    assert_error(&r, 404, "not_found");
    assert!(c.is_closed_within(Duration::from_secs(3)));
}

// ------------------------------------------------------------ concurrency

#[test]
fn sixteen_connections_in_parallel_all_accepted_and_distinct() {
    let setup = Setup::new(&Opts::default());
    let engine = setup.start();
    let addr = engine.business;
    let threads: Vec<_> = (0..16)
        .map(|t| {
            std::thread::spawn(move || {
                let mut c = Client::connect(addr);
                (0..50)
                    .map(|i| {
                        let to = format!("conc-{}", (t * 50 + i) % 23);
                        (accepted_id(&c.send(&to, &format!("{t}/{i}"))), to)
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let all: Vec<(String, String)> = threads.into_iter().flat_map(|h| h.join().expect("client thread")).collect();
    assert_eq!(all.len(), 800);
    let distinct: HashSet<&String> = all.iter().map(|(id, _)| id).collect();
    assert_eq!(distinct.len(), 800, "ids are not distinct");
    // Every one is retrievable (pipelined GETs on two connections).
    for chunk in all.chunks(400) {
        let mut c = engine.client();
        let mut w = Vec::new();
        for (id, _) in chunk {
            w.extend(Client::request_bytes("GET", &format!("/v1/messages/{id}"), Some(API_KEY), None));
        }
        c.send_raw(&w);
        for (id, to) in chunk {
            let r = c.read_response().unwrap();
            assert_eq!(r.status, 200, "{id}: {}", text(&r));
            assert_eq!(r.json()["id"], id.as_str());
            assert_eq!(r.json()["to"], to.as_str());
        }
    }
}

#[test]
fn one_users_messages_stay_in_order_across_connections_and_restart() {
    let setup = Setup::new(&Opts::default());
    let engine = setup.start();
    let mut conns: Vec<Client> = (0..4).map(|_| engine.client()).collect();
    let mut ids = Vec::new();
    for i in 0..40 {
        let c = &mut conns[i % 4];
        ids.push(accepted_id(&c.send("ordered-user", &format!("n{i}"))));
    }
    let distinct: HashSet<&String> = ids.iter().collect();
    assert_eq!(distinct.len(), ids.len());
    // One user, one home shard: every id carries the same shard.
    let prefix = home_prefix(&ids[0]);
    for id in &ids {
        assert_eq!(id.len(), ids[0].len());
        assert_eq!(home_prefix(id), prefix, "{id} is on another shard than {}", ids[0]);
    }
    // Sequence numbers grow in send order (fixed-width ids, ASCII-ordered
    // alphabet: string order is (shard, seq) order).
    for w in ids.windows(2) {
        assert!(w[0] < w[1], "id {} after {} is not later", w[1], w[0]);
    }
    let read_accepted_at = |c: &mut Client| -> Vec<u64> {
        ids.iter()
            .map(|id| {
                let r = c.get_status(id);
                assert_eq!(r.status, 200, "{id}: {}", text(&r));
                let j = r.json();
                assert_eq!(j["to"], "ordered-user");
                j["accepted_at"].as_u64().unwrap()
            })
            .collect()
    };
    let before = read_accepted_at(&mut conns[1]);
    for w in before.windows(2) {
        assert!(w[0] <= w[1], "accepted_at went back: {before:?}");
    }
    drop(conns);
    assert_eq!(engine.terminate(), Some(0));

    let engine = setup.start();
    let after = read_accepted_at(&mut engine.client());
    assert_eq!(before, after, "accepted_at changed across a restart");
    // New messages for the user continue after the old ones.
    let id = accepted_id(&engine.client().send("ordered-user", "after restart"));
    assert_eq!(home_prefix(&id), prefix);
    assert!(&id > ids.last().unwrap(), "{id} reuses an old sequence number");
}

// ---------------------------------------------------------------- garbage

#[test]
fn garbage_on_the_socket_is_refused_and_the_engine_keeps_serving() {
    use rand::{Rng, SeedableRng};
    let setup = Setup::new(&Opts::default());
    let mut engine = setup.start();
    // A healthy connection kept open throughout.
    let mut healthy = engine.client();
    accepted_id(&healthy.send("quinn", "before"));

    for seed in 0..8u64 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut bytes = vec![0u8; 2048];
        rng.fill(&mut bytes[..]);
        bytes[0] = 0x01; // never a method token character
        let mut c = engine.client();
        write_lenient(&mut c, &bytes);
        match c.read_response() {
            Ok(r) => assert!(r.status == 400 || r.status == 431, "seed {seed}: status {}", r.status),
            Err(e) => panic!("seed {seed}: no error response ({e})"),
        }
        assert!(c.is_closed_within(Duration::from_secs(3)), "seed {seed}");
    }

    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        (
            "huge line without CRLF",
            {
                let mut v = b"GET /".to_vec();
                v.resize(v.len() + 20_000, b'a');
                v
            },
            431,
        ),
        ("NUL-filled head", vec![0u8; 4096], 400),
        (
            "NULs then CRLFCRLF",
            {
                let mut v = vec![0u8; 100];
                v.extend_from_slice(b"\r\n\r\n");
                v
            },
            400,
        ),
        ("bad request line", b"HELLO\r\n\r\n".to_vec(), 400),
        ("header without colon", b"GET /healthz HTTP/1.1\r\nNoColonHere\r\n\r\n".to_vec(), 400),
        ("bad version", b"GET / HTTP/9.9\r\n\r\n".to_vec(), 400),
        ("TLS client hello", vec![0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03], 400),
    ];
    for (what, bytes, status) in cases {
        let mut c = engine.client();
        write_lenient(&mut c, &bytes);
        let r = c.read_response().unwrap_or_else(|e| panic!("{what}: no error response ({e})"));
        assert_eq!(r.status, status, "{what}: {}", text(&r));
        let code = r.error_code();
        assert!(code == "bad_request" || code == "headers_too_large", "{what}: code {code}");
        assert!(c.is_closed_within(Duration::from_secs(3)), "{what}: left open");
    }

    assert_alive(&mut engine);
    accepted_id(&healthy.send("quinn", "after, same connection"));
    let mut c = engine.client();
    let id = accepted_id(&c.send("quinn", "after, new connection"));
    assert_eq!(c.get_status(&id).status, 200);
}

// ------------------------------------------------------------------ admin

#[test]
fn admin_health_and_readiness() {
    let setup = Setup::new(&Opts::default());
    let engine = setup.start();
    let mut a = Client::connect(engine.admin);
    let r = a.request("GET", "/healthz", None, None);
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(r.json(), json!({"status": "ok", "breakers": {}}));
    let r = a.request("GET", "/readyz", None, None);
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(r.json(), json!({"status": "ready"}));
    for path in ["/nothing", "/v1/messages", "/healthz/x", "/v1/dead-letters"] {
        // Everything but health, readiness, metrics and the dashboard
        // (`/`, tests/metrics.rs and tests/dashboard.rs) needs the admin token...
        let r = a.request("GET", path, None, None);
        assert_error(&r, 401, "unauthorized");
        let r = a.request("GET", path, Some("wrong-admin-token-0123456789"), None);
        assert_error(&r, 401, "unauthorized");
        let r = a.request("GET", path, Some(API_KEY), None);
        assert_error(&r, 401, "unauthorized");
    }
    for path in ["/nothing", "/v1/messages", "/healthz/x"] {
        // ...and with it, unknown paths are 404.
        let r = a.request("GET", path, Some(ADMIN_TOKEN), None);
        assert_error(&r, 404, "not_found");
    }
    let r = a.request("POST", "/healthz", None, Some("{}"));
    assert_error(&r, 405, "method_not_allowed");
    assert_eq!(r.header("allow"), Some("GET"));
    // Query strings are ignored; keep-alive works on the admin port too.
    let r = a.request("GET", "/readyz?probe=k8s", None, None);
    assert_eq!(r.status, 200);
    // The admin port is not the business port.
    assert_ne!(engine.admin, engine.business);
    let r = engine.client().request("GET", "/healthz", None, None);
    assert_error(&r, 404, "not_found");
}

// ------------------------------------------------------ hostile JSON

/// Regression: a ~10 KB body of `[` used to overflow a shard thread's stack
/// in simd_json and abort the whole process.
#[test]
fn deeply_nested_json_is_refused_without_crashing_the_engine() {
    let setup = Setup::new(&Opts::default());
    let mut engine = setup.start();
    // Brackets inside strings are text, not nesting (escaped quotes included).
    let mut c = engine.client();
    let brackets = format!("\"{}{}", "[{".repeat(5000), "\\");
    let id = accepted_id(&post_value(&mut c, &json!({"to": "a", "body": brackets})));
    assert_eq!(c.get_status(&id).status, 200);
    // Shallow nesting in an unknown field is a field error, not a JSON one.
    let r = post_value(&mut c, &json!({"to": "a", "body": "b", "x": [[[[{"y": [1]}]]]]}));
    assert_error(&r, 400, "invalid_field");
    // 30 000 levels fit in the default 64 KiB body limit.
    for (path, depth) in [("/v1/messages", 30_000usize), ("/v1/messages/batch", 30_000)] {
        let mut c = engine.client();
        let body = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        let r = c.request("POST", path, Some(API_KEY), Some(&body));
        assert_eq!(r.status, 400, "{path}: {}", text(&r));
        let code = r.error_code();
        assert!(code == "malformed_json" || code == "invalid_field", "{code}");
        // Nested inside an otherwise valid object as well.
        let depth = depth * 5 / 6;
        let body = format!(r#"{{"to":"a","body":"b","x":{}{}}}"#, "[".repeat(depth), "]".repeat(depth));
        let r = c.request("POST", path, Some(API_KEY), Some(&body));
        assert_eq!(r.status, 400, "{path}: {}", text(&r));
        assert_alive(&mut engine);
    }
    accepted_id(&engine.client().send("survivor", "still up"));
}

// ---------------------------------------------------------------- startup

/// Regression: with glommio's MeshBuilder (an Rc shared across executor
/// threads) about 1% of starts died of SIGSEGV and about 2% never printed
/// their ready line.
#[test]
fn engine_starts_reliably() {
    // Many starts, four at a time (the suites run engines in parallel).
    let failures = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for _ in 0..40 {
                    let setup = Setup::new(&Opts::default());
                    if let Err(e) = Engine::try_start(&setup.config) {
                        failures.lock().unwrap().push(e);
                    }
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap();
    assert!(failures.is_empty(), "{} of 160 starts failed: {failures:#?}", failures.len());
}
