//! Test harness: start the real `esh3ar` binary on ephemeral ports with a
//! private data dir, and talk to it over real sockets.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const API_KEY: &str = "acme-key-0123456789abcdef";
pub const OTHER_KEY: &str = "other-key-0123456789abcdef";
pub const ADMIN_TOKEN: &str = "admin-token-0123456789abcdef";
pub const TOKEN_SECRET: &str = "test-secret-0123456789abcdef0123456789";

/// Engine settings a test may change.
#[derive(Clone)]
pub struct Opts {
    pub shards: usize,
    pub segment_bytes: u64,
    pub max_body_bytes: usize,
    pub request_timeout_ms: u64,
    pub extra_engine: String,
    pub extra_mobile: String,
    /// Appended to the config (extra `[tiers.*]`, `[[clients]]`).
    pub extra_toml: String,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            shards: 2,
            segment_bytes: 1 << 20,
            max_body_bytes: 65536,
            request_timeout_ms: 10_000,
            extra_engine: String::new(),
            extra_mobile: String::new(),
            extra_toml: String::new(),
        }
    }
}

/// Writes a config for `data_dir` into `dir/engine.toml`.
pub fn write_config(dir: &Path, data_dir: &Path, o: &Opts) -> PathBuf {
    let text = format!(
        r#"
[engine]
shards = {shards}
data_dir = "{data}"
segment_bytes = {seg}
{extra}
[business]
listen = "127.0.0.1:0"
max_body_bytes = {body}
request_timeout_ms = {rt}

[mobile]
listen = "127.0.0.1:0"
token_secret = "{secret}"
{extra_mobile}

[admin]
listen = "127.0.0.1:0"
token = "{admin_token}"

[tiers.basic]
messages_per_minute = 1000000

[[clients]]
id = "acme"
api_key = "{key}"
tier = "basic"

[[clients]]
id = "other"
api_key = "{other}"
tier = "basic"
{extra_toml}
"#,
        shards = o.shards,
        data = data_dir.display(),
        seg = o.segment_bytes,
        extra = o.extra_engine,
        extra_mobile = o.extra_mobile,
        extra_toml = o.extra_toml,
        body = o.max_body_bytes,
        rt = o.request_timeout_ms,
        secret = TOKEN_SECRET,
        admin_token = ADMIN_TOKEN,
        key = API_KEY,
        other = OTHER_KEY,
    );
    let path = dir.join("engine.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// A running engine. Killed (SIGKILL) on drop.
pub struct Engine {
    pub child: Child,
    pub business: SocketAddr,
    pub mobile: SocketAddr,
    pub admin: SocketAddr,
    pub config: PathBuf,
    pub stderr: mpsc::Receiver<String>,
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_esh3ar")
}

impl Engine {
    /// Starts the engine on `config` and waits for its ready line.
    pub fn start(config: &Path) -> Engine {
        Self::try_start(config).unwrap_or_else(|e| panic!("engine did not start: {e}"))
    }

    /// Starts the engine; Err(stderr) if it exits before becoming ready.
    pub fn try_start(config: &Path) -> Result<Engine, String> {
        Self::try_start_with_env(config, &[])
    }

    /// Starts the engine with extra environment variables (test hooks).
    pub fn try_start_with_env(config: &Path, env: &[(&str, &str)]) -> Result<Engine, String> {
        Self::try_start_with(config, |cmd| {
            cmd.envs(env.iter().copied());
        })
    }

    /// Starts the engine after `customize` adjusted its command.
    pub fn try_start_with(config: &Path, customize: impl FnOnce(&mut Command)) -> Result<Engine, String> {
        let mut cmd = Command::new(bin());
        customize(&mut cmd);
        let mut child = cmd
            .args(["serve", "--config"])
            .arg(config)
            .env("ESH3AR_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn esh3ar");
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (err_tx, err_rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = err_tx.send(line);
            }
        });
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut admin = None;
        loop {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(line) => {
                    if let Some(a) = line.strip_prefix("esh3ar admin=") {
                        admin = Some(a.parse().unwrap());
                    }
                    if let Some(rest) = line.strip_prefix("esh3ar ready ") {
                        let field = |name: &str| -> SocketAddr {
                            rest.split_whitespace().find_map(|kv| kv.strip_prefix(name)).unwrap().parse().unwrap()
                        };
                        return Ok(Engine {
                            child,
                            business: field("business="),
                            mobile: field("mobile="),
                            admin: admin.expect("admin line before ready line"),
                            config: config.to_owned(),
                            stderr: err_rx,
                        });
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {}
            }
            if let Ok(Some(status)) = child.try_wait() {
                std::thread::sleep(Duration::from_millis(100));
                let err: Vec<String> = err_rx.try_iter().collect();
                return Err(format!("exited with {status}: {}", err.join("\n")));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return Err("no ready line within 30 s".into());
            }
        }
    }

    /// Waits up to `wait` for the process to exit on its own.
    pub fn wait_exit(&mut self, wait: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + wait;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// SIGKILL, now.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait for exit; returns the exit code.
    pub fn terminate(mut self) -> Option<i32> {
        unsafe_kill(self.child.id(), 15);
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code();
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn client(&self) -> Client {
        Client::connect(self.business)
    }

    /// The lines the engine wrote to stderr since the last call (each line
    /// is taken off the pipe once).
    pub fn stderr_lines(&self) -> Vec<String> {
        self.stderr.try_iter().collect()
    }

    /// Reads the engine's stderr until a line satisfies `want` (returned),
    /// or `timeout` passes (Err with every line read meanwhile). The engine
    /// logs before it answers, but the pipe's reader thread may lag.
    pub fn wait_for_stderr(&self, timeout: Duration, want: impl Fn(&str) -> bool) -> Result<String, Vec<String>> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        while let Ok(line) = self.stderr.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            if want(&line) {
                return Ok(line);
            }
            seen.push(line);
        }
        Err(seen)
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn unsafe_kill(pid: u32, sig: i32) {
    let _ = Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status();
}

/// A parsed HTTP response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    pub fn error_code(&self) -> String {
        self.json()["error"]["code"].as_str().unwrap_or_default().to_owned()
    }
}

/// A keep-alive HTTP/1.1 client over one TCP connection.
pub struct Client {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        stream.set_nodelay(true).unwrap();
        Client { stream, buf: Vec::new() }
    }

    /// A client over an already connected stream.
    pub fn from_stream(stream: TcpStream) -> Client {
        Client { stream, buf: Vec::new() }
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write");
    }

    /// Builds a request with the given auth and JSON body.
    pub fn request_bytes(method: &str, path: &str, key: Option<&str>, body: Option<&str>) -> Vec<u8> {
        let mut r = format!("{method} {path} HTTP/1.1\r\nHost: test\r\n");
        if let Some(k) = key {
            r += &format!("Authorization: Bearer {k}\r\n");
        }
        if let Some(b) = body {
            r += &format!("Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}", b.len());
        } else {
            r += "\r\n";
        }
        r.into_bytes()
    }

    pub fn request(&mut self, method: &str, path: &str, key: Option<&str>, body: Option<&str>) -> Response {
        let req = Self::request_bytes(method, path, key, body);
        self.send_raw(&req);
        self.read_response().expect("response")
    }

    /// POST /v1/messages with the test client's key.
    pub fn send(&mut self, to: &str, body: &str) -> Response {
        let json = serde_json::json!({"to": to, "body": body}).to_string();
        self.request("POST", "/v1/messages", Some(API_KEY), Some(&json))
    }

    pub fn get_status(&mut self, id: &str) -> Response {
        self.request("GET", &format!("/v1/messages/{id}"), Some(API_KEY), None)
    }

    /// Reads one response; Err on EOF or timeout.
    pub fn read_response(&mut self) -> Result<Response, String> {
        loop {
            if let Some(r) = self.try_parse()? {
                return Ok(r);
            }
            let mut chunk = [0u8; 16384];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err("connection closed".into()),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) => return Err(format!("read: {e}")),
            }
        }
    }

    fn try_parse(&mut self) -> Result<Option<Response>, String> {
        let Some(head_end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            return Ok(None);
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).to_string();
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status: u16 = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or(format!("bad status line {status_line:?}"))?;
        let headers: Vec<(String, String)> =
            lines.filter_map(|l| l.split_once(':').map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))).collect();
        let len: usize = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0);
        let total = head_end + 4 + len;
        if self.buf.len() < total {
            return Ok(None);
        }
        let body = self.buf[head_end + 4..total].to_vec();
        self.buf.drain(..total);
        Ok(Some(Response { status, headers, body }))
    }

    /// True if the server closed the connection (EOF) within `wait`.
    pub fn is_closed_within(&mut self, wait: Duration) -> bool {
        self.stream.set_read_timeout(Some(wait)).unwrap();
        let mut b = [0u8; 1024];
        let closed = loop {
            match self.stream.read(&mut b) {
                Ok(0) => break true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {
                    break false
                }
                Err(_) => break true,
            }
        };
        self.stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        closed
    }
}

/// Runs `esh3ar <args>` to completion; returns (exit code, stdout, stderr).
pub fn run_cli(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin()).args(args).output().expect("run esh3ar");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A temp dir with a config; the data dir is `dir/data`.
pub struct Setup {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
}

impl Setup {
    pub fn new(o: &Opts) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let config = write_config(dir.path(), &data, o);
        Setup { dir, config }
    }
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }
    pub fn start(&self) -> Engine {
        Engine::start(&self.config)
    }
}

/// A mobile token for `user`, minted by the real CLI.
pub fn token(config: &Path, user: &str, ttl: u64) -> String {
    let (code, out, err) =
        run_cli(&["token", "--config", config.to_str().unwrap(), "--user", user, "--ttl", &ttl.to_string()]);
    assert_eq!(code, 0, "token: {err}");
    out.trim().to_owned()
}

pub type Ws = tungstenite::WebSocket<TcpStream>;

/// A phone: a WebSocket client connected as one user.
pub struct Phone {
    pub ws: Ws,
}

/// Why a connect failed: the HTTP status and body the server answered.
#[derive(Debug)]
pub struct Refused {
    pub status: u16,
    pub body: String,
}

impl Phone {
    /// Connects with `Authorization: Bearer <token>`.
    pub fn connect(addr: SocketAddr, token: &str) -> Result<Phone, Refused> {
        Self::connect_to(addr, "/v1/connect", Some(token))
    }

    /// Connects to `path` (which may carry `?token=`), with an optional bearer token.
    pub fn connect_to(addr: SocketAddr, path: &str, bearer: Option<&str>) -> Result<Phone, Refused> {
        use tungstenite::client::IntoClientRequest;
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        stream.set_nodelay(true).unwrap();
        let mut req = format!("ws://{addr}{path}").into_client_request().unwrap();
        if let Some(t) = bearer {
            req.headers_mut().insert("Authorization", format!("Bearer {t}").parse().unwrap());
        }
        match tungstenite::client::client(req, stream) {
            Ok((ws, _)) => Ok(Phone { ws }),
            Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(resp))) => Err(Refused {
                status: resp.status().as_u16(),
                body: String::from_utf8_lossy(resp.body().as_deref().unwrap_or(&[])).into_owned(),
            }),
            Err(e) => panic!("handshake failed: {e}"),
        }
    }

    /// The next message frame within `wait` (pings answered, skipped).
    pub fn recv(&mut self, wait: Duration) -> Option<serde_json::Value> {
        self.ws.get_mut().set_read_timeout(Some(wait)).unwrap();
        loop {
            match self.ws.read() {
                Ok(tungstenite::Message::Text(t)) => {
                    return Some(serde_json::from_str(&t).expect("server frame is JSON"))
                }
                Ok(tungstenite::Message::Close(_)) => return None,
                Ok(_) => continue,
                Err(tungstenite::Error::Io(e))
                    if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    return None
                }
                Err(_) => return None,
            }
        }
    }

    /// Receives `n` messages (each within `wait`), panicking if fewer come.
    pub fn recv_n(&mut self, n: usize, wait: Duration) -> Vec<serde_json::Value> {
        (0..n).map(|i| self.recv(wait).unwrap_or_else(|| panic!("only {i} of {n} messages arrived"))).collect()
    }

    pub fn ack(&mut self, id: &str) {
        self.send_text(&serde_json::json!({"type": "ack", "id": id}).to_string());
    }

    pub fn ack_many(&mut self, ids: &[String]) {
        self.send_text(&serde_json::json!({"type": "ack", "ids": ids}).to_string());
    }

    pub fn send_text(&mut self, text: &str) {
        self.ws.send(tungstenite::Message::Text(text.to_owned())).expect("ws send");
    }

    /// Reads until the server closes; returns its close code.
    pub fn close_code(&mut self, wait: Duration) -> Option<u16> {
        self.ws.get_mut().set_read_timeout(Some(wait)).unwrap();
        loop {
            match self.ws.read() {
                Ok(tungstenite::Message::Close(f)) => return f.map(|f| u16::from(f.code)),
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
    }
}

/// Raises this process's soft open-files limit to its hard limit (children
/// inherit it); returns the new soft limit.
pub fn raise_nofile_limit() -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit on a valid, owned struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    lim.rlim_cur
}

/// The sum over shards of a metric from the admin listener's `GET /metrics`
/// (0 if absent).
pub fn metric(admin: SocketAddr, name: &str) -> f64 {
    let mut s = TcpStream::connect(admin).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Samples a process's RSS every 20 ms on a thread until [`RssSampler::stop`],
/// which returns the highest.
pub struct RssSampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    max: std::sync::Arc<std::sync::atomic::AtomicU64>,
    thread: std::thread::JoinHandle<()>,
}

impl RssSampler {
    pub fn start(pid: u32) -> RssSampler {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let max = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let thread = {
            let (stop, max) = (stop.clone(), max.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Some(rss) = rss_bytes(pid) {
                        max.fetch_max(rss, Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        };
        RssSampler { stop, max, thread }
    }

    /// Stops sampling; the highest RSS seen, in bytes.
    pub fn stop(self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap();
        self.max.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Resident set size of a process, in bytes (from /proc).
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
pub mod crash;
pub mod webhook;
