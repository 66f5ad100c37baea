//! The limits that constrain each other (`esh3ar_shards::limits`), driven
//! at their edges against the real binary: a request body at the documented
//! maximum is journaled and delivered; one byte more is refused without
//! harming the engine.

mod common;

use std::time::{Duration, Instant};

use common::*;

const BODY_MAX: usize = 4 << 20;

/// A 4 MiB body limit in a segment that holds it. The body cache (1 MiB)
/// is smaller than such a body, so delivery reads it back from the journal
/// (an O_DIRECT read of the whole record), the path a backlog takes.
fn big_body_setup() -> Setup {
    Setup::new(&Opts {
        max_body_bytes: BODY_MAX,
        segment_bytes: 16 << 20,
        extra_engine: "body_cache_bytes = 1048576".into(),
        ..Opts::default()
    })
}

fn readyz(engine: &Engine) -> u16 {
    Client::connect(engine.admin).request("GET", "/readyz", None, None).status
}

/// The request body of a message to `to` whose JSON is exactly `total` bytes.
fn body_of_len(to: &str, total: usize) -> String {
    let frame = format!(r#"{{"to":"{to}","body":""}}"#);
    let body = format!(r#"{{"to":"{to}","body":"{}"}}"#, "x".repeat(total - frame.len()));
    assert_eq!(body.len(), total);
    body
}

/// Regression: a body at `business.max_body_bytes = 4194304` once made the
/// journal record too large, panicked the home shard and left a zombie
/// engine. Now it is accepted, journaled and delivered to a phone.
#[test]
fn body_at_the_documented_maximum_is_accepted_and_delivered() {
    let setup = big_body_setup();
    let engine = setup.start();
    let mut phone = Phone::connect(engine.mobile, &token(&setup.config, "big", 3600)).expect("phone connects");
    let mut c = engine.client();
    let body = body_of_len("big", BODY_MAX);
    let r = c.request("POST", "/v1/messages", Some(API_KEY), Some(&body));
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    let id = r.json()["id"].as_str().unwrap().to_owned();
    let frame = phone.recv(Duration::from_secs(20)).expect("the 4 MiB message is delivered");
    assert_eq!(frame["id"], id.as_str());
    assert_eq!(frame["body"].as_str().unwrap().len(), BODY_MAX - r#"{"to":"big","body":""}"#.len());
    phone.ack(&id);
    // Its status is journaled like any other message.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = c.get_status(&id);
        assert_eq!(s.status, 200);
        if s.json()["status"] == "acked" {
            break;
        }
        assert!(Instant::now() < deadline, "never acked: {}", String::from_utf8_lossy(&s.body));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(engine.terminate(), Some(0));
}

/// One byte over the limit gets `413`, and a thousand of those in a row
/// change nothing: other users keep being served, `/readyz` stays 200 and
/// SIGTERM still stops the engine promptly with status 0.
#[test]
fn over_limit_requests_are_refused_and_harmless() {
    let setup = big_body_setup();
    let engine = setup.start();
    let over = Client::request_bytes("POST", "/v1/messages", Some(API_KEY), Some(&body_of_len("big", BODY_MAX + 1)));
    // The engine refuses on the head (Content-Length) and closes, so the
    // test sends the head and as much of the body as the socket takes.
    let head_end = over.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let mut c = engine.client();
    c.send_raw(&over[..head_end]);
    let _ = std::io::Write::write_all(&mut c.stream, &over[head_end..]);
    let r = c.read_response().expect("an answer to an over-limit body");
    assert_eq!((r.status, r.error_code().as_str()), (413, "payload_too_large"));
    let mut ok = engine.client();
    for i in 0..1000 {
        let mut c = engine.client();
        c.send_raw(&over[..head_end]);
        let r = c.read_response().expect("an answer to an over-limit head");
        assert_eq!(r.status, 413, "request {i}");
        if i % 100 == 0 {
            assert_eq!(ok.send(&format!("user-{i}"), "still here").status, 202, "request {i}");
            assert_eq!(readyz(&engine), 200);
        }
    }
    assert_eq!(ok.send("after", "still here").status, 202);
    assert_eq!(readyz(&engine), 200);
    let started = Instant::now();
    assert_eq!(engine.terminate(), Some(0));
    assert!(started.elapsed() < Duration::from_secs(5), "SIGTERM took {:?}", started.elapsed());
}
