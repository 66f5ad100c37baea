//! The in-memory index of one shard: status by sequence number, the pending
//! queue of every user, and how many unsettled messages each segment holds.
//!
//! The index is a pure function of the journal: recovery rebuilds it by
//! [`MessageIndex::apply`]ing every record in order, and the live path
//! applies each record as it appends it, so the two can never disagree.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::rc::Rc;

use hashbrown::{HashMap, HashSet};

use crate::record::{encoded_len, Record};
use crate::{Priority, Status};

/// What the shard knows about one message (its body stays in the journal).
#[derive(Debug, Clone)]
pub struct MessageMeta {
    /// Sending client id.
    pub client: Rc<str>,
    /// Recipient user id.
    pub to: Rc<str>,
    /// Delivery priority.
    pub priority: Priority,
    /// Current status.
    pub status: Status,
    /// How many times it was written to a connection.
    pub attempts: u32,
    /// Unix ms of acceptance.
    pub accepted_at_ms: u64,
    /// Unix ms of the latest delivery (0: never).
    pub delivered_at_ms: u64,
    /// Unix ms of the acknowledgement (0: not acked).
    pub acked_at_ms: u64,
    /// Unix ms at which it expires (0: never).
    pub expires_at_ms: u64,
    /// Segment holding the `Accepted` record.
    pub segment: u64,
    /// Offset of the `Accepted` record in that segment.
    pub offset: u64,
    /// Encoded length of the `Accepted` record.
    pub record_bytes: u32,
    /// Journal commit generation of the record (0: recovered, so durable).
    pub generation: u64,
}

#[derive(Debug, Clone, Copy, Default)]
struct SegmentLive {
    /// Messages accepted in this segment and not yet settled.
    unsettled: u64,
    /// Sequence numbers accepted in this segment: `first..=last`.
    first_seq: u64,
    last_seq: u64,
    any: bool,
}

/// Pending queues of one user, indexed by `Priority as usize`.
type PendingQueues = [VecDeque<u64>; 3];

/// Index of one shard's messages.
#[derive(Debug, Default)]
pub struct MessageIndex {
    messages: HashMap<u64, MessageMeta>,
    /// Per user, one queue per priority (high, normal, low), each in
    /// acceptance order.
    pending: HashMap<Rc<str>, PendingQueues>,
    interned: HashSet<Rc<str>>,
    segments: BTreeMap<u64, SegmentLive>,
    /// (expires_at_ms, seq) of every unsettled message with a TTL.
    expiries: BTreeSet<(u64, u64)>,
    max_seq: Option<u64>,
}

impl MessageIndex {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies one journal record found at `offset` of `segment`.
    pub fn apply(&mut self, segment: u64, offset: u64, record: &Record<'_>) {
        match record {
            Record::SegmentHeader(h) => {
                self.segments.entry(h.segment).or_default();
            }
            Record::Accepted(a) => {
                let client = self.intern(a.client);
                let to = self.intern(a.to);
                self.max_seq = Some(self.max_seq.map_or(a.seq, |m| m.max(a.seq)));
                let live = self.segments.entry(segment).or_default();
                if !live.any {
                    live.first_seq = a.seq;
                    live.any = true;
                }
                live.last_seq = live.last_seq.max(a.seq);
                live.unsettled += 1;
                self.pending.entry(to.clone()).or_default()[a.priority as usize].push_back(a.seq);
                let meta = MessageMeta {
                    client,
                    to,
                    priority: a.priority,
                    status: Status::Accepted,
                    attempts: 0,
                    accepted_at_ms: a.accepted_at_ms,
                    delivered_at_ms: 0,
                    acked_at_ms: 0,
                    expires_at_ms: a.expires_at_ms,
                    segment,
                    offset,
                    record_bytes: encoded_len(record) as u32,
                    generation: 0,
                };
                if a.expires_at_ms > 0 {
                    self.expiries.insert((a.expires_at_ms, a.seq));
                }
                let previous = self.messages.insert(a.seq, meta);
                assert!(previous.is_none(), "sequence {} accepted twice", a.seq);
            }
            Record::Status(s) => self.apply_status(s.seq, s.status, s.at_ms),
        }
    }

    fn apply_status(&mut self, seq: u64, status: Status, at_ms: u64) {
        let Some(meta) = self.messages.get_mut(&seq) else {
            // The message's segment was already deleted: nothing to do.
            return;
        };
        if meta.status.is_settled() {
            return;
        }
        match status {
            Status::Accepted => {}
            Status::Delivered => {
                meta.status = Status::Delivered;
                meta.attempts += 1;
                meta.delivered_at_ms = at_ms;
            }
            Status::Acked | Status::Expired | Status::Failed => {
                meta.status = status;
                if status == Status::Acked {
                    meta.acked_at_ms = at_ms;
                }
                let (to, segment, expires, priority) =
                    (meta.to.clone(), meta.segment, meta.expires_at_ms, meta.priority);
                self.expiries.remove(&(expires, seq));
                self.settle(seq, &to, segment, priority);
            }
        }
    }

    fn settle(&mut self, seq: u64, to: &Rc<str>, segment: u64, priority: Priority) {
        if let Some(queues) = self.pending.get_mut(to) {
            let queue = &mut queues[priority as usize];
            if queue.front() == Some(&seq) {
                queue.pop_front();
            } else if let Ok(i) = queue.binary_search(&seq) {
                queue.remove(i);
            }
            if queues.iter().all(VecDeque::is_empty) {
                self.pending.remove(to);
            }
        }
        if let Some(live) = self.segments.get_mut(&segment) {
            assert!(live.unsettled > 0, "segment {segment} settled below zero");
            live.unsettled -= 1;
        }
    }

    fn intern(&mut self, s: &str) -> Rc<str> {
        if let Some(existing) = self.interned.get(s) {
            return existing.clone();
        }
        let rc: Rc<str> = Rc::from(s);
        self.interned.insert(rc.clone());
        rc
    }

    /// Records the commit generation of a message appended live, so
    /// delivery can wait until it is durable.
    pub fn set_generation(&mut self, seq: u64, generation: u64) {
        if let Some(m) = self.messages.get_mut(&seq) {
            m.generation = generation;
        }
    }

    /// Unsettled messages whose TTL passed at `now_ms`, oldest first, at most `max`.
    pub fn expired(&self, now_ms: u64, max: usize) -> Vec<u64> {
        self.expiries.iter().take_while(|(at, _)| *at <= now_ms).take(max).map(|&(_, seq)| seq).collect()
    }

    /// Unsettled messages of `user` at `priority` after sequence `after`
    /// (all if None), in acceptance order; the number of unsettled ones at
    /// or before `after` comes first (those in flight on a connection).
    pub fn pending_after(
        &self,
        user: &str,
        priority: Priority,
        after: Option<u64>,
    ) -> (usize, impl Iterator<Item = u64> + '_) {
        let queue = self.pending.get(user).map(|q| &q[priority as usize]);
        let skip = match (queue, after) {
            (Some(q), Some(a)) => q.partition_point(|&s| s <= a),
            _ => 0,
        };
        (skip, queue.into_iter().flat_map(move |q| q.iter().skip(skip).copied()))
    }

    /// The message with this sequence number, if the shard still holds it.
    pub fn get(&self, seq: u64) -> Option<&MessageMeta> {
        self.messages.get(&seq)
    }

    /// Unsettled messages of `user` in delivery order: high, then normal,
    /// then low, each in acceptance order.
    pub fn pending_for(&self, user: &str) -> impl Iterator<Item = u64> + '_ {
        self.pending.get(user).into_iter().flat_map(|q| q.iter().flat_map(|p| p.iter().copied()))
    }

    /// Number of messages indexed.
    pub fn len(&self) -> usize {
        self.messages.len()
    }

    /// True when no message is indexed.
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    /// Number of unsettled messages.
    pub fn unsettled(&self) -> u64 {
        self.segments.values().map(|s| s.unsettled).sum()
    }

    /// The highest sequence number seen.
    pub fn max_seq(&self) -> Option<u64> {
        self.max_seq
    }

    /// Oldest segments (in order, never `active`) whose messages are all
    /// settled. Only a prefix qualifies: a status record in a later segment
    /// may refer to a message in an earlier one, so deleting out of order
    /// could resurrect a settled message on recovery.
    pub fn deletable_segments(&self, active: u64) -> Vec<u64> {
        self.segments.iter().take_while(|(&no, live)| no < active && live.unsettled == 0).map(|(&no, _)| no).collect()
    }

    /// Drops a deleted segment and the messages accepted in it.
    pub fn forget_segment(&mut self, segment: u64) {
        let Some(live) = self.segments.remove(&segment) else {
            return;
        };
        assert_eq!(live.unsettled, 0, "forgetting segment {segment} with unsettled messages");
        if live.any {
            for seq in live.first_seq..=live.last_seq {
                self.messages.remove(&seq);
            }
        }
        self.interned.retain(|s| Rc::strong_count(s) > 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{Accepted, SegmentHeader, StatusChange};

    fn accept(ix: &mut MessageIndex, seg: u64, seq: u64, to: &str) {
        ix.apply(
            seg,
            seq * 100,
            &Record::Accepted(Accepted {
                seq,
                client: "c",
                to,
                priority: Priority::Normal,
                expires_at_ms: 0,
                accepted_at_ms: seq,
                body: b"x",
            }),
        );
    }

    fn status(ix: &mut MessageIndex, seq: u64, status: Status) {
        ix.apply(9, 0, &Record::Status(StatusChange { seq, status, at_ms: 1000 + seq }));
    }

    #[test]
    fn pending_in_order_and_settles() {
        let mut ix = MessageIndex::new();
        ix.apply(1, 0, &Record::SegmentHeader(SegmentHeader { shard: 0, segment: 1, next_seq: 0 }));
        for seq in 0..5 {
            accept(&mut ix, 1, seq, if seq % 2 == 0 { "a" } else { "b" });
        }
        assert_eq!(ix.pending_for("a").collect::<Vec<_>>(), vec![0, 2, 4]);
        status(&mut ix, 2, Status::Delivered);
        status(&mut ix, 2, Status::Delivered);
        assert_eq!(ix.get(2).unwrap().attempts, 2);
        status(&mut ix, 2, Status::Acked);
        assert_eq!(ix.pending_for("a").collect::<Vec<_>>(), vec![0, 4]);
        assert_eq!(ix.get(2).unwrap().status, Status::Acked);
        // A late delivery record never un-settles.
        status(&mut ix, 2, Status::Delivered);
        assert_eq!(ix.get(2).unwrap().status, Status::Acked);
        assert_eq!(ix.unsettled(), 4);
    }

    #[test]
    fn pending_is_delivered_by_priority_then_acceptance_order() {
        let mut ix = MessageIndex::new();
        for (seq, p) in [(0, Priority::Low), (1, Priority::High), (2, Priority::Normal), (3, Priority::High)] {
            ix.apply(
                1,
                seq * 10,
                &Record::Accepted(Accepted {
                    seq,
                    client: "c",
                    to: "u",
                    priority: p,
                    expires_at_ms: 0,
                    accepted_at_ms: 0,
                    body: b"x",
                }),
            );
        }
        assert_eq!(ix.pending_for("u").collect::<Vec<_>>(), vec![1, 3, 2, 0]);
        let (sent, rest) = ix.pending_after("u", Priority::High, Some(1));
        assert_eq!((sent, rest.collect::<Vec<_>>()), (1, vec![3]));
        status(&mut ix, 3, Status::Acked);
        assert_eq!(ix.pending_for("u").collect::<Vec<_>>(), vec![1, 2, 0]);
    }

    #[test]
    fn only_a_settled_prefix_is_deletable() {
        let mut ix = MessageIndex::new();
        accept(&mut ix, 1, 0, "a");
        accept(&mut ix, 2, 1, "a");
        accept(&mut ix, 3, 2, "a");
        status(&mut ix, 1, Status::Acked);
        assert!(ix.deletable_segments(3).is_empty(), "segment 1 still unsettled");
        status(&mut ix, 0, Status::Expired);
        assert_eq!(ix.deletable_segments(3), vec![1, 2]);
        status(&mut ix, 2, Status::Acked);
        assert_eq!(ix.deletable_segments(3), vec![1, 2], "the active segment is never deleted");
        ix.forget_segment(1);
        assert!(ix.get(0).is_none());
        assert!(ix.get(1).is_some());
    }
}
