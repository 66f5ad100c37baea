//! JSON decode of a business message: simd-json (what the engine uses,
//! through `esh3ar::business::json::parse_json`, which also checks UTF-8
//! and nesting) against serde_json, as a DOM and into a typed struct, for
//! a typical small message and a 1 KiB one. Every variant gets a fresh
//! copy of the body (simd-json parses in place), outside the timing.

use std::borrow::Cow;

use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion, Throughput};

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Message<'a> {
    #[serde(borrow)]
    to: Cow<'a, str>,
    #[serde(borrow)]
    body: Cow<'a, str>,
    #[serde(borrow)]
    priority: Option<Cow<'a, str>>,
    ttl_seconds: Option<u64>,
}

fn bodies() -> Vec<(&'static str, Vec<u8>)> {
    let small = br#"{"to":"alice","body":"Your code is 1234","priority":"high","ttl_seconds":300}"#.to_vec();
    let text = "Your order 12345 has shipped and will arrive tomorrow. ".repeat(18);
    let large =
        serde_json::json!({"to": "user-000123456", "body": text, "priority": "normal"}).to_string().into_bytes();
    vec![("small 80 B", small), ("1 KiB body", large)]
}

fn bench(c: &mut Criterion) {
    for (name, body) in bodies() {
        let mut g = c.benchmark_group(format!("json decode, {name}"));
        g.throughput(Throughput::Bytes(body.len() as u64));
        let fresh = || body.clone();
        g.bench_function("esh3ar parse_json (simd-json DOM + checks)", |b| {
            b.iter_batched_ref(
                fresh,
                |v| {
                    let parsed = esh3ar::business::json::parse_json(v).ok();
                    black_box(parsed.is_some())
                },
                BatchSize::SmallInput,
            )
        });
        g.bench_function("simd-json borrowed DOM", |b| {
            b.iter_batched_ref(fresh, |v| black_box(simd_json::to_borrowed_value(v).is_ok()), BatchSize::SmallInput)
        });
        g.bench_function("simd-json typed", |b| {
            b.iter_batched_ref(
                fresh,
                |v| black_box(simd_json::serde::from_slice::<Message>(v).is_ok()),
                BatchSize::SmallInput,
            )
        });
        g.bench_function("serde_json DOM (Value)", |b| {
            b.iter_batched_ref(
                fresh,
                |v| black_box(serde_json::from_slice::<serde_json::Value>(v).is_ok()),
                BatchSize::SmallInput,
            )
        });
        g.bench_function("serde_json typed", |b| {
            b.iter_batched_ref(
                fresh,
                |v| black_box(serde_json::from_slice::<Message>(v).is_ok()),
                BatchSize::SmallInput,
            )
        });
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
