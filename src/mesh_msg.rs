//! The typed messages shards exchange over the mesh (`src/mesh.rs`), and
//! the table of requests a shard awaits answers for.
//!
//! A shard that accepts a request for a user homed elsewhere sends
//! [`MeshMsg::Append`] to the home shard and parks the request on a
//! [`PendingReplies`] slot; the home shard appends, waits for the group
//! commit and answers [`MeshMsg::Appended`]. Every such wait is bounded
//! (`engine.mesh_reply_timeout_ms`, [`MeshError::Timeout`]).

use std::cell::{Cell, RefCell};

use esh3ar_shards::journal::JournalError;
use esh3ar_shards::limiter::Decision;
use esh3ar_shards::{Priority, Status};
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
