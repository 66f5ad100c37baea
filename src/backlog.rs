//! The offline backlog on disk (docs/ARCHITECTURE.md, "Offline backlog").
//!
//! Pending messages of users who are not connected move out of memory into
//! the shard's cold store (`esh3ar_shards::cold`), and come back into the
//! journal, a page at a time, when their user connects:
//!
//! - **Spill** ([`run_spill`]): messages that are [`MessageIndex::spillable`]
//!   (accepted, never delivered, nothing owed), durable, older than
//!   `backlog.spill_after_ms` (or any age once the memory budget is 40%
//!   used) and whose user has no session are written to the cold store,
//!   which is fdatasynced; only then is a `Spilled` record journaled, which
//!   makes the index forget them and unpins their segments.
//! - **Restore** ([`Shard::backlog_ready`]): before a session's first
//!   delivery, the user's cold messages (a page of `backlog.restore_page`,
//!   in acceptance order) are journaled again as `Restored` records, with
//!   their original sequence numbers; once those are durable their cold
//!   copies are removed. From then on they are ordinary journal messages.
//!   While more pages remain, live messages of that user wait behind them.
//! - **Expiry**: maintenance restores cold messages whose TTL passed and
//!   expires them the usual way (the sender is owed the event).
//!
//! The journal stays the system of record for everything that is not cold;
//! the cold store is the only copy of what is. Removals from the cold store
//! are made durable ([`Shard::persist_cold`]) before maintenance deletes any
//! journal segment, so a segment holding a `Restored` record never goes
//! while the message's cold copy could come back.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::{Duration, Instant};

use esh3ar_shards::cold::{user_hash, ColdKey, ColdMessage, ColdPut, ColdStore};
use esh3ar_shards::index::MessageIndex;
use esh3ar_shards::record::{self, Accepted, Record, SeqList, SPILLED_SEQS_MAX};
use esh3ar_shards::{Reason, Status};
use hashbrown::HashMap;
use serde::{Deserialize, Serialize};

use crate::clock::now_ms;
use crate::shard::Shard;

/// Largest `backlog.restore_page`.
pub const RESTORE_PAGE_MAX: usize = 4096;
/// Longest `backlog.spill_after_ms` (a day).
pub const SPILL_AFTER_MS_MAX: u64 = 86_400_000;
/// Memory budget fill (percent) from which messages spill at any age.
pub const SPILL_NOW_PERCENT: u64 = 40;
/// Share of the memory budget (percent) the pending messages held in memory
/// may take before they spill at any age, oldest first: half of
/// [`HOLD_PERCENT`], so the spill has begun well before connections are
/// held, whatever `spill_after_ms` says.
pub const SPILL_PENDING_PERCENT: u64 = HOLD_PERCENT / 2;
/// Share of the memory budget (percent) the pending messages held in memory
/// may take before connections stop reading new requests until the spill
/// has moved some to disk ([`Shard::is_full`]).
pub const HOLD_PERCENT: u64 = 10;
/// Messages written to the cold store in one batch (one fdatasync).
const SPILL_BATCH: usize = SPILLED_SEQS_MAX;

/// `[backlog]`: the offline backlog on disk.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BacklogConfig {
    /// A pending message of a user who is not connected moves to the cold
    /// store once it is this old (ms); 0 keeps every message in memory.
    #[serde(default = "default_spill_after_ms")]
    pub spill_after_ms: u64,
    /// Messages brought back per pass when their user connects (1 to 4096).
    #[serde(default = "default_restore_page")]
    pub restore_page: usize,
    /// The cold store's block cache, per shard (bytes; restart to change).
    #[serde(default = "default_cache_bytes")]
    pub cache_bytes: u64,
    /// The cold store's write buffers, per shard (bytes; restart to change).
    #[serde(default = "default_write_buffer_bytes")]
    pub write_buffer_bytes: u64,
}

fn default_spill_after_ms() -> u64 {
    30_000
}
fn default_restore_page() -> usize {
    1024
}
fn default_cache_bytes() -> u64 {
    8 << 20
}
fn default_write_buffer_bytes() -> u64 {
    32 << 20
}

impl Default for BacklogConfig {
    fn default() -> Self {
        Self {
            spill_after_ms: default_spill_after_ms(),
            restore_page: default_restore_page(),
            cache_bytes: default_cache_bytes(),
            write_buffer_bytes: default_write_buffer_bytes(),
        }
    }
}

impl BacklogConfig {
    /// Every problem with these values, as (key, message).
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if self.spill_after_ms > SPILL_AFTER_MS_MAX {
            out.push(("backlog.spill_after_ms".into(), format!("must be at most {SPILL_AFTER_MS_MAX} (a day)")));
        }
        if !(1..=RESTORE_PAGE_MAX).contains(&self.restore_page) {
            out.push(("backlog.restore_page".into(), format!("must be between 1 and {RESTORE_PAGE_MAX}")));
        }
        if !(1 << 20..=1 << 40).contains(&self.cache_bytes) {
            out.push(("backlog.cache_bytes".into(), "must be between 1 MiB and 1 TiB".into()));
        }
        if !(4 << 20..=1 << 40).contains(&self.write_buffer_bytes) {
            out.push(("backlog.write_buffer_bytes".into(), "must be between 4 MiB and 1 TiB".into()));
        }
        out
    }
}

/// Where a connected user's cold messages stand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UserCold {
    /// A restore pass is running: deliver nothing yet.
    Restoring,
    /// More cold messages after this sequence number: deliver only up to it.
    More(u64),
    /// None left.
    Done,
}

/// What a session may deliver now ([`Shard::backlog_barrier`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Barrier {
    /// Everything pending.
    All,
    /// Only messages with sequence numbers up to this one (older cold
    /// messages are still to come back after it).
    UpTo(u64),
    /// Nothing yet: a restore pass is running.
    Wait,
}

/// One shard's side of the backlog: its cold store and what is in flight.
pub struct Backlog {
    store: ColdStore,
    /// About how many messages are cold (fjall's estimate at startup, then
    /// kept in step): `/metrics` and the fast path for users with none.
    cold: Cell<u64>,
    /// Connected (or connecting) users with cold messages to restore.
    users: RefCell<HashMap<Rc<str>, UserCold>>,
    /// Removals not yet made durable, and removals running.
    dirty: Cell<bool>,
    removing: Cell<u32>,
    /// A compaction running, and when to try again after one failed.
    compacting: Cell<bool>,
    compact_again_at: Cell<Option<Instant>>,
    /// How much `cold` counts too many after a restart: fjall's estimate
    /// counts a removed message twice (its value and its tombstone) until
    /// a compaction; 0 once one completed here (`cold` is then set anew).
    overcount: Cell<u64>,
    /// Totals since start (`/metrics`).
    spilled_total: Cell<u64>,
    restored_total: Cell<u64>,
    /// Bounds the calls queued on the blocking thread ([`BLOCKING_IN_FLIGHT`]).
    in_flight: glommio::sync::Semaphore,
    /// Where the next spill scan starts, and when it last started over.
    cursor: Cell<u64>,
    rescanned_at: Cell<Option<Instant>>,
    /// The messages of the spill batch in flight (in sequence order):
    /// chosen, their cold copies perhaps written, not yet journaled as
    /// spilled. Cleared by [`SpillInFlight`].
    spilling: RefCell<Vec<u64>>,
}

impl Backlog {
    /// Wraps an opened cold store.
    pub fn new(store: ColdStore) -> Self {
        let cold = store.approximate_len() as u64;
        let overcount = 2 * store.removed_since_compaction();
        Self {
            store,
            cold: Cell::new(cold),
            users: RefCell::new(HashMap::new()),
            dirty: Cell::new(false),
            removing: Cell::new(0),
            compacting: Cell::new(false),
            compact_again_at: Cell::new(None),
            overcount: Cell::new(overcount),
            spilled_total: Cell::new(0),
            restored_total: Cell::new(0),
            in_flight: glommio::sync::Semaphore::new(BLOCKING_IN_FLIGHT),
            cursor: Cell::new(0),
            rescanned_at: Cell::new(None),
            spilling: RefCell::new(Vec::new()),
        }
    }

    /// About how many messages are cold.
    pub fn cold(&self) -> u64 {
        self.cold.get()
    }

    /// True while a compaction of the cold store runs.
    pub fn is_compacting(&self) -> bool {
        self.compacting.get()
    }

    /// Messages spilled since start.
    pub fn spilled_total(&self) -> u64 {
        self.spilled_total.get()
    }

    /// Messages restored since start.
    pub fn restored_total(&self) -> u64 {
        self.restored_total.get()
    }

    /// Bytes the cold store takes on disk.
    pub fn disk_bytes(&self) -> u64 {
        self.store.disk_bytes()
    }

    /// The store, for calls on the blocking thread.
    pub fn store(&self) -> &ColdStore {
        &self.store
    }

    /// True while `user` is being restored or has a restore state (connected).
    fn holds(&self, user: &str) -> bool {
        self.users.borrow().contains_key(user)
    }

    /// True if `seq` belongs to the spill batch in flight.
    fn is_spilling(&self, seq: u64) -> bool {
        self.spilling.borrow().binary_search(&seq).is_ok()
    }

    fn add_cold(&self, n: u64) {
        self.cold.set(self.cold.get() + n);
    }

    fn sub_cold(&self, n: u64) {
        self.cold.set(self.cold.get().saturating_sub(n));
    }
}

/// Ends a restore pass: records where the user's cold messages stand (or
/// forgets the user if it left or the first pass failed) and wakes its sessions.
struct RestorePass<'a> {
    shard: &'a Shard,
    user: &'a Rc<str>,
    state: Option<UserCold>,
}

impl Drop for RestorePass<'_> {
    fn drop(&mut self) {
        let mut users = self.shard.backlog().users.borrow_mut();
        match self.state.filter(|_| self.shard.sessions().has(self.user)) {
            Some(state) => users.insert(self.user.clone(), state),
            None => users.remove(&**self.user),
        };
        drop(users);
        self.shard.sessions().notify(self.user);
    }
}

/// Most calls a shard has queued on its blocking thread at once. glommio's
/// pool has bounded request and answer channels (4,096 each) and its
/// thread blocks on a full answer channel before waking the executor: with
/// 10,000 phones connecting at once the two filled and the shard stalled.
/// A few calls in flight keep the thread busy; more only queue.
const BLOCKING_IN_FLIGHT: u64 = 32;

/// Runs `f` with the shard's cold store on the blocking thread.
async fn blocking<R: Send + 'static>(shard: &Shard, f: impl FnOnce(&ColdStore) -> R + Send + 'static) -> R {
    let backlog = shard.backlog();
    // Never closed, so acquiring cannot fail (and without a permit it runs anyway).
    let _permit = backlog.in_flight.acquire_permit(1).await;
    let store = backlog.store().clone();
    glommio::executor().spawn_blocking(move || f(&store)).await
}

impl Shard {
    /// What a session of `user` may deliver now.
    pub fn backlog_barrier(&self, user: &str) -> Barrier {
        match self.backlog().users.borrow().get(user) {
            None | Some(UserCold::Done) => Barrier::All,
            Some(UserCold::More(last)) => Barrier::UpTo(*last),
            Some(UserCold::Restoring) => Barrier::Wait,
        }
    }

    /// Brings `user`'s next page of cold messages back into the journal when
    /// it is due: on the session's first delivery, and when the restored
    /// ones are nearly delivered while more remain. Err: the journal or the
    /// cold store failed (the session ends; nothing is lost).
    pub async fn backlog_ready(&self, user: &Rc<str>) -> Result<(), String> {
        let backlog = self.backlog();
        let after = match backlog.users.borrow().get(&**user) {
            None if backlog.cold() == 0 => return Ok(()),
            None => None,
            Some(UserCold::More(last)) => Some(*last),
            Some(UserCold::Done | UserCold::Restoring) => return Ok(()),
        };
        let page = self.cfg().backlog.restore_page;
        if let Some(last) = after {
            if self.index().borrow().pending_count_upto(user, last) > page / 2 {
                return Ok(()); // plenty restored still to deliver
            }
        }
        backlog.users.borrow_mut().insert(user.clone(), UserCold::Restoring);
        // Whatever happens to this pass (even a dropped future), the user
        // is not left waiting on it.
        let mut pass = RestorePass { shard: self, user, state: None };
        let result = self.restore_page(user, after, page).await;
        pass.state = match &result {
            Ok(Some(last)) => Some(UserCold::More(*last)),
            Ok(None) => Some(UserCold::Done),
            // A later delivery tries again from where it was.
            Err(_) => after.map(UserCold::More),
        };
        drop(pass);
        result.map(|_| ())
    }

    /// Forgets a user's restore state once its last session ended.
    pub fn backlog_user_left(&self, user: &str) {
        let mut users = self.backlog().users.borrow_mut();
        if users.get(user).is_some_and(|s| *s != UserCold::Restoring) {
            users.remove(user);
        }
    }

    /// One restore pass: up to `page` cold messages of `user` after `after`.
    /// Ok(Some(last)) when a full page came back (more may remain).
    async fn restore_page(&self, user: &Rc<str>, after: Option<u64>, page: usize) -> Result<Option<u64>, String> {
        let hash = user_hash(user);
        let found = blocking(self, move |s| s.user_messages(hash, after, page)).await.map_err(|e| e.to_string())?;
        let last = (found.len() == page).then(|| found.last().map_or(0, |m| m.seq));
        let mine: Vec<ColdMessage> =
            found.into_iter().filter(|m| m.accepted().is_ok_and(|a| a.to == &**user)).collect();
        self.bring_back(mine, false).await?;
        Ok(last)
    }

    /// Journals cold messages again (`Restored`), expiring them at once if
    /// `expire`; waits until durable, then removes their cold copies.
    async fn bring_back(&self, messages: Vec<ColdMessage>, expire: bool) -> Result<(), String> {
        if messages.is_empty() {
            return Ok(());
        }
        let mut generation = 0;
        let mut owed = false;
        // The cold copies to remove: those journaled again here, and orphans.
        let mut restored = Vec::with_capacity(messages.len());
        let mut orphans = Vec::new();
        {
            let mut index = self.index().borrow_mut();
            let known_only = self.cfg().validation.known_recipients_only;
            for m in &messages {
                let a = match m.accepted() {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::error!(shard = self.id(), seq = m.seq, error = %e, "cold store: skipping a damaged message");
                        continue;
                    }
                };
                if index.get(a.seq).is_some() {
                    // Already in the journal. The spill batch in flight wrote
                    // this copy and decides itself whether it stays (journaled
                    // as spilled) or goes (stale); any other copy was left by
                    // a spill that a crash interrupted, and goes now. Without
                    // this test, the copy's removal would be safe only while
                    // the blocking thread and the executor keep their order.
                    if !self.backlog().is_spilling(a.seq) {
                        orphans.push(m.key());
                    }
                    continue;
                }
                restored.push(m.key());
                let appended = self.journal().append(&Record::Restored(a), &mut index).map_err(|e| e.to_string())?;
                generation = appended.generation;
                let refusal = index.refusal(a.to, a.client, known_only);
                let settle = match refusal {
                    Some(reason) => Some((Status::Rejected, reason)),
                    None if expire => Some((Status::Expired, Reason::None)),
                    None => None,
                };
                if let Some((status, reason)) = settle {
                    let notify = crate::receipts::owes_event(self, &index, a.seq, status);
                    let at_ms = now_ms();
                    let change = record::StatusChange { seq: a.seq, status, at_ms, notify, reason };
                    generation = self
                        .journal()
                        .append(&Record::Status(change), &mut index)
                        .map_err(|e| e.to_string())?
                        .generation;
                    self.metrics().messages(status, 1);
                    owed |= notify;
                }
            }
            // Ours, and any left by recovery: their cold copies go below.
            index.take_restored();
        }
        if owed {
            self.events_ready().notify_all();
        }
        self.journal().wait_durable(generation).await.map_err(|e| e.to_string())?;
        let n = (restored.len() + orphans.len()) as u64;
        restored.append(&mut orphans);
        self.remove_cold(restored).await;
        let backlog = self.backlog();
        backlog.sub_cold(n);
        backlog.restored_total.set(backlog.restored_total.get() + n);
        Ok(())
    }

    /// Removes cold copies (restored or stale) without waiting for the disk;
    /// maintenance makes them durable before deleting segments.
    async fn remove_cold(&self, keys: Vec<ColdKey>) {
        let backlog = self.backlog();
        backlog.removing.set(backlog.removing.get() + 1);
        let result = blocking(self, move |s| s.remove_known(&keys)).await;
        backlog.removing.set(backlog.removing.get() - 1);
        backlog.dirty.set(true);
        if let Err(e) = result {
            // Left in the store: a restart restores them again (a duplicate
            // delivery, which phones dedupe), never a loss.
            tracing::error!(shard = self.id(), error = %e, "cold store: cannot remove restored messages");
        }
    }

    /// Makes the cold store's removals durable; false while a removal is
    /// still running or the store failed (maintenance then deletes no
    /// segment in this pass).
    pub async fn persist_cold(&self) -> bool {
        let backlog = self.backlog();
        if backlog.removing.get() > 0 {
            return false;
        }
        if !backlog.dirty.get() {
            return true;
        }
        backlog.dirty.set(false);
        match blocking(self, |s| s.persist()).await {
            Ok(()) => backlog.removing.get() == 0,
            Err(e) => {
                backlog.dirty.set(true);
                tracing::error!(shard = self.id(), error = %e, "cold store: cannot persist removals");
                false
            }
        }
    }

    /// Maintenance: once more messages left the cold store since its last
    /// compaction than remain in it (and at least 1,000), compacts it on a
    /// thread of its own, so restores and spills go on meanwhile. The disk
    /// it takes then follows what is still pending, not its history. The
    /// store keeps the count of removals across restarts: a compaction that
    /// a crash interrupted runs again in the next process.
    pub async fn compact_cold_when_sparse(&self) {
        let backlog = self.backlog();
        let removed = backlog.store().removed_since_compaction();
        let remaining = backlog.cold().saturating_sub(backlog.overcount.get());
        if backlog.compacting.get() || removed < 1000 || removed < remaining {
            return;
        }
        if backlog.compact_again_at.get().is_some_and(|at| Instant::now() < at) {
            return;
        }
        // A compaction writes before it frees: never while the disk is
        // (nearly) full, where it would take the journal's room and leave
        // fjall refusing every later write until a restart.
        if self.journal().storage_full() {
            return;
        }
        backlog.compacting.set(true);
        let store = backlog.store().clone();
        let (tx, rx) = futures_channel::oneshot::channel();
        let started = Instant::now();
        let spawned = std::thread::Builder::new().name(format!("cold-compact-{}", self.id())).spawn(move || {
            let _ = tx.send(store.compact());
        });
        let result = match spawned {
            Ok(_) => rx.await.unwrap_or(Ok(())),
            Err(e) => {
                tracing::warn!(shard = self.id(), error = %e, "cold store: cannot start a compaction thread");
                Ok(())
            }
        };
        backlog.compacting.set(false);
        if result.is_ok() {
            if backlog.overcount.get() > 0 {
                // Right after a compaction fjall's estimate counts each cold
                // message once (one removed meanwhile twice): never too few,
                // which would skip a user's restore.
                backlog.cold.set(backlog.store().approximate_len() as u64);
                backlog.overcount.set(0);
            }
            backlog.compact_again_at.set(None);
        } else {
            backlog.compact_again_at.set(Some(Instant::now() + Duration::from_secs(60)));
        }
        match result {
            Ok(()) => tracing::info!(
                shard = self.id(),
                removed,
                cold = backlog.cold(),
                elapsed_ms = started.elapsed().as_millis() as u64,
                disk_bytes = backlog.disk_bytes(),
                "cold store compacted"
            ),
            Err(e) => tracing::warn!(shard = self.id(), error = %e, "cold store: compaction failed"),
        }
    }

    /// Maintenance: restores and expires cold messages whose TTL passed.
    pub async fn expire_cold(&self) {
        if self.backlog().cold() == 0 {
            return;
        }
        let now = now_ms();
        match blocking(self, move |s| s.expired(now, 1000)).await {
            Ok(found) => {
                let n = found.len();
                if let Err(e) = self.bring_back(found, true).await {
                    tracing::warn!(shard = self.id(), error = %e, "cold store: cannot expire messages");
                } else if n > 0 {
                    tracing::debug!(shard = self.id(), count = n, "expired cold messages");
                }
            }
            Err(e) => tracing::warn!(shard = self.id(), error = %e, "cold store: cannot read expiries"),
        }
    }

    /// The status of message `seq` if it is in the cold store and `client` sent it.
    pub async fn cold_status(&self, seq: u64, client: &str) -> Option<Box<crate::shard::StatusView>> {
        if self.backlog().cold() == 0 {
            return None;
        }
        let found = match blocking(self, move |s| s.get(seq)).await {
            Ok(found) => found?,
            Err(e) => {
                tracing::warn!(shard = self.id(), seq, error = %e, "cold store: cannot look a message up");
                return None;
            }
        };
        let a = found.accepted().ok()?;
        if a.client != client {
            return None;
        }
        Some(Box::new(crate::shard::StatusView {
            to: a.to.to_owned(),
            status: Status::Accepted,
            priority: a.priority,
            attempts: 0,
            accepted_at_ms: a.accepted_at_ms,
            delivered_at_ms: 0,
            acked_at_ms: 0,
            reason: Reason::None,
            channel: None,
            provider_message_id: None,
        }))
    }

    /// After recovery: removes the cold copies of messages the journal
    /// restored before the crash (the removal may not have reached the disk).
    pub async fn settle_recovered_restores(&self) -> Result<(), String> {
        // Only those the journal still holds: a message restored, then
        // spilled again before the crash, lives in the cold store alone.
        let seqs: Vec<u64> = {
            let mut index = self.index().borrow_mut();
            let restored = index.take_restored();
            restored.into_iter().filter(|&seq| index.get(seq).is_some()).collect()
        };
        if seqs.is_empty() {
            return Ok(());
        }
        let n = seqs.len();
        blocking(self, move |s| s.remove(&seqs).and_then(|_| s.persist())).await.map_err(|e| e.to_string())?;
        tracing::info!(
            shard = self.id(),
            restored = n,
            "cold store: removed copies of messages restored before the restart"
        );
        Ok(())
    }
}

/// Runs until shutdown: moves pending messages of users who are not
/// connected into the cold store.
pub async fn run_spill(shard: Rc<Shard>) {
    let mut failing_since: Option<Instant> = None;
    while !shard.shutdown().is_set() {
        let spill_after = shard.cfg().backlog.spill_after_ms;
        if spill_after == 0 {
            glommio::timer::sleep(Duration::from_millis(500)).await;
            continue;
        }
        match spill_once(&shard, spill_after).await {
            Ok(n) => {
                failing_since = None;
                if n < SPILL_BATCH {
                    glommio::timer::sleep(Duration::from_millis((spill_after / 4).clamp(20, 250))).await;
                }
            }
            Err(e) => {
                if failing_since.is_none() {
                    tracing::error!(shard = shard.id(), error = %e, "cannot spill pending messages to the cold store; they stay in memory");
                }
                failing_since.get_or_insert_with(Instant::now);
                glommio::timer::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// One spill batch; returns how many messages it moved.
async fn spill_once(shard: &Shard, spill_after_ms: u64) -> Result<usize, String> {
    let backlog = shard.backlog();
    // No spill while the disk is (nearly) full: the messages are safe in the
    // journal, and a cold-store write that fails for want of space leaves
    // fjall refusing every later write (and restores) until a restart.
    if shard.journal().storage_full() {
        return Ok(0);
    }
    // Start over now and then: a message skipped while its user was
    // connected may be spillable now.
    let rescan = backlog.rescanned_at.get().is_none_or(|t| t.elapsed() >= Duration::from_secs(30));
    if rescan {
        backlog.cursor.set(0);
        backlog.rescanned_at.set(Some(Instant::now()));
    }
    let now = now_ms();
    let spill_now = shard.pressure_percent() >= SPILL_NOW_PERCENT || shard.backlog_pending_over(SPILL_PENDING_PERCENT);
    let until = if spill_now { now } else { now.saturating_sub(spill_after_ms) };
    let (candidates, next) = {
        let index = shard.index().borrow();
        let durable = shard.journal().durable_generation();
        let keep = |user: &str| shard.sessions().has(user) || backlog.holds(user);
        index.spill_candidates(backlog.cursor.get(), until, durable, SPILL_BATCH, keep)
    };
    if candidates.is_empty() {
        backlog.cursor.set(next);
        return Ok(0);
    }
    backlog.spilling.borrow_mut().clone_from(&candidates);
    let _in_flight = SpillInFlight(backlog);
    let puts = cold_copies(shard, &candidates).await?;
    let count = puts.len();
    let keys: HashMap<u64, ColdKey> = puts.iter().map(|p| (p.seq, p.key())).collect();
    blocking(shard, move |s| s.put(&puts)).await.map_err(|e| e.to_string())?;
    // Durable in the cold store. Journal as spilled those still spillable
    // (a user may have connected meanwhile); the others' cold copies go.
    let (spilled, stale): (Vec<u64>, Vec<u64>) = {
        let index = shard.index().borrow();
        let keep = |user: &str| shard.sessions().has(user) || backlog.holds(user);
        candidates.iter().partition(|&&seq| index.get(seq).is_some_and(|m| MessageIndex::spillable(m) && !keep(&m.to)))
    };
    if !spilled.is_empty() {
        let mut encoded = Vec::with_capacity(spilled.len() * 8);
        SeqList::encode(&spilled, &mut encoded);
        let mut index = shard.index().borrow_mut();
        shard.journal().append(&Record::Spilled(SeqList::new(&encoded)), &mut index).map_err(|e| e.to_string())?;
    }
    {
        let mut bodies = shard.bodies().borrow_mut();
        for &seq in &spilled {
            bodies.remove(seq);
        }
    }
    backlog.add_cold(spilled.len() as u64);
    backlog.spilled_total.set(backlog.spilled_total.get() + spilled.len() as u64);
    backlog.cursor.set(next);
    if !stale.is_empty() {
        shard.remove_cold(stale.iter().filter_map(|seq| keys.get(seq).copied()).collect()).await;
    }
    shard.pressure().wake();
    Ok(count)
}

/// Clears [`Backlog::spilling`] when a spill batch ends, however it ends.
struct SpillInFlight<'a>(&'a Backlog);

impl Drop for SpillInFlight<'_> {
    fn drop(&mut self) {
        self.0.spilling.borrow_mut().clear();
    }
}

/// Most bytes one journal read of [`cold_copies`] covers.
const SPAN_BYTES_MAX: u64 = 1 << 20;
/// Largest gap between two records read in one span.
const SPAN_GAP_MAX: u64 = 64 << 10;

/// The cold copies of `seqs`: each message's `Accepted` record, its body
/// from the body cache or read back from the journal. Journal reads are
/// grouped: messages accepted together lie together, so one read of up to
/// 1 MiB brings back the records of many (one read per message was the
/// spill's bottleneck once the body cache no longer held them).
async fn cold_copies(shard: &Shard, seqs: &[u64]) -> Result<Vec<ColdPut>, String> {
    struct Meta {
        seq: u64,
        client: Rc<str>,
        to: Rc<str>,
        priority: esh3ar_shards::Priority,
        expires: u64,
        accepted_at: u64,
        segment: u64,
        offset: u64,
        bytes: u32,
    }
    let metas: Vec<Meta> = {
        let index = shard.index().borrow();
        seqs.iter()
            .filter_map(|&seq| {
                index.get(seq).map(|m| Meta {
                    seq,
                    client: m.client.clone(),
                    to: m.to.clone(),
                    priority: m.priority,
                    expires: m.expires_at_ms,
                    accepted_at: m.accepted_at_ms,
                    segment: m.segment,
                    offset: m.offset,
                    bytes: m.record_bytes,
                })
            })
            .collect()
    };
    let mut bodies: Vec<Option<Rc<[u8]>>> = {
        let cache = shard.bodies().borrow();
        metas.iter().map(|m| cache.get(m.seq)).collect()
    };
    // The misses, by place in the journal, read in spans.
    let mut misses: Vec<usize> = (0..metas.len()).filter(|&i| bodies[i].is_none()).collect();
    misses.sort_by_key(|&i| (metas[i].segment, metas[i].offset));
    let mut at = 0;
    while at < misses.len() {
        let first = &metas[misses[at]];
        let (segment, start) = (first.segment, first.offset);
        let mut end = start + first.bytes as u64;
        let mut last = at + 1;
        while last < misses.len() {
            let m = &metas[misses[last]];
            let m_end = m.offset + m.bytes as u64;
            if m.segment != segment || m.offset > end + SPAN_GAP_MAX || m_end - start > SPAN_BYTES_MAX {
                break;
            }
            end = end.max(m_end);
            last += 1;
        }
        let span = shard.journal().read_span(segment, start, (end - start) as usize).await?;
        for &i in &misses[at..last] {
            let m = &metas[i];
            let from = (m.offset - start) as usize;
            let record = span.get(from..from + m.bytes as usize).ok_or("short journal read")?;
            match record::decode(record) {
                record::Decoded::Record { record: Record::Accepted(a) | Record::Restored(a), .. } if a.seq == m.seq => {
                    bodies[i] = Some(Rc::from(a.body));
                }
                _ => {
                    return Err(format!(
                        "no valid record of message {} at segment {segment} offset {}",
                        m.seq, m.offset
                    ))
                }
            }
        }
        at = last;
    }
    let mut puts = Vec::with_capacity(metas.len());
    for (m, body) in metas.iter().zip(bodies) {
        let Some(body) = body else { continue };
        let a = Accepted {
            seq: m.seq,
            client: &m.client,
            to: &m.to,
            priority: m.priority,
            expires_at_ms: m.expires,
            accepted_at_ms: m.accepted_at,
            body: &body,
        };
        let mut record = Vec::with_capacity(m.bytes as usize);
        record::encode(&Record::Accepted(a), &mut record);
        puts.push(ColdPut { seq: m.seq, user_hash: user_hash(&m.to), expires_at_ms: m.expires, record });
    }
    Ok(puts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bad_value_is_named() {
        let bad = BacklogConfig { spill_after_ms: u64::MAX, restore_page: 0, cache_bytes: 0, write_buffer_bytes: 1 };
        let keys: Vec<String> = bad.problems().into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            keys,
            ["backlog.spill_after_ms", "backlog.restore_page", "backlog.cache_bytes", "backlog.write_buffer_bytes"]
        );
        assert!(BacklogConfig::default().problems().is_empty());
    }
}
