//! The `replay` scenario (issue #9, "journal replay at start (1 GiB of
//! journal) ≥ 500 MB/s, reported"): how fast a restarted engine reads its
//! journal back, end to end, as an operator sees it.
//!
//! One invocation, against an engine it starts itself:
//!
//! 1. fill: about `--journal-bytes` of journal (default 1 GiB): messages
//!    of `--body-bytes` (default 200) to `--receivers` offline users
//!    (default 10,000), through the batch endpoint, with the backlog's
//!    fill ([`crate::backlog::fill`]). The engine runs with
//!    `backlog.spill_after_ms = 0`, so every message stays pending in
//!    memory and no segment is deleted: the whole journal is replayed.
//! 2. `--restarts` times (default 3): `kill -9`, start again on the same
//!    data dir, and read how long the replay took from the engine's own
//!    `journal recovered` log line (one per shard: `bytes`, `replay_ms`,
//!    `mb_per_s`), and the time from the spawn to the first `200` of
//!    `/readyz`. An engine whose line has no `bytes=`/`replay_ms=` (one
//!    built before they were logged) is measured with its `elapsed_ms` and
//!    the journal's size on disk.
//!
//! The journal was just written, so its pages are in the page cache: this
//! is the CPU side of a replay (a cold start adds the disk's read rate).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};

use crate::backlog::fill;
use crate::cli::{RunArgs, System};
use crate::engine::{self, cpu_list_string, Spawned, Target};
use crate::report::{Machine, Report};
use crate::scenario::Scenario;
use crate::stats::Latency;

/// Journal to fill unless `--journal-bytes` says (the 1 GiB).
pub const DEFAULT_JOURNAL_BYTES: u64 = 1 << 30;
/// Message body unless `--body-bytes` says (as `cargo bench --bench journal_replay`).
pub const DEFAULT_BODY_BYTES: usize = 200;
/// Offline users unless `--receivers` says (as the criterion bench).
pub const DEFAULT_USERS: usize = 10_000;
/// `memory_limit_bytes` unless `--memory-limit-bytes` says: every message
/// of the journal stays pending in memory (about 300 bytes each).
pub const DEFAULT_MEMORY_LIMIT: u64 = 8 << 30;
/// Journal bytes of one accepted message beyond its body (record framing,
/// client and user ids, the commit headers' share), to turn
/// `--journal-bytes` into a number of messages.
const RECORD_OVERHEAD_BYTES: u64 = 60;
/// How long a restarted engine may stay silent while it replays.
const READY_TIMEOUT: Duration = Duration::from_secs(600);

/// One restart: what the engine logged and what the harness timed.
#[derive(Debug, Clone, Default)]
struct Restart {
    /// Spawn → first `200` of `/readyz`.
    readyz_s: f64,
    /// The engine's VmRSS right after `/readyz` (0 if unread).
    rss_bytes: u64,
    /// The slowest shard's replay (shards replay in parallel).
    replay_s: f64,
    /// Journal bytes replayed, all shards.
    bytes: u64,
    /// Records replayed, all shards.
    records: u64,
    /// Messages in the rebuilt indexes, all shards.
    messages: u64,
    /// Whether the figures are the engine's own (`replay_ms`, `bytes`)
    /// rather than `elapsed_ms` and the size on disk.
    engine_figures: bool,
}

impl Restart {
    fn mb_per_s(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.replay_s.max(1e-9)
    }
}

/// Runs the scenario (see the module doc); saves the report to `--out`.
pub fn run(args: &RunArgs) -> anyhow::Result<Report> {
    if args.system != System::Esh3ar || args.addr.is_some() {
        bail!("the replay scenario starts its own esh3ar (it kills and restarts it): drop --addr and --system");
    }
    let journal_bytes = args.journal_bytes.unwrap_or(DEFAULT_JOURNAL_BYTES);
    let body_bytes = args.body_bytes.unwrap_or(DEFAULT_BODY_BYTES).max(crate::payload::STAMP_BYTES);
    let users = args.receivers.unwrap_or(DEFAULT_USERS);
    let restarts = args.restarts.max(1);
    if users == 0 || journal_bytes == 0 || args.batch_size == 0 || args.batch_size > 1000 {
        bail!("replay needs --receivers > 0, --journal-bytes > 0 and --batch 1 to 1000");
    }
    let connections = args.connections.unwrap_or(crate::backlog::DEFAULT_CONNECTIONS).max(1);
    crate::net::raise_open_files(connections)?;
    let bin = args.engine_bin.clone().unwrap_or_else(engine::default_engine_bin);
    let memory_limit = crate::cli::memory_limit(args);
    let dir = match args.data_dir.as_deref() {
        Some(p) => tempfile::Builder::new().prefix("esh3ar-perf-").tempdir_in(p),
        None => tempfile::Builder::new().prefix("esh3ar-perf-").tempdir(),
    }
    .context("cannot create a data dir")?;
    let config = write_config(dir.path(), args.server_threads.unwrap_or(1), memory_limit)?;
    let data = dir.path().join("data");
    let (mut engine, target) = engine::start_engine(&bin, &config, engine::START_TIMEOUT)?;
    let server_cpus = engine::thread_cpus(engine.pid(), "shard");
    let cpus = crate::cli::generator_cpus(&args.cpus, &server_cpus, args.threads)?;
    let Target::Esh3ar { business, api_key, .. } = &target else { bail!("not an esh3ar target") };
    let messages = journal_bytes.div_ceil(body_bytes as u64 + RECORD_OVERHEAD_BYTES);
    let plan = fill::FillPlan {
        business: *business,
        api_key: api_key.clone(),
        messages,
        users,
        batch_size: args.batch_size,
        connections,
        body_bytes,
        threads: args.threads,
        cpus: cpus.clone(),
    };
    eprintln!("replay: filling about {journal_bytes} bytes of journal ({messages} messages of {body_bytes} bytes)");
    let filled = fill::run(&plan, engine.pid(), &data)?;
    let on_disk = journal_bytes_on_disk(&data)?;
    let mut runs = Vec::new();
    for i in 0..restarts {
        let log = dir.path().join(format!("restart-{i}.log"));
        let run = restart(&mut engine, &bin, &config, &log, on_disk)?;
        eprintln!(
            "replay: restart {}: {} bytes replayed in {:.3} s ({:.0} MB/s), /readyz 200 after {:.3} s, RSS {} MB",
            i + 1,
            run.bytes,
            run.replay_s,
            run.mb_per_s(),
            run.readyz_s,
            run.rss_bytes / 1_000_000
        );
        runs.push(run);
    }
    engine.stop();
    drop(engine);
    let report = build_report(args, &filled, on_disk, &runs, (connections, &cpus, &server_cpus));
    if let Some(out) = &args.out {
        report.save(out)?;
    }
    Ok(report)
}

/// The harness's engine config, with the offline backlog's spill off: every
/// message stays in the journal and in memory, so segments stay.
fn write_config(dir: &Path, shards: usize, memory_limit: u64) -> anyhow::Result<PathBuf> {
    let config = engine::write_engine_config(dir, shards, memory_limit, None, None)?;
    let mut text = std::fs::read_to_string(&config)?;
    text.push_str("\n[backlog]\nspill_after_ms = 0\n");
    std::fs::write(&config, text).with_context(|| format!("cannot write {}", config.display()))?;
    Ok(config)
}

/// `kill -9`, start again with the `journal recovered` lines logged to
/// `log`, wait for `/readyz`, and read the replay figures.
fn restart(engine: &mut Spawned, bin: &Path, config: &Path, log: &Path, on_disk: u64) -> anyhow::Result<Restart> {
    engine.kill_hard();
    let dir = engine.dir.take();
    let mut cmd = engine::engine_command(bin, config);
    let file = std::fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    cmd.env("ESH3AR_LOG", "warn,esh3ar::server=info").env("NO_COLOR", "1").stderr(Stdio::from(file));
    let spawned_at = Instant::now();
    let (mut next, _) = engine::start_engine_with(cmd, READY_TIMEOUT)
        .with_context(|| format!("cannot restart the engine {} (its log: {})", bin.display(), log.display()))?;
    next.dir = dir;
    let admin = next.admin_addr().context("no admin listener in the restarted engine's output")?;
    engine::wait_ready(admin, spawned_at, READY_TIMEOUT)?;
    let readyz_s = spawned_at.elapsed().as_secs_f64();
    *engine = next;
    let text = std::fs::read_to_string(log).with_context(|| format!("cannot read {}", log.display()))?;
    let mut run = parse_recovered(&text, on_disk)
        .with_context(|| format!("no `journal recovered` line in the engine's log {}", log.display()))?;
    run.readyz_s = readyz_s;
    run.rss_bytes = engine::rss_bytes(engine.pid()).unwrap_or(0);
    Ok(run)
}

/// Sums the `journal recovered` lines of a log (one per shard). Without
/// `bytes=` and `replay_ms=` (an older engine), the replay time is its
/// `elapsed_ms` and the bytes are `on_disk`.
fn parse_recovered(log: &str, on_disk: u64) -> Option<Restart> {
    let mut run = Restart { engine_figures: true, ..Restart::default() };
    let mut shards = 0;
    for line in log.lines().map(strip_ansi).filter(|l| l.contains("journal recovered")) {
        let fields: BTreeMap<&str, u64> = line
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .filter_map(|(k, v)| Some((k, v.parse().ok()?)))
            .collect();
        let ms = fields.get("replay_ms").or(fields.get("elapsed_ms")).copied()?;
        run.replay_s = run.replay_s.max(ms as f64 / 1e3);
        run.records += fields.get("records").copied().unwrap_or(0);
        run.messages += fields.get("messages").copied().unwrap_or(0);
        match (fields.get("bytes"), fields.contains_key("replay_ms")) {
            (Some(&b), true) => run.bytes += b,
            _ => run.engine_figures = false,
        }
        shards += 1;
    }
    if shards == 0 {
        return None;
    }
    if !run.engine_figures {
        run.bytes = on_disk;
    }
    Some(run)
}

/// `line` without ANSI colour sequences (`ESC [ … m`).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Bytes of journal written under `data`: each segment up to its last
/// non-zero byte (segments are allocated ahead and zero past what was
/// written). Counts the harness's way, for engines that do not log it.
fn journal_bytes_on_disk(data: &Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for shard in std::fs::read_dir(data).with_context(|| format!("cannot list {}", data.display()))? {
        let shard = shard?.path();
        if !shard.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("shard-")) {
            continue;
        }
        for seg in std::fs::read_dir(&shard)? {
            let seg = seg?.path();
            let name = seg.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if name.starts_with("seg-") && name.ends_with(".log") {
                total += written_bytes(&seg)?;
            }
        }
    }
    Ok(total)
}

/// Offset just past the last non-zero byte of a file, read from its end.
fn written_bytes(path: &Path) -> anyhow::Result<u64> {
    use std::os::unix::fs::FileExt as _;
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut end = file.metadata()?.len();
    let mut buf = vec![0u8; 1 << 20];
    while end > 0 {
        let from = end.saturating_sub(buf.len() as u64);
        let chunk = &mut buf[..(end - from) as usize];
        file.read_exact_at(chunk, from)?;
        if let Some(p) = chunk.iter().rposition(|&b| b != 0) {
            return Ok(from + p as u64 + 1);
        }
        end = from;
    }
    Ok(0)
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs.get(xs.len() / 2).copied().unwrap_or(0.0)
}

fn build_report(
    args: &RunArgs,
    filled: &fill::Filled,
    on_disk: u64,
    runs: &[Restart],
    (connections, cpus, server_cpus): (usize, &[usize], &[usize]),
) -> Report {
    let mut extra: BTreeMap<String, f64> = [
        ("accepted", filled.accepted as f64),
        ("not_accepted", filled.not_accepted() as f64),
        ("fill_s", filled.fill_s),
        ("journal_bytes_on_disk", on_disk as f64),
        ("replay_bytes", runs.last().map_or(0.0, |r| r.bytes as f64)),
        ("replay_records", runs.last().map_or(0.0, |r| r.records as f64)),
        ("replay_messages", runs.last().map_or(0.0, |r| r.messages as f64)),
        ("replay_s_median", median(runs.iter().map(|r| r.replay_s).collect())),
        ("replay_mb_per_s_median", median(runs.iter().map(Restart::mb_per_s).collect())),
        ("restart_seconds_median", median(runs.iter().map(|r| r.readyz_s).collect())),
        ("rss_bytes_after_restart_median", median(runs.iter().map(|r| r.rss_bytes as f64).collect())),
        ("replay_figures_from_engine", f64::from(u8::from(runs.iter().all(|r| r.engine_figures)))),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    for (i, r) in runs.iter().enumerate() {
        extra.insert(format!("replay_mb_per_s_{}", i + 1), r.mb_per_s());
        extra.insert(format!("restart_seconds_{}", i + 1), r.readyz_s);
    }
    let mut errors = BTreeMap::new();
    for (k, v) in filled.answers.iter().filter(|(k, _)| *k != "202") {
        errors.insert(format!("fill {k}"), *v);
    }
    Report {
        system: "esh3ar".into(),
        scenario: Scenario::Replay.name().into(),
        model: "closed".into(),
        label: args.label.clone().unwrap_or_default(),
        connections,
        receivers: args.receivers.unwrap_or(DEFAULT_USERS),
        duration_s: filled.fill_s,
        generator_threads: if cpus.is_empty() { args.threads } else { cpus.len() },
        generator_cpus: cpu_list_string(cpus),
        server_cpus: cpu_list_string(server_cpus),
        throughput_per_s: filled.accepted as f64 / filled.fill_s.max(1e-9),
        requests_per_s: filled.requests as f64 / filled.fill_s.max(1e-9),
        accepted: filled.accepted,
        requests: filled.requests,
        acceptance: Latency::from_histogram(&filled.acceptance),
        errors,
        extra,
        machine: Machine::probe(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        unix_time_s: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        ..Report::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_engines_figures_and_sums_the_shards() {
        let log = "2026-12-01T05:00:00Z  INFO journal recovered shard=0 segments=3 records=10 messages=8 \
                   unsettled=8 bytes=1000000 replay_ms=2 mb_per_s=500 elapsed_ms=3\n\
                   2026-12-01T05:00:00Z  INFO \u{1b}[3mjournal recovered\u{1b}[0m shard=1 records=5 messages=4 \
                   bytes=\u{1b}[2m3000000\u{1b}[0m replay_ms=4 elapsed_ms=5\n";
        let r = parse_recovered(log, 77).unwrap();
        assert!(r.engine_figures);
        assert_eq!((r.bytes, r.records, r.messages), (4_000_000, 15, 12));
        assert_eq!(r.replay_s, 0.004, "the slowest shard: they replay in parallel");
        assert_eq!(r.mb_per_s().round(), 1000.0);
    }

    #[test]
    fn an_older_engine_is_timed_by_elapsed_ms_and_the_size_on_disk() {
        let log = "INFO journal recovered shard=0 segments=3 records=10 messages=8 unsettled=8 elapsed_ms=250\n";
        let r = parse_recovered(log, 100_000_000).unwrap();
        assert!(!r.engine_figures);
        assert_eq!((r.bytes, r.replay_s), (100_000_000, 0.25));
        assert!(parse_recovered("INFO esh3ar ready\n", 1).is_none());
    }
}
