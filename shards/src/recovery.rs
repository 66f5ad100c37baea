//! Recovery: read a shard's segments back, check them, and rebuild its
//! index before the shard opens its listeners.
//!
//! Runs with plain blocking file I/O (not through the storage seam): it
//! happens once, before the shard serves anything, and `esh3ar journal
//! verify` runs it offline.
//!
//! The verdicts, exact because every commit is checksummed as a whole
//! ([`crate::scan`]):
//! - intact commits up to zeros: clean;
//! - damage with an intact commit after it (in any segment), or any damage
//!   after a clean stop (the clean-shutdown marker is there), or a journal
//!   that does not end where the marker says: **corruption**. The shard
//!   refuses to start, naming the file, the offset and how many
//!   acknowledged records lie beyond the damage;
//! - damage in the last segment after a crash with no intact commit after
//!   it: the **torn last commit**, never acknowledged. It is copied to a
//!   quarantine file beside the segment, then zeroed, and the shard starts.
//!
//! Nothing is ever zeroed or cut before its bytes were copied aside.
//! `esh3ar journal repair --accept-loss` ([`repair_shard`]) is the operator's
//! way past corruption: it quarantines each damaged range and replaces it
//! with a hole commit, so the intact commits after it are kept.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::commit::hole_header;
use crate::index::MessageIndex;
use crate::limits::{BLOCK_BYTES, COMMIT_HEADER_BYTES};
use crate::record::{Record, SegmentHeader};
use crate::scan::{scan_commits, Damage, ScanEnd};

/// Name of the clean-shutdown marker in a shard's journal directory.
pub const CLEAN_MARKER: &str = "clean-shutdown";

/// Errors that stop a shard from starting. Each names the file.
#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    /// The file system failed us.
    #[error("journal I/O error on {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Acknowledged data was damaged: refuse to guess.
    #[error(
        "journal corruption in {path} at offset {offset}: {reason}; {records_beyond} acknowledged records lie \
         beyond it{after}. The engine will not start on a damaged journal: run `esh3ar journal verify` for a \
         report, restore the segment from a backup, or accept the loss of the damaged range with `esh3ar journal \
         repair --accept-loss` (its bytes are kept in a quarantine file)",
        after = next_valid.map(|n| format!(" (intact commits resume at offset {n})")).unwrap_or_default()
    )]
    Corrupt {
        /// The segment file.
        path: PathBuf,
        /// Offset of the first damaged byte.
        offset: u64,
        /// What was wrong.
        reason: &'static str,
        /// Offset of the next intact commit, if any.
        next_valid: Option<u64>,
        /// End of the damaged range.
        damaged_end: u64,
        /// Records in intact commits after the damage, in this segment.
        records_beyond: u64,
    },
    /// A clean stop left a marker that the journal does not match.
    #[error(
        "journal {path} ends at offset {found_end} but the clean shutdown recorded its end at offset \
         {marker_end} of segment {marker_segment}: acknowledged data is missing or was changed after a clean \
         stop. The engine will not start: restore the journal from a backup, or accept the loss with `esh3ar \
         journal repair --accept-loss`"
    )]
    CleanEndMismatch {
        /// The last segment file.
        path: PathBuf,
        /// Where the intact commits end.
        found_end: u64,
        /// Segment named by the marker.
        marker_segment: u64,
        /// End named by the marker.
        marker_end: u64,
    },
    /// A segment header that does not belong here.
    #[error("journal segment {path} is invalid: {reason}")]
    BadSegment {
        /// The segment file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> RecoveryError + '_ {
    move |source| RecoveryError::Io { path: path.to_owned(), source }
}

/// Where recovery leaves the last segment for the writer to continue.
#[derive(Debug)]
pub struct RecoveredTail {
    /// Segment number.
    pub segment: u64,
    /// Offset just past the last intact commit.
    pub end: u64,
    /// The bytes of the last partial block, `align_down(end)..end`, which
    /// the writer rewrites (unchanged) together with its next commit.
    pub partial_block: Vec<u8>,
    /// True when the segment has no header yet (crash right after creation).
    pub needs_header: bool,
}

/// A torn last commit found (and, in repair mode, cut off) during recovery.
#[derive(Debug, Clone)]
pub struct TornTail {
    /// The segment file.
    pub path: PathBuf,
    /// Offset of the first damaged byte.
    pub offset: u64,
    /// What was wrong.
    pub reason: &'static str,
    /// How many bytes the damaged range spans (zeroed in repair mode).
    pub damaged_bytes: u64,
    /// Records with a valid record checksum inside it (never acknowledged:
    /// their commit's fdatasync had not completed).
    pub records_inside: u64,
    /// Where the range was copied before it was zeroed (repair mode).
    pub quarantine: Option<PathBuf>,
}

/// Where a clean stop left the journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CleanShutdown {
    /// The last segment.
    pub segment: u64,
    /// Offset just past its last commit.
    pub end: u64,
    /// Sequence number of the last commit.
    pub commit_seq: u64,
}

/// A recovered shard.
#[derive(Debug)]
pub struct Recovered {
    /// The rebuilt index.
    pub index: MessageIndex,
    /// The next sequence number to assign.
    pub next_seq: u64,
    /// The next commit sequence number.
    pub next_commit_seq: u64,
    /// Segment numbers present, oldest first.
    pub segments: Vec<u64>,
    /// Where to continue writing (None: no segment yet).
    pub tail: Option<RecoveredTail>,
    /// A torn last commit, if the last crash left one.
    pub torn: Option<TornTail>,
    /// The marker of the clean stop this journal was left by, if any.
    pub clean_shutdown: Option<CleanShutdown>,
    /// Records read.
    pub records: u64,
    /// Intact commits read.
    pub commits: u64,
    /// Bytes of intact commits read.
    pub bytes: u64,
}

/// Whether recovery may change files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Cut a torn last commit off (quarantined, then zeroed) so new commits
    /// follow the intact ones.
    Repair,
    /// Only report (`journal verify`).
    ReadOnly,
}

/// File name of segment `no`.
pub fn segment_path(dir: &Path, no: u64) -> PathBuf {
    dir.join(format!("seg-{no:020}.log"))
}

/// Segment numbers present in `dir`, oldest first. Missing dir: none.
pub fn list_segments(dir: &Path) -> Result<Vec<u64>, RecoveryError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(dir)(e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let name = entry.map_err(io_err(dir))?.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(no) = name.strip_prefix("seg-").and_then(|s| s.strip_suffix(".log")).and_then(|s| s.parse().ok()) {
            out.push(no);
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// How long recovery waits for the writes of a process that was killed to
/// land before it reads the journal.
pub const WRITERS_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Waits until no earlier process can still write `path`, and returns the
/// file holding an exclusive lock that proves it.
///
/// After `kill -9`, writes the dead process had submitted to io_uring may
/// still land for a while (the ring's teardown finishes them). Read before
/// they land, a commit looks torn and is cut, and the write landing later
/// brings it back behind commits written since: the next recovery then sees
/// the commit sequence go back. The journal holds a shared flock on every
/// segment it writes (`storage::DmaStorage`), which lives as long as any
/// of its writes is in flight; this exclusive lock waits for it.
fn wait_for_writers(path: &Path) -> Result<fs::File, RecoveryError> {
    use std::os::fd::AsRawFd;
    let file = fs::File::open(path).map_err(io_err(path))?;
    let started = std::time::Instant::now();
    let mut logged = false;
    loop {
        match nix::fcntl::flock(file.as_raw_fd(), nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(()) => return Ok(file),
            Err(nix::errno::Errno::EWOULDBLOCK) | Err(nix::errno::Errno::EINTR) => {}
            // No flock here (some network file systems): no fence to wait for.
            Err(_) => return Ok(file),
        }
        if started.elapsed() > WRITERS_WAIT {
            return Err(RecoveryError::Io {
                path: path.to_owned(),
                source: std::io::Error::other(format!(
                    "another process still holds this journal segment after {} s (is an earlier esh3ar \
                     still exiting?)",
                    WRITERS_WAIT.as_secs()
                )),
            });
        }
        if !logged && started.elapsed() > std::time::Duration::from_millis(200) {
            tracing::warn!(path = %path.display(), "waiting for the writes of an earlier process to land");
            logged = true;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Waits until no other open file description holds a lock on a segment
/// of `dir` (see [`wait_for_writers`]). The engine calls it once per shard
/// before [`recover_shard`], when no file of its own is open yet; a
/// read-only look (`journal verify`, `dump`) does not wait. The locks are
/// released when this returns: the data dir's own lock keeps other engines
/// out, and what it waited for is over.
pub fn wait_for_earlier_writers(dir: &Path) -> Result<(), RecoveryError> {
    for no in list_segments(dir)? {
        wait_for_writers(&segment_path(dir, no))?;
    }
    Ok(())
}

/// True if a running process (an engine) holds the segments of `dir`: the
/// lock its writes keep ([`wait_for_earlier_writers`] waits on it). Tools
/// that must not touch what only a stopped engine leaves alone ask this.
pub fn writer_running(dir: &Path) -> Result<bool, RecoveryError> {
    use std::os::fd::AsRawFd;
    for no in list_segments(dir)? {
        let path = segment_path(dir, no);
        let file = fs::File::open(&path).map_err(io_err(&path))?;
        // Exclusive, and let go at once (on close): fails while any
        // process holds its shared lock on the segment.
        if let Err(nix::errno::Errno::EWOULDBLOCK) =
            nix::fcntl::flock(file.as_raw_fd(), nix::fcntl::FlockArg::LockExclusiveNonblock)
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// True if the segment at `path` holds nothing but zeros (pre-allocated, never written).
fn is_unwritten(path: &Path) -> Result<bool, RecoveryError> {
    use std::io::Read as _;
    let mut file = fs::File::open(path).map_err(io_err(path))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            return Ok(true);
        }
        if crate::scan::first_nonzero(&buf[..n]).is_some() {
            return Ok(false);
        }
    }
}

/// Recoveries running now, in any thread. The engine's allocator
/// (`src/huge_alloc.rs`) backs large blocks with huge pages only while one
/// runs: recovery fills tables of millions of entries at once, where a
/// fault per 4 KiB dominated; the live path grows its tables a part at a
/// time, where zeroing a whole huge page per new block cost ingest ~5%
/// (docs/PERFORMANCE.md, "Issue #9, sixth round").
static REPLAYS_RUNNING: AtomicUsize = AtomicUsize::new(0);

/// Whether a recovery is running in this process (see [`REPLAYS_RUNNING`]).
pub fn replay_running() -> bool {
    REPLAYS_RUNNING.load(Ordering::Relaxed) > 0
}

/// Counts one running recovery until dropped.
pub struct ReplayRunning(());

impl ReplayRunning {
    /// A recovery starts (recovery itself and tests of the allocator).
    pub fn enter() -> Self {
        REPLAYS_RUNNING.fetch_add(1, Ordering::Relaxed);
        Self(())
    }
}

impl Drop for ReplayRunning {
    fn drop(&mut self) {
        REPLAYS_RUNNING.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Reads every segment of shard `shard` in `dir` and rebuilds its index.
pub fn recover_shard(dir: &Path, shard: u16, mode: Mode) -> Result<Recovered, RecoveryError> {
    let _running = ReplayRunning::enter();
    let mut segments = list_segments(dir)?;
    // The journal allocates its next segment ahead (the spare, all zeros
    // until rotated into): after a crash it is not the tail, the segment
    // before it is. The writer allocates it again.
    if let [.., _, spare] = segments[..] {
        if is_unwritten(&segment_path(dir, spare))? {
            segments.pop();
        }
    }
    let clean = read_clean_marker(dir)?;
    let mut rec = Recovered {
        index: MessageIndex::new(),
        next_seq: 0,
        next_commit_seq: 1,
        segments: segments.clone(),
        tail: None,
        torn: None,
        clean_shutdown: clean,
        records: 0,
        commits: 0,
        bytes: 0,
    };
    let paths: Vec<PathBuf> = segments.iter().map(|&no| segment_path(dir, no)).collect();
    rec.index.begin_replay();
    std::thread::scope(|scope| -> Result<(), RecoveryError> {
        let reads = ReadAhead::start(scope, paths).map_err(io_err(dir))?;
        // One segment: its pre-allocated zeros would count as messages to come.
        let mut sizing = TableSizing { bytes_left: reads.sizes.iter().sum(), sampled: segments.len() < 2 };
        for (i, &no) in segments.iter().enumerate() {
            let last = i + 1 == segments.len();
            let path = segment_path(dir, no);
            let data = reads.next(&path)?;
            let end = recover_segment(SegmentAt { path: &path, no, last }, &data, shard, mode, &mut sizing, &mut rec)?;
            sizing.bytes_left -= reads.sizes[i];
            sizing.after_segment(&mut rec.index, rec.bytes);
            if last {
                if let Some(m) = clean {
                    if m.segment != no || m.end != end || m.commit_seq + 1 != rec.next_commit_seq {
                        return Err(RecoveryError::CleanEndMismatch {
                            path,
                            found_end: end,
                            marker_segment: m.segment,
                            marker_end: m.end,
                        });
                    }
                }
                let block_start = end - end % BLOCK_BYTES;
                rec.tail = Some(RecoveredTail {
                    segment: no,
                    end,
                    partial_block: data[block_start as usize..end as usize].to_vec(),
                    needs_header: end == 0,
                });
            }
            reads.recycle(data);
        }
        Ok(())
    })?;
    if segments.is_empty() {
        if let Some(m) = clean {
            return Err(RecoveryError::CleanEndMismatch {
                path: dir.to_owned(),
                found_end: 0,
                marker_segment: m.segment,
                marker_end: m.end,
            });
        }
    }
    rec.index.end_replay();
    if let Some(max) = rec.index.max_seq() {
        rec.next_seq = rec.next_seq.max(max + 1);
    }
    Ok(rec)
}

/// Most messages recovery reserves index room for ahead of reading them
/// (a table of 2^22 slots of 128 bytes, mostly untouched until filled):
/// beyond it the table grows as it fills.
const MESSAGES_RESERVE_MAX: usize = 1 << 21;

/// Bytes of the first segment recovery decodes before it sizes the
/// message table for the whole journal at the rate seen in them (four
/// commits of the largest size): enough to be a fair sample, early enough
/// that the table doubles only a few times before.
const RESERVE_SAMPLE_BYTES: usize = 4 << 20;

/// Sizes the message table ahead of the messages: a hash table that grows
/// by doubling moves every entry each time (page faults of the new table
/// included): 8% of the criterion replay's samples when the first segment
/// grew its table from empty. File sizes stand for what is left to read,
/// so the last segment's unwritten zeros count as messages to come, at
/// most one segment's worth (untouched table memory: only its control
/// bytes, one per slot, are written).
struct TableSizing {
    /// Bytes (file sizes) of the segments not yet fully decoded.
    bytes_left: u64,
    /// The first segment's sample was taken (or is not wanted).
    sampled: bool,
}

impl TableSizing {
    /// Called before each commit of the first segment, at `offset`: past
    /// [`RESERVE_SAMPLE_BYTES`], reserves room for the rest of the journal
    /// at the rate of messages seen so far.
    fn sample(&mut self, index: &mut MessageIndex, offset: usize) {
        if self.sampled || offset < RESERVE_SAMPLE_BYTES {
            return;
        }
        self.sampled = true;
        let rest = self.bytes_left.saturating_sub(offset as u64);
        index.plan_message_table(Self::expected(index, self.bytes_left, offset as u64));
        Self::reserve(index, rest, offset as u64);
    }

    /// After a segment: room for the messages of the segments still to
    /// read, at the rate of those read so far (a no-op when the sample's
    /// estimate held).
    fn after_segment(&mut self, index: &mut MessageIndex, bytes_read: u64) {
        self.sampled = true;
        Self::reserve(index, self.bytes_left, bytes_read);
    }

    fn reserve(index: &mut MessageIndex, bytes_to_read: u64, bytes_read: u64) {
        let expected = Self::expected(index, bytes_to_read, bytes_read);
        index.reserve_messages(expected.min(MESSAGES_RESERVE_MAX));
    }

    /// Messages in `bytes` of journal at the rate of those indexed in the
    /// first `bytes_read`.
    fn expected(index: &MessageIndex, bytes: u64, bytes_read: u64) -> usize {
        let n = bytes as u128 * index.len() as u128 / bytes_read.max(1) as u128;
        n.min(usize::MAX as u128) as usize
    }
}

/// One segment of the journal being recovered.
#[derive(Clone, Copy)]
struct SegmentAt<'a> {
    path: &'a Path,
    /// Its number.
    no: u64,
    /// The newest segment (where a torn last commit may lie).
    last: bool,
}

/// Reads a shard's segments on a thread of its own, one segment ahead of
/// the decoding: the read (a copy out of the page cache, or the disk's
/// read time on a cold start) overlaps the index rebuild, and the two
/// buffers are reused, so a segment's pages are faulted in once per
/// recovery rather than once per segment. At most two segments are in
/// memory: the one decoded and the one read ahead. The thread inherits the
/// shard thread's CPU (the engine pins it): with one shard per core, a
/// shard's read competes with no other shard's decoding. Waiting on it is
/// waiting on a disk read, as the decoding did before.
struct ReadAhead {
    ready: std::sync::mpsc::Receiver<io::Result<Vec<u8>>>,
    spare: std::sync::mpsc::Sender<Vec<u8>>,
    /// Each segment's file size, in order (for the index reservation).
    sizes: Vec<u64>,
}

impl ReadAhead {
    fn start<'scope>(scope: &'scope std::thread::Scope<'scope, '_>, paths: Vec<PathBuf>) -> io::Result<ReadAhead> {
        // Rendezvous: the reader hands a segment over only when the
        // decoder asks for it, so it is never more than one ahead.
        let (ready_tx, ready) = std::sync::mpsc::sync_channel(0);
        let (spare, spare_rx) = std::sync::mpsc::channel::<Vec<u8>>();
        let sizes = paths.iter().map(|p| fs::metadata(p).map_or(0, |m| m.len())).collect();
        std::thread::Builder::new().name("journal-read".into()).spawn_scoped(scope, move || {
            for path in paths {
                let buf = spare_rx.try_recv().unwrap_or_default();
                if ready_tx.send(read_into(&path, buf)).is_err() {
                    return; // recovery stopped early (an error)
                }
            }
        })?;
        Ok(ReadAhead { ready, spare, sizes })
    }

    /// The bytes of the next segment, `path`.
    fn next(&self, path: &Path) -> Result<Vec<u8>, RecoveryError> {
        match self.ready.recv() {
            Ok(read) => read.map_err(io_err(path)),
            Err(_) => Err(RecoveryError::Io {
                path: path.to_owned(),
                source: io::Error::other("the journal read-ahead thread stopped"),
            }),
        }
    }

    /// Gives a decoded segment's buffer back for the next read.
    fn recycle(&self, data: Vec<u8>) {
        let _ = self.spare.send(data);
    }
}

/// Reads the whole file at `path` into `buf` (cleared first, its capacity kept).
fn read_into(path: &Path, mut buf: Vec<u8>) -> io::Result<Vec<u8>> {
    use std::io::Read as _;
    let mut file = fs::File::open(path)?;
    let len = file.metadata()?.len() as usize;
    buf.clear();
    buf.reserve(len);
    file.read_to_end(&mut buf)?;
    Ok(buf)
}

/// Scans one segment into `rec`; returns the offset just past its intact commits.
fn recover_segment(
    at: SegmentAt<'_>,
    data: &[u8],
    shard: u16,
    mode: Mode,
    sizing: &mut TableSizing,
    rec: &mut Recovered,
) -> Result<u64, RecoveryError> {
    let SegmentAt { path, no, last } = at;
    let mut header: Option<SegmentHeader> = None;
    let mut first = true;
    let mut bad_header: Option<String> = None;
    let index = &mut rec.index;
    let mut records = 0u64;
    let scanned = scan_commits(data, |commit| {
        let Some(&(offset, record)) = commit.first() else { return };
        if first {
            first = false;
            match record {
                Record::SegmentHeader(h) if h.shard == shard && h.segment == no => header = Some(h),
                Record::SegmentHeader(h) => {
                    bad_header = Some(format!(
                        "header says shard {} segment {}, expected shard {shard} segment {no}",
                        h.shard, h.segment
                    ))
                }
                _ => bad_header = Some("first record is not a segment header".to_owned()),
            }
        }
        if bad_header.is_none() {
            sizing.sample(index, offset);
            index.apply_commit(no, commit);
        }
        records += commit.len() as u64;
    });
    if let Some(reason) = bad_header {
        return Err(RecoveryError::BadSegment { path: path.to_owned(), reason });
    }
    if let (Some(first), true) = (scanned.first_commit_seq, rec.next_commit_seq > 1) {
        if first < rec.next_commit_seq {
            return Err(corrupt(path, &damage_whole(data), "commit sequence goes back across segments"));
        }
    }
    rec.records += records;
    rec.commits += scanned.commits;
    if let Some(seq) = scanned.last_commit_seq {
        rec.next_commit_seq = seq + 1;
    }
    if let Some(h) = header {
        rec.next_seq = rec.next_seq.max(h.next_seq);
    }
    let end = scanned.end.valid_end() as u64;
    rec.bytes += end;
    let ScanEnd::Damaged(d) = scanned.end else { return Ok(end) };
    let torn = last && rec.clean_shutdown.is_none() && d.next_valid.is_none();
    if !torn {
        return Err(corrupt(path, &d, d.reason));
    }
    let quarantine = match mode {
        Mode::Repair => Some(cut_range(path, data, d.offset as u64, d.damaged_end as u64)?),
        Mode::ReadOnly => None,
    };
    rec.torn = Some(TornTail {
        path: path.to_owned(),
        offset: d.offset as u64,
        reason: d.reason,
        damaged_bytes: (d.damaged_end - d.offset) as u64,
        records_inside: d.records_inside,
        quarantine,
    });
    Ok(end)
}

fn corrupt(path: &Path, d: &Damage, reason: &'static str) -> RecoveryError {
    RecoveryError::Corrupt {
        path: path.to_owned(),
        offset: d.offset as u64,
        reason,
        next_valid: d.next_valid.map(|n| n as u64),
        damaged_end: d.damaged_end as u64,
        records_beyond: d.records_beyond,
    }
}

fn damage_whole(data: &[u8]) -> Damage {
    Damage {
        offset: 0,
        reason: "",
        next_valid: None,
        damaged_end: crate::scan::last_nonzero_end(data),
        records_beyond: 0,
        records_inside: 0,
    }
}

/// Copies `from..to` of a segment into a quarantine file beside it (made
/// durable), then zeroes the range in the segment. Returns the quarantine path.
fn cut_range(path: &Path, data: &[u8], from: u64, to: u64) -> Result<PathBuf, RecoveryError> {
    let q = quarantine(path, data, from, to)?;
    zero_range(path, from, to)?;
    Ok(q)
}

/// Copies `from..to` of a segment to `<segment>.quarantine-<from>`, durably.
fn quarantine(path: &Path, data: &[u8], from: u64, to: u64) -> Result<PathBuf, RecoveryError> {
    let q = PathBuf::from(format!("{}.quarantine-{from}", path.display()));
    let bytes = &data[from as usize..(to as usize).min(data.len())];
    write_file_durably(&q, bytes).map_err(io_err(&q))?;
    Ok(q)
}

fn zero_range(path: &Path, from: u64, to: u64) -> Result<(), RecoveryError> {
    if to <= from {
        return Ok(());
    }
    let file = fs::OpenOptions::new().write(true).open(path).map_err(io_err(path))?;
    let zeros = vec![0u8; 1 << 16];
    let mut pos = from;
    while pos < to {
        let n = ((to - pos) as usize).min(zeros.len());
        file.write_all_at(&zeros[..n], pos).map_err(io_err(path))?;
        pos += n as u64;
    }
    file.sync_data().map_err(io_err(path))?;
    Ok(())
}

/// What `journal repair --accept-loss` did to one damaged range.
#[derive(Debug, Clone)]
pub struct Repaired {
    /// The segment.
    pub path: PathBuf,
    /// The damaged range.
    pub from: u64,
    /// End of the damaged range.
    pub to: u64,
    /// Where its bytes were copied.
    pub quarantine: Option<PathBuf>,
    /// Records with a valid record checksum inside it (probably lost).
    pub records_inside: u64,
    /// What was wrong.
    pub reason: String,
}

/// `journal repair --accept-loss` for one shard: until the shard recovers,
/// quarantine each damaged range and replace it with a hole commit (intact
/// commits after it stay), or zero it when nothing intact follows; a clean
/// marker the journal does not match is removed. Returns what it changed.
pub fn repair_shard(dir: &Path, shard: u16) -> Result<Vec<Repaired>, RecoveryError> {
    let mut done = Vec::new();
    for _ in 0..10_000 {
        match recover_shard(dir, shard, Mode::Repair) {
            Ok(rec) => {
                if let Some(t) = rec.torn {
                    done.push(Repaired {
                        path: t.path,
                        from: t.offset,
                        to: t.offset + t.damaged_bytes,
                        quarantine: t.quarantine,
                        records_inside: t.records_inside,
                        reason: t.reason.to_owned(),
                    });
                }
                return Ok(done);
            }
            Err(RecoveryError::Corrupt { path, offset, reason, next_valid, damaged_end, .. }) => {
                let data = fs::read(&path).map_err(io_err(&path))?;
                let q = quarantine(&path, &data, offset, damaged_end)?;
                match next_valid {
                    Some(next) if next - offset >= COMMIT_HEADER_BYTES as u64 => {
                        let file = fs::OpenOptions::new().write(true).open(&path).map_err(io_err(&path))?;
                        file.write_all_at(&hole_header((next - offset) as usize), offset).map_err(io_err(&path))?;
                        file.sync_data().map_err(io_err(&path))?;
                    }
                    Some(_) => {
                        return Err(RecoveryError::BadSegment {
                            path,
                            reason: format!("damage at {offset} is too short to replace with a hole; restore it"),
                        })
                    }
                    None => zero_range(&path, offset, damaged_end)?,
                }
                remove_clean_marker(dir).map_err(io_err(dir))?;
                done.push(Repaired {
                    path,
                    from: offset,
                    to: damaged_end,
                    quarantine: Some(q),
                    records_inside: crate::scan::count_loose_records(&data[offset as usize..damaged_end as usize]),
                    reason: reason.to_owned(),
                });
            }
            Err(RecoveryError::CleanEndMismatch { path, found_end, marker_end, .. }) => {
                remove_clean_marker(dir).map_err(io_err(dir))?;
                done.push(Repaired {
                    path,
                    from: found_end.min(marker_end),
                    to: found_end.max(marker_end),
                    quarantine: None,
                    records_inside: 0,
                    reason: "the journal does not end where the clean shutdown left it".to_owned(),
                });
            }
            Err(e) => return Err(e),
        }
    }
    Err(RecoveryError::BadSegment { path: dir.to_owned(), reason: "too many damaged ranges to repair".to_owned() })
}

/// Reads the clean-shutdown marker of a shard, if one is there. A marker
/// that does not parse stops the start (an operator removes it to treat the
/// last stop as a crash).
pub fn read_clean_marker(dir: &Path) -> Result<Option<CleanShutdown>, RecoveryError> {
    let path = dir.join(CLEAN_MARKER);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(&path)(e)),
    };
    let field = |name: &str| -> Option<u64> {
        text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(" = ")?.trim().parse().ok())
    };
    match (field("segment"), field("end"), field("commit_seq")) {
        (Some(segment), Some(end), Some(commit_seq)) => Ok(Some(CleanShutdown { segment, end, commit_seq })),
        _ => Err(RecoveryError::BadSegment {
            path,
            reason: "the clean-shutdown marker is damaged; remove it to treat the last stop as a crash".to_owned(),
        }),
    }
}

/// Writes the clean-shutdown marker durably.
pub fn write_clean_marker(dir: &Path, m: &CleanShutdown) -> io::Result<()> {
    let text =
        format!("esh3ar clean shutdown\nsegment = {}\nend = {}\ncommit_seq = {}\n", m.segment, m.end, m.commit_seq);
    write_file_durably(&dir.join(CLEAN_MARKER), text.as_bytes())
}

/// Removes the clean-shutdown marker durably (nothing if absent).
pub fn remove_clean_marker(dir: &Path) -> io::Result<()> {
    match fs::remove_file(dir.join(CLEAN_MARKER)) {
        Ok(()) => sync_dir(dir),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Makes a directory entry durable (after creating or deleting a file).
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

/// Creates `dir` (and parents) and makes the new entry durable.
pub fn ensure_dir(dir: &Path) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    if let Some(parent) = dir.parent() {
        let _ = sync_dir(parent);
    }
    Ok(())
}

/// Writes a small file atomically (temp file, fsync, rename, dir fsync).
pub fn write_file_durably(path: &Path, contents: &[u8]) -> io::Result<()> {
    let tmp = PathBuf::from(format!("{}.tmp", path.display()));
    let mut f = fs::File::create(&tmp)?;
    f.write_all(contents)?;
    f.sync_all()?;
    fs::rename(&tmp, path)?;
    if let Some(parent) = path.parent() {
        sync_dir(parent)?;
    }
    Ok(())
}
