//! Whitebox faults in the real binary, through the storage seam's test hook
//! `ESH3AR_TEST_STORAGE_FAULT` (RocksDB `db_crashtest.py` whitebox mode;
//! "fsyncgate": a failed fdatasync is never retried and trusted).
//!
//! - The Nth fdatasync or write fails: the shard answers `503
//!   storage_unavailable` from then on and never a 202 it cannot keep; after
//!   a restart every message that got a 202 is there.
//! - The Nth write is torn (half of its blocks reach the disk) and the
//!   process dies: the restart cuts the torn commit into a quarantine file
//!   and every message that got a 202 is there.
//!
//! One test function: the hook is an environment variable of this process,
//! inherited by the engines it starts, so the cases run one after another.

mod common;

use std::time::Duration;

use common::*;

const HOOK: &str = "ESH3AR_TEST_STORAGE_FAULT";

fn start_with_fault(setup: &Setup, spec: Option<&str>) -> Engine {
    match spec {
        Some(s) => std::env::set_var(HOOK, s),
        None => std::env::remove_var(HOOK),
    }
    let engine = setup.start();
    std::env::remove_var(HOOK);
    engine
}

/// Sends one message at a time; returns the 202 ids, and the first refusal.
fn send_until_refused(engine: &Engine, n: usize, body_len: usize) -> (Vec<String>, Option<(u16, String)>) {
    let mut ids = Vec::new();
    let mut c = engine.client();
    for i in 0..n {
        let body = format!("{i}-{}", "f".repeat(body_len));
        let json = serde_json::json!({"to": "faulty-user", "body": body}).to_string();
        c.send_raw(&Client::request_bytes("POST", "/v1/messages", Some(API_KEY), Some(&json)));
        match c.read_response() {
            Ok(r) if r.status == 202 => ids.push(r.json()["id"].as_str().unwrap().to_owned()),
            Ok(r) => return (ids, Some((r.status, r.error_code()))),
            Err(_) => return (ids, None), // the process died
        }
    }
    (ids, None)
}

fn assert_all_found(setup: &Setup, ids: &[String], case: &str) {
    let engine = start_with_fault(setup, None);
    let mut c = engine.client();
    for id in ids {
        assert_eq!(c.get_status(id).status, 200, "{case}: acknowledged message {id} lost");
    }
    assert_eq!(engine.terminate(), Some(0));
}

fn wait_exit(engine: &mut Engine, within: Duration) -> Option<std::process::ExitStatus> {
    let deadline = std::time::Instant::now() + within;
    while std::time::Instant::now() < deadline {
        if let Ok(Some(st)) = engine.child.try_wait() {
            return Some(st);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

fn failing_storage(spec: &str, op: &str) {
    let setup = Setup::new(&Opts { shards: 1, ..Opts::default() });
    let engine = start_with_fault(&setup, Some(spec));
    let (ids, refusal) = send_until_refused(&engine, 200, 100);
    let (status, code) = refusal.unwrap_or_else(|| panic!("{spec}: the injected {op} failure was never seen"));
    assert_eq!((status, code.as_str()), (503, "storage_unavailable"), "{spec}");
    assert!(!ids.is_empty(), "{spec}: messages before the fault were acknowledged");
    // Nothing is acknowledged any more: the journal does not retry.
    let (more, refusal) = send_until_refused(&engine, 3, 10);
    assert!(more.is_empty(), "{spec}: a 202 after the journal failed");
    assert_eq!(refusal.map(|r| r.0), Some(503));
    let logged = engine.wait_for_stderr(Duration::from_secs(5), |l| l.contains("journal failed"));
    assert!(logged.is_ok(), "{spec}: the failure is logged: {logged:?}");
    engine.kill9();
    assert_all_found(&setup, &ids, spec);
}

fn torn_write_then_death() {
    let setup = Setup::new(&Opts { shards: 1, ..Opts::default() });
    // 12 KiB bodies: every commit spans several blocks, so half of one is a torn commit.
    let mut engine = start_with_fault(&setup, Some("torn:40"));
    let (ids, refusal) = send_until_refused(&engine, 200, 12 * 1024);
    assert!(refusal.is_none(), "the torn write kills the process instead of answering: {refusal:?}");
    assert!(ids.len() >= 30, "messages before the torn write were acknowledged: {}", ids.len());
    let status = wait_exit(&mut engine, Duration::from_secs(5)).expect("the process died");
    assert!(!status.success(), "{status:?}");
    let shard = setup.data_dir().join("shard-0");
    let (code, out, _) = run_cli(&["journal", "verify", "--config", setup.config.to_str().unwrap()]);
    assert_eq!(code, 0, "a torn last commit is not corruption: {out}");
    assert!(out.contains("torn last commit"), "{out}");
    assert_all_found(&setup, &ids, "torn write");
    let quarantined = std::fs::read_dir(&shard)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().contains(".quarantine-"))
        .count();
    assert_eq!(quarantined, 1, "the torn commit was moved to a quarantine file");
}

#[test]
fn storage_faults_never_lose_an_acknowledged_message() {
    failing_storage("fdatasync:25", "fdatasync");
    failing_storage("write:25", "write");
    torn_write_then_death();
}
