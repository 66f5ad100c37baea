//! `esh3ar journal verify`: checks a data directory offline, read-only.

use std::path::Path;

use esh3ar_shards::recovery::{recover_shard, repair_shard, Mode};

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
                let state = match (&r.torn, &r.clean_shutdown) {
                    (None, Some(_)) => "clean (stopped cleanly)".to_owned(),
                    (None, None) => "clean (stopped by a crash or still running)".to_owned(),
                    (Some(t), _) => {
                        report.torn_tails += 1;
                        format!(
                            "torn last commit at {}:{} ({}; {} bytes holding {} unacknowledged records, moved to a \
                             quarantine file and cut on next start)",
                            t.path.display(),
                            t.offset,
                            t.reason,
                            t.damaged_bytes,
                            t.records_inside
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

/// `esh3ar journal repair --accept-loss`: moves every damaged range of
/// every shard to a quarantine file beside its segment and replaces it
/// with a hole (intact commits after it are kept), printing one line per
/// range. Returns how many ranges were repaired.
pub fn repair(data_dir: &Path) -> anyhow::Result<usize> {
    let shards = meta_shards(data_dir)?;
    let mut total = 0;
    for id in 0..shards {
        let dir = shard_dir(data_dir, id);
        let repaired = repair_shard(&dir, id as u16).map_err(|e| anyhow::anyhow!("shard {id}: {e}"))?;
        for r in &repaired {
            println!(
                "shard {id}: {}: bytes {}..{} ({}): about {} records lost{}",
                r.path.display(),
                r.from,
                r.to,
                r.reason,
                r.records_inside,
                r.quarantine.as_ref().map(|q| format!(", bytes kept in {}", q.display())).unwrap_or_default()
            );
        }
        if repaired.is_empty() {
            println!("shard {id}: nothing to repair");
        }
        total += repaired.len();
    }
    Ok(total)
}

fn meta_shards(data_dir: &Path) -> anyhow::Result<usize> {
    let meta = data_dir.join("engine.meta");
    let text = std::fs::read_to_string(&meta)
        .map_err(|e| anyhow::anyhow!("{} is not an esh3ar data dir ({}: {e})", data_dir.display(), meta.display()))?;
    read_meta_shards(&text).ok_or_else(|| anyhow::anyhow!("{} is damaged", meta.display()))
}

/// Prints every message still in the journal, then those in the offline
/// backlog's cold store (when no engine runs), as one JSON line each:
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
                let (Record::Accepted(a) | Record::Restored(a)) = record else { return };
                // The record the index keeps (a restored message was written twice).
                let Some(meta) = recovered.index.get(a.seq).filter(|m| m.segment == no) else { return };
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
        count += dump_cold(&dir, id, out)?;
    }
    Ok(count)
}

/// The messages of the offline backlog's cold store (docs/ARCHITECTURE.md,
/// "Offline backlog"), as `dump` lines with status `accepted`. Only when no
/// engine runs on the data dir: the store is not shared between processes.
fn dump_cold(dir: &Path, id: usize, out: &mut impl std::io::Write) -> anyhow::Result<u64> {
    use esh3ar_shards::id::TrackingId;
    let cold = dir.join("cold");
    if !cold.exists() {
        return Ok(0);
    }
    if esh3ar_shards::recovery::writer_running(dir)? {
        eprintln!(
            "shard {id}: an engine is running on this data dir: messages in its cold store (the offline backlog) are \
             not listed; stop it to list them"
        );
        return Ok(0);
    }
    let store = esh3ar_shards::cold::ColdStore::open(&cold, Default::default())?;
    let mut count = 0;
    for m in store.all() {
        let m = m?;
        let a = m.accepted()?;
        let line = serde_json::json!({
            "id": TrackingId { shard: id as u16, seq: a.seq }.to_string_id(),
            "to": a.to,
            "client": a.client,
            "priority": a.priority.as_str(),
            "status": "accepted",
            "accepted_at": a.accepted_at_ms,
            "body": String::from_utf8_lossy(a.body),
        });
        writeln!(out, "{line}")?;
        count += 1;
    }
    Ok(count)
}
