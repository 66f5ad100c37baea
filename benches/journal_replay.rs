//! Journal replay at start: how fast recovery reads a shard's segments back
//! and rebuilds its index (target: at least 500 MB/s of journal).
//!
//! Builds 256 MiB of journal (4 segments of 64 MiB: 200-byte messages to
//! 10,000 users, a quarter of them acked) with the real writer's planner
//! (`GroupCommit`, commits of up to 1 MiB) into files in the target dir,
//! then times:
//! - `scan`: commit and record checksums only (the read and verify floor);
//! - `recover`: `recover_shard` in read-only mode, index included;
//! - `recover-ttl`: the same with a TTL on every message (the engine's
//!   default, `message_ttl`), so every message is in the TTL index too.
//!
//! The files are in the page cache after the first iteration: this measures
//! the CPU side of replay; a cold start adds the disk's read rate.

use std::path::Path;

/// The engine's allocator, so the bench replays as `esh3ar serve` does:
/// large tables on huge pages (`ESH3AR_HUGE_PAGES=0` turns the advice off).
#[global_allocator]
static ALLOC: esh3ar::huge_alloc::HugePageAlloc = esh3ar::huge_alloc::HugePageAlloc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use esh3ar_shards::group_commit::GroupCommit;
use esh3ar_shards::limits::BLOCK_BYTES;
use esh3ar_shards::record::{Accepted, Record, SegmentHeader, StatusChange};
use esh3ar_shards::recovery::{list_segments, recover_shard, segment_path, Mode};
use esh3ar_shards::{Priority, Status};

const SEGMENT_BYTES: u64 = 64 << 20;
const SEGMENTS: u64 = 4;

/// Writes the journal of shard 0 into `dir` (every message with a TTL if
/// `ttl`); returns the bytes of records written.
fn build(dir: &Path, ttl: bool) -> u64 {
    std::fs::create_dir_all(dir).expect("dir");
    let mut gc = GroupCommit::new(None);
    let mut images: Vec<Vec<u8>> = Vec::new();
    let body = vec![b'm'; 200];
    let mut seq = 0u64;
    let flush = |gc: &mut GroupCommit, images: &mut Vec<Vec<u8>>| {
        while let Some(w) = gc.next_write() {
            let img = &mut images[w.segment as usize - 1];
            let at = w.file_offset as usize;
            let bytes = gc.write_bytes(&w);
            let padded = bytes.len().div_ceil(BLOCK_BYTES as usize) * BLOCK_BYTES as usize;
            if img.len() < at + padded {
                img.resize(at + padded, 0);
            }
            img[at..at + bytes.len()].copy_from_slice(bytes);
            img[at + bytes.len()..at + padded].fill(0);
            gc.complete(w);
        }
    };
    for segment in 1..=SEGMENTS {
        gc.start_segment(segment);
        images.push(Vec::new());
        gc.append(&Record::SegmentHeader(SegmentHeader { shard: 0, segment, next_seq: seq }));
        while gc.active_end_after(400) < SEGMENT_BYTES {
            let to = format!("user-{}", seq % 10_000);
            gc.append(&Record::Accepted(Accepted {
                seq,
                client: "acme",
                to: &to,
                priority: Priority::Normal,
                // A day after acceptance, as the default TTL gives.
                expires_at_ms: if ttl { seq + 86_400_000 } else { 0 },
                accepted_at_ms: seq,
                body: &body,
            }));
            if seq.is_multiple_of(4) {
                gc.append(&Record::Status(StatusChange::plain(seq, Status::Acked, seq)));
            }
            seq += 1;
            if seq.is_multiple_of(64) {
                flush(&mut gc, &mut images);
            }
        }
        flush(&mut gc, &mut images);
    }
    let mut bytes = 0;
    for (i, img) in images.iter_mut().enumerate() {
        bytes += img.len() as u64;
        img.resize(SEGMENT_BYTES as usize, 0); // pre-allocated, as the writer leaves them
        std::fs::write(segment_path(dir, i as u64 + 1), &img).expect("write segment");
    }
    bytes
}

fn replay(c: &mut Criterion) {
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir");
    let dir = tmp.path().join("shard-0");
    let bytes = build(&dir, false);
    let mut g = c.benchmark_group("journal-replay");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(bytes));
    g.bench_function("scan", |b| {
        b.iter(|| {
            let mut records = 0u64;
            for no in list_segments(&dir).expect("list") {
                let data = std::fs::read(segment_path(&dir, no)).expect("read");
                esh3ar_shards::scan::scan(&data, |_, _| records += 1);
            }
            records
        })
    });
    g.bench_function("recover", |b| {
        b.iter(|| recover_shard(&dir, 0, Mode::ReadOnly).expect("recover").records);
    });
    let dir_ttl = tmp.path().join("ttl").join("shard-0");
    let bytes_ttl = build(&dir_ttl, true);
    g.throughput(Throughput::Bytes(bytes_ttl));
    g.bench_function("recover-ttl", |b| {
        b.iter(|| recover_shard(&dir_ttl, 0, Mode::ReadOnly).expect("recover").records);
    });
    g.finish();
}

criterion_group!(benches, replay);
criterion_main!(benches);
