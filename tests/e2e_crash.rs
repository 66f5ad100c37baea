//! End-to-end durability: phones connect, receive, ack and disconnect
//! while business clients send, and the engine is killed with SIGKILL
//! several times. Afterwards every message that got a 202 must have reached
//! its user (Jepsen's checker invariant: duplicates allowed, loss never).
//! The duplicate count is reported.

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::crash::*;
use common::*;
use rand::SeedableRng;

const USERS: usize = 12;

fn user(i: usize) -> String {
    format!("phone-{i}")
}

/// A phone that keeps reconnecting to whatever engine runs, receives,
/// acks most messages, and disconnects at random.
fn phone_loop(
    i: usize,
    token: String,
    addr: Arc<Mutex<Option<SocketAddr>>>,
    stop: Arc<AtomicBool>,
    obs: Arc<Mutex<Observed>>,
) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(i as u64);
    while !stop.load(Ordering::Relaxed) {
        let Some(a) = *addr.lock().unwrap() else {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        };
        let Ok(stream) = std::net::TcpStream::connect(a) else {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        };
        drop(stream);
        let Ok(mut p) = std::panic::catch_unwind(|| Phone::connect(a, &token))
            .unwrap_or(Err(Refused { status: 0, body: String::new() }))
        else {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        };
        phone_session(&mut p, &user(i), &mut rng, &stop, &obs);
    }
}

#[test]
fn every_acknowledged_message_reaches_its_user_across_kill_minus_nine() {
    let setup = Setup::new(&Opts { shards: 2, segment_bytes: 256 * 1024, ..Opts::default() });
    let obs = Arc::new(Mutex::new(Observed::default()));
    let mobile_addr: Arc<Mutex<Option<SocketAddr>>> = Arc::new(Mutex::new(None));
    let stop_phones = Arc::new(AtomicBool::new(false));
    let tokens: Vec<String> = (0..USERS).map(|i| token(&setup.config, &user(i), 3600)).collect();
    let phones: Vec<_> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, tok)| {
            let (a, s, o) = (mobile_addr.clone(), stop_phones.clone(), obs.clone());
            std::thread::spawn(move || phone_loop(i, tok, a, s, o))
        })
        .collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for _round in 0..4 {
        let engine = setup.start();
        *mobile_addr.lock().unwrap() = Some(engine.mobile);
        send_then_kill(engine, user, USERS, &obs, &mut rng);
        *mobile_addr.lock().unwrap() = None;
    }
    // Final run: phones drain everything still pending.
    let engine = setup.start();
    *mobile_addr.lock().unwrap() = Some(engine.mobile);
    let missing = wait_for_all(&obs, Duration::from_secs(60));
    stop_phones.store(true, Ordering::Relaxed);
    for p in phones {
        p.join().unwrap();
    }
    let o = obs.lock().unwrap();
    let unique: HashSet<&(String, String)> = o.received.iter().collect();
    eprintln!(
        "{} messages acknowledged (202), {} receipts, {} unique, {} duplicates, {} missing",
        o.acked.len(),
        o.received.len(),
        unique.len(),
        o.received.len() - unique.len(),
        missing.len()
    );
    assert!(o.acked.len() > 500, "too little traffic to mean anything: {}", o.acked.len());
    assert!(missing.is_empty(), "acknowledged messages never delivered: {:?}", &missing[..missing.len().min(10)]);
    assert_eq!(o.foreign(), 0, "a message reached the wrong user");
}
