//! From a key per message to the batch index: stores written before it
//! have `by_seq` (seq -> user hash) and `expiry` ((expires at ms, seq) ->
//! user hash) partitions beside `by_user`. At open, the messages `by_seq`
//! names and `by_user` still holds are indexed in batches of 4,096 by
//! sequence number, made durable, and only then are the old partitions
//! deleted, `expiry` first, `by_seq` last.
//!
//! Crash-safe at any instant: while `by_seq` exists the next open indexes
//! everything again. Batches indexed by a run that stopped stay beside the
//! new ones (a duplicate names the same user hash, and every answer is
//! confirmed against `by_user`); the next compaction drops those whose
//! messages are gone, like any other batch.

use std::path::Path;
use std::time::Instant;

use fjall::PartitionCreateOptions;

use super::{be_u64, key16, ColdError, ColdMessage, ColdStore, Entry, Migration};

const OLD_BY_SEQ: &str = "by_seq";
const OLD_EXPIRY: &str = "expiry";

/// Messages per batch of the migrated index, as a spill writes them.
const MIGRATION_BATCH: usize = 4096;

/// Migrates `store` if it still has the old partitions (see the module's
/// doc); `migration` stops before the deletions in tests (a crash there).
pub(super) fn per_message_index(
    store: &ColdStore,
    dir: &Path,
    options: &PartitionCreateOptions,
    migration: Migration,
) -> Result<(), ColdError> {
    let keyspace = &store.keyspace;
    if !keyspace.partition_exists(OLD_BY_SEQ) {
        if keyspace.partition_exists(OLD_EXPIRY) {
            // A migration stopped between its two deletions.
            keyspace.delete_partition(keyspace.open_partition(OLD_EXPIRY, options.clone())?)?;
        }
        return Ok(());
    }
    let started = Instant::now();
    let by_seq = keyspace.open_partition(OLD_BY_SEQ, options.clone())?;
    let (messages, batches) = index_old_messages(store, &by_seq)?;
    store.persist()?;
    if migration == Migration::Whole {
        if keyspace.partition_exists(OLD_EXPIRY) {
            keyspace.delete_partition(keyspace.open_partition(OLD_EXPIRY, options.clone())?)?;
        }
        keyspace.delete_partition(by_seq)?;
    }
    tracing::info!(
        dir = %dir.display(),
        messages,
        batches,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "cold store: migrated from a key per message (by_seq, expiry) to the batch index"
    );
    Ok(())
}

/// Indexes, in batches by sequence number, every message `by_seq` names
/// whose record `by_user` holds. Returns (messages, batches).
fn index_old_messages(store: &ColdStore, by_seq: &fjall::PartitionHandle) -> Result<(u64, u64), ColdError> {
    let (mut messages, mut batches) = (0u64, 0u64);
    let mut entries: Vec<Entry> = Vec::with_capacity(MIGRATION_BATCH);
    let mut write = |entries: &mut Vec<Entry>| -> Result<(), ColdError> {
        let mut batch = store.keyspace.batch();
        store.add_batch_index(&mut batch, entries);
        batch.commit()?;
        messages += entries.len() as u64;
        batches += 1;
        entries.clear();
        Ok(())
    };
    for kv in by_seq.iter() {
        let (k, v) = kv?;
        let seq = be_u64(&k).ok_or(ColdError::Damaged { seq: 0, why: "old by_seq: short key" })?;
        let user_hash = be_u64(&v).ok_or(ColdError::Damaged { seq, why: "old by_seq: short user hash" })?;
        let Some(record) = store.by_user.get(key16(user_hash, seq))? else { continue };
        let m = ColdMessage { seq, user_hash, expires_at_ms: 0, record: record.to_vec() };
        // A damaged record keeps no expiry here: its restore reports it.
        let expires_at_ms = m.accepted().map_or(0, |a| a.expires_at_ms);
        entries.push(Entry { seq, user_hash, expires_at_ms });
        if entries.len() == MIGRATION_BATCH {
            write(&mut entries)?;
        }
    }
    if !entries.is_empty() {
        write(&mut entries)?;
    }
    Ok((messages, batches))
}
