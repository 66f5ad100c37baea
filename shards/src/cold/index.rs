//! The cold store's batch index: which messages each `put` wrote, so that a
//! message can be found by sequence number (status lookups, recovery) and
//! by expiry time without a key per message beside its `by_user` record.
//!
//! One `index` partition holds three kinds of key per batch (`id` is the
//! batch's first sequence number and a store-wide counter, both 8 bytes
//! big-endian: a name is never used twice, see `first_free_batch_n`):
//!
//! | key                          | value                                             |
//! |------------------------------|---------------------------------------------------|
//! | `S` ‖ id                     | its last seq (8) ‖ the ms of its `E` key (8, 0: none) |
//! | `B` ‖ id                     | count (4) ‖ entries by seq (seq, user hash, expires at ms: 8 each) ‖ CRC-32C (4) |
//! | `E` ‖ expires at ms (8) ‖ id | empty: the earliest expiry among its entries      |
//!
//! The index may mention messages that are gone (delivered, expired): every
//! answer is confirmed against `by_user`, which stays the truth. It must
//! never miss a message `by_user` holds: a batch's keys are written in the
//! same fjall batch as its records, and an entry leaves only once its record
//! is gone. A message restored and spilled again is in two batches; both
//! name the same user hash, so either answers for it.

use std::collections::HashSet;
use std::sync::atomic::Ordering;

use fjall::Batch;

use super::{be_u64, key16, ColdError, ColdStore};

const SPAN: u8 = b'S';
const ENTRIES: u8 = b'B';
const EXPIRY: u8 = b'E';

/// Bytes of one entry in a batch's `B` value.
const ENTRY_BYTES: usize = 24;

/// Batches one [`ColdStore::expired`] call looks at, at most: retiring one
/// reads up to 4,096 records' keys, and the call runs on the shard's
/// blocking thread every second.
const EXPIRY_BATCHES_PER_CALL: usize = 16;

/// Batches [`ColdStore::prune_index`] checks together (their entries'
/// lookups sorted as one): 64 x 4,096 x 24 B, about 6 MiB at most.
const PRUNE_GROUP_BATCHES: usize = 64;

/// One message as the index knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Entry {
    pub(super) seq: u64,
    pub(super) user_hash: u64,
    pub(super) expires_at_ms: u64,
}

/// A batch's name: its first sequence number when written, and a counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct BatchId {
    first_seq: u64,
    n: u64,
}

/// A batch's `S` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    last_seq: u64,
    expiry_ms: u64,
}

fn id_key(kind: u8, id: BatchId) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[0] = kind;
    k[1..].copy_from_slice(&key16(id.first_seq, id.n));
    k
}

fn expiry_key(ms: u64, id: BatchId) -> [u8; 25] {
    let mut k = [0u8; 25];
    k[0] = EXPIRY;
    k[1..9].copy_from_slice(&ms.to_be_bytes());
    k[9..].copy_from_slice(&key16(id.first_seq, id.n));
    k
}

/// The counter for the next batch's name: above every name in use, so a
/// name is never used twice (one removed before a restart, whose keys fjall
/// could bring back, is shadowed by the newer batch's keys).
pub(super) fn first_free_batch_n(index: &fjall::PartitionHandle) -> Result<u64, ColdError> {
    let mut next = 0;
    for kv in index.range(&[SPAN][..]..&[SPAN + 1][..]) {
        let (k, _) = kv?;
        next = next.max(parse_span_key(&k)?.n.saturating_add(1));
    }
    Ok(next)
}

fn damaged(id: BatchId, why: &'static str) -> ColdError {
    ColdError::Damaged { seq: id.first_seq, why }
}

fn parse_id(bytes: &[u8]) -> Option<BatchId> {
    Some(BatchId { first_seq: be_u64(bytes)?, n: be_u64(bytes.get(8..)?)? })
}

fn parse_span_key(k: &[u8]) -> Result<BatchId, ColdError> {
    match k.len() {
        17 => parse_id(&k[1..]),
        _ => None,
    }
    .ok_or(ColdError::Damaged { seq: 0, why: "batch index: bad span key" })
}

fn parse_expiry_key(k: &[u8]) -> Result<(u64, BatchId), ColdError> {
    match k.len() {
        25 => be_u64(&k[1..]).zip(parse_id(&k[9..])),
        _ => None,
    }
    .ok_or(ColdError::Damaged { seq: 0, why: "batch index: bad expiry key" })
}

impl Span {
    fn encode(&self) -> [u8; 16] {
        key16(self.last_seq, self.expiry_ms)
    }

    fn decode(id: BatchId, v: &[u8]) -> Result<Self, ColdError> {
        match (v.len(), be_u64(v), v.get(8..).and_then(be_u64)) {
            (16, Some(last_seq), Some(expiry_ms)) => Ok(Self { last_seq, expiry_ms }),
            _ => Err(damaged(id, "batch index: bad span")),
        }
    }
}

/// The earliest expiry among `entries` that expire (0: none does).
fn min_expiry(entries: &[Entry]) -> u64 {
    entries.iter().map(|e| e.expires_at_ms).filter(|&ms| ms > 0).min().unwrap_or(0)
}

fn encode_entries(entries: &[Entry]) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + entries.len() * ENTRY_BYTES);
    v.extend_from_slice(&(entries.len() as u32).to_be_bytes());
    for e in entries {
        v.extend_from_slice(&e.seq.to_be_bytes());
        v.extend_from_slice(&e.user_hash.to_be_bytes());
        v.extend_from_slice(&e.expires_at_ms.to_be_bytes());
    }
    let crc = crc32c::crc32c(&v);
    v.extend_from_slice(&crc.to_be_bytes());
    v
}

/// A `B` value, checked: length, CRC, entries in sequence order from the
/// batch's first sequence number on. Anything else is `Damaged`, never a
/// wrong answer.
fn decode_entries(id: BatchId, v: &[u8]) -> Result<Vec<Entry>, ColdError> {
    let (body, crc) = v.split_at_checked(v.len().saturating_sub(4)).ok_or(damaged(id, "batch index: short"))?;
    let count = body.get(..4).map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize);
    if v.len() < 8 || count.map(|c| 4 + c * ENTRY_BYTES) != Some(body.len()) {
        return Err(damaged(id, "batch index: bad length"));
    }
    if crc32c::crc32c(body).to_be_bytes() != crc {
        return Err(damaged(id, "batch index: bad checksum"));
    }
    let mut entries = Vec::with_capacity(body.len() / ENTRY_BYTES);
    let mut previous = id.first_seq;
    for e in body[4..].chunks_exact(ENTRY_BYTES) {
        let entry = Entry { seq: key_part(e, 0), user_hash: key_part(e, 8), expires_at_ms: key_part(e, 16) };
        if entry.seq < previous {
            return Err(damaged(id, "batch index: entries out of order"));
        }
        previous = entry.seq;
        entries.push(entry);
    }
    Ok(entries)
}

/// The u64 at `at` of a chunk known to be long enough.
fn key_part(chunk: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&chunk[at..at + 8]);
    u64::from_be_bytes(b)
}

impl ColdStore {
    /// Adds the index keys of a new batch of `entries` (sorted by sequence
    /// number) to `batch`, under a name never used before.
    pub(super) fn add_batch_index(&self, batch: &mut Batch, entries: &[Entry]) {
        let Some(first) = entries.first() else { return };
        let id = BatchId { first_seq: first.seq, n: self.next_batch.fetch_add(1, Ordering::Relaxed) };
        self.write_batch_index(batch, id, entries);
    }

    fn write_batch_index(&self, batch: &mut Batch, id: BatchId, entries: &[Entry]) {
        let last_seq = entries.last().map_or(id.first_seq, |e| e.seq);
        let expiry_ms = min_expiry(entries);
        batch.insert(&self.index, id_key(ENTRIES, id), encode_entries(entries));
        batch.insert(&self.index, id_key(SPAN, id), Span { last_seq, expiry_ms }.encode());
        if expiry_ms > 0 {
            batch.insert(&self.index, expiry_key(expiry_ms, id), []);
        }
    }

    /// Replaces batch `id`'s index by one of `live` only (none: the batch's
    /// keys go). The caller advances the GC watermark after the commit
    /// (keys are removed or overwritten). A rewrite from a stale read only
    /// puts back entries that were live when read: a batch's live messages
    /// only ever leave it (one spilled again goes into a new batch), and
    /// names are never reused, so nothing is missed.
    fn rewrite_batch_index(&self, batch: &mut Batch, id: BatchId, span: Span, live: &[Entry]) {
        let expiry_ms = min_expiry(live);
        if span.expiry_ms > 0 && (live.is_empty() || span.expiry_ms != expiry_ms) {
            batch.remove(&self.index, expiry_key(span.expiry_ms, id));
        }
        if live.is_empty() {
            batch.remove(&self.index, id_key(SPAN, id));
            batch.remove(&self.index, id_key(ENTRIES, id));
        } else {
            self.write_batch_index(batch, id, live);
        }
    }

    fn read_span(&self, id: BatchId) -> Result<Option<Span>, ColdError> {
        self.index.get(id_key(SPAN, id))?.map(|v| Span::decode(id, &v)).transpose()
    }

    /// A batch's entries; none when its `B` key is gone. Both go in one
    /// fjall batch, so only fjall's GC hazard (`advance_gc_watermark`) can
    /// bring back an `S` key without its `B`, and only the keys of a batch
    /// removed for having no live message: nothing is missed, and the
    /// batch is removed again as an empty one.
    fn read_entries(&self, id: BatchId) -> Result<Vec<Entry>, ColdError> {
        match self.index.get(id_key(ENTRIES, id))? {
            Some(v) => decode_entries(id, &v),
            None => Ok(Vec::new()),
        }
    }

    /// The sequence numbers among `entries` whose record `by_user` still
    /// holds. Looked up in `by_user`'s key order: consecutive lookups then
    /// share its blocks (one block read per lookup, at random, was most of
    /// the pruning's cost).
    fn live_seqs<'a>(&self, entries: impl Iterator<Item = &'a Entry>) -> Result<HashSet<u64>, ColdError> {
        let mut order: Vec<(u64, u64)> = entries.map(|e| (e.user_hash, e.seq)).collect();
        order.sort_unstable();
        order.dedup();
        let mut live = HashSet::with_capacity(order.len());
        for (user_hash, seq) in order {
            if self.by_user.contains_key(key16(user_hash, seq))? {
                live.insert(seq);
            }
        }
        Ok(live)
    }

    /// The index entry of message `seq`, if a batch mentions it (its record
    /// may be gone: confirm with `by_user`). Walks the batches that start at
    /// or below `seq`, newest first, reading the entries of those whose
    /// span reaches `seq`; `cache` keeps the last batch read, for callers
    /// that look up many sequence numbers.
    pub(super) fn locate(
        &self,
        seq: u64,
        cache: &mut Option<(BatchId, Vec<Entry>)>,
    ) -> Result<Option<Entry>, ColdError> {
        let to = id_key(SPAN, BatchId { first_seq: seq, n: u64::MAX });
        for kv in self.index.range(&[SPAN][..]..=&to[..]).rev() {
            let (k, v) = kv?;
            let id = parse_span_key(&k)?;
            if Span::decode(id, &v)?.last_seq < seq {
                continue;
            }
            if cache.as_ref().is_none_or(|(cached, _)| *cached != id) {
                *cache = Some((id, self.read_entries(id)?));
            }
            let entries = cache.as_ref().map_or(&[][..], |(_, e)| e.as_slice());
            if let Ok(i) = entries.binary_search_by_key(&seq, |e| e.seq) {
                return Ok(Some(entries[i]));
            }
        }
        Ok(None)
    }

    /// Up to `max` live entries due at `now_ms` (0 < expires <= now), with
    /// their records, oldest batch expiry first. Due entries found gone
    /// leave their batch; a batch whose due entries are all gone is retired
    /// on the way: its `E` key moves to the earliest expiry of its entries
    /// not yet due, and a batch with none left goes.
    pub(super) fn due(&self, now_ms: u64, max: usize) -> Result<Vec<(Entry, fjall::UserValue)>, ColdError> {
        let mut due = Vec::new();
        let keys: Vec<_> = self
            .index
            .range(
                expiry_key(0, BatchId { first_seq: 0, n: 0 })
                    ..=expiry_key(now_ms, BatchId { first_seq: u64::MAX, n: u64::MAX }),
            )
            .take(EXPIRY_BATCHES_PER_CALL)
            .map(|kv| kv.map_err(ColdError::from).and_then(|(k, _)| parse_expiry_key(&k)))
            .collect::<Result<_, _>>()?;
        let mut retired = false;
        // A message spilled twice is in two batches: once in the answer.
        let mut seen = HashSet::new();
        for (ms, id) in keys {
            if due.len() >= max {
                break;
            }
            retired |= self.batch_due(now_ms, max, (ms, id), &mut seen, &mut due)?;
        }
        if retired {
            self.advance_gc_watermark();
        }
        Ok(due)
    }

    /// [`ColdStore::due`] for one batch; true if it retired it.
    fn batch_due(
        &self,
        now_ms: u64,
        max: usize,
        (ms, id): (u64, BatchId),
        seen: &mut HashSet<u64>,
        due: &mut Vec<(Entry, fjall::UserValue)>,
    ) -> Result<bool, ColdError> {
        let mut batch = self.keyspace.batch();
        let span = match self.read_span(id)? {
            Some(span) if span.expiry_ms == ms => span,
            // A leftover of a batch retired or rewritten meanwhile.
            _ => {
                batch.remove(&self.index, expiry_key(ms, id));
                batch.commit()?;
                return Ok(true);
            }
        };
        let entries = self.read_entries(id)?;
        let is_due = |e: &Entry| e.expires_at_ms > 0 && e.expires_at_ms <= now_ms;
        // In `by_user`'s key order, as in `live_seqs`.
        let mut candidates: Vec<&Entry> = entries.iter().filter(|e| is_due(e)).collect();
        candidates.sort_unstable_by_key(|e| (e.user_hash, e.seq));
        let mut gone = Vec::new();
        let mut any_live = false;
        let before = due.len();
        for e in candidates {
            if due.len() >= max {
                break;
            }
            match self.by_user.get(key16(e.user_hash, e.seq))? {
                Some(record) => {
                    any_live = true;
                    if seen.insert(e.seq) {
                        due.push((*e, record));
                    }
                }
                None => gone.push(e.seq),
            }
        }
        due[before..].sort_unstable_by_key(|(e, _)| e.seq);
        gone.sort_unstable();
        if any_live && gone.is_empty() {
            // The caller restores and removes them; a later call retires it.
            return Ok(false);
        }
        // Only entries found gone leave: the others are not looked up
        // (a lookup per message, for messages mostly delivered long ago,
        // costs more than the spill saved); they leave at their own expiry
        // or at the next compaction. With a due entry live, the `E` key
        // stays at or before now and the next call comes back.
        let keep: Vec<Entry> = entries
            .iter()
            .filter(|e| gone.binary_search(&e.seq).is_err() && (any_live || !is_due(e)))
            .copied()
            .collect();
        self.rewrite_batch_index(&mut batch, id, span, &keep);
        batch.commit()?;
        Ok(true)
    }

    /// Drops from the index what `by_user` no longer holds: batches with no
    /// live message go, the others keep only their live entries. Reads the
    /// key of every indexed message; runs with [`ColdStore::compact`].
    /// Returns how many batches it rewrote or removed.
    pub(super) fn prune_index(&self) -> Result<usize, ColdError> {
        let ids: Vec<BatchId> = self
            .index
            .range(&[SPAN][..]..&[SPAN + 1][..])
            .map(|kv| kv.map_err(ColdError::from).and_then(|(k, _)| parse_span_key(&k)))
            .collect::<Result<_, _>>()?;
        let mut changed = 0;
        for group in ids.chunks(PRUNE_GROUP_BATCHES) {
            let mut batches = Vec::with_capacity(group.len());
            for &id in group {
                if let Some(span) = self.read_span(id)? {
                    batches.push((id, span, self.read_entries(id)?));
                }
            }
            let live = self.live_seqs(batches.iter().flat_map(|(_, _, entries)| entries))?;
            for (id, span, entries) in batches {
                let keep: Vec<Entry> = entries.iter().filter(|e| live.contains(&e.seq)).copied().collect();
                if keep.len() < entries.len() {
                    let mut batch = self.keyspace.batch();
                    self.rewrite_batch_index(&mut batch, id, span, &keep);
                    batch.commit()?;
                    changed += 1;
                }
            }
        }
        if changed > 0 {
            self.advance_gc_watermark();
        }
        Ok(changed)
    }

    /// Index keys by kind (tests): spans, entry lists, expiry keys.
    #[cfg(test)]
    pub(super) fn index_counts(&self) -> (usize, usize, usize) {
        let count = |kind: u8| self.index.prefix([kind]).count();
        (count(SPAN), count(ENTRIES), count(EXPIRY))
    }

    /// The ms of every expiry key (tests).
    #[cfg(test)]
    pub(super) fn expiry_keys(&self) -> Vec<u64> {
        self.index.prefix([EXPIRY]).map(|kv| parse_expiry_key(&kv.unwrap().0).unwrap().0).collect()
    }

    /// Flips a bit in every `B` value (tests of damage).
    #[cfg(test)]
    pub(super) fn damage_index(&self) {
        let keys: Vec<_> = self.index.prefix([ENTRIES]).map(|kv| kv.unwrap()).collect();
        for (k, v) in keys {
            let mut v = v.to_vec();
            v[10] ^= 1;
            self.index.insert(k, v).unwrap();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_damage_is_caught() {
        let id = BatchId { first_seq: 10, n: 0 };
        let entries: Vec<Entry> =
            (10..20).map(|seq| Entry { seq, user_hash: seq * 7, expires_at_ms: seq % 3 }).collect();
        let v = encode_entries(&entries);
        assert_eq!(decode_entries(id, &v).unwrap(), entries);
        for at in 0..v.len() {
            let mut bad = v.clone();
            bad[at] ^= 0x10;
            assert!(matches!(decode_entries(id, &bad), Err(ColdError::Damaged { seq: 10, .. })), "byte {at}");
        }
        assert!(decode_entries(id, &v[..v.len() - 1]).is_err());
        assert!(decode_entries(id, &[]).is_err());
        assert!(decode_entries(BatchId { first_seq: 11, n: 0 }, &v).is_err(), "an entry below the first seq");
        assert_eq!(min_expiry(&entries), 1);
    }
}
