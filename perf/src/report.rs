//! The result of one run: a JSON file for machines (and `--compare`,
//! `plot`, `table`) and a human table on stdout.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::stats::Latency;

/// The machine a run was taken on.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Machine {
    pub cpu_model: String,
    pub cores: usize,
    pub memory_gib: f64,
    pub kernel: String,
}

impl Machine {
    pub fn probe() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, v)| v.trim()))
            .unwrap_or("unknown")
            .to_owned();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem_kib: f64 = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_owned();
        Machine {
            cpu_model,
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_gib: (mem_kib / 1024.0 / 1024.0 * 10.0).round() / 10.0,
            kernel,
        }
    }
}

/// One run of one scenario against one system.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    /// `esh3ar`, `ceiling`, `redis`, `nats`, `rabbitmq`.
    pub system: String,
    pub scenario: String,
    /// `closed` or `open`.
    pub model: String,
    /// A free label (e.g. `esh3ar shards=1`).
    pub label: String,
    pub connections: usize,
    pub receivers: usize,
    /// Target arrival rate (open loop), messages per second.
    pub rate_per_s: Option<f64>,
    /// Measured window (warm-up excluded).
    pub duration_s: f64,
    pub generator_threads: usize,
    pub generator_cpus: String,
    pub server_cpus: String,
    /// Messages accepted per second in the measured window.
    pub throughput_per_s: f64,
    /// Requests answered per second (equals throughput except for batches).
    pub requests_per_s: f64,
    pub accepted: u64,
    pub requests: u64,
    pub acceptance: Latency,
    pub delivery: Option<Latency>,
    /// Errors by cause: HTTP status code, `io`, `nack`, `timeout`...
    pub errors: BTreeMap<String, u64>,
    /// Accepted (202 or confirmed) and never delivered: must be 0.
    pub lost: u64,
    pub duplicates: u64,
    /// Scenario-specific figures (drain_s, rss_per_connection_bytes, ...).
    pub extra: BTreeMap<String, f64>,
    /// overload: answers by second, status and priority; the engine's RSS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overload: Option<crate::scenario::overload::Profile>,
    /// backlog: answers by cause, RSS and disk as the backlog grew.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backlog: Option<crate::backlog::Profile>,
    pub machine: Machine,
    pub command: String,
    pub unix_time_s: u64,
}

impl Report {
    pub fn load(path: &Path) -> anyhow::Result<Report> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{} is not an esh3ar-perf report", path.display()))
    }

    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let text = serde_json::to_string_pretty(self).expect("report serializes");
        std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
    }

    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    fn name(&self) -> &str {
        if self.label.is_empty() {
            &self.system
        } else {
            &self.label
        }
    }

    /// The human table.
    /// Requests not answered 202: every non-202 status, timeout, reset,
    /// I/O or connect failure (all counted in `errors`, warm-up included
    /// in the profiled scenarios' totals).
    pub fn not_accepted(&self) -> u64 {
        match &self.overload {
            Some(p) => {
                p.totals.iter().filter(|(k, _)| *k != "202").flat_map(|(_, by)| by.values()).sum::<u64>()
                    + self.errors.iter().filter(|(k, _)| k.starts_with("connect")).map(|(_, v)| v).sum::<u64>()
            }
            None => self.error_count(),
        }
    }

    pub fn human(&self) -> String {
        let mut s = String::new();
        let rate = self.rate_per_s.map(|r| format!(" rate={r:.0}/s")).unwrap_or_default();
        let _ = writeln!(
            s,
            "{} | {} | {} loop | connections={} receivers={}{} | {:.1} s measured | generator threads={} cpus={} | server cpus={}",
            self.name(),
            self.scenario,
            self.model,
            self.connections,
            self.receivers,
            rate,
            self.duration_s,
            self.generator_threads,
            self.generator_cpus,
            self.server_cpus,
        );
        let _ = writeln!(
            s,
            "  throughput   {:>12.0} msg/s   ({:.0} req/s, {} accepted)",
            self.throughput_per_s, self.requests_per_s, self.accepted
        );
        let _ = writeln!(s, "  latency ms        p50      p90      p99    p99.9      max     mean    count");
        let mut row = |name: &str, l: &Latency| {
            let _ = writeln!(
                s,
                "  {name:<12} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8}",
                l.p50_ms, l.p90_ms, l.p99_ms, l.p999_ms, l.max_ms, l.mean_ms, l.count
            );
        };
        row("acceptance", &self.acceptance);
        if let Some(d) = &self.delivery {
            row("delivery", d);
        }
        if self.acceptance.count == 0 && self.rate_per_s.is_some() {
            let _ = writeln!(
                s,
                "  (no latency sample: the open loop fell so far behind that no send of the measured window went out)"
            );
        }
        let errors = if self.errors.is_empty() {
            "none".to_owned()
        } else {
            self.errors.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ")
        };
        let _ = writeln!(s, "  errors       {errors}");
        let _ = writeln!(s, "  lost         {}   (accepted, never delivered; must be 0)", self.lost);
        let _ = writeln!(s, "  duplicates   {}", self.duplicates);
        for (k, v) in &self.extra {
            let _ = writeln!(s, "  {k:<28} {v:.3}");
        }
        if let Some(b) = &self.backlog {
            s.push_str(&b.summary());
        }
        if let Some(p) = &self.overload {
            s.push_str(&p.table());
            let _ = writeln!(
                s,
                "  not accepted {}   (answers other than 202, timeouts, resets, failed connects; warm-up included)",
                self.not_accepted()
            );
        }
        s
    }
}

/// The figures compared by `--compare` and tabulated by `table`.
fn metrics(r: &Report) -> Vec<(&'static str, f64, bool)> {
    // (name, value, higher is better)
    let mut m = vec![
        ("throughput msg/s", r.throughput_per_s, true),
        ("acceptance p50 ms", r.acceptance.p50_ms, false),
        ("acceptance p90 ms", r.acceptance.p90_ms, false),
        ("acceptance p99 ms", r.acceptance.p99_ms, false),
        ("acceptance p99.9 ms", r.acceptance.p999_ms, false),
        ("acceptance max ms", r.acceptance.max_ms, false),
    ];
    if let Some(d) = &r.delivery {
        m.extend([
            ("delivery p50 ms", d.p50_ms, false),
            ("delivery p90 ms", d.p90_ms, false),
            ("delivery p99 ms", d.p99_ms, false),
            ("delivery p99.9 ms", d.p999_ms, false),
            ("delivery max ms", d.max_ms, false),
        ]);
    }
    m.push(("errors", r.error_count() as f64, false));
    m.push(("lost", r.lost as f64, false));
    m.push(("duplicates", r.duplicates as f64, false));
    m
}

/// The ratio table between two runs: B / A for every figure.
pub fn compare(a: &Report, b: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "A: {} {} ({} loop)\nB: {} {} ({} loop)",
        a.name(),
        a.scenario,
        a.model,
        b.name(),
        b.scenario,
        b.model
    );
    let _ = writeln!(s, "{:<22} {:>14} {:>14} {:>9}  better", "figure", "A", "B", "B/A");
    let mb = metrics(b);
    for (name, va, higher_better) in metrics(a) {
        let Some(&(_, vb, _)) = mb.iter().find(|(n, _, _)| *n == name) else { continue };
        let ratio = if va == 0.0 {
            if vb == 0.0 {
                1.0
            } else {
                f64::INFINITY
            }
        } else {
            vb / va
        };
        let better = if (vb - va).abs() < f64::EPSILON {
            "="
        } else if (vb > va) == higher_better {
            "B"
        } else {
            "A"
        };
        let _ = writeln!(s, "{name:<22} {va:>14.3} {vb:>14.3} {ratio:>9.3}  {better}");
    }
    s
}

/// A markdown table of several runs (for docs/PERFORMANCE.md); ratios of
/// throughput against the first report of system `base` in the list.
pub fn markdown_table(reports: &[Report], base: &str) -> String {
    let base = reports.iter().find(|r| r.system == base);
    // Ratios only between runs of the same scenario and load model.
    let ratio_to_base = |r: &Report| -> Option<f64> {
        let b = base?;
        (b.scenario == r.scenario && b.model == r.model && r.rate_per_s.is_none() && b.throughput_per_s > 0.0)
            .then(|| r.throughput_per_s / b.throughput_per_s)
    };
    let base = base.map_or("base", |b| b.system.as_str());
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| system | scenario | load | msg/s | vs {base} | accept p50 | p90 | p99 | p99.9 | max | deliver p50 | p99 | p99.9 | max | errors | lost | dup |"
    );
    let _ = writeln!(s, "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    // These two have tables of their own (idle_table, backlog::table).
    for r in reports.iter().filter(|r| r.scenario != "idle-connections" && r.scenario != "backlog") {
        let mut load = match r.rate_per_s {
            Some(rate) => format!("open {rate:.0}/s, {} conns", r.connections),
            None => format!("closed, {} conns", r.connections),
        };
        if r.scenario == "offline-drain" {
            load = format!("{} queued, then {} receivers drain", r.accepted, r.receivers);
        } else if r.receivers > 0 {
            load += &format!(", {} receivers", r.receivers);
        }
        let ratio = ratio_to_base(r).map(|x| format!("{x:.2}×")).unwrap_or_default();
        // No sample (an open loop so far behind that no send of the
        // measured window went out): a dash, never a zero.
        let ms = |l: &Latency, v: f64| if l.count == 0 { "–".to_owned() } else { fmt_ms(v) };
        let (d50, d99, d999, dmax) = match &r.delivery {
            Some(d) => (ms(d, d.p50_ms), ms(d, d.p99_ms), ms(d, d.p999_ms), ms(d, d.max_ms)),
            None => ("–".into(), "–".into(), "–".into(), "–".into()),
        };
        let errors = if r.errors.is_empty() {
            "0".to_owned()
        } else {
            r.errors.iter().map(|(k, v)| format!("{k}: {v}")).collect::<Vec<_>>().join(", ")
        };
        let a = &r.acceptance;
        let _ = writeln!(
            s,
            "| {} | {} | {load} | {:.0} | {ratio} | {} | {} | {} | {} | {} | {d50} | {d99} | {d999} | {dmax} | {errors} | {} | {} |",
            r.name(),
            r.scenario,
            r.throughput_per_s,
            ms(a, a.p50_ms),
            ms(a, a.p90_ms),
            ms(a, a.p99_ms),
            ms(a, a.p999_ms),
            ms(a, a.max_ms),
            r.lost,
            r.duplicates
        );
    }
    s
}

/// Server memory per idle WebSocket of idle-connections reports.
pub fn idle_table(reports: &[Report]) -> String {
    let mut s = String::new();
    let idle: Vec<&Report> = reports.iter().filter(|r| r.scenario == "idle-connections").collect();
    if idle.is_empty() {
        return s;
    }
    let _ = writeln!(s, "| system | WebSockets open | server RSS before | after | per connection |");
    let _ = writeln!(s, "|---|--:|--:|--:|--:|");
    for r in idle {
        let get = |k: &str| r.extra.get(k).copied().unwrap_or(0.0);
        let mib = |b: f64| format!("{:.1} MiB", b / (1024.0 * 1024.0));
        let _ = writeln!(
            s,
            "| {} | {:.0} | {} | {} | {:.1} KiB |",
            r.name(),
            get("connections_open"),
            mib(get("server_rss_before_bytes")),
            mib(get("server_rss_after_bytes")),
            get("server_rss_per_connection_bytes") / 1024.0
        );
    }
    s
}

fn fmt_ms(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(system: &str, tp: f64, p99: f64) -> Report {
        Report {
            system: system.into(),
            scenario: "ingest".into(),
            model: "closed".into(),
            throughput_per_s: tp,
            acceptance: Latency { p99_ms: p99, ..Default::default() },
            ..Default::default()
        }
    }

    #[test]
    fn compare_prints_ratios() {
        let t = compare(&report("ceiling", 100.0, 1.0), &report("esh3ar", 80.0, 2.0));
        let tp = t.lines().find(|l| l.starts_with("throughput")).unwrap();
        assert!(tp.contains("0.800") && tp.ends_with('A'), "{tp}");
        let p99 = t.lines().find(|l| l.starts_with("acceptance p99 ms")).unwrap();
        assert!(p99.contains("2.000") && p99.ends_with('A'), "{p99}");
    }

    #[test]
    fn json_round_trip_and_table() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.json");
        report("esh3ar", 80.0, 2.0).save(&path).unwrap();
        let back = Report::load(&path).unwrap();
        assert_eq!(back.throughput_per_s, 80.0);
        let md = markdown_table(&[report("ceiling", 100.0, 1.0), back], "ceiling");
        assert!(md.contains("| esh3ar | ingest | closed, 0 conns | 80 | 0.80× |"), "{md}");
    }
}
