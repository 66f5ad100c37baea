//! Sliding-window rate limits, one window per client, kept on the client's
//! home shard so the count is exact however many connections and shards
//! the client uses.
//!
//! A window is 61 one-second buckets. A request at second `t` is admitted
//! if the messages counted in seconds `t-60..=t` plus the request stay
//! within the limit. Those 61 buckets cover every 60-second window that
//! ends in second `t`, so no 60-second window ever holds more than the
//! limit; a client flooding steadily gets `limit` per 61 s (98.4%).

use hashbrown::HashMap;

/// Seconds covered by the window (the limit is per 60 s; one more bucket
/// makes the whole-second buckets conservative).
pub const WINDOW_BUCKETS: u64 = 61;

/// The outcome of a [`RateLimiter::take`], with what the RateLimit headers say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// True if the messages were admitted (and counted).
    pub admitted: bool,
    /// The limit per minute.
    pub limit: u64,
    /// Messages the client may still send now.
    pub remaining: u64,
    /// Seconds until the oldest counted message leaves the window.
    pub reset_secs: u64,
    /// When refused: whole seconds until enough room frees up for the request.
    pub retry_after_secs: u64,
}

#[derive(Debug, Clone)]
struct Window {
    /// counts[s % 61] holds second `s`'s count when `s` is within the window.
    counts: [u32; WINDOW_BUCKETS as usize],
    /// The latest second the buckets were advanced to.
    head_sec: u64,
    total: u64,
    /// A lower bound on the oldest second with a non-zero count: the scan
    /// of `seconds_until_freed` starts there instead of at `now - 60`.
    /// Counts are only ever added at the current second (and only set the
    /// bound when the window was empty), refunds and `advance` only remove
    /// counts, so a bound once true stays true. Without it every request
    /// of a client quieter than one message a second walked the window's
    /// empty buckets (about 1,300 instructions; docs/PERFORMANCE.md).
    oldest_sec_min: u64,
}

impl Window {
    fn new(now_sec: u64) -> Self {
        Self { counts: [0; WINDOW_BUCKETS as usize], head_sec: now_sec, total: 0, oldest_sec_min: now_sec }
    }

    /// Drops the buckets that left the window by `now_sec`.
    fn advance(&mut self, now_sec: u64) {
        if now_sec <= self.head_sec {
            return;
        }
        let steps = (now_sec - self.head_sec).min(WINDOW_BUCKETS);
        for s in 1..=steps {
            let slot = ((self.head_sec + s) % WINDOW_BUCKETS) as usize;
            self.total -= self.counts[slot] as u64;
            self.counts[slot] = 0;
        }
        self.head_sec = now_sec;
        debug_assert_eq!(self.total, self.counts.iter().map(|&c| c as u64).sum::<u64>());
    }

    /// Seconds from `now_sec` until `needed` messages have left the window.
    fn seconds_until_freed(&self, now_sec: u64, needed: u64) -> u64 {
        let mut freed = 0u64;
        // Oldest second still in the window is now - 60; it leaves at now + 1.
        let window_start = now_sec.saturating_sub(WINDOW_BUCKETS - 1);
        // A bound past `now` (the clock went back) is no bound: scan it all.
        let start = if self.oldest_sec_min <= now_sec { self.oldest_sec_min.max(window_start) } else { window_start };
        for sec in start..=now_sec {
            freed += self.counts[(sec % WINDOW_BUCKETS) as usize] as u64;
            if freed >= needed {
                return sec + WINDOW_BUCKETS - now_sec;
            }
        }
        WINDOW_BUCKETS
    }
}

/// The windows of the clients homed on one shard.
#[derive(Debug, Default)]
pub struct RateLimiter {
    windows: HashMap<u32, Window>,
}

impl RateLimiter {
    /// An empty limiter.
    pub fn new() -> Self {
        Self::default()
    }

    /// Admits `n` messages of `client` at `now_sec` if they fit under
    /// `limit` per minute, counting them; all or nothing. `n = 0` only
    /// reports the state.
    pub fn take(&mut self, client: u32, limit: u64, n: u64, now_sec: u64) -> Decision {
        let w = self.windows.entry(client).or_insert_with(|| Window::new(now_sec));
        w.advance(now_sec);
        let admitted = n == 0 || w.total + n <= limit;
        if admitted && n > 0 {
            if w.total == 0 {
                w.oldest_sec_min = now_sec;
            }
            w.counts[(now_sec % WINDOW_BUCKETS) as usize] += n as u32;
            w.total += n;
        }
        let remaining = limit.saturating_sub(w.total);
        let reset_secs = if w.total == 0 {
            0
        } else {
            let reset = w.seconds_until_freed(now_sec, 1);
            // The oldest non-zero second found is the tightest bound.
            w.oldest_sec_min = now_sec + reset - WINDOW_BUCKETS;
            reset
        };
        let retry_after_secs = if admitted {
            0
        } else if n > limit {
            WINDOW_BUCKETS // can never fit; say "a full window"
        } else {
            w.seconds_until_freed(now_sec, w.total + n - limit).max(1)
        };
        Decision { admitted, limit, remaining, reset_secs, retry_after_secs }
    }

    /// Gives back `n` messages counted at `at_sec` that were never accepted
    /// (the home shard of the recipient refused them).
    pub fn refund(&mut self, client: u32, n: u64, at_sec: u64, now_sec: u64) {
        let Some(w) = self.windows.get_mut(&client) else { return };
        w.advance(now_sec);
        if at_sec + WINDOW_BUCKETS <= now_sec || at_sec > now_sec {
            return; // that second already left the window
        }
        let slot = (at_sec % WINDOW_BUCKETS) as usize;
        let back = (n as u32).min(w.counts[slot]);
        w.counts[slot] -= back;
        w.total -= back as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn admits_up_to_the_limit_then_refuses() {
        let mut rl = RateLimiter::new();
        for i in 0..10 {
            let d = rl.take(1, 10, 1, 1000);
            assert!(d.admitted);
            assert_eq!(d.remaining, 9 - i);
        }
        let d = rl.take(1, 10, 1, 1000);
        assert!(!d.admitted);
        assert_eq!(d.retry_after_secs, 61, "the slot frees when second 1000 leaves the window");
        assert!(!rl.take(1, 10, 1, 1060).admitted, "still within 60 s");
        assert!(rl.take(1, 10, 1, 1061).admitted);
        assert!(rl.take(2, 10, 1, 1000).admitted, "clients are independent");
    }

    #[test]
    fn batches_are_all_or_nothing() {
        let mut rl = RateLimiter::new();
        assert!(rl.take(1, 10, 7, 5).admitted);
        let d = rl.take(1, 10, 4, 5);
        assert!(!d.admitted);
        assert_eq!(d.remaining, 3, "a refused batch counts nothing");
        assert!(rl.take(1, 10, 3, 5).admitted);
        assert_eq!(rl.take(1, 10, 11, 5).retry_after_secs, 61);
    }

    #[test]
    fn refund_gives_back() {
        let mut rl = RateLimiter::new();
        assert!(rl.take(1, 5, 5, 100).admitted);
        rl.refund(1, 2, 100, 101);
        assert_eq!(rl.take(1, 5, 0, 101).remaining, 2);
    }

    #[test]
    fn state_query_counts_nothing() {
        let mut rl = RateLimiter::new();
        let d = rl.take(1, 5, 0, 100);
        assert!(d.admitted);
        assert_eq!((d.remaining, d.reset_secs), (5, 0));
    }

    proptest! {
        /// In every 60-second window the admitted count stays within the limit.
        #[test]
        fn never_more_than_the_limit_in_any_minute(
            limit in 1u64..50,
            arrivals in proptest::collection::vec((0u64..3, 1u64..4), 1..400),
        ) {
            let mut rl = RateLimiter::new();
            let mut now = 10_000u64;
            let mut admitted: Vec<(u64, u64)> = Vec::new();
            for (gap, n) in arrivals {
                now += gap;
                if rl.take(7, limit, n, now).admitted {
                    admitted.push((now, n));
                }
            }
            for &(start, _) in &admitted {
                let in_window: u64 = admitted.iter().filter(|(t, _)| *t >= start && *t < start + 60).map(|(_, n)| n).sum();
                prop_assert!(in_window <= limit, "{} admitted in the minute from {}", in_window, start);
            }
        }

        /// The scan bound changes no answer: every decision equals a scan
        /// of the whole window, with refunds and quiet gaps mixed in.
        #[test]
        fn reset_and_retry_match_a_full_scan(
            limit in 1u64..50,
            steps in proptest::collection::vec((0u64..90, 0u64..4, proptest::bool::ANY), 1..300),
        ) {
            let mut rl = RateLimiter::new();
            let mut now = 10_000u64;
            for (gap, n, refund) in steps {
                now += gap % 7 + if gap > 80 { 70 } else { 0 };
                if refund {
                    rl.refund(7, n, now.saturating_sub(gap % 3), now);
                }
                let d = rl.take(7, limit, n, now);
                let w = rl.windows[&7].clone();
                let full = |needed: u64| {
                    let mut freed = 0;
                    for age in (0..WINDOW_BUCKETS).rev() {
                        let sec = now - age;
                        freed += w.counts[(sec % WINDOW_BUCKETS) as usize] as u64;
                        if freed >= needed {
                            return sec + WINDOW_BUCKETS - now;
                        }
                    }
                    WINDOW_BUCKETS
                };
                let reset = if w.total == 0 { 0 } else { full(1) };
                prop_assert_eq!(d.reset_secs, reset);
                if !d.admitted && n <= limit {
                    prop_assert_eq!(d.retry_after_secs, full(w.total + n - limit).max(1));
                }
            }
        }
    }
}
