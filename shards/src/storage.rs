//! The storage seam: every disk operation of the journal writer (open,
//! write, fdatasync, read, delete, directory sync) goes through [`Storage`],
//! so the paths that run only when the disk fails can be tested.
//!
//! Two implementations:
//! - [`DmaStorage`], the real one: O_DIRECT files through glommio's io_uring
//!   (`DmaFile`). It also obeys a test-only fault plan read from the
//!   environment variable `ESH3AR_TEST_STORAGE_FAULT` (see [`Faults::parse`]),
//!   so integration tests can make the real binary's Nth write or fdatasync
//!   fail, or tear a write and die, at a chosen point.
//! - [`SimStorage`], in memory, for unit tests: it keeps what was written
//!   apart from what was fdatasynced, so a test can "crash" at any point and
//!   recover from exactly the bytes a real disk would still hold, or from a
//!   torn mix of old and new sectors (redb's `FuzzerBackend`, TigerBeetle's
//!   `testing/storage.zig`).
//!
//! Recovery reads segments with plain blocking reads before the shard
//! serves (`recovery.rs`); it is not behind this seam.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use glommio::io::{DmaFile, OpenOptions};

use crate::limits::BLOCK_BYTES;

/// The disk as the journal writer sees it.
#[allow(async_fn_in_trait)]
pub trait Storage {
    /// An open segment file.
    type File: StorageFile;
    /// Opens `path` for reading and writing. If it does not exist and
    /// `create_bytes` is set, creates it pre-allocated (zero-filled) to that
    /// size and makes the new directory entry durable.
    async fn open(&self, path: &Path, create_bytes: Option<u64>) -> io::Result<Self::File>;
    /// Deletes a file (not durable until [`Storage::sync_dir`]).
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// Makes a directory's entries durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
}

/// An open segment file.
#[allow(async_fn_in_trait)]
pub trait StorageFile {
    /// Writes `len` bytes at the block-aligned `offset`, padded with zeros
    /// to whole blocks. `fill` writes the bytes into the I/O buffer (called
    /// once, before the write is issued), so the caller's bytes are copied
    /// once and need not outlive the call. Not durable until [`StorageFile::sync`].
    async fn write_at(&self, offset: u64, len: usize, fill: impl FnOnce(&mut [u8])) -> io::Result<()>;
    /// fdatasync. A failure leaves the file's state unknown: the caller must
    /// never retry it and trust the result.
    async fn sync(&self) -> io::Result<()>;
    /// Reads `len` bytes at `offset` (any alignment); fewer where the file
    /// ends first.
    async fn read_at(&self, offset: u64, len: usize) -> io::Result<Vec<u8>>;
}

/// What a fault plan does to the operation it picks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// The Nth write fails with EIO and writes nothing.
    FailWrite,
    /// The Nth fdatasync fails with EIO (the data may or may not be on disk).
    FailSync,
    /// The Nth write writes only its first half (whole blocks, at least
    /// nothing) and then the process aborts, as a power cut mid-write would.
    TearWriteAndAbort,
}

/// A test-only fault plan: which operation fails, counted from 1.
#[derive(Debug)]
pub struct Faults {
    kind: FaultKind,
    at: u64,
    writes: Cell<u64>,
    syncs: Cell<u64>,
}

impl Faults {
    /// A plan that hits the `at`-th operation of its kind.
    pub fn new(kind: FaultKind, at: u64) -> Faults {
        Faults { kind, at, writes: Cell::new(0), syncs: Cell::new(0) }
    }

    /// Parses `write:N`, `fdatasync:N` or `torn:N`.
    pub fn parse(spec: &str) -> Option<Faults> {
        let (op, n) = spec.split_once(':')?;
        let at: u64 = n.trim().parse().ok().filter(|&n| n > 0)?;
        let kind = match op.trim() {
            "write" => FaultKind::FailWrite,
            "fdatasync" => FaultKind::FailSync,
            "torn" => FaultKind::TearWriteAndAbort,
            _ => return None,
        };
        Some(Faults::new(kind, at))
    }

    /// The plan in `ESH3AR_TEST_STORAGE_FAULT`, if any (test hook; a value
    /// that does not parse is ignored with a warning).
    pub fn from_env() -> Option<Faults> {
        let spec = std::env::var("ESH3AR_TEST_STORAGE_FAULT").ok()?;
        let faults = Faults::parse(&spec);
        if faults.is_none() {
            tracing::warn!(spec, "ignoring ESH3AR_TEST_STORAGE_FAULT: expected write:N, fdatasync:N or torn:N");
        } else {
            tracing::warn!(spec, "TEST HOOK: journal storage faults are armed");
        }
        faults
    }

    /// Counts a write; what to do with it.
    fn on_write(&self) -> Option<FaultKind> {
        let n = self.writes.get() + 1;
        self.writes.set(n);
        (n == self.at && self.kind != FaultKind::FailSync).then_some(self.kind)
    }

    /// Counts a sync; true if it must fail.
    fn on_sync(&self) -> bool {
        let n = self.syncs.get() + 1;
        self.syncs.set(n);
        n == self.at && self.kind == FaultKind::FailSync
    }
}

fn injected(what: &str) -> io::Error {
    io::Error::other(format!("injected {what} failure (ESH3AR_TEST_STORAGE_FAULT)"))
}

/// Half of a write's blocks, rounded down: what a torn write leaves.
fn torn_prefix(len: usize) -> usize {
    let blocks = len.div_ceil(BLOCK_BYTES as usize);
    (blocks / 2) * BLOCK_BYTES as usize
}

// ---------------------------------------------------------------------------
// The real disk.

/// How a write is made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SyncMode {
    /// A write, then an fdatasync: two operations per commit.
    #[default]
    Fdatasync,
    /// Files opened `O_DSYNC`: a write completes only once durable (FUA
    /// where the device has it), one operation per commit; `sync` does nothing.
    Dsync,
}

/// O_DIRECT files through glommio.
#[derive(Default)]
pub struct DmaStorage {
    faults: Option<Rc<Faults>>,
    sync: SyncMode,
}

impl DmaStorage {
    /// Real storage, with the test fault plan from the environment if one is set.
    pub fn from_env() -> DmaStorage {
        DmaStorage { faults: Faults::from_env().map(Rc::new), sync: SyncMode::default() }
    }
    /// Real storage with a given fault plan (tests).
    pub fn with_faults(faults: Faults) -> DmaStorage {
        DmaStorage { faults: Some(Rc::new(faults)), sync: SyncMode::default() }
    }
    /// The same storage, making writes durable as `sync` says.
    pub fn sync_mode(mut self, sync: SyncMode) -> DmaStorage {
        self.sync = sync;
        self
    }
}

/// A segment file opened O_DIRECT.
pub struct DmaSegment {
    file: DmaFile,
    faults: Option<Rc<Faults>>,
    sync: SyncMode,
}

impl Storage for DmaStorage {
    type File = DmaSegment;

    async fn open(&self, path: &Path, create_bytes: Option<u64>) -> io::Result<DmaSegment> {
        let existed = path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(create_bytes.is_some())
            .custom_flags(if self.sync == SyncMode::Dsync { libc::O_DSYNC } else { 0 })
            .dma_open(path)
            .await
            .map_err(io::Error::from)?;
        // A shared lock on the open file description: it lives as long as
        // any write of ours is in flight, even past a `kill -9` of this
        // process (io_uring requests hold the file), and recovery waits for
        // it (`recovery::wait_for_writers`). Best effort: a file system
        // without flock only loses the fence.
        let _ = nix::fcntl::flock(file.as_raw_fd(), nix::fcntl::FlockArg::LockSharedNonblock);
        if let (false, Some(bytes)) = (existed, create_bytes) {
            file.pre_allocate(bytes, false).await.map_err(io::Error::from)?;
            if let Some(dir) = path.parent() {
                self.sync_dir(dir)?;
            }
        }
        Ok(DmaSegment { file, faults: self.faults.clone(), sync: self.sync })
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        std::fs::File::open(dir)?.sync_all()
    }
}

impl StorageFile for DmaSegment {
    async fn write_at(&self, offset: u64, len: usize, fill: impl FnOnce(&mut [u8])) -> io::Result<()> {
        debug_assert_eq!(offset % BLOCK_BYTES, 0, "unaligned journal write");
        let mut write_len = len;
        match self.faults.as_ref().and_then(|f| f.on_write()) {
            Some(FaultKind::FailWrite) => return Err(injected("write")),
            Some(FaultKind::TearWriteAndAbort) => write_len = torn_prefix(len),
            _ => {}
        }
        let padded = (len as u64).div_ceil(BLOCK_BYTES) * BLOCK_BYTES;
        let mut buf = self.file.alloc_dma_buffer(padded as usize);
        let dst = buf.as_bytes_mut();
        fill(&mut dst[..len]);
        dst[len..].fill(0);
        if write_len < len {
            // The torn-write hook: only the first half of the blocks reach
            // the disk, as a power cut mid-write would leave them; then die.
            if write_len > 0 {
                let mut part = self.file.alloc_dma_buffer(write_len);
                part.as_bytes_mut().copy_from_slice(&buf.as_bytes()[..write_len]);
                let _ = self.file.write_at(part, offset).await;
                let _ = self.file.fdatasync().await;
            }
            eprintln!("TEST HOOK: tore a journal write ({write_len} of {len} bytes) and aborting");
            std::process::abort();
        }
        let written = self.file.write_at(buf, offset).await.map_err(io::Error::from)?;
        if written as u64 != padded {
            return Err(io::Error::other(format!("short write ({written} of {padded} bytes)")));
        }
        Ok(())
    }

    async fn sync(&self) -> io::Result<()> {
        if self.faults.as_ref().is_some_and(|f| f.on_sync()) {
            return Err(injected("fdatasync"));
        }
        match self.sync {
            SyncMode::Fdatasync => self.file.fdatasync().await.map_err(io::Error::from),
            SyncMode::Dsync => Ok(()),
        }
    }

    async fn read_at(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let data = self.file.read_at(offset, len).await.map_err(io::Error::from)?;
        Ok(data.to_vec())
    }
}

// ---------------------------------------------------------------------------
// The simulated disk.

#[derive(Default, Clone)]
struct SimFile {
    /// What a read sees (written, maybe not durable).
    current: Vec<u8>,
    /// What survives a crash (as of the last sync).
    durable: Vec<u8>,
}

#[derive(Default)]
struct SimDisk {
    files: HashMap<PathBuf, SimFile>,
    faults: Option<Faults>,
    /// While set, every fdatasync waits: writes stay written but not durable.
    hold_syncs: bool,
}

/// An in-memory disk that separates written from durable bytes.
#[derive(Clone, Default)]
pub struct SimStorage {
    disk: Rc<RefCell<SimDisk>>,
}

/// A file of [`SimStorage`].
pub struct SimSegment {
    disk: Rc<RefCell<SimDisk>>,
    path: PathBuf,
}

impl SimStorage {
    /// A simulated disk that fails as `faults` says.
    pub fn with_faults(faults: Faults) -> SimStorage {
        let s = SimStorage::default();
        s.disk.borrow_mut().faults = Some(faults);
        s
    }

    /// Makes every fdatasync wait (or go on again): a crash taken while
    /// they wait finds writes that reached the page cache but not the disk.
    pub fn hold_syncs(&self, hold: bool) {
        self.disk.borrow_mut().hold_syncs = hold;
    }

    /// What a crash now would leave: every file's durable bytes.
    pub fn crash_image(&self) -> HashMap<PathBuf, Vec<u8>> {
        self.disk.borrow().files.iter().map(|(p, f)| (p.clone(), f.durable.clone())).collect()
    }

    /// What a crash mid-write would leave: durable bytes, plus each 512-byte
    /// sector written since the last sync where `keep(sector_index)` says so.
    pub fn torn_image(&self, mut keep: impl FnMut(usize) -> bool) -> HashMap<PathBuf, Vec<u8>> {
        let disk = self.disk.borrow();
        let mut out = HashMap::new();
        for (p, f) in &disk.files {
            let mut img = f.durable.clone();
            img.resize(f.current.len().max(img.len()), 0);
            for (i, (cur, dur)) in f.current.chunks(512).zip(img.chunks_mut(512)).enumerate() {
                if cur != dur && keep(i) {
                    dur[..cur.len()].copy_from_slice(cur);
                }
            }
            out.insert(p.clone(), img);
        }
        out
    }

    /// Writes an image to real files (paths as they were), for recovery.
    pub fn write_image(image: &HashMap<PathBuf, Vec<u8>>) -> io::Result<()> {
        for (p, bytes) in image {
            if let Some(dir) = p.parent() {
                std::fs::create_dir_all(dir)?;
            }
            std::fs::write(p, bytes)?;
        }
        Ok(())
    }
}

impl Storage for SimStorage {
    type File = SimSegment;

    async fn open(&self, path: &Path, create_bytes: Option<u64>) -> io::Result<SimSegment> {
        let mut disk = self.disk.borrow_mut();
        if !disk.files.contains_key(path) {
            let Some(bytes) = create_bytes else {
                return Err(io::Error::new(io::ErrorKind::NotFound, format!("{} not found", path.display())));
            };
            let zeros = vec![0u8; bytes as usize];
            disk.files.insert(path.to_owned(), SimFile { current: zeros.clone(), durable: zeros });
        }
        Ok(SimSegment { disk: self.disk.clone(), path: path.to_owned() })
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        self.disk.borrow_mut().files.remove(path);
        Ok(())
    }

    fn sync_dir(&self, _dir: &Path) -> io::Result<()> {
        Ok(())
    }
}

impl StorageFile for SimSegment {
    async fn write_at(&self, offset: u64, len: usize, fill: impl FnOnce(&mut [u8])) -> io::Result<()> {
        assert_eq!(offset % BLOCK_BYTES, 0, "unaligned journal write");
        let mut bytes = vec![0u8; len];
        fill(&mut bytes);
        let mut disk = self.disk.borrow_mut();
        match disk.faults.as_ref().and_then(|f| f.on_write()) {
            Some(FaultKind::FailWrite) => return Err(injected("write")),
            Some(FaultKind::TearWriteAndAbort) => panic!("SimStorage does not abort; use torn_image"),
            _ => {}
        }
        let padded = len.div_ceil(BLOCK_BYTES as usize) * BLOCK_BYTES as usize;
        let file = disk.files.get_mut(&self.path).ok_or_else(|| io::Error::other("file removed"))?;
        let at = offset as usize;
        if file.current.len() < at + padded {
            file.current.resize(at + padded, 0);
        }
        file.current[at..at + len].copy_from_slice(&bytes);
        file.current[at + len..at + padded].fill(0);
        Ok(())
    }

    async fn sync(&self) -> io::Result<()> {
        while self.disk.borrow().hold_syncs {
            glommio::timer::sleep(std::time::Duration::from_millis(1)).await;
        }
        let mut disk = self.disk.borrow_mut();
        if disk.faults.as_ref().is_some_and(|f| f.on_sync()) {
            return Err(injected("fdatasync"));
        }
        let file = disk.files.get_mut(&self.path).ok_or_else(|| io::Error::other("file removed"))?;
        file.durable.clone_from(&file.current);
        Ok(())
    }

    async fn read_at(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let disk = self.disk.borrow();
        let file = disk.files.get(&self.path).ok_or_else(|| io::Error::other("file removed"))?;
        let at = offset as usize;
        let end = (at + len).min(file.current.len());
        Ok(file.current.get(at..end).map_or_else(Vec::new, <[u8]>::to_vec))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_specs_parse() {
        assert_eq!(Faults::parse("fdatasync:3").map(|f| (f.kind, f.at)), Some((FaultKind::FailSync, 3)));
        assert_eq!(Faults::parse("write:1").map(|f| f.kind), Some(FaultKind::FailWrite));
        assert_eq!(Faults::parse("torn:2").map(|f| f.kind), Some(FaultKind::TearWriteAndAbort));
        assert!(Faults::parse("write:0").is_none());
        assert!(Faults::parse("read:1").is_none());
        assert!(Faults::parse("nonsense").is_none());
        assert_eq!(torn_prefix(4096), 0);
        assert_eq!(torn_prefix(3 * 4096), 4096);
    }
}
