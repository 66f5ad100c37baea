//! One WebSocket session on the user's home shard: deliver pending then
//! live messages in acceptance order, take acks, ping idle peers, and close
//! slow, dead or misbehaving ones with the proper close code.
//!
//! One loop serves both encodings (`Wire`): the raw JSON frames of
//! `/v1/connect` and the SignalR hub protocol of `/v1/hub`. The guarantees
//! (pending then live, acks journaled, redelivery, blocks, limits) live in
//! the loop, so they cannot differ between the two.

use std::borrow::Cow;
use std::rc::Rc;
use std::time::{Duration, Instant};

use async_tungstenite::WebSocketStream;
use futures_lite::{AsyncWriteExt, StreamExt};
use futures_util::SinkExt;
use glommio::net::TcpStream;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tungstenite::Message;

use super::signalr;
use crate::backlog::Barrier;
use crate::delivery::{delivery_frame_bytes_max, Cursor, SessionSignal, DELIVERY_BATCH_MAX};
use crate::shard::Shard;
use esh3ar_shards::limits::{BLOCKED_CLIENTS_PER_USER_MAX, BODY_BYTES_MAX};

/// Most ids in one `{"type":"ack","ids":[...]}`.
pub const ACK_IDS_MAX: usize = 1000;

/// tungstenite writes its buffer out once it holds this much.
pub const WS_WRITE_BUFFER_BYTES: usize = 16 * 1024;
/// Bytes of a WebSocket frame header from the server (unmasked, 64-bit length).
pub const WS_FRAME_HEADER_BYTES_MAX: usize = 10;

/// The write buffer limit of a session: the flush threshold plus the
/// largest delivery frame (in the hub's `ReceiveMessage` envelope, the
/// larger of the two encodings). tungstenite refuses a message that would take
/// the buffer past this limit, so anything smaller makes a message at the
/// body limit undeliverable (and redelivered forever).
pub const fn ws_write_buffer_bytes_max(body_bytes_max: usize) -> usize {
    WS_WRITE_BUFFER_BYTES
        + WS_FRAME_HEADER_BYTES_MAX
        + signalr::INVOCATION_ENVELOPE_BYTES
        + delivery_frame_bytes_max(body_bytes_max)
}

const _: () = {
    // The documented body maximum, fully escaped, fits a session's buffer.
    assert!(
        ws_write_buffer_bytes_max(BODY_BYTES_MAX) > delivery_frame_bytes_max(BODY_BYTES_MAX) + WS_WRITE_BUFFER_BYTES
    );
    assert!(delivery_frame_bytes_max(BODY_BYTES_MAX) >= 6 * BODY_BYTES_MAX);
};

/// A raw client frame, borrowed from the message text: an ack (the one
/// frame a phone sends per delivery burst) costs no allocation but the id
/// list (ids without JSON escapes are borrowed, as every id this engine
/// issues is).
#[derive(serde::Deserialize)]
struct ClientFrame<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(default, borrow)]
    id: Option<Text<'a>>,
    #[serde(default, borrow)]
    ids: Option<Vec<Text<'a>>>,
    /// The sender a `block` or `unblock` frame is about.
    #[serde(default, borrow)]
    from: Option<Text<'a>>,
}

/// A string borrowed from the message when it holds no escape. (serde's
/// own `Cow<str>` borrows only as a direct field, never inside a `Vec`.)
struct Text<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> serde::Deserialize<'de> for Text<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for Visit<'a> {
            type Value = Text<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: serde::de::Error>(self, v: &'de str) -> Result<Text<'a>, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Text<'a>, E> {
                Ok(Text(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Text<'a>, E> {
                Ok(Text(Cow::Owned(v)))
            }
        }
        d.deserialize_str(Visit(std::marker::PhantomData))
    }
}

/// Decodes one raw (`/v1/connect`) text message: Ok(Some(ids)) for an
/// ack, whose ids stay borrowed from `text`; Ok(None) with the action
/// pushed to `out` for anything else.
pub fn decode_raw<'a>(text: &'a str, out: &mut Vec<ClientAction>) -> Result<Option<Vec<Cow<'a, str>>>, RawError> {
    let Ok(frame) = serde_json::from_str::<ClientFrame<'a>>(text) else {
        return Err(RawError("expected a JSON ack, block or unblock"));
    };
    match &*frame.kind {
        "ack" => {
            let listed = frame.ids.unwrap_or_default();
            if listed.len() > ACK_IDS_MAX {
                return Err(RawError("too many ids in one ack"));
            }
            let mut ids = Vec::with_capacity(listed.len() + 1);
            ids.extend(frame.id.map(|t| t.0));
            ids.extend(listed.into_iter().map(|t| t.0));
            Ok(Some(ids))
        }
        "block" | "unblock" => {
            let Some(from) = frame.from.map(|t| t.0).filter(|c| !c.is_empty()) else {
                return Err(RawError("block and unblock need a `from` client id"));
            };
            out.push(ClientAction::Block { from: from.into_owned(), blocked: frame.kind == "block", call: None });
            Ok(None)
        }
        _ => Err(RawError("unsupported message type")),
    }
}

/// A raw client frame the session refuses (closed with `Policy`).
#[derive(Debug, PartialEq, Eq)]
pub struct RawError(pub &'static str);

/// What a client asks of its session, whatever the wire encoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientAction {
    /// Acknowledge these ids; `call` is the hub invocation id of a client
    /// that waits for a completion once the acks are journaled.
    Ack { ids: Vec<String>, call: Option<String> },
    /// Block (or unblock) a sender.
    Block { from: String, blocked: bool, call: Option<String> },
    /// A hub invocation that cannot be served (unknown method, streaming):
    /// answer this completion error and keep the connection.
    Refuse { call: String, error: String },
    /// The client closes the session (a hub close message).
    Close,
    /// Nothing to do: a hub ping, or a record the hub ignores.
    Nothing,
}

/// The two encodings of a session over one session loop: the raw JSON
/// frames of `/v1/connect`, or the SignalR JSON hub protocol of `/v1/hub`
/// (`super::signalr`). Delivery, acks, blocks, limits and keep-alive are the
/// same code for both; only the bytes on the wire differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    Raw,
    Hub,
}

/// When a session sends keep-alives and when it gives up on a silent peer.
#[derive(Clone, Copy)]
struct KeepAlive {
    /// Send a keep-alive after this long quiet.
    interval: Duration,
    /// Quiet means: nothing *sent* for `interval` (SignalR's keep-alive),
    /// else nothing *heard* (the raw API's ping).
    from_sent: bool,
    /// Drop the connection after this long without a frame from the client.
    timeout: Duration,
}

impl Wire {
    fn keep_alive(self, cfg: &crate::config::MobileConfig) -> KeepAlive {
        match self {
            Wire::Raw => KeepAlive {
                interval: Duration::from_millis(cfg.ping_interval_ms),
                from_sent: false,
                timeout: Duration::from_millis(cfg.ping_interval_ms * 2),
            },
            Wire::Hub => KeepAlive {
                interval: Duration::from_millis(cfg.hub_keep_alive_ms),
                from_sent: true,
                timeout: Duration::from_millis(cfg.hub_client_timeout_ms),
            },
        }
    }

    fn keep_alive_message(self) -> Message {
        match self {
            Wire::Raw => Message::Ping(Vec::new()),
            Wire::Hub => Message::Text(signalr::PING.to_owned()),
        }
    }

    /// What wraps a raw delivery frame on this wire: (before, after).
    fn delivery_envelope(self) -> (&'static str, &'static str) {
        match self {
            Wire::Raw => ("", ""),
            Wire::Hub => (signalr::RECEIVE_MESSAGE_HEAD, signalr::RECEIVE_MESSAGE_TAIL),
        }
    }

    /// The answer to an ack, sent once it is journaled; None: no answer.
    fn acked(self, call: Option<&str>) -> Option<String> {
        match (self, call) {
            (Wire::Hub, Some(call)) => Some(signalr::completion(call, None)),
            _ => None,
        }
    }

    /// The answer to a block or unblock: `outcome` is the raw frame's
    /// `type` (`blocked`, `unblocked`) or an error code.
    fn block_answer(self, client: &str, outcome: Result<&str, &str>, call: Option<&str>) -> Option<String> {
        match (self, outcome) {
            (Wire::Raw, Ok(kind)) => Some(block_frame(kind, client, None)),
            (Wire::Raw, Err(code)) => Some(block_frame("error", client, Some(code))),
            (Wire::Hub, Ok(kind)) => call.map(|c| signalr::completion(c, Some(&block_frame(kind, client, None)))),
            (Wire::Hub, Err(code)) => call.map(|c| signalr::completion_error(c, &block_error_text(code))),
        }
    }

    /// What the hub sends before closing the WebSocket: a close message
    /// (with an error unless the client asked to close). None for raw.
    fn close_message(self, code: CloseCode, reason: &str) -> Option<String> {
        match (self, code) {
            (Wire::Raw, _) => None,
            (Wire::Hub, CloseCode::Normal) => Some(signalr::close(None, false)),
            // The engine stops or its journal failed: reconnecting is right.
            (Wire::Hub, CloseCode::Away | CloseCode::Error) => Some(signalr::close(Some(reason), true)),
            (Wire::Hub, _) => Some(signalr::close(Some(reason), false)),
        }
    }
}

fn block_error_text(code: &str) -> String {
    match code {
        "unknown_client" => "unknown_client: no business client has that id".into(),
        "too_many_blocks" => format!("too_many_blocks: the user already blocks {BLOCKED_CLIENTS_PER_USER_MAX} clients"),
        other => other.into(),
    }
}

/// What an incoming frame asks of the session.
enum Reply {
    /// Nothing to answer.
    None,
    /// Answer with this text frame once `generation` is durable.
    After { generation: u64, text: String },
    /// Answer with this text frame now.
    Now(String),
}

/// What one [`Session::deliver_batch`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Delivered {
    /// Nothing was ready.
    Nothing,
    /// Wrote all that was ready when it looked.
    All,
    /// Wrote a batch; more may be ready now.
    More,
}

enum Event {
    Incoming(Option<Result<Message, tungstenite::Error>>),
    Notified,
    Tick,
    Shutdown,
}

/// How a session ends.
enum End {
    /// Send a close frame with this code (after the hub's close message),
    /// then drop.
    Close(CloseCode, Cow<'static, str>),
    /// Just drop the socket (peer gone, or it cannot take writes).
    Drop,
}

impl End {
    const fn close(code: CloseCode, reason: &'static str) -> End {
        End::Close(code, Cow::Borrowed(reason))
    }
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
        if !self.shard.sessions().has(&self.user) {
            self.shard.backlog_user_left(&self.user);
        }
    }
}

/// Answers `101` and wraps the socket in a WebSocket; None if the peer is gone.
async fn upgrade(shard: &Shard, mut stream: TcpStream, accept_key: &str) -> Option<WebSocketStream<TcpStream>> {
    let cfg = &shard.cfg().mobile;
    let _ = stream.set_write_timeout(Some(Duration::from_millis(cfg.write_timeout_ms)));
    let _ = stream.set_read_timeout(None);
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept_key}\r\n\r\n"
    );
    stream.write_all(response.as_bytes()).await.ok()?;
    let ws_cfg = WebSocketConfig {
        max_message_size: Some(cfg.max_message_bytes),
        max_frame_size: Some(cfg.max_message_bytes),
        write_buffer_size: WS_WRITE_BUFFER_BYTES,
        max_write_buffer_size: ws_write_buffer_bytes_max(shard.cfg().business.max_body_bytes),
        accept_unmasked_frames: false,
        ..Default::default()
    };
    Some(WebSocketStream::from_raw_socket(stream, Role::Server, Some(ws_cfg)).await)
}

/// Answers `101` and runs the session until it ends.
pub async fn start(shard: Rc<Shard>, stream: TcpStream, user: String, accept_key: &str, wire: Wire) {
    // The shutdown drain waits for this pass; none once it began.
    let Some(_pass) = shard.shutdown().enter() else { return };
    let Some(mut ws) = upgrade(&shard, stream, accept_key).await else { return };
    // The hub's handshake comes first: nothing is delivered before it.
    let first = match wire {
        Wire::Raw => String::new(),
        Wire::Hub => match hub_handshake(&shard, &mut ws).await {
            Ok(rest) => rest,
            Err(end) => return finish(&mut ws, wire, end).await,
        },
    };
    let user: Rc<str> = Rc::from(user);
    if shard.enter_directory(&user).is_err() {
        return finish(&mut ws, wire, End::close(CloseCode::Error, "storage unavailable")).await;
    }
    let signal = shard.sessions().register(&user);
    let registration = Registration { shard: shard.clone(), user: user.clone(), signal: signal.clone() };
    let keep_alive = wire.keep_alive(&shard.cfg().mobile);
    let now = Instant::now();
    let mut session = Session {
        shard: &shard,
        ws: &mut ws,
        wire,
        user: &user,
        keep_alive,
        last_heard: now,
        last_sent: now,
        last_ping: now,
        actions: Vec::new(),
    };
    let end = session.serve(&signal, &first).await;
    drop(registration);
    finish(&mut ws, wire, end).await;
}

/// A hub connection whose token was refused: upgrade, wait for the
/// handshake, and answer it with `error`, so the client shows the reason
/// (a refused upgrade only shows a status code).
pub async fn refuse_hub(shard: Rc<Shard>, stream: TcpStream, accept_key: &str, error: String) {
    let Some(_pass) = shard.shutdown().enter() else { return };
    let Some(mut ws) = upgrade(&shard, stream, accept_key).await else { return };
    match read_handshake(&shard, &mut ws).await {
        Ok(_) => {
            let _ = ws.feed(Message::Text(signalr::handshake_error(&error))).await;
            finish(&mut ws, Wire::Hub, End::Close(CloseCode::Policy, error.into())).await;
        }
        Err(end) => finish(&mut ws, Wire::Hub, end).await,
    }
}

/// Reads the hub handshake request and accepts it; returns the records
/// that followed it in its message. A refusal is answered here (handshake
/// response with the error); the returned end then closes the connection.
async fn hub_handshake(shard: &Shard, ws: &mut WebSocketStream<TcpStream>) -> Result<String, End> {
    match read_handshake(shard, ws).await? {
        Ok(rest) => {
            ws.send(Message::Text(signalr::HANDSHAKE_OK.to_owned())).await.map_err(|_| End::Drop)?;
            Ok(rest)
        }
        Err(error) => {
            let _ = ws.feed(Message::Text(signalr::handshake_error(&error))).await;
            Err(End::Close(CloseCode::Policy, error))
        }
    }
}

/// Reads the handshake request within `mobile.handshake_timeout_ms`:
/// Ok(Ok(what follows it)), Ok(Err(why it is refused)), or Err(end) when
/// the peer is gone or broke the WebSocket protocol.
async fn read_handshake(
    shard: &Shard,
    ws: &mut WebSocketStream<TcpStream>,
) -> Result<Result<String, Cow<'static, str>>, End> {
    let wait = Duration::from_millis(shard.cfg().mobile.handshake_timeout_ms);
    let first = futures_lite::future::or(async { Some(ws.next().await) }, async {
        glommio::timer::sleep(wait).await;
        None
    })
    .await;
    let Some(incoming) = first else {
        return Ok(Err(Cow::Borrowed("handshake timeout: no handshake request within mobile.handshake_timeout_ms")));
    };
    Ok(match incoming_message(incoming)? {
        Message::Text(text) => signalr::parse_handshake(&text).map(str::to_owned).map_err(|e| Cow::Owned(e.0)),
        Message::Close(_) => return Err(End::Drop),
        _ => Err(Cow::Borrowed("malformed handshake: expected a text message with the handshake request")),
    })
}

/// Ends a session: the hub's close message, then the WebSocket close
/// frame (within 2 s), or nothing for a dropped peer.
async fn finish(ws: &mut WebSocketStream<TcpStream>, wire: Wire, end: End) {
    let End::Close(code, reason) = end else { return };
    let close = async {
        if let Some(text) = wire.close_message(code, &reason) {
            let _ = ws.feed(Message::Text(text)).await;
        }
        let frame = CloseFrame { code, reason: close_reason(&reason).to_owned().into() };
        let _ = ws.close(Some(frame)).await;
    };
    let timeout = async {
        glommio::timer::sleep(Duration::from_secs(2)).await;
    };
    futures_lite::future::or(close, timeout).await;
}

/// A close frame's reason holds at most 123 bytes (RFC 6455 5.5): cut at
/// a character boundary. (The hub's close message carries the whole text.)
fn close_reason(reason: &str) -> &str {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

/// One session's loop state.
struct Session<'a> {
    shard: &'a Rc<Shard>,
    ws: &'a mut WebSocketStream<TcpStream>,
    wire: Wire,
    user: &'a Rc<str>,
    keep_alive: KeepAlive,
    last_heard: Instant,
    last_sent: Instant,
    last_ping: Instant,
    /// Reused buffer of decoded client actions.
    actions: Vec<ClientAction>,
}

impl Session<'_> {
    /// The session loop. It spends its life waiting in the `select` below,
    /// and an async fn's future is as large as its largest await point: the
    /// work that follows an event (delivery, an incoming frame) is boxed,
    /// so an idle session holds only the wait (docs/PERFORMANCE.md, memory
    /// per idle WebSocket). One allocation per event, against a system call.
    async fn serve(&mut self, signal: &SessionSignal, first: &str) -> End {
        if !first.is_empty() {
            if let Err(end) = Box::pin(self.on_text(first)).await {
                return end;
            }
        }
        let mut cursor = Cursor::default();
        loop {
            if self.shard.shutdown().is_set() {
                return End::close(CloseCode::Away, "server shutting down");
            }
            // Deliver what is ready: pending first, live after, one order.
            match Box::pin(self.deliver_batch(&mut cursor)).await {
                Err(end) => return end,
                Ok(Delivered::Nothing) => {}
                Ok(sent) => {
                    // Take the acks that arrived meanwhile without waiting.
                    let mut acks = false;
                    while let Some(incoming) = futures_lite::future::poll_once(self.ws.next()).await {
                        if let Err(end) = Box::pin(self.on_incoming(incoming)).await {
                            return end;
                        }
                        acks = true;
                    }
                    // Look again if more may be ready, or if what came in
                    // freed room under `max_inflight`; a batch that took all
                    // that was ready needs no second look (one fewer pass
                    // per delivered message at light load).
                    if sent == Delivered::More || acks {
                        continue;
                    }
                }
            }
            let wait = match self.keep_alive_due().await {
                Ok(wait) => wait,
                Err(end) => return end,
            };
            let event = {
                let next = async { Event::Incoming(self.ws.next().await) };
                let notified = async {
                    signal.wait().await;
                    Event::Notified
                };
                let tick = async {
                    glommio::timer::sleep(wait).await;
                    Event::Tick
                };
                let stop = async {
                    self.shard.shutdown().wait().await;
                    Event::Shutdown
                };
                futures_lite::future::or(futures_lite::future::or(next, notified), futures_lite::future::or(stop, tick))
                    .await
            };
            match event {
                Event::Incoming(incoming) => {
                    if let Err(end) = Box::pin(self.on_incoming(incoming)).await {
                        return end;
                    }
                }
                Event::Notified | Event::Tick => {}
                Event::Shutdown => return End::close(CloseCode::Away, "server shutting down"),
            }
        }
    }

    /// Drops a silent peer, sends a keep-alive when one is due; returns how
    /// long to wait before the next check.
    async fn keep_alive_due(&mut self) -> Result<Duration, End> {
        let ka = self.keep_alive;
        let now = Instant::now();
        let silent = now - self.last_heard;
        if silent >= ka.timeout {
            return Err(End::Drop); // dead peer
        }
        let mut quiet_since = if ka.from_sent { self.last_sent } else { self.last_heard.max(self.last_ping) };
        if now - quiet_since >= ka.interval {
            self.send(self.wire.keep_alive_message()).await?;
            self.last_ping = now;
            quiet_since = now;
        }
        Ok((ka.timeout - silent).min(ka.interval.saturating_sub(now - quiet_since)))
    }

    async fn send(&mut self, msg: Message) -> Result<(), End> {
        self.ws.send(msg).await.map_err(|_| End::Drop)?;
        self.last_sent = Instant::now();
        Ok(())
    }

    /// Writes the next batch of deliverable messages and journals them as
    /// delivered. Err(end) ends the session.
    async fn deliver_batch(&mut self, cursor: &mut Cursor) -> Result<Delivered, End> {
        let shard = self.shard;
        // The user's cold messages come back into the journal first (docs/ARCHITECTURE.md, "Offline backlog").
        if let Err(e) = shard.backlog_ready(self.user).await {
            tracing::error!(shard = shard.id(), error = %e, "cannot bring a user's backlog back from the cold store");
            return Err(End::close(CloseCode::Error, "storage unavailable"));
        }
        let barrier = shard.backlog_barrier(self.user);
        let inflight_max = shard.cfg().mobile.max_inflight;
        let batch = shard.deliverable(self.user, cursor, inflight_max, barrier);
        if batch.is_empty() {
            return Ok(Delivered::Nothing);
        }
        // A batch cut at a bound, or held back by the backlog, may leave
        // messages ready now. Otherwise what becomes ready later notifies
        // the session (a commit, a restore), so no second look is due.
        let more = batch.len() >= DELIVERY_BATCH_MAX.min(inflight_max) || barrier != Barrier::All;
        let envelope = self.wire.delivery_envelope();
        let mut sent = Vec::with_capacity(batch.len());
        for &(priority, seq) in &batch {
            match shard.message_text(seq, envelope).await {
                Ok(Some(text)) => {
                    if self.ws.feed(Message::Text(text)).await.is_err() {
                        return Err(End::Drop); // slow reader or gone: messages stay pending
                    }
                    sent.push(seq);
                }
                Ok(None) => {} // settled meanwhile
                Err(e) => {
                    tracing::error!(shard = shard.id(), seq, error = %e, "cannot read a message back for delivery");
                    return Err(End::close(CloseCode::Error, "internal error"));
                }
            }
            cursor.after[priority as usize] = Some(seq);
        }
        if self.ws.flush().await.is_err() {
            return Err(End::Drop);
        }
        self.last_sent = Instant::now();
        shard.record_delivered(&sent);
        Ok(if more { Delivered::More } else { Delivered::All })
    }

    /// Handles one incoming WebSocket message; Err(end) ends the session.
    async fn on_incoming(&mut self, incoming: Option<Result<Message, tungstenite::Error>>) -> Result<(), End> {
        self.last_heard = Instant::now();
        match incoming_message(incoming)? {
            Message::Text(text) => self.on_text(&text).await,
            Message::Binary(_) => Err(End::close(CloseCode::Unsupported, "binary frames are not supported")),
            Message::Close(_) => Err(End::close(CloseCode::Normal, "bye")), // completes the close handshake
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => Ok(()),
        }
    }

    /// Decodes a text message and does what it asks, answering each request.
    async fn on_text(&mut self, text: &str) -> Result<(), End> {
        let mut actions = std::mem::take(&mut self.actions);
        let mut result = match self.wire {
            // A raw ack is answered by nothing: journal it straight from the
            // borrowed ids.
            Wire::Raw => match decode_raw(text, &mut actions) {
                Ok(Some(ids)) => {
                    self.shard.record_acks(self.user, ids.iter().map(|id| &**id));
                    Ok(())
                }
                Ok(None) => Ok(()),
                Err(RawError(why)) => Err(End::close(CloseCode::Policy, why)),
            },
            Wire::Hub => {
                signalr::parse_records(text, &mut actions).map_err(|e| End::Close(CloseCode::Policy, e.0.into()))
            }
        };
        for action in actions.drain(..) {
            if result.is_err() {
                break;
            }
            result = match self.act(action) {
                Ok(reply) => self.answer(reply).await,
                Err(end) => Err(end),
            };
        }
        self.actions = actions;
        result
    }

    /// Does what one client action asks (journals acks, blocks).
    fn act(&self, action: ClientAction) -> Result<Reply, End> {
        match action {
            ClientAction::Ack { ids, call } => {
                self.shard.record_acks(self.user, ids.iter().map(String::as_str));
                Ok(match self.wire.acked(call.as_deref()) {
                    Some(text) => Reply::After { generation: self.shard.journal().appended_generation(), text },
                    None => Reply::None,
                })
            }
            ClientAction::Block { from, blocked, call } => self.on_block(&from, blocked, call.as_deref()),
            ClientAction::Refuse { call, error } => Ok(Reply::Now(signalr::completion_error(&call, &error))),
            ClientAction::Close => Err(End::close(CloseCode::Normal, "bye")),
            ClientAction::Nothing => Ok(Reply::None),
        }
    }

    /// A block or unblock: journals the change on this (the user's home)
    /// shard and answers once it is durable.
    fn on_block(&self, client: &str, blocked: bool, call: Option<&str>) -> Result<Reply, End> {
        use crate::users::BlockError;
        let kind = if blocked { "blocked" } else { "unblocked" };
        let (generation, outcome) = match self.shard.set_block(self.user, client, blocked) {
            Ok(generation) => (Some(generation), Ok(kind)),
            Err(BlockError::UnknownClient) => (None, Err("unknown_client")),
            Err(BlockError::TooManyBlocks) => (None, Err("too_many_blocks")),
            Err(BlockError::Journal(_)) => return Err(End::close(CloseCode::Error, "storage unavailable")),
        };
        Ok(match (self.wire.block_answer(client, outcome, call), generation) {
            (None, _) => Reply::None,
            (Some(text), Some(generation)) => Reply::After { generation, text },
            (Some(text), None) => Reply::Now(text),
        })
    }

    /// Writes what an incoming frame asked for; Err(end) ends the session.
    async fn answer(&mut self, reply: Reply) -> Result<(), End> {
        let text = match reply {
            Reply::None => return Ok(()),
            Reply::Now(text) => text,
            Reply::After { generation, text } => {
                if self.shard.journal().wait_durable(generation).await.is_err() {
                    return Err(End::close(CloseCode::Error, "storage unavailable"));
                }
                text
            }
        };
        self.send(Message::Text(text)).await
    }
}

/// `{"type":kind,"from":client}`, or with an error `code`.
fn block_frame(kind: &str, client: &str, code: Option<&str>) -> String {
    let mut b = Vec::with_capacity(64 + client.len());
    b.extend_from_slice(b"{\"type\":");
    crate::http::json_string(&mut b, kind);
    if let Some(code) = code {
        b.extend_from_slice(b",\"code\":");
        crate::http::json_string(&mut b, code);
    }
    b.extend_from_slice(b",\"from\":");
    crate::http::json_string(&mut b, client);
    b.push(b'}');
    String::from_utf8_lossy(&b).into_owned()
}

/// The message read, or how a read error ends the session.
fn incoming_message(incoming: Option<Result<Message, tungstenite::Error>>) -> Result<Message, End> {
    use tungstenite::error::{CapacityError, Error, ProtocolError};
    match incoming {
        None => Err(End::Drop),
        Some(Ok(m)) => Ok(m),
        Some(Err(Error::Capacity(CapacityError::MessageTooLong { .. }))) => {
            Err(End::close(CloseCode::Size, "message too big: over mobile.max_message_bytes"))
        }
        Some(Err(Error::Capacity(_))) => {
            Err(End::close(CloseCode::Size, "frame too big: over mobile.max_message_bytes"))
        }
        Some(Err(Error::Utf8)) => Err(End::close(CloseCode::Invalid, "invalid UTF-8")),
        Some(Err(Error::Protocol(ProtocolError::UnmaskedFrameFromClient))) => {
            Err(End::close(CloseCode::Protocol, "client frames must be masked"))
        }
        Some(Err(Error::Protocol(_))) => Err(End::close(CloseCode::Protocol, "protocol error")),
        Some(Err(_)) => Err(End::Drop),
    }
}

#[cfg(test)]
mod tests {
    use std::io::{self, Read};

    use super::{decode_raw, ClientAction, RawError};

    #[test]
    fn raw_ack_ids_are_borrowed_and_keep_their_order() {
        let mut out = Vec::new();
        let text = r#"{"type":"ack","id":"A","ids":["B","C"]}"#;
        let ids = decode_raw(text, &mut out).unwrap().unwrap();
        assert_eq!(ids, ["A", "B", "C"]);
        assert!(ids.iter().all(|id| matches!(id, std::borrow::Cow::Borrowed(_))));
        assert!(out.is_empty());
        // An escaped id is still read right (owned then).
        let ids = decode_raw(r#"{"type":"ack","ids":["\u0041"]}"#, &mut out).unwrap().unwrap();
        assert_eq!(ids, ["A"]);
        assert_eq!(decode_raw(r#"{"type":"ack"}"#, &mut out).unwrap().unwrap().len(), 0);
    }

    #[test]
    fn raw_frames_other_than_acks() {
        let mut out = Vec::new();
        assert_eq!(decode_raw(r#"{"type":"block","from":"acme"}"#, &mut out), Ok(None));
        assert_eq!(out, [ClientAction::Block { from: "acme".into(), blocked: true, call: None }]);
        let cases = [
            ("not json", "expected a JSON ack, block or unblock"),
            (r#"{"type":"unblock","from":""}"#, "block and unblock need a `from` client id"),
            (r#"{"type":"nope"}"#, "unsupported message type"),
        ];
        for (text, why) in cases {
            assert_eq!(decode_raw(text, &mut out), Err(RawError(why)), "{text}");
        }
        let many = format!(r#"{{"type":"ack","ids":[{}]}}"#, vec!["\"x\""; super::ACK_IDS_MAX + 1].join(","));
        assert_eq!(decode_raw(&many, &mut out), Err(RawError("too many ids in one ack")));
    }

    /// A socket that yields `data` once, then has nothing (`WouldBlock`).
    struct Once(Option<Vec<u8>>);

    impl Read for Once {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            match self.0.take() {
                Some(data) => {
                    buf[..data.len()].copy_from_slice(&data);
                    Ok(data.len())
                }
                None => Err(io::ErrorKind::WouldBlock.into()),
            }
        }
    }

    /// Canary for the patched tungstenite (vendor/tungstenite/ESH3AR-PATCH.md):
    /// an idle connection's read buffer holds no memory. Fails if the
    /// `[patch.crates-io]` entry is dropped for a tungstenite that keeps one.
    #[test]
    fn tungstenite_read_buffer_is_released_when_idle() {
        let mut buffer = tungstenite::buffer::ReadBuffer::<4096>::new();
        assert_eq!(buffer.as_cursor().get_ref().capacity(), 0, "nothing allocated before the first read");
        let mut socket = Once(Some(b"hello".to_vec()));
        assert_eq!(buffer.read_from(&mut socket).unwrap(), 5);
        assert_eq!(bytes::Buf::chunk(&buffer), b"hello");
        // Unread bytes are kept across an empty read.
        assert!(buffer.read_from(&mut socket).is_err());
        assert_eq!(bytes::Buf::chunk(&buffer), b"hello");
        // All consumed and the socket empty: the storage is given back.
        bytes::Buf::advance(&mut buffer, 5);
        assert!(buffer.read_from(&mut socket).is_err());
        assert_eq!(buffer.as_cursor().get_ref().capacity(), 0);
    }
}
