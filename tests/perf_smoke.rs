//! Smoke runs of the bundled harness (`esh3ar-perf`, docs/PERFORMANCE.md)
//! against the real engine binary: seconds of tiny load in each scenario,
//! so the harness cannot rot. No figure is checked (benchmarks are never
//! timed tests); what must hold is checked: messages flow, every accepted
//! message is delivered, no duplicates, no errors, the reports round-trip.

use esh3ar_perf::cli::{check_all_accepted, run, run_args};
use esh3ar_perf::report::{compare, markdown_table, Report};

fn perf(args: &[&str]) -> Report {
    let mut all = vec!["--engine-bin", env!("CARGO_BIN_EXE_esh3ar"), "--cpus", "none", "--warmup", "200ms"];
    all.extend_from_slice(args);
    let args = run_args(&all).expect("valid esh3ar-perf arguments");
    run(&args).unwrap_or_else(|e| panic!("esh3ar-perf {all:?} failed: {e:#}"))
}

fn assert_clean(r: &Report) {
    assert!(r.errors.is_empty(), "errors: {:?}\n{}", r.errors, r.human());
    assert_eq!(r.lost, 0, "accepted but never delivered\n{}", r.human());
    assert_eq!(r.duplicates, 0, "{}", r.human());
}

#[test]
fn e2e_closed_loop_delivers_everything_once() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("e2e.json");
    let r = perf(&[
        "--scenario",
        "e2e",
        "--connections",
        "4",
        "--receivers",
        "8",
        "--duration",
        "1s",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_clean(&r);
    assert!(r.accepted > 0, "{}", r.human());
    let delivery = r.delivery.as_ref().expect("e2e reports delivery latency");
    assert!(delivery.count > 0 && delivery.p50_ms > 0.0, "{}", r.human());
    let after = r.extra.get("after_accept_p99_ms").copied();
    assert!(after.is_some_and(f64::is_finite), "{}", r.human());
    let back = Report::load(&out).unwrap();
    assert_eq!(back.accepted, r.accepted);
    assert!(compare(&back, &r).contains("throughput msg/s"));
    assert!(markdown_table(&[back], "ceiling").contains("| esh3ar | e2e |"));
}

/// The same with the receivers on the SignalR hub (`--mobile-protocol
/// signalr`): handshake, `ReceiveMessage`, `AckMany`; nothing lost or doubled.
#[test]
fn e2e_over_signalr_delivers_everything_once() {
    let r = perf(&[
        "--scenario",
        "e2e",
        "--connections",
        "4",
        "--receivers",
        "8",
        "--duration",
        "1s",
        "--mobile-protocol",
        "signalr",
    ]);
    assert_clean(&r);
    assert!(r.accepted > 0, "{}", r.human());
    let delivery = r.delivery.as_ref().expect("e2e reports delivery latency");
    assert!(delivery.count > 0 && delivery.p50_ms > 0.0, "{}", r.human());
}

#[test]
fn open_loop_batch_drain_and_idle_connections() {
    let mut open = perf(&["--model", "open", "--rate", "200", "--connections", "4", "--duration", "1s"]);
    // On a loaded machine a debug-built generator can fall behind its
    // schedule; the open loop counts those sends instead of hiding them,
    // which is what it is for. Any other error is a defect.
    let behind = open.errors.remove("unsent_behind_schedule").unwrap_or(0);
    assert_clean(&open);
    assert!(open.accepted + behind >= 150, "{}", open.human());
    assert!(open.accepted > 0, "{}", open.human());

    let batch = perf(&["--scenario", "batch", "--batch-size", "10", "--connections", "2", "--duration", "1s"]);
    assert_clean(&batch);
    assert!(batch.accepted >= 10 * batch.requests.min(1), "{}", batch.human());

    let drain = perf(&["--scenario", "offline-drain", "--messages", "200", "--receivers", "10", "--connections", "4"]);
    assert_clean(&drain);
    assert_eq!(drain.delivery.as_ref().map(|d| d.count), Some(200), "{}", drain.human());

    let idle = perf(&["--scenario", "idle-connections", "--receivers", "20", "--duration", "0s"]);
    assert!(idle.errors.is_empty(), "{}", idle.human());
    assert_eq!(idle.extra.get("connections_open"), Some(&20.0), "{}", idle.human());
    assert!(idle.extra.contains_key("server_rss_per_connection_bytes"), "{}", idle.human());
}

#[test]
fn overload_reports_a_shedding_profile() {
    let r = perf(&["--scenario", "overload", "--connections", "30", "--duration", "1s"]);
    let p = r.overload.as_ref().expect("overload reports its profile");
    assert_eq!(p.memory_limit_bytes, 96 << 20, "{}", r.human());
    assert_eq!(p.transport_errors, 0, "{}", r.human());
    assert!(p.totals.get("202").is_some_and(|by| by.len() == 3), "{}", r.human());
    assert!(p.rss_max_bytes > 0 && !p.rss_per_s.is_empty(), "{}", r.human());
    assert!(r.errors.keys().all(|k| k == "503"), "{}", r.human());
}

#[test]
fn many_connections_closed_loop_on_two_shards_are_all_accepted() {
    // The gate of the 10,000-connection run (docs/PERFORMANCE.md), small:
    // a full cross-shard channel holds a sender, it never refuses it.
    let r = perf(&["--connections", "300", "--server-threads", "2", "--duration", "1s", "--require-all-accepted"]);
    check_all_accepted(&r).unwrap_or_else(|e| panic!("{e:#}\n{}", r.human()));
    assert!(r.accepted > 300, "{}", r.human());
}

#[test]
fn accept_all_counts_every_answer_by_status() {
    // The harness's side only: the engine's zero-503 guarantee is checked
    // by the integration tests, not here.
    let r = perf(&["--scenario", "accept-all", "--connections", "200", "--duration", "2s"]);
    assert_eq!(r.scenario, "accept-all");
    assert_eq!(r.connections, 200, "{}", r.human());
    let p = r.overload.as_ref().expect("accept-all reports answers by status");
    assert_eq!(p.memory_limit_bytes, 4 << 30, "{}", r.human());
    assert!(p.rss_max_bytes > 0, "{}", r.human());
    let accepted = p.totals.get("202").and_then(|by| by.get("normal")).copied().unwrap_or(0);
    assert!(accepted >= r.accepted && r.accepted > 0, "{}", r.human());
    let refused: u64 = p.totals.iter().filter(|(k, _)| *k != "202").flat_map(|(_, by)| by.values()).sum();
    let errors: u64 = r.errors.iter().filter(|(k, _)| !k.starts_with("connect")).map(|(_, v)| v).sum();
    assert!(refused >= errors, "every measured error is in the totals\n{}", r.human());
    assert_eq!(r.not_accepted(), refused + (r.error_count() - errors), "{}", r.human());
    let per_s: u64 = p.per_s.iter().flat_map(|m| m.values()).flat_map(|by| by.values()).sum();
    assert_eq!(per_s, accepted + refused, "per-second rows add up to the totals\n{}", r.human());
    assert!(r.extra.contains_key("server_rss_max_bytes"), "{}", r.human());
}

#[test]
fn receipts_compares_runs_without_and_with_webhooks_and_every_event_arrives() {
    let r = perf(&["--scenario", "receipts", "--connections", "4", "--receivers", "8", "--duration", "1s"]);
    assert_clean(&r);
    assert_eq!(r.scenario, "receipts");
    let get = |k: &str| *r.extra.get(k).unwrap_or_else(|| panic!("no {k} in\n{}", r.human()));
    assert!(get("baseline_msg_per_s") > 0.0 && get("ingest_ratio") > 0.0, "{}", r.human());
    let accepted_all = get("accepted_all");
    assert!(accepted_all >= r.accepted as f64, "{}", r.human());
    // Every accepted message owes `delivered` and `acked`: all arrived.
    assert_eq!(get("events_received"), 2.0 * accepted_all, "{}", r.human());
    assert_eq!(get("events_owed_at_end"), 0.0, "{}", r.human());
    for k in ["lag_delivered_p50_ms", "lag_delivered_p99_ms", "lag_acked_p50_ms", "lag_acked_p99_ms"] {
        assert!(get(k) > 0.0, "{k}\n{}", r.human());
    }
    assert!(get("lag_acked_p99_ms") >= get("lag_acked_p50_ms"));
}

/// The fallback scenario, small: users registered with a phone, every
/// message falls back at once to the harness's fake WhatsApp provider;
/// each accepted message reaches it exactly once, and the report carries
/// the figures docs/PERFORMANCE.md quotes.
#[test]
fn fallback_reaches_the_fake_provider_once_per_message() {
    let r = perf(&[
        "--scenario",
        "fallback",
        "--connections",
        "2",
        "--users",
        "50",
        "--duration",
        "1s",
        "--drain-timeout",
        "30s",
    ]);
    assert_eq!(r.scenario, "fallback");
    assert!(r.errors.is_empty(), "errors: {:?}\n{}", r.errors, r.human());
    let x = |k: &str| *r.extra.get(k).unwrap_or_else(|| panic!("no `{k}` in the report\n{}", r.human()));
    let accepted = x("accepted_all");
    assert!(accepted > 10.0, "{}", r.human());
    assert_eq!(x("provider_unique"), accepted, "every accepted message reaches the provider\n{}", r.human());
    assert_eq!(x("owed_at_end"), 0.0, "{}", r.human());
    assert_eq!(x("provider_duplicates"), 0.0, "{}", r.human());
    assert_eq!(x("provider_bad_requests"), 0.0, "{}", r.human());
    assert_eq!(x("delivered_whatsapp"), accepted, "{}", r.human());
    assert_eq!(x("users_registered"), 50.0, "{}", r.human());
    for k in [
        "baseline_msg_per_s",
        "baseline_accept_p50_ms",
        "baseline_accept_p99_ms",
        "ingest_ratio",
        "accept_p99_ratio",
        "provider_calls",
        "provider_calls_per_s",
        "provider_lag_p50_ms",
        "provider_lag_p99_ms",
        "provider_lag_from_send_p99_ms",
        "drain_s",
    ] {
        assert!(x(k).is_finite(), "{k}\n{}", r.human());
    }
    // The provider answers after 50 ms: no call can take less from the send.
    assert!(x("provider_lag_from_send_p50_ms") > 0.0, "{}", r.human());
}

/// The backlog scenario, tiny: a fill through the batch endpoint, `kill -9`
/// and a restart on the same data dir, then some of the users drain; every
/// message accepted for them arrives once. No figure is checked.
#[test]
fn backlog_survives_a_restart_and_every_owed_message_is_drained() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("backlog.json");
    let r = perf(&[
        "--scenario",
        "backlog",
        "--messages",
        "2000",
        "--receivers",
        "200",
        "--drain-users",
        "50",
        "--batch",
        "50",
        "--connections",
        "2",
        "--drain-timeout",
        "30s",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(r.scenario, "backlog");
    let p = r.backlog.as_ref().expect("a backlog report has its profile");
    assert_eq!(p.answers.get("202"), Some(&2000), "every message accepted under 1 GiB\n{}", r.human());
    assert_eq!(r.accepted, 2000, "{}", r.human());
    let x = |k: &str| *r.extra.get(k).unwrap_or_else(|| panic!("no `{k}` in the report\n{}", r.human()));
    assert_eq!(x("drain_owed"), 500.0, "50 of 200 users own a quarter\n{}", r.human());
    assert_eq!(x("missing"), 0.0, "{}", r.human());
    assert_eq!(x("unexpected"), 0.0, "{}", r.human());
    assert_eq!(r.duplicates, 0, "{}", r.human());
    assert_eq!(r.delivery.as_ref().map(|d| d.count), Some(500), "{}", r.human());
    assert!(x("restart_seconds") > 0.0 && x("rss_bytes_after_restart") > 0.0, "{}", r.human());
    let last = p.samples.last().expect("samples over the fill");
    assert!(p.samples.len() >= 2 && last.accepted == 2000 && last.disk_bytes > 0, "{}", r.human());
    assert!(out.with_extension("csv").exists());
    let back = Report::load(&out).unwrap();
    assert_eq!(back.backlog, r.backlog);
    assert!(esh3ar_perf::backlog::table(&[back]).contains("| 2000 → 200 | 2000 | 0 |"));
}

/// The replay scenario, tiny: about 2 MB of journal, two `kill -9`s and
/// restarts; the figures come from the engine's own `journal recovered`
/// line, and every accepted message is back in the rebuilt index. No
/// figure is checked.
#[test]
fn replay_restarts_and_reads_the_engines_replay_figures() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("replay.json");
    let r = perf(&[
        "--scenario",
        "replay",
        "--journal-bytes",
        "2000000",
        "--restarts",
        "2",
        "--receivers",
        "50",
        "--batch",
        "50",
        "--connections",
        "2",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(r.scenario, "replay");
    assert!(r.errors.is_empty(), "errors: {:?}\n{}", r.errors, r.human());
    let x = |k: &str| *r.extra.get(k).unwrap_or_else(|| panic!("no `{k}` in the report\n{}", r.human()));
    assert!(r.accepted > 0, "{}", r.human());
    assert_eq!(x("replay_figures_from_engine"), 1.0, "{}", r.human());
    assert_eq!(x("replay_messages"), r.accepted as f64, "every message is pending, none spilled\n{}", r.human());
    assert!(x("replay_bytes") > 1_000_000.0 && x("journal_bytes_on_disk") > 1_000_000.0, "{}", r.human());
    assert!(x("replay_mb_per_s_median") > 0.0 && x("restart_seconds_median") > 0.0, "{}", r.human());
    assert!(r.extra.contains_key("replay_mb_per_s_2"), "{}", r.human());
    let back = Report::load(&out).unwrap();
    assert_eq!(back.extra.keys().collect::<Vec<_>>(), r.extra.keys().collect::<Vec<_>>());
    assert_eq!((back.scenario, back.accepted), (r.scenario, r.accepted));
}
