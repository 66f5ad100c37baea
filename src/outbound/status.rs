//! What the edge (`/healthz`, `/metrics`) may read: breaker states and
//! attempt counters. Written only by the offload thread, read with relaxed
//! atomics; nothing here is on the message path and nothing takes a lock.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

use super::breaker::BreakerState;

/// Published state of every endpoint's breaker, in `EndpointId` order.
#[derive(Debug)]
pub struct OutboundStatus {
    names: Vec<String>,
    breakers: Vec<AtomicU8>,
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
    pub(super) fn new(names: Vec<String>) -> OutboundStatus {
        let breakers = names.iter().map(|_| AtomicU8::new(encode(BreakerState::Closed))).collect();
        OutboundStatus { names, breakers, attempts: Default::default(), exhausted: AtomicU64::new(0) }
    }

    pub(super) fn set_breaker(&self, endpoint: usize, state: BreakerState) {
        self.breakers[endpoint].store(encode(state), Ordering::Relaxed);
    }

    pub(super) fn count_attempt(&self, result: AttemptResult) {
        self.attempts[result as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn count_exhausted(&self) {
        self.exhausted.fetch_add(1, Ordering::Relaxed);
    }

    /// One endpoint's breaker, by its position in `spawn`'s list.
    pub fn breaker(&self, endpoint: usize) -> Option<BreakerState> {
        self.breakers.get(endpoint).map(|b| decode(b.load(Ordering::Relaxed)))
    }

    /// `("webhook:<name>" or "provider:<channel>", "closed"|"open"|"half_open")`
    /// for every endpoint, for `/healthz`.
    pub fn breakers(&self) -> impl Iterator<Item = (String, &'static str)> + '_ {
        self.names
            .iter()
            .zip(&self.breakers)
            .map(|(name, b)| (name.clone(), decode(b.load(Ordering::Relaxed)).as_str()))
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
