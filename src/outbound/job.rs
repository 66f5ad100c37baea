//! What crosses the boundary between a shard and the offload thread: `Job`s
//! in, `Report`s out, and the two channel ends a shard holds.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures_channel::mpsc;

use super::signing::is_valid_webhook_id;

/// An endpoint, by its position in the offload thread's table: the list
/// given to `spawn`, then the webhooks added at runtime, in the order
/// announced (`Control::try_send`). A position never changes meaning while
/// the process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EndpointId(pub u32);

/// One webhook to deliver.
#[derive(Debug, Clone)]
pub struct Job {
    /// The shard's own id for this job; every report about it carries it.
    pub id: u64,
    /// Which shard's report channel gets the reports: the sending shard's
    /// own (a `JobSender` refuses any other).
    pub shard: usize,
    pub endpoint: EndpointId,
    /// `webhook-id`: the same on every attempt (the receiver dedupes on it).
    pub webhook_id: String,
    /// The JSON payload, sent and signed as is.
    pub body: Bytes,
    /// Attempts already made (from the journal after a restart); 0 for a new job.
    pub attempts: u32,
    /// Unix ms before which the first attempt here must not start (a
    /// journaled `retry_at_ms` after a restart); 0 for now.
    pub not_before_unix_ms: u64,
    /// Provider jobs: the phone (WhatsApp) or address (email); empty for webhooks.
    pub to: String,
    /// Provider jobs with another channel left: give the job back
    /// (`Exhausted`, no attempt spent) instead of waiting while this
    /// endpoint's breaker is open.
    pub yield_when_open: bool,
}

/// Why one attempt failed. Short and free of secrets (no URL, no header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptError {
    /// The endpoint answered, with a status other than 2xx.
    Status(u16),
    /// No complete answer within `timeout_ms`.
    Timeout,
    /// Could not connect (refused, DNS, TLS handshake).
    Connect,
    /// Anything else the client reported (broken connection, bad response).
    Request,
    /// The endpoint's breaker is open (no attempt was made).
    BreakerOpen,
}

impl std::fmt::Display for AttemptError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AttemptError::Status(s) => write!(f, "http status {s}"),
            AttemptError::Timeout => f.write_str("timeout"),
            AttemptError::Connect => f.write_str("connect error"),
            AttemptError::Request => f.write_str("request error"),
            AttemptError::BreakerOpen => f.write_str("breaker open"),
        }
    }
}

/// What happened to a job: one report per attempt, the last one final.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// Final: a 2xx answer. `attempts` counts this one.
    Delivered { job: u64, attempts: u32, status: u16 },
    /// Not final: the next attempt is not before `retry_at_unix_ms`.
    Failed { job: u64, attempts: u32, error: AttemptError, retry_at_unix_ms: u64 },
    /// Final: `max_attempts` reached; the caller dead-letters the event.
    /// `error` is the last attempt's (None if the job came in already spent).
    /// For provider jobs also: a permanent error, or the breaker is open
    /// and the job may yield (`Job::yield_when_open`).
    Exhausted { job: u64, attempts: u32, error: Option<AttemptError> },
    /// Final, provider jobs: the provider accepted the message; its id for
    /// it where it gave one.
    Accepted { job: u64, attempts: u32, provider_message_id: Option<String> },
}

impl Report {
    pub fn job(&self) -> u64 {
        match self {
            Report::Delivered { job, .. }
            | Report::Failed { job, .. }
            | Report::Exhausted { job, .. }
            | Report::Accepted { job, .. } => *job,
        }
    }
}

/// Why `JobSender::try_send` gave the job back.
#[derive(Debug)]
pub enum TrySendError {
    /// The queue is full: keep the job (it is journaled) and offer it later.
    Full(Job),
    /// The offload thread is gone.
    Closed(Job),
    /// Unknown endpoint, a shard other than the sender's, or a `webhook-id`
    /// that is not 1-255 visible ASCII bytes.
    Invalid(Job),
}

/// A shard's end of the job channel. `Send`, so it moves into the shard's
/// thread; `try_send` never waits. Bound to one shard: its jobs' reports
/// go to that shard's `ReportReceiver`.
#[derive(Debug)]
pub struct JobSender {
    tx: mpsc::Sender<Job>,
    /// Endpoints announced to the offload thread (grows with runtime
    /// config changes; `Control::try_send` raises it after queueing the
    /// change, so a job for a new endpoint always finds it queued).
    endpoints: Arc<AtomicU32>,
    shard: usize,
}

impl JobSender {
    pub(super) fn new(tx: mpsc::Sender<Job>, endpoints: Arc<AtomicU32>, shard: usize) -> JobSender {
        JobSender { tx, endpoints, shard }
    }

    /// Another sender for the same shard (its reports go to the same
    /// receiver): the fallback task's, beside the receipts outbox's.
    pub fn duplicate(&self) -> JobSender {
        JobSender { tx: self.tx.clone(), endpoints: self.endpoints.clone(), shard: self.shard }
    }

    /// The shard this sender belongs to (what `Job::shard` must say).
    pub fn shard(&self) -> usize {
        self.shard
    }

    /// Hands a job over without waiting.
    pub fn try_send(&mut self, job: Job) -> Result<(), TrySendError> {
        if job.endpoint.0 >= self.endpoints.load(Ordering::Acquire)
            || job.shard != self.shard
            || !is_valid_webhook_id(&job.webhook_id)
        {
            return Err(TrySendError::Invalid(job));
        }
        self.tx.try_send(job).map_err(|e| {
            if e.is_full() {
                TrySendError::Full(e.into_inner())
            } else {
                TrySendError::Closed(e.into_inner())
            }
        })
    }
}

/// A shard's end of its report channel: a `Stream<Item = Report>` that ends
/// when the offload thread has exited.
pub type ReportReceiver = mpsc::Receiver<Report>;

// The shard ends move into the shards' threads, and jobs and reports cross
// to and from the offload thread: all must stay `Send`.
const _: () = {
    const fn must_be_send<T: Send>() {}
    must_be_send::<Job>();
    must_be_send::<Report>();
    must_be_send::<JobSender>();
    must_be_send::<ReportReceiver>();
};
