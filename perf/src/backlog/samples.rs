//! What the backlog costs the engine as it grows: its resident memory
//! (VmRSS) and its data dir's size on disk, sampled against the number of
//! messages accepted; written to the JSON report and to a CSV.

use std::io::Write as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

/// One point of the series.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Sample {
    /// Seconds since the fill started.
    pub t_s: f64,
    /// Messages answered so far (accepted or not).
    pub answered: u64,
    /// Messages accepted so far: the backlog's size.
    pub accepted: u64,
    /// The engine's VmRSS (0 if it could not be read).
    pub rss_bytes: u64,
    /// Bytes allocated on disk under the data dir (`st_blocks` × 512).
    pub disk_bytes: u64,
    /// The files' apparent size (`st_size`) under the data dir.
    pub disk_apparent_bytes: u64,
}

/// Disk use of every file under `dir`: (allocated, apparent) bytes. Files
/// that vanish during the walk (a segment recycled) are skipped.
pub fn disk_use(dir: &Path) -> (u64, u64) {
    let (mut allocated, mut apparent) = (0, 0);
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                pending.push(entry.path());
            } else if meta.is_file() {
                allocated += meta.blocks() * 512;
                apparent += meta.len();
            }
        }
    }
    (allocated, apparent)
}

/// A sample of the engine `pid` with data dir `data` now.
pub fn take(pid: u32, data: &Path, t_s: f64, answered: u64, accepted: u64) -> Sample {
    let (disk_bytes, disk_apparent_bytes) = disk_use(data);
    let rss_bytes = crate::engine::rss_bytes(pid).unwrap_or(0);
    Sample { t_s, answered, accepted, rss_bytes, disk_bytes, disk_apparent_bytes }
}

/// Writes the series as CSV (one header line, one line per sample).
pub fn write_csv(samples: &[Sample], path: &Path) -> anyhow::Result<()> {
    let mut out = Vec::with_capacity(64 * (samples.len() + 1));
    writeln!(out, "t_s,answered,accepted,rss_bytes,disk_bytes,disk_apparent_bytes")?;
    for s in samples {
        writeln!(
            out,
            "{:.3},{},{},{},{},{}",
            s.t_s, s.answered, s.accepted, s.rss_bytes, s.disk_bytes, s.disk_apparent_bytes
        )?;
    }
    std::fs::write(path, out).with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_use_sums_files_in_subdirectories() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("shard-0")).unwrap();
        std::fs::write(dir.path().join("a"), vec![1u8; 1000]).unwrap();
        std::fs::write(dir.path().join("shard-0/b"), vec![1u8; 5000]).unwrap();
        let (allocated, apparent) = disk_use(dir.path());
        assert_eq!(apparent, 6000);
        assert!(allocated >= 4096, "{allocated}");
        assert_eq!(disk_use(&dir.path().join("absent")), (0, 0));
    }

    #[test]
    fn csv_has_a_header_and_a_line_per_sample() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.csv");
        let s = Sample { t_s: 1.5, answered: 10, accepted: 8, rss_bytes: 3, disk_bytes: 4, disk_apparent_bytes: 5 };
        write_csv(&[s.clone(), s], &path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 3);
        assert_eq!(text.lines().nth(1), Some("1.500,10,8,3,4,5"));
    }
}
