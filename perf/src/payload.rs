//! The message body every system carries: a send stamp and a unique key,
//! padded to the requested size. Receivers find both in whatever frame the
//! system delivers (a WebSocket JSON frame, a stream entry, an AMQP body),
//! so end-to-end latency and loss/duplicate accounting work the same way
//! for esh3ar and the peers.
//!
//! Format: `t=<20 digits> k=<20 digits> xxxx...` (ASCII, JSON-safe).

use std::io::Write as _;

/// Bytes of the stamp and key, before the padding.
pub const STAMP_BYTES: usize = 46;

/// Appends a body of `len` bytes (at least [`STAMP_BYTES`]).
pub fn write_body(out: &mut Vec<u8>, stamp_ns: u64, key: u64, len: usize) {
    let start = out.len();
    let _ = write!(out, "t={stamp_ns:020} k={key:020} ");
    debug_assert_eq!(out.len() - start, STAMP_BYTES);
    let pad = len.saturating_sub(STAMP_BYTES);
    out.resize(out.len() + pad, b'x');
}

/// Finds `(stamp_ns, key)` in `frame`; None if it carries no body of ours.
pub fn find_stamp(frame: &[u8]) -> Option<(u64, u64)> {
    let at = memchr::memmem::find(frame, b"t=")?;
    let rest = frame.get(at..at + STAMP_BYTES - 1)?;
    let stamp = digits(&rest[2..22])?;
    if &rest[22..25] != b" k=" {
        return None;
    }
    let key = digits(&rest[25..45])?;
    Some((stamp, key))
}

fn digits(b: &[u8]) -> Option<u64> {
    b.iter().try_fold(0u64, |acc, &d| d.is_ascii_digit().then(|| acc * 10 + u64::from(d - b'0')))
}

/// A key unique across generator threads: thread in the top 16 bits.
pub fn key(thread: usize, counter: u64) -> u64 {
    ((thread as u64) << 48) | (counter & ((1 << 48) - 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_inside_json() {
        let mut b = br#"{"type":"message","id":"x","body":""#.to_vec();
        write_body(&mut b, 123_456_789, key(3, 42), 64);
        b.extend_from_slice(br#"","priority":"normal"}"#);
        assert_eq!(find_stamp(&b), Some((123_456_789, key(3, 42))));
        let mut plain = Vec::new();
        write_body(&mut plain, 1, 2, 10);
        assert_eq!(plain.len(), STAMP_BYTES, "never shorter than the stamp");
    }

    #[test]
    fn rejects_foreign_bodies() {
        assert_eq!(find_stamp(b"hello"), None);
        assert_eq!(find_stamp(b"t=12"), None);
        assert_eq!(find_stamp(b"t=0000000000000000000a k=00000000000000000001 "), None);
    }
}
