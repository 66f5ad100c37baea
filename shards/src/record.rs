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

use crate::{Priority, Reason, Status};

/// Bytes of the frame header (length, CRC, kind).
pub const HEADER_BYTES: usize = crate::limits::RECORD_HEADER_BYTES;
/// The largest payload a record may carry. Bounds what recovery will trust.
pub const PAYLOAD_BYTES_MAX: usize = crate::limits::RECORD_PAYLOAD_BYTES_MAX;
/// Magic number at the start of every segment header payload ("esh3").
pub const SEGMENT_MAGIC: u32 = 0x6573_6833;
/// Version of the on-disk format.
pub const FORMAT_VERSION: u16 = 2;

const KIND_SEGMENT_HEADER: u8 = 1;
const KIND_ACCEPTED: u8 = 2;
const KIND_STATUS: u8 = 3;
const KIND_EVENT: u8 = 4;
/// Kind 5 is left to the idempotency record being written on another branch.
const KIND_USER: u8 = 6;
const KIND_IDEMPOTENCY: u8 = 5;
const KIND_FALLBACK: u8 = 7;
const KIND_RESTORED: u8 = 8;
const KIND_SPILLED: u8 = 9;
/// Most sequence numbers one [`Record::Spilled`] lists.
pub const SPILLED_SEQS_MAX: usize = 4096;
/// Longest error text an [`EventChange`] carries (longer ones are cut).
pub const EVENT_ERROR_BYTES_MAX: usize = 256;

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

/// A change of a message's status (delivered, acked, expired, failed, rejected).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusChange {
    /// Sequence number of the message.
    pub seq: u64,
    /// The new status.
    pub status: Status,
    /// Unix milliseconds of the change.
    pub at_ms: u64,
    /// The change owes the sender an event (its client had a webhook then):
    /// the transactional outbox. The event is owed until an [`EventChange`]
    /// settles it.
    pub notify: bool,
    /// Why (rejected and failed); [`Reason::None`] otherwise.
    pub reason: Reason,
}

impl StatusChange {
    /// A change that owes no event and has no reason.
    pub fn plain(seq: u64, status: Status, at_ms: u64) -> Self {
        Self { seq, status, at_ms, notify: false, reason: Reason::None }
    }
}

/// What happened to an owed event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum EventOutcome {
    /// The sender's endpoint answered 2xx: settled.
    Delivered = 0,
    /// An attempt failed; more will follow.
    AttemptFailed = 1,
    /// Given up: moved to the dead-letter queue.
    DeadLettered = 2,
    /// Taken out of the dead-letter queue to be sent again, attempts reset.
    Replayed = 3,
    /// Dropped without delivery (deleted from the dead-letter queue, or the
    /// client no longer has a webhook): settled.
    Dropped = 4,
}

impl EventOutcome {
    fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::Delivered),
            1 => Some(Self::AttemptFailed),
            2 => Some(Self::DeadLettered),
            3 => Some(Self::Replayed),
            4 => Some(Self::Dropped),
            _ => None,
        }
    }
}

/// A step in the life of an owed event (the event of `status` of message `seq`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventChange<'a> {
    /// Sequence number of the message.
    pub seq: u64,
    /// Which transition's event.
    pub event: Status,
    /// What happened.
    pub outcome: EventOutcome,
    /// Attempts made so far.
    pub attempts: u32,
    /// Unix milliseconds.
    pub at_ms: u64,
    /// The last error (failed attempts and dead letters), at most
    /// [`EVENT_ERROR_BYTES_MAX`] bytes.
    pub error: &'a str,
}

/// The whole directory entry of one user (who they are, which senders they
/// blocked). Every change journals the full entry, so the latest record of
/// a user supersedes all earlier ones: recovery keeps the last, and
/// maintenance carries an entry forward to the newest segment by appending
/// it again before the segment holding it is deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserRecord<'a> {
    /// The user id.
    pub user: &'a str,
    /// Unix milliseconds the user entered the directory.
    pub first_seen_at_ms: u64,
    /// Phone number in E.164 form, or empty.
    pub phone: &'a str,
    /// Email address, or empty.
    pub email: &'a str,
    /// Client ids whose messages the user refuses.
    pub blocked: ClientList<'a>,
}

/// A list of client ids as framed on disk: each a u16-framed string.
/// At most [`crate::limits::BLOCKED_CLIENTS_PER_USER_MAX`] ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClientList<'a> {
    encoded: &'a [u8],
    count: u16,
}

impl<'a> ClientList<'a> {
    /// Encodes `ids` into `out` (cleared first) and returns the list over it.
    ///
    /// Panics over [`crate::limits::BLOCKED_CLIENTS_PER_USER_MAX`] ids or an
    /// id over 65535 bytes: callers bound both, so that is a bug.
    pub fn build<'s>(ids: impl IntoIterator<Item = &'s str>, out: &'a mut Vec<u8>) -> ClientList<'a> {
        out.clear();
        let mut count = 0usize;
        for id in ids {
            put_str16(out, id.as_bytes());
            count += 1;
        }
        assert!(count <= crate::limits::BLOCKED_CLIENTS_PER_USER_MAX, "{count} blocked clients over limit");
        ClientList { encoded: out, count: count as u16 }
    }

    /// The ids, in order.
    pub fn iter(&self) -> impl Iterator<Item = &'a str> + 'a {
        let mut r = Reader { buf: self.encoded, pos: 0 };
        (0..self.count).map_while(move |_| r.str16())
    }

    /// How many ids.
    pub fn len(&self) -> usize {
        self.count as usize
    }

    /// True when the list holds no id.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

/// A step of a message's delivery through the fallback channels (WhatsApp,
/// email): planned at acceptance, handed to a provider, failed, moved on,
/// delivered, given up (dead letter), replayed or dropped. The index keeps
/// the latest state of each message's fallback (`FallbackState`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FallbackChange<'a> {
    /// Sequence number of the message.
    pub seq: u64,
    /// What happened.
    pub step: FallbackStep,
    /// Unix milliseconds.
    pub at_ms: u64,
    /// The channel concerned ([`crate::Channel`] code; 0 for planned, exhausted, replayed, dropped).
    pub channel: u8,
    /// Planned: the channel list, in order ([`crate::ChannelList`]).
    pub channels: u8,
    /// Attempts made on `channel` so far.
    pub attempts: u32,
    /// Planned: when the fallback is due. Failed attempt: the next try's
    /// not-before time. Unix ms; 0 otherwise.
    pub when_ms: u64,
    /// Delivered and exhausted: the step owes the sender an event
    /// (`message.delivered`, `message.failed`): the transactional outbox.
    pub notify: bool,
    /// Delivered: the provider's message id (may be empty). Failures: the
    /// error, at most [`EVENT_ERROR_BYTES_MAX`] bytes.
    pub text: &'a str,
}

/// The steps of a [`FallbackChange`]. The numeric value is the on-disk code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FallbackStep {
    /// At acceptance: due at `when_ms` through `channels`.
    Planned = 0,
    /// Handed to the provider of `channel` (an attempt may be under way).
    Sending = 1,
    /// An attempt on `channel` failed; another follows at `when_ms`.
    AttemptFailed = 2,
    /// `channel` is given up (permanent error, attempts spent, no contact,
    /// breaker open with another channel left): the next one is due now.
    ChannelFailed = 3,
    /// The provider of `channel` accepted the message: delivered.
    Delivered = 4,
    /// Every channel failed: the message is failed, the fallback dead-lettered.
    Exhausted = 5,
    /// Taken out of the dead-letter queue: due again now, from the first channel.
    Replayed = 6,
    /// Deleted from the dead-letter queue (the message stays failed).
    Dropped = 7,
}

impl FallbackStep {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => Self::Planned,
            1 => Self::Sending,
            2 => Self::AttemptFailed,
            3 => Self::ChannelFailed,
            4 => Self::Delivered,
            5 => Self::Exhausted,
            6 => Self::Replayed,
            7 => Self::Dropped,
            _ => return None,
        })
    }
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
    /// An owed event was delivered, failed, dead-lettered, replayed or dropped.
    Event(EventChange<'a>),
    /// A user's directory entry and blocked senders, whole.
    User(UserRecord<'a>),
    /// The answer to a request with an `Idempotency-Key` (client's home shard).
    Idempotency(IdempotencyRecord<'a>),
    /// A step of a message's fallback delivery (kind 7).
    Fallback(FallbackChange<'a>),
    /// A message brought back from the cold store into the journal (kind 8):
    /// the same fields as [`Record::Accepted`], with its original sequence
    /// number and timestamps. Its copy in the cold store is removed once
    /// this record is durable (docs/ARCHITECTURE.md, "Offline backlog").
    Restored(Accepted<'a>),
    /// Messages whose durable copy is now in the cold store (kind 9): the
    /// index forgets them and their segments stop being pinned by them.
    Spilled(SeqList<'a>),
}

/// A list of sequence numbers as encoded in a record (u64 little-endian each).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqList<'a> {
    encoded: &'a [u8],
}

impl<'a> SeqList<'a> {
    /// Wraps encoded sequence numbers (`8 × n` bytes, at most [`SPILLED_SEQS_MAX`]).
    pub fn new(encoded: &'a [u8]) -> Self {
        assert!(encoded.len().is_multiple_of(8) && encoded.len() / 8 <= SPILLED_SEQS_MAX, "malformed sequence list");
        Self { encoded }
    }

    /// Encodes `seqs` into `out` (cleared first), for [`SeqList::new`].
    pub fn encode(seqs: &[u64], out: &mut Vec<u8>) {
        out.clear();
        for s in seqs {
            out.extend_from_slice(&s.to_le_bytes());
        }
    }

    /// The sequence numbers, in order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + 'a {
        self.encoded.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
    }

    /// How many.
    pub fn len(&self) -> usize {
        self.encoded.len() / 8
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.encoded.is_empty()
    }
}

/// The first answer to a client's request with an `Idempotency-Key`: what a
/// retry with the same key gets again, for the idempotency window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdempotencyRecord<'a> {
    /// The client id.
    pub client: &'a str,
    /// The key (1 to 255 visible ASCII characters).
    pub key: &'a str,
    /// SHA-256 of the request body (a retry with another body is refused).
    pub body_sha256: [u8; 32],
    /// Unix ms of the first answer.
    pub at_ms: u64,
    /// Its HTTP status.
    pub status: u16,
    /// Its JSON body.
    pub response: &'a [u8],
}

/// What [`decode`] found at an offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// A valid record of `bytes` total length (header included).
    Record {
        /// The record.
        record: Record<'a>,
        /// Its encoded length, header included.
        bytes: usize,
    },
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
        Record::Accepted(a) | Record::Restored(a) => {
            8 + 2 + a.client.len() + 2 + a.to.len() + 1 + 8 + 8 + 4 + a.body.len()
        }
        Record::Spilled(l) => 4 + l.encoded.len(),
        Record::Status(_) => 8 + 1 + 8 + 1 + 1,
        Record::Event(e) => 8 + 1 + 1 + 4 + 8 + 2 + e.error.len(),
        Record::User(u) => 2 + u.user.len() + 8 + 2 + u.phone.len() + 2 + u.email.len() + 2 + u.blocked.encoded.len(),
        Record::Idempotency(i) => 2 + i.client.len() + 2 + i.key.len() + 32 + 8 + 2 + 4 + i.response.len(),
        Record::Fallback(f) => 8 + 1 + 8 + 1 + 1 + 4 + 8 + 1 + 2 + f.text.len(),
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
        Record::Accepted(a) | Record::Restored(a) => {
            out.push(if matches!(record, Record::Accepted(_)) { KIND_ACCEPTED } else { KIND_RESTORED });
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
            out.push(s.notify as u8);
            out.push(s.reason as u8);
        }
        Record::Event(e) => {
            assert!(e.error.len() <= EVENT_ERROR_BYTES_MAX, "event error text over limit");
            out.push(KIND_EVENT);
            out.extend_from_slice(&e.seq.to_le_bytes());
            out.push(e.event as u8);
            out.push(e.outcome as u8);
            out.extend_from_slice(&e.attempts.to_le_bytes());
            out.extend_from_slice(&e.at_ms.to_le_bytes());
            put_str16(out, e.error.as_bytes());
        }
        Record::User(u) => {
            out.push(KIND_USER);
            put_str16(out, u.user.as_bytes());
            out.extend_from_slice(&u.first_seen_at_ms.to_le_bytes());
            put_str16(out, u.phone.as_bytes());
            put_str16(out, u.email.as_bytes());
            out.extend_from_slice(&u.blocked.count.to_le_bytes());
            out.extend_from_slice(u.blocked.encoded);
        }
        Record::Idempotency(i) => {
            out.push(KIND_IDEMPOTENCY);
            put_str16(out, i.client.as_bytes());
            put_str16(out, i.key.as_bytes());
            out.extend_from_slice(&i.body_sha256);
            out.extend_from_slice(&i.at_ms.to_le_bytes());
            out.extend_from_slice(&i.status.to_le_bytes());
            out.extend_from_slice(&(i.response.len() as u32).to_le_bytes());
            out.extend_from_slice(i.response);
        }
        Record::Spilled(l) => {
            out.push(KIND_SPILLED);
            out.extend_from_slice(&(l.len() as u32).to_le_bytes());
            out.extend_from_slice(l.encoded);
        }
        Record::Fallback(f) => {
            assert!(f.text.len() <= EVENT_ERROR_BYTES_MAX, "fallback text over limit");
            out.push(KIND_FALLBACK);
            out.extend_from_slice(&f.seq.to_le_bytes());
            out.push(f.step as u8);
            out.extend_from_slice(&f.at_ms.to_le_bytes());
            out.push(f.channel);
            out.push(f.channels);
            out.extend_from_slice(&f.attempts.to_le_bytes());
            out.extend_from_slice(&f.when_ms.to_le_bytes());
            out.push(f.notify as u8);
            put_str16(out, f.text.as_bytes());
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

/// Decodes the record at the start of `buf`, checking its CRC.
pub fn decode(buf: &[u8]) -> Decoded<'_> {
    decode_with(buf, true)
}

/// Decodes a record inside a commit whose checksum already held: the
/// record's own CRC is not recomputed (recovery reads each byte's checksum
/// once). Framing and payload are still checked.
pub fn decode_trusted(buf: &[u8]) -> Decoded<'_> {
    decode_with(buf, false)
}

fn decode_with(buf: &[u8], check_crc: bool) -> Decoded<'_> {
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
    if check_crc && frame_crc(&buf[..4], &buf[8..total]) != crc {
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
        KIND_ACCEPTED | KIND_RESTORED => {
            let seq = r.u64()?;
            let client = r.str16()?;
            let to = r.str16()?;
            let priority = Priority::from_u8(r.u8()?)?;
            let expires_at_ms = r.u64()?;
            let accepted_at_ms = r.u64()?;
            let body_len = r.u32()? as usize;
            let body = r.bytes(body_len)?;
            let a = Accepted { seq, client, to, priority, expires_at_ms, accepted_at_ms, body };
            if kind == KIND_ACCEPTED {
                Record::Accepted(a)
            } else {
                Record::Restored(a)
            }
        }
        KIND_SPILLED => {
            let count = r.u32()? as usize;
            if count > SPILLED_SEQS_MAX {
                return None;
            }
            Record::Spilled(SeqList { encoded: r.bytes(count * 8)? })
        }
        KIND_STATUS => {
            let seq = r.u64()?;
            let status = Status::from_u8(r.u8()?)?;
            let at_ms = r.u64()?;
            let notify = match r.u8()? {
                0 => false,
                1 => true,
                _ => return None,
            };
            let reason = Reason::from_u8(r.u8()?)?;
            Record::Status(StatusChange { seq, status, at_ms, notify, reason })
        }
        KIND_EVENT => {
            let seq = r.u64()?;
            let event = Status::from_u8(r.u8()?)?;
            let outcome = EventOutcome::from_u8(r.u8()?)?;
            let attempts = r.u32()?;
            let at_ms = r.u64()?;
            let error = r.str16()?;
            Record::Event(EventChange { seq, event, outcome, attempts, at_ms, error })
        }
        KIND_USER => {
            let user = r.str16()?;
            let first_seen_at_ms = r.u64()?;
            let phone = r.str16()?;
            let email = r.str16()?;
            let count = r.u16()?;
            if count as usize > crate::limits::BLOCKED_CLIENTS_PER_USER_MAX {
                return None;
            }
            let start = r.pos;
            for _ in 0..count {
                r.str16()?;
            }
            let blocked = ClientList { encoded: &p[start..r.pos], count };
            Record::User(UserRecord { user, first_seen_at_ms, phone, email, blocked })
        }
        KIND_IDEMPOTENCY => {
            let client = r.str16()?;
            let key = r.str16()?;
            let body_sha256: [u8; 32] = r.bytes(32)?.try_into().ok()?;
            let at_ms = r.u64()?;
            let status = r.u16()?;
            let len = r.u32()? as usize;
            let response = r.bytes(len)?;
            Record::Idempotency(IdempotencyRecord { client, key, body_sha256, at_ms, status, response })
        }
        KIND_FALLBACK => {
            let seq = r.u64()?;
            let step = FallbackStep::from_u8(r.u8()?)?;
            let at_ms = r.u64()?;
            let channel = r.u8()?;
            let channels = r.u8()?;
            let attempts = r.u32()?;
            let when_ms = r.u64()?;
            let notify = match r.u8()? {
                0 => false,
                1 => true,
                _ => return None,
            };
            let text = r.str16()?;
            Record::Fallback(FallbackChange { seq, step, at_ms, channel, channels, attempts, when_ms, notify, text })
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
        fn restored_and_spilled_roundtrip(seq: u64, to in "\\PC{0,60}", seqs in proptest::collection::vec(any::<u64>(), 0..SPILLED_SEQS_MAX)) {
            roundtrip(Record::Restored(Accepted {
                seq, client: "c", to: &to, priority: Priority::Low,
                expires_at_ms: 1, accepted_at_ms: 2, body: b"x",
            }));
            let mut buf = Vec::new();
            SeqList::encode(&seqs, &mut buf);
            let list = SeqList::new(&buf);
            prop_assert_eq!(list.iter().collect::<Vec<_>>(), seqs);
            roundtrip(Record::Spilled(list));
        }

        #[test]
        fn status_and_header_roundtrip(seq: u64, s in 0u8..6, at: u64, shard: u16, seg: u64, notify: bool, r in 0u8..4) {
            roundtrip(Record::Status(StatusChange {
                seq, status: Status::from_u8(s).unwrap(), at_ms: at, notify, reason: Reason::from_u8(r).unwrap(),
            }));
            roundtrip(Record::SegmentHeader(SegmentHeader { shard, segment: seg, next_seq: seq }));
        }

        #[test]
        fn idempotency_roundtrips(client in "[a-z]{1,20}", key in "[!-~]{1,255}", h: [u8; 32], at: u64, status: u16,
                                  response in proptest::collection::vec(any::<u8>(), 0..500)) {
            roundtrip(Record::Idempotency(IdempotencyRecord {
                client: &client, key: &key, body_sha256: h, at_ms: at, status, response: &response,
            }));
        }

        #[test]
        fn event_roundtrips(seq: u64, s in 1u8..6, o in 0u8..5, attempts: u32, at: u64, error in "\\PC{0,60}") {
            roundtrip(Record::Event(EventChange {
                seq, event: Status::from_u8(s).unwrap(), outcome: EventOutcome::from_u8(o).unwrap(),
                attempts, at_ms: at, error: &error,
            }));
        }

        #[test]
        fn user_roundtrips(user in "\\PC{0,60}", at: u64, phone in "\\+[0-9]{0,15}", email in "\\PC{0,40}",
                           blocked in proptest::collection::vec("[a-z0-9-]{0,30}", 0..=64)) {
            let mut buf = Vec::new();
            let list = ClientList::build(blocked.iter().map(String::as_str), &mut buf);
            prop_assert_eq!(list.iter().collect::<Vec<_>>(), blocked.iter().map(String::as_str).collect::<Vec<_>>());
            roundtrip(Record::User(UserRecord { user: &user, first_seen_at_ms: at, phone: &phone, email: &email, blocked: list }));
        }

        #[test]
        fn fallback_roundtrips(seq: u64, step in 0u8..8, at: u64, channel: u8, channels: u8, attempts: u32,
                               when: u64, notify: bool, text in "\\PC{0,60}") {
            roundtrip(Record::Fallback(FallbackChange {
                seq, step: FallbackStep::from_u8(step).unwrap(), at_ms: at, channel, channels, attempts,
                when_ms: when, notify, text: &text,
            }));
        }

        #[test]
        fn decode_never_panics_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn truncation_is_never_a_valid_record(cut in 1usize..40) {
            let mut buf = Vec::new();
            encode(&Record::Status(StatusChange::plain(1, Status::Acked, 2)), &mut buf);
            let cut = cut.min(buf.len() - 1);
            let valid = matches!(decode(&buf[..cut]), Decoded::Record { .. });
            prop_assert!(!valid);
        }
    }
}
