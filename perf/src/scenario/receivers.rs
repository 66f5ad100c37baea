//! Receivers: esh3ar WebSocket users, or consumers of a peer's queue. Each
//! records the end-to-end latency of every message it gets (from the send
//! stamp in the body, or from the drain start in offline-drain and backlog) and acks
//! it.

use std::io;
use std::rc::Rc;
use std::sync::atomic::Ordering;

use glommio::task::JoinHandle;

use super::{Scenario, ThreadCtx};
use crate::clock::now_ns;
use crate::engine::{mint_token, Target};
use crate::peers::{amqp, is_timeout, nats, redis};
use crate::stats::{record_ns, Progress};
use crate::ws::{self, MobileProtocol, WsConn};

/// Most ids in one ack frame (docs/API.md).
const ACK_IDS_MAX: usize = 1000;

/// How often an idle receiver looks at the stop flag.
const POLL: std::time::Duration = std::time::Duration::from_millis(200);

enum Receiver {
    Ws(Box<WsConn>, MobileProtocol),
    Redis(redis::Consumer),
    Nats(nats::Consumer),
    Rabbit(amqp::Consumer),
}

async fn connect(ctx: &ThreadCtx, index: usize) -> Result<Receiver, String> {
    let src = crate::net::source_for(&ctx.shared.receiver_sources, index);
    let io_cause = |e: io::Error| format!("receiver connect: {}", e.kind());
    Ok(match &ctx.shared.target {
        Target::Esh3ar { mobile, token_secret, mobile_protocol, .. } => {
            let token = mint_token(token_secret, &format!("u{index}"), 86_400);
            let mut ws = WsConn::connect(*mobile, src, mobile_protocol.path(), &token).await.map_err(|e| e.cause())?;
            if *mobile_protocol == MobileProtocol::Signalr {
                // The handshake answer (`{}`) comes as a text message with no id: ignored.
                ws.push(ws::OP_TEXT, ws::HUB_HANDSHAKE);
                ws.flush().await.map_err(io_cause)?;
            }
            ws.set_read_timeout(Some(POLL)).map_err(io_cause)?;
            Receiver::Ws(Box::new(ws), *mobile_protocol)
        }
        Target::Redis { addr } => Receiver::Redis(redis::Consumer::connect(*addr, src, index).await.map_err(io_cause)?),
        Target::Nats { addr } => Receiver::Nats(nats::Consumer::connect(*addr, src, index).await.map_err(io_cause)?),
        Target::Rabbitmq { addr, user, password } => {
            Receiver::Rabbit(amqp::Consumer::connect(*addr, src, index, user, password).await.map_err(io_cause)?)
        }
        Target::Ceiling { .. } => return Err("the ceiling has no receivers".into()),
    })
}

/// Connects this thread's receivers and spawns their loops.
pub async fn spawn_all(ctx: &Rc<ThreadCtx>) -> Vec<JoinHandle<()>> {
    let shared = &ctx.shared;
    let mine: Vec<usize> = (ctx.index..shared.plan.receivers).step_by(shared.threads).collect();
    let mut connects = Vec::with_capacity(mine.len());
    for &u in &mine {
        let ctx = ctx.clone();
        connects.push(glommio::spawn_local(async move {
            let permit = ctx.connect_limit.acquire_permit(1).await.ok()?;
            let r = connect(&ctx, u).await;
            drop(permit);
            match r {
                Ok(r) => {
                    Progress::add(&ctx.progress().connected, 1);
                    Some(r)
                }
                Err(cause) => {
                    ctx.stats.borrow_mut().error(&cause);
                    Progress::add(&ctx.progress().errors, 1);
                    None
                }
            }
        }));
    }
    let mut tasks = Vec::with_capacity(mine.len());
    for c in connects {
        if let Some(r) = c.await {
            tasks.push(glommio::spawn_local(run(ctx.clone(), r)).detach());
        }
    }
    tasks
}

/// Records one received message.
fn received(ctx: &ThreadCtx, body: &[u8]) {
    let Some((stamp, key)) = crate::payload::find_stamp(body) else { return };
    let now = now_ns();
    let shared = &ctx.shared;
    let mut st = ctx.stats.borrow_mut();
    st.delivered_keys.push(key);
    if shared.plan.record_accept_times {
        st.delivered_at.push((key, now));
    }
    Progress::add(&ctx.progress().delivered, 1);
    if matches!(shared.plan.scenario, Scenario::OfflineDrain | Scenario::Backlog) {
        let origin = shared.drain_start.load(Ordering::Acquire);
        st.delivered += 1;
        record_ns(&mut st.delivery, now.saturating_sub(origin));
    } else if stamp >= shared.measure_start() && stamp < shared.measure_end() {
        st.delivered += 1;
        record_ns(&mut st.delivery, now.saturating_sub(stamp));
    }
}

async fn run(ctx: Rc<ThreadCtx>, mut r: Receiver) {
    let stopped = || ctx.shared.stop.load(Ordering::Acquire);
    let mut on_body = |b: &[u8]| received(&ctx, b);
    loop {
        if stopped() {
            break;
        }
        let result = match &mut r {
            Receiver::Ws(ws, protocol) => ws_batch(ws, *protocol, &mut on_body).await,
            Receiver::Redis(c) => c.next_batch(&mut on_body).await,
            Receiver::Nats(c) => c.next_batch(&mut on_body).await,
            Receiver::Rabbit(c) => c.next_batch(&mut on_body).await,
        };
        match result {
            Ok(()) => {}
            Err(e) if is_timeout(&e) => {}
            Err(e) => {
                if !stopped() {
                    eprintln!("esh3ar-perf: a receiver failed: {e}");
                    ctx.stats.borrow_mut().error(&format!("receiver: {}", e.kind()));
                    Progress::add(&ctx.progress().errors, 1);
                }
                break;
            }
        }
    }
    match &mut r {
        Receiver::Redis(c) => c.finish().await,
        Receiver::Nats(c) => c.finish().await,
        Receiver::Rabbit(c) => c.finish().await,
        Receiver::Ws(..) => {}
    }
}

/// Reads what arrived on a WebSocket, acks every message (one frame per
/// 1000 ids) and answers pings (WebSocket pings, or the hub's ping records).
async fn ws_batch(ws: &mut WsConn, protocol: MobileProtocol, on_body: &mut dyn FnMut(&[u8])) -> io::Result<()> {
    // Frames may already wait in the buffer (e.g. a backlog that came with
    // the 101): read only when none is complete.
    if !ws.has_frame()? {
        ws.fill().await?;
    }
    let mut ids: Vec<u8> = Vec::new();
    let mut id_ends: Vec<usize> = Vec::new();
    let mut pongs: Vec<Vec<u8>> = Vec::new();
    let mut closed = false;
    let mut hub_ping = false;
    while let Some((op, range)) = ws.next_frame()? {
        let payload = ws.payload(range);
        match op {
            ws::OP_TEXT => {
                if protocol == MobileProtocol::Signalr && ws::has_hub_ping(payload) {
                    hub_ping = true;
                    continue;
                }
                on_body(payload);
                if let Some(id) = ws::message_id(payload) {
                    ids.extend_from_slice(id);
                    id_ends.push(ids.len());
                }
            }
            ws::OP_PING => pongs.push(payload.to_vec()),
            ws::OP_CLOSE => closed = true,
            _ => {}
        }
    }
    let mut start = 0;
    for chunk in id_ends.chunks(ACK_IDS_MAX) {
        let mut quoted = Vec::with_capacity(chunk.len() * 20);
        for (i, &end) in chunk.iter().enumerate() {
            if i > 0 {
                quoted.push(b',');
            }
            quoted.push(b'"');
            quoted.extend_from_slice(&ids[start..end]);
            quoted.push(b'"');
            start = end;
        }
        ws.push(ws::OP_TEXT, &protocol.ack(&quoted));
    }
    if hub_ping {
        // The hub drops a client it has not heard from in 30 s.
        ws.push(ws::OP_TEXT, ws::HUB_PING);
    }
    for p in pongs {
        ws.push(ws::OP_PONG, &p);
    }
    ws.flush().await?;
    if closed {
        return Err(io::Error::new(io::ErrorKind::ConnectionAborted, "the server closed the WebSocket"));
    }
    Ok(())
}
