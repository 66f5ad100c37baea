//! The business API: `POST /v1/messages`, `POST /v1/messages/batch`,
//! `GET /v1/messages/{id}` (docs/API.md is the contract).
//!
//! The accepting shard authenticates, validates and routes; the home shard
//! of the recipient journals. A `202` is written only after the home
//! shard's group commit holding the message has been fdatasynced.

use std::rc::Rc;
use std::time::{SystemTime, UNIX_EPOCH};

use esh3ar_shards::id::TrackingId;
use esh3ar_shards::Priority;
use simd_json::prelude::*;
use simd_json::BorrowedValue;
use subtle::ConstantTimeEq;

use crate::http::conn::{Handler, Request};
use crate::http::{json_string, write_error, write_response, Method};
use crate::shard::{AppendRefusal, MeshMsg, NewMessage, Shard, StatusView};

/// Longest user id, in bytes.
pub const USER_ID_BYTES_MAX: usize = 256;
/// Most messages in one batch.
pub const BATCH_ITEMS_MAX: usize = 1000;

const RETRY_AFTER_1S: &str = "retry-after: 1\r\n";

/// Per-connection state of the business listener.
pub struct BusinessConn {
    shard: Rc<Shard>,
    /// The last `Authorization` value that authenticated, and its client:
    /// a keep-alive connection pays for the key lookup once.
    auth_cache: Option<(Vec<u8>, u32)>,
}

impl BusinessConn {
    pub fn new(shard: Rc<Shard>) -> Self {
        Self { shard, auth_cache: None }
    }

    fn authenticate(&mut self, header: Option<&[u8]>) -> Option<u32> {
        let header = header?;
        if let Some((cached, client)) = &self.auth_cache {
            if cached.len() == header.len() && bool::from(cached.as_slice().ct_eq(header)) {
                return Some(*client);
            }
        }
        let key = strip_bearer(header)?;
        let client = self.shard.clients.authenticate(key)?;
        self.auth_cache = Some((header.to_vec(), client));
        Some(client)
    }
}

fn strip_bearer(header: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = header.split_at_checked(7)?;
    scheme.eq_ignore_ascii_case(b"bearer ").then(|| rest.trim_ascii())
}

enum Route<'a> {
    Send,
    Batch,
    Get(&'a [u8]),
    NotFound,
    MethodNotAllowed(&'static str),
}

fn route(path: &[u8], method: Method) -> Route<'_> {
    match (path, method) {
        (b"/v1/messages", Method::Post) => Route::Send,
        (b"/v1/messages", _) => Route::MethodNotAllowed("POST"),
        (b"/v1/messages/batch", Method::Post) => Route::Batch,
        (b"/v1/messages/batch", _) => Route::MethodNotAllowed("POST"),
        (p, m) => match p.strip_prefix(b"/v1/messages/") {
            Some(id) if !id.is_empty() && !id.contains(&b'/') => {
                if m == Method::Get {
                    Route::Get(id)
                } else {
                    Route::MethodNotAllowed("GET")
                }
            }
            _ => Route::NotFound,
        },
    }
}

/// A client-visible refusal of a request or of one batch item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    fn invalid(message: impl Into<String>) -> Self {
        Self { status: 400, code: "invalid_field", message: message.into() }
    }
    fn refusal(r: Refusal) -> Self {
        let (code, message) = match r {
            Refusal::Overloaded => ("overloaded", "the engine is at capacity; retry later"),
            Refusal::Home(AppendRefusal::StorageFailed) => {
                ("storage_unavailable", "the journal cannot write; retry later")
            }
            Refusal::Home(AppendRefusal::ShuttingDown) => ("shutting_down", "the engine is shutting down; retry later"),
        };
        Self { status: 503, code, message: message.to_owned() }
    }
    fn write(&self, out: &mut Vec<u8>, keep_alive: bool) {
        let extra = if self.status == 503 { RETRY_AFTER_1S } else { "" };
        write_error(out, self.status, self.code, &self.message, extra, keep_alive);
    }
}

/// Why a home shard did not answer with sequence numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// The mesh channel to the home shard was full.
    Overloaded,
    Home(AppendRefusal),
}

impl Handler for BusinessConn {
    async fn handle(&mut self, req: Request<'_>, out: &mut Vec<u8>) -> bool {
        let keep = req.head.keep_alive;
        let route = route(req.path(), req.head.method);
        match route {
            Route::NotFound => {
                write_error(out, 404, "not_found", "no such endpoint", "", keep);
                return true;
            }
            Route::MethodNotAllowed(allow) => {
                let extra = format!("allow: {allow}\r\n");
                write_error(out, 405, "method_not_allowed", "method not allowed on this endpoint", &extra, keep);
                return true;
            }
            _ => {}
        }
        let Some(client) = self.authenticate(req.header(&req.head.authorization)) else {
            let extra = "www-authenticate: Bearer\r\n";
            write_error(out, 401, "unauthorized", "missing or invalid API key", extra, keep);
            return true;
        };
        let result = match route {
            Route::Send => self.send_one(req, client, out).await,
            Route::Batch => self.send_batch(req, client, out).await,
            Route::Get(id) => {
                let id = id.to_vec();
                self.get_status(&id, client, out, keep).await
            }
            Route::NotFound | Route::MethodNotAllowed(_) => unreachable!("answered above"),
        };
        if let Err(e) = result {
            e.write(out, keep);
        }
        true
    }
}

impl BusinessConn {
    async fn send_one(&mut self, req: Request<'_>, client: u32, out: &mut Vec<u8>) -> Result<(), ApiError> {
        let keep = req.head.keep_alive;
        check_json_content_type(&req)?;
        let value = parse_json(req.body)?;
        let msg = self.new_message(&value, client, now_ms())?;
        let home = crate::route(&msg.to, self.shard.count);
        let seqs = self.append_on(home, vec![msg]).await.map_err(ApiError::refusal)?;
        let id = TrackingId { shard: home as u16, seq: seqs[0] }.encode();
        let mut body = Vec::with_capacity(48);
        body.extend_from_slice(b"{\"id\":\"");
        body.extend_from_slice(&id);
        body.extend_from_slice(b"\",\"status\":\"accepted\"}");
        write_response(out, 202, "", &body, keep);
        Ok(())
    }

    async fn send_batch(&mut self, req: Request<'_>, client: u32, out: &mut Vec<u8>) -> Result<(), ApiError> {
        let keep = req.head.keep_alive;
        check_json_content_type(&req)?;
        let value = parse_json(req.body)?;
        let obj = value.as_object().ok_or_else(|| ApiError::invalid("body must be a JSON object"))?;
        if let Some(k) = obj.keys().find(|k| k.as_ref() != "messages") {
            return Err(ApiError::invalid(format!("unknown field `{k}`")));
        }
        let items = obj
            .get("messages")
            .and_then(|m| m.as_array())
            .ok_or_else(|| ApiError::invalid("`messages` must be an array"))?;
        if items.is_empty() || items.len() > BATCH_ITEMS_MAX {
            return Err(ApiError::invalid(format!("`messages` must hold 1 to {BATCH_ITEMS_MAX} items")));
        }
        let now = now_ms();
        let count = self.shard.count;
        // Validate every item; group the valid ones by home shard.
        let mut results: Vec<Result<TrackingId, ApiError>> = Vec::with_capacity(items.len());
        let mut groups: Vec<(Vec<usize>, Vec<NewMessage>)> = (0..count).map(|_| (Vec::new(), Vec::new())).collect();
        for (i, item) in items.iter().enumerate() {
            match self.new_message(item, client, now) {
                Ok(m) => {
                    let home = crate::route(&m.to, count);
                    groups[home].0.push(i);
                    groups[home].1.push(m);
                    results.push(Err(ApiError::invalid("pending")));
                }
                Err(e) => results.push(Err(e)),
            }
        }
        // Send every remote group first, then append the local one, then
        // collect: the shards commit in parallel.
        let mut waits = Vec::new();
        let mut local: Option<(Vec<usize>, Vec<NewMessage>)> = None;
        for (home, (positions, msgs)) in groups.into_iter().enumerate() {
            if msgs.is_empty() {
                continue;
            }
            if home == self.shard.id {
                local = Some((positions, msgs));
                continue;
            }
            let (req_id, rx) = self.shard.replies.register();
            let msg = MeshMsg::Append { from: self.shard.id as u16, req: req_id, items: msgs };
            match self.shard.try_send(home, msg) {
                Ok(()) => waits.push((home, positions, Some(rx))),
                Err(_) => {
                    self.shard.replies.cancel(req_id);
                    waits.push((home, positions, None));
                }
            }
        }
        let mut accepted = 0usize;
        let mut refused: Option<Refusal> = None;
        if let Some((positions, msgs)) = local {
            let outcome = self.shard.append_durable(&msgs).await.map_err(Refusal::Home);
            record_outcome(&mut results, &positions, self.shard.id, outcome, &mut accepted, &mut refused);
        }
        for (home, positions, rx) in waits {
            let outcome = match rx {
                Some(rx) => await_appended(rx).await,
                None => Err(Refusal::Overloaded),
            };
            record_outcome(&mut results, &positions, home, outcome, &mut accepted, &mut refused);
        }
        if accepted == 0 {
            if let Some(r) = refused {
                return Err(ApiError::refusal(r));
            }
        }
        let mut body = Vec::with_capacity(16 + results.len() * 48);
        body.extend_from_slice(b"{\"results\":[");
        for (i, r) in results.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            match r {
                Ok(id) => {
                    body.extend_from_slice(b"{\"id\":\"");
                    body.extend_from_slice(&id.encode());
                    body.extend_from_slice(b"\",\"status\":\"accepted\"}");
                }
                Err(e) => {
                    body.extend_from_slice(b"{\"error\":{\"code\":");
                    json_string(&mut body, e.code);
                    body.extend_from_slice(b",\"message\":");
                    json_string(&mut body, &e.message);
                    body.extend_from_slice(b"}}");
                }
            }
        }
        body.extend_from_slice(b"]}");
        write_response(out, 202, "", &body, keep);
        Ok(())
    }

    async fn get_status(&mut self, id: &[u8], client: u32, out: &mut Vec<u8>, keep: bool) -> Result<(), ApiError> {
        let not_found = || ApiError { status: 404, code: "not_found", message: "no such message".to_owned() };
        let id = TrackingId::decode(id).filter(|t| (t.shard as usize) < self.shard.count).ok_or_else(not_found)?;
        let home = id.shard as usize;
        let view = if home == self.shard.id {
            self.shard.lookup_local(id.seq, client)
        } else {
            let (req, rx) = self.shard.replies.register();
            let msg = MeshMsg::Lookup { from: self.shard.id as u16, req, seq: id.seq, client };
            if self.shard.try_send(home, msg).is_err() {
                self.shard.replies.cancel(req);
                return Err(ApiError::refusal(Refusal::Overloaded));
            }
            match rx.await {
                Ok(MeshMsg::Found { view, .. }) => view,
                _ => return Err(ApiError::refusal(Refusal::Home(AppendRefusal::ShuttingDown))),
            }
        };
        let view = view.ok_or_else(not_found)?;
        write_response(out, 200, "", &status_json(id, &view), keep);
        Ok(())
    }

    async fn append_on(&self, home: usize, items: Vec<NewMessage>) -> Result<Vec<u64>, Refusal> {
        if home == self.shard.id {
            return self.shard.append_durable(&items).await.map_err(Refusal::Home);
        }
        let (req, rx) = self.shard.replies.register();
        let msg = MeshMsg::Append { from: self.shard.id as u16, req, items };
        if self.shard.try_send(home, msg).is_err() {
            self.shard.replies.cancel(req);
            return Err(Refusal::Overloaded);
        }
        await_appended(rx).await
    }

    /// Validates one message object.
    fn new_message(&self, value: &BorrowedValue<'_>, client: u32, now_ms: u64) -> Result<NewMessage, ApiError> {
        let obj = value.as_object().ok_or_else(|| ApiError::invalid("a message must be a JSON object"))?;
        let business = &self.shard.cfg.business;
        let mut to = None;
        let mut body = None;
        let mut priority = Priority::Normal;
        let mut ttl_seconds = business.default_ttl_seconds;
        for (key, v) in obj.iter() {
            match key.as_ref() {
                "to" => to = Some(v.as_str().ok_or_else(|| ApiError::invalid("`to` must be a string"))?),
                "body" => body = Some(v.as_str().ok_or_else(|| ApiError::invalid("`body` must be a string"))?),
                "priority" => {
                    priority = v
                        .as_str()
                        .and_then(Priority::parse)
                        .ok_or_else(|| ApiError::invalid("`priority` must be \"high\", \"normal\" or \"low\""))?
                }
                "ttl_seconds" => {
                    ttl_seconds = v.as_u64().filter(|&t| t >= 1 && t <= business.max_ttl_seconds).ok_or_else(|| {
                        ApiError::invalid(format!(
                            "`ttl_seconds` must be an integer from 1 to {}",
                            business.max_ttl_seconds
                        ))
                    })?
                }
                other => return Err(ApiError::invalid(format!("unknown field `{other}`"))),
            }
        }
        let to = to.ok_or_else(|| ApiError::invalid("`to` is required"))?;
        if to.is_empty() || to.len() > USER_ID_BYTES_MAX || to.chars().any(char::is_control) {
            return Err(ApiError::invalid(format!(
                "`to` must be 1 to {USER_ID_BYTES_MAX} bytes without control characters"
            )));
        }
        let body = body.ok_or_else(|| ApiError::invalid("`body` is required"))?;
        if body.is_empty() {
            return Err(ApiError::invalid("`body` must not be empty"));
        }
        Ok(NewMessage {
            client,
            to: to.to_owned(),
            body: body.as_bytes().to_vec(),
            priority,
            expires_at_ms: now_ms + ttl_seconds * 1000,
            accepted_at_ms: now_ms,
        })
    }
}

fn record_outcome(
    results: &mut [Result<TrackingId, ApiError>],
    positions: &[usize],
    home: usize,
    outcome: Result<Vec<u64>, Refusal>,
    accepted: &mut usize,
    refused: &mut Option<Refusal>,
) {
    match outcome {
        Ok(seqs) => {
            assert_eq!(seqs.len(), positions.len(), "home shard answered for another number of items");
            for (&pos, seq) in positions.iter().zip(seqs) {
                results[pos] = Ok(TrackingId { shard: home as u16, seq });
            }
            *accepted += positions.len();
        }
        Err(r) => {
            for &pos in positions {
                results[pos] = Err(ApiError::refusal(r));
            }
            *refused = Some(r);
        }
    }
}

async fn await_appended(rx: futures_channel::oneshot::Receiver<MeshMsg>) -> Result<Vec<u64>, Refusal> {
    match rx.await {
        Ok(MeshMsg::Appended { result, .. }) => result.map_err(Refusal::Home),
        // The home shard dropped the request: it is going away.
        _ => Err(Refusal::Home(AppendRefusal::ShuttingDown)),
    }
}

fn check_json_content_type(req: &Request<'_>) -> Result<(), ApiError> {
    let ok = req.header(&req.head.content_type).is_some_and(|ct| {
        let mime = ct.split(|&b| b == b';').next().unwrap_or(ct).trim_ascii();
        mime.eq_ignore_ascii_case(b"application/json")
    });
    if ok {
        Ok(())
    } else {
        Err(ApiError {
            status: 415,
            code: "unsupported_media_type",
            message: "Content-Type must be application/json".into(),
        })
    }
}

fn parse_json(body: &mut [u8]) -> Result<BorrowedValue<'_>, ApiError> {
    if std::str::from_utf8(body).is_err() {
        return Err(ApiError { status: 400, code: "invalid_utf8", message: "request body is not valid UTF-8".into() });
    }
    simd_json::to_borrowed_value(body).map_err(|_| ApiError {
        status: 400,
        code: "malformed_json",
        message: "request body is not valid JSON".into(),
    })
}

fn status_json(id: TrackingId, v: &StatusView) -> Vec<u8> {
    let mut b = Vec::with_capacity(200 + v.to.len());
    let ms = |b: &mut Vec<u8>, v: u64| {
        if v == 0 {
            b.extend_from_slice(b"null");
        } else {
            b.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
        }
    };
    b.extend_from_slice(b"{\"id\":\"");
    b.extend_from_slice(&id.encode());
    b.extend_from_slice(b"\",\"to\":");
    json_string(&mut b, &v.to);
    b.extend_from_slice(b",\"status\":\"");
    b.extend_from_slice(v.status.as_str().as_bytes());
    b.extend_from_slice(b"\",\"priority\":\"");
    b.extend_from_slice(v.priority.as_str().as_bytes());
    b.extend_from_slice(b"\",\"attempts\":");
    b.extend_from_slice(itoa::Buffer::new().format(v.attempts).as_bytes());
    b.extend_from_slice(b",\"accepted_at\":");
    ms(&mut b, v.accepted_at_ms);
    b.extend_from_slice(b",\"delivered_at\":");
    ms(&mut b, v.delivered_at_ms);
    b.extend_from_slice(b",\"acked_at\":");
    ms(&mut b, v.acked_at_ms);
    b.push(b'}');
    b
}

/// Unix time in milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
