//! The journal writer over the real disk and over the simulated one with
//! faults: every record whose `wait_durable` returned Ok is found by
//! recovery, whatever failed or crashed after it.

use std::collections::HashSet;
use std::path::Path;

use super::*;
use crate::record::Accepted;
use crate::recovery::{recover_shard, Mode};
use crate::storage::{FaultKind, Faults, SimStorage};
use crate::Priority;

fn accepted(seq: u64, body: &[u8]) -> Record<'_> {
    Record::Accepted(Accepted {
        seq,
        client: "c",
        to: "u",
        priority: Priority::Normal,
        expires_at_ms: 0,
        accepted_at_ms: 1,
        body,
    })
}

fn run<F: Future<Output = ()> + 'static>(f: impl FnOnce() -> F + Send + 'static) {
    glommio::LocalExecutorBuilder::default().spawn(f).unwrap().join().unwrap();
}

fn cfg(dir: &Path, segment_bytes: u64) -> JournalConfig {
    JournalConfig { dir: dir.to_owned(), shard: 3, segment_bytes }
}

#[test]
fn appends_survive_reopen_and_rotate_and_a_clean_stop_is_marked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_owned();
    let p = path.clone();
    run(move || async move {
        let rec = recover_shard(&p, 3, Mode::Repair).unwrap();
        let j = Journal::open(cfg(&p, 64 * 1024), &rec).unwrap();
        glommio::spawn_local(j.clone().run_committer()).detach();
        let mut ix = MessageIndex::new();
        let body = vec![b'x'; 1000];
        let mut last = 0;
        for _ in 0..300 {
            let seq = j.take_seq();
            last = j.append(&accepted(seq, &body), &mut ix).unwrap().generation;
        }
        j.wait_durable(last).await.unwrap();
        assert!(j.commits() >= 1);
        j.close().await.unwrap();
    });
    let segs = crate::recovery::list_segments(&path).unwrap();
    assert!(segs.len() >= 4, "300 KB over 64 KiB segments must rotate: {segs:?}");
    let rec = recover_shard(&path, 3, Mode::ReadOnly).unwrap();
    assert_eq!(rec.index.len(), 300);
    assert_eq!(rec.next_seq, 300);
    assert!(rec.torn.is_none());
    assert!(rec.clean_shutdown.is_some(), "a clean stop leaves its marker");
    let p = path.clone();
    run(move || async move {
        let rec = recover_shard(&p, 3, Mode::Repair).unwrap();
        let j = Journal::open(cfg(&p, 64 * 1024), &rec).unwrap();
        assert!(!p.join(crate::recovery::CLEAN_MARKER).exists(), "opening the journal removes the marker");
        glommio::spawn_local(j.clone().run_committer()).detach();
        let mut ix = rec.index;
        let seq = j.take_seq();
        assert_eq!(seq, 300);
        let g = j.append(&accepted(seq, b"after restart"), &mut ix).unwrap().generation;
        j.wait_durable(g).await.unwrap();
        j.close().await.unwrap();
    });
    let rec = recover_shard(&path, 3, Mode::ReadOnly).unwrap();
    assert_eq!(rec.index.len(), 301);
    assert!(rec.index.get(300).is_some());
}

/// Appends `n` messages from `tasks` concurrent tasks over `storage`,
/// each waiting for durability; returns the sequence numbers acknowledged.
async fn append_concurrently(j: Rc<Journal<SimStorage>>, n: u64, tasks: u64) -> HashSet<u64> {
    let acked = Rc::new(RefCell::new(HashSet::new()));
    let index = Rc::new(RefCell::new(MessageIndex::new()));
    let mut handles = Vec::new();
    for t in 0..tasks {
        let (j, acked, index) = (j.clone(), acked.clone(), index.clone());
        handles.push(glommio::spawn_local(async move {
            for i in 0..n / tasks {
                let body = format!("task {t} message {i}");
                let seq = j.take_seq();
                let appended = j.append(&accepted(seq, body.as_bytes()), &mut index.borrow_mut());
                let Ok(a) = appended else { return };
                if j.wait_durable(a.generation).await.is_err() {
                    return;
                }
                acked.borrow_mut().insert(seq);
                glommio::yield_if_needed().await;
            }
        }));
    }
    for h in handles {
        h.await;
    }
    let acked = acked.borrow().clone();
    acked
}

fn recovered_seqs(dir: &Path) -> HashSet<u64> {
    recover(dir).0
}

/// Recovers (repair mode); returns the sequence numbers found and whether a torn commit was cut.
fn recover(dir: &Path) -> (HashSet<u64>, bool) {
    let rec = recover_shard(dir, 3, Mode::Repair).unwrap_or_else(|e| panic!("recovery failed: {e}"));
    if let Some(t) = &rec.torn {
        let q = t.quarantine.as_ref().expect("repair mode quarantines the cut range");
        assert_eq!(std::fs::metadata(q).unwrap().len(), t.damaged_bytes, "the whole cut range is kept aside");
    }
    ((0..rec.next_seq).filter(|&s| rec.index.get(s).is_some()).collect(), rec.torn.is_some())
}

fn fault_run(kind: FaultKind, at: u64) -> (HashSet<u64>, HashSet<u64>, Option<String>) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().to_owned();
    let (tx, rx) = std::sync::mpsc::channel();
    run(move || async move {
        let storage = SimStorage::with_faults(Faults::new(kind, at));
        let rec = recover_shard(&p, 3, Mode::Repair).unwrap();
        let j = Journal::open_with(storage.clone(), cfg(&p, 64 * 1024), &rec).unwrap();
        glommio::spawn_local(j.clone().run_committer()).detach();
        let acked = append_concurrently(j.clone(), 400, 8).await;
        let failure = j.failure().map(|f| f.to_string());
        SimStorage::write_image(&storage.crash_image()).unwrap();
        tx.send((acked, failure)).unwrap();
    });
    let (acked, failure) = rx.recv().unwrap();
    (acked, recovered_seqs(dir.path()), failure)
}

#[test]
fn a_failed_fdatasync_stops_the_journal_and_loses_nothing_acknowledged() {
    for at in [1, 2, 5, 17] {
        let (acked, recovered, failure) = fault_run(FaultKind::FailSync, at);
        let failure = failure.expect("the injected fault stops the journal");
        assert!(failure.contains("fdatasync"), "{failure}");
        assert!(acked.len() < 400, "appends after the failure are refused");
        let lost: Vec<_> = acked.difference(&recovered).collect();
        assert!(lost.is_empty(), "fdatasync #{at} failed: acknowledged but not recovered: {lost:?}");
    }
}

#[test]
fn a_failed_write_stops_the_journal_and_loses_nothing_acknowledged() {
    for at in [1, 3, 9] {
        let (acked, recovered, failure) = fault_run(FaultKind::FailWrite, at);
        assert!(failure.expect("stopped").contains("write"));
        let lost: Vec<_> = acked.difference(&recovered).collect();
        assert!(lost.is_empty(), "write #{at} failed: acknowledged but not recovered: {lost:?}");
    }
}

#[test]
fn a_crash_mid_write_tears_only_unacknowledged_commits() {
    // Crash with the write in flight: each of its sectors may or may not have
    // reached the disk. Recovery cuts the torn commit (quarantined) and
    // finds every acknowledged record.
    let mut torn = 0;
    for seed in 0..24u64 {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().to_owned();
        let (tx, rx) = std::sync::mpsc::channel();
        run(move || async move {
            let storage = SimStorage::default();
            let rec = recover_shard(&p, 3, Mode::Repair).unwrap();
            let j = Journal::open_with(storage.clone(), cfg(&p, 256 * 1024), &rec).unwrap();
            glommio::spawn_local(j.clone().run_committer()).detach();
            let acked = append_concurrently(j.clone(), 200 + seed * 10, 4).await;
            // More appends whose commit is written but never synced.
            storage.hold_syncs(true);
            let mut ix = MessageIndex::new();
            for _ in 0..20 {
                let seq = j.take_seq();
                let _ = j.append(&accepted(seq, b"never acknowledged"), &mut ix);
            }
            glommio::yield_if_needed().await;
            glommio::timer::sleep(std::time::Duration::from_micros(50)).await;
            let mut rng = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            let image = storage.torn_image(|_| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng % 2 == 0
            });
            SimStorage::write_image(&image).unwrap();
            tx.send(acked).unwrap();
        });
        let acked = rx.recv().unwrap();
        let (recovered, cut) = recover(dir.path());
        torn += cut as u32;
        let lost: Vec<_> = acked.difference(&recovered).collect();
        assert!(lost.is_empty(), "seed {seed}: acknowledged but not recovered: {lost:?}");
    }
    assert!(torn >= 6, "only {torn} of 24 crashes left a torn commit: the test does not exercise tearing");
}

#[test]
fn a_segment_is_deleted_only_once_the_records_that_settled_it_are_durable() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().to_owned();
    run(move || async move {
        let storage = SimStorage::default();
        let rec = recover_shard(&p, 3, Mode::Repair).unwrap();
        let j = Journal::open_with(storage.clone(), cfg(&p, 64 * 1024), &rec).unwrap();
        glommio::spawn_local(j.clone().run_committer()).detach();
        let mut ix = MessageIndex::new();
        let body = vec![b'x'; 1000];
        let mut seqs = Vec::new();
        for _ in 0..100 {
            let seq = j.take_seq();
            seqs.push(seq);
            let g = j.append(&accepted(seq, &body), &mut ix).unwrap().generation;
            j.wait_durable(g).await.unwrap();
        }
        // Ack everything, but the acks do not reach the disk yet.
        storage.hold_syncs(true);
        for &seq in &seqs {
            let ack = Record::Status(crate::record::StatusChange::plain(seq, crate::Status::Acked, 5));
            j.append(&ack, &mut ix).unwrap();
        }
        let (candidates, settled_by) = j.settled_segments(&ix);
        assert!(!candidates.is_empty(), "full segments are settled in the index");
        assert!(j.durable_generation() < settled_by, "by records not yet durable");
        // The caller (delivery::run_maintenance) waits for `settled_by`
        // before deleting; that it cannot complete while the acks are not
        // on disk is what keeps a crash from forgetting the messages.
        glommio::timer::sleep(std::time::Duration::from_millis(50)).await;
        assert!(j.durable_generation() < settled_by, "durable while the acks are still unsynced");
        storage.hold_syncs(false);
        j.wait_durable(settled_by).await.unwrap();
        let deleted = j.delete_settled_segments(&mut ix, &candidates).unwrap();
        assert_eq!(deleted, candidates.len());
    });
}

fn status(seq: u64) -> Record<'static> {
    Record::Status(crate::record::StatusChange {
        seq,
        status: crate::Status::Acked,
        at_ms: 2,
        notify: false,
        reason: crate::Reason::None,
    })
}

#[test]
fn lazy_records_ride_with_the_next_commit_or_go_alone_after_the_delay() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().to_owned();
    run(move || async move {
        let rec = recover_shard(&p, 3, Mode::Repair).unwrap();
        let j = Journal::open(cfg(&p, 16 << 20), &rec).unwrap();
        glommio::spawn_local(j.clone().run_committer()).detach();
        let mut ix = MessageIndex::new();
        let body = vec![b'x'; 100];
        let seq = j.take_seq();
        let first = j.append(&accepted(seq, &body), &mut ix).unwrap().generation;
        j.wait_durable(first).await.unwrap();

        // Timing checks are retried: a test thread descheduled for longer
        // than the delay (a loaded machine) proves nothing either way, and
        // an engine that commits lazy records at once (or makes a waiter
        // wait for the delay) fails every attempt.
        const ATTEMPTS: usize = 5;

        // Lazy records start no commit of their own...
        let seq2 = j.take_seq();
        let mut shown = false;
        for _ in 0..ATTEMPTS {
            j.wait_durable(j.appended_generation()).await.unwrap();
            let before = j.commits();
            let started = std::time::Instant::now();
            let lazy = j.append_lazy(&status(seq), &mut ix).unwrap().generation;
            glommio::timer::sleep(LAZY_COMMIT_DELAY / 5).await;
            let alone = j.commits() == before && j.durable_generation() < lazy;
            if started.elapsed() >= LAZY_COMMIT_DELAY {
                continue;
            }
            assert!(alone, "a lazy record alone waits");
            // ...and go with the next urgent one: one commit for both.
            let urgent = j.append(&accepted(seq2, &body), &mut ix).unwrap().generation;
            j.wait_durable(urgent).await.unwrap();
            assert_eq!(j.commits(), before + 1, "the lazy record rode with the urgent one");
            assert!(j.durable_generation() >= lazy);
            shown = true;
            break;
        }
        assert!(shown, "every attempt was descheduled past the delay");

        // Alone, a lazy record is committed after the delay.
        j.wait_durable(j.appended_generation()).await.unwrap();
        let before = j.commits();
        let started = std::time::Instant::now();
        let lazy = j.append_lazy(&status(seq2), &mut ix).unwrap().generation;
        while j.durable_generation() < lazy {
            assert!(started.elapsed() < LAZY_COMMIT_DELAY * 1000, "a lazy record must not wait forever");
            glommio::timer::sleep(std::time::Duration::from_micros(200)).await;
        }
        assert!(started.elapsed() >= LAZY_COMMIT_DELAY, "committed before its delay: {:?}", started.elapsed());
        assert_eq!(j.commits(), before + 1);

        // Waiting for one makes it due at once.
        let mut fastest = std::time::Duration::MAX;
        for _ in 0..ATTEMPTS {
            j.wait_durable(j.appended_generation()).await.unwrap();
            let started = std::time::Instant::now();
            let lazy = j.append_lazy(&status(seq), &mut ix).unwrap().generation;
            j.wait_durable(lazy).await.unwrap();
            fastest = fastest.min(started.elapsed());
            if fastest < LAZY_COMMIT_DELAY {
                break;
            }
        }
        assert!(fastest < LAZY_COMMIT_DELAY, "a waiter must not wait for the delay: {fastest:?} at best");

        // And the next lazy one waits again (the waiter's urgency is spent).
        let mut shown = false;
        for _ in 0..ATTEMPTS {
            j.wait_durable(j.appended_generation()).await.unwrap();
            let started = std::time::Instant::now();
            let lazy = j.append_lazy(&status(seq2), &mut ix).unwrap().generation;
            glommio::timer::sleep(LAZY_COMMIT_DELAY / 5).await;
            let waiting = j.durable_generation() < lazy;
            if started.elapsed() >= LAZY_COMMIT_DELAY {
                continue;
            }
            assert!(waiting, "urgency outlived its commit");
            shown = true;
            break;
        }
        assert!(shown, "every attempt was descheduled past the delay");
        j.close().await.unwrap();
    });
    let rec = recover_shard(dir.path(), 3, Mode::ReadOnly).unwrap();
    assert!(rec.torn.is_none());
    assert_eq!(rec.next_seq, 2);
}
