//! Fixed-bucket histograms owned by one shard: plain `Cell`s, no atomics
//! (a shard's state is touched by its own thread only). A scrape copies each
//! into a [`HistogramSnapshot`], and snapshots of every shard are merged
//! bucket by bucket at the edge (`/metrics`): the buckets are the same
//! constants everywhere, so merging is addition.

use std::cell::Cell;

/// Upper bounds, in seconds, of the latency histograms (accept, delivery,
/// ack, fsync). From 100 µs (an fdatasync on a fast NVMe) to an hour (a
/// phone offline for a while); 20 ms and 100 ms are bounds because alerts
/// name them.
pub const LATENCY_BOUNDS_SECONDS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0, 3600.0,
];

/// Upper bounds of the records-per-commit histogram: powers of two.
pub const RECORDS_BOUNDS: &[f64] =
    &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0];

/// A histogram with fixed upper bounds and an implicit `+Inf` bucket.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Per bucket (not cumulative); the last is `+Inf`.
    counts: Box<[Cell<u64>]>,
    sum: Cell<f64>,
}

impl Histogram {
    /// An empty histogram over `bounds` (ascending).
    pub fn new(bounds: &'static [f64]) -> Histogram {
        debug_assert!(bounds.windows(2).all(|w| w[0] < w[1]), "bounds must ascend");
        Histogram { bounds, counts: (0..=bounds.len()).map(|_| Cell::new(0)).collect(), sum: Cell::new(0.0) }
    }

    /// Counts one observation of `value` (seconds, records, ...).
    pub fn observe(&self, value: f64) {
        let i = self.bounds.partition_point(|&b| b < value);
        let c = &self.counts[i];
        c.set(c.get() + 1);
        self.sum.set(self.sum.get() + value);
    }

    /// A copy for a scrape.
    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            bounds: self.bounds,
            counts: self.counts.iter().map(Cell::get).collect(),
            sum: self.sum.get(),
        }
    }
}

/// A histogram's state at one moment, sendable to another thread.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// The upper bounds (the last bucket, `+Inf`, has none).
    pub bounds: &'static [f64],
    /// Per bucket, not cumulative; `bounds.len() + 1` of them.
    pub counts: Vec<u64>,
    /// Sum of the observed values.
    pub sum: f64,
}

impl HistogramSnapshot {
    /// An empty snapshot over `bounds`.
    pub fn empty(bounds: &'static [f64]) -> HistogramSnapshot {
        HistogramSnapshot { bounds, counts: vec![0; bounds.len() + 1], sum: 0.0 }
    }

    /// Adds another shard's snapshot of the same histogram.
    pub fn merge(&mut self, other: &HistogramSnapshot) {
        assert_eq!(self.bounds, other.bounds, "merging histograms with different buckets");
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.sum += other.sum;
    }

    /// Observations counted.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// What was observed since `earlier` (a snapshot of the same histogram).
    pub fn since(&self, earlier: &HistogramSnapshot) -> HistogramSnapshot {
        HistogramSnapshot {
            bounds: self.bounds,
            counts: self.counts.iter().zip(&earlier.counts).map(|(a, b)| a.saturating_sub(*b)).collect(),
            sum: (self.sum - earlier.sum).max(0.0),
        }
    }

    /// The `q` quantile (0..=1), interpolated linearly inside its bucket
    /// the way Prometheus' `histogram_quantile` does; None when empty. A
    /// quantile in the `+Inf` bucket is reported as the highest bound.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * total as f64;
        let mut below = 0u64;
        for (i, &n) in self.counts.iter().enumerate() {
            if n > 0 && (below + n) as f64 >= rank {
                let Some(&upper) = self.bounds.get(i) else { return self.bounds.last().copied() };
                let lower = if i == 0 { 0.0 } else { self.bounds[i - 1] };
                return Some(lower + (upper - lower) * ((rank - below as f64) / n as f64));
            }
            below += n;
        }
        self.bounds.last().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_the_bucket_of_their_upper_bound() {
        let h = Histogram::new(&[1.0, 2.0, 4.0]);
        for v in [0.5, 1.0, 1.5, 4.0, 9.0] {
            h.observe(v);
        }
        let s = h.snapshot();
        assert_eq!(s.counts, vec![2, 1, 1, 1]); // le=1 holds 1.0 (bounds are inclusive)
        assert_eq!(s.count(), 5);
        assert!((s.sum - 16.0).abs() < 1e-9);
    }

    #[test]
    fn merge_adds_and_since_subtracts() {
        let (a, b) = (Histogram::new(RECORDS_BOUNDS), Histogram::new(RECORDS_BOUNDS));
        a.observe(3.0);
        b.observe(3.0);
        b.observe(100.0);
        let first = a.snapshot();
        let mut merged = first.clone();
        merged.merge(&b.snapshot());
        assert_eq!(merged.count(), 3);
        assert_eq!(merged.since(&first).count(), 2);
    }

    #[test]
    fn quantiles_interpolate_within_a_bucket() {
        let h = Histogram::new(&[1.0, 2.0]);
        for _ in 0..10 {
            h.observe(1.5);
        }
        let s = h.snapshot();
        assert_eq!(s.quantile(0.5), Some(1.5));
        assert_eq!(s.quantile(1.0), Some(2.0));
        assert_eq!(Histogram::new(&[1.0]).snapshot().quantile(0.5), None);
        h.observe(50.0);
        assert_eq!(h.snapshot().quantile(1.0), Some(2.0), "+Inf reports the highest bound");
    }
}
