//! The offline backlog on disk (docs/ARCHITECTURE.md, "Offline backlog"):
//! pending messages of users who are not connected move to the cold store,
//! memory stays flat, and every message still reaches its user, in order,
//! across `kill -9` at any point of spilling, restoring and compaction.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

const MEMORY_LIMIT: u64 = 64 << 20;

fn opts(shards: usize, spill_after_ms: u64) -> Opts {
    Opts {
        shards,
        segment_bytes: 4 << 20,
        extra_engine: format!("memory_limit_bytes = {MEMORY_LIMIT}\n"),
        extra_toml: format!("\n[backlog]\nspill_after_ms = {spill_after_ms}\nrestore_page = 256\n"),
        ..Opts::default()
    }
}

/// Sends `per_user` messages to each of `users` users through the batch
/// endpoint on `threads` connections; the body of the k-th message to user
/// u is `u{u}-{k}`, so order can be checked on arrival. Every item must be
/// accepted. Returns the ids by user, in sending order.
fn fill(addr: SocketAddr, users: usize, per_user: usize, threads: usize, tag: &str) -> HashMap<String, Vec<String>> {
    fill_padded(addr, users, per_user, threads, tag, 0)
}

/// [`fill`] with `pad` more bytes of incompressible text in each body.
fn fill_padded(
    addr: SocketAddr,
    users: usize,
    per_user: usize,
    threads: usize,
    tag: &str,
    pad: usize,
) -> HashMap<String, Vec<String>> {
    let per_thread: Vec<Vec<usize>> = (0..threads).map(|t| (t..users).step_by(threads).collect()).collect();
    let handles: Vec<_> = per_thread
        .into_iter()
        .map(|mine| {
            let tag = tag.to_owned();
            std::thread::spawn(move || {
                let mut c = Client::connect(addr);
                let mut ids: HashMap<String, Vec<String>> = HashMap::new();
                let mut rng = 0x2545_f491_4f6c_dd1du64 ^ (mine.first().copied().unwrap_or(0) as u64 + 1);
                let mut padding = move || -> String {
                    (0..pad)
                        .map(|_| {
                            rng ^= rng << 13;
                            rng ^= rng >> 7;
                            rng ^= rng << 17;
                            char::from(b'a' + (rng % 26) as u8)
                        })
                        .collect()
                };
                // One round per k: the k-th message of every user of this thread.
                for k in 0..per_user {
                    // Within the test config's 64 KiB body limit.
                    for chunk in mine.chunks((60_000 / (pad + 60)).clamp(1, 1000)) {
                        let items: Vec<serde_json::Value> = chunk
                            .iter()
                            .map(|u| serde_json::json!({"to": format!("u{u}"), "body": format!("{tag}u{u}-{k}{}", padding())}))
                            .collect();
                        let body = serde_json::json!({"messages": items}).to_string();
                        let r = c.request("POST", "/v1/messages/batch", Some(API_KEY), Some(&body));
                        assert_eq!(r.status, 202, "batch refused: {}", String::from_utf8_lossy(&r.body));
                        let results = r.json()["results"].as_array().unwrap().clone();
                        for (u, res) in chunk.iter().zip(results) {
                            let id = res["id"].as_str().unwrap_or_else(|| panic!("item refused: {res}")).to_owned();
                            ids.entry(format!("u{u}")).or_default().push(id);
                        }
                    }
                }
                ids
            })
        })
        .collect();
    let mut all = HashMap::new();
    for h in handles {
        all.extend(h.join().unwrap());
    }
    all
}

/// Waits until `name` (summed) reaches `at_least`.
fn wait_metric(admin: SocketAddr, name: &str, at_least: f64, wait: Duration) -> f64 {
    let deadline = Instant::now() + wait;
    loop {
        let v = metric(admin, name);
        if v >= at_least || Instant::now() > deadline {
            return v;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A mobile token for `user`, minted in-process (the CLI's `token` command
/// is the same function; this skips a process start per user).
fn quick_token(user: &str) -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    esh3ar::token::mint(TOKEN_SECRET.as_bytes(), user, now, now + 3600)
}

/// Connects as `user`, receives `expected` messages (acking each), checks
/// that no more come, and returns their bodies in arrival order.
fn drain_user(engine: &Engine, user: &str, expected: usize) -> Vec<String> {
    drain_at(engine.mobile, user, expected, Duration::from_millis(300))
}

fn drain_at(mobile: SocketAddr, user: &str, expected: usize, quiet: Duration) -> Vec<String> {
    let mut phone = Phone::connect(mobile, &quick_token(user)).expect("connect");
    let mut bodies = Vec::with_capacity(expected);
    while bodies.len() < expected {
        let Some(frame) = phone.recv(Duration::from_secs(20)) else {
            panic!("{user}: only {} of {expected} messages arrived", bodies.len());
        };
        bodies.push(frame["body"].as_str().unwrap().to_owned());
        phone.ack(frame["id"].as_str().unwrap());
    }
    assert!(phone.recv(quiet).is_none(), "{user}: more than the {expected} sent");
    bodies
}

/// Runs `f` on each item from `threads` threads.
fn in_parallel<T: Send + Sync + 'static>(items: Vec<T>, threads: usize, f: impl Fn(&T) + Send + Sync + 'static) {
    let items = Arc::new(items);
    let f = Arc::new(f);
    let next = Arc::new(AtomicU64::new(0));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (items, f, next) = (items.clone(), f.clone(), next.clone());
            std::thread::spawn(move || loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                let Some(item) = items.get(i) else { return };
                f(item);
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

fn du(path: &Path) -> u64 {
    let mut total = 0;
    if let Ok(entries) = std::fs::read_dir(path) {
        for e in entries.flatten() {
            let Ok(meta) = e.metadata() else { continue };
            total += if meta.is_dir() {
                du(&e.path())
            } else {
                use std::os::unix::fs::MetadataExt;
                meta.blocks() * 512
            };
        }
    }
    total
}

/// Far more pending messages than the memory budget could index are all
/// accepted (no 503), memory stays flat, a restart does not rebuild them
/// in memory, and each user gets its messages in order when it connects.
#[test]
fn a_backlog_beyond_the_memory_budget_is_accepted_flat_and_delivered_in_order() {
    let (users, per_user) = (20_000, 10);
    let total = (users * per_user) as f64;
    let setup = Setup::new(&opts(2, 200));
    let engine = setup.start();
    let sampler = RssSampler::start(engine.child.id());
    let started = Instant::now();
    let ids = fill(engine.business, users, per_user, 4, "");
    let fill_time = started.elapsed();
    let spilled = wait_metric(engine.admin, "esh3ar_backlog_spilled_total", total, Duration::from_secs(60));
    let max_rss = sampler.stop();
    let in_memory = metric(engine.admin, "esh3ar_pending_messages");
    eprintln!(
        "{total} messages to {users} users in {fill_time:?}; spilled {spilled}; in memory {in_memory}; max RSS {} MiB",
        max_rss >> 20
    );
    assert_eq!(spilled, total, "every message of users who are not connected moves to the cold store");
    assert_eq!(in_memory, 0.0, "none is left in the in-memory queues");
    assert_eq!(metric(engine.admin, "esh3ar_shed_total"), 0.0, "nothing shed");

    // A restart recovers without loading the backlog into memory.
    engine.kill9();
    let restarted = Instant::now();
    let engine = setup.start();
    let restart = restarted.elapsed();
    let cold = metric(engine.admin, "esh3ar_backlog_cold_messages");
    eprintln!("restart {restart:?}; cold after restart {cold}");
    assert_eq!(metric(engine.admin, "esh3ar_pending_messages"), 0.0, "recovery rebuilt nothing in memory");
    assert!(cold >= total, "the cold store still holds the backlog: {cold}");

    // Users connect: each gets its messages once, in order.
    for u in (0..users).step_by(users / 40) {
        let user = format!("u{u}");
        let bodies = drain_user(&engine, &user, per_user);
        let expected: Vec<String> = (0..per_user).map(|k| format!("{user}-{k}")).collect();
        assert_eq!(bodies, expected, "{user}: out of order or wrong");
        assert_eq!(ids[&user].len(), per_user);
    }
    assert_eq!(metric(engine.admin, "esh3ar_backlog_restored_total"), (40 * per_user) as f64);
}

/// Below `SPILL_PENDING_PERCENT` (5%) of the memory budget, pending messages
/// younger than `spill_after_ms` stay in memory; once they take more, the
/// oldest spill at any age until they fit again, and every user still gets
/// its messages once and in order. Here the budget is 8 MiB (64 MiB less the
/// 48 MiB process reserve, halved), so 5% is about 2,184 pending messages.
#[test]
fn a_young_backlog_spills_once_it_takes_its_share_of_memory() {
    // Ten minutes: no message in this test is old enough to spill by age.
    let setup = Setup::new(&opts(1, 600_000));
    let engine = setup.start();
    let (users, first, second) = (1_000, 1, 20);
    fill(engine.business, users, first, 4, "");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        metric(engine.admin, "esh3ar_backlog_spilled_total"),
        0.0,
        "{} young messages under 5% of the budget stay in memory",
        users * first
    );
    fill(engine.business, users, second, 4, "late");
    let total = (users * (first + second)) as f64;
    wait_metric(engine.admin, "esh3ar_backlog_spilled_total", total * 7.0 / 8.0, Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(1));
    let spilled = metric(engine.admin, "esh3ar_backlog_spilled_total");
    let in_memory = metric(engine.admin, "esh3ar_pending_messages");
    eprintln!("{total} messages; spilled {spilled}; pending in memory {in_memory}");
    assert!(in_memory <= total / 8.0, "the oldest spilled, young as they are: {in_memory} of {total} still in memory");
    assert_eq!(spilled + in_memory, total, "every message is either cold or pending in memory");
    assert_eq!(metric(engine.admin, "esh3ar_shed_total"), 0.0, "nothing shed");
    // Each user gets its messages once, in order, from the cold store and
    // from memory alike.
    for u in (0..users).step_by(users / 20) {
        let user = format!("u{u}");
        let bodies = drain_user(&engine, &user, first + second);
        let expected: Vec<String> =
            (0..first).map(|k| format!("{user}-{k}")).chain((0..second).map(|k| format!("late{user}-{k}"))).collect();
        assert_eq!(bodies, expected, "{user}: out of order or wrong");
    }
}

/// A user with more cold messages than one restore page gets them all, in
/// order, and a live message sent while it drains comes after them.
#[test]
fn a_large_backlog_comes_back_page_by_page_in_order_with_live_messages_after() {
    let setup = Setup::new(&opts(1, 100));
    let engine = setup.start();
    let per_user = 1000; // four pages of 256
    fill(engine.business, 1, per_user, 1, "");
    wait_metric(engine.admin, "esh3ar_backlog_spilled_total", per_user as f64, Duration::from_secs(30));
    let mut phone = Phone::connect(engine.mobile, &quick_token("u0")).expect("connect");
    let mut c = engine.client();
    let mut bodies = Vec::new();
    while let Some(frame) = phone.recv(Duration::from_secs(10)) {
        bodies.push(frame["body"].as_str().unwrap().to_owned());
        phone.ack(frame["id"].as_str().unwrap());
        if bodies.len() == 10 {
            assert_eq!(c.send("u0", "live").status, 202);
        }
        if bodies.len() == per_user + 1 {
            break;
        }
    }
    let mut expected: Vec<String> = (0..per_user).map(|k| format!("u0-{k}")).collect();
    expected.push("live".into());
    assert_eq!(bodies, expected);
}

/// `kill -9` at random instants while messages spill, while users' backlogs
/// come back, and while compaction runs: every message that got a 202 is
/// delivered afterwards (at least once), none is lost.
#[test]
fn kill_9_while_spilling_restoring_and_compacting_loses_nothing() {
    let setup = Setup::new(&opts(2, 50));
    let (users, per_user) = (200, 5);
    let mut sent: HashMap<String, Vec<String>> = HashMap::new();
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for round in 0..6 {
        let engine = setup.start();
        // More messages, then connect some users (restores), then kill at a random instant.
        let ids = fill(engine.business, users, per_user, 2, &format!("r{round}"));
        for (u, v) in ids {
            sent.entry(u).or_default().extend(v);
        }
        let mobile = engine.mobile;
        let first = (next() % users as u64) as usize;
        let phones = std::thread::spawn(move || {
            for u in (first..first + 20).map(|u| u % users) {
                let Ok(mut phone) = Phone::connect(mobile, &quick_token(&format!("u{u}"))) else { return };
                // Ack a few so restored messages settle while we kill.
                for _ in 0..3 {
                    let Some(f) = phone.recv(Duration::from_millis(500)) else { break };
                    let Some(id) = f["id"].as_str() else { break };
                    let id = id.to_owned();
                    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| phone.ack(&id))).is_err() {
                        return;
                    }
                }
            }
        });
        std::thread::sleep(Duration::from_millis(next() % 400));
        engine.kill9();
        let _ = phones.join();
    }
    // Everything sent and not acked before a kill comes now; duplicates are
    // allowed (acks lost in a crash), losses are not. What is owed is read
    // from each message's status first (an acked message is not delivered
    // again), so the drain waits for every owed id rather than for a quiet
    // spell, which a slow restore behind a spill could end early.
    let engine = setup.start();
    let mut c = engine.client();
    let mut owed: Vec<(String, Vec<(String, String)>)> = Vec::new();
    for (user, ids) in &sent {
        let mut mine = Vec::new();
        for id in ids {
            let r = c.get_status(id);
            let status = if r.status == 200 {
                r.json()["status"].as_str().unwrap_or("").to_owned()
            } else {
                r.status.to_string()
            };
            if status != "acked" {
                mine.push((id.clone(), status));
            }
        }
        owed.push((user.clone(), mine));
    }
    let mobile = engine.mobile;
    let lost: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
    let received = Arc::new(AtomicU64::new(0));
    let (lost_in, received_in) = (lost.clone(), received.clone());
    in_parallel(owed, 16, move |(user, ids)| {
        let mut phone = Phone::connect(mobile, &quick_token(user)).expect("connect");
        let mut missing: std::collections::HashSet<&str> = ids.iter().map(|(id, _)| id.as_str()).collect();
        // A message that does not come within 20 s of the previous one is
        // lost (or stuck, which a phone cannot tell from lost).
        while !missing.is_empty() {
            let Some(frame) = phone.recv(Duration::from_secs(20)) else { break };
            let id = frame["id"].as_str().unwrap().to_owned();
            phone.ack(&id);
            missing.remove(id.as_str());
            received_in.fetch_add(1, Ordering::Relaxed);
        }
        let mut lost = lost_in.lock().unwrap();
        for (id, status) in ids.iter().filter(|(id, _)| missing.contains(id.as_str())) {
            lost.push(format!("{user} {id} (status before the drain: {status})"));
        }
    });
    let lost = lost.lock().unwrap();
    let total: usize = sent.values().map(Vec::len).sum();
    eprintln!("{total} sent over 6 killed runs; {} frames received at the end", received.load(Ordering::Relaxed));
    assert!(lost.is_empty(), "{} messages lost: {:?}", lost.len(), &lost[..lost.len().min(10)]);
}

/// Once most of the backlog is acked, the disk used returns near what is
/// still pending: journal segments are deleted and the cold store's
/// removed entries are compacted away, even across a kill -9 during the
/// compaction; what is still pending all arrives.
#[test]
fn disk_returns_near_the_live_size_once_the_backlog_drains() {
    let setup = Setup::new(&opts(1, 50));
    let engine = setup.start();
    let (users, per_user) = (200, 300);
    let total = (users * per_user) as f64;
    fill_padded(engine.business, users, per_user, 2, "", 1000);
    wait_metric(engine.admin, "esh3ar_backlog_spilled_total", total, Duration::from_secs(60));
    let full = du(&setup.data_dir());
    // Drain 95% of the users, under load: other senders go on meanwhile.
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (stop, addr) = (stop.clone(), engine.business);
        std::thread::spawn(move || {
            let mut c = Client::connect(addr);
            let mut ids: HashMap<String, Vec<String>> = HashMap::new();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let user = format!("w{}", i % 50);
                let r = c.send(&user, &format!("load {i}"));
                assert_eq!(r.status, 202, "under load: {}", String::from_utf8_lossy(&r.body));
                ids.entry(user).or_default().push(r.json()["id"].as_str().unwrap().to_owned());
                i += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
            ids
        })
    };
    let mobile = engine.mobile;
    let drained: Vec<String> = (0..users * 95 / 100).map(|u| format!("u{u}")).collect();
    in_parallel(drained, 8, move |user| {
        drain_at(mobile, user, per_user, Duration::from_millis(100));
    });
    // About 5% of the bodies (3 MB) is still pending, plus fixed costs: the
    // active journal segment and the spare (4 MiB each, preallocated) and
    // the store's files.
    let live = total as u64 / 20 * 1000;
    // Maintenance compacts the cold store now (its removals outnumber what
    // is left); kill -9 while it runs, then let the next process finish.
    std::thread::sleep(Duration::from_millis(1200));
    stop.store(true, Ordering::Relaxed);
    let loaded = load.join().unwrap();
    engine.kill9();
    let engine = setup.start();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut now = du(&setup.data_dir());
    let target = live * 2 + (12 << 20);
    while now > target && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        now = du(&setup.data_dir());
    }
    eprintln!("data dir: {} KiB full, {} KiB after draining 95% (target {} KiB)", full >> 10, now >> 10, target >> 10);
    assert!(full > target * 3, "the backlog must dwarf the fixed costs: {} KiB", full >> 10);
    assert!(now <= target, "disk did not shrink: {} KiB full, {} KiB after draining", full >> 10, now >> 10);
    // What is left is all there, and nothing drained comes back.
    engine.kill9();
    let engine = setup.start();
    for u in users * 95 / 100..users {
        drain_user(&engine, &format!("u{u}"), per_user);
    }
    for u in (0..users * 95 / 100).step_by(10) {
        drain_user(&engine, &format!("u{u}"), 0);
    }
    // Every message sent under load arrives too.
    for (user, ids) in &loaded {
        let bodies = drain_user(&engine, user, ids.len());
        assert_eq!(bodies.len(), ids.len(), "{user}");
    }
}
