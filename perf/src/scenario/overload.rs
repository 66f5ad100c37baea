//! The `overload` scenario's figures: answers by second, status and
//! priority (the shedding profile), and the engine's RSS over time.
//!
//! Lanes send with a priority by lane (low, normal, high in turn) and
//! record each answer here; a sampler thread reads the engine's VmRSS.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Shared;
use crate::clock::now_ns;

/// Priorities, by lane index modulo 3.
pub const PRIORITIES: [&str; 3] = ["low", "normal", "high"];

/// A request unanswered this long counts as a `timeout` (and the lane
/// reconnects).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The memory limit a started engine gets in `overload` by default.
pub const DEFAULT_MEMORY_LIMIT: u64 = 96 << 20;

pub fn priority(lane: usize) -> &'static str {
    PRIORITIES[lane % PRIORITIES.len()]
}

/// The cause a broken request is counted under: `timeout`, `reset`
/// (reset, broken pipe, closed by the server), `protocol` or `io`.
pub fn io_cause(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => "timeout",
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::UnexpectedEof => "reset",
        io::ErrorKind::InvalidData => "protocol",
        _ => "io",
    }
}

/// Answers counted by (second since the load started, status or cause, priority).
pub type Answers = BTreeMap<(u32, String, &'static str), u64>;

/// The shedding profile of a run (in the JSON report as `overload`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Profile {
    /// The engine's `memory_limit_bytes` (0 when not started here).
    pub memory_limit_bytes: u64,
    /// Largest VmRSS sampled (every 100 ms).
    pub rss_max_bytes: u64,
    /// Largest VmRSS sampled in each second since the load started.
    pub rss_per_s: Vec<u64>,
    /// Totals: status or cause -> priority -> answers (warm-up included).
    pub totals: BTreeMap<String, BTreeMap<String, u64>>,
    /// Per second: status or cause -> priority -> answers.
    pub per_s: Vec<BTreeMap<String, BTreeMap<String, u64>>>,
    /// Requests that got no HTTP answer: timeouts, resets, other I/O.
    pub transport_errors: u64,
}

impl Profile {
    pub fn build(answers: &Answers, rss: &[(u32, u64)], memory_limit_bytes: u64) -> Profile {
        let secs = answers.keys().map(|k| k.0 + 1).chain(rss.iter().map(|r| r.0 + 1)).max().unwrap_or(0) as usize;
        let mut p = Profile { memory_limit_bytes, per_s: vec![BTreeMap::new(); secs], ..Default::default() };
        p.rss_per_s = vec![0; secs];
        for &(sec, bytes) in rss {
            let slot = &mut p.rss_per_s[sec as usize];
            *slot = (*slot).max(bytes);
            p.rss_max_bytes = p.rss_max_bytes.max(bytes);
        }
        for ((sec, code, prio), n) in answers {
            *p.per_s[*sec as usize].entry(code.clone()).or_default().entry((*prio).to_owned()).or_default() += n;
            *p.totals.entry(code.clone()).or_default().entry((*prio).to_owned()).or_default() += n;
            if code.parse::<u16>().is_err() {
                p.transport_errors += n;
            }
        }
        p
    }

    /// The human table: one row per second, one column per status/priority.
    pub fn table(&self) -> String {
        let mut cols: Vec<(String, String)> = Vec::new();
        for (code, prios) in &self.totals {
            for prio in PRIORITIES.iter().filter(|p| prios.contains_key(**p)) {
                cols.push((code.clone(), (*prio).to_owned()));
            }
        }
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        let mut s = String::new();
        let limit = match self.memory_limit_bytes {
            0 => "unknown".to_owned(),
            b => format!("{:.0} MiB", mib(b)),
        };
        let _ = writeln!(
            s,
            "  shedding profile: answers per second since the load started (warm-up included) by status/priority;"
        );
        let _ = writeln!(s, "  engine RSS (limit {limit}, max {:.1} MiB)", mib(self.rss_max_bytes));
        let _ = write!(s, "  {:>5} {:>8}", "sec", "rss MiB");
        for (code, prio) in &cols {
            let _ = write!(s, " {:>11}", format!("{code}/{prio}"));
        }
        let _ = writeln!(s);
        let get = |m: &BTreeMap<String, BTreeMap<String, u64>>, c: &str, p: &str| {
            m.get(c).and_then(|x| x.get(p)).copied().unwrap_or(0)
        };
        for (sec, row) in self.per_s.iter().enumerate() {
            let _ = write!(s, "  {:>5} {:>8.1}", sec, mib(self.rss_per_s.get(sec).copied().unwrap_or(0)));
            for (code, prio) in &cols {
                let _ = write!(s, " {:>11}", get(row, code, prio));
            }
            let _ = writeln!(s);
        }
        let _ = write!(s, "  {:>5} {:>8.1}", "total", mib(self.rss_max_bytes));
        for (code, prio) in &cols {
            let _ = write!(s, " {:>11}", get(&self.totals, code, prio));
        }
        let _ = writeln!(s);
        let _ = writeln!(s, "  transport errors (timeouts, resets, I/O): {}", self.transport_errors);
        s
    }
}

/// Samples the VmRSS of `pid` every 100 ms, by second since the load
/// started (once it has), until `stop`.
pub fn sample_rss(pid: u32, shared: Arc<Shared>, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Vec<(u32, u64)>> {
    std::thread::spawn(move || {
        let mut out = Vec::new();
        while !stop.load(Ordering::Acquire) {
            let start = shared.t0.load(Ordering::Acquire);
            if start != 0 {
                if let Some(rss) = crate::engine::rss_bytes(pid) {
                    let sec = (now_ns().saturating_sub(start) / 1_000_000_000) as u32;
                    out.push((sec, rss));
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        out
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_counts_by_second_status_and_priority() {
        let mut a = Answers::new();
        a.insert((0, "202".into(), "low"), 5);
        a.insert((1, "503".into(), "low"), 7);
        a.insert((1, "202".into(), "high"), 3);
        a.insert((1, "timeout".into(), "normal"), 1);
        let p = Profile::build(&a, &[(0, 10), (1, 30), (1, 20)], 100);
        assert_eq!(p.rss_per_s, vec![10, 30]);
        assert_eq!(p.rss_max_bytes, 30);
        assert_eq!(p.totals["503"]["low"], 7);
        assert_eq!(p.per_s[1]["202"]["high"], 3);
        assert_eq!(p.transport_errors, 1);
        let t = p.table();
        assert!(t.contains("503/low") && t.contains("timeout/normal"), "{t}");
        assert_eq!(priority(4), "normal");
        assert_eq!(io_cause(&io::Error::from(io::ErrorKind::ConnectionReset)), "reset");
    }
}
