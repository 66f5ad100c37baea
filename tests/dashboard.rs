//! The built-in live dashboard (`GET /` on the admin listener) in a real
//! browser: Debian's headless Chromium, driven over the Chrome DevTools
//! Protocol by the small client below (one WebSocket, `Runtime.evaluate`
//! and `Page.captureScreenshot`). While load runs, the figures the page
//! shows must change from one second to the next; when the load stops,
//! the rate falls back to 0. `scripts/test.sh` installs `chromium` when it
//! is missing; without it this test fails, it never skips.
//!
//! With `ESH3AR_UPDATE_SCREENSHOT=1` the screenshot under load is written
//! to `docs/dashboard.png` (always to the test's temp dir otherwise).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::*;
use serde_json::{json, Value};
use tungstenite::Message;

/// A headless Chromium and a DevTools connection to its one page.
struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
    page: tungstenite::WebSocket<TcpStream>,
    next_id: u64,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn chromium() -> String {
    std::env::var("ESH3AR_CHROMIUM").unwrap_or_else(|_| "chromium".to_owned())
}

/// A GET of the DevTools HTTP endpoint (the target list). It answers
/// HTTP/1.1 only and keeps the connection open: read `Content-Length` bytes.
fn http_get(port: u16, path: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n").unwrap();
    let mut data = Vec::new();
    let mut chunk = [0u8; 16384];
    loop {
        let text = String::from_utf8_lossy(&data).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0))
                })
                .unwrap_or(0usize);
            if body.len() >= len {
                return body.to_owned();
            }
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return String::new(),
            Ok(n) => data.extend_from_slice(&chunk[..n]),
        }
    }
}

impl Browser {
    /// Opens `url` in a fresh headless Chromium (the flags docs/TESTING.md names).
    fn open(url: &str) -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let mut child = Command::new(chromium())
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
                "--window-size=1200,900",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(url)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("chromium is needed (Debian package `chromium`; scripts/test.sh installs it)");
        // "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/<id>"
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("DevTools listening on ws://127.0.0.1:").nth(1) {
                    let _ = tx.send(rest.split('/').next().unwrap_or("").parse::<u16>().unwrap_or(0));
                }
            }
        });
        let port = rx.recv_timeout(Duration::from_secs(30)).expect("chromium printed its DevTools port");
        let deadline = Instant::now() + Duration::from_secs(20);
        let page_ws = loop {
            let list: Value = serde_json::from_str(&http_get(port, "/json/list")).unwrap_or(Value::Null);
            let page = list.as_array().and_then(|l| {
                l.iter().find(|t| t["type"] == "page" && t["url"].as_str().is_some_and(|u| u.starts_with(url)))
            });
            if let Some(ws) = page.and_then(|p| p["webSocketDebuggerUrl"].as_str()) {
                break ws.to_owned();
            }
            assert!(Instant::now() < deadline, "no page target for {url}: {list}");
            std::thread::sleep(Duration::from_millis(100));
        };
        let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let (page, _) = tungstenite::client(page_ws.as_str(), stream).expect("DevTools WebSocket");
        Browser { child, _profile: profile, page, next_id: 1 }
    }

    /// Sends a DevTools command and returns its `result`.
    fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let msg = json!({"id": id, "method": method, "params": params}).to_string();
        self.page.send(Message::Text(msg)).unwrap();
        loop {
            let Message::Text(text) = self.page.read().expect("DevTools answer") else { continue };
            let v: Value = serde_json::from_str(&text).unwrap();
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    /// What the page shows: the text of every figure, and the frame count.
    fn figures(&mut self) -> Value {
        let expr = r#"JSON.stringify({
            frames: Number(document.getElementById("state").dataset.frames || 0),
            ids: Object.fromEntries([...document.querySelectorAll(".value")].map(e => [e.id, e.textContent])),
            shards: document.getElementById("shards").rows.length })"#;
        let r = self.call("Runtime.evaluate", json!({"expression": expr, "returnByValue": true}));
        // Before the page has loaded the expression throws: no frame yet.
        r["result"]["value"]
            .as_str()
            .and_then(|v| serde_json::from_str(v).ok())
            .unwrap_or(json!({"frames": 0, "ids": {}, "page": r}))
    }

    /// Waits until the page has shown at least `n` frames.
    fn wait_frames(&mut self, n: u64) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let f = self.figures();
            if f["frames"].as_u64().unwrap_or(0) >= n {
                return f;
            }
            assert!(Instant::now() < deadline, "the page showed no frame {n}: {f}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn screenshot(&mut self) -> Vec<u8> {
        let r = self.call("Page.captureScreenshot", json!({"format": "png"}));
        base64::engine::general_purpose::STANDARD.decode(r["data"].as_str().unwrap()).unwrap()
    }
}

/// A figure as a number ("1,234.5" -> 1234.5; "–" -> None).
fn number(f: &Value, id: &str) -> Option<f64> {
    f["ids"][id].as_str()?.replace(',', "").split(' ').next()?.parse().ok()
}

/// Sends messages on `connections` keep-alive connections until stopped.
fn load(
    engine: &Engine,
    connections: usize,
    stop: &Arc<AtomicBool>,
    sent: &Arc<AtomicU64>,
) -> Vec<std::thread::JoinHandle<()>> {
    (0..connections)
        .map(|c| {
            let (addr, stop, sent) = (engine.business, stop.clone(), sent.clone());
            std::thread::spawn(move || {
                let mut client = Client::connect(addr);
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    // Every tenth message of the first connection goes to the watching phone.
                    let to = if c == 0 && i % 10 == 1 { "watcher".to_owned() } else { format!("dash-{c}-{}", i % 50) };
                    assert_eq!(client.send(&to, "live").status, 202);
                    sent.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                }
            })
        })
        .collect()
}

#[test]
fn live_dashboard_figures_move_with_load_in_a_real_browser() {
    let setup = Setup::new(&Opts::default());
    let engine = setup.start();
    let mut phone = Phone::connect(engine.mobile, &token(&setup.config, "watcher", 3600)).expect("phone connects");
    let (stop, sent) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
    let mut workers = load(&engine, 4, &stop, &sent);
    // The phone receives and acks what comes to it, so delivery figures move too.
    let phone_stop = stop.clone();
    workers.push(std::thread::spawn(move || {
        while !phone_stop.load(Ordering::Relaxed) {
            if let Some(frame) = phone.recv(Duration::from_millis(200)) {
                if let Some(id) = frame["id"].as_str() {
                    phone.ack(id);
                }
            }
        }
    }));

    let url = format!("http://{}/", engine.admin);
    let mut browser = Browser::open(&url);
    let first = browser.wait_frames(2);
    let frames = first["frames"].as_u64().unwrap();
    let second = browser.wait_frames(frames + 2);
    // Under load: the total grows from one reading to the next, the rate
    // is positive, latency percentiles are shown, the phone is counted.
    let (a, b) = (number(&first, "accepted_total"), number(&second, "accepted_total"));
    assert!(matches!((a, b), (Some(a), Some(b)) if b > a), "accepted total did not grow: {first} -> {second}");
    assert!(number(&second, "accepted_per_second").unwrap_or(0.0) > 0.0, "{second}");
    for figure in ["accept_ms", "delivery_ms"] {
        let shown = second["ids"][figure].as_str().unwrap();
        assert!(shown.split(" / ").all(|v| v.parse::<f64>().is_ok()), "{figure} p50 / p99 shown as numbers: {shown}");
    }
    assert_eq!(second["ids"]["websockets"], "1", "{second}");
    assert!(number(&second, "business_connections").unwrap_or(0.0) >= 4.0, "{second}");
    assert!(second["ids"]["memory"].as_str().unwrap().ends_with('%'), "{second}");
    assert_eq!(second["ids"]["archive_lag"], "not built", "{second}");
    assert_eq!(second["shards"], 2, "one row per shard");

    let png = browser.screenshot();
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "a real screenshot");
    let dir = std::env::var("CARGO_TARGET_TMPDIR").unwrap_or_else(|_| std::env::temp_dir().display().to_string());
    std::fs::write(format!("{dir}/dashboard.png"), &png).unwrap();
    if std::env::var_os("ESH3AR_UPDATE_SCREENSHOT").is_some() {
        std::fs::write(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/dashboard.png"), &png).unwrap();
    }

    // Load stops: the rate falls to 0 and the total stays where it is.
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    let total = sent.load(Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = browser.figures();
        let frames = now["frames"].as_u64().unwrap();
        let idle = browser.wait_frames(frames + 1);
        if number(&idle, "accepted_per_second") == Some(0.0) {
            assert_eq!(number(&idle, "accepted_total"), Some(total as f64), "every 202 counted once: {idle}");
            break;
        }
        assert!(Instant::now() < deadline, "the rate never fell to 0: {idle}");
    }
}
