//! Opt-out and asynchronous validation end to end: the real engine, phones
//! over WebSocket that block and unblock senders, the admin user directory,
//! `kill -9` and restarts, and a real webhook receiver
//! (`common::webhook::Receiver`: it checks every signature with an
//! independent Standard Webhooks verification).

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::webhook::*;
use common::*;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(10);
const QUIET: Duration = Duration::from_millis(700);

fn setup_with(o: Opts) -> Setup {
    Setup::new(&o)
}

/// Sends `body` to `to` with `key`; returns the tracking id.
fn send_as(engine: &Engine, key: &str, to: &str, body: &str) -> String {
    let json = json!({"to": to, "body": body}).to_string();
    let r = engine.client().request("POST", "/v1/messages", Some(key), Some(&json));
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    r.json()["id"].as_str().unwrap().to_owned()
}

fn status_of(engine: &Engine, key: &str, id: &str) -> Value {
    let r = engine.client().request("GET", &format!("/v1/messages/{id}"), Some(key), None);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r.json()
}

fn assert_rejected(engine: &Engine, key: &str, id: &str, reason: &str) {
    let s = status_of(engine, key, id);
    assert_eq!((s["status"].as_str(), s["reason"].as_str()), (Some("rejected"), Some(reason)), "{s}");
}

fn admin(engine: &Engine, method: &str, path: &str, body: Option<&str>) -> Response {
    Client::connect(engine.admin).request(method, path, Some(ADMIN_TOKEN), body)
}

fn phone(engine: &Engine, setup: &Setup, user: &str) -> Phone {
    Phone::connect(engine.mobile, &token(&setup.config, user, 3600)).expect("connect")
}

/// Sends a block or unblock frame and returns the answer.
fn block(phone: &mut Phone, kind: &str, from: &str) -> Value {
    phone.send_text(&json!({"type": kind, "from": from}).to_string());
    phone.recv(WAIT).expect("an answer to the block frame")
}

fn restart_after_kill9(engine: Engine, setup: &Setup) -> Engine {
    engine.kill9();
    setup.start()
}

/// Blocking over the WebSocket rejects that client's later messages and
/// its unacked ones (pending, or delivered and unacked), never delivers
/// them, lets other clients through, survives kill -9, and unblocking lets
/// new messages through again.
#[test]
fn a_block_rejects_a_senders_messages_until_unblocked_and_survives_kill9() {
    let setup = setup_with(Opts { extra_mobile: "max_inflight = 1\n".into(), ..Opts::default() });
    let engine = setup.start();
    // Two from acme before the phone connects: with max_inflight = 1 the
    // first is delivered (unacked) and the second stays pending.
    let early = [send_as(&engine, API_KEY, "alice", "early 1"), send_as(&engine, API_KEY, "alice", "early 2")];
    let mut p = phone(&engine, &setup, "alice");
    let first = p.recv(WAIT).expect("the first pending message");
    assert_eq!(first["id"], early[0].as_str());
    assert_eq!(status_of(&engine, API_KEY, &early[1])["status"], "accepted", "the second is still pending");

    assert_eq!(block(&mut p, "block", "acme"), json!({"type": "blocked", "from": "acme"}));
    for id in &early {
        assert_rejected(&engine, API_KEY, id, "recipient_opted_out");
    }
    let later = send_as(&engine, API_KEY, "alice", "after the block");
    assert_rejected(&engine, API_KEY, &later, "recipient_opted_out");
    let other = send_as(&engine, OTHER_KEY, "alice", "from other");
    let got = p.recv(WAIT).expect("the other client's message");
    assert_eq!((got["id"].as_str(), got["from"].as_str()), (Some(other.as_str()), Some("other")));
    p.ack(&other);
    assert!(p.recv(QUIET).is_none(), "nothing from acme is delivered");
    drop(p);

    let engine = restart_after_kill9(engine, &setup);
    let after_restart = send_as(&engine, API_KEY, "alice", "after the crash");
    assert_rejected(&engine, API_KEY, &after_restart, "recipient_opted_out");
    for id in &early {
        assert_rejected(&engine, API_KEY, id, "recipient_opted_out");
    }
    let user = admin(&engine, "GET", "/v1/users/alice", None);
    assert_eq!(user.status, 200);
    assert_eq!(user.json()["blocked"], json!(["acme"]));
    let mut p = phone(&engine, &setup, "alice");
    assert!(p.recv(QUIET).is_none(), "rejected messages are not delivered after the restart either");

    assert_eq!(block(&mut p, "unblock", "acme"), json!({"type": "unblocked", "from": "acme"}));
    let welcome = send_as(&engine, API_KEY, "alice", "welcome back");
    let got = p.recv(WAIT).expect("a message after the unblock");
    assert_eq!(got["id"], welcome.as_str());
    assert_eq!(got["body"], "welcome back");
    assert_eq!(status_of(&engine, API_KEY, &after_restart)["status"], "rejected", "unblocking does not revive");
    p.ack(&welcome);
}

/// With `known_recipients_only`, a message to a user not in the directory
/// is rejected; registering the user (admin) or their first connection
/// puts them in it, and the directory survives kill -9.
#[test]
fn known_recipients_only_rejects_strangers_until_they_are_in_the_directory() {
    let setup =
        setup_with(Opts { extra_toml: "\n[validation]\nknown_recipients_only = true\n".into(), ..Opts::default() });
    let engine = setup.start();
    let stranger = send_as(&engine, API_KEY, "bob", "who are you");
    assert_rejected(&engine, API_KEY, &stranger, "unknown_recipient");

    let put = admin(&engine, "PUT", "/v1/users/bob", Some(r#"{"phone":"+966512345678","email":"bob@example.sa"}"#));
    assert_eq!(put.status, 200, "{}", String::from_utf8_lossy(&put.body));
    let u = put.json();
    assert_eq!((u["id"].as_str(), u["phone"].as_str()), (Some("bob"), Some("+966512345678")));
    assert_eq!(u["email"], "bob@example.sa");
    assert!(u["first_seen_at"].as_u64().unwrap() > 1_700_000_000_000);
    let known = send_as(&engine, API_KEY, "bob", "now I know you");

    // carol enters the directory by connecting once.
    drop(phone(&engine, &setup, "carol"));
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(admin(&engine, "GET", "/v1/users/carol", None).status, 200);
    let to_carol = send_as(&engine, API_KEY, "carol", "hello carol");
    assert_eq!(status_of(&engine, API_KEY, &to_carol)["status"], "accepted");

    let mut p = phone(&engine, &setup, "bob");
    let got = p.recv(WAIT).expect("the message sent after registration");
    assert_eq!(got["id"], known.as_str(), "the rejected one never arrives");
    p.ack(&known);
    assert!(p.recv(QUIET).is_none());
    drop(p);

    let engine = restart_after_kill9(engine, &setup);
    assert_rejected(&engine, API_KEY, &stranger, "unknown_recipient");
    let bob = admin(&engine, "GET", "/v1/users/bob", None);
    assert_eq!(bob.status, 200);
    assert_eq!(bob.json()["phone"], "+966512345678");
    for user in ["bob", "carol"] {
        let id = send_as(&engine, API_KEY, user, "after the crash");
        assert_eq!(status_of(&engine, API_KEY, &id)["status"], "accepted", "{user} is still known");
    }
    let dave = send_as(&engine, API_KEY, "dave", "still a stranger");
    assert_rejected(&engine, API_KEY, &dave, "unknown_recipient");
    assert_eq!(admin(&engine, "GET", "/v1/users/dave", None).status, 404);
    let mut p = phone(&engine, &setup, "carol");
    let got = p.recv(WAIT).expect("carol's first message");
    assert_eq!(got["id"], to_carol.as_str());
}

/// A rejection owes the sender a signed `message.rejected` event with the reason.
#[test]
fn a_rejection_reaches_the_senders_webhook_with_its_reason() {
    let receiver = Receiver::start();
    let setup = setup_with(Opts {
        extra_toml: format!(
            r#"
[[clients]]
id = "hooked"
api_key = "{HOOK_KEY}"
tier = "basic"
webhook_url = "{url}"
webhook_secret = "{SECRET}"

[validation]
known_recipients_only = true
"#,
            url = receiver.url()
        ),
        ..Opts::default()
    });
    let engine = setup.start();
    let mut p = phone(&engine, &setup, "alice");
    assert_eq!(block(&mut p, "block", "hooked"), json!({"type": "blocked", "from": "hooked"}));
    let opted_out = send_as(&engine, HOOK_KEY, "alice", "spam");
    let unknown = send_as(&engine, HOOK_KEY, "nobody", "hello?");
    let got = receiver.wait_for("two rejections", WAIT, |d| d.len() >= 2);
    let by_id: HashMap<&str, &Value> = got.iter().map(|d| (d.id.as_str(), &d.body)).collect();
    for (id, reason) in [(&opted_out, "recipient_opted_out"), (&unknown, "unknown_recipient")] {
        let body = by_id.get(format!("evt_{id}_rejected").as_str()).unwrap_or_else(|| panic!("no event for {id}"));
        assert_eq!(body["type"], "message.rejected");
        assert_eq!(body["data"]["id"], id.as_str());
        assert_eq!(body["data"]["status"], "rejected");
        assert_eq!(body["data"]["reason"], reason);
    }
    assert!(p.recv(QUIET).is_none(), "the blocked message is not delivered");
}

/// Bad input: the admin user endpoints name the bad field and need the
/// token; malformed block frames close with 1008; an unknown client is an
/// error frame and the session goes on.
#[test]
fn bad_input_is_refused_with_documented_codes() {
    let setup = setup_with(Opts::default());
    let engine = setup.start();
    for (body, field) in [
        (r#"{"phone":"0551234567"}"#, "phone"),
        (r#"{"phone":"+96655123456789012"}"#, "phone"),
        (r#"{"phone":5}"#, "phone"),
        (r#"{"email":"not-an-address"}"#, "email"),
        (r#"{"email":"a@b"}"#, "email"),
        (r#"{"name":"x"}"#, "unknown field"),
        ("[1]", "JSON object"),
    ] {
        let r = admin(&engine, "PUT", "/v1/users/erin", Some(body));
        assert_eq!((r.status, r.error_code().as_str()), (400, "invalid_field"), "{body}");
        let message = r.json()["error"]["message"].as_str().unwrap().to_owned();
        assert!(message.contains(field), "{body}: {message}");
    }
    assert_eq!(admin(&engine, "GET", "/v1/users/erin", None).status, 404, "nothing was stored");
    let mut c = Client::connect(engine.admin);
    assert_eq!(c.request("GET", "/v1/users/erin", None, None).status, 401);
    assert_eq!(c.request("PUT", "/v1/users/erin", Some("wrong-token-0123456789abcdef"), Some("{}")).status, 401);
    assert_eq!(c.request("DELETE", "/v1/users/erin", Some(ADMIN_TOKEN), None).status, 405);
    let ok = admin(&engine, "PUT", "/v1/users/erin%20k", Some("{}"));
    assert_eq!(ok.status, 200);
    assert_eq!(
        ok.json(),
        json!({"id": "erin k", "phone": null, "email": null,
        "first_seen_at": ok.json()["first_seen_at"], "blocked": []})
    );

    // Users homed on either shard: the admin listener (shard 0) reaches the
    // other one over the mesh.
    let users = ["u1", "u2", "u3", "u4", "u5"];
    let homes: std::collections::HashSet<usize> = users.iter().map(|u| esh3ar::route(u, 2)).collect();
    assert_eq!(homes.len(), 2, "the users cover both shards");
    for (i, user) in users.iter().enumerate() {
        let phone = format!("+96651234567{i}");
        let put = admin(&engine, "PUT", &format!("/v1/users/{user}"), Some(&json!({"phone": phone}).to_string()));
        assert_eq!(put.status, 200, "{user}");
        let got = admin(&engine, "GET", &format!("/v1/users/{user}"), None);
        assert_eq!((got.json()["id"].as_str(), got.json()["phone"].as_str()), (Some(*user), Some(phone.as_str())));
    }

    let mut p = phone(&engine, &setup, "frank");
    assert_eq!(
        block(&mut p, "block", "no-such-client"),
        json!({"type": "error", "code": "unknown_client", "from": "no-such-client"})
    );
    let id = send_as(&engine, API_KEY, "frank", "still open");
    assert_eq!(p.recv(WAIT).expect("the session goes on")["id"], id.as_str());
    for frame in [r#"{"type":"block"}"#, r#"{"type":"unblock","from":5}"#, r#"{"type":"block","from":""}"#] {
        // Users homed on either shard: the admin listener (shard 0) reaches the
        // other one over the mesh.
        let users = ["u1", "u2", "u3", "u4", "u5"];
        let homes: std::collections::HashSet<usize> = users.iter().map(|u| esh3ar::route(u, 2)).collect();
        assert_eq!(homes.len(), 2, "the users cover both shards");
        for (i, user) in users.iter().enumerate() {
            let phone = format!("+96651234567{i}");
            let put = admin(&engine, "PUT", &format!("/v1/users/{user}"), Some(&json!({"phone": phone}).to_string()));
            assert_eq!(put.status, 200, "{user}");
            let got = admin(&engine, "GET", &format!("/v1/users/{user}"), None);
            assert_eq!((got.json()["id"].as_str(), got.json()["phone"].as_str()), (Some(*user), Some(phone.as_str())));
        }

        let mut p = phone(&engine, &setup, "frank");
        let _ = p.recv(QUIET); // the unacked message again
        p.send_text(frame);
        assert_eq!(p.close_code(WAIT), Some(1008), "{frame}");
    }
}

/// A directory entry outlives the journal segment that held it: once every
/// message in the old segments is settled, maintenance journals the entry
/// again before deleting them, so the block is still there after kill -9.
#[test]
fn blocks_survive_the_deletion_of_their_segment() {
    let setup = setup_with(Opts { shards: 1, segment_bytes: 64 << 10, max_body_bytes: 1024, ..Opts::default() });
    let engine = setup.start();
    let mut p = phone(&engine, &setup, "alice");
    assert_eq!(block(&mut p, "block", "other")["type"], "blocked");
    let body = "x".repeat(1000);
    let ids: Vec<String> = (0..200).map(|_| send_as(&engine, API_KEY, "alice", &body)).collect();
    let mut got = Vec::new();
    while got.len() < ids.len() {
        let f = p.recv(WAIT).expect("every message arrives");
        let id = f["id"].as_str().unwrap().to_owned();
        p.ack(&id);
        got.push(id);
    }
    let shard_dir = setup.data_dir().join("shard-0");
    let segments = || {
        std::fs::read_dir(&shard_dir)
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.starts_with("seg-") && name.ends_with(".log")
            })
            .count()
    };
    // What stays: the active segment and the spare allocated ahead of it
    // (docs/ARCHITECTURE.md, "Disk full").
    let deadline = Instant::now() + Duration::from_secs(15);
    while segments() > 2 {
        assert!(Instant::now() < deadline, "settled segments were not deleted: {} left", segments());
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(p);
    let engine = restart_after_kill9(engine, &setup);
    let id = send_as(&engine, OTHER_KEY, "alice", "blocked still");
    assert_rejected(&engine, OTHER_KEY, &id, "recipient_opted_out");
    assert_eq!(admin(&engine, "GET", "/v1/users/alice", None).json()["blocked"], json!(["other"]));
}
