//! The admin listener (shard 0 only): health, readiness, and the
//! operator's API (`docs/API.md`, "Admin API").
//!
//! `/healthz` and `/readyz` need no credentials (load balancers and
//! orchestrators call them); every other endpoint needs
//! `Authorization: Bearer <admin.token>`, compared in constant time.
//! Requests that need another shard's state go over the mesh from shard 0,
//! like the business API's.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use esh3ar_shards::Status;
use subtle::ConstantTimeEq;

use crate::http::conn::{Handler, Request};
use crate::http::{json_string, write_error, write_response, Method};
use crate::mesh_msg::{DeadLetter, MeshMsg};
use crate::outbound::OutboundStatus;
use crate::receipts::{dead_letter_action_local, dead_letters_local, parse_event_id};
use crate::shard::Shard;

/// Most dead letters one `GET /v1/dead-letters` returns.
pub const DEAD_LETTERS_LIMIT_MAX: usize = 1000;

/// What every admin connection shares.
pub struct AdminState {
    ready: Arc<AtomicBool>,
    token: Vec<u8>,
    /// Shard 0, once its journal is recovered.
    shard: RefCell<Option<Rc<Shard>>>,
    outbound: Option<Arc<OutboundStatus>>,
}

impl AdminState {
    pub fn new(ready: Arc<AtomicBool>, token: &str, outbound: Option<Arc<OutboundStatus>>) -> Rc<AdminState> {
        Rc::new(AdminState { ready, token: token.as_bytes().to_vec(), shard: RefCell::new(None), outbound })
    }

    /// Makes the shard's state reachable (after recovery).
    pub fn set_shard(&self, shard: Rc<Shard>) {
        *self.shard.borrow_mut() = Some(shard);
    }

    fn authorized(&self, header: Option<&[u8]>) -> bool {
        let Some(h) = header else { return false };
        let Some((scheme, key)) = h.split_at_checked(7) else { return false };
        let key = key.trim_ascii();
        scheme.eq_ignore_ascii_case(b"bearer ")
            && key.len() == self.token.len()
            && bool::from(key.ct_eq(self.token.as_slice()))
    }
}

/// Per-connection state of the admin listener.
pub struct AdminConn {
    state: Rc<AdminState>,
}

impl AdminConn {
    pub fn new(state: Rc<AdminState>) -> AdminConn {
        AdminConn { state }
    }
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
            (b"/healthz" | b"/readyz", _) => {
                write_error(out, 405, "method_not_allowed", "use GET", "allow: GET\r\n", keep);
                return true;
            }
            _ => {}
        }
        if !self.state.authorized(req.header(&req.head.authorization)) {
            let msg = "admin endpoints need Authorization: Bearer <admin.token>";
            write_error(out, 401, "unauthorized", msg, "www-authenticate: Bearer\r\n", keep);
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
}

impl AdminConn {
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
        Some(a) => match parse_event_id(&a) {
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
    let Some((tid, status)) = std::str::from_utf8(id).ok().and_then(parse_event_id) else { return not_found() };
    if status == Status::Accepted || tid.shard as usize >= shard.count() {
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

/// `write!` into a byte buffer.
struct DisplayBuf<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for DisplayBuf<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}
