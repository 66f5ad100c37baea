//! The typed messages shards exchange over the mesh (`src/mesh.rs`), and
//! the table of requests a shard awaits answers for.
//!
//! A shard that accepts a request for a user homed elsewhere sends
//! [`MeshMsg::Append`] to the home shard and parks the request on a
//! [`PendingReplies`] slot; the home shard appends, waits for the group
//! commit and answers [`MeshMsg::Appended`]. Every such wait is bounded
//! (`engine.mesh_reply_timeout_ms`, [`MeshError::Timeout`]).

use std::cell::{Cell, RefCell};

use esh3ar_shards::feed::{FeedEvent, FeedPos};
use esh3ar_shards::journal::JournalError;
use esh3ar_shards::limiter::Decision;
use esh3ar_shards::{Priority, Reason, Status};
use futures_channel::oneshot;
use hashbrown::HashMap;

/// A validated message on its way to its home shard.
#[derive(Debug)]
pub struct NewMessage {
    /// Index of the sending client in the `ClientTable`.
    pub client: u32,
    pub to: String,
    pub body: Vec<u8>,
    pub priority: Priority,
    pub expires_at_ms: u64,
    pub accepted_at_ms: u64,
    /// The message's own `fallback` (None: the client's default, if any).
    pub fallback: Option<crate::fallback::FallbackSpec>,
}

/// Why a home shard could not take messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendRefusal {
    /// The journal failed (disk error): nothing is acknowledged any more.
    StorageFailed,
    /// The journal's disk has no room for it (nothing of it was kept).
    StorageFull,
    /// The shard is shutting down.
    ShuttingDown,
}

impl From<&JournalError> for AppendRefusal {
    fn from(e: &JournalError) -> Self {
        match e {
            JournalError::Failed(_) => AppendRefusal::StorageFailed,
            JournalError::Full(_) => AppendRefusal::StorageFull,
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
    /// Why it was rejected or failed.
    pub reason: Reason,
    /// Where it was delivered (app or a fallback channel), once delivered.
    pub channel: Option<&'static str>,
    /// The fallback provider's id for it.
    pub provider_message_id: Option<String>,
}

impl StatusView {
    /// The view of an indexed message and its fallback provider's id
    /// ([`esh3ar_shards::index::MessageIndex::provider_message_id`]).
    pub fn of(m: &esh3ar_shards::index::MessageMeta, provider_message_id: Option<&str>) -> StatusView {
        StatusView {
            to: m.to.to_string(),
            status: m.status,
            priority: m.priority,
            attempts: m.attempts,
            accepted_at_ms: m.accepted_at_ms,
            delivered_at_ms: m.delivered_at_ms,
            acked_at_ms: m.acked_at_ms,
            reason: m.reason,
            channel: (m.delivered_at_ms != 0).then(|| m.channel.as_str()),
            provider_message_id: provider_message_id.map(str::to_owned),
        }
    }
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
    /// List this shard's dead-lettered events after `after` (seq, status
    /// code), of `client` only if set, at most `limit`.
    DeadLetters { from: u16, req: u64, client: Option<String>, after: Option<(u64, u8)>, limit: u32 },
    /// Answer to `DeadLetters`.
    DeadLetterList { req: u64, items: Vec<DeadLetter> },
    /// Replay (or drop) the dead-lettered event of `status` of message `seq`.
    DeadLetterAction { from: u16, req: u64, seq: u64, status: Status, replay: bool },
    /// Answer to `DeadLetterAction`: false if no such dead letter.
    DeadLetterDone { req: u64, found: bool },
    /// A mobile connection whose upgrade request was accepted elsewhere:
    /// the receiver (the user's home shard) owns the socket from now on,
    /// answers `101` and serves the session.
    Adopt(Box<crate::mobile::Adoption>),
    /// Register a user or replace its contact fields (the receiver is the
    /// user's home shard); answered with `UserFound` once durable.
    /// Boxed: the three strings would make every mesh message larger.
    PutUser { from: u16, req: u64, put: Box<UserPut> },
    /// Look up a user of the directory.
    GetUser { from: u16, req: u64, user: String },
    /// Answer to `PutUser` and `GetUser`: the entry (None: no such user).
    UserFound { req: u64, result: Result<Option<Box<crate::users::UserView>>, AppendRefusal> },
    /// Look up (and reserve, if new) an idempotency key on the client's home shard.
    IdemBegin(Box<IdemRequest>),
    /// Answer to `IdemBegin`.
    IdemBegun { req: u64, begin: Box<crate::idempotency::Begin> },
    /// Journal a keyed request's answer; answered once durable.
    IdemFinish(Box<IdemRequest>),
    /// Answer to `IdemFinish`.
    IdemFinished { req: u64, result: Result<(), AppendRefusal> },
    /// Release the reservation of a keyed request that did not end in a 202.
    IdemAbort(Box<IdemRequest>),
    /// Read at most `limit` events of `client`'s feed on the receiver,
    /// after `after`.
    FeedRead { from: u16, req: u64, client: u32, after: FeedPos, limit: u32 },
    /// Install one phase of a runtime config change (`Shard::install_config`).
    ConfigApply { from: u16, req: u64, update: Box<ConfigUpdate> },
    /// Answer to `ConfigApply`: installed.
    ConfigApplied { req: u64, version: u64 },
    /// Answer to `FeedRead` (Err: the feed could not be read; logged there).
    FeedPageRead { req: u64, page: Result<Box<FeedPage>, ()> },
    /// Send this shard's metrics (a scrape of `/metrics` on shard 0).
    MetricsGet { from: u16, req: u64 },
    /// Answer to `MetricsGet`. Boxed: a snapshot is a few KiB.
    Metrics { req: u64, snapshot: Box<crate::metrics::ShardSnapshot> },
}

/// One phase of a runtime config change, for one shard (its own copy).
#[derive(Debug)]
pub enum ConfigUpdate {
    /// Take the new config and clients; keep authenticating with the
    /// current keys until `Commit`.
    Prepare { version: u64, cfg: Box<crate::config::Config>, clients: Box<crate::clients::ClientTable> },
    /// Every shard prepared: authenticate with the new keys.
    Commit { version: u64 },
}

impl ConfigUpdate {
    /// The version this phase belongs to.
    pub fn version(&self) -> u64 {
        match self {
            ConfigUpdate::Prepare { version, .. } | ConfigUpdate::Commit { version } => *version,
        }
    }
}

/// One shard's page of a client's event feed.
#[derive(Debug)]
pub struct FeedPage {
    /// The events, in the shard's order.
    pub events: Vec<FeedEvent>,
    /// Where to resume on this shard.
    pub next: FeedPos,
}

/// What `PutUser` sets: the user and their contact fields.
#[derive(Debug)]
pub struct UserPut {
    pub user: String,
    pub phone: Option<String>,
    pub email: Option<String>,
}

/// One item of the dead-letter queue (`GET /v1/dead-letters`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The event id (`evt_<message id>_<status>`, also its `webhook-id`).
    pub id: String,
    /// What kind of work died: `webhook`.
    pub kind: &'static str,
    pub message_id: String,
    pub client: String,
    pub event_type: &'static str,
    pub attempts: u32,
    pub last_error: String,
    pub dead_at_ms: u64,
    /// Sort key: (shard, seq, status code).
    pub key: (u16, u64, u8),
}

/// A keyed request, as the client's home shard needs it.
#[derive(Debug, Clone)]
pub struct IdemRequest {
    pub from: u16,
    pub req: u64,
    pub client: u32,
    pub key: String,
    pub body_sha256: [u8; 32],
    /// The answer to remember (`IdemFinish` only).
    pub status: u16,
    pub response: Vec<u8>,
}

/// Why a request to another shard got no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MeshError {
    /// No room in the channel, or no answer, within
    /// `engine.mesh_reply_timeout_ms`. For an `Append` the outcome is
    /// unknown: the home shard may still make it durable.
    Timeout,
    /// The peer is gone (shutting down).
    Closed,
}

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

    /// Forgets a request that failed or timed out (a late answer is dropped).
    pub fn cancel(&self, req: u64) {
        self.waiting.borrow_mut().remove(&req);
    }

    /// Hands an answer to its waiter, if it still waits.
    pub fn complete(&self, req: u64, msg: MeshMsg) {
        if let Some(tx) = self.waiting.borrow_mut().remove(&req) {
            let _ = tx.send(msg);
        }
    }

    /// Requests awaiting an answer.
    pub fn len(&self) -> usize {
        self.waiting.borrow().len()
    }

    /// True when no request awaits an answer.
    pub fn is_empty(&self) -> bool {
        self.waiting.borrow().is_empty()
    }
}
// Every slot of every mesh channel holds one `MeshMsg`: large payloads are
// boxed (`Adopt`, `PutUser`, `Found`) so the channels stay small.
const _: () = assert!(std::mem::size_of::<MeshMsg>() <= 64);
