//! The built-in live dashboard: `GET /` on the admin listener serves one
//! self-contained page (`dashboard.html`, compiled into the binary, no
//! external assets), which opens `GET /events`: server-sent events, one
//! JSON frame a second, computed on shard 0 from the same snapshots as
//! `/metrics` ([`crate::metrics::gather`]). Rates and percentiles are over
//! the last second (the difference of two consecutive snapshots).

use std::fmt::Write as _;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use esh3ar_shards::histogram::HistogramSnapshot;
use esh3ar_shards::Status;
use futures_lite::AsyncWriteExt;
use glommio::net::TcpStream;

use crate::metrics::{gather, ShardSnapshot, CODES};
use crate::metrics_text::breaker_value;
use crate::outbound::OutboundStatus;
use crate::shard::Shard;

/// The page, served as is.
pub const PAGE: &str = include_str!("dashboard.html");

/// Seconds between two frames.
pub const FRAME_INTERVAL: Duration = Duration::from_secs(1);

/// The head of the event stream; the connection closes when it ends.
pub const STREAM_HEAD: &str =
    "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-store\r\nconnection: close\r\n\r\n";

/// What every frame sums over shards.
struct Totals {
    accepted: u64,
    delivered: u64,
    acked: u64,
    requests: u64,
    errors: u64,
    accept: HistogramSnapshot,
    delivery: HistogramSnapshot,
}

fn totals(shards: &[ShardSnapshot]) -> Totals {
    let mut accept = shards[0].accept.clone();
    let mut delivery = shards[0].delivery.clone();
    for s in &shards[1..] {
        accept.merge(&s.accept);
        delivery.merge(&s.delivery);
    }
    let sum = |f: &dyn Fn(&ShardSnapshot) -> u64| shards.iter().map(f).sum::<u64>();
    // Slots of codes 500 and up, and the "other" slot, in every route.
    let stride = CODES.len() + 1;
    let is_error = |i: usize| CODES.get(i % stride).is_none_or(|&c| c >= 500);
    Totals {
        accepted: sum(&|s| s.messages[Status::Accepted as usize]),
        delivered: sum(&|s| s.messages[Status::Delivered as usize]),
        acked: sum(&|s| s.messages[Status::Acked as usize]),
        requests: sum(&|s| s.http.iter().sum()),
        errors: sum(&|s| s.http.iter().enumerate().filter(|(i, _)| is_error(*i)).map(|(_, v)| v).sum()),
        accept,
        delivery,
    }
}

fn ms(q: Option<f64>) -> String {
    q.map_or("null".to_owned(), |s| format!("{:.3}", s * 1000.0))
}

/// One frame: rates over `elapsed` since `before`, gauges now.
fn frame(
    shards: &[ShardSnapshot],
    now: &Totals,
    before: &Totals,
    elapsed: f64,
    outbound: Option<&OutboundStatus>,
) -> String {
    let rate = |a: u64, b: u64| a.saturating_sub(b) as f64 / elapsed.max(0.001);
    let accept = now.accept.since(&before.accept);
    let delivery = now.delivery.since(&before.delivery);
    let mut f = String::with_capacity(1024);
    let _ = write!(
        f,
        "{{\"accepted_per_second\":{:.1},\"requests_per_second\":{:.1},\"errors_per_second\":{:.1},\
         \"delivered_per_second\":{:.1},\"acked_per_second\":{:.1},\
         \"accept_p50_ms\":{},\"accept_p99_ms\":{},\"delivery_p50_ms\":{},\"delivery_p99_ms\":{},\
         \"accepted_total\":{},\"delivered_total\":{},\"acked_total\":{},\"shards\":[",
        rate(now.accepted, before.accepted),
        rate(now.requests, before.requests),
        rate(now.errors, before.errors),
        rate(now.delivered, before.delivered),
        rate(now.acked, before.acked),
        ms(accept.quantile(0.5)),
        ms(accept.quantile(0.99)),
        ms(delivery.quantile(0.5)),
        ms(delivery.quantile(0.99)),
        now.accepted,
        now.delivered,
        now.acked,
    );
    for (i, s) in shards.iter().enumerate() {
        let _ = write!(
            f,
            "{}{{\"shard\":{},\"business_connections\":{},\"websockets\":{},\"pending\":{},\"memory_used_ratio\":{:.2},\"dead_letters\":{}}}",
            if i > 0 { "," } else { "" },
            s.shard,
            s.business_connections,
            s.websockets,
            s.pending,
            s.memory_used_ratio,
            s.dead_letters
        );
    }
    f.push_str("],\"breakers\":[");
    for (i, (target, state)) in outbound.into_iter().flat_map(OutboundStatus::breakers).enumerate() {
        let mut name = Vec::new();
        crate::http::json_string(&mut name, &target);
        let name = String::from_utf8_lossy(&name);
        let _ = write!(
            f,
            "{}{{\"target\":{name},\"state\":\"{state}\",\"value\":{}}}",
            if i > 0 { "," } else { "" },
            breaker_value(state)
        );
    }
    // The archive does not exist yet: its lag is shown as "not built".
    f.push_str("],\"archive_lag_records\":null}");
    f
}

/// Writes one frame a second to `stream` until the peer goes away or the
/// shard stops.
pub async fn stream_events(shard: Rc<Shard>, outbound: Option<Arc<OutboundStatus>>, stream: &mut TcpStream) {
    let Some(first) = gather(&shard).await else { return };
    let mut before = totals(&first);
    let mut at = Instant::now();
    let mut out = String::new();
    loop {
        let Some(shards) = gather(&shard).await else { return };
        let now = totals(&shards);
        let elapsed = at.elapsed().as_secs_f64();
        out.clear();
        let _ = write!(out, "data: {}\n\n", frame(&shards, &now, &before, elapsed, outbound.as_deref()));
        if stream.write_all(out.as_bytes()).await.is_err() {
            return;
        }
        (before, at) = (now, Instant::now());
        let stopped = futures_lite::future::or(
            async {
                glommio::timer::sleep(FRAME_INTERVAL).await;
                false
            },
            async {
                shard.shutdown().wait().await;
                true
            },
        )
        .await;
        if stopped {
            return;
        }
    }
}
