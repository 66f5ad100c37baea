//! HTTP request framing (`esh3ar::http::parse_head`) and routing of the
//! business API's hot request, one request and 16 pipelined ones.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use esh3ar::http::{parse_head, Framing, Method};

const POST: &[u8] = b"POST /v1/messages HTTP/1.1\r\nHost: api.example.com\r\n\
Authorization: Bearer acme-key-0123456789abcdef\r\nContent-Type: application/json\r\n\
User-Agent: acme-notifier/2.3\r\nAccept: */*\r\nContent-Length: 45\r\n\r\n\
{\"to\":\"alice\",\"body\":\"Your code is 1234\"}   ";

/// The routes of the business API (same shape as `business::route`).
fn route(path: &[u8], method: Method) -> u8 {
    let path = path.split(|&b| b == b'?').next().unwrap_or(path);
    match (path, method) {
        (b"/v1/messages", Method::Post) => 1,
        (b"/v1/messages/batch", Method::Post) => 2,
        (p, Method::Get) if p.starts_with(b"/v1/messages/") => 3,
        _ => 0,
    }
}

fn parse_and_route(buf: &[u8]) -> (u8, usize) {
    match parse_head(buf, 65536) {
        Framing::Head(h) => (route(&buf[h.path.clone()], h.method), h.head_len + h.content_length),
        _ => panic!("the benchmark request frames"),
    }
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("http");
    g.throughput(Throughput::Elements(1));
    g.bench_function("parse_head POST /v1/messages", |b| {
        b.iter(|| match parse_head(black_box(POST), 65536) {
            Framing::Head(h) => black_box(h.content_length),
            _ => unreachable!(),
        })
    });
    g.bench_function("parse_head + route", |b| b.iter(|| black_box(parse_and_route(black_box(POST)))));
    let pipelined: Vec<u8> = POST.repeat(16);
    g.throughput(Throughput::Elements(16));
    g.bench_function("parse_head + route, 16 pipelined", |b| {
        b.iter(|| {
            let mut at = 0;
            while at < pipelined.len() {
                let (r, len) = parse_and_route(&pipelined[at..]);
                black_box(r);
                at += len;
            }
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
