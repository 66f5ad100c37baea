//! The cold store: pending messages of users who are not connected, on
//! disk, out of the journal and out of memory (docs/ARCHITECTURE.md,
//! "Offline backlog").
//!
//! One LSM tree (`fjall`) per shard, in `shard-N/cold/`, with three
//! partitions:
//!
//! | partition | key                              | value                        |
//! |-----------|----------------------------------|------------------------------|
//! | `by_user` | user hash (8, BE) ‖ seq (8, BE)  | the encoded `Accepted` record |
//! | `by_seq`  | seq (8, BE)                      | user hash (8, BE)            |
//! | `expiry`  | expires at ms (8, BE) ‖ seq (8)  | user hash (8, BE)            |
//!
//! A user's backlog is one prefix scan of `by_user`, in acceptance order;
//! `by_seq` answers "is this message cold?" (status lookups, recovery);
//! `expiry` is scanned by time. The value carries the record whole, with
//! its CRC, so a restore checks it like the journal does and a hash
//! collision between two users is caught by the record's `to`.
//!
//! Every call blocks (fjall does file I/O with std): the shard runs them on
//! its blocking thread (`glommio::executor().spawn_blocking`), never on the
//! executor. The store's own fsync happens in [`ColdStore::put`] only: a
//! message is journaled as spilled after its cold copy is durable, and the
//! removals that follow a restore are made durable by [`ColdStore::persist`]
//! before the journal segment that restored them may be deleted.

use std::path::Path;

use fjall::{Config, Keyspace, PartitionCreateOptions, PartitionHandle, PersistMode};

use crate::record::{self, Decoded, Record};

/// Hash of a user id for the cold store's keys (seahash with a fixed seed
/// different from routing's, so the keys do not follow the shard choice).
pub fn user_hash(user: &str) -> u64 {
    seahash::hash_seeded(user.as_bytes(), 0x636f_6c64, 0x7573_6572, 0x6b65_7973, 0x6573_6833)
}

/// A failure of the cold store (the disk, or fjall's own checks).
#[derive(Debug, thiserror::Error)]
pub enum ColdError {
    /// fjall failed (I/O, corruption it detected, poisoned after a failed fsync).
    #[error("cold store: {0}")]
    Store(#[from] fjall::Error),
    /// fjall failed at the LSM-tree level.
    #[error("cold store: {0}")]
    Tree(#[from] fjall::LsmError),
    /// A value that does not decode as the record it must hold.
    #[error("cold store: damaged record for message {seq}: {why}")]
    Damaged {
        /// Its sequence number.
        seq: u64,
        /// What was wrong.
        why: &'static str,
    },
}

/// One message to move into the cold store.
#[derive(Debug, Clone)]
pub struct ColdPut {
    /// Its sequence number.
    pub seq: u64,
    /// [`user_hash`] of its recipient.
    pub user_hash: u64,
    /// Unix ms it expires (0: never).
    pub expires_at_ms: u64,
    /// Its record, encoded (`record::encode` of a `Record::Accepted`).
    pub record: Vec<u8>,
}

/// Where a cold message's entries are: enough to remove them without a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ColdKey {
    /// Its sequence number.
    pub seq: u64,
    /// [`user_hash`] of its recipient.
    pub user_hash: u64,
    /// Unix ms it expires (0: never).
    pub expires_at_ms: u64,
}

impl ColdPut {
    /// Its key.
    pub fn key(&self) -> ColdKey {
        ColdKey { seq: self.seq, user_hash: self.user_hash, expires_at_ms: self.expires_at_ms }
    }
}

/// One message read back from the cold store.
#[derive(Debug, Clone)]
pub struct ColdMessage {
    /// Its sequence number.
    pub seq: u64,
    /// [`user_hash`] of its recipient.
    pub user_hash: u64,
    /// Unix ms it expires (0: never).
    pub expires_at_ms: u64,
    /// Its encoded `Accepted` record ([`ColdMessage::accepted`] decodes it).
    pub record: Vec<u8>,
}

impl ColdMessage {
    /// Its key.
    pub fn key(&self) -> ColdKey {
        ColdKey { seq: self.seq, user_hash: self.user_hash, expires_at_ms: self.expires_at_ms }
    }

    /// The record, decoded and checked (CRC, kind, sequence number).
    pub fn accepted(&self) -> Result<record::Accepted<'_>, ColdError> {
        match record::decode(&self.record) {
            Decoded::Record { record: Record::Accepted(a), bytes }
                if bytes == self.record.len() && a.seq == self.seq =>
            {
                Ok(a)
            }
            Decoded::Record { .. } => Err(ColdError::Damaged { seq: self.seq, why: "not its accepted record" }),
            Decoded::End => Err(ColdError::Damaged { seq: self.seq, why: "empty" }),
            Decoded::Invalid(why) => Err(ColdError::Damaged { seq: self.seq, why }),
        }
    }
}

/// Sizes of the store's memory (fjall's caches), per shard.
#[derive(Debug, Clone, Copy)]
pub struct ColdSizing {
    /// Block cache bytes.
    pub cache_bytes: u64,
    /// Write buffer (memtables) bytes, all partitions together.
    pub write_buffer_bytes: u64,
}

impl Default for ColdSizing {
    fn default() -> Self {
        Self { cache_bytes: 8 << 20, write_buffer_bytes: 32 << 20 }
    }
}

/// Snapshots opened and closed to advance fjall's garbage-collection
/// watermark (see [`ColdStore::advance_gc_watermark`]).
const GC_PUMP_SNAPSHOTS: usize = 50;

/// One shard's cold store. Cheap to clone (handles); every method blocks.
#[derive(Clone)]
pub struct ColdStore {
    keyspace: Keyspace,
    by_user: PartitionHandle,
    by_seq: PartitionHandle,
    expiry: PartitionHandle,
}

impl std::fmt::Debug for ColdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ColdStore").finish_non_exhaustive()
    }
}

fn key16(a: u64, b: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&a.to_be_bytes());
    k[8..].copy_from_slice(&b.to_be_bytes());
    k
}

fn be_u64(b: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(..8)?.try_into().ok()?))
}

impl ColdStore {
    /// Opens (or creates) the store in `dir`, recovering fjall's own journal.
    pub fn open(dir: &Path, sizing: ColdSizing) -> Result<Self, ColdError> {
        let keyspace = Config::new(dir)
            .flush_workers(1)
            .compaction_workers(1)
            .cache_size(sizing.cache_bytes)
            .max_write_buffer_size(sizing.write_buffer_bytes)
            // What fjall replays at open (its journal) stays near the write
            // buffers, so a restart's cost does not grow with the backlog.
            .max_journaling_size((sizing.write_buffer_bytes * 2).max(64 << 20))
            .manual_journal_persist(true)
            .open()?;
        let memtable = (sizing.write_buffer_bytes / 4).clamp(1 << 20, u32::MAX as u64) as u32;
        let options = || PartitionCreateOptions::default().manual_journal_persist(true).max_memtable_size(memtable);
        // `by_user` and `expiry` are only read by ranges: no bloom filters,
        // whose memory would grow with the backlog (10 bits a key).
        let by_user = keyspace.open_partition("by_user", options().bloom_filter_bits(None))?;
        let by_seq = keyspace.open_partition("by_seq", options())?;
        let expiry = keyspace.open_partition("expiry", options().bloom_filter_bits(None))?;
        Ok(Self { keyspace, by_user, by_seq, expiry })
    }

    /// Writes `messages` and makes them durable (fdatasync of fjall's
    /// journal) before returning: only then may the journal forget them.
    pub fn put(&self, messages: &[ColdPut]) -> Result<(), ColdError> {
        let mut batch = self.keyspace.batch();
        // In key order per partition: consecutive memtable inserts then
        // walk the same skip-list path, which stays in the CPU's caches
        // (the skip-list search was most of the spill's cost).
        let mut order: Vec<&ColdPut> = messages.iter().collect();
        order.sort_unstable_by_key(|m| (m.user_hash, m.seq));
        for m in &order {
            batch.insert(&self.by_user, key16(m.user_hash, m.seq), m.record.as_slice());
        }
        order.sort_unstable_by_key(|m| m.seq);
        for m in &order {
            batch.insert(&self.by_seq, m.seq.to_be_bytes(), m.user_hash.to_be_bytes());
        }
        order.sort_unstable_by_key(|m| (m.expires_at_ms, m.seq));
        for m in order.iter().filter(|m| m.expires_at_ms > 0) {
            batch.insert(&self.expiry, key16(m.expires_at_ms, m.seq), m.user_hash.to_be_bytes());
        }
        batch.commit()?;
        self.keyspace.persist(PersistMode::SyncData)?;
        Ok(())
    }

    /// Up to `max` messages of the user with hash `user_hash` and sequence
    /// number above `after` (all if None), in sequence order. Messages of
    /// another user with the same hash come too: compare the record's `to`.
    pub fn user_messages(&self, user_hash: u64, after: Option<u64>, max: usize) -> Result<Vec<ColdMessage>, ColdError> {
        let from = key16(user_hash, after.map_or(0, |a| a.saturating_add(1)));
        let to = key16(user_hash, u64::MAX);
        if after == Some(u64::MAX) {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for kv in self.by_user.range(from..=to).take(max) {
            let (k, v) = kv?;
            let seq = be_u64(&k[8..]).ok_or(ColdError::Damaged { seq: 0, why: "short key" })?;
            out.push(ColdMessage { seq, user_hash, expires_at_ms: 0, record: v.to_vec() });
        }
        for m in &mut out {
            m.expires_at_ms = m.accepted()?.expires_at_ms;
        }
        Ok(out)
    }

    /// Every cold message, by user hash then sequence number (tools).
    pub fn all(&self) -> impl Iterator<Item = Result<ColdMessage, ColdError>> + '_ {
        self.by_user.iter().map(|kv| {
            let (k, v) = kv?;
            let user_hash = be_u64(&k).ok_or(ColdError::Damaged { seq: 0, why: "short key" })?;
            let seq = be_u64(&k[8..]).ok_or(ColdError::Damaged { seq: 0, why: "short key" })?;
            let mut m = ColdMessage { seq, user_hash, expires_at_ms: 0, record: v.to_vec() };
            m.expires_at_ms = m.accepted()?.expires_at_ms;
            Ok(m)
        })
    }

    /// The message with sequence number `seq`, if it is cold.
    pub fn get(&self, seq: u64) -> Result<Option<ColdMessage>, ColdError> {
        let Some(hash) = self.by_seq.get(seq.to_be_bytes())? else { return Ok(None) };
        let user_hash = be_u64(&hash).ok_or(ColdError::Damaged { seq, why: "short user hash" })?;
        let Some(v) = self.by_user.get(key16(user_hash, seq))? else { return Ok(None) };
        let mut m = ColdMessage { seq, user_hash, expires_at_ms: 0, record: v.to_vec() };
        m.expires_at_ms = m.accepted()?.expires_at_ms;
        Ok(Some(m))
    }

    /// Up to `max` cold messages whose TTL passed at `now_ms`, oldest first.
    pub fn expired(&self, now_ms: u64, max: usize) -> Result<Vec<ColdMessage>, ColdError> {
        let mut out = Vec::new();
        for kv in self.expiry.range(key16(0, 0)..=key16(now_ms, u64::MAX)).take(max) {
            let (k, v) = kv?;
            let seq = be_u64(&k[8..]).ok_or(ColdError::Damaged { seq: 0, why: "short key" })?;
            let user_hash = be_u64(&v).ok_or(ColdError::Damaged { seq, why: "short user hash" })?;
            match self.by_user.get(key16(user_hash, seq))? {
                Some(v) => {
                    let mut m = ColdMessage { seq, user_hash, expires_at_ms: 0, record: v.to_vec() };
                    m.expires_at_ms = m.accepted()?.expires_at_ms;
                    out.push(m);
                }
                // Restored and removed, its expiry entry's removal still in flight.
                None => {
                    self.expiry.remove(k)?;
                    self.advance_gc_watermark();
                }
            }
        }
        Ok(out)
    }

    /// Removes messages (restored into the journal, or found stale), without
    /// waiting for the disk: [`ColdStore::persist`] does, before the journal
    /// segment that restored them is deleted. Unknown sequence numbers are
    /// skipped.
    pub fn remove(&self, seqs: &[u64]) -> Result<usize, ColdError> {
        let mut batch = self.keyspace.batch();
        let mut removed = 0;
        for &seq in seqs {
            let Some(hash) = self.by_seq.get(seq.to_be_bytes())? else { continue };
            let user_hash = be_u64(&hash).ok_or(ColdError::Damaged { seq, why: "short user hash" })?;
            if let Some(v) = self.by_user.get(key16(user_hash, seq))? {
                let m = ColdMessage { seq, user_hash, expires_at_ms: 0, record: v.to_vec() };
                if let Ok(a) = m.accepted() {
                    if a.expires_at_ms > 0 {
                        batch.remove(&self.expiry, key16(a.expires_at_ms, seq));
                    }
                }
                batch.remove(&self.by_user, key16(user_hash, seq));
            }
            batch.remove(&self.by_seq, seq.to_be_bytes());
            removed += 1;
        }
        batch.commit()?;
        self.advance_gc_watermark();
        Ok(removed)
    }

    /// Rewrites the store without what was removed: flushes each
    /// partition's memtable and runs a major compaction, so the bytes of
    /// removed messages (and their tombstones) leave the disk. Long: run it
    /// off the shard's blocking thread. Uses fjall's `major_compact` and
    /// `rotate_memtable_and_wait`, public but hidden from its docs: pinned
    /// to fjall 2.11 (docs/ARCHITECTURE.md, "Offline backlog").
    pub fn compact(&self) -> Result<(), ColdError> {
        self.advance_gc_watermark();
        for p in [&self.by_user, &self.by_seq, &self.expiry] {
            p.rotate_memtable_and_wait()?;
            p.major_compact()?;
        }
        Ok(())
    }

    /// Moves fjall's garbage-collection watermark up to now.
    ///
    /// fjall 2.11 (lsm-tree 2.10) advances the seqno below which old
    /// versions may be dropped only when snapshots close (every 50th close),
    /// and a compaction into the last level drops tombstones regardless.
    /// A store that never opens snapshots keeps the watermark at 0, so a
    /// removed key's old value survives the compaction that drops its
    /// tombstone: the removed message comes back (a unit test below shows
    /// it). Opening and closing 50 snapshots right after each removal moves
    /// the watermark past it before any flush can carry the tombstone to a
    /// compaction.
    fn advance_gc_watermark(&self) {
        for _ in 0..GC_PUMP_SNAPSHOTS {
            drop(self.by_seq.snapshot());
        }
    }

    /// Removes messages whose keys the caller knows (it just read or wrote
    /// them): no lookups, unlike [`ColdStore::remove`]. Not durable until
    /// [`ColdStore::persist`].
    pub fn remove_known(&self, keys: &[ColdKey]) -> Result<(), ColdError> {
        let mut batch = self.keyspace.batch();
        // In key order per partition, as in `put`.
        let mut order: Vec<&ColdKey> = keys.iter().collect();
        order.sort_unstable_by_key(|k| (k.user_hash, k.seq));
        for k in &order {
            batch.remove(&self.by_user, key16(k.user_hash, k.seq));
        }
        order.sort_unstable_by_key(|k| k.seq);
        for k in &order {
            batch.remove(&self.by_seq, k.seq.to_be_bytes());
        }
        order.sort_unstable_by_key(|k| (k.expires_at_ms, k.seq));
        for k in order.iter().filter(|k| k.expires_at_ms > 0) {
            batch.remove(&self.expiry, key16(k.expires_at_ms, k.seq));
        }
        batch.commit()?;
        self.advance_gc_watermark();
        Ok(())
    }

    /// Makes every write and removal so far durable.
    pub fn persist(&self) -> Result<(), ColdError> {
        self.keyspace.persist(PersistMode::SyncData)?;
        Ok(())
    }

    /// About how many messages are cold (fjall's estimate: cheap, may
    /// count removed ones until compaction).
    pub fn approximate_len(&self) -> usize {
        self.by_seq.approximate_len()
    }

    /// Exact count of cold messages (a full scan of `by_seq`: tests and tools).
    pub fn len(&self) -> Result<usize, ColdError> {
        Ok(self.by_seq.len()?)
    }

    /// True when no message is cold (exact).
    pub fn is_empty(&self) -> Result<bool, ColdError> {
        Ok(self.by_seq.is_empty()?)
    }

    /// Bytes the store takes on disk (journal and tables).
    pub fn disk_bytes(&self) -> u64 {
        self.keyspace.disk_space()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Accepted;
    use crate::Priority;

    fn put(seq: u64, to: &str, expires_at_ms: u64) -> ColdPut {
        let mut record = Vec::new();
        let body = format!("body {seq}");
        let a = Accepted {
            seq,
            client: "c",
            to,
            priority: Priority::Normal,
            expires_at_ms,
            accepted_at_ms: seq,
            body: body.as_bytes(),
        };
        record::encode(&Record::Accepted(a), &mut record);
        ColdPut { seq, user_hash: user_hash(to), expires_at_ms, record }
    }

    #[test]
    fn a_users_messages_come_back_in_order_in_pages_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = ColdStore::open(dir.path(), ColdSizing::default()).unwrap();
            let puts: Vec<_> = (0..100).map(|s| put(s, if s % 2 == 0 { "a" } else { "b" }, 0)).collect();
            store.put(&puts).unwrap();
        }
        let store = ColdStore::open(dir.path(), ColdSizing::default()).unwrap();
        let first = store.user_messages(user_hash("a"), None, 10).unwrap();
        assert_eq!(first.iter().map(|m| m.seq).collect::<Vec<_>>(), (0..20).step_by(2).collect::<Vec<_>>());
        let next = store.user_messages(user_hash("a"), Some(18), 1000).unwrap();
        assert_eq!(next.len(), 40);
        assert_eq!(next[0].accepted().unwrap().body, b"body 20");
        assert_eq!(store.len().unwrap(), 100);
        assert_eq!(store.get(33).unwrap().unwrap().accepted().unwrap().to, "b");
        assert!(store.get(1000).unwrap().is_none());
    }

    #[test]
    fn removal_and_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let store = ColdStore::open(dir.path(), ColdSizing::default()).unwrap();
        store.put(&[put(1, "a", 50), put(2, "a", 0), put(3, "a", 70), put(4, "b", 60)]).unwrap();
        assert_eq!(store.expired(65, 10).unwrap().iter().map(|m| m.seq).collect::<Vec<_>>(), vec![1, 4]);
        assert_eq!(store.remove(&[1, 99]).unwrap(), 1);
        store.remove_known(&[put(2, "a", 0).key()]).unwrap();
        store.persist().unwrap();
        store.compact().unwrap();
        let sizes = |s: &ColdStore| (s.by_user.len().unwrap(), s.by_seq.len().unwrap(), s.expiry.len().unwrap());
        assert_eq!(sizes(&store), (2, 2, 2), "a compaction never brings removed messages back");
        assert_eq!(store.expired(1000, 10).unwrap().iter().map(|m| m.seq).collect::<Vec<_>>(), vec![4, 3]);
        assert_eq!(
            store.user_messages(user_hash("a"), None, 10).unwrap().iter().map(|m| m.seq).collect::<Vec<_>>(),
            vec![3]
        );
        assert_eq!(store.len().unwrap(), 2);
    }

    #[test]
    fn most_removed_then_compacted_leaves_exactly_the_rest_across_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = ColdStore::open(dir.path(), ColdSizing::default()).unwrap();
            for chunk in (0..10_000u64).collect::<Vec<_>>().chunks(1000) {
                let puts: Vec<_> = chunk.iter().map(|&s| put(s, &format!("u{}", s % 97), s)).collect();
                store.put(&puts).unwrap();
            }
            let gone: Vec<u64> = (0..10_000).filter(|s| s % 10 != 0).collect();
            for chunk in gone.chunks(500) {
                store.remove(chunk).unwrap();
            }
            store.persist().unwrap();
            store.compact().unwrap();
            assert_eq!(store.len().unwrap(), 1000);
        }
        let store = ColdStore::open(dir.path(), ColdSizing::default()).unwrap();
        assert_eq!(store.len().unwrap(), 1000);
        assert!(store.all().all(|m| m.unwrap().seq % 10 == 0));
        assert_eq!(store.expired(u64::MAX, 100_000).unwrap().len(), 999, "seq 0 never expires");
    }

    /// The hazard `advance_gc_watermark` works around, shown on fjall
    /// itself: without snapshots, a compaction brings a removed key back.
    /// If this fails after an upgrade, fjall fixed it and the pump can go.
    #[test]
    fn fjall_without_snapshots_brings_a_removed_key_back_on_compaction() {
        let dir = tempfile::tempdir().unwrap();
        let keyspace = Config::new(dir.path()).open().unwrap();
        let p = keyspace.open_partition("p", PartitionCreateOptions::default()).unwrap();
        p.insert("k", "v").unwrap();
        p.remove("k").unwrap();
        p.rotate_memtable_and_wait().unwrap();
        p.major_compact().unwrap();
        assert!(p.get("k").unwrap().is_some(), "fjall no longer resurrects: drop advance_gc_watermark");
    }

    #[test]
    fn a_damaged_value_is_reported_not_delivered() {
        let m = ColdMessage { seq: 5, user_hash: 0, expires_at_ms: 0, record: put(5, "a", 0).record };
        assert!(m.accepted().is_ok());
        let mut bad = m.clone();
        let last = bad.record.len() - 1;
        bad.record[last] ^= 1;
        assert!(matches!(bad.accepted(), Err(ColdError::Damaged { seq: 5, .. })));
        let other = ColdMessage { seq: 6, ..m };
        assert!(other.accepted().is_err(), "a record under another sequence number");
    }
}
