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
    stats: JournalStats,
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

    /// Appends a record to the active segment (rotating first if it would
    /// not fit) and applies it to `index`. Durable only after
    /// [`Journal::wait_durable`] on the returned generation.
    pub fn append(&self, record: &Record<'_>, index: &mut MessageIndex) -> Result<Appended, JournalError> {
        if let Some(e) = self.failed.borrow().as_ref() {
            return Err(JournalError::Failed(e.clone()));
        }
        if self.closing.get() {
            return Err(JournalError::Closed);
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
            self.gc.borrow_mut().start_segment(next);
            self.push_segment_header(next);
        }
        let appended = self.gc.borrow_mut().append(record);
        self.wake_committer();
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
        loop {
            let Some(write) = std::future::poll_fn(|cx| self.poll_write(cx)).await else {
                return;
            };
            if let Err(e) = self.commit(&mut files, write).await {
                let msg: Rc<str> = Rc::from(e);
                tracing::error!(shard = self.cfg.shard, error = %msg, "journal failed; refusing further writes");
                *self.failed.borrow_mut() = Some(msg);
                self.wake_all_waiters();
                return;
            }
        }
    }

    fn poll_write(&self, cx: &mut Context<'_>) -> Poll<Option<Write>> {
        let mut gc = self.gc.borrow_mut();
        if let Some(w) = gc.next_write() {
            return Poll::Ready(Some(w));
        }
        if self.closing.get() && gc.durable_generation() == gc.appended_generation() {
            return Poll::Ready(None);
        }
        *self.committer.borrow_mut() = Some(cx.waker().clone());
        Poll::Pending
    }

    async fn commit(&self, files: &mut HashMap<u64, Rc<S::File>>, write: Write) -> Result<(), String> {
        let path = segment_path(&self.cfg.dir, write.segment);
        let file = match files.get(&write.segment) {
            Some(f) => f.clone(),
            None => {
                let f = Rc::new(
                    self.storage
                        .open(&path, Some(self.cfg.segment_bytes))
                        .await
                        .map_err(|e| format!("open of {} failed: {e}", path.display()))?,
                );
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
                format!("write of {} bytes at {}:{} failed: {e}", write.len, path.display(), write.file_offset)
            })?;
        let synced_from = std::time::Instant::now();
        file.sync().await.map_err(|e| format!("fdatasync of {} failed: {e}", path.display()))?;
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
        // A spurious re-poll adds a second entry; both go at the next commit
        // that covers this generation, so the list stays bounded.
        j.waiters.borrow_mut().push((self.generation, cx.waker().clone()));
        Poll::Pending
    }
}

#[cfg(test)]
mod tests;
