//! The in-memory index of one shard: status by sequence number, the pending
//! queue of every user, and how many unsettled messages each segment holds.
//!
//! The index is a pure function of the journal: recovery rebuilds it by
//! [`MessageIndex::apply`]ing every record in order, and the live path
//! applies each record as it appends it, so the two can never disagree.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::rc::Rc;

use hashbrown::hash_map::RawEntryMut;
use hashbrown::{HashMap, HashSet};

use crate::directory::{entry_of, UserEntry};
use crate::idempotency::IdempotencyKeys;
use crate::record::{
    encoded_len, EventChange, EventOutcome, FallbackChange, FallbackStep, Record, StatusChange, UserRecord,
};
use crate::{Channel, ChannelList, EventSet, Priority, Reason, Status};

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
    /// Why it was rejected or failed.
    pub reason: Reason,
    /// Events owed to the sender and not yet delivered (bit `1 << status`).
    pub events_owed: EventSet,
    /// Events given up on, waiting in the dead-letter queue.
    pub events_dead: EventSet,
    /// Where it was delivered: the app, or a fallback channel (then it is
    /// withdrawn from the app queue and settled for the journal). The
    /// fallback provider's id for it, where the provider gave one, is kept
    /// apart: [`MessageIndex::provider_message_id`].
    pub channel: Channel,
    /// A fallback is planned, under way or dead-lettered.
    pub fallback_open: bool,
}

impl MessageMeta {
    /// A message keeps its journal segments (and everything after them)
    /// while it is unsettled, its fallback is open, or the sender is owed
    /// one of its events. Delivered through a fallback channel counts as
    /// settled (it is out of the app queue; a later app ack is still
    /// recorded while the segment is there).
    fn pinned(&self) -> bool {
        let settled = self.status.is_settled() || self.channel != Channel::App;
        !settled || self.fallback_open || self.events_owed != 0 || self.events_dead != 0
    }
}

/// Where a message's fallback delivery stands (the latest of its
/// [`FallbackChange`] records).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FallbackState {
    /// Unix ms the next hand-over is due (planned, channel failed, replayed).
    pub due_at_ms: u64,
    /// The channels, in order.
    pub channels: ChannelList,
    /// Position in `channels` of the channel being tried.
    pub current: u8,
    /// Attempts made on that channel.
    pub attempts: u32,
    /// Not before this (unix ms) for the next attempt (0: now).
    pub retry_at_ms: u64,
    /// Handed to a provider and not yet answered finally (a restart hands
    /// it over again: the answer may have been lost).
    pub sending: bool,
    /// The last failure.
    pub last_error: Option<Rc<str>>,
    /// Unix ms it was dead-lettered (0: not dead).
    pub dead_at_ms: u64,
}

/// An event owed to a sender: the transactional outbox entry of one status
/// change, from its journaled birth until delivered or dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwedEvent {
    /// Unix ms of the transition that owes it.
    pub since_ms: u64,
    /// Attempts made (journaled as they fail).
    pub attempts: u32,
    /// The last failure, if any.
    pub last_error: Option<Rc<str>>,
    /// Unix ms it was dead-lettered (0: not dead).
    pub dead_at_ms: u64,
}

#[derive(Debug, Clone, Default)]
struct SegmentLive {
    /// Messages accepted in this segment and still pinned (unsettled, or
    /// with an event owed or dead-lettered).
    unsettled: u64,
    /// Sequence numbers accepted in this segment: `first..=last`.
    first_seq: u64,
    last_seq: u64,
    any: bool,
    /// Directory entries whose latest record lies in this segment.
    users: u64,
    /// Messages brought back from the cold store into this segment
    /// ([`Record::Restored`]): old sequence numbers, outside `first..=last`.
    restored: Vec<u64>,
}

/// Pending queues of one user, indexed by `Priority as usize`.
type PendingQueues = [VecDeque<u64>; 3];

/// Index of one shard's messages.
#[derive(Debug, Default)]
pub struct MessageIndex {
    messages: SeqTable,
    /// Per user, one queue per priority (high, normal, low), each in
    /// acceptance order.
    pending: HashMap<Rc<str>, PendingQueues>,
    interned: HashSet<Rc<str>>,
    /// The sender of the latest accepted message, interned: a shard hears
    /// from few clients, mostly in runs, and this spares a hash lookup per
    /// message (in replay, a million of them).
    last_client: Option<Rc<str>>,
    segments: BTreeMap<u64, SegmentLive>,
    /// (expires_at_ms, seq) of every unsettled message with a TTL.
    expiries: BTreeSet<(u64, u64)>,
    /// Owed and dead-lettered events by (message seq, status code).
    outbox: BTreeMap<(u64, u8), OwedEvent>,
    /// Events that became owed since the last [`MessageIndex::take_fresh_events`]
    /// (born, replayed, or recovered): the sender's queue of work.
    fresh: Vec<(u64, Status)>,
    max_seq: Option<u64>,
    /// The user directory: users homed here and the senders they blocked.
    users: HashMap<Rc<str>, UserEntry>,
    /// Idempotency keys of the clients homed here.
    idempotency: IdempotencyKeys,
    /// Fallback deliveries planned, under way or dead-lettered, by seq.
    fallbacks: BTreeMap<u64, FallbackState>,
    /// The fallback provider's id for a message it delivered, where the
    /// provider gave one, by seq. Few messages have one, so it is kept
    /// here rather than in every [`MessageMeta`] (16 bytes of each slot of
    /// the message table, written for every message in replay). An entry
    /// lives exactly as long as its message's: removed wherever a message
    /// leaves `messages` ([`MessageIndex::forget_message`]).
    provider_ids: HashMap<u64, Rc<str>>,
    /// (due_at_ms, seq) of fallbacks waiting to be handed to a provider.
    fallback_due: BTreeSet<(u64, u64)>,
    /// Messages in the pending queues (`/metrics`), kept in step with `pending`.
    pending_messages: usize,
    /// Items in the dead-letter queue (`/metrics`): webhook events and fallback deliveries.
    dead_events: usize,
    /// Restored messages applied since the last [`MessageIndex::take_restored`].
    restored: Vec<u64>,
    /// Messages forgotten by [`Record::Spilled`].
    spilled: u64,
    /// Recovery is applying the journal ([`MessageIndex::begin_replay`]):
    /// a user's emptied pending queues stay in `pending` until
    /// [`MessageIndex::end_replay`] instead of being dropped and made
    /// again by the user's next message, and the TTL index is kept here
    /// and built once at the end.
    replay: Option<ReplayedExpiries>,
}

impl MessageIndex {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes room for `additional` more messages at once (recovery, which
    /// knows roughly how many are coming): the table is allocated once
    /// instead of doubling, and moving every entry, as it fills.
    pub fn reserve_messages(&mut self, additional: usize) {
        self.messages.reserve(additional);
    }

    /// Recovery expects about `total` messages in the table: chooses the
    /// number of its parts (64 to 127) whose power-of-two capacities hold
    /// them with the least memory, with 1/16 to spare for an estimate on
    /// the low side, and moves what the table holds so far into them (the
    /// room itself comes from [`MessageIndex::reserve_messages`]). Only
    /// while the table is small (a sample of the journal's start): later
    /// the move would cost more than it saves. Returns the parts chosen.
    pub fn plan_message_table(&mut self, total: usize) -> usize {
        let current = self.messages.parts.len();
        if self.messages.len() > PLAN_MOVE_MAX || total < SEQ_TABLE_PARTS * 1024 {
            return current;
        }
        let want = total + total / 16;
        let buckets = |parts: usize| want.div_ceil(parts).saturating_mul(8).div_ceil(7).next_power_of_two();
        let best = (SEQ_TABLE_PARTS..SEQ_TABLE_PARTS_END)
            .min_by_key(|&parts| parts.saturating_mul(buckets(parts)))
            .unwrap_or(SEQ_TABLE_PARTS);
        if best != current {
            self.messages.repartition(best);
        }
        best
    }

    /// Recovery is about to apply a whole journal. Until
    /// [`MessageIndex::end_replay`], a user whose pending queues empty
    /// keeps them: in a journal most users' queues empty and fill again
    /// many times (a message acked soon after it was accepted), and
    /// dropping them each time cost a free, then an intern, a hash-table
    /// insert and an allocation at the user's next message. The TTL index
    /// is kept as one slot per sequence number meanwhile (see
    /// [`ReplayedExpiries`]) and built once, in bulk, at the end. Only
    /// recovery calls this, on a new index; the live path always drops
    /// empty queues at once and keeps the TTL index as it goes.
    pub fn begin_replay(&mut self) {
        assert!(self.messages.is_empty() && self.expiries.is_empty(), "replay starts on a new index");
        self.replay = Some(ReplayedExpiries::default());
    }

    /// The journal is applied: drops the pending queues left empty during
    /// replay and builds the TTL index, so the index is the one the live
    /// path would have built.
    pub fn end_replay(&mut self) {
        let Some(replayed) = self.replay.take() else { return };
        self.pending.retain(|_, queues| queues.iter().any(|q| !q.is_empty()));
        // From sorted keys (mostly sorted already: expiry follows
        // acceptance) a B-tree is built bottom-up in one pass.
        let mut keys = replayed.into_keys();
        keys.extend(std::mem::take(&mut self.expiries));
        self.expiries = keys.into_iter().collect();
    }

    /// Indexes the TTL of message `seq` (see [`MessageIndex::begin_replay`]).
    /// A restored message keeps its old number, which may lie far before
    /// the journal's own: it never takes a slot (nor sets where they start).
    fn insert_expiry(&mut self, expires_at_ms: u64, seq: u64, restored: bool) {
        let displaced = match self.replay.as_mut().filter(|_| !restored) {
            Some(replayed) => match replayed.insert(expires_at_ms, seq) {
                Ok(displaced) => displaced,
                Err(()) => Some(expires_at_ms), // outside the slots' span
            },
            None => Some(expires_at_ms),
        };
        if let Some(expires_at_ms) = displaced {
            self.expiries.insert((expires_at_ms, seq));
        }
    }

    /// Removes the TTL index entry `(expires_at_ms, seq)`, if there is one.
    fn remove_expiry(&mut self, expires_at_ms: u64, seq: u64) {
        if let Some(replayed) = self.replay.as_mut() {
            replayed.remove(expires_at_ms, seq);
            if self.expiries.is_empty() {
                return;
            }
        }
        self.expiries.remove(&(expires_at_ms, seq));
    }

    /// Applies the records of one commit of `segment` (with their offsets)
    /// in order, as [`MessageIndex::apply`] one by one would. Recovery's
    /// way: each group of [`TOUCH_GROUP`] records first reads the state
    /// of its users (their pending queues), so those cache misses wait
    /// side by side instead of one after the other (recovery cannot
    /// prefetch: this crate has no unsafe code).
    pub fn apply_commit(&mut self, segment: u64, records: &[(usize, Record<'_>)]) {
        for group in records.chunks(TOUCH_GROUP) {
            std::hint::black_box(self.touch(group));
            for (offset, record) in group {
                self.apply(segment, *offset as u64, record);
            }
        }
    }

    /// Reads the pending queues `group` is about to change: first finds
    /// each one's slot from the table's control bytes alone (cached: one
    /// byte per user), then reads the slots, their last entries and their
    /// ids, none waiting on another. The value is meaningless, it only makes
    /// the loads happen. A slot whose tag matches another user's is read
    /// for nothing, which is harmless.
    fn touch(&self, group: &[(usize, Record<'_>)]) -> u64 {
        use std::hash::BuildHasher as _;
        let mut slots: [Option<(&Rc<str>, &VecDeque<u64>)>; TOUCH_GROUP] = Default::default();
        for (slot, (_, record)) in slots.iter_mut().zip(group) {
            let (to, priority) = match record {
                Record::Accepted(a) | Record::Restored(a) => (a.to, a.priority),
                Record::Status(s) => match self.messages.get(&s.seq) {
                    Some(m) => (&*m.to, m.priority),
                    None => continue,
                },
                _ => continue,
            };
            let hash = self.pending.hasher().hash_one(to);
            *slot = self.pending.raw_entry().from_hash(hash, |_| true).map(|(id, q)| (id, &q[priority as usize]));
        }
        slots.iter().flatten().fold(0, |acc, (id, queue)| {
            acc ^ queue.back().copied().unwrap_or(0) ^ u64::from(id.as_bytes().first().copied().unwrap_or(0))
        })
    }

    /// Applies one journal record found at `offset` of `segment`.
    pub fn apply(&mut self, segment: u64, offset: u64, record: &Record<'_>) {
        match record {
            Record::SegmentHeader(h) => {
                self.segments.entry(h.segment).or_default();
            }
            Record::Accepted(a) | Record::Restored(a) => {
                let restored = matches!(record, Record::Restored(_));
                if restored && self.messages.contains_key(&a.seq) {
                    // Already here (its spill never completed): one copy is enough.
                    self.restored.push(a.seq);
                    return;
                }
                let client = self.intern_client(a.client);
                let (to, queues) = pending_queues(&mut self.pending, &mut self.interned, a.to);
                let queue = &mut queues[a.priority as usize];
                if queue.back().is_none_or(|&last| last < a.seq) {
                    queue.push_back(a.seq);
                } else {
                    let at = queue.partition_point(|&s| s < a.seq);
                    queue.insert(at, a.seq);
                }
                self.pending_messages += 1;
                self.max_seq = Some(self.max_seq.map_or(a.seq, |m| m.max(a.seq)));
                let live = self.segments.entry(segment).or_default();
                if restored {
                    // An old sequence number in a new segment: listed apart, so
                    // the segment's accepted range stays its own.
                    live.restored.push(a.seq);
                    self.restored.push(a.seq);
                } else {
                    if !live.any {
                        live.first_seq = a.seq;
                        live.any = true;
                    }
                    live.last_seq = live.last_seq.max(a.seq);
                }
                live.unsettled += 1;
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
                    reason: Reason::None,
                    events_owed: 0,
                    events_dead: 0,
                    channel: Channel::App,
                    fallback_open: false,
                };
                if a.expires_at_ms > 0 {
                    self.insert_expiry(a.expires_at_ms, a.seq, restored);
                }
                let previous = self.messages.insert(a.seq, meta);
                assert!(previous.is_none(), "sequence {} accepted twice", a.seq);
            }
            Record::Status(s) => self.apply_status(s),
            Record::Event(e) => self.apply_event(e),
            Record::Idempotency(r) => {
                self.segments.entry(segment).or_default();
                self.idempotency.apply(segment, r);
            }
            Record::User(u) => self.apply_user(segment, u),
            Record::Fallback(f) => self.apply_fallback(f),
            Record::Spilled(list) => {
                for seq in list.iter() {
                    self.forget_spilled(seq);
                }
            }
        }
    }

    /// True if message `m` may move to the cold store: accepted, never
    /// delivered, nothing owed to its sender, no fallback open. Anything
    /// else stays here until it settles.
    pub fn spillable(m: &MessageMeta) -> bool {
        m.status == Status::Accepted
            && m.channel == Channel::App
            && !m.fallback_open
            && m.events_owed == 0
            && m.events_dead == 0
    }

    /// Removes message `seq` from the table, and what is kept apart for it.
    /// Every removal from `messages` goes through here.
    fn forget_message(&mut self, seq: u64) -> Option<MessageMeta> {
        let meta = self.messages.remove(&seq)?;
        if !self.provider_ids.is_empty() {
            self.provider_ids.remove(&seq);
        }
        Some(meta)
    }

    /// The fallback provider's id for message `seq`, where a provider
    /// delivered it and gave one.
    pub fn provider_message_id(&self, seq: u64) -> Option<&str> {
        self.provider_ids.get(&seq).map(|id| &**id)
    }

    /// Forgets a message whose durable copy is now in the cold store, if it
    /// is still [`MessageIndex::spillable`] (the same test the live path
    /// made before journaling the [`Record::Spilled`], so replay agrees).
    fn forget_spilled(&mut self, seq: u64) {
        let Some(meta) = self.messages.get(&seq) else { return };
        if !Self::spillable(meta) {
            return;
        }
        let (to, expires, priority, segment) = (meta.to.clone(), meta.expires_at_ms, meta.priority, meta.segment);
        self.remove_expiry(expires, seq);
        self.remove_pending(seq, &to, priority);
        self.forget_message(seq);
        if let Some(live) = self.segments.get_mut(&segment) {
            assert!(live.unsettled > 0, "segment {segment} settled below zero");
            live.unsettled -= 1;
        }
        self.spilled += 1;
    }

    /// Messages that may move to the cold store, in sequence order from
    /// `from`: spillable, durable by `durable_generation`, accepted at or
    /// before `until_ms`, and not for a user `keep` names (connected, or
    /// being restored). Stops after `max`, or at the first message accepted
    /// after `until_ms`. Returns them and where the next scan starts.
    pub fn spill_candidates(
        &self,
        from: u64,
        until_ms: u64,
        durable_generation: u64,
        max: usize,
        keep: impl Fn(&str) -> bool,
    ) -> (Vec<u64>, u64) {
        let mut out = Vec::new();
        let Some(last) = self.max_seq else { return (out, from) };
        let mut seq = from.max(self.oldest_accepted().unwrap_or(from));
        while seq <= last && out.len() < max {
            if let Some(m) = self.messages.get(&seq) {
                if m.accepted_at_ms > until_ms || m.generation > durable_generation {
                    break;
                }
                if Self::spillable(m) && !keep(&m.to) {
                    out.push(seq);
                }
            }
            seq += 1;
        }
        (out, seq)
    }

    /// The first sequence number accepted in the oldest segment still indexed.
    fn oldest_accepted(&self) -> Option<u64> {
        self.segments.values().find(|l| l.any).map(|l| l.first_seq)
    }

    /// Gives back the memory of tables that grew for a backlog since moved
    /// to disk (hash tables never shrink by themselves): forgets interned ids
    /// nothing refers to, and shrinks each table holding under a quarter of
    /// its capacity to twice what it holds. O(size); maintenance calls it
    /// once a second.
    pub fn shrink(&mut self) -> bool {
        fn shrink<K: std::hash::Hash + Eq, V, S: std::hash::BuildHasher>(m: &mut HashMap<K, V, S>) -> bool {
            let shrinks = m.capacity() > 4 * m.len() + 1024;
            if shrinks {
                m.shrink_to(2 * m.len());
            }
            shrinks
        }
        let mut a = false;
        for part in self.messages.parts.iter_mut() {
            a |= shrink(part);
        }
        let b = shrink(&mut self.pending) | shrink(&mut self.provider_ids);
        // Ids no message or entry refers to any more (spilled, forgotten).
        self.interned.retain(|s| Rc::strong_count(s) > 1);
        let c = self.interned.capacity() > 4 * self.interned.len() + 1024;
        if c {
            self.interned.shrink_to(2 * self.interned.len());
        }
        a || b || c
    }

    /// Sequence numbers of [`Record::Restored`] messages applied since the
    /// last call: their cold copies are to be removed.
    pub fn take_restored(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.restored)
    }

    /// Messages forgotten because they moved to the cold store, since this
    /// index was built.
    pub fn spilled(&self) -> u64 {
        self.spilled
    }

    /// Unsettled messages of `user` held in memory with sequence numbers up to `max_seq`.
    pub fn pending_count_upto(&self, user: &str, max_seq: u64) -> usize {
        self.pending.get(user).map_or(0, |q| q.iter().map(|p| p.partition_point(|&s| s <= max_seq)).sum())
    }

    /// Keeps a user's latest entry, and which segment must stay for it.
    fn apply_user(&mut self, segment: u64, u: &UserRecord<'_>) {
        let user = self.intern(u.user);
        let entry = entry_of(u, segment, |s| self.intern(s));
        self.segments.entry(segment).or_default().users += 1;
        if let Some(old) = self.users.insert(user, entry) {
            if let Some(live) = self.segments.get_mut(&old.segment) {
                assert!(live.users > 0, "segment {} holds users below zero", old.segment);
                live.users -= 1;
            }
        }
    }

    fn apply_status(&mut self, s: &StatusChange) {
        let Some(meta) = self.messages.get_mut(&s.seq) else {
            // The message's segment was already deleted: nothing to do.
            return;
        };
        if meta.status.is_settled() {
            return;
        }
        let was_pinned = meta.pinned();
        match s.status {
            Status::Accepted => {}
            Status::Delivered => {
                meta.status = Status::Delivered;
                meta.attempts += 1;
                meta.delivered_at_ms = s.at_ms;
            }
            Status::Acked | Status::Expired | Status::Failed | Status::Rejected => {
                meta.status = s.status;
                meta.reason = s.reason;
                if s.status == Status::Acked {
                    meta.acked_at_ms = s.at_ms;
                }
                let (to, expires, priority) = (meta.to.clone(), meta.expires_at_ms, meta.priority);
                self.remove_expiry(expires, s.seq);
                self.remove_pending(s.seq, &to, priority);
                self.close_fallback(s.seq);
            }
        }
        if s.notify && s.status != Status::Accepted {
            self.owe(s.seq, s.status, s.at_ms);
        }
        self.repin(s.seq, was_pinned);
    }

    fn owe(&mut self, seq: u64, status: Status, at_ms: u64) {
        let Some(meta) = self.messages.get_mut(&seq) else { return };
        meta.events_owed |= status.event_bit();
        self.fresh.push((seq, status));
        self.outbox.entry((seq, status as u8)).or_insert(OwedEvent {
            since_ms: at_ms,
            attempts: 0,
            last_error: None,
            dead_at_ms: 0,
        });
    }

    fn apply_event(&mut self, e: &EventChange<'_>) {
        let key = (e.seq, e.event as u8);
        let (Some(meta), Some(event)) = (self.messages.get_mut(&e.seq), self.outbox.get_mut(&key)) else {
            return; // not owed (already settled, or its message is gone)
        };
        let was_pinned = meta.pinned();
        let bit = e.event.event_bit();
        match e.outcome {
            EventOutcome::Delivered | EventOutcome::Dropped => {
                self.dead_events -= usize::from(event.dead_at_ms != 0);
                meta.events_owed &= !bit;
                meta.events_dead &= !bit;
                self.outbox.remove(&key);
            }
            EventOutcome::AttemptFailed => {
                event.attempts = e.attempts;
                event.last_error = Some(Rc::from(e.error));
            }
            EventOutcome::DeadLettered => {
                event.attempts = e.attempts;
                event.last_error = Some(Rc::from(e.error));
                self.dead_events += usize::from(event.dead_at_ms == 0);
                event.dead_at_ms = e.at_ms;
                meta.events_owed &= !bit;
                meta.events_dead |= bit;
            }
            EventOutcome::Replayed => {
                self.dead_events -= usize::from(event.dead_at_ms != 0);
                event.attempts = 0;
                event.dead_at_ms = 0;
                meta.events_dead &= !bit;
                meta.events_owed |= bit;
                self.fresh.push((e.seq, e.event));
            }
        }
        self.repin(e.seq, was_pinned);
    }

    fn apply_fallback(&mut self, f: &FallbackChange<'_>) {
        let Some(meta) = self.messages.get(&f.seq) else { return };
        let was_pinned = meta.pinned();
        let position = |state: &FallbackState| state.channels.iter().position(|c| c as u8 == f.channel);
        match f.step {
            FallbackStep::Planned => {
                if meta.status.is_settled() || meta.channel != Channel::App {
                    return;
                }
                let state = FallbackState {
                    due_at_ms: f.when_ms,
                    channels: ChannelList(f.channels),
                    current: 0,
                    attempts: 0,
                    retry_at_ms: 0,
                    sending: false,
                    last_error: None,
                    dead_at_ms: 0,
                };
                self.set_fallback(f.seq, state);
            }
            FallbackStep::Sending => {
                let Some(state) = self.fallbacks.get_mut(&f.seq) else { return };
                let Some(at) = position(state) else { return };
                if state.current as usize != at {
                    state.attempts = 0;
                }
                state.current = at as u8;
                state.sending = true;
                let due = state.due_at_ms;
                self.fallback_due.remove(&(due, f.seq));
            }
            FallbackStep::AttemptFailed => {
                let Some(state) = self.fallbacks.get_mut(&f.seq) else { return };
                state.attempts = f.attempts;
                state.retry_at_ms = f.when_ms;
                state.last_error = Some(Rc::from(f.text));
            }
            FallbackStep::ChannelFailed => {
                let Some(mut state) = self.fallbacks.get(&f.seq).cloned() else { return };
                let Some(at) = position(&state) else { return };
                state.current = at as u8 + 1;
                state.attempts = 0;
                state.retry_at_ms = 0;
                state.sending = false;
                state.due_at_ms = f.at_ms;
                state.last_error = Some(Rc::from(f.text));
                self.set_fallback(f.seq, state);
            }
            FallbackStep::Delivered => {
                self.close_fallback(f.seq);
                let Some(meta) = self.messages.get_mut(&f.seq) else { return };
                if meta.status.is_settled() || meta.channel != Channel::App {
                    self.repin(f.seq, was_pinned);
                    return;
                }
                meta.status = Status::Delivered;
                meta.delivered_at_ms = f.at_ms;
                meta.channel = Channel::from_u8(f.channel).unwrap_or(Channel::App);
                if f.text.is_empty() {
                    self.provider_ids.remove(&f.seq);
                } else {
                    self.provider_ids.insert(f.seq, Rc::from(f.text));
                }
                let (to, expires, priority) = (meta.to.clone(), meta.expires_at_ms, meta.priority);
                self.remove_expiry(expires, f.seq);
                self.remove_pending(f.seq, &to, priority);
                if f.notify {
                    self.owe(f.seq, Status::Delivered, f.at_ms);
                }
            }
            FallbackStep::Exhausted => {
                let Some(mut state) = self.fallbacks.get(&f.seq).cloned() else { return };
                if meta.status.is_settled() {
                    return;
                }
                state.sending = false;
                state.dead_at_ms = f.at_ms.max(1);
                state.last_error = Some(Rc::from(f.text));
                self.set_fallback(f.seq, state);
                let Some(meta) = self.messages.get_mut(&f.seq) else { return };
                meta.status = Status::Failed;
                meta.reason = Reason::ChannelsExhausted;
                let (to, expires, priority) = (meta.to.clone(), meta.expires_at_ms, meta.priority);
                self.remove_expiry(expires, f.seq);
                self.remove_pending(f.seq, &to, priority);
                if f.notify {
                    self.owe(f.seq, Status::Failed, f.at_ms);
                }
            }
            FallbackStep::Replayed => {
                let Some(mut state) = self.fallbacks.get(&f.seq).cloned().filter(|s| s.dead_at_ms != 0) else {
                    return;
                };
                state.current = 0;
                state.attempts = 0;
                state.retry_at_ms = 0;
                state.dead_at_ms = 0;
                state.due_at_ms = f.at_ms;
                self.set_fallback(f.seq, state);
                let Some(meta) = self.messages.get_mut(&f.seq) else { return };
                meta.status = if meta.delivered_at_ms > 0 { Status::Delivered } else { Status::Accepted };
                meta.reason = Reason::None;
            }
            FallbackStep::Dropped => {
                if self.fallbacks.get(&f.seq).is_some_and(|s| s.dead_at_ms != 0) {
                    self.close_fallback(f.seq);
                }
            }
        }
        self.repin(f.seq, was_pinned);
    }

    /// Stores a fallback state (open), due if it is waiting for a hand-over.
    fn set_fallback(&mut self, seq: u64, state: FallbackState) {
        if let Some(old) = self.fallbacks.get(&seq) {
            self.fallback_due.remove(&(old.due_at_ms, seq));
            self.dead_events -= usize::from(old.dead_at_ms != 0);
        }
        self.dead_events += usize::from(state.dead_at_ms != 0);
        if !state.sending && state.dead_at_ms == 0 {
            self.fallback_due.insert((state.due_at_ms, seq));
        }
        self.fallbacks.insert(seq, state);
        if let Some(meta) = self.messages.get_mut(&seq) {
            meta.fallback_open = true;
        }
    }

    /// Ends a message's fallback (delivered, settled otherwise, dropped).
    fn close_fallback(&mut self, seq: u64) {
        if let Some(old) = self.fallbacks.remove(&seq) {
            self.fallback_due.remove(&(old.due_at_ms, seq));
            self.dead_events -= usize::from(old.dead_at_ms != 0);
        }
        if let Some(meta) = self.messages.get_mut(&seq) {
            meta.fallback_open = false;
        }
    }

    /// Fallbacks due at `now_ms` and not handed over, oldest first, at most `max`.
    pub fn fallbacks_due(&self, now_ms: u64, max: usize) -> Vec<u64> {
        self.fallback_due.iter().take_while(|(at, _)| *at <= now_ms).take(max).map(|&(_, seq)| seq).collect()
    }

    /// Fallbacks handed to a provider and not finally answered (after a
    /// restart: to hand over again).
    pub fn fallbacks_sending(&self) -> Vec<u64> {
        self.fallbacks.iter().filter(|(_, s)| s.sending && s.dead_at_ms == 0).map(|(&seq, _)| seq).collect()
    }

    /// The fallback state of message `seq`.
    pub fn fallback(&self, seq: u64) -> Option<&FallbackState> {
        self.fallbacks.get(&seq)
    }

    /// Dead-lettered fallbacks with seq above `after` (all if None), at most `limit`.
    pub fn fallback_dead_letters(&self, after: Option<u64>, limit: usize) -> Vec<(u64, &FallbackState)> {
        use std::ops::Bound::{Excluded, Unbounded};
        let from = after.map_or(Unbounded, Excluded);
        self.fallbacks
            .range((from, Unbounded))
            .filter(|(_, s)| s.dead_at_ms != 0)
            .take(limit)
            .map(|(&seq, s)| (seq, s))
            .collect()
    }

    /// Keeps the per-segment count of pinned messages right after a change.
    fn repin(&mut self, seq: u64, was_pinned: bool) {
        let Some(meta) = self.messages.get(&seq) else { return };
        let (now, segment) = (meta.pinned(), meta.segment);
        if now == was_pinned {
            return;
        }
        if let Some(live) = self.segments.get_mut(&segment) {
            if now {
                live.unsettled += 1;
            } else {
                assert!(live.unsettled > 0, "segment {segment} settled below zero");
                live.unsettled -= 1;
            }
        }
    }

    fn remove_pending(&mut self, seq: u64, to: &Rc<str>, priority: Priority) {
        if let Some(queues) = self.pending.get_mut(to) {
            let queue = &mut queues[priority as usize];
            if queue.front() == Some(&seq) {
                queue.pop_front();
                self.pending_messages -= 1;
            } else if let Ok(i) = queue.binary_search(&seq) {
                queue.remove(i);
                self.pending_messages -= 1;
            }
            if self.replay.is_none() && queues.iter().all(VecDeque::is_empty) {
                self.pending.remove(to);
            }
        }
    }

    fn intern(&mut self, s: &str) -> Rc<str> {
        intern(&mut self.interned, s)
    }

    fn intern_client(&mut self, client: &str) -> Rc<str> {
        if let Some(last) = self.last_client.as_ref().filter(|c| ***c == *client) {
            return last.clone();
        }
        let interned = intern(&mut self.interned, client);
        self.last_client = Some(interned.clone());
        interned
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

    /// Owed events not dead-lettered, oldest message first:
    /// (message seq, status, state).
    pub fn owed_events(&self) -> impl Iterator<Item = (u64, Status, &OwedEvent)> + '_ {
        self.outbox
            .iter()
            .filter(|(_, e)| e.dead_at_ms == 0)
            .filter_map(|(&(seq, code), e)| Status::from_u8(code).map(|s| (seq, s, e)))
    }

    /// Dead-lettered events after `after` (exclusive), at most `limit`.
    pub fn dead_letters(&self, after: Option<(u64, Status)>, limit: usize) -> Vec<(u64, Status, &OwedEvent)> {
        use std::ops::Bound::{Excluded, Unbounded};
        let from = after.map_or(Unbounded, |(seq, s)| Excluded((seq, s as u8)));
        self.outbox
            .range((from, Unbounded))
            .filter(|(_, e)| e.dead_at_ms != 0)
            .filter_map(|(&(seq, code), e)| Status::from_u8(code).map(|s| (seq, s, e)))
            .take(limit)
            .collect()
    }

    /// Takes the events that became owed since the last call (some may have
    /// been settled since: check [`MessageIndex::event`]).
    pub fn take_fresh_events(&mut self) -> Vec<(u64, Status)> {
        std::mem::take(&mut self.fresh)
    }

    /// The owed or dead-lettered event of `status` of message `seq`.
    pub fn event(&self, seq: u64, status: Status) -> Option<&OwedEvent> {
        self.outbox.get(&(seq, status as u8))
    }

    /// Events owed or dead-lettered.
    pub fn outbox_len(&self) -> usize {
        self.outbox.len()
    }

    /// Messages in the pending queues: accepted, and not yet acked,
    /// expired, failed, rejected, or delivered by a fallback channel.
    pub fn pending_messages(&self) -> usize {
        self.pending_messages
    }

    /// Items in the dead-letter queue: webhook events and exhausted fallbacks.
    pub fn dead_events(&self) -> usize {
        self.dead_events
    }

    /// Number of messages indexed.
    pub fn len(&self) -> usize {
        self.messages.len()
    }

    /// True when no message is indexed.
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    /// Number of pinned messages: unsettled, or with an event owed or dead-lettered.
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
        self.segments
            .iter()
            .take_while(|(&no, live)| {
                no < active && live.unsettled == 0 && live.users == 0 && !self.idempotency.pins(no)
            })
            .map(|(&no, _)| no)
            .collect()
    }

    /// Users whose latest record lies in a segment that only they keep from
    /// deletion (the oldest segments, before `active`, with every message
    /// settled), at most `max`: maintenance journals each entry again, in
    /// the active segment, and once that is durable the old one can go.
    pub fn users_to_carry(&self, active: u64, max: usize) -> Vec<Rc<str>> {
        let mut last = None;
        for (&no, live) in self.segments.iter().take_while(|(&no, live)| no < active && live.unsettled == 0) {
            if live.users > 0 {
                last = Some(no);
            }
        }
        let Some(last) = last else { return Vec::new() };
        self.users.iter().filter(|(_, e)| e.segment <= last).map(|(u, _)| u.clone()).take(max).collect()
    }

    /// The idempotency keys of the clients homed here.
    pub fn idempotency(&self) -> &IdempotencyKeys {
        &self.idempotency
    }

    /// Forgets idempotency keys answered before `before_ms`.
    pub fn expire_idempotency(&mut self, before_ms: u64) -> usize {
        self.idempotency.expire(before_ms)
    }

    /// The directory entry of `user`.
    pub fn user(&self, user: &str) -> Option<&UserEntry> {
        self.users.get(user)
    }

    /// Users in the directory.
    pub fn users_len(&self) -> usize {
        self.users.len()
    }

    /// Why a message from `client` to `to` must be refused, if it must:
    /// `to` blocked `client`, or (with `known_only`) `to` is not in the
    /// directory.
    pub fn refusal(&self, to: &str, client: &str, known_only: bool) -> Option<Reason> {
        match self.users.get(to) {
            Some(e) if e.blocks(client) => Some(Reason::RecipientOptedOut),
            Some(_) => None,
            None if known_only => Some(Reason::UnknownRecipient),
            None => None,
        }
    }

    /// Unsettled messages from `client` to `user`, in delivery order.
    pub fn unsettled_from(&self, user: &str, client: &str) -> Vec<u64> {
        self.pending_for(user).filter(|seq| self.messages.get(seq).is_some_and(|m| &*m.client == client)).collect()
    }

    /// Drops a deleted segment and the messages accepted in it.
    pub fn forget_segment(&mut self, segment: u64) {
        let Some(live) = self.segments.remove(&segment) else {
            return;
        };
        assert_eq!(live.unsettled, 0, "forgetting segment {segment} with unsettled messages");
        assert_eq!(live.users, 0, "forgetting segment {segment} that holds directory entries");
        let accepted = live.any.then_some(live.first_seq..=live.last_seq).into_iter().flatten();
        for seq in accepted.chain(live.restored.iter().copied()) {
            // Only messages whose record lies here: a restored message keeps
            // its old number in a newer segment.
            if self.messages.get(&seq).is_some_and(|m| m.segment == segment) {
                let m = self.forget_message(seq);
                debug_assert!(!m.is_some_and(|m| m.pinned()), "forgot a pinned message {seq}");
            }
        }
        self.interned.retain(|s| Rc::strong_count(s) > 1);
    }
}

/// The TTL index while recovery replays a journal: the expiry of message
/// `first_seq + i` in slot `i` (0: none), so an insert or a removal is a
/// store into an array that fills in sequence order, where the B-tree
/// took a descent and, for removals, a rebalance (a tenth of replay's time
/// with every message under a TTL). [`MessageIndex::end_replay`] builds
/// the B-tree from the slots in one pass. The set it stands for is exactly
/// the B-tree's: a slot holds at most one expiry per message, and what
/// does not fit a slot (a restored message, a number before `first_seq`, a
/// second expiry for one number, a span past
/// [`REPLAYED_EXPIRIES_SLOTS_MAX`]) goes to the B-tree as before; removals
/// look in both. Accepted messages are numbered densely from the oldest
/// segment kept, so the slots cost 8 bytes per message of the journal.
#[derive(Debug, Default)]
struct ReplayedExpiries {
    /// The sequence number of slot 0 (the first accepted message with a TTL).
    first_seq: Option<u64>,
    slots: Vec<u64>,
}

/// Most slots [`ReplayedExpiries`] holds (8 bytes each: 512 MiB at most, 8
/// bytes per message of the journal, where the message table takes 112).
const REPLAYED_EXPIRIES_SLOTS_MAX: u64 = 1 << 26;

/// Largest run of numbers without a slot [`ReplayedExpiries`] fills with
/// zeros (512 KiB); a message past a larger gap goes to the B-tree.
const REPLAYED_EXPIRIES_GAP_MAX: usize = 1 << 16;

impl ReplayedExpiries {
    /// Stores `expires_at_ms` (not 0) for `seq`. `Ok(Some(old))`: the slot
    /// held another expiry, which the caller keeps elsewhere; `Err`: `seq`
    /// has no slot.
    fn insert(&mut self, expires_at_ms: u64, seq: u64) -> Result<Option<u64>, ()> {
        assert!(expires_at_ms > 0, "0 means no expiry");
        let first = *self.first_seq.get_or_insert(seq);
        let at = seq.checked_sub(first).filter(|&at| at < REPLAYED_EXPIRIES_SLOTS_MAX).ok_or(())? as usize;
        if at >= self.slots.len() {
            // A jump in the numbers (the segments between two kept ones were
            // deleted: one unacked message pins its segment for its whole
            // TTL) would fill the gap with zeros, every page of it written:
            // past a small one, the B-tree takes the rest.
            if at - self.slots.len() > REPLAYED_EXPIRIES_GAP_MAX {
                return Err(());
            }
            self.slots.resize(at + 1, 0);
        }
        let old = std::mem::replace(&mut self.slots[at], expires_at_ms);
        Ok((old != 0 && old != expires_at_ms).then_some(old))
    }

    /// Clears `seq`'s slot if it holds `expires_at_ms`.
    fn remove(&mut self, expires_at_ms: u64, seq: u64) {
        let Some(at) = self.first_seq.and_then(|first| seq.checked_sub(first)) else { return };
        if let Some(slot) = self.slots.get_mut(at as usize).filter(|slot| **slot == expires_at_ms) {
            *slot = 0;
        }
    }

    /// The (expires_at_ms, seq) keys held, in sequence order.
    fn into_keys(self) -> Vec<(u64, u64)> {
        let first = self.first_seq.unwrap_or(0);
        let held = self.slots.iter().enumerate().filter(|(_, &expires)| expires != 0);
        held.map(|(at, &expires)| (expires, first + at as u64)).collect()
    }
}

/// Records whose users' state [`MessageIndex::apply_commit`] loads
/// together before applying them: enough independent cache misses to
/// overlap, few enough that what they load is still cached when applied.
const TOUCH_GROUP: usize = 8;

/// Parts of [`SeqTable`] unless recovery chooses more
/// ([`MessageIndex::plan_message_table`]).
const SEQ_TABLE_PARTS: usize = 64;
/// Most entries [`MessageIndex::plan_message_table`] moves to new parts.
const PLAN_MOVE_MAX: usize = 1 << 17;
/// Most parts [`MessageIndex::plan_message_table`] chooses (exclusive):
/// from 64 to 127, the messages per part span a factor of two, so one of
/// them fills its parts' power-of-two capacity well.
const SEQ_TABLE_PARTS_END: usize = 2 * SEQ_TABLE_PARTS;
/// Consecutive sequence numbers that go to one part of [`SeqTable`]
/// (log2): inserts in sequence order fill one part at a time.
const SEQ_TABLE_RUN_BITS: u32 = 12;

/// The message table, in [`SEQ_TABLE_PARTS`] hash tables by sequence
/// number (runs of 4,096 go to one part, parts in turn). A hash table
/// grows by allocating one twice its size and moving every entry, page
/// faults included, while nothing else runs on the shard: one table of
/// 1.8 million messages stopped ingest for about a second when it grew
/// (and held both tables meanwhile). A part holds 1/64 of the messages,
/// so its growth stops the shard for 1/64 of that; the total work and the
/// memory at rest are the same.
///
/// The number of parts need not be a power of two: recovery chooses it
/// ([`MessageIndex::plan_message_table`]) so that the journal's messages
/// fill the parts' power-of-two capacities well. With 64 parts, 4.1 M
/// messages are 64,500 a part, just over the 57,344 that 65,536 buckets
/// hold, so every part had 131,072 buckets, half of them empty, and
/// recovery zeroed (first touch) twice the memory it used.
#[derive(Debug)]
struct SeqTable {
    parts: Box<[HashMap<u64, MessageMeta, SeqHash>]>,
    /// `u64::MAX / parts + 1` (0 for one part, as in Lemire's C, where it
    /// wraps): the multiplier of his fast modulo, so finding a part costs
    /// two multiplications, not a division.
    part_mul: u64,
    /// Entries in all parts (read per request by the memory pressure).
    len: usize,
}

impl Default for SeqTable {
    fn default() -> Self {
        Self::with_parts(SEQ_TABLE_PARTS)
    }
}

impl SeqTable {
    fn with_parts(parts: usize) -> Self {
        let parts = parts.clamp(1, u32::MAX as usize);
        Self {
            parts: (0..parts).map(|_| HashMap::default()).collect(),
            part_mul: (u64::MAX / parts as u64).wrapping_add(1),
            len: 0,
        }
    }

    /// `(seq >> SEQ_TABLE_RUN_BITS) % parts` (of its low 32 bits).
    fn part(&self, seq: u64) -> usize {
        let run = (seq >> SEQ_TABLE_RUN_BITS) as u32;
        let low = self.part_mul.wrapping_mul(u64::from(run));
        ((u128::from(low) * self.parts.len() as u128) >> 64) as usize
    }

    /// The same entries in `parts` parts.
    fn repartition(&mut self, parts: usize) {
        let mut next = Self::with_parts(parts);
        for (seq, meta) in std::mem::take(&mut self.parts).into_vec().into_iter().flatten() {
            next.insert(seq, meta);
        }
        *self = next;
    }

    fn get(&self, seq: &u64) -> Option<&MessageMeta> {
        self.parts[self.part(*seq)].get(seq)
    }

    fn get_mut(&mut self, seq: &u64) -> Option<&mut MessageMeta> {
        let part = self.part(*seq);
        self.parts[part].get_mut(seq)
    }

    fn contains_key(&self, seq: &u64) -> bool {
        self.parts[self.part(*seq)].contains_key(seq)
    }

    fn insert(&mut self, seq: u64, meta: MessageMeta) -> Option<MessageMeta> {
        let part = self.part(seq);
        let old = self.parts[part].insert(seq, meta);
        self.len += usize::from(old.is_none());
        old
    }

    fn remove(&mut self, seq: &u64) -> Option<MessageMeta> {
        let part = self.part(*seq);
        let old = self.parts[part].remove(seq);
        self.len -= usize::from(old.is_some());
        old
    }

    fn len(&self) -> usize {
        self.len
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Room for `additional` more messages of consecutive sequence numbers.
    fn reserve(&mut self, additional: usize) {
        let each = additional.div_ceil(self.parts.len());
        for part in self.parts.iter_mut() {
            part.reserve(each);
        }
    }
}

/// Hashes the sequence numbers that key [`MessageIndex::messages`] so that
/// each run of 16 consecutive ones lands in one group of 16 slots (the
/// table's probe width), and runs land at spread-out places. Replay and
/// ingest insert messages in sequence order, so an insert touches the
/// group and the slots (and their memory pages) the previous one did
/// rather than random ones of a table of hundreds of MB: the cache and TLB
/// misses that were most of the cost of an `Accepted` record in replay.
/// The 7-bit tag hashbrown keeps per slot (the top bits) is mixed from the
/// whole number, so a lookup still compares about one key per group.
#[derive(Debug, Default, Clone, Copy)]
struct SeqHash;

impl std::hash::BuildHasher for SeqHash {
    type Hasher = SeqHasher;
    fn build_hasher(&self) -> SeqHasher {
        SeqHasher(0)
    }
}

/// See [`SeqHash`]; hashes `u64` keys only.
#[derive(Debug, Default, Clone, Copy)]
struct SeqHasher(u64);

impl std::hash::Hasher for SeqHasher {
    fn write(&mut self, bytes: &[u8]) {
        // Only `u64` keys are hashed here (`write_u64`); anything else is
        // folded in whole, correct if never fast.
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(MIX);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }

    fn finish(&self) -> u64 {
        let n = self.0;
        let run = mix(n >> 4);
        let tag = mix(n);
        (tag & TAG_BITS) | (run & !TAG_BITS & !15) | (n & 15)
    }
}

const MIX: u64 = 0x9E37_79B9_7F4A_7C15;
/// The bits hashbrown takes its 7-bit slot tag from.
const TAG_BITS: u64 = 0xFE00_0000_0000_0000;

/// A 64-bit finaliser (the murmur3 one): every input bit moves every output bit.
fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    x ^= x >> 33;
    x = x.wrapping_mul(0xC4CE_B9FE_1A85_EC53);
    x ^ (x >> 33)
}

/// The one shared copy of `s`.
fn intern(interned: &mut HashSet<Rc<str>>, s: &str) -> Rc<str> {
    if let Some(existing) = interned.get(s) {
        return existing.clone();
    }
    let rc: Rc<str> = Rc::from(s);
    interned.insert(rc.clone());
    rc
}

/// The interned id of `user` and their pending queues (created empty).
/// A user with messages pending already has the interned id as the key of
/// their queues: one hash of the id instead of two (interning, then the
/// queues), which is most of the cost of an `Accepted` record in replay.
fn pending_queues<'a>(
    pending: &'a mut HashMap<Rc<str>, PendingQueues>,
    interned: &mut HashSet<Rc<str>>,
    user: &str,
) -> (Rc<str>, &'a mut PendingQueues) {
    match pending.raw_entry_mut().from_key(user) {
        RawEntryMut::Occupied(e) => {
            let (key, queues) = e.into_key_value();
            (key.clone(), queues)
        }
        RawEntryMut::Vacant(e) => {
            let key = intern(interned, user);
            let (_, queues) = e.insert(key.clone(), PendingQueues::default());
            (key, queues)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{Accepted, SegmentHeader, StatusChange};

    /// A normal-priority message from client `c` to `to`, accepted at `seq` ms.
    fn message(seq: u64, to: &str) -> Accepted<'_> {
        Accepted { seq, client: "c", to, priority: Priority::Normal, expires_at_ms: 0, accepted_at_ms: seq, body: b"x" }
    }

    fn accept(ix: &mut MessageIndex, seg: u64, seq: u64, to: &str) {
        ix.apply(seg, seq * 100, &Record::Accepted(message(seq, to)));
    }

    fn status(ix: &mut MessageIndex, seq: u64, status: Status) {
        ix.apply(9, 0, &Record::Status(StatusChange::plain(seq, status, 1000 + seq)));
    }

    #[test]
    fn seq_hash_keeps_runs_of_16_together_and_varies_the_tag() {
        use std::hash::BuildHasher as _;
        let h = |n: u64| SeqHash.hash_one(n);
        let place = |n: u64| h(n) & !TAG_BITS & !15;
        for run in [0u64, 1, 77, 1 << 40] {
            let first = run * 16;
            assert!((first..first + 16).all(|n| place(n) == place(first) && h(n) & 15 == n & 15));
            assert_ne!(place(first), place(first + 16));
        }
        let tags: std::collections::BTreeSet<u64> = (0..4096).map(|n| h(n) >> 57).collect();
        assert!(tags.len() > 100, "7-bit tags spread: {}", tags.len());
    }

    #[test]
    fn seq_hash_finds_every_key_of_strided_and_sparse_sets() {
        for stride in [1u64, 3, 16, 17, 1024, 1 << 20] {
            let mut m: HashMap<u64, u64, SeqHash> = HashMap::default();
            for i in 0..20_000 {
                m.insert(i * stride, i);
            }
            assert!((0..20_000).all(|i| m.get(&(i * stride)) == Some(&i)), "stride {stride}");
            assert!(m.get(&(20_000 * stride)).is_none());
            m.retain(|k, _| k % (2 * stride) == 0);
            assert!((0..20_000).all(|i| m.contains_key(&(i * stride)) == (i % 2 == 0)), "stride {stride}");
        }
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

    fn notify(ix: &mut MessageIndex, seq: u64, status: Status) {
        ix.apply(9, 0, &Record::Status(StatusChange { seq, status, at_ms: 5, notify: true, reason: Reason::None }));
    }

    fn event(ix: &mut MessageIndex, seq: u64, status: Status, outcome: EventOutcome, attempts: u32) {
        ix.apply(9, 0, &Record::Event(EventChange { seq, event: status, outcome, attempts, at_ms: 7, error: "boom" }));
    }

    #[test]
    fn owed_events_pin_their_message_until_delivered_or_dropped() {
        let mut ix = MessageIndex::new();
        accept(&mut ix, 1, 0, "a");
        accept(&mut ix, 2, 1, "a");
        notify(&mut ix, 0, Status::Delivered);
        notify(&mut ix, 0, Status::Acked);
        status(&mut ix, 1, Status::Acked); // no webhook: owes nothing
        assert_eq!(ix.get(0).unwrap().events_owed, Status::Delivered.event_bit() | Status::Acked.event_bit());
        assert!(ix.deletable_segments(3).is_empty(), "an owed event keeps its message's segment");
        assert_eq!(
            ix.owed_events().map(|(seq, s, _)| (seq, s)).collect::<Vec<_>>(),
            vec![(0, Status::Delivered), (0, Status::Acked)]
        );
        event(&mut ix, 0, Status::Delivered, EventOutcome::Delivered, 1);
        event(&mut ix, 0, Status::Acked, EventOutcome::AttemptFailed, 1);
        assert_eq!(ix.event(0, Status::Acked).unwrap().attempts, 1);
        assert!(ix.deletable_segments(3).is_empty());
        event(&mut ix, 0, Status::Acked, EventOutcome::DeadLettered, 15);
        assert_eq!(ix.owed_events().count(), 0);
        assert_eq!(ix.dead_letters(None, 10).len(), 1);
        assert!(ix.deletable_segments(3).is_empty(), "a dead letter keeps it too");
        event(&mut ix, 0, Status::Acked, EventOutcome::Replayed, 0);
        assert_eq!(ix.owed_events().next().map(|(_, _, e)| e.attempts), Some(0));
        assert!(ix.dead_letters(None, 10).is_empty());
        event(&mut ix, 0, Status::Acked, EventOutcome::Dropped, 0);
        assert_eq!(ix.outbox_len(), 0);
        assert_eq!(ix.deletable_segments(3), vec![1, 2]);
        // Events of a settled-and-forgotten message are ignored.
        event(&mut ix, 0, Status::Acked, EventOutcome::Delivered, 1);
    }

    /// The O(1) gauges `/metrics` reads agree with a count over the index
    /// through every transition (settle, late delivery, dead letter, replay, drop).
    #[test]
    fn unsettled_and_dead_counters_follow_every_transition() {
        let mut ix = MessageIndex::new();
        let counted = |ix: &MessageIndex| {
            (ix.pending_messages(), ix.dead_events(), ix.pending_for("a").count(), ix.dead_letters(None, 100).len())
        };
        for seq in 0..4 {
            accept(&mut ix, 1, seq, "a");
        }
        assert_eq!(counted(&ix), (4, 0, 4, 0));
        notify(&mut ix, 0, Status::Delivered);
        status(&mut ix, 0, Status::Acked);
        status(&mut ix, 0, Status::Acked); // twice: settled once
        status(&mut ix, 1, Status::Expired);
        status(&mut ix, 1, Status::Delivered); // late: never un-settles
        assert_eq!(counted(&ix), (2, 0, 2, 0));
        event(&mut ix, 0, Status::Delivered, EventOutcome::DeadLettered, 3);
        event(&mut ix, 0, Status::Delivered, EventOutcome::DeadLettered, 4); // again: one dead letter
        assert_eq!(counted(&ix), (2, 1, 2, 1));
        event(&mut ix, 0, Status::Delivered, EventOutcome::Replayed, 0);
        assert_eq!(counted(&ix), (2, 0, 2, 0));
        event(&mut ix, 0, Status::Delivered, EventOutcome::DeadLettered, 5);
        event(&mut ix, 0, Status::Delivered, EventOutcome::Dropped, 0);
        assert_eq!(counted(&ix), (2, 0, 2, 0));
    }

    /// Fallback deliveries take messages out of the pending queues outside
    /// `apply_status`, and dead-letter too: the `/metrics` counters follow.
    #[test]
    fn counters_follow_fallback_exhaustion_replay_and_drop() {
        let mut ix = MessageIndex::new();
        accept(&mut ix, 1, 0, "a");
        let step = |ix: &mut MessageIndex, step: FallbackStep| {
            let change = FallbackChange {
                seq: 0,
                step,
                at_ms: 50,
                channel: 0,
                channels: 0,
                attempts: 0,
                when_ms: 10,
                notify: false,
                text: "no channel left",
            };
            ix.apply(9, 0, &Record::Fallback(change));
        };
        let counted = |ix: &MessageIndex| {
            let dead = ix.fallback_dead_letters(None, 10).len() + ix.dead_letters(None, 10).len();
            (ix.pending_messages(), ix.dead_events(), ix.pending_for("a").count(), dead)
        };
        step(&mut ix, FallbackStep::Planned);
        assert_eq!(counted(&ix), (1, 0, 1, 0));
        step(&mut ix, FallbackStep::Exhausted);
        assert_eq!(counted(&ix), (0, 1, 0, 1));
        step(&mut ix, FallbackStep::Replayed); // due again through fallback, not the app queue
        assert_eq!(counted(&ix), (0, 0, 0, 0));
        step(&mut ix, FallbackStep::Exhausted);
        step(&mut ix, FallbackStep::Dropped);
        assert_eq!(counted(&ix), (0, 0, 0, 0), "dropped: out of the queue, the message stays failed");
    }

    #[test]
    fn the_fast_modulo_finds_the_part_a_division_would() {
        for parts in [1usize, 3, 64, 77, 100, 127] {
            let t = SeqTable::with_parts(parts);
            for run in (0u64..5000).chain([u32::MAX as u64 - 3, u32::MAX as u64, 1 << 33]) {
                let seq = run << SEQ_TABLE_RUN_BITS;
                let want = (run as u32) as usize % parts;
                assert_eq!(t.part(seq), want, "parts {parts}, run {run}");
                assert_eq!(t.part(seq + 4095), want, "a run of 4,096 stays in one part");
            }
        }
    }

    #[test]
    fn recovery_chooses_parts_that_the_expected_messages_fill_and_keeps_every_entry() {
        // 4.1 M messages (the 1 GiB replay): 64 parts would need 131,072
        // buckets each (half empty); 77 parts of 65,536 hold them.
        let mut ix = MessageIndex::new();
        for seq in 0..20_000 {
            accept(&mut ix, 1, seq, if seq % 2 == 0 { "a" } else { "b" });
        }
        let parts = ix.plan_message_table(4_129_777);
        assert_eq!(parts, 77);
        let want: usize = 4_129_777 + 4_129_777 / 16;
        assert!(want.div_ceil(parts) <= 57_344, "a part's 65,536 buckets hold its share");
        assert_eq!(ix.messages.parts.len(), 77);
        assert_eq!(ix.len(), 20_000);
        assert!((0..20_000).all(|seq| ix.get(seq).is_some_and(|m| m.offset == seq * 100)));
        assert_eq!(ix.pending_messages(), 20_000);
        // Small or late: left as it is.
        assert_eq!(MessageIndex::new().plan_message_table(10_000), SEQ_TABLE_PARTS);
        let mut big = MessageIndex::new();
        for seq in 0..(PLAN_MOVE_MAX as u64 + 1) {
            big.messages.insert(seq, ix.get(0).unwrap().clone());
        }
        assert_eq!(big.plan_message_table(4_129_777), SEQ_TABLE_PARTS, "too late to move");
        // A count that fills 64 parts best keeps 64 (57,110 of 57,344 a
        // part; 127 parts of 32,768 buckets would be 108 short).
        assert_eq!(MessageIndex::new().plan_message_table(3_440_000), SEQ_TABLE_PARTS);
        // 3.2 M: 119 parts of 32,768 buckets (3.9 M slots) beat 64 of 65,536.
        assert_eq!(MessageIndex::new().plan_message_table(3_200_000), 119);
    }

    /// The message table's slots are most of the index's memory, and replay
    /// writes one for every message (page faults included): a field added to
    /// [`MessageMeta`] must pay for itself, or live apart as the provider
    /// ids do. 104 bytes: 120 until the provider id moved out.
    #[test]
    fn message_table_slots_stay_narrow() {
        let (meta, slot) = (std::mem::size_of::<MessageMeta>(), std::mem::size_of::<(u64, MessageMeta)>());
        assert!(meta <= 104, "MessageMeta is {meta} bytes");
        assert!(slot <= 112, "a message table slot is {slot} bytes");
    }

    /// A provider's id is kept apart from the table and leaves with its
    /// message, whichever way the message leaves.
    #[test]
    fn provider_ids_live_as_long_as_their_messages() {
        let mut ix = MessageIndex::new();
        let delivered = |ix: &mut MessageIndex, seq: u64, text: &str| {
            let change = FallbackChange {
                seq,
                step: FallbackStep::Delivered,
                at_ms: 50,
                channel: Channel::WhatsApp as u8,
                channels: 0,
                attempts: 0,
                when_ms: 10,
                notify: false,
                text,
            };
            ix.apply(9, 0, &Record::Fallback(change));
        };
        accept(&mut ix, 1, 0, "a");
        accept(&mut ix, 1, 1, "b");
        accept(&mut ix, 2, 2, "a");
        delivered(&mut ix, 0, "wamid.0");
        delivered(&mut ix, 1, "");
        delivered(&mut ix, 2, "wamid.2");
        assert_eq!(ix.provider_message_id(0), Some("wamid.0"));
        assert_eq!(ix.provider_message_id(1), None, "the provider gave none");
        assert_eq!(ix.get(0).map(|m| m.channel), Some(Channel::WhatsApp));
        delivered(&mut ix, 0, "wamid.again");
        assert_eq!(ix.provider_message_id(0), Some("wamid.0"), "delivered once");
        assert_eq!(ix.deletable_segments(3), vec![1, 2]);
        ix.forget_segment(1);
        assert_eq!((ix.get(0).is_none(), ix.provider_message_id(0)), (true, None));
        assert_eq!(ix.provider_message_id(2), Some("wamid.2"));
        ix.forget_segment(2);
        assert!(ix.provider_ids.is_empty(), "no id outlives its message");
    }

    #[test]
    fn a_rejection_settles_with_its_reason() {
        let mut ix = MessageIndex::new();
        accept(&mut ix, 1, 0, "a");
        ix.apply(
            9,
            0,
            &Record::Status(StatusChange {
                seq: 0,
                status: Status::Rejected,
                at_ms: 5,
                notify: true,
                reason: Reason::RecipientOptedOut,
            }),
        );
        let m = ix.get(0).unwrap();
        assert_eq!((m.status, m.reason), (Status::Rejected, Reason::RecipientOptedOut));
        assert_eq!(ix.pending_for("a").count(), 0, "never delivered");
        assert_eq!(ix.unsettled(), 1, "pinned by its owed event only");
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

    fn spilled(ix: &mut MessageIndex, seg: u64, seqs: &[u64]) {
        let mut buf = Vec::new();
        crate::record::SeqList::encode(seqs, &mut buf);
        ix.apply(seg, 0, &Record::Spilled(crate::record::SeqList::new(&buf)));
    }

    fn restored(ix: &mut MessageIndex, seg: u64, seq: u64, to: &str) {
        ix.apply(seg, seq * 100, &Record::Restored(message(seq, to)));
    }

    #[test]
    fn spilled_messages_leave_memory_and_unpin_restored_ones_come_back_in_order() {
        let mut ix = MessageIndex::new();
        for seq in 0..4 {
            accept(&mut ix, 1, seq, "a");
        }
        status(&mut ix, 3, Status::Delivered); // delivered: not spillable
        spilled(&mut ix, 2, &[0, 1, 3]);
        assert_eq!(ix.pending_for("a").collect::<Vec<_>>(), vec![2, 3], "3 stays: it was delivered");
        assert!(ix.get(0).is_none() && ix.get(3).is_some());
        assert_eq!((ix.spilled(), ix.pending_messages(), ix.unsettled()), (2, 2, 2));
        // Back in a newer segment, with their old numbers, in order.
        restored(&mut ix, 3, 1, "a");
        restored(&mut ix, 3, 0, "a");
        assert_eq!(ix.pending_for("a").collect::<Vec<_>>(), vec![0, 1, 2, 3]);
        assert_eq!(ix.take_restored(), vec![1, 0]);
        assert_eq!(ix.pending_count_upto("a", 1), 2);
        // Segment 1 goes once 2 and 3 settle; the restored ones stay (their records are in 3).
        status(&mut ix, 2, Status::Acked);
        status(&mut ix, 3, Status::Acked);
        assert_eq!(ix.deletable_segments(3), vec![1]);
        ix.forget_segment(1);
        assert!(ix.get(0).is_some() && ix.get(1).is_some() && ix.get(2).is_none());
        assert_eq!(ix.pending_for("a").collect::<Vec<_>>(), vec![0, 1]);
        // Restored twice (a replay where the spill never completed): one copy.
        restored(&mut ix, 3, 0, "a");
        assert_eq!(ix.pending_for("a").collect::<Vec<_>>(), vec![0, 1]);
        status(&mut ix, 0, Status::Acked);
        status(&mut ix, 1, Status::Acked);
        ix.forget_segment(3);
        assert!(ix.is_empty());
    }

    #[test]
    fn spill_candidates_stop_at_young_or_not_durable_and_skip_kept_users() {
        let mut ix = MessageIndex::new();
        for seq in 0..6 {
            accept(&mut ix, 1, seq, if seq == 1 { "online" } else { "a" });
        }
        ix.set_generation(4, 7);
        let (c, next) = ix.spill_candidates(0, 100, 6, 10, |u| u == "online");
        assert_eq!((c, next), (vec![0, 2, 3], 4), "4 is not durable yet");
        let (c, next) = ix.spill_candidates(0, 2, 7, 10, |_| false);
        assert_eq!((c, next), (vec![0, 1, 2], 3), "accepted_at 3 is too young");
        let (c, _) = ix.spill_candidates(3, 100, 7, 2, |_| false);
        assert_eq!(c, vec![3, 4], "at most max");
    }

    fn put_user(ix: &mut MessageIndex, seg: u64, user: &str, phone: &str, blocked: &[&str]) {
        let mut draft = crate::directory::UserDraft::new(seg * 10);
        draft.phone = phone.to_owned();
        draft.blocked = blocked.iter().map(|c| c.to_string()).collect();
        draft.with_record(user, |r| ix.apply(seg, 0, r));
    }

    #[test]
    fn the_latest_user_record_wins_and_blocks_refuse() {
        let mut ix = MessageIndex::new();
        assert_eq!(ix.refusal("a", "c", false), None);
        assert_eq!(ix.refusal("a", "c", true), Some(Reason::UnknownRecipient));
        put_user(&mut ix, 1, "a", "+966500000000", &["c"]);
        assert_eq!(ix.refusal("a", "c", true), Some(Reason::RecipientOptedOut));
        assert_eq!(ix.refusal("a", "d", true), None);
        put_user(&mut ix, 2, "a", "", &[]);
        let e = ix.user("a").unwrap();
        assert_eq!((e.phone.as_deref(), e.blocked.len(), e.segment, e.first_seen_at_ms), (None, 0, 2, 20));
        assert_eq!(ix.refusal("a", "c", true), None, "unblocked");
        assert_eq!(ix.users_len(), 1);
    }

    #[test]
    fn unsettled_from_picks_one_senders_messages() {
        let mut ix = MessageIndex::new();
        for (seq, client) in [(0, "c"), (1, "d"), (2, "c")] {
            ix.apply(
                1,
                seq * 10,
                &Record::Accepted(Accepted {
                    seq,
                    client,
                    to: "u",
                    priority: Priority::Normal,
                    expires_at_ms: 0,
                    accepted_at_ms: 0,
                    body: b"x",
                }),
            );
        }
        status(&mut ix, 2, Status::Acked);
        assert_eq!(ix.unsettled_from("u", "c"), vec![0]);
        assert_eq!(ix.unsettled_from("u", "d"), vec![1]);
        assert!(ix.unsettled_from("v", "c").is_empty());
    }

    #[test]
    fn a_directory_entry_keeps_its_segment_until_carried_forward() {
        let mut ix = MessageIndex::new();
        accept(&mut ix, 1, 0, "a");
        put_user(&mut ix, 1, "a", "", &["c"]);
        put_user(&mut ix, 2, "b", "", &[]);
        status(&mut ix, 0, Status::Acked);
        assert!(ix.deletable_segments(3).is_empty(), "segment 1 holds a's entry");
        assert_eq!(ix.users_to_carry(3, 10).len(), 2, "both entries lie in the settled prefix");
        assert_eq!(ix.users_to_carry(2, 10).iter().map(|u| u.to_string()).collect::<Vec<_>>(), vec!["a"]);
        // Carried forward: the same entry journaled again in segment 3.
        let draft = ix.user("a").unwrap().draft();
        draft.with_record("a", |r| ix.apply(3, 0, r));
        assert_eq!(ix.deletable_segments(3), vec![1]);
        assert_eq!(ix.user("a").unwrap().blocked.len(), 1, "carrying keeps the blocks");
        ix.forget_segment(1);
        assert!(ix.user("a").unwrap().blocks("c"), "the entry outlives its old segment");
    }

    #[test]
    fn replay_slots_never_fill_a_large_gap_in_the_numbers() {
        let mut r = ReplayedExpiries::default();
        assert_eq!(r.insert(5, 1_000), Ok(None));
        assert_eq!(r.insert(6, 1_001), Ok(None));
        // Segments between were deleted: 60 M numbers with no message here.
        assert_eq!(r.insert(7, 60_000_000), Err(()));
        assert_eq!(r.slots.len(), 2);
        assert_eq!(r.insert(8, 1_002 + REPLAYED_EXPIRIES_GAP_MAX as u64), Ok(None));
        assert_eq!(r.into_keys(), vec![(5, 1_000), (6, 1_001), (8, 1_002 + REPLAYED_EXPIRIES_GAP_MAX as u64)]);
    }

    /// What recovery's replay mode may not change: the pending queues (and
    /// which users have any), the TTL index, the counters.
    fn replay_visible(ix: &MessageIndex) -> String {
        let mut users: Vec<&Rc<str>> = ix.pending.keys().collect();
        users.sort();
        let queues: Vec<(String, Vec<u64>)> =
            users.iter().map(|u| (u.to_string(), ix.pending_for(u).collect())).collect();
        let mut provider_ids: Vec<u64> = ix.provider_ids.keys().copied().collect();
        provider_ids.sort_unstable();
        assert!(provider_ids.iter().all(|seq| ix.get(*seq).is_some()), "a provider id outlived its message");
        format!(
            "pending {queues:?} messages {} provider ids {provider_ids:?} pending_messages {} unsettled {} expiries {:?} max_seq {:?}",
            ix.len(),
            ix.pending_messages(),
            ix.unsettled(),
            ix.expired(u64::MAX, usize::MAX),
            ix.max_seq()
        )
    }

    /// One record of [`replay_mode_builds_the_index_the_live_path_builds`]:
    /// (kind, message, user, priority or status, with a TTL).
    fn replay_op(ix: &mut MessageIndex, next: &mut u64, (kind, pick, user, which, ttl): (u8, u64, u8, u8, bool)) {
        let to = format!("u{user}");
        if kind > 3 && *next == 0 {
            return; // changes need a message
        }
        let seq = pick % (*next).max(1);
        let segment = 1 + *next / 8;
        match kind {
            0..=3 => {
                let priority = [Priority::High, Priority::Normal, Priority::Low][usize::from(which % 3)];
                let expires_at_ms = if ttl { 1_000 + (*next * 7) % 50 } else { 0 };
                let a = Accepted {
                    seq: *next,
                    client: "c",
                    to: &to,
                    priority,
                    expires_at_ms,
                    accepted_at_ms: *next,
                    body: b"x",
                };
                ix.apply(segment, *next * 10, &Record::Accepted(a));
                *next += 1;
            }
            4 | 5 => {
                let status =
                    [Status::Delivered, Status::Acked, Status::Expired, Status::Failed][usize::from(which % 4)];
                ix.apply(
                    segment,
                    0,
                    &Record::Status(StatusChange { seq, status, at_ms: 9, notify: ttl, reason: Reason::None }),
                );
            }
            6 => spilled(ix, segment, &[seq]),
            7 => {
                // A TTL other than the one it was accepted with, at times.
                let expires_at_ms = if ttl { 2_000 + seq % 3 } else { 0 };
                let a = Accepted {
                    seq,
                    client: "c",
                    to: &to,
                    priority: Priority::Normal,
                    expires_at_ms,
                    accepted_at_ms: seq,
                    body: b"x",
                };
                ix.apply(segment, seq * 10, &Record::Restored(a));
            }
            _ => {
                let step =
                    [FallbackStep::Planned, FallbackStep::Exhausted, FallbackStep::Replayed, FallbackStep::Delivered]
                        [usize::from(which % 4)];
                let change = FallbackChange {
                    seq,
                    step,
                    at_ms: 50,
                    channel: u8::from(step == FallbackStep::Delivered),
                    channels: 0,
                    attempts: 0,
                    when_ms: 10,
                    notify: false,
                    text: if step == FallbackStep::Delivered { "p" } else { "" },
                };
                ix.apply(segment, 0, &Record::Fallback(change));
            }
        }
    }

    proptest::proptest! {
        /// Recovery's replay mode (emptied queues kept until the end, the
        /// TTL index kept in slots and built at the end) leaves the index the
        /// live path leaves.
        #[test]
        fn replay_mode_builds_the_index_the_live_path_builds(
            ops in proptest::collection::vec((0u8..9, 0u64..64, 0u8..4, 0u8..4, proptest::bool::ANY), 1..120)
        ) {
            let (mut live, mut replayed) = (MessageIndex::new(), MessageIndex::new());
            replayed.begin_replay();
            let (mut next_live, mut next_replayed) = (0, 0);
            for op in ops {
                replay_op(&mut live, &mut next_live, op);
                replay_op(&mut replayed, &mut next_replayed, op);
            }
            replayed.end_replay();
            proptest::prop_assert_eq!(replay_visible(&replayed), replay_visible(&live));
        }
    }

    proptest::proptest! {
        /// Whatever the order of changes, each user's entry is its latest
        /// record, and no deletable segment holds an entry's latest record.
        #[test]
        fn latest_records_are_never_in_a_deletable_segment(
            ops in proptest::collection::vec((0u8..5, 0u64..3, proptest::bool::ANY), 1..60)
        ) {
            let mut ix = MessageIndex::new();
            let mut segment = 1;
            let mut latest = std::collections::HashMap::new();
            for (i, (user, advance, blocked)) in ops.into_iter().enumerate() {
                segment += advance;
                let user = format!("u{user}");
                let blocked: &[&str] = if blocked { &["c"] } else { &[] };
                put_user(&mut ix, segment, &user, &format!("+9665{i:08}"), blocked);
                latest.insert(user, (segment, blocked.len()));
                let carry = ix.users_to_carry(segment, 1000);
                for u in &carry {
                    proptest::prop_assert!(ix.user(u).unwrap().segment < segment);
                }
            }
            for (user, (seg, blocks)) in &latest {
                let e = ix.user(user).unwrap();
                proptest::prop_assert_eq!((e.segment, e.blocked.len()), (*seg, *blocks));
                proptest::prop_assert!(!ix.deletable_segments(segment + 1).contains(seg));
            }
            proptest::prop_assert_eq!(ix.users_len(), latest.len());
        }
    }
}
