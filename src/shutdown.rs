//! Graceful shutdown. A signal thread sets a process-wide flag; each shard
//! polls it and trips its own [`Shutdown`], which wakes every idle
//! connection so it can close while requests in flight finish.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

/// Installs SIGTERM and SIGINT handlers that set the returned flag.
pub fn install_signal_flag() -> std::io::Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGTERM, flag.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGINT, flag.clone())?;
    Ok(flag)
}

/// One shard's view of shutdown.
#[derive(Default)]
pub struct Shutdown {
    set: Cell<bool>,
    wakers: RefCell<Vec<Waker>>,
}

impl Shutdown {
    /// True once shutdown began.
    pub fn is_set(&self) -> bool {
        self.set.get()
    }

    /// Begins shutdown and wakes every waiter.
    pub fn trigger(&self) {
        self.set.set(true);
        for w in self.wakers.borrow_mut().drain(..) {
            w.wake();
        }
    }

    /// Resolves when shutdown begins.
    pub fn wait(&self) -> WaitShutdown<'_> {
        WaitShutdown { shutdown: self }
    }

    /// Polls the process flag every 50 ms and trips this shard's shutdown.
    pub async fn watch(&self, flag: Arc<AtomicBool>) {
        while !flag.load(Ordering::Relaxed) && !self.is_set() {
            glommio::timer::sleep(Duration::from_millis(50)).await;
        }
        self.trigger();
    }
}

/// Future of [`Shutdown::wait`].
pub struct WaitShutdown<'a> {
    shutdown: &'a Shutdown,
}

impl Future for WaitShutdown<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.shutdown.is_set() {
            Poll::Ready(())
        } else {
            let mut wakers = self.shutdown.wakers.borrow_mut();
            if !wakers.iter().any(|w| w.will_wake(cx.waker())) {
                wakers.push(cx.waker().clone());
            }
            Poll::Pending
        }
    }
}
