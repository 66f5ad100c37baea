//! `GET /metrics` against the real binary: a known load (202s, 429s from a
//! low rate limit, 400s, 401s, 404s, a batch, a phone that receives and
//! acks), then a scrape parsed by Prometheus' own Python parser
//! (`prometheus_client.parser.text_string_to_metric_families`, as
//! docs/TESTING.md advises), whose names, types and values must agree with
//! what this harness counted, exactly. `scripts/test.sh` installs
//! `prometheus_client` when it is missing; without it this test fails, it
//! never skips.

mod common;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const LIMITED_KEY: &str = "limited-key-0123456789abcdef";
/// `messages_per_minute` of the `limited` client.
const LIMIT: usize = 10;

/// Parses an exposition with the reference parser. Returns, per family,
/// its type and its samples as (sample name, labels, value).
type Families = BTreeMap<String, (String, Vec<(String, BTreeMap<String, String>, f64)>)>;

const PARSER: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = {}
for f in text_string_to_metric_families(sys.stdin.read()):
    out[f.name] = [f.type, [[s.name, s.labels, s.value] for s in f.samples]]
print(json.dumps(out))
"#;

fn parse(text: &str) -> Families {
    let mut child = Command::new("python3")
        .args(["-c", PARSER])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 is needed to parse /metrics (scripts/test.sh installs it)");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the Prometheus parser refused the exposition (or prometheus_client is missing: run scripts/test.sh): {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn scrape(engine: &Engine) -> (String, Families) {
    let r = Client::connect(engine.admin).request("GET", "/metrics", None, None);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert!(r.header("content-type").unwrap().starts_with("text/plain; version=0.0.4"));
    let text = String::from_utf8(r.body).unwrap();
    let families = parse(&text);
    (text, families)
}

/// The value of sample `name` with exactly `labels` (summed over any other
/// labels when `sum_others`, e.g. `shard`).
fn value(f: &Families, family: &str, name: &str, labels: &[(&str, &str)], sum_others: bool) -> f64 {
    let (_, samples) = f.get(family).unwrap_or_else(|| panic!("family {family} missing"));
    samples
        .iter()
        .filter(|(n, l, _)| {
            n == name
                && labels.iter().all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
                && (sum_others || l.len() == labels.len())
        })
        .map(|(_, _, v)| v)
        .sum()
}

fn setup() -> Setup {
    Setup::new(&Opts {
        extra_toml: format!(
            "[tiers.tiny]\nmessages_per_minute = {LIMIT}\n\n[[clients]]\nid = \"limited\"\napi_key = \"{LIMITED_KEY}\"\ntier = \"tiny\"\n"
        ),
        ..Opts::default()
    })
}

/// What the harness saw, by (route, code).
#[derive(Default)]
struct Seen {
    answers: BTreeMap<(&'static str, u16), u64>,
}

impl Seen {
    fn count(&mut self, route: &'static str, r: &Response) {
        *self.answers.entry((route, r.status)).or_default() += 1;
    }
    fn of(&self, code: u16) -> u64 {
        self.answers.iter().filter(|((_, c), _)| *c == code).map(|(_, n)| n).sum()
    }
}

/// Every family the issue lists (of the features built so far) is present
/// with its type; counts agree exactly with the load this test ran.
#[test]
fn metrics_agree_with_the_load_exactly() {
    let setup = setup();
    let engine = setup.start();
    let mut seen = Seen::default();
    let mut accepted_messages = 0u64;

    // A phone that will receive three messages and ack two.
    let mut phone = Phone::connect(engine.mobile, &token(&setup.config, "phone-1", 3600)).expect("phone connects");
    let mut acme = engine.client();
    for i in 0..3 {
        let r = acme.send("phone-1", &format!("to the phone {i}"));
        assert_eq!(r.status, 202);
        seen.count("/v1/messages", &r);
        accepted_messages += 1;
    }
    let frames = phone.recv_n(3, Duration::from_secs(10));
    assert_eq!(frames.len(), 3, "the phone gets its three messages");
    let ids: Vec<String> = frames.iter().map(|f| f["id"].as_str().unwrap().to_owned()).collect();
    phone.ack_many(&ids[..2]);

    // 40 single sends to users spread over both shards.
    for i in 0..40 {
        let r = acme.send(&format!("user-{i}"), "hello");
        assert_eq!(r.status, 202);
        seen.count("/v1/messages", &r);
        accepted_messages += 1;
    }
    // One batch of 4 valid items and 1 invalid one: one 202 answer.
    let batch = r#"{"messages":[{"to":"b1","body":"x"},{"to":"b2","body":"x"},{"to":"b3","body":"x"},{"to":"b4","body":"x"},{"to":"","body":"x"}]}"#;
    let r = acme.request("POST", "/v1/messages/batch", Some(API_KEY), Some(batch));
    assert_eq!(r.status, 202);
    seen.count("/v1/messages/batch", &r);
    accepted_messages += 4;
    // 400s (bad JSON, a missing field), 401s (a wrong key), 404s.
    for body in ["{not json", r#"{"body":"no recipient"}"#, r#"{"to":"x"}"#] {
        let r = acme.request("POST", "/v1/messages", Some(API_KEY), Some(body));
        assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
        seen.count("/v1/messages", &r);
    }
    let mut stranger = engine.client();
    for _ in 0..2 {
        let r =
            stranger.request("POST", "/v1/messages", Some("wrong-key-0123456789"), Some(r#"{"to":"a","body":"b"}"#));
        assert_eq!(r.status, 401);
        seen.count("/v1/messages", &r);
    }
    for _ in 0..2 {
        let r = acme.request("GET", "/v2/nothing", Some(API_KEY), None);
        assert_eq!(r.status, 404);
        seen.count("other", &r);
    }
    // The limited client: LIMIT + 5 sends in a few seconds of its 61-second window.
    let mut limited = engine.client();
    let mut rate_limited = 0;
    for i in 0..LIMIT + 5 {
        let json = format!(r#"{{"to":"lim-{i}","body":"x"}}"#);
        let r = limited.request("POST", "/v1/messages", Some(LIMITED_KEY), Some(&json));
        seen.count("/v1/messages", &r);
        match r.status {
            202 => accepted_messages += 1,
            429 => rate_limited += 1,
            s => panic!("unexpected {s}"),
        }
    }
    assert_eq!(rate_limited, 5, "the limit admits exactly {LIMIT}");
    drop(stranger);

    // The counters are bumped right after each answer is written: poll
    // until they caught up (they must, within a second), then compare.
    let deadline = Instant::now() + Duration::from_secs(5);
    let (text, f) = loop {
        let (text, f) = scrape(&engine);
        let caught_up = value(&f, "esh3ar_accept_duration_seconds", "esh3ar_accept_duration_seconds_count", &[], false)
            == seen.of(202) as f64
            && value(&f, "esh3ar_ack_duration_seconds", "esh3ar_ack_duration_seconds_count", &[], false) == 2.0
            && value(&f, "esh3ar_business_connections", "esh3ar_business_connections", &[], true) == 2.0;
        if caught_up || Instant::now() > deadline {
            break (text, f);
        }
        std::thread::sleep(Duration::from_millis(100));
    };

    // Names and types, as the reference parser read them.
    let types: &[(&str, &str)] = &[
        ("esh3ar_http_requests", "counter"),
        ("esh3ar_accept_duration_seconds", "histogram"),
        ("esh3ar_delivery_duration_seconds", "histogram"),
        ("esh3ar_ack_duration_seconds", "histogram"),
        ("esh3ar_messages", "counter"),
        ("esh3ar_pending_messages", "gauge"),
        ("esh3ar_websocket_connections", "gauge"),
        ("esh3ar_business_connections", "gauge"),
        ("esh3ar_journal_fsync_duration_seconds", "histogram"),
        ("esh3ar_journal_commit_records", "histogram"),
        ("esh3ar_journal_bytes", "counter"),
        ("esh3ar_memory_budget_used_ratio", "gauge"),
        ("esh3ar_shed", "counter"),
        ("esh3ar_rate_limited", "counter"),
        ("esh3ar_breaker_state", "gauge"),
        ("esh3ar_webhook_attempts", "counter"),
        ("esh3ar_dead_letters", "gauge"),
        ("esh3ar_config_version", "gauge"),
        ("process_resident_memory_bytes", "gauge"),
        ("process_open_fds", "gauge"),
        ("process_cpu_seconds", "counter"),
        ("esh3ar_journal_disk_used_ratio", "gauge"),
    ];
    for (name, kind) in types {
        let got = f.get(*name).map(|(t, _)| t.as_str());
        assert_eq!(got, Some(*kind), "family {name}\n{text}");
    }

    // Requests by route and code: exactly what the harness saw, nothing else.
    let (_, http) = &f["esh3ar_http_requests"];
    let mut exposed: BTreeMap<(String, String), f64> = BTreeMap::new();
    for (_, l, v) in http {
        exposed.insert((l["route"].clone(), l["code"].clone()), *v);
    }
    let expected: BTreeMap<(String, String), f64> =
        seen.answers.iter().map(|((r, c), n)| ((r.to_string(), c.to_string()), *n as f64)).collect();
    assert_eq!(exposed, expected, "esh3ar_http_requests_total");

    let msg = |status: &str| value(&f, "esh3ar_messages", "esh3ar_messages_total", &[("status", status)], false);
    assert_eq!(msg("accepted"), accepted_messages as f64);
    assert_eq!(msg("delivered"), 3.0);
    assert_eq!(msg("acked"), 2.0);
    assert_eq!(msg("rejected"), 0.0);
    let gauge = |name: &str| value(&f, name, name, &[], true);
    assert_eq!(gauge("esh3ar_pending_messages"), (accepted_messages - 2) as f64, "accepted less the two acked");
    assert_eq!(gauge("esh3ar_websocket_connections"), 1.0);
    assert_eq!(gauge("esh3ar_business_connections"), 2.0, "acme and limited are still open");
    assert_eq!(gauge("esh3ar_dead_letters"), 0.0);
    let config = Client::connect(engine.admin).request("GET", "/v1/config", Some(ADMIN_TOKEN), None);
    assert_eq!(config.status, 200);
    let version = config.json()["version"].as_f64().unwrap();
    assert_eq!(gauge("esh3ar_config_version"), version, "the version GET /v1/config shows");
    let shards: Vec<_> = f["esh3ar_pending_messages"].1.iter().map(|(_, l, _)| l["shard"].clone()).collect();
    assert_eq!(shards, ["0", "1"], "one pending gauge per shard");
    let ratio = |l: &str| {
        value(&f, "esh3ar_memory_budget_used_ratio", "esh3ar_memory_budget_used_ratio", &[("shard", l)], false)
    };
    assert!((0.0..=1.0).contains(&ratio("0")) && (0.0..=1.0).contains(&ratio("1")));

    let limited_of = |c: &str| value(&f, "esh3ar_rate_limited", "esh3ar_rate_limited_total", &[("client", c)], false);
    assert_eq!(limited_of("limited"), 5.0);
    assert_eq!(limited_of("acme"), 0.0);
    assert_eq!(value(&f, "esh3ar_shed", "esh3ar_shed_total", &[], true), 0.0, "nothing was shed");

    // Histograms: one accept observation per 202 answer, one delivery per
    // first delivery, one ack per ack; +Inf bucket equals _count.
    let count = |h: &str| value(&f, h, &format!("{h}_count"), &[], false);
    let inf = |h: &str| value(&f, h, &format!("{h}_bucket"), &[("le", "+Inf")], false);
    assert_eq!(count("esh3ar_accept_duration_seconds"), seen.of(202) as f64);
    assert_eq!(count("esh3ar_delivery_duration_seconds"), 3.0);
    assert_eq!(count("esh3ar_ack_duration_seconds"), 2.0);
    for h in
        ["esh3ar_accept_duration_seconds", "esh3ar_journal_fsync_duration_seconds", "esh3ar_journal_commit_records"]
    {
        assert_eq!(inf(h), count(h), "{h}: +Inf bucket is the count");
    }
    let fsyncs = count("esh3ar_journal_fsync_duration_seconds");
    assert!(fsyncs >= 1.0, "the 202s needed fdatasyncs");
    // Every record is in exactly one commit: accepted + delivered + acked
    // statuses + segment headers (one per shard, at least).
    let records = value(&f, "esh3ar_journal_commit_records", "esh3ar_journal_commit_records_sum", &[], false);
    assert!(records >= (accepted_messages + 5) as f64, "{records} records journaled");
    assert!(value(&f, "esh3ar_journal_bytes", "esh3ar_journal_bytes_total", &[], false) >= 4096.0);
    assert!(gauge("process_resident_memory_bytes") > 1e6);
    assert!(gauge("process_open_fds") >= 5.0);
    assert!(value(&f, "process_cpu_seconds", "process_cpu_seconds_total", &[], false) > 0.0);
    let disk = gauge("esh3ar_journal_disk_used_ratio");
    assert!(disk > 0.0 && disk <= 1.0, "disk used ratio {disk}");

    // Counters move with load: ten more 202s, and nothing else changes.
    for i in 0..10 {
        assert_eq!(acme.send(&format!("later-{i}"), "x").status, 202);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, g) = scrape(&engine);
        let now = value(
            &g,
            "esh3ar_http_requests",
            "esh3ar_http_requests_total",
            &[("route", "/v1/messages"), ("code", "202")],
            false,
        );
        let before = value(
            &f,
            "esh3ar_http_requests",
            "esh3ar_http_requests_total",
            &[("route", "/v1/messages"), ("code", "202")],
            false,
        );
        if now == before + 10.0 {
            let accepted = value(&g, "esh3ar_messages", "esh3ar_messages_total", &[("status", "accepted")], false);
            assert_eq!(accepted, msg("accepted") + 10.0);
            break;
        }
        assert!(Instant::now() < deadline, "202 counter at {now}, expected {}", before + 10.0);
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `/metrics` needs no credentials, answers only GET, and a scrape's size
/// does not grow with traffic to new users (no user or message label).
#[test]
fn scrape_is_unauthenticated_get_only_and_bounded_in_users() {
    let setup = setup();
    let engine = setup.start();
    let mut admin = Client::connect(engine.admin);
    assert_eq!(admin.request("POST", "/metrics", None, Some("{}")).status, 405);
    let before = scrape(&engine).0;
    let mut acme = engine.client();
    for i in 0..200 {
        assert_eq!(acme.send(&format!("someone-{i}"), "x").status, 202);
    }
    let after = scrape(&engine).0;
    let series = |t: &str| t.lines().filter(|l| !l.starts_with('#')).count();
    // One new series at most: the `code="202"` line of the first 202.
    assert!(series(&after) <= series(&before) + 1, "{} -> {} series", series(&before), series(&after));
    assert!(!after.contains("someone-"), "no label names a user");
}

/// Every metric the Grafana dashboard (`ops/grafana/esh3ar.json`) and the
/// alert rules (`ops/prometheus/alerts.yml`) query is one the engine
/// exposes, except those of features not built yet (the archive), which
/// are named here so that a typo cannot hide among them.
#[test]
fn dashboards_and_alerts_query_only_exposed_metrics() {
    const NOT_BUILT: &[&str] = &["esh3ar_archive_lag_records", "esh3ar_db_query_duration_seconds"];
    let setup = setup();
    let engine = setup.start();
    let (text, _) = scrape(&engine);
    // Sample names, and the families declared (a family without series,
    // such as breakers with no webhook target, is declared all the same).
    let exposed: std::collections::BTreeSet<&str> = text
        .lines()
        .filter_map(|l| match l.strip_prefix("# TYPE ") {
            Some(t) => t.split(' ').next(),
            None if l.starts_with('#') => None,
            None => l.split(['{', ' ']).next(),
        })
        .collect();
    let root = env!("CARGO_MANIFEST_DIR");
    let grafana: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{root}/ops/grafana/esh3ar.json")).unwrap()).unwrap();
    let mut exprs: Vec<String> = Vec::new();
    for panel in grafana["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().unwrap() {
            exprs.push(t["expr"].as_str().unwrap().to_owned());
        }
    }
    assert!(exprs.len() >= 14, "{} queries", exprs.len());
    exprs.push(std::fs::read_to_string(format!("{root}/ops/prometheus/alerts.yml")).unwrap());
    let mut used = std::collections::BTreeSet::new();
    for e in &exprs {
        for (i, _) in e.match_indices("esh3ar_").chain(e.match_indices("process_")) {
            let name: String = e[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            used.insert(name);
        }
    }
    for name in &used {
        let alerts_name = name.starts_with("Esh3ar") || name.ends_with('_');
        if NOT_BUILT.contains(&name.as_str()) || alerts_name {
            continue;
        }
        assert!(exposed.contains(name.as_str()), "{name} is queried but not exposed");
    }
    assert!(used.len() >= 15, "{used:?}");
}

/// `esh3ar_config_version` follows a runtime change, and the `429`s of a
/// client added at runtime are counted under its id (client indices are
/// stable; the counters grow with the table).
#[test]
fn config_version_and_clients_added_at_runtime() {
    let setup = setup();
    let engine = setup.start();
    let mut admin = Client::connect(engine.admin);
    let before = admin.request("GET", "/v1/config", Some(ADMIN_TOKEN), None).json()["version"].as_f64().unwrap();
    let patch = r#"{"clients": [
            {"id": "acme", "api_key": "<redacted>", "tier": "basic"},
            {"id": "other", "api_key": "<redacted>", "tier": "basic"},
            {"id": "limited", "api_key": "<redacted>", "tier": "tiny"},
            {"id": "newcomer", "api_key": "newcomer-key-0123456789abcdef", "tier": "tiny"}]}"#;
    let r = admin.request("PATCH", "/v1/config", Some(ADMIN_TOKEN), Some(patch));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let after = r.json()["version"].as_f64().unwrap();
    assert!(after > before, "{before} -> {after}");
    let mut newcomer = engine.client();
    let mut refused = 0;
    for i in 0..LIMIT + 3 {
        let json = format!(r#"{{"to":"new-{i}","body":"x"}}"#);
        let r = newcomer.request("POST", "/v1/messages", Some("newcomer-key-0123456789abcdef"), Some(&json));
        assert!(r.status == 202 || r.status == 429, "{}", r.status);
        refused += u64::from(r.status == 429);
    }
    assert_eq!(refused, 3);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (text, f) = scrape(&engine);
        let version = value(&f, "esh3ar_config_version", "esh3ar_config_version", &[], false);
        let limited = value(&f, "esh3ar_rate_limited", "esh3ar_rate_limited_total", &[("client", "newcomer")], false);
        if version == after && limited == 3.0 {
            break;
        }
        assert!(Instant::now() < deadline, "version {version} (want {after}), newcomer 429s {limited}\n{text}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
