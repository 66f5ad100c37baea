//! The `fallback` scenario: what WhatsApp fallback costs the engine, and
//! how fast the channel drains.
//!
//! One invocation makes two `ingest` runs with the same arguments against
//! two engines started the same way. Before each run's load, the
//! `--users` recipients (`u0`, `u1`, ...) are registered in the user
//! directory with a phone (admin `PUT /v1/users/{id}`), so both engines hold
//! the same directory. In the second engine the benchmark client has
//! `fallback_after_seconds = 0` and `fallback_channels = ["whatsapp"]`, and
//! `[providers.whatsapp]` points at [`Provider`], a fake WhatsApp Cloud API
//! in this process: it answers each `POST /{phone_number_id}/messages`
//! after `--provider-delay` (50 ms) with `{"messages":[{"id":"wamid.N"}]}`,
//! a thread per connection so a sleeping answer blocks no other. The
//! requests are byte for byte the same in both runs: every message of the
//! second falls back at once (its recipient never connects).
//!
//! The report is the second run's, with in `extra`:
//!
//! - `baseline_msg_per_s`, `baseline_accept_p50_ms`/`p99`, `ingest_ratio`
//!   and `accept_p99_ratio` (with / without; the target is ≤ 1.2);
//! - `provider_calls` (every request that reached the fake provider),
//!   `provider_unique` (distinct messages), `provider_duplicates`,
//!   `delivered_whatsapp` (distinct messages answered 200),
//!   `provider_bad_requests` (wrong path, token or body),
//!   `provider_connections` (TCP connections the engine opened to it);
//! - `provider_calls_per_s`: calls that arrived in the measured window, per
//!   second (the channel's throughput under load), and
//!   `provider_calls_per_s_overall` (first to last call);
//! - `provider_lag_p50_ms`/`p99`: from the `202` reaching the generator to
//!   the provider call's arrival (both on this process's clock; a call that
//!   arrives before its `202` is read counts as 1 µs), and
//!   `provider_lag_from_send_p50_ms`/`p99`, from the (intended) send;
//! - `owed_at_end`: accepted messages (warm-up included) with no provider
//!   call when the drain wait (`--drain-timeout`) ended; `drain_s`: how long
//!   after the load the last call came;
//! - `users_registered`, `register_s`.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::io::{BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use hdrhistogram::Histogram;

use crate::cli::RunArgs;
use crate::clock::now_ns;
use crate::http_server::read_request;
use crate::report::Report;
use crate::scenario::Scenario;

/// `phone_number_id` of the provider in configs the harness writes.
pub const PHONE_NUMBER_ID: &str = "1234567890";
/// `access_token` of that provider.
pub const ACCESS_TOKEN: &str = "perf-whatsapp-token";

#[derive(Default)]
struct Calls {
    /// Key → process-clock arrival of its first call.
    first: HashMap<u64, u64>,
    duplicates: u64,
    /// Keys answered 200 (distinct).
    answered: HashSet<u64>,
    last_ns: u64,
    first_ns: u64,
}

/// A fake WhatsApp Cloud API: answers every well-formed send after `delay`.
pub struct Provider {
    addr: SocketAddr,
    delay: Duration,
    calls: Mutex<Calls>,
    total: AtomicU64,
    bad: AtomicU64,
    next_id: AtomicU64,
    /// TCP connections the engine opened to the provider.
    connections: AtomicU64,
}

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provider").field("addr", &self.addr).field("delay", &self.delay).finish_non_exhaustive()
    }
}

impl Provider {
    /// Listens on a free loopback port; a thread per connection.
    pub fn start(delay: Duration) -> anyhow::Result<Arc<Provider>> {
        let listener = TcpListener::bind("127.0.0.1:0").context("cannot bind the fake WhatsApp provider")?;
        let p = Arc::new(Provider {
            addr: listener.local_addr()?,
            delay,
            calls: Mutex::new(Calls::default()),
            total: AtomicU64::new(0),
            bad: AtomicU64::new(0),
            next_id: AtomicU64::new(1),
            connections: AtomicU64::new(0),
        });
        let me = p.clone();
        std::thread::Builder::new().name("wa-accept".into()).spawn(move || {
            for stream in listener.incoming().flatten() {
                let me = me.clone();
                me.connections.fetch_add(1, Ordering::Relaxed);
                let _ = std::thread::Builder::new()
                    .name("wa-conn".into())
                    .stack_size(128 << 10)
                    .spawn(move || me.serve(stream));
            }
        })?;
        Ok(p)
    }

    /// The `base_url` to configure.
    pub fn base_url(&self) -> String {
        format!("http://{}/v21.0", self.addr)
    }

    fn serve(&self, stream: TcpStream) {
        let _ = stream.set_nodelay(true);
        let Ok(mut out) = stream.try_clone() else { return };
        let mut input = BufReader::new(stream);
        let path = format!("/v21.0/{PHONE_NUMBER_ID}/messages");
        let auth = format!("Bearer {ACCESS_TOKEN}");
        while let Some(req) = read_request(&mut input) {
            let mut good = req.is("POST", &path);
            let authorized = req.header("authorization") == Some(auth.as_str());
            let body = req.body;
            let arrival = now_ns();
            self.total.fetch_add(1, Ordering::Relaxed);
            let key = if good && authorized { key_of(&body) } else { None };
            good = key.is_some();
            if let Some(k) = key {
                let mut c = self.calls.lock().expect("not poisoned");
                if c.first.is_empty() {
                    c.first_ns = arrival;
                }
                c.last_ns = arrival;
                match c.first.entry(k) {
                    Entry::Occupied(_) => c.duplicates += 1,
                    Entry::Vacant(v) => {
                        v.insert(arrival);
                    }
                }
            } else {
                self.bad.fetch_add(1, Ordering::Relaxed);
            }
            std::thread::sleep(self.delay);
            let answer = if good {
                let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                let body = format!(
                    r#"{{"messaging_product":"whatsapp","contacts":[{{"wa_id":"1"}}],"messages":[{{"id":"wamid.{id}"}}]}}"#
                );
                format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                )
            } else {
                let body = r#"{"error":{"message":"bad request","code":100}}"#;
                format!(
                    "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                )
            };
            if out.write_all(answer.as_bytes()).is_err() {
                return;
            }
            if let (true, Some(k)) = (good, key) {
                self.calls.lock().expect("not poisoned").answered.insert(k);
            }
        }
    }

    /// Distinct messages that reached the provider.
    pub fn unique(&self) -> u64 {
        self.calls.lock().expect("not poisoned").first.len() as u64
    }

    /// Waits until `expected` distinct messages came or `within` passed.
    pub fn wait_for(&self, expected: u64, within: Duration) {
        let deadline = Instant::now() + within;
        while self.unique() < expected && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The provider's figures for a run whose accepted messages were
    /// `accepted` ((key, send ns, 202 ns)), `accepted_all` in all, with the
    /// measured window `window` and the load's end `load_end` (process ns).
    pub fn figures(
        &self,
        accepted: &[(u64, u64, u64)],
        accepted_all: u64,
        window: (u64, u64),
        load_end: u64,
    ) -> Vec<(&'static str, f64)> {
        let c = self.calls.lock().expect("not poisoned");
        let mut from_accept = crate::stats::histogram();
        let mut from_send = crate::stats::histogram();
        for &(key, sent, done) in accepted {
            if let Some(&arrival) = c.first.get(&key) {
                crate::stats::record_ns(&mut from_accept, arrival.saturating_sub(done));
                crate::stats::record_ns(&mut from_send, arrival.saturating_sub(sent));
            }
        }
        let q = |h: &Histogram<u64>, p: f64| h.value_at_quantile(p) as f64 / 1000.0;
        let in_window = c.first.values().filter(|&&a| a >= window.0 && a < window.1).count() as f64;
        let window_s = (window.1.saturating_sub(window.0)) as f64 / 1e9;
        let span_s = c.last_ns.saturating_sub(c.first_ns) as f64 / 1e9;
        let unique = c.first.len() as u64;
        vec![
            ("provider_calls", self.total.load(Ordering::Relaxed) as f64),
            ("provider_unique", unique as f64),
            ("provider_duplicates", c.duplicates as f64),
            ("provider_bad_requests", self.bad.load(Ordering::Relaxed) as f64),
            ("provider_connections", self.connections.load(Ordering::Relaxed) as f64),
            ("delivered_whatsapp", c.answered.len() as f64),
            ("provider_calls_per_s", in_window / window_s.max(1e-9)),
            ("provider_calls_per_s_overall", if span_s > 0.0 { unique as f64 / span_s } else { 0.0 }),
            ("provider_lag_p50_ms", q(&from_accept, 0.5)),
            ("provider_lag_p99_ms", q(&from_accept, 0.99)),
            ("provider_lag_max_ms", from_accept.max() as f64 / 1000.0),
            ("provider_lag_from_send_p50_ms", q(&from_send, 0.5)),
            ("provider_lag_from_send_p99_ms", q(&from_send, 0.99)),
            ("owed_at_end", accepted_all.saturating_sub(unique) as f64),
            ("drain_s", c.last_ns.saturating_sub(load_end) as f64 / 1e9),
        ]
    }
}

/// The key of our payload in a WhatsApp send's `text.body`.
fn key_of(body: &[u8]) -> Option<u64> {
    let at = memchr::memmem::find(body, br#""body":""#)?;
    crate::payload::find_stamp(&body[at..]).map(|(_, key)| key)
}

/// Registers users `u0..u{n}` with a phone each, through `threads`
/// keep-alive connections to the admin listener; returns the seconds taken.
pub fn register_users(admin: SocketAddr, token: &str, n: usize, threads: usize) -> anyhow::Result<f64> {
    let start = Instant::now();
    let threads = threads.clamp(1, n.max(1));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let token = token.to_owned();
            std::thread::spawn(move || -> anyhow::Result<()> {
                let mut s = TcpStream::connect(admin).context("cannot connect to the admin listener")?;
                s.set_nodelay(true)?;
                s.set_read_timeout(Some(Duration::from_secs(30)))?;
                let mut buf = vec![0u8; 8192];
                for i in (t..n).step_by(threads) {
                    let body = format!(r#"{{"phone":"+9665{:08}"}}"#, i % 100_000_000);
                    let req = format!(
                        "PUT /v1/users/u{i} HTTP/1.1\r\nHost: admin\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    s.write_all(req.as_bytes())?;
                    let mut end = 0;
                    let status = loop {
                        if let Some((r, _)) = crate::http_client::parse(&buf[..end])? {
                            break r.status;
                        }
                        if end == buf.len() {
                            bail!("admin answer too large");
                        }
                        let got = s.read(&mut buf[end..])?;
                        if got == 0 {
                            bail!("the admin listener closed the connection");
                        }
                        end += got;
                    };
                    if status != 200 {
                        bail!("PUT /v1/users/u{i} answered {status}");
                    }
                }
                Ok(())
            })
        })
        .collect();
    for h in handles {
        h.join().map_err(|_| anyhow::anyhow!("a registration thread panicked"))??;
    }
    Ok(start.elapsed().as_secs_f64())
}

/// Runs the scenario (see the module doc).
pub fn run(args: &RunArgs) -> anyhow::Result<Report> {
    if args.addr.is_some() {
        bail!("the fallback scenario starts its own engines: drop --addr");
    }
    let mut base = args.clone();
    base.scenario = Scenario::Ingest;
    base.out = None;
    base.label = Some("fallback off".into());
    base.register_users = true;
    eprintln!("fallback: run 1 of 2, no fallback ({} users registered with a phone)", args.users);
    let off = crate::cli::run(&base)?;
    let provider = Provider::start(args.provider_delay)?;
    let mut on_args = base.clone();
    on_args.label = Some(args.label.clone().unwrap_or_else(|| "fallback on".into()));
    on_args.fallback_provider = Some(provider.clone());
    eprintln!("fallback: run 2 of 2, every message falls back at once to {}", provider.base_url());
    let mut on = crate::cli::run(&on_args)?;
    on.scenario = Scenario::Fallback.name().to_owned();
    let extra = [
        ("baseline_msg_per_s", off.throughput_per_s),
        ("baseline_accept_p50_ms", off.acceptance.p50_ms),
        ("baseline_accept_p99_ms", off.acceptance.p99_ms),
        ("ingest_ratio", on.throughput_per_s / off.throughput_per_s.max(1e-9)),
        ("accept_p99_ratio", on.acceptance.p99_ms / off.acceptance.p99_ms.max(1e-9)),
        ("provider_delay_ms", args.provider_delay.as_secs_f64() * 1000.0),
    ];
    for (k, v) in extra {
        on.extra.insert(k.to_owned(), v);
    }
    if let Some(r) = off.extra.get("register_s") {
        on.extra.insert("baseline_register_s".into(), *r);
    }
    if let Some(out) = &args.out {
        on.save(out)?;
    }
    Ok(on)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_key_in_a_whatsapp_body() {
        let mut b = br#"{"messaging_product":"whatsapp","to":"+966500000001","type":"text","text":{"body":""#.to_vec();
        crate::payload::write_body(&mut b, 5, crate::payload::key(1, 9), 64);
        b.extend_from_slice(b"\"}}");
        assert_eq!(key_of(&b), Some(crate::payload::key(1, 9)));
        assert_eq!(key_of(br#"{"text":{"body":"hello"}}"#), None);
    }
}
