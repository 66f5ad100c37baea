//! Fail fast, never a zombie: a panic on a shard thread aborts the whole
//! process at once (logged), and a restart recovers every acknowledged
//! message from the journal. The panic is provoked through the test hook
//! `ESH3AR_TEST_PANIC_ON_BODY` (docs/ARCHITECTURE.md, "Test hooks"), in the
//! spirit of RocksDB's whitebox crash test: a crash at a chosen code point.

mod common;

use std::time::{Duration, Instant};

use common::*;

const MAGIC: &str = "please-panic-now-0f3c";

#[test]
fn a_shard_panic_aborts_the_process_and_a_restart_loses_nothing() {
    let setup = Setup::new(&Opts::default());
    let mut engine = Engine::try_start_with_env(&setup.config, &[("ESH3AR_TEST_PANIC_ON_BODY", MAGIC)])
        .unwrap_or_else(|e| panic!("engine did not start: {e}"));
    let mut c = engine.client();
    // Users on both shards, so both journals hold acknowledged messages.
    let mut acked = Vec::new();
    for i in 0..100 {
        let r = c.send(&format!("user-{i}"), &format!("message {i}"));
        assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
        acked.push(r.json()["id"].as_str().unwrap().to_owned());
    }
    let shards_used: std::collections::HashSet<_> = acked.iter().map(|id| id[..4].to_owned()).collect();
    assert!(shards_used.len() >= 2, "messages landed on one shard only: {shards_used:?}");

    // The magic body: the recipient's home shard panics while appending it.
    let sent = Instant::now();
    c.send_raw(&Client::request_bytes(
        "POST",
        "/v1/messages",
        Some(API_KEY),
        Some(&serde_json::json!({"to": "victim", "body": MAGIC}).to_string()),
    ));
    let status = engine.wait_exit(Duration::from_secs(1)).expect("the process exits within 1 s of the panic");
    assert!(!status.success(), "a panic must not look like a clean stop: {status:?}");
    eprintln!("exited {:?} after the magic message: {status:?}", sent.elapsed());
    assert!(c.read_response().is_err(), "no answer for the message that killed the shard");
    std::thread::sleep(Duration::from_millis(100));
    let stderr = engine.stderr_lines().join("\n");
    assert!(stderr.contains("panic") && stderr.contains("ESH3AR_TEST_PANIC_ON_BODY"), "panic not logged: {stderr}");

    // Restart without the hook: every acknowledged message is there.
    let engine = setup.start();
    let mut c = engine.client();
    for id in &acked {
        let r = c.get_status(id);
        assert_eq!(r.status, 200, "acknowledged message {id} lost: {}", String::from_utf8_lossy(&r.body));
    }
    assert_eq!(c.send("after-restart", "ok").status, 202);
    assert_eq!(engine.terminate(), Some(0));
}
