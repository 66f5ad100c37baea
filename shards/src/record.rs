//! The journal record format: how one fact is framed on disk.
//!
//! ```text
//! +-----------+-----------+--------+------------------+
//! | len: u32  | crc: u32  | kind:u8| payload (len B)  |
//! +-----------+-----------+--------+------------------+
//! ```
//! All integers are little-endian. `crc` is CRC32C over `len`, `kind` and the
//! payload, so a damaged length is caught as surely as a damaged body. A
//! header of nine zero bytes is the end of the log: segments are
//! pre-allocated and zero-filled, so the first unwritten byte reads as "end".

use crate::{Priority, Status};

/// Bytes of the frame header (length, CRC, kind).
pub const HEADER_BYTES: usize = 9;
/// The largest payload a record may carry. Bounds what recovery will trust.
pub const PAYLOAD_BYTES_MAX: usize = crate::limits::RECORD_PAYLOAD_BYTES_MAX;
/// Magic number at the start of every segment header payload ("esh3").
pub const SEGMENT_MAGIC: u32 = 0x6573_6833;
/// Version of the on-disk format.
pub const FORMAT_VERSION: u16 = 1;

const KIND_SEGMENT_HEADER: u8 = 1;
const KIND_ACCEPTED: u8 = 2;
const KIND_STATUS: u8 = 3;

/// First record of every segment: which shard and segment this file is, and
/// the next sequence number at the time the segment was opened (so ids are
/// never reused, even when every older segment has been deleted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    /// Shard that owns the segment.
    pub shard: u16,
    /// Segment number (also in the file name).
    pub segment: u64,
    /// Next message sequence number when the segment was opened.
    pub next_seq: u64,
}

/// A message accepted for delivery: everything needed to deliver it again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted<'a> {
    /// Per-shard sequence number; with the shard it forms the tracking id.
    pub seq: u64,
    /// The business client that sent it.
    pub client: &'a str,
    /// The recipient user id.
    pub to: &'a str,
    /// Delivery priority.
    pub priority: Priority,
    /// Unix milliseconds after which the message expires (0: never).
    pub expires_at_ms: u64,
    /// Unix milliseconds of acceptance.
    pub accepted_at_ms: u64,
    /// The message body (UTF-8 text, checked at ingest).
    pub body: &'a [u8],
}

/// A change of a message's status (delivered, acked, expired, failed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusChange {
    /// Sequence number of the message.
    pub seq: u64,
    /// The new status.
    pub status: Status,
    /// Unix milliseconds of the change.
    pub at_ms: u64,
}

/// One decoded journal record, borrowing from the segment bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record<'a> {
    /// Segment header (first record of every segment).
    SegmentHeader(SegmentHeader),
    /// A message was accepted.
    Accepted(Accepted<'a>),
    /// A message changed status.
    Status(StatusChange),
}

/// What [`decode`] found at an offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// A valid record of `bytes` total length (header included).
    Record { record: Record<'a>, bytes: usize },
    /// Nine zero bytes, or fewer than nine bytes left: the end of the log.
    End,
    /// Something that is not a valid record; the reason says what.
    Invalid(&'static str),
}

/// Total encoded size of a record (header included).
pub fn encoded_len(record: &Record<'_>) -> usize {
    HEADER_BYTES + payload_len(record)
}

fn payload_len(record: &Record<'_>) -> usize {
    match record {
        Record::SegmentHeader(_) => 4 + 2 + 2 + 8 + 8,
        Record::Accepted(a) => 8 + 2 + a.client.len() + 2 + a.to.len() + 1 + 8 + 8 + 4 + a.body.len(),
        Record::Status(_) => 8 + 1 + 8,
    }
}

/// Appends the encoded record to `out`.
///
/// Panics if a field exceeds its frame limit: callers validate sizes at
/// ingest (user id and client id at most 65535 bytes, body within
/// [`PAYLOAD_BYTES_MAX`]), so a violation here is a bug, not bad input.
pub fn encode(record: &Record<'_>, out: &mut Vec<u8>) {
    let payload = payload_len(record);
    assert!(payload <= PAYLOAD_BYTES_MAX, "record payload {payload} over limit");
    let start = out.len();
    out.extend_from_slice(&(payload as u32).to_le_bytes());
    out.extend_from_slice(&[0u8; 4]); // CRC, filled below
    match record {
        Record::SegmentHeader(h) => {
            out.push(KIND_SEGMENT_HEADER);
            out.extend_from_slice(&SEGMENT_MAGIC.to_le_bytes());
            out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
            out.extend_from_slice(&h.shard.to_le_bytes());
            out.extend_from_slice(&h.segment.to_le_bytes());
            out.extend_from_slice(&h.next_seq.to_le_bytes());
        }
        Record::Accepted(a) => {
            out.push(KIND_ACCEPTED);
            out.extend_from_slice(&a.seq.to_le_bytes());
            put_str16(out, a.client.as_bytes());
            put_str16(out, a.to.as_bytes());
            out.push(a.priority as u8);
            out.extend_from_slice(&a.expires_at_ms.to_le_bytes());
            out.extend_from_slice(&a.accepted_at_ms.to_le_bytes());
            out.extend_from_slice(&(a.body.len() as u32).to_le_bytes());
            out.extend_from_slice(a.body);
        }
        Record::Status(s) => {
            out.push(KIND_STATUS);
            out.extend_from_slice(&s.seq.to_le_bytes());
            out.push(s.status as u8);
            out.extend_from_slice(&s.at_ms.to_le_bytes());
        }
    }
    debug_assert_eq!(out.len() - start, HEADER_BYTES + payload);
    let crc = frame_crc(&out[start..start + 4], &out[start + 8..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

fn put_str16(out: &mut Vec<u8>, s: &[u8]) {
    assert!(s.len() <= u16::MAX as usize, "string field over 65535 bytes");
    out.extend_from_slice(&(s.len() as u16).to_le_bytes());
    out.extend_from_slice(s);
}

fn frame_crc(len_bytes: &[u8], kind_and_payload: &[u8]) -> u32 {
    let crc = crc32c::crc32c(len_bytes);
    crc32c::crc32c_append(crc, kind_and_payload)
}

/// Decodes the record at the start of `buf`.
pub fn decode(buf: &[u8]) -> Decoded<'_> {
    if buf.len() < HEADER_BYTES {
        return if buf.iter().all(|&b| b == 0) { Decoded::End } else { Decoded::Invalid("truncated header") };
    }
    if buf[..HEADER_BYTES].iter().all(|&b| b == 0) {
        return Decoded::End;
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > PAYLOAD_BYTES_MAX {
        return Decoded::Invalid("length over limit");
    }
    let total = HEADER_BYTES + len;
    if buf.len() < total {
        return Decoded::Invalid("record runs past the end of the segment");
    }
    let crc = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
    if frame_crc(&buf[..4], &buf[8..total]) != crc {
        return Decoded::Invalid("checksum mismatch");
    }
    let kind = buf[8];
    let payload = &buf[HEADER_BYTES..total];
    match decode_payload(kind, payload) {
        Some(record) => Decoded::Record { record, bytes: total },
        None => Decoded::Invalid("checksum valid but payload malformed"),
    }
}

fn decode_payload(kind: u8, p: &[u8]) -> Option<Record<'_>> {
    let mut r = Reader { buf: p, pos: 0 };
    let record = match kind {
        KIND_SEGMENT_HEADER => {
            if r.u32()? != SEGMENT_MAGIC || r.u16()? != FORMAT_VERSION {
                return None;
            }
            Record::SegmentHeader(SegmentHeader { shard: r.u16()?, segment: r.u64()?, next_seq: r.u64()? })
        }
        KIND_ACCEPTED => {
            let seq = r.u64()?;
            let client = r.str16()?;
            let to = r.str16()?;
            let priority = Priority::from_u8(r.u8()?)?;
            let expires_at_ms = r.u64()?;
            let accepted_at_ms = r.u64()?;
            let body_len = r.u32()? as usize;
            let body = r.bytes(body_len)?;
            Record::Accepted(Accepted { seq, client, to, priority, expires_at_ms, accepted_at_ms, body })
        }
        KIND_STATUS => {
            let seq = r.u64()?;
            let status = Status::from_u8(r.u8()?)?;
            Record::Status(StatusChange { seq, status, at_ms: r.u64()? })
        }
        _ => return None,
    };
    (r.pos == p.len()).then_some(record)
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.bytes(1)?[0])
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.bytes(2)?.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.bytes(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.bytes(8)?.try_into().ok()?))
    }
    fn str16(&mut self) -> Option<&'a str> {
        let n = self.u16()? as usize;
        std::str::from_utf8(self.bytes(n)?).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn roundtrip(r: Record<'_>) {
        let mut buf = Vec::new();
        encode(&r, &mut buf);
        assert_eq!(buf.len(), encoded_len(&r));
        match decode(&buf) {
            Decoded::Record { record, bytes } => {
                assert_eq!(record, r);
                assert_eq!(bytes, buf.len());
            }
            other => panic!("decode failed: {other:?}"),
        }
    }

    #[test]
    fn zeros_are_end_of_log() {
        assert_eq!(decode(&[0u8; 64]), Decoded::End);
        assert_eq!(decode(&[0u8; 3]), Decoded::End);
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let mut buf = Vec::new();
        let rec = Record::Accepted(Accepted {
            seq: 7,
            client: "acme",
            to: "user-1",
            priority: Priority::High,
            expires_at_ms: 99,
            accepted_at_ms: 42,
            body: b"hello",
        });
        encode(&rec, &mut buf);
        for bit in 0..buf.len() * 8 {
            let mut damaged = buf.clone();
            damaged[bit / 8] ^= 1 << (bit % 8);
            assert!(
                !matches!(decode(&damaged), Decoded::Record { record, .. } if record == rec),
                "flip of bit {bit} went unnoticed"
            );
        }
    }

    proptest! {
        #[test]
        fn accepted_roundtrips(seq: u64, client in "[a-z0-9]{0,40}", to in "\\PC{0,60}",
                               p in 0u8..3, exp: u64, at: u64, body in proptest::collection::vec(any::<u8>(), 0..2000)) {
            roundtrip(Record::Accepted(Accepted {
                seq, client: &client, to: &to, priority: Priority::from_u8(p).unwrap(),
                expires_at_ms: exp, accepted_at_ms: at, body: &body,
            }));
        }

        #[test]
        fn status_and_header_roundtrip(seq: u64, s in 0u8..5, at: u64, shard: u16, seg: u64) {
            roundtrip(Record::Status(StatusChange { seq, status: Status::from_u8(s).unwrap(), at_ms: at }));
            roundtrip(Record::SegmentHeader(SegmentHeader { shard, segment: seg, next_seq: seq }));
        }

        #[test]
        fn decode_never_panics_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn truncation_is_never_a_valid_record(cut in 1usize..40) {
            let mut buf = Vec::new();
            encode(&Record::Status(StatusChange { seq: 1, status: Status::Acked, at_ms: 2 }), &mut buf);
            let cut = cut.min(buf.len() - 1);
            let valid = matches!(decode(&buf[..cut]), Decoded::Record { .. });
            prop_assert!(!valid);
        }
    }
}
