//! What the batch index costs later, at expiry and at compaction, beside
//! what it saves at spill time (benches/cold_store.rs measures `put` and
//! `remove_known` only; docs/perf-notes/cold.md has the figures):
//!
//! `cargo test --release -p esh3ar-shards --lib cold::cost_probe -- --ignored --nocapture`
//!
//! 100 batches of 4,096 messages to 10,000 users, every other message
//! removed right after its batch; then (1) every message due, expired page
//! by page (1,000) until the index is empty; (2) on a second such store,
//! `by_user` compacted, then the index pruned. CPU of the whole process.

use super::tests_support::put;
use super::*;

fn cpu_s() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let f: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split_whitespace().collect();
    (f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()) as f64 / 100.0
}

fn filled(dir: &Path, batches: u64) -> ColdStore {
    let store = ColdStore::open(dir, ColdSizing::default()).unwrap();
    for b in 0..batches {
        let puts: Vec<ColdPut> =
            (b * 4096..(b + 1) * 4096).map(|s| put(s, &format!("user-{}", s % 10_000), 1000 + b)).collect();
        store.put(&puts).unwrap();
        store.remove_known(&puts.iter().filter(|m| m.seq % 2 == 0).map(ColdPut::key).collect::<Vec<_>>()).unwrap();
    }
    store
}

#[test]
#[ignore]
fn deferred_index_cost() {
    let n = 100u64;
    let msgs = (n * 4096) as f64;
    let dir = tempfile::tempdir().unwrap();
    let store = filled(dir.path(), n);
    let (c0, t0) = (cpu_s(), std::time::Instant::now());
    let mut calls = 0;
    let mut live = 0;
    while store.index_counts().0 > 0 {
        let found = store.expired(u64::MAX, 1000).unwrap();
        live += found.len();
        store.remove_known(&found.iter().map(ColdMessage::key).collect::<Vec<_>>()).unwrap();
        calls += 1;
    }
    println!("{live} live expired");
    println!(
        "retire by expiry: {calls} calls, wall {:.2} s, cpu {:.2} us/msg",
        t0.elapsed().as_secs_f64(),
        (cpu_s() - c0) * 1e6 / msgs
    );
    let dir = tempfile::tempdir().unwrap();
    let store = filled(dir.path(), n);
    store.advance_gc_watermark_past_now().unwrap();
    store.by_user.rotate_memtable_and_wait().unwrap();
    store.by_user.major_compact().unwrap();
    let (c0, t0) = (cpu_s(), std::time::Instant::now());
    store.prune_index().unwrap();
    println!("prune: wall {:.2} s, cpu {:.2} us/msg", t0.elapsed().as_secs_f64(), (cpu_s() - c0) * 1e6 / msgs);
    println!("{:?}", store.index_counts());
}
