//! JSON decode of business messages.
//!
//! Single messages (a typical small one and a 1 KiB one): the engine's
//! path (`esh3ar::business::json::with_json` + `new_message`: UTF-8 and
//! nesting checks, simd-json's tape, validation into a borrowed message)
//! against simd-json as a DOM, as a bare tape and into a typed struct, and
//! serde_json as a DOM and typed.
//!
//! A batch of 100 items (what `esh3ar-perf --scenario batch` sends): the
//! engine's path against the simd-json DOM it replaced (parse only: the
//! DOM's maps were most of the old cost, docs/perf-notes/batch.md) and the
//! bare tape (the floor of the new path).
//!
//! Every variant gets a fresh copy of the body (simd-json parses in
//! place), outside the timing.

use std::borrow::Cow;

use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use esh3ar::business::json::{batch_items, new_message, with_json};
use esh3ar::config::BusinessConfig;
use esh3ar::outbound::ProvidersConfig;

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

/// A batch as `esh3ar-perf` builds it: `{"messages":[{"to":"uN","body":"..."},...]}`.
fn batch_body(items: usize) -> Vec<u8> {
    let mut b = br#"{"messages":["#.to_vec();
    for i in 0..items {
        if i > 0 {
            b.push(b',');
        }
        b.extend_from_slice(format!(r#"{{"to":"u{}","body":"{:0>40}"}}"#, i * 7919 % 10_000, i).as_bytes());
    }
    b.extend_from_slice(b"]}");
    b
}

fn config() -> (BusinessConfig, ProvidersConfig) {
    let business = toml::from_str(r#"listen = "127.0.0.1:0""#).expect("a minimal [business] table");
    (business, ProvidersConfig::default())
}

fn single(c: &mut Criterion) {
    let (business, providers) = config();
    for (name, body) in bodies() {
        let mut g = c.benchmark_group(format!("json decode, {name}"));
        g.throughput(Throughput::Bytes(body.len() as u64));
        let fresh = || body.clone();
        g.bench_function("esh3ar with_json + new_message (tape + checks)", |b| {
            b.iter_batched_ref(
                fresh,
                |v| {
                    let m = with_json(v, |j| new_message(j, 0, &business, &providers, 1).map(|m| m.body.len()));
                    black_box(m.ok())
                },
                BatchSize::SmallInput,
            )
        });
        g.bench_function("simd-json borrowed DOM", |b| {
            b.iter_batched_ref(fresh, |v| black_box(simd_json::to_borrowed_value(v).is_ok()), BatchSize::SmallInput)
        });
        g.bench_function("simd-json tape", |b| {
            b.iter_batched_ref(fresh, |v| black_box(simd_json::to_tape(v).is_ok()), BatchSize::SmallInput)
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

fn batch(c: &mut Criterion) {
    let (business, providers) = config();
    let body = batch_body(100);
    let mut g = c.benchmark_group("json decode, batch of 100");
    g.throughput(Throughput::Elements(100));
    let fresh = || body.clone();
    g.bench_function("esh3ar with_json + batch_items + new_message", |b| {
        b.iter_batched_ref(
            fresh,
            |v| {
                let valid = with_json(v, |j| {
                    let items = batch_items(j).ok()?;
                    let ok = items.iter().filter(|&i| new_message(i, 0, &business, &providers, 1).is_ok()).count();
                    Some(ok)
                });
                black_box(valid.ok())
            },
            BatchSize::SmallInput,
        )
    });
    g.bench_function("simd-json borrowed DOM (the old path's parse)", |b| {
        b.iter_batched_ref(fresh, |v| black_box(simd_json::to_borrowed_value(v).is_ok()), BatchSize::SmallInput)
    });
    g.bench_function("simd-json tape", |b| {
        b.iter_batched_ref(fresh, |v| black_box(simd_json::to_tape(v).is_ok()), BatchSize::SmallInput)
    });
    g.finish();
}

criterion_group!(benches, single, batch);
criterion_main!(benches);
