//! Receipts end to end: the real engine, a real webhook receiver on a local
//! socket (`common::webhook::Receiver`), phones over WebSocket.
//!
//! Every request the receiver gets is checked with an independent
//! Standard Webhooks verification (HMAC-SHA256 over `id.timestamp.body`
//! with the base64-decoded secret, computed here with `hmac`, not with the
//! engine's signing code).

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::webhook::*;
use common::*;
use serde_json::Value;

fn setup(receiver: &Receiver, shards: usize, webhooks: &str) -> Setup {
    Setup::new(&Opts {
        shards,
        extra_toml: format!(
            r#"
[[clients]]
id = "hooked"
api_key = "{HOOK_KEY}"
tier = "basic"
webhook_url = "{url}"
webhook_secret = "{SECRET}"

[webhooks]
{webhooks}
"#,
            url = receiver.url()
        ),
        ..Opts::default()
    })
}

fn send(engine: &Engine, to: &str, body: &str, ttl: Option<u64>) -> String {
    let mut json = serde_json::json!({"to": to, "body": body});
    if let Some(t) = ttl {
        json["ttl_seconds"] = t.into();
    }
    let r = engine.client().request("POST", "/v1/messages", Some(HOOK_KEY), Some(&json.to_string()));
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    r.json()["id"].as_str().unwrap().to_owned()
}

/// Connects `user`, takes `n` messages and acks them.
fn receive_and_ack(engine: &Engine, setup: &Setup, user: &str, n: usize) -> Vec<String> {
    let mut phone = Phone::connect(engine.mobile, &token(&setup.config, user, 3600)).expect("connect");
    let frames = phone.recv_n(n, Duration::from_secs(10));
    let ids: Vec<String> = frames.iter().map(|f| f["id"].as_str().unwrap().to_owned()).collect();
    phone.ack_many(&ids);
    std::thread::sleep(Duration::from_millis(100));
    ids
}

fn admin(engine: &Engine, method: &str, path: &str) -> Response {
    let body = (method == "POST").then_some(""); // Content-Length: 0
    Client::connect(engine.admin).request(method, path, Some(ADMIN_TOKEN), body)
}

#[test]
fn every_outcome_reaches_the_sender_signed() {
    let receiver = Receiver::start();
    let setup = setup(&receiver, 2, "timeout_ms = 2000");
    let engine = setup.start();
    let id = send(&engine, "alice", "hello", None);
    let expiring = send(&engine, "nobody-home", "too late", Some(1));
    // A message of a client without a webhook owes nothing.
    assert_eq!(engine.client().send("alice", "from acme").status, 202);
    receive_and_ack(&engine, &setup, "alice", 2);
    let got = receiver.wait_for("delivered, acked and expired", Duration::from_secs(10), |d| {
        let ids: HashSet<&str> = d.iter().map(|d| d.id.as_str()).collect();
        ids.contains(format!("evt_{id}_delivered").as_str())
            && ids.contains(format!("evt_{id}_acked").as_str())
            && ids.contains(format!("evt_{expiring}_expired").as_str())
    });
    for d in &got {
        let data = &d.body["data"];
        let (mid, kind) = d.id.strip_prefix("evt_").unwrap().split_once('_').unwrap();
        assert_eq!(d.body["type"], format!("message.{kind}"), "{:?}", d.body);
        assert_eq!(data["id"], mid);
        assert!(d.body["timestamp"].as_u64().unwrap() > 1_700_000_000_000);
        assert!(data["accepted_at"].is_u64());
    }
    let acked = got.iter().find(|d| d.id == format!("evt_{id}_acked")).unwrap();
    assert_eq!(acked.body["data"]["status"], "acked");
    assert_eq!(acked.body["data"]["to"], "alice");
    let expired = got.iter().find(|d| d.id == format!("evt_{expiring}_expired")).unwrap();
    assert_eq!(expired.body["data"]["status"], "expired");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(receiver.deliveries().len(), 3, "one request per event when the receiver answers 2xx");
    let h = Client::connect(engine.admin).request("GET", "/healthz", None, None).json();
    assert_eq!(h, serde_json::json!({"status": "ok", "breakers": {"webhook:hooked": "closed"}}));
}

#[test]
fn the_breaker_opens_sends_nothing_while_open_then_closes() {
    let receiver = Receiver::start();
    let setup = setup(
        &receiver,
        1,
        "retry_base_ms = 10\nretry_max_ms = 20\nmax_attempts = 1000\nbreaker_failures = 3\nbreaker_open_ms = 1500",
    );
    let engine = setup.start();
    receiver.answer(500);
    let id = send(&engine, "bob", "x", None);
    receive_and_ack(&engine, &setup, "bob", 1);
    // Three consecutive failures open the breaker (the two events' attempts
    // run concurrently, so one more may already be in flight then).
    receiver.wait_for("3 failed attempts", Duration::from_secs(5), |d| d.len() >= 3);
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let h = Client::connect(engine.admin).request("GET", "/healthz", None, None).json();
        if h["breakers"]["webhook:hooked"] == "open" {
            assert_eq!(h["status"], "degraded");
            break;
        }
        assert!(Instant::now() < deadline, "the breaker did not open: {h}");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(50)); // an attempt in flight at the opening ends
    let opened = receiver.deliveries().len();
    assert!((3..=4).contains(&opened), "{:?}", ids(&receiver.deliveries()));
    std::thread::sleep(Duration::from_millis(900));
    assert_eq!(receiver.deliveries().len(), opened, "no request while the breaker is open");
    // Half-open after breaker_open_ms: exactly one probe, which succeeds.
    receiver.answer(200);
    let got = receiver.wait_for("both events after the probe", Duration::from_secs(5), |d| {
        let ok: HashSet<&str> = d[opened..].iter().map(|d| d.id.as_str()).collect();
        ok.contains(format!("evt_{id}_delivered").as_str()) && ok.contains(format!("evt_{id}_acked").as_str())
    });
    // (That the half-open breaker lets exactly one probe out is asserted by
    // tests/outbound_webhooks.rs, which counts the requests a failing probe gets.)
    assert!(got.len() - opened >= 2);
    let h = Client::connect(engine.admin).request("GET", "/healthz", None, None).json();
    assert_eq!(h, serde_json::json!({"status": "ok", "breakers": {"webhook:hooked": "closed"}}));
}

#[test]
fn exhausted_events_go_to_the_dead_letter_queue_and_replay_delivers_them() {
    let receiver = Receiver::start();
    let setup = setup(&receiver, 2, "retry_base_ms = 5\nretry_max_ms = 10\nmax_attempts = 3\nbreaker_failures = 1000");
    let engine = setup.start();
    receiver.answer(503);
    let a = send(&engine, "carol", "one", None);
    let b = send(&engine, "dave", "two", None);
    receive_and_ack(&engine, &setup, "carol", 1);
    receive_and_ack(&engine, &setup, "dave", 1);
    // 4 events × 3 attempts.
    receiver.wait_for("every attempt", Duration::from_secs(10), |d| d.len() >= 12);
    let deadline = Instant::now() + Duration::from_secs(5);
    let list = loop {
        let r = admin(&engine, "GET", "/v1/dead-letters?limit=10");
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let v = r.json();
        if v["items"].as_array().unwrap().len() == 4 || Instant::now() > deadline {
            break v;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let items = list["items"].as_array().unwrap();
    assert_eq!(items.len(), 4, "{list}");
    for it in items {
        assert_eq!(it["kind"], "webhook");
        assert_eq!(it["client"], "hooked");
        assert_eq!(it["attempts"], 3);
        assert_eq!(it["last_error"], "http status 503");
        assert!(it["dead_at"].as_u64().unwrap() > 0);
        assert_eq!(
            it["id"],
            format!("evt_{}_{}", it["message_id"].as_str().unwrap(), &it["event_type"].as_str().unwrap()[8..])
        );
    }
    assert_eq!(list["next"], Value::Null);
    // Pages, and the client filter.
    let page = admin(&engine, "GET", "/v1/dead-letters?limit=3").json();
    assert_eq!(page["items"].as_array().unwrap().len(), 3);
    let next = page["next"].as_str().unwrap();
    let rest = admin(&engine, "GET", &format!("/v1/dead-letters?limit=3&after={next}")).json();
    assert_eq!(rest["items"].as_array().unwrap().len(), 1);
    assert_eq!(admin(&engine, "GET", "/v1/dead-letters?client=acme").json()["items"], serde_json::json!([]));
    assert_eq!(admin(&engine, "GET", "/v1/dead-letters?limit=0").status, 400);
    // Replay one with the receiver back: it arrives, same webhook-id.
    receiver.answer(200);
    let before = receiver.deliveries().len();
    let replayed = format!("evt_{a}_acked");
    let r = admin(&engine, "POST", &format!("/v1/dead-letters/{replayed}/replay"));
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    receiver.wait_for("the replayed event", Duration::from_secs(5), |d| d[before..].iter().any(|d| d.id == replayed));
    // Drop another; unknown ids are 404; without the token, 401.
    let dropped = format!("evt_{b}_delivered");
    assert_eq!(admin(&engine, "DELETE", &format!("/v1/dead-letters/{dropped}")).status, 204);
    assert_eq!(admin(&engine, "DELETE", &format!("/v1/dead-letters/{dropped}")).status, 404);
    assert_eq!(admin(&engine, "POST", "/v1/dead-letters/evt_nope_acked/replay").status, 404);
    let r = Client::connect(engine.admin).request("DELETE", &format!("/v1/dead-letters/evt_{b}_acked"), None, None);
    assert_eq!(r.status, 401);
    let left = admin(&engine, "GET", "/v1/dead-letters").json();
    let left: Vec<&str> = left["items"].as_array().unwrap().iter().map(|i| i["id"].as_str().unwrap()).collect();
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(!left.contains(&replayed.as_str()) && !left.contains(&dropped.as_str()));
    // Dead letters survive a restart.
    assert_eq!(engine.terminate(), Some(0));
    let engine = setup.start();
    let again = admin(&engine, "GET", "/v1/dead-letters").json();
    assert_eq!(again["items"].as_array().unwrap().len(), 2, "{again}");
}

#[test]
fn kill_9_while_events_are_owed_loses_none_and_keeps_their_ids() {
    let receiver = Receiver::start();
    let setup =
        setup(&receiver, 2, "retry_base_ms = 50\nretry_max_ms = 100\nmax_attempts = 1000\nbreaker_failures = 1000");
    let mut owed: HashSet<String> = HashSet::new();
    for round in 0..3 {
        let engine = setup.start();
        receiver.answer(0); // the receiver drops every connection: nothing is delivered
        for i in 0..5 {
            let user = format!("user-{round}-{i}");
            let id = send(&engine, &user, "m", None);
            receive_and_ack(&engine, &setup, &user, 1);
            owed.insert(format!("evt_{id}_delivered"));
            owed.insert(format!("evt_{id}_acked"));
        }
        std::thread::sleep(Duration::from_millis(150));
        engine.kill9();
    }
    // Up again, receiver answering: every owed event arrives, with its id.
    receiver.answer(200);
    let engine = setup.start();
    let got = receiver.wait_for("every owed event after kill -9", Duration::from_secs(20), |d| {
        let ok: HashSet<&str> = d.iter().map(|d| d.id.as_str()).collect();
        owed.iter().all(|o| ok.contains(o.as_str()))
    });
    let received: HashSet<&str> = got.iter().map(|d| d.id.as_str()).collect();
    assert!(received.iter().all(|r| owed.contains(*r)), "only owed events were sent");
    // Settled: nothing owed after another restart.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(engine.terminate(), Some(0));
    let n = receiver.deliveries().len();
    let engine = setup.start();
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(receiver.deliveries().len(), n, "delivered events are not sent again");
    drop(engine);
}
