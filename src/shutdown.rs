//! Graceful shutdown by ownership, in the shape of mini-redis's
//! `src/shutdown.rs`, built on the runtime's primitives:
//!
//! - A signal thread (signal-hook's iterator) *drops* one oneshot sender per
//!   shard on the first SIGTERM/SIGINT; each shard's receiver resolves and
//!   trips that shard's [`Shutdown`]. Nothing polls a flag.
//! - [`Shutdown::wait`] is a [`Latch`] (a glommio `Semaphore` that is closed
//!   once): every waiter wakes, and a waiter that is dropped first (a
//!   connection that closed) leaves no trace behind.
//! - Every connection and session holds a [`Pass`] of the shard's glommio
//!   `Gate`; draining is closing the gate, which resolves when the last pass
//!   is dropped, with a bound ([`Shutdown::drain`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_channel::oneshot;
use glommio::sync::{Gate, Pass};

use crate::notify::Latch;

/// What the signal thread hands the process: a flag for the main thread
/// (read while executors start) and one receiver per shard.
pub struct Signals {
    pub flag: Arc<AtomicBool>,
    pub shards: Vec<oneshot::Receiver<()>>,
    /// One item per SIGHUP (re-read the config file), for shard 0. Bounded:
    /// SIGHUPs that arrive while one is pending are merged into it.
    pub reload: futures_channel::mpsc::Receiver<()>,
}

/// Starts the thread that turns the first SIGTERM or SIGINT into a
/// shutdown of every shard (by dropping their senders).
pub fn install_signals(shards: usize) -> std::io::Result<Signals> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    let (mut reload_tx, reload) = futures_channel::mpsc::channel(1);
    let flag = Arc::new(AtomicBool::new(false));
    let (senders, receivers): (Vec<_>, Vec<_>) = (0..shards).map(|_| oneshot::channel::<()>()).unzip();
    let thread_flag = flag.clone();
    std::thread::Builder::new().name("signals".into()).spawn(move || {
        let mut senders = senders;
        for signal in signals.forever() {
            if signal == SIGHUP {
                tracing::info!("SIGHUP: re-reading the configuration file");
                let _ = reload_tx.try_send(()); // full: one is pending already
                continue;
            }
            tracing::info!(signal, "shutting down: finishing requests in flight");
            thread_flag.store(true, Ordering::Release);
            senders.clear(); // dropped senders wake every shard
        }
    })?;
    Ok(Signals { flag, shards: receivers, reload })
}

/// One shard's view of shutdown.
pub struct Shutdown {
    begun: Latch,
    conns: Gate,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self { begun: Latch::default(), conns: Gate::new() }
    }
}

impl Shutdown {
    /// True once shutdown began.
    pub fn is_set(&self) -> bool {
        self.begun.is_set()
    }

    /// Begins shutdown and wakes every waiter.
    pub fn trigger(&self) {
        if !self.is_set() {
            self.begun.set();
        }
    }

    /// Resolves when shutdown begins.
    pub async fn wait(&self) {
        self.begun.wait().await
    }

    /// Tasks waiting for shutdown now (connections idle between requests,
    /// sessions, accept loops).
    pub fn waiting(&self) -> usize {
        self.begun.waiting()
    }

    /// Trips this shard's shutdown when the signal thread drops `signal`'s sender.
    pub async fn watch(&self, signal: oneshot::Receiver<()>) {
        let _ = signal.await;
        self.trigger();
    }

    /// A pass for a connection: draining waits until it is dropped. None
    /// once draining began.
    pub fn enter(&self) -> Option<Pass> {
        self.conns.enter().ok()
    }

    /// Closes the gate and waits, at most `bound`, until every pass is
    /// dropped. True if all were.
    pub async fn drain(&self, bound: Duration) -> bool {
        let gate = self.conns.clone();
        let mut closing = Box::pin(async move { gate.close().await.is_ok() });
        let finished = futures_lite::future::or(async { Some((&mut closing).await) }, async {
            glommio::timer::sleep(bound).await;
            None
        })
        .await;
        match finished {
            Some(closed) => closed,
            None => {
                // glommio's Gate sends "closed" into the closing future's
                // channel when the last pass leaves, and panics if that
                // future is gone. Keep it (a few bytes, once per process).
                std::mem::forget(closing);
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_lite::future::poll_once;
    use glommio::LocalExecutor;
    use std::rc::Rc;

    /// 10,000 connections, each holding a pass and waiting for shutdown
    /// while idle, then closing: nothing of them stays registered, and the
    /// drain after them has nothing to wait for.
    #[test]
    fn connections_that_end_leave_no_waiter_and_no_pass() {
        LocalExecutor::default().run(async {
            let s = Rc::new(Shutdown::default());
            assert_eq!(s.waiting(), 0);
            for batch in 0..10 {
                let mut conns = Vec::new();
                for _ in 0..1000 {
                    let s = s.clone();
                    let pass = s.enter().expect("open gate");
                    conns.push(glommio::spawn_local(async move {
                        let _pass = pass;
                        // An idle connection: its read never completes here.
                        futures_lite::future::or(s.wait(), futures_lite::future::pending::<()>()).await;
                    }));
                }
                futures_lite::future::yield_now().await;
                assert_eq!(s.waiting(), 1000, "batch {batch}: every idle connection waits");
                for c in conns {
                    c.cancel().await; // the peer closed: the task ends
                }
                assert_eq!(s.waiting(), 0, "batch {batch}: ended connections leave nothing");
            }
            assert!(s.drain(Duration::from_millis(10)).await, "no pass left to wait for");
        });
    }

    #[test]
    fn drain_waits_for_passes_within_its_bound() {
        LocalExecutor::default().run(async {
            let s = Rc::new(Shutdown::default());
            let pass = s.enter().unwrap();
            let held = glommio::spawn_local(async move {
                glommio::timer::sleep(Duration::from_millis(50)).await;
                drop(pass);
            });
            s.trigger();
            let mut wait = Box::pin(s.wait());
            assert!(poll_once(&mut wait).await.is_some(), "waits resolve once set");
            assert!(s.drain(Duration::from_secs(5)).await);
            held.await;
            assert!(s.enter().is_none(), "no new connection after draining");

            let s = Rc::new(Shutdown::default());
            let stuck = s.enter().unwrap();
            assert!(!s.drain(Duration::from_millis(20)).await, "the bound holds");
            drop(stuck); // must not panic after a bounded drain gave up
        });
    }
}
