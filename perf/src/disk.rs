//! The disk's fdatasync latency: every durable system in the comparison
//! waits for it, so it bounds acceptance latency from below and explains
//! most differences between machines. Measured like a journal sees it:
//! a 4 KiB write at a new offset of a pre-allocated file, then fdatasync.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

use anyhow::Context as _;

use crate::stats::{histogram, record_ns, Latency};

/// Bytes written before each fdatasync.
const WRITE_BYTES: usize = 4096;

/// Writes and fdatasyncs `count` times in a temp file under `dir`.
pub fn fdatasync_latency(dir: &Path, count: usize) -> anyhow::Result<Latency> {
    let file =
        tempfile::NamedTempFile::new_in(dir).with_context(|| format!("cannot create a file in {}", dir.display()))?;
    let f = OpenOptions::new().write(true).open(file.path())?;
    f.set_len((count * WRITE_BYTES) as u64)?;
    f.sync_all()?;
    let block = vec![0xA5u8; WRITE_BYTES];
    let mut h = histogram();
    for i in 0..count {
        let t = Instant::now();
        f.write_all_at(&block, (i * WRITE_BYTES) as u64)?;
        f.sync_data().context("fdatasync failed")?;
        record_ns(&mut h, t.elapsed().as_nanos() as u64);
    }
    Ok(Latency::from_histogram(&h))
}

#[cfg(test)]
mod tests {
    #[test]
    fn measures_something() {
        let dir = tempfile::tempdir().unwrap();
        let l = super::fdatasync_latency(dir.path(), 5).unwrap();
        assert_eq!(l.count, 5);
        assert!(l.max_ms > 0.0);
    }
}
