//! `esh3ar journal verify`: checks a data directory offline, read-only.

use std::path::Path;

use esh3ar_shards::recovery::{recover_shard, Mode};

use crate::server::{read_meta_shards, shard_dir};

/// What the verification found.
#[derive(Debug, Default)]
pub struct VerifyReport {
    pub shards: usize,
    pub records: u64,
    pub messages: u64,
    pub unsettled: u64,
    pub torn_tails: usize,
    pub corrupt: Vec<String>,
}

/// Verifies every shard's journal under `data_dir`, printing one line per
/// shard. Never changes a file.
pub fn verify(data_dir: &Path) -> anyhow::Result<VerifyReport> {
    let meta = data_dir.join("engine.meta");
    let text = std::fs::read_to_string(&meta).map_err(|e| {
        anyhow::anyhow!(
            "{} is not an esh3ar data dir ({}: {e})",
            data_dir.display(),
            meta.display()
        )
    })?;
    let shards =
        read_meta_shards(&text).ok_or_else(|| anyhow::anyhow!("{} is damaged", meta.display()))?;
    let mut report = VerifyReport {
        shards,
        ..Default::default()
    };
    for id in 0..shards {
        let dir = shard_dir(data_dir, id);
        match recover_shard(&dir, id as u16, Mode::ReadOnly) {
            Ok(r) => {
                report.records += r.records;
                report.messages += r.index.len() as u64;
                report.unsettled += r.index.unsettled();
                let state = match &r.torn {
                    None => "clean".to_owned(),
                    Some(t) => {
                        report.torn_tails += 1;
                        format!(
                            "torn tail at {}:{} ({}; {} bytes, cut on next start)",
                            t.path.display(),
                            t.offset,
                            t.reason,
                            t.damaged_bytes
                        )
                    }
                };
                println!(
                    "shard {id}: {} segments, {} records, {} messages ({} unsettled), next seq {}: {state}",
                    r.segments.len(),
                    r.records,
                    r.index.len(),
                    r.index.unsettled(),
                    r.next_seq
                );
            }
            Err(e) => {
                println!("shard {id}: CORRUPT: {e}");
                report.corrupt.push(e.to_string());
            }
        }
    }
    Ok(report)
}
