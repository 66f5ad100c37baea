//! The command line of `esh3ar-perf`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand, ValueEnum};

use crate::clock::parse_duration;
use crate::engine::{self, cpu_list_string, parse_cpu_list, Spawned, Target};
use crate::report::{self, Machine, Report};
use crate::scenario::{self, Model, Plan, Scenario};
use crate::stats::Latency;

#[derive(Debug, Parser)]
#[command(name = "esh3ar-perf", version, about = "Load generator and benchmark harness for esh3ar")]
pub struct Cli {
    /// Print the ratio table (B / A) between two JSON reports.
    #[arg(long, num_args = 2, value_names = ["A.json", "B.json"])]
    pub compare: Option<Vec<PathBuf>>,
    #[command(subcommand)]
    pub command: Option<Cmd>,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Run one scenario against one system.
    Run(Box<RunArgs>),
    /// Serve the ceiling: a bare HTTP server answering a fixed 202.
    Ceiling {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// Executors (ignored when --cpus is given).
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Pin one executor per listed CPU (e.g. `1` or `0-1`).
        #[arg(long)]
        cpus: Option<String>,
        /// Set read and write timeouts on every connection, as the engine
        /// does (a diagnostic of what they cost).
        #[arg(long)]
        socket_timeouts: bool,
    },
    /// The ratio table between two JSON reports (B / A).
    Compare { a: PathBuf, b: PathBuf },
    /// A PNG of latency percentiles of several reports; of backlog
    /// reports, their RSS and disk against the backlog size.
    Plot {
        #[arg(long)]
        out: PathBuf,
        /// Default: "esh3ar-perf: latency percentiles", or for backlog
        /// reports "esh3ar backlog: engine RSS and data dir on disk".
        #[arg(long)]
        title: Option<String>,
        reports: Vec<PathBuf>,
    },
    /// A markdown table of several reports.
    Table {
        /// Throughput ratios are against the first report of this system.
        #[arg(long, default_value = "ceiling")]
        base: String,
        reports: Vec<PathBuf>,
    },
    /// Measure the disk's fdatasync latency (4 KiB writes).
    Disk {
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        #[arg(long, default_value_t = 500)]
        count: usize,
        /// Also write the result as JSON here.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum System {
    Esh3ar,
    Ceiling,
    Redis,
    Nats,
    Rabbitmq,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LoadModel {
    /// Each connection sends when its previous answer came.
    Closed,
    /// A fixed arrival rate (--rate); latency from the intended send time.
    Open,
}

#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    #[arg(long, value_enum, default_value_t = System::Esh3ar)]
    pub system: System,
    #[arg(long, value_enum, default_value_t = Scenario::Ingest)]
    pub scenario: Scenario,
    #[arg(long, value_enum, default_value_t = LoadModel::Closed)]
    pub model: LoadModel,
    /// Open loop: messages per second over all connections.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Sender connections (each has one request in flight); default 64,
    /// 800 for overload, 10000 for accept-all.
    #[arg(long)]
    pub connections: Option<usize>,
    /// Receivers (WebSocket users or queue consumers); default 1000 for
    /// e2e and offline-drain, 10000 for idle-connections. backlog: the
    /// distinct offline users the messages are spread over (default 100000).
    #[arg(long)]
    pub receivers: Option<usize>,
    /// backlog: how many of the users (`u0`..) connect and drain after the
    /// restart (default 10000, at most --receivers).
    #[arg(long)]
    pub drain_users: Option<usize>,
    /// Distinct recipients of ingest and batch messages.
    #[arg(long, default_value_t = 10_000)]
    pub users: usize,
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Generator threads (one glommio executor each).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Generator CPUs: `auto` (the CPUs the server does not use, if any),
    /// `none` (unpinned), or a list such as `0` or `2-3`.
    #[arg(long, default_value = "auto")]
    pub cpus: String,
    /// Message body bytes (at least 46); default 64, 16384 for overload.
    #[arg(long)]
    pub body_bytes: Option<usize>,
    /// `memory_limit_bytes` of a started engine (at least 67108864);
    /// default 4 GiB, 96 MiB for overload, 1 GiB for backlog.
    #[arg(long)]
    pub memory_limit_bytes: Option<u64>,
    /// Messages per batch request (batch, backlog).
    #[arg(long, visible_alias = "batch", default_value_t = 100)]
    pub batch_size: usize,
    /// Messages offline-drain queues; backlog: messages it sends.
    #[arg(long, default_value_t = 100_000)]
    pub messages: u64,
    /// replay: bytes of journal to fill before the restarts (default 1 GiB).
    #[arg(long)]
    pub journal_bytes: Option<u64>,
    /// replay: how many times to `kill -9` and restart (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub restarts: usize,
    /// Use this many 127.0.0.x source addresses (default: as many as needed).
    #[arg(long)]
    pub source_addrs: Option<usize>,
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// Address of a running server (peers; or esh3ar's business listener,
    /// or a ceiling). Without it esh3ar and the ceiling are started here.
    #[arg(long)]
    pub addr: Option<SocketAddr>,
    /// Mobile listener of a running esh3ar.
    #[arg(long)]
    pub mobile: Option<SocketAddr>,
    #[arg(long, default_value = engine::BENCH_API_KEY)]
    pub api_key: String,
    #[arg(long, default_value = engine::BENCH_TOKEN_SECRET)]
    pub token_secret: String,
    /// esh3ar receivers: the raw WebSocket API (`/v1/connect`) or the
    /// SignalR hub (`/v1/hub`, JSON hub protocol).
    #[arg(long, value_enum, default_value = "raw")]
    pub mobile_protocol: crate::ws::MobileProtocol,
    /// The esh3ar binary to start (default: next to esh3ar-perf).
    #[arg(long)]
    pub engine_bin: Option<PathBuf>,
    /// Shards of a started engine (or executors of a started ceiling);
    /// default 1, 2 for accept-all.
    #[arg(long)]
    pub server_threads: Option<usize>,
    /// Exit non-zero if any answer is not a 202 (timeouts, resets and
    /// connect failures included): a gate for operators and CI.
    #[arg(long)]
    pub require_all_accepted: bool,
    /// Where a started engine's data dir goes (default: the temp dir).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// CPUs of a started ceiling; for other servers only reported.
    #[arg(long)]
    pub server_cpus: Option<String>,
    /// PID of a running server, for its memory (idle-connections).
    #[arg(long)]
    pub server_pid: Option<u32>,
    #[arg(long, default_value = "guest")]
    pub rabbitmq_user: String,
    #[arg(long, default_value = "guest")]
    pub rabbitmq_password: String,
    /// Generator executors poll this many microseconds before sleeping.
    #[arg(long, default_value_t = 0)]
    pub spin_us: u64,
    /// Write the JSON report here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// A label for tables and plots (default: the system).
    #[arg(long)]
    pub label: Option<String>,
    /// Set by the receipts scenario: the started engine's benchmark client
    /// sends webhooks here, and the run waits for them before stopping it.
    #[arg(skip)]
    pub webhook_receiver: Option<std::sync::Arc<crate::receipts::Receiver>>,
    /// fallback: how long the fake WhatsApp provider takes to answer.
    #[arg(long, default_value = "50ms", value_parser = parse_duration)]
    pub provider_delay: Duration,
    /// fallback: `max_in_flight` of the engine's `[providers.whatsapp]`
    /// (the engine's default is 64).
    #[arg(long, default_value_t = 64)]
    pub provider_in_flight: usize,
    /// fallback: `[webhooks] max_in_flight_per_endpoint` of the engine, which
    /// also sizes its idle connection pool per host, provider calls
    /// included (engine default 16: calls beyond it open a new connection).
    #[arg(long)]
    pub webhooks_max_in_flight: Option<usize>,
    /// Set by the fallback scenario: register `--users` users with a phone
    /// through the admin API before the load.
    #[arg(skip)]
    pub register_users: bool,
    /// Set by the fallback scenario: the started engine's benchmark client
    /// falls back at once to this fake WhatsApp provider, and the run waits
    /// for its calls before stopping the engine.
    #[arg(skip)]
    pub fallback_provider: Option<std::sync::Arc<crate::fallback::Provider>>,
}

/// Fails with the answers that were not a 202 (or transport errors), if any.
pub fn check_all_accepted(r: &Report) -> anyhow::Result<()> {
    let total = r.not_accepted();
    if total == 0 {
        return Ok(());
    }
    let by: Vec<String> = r.errors.iter().map(|(k, v)| format!("{v} × {k}")).collect();
    bail!("--require-all-accepted: {total} requests were not answered 202 ({})", by.join(", "))
}

/// Entry point of the binary; returns the exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    match dispatch(cli) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("esh3ar-perf: {e:#}");
            1
        }
    }
}

fn dispatch(cli: Cli) -> anyhow::Result<()> {
    if let Some(files) = &cli.compare {
        let (a, b) = (Report::load(&files[0])?, Report::load(&files[1])?);
        print!("{}", report::compare(&a, &b));
        return Ok(());
    }
    match cli.command {
        None => bail!("nothing to do: see --help"),
        Some(Cmd::Run(args)) => {
            let r = run(&args)?;
            print!("{}", r.human());
            if args.require_all_accepted {
                check_all_accepted(&r)?;
                println!("every answer was a 202 ({} requests measured)", r.requests);
            }
            Ok(())
        }
        Some(Cmd::Ceiling { listen, threads, cpus, socket_timeouts }) => {
            let cpus = cpus.as_deref().map(parse_cpu_list).transpose().map_err(anyhow::Error::msg)?.unwrap_or_default();
            crate::ceiling::serve(listen, threads, &cpus, socket_timeouts, |addr| {
                println!("esh3ar-perf ceiling ready addr={addr}");
            })
        }
        Some(Cmd::Compare { a, b }) => {
            print!("{}", report::compare(&Report::load(&a)?, &Report::load(&b)?));
            Ok(())
        }
        Some(Cmd::Plot { out, title, reports }) => {
            let rs = reports.iter().map(|p| Report::load(p)).collect::<anyhow::Result<Vec<_>>>()?;
            if !rs.is_empty() && rs.iter().all(|r| r.backlog.is_some()) {
                let title = title.as_deref().unwrap_or(crate::backlog::plot::TITLE);
                crate::backlog::plot::plot(&rs, title, &out)?;
            } else {
                crate::plot::plot(&rs, title.as_deref().unwrap_or("esh3ar-perf: latency percentiles"), &out)?;
            }
            println!("wrote {}", out.display());
            Ok(())
        }
        Some(Cmd::Table { base, reports }) => {
            let rs = reports.iter().map(|p| Report::load(p)).collect::<anyhow::Result<Vec<_>>>()?;
            print!("{}", report::markdown_table(&rs, &base));
            let idle = report::idle_table(&rs);
            if !idle.is_empty() {
                print!("\n{idle}");
            }
            let backlog = crate::backlog::table(&rs);
            if !backlog.is_empty() {
                print!("\n{backlog}");
            }
            Ok(())
        }
        Some(Cmd::Disk { dir, count, out }) => {
            let l = crate::disk::fdatasync_latency(&dir, count)?;
            println!(
                "fdatasync after a 4 KiB write, {} samples in {}: p50 {:.3} ms, p90 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
                l.count,
                dir.display(),
                l.p50_ms,
                l.p90_ms,
                l.p99_ms,
                l.max_ms
            );
            if let Some(out) = out {
                std::fs::write(&out, serde_json::to_string_pretty(&l)?)
                    .with_context(|| format!("cannot write {}", out.display()))?;
            }
            Ok(())
        }
    }
}

/// Starts the ceiling server as a child process of this binary.
fn spawn_ceiling(threads: usize, cpus: Option<&str>) -> anyhow::Result<(Spawned, Target)> {
    let exe = std::env::current_exe().context("cannot find esh3ar-perf's own path")?;
    let mut cmd = Command::new(exe);
    cmd.args(["ceiling", "--threads", &threads.to_string()]);
    if let Some(c) = cpus {
        cmd.args(["--cpus", c]);
    }
    let s = engine::spawn_until_ready(cmd, "esh3ar-perf ceiling ready ", engine::START_TIMEOUT)?;
    let addr =
        engine::ready_field(&s.ready_line, "addr").and_then(|a| a.parse().ok()).context("bad ceiling ready line")?;
    Ok((s, Target::Ceiling { addr }))
}

/// Runs one scenario as `args` say and returns its report (also saved to
/// `--out`). Used by the binary and by the smoke tests.
pub fn run(args: &RunArgs) -> anyhow::Result<Report> {
    if args.scenario == Scenario::Receipts {
        return crate::receipts::run(args);
    }
    if args.scenario == Scenario::Fallback {
        return crate::fallback::run(args);
    }
    if args.scenario == Scenario::Backlog {
        return crate::backlog::run(args);
    }
    if args.scenario == Scenario::Replay {
        return crate::replay::run(args);
    }
    let sockets = args.connections.unwrap_or(0) + args.receivers.unwrap_or(0);
    crate::net::raise_open_files(sockets.max(default_connections(args.scenario)))?;
    let server_threads = args.server_threads.unwrap_or(if args.scenario == Scenario::AcceptAll { 2 } else { 1 });
    let mut spawned: Option<Spawned> = None;
    let target = match (args.system, args.addr) {
        (System::Esh3ar, None) => {
            let bin = args.engine_bin.clone().unwrap_or_else(engine::default_engine_bin);
            let limit = memory_limit(args);
            let webhook = args.webhook_receiver.as_ref().map(|r| r.url());
            let whatsapp = args.fallback_provider.as_ref().map(|p| engine::WhatsAppProvider {
                base_url: p.base_url(),
                max_in_flight: args.provider_in_flight,
                webhooks_max_in_flight: args.webhooks_max_in_flight,
            });
            let (s, mut t) = engine::spawn_engine(
                &bin,
                server_threads,
                args.data_dir.as_deref(),
                limit,
                webhook.as_deref(),
                whatsapp.as_ref(),
            )?;
            spawned = Some(s);
            if let Target::Esh3ar { mobile_protocol, .. } = &mut t {
                *mobile_protocol = args.mobile_protocol;
            }
            t
        }
        (System::Esh3ar, Some(business)) => Target::Esh3ar {
            business,
            mobile: args.mobile.context("--mobile is needed with --addr for esh3ar")?,
            api_key: args.api_key.clone(),
            token_secret: args.token_secret.clone(),
            mobile_protocol: args.mobile_protocol,
        },
        (System::Ceiling, None) => {
            let (s, t) = spawn_ceiling(server_threads, args.server_cpus.as_deref())?;
            spawned = Some(s);
            t
        }
        (System::Ceiling, Some(addr)) => Target::Ceiling { addr },
        (System::Redis, Some(addr)) => Target::Redis { addr },
        (System::Nats, Some(addr)) => Target::Nats { addr },
        (System::Rabbitmq, Some(addr)) => {
            Target::Rabbitmq { addr, user: args.rabbitmq_user.clone(), password: args.rabbitmq_password.clone() }
        }
        (peer, None) => bail!("--addr is needed for {peer:?} (scripts/bench.sh starts one)"),
    };
    let server_pid = spawned.as_ref().map(Spawned::pid).or(args.server_pid);
    let server_cpus: Vec<usize> = match (&spawned, args.system) {
        (Some(s), System::Esh3ar) => engine::thread_cpus(s.pid(), "shard"),
        (Some(s), _) => engine::thread_cpus(s.pid(), "ceiling"),
        (None, _) => {
            args.server_cpus.as_deref().map(parse_cpu_list).transpose().map_err(anyhow::Error::msg)?.unwrap_or_default()
        }
    };
    let cpus = generator_cpus(&args.cpus, &server_cpus, args.threads)?;
    let plan = plan(args, cpus.clone());
    let mut register_s = None;
    if args.register_users {
        let admin =
            spawned.as_ref().and_then(Spawned::admin_addr).context("no admin listener of the started engine")?;
        eprintln!("registering {} users with a phone at {admin}", args.users);
        register_s = Some(crate::fallback::register_users(admin, engine::BENCH_ADMIN_TOKEN, args.users, 8)?);
    }
    let result = scenario::run(&plan, &target, server_pid);
    let load_end = crate::clock::now_ns();
    if let (Ok(outcome), Some(provider)) = (&result, &args.fallback_provider) {
        eprintln!(
            "waiting for {} provider calls (up to {:?})",
            outcome.accepted_all.saturating_sub(provider.unique()),
            args.drain_timeout
        );
        provider.wait_for(outcome.accepted_all, args.drain_timeout);
    }
    if let (Ok(outcome), Some(receiver)) = (&result, &args.webhook_receiver) {
        // Every accepted message owes `delivered` and `acked`.
        let expected = outcome.accepted_all * 2;
        eprintln!(
            "waiting for {expected} webhook events (up to {:?})",
            args.drain_timeout.max(Duration::from_secs(30))
        );
        receiver.drain(expected, args.drain_timeout.max(Duration::from_secs(30)));
    }
    if let Some(mut s) = spawned {
        s.stop();
    }
    let outcome = result?;
    let mut stats = outcome.stats;
    if args.webhook_receiver.is_some() || args.fallback_provider.is_some() {
        stats.extra.insert("accepted_all".into(), outcome.accepted_all as f64);
    }
    if let Some(r) = register_s {
        stats.extra.insert("users_registered".into(), args.users as f64);
        stats.extra.insert("register_s".into(), r);
    }
    if plan.scenario == Scenario::E2e {
        let (h, first) = crate::stats::after_acceptance(
            &stats.accepted_at,
            &stats.delivered_at,
            outcome.window_ns.0,
            outcome.window_ns.1,
        );
        let q = |p: f64| h.value_at_quantile(p) as f64 / 1000.0;
        stats.extra.insert("after_accept_p50_ms".into(), q(0.5));
        stats.extra.insert("after_accept_p99_ms".into(), q(0.99));
        stats.extra.insert("after_accept_p999_ms".into(), q(0.999));
        stats.extra.insert("received_before_202_share".into(), first);
    }
    if let Some(provider) = &args.fallback_provider {
        for (k, v) in provider.figures(&stats.accepted_at, outcome.accepted_all, outcome.window_ns, load_end) {
            stats.extra.insert(k.into(), v);
        }
    }
    let (lost, duplicates) = if matches!(plan.scenario, Scenario::E2e | Scenario::OfflineDrain) {
        stats.lost_and_duplicates()
    } else {
        (0, 0)
    };
    let has_delivery = matches!(plan.scenario, Scenario::E2e | Scenario::OfflineDrain);
    let secs = outcome.duration_s.max(1e-9);
    let report = Report {
        system: target.system().to_owned(),
        scenario: plan.scenario.name().to_owned(),
        model: match plan.model {
            Model::Closed => "closed".into(),
            Model::Open { .. } => "open".into(),
        },
        label: args.label.clone().unwrap_or_default(),
        connections: if plan.scenario == Scenario::IdleConnections { 0 } else { plan.connections },
        receivers: plan.receivers,
        rate_per_s: match plan.model {
            Model::Open { rate } => Some(rate),
            Model::Closed => None,
        },
        duration_s: outcome.duration_s,
        generator_threads: if cpus.is_empty() { plan.threads } else { cpus.len() },
        generator_cpus: cpu_list_string(&cpus),
        server_cpus: cpu_list_string(&server_cpus),
        throughput_per_s: if plan.scenario == Scenario::OfflineDrain {
            stats.delivered as f64 / secs
        } else {
            stats.accepted as f64 / secs
        },
        // offline-drain: the queueing rate (the throughput is the drain's).
        requests_per_s: match stats.extra.get("queue_s") {
            Some(q) if plan.scenario == Scenario::OfflineDrain => stats.requests as f64 / q.max(1e-9),
            _ => stats.requests as f64 / secs,
        },
        accepted: stats.accepted,
        requests: stats.requests,
        acceptance: Latency::from_histogram(&stats.acceptance),
        delivery: has_delivery.then(|| Latency::from_histogram(&stats.delivery)),
        errors: stats.errors.clone(),
        lost,
        duplicates,
        extra: stats.extra.clone(),
        overload: outcome.overload,
        backlog: None,
        machine: Machine::probe(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        unix_time_s: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
    };
    if let Some(out) = &args.out {
        report.save(out)?;
    }
    Ok(report)
}

/// The CPUs the generator pins its threads to.
pub(crate) fn generator_cpus(spec: &str, server: &[usize], threads: usize) -> anyhow::Result<Vec<usize>> {
    match spec {
        "none" => Ok(Vec::new()),
        "auto" => {
            let online = std::thread::available_parallelism().map_or(1, |n| n.get());
            let free: Vec<usize> = (0..online).filter(|c| !server.contains(c)).collect();
            if server.is_empty() || free.is_empty() {
                Ok(Vec::new())
            } else {
                Ok(free.into_iter().cycle().take(threads.max(1)).collect())
            }
        }
        list => parse_cpu_list(list).map_err(anyhow::Error::msg),
    }
}

fn plan(args: &RunArgs, cpus: Vec<usize>) -> Plan {
    let receivers = args.receivers.unwrap_or(match args.scenario {
        Scenario::E2e | Scenario::OfflineDrain | Scenario::Receipts => 1000,
        Scenario::IdleConnections => 10_000,
        Scenario::Backlog => crate::backlog::DEFAULT_USERS,
        Scenario::Replay => crate::replay::DEFAULT_USERS,
        Scenario::Ingest | Scenario::Batch | Scenario::Overload | Scenario::AcceptAll | Scenario::Fallback => 0,
    });
    let overload = args.scenario == Scenario::Overload;
    Plan {
        scenario: args.scenario,
        model: match args.model {
            LoadModel::Closed => Model::Closed,
            LoadModel::Open => Model::Open { rate: args.rate.unwrap_or(0.0) },
        },
        connections: args.connections.unwrap_or(default_connections(args.scenario)),
        receivers,
        users: args.users,
        duration: args.duration,
        warmup: args.warmup,
        threads: args.threads,
        cpus,
        body_bytes: args.body_bytes.unwrap_or(if overload { 16 << 10 } else { 64 }).max(crate::payload::STAMP_BYTES),
        batch_size: args.batch_size,
        messages: args.messages,
        source_addrs: args.source_addrs,
        drain_timeout: args.drain_timeout,
        connects_in_flight: 64,
        spin_before_park: Duration::from_micros(args.spin_us),
        memory_limit_bytes: if args.addr.is_none() { memory_limit(args) } else { 0 },
        record_accept_times: args.fallback_provider.is_some() || args.scenario == Scenario::E2e,
    }
}

/// Sender connections unless `--connections` says otherwise.
fn default_connections(scenario: Scenario) -> usize {
    match scenario {
        Scenario::Overload => 800,
        Scenario::AcceptAll => 10_000,
        _ => 64,
    }
}

/// The memory limit of an engine started here.
pub(crate) fn memory_limit(args: &RunArgs) -> u64 {
    args.memory_limit_bytes.unwrap_or(match args.scenario {
        Scenario::Overload => scenario::overload::DEFAULT_MEMORY_LIMIT,
        Scenario::Backlog => crate::backlog::DEFAULT_MEMORY_LIMIT,
        Scenario::Replay => crate::replay::DEFAULT_MEMORY_LIMIT,
        _ => engine::DEFAULT_MEMORY_LIMIT,
    })
}

/// Parses a `run` command line (without the program name) into arguments,
/// for tests: `run_args(&["--scenario", "e2e"])`.
pub fn run_args(args: &[&str]) -> anyhow::Result<RunArgs> {
    let cli = Cli::try_parse_from(["esh3ar-perf", "run"].iter().chain(args.iter()))?;
    match cli.command {
        Some(Cmd::Run(a)) => Ok(*a),
        _ => bail!("not a run command"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_all_defaults_to_10000_connections_and_4_gib() {
        let a = run_args(&["--scenario", "accept-all", "--require-all-accepted"]).unwrap();
        assert!(a.require_all_accepted);
        let p = plan(&a, Vec::new());
        assert_eq!((p.connections, p.body_bytes), (10_000, 64));
        assert_eq!(p.memory_limit_bytes, engine::DEFAULT_MEMORY_LIMIT);
        assert_eq!(engine::DEFAULT_MEMORY_LIMIT, 4 << 30);
        assert_eq!(
            plan(&run_args(&["--scenario", "accept-all", "--connections", "15000"]).unwrap(), vec![]).connections,
            15_000
        );
        assert_eq!(plan(&run_args(&[]).unwrap(), vec![]).connections, 64);
    }

    #[test]
    fn open_files_beyond_the_hard_limit_fail_clearly() {
        let e = crate::net::raise_open_files(usize::MAX / 2).unwrap_err().to_string();
        assert!(e.contains("hard RLIMIT_NOFILE"), "{e}");
        crate::net::raise_open_files(10).unwrap();
    }
}
