//! Outbound network I/O: signed webhooks now; WhatsApp, SMTP and Postgres
//! later, on the same thread.
//!
//! # Why one offload thread
//!
//! Shards are glommio executors that must never wait on a remote party:
//! a webhook receiver can take seconds, hang, or be down for an hour. So all
//! outbound I/O runs on **one offload thread** with its own current-thread
//! tokio runtime (reqwest's connection pool, rustls with the `ring`
//! provider). Shards talk to it only through **bounded, waker-based
//! channels** (`futures-channel` mpsc, which work between a glommio executor
//! and tokio): one shared job channel in, one report channel per shard out.
//! A shard hands a job over with [`JobSender::try_send`], which never waits;
//! on `Full` the shard keeps the job (it is journaled anyway) and offers it
//! again later. One thread is enough: webhooks are I/O bound, and at
//! `max_in_flight_per_endpoint` (16) × a few hundred endpoints the requests
//! in flight number in the thousands, which one tokio thread multiplexes.
//!
//! # Interface
//!
//! - [`spawn`]`(config, endpoints, shards)` starts the thread and returns an
//!   [`Outbound`] (status, join) and one [`ShardLink`] per shard: its
//!   [`JobSender`] and its [`ReportReceiver`] (a `Stream` of [`Report`]).
//! - A [`Job`] names its shard, its endpoint ([`EndpointId`], the position
//!   in `endpoints`, then among the webhooks added at runtime), a stable
//!   `webhook_id`, the JSON body, the attempts already made and a
//!   not-before time (both from the journal on restart).
//! - [`Outbound::control`] gives the admin's [`ControlSender`]: runtime
//!   config changes ([`OutboundUpdate`]: policies, new URLs and secrets,
//!   new webhook endpoints). The endpoint table only grows, up to
//!   [`ENDPOINTS_MAX`] per process; ids never change meaning.
//! - Every attempt produces exactly one [`Report`] to the job's shard:
//!   `Failed` (with `retry_at_unix_ms`, for the journal), then at last
//!   `Delivered` or `Exhausted`.
//! - [`Outbound::status`] gives an [`OutboundStatus`]: breaker states for
//!   `/healthz` (`"webhook:<client>" -> "closed"|"open"|"half_open"`) and the
//!   `webhook_attempts_total{result}` counters.
//! - Config: [`WebhooksConfig`] (`[webhooks]`), [`parse_client_webhook`] for
//!   a client's `webhook_url` / `webhook_secret`.
//!
//! # Where retries live, and why there
//!
//! The offload thread keeps the retry timers of the jobs it holds: the
//! breaker and the per-endpoint cap must see every job of an endpoint to
//! decide what goes next, and a shard's hot path must not carry timers for
//! remote parties. The shard still owns durability: it journals each
//! `Failed` report's attempt count and `retry_at_unix_ms`, and after a
//! restart re-sends its owed jobs with them (`attempts`,
//! `not_before_unix_ms`). Delivery is at least once; receivers dedupe on
//! `webhook-id`.
//!
//! # Limits (defaults), and what they cost
//!
//! | what | bound | note |
//! |---|---|---|
//! | job channel | `queue_capacity` (4096) + 1 per shard | futures-channel reserves a slot per `Sender` |
//! | jobs held by the thread | `max_jobs_held` (16384) | in flight + waiting for a slot, breaker or timer; at the limit the thread stops taking jobs, so `try_send` says `Full`; ~20 MiB at 1 KiB bodies |
//! | reports per shard | channel `queue_capacity`; backlog ≤ `queue_capacity` + in flight + 1 | a full channel stops new attempts for that shard only |
//! | requests in flight | `max_in_flight_per_endpoint` (16) per endpoint | one connection each; idle pool of the same size per host |
//! | one attempt | `timeout_ms` (5 s) | connect, request, answer head and body read, all of it |
//! | answer body read | [`BODY_READ_BYTES_MAX`] (4 KiB) | then the connection is dropped, never buffered |
//! | `Retry-After` honoured | up to [`RETRY_AFTER_MS_MAX`] (1 day) | |
//! | backoff | full jitter in `[0, min(retry_max_ms, retry_base_ms·2^(n-1))]` | 1 s base, 300 s cap |
//! | attempts | `max_attempts` (15), then `Exhausted` | backoff totals at most ~34 min (mean ~17) at the defaults |
//! | DNS lookups | [`DNS_THREADS_MAX`] (4) helper threads | getaddrinfo blocks, so it runs beside the loop |
//! | shutdown | `timeout_ms` + [`SHUTDOWN_GRACE_MS`] (200 ms) | after the last `JobSender` is dropped |
//!
//! # What must stay true
//!
//! - No shard ever waits on this thread: jobs go in by `try_send`, reports
//!   come out through channels the shard polls on its own executor.
//! - Everything is bounded (see "Limits").
//! - Any answer but 2xx, a timeout, or a connect error is a failure.
//!   Redirects are not followed (a 3xx is a failure); no proxy from the
//!   environment is used.
//! - While an endpoint's breaker is open, no request goes to it and its jobs
//!   wait without spending attempts; half-open lets exactly one probe out.
//! - Secrets are never logged nor put in errors: [`Secret`]'s `Debug` is
//!   `whsec_***`, and [`AttemptError`] carries no URL or header.
//! - Shutdown by ownership: when every [`JobSender`] is dropped the thread
//!   starts no new attempt, lets those in flight finish, sends their
//!   reports, and exits (each bounded as above). Jobs waiting for a retry are
//!   left to the shards' journals.

mod attempt;
mod backoff;
mod breaker;
mod config;
mod dispatcher;
mod job;
mod providers;
mod reports;
mod signing;
mod status;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use futures_channel::mpsc;
use url::Url;

pub use attempt::BODY_READ_BYTES_MAX;
pub use backoff::{backoff_ceiling_ms, full_jitter_ms, parse_retry_after, RETRY_AFTER_MS_MAX};
pub use breaker::BreakerState;
pub use config::{client_webhook_errors, parse_client_webhook, parse_webhook_url, KeyError, WebhooksConfig};
pub use dispatcher::SHUTDOWN_GRACE_MS;
pub use job::{AttemptError, EndpointId, Job, JobSender, Report, ReportReceiver, TrySendError};
pub use providers::{EmailConfig, Policy, ProvidersConfig, Redacted, WhatsAppConfig, PROVIDER_MESSAGE_ID_BYTES_MAX};
pub use signing::{is_valid_webhook_id, Secret};
pub use status::{AttemptResult, OutboundStatus, ENDPOINTS_MAX};

/// Helper threads for blocking DNS lookups (getaddrinfo, as reqwest does by
/// default); the offload thread itself never blocks on one.
pub const DNS_THREADS_MAX: usize = 4;

/// The longest attempt any policy allows (`webhooks.timeout_ms`,
/// `providers.*.timeout_ms`), checked by their validation.
pub const TIMEOUT_MS_MAX: u64 = 300_000;

/// One webhook receiver: a client's URL and signing secret.
pub struct Endpoint {
    /// The client id; `/healthz` shows `webhook:<name>`, logs show it too.
    pub name: String,
    pub url: Url,
    pub secret: Secret,
}

/// Shows neither the secret nor the URL's query (it may carry a token).
impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let origin = self.url.origin().ascii_serialization();
        f.debug_struct("Endpoint")
            .field("name", &self.name)
            .field("url", &format_args!("{origin}{}", self.url.path()))
            .field("secret", &self.secret)
            .finish()
    }
}

/// A shard's two channel ends.
#[derive(Debug)]
pub struct ShardLink {
    pub jobs: JobSender,
    pub reports: ReportReceiver,
}

/// A runtime config change for the offload thread: the webhook policy,
/// the current URL and secret of each webhook endpoint, and each fallback
/// provider's policy. Known endpoints keep their ids (a new URL or secret
/// replaces the old one for the next attempt); ids from the thread's
/// table length on are new webhook endpoints, appended in id order (they
/// must follow on without a gap, see [`ControlSender::endpoints`]). An
/// endpoint absent from the update (a removed client's, or a client's
/// whose webhook was removed) keeps its last URL and secret for the jobs
/// it still holds.
#[derive(Debug)]
pub struct OutboundUpdate {
    pub webhooks: WebhooksConfig,
    pub endpoints: Vec<(EndpointId, Endpoint)>,
    pub providers: Vec<(EndpointId, Policy)>,
}

/// Capacity of the control channel to the offload thread: config changes
/// are rare and applied one at a time.
pub const CONTROL_CAPACITY: usize = 4;

/// The admin's end of the control channel (`try_send` never waits), and
/// the count of endpoints announced to the thread, which every
/// [`JobSender`] checks its jobs against.
#[derive(Debug, Clone)]
pub struct ControlSender {
    tx: mpsc::Sender<Box<OutboundUpdate>>,
    endpoints: Arc<AtomicU32>,
}

impl ControlSender {
    /// Queues a change without waiting. On success the announced endpoint
    /// count covers every id in it: raised only after the change is
    /// queued, so a shard that sees a new id accepted by its `JobSender`
    /// sends the job after the change that creates the endpoint, and the
    /// thread applies pending changes before it takes a job for an id it
    /// does not know yet.
    pub fn try_send(&mut self, update: Box<OutboundUpdate>) -> Result<(), mpsc::TrySendError<Box<OutboundUpdate>>> {
        let ids_end = update.endpoints.iter().map(|(id, _)| id.0 + 1).max().unwrap_or(0);
        self.tx.try_send(update)?;
        self.endpoints.fetch_max(ids_end, Ordering::Release);
        Ok(())
    }

    /// Endpoints announced so far: the first id a new webhook endpoint
    /// may take. Monotonic; an id announced once is never given to
    /// another endpoint, even if the config change that announced it was
    /// then not stored.
    pub fn endpoints(&self) -> u32 {
        self.endpoints.load(Ordering::Acquire)
    }
}

/// The running offload thread.
#[derive(Debug)]
pub struct Outbound {
    thread: JoinHandle<()>,
    status: Arc<OutboundStatus>,
    control: ControlSender,
}

impl Outbound {
    /// Breaker states and counters, for the edge (`/healthz`, `/metrics`).
    pub fn status(&self) -> Arc<OutboundStatus> {
        self.status.clone()
    }

    /// A sender of runtime config changes to the thread.
    pub fn control(&self) -> ControlSender {
        self.control.clone()
    }

    /// Waits for the thread to end (after every `JobSender` is dropped).
    pub fn join(self) -> std::thread::Result<()> {
        self.thread.join()
    }
}

/// Why the offload thread could not start.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("invalid config: `{0}` {1}")]
    Config(String, String),
    #[error("cannot start the webhook runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot build the webhook HTTP client: {0}")]
    Client(String),
    #[error("more than {ENDPOINTS_MAX} endpoints")]
    TooManyEndpoints,
}

/// Starts the offload thread for `shards` shards and these endpoints.
pub fn spawn(
    config: &WebhooksConfig,
    endpoints: Vec<Endpoint>,
    shards: usize,
) -> Result<(Outbound, Vec<ShardLink>), SpawnError> {
    spawn_with_providers(config, endpoints, &ProvidersConfig::default(), shards)
}

/// The endpoint of each configured fallback provider: they follow the
/// `webhooks` webhook endpoints, in [`esh3ar_shards::Channel::FALLBACKS`] order.
pub fn provider_endpoints(webhooks: usize, providers: &ProvidersConfig) -> Vec<(esh3ar_shards::Channel, EndpointId)> {
    providers.channels().enumerate().map(|(i, c)| (c, EndpointId((webhooks + i) as u32))).collect()
}

/// Starts the offload thread with webhook endpoints and the fallback
/// providers (see [`provider_endpoints`] for their ids).
pub fn spawn_with_providers(
    config: &WebhooksConfig,
    endpoints: Vec<Endpoint>,
    providers: &ProvidersConfig,
    shards: usize,
) -> Result<(Outbound, Vec<ShardLink>), SpawnError> {
    config.validate().map_err(|(k, m)| SpawnError::Config(k, m))?;
    providers.validate().map_err(|(k, m)| SpawnError::Config(k, m))?;
    if shards == 0 {
        return Err(SpawnError::Config("engine.shards".into(), "must be positive".into()));
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(DNS_THREADS_MAX)
        .thread_name("esh3ar-outbound-dns")
        .build()
        .map_err(SpawnError::Runtime)?;
    // One pool for every host: it must keep as many idle connections per
    // host as the largest in-flight cap, or a provider allowed 64 requests
    // at once would open and close connections all the time.
    let idle_per_host = [config.max_in_flight_per_endpoint, providers.whatsapp.as_ref().map_or(0, |w| w.max_in_flight)]
        .into_iter()
        .max()
        .unwrap_or(1);
    let client = {
        let _in_runtime = runtime.enter();
        http_client(idle_per_host as usize)?
    };
    let provider_targets = {
        let _in_runtime = runtime.enter();
        providers.targets().map_err(|(k, m)| SpawnError::Config(k, m))?
    };
    if endpoints.len() + provider_targets.len() > ENDPOINTS_MAX {
        return Err(SpawnError::TooManyEndpoints);
    }
    let endpoint_count = Arc::new(AtomicU32::new((endpoints.len() + provider_targets.len()) as u32));
    let labels = endpoints
        .iter()
        .map(|e| format!("webhook:{}", e.name))
        .chain(provider_targets.iter().map(|(c, _, _)| format!("provider:{}", c.as_str())))
        .collect();
    let status = Arc::new(OutboundStatus::new(labels));
    let (job_tx, job_rx) = mpsc::channel(config.queue_capacity);
    let (report_txs, report_rxs): (Vec<_>, Vec<_>) = (0..shards).map(|_| mpsc::channel(config.queue_capacity)).unzip();
    let webhook_policy = webhook_policy(config);
    let targets = endpoints
        .into_iter()
        .map(|e| {
            let target = attempt::Target { url: e.url, secret: e.secret };
            (e.name, webhook_policy, dispatcher::Kind::Webhook(Arc::new(target)))
        })
        .chain(provider_targets.into_iter().map(|(c, policy, target)| {
            (format!("provider:{}", c.as_str()), policy, dispatcher::Kind::Provider(Arc::new(target)))
        }))
        .collect();
    let (control_tx, control_rx) = mpsc::channel(CONTROL_CAPACITY);
    let control = ControlSender { tx: control_tx, endpoints: endpoint_count.clone() };
    let dispatcher =
        dispatcher::Dispatcher::new(config.clone(), client, job_rx, targets, report_txs, status.clone(), control_rx);
    let thread = std::thread::Builder::new()
        .name("esh3ar-outbound".into())
        .spawn(move || runtime.block_on(dispatcher.run()))
        .map_err(SpawnError::Runtime)?;
    let links = report_rxs
        .into_iter()
        .enumerate()
        .map(|(shard, reports)| ShardLink {
            jobs: JobSender::new(job_tx.clone(), endpoint_count.clone(), shard),
            reports,
        })
        .collect();
    Ok((Outbound { thread, status, control }, links))
}

/// The policy of `config`'s webhooks.
pub fn webhook_policy(config: &WebhooksConfig) -> Policy {
    Policy {
        timeout_ms: config.timeout_ms,
        max_attempts: config.max_attempts,
        retry_base_ms: config.retry_base_ms,
        retry_max_ms: config.retry_max_ms,
        breaker_failures: config.breaker_failures,
        breaker_open_ms: config.breaker_open_ms,
        max_in_flight: config.max_in_flight_per_endpoint,
    }
}

/// The one HTTP client. No client-wide timeout: every request sets its
/// own (`RequestBuilder::timeout`, connect to last byte, from its
/// endpoint's policy, so `webhooks.timeout_ms` changes at runtime) inside
/// an outer deadline of the same length. The connect timeout is only a
/// backstop at the largest timeout a policy may have.
fn http_client(idle_per_host: usize) -> Result<reqwest::Client, SpawnError> {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_millis(TIMEOUT_MS_MAX))
        .pool_max_idle_per_host(idle_per_host)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .user_agent(concat!("esh3ar-webhooks/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| SpawnError::Client(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endpoint_prints_neither_its_secret_nor_its_query() {
        let secret_text = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let endpoint = Endpoint {
            name: "acme".into(),
            url: parse_webhook_url("https://hooks.acme.test/in?token=abc123").unwrap(),
            secret: Secret::parse(secret_text).unwrap(),
        };
        let shown = format!("{endpoint:?}");
        assert!(shown.contains("https://hooks.acme.test/in") && shown.contains("whsec_***"), "{shown}");
        assert!(!shown.contains("abc123") && !shown.contains("MfKQ9r8G"), "{shown}");
    }

    #[test]
    fn spawn_refuses_a_bad_config() {
        let config = WebhooksConfig { max_attempts: 0, ..WebhooksConfig::default() };
        let err = spawn(&config, Vec::new(), 1).err().map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("webhooks.max_attempts")));
    }
}
