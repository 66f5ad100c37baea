//! One endpoint's circuit breaker, sans-io: the caller passes the time in.
//!
//! Closed: requests flow; `failures` consecutive failures open it.
//! Open: nothing is sent until `open_until`. Then the first `permit` turns it
//! half-open and lets exactly one probe through; the probe's success closes
//! it, its failure reopens it for another `open_ms`.
//!
//! Results of attempts started in an earlier *epoch* (before the breaker last
//! opened) do not move it: a straggler that was in flight when it opened must
//! not close it, nor count twice against it.

use std::time::Duration;

use tokio::time::Instant;

/// What `/healthz` shows for an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

/// The answer to "may I send a request to this endpoint now?".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permit {
    /// Send; hand `ticket` back with the result.
    Go(Ticket),
    /// Not before this instant (the breaker is open).
    WaitUntil(Instant),
    /// Not until the probe in flight comes back.
    WaitForProbe,
}

/// Which epoch an attempt started in, and whether it is the probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    epoch: u64,
    probe: bool,
}

#[derive(Debug)]
enum Inner {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probe_in_flight: bool },
}

#[derive(Debug)]
pub struct Breaker {
    inner: Inner,
    epoch: u64,
    failures_to_open: u32,
    open: Duration,
}

impl Breaker {
    pub fn new(failures_to_open: u32, open: Duration) -> Breaker {
        assert!(failures_to_open >= 1);
        Breaker { inner: Inner::Closed { failures: 0 }, epoch: 0, failures_to_open, open }
    }

    pub fn state(&self) -> BreakerState {
        match self.inner {
            Inner::Closed { .. } => BreakerState::Closed,
            Inner::Open { .. } => BreakerState::Open,
            Inner::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// Asks to send one request at `now`. An open breaker past its time
    /// becomes half-open here and the caller's request is the probe.
    pub fn permit(&mut self, now: Instant) -> Permit {
        match self.inner {
            Inner::Closed { .. } => Permit::Go(Ticket { epoch: self.epoch, probe: false }),
            Inner::Open { until } if now < until => Permit::WaitUntil(until),
            Inner::Open { .. } | Inner::HalfOpen { probe_in_flight: false } => {
                self.inner = Inner::HalfOpen { probe_in_flight: true };
                Permit::Go(Ticket { epoch: self.epoch, probe: true })
            }
            Inner::HalfOpen { probe_in_flight: true } => Permit::WaitForProbe,
        }
    }

    /// Takes an attempt's result. Returns the new state if it changed.
    pub fn record(&mut self, ticket: Ticket, success: bool, now: Instant) -> Option<BreakerState> {
        if ticket.epoch != self.epoch {
            return None; // started before the breaker last opened
        }
        let before = self.state();
        match (&mut self.inner, success) {
            (Inner::Closed { failures }, true) => *failures = 0,
            (Inner::Closed { failures }, false) => {
                *failures += 1;
                if *failures >= self.failures_to_open {
                    self.open_at(now);
                }
            }
            (Inner::HalfOpen { .. }, true) if ticket.probe => self.inner = Inner::Closed { failures: 0 },
            (Inner::HalfOpen { .. }, false) if ticket.probe => self.open_at(now),
            // Same-epoch non-probe results cannot arrive while open or
            // half-open: opening starts a new epoch.
            (Inner::Open { .. } | Inner::HalfOpen { .. }, _) => {
                unreachable!("same-epoch non-probe result while not closed")
            }
        }
        let after = self.state();
        (after != before).then_some(after)
    }

    fn open_at(&mut self, now: Instant) {
        self.epoch += 1;
        self.inner = Inner::Open { until: now + self.open };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn go(b: &mut Breaker, now: Instant) -> Ticket {
        match b.permit(now) {
            Permit::Go(t) => t,
            other => panic!("expected Go, got {other:?}"),
        }
    }

    #[test]
    fn opens_after_consecutive_failures_only() {
        let t0 = Instant::now();
        let mut b = Breaker::new(3, Duration::from_millis(100));
        for _ in 0..2 {
            let t = go(&mut b, t0);
            assert_eq!(b.record(t, false, t0), None);
        }
        let t = go(&mut b, t0);
        assert_eq!(b.record(t, true, t0), None); // success resets the count
        for _ in 0..2 {
            let t = go(&mut b, t0);
            b.record(t, false, t0);
        }
        let t = go(&mut b, t0);
        assert_eq!(b.record(t, false, t0), Some(BreakerState::Open));
        assert_eq!(b.permit(t0), Permit::WaitUntil(t0 + Duration::from_millis(100)));
    }

    #[test]
    fn half_open_lets_exactly_one_probe_and_decides_on_it() {
        let t0 = Instant::now();
        let mut b = Breaker::new(1, Duration::from_millis(100));
        let t = go(&mut b, t0);
        b.record(t, false, t0);
        let later = t0 + Duration::from_millis(100);
        let probe = go(&mut b, later);
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert_eq!(b.permit(later), Permit::WaitForProbe);
        assert_eq!(b.record(probe, false, later), Some(BreakerState::Open));
        assert!(matches!(b.permit(later), Permit::WaitUntil(u) if u == later + Duration::from_millis(100)));
        let probe = go(&mut b, later + Duration::from_millis(100));
        assert_eq!(b.record(probe, true, later), Some(BreakerState::Closed));
        assert!(matches!(b.permit(later), Permit::Go(Ticket { probe: false, .. })));
    }

    #[test]
    fn stragglers_from_before_opening_are_ignored() {
        let t0 = Instant::now();
        let mut b = Breaker::new(2, Duration::from_millis(100));
        let a = go(&mut b, t0);
        let c = go(&mut b, t0);
        let d = go(&mut b, t0);
        b.record(a, false, t0);
        assert_eq!(b.record(c, false, t0), Some(BreakerState::Open));
        assert_eq!(b.record(d, true, t0), None, "a success in flight before opening must not close");
        assert_eq!(b.state(), BreakerState::Open);
        let probe = go(&mut b, t0 + Duration::from_millis(100));
        assert_eq!(b.record(d, false, t0), None);
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert_eq!(b.record(probe, true, t0), Some(BreakerState::Closed));
    }
}
