//! The mobile listener: `GET /v1/connect` upgrades to a WebSocket (RFC 6455)
//! after the token is checked, and the session runs on the user's home
//! shard. `/v1/hub` is the same session in the SignalR hub protocol
//! (`signalr`): `POST /v1/hub/negotiate` answers the transport negotiation,
//! `GET /v1/hub` upgrades.
//!
//! Every shard accepts mobile connections (SO_REUSEPORT). When the upgrade
//! request arrives on a shard other than the user's home, the accepting
//! shard hands the socket itself over: it `dup`s the descriptor, sends it in
//! [`MeshMsg::Adopt`], and closes its own copy; the home shard writes the
//! `101` and serves every frame. A hand-off costs one mesh message per
//! connection, where relaying would cost one per frame in both directions,
//! and it keeps all of a user's state on one core (docs/ARCHITECTURE.md).

pub mod session;
pub mod signalr;

use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;

use crate::http::{write_error, HttpError, HEADERS_MAX, HEAD_BYTES_MAX};
use crate::shard::{MeshMsg, Shard};
use crate::token::{verify, TokenError};
use session::Wire;

/// A connection travelling to its home shard. Owns the descriptor: it is
/// closed if the adoption never happens.
#[derive(Debug)]
pub struct Adoption {
    fd: RawFd,
    user: String,
    accept_key: String,
    wire: Wire,
}

impl Adoption {
    fn take_fd(&mut self) -> RawFd {
        std::mem::replace(&mut self.fd, -1)
    }
}

impl Drop for Adoption {
    fn drop(&mut self) {
        if self.fd >= 0 {
            // SAFETY: we own this descriptor (a dup nobody else holds).
            unsafe { libc::close(self.fd) };
        }
    }
}

/// A valid upgrade request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upgrade {
    pub user: String,
    /// The `Sec-WebSocket-Accept` value to answer with.
    pub accept_key: String,
    /// Raw frames (`/v1/connect`) or the SignalR hub protocol (`/v1/hub`).
    pub wire: Wire,
}

/// What the bytes so far of an upgrade request hold.
#[derive(Debug, PartialEq, Eq)]
pub enum Handshake {
    Partial,
    Upgrade(Upgrade),
    /// `POST /v1/hub/negotiate` with a valid token: answer the negotiate response.
    Negotiate,
    /// A hub upgrade whose token is refused: upgrade, then refuse in the hub
    /// protocol (handshake error, close message), so the client sees why.
    RefuseHub {
        accept_key: String,
        error: String,
    },
    Refuse(HttpError),
}

const fn refuse(status: u16, code: &'static str, message: &'static str) -> Handshake {
    Handshake::Refuse(HttpError::closing(status, code, message))
}

/// Where a mobile request goes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Route {
    Connect,
    Hub,
    Negotiate,
}

/// Checks an upgrade (or hub negotiate) request (sans-io): path, method,
/// token, then the WebSocket headers. The token comes from
/// `Authorization: Bearer` or the query: `token` on `/v1/connect`
/// (browsers cannot set headers), `access_token` on `/v1/hub` (what the
/// SignalR clients send).
pub fn check_upgrade(buf: &[u8], secret: &[u8], now_secs: u64) -> Handshake {
    let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) if buf.len() < HEAD_BYTES_MAX => return Handshake::Partial,
        Ok(httparse::Status::Partial) | Err(httparse::Error::TooManyHeaders) => {
            return refuse(431, "headers_too_large", "request head exceeds 8 KiB or 64 fields")
        }
        Err(_) => return refuse(400, "bad_request", "malformed HTTP request"),
    }
    let target = req.path.unwrap_or("");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let (route, method, token_param) = match path {
        "/v1/connect" => (Route::Connect, "GET", "token="),
        "/v1/hub" => (Route::Hub, "GET", "access_token="),
        "/v1/hub/negotiate" => (Route::Negotiate, "POST", "access_token="),
        _ => return refuse(404, "not_found", "no such endpoint; connect to /v1/connect or /v1/hub"),
    };
    if req.method != Some(method) {
        return match route {
            Route::Negotiate => refuse(405, "method_not_allowed", "use POST to negotiate"),
            _ => refuse(405, "method_not_allowed", "use GET with a WebSocket upgrade"),
        };
    }
    let header = |name: &str| req.headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).map(|h| h.value);
    let token = header("authorization")
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.get(..7).filter(|s| s.eq_ignore_ascii_case("bearer ")).map(|_| v[7..].trim()))
        .or_else(|| query.split('&').find_map(|kv| kv.strip_prefix(token_param)));
    let user = match token.filter(|t| !t.is_empty()) {
        None => Err(HttpError::closing(
            401,
            "token_missing",
            "a token is required (Authorization: Bearer, or ?token= on /v1/connect, ?access_token= on /v1/hub)",
        )),
        Some(token) => match verify(secret, token, now_secs) {
            Ok(user) => Ok(user),
            Err(TokenError::Expired) => Err(HttpError::closing(401, "token_expired", "the token has expired")),
            Err(TokenError::BadSignature) => {
                Err(HttpError::closing(401, "token_invalid", "the token signature is invalid"))
            }
            Err(_) => Err(HttpError::closing(401, "token_invalid", "the token is malformed")),
        },
    };
    if route == Route::Negotiate {
        return match user {
            Ok(_) => Handshake::Negotiate,
            Err(e) => Handshake::Refuse(e),
        };
    }
    let user = match (user, route) {
        (Err(e), Route::Connect) => return Handshake::Refuse(e),
        (user, _) => user,
    };
    let has_token = |name: &str, want: &str| {
        header(name)
            .is_some_and(|v| v.split(|&b| b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(want.as_bytes())))
    };
    if !has_token("upgrade", "websocket") || !has_token("connection", "upgrade") {
        return refuse(400, "not_websocket", "expected a WebSocket upgrade (Upgrade: websocket, Connection: Upgrade)");
    }
    if header("sec-websocket-version").map(|v| v.trim_ascii()) != Some(b"13") {
        return refuse(400, "not_websocket", "Sec-WebSocket-Version must be 13");
    }
    let Some(key) = header("sec-websocket-key").map(|k| k.trim_ascii()).filter(|k| k.len() == 24) else {
        return refuse(400, "not_websocket", "Sec-WebSocket-Key is missing or malformed");
    };
    let accept_key = tungstenite::handshake::derive_accept_key(key);
    match user {
        Ok(user) => {
            let wire = if route == Route::Hub { Wire::Hub } else { Wire::Raw };
            Handshake::Upgrade(Upgrade { user, accept_key, wire })
        }
        Err(e) => Handshake::RefuseHub { accept_key, error: format!("{}: {}", e.code, e.message) },
    }
}

/// Serves a new connection on the mobile listener: read and check the
/// upgrade request, then serve the session here or hand it to the home shard.
pub async fn serve_conn(shard: Rc<Shard>, mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let deadline = Instant::now() + Duration::from_millis(shard.cfg().mobile.handshake_timeout_ms);
    // The request buffer lives in this block only: a local of an async fn
    // otherwise stays allocated until the function returns, i.e. for the
    // whole session served below (2 KiB per idle connection).
    let upgrade = {
        let mut buf = vec![0u8; 2048];
        let mut len = 0;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return refuse_conn(
                    stream,
                    &HttpError::closing(408, "request_timeout", "upgrade request not completed in time"),
                )
                .await;
            }
            let _ = stream.set_read_timeout(Some(remaining));
            if len == buf.len() {
                buf.resize((buf.len() * 2).min(HEAD_BYTES_MAX + 1), 0);
            }
            match stream.read(&mut buf[len..]).await {
                Ok(0) | Err(_) => return,
                Ok(n) => len += n,
            }
            let now = crate::clock::now_ms() / 1000;
            match check_upgrade(&buf[..len], shard.cfg().mobile.token_secret.as_bytes(), now) {
                Handshake::Partial => continue,
                Handshake::Refuse(e) => return refuse_conn(stream, &e).await,
                Handshake::Negotiate => return negotiate(stream).await,
                Handshake::RefuseHub { accept_key, error } => {
                    return session::refuse_hub(shard, stream, &accept_key, error).await
                }
                Handshake::Upgrade(u) => break u,
            }
        }
    };
    let _ = stream.set_read_timeout(None);
    let home = crate::route(&upgrade.user, shard.count());
    if home == shard.id() {
        // Its own task, as an adopted session: this task's future (sized for
        // the handshake and the hand-over) is freed rather than kept around
        // the session's for the connection's life.
        let Upgrade { user, accept_key, wire } = upgrade;
        glommio::spawn_local(async move { session::start(shard, stream, user, &accept_key, wire).await }).detach();
        return;
    }
    // SAFETY: dup of a descriptor we own; the copy is owned by the Adoption.
    let fd = unsafe { libc::dup(stream.as_raw_fd()) };
    if fd < 0 {
        return refuse_conn(stream, &HttpError::closing(503, "overloaded", "cannot hand the connection over")).await;
    }
    let adoption = Adoption { fd, user: upgrade.user, accept_key: upgrade.accept_key, wire: upgrade.wire };
    // Waits for room in the channel (bounded): a full channel is
    // backpressure, not a reason to refuse the phone.
    if shard.send(home, MeshMsg::Adopt(Box::new(adoption))).await.is_err() {
        // The Adoption (and its fd) was dropped with the unsent message.
        return refuse_conn(stream, &HttpError::closing(503, "overloaded", "the engine is at capacity; retry later"))
            .await;
    }
    // The home shard owns the socket now; our descriptor closes on drop.
    drop(stream);
}

/// Runs on the home shard: take over a socket handed over by another shard.
pub fn adopt(shard: Rc<Shard>, mut adoption: Adoption) {
    if shard.shutdown().is_set() {
        return; // dropping the adoption closes the socket
    }
    let fd = adoption.take_fd();
    // SAFETY: `fd` is an open TCP socket descriptor that we now own alone.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    let user = std::mem::take(&mut adoption.user);
    let accept_key = std::mem::take(&mut adoption.accept_key);
    let wire = adoption.wire;
    glommio::spawn_local(async move { session::start(shard, stream, user, &accept_key, wire).await }).detach();
}

/// Answers a hub negotiate request (negotiate version 1) and closes: the
/// client's next request is the WebSocket upgrade, on a new connection.
async fn negotiate(mut stream: TcpStream) {
    let body = signalr::negotiate_response(&signalr::random_id(), &signalr::random_id());
    let mut out = Vec::with_capacity(256);
    crate::http::write_response(&mut out, 200, "", body.as_bytes(), false);
    let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
    let _ = stream.write_all(&out).await;
}

async fn refuse_conn(mut stream: TcpStream, e: &HttpError) {
    let mut out = Vec::new();
    write_error(&mut out, e.status, e.code, e.message, "", false);
    let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
    let _ = stream.write_all(&out).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::mint;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn req(target: &str, auth: Option<&str>) -> String {
        let mut r = format!(
            "GET {target} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        );
        if let Some(a) = auth {
            r += &format!("Authorization: {a}\r\n");
        }
        r + "\r\n"
    }

    fn code(h: Handshake) -> (u16, &'static str) {
        match h {
            Handshake::Refuse(e) => (e.status, e.code),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn accepts_header_and_query_tokens() {
        let t = mint(SECRET, "alice", 100, 200);
        for r in [req("/v1/connect", Some(&format!("Bearer {t}"))), req(&format!("/v1/connect?token={t}"), None)] {
            let Handshake::Upgrade(u) = check_upgrade(r.as_bytes(), SECRET, 150) else { panic!() };
            assert_eq!(u.user, "alice");
            assert_eq!(u.accept_key, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="); // RFC 6455 section 1.3
        }
    }

    #[test]
    fn refuses_bad_tokens_and_requests() {
        let t = mint(SECRET, "alice", 100, 200);
        assert_eq!(code(check_upgrade(req("/v1/connect", None).as_bytes(), SECRET, 150)), (401, "token_missing"));
        assert_eq!(
            code(check_upgrade(req("/v1/connect?token=abc", None).as_bytes(), SECRET, 150)),
            (401, "token_invalid")
        );
        let r = req("/v1/connect", Some(&format!("Bearer {t}")));
        assert_eq!(code(check_upgrade(r.as_bytes(), SECRET, 250)), (401, "token_expired"));
        assert_eq!(
            code(check_upgrade(r.as_bytes(), b"another secret, also 32 bytes long", 150)),
            (401, "token_invalid")
        );
        assert_eq!(code(check_upgrade(req("/elsewhere", None).as_bytes(), SECRET, 150)), (404, "not_found"));
        let plain = format!("GET /v1/connect HTTP/1.1\r\nAuthorization: Bearer {t}\r\n\r\n");
        assert_eq!(code(check_upgrade(plain.as_bytes(), SECRET, 150)), (400, "not_websocket"));
        assert_eq!(check_upgrade(b"GET /v1/connect HTTP/1.1\r\nHost", SECRET, 150), Handshake::Partial);
    }

    #[test]
    fn hub_routes_negotiate_upgrade_and_refuse_in_band() {
        let t = mint(SECRET, "alice", 100, 200);
        let neg = |target: &str, auth: Option<&str>| {
            let mut r = format!("POST {target} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n");
            if let Some(a) = auth {
                r += &format!("Authorization: {a}\r\n");
            }
            check_upgrade((r + "\r\n").as_bytes(), SECRET, 150)
        };
        assert_eq!(neg("/v1/hub/negotiate?negotiateVersion=1", Some(&format!("Bearer {t}"))), Handshake::Negotiate);
        assert_eq!(neg(&format!("/v1/hub/negotiate?negotiateVersion=1&access_token={t}"), None), Handshake::Negotiate);
        assert_eq!(code(neg("/v1/hub/negotiate?negotiateVersion=1", None)), (401, "token_missing"));
        assert_eq!(code(neg("/v1/hub/negotiate", Some("Bearer x.y.z"))), (401, "token_invalid"));
        assert_eq!(
            code(check_upgrade(req("/v1/hub/negotiate", None).as_bytes(), SECRET, 150)),
            (405, "method_not_allowed")
        );
        // The WebSocket request, with the id from negotiate and the token in the query.
        let r = req(&format!("/v1/hub?id=abc&access_token={t}"), None);
        let Handshake::Upgrade(u) = check_upgrade(r.as_bytes(), SECRET, 150) else { panic!() };
        assert_eq!((u.user.as_str(), u.wire), ("alice", Wire::Hub));
        let r = req("/v1/connect", Some(&format!("Bearer {t}")));
        let Handshake::Upgrade(u) = check_upgrade(r.as_bytes(), SECRET, 150) else { panic!() };
        assert_eq!(u.wire, Wire::Raw);
        // A bad token on the hub is refused inside the hub protocol, naming the code.
        let Handshake::RefuseHub { error, .. } =
            check_upgrade(req("/v1/hub?access_token=abc", None).as_bytes(), SECRET, 150)
        else {
            panic!()
        };
        assert!(error.starts_with("token_invalid: "), "{error}");
        let r = req("/v1/hub", Some(&format!("Bearer {t}")));
        let Handshake::RefuseHub { error, .. } = check_upgrade(r.as_bytes(), SECRET, 250) else { panic!() };
        assert!(error.starts_with("token_expired: "), "{error}");
        // Not a WebSocket request at all: a plain HTTP refusal.
        let plain = format!("GET /v1/hub HTTP/1.1\r\nAuthorization: Bearer {t}\r\n\r\n");
        assert_eq!(code(check_upgrade(plain.as_bytes(), SECRET, 150)), (400, "not_websocket"));
    }
}
