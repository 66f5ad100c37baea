//! The admin listener (shard 0 only): health, readiness, and the
//! operator's API (`docs/API.md`, "Admin API").
//!
//! `/healthz`, `/readyz`, `/metrics` (Prometheus) and the live dashboard
//! (`/`, `/events`) need no credentials (load balancers, orchestrators and
//! scrapers call them; none shows a message or a user); every other endpoint needs
//! `Authorization: Bearer <admin.token>`, compared in constant time.
//! Requests that need another shard's state go over the mesh from shard 0,
//! like the business API's.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use esh3ar_shards::limits::USER_ID_BYTES_MAX;
use subtle::ConstantTimeEq;

use crate::http::conn::{Handler, Request};
use crate::http::{json_string, write_error, write_response, Method};
use crate::mesh_msg::{DeadLetter, MeshMsg, UserPut};
use crate::outbound::OutboundStatus;
use crate::receipts::{dead_letter_action_local, dead_letters_local, parse_dead_letter_id};
use crate::shard::Shard;
use crate::users::{valid_email, valid_phone, UserView};

/// Most dead letters one `GET /v1/dead-letters` returns.
pub const DEAD_LETTERS_LIMIT_MAX: usize = 1000;

/// What every admin connection shares.
pub struct AdminState {
    ready: Arc<AtomicBool>,
    /// (actor name, token): `admin` for `admin.token`, then `[[admin.tokens]]`.
    tokens: RefCell<Vec<(String, Vec<u8>)>>,
    /// Runtime configuration (set once the store is open).
    config: RefCell<Option<Rc<crate::admin_config::ConfigAdmin>>>,
    /// Shard 0, once its journal is recovered.
    shard: RefCell<Option<Rc<Shard>>>,
    outbound: Option<Arc<OutboundStatus>>,
}

impl AdminState {
    pub fn new(ready: Arc<AtomicBool>, token: &str, outbound: Option<Arc<OutboundStatus>>) -> Rc<AdminState> {
        Rc::new(AdminState {
            ready,
            tokens: RefCell::new(vec![("admin".to_owned(), token.as_bytes().to_vec())]),
            config: RefCell::new(None),
            shard: RefCell::new(None),
            outbound,
        })
    }

    /// The admin tokens of `cfg` (at startup and after each change).
    pub fn set_tokens(&self, cfg: &crate::config::Config) {
        let mut tokens = vec![("admin".to_owned(), cfg.admin.token.as_bytes().to_vec())];
        tokens.extend(cfg.admin.tokens.iter().map(|t| (t.name.clone(), t.token.as_bytes().to_vec())));
        *self.tokens.borrow_mut() = tokens;
    }

    /// Enables the runtime configuration endpoints.
    pub fn set_config(&self, config: Rc<crate::admin_config::ConfigAdmin>) {
        *self.config.borrow_mut() = Some(config);
    }

    /// Re-reads the config file (SIGHUP), once the shard is up.
    pub async fn reload(&self) {
        let (Some(config), Some(shard)) = (self.config.borrow().clone(), self.shard.borrow().clone()) else {
            tracing::warn!("SIGHUP before the engine was ready: ignored");
            return;
        };
        config.reload(&shard).await;
        self.set_tokens(&shard.cfg());
    }

    /// Makes the shard's state reachable (after recovery).
    pub fn set_shard(&self, shard: Rc<Shard>) {
        *self.shard.borrow_mut() = Some(shard);
    }

    /// The actor name of the bearer token in `header`, if it is one of
    /// the admin tokens (each compared in constant time).
    fn authorized(&self, header: Option<&[u8]>) -> Option<String> {
        let (scheme, key) = header?.split_at_checked(7)?;
        let key = key.trim_ascii();
        if !scheme.eq_ignore_ascii_case(b"bearer ") {
            return None;
        }
        let tokens = self.tokens.borrow();
        let mut found = None;
        for (name, token) in tokens.iter() {
            if key.len() == token.len() && bool::from(key.ct_eq(token.as_slice())) {
                found = Some(name.clone());
            }
        }
        found
    }
}

/// Per-connection state of the admin listener.
pub struct AdminConn {
    state: Rc<AdminState>,
    /// The peer's address, for the audit log.
    peer: String,
    /// The answer was the head of `/events`: stream frames after it.
    events: Option<Rc<Shard>>,
}

impl AdminConn {
    pub fn new(state: Rc<AdminState>, peer: String) -> AdminConn {
        AdminConn { state, peer, events: None }
    }
}

/// A response that is not JSON (the exposition format, the page).
fn write_typed(out: &mut Vec<u8>, status: u16, content_type: &str, body: &[u8], keep: bool) {
    let close = if keep { "" } else { "connection: close\r\n" };
    let _ = write!(
        DisplayBuf(out),
        "HTTP/1.1 {status} OK\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\ncache-control: no-store\r\n{close}\r\n",
        body.len()
    );
    out.extend_from_slice(body);
}

/// An answer: status, body (JSON; empty for 204).
type Answer = (u16, Vec<u8>);

fn error(status: u16, code: &'static str, message: &str) -> Result<Answer, (u16, &'static str, String)> {
    Err((status, code, message.to_owned()))
}

impl Handler for AdminConn {
    async fn handle(&mut self, req: Request<'_>, out: &mut Vec<u8>) -> bool {
        let keep = req.head.keep_alive;
        let path = req.path().to_vec();
        let method = req.head.method;
        match (path.as_slice(), method) {
            (b"/healthz", Method::Get) => {
                let body = self.health();
                write_response(out, 200, "", &body, keep);
                return true;
            }
            (b"/readyz", Method::Get) => {
                if self.state.ready.load(Ordering::Acquire) {
                    write_response(out, 200, "", br#"{"status":"ready"}"#, keep)
                } else {
                    write_response(out, 503, "retry-after: 1\r\n", br#"{"status":"starting"}"#, keep)
                }
                return true;
            }
            (b"/metrics", Method::Get) => {
                match self.metrics().await {
                    Ok(text) => write_typed(out, 200, crate::metrics_text::CONTENT_TYPE, text.as_bytes(), keep),
                    Err((code, message)) => write_error(out, 503, code, message, "retry-after: 1\r\n", keep),
                }
                return true;
            }
            (b"/", Method::Get) => {
                let html = crate::dashboard::PAGE.as_bytes();
                write_typed(out, 200, "text/html; charset=utf-8", html, keep);
                return true;
            }
            (b"/events", Method::Get) => {
                let Some(shard) = self.state.shard.borrow().clone() else {
                    write_error(out, 503, "starting", "the engine is still recovering its journal", "", keep);
                    return true;
                };
                out.extend_from_slice(crate::dashboard::STREAM_HEAD.as_bytes());
                self.events = Some(shard);
                return false;
            }
            (b"/healthz" | b"/readyz" | b"/metrics" | b"/" | b"/events", _) => {
                write_error(out, 405, "method_not_allowed", "use GET", "allow: GET\r\n", keep);
                return true;
            }
            _ => {}
        }
        let Some(actor) = self.state.authorized(req.header(&req.head.authorization)) else {
            let msg = "admin endpoints need Authorization: Bearer <admin.token>";
            write_error(out, 401, "unauthorized", msg, "www-authenticate: Bearer\r\n", keep);
            return true;
        };
        if path == b"/v1/config" || path.starts_with(b"/v1/config/") {
            let (status, body) = self.config_route(&req, &path, method, &actor).await;
            write_response(out, status, "", &body, keep);
            return true;
        }
        let result = self.route(&req, &path, method).await;
        match result {
            Ok((204, _)) => write_response(out, 204, "", b"", keep),
            Ok((status, body)) => write_response(out, status, "", &body, keep),
            Err((status, code, message)) => write_error(out, status, code, &message, "", keep),
        }
        true
    }

    async fn stream_after(&mut self, stream: &mut glommio::net::TcpStream) {
        if let Some(shard) = self.events.take() {
            crate::dashboard::stream_events(shard, self.state.outbound.clone(), stream).await;
        }
    }
}

impl AdminConn {
    /// The text of `/metrics`: every shard's snapshot (over the mesh),
    /// the offload thread's breakers, the process.
    async fn metrics(&self) -> Result<String, (&'static str, &'static str)> {
        let starting = ("starting", "the engine is still recovering its journal");
        let shard = self.state.shard.borrow().clone().ok_or(starting)?;
        let timeout = ("shard_timeout", "a shard did not answer in time; retry");
        let shards = crate::metrics::gather(&shard).await.ok_or(timeout)?;
        let scrape = crate::metrics_text::Scrape {
            shards: &shards,
            clients: &shard.clients(),
            outbound: self.state.outbound.as_deref(),
            process: crate::metrics::ProcessStats::read(&shard.cfg().engine.data_dir),
        };
        Ok(crate::metrics_text::render(&scrape))
    }

    /// `/v1/config`, `/v1/config/versions`, `/v1/config/rollback`.
    async fn config_route(&self, req: &Request<'_>, path: &[u8], method: Method, actor: &str) -> (u16, Vec<u8>) {
        let err = |status: u16, code: &str, message: &str| {
            let body = serde_json::json!({"error": {"code": code, "message": message}});
            (status, body.to_string().into_bytes())
        };
        let (Some(config), Some(shard)) = (self.state.config.borrow().clone(), self.state.shard.borrow().clone())
        else {
            return err(503, "starting", "the engine is still starting");
        };
        let content_type = req.header(&req.head.content_type).unwrap_or(b"");
        let source = |what: &str| format!("{what} from {}", self.peer);
        let answer = match (path, method) {
            (b"/v1/config", Method::Get) => return config.get(),
            (b"/v1/config/versions", Method::Get) => return config.versions(),
            (b"/v1/config", Method::Put) => match config.put_candidate(content_type, req.body) {
                Ok(doc) => config.change(&shard, (actor, &source("PUT /v1/config")), "put", Ok(doc), None).await,
                Err(answer) => answer,
            },
            (b"/v1/config", Method::Patch) => match config.patch_candidate(content_type, req.body) {
                Ok(doc) => config.change(&shard, (actor, &source("PATCH /v1/config")), "patch", Ok(doc), None).await,
                Err(answer) => answer,
            },
            (b"/v1/config/rollback", Method::Post) => match config.rollback_candidate(req.body) {
                Ok((v, doc)) => {
                    let src = source(&format!("POST /v1/config/rollback to version {v}"));
                    config.change(&shard, (actor, &src), "rollback", Ok(doc), None).await
                }
                Err(answer) => answer,
            },
            (b"/v1/config", _) => return err(405, "method_not_allowed", "use GET, PUT or PATCH"),
            (b"/v1/config/versions", _) => return err(405, "method_not_allowed", "use GET"),
            (b"/v1/config/rollback", _) => return err(405, "method_not_allowed", "use POST"),
            _ => return err(404, "not_found", "no such endpoint"),
        };
        self.state.set_tokens(&shard.cfg());
        answer
    }

    async fn route(
        &self,
        req: &Request<'_>,
        path: &[u8],
        method: Method,
    ) -> Result<Answer, (u16, &'static str, String)> {
        let Some(shard) = self.state.shard.borrow().clone() else {
            return error(503, "starting", "the engine is still recovering its journal");
        };
        if path == b"/v1/dead-letters" {
            return match method {
                Method::Get => list_dead_letters(&shard, req).await,
                _ => error(405, "method_not_allowed", "use GET"),
            };
        }
        if let Some(rest) = path.strip_prefix(b"/v1/dead-letters/") {
            let (id, replay) = match rest.strip_suffix(b"/replay") {
                Some(id) => (id, true),
                None => (rest, false),
            };
            return match (replay, method) {
                (true, Method::Post) | (false, Method::Delete) => dead_letter_action(&shard, id, replay).await,
                (true, _) => error(405, "method_not_allowed", "use POST"),
                (false, _) => error(405, "method_not_allowed", "use DELETE"),
            };
        }
        if let Some(id) = path.strip_prefix(b"/v1/users/") {
            return match method {
                Method::Get => get_user(&shard, id).await,
                Method::Put => put_user(&shard, id, req.body).await,
                _ => error(405, "method_not_allowed", "use GET or PUT"),
            };
        }
        error(404, "not_found", "no such endpoint")
    }

    /// `{"status": "ok"|"degraded", "breakers": {"webhook:acme": "closed", ...}}`.
    fn health(&self) -> Vec<u8> {
        let mut breakers = String::new();
        let mut degraded = false;
        if let Some(status) = &self.state.outbound {
            for (name, state) in status.breakers() {
                if !breakers.is_empty() {
                    breakers.push(',');
                }
                degraded |= state == "open";
                let mut key = Vec::new();
                json_string(&mut key, &name);
                let _ = write!(breakers, "{}:\"{state}\"", String::from_utf8_lossy(&key));
            }
        }
        format!("{{\"status\":\"{}\",\"breakers\":{{{breakers}}}}}", if degraded { "degraded" } else { "ok" })
            .into_bytes()
    }
}

/// `GET /v1/dead-letters?client=&limit=&after=`: every shard's dead
/// letters, ordered by id, one page.
async fn list_dead_letters(shard: &Rc<Shard>, req: &Request<'_>) -> Result<Answer, (u16, &'static str, String)> {
    let text = |name: &str| req.query(name).map(|v| String::from_utf8_lossy(v).into_owned());
    let limit = match text("limit") {
        None => 100,
        Some(l) => match l.parse::<usize>() {
            Ok(n) if (1..=DEAD_LETTERS_LIMIT_MAX).contains(&n) => n,
            _ => return error(400, "invalid_field", "`limit` must be 1 to 1000"),
        },
    };
    let after = match text("after") {
        None => None,
        Some(a) => match parse_dead_letter_id(&a) {
            Some((id, status)) => Some((id.shard, id.seq, status as u8)),
            None => return error(400, "invalid_field", "`after` must be a dead-letter id"),
        },
    };
    let client = text("client").filter(|c| !c.is_empty());
    let mut items: Vec<DeadLetter> = Vec::new();
    for s in 0..shard.count() {
        // The cursor applies to its own shard; later shards start at the beginning.
        let from = match after {
            Some((a, _, _)) if (s as u16) < a => continue,
            Some((a, seq, code)) if s as u16 == a => Some((seq, code)),
            _ => None,
        };
        if s == shard.id() {
            items.extend(dead_letters_local(shard, client.as_deref(), from, limit));
            continue;
        }
        let client = client.clone();
        let msg = |req| MeshMsg::DeadLetters { from: shard.id() as u16, req, client, after: from, limit: limit as u32 };
        match shard.ask(s, msg).await {
            Ok(MeshMsg::DeadLetterList { items: more, .. }) => items.extend(more),
            _ => return error(503, "shard_timeout", "a shard did not answer in time; retry"),
        }
    }
    items.sort_by_key(|d| d.key);
    items.truncate(limit);
    let next = (items.len() == limit).then(|| items.last().map(|d| d.id.clone())).flatten();
    Ok((200, dead_letters_json(&items, next.as_deref())))
}

fn dead_letters_json(items: &[DeadLetter], next: Option<&str>) -> Vec<u8> {
    let mut b = Vec::with_capacity(64 + items.len() * 200);
    b.extend_from_slice(b"{\"items\":[");
    for (i, d) in items.iter().enumerate() {
        if i > 0 {
            b.push(b',');
        }
        b.extend_from_slice(b"{\"id\":");
        json_string(&mut b, &d.id);
        b.extend_from_slice(b",\"kind\":");
        json_string(&mut b, d.kind);
        b.extend_from_slice(b",\"message_id\":");
        json_string(&mut b, &d.message_id);
        b.extend_from_slice(b",\"client\":");
        json_string(&mut b, &d.client);
        b.extend_from_slice(b",\"event_type\":");
        json_string(&mut b, d.event_type);
        let _ = write!(DisplayBuf(&mut b), ",\"attempts\":{},\"last_error\":", d.attempts);
        json_string(&mut b, &d.last_error);
        let _ = write!(DisplayBuf(&mut b), ",\"dead_at\":{}}}", d.dead_at_ms);
    }
    b.extend_from_slice(b"],\"next\":");
    match next {
        Some(n) => json_string(&mut b, n),
        None => b.extend_from_slice(b"null"),
    }
    b.push(b'}');
    b
}

/// `POST /v1/dead-letters/{id}/replay` (202) and `DELETE /v1/dead-letters/{id}` (204).
async fn dead_letter_action(shard: &Rc<Shard>, id: &[u8], replay: bool) -> Result<Answer, (u16, &'static str, String)> {
    let not_found = || error(404, "not_found", "no such dead letter");
    let Some((tid, status)) = std::str::from_utf8(id).ok().and_then(parse_dead_letter_id) else { return not_found() };
    if tid.shard as usize >= shard.count() {
        return not_found();
    }
    let home = tid.shard as usize;
    let found = if home == shard.id() {
        dead_letter_action_local(shard, tid.seq, status, replay)
    } else {
        let msg = |req| MeshMsg::DeadLetterAction { from: shard.id() as u16, req, seq: tid.seq, status, replay };
        match shard.ask(home, msg).await {
            Ok(MeshMsg::DeadLetterDone { found, .. }) => found,
            _ => return error(503, "shard_timeout", "the shard did not answer in time; retry"),
        }
    };
    if !found {
        return not_found();
    }
    if replay {
        let mut b = b"{\"id\":".to_vec();
        json_string(&mut b, &String::from_utf8_lossy(id));
        b.extend_from_slice(b",\"status\":\"replayed\"}");
        Ok((202, b))
    } else {
        Ok((204, Vec::new()))
    }
}

/// A user id from the path: percent-decoded, UTF-8, 1 to 256 bytes, no
/// control characters (the rule for `to` in `POST /v1/messages`).
fn user_id(raw: &[u8]) -> Option<String> {
    let mut bytes = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'%' {
            let hex = std::str::from_utf8(raw.get(i + 1..i + 3)?).ok()?;
            bytes.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            bytes.push(raw[i]);
            i += 1;
        }
    }
    let id = String::from_utf8(bytes).ok()?;
    let ok = !id.is_empty() && id.len() <= USER_ID_BYTES_MAX && !id.chars().any(char::is_control);
    ok.then_some(id)
}

fn bad_id() -> Result<Answer, (u16, &'static str, String)> {
    error(400, "invalid_field", "`id` must be 1 to 256 bytes of UTF-8 without control characters")
}

/// `GET /v1/users/{id}`, from the user's home shard.
async fn get_user(shard: &Rc<Shard>, raw: &[u8]) -> Result<Answer, (u16, &'static str, String)> {
    let Some(id) = user_id(raw) else { return bad_id() };
    let home = crate::route(&id, shard.count());
    let view = if home == shard.id() {
        shard.user_view_local(&id)
    } else {
        match shard.ask(home, |req| MeshMsg::GetUser { from: shard.id() as u16, req, user: id }).await {
            Ok(MeshMsg::UserFound { result: Ok(view), .. }) => view.map(|v| *v),
            _ => return error(503, "shard_timeout", "the shard did not answer in time; retry"),
        }
    };
    match view {
        Some(v) => Ok((200, user_json(&v))),
        None => error(404, "not_found", "no such user"),
    }
}

/// `PUT /v1/users/{id}` with `{"phone", "email"}` (both optional),
/// journaled on the user's home shard and answered once durable.
async fn put_user(shard: &Rc<Shard>, raw: &[u8], body: &[u8]) -> Result<Answer, (u16, &'static str, String)> {
    let Some(id) = user_id(raw) else { return bad_id() };
    let (phone, email) = match contact_fields(body) {
        Ok(fields) => fields,
        Err(message) => return error(400, "invalid_field", message),
    };
    let home = crate::route(&id, shard.count());
    let result = if home == shard.id() {
        match shard.put_user_local(&id, phone.as_deref(), email.as_deref()) {
            Ok((generation, view)) => match shard.journal().wait_durable(generation).await {
                Ok(()) => Ok(view),
                Err(_) => Err(()),
            },
            Err(_) => Err(()),
        }
    } else {
        let put = Box::new(UserPut { user: id, phone, email });
        let msg = |req| MeshMsg::PutUser { from: shard.id() as u16, req, put };
        match shard.ask(home, msg).await {
            Ok(MeshMsg::UserFound { result: Ok(Some(view)), .. }) => Ok(*view),
            Ok(MeshMsg::UserFound { .. }) => Err(()),
            _ => return error(503, "shard_timeout", "the shard did not answer in time; retry"),
        }
    };
    match result {
        Ok(view) => Ok((200, user_json(&view))),
        Err(()) => error(503, "storage_unavailable", "the journal refused the change"),
    }
}

/// The `phone` and `email` of a `PUT /v1/users/{id}` body, validated; the
/// error names the field.
fn contact_fields(body: &[u8]) -> Result<(Option<String>, Option<String>), &'static str> {
    let body = if body.iter().all(u8::is_ascii_whitespace) { b"{}".as_slice() } else { body };
    let Ok(serde_json::Value::Object(fields)) = serde_json::from_slice::<serde_json::Value>(body) else {
        return Err("the body must be a JSON object with optional `phone` and `email`");
    };
    let (mut phone, mut email) = (None, None);
    for (name, value) in fields {
        let text = match value {
            serde_json::Value::Null => None,
            serde_json::Value::String(s) => Some(s),
            _ if name == "phone" => return Err("`phone` must be a string in E.164 form (+9665...)"),
            _ if name == "email" => return Err("`email` must be a string"),
            _ => return Err("unknown field: only `phone` and `email` may be set"),
        };
        match name.as_str() {
            "phone" if text.as_deref().is_none_or(valid_phone) => phone = text,
            "phone" => return Err("`phone` must be in E.164 form: +, then 7 to 15 digits, the first not 0"),
            "email" if text.as_deref().is_none_or(valid_email) => email = text,
            "email" => return Err("`email` must be a plausible email address (at most 254 bytes)"),
            _ => return Err("unknown field: only `phone` and `email` may be set"),
        }
    }
    Ok((phone, email))
}

/// `{"id","phone","email","first_seen_at","blocked"}`.
fn user_json(v: &UserView) -> Vec<u8> {
    let mut b = Vec::with_capacity(128 + v.id.len());
    let opt = |b: &mut Vec<u8>, s: &Option<String>| match s {
        Some(s) => json_string(b, s),
        None => b.extend_from_slice(b"null"),
    };
    b.extend_from_slice(b"{\"id\":");
    json_string(&mut b, &v.id);
    b.extend_from_slice(b",\"phone\":");
    opt(&mut b, &v.phone);
    b.extend_from_slice(b",\"email\":");
    opt(&mut b, &v.email);
    let _ = write!(DisplayBuf(&mut b), ",\"first_seen_at\":{},\"blocked\":[", v.first_seen_at_ms);
    for (i, c) in v.blocked.iter().enumerate() {
        if i > 0 {
            b.push(b',');
        }
        json_string(&mut b, c);
    }
    b.extend_from_slice(b"]}");
    b
}

/// `write!` into a byte buffer.
struct DisplayBuf<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for DisplayBuf<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}
