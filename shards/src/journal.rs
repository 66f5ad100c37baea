//! The journal writer: append records, group-commit them to O_DIRECT
//! segment files, and tell each appender when its record is durable.
//!
//! Appends are synchronous and only copy bytes into the in-memory tail of
//! the active segment; one committer task per shard writes the tail with a
//! single DMA write and one `fdatasync`, then wakes every appender whose
//! record that commit covered. At most one fdatasync is in flight; whatever
//! arrives meanwhile rides in the next one.
//!
//! The last partial block is rewritten with each commit (O_DIRECT writes
//! whole blocks). Its already-durable prefix is rewritten with the same
//! bytes, so a torn rewrite cannot damage acknowledged records: every
//! sector holds either the old or the new version of identical bytes.
//!
//! Invariants (asserted): generations grow by one per record; the durable
//! generation never passes the appended one; a commit never writes more
//! than [`COMMIT_WINDOW_BYTES`] (what recovery assumes a torn tail spans).

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use glommio::io::{DmaFile, OpenOptions};
use hashbrown::HashMap;

use crate::index::MessageIndex;
use crate::record::{encode, encoded_len, Record, SegmentHeader};
use crate::recovery::{segment_path, sync_dir, Recovered, BLOCK_BYTES};
use crate::scan::COMMIT_WINDOW_BYTES;

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

/// Where an appended record landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// Commit generation: durable once [`Journal::wait_durable`] returns.
    pub generation: u64,
    /// Segment number.
    pub segment: u64,
    /// Offset in the segment.
    pub offset: u64,
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

/// Unflushed bytes of one segment.
struct Tail {
    segment: u64,
    /// File offset of `bytes[0]`, block aligned.
    base: u64,
    bytes: Vec<u8>,
    /// `bytes[..flushed]` is durable.
    flushed: usize,
    /// (end offset in `bytes`, generation) of every record not yet durable.
    marks: VecDeque<(usize, u64)>,
    /// No more records will be added (the next segment has started).
    sealed: bool,
}

impl Tail {
    fn end_in_segment(&self) -> u64 {
        self.base + self.bytes.len() as u64
    }
}

struct Inner {
    tails: VecDeque<Tail>,
    next_seq: u64,
    appended_gen: u64,
    active_segment: u64,
}

/// One shard's journal. Single-threaded: lives in its shard's executor.
pub struct Journal {
    cfg: JournalConfig,
    inner: RefCell<Inner>,
    durable_gen: Cell<u64>,
    failed: RefCell<Option<Rc<str>>>,
    closing: Cell<bool>,
    waiters: RefCell<Vec<Waker>>,
    committer: RefCell<Option<Waker>>,
    commits: Cell<u64>,
    /// Read handles of segments, for delivering bodies not in memory.
    readers: RefCell<HashMap<u64, Rc<DmaFile>>>,
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
        use std::io::Write;
        let mut f = std::fs::File::create(&path)?;
        f.write_all(&[0x5a; BLOCK_BYTES as usize])?;
        f.sync_all()?;
    }
    let file = OpenOptions::new().read(true).write(true).dma_open(&path).await?;
    file.close().await?;
    std::fs::remove_file(&path)
}

impl Journal {
    /// Opens the journal where recovery left it. Spawn [`Journal::run_committer`]
    /// next to it; nothing becomes durable without it.
    pub fn open(cfg: JournalConfig, recovered: &Recovered) -> Rc<Self> {
        assert!(cfg.segment_bytes >= 2 * BLOCK_BYTES, "segment too small");
        let mut inner =
            Inner { tails: VecDeque::new(), next_seq: recovered.next_seq, appended_gen: 0, active_segment: 0 };
        let journal_needs_header = match &recovered.tail {
            Some(t) if !t.needs_header => {
                inner.active_segment = t.segment;
                let base = t.end - t.end % BLOCK_BYTES;
                let flushed = t.partial_block.len();
                inner.tails.push_back(Tail {
                    segment: t.segment,
                    base,
                    bytes: t.partial_block.clone(),
                    flushed,
                    marks: VecDeque::new(),
                    sealed: false,
                });
                None
            }
            Some(t) => Some(t.segment),
            None => Some(1),
        };
        let journal = Rc::new(Journal {
            cfg,
            inner: RefCell::new(inner),
            durable_gen: Cell::new(0),
            failed: RefCell::new(None),
            closing: Cell::new(false),
            waiters: RefCell::new(Vec::new()),
            committer: RefCell::new(None),
            commits: Cell::new(0),
            readers: RefCell::new(HashMap::new()),
        });
        if let Some(segment) = journal_needs_header {
            journal.start_segment(segment);
        }
        journal
    }

    /// The directory of this journal.
    pub fn dir(&self) -> &Path {
        &self.cfg.dir
    }

    /// Takes the next message sequence number.
    pub fn take_seq(&self) -> u64 {
        let mut inner = self.inner.borrow_mut();
        let seq = inner.next_seq;
        inner.next_seq += 1;
        seq
    }

    /// Number of fdatasyncs done so far.
    pub fn commits(&self) -> u64 {
        self.commits.get()
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
        let len = encoded_len(record) as u64;
        let needs_rotation = {
            let inner = self.inner.borrow();
            let tail = inner.tails.back().expect("journal always has an active tail");
            let end = tail.end_in_segment();
            end + len > self.cfg.segment_bytes && end > BLOCK_BYTES.min(self.cfg.segment_bytes / 2)
        };
        if needs_rotation {
            let next = self.inner.borrow().active_segment + 1;
            self.start_segment(next);
        }
        let appended = self.push(record);
        index.apply(appended.segment, appended.offset, record);
        if let Record::Accepted(a) = record {
            index.set_generation(a.seq, appended.generation);
        }
        Ok(appended)
    }

    fn start_segment(&self, segment: u64) {
        {
            let mut inner = self.inner.borrow_mut();
            if let Some(prev) = inner.tails.back_mut() {
                prev.sealed = true;
            }
            inner.active_segment = segment;
            inner.tails.push_back(Tail {
                segment,
                base: 0,
                bytes: Vec::with_capacity(64 * 1024),
                flushed: 0,
                marks: VecDeque::new(),
                sealed: false,
            });
        }
        let next_seq = self.inner.borrow().next_seq;
        let header = Record::SegmentHeader(SegmentHeader { shard: self.cfg.shard, segment, next_seq });
        self.push(&header);
    }

    fn push(&self, record: &Record<'_>) -> Appended {
        let mut inner = self.inner.borrow_mut();
        inner.appended_gen += 1;
        let generation = inner.appended_gen;
        let tail = inner.tails.back_mut().expect("journal always has an active tail");
        let offset = tail.end_in_segment();
        encode(record, &mut tail.bytes);
        tail.marks.push_back((tail.bytes.len(), generation));
        let segment = tail.segment;
        drop(inner);
        if let Some(w) = self.committer.borrow_mut().take() {
            w.wake();
        }
        Appended { generation, segment, offset }
    }

    /// Resolves when every record up to `generation` is durable, or with the
    /// journal's failure.
    pub fn wait_durable(&self, generation: u64) -> WaitDurable<'_> {
        WaitDurable { journal: self, generation }
    }

    /// Bytes appended and not yet durable (held in memory).
    pub fn unflushed_bytes(&self) -> usize {
        self.inner.borrow().tails.iter().map(|t| t.bytes.len() - t.flushed).sum()
    }

    /// Every record up to this generation is durable.
    pub fn durable_generation(&self) -> u64 {
        self.durable_gen.get()
    }

    /// Reads back the `Accepted` record at `offset` of `segment` (`bytes`
    /// long, as the index recorded) and returns its body. Only durable
    /// records may be read: the tail in memory is not on disk yet.
    pub async fn read_body(&self, segment: u64, offset: u64, bytes: u32) -> Result<Vec<u8>, String> {
        let path = segment_path(&self.cfg.dir, segment);
        let file = self.readers.borrow().get(&segment).cloned();
        let file = match file {
            Some(f) => f,
            None => {
                let f = Rc::new(
                    // Read-write, like the writer's handle: glommio's I/O-poll
                    // probe misjudges read-only O_DIRECT files (EOPNOTSUPP).
                    OpenOptions::new()
                        .read(true)
                        .write(true)
                        .dma_open(&path)
                        .await
                        .map_err(|e| format!("open {} for reading failed: {e}", path.display()))?,
                );
                self.readers.borrow_mut().insert(segment, f.clone());
                f
            }
        };
        let data = file
            .read_at(offset, bytes as usize)
            .await
            .map_err(|e| format!("read of {}:{offset} failed: {e}", path.display()))?;
        match crate::record::decode(&data) {
            crate::record::Decoded::Record { record: Record::Accepted(a), .. } => Ok(a.body.to_vec()),
            _ => Err(format!("no valid message record at {}:{offset}", path.display())),
        }
    }

    /// The generation of the last appended record.
    pub fn appended_generation(&self) -> u64 {
        self.inner.borrow().appended_gen
    }

    /// Flushes everything appended and stops accepting appends.
    pub async fn close(&self) -> Result<(), JournalError> {
        let last = self.appended_generation();
        self.closing.set(true);
        let result = self.wait_durable(last).await;
        if let Some(w) = self.committer.borrow_mut().take() {
            w.wake();
        }
        result
    }

    /// Deletes the oldest segments whose messages are all settled and that
    /// are fully written; returns how many were deleted.
    pub fn delete_settled_segments(&self, index: &mut MessageIndex) -> std::io::Result<usize> {
        let oldest_unflushed = self.inner.borrow().tails.front().map_or(u64::MAX, |t| t.segment);
        let deletable = index.deletable_segments(oldest_unflushed);
        for &segment in &deletable {
            let path = segment_path(&self.cfg.dir, segment);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            index.forget_segment(segment);
            self.readers.borrow_mut().remove(&segment);
            tracing::info!(shard = self.cfg.shard, segment, "deleted settled journal segment");
        }
        if !deletable.is_empty() {
            sync_dir(&self.cfg.dir)?;
        }
        Ok(deletable.len())
    }

    /// The group-commit loop. Runs until the journal is closed and drained,
    /// or fails.
    pub async fn run_committer(self: Rc<Self>) {
        let mut files: HashMap<u64, Rc<DmaFile>> = HashMap::new();
        loop {
            let Some(batch) = std::future::poll_fn(|cx| self.next_batch(cx)).await else {
                return;
            };
            if let Err(e) = self.commit(&mut files, batch).await {
                let msg: Rc<str> = Rc::from(e);
                tracing::error!(shard = self.cfg.shard, error = %msg, "journal failed; refusing further writes");
                *self.failed.borrow_mut() = Some(msg);
                self.wake_waiters();
                return;
            }
        }
    }

    /// Picks the next write: a block-aligned slice of the oldest tail,
    /// ending on a record boundary, at most the commit window long.
    fn next_batch(&self, cx: &mut Context<'_>) -> Poll<Option<Batch>> {
        let mut inner = self.inner.borrow_mut();
        loop {
            let Some(tail) = inner.tails.front() else {
                return Poll::Ready(None);
            };
            if tail.marks.is_empty() {
                if tail.sealed {
                    inner.tails.pop_front();
                    continue;
                }
                if self.closing.get() && self.durable_gen.get() == inner.appended_gen {
                    return Poll::Ready(None);
                }
                *self.committer.borrow_mut() = Some(cx.waker().clone());
                return Poll::Pending;
            }
            let start = tail.flushed - tail.flushed % BLOCK_BYTES as usize;
            let (mut end, mut generation) = tail.marks[0];
            for &(e, g) in tail.marks.iter().skip(1) {
                if e - start > COMMIT_WINDOW_BYTES {
                    break;
                }
                (end, generation) = (e, g);
            }
            return Poll::Ready(Some(Batch {
                segment: tail.segment,
                file_offset: tail.base + start as u64,
                end,
                generation,
                bytes: tail.bytes[start..end].to_vec(),
            }));
        }
    }

    async fn commit(&self, files: &mut HashMap<u64, Rc<DmaFile>>, batch: Batch) -> Result<(), String> {
        let file = match files.get(&batch.segment) {
            Some(f) => f.clone(),
            None => {
                let f = Rc::new(self.open_segment(batch.segment).await?);
                // Close files of segments that are done.
                let active: Vec<u64> = self.inner.borrow().tails.iter().map(|t| t.segment).collect();
                files.retain(|seg, _| active.contains(seg));
                files.insert(batch.segment, f.clone());
                f
            }
        };
        let padded = (batch.bytes.len() as u64).div_ceil(BLOCK_BYTES) * BLOCK_BYTES;
        let mut buf = file.alloc_dma_buffer(padded as usize);
        let dst = buf.as_bytes_mut();
        dst[..batch.bytes.len()].copy_from_slice(&batch.bytes);
        dst[batch.bytes.len()..].fill(0);
        let path = segment_path(&self.cfg.dir, batch.segment);
        let written = file
            .write_at(buf, batch.file_offset)
            .await
            .map_err(|e| format!("write of {padded} bytes at {}:{} failed: {e}", path.display(), batch.file_offset))?;
        if written as u64 != padded {
            return Err(format!("short write at {}:{} ({written} of {padded})", path.display(), batch.file_offset));
        }
        file.fdatasync().await.map_err(|e| format!("fdatasync of {} failed: {e}", path.display()))?;
        self.commits.set(self.commits.get() + 1);
        self.finish(&batch);
        Ok(())
    }

    async fn open_segment(&self, segment: u64) -> Result<DmaFile, String> {
        let path = segment_path(&self.cfg.dir, segment);
        let existed = path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .dma_open(&path)
            .await
            .map_err(|e| format!("open {} failed: {e}", path.display()))?;
        if !existed {
            file.pre_allocate(self.cfg.segment_bytes, false)
                .await
                .map_err(|e| format!("pre-allocate {} failed: {e}", path.display()))?;
            sync_dir(&self.cfg.dir).map_err(|e| format!("fsync of {} failed: {e}", self.cfg.dir.display()))?;
        }
        Ok(file)
    }

    /// Records a durable batch: advance the tail, drop full blocks, wake.
    fn finish(&self, batch: &Batch) {
        let mut inner = self.inner.borrow_mut();
        let tail = inner.tails.front_mut().expect("committed tail is still queued");
        assert_eq!(tail.segment, batch.segment, "tail changed under a commit");
        tail.flushed = batch.end;
        while tail.marks.front().is_some_and(|&(e, _)| e <= batch.end) {
            tail.marks.pop_front();
        }
        let keep_from = batch.end - batch.end % BLOCK_BYTES as usize;
        if keep_from > 0 {
            tail.bytes.drain(..keep_from);
            tail.base += keep_from as u64;
            tail.flushed -= keep_from;
            for m in tail.marks.iter_mut() {
                m.0 -= keep_from;
            }
        }
        assert!(batch.generation <= inner.appended_gen, "durable generation passed appended");
        assert!(batch.generation > self.durable_gen.get(), "durable generation went backwards");
        self.durable_gen.set(batch.generation);
        drop(inner);
        self.wake_waiters();
    }

    fn wake_waiters(&self) {
        let waiters = std::mem::take(&mut *self.waiters.borrow_mut());
        for w in waiters {
            w.wake();
        }
    }
}

struct Batch {
    segment: u64,
    file_offset: u64,
    end: usize,
    generation: u64,
    bytes: Vec<u8>,
}

/// Future of [`Journal::wait_durable`].
pub struct WaitDurable<'a> {
    journal: &'a Journal,
    generation: u64,
}

impl Future for WaitDurable<'_> {
    type Output = Result<(), JournalError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let j = self.journal;
        if j.durable_gen.get() >= self.generation {
            return Poll::Ready(Ok(()));
        }
        if let Some(e) = j.failed.borrow().as_ref() {
            return Poll::Ready(Err(JournalError::Failed(e.clone())));
        }
        j.waiters.borrow_mut().push(cx.waker().clone());
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Accepted;
    use crate::recovery::{recover_shard, Mode};
    use crate::Priority;

    fn accepted(seq: u64, body: &[u8]) -> Record<'_> {
        Record::Accepted(Accepted {
            seq,
            client: "c",
            to: "u",
            priority: Priority::Normal,
            expires_at_ms: 0,
            accepted_at_ms: 1,
            body,
        })
    }

    fn run<F: Future<Output = ()> + 'static>(f: impl FnOnce() -> F + Send + 'static) {
        glommio::LocalExecutorBuilder::default().spawn(f).unwrap().join().unwrap();
    }

    #[test]
    fn appends_survive_reopen_and_rotate() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_owned();
        let p = path.clone();
        run(move || async move {
            let rec = recover_shard(&p, 3, Mode::Repair).unwrap();
            let cfg = JournalConfig { dir: p.clone(), shard: 3, segment_bytes: 64 * 1024 };
            let j = Journal::open(cfg, &rec);
            glommio::spawn_local(j.clone().run_committer()).detach();
            let mut ix = MessageIndex::new();
            let body = vec![b'x'; 1000];
            let mut last = 0;
            for _ in 0..300 {
                let seq = j.take_seq();
                last = j.append(&accepted(seq, &body), &mut ix).unwrap().generation;
            }
            j.wait_durable(last).await.unwrap();
            assert!(j.commits() >= 1);
            j.close().await.unwrap();
        });
        let segs = crate::recovery::list_segments(&path).unwrap();
        assert!(segs.len() >= 4, "300 KB over 64 KiB segments must rotate: {segs:?}");
        let rec = recover_shard(&path, 3, Mode::ReadOnly).unwrap();
        assert_eq!(rec.index.len(), 300);
        assert_eq!(rec.next_seq, 300);
        assert!(rec.torn.is_none());
        // Reopen and keep appending in the last segment.
        let p = path.clone();
        run(move || async move {
            let rec = recover_shard(&p, 3, Mode::Repair).unwrap();
            let cfg = JournalConfig { dir: p.clone(), shard: 3, segment_bytes: 64 * 1024 };
            let j = Journal::open(cfg, &rec);
            glommio::spawn_local(j.clone().run_committer()).detach();
            let mut ix = rec.index;
            let seq = j.take_seq();
            assert_eq!(seq, 300);
            let g = j.append(&accepted(seq, b"after restart"), &mut ix).unwrap().generation;
            j.wait_durable(g).await.unwrap();
            j.close().await.unwrap();
        });
        let rec = recover_shard(&path, 3, Mode::ReadOnly).unwrap();
        assert_eq!(rec.index.len(), 301);
        assert!(rec.index.get(300).is_some());
    }
}
