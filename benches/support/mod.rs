//! Runs async benchmark bodies on a glommio executor thread: criterion's
//! `iter_custom` sends the iteration count, the executor runs the body
//! that many times and sends back the elapsed time. The executor blocks
//! between samples, which is fine: nothing else runs on it then.

use std::future::Future;
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub struct AsyncBench {
    iters: mpsc::Sender<u64>,
    elapsed: mpsc::Receiver<Duration>,
}

#[allow(dead_code)] // each bench target uses part of this module
impl AsyncBench {
    /// `setup` runs once on the executor and returns the body to time.
    pub fn start<S, SF, B, BF>(name: &str, setup: S) -> AsyncBench
    where
        S: FnOnce() -> SF + Send + 'static,
        SF: Future<Output = B> + 'static,
        B: FnMut() -> BF + 'static,
        BF: Future<Output = ()>,
    {
        Self::start_with(glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound).name(name), setup)
    }

    /// Like [`AsyncBench::start`] on an executor built by `builder`.
    pub fn start_with<S, SF, B, BF>(builder: glommio::LocalExecutorBuilder, setup: S) -> AsyncBench
    where
        S: FnOnce() -> SF + Send + 'static,
        SF: Future<Output = B> + 'static,
        B: FnMut() -> BF + 'static,
        BF: Future<Output = ()>,
    {
        let (iters_tx, iters_rx) = mpsc::channel::<u64>();
        let (elapsed_tx, elapsed_rx) = mpsc::channel();
        builder
            .spawn(move || async move {
                let mut body = setup().await;
                while let Ok(n) = iters_rx.recv() {
                    let t = Instant::now();
                    for _ in 0..n {
                        body().await;
                    }
                    if elapsed_tx.send(t.elapsed()).is_err() {
                        break;
                    }
                }
            })
            .expect("start the benchmark executor"); // dropping the handle detaches the thread
        AsyncBench { iters: iters_tx, elapsed: elapsed_rx }
    }

    /// Runs the body `n` times; returns how long that took.
    pub fn run(&self, n: u64) -> Duration {
        self.iters.send(n).expect("benchmark executor alive");
        self.elapsed.recv().expect("benchmark executor alive")
    }
}
