//! The cold store: pending messages of users who are not connected, on
//! disk, out of the journal and out of memory (docs/ARCHITECTURE.md,
//! "Offline backlog").
//!
//! One LSM tree (`fjall`) per shard, in `shard-N/cold/`, with two
//! partitions:
//!
//! | partition | key                              | value                        |
//! |-----------|----------------------------------|------------------------------|
//! | `by_user` | user hash (8, BE) ‖ seq (8, BE)  | the encoded `Accepted` record |
//! | `index`   | per batch written by `put` (`index.rs`) | its messages' seq, user hash, expiry |
//! | `index`   | `R`: removals since the last compaction | count (8, BE)          |
//! | `index`   | `G`: rewritten to move fjall's GC watermark | empty              |
//!
//! A message is cold iff its `by_user` key exists. A user's backlog is one
//! prefix scan of `by_user`, in acceptance order; the batch index answers
//! "is this message cold?" (status lookups, recovery) and "what expired?",
//! each answer confirmed against `by_user`. One key per message, not three
//! (the store had `by_seq` and `expiry` partitions until `migrate.rs`):
//! the spill's CPU per message is about what fjall spends per key. The
//! value carries the record whole, with its CRC, so a restore checks it
//! like the journal does and a hash collision between two users is caught
//! by the record's `to`.
//!
//! Every call blocks (fjall does file I/O with std): the shard runs them on
//! its blocking thread (`glommio::executor().spawn_blocking`), never on the
//! executor. The store's own fsync happens in [`ColdStore::put`] only: a
//! message is journaled as spilled after its cold copy is durable, and the
//! removals that follow a restore are made durable by [`ColdStore::persist`]
//! before the journal segment that restored them may be deleted.

#[cfg(test)]
mod cost_probe;
mod index;
mod migrate;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use fjall::{Config, Keyspace, PartitionCreateOptions, PartitionHandle, PersistMode};

use crate::record::{self, Decoded, Record};
use index::Entry;

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

/// Where a cold message's record is: enough to remove it without a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ColdKey {
    /// Its sequence number.
    pub seq: u64,
    /// [`user_hash`] of its recipient.
    pub user_hash: u64,
}

impl ColdPut {
    /// Its key.
    pub fn key(&self) -> ColdKey {
        ColdKey { seq: self.seq, user_hash: self.user_hash }
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
        ColdKey { seq: self.seq, user_hash: self.user_hash }
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

/// Commits within which fjall keeps closed snapshots, holding its
/// watermark back (`SnapshotTracker`'s `safety_gap`, fjall 2.11).
const GC_SAFETY_GAP_COMMITS: usize = 50;

/// The key [`ColdStore::advance_gc_watermark_past_now`] rewrites, in the
/// `index` partition (none of the batch index's kinds: `S`, `B`, `E`).
const GC_TICK_KEY: &[u8] = b"G";

/// The key, in the `index` partition, that holds how many messages were
/// removed since the last major compaction completed (u64, big-endian):
/// written with each removal, so a process that starts after a crash (in
/// the middle of a compaction, say) still knows the store is sparse.
const REMOVED_KEY: &[u8] = b"R";

/// One shard's cold store. Cheap to clone (handles); every method blocks.
#[derive(Clone)]
pub struct ColdStore {
    keyspace: Keyspace,
    by_user: PartitionHandle,
    index: PartitionHandle,
    /// The counter of the next batch's name (`index.rs`): names are never
    /// reused, so a batch rewritten from a stale read (the compaction
    /// thread's pruning beside the blocking thread's expiry) names only
    /// messages of its own, and no lock is needed.
    next_batch: Arc<AtomicU64>,
    /// Removals since the last major compaction completed ([`REMOVED_KEY`]).
    removed: Arc<AtomicU64>,
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

impl From<&ColdPut> for Entry {
    fn from(m: &ColdPut) -> Self {
        Entry { seq: m.seq, user_hash: m.user_hash, expires_at_ms: m.expires_at_ms }
    }
}

/// How far [`ColdStore::open_with`] takes a migration (tests stop it half-way).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Migration {
    Whole,
    #[cfg(test)]
    IndexOnly,
}

impl ColdStore {
    /// Opens (or creates) the store in `dir`, recovering fjall's own journal,
    /// and migrates a store written with a key per message in `by_seq` and
    /// `expiry` (logged once; crash-safe, `migrate.rs`).
    pub fn open(dir: &Path, sizing: ColdSizing) -> Result<Self, ColdError> {
        Self::open_with(dir, sizing, Migration::Whole)
    }

    fn open_with(dir: &Path, sizing: ColdSizing, migration: Migration) -> Result<Self, ColdError> {
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
        // `by_user`: no bloom filters, whose memory would grow with the
        // backlog (10 bits a key); its point reads of gone messages (expiry,
        // pruning) go in key order instead, so they share blocks. The index
        // has three keys per batch of up to 4,096 messages: its filters are
        // small. (fjall keeps a partition's filter setting from its creation.)
        let by_user = keyspace.open_partition("by_user", options().bloom_filter_bits(None))?;
        let index = keyspace.open_partition("index", options())?;
        let next_batch = Arc::new(AtomicU64::new(index::first_free_batch_n(&index)?));
        let removed = index.get(REMOVED_KEY)?.and_then(|v| be_u64(&v)).unwrap_or(0);
        let removed = Arc::new(AtomicU64::new(removed));
        let store = Self { keyspace, by_user, index, next_batch, removed };
        migrate::per_message_index(&store, dir, &options(), migration)?;
        Ok(store)
    }

    /// Writes `messages` and makes them durable (fdatasync of fjall's
    /// journal) before returning: only then may the journal forget them.
    pub fn put(&self, messages: &[ColdPut]) -> Result<(), ColdError> {
        if messages.is_empty() {
            return Ok(());
        }
        let mut entries: Vec<Entry> = messages.iter().map(Entry::from).collect();
        entries.sort_unstable_by_key(|e| e.seq);
        let mut batch = self.keyspace.batch();
        // In key order: consecutive memtable inserts then walk the same
        // skip-list path, which stays in the CPU's caches (the skip-list
        // search was the largest single cost of a spill).
        let mut order: Vec<&ColdPut> = messages.iter().collect();
        order.sort_unstable_by_key(|m| (m.user_hash, m.seq));
        for m in &order {
            batch.insert(&self.by_user, key16(m.user_hash, m.seq), m.record.as_slice());
        }
        self.add_batch_index(&mut batch, &entries);
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
        let Some(entry) = self.locate(seq, &mut None)? else { return Ok(None) };
        let user_hash = entry.user_hash;
        let Some(v) = self.by_user.get(key16(user_hash, seq))? else { return Ok(None) };
        let mut m = ColdMessage { seq, user_hash, expires_at_ms: 0, record: v.to_vec() };
        m.expires_at_ms = m.accepted()?.expires_at_ms;
        Ok(Some(m))
    }

    /// Up to `max` cold messages whose TTL passed at `now_ms`, batch by
    /// batch, the batch that expires first first. Fewer than there are (none
    /// at all) when the batches it looked at (16 at most) held no more: it
    /// retired those (`index.rs`), so calling again makes progress.
    pub fn expired(&self, now_ms: u64, max: usize) -> Result<Vec<ColdMessage>, ColdError> {
        let mut out = Vec::new();
        for (e, v) in self.due(now_ms, max)? {
            let mut m = ColdMessage { seq: e.seq, user_hash: e.user_hash, expires_at_ms: 0, record: v.to_vec() };
            m.expires_at_ms = m.accepted()?.expires_at_ms;
            out.push(m);
        }
        Ok(out)
    }

    /// Removes messages (restored into the journal, or found stale), without
    /// waiting for the disk: [`ColdStore::persist`] does, before the journal
    /// segment that restored them is deleted. Unknown sequence numbers are
    /// skipped. Returns how many were cold.
    pub fn remove(&self, seqs: &[u64]) -> Result<usize, ColdError> {
        let mut batch = self.keyspace.batch();
        let mut removed = 0;
        let mut cache = None;
        for &seq in seqs {
            let Some(entry) = self.locate(seq, &mut cache)? else { continue };
            let key = key16(entry.user_hash, seq);
            if self.by_user.contains_key(key)? {
                batch.remove(&self.by_user, key);
                removed += 1;
            }
        }
        self.count_removals(&mut batch, removed as u64);
        batch.commit()?;
        self.advance_gc_watermark();
        Ok(removed)
    }

    /// Rewrites the store without what was removed: drops from the batch
    /// index the messages `by_user` no longer holds (batches with none left
    /// go), flushes each partition's memtable and runs a major compaction,
    /// so the bytes of removed messages (and their tombstones) leave the
    /// disk. Long: run it off the shard's blocking thread. Uses fjall's
    /// `major_compact` and `rotate_memtable_and_wait`, public but hidden
    /// from its docs: pinned to fjall 2.11 (docs/ARCHITECTURE.md, "Offline
    /// backlog").
    pub fn compact(&self) -> Result<(), ColdError> {
        // Removals made from here on are not all compacted away by this run:
        // they stay counted.
        let counted = self.removed.load(Ordering::Relaxed);
        // `by_user` first: the pruning then looks its keys up in one sorted
        // run without tombstones, not in every overlapping segment.
        self.advance_gc_watermark_past_now()?;
        self.by_user.rotate_memtable_and_wait()?;
        self.by_user.major_compact()?;
        self.prune_index()?;
        self.advance_gc_watermark_past_now()?;
        self.index.rotate_memtable_and_wait()?;
        self.index.major_compact()?;
        // Not made durable here: a crash before the next persist only
        // brings back the older count, and with it one more compaction. A
        // removal on the blocking thread may write its count beside this
        // one, so the stored count can be off by a batch until the next
        // removal; it only times the next compaction.
        let left = self.removed.fetch_sub(counted, Ordering::Relaxed) - counted;
        self.index.insert(REMOVED_KEY, left.to_be_bytes())?;
        self.advance_gc_watermark();
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
    /// compaction. Every removal or overwrite calls it, the batch index's
    /// included (an old value of a batch's keys must not come back).
    fn advance_gc_watermark(&self) {
        for _ in 0..GC_PUMP_SNAPSHOTS {
            drop(self.by_user.snapshot());
        }
    }

    /// Moves fjall's garbage-collection watermark past every write so far,
    /// before a major compaction.
    ///
    /// [`ColdStore::advance_gc_watermark`] alone leaves it at the oldest
    /// pump of the last 50 commits (fjall keeps closed snapshots that
    /// recent, its safety gap): a key written and removed within them
    /// could still come back from a compaction into the last level (a
    /// unit test of the batch index caught it on batches written, retired
    /// and pruned in a row). 51 commits of a one-byte key first take every
    /// earlier pump out of that window.
    fn advance_gc_watermark_past_now(&self) -> Result<(), ColdError> {
        for _ in 0..=GC_SAFETY_GAP_COMMITS {
            self.index.insert(GC_TICK_KEY, [])?;
        }
        self.advance_gc_watermark();
        Ok(())
    }

    /// Removes messages whose keys the caller knows (it just read or wrote
    /// them): no lookups, unlike [`ColdStore::remove`]. Not durable until
    /// [`ColdStore::persist`].
    /// Only `by_user` changes (and the count of removals, [`REMOVED_KEY`]):
    /// the batch index forgets them at their batch's
    /// expiry or the next compaction.
    pub fn remove_known(&self, keys: &[ColdKey]) -> Result<(), ColdError> {
        let mut batch = self.keyspace.batch();
        // In key order, as in `put`.
        let mut order: Vec<&ColdKey> = keys.iter().collect();
        order.sort_unstable_by_key(|k| (k.user_hash, k.seq));
        for k in &order {
            batch.remove(&self.by_user, key16(k.user_hash, k.seq));
        }
        self.count_removals(&mut batch, keys.len() as u64);
        batch.commit()?;
        self.advance_gc_watermark();
        Ok(())
    }

    /// Adds `n` to the removals since the last compaction, and writes the
    /// new count in `batch` (durable with the removals it counts).
    fn count_removals(&self, batch: &mut fjall::Batch, n: u64) {
        if n > 0 {
            let total = self.removed.fetch_add(n, Ordering::Relaxed) + n;
            batch.insert(&self.index, REMOVED_KEY, total.to_be_bytes());
        }
    }

    /// Messages removed since the last major compaction completed, this
    /// process or an earlier one (an estimate: a removal of a message
    /// already gone counts too).
    pub fn removed_since_compaction(&self) -> u64 {
        self.removed.load(Ordering::Relaxed)
    }

    /// Makes every write and removal so far durable.
    pub fn persist(&self) -> Result<(), ColdError> {
        self.keyspace.persist(PersistMode::SyncData)?;
        Ok(())
    }

    /// About how many messages are cold (fjall's estimate: cheap, may
    /// count removed ones until compaction).
    pub fn approximate_len(&self) -> usize {
        self.by_user.approximate_len()
    }

    /// Exact count of cold messages (a full scan of `by_user`: tests and tools).
    pub fn len(&self) -> Result<usize, ColdError> {
        Ok(self.by_user.len()?)
    }

    /// True when no message is cold (exact).
    pub fn is_empty(&self) -> Result<bool, ColdError> {
        Ok(self.by_user.is_empty()?)
    }

    /// Bytes the store takes on disk (journal and tables).
    pub fn disk_bytes(&self) -> u64 {
        self.keyspace.disk_space()
    }
}

#[cfg(test)]
mod tests {
    use super::tests_support::put;
    use super::*;

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
    fn removals_since_the_last_compaction_are_counted_across_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = ColdStore::open(dir.path(), ColdSizing::default()).unwrap();
            let puts: Vec<_> = (0..100).map(|s| put(s, "a", 0)).collect();
            store.put(&puts).unwrap();
            store.remove_known(&puts[..30].iter().map(ColdPut::key).collect::<Vec<_>>()).unwrap();
            assert_eq!(store.remove(&[30, 31, 1000]).unwrap(), 2);
            assert_eq!(store.removed_since_compaction(), 32);
            store.persist().unwrap();
        }
        // As after a crash before (or during) the compaction: still due.
        let store = ColdStore::open(dir.path(), ColdSizing::default()).unwrap();
        assert_eq!(store.removed_since_compaction(), 32);
        store.compact().unwrap();
        assert_eq!(store.removed_since_compaction(), 0);
        store.persist().unwrap();
        drop(store);
        let store = ColdStore::open(dir.path(), ColdSizing::default()).unwrap();
        assert_eq!(store.removed_since_compaction(), 0);
        assert_eq!(store.len().unwrap(), 68);
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
        assert_eq!(store.by_user.len().unwrap(), 2, "a compaction never brings removed messages back");
        assert_eq!(store.index_counts(), (1, 1, 1));
        assert_eq!(store.expiry_keys(), vec![60], "the batch keeps 3 and 4 only");
        assert_eq!(store.expired(1000, 10).unwrap().iter().map(|m| m.seq).collect::<Vec<_>>(), vec![3, 4]);
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

#[cfg(test)]
mod batch_index_tests {
    use super::tests_support::*;
    use super::*;

    fn seqs(messages: Vec<ColdMessage>) -> Vec<u64> {
        messages.iter().map(|m| m.seq).collect()
    }

    fn found(store: &ColdStore, seq: u64) -> bool {
        store.get(seq).unwrap().is_some_and(|m| m.seq == seq && m.accepted().is_ok())
    }

    #[test]
    fn get_finds_a_message_after_put_not_after_removal_and_in_either_of_two_batches() {
        let dir = tempfile::tempdir().unwrap();
        let store = ColdStore::open(dir.path(), ColdSizing::default()).unwrap();
        store.put(&[put(10, "a", 0), put(11, "b", 0), put(12, "a", 0)]).unwrap();
        store.put(&[put(5, "c", 0), put(30, "c", 0)]).unwrap();
        assert!((5..=30).all(|s| found(&store, s) == [5, 10, 11, 12, 30].contains(&s)));
        // 10 and 12 restored, then spilled again: a second batch named after 10.
        store.remove_known(&[put(10, "a", 0).key(), put(12, "a", 0).key()]).unwrap();
        assert!(!found(&store, 10) && !found(&store, 12) && found(&store, 11));
        store.put(&[put(10, "a", 0), put(12, "a", 0)]).unwrap();
        assert_eq!(store.index_counts(), (3, 3, 0));
        assert!([5, 10, 11, 12, 30].iter().all(|&s| found(&store, s)));
        assert_eq!(store.remove(&[11, 12, 13]).unwrap(), 2);
        assert!(!found(&store, 11) && !found(&store, 12) && found(&store, 10));
        drop(store);
        let store = ColdStore::open(dir.path(), ColdSizing::default()).unwrap();
        assert!([5, 10, 30].iter().all(|&s| found(&store, s)));
        assert!([11, 12, 0, 31, u64::MAX].iter().all(|&s| !found(&store, s)));
    }

    #[test]
    fn expired_returns_only_live_due_messages_and_retires_batches() {
        let dir = tempfile::tempdir().unwrap();
        let store = ColdStore::open(dir.path(), ColdSizing::default()).unwrap();
        store.put(&[put(1, "a", 100), put(2, "b", 200), put(3, "a", 0)]).unwrap();
        store.put(&[put(10, "a", 150)]).unwrap();
        assert_eq!(store.expiry_keys(), vec![100, 150]);
        assert_eq!(seqs(store.expired(120, 10).unwrap()), vec![1]);
        assert_eq!(seqs(store.expired(120, 0).unwrap()), Vec::<u64>::new());
        store.remove_known(&[put(1, "a", 100).key()]).unwrap();
        assert_eq!(seqs(store.expired(120, 10).unwrap()), Vec::<u64>::new());
        assert_eq!(store.expiry_keys(), vec![150, 200], "moved to its earliest live expiry");
        store.remove_known(&[put(2, "b", 200).key()]).unwrap();
        assert_eq!(seqs(store.expired(250, 10).unwrap()), vec![10]);
        assert_eq!(store.expiry_keys(), vec![150], "3 never expires: no expiry key, the batch stays");
        assert_eq!(store.index_counts(), (2, 2, 1));
        assert!(found(&store, 3));
        store.remove_known(&[put(10, "a", 150).key()]).unwrap();
        assert!(store.expired(250, 10).unwrap().is_empty());
        assert_eq!(store.index_counts(), (1, 1, 0), "a batch with no live message goes");
        store.remove_known(&[put(3, "a", 0).key()]).unwrap();
        store.compact().unwrap();
        assert_eq!(store.index_counts(), (0, 0, 0));
    }

    #[test]
    fn expired_makes_progress_over_many_batches_and_pages() {
        let dir = tempfile::tempdir().unwrap();
        let store = ColdStore::open(dir.path(), ColdSizing::default()).unwrap();
        for b in 0..40u64 {
            store.put(&(b * 100..b * 100 + 100).map(|s| put(s, "a", 1 + s)).collect::<Vec<_>>()).unwrap();
        }
        // Half of them delivered already, all due: pages of 150.
        store
            .remove_known(&(0..4000).filter(|s| s % 2 == 0).map(|s| put(s, "a", 1 + s).key()).collect::<Vec<_>>())
            .unwrap();
        let mut expired = Vec::new();
        for _ in 0..100 {
            let page = store.expired(u64::MAX, 150).unwrap();
            assert!(page.len() <= 150);
            store.remove_known(&page.iter().map(ColdMessage::key).collect::<Vec<_>>()).unwrap();
            expired.extend(seqs(page));
        }
        assert_eq!(expired, (0..4000).filter(|s| s % 2 == 1).collect::<Vec<_>>());
        assert_eq!(store.index_counts(), (0, 0, 0));
    }

    #[test]
    fn compact_drops_dead_batches_and_a_reopened_store_answers_the_same() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = ColdStore::open(dir.path(), ColdSizing::default()).unwrap();
            for b in 0..3u64 {
                store.put(&(b * 10..b * 10 + 10).map(|s| put(s, "u", 1000 + s)).collect::<Vec<_>>()).unwrap();
            }
            let gone: Vec<ColdKey> = (0..10).chain(20..25).map(|s| put(s, "u", 1000 + s).key()).collect();
            store.remove_known(&gone).unwrap();
            store.persist().unwrap();
            store.compact().unwrap();
            assert_eq!(store.index_counts(), (2, 2, 2));
            assert_eq!(store.expiry_keys(), vec![1010, 1025]);
        }
        let store = ColdStore::open(dir.path(), ColdSizing::default()).unwrap();
        assert_eq!(store.index_counts(), (2, 2, 2));
        let removed = |s: u64| s < 10 || (20..25).contains(&s);
        assert!((0..30).all(|s| found(&store, s) != removed(s)));
        assert_eq!(seqs(store.expired(1026, 100).unwrap()), (10..20).chain([25, 26]).collect::<Vec<_>>());
        assert_eq!(store.len().unwrap(), 15);
    }

    #[test]
    fn a_damaged_batch_entry_is_an_error_not_a_wrong_answer() {
        let dir = tempfile::tempdir().unwrap();
        let store = ColdStore::open(dir.path(), ColdSizing::default()).unwrap();
        store.put(&[put(1, "a", 10), put(2, "b", 10)]).unwrap();
        store.damage_index();
        assert!(matches!(store.get(2), Err(ColdError::Damaged { seq: 1, .. })));
        assert!(matches!(store.expired(20, 10), Err(ColdError::Damaged { .. })));
        assert!(store.remove(&[2]).is_err());
        assert!(store.compact().is_err());
        assert_eq!(store.user_messages(user_hash("b"), None, 10).unwrap().len(), 1, "by_user is intact");
    }

    /// Writes `puts` the way the store did before the batch index: three
    /// partitions, a key per message in each.
    fn put_old_layout(dir: &Path, puts: &[ColdPut], removed: &[ColdPut]) {
        let keyspace = Config::new(dir).open().unwrap();
        let open = |name: &str| keyspace.open_partition(name, PartitionCreateOptions::default()).unwrap();
        let (by_user, by_seq, expiry) = (open("by_user"), open("by_seq"), open("expiry"));
        for m in puts {
            by_user.insert(key16(m.user_hash, m.seq), m.record.as_slice()).unwrap();
            by_seq.insert(m.seq.to_be_bytes(), m.user_hash.to_be_bytes()).unwrap();
            if m.expires_at_ms > 0 {
                expiry.insert(key16(m.expires_at_ms, m.seq), m.user_hash.to_be_bytes()).unwrap();
            }
        }
        for m in removed {
            by_user.remove(key16(m.user_hash, m.seq)).unwrap();
            by_seq.remove(m.seq.to_be_bytes()).unwrap();
            expiry.remove(key16(m.expires_at_ms, m.seq)).unwrap();
        }
        keyspace.persist(PersistMode::SyncAll).unwrap();
    }

    fn old_layout_messages() -> (Vec<ColdPut>, Vec<ColdPut>) {
        let puts: Vec<ColdPut> =
            (1..=6000u64).map(|s| put(s, &format!("u{}", s % 7), if s % 3 == 0 { 0 } else { 10_000 + s })).collect();
        let removed: Vec<ColdPut> = puts.iter().filter(|m| m.seq % 5 == 0).cloned().collect();
        (puts, removed)
    }

    fn assert_migrated_answers(store: &ColdStore) {
        assert!(!store.keyspace.partition_exists("by_seq") && !store.keyspace.partition_exists("expiry"));
        assert_eq!(store.len().unwrap(), 4800);
        for s in [1, 2, 3, 4095, 4096, 4097, 5119, 5120, 5121, 5999, 6000, 6001] {
            assert_eq!(found(store, s), s <= 6000 && s % 5 != 0, "seq {s}");
        }
        let due = seqs(store.expired(10_000 + 20, 100).unwrap());
        assert_eq!(due, vec![1, 2, 4, 7, 8, 11, 13, 14, 16, 17, 19]);
        let users: usize =
            (0..7).map(|u| store.user_messages(user_hash(&format!("u{u}")), None, 10_000).unwrap().len()).sum();
        assert_eq!(users, 4800);
    }

    #[test]
    fn a_store_with_a_key_per_message_is_migrated_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let (puts, removed) = old_layout_messages();
        put_old_layout(dir.path(), &puts, &removed);
        {
            let store = ColdStore::open(dir.path(), ColdSizing::default()).unwrap();
            assert_eq!(store.index_counts(), (2, 2, 2), "4,800 live messages in batches of 4,096");
            assert_migrated_answers(&store);
        }
        let store = ColdStore::open(dir.path(), ColdSizing::default()).unwrap();
        assert_eq!(store.index_counts(), (2, 2, 2), "migrated once");
        assert_migrated_answers(&store);
    }

    #[test]
    fn a_migration_stopped_before_its_deletions_runs_again_with_the_same_answers() {
        let dir = tempfile::tempdir().unwrap();
        let (puts, removed) = old_layout_messages();
        put_old_layout(dir.path(), &puts, &removed);
        {
            let store = ColdStore::open_with(dir.path(), ColdSizing::default(), Migration::IndexOnly).unwrap();
            assert!(store.keyspace.partition_exists("by_seq"));
        }
        {
            let store = ColdStore::open(dir.path(), ColdSizing::default()).unwrap();
            assert_eq!(store.index_counts(), (4, 4, 4), "the first run's batches stay beside the second's");
            assert_migrated_answers(&store);
        }
        // Stopped between the two deletions: only `expiry` left.
        {
            let keyspace = Config::new(dir.path()).open().unwrap();
            let p = keyspace.open_partition("expiry", PartitionCreateOptions::default()).unwrap();
            p.insert(key16(1, 1), 7u64.to_be_bytes()).unwrap();
            keyspace.persist(PersistMode::SyncAll).unwrap();
        }
        let store = ColdStore::open(dir.path(), ColdSizing::default()).unwrap();
        assert_migrated_answers(&store);
    }
}

#[cfg(test)]
mod tests_support {
    use super::*;
    use crate::record::Accepted;
    use crate::Priority;

    /// A message to `to` with sequence number `seq`, as the spill makes it.
    pub(super) fn put(seq: u64, to: &str, expires_at_ms: u64) -> ColdPut {
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
}
