//! Many connections against the real binary: ten thousand business clients
//! with a request in flight each are all accepted (a full cross-shard
//! channel makes the accepting connection wait, it is no reason for a
//! `503`), and ten thousand connections opened and closed leave nothing
//! behind (no waker, no task, no memory).

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::*;

const CONNECTIONS: usize = 10_000;
const THREADS: usize = 10;
const ROUNDS: usize = 3;

/// Writes `requests[i]` on `conns[i]` for every i, then reads every answer:
/// each connection has exactly one request in flight, all at once.
fn round_trip(conns: &mut [Client], requests: &[Vec<u8>]) -> Vec<Response> {
    for (c, r) in conns.iter_mut().zip(requests) {
        c.send_raw(r);
    }
    conns.iter_mut().map(|c| c.read_response().unwrap_or_else(|e| panic!("no answer: {e}"))).collect()
}

/// Closed loop, 10,000 connections, one request in flight on each, 2
/// shards, several rounds: zero answers other than 202, and every id is
/// found afterwards. (Before: about a third of the answers were
/// `503 overloaded`, from `try_send` on a full mesh channel.)
#[test]
fn ten_thousand_connections_with_a_request_in_flight_are_all_accepted() {
    let nofile = raise_nofile_limit();
    assert!(nofile as usize >= CONNECTIONS + 2_000, "open-files limit {nofile} is too low for this test");
    let setup = Setup::new(&Opts {
        shards: 2,
        segment_bytes: 64 << 20,
        extra_engine: "memory_limit_bytes = 4294967296".into(),
        ..Opts::default()
    });
    let engine = setup.start();
    let started = Instant::now();
    let per_thread = CONNECTIONS / THREADS;
    let all_connected = Arc::new(Barrier::new(THREADS));
    let non_202 = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let (addr, all_connected, non_202) = (engine.business, all_connected.clone(), non_202.clone());
            std::thread::spawn(move || {
                let mut conns: Vec<Client> = (0..per_thread).map(|_| Client::connect(addr)).collect();
                all_connected.wait(); // 10,000 connections open at once
                let mut ids = Vec::new();
                for round in 0..ROUNDS {
                    let requests: Vec<Vec<u8>> = (0..per_thread)
                        .map(|i| {
                            // Recipients on both shards: half the appends cross the mesh.
                            let body = format!(r#"{{"to":"user-{t}-{i}","body":"round {round}"}}"#);
                            Client::request_bytes("POST", "/v1/messages", Some(API_KEY), Some(&body))
                        })
                        .collect();
                    for r in round_trip(&mut conns, &requests) {
                        if r.status == 202 {
                            ids.push(r.json()["id"].as_str().unwrap().to_owned());
                        } else {
                            non_202.fetch_add(1, Ordering::Relaxed);
                            eprintln!("non-202: {} {}", r.status, String::from_utf8_lossy(&r.body));
                        }
                    }
                }
                // Every accepted id is found, again one request in flight per connection.
                let mut missing = 0;
                for chunk in ids.chunks(per_thread) {
                    let requests: Vec<Vec<u8>> = chunk
                        .iter()
                        .map(|id| Client::request_bytes("GET", &format!("/v1/messages/{id}"), Some(API_KEY), None))
                        .collect();
                    let answers = round_trip(&mut conns[..chunk.len()], &requests);
                    missing += answers.iter().filter(|r| r.status != 200).count();
                }
                (ids.len(), missing)
            })
        })
        .collect();
    let (mut accepted, mut missing) = (0, 0);
    for t in threads {
        let (a, m) = t.join().expect("client thread");
        accepted += a;
        missing += m;
    }
    let elapsed = started.elapsed();
    eprintln!(
        "{CONNECTIONS} connections x {ROUNDS} rounds: {accepted} accepted, {} non-202, {missing} not found, {elapsed:?}",
        non_202.load(Ordering::Relaxed)
    );
    assert_eq!(non_202.load(Ordering::Relaxed), 0, "every request must be accepted");
    assert_eq!(accepted, CONNECTIONS * ROUNDS);
    assert_eq!(missing, 0, "every accepted id must be found");
    assert_eq!(engine.terminate(), Some(0));
}

/// Opens `n` connections at once, makes one request on each (so each
/// connection also goes idle and waits for shutdown), then closes them all.
fn churn(addr: std::net::SocketAddr, n: usize) {
    let mut conns: Vec<Client> = (0..n).map(|_| Client::connect(addr)).collect();
    let request = Client::request_bytes("GET", "/v1/messages/0000000000000000", Some(API_KEY), None);
    let requests = vec![request; n];
    for r in round_trip(&mut conns, &requests) {
        assert_eq!(r.status, 404);
    }
}

/// 10,000 connections opened and closed, in batches of 1,000 open at once:
/// the engine's memory returns to its baseline. A connection that ended
/// used to leave its waker (and so its task's allocation, a few KiB) in the
/// shard's shutdown list: 10,000 of them grew RSS by tens of MiB. The
/// tolerance, 8 MiB, is the allocator's slack (glibc keeps freed pages in
/// its per-thread arenas) well under that leak; the baseline is taken after
/// two warm-up batches of the same shape, so buffers and arenas are already
/// at their working size.
#[test]
fn ten_thousand_connections_opened_and_closed_leave_memory_at_its_baseline() {
    raise_nofile_limit();
    let setup = Setup::new(&Opts::default());
    let engine = setup.start();
    let pid = engine.child.id();
    for _ in 0..2 {
        churn(engine.business, 1000);
    }
    std::thread::sleep(Duration::from_millis(300));
    let baseline = rss_bytes(pid).expect("engine RSS");
    for _ in 0..10 {
        churn(engine.business, 1000);
    }
    std::thread::sleep(Duration::from_millis(300));
    let after = rss_bytes(pid).expect("engine RSS");
    let grown = after.saturating_sub(baseline);
    eprintln!(
        "RSS baseline {} KiB, after 10,000 connections {} KiB (+{} KiB)",
        baseline >> 10,
        after >> 10,
        grown >> 10
    );
    assert!(grown < 8 << 20, "RSS grew by {} KiB over 10,000 closed connections", grown >> 10);
    // And the engine still serves and stops cleanly.
    assert_eq!(engine.client().send("after-churn", "ok").status, 202);
    assert_eq!(engine.terminate(), Some(0));
}

/// The smallest mesh channels (16 messages) under 2,000 connections, each
/// with a batch in flight whose items live on both shards: every request
/// crosses the mesh in both directions at once (appends, rate counts,
/// answers), so both channels are full both ways most of the time. Senders
/// wait for room and nothing deadlocks (docs/ARCHITECTURE.md, "Cross-shard
/// waits"): every item of every batch is accepted.
#[test]
fn full_mesh_channels_in_both_directions_make_senders_wait_and_never_deadlock() {
    const CONNS: usize = 2_000;
    const ITEMS: usize = 10;
    raise_nofile_limit();
    let setup = Setup::new(&Opts {
        segment_bytes: 64 << 20,
        extra_engine: "mesh_channel_capacity = 16".into(),
        ..Opts::default()
    });
    let engine = setup.start();
    let started = Instant::now();
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let addr = engine.business;
            std::thread::spawn(move || {
                let mut conns: Vec<Client> = (0..CONNS / 4).map(|_| Client::connect(addr)).collect();
                let mut accepted = 0;
                for round in 0..3 {
                    let requests: Vec<Vec<u8>> = (0..conns.len())
                        .map(|i| {
                            let items: Vec<String> =
                                (0..ITEMS).map(|k| format!(r#"{{"to":"u{t}-{i}-{k}","body":"r{round}"}}"#)).collect();
                            let body = format!(r#"{{"messages":[{}]}}"#, items.join(","));
                            Client::request_bytes("POST", "/v1/messages/batch", Some(API_KEY), Some(&body))
                        })
                        .collect();
                    for r in round_trip(&mut conns, &requests) {
                        assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
                        let results = r.json()["results"].as_array().unwrap().clone();
                        for item in results {
                            assert_eq!(item["status"], "accepted", "{item}");
                            accepted += 1;
                        }
                    }
                }
                accepted
            })
        })
        .collect();
    let accepted: usize = threads.into_iter().map(|t| t.join().expect("client thread")).sum();
    eprintln!("{accepted} messages in batches over {CONNS} connections, mesh capacity 16: {:?}", started.elapsed());
    assert_eq!(accepted, CONNS * ITEMS * 3);
    assert_eq!(engine.terminate(), Some(0));
}

/// The open-files limit of the engine's process (soft, hard), from /proc.
fn open_files_limit(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("/proc limits");
    let line = limits.lines().find(|l| l.starts_with("Max open files")).expect("open files line");
    let fields: Vec<u64> = line.split_whitespace().filter_map(|f| f.parse().ok()).collect();
    (fields[0], fields[1])
}

/// Started with the common default soft limit of 1024 open files, the
/// engine raises its own limit for `engine.connections_per_shard_max`
/// (business connections and sessions on every shard), and then holds
/// 3,000 connections at once.
#[test]
fn the_engine_raises_its_open_files_limit_for_its_connections() {
    use std::os::unix::process::CommandExt;
    raise_nofile_limit();
    let setup = Setup::new(&Opts { extra_engine: "connections_per_shard_max = 4000".into(), ..Opts::default() });
    let engine = Engine::try_start_with(&setup.config, |cmd| {
        // SAFETY: only setrlimit, async-signal-safe, between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
                libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
                lim.rlim_cur = 1024;
                libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
                Ok(())
            });
        }
    })
    .unwrap_or_else(|e| panic!("engine did not start: {e}"));
    let (soft, hard) = open_files_limit(engine.child.id());
    let wanted = 2 * 4000 * 2 + 1024;
    assert_eq!(soft, wanted.min(hard), "soft limit {soft} (hard {hard})");
    assert!(soft > 3_000 + 100, "this machine's hard limit {hard} is too low for the test");
    let mut conns: Vec<Client> = (0..3_000).map(|_| engine.client()).collect();
    let request = Client::request_bytes("GET", "/v1/messages/0000000000000000", Some(API_KEY), None);
    let answers = round_trip(&mut conns, &vec![request; 3_000]);
    assert!(answers.iter().all(|r| r.status == 404), "every connection past 1024 is served");
    drop(conns);
    assert_eq!(engine.terminate(), Some(0));
}
