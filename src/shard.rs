//! One shard at run time: the state it owns (journal, index, sessions, rate
//! windows, memory budget) and its end of the channel mesh.
//!
//! This module holds state and imports no protocol (a tidy test checks it):
//! the protocols (`business`, `mobile`, `admin`) call into a [`Shard`], and
//! `dispatch` routes mesh messages to it.
//!
//! Every wait on another shard is bounded by `engine.mesh_reply_timeout_ms`:
//! the wait for room in the channel to it and the wait for its answer.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::{Duration, Instant};

use esh3ar_shards::feed::FeedStore;
use esh3ar_shards::id::TrackingId;
use esh3ar_shards::index::MessageIndex;
use esh3ar_shards::journal::Journal;
use esh3ar_shards::limiter::{Decision, RateLimiter};
use esh3ar_shards::record::{Accepted, Record};
use esh3ar_shards::storage::DmaStorage;
use futures_channel::oneshot;
use hashbrown::HashMap;

use crate::clients::ClientTable;
use crate::clock::now_ms;
use crate::config::Config;
use crate::delivery::{BodyCache, Sessions};
pub use crate::mesh_msg::{AppendRefusal, ConfigUpdate, MeshError, MeshMsg, NewMessage, PendingReplies, StatusView};
use crate::metrics::ShardMetrics;
use crate::notify::Notify;
use crate::pressure::{shard_share_bytes, threshold_percent, Pressure};
use crate::shutdown::Shutdown;

/// Test hook (docs/ARCHITECTURE.md, "Test hooks"): the home shard panics
/// when it appends a message whose body is exactly this variable's value.
pub const TEST_PANIC_ON_BODY_ENV: &str = "ESH3AR_TEST_PANIC_ON_BODY";
/// Test hook: the home shard holds its answer to a remote `Append` holding
/// a message with exactly this body for `mesh_reply_timeout_ms` + 1 s.
pub const TEST_SLOW_REPLY_ON_BODY_ENV: &str = "ESH3AR_TEST_SLOW_REPLY_ON_BODY";

/// A validated message, borrowed from where it lives: the request being
/// answered (a message homed on the shard that read it is never copied)
/// or the [`NewMessage`] another shard sent.
#[derive(Debug, Clone, Copy)]
pub struct MessageRef<'a> {
    /// Index of the sending client in the `ClientTable`.
    pub client: u32,
    pub to: &'a str,
    pub body: &'a [u8],
    pub priority: esh3ar_shards::Priority,
    pub expires_at_ms: u64,
    pub accepted_at_ms: u64,
    /// The message's own `fallback` (None: the client's default, if any).
    pub fallback: Option<crate::fallback::FallbackSpec>,
}

impl MessageRef<'_> {
    /// An owned copy, to send to the message's home shard.
    pub fn to_new_message(&self) -> NewMessage {
        NewMessage {
            client: self.client,
            to: self.to.to_owned(),
            body: self.body.to_vec(),
            priority: self.priority,
            expires_at_ms: self.expires_at_ms,
            accepted_at_ms: self.accepted_at_ms,
            fallback: self.fallback,
        }
    }
}

impl<'a> From<&'a NewMessage> for MessageRef<'a> {
    fn from(m: &'a NewMessage) -> Self {
        MessageRef {
            client: m.client,
            to: &m.to,
            body: &m.body,
            priority: m.priority,
            expires_at_ms: m.expires_at_ms,
            accepted_at_ms: m.accepted_at_ms,
            fallback: m.fallback,
        }
    }
}

/// Idempotency keys reserved by a first request still in flight:
/// (client, key) -> SHA-256 of the body.
pub type KeysInFlight = HashMap<(u32, Box<str>), [u8; 32]>;

/// Counters of one shard, summed over shards at the edge.
#[derive(Default)]
pub struct ShardStats {
    pub accepted: Cell<u64>,
    pub connections: Cell<u64>,
}

/// What a shard keeps on disk, opened (and recovered) before it starts.
pub struct Stores {
    /// The journal, recovered.
    pub journal: Rc<Journal>,
    /// The index the recovery rebuilt.
    pub index: MessageIndex,
    /// The event feed.
    pub feed: FeedStore<DmaStorage>,
    /// The offline backlog's cold store.
    pub backlog: crate::backlog::Backlog,
}

/// Everything one shard owns. Built once by [`Shard::new`].
pub struct Shard {
    id: usize,
    count: usize,
    /// This shard's own copy of the effective config and clients (no
    /// state shared between cores): replaced by [`Shard::install_config`].
    cfg: RefCell<Rc<Config>>,
    clients: RefCell<Rc<ClientTable>>,
    /// The next version's clients, between the two phases of a change.
    clients_next: RefCell<Option<Rc<ClientTable>>>,
    /// The runtime config version installed (`runtime_config`).
    config_version: Cell<u64>,
    journal: Rc<Journal>,
    index: RefCell<MessageIndex>,
    mesh: crate::mesh::Mesh<MeshMsg>,
    replies: PendingReplies,
    mesh_timeout: Cell<Duration>,
    shutdown: Shutdown,
    stats: ShardStats,
    metrics: ShardMetrics,
    sessions: Sessions,
    bodies: RefCell<BodyCache>,
    limiter: RefCell<RateLimiter>,
    pressure: Pressure,
    panic_on_body: Option<Vec<u8>>,
    slow_reply_on_body: Option<Vec<u8>>,
    /// Woken when an event became owed (the receipts task waits on it).
    events_ready: Notify,
    /// Events of clients that read them with `GET /v1/events`.
    feed: FeedStore<DmaStorage>,
    /// The offline backlog's cold store and restores in flight.
    backlog: crate::backlog::Backlog,
    /// Generation of the last `User` record appended: segments are deleted
    /// only once it is durable, so a directory entry moved to a newer
    /// segment never loses its old copy before the new one is on disk.
    user_generation: Cell<u64>,
    /// Idempotency keys of clients homed here whose first request is in
    /// flight: (client, key) -> SHA-256 of its body. Not journaled: a
    /// crash forgets the reservation, and the client's retry starts over.
    idempotency_in_flight: RefCell<KeysInFlight>,
}

/// An answer this shard awaits from another one. Dropping it forgets the
/// request, so a late answer is discarded.
pub struct PendingReply<'a> {
    shard: &'a Shard,
    req: u64,
    rx: Option<oneshot::Receiver<MeshMsg>>,
    deadline: Instant,
}

impl Drop for PendingReply<'_> {
    fn drop(&mut self) {
        self.shard.replies.cancel(self.req);
    }
}

impl PendingReply<'_> {
    /// The answer, or why none came in time.
    pub async fn answer(mut self) -> Result<MeshMsg, MeshError> {
        let Some(rx) = self.rx.take() else { return Err(MeshError::Closed) };
        let left = self.deadline.saturating_duration_since(Instant::now());
        futures_lite::future::or(async { rx.await.map_err(|_| MeshError::Closed) }, async {
            glommio::timer::sleep(left).await;
            Err(MeshError::Timeout)
        })
        .await
    }
}

impl Shard {
    /// The shard `mesh.peer_id()` of `count`, over its recovered journal.
    pub fn new(
        count: usize,
        cfg: Rc<Config>,
        clients: Rc<ClientTable>,
        stores: Stores,
        mesh: crate::mesh::Mesh<MeshMsg>,
    ) -> Rc<Shard> {
        let Stores { journal, index, feed, backlog } = stores;
        let share = shard_share_bytes(&cfg, count);
        let metrics = ShardMetrics::new(clients.len());
        Rc::new(Shard {
            id: mesh.peer_id(),
            count,
            mesh_timeout: Cell::new(Duration::from_millis(cfg.engine.mesh_reply_timeout_ms)),
            bodies: RefCell::new(BodyCache::new(cfg.engine.body_cache_bytes.min(share / 4))),
            pressure: Pressure::new(share / 2),
            cfg: RefCell::new(cfg),
            clients: RefCell::new(clients),
            clients_next: RefCell::new(None),
            config_version: Cell::new(0),
            journal,
            index: RefCell::new(index),
            mesh,
            replies: PendingReplies::default(),
            shutdown: Shutdown::default(),
            stats: ShardStats::default(),
            metrics,
            sessions: Sessions::default(),
            limiter: RefCell::new(RateLimiter::new()),
            panic_on_body: std::env::var_os(TEST_PANIC_ON_BODY_ENV).map(|v| v.into_encoded_bytes()),
            slow_reply_on_body: std::env::var_os(TEST_SLOW_REPLY_ON_BODY_ENV).map(|v| v.into_encoded_bytes()),
            events_ready: Notify::default(),
            feed,
            backlog,
            idempotency_in_flight: RefCell::new(HashMap::new()),
            user_generation: Cell::new(0),
        })
    }

    /// This shard's id.
    pub fn id(&self) -> usize {
        self.id
    }
    /// How many shards the engine runs.
    pub fn count(&self) -> usize {
        self.count
    }
    /// The engine's configuration (this shard's copy of the version in force).
    pub fn cfg(&self) -> Rc<Config> {
        self.cfg.borrow().clone()
    }
    /// The business clients of the version in force.
    pub fn clients(&self) -> Rc<ClientTable> {
        self.clients.borrow().clone()
    }
    /// The runtime config version this shard has installed (0 before the
    /// first; see `runtime_config`). For an `esh3ar_config_version` gauge.
    pub fn config_version(&self) -> u64 {
        self.config_version.get()
    }

    /// Installs one phase of a runtime config change. `Prepare` takes the
    /// new config and the new clients but keeps authenticating with the
    /// current keys, so a request from a new client cannot reach a shard
    /// that does not know its index yet; `Commit` (sent once every shard
    /// prepared) switches the keys. Limits apply at once: the limiter takes
    /// the limit per call, the memory budget is resized here.
    pub fn install_config(&self, update: ConfigUpdate) {
        match update {
            ConfigUpdate::Prepare { version, cfg, clients } => {
                let current = self.clients();
                let clients = Rc::new(*clients);
                *self.clients.borrow_mut() = Rc::new((*clients).clone().with_keys_of(&current));
                *self.clients_next.borrow_mut() = Some(clients);
                self.mesh_timeout.set(Duration::from_millis(cfg.engine.mesh_reply_timeout_ms));
                self.pressure.set_budget(shard_share_bytes(&cfg, self.count) / 2);
                *self.cfg.borrow_mut() = Rc::new(*cfg);
                self.config_version.set(version);
            }
            ConfigUpdate::Commit { version } => {
                if let Some(next) = self.clients_next.borrow_mut().take() {
                    *self.clients.borrow_mut() = next;
                }
                self.config_version.set(version);
                // A raised budget may admit connections waiting for room.
                self.pressure.wake();
            }
        }
    }
    /// This shard's journal.
    pub fn journal(&self) -> &Journal {
        &self.journal
    }
    /// The index rebuilt from the journal.
    pub fn index(&self) -> &RefCell<MessageIndex> {
        &self.index
    }
    /// This shard's shutdown (signal, connection gate).
    pub fn shutdown(&self) -> &Shutdown {
        &self.shutdown
    }
    /// Counters.
    pub fn stats(&self) -> &ShardStats {
        &self.stats
    }
    /// What `/metrics` counts on this shard.
    pub fn metrics(&self) -> &ShardMetrics {
        &self.metrics
    }
    /// Live WebSocket sessions of users homed here.
    pub fn sessions(&self) -> &Sessions {
        &self.sessions
    }
    /// Bodies of recent messages.
    pub fn bodies(&self) -> &RefCell<BodyCache> {
        &self.bodies
    }
    /// The memory budget.
    pub fn pressure(&self) -> &Pressure {
        &self.pressure
    }
    /// Idempotency keys whose first request is in flight.
    pub fn idempotency_in_flight(&self) -> &RefCell<KeysInFlight> {
        &self.idempotency_in_flight
    }
    /// Woken when an event became owed to a sender.
    pub fn events_ready(&self) -> &Notify {
        &self.events_ready
    }

    /// The offline backlog: the cold store and restores in flight.
    pub fn backlog(&self) -> &crate::backlog::Backlog {
        &self.backlog
    }

    /// The event feed's store.
    pub fn feed(&self) -> &FeedStore<DmaStorage> {
        &self.feed
    }
    /// Generation of the last directory record appended (see `users.rs`).
    pub fn user_generation(&self) -> &Cell<u64> {
        &self.user_generation
    }
    /// Requests awaiting another shard's answer.
    pub fn replies(&self) -> &PendingReplies {
        &self.replies
    }

    /// Appends messages homed on this shard; returns their sequence numbers
    /// and the generation to wait for. Synchronous: no other task runs
    /// between the appends, so the messages of one call stay adjacent.
    pub fn append_local(&self, items: &[MessageRef<'_>]) -> Result<(Vec<Option<u64>>, u64), AppendRefusal> {
        let mut seqs = Vec::with_capacity(items.len());
        let mut generation = 0;
        // Read once per call, not per item: this loop never awaits, so no
        // config change can be installed in the middle of it.
        let clients = self.clients();
        let known_only = self.cfg.borrow().validation.known_recipients_only;
        for m in items {
            let client = clients.get(m.client);
            // Per item: the appends before it moved the pressure.
            if !self.admits(m.priority, client.shed_offset_percent) {
                self.metrics.shed(m.priority);
                seqs.push(None);
                continue;
            }
            if self.panic_on_body.as_deref() == Some(m.body) {
                panic!("test hook {TEST_PANIC_ON_BODY_ENV}: shard {} appends the magic body", self.id);
            }
            let mut index = self.index.borrow_mut();
            debug_assert_eq!(crate::route(m.to, self.count), self.id, "message appended on a foreign shard");
            let seq = self.journal.take_seq();
            let client_id = clients.id(m.client);
            let record = Record::Accepted(Accepted {
                seq,
                client: client_id,
                to: m.to,
                priority: m.priority,
                expires_at_ms: m.expires_at_ms,
                accepted_at_ms: m.accepted_at_ms,
                body: m.body,
            });
            let appended = self.journal.append(&record, &mut index).map_err(|e| AppendRefusal::from(&e))?;
            generation = appended.generation;
            seqs.push(Some(seq));
            self.stats.accepted.set(self.stats.accepted.get() + 1);
            self.metrics.messages(esh3ar_shards::Status::Accepted, 1);
            // Asynchronous validation: refused now, in the same commit, but
            // still accepted (202) for the sender (docs/API.md, "Asynchronous validation").
            match index.refusal(m.to, client_id, known_only) {
                Some(reason) => generation = self.reject(&mut index, &[seq], reason)?,
                None => {
                    // Cached for a user connected now, whose session sends
                    // it at once; anyone else's would only push those out
                    // (delivery and the spill read the journal on a miss).
                    if self.sessions.has(m.to) {
                        self.bodies.borrow_mut().insert(seq, m.body);
                    }
                    // The fallback plan is born in the same commit (docs/ARCHITECTURE.md, "Fallback channels").
                    if let Some(spec) = m.fallback.or(client.fallback) {
                        generation = crate::fallback::plan(self, &mut index, seq, m.accepted_at_ms, spec)
                            .map_err(|e| AppendRefusal::from(&e))?;
                    }
                }
            }
        }
        Ok((seqs, generation))
    }

    /// Fill level of this shard's memory budget, in percent: everything it
    /// holds. At 100% connections stop reading new requests.
    pub fn pressure_percent(&self) -> u64 {
        self.fill_percent(false)
    }

    /// The fill that decides shedding: the pending messages held in memory
    /// do not count while the offline backlog can move them to disk
    /// (docs/ARCHITECTURE.md, "Offline backlog": a backlog alone never
    /// causes a 503; when spilling lags, connections wait for room instead).
    pub fn shed_pressure_percent(&self) -> u64 {
        self.fill_percent(self.cfg.borrow().backlog.spill_after_ms > 0)
    }

    fn fill_percent(&self, without_pending: bool) -> u64 {
        let index = self.index.borrow();
        // The directory is held in memory too (docs/ARCHITECTURE.md, "User directory and opt-out").
        let directory_bytes = index.users_len() * esh3ar_shards::directory::USER_ENTRY_BYTES;
        let keys_bytes = index.idempotency().bytes();
        let entries = if without_pending { index.len().saturating_sub(index.pending_messages()) } else { index.len() };
        self.pressure.percent(self.journal.unflushed_bytes() + directory_bytes + keys_bytes, entries)
    }

    /// True if a message of `priority` (from a tier with `offset`) may be
    /// taken into memory now.
    pub fn admits(&self, priority: esh3ar_shards::Priority, offset: u8) -> bool {
        self.shed_pressure_percent() < threshold_percent(priority, offset)
    }

    /// True when the budget is used up, or when the pending messages held in
    /// memory pass [`crate::backlog::HOLD_PERCENT`] of it while the offline
    /// backlog moves them to disk: connections stop reading until there is
    /// room (ingest runs at the speed of the spill, memory stays flat).
    pub fn is_full(&self) -> bool {
        self.pressure_percent() >= 100 || self.backlog_holds()
    }

    fn backlog_holds(&self) -> bool {
        self.backlog_pending_over(crate::backlog::HOLD_PERCENT)
    }

    /// True when the spill is on and the pending messages held in memory
    /// take more than `percent` of the memory budget.
    pub fn backlog_pending_over(&self, percent: u64) -> bool {
        if self.cfg.borrow().backlog.spill_after_ms == 0 {
            return false;
        }
        let pending_bytes = self.index.borrow().pending_messages() * crate::pressure::INDEX_ENTRY_BYTES;
        pending_bytes as u128 * 100 > self.pressure.budget() as u128 * percent as u128
    }

    /// Returns once the budget has room (or shutdown began), waking on what
    /// frees memory: a buffer given back or segments deleted
    /// ([`Pressure::wake`]), or the journal's next fdatasync.
    pub async fn wait_for_room(&self) {
        while self.is_full() && !self.shutdown.is_set() {
            let j = &self.journal;
            let flushing = j.failure().is_none() && j.appended_generation() > j.durable_generation();
            let flushed = async {
                if flushing {
                    let _ = j.wait_durable(j.appended_generation()).await;
                } else {
                    futures_lite::future::pending::<()>().await;
                }
            };
            let freed = futures_lite::future::or(self.pressure.changed(), flushed);
            futures_lite::future::or(freed, self.shutdown.wait()).await;
        }
    }

    /// Counts `n` messages of `client` (homed here) against its limit.
    pub fn rate_take_local(&self, client: u32, n: u32) -> Decision {
        let limit = self.clients.borrow().get(client).messages_per_minute;
        self.limiter.borrow_mut().take(client, limit, n as u64, now_ms() / 1000)
    }

    /// Gives back `n` messages of `client` (homed here) counted at `at_sec`.
    pub fn rate_refund_local(&self, client: u32, n: u32, at_sec: u64) {
        self.limiter.borrow_mut().refund(client, n as u64, at_sec, now_ms() / 1000);
    }

    /// Appends and waits for durability.
    pub async fn append_durable(&self, items: &[MessageRef<'_>]) -> Result<Vec<Option<u64>>, AppendRefusal> {
        let (seqs, generation) = self.append_local(items)?;
        self.journal.wait_durable(generation).await.map_err(|e| AppendRefusal::from(&e))?;
        self.notify_recipients(items.iter().map(|m| m.to));
        Ok(seqs)
    }

    /// On the home shard: appends messages another shard sent and answers
    /// it once they are durable, from a task of its own (the mesh receiver
    /// never waits).
    pub fn answer_append(self: &Rc<Self>, from: u16, req: u64, items: Vec<NewMessage>) {
        let appended = {
            let refs: Vec<MessageRef<'_>> = items.iter().map(MessageRef::from).collect();
            self.append_local(&refs)
        };
        let shard = self.clone();
        let slow = self.slow_reply_on_body.as_deref().is_some_and(|b| items.iter().any(|m| m.body == b));
        glommio::spawn_local(async move {
            if slow {
                glommio::timer::sleep(shard.mesh_timeout.get() + Duration::from_secs(1)).await;
            }
            let result = match appended {
                Ok((seqs, generation)) => match shard.journal.wait_durable(generation).await {
                    Ok(()) => {
                        shard.notify_recipients(items.iter().map(|m| m.to.as_str()));
                        Ok(seqs)
                    }
                    Err(e) => Err(AppendRefusal::from(&e)),
                },
                Err(e) => Err(e),
            };
            drop(items);
            let _ = shard.send(from as usize, MeshMsg::Appended { req, result }).await;
        })
        .detach();
    }

    /// Looks up a message for `client` (None: unknown, or another client's).
    pub async fn lookup_local(&self, seq: u64, client: u32) -> Option<Box<StatusView>> {
        {
            let index = self.index.borrow();
            if let Some(m) = index.get(seq) {
                if &*m.client != self.clients.borrow().id(client) {
                    return None;
                }
                return Some(Box::new(StatusView::of(m, index.provider_message_id(seq))));
            }
        }
        // Not in memory: pending in the offline backlog on disk, maybe.
        let client = self.clients.borrow().id(client).to_owned();
        self.cold_status(seq, &client).await
    }

    /// Sends to shard `to`, waiting for room in the channel (a full channel
    /// holds the sender, which stops reading its connection: backpressure,
    /// not a refusal), at most `engine.mesh_reply_timeout_ms`.
    pub async fn send(&self, to: usize, msg: MeshMsg) -> Result<(), MeshError> {
        self.send_until(to, msg, Instant::now() + self.mesh_timeout.get()).await
    }

    async fn send_until(&self, to: usize, msg: MeshMsg, deadline: Instant) -> Result<(), MeshError> {
        // Fast path: room now, no timer.
        let msg = match self.mesh.try_send_to(to, msg) {
            Ok(()) => return Ok(()),
            Err(msg) => msg,
        };
        let left = deadline.saturating_duration_since(Instant::now());
        let send = async { self.mesh.send_to(to, msg).await.map_err(|_| MeshError::Closed) };
        futures_lite::future::or(send, async {
            glommio::timer::sleep(left).await;
            Err(MeshError::Timeout)
        })
        .await
    }

    /// Sends the request `make(req)` to shard `to` (waiting for room) and
    /// returns the answer to await; both waits together are bounded by
    /// `engine.mesh_reply_timeout_ms`.
    pub async fn request(&self, to: usize, make: impl FnOnce(u64) -> MeshMsg) -> Result<PendingReply<'_>, MeshError> {
        let deadline = Instant::now() + self.mesh_timeout.get();
        let (req, rx) = self.replies.register();
        let pending = PendingReply { shard: self, req, rx: Some(rx), deadline };
        self.send_until(to, make(req), deadline).await?;
        Ok(pending)
    }

    /// [`Shard::request`] and its answer.
    pub async fn ask(&self, to: usize, make: impl FnOnce(u64) -> MeshMsg) -> Result<MeshMsg, MeshError> {
        self.request(to, make).await?.answer().await
    }

    /// Sends an answer that is ready now from its own task, so the mesh
    /// receiver never waits for channel space.
    pub fn reply(self: &Rc<Self>, to: u16, msg: MeshMsg) {
        let shard = self.clone();
        glommio::spawn_local(async move {
            let _ = shard.send(to as usize, msg).await;
        })
        .detach();
    }

    /// Wakes the live sessions of the recipients of durable messages.
    fn notify_recipients<'a>(&self, recipients: impl Iterator<Item = &'a str>) {
        if self.sessions.is_empty() {
            return;
        }
        let mut last: Option<&str> = None;
        for to in recipients {
            if last != Some(to) {
                self.sessions.notify(to);
                last = Some(to);
            }
        }
    }

    /// The tracking id of a message homed here.
    pub fn tracking_id(&self, seq: u64) -> TrackingId {
        TrackingId { shard: self.id as u16, seq }
    }
}
