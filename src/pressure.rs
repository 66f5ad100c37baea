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
//!
//! A connection waiting for room waits for an event that frees some, never
//! on a timer: a buffer given back ([`Held`] drops and notifies), the
//! journal's next fdatasync (the waiter awaits it, `Shard::wait_for_room`),
//! or settled segments deleted (maintenance notifies).

use std::cell::Cell;

use esh3ar_shards::Priority;

use crate::notify::Notify;

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
    /// Changes with `engine.memory_limit_bytes` at runtime (`set_budget`).
    budget_bytes: Cell<usize>,
    inflight_bytes: Cell<usize>,
    room: Notify,
}

impl Pressure {
    pub fn new(budget_bytes: usize) -> Self {
        Self { budget_bytes: Cell::new(budget_bytes.max(1)), inflight_bytes: Cell::new(0), room: Notify::default() }
    }

    /// The budget in bytes.
    pub fn budget(&self) -> usize {
        self.budget_bytes.get()
    }

    /// A new budget (runtime config change); takes effect at the next check.
    pub fn set_budget(&self, budget_bytes: usize) {
        self.budget_bytes.set(budget_bytes.max(1));
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
        (used as u128 * 100 / self.budget_bytes.get() as u128) as u64
    }

    /// Wakes connections waiting for room (call when usage dropped).
    pub fn wake(&self) {
        if self.room.waiting() > 0 {
            self.room.notify_all();
        }
    }

    /// Resolves at the next [`Pressure::wake`].
    pub async fn changed(&self) {
        self.room.notified().await
    }

    /// Connections waiting for room now.
    pub fn waiting(&self) -> usize {
        self.room.waiting()
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
        p.wake();
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

    /// A connection waiting for room wakes when a buffer is given back,
    /// with no timer; abandoned waits leave nothing registered.
    #[test]
    fn giving_a_buffer_back_wakes_the_waiters() {
        glommio::LocalExecutor::default().run(async {
            let p = std::rc::Rc::new(Pressure::new(1000));
            let held = p.hold(1000);
            assert_eq!(p.percent(0, 0), 100);
            let waiter = {
                let p = p.clone();
                glommio::spawn_local(async move { p.changed().await })
            };
            futures_lite::future::yield_now().await;
            assert_eq!(p.waiting(), 1);
            drop(held);
            waiter.await;
            assert_eq!((p.waiting(), p.percent(0, 0)), (0, 0));
            for _ in 0..1000 {
                let mut w = Box::pin(p.changed());
                assert!(futures_lite::future::poll_once(&mut w).await.is_none());
            }
            assert_eq!(p.waiting(), 0);
        });
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
