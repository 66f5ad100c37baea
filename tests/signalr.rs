//! SignalR compatibility (`/v1/hub`): the official `@microsoft/signalr`
//! client, in Node (`tests/signalr/client.js`, pinned by its
//! `package-lock.json`), against the real engine over real sockets; bad
//! hub input from a hand-written client; and the kill -9 end-to-end test
//! with half the phones on SignalR.
//!
//! Needs `node` and the client's npm packages: `scripts/test.sh` installs
//! both; this file runs `npm ci` itself when `node_modules` is missing and
//! fails (never skips) when `node` or `npm` is missing.

mod common;

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, Once};
use std::time::{Duration, Instant};

use common::crash::*;
use common::*;
use rand::SeedableRng;
use serde_json::{json, Value};

const RS: char = '\u{1e}';

fn node_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/signalr")
}

/// Installs the pinned client with `npm ci` once, if it is not there.
fn ensure_node_client() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let node = Command::new("node").arg("--version").output();
        assert!(
            node.is_ok_and(|o| o.status.success()),
            "`node` is required by the SignalR tests (scripts/test.sh installs nodejs and npm)"
        );
        if node_dir().join("node_modules/@microsoft/signalr").exists() {
            return;
        }
        let status = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(node_dir())
            .status()
            .expect("`npm` is required by the SignalR tests (scripts/test.sh installs it)");
        assert!(status.success(), "npm ci in tests/signalr failed");
    });
}

/// A phone on the official SignalR client: one `node client.js` process.
/// Its events (JSON lines) are kept in `log`, in order.
struct NodePhone {
    child: Child,
    stdin: ChildStdin,
    events: mpsc::Receiver<Value>,
    log: Vec<Value>,
}

impl NodePhone {
    fn spawn(url: &str, token: &str, env: &[(&str, &str)]) -> NodePhone {
        ensure_node_client();
        let mut child = Command::new("node")
            .arg(node_dir().join("client.js"))
            .env("HUB_URL", url)
            .env("HUB_TOKEN", token)
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn node");
        let stdout = child.stdout.take().unwrap();
        let stdin = child.stdin.take().unwrap();
        let (tx, events) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let v: Value = serde_json::from_str(&line).unwrap_or_else(|_| panic!("node printed {line}"));
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        NodePhone { child, stdin, events, log: Vec::new() }
    }

    /// Reads events until `done(log)` holds; panics after `wait`.
    fn wait_until(&mut self, wait: Duration, what: &str, done: impl Fn(&[Value]) -> bool) {
        let deadline = Instant::now() + wait;
        while !done(&self.log) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left.max(Duration::from_millis(1))) {
                Ok(v) => self.log.push(v),
                Err(_) => panic!("{what}: not within {wait:?}; events: {:#?}", self.log),
            }
        }
    }

    /// Waits for the first event named `name` after position `from` of the log.
    fn expect(&mut self, from: usize, name: &str, wait: Duration) -> Value {
        self.wait_until(wait, name, |log| log[from.min(log.len())..].iter().any(|e| e["event"] == name));
        self.log[from..].iter().find(|e| e["event"] == name).unwrap().clone()
    }

    /// `invoke(method, ...args)`; returns the `result` or `error` event.
    fn invoke(&mut self, method: &str, args: Value, wait: Duration) -> Value {
        let tag = format!("t{}", self.log.len());
        self.command(json!({"cmd": "invoke", "method": method, "args": args, "tag": tag}));
        self.wait_until(wait, method, |log| log.iter().any(|e| e["tag"] == tag.as_str()));
        self.log.iter().find(|e| e["tag"] == tag.as_str()).unwrap().clone()
    }

    fn command(&mut self, c: Value) {
        writeln!(self.stdin, "{c}").expect("node stdin");
    }

    /// Message ids received from position `from` of the log, in order.
    fn ids_from(&self, from: usize) -> Vec<String> {
        self.log[from..]
            .iter()
            .filter(|e| e["event"] == "message")
            .map(|e| e["message"]["id"].as_str().unwrap().to_owned())
            .collect()
    }
}

impl Drop for NodePhone {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free TCP port on 127.0.0.1 (the SignalR client reconnects to one URL,
/// so the restarted engine must listen where the first one did).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A setup whose mobile listener has a fixed port.
fn setup_on_fixed_port(o: &Opts) -> (Setup, u16) {
    let setup = Setup::new(o);
    let port = free_port();
    let text = std::fs::read_to_string(&setup.config).unwrap();
    let fixed =
        text.replacen("[mobile]\nlisten = \"127.0.0.1:0\"", &format!("[mobile]\nlisten = \"127.0.0.1:{port}\""), 1);
    assert_ne!(text, fixed, "the config template changed: cannot fix the mobile port");
    std::fs::write(&setup.config, fixed).unwrap();
    (setup, port)
}

fn hub_url(port: u16) -> String {
    format!("http://127.0.0.1:{port}/v1/hub")
}

fn send(c: &mut Client, to: &str, body: &str) -> String {
    let r = c.send(to, body);
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    r.json()["id"].as_str().unwrap().to_owned()
}

const WAIT: Duration = Duration::from_secs(15);

/// The official client: pending then live messages through
/// `on("ReceiveMessage")`, `invoke("Ack")` completes once journaled, the
/// hub methods Block/Unblock and an unknown method, and after a server
/// kill -9 `withAutomaticReconnect()` brings every unacked message back
/// (and no acked one).
#[test]
fn official_client_receives_acks_and_gets_every_unacked_message_after_kill_9() {
    let (setup, port) = setup_on_fixed_port(&Opts::default());
    let engine = setup.start();
    let mut c = engine.client();
    let pending: Vec<String> = (0..3).map(|i| send(&mut c, "sr-alice", &format!("pending {i}"))).collect();
    let tok = token(&setup.config, "sr-alice", 3600);
    let mut phone = NodePhone::spawn(&hub_url(port), &tok, &[]);
    phone.expect(0, "started", WAIT);
    phone.wait_until(WAIT, "3 pending messages", |log| log.iter().filter(|e| e["event"] == "message").count() >= 3);
    let live: Vec<String> = (0..2).map(|i| send(&mut c, "sr-alice", &format!("live {i}"))).collect();
    phone.wait_until(WAIT, "2 live messages", |log| log.iter().filter(|e| e["event"] == "message").count() >= 5);
    let all: Vec<String> = pending.iter().chain(&live).cloned().collect();
    assert_eq!(phone.ids_from(0), all, "pending first, then live, in acceptance order");
    // The argument is the raw frame's object.
    let first = phone.log.iter().find(|e| e["event"] == "message").unwrap()["message"].clone();
    assert_eq!(first["body"], "pending 0");
    assert_eq!(first["from"], "acme");
    assert_eq!(first["priority"], "normal");
    assert!(first["accepted_at"].as_u64().unwrap() > 0);

    // Ack two; the completion comes once the ack is journaled.
    for id in &pending[..2] {
        let r = phone.invoke("Ack", json!([id]), WAIT);
        assert_eq!(r["event"], "result", "{r}");
        assert_eq!(c.get_status(id).json()["status"], "acked");
    }
    // The other hub methods, and an unknown one that leaves the connection up.
    let r = phone.invoke("Block", json!(["other"]), WAIT);
    assert_eq!(r["result"], json!({"type": "blocked", "from": "other"}), "{r}");
    let r = phone.invoke("Unblock", json!(["other"]), WAIT);
    assert_eq!(r["result"], json!({"type": "unblocked", "from": "other"}), "{r}");
    let r = phone.invoke("Block", json!(["nobody"]), WAIT);
    assert!(r["error"].as_str().unwrap().contains("unknown_client"), "{r}");
    let r = phone.invoke("Frobnicate", json!([1]), WAIT);
    assert!(r["error"].as_str().unwrap().contains("Unknown hub method 'Frobnicate'"), "{r}");
    let r = phone.invoke("AckMany", json!([[]]), WAIT);
    assert_eq!(r["event"], "result", "the connection is still up: {r}");

    // kill -9; the client reconnects on its own to the restarted engine.
    engine.kill9();
    let mark = phone.log.len();
    phone.expect(mark, "reconnecting", WAIT);
    let engine = setup.start();
    phone.expect(mark, "reconnected", WAIT);
    let unacked: Vec<String> = all[2..].to_vec();
    phone.wait_until(WAIT, "the 3 unacked messages again", |log| {
        log[mark..].iter().filter(|e| e["event"] == "message").count() >= 3
    });
    std::thread::sleep(Duration::from_millis(300)); // anything more would show now
    while let Ok(v) = phone.events.try_recv() {
        phone.log.push(v);
    }
    assert_eq!(phone.ids_from(mark), unacked, "exactly the unacked ones, in order");
    let mut c = engine.client();
    for id in &unacked {
        assert_eq!(phone.invoke("Ack", json!([id]), WAIT)["event"], "result");
        assert_eq!(c.get_status(id).json()["status"], "acked");
    }
}

/// A bad token fails `start()` with the server's error: through negotiate
/// (HTTP 401 with the JSON error) and, skipping negotiation, through the
/// hub's handshake error.
#[test]
fn bad_token_fails_start_with_the_servers_error() {
    let (setup, port) = setup_on_fixed_port(&Opts::default());
    let _engine = setup.start();
    for skip in ["0", "1"] {
        let mut phone = NodePhone::spawn(&hub_url(port), "not.a.token", &[("SKIP_NEGOTIATION", skip)]);
        let e = phone.expect(0, "start_failed", WAIT);
        let error = e["error"].as_str().unwrap();
        assert!(error.contains("token_invalid"), "skipNegotiation={skip}: {error}");
    }
    let expired = token(&setup.config, "sr-bob", 0);
    std::thread::sleep(Duration::from_millis(1100));
    let mut phone = NodePhone::spawn(&hub_url(port), &expired, &[("SKIP_NEGOTIATION", "1")]);
    let e = phone.expect(0, "start_failed", WAIT);
    assert!(e["error"].as_str().unwrap().contains("token_expired"), "{e}");
}

/// A hand-written hub client (tungstenite) on `/v1/hub`.
struct HubClient {
    phone: Phone,
}

impl HubClient {
    fn connect(addr: SocketAddr, token: &str) -> HubClient {
        HubClient { phone: Phone::connect_to(addr, "/v1/hub", Some(token)).expect("hub upgrade") }
    }

    fn handshake(addr: SocketAddr, token: &str) -> HubClient {
        let mut h = Self::connect(addr, token);
        h.send(&format!("{{\"protocol\":\"json\",\"version\":1}}{RS}"));
        assert_eq!(h.next_text().as_deref(), Some("{}\u{1e}"), "handshake accepted");
        h
    }

    fn send(&mut self, text: &str) {
        self.phone.send_text(text);
    }

    /// The next text message, or None at a close or after 10 s.
    fn next_text(&mut self) -> Option<String> {
        self.phone.ws.get_mut().set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        loop {
            match self.phone.ws.read() {
                Ok(tungstenite::Message::Text(t)) => return Some(t),
                Ok(tungstenite::Message::Close(_)) | Err(_) => return None,
                Ok(_) => continue,
            }
        }
    }

    /// Reads to the end: the records seen (pings skipped) and the close code.
    fn until_close(&mut self) -> (Vec<Value>, Option<u16>) {
        self.phone.ws.get_mut().set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut records = Vec::new();
        loop {
            match self.phone.ws.read() {
                Ok(tungstenite::Message::Text(t)) => {
                    for r in t.split_terminator(RS) {
                        let v: Value = serde_json::from_str(r).unwrap();
                        if v["type"] != 6 {
                            records.push(v);
                        }
                    }
                }
                Ok(tungstenite::Message::Close(f)) => return (records, f.map(|f| u16::from(f.code))),
                Ok(_) => continue,
                Err(_) => return (records, None),
            }
        }
    }
}

/// Malformed handshake, unknown protocol, missing record separator,
/// oversize record, wrong argument types: each gets a clear error (the
/// handshake response's, or a close message's) and a close, while a raw
/// phone and a SignalR phone of other users keep receiving.
#[test]
fn bad_hub_input_gets_a_clear_close_and_disturbs_nothing_else() {
    let (setup, port) =
        setup_on_fixed_port(&Opts { extra_mobile: "max_message_bytes = 4096".into(), ..Opts::default() });
    let engine = setup.start();
    let mut c = engine.client();
    let mut raw = Phone::connect(engine.mobile, &token(&setup.config, "bi-raw", 3600)).unwrap();
    let mut hub = NodePhone::spawn(&hub_url(port), &token(&setup.config, "bi-hub", 3600), &[]);
    hub.expect(0, "started", WAIT);
    let tok = token(&setup.config, "bi-bad", 3600);

    // Handshake refusals: the handshake response carries the error, then 1008.
    for (handshake, want) in [
        ("{\"protocol\":\"json\"\u{1e}".to_owned(), "malformed handshake"),
        (format!("{{\"protocol\":\"messagepack\",\"version\":1}}{RS}"), "'messagepack' is not supported"),
        ("{\"protocol\":\"json\",\"version\":1}".to_owned(), "record separator (0x1E) is missing"),
    ] {
        let mut h = HubClient::connect(engine.mobile, &tok);
        h.send(&handshake);
        let (records, code) = h.until_close();
        assert!(records[0]["error"].as_str().unwrap().contains(want), "{handshake:?}: {records:?}");
        assert_eq!(code, Some(1008), "{handshake:?}");
    }
    // After the handshake: a close message (type 7) with the error, then the close frame.
    let big = format!("{{\"type\":1,\"target\":\"Ack\",\"arguments\":[\"{}\"]}}{RS}", "x".repeat(4096));
    for (text, want, want_code) in [
        ("{\"type\":6}".to_owned(), "does not end with the record separator", 1008),
        (
            format!("{{\"type\":1,\"invocationId\":\"1\",\"target\":\"Ack\",\"arguments\":[5]}}{RS}"),
            "Ack takes one argument",
            1008,
        ),
        (
            format!("{{\"type\":1,\"target\":\"AckMany\",\"arguments\":[\"a\"]}}{RS}"),
            "AckMany takes one argument",
            1008,
        ),
        (format!("{{\"type\":1,\"target\":\"Block\",\"arguments\":[7]}}{RS}"), "Block takes one argument", 1008),
        (format!("{{nope{RS}"), "malformed record", 1008),
        (big, "message too big", 1009),
    ] {
        let mut h = HubClient::handshake(engine.mobile, &tok);
        h.send(&text);
        let (records, code) = h.until_close();
        let close =
            records.iter().find(|r| r["type"] == 7).unwrap_or_else(|| panic!("{want}: no close message: {records:?}"));
        assert!(close["error"].as_str().unwrap().contains(want), "{want}: {close}");
        assert!(close.get("allowReconnect").is_none(), "a refusal does not invite a reconnect");
        assert_eq!(code, Some(want_code), "{want}");
    }
    // A binary message is refused too.
    let mut h = HubClient::handshake(engine.mobile, &tok);
    h.phone.ws.send(tungstenite::Message::Binary(vec![1, 2, 3])).unwrap();
    assert_eq!(h.until_close().1, Some(1003));

    // Nothing else was disturbed.
    let id_raw = send(&mut c, "bi-raw", "still here");
    let id_hub = send(&mut c, "bi-hub", "still here");
    assert_eq!(raw.recv(WAIT).expect("raw phone")["id"], id_raw.as_str());
    let mark = hub.log.len();
    hub.wait_until(WAIT, "hub phone message", |log| log[mark..].iter().any(|e| e["event"] == "message"));
    assert_eq!(hub.ids_from(mark), vec![id_hub]);
    assert!(hub.log.iter().all(|e| e["event"] != "closed" && e["event"] != "reconnecting"), "{:?}", hub.log);
}

/// Keep-alive and client timeout follow `mobile.hub_keep_alive_ms` and
/// `mobile.hub_client_timeout_ms`: an idle connection gets ping records,
/// a silent client is dropped after the timeout; a client's close message
/// is answered with a normal close.
#[test]
fn hub_pings_idle_clients_and_drops_silent_ones() {
    let setup = Setup::new(&Opts {
        extra_mobile: "hub_keep_alive_ms = 200\nhub_client_timeout_ms = 1200".into(),
        ..Opts::default()
    });
    let engine = setup.start();
    let tok = token(&setup.config, "ka-user", 3600);
    let mut h = HubClient::handshake(engine.mobile, &tok);
    let start = Instant::now();
    let mut pings = 0;
    while let Some(t) = h.next_text() {
        assert_eq!(t, "{\"type\":6}\u{1e}");
        pings += 1;
    }
    let lived = start.elapsed();
    assert!(pings >= 4, "{pings} pings in {lived:?}");
    assert!(lived >= Duration::from_millis(1100) && lived < Duration::from_secs(4), "dropped after {lived:?}");
    // A client that pings stays; its close message gets a normal close.
    let mut h = HubClient::handshake(engine.mobile, &tok);
    for _ in 0..8 {
        std::thread::sleep(Duration::from_millis(250));
        h.send(&format!("{{\"type\":6}}{RS}"));
    }
    h.send(&format!("{{\"type\":7}}{RS}"));
    let (records, code) = h.until_close();
    assert_eq!(records, vec![json!({"type": 7})], "after 2 s of pings the connection was still up");
    assert_eq!(code, Some(1000));
}

const USERS: usize = 12;

fn user(i: usize) -> String {
    format!("mixed-{i}")
}

/// A raw phone that keeps reconnecting, acks most messages, disconnects at random.
fn raw_phone_loop(i: usize, token: String, addr: SocketAddr, stop: Arc<AtomicBool>, obs: Arc<Mutex<Observed>>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(i as u64);
    while !stop.load(Ordering::Relaxed) {
        let Ok(mut p) = std::panic::catch_unwind(|| Phone::connect(addr, &token))
            .unwrap_or(Err(Refused { status: 0, body: String::new() }))
        else {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        };
        phone_session(&mut p, &user(i), &mut rng, &stop, &obs);
    }
}

/// The end-to-end kill -9 test of `tests/e2e_crash.rs` with half the phones
/// on the official SignalR client (which acks 80% with `invoke("Ack")`,
/// stops and starts again at random, and reconnects on its own): every
/// message that got a 202 reaches its user (duplicates allowed, loss never).
#[test]
fn every_acknowledged_message_reaches_raw_and_signalr_phones_across_kill_9() {
    let (setup, port) = setup_on_fixed_port(&Opts { shards: 2, segment_bytes: 256 * 1024, ..Opts::default() });
    let mobile: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let obs = Arc::new(Mutex::new(Observed::default()));
    let stop_phones = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    let mut node_phones = Vec::new();
    for i in 0..USERS {
        let tok = token(&setup.config, &user(i), 3600);
        if i % 2 == 0 {
            let (s, o) = (stop_phones.clone(), obs.clone());
            threads.push(std::thread::spawn(move || raw_phone_loop(i, tok, mobile, s, o)));
        } else {
            let mut p = NodePhone::spawn(&hub_url(port), &tok, &[("ACK_RATIO", "0.8"), ("CHURN_MS", "100-600")]);
            let events = std::mem::replace(&mut p.events, mpsc::channel().1);
            let o = obs.clone();
            threads.push(std::thread::spawn(move || {
                for e in events {
                    if e["event"] == "message" {
                        let id = e["message"]["id"].as_str().unwrap().to_owned();
                        o.lock().unwrap().received.push((user(i), id));
                    }
                }
            }));
            node_phones.push(p);
        }
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    // At least 4 kills; more (up to 10) while the traffic is too thin to
    // mean anything (a loaded machine sends less per round).
    for round in 0..10 {
        let enough = {
            let o = obs.lock().unwrap();
            let hub = o.acked.values().filter(|to| to.trim_start_matches("mixed-").parse::<usize>().unwrap() % 2 == 1);
            o.acked.len() > 500 && hub.count() > 200
        };
        if round >= 4 && enough {
            break;
        }
        send_then_kill(setup.start(), user, USERS, &obs, &mut rng);
    }
    // Final run: phones drain everything still pending.
    let engine = setup.start();
    let missing = wait_for_all(&obs, Duration::from_secs(90));
    stop_phones.store(true, Ordering::Relaxed);
    drop(node_phones); // ends the node processes, and so their event threads
    for t in threads {
        t.join().unwrap();
    }
    let o = obs.lock().unwrap();
    let unique: HashSet<&(String, String)> = o.received.iter().collect();
    let on_hub = |id: &String| {
        o.acked.get(id).is_some_and(|to| to.trim_start_matches("mixed-").parse::<usize>().unwrap() % 2 == 1)
    };
    let hub_acked = o.acked.keys().filter(|id| on_hub(id)).count();
    eprintln!(
        "{} messages acknowledged (202), {} to SignalR phones; {} receipts, {} unique, {} duplicates, {} missing",
        o.acked.len(),
        hub_acked,
        o.received.len(),
        unique.len(),
        o.received.len() - unique.len(),
        missing.len()
    );
    assert!(o.acked.len() > 500, "too little traffic to mean anything: {}", o.acked.len());
    assert!(hub_acked > 200, "too little traffic to SignalR phones: {hub_acked}");
    if !missing.is_empty() {
        // What the engine saw, to tell a stuck user from a lost message.
        for line in engine.stderr_lines().iter().rev().take(40).rev() {
            eprintln!("engine: {line}");
        }
        let mut c = engine.client();
        for (id, _) in missing.iter().take(3) {
            let r = c.get_status(id);
            eprintln!("status of missing {id}: {} {}", r.status, String::from_utf8_lossy(&r.body));
        }
    }
    assert!(missing.is_empty(), "acknowledged messages never delivered: {:?}", &missing[..missing.len().min(10)]);
    assert_eq!(o.foreign(), 0, "a message reached the wrong user");
}
