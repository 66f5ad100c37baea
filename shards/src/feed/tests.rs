//! The feed store over the real disk and over the simulated one: order,
//! positions that survive a restart, rolling, retention, and crashes that
//! tear or lose what was not yet durable.

use std::future::Future;

use super::*;
use crate::storage::{DmaStorage, SimStorage};

/// Runs `f` on an executor whose device probe saw a real block (see
/// `journal::probe_device`), as the engine's shards do.
fn run<F: Future<Output = ()> + 'static>(dir: &Path, f: impl FnOnce() -> F + Send + 'static) {
    let dir = dir.to_owned();
    glommio::LocalExecutorBuilder::default()
        .spawn(move || async move {
            crate::journal::probe_device(&dir).await.unwrap();
            f().await
        })
        .unwrap()
        .join()
        .unwrap();
}

fn event(n: usize) -> Vec<u8> {
    format!("{{\"id\":\"evt_{n}\",\"pad\":\"{}\"}}", "x".repeat(n % 97)).into_bytes()
}

fn cfg(dir: &Path) -> FeedConfig {
    FeedConfig::new(dir.join("events"), 7 * 86_400_000)
}

async fn read_all<S: Storage>(
    feed: &FeedStore<S>,
    client: &str,
    from: FeedPos,
    page: usize,
) -> (Vec<Vec<u8>>, FeedPos) {
    let mut out = Vec::new();
    let mut pos = from;
    loop {
        let (events, next) = feed.read(client, pos, page).await.unwrap();
        assert!(next >= pos, "a position never goes back");
        if events.is_empty() {
            return (out, next);
        }
        out.extend(events.into_iter().map(|e| e.json));
        pos = next;
    }
}

#[test]
fn entries_decode_and_damage_ends_the_file() {
    let mut buf = Vec::new();
    encode_entry(&mut buf, b"{\"a\":1}");
    encode_entry(&mut buf, b"{\"b\":2}");
    let Entry::Valid(first, n) = decode_entry(&buf) else { panic!() };
    assert_eq!(first, b"{\"a\":1}");
    assert_eq!(decode_entry(&buf[n..]), Entry::Valid(b"{\"b\":2}", n));
    assert_eq!(decode_entry(&buf[..n - 1]), Entry::Short { needed: n });
    assert_eq!(decode_entry(&[0u8; 64]), Entry::End);
    let mut bad = buf.clone();
    bad[10] ^= 1;
    assert_eq!(decode_entry(&bad), Entry::End);
    assert_eq!(parse_file_name(&file_name("acme/é", 42)), Some(("acme/é".to_owned(), 42)));
    assert_eq!(parse_file_name("zz.1.feed"), None);
}

#[test]
fn events_read_back_in_order_per_client_and_positions_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_owned();
    run(dir.path(), move || async move {
        let mid;
        {
            let feed = FeedStore::open(DmaStorage::default(), cfg(&path)).unwrap();
            let mut now = 1_000_000;
            for round in 0..50 {
                let a: Vec<Vec<u8>> = (0..round % 7 + 1).map(|i| event(round * 10 + i)).collect();
                let items: Vec<(&str, &[u8])> =
                    a.iter().map(|e| ("acme", e.as_slice())).chain([("beta", b"{\"b\":1}".as_slice())]).collect();
                feed.append(now, &items).await.unwrap();
                now += 10;
            }
            let (acme, end) = read_all(&feed, "acme", FeedPos::default(), 7).await;
            let want: Vec<Vec<u8>> = (0..50).flat_map(|r| (0..r % 7 + 1).map(move |i| event(r * 10 + i))).collect();
            assert_eq!(acme, want);
            let (beta, _) = read_all(&feed, "beta", FeedPos::default(), 1000).await;
            assert_eq!(beta.len(), 50);
            assert_eq!(read_all(&feed, "nobody", FeedPos::default(), 10).await.0.len(), 0);
            // A position in the middle resumes exactly after its event.
            let (first, at) = feed.read("acme", FeedPos::default(), 5).await.unwrap();
            assert_eq!(first.len(), 5);
            assert_eq!(read_all(&feed, "acme", at, 3).await.0, want[5..]);
            mid = (at, end);
        }
        // After a restart the same positions read the same events, and new
        // events go to a new file that reading from the old end reaches.
        let feed = FeedStore::open(DmaStorage::default(), cfg(&path)).unwrap();
        let (rest, _) = read_all(&feed, "acme", mid.0, 4).await;
        assert_eq!(rest.len(), (0..50).map(|r| r % 7 + 1).sum::<usize>() - 5);
        feed.append(2_000_000, &[("acme", b"{\"after\":\"restart\"}")]).await.unwrap();
        let (new, _) = read_all(&feed, "acme", mid.1, 10).await;
        assert_eq!(new, vec![b"{\"after\":\"restart\"}".to_vec()]);
        assert_eq!(feed.file_count(), 3, "acme: old and new file; beta: one");
    });
}

#[test]
fn files_roll_and_expire_and_a_position_in_a_deleted_file_reads_on() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_owned();
    run(dir.path(), move || async move {
        let mut c = cfg(&path);
        c.file_span_ms = 1000;
        c.file_bytes_max = 4096;
        c.retention_ms = 10_000;
        let feed = FeedStore::open(DmaStorage::default(), c).unwrap();
        // 100 events over 20 s: rolls by time, and by size in between.
        for i in 0..100u64 {
            let e = event(i as usize * 3);
            feed.append(1_000_000 + i * 200, &[("acme", e.as_slice())]).await.unwrap();
        }
        let files = feed.file_count();
        assert!(files >= 20, "{files} files");
        let (all, _) = read_all(&feed, "acme", FeedPos::default(), 9).await;
        assert_eq!(all.len(), 100);
        let (early, early_pos) = feed.read("acme", FeedPos::default(), 3).await.unwrap();
        assert_eq!(early.len(), 3);
        // At 1,031,000 ms, files whose span ended before 1,020,000 go.
        let removed = feed.expire(1_031_000);
        assert!(removed > 0 && removed < files, "{removed} of {files}");
        let (kept, _) = read_all(&feed, "acme", FeedPos::default(), 9).await;
        assert!(kept.len() < 100 && !kept.is_empty());
        // Every event whose file could still be inside the window is kept.
        let first_kept = String::from_utf8(kept[0].clone()).unwrap();
        let n: u64 = first_kept["{\"id\":\"evt_".len()..].split('"').next().unwrap().parse().unwrap();
        assert!(1_000_000 + (n / 3) * 200 <= 1_020_000, "kept from event {n}");
        // The old position now lies in a deleted file: reading goes on.
        let (after_old, _) = read_all(&feed, "acme", early_pos, 9).await;
        assert_eq!(after_old, kept);
        // The writer's file is never deleted, however old.
        feed.expire(u64::MAX / 2);
        assert_eq!(feed.file_count(), 1);
    });
}

#[test]
fn a_crash_keeps_every_durable_event_and_a_torn_tail_ends_the_file() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    // Seeds where part, but not all, of the unsynced append survived.
    let torn = Arc::new(AtomicUsize::new(0));
    for seed in 0..16u64 {
        let torn = torn.clone();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_owned();
        run(dir.path(), move || async move {
            let sim = SimStorage::default();
            let feed = Rc::new(FeedStore::open(sim.clone(), cfg(&path)).unwrap());
            let mut durable = Vec::new();
            for i in 0..40 {
                let e = event(i);
                feed.append(5_000 + i as u64, &[("acme", e.as_slice())]).await.unwrap();
                durable.push(e);
            }
            // A last append whose fdatasync never completes.
            sim.hold_syncs(true);
            let pending: Vec<Vec<u8>> = (40..60).map(event).collect();
            let f = feed.clone();
            let p = pending.clone();
            let task = glommio::spawn_local(async move {
                let items: Vec<(&str, &[u8])> = p.iter().map(|e| ("acme", e.as_slice())).collect();
                let _ = f.append(9_000, &items).await;
            })
            .detach();
            glommio::timer::sleep(std::time::Duration::from_millis(5)).await;
            // Nothing unsynced is visible to readers.
            let (seen, _) = read_all(&feed, "acme", FeedPos::default(), 100).await;
            assert_eq!(seen, durable);
            let mut rng = seed;
            let image = sim.torn_image(|_| {
                rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                rng >> 63 == 1
            });
            SimStorage::write_image(&image).unwrap();
            drop(task);
            // Restart on the real disk: every durable event, in order, then
            // maybe a prefix of the torn append, and never anything else.
            let feed = FeedStore::open(DmaStorage::default(), cfg(&path)).unwrap();
            let (seen, end) = read_all(&feed, "acme", FeedPos::default(), 7).await;
            assert_eq!(seen[..durable.len()], durable[..], "seed {seed}");
            assert_eq!(seen[durable.len()..], pending[..seen.len() - durable.len()], "seed {seed}");
            if seen.len() > durable.len() && seen.len() < durable.len() + pending.len() {
                torn.fetch_add(1, Ordering::Relaxed);
            }
            // Later events go to a new file and follow on.
            feed.append(20_000, &[("acme", b"{\"next\":1}")]).await.unwrap();
            let (next, _) = read_all(&feed, "acme", end, 7).await;
            assert_eq!(next, vec![b"{\"next\":1}".to_vec()]);
        });
    }
    assert!(torn.load(Ordering::Relaxed) >= 2, "the seeds must tear the last append somewhere inside it");
}

#[test]
fn an_event_larger_than_a_read_chunk_reads_back_whole() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_owned();
    run(dir.path(), move || async move {
        let feed = FeedStore::open(DmaStorage::default(), cfg(&path)).unwrap();
        let big = vec![b'x'; FEED_EVENT_BYTES_MAX];
        let items: Vec<(&str, &[u8])> = (0..6).map(|_| ("acme", big.as_slice())).collect();
        feed.append(1, &items).await.unwrap();
        let too_big = vec![b'x'; FEED_EVENT_BYTES_MAX + 1];
        assert!(feed.append(2, &[("acme", too_big.as_slice())]).await.is_err());
        drop(feed);
        let feed = FeedStore::open(DmaStorage::default(), cfg(&path)).unwrap();
        let (all, _) = read_all(&feed, "acme", FeedPos::default(), 100).await;
        assert_eq!(all.len(), 6);
        assert!(all.iter().all(|e| *e == big));
    });
}
