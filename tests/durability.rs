//! Durability against the real binary.
//!
//! The checker invariant is Jepsen's (from its NATS JetStream analysis):
//! every message that got a 202 must be found after recovery, with its
//! body intact; duplicates would be allowed, losses never. The ids and
//! bodies are recorded here, outside the engine's data dir. The kill loop
//! follows RocksDB's `db_crashtest.py` blackbox mode: SIGKILL at random
//! instants under load. Damage tests follow Jepsen's file nemesis.

mod common;

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use rand::{Rng, SeedableRng};

#[derive(Clone, Debug)]
struct Acked {
    id: String,
    to: String,
    body: String,
}

/// Sends from `threads` connections until `stop`, recording every 202.
fn load(
    addr: std::net::SocketAddr,
    threads: usize,
    round: usize,
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<Acked>>>,
) -> Vec<std::thread::JoinHandle<()>> {
    (0..threads)
        .map(|t| {
            let stop = stop.clone();
            let acked = acked.clone();
            std::thread::spawn(move || {
                let Ok(stream) = std::net::TcpStream::connect(addr) else { return };
                drop(stream);
                let mut c = Client::connect(addr);
                let mut n = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let to = format!("user-{}", (t * 7 + n) % 23);
                    let body = format!("r{round}-t{t}-m{n}-{}", "x".repeat(n % 200));
                    let json = serde_json::json!({"to": to, "body": body}).to_string();
                    c.send_raw(&Client::request_bytes("POST", "/v1/messages", Some(API_KEY), Some(&json)));
                    match c.read_response() {
                        Ok(r) if r.status == 202 => {
                            let id = r.json()["id"].as_str().unwrap().to_owned();
                            acked.lock().unwrap().push(Acked { id, to, body });
                        }
                        Ok(r) => {
                            panic!("unexpected status {} under load: {}", r.status, String::from_utf8_lossy(&r.body))
                        }
                        Err(_) => return, // killed mid-request: no 202, no promise
                    }
                    n += 1;
                }
            })
        })
        .collect()
}

fn dump(config: &Path) -> HashMap<String, (String, String)> {
    let (code, out, err) = run_cli(&["journal", "dump", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 0, "journal dump failed: {err}");
    out.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["id"].as_str().unwrap().to_owned(),
                (v["to"].as_str().unwrap().to_owned(), v["body"].as_str().unwrap().to_owned()),
            )
        })
        .collect()
}

fn check_all_present(setup: &Setup, acked: &[Acked]) {
    // Through the API: status of every acknowledged id.
    let engine = setup.start();
    let mut c = engine.client();
    for a in acked {
        let r = c.get_status(&a.id);
        assert_eq!(r.status, 200, "acknowledged message {} lost", a.id);
        assert_eq!(r.json()["to"], a.to.as_str());
    }
    assert_eq!(engine.terminate(), Some(0));
    // Offline: every body intact.
    let journal = dump(&setup.config);
    for a in acked {
        let (to, body) = journal.get(&a.id).unwrap_or_else(|| panic!("{} missing from journal dump", a.id));
        assert_eq!((to, body), (&a.to, &a.body), "message {} damaged", a.id);
    }
}

#[test]
fn kill_minus_nine_under_load_loses_no_acknowledged_message() {
    let setup = Setup::new(&Opts { shards: 2, segment_bytes: 256 * 1024, ..Opts::default() });
    let acked = Arc::new(Mutex::new(Vec::new()));
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    let rounds = 5;
    for round in 0..rounds {
        let engine = setup.start();
        let stop = Arc::new(AtomicBool::new(false));
        let before = acked.lock().unwrap().len();
        let workers = load(engine.business, 8, round, stop.clone(), acked.clone());
        std::thread::sleep(Duration::from_millis(rng.gen_range(300..1200)));
        engine.kill9();
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            w.join().unwrap();
        }
        let after = acked.lock().unwrap().len();
        assert!(after > before, "round {round}: no message acknowledged before the kill");
    }
    let acked = acked.lock().unwrap().clone();
    eprintln!("{} messages acknowledged over {rounds} kill -9 rounds", acked.len());
    check_all_present(&setup, &acked);
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    v.sort();
    v
}

fn last_nonzero(bytes: &[u8]) -> usize {
    bytes.iter().rposition(|&b| b != 0).map_or(0, |p| p + 1)
}

fn send_sequential(engine: &Engine, n: usize, body_len: usize) -> Vec<Acked> {
    let mut c = engine.client();
    (0..n)
        .map(|i| {
            let to = format!("user-{}", i % 5);
            let body = format!("{i}-{}", "b".repeat(body_len));
            let r = c.send(&to, &body);
            assert_eq!(r.status, 202);
            Acked { id: r.json()["id"].as_str().unwrap().to_owned(), to, body }
        })
        .collect()
}

#[test]
fn flipped_bit_in_acknowledged_data_refuses_start_naming_file_and_offset() {
    // After a clean stop nothing can be torn: damage anywhere is corruption.
    // (tests/damage.rs runs the whole matrix of offsets and stop modes.)
    let setup = Setup::new(&Opts { shards: 1, segment_bytes: 8 << 20, ..Opts::default() });
    let engine = setup.start();
    let acked = send_sequential(&engine, 1500, 1000);
    assert_eq!(engine.terminate(), Some(0));
    let seg = segments(&setup.data_dir().join("shard-0")).pop().unwrap();
    let mut bytes = fs::read(&seg).unwrap();
    let flip_at = 5000;
    bytes[flip_at] ^= 0x04;
    fs::write(&seg, &bytes).unwrap();

    let (code, out, err) = run_cli(&["journal", "verify", "--config", setup.config.to_str().unwrap()]);
    assert_eq!(code, 1, "verify must fail on corruption: {out} {err}");
    assert!(out.contains(seg.to_str().unwrap()) && out.contains("offset"), "verify must name file and offset: {out}");

    let err = Engine::try_start(&setup.config).err().expect("engine must refuse a corrupt journal");
    assert!(err.contains(seg.file_name().unwrap().to_str().unwrap()), "error must name the file: {err}");
    assert!(err.contains("offset"), "error must name the offset: {err}");

    // Undo the damage: everything is there again.
    bytes[flip_at] ^= 0x04;
    fs::write(&seg, &bytes).unwrap();
    check_all_present(&setup, &acked);
}

#[test]
fn flipped_bit_in_an_older_segment_is_corruption() {
    let setup = Setup::new(&Opts { shards: 1, segment_bytes: 128 * 1024, ..Opts::default() });
    let engine = setup.start();
    send_sequential(&engine, 400, 1000);
    assert_eq!(engine.terminate(), Some(0));
    let segs = segments(&setup.data_dir().join("shard-0"));
    assert!(segs.len() >= 3, "expected rotation, got {segs:?}");
    let victim = &segs[0];
    let mut bytes = fs::read(victim).unwrap();
    let end = last_nonzero(&bytes);
    bytes[end - 20] ^= 0x80; // the last record of a sealed segment
    fs::write(victim, &bytes).unwrap();
    let err = Engine::try_start(&setup.config).err().expect("engine must refuse");
    assert!(err.contains(victim.file_name().unwrap().to_str().unwrap()), "{err}");
}
