//! The Prometheus text exposition format (version 0.0.4) of the gathered
//! snapshots: `# HELP`, `# TYPE`, then one line per series. Written by hand
//! (docs/ARCHITECTURE.md, "Metrics", says why not `prometheus-client`); the
//! integration test parses it with Prometheus' own Python parser.

use std::fmt::Write as _;

use esh3ar_shards::histogram::HistogramSnapshot;

use crate::clients::ClientTable;
use crate::metrics::{code_label, ProcessStats, ShardSnapshot, CODES, PRIORITIES, ROUTES, STATUSES};
use crate::outbound::{AttemptResult, OutboundStatus};

/// The `Content-Type` of the text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Everything one scrape shows.
pub struct Scrape<'a> {
    pub shards: &'a [ShardSnapshot],
    pub clients: &'a ClientTable,
    pub outbound: Option<&'a OutboundStatus>,
    pub process: ProcessStats,
}

/// A label value escaped for the text format (backslash, quote, newline).
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// A float as Prometheus writes it (`+Inf`, integers without a fraction).
fn num(v: f64) -> String {
    if v.is_infinite() {
        "+Inf".to_owned()
    } else {
        format!("{v}")
    }
}

fn histogram(out: &mut String, name: &str, help: &str, parts: impl Iterator<Item = HistogramSnapshot>) {
    let mut merged: Option<HistogramSnapshot> = None;
    for p in parts {
        match &mut merged {
            Some(m) => m.merge(&p),
            None => merged = Some(p),
        }
    }
    let Some(h) = merged else { return };
    header(out, name, "histogram", help);
    let mut cumulative = 0u64;
    for (i, n) in h.counts.iter().enumerate() {
        cumulative += n;
        let le = h.bounds.get(i).map_or("+Inf".to_owned(), |&b| num(b));
        let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
    }
    let _ = writeln!(out, "{name}_sum {}\n{name}_count {cumulative}", num(h.sum));
}

/// The whole exposition.
pub fn render(s: &Scrape<'_>) -> String {
    let mut out = String::with_capacity(16 * 1024);
    let sum = |f: &dyn Fn(&ShardSnapshot) -> u64| s.shards.iter().map(f).sum::<u64>();

    header(&mut out, "esh3ar_http_requests_total", "counter", "Business API answers by route and status code.");
    for (r, route) in ROUTES.iter().enumerate() {
        for c in 0..=CODES.len() {
            let i = r * (CODES.len() + 1) + c;
            let v = sum(&|x| x.http[i]);
            if v > 0 {
                let code = code_label(c);
                let _ = writeln!(out, "esh3ar_http_requests_total{{route=\"{route}\",code=\"{code}\"}} {v}");
            }
        }
    }
    histogram(
        &mut out,
        "esh3ar_accept_duration_seconds",
        "From a request read to its 202 written to the socket.",
        s.shards.iter().map(|x| x.accept.clone()),
    );
    histogram(
        &mut out,
        "esh3ar_delivery_duration_seconds",
        "From a message accepted to its first frame written to a phone.",
        s.shards.iter().map(|x| x.delivery.clone()),
    );
    histogram(
        &mut out,
        "esh3ar_ack_duration_seconds",
        "From a message delivered to its ack.",
        s.shards.iter().map(|x| x.ack.clone()),
    );
    header(&mut out, "esh3ar_messages_total", "counter", "Message status changes journaled, by status.");
    for (i, st) in STATUSES.iter().enumerate() {
        let _ = writeln!(out, "esh3ar_messages_total{{status=\"{}\"}} {}", st.as_str(), sum(&|x| x.messages[i]));
    }
    per_shard(&mut out, s, "esh3ar_pending_messages", "Messages in the delivery queues.", |x| x.pending as f64);
    per_shard(
        &mut out,
        s,
        "esh3ar_backlog_cold_messages",
        "Pending messages in the offline backlog's cold store, on disk (an estimate until compaction).",
        |x| x.cold as f64,
    );
    per_shard(&mut out, s, "esh3ar_backlog_disk_bytes", "Bytes of the offline backlog's cold store on disk.", |x| {
        x.cold_disk_bytes as f64
    });
    per_shard(
        &mut out,
        s,
        "esh3ar_storage_full",
        "1 while the shard refuses new messages for want of disk space (503 storage_full).",
        |x| if x.storage_full { 1.0 } else { 0.0 },
    );
    header(&mut out, "esh3ar_backlog_spilled_total", "counter", "Pending messages moved to the cold store.");
    let _ = writeln!(out, "esh3ar_backlog_spilled_total {}", sum(&|x| x.spilled_total));
    header(&mut out, "esh3ar_backlog_restored_total", "counter", "Cold messages brought back into the journal.");
    let _ = writeln!(out, "esh3ar_backlog_restored_total {}", sum(&|x| x.restored_total));
    per_shard(&mut out, s, "esh3ar_websocket_connections", "Live WebSocket sessions.", |x| x.websockets as f64);
    per_shard(&mut out, s, "esh3ar_business_connections", "Open business HTTP connections.", |x| {
        x.business_connections as f64
    });
    per_shard(&mut out, s, "esh3ar_memory_budget_used_ratio", "Fill of the shard's memory budget (1 = full).", |x| {
        x.memory_used_ratio
    });
    histogram(
        &mut out,
        "esh3ar_journal_fsync_duration_seconds",
        "Duration of each journal fdatasync.",
        s.shards.iter().map(|x| x.fsync.clone()),
    );
    histogram(
        &mut out,
        "esh3ar_journal_commit_records",
        "Records made durable by one write and fdatasync.",
        s.shards.iter().map(|x| x.commit_records.clone()),
    );
    header(&mut out, "esh3ar_journal_bytes_total", "counter", "Bytes written to journal segments.");
    let _ = writeln!(out, "esh3ar_journal_bytes_total {}", sum(&|x| x.journal_bytes));
    header(&mut out, "esh3ar_shed_total", "counter", "Messages shed under memory pressure, by priority.");
    for (i, p) in PRIORITIES.iter().enumerate() {
        let _ = writeln!(out, "esh3ar_shed_total{{priority=\"{}\"}} {}", p.as_str(), sum(&|x| x.shed[i]));
    }
    header(&mut out, "esh3ar_rate_limited_total", "counter", "Requests refused with 429, by client.");
    for c in 0..s.clients.len() {
        let v = sum(&|x| x.rate_limited.get(c).copied().unwrap_or(0));
        let _ = writeln!(out, "esh3ar_rate_limited_total{{client=\"{}\"}} {v}", escape(s.clients.id(c as u32)));
    }
    header(
        &mut out,
        "esh3ar_dead_letters",
        "gauge",
        "Items in the dead-letter queue (webhook events, fallback deliveries).",
    );
    let _ = writeln!(out, "esh3ar_dead_letters {}", sum(&|x| x.dead_letters));
    outbound(&mut out, s.outbound);
    // During a change's two phases shards may differ: the version every shard has.
    let version = s.shards.iter().map(|x| x.config_version).min().unwrap_or(0);
    header(&mut out, "esh3ar_config_version", "gauge", "Runtime config version installed on every shard.");
    let _ = writeln!(out, "esh3ar_config_version {version}");
    process(&mut out, &s.process);
    out
}

fn per_shard(out: &mut String, s: &Scrape<'_>, name: &str, help: &str, f: impl Fn(&ShardSnapshot) -> f64) {
    header(out, name, "gauge", help);
    for x in s.shards {
        let _ = writeln!(out, "{name}{{shard=\"{}\"}} {}", x.shard, num(f(x)));
    }
}

/// The offload thread's breakers and attempt counters.
fn outbound(out: &mut String, status: Option<&OutboundStatus>) {
    header(out, "esh3ar_breaker_state", "gauge", "Circuit breaker per target: 0 closed, 1 half-open, 2 open.");
    for (target, state) in status.into_iter().flat_map(OutboundStatus::breakers) {
        let v = breaker_value(state);
        let _ = writeln!(out, "esh3ar_breaker_state{{target=\"{}\"}} {v}", escape(&target));
    }
    header(out, "esh3ar_webhook_attempts_total", "counter", "Webhook delivery attempts by result.");
    for r in AttemptResult::ALL {
        let v = status.map_or(0, |s| s.attempts(r));
        let _ = writeln!(out, "esh3ar_webhook_attempts_total{{result=\"{}\"}} {v}", r.as_str());
    }
}

/// The documented encoding of a breaker state.
pub fn breaker_value(state: &str) -> u8 {
    match state {
        "closed" => 0,
        "half_open" => 1,
        _ => 2,
    }
}

fn process(out: &mut String, p: &ProcessStats) {
    header(out, "process_resident_memory_bytes", "gauge", "Resident memory size in bytes.");
    let _ = writeln!(out, "process_resident_memory_bytes {}", p.resident_bytes);
    header(out, "process_open_fds", "gauge", "Number of open file descriptors.");
    let _ = writeln!(out, "process_open_fds {}", p.open_fds);
    header(out, "process_cpu_seconds_total", "counter", "User and system CPU time spent, in seconds.");
    let _ = writeln!(out, "process_cpu_seconds_total {}", num(p.cpu_seconds));
    header(out, "esh3ar_journal_disk_used_ratio", "gauge", "Used fraction of the data_dir's filesystem.");
    let _ = writeln!(out, "esh3ar_journal_disk_used_ratio {}", num(p.disk_used_ratio));
}
