//! Startup, graceful shutdown and restart of the real binary.
mod common;
use common::*;

#[test]
fn accepted_message_survives_graceful_restart() {
    let setup = Setup::new(&Opts::default());
    let engine = setup.start();
    let mut c = engine.client();
    let r = c.send("alice", "hello");
    assert_eq!(r.status, 202, "{:?}", String::from_utf8_lossy(&r.body));
    let id = r.json()["id"].as_str().unwrap().to_owned();
    assert!(id.len() <= 32 && id.bytes().all(|b| b.is_ascii_alphanumeric()));
    drop(c);
    assert_eq!(engine.terminate(), Some(0), "SIGTERM must exit 0");
    let engine = setup.start();
    let r = engine.client().get_status(&id);
    assert_eq!(r.status, 200);
    let j = r.json();
    assert_eq!(j["to"], "alice");
    assert_eq!(j["status"], "accepted");
}
