//! A wake-up for the tasks of one shard, built on glommio's `Semaphore`
//! instead of a hand-rolled waker list: a waiter is an `acquire` on a
//! semaphore that has no permits, and waking everyone is closing it. The
//! semaphore keeps its waiters in an intrusive list that a dropped waiter
//! leaves at once, so nothing accumulates however many waits are abandoned
//! (the leak a hand-rolled `Vec<Waker>` had: one waker per connection ever
//! accepted).

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use glommio::sync::Semaphore;

/// Counts a live wait for tests and gauges; uncounted when dropped.
struct Waiting<'a>(&'a Cell<usize>);

impl<'a> Waiting<'a> {
    fn new(count: &'a Cell<usize>) -> Self {
        count.set(count.get() + 1);
        Self(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.set(self.0.get() - 1);
    }
}

/// Waits until [`Notify::notify_all`]; may be notified many times.
pub struct Notify {
    /// Closed and replaced on every notification.
    current: RefCell<Rc<Semaphore>>,
    waiting: Cell<usize>,
}

impl Default for Notify {
    fn default() -> Self {
        Self { current: RefCell::new(Rc::new(Semaphore::new(0))), waiting: Cell::new(0) }
    }
}

impl Notify {
    /// Resolves at the next [`Notify::notify_all`] after this call.
    pub async fn notified(&self) {
        let sem = self.current.borrow().clone();
        let _waiting = Waiting::new(&self.waiting);
        // No permit is ever signalled: the only way out is `close`.
        let _ = sem.acquire(1).await;
    }

    /// Wakes every task waiting now.
    pub fn notify_all(&self) {
        let old = self.current.replace(Rc::new(Semaphore::new(0)));
        old.close();
    }

    /// Tasks waiting now.
    pub fn waiting(&self) -> usize {
        self.waiting.get()
    }
}

/// A one-time event: once [`Latch::set`], every wait resolves at once,
/// including later ones.
pub struct Latch {
    set: Cell<bool>,
    closed: Semaphore,
    waiting: Cell<usize>,
}

impl Default for Latch {
    fn default() -> Self {
        Self { set: Cell::new(false), closed: Semaphore::new(0), waiting: Cell::new(0) }
    }
}

impl Latch {
    /// True once set.
    pub fn is_set(&self) -> bool {
        self.set.get()
    }

    /// Sets the latch and wakes every waiter.
    pub fn set(&self) {
        self.set.set(true);
        self.closed.close();
    }

    /// Resolves once the latch is set.
    pub async fn wait(&self) {
        if self.is_set() {
            return;
        }
        let _waiting = Waiting::new(&self.waiting);
        let _ = self.closed.acquire(1).await;
    }

    /// Tasks waiting now.
    pub fn waiting(&self) -> usize {
        self.waiting.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_lite::future::{poll_once, yield_now};
    use glommio::LocalExecutor;

    #[test]
    fn abandoned_waits_leave_nothing_behind() {
        LocalExecutor::default().run(async {
            let latch = Latch::default();
            let notify = Notify::default();
            for _ in 0..10_000 {
                // Registered (polled once, pending), then dropped: what a
                // connection that closes while idle does.
                let mut w = Box::pin(latch.wait());
                assert!(poll_once(&mut w).await.is_none());
                let mut n = Box::pin(notify.notified());
                assert!(poll_once(&mut n).await.is_none());
                assert_eq!((latch.waiting(), notify.waiting()), (1, 1));
            }
            assert_eq!((latch.waiting(), notify.waiting()), (0, 0));
        });
    }

    #[test]
    fn set_and_notify_wake_every_waiter() {
        LocalExecutor::default().run(async {
            let latch = Rc::new(Latch::default());
            let notify = Rc::new(Notify::default());
            let woken = Rc::new(Cell::new(0));
            let mut tasks = Vec::new();
            for _ in 0..100 {
                let (l, n, w) = (latch.clone(), notify.clone(), woken.clone());
                tasks.push(glommio::spawn_local(async move {
                    n.notified().await;
                    w.set(w.get() + 1);
                    l.wait().await;
                    w.set(w.get() + 1);
                }));
            }
            yield_now().await;
            assert_eq!((notify.waiting(), woken.get()), (100, 0));
            notify.notify_all();
            for _ in 0..3 {
                yield_now().await;
            }
            assert_eq!((notify.waiting(), latch.waiting(), woken.get()), (0, 100, 100));
            latch.set();
            for t in tasks {
                t.await;
            }
            assert_eq!(woken.get(), 200);
            // A wait after the latch is set returns at once.
            latch.wait().await;
        });
    }
}
