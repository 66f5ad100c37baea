//! The `esh3ar` command line: `config check`, `token`, `journal verify`,
//! and the refusals of `serve` (shard-count mismatch, data dir in use).
mod common;
use common::*;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

fn cfg(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// `esh3ar serve --config F`, expected to exit on its own within 20 s;
/// returns (exit code, stderr).
fn serve_expecting_exit(config: &Path) -> (i32, String) {
    let mut child = Command::new(bin())
        .args(["serve", "--config", cfg(config)])
        .env("ESH3AR_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn esh3ar");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`esh3ar serve` kept running where it should have refused to start");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    (status.code().unwrap_or(-1), err)
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

// ------------------------------------------------------------ config check

#[test]
fn config_check_accepts_a_good_config() {
    let setup = Setup::new(&Opts::default());
    let (code, out, err) = run_cli(&["config", "check", "--config", cfg(&setup.config)]);
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    assert!(out.starts_with("config OK: 2 shards"), "{out}");
    assert!(out.contains(&setup.data_dir().display().to_string()), "summary should name the data dir: {out}");
    assert!(out.contains("2 clients"), "{out}");
    // A check writes nothing: no data dir appears.
    assert!(!setup.data_dir().exists(), "config check created the data dir");
}

#[test]
fn config_check_names_an_unknown_key() {
    let setup = Setup::new(&Opts::default());
    let good = std::fs::read_to_string(&setup.config).unwrap();
    let cases = [
        (good.replace("[engine]\n", "[engine]\nshard_count = 4\n"), "shard_count"),
        (good.replace("[business]\n", "[business]\nmax_body_bytez = 1024\n"), "max_body_bytez"),
        (good.replace("tier = \"basic\"\n", "tier = \"basic\"\nwebhook = \"x\"\n"), "webhook"),
        (format!("{good}\n[metrics]\nlisten = \"127.0.0.1:0\"\n"), "metrics"),
    ];
    for (text, key) in cases {
        assert_ne!(text, good, "the case for {key} changed nothing");
        std::fs::write(&setup.config, &text).unwrap();
        let (code, out, err) = run_cli(&["config", "check", "--config", cfg(&setup.config)]);
        assert_eq!(code, 2, "unknown key {key}: {out}");
        assert!(err.contains(key), "stderr does not name {key}: {err}");
        assert!(!out.contains("config OK"), "{out}");
    }
}

#[test]
fn config_check_names_the_key_of_a_bad_value() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let opts_cases: Vec<(Opts, &str)> = vec![
        (Opts { extra_engine: "mesh_channel_capacity = 1".into(), ..Opts::default() }, "engine.mesh_channel_capacity"),
        (Opts { segment_bytes: 1000, ..Opts::default() }, "engine.segment_bytes"),
        (Opts { segment_bytes: (1 << 20) + 1, ..Opts::default() }, "engine.segment_bytes"),
        (Opts { shards: 5000, ..Opts::default() }, "engine.shards"),
        (Opts { max_body_bytes: 10, ..Opts::default() }, "business.max_body_bytes"),
        (Opts { max_body_bytes: 64 << 20, ..Opts::default() }, "business.max_body_bytes"),
        (Opts { request_timeout_ms: 5, ..Opts::default() }, "business.request_timeout_ms"),
    ];
    for (opts, key) in opts_cases {
        let config = write_config(dir.path(), &data, &opts);
        let (code, out, err) = run_cli(&["config", "check", "--config", cfg(&config)]);
        assert_eq!(code, 2, "bad {key}: {out}");
        assert!(err.contains(key), "stderr does not name {key}: {err}");
    }
    // Edits of the text for values the harness does not expose.
    let good = std::fs::read_to_string(write_config(dir.path(), &data, &Opts::default())).unwrap();
    let text_cases = [
        (good.replacen("listen = \"127.0.0.1:0\"", "listen = \"nowhere\"", 1), "business.listen"),
        (good.replace(TOKEN_SECRET, "short"), "mobile.token_secret"),
        (good.replacen("tier = \"basic\"", "tier = \"gold\"", 1), "clients[0].tier"),
        (good.replace("acme-key-0123456789abcdef", "short"), "clients[0].api_key"),
        (good.replace("other-key-0123456789abcdef", "acme-key-0123456789abcdef"), "clients[1].api_key"),
        (good.replace("id = \"other\"", "id = \"acme\""), "clients[1].id"),
        (good.replace("id = \"other\"", "id = \"no spaces\""), "clients[1].id"),
        (good.replace("messages_per_minute = 1000000", "messages_per_minute = 0"), "tiers.basic.messages_per_minute"),
        (good.replace("max_body_bytes = 65536", "max_body_bytes = \"big\""), "max_body_bytes"),
        (good.replace(&format!("[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{ADMIN_TOKEN}\"\n"), ""), "admin"),
        (good.replace(ADMIN_TOKEN, "short"), "admin.token"),
        (
            good.replace("id = \"other\"", "id = \"other\"\nwebhook_url = \"https://x.test/h\""),
            "clients[1].webhook_secret",
        ),
    ];
    let path = dir.path().join("edited.toml");
    for (text, key) in text_cases {
        assert_ne!(text, good, "the case for {key} changed nothing");
        std::fs::write(&path, &text).unwrap();
        let (code, out, err) = run_cli(&["config", "check", "--config", cfg(&path)]);
        assert_eq!(code, 2, "bad {key}: {out}");
        assert!(err.contains(key), "stderr does not name {key}: {err}");
    }
    // A missing file is an error that names the file.
    let missing = dir.path().join("nope.toml");
    let (code, _, err) = run_cli(&["config", "check", "--config", cfg(&missing)]);
    assert_eq!(code, 2);
    assert!(err.contains("nope.toml"), "{err}");
}

#[test]
fn serve_refuses_a_bad_config_naming_the_key() {
    let setup = Setup::new(&Opts { max_body_bytes: 10, ..Opts::default() });
    let (code, err) = serve_expecting_exit(&setup.config);
    assert_ne!(code, 0);
    assert!(err.contains("business.max_body_bytes"), "{err}");
    assert!(!setup.data_dir().exists(), "a refused start created the data dir");
}

/// docs/API.md: `serve` exits 1 whenever it cannot start, a bad config included.
#[test]
fn serve_exits_1_on_a_bad_config_as_documented() {
    let setup = Setup::new(&Opts { max_body_bytes: 10, ..Opts::default() });
    let (code, err) = serve_expecting_exit(&setup.config);
    assert_eq!(code, 1, "{err}");
}

// ------------------------------------------------------------------ token

fn decode_part(part: &str) -> Value {
    let bytes = B64.decode(part).unwrap_or_else(|e| panic!("{part:?} is not base64url without padding: {e}"));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{part:?} is not JSON: {e}"))
}

/// Checks the HS256 signature with the test secret, independently of the engine.
fn assert_signed(token: &str) {
    let (input, sig) = token.rsplit_once('.').unwrap();
    let mut mac = Hmac::<Sha256>::new_from_slice(TOKEN_SECRET.as_bytes()).unwrap();
    mac.update(input.as_bytes());
    let want = B64.encode(mac.finalize().into_bytes());
    assert_eq!(sig, want, "token is not signed with mobile.token_secret");
}

#[test]
fn token_prints_a_signed_jwt_for_the_user() {
    let setup = Setup::new(&Opts::default());
    let before = now_secs();
    let (code, out, err) = run_cli(&["token", "--config", cfg(&setup.config), "--user", "alice", "--ttl", "60"]);
    let after = now_secs();
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 1, "one line, the token: {out:?}");
    let token = lines[0].trim();
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "{token}");
    assert!(parts.iter().all(|p| !p.is_empty()), "{token}");
    let header = decode_part(parts[0]);
    assert_eq!(header["alg"], "HS256", "{header}");
    let payload = decode_part(parts[1]);
    assert_eq!(payload["sub"], "alice", "{payload}");
    let exp = payload["exp"].as_u64().expect("numeric exp");
    assert!(exp >= before + 60 && exp <= after + 60, "exp {exp} is not now+60 (now {before}..{after})");
    if let Some(iat) = payload.get("iat") {
        let iat = iat.as_u64().unwrap();
        assert!((before..=after).contains(&iat), "iat {iat}");
    }
    assert_signed(token);

    // The default lifetime is one day; users are arbitrary UTF-8 strings.
    let (code, out, err) = run_cli(&["token", "--config", cfg(&setup.config), "--user", "zoë 🚀"]);
    assert_eq!(code, 0, "{err}");
    let token = out.trim();
    let payload = decode_part(token.split('.').nth(1).unwrap());
    assert_eq!(payload["sub"], "zoë 🚀");
    let exp = payload["exp"].as_u64().unwrap();
    let now = now_secs();
    assert!(exp.abs_diff(now + 86_400) <= 5, "default exp {exp} vs now {now}");
    assert_signed(token);

    // Two users get two different tokens.
    let (_, bob, _) = run_cli(&["token", "--config", cfg(&setup.config), "--user", "bob"]);
    assert_ne!(bob.trim(), token);
}

#[test]
fn token_refuses_bad_users_and_bad_configs() {
    let setup = Setup::new(&Opts::default());
    let long = "u".repeat(257);
    for user in ["", long.as_str()] {
        let (code, out, err) = run_cli(&["token", "--config", cfg(&setup.config), "--user", user]);
        assert_ne!(code, 0, "user of {} bytes accepted: {out}", user.len());
        assert!(out.trim().is_empty(), "printed a token anyway: {out}");
        assert!(err.contains("--user"), "{err}");
    }
    let ok = "u".repeat(256);
    let (code, out, _) = run_cli(&["token", "--config", cfg(&setup.config), "--user", &ok]);
    assert_eq!(code, 0);
    assert_eq!(decode_part(out.trim().split('.').nth(1).unwrap())["sub"], ok.as_str());
    // No --user: a usage error.
    let (code, _, err) = run_cli(&["token", "--config", cfg(&setup.config)]);
    assert_ne!(code, 0);
    assert!(err.contains("--user"), "{err}");
    // A config whose secret is too short mints nothing.
    let text = std::fs::read_to_string(&setup.config).unwrap().replace(TOKEN_SECRET, "short");
    std::fs::write(&setup.config, text).unwrap();
    let (code, out, err) = run_cli(&["token", "--config", cfg(&setup.config), "--user", "a"]);
    assert_ne!(code, 0);
    assert!(out.trim().is_empty(), "{out}");
    assert!(err.contains("token_secret"), "{err}");
}

// --------------------------------------------------------- journal verify

/// Parses "journal OK: S shards, R records, M messages (U unsettled), T torn tails".
fn verify_summary(out: &str) -> (u64, u64, u64, u64, u64) {
    let line =
        out.lines().find(|l| l.starts_with("journal OK:")).unwrap_or_else(|| panic!("no summary line in {out:?}"));
    let nums: Vec<u64> =
        line.split(|c: char| !c.is_ascii_digit()).filter(|s| !s.is_empty()).map(|s| s.parse().unwrap()).collect();
    assert_eq!(nums.len(), 5, "{line}");
    (nums[0], nums[1], nums[2], nums[3], nums[4])
}

#[test]
fn journal_verify_reports_the_messages_after_a_clean_stop() {
    let setup = Setup::new(&Opts::default());
    let engine = setup.start();
    let mut c = engine.client();
    for i in 0..20 {
        let r = c.send(&format!("v-{i}"), "hello");
        assert_eq!(r.status, 202);
    }
    let batch = json!({"messages": (0..5).map(|i| json!({"to": format!("w-{i}"), "body": "b"})).collect::<Vec<_>>()});
    let r = c.request("POST", "/v1/messages/batch", Some(API_KEY), Some(&batch.to_string()));
    assert_eq!(r.status, 202);
    // Refused messages are not journaled.
    let r = c.request("POST", "/v1/messages", Some(API_KEY), Some(r#"{"to":"x"}"#));
    assert_eq!(r.status, 400);
    drop(c);
    assert_eq!(engine.terminate(), Some(0));

    let (code, out, err) = run_cli(&["journal", "verify", "--config", cfg(&setup.config)]);
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    let (shards, records, messages, unsettled, torn) = verify_summary(&out);
    assert_eq!(shards, 2, "{out}");
    assert_eq!(messages, 25, "{out}");
    assert_eq!(unsettled, 25, "nothing was delivered: {out}");
    assert!(records >= 25, "{out}");
    assert_eq!(torn, 0, "a SIGTERM stop leaves no torn tail: {out}");
    // One line per shard, and their message counts add up.
    let per_shard: u64 = (0..2)
        .map(|s| {
            let line = out
                .lines()
                .find(|l| l.starts_with(&format!("shard {s}:")))
                .unwrap_or_else(|| panic!("no line for shard {s}: {out}"));
            // "shard 0: 1 segments, 13 records, 12 messages (12 unsettled), next seq 12: clean"
            line.split(", ")
                .find(|p| p.contains(" messages ("))
                .and_then(|p| p.split(' ').next())
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("no message count in {line:?}"))
        })
        .sum();
    assert_eq!(per_shard, 25, "{out}");

    // Verify is read-only: a restart sees the same messages, and more
    // messages raise the count.
    let engine = setup.start();
    assert_eq!(engine.client().send("v-0", "one more").status, 202);
    assert_eq!(engine.terminate(), Some(0));
    let (code, out, err) = run_cli(&["journal", "verify", "--config", cfg(&setup.config)]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(verify_summary(&out).2, 26, "{out}");
}

#[test]
fn journal_verify_on_an_empty_and_on_a_missing_data_dir() {
    let setup = Setup::new(&Opts::default());
    // Never started: not a data dir.
    let (code, out, err) = run_cli(&["journal", "verify", "--config", cfg(&setup.config)]);
    assert_ne!(code, 0, "{out}");
    assert!(err.contains("not an esh3ar data dir"), "{err}");
    // Started and stopped without messages: OK with zero.
    let engine = setup.start();
    assert_eq!(engine.terminate(), Some(0));
    let (code, out, err) = run_cli(&["journal", "verify", "--config", cfg(&setup.config)]);
    assert_eq!(code, 0, "{err}");
    let (shards, _, messages, unsettled, torn) = verify_summary(&out);
    assert_eq!((shards, messages, unsettled, torn), (2, 0, 0, 0), "{out}");
}

// ---------------------------------------------------- serve refusals

#[test]
fn serve_refuses_a_data_dir_made_with_another_shard_count() {
    let setup = Setup::new(&Opts::default()); // 2 shards
    let engine = setup.start();
    let id = engine.client().send("sam", "kept").json()["id"].as_str().unwrap().to_owned();
    assert_eq!(engine.terminate(), Some(0));

    let other = tempfile::tempdir().unwrap();
    let config3 = write_config(other.path(), &setup.data_dir(), &Opts { shards: 3, ..Opts::default() });
    let (code, err) = serve_expecting_exit(&config3);
    assert_eq!(code, 1, "started on a 2-shard data dir with 3 shards, or wrong exit code");
    assert!(err.contains("2 shards"), "message should name the dir's count: {err}");
    assert!(err.contains("engine.shards"), "message should name the key: {err}");
    assert!(!setup.data_dir().join("shard-2").exists(), "the refused start touched the data dir");

    // Nothing was damaged: the right count starts and finds the message.
    let engine = setup.start();
    assert_eq!(engine.client().get_status(&id).status, 200);
}

#[test]
fn a_second_engine_on_the_same_data_dir_is_refused() {
    let setup = Setup::new(&Opts::default());
    let engine = setup.start();
    assert_eq!(engine.client().send("tom", "first").status, 202);

    let (code, err) = serve_expecting_exit(&setup.config);
    assert_eq!(code, 1, "a second engine started on a locked data dir, or wrong exit code");
    assert!(err.contains("in use"), "{err}");
    assert!(err.contains(&setup.data_dir().display().to_string()), "message should name the dir: {err}");

    // Also through another config pointing at the same dir.
    let other = tempfile::tempdir().unwrap();
    let config2 = write_config(other.path(), &setup.data_dir(), &Opts::default());
    let (code, err) = serve_expecting_exit(&config2);
    assert_eq!(code, 1);
    assert!(err.contains("in use"), "{err}");

    // The first engine is unaffected.
    let mut c = engine.client();
    let r = c.send("tom", "second");
    assert_eq!(r.status, 202);
    let id = r.json()["id"].as_str().unwrap().to_owned();
    assert_eq!(c.get_status(&id).status, 200);
    drop(c);
    // Once the first one stopped, the dir is free again.
    assert_eq!(engine.terminate(), Some(0));
    let engine = setup.start();
    assert_eq!(engine.client().get_status(&id).status, 200);
}
