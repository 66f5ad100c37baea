//! The webhook offload thread against real local receivers (see
//! `outbound_support`). Every receiver checks every signature with its own
//! HMAC; timings are in milliseconds so each test takes under a few seconds.
//! Contract: Standard Webhooks 1.0 (docs/TESTING.md, webhook section).

mod outbound_support;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;

use esh3ar::outbound::{
    spawn, AttemptError, AttemptResult, BreakerState, EndpointId, Job, Outbound, OutboundUpdate, Report,
    ReportReceiver, ShardLink, TrySendError, WebhooksConfig,
};
use outbound_support::{always, Receiver, Reply};

fn fast_config() -> WebhooksConfig {
    WebhooksConfig {
        timeout_ms: 500,
        retry_base_ms: 5,
        retry_max_ms: 20,
        max_attempts: 15,
        breaker_failures: 100,
        breaker_open_ms: 200,
        max_in_flight_per_endpoint: 16,
        queue_capacity: 256,
        max_jobs_held: 1024,
    }
}

fn job(id: u64, endpoint: u32) -> Job {
    Job {
        id,
        shard: 0,
        endpoint: EndpointId(endpoint),
        webhook_id: format!("msg_{id:04}"),
        body: Bytes::from(format!(r#"{{"type":"message.delivered","n":{id}}}"#)),
        attempts: 0,
        not_before_unix_ms: 0,
        to: String::new(),
        yield_when_open: false,
    }
}

async fn next(reports: &mut ReportReceiver, within: Duration) -> Report {
    match tokio::time::timeout(within, reports.next()).await {
        Ok(Some(r)) => r,
        Ok(None) => panic!("report stream ended"),
        Err(_) => panic!("no report within {within:?}"),
    }
}

/// Reads reports until every job in `ids` has a final one; returns them all in order.
async fn until_final(reports: &mut ReportReceiver, ids: &[u64], within: Duration) -> Vec<Report> {
    let deadline = Instant::now() + within;
    let mut open: HashSet<u64> = ids.iter().copied().collect();
    let mut all = Vec::new();
    while !open.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        let r = next(reports, left).await;
        if !matches!(r, Report::Failed { .. }) {
            open.remove(&r.job());
        }
        all.push(r);
    }
    all
}

fn start(config: &WebhooksConfig, receivers: &[&Receiver]) -> (Outbound, ShardLink) {
    let endpoints = receivers.iter().enumerate().map(|(i, r)| r.endpoint(&format!("client{i}"))).collect();
    let (outbound, mut links) = spawn(config, endpoints, 1).unwrap();
    (outbound, links.remove(0))
}

#[tokio::test]
async fn retries_keep_the_webhook_id_and_sign_every_attempt_afresh() {
    let rx = Receiver::start(Arc::new(|i| if i < 2 { Reply::Status(500) } else { Reply::Ok }));
    let (_outbound, mut link) = start(&fast_config(), &[&rx]);
    link.jobs.try_send(job(7, 0)).unwrap();
    let reports = until_final(&mut link.reports, &[7], Duration::from_secs(3)).await;
    assert!(matches!(reports[0], Report::Failed { job: 7, attempts: 1, error: AttemptError::Status(500), .. }));
    assert!(matches!(reports[1], Report::Failed { job: 7, attempts: 2, error: AttemptError::Status(500), .. }));
    assert_eq!(reports[2], Report::Delivered { job: 7, attempts: 3, status: 200 });
    let seen = rx.seen();
    assert_eq!(seen.len(), 3);
    for s in &seen {
        assert!(s.signature_ok && s.content_type_ok, "{s:?}");
        assert_eq!(s.webhook_id, "msg_0007");
        assert_eq!(&s.body[..], br#"{"type":"message.delivered","n":7}"#);
    }
}

/// Retry-After: 1 (seconds) holds the next attempt back at least a second,
/// and that attempt carries a later, freshly signed timestamp.
#[tokio::test]
async fn retry_after_delays_the_next_attempt_and_timestamps_are_fresh() {
    let rx = Receiver::start(Arc::new(|i| if i == 0 { Reply::TooMany("1".into()) } else { Reply::Ok }));
    let (_outbound, mut link) = start(&fast_config(), &[&rx]);
    link.jobs.try_send(job(1, 0)).unwrap();
    let reports = until_final(&mut link.reports, &[1], Duration::from_secs(4)).await;
    let Report::Failed { error: AttemptError::Status(429), retry_at_unix_ms, .. } = reports[0] else {
        panic!("{reports:?}")
    };
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    assert!(retry_at_unix_ms <= now_ms, "retry_at is when the retry was due");
    assert_eq!(reports[1], Report::Delivered { job: 1, attempts: 2, status: 200 });
    let seen = rx.seen();
    let gap = seen[1].at - seen[0].at;
    assert!(gap >= Duration::from_millis(990), "retried after {gap:?}, before Retry-After");
    assert!(seen[1].timestamp_s > seen[0].timestamp_s, "timestamp not fresh: {seen:?}");
    assert!(seen.iter().all(|s| s.signature_ok && s.webhook_id == "msg_0001"));
}

#[tokio::test]
async fn every_job_is_delivered_at_least_once_through_a_flaky_receiver() {
    // Every third request fails: 500, then a hang (a timeout), then 503.
    let rx = Receiver::start(Arc::new(|i| match i % 9 {
        2 => Reply::Status(500),
        5 => Reply::Hang,
        8 => Reply::Status(503),
        _ => Reply::Ok,
    }));
    let config = WebhooksConfig { timeout_ms: 200, ..fast_config() };
    let (outbound, mut link) = start(&config, &[&rx]);
    let ids: Vec<u64> = (0..60).collect();
    for &id in &ids {
        link.jobs.try_send(job(id, 0)).unwrap();
    }
    let reports = until_final(&mut link.reports, &ids, Duration::from_secs(5)).await;
    let delivered: HashSet<u64> =
        reports.iter().filter(|r| matches!(r, Report::Delivered { .. })).map(Report::job).collect();
    assert_eq!(delivered.len(), ids.len(), "{reports:?}");
    let seen = rx.seen();
    assert!(seen.iter().all(|s| s.signature_ok));
    let ids_seen: HashSet<&str> = seen.iter().map(|s| s.webhook_id.as_str()).collect();
    assert_eq!(ids_seen.len(), ids.len());
    // Attempts reported per job add up to the requests the receiver saw.
    let attempts: u32 = reports
        .iter()
        .filter_map(|r| match r {
            Report::Delivered { attempts, .. } => Some(*attempts),
            _ => None,
        })
        .sum();
    assert_eq!(attempts as usize, seen.len());
    let status = outbound.status();
    assert_eq!(status.attempts(AttemptResult::Delivered), 60);
    assert!(status.attempts(AttemptResult::Timeout) >= 1);
    assert!(status.attempts(AttemptResult::HttpError) >= 1);
}

/// Requests 0-2 fail (the breaker opens), request 3 is the half-open probe
/// and fails (it reopens), request 4 is the next probe and succeeds (it
/// closes). One request in flight at a time so "consecutive" is exact.
#[tokio::test]
async fn breaker_opens_sends_nothing_while_open_probes_once_and_closes() {
    let open_ms = 300;
    let rx = Receiver::start(Arc::new(|i| if i < 4 { Reply::Status(500) } else { Reply::Ok }));
    let config = WebhooksConfig {
        breaker_failures: 3,
        breaker_open_ms: open_ms,
        max_in_flight_per_endpoint: 1,
        retry_base_ms: 1,
        retry_max_ms: 2,
        ..fast_config()
    };
    let (outbound, mut link) = start(&config, &[&rx]);
    let status = outbound.status();
    rx.watch(status.clone(), 0);
    let ids: Vec<u64> = (0..5).collect();
    for &id in &ids {
        link.jobs.try_send(job(id, 0)).unwrap();
    }
    for _ in 1..=3 {
        let r = next(&mut link.reports, Duration::from_secs(2)).await;
        assert!(matches!(r, Report::Failed { .. }), "{r:?}");
    }
    // The breaker was closed as each of the first three requests arrived
    // (what the receiver saw; reading the status between reports raced
    // with the next attempt on a loaded machine), and open after the third.
    let seen = rx.seen();
    assert!(seen.len() >= 3);
    for (n, s) in seen[..3].iter().enumerate() {
        assert_eq!(s.breaker, Some(BreakerState::Closed), "request {n}");
    }
    assert_eq!(status.breaker(0), Some(BreakerState::Open), "after three failures");
    assert_eq!(status.breakers().collect::<Vec<_>>(), vec![("webhook:client0".to_string(), "open")]);
    tokio::time::sleep(Duration::from_millis(open_ms / 2)).await;
    assert_eq!(rx.count(), 3, "a request went out while the breaker was open");
    let r = next(&mut link.reports, Duration::from_secs(2)).await; // the failed probe
    assert!(matches!(r, Report::Failed { .. }), "{r:?}");
    assert_eq!(status.breaker(0), Some(BreakerState::Open));
    let reports = until_final(&mut link.reports, &ids, Duration::from_secs(3)).await;
    assert_eq!(status.breaker(0), Some(BreakerState::Closed));
    assert_eq!(reports.iter().filter(|r| matches!(r, Report::Delivered { .. })).count(), 5);

    let seen = rx.seen();
    assert_eq!(seen.len(), 9, "5 deliveries + 4 failures, no attempt spent while open");
    let open = Duration::from_millis(open_ms);
    assert!(seen[3].at - seen[2].at >= open, "probe came {:?} after opening", seen[3].at - seen[2].at);
    assert!(seen[4].at - seen[3].at >= open, "second probe came {:?} after the first", seen[4].at - seen[3].at);
    assert_eq!(seen[3].breaker, Some(BreakerState::HalfOpen));
    assert_eq!(seen[4].breaker, Some(BreakerState::HalfOpen));
    // Attempts were spent only by requests: 4 failures + 5 deliveries.
    let attempts: u32 = reports
        .iter()
        .filter_map(|r| match r {
            Report::Delivered { attempts, .. } => Some(*attempts),
            _ => None,
        })
        .sum();
    assert_eq!(attempts, 9);
}

#[tokio::test]
async fn exhausted_after_max_attempts() {
    let rx = Receiver::start(always(Reply::Status(500)));
    let config = WebhooksConfig { max_attempts: 3, ..fast_config() };
    let (outbound, mut link) = start(&config, &[&rx]);
    link.jobs.try_send(job(1, 0)).unwrap();
    let spent = Job { attempts: 3, ..job(2, 0) };
    link.jobs.try_send(spent).unwrap();
    let reports = until_final(&mut link.reports, &[1, 2], Duration::from_secs(3)).await;
    assert!(reports.contains(&Report::Exhausted { job: 2, attempts: 3, error: None }));
    let of_1: Vec<&Report> = reports.iter().filter(|r| r.job() == 1).collect();
    assert_eq!(of_1.len(), 3, "{of_1:?}");
    assert!(matches!(of_1[0], Report::Failed { attempts: 1, .. }));
    assert!(matches!(of_1[1], Report::Failed { attempts: 2, .. }));
    assert_eq!(of_1[2], &Report::Exhausted { job: 1, attempts: 3, error: Some(AttemptError::Status(500)) });
    assert_eq!(rx.count(), 3, "the spent job must not be sent");
    let status = outbound.status();
    assert_eq!(status.attempts(AttemptResult::HttpError), 3);
    assert_eq!(status.exhausted(), 2);
}

/// A 3xx is a failure and is not followed (a signed request must not be
/// replayed to a host the client did not configure).
#[tokio::test]
async fn a_redirect_is_a_failure_and_is_not_followed() {
    let elsewhere = Receiver::start(always(Reply::Ok));
    let rx = Receiver::start(always(Reply::Redirect(elsewhere.url().to_string())));
    let config = WebhooksConfig { max_attempts: 2, ..fast_config() };
    let (_outbound, mut link) = start(&config, &[&rx]);
    link.jobs.try_send(job(1, 0)).unwrap();
    let reports = until_final(&mut link.reports, &[1], Duration::from_secs(2)).await;
    assert_eq!(
        reports.last(),
        Some(&Report::Exhausted { job: 1, attempts: 2, error: Some(AttemptError::Status(307)) })
    );
    assert_eq!(elsewhere.count(), 0);
}

/// A job re-sent after a restart with its journaled retry time waits for it.
#[tokio::test]
async fn a_job_waits_for_its_not_before_time() {
    let rx = Receiver::start(always(Reply::Ok));
    let (_outbound, mut link) = start(&fast_config(), &[&rx]);
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let t0 = Instant::now();
    link.jobs.try_send(Job { attempts: 4, not_before_unix_ms: now_ms + 300, ..job(1, 0) }).unwrap();
    let reports = until_final(&mut link.reports, &[1], Duration::from_secs(2)).await;
    assert_eq!(reports, vec![Report::Delivered { job: 1, attempts: 5, status: 200 }]);
    let waited = rx.seen()[0].at - t0;
    assert!(waited >= Duration::from_millis(280), "sent after {waited:?}");
}

#[tokio::test]
async fn in_flight_per_endpoint_never_exceeds_the_cap() {
    let slow = Receiver::start(always(Reply::SlowOk(Duration::from_millis(40))));
    let other = Receiver::start(always(Reply::SlowOk(Duration::from_millis(40))));
    let config = WebhooksConfig { max_in_flight_per_endpoint: 4, ..fast_config() };
    let (_outbound, mut link) = start(&config, &[&slow, &other]);
    let ids: Vec<u64> = (0..60).collect();
    for &id in &ids {
        link.jobs.try_send(job(id, (id % 2) as u32)).unwrap();
    }
    let reports = until_final(&mut link.reports, &ids, Duration::from_secs(5)).await;
    assert!(reports.iter().all(|r| matches!(r, Report::Delivered { attempts: 1, .. })), "{reports:?}");
    assert_eq!(slow.max_in_flight(), 4, "cap not reached or exceeded");
    assert_eq!(other.max_in_flight(), 4, "cap not reached or exceeded");
}

/// A 10 MB answer is not read (4 KiB at most), a body that never ends and a
/// receiver that never answers cost at most `timeout_ms` each.
#[tokio::test]
async fn huge_bodies_and_hung_receivers_cost_bounded_time() {
    let huge = Receiver::start(always(Reply::Huge));
    let endless = Receiver::start(always(Reply::Endless));
    let hung = Receiver::start(always(Reply::Hang));
    let config = WebhooksConfig { timeout_ms: 300, max_attempts: 1, ..fast_config() };
    let (_outbound, mut link) = start(&config, &[&huge, &endless, &hung]);
    let t0 = Instant::now();
    for e in 0..3 {
        link.jobs.try_send(job(e as u64, e)).unwrap();
    }
    let reports = until_final(&mut link.reports, &[0, 1, 2], Duration::from_secs(2)).await;
    let elapsed = t0.elapsed();
    assert!(elapsed < Duration::from_millis(1000), "took {elapsed:?}");
    let by_job: HashMap<u64, &Report> = reports.iter().map(|r| (r.job(), r)).collect();
    assert_eq!(by_job[&0], &Report::Delivered { job: 0, attempts: 1, status: 200 });
    assert_eq!(by_job[&1], &Report::Delivered { job: 1, attempts: 1, status: 200 });
    assert_eq!(by_job[&2], &Report::Exhausted { job: 2, attempts: 1, error: Some(AttemptError::Timeout) });
    // The client stopped reading and closed: hyper could not hand the socket
    // all 10 MB (what is sent bounds what the client could have read).
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(huge.streamed_bytes() < 10 << 20, "the whole 10 MB body was read ({})", huge.streamed_bytes());
}

#[tokio::test]
async fn a_receiver_that_was_down_gets_everything_when_it_comes_back() {
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    // Not listening yet: the endpoint points at a closed port.
    let url: url::Url = format!("http://{addr}/hook").parse().unwrap();
    let key = outbound_support::random_key();
    let secret = esh3ar::outbound::Secret::parse(&outbound_support::secret_text(&key)).unwrap();
    let endpoint = esh3ar::outbound::Endpoint { name: "down".into(), url, secret };
    let config = WebhooksConfig { breaker_failures: 3, breaker_open_ms: 100, retry_max_ms: 50, ..fast_config() };
    let (outbound, mut links) = spawn(&config, vec![endpoint], 1).unwrap();
    let mut link = links.remove(0);
    let ids: Vec<u64> = (0..10).collect();
    for &id in &ids {
        link.jobs.try_send(job(id, 0)).unwrap();
    }
    let r = next(&mut link.reports, Duration::from_secs(2)).await;
    assert!(matches!(r, Report::Failed { error: AttemptError::Connect, .. }), "{r:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(outbound.status().breaker(0), Some(BreakerState::Open));
    let back = Receiver::start_keyed(addr, key, always(Reply::Ok));
    let reports = until_final(&mut link.reports, &ids, Duration::from_secs(3)).await;
    let delivered = reports.iter().filter(|r| matches!(r, Report::Delivered { .. })).count();
    assert_eq!(delivered, 10);
    assert!(back.seen().iter().all(|s| s.signature_ok));
    assert_eq!(outbound.status().breaker(0), Some(BreakerState::Closed));
    assert!(outbound.status().attempts(AttemptResult::ConnectError) >= 3);
}

#[tokio::test]
async fn a_full_queue_refuses_jobs_without_waiting() {
    let rx = Receiver::start(always(Reply::Hang));
    let config = WebhooksConfig {
        queue_capacity: 2,
        max_jobs_held: 2,
        max_in_flight_per_endpoint: 1,
        timeout_ms: 2000,
        ..fast_config()
    };
    let (_outbound, mut link) = start(&config, &[&rx]);
    let mut full = None;
    for id in 0..20 {
        match link.jobs.try_send(job(id, 0)) {
            Ok(()) => tokio::time::sleep(Duration::from_millis(5)).await,
            Err(TrySendError::Full(j)) => {
                full = Some(j.id);
                break;
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    // 2 held + 2 in the channel + 1 slot for the one sender.
    assert_eq!(full, Some(5));
    let bad = Job { endpoint: EndpointId(9), ..job(99, 0) };
    assert!(matches!(link.jobs.try_send(bad), Err(TrySendError::Invalid(_))));
    let bad = Job { shard: 1, ..job(99, 0) };
    assert!(matches!(link.jobs.try_send(bad), Err(TrySendError::Invalid(_))), "another shard's job");
    let bad = Job { webhook_id: "has space".into(), ..job(99, 0) };
    assert!(matches!(link.jobs.try_send(bad), Err(TrySendError::Invalid(_))));
}

/// Dropping every job sender ends the thread once the attempt in flight is
/// done, and its report still arrives; a job waiting for a retry does not
/// hold shutdown up.
#[tokio::test]
async fn dropping_the_senders_ends_the_thread_after_in_flight_attempts() {
    let rx = Receiver::start(Arc::new(|i| match i {
        0 => Reply::SlowOk(Duration::from_millis(200)),
        _ => Reply::Status(500),
    }));
    let config =
        WebhooksConfig { retry_base_ms: 10_000, retry_max_ms: 10_000, max_in_flight_per_endpoint: 1, ..fast_config() };
    let (outbound, link) = start(&config, &[&rx]);
    let ShardLink { mut jobs, mut reports } = link;
    jobs.try_send(job(1, 0)).unwrap();
    jobs.try_send(job(2, 0)).unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(jobs);
    let t0 = Instant::now();
    let joined = tokio::task::spawn_blocking(move || outbound.join());
    let mut got = Vec::new();
    while let Some(r) = tokio::time::timeout(Duration::from_secs(2), reports.next()).await.unwrap() {
        got.push(r);
    }
    joined.await.unwrap().unwrap();
    assert!(t0.elapsed() < Duration::from_millis(1000), "shutdown took {:?}", t0.elapsed());
    assert!(got.contains(&Report::Delivered { job: 1, attempts: 1, status: 200 }), "{got:?}");
}

/// The shard side is a glommio executor: it hands jobs over with `try_send`
/// and reads its reports on its own runtime while the offload thread runs tokio.
#[test]
fn a_glommio_shard_drives_the_offload_thread() {
    let rx = Receiver::start(Arc::new(|i| if i % 4 == 1 { Reply::Status(500) } else { Reply::Ok }));
    let (outbound, links) = spawn(&fast_config(), vec![rx.endpoint("acme")], 2).unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let shards: Vec<_> = links
        .into_iter()
        .enumerate()
        .map(|(shard, link)| {
            let done = done.clone();
            glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
                .name(&format!("shard{shard}"))
                .spawn(move || async move {
                    let ShardLink { mut jobs, mut reports } = link;
                    let ids: Vec<u64> = (0..20).map(|n| shard as u64 * 1000 + n).collect();
                    for &id in &ids {
                        jobs.try_send(Job { shard, ..job(id, 0) }).unwrap();
                    }
                    let mut delivered = HashSet::new();
                    let deadline = Instant::now() + Duration::from_secs(5);
                    while delivered.len() < ids.len() && Instant::now() < deadline {
                        let timeout = async {
                            glommio::timer::sleep(Duration::from_millis(100)).await;
                            None
                        };
                        if let Some(Report::Delivered { job, .. }) =
                            futures_lite::future::or(reports.next(), timeout).await
                        {
                            assert!(ids.contains(&job), "shard {shard} got another shard's report");
                            delivered.insert(job);
                        }
                    }
                    assert_eq!(delivered.len(), ids.len());
                    done.store(true, Ordering::SeqCst);
                    drop(jobs);
                })
                .unwrap()
        })
        .collect();
    for s in shards {
        s.join().unwrap();
    }
    assert!(done.load(Ordering::SeqCst));
    outbound.join().unwrap();
    assert!(rx.seen().iter().all(|s| s.signature_ok));
}

/// Endpoints added at runtime: a job for an id not announced yet is
/// refused by the sender; once the update is queued the job is taken even
/// if the thread reads the job channel first (20 rounds, each a fresh
/// endpoint sent right after its update); an existing endpoint moved to
/// another receiver keeps its id; the status list grows with them; and a
/// new `timeout_ms` holds for the next attempt.
#[tokio::test]
async fn endpoints_grow_at_runtime_and_keep_their_ids() {
    let first = Receiver::start(always(Reply::Ok));
    let moved = Receiver::start(always(Reply::Ok));
    let (outbound, mut link) = start(&fast_config(), &[&first]);
    let mut control = outbound.control();
    assert_eq!(control.endpoints(), 1);
    assert!(matches!(link.jobs.try_send(job(100, 1)), Err(TrySendError::Invalid(_))), "not announced yet");
    let added: Vec<Receiver> = (0..20).map(|_| Receiver::start(always(Reply::Ok))).collect();
    for (i, rx) in added.iter().enumerate() {
        let id = 1 + i as u32;
        let update = OutboundUpdate {
            webhooks: fast_config(),
            endpoints: vec![
                (EndpointId(0), first.endpoint("client0")),
                (EndpointId(id), rx.endpoint(&format!("late{i}"))),
            ],
            providers: Vec::new(),
        };
        // The control channel holds a few changes: wait while it is full.
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut update = Box::new(update);
        while let Err(e) = control.try_send(update) {
            assert!(e.is_full() && Instant::now() < deadline, "{e:?}");
            update = e.into_inner();
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(control.endpoints(), id + 1);
        link.jobs.try_send(job(u64::from(id), id)).unwrap();
    }
    let ids: Vec<u64> = (1..=20).collect();
    let reports = until_final(&mut link.reports, &ids, Duration::from_secs(5)).await;
    assert!(reports.iter().all(|r| matches!(r, Report::Delivered { .. })), "{reports:?}");
    for (i, rx) in added.iter().enumerate() {
        let seen = rx.seen();
        assert_eq!(seen.len(), 1, "endpoint {} got {seen:?}", i + 1);
        assert!(seen[0].signature_ok && seen[0].webhook_id == format!("msg_{:04}", i + 1));
    }
    let names: Vec<String> = outbound.status().breakers().map(|(n, _)| n).collect();
    assert_eq!(names.len(), 21);
    assert_eq!((names[0].as_str(), names[20].as_str()), ("webhook:client0", "webhook:late19"));

    // Endpoint 0 moves; then a 10 ms timeout cuts a receiver that hangs.
    let update = OutboundUpdate {
        webhooks: fast_config(),
        endpoints: vec![(EndpointId(0), moved.endpoint("client0"))],
        providers: Vec::new(),
    };
    control.try_send(Box::new(update)).unwrap();
    assert_eq!(control.endpoints(), 21, "no new id: the count stays");
    link.jobs.try_send(job(200, 0)).unwrap();
    let reports = until_final(&mut link.reports, &[200], Duration::from_secs(3)).await;
    assert_eq!(reports, [Report::Delivered { job: 200, attempts: 1, status: 200 }]);
    assert_eq!(moved.count(), 1);
    assert_eq!(first.count(), 0, "nothing goes to the old URL");
    let hang = Receiver::start(always(Reply::Hang));
    let update = OutboundUpdate {
        webhooks: WebhooksConfig { timeout_ms: 10, max_attempts: 1, ..fast_config() },
        endpoints: vec![(EndpointId(0), hang.endpoint("client0"))],
        providers: Vec::new(),
    };
    control.try_send(Box::new(update)).unwrap();
    let started = Instant::now();
    link.jobs.try_send(job(201, 0)).unwrap();
    let reports = until_final(&mut link.reports, &[201], Duration::from_secs(3)).await;
    assert!(
        matches!(reports[..], [Report::Exhausted { job: 201, error: Some(AttemptError::Timeout), .. }]),
        "{reports:?}"
    );
    assert!(started.elapsed() < Duration::from_millis(400), "the old 500 ms timeout held: {:?}", started.elapsed());
}
