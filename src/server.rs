//! Runtime bootstrap: one glommio executor per shard, the channel mesh,
//! recovery, the listeners, and graceful shutdown.
//!
//! Startup order per shard ([`shard_main`], one function per phase): join
//! the mesh (which fixes the shard id), recover the journal, wait until
//! every shard recovered, bind the listeners (SO_REUSEPORT: the kernel
//! spreads connections), wait until all are bound, then serve until
//! shutdown, drain, and flush the journal. Listeners open only after
//! recovery, so a client can never see a shard that has not rebuilt its
//! index. Every wait on another thread has a bound, and a panic anywhere
//! aborts the process ([`install_panic_hook`]): never a half-dead engine.

use std::fs;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use esh3ar_shards::feed::{FeedConfig, FeedStore};
use esh3ar_shards::journal::{Journal, JournalConfig};
use esh3ar_shards::recovery::{ensure_dir, recover_shard, write_file_durably, Mode, Recovered};
use esh3ar_shards::storage::DmaStorage;
use futures_channel::oneshot;
use glommio::channels::shared_channel::ConnectedReceiver;
use glommio::net::TcpListener;
use glommio::{LocalExecutorPoolBuilder, PoolPlacement};

use crate::accept::{accept_business, accept_mobile, serve_admin};
use crate::admin::AdminState;
use crate::clients::ClientTable;
use crate::config::Config;
use crate::mesh::{Mesh, MeshSeed};
use crate::outbound::{OutboundStatus, ShardLink};
use crate::shard::{MeshMsg, Shard};
use crate::shutdown::{install_signals, Shutdown};

/// How long the shard executors may take to come up.
const EXECUTOR_START_TIMEOUT: Duration = Duration::from_secs(20);

/// io_uring buffer memory per executor (glommio's default is 10 MiB).
const IO_MEMORY_BYTES: usize = 2 << 20;

/// How long shutdown waits for requests in flight.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Bounds of the cross-thread barriers. Recovery reads every segment, so
/// its bound is generous; the others only wait for peers doing quick work.
const RECOVERED_BARRIER_TIMEOUT: Duration = Duration::from_secs(15 * 60);
const BOUND_BARRIER_TIMEOUT: Duration = Duration::from_secs(60);
/// Peers drain for at most `DRAIN_TIMEOUT`, then arrive.
const DRAINED_BARRIER_TIMEOUT: Duration = Duration::from_secs(DRAIN_TIMEOUT.as_secs() + 10);

/// A point all shards must reach before any goes on.
struct Barrier {
    name: &'static str,
    arrived: AtomicUsize,
}

impl Barrier {
    const fn new(name: &'static str) -> Self {
        Self { name, arrived: AtomicUsize::new(0) }
    }
}

/// What one shard's executor starts from: its mesh ends and the receiver
/// the signal thread wakes it through.
struct ShardSeed {
    /// Shard 0's: the runtime configuration state for the admin API.
    admin: Option<Box<AdminSeed>>,
    mesh: MeshSeed<MeshMsg>,
    signal: oneshot::Receiver<()>,
    /// This shard's channels to the offload thread (receipts).
    outbound: ShardLink,
}

/// What the admin listener's runtime configuration starts from.
struct AdminSeed {
    started: crate::admin_config::Started,
    origin: crate::admin_config::ConfigOrigin,
    control: crate::outbound::ControlSender,
    reload: futures_channel::mpsc::Receiver<()>,
}

/// Process-wide state shared by the shards: read-only, or atomics used
/// only at startup and shutdown (never on the message path).
struct Shared {
    cfg: Arc<Config>,
    /// Breaker states of the webhook thread, for /healthz.
    outbound_status: Arc<OutboundStatus>,
    /// The fallback providers' endpoints on the offload thread.
    provider_endpoints: Vec<(esh3ar_shards::Channel, crate::outbound::EndpointId)>,
    clients: Arc<ClientTable>,
    /// The runtime config version in force at startup.
    config_version: u64,
    shards: usize,
    business_addr: SocketAddr,
    mobile_addr: SocketAddr,
    signal: Arc<AtomicBool>,
    ready: Arc<AtomicBool>,
    failed: AtomicBool,
    /// Startup only: errors to print when the engine exits.
    errors: Mutex<Vec<String>>,
    /// Shards whose executor came up and began `shard_main`.
    started: AtomicUsize,
    recovered: Barrier,
    bound: Barrier,
    drained: Barrier,
}

impl Shared {
    fn fail(&self, msg: String) {
        tracing::error!("{msg}");
        if let Ok(mut errors) = self.errors.lock() {
            errors.push(msg);
        }
        self.failed.store(true, Ordering::Release);
    }

    /// Waits until all shards arrived, at most `bound`; false if startup
    /// failed meanwhile (with `abort_on_failure`) or the bound passed.
    /// Cross-thread, so it polls an atomic (startup and shutdown only).
    async fn barrier(&self, b: &Barrier, abort_on_failure: bool, bound: Duration) -> bool {
        b.arrived.fetch_add(1, Ordering::AcqRel);
        let deadline = Instant::now() + bound;
        while b.arrived.load(Ordering::Acquire) < self.shards {
            if abort_on_failure && self.failed.load(Ordering::Acquire) {
                return false;
            }
            if Instant::now() > deadline {
                self.fail(format!(
                    "only {} of {} shards reached `{}` within {} s",
                    b.arrived.load(Ordering::Acquire),
                    self.shards,
                    b.name,
                    bound.as_secs()
                ));
                return false;
            }
            glommio::timer::sleep(Duration::from_millis(2)).await;
        }
        !(abort_on_failure && self.failed.load(Ordering::Acquire))
    }
}

/// The data directory, locked for this process.
pub struct DataDir {
    _lock: fs::File,
}

impl DataDir {
    /// Creates or opens `dir`, takes its lock, and checks that it was made
    /// with the same shard count (user ids hash to shards).
    pub fn open(dir: &Path, shards: usize) -> anyhow::Result<DataDir> {
        ensure_dir(dir).with_context(|| format!("cannot create data dir {}", dir.display()))?;
        let lock_path = dir.join("LOCK");
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .with_context(|| format!("cannot open {}", lock_path.display()))?;
        // SAFETY: flock on a file descriptor we own; no memory is involved.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            bail!("data dir {} is in use by another esh3ar process", dir.display());
        }
        let meta_path = dir.join("engine.meta");
        match fs::read_to_string(&meta_path) {
            Ok(text) => {
                let found = read_meta_shards(&text)
                    .with_context(|| format!("{} is damaged; expected a line `shards = N`", meta_path.display()))?;
                if found != shards {
                    bail!(
                        "data dir {} was created with {found} shards but the engine is configured for {shards}; \
                         set engine.shards = {found} (user ids are placed on shards by hash)",
                        dir.display()
                    );
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                write_file_durably(&meta_path, format!("format = 1\nshards = {shards}\n").as_bytes())
                    .with_context(|| format!("cannot write {}", meta_path.display()))?;
            }
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", meta_path.display())),
        }
        Ok(DataDir { _lock: lock })
    }
}

/// The shard count recorded in `engine.meta`.
pub fn read_meta_shards(text: &str) -> Option<usize> {
    text.lines().find_map(|l| l.strip_prefix("shards = ")).and_then(|v| v.trim().parse().ok())
}

/// The journal directory of shard `id`.
pub fn shard_dir(data_dir: &Path, id: usize) -> PathBuf {
    data_dir.join(format!("shard-{id}"))
}

/// Binds a placeholder socket to learn the port when `addr` asks for port
/// 0, so that every shard binds the same port. The placeholder never
/// listens, so it takes no connections; it is dropped once shards bound.
fn reserve_port(addr: SocketAddr) -> io::Result<(SocketAddr, Option<socket2::Socket>)> {
    if addr.port() != 0 {
        return Ok((addr, None));
    }
    let sock = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    sock.set_reuse_port(true)?;
    sock.set_reuse_address(true)?;
    sock.bind(&addr.into())?;
    let bound = sock.local_addr()?.as_socket().expect("inet socket");
    Ok((bound, Some(sock)))
}

/// Makes a panic on any thread fatal at once: log it, then abort. A shard
/// that died would leave its peers waiting for it and SIGTERM unanswered; a
/// restart is safe (the journal holds every acknowledged message).
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("unnamed");
        let backtrace = std::backtrace::Backtrace::force_capture();
        tracing::error!(thread = name, panic = %info, "panic: aborting the process (a restart recovers from the journal)");
        eprintln!("esh3ar: fatal: panic on thread {name}: {info}; aborting\n{backtrace}");
        std::process::abort();
    }));
}

/// Descriptors the engine keeps for itself beyond connections: listeners,
/// journal segments, io_uring rings and eventfds, the mesh.
const FILES_RESERVE: u64 = 1024;

/// Raises the soft open-files limit so that every shard can hold its
/// `engine.connections_per_shard_max` business connections and as many
/// WebSocket sessions (the default soft limit, often 1024, would refuse
/// the 1025th connection). Never above the hard limit: then it warns.
fn raise_open_files_limit(cfg: &Config, shards: usize) {
    let wanted = (2 * cfg.engine.connections_per_shard_max * shards) as u64 + FILES_RESERVE;
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into a valid struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return;
    }
    if lim.rlim_cur >= wanted {
        return;
    }
    let target = wanted.min(lim.rlim_max);
    let raised = libc::rlimit { rlim_cur: target, rlim_max: lim.rlim_max };
    // SAFETY: setrlimit reads a valid struct; it only changes this process's limit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        tracing::warn!(soft = lim.rlim_cur, wanted, "cannot raise the open-files limit");
        return;
    }
    if target < wanted {
        tracing::warn!(
            limit = target,
            wanted,
            "the open-files hard limit is below what engine.connections_per_shard_max allows; \
             connections beyond it will be refused (raise `ulimit -Hn`, or LimitNOFILE= under systemd)"
        );
    }
}

/// Runs the engine until SIGTERM/SIGINT. Returns an error if it could not
/// start. `file_cfg` is the file's config (all layers); the runtime
/// version in force may differ (`admin_config::startup`).
pub fn run(
    file_cfg: Config,
    layered: &crate::config_layers::Layered,
    origin: crate::admin_config::ConfigOrigin,
) -> anyhow::Result<()> {
    install_panic_hook();
    let shards = file_cfg.shard_count();
    raise_open_files_limit(&file_cfg, shards);
    let _data_dir = DataDir::open(&file_cfg.engine.data_dir, shards)?;
    let started = crate::admin_config::startup(file_cfg, layered, &origin)?;
    let cfg = started.cfg.clone();
    let config_version = started.version();
    let listeners = cfg.listeners();
    let (business_addr, placeholder) =
        reserve_port(listeners.business).with_context(|| format!("cannot bind {}", listeners.business))?;
    let (mobile_addr, mobile_placeholder) =
        reserve_port(listeners.mobile).with_context(|| format!("cannot bind {}", listeners.mobile))?;
    let signals = install_signals(shards).context("cannot install signal handlers")?;
    let webhook_endpoints = ClientTable::endpoints(&cfg);
    let provider_endpoints = crate::outbound::provider_endpoints(webhook_endpoints.len(), &cfg.providers);
    let (outbound, links) =
        crate::outbound::spawn_with_providers(&cfg.webhooks, webhook_endpoints, &cfg.providers, shards)
            .map_err(|e| anyhow::anyhow!("cannot start the webhook thread: {e}"))?;
    let mut admin_seed =
        Some(Box::new(AdminSeed { started, origin, control: outbound.control(), reload: signals.reload }));
    let seeds: Vec<ShardSeed> = crate::mesh::build::<MeshMsg>(shards, cfg.engine.mesh_channel_capacity)
        .into_iter()
        .zip(signals.shards)
        .zip(links)
        .map(|((mesh, signal), outbound)| {
            let admin = if mesh.id == 0 { admin_seed.take() } else { None };
            ShardSeed { admin, mesh, signal, outbound }
        })
        .collect();
    let shared = Arc::new(Shared {
        outbound_status: outbound.status(),
        provider_endpoints,
        clients: Arc::new(ClientTable::from_config(&cfg)),
        config_version,
        cfg: Arc::new(cfg),
        shards,
        business_addr,
        mobile_addr,
        signal: signals.flag,
        ready: Arc::new(AtomicBool::new(false)),
        failed: AtomicBool::new(false),
        errors: Mutex::new(Vec::new()),
        started: AtomicUsize::new(0),
        recovered: Barrier::new("recovered"),
        bound: Barrier::new("listeners bound"),
        drained: Barrier::new("drained"),
    });
    tracing::info!(shards, data_dir = %shared.cfg.engine.data_dir.display(), "starting esh3ar");
    // Startup only: each executor takes its seed once.
    let seeds = Arc::new(Mutex::new(seeds));
    let handles = start_executors(&shared, seeds)?;
    watch_executor_start(&shared);
    // Shards bound their listeners (or failed) once `bound` is complete.
    while shared.bound.arrived.load(Ordering::Acquire) < shards && !shared.failed.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(2));
    }
    drop(placeholder);
    drop(mobile_placeholder);
    for r in handles.join_all() {
        if let Err(e) = r {
            shared.fail(format!("shard executor failed: {e}"));
        }
    }
    // Every shard dropped its job sender: the thread finishes the attempts
    // in flight (bounded by webhooks.timeout_ms) and exits.
    if outbound.join().is_err() {
        shared.fail("the webhook thread panicked".into());
    }
    let errors = shared.errors.lock().map(|e| e.clone()).unwrap_or_default();
    if !errors.is_empty() {
        bail!("{}", errors.join("\n"));
    }
    tracing::info!("esh3ar stopped cleanly");
    Ok(())
}

fn start_executors(
    shared: &Arc<Shared>,
    seeds: Arc<Mutex<Vec<ShardSeed>>>,
) -> anyhow::Result<glommio::PoolThreadHandles<()>> {
    let shards = shared.shards;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let placement = if shards <= cpus {
        PoolPlacement::MaxSpread(shards, None)
    } else {
        // Known issue: with more shards than CPUs, an executor occasionally
        // never runs its first task when several engines start at once; the
        // start watchdog turns that into a clear exit.
        tracing::warn!(
            shards,
            cpus,
            "more shards than CPUs: shards share cores (fine for a data dir moved to a smaller host, not for speed)"
        );
        PoolPlacement::Unbound(shards)
    };
    let pool_shared = shared.clone();
    let mut builder = LocalExecutorPoolBuilder::new(placement);
    if let Some(spin) = spin_before_park_from_env() {
        builder = builder.spin_before_park(spin);
    }
    builder
        .name("shard")
        // Registered io_uring buffers are pinned memory (RLIMIT_MEMLOCK);
        // journal writes need little of it.
        .io_memory(IO_MEMORY_BYTES)
        .ring_depth(RING_DEPTH)
        .on_all_shards(move || {
            let shared = pool_shared.clone();
            let seed = seeds.lock().ok().and_then(|mut s| s.pop());
            async move {
                match seed {
                    Some(seed) => shard_main(shared, seed).await,
                    None => shared.fail("more executors than mesh seeds".into()),
                }
            }
        })
        .map_err(|e| anyhow::anyhow!("cannot start the shard executors: {e}"))
}

/// Entries of each shard's io_uring rings (glommio's default is 128). The
/// kernel sizes a ring's cancellation hash from it (cq entries / 32, at
/// most 256 buckets), and glommio cancels and re-arms its preemption timer
/// on nearly every turn of the executor: each cancel first walks the
/// bucket where the shard's armed socket polls (one per idle connection)
/// would be. With 128 entries that is 8 buckets, ~1,250 polls each at
/// 10,000 connections: 7.4% of the shard's time in `io_poll_find` at
/// 46,000 msg/s, 5.1% with 4,096 (docs/PERFORMANCE.md, "Issue #9, sixth
/// round"). 4,096 gives the most buckets; the rings' memory is a few
/// hundred KiB per shard.
const RING_DEPTH: usize = 4096;

/// `ESH3AR_SPIN_BEFORE_PARK_US`: executors poll this many microseconds
/// before they sleep in `io_uring_enter`. For profiling under valgrind
/// (docs/PERFORMANCE.md, "Hot path"): valgrind runs one thread at a time
/// and does not hand the others the CPU while a thread sleeps in
/// `io_uring_enter`, so a shard waiting there for its blocking-pool thread
/// (the cold store's open, say) waits forever; a shard that spins instead
/// lets it run. Not a tuning knob: spinning burns a core.
fn spin_before_park_from_env() -> Option<std::time::Duration> {
    let raw = std::env::var("ESH3AR_SPIN_BEFORE_PARK_US").ok()?;
    match raw.parse::<u64>() {
        Ok(us) => Some(std::time::Duration::from_micros(us)),
        Err(_) => {
            tracing::warn!(value = %raw, "ignoring ESH3AR_SPIN_BEFORE_PARK_US: expected a whole number of microseconds");
            None
        }
    }
}

/// An executor that fails to come up (io_uring setup refused, say) leaves
/// its peers waiting for it forever: detect that and stop with a reason.
fn watch_executor_start(shared: &Shared) {
    let deadline = Instant::now() + EXECUTOR_START_TIMEOUT;
    while shared.started.load(Ordering::Acquire) < shared.shards {
        if shared.signal.load(Ordering::Relaxed) {
            // The shards that run cannot shut down cleanly without the missing
            // ones; nothing was accepted yet, so just stop.
            eprintln!("error: interrupted while the shard executors were starting");
            std::process::exit(1);
        }
        if Instant::now() > deadline {
            eprintln!(
                "error: only {} of {} shard executors started within {}s; io_uring setup probably failed \
                 (check `ulimit -l`, and that the kernel allows io_uring)",
                shared.started.load(Ordering::Acquire),
                shared.shards,
                EXECUTOR_START_TIMEOUT.as_secs()
            );
            std::process::exit(1);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// One shard's life, phase by phase.
async fn shard_main(shared: Arc<Shared>, seed: ShardSeed) {
    shared.started.fetch_add(1, Ordering::AcqRel);
    tracing::debug!(shard = seed.mesh.id, "connecting the mesh");
    let (senders, receivers) = seed.mesh.connect().await;
    let id = senders.peer_id();
    let admin_shutdown = Rc::new(Shutdown::default());
    let admin = (id == 0).then(|| start_admin(&shared, &admin_shutdown));
    let recovered = recover(&shared, id);
    if !shared.barrier(&shared.recovered, true, RECOVERED_BARRIER_TIMEOUT).await {
        admin_shutdown.trigger();
        return;
    }
    let Some(recovered) = recovered else {
        return; // unreachable: a failed recovery fails the barrier
    };
    let Some(shard) = open_shard(&shared, recovered, senders, receivers, seed.signal).await else {
        admin_shutdown.trigger();
        return;
    };
    let fallback = (!shared.provider_endpoints.is_empty()).then(|| {
        let providers = crate::fallback::Providers {
            endpoints: shared.provider_endpoints.clone(),
            status: Some(shared.outbound_status.clone()),
        };
        crate::fallback::Fallbacks::new(shard.clone(), seed.outbound.jobs.duplicate(), providers)
    });
    if let Some(fallback) = &fallback {
        glommio::spawn_local(crate::fallback::run(fallback.clone())).detach();
    }
    glommio::spawn_local(crate::receipts::run(shard.clone(), seed.outbound, fallback)).detach();
    if let Some(admin) = admin {
        admin.set_shard(shard.clone());
        if let Some(seed) = seed.admin {
            let AdminSeed { started, origin, control, mut reload } = *seed;
            let config =
                crate::admin_config::ConfigAdmin::new(started, origin, control, shared.provider_endpoints.clone());
            admin.set_tokens(&shard.cfg());
            admin.set_config(config);
            let admin = admin.clone();
            glommio::spawn_local(async move {
                use futures_util::StreamExt as _;
                while reload.next().await.is_some() {
                    admin.reload().await;
                }
            })
            .detach();
        }
    }
    let listeners = bind_listeners(&shared, id);
    if !shared.barrier(&shared.bound, true, BOUND_BARRIER_TIMEOUT).await {
        admin_shutdown.trigger();
        return;
    }
    let Some((business, mobile)) = listeners else {
        return; // unreachable: a failed bind fails the barrier
    };
    if id == 0 {
        println!(
            "esh3ar ready business={} mobile={} shards={}",
            shared.business_addr, shared.mobile_addr, shared.shards
        );
        shared.ready.store(true, Ordering::Release);
    }
    glommio::spawn_local(accept_mobile(mobile, shard.clone())).detach();
    accept_business(business, shard.clone()).await;
    drain_and_stop(&shared, &shard).await;
    admin_shutdown.trigger();
}

/// The admin listener (shard 0) answers /readyz (503) while recovery runs.
fn start_admin(shared: &Arc<Shared>, shutdown: &Rc<Shutdown>) -> Rc<AdminState> {
    let cfg = &shared.cfg;
    let state = AdminState::new(shared.ready.clone(), &cfg.admin.token, Some(shared.outbound_status.clone()));
    match TcpListener::bind(cfg.listeners().admin) {
        Ok(l) => {
            let addr = l.local_addr().map(|a| a.to_string()).unwrap_or_default();
            println!("esh3ar admin={addr}");
            glommio::spawn_local(serve_admin(l, shutdown.clone(), state.clone())).detach();
        }
        Err(e) => shared.fail(format!("cannot bind admin listener {}: {e}", cfg.admin.listen)),
    }
    state
}

/// Reads this shard's journal back (cutting a torn tail); None on failure.
fn recover(shared: &Shared, id: usize) -> Option<Recovered> {
    let dir = shard_dir(&shared.cfg.engine.data_dir, id);
    let started = Instant::now();
    let mut replay_s = 0.0;
    let recovered = ensure_dir(&dir)
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))
        .and_then(|()| esh3ar_shards::recovery::wait_for_earlier_writers(&dir).map_err(|e| e.to_string()))
        .and_then(|()| {
            // Timed apart from the wait for an earlier process's writes:
            // this is the replay rate operators compare (issue #9).
            let replay_started = Instant::now();
            let r = recover_shard(&dir, id as u16, Mode::Repair).map_err(|e| e.to_string());
            replay_s = replay_started.elapsed().as_secs_f64();
            r
        });
    let recovered = match recovered {
        Ok(r) => r,
        Err(e) => {
            shared.fail(format!("shard {id}: {e}"));
            return None;
        }
    };
    if let Some(t) = &recovered.torn {
        let quarantine = t.quarantine.as_ref().map(|q| q.display().to_string()).unwrap_or_default();
        tracing::warn!(shard = id, file = %t.path.display(), offset = t.offset, reason = t.reason,
            damaged_bytes = t.damaged_bytes, records_inside = t.records_inside, quarantine,
            "cut the torn last commit of a crash (its fdatasync never completed, so nothing in it was acknowledged); \
             its bytes are kept in the quarantine file");
    }
    tracing::info!(
        shard = id,
        segments = recovered.segments.len(),
        records = recovered.records,
        messages = recovered.index.len(),
        unsettled = recovered.index.unsettled(),
        bytes = recovered.bytes,
        replay_ms = (replay_s * 1000.0) as u64,
        mb_per_s = (recovered.bytes as f64 / 1e6 / replay_s.max(1e-6)).round() as u64,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "journal recovered"
    );
    release_freed_memory();
    Some(recovered)
}

/// Gives the memory recovery freed back to the kernel. Replay allocates
/// and frees far more than the shard keeps (segment buffers, tables that
/// grew and were rebuilt, the state of users whose messages all settled or
/// spilled), and glibc keeps freed memory in its arenas. In the backlog
/// scenario (1 M messages to 100,000 offline users, all spilled) RSS right
/// after a restart went from 127 to 122 MB (docs/PERFORMANCE.md, "Issue
/// #9, fourth round").
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory of glibc's heaps to the
    // kernel; it takes each arena's lock and touches no live allocation.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Opens the journal and builds the shard; starts its background tasks
/// (committer, maintenance, mesh receivers, signal watch).
async fn open_shard(
    shared: &Shared,
    recovered: Recovered,
    mesh: Mesh<MeshMsg>,
    receivers: Vec<(usize, ConnectedReceiver<MeshMsg>)>,
    signal: oneshot::Receiver<()>,
) -> Option<Rc<Shard>> {
    let id = mesh.peer_id();
    let cfg = shared.cfg.clone();
    let dir = shard_dir(&cfg.engine.data_dir, id);
    let journal_cfg = JournalConfig { dir, shard: id as u16, segment_bytes: cfg.engine.segment_bytes };
    if let Err(e) = esh3ar_shards::journal::probe_device(&journal_cfg.dir).await {
        tracing::warn!(shard = id, error = %e, "could not probe the journal device for polled I/O");
    }
    let journal = match Journal::open(journal_cfg, &recovered) {
        Ok(j) => j,
        Err(e) => {
            shared.fail(format!("shard {id}: {e}"));
            return None;
        }
    };
    glommio::spawn_local(journal.clone().run_committer()).detach();
    let feed_cfg = FeedConfig::new(
        shard_dir(&cfg.engine.data_dir, id).join("events"),
        cfg.events.retention_seconds.saturating_mul(1000),
    );
    let feed = match FeedStore::open(DmaStorage::default(), feed_cfg) {
        Ok(f) => f,
        Err(e) => {
            shared.fail(format!("shard {id}: cannot open the event feed: {e}"));
            return None;
        }
    };
    let sizing = esh3ar_shards::cold::ColdSizing {
        cache_bytes: cfg.backlog.cache_bytes,
        write_buffer_bytes: cfg.backlog.write_buffer_bytes,
    };
    let cold_dir = shard_dir(&cfg.engine.data_dir, id).join("cold");
    let opened =
        glommio::executor().spawn_blocking(move || esh3ar_shards::cold::ColdStore::open(&cold_dir, sizing)).await;
    let backlog = match opened {
        Ok(store) => crate::backlog::Backlog::new(store),
        Err(e) => {
            shared.fail(format!("shard {id}: cannot open the cold store of the offline backlog: {e}"));
            return None;
        }
    };
    // Each shard its own copy: nothing shared between cores changes at runtime.
    let shard = Shard::new(
        shared.shards,
        Rc::new((*cfg).clone()),
        Rc::new((*shared.clients).clone()),
        crate::shard::Stores { journal, index: recovered.index, feed, backlog },
        mesh,
    );
    if let Err(e) = shard.settle_recovered_restores().await {
        shared.fail(format!("shard {id}: cold store: {e}"));
        return None;
    }
    if shard.backlog().cold() > 0 {
        tracing::info!(
            shard = id,
            cold = shard.backlog().cold(),
            "offline backlog: messages in the cold store (estimate)"
        );
    }
    shard.install_config(crate::mesh_msg::ConfigUpdate::Commit { version: shared.config_version });
    // Free space is known before the first request (a restart on a full disk).
    shard.check_disk_room();
    glommio::spawn_local(shard.clone().run_maintenance()).detach();
    glommio::spawn_local(crate::backlog::run_spill(shard.clone())).detach();
    for (_peer, rx) in receivers {
        glommio::spawn_local(crate::dispatch::run_receiver(shard.clone(), rx)).detach();
    }
    let watcher = shard.clone();
    glommio::spawn_local(async move { watcher.shutdown().watch(signal).await }).detach();
    Some(shard)
}

/// Binds this shard's business and mobile listeners (SO_REUSEPORT).
fn bind_listeners(shared: &Shared, id: usize) -> Option<(TcpListener, TcpListener)> {
    let bind = |addr: SocketAddr, what: &str| match TcpListener::bind(addr) {
        Ok(l) => Some(l),
        Err(e) => {
            shared.fail(format!("shard {id}: cannot bind {what} listener {addr}: {e}"));
            None
        }
    };
    let business = bind(shared.business_addr, "business");
    let mobile = bind(shared.mobile_addr, "mobile");
    Some((business?, mobile?))
}

/// After the accept loops stopped: let every connection and session finish
/// (they hold passes of the shard's gate), wait for the other shards (they
/// may still forward appends here), and flush the journal. Each wait has a
/// bound.
async fn drain_and_stop(shared: &Shared, shard: &Shard) {
    let id = shard.id();
    // Not ready from the moment shutdown began: load balancers stop sending.
    shared.ready.store(false, Ordering::Release);
    if !shard.shutdown().drain(DRAIN_TIMEOUT).await {
        tracing::warn!(
            shard = id,
            connections = shard.stats().connections.get(),
            sessions = shard.sessions().len(),
            "drain timed out; closing with connections still open"
        );
    }
    if !shared.barrier(&shared.drained, false, DRAINED_BARRIER_TIMEOUT).await {
        tracing::warn!(shard = id, "not every shard drained in time; flushing the journal anyway");
    }
    if let Err(e) = shard.journal().close().await {
        shared.fail(format!("shard {id}: final journal flush failed: {e}"));
    }
    tracing::info!(shard = id, accepted = shard.stats().accepted.get(), "shard stopped");
}
