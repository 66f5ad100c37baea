//! Runtime bootstrap: one glommio executor per shard, the channel mesh,
//! recovery, the listeners, and graceful shutdown.
//!
//! Startup order per shard: join the mesh (which fixes the shard id),
//! recover the journal, wait until every shard recovered, bind the
//! listeners (SO_REUSEPORT: the kernel spreads connections), wait until all
//! are bound, then serve. Listeners open only after recovery, so a client
//! can never see a shard that has not rebuilt its index.

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
use esh3ar_shards::journal::{Journal, JournalConfig};
use esh3ar_shards::recovery::{ensure_dir, recover_shard, write_file_durably, Mode};
use glommio::net::TcpListener;
use glommio::{LocalExecutorPoolBuilder, PoolPlacement};

use crate::admin::AdminConn;
use crate::business::BusinessConn;
use crate::clients::ClientTable;
use crate::config::Config;
use crate::http::conn::{serve, Limits};
use crate::http::write_error;
use crate::shard::{MeshMsg, PendingReplies, Shard, ShardStats};
use crate::shutdown::{install_signal_flag, Shutdown};

/// How long the shard executors may take to come up.
const EXECUTOR_START_TIMEOUT: Duration = Duration::from_secs(20);

/// io_uring buffer memory per executor (glommio's default is 10 MiB).
const IO_MEMORY_BYTES: usize = 2 << 20;

/// How long shutdown waits for requests in flight.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// A point all shards must reach before any goes on.
#[derive(Default)]
struct Barrier {
    arrived: AtomicUsize,
}

/// Process-wide state shared by the shards: read-only, or atomics used
/// only at startup and shutdown (never on the message path).
struct Shared {
    cfg: Arc<Config>,
    clients: Arc<ClientTable>,
    shards: usize,
    business_addr: SocketAddr,
    mobile_addr: SocketAddr,
    signal: Arc<AtomicBool>,
    ready: Arc<AtomicBool>,
    failed: AtomicBool,
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
        self.errors.lock().expect("errors lock").push(msg);
        self.failed.store(true, Ordering::Release);
    }

    /// Waits until all shards arrived; false if startup failed meanwhile.
    async fn barrier(&self, b: &Barrier, abort_on_failure: bool) -> bool {
        b.arrived.fetch_add(1, Ordering::AcqRel);
        while b.arrived.load(Ordering::Acquire) < self.shards {
            if abort_on_failure && self.failed.load(Ordering::Acquire) {
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

/// Runs the engine until SIGTERM/SIGINT. Returns an error if it could not start.
pub fn run(cfg: Config) -> anyhow::Result<()> {
    let shards = cfg.shard_count();
    let _data_dir = DataDir::open(&cfg.engine.data_dir, shards)?;
    let listeners = cfg.listeners();
    let (business_addr, placeholder) =
        reserve_port(listeners.business).with_context(|| format!("cannot bind {}", listeners.business))?;
    let (mobile_addr, mobile_placeholder) =
        reserve_port(listeners.mobile).with_context(|| format!("cannot bind {}", listeners.mobile))?;
    let signal = install_signal_flag().context("cannot install signal handlers")?;
    let shared = Arc::new(Shared {
        clients: Arc::new(ClientTable::from_config(&cfg)),
        cfg: Arc::new(cfg),
        shards,
        business_addr,
        mobile_addr,
        signal,
        ready: Arc::new(AtomicBool::new(false)),
        failed: AtomicBool::new(false),
        errors: Mutex::new(Vec::new()),
        started: AtomicUsize::new(0),
        recovered: Barrier::default(),
        bound: Barrier::default(),
        drained: Barrier::default(),
    });
    tracing::info!(shards, data_dir = %shared.cfg.engine.data_dir.display(), "starting esh3ar");
    let seeds = Arc::new(Mutex::new(crate::mesh::build::<MeshMsg>(shards, shared.cfg.engine.mesh_channel_capacity)));
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let placement = if shards <= cpus {
        PoolPlacement::MaxSpread(shards, None)
    } else {
        // Known issue: with more shards than CPUs, an executor occasionally
        // never runs its first task when several engines start at once; the
        // start watchdog below turns that into a clear exit.
        tracing::warn!(
            shards,
            cpus,
            "more shards than CPUs: shards share cores (fine for a data dir moved to a smaller host, not for speed)"
        );
        PoolPlacement::Unbound(shards)
    };
    let pool_shared = shared.clone();
    let handles = LocalExecutorPoolBuilder::new(placement)
        .name("shard")
        // Registered io_uring buffers are pinned memory (RLIMIT_MEMLOCK);
        // journal writes need little of it.
        .io_memory(IO_MEMORY_BYTES)
        .on_all_shards(move || {
            let shared = pool_shared.clone();
            let seed = seeds.lock().expect("mesh seeds lock").pop();
            async move {
                match seed {
                    Some(seed) => shard_main(shared, seed).await,
                    None => shared.fail("more executors than mesh seeds".into()),
                }
            }
        })
        .map_err(|e| anyhow::anyhow!("cannot start the shard executors: {e}"))?;
    // An executor that fails to come up (io_uring setup refused, say) leaves
    // its peers waiting for it forever: detect that and stop with a reason.
    let deadline = Instant::now() + EXECUTOR_START_TIMEOUT;
    while shared.started.load(Ordering::Acquire) < shards {
        if shared.signal.load(Ordering::Relaxed) {
            // The shards that run cannot shut down cleanly without the missing
            // ones; nothing was accepted yet, so just stop.
            eprintln!("error: interrupted while the shard executors were starting");
            std::process::exit(1);
        }
        if Instant::now() > deadline {
            eprintln!(
                "error: only {} of {shards} shard executors started within {}s; io_uring setup probably failed \
                 (check `ulimit -l`, and that the kernel allows io_uring)",
                shared.started.load(Ordering::Acquire),
                EXECUTOR_START_TIMEOUT.as_secs()
            );
            std::process::exit(1);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
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
    let errors = shared.errors.lock().expect("errors lock");
    if !errors.is_empty() {
        bail!("{}", errors.join("\n"));
    }
    tracing::info!("esh3ar stopped cleanly");
    Ok(())
}

async fn shard_main(shared: Arc<Shared>, seed: crate::mesh::MeshSeed<MeshMsg>) {
    shared.started.fetch_add(1, Ordering::AcqRel);
    let seed_id = seed.id;
    tracing::debug!(shard = seed_id, "connecting the mesh");
    let (senders, receivers) = seed.connect().await;
    let id = senders.peer_id();
    tracing::debug!(shard = id, "mesh connected");
    let cfg = shared.cfg.clone();
    let ready = shared.ready.clone();
    let admin_shutdown = Rc::new(Shutdown::default());
    if id == 0 {
        // The admin listener answers /readyz (503) while recovery runs.
        match TcpListener::bind(cfg.listeners().admin) {
            Ok(l) => {
                let addr = l.local_addr().map(|a| a.to_string()).unwrap_or_default();
                println!("esh3ar admin={addr}");
                let s = admin_shutdown.clone();
                glommio::spawn_local(async move {
                    accept_loop(l, &s, Limits::admin(), None, move |_| AdminConn { ready: ready.clone() }).await
                })
                .detach();
            }
            Err(e) => shared.fail(format!("cannot bind admin listener {}: {e}", cfg.admin.listen)),
        }
    }
    let dir = shard_dir(&cfg.engine.data_dir, id);
    let started = Instant::now();
    let recovered = match ensure_dir(&dir)
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))
        .and_then(|()| recover_shard(&dir, id as u16, Mode::Repair).map_err(|e| e.to_string()))
    {
        Ok(r) => Some(r),
        Err(e) => {
            shared.fail(format!("shard {id}: {e}"));
            None
        }
    };
    if !shared.barrier(&shared.recovered, true).await {
        admin_shutdown.trigger();
        return;
    }
    let recovered = recovered.expect("recovery succeeded when the barrier passed");
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
        elapsed_ms = started.elapsed().as_millis() as u64,
        "journal recovered"
    );
    let journal_cfg = JournalConfig { dir, shard: id as u16, segment_bytes: cfg.engine.segment_bytes };
    tracing::debug!(shard = id, "probing the journal device");
    if let Err(e) = esh3ar_shards::journal::probe_device(&journal_cfg.dir).await {
        tracing::warn!(shard = id, error = %e, "could not probe the journal device for polled I/O");
    }
    tracing::debug!(shard = id, "opening the journal");
    let journal = match Journal::open(journal_cfg, &recovered) {
        Ok(j) => j,
        Err(e) => {
            shared.fail(format!("shard {id}: {e}"));
            admin_shutdown.trigger();
            return;
        }
    };
    glommio::spawn_local(journal.clone().run_committer()).detach();
    let shard = Rc::new(Shard {
        id,
        count: shared.shards,
        cfg: cfg.clone(),
        clients: shared.clients.clone(),
        journal,
        index: std::cell::RefCell::new(recovered.index),
        mesh: senders,
        replies: PendingReplies::default(),
        shutdown: Shutdown::default(),
        stats: ShardStats::default(),
        sessions: crate::delivery::Sessions::default(),
        bodies: std::cell::RefCell::new(crate::delivery::BodyCache::new(
            cfg.engine.body_cache_bytes.min(crate::pressure::shard_share_bytes(&cfg, shared.shards) / 4),
        )),
        limiter: std::cell::RefCell::new(esh3ar_shards::limiter::RateLimiter::new()),
        pressure: crate::pressure::Pressure::new(crate::pressure::shard_share_bytes(&cfg, shared.shards) / 2),
    });
    glommio::spawn_local(shard.clone().run_pressure_watch()).detach();
    glommio::spawn_local(shard.clone().run_maintenance()).detach();
    for (_peer, rx) in receivers {
        let shard = shard.clone();
        glommio::spawn_local(async move {
            while let Some(msg) = rx.recv().await {
                shard.on_mesh(msg);
            }
        })
        .detach();
    }
    {
        let shard = shard.clone();
        let flag = shared.signal.clone();
        glommio::spawn_local(async move { shard.shutdown.watch(flag).await }).detach();
    }
    tracing::debug!(shard = id, "binding listeners");
    let business = match TcpListener::bind(shared.business_addr) {
        Ok(l) => Some(l),
        Err(e) => {
            shared.fail(format!("shard {id}: cannot bind business listener {}: {e}", shared.business_addr));
            None
        }
    };
    let mobile = match TcpListener::bind(shared.mobile_addr) {
        Ok(l) => Some(l),
        Err(e) => {
            shared.fail(format!("shard {id}: cannot bind mobile listener {}: {e}", shared.mobile_addr));
            None
        }
    };
    tracing::debug!(shard = id, "listeners bound");
    if !shared.barrier(&shared.bound, true).await {
        admin_shutdown.trigger();
        return;
    }
    let business = business.expect("bound when the barrier passed");
    let mobile = mobile.expect("bound when the barrier passed");
    if id == 0 {
        println!(
            "esh3ar ready business={} mobile={} shards={}",
            shared.business_addr, shared.mobile_addr, shared.shards
        );
        shared.ready.store(true, Ordering::Release);
    }
    {
        let shard = shard.clone();
        glommio::spawn_local(async move { mobile_accept_loop(mobile, shard).await }).detach();
    }
    let limits = Limits::business(&cfg);
    let conn_shard = shard.clone();
    accept_loop(business, &shard.shutdown, limits, Some(&shard), move |_| BusinessConn::new(conn_shard.clone())).await;
    // Drain: requests in flight finish; idle connections already closed.
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    while (shard.stats.connections.get() > 0 || !shard.sessions.is_empty()) && Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(5)).await;
    }
    shared.ready.store(false, Ordering::Release);
    // Other shards may still forward appends here until they drained too.
    shared.barrier(&shared.drained, false).await;
    if let Err(e) = shard.journal.close().await {
        shared.fail(format!("shard {id}: final journal flush failed: {e}"));
    }
    admin_shutdown.trigger();
    tracing::info!(shard = id, accepted = shard.stats.accepted.get(), "shard stopped");
}

impl Limits {
    fn business(cfg: &Config) -> Limits {
        Limits {
            body_bytes_max: cfg.business.max_body_bytes,
            request_timeout: Duration::from_millis(cfg.business.request_timeout_ms),
            idle_timeout: Duration::from_millis(cfg.business.idle_timeout_ms),
        }
    }
    fn admin() -> Limits {
        Limits { body_bytes_max: 1024, request_timeout: Duration::from_secs(10), idle_timeout: Duration::from_secs(60) }
    }
}

/// Accepts connections until shutdown, serving each in its own task.
async fn accept_loop<H, F>(
    listener: TcpListener,
    shutdown: &Shutdown,
    limits: Limits,
    shard: Option<&Rc<Shard>>,
    mut make: F,
) where
    H: crate::http::conn::Handler + 'static,
    F: FnMut(&glommio::net::TcpStream) -> H,
{
    let max = shard.map_or(1024, |s| s.cfg.engine.connections_per_shard_max as u64);
    let open = Rc::new(std::cell::Cell::new(0u64));
    loop {
        let accepted = futures_lite::future::or(async { Some(listener.accept().await) }, async {
            shutdown.wait().await;
            None
        })
        .await;
        let stream = match accepted {
            None => break,
            Some(Ok(s)) => s,
            Some(Err(e)) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                glommio::timer::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        if open.get() >= max {
            let mut out = Vec::new();
            write_error(&mut out, 503, "too_many_connections", "connection limit reached", "retry-after: 1\r\n", false);
            glommio::spawn_local(async move {
                use futures_lite::AsyncWriteExt;
                let mut s = stream;
                let _ = s.write_all(&out).await;
            })
            .detach();
            continue;
        }
        let mut handler = make(&stream);
        let guard = ConnGuard::new(open.clone(), shard.cloned());
        let shutdown_ptr: Rc<Shard>;
        let task = match shard {
            Some(s) => {
                shutdown_ptr = s.clone();
                glommio::spawn_local(async move {
                    serve(stream, limits, &mut handler, &shutdown_ptr.shutdown, Some(&shutdown_ptr.pressure)).await;
                    drop(guard);
                })
            }
            None => {
                let never = Rc::new(Shutdown::default());
                glommio::spawn_local(async move {
                    serve(stream, limits, &mut handler, &never, None).await;
                    drop(guard);
                })
            }
        };
        task.detach();
    }
}

/// Accepts mobile connections until shutdown; each upgrade request is
/// checked here and the session handed to the user's home shard.
async fn mobile_accept_loop(listener: TcpListener, shard: Rc<Shard>) {
    let max = shard.cfg.engine.connections_per_shard_max;
    loop {
        let accepted = futures_lite::future::or(async { Some(listener.accept().await) }, async {
            shard.shutdown.wait().await;
            None
        })
        .await;
        match accepted {
            None => return,
            Some(Ok(stream)) => {
                if shard.sessions.len() >= max {
                    drop(stream); // over the limit: refuse fast, the client retries elsewhere or later
                    continue;
                }
                glommio::spawn_local(crate::mobile::serve_conn(shard.clone(), stream)).detach();
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "mobile accept failed");
                glommio::timer::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Counts a connection for the limit and for the shutdown drain.
struct ConnGuard {
    open: Rc<std::cell::Cell<u64>>,
    shard: Option<Rc<Shard>>,
}

impl ConnGuard {
    fn new(open: Rc<std::cell::Cell<u64>>, shard: Option<Rc<Shard>>) -> Self {
        open.set(open.get() + 1);
        if let Some(s) = &shard {
            s.stats.connections.set(s.stats.connections.get() + 1);
        }
        Self { open, shard }
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.open.set(self.open.get() - 1);
        if let Some(s) = &self.shard {
            s.stats.connections.set(s.stats.connections.get() - 1);
        }
    }
}
