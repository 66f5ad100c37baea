//! The damage matrix: real segment files written by the real binary,
//! damaged between runs as Jepsen's file nemesis does (a flipped byte at
//! chosen offsets, a zeroed 4 KiB block, a torn last commit), after a clean
//! stop and after `kill -9`.
//!
//! Expected (docs/ARCHITECTURE.md, "Recovery verdicts"): after `kill -9`, a
//! torn last commit is cut, its bytes moved to a quarantine file, and only
//! unacknowledged records are lost; every other case refuses to start,
//! names the file and the offset, and loses nothing until an operator runs
//! `journal repair --accept-loss`.
//!
//! The segment layout is read here with an independent parser of the
//! documented commit header (magic, CRC, kind, seq at 12, body length at 20).

mod common;

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use common::*;

#[derive(Clone, Debug)]
struct Acked {
    id: String,
    to: String,
    body: String,
}

/// A data dir with acknowledged messages in one segment of shard 0.
struct Journal {
    setup: Setup,
    acked: Vec<Acked>,
    segment: PathBuf,
    /// Offset of every commit, and the end of the last one.
    commits: Vec<usize>,
    end: usize,
}

const COMMIT_HEADER: usize = 32;

/// Commit offsets and the end, from the headers (body length at bytes 20..24).
fn commit_layout(bytes: &[u8]) -> (Vec<usize>, usize) {
    let mut offsets = Vec::new();
    let mut pos = 0;
    while pos + COMMIT_HEADER <= bytes.len() && bytes[pos..pos + COMMIT_HEADER].iter().any(|&b| b != 0) {
        assert_eq!(&bytes[pos..pos + 4], &0x6368_7365u32.to_le_bytes(), "commit magic at {pos}");
        offsets.push(pos);
        let len = u32::from_le_bytes(bytes[pos + 20..pos + 24].try_into().unwrap()) as usize;
        pos += COMMIT_HEADER + len;
    }
    (offsets, pos)
}

fn make_journal(clean_stop: bool) -> Journal {
    let setup = Setup::new(&Opts { shards: 1, segment_bytes: 1 << 20, ..Opts::default() });
    let engine = setup.start();
    let mut c = engine.client();
    let acked: Vec<Acked> = (0..120)
        .map(|i| {
            let to = format!("user-{}", i % 7);
            let body = format!("message {i} {}", "d".repeat(i % 90));
            let r = c.send(&to, &body);
            assert_eq!(r.status, 202);
            Acked { id: r.json()["id"].as_str().unwrap().to_owned(), to, body }
        })
        .collect();
    if clean_stop {
        assert_eq!(engine.terminate(), Some(0));
    } else {
        engine.kill9();
    }
    let segment = single_segment(&setup.data_dir().join("shard-0"));
    let (commits, end) = commit_layout(&fs::read(&segment).unwrap());
    assert!(commits.len() >= 120, "one commit per sequential message: {}", commits.len());
    Journal { setup, acked, segment, commits, end }
}

fn single_segment(dir: &Path) -> PathBuf {
    let mut segs: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        // The next segment, allocated ahead (the spare): zeros, never written.
        .filter(|p| fs::read(p).unwrap().iter().any(|&b| b != 0))
        .collect();
    assert_eq!(segs.len(), 1, "{segs:?}");
    segs.pop().unwrap()
}

fn quarantine_files(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains(".quarantine-"))
        .collect()
}

/// A copy of the journal's data dir to damage (the original stays intact).
fn copy_of(j: &Journal) -> Setup {
    let copy = Setup::new(&Opts { shards: 1, segment_bytes: 1 << 20, ..Opts::default() });
    let status =
        std::process::Command::new("cp").arg("-a").arg(j.setup.data_dir()).arg(copy.dir.path()).status().unwrap();
    assert!(status.success());
    copy
}

fn segment_of(s: &Setup) -> PathBuf {
    single_segment(&s.data_dir().join("shard-0"))
}

fn damage(s: &Setup, f: impl FnOnce(&mut Vec<u8>)) {
    let seg = segment_of(s);
    let mut bytes = fs::read(&seg).unwrap();
    f(&mut bytes);
    fs::write(&seg, &bytes).unwrap();
}

/// The engine and `journal verify` both refuse, naming the file and the offset.
fn assert_refused(s: &Setup, offset: usize, case: &str) {
    let seg = segment_of(s);
    let name = seg.file_name().unwrap().to_str().unwrap().to_owned();
    let (code, out, err) = run_cli(&["journal", "verify", "--config", s.config.to_str().unwrap()]);
    assert_eq!(code, 1, "{case}: verify must report corruption: {out} {err}");
    assert!(out.contains(&name), "{case}: verify names the file: {out}");
    let err = Engine::try_start(&s.config).err().unwrap_or_else(|| panic!("{case}: the engine must refuse to start"));
    assert!(err.contains(&name), "{case}: the error names the file: {err}");
    assert!(err.contains(&format!("offset {offset}")), "{case}: the error names offset {offset}: {err}");
    assert!(
        quarantine_files(&s.data_dir().join("shard-0")).is_empty(),
        "{case}: nothing is cut before an operator says so"
    );
}

fn statuses(s: &Setup, acked: &[Acked]) -> HashMap<String, u16> {
    let engine = s.start();
    let mut c = engine.client();
    let out = acked.iter().map(|a| (a.id.clone(), c.get_status(&a.id).status)).collect();
    assert_eq!(engine.terminate(), Some(0));
    out
}

fn assert_all_present(s: &Setup, acked: &[Acked], case: &str) {
    let found = statuses(s, acked);
    let lost: Vec<_> = acked.iter().filter(|a| found[&a.id] != 200).map(|a| &a.id).collect();
    assert!(lost.is_empty(), "{case}: acknowledged messages lost: {lost:?}");
    // Offline too, bodies byte-identical.
    let (code, out, err) = run_cli(&["journal", "dump", "--config", s.config.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let dumped: HashMap<String, (String, String)> = out
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["id"].as_str().unwrap().to_owned(),
                (v["to"].as_str().unwrap().to_owned(), v["body"].as_str().unwrap().to_owned()),
            )
        })
        .collect();
    for a in acked {
        assert_eq!(dumped.get(&a.id), Some(&(a.to.clone(), a.body.clone())), "{case}: {} damaged", a.id);
    }
}

/// A case that must refuse to start: (name, offset of the first damaged commit, the damage).
type Case = (String, usize, Box<dyn Fn(&mut Vec<u8>)>);

fn refusing_cases(j: &Journal, clean: bool) -> Vec<Case> {
    let first_record = j.commits[0] + COMMIT_HEADER + 3; // in the segment header record
    let middle_commit = j.commits[j.commits.len() / 2];
    let last_commit = *j.commits.last().unwrap();
    let block = (j.end / 2) & !4095;
    let block_commit = *j.commits.iter().rev().find(|&&c| c <= block).unwrap();
    let block_first_damaged = if block_commit == block { block } else { block_commit };
    let mut cases: Vec<Case> = vec![
        ("flip in the first record".into(), j.commits[0], Box::new(move |b: &mut Vec<u8>| b[first_record] ^= 0x01)),
        ("flip in the middle".into(), middle_commit, Box::new(move |b: &mut Vec<u8>| b[middle_commit + 40] ^= 0x10)),
        (
            "zeroed 4 KiB block in the middle".into(),
            block_first_damaged,
            Box::new(move |b: &mut Vec<u8>| b[block..block + 4096].fill(0)),
        ),
    ];
    if clean {
        let end = j.end;
        cases.push((
            "flip inside the last commit".into(),
            last_commit,
            Box::new(move |b: &mut Vec<u8>| b[last_commit + 36] ^= 0x04),
        ));
        cases.push(("flip of the last byte".into(), last_commit, Box::new(move |b: &mut Vec<u8>| b[end - 1] ^= 0x80)));
    }
    cases
}

#[test]
fn after_a_clean_stop_every_damage_refuses_to_start_and_loses_nothing() {
    let j = make_journal(true);
    for (case, offset, f) in refusing_cases(&j, true) {
        let s = copy_of(&j);
        damage(&s, &*f);
        assert_refused(&s, offset, &case);
    }
    // The zeroed last block (the end of the journal vanished): the clean
    // marker says where it ended, so this is refused too.
    let s = copy_of(&j);
    let last_block = (j.end - 1) & !4095;
    damage(&s, |b| b[last_block..last_block + 4096].fill(0));
    let err = Engine::try_start(&s.config).err().expect("a vanished end after a clean stop is refused");
    assert!(err.contains("clean shutdown") || err.contains("corruption"), "{err}");
    // Undamaged, everything is there.
    assert_all_present(&copy_of(&j), &j.acked, "undamaged copy");
}

#[test]
fn after_kill_9_damage_before_the_last_commit_refuses_to_start() {
    let j = make_journal(false);
    for (case, offset, f) in refusing_cases(&j, false) {
        let s = copy_of(&j);
        damage(&s, &*f);
        assert_refused(&s, offset, &format!("{case} after kill -9"));
    }
}

#[test]
fn after_kill_9_a_torn_last_commit_is_quarantined_and_cut_losing_nothing_acknowledged() {
    let j = make_journal(false);
    // A crash mid-write: the next commit was half written (its header and
    // the first part of its records reached the disk, the rest did not).
    let s = copy_of(&j);
    let last = *j.commits.last().unwrap();
    let mut torn = Vec::new();
    damage(&s, |b| {
        let mut commit = b[last..j.end].to_vec();
        let seq = u64::from_le_bytes(commit[12..20].try_into().unwrap()) + 1;
        commit[12..20].copy_from_slice(&seq.to_le_bytes()); // header CRC now wrong too, as a torn header would be
        commit.truncate(commit.len() * 2 / 3);
        b[j.end..j.end + commit.len()].copy_from_slice(&commit);
        torn = commit;
    });
    let (code, out, _) = run_cli(&["journal", "verify", "--config", s.config.to_str().unwrap()]);
    assert_eq!(code, 0, "a torn last commit is not corruption: {out}");
    assert!(out.contains("torn last commit"), "{out}");
    assert_all_present(&s, &j.acked, "torn commit after kill -9");
    let q = quarantine_files(&s.data_dir().join("shard-0"));
    assert_eq!(q.len(), 1, "the cut range is kept aside: {q:?}");
    assert!(q[0].to_string_lossy().ends_with(&format!(".quarantine-{}", j.end)), "{q:?}");
    // The range ends at the last non-zero byte (zeros are what was never written).
    let written = torn.iter().rposition(|&b| b != 0).map_or(0, |p| p + 1);
    assert_eq!(fs::read(&q[0]).unwrap(), torn[..written], "the quarantine file holds exactly the cut bytes");
}

#[test]
fn after_kill_9_damage_to_the_last_commit_is_cut_but_kept_in_quarantine() {
    // Media damage to the last commit after a crash looks exactly like a
    // torn write: it is cut, and its bytes stay in the quarantine file.
    let j = make_journal(false);
    let s = copy_of(&j);
    let last = *j.commits.last().unwrap();
    let original = fs::read(&j.segment).unwrap()[last..j.end].to_vec();
    damage(&s, |b| b[j.end - 1] ^= 0x80);
    assert_all_present(&s, &j.acked[..j.acked.len() - 1], "flip of the last byte after kill -9");
    let q = quarantine_files(&s.data_dir().join("shard-0"));
    assert_eq!(q.len(), 1, "{q:?}");
    let kept = fs::read(&q[0]).unwrap();
    assert_eq!(kept.len(), original.len());
    assert_eq!(kept[..kept.len() - 1], original[..original.len() - 1], "the cut commit is kept byte for byte");
}

#[test]
fn repair_with_accept_loss_quarantines_and_keeps_what_follows() {
    let j = make_journal(true);
    let s = copy_of(&j);
    let victim = j.commits.len() / 2;
    let at = j.commits[victim];
    damage(&s, |b| b[at + 40] ^= 0x10);
    let cfg = s.config.to_str().unwrap().to_owned();
    let (code, _, err) = run_cli(&["journal", "repair", "--config", &cfg]);
    assert_eq!(code, 2, "repair without --accept-loss refuses: {err}");
    assert!(err.contains("--accept-loss"), "{err}");
    let (code, out, err) = run_cli(&["journal", "repair", "--config", &cfg, "--accept-loss"]);
    assert_eq!(code, 0, "{out} {err}");
    assert!(out.contains(&format!("bytes {at}..")), "repair names the range: {out}");
    assert_eq!(quarantine_files(&s.data_dir().join("shard-0")).len(), 1);
    let (code, out, _) = run_cli(&["journal", "verify", "--config", &cfg]);
    assert_eq!(code, 0, "{out}");
    // The damaged commit held one message (they were sent one by one);
    // every other one is kept, before and after it.
    let found = statuses(&s, &j.acked);
    let lost: Vec<usize> = (0..j.acked.len()).filter(|&i| found[&j.acked[i].id] != 200).collect();
    assert_eq!(lost.len(), 1, "only the damaged commit's message is lost: {lost:?}");
    assert!((victim.saturating_sub(2)..=victim).contains(&lost[0]), "lost {lost:?}, damaged commit {victim}");
}
