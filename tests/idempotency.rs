//! Idempotent sends against the real binary: a retry with the same
//! `Idempotency-Key` gets the first answer again and stores nothing new,
//! also after a clean restart and after `kill -9` right after the 202.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

fn keyed(c: &mut Client, path: &str, key: &str, client_key: &str, body: &str) -> Response {
    let mut r = Client::request_bytes("POST", path, Some(client_key), Some(body));
    let head_end = r.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let header = format!("\r\nIdempotency-Key: {key}");
    r.splice(head_end..head_end, header.into_bytes());
    c.send_raw(&r);
    c.read_response().expect("response")
}

fn dump_count(setup: &Setup, body: &str) -> usize {
    let (code, out, err) = run_cli(&["journal", "dump", "--config", setup.config.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    out.lines().filter(|l| serde_json::from_str::<Value>(l).unwrap()["body"] == body).count()
}

#[test]
fn a_retry_gets_the_first_answer_and_stores_nothing_new() {
    let setup = Setup::new(&Opts::default());
    let engine = setup.start();
    let mut c = engine.client();
    let body = r#"{"to":"ida","body":"once"}"#;
    let first = keyed(&mut c, "/v1/messages", "order-1", API_KEY, body);
    assert_eq!(first.status, 202);
    for _ in 0..3 {
        let again = keyed(&mut c, "/v1/messages", "order-1", API_KEY, body);
        assert_eq!((again.status, again.json()), (202, first.json()), "the same answer");
        assert!(again.header("ratelimit-limit").is_some());
    }
    // The same key with another body: 422, nothing stored.
    let other = keyed(&mut c, "/v1/messages", "order-1", API_KEY, r#"{"to":"ida","body":"twice"}"#);
    assert_eq!((other.status, other.error_code().as_str()), (422, "idempotency_key_reused"));
    // Another client may use the same key.
    let theirs = keyed(&mut c, "/v1/messages", "order-1", OTHER_KEY, body);
    assert_eq!(theirs.status, 202);
    assert_ne!(theirs.json()["id"], first.json()["id"]);
    // A batch too, on recipients of both shards.
    let batch = r#"{"messages":[{"to":"a1","body":"b"},{"to":"a2","body":"b"},{"to":"a3","body":"b"}]}"#;
    let b1 = keyed(&mut c, "/v1/messages/batch", "batch-1", API_KEY, batch);
    let b2 = keyed(&mut c, "/v1/messages/batch", "batch-1", API_KEY, batch);
    assert_eq!((b1.status, b2.status), (202, 202));
    assert_eq!(b1.json(), b2.json());
    // Bad keys: 400 naming the header.
    for bad in ["", "has space", &"k".repeat(256)] {
        let r = keyed(&mut c, "/v1/messages", bad, API_KEY, body);
        assert_eq!((r.status, r.error_code().as_str()), (400, "invalid_field"), "{bad:?}");
        assert!(String::from_utf8_lossy(&r.body).contains("Idempotency-Key"));
    }
    // A refused request is not remembered: a retry can succeed.
    let bad_body = r#"{"to":"","body":"x"}"#;
    assert_eq!(keyed(&mut c, "/v1/messages", "order-2", API_KEY, bad_body).status, 400);
    assert_eq!(keyed(&mut c, "/v1/messages", "order-2", API_KEY, body).status, 202);
    assert_eq!(engine.terminate(), Some(0));
    assert_eq!(
        dump_count(&setup, "once"),
        3,
        "ida's message once per client key use (acme order-1, other order-1, acme order-2)"
    );
    assert_eq!(dump_count(&setup, "b"), 3, "the batch stored once");
}

#[test]
fn keys_survive_a_clean_restart_and_kill_9_right_after_the_202() {
    let setup = Setup::new(&Opts::default());
    let body = r#"{"to":"kim","body":"durable key"}"#;
    let engine = setup.start();
    let first = keyed(&mut engine.client(), "/v1/messages", "k-restart", API_KEY, body);
    assert_eq!(first.status, 202);
    assert_eq!(engine.terminate(), Some(0));
    let engine = setup.start();
    let again = keyed(&mut engine.client(), "/v1/messages", "k-restart", API_KEY, body);
    assert_eq!(again.json(), first.json(), "after a clean restart");
    // kill -9 right after each 202, many keys from many connections.
    let mut answers = Vec::new();
    let mut c = engine.client();
    for i in 0..50 {
        let b = format!(r#"{{"to":"u{i}","body":"crash {i}"}}"#);
        let r = keyed(&mut c, "/v1/messages", &format!("k{i}"), API_KEY, &b);
        assert_eq!(r.status, 202);
        answers.push((i, b, r.json()));
    }
    engine.kill9();
    let engine = setup.start();
    let mut c = engine.client();
    for (i, b, first) in &answers {
        let r = keyed(&mut c, "/v1/messages", &format!("k{i}"), API_KEY, b);
        assert_eq!((r.status, &r.json()), (202, first), "key k{i} forgotten by kill -9");
    }
    assert_eq!(engine.terminate(), Some(0));
    assert_eq!(dump_count(&setup, "crash 7"), 1);
}

#[test]
fn a_key_is_usable_again_after_the_window() {
    let setup = Setup::new(&Opts { extra_toml: String::new(), ..Opts::default() });
    let text = std::fs::read_to_string(&setup.config).unwrap();
    let text = text.replace("[business]\n", "[business]\nidempotency_window_seconds = 1\n");
    std::fs::write(&setup.config, text).unwrap();
    let engine = setup.start();
    let mut c = engine.client();
    let body = r#"{"to":"win","body":"w"}"#;
    let first = keyed(&mut c, "/v1/messages", "w-1", API_KEY, body);
    assert_eq!(keyed(&mut c, "/v1/messages", "w-1", API_KEY, body).json(), first.json());
    std::thread::sleep(Duration::from_millis(2_500));
    let later = keyed(&mut c, "/v1/messages", "w-1", API_KEY, body);
    assert_eq!(later.status, 202);
    assert_ne!(later.json()["id"], first.json()["id"], "a new message after the window");
}
