//! The business API: `POST /v1/messages`, `POST /v1/messages/batch`,
//! `GET /v1/messages/{id}`, `GET /v1/events` (docs/API.md is the contract).
//!
//! The accepting shard authenticates, validates, sheds under memory
//! pressure, counts the messages against the client's rate limit (kept on
//! the client's home shard), and routes each message to the home shard of
//! its recipient, which journals it. A `202` is written only after the home
//! shard's group commit holding the message has been fdatasynced.

pub mod events;
pub mod json;

use std::fmt::Write as _;
use std::rc::Rc;
use std::time::Instant;

use esh3ar_shards::id::TrackingId;
use esh3ar_shards::limiter::Decision;
use sha2::Digest as _;
use subtle::ConstantTimeEq;

use self::json::{
    accepted_json, batch_items, batch_json, check_json_content_type, new_message, status_json, with_json,
};
use crate::clock::now_ms;
use crate::http::conn::{Handler, Request};
use crate::http::{write_error, write_response, Method};
use crate::idempotency::Begin;
use crate::mesh_msg::IdemRequest;
use crate::metrics::HttpRoute;
use crate::shard::{AppendRefusal, MeshError, MeshMsg, MessageRef, Shard};

// The request limits live with every limit they constrain (a user id is
// framed into a journal record): `esh3ar_shards::limits`.
pub use esh3ar_shards::limits::{BATCH_ITEMS_MAX, USER_ID_BYTES_MAX};

/// An authenticated client on this connection.
#[derive(Clone, Copy)]
struct Authed {
    client: u32,
    /// Home shard of the client: where its rate-limit window lives.
    home: usize,
}

/// Room for the three RateLimit headers with 20-digit values, plus a
/// `retry-after` line: the headers `String` never grows.
const RATE_HEADERS_BYTES_MAX: usize = 160;

/// Per-connection state of the business listener.
pub struct BusinessConn {
    shard: Rc<Shard>,
    /// The last `Authorization` value that authenticated: a keep-alive
    /// connection pays for the key lookup once.
    auth_cache: Option<(Vec<u8>, Authed)>,
    /// The rate-limit state the current request saw (for the headers), and
    /// the second its messages were counted in.
    decision: Option<(Decision, u64)>,
    /// When each `202` in the write buffer was read (`esh3ar_accept_duration_seconds`).
    unwritten_202s: Vec<Instant>,
}

impl BusinessConn {
    pub fn new(shard: Rc<Shard>) -> Self {
        Self { shard, auth_cache: None, decision: None, unwritten_202s: Vec::new() }
    }

    fn authenticate(&mut self, header: Option<&[u8]>) -> Option<Authed> {
        let header = header?;
        if let Some((cached, authed)) = &self.auth_cache {
            if cached.len() == header.len() && bool::from(cached.as_slice().ct_eq(header)) {
                return Some(*authed);
            }
        }
        let key = strip_bearer(header)?;
        let client = self.shard.clients().authenticate(key)?;
        let home = crate::route(self.shard.clients().id(client), self.shard.count());
        let authed = Authed { client, home };
        self.auth_cache = Some((header.to_vec(), authed));
        Some(authed)
    }
}

fn strip_bearer(header: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = header.split_at_checked(7)?;
    scheme.eq_ignore_ascii_case(b"bearer ").then(|| rest.trim_ascii())
}

enum Route<'a> {
    Send,
    Batch,
    Events,
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
        (b"/v1/events", Method::Get) => Route::Events,
        (b"/v1/events", _) => Route::MethodNotAllowed("GET"),
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
    fn new(status: u16, code: &'static str, message: &str) -> Self {
        Self { status, code, message: message.to_owned() }
    }
    fn invalid(message: impl Into<String>) -> Self {
        Self { status: 400, code: "invalid_field", message: message.into() }
    }
    fn refusal(r: Refusal) -> Self {
        match r {
            Refusal::Timeout => Self::new(
                503,
                "shard_timeout",
                "another shard did not answer in time; a send may still be accepted (a retry may duplicate)",
            ),
            Refusal::Shed => Self::new(503, "overloaded", "the engine is shedding load at this priority; retry later"),
            Refusal::Home(AppendRefusal::StorageFailed) => {
                Self::new(503, "storage_unavailable", "the journal cannot write; retry later")
            }
            Refusal::Home(AppendRefusal::StorageFull) => Self::new(
                503,
                "storage_full",
                "the journal's disk is full; nothing of this request was accepted; retry later",
            ),
            Refusal::Home(AppendRefusal::ShuttingDown) => {
                Self::new(503, "shutting_down", "the engine is shutting down; retry later")
            }
        }
    }
    fn rate_limited() -> Self {
        Self::new(429, "rate_limited", "rate limit of this client exceeded; see Retry-After")
    }
}

/// Why messages were not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// The other shard did not answer within `engine.mesh_reply_timeout_ms`.
    Timeout,
    /// Memory pressure: this priority is being shed.
    Shed,
    Home(AppendRefusal),
}

/// A successful answer.
struct Reply {
    status: u16,
    body: Vec<u8>,
}

impl From<MeshError> for Refusal {
    fn from(e: MeshError) -> Self {
        match e {
            MeshError::Timeout => Refusal::Timeout,
            MeshError::Closed => Refusal::Home(AppendRefusal::ShuttingDown),
        }
    }
}

impl Handler for BusinessConn {
    async fn handle(&mut self, req: Request<'_>, out: &mut Vec<u8>) -> bool {
        let (read_at, from) = (Instant::now(), out.len());
        let counted = match route(req.path(), req.head.method) {
            Route::Send => HttpRoute::Send,
            Route::Batch => HttpRoute::Batch,
            Route::Get(_) => HttpRoute::Status,
            Route::Events => HttpRoute::Events,
            Route::NotFound | Route::MethodNotAllowed(_) => HttpRoute::Other,
        };
        let keep = self.answer(req, out).await;
        let status = crate::http::answered_status(&out[from..]);
        self.shard.metrics().http_answer(counted, status);
        if status == 202 {
            self.unwritten_202s.push(read_at);
        }
        keep
    }

    fn written(&mut self) {
        for read_at in self.unwritten_202s.drain(..) {
            self.shard.metrics().accepted_in(read_at.elapsed().as_secs_f64());
        }
    }

    fn refused(&mut self, status: u16) {
        self.shard.metrics().http_answer(HttpRoute::Other, status);
    }

    async fn before_read(&mut self) {
        // When this shard's memory budget is used up, stop reading: the
        // clients feel TCP backpressure instead of us buffering more.
        self.shard.wait_for_room().await;
    }
}

impl BusinessConn {
    /// Answers one request into `out`; false closes the connection after it.
    async fn answer(&mut self, req: Request<'_>, out: &mut Vec<u8>) -> bool {
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
        let Some(authed) = self.authenticate(req.header(&req.head.authorization)) else {
            write_error(out, 401, "unauthorized", "missing or invalid API key", "www-authenticate: Bearer\r\n", keep);
            return true;
        };
        // Idempotency-Key: hash the body before it is parsed (in place).
        let idem = match (&route, req.header(&req.head.idempotency_key)) {
            (Route::Send | Route::Batch, Some(raw)) => match crate::idempotency::valid_key(raw) {
                Some(k) => Some((k.to_owned(), <[u8; 32]>::from(sha2::Sha256::digest(&*req.body)))),
                None => {
                    let msg = "`Idempotency-Key` must be 1 to 255 visible ASCII characters";
                    write_error(out, 400, "invalid_field", msg, "", keep);
                    return true;
                }
            },
            _ => None,
        };
        self.decision = None;
        if let Some((key, hash)) = &idem {
            let refusal = match self.idem_begin(authed, key, *hash).await {
                Ok(Begin::New) => None,
                Ok(Begin::Replay { status, body }) => {
                    let _ = self.rate(authed, 0).await;
                    let headers = self.rate_headers();
                    write_response(out, status, &headers, &body, keep);
                    return true;
                }
                Ok(Begin::Conflict) => Some(ApiError::new(
                    422,
                    "idempotency_key_reused",
                    "this Idempotency-Key was used with another request body",
                )),
                Ok(Begin::InFlight) => Some(ApiError::new(
                    409,
                    "idempotency_key_in_use",
                    "a request with this Idempotency-Key is still in flight; retry after it",
                )),
                Err(r) => Some(ApiError::refusal(r)),
            };
            if let Some(e) = refusal {
                write_error(out, e.status, e.code, &e.message, "", keep);
                return true;
            }
        }
        let result = match route {
            Route::Send => self.send_one(req, authed).await,
            Route::Batch => self.send_batch(req, authed).await,
            Route::Get(id) => {
                let id = id.to_vec();
                self.get_status(&id, authed).await
            }
            Route::Events => events::get_events(&self.shard, &req, authed).await,
            Route::NotFound | Route::MethodNotAllowed(_) => unreachable!("answered above"),
        };
        // A keyed 202 is written only once its answer is durable on the
        // client's home shard; any other outcome releases the key.
        let result = match (idem, result) {
            (None, result) => result,
            (Some((key, hash)), Ok(reply)) if reply.status == 202 => {
                match self.idem_finish(authed, key, hash, &reply).await {
                    Ok(()) => Ok(reply),
                    Err(r) => Err(ApiError::refusal(r)),
                }
            }
            (Some((key, hash)), result) => {
                self.idem_abort(authed, key, hash).await;
                result
            }
        };
        // Every answer to a known client carries its rate-limit state.
        if self.decision.is_none() {
            let _ = self.rate(authed, 0).await;
        }
        let mut headers = self.rate_headers();
        match result {
            Ok(reply) => write_response(out, reply.status, &headers, &reply.body, keep),
            Err(e) => {
                match (e.status, &self.decision) {
                    (429, Some((d, _))) => {
                        let _ = write!(headers, "retry-after: {}\r\n", d.retry_after_secs);
                    }
                    (503, _) => headers.push_str("retry-after: 1\r\n"),
                    _ => {}
                }
                write_error(out, e.status, e.code, &e.message, &headers, keep);
            }
        }
        true
    }
}

impl BusinessConn {
    /// The RateLimit headers of the last decision.
    fn rate_headers(&self) -> String {
        // itoa, not `write!`: once per request, and core::fmt growing a
        // `String` three times cost ~1,800 instructions (PERFORMANCE.md).
        let mut headers = String::with_capacity(RATE_HEADERS_BYTES_MAX);
        if let Some((d, _)) = &self.decision {
            let mut num = itoa::Buffer::new();
            headers.push_str("ratelimit-limit: ");
            headers.push_str(num.format(d.limit));
            headers.push_str("\r\nratelimit-remaining: ");
            headers.push_str(num.format(d.remaining));
            headers.push_str("\r\nratelimit-reset: ");
            headers.push_str(num.format(d.reset_secs));
            headers.push_str("\r\n");
        }
        headers
    }

    fn idem_request(&self, authed: Authed, req: u64, key: String, hash: [u8; 32]) -> Box<IdemRequest> {
        Box::new(IdemRequest {
            from: self.shard.id() as u16,
            req,
            client: authed.client,
            key,
            body_sha256: hash,
            status: 0,
            response: Vec::new(),
        })
    }

    /// Asks the client's home shard about a keyed request (reserving the key if new).
    async fn idem_begin(&self, authed: Authed, key: &str, hash: [u8; 32]) -> Result<Begin, Refusal> {
        if authed.home == self.shard.id() {
            return Ok(crate::idempotency::begin_local(&self.shard, authed.client, key, hash));
        }
        let msg = |req| MeshMsg::IdemBegin(self.idem_request(authed, req, key.to_owned(), hash));
        match self.shard.ask(authed.home, msg).await? {
            MeshMsg::IdemBegun { begin, .. } => Ok(*begin),
            _ => Err(Refusal::Home(AppendRefusal::ShuttingDown)),
        }
    }

    /// Makes a keyed request's 202 durable on the client's home shard.
    async fn idem_finish(&self, authed: Authed, key: String, hash: [u8; 32], reply: &Reply) -> Result<(), Refusal> {
        if authed.home == self.shard.id() {
            let done =
                crate::idempotency::finish_local(&self.shard, authed.client, &key, hash, reply.status, &reply.body);
            return done.await.map_err(Refusal::Home);
        }
        let msg = |req| {
            let mut r = self.idem_request(authed, req, key, hash);
            r.status = reply.status;
            r.response = reply.body.clone();
            MeshMsg::IdemFinish(r)
        };
        match self.shard.ask(authed.home, msg).await? {
            MeshMsg::IdemFinished { result, .. } => result.map_err(Refusal::Home),
            _ => Err(Refusal::Home(AppendRefusal::ShuttingDown)),
        }
    }

    /// Releases a keyed request's reservation (it did not end in a 202).
    async fn idem_abort(&self, authed: Authed, key: String, hash: [u8; 32]) {
        if authed.home == self.shard.id() {
            crate::idempotency::abort_local(&self.shard, authed.client, &key);
            return;
        }
        let msg = MeshMsg::IdemAbort(self.idem_request(authed, 0, key, hash));
        let _ = self.shard.send(authed.home, msg).await;
    }

    async fn send_one(&mut self, req: Request<'_>, authed: Authed) -> Result<Reply, ApiError> {
        check_json_content_type(&req)?;
        let cfg = self.shard.cfg();
        let msg = with_json(req.body, |v| new_message(v, authed.client, &cfg.business, &cfg.providers, now_ms()))??;
        let offset = self.shard.clients().get(authed.client).shed_offset_percent;
        if !self.shard.admits(msg.priority, offset) {
            self.shard.metrics().shed(msg.priority);
            return Err(ApiError::refusal(Refusal::Shed));
        }
        if !self.rate(authed, 1).await?.admitted {
            self.shard.metrics().rate_limited(authed.client);
            return Err(ApiError::rate_limited());
        }
        let home = self.home_of(msg.to);
        let outcome = self.append_on(home, msg).await;
        match outcome {
            Ok(seqs) => match seqs[0] {
                Some(seq) => Ok(Reply { status: 202, body: accepted_json(TrackingId { shard: home as u16, seq }) }),
                None => {
                    self.refund(authed, 1);
                    Err(ApiError::refusal(Refusal::Shed))
                }
            },
            Err(r) => {
                self.refund(authed, 1);
                Err(ApiError::refusal(r))
            }
        }
    }

    /// The home shard of recipient `to` (no hashing with one shard).
    fn home_of(&self, to: &str) -> usize {
        match self.shard.count() {
            1 => 0,
            count => crate::route(to, count),
        }
    }

    async fn send_batch(&mut self, req: Request<'_>, authed: Authed) -> Result<Reply, ApiError> {
        check_json_content_type(&req)?;
        let now = now_ms();
        let cfg = self.shard.cfg();
        let count = self.shard.count();
        let offset = self.shard.clients().get(authed.client).shed_offset_percent;
        // Validate and shed item by item; group the rest by home shard.
        // The messages borrow the request body: only those sent to another
        // shard are copied (below).
        let mut results: Vec<Result<TrackingId, ApiError>> = Vec::new();
        let mut groups: Vec<(Vec<usize>, Vec<MessageRef<'_>>)> = (0..count).map(|_| (Vec::new(), Vec::new())).collect();
        let mut wanted = 0u32;
        // One reading for the whole loop: nothing in it changes the
        // shard's memory pressure (same answers as `Shard::admits` per
        // item, which recomputed it for every item).
        let pressure = self.shard.shed_pressure_percent();
        let admits = |m: &MessageRef<'_>| pressure < crate::pressure::threshold_percent(m.priority, offset);
        with_json(req.body, |value| {
            let items = batch_items(value)?;
            results.reserve_exact(items.len());
            for (i, item) in items.iter().enumerate() {
                match new_message(item, authed.client, &cfg.business, &cfg.providers, now) {
                    Ok(m) if !admits(&m) => {
                        self.shard.metrics().shed(m.priority);
                        results.push(Err(ApiError::refusal(Refusal::Shed)))
                    }
                    Ok(m) => {
                        let (positions, msgs) = &mut groups[self.home_of(m.to)];
                        if msgs.is_empty() {
                            // One allocation per group, not one per doubling.
                            let room = items.len() - i;
                            positions.reserve_exact(room);
                            msgs.reserve_exact(room);
                        }
                        positions.push(i);
                        msgs.push(m);
                        // A placeholder that `Tally::record` overwrites (every
                        // grouped position gets an outcome); no allocation.
                        results.push(Ok(TrackingId { shard: u16::MAX, seq: 0 }));
                        wanted += 1;
                    }
                    Err(e) => results.push(Err(e)),
                }
            }
            Ok::<(), ApiError>(())
        })??;
        if wanted > 0 && !self.rate(authed, wanted).await?.admitted {
            self.shard.metrics().rate_limited(authed.client);
            return Err(ApiError::rate_limited()); // the whole batch, as documented
        }
        // Send every remote group first, then append the local one, then
        // collect: the shards commit in parallel.
        let mut waits = Vec::new();
        let mut local = None;
        for (home, (positions, msgs)) in groups.into_iter().enumerate() {
            if msgs.is_empty() {
                continue;
            }
            if home == self.shard.id() {
                local = Some((positions, msgs));
                continue;
            }
            let from = self.shard.id() as u16;
            let items = msgs.iter().map(MessageRef::to_new_message).collect();
            let sent = self.shard.request(home, |req| MeshMsg::Append { from, req, items }).await;
            waits.push((home, positions, sent));
        }
        let mut tally = Tally::default();
        if let Some((positions, msgs)) = local {
            let outcome = self.shard.append_durable(&msgs).await.map_err(Refusal::Home);
            tally.record(&mut results, &positions, self.shard.id(), outcome);
        }
        for (home, positions, sent) in waits {
            let outcome = match sent {
                Ok(pending) => appended(pending.answer().await),
                Err(e) => Err(e.into()),
            };
            tally.record(&mut results, &positions, home, outcome);
        }
        if tally.refused > 0 {
            self.refund(authed, tally.refused);
        }
        if tally.accepted == 0 {
            if let Some(r) = tally.refusal {
                return Err(ApiError::refusal(r));
            }
            // Every item shed (here or on its home shard): the engine is
            // overloaded, and the whole request says so (docs/API.md).
            if results.iter().all(|r| matches!(r, Err(e) if e.code == "overloaded")) {
                return Err(ApiError::refusal(Refusal::Shed));
            }
        }
        Ok(Reply { status: 202, body: batch_json(&results) })
    }

    async fn get_status(&mut self, id: &[u8], authed: Authed) -> Result<Reply, ApiError> {
        let not_found = || ApiError::new(404, "not_found", "no such message");
        let id = TrackingId::decode(id).filter(|t| (t.shard as usize) < self.shard.count()).ok_or_else(not_found)?;
        let home = id.shard as usize;
        let view = if home == self.shard.id() {
            self.shard.lookup_local(id.seq, authed.client).await
        } else {
            let (from, client) = (self.shard.id() as u16, authed.client);
            match self.shard.ask(home, |req| MeshMsg::Lookup { from, req, seq: id.seq, client }).await {
                Ok(MeshMsg::Found { view, .. }) => view,
                Ok(_) => return Err(ApiError::refusal(Refusal::Home(AppendRefusal::ShuttingDown))),
                Err(e) => return Err(ApiError::refusal(e.into())),
            }
        };
        let view = view.ok_or_else(not_found)?;
        Ok(Reply { status: 200, body: status_json(id, &view) })
    }

    /// Counts `n` messages against the client's limit on its home shard
    /// (`n = 0` reads the state) and remembers the decision for the headers.
    async fn rate(&mut self, authed: Authed, n: u32) -> Result<Decision, ApiError> {
        let at_sec = now_ms() / 1000;
        let decision = if authed.home == self.shard.id() {
            self.shard.rate_take_local(authed.client, n)
        } else {
            let (from, client) = (self.shard.id() as u16, authed.client);
            match self.shard.ask(authed.home, |req| MeshMsg::RateTake { from, req, client, n }).await {
                Ok(MeshMsg::RateTaken { decision, .. }) => decision,
                Ok(_) => return Err(ApiError::refusal(Refusal::Home(AppendRefusal::ShuttingDown))),
                Err(e) => return Err(ApiError::refusal(e.into())),
            }
        };
        self.decision = Some((decision, at_sec));
        Ok(decision)
    }

    /// Gives back `n` counted messages that were not accepted after all.
    fn refund(&mut self, authed: Authed, n: u32) {
        let Some((d, at_sec)) = self.decision.as_mut() else { return };
        d.remaining = (d.remaining + n as u64).min(d.limit);
        let at_sec = *at_sec;
        if authed.home == self.shard.id() {
            self.shard.rate_refund_local(authed.client, n, at_sec);
        } else {
            // From its own task: the answer need not wait for channel room.
            // Best effort: a refund lost to a timeout only undercounts.
            let shard = self.shard.clone();
            let msg = MeshMsg::RateRefund { client: authed.client, n, at_sec };
            glommio::spawn_local(async move {
                let _ = shard.send(authed.home, msg).await;
            })
            .detach();
        }
    }

    async fn append_on(&self, home: usize, msg: MessageRef<'_>) -> Result<Vec<Option<u64>>, Refusal> {
        if home == self.shard.id() {
            return self.shard.append_durable(&[msg]).await.map_err(Refusal::Home);
        }
        let (from, items) = (self.shard.id() as u16, vec![msg.to_new_message()]);
        appended(self.shard.ask(home, |req| MeshMsg::Append { from, req, items }).await)
    }
}

/// Outcomes of a batch's groups.
#[derive(Default)]
struct Tally {
    accepted: usize,
    /// Messages counted against the rate limit but not accepted.
    refused: u32,
    refusal: Option<Refusal>,
}

impl Tally {
    fn record(
        &mut self,
        results: &mut [Result<TrackingId, ApiError>],
        positions: &[usize],
        home: usize,
        outcome: Result<Vec<Option<u64>>, Refusal>,
    ) {
        match outcome {
            Ok(seqs) => {
                assert_eq!(seqs.len(), positions.len(), "home shard answered for another number of items");
                for (&pos, seq) in positions.iter().zip(seqs) {
                    results[pos] = match seq {
                        Some(seq) => {
                            self.accepted += 1;
                            Ok(TrackingId { shard: home as u16, seq })
                        }
                        None => {
                            self.refused += 1;
                            self.refusal = Some(Refusal::Shed);
                            Err(ApiError::refusal(Refusal::Shed))
                        }
                    };
                }
            }
            Err(r) => {
                for &pos in positions {
                    results[pos] = Err(ApiError::refusal(r));
                }
                self.refused += positions.len() as u32;
                self.refusal = Some(r);
            }
        }
    }
}

/// The outcome of an `Append` from the home shard's answer.
fn appended(answer: Result<MeshMsg, MeshError>) -> Result<Vec<Option<u64>>, Refusal> {
    match answer {
        Ok(MeshMsg::Appended { result, .. }) => result.map_err(Refusal::Home),
        Ok(_) => Err(Refusal::Home(AppendRefusal::ShuttingDown)),
        Err(e) => Err(e.into()),
    }
}
