//! The commit frame: how one group commit is laid out on disk.
//!
//! Every fdatasync round writes whole commits. A commit is a 32-byte header
//! followed by the records it holds; the header carries the commit's
//! sequence number, the length of its records and a CRC32C over them, and
//! a CRC of its own. Recovery therefore decides *exactly* which commits are
//! intact: a commit is valid or it is not, whatever its size, and only the
//! last commit of the journal (no valid commit after it) can have been torn
//! by a crash. Damage anywhere else is corruption of acknowledged data.
//!
//! ```text
//! +-------+------------+------+-----+------------+----------+----------+----------+
//! | magic | header_crc | kind | pad | commit_seq | body_len | body_crc | reserved |
//! |  u32  |    u32     |  u8  | [3] |    u64     |   u32    |   u32    |   [8]    |
//! +-------+------------+------+-----+------------+----------+----------+----------+
//! ```
//! Little-endian. `header_crc` is CRC32C over the magic and bytes 8..32.
//! Thirty-two zero bytes where a header should start mean "end of log"
//! (segments are pre-allocated and zero-filled).
//!
//! A `Hole` commit is written only by `esh3ar journal repair --accept-loss`
//! over a damaged range it moved to a quarantine file: its body is skipped
//! unread, so the valid commits after it stay readable.

use crate::limits::{COMMIT_BODY_BYTES_MAX, COMMIT_HEADER_BYTES};

/// Magic number at the start of every commit header ("eshc").
pub const COMMIT_MAGIC: u32 = 0x6368_7365;

/// What a commit holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum CommitKind {
    /// Journal records, checksummed as a whole.
    Records = 1,
    /// A repaired hole: `body_len` bytes to skip (quarantined elsewhere).
    Hole = 2,
}

/// A decoded commit header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitHeader {
    /// What the body is.
    pub kind: CommitKind,
    /// Per-shard commit number, growing by one per commit (0 for holes).
    pub seq: u64,
    /// Bytes of records after the header.
    pub body_len: u32,
    /// CRC32C of the body (0 for holes).
    pub body_crc: u32,
}

/// What [`decode_header`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderRead {
    /// A header whose own checksum holds.
    Header(CommitHeader),
    /// Zeros (or fewer than 32 bytes, all zero): the end of the log.
    End,
    /// Not a valid header; the reason says why.
    Invalid(&'static str),
}

/// Encodes a header into its 32 bytes.
pub fn encode_header(h: &CommitHeader) -> [u8; COMMIT_HEADER_BYTES] {
    assert!(h.body_len as usize <= COMMIT_BODY_BYTES_MAX, "commit body {} over limit", h.body_len);
    let mut out = [0u8; COMMIT_HEADER_BYTES];
    out[0..4].copy_from_slice(&COMMIT_MAGIC.to_le_bytes());
    out[8] = h.kind as u8;
    out[12..20].copy_from_slice(&h.seq.to_le_bytes());
    out[20..24].copy_from_slice(&h.body_len.to_le_bytes());
    out[24..28].copy_from_slice(&h.body_crc.to_le_bytes());
    let crc = header_crc(&out);
    out[4..8].copy_from_slice(&crc.to_le_bytes());
    out
}

fn header_crc(h: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&h[0..4]), &h[8..COMMIT_HEADER_BYTES])
}

/// Decodes the header at the start of `buf`.
pub fn decode_header(buf: &[u8]) -> HeaderRead {
    if buf.len() < COMMIT_HEADER_BYTES {
        return if buf.iter().all(|&b| b == 0) {
            HeaderRead::End
        } else {
            HeaderRead::Invalid("truncated commit header")
        };
    }
    let h = &buf[..COMMIT_HEADER_BYTES];
    if h.iter().all(|&b| b == 0) {
        return HeaderRead::End;
    }
    let word = |at: usize| u32::from_le_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]]);
    if word(0) != COMMIT_MAGIC {
        return HeaderRead::Invalid("no commit header (bad magic)");
    }
    if word(4) != header_crc(h) {
        return HeaderRead::Invalid("commit header checksum mismatch");
    }
    let kind = match h[8] {
        1 => CommitKind::Records,
        2 => CommitKind::Hole,
        _ => return HeaderRead::Invalid("unknown commit kind"),
    };
    let body_len = word(20);
    if body_len as usize > COMMIT_BODY_BYTES_MAX {
        return HeaderRead::Invalid("commit length over limit");
    }
    let seq = u64::from_le_bytes(h[12..20].try_into().expect("8 bytes"));
    HeaderRead::Header(CommitHeader { kind, seq, body_len, body_crc: word(24) })
}

/// CRC32C of a commit body.
pub fn body_crc(body: &[u8]) -> u32 {
    crc32c::crc32c(body)
}

/// The header of a repaired hole spanning `total_bytes` (header included).
/// `total_bytes` must be at least [`COMMIT_HEADER_BYTES`].
pub fn hole_header(total_bytes: usize) -> [u8; COMMIT_HEADER_BYTES] {
    assert!(total_bytes >= COMMIT_HEADER_BYTES, "a hole holds at least its header");
    let body_len = (total_bytes - COMMIT_HEADER_BYTES) as u32;
    encode_header(&CommitHeader { kind: CommitKind::Hole, seq: 0, body_len, body_crc: 0 })
}

/// A commit found intact in `segment` at `offset`: its header and body.
#[derive(Debug, Clone, Copy)]
pub struct ValidCommit<'a> {
    /// The header.
    pub header: CommitHeader,
    /// The body (empty for holes, whose body is not read).
    pub body: &'a [u8],
    /// Offset just past the commit.
    pub end: usize,
}

/// Checks the commit at `offset`: header, bounds and body checksum.
pub fn read_commit(segment: &[u8], offset: usize) -> Result<Option<ValidCommit<'_>>, &'static str> {
    let header = match decode_header(&segment[offset.min(segment.len())..]) {
        HeaderRead::End => return Ok(None),
        HeaderRead::Invalid(reason) => return Err(reason),
        HeaderRead::Header(h) => h,
    };
    let start = offset + COMMIT_HEADER_BYTES;
    let end = start + header.body_len as usize;
    if end > segment.len() {
        return Err("commit runs past the end of the segment");
    }
    if header.kind == CommitKind::Hole {
        return Ok(Some(ValidCommit { header, body: &[], end }));
    }
    let body = &segment[start..end];
    if body_crc(body) != header.body_crc {
        return Err("commit checksum mismatch");
    }
    Ok(Some(ValidCommit { header, body, end }))
}

/// The first offset at or after `from` where an intact commit starts.
pub fn find_valid_commit(segment: &[u8], from: usize) -> Option<usize> {
    let magic = COMMIT_MAGIC.to_le_bytes();
    let mut pos = from;
    while pos + COMMIT_HEADER_BYTES <= segment.len() {
        // Skip runs of zeros quickly (the unwritten rest of a segment).
        if segment[pos] == 0 {
            match segment[pos..].iter().position(|&b| b != 0) {
                Some(q) => pos += q,
                None => return None,
            }
            continue;
        }
        if segment[pos..pos + 4] == magic && matches!(read_commit(segment, pos), Ok(Some(_))) {
            return Some(pos);
        }
        pos += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn header_roundtrips_and_every_bit_flip_is_caught() {
        let h = CommitHeader { kind: CommitKind::Records, seq: 77, body_len: 1234, body_crc: 0xdead_beef };
        let bytes = encode_header(&h);
        assert_eq!(decode_header(&bytes), HeaderRead::Header(h));
        for bit in 0..COMMIT_HEADER_BYTES * 8 {
            let mut damaged = bytes;
            damaged[bit / 8] ^= 1 << (bit % 8);
            assert!(!matches!(decode_header(&damaged), HeaderRead::Header(x) if x == h), "flip of bit {bit} unnoticed");
        }
        assert_eq!(decode_header(&[0u8; 40]), HeaderRead::End);
        assert_eq!(decode_header(&[0u8; 5]), HeaderRead::End);
    }

    #[test]
    fn finds_the_next_intact_commit_past_garbage() {
        let body = b"some records";
        let mut seg = vec![7u8; 100];
        let at = seg.len();
        seg.extend_from_slice(&encode_header(&CommitHeader {
            kind: CommitKind::Records,
            seq: 1,
            body_len: body.len() as u32,
            body_crc: body_crc(body),
        }));
        seg.extend_from_slice(body);
        seg.resize(seg.len() + 5000, 0);
        assert_eq!(find_valid_commit(&seg, 0), Some(at));
        assert_eq!(find_valid_commit(&seg, at + 1), None);
        seg[at + COMMIT_HEADER_BYTES + 2] ^= 1;
        assert_eq!(find_valid_commit(&seg, 0), None, "a commit with a damaged body is not intact");
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..100)) {
            let _ = decode_header(&bytes);
            let _ = read_commit(&bytes, 0);
            let _ = find_valid_commit(&bytes, 0);
        }
    }
}
