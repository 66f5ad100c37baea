//! Delivery state of one shard: which users are connected, the bodies of
//! recent messages, and the status changes delivery makes (delivered,
//! acked, expired), each journaled.
//!
//! A live session never receives message contents pushed at it. It is only
//! *notified*; it then pulls from the index, in acceptance order, the
//! durable messages after the last one it sent. Backlog and live messages
//! therefore take one path and cannot overtake each other.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use esh3ar_shards::id::TrackingId;
use esh3ar_shards::limits::{BODY_BYTES_MAX, CLIENT_ID_BYTES_MAX};
use esh3ar_shards::record::{Record, StatusChange};
use esh3ar_shards::{Priority, Reason, Status};
use hashbrown::HashMap;

use crate::clock::now_ms;
use crate::http::json_string;
use crate::shard::Shard;

/// Wakes one session when a message for its user became durable.
#[derive(Default)]
pub struct SessionSignal {
    notified: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

impl SessionSignal {
    fn notify(&self) {
        self.notified.set(true);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    /// Resolves once notified since the last wait.
    pub fn wait(&self) -> WaitSignal<'_> {
        WaitSignal { signal: self }
    }
}

/// Future of [`SessionSignal::wait`].
pub struct WaitSignal<'a> {
    signal: &'a SessionSignal,
}

impl Future for WaitSignal<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.signal.notified.replace(false) {
            Poll::Ready(())
        } else {
            *self.signal.waker.borrow_mut() = Some(cx.waker().clone());
            Poll::Pending
        }
    }
}

/// Live sessions of the users homed on this shard.
#[derive(Default)]
pub struct Sessions {
    by_user: RefCell<HashMap<Rc<str>, Vec<Rc<SessionSignal>>>>,
    count: Cell<usize>,
}

impl Sessions {
    /// Registers a connection of `user`.
    pub fn register(&self, user: &Rc<str>) -> Rc<SessionSignal> {
        let signal = Rc::new(SessionSignal::default());
        self.by_user.borrow_mut().entry(user.clone()).or_default().push(signal.clone());
        self.count.set(self.count.get() + 1);
        signal
    }

    /// Forgets a connection.
    pub fn unregister(&self, user: &str, signal: &Rc<SessionSignal>) {
        let mut by_user = self.by_user.borrow_mut();
        if let Some(list) = by_user.get_mut(user) {
            list.retain(|s| !Rc::ptr_eq(s, signal));
            if list.is_empty() {
                by_user.remove(user);
            }
        }
        self.count.set(self.count.get() - 1);
    }

    /// True if `user` has a session open here.
    pub fn has(&self, user: &str) -> bool {
        self.by_user.borrow().contains_key(user)
    }

    /// Wakes every connection of `user`.
    pub fn notify(&self, user: &str) {
        if let Some(list) = self.by_user.borrow().get(user) {
            for s in list {
                s.notify();
            }
        }
    }

    /// Open sessions.
    pub fn len(&self) -> usize {
        self.count.get()
    }

    /// True when no session is open.
    pub fn is_empty(&self) -> bool {
        self.count.get() == 0
    }
}

/// Bodies of recent messages, bounded in bytes; oldest evicted first.
pub struct BodyCache {
    map: HashMap<u64, Rc<[u8]>>,
    order: VecDeque<u64>,
    bytes: usize,
    bytes_max: usize,
}

impl BodyCache {
    pub fn new(bytes_max: usize) -> Self {
        Self { map: HashMap::new(), order: VecDeque::new(), bytes: 0, bytes_max }
    }

    pub fn insert(&mut self, seq: u64, body: &[u8]) {
        if body.len() > self.bytes_max {
            return;
        }
        self.bytes += body.len();
        self.map.insert(seq, Rc::from(body));
        self.order.push_back(seq);
        while self.bytes > self.bytes_max {
            let Some(old) = self.order.pop_front() else { break };
            if let Some(b) = self.map.remove(&old) {
                self.bytes -= b.len();
            }
        }
        // Drop stale order entries (acked bodies) so `order` stays bounded.
        if self.order.len() > 2 * self.map.len() + 1024 {
            let map = &self.map;
            self.order.retain(|s| map.contains_key(s));
        }
    }

    pub fn get(&self, seq: u64) -> Option<Rc<[u8]>> {
        self.map.get(&seq).cloned()
    }

    pub fn remove(&mut self, seq: u64) {
        if let Some(b) = self.map.remove(&seq) {
            self.bytes -= b.len();
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// Where a connection is in each of its user's priority queues: the last
/// sequence number sent, per priority.
#[derive(Debug, Default, Clone, Copy)]
pub struct Cursor {
    pub after: [Option<u64>; 3],
}

/// How many bodies a session reads ahead in one batch (bounds its memory).
pub const DELIVERY_BATCH_MAX: usize = 64;

/// Bytes of a delivery frame besides the escaped body and sender: the
/// field names, the 16-character id, the priority and a 20-digit time
/// (140 bytes today, rounded up).
pub const DELIVERY_FRAME_FIXED_BYTES: usize = 192;

/// The largest delivery frame (JSON text) of a message whose request body
/// was at most `body_bytes_max`. JSON escaping turns one byte into at most
/// six (`\u001f`), for the body and for the sender's id. The WebSocket
/// write buffer is sized from this (`mobile::session`): a frame it cannot
/// hold could never be delivered and would be retried forever.
pub const fn delivery_frame_bytes_max(body_bytes_max: usize) -> usize {
    6 * body_bytes_max + 6 * CLIENT_ID_BYTES_MAX + DELIVERY_FRAME_FIXED_BYTES
}

const _: () = assert!(delivery_frame_bytes_max(BODY_BYTES_MAX) < u32::MAX as usize);

/// The frame a phone receives for one message.
pub fn encode_frame(id: TrackingId, client: &str, body: &str, priority: Priority, accepted_at_ms: u64) -> Vec<u8> {
    let mut f = Vec::with_capacity(body.len() + client.len() + DELIVERY_FRAME_FIXED_BYTES);
    encode_frame_into(&mut f, id, client, body, priority, accepted_at_ms);
    f
}

/// [`encode_frame`] appended to `f`.
pub fn encode_frame_into(
    f: &mut Vec<u8>,
    id: TrackingId,
    client: &str,
    body: &str,
    priority: Priority,
    accepted_at_ms: u64,
) {
    f.extend_from_slice(b"{\"type\":\"message\",\"id\":\"");
    f.extend_from_slice(&id.encode());
    f.extend_from_slice(b"\",\"from\":");
    json_string(f, client);
    f.extend_from_slice(b",\"body\":");
    json_string(f, body);
    f.extend_from_slice(b",\"priority\":\"");
    f.extend_from_slice(priority.as_str().as_bytes());
    f.extend_from_slice(b"\",\"accepted_at\":");
    f.extend_from_slice(itoa::Buffer::new().format(accepted_at_ms).as_bytes());
    f.push(b'}');
}

/// The text message that delivers one message: its frame inside
/// `envelope` (before, after; the hub's `ReceiveMessage`, or empty), in one
/// allocation of the size it needs (unless escaping grows it).
pub fn delivery_text(
    envelope: (&str, &str),
    id: TrackingId,
    client: &str,
    body: &str,
    priority: Priority,
    accepted_at_ms: u64,
) -> String {
    let (head, tail) = envelope;
    let mut f = Vec::with_capacity(head.len() + body.len() + client.len() + DELIVERY_FRAME_FIXED_BYTES + tail.len());
    f.extend_from_slice(head.as_bytes());
    encode_frame_into(&mut f, id, client, body, priority, accepted_at_ms);
    f.extend_from_slice(tail.as_bytes());
    // Only `&str`s and ASCII went in, and `json_string` escapes whole characters.
    String::from_utf8(f).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

impl Shard {
    /// The next messages to write to a connection of `user`: durable,
    /// unexpired, after the connection's cursor; `high` first, then
    /// `normal`, then `low` (a high message overtakes pending lower ones;
    /// within a priority, acceptance order). At most a batch, and never more
    /// than `inflight_max` unacked on the connection.
    ///
    /// While older cold messages of the user are still to come back
    /// (docs/ARCHITECTURE.md, "Offline backlog"), only those up to the
    /// `barrier` go.
    pub fn deliverable(
        &self,
        user: &str,
        cursor: &Cursor,
        inflight_max: usize,
        barrier: crate::backlog::Barrier,
    ) -> Vec<(Priority, u64)> {
        use crate::backlog::Barrier;
        let upto = match barrier {
            Barrier::All => u64::MAX,
            Barrier::UpTo(last) => last,
            Barrier::Wait => return Vec::new(),
        };
        let index = self.index().borrow();
        let durable = self.journal().durable_generation();
        let now = now_ms();
        // An array, not a Vec: this runs at least once per delivered message.
        let queues = [Priority::High, Priority::Normal, Priority::Low]
            .map(|p| (p, index.pending_after(user, p, cursor.after[p as usize])));
        let inflight: usize = queues.iter().map(|(_, (sent, _))| sent).sum();
        let room = inflight_max.saturating_sub(inflight).min(DELIVERY_BATCH_MAX);
        let mut out = Vec::new();
        for (p, (_, rest)) in queues {
            for seq in rest {
                if out.len() >= room {
                    return out;
                }
                if seq > upto {
                    break; // after the cold messages still to come back
                }
                let Some(m) = index.get(seq) else { continue };
                if m.generation > durable {
                    break; // not on disk yet; later ones of this priority are not either
                }
                if m.expires_at_ms == 0 || m.expires_at_ms > now {
                    out.push((p, seq));
                }
            }
        }
        out
    }

    /// The text message that delivers message `seq` ([`delivery_text`]),
    /// or None if it is gone or settled.
    pub async fn message_text(&self, seq: u64, envelope: (&str, &str)) -> Result<Option<String>, String> {
        let (client, priority, accepted_at, segment, offset, bytes) = {
            let index = self.index().borrow();
            let Some(m) = index.get(seq) else { return Ok(None) };
            if m.status.is_settled() {
                return Ok(None);
            }
            (m.client.clone(), m.priority, m.accepted_at_ms, m.segment, m.offset, m.record_bytes)
        };
        let cached = self.bodies().borrow().get(seq);
        let body: Rc<[u8]> = match cached {
            Some(b) => b,
            None => Rc::from(self.journal().read_body(segment, offset, bytes).await?),
        };
        let body = std::str::from_utf8(&body).map_err(|_| format!("message {seq} body is not UTF-8"))?;
        Ok(Some(delivery_text(envelope, self.tracking_id(seq), &client, body, priority, accepted_at)))
    }

    /// Journals that `seqs` were written to a connection. Not awaited: a
    /// lost `Delivered` record only undercounts attempts.
    pub fn record_delivered(&self, seqs: &[u64]) {
        self.record_status(seqs, Status::Delivered);
    }

    /// Journals a status change of each message; a change that owes the
    /// sender an event is marked so (the transactional outbox) and wakes the
    /// receipts task.
    fn record_status(&self, seqs: &[u64], status: Status) {
        let at_ms = now_ms();
        let mut owed = false;
        {
            let mut index = self.index().borrow_mut();
            for &seq in seqs {
                let notify = crate::receipts::owes_event(self, &index, seq, status);
                let record = Record::Status(StatusChange { seq, status, at_ms, notify, reason: Reason::None });
                let timing = crate::metrics::StatusTiming::of(index.get(seq));
                // A delivery attempt or an ack lost in a crash only means
                // the message is delivered again: they ride with the next
                // commit (at most `LAZY_COMMIT_DELAY` later) instead of
                // starting one each. An expiry is journaled at once.
                let appended = match status {
                    Status::Delivered | Status::Acked => self.journal().append_lazy(&record, &mut index),
                    _ => self.journal().append(&record, &mut index),
                };
                if appended.is_err() {
                    break; // journal failed or closing: the message stays pending
                }
                self.metrics().status_change(status, timing, at_ms);
                owed |= notify;
            }
        }
        if owed {
            self.events_ready().notify_all();
        }
    }

    /// Acks from `user`'s connection. Ids of other users or shards, and
    /// already settled messages, are ignored (acks are idempotent).
    pub fn record_acks<'a>(&self, user: &str, ids: impl Iterator<Item = &'a str>) {
        let mut acked = Vec::new();
        {
            let index = self.index().borrow();
            for id in ids {
                let Some(t) = TrackingId::decode(id.as_bytes()) else { continue };
                if t.shard as usize != self.id() {
                    continue;
                }
                match index.get(t.seq) {
                    Some(m) if &*m.to == user && !m.status.is_settled() => acked.push(t.seq),
                    _ => {}
                }
            }
        }
        self.record_status(&acked, Status::Acked);
        let mut bodies = self.bodies().borrow_mut();
        for seq in acked {
            bodies.remove(seq);
        }
    }

    /// Once a second: expire messages whose TTL passed, delete journal
    /// segments whose messages are all settled.
    pub async fn run_maintenance(self: Rc<Self>) {
        while !self.shutdown().is_set() {
            glommio::timer::sleep(Duration::from_secs(1)).await;
            self.check_disk_room();
            let window_ms = self.cfg().business.idempotency_window_seconds * 1000;
            self.index().borrow_mut().expire_idempotency(now_ms().saturating_sub(window_ms));
            let expired = self.index().borrow().expired(now_ms(), 10_000);
            if !expired.is_empty() {
                self.record_status(&expired, Status::Expired);
                let mut bodies = self.bodies().borrow_mut();
                for &seq in &expired {
                    bodies.remove(seq);
                }
                tracing::debug!(shard = self.id(), count = expired.len(), "expired messages");
            }
            self.expire_cold().await;
            if self.index().borrow_mut().shrink() {
                self.pressure().wake();
            }
            if !self.backlog().is_compacting() {
                let shard = self.clone();
                glommio::spawn_local(async move { shard.compact_cold_when_sparse().await }).detach();
            }
            // Directory entries that alone keep old segments are journaled
            // again first; the old copies may go only once the new are durable.
            if self.carry_directory_forward().is_err() || !self.directory_durable().await {
                continue; // journal failed or closing, or an entry moved meanwhile: next pass
            }
            // Only once the records that settled them are durable.
            // Removals from the cold store are durable before any segment
            // that restored those messages can go ("Offline backlog").
            if !self.persist_cold().await {
                continue;
            }
            let (candidates, settled_by) = self.journal().settled_segments(&self.index().borrow());
            if candidates.is_empty() || self.journal().wait_durable(settled_by).await.is_err() {
                continue;
            }
            let deleted = self.journal().delete_settled_segments(&mut self.index().borrow_mut(), &candidates);
            match deleted {
                // Index entries left with their segments: room for waiting connections.
                Ok(n) if n > 0 => self.pressure().wake(),
                Ok(_) => {}
                Err(e) => tracing::warn!(shard = self.id(), error = %e, "could not delete settled segments"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_cache_stays_within_its_bound() {
        let mut c = BodyCache::new(1000);
        for seq in 0..100 {
            c.insert(seq, &[7u8; 30]);
        }
        assert!(c.bytes() <= 1000);
        assert!(c.get(99).is_some());
        assert!(c.get(0).is_none(), "oldest evicted first");
        c.remove(99);
        assert!(c.get(99).is_none());
        c.insert(1000, &[0u8; 5000]); // larger than the cache: not kept
        assert!(c.get(1000).is_none());
    }

    #[test]
    fn worst_case_frame_fits_its_bound() {
        // Every body byte escaped to six, the longest sender, the longest
        // priority name and time: the bound must still hold.
        let body = "\u{1}".repeat(BODY_BYTES_MAX);
        let client = "\u{1f}".repeat(CLIENT_ID_BYTES_MAX);
        let id = TrackingId { shard: u16::MAX, seq: u64::MAX };
        let f = encode_frame(id, &client, &body, Priority::Normal, u64::MAX);
        assert!(f.len() <= delivery_frame_bytes_max(BODY_BYTES_MAX), "{} bytes", f.len());
        assert!(f.len() > 6 * BODY_BYTES_MAX, "the escaping this bound is about did happen");
        let v: serde_json::Value = serde_json::from_slice(&f).unwrap();
        assert_eq!(v["body"].as_str().unwrap().len(), BODY_BYTES_MAX);
    }
}
