//! Recovery: read a shard's segments back, check them, and rebuild its
//! index before the shard opens its listeners.
//!
//! Runs with plain blocking file I/O: it happens once, before the shard
//! serves anything, and `esh3ar journal verify` runs it offline.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::index::MessageIndex;
use crate::record::{Record, SegmentHeader};
use crate::scan::{last_nonzero_end, scan, ScanEnd};

/// Alignment of journal writes (O_DIRECT).
pub const BLOCK_BYTES: u64 = 4096;

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
        "journal corruption in {path} at offset {offset}: {reason} (a valid record follows at offset {next_valid}); \
         the engine will not start on a damaged journal. Run `esh3ar journal verify` for a report; restore the \
         segment from a replica or backup"
    )]
    Corrupt {
        /// The segment file.
        path: PathBuf,
        /// Offset of the damaged record.
        offset: u64,
        /// What was wrong.
        reason: &'static str,
        /// Offset of the next valid record.
        next_valid: u64,
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
    /// Offset just past the last valid record.
    pub end: u64,
    /// The bytes of the last partial block, `align_down(end)..end`, which
    /// the writer rewrites (unchanged) together with its next records.
    pub partial_block: Vec<u8>,
    /// True when the segment has no header yet (crash right after creation).
    pub needs_header: bool,
}

/// A torn tail found (and, in repair mode, cut off) during recovery.
#[derive(Debug, Clone)]
pub struct TornTail {
    /// The segment file.
    pub path: PathBuf,
    /// Offset of the first damaged byte.
    pub offset: u64,
    /// What was wrong.
    pub reason: &'static str,
    /// How many damaged bytes followed (zeroed in repair mode).
    pub damaged_bytes: u64,
}

/// A recovered shard.
#[derive(Debug)]
pub struct Recovered {
    /// The rebuilt index.
    pub index: MessageIndex,
    /// The next sequence number to assign.
    pub next_seq: u64,
    /// Segment numbers present, oldest first.
    pub segments: Vec<u64>,
    /// Where to continue writing (None: no segment yet).
    pub tail: Option<RecoveredTail>,
    /// A torn tail, if the last crash left one.
    pub torn: Option<TornTail>,
    /// Records read.
    pub records: u64,
    /// Bytes of valid records read.
    pub bytes: u64,
}

/// Whether recovery may change files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Cut a torn tail off (zero it) so new records follow the valid ones.
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

/// Reads every segment of shard `shard` in `dir` and rebuilds its index.
pub fn recover_shard(dir: &Path, shard: u16, mode: Mode) -> Result<Recovered, RecoveryError> {
    let segments = list_segments(dir)?;
    let mut rec = Recovered {
        index: MessageIndex::new(),
        next_seq: 0,
        segments: segments.clone(),
        tail: None,
        torn: None,
        records: 0,
        bytes: 0,
    };
    for (i, &no) in segments.iter().enumerate() {
        let last = i + 1 == segments.len();
        let path = segment_path(dir, no);
        let data = fs::read(&path).map_err(io_err(&path))?;
        let end = recover_segment(&path, &data, shard, no, last, &mut rec)?;
        if last {
            if let Some(torn) = &rec.torn {
                if mode == Mode::Repair {
                    zero_range(&path, torn.offset, torn.offset + torn.damaged_bytes)?;
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
    }
    if let Some(max) = rec.index.max_seq() {
        rec.next_seq = rec.next_seq.max(max + 1);
    }
    Ok(rec)
}

/// Scans one segment into `rec`; returns the offset just past its records.
fn recover_segment(
    path: &Path,
    data: &[u8],
    shard: u16,
    no: u64,
    last: bool,
    rec: &mut Recovered,
) -> Result<u64, RecoveryError> {
    let mut header: Option<SegmentHeader> = None;
    let mut first = true;
    let mut bad_header: Option<String> = None;
    let index = &mut rec.index;
    let mut records = 0u64;
    let end = scan(data, |offset, record| {
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
            index.apply(no, offset as u64, &record);
        }
        records += 1;
    });
    if let Some(reason) = bad_header {
        return Err(RecoveryError::BadSegment { path: path.to_owned(), reason });
    }
    rec.records += records;
    if let Some(h) = header {
        rec.next_seq = rec.next_seq.max(h.next_seq);
    }
    match end {
        ScanEnd::Clean { end } => {
            rec.bytes += end as u64;
            Ok(end as u64)
        }
        ScanEnd::TornTail { offset, reason } if last => {
            rec.bytes += offset as u64;
            let damaged = last_nonzero_end(data).saturating_sub(offset) as u64;
            rec.torn = Some(TornTail { path: path.to_owned(), offset: offset as u64, reason, damaged_bytes: damaged });
            Ok(offset as u64)
        }
        ScanEnd::TornTail { offset, reason } => Err(RecoveryError::Corrupt {
            path: path.to_owned(),
            offset: offset as u64,
            reason,
            next_valid: offset as u64,
        }),
        ScanEnd::Corrupt { offset, reason, next_valid } => Err(RecoveryError::Corrupt {
            path: path.to_owned(),
            offset: offset as u64,
            reason,
            next_valid: next_valid as u64,
        }),
    }
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
    let tmp = path.with_extension("tmp");
    let mut f = fs::File::create(&tmp)?;
    f.write_all(contents)?;
    f.sync_all()?;
    fs::rename(&tmp, path)?;
    if let Some(parent) = path.parent() {
        sync_dir(parent)?;
    }
    Ok(())
}
