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
    let text = std::fs::read_to_string(&meta)
        .map_err(|e| anyhow::anyhow!("{} is not an esh3ar data dir ({}: {e})", data_dir.display(), meta.display()))?;
    let shards = read_meta_shards(&text).ok_or_else(|| anyhow::anyhow!("{} is damaged", meta.display()))?;
    let mut report = VerifyReport { shards, ..Default::default() };
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

/// Prints every message still in the journal as one JSON line:
/// `{"id","to","client","priority","status","accepted_at","body"}`, in
/// journal order per shard. Read-only, like `verify`.
pub fn dump(data_dir: &Path, out: &mut impl std::io::Write) -> anyhow::Result<u64> {
    use esh3ar_shards::id::TrackingId;
    use esh3ar_shards::record::Record;
    use esh3ar_shards::recovery::{list_segments, segment_path};

    let meta = data_dir.join("engine.meta");
    let text = std::fs::read_to_string(&meta).map_err(|e| anyhow::anyhow!("{}: {e}", meta.display()))?;
    let shards = read_meta_shards(&text).ok_or_else(|| anyhow::anyhow!("{} is damaged", meta.display()))?;
    let mut count = 0;
    for id in 0..shards {
        let dir = shard_dir(data_dir, id);
        let recovered = recover_shard(&dir, id as u16, Mode::ReadOnly)?;
        for no in list_segments(&dir)? {
            let path = segment_path(&dir, no);
            let data = std::fs::read(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            let mut result = Ok(());
            esh3ar_shards::scan::scan(&data, |_, record| {
                let Record::Accepted(a) = record else { return };
                let Some(meta) = recovered.index.get(a.seq) else { return };
                if result.is_err() {
                    return;
                }
                let line = serde_json::json!({
                    "id": TrackingId { shard: id as u16, seq: a.seq }.to_string_id(),
                    "to": a.to,
                    "client": a.client,
                    "priority": a.priority.as_str(),
                    "status": meta.status.as_str(),
                    "accepted_at": a.accepted_at_ms,
                    "body": String::from_utf8_lossy(a.body),
                });
                result = writeln!(out, "{line}");
                count += 1;
            });
            result?;
        }
    }
    Ok(count)
}
