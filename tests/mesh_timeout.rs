//! Every cross-shard wait has a bound: a home shard that does not answer
//! within `engine.mesh_reply_timeout_ms` gets the client a `503
//! shard_timeout`, and, as docs/API.md says, the outcome of such a send is
//! unknown: here the message is accepted after all and delivered. The slow
//! answer is provoked by the test hook `ESH3AR_TEST_SLOW_REPLY_ON_BODY`.

mod common;

use std::time::{Duration, Instant};

use common::*;

const SLOW: &str = "answer-me-slowly-7d1e";

#[test]
fn a_home_shard_that_answers_late_gets_a_bounded_503_and_the_outcome_is_unknown() {
    let setup = Setup::new(&Opts { extra_engine: "mesh_reply_timeout_ms = 300".into(), ..Opts::default() });
    let engine = Engine::try_start_with_env(&setup.config, &[("ESH3AR_TEST_SLOW_REPLY_ON_BODY", SLOW)])
        .unwrap_or_else(|e| panic!("engine did not start: {e}"));
    let mut phone = Phone::connect(engine.mobile, &token(&setup.config, "slow-user", 3600)).expect("phone");
    // The kernel spreads connections over the shards: a request that lands
    // on the user's home shard is appended locally (no mesh, 202); one
    // that lands on the other shard waits for the slow answer.
    let mut local = 0;
    let mut timed_out = None;
    for _ in 0..50 {
        let mut c = engine.client();
        let started = Instant::now();
        let r = c.send("slow-user", SLOW);
        match r.status {
            202 => local += 1,
            503 => {
                timed_out = Some((r, started.elapsed()));
                break;
            }
            s => panic!("unexpected {s}: {}", String::from_utf8_lossy(&r.body)),
        }
    }
    let (r, waited) = timed_out.expect("some connection landed on the other shard");
    assert_eq!(r.error_code(), "shard_timeout", "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("retry-after"), Some("1"));
    assert!(waited >= Duration::from_millis(300), "answered before the bound: {waited:?}");
    assert!(waited < Duration::from_millis(1200), "the bound did not hold: {waited:?}");
    // Outcome unknown, not refused: the home shard did journal it, and the
    // phone gets it (plus the ones appended locally).
    let frames = phone.recv_n(local + 1, Duration::from_secs(5));
    assert!(frames.iter().all(|f| f["body"] == SLOW));
    // The engine is unharmed.
    assert_eq!(engine.client().send("someone-else", "fine").status, 202);
    assert_eq!(engine.terminate(), Some(0));
}
