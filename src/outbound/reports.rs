//! The offload thread's side of the per-shard report channels.
//!
//! A report is never dropped while its shard listens, and a shard that reads
//! slowly never stalls the others: when a shard's channel is full its
//! reports wait here, in order, and the dispatcher starts no new attempts
//! for that shard's jobs (nor takes new jobs) until the backlog is below
//! `gate`. So a backlog holds at most `gate` + the attempts in flight + 1.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::task::Poll;

use futures_channel::mpsc;

use super::job::Report;

pub(super) struct ReportOut {
    /// None once the shard dropped its receiver: its reports are discarded.
    senders: Vec<Option<mpsc::Sender<Report>>>,
    backlog: Vec<VecDeque<Report>>,
    gate: usize,
}

impl ReportOut {
    pub(super) fn new(senders: Vec<mpsc::Sender<Report>>, gate: usize) -> ReportOut {
        let backlog = senders.iter().map(|_| VecDeque::new()).collect();
        ReportOut { senders: senders.into_iter().map(Some).collect(), backlog, gate }
    }

    /// Hands a report to its shard, or queues it behind earlier ones.
    pub(super) fn send(&mut self, shard: usize, report: Report) {
        let Some(tx) = &mut self.senders[shard] else { return };
        if !self.backlog[shard].is_empty() {
            self.backlog[shard].push_back(report);
            return;
        }
        match tx.try_send(report) {
            Ok(()) => {}
            Err(e) if e.is_full() => self.backlog[shard].push_back(e.into_inner()),
            Err(_) => self.senders[shard] = None,
        }
    }

    pub(super) fn backlogged(&self) -> bool {
        self.backlog.iter().any(|b| !b.is_empty())
    }

    /// Whether new attempts for this shard's jobs must wait.
    pub(super) fn is_gated(&self, shard: usize) -> bool {
        self.backlog[shard].len() >= self.gate
    }

    pub(super) fn any_gated(&self) -> bool {
        self.backlog.iter().any(|b| b.len() >= self.gate)
    }

    /// Resolves once at least one waiting report went out (or a shard was
    /// found gone). Pending while every backlogged channel is full.
    pub(super) async fn flush(&mut self) {
        poll_fn(|cx| {
            let mut progressed = false;
            for (tx_slot, backlog) in self.senders.iter_mut().zip(&mut self.backlog) {
                while let (Some(tx), Some(_)) = (tx_slot.as_mut(), backlog.front()) {
                    match tx.poll_ready(cx) {
                        Poll::Ready(Ok(())) => {
                            let Some(report) = backlog.pop_front() else { break };
                            if tx.start_send(report).is_err() {
                                *tx_slot = None;
                                backlog.clear();
                            }
                            progressed = true;
                        }
                        Poll::Ready(Err(_)) => {
                            *tx_slot = None;
                            backlog.clear();
                            progressed = true;
                        }
                        Poll::Pending => break,
                    }
                }
            }
            if progressed {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    }

    /// Flushes until nothing waits (the caller bounds it with a deadline).
    pub(super) async fn flush_all(&mut self) {
        while self.backlogged() {
            self.flush().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;

    use super::*;

    fn failed(job: u64) -> Report {
        Report::Exhausted { job, attempts: 1, error: None }
    }

    #[tokio::test]
    async fn a_full_channel_backlogs_in_order_gates_and_flushes() {
        let (tx, mut rx) = mpsc::channel(1); // holds 1 + 1 (the sender's slot)
        let (other_tx, mut other_rx) = mpsc::channel(1);
        let mut out = ReportOut::new(vec![tx, other_tx], 2);
        for job in 0..5 {
            out.send(0, failed(job));
        }
        out.send(1, failed(100));
        assert!(out.backlogged());
        assert!(out.is_gated(0) && !out.is_gated(1), "shard 0 waits, shard 1 does not");
        assert_eq!(other_rx.next().await.map(|r| r.job()), Some(100));
        let mut got = Vec::new();
        while out.backlogged() {
            got.push(rx.next().await.map(|r| r.job()));
            out.flush().await;
        }
        while let Ok(r) = rx.try_recv() {
            got.push(Some(r.job()));
        }
        assert_eq!(got, (0..5).map(Some).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_gone_shard_drops_its_reports() {
        let (tx, rx) = mpsc::channel(0);
        let mut out = ReportOut::new(vec![tx], 4);
        out.send(0, failed(1));
        out.send(0, failed(2));
        drop(rx);
        out.flush().await;
        assert!(!out.backlogged());
        out.send(0, failed(3));
        assert!(!out.backlogged());
    }
}
