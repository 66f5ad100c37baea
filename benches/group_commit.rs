//! Group commit: append N message records to a real journal
//! (`esh3ar_shards::journal::Journal`, O_DIRECT segment in a temp dir on
//! the build disk) and wait until the last is durable: one DMA write and
//! one fdatasync for the whole group. Time per group; the per-record cost
//! is the time divided by N (criterion's throughput line).

#[path = "support/mod.rs"]
mod support;

use std::cell::RefCell;
use std::rc::Rc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use esh3ar_shards::journal::{Journal, JournalConfig};
use esh3ar_shards::record::{Accepted, Record};
use esh3ar_shards::recovery::{recover_shard, Mode};
use esh3ar_shards::storage::{DmaStorage, SyncMode};
use esh3ar_shards::Priority;

fn start(records: usize, sync: SyncMode) -> support::AsyncBench {
    support::AsyncBench::start("group-commit", move || async move {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir");
        let path = dir.path().join("shard-0");
        std::fs::create_dir_all(&path).expect("shard dir");
        let recovered = recover_shard(&path, 0, Mode::Repair).expect("recover an empty shard");
        let cfg = JournalConfig { dir: path, shard: 0, segment_bytes: 256 << 20 };
        let journal =
            Journal::open_with(DmaStorage::from_env().sync_mode(sync), cfg, &recovered).expect("open journal");
        glommio::spawn_local(journal.clone().run_committer()).detach();
        let index = Rc::new(RefCell::new(recovered.index));
        let body = vec![b'x'; 64];
        move || {
            let _dir_lives_with_the_body = &dir;
            let (journal, index, body) = (journal.clone(), index.clone(), body.clone());
            async move {
                let mut last = 0;
                for _ in 0..records {
                    let seq = journal.take_seq();
                    let rec = Record::Accepted(Accepted {
                        seq,
                        client: "acme",
                        to: "user-000123456",
                        priority: Priority::Normal,
                        expires_at_ms: u64::MAX / 2,
                        accepted_at_ms: 1,
                        body: &body,
                    });
                    last = journal.append(&rec, &mut index.borrow_mut()).expect("append").generation;
                }
                journal.wait_durable(last).await.expect("durable");
            }
        }
    })
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("group commit");
    g.sample_size(20);
    for (sync, name) in [(SyncMode::Fdatasync, "write + fdatasync"), (SyncMode::Dsync, "O_DSYNC write")] {
        for n in [1usize, 16, 256] {
            let b = start(n, sync);
            g.throughput(Throughput::Elements(n as u64));
            g.bench_function(format!("{n} records, {name}"), |bench| bench.iter_custom(|iters| b.run(iters)));
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
