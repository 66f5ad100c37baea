//! Every limit that constrains another one, in one place, with the
//! relations between them checked at compile time (TigerBeetle's
//! `constants.zig`). A body limit, a record limit and a commit limit kept in
//! three files is how one request at the documented maximum once panicked a
//! shard: here the chain "request body → journal record → commit → segment"
//! is one set of constants and assertions, and `config check` uses the
//! functions below to refuse any setting that could break it.
//!
//! Units are in the names (`_bytes`, `_max`, `_min`).

/// Alignment of journal writes and reads (O_DIRECT block).
pub const BLOCK_BYTES: u64 = 4096;

// ---------------------------------------------------------------------------
// Identifiers.

/// Longest recipient user id, in bytes.
pub const USER_ID_BYTES_MAX: usize = 256;
/// Longest client id, in bytes.
pub const CLIENT_ID_BYTES_MAX: usize = 128;
/// Most senders one user may block (bounds a `User` record).
pub const BLOCKED_CLIENTS_PER_USER_MAX: usize = 64;
/// Longest phone number in the user directory (E.164: `+` and at most 15 digits).
pub const PHONE_BYTES_MAX: usize = 16;
/// Longest email address in the user directory (RFC 5321 path limit).
pub const EMAIL_BYTES_MAX: usize = 254;
/// The largest `User` record payload: id, first seen, phone, email and the
/// blocked senders (each a u16-framed string, the list a u16 count).
pub const USER_PAYLOAD_BYTES_MAX: usize = 2
    + USER_ID_BYTES_MAX
    + 8
    + 2
    + PHONE_BYTES_MAX
    + 2
    + EMAIL_BYTES_MAX
    + 2
    + BLOCKED_CLIENTS_PER_USER_MAX * (2 + CLIENT_ID_BYTES_MAX);

// ---------------------------------------------------------------------------
// HTTP.

/// Most bytes of a request head (request line and headers).
pub const HTTP_HEAD_BYTES_MAX: usize = 8 * 1024;
/// Most header fields of a request.
pub const HTTP_HEADERS_MAX: usize = 64;
/// Smallest `business.max_body_bytes` a config may set.
pub const BODY_BYTES_MIN: usize = 256;
/// Largest `business.max_body_bytes` a config may set (the documented upper bound).
pub const BODY_BYTES_MAX: usize = 4 << 20;
/// Most messages in one batch request.
pub const BATCH_ITEMS_MAX: usize = 1000;

// ---------------------------------------------------------------------------
// Journal records.

/// Bytes of a record frame header (length, CRC, kind).
pub const RECORD_HEADER_BYTES: usize = 9;
/// Fixed part of an `Accepted` record payload: seq, two string lengths,
/// priority, expiry, acceptance time, body length.
pub const ACCEPTED_FIXED_BYTES: usize = 8 + 2 + 2 + 1 + 8 + 8 + 4;
/// The largest `Accepted` payload a valid request can produce. A message
/// body is a JSON string decoded from the request body, and decoding never
/// makes text longer, so the body is at most the request body.
pub const ACCEPTED_PAYLOAD_BYTES_MAX: usize =
    ACCEPTED_FIXED_BYTES + CLIENT_ID_BYTES_MAX + USER_ID_BYTES_MAX + BODY_BYTES_MAX;
/// The largest record payload the journal writes or trusts on recovery.
pub const RECORD_PAYLOAD_BYTES_MAX: usize = BODY_BYTES_MAX + 4096;
/// The largest encoded record.
pub const RECORD_BYTES_MAX: usize = RECORD_HEADER_BYTES + RECORD_PAYLOAD_BYTES_MAX;

// ---------------------------------------------------------------------------
// Group commits.

/// Bytes of a commit frame header.
pub const COMMIT_HEADER_BYTES: usize = 32;
/// A commit is sealed once its records reach this many bytes (a soft
/// target: it bounds the write of one fdatasync round under load).
pub const COMMIT_TARGET_BYTES: usize = 1 << 20;
/// The most record bytes one commit may hold: either records that started
/// below the target, or one record larger than it.
pub const COMMIT_BODY_BYTES_MAX: usize = COMMIT_TARGET_BYTES + RECORD_BYTES_MAX;

// ---------------------------------------------------------------------------
// Segments.

/// Bytes of the segment header record (magic, version, shard, segment, next seq).
pub const SEGMENT_HEADER_RECORD_BYTES: usize = RECORD_HEADER_BYTES + 4 + 2 + 2 + 8 + 8;
/// Bytes a segment spends before its first message: the first commit's
/// header and the segment header record.
pub const SEGMENT_OVERHEAD_BYTES: usize = COMMIT_HEADER_BYTES + SEGMENT_HEADER_RECORD_BYTES;
/// Smallest `engine.segment_bytes`.
pub const SEGMENT_BYTES_MIN: u64 = 64 << 10;
/// Largest `engine.segment_bytes`.
pub const SEGMENT_BYTES_MAX: u64 = 1 << 40;

// ---------------------------------------------------------------------------
// Mesh and WebSocket.

/// Smallest `engine.mesh_channel_capacity`.
pub const MESH_CHANNEL_CAPACITY_MIN: usize = 16;
/// Largest `engine.mesh_channel_capacity`.
pub const MESH_CHANNEL_CAPACITY_MAX: usize = 1 << 20;
/// Largest `mobile.max_message_bytes` (client-to-server WebSocket message).
pub const WS_MESSAGE_BYTES_MAX: usize = 16 << 20;
/// Smallest `mobile.max_message_bytes`.
pub const WS_MESSAGE_BYTES_MIN: usize = 128;

// ---------------------------------------------------------------------------
// Relations, checked when the crate compiles.

const _: () = {
    // A message at the body limit fits in one record...
    assert!(ACCEPTED_PAYLOAD_BYTES_MAX <= RECORD_PAYLOAD_BYTES_MAX);
    // ...a record fits in one commit...
    assert!(RECORD_BYTES_MAX <= COMMIT_BODY_BYTES_MAX);
    assert!(COMMIT_TARGET_BYTES <= COMMIT_BODY_BYTES_MAX);
    // ...and the commit length field (u32) holds any commit.
    assert!(COMMIT_BODY_BYTES_MAX <= u32::MAX as usize);
    // The record length field is a u32.
    assert!(RECORD_PAYLOAD_BYTES_MAX <= u32::MAX as usize);
    // Strings are framed with u16 lengths.
    assert!(USER_ID_BYTES_MAX <= u16::MAX as usize);
    assert!(CLIENT_ID_BYTES_MAX <= u16::MAX as usize);
    // The smallest segment holds its overhead and a message at the smallest body limit.
    assert!(segment_bytes_min_for_body(BODY_BYTES_MIN) <= SEGMENT_BYTES_MIN);
    assert!(SEGMENT_BYTES_MIN.is_multiple_of(BLOCK_BYTES));
    assert!(BODY_BYTES_MIN <= BODY_BYTES_MAX);
    assert!(MESH_CHANNEL_CAPACITY_MIN <= MESH_CHANNEL_CAPACITY_MAX);
    // A user record fits a record, and the smallest segment besides its overhead.
    assert!(USER_PAYLOAD_BYTES_MAX <= RECORD_PAYLOAD_BYTES_MAX);
    assert!(
        SEGMENT_OVERHEAD_BYTES + COMMIT_HEADER_BYTES + RECORD_HEADER_BYTES + USER_PAYLOAD_BYTES_MAX
            <= SEGMENT_BYTES_MIN as usize
    );
    assert!(BLOCKED_CLIENTS_PER_USER_MAX <= u16::MAX as usize);
};

/// The largest `Accepted` record (header included) for a request body limit.
pub const fn record_bytes_for_body(body_bytes_max: usize) -> usize {
    RECORD_HEADER_BYTES + ACCEPTED_FIXED_BYTES + CLIENT_ID_BYTES_MAX + USER_ID_BYTES_MAX + body_bytes_max
}

/// The smallest segment that holds its overhead plus one commit with one
/// message at the request body limit, rounded up to whole blocks.
pub const fn segment_bytes_min_for_body(body_bytes_max: usize) -> u64 {
    let bytes = (SEGMENT_OVERHEAD_BYTES + COMMIT_HEADER_BYTES + record_bytes_for_body(body_bytes_max)) as u64;
    bytes.div_ceil(BLOCK_BYTES) * BLOCK_BYTES
}

/// Why a combination of settings is refused; the config names the key.
pub fn check_body_and_segment(body_bytes_max: usize, segment_bytes: u64) -> Result<(), String> {
    if !(BODY_BYTES_MIN..=BODY_BYTES_MAX).contains(&body_bytes_max) {
        return Err(format!("must be between {BODY_BYTES_MIN} and {BODY_BYTES_MAX}"));
    }
    let need = segment_bytes_min_for_body(body_bytes_max);
    if segment_bytes < need {
        return Err(format!(
            "segment_bytes {segment_bytes} cannot hold a message at max_body_bytes {body_bytes_max}: \
             segments must be at least {need} bytes"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_limit_fits_the_documented_maximum() {
        assert!(record_bytes_for_body(BODY_BYTES_MAX) <= RECORD_BYTES_MAX);
        assert!(check_body_and_segment(BODY_BYTES_MAX, 64 << 20).is_ok());
        assert!(check_body_and_segment(BODY_BYTES_MAX, 1 << 20).is_err());
        assert!(check_body_and_segment(BODY_BYTES_MAX + 1, 64 << 20).is_err());
        assert!(check_body_and_segment(65536, SEGMENT_BYTES_MIN * 2).is_ok());
    }
}
