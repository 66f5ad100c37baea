//! Scenarios and load models, run on a thread-per-core generator.
//!
//! A run: connect every sender connection ("lane") and receiver, meet at a
//! barrier, start together at `t0`, warm up, measure for `duration`, let
//! senders finish, wait for deliveries to drain, merge what each thread
//! recorded. The main thread prints a progress line every second.
//!
//! Load models (wrk2's distinction):
//! - closed loop: each lane sends when its previous answer came;
//! - open loop: each lane sends on a fixed schedule (the total rate spread
//!   evenly over lanes and phases); latency is measured from the intended
//!   send time, so a stall is charged to every request it delayed and
//!   coordinated omission cannot hide it.

mod lanes;
pub mod overload;
mod receivers;

use std::net::Ipv4Addr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use serde::{Deserialize, Serialize};

use crate::clock::now_ns;
use crate::engine::Target;
use crate::stats::{total, Progress, ThreadStats};

/// What a run does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// Send only; acceptance latency and throughput.
    Ingest,
    /// Send to connected receivers that ack; also end-to-end latency.
    E2e,
    /// `POST /v1/messages/batch` (esh3ar only).
    Batch,
    /// Queue messages for offline users, then connect them and time the drain.
    OfflineDrain,
    /// Open WebSockets and report the engine's memory per connection.
    IdleConnections,
    /// Far above capacity with a small memory limit and mixed priorities:
    /// the shedding profile and the engine's RSS over time (esh3ar only).
    Overload,
    /// N connections (default 10,000) closed loop against 2 shards and a
    /// 4 GiB memory limit: every answer must be a 202 (answers by status,
    /// timeouts and resets counted; `--require-all-accepted` gates on it).
    AcceptAll,
    /// Two e2e runs, without and with webhooks to a receiver in the
    /// harness: the ingest cost of receipts and their lag (esh3ar only).
    Receipts,
    /// Two ingest runs to users registered with a phone, without and with
    /// every message falling back at once to a fake WhatsApp provider in
    /// the harness: the ingest cost and the channel's throughput and lag
    /// (esh3ar only).
    Fallback,
    /// Fill a backlog for many offline users through the batch endpoint
    /// (RSS and disk sampled as it grows), `kill -9` and restart the
    /// engine, then connect some of the users and time their drain
    /// (esh3ar only; `crate::backlog`).
    Backlog,
    /// Fill about 1 GiB of journal (`--journal-bytes`) with every message
    /// kept pending, then `kill -9` and restart the engine `--restarts`
    /// times: the journal replay's time and MB/s from the engine's own log
    /// line, and the time to `/readyz` (esh3ar only; `crate::replay`).
    Replay,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Ingest => "ingest",
            Scenario::E2e => "e2e",
            Scenario::Batch => "batch",
            Scenario::OfflineDrain => "offline-drain",
            Scenario::IdleConnections => "idle-connections",
            Scenario::Overload => "overload",
            Scenario::AcceptAll => "accept-all",
            Scenario::Receipts => "receipts",
            Scenario::Fallback => "fallback",
            Scenario::Backlog => "backlog",
            Scenario::Replay => "replay",
        }
    }

    /// Scenarios that count every answer by second and status, time out
    /// unanswered requests and sample the engine's RSS.
    pub fn profiled(self) -> bool {
        matches!(self, Scenario::Overload | Scenario::AcceptAll)
    }
}

/// When lanes send.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Model {
    Closed,
    /// Messages per second over all lanes.
    Open {
        rate: f64,
    },
}

/// Everything a run needs to know.
#[derive(Debug, Clone)]
pub struct Plan {
    pub scenario: Scenario,
    pub model: Model,
    /// Sender connections (lanes).
    pub connections: usize,
    /// WebSocket receivers (esh3ar users) or queue consumers (peers).
    pub receivers: usize,
    /// Distinct recipients in `ingest` and `batch` (users never connected).
    pub users: usize,
    pub duration: Duration,
    pub warmup: Duration,
    /// Generator threads (executors); `cpus` pins them when not empty.
    pub threads: usize,
    pub cpus: Vec<usize>,
    pub body_bytes: usize,
    pub batch_size: usize,
    /// Messages queued in `offline-drain`; in `backlog`'s drain, the
    /// messages owed to its receivers (the drain waits for that many).
    pub messages: u64,
    /// Force this many 127.0.0.x source addresses (else: as many as needed).
    pub source_addrs: Option<usize>,
    /// How long to wait for deliveries after the senders stopped.
    pub drain_timeout: Duration,
    /// Connects in flight per generator thread.
    pub connects_in_flight: usize,
    /// Generator executors poll this long before they sleep (0: sleep at
    /// once). A sleeping generator makes every server reply pay a
    /// cross-CPU wake-up, which on loopback is charged to the server.
    pub spin_before_park: Duration,
    /// The memory limit of an engine started by the harness (0: unknown).
    pub memory_limit_bytes: u64,
    /// Keep (key, send, acceptance) of every accepted message (fallback).
    pub record_accept_times: bool,
}

impl Default for Plan {
    fn default() -> Self {
        Plan {
            scenario: Scenario::Ingest,
            model: Model::Closed,
            connections: 64,
            receivers: 0,
            users: 10_000,
            duration: Duration::from_secs(10),
            warmup: Duration::from_secs(2),
            threads: 1,
            cpus: Vec::new(),
            body_bytes: 64,
            batch_size: 100,
            messages: 100_000,
            source_addrs: None,
            drain_timeout: Duration::from_secs(15),
            connects_in_flight: 64,
            spin_before_park: Duration::ZERO,
            memory_limit_bytes: 0,
            record_accept_times: false,
        }
    }
}

impl Plan {
    pub fn check(&self, target: &Target) -> anyhow::Result<()> {
        let system = target.system();
        let esh3ar_only = matches!(
            self.scenario,
            Scenario::Batch
                | Scenario::IdleConnections
                | Scenario::Overload
                | Scenario::AcceptAll
                | Scenario::Backlog
                | Scenario::Replay
        );
        if esh3ar_only && system != "esh3ar" {
            bail!("scenario {} runs against esh3ar only", self.scenario.name());
        }
        if system == "ceiling" && self.scenario != Scenario::Ingest {
            bail!("the ceiling server only takes the ingest scenario (it delivers nothing)");
        }
        let needs_receivers = matches!(
            self.scenario,
            Scenario::E2e | Scenario::OfflineDrain | Scenario::IdleConnections | Scenario::Backlog
        );
        if needs_receivers && self.receivers == 0 {
            bail!("scenario {} needs --receivers > 0", self.scenario.name());
        }
        if self.scenario != Scenario::IdleConnections && self.connections == 0 {
            bail!("--connections must be > 0");
        }
        if let Model::Open { rate } = self.model {
            if rate <= 0.0 {
                bail!("--rate must be > 0");
            }
        }
        if self.threads == 0 {
            bail!("--threads must be > 0");
        }
        Ok(())
    }

    fn threads(&self) -> usize {
        if self.cpus.is_empty() {
            self.threads
        } else {
            self.cpus.len()
        }
    }
}

/// State shared by the generator threads (atomics only).
pub struct Shared {
    pub plan: Plan,
    pub target: Target,
    pub threads: usize,
    pub progress: Vec<Progress>,
    /// Source addresses for the business (or peer) connections and for receivers.
    pub sources: Vec<Ipv4Addr>,
    pub receiver_sources: Vec<Ipv4Addr>,
    ready: AtomicUsize,
    /// Process-clock instant the load starts (0 until set).
    t0: AtomicU64,
    senders_done: AtomicUsize,
    /// offline-drain and backlog: when receivers start connecting.
    drain_start: AtomicU64,
    /// Receivers stop.
    stop: AtomicBool,
    /// idle-connections: the main thread measured and releases the connections.
    release: AtomicBool,
    finished: AtomicUsize,
}

impl Shared {
    fn measure_start(&self) -> u64 {
        self.t0.load(Ordering::Acquire) + self.plan.warmup.as_nanos() as u64
    }
    fn measure_end(&self) -> u64 {
        self.measure_start() + self.plan.duration.as_nanos() as u64
    }
    fn accepted_total(&self) -> u64 {
        total(&self.progress, |p| &p.accepted)
    }
    fn delivered_total(&self) -> u64 {
        total(&self.progress, |p| &p.delivered)
    }
}

/// Every thread arrives, then all go on.
async fn barrier(counter: &AtomicUsize, n: usize) {
    counter.fetch_add(1, Ordering::AcqRel);
    while counter.load(Ordering::Acquire) < n {
        glommio::timer::sleep(Duration::from_millis(1)).await;
    }
}

/// Sets `cell` to `value` if unset; returns what it holds.
fn set_once(cell: &AtomicU64, value: u64) -> u64 {
    match cell.compare_exchange(0, value, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => value,
        Err(v) => v,
    }
}

/// One generator thread's context.
pub struct ThreadCtx {
    pub shared: Arc<Shared>,
    pub index: usize,
    pub stats: std::cell::RefCell<ThreadStats>,
    /// Next message counter of this thread (keys are unique per thread).
    pub counter: std::cell::Cell<u64>,
    pub connect_limit: glommio::sync::Semaphore,
}

impl ThreadCtx {
    pub fn progress(&self) -> &Progress {
        &self.shared.progress[self.index]
    }
    pub fn next_counter(&self, n: u64) -> u64 {
        let c = self.counter.get();
        self.counter.set(c + n);
        c
    }
}

/// The result of a run, before it becomes a report.
pub struct Outcome {
    pub stats: ThreadStats,
    /// Accepted over the whole run, warm-up and wind-down included.
    pub accepted_all: u64,
    pub duration_s: f64,
    pub overload: Option<overload::Profile>,
    /// The measured window, process-clock ns (start, end).
    pub window_ns: (u64, u64),
}

/// Runs `plan` against `target`; `engine_pid` lets idle-connections read
/// the server's memory.
pub fn run(plan: &Plan, target: &Target, engine_pid: Option<u32>) -> anyhow::Result<Outcome> {
    plan.check(target)?;
    now_ns();
    lanes::setup_peer(target)?;
    let threads = plan.threads();
    let lanes_total = if plan.scenario == Scenario::IdleConnections { 0 } else { plan.connections };
    let shared = Arc::new(Shared {
        plan: plan.clone(),
        target: target.clone(),
        threads,
        progress: (0..threads).map(|_| Progress::default()).collect(),
        sources: crate::net::sources(lanes_total, plan.source_addrs),
        receiver_sources: crate::net::sources(plan.receivers, plan.source_addrs),
        ready: AtomicUsize::new(0),
        t0: AtomicU64::new(0),
        senders_done: AtomicUsize::new(0),
        drain_start: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        release: AtomicBool::new(false),
        finished: AtomicUsize::new(0),
    });
    let rss_before = engine_pid.and_then(crate::engine::rss_bytes);
    let s = shared.clone();
    let placement = crate::ceiling::placement(plan.threads, &plan.cpus)?;
    let spin = (!plan.spin_before_park.is_zero()).then_some(plan.spin_before_park);
    let handles = crate::ceiling::pool("perf", placement, spin, move |i| {
        let shared = s.clone();
        async move {
            let ctx = Rc::new(ThreadCtx {
                shared: shared.clone(),
                index: i,
                stats: Default::default(),
                counter: Default::default(),
                connect_limit: glommio::sync::Semaphore::new(shared.plan.connects_in_flight.max(1) as u64),
            });
            thread_main(ctx.clone()).await;
            shared.finished.fetch_add(1, Ordering::AcqRel);
            Rc::try_unwrap(ctx)
                .map(|c| c.stats.into_inner())
                .unwrap_or_else(|c| std::mem::take(&mut c.stats.borrow_mut()))
        }
    })?;
    let stop_rss = Arc::new(AtomicBool::new(false));
    let rss = match engine_pid {
        Some(pid) if plan.scenario.profiled() => Some(overload::sample_rss(pid, shared.clone(), stop_rss.clone())),
        _ => None,
    };
    let idle = watch(&shared, engine_pid);
    stop_rss.store(true, Ordering::Release);
    let rss = rss.map(|h| h.join().unwrap_or_default()).unwrap_or_default();
    let mut merged = ThreadStats::default();
    for r in handles.join_all() {
        merged.merge(r.map_err(|e| anyhow::anyhow!("generator thread failed: {e}"))?);
    }
    let profile =
        plan.scenario.profiled().then(|| overload::Profile::build(&merged.answers, &rss, plan.memory_limit_bytes));
    if let Some(p) = &profile {
        merged.extra.insert("server_rss_max_bytes".into(), p.rss_max_bytes as f64);
        merged.extra.insert("transport_errors".into(), p.transport_errors as f64);
    }
    if let Some((after, connected)) = idle {
        merged.extra.insert("connections_open".into(), connected as f64);
        if let (Some(before), Some(after)) = (rss_before, after) {
            merged.extra.insert("server_rss_before_bytes".into(), before as f64);
            merged.extra.insert("server_rss_after_bytes".into(), after as f64);
            let per = after.saturating_sub(before) as f64 / connected.max(1) as f64;
            merged.extra.insert("server_rss_per_connection_bytes".into(), per);
        }
    }
    let duration_s = match plan.scenario {
        Scenario::OfflineDrain | Scenario::Backlog => merged.extra.get("drain_s").copied().unwrap_or(0.0),
        Scenario::IdleConnections => 0.0,
        _ => plan.duration.as_secs_f64(),
    };
    let accepted_all = total(&shared.progress, |p| &p.accepted);
    let window_ns = (shared.measure_start(), shared.measure_end());
    Ok(Outcome { stats: merged, accepted_all, duration_s, overload: profile, window_ns })
}

/// The main thread while a run goes: the progress line, and for
/// idle-connections the server's memory once all are open: Some((rss, open)).
fn watch(shared: &Shared, engine_pid: Option<u32>) -> Option<(Option<u64>, u64)> {
    let start = std::time::Instant::now();
    let mut last_accepted = 0;
    let mut next_line = 1.0;
    let mut idle = None;
    while shared.finished.load(Ordering::Acquire) < shared.threads {
        std::thread::sleep(Duration::from_millis(50));
        if shared.plan.scenario == Scenario::IdleConnections && idle.is_none() {
            let connected = total(&shared.progress, |p| &p.connected);
            let failed = total(&shared.progress, |p| &p.errors);
            if shared.ready.load(Ordering::Acquire) >= shared.threads {
                // Let the server settle (more connections, longer).
                let settle_ms = (200 + shared.plan.receivers as u64 / 5).min(2000);
                std::thread::sleep(Duration::from_millis(settle_ms));
                idle = Some((engine_pid.and_then(crate::engine::rss_bytes), connected));
                eprintln!(
                    "idle-connections: {connected} open, {failed} failed; holding them {:.0} s",
                    shared.plan.duration.as_secs_f64()
                );
                std::thread::sleep(shared.plan.duration);
                shared.release.store(true, Ordering::Release);
            }
        }
        if start.elapsed().as_secs_f64() >= next_line {
            next_line = start.elapsed().as_secs_f64().floor() + 1.0;
            let accepted = shared.accepted_total();
            eprintln!(
                "[{:>5.1}s] sent {:>9} accepted {:>9} ({:>7}/s) delivered {:>9} errors {:>6} connected {:>6}",
                start.elapsed().as_secs_f64(),
                total(&shared.progress, |p| &p.sent),
                accepted,
                accepted - last_accepted,
                shared.delivered_total(),
                total(&shared.progress, |p| &p.errors),
                total(&shared.progress, |p| &p.connected),
            );
            last_accepted = accepted;
        }
    }
    idle
}

async fn thread_main(ctx: Rc<ThreadCtx>) {
    let shared = ctx.shared.clone();
    let plan = &shared.plan;
    let n = shared.threads;
    match plan.scenario {
        // Made of two e2e runs (`crate::receipts`); never planned itself.
        Scenario::Receipts => unreachable!("the receipts scenario runs as two e2e runs"),
        Scenario::Fallback => unreachable!("the fallback scenario runs as two ingest runs"),
        Scenario::Replay => unreachable!("the replay scenario only fills and restarts (crate::replay)"),
        Scenario::Ingest | Scenario::Batch | Scenario::E2e | Scenario::Overload | Scenario::AcceptAll => {
            let receivers = if plan.scenario == Scenario::E2e { receivers::spawn_all(&ctx).await } else { Vec::new() };
            let gate = Rc::new(glommio::sync::Semaphore::new(0));
            let (lanes, connected) = lanes::spawn_all(&ctx, gate.clone()).await;
            barrier(&shared.ready, n).await;
            set_once(&shared.t0, now_ns() + 20_000_000);
            gate.signal(connected as u64);
            for l in lanes {
                l.await;
            }
            barrier(&shared.senders_done, n).await;
            if !receivers.is_empty() {
                drain(&ctx, now_ns()).await;
                shared.stop.store(true, Ordering::Release);
                for r in receivers {
                    r.await;
                }
            }
        }
        Scenario::OfflineDrain => {
            let gate = Rc::new(glommio::sync::Semaphore::new(0));
            let (lanes, connected) = lanes::spawn_all(&ctx, gate.clone()).await;
            barrier(&shared.ready, n).await;
            let t0 = set_once(&shared.t0, now_ns() + 20_000_000);
            gate.signal(connected as u64);
            for l in lanes {
                l.await;
            }
            barrier(&shared.senders_done, n).await;
            let queued_s = (now_ns().saturating_sub(t0)) as f64 / 1e9;
            let start = set_once(&shared.drain_start, now_ns());
            let receivers = receivers::spawn_all(&ctx).await;
            let drained = drain(&ctx, start).await;
            shared.stop.store(true, Ordering::Release);
            for r in receivers {
                r.await;
            }
            let mut st = ctx.stats.borrow_mut();
            st.extra.insert("queue_s".into(), queued_s);
            st.extra.insert("drain_s".into(), (drained.saturating_sub(start)) as f64 / 1e9);
        }
        Scenario::Backlog => {
            // The fill and the restart ran before (`crate::backlog`): here
            // only the drain, timed like offline-drain's.
            barrier(&shared.ready, n).await;
            let start = set_once(&shared.drain_start, now_ns());
            let receivers = receivers::spawn_all(&ctx).await;
            let drained = drain(&ctx, start).await;
            shared.stop.store(true, Ordering::Release);
            for r in receivers {
                r.await;
            }
            let mut st = ctx.stats.borrow_mut();
            st.extra.insert("drain_s".into(), (drained.saturating_sub(start)) as f64 / 1e9);
        }
        Scenario::IdleConnections => {
            let receivers = receivers::spawn_all(&ctx).await;
            barrier(&shared.ready, n).await;
            while !shared.release.load(Ordering::Acquire) {
                glommio::timer::sleep(Duration::from_millis(50)).await;
            }
            shared.stop.store(true, Ordering::Release);
            for r in receivers {
                r.await;
            }
        }
    }
}

/// Waits until every accepted message was received (backlog: the
/// `plan.messages` owed to the receivers), or the drain timeout passes,
/// counted from `since`; returns when the last one came.
async fn drain(ctx: &ThreadCtx, since: u64) -> u64 {
    let shared = &ctx.shared;
    let deadline = since + shared.plan.drain_timeout.as_nanos() as u64;
    let owed = || match shared.plan.scenario {
        Scenario::Backlog => shared.plan.messages,
        _ => shared.accepted_total(),
    };
    let mut last_change = now_ns();
    let mut last = shared.delivered_total();
    loop {
        let delivered = shared.delivered_total();
        if delivered != last {
            (last, last_change) = (delivered, now_ns());
        }
        if delivered >= owed() || now_ns() > deadline {
            return last_change;
        }
        glommio::timer::sleep(Duration::from_micros(500)).await;
    }
}
