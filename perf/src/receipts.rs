//! The `receipts` scenario: what signed webhooks cost, and how far behind
//! a message its receipt arrives.
//!
//! One invocation makes two `e2e` runs with the same arguments against two
//! engines started the same way, except that in the second the benchmark
//! client has a `webhook_url` pointing at [`Receiver`], a plain HTTP/1.1
//! server in this process that answers `200` to every event. Every message
//! then owes two events (`message.delivered` when it reaches the phone,
//! `message.acked` when the phone acks). The report is the second run's,
//! with in `extra`:
//!
//! - `baseline_msg_per_s` and `ingest_ratio`: throughput without webhooks
//!   and the ratio with them (the target is ≥ 0.8);
//! - `lag_delivered_p50_ms`/`p99`, `lag_acked_p50_ms`/`p99`: receipt lag,
//!   from the message's `accepted_at` (stamped as the engine takes the
//!   request, just before the journal write whose fdatasync precedes the
//!   `202`) to the webhook's arrival here, both on this machine's clock;
//! - `events_received`, `events_duplicated`, `events_owed_at_end`: unique
//!   events received, repeats of one (at-least-once), and events still owed
//!   when the drain wait (`--drain-timeout`, at least 30 s) ended;
//! - `events_drain_s`: how long after the load stopped the last event came.
//!
//! The receiver does not verify signatures (the integration tests do);
//! it parses each body to find the event type and `accepted_at`.

use std::collections::HashSet;
use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use hdrhistogram::Histogram;

use crate::cli::RunArgs;
use crate::http_server::read_request;
use crate::report::Report;
use crate::scenario::Scenario;

/// The webhook secret of the benchmark client (any valid one will do).
pub const BENCH_WEBHOOK_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

#[derive(Default)]
struct Seen {
    ids: HashSet<String>,
    duplicates: u64,
    last_at: Option<Instant>,
    /// When the load stopped (set by the run before it waits for events).
    load_end: Option<Instant>,
}

/// A webhook receiver: accepts every event with `200` and records its lag.
pub struct Receiver {
    addr: SocketAddr,
    seen: Mutex<Seen>,
    /// Receipt lag in µs, by event type.
    delivered: Mutex<Histogram<u64>>,
    acked: Mutex<Histogram<u64>>,
}

impl std::fmt::Debug for Receiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver").field("addr", &self.addr).finish_non_exhaustive()
    }
}

fn histogram() -> Mutex<Histogram<u64>> {
    Mutex::new(Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid bounds"))
}

fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

impl Receiver {
    /// Listens on a free loopback port; a thread per connection.
    pub fn start() -> anyhow::Result<Arc<Receiver>> {
        let listener = TcpListener::bind("127.0.0.1:0").context("cannot bind the webhook receiver")?;
        let r = Arc::new(Receiver {
            addr: listener.local_addr()?,
            seen: Mutex::new(Seen::default()),
            delivered: histogram(),
            acked: histogram(),
        });
        let me = r.clone();
        std::thread::Builder::new().name("webhook-recv".into()).spawn(move || {
            for stream in listener.incoming().flatten() {
                let me = me.clone();
                let _ = std::thread::Builder::new().name("webhook-conn".into()).spawn(move || me.serve(stream));
            }
        })?;
        Ok(r)
    }

    /// The URL to configure as `webhook_url`.
    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    fn serve(&self, stream: TcpStream) {
        let _ = stream.set_nodelay(true);
        let Ok(mut out) = stream.try_clone() else { return };
        let mut input = BufReader::new(stream);
        while let Some(req) = read_request(&mut input) {
            let body = req.body;
            self.record(&body);
            if out.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").is_err() {
                return;
            }
        }
    }

    fn record(&self, body: &[u8]) {
        let now = now_us();
        // The receiver shares the machine with the engine: read the three
        // fields with byte searches rather than building a JSON tree.
        let (Some(kind), Some(id), Some(accepted_ms)) = (
            string_field(body, b"\"type\":\""),
            string_field(body, b"\"id\":\""),
            number_field(body, b"\"accepted_at\":"),
        ) else {
            return;
        };
        {
            let mut seen = self.seen.lock().expect("not poisoned");
            seen.last_at = Some(Instant::now());
            if !seen.ids.insert(format!("{id}/{kind}")) {
                seen.duplicates += 1;
                return;
            }
        }
        let lag = now.saturating_sub(accepted_ms * 1000).max(1);
        let h = match kind {
            "message.delivered" => &self.delivered,
            "message.acked" => &self.acked,
            _ => return,
        };
        let _ = h.lock().expect("not poisoned").record(lag);
    }

    /// Unique events received so far.
    pub fn unique(&self) -> u64 {
        self.seen.lock().expect("not poisoned").ids.len() as u64
    }

    /// Notes that the load stopped, then waits until `expected` unique
    /// events came or `within` passed.
    pub fn drain(&self, expected: u64, within: Duration) {
        self.seen.lock().expect("not poisoned").load_end = Some(Instant::now());
        self.wait_for(expected, within);
    }

    /// Waits until `expected` unique events came or `within` passed.
    pub fn wait_for(&self, expected: u64, within: Duration) {
        let deadline = Instant::now() + within;
        while self.unique() < expected && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The string after the first `key` (which ends with the opening quote).
fn string_field<'a>(body: &'a [u8], key: &[u8]) -> Option<&'a str> {
    let at = memchr::memmem::find(body, key)? + key.len();
    let len = memchr::memchr(b'"', &body[at..])?;
    std::str::from_utf8(&body[at..at + len]).ok()
}

/// The unsigned integer after the first `key`.
fn number_field(body: &[u8], key: &[u8]) -> Option<u64> {
    let at = memchr::memmem::find(body, key)? + key.len();
    let digits = body[at..].iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&body[at..at + digits]).ok()?.parse().ok()
}

/// Runs the scenario (see the module doc).
pub fn run(args: &RunArgs) -> anyhow::Result<Report> {
    if args.addr.is_some() {
        anyhow::bail!("the receipts scenario starts its own engines: drop --addr");
    }
    let mut base = args.clone();
    base.scenario = Scenario::E2e;
    base.out = None;
    base.label = Some("webhooks off".into());
    eprintln!("receipts: run 1 of 2, no webhooks");
    let off = crate::cli::run(&base)?;
    let receiver = Receiver::start()?;
    let mut hooked = base.clone();
    hooked.label = Some(args.label.clone().unwrap_or_else(|| "webhooks on".into()));
    hooked.webhook_receiver = Some(receiver.clone());
    eprintln!("receipts: run 2 of 2, webhooks to {}", receiver.url());
    let mut on = crate::cli::run(&hooked)?;
    let seen = receiver.seen.lock().expect("not poisoned");
    let expected = on.extra.get("accepted_all").copied().unwrap_or(0.0) as u64 * 2;
    let q = |h: &Mutex<Histogram<u64>>, p: f64| h.lock().expect("not poisoned").value_at_quantile(p) as f64 / 1000.0;
    on.scenario = Scenario::Receipts.name().to_owned();
    let extra = [
        ("baseline_msg_per_s", off.throughput_per_s),
        ("ingest_ratio", on.throughput_per_s / off.throughput_per_s.max(1e-9)),
        ("baseline_accept_p99_ms", off.acceptance.p99_ms),
        ("lag_delivered_p50_ms", q(&receiver.delivered, 0.5)),
        ("lag_delivered_p99_ms", q(&receiver.delivered, 0.99)),
        ("lag_acked_p50_ms", q(&receiver.acked, 0.5)),
        ("lag_acked_p99_ms", q(&receiver.acked, 0.99)),
        ("events_received", seen.ids.len() as f64),
        ("events_duplicated", seen.duplicates as f64),
        ("events_owed_at_end", expected.saturating_sub(seen.ids.len() as u64) as f64),
        (
            "events_drain_s",
            match (seen.last_at, seen.load_end) {
                (Some(last), Some(end)) => last.saturating_duration_since(end).as_secs_f64(),
                _ => 0.0,
            },
        ),
    ];
    for (k, v) in extra {
        on.extra.insert(k.to_owned(), v);
    }
    drop(seen);
    if let Some(out) = &args.out {
        on.save(out)?;
    }
    Ok(on)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_read_from_an_event_body() {
        let body = br#"{"type":"message.acked","timestamp":1795455371300,"data":{"id":"000g000000000000","to":"a","accepted_at":1795455371100}}"#;
        assert_eq!(string_field(body, b"\"type\":\""), Some("message.acked"));
        assert_eq!(string_field(body, b"\"id\":\""), Some("000g000000000000"));
        assert_eq!(number_field(body, b"\"accepted_at\":"), Some(1_795_455_371_100));
        assert_eq!(number_field(body, b"\"missing\":"), None);
    }
}
