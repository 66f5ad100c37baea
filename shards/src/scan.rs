//! Reading a segment back: every record in order, and a verdict on how the
//! segment ends.
//!
//! The writer appends whole group commits with one write of at most
//! [`COMMIT_WINDOW_BYTES`] followed by one fdatasync, so a crash can only
//! damage bytes of the last, unacknowledged commit. A scan that meets an
//! invalid record therefore looks past it: if any valid record lies beyond
//! the commit window, the damage is in the middle of acknowledged data
//! ([`ScanEnd::Corrupt`]: the engine refuses to start); otherwise it is a
//! torn tail ([`ScanEnd::TornTail`]: truncated, the records before it kept).

use crate::record::{decode, Decoded, Record, HEADER_BYTES};

/// The most bytes one group commit writes before its fdatasync. The torn
/// tail of a crash lies within this many bytes of the last durable record.
pub const COMMIT_WINDOW_BYTES: usize = 1 << 20;

/// How a segment's record stream ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScanEnd {
    /// Valid records up to `end`, then zeros (never written).
    Clean {
        /// Offset just past the last valid record.
        end: usize,
    },
    /// Valid records up to `offset`, then damage that can only be the
    /// unacknowledged last commit of a crash.
    TornTail {
        /// Offset of the first damaged byte (= end of the valid records).
        offset: usize,
        /// What was wrong at `offset`.
        reason: &'static str,
    },
    /// Damage at `offset` followed by valid records: acknowledged data was
    /// damaged after it was written.
    Corrupt {
        /// Offset of the damaged record.
        offset: usize,
        /// What was wrong at `offset`.
        reason: &'static str,
        /// Offset of a valid record found after the damage.
        next_valid: usize,
    },
}

impl ScanEnd {
    /// Offset up to which records are valid.
    pub fn valid_end(&self) -> usize {
        match *self {
            ScanEnd::Clean { end } => end,
            ScanEnd::TornTail { offset, .. } | ScanEnd::Corrupt { offset, .. } => offset,
        }
    }
}

/// Visits every valid record of `segment` in order (with its offset) and
/// says how the segment ends.
pub fn scan<'a>(segment: &'a [u8], mut visit: impl FnMut(usize, Record<'a>)) -> ScanEnd {
    let mut pos = 0;
    loop {
        match decode(&segment[pos..]) {
            Decoded::Record { record, bytes } => {
                visit(pos, record);
                pos += bytes;
            }
            Decoded::End => {
                // Zeros here; a valid record further on means a torn commit
                // left a hole (fine, within the window) or damage (not fine).
                return classify(segment, pos, "zeroed record header", true);
            }
            Decoded::Invalid(reason) => return classify(segment, pos, reason, false),
        }
    }
}

fn classify(segment: &[u8], offset: usize, reason: &'static str, zeros: bool) -> ScanEnd {
    let window_end = offset.saturating_add(COMMIT_WINDOW_BYTES);
    match last_valid_record_after(segment, offset + 1) {
        Some(next) if next >= window_end => ScanEnd::Corrupt { offset, reason, next_valid: next },
        None if zeros => ScanEnd::Clean { end: offset },
        _ => ScanEnd::TornTail { offset, reason },
    }
}

/// Offset of the last position after `from` where a valid record starts.
fn last_valid_record_after(segment: &[u8], from: usize) -> Option<usize> {
    let mut found = None;
    let mut pos = from;
    while pos + HEADER_BYTES <= segment.len() {
        // Cheap pre-filter: a plausible length that fits in the segment.
        let len = u32::from_le_bytes([segment[pos], segment[pos + 1], segment[pos + 2], segment[pos + 3]]) as usize;
        if len == 0 {
            // Skip a zero run fast: the next length can start at most 3
            // bytes before the next non-zero byte.
            match segment[pos..].iter().position(|&b| b != 0) {
                Some(q) => pos = (pos + q).saturating_sub(3).max(pos + 1),
                None => break,
            }
            continue;
        }
        if pos + HEADER_BYTES + len <= segment.len() {
            if let Decoded::Record { bytes, .. } = decode(&segment[pos..]) {
                found = Some(pos);
                pos += bytes;
                continue;
            }
        }
        pos += 1;
    }
    found
}

/// Offset just past the last non-zero byte (0 if all zero).
pub fn last_nonzero_end(bytes: &[u8]) -> usize {
    bytes.iter().rposition(|&b| b != 0).map_or(0, |p| p + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{encode, StatusChange};
    use crate::Status;

    fn segment_with(n: u64, pad_to: usize) -> (Vec<u8>, Vec<usize>) {
        let mut buf = Vec::new();
        let mut offsets = Vec::new();
        for seq in 0..n {
            offsets.push(buf.len());
            encode(&Record::Status(StatusChange { seq, status: Status::Delivered, at_ms: seq * 3 }), &mut buf);
        }
        buf.resize(pad_to.max(buf.len()), 0);
        (buf, offsets)
    }

    fn count(seg: &[u8]) -> (usize, ScanEnd) {
        let mut n = 0;
        let end = scan(seg, |_, _| n += 1);
        (n, end)
    }

    #[test]
    fn clean_segment_reads_every_record() {
        let (seg, offsets) = segment_with(100, 8192);
        let (n, end) = count(&seg);
        assert_eq!(n, 100);
        assert_eq!(end, ScanEnd::Clean { end: offsets[99] + 26 });
    }

    #[test]
    fn cut_last_record_is_a_torn_tail() {
        let (mut seg, offsets) = segment_with(100, 0);
        let cut = offsets[99] + 10;
        seg.truncate(cut);
        seg.resize(cut + 4096, 0);
        let (n, end) = count(&seg);
        assert_eq!(n, 99);
        assert!(matches!(end, ScanEnd::TornTail { offset, .. } if offset == offsets[99]), "{end:?}");
    }

    #[test]
    fn garbage_tail_is_a_torn_tail() {
        let (mut seg, offsets) = segment_with(10, 0);
        let end_valid = seg.len();
        seg.extend((0..3000).map(|i| (i * 7 + 3) as u8));
        let (n, end) = count(&seg);
        assert_eq!(n, 10);
        assert!(matches!(end, ScanEnd::TornTail { offset, .. } if offset == end_valid), "{end:?} {offsets:?}");
    }

    #[test]
    fn flip_far_from_the_end_is_corruption() {
        // 26-byte records: 60_000 of them span ~1.5 MiB, more than the window.
        let (mut seg, offsets) = segment_with(60_000, 0);
        seg[offsets[10] + 12] ^= 0x10;
        let (n, end) = count(&seg);
        assert_eq!(n, 10);
        assert!(matches!(end, ScanEnd::Corrupt { offset, .. } if offset == offsets[10]), "{end:?}");
    }

    #[test]
    fn hole_within_the_last_window_is_a_torn_tail() {
        // A torn multi-block write: a zeroed block then a written one.
        let (mut seg, offsets) = segment_with(400, 0);
        let hole = offsets[200];
        for b in &mut seg[hole..hole + 512] {
            *b = 0;
        }
        let (n, end) = count(&seg);
        assert_eq!(n, 200);
        assert!(matches!(end, ScanEnd::TornTail { offset, .. } if offset == hole), "{end:?}");
    }
}
