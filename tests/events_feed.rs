//! The event feed end to end: `GET /v1/events` on the real engine over a
//! real socket, pages and cursors, long-polling, `kill -9`, bad input.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const FEED_KEY: &str = "feed-client-key-0123456789";

fn setup(shards: usize) -> Setup {
    Setup::new(&Opts {
        shards,
        extra_toml: format!(
            r#"
[[clients]]
id = "feedy"
api_key = "{FEED_KEY}"
tier = "basic"
event_feed = true
"#
        ),
        ..Opts::default()
    })
}

fn send(engine: &Engine, to: &str, body: &str, ttl: Option<u64>) -> String {
    let mut json = serde_json::json!({"to": to, "body": body});
    if let Some(t) = ttl {
        json["ttl_seconds"] = t.into();
    }
    let r = engine.client().request("POST", "/v1/messages", Some(FEED_KEY), Some(&json.to_string()));
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    r.json()["id"].as_str().unwrap().to_owned()
}

fn events(engine: &Engine, query: &str) -> Response {
    engine.client().request("GET", &format!("/v1/events{query}"), Some(FEED_KEY), None)
}

/// Reads the whole feed from `after` in pages of `limit`; returns the
/// events and the last cursor.
fn read_all(engine: &Engine, after: &str, limit: usize) -> (Vec<Value>, String) {
    let mut out = Vec::new();
    let mut cursor = after.to_owned();
    loop {
        let r = events(engine, &format!("?after={cursor}&limit={limit}"));
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let page = r.json();
        let items = page["events"].as_array().unwrap().clone();
        assert!(items.len() <= limit);
        cursor = page["next"].as_str().unwrap().to_owned();
        if items.is_empty() {
            return (out, cursor);
        }
        out.extend(items);
    }
}

/// Connects `user`, takes `n` messages and acks them.
fn receive_and_ack(engine: &Engine, setup: &Setup, user: &str, n: usize) {
    let mut phone = Phone::connect(engine.mobile, &token(&setup.config, user, 3600)).expect("connect");
    let frames = phone.recv_n(n, Duration::from_secs(10));
    assert_eq!(frames.len(), n);
    let ids: Vec<String> = frames.iter().map(|f| f["id"].as_str().unwrap().to_owned()).collect();
    phone.ack_many(&ids);
    std::thread::sleep(Duration::from_millis(100));
}

/// Waits until the feed holds every id of `want`.
fn wait_for_ids(engine: &Engine, want: &HashSet<String>, within: Duration) -> Vec<Value> {
    let deadline = Instant::now() + within;
    loop {
        let (all, _) = read_all(engine, "", 1000);
        let ids: HashSet<String> = all.iter().map(|e| e["id"].as_str().unwrap().to_owned()).collect();
        if want.is_subset(&ids) {
            return all;
        }
        assert!(Instant::now() < deadline, "missing: {:?}", want.difference(&ids).collect::<Vec<_>>());
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn every_outcome_is_in_the_feed_in_a_stable_order_across_pages() {
    let setup = setup(2);
    let engine = setup.start();
    let users: Vec<String> = (0..8).map(|i| format!("user-{i}")).collect();
    let mut want = HashSet::new();
    for u in &users {
        for n in 0..3 {
            let id = send(&engine, u, &format!("m{n}"), None);
            want.insert(format!("evt_{id}_delivered"));
            want.insert(format!("evt_{id}_acked"));
        }
    }
    let expiring = send(&engine, "nobody-home", "too late", Some(1));
    want.insert(format!("evt_{expiring}_expired"));
    for u in &users {
        receive_and_ack(&engine, &setup, u, 3);
    }
    let all = wait_for_ids(&engine, &want, Duration::from_secs(10));
    // Each event's shape: the webhook body plus its id.
    for e in &all {
        let id = e["id"].as_str().unwrap();
        let (mid, kind) = id.strip_prefix("evt_").unwrap().split_once('_').unwrap();
        assert_eq!(e["type"], format!("message.{kind}"));
        assert_eq!(e["data"]["id"], mid);
        assert!(e["timestamp"].as_u64().unwrap() > 1_700_000_000_000);
    }
    let expired = all.iter().find(|e| e["id"] == format!("evt_{expiring}_expired")).unwrap();
    assert_eq!(expired["data"]["status"], "expired");
    // Without a crash, each event is in the feed exactly once.
    let ids: Vec<&str> = all.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), ids.len(), "no duplicates");
    assert_eq!(ids.len(), want.len());
    // A message's delivered event comes before its acked one.
    let at: HashMap<&str, usize> = ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
    for id in &ids {
        if let Some(m) = id.strip_suffix("_acked") {
            assert!(at[format!("{m}_delivered").as_str()] < at[id], "{id}");
        }
    }
    // The order is stable: small pages, big pages, and a re-read from a
    // cursor in the middle all see the same sequence.
    let (paged, end) = read_all(&engine, "", 7);
    assert_eq!(paged, all);
    let first = events(&engine, "?limit=10").json();
    let (rest, _) = read_all(&engine, first["next"].as_str().unwrap(), 4);
    assert_eq!(rest[..], all[10..]);
    // At the end, the cursor stays put and nothing more comes.
    let r = events(&engine, &format!("?after={end}")).json();
    assert_eq!(r["events"], serde_json::json!([]));
    assert_eq!(r["next"], end.as_str());
}

#[test]
fn an_empty_feed_long_polls_until_an_event_or_the_wait_ends() {
    let setup = setup(2);
    let engine = setup.start();
    // Nothing there: `wait=1` answers empty after about a second.
    let t = Instant::now();
    let r = events(&engine, "?wait=1").json();
    assert_eq!(r["events"], serde_json::json!([]));
    assert!(t.elapsed() >= Duration::from_millis(950), "{:?}", t.elapsed());
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    let cursor = r["next"].as_str().unwrap().to_owned();
    // A long poll answers as soon as an event is written.
    let mobile = engine.mobile;
    let tok = token(&setup.config, "carol", 3600);
    let id = send(&engine, "carol", "hello", None);
    let poller = {
        let client_addr = engine.business;
        let cursor = cursor.clone();
        std::thread::spawn(move || {
            let t = Instant::now();
            let r = Client::connect(client_addr).request(
                "GET",
                &format!("/v1/events?after={cursor}&wait=20"),
                Some(FEED_KEY),
                None,
            );
            (t.elapsed(), r)
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let mut phone = Phone::connect(mobile, &tok).expect("connect");
    assert_eq!(phone.recv_n(1, Duration::from_secs(5)).len(), 1);
    let (waited, r) = poller.join().unwrap();
    assert_eq!(r.status, 200);
    let page = r.json();
    assert_eq!(page["events"][0]["id"], format!("evt_{id}_delivered"), "{page}");
    assert!(waited >= Duration::from_millis(400) && waited < Duration::from_secs(5), "{waited:?}");
    assert_ne!(page["next"], cursor.as_str());
}

#[test]
fn kill_9_loses_no_event_and_cursors_stay_valid() {
    let setup = setup(2);
    let mut engine = setup.start();
    let mut want = HashSet::new();
    let mut cursor = String::new();
    for round in 0..3 {
        for n in 0..10 {
            let user = format!("k{round}-{n}");
            let id = send(&engine, &user, "x", None);
            want.insert(format!("evt_{id}_delivered"));
            want.insert(format!("evt_{id}_acked"));
            receive_and_ack(&engine, &setup, &user, 1);
        }
        // Read part of the feed, then kill at once: some events are owed,
        // some in the feed, some being written.
        let r = events(&engine, &format!("?after={cursor}&limit=5")).json();
        cursor = r["next"].as_str().unwrap().to_owned();
        engine.kill9();
        engine = setup.start();
    }
    let all = wait_for_ids(&engine, &want, Duration::from_secs(10));
    // At least once: a crash between the feed's fdatasync and the record
    // that settles an event may write it twice, never zero times.
    let ids: HashSet<&str> = all.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), want.len());
    // A cursor from before the crashes still reads on, without going back.
    let (rest, _) = read_all(&engine, &cursor, 50);
    assert!(!rest.is_empty());
    let from = all.len() - rest.len();
    assert_eq!(rest[..], all[from..], "a cursor reads exactly the suffix after it");
    // A clean stop and start keeps the feed.
    assert_eq!(engine.terminate(), Some(0));
    let engine = setup.start();
    assert_eq!(read_all(&engine, "", 1000).0, all);
}

#[test]
fn bad_requests_name_the_field() {
    let setup = setup(2);
    let engine = setup.start();
    for (q, field) in [
        ("?limit=0", "`limit`"),
        ("?limit=1001", "`limit`"),
        ("?limit=x", "`limit`"),
        ("?wait=31", "`wait`"),
        ("?wait=-1", "`wait`"),
        ("?after=zz", "`after`"),
        ("?after=1-2", "`after`"),
    ] {
        let r = events(&engine, q);
        assert_eq!(r.status, 400, "{q}");
        assert_eq!(r.error_code(), "invalid_field", "{q}");
        assert!(r.json()["error"]["message"].as_str().unwrap().contains(field), "{q}: {:?}", r.json());
    }
    // A client whose events go elsewhere (or nowhere) has no feed.
    let r = engine.client().request("GET", "/v1/events", Some(API_KEY), None);
    assert_eq!(r.status, 409);
    assert_eq!(r.error_code(), "event_feed_disabled");
    let r = engine.client().request("GET", "/v1/events", None, None);
    assert_eq!(r.status, 401);
    let r = engine.client().request("POST", "/v1/events", Some(FEED_KEY), Some("{}"));
    assert_eq!(r.status, 405);
}
