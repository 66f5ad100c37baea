//! What the end-to-end `kill -9` tests share: senders that record every
//! 202, phones that record every frame and ack most of them, and the check
//! that every acknowledged message reached its user.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

use super::{Client, Phone, API_KEY};

/// What the senders and phones of a crash test saw.
#[derive(Default)]
pub struct Observed {
    /// id -> recipient, for every 202.
    pub acked: HashMap<String, String>,
    /// (user, id) receipts, duplicates included.
    pub received: Vec<(String, String)>,
}

impl Observed {
    /// The acknowledged (id, recipient) pairs no phone of the recipient got.
    pub fn missing(&self) -> Vec<(String, String)> {
        let got: HashSet<(&str, &str)> = self.received.iter().map(|(u, id)| (u.as_str(), id.as_str())).collect();
        self.acked
            .iter()
            .filter(|(id, to)| !got.contains(&(to.as_str(), id.as_str())))
            .map(|(a, b)| (a.clone(), b.clone()))
            .collect()
    }

    /// Receipts of a message by a user it was not sent to.
    pub fn foreign(&self) -> usize {
        self.received.iter().filter(|(u, id)| self.acked.get(id).is_some_and(|to| to != u)).count()
    }
}

/// Waits up to `within` for every acknowledged message to be received;
/// returns those still missing then.
pub fn wait_for_all(obs: &Mutex<Observed>, within: Duration) -> Vec<(String, String)> {
    let deadline = Instant::now() + within;
    loop {
        let missing = obs.lock().unwrap().missing();
        if missing.is_empty() || Instant::now() > deadline {
            return missing;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// One connected session of a raw phone: receives for 100 to 600 ms (or
/// until `stop`), records every frame, acks about 80% of them.
pub fn phone_session(p: &mut Phone, user: &str, rng: &mut impl Rng, stop: &AtomicBool, obs: &Mutex<Observed>) {
    let session_end = Instant::now() + Duration::from_millis(rng.gen_range(100..600));
    while Instant::now() < session_end && !stop.load(Ordering::Relaxed) {
        let Some(m) = p.recv(Duration::from_millis(50)) else { continue };
        let id = m["id"].as_str().unwrap().to_owned();
        obs.lock().unwrap().received.push((user.to_owned(), id.clone()));
        if rng.gen_bool(0.8) {
            let _ = p.ws.send(tungstenite::Message::Text(serde_json::json!({"type":"ack","id":id}).to_string()));
        }
    }
}

/// Sends to random users (`user(0..users)`) over one keep-alive connection
/// until `stop` or the engine dies, recording every 202.
pub fn sender_loop(
    t: usize,
    addr: SocketAddr,
    user: fn(usize) -> String,
    users: usize,
    stop: Arc<AtomicBool>,
    obs: Arc<Mutex<Observed>>,
) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(1000 + t as u64);
    // The engine is killed under us at any instant: a refused connect or a
    // failed write ends this sender quietly, like a failed read.
    let Ok(stream) = std::net::TcpStream::connect(addr) else { return };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(20)));
    let _ = stream.set_nodelay(true);
    let mut c = Client::from_stream(stream);
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        let to = user(rng.gen_range(0..users));
        let json = serde_json::json!({"to": to, "body": format!("t{t}-{n}")}).to_string();
        let request = Client::request_bytes("POST", "/v1/messages", Some(API_KEY), Some(&json));
        if std::io::Write::write_all(&mut c.stream, &request).is_err() {
            return;
        }
        match c.read_response() {
            Ok(r) if r.status == 202 => {
                obs.lock().unwrap().acked.insert(r.json()["id"].as_str().unwrap().to_owned(), to);
            }
            Ok(r) => panic!("unexpected {}", r.status),
            Err(_) => return,
        }
        n += 1;
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..3)));
    }
}

/// One round of a crash test: four senders against `engine` for 0.5 to
/// 1.5 s, then `kill -9` under them; returns once every sender stopped.
pub fn send_then_kill(
    engine: super::Engine,
    user: fn(usize) -> String,
    users: usize,
    obs: &Arc<Mutex<Observed>>,
    rng: &mut impl Rng,
) {
    let stop = Arc::new(AtomicBool::new(false));
    let senders: Vec<_> = (0..4)
        .map(|t| {
            let (s, o, a) = (stop.clone(), obs.clone(), engine.business);
            std::thread::spawn(move || sender_loop(t, a, user, users, s, o))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(rng.gen_range(500..1500)));
    engine.kill9();
    stop.store(true, Ordering::Relaxed);
    for s in senders {
        s.join().unwrap();
    }
}
