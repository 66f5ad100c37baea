//! One shard at run time: its journal and index, its end of the channel
//! mesh, and the typed messages shards exchange.
//!
//! A shard that accepts a request for a user homed elsewhere sends
//! [`MeshMsg::Append`] to the home shard and parks the request on a
//! [`PendingReplies`] slot; the home shard appends, waits for the group
//! commit and answers [`MeshMsg::Appended`]. The mesh receivers never await
//! a send (replies go out from their own task), so two shards flooding each
//! other cannot deadlock.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;

use esh3ar_shards::id::TrackingId;
use esh3ar_shards::index::MessageIndex;
use esh3ar_shards::journal::{Journal, JournalError};
use esh3ar_shards::record::{Accepted, Record};
use esh3ar_shards::{Priority, Status};
use futures_channel::oneshot;
use hashbrown::HashMap;

use crate::clients::ClientTable;
use crate::config::Config;
use crate::delivery::{BodyCache, Sessions};
use crate::pressure::{threshold_percent, Pressure};
use crate::shutdown::Shutdown;
use esh3ar_shards::limiter::{Decision, RateLimiter};

/// A validated message on its way to its home shard.
#[derive(Debug)]
pub struct NewMessage {
    /// Index of the sending client in the [`ClientTable`].
    pub client: u32,
    pub to: String,
    pub body: Vec<u8>,
    pub priority: Priority,
    pub expires_at_ms: u64,
    pub accepted_at_ms: u64,
}

/// Why a home shard could not take messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendRefusal {
    /// The journal failed (disk error): nothing is acknowledged any more.
    StorageFailed,
    /// The shard is shutting down.
    ShuttingDown,
}

impl From<&JournalError> for AppendRefusal {
    fn from(e: &JournalError) -> Self {
        match e {
            JournalError::Failed(_) => AppendRefusal::StorageFailed,
            JournalError::Closed => AppendRefusal::ShuttingDown,
        }
    }
}

/// What `GET /v1/messages/{id}` shows.
#[derive(Debug, Clone)]
pub struct StatusView {
    pub to: String,
    pub status: Status,
    pub priority: Priority,
    pub attempts: u32,
    pub accepted_at_ms: u64,
    pub delivered_at_ms: u64,
    pub acked_at_ms: u64,
}

/// Messages between shards.
#[derive(Debug)]
pub enum MeshMsg {
    /// Append these messages (all homed on the receiver) and answer once durable.
    Append { from: u16, req: u64, items: Vec<NewMessage> },
    /// Answer to `Append`: per item, in order, its sequence number or None
    /// if the home shard shed it (memory pressure).
    Appended { req: u64, result: Result<Vec<Option<u64>>, AppendRefusal> },
    /// Count `n` messages of `client` against its rate limit (the receiver
    /// is the client's home shard); `n = 0` asks for the state only.
    RateTake { from: u16, req: u64, client: u32, n: u32 },
    /// Answer to `RateTake`.
    RateTaken { req: u64, decision: Decision },
    /// Give back `n` messages counted at `at_sec` that were not accepted.
    RateRefund { client: u32, n: u32, at_sec: u64 },
    /// Look up a message for a client.
    Lookup { from: u16, req: u64, seq: u64, client: u32 },
    /// Answer to `Lookup`.
    Found { req: u64, view: Option<Box<StatusView>> },
    /// A mobile connection whose upgrade request was accepted elsewhere:
    /// the receiver (the user's home shard) owns the socket from now on,
    /// answers `101` and serves the session.
    Adopt(Box<crate::mobile::Adoption>),
}

/// The mesh channel to a shard had no room (the message was dropped).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelFull;

/// Requests this shard sent and awaits answers for.
#[derive(Default)]
pub struct PendingReplies {
    next: Cell<u64>,
    waiting: RefCell<HashMap<u64, oneshot::Sender<MeshMsg>>>,
}

impl PendingReplies {
    /// Registers a request; returns its id and the receiver of its answer.
    pub fn register(&self) -> (u64, oneshot::Receiver<MeshMsg>) {
        let req = self.next.get();
        self.next.set(req + 1);
        let (tx, rx) = oneshot::channel();
        self.waiting.borrow_mut().insert(req, tx);
        (req, rx)
    }

    /// Forgets a request whose send failed.
    pub fn cancel(&self, req: u64) {
        self.waiting.borrow_mut().remove(&req);
    }

    fn complete(&self, req: u64, msg: MeshMsg) {
        if let Some(tx) = self.waiting.borrow_mut().remove(&req) {
            let _ = tx.send(msg);
        }
    }
}

/// Counters of one shard, summed over shards at the edge.
#[derive(Default)]
pub struct ShardStats {
    pub accepted: Cell<u64>,
    pub connections: Cell<u64>,
}

/// Everything one shard owns.
pub struct Shard {
    pub id: usize,
    pub count: usize,
    pub cfg: Arc<Config>,
    pub clients: Arc<ClientTable>,
    pub journal: Rc<Journal>,
    pub index: RefCell<MessageIndex>,
    pub mesh: crate::mesh::Mesh<MeshMsg>,
    pub replies: PendingReplies,
    pub shutdown: Shutdown,
    pub stats: ShardStats,
    pub sessions: Sessions,
    pub bodies: RefCell<BodyCache>,
    pub limiter: RefCell<RateLimiter>,
    pub pressure: Pressure,
}

impl Shard {
    /// Appends messages homed on this shard; returns their sequence numbers
    /// and the generation to wait for. Synchronous: no other task runs
    /// between the appends, so the messages of one call stay adjacent.
    pub fn append_local(&self, items: &[NewMessage]) -> Result<(Vec<Option<u64>>, u64), AppendRefusal> {
        let mut seqs = Vec::with_capacity(items.len());
        let mut generation = 0;
        for m in items {
            if !self.admits(m.priority, self.clients.get(m.client).shed_offset_percent) {
                seqs.push(None);
                continue;
            }
            let mut index = self.index.borrow_mut();
            debug_assert_eq!(crate::route(&m.to, self.count), self.id, "message appended on a foreign shard");
            let seq = self.journal.take_seq();
            let client = self.clients.id(m.client);
            let record = Record::Accepted(Accepted {
                seq,
                client,
                to: &m.to,
                priority: m.priority,
                expires_at_ms: m.expires_at_ms,
                accepted_at_ms: m.accepted_at_ms,
                body: &m.body,
            });
            let appended = self.journal.append(&record, &mut index).map_err(|e| AppendRefusal::from(&e))?;
            generation = appended.generation;
            seqs.push(Some(seq));
            self.bodies.borrow_mut().insert(seq, &m.body);
            self.stats.accepted.set(self.stats.accepted.get() + 1);
        }
        Ok((seqs, generation))
    }

    /// Fill level of this shard's memory budget, in percent.
    pub fn pressure_percent(&self) -> u64 {
        self.pressure.percent(self.journal.unflushed_bytes(), self.index.borrow().len())
    }

    /// True if a message of `priority` (from a tier with `offset`) may be
    /// taken into memory now.
    pub fn admits(&self, priority: esh3ar_shards::Priority, offset: u8) -> bool {
        self.pressure_percent() < threshold_percent(priority, offset)
    }

    /// True when the budget is used up: connections stop reading.
    pub fn is_full(&self) -> bool {
        self.pressure_percent() >= 100
    }

    /// While connections wait for room, wakes them when there is some.
    pub async fn run_pressure_watch(self: Rc<Self>) {
        while !self.shutdown.is_set() {
            glommio::timer::sleep(std::time::Duration::from_millis(5)).await;
            if self.pressure.has_waiters() && !self.is_full() {
                self.pressure.wake();
            }
        }
        self.pressure.wake();
    }

    /// Counts `n` messages of `client` (homed here) against its limit.
    pub fn rate_take_local(&self, client: u32, n: u32) -> Decision {
        let limit = self.clients.get(client).messages_per_minute;
        self.limiter.borrow_mut().take(client, limit, n as u64, crate::business::now_ms() / 1000)
    }

    /// Appends and waits for durability.
    pub async fn append_durable(&self, items: &[NewMessage]) -> Result<Vec<Option<u64>>, AppendRefusal> {
        let (seqs, generation) = self.append_local(items)?;
        self.journal.wait_durable(generation).await.map_err(|e| AppendRefusal::from(&e))?;
        self.notify_recipients(items);
        Ok(seqs)
    }

    /// Looks up a message for `client` (None: unknown, or another client's).
    pub fn lookup_local(&self, seq: u64, client: u32) -> Option<Box<StatusView>> {
        let index = self.index.borrow();
        let m = index.get(seq)?;
        if &*m.client != self.clients.id(client) {
            return None;
        }
        Some(Box::new(StatusView {
            to: m.to.to_string(),
            status: m.status,
            priority: m.priority,
            attempts: m.attempts,
            accepted_at_ms: m.accepted_at_ms,
            delivered_at_ms: m.delivered_at_ms,
            acked_at_ms: m.acked_at_ms,
        }))
    }

    /// Sends a request to another shard without waiting for channel space:
    /// a full channel means the peer is overloaded, and the caller answers
    /// 503 instead of queueing without bound.
    pub fn try_send(&self, to: usize, msg: MeshMsg) -> Result<(), ChannelFull> {
        self.mesh.try_send_to(to, msg).map_err(|_| ChannelFull)
    }

    /// Handles a message from shard `peer`. Never awaits: answers that need
    /// durability or channel space go out from a spawned task.
    pub fn on_mesh(self: &Rc<Self>, msg: MeshMsg) {
        match msg {
            MeshMsg::Append { from, req, items } => {
                let appended = self.append_local(&items);
                let shard = self.clone();
                glommio::spawn_local(async move {
                    let result = match appended {
                        Ok((seqs, generation)) => match shard.journal.wait_durable(generation).await {
                            Ok(()) => {
                                shard.notify_recipients(&items);
                                Ok(seqs)
                            }
                            Err(e) => Err(AppendRefusal::from(&e)),
                        },
                        Err(e) => Err(e),
                    };
                    let _ = shard.mesh.send_to(from as usize, MeshMsg::Appended { req, result }).await;
                })
                .detach();
            }
            MeshMsg::Lookup { from, req, seq, client } => {
                let view = self.lookup_local(seq, client);
                self.reply(from, MeshMsg::Found { req, view });
            }
            MeshMsg::RateTake { from, req, client, n } => {
                let decision = self.rate_take_local(client, n);
                self.reply(from, MeshMsg::RateTaken { req, decision });
            }
            MeshMsg::RateRefund { client, n, at_sec } => {
                self.limiter.borrow_mut().refund(client, n as u64, at_sec, crate::business::now_ms() / 1000);
            }
            MeshMsg::Appended { req, .. } | MeshMsg::Found { req, .. } | MeshMsg::RateTaken { req, .. } => {
                self.replies.complete(req, msg)
            }
            MeshMsg::Adopt(adoption) => crate::mobile::adopt(self.clone(), *adoption),
        }
    }

    /// Sends an answer that is ready now from its own task, so the mesh
    /// receiver never waits for channel space.
    fn reply(self: &Rc<Self>, to: u16, msg: MeshMsg) {
        let shard = self.clone();
        glommio::spawn_local(async move {
            let _ = shard.mesh.send_to(to as usize, msg).await;
        })
        .detach();
    }

    /// Wakes the live sessions of the recipients of durable messages.
    fn notify_recipients(&self, items: &[NewMessage]) {
        if self.sessions.is_empty() {
            return;
        }
        let mut last: Option<&str> = None;
        for m in items {
            if last != Some(m.to.as_str()) {
                self.sessions.notify(&m.to);
                last = Some(&m.to);
            }
        }
    }

    /// The tracking id of a message homed here.
    pub fn tracking_id(&self, seq: u64) -> TrackingId {
        TrackingId { shard: self.id as u16, seq }
    }
}
