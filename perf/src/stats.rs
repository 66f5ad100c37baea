//! What a generator thread records: latency histograms (HdrHistogram, in
//! microseconds), counts, errors by status, and the keys accepted and
//! delivered (for the lost/duplicate check). Each thread owns its own and
//! the main thread merges them at the end; only the progress counters are
//! shared while a run is going.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Largest latency the histograms hold: one hour, in microseconds.
const LATENCY_US_MAX: u64 = 3_600_000_000;

/// A latency histogram in microseconds, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_US_MAX, 3).expect("valid histogram bounds")
}

/// Records a latency given in nanoseconds.
pub fn record_ns(h: &mut Histogram<u64>, ns: u64) {
    h.saturating_record((ns / 1000).max(1));
}

/// Everything one generator thread measured.
#[derive(Debug)]
pub struct ThreadStats {
    /// Send (or intended send, open loop) to acceptance, per request.
    pub acceptance: Histogram<u64>,
    /// Send stamp to receipt by a receiver, per message.
    pub delivery: Histogram<u64>,
    /// Requests answered in the measured window (any status).
    pub requests: u64,
    /// Messages accepted in the measured window.
    pub accepted: u64,
    /// Messages received in the measured window (by their send stamp).
    pub delivered: u64,
    /// Errors by cause: an HTTP status (`503`), `io`, `nack`, `timeout`...
    pub errors: BTreeMap<String, u64>,
    /// Keys of every accepted message (warm-up included).
    pub accepted_keys: Vec<u64>,
    /// Keys of every received message, duplicates included.
    pub delivered_keys: Vec<u64>,
    /// fallback, e2e: (key, intended send ns, 202 ns) of every accepted message.
    pub accepted_at: Vec<(u64, u64, u64)>,
    /// e2e: (key, receipt ns) of every received message.
    pub delivered_at: Vec<(u64, u64)>,
    /// Named figures of a scenario (connect times, drain times...).
    pub extra: BTreeMap<String, f64>,
    /// overload: answers by (second, status or cause, priority).
    pub answers: crate::scenario::overload::Answers,
}

impl Default for ThreadStats {
    fn default() -> Self {
        Self {
            acceptance: histogram(),
            delivery: histogram(),
            requests: 0,
            accepted: 0,
            delivered: 0,
            errors: BTreeMap::new(),
            accepted_keys: Vec::new(),
            delivered_keys: Vec::new(),
            accepted_at: Vec::new(),
            delivered_at: Vec::new(),
            extra: BTreeMap::new(),
            answers: BTreeMap::new(),
        }
    }
}

impl ThreadStats {
    pub fn error(&mut self, cause: &str) {
        *self.errors.entry(cause.to_owned()).or_default() += 1;
    }

    /// Adds `other` into `self`.
    pub fn merge(&mut self, other: ThreadStats) {
        self.acceptance.add(&other.acceptance).expect("same histogram bounds");
        self.delivery.add(&other.delivery).expect("same histogram bounds");
        self.requests += other.requests;
        self.accepted += other.accepted;
        self.delivered += other.delivered;
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
        self.accepted_keys.extend(other.accepted_keys);
        self.delivered_keys.extend(other.delivered_keys);
        self.accepted_at.extend(other.accepted_at);
        self.delivered_at.extend(other.delivered_at);
        for (k, v) in other.answers {
            *self.answers.entry(k).or_default() += v;
        }
        for (k, v) in other.extra {
            let e = self.extra.entry(k).or_insert(f64::MIN);
            *e = e.max(v);
        }
    }

    /// (lost, duplicates): accepted keys never received, and receipts of a
    /// key beyond its first.
    pub fn lost_and_duplicates(&mut self) -> (u64, u64) {
        self.accepted_keys.sort_unstable();
        self.accepted_keys.dedup();
        self.delivered_keys.sort_unstable();
        let received = self.delivered_keys.len();
        self.delivered_keys.dedup();
        let duplicates = (received - self.delivered_keys.len()) as u64;
        let lost = self.accepted_keys.iter().filter(|k| self.delivered_keys.binary_search(k).is_err()).count();
        (lost as u64, duplicates)
    }
}

/// e2e: per message, from its `202` reaching the generator to its receipt
/// by a receiver (0 when the receipt came first), for messages sent in the
/// measured window `[start, end)`: what the delivery path adds after
/// acceptance, without the stalls that delay the `202` and the delivery
/// alike. Returns (histogram, share received before the `202` was read).
pub fn after_acceptance(
    accepted_at: &[(u64, u64, u64)],
    delivered_at: &[(u64, u64)],
    start: u64,
    end: u64,
) -> (Histogram<u64>, f64) {
    let done: std::collections::HashMap<u64, u64> = accepted_at
        .iter()
        .filter(|&&(_, sent, _)| sent >= start && sent < end)
        .map(|&(key, _, done)| (key, done))
        .collect();
    let mut h = histogram();
    let (mut first, mut n) = (0u64, 0u64);
    let mut seen = std::collections::HashSet::new();
    for &(key, at) in delivered_at {
        let Some(&d) = done.get(&key) else { continue };
        if !seen.insert(key) {
            continue;
        }
        n += 1;
        if at < d {
            first += 1;
        }
        record_ns(&mut h, at.saturating_sub(d));
    }
    (h, first as f64 / n.max(1) as f64)
}

/// Percentiles of one histogram, in milliseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Latency {
    pub count: u64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    /// (percentile, ms) along the whole distribution, for plots.
    pub curve: Vec<(f64, f64)>,
}

impl Latency {
    pub fn from_histogram(h: &Histogram<u64>) -> Latency {
        let ms = |us: u64| us as f64 / 1000.0;
        let q = |p: f64| ms(h.value_at_quantile(p));
        let mut curve: Vec<(f64, f64)> = Vec::new();
        if !h.is_empty() {
            for v in h.iter_quantiles(4) {
                let p = v.quantile_iterated_to() * 100.0;
                match curve.last() {
                    Some(&(lp, _)) if p <= lp => {}
                    _ => curve.push((p, ms(v.value_iterated_to()))),
                }
            }
        }
        Latency {
            count: h.len(),
            mean_ms: h.mean() / 1000.0,
            p50_ms: q(0.50),
            p90_ms: q(0.90),
            p99_ms: q(0.99),
            p999_ms: q(0.999),
            max_ms: ms(h.max()),
            curve,
        }
    }
}

/// Counters a generator thread publishes while it runs (for the progress
/// line and the cross-thread drain check). One cache line per thread.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct Progress {
    pub sent: AtomicU64,
    pub accepted: AtomicU64,
    pub delivered: AtomicU64,
    pub errors: AtomicU64,
    pub connected: AtomicU64,
}

impl Progress {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// Sums one counter over all threads.
pub fn total(progress: &[Progress], f: impl Fn(&Progress) -> &AtomicU64) -> u64 {
    progress.iter().map(|p| f(p).load(Ordering::Relaxed)).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_in_ms() {
        let mut h = histogram();
        for i in 1..=1000u64 {
            record_ns(&mut h, i * 1_000_000); // 1..1000 ms
        }
        let l = Latency::from_histogram(&h);
        assert_eq!(l.count, 1000);
        assert!((l.p50_ms - 500.0).abs() < 1.0, "{}", l.p50_ms);
        assert!((l.p99_ms - 990.0).abs() < 1.5, "{}", l.p99_ms);
        assert!((l.max_ms - 1000.0).abs() < 1.0, "{}", l.max_ms);
        assert!(l.curve.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1));
    }

    #[test]
    fn lost_and_duplicates() {
        let mut s =
            ThreadStats { accepted_keys: vec![1, 2, 3, 4], delivered_keys: vec![2, 1, 2, 4], ..Default::default() };
        assert_eq!(s.lost_and_duplicates(), (1, 1));
    }

    #[test]
    fn after_acceptance_joins_by_key_in_the_window() {
        // (key, sent, 202) and (key, received); key 4 was sent before the window.
        let accepted = [(1, 100, 2_000_000), (2, 100, 5_000_000), (3, 100, 1_000_000), (4, 10, 0)];
        let received = [(1, 3_000_000), (2, 4_000_000), (1, 9_000_000), (4, 9_000_000)];
        let (h, first) = after_acceptance(&accepted, &received, 50, 1_000);
        assert_eq!(h.len(), 2, "key 3 never came, key 1's repeat and key 4 do not count");
        assert_eq!(h.max(), h.highest_equivalent(1000), "1 ms after its 202");
        assert!((first - 0.5).abs() < 1e-9, "key 2 came before its 202");
    }

    #[test]
    fn merge_adds() {
        let mut a = ThreadStats::default();
        a.error("503");
        record_ns(&mut a.acceptance, 1_000_000);
        let mut b = ThreadStats::default();
        b.error("503");
        b.error("io");
        record_ns(&mut b.acceptance, 2_000_000);
        a.merge(b);
        assert_eq!(a.errors["503"], 2);
        assert_eq!(a.errors["io"], 1);
        assert_eq!(a.acceptance.len(), 2);
    }
}
