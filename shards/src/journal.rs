//! The journal writer: append records, group-commit them to segment files,
//! and tell each appender when its record is durable.
//!
//! Appends are synchronous: they encode the record into the open commit of
//! the active segment's in-memory tail ([`GroupCommit`]) and apply it to the
//! index. One committer task per shard seals what is open, writes it with
//! one write and one fdatasync through the [`Storage`] seam, then wakes
//! every appender whose record that commit covered. At most one write is in
//! flight; whatever arrives meanwhile rides in the next commit.
//!
//! A failed write or fdatasync is never retried ("fsyncgate"): the journal
//! refuses every later append and no waiter is told "durable" again. The
//! shard answers 503 and an operator restarts the engine, which recovers
//! from what is on disk.
//!
//! Running out of disk space is not a failure: segments are pre-allocated,
//! and the *next* segment is allocated ahead (the spare) by the committer
//! right after the active one is opened. An append that would rotate with no
//! spare ready is refused ([`JournalError::Full`]) before anything of it is
//! kept, so nothing partially written is ever acknowledged, and every write
//! and fdatasync lands in space allocated beforehand. Maintenance asks for
//! the spare again once a second ([`Journal::retry_room`]) and tells the
//! journal when free space falls under the reserve
//! ([`Journal::set_low_on_space`]): new messages are then refused while
//! status records (acks, deliveries) still fit.
//!
//! A clean stop ([`Journal::close`]) leaves a clean-shutdown marker beside
//! the segments (where the journal ends and its last commit); recovery then
//! knows that nothing can be torn and treats any damage as corruption.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use glommio::io::OpenOptions;
use hashbrown::HashMap;

pub use crate::group_commit::Appended;
use crate::group_commit::{GroupCommit, Resume, Write};
use crate::histogram::{Histogram, LATENCY_BOUNDS_SECONDS, RECORDS_BOUNDS};
use crate::index::MessageIndex;
use crate::limits::{BLOCK_BYTES, SEGMENT_OVERHEAD_BYTES};
use crate::record::{encoded_len, Record, SegmentHeader};
use crate::recovery::{remove_clean_marker, segment_path, write_clean_marker, CleanShutdown, Recovered};
use crate::storage::{DmaStorage, Storage, StorageFile};

/// Journal failures. After the first, the journal accepts nothing more:
/// a failed fdatasync is never retried (the page state is unknown).
#[derive(Debug, Clone, thiserror::Error)]
pub enum JournalError {
    /// A write or fdatasync failed; the message names file and operation.
    #[error("journal failed: {0}")]
    Failed(Rc<str>),
    /// No room on the journal's file system (the next segment could not be
    /// allocated, or free space is under the reserve). Nothing of the
    /// refused append was kept; the journal accepts again once there is room.
    #[error("journal is out of disk space: {0}")]
    Full(Rc<str>),
    /// The journal is shutting down.
    #[error("journal is closed")]
    Closed,
}

/// Settings of one shard's journal.
#[derive(Debug, Clone)]
pub struct JournalConfig {
    /// `<data_dir>/shard-<n>`.
    pub dir: PathBuf,
    /// Shard number (written in each segment header).
    pub shard: u16,
    /// Segment size before rotation (also pre-allocated).
    pub segment_bytes: u64,
}

/// One shard's journal. Single-threaded: lives in its shard's executor.
pub struct Journal<S: Storage = DmaStorage> {
    cfg: JournalConfig,
    storage: S,
    gc: RefCell<GroupCommit>,
    next_seq: Cell<u64>,
    failed: RefCell<Option<Rc<str>>>,
    closing: Cell<bool>,
    /// (generation, waker) of appenders waiting for durability.
    waiters: RefCell<Vec<(u64, Waker)>>,
    committer: RefCell<Option<Waker>>,
    commits: Cell<u64>,
    /// Read handles of segments, for delivering bodies not in memory.
    readers: RefCell<HashMap<u64, Rc<S::File>>>,
    room: Room<S::File>,
    /// Something appended and not yet taken into a write must be committed
    /// now: an [`Journal::append`], a waiter, or more than one write's worth.
    urgent: Cell<bool>,
    /// When the oldest record appended with [`Journal::append_lazy`] and not
    /// yet taken into a write was appended.
    lazy_since: Cell<Option<std::time::Instant>>,
    stats: JournalStats,
}

/// The longest a record appended with [`Journal::append_lazy`] waits for a
/// commit that something else starts before the committer starts one for it.
pub const LAZY_COMMIT_DELAY: std::time::Duration = std::time::Duration::from_millis(5);

/// What the journal knows about disk space (see the module doc).
struct Room<F> {
    /// The next segment, created and pre-allocated, not yet rotated into.
    spare: Cell<Option<u64>>,
    /// Its open file, until the committer takes it.
    spare_file: RefCell<Option<(u64, Rc<F>)>>,
    /// The committer should try to allocate the spare.
    spare_wanted: Cell<bool>,
    /// The committer is allocating the spare now.
    preparing: Cell<bool>,
    /// Why the last allocation of the spare failed.
    spare_error: RefCell<Option<Rc<str>>>,
    /// A write waits for its segment, which found no room: appenders are
    /// told [`JournalError::Full`]; maintenance's retry lifts it.
    write_blocked: Cell<bool>,
    /// Set by maintenance: free space is under the reserve (new messages refused).
    low_on_space: RefCell<Option<Rc<str>>>,
    /// When the last "no room" error line was logged (rate limit).
    logged_at: Cell<Option<std::time::Instant>>,
}

impl<F> Default for Room<F> {
    fn default() -> Self {
        Room {
            spare: Cell::new(None),
            spare_file: RefCell::new(None),
            spare_wanted: Cell::new(true),
            preparing: Cell::new(false),
            spare_error: RefCell::new(None),
            write_blocked: Cell::new(false),
            low_on_space: RefCell::new(None),
            logged_at: Cell::new(None),
        }
    }
}

/// At most one "no room" error line per this many seconds per shard.
const NO_ROOM_LOG_EVERY_SECONDS: u64 = 60;

/// Why a commit did not happen.
enum CommitError {
    /// Its segment could not be allocated; nothing was written.
    NoRoom(String),
    /// A write or fdatasync failed: never retried.
    Failed(String),
}

/// The committer's next job.
enum Work {
    Write(Write),
    AllocateSpare(u64),
}

/// ENOSPC or EDQUOT: the file system (or the quota) has no room.
pub fn is_no_room(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)) || e.kind() == std::io::ErrorKind::StorageFull
}

/// What `/metrics` shows of one journal: plain cells, this shard's only.
#[derive(Debug)]
pub struct JournalStats {
    /// Seconds each fdatasync took.
    pub fsync_seconds: Histogram,
    /// Records made durable by each write + fdatasync.
    pub commit_records: Histogram,
    /// Bytes written to segments (whole writes, a rewritten block prefix included).
    pub bytes_written: Cell<u64>,
}

impl Default for JournalStats {
    fn default() -> Self {
        JournalStats {
            fsync_seconds: Histogram::new(LATENCY_BOUNDS_SECONDS),
            commit_records: Histogram::new(RECORDS_BOUNDS),
            bytes_written: Cell::new(0),
        }
    }
}

/// Teaches glommio whether the journal's device supports polled I/O.
///
/// glommio probes that on the first O_DIRECT file it opens on a device (per
/// thread) by reading its first block. On an empty or freshly allocated
/// file that read never reaches the device, so the probe wrongly reports
/// support and later reads fail with EOPNOTSUPP. Opening first a file whose
/// block is really on disk makes the probe exercise the device. Call once
/// per shard before [`Journal::open`].
pub async fn probe_device(dir: &Path) -> std::io::Result<()> {
    let path = dir.join("io-probe");
    {
        use std::io::Write as _;
        let mut f = std::fs::File::create(&path)?;
        f.write_all(&[0x5a; BLOCK_BYTES as usize])?;
        f.sync_all()?;
    }
    let file = OpenOptions::new().read(true).write(true).dma_open(&path).await?;
    file.close().await?;
    std::fs::remove_file(&path)
}

impl Journal<DmaStorage> {
    /// Opens the journal on the real disk where recovery left it (with the
    /// test fault plan of `ESH3AR_TEST_STORAGE_FAULT`, if set). Spawn
    /// [`Journal::run_committer`] next to it; nothing becomes durable without it.
    pub fn open(cfg: JournalConfig, recovered: &Recovered) -> Result<Rc<Self>, JournalError> {
        Self::open_with(DmaStorage::from_env(), cfg, recovered)
    }
}

impl<S: Storage> Journal<S> {
    /// Opens the journal over `storage` where recovery left it. Removes a
    /// clean-shutdown marker first (durably): from now on the journal may
    /// be torn by a crash again.
    pub fn open_with(storage: S, cfg: JournalConfig, recovered: &Recovered) -> Result<Rc<Self>, JournalError> {
        assert!(cfg.segment_bytes >= 2 * BLOCK_BYTES, "segment too small");
        remove_clean_marker(&cfg.dir).map_err(|e| {
            JournalError::Failed(Rc::from(format!(
                "cannot remove the clean-shutdown marker in {}: {e}",
                cfg.dir.display()
            )))
        })?;
        let resume = recovered.tail.as_ref().filter(|t| !t.needs_header).map(|t| Resume {
            segment: t.segment,
            end: t.end,
            partial_block: t.partial_block.clone(),
            next_commit_seq: recovered.next_commit_seq,
        });
        let first_segment = match &recovered.tail {
            Some(t) if t.needs_header => Some(t.segment),
            Some(_) => None,
            None => Some(1),
        };
        let journal = Rc::new(Journal {
            cfg,
            storage,
            gc: RefCell::new(GroupCommit::new(resume)),
            next_seq: Cell::new(recovered.next_seq),
            failed: RefCell::new(None),
            closing: Cell::new(false),
            waiters: RefCell::new(Vec::new()),
            committer: RefCell::new(None),
            commits: Cell::new(0),
            readers: RefCell::new(HashMap::new()),
            room: Room::default(),
            urgent: Cell::new(false),
            lazy_since: Cell::new(None),
            stats: JournalStats::default(),
        });
        if let Some(segment) = first_segment {
            journal.gc.borrow_mut().start_segment(segment);
            journal.push_segment_header(segment);
        }
        Ok(journal)
    }

    /// The directory of this journal.
    pub fn dir(&self) -> &Path {
        &self.cfg.dir
    }

    /// Takes the next message sequence number.
    pub fn take_seq(&self) -> u64 {
        let seq = self.next_seq.get();
        self.next_seq.set(seq + 1);
        seq
    }

    /// Number of fdatasyncs done so far.
    pub fn commits(&self) -> u64 {
        self.commits.get()
    }

    /// Fsync latency, records per commit, bytes written.
    pub fn stats(&self) -> &JournalStats {
        &self.stats
    }

    /// The error that stopped the journal, if any.
    pub fn failure(&self) -> Option<Rc<str>> {
        self.failed.borrow().clone()
    }

    /// True while the journal refuses new messages for want of disk space
    /// (free space under the reserve, or the next segment not allocatable).
    pub fn storage_full(&self) -> bool {
        self.room.low_on_space.borrow().is_some() || self.room.spare_error.borrow().is_some()
    }

    /// Maintenance: free space is under the reserve (`Some(why)`, new
    /// messages refused) or not (`None`).
    pub fn set_low_on_space(&self, why: Option<String>) {
        let was = self.room.low_on_space.borrow().is_some();
        match why {
            Some(why) => {
                if !was || self.no_room_log_due() {
                    tracing::error!(shard = self.cfg.shard, dir = %self.cfg.dir.display(), reason = %why,
                        "journal disk is nearly full; refusing new messages (503 storage_full) until there is room");
                }
                *self.room.low_on_space.borrow_mut() = Some(Rc::from(why));
            }
            None if was => {
                tracing::info!(shard = self.cfg.shard, dir = %self.cfg.dir.display(),
                    "journal disk has room again; accepting new messages");
                *self.room.low_on_space.borrow_mut() = None;
            }
            None => {}
        }
    }

    /// Maintenance, once a second: if the spare segment is missing, ask the
    /// committer to allocate it again (space may have been freed).
    pub fn retry_room(&self) {
        if (self.room.spare.get().is_none() || self.room.write_blocked.get()) && !self.room.preparing.get() {
            self.room.spare_wanted.set(true);
            self.wake_committer();
        }
    }

    fn no_room_log_due(&self) -> bool {
        let due = self.room.logged_at.get().is_none_or(|t| t.elapsed().as_secs() >= NO_ROOM_LOG_EVERY_SECONDS);
        if due {
            self.room.logged_at.set(Some(std::time::Instant::now()));
        }
        due
    }

    /// Appends a record to the active segment (rotating first if it would
    /// not fit) and applies it to `index`. Durable only after
    /// [`Journal::wait_durable`] on the returned generation.
    ///
    /// Refused with [`JournalError::Full`], before anything is kept, when
    /// the record needs a new segment and none is allocated, or when it is
    /// a new message and free space is under the reserve.
    pub fn append(&self, record: &Record<'_>, index: &mut MessageIndex) -> Result<Appended, JournalError> {
        self.append_as(record, index, false)
    }

    /// Like [`Journal::append`], but starts no commit for this record
    /// alone: it goes with the next commit that an [`Journal::append`] or a
    /// [`Journal::wait_durable`] starts, or with one the committer starts
    /// [`LAZY_COMMIT_DELAY`] after it at the latest.
    ///
    /// For records whose loss in a crash costs only a repeat (a delivery
    /// attempt, an ack: the message is delivered again, at least once
    /// still holds) and that nobody waits for. At light load each message
    /// otherwise paid three commits (accepted, delivered, acked), each a
    /// write and an fdatasync the next message's commit could queue behind;
    /// now the two status records ride with the next message's.
    pub fn append_lazy(&self, record: &Record<'_>, index: &mut MessageIndex) -> Result<Appended, JournalError> {
        self.append_as(record, index, true)
    }

    fn append_as(&self, record: &Record<'_>, index: &mut MessageIndex, lazy: bool) -> Result<Appended, JournalError> {
        if let Some(e) = self.failed.borrow().as_ref() {
            return Err(JournalError::Failed(e.clone()));
        }
        if self.closing.get() {
            return Err(JournalError::Closed);
        }
        if self.room.write_blocked.get() {
            let why = self.room.spare_error.borrow().clone().unwrap_or_else(|| Rc::from("no room"));
            return Err(JournalError::Full(why));
        }
        if let (Record::Accepted(_), Some(why)) = (record, self.room.low_on_space.borrow().as_ref()) {
            return Err(JournalError::Full(why.clone()));
        }
        let len = encoded_len(record);
        let rotate_to = {
            let gc = self.gc.borrow();
            // A segment holding only its header takes the record anyway:
            // config check guarantees a message fits an empty segment.
            (gc.active_end_after(len) > self.cfg.segment_bytes && gc.active_end() > SEGMENT_OVERHEAD_BYTES as u64)
                .then(|| gc.active_segment().map_or(1, |s| s + 1))
        };
        if let Some(next) = rotate_to {
            // Without a spare the committer allocates the segment when it
            // first writes there (a burst can outrun the spare); but once
            // an allocation found no room, rotating is refused up front.
            if self.room.spare.get() != Some(next) {
                if let Some(why) = self.room.spare_error.borrow().as_ref() {
                    return Err(JournalError::Full(why.clone()));
                }
            }
            self.room.spare.set(None);
            self.room.spare_wanted.set(true);
            self.gc.borrow_mut().start_segment(next);
            self.push_segment_header(next);
        }
        let appended = self.gc.borrow_mut().append(record);
        if lazy {
            if self.lazy_since.get().is_none() {
                self.lazy_since.set(Some(std::time::Instant::now()));
                // The committer arms its timer for it.
                self.wake_committer();
            }
        } else {
            self.urgent.set(true);
            self.wake_committer();
        }
        index.apply(appended.segment, appended.offset, record);
        if let Record::Accepted(a) | Record::Restored(a) = record {
            index.set_generation(a.seq, appended.generation);
        }
        Ok(appended)
    }

    fn push_segment_header(&self, segment: u64) {
        let header =
            Record::SegmentHeader(SegmentHeader { shard: self.cfg.shard, segment, next_seq: self.next_seq.get() });
        self.gc.borrow_mut().append(&header);
        self.urgent.set(true);
        self.wake_committer();
    }

    fn wake_committer(&self) {
        if let Some(w) = self.committer.borrow_mut().take() {
            w.wake();
        }
    }

    /// Resolves when every record up to `generation` is durable, or with the
    /// journal's failure.
    pub fn wait_durable(&self, generation: u64) -> WaitDurable<'_, S> {
        WaitDurable { journal: self, generation }
    }

    /// Bytes appended and not yet durable (held in memory).
    pub fn unflushed_bytes(&self) -> usize {
        self.gc.borrow().unflushed_bytes()
    }

    /// Every record up to this generation is durable.
    pub fn durable_generation(&self) -> u64 {
        self.gc.borrow().durable_generation()
    }

    /// The oldest segment holding bytes not yet durable: segments before it
    /// are the ones maintenance may delete or carry entries out of.
    pub fn oldest_unflushed_segment(&self) -> u64 {
        self.gc.borrow().oldest_unflushed_segment()
    }

    /// The generation of the last appended record.
    pub fn appended_generation(&self) -> u64 {
        self.gc.borrow().appended_generation()
    }

    /// Reads back the `Accepted` record at `offset` of `segment` (`bytes`
    /// long, as the index recorded) and returns its body. Only durable
    /// records may be read: the tail in memory is not on disk yet.
    pub async fn read_body(&self, segment: u64, offset: u64, bytes: u32) -> Result<Vec<u8>, String> {
        let data = self.read_span(segment, offset, bytes as usize).await?;
        match crate::record::decode(&data) {
            crate::record::Decoded::Record { record: Record::Accepted(a) | Record::Restored(a), .. } => {
                Ok(a.body.to_vec())
            }
            _ => Err(format!("no valid message record at {}:{offset}", segment_path(&self.cfg.dir, segment).display())),
        }
    }

    /// Reads `len` durable bytes of `segment` from `offset` (one read: the
    /// offline backlog reads the records of many messages at once).
    pub async fn read_span(&self, segment: u64, offset: u64, len: usize) -> Result<Vec<u8>, String> {
        let path = segment_path(&self.cfg.dir, segment);
        let file = self.readers.borrow().get(&segment).cloned();
        let file = match file {
            Some(f) => f,
            None => {
                let f = Rc::new(
                    self.storage
                        .open(&path, None)
                        .await
                        .map_err(|e| format!("open {} for reading failed: {e}", path.display()))?,
                );
                self.readers.borrow_mut().insert(segment, f.clone());
                f
            }
        };
        file.read_at(offset, len).await.map_err(|e| format!("read of {}:{offset} failed: {e}", path.display()))
    }

    /// Flushes everything appended, stops accepting appends, and leaves the
    /// clean-shutdown marker (only if everything is durable).
    pub async fn close(&self) -> Result<(), JournalError> {
        let last = self.appended_generation();
        self.closing.set(true);
        self.wake_committer();
        self.wait_durable(last).await?;
        // A clean stop leaves no segment beyond the recorded end.
        while self.room.preparing.get() {
            glommio::timer::sleep(std::time::Duration::from_millis(1)).await;
        }
        if let Some(spare) = self.room.spare.take() {
            self.room.spare_file.borrow_mut().take();
            let path = segment_path(&self.cfg.dir, spare);
            self.storage.remove(&path).and_then(|()| self.storage.sync_dir(&self.cfg.dir)).map_err(|e| {
                JournalError::Failed(Rc::from(format!("cannot remove the spare segment {}: {e}", path.display())))
            })?;
        }
        let end = self.gc.borrow().clean_end();
        if let Some((segment, end, commit_seq)) = end {
            let marker = CleanShutdown { segment, end, commit_seq };
            write_clean_marker(&self.cfg.dir, &marker).map_err(|e| {
                JournalError::Failed(Rc::from(format!(
                    "cannot write the clean-shutdown marker in {}: {e}",
                    self.cfg.dir.display()
                )))
            })?;
        }
        Ok(())
    }

    /// Deletes the oldest segments whose messages are all settled and that
    /// are fully written; returns how many were deleted.
    ///
    /// A segment becomes deletable when the records that settled its
    /// messages are *appended*, not when they are durable: deleting it
    /// before they are would let a crash forget both the message and its
    /// final status. So deletion takes two calls: [`Journal::settled_segments`]
    /// names the candidates and the generation that settled them; once that
    /// generation is durable, this deletes the candidates still deletable.
    pub fn delete_settled_segments(&self, index: &mut MessageIndex, candidates: &[u64]) -> std::io::Result<usize> {
        let oldest_unflushed = self.gc.borrow().oldest_unflushed_segment();
        let deletable: Vec<u64> =
            index.deletable_segments(oldest_unflushed).into_iter().take_while(|s| candidates.contains(s)).collect();
        for &segment in &deletable {
            self.storage.remove(&segment_path(&self.cfg.dir, segment))?;
            index.forget_segment(segment);
            self.readers.borrow_mut().remove(&segment);
            tracing::info!(shard = self.cfg.shard, segment, "deleted settled journal segment");
        }
        if !deletable.is_empty() {
            self.storage.sync_dir(&self.cfg.dir)?;
        }
        Ok(deletable.len())
    }

    /// The segments that may be deleted now, and the generation that must be
    /// durable before they are (see [`Journal::delete_settled_segments`]).
    pub fn settled_segments(&self, index: &MessageIndex) -> (Vec<u64>, u64) {
        let oldest_unflushed = self.gc.borrow().oldest_unflushed_segment();
        (index.deletable_segments(oldest_unflushed), self.appended_generation())
    }

    /// The group-commit loop. Runs until the journal is closed and drained,
    /// or fails.
    pub async fn run_committer(self: Rc<Self>) {
        let mut files: HashMap<u64, Rc<S::File>> = HashMap::new();
        // The timer for the oldest lazy record (`lazy_since`): both are
        // cleared together when a write takes what was appended.
        let mut linger: Option<glommio::timer::Timer> = None;
        loop {
            let write = match std::future::poll_fn(|cx| self.poll_work(cx, &mut linger)).await {
                None => return,
                Some(Work::AllocateSpare(segment)) => {
                    self.allocate_spare(segment).await;
                    continue;
                }
                Some(Work::Write(write)) => write,
            };
            let result = match self.commit(&mut files, write).await {
                Err(CommitError::NoRoom(why)) if !self.closing.get() => {
                    self.block_on_no_room(why);
                    continue;
                }
                Err(CommitError::NoRoom(e) | CommitError::Failed(e)) => Err(e),
                Ok(()) => Ok(()),
            };
            if let Err(e) = result {
                let msg: Rc<str> = Rc::from(e);
                tracing::error!(shard = self.cfg.shard, error = %msg, "journal failed; refusing further writes");
                *self.failed.borrow_mut() = Some(msg);
                self.wake_all_waiters();
                return;
            }
        }
    }

    fn poll_work(&self, cx: &mut Context<'_>, linger: &mut Option<glommio::timer::Timer>) -> Poll<Option<Work>> {
        let mut gc = self.gc.borrow_mut();
        if self.room.write_blocked.get() {
            if !self.room.spare_wanted.get() && !self.closing.get() {
                *self.committer.borrow_mut() = Some(cx.waker().clone());
                return Poll::Pending;
            }
            // Maintenance's retry (or a stop, which then fails the journal
            // if there is still no room: nothing it holds was acknowledged).
            self.room.spare_wanted.set(false);
            self.room.write_blocked.set(false);
        }
        if self.commit_due(cx, linger) {
            let write = gc.next_write();
            // Whatever a write leaves behind (more than one write's worth
            // was appended) is due at once as well.
            self.urgent.set(write.as_ref().is_some_and(|w| w.generation < gc.appended_generation()));
            self.lazy_since.set(None);
            *linger = None;
            if let Some(w) = write {
                return Poll::Ready(Some(Work::Write(w)));
            }
        }
        if self.room.spare_wanted.get() && !self.closing.get() && self.room.spare.get().is_none() {
            self.room.spare_wanted.set(false);
            if let Some(active) = gc.active_segment() {
                self.room.preparing.set(true);
                return Poll::Ready(Some(Work::AllocateSpare(active + 1)));
            }
        }
        if self.closing.get() && gc.durable_generation() == gc.appended_generation() {
            return Poll::Ready(None);
        }
        *self.committer.borrow_mut() = Some(cx.waker().clone());
        Poll::Pending
    }

    /// Whether what is appended should be written now: something urgent,
    /// the journal closing, or lazy records older than [`LAZY_COMMIT_DELAY`]
    /// (a timer wakes the committer then).
    fn commit_due(&self, cx: &mut Context<'_>, linger: &mut Option<glommio::timer::Timer>) -> bool {
        if self.urgent.get() || self.closing.get() {
            return true;
        }
        let Some(since) = self.lazy_since.get() else { return false };
        let timer =
            linger.get_or_insert_with(|| glommio::timer::Timer::new(LAZY_COMMIT_DELAY.saturating_sub(since.elapsed())));
        Pin::new(timer).poll(cx).is_ready()
    }

    /// Creates and pre-allocates `segment` ahead of the rotation into it.
    /// No room (or any other error) leaves no file behind and no spare: the
    /// next rotation is refused until maintenance's retry succeeds.
    async fn allocate_spare(&self, segment: u64) {
        let path = segment_path(&self.cfg.dir, segment);
        // A file left there is not part of the journal (it lies beyond the
        // active segment): a failed allocation of an earlier try.
        let result = match self.storage.remove(&path) {
            Ok(()) => self.storage.open(&path, Some(self.cfg.segment_bytes)).await,
            Err(e) => Err(e),
        };
        self.room.preparing.set(false);
        match result {
            Ok(file) if !self.closing.get() => {
                *self.room.spare_file.borrow_mut() = Some((segment, Rc::new(file)));
                self.room.spare.set(Some(segment));
                if self.room.spare_error.borrow_mut().take().is_some() {
                    tracing::info!(shard = self.cfg.shard, dir = %self.cfg.dir.display(),
                        "journal disk has room again: next segment allocated");
                }
            }
            Ok(_) => {
                let _ = self.storage.remove(&path);
            }
            Err(e) => {
                if let Err(e) = self.storage.remove(&path) {
                    tracing::warn!(shard = self.cfg.shard, path = %path.display(), error = %e,
                        "cannot remove a segment whose allocation failed");
                }
                let full = is_no_room(&e);
                let why: Rc<str> =
                    Rc::from(format!("cannot allocate {} bytes for {}: {e}", self.cfg.segment_bytes, path.display()));
                let first = self.room.spare_error.borrow().is_none();
                if first || self.no_room_log_due() {
                    tracing::error!(shard = self.cfg.shard, dir = %self.cfg.dir.display(), reason = %why, no_room = full,
                        "journal cannot allocate its next segment; new appends that need it get 503 storage_full until there is room");
                }
                *self.room.spare_error.borrow_mut() = Some(why);
            }
        }
    }

    /// A segment could not be allocated when first written: its bytes stay
    /// in memory, unwritten; appenders waiting on them get
    /// [`JournalError::Full`], and maintenance's retry tries again.
    fn block_on_no_room(&self, why: String) {
        if self.room.spare_error.borrow().is_none() || self.no_room_log_due() {
            tracing::error!(shard = self.cfg.shard, dir = %self.cfg.dir.display(), reason = %why,
                "journal cannot allocate a segment; appends get 503 storage_full until there is room");
        }
        *self.room.spare_error.borrow_mut() = Some(Rc::from(why));
        self.room.write_blocked.set(true);
        self.wake_all_waiters();
    }

    async fn commit(&self, files: &mut HashMap<u64, Rc<S::File>>, write: Write) -> Result<(), CommitError> {
        let path = segment_path(&self.cfg.dir, write.segment);
        let spare = self.room.spare_file.borrow_mut().take_if(|(s, _)| *s == write.segment).map(|(_, f)| f);
        let file = match files.get(&write.segment).cloned().or(spare) {
            Some(f) => {
                if !files.contains_key(&write.segment) {
                    let oldest = self.gc.borrow().oldest_unflushed_segment();
                    files.retain(|&seg, _| seg >= oldest);
                    files.insert(write.segment, f.clone());
                }
                f
            }
            None => {
                let f = match self.storage.open(&path, Some(self.cfg.segment_bytes)).await {
                    Ok(f) => Rc::new(f),
                    Err(e) if is_no_room(&e) && write.file_offset == 0 => {
                        // Nothing of this segment was ever written: take the
                        // write back and remove the file, so the next try
                        // allocates it whole.
                        self.gc.borrow_mut().abandon(write);
                        let _ = self.storage.remove(&path);
                        return Err(CommitError::NoRoom(format!(
                            "cannot allocate {} bytes for {}: {e}",
                            self.cfg.segment_bytes,
                            path.display()
                        )));
                    }
                    Err(e) => return Err(CommitError::Failed(format!("open of {} failed: {e}", path.display()))),
                };
                // Close the files of segments that are fully written.
                let oldest = self.gc.borrow().oldest_unflushed_segment();
                files.retain(|&seg, _| seg >= oldest);
                files.insert(write.segment, f.clone());
                f
            }
        };
        file.write_at(write.file_offset, write.len, |dst| dst.copy_from_slice(self.gc.borrow().write_bytes(&write)))
            .await
            .map_err(|e| {
                CommitError::Failed(format!(
                    "write of {} bytes at {}:{} failed: {e}",
                    write.len,
                    path.display(),
                    write.file_offset
                ))
            })?;
        let synced_from = std::time::Instant::now();
        file.sync().await.map_err(|e| CommitError::Failed(format!("fdatasync of {} failed: {e}", path.display())))?;
        self.stats.fsync_seconds.observe(synced_from.elapsed().as_secs_f64());
        self.stats.commit_records.observe((write.generation - self.durable_generation()) as f64);
        self.stats.bytes_written.set(self.stats.bytes_written.get() + write.len as u64);
        self.gc.borrow_mut().complete(write);
        self.commits.set(self.commits.get() + 1);
        self.wake_durable_waiters();
        Ok(())
    }

    /// Wakes the appenders whose generation is durable now.
    fn wake_durable_waiters(&self) {
        let durable = self.durable_generation();
        let mut ready = Vec::new();
        self.waiters.borrow_mut().retain(|(g, w)| {
            if *g <= durable {
                ready.push(w.clone());
                false
            } else {
                true
            }
        });
        for w in ready {
            w.wake();
        }
    }

    fn wake_all_waiters(&self) {
        let waiters = std::mem::take(&mut *self.waiters.borrow_mut());
        for (_, w) in waiters {
            w.wake();
        }
    }
}

/// Future of [`Journal::wait_durable`].
pub struct WaitDurable<'a, S: Storage> {
    journal: &'a Journal<S>,
    generation: u64,
}

impl<S: Storage> Future for WaitDurable<'_, S> {
    type Output = Result<(), JournalError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let j = self.journal;
        if j.durable_generation() >= self.generation {
            return Poll::Ready(Ok(()));
        }
        if let Some(e) = j.failed.borrow().as_ref() {
            return Poll::Ready(Err(JournalError::Failed(e.clone())));
        }
        if j.room.write_blocked.get() {
            let why = j.room.spare_error.borrow().clone().unwrap_or_else(|| Rc::from("no room"));
            return Poll::Ready(Err(JournalError::Full(why)));
        }
        // A spurious re-poll adds a second entry; both go at the next commit
        // that covers this generation, so the list stays bounded.
        j.waiters.borrow_mut().push((self.generation, cx.waker().clone()));
        // Someone waits: lazy records up to here are due now (unless the
        // write in flight already takes them).
        if !j.urgent.get() && self.generation > j.gc.borrow().taken_generation() {
            j.urgent.set(true);
            j.wake_committer();
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests;
