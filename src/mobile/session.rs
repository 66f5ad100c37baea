//! One WebSocket session on the user's home shard: deliver pending then
//! live messages in acceptance order, take acks, ping idle peers, and close
//! slow, dead or misbehaving ones with the proper close code.

use std::rc::Rc;
use std::time::{Duration, Instant};

use async_tungstenite::WebSocketStream;
use futures_lite::{AsyncWriteExt, StreamExt};
use futures_util::SinkExt;
use glommio::net::TcpStream;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tungstenite::Message;

use crate::delivery::{delivery_frame_bytes_max, Cursor, SessionSignal};
use crate::shard::Shard;
use esh3ar_shards::limits::BODY_BYTES_MAX;

/// Most ids in one `{"type":"ack","ids":[...]}`.
pub const ACK_IDS_MAX: usize = 1000;

/// tungstenite writes its buffer out once it holds this much.
pub const WS_WRITE_BUFFER_BYTES: usize = 16 * 1024;
/// Bytes of a WebSocket frame header from the server (unmasked, 64-bit length).
pub const WS_FRAME_HEADER_BYTES_MAX: usize = 10;

/// The write buffer limit of a session: the flush threshold plus the
/// largest delivery frame. tungstenite refuses a message that would take
/// the buffer past this limit, so anything smaller makes a message at the
/// body limit undeliverable (and redelivered forever).
pub const fn ws_write_buffer_bytes_max(body_bytes_max: usize) -> usize {
    WS_WRITE_BUFFER_BYTES + WS_FRAME_HEADER_BYTES_MAX + delivery_frame_bytes_max(body_bytes_max)
}

const _: () = {
    // The documented body maximum, fully escaped, fits a session's buffer.
    assert!(
        ws_write_buffer_bytes_max(BODY_BYTES_MAX) > delivery_frame_bytes_max(BODY_BYTES_MAX) + WS_WRITE_BUFFER_BYTES
    );
    assert!(delivery_frame_bytes_max(BODY_BYTES_MAX) >= 6 * BODY_BYTES_MAX);
};

#[derive(serde::Deserialize)]
struct ClientFrame {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    ids: Option<Vec<String>>,
}

enum Event {
    Incoming(Option<Result<Message, tungstenite::Error>>),
    Notified,
    Tick,
    Shutdown,
}

/// How a session ends.
enum End {
    /// Send a close frame with this code, then drop.
    Close(CloseCode, &'static str),
    /// Just drop the socket (peer gone, or it cannot take writes).
    Drop,
}

/// Unregisters the session however it ends.
struct Registration {
    shard: Rc<Shard>,
    user: Rc<str>,
    signal: Rc<SessionSignal>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.shard.sessions().unregister(&self.user, &self.signal);
    }
}

/// Answers `101` and runs the session until it ends.
pub async fn start(shard: Rc<Shard>, mut stream: TcpStream, user: String, accept_key: &str) {
    // The shutdown drain waits for this pass; none once it began.
    let Some(_pass) = shard.shutdown().enter() else { return };
    let cfg = &shard.cfg().mobile;
    let write_timeout = Duration::from_millis(cfg.write_timeout_ms);
    let _ = stream.set_write_timeout(Some(write_timeout));
    let _ = stream.set_read_timeout(None);
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept_key}\r\n\r\n"
    );
    if stream.write_all(response.as_bytes()).await.is_err() {
        return;
    }
    let ws_cfg = WebSocketConfig {
        max_message_size: Some(cfg.max_message_bytes),
        max_frame_size: Some(cfg.max_message_bytes),
        write_buffer_size: WS_WRITE_BUFFER_BYTES,
        max_write_buffer_size: ws_write_buffer_bytes_max(shard.cfg().business.max_body_bytes),
        accept_unmasked_frames: false,
        ..Default::default()
    };
    let mut ws = WebSocketStream::from_raw_socket(stream, Role::Server, Some(ws_cfg)).await;
    let user: Rc<str> = Rc::from(user);
    let signal = shard.sessions().register(&user);
    let registration = Registration { shard: shard.clone(), user: user.clone(), signal: signal.clone() };
    let end = serve(&shard, &mut ws, &user, &signal).await;
    drop(registration);
    if let End::Close(code, reason) = end {
        let frame = CloseFrame { code, reason: reason.into() };
        let close = async {
            let _ = ws.close(Some(frame)).await;
        };
        let timeout = async {
            glommio::timer::sleep(Duration::from_secs(2)).await;
        };
        futures_lite::future::or(close, timeout).await;
    }
}

async fn serve(shard: &Rc<Shard>, ws: &mut WebSocketStream<TcpStream>, user: &Rc<str>, signal: &SessionSignal) -> End {
    let cfg = &shard.cfg().mobile;
    let ping_interval = Duration::from_millis(cfg.ping_interval_ms);
    let mut cursor = Cursor::default();
    let mut last_heard = Instant::now();
    let mut pinged = false;
    loop {
        if shard.shutdown().is_set() {
            return End::Close(CloseCode::Away, "server shutting down");
        }
        // Deliver what is ready: pending first, live after, one order.
        match deliver_batch(shard, ws, user, &mut cursor).await {
            Err(end) => return end,
            Ok(false) => {}
            Ok(true) => {
                // Take the acks that arrived meanwhile without waiting.
                while let Some(incoming) = futures_lite::future::poll_once(ws.next()).await {
                    last_heard = Instant::now();
                    pinged = false;
                    if let Some(end) = on_incoming(shard, user, incoming) {
                        return end;
                    }
                }
                continue;
            }
        }
        let silent = last_heard.elapsed();
        if silent >= ping_interval * 2 {
            return End::Drop; // dead peer
        }
        if silent >= ping_interval && !pinged {
            if ws.send(Message::Ping(Vec::new())).await.is_err() {
                return End::Drop;
            }
            pinged = true;
        }
        let wait = if pinged { ping_interval * 2 - silent } else { ping_interval - silent };
        let event = {
            let next = async { Event::Incoming(ws.next().await) };
            let notified = async {
                signal.wait().await;
                Event::Notified
            };
            let tick = async {
                glommio::timer::sleep(wait).await;
                Event::Tick
            };
            let stop = async {
                shard.shutdown().wait().await;
                Event::Shutdown
            };
            futures_lite::future::or(futures_lite::future::or(next, notified), futures_lite::future::or(stop, tick))
                .await
        };
        match event {
            Event::Incoming(incoming) => {
                last_heard = Instant::now();
                pinged = false;
                if let Some(end) = on_incoming(shard, user, incoming) {
                    return end;
                }
            }
            Event::Notified | Event::Tick => {}
            Event::Shutdown => return End::Close(CloseCode::Away, "server shutting down"),
        }
    }
}

/// Writes the next batch of deliverable messages and journals them as
/// delivered. Ok(false) when nothing was ready; Err(end) ends the session.
async fn deliver_batch(
    shard: &Rc<Shard>,
    ws: &mut WebSocketStream<TcpStream>,
    user: &str,
    cursor: &mut Cursor,
) -> Result<bool, End> {
    let batch = shard.deliverable(user, cursor, shard.cfg().mobile.max_inflight);
    if batch.is_empty() {
        return Ok(false);
    }
    let mut sent = Vec::with_capacity(batch.len());
    for &(priority, seq) in &batch {
        match shard.message_frame(seq).await {
            Ok(Some(frame)) => {
                let Ok(text) = String::from_utf8(frame) else { continue };
                if ws.feed(Message::Text(text)).await.is_err() {
                    return Err(End::Drop); // slow reader or gone: messages stay pending
                }
                sent.push(seq);
            }
            Ok(None) => {} // settled meanwhile
            Err(e) => {
                tracing::error!(shard = shard.id(), seq, error = %e, "cannot read a message back for delivery");
                return Err(End::Close(CloseCode::Error, "internal error"));
            }
        }
        cursor.after[priority as usize] = Some(seq);
    }
    if ws.flush().await.is_err() {
        return Err(End::Drop);
    }
    shard.record_delivered(&sent);
    Ok(true)
}

/// Handles one incoming frame; Some(end) ends the session.
fn on_incoming(shard: &Shard, user: &str, incoming: Option<Result<Message, tungstenite::Error>>) -> Option<End> {
    use tungstenite::error::{CapacityError, Error, ProtocolError};
    let msg = match incoming {
        None => return Some(End::Drop),
        Some(Ok(m)) => m,
        Some(Err(Error::Capacity(CapacityError::MessageTooLong { .. }))) => {
            return Some(End::Close(CloseCode::Size, "message too big"))
        }
        Some(Err(Error::Capacity(_))) => return Some(End::Close(CloseCode::Size, "frame too big")),
        Some(Err(Error::Utf8)) => return Some(End::Close(CloseCode::Invalid, "invalid UTF-8")),
        Some(Err(Error::Protocol(ProtocolError::UnmaskedFrameFromClient))) => {
            return Some(End::Close(CloseCode::Protocol, "client frames must be masked"))
        }
        Some(Err(Error::Protocol(_))) => return Some(End::Close(CloseCode::Protocol, "protocol error")),
        Some(Err(_)) => return Some(End::Drop),
    };
    match msg {
        Message::Text(text) => {
            let Ok(frame) = serde_json::from_str::<ClientFrame>(&text) else {
                return Some(End::Close(CloseCode::Policy, "expected a JSON ack"));
            };
            if frame.kind != "ack" {
                return Some(End::Close(CloseCode::Policy, "unsupported message type"));
            }
            let ids = frame.ids.unwrap_or_default();
            if ids.len() > ACK_IDS_MAX {
                return Some(End::Close(CloseCode::Policy, "too many ids in one ack"));
            }
            shard.record_acks(user, frame.id.iter().chain(ids.iter()).map(String::as_str));
            None
        }
        Message::Binary(_) => Some(End::Close(CloseCode::Unsupported, "binary frames are not supported")),
        Message::Close(_) => Some(End::Close(CloseCode::Normal, "bye")), // completes the close handshake
        Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => None,
    }
}
