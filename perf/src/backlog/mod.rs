//! The `backlog` scenario (issue #14, "Offline backlog bounded by disk,
//! not memory"): how the engine holds a large backlog for users who are
//! offline, across a crash, and how fast it hands it over.
//!
//! One invocation, against an engine it starts itself:
//!
//! 1. fill ([`fill`]): `--messages` small messages spread over
//!    `--receivers` users who are offline (message `i` to `u{i % users}`),
//!    sent through `POST /v1/messages/batch` (`--batch` per request) by
//!    `--connections` closed-loop lanes, as fast as the engine answers.
//!    Every message's answer is counted (`202`, a batch item's error code
//!    as `item:overloaded`, or the request's status or transport failure,
//!    `503`, `io`, `timeout`); a refused message is not retried. The
//!    engine's RSS and its data dir's disk use are sampled at every 1% of
//!    the messages answered and every second ([`samples`]).
//! 2. restart: `kill -9`, then the engine starts again on the same data
//!    dir; `restart_seconds` runs from the spawn to the first `200` of
//!    `/readyz` (every shard recovered its journal and listens), and the
//!    RSS is read right after.
//! 3. drain: users `u0`.. (`--drain-users`) connect over the mobile
//!    WebSocket and ack what they get (offline-drain's receivers); the
//!    drain waits for every message accepted for them, up to
//!    `--drain-timeout`. Delivery latency is measured as offline-drain
//!    measures it: from the moment the receivers start connecting to each
//!    message's receipt. Every message accepted for those users is checked
//!    by key: `missing` (accepted, never delivered), `duplicates`,
//!    `unexpected` (delivered though never answered `202`).

pub mod fill;
pub mod plot;
pub mod samples;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use serde::{Deserialize, Serialize};

use crate::cli::{RunArgs, System};
use crate::engine::{self, cpu_list_string, Spawned, Target};
use crate::report::{Machine, Report};
use crate::scenario::{self, Model, Plan, Scenario};
use crate::stats::Latency;
use samples::Sample;

/// Offline users the messages are spread over, unless `--receivers` says.
pub const DEFAULT_USERS: usize = 100_000;
/// Users who connect and drain after the restart, unless `--drain-users`.
pub const DEFAULT_DRAIN_USERS: usize = 10_000;
/// `memory_limit_bytes` unless `--memory-limit-bytes` says (the issue's).
pub const DEFAULT_MEMORY_LIMIT: u64 = 1 << 30;
/// Sender connections of the fill unless `--connections` says.
pub const DEFAULT_CONNECTIONS: usize = 16;
/// How long a restarted engine has to replay its journal and answer `200`
/// on `/readyz` (20 million messages replay in about a minute today).
const READY_TIMEOUT: Duration = Duration::from_secs(600);

/// What a backlog run saw beyond the common report.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Profile {
    pub messages: u64,
    pub users: usize,
    pub drain_users: usize,
    pub batch_size: usize,
    pub memory_limit_bytes: u64,
    /// Answers per message over the fill: `202`, `item:<code>`, an HTTP
    /// status, or a transport failure (see [`fill::Filled::answers`]).
    pub answers: BTreeMap<String, u64>,
    /// RSS and disk against the backlog's size, over the fill.
    pub samples: Vec<Sample>,
}

impl Profile {
    /// Answers other than `202`, per message, by cause.
    pub fn non_202(&self) -> BTreeMap<String, u64> {
        self.answers.iter().filter(|(k, _)| *k != "202").map(|(k, v)| (k.clone(), *v)).collect()
    }

    /// Lines for the human report.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let by: Vec<String> = self.answers.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let _ = writeln!(
            s,
            "  backlog: {} messages to {} users, batches of {}, memory_limit_bytes {}; answers per message: {}",
            self.messages,
            self.users,
            self.batch_size,
            self.memory_limit_bytes,
            by.join(" ")
        );
        let _ = writeln!(s, "  {:>10} {:>12} {:>12} {:>12}", "accepted", "RSS MiB", "disk MiB", "apparent MiB");
        let step = (self.samples.len() / 10).max(1);
        let last = self.samples.len().saturating_sub(1);
        for (_, p) in self.samples.iter().enumerate().filter(|(i, _)| i % step == 0 || *i == last) {
            let _ = writeln!(
                s,
                "  {:>10} {:>12.1} {:>12.1} {:>12.1}",
                p.accepted,
                mib(p.rss_bytes),
                mib(p.disk_bytes),
                mib(p.disk_apparent_bytes)
            );
        }
        s
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1048576.0
}

/// What was asked, with the defaults applied.
struct Setup {
    messages: u64,
    users: usize,
    drain_users: usize,
    connections: usize,
    memory_limit_bytes: u64,
    body_bytes: usize,
}

impl Setup {
    fn from_args(args: &RunArgs) -> anyhow::Result<Setup> {
        if args.system != System::Esh3ar || args.addr.is_some() {
            bail!("the backlog scenario starts its own esh3ar (it kills and restarts it): drop --addr and --system");
        }
        let users = args.receivers.unwrap_or(DEFAULT_USERS);
        let drain_users = args.drain_users.unwrap_or(DEFAULT_DRAIN_USERS).min(users);
        if users == 0 || drain_users == 0 || args.messages == 0 || args.batch_size == 0 || args.batch_size > 1000 {
            bail!(
                "backlog needs --receivers > 0, --drain-users > 0, --messages > 0 and --batch 1 to 1000 \
                 (the batch endpoint's limit)"
            );
        }
        Ok(Setup {
            messages: args.messages,
            users,
            drain_users,
            connections: args.connections.unwrap_or(DEFAULT_CONNECTIONS).max(1),
            memory_limit_bytes: crate::cli::memory_limit(args),
            body_bytes: args.body_bytes.unwrap_or(64).max(crate::payload::STAMP_BYTES),
        })
    }

    fn fill_plan(&self, target: &Target, args: &RunArgs, cpus: &[usize]) -> anyhow::Result<fill::FillPlan> {
        let Target::Esh3ar { business, api_key, .. } = target else { bail!("not an esh3ar target") };
        Ok(fill::FillPlan {
            business: *business,
            api_key: api_key.clone(),
            messages: self.messages,
            users: self.users,
            batch_size: args.batch_size,
            connections: self.connections,
            body_bytes: self.body_bytes,
            threads: args.threads,
            cpus: cpus.to_vec(),
        })
    }
}

/// What the restart measured.
struct Restarted {
    engine: Spawned,
    target: Target,
    ready_line_s: f64,
    readyz_s: f64,
    rss_bytes: u64,
}

/// Runs the scenario (see the module doc); saves the report to `--out`,
/// and the samples beside it (`.csv`, `.png`).
pub fn run(args: &RunArgs) -> anyhow::Result<Report> {
    let setup = Setup::from_args(args)?;
    crate::net::raise_open_files(setup.connections + setup.drain_users)?;
    let bin = args.engine_bin.clone().unwrap_or_else(engine::default_engine_bin);
    let shards = args.server_threads.unwrap_or(1);
    let (mut first, target) =
        engine::spawn_engine(&bin, shards, args.data_dir.as_deref(), setup.memory_limit_bytes, None, None)?;
    let (config, data) = (first.config_path(), first.data_path());
    let (config, data) = config.zip(data).context("the started engine has no private dir")?;
    let server_cpus = engine::thread_cpus(first.pid(), "shard");
    let cpus = crate::cli::generator_cpus(&args.cpus, &server_cpus, args.threads)?;
    let plan = setup.fill_plan(&target, args, &cpus)?;
    eprintln!(
        "backlog: filling {} messages to {} offline users (batches of {}, {} connections, memory_limit_bytes {})",
        setup.messages, setup.users, args.batch_size, setup.connections, setup.memory_limit_bytes
    );
    let filled = fill::run(&plan, first.pid(), &data)?;
    eprintln!("backlog: kill -9 and restart on the same data dir");
    let mut restarted = restart(&mut first, &bin, &config)?;
    drop(first);
    eprintln!(
        "backlog: ready after {:.2} s, RSS {:.1} MiB; {} users drain",
        restarted.readyz_s,
        mib(restarted.rss_bytes),
        setup.drain_users
    );
    let owed = owed_keys(&filled, setup.users, setup.drain_users);
    let drained = drain(args, &setup, &cpus, &restarted, owed.len() as u64);
    restarted.engine.stop();
    let measured = Measured { filled, restarted, owed, cpus, server_cpus };
    let report = build_report(args, &setup, &measured, drained?);
    save(args.out.as_deref(), &report)?;
    Ok(report)
}

/// What the fill and the restart measured, for the report.
struct Measured {
    filled: fill::Filled,
    restarted: Restarted,
    /// Keys owed to the users who drain, sorted.
    owed: Vec<u64>,
    cpus: Vec<usize>,
    server_cpus: Vec<usize>,
}

/// `kill -9` and start again on `config`: the new engine, and how long it
/// took to print its ready line and to answer `200` on `/readyz`.
fn restart(old: &mut Spawned, bin: &Path, config: &Path) -> anyhow::Result<Restarted> {
    old.kill_hard();
    let dir = old.dir.take();
    let spawned_at = Instant::now();
    let (mut engine, mut target) = engine::start_engine(bin, config, READY_TIMEOUT)?;
    engine.dir = dir;
    let ready_line_s = spawned_at.elapsed().as_secs_f64();
    let admin = engine.admin_addr().context("no admin listener in the restarted engine's output")?;
    engine::wait_ready(admin, spawned_at, READY_TIMEOUT)?;
    let readyz_s = spawned_at.elapsed().as_secs_f64();
    let rss_bytes = engine::rss_bytes(engine.pid()).unwrap_or(0);
    if let Target::Esh3ar { mobile_protocol, .. } = &mut target {
        *mobile_protocol = crate::ws::MobileProtocol::Raw;
    }
    Ok(Restarted { engine, target, ready_line_s, readyz_s, rss_bytes })
}

/// Keys of the accepted messages owed to users `u0..u{drain_users}`, sorted.
fn owed_keys(filled: &fill::Filled, users: usize, drain_users: usize) -> Vec<u64> {
    let messages = filled.messages;
    let mut keys: Vec<u64> = (0..drain_users as u64)
        .flat_map(|u| (u..messages).step_by(users))
        .filter(|&i| filled.was_accepted(i))
        .map(|i| crate::payload::key(0, i))
        .collect();
    keys.sort_unstable();
    keys
}

/// The drain: offline-drain's receivers for the first `drain_users` users.
fn drain(
    args: &RunArgs,
    setup: &Setup,
    cpus: &[usize],
    restarted: &Restarted,
    owed: u64,
) -> anyhow::Result<scenario::Outcome> {
    let mut target = restarted.target.clone();
    if let Target::Esh3ar { mobile_protocol, .. } = &mut target {
        *mobile_protocol = args.mobile_protocol;
    }
    let plan = Plan {
        scenario: Scenario::Backlog,
        model: Model::Closed,
        connections: 1,
        receivers: setup.drain_users,
        users: setup.users,
        threads: args.threads,
        cpus: cpus.to_vec(),
        body_bytes: setup.body_bytes,
        messages: owed,
        source_addrs: args.source_addrs,
        drain_timeout: args.drain_timeout,
        memory_limit_bytes: setup.memory_limit_bytes,
        ..Plan::default()
    };
    scenario::run(&plan, &target, Some(restarted.engine.pid()))
}

/// (missing, missing users, duplicates, unexpected): owed keys never
/// received, users short of one, receipts beyond a key's first, and keys
/// received that were never answered `202`.
fn check_delivery(owed: &[u64], delivered: &mut Vec<u64>, users: usize) -> (u64, u64, u64, u64) {
    delivered.sort_unstable();
    let received = delivered.len();
    delivered.dedup();
    let duplicates = (received - delivered.len()) as u64;
    let missing: Vec<u64> = owed.iter().copied().filter(|k| delivered.binary_search(k).is_err()).collect();
    let mut short: Vec<u64> = missing.iter().map(|k| k % users as u64).collect();
    short.sort_unstable();
    short.dedup();
    let unexpected = delivered.iter().filter(|k| owed.binary_search(k).is_err()).count() as u64;
    (missing.len() as u64, short.len() as u64, duplicates, unexpected)
}

/// The named figures of a run (`extra` in the JSON).
fn figures(
    m: &Measured,
    stats: &crate::stats::ThreadStats,
    drain_s: f64,
    check: (u64, u64, u64),
) -> BTreeMap<String, f64> {
    let (missing, missing_users, unexpected) = check;
    let filled = &m.filled;
    let end_of_fill = filled.samples.last().cloned().unwrap_or_default();
    let delivery = Latency::from_histogram(&stats.delivery);
    [
        ("accepted", filled.accepted as f64),
        ("not_accepted", filled.not_accepted() as f64),
        ("fill_s", filled.fill_s),
        ("fill_msgs_per_s", filled.accepted as f64 / filled.fill_s.max(1e-9)),
        ("rss_bytes_end_of_fill", end_of_fill.rss_bytes as f64),
        ("disk_bytes_end_of_fill", end_of_fill.disk_bytes as f64),
        ("disk_apparent_bytes_end_of_fill", end_of_fill.disk_apparent_bytes as f64),
        ("restart_seconds", m.restarted.readyz_s),
        ("restart_ready_line_seconds", m.restarted.ready_line_s),
        ("rss_bytes_after_restart", m.restarted.rss_bytes as f64),
        ("drain_owed", m.owed.len() as f64),
        ("drain_delivered", stats.delivered as f64),
        ("drain_s", drain_s),
        ("drain_msgs_per_s", stats.delivered as f64 / drain_s.max(1e-9)),
        ("delivery_p50_ms", delivery.p50_ms),
        ("delivery_p99_ms", delivery.p99_ms),
        ("missing", missing as f64),
        ("missing_users", missing_users as f64),
        ("unexpected", unexpected as f64),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

fn build_report(args: &RunArgs, setup: &Setup, m: &Measured, drained: scenario::Outcome) -> Report {
    let mut stats = drained.stats;
    let (missing, missing_users, duplicates, unexpected) =
        check_delivery(&m.owed, &mut stats.delivered_keys, setup.users);
    let drain_s = drained.duration_s;
    let extra = figures(m, &stats, drain_s, (missing, missing_users, unexpected));
    let mut errors = stats.errors.clone();
    for (k, v) in m.filled.answers.iter().filter(|(k, _)| *k != "202") {
        *errors.entry(format!("fill {k}")).or_default() += v;
    }
    let filled = &m.filled;
    Report {
        system: "esh3ar".into(),
        scenario: Scenario::Backlog.name().into(),
        model: "closed".into(),
        label: args.label.clone().unwrap_or_default(),
        connections: setup.connections,
        receivers: setup.drain_users,
        rate_per_s: None,
        duration_s: drain_s,
        generator_threads: if m.cpus.is_empty() { args.threads } else { m.cpus.len() },
        generator_cpus: cpu_list_string(&m.cpus),
        server_cpus: cpu_list_string(&m.server_cpus),
        throughput_per_s: stats.delivered as f64 / drain_s.max(1e-9),
        requests_per_s: filled.requests as f64 / filled.fill_s.max(1e-9),
        accepted: filled.accepted,
        requests: filled.requests,
        acceptance: Latency::from_histogram(&filled.acceptance),
        delivery: Some(Latency::from_histogram(&stats.delivery)),
        errors,
        lost: missing,
        duplicates,
        extra,
        overload: None,
        backlog: Some(Profile {
            messages: setup.messages,
            users: setup.users,
            drain_users: setup.drain_users,
            batch_size: args.batch_size,
            memory_limit_bytes: setup.memory_limit_bytes,
            answers: filled.answers.clone(),
            samples: filled.samples.clone(),
        }),
        machine: Machine::probe(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        unix_time_s: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
    }
}

/// Saves the report to `out`, its samples to `out` with `.csv`, and their
/// plot to `out` with `.png` (no plot, only a note, without a font).
fn save(out: Option<&Path>, report: &Report) -> anyhow::Result<()> {
    let Some(out) = out else { return Ok(()) };
    report.save(out)?;
    let profile = report.backlog.as_ref().context("a backlog report has its profile")?;
    let csv: PathBuf = out.with_extension("csv");
    samples::write_csv(&profile.samples, &csv)?;
    let png = out.with_extension("png");
    match plot::plot(std::slice::from_ref(report), plot::TITLE, &png) {
        Ok(()) => eprintln!("backlog: wrote {}, {} and {}", out.display(), csv.display(), png.display()),
        Err(e) => eprintln!("backlog: wrote {} and {}; no plot: {e:#}", out.display(), csv.display()),
    }
    Ok(())
}

/// A markdown table of the backlog reports among `reports` (empty if none).
pub fn table(reports: &[Report]) -> String {
    let mut s = String::new();
    let backlog: Vec<(&Report, &Profile)> = reports.iter().filter_map(|r| r.backlog.as_ref().map(|p| (r, p))).collect();
    if backlog.is_empty() {
        return s;
    }
    let _ = writeln!(
        s,
        "| run | memory_limit | sent → users | accepted | not accepted | fill msg/s | RSS end of fill | disk end of fill | restart s | RSS after restart | drained (users) | drain msg/s | deliver p50 | p99 | missing |"
    );
    let _ = writeln!(s, "|---|--:|--:|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    for (r, p) in backlog {
        let x = |k: &str| r.extra.get(k).copied().unwrap_or(0.0);
        let non_202 = p.non_202();
        let refused = if non_202.is_empty() {
            "0".to_owned()
        } else {
            non_202.iter().map(|(k, v)| format!("{k}: {v}")).collect::<Vec<_>>().join(", ")
        };
        let name = if r.label.is_empty() { &r.system } else { &r.label };
        let d = r.delivery.clone().unwrap_or_default();
        let _ = writeln!(
            s,
            "| {name} | {:.0} MiB | {} → {} | {} | {refused} | {:.0} | {:.0} MiB | {:.0} MiB | {:.2} | {:.0} MiB | {:.0} ({}) | {:.0} | {:.0} | {:.0} | {:.0} |",
            mib(p.memory_limit_bytes),
            p.messages,
            p.users,
            r.accepted,
            x("fill_msgs_per_s"),
            x("rss_bytes_end_of_fill") / 1048576.0,
            x("disk_bytes_end_of_fill") / 1048576.0,
            x("restart_seconds"),
            x("rss_bytes_after_restart") / 1048576.0,
            x("drain_delivered"),
            p.drain_users,
            x("drain_msgs_per_s"),
            d.p50_ms,
            d.p99_ms,
            x("missing"),
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_is_checked_by_key() {
        // Users 0 and 1 of 10 owe keys 0, 10, 1, 11; 10 never came, 1 came twice, 5 was not owed.
        let owed = vec![0, 1, 10, 11];
        let mut delivered = vec![1, 0, 1, 11, 5];
        assert_eq!(check_delivery(&owed, &mut delivered, 10), (1, 1, 1, 1));
    }

    #[test]
    fn the_drained_users_are_owed_their_accepted_messages() {
        // 200 messages to 50 users, every other one accepted.
        let bits = vec![0x5555_5555_5555_5555u64; 4];
        let filled = fill::Filled {
            messages: 200,
            accepted: 100,
            answers: BTreeMap::new(),
            requests: 0,
            acceptance: crate::stats::histogram(),
            fill_s: 1.0,
            samples: Vec::new(),
            accepted_bits: bits,
        };
        // Users 0..3: messages 0,50,100,150 / 1,51,.. / 2,52,..; the even ones were accepted.
        assert_eq!(owed_keys(&filled, 50, 3), vec![0, 2, 50, 52, 100, 102, 150, 152]);
    }
}
