//! The per-message work of delivery outside the kernel: building the frame
//! a phone receives (raw and in the hub's envelope) and taking apart the
//! raw ack it answers with. Each is measured next to the way it was done
//! before (docs/perf-notes/e2e.md), kept here as the reference.

use std::borrow::Cow;

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use esh3ar::delivery::{delivery_text, encode_frame};
use esh3ar::mobile::session::decode_raw;
use esh3ar::mobile::signalr::{RECEIVE_MESSAGE_HEAD, RECEIVE_MESSAGE_TAIL};
use esh3ar_shards::id::TrackingId;
use esh3ar_shards::Priority;

/// The raw ack frame as it was decoded before: every string owned.
#[derive(serde::Deserialize)]
struct OwnedFrame {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    ids: Option<Vec<String>>,
}

fn frames(c: &mut Criterion) {
    let mut g = c.benchmark_group("delivery frame");
    let id = TrackingId { shard: 0, seq: 123_456 };
    let body = "{\"t\":1795454771300123456,\"k\":123456,\"pad\":\"xxxxxxxxxxxxxxxx\"}";
    g.bench_function("before: encode_frame, String::from_utf8, hub envelope copy", |b| {
        b.iter(|| {
            let f = encode_frame(black_box(id), "bench", black_box(body), Priority::Normal, 1_795_454_771_300);
            let text = String::from_utf8(f).unwrap();
            let mut out = String::with_capacity(text.len() + 64);
            out.push_str(RECEIVE_MESSAGE_HEAD);
            out.push_str(&text);
            out.push_str(RECEIVE_MESSAGE_TAIL);
            black_box(out)
        })
    });
    g.bench_function("after: delivery_text, hub envelope and frame in one allocation", |b| {
        b.iter(|| {
            let envelope = (RECEIVE_MESSAGE_HEAD, RECEIVE_MESSAGE_TAIL);
            black_box(delivery_text(
                envelope,
                black_box(id),
                "bench",
                black_box(body),
                Priority::Normal,
                1_795_454_771_300,
            ))
        })
    });
    g.bench_function("raw: encode_frame + String::from_utf8 (before)", |b| {
        b.iter(|| {
            let f = encode_frame(black_box(id), "bench", black_box(body), Priority::Normal, 1_795_454_771_300);
            black_box(String::from_utf8(f).unwrap())
        })
    });
    g.bench_function("raw: delivery_text (after)", |b| {
        b.iter(|| {
            black_box(delivery_text(
                ("", ""),
                black_box(id),
                "bench",
                black_box(body),
                Priority::Normal,
                1_795_454_771_300,
            ))
        })
    });
    g.finish();
}

fn acks(c: &mut Criterion) {
    let mut g = c.benchmark_group("raw ack");
    for n in [1usize, 16] {
        let ids: Vec<String> = (0..n).map(|i| quoted(TrackingId { shard: 0, seq: 1000 + i as u64 })).collect();
        let text = format!("{{\"type\":\"ack\",\"ids\":[{}]}}", ids.join(","));
        g.bench_function(format!("before: owned strings, {n} id(s)"), |b| {
            b.iter(|| {
                let f: OwnedFrame = serde_json::from_str(black_box(&text)).unwrap();
                assert_eq!(f.kind, "ack");
                let all: Vec<String> = f.id.into_iter().chain(f.ids.unwrap_or_default()).collect();
                black_box(all.len())
            })
        });
        g.bench_function(format!("after: decode_raw, borrowed, {n} id(s)"), |b| {
            let mut actions = Vec::new();
            b.iter(|| {
                let ids: Vec<Cow<'_, str>> = decode_raw(black_box(&text), &mut actions).unwrap().unwrap();
                black_box(ids.len())
            })
        });
    }
    g.finish();
}

criterion_group!(benches, frames, acks);
criterion_main!(benches);

fn quoted(id: TrackingId) -> String {
    format!("\"{}\"", std::str::from_utf8(&id.encode()).unwrap())
}
