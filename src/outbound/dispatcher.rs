//! The offload thread's event loop: takes jobs, keeps retry timers, asks each
//! endpoint's breaker and in-flight cap before every attempt, and reports
//! every outcome to the job's shard. All state is owned by this one task;
//! attempts run as tasks of the same current-thread runtime and come back
//! through a `JoinSet`.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_channel::mpsc;
use futures_util::StreamExt;
use hashbrown::HashMap;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::attempt::{self, Target};
use super::backoff::full_jitter_ms;
use super::breaker::{Breaker, BreakerState, Permit, Ticket};
use super::config::WebhooksConfig;
use super::job::AttemptError;
use super::job::{Job, Report};
use super::providers::{self, Policy, ProviderTarget};
use super::reports::ReportOut;
use super::status::AttemptResult;
use super::status::OutboundStatus;

/// Time allowed after the last job sender is dropped for in-flight attempts
/// to finish and their reports to go out, beyond `timeout_ms`.
pub const SHUTDOWN_GRACE_MS: u64 = 200;

/// A job the offload thread holds: waiting for its timer, waiting in its
/// endpoint's ready queue, or in flight.
struct Held {
    job: Job,
    webhook_id: Arc<str>,
}

/// What an endpoint is: a webhook receiver or a fallback provider.
pub(super) enum Kind {
    Webhook(Arc<Target>),
    Provider(Arc<ProviderTarget>),
}

struct Endpoint {
    name: String,
    kind: Kind,
    policy: Policy,
    breaker: Breaker,
    published: BreakerState,
    /// Jobs due now, in order, waiting for a slot or the breaker.
    ready: VecDeque<u64>,
    in_flight: u32,
    /// A breaker wake-up is already in `timers` for this instant.
    wake_at: Option<Instant>,
    dirty: bool,
}

impl Endpoint {
    fn new(name: String, policy: Policy, kind: Kind) -> Endpoint {
        Endpoint {
            name,
            kind,
            policy,
            breaker: Breaker::new(policy.breaker_failures, Duration::from_millis(policy.breaker_open_ms)),
            published: BreakerState::Closed,
            ready: VecDeque::new(),
            in_flight: 0,
            wake_at: None,
            dirty: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Wake {
    Job(u64),
    Breaker(usize),
}

/// What an attempt achieved: a webhook's 2xx status, or a provider's
/// acceptance (with its message id, if any).
enum Success {
    Webhook(u16),
    Provider(Option<String>),
}

struct Done {
    key: u64,
    ticket: Ticket,
    result: Result<Success, AttemptError>,
    retry_after: Option<Duration>,
    /// The provider's error is final: no retry on this endpoint.
    permanent: bool,
}

async fn next_control(
    control: &mut Option<mpsc::Receiver<Box<super::OutboundUpdate>>>,
) -> Option<Box<super::OutboundUpdate>> {
    match control {
        Some(rx) => rx.next().await,
        None => std::future::pending().await,
    }
}

fn metric(result: &Result<Success, AttemptError>) -> AttemptResult {
    match result {
        Ok(_) => AttemptResult::Delivered,
        Err(AttemptError::Status(_)) => AttemptResult::HttpError,
        Err(AttemptError::Timeout) => AttemptResult::Timeout,
        Err(AttemptError::Connect) => AttemptResult::ConnectError,
        Err(AttemptError::Request | AttemptError::BreakerOpen) => AttemptResult::RequestError,
    }
}

pub(super) struct Dispatcher {
    config: WebhooksConfig,
    client: reqwest::Client,
    jobs: mpsc::Receiver<Job>,
    accepting: bool,
    held: HashMap<u64, Held>,
    next_key: u64,
    endpoints: Vec<Endpoint>,
    /// Endpoints whose ready queue may be able to move.
    dirty: Vec<usize>,
    timers: BinaryHeap<Reverse<(Instant, Wake)>>,
    attempts: JoinSet<Done>,
    reports: ReportOut,
    status: Arc<OutboundStatus>,
    rng: fastrand::Rng,
    /// Runtime config changes (None once every sender is gone).
    control: Option<mpsc::Receiver<Box<super::OutboundUpdate>>>,
}

impl Dispatcher {
    pub(super) fn new(
        config: WebhooksConfig,
        client: reqwest::Client,
        jobs: mpsc::Receiver<Job>,
        endpoints: Vec<(String, Policy, Kind)>,
        report_senders: Vec<mpsc::Sender<Report>>,
        status: Arc<OutboundStatus>,
        control: mpsc::Receiver<Box<super::OutboundUpdate>>,
    ) -> Dispatcher {
        let endpoints = endpoints.into_iter().map(|(name, policy, kind)| Endpoint::new(name, policy, kind)).collect();
        let reports = ReportOut::new(report_senders, config.queue_capacity);
        Dispatcher {
            config,
            client,
            jobs,
            accepting: true,
            held: HashMap::new(),
            next_key: 0,
            endpoints,
            dirty: Vec::new(),
            timers: BinaryHeap::new(),
            attempts: JoinSet::new(),
            reports,
            status,
            rng: fastrand::Rng::new(),
            control: Some(control),
        }
    }

    /// Runs until every job sender is dropped, then lets in-flight attempts
    /// finish (bounded by `timeout_ms + SHUTDOWN_GRACE_MS`) and returns. Jobs
    /// still waiting for a retry are abandoned: their shards journaled them
    /// and send them again after a restart.
    pub(super) async fn run(mut self) {
        loop {
            let now = Instant::now();
            self.fire_timers(now);
            self.start_attempts(now);
            let next_wake = self.timers.peek().map(|Reverse((at, _))| *at);
            let take_jobs = self.accepting && self.held.len() < self.config.max_jobs_held && !self.reports.any_gated();
            let backlogged = self.reports.backlogged();
            tokio::select! {
                job = self.jobs.next(), if take_jobs => match job {
                    Some(job) => self.admit(job),
                    None => break,
                },
                Some(done) = self.attempts.join_next(), if !self.attempts.is_empty() => match done {
                    Ok(done) => self.finish(done),
                    Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                    Err(_) => {}
                },
                () = tokio::time::sleep_until(next_wake.unwrap_or(now)), if next_wake.is_some() => {}
                () = self.reports.flush(), if backlogged => self.after_flush(),
                update = next_control(&mut self.control), if self.control.is_some() => match update {
                    Some(update) => self.update(*update),
                    None => self.control = None,
                },
                // Every held job is in flight, behind a timer, or behind a
                // full report channel, so some branch is always enabled.
                else => unreachable!("webhook dispatcher has nothing to wait for"),
            }
        }
        self.shut_down().await;
    }

    /// Takes a runtime config change: new webhook URLs, secrets and
    /// policies, new webhook endpoints, new provider policies. Jobs held
    /// keep their place; an attempt in flight finishes with what it started
    /// with. A breaker is rebuilt (closed) only if its thresholds changed
    /// and nothing is in flight.
    fn update(&mut self, update: super::OutboundUpdate) {
        let webhook_policy = super::webhook_policy(&update.webhooks);
        self.config = update.webhooks;
        let mut endpoints = update.endpoints;
        endpoints.sort_by_key(|(id, _)| id.0);
        let mut targets: HashMap<usize, Arc<Target>> = HashMap::new();
        for (id, e) in endpoints {
            let (i, target) = (id.0 as usize, Arc::new(Target { url: e.url, secret: e.secret }));
            if i < self.endpoints.len() {
                targets.insert(i, target);
            } else {
                self.add_webhook(i, e.name, webhook_policy, target);
            }
        }
        let providers: HashMap<usize, Policy> =
            update.providers.into_iter().map(|(id, p)| (id.0 as usize, p)).collect();
        for (i, e) in self.endpoints.iter_mut().enumerate() {
            let policy = match &mut e.kind {
                Kind::Webhook(target) => {
                    if let Some(new) = targets.remove(&i) {
                        *target = new;
                    }
                    webhook_policy
                }
                Kind::Provider(_) => match providers.get(&i) {
                    Some(p) => *p,
                    None => continue,
                },
            };
            let thresholds = (policy.breaker_failures, policy.breaker_open_ms);
            // Tickets of attempts in flight belong to the current breaker:
            // with any in flight it keeps its thresholds until a restart.
            if thresholds != (e.policy.breaker_failures, e.policy.breaker_open_ms) && e.in_flight == 0 {
                e.breaker = Breaker::new(policy.breaker_failures, Duration::from_millis(policy.breaker_open_ms));
            }
            e.policy = policy;
            if !e.dirty {
                e.dirty = true;
                self.dirty.push(i);
            }
        }
        tracing::info!(endpoints = self.endpoints.len(), "outbound: runtime configuration applied");
    }

    /// Appends webhook endpoint `i` (a client given a webhook at runtime).
    /// Ids come from one counter (`ControlSender::endpoints`), so a new one
    /// is the table's length; anything else is a bug upstream, refused
    /// loudly in the log (its jobs are then refused by `admit`).
    fn add_webhook(&mut self, i: usize, name: String, policy: Policy, target: Arc<Target>) {
        if i != self.endpoints.len() {
            tracing::error!(
                endpoint = i,
                known = self.endpoints.len(),
                "outbound: a new endpoint id leaves a gap; ignored"
            );
            return;
        }
        let Some(at) = self.status.push(format!("webhook:{name}")) else {
            tracing::error!(endpoint = i, "outbound: the endpoint table is full; ignored");
            return;
        };
        assert_eq!(at, i, "the status list and the endpoint table grow together");
        tracing::info!(endpoint = %name, "outbound: webhook endpoint added");
        self.endpoints.push(Endpoint::new(name, policy, Kind::Webhook(target)));
    }

    /// Applies every change already queued on the control channel, without
    /// waiting: a job may name an endpoint whose change was queued before
    /// the job but not taken yet (the two channels are read in any order).
    fn take_queued_updates(&mut self) {
        while let Some(rx) = &mut self.control {
            match rx.try_recv() {
                Ok(update) => self.update(*update),
                Err(mpsc::TryRecvError::Closed) => self.control = None,
                Err(mpsc::TryRecvError::Empty) => return,
            }
        }
    }

    async fn shut_down(mut self) {
        self.accepting = false;
        let slowest = self.endpoints.iter().map(|e| e.policy.timeout_ms).max().unwrap_or(0);
        let timeout_ms = slowest.max(self.config.timeout_ms);
        let deadline = Instant::now() + Duration::from_millis(timeout_ms + SHUTDOWN_GRACE_MS);
        let drain = async {
            while let Some(done) = self.attempts.join_next().await {
                match done {
                    Ok(done) => self.finish(done),
                    Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                    Err(_) => {}
                }
            }
            self.reports.flush_all().await;
        };
        if tokio::time::timeout_at(deadline, drain).await.is_err() {
            tracing::warn!("webhooks: shutdown deadline passed with attempts or reports outstanding");
        }
        self.attempts.abort_all();
    }

    fn admit(&mut self, job: Job) {
        // A change queued before this job applies to it (a moved URL, a new
        // endpoint, a new timeout), whichever channel the loop read first:
        // one `try_recv` on an empty channel when nothing changed.
        self.take_queued_updates();
        if job.endpoint.0 as usize >= self.endpoints.len() {
            // Cannot happen: a JobSender refuses ids not announced, and an
            // id is announced after its change is queued. Refused loudly,
            // never silently: the shard dead-letters the event.
            tracing::error!(
                endpoint = job.endpoint.0,
                shard = job.shard,
                "outbound: job for an unknown endpoint refused"
            );
            self.status.count_exhausted();
            let report = Report::Exhausted { job: job.id, attempts: job.attempts, error: Some(AttemptError::Request) };
            self.reports.send(job.shard, report);
            return;
        }
        if job.attempts >= self.endpoints[job.endpoint.0 as usize].policy.max_attempts {
            self.status.count_exhausted();
            let report = Report::Exhausted { job: job.id, attempts: job.attempts, error: None };
            self.reports.send(job.shard, report);
            return;
        }
        let key = self.next_key;
        self.next_key += 1;
        let endpoint = job.endpoint.0 as usize;
        let wait_ms = job.not_before_unix_ms.saturating_sub(unix_ms_now());
        let webhook_id = Arc::from(job.webhook_id.as_str());
        self.held.insert(key, Held { job, webhook_id });
        if wait_ms > 0 {
            self.timers.push(Reverse((Instant::now() + Duration::from_millis(wait_ms), Wake::Job(key))));
        } else {
            self.endpoints[endpoint].ready.push_back(key);
            self.mark_dirty(endpoint);
        }
    }

    fn fire_timers(&mut self, now: Instant) {
        while let Some(&Reverse((at, wake))) = self.timers.peek() {
            if at > now {
                break;
            }
            self.timers.pop();
            match wake {
                Wake::Job(key) => {
                    let Some(held) = self.held.get(&key) else { continue };
                    let endpoint = held.job.endpoint.0 as usize;
                    self.endpoints[endpoint].ready.push_back(key);
                    self.mark_dirty(endpoint);
                }
                Wake::Breaker(endpoint) => {
                    self.endpoints[endpoint].wake_at = None;
                    self.mark_dirty(endpoint);
                }
            }
        }
    }

    fn mark_dirty(&mut self, endpoint: usize) {
        if !self.endpoints[endpoint].dirty {
            self.endpoints[endpoint].dirty = true;
            self.dirty.push(endpoint);
        }
    }

    /// Starts what each dirty endpoint's cap and breaker allow. Not while
    /// shutting down: only attempts already in flight finish then.
    fn start_attempts(&mut self, now: Instant) {
        if !self.accepting {
            return;
        }
        while let Some(e) = self.dirty.pop() {
            self.endpoints[e].dirty = false;
            self.start_endpoint(e, now);
        }
    }

    fn start_endpoint(&mut self, e: usize, now: Instant) {
        let cap = self.endpoints[e].policy.max_in_flight;
        let timeout = Duration::from_millis(self.endpoints[e].policy.timeout_ms);
        while let Some(&key) = self.endpoints[e].ready.front() {
            let Some(held) = self.held.get(&key) else {
                self.endpoints[e].ready.pop_front();
                continue;
            };
            let ep = &mut self.endpoints[e];
            if ep.in_flight >= cap || self.reports.is_gated(held.job.shard) {
                // Moves again when an attempt finishes or reports flush.
                return;
            }
            let ticket = match ep.breaker.permit(now) {
                Permit::Go(ticket) => ticket,
                Permit::WaitUntil(at) => {
                    if ep.wake_at != Some(at) {
                        ep.wake_at = Some(at);
                        self.timers.push(Reverse((at, Wake::Breaker(e))));
                    }
                    self.give_back_yielding(e);
                    return;
                }
                Permit::WaitForProbe => {
                    self.give_back_yielding(e);
                    return;
                }
            };
            ep.ready.pop_front();
            ep.in_flight += 1;
            assert!(ep.in_flight <= cap);
            match &ep.kind {
                Kind::Webhook(target) => {
                    let send = attempt::send(
                        self.client.clone(),
                        target.clone(),
                        held.webhook_id.clone(),
                        held.job.body.clone(),
                        timeout,
                    );
                    self.attempts.spawn(async move {
                        let outcome = send.await;
                        let result = outcome.result.map(Success::Webhook);
                        Done { key, ticket, result, retry_after: outcome.retry_after, permanent: false }
                    });
                }
                Kind::Provider(target) => {
                    let send = providers::send(
                        self.client.clone(),
                        target.clone(),
                        held.webhook_id.clone(),
                        Arc::from(held.job.to.as_str()),
                        held.job.body.clone(),
                        timeout,
                    );
                    self.attempts.spawn(async move {
                        let outcome = send.await;
                        let result = outcome.result.map(Success::Provider);
                        Done { key, ticket, result, retry_after: outcome.retry_after, permanent: outcome.permanent }
                    });
                }
            }
            self.publish_breaker(e);
        }
    }

    /// While endpoint `e`'s breaker holds its queue, the jobs that may go
    /// to another channel are given back (`Exhausted`, no attempt spent).
    fn give_back_yielding(&mut self, e: usize) {
        let held = &self.held;
        let (yielding, staying): (VecDeque<u64>, VecDeque<u64>) =
            self.endpoints[e].ready.drain(..).partition(|key| held.get(key).is_some_and(|h| h.job.yield_when_open));
        self.endpoints[e].ready = staying;
        for key in yielding {
            let Some(held) = self.held.remove(&key) else { continue };
            let report = Report::Exhausted {
                job: held.job.id,
                attempts: held.job.attempts,
                error: Some(AttemptError::BreakerOpen),
            };
            self.reports.send(held.job.shard, report);
        }
    }

    fn finish(&mut self, done: Done) {
        let now = Instant::now();
        let Some(held) = self.held.get_mut(&done.key) else { unreachable!("an attempt finished for a job not held") };
        let e = held.job.endpoint.0 as usize;
        held.job.attempts += 1;
        let (id, shard, attempts, yields) = (held.job.id, held.job.shard, held.job.attempts, held.job.yield_when_open);
        self.status.count_attempt(metric(&done.result));
        let ep = &mut self.endpoints[e];
        assert!(ep.in_flight > 0);
        ep.in_flight -= 1;
        ep.breaker.record(done.ticket, done.result.is_ok(), now);
        let (max_attempts, open) = (ep.policy.max_attempts, ep.breaker.state() == BreakerState::Open);
        self.publish_breaker(e);
        self.mark_dirty(e);
        let report = match done.result {
            Ok(Success::Webhook(status)) => {
                self.held.remove(&done.key);
                Report::Delivered { job: id, attempts, status }
            }
            Ok(Success::Provider(provider_message_id)) => {
                self.held.remove(&done.key);
                Report::Accepted { job: id, attempts, provider_message_id }
            }
            Err(error) if attempts >= max_attempts || done.permanent || (yields && open) => {
                self.held.remove(&done.key);
                self.status.count_exhausted();
                Report::Exhausted { job: id, attempts, error: Some(error) }
            }
            Err(error) => {
                let delay = self.retry_delay(e, attempts, done.retry_after);
                self.timers.push(Reverse((now + delay, Wake::Job(done.key))));
                let retry_at_unix_ms = unix_ms_now() + delay.as_millis() as u64;
                Report::Failed { job: id, attempts, error, retry_at_unix_ms }
            }
        };
        self.reports.send(shard, report);
    }

    /// Full-jitter backoff, but never before the receiver's `Retry-After`.
    fn retry_delay(&mut self, e: usize, failed_attempts: u32, retry_after: Option<Duration>) -> Duration {
        let c = &self.endpoints[e].policy;
        let backoff =
            Duration::from_millis(full_jitter_ms(failed_attempts, c.retry_base_ms, c.retry_max_ms, &mut self.rng));
        backoff.max(retry_after.unwrap_or(Duration::ZERO))
    }

    /// Endpoints held back by a full report channel may move again.
    fn after_flush(&mut self) {
        for e in 0..self.endpoints.len() {
            if !self.endpoints[e].ready.is_empty() {
                self.mark_dirty(e);
            }
        }
    }

    fn publish_breaker(&mut self, e: usize) {
        let ep = &mut self.endpoints[e];
        let state = ep.breaker.state();
        if state == ep.published {
            return;
        }
        ep.published = state;
        self.status.set_breaker(e, state);
        tracing::warn!(endpoint = %ep.name, state = state.as_str(), "webhook breaker changed");
    }
}

fn unix_ms_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
