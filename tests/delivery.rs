//! Real-time delivery over WebSocket against the real binary: online and
//! offline delivery, acks, redelivery, several connections, order, tokens,
//! bad frames, TTL expiry and shutdown.

mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use common::*;

const WAIT: Duration = Duration::from_secs(5);
const QUIET: Duration = Duration::from_millis(600);

fn send(engine: &Engine, to: &str, body: &str) -> String {
    let r = engine.client().send(to, body);
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    r.json()["id"].as_str().unwrap().to_owned()
}

fn phone(engine: &Engine, user: &str) -> Phone {
    Phone::connect(engine.mobile, &token(&engine.config, user, 600)).expect("connect")
}

/// Polls the status endpoint until `want` (status changes are asynchronous).
fn wait_status(engine: &Engine, id: &str, want: &str) -> serde_json::Value {
    let mut c = engine.client();
    let deadline = Instant::now() + WAIT;
    loop {
        let j = c.get_status(id).json();
        if j["status"] == want || Instant::now() > deadline {
            assert_eq!(j["status"], want, "status of {id}: {j}");
            return j;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn online_user_gets_the_message_and_acks_it() {
    let setup = Setup::new(&Opts::default());
    let engine = setup.start();
    let mut p = phone(&engine, "alice");
    let id = send(&engine, "alice", "hello \"alice\"");
    let m = p.recv(WAIT).expect("delivered in real time");
    assert_eq!(m["type"], "message");
    assert_eq!(m["id"], id.as_str());
    assert_eq!(m["from"], "acme");
    assert_eq!(m["body"], "hello \"alice\"");
    assert_eq!(m["priority"], "normal");
    assert!(m["accepted_at"].as_u64().unwrap() > 1_700_000_000_000);
    let j = wait_status(&engine, &id, "delivered");
    assert_eq!(j["attempts"], 1);
    assert!(j["delivered_at"].as_u64().is_some());
    p.ack(&id);
    let j = wait_status(&engine, &id, "acked");
    assert!(j["acked_at"].as_u64().is_some());
}

#[test]
fn offline_messages_wait_and_arrive_in_order_then_live_ones() {
    let setup = Setup::new(&Opts::default());
    let engine = setup.start();
    let ids: Vec<String> = (0..30).map(|i| send(&engine, "bob", &format!("m{i}"))).collect();
    let mut p = phone(&engine, "bob");
    let got = p.recv_n(30, WAIT);
    let got_ids: Vec<&str> = got.iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(got_ids, ids.iter().map(String::as_str).collect::<Vec<_>>(), "backlog in acceptance order");
    let live = send(&engine, "bob", "live");
    assert_eq!(p.recv(WAIT).unwrap()["id"], live.as_str());
}

#[test]
fn unacked_messages_are_redelivered_on_reconnect_and_acked_ones_never_again() {
    let setup = Setup::new(&Opts::default());
    let engine = setup.start();
    let ids: Vec<String> = (0..3).map(|i| send(&engine, "carol", &format!("m{i}"))).collect();
    let mut p = phone(&engine, "carol");
    p.recv_n(3, WAIT);
    drop(p); // no ack
    let mut p = phone(&engine, "carol");
    let again = p.recv_n(3, WAIT);
    assert_eq!(again.iter().map(|m| m["id"].as_str().unwrap()).collect::<Vec<_>>(), ids);
    assert_eq!(wait_status(&engine, &ids[0], "delivered")["attempts"], 2);
    p.ack(&ids[0]);
    p.ack_many(&ids[1..]);
    for id in &ids {
        wait_status(&engine, id, "acked");
    }
    drop(p);
    let mut p = phone(&engine, "carol");
    assert!(p.recv(QUIET).is_none(), "acked messages must never come again");
    let new = send(&engine, "carol", "new");
    assert_eq!(p.recv(WAIT).unwrap()["id"], new.as_str());
}

#[test]
fn every_connection_of_a_user_gets_every_message() {
    let setup = Setup::new(&Opts::default());
    let engine = setup.start();
    let mut phones: Vec<Phone> = (0..3).map(|_| phone(&engine, "dave")).collect();
    let id = send(&engine, "dave", "to all devices");
    for p in &mut phones {
        assert_eq!(p.recv(WAIT).unwrap()["id"], id.as_str());
    }
}

#[test]
fn order_of_one_sender_is_kept_across_its_connections() {
    let setup = Setup::new(&Opts { shards: 2, ..Opts::default() });
    let engine = setup.start();
    let mut p = phone(&engine, "erin");
    let mut clients: Vec<Client> = (0..4).map(|_| engine.client()).collect();
    let mut ids = Vec::new();
    for i in 0..40 {
        let r = clients[i % 4].send("erin", &format!("{i}"));
        assert_eq!(r.status, 202);
        ids.push(r.json()["id"].as_str().unwrap().to_owned());
    }
    let got: Vec<String> = p.recv_n(40, WAIT).iter().map(|m| m["id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(got, ids);
}

#[test]
fn users_on_every_shard_are_served_whichever_shard_accepts_them() {
    // With 2 shards, the kernel spreads connections; half the users live on
    // the other shard, so their sockets are handed over.
    let setup = Setup::new(&Opts { shards: 2, ..Opts::default() });
    let engine = setup.start();
    let users: Vec<String> = (0..12).map(|i| format!("user-{i}")).collect();
    let mut phones: Vec<Phone> = users.iter().map(|u| phone(&engine, u)).collect();
    for (u, p) in users.iter().zip(&mut phones) {
        let id = send(&engine, u, u);
        let m = p.recv(WAIT).unwrap_or_else(|| panic!("{u} got nothing"));
        assert_eq!((m["id"].as_str().unwrap(), m["body"].as_str().unwrap()), (id.as_str(), u.as_str()));
    }
}

#[test]
fn bad_tokens_are_refused_with_401_and_no_upgrade() {
    let setup = Setup::new(&Opts::default());
    let engine = setup.start();
    let good = token(&engine.config, "frank", 600);
    let check = |r: Result<Phone, Refused>, code: &str| {
        let e = r.err().expect("must be refused");
        assert_eq!(e.status, 401);
        let j: serde_json::Value = serde_json::from_str(&e.body).expect("JSON error body");
        assert_eq!(j["error"]["code"], code, "{j}");
    };
    check(Phone::connect_to(engine.mobile, "/v1/connect", None), "token_missing");
    check(Phone::connect(engine.mobile, "not-a-jwt"), "token_invalid");
    let mut forged = good.clone();
    forged.pop();
    forged.push(if good.ends_with('A') { 'B' } else { 'A' });
    check(Phone::connect(engine.mobile, &forged), "token_invalid");
    // Expired: mint with a TTL of 1 s and wait it out.
    let short = token(&engine.config, "frank", 1);
    std::thread::sleep(Duration::from_millis(2100));
    check(Phone::connect(engine.mobile, &short), "token_expired");
    // The query parameter works for browsers.
    assert!(Phone::connect_to(engine.mobile, &format!("/v1/connect?token={good}"), None).is_ok());
}

#[test]
fn bad_frames_close_only_the_offender_with_the_proper_code() {
    let setup = Setup::new(&Opts::default());
    let engine = setup.start();
    let mut bystander = phone(&engine, "grace");

    let mut p = phone(&engine, "mallory");
    p.ws.send(tungstenite::Message::Binary(vec![1, 2, 3])).unwrap();
    assert_eq!(p.close_code(WAIT), Some(1003), "binary frame");

    let mut p = phone(&engine, "mallory");
    p.send_text("this is not json");
    assert_eq!(p.close_code(WAIT), Some(1008), "garbage text");

    let mut p = phone(&engine, "mallory");
    p.send_text(&"x".repeat(70 * 1024));
    assert_eq!(p.close_code(WAIT), Some(1009), "oversized message");

    let mut p = phone(&engine, "mallory");
    p.ws.get_mut().write_all(&[0x81, 0x02, b'h', b'i']).unwrap(); // unmasked text frame
    assert_eq!(p.close_code(WAIT), Some(1002), "unmasked frame");

    let id = send(&engine, "grace", "still here");
    assert_eq!(bystander.recv(WAIT).unwrap()["id"], id.as_str());
}

#[test]
fn expired_messages_are_not_delivered() {
    let setup = Setup::new(&Opts::default());
    let engine = setup.start();
    let mut c = engine.client();
    let r = c.request(
        "POST",
        "/v1/messages",
        Some(API_KEY),
        Some(r#"{"to":"heidi","body":"short-lived","ttl_seconds":1}"#),
    );
    assert_eq!(r.status, 202);
    let short = r.json()["id"].as_str().unwrap().to_owned();
    let long = send(&engine, "heidi", "long-lived");
    wait_status(&engine, &short, "expired");
    let mut p = phone(&engine, "heidi");
    assert_eq!(p.recv(WAIT).unwrap()["id"], long.as_str());
    assert!(p.recv(QUIET).is_none(), "the expired message must not come");
}

#[test]
fn sigterm_closes_sessions_with_1001_and_pending_messages_survive() {
    let setup = Setup::new(&Opts::default());
    let engine = setup.start();
    let mut p = phone(&engine, "ivan");
    let id = send(&engine, "ivan", "before shutdown");
    assert_eq!(p.recv(WAIT).unwrap()["id"], id.as_str());
    let offline = send(&engine, "judy", "for later");
    let pid = engine.child.id();
    std::process::Command::new("kill").arg("-15").arg(pid.to_string()).status().unwrap();
    assert_eq!(p.close_code(WAIT), Some(1001));
    assert_eq!(engine.terminate(), Some(0));
    let engine = setup.start();
    let mut p = phone(&engine, "ivan");
    assert_eq!(p.recv(WAIT).unwrap()["id"], id.as_str(), "unacked message redelivered after restart");
    let mut j = phone(&engine, "judy");
    assert_eq!(j.recv(WAIT).unwrap()["id"], offline.as_str());
}

#[test]
fn idle_connections_are_pinged() {
    let setup = Setup::new(&Opts { extra_mobile: "ping_interval_ms = 300\n".into(), ..Opts::default() });
    let engine = setup.start();
    let mut p = phone(&engine, "kim");
    p.ws.get_mut().set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let got_ping = loop {
        match p.ws.read() {
            Ok(tungstenite::Message::Ping(_)) => break true,
            Ok(_) => continue,
            Err(_) => break false,
        }
    };
    assert!(got_ping, "the server must ping an idle connection");
}

#[test]
fn bodies_evicted_from_memory_are_read_back_from_the_journal() {
    // A body cache smaller than one message: every delivery reads the journal.
    let setup = Setup::new(&Opts { extra_engine: "body_cache_bytes = 100\n".into(), ..Opts::default() });
    let engine = setup.start();
    let bodies: Vec<String> = (0..20).map(|i| format!("{i}-{}", "y".repeat(3000 + i))).collect();
    let ids: Vec<String> = bodies.iter().map(|b| send(&engine, "zed", b)).collect();
    let mut p = phone(&engine, "zed");
    for (id, body) in ids.iter().zip(&bodies) {
        let m = p.recv(WAIT).expect("delivered from the journal");
        assert_eq!((m["id"].as_str().unwrap(), m["body"].as_str().unwrap()), (id.as_str(), body.as_str()));
    }
}

#[test]
fn high_priority_overtakes_pending_lower_ones_and_order_holds_within_a_priority() {
    let setup = Setup::new(&Opts::default());
    let engine = setup.start();
    let mut c = engine.client();
    let mut sent: Vec<(String, &str)> = Vec::new();
    for (i, p) in ["low", "normal", "low", "high", "normal", "high", "low"].iter().enumerate() {
        let r = c.request(
            "POST",
            "/v1/messages",
            Some(API_KEY),
            Some(&format!(r#"{{"to":"olga","body":"{i}","priority":"{p}"}}"#)),
        );
        assert_eq!(r.status, 202);
        sent.push((r.json()["id"].as_str().unwrap().to_owned(), p));
    }
    let want: Vec<String> = ["high", "normal", "low"]
        .iter()
        .flat_map(|p| sent.iter().filter(move |(_, q)| q == p).map(|(id, _)| id.clone()))
        .collect();
    let mut phone = phone(&engine, "olga");
    let got: Vec<String> = phone.recv_n(7, WAIT).iter().map(|m| m["id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(got, want, "high first, then normal, then low; acceptance order within each");
}

#[test]
fn journal_segments_are_deleted_once_every_message_in_them_is_settled() {
    // A 64 KiB segment holds a message at a body limit of 16 KiB (config refuses 64 KiB).
    let setup = Setup::new(&Opts { shards: 1, segment_bytes: 64 * 1024, max_body_bytes: 16 * 1024, ..Opts::default() });
    let engine = setup.start();
    let shard_dir = setup.data_dir().join("shard-0");
    let segments = || {
        std::fs::read_dir(&shard_dir)
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "log"))
            .count()
    };
    let ids: Vec<String> = (0..200).map(|i| send(&engine, "pat", &format!("{i}-{}", "z".repeat(1000)))).collect();
    let before = segments();
    assert!(before >= 3, "200 KB over 64 KiB segments must rotate: {before}");
    let mut p = phone(&engine, "pat");
    let got = p.recv_n(200, WAIT);
    let got_ids: Vec<String> = got.iter().map(|m| m["id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(got_ids, ids);
    for chunk in got_ids.chunks(100) {
        p.ack_many(chunk);
    }
    // What stays: the active segment and the spare allocated ahead of it
    // (docs/ARCHITECTURE.md, "Disk full").
    let deadline = Instant::now() + Duration::from_secs(10);
    while segments() > 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(segments() <= 2, "settled segments must be deleted, the active one and its spare kept (had {before})");
    // After a restart nothing comes back, and new messages still flow.
    drop(p);
    assert_eq!(engine.terminate(), Some(0));
    let engine = setup.start();
    let mut p = phone(&engine, "pat");
    assert!(p.recv(QUIET).is_none(), "acked messages must not return after segment deletion and restart");
    let id = send(&engine, "pat", "fresh");
    assert_eq!(p.recv(WAIT).unwrap()["id"], id.as_str());
}
