//! Runtime configuration over the admin API, against the real binary:
//! limits lowered at runtime, invalid changes, clients added, removed and
//! rotated, rollback, the audit log, persistence across kill -9 and
//! restarts, SIGHUP, environment overlays and variables.

mod common;

use std::time::Duration;

use common::{Client, Engine, Opts, Setup, ADMIN_TOKEN, API_KEY, OTHER_KEY};
use serde_json::{json, Value};

fn admin(e: &Engine, method: &str, path: &str, body: Option<&Value>) -> common::Response {
    let body = body.map(Value::to_string);
    Client::connect(e.admin).request(method, path, Some(ADMIN_TOKEN), body.as_deref())
}

fn send_as(c: &mut Client, key: &str, to: &str) -> common::Response {
    let body = json!({"to": to, "body": "hi"}).to_string();
    c.request("POST", "/v1/messages", Some(key), Some(&body))
}

fn audit_lines(s: &Setup) -> Vec<Value> {
    let text = std::fs::read_to_string(s.data_dir().join("audit.log")).unwrap();
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn assert_no_secret(text: &str) {
    for secret in
        [API_KEY, OTHER_KEY, ADMIN_TOKEN, common::TOKEN_SECRET, "gamma-key-0123456789", "acme-rotated-0123456789"]
    {
        assert!(!text.contains(secret), "a secret leaked: {text}");
    }
}

/// A limit lowered with PATCH counts the current window at once, for
/// requests arriving on connections spread over both shards; the change is
/// a new version with its actor and summary, audited.
#[test]
fn a_lowered_limit_applies_at_once_on_every_shard() {
    let s = Setup::new(&Opts::default());
    let e = s.start();
    let mut first = e.client();
    for i in 0..2 {
        assert_eq!(first.send(&format!("u{i}"), "x").status, 202);
    }
    let r = admin(&e, "PATCH", "/v1/config", Some(&json!({"tiers": {"basic": {"messages_per_minute": 5}}})));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["version"], 2);
    // 16 connections: SO_REUSEPORT spreads them over both shards.
    let mut conns: Vec<Client> = (0..16).map(|_| e.client()).collect();
    let mut accepted = 0;
    for (i, c) in conns.iter_mut().enumerate() {
        let r = c.send(&format!("user{i}"), "x");
        assert_eq!(r.header("ratelimit-limit"), Some("5"), "every answer carries the new limit");
        match r.status {
            202 => accepted += 1,
            429 => {}
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(accepted, 3, "2 sent before the change count in the window of 5");
    let versions = admin(&e, "GET", "/v1/config/versions", None).json();
    assert_eq!(versions["current"], 2);
    let v2 = &versions["versions"][1];
    assert_eq!(v2["actor"], "admin");
    assert!(v2["summary"].as_str().unwrap().contains("tiers.basic.messages_per_minute: 1000000 -> 5"), "{v2}");
    assert!(v2["source"].as_str().unwrap().starts_with("PATCH /v1/config from 127.0.0.1:"), "{v2}");
    let lines = audit_lines(&s);
    let last = lines.last().unwrap();
    assert_eq!((last["old_version"].as_u64(), last["new_version"].as_u64()), (Some(1), Some(2)));
    assert_eq!(last["diff"][0]["key"], "tiers.basic.messages_per_minute");
}

/// An invalid change is refused whole, listing every error by key; keys
/// that size things at startup get 409 requires_restart; nothing changes
/// and each refusal is audited.
#[test]
fn invalid_changes_list_every_error_and_change_nothing() {
    let s = Setup::new(&Opts::default());
    let e = s.start();
    let before = admin(&e, "GET", "/v1/config", None).json();
    let patch = json!({
        "tiers": {"basic": {"messages_per_minute": 0}},
        "business": {"default_ttl_seconds": 0},
        "webhooks": {"max_attempts": 0},
        "clients": [{"id": "acme", "api_key": "short", "tier": "nope"}, {"id": "x y", "api_key": "x-key-0123456789abcdef", "tier": "basic"}]
    });
    let r = admin(&e, "PATCH", "/v1/config", Some(&patch));
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.error_code(), "invalid_config");
    let keys: Vec<String> =
        r.json()["error"]["errors"].as_array().unwrap().iter().map(|e| e["key"].as_str().unwrap().to_owned()).collect();
    for key in [
        "tiers.basic.messages_per_minute",
        "business.default_ttl_seconds",
        "webhooks.max_attempts",
        "clients[0].api_key",
        "clients[1].id",
    ] {
        assert!(keys.iter().any(|k| k == key), "{key} not in {keys:?}");
    }
    let r = admin(
        &e,
        "PATCH",
        "/v1/config",
        Some(&json!({"business": {"listen": "127.0.0.1:1"}, "engine": {"shards": 3}})),
    );
    assert_eq!(r.status, 409);
    assert_eq!(r.error_code(), "requires_restart");
    let body = r.json();
    let named: Vec<&str> =
        body["error"]["keys"].as_array().unwrap().iter().map(|k| k["key"].as_str().unwrap()).collect();
    assert_eq!(named, ["business.listen", "engine.shards"]);
    let after = admin(&e, "GET", "/v1/config", None).json();
    assert_eq!(before, after, "nothing changed");
    assert_eq!(after["version"], 1);
    assert_eq!(e.client().send("alice", "still fine").status, 202);
    // GET, then PUT the same (redacted) document back: no change, no version.
    let r = admin(&e, "PUT", "/v1/config", Some(&after));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["changed"], false);
    let lines = audit_lines(&s);
    let refused: Vec<&Value> = lines.iter().filter(|l| l["result"] == "refused").collect();
    assert_eq!(refused.len(), 2);
    assert!(refused.iter().all(|l| l["new_version"].is_null()));
    assert_no_secret(&std::fs::read_to_string(s.data_dir().join("audit.log")).unwrap());
    assert_no_secret(&String::from_utf8_lossy(&serde_json::to_vec(&after).unwrap()));
}

/// Clients added, removed and rotated with GET-edit-PUT (the redacted
/// secrets sent back keep their values); rollback brings the first
/// version back as a new one; all of it survives kill -9; an edited file
/// becomes a new version at the next start.
#[test]
fn clients_change_at_runtime_roll_back_and_survive_kill_9() {
    let s = Setup::new(&Opts::default());
    let e = s.start();
    let mut doc = admin(&e, "GET", "/v1/config", None).json();
    assert_no_secret(&doc.to_string());
    let clients = doc["config"]["clients"].as_array_mut().unwrap();
    clients.retain(|c| c["id"] != "other");
    clients[0]["api_key"] = json!("acme-rotated-0123456789");
    clients.push(json!({"id": "gamma", "api_key": "gamma-key-0123456789", "tier": "basic"}));
    let r = admin(&e, "PUT", "/v1/config", Some(&doc));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["version"], 2);
    assert_no_secret(&String::from_utf8_lossy(&r.body));
    let check = |e: &Engine, expect: &[(&str, u16)]| {
        for (key, status) in expect {
            for i in 0..4 {
                let mut c = e.client();
                assert_eq!(send_as(&mut c, key, &format!("r{i}")).status, *status, "key {key}");
            }
        }
    };
    check(&e, &[("gamma-key-0123456789", 202), (OTHER_KEY, 401), (API_KEY, 401), ("acme-rotated-0123456789", 202)]);
    // A stale version in the body is refused.
    let r = admin(&e, "PUT", "/v1/config", Some(&doc));
    assert_eq!((r.status, r.error_code().as_str()), (409, "version_conflict"));
    let r = admin(&e, "POST", "/v1/config/rollback", Some(&json!({"version": 1})));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["version"], 3);
    check(&e, &[(API_KEY, 202), (OTHER_KEY, 202), ("gamma-key-0123456789", 401)]);
    assert_eq!(admin(&e, "POST", "/v1/config/rollback", Some(&json!({"version": 42}))).status, 404);
    let r = admin(&e, "PATCH", "/v1/config", Some(&json!({"tiers": {"basic": {"messages_per_minute": 7}}})));
    assert_eq!(r.json()["version"], 4);
    let log = std::fs::read_to_string(s.data_dir().join("audit.log")).unwrap();
    assert_no_secret(&log);
    assert!(audit_lines(&s).iter().any(|l| l["action"] == "rollback" && l["new_version"] == 3));
    e.kill9();
    // The file is unchanged: version 4 stays in force.
    let e = s.start();
    let got = admin(&e, "GET", "/v1/config", None).json();
    assert_eq!(got["version"], 4);
    assert_eq!(got["config"]["tiers"]["basic"]["messages_per_minute"], 7);
    let (code, out, _) = common::run_cli(&["config", "diff", "--config", s.config.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("tiers.basic.messages_per_minute: runtime 7 file 1000000"), "{out}");
    assert!(out.contains("is unchanged"), "{out}");
    drop(e);
    // The file edited: it becomes version 5, actor `file`.
    let text =
        std::fs::read_to_string(&s.config).unwrap().replace("messages_per_minute = 1000000", "messages_per_minute = 9");
    std::fs::write(&s.config, text).unwrap();
    let e = s.start();
    let got = admin(&e, "GET", "/v1/config", None).json();
    assert_eq!(
        (got["version"].as_u64(), got["config"]["tiers"]["basic"]["messages_per_minute"].as_u64()),
        (Some(5), Some(9))
    );
    let versions = admin(&e, "GET", "/v1/config/versions", None).json();
    assert_eq!(versions["versions"][4]["actor"], "file");
}

/// SIGHUP re-reads the file: a valid edit becomes a new version by
/// `file`; an invalid one is audited and changes nothing. A named admin
/// token is the actor of its changes.
#[test]
fn sighup_rereads_the_file_and_named_tokens_are_actors() {
    let o = Opts {
        extra_toml: "[[admin.tokens]]\nname = \"ops-alice\"\ntoken = \"alice-token-0123456789\"\n".into(),
        ..Opts::default()
    };
    let s = Setup::new(&o);
    let e = s.start();
    let pid = e.child.id().to_string();
    let original = std::fs::read_to_string(&s.config).unwrap();
    std::fs::write(&s.config, original.replace("messages_per_minute = 1000000", "messages_per_minute = 11")).unwrap();
    let hup = || assert!(std::process::Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
    hup();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let got = admin(&e, "GET", "/v1/config", None).json();
        if got["version"] == 2 {
            assert_eq!(got["config"]["tiers"]["basic"]["messages_per_minute"], 11);
            break;
        }
        assert!(std::time::Instant::now() < deadline, "SIGHUP not applied: {got}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(admin(&e, "GET", "/v1/config/versions", None).json()["versions"][1]["actor"], "file");
    std::fs::write(&s.config, original.replace("messages_per_minute = 1000000", "messages_per_minute = 0")).unwrap();
    hup();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !audit_lines(&s).iter().any(|l| l["result"] == "refused" && l["source"] == "SIGHUP") {
        assert!(std::time::Instant::now() < deadline, "no audit line for the refused SIGHUP");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(admin(&e, "GET", "/v1/config", None).json()["version"], 2, "nothing changed");
    let body = json!({"tiers": {"basic": {"messages_per_minute": 12}}}).to_string();
    let r = Client::connect(e.admin).request("PATCH", "/v1/config", Some("alice-token-0123456789"), Some(&body));
    assert_eq!(r.status, 200);
    assert_eq!(audit_lines(&s).last().unwrap()["actor"], "ops-alice");
    assert_no_secret(&std::fs::read_to_string(s.data_dir().join("audit.log")).unwrap());
    assert!(!std::fs::read_to_string(s.data_dir().join("audit.log")).unwrap().contains("alice-token-0123456789"));
}

/// `--env` merges `engine.<env>.toml` over the file, `ESH3AR__*` variables
/// override single keys, and `config check` names the source of each value.
#[test]
fn environment_overlays_and_variables() {
    let s = Setup::new(&Opts::default());
    std::fs::write(s.dir.path().join("engine.prod.toml"), "[tiers.basic]\nmessages_per_minute = 600\n").unwrap();
    let cfg = s.config.to_str().unwrap();
    let (code, out, err) = common::run_cli(&["config", "check", "--config", cfg, "--env", "prod"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("tiers.basic.messages_per_minute = 600  # engine.prod.toml"), "{out}");
    assert!(out.contains("business.max_body_bytes = 65536  # engine.toml"), "{out}");
    assert!(out.contains("webhooks.max_attempts = 15  # default"), "{out}");
    assert_no_secret(&out);
    let (code, _, err) = common::run_cli(&["config", "check", "--config", cfg, "--env", "staging"]);
    assert_eq!(code, 2, "a named overlay must exist");
    assert!(err.contains("engine.staging.toml"), "{err}");
    let e = Engine::try_start_with(&s.config, |cmd| {
        cmd.env("ESH3AR_ENV", "prod").env("ESH3AR__BUSINESS__MAX_BODY_BYTES", "4096");
    })
    .unwrap();
    let got = admin(&e, "GET", "/v1/config", None).json();
    assert_eq!(got["config"]["tiers"]["basic"]["messages_per_minute"], 600);
    assert_eq!(got["config"]["business"]["max_body_bytes"], 4096);
}

/// Sends one message as `key` to `user`, has `user`'s phone take it, and
/// returns its id: its `message.delivered` event is then owed.
fn deliver_one(e: &Engine, s: &Setup, key: &str, user: &str) -> String {
    let mut c = e.client();
    let r = send_as(&mut c, key, user);
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    let id = r.json()["id"].as_str().unwrap().to_owned();
    let mut phone = common::Phone::connect(e.mobile, &common::token(&s.config, user, 3600)).expect("connect");
    let frames = phone.recv_n(1, Duration::from_secs(10));
    assert_eq!(frames[0]["id"].as_str(), Some(id.as_str()));
    id
}

/// PATCH `clients` with the current (redacted) list edited by `edit`.
fn patch_clients(e: &Engine, edit: impl FnOnce(&mut Vec<Value>)) -> common::Response {
    let mut doc = admin(e, "GET", "/v1/config", None).json();
    let clients = doc["config"]["clients"].as_array_mut().unwrap();
    edit(clients);
    admin(e, "PATCH", "/v1/config", Some(&json!({"clients": clients})))
}

/// A webhook added at runtime (a new client with a `webhook_url`), then
/// moved to another receiver, then the same after a restart: every
/// change is 200 (no restart needed), and each receipt, signed with the
/// client's secret, reaches the receiver in force when it was sent.
/// `webhooks.timeout_ms` changes at runtime too.
#[test]
fn webhooks_are_added_and_moved_at_runtime_and_survive_a_restart() {
    use common::webhook::{Receiver, SECRET};
    let (first, second) = (Receiver::start(), Receiver::start());
    let s = Setup::new(&Opts::default());
    let e = s.start();
    let late_key = "late-key-0123456789abcdef";
    let r = patch_clients(&e, |clients| {
        clients.push(json!({"id": "late", "api_key": late_key, "tier": "basic",
                            "webhook_url": first.url(), "webhook_secret": SECRET}));
    });
    assert_eq!(r.status, 200, "a webhook added at runtime: {}", String::from_utf8_lossy(&r.body));
    let health = String::from_utf8_lossy(&admin(&e, "GET", "/healthz", None).body).into_owned();
    assert!(health.contains("\"webhook:late\":\"closed\""), "{health}");
    let id = deliver_one(&e, &s, late_key, "bob");
    let got = first.wait_for("the new client's receipt", Duration::from_secs(10), |d| {
        d.iter().any(|d| d.id == format!("evt_{id}_delivered"))
    });
    assert!(got.iter().all(|d| d.id.contains(&id)), "only the new client's events: {:?}", common::webhook::ids(&got));

    let r = admin(&e, "PATCH", "/v1/config", Some(&json!({"webhooks": {"timeout_ms": 3000}})));
    assert_eq!(r.status, 200, "webhooks.timeout_ms changes at runtime: {}", String::from_utf8_lossy(&r.body));
    let r = patch_clients(&e, |clients| {
        let late = clients.iter_mut().find(|c| c["id"] == "late").unwrap();
        late["webhook_url"] = json!(second.url());
    });
    assert_eq!(r.status, 200, "a webhook moved at runtime: {}", String::from_utf8_lossy(&r.body));
    let moved = deliver_one(&e, &s, late_key, "carol");
    second.wait_for("the receipt after the move", Duration::from_secs(10), |d| {
        d.iter().any(|d| d.id == format!("evt_{moved}_delivered"))
    });
    assert!(
        !first.deliveries().iter().any(|d| d.id.contains(&moved)),
        "nothing of a message sent after the move goes to the old receiver"
    );
    let version = admin(&e, "GET", "/v1/config", None).json()["version"].clone();
    assert_eq!(version, 4);
    drop(e);

    // The file is unchanged: the runtime version stays in force, and the
    // endpoint table is built from it.
    let e = s.start();
    assert_eq!(admin(&e, "GET", "/v1/config", None).json()["version"], version);
    let after = deliver_one(&e, &s, late_key, "dave");
    second.wait_for("the receipt after a restart", Duration::from_secs(10), |d| {
        d.iter().any(|d| d.id == format!("evt_{after}_delivered"))
    });
    assert!(!first.deliveries().iter().any(|d| d.id.contains(&after)));
}

/// Validation lists every error, several in one section included: a PATCH
/// with two bad values in each of four sections is refused with all eight
/// named, nothing changes, and the audit line of the refusal lists them
/// too. `esh3ar config check` prints every error of a file.
#[test]
fn every_invalid_value_is_listed_not_only_the_first_of_each_section() {
    let s = Setup::new(&Opts::default());
    let e = s.start();
    let patch = json!({
        "engine": {"mesh_reply_timeout_ms": 1, "memory_limit_bytes": 1},
        "mobile": {"max_inflight": 0, "hub_keep_alive_ms": 1},
        "webhooks": {"max_attempts": 0, "breaker_failures": 0},
        "tiers": {"basic": {"messages_per_minute": 0, "shed_offset_percent": 99}},
    });
    let expected = [
        "engine.mesh_reply_timeout_ms",
        "engine.memory_limit_bytes",
        "mobile.max_inflight",
        "mobile.hub_keep_alive_ms",
        "webhooks.max_attempts",
        "webhooks.breaker_failures",
        "tiers.basic.messages_per_minute",
        "tiers.basic.shed_offset_percent",
    ];
    let r = admin(&e, "PATCH", "/v1/config", Some(&patch));
    assert_eq!((r.status, r.error_code().as_str()), (400, "invalid_config"), "{}", String::from_utf8_lossy(&r.body));
    let keys_of = |errors: &Value| -> Vec<String> {
        errors.as_array().unwrap().iter().map(|e| e["key"].as_str().unwrap().to_owned()).collect()
    };
    let keys = keys_of(&r.json()["error"]["errors"]);
    for key in expected {
        assert!(keys.iter().any(|k| k == key), "{key} not in {keys:?}");
    }
    assert_eq!(admin(&e, "GET", "/v1/config", None).json()["version"], 1, "nothing changed");
    let refused = audit_lines(&s).into_iter().rev().find(|l| l["result"] == "refused").expect("a refused line");
    let audited = keys_of(&refused["errors"]);
    for key in expected {
        assert!(audited.iter().any(|k| k == key), "{key} not in the audit line {audited:?}");
    }
    assert!(refused["new_version"].is_null());

    let text = std::fs::read_to_string(&s.config)
        .unwrap()
        .replace("messages_per_minute = 1000000", "messages_per_minute = 0\nshed_offset_percent = 99")
        + "\n[webhooks]\nmax_attempts = 0\nbreaker_failures = 0\n";
    let bad = s.dir.path().join("bad.toml");
    std::fs::write(&bad, text).unwrap();
    let (code, _, err) = common::run_cli(&["config", "check", "--config", bad.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    for key in [
        "tiers.basic.messages_per_minute",
        "tiers.basic.shed_offset_percent",
        "webhooks.max_attempts",
        "webhooks.breaker_failures",
    ] {
        assert!(err.contains(&format!("`{key}`")), "{key} not in {err}");
    }
    assert!(err.contains("4 error(s)"), "{err}");
}
