//! The alert rules in `ops/prometheus/alerts.yml`: `promtool check rules`
//! (syntax, templates) and `promtool test rules` on the unit tests in
//! `ops/prometheus/alerts_test.yml` (accept p99, 5xx ratio, memory budget,
//! open breaker, fsync p99, dead letters growing: each fires when it must,
//! with its annotations, and not before its `for`). `scripts/test.sh`
//! installs Debian's `prometheus` package (which ships `promtool`) when it
//! is missing; without it this test fails, it never skips.

use std::process::Command;

fn promtool(args: &[&str]) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/ops/prometheus"))
        .output()
        .expect("promtool is needed (Debian package `prometheus`; scripts/test.sh installs it)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

#[test]
fn alert_rules_are_valid() {
    let out = promtool(&["check", "rules", "alerts.yml"]);
    assert!(out.contains("SUCCESS: 9 rules found"), "{out}");
}

#[test]
fn alert_rules_pass_their_unit_tests() {
    let out = promtool(&["test", "rules", "alerts_test.yml"]);
    assert!(out.contains("SUCCESS"), "{out}");
    // The unit tests cover at least these rules.
    let tests =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/ops/prometheus/alerts_test.yml")).unwrap();
    for rule in ["Esh3arAcceptLatencyHigh", "Esh3arServerErrors", "Esh3arMemoryBudgetHigh", "Esh3arBreakerOpen"] {
        assert!(tests.contains(&format!("alertname: {rule}")), "{rule} has no unit test");
    }
}
