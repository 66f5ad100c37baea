//! A full disk (docs/ARCHITECTURE.md, "Disk full"; issue #14): the data dir
//! lives on a small loop-mounted ext4 (docs TESTING.md, "Disk full"). Sends
//! go on until the engine refuses; the refusal is `503 storage_full` with
//! `Retry-After` (not a timeout, not a crash: the admin API still answers),
//! a `kill -9` while full recovers, and once space is freed (a filler file
//! deleted) the engine accepts again without a restart. Every message that
//! got a 202 is delivered (Jepsen's checker: acknowledged means delivered).
//! The offline backlog spills to its cold store on the same file system, so
//! its writes meet the full disk too and must lose nothing.

mod common;

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// A loop-mounted ext4 image of `mib` MiB, unmounted (and its loop device
/// detached, `-o loop` sets autoclear) and removed on drop, also when the
/// test fails.
struct LoopMount {
    root: PathBuf,
    mnt: PathBuf,
}

impl LoopMount {
    fn new(mib: u64) -> LoopMount {
        let root = std::env::temp_dir().join(format!("esh3ar-diskfull-{}-{}", std::process::id(), mib));
        let _ = std::fs::remove_dir_all(&root);
        let mnt = root.join("mnt");
        std::fs::create_dir_all(&mnt).unwrap();
        let img = root.join("img");
        run("truncate", &["-s", &format!("{mib}M"), img.to_str().unwrap()]);
        run("mkfs.ext4", &["-q", img.to_str().unwrap()]);
        let guard = LoopMount { root, mnt };
        run("mount", &["-o", "loop", img.to_str().unwrap(), guard.mnt.to_str().unwrap()]);
        guard
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        let mnt = self.mnt.to_str().unwrap();
        let ok = Command::new("umount").arg(mnt).status().is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").args(["-l", mnt]).status();
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(out.status.success(), "{cmd} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

const USERS: usize = 8;
const BODY_BYTES: usize = 16 * 1024;

/// Incompressible text, different for each message.
fn body(n: usize) -> String {
    let mut x = (n as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (0..BODY_BYTES)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (b'a' + (x % 26) as u8) as char
        })
        .collect()
}

fn write_filler(path: &Path, mib: usize) {
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0x5au8; 1 << 20];
    for _ in 0..mib {
        f.write_all(&chunk).unwrap();
    }
    f.sync_all().unwrap();
}

fn admin_answers(engine: &Engine) {
    let mut a = Client::connect(engine.admin);
    let r = a.request("GET", "/healthz", None, None);
    assert_eq!(r.status, 200, "healthz while the disk is full");
}

#[test]
fn a_full_disk_refuses_with_storage_full_loses_nothing_and_recovers_when_space_returns() {
    let disk = LoopMount::new(96);
    let filler = disk.mnt.join("filler");
    write_filler(&filler, 24);
    let data = disk.mnt.join("data");
    let dir = tempfile::tempdir().unwrap();
    // Spill after 2 s (the default waits 30 s): the test's messages must
    // reach the cold store while the disk fills.
    let opts = Opts {
        shards: 1,
        segment_bytes: 4 << 20,
        extra_toml: "\n[backlog]\nspill_after_ms = 2000\n".into(),
        ..Opts::default()
    };
    let config = write_config(dir.path(), &data, &opts);
    let engine = Engine::start(&config);

    // Send until the engine refuses.
    let mut client = engine.client();
    let mut acked: HashMap<String, String> = HashMap::new(); // id -> user
    let mut refusal = None;
    for n in 0..20_000 {
        let user = format!("u{}", n % USERS);
        let r = client.send(&user, &body(n));
        match r.status {
            202 => {
                acked.insert(r.json()["id"].as_str().unwrap().to_owned(), user);
            }
            _ => {
                refusal = Some(r);
                break;
            }
        }
    }
    let r = refusal.expect("a 96 MiB disk never filled up");
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.error_code(), "storage_full", "{}", String::from_utf8_lossy(&r.body));
    assert!(r.header("retry-after").is_some(), "a 503 says when to retry");
    assert!(acked.len() > 1000, "only {} accepted before the disk was full", acked.len());
    admin_answers(&engine);
    assert_eq!(metric(engine.admin, "esh3ar_storage_full"), 1.0);
    // Still refused, still answering (never a timeout).
    for n in 0..5 {
        let r = client.send("u0", &body(100_000 + n));
        assert_eq!((r.status, r.error_code()), (503, "storage_full".into()));
    }
    let dir = data.to_str().unwrap();
    let logged = engine
        .wait_for_stderr(Duration::from_secs(5), |l| l.contains("storage_full") && l.contains(dir))
        .unwrap_or_else(|lines| panic!("no error line naming the data dir:\n{}", lines.join("\n")));
    assert!(logged.contains("ERROR"), "{logged}");

    // kill -9 while full: recovery works on a full disk, nothing is lost.
    engine.kill9();
    let engine = Engine::start(&config);
    admin_answers(&engine);
    let mut client = engine.client();
    // Still full, or full again soon: the restarted engine refuses too (a
    // restart may find some room: the cold store tidies its files on open).
    let mut refused = false;
    for n in 0..2_000 {
        let user = format!("u{}", n % USERS);
        let r = client.send(&user, &body(200_000 + n));
        if r.status == 202 {
            acked.insert(r.json()["id"].as_str().unwrap().to_owned(), user);
            continue;
        }
        assert_eq!((r.status, r.error_code()), (503, "storage_full".into()), "after the restart");
        refused = true;
        break;
    }
    assert!(refused, "the restarted engine accepted 2000 messages on a full disk");

    // Space comes back: accepted again, without a restart.
    std::fs::remove_file(&filler).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = client.send("u1", &body(300_000));
        if r.status == 202 {
            acked.insert(r.json()["id"].as_str().unwrap().to_owned(), "u1".into());
            break;
        }
        assert_eq!(r.error_code(), "storage_full");
        assert!(Instant::now() < deadline, "still refused 15 s after space was freed");
        std::thread::sleep(Duration::from_millis(200));
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric(engine.admin, "esh3ar_storage_full") != 0.0 {
        assert!(Instant::now() < deadline, "the storage_full gauge stays up");
        std::thread::sleep(Duration::from_millis(100));
    }

    // Every acknowledged message reaches its user.
    let mut got: HashSet<String> = HashSet::new();
    for u in 0..USERS {
        let user = format!("u{u}");
        let want = acked.values().filter(|v| **v == user).count();
        // Bringing a user's backlog back journals it again, which needs
        // room: on a disk this tight the engine may close the session
        // ("storage unavailable") until the acks of the users before free
        // segments. A phone reconnects, as a real one does.
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut mine = 0;
        while mine < want && Instant::now() < deadline {
            let Ok(mut phone) = Phone::connect(engine.mobile, &token(&config, &user, 600)) else {
                std::thread::sleep(Duration::from_millis(500));
                continue;
            };
            while mine < want {
                let Some(f) = phone.recv(Duration::from_secs(20)) else { break };
                let Some(id) = f["id"].as_str() else { continue };
                if acked.get(id) == Some(&user) {
                    mine += 1;
                }
                got.insert(id.to_owned());
                phone.ack(id);
            }
            if mine < want {
                eprintln!("{user}: session ended with {mine} of {want} received; reconnecting");
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }
    let lost: Vec<_> = acked.keys().filter(|id| !got.contains(*id)).collect();
    if !lost.is_empty() {
        // Stuck or gone: the engine's log and the status of a few.
        for line in engine.stderr_lines().iter().rev().take(30).rev() {
            eprintln!("engine: {line}");
        }
        for id in lost.iter().take(3) {
            let r = client.get_status(id);
            eprintln!("status of lost {id}: {} {}", r.status, String::from_utf8_lossy(&r.body));
        }
    }
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged messages lost, e.g. {:?}",
        lost.len(),
        acked.len(),
        &lost[..lost.len().min(5)]
    );
    engine.terminate();
}
