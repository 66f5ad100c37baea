//! The fill phase of `backlog`: `messages` small messages to `users`
//! offline users through `POST /v1/messages/batch`, as fast as the engine
//! answers (closed loop, one request in flight per lane), with every
//! message's answer counted and the engine's RSS and disk sampled at every
//! 1% of the messages answered and every second.
//!
//! Message `i` goes to user `u{i % users}` with key `i` in its body, so the
//! drain can tell which accepted messages each user is owed. A message
//! that is not accepted is counted, never retried: the figure is how many
//! the engine refuses.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Deserialize;

use super::samples::{self, Sample};
use crate::clock::now_ns;
use crate::http_client::HttpConn;
use crate::payload;
use crate::stats::{histogram, record_ns};

/// A request with no answer after this long counts as `timeout` (the
/// engine stops reading when a shard is full: backpressure, not a hang).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Samples of RSS and disk over the fill: one per this share of the
/// messages answered.
const SAMPLES_PER_FILL: u64 = 100;

/// What the fill does.
#[derive(Debug, Clone)]
pub struct FillPlan {
    pub business: SocketAddr,
    pub api_key: String,
    pub messages: u64,
    pub users: usize,
    pub batch_size: usize,
    pub connections: usize,
    pub body_bytes: usize,
    pub threads: usize,
    pub cpus: Vec<usize>,
}

/// What the fill measured.
pub struct Filled {
    /// Messages sent (the plan's).
    pub messages: u64,
    pub accepted: u64,
    /// Answers per message: `202`, `item:<code>` (a batch item refused in a
    /// `202`), an HTTP status (`503`: the whole batch), or a transport
    /// failure (`io`, `timeout`, `connect`, `protocol`).
    pub answers: BTreeMap<String, u64>,
    pub requests: u64,
    /// Per request: sent → answer read.
    pub acceptance: Histogram<u64>,
    pub fill_s: f64,
    pub samples: Vec<Sample>,
    /// Bit `i` set: message `i` was accepted.
    pub accepted_bits: Vec<u64>,
}

impl Filled {
    pub fn was_accepted(&self, i: u64) -> bool {
        self.accepted_bits.get((i / 64) as usize).is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    /// Answers other than `202`, per message.
    pub fn not_accepted(&self) -> u64 {
        self.answers.iter().filter(|(k, _)| *k != "202").map(|(_, v)| v).sum()
    }
}

/// State the generator threads share (atomics only).
struct Shared {
    plan: FillPlan,
    /// The next message index no lane has claimed.
    next: AtomicU64,
    answered: AtomicU64,
    accepted: AtomicU64,
    bits: Vec<AtomicU64>,
    finished: AtomicUsize,
}

/// What one lane counted.
struct LaneStats {
    answers: BTreeMap<String, u64>,
    requests: u64,
    acceptance: Histogram<u64>,
}

impl Default for LaneStats {
    fn default() -> Self {
        Self { answers: BTreeMap::new(), requests: 0, acceptance: histogram() }
    }
}

impl LaneStats {
    fn count(&mut self, shared: &Shared, cause: &str, n: u64) {
        *self.answers.entry(cause.to_owned()).or_default() += n;
        shared.answered.fetch_add(n, Ordering::Relaxed);
    }

    fn merge(&mut self, other: LaneStats) {
        for (k, v) in other.answers {
            *self.answers.entry(k).or_default() += v;
        }
        self.requests += other.requests;
        self.acceptance.add(&other.acceptance).expect("same histogram bounds");
    }
}

/// Runs the fill against the engine `pid` whose data dir is `data`.
pub fn run(plan: &FillPlan, pid: u32, data: &Path) -> anyhow::Result<Filled> {
    let words = plan.messages.div_ceil(64) as usize;
    let shared = Arc::new(Shared {
        plan: plan.clone(),
        next: AtomicU64::new(0),
        answered: AtomicU64::new(0),
        accepted: AtomicU64::new(0),
        bits: (0..words).map(|_| AtomicU64::new(0)).collect(),
        finished: AtomicUsize::new(0),
    });
    let threads = if plan.cpus.is_empty() { plan.threads.max(1) } else { plan.cpus.len() };
    let placement = crate::ceiling::placement(threads, &plan.cpus)?;
    let s = shared.clone();
    let start = Instant::now();
    let handles = crate::ceiling::pool("backlog", placement, None, move |i| {
        let shared = s.clone();
        async move {
            let stats = thread_main(&shared, i, threads).await;
            shared.finished.fetch_add(1, Ordering::AcqRel);
            stats
        }
    })?;
    let samples = watch(&shared, threads, pid, data, start);
    let fill_s = start.elapsed().as_secs_f64();
    let mut merged = LaneStats::default();
    for r in handles.join_all() {
        merged.merge(r.map_err(|e| anyhow::anyhow!("fill thread failed: {e}"))?);
    }
    Ok(Filled {
        messages: plan.messages,
        accepted: shared.accepted.load(Ordering::Acquire),
        answers: merged.answers,
        requests: merged.requests,
        acceptance: merged.acceptance,
        fill_s,
        samples,
        accepted_bits: shared.bits.iter().map(|w| w.load(Ordering::Acquire)).collect(),
    })
}

/// The main thread during the fill: samples at every 1% answered and every
/// second (a fill that sheds most messages still gets a dense curve while
/// it accepts), and a progress line on stderr every second. Returns the
/// samples.
fn watch(shared: &Shared, threads: usize, pid: u32, data: &Path, start: Instant) -> Vec<Sample> {
    let messages = shared.plan.messages;
    let step = (messages / SAMPLES_PER_FILL).max(1);
    let mut samples = vec![samples::take(pid, data, 0.0, 0, 0)];
    let (mut next_sample, mut next_line, mut last_accepted) = (step, 1.0, 0);
    loop {
        let finished = shared.finished.load(Ordering::Acquire) >= threads;
        let answered = shared.answered.load(Ordering::Relaxed);
        let accepted = shared.accepted.load(Ordering::Relaxed);
        let t = start.elapsed().as_secs_f64();
        let line_due = t >= next_line || finished;
        if answered >= next_sample || line_due {
            samples.push(samples::take(pid, data, t, answered, accepted));
            next_sample = (answered / step + 1) * step;
        }
        if line_due {
            next_line = t.floor() + 1.0;
            let last = samples.last().expect("one sample at least");
            eprintln!(
                "backlog fill [{t:>6.1}s] {:>5.1}% answered {answered:>10} accepted {accepted:>10} ({:>7}/s) \
                 not accepted {:>10} rss {:>7.1} MiB disk {:>7.1} MiB",
                answered as f64 * 100.0 / messages.max(1) as f64,
                accepted - last_accepted,
                answered.saturating_sub(accepted),
                last.rss_bytes as f64 / 1048576.0,
                last.disk_bytes as f64 / 1048576.0,
            );
            last_accepted = accepted;
        }
        if finished {
            return samples;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One generator thread: its lanes (global index ≡ thread mod threads).
async fn thread_main(shared: &Arc<Shared>, index: usize, threads: usize) -> LaneStats {
    let lanes: Vec<_> = (index..shared.plan.connections)
        .step_by(threads)
        .map(|_| glommio::spawn_local(lane(shared.clone())).detach())
        .collect();
    let mut merged = LaneStats::default();
    for l in lanes {
        if let Some(st) = l.await {
            merged.merge(st);
        }
    }
    merged
}

/// One connection: claims `batch_size` messages at a time until all are
/// claimed, sends them, counts the answer. Reconnects after a failure.
async fn lane(shared: Arc<Shared>) -> LaneStats {
    let plan = &shared.plan;
    let mut st = LaneStats::default();
    let mut conn: Option<HttpConn> = None;
    let mut req = Vec::with_capacity(plan.batch_size * (plan.body_bytes + 40) + 256);
    loop {
        let first = shared.next.fetch_add(plan.batch_size as u64, Ordering::Relaxed);
        if first >= plan.messages {
            return st;
        }
        let count = (plan.batch_size as u64).min(plan.messages - first);
        if conn.is_none() {
            match crate::net::connect(plan.business, None).await {
                Ok(s) => conn = Some(HttpConn::new(s)),
                Err(_) => {
                    st.count(&shared, "connect", count);
                    glommio::timer::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        batch_request(&mut req, plan, first, count);
        let sent = now_ns();
        let answer = futures_lite::future::or(exchange(c, &req), async {
            glommio::timer::sleep(REQUEST_TIMEOUT).await;
            Err(io::Error::new(io::ErrorKind::TimedOut, "no answer"))
        })
        .await;
        record_ns(&mut st.acceptance, now_ns().saturating_sub(sent));
        st.requests += 1;
        match answer {
            Ok((status, close, body)) => {
                record_answer(&shared, &mut st, first, count, status, &body);
                if close {
                    conn = None;
                }
            }
            Err(e) => {
                st.count(&shared, crate::scenario::overload::io_cause(&e), count);
                conn = None;
            }
        }
    }
}

/// Sends one request and reads its answer: (status, closes, body).
async fn exchange(c: &mut HttpConn, req: &[u8]) -> io::Result<(u16, bool, Vec<u8>)> {
    c.send(req).await?;
    let resp = c.recv().await?;
    Ok((resp.status, resp.close, c.body(&resp).to_vec()))
}

/// Writes the batch request of messages `first..first + count`.
fn batch_request(req: &mut Vec<u8>, plan: &FillPlan, first: u64, count: u64) {
    let mut body = Vec::with_capacity(count as usize * (plan.body_bytes + 40) + 16);
    body.extend_from_slice(br#"{"messages":["#);
    let stamp = now_ns();
    for i in first..first + count {
        if i > first {
            body.push(b',');
        }
        body.extend_from_slice(format!(r#"{{"to":"u{}","body":""#, i % plan.users as u64).as_bytes());
        payload::write_body(&mut body, stamp, payload::key(0, i), plan.body_bytes);
        body.extend_from_slice(b"\"}");
    }
    body.extend_from_slice(b"]}");
    req.clear();
    req.extend_from_slice(
        format!(
            "POST /v1/messages/batch HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            plan.api_key,
            body.len()
        )
        .as_bytes(),
    );
    req.extend_from_slice(&body);
}

#[derive(Deserialize)]
struct BatchAnswer {
    results: Vec<BatchItem>,
}

#[derive(Deserialize)]
struct BatchItem {
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    error: Option<ItemError>,
}

#[derive(Deserialize)]
struct ItemError {
    code: String,
}

/// Counts the answer to messages `first..first + count`: per item in a
/// `202` (accepted, or `item:<code>`), else the status for all of them.
fn record_answer(shared: &Shared, st: &mut LaneStats, first: u64, count: u64, status: u16, body: &[u8]) {
    if status != 202 {
        st.count(shared, &status.to_string(), count);
        return;
    }
    let Ok(answer) = serde_json::from_slice::<BatchAnswer>(body) else {
        st.count(shared, "protocol", count);
        return;
    };
    let mut accepted = 0;
    for (i, item) in answer.results.iter().take(count as usize).enumerate() {
        let key = first + i as u64;
        match (&item.status, &item.error) {
            (Some(s), _) if s == "accepted" => {
                shared.bits[(key / 64) as usize].fetch_or(1 << (key % 64), Ordering::Relaxed);
                accepted += 1;
            }
            (_, Some(e)) => st.count(shared, &format!("item:{}", e.code), 1),
            _ => st.count(shared, "protocol", 1),
        }
    }
    // An answer with fewer items than the request: the rest are unknown.
    let missing = count.saturating_sub(answer.results.len() as u64);
    if missing > 0 {
        st.count(shared, "protocol", missing);
    }
    if accepted > 0 {
        st.count(shared, "202", accepted);
        shared.accepted.fetch_add(accepted, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared(messages: u64) -> Shared {
        Shared {
            plan: FillPlan {
                business: "127.0.0.1:1".parse().unwrap(),
                api_key: "k".into(),
                messages,
                users: 3,
                batch_size: 4,
                connections: 1,
                body_bytes: 64,
                threads: 1,
                cpus: Vec::new(),
            },
            next: AtomicU64::new(0),
            answered: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            bits: (0..messages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            finished: AtomicUsize::new(0),
        }
    }

    #[test]
    fn a_batch_answer_is_counted_per_item() {
        let s = shared(100);
        let mut st = LaneStats::default();
        let body = br#"{"results":[{"id":"0001000000000008","status":"accepted"},{"error":{"code":"overloaded","message":"shed"}},{"id":"x","status":"accepted"}]}"#;
        record_answer(&s, &mut st, 64, 4, 202, body);
        assert_eq!(st.answers["202"], 2);
        assert_eq!(st.answers["item:overloaded"], 1);
        assert_eq!(st.answers["protocol"], 1, "the fourth item has no answer");
        assert_eq!(s.answered.load(Ordering::Relaxed), 4);
        assert_eq!(s.bits[1].load(Ordering::Relaxed), 0b101);
        record_answer(&s, &mut st, 0, 4, 503, b"{}");
        assert_eq!(st.answers["503"], 4);
        assert_eq!(s.accepted.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn a_batch_request_spreads_messages_over_users() {
        let s = shared(10);
        let mut req = Vec::new();
        batch_request(&mut req, &s.plan, 4, 2);
        let text = String::from_utf8(req).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("POST /v1/messages/batch ") && head.contains("Bearer k"), "{head}");
        assert!(head.contains(&format!("Content-Length: {}", body.len())), "{head}");
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        let to: Vec<&str> = v["messages"].as_array().unwrap().iter().map(|m| m["to"].as_str().unwrap()).collect();
        assert_eq!(to, ["u1", "u2"]);
        let b = v["messages"][1]["body"].as_str().unwrap();
        assert_eq!(payload::find_stamp(b.as_bytes()).map(|(_, k)| k), Some(5));
        assert_eq!(b.len(), 64);
    }
}
