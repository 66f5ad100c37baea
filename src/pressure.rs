//! Memory pressure and load shedding of one shard.
//!
//! Each shard has a budget for what it holds in memory: its business
//! connections' buffers (request heads and bodies, in flight or arriving),
//! journal bytes not yet durable, and the entries of its message index.
//! `engine.memory_limit_bytes` less a fixed reserve for the process
//! (binary, runtime, io_uring rings) is split over the shards; half of a
//! shard's share is this budget, a quarter at most its body cache, and the
//! rest is headroom for WebSocket sessions and allocator slack. As it fills, the shard sheds
//! by priority: `low` from 80%, `normal` from 90%, `high` only when full;
//! a tier's `shed_offset_percent` moves its low and normal thresholds up.
//! When full, connections stop reading (TCP backpressure).

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use esh3ar_shards::Priority;

/// Estimated bytes an index entry costs (meta, pending queue slot, maps).
pub const INDEX_ENTRY_BYTES: usize = 192;

/// Memory kept aside for the process itself before shares are split.
pub const PROCESS_RESERVE_BYTES: usize = 48 << 20;

/// One shard's share of `engine.memory_limit_bytes`.
pub fn shard_share_bytes(cfg: &crate::config::Config, shards: usize) -> usize {
    cfg.engine.memory_limit_bytes.saturating_sub(PROCESS_RESERVE_BYTES) / shards.max(1)
}

/// Shedding threshold of a priority, in percent of the budget.
pub fn threshold_percent(priority: Priority, tier_offset_percent: u8) -> u64 {
    let base = match priority {
        Priority::Low => 80,
        Priority::Normal => 90,
        Priority::High => return 100,
    };
    (base + tier_offset_percent as u64).min(99)
}

/// One shard's gauge. `used` parts are reported by their owners.
pub struct Pressure {
    budget_bytes: usize,
    inflight_bytes: Cell<usize>,
    waiters: RefCell<Vec<Waker>>,
}

impl Pressure {
    pub fn new(budget_bytes: usize) -> Self {
        Self { budget_bytes: budget_bytes.max(1), inflight_bytes: Cell::new(0), waiters: RefCell::new(Vec::new()) }
    }

    /// The budget in bytes.
    pub fn budget(&self) -> usize {
        self.budget_bytes
    }

    /// Request bytes in flight on this shard's connections.
    pub fn inflight(&self) -> usize {
        self.inflight_bytes.get()
    }

    /// Counts `bytes` of a request in flight until the guard drops.
    pub fn hold(&self, bytes: usize) -> Held<'_> {
        self.inflight_bytes.set(self.inflight_bytes.get() + bytes);
        Held { pressure: self, bytes }
    }

    /// Fill level in percent, given the parts the shard owns elsewhere.
    pub fn percent(&self, journal_unflushed: usize, index_entries: usize) -> u64 {
        let used = self.inflight_bytes.get() + journal_unflushed + index_entries * INDEX_ENTRY_BYTES;
        (used as u128 * 100 / self.budget_bytes as u128) as u64
    }

    /// Wakes connections waiting for room (call when usage dropped).
    pub fn wake(&self) {
        for w in self.waiters.borrow_mut().drain(..) {
            w.wake();
        }
    }

    /// Resolves at the next [`Pressure::wake`].
    pub fn changed(&self) -> Changed<'_> {
        Changed { pressure: self, registered: false }
    }

    /// True while anyone waits for room.
    pub fn has_waiters(&self) -> bool {
        !self.waiters.borrow().is_empty()
    }
}

/// Keeps request bytes counted while alive.
pub struct Held<'a> {
    pressure: &'a Pressure,
    bytes: usize,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        let p = self.pressure;
        p.inflight_bytes.set(p.inflight_bytes.get() - self.bytes);
    }
}

/// Future of [`Pressure::changed`].
pub struct Changed<'a> {
    pressure: &'a Pressure,
    registered: bool,
}

impl Future for Changed<'_> {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.registered {
            return Poll::Ready(());
        }
        self.pressure.waiters.borrow_mut().push(cx.waker().clone());
        self.registered = true;
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_order_priorities_and_tiers() {
        assert!(threshold_percent(Priority::Low, 0) < threshold_percent(Priority::Normal, 0));
        assert!(threshold_percent(Priority::Normal, 0) < threshold_percent(Priority::High, 0));
        assert!(threshold_percent(Priority::Low, 8) > threshold_percent(Priority::Low, 0));
        assert_eq!(threshold_percent(Priority::High, 8), 100);
        assert!(threshold_percent(Priority::Normal, 50) < 100, "only high may use the last percent");
    }

    #[test]
    fn held_bytes_count_until_dropped() {
        let p = Pressure::new(1000);
        {
            let _h = p.hold(500);
            assert_eq!(p.percent(0, 0), 50);
            assert_eq!(p.percent(100, 0), 60);
        }
        assert_eq!(p.percent(0, 0), 0);
        assert_eq!(p.percent(0, 2), (2 * INDEX_ENTRY_BYTES * 100 / 1000) as u64);
    }
}
