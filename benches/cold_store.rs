//! The offline backlog's cold store: what moving a batch of pending messages
//! to disk costs (`ColdStore::put`, one spill batch of 4,096 messages to
//! 10,000 users, one fdatasync), and what taking a batch out again after
//! delivery costs (`remove_known`). The spill's rate bounds sustained ingest
//! to users who are offline, so its cost per message is a hot figure.
//!
//! Each iteration puts a fresh batch and removes the batch put 16 batches
//! earlier: the store holds a steady backlog, and flushes and compactions
//! run in fjall's own threads as they do in the engine.

use std::cell::Cell;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use esh3ar_shards::cold::{user_hash, ColdKey, ColdPut, ColdSizing, ColdStore};
use esh3ar_shards::record::{self, Accepted, Record};
use esh3ar_shards::Priority;

const BATCH: usize = 4096;
const USERS: u64 = 10_000;
const LAG: u64 = 16;

fn batch(first_seq: u64) -> Vec<ColdPut> {
    let body = vec![b'm'; 120];
    (first_seq..first_seq + BATCH as u64)
        .map(|seq| {
            let to = format!("user-{}", seq % USERS);
            let a = Accepted {
                seq,
                client: "bench",
                to: &to,
                priority: Priority::Normal,
                expires_at_ms: 1_900_000_000_000 + seq,
                accepted_at_ms: 1_800_000_000_000 + seq,
                body: &body,
            };
            let mut record = Vec::new();
            record::encode(&Record::Accepted(a), &mut record);
            ColdPut { seq, user_hash: user_hash(&to), expires_at_ms: a.expires_at_ms, record }
        })
        .collect()
}

fn keys(first_seq: u64) -> Vec<ColdKey> {
    batch(first_seq).iter().map(ColdPut::key).collect()
}

/// CPU seconds (user + system) of this process so far, every thread
/// included (fjall's flush and compaction threads do much of the work).
fn process_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    let after_name = &stat[stat.rfind(')').expect("stat format") + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // utime and stime: fields 14 and 15 of stat(5), in clock ticks (100 Hz).
    let ticks: u64 = fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    ticks as f64 / 100.0
}

/// `COLD_STORE_BATCHES=N cargo bench --bench cold_store`: runs N
/// iterations outside criterion and prints wall and CPU time per message.
/// On a shard the spill shares its core with ingest, so the CPU figure
/// (flush and compaction threads included) is the one that bounds the
/// sustained rate of ingest to offline users. Then it times a restore's
/// read (the first page of 1,000 users).
///
/// With `COLD_STORE_LAG=0` nothing is removed while the batches go in (a
/// backlog that grows, as when offline users pile up); then every user's
/// backlog is read back page by page and removed, as restores do, and the
/// drain's CPU per message is printed too. `COLD_STORE_LAG=K` removes each
/// batch K batches after it went in (default 16).
fn cpu_per_message(store: &ColdStore, batches: u64) {
    let lag: u64 = std::env::var("COLD_STORE_LAG").map_or(LAG, |v| v.parse().expect("COLD_STORE_LAG: a number"));
    let inputs: Vec<(Vec<ColdPut>, Option<Vec<ColdKey>>)> = (0..batches)
        .map(|i| {
            let first = 1 + i * BATCH as u64;
            let old = if lag == 0 { None } else { i.checked_sub(lag).map(|old| keys(1 + old * BATCH as u64)) };
            (batch(first), old)
        })
        .collect();
    let (cpu0, t0) = (process_cpu_seconds(), std::time::Instant::now());
    for (puts, old) in &inputs {
        store.put(puts).expect("put");
        if let Some(old) = old {
            store.remove_known(old).expect("remove");
        }
    }
    let (cpu, wall) = (process_cpu_seconds() - cpu0, t0.elapsed().as_secs_f64());
    let messages = (batches * BATCH as u64) as f64;
    println!(
        "cold_store: {batches} batches of {BATCH} (lag {lag}): wall {wall:.2} s ({:.0} msg/s), cpu {cpu:.2} s ({:.2} us/msg, {:.0} msg/s per core)",
        messages / wall,
        cpu * 1e6 / messages,
        messages / cpu
    );
    if lag == 0 {
        // The drain: every user's backlog read back and removed, as restores
        // do (the removals made durable at the end, as maintenance does).
        let (cpu0, t0) = (process_cpu_seconds(), std::time::Instant::now());
        let mut read = 0;
        for u in 0..USERS {
            let hash = user_hash(&format!("user-{u}"));
            let mut after = None;
            loop {
                let page = store.user_messages(hash, after, 1024).expect("user_messages");
                read += page.len();
                let Some(last) = page.last() else { break };
                after = Some(last.seq);
                let keys: Vec<ColdKey> = page.iter().map(|m| m.key()).collect();
                store.remove_known(&keys).expect("remove");
                if page.len() < 1024 {
                    break;
                }
            }
        }
        store.persist().expect("persist");
        let (cpu, wall) = (process_cpu_seconds() - cpu0, t0.elapsed().as_secs_f64());
        println!(
            "cold_store: drain of {USERS} users, {read} messages: wall {wall:.2} s, cpu {cpu:.2} s ({:.2} us/msg)",
            cpu * 1e6 / read.max(1) as f64
        );
        return;
    }
    // A restore's read: the first page of 1,000 users' backlogs.
    let t0 = std::time::Instant::now();
    let mut read = 0;
    for u in 0..1000u64 {
        let hash = user_hash(&format!("user-{}", (u * 7919) % USERS));
        read += store.user_messages(hash, None, 1024).expect("user_messages").len();
    }
    let took = t0.elapsed().as_secs_f64();
    println!(
        "cold_store: 1,000 restore reads, {read} messages: {:.0} us per user ({:.2} us/msg)",
        took * 1e6 / 1000.0,
        took * 1e6 / read.max(1) as f64
    );
}

fn cold_store(c: &mut Criterion) {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    let store = ColdStore::open(dir.path(), ColdSizing::default()).expect("open");
    let next = Cell::new(1u64);
    if let Ok(n) = std::env::var("COLD_STORE_BATCHES") {
        cpu_per_message(&store, n.parse().expect("COLD_STORE_BATCHES: a number of batches"));
        return;
    }
    let mut g = c.benchmark_group("cold_store");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.sample_size(20);
    g.bench_function("spill_then_remove_4096", |b| {
        b.iter_batched(
            || {
                let first = next.get();
                next.set(first + BATCH as u64);
                let old = first.checked_sub(LAG * BATCH as u64).map(keys);
                (batch(first), old)
            },
            |(puts, old)| {
                store.put(&puts).expect("put");
                if let Some(old) = old {
                    store.remove_known(&old).expect("remove");
                }
            },
            criterion::BatchSize::PerIteration,
        )
    });
    g.finish();
}

criterion_group!(benches, cold_store);
criterion_main!(benches);
