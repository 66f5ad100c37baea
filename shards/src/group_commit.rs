//! The journal's group-commit bookkeeping, without I/O: which bytes the next
//! write carries, and what is durable once it completed.
//!
//! Records are appended to the in-memory tail of the active segment inside
//! an *open commit*, whose 32-byte header is reserved in place. When the
//! committer asks for the next write, the open commit is *sealed* (its
//! header filled with its length, checksum and sequence number) and every
//! sealed commit not yet written goes out in one block-aligned write, from
//! the block holding the first unwritten byte. Records appended meanwhile
//! open the next commit. A commit is also sealed when it reaches
//! [`COMMIT_TARGET_BYTES`], which bounds the bytes of one write.
//!
//! What must stay true (asserted):
//! - a write covers whole sealed commits only, so the disk only ever holds
//!   intact commits, the torn last one of a crash aside;
//! - the already-durable prefix of the first block is rewritten with the
//!   same bytes, so a torn write can only hit bytes that were not durable;
//! - generations grow by one per record; the durable generation never passes
//!   the appended one and never goes back;
//! - one write at a time ([`GroupCommit::next_write`] then [`GroupCommit::complete`]).

use std::collections::VecDeque;

use crate::commit::{body_crc, encode_header, CommitHeader, CommitKind};
use crate::limits::{BLOCK_BYTES, COMMIT_HEADER_BYTES, COMMIT_TARGET_BYTES};
use crate::record::{encode, encoded_len, Record};

/// One write gathers sealed commits up to about this many bytes (at least one commit).
pub const WRITE_BYTES_TARGET: usize = 4 * COMMIT_TARGET_BYTES;

/// Where an appended record landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// Commit generation: durable once the durable generation reaches it.
    pub generation: u64,
    /// Segment number.
    pub segment: u64,
    /// Offset of the record in the segment.
    pub offset: u64,
}

/// The next write the committer must make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Write {
    /// Segment to write to.
    pub segment: u64,
    /// Block-aligned file offset of the first byte.
    pub file_offset: u64,
    /// Bytes of the write (before padding to whole blocks).
    pub len: usize,
    /// Every record up to this generation is durable once the write and its fdatasync completed.
    pub generation: u64,
    start: usize,
    end: usize,
}

/// Where the journal continues after recovery.
#[derive(Debug, Clone)]
pub struct Resume {
    /// The last segment.
    pub segment: u64,
    /// Offset just past its last intact commit.
    pub end: u64,
    /// Its bytes `align_down(end, BLOCK)..end` (rewritten unchanged with the next write).
    pub partial_block: Vec<u8>,
    /// The next commit sequence number.
    pub next_commit_seq: u64,
}

struct Open {
    /// Offset of the reserved header in `bytes`.
    header_at: usize,
    /// Generation of its last record.
    generation: u64,
}

/// Unwritten bytes of one segment.
struct Tail {
    segment: u64,
    /// File offset of `bytes[0]`, block aligned.
    base: u64,
    bytes: Vec<u8>,
    /// `bytes[..flushed]` is durable.
    flushed: usize,
    /// (end in `bytes`, generation) of every sealed commit not yet durable.
    sealed: VecDeque<(usize, u64)>,
    open: Option<Open>,
    /// The next segment started: nothing more is appended here.
    closed: bool,
}

impl Tail {
    fn new(segment: u64, base: u64, bytes: Vec<u8>) -> Tail {
        let flushed = bytes.len();
        Tail { segment, base, bytes, flushed, sealed: VecDeque::new(), open: None, closed: false }
    }
    fn end_in_segment(&self) -> u64 {
        self.base + self.bytes.len() as u64
    }
}

/// The group-commit state of one shard's journal.
pub struct GroupCommit {
    /// Oldest first; the back one is the active segment.
    tails: VecDeque<Tail>,
    appended_gen: u64,
    durable_gen: u64,
    next_commit_seq: u64,
    in_flight: Option<Write>,
}

impl GroupCommit {
    /// Continues after `resume`, or starts with no segment (call
    /// [`GroupCommit::start_segment`] first).
    pub fn new(resume: Option<Resume>) -> GroupCommit {
        let mut gc = GroupCommit {
            tails: VecDeque::new(),
            appended_gen: 0,
            durable_gen: 0,
            next_commit_seq: 1,
            in_flight: None,
        };
        if let Some(r) = resume {
            assert_eq!(r.end % BLOCK_BYTES, r.partial_block.len() as u64 % BLOCK_BYTES, "partial block misaligned");
            gc.next_commit_seq = r.next_commit_seq;
            gc.tails.push_back(Tail::new(r.segment, r.end - r.partial_block.len() as u64, r.partial_block));
        }
        gc
    }

    /// The active segment, if any.
    pub fn active_segment(&self) -> Option<u64> {
        self.tails.back().map(|t| t.segment)
    }

    /// Offset in the active segment after appending `record_bytes` more
    /// (counting a commit header, in case one must be opened).
    pub fn active_end_after(&self, record_bytes: usize) -> u64 {
        self.tails.back().map_or(0, |t| t.end_in_segment()) + (COMMIT_HEADER_BYTES + record_bytes) as u64
    }

    /// Bytes in the active segment so far.
    pub fn active_end(&self) -> u64 {
        self.tails.back().map_or(0, Tail::end_in_segment)
    }

    /// Closes the active segment (sealing its open commit) and starts
    /// `segment`, whose first record must be appended next.
    pub fn start_segment(&mut self, segment: u64) {
        if let Some(i) = self.tails.len().checked_sub(1) {
            self.seal(i);
            self.tails[i].closed = true;
        }
        self.tails.push_back(Tail::new(segment, 0, Vec::with_capacity(64 * 1024)));
    }

    /// Appends a record to the active segment's open commit.
    pub fn append(&mut self, record: &Record<'_>) -> Appended {
        let len = encoded_len(record);
        let last = self.tails.len().checked_sub(1).expect("a segment was started");
        let open_body = {
            let t = &self.tails[last];
            t.open.as_ref().map(|o| t.bytes.len() - o.header_at - COMMIT_HEADER_BYTES)
        };
        if open_body.is_some_and(|body| body > 0 && body + len > COMMIT_TARGET_BYTES) {
            self.seal(last);
        }
        self.appended_gen += 1;
        let generation = self.appended_gen;
        let tail = &mut self.tails[last];
        assert!(!tail.closed, "append to a closed segment");
        if tail.open.is_none() {
            let header_at = tail.bytes.len();
            tail.bytes.extend_from_slice(&[0u8; COMMIT_HEADER_BYTES]);
            tail.open = Some(Open { header_at, generation });
        }
        let offset = tail.end_in_segment();
        encode(record, &mut tail.bytes);
        if let Some(open) = tail.open.as_mut() {
            open.generation = generation;
        }
        Appended { generation, segment: tail.segment, offset }
    }

    /// Seals the open commit of tail `i`, if any: fills its header.
    fn seal(&mut self, i: usize) {
        let seq = self.next_commit_seq;
        let tail = &mut self.tails[i];
        let Some(open) = tail.open.take() else { return };
        let body = &tail.bytes[open.header_at + COMMIT_HEADER_BYTES..];
        let header = CommitHeader {
            kind: CommitKind::Records,
            seq,
            body_len: u32::try_from(body.len()).expect("commit body bounded by COMMIT_BODY_BYTES_MAX"),
            body_crc: body_crc(body),
        };
        tail.bytes[open.header_at..open.header_at + COMMIT_HEADER_BYTES].copy_from_slice(&encode_header(&header));
        tail.sealed.push_back((tail.bytes.len(), open.generation));
        self.next_commit_seq += 1;
    }

    /// The next write, if anything is waiting: seals the oldest open commit
    /// and gathers sealed commits of the oldest segment with unwritten data.
    pub fn next_write(&mut self) -> Option<Write> {
        assert!(self.in_flight.is_none(), "one write at a time");
        while let Some(tail) = self.tails.front() {
            if tail.open.is_some() {
                self.seal(0);
            }
            let tail = &self.tails[0];
            if tail.sealed.is_empty() {
                if tail.closed {
                    self.tails.pop_front();
                    continue;
                }
                return None;
            }
            let start = tail.flushed - tail.flushed % BLOCK_BYTES as usize;
            let (mut end, mut generation) = tail.sealed[0];
            for &(e, g) in tail.sealed.iter().skip(1) {
                if e - start > WRITE_BYTES_TARGET {
                    break;
                }
                (end, generation) = (e, g);
            }
            let write = Write {
                segment: tail.segment,
                file_offset: tail.base + start as u64,
                len: end - start,
                generation,
                start,
                end,
            };
            self.in_flight = Some(write);
            return Some(write);
        }
        None
    }

    /// The bytes of the write in flight (valid until [`GroupCommit::complete`]).
    pub fn write_bytes(&self, write: &Write) -> &[u8] {
        assert_eq!(self.in_flight.as_ref(), Some(write), "not the write in flight");
        &self.tails[0].bytes[write.start..write.end]
    }

    /// Takes back the write in flight, which was not issued (its segment
    /// could not be allocated): the next [`GroupCommit::next_write`] offers
    /// its bytes again.
    pub fn abandon(&mut self, write: Write) {
        assert_eq!(self.in_flight.take(), Some(write), "abandoning a write that is not in flight");
    }

    /// Records that `write` and its fdatasync completed.
    pub fn complete(&mut self, write: Write) {
        assert_eq!(self.in_flight.take(), Some(write), "completing a write that is not in flight");
        let tail = self.tails.front_mut().expect("the written tail is still queued");
        assert_eq!(tail.segment, write.segment, "tail changed under a write");
        tail.flushed = write.end;
        while tail.sealed.front().is_some_and(|&(e, _)| e <= write.end) {
            tail.sealed.pop_front();
        }
        let keep_from = write.end - write.end % BLOCK_BYTES as usize;
        if keep_from > 0 {
            tail.bytes.drain(..keep_from);
            tail.base += keep_from as u64;
            tail.flushed -= keep_from;
            for s in tail.sealed.iter_mut() {
                s.0 -= keep_from;
            }
            if let Some(o) = tail.open.as_mut() {
                o.header_at -= keep_from;
            }
        }
        assert!(write.generation <= self.appended_gen, "durable generation passed appended");
        assert!(write.generation > self.durable_gen, "durable generation went backwards");
        self.durable_gen = write.generation;
    }

    /// Every record up to this generation is durable.
    pub fn durable_generation(&self) -> u64 {
        self.durable_gen
    }

    /// Every record up to this generation is durable or in the write in
    /// flight: a commit already covers it.
    pub fn taken_generation(&self) -> u64 {
        self.in_flight.as_ref().map_or(self.durable_gen, |w| w.generation)
    }

    /// The generation of the last appended record.
    pub fn appended_generation(&self) -> u64 {
        self.appended_gen
    }

    /// Bytes appended and not yet durable.
    pub fn unflushed_bytes(&self) -> usize {
        self.tails.iter().map(|t| t.bytes.len() - t.flushed).sum()
    }

    /// The oldest segment holding bytes not yet durable (u64::MAX if none).
    pub fn oldest_unflushed_segment(&self) -> u64 {
        self.tails.front().map_or(u64::MAX, |t| t.segment)
    }

    /// Where the journal ends once everything is durable: (segment, end
    /// offset, last commit sequence number). None while anything is unwritten.
    pub fn clean_end(&self) -> Option<(u64, u64, u64)> {
        if self.durable_gen != self.appended_gen || self.in_flight.is_some() {
            return None;
        }
        let t = self.tails.back()?;
        Some((t.segment, t.end_in_segment(), self.next_commit_seq - 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{SegmentHeader, StatusChange};
    use crate::scan::{scan, ScanEnd};
    use crate::Status;
    use proptest::prelude::*;

    fn status(seq: u64) -> Record<'static> {
        Record::Status(StatusChange::plain(seq, Status::Acked, seq))
    }

    /// Applies a write to a disk image (padded to whole blocks with zeros, as the journal does).
    fn apply(disk: &mut Vec<u8>, gc: &GroupCommit, w: &Write) {
        let bytes = gc.write_bytes(w);
        let padded = bytes.len().div_ceil(BLOCK_BYTES as usize) * BLOCK_BYTES as usize;
        let at = w.file_offset as usize;
        if disk.len() < at + padded {
            disk.resize(at + padded, 0);
        }
        disk[at..at + bytes.len()].copy_from_slice(bytes);
        disk[at + bytes.len()..at + padded].fill(0);
    }

    fn records_on(disk: &[u8]) -> (Vec<u64>, ScanEnd) {
        let mut seqs = Vec::new();
        let s = scan(disk, |_, r| {
            if let Record::Status(st) = r {
                seqs.push(st.seq)
            }
        });
        (seqs, s.end)
    }

    #[test]
    fn records_appended_during_a_write_ride_the_next_commit() {
        let mut gc = GroupCommit::new(None);
        gc.start_segment(1);
        gc.append(&Record::SegmentHeader(SegmentHeader { shard: 0, segment: 1, next_seq: 0 }));
        let mut disk = Vec::new();
        for s in 0..3 {
            gc.append(&status(s));
        }
        let w = gc.next_write().unwrap();
        assert_eq!(w.generation, 4);
        gc.append(&status(3)); // arrives while the write is in flight
        apply(&mut disk, &gc, &w);
        gc.complete(w);
        assert_eq!(records_on(&disk).0, vec![0, 1, 2]);
        let w = gc.next_write().unwrap();
        assert_eq!(w.file_offset, 0, "the partial first block is rewritten");
        apply(&mut disk, &gc, &w);
        gc.complete(w);
        let (seqs, end) = records_on(&disk);
        assert_eq!(seqs, vec![0, 1, 2, 3]);
        assert!(matches!(end, ScanEnd::Clean { .. }));
        assert_eq!(gc.next_write(), None);
        assert_eq!(gc.durable_generation(), 5);
        assert!(gc.clean_end().is_some());
    }

    #[test]
    fn a_big_burst_is_split_into_commits_of_the_target_size() {
        let mut gc = GroupCommit::new(None);
        gc.start_segment(1);
        let body = vec![b'x'; 100_000];
        for seq in 0..40 {
            gc.append(&Record::Accepted(crate::record::Accepted {
                seq,
                client: "c",
                to: "u",
                priority: crate::Priority::Normal,
                expires_at_ms: 0,
                accepted_at_ms: 0,
                body: &body,
            }));
        }
        let mut disk = Vec::new();
        let mut writes = 0;
        while let Some(w) = gc.next_write() {
            assert!(w.len <= WRITE_BYTES_TARGET + BLOCK_BYTES as usize, "write of {} bytes", w.len);
            apply(&mut disk, &gc, &w);
            gc.complete(w);
            writes += 1;
        }
        assert!(writes >= 1);
        let mut n = 0;
        let s = scan(&disk, |_, _| n += 1);
        assert_eq!(n, 40);
        assert!(s.commits >= 4, "4 MB over 1 MiB commits: {}", s.commits);
    }

    proptest! {
        /// Any interleaving of appends, writes and crashes: the disk holds
        /// exactly the durable records (and maybe more), always in order.
        #[test]
        fn disk_always_holds_every_durable_record(ops in proptest::collection::vec(0u8..4, 1..300)) {
            let mut gc = GroupCommit::new(None);
            gc.start_segment(1);
            let mut disk = Vec::new();
            let mut next = 0u64;
            let mut gen_of = Vec::new();
            let mut pending: Option<Write> = None;
            for op in ops {
                match op {
                    0 | 1 => {
                        let a = gc.append(&status(next));
                        gen_of.push(a.generation);
                        next += 1;
                    }
                    2 => {
                        if pending.is_none() {
                            pending = gc.next_write();
                        }
                    }
                    _ => {
                        if let Some(w) = pending.take() {
                            apply(&mut disk, &gc, &w);
                            gc.complete(w);
                        }
                    }
                }
                let (seqs, _) = records_on(&disk);
                let durable = gen_of.iter().filter(|&&g| g <= gc.durable_generation()).count();
                prop_assert!(seqs.len() >= durable);
                prop_assert!(seqs.iter().enumerate().all(|(i, &s)| s == i as u64));
            }
        }
    }
}
