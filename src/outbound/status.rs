//! What the edge (`/healthz`, `/metrics`) may read: breaker states and
//! attempt counters. Written only by the offload thread, read with relaxed
//! atomics; nothing here is on the message path and nothing takes a lock.
//!
//! The endpoint list grows when a runtime config change adds a webhook
//! (`OutboundStatus::push`, offload thread only). It is append-only and
//! lock-free: slots live in chunks of [`ENDPOINTS_PER_CHUNK`] allocated on
//! first use, a slot's name is set once, and `len` is published with
//! `Release` only after the slot is complete, so a reader that loads `len`
//! with `Acquire` sees every slot below it whole.

use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::OnceLock;

use super::breaker::BreakerState;

/// Most endpoints (webhooks and providers) the offload thread knows in one
/// process lifetime: every webhook configured at startup or added at
/// runtime takes one, and a restart numbers them afresh. 65,536 endpoints
/// cost ~1,024 chunk pointers (16 KiB) up front and ~40 bytes per endpoint.
pub const ENDPOINTS_MAX: usize = 1 << 16;

/// Endpoints per status chunk (allocated on first use).
pub const ENDPOINTS_PER_CHUNK: usize = 64;

const CHUNKS: usize = ENDPOINTS_MAX / ENDPOINTS_PER_CHUNK;
const _: () = assert!(ENDPOINTS_MAX.is_multiple_of(ENDPOINTS_PER_CHUNK) && ENDPOINTS_MAX <= u32::MAX as usize);

#[derive(Debug)]
struct Slot {
    name: OnceLock<String>,
    breaker: AtomicU8,
}

/// Published state of every endpoint's breaker, in `EndpointId` order.
#[derive(Debug)]
pub struct OutboundStatus {
    chunks: Box<[OnceLock<Box<[Slot]>>]>,
    /// Slots below this are complete (Release on push, Acquire on read).
    len: AtomicUsize,
    /// `webhook_attempts_total{result}`, indexed by `AttemptResult as usize`.
    attempts: [AtomicU64; ATTEMPT_RESULTS],
    exhausted: AtomicU64,
}

const ATTEMPT_RESULTS: usize = 5;

/// The `result` label of `webhook_attempts_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptResult {
    Delivered = 0,
    HttpError = 1,
    Timeout = 2,
    ConnectError = 3,
    RequestError = 4,
}

impl AttemptResult {
    pub const ALL: [AttemptResult; ATTEMPT_RESULTS] = [
        AttemptResult::Delivered,
        AttemptResult::HttpError,
        AttemptResult::Timeout,
        AttemptResult::ConnectError,
        AttemptResult::RequestError,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AttemptResult::Delivered => "delivered",
            AttemptResult::HttpError => "http_error",
            AttemptResult::Timeout => "timeout",
            AttemptResult::ConnectError => "connect_error",
            AttemptResult::RequestError => "request_error",
        }
    }
}

fn encode(s: BreakerState) -> u8 {
    match s {
        BreakerState::Closed => 0,
        BreakerState::Open => 1,
        BreakerState::HalfOpen => 2,
    }
}

fn decode(v: u8) -> BreakerState {
    match v {
        0 => BreakerState::Closed,
        1 => BreakerState::Open,
        _ => BreakerState::HalfOpen,
    }
}

impl OutboundStatus {
    /// The status of these endpoints (at most [`ENDPOINTS_MAX`]).
    pub(super) fn new(names: Vec<String>) -> OutboundStatus {
        let chunks = (0..CHUNKS).map(|_| OnceLock::new()).collect();
        let status = OutboundStatus {
            chunks,
            len: AtomicUsize::new(0),
            attempts: Default::default(),
            exhausted: AtomicU64::new(0),
        };
        for name in names {
            status.push(name);
        }
        status
    }

    /// Appends an endpoint (breaker closed) and returns its position, or
    /// None when [`ENDPOINTS_MAX`] are known. One writer: the offload
    /// thread (and `spawn` before it starts).
    pub(super) fn push(&self, name: String) -> Option<usize> {
        let i = self.len.load(Ordering::Relaxed);
        if i >= ENDPOINTS_MAX {
            return None;
        }
        let chunk = self.chunks[i / ENDPOINTS_PER_CHUNK].get_or_init(|| {
            (0..ENDPOINTS_PER_CHUNK)
                .map(|_| Slot { name: OnceLock::new(), breaker: AtomicU8::new(encode(BreakerState::Closed)) })
                .collect()
        });
        let set = chunk[i % ENDPOINTS_PER_CHUNK].name.set(name);
        assert!(set.is_ok(), "status slot {i} named twice: one writer only");
        self.len.store(i + 1, Ordering::Release);
        Some(i)
    }

    /// Endpoints known.
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    /// True before any endpoint is known.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn slot(&self, endpoint: usize) -> Option<&Slot> {
        if endpoint >= self.len() {
            return None;
        }
        let chunk = self.chunks[endpoint / ENDPOINTS_PER_CHUNK].get()?;
        Some(&chunk[endpoint % ENDPOINTS_PER_CHUNK])
    }

    pub(super) fn set_breaker(&self, endpoint: usize, state: BreakerState) {
        if let Some(slot) = self.slot(endpoint) {
            slot.breaker.store(encode(state), Ordering::Relaxed);
        }
    }

    pub(super) fn count_attempt(&self, result: AttemptResult) {
        self.attempts[result as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn count_exhausted(&self) {
        self.exhausted.fetch_add(1, Ordering::Relaxed);
    }

    /// One endpoint's breaker, by its `EndpointId` (`spawn`'s list, then the endpoints added at runtime).
    pub fn breaker(&self, endpoint: usize) -> Option<BreakerState> {
        self.slot(endpoint).map(|s| decode(s.breaker.load(Ordering::Relaxed)))
    }

    /// `("webhook:<name>" or "provider:<channel>", "closed"|"open"|"half_open")`
    /// for every endpoint, for `/healthz`.
    pub fn breakers(&self) -> impl Iterator<Item = (String, &'static str)> + '_ {
        (0..self.len()).filter_map(|i| {
            let slot = self.slot(i)?;
            Some((slot.name.get()?.clone(), decode(slot.breaker.load(Ordering::Relaxed)).as_str()))
        })
    }

    /// `webhook_attempts_total{result}`.
    pub fn attempts(&self, result: AttemptResult) -> u64 {
        self.attempts[result as usize].load(Ordering::Relaxed)
    }

    /// Jobs reported `Exhausted`.
    pub fn exhausted(&self) -> u64 {
        self.exhausted.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_endpoint_list_grows_across_chunks_and_keeps_positions() {
        let status = OutboundStatus::new(vec!["webhook:a".into(), "provider:email".into()]);
        assert_eq!(status.len(), 2);
        status.set_breaker(1, BreakerState::Open);
        for i in 2..ENDPOINTS_PER_CHUNK + 3 {
            assert_eq!(status.push(format!("webhook:{i}")), Some(i));
        }
        assert_eq!(status.breaker(1), Some(BreakerState::Open), "a grown list keeps earlier states");
        status.set_breaker(ENDPOINTS_PER_CHUNK + 1, BreakerState::HalfOpen);
        let all: Vec<(String, &str)> = status.breakers().collect();
        assert_eq!(all.len(), ENDPOINTS_PER_CHUNK + 3);
        assert_eq!(all[0], ("webhook:a".to_owned(), "closed"));
        assert_eq!(all[ENDPOINTS_PER_CHUNK + 1], (format!("webhook:{}", ENDPOINTS_PER_CHUNK + 1), "half_open"));
        assert_eq!(status.breaker(ENDPOINTS_PER_CHUNK + 3), None, "beyond the list");
    }
}
