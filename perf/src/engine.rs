//! The systems under test as the generator sees them: where to connect and
//! how to authenticate. Also starts an esh3ar engine (or the ceiling server)
//! as a child process on free ports with a private data dir, and reads its
//! memory and CPU placement from /proc.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// API key of the benchmark client in configs the harness writes.
pub const BENCH_API_KEY: &str = "esh3ar-perf-key-0123456789abcdef";
/// Mobile token secret in configs the harness writes.
pub const BENCH_TOKEN_SECRET: &str = "esh3ar-perf-secret-0123456789abcdef0123456789";

/// What the generator talks to.
#[derive(Debug, Clone)]
pub enum Target {
    Esh3ar {
        business: SocketAddr,
        mobile: SocketAddr,
        api_key: String,
        token_secret: String,
        /// How the receivers speak to the mobile listener.
        mobile_protocol: crate::ws::MobileProtocol,
    },
    /// The bare HTTP server: same requests as esh3ar, no work.
    Ceiling {
        addr: SocketAddr,
    },
    Redis {
        addr: SocketAddr,
    },
    Nats {
        addr: SocketAddr,
    },
    Rabbitmq {
        addr: SocketAddr,
        user: String,
        password: String,
    },
}

impl Target {
    pub fn system(&self) -> &'static str {
        match self {
            Target::Esh3ar { .. } => "esh3ar",
            Target::Ceiling { .. } => "ceiling",
            Target::Redis { .. } => "redis",
            Target::Nats { .. } => "nats",
            Target::Rabbitmq { .. } => "rabbitmq",
        }
    }
}

/// A mobile token (JWT HS256, `sub` = user), as `esh3ar token` mints it.
pub fn mint_token(secret: &str, user: &str, ttl_s: u64) -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let header = B64.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let claims = serde_json::json!({"sub": user, "exp": now + ttl_s, "iat": now}).to_string();
    let input = format!("{header}.{}", B64.encode(claims));
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(input.as_bytes());
    format!("{input}.{}", B64.encode(mac.finalize().into_bytes()))
}

/// A server the harness started. SIGTERM, then SIGKILL, on drop.
pub struct Spawned {
    pub child: Child,
    pub ready_line: String,
    /// The stdout lines before the ready line (esh3ar prints `admin=` there).
    pub early_lines: Vec<String>,
    /// Keeps the private data dir until the server is gone.
    pub dir: Option<tempfile::TempDir>,
}

impl Spawned {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops the server: SIGTERM, wait up to 30 s, then SIGKILL.
    pub fn stop(&mut self) {
        // SAFETY: sending a signal to our own child; no memory involved.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        for _ in 0..300 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
    }
}

/// How long a started server may stay silent before its ready line.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `cmd` and waits for a stdout line starting with `ready_prefix`,
/// failing if no line comes for `silence_max` (a replay of a large journal
/// prints nothing until it is done).
pub fn spawn_until_ready(mut cmd: Command, ready_prefix: &str, silence_max: Duration) -> anyhow::Result<Spawned> {
    // stderr as the caller left it (inherited unless it was redirected).
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).spawn()?;
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let prefix = ready_prefix.to_owned();
    let mut early_lines = Vec::new();
    loop {
        match rx.recv_timeout(silence_max) {
            Ok(line) if line.starts_with(&prefix) => {
                // Keep draining stdout so the child never blocks on it.
                std::thread::spawn(move || while rx.recv().is_ok() {});
                return Ok(Spawned { child, ready_line: line, early_lines, dir: None });
            }
            Ok(line) => early_lines.push(line),
            Err(_) => {
                let _ = child.kill();
                let status = child.wait().ok();
                bail!("no `{prefix}` line from the server (exit status {status:?})");
            }
        }
    }
}

/// The value of `name=` in a ready line.
pub fn ready_field(line: &str, name: &str) -> Option<String> {
    line.split_whitespace().find_map(|kv| kv.strip_prefix(name)?.strip_prefix('=')).map(str::to_owned)
}

/// `memory_limit_bytes` of a started engine unless told otherwise: ingest
/// runs queue messages for users who never connect, so room for a few
/// million pending messages before the engine sheds load.
pub const DEFAULT_MEMORY_LIMIT: u64 = 4 << 30;

/// The admin token in configs the harness writes.
pub const BENCH_ADMIN_TOKEN: &str = "perf-harness-admin-token";

/// A WhatsApp provider for a started engine (the fallback scenario): the
/// benchmark client's messages fall back to it at once.
#[derive(Debug, Clone)]
pub struct WhatsAppProvider {
    /// `base_url` (the fake provider in the harness).
    pub base_url: String,
    /// `max_in_flight` of `[providers.whatsapp]`.
    pub max_in_flight: usize,
    /// `[webhooks] max_in_flight_per_endpoint` when set: the offload
    /// thread's idle connection pool per host (provider calls included).
    pub webhooks_max_in_flight: Option<usize>,
}

/// Writes a config for an engine on free loopback ports, one benchmark
/// client without a practical rate limit, and `memory_limit` bytes.
pub fn write_engine_config(
    dir: &Path,
    shards: usize,
    memory_limit: u64,
    webhook_url: Option<&str>,
    whatsapp: Option<&WhatsAppProvider>,
) -> anyhow::Result<PathBuf> {
    let data = dir.join("data");
    let mut webhook = webhook_url.map_or_else(String::new, |url| {
        format!("webhook_url = \"{url}\"\nwebhook_secret = \"{}\"\n", crate::receipts::BENCH_WEBHOOK_SECRET)
    });
    let mut providers = String::new();
    if let Some(w) = whatsapp {
        webhook.push_str("fallback_after_seconds = 0\nfallback_channels = [\"whatsapp\"]\n");
        providers = format!(
            r#"[providers.whatsapp]
kind = "whatsapp_cloud"
base_url = "{url}"
phone_number_id = "{id}"
access_token = "{token}"
timeout_ms = 10000
max_in_flight = {in_flight}

"#,
            url = w.base_url,
            id = crate::fallback::PHONE_NUMBER_ID,
            token = crate::fallback::ACCESS_TOKEN,
            in_flight = w.max_in_flight,
        );
        if let Some(n) = w.webhooks_max_in_flight {
            providers.push_str(&format!("[webhooks]\nmax_in_flight_per_endpoint = {n}\n\n"));
        }
    }
    let text = format!(
        r#"# Written by esh3ar-perf.
[engine]
shards = {shards}
data_dir = "{data}"
connections_per_shard_max = 30000
memory_limit_bytes = {memory_limit}

[business]
listen = "127.0.0.1:0"

[mobile]
listen = "127.0.0.1:0"
token_secret = "{secret}"

[admin]
listen = "127.0.0.1:0"
token = "{admin}"

[tiers.bench]
messages_per_minute = 1000000000

{providers}[[clients]]
id = "bench"
api_key = "{key}"
tier = "bench"
{webhook}"#,
        data = data.display(),
        secret = BENCH_TOKEN_SECRET,
        key = BENCH_API_KEY,
        admin = BENCH_ADMIN_TOKEN,
    );
    let path = dir.join("engine.toml");
    std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

/// Starts `esh3ar serve` with a fresh data dir under `parent` (the system
/// temp dir when None) and returns it with its target.
pub fn spawn_engine(
    bin: &Path,
    shards: usize,
    parent: Option<&Path>,
    memory_limit: u64,
    webhook_url: Option<&str>,
    whatsapp: Option<&WhatsAppProvider>,
) -> anyhow::Result<(Spawned, Target)> {
    let dir = match parent {
        Some(p) => tempfile::Builder::new().prefix("esh3ar-perf-").tempdir_in(p),
        None => tempfile::Builder::new().prefix("esh3ar-perf-").tempdir(),
    }
    .context("cannot create a data dir")?;
    let config = write_engine_config(dir.path(), shards, memory_limit, webhook_url, whatsapp)?;
    let (mut spawned, target) = start_engine(bin, &config, START_TIMEOUT)?;
    spawned.dir = Some(dir);
    Ok((spawned, target))
}

/// Starts `esh3ar serve --config config` (a config [`write_engine_config`]
/// wrote: its data dir is reused, so this is also a restart) and waits for
/// its ready line, for at most `ready_within` after its last output line.
/// The caller keeps the config's directory alive.
pub fn start_engine(bin: &Path, config: &Path, ready_within: Duration) -> anyhow::Result<(Spawned, Target)> {
    start_engine_with(engine_command(bin, config), ready_within)
        .with_context(|| format!("cannot start the engine {}", bin.display()))
}

/// The command [`start_engine`] runs: `esh3ar serve --config config`,
/// logging warnings and errors to the harness's stderr. A caller may
/// change it (the log filter, where stderr goes) and start it with
/// [`start_engine_with`].
pub fn engine_command(bin: &Path, config: &Path) -> Command {
    let mut cmd = Command::new(bin);
    cmd.args(["serve", "--config"]).arg(config).env("ESH3AR_LOG", "warn");
    cmd
}

/// Starts an [`engine_command`] and waits for its ready line (see [`start_engine`]).
pub fn start_engine_with(cmd: Command, ready_within: Duration) -> anyhow::Result<(Spawned, Target)> {
    let spawned = spawn_until_ready(cmd, "esh3ar ready ", ready_within)?;
    let line = spawned.ready_line.clone();
    let addr = |name: &str| -> anyhow::Result<SocketAddr> {
        ready_field(&line, name)
            .and_then(|a| a.parse().ok())
            .with_context(|| format!("no {name}= in the ready line `{line}`"))
    };
    let target = Target::Esh3ar {
        business: addr("business")?,
        mobile: addr("mobile")?,
        api_key: BENCH_API_KEY.to_owned(),
        token_secret: BENCH_TOKEN_SECRET.to_owned(),
        mobile_protocol: crate::ws::MobileProtocol::Raw,
    };
    Ok((spawned, target))
}

impl Spawned {
    /// Kills the server with SIGKILL, as a crash would, and reaps it. The
    /// data dir stays (it is dropped with `self`).
    pub fn kill_hard(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The config [`spawn_engine`] wrote for this server, if it did.
    pub fn config_path(&self) -> Option<PathBuf> {
        self.dir.as_ref().map(|d| d.path().join("engine.toml"))
    }

    /// The data dir of the config [`spawn_engine`] wrote, if it did.
    pub fn data_path(&self) -> Option<PathBuf> {
        self.dir.as_ref().map(|d| d.path().join("data"))
    }

    /// The admin listener of a started esh3ar (its `esh3ar admin=` line).
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.early_lines
            .iter()
            .filter(|l| l.starts_with("esh3ar admin="))
            .find_map(|l| ready_field(l, "admin")?.parse().ok())
    }
}

/// Waits until `admin` answers `200` on `/readyz` (a restarted engine
/// replaying its journal answers `503` first); fails once `timeout` has
/// passed since `since`.
pub fn wait_ready(admin: SocketAddr, since: std::time::Instant, timeout: Duration) -> anyhow::Result<()> {
    while readyz_status(admin) != Some(200) {
        if since.elapsed() > timeout {
            anyhow::bail!("the engine did not answer 200 on /readyz within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// The status of `GET /readyz` on an admin listener (`200` once every shard
/// recovered its journal and listens), or None if it did not answer
/// within a second.
pub fn readyz_status(admin: SocketAddr) -> Option<u16> {
    use std::io::{Read as _, Write as _};
    let timeout = Duration::from_secs(1);
    let mut s = std::net::TcpStream::connect_timeout(&admin, timeout).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    s.write_all(b"GET /readyz HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").ok()?;
    let mut buf = [0u8; 512];
    let mut end = 0;
    while end < buf.len() {
        match s.read(&mut buf[end..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => end += n,
        }
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let mut resp = httparse::Response::new(&mut headers);
        if let Ok(httparse::Status::Complete(_)) = resp.parse(&buf[..end]) {
            return resp.code;
        }
    }
    None
}

/// The `esh3ar` binary next to this executable (cargo puts workspace
/// binaries together), or `esh3ar` from PATH.
pub fn default_engine_bin() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("esh3ar")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("esh3ar"))
}

/// Resident memory of a process, in bytes (VmRSS).
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.split_whitespace().next()?.parse().ok()?;
    Some(kib * 1024)
}

/// The CPUs the threads of `pid` named `prefix*` may run on (glommio pins
/// each shard), as a sorted list; all threads' when none is so named.
pub fn thread_cpus(pid: u32, prefix: &str) -> Vec<usize> {
    let mut named = Vec::new();
    let mut all = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    for task in tasks.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        let Some(list) = status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")) else { continue };
        let cpus = parse_cpu_list(list.trim()).unwrap_or_default();
        if comm.trim().starts_with(prefix) {
            named.extend(cpus.iter().copied());
        }
        all.extend(cpus);
    }
    let mut cpus = if named.is_empty() { all } else { named };
    cpus.sort_unstable();
    cpus.dedup();
    cpus
}

/// Parses `0-2,5` into `[0, 1, 2, 5]`.
pub fn parse_cpu_list(s: &str) -> Result<Vec<usize>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || format!("bad CPU list `{s}`");
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
                out.extend(a..=b);
            }
            None => out.push(part.parse().map_err(|_| bad())?),
        }
    }
    Ok(out)
}

/// `[0, 1, 2, 5]` as `0,1,2,5`.
pub fn cpu_list_string(cpus: &[usize]) -> String {
    if cpus.is_empty() {
        return "any".to_owned();
    }
    cpus.iter().map(usize::to_string).collect::<Vec<_>>().join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0-2,5").unwrap(), vec![0, 1, 2, 5]);
        assert_eq!(parse_cpu_list("1").unwrap(), vec![1]);
        assert!(parse_cpu_list("x").is_err());
        assert_eq!(cpu_list_string(&[0, 1]), "0,1");
    }

    #[test]
    fn ready_fields() {
        let l = "esh3ar ready business=127.0.0.1:1 mobile=127.0.0.1:2 shards=1";
        assert_eq!(ready_field(l, "mobile").as_deref(), Some("127.0.0.1:2"));
        assert_eq!(ready_field(l, "admin"), None);
    }

    #[test]
    fn token_shape() {
        let t = mint_token("secret-secret-secret-secret-secret-00", "u1", 60);
        assert_eq!(t.split('.').count(), 3);
    }

    #[test]
    fn own_rss_is_readable() {
        assert!(rss_bytes(std::process::id()).unwrap() > 0);
    }
}
