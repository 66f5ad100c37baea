//! The event feed: each shard's receipts for clients that read them with
//! `GET /v1/events` instead of receiving webhooks, kept on disk for at
//! least the retention period.
//!
//! The journal stays the system of record: an event is owed there until
//! its feed entry is durable, exactly as a webhook event is owed until its
//! endpoint answered 2xx. A crash between the feed's fdatasync and the
//! `Event` record that settles it writes the entry once more (same event
//! id; the feed is at least once, like webhooks).
//!
//! Layout: `shard-N/events/<hex of the client id>.<start ms>.feed`, one
//! file per client and time span (`file_span_ms`, an hour by default, or
//! `file_bytes_max`, whichever comes first). A file is a run of entries
//! `[u32 length][u32 CRC32C of the payload][payload]`, the payload being
//! the event's JSON. Writes go through the [`Storage`] seam: the tail block
//! is rewritten with the new entries after it (O_DIRECT wants aligned
//! writes), then the file is fdatasynced. A reader stops at the first entry
//! that is not valid, so a write torn by a crash is simply the end of that
//! file; after a restart the writer never appends to an old file, it opens
//! a new one, so nothing valid can ever follow a torn tail.
//!
//! Positions ([`FeedPos`]) are (file start, byte offset after an entry):
//! stable, ordered, and meaningful after a restart. Retention deletes whole
//! files once their newest possible entry is older than `retention_ms`;
//! a position in a deleted file reads on from the next file.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use hashbrown::HashMap;

use crate::limits::BLOCK_BYTES;
use crate::storage::{Storage, StorageFile};

/// Bytes of an entry header: length and CRC32C.
const ENTRY_HEADER_BYTES: usize = 8;
/// Largest event JSON the feed stores (an event carries a message's status,
/// never its body).
pub const FEED_EVENT_BYTES_MAX: usize = 64 * 1024;
/// Bytes read from disk at a time.
const READ_CHUNK_BYTES: usize = 256 * 1024;

/// Where and how long the feed keeps events.
#[derive(Debug, Clone)]
pub struct FeedConfig {
    /// The shard's feed directory (`shard-N/events`).
    pub dir: PathBuf,
    /// Events stay readable at least this long.
    pub retention_ms: u64,
    /// A file takes new entries for at most this long...
    pub file_span_ms: u64,
    /// ...or until it holds this many bytes.
    pub file_bytes_max: u64,
}

impl FeedConfig {
    /// The defaults under `dir`: an hour or 64 MiB per file.
    pub fn new(dir: PathBuf, retention_ms: u64) -> FeedConfig {
        FeedConfig { dir, retention_ms, file_span_ms: 3_600_000, file_bytes_max: 64 << 20 }
    }
}

/// A place in one client's feed on one shard: just after the entry that
/// ends at `offset` of the file that started at `file` (ms).
/// `FeedPos::default()` is before the first entry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FeedPos {
    /// Start (unix ms) of the file, which names it.
    pub file: u64,
    /// Byte offset just after the entry.
    pub offset: u64,
}

/// One event read back: its JSON and the position just after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedEvent {
    /// Position after this event (a cursor that resumes after it).
    pub pos: FeedPos,
    /// The event's JSON, as appended.
    pub json: Vec<u8>,
}

/// The file a client is appending to.
struct Writer<F> {
    start: u64,
    file: Rc<F>,
    /// Bytes written and durable.
    end: u64,
    /// The bytes of the last, partial block (from `end` rounded down).
    tail: Vec<u8>,
}

struct ClientFeed<F> {
    /// File start -> its durable end where known (files written by this
    /// process); None for files of an earlier run (read to the first
    /// invalid entry).
    files: BTreeMap<u64, Option<u64>>,
    writer: Option<Writer<F>>,
}

impl<F> Default for ClientFeed<F> {
    fn default() -> Self {
        ClientFeed { files: BTreeMap::new(), writer: None }
    }
}

/// One shard's event feed. One task appends ([`FeedStore::append`]); any
/// number read concurrently (they never read past what is durable).
pub struct FeedStore<S: Storage> {
    storage: S,
    cfg: FeedConfig,
    clients: RefCell<HashMap<String, ClientFeed<S::File>>>,
}

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<String> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> =
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect();
    String::from_utf8(bytes?).ok()
}

/// The file name of `client`'s feed file that started at `start`.
fn file_name(client: &str, start: u64) -> String {
    format!("{}.{start}.feed", hex(client))
}

/// Parses a feed file name into (client, start).
fn parse_file_name(name: &str) -> Option<(String, u64)> {
    let stem = name.strip_suffix(".feed")?;
    let (client, start) = stem.split_once('.')?;
    Some((unhex(client)?, start.parse().ok()?))
}

/// Appends one entry for `json` to `out`.
pub fn encode_entry(out: &mut Vec<u8>, json: &[u8]) {
    out.extend_from_slice(&(json.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(json).to_le_bytes());
    out.extend_from_slice(json);
}

/// What [`decode_entry`] found at the start of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Entry<'a> {
    /// A valid entry: its payload and its size with the header.
    Valid(&'a [u8], usize),
    /// The buffer ends inside the entry, which may be valid: read
    /// `needed` bytes from its start.
    Short {
        /// Bytes of the whole entry, header included.
        needed: usize,
    },
    /// Not an entry (zeros, a torn write, or damage): the file ends here.
    End,
}

/// Decodes the entry at the start of `buf`.
pub fn decode_entry(buf: &[u8]) -> Entry<'_> {
    if buf.len() < ENTRY_HEADER_BYTES {
        return Entry::Short { needed: ENTRY_HEADER_BYTES };
    }
    let len = u32::from_le_bytes(buf[0..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(buf[4..8].try_into().expect("4 bytes"));
    if len == 0 || len > FEED_EVENT_BYTES_MAX {
        return Entry::End;
    }
    let total = ENTRY_HEADER_BYTES + len;
    if buf.len() < total {
        return Entry::Short { needed: total };
    }
    let payload = &buf[ENTRY_HEADER_BYTES..total];
    if crc32c::crc32c(payload) != crc {
        return Entry::End;
    }
    Entry::Valid(payload, total)
}

impl<S: Storage> FeedStore<S> {
    /// Opens (creating) the feed directory and lists its files. Blocking:
    /// called once while the shard starts.
    pub fn open(storage: S, cfg: FeedConfig) -> io::Result<FeedStore<S>> {
        std::fs::create_dir_all(&cfg.dir)?;
        let mut clients: HashMap<String, ClientFeed<S::File>> = HashMap::new();
        for entry in std::fs::read_dir(&cfg.dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some((client, start)) = name.to_str().and_then(parse_file_name) else {
                tracing::warn!(dir = %cfg.dir.display(), file = ?name, "ignoring a file that is not a feed file");
                continue;
            };
            clients.entry(client).or_default().files.insert(start, None);
        }
        Ok(FeedStore { storage, cfg, clients: RefCell::new(clients) })
    }

    fn path(&self, client: &str, start: u64) -> PathBuf {
        self.cfg.dir.join(file_name(client, start))
    }

    /// Appends events (`(client id, event JSON)`, in order) and returns
    /// once they are durable. Only one append may run at a time.
    pub async fn append(&self, now_ms: u64, items: &[(&str, &[u8])]) -> io::Result<()> {
        // Group by client, keeping each client's order.
        let mut batches: Vec<(&str, Vec<u8>)> = Vec::new();
        for &(client, json) in items {
            if json.is_empty() || json.len() > FEED_EVENT_BYTES_MAX {
                return Err(io::Error::new(io::ErrorKind::InvalidInput, "feed event is empty or too large"));
            }
            let i = match batches.iter().position(|(c, _)| *c == client) {
                Some(i) => i,
                None => {
                    batches.push((client, Vec::new()));
                    batches.len() - 1
                }
            };
            encode_entry(&mut batches[i].1, json);
        }
        let mut touched = Vec::with_capacity(batches.len());
        for (client, bytes) in &batches {
            touched.push(self.write(client, now_ms, bytes).await?);
        }
        for (file, _, _) in &touched {
            file.sync().await?;
        }
        let mut clients = self.clients.borrow_mut();
        for ((client, _), (_, start, end)) in batches.iter().zip(touched) {
            let feed = clients.entry((*client).to_owned()).or_default();
            feed.files.insert(start, Some(end));
            if let Some(w) = feed.writer.as_mut().filter(|w| w.start == start) {
                let keep_from = (end - end % BLOCK_BYTES) - (w.end - w.end % BLOCK_BYTES);
                w.tail.drain(..keep_from as usize);
                w.end = end;
            }
        }
        Ok(())
    }

    /// Writes `bytes` (whole entries) after `client`'s durable end, rolling
    /// to a new file when needed; returns the file, its start and the new
    /// end. Not durable until the file is synced.
    async fn write(&self, client: &str, now_ms: u64, bytes: &[u8]) -> io::Result<(Rc<S::File>, u64, u64)> {
        let roll = {
            let clients = self.clients.borrow();
            match clients.get(client).and_then(|f| f.writer.as_ref()) {
                None => true,
                Some(w) => now_ms.saturating_sub(w.start) >= self.cfg.file_span_ms || w.end >= self.cfg.file_bytes_max,
            }
        };
        if roll {
            let last = self.clients.borrow().get(client).and_then(|f| f.files.keys().next_back().copied());
            let start = now_ms.max(last.map_or(0, |l| l + 1));
            let file = self.storage.open(&self.path(client, start), Some(BLOCK_BYTES)).await?;
            let mut clients = self.clients.borrow_mut();
            let feed = clients.entry(client.to_owned()).or_default();
            feed.files.insert(start, Some(0));
            feed.writer = Some(Writer { start, file: Rc::new(file), end: 0, tail: Vec::new() });
        }
        let (file, start, block_start, data) = {
            let mut clients = self.clients.borrow_mut();
            let w = clients.get_mut(client).and_then(|f| f.writer.as_mut()).expect("a writer was just opened");
            w.tail.extend_from_slice(bytes);
            (w.file.clone(), w.start, w.end - w.end % BLOCK_BYTES, w.tail.clone())
        };
        let written = file.write_at(block_start, data.len(), |dst| dst.copy_from_slice(&data)).await;
        if let Err(e) = written {
            // Forget the unwritten bytes: the next append rewrites from the
            // durable end.
            let mut clients = self.clients.borrow_mut();
            if let Some(w) = clients.get_mut(client).and_then(|f| f.writer.as_mut()) {
                let keep = (w.end - block_start) as usize;
                w.tail.truncate(keep);
            }
            return Err(e);
        }
        Ok((file, start, block_start + data.len() as u64))
    }

    /// Reads up to `limit` of `client`'s events after `after`; returns them
    /// and the position to resume from (after the last one returned, or
    /// further on past files that held nothing more).
    pub async fn read(&self, client: &str, after: FeedPos, limit: usize) -> io::Result<(Vec<FeedEvent>, FeedPos)> {
        let mut out = Vec::new();
        let mut pos = after;
        while out.len() < limit {
            // The first file at or after `pos.file`, and what is known of it.
            let next = {
                let clients = self.clients.borrow();
                let Some(feed) = clients.get(client) else { break };
                let found = feed.files.range(pos.file..).next().map(|(&s, &cap)| (s, cap));
                found.map(|(start, cap)| {
                    let current = feed.writer.as_ref().filter(|w| w.start == start).map(|w| w.file.clone());
                    let is_last = feed.files.range(start + 1..).next().is_none();
                    (start, cap, current, is_last)
                })
            };
            let Some((start, cap, current, is_last)) = next else { break };
            let offset = if start == pos.file { pos.offset } else { 0 };
            if cap.is_some_and(|c| offset >= c) {
                if is_last {
                    break;
                }
                pos = FeedPos { file: start + 1, offset: 0 };
                continue;
            }
            let file = match current {
                Some(f) => f,
                None => match self.storage.open(&self.path(client, start), None).await {
                    Ok(f) => Rc::new(f),
                    // Deleted by retention meanwhile: go on with the next.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        pos = FeedPos { file: start + 1, offset: 0 };
                        continue;
                    }
                    Err(e) => return Err(e),
                },
            };
            let end = read_entries(&*file, start, offset, cap, limit, &mut out).await?;
            if out.len() >= limit {
                break;
            }
            // This file holds nothing more now: the newest one may grow,
            // so resume at its end; otherwise go on with the next file.
            if is_last {
                pos = FeedPos { file: start, offset: end };
                break;
            }
            pos = FeedPos { file: start + 1, offset: 0 };
        }
        if let Some(last) = out.last() {
            pos = last.pos;
        }
        // Never hand out a position before the one asked for.
        Ok((out, pos.max(after)))
    }

    /// Deletes files whose newest possible entry is older than the
    /// retention period; returns how many.
    pub fn expire(&self, now_ms: u64) -> usize {
        let mut removed = 0;
        let mut clients = self.clients.borrow_mut();
        for (client, feed) in clients.iter_mut() {
            let current = feed.writer.as_ref().map(|w| w.start);
            let old: Vec<u64> = feed
                .files
                .keys()
                .copied()
                .filter(|&s| Some(s) != current)
                .filter(|&s| s + self.cfg.file_span_ms + self.cfg.retention_ms < now_ms)
                .collect();
            for start in old {
                match self.storage.remove(&self.path(client, start)) {
                    Ok(()) => {
                        feed.files.remove(&start);
                        removed += 1;
                    }
                    Err(e) => tracing::warn!(error = %e, "could not delete an expired feed file"),
                }
            }
        }
        removed
    }

    /// Feed files on disk (for tests and operators).
    pub fn file_count(&self) -> usize {
        self.clients.borrow().values().map(|f| f.files.len()).sum()
    }

    /// The directory the feed lives in.
    pub fn dir(&self) -> &Path {
        &self.cfg.dir
    }
}

/// Reads entries of `file` (started at `start`) from `offset` into `out`
/// until `limit` events, `cap` bytes, or the first invalid entry; returns
/// the offset reached.
async fn read_entries<F: StorageFile>(
    file: &F,
    start: u64,
    mut offset: u64,
    cap: Option<u64>,
    limit: usize,
    out: &mut Vec<FeedEvent>,
) -> io::Result<u64> {
    'chunks: loop {
        let want = cap.map_or(READ_CHUNK_BYTES, |c| READ_CHUNK_BYTES.min(c.saturating_sub(offset) as usize));
        if want == 0 {
            return Ok(offset);
        }
        let buf = file.read_at(offset, want).await?;
        let mut at = 0;
        loop {
            if out.len() >= limit {
                return Ok(offset + at as u64);
            }
            match decode_entry(&buf[at..]) {
                Entry::Valid(json, n) => {
                    at += n;
                    out.push(FeedEvent {
                        pos: FeedPos { file: start, offset: offset + at as u64 },
                        json: json.to_vec(),
                    });
                }
                Entry::End => return Ok(offset + at as u64),
                // The file (or what the read returned) ends inside it.
                Entry::Short { .. } if buf.len() < want => return Ok(offset + at as u64),
                // An entry larger than a chunk: read it on its own.
                Entry::Short { needed } if at == 0 => {
                    let whole = file.read_at(offset, needed).await?;
                    let Entry::Valid(json, n) = decode_entry(&whole) else { return Ok(offset) };
                    offset += n as u64;
                    out.push(FeedEvent { pos: FeedPos { file: start, offset }, json: json.to_vec() });
                    continue 'chunks;
                }
                // The chunk ends inside it: read on from its start.
                Entry::Short { .. } => break,
            }
        }
        offset += at as u64;
    }
}

#[cfg(test)]
mod tests;
