//! A webhook receiver for integration tests: a real HTTP/1.1 server on a
//! local socket that records every request and checks its Standard
//! Webhooks signature independently of the engine (HMAC-SHA256 over
//! `id.timestamp.body` with the decoded secret, computed here with `hmac`).
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde_json::Value;

pub const HOOK_KEY: &str = "hooked-key-0123456789abcdef";
/// 32 random bytes, base64.
pub const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSwQo6hHg2TlqU=";

/// One webhook request as received.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub id: String,
    pub body: Value,
    pub at: Instant,
}

/// A webhook receiver: answers every request with `status` (0 = close the
/// connection without answering), records every request and checks its
/// signature.
pub struct Receiver {
    addr: SocketAddr,
    status: Arc<AtomicU16>,
    got: Arc<Mutex<Vec<Delivery>>>,
}

impl Receiver {
    pub fn start() -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let status = Arc::new(AtomicU16::new(200));
        let got = Arc::new(Mutex::new(Vec::new()));
        let (s, g) = (status.clone(), got.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().map_while(Result::ok) {
                let (s, g) = (s.clone(), g.clone());
                std::thread::spawn(move || serve(stream, &s, &g));
            }
        });
        Receiver { addr, status, got }
    }

    pub fn url(&self) -> String {
        format!("http://{}/hooks/esh3ar", self.addr)
    }

    pub fn answer(&self, status: u16) {
        self.status.store(status, Ordering::SeqCst);
    }

    pub fn deliveries(&self) -> Vec<Delivery> {
        self.got.lock().unwrap().clone()
    }

    /// Waits until `pred` holds over the deliveries so far.
    pub fn wait_for(&self, what: &str, within: Duration, pred: impl Fn(&[Delivery]) -> bool) -> Vec<Delivery> {
        let deadline = Instant::now() + within;
        loop {
            let got = self.deliveries();
            if pred(&got) {
                return got;
            }
            assert!(Instant::now() < deadline, "{what}: not within {within:?}; got {:?}", ids(&got));
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

pub fn ids(d: &[Delivery]) -> Vec<&str> {
    d.iter().map(|d| d.id.as_str()).collect()
}

pub fn serve(stream: TcpStream, status: &AtomicU16, got: &Mutex<Vec<Delivery>>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut stream = stream;
    loop {
        let mut headers = HashMap::new();
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        assert!(line.starts_with("POST /hooks/esh3ar "), "request line {line:?}");
        loop {
            line.clear();
            reader.read_line(&mut line).unwrap();
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            let (k, v) = l.split_once(':').unwrap();
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
        }
        let len: usize = headers["content-length"].parse().unwrap();
        let mut body = vec![0u8; len];
        reader.read_exact(&mut body).unwrap();
        verify_signature(&headers, &body);
        assert_eq!(headers["content-type"], "application/json");
        let code = status.load(Ordering::SeqCst);
        got.lock().unwrap().push(Delivery {
            id: headers["webhook-id"].clone(),
            body: serde_json::from_slice(&body).unwrap(),
            at: Instant::now(),
        });
        if code == 0 {
            return; // drop the connection without an answer
        }
        let resp = format!("HTTP/1.1 {code} X\r\ncontent-length: 2\r\n\r\nok");
        if stream.write_all(resp.as_bytes()).is_err() {
            return;
        }
    }
}

/// Standard Webhooks 1.0, computed independently of the engine.
pub fn verify_signature(h: &HashMap<String, String>, body: &[u8]) {
    let id = &h["webhook-id"];
    let ts: u64 = h["webhook-timestamp"].parse().expect("unix seconds");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    assert!(ts.abs_diff(now) < 60, "timestamp {ts} is not now ({now})");
    let key = base64::engine::general_purpose::STANDARD.decode(SECRET.strip_prefix("whsec_").unwrap()).unwrap();
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{id}.{ts}.").as_bytes());
    mac.update(body);
    let expected = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    let sigs: Vec<&str> = h["webhook-signature"].split(' ').collect();
    assert!(sigs.contains(&format!("v1,{expected}").as_str()), "bad signature {sigs:?} for {id}");
}
