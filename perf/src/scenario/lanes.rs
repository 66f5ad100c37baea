//! Sender lanes: one connection each, one request in flight, closed or
//! open loop. The same lane loop drives every system; only [`Sender`]
//! knows the protocol.

use std::io;
use std::rc::Rc;
use std::time::Duration;

use glommio::sync::Semaphore;
use glommio::task::JoinHandle;

use super::{Model, Scenario, ThreadCtx};
use crate::clock::{now_ns, sleep_until};
use crate::engine::Target;
use crate::http_client::HttpConn;
use crate::payload;
use crate::peers::{amqp, nats, redis};
use crate::stats::{record_ns, Progress};

/// Creates the queue or stream of a peer, fresh, before a run.
pub fn setup_peer(target: &Target) -> anyhow::Result<()> {
    let target = target.clone();
    let handle = glommio::LocalExecutorBuilder::default()
        .name("perf-setup")
        .spawn(move || async move {
            match target {
                Target::Redis { addr } => redis::setup(addr).await,
                Target::Nats { addr } => nats::setup(addr).await,
                Target::Rabbitmq { addr, user, password } => amqp::setup(addr, &user, &password).await,
                Target::Esh3ar { .. } | Target::Ceiling { .. } => Ok(()),
            }
        })
        .map_err(|e| anyhow::anyhow!("cannot start the setup executor: {e}"))?;
    let result = handle.join().map_err(|e| anyhow::anyhow!("setup executor failed: {e}"))?;
    result.map_err(|e| anyhow::anyhow!("cannot set up the peer: {e}"))
}

/// An HTTP lane's connection and scratch buffers.
pub struct HttpLane {
    conn: HttpConn,
    req: Vec<u8>,
    body: Vec<u8>,
    auth: String,
    closed: bool,
    /// overload: the priority this lane's messages carry.
    priority: Option<&'static str>,
}

impl HttpLane {
    async fn connect(addr: std::net::SocketAddr, src: Option<std::net::Ipv4Addr>, key: &str) -> io::Result<Self> {
        let conn = HttpConn::new(crate::net::connect(addr, src).await?);
        Ok(HttpLane { conn, req: Vec::new(), body: Vec::new(), auth: key.to_owned(), closed: false, priority: None })
    }
}

/// The protocol side of a lane.
pub enum Sender {
    Http(HttpLane),
    Redis(redis::Publisher),
    Nats(nats::Publisher),
    Rabbit(amqp::Publisher),
}

impl Sender {
    async fn connect(ctx: &ThreadCtx, lane: usize) -> io::Result<Sender> {
        let src = crate::net::source_for(&ctx.shared.sources, lane);
        Ok(match &ctx.shared.target {
            Target::Esh3ar { business, api_key, .. } => {
                let mut h = HttpLane::connect(*business, src, api_key).await?;
                if ctx.shared.plan.scenario == Scenario::Overload {
                    h.priority = Some(super::overload::priority(lane));
                }
                Sender::Http(h)
            }
            Target::Ceiling { addr } => Sender::Http(HttpLane::connect(*addr, src, "none").await?),
            Target::Redis { addr } => Sender::Redis(redis::Publisher::connect(*addr, src).await?),
            Target::Nats { addr } => Sender::Nats(nats::Publisher::connect(*addr, src).await?),
            Target::Rabbitmq { addr, user, password } => {
                Sender::Rabbit(amqp::Publisher::connect(*addr, src, user, password).await?)
            }
        })
    }

    fn priority(&self) -> Option<&'static str> {
        match self {
            Sender::Http(h) => h.priority,
            _ => None,
        }
    }

    fn needs_reconnect(&self) -> bool {
        matches!(self, Sender::Http(h) if h.closed)
    }

    /// Sends `count` messages (keys from `first`) stamped `stamp_ns` and
    /// waits for the answer: Ok(Ok(accepted)), Ok(Err(cause)) for a refusal,
    /// Err for a broken connection.
    async fn send(
        &mut self,
        ctx: &ThreadCtx,
        stamp_ns: u64,
        first: u64,
        count: u64,
    ) -> io::Result<Result<u64, String>> {
        let plan = &ctx.shared.plan;
        let thread = ctx.index;
        match self {
            Sender::Http(h) => {
                h.body.clear();
                let users = recipients(plan);
                let priority = h.priority;
                let item = |out: &mut Vec<u8>, c: u64| {
                    let user = (c as usize + thread * 7919) % users;
                    out.extend_from_slice(format!(r#"{{"to":"u{user}","#).as_bytes());
                    if let Some(p) = priority {
                        out.extend_from_slice(format!(r#""priority":"{p}","#).as_bytes());
                    }
                    out.extend_from_slice(br#""body":""#);
                    payload::write_body(out, stamp_ns, payload::key(thread, c), plan.body_bytes);
                    out.extend_from_slice(b"\"}");
                };
                let path = if plan.scenario == Scenario::Batch {
                    h.body.extend_from_slice(br#"{"messages":["#);
                    for i in 0..count {
                        if i > 0 {
                            h.body.push(b',');
                        }
                        item(&mut h.body, first + i);
                    }
                    h.body.extend_from_slice(b"]}");
                    "/v1/messages/batch"
                } else {
                    item(&mut h.body, first);
                    "/v1/messages"
                };
                h.req.clear();
                h.req.extend_from_slice(
                    format!(
                        "POST {path} HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                        h.auth,
                        h.body.len()
                    )
                    .as_bytes(),
                );
                h.req.extend_from_slice(&h.body);
                h.conn.send(&h.req).await?;
                let resp = h.conn.recv().await?;
                h.closed = resp.close;
                Ok(match resp.status {
                    202 if plan.scenario == Scenario::Batch => {
                        Ok(memchr::memmem::find_iter(h.conn.body(&resp), b"\"status\":\"accepted\"").count() as u64)
                    }
                    202 => Ok(1),
                    s => Err(s.to_string()),
                })
            }
            Sender::Redis(_) | Sender::Nats(_) | Sender::Rabbit(_) => {
                let mut body = Vec::with_capacity(plan.body_bytes);
                payload::write_body(&mut body, stamp_ns, payload::key(thread, first), plan.body_bytes);
                let r = match self {
                    Sender::Redis(p) => p.publish(&body).await?,
                    Sender::Nats(p) => p.publish(&body).await?,
                    Sender::Rabbit(p) => p.publish(&body).await?,
                    Sender::Http(_) => unreachable!("matched above"),
                };
                Ok(r.map(|()| 1))
            }
        }
    }
}

/// Distinct recipients messages are spread over.
fn recipients(plan: &super::Plan) -> usize {
    match plan.scenario {
        Scenario::E2e | Scenario::OfflineDrain => plan.receivers.max(1),
        _ => plan.users.max(1),
    }
}

/// Connects this thread's lanes (global index ≡ thread mod threads) and
/// spawns them, waiting on `gate`. Returns the tasks and how many connected.
pub async fn spawn_all(ctx: &Rc<ThreadCtx>, gate: Rc<Semaphore>) -> (Vec<JoinHandle<()>>, usize) {
    let shared = &ctx.shared;
    let mine: Vec<usize> = (ctx.index..shared.plan.connections).step_by(shared.threads).collect();
    let mut connects = Vec::with_capacity(mine.len());
    for &j in &mine {
        let ctx = ctx.clone();
        connects.push(glommio::spawn_local(async move {
            let _permit = ctx.connect_limit.acquire_permit(1).await.ok()?;
            match Sender::connect(&ctx, j).await {
                Ok(s) => {
                    Progress::add(&ctx.progress().connected, 1);
                    Some((j, s))
                }
                Err(e) => {
                    ctx.stats.borrow_mut().error(&format!("connect: {}", e.kind()));
                    Progress::add(&ctx.progress().errors, 1);
                    None
                }
            }
        }));
    }
    let mut lanes = Vec::with_capacity(mine.len());
    for c in connects {
        if let Some((j, sender)) = c.await {
            lanes.push(glommio::spawn_local(lane(ctx.clone(), j, sender, gate.clone())).detach());
        }
    }
    let n = lanes.len();
    (lanes, n)
}

/// This thread's share of the messages offline-drain queues.
fn quota(ctx: &ThreadCtx) -> u64 {
    let plan = &ctx.shared.plan;
    let threads = ctx.shared.threads as u64;
    plan.messages / threads + u64::from((ctx.index as u64) < plan.messages % threads)
}

async fn lane(ctx: Rc<ThreadCtx>, j: usize, mut sender: Sender, gate: Rc<Semaphore>) {
    if gate.acquire(1).await.is_err() {
        return;
    }
    let shared = ctx.shared.clone();
    let plan = &shared.plan;
    let (t0, start, end) =
        (shared.t0.load(std::sync::atomic::Ordering::Acquire), shared.measure_start(), shared.measure_end());
    let per_request = if plan.scenario == Scenario::Batch { plan.batch_size.max(1) as u64 } else { 1 };
    let offline = plan.scenario == Scenario::OfflineDrain;
    let track_keys = matches!(plan.scenario, Scenario::E2e | Scenario::OfflineDrain);
    // Open loop: this lane's share of the rate, phased so lanes interleave.
    let (mut next, period) = match plan.model {
        Model::Open { rate } => {
            let per_s = rate / per_request as f64;
            let period = plan.connections as f64 / per_s * 1e9;
            (t0 as f64 + j as f64 / per_s * 1e9, period)
        }
        Model::Closed => (0.0, 0.0),
    };
    loop {
        let intended = match plan.model {
            Model::Closed => now_ns().max(t0),
            Model::Open { .. } => next as u64,
        };
        next += period;
        // Taken before any await, so lanes never overshoot a quota.
        let first = ctx.next_counter(per_request);
        if (offline && first + per_request > quota(&ctx)) || (!offline && intended >= end) {
            break;
        }
        if !offline && now_ns() >= end {
            // Behind schedule when the run ends (open loop): what was never
            // sent is counted, not silently dropped.
            let unsent = ((end - intended) as f64 / period.max(1.0)).ceil() as u64;
            let mut st = ctx.stats.borrow_mut();
            *st.errors.entry("unsent_behind_schedule".into()).or_default() += unsent;
            break;
        }
        sleep_until(intended).await;
        Progress::add(&ctx.progress().sent, per_request);
        let result = if plan.scenario.profiled() {
            // Far above capacity: a request that never gets an answer is a
            // `timeout`, not a hung lane.
            futures_lite::future::or(sender.send(&ctx, intended, first, per_request), async {
                glommio::timer::sleep(super::overload::REQUEST_TIMEOUT).await;
                Err(io::Error::new(io::ErrorKind::TimedOut, "no answer"))
            })
            .await
        } else {
            sender.send(&ctx, intended, first, per_request).await
        };
        let done = now_ns();
        // accept-all sends no priority header: its answers count as "normal".
        let counted = sender.priority().or((plan.scenario == Scenario::AcceptAll).then_some("normal"));
        if let Some(p) = counted {
            let cause = match &result {
                Ok(Ok(_)) => "202".to_owned(),
                Ok(Err(code)) => code.clone(),
                Err(e) => super::overload::io_cause(e).to_owned(),
            };
            let sec = (done.saturating_sub(t0) / 1_000_000_000) as u32;
            *ctx.stats.borrow_mut().answers.entry((sec, cause, p)).or_default() += 1;
        }
        let broken = result.is_err() || sender.needs_reconnect();
        let overload = plan.scenario.profiled();
        let measured = offline || intended >= start;
        let in_window = offline || (done >= start && done < end);
        let r = Recorded {
            first,
            intended,
            done,
            measured,
            in_window,
            track_keys,
            warn: offline || done < end,
            overload,
            times: plan.record_accept_times,
        };
        record(&ctx, result, r);
        if broken {
            match reconnect(&ctx, j, if offline { u64::MAX } else { end }).await {
                Some(s) => sender = s,
                None => break,
            }
        }
    }
}

/// What the lane loop knows about one answered request.
struct Recorded {
    first: u64,
    intended: u64,
    done: u64,
    /// Sent in the measured window: its latency is recorded.
    measured: bool,
    /// Completed in the measured window: it counts for throughput.
    in_window: bool,
    track_keys: bool,
    warn: bool,
    /// overload: timeouts and resets are counted apart from other I/O errors.
    overload: bool,
    /// fallback: keep (key, send, acceptance) of each accepted message.
    times: bool,
}

fn record(ctx: &ThreadCtx, result: io::Result<Result<u64, String>>, r: Recorded) {
    let mut st = ctx.stats.borrow_mut();
    match result {
        Ok(Ok(accepted)) => {
            Progress::add(&ctx.progress().accepted, accepted);
            if r.track_keys {
                st.accepted_keys.extend((r.first..r.first + accepted).map(|c| payload::key(ctx.index, c)));
            }
            if r.times {
                st.accepted_at
                    .extend((r.first..r.first + accepted).map(|c| (payload::key(ctx.index, c), r.intended, r.done)));
            }
            if r.in_window {
                st.accepted += accepted;
            }
        }
        Ok(Err(cause)) => {
            st.error(&cause);
            Progress::add(&ctx.progress().errors, 1);
        }
        Err(e) => {
            if r.overload {
                st.error(super::overload::io_cause(&e));
            } else {
                st.error(if e.kind() == io::ErrorKind::InvalidData { "protocol" } else { "io" });
            }
            Progress::add(&ctx.progress().errors, 1);
            if r.warn {
                tracing_note(&e);
            }
        }
    }
    if r.in_window {
        st.requests += 1;
    }
    if r.measured {
        record_ns(&mut st.acceptance, r.done.saturating_sub(r.intended));
    }
}

/// The first connection error of a thread is printed; later ones only counted.
fn tracing_note(e: &io::Error) {
    thread_local!(static SHOWN: std::cell::Cell<bool> = const { std::cell::Cell::new(false) });
    if !SHOWN.with(|s| s.replace(true)) {
        eprintln!("esh3ar-perf: a connection failed: {e} (later failures are only counted)");
    }
}

async fn reconnect(ctx: &ThreadCtx, j: usize, until: u64) -> Option<Sender> {
    loop {
        if now_ns() >= until {
            return None;
        }
        glommio::timer::sleep(Duration::from_millis(10)).await;
        match Sender::connect(ctx, j).await {
            Ok(s) => return Some(s),
            Err(e) => {
                ctx.stats.borrow_mut().error(&format!("connect: {}", e.kind()));
                Progress::add(&ctx.progress().errors, 1);
                glommio::timer::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
