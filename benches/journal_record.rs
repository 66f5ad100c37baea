//! Journal record encoding (`esh3ar_shards::record::encode`, which
//! computes the CRC32C) for a typical message, and CRC32C alone.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use esh3ar_shards::record::{encode, Accepted, Record};
use esh3ar_shards::Priority;

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("journal record");
    for body_bytes in [64usize, 1024] {
        let body = vec![b'x'; body_bytes];
        let record = Record::Accepted(Accepted {
            seq: 123_456_789,
            client: "acme",
            to: "user-000123456",
            priority: Priority::Normal,
            expires_at_ms: 1_795_455_371_300,
            accepted_at_ms: 1_795_454_771_300,
            body: &body,
        });
        let mut out = Vec::with_capacity(4096);
        g.throughput(Throughput::Elements(1));
        g.bench_function(format!("encode Accepted + CRC32C, {body_bytes} B body"), |b| {
            b.iter(|| {
                out.clear();
                encode(black_box(&record), &mut out);
                black_box(out.len())
            })
        });
    }
    for len in [128usize, 4096] {
        let data = vec![0xA5u8; len];
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_function(format!("crc32c {len} B"), |b| b.iter(|| black_box(crc32c::crc32c(black_box(&data)))));
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
