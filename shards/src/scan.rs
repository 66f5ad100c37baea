//! Reading a segment back: every record of every intact commit, in order,
//! and an exact verdict on how the segment ends.
//!
//! The writer appends whole commits ([`crate::commit`]), each checksummed as
//! a whole, and at most one is in flight (written but not yet fdatasynced).
//! So the verdict needs no guess about distances: the segment is clean up to
//! the first commit that is not intact; if an intact commit follows the
//! damage, acknowledged data was hit (corruption); if none follows, the
//! damage may be the torn last commit of a crash. Whether that is allowed
//! is recovery's call (only in the last segment, only after a crash).

use crate::commit::{find_valid_commit, read_commit, CommitKind};
use crate::record::{decode, decode_trusted, Decoded, Record};

/// How a segment's commits end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScanEnd {
    /// Intact commits up to `end`, then zeros (never written).
    Clean {
        /// Offset just past the last intact commit.
        end: usize,
    },
    /// Intact commits up to `damage.offset`, then something that is not.
    Damaged(Damage),
}

/// A range that is not an intact commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// Offset of the first byte that is not part of an intact commit.
    pub offset: usize,
    /// What was wrong there.
    pub reason: &'static str,
    /// The next intact commit after the damage, if any: with one, the
    /// damage cannot be a torn last commit.
    pub next_valid: Option<usize>,
    /// Where the damaged range ends: `next_valid`, or past the last non-zero byte.
    pub damaged_end: usize,
    /// Records in the intact commits from `next_valid` on (what a cut would lose
    /// beyond the damaged range itself).
    pub records_beyond: u64,
    /// Records with a valid record checksum inside the damaged range (best
    /// effort: what the damaged commit probably held).
    pub records_inside: u64,
}

impl ScanEnd {
    /// Offset up to which commits are intact.
    pub fn valid_end(&self) -> usize {
        match self {
            ScanEnd::Clean { end } => *end,
            ScanEnd::Damaged(d) => d.offset,
        }
    }
}

/// The result of scanning one segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentScan {
    /// How it ends.
    pub end: ScanEnd,
    /// Intact record commits read.
    pub commits: u64,
    /// Sequence number of the first and the last intact record commit.
    pub first_commit_seq: Option<u64>,
    /// Sequence number of the last intact record commit.
    pub last_commit_seq: Option<u64>,
}

/// Visits every record of every intact commit of `segment` in order (with
/// the record's offset) and says how the segment ends.
///
/// Each byte's checksum is computed once: the commit's CRC covers its
/// records, which are then decoded without their own CRC.
pub fn scan<'a>(segment: &'a [u8], mut visit: impl FnMut(usize, Record<'a>)) -> SegmentScan {
    scan_commits(segment, |records| {
        for &(offset, record) in records {
            visit(offset, record);
        }
    })
}

/// [`scan`], one intact commit at a time: `visit` gets the records of each
/// (with their offsets in the segment), so a caller can look ahead over a
/// commit's records (recovery loads their users' state in groups).
pub fn scan_commits<'a>(segment: &'a [u8], mut visit: impl FnMut(&[(usize, Record<'a>)])) -> SegmentScan {
    let mut out =
        SegmentScan { end: ScanEnd::Clean { end: 0 }, commits: 0, first_commit_seq: None, last_commit_seq: None };
    let mut records: Vec<(usize, Record<'a>)> = Vec::new();
    let mut pos = 0;
    loop {
        let commit = match read_commit(segment, pos) {
            Ok(Some(c)) => c,
            Ok(None) => {
                // The rest of the segment is zeros unless a commit was
                // zeroed; skip the zeros word by word first (the tail of the
                // last segment can be most of it), then look for a commit.
                let next = segment
                    .get(pos + 1..)
                    .and_then(first_nonzero)
                    .and_then(|q| find_valid_commit(segment, pos + 1 + q));
                out.end = match next {
                    None => ScanEnd::Clean { end: pos },
                    Some(_) => ScanEnd::Damaged(damage_at(segment, pos, "zeroed commit header")),
                };
                return out;
            }
            Err(reason) => {
                out.end = ScanEnd::Damaged(damage_at(segment, pos, reason));
                return out;
            }
        };
        if commit.header.kind == CommitKind::Records {
            if out.last_commit_seq.is_some_and(|last| commit.header.seq <= last) {
                out.end = ScanEnd::Damaged(damage_at(segment, pos, "commit sequence does not grow"));
                return out;
            }
            let body_at = commit.end - commit.body.len();
            if !decode_all(commit.body, &mut records) {
                out.end = ScanEnd::Damaged(damage_at(segment, pos, "intact commit holds a malformed record"));
                return out;
            }
            for (at, _) in records.iter_mut() {
                *at += body_at;
            }
            visit(&records);
            out.commits += 1;
            out.first_commit_seq.get_or_insert(commit.header.seq);
            out.last_commit_seq = Some(commit.header.seq);
        }
        pos = commit.end;
    }
}

/// Decodes the records of an intact commit into `out` (offsets within the
/// body); false unless `body` is a whole number of well-formed records.
fn decode_all<'a>(body: &'a [u8], out: &mut Vec<(usize, Record<'a>)>) -> bool {
    out.clear();
    let mut pos = 0;
    while pos < body.len() {
        match decode_trusted(&body[pos..]) {
            Decoded::Record { record, bytes } => {
                out.push((pos, record));
                pos += bytes;
            }
            _ => return false,
        }
    }
    true
}

/// Describes the damage found at `offset`.
fn damage_at(segment: &[u8], offset: usize, reason: &'static str) -> Damage {
    let next_valid = find_valid_commit(segment, offset + 1);
    let damaged_end = next_valid.unwrap_or_else(|| last_nonzero_end(segment).max(offset));
    let records_beyond = next_valid.map_or(0, |at| count_records_from(segment, at));
    let records_inside = count_loose_records(&segment[offset..damaged_end]);
    Damage { offset, reason, next_valid, damaged_end, records_beyond, records_inside }
}

/// Records in the intact commits from `at` on, up to the next damage.
fn count_records_from(segment: &[u8], mut at: usize) -> u64 {
    let mut n = 0;
    while let Ok(Some(c)) = read_commit(segment, at) {
        let mut pos = 0;
        while let Decoded::Record { bytes, .. } = decode(&c.body[pos..]) {
            n += 1;
            pos += bytes;
            if pos >= c.body.len() {
                break;
            }
        }
        at = c.end;
    }
    n
}

/// Records with a valid record checksum anywhere in `bytes` (best effort).
pub fn count_loose_records(bytes: &[u8]) -> u64 {
    let mut n = 0;
    let mut pos = 0;
    while pos + crate::record::HEADER_BYTES <= bytes.len() {
        match decode(&bytes[pos..]) {
            Decoded::Record { bytes: len, .. } => {
                n += 1;
                pos += len;
            }
            _ => pos += 1,
        }
    }
    n
}

/// Offset of the first non-zero byte of `bytes`, if any. Tests 64 bytes at
/// a time with no branch inside (the compiler vectorises it): a byte-wise
/// search crawls through the tens of MB of zeros a segment ends with.
pub fn first_nonzero(bytes: &[u8]) -> Option<usize> {
    let mut at = 0;
    for chunk in bytes.chunks_exact(64) {
        if chunk.iter().fold(0u8, |acc, &b| acc | b) != 0 {
            break;
        }
        at += 64;
    }
    bytes[at..].iter().position(|&b| b != 0).map(|p| at + p)
}

/// Offset just past the last non-zero byte (0 if all zero).
pub fn last_nonzero_end(bytes: &[u8]) -> usize {
    bytes.iter().rposition(|&b| b != 0).map_or(0, |p| p + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commit::{body_crc, encode_header, CommitHeader};
    use crate::limits::COMMIT_HEADER_BYTES;
    use crate::record::{encode, StatusChange};
    use crate::Status;

    /// A segment of `commits` commits of `per` status records each; returns
    /// it with the offset of each commit.
    fn segment(commits: u64, per: u64, pad_to: usize) -> (Vec<u8>, Vec<usize>) {
        let mut seg = Vec::new();
        let mut offsets = Vec::new();
        for c in 0..commits {
            let mut body = Vec::new();
            for r in 0..per {
                let seq = c * per + r;
                encode(&Record::Status(StatusChange::plain(seq, Status::Delivered, seq)), &mut body);
            }
            offsets.push(seg.len());
            let h = CommitHeader {
                kind: CommitKind::Records,
                seq: c + 1,
                body_len: body.len() as u32,
                body_crc: body_crc(&body),
            };
            seg.extend_from_slice(&encode_header(&h));
            seg.extend_from_slice(&body);
        }
        seg.resize(pad_to.max(seg.len()), 0);
        (seg, offsets)
    }

    fn count(seg: &[u8]) -> (usize, SegmentScan) {
        let mut n = 0;
        let s = scan(seg, |_, _| n += 1);
        (n, s)
    }

    #[test]
    fn clean_segment_reads_every_record() {
        let (seg, offsets) = segment(10, 5, 8192);
        let (n, s) = count(&seg);
        assert_eq!(n, 50);
        assert_eq!(s.commits, 10);
        assert_eq!(s.last_commit_seq, Some(10));
        let end = offsets[9] + COMMIT_HEADER_BYTES + 5 * 28;
        assert_eq!(s.end, ScanEnd::Clean { end });
    }

    #[test]
    fn a_cut_last_commit_has_nothing_after_it() {
        let (mut seg, offsets) = segment(10, 5, 0);
        seg.truncate(offsets[9] + 50);
        seg.resize(seg.len() + 4096, 0);
        let (n, s) = count(&seg);
        assert_eq!(n, 45);
        let ScanEnd::Damaged(d) = s.end else { panic!("{:?}", s.end) };
        assert_eq!((d.offset, d.next_valid, d.records_beyond), (offsets[9], None, 0));
    }

    #[test]
    fn a_flip_anywhere_but_the_last_commit_has_valid_commits_after_it() {
        let (seg, offsets) = segment(10, 5, 4096);
        // Every byte of every commit but the last: damage is followed by intact commits.
        for at in 0..offsets[9] {
            let mut damaged = seg.clone();
            damaged[at] ^= 0x20;
            let (_, s) = count(&damaged);
            let ScanEnd::Damaged(d) = s.end else { panic!("flip at {at} unnoticed") };
            let commit = offsets.iter().rposition(|&o| o <= at).unwrap();
            assert_eq!(d.offset, offsets[commit], "flip at {at}");
            assert_eq!(d.next_valid, Some(offsets[commit + 1]), "flip at {at}");
            assert_eq!(d.records_beyond, 5 * (9 - commit as u64), "flip at {at}");
        }
        // Inside the last commit: nothing intact follows.
        let mut damaged = seg.clone();
        damaged[offsets[9] + 40] ^= 1;
        let ScanEnd::Damaged(d) = count(&damaged).1.end else { panic!() };
        assert_eq!((d.offset, d.next_valid), (offsets[9], None));
    }

    #[test]
    fn a_zeroed_block_in_the_middle_is_damage_not_an_end() {
        let (mut seg, offsets) = segment(200, 5, 0);
        let hole = offsets[50];
        seg[hole..hole + 4096].fill(0);
        let (_, s) = count(&seg);
        let ScanEnd::Damaged(d) = s.end else { panic!("{:?}", s.end) };
        assert_eq!(d.offset, hole);
        assert!(d.next_valid.is_some() && d.records_beyond > 0);
    }

    #[test]
    fn first_nonzero_finds_the_first_set_byte_anywhere() {
        let mut bytes = vec![0u8; 1000];
        assert_eq!(first_nonzero(&bytes), None);
        assert_eq!(first_nonzero(&[]), None);
        for at in [0, 1, 63, 64, 65, 500, 959, 960, 999] {
            bytes[at] = 7;
            bytes[999] = 1;
            assert_eq!(first_nonzero(&bytes), Some(at), "{at}");
            bytes[at] = 0;
            bytes[999] = 0;
        }
    }

    #[test]
    fn a_hole_commit_is_skipped() {
        let (mut seg, offsets) = segment(10, 5, 4096);
        let (from, to) = (offsets[3], offsets[5]);
        seg[from..to].fill(0xee);
        seg[from..from + COMMIT_HEADER_BYTES].copy_from_slice(&crate::commit::hole_header(to - from));
        let (n, s) = count(&seg);
        assert_eq!(n, 40);
        assert!(matches!(s.end, ScanEnd::Clean { .. }));
    }
}
