//! The fallback providers: `[providers.whatsapp]` (WhatsApp Cloud API over
//! the offload thread's reqwest client) and `[providers.email]` (one SMTP
//! transaction with `lettre`). Their config, their targets, and one attempt
//! of each. Retries, breakers and in-flight caps are the dispatcher's, the
//! same as for webhooks, with each provider's own policy.
//!
//! Secrets (`access_token`, `password`) never appear in `Debug`, logs or
//! errors: [`Redacted`] prints `***`, and attempt errors carry only a
//! status code.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use esh3ar_shards::Channel;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use serde::{Deserialize, Serialize};
use url::Url;

use super::attempt::BODY_READ_BYTES_MAX;
use super::config::KeyError;
use super::job::AttemptError;
use crate::config_errors::Errors;

/// A secret from the config: `Debug` shows `***`.
#[derive(Clone, Deserialize, Serialize, Default)]
#[serde(transparent)]
pub struct Redacted(pub String);

impl std::fmt::Debug for Redacted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("\"***\"")
    }
}

/// How the dispatcher treats one endpoint's jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub timeout_ms: u64,
    pub max_attempts: u32,
    pub retry_base_ms: u64,
    pub retry_max_ms: u64,
    pub breaker_failures: u32,
    pub breaker_open_ms: u64,
    pub max_in_flight: u32,
}

/// `[providers]`: the fallback channels' providers (each optional).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProvidersConfig {
    #[serde(default)]
    pub whatsapp: Option<WhatsAppConfig>,
    #[serde(default)]
    pub email: Option<EmailConfig>,
}

/// `[providers.whatsapp]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WhatsAppConfig {
    /// Only `whatsapp_cloud`.
    pub kind: String,
    pub base_url: String,
    pub phone_number_id: String,
    pub access_token: Redacted,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    #[serde(default = "default_retry_base_ms")]
    pub retry_base_ms: u64,
    #[serde(default = "default_retry_max_ms")]
    pub retry_max_ms: u64,
    #[serde(default = "default_breaker_failures")]
    pub breaker_failures: u32,
    #[serde(default = "default_breaker_open_ms")]
    pub breaker_open_ms: u64,
    /// Requests in flight to the provider at once.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: u32,
}

/// `[providers.email]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EmailConfig {
    /// Only `smtp`.
    pub kind: String,
    pub host: String,
    #[serde(default = "default_smtp_port")]
    pub port: u16,
    /// STARTTLS required; `false` only for a loopback host.
    #[serde(default = "default_starttls")]
    pub starttls: bool,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<Redacted>,
    pub from: String,
    #[serde(default = "default_subject")]
    pub subject: String,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    #[serde(default = "default_retry_base_ms")]
    pub retry_base_ms: u64,
    #[serde(default = "default_retry_max_ms")]
    pub retry_max_ms: u64,
    #[serde(default = "default_breaker_failures")]
    pub breaker_failures: u32,
    #[serde(default = "default_breaker_open_ms")]
    pub breaker_open_ms: u64,
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: u32,
}

fn default_timeout_ms() -> u64 {
    10_000
}
fn default_max_attempts() -> u32 {
    8
}
fn default_retry_base_ms() -> u64 {
    2_000
}
fn default_retry_max_ms() -> u64 {
    600_000
}
fn default_breaker_failures() -> u32 {
    5
}
fn default_breaker_open_ms() -> u64 {
    30_000
}
fn default_max_in_flight() -> u32 {
    64
}
fn default_smtp_port() -> u16 {
    587
}
fn default_starttls() -> bool {
    true
}
fn default_subject() -> String {
    "New message".to_owned()
}

const DAY_MS: u64 = 24 * 3600 * 1000;

fn check_policy(prefix: &str, p: Policy, e: &mut Errors) {
    let key = |k: &str| format!("{prefix}.{k}");
    e.check((10..=super::TIMEOUT_MS_MAX).contains(&p.timeout_ms), &key("timeout_ms"), || {
        "must be between 10 and 300000".into()
    });
    e.check((1..=1_000).contains(&p.max_attempts), &key("max_attempts"), || "must be between 1 and 1000".into());
    let base_ok = e.check((1..=DAY_MS).contains(&p.retry_base_ms), &key("retry_base_ms"), || {
        "must be between 1 and 86400000".into()
    });
    e.check((!base_ok || p.retry_max_ms >= p.retry_base_ms) && p.retry_max_ms <= DAY_MS, &key("retry_max_ms"), || {
        "must be at least retry_base_ms and at most 86400000".into()
    });
    e.check((1..=1_000).contains(&p.breaker_failures), &key("breaker_failures"), || {
        "must be between 1 and 1000".into()
    });
    e.check((1..=DAY_MS).contains(&p.breaker_open_ms), &key("breaker_open_ms"), || {
        "must be between 1 and 86400000".into()
    });
    e.check((1..=4_096).contains(&p.max_in_flight), &key("max_in_flight"), || "must be between 1 and 4096".into());
}

impl WhatsAppConfig {
    pub fn policy(&self) -> Policy {
        Policy {
            timeout_ms: self.timeout_ms,
            max_attempts: self.max_attempts,
            retry_base_ms: self.retry_base_ms,
            retry_max_ms: self.retry_max_ms,
            breaker_failures: self.breaker_failures,
            breaker_open_ms: self.breaker_open_ms,
            max_in_flight: self.max_in_flight,
        }
    }

    /// `{base_url}/{phone_number_id}/messages`.
    fn messages_url(&self) -> Result<Url, KeyError> {
        let bad = |key: &str, msg: &str| (format!("providers.whatsapp.{key}"), msg.to_owned());
        let base = Url::parse(&self.base_url).map_err(|_| bad("base_url", "is not a URL"))?;
        if !matches!(base.scheme(), "http" | "https") || base.host_str().is_none() {
            return Err(bad("base_url", "must be an http or https URL with a host"));
        }
        if base.query().is_some() || base.fragment().is_some() || !base.username().is_empty() {
            return Err(bad("base_url", "must have no query, fragment or credentials"));
        }
        let id = &self.phone_number_id;
        if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad("phone_number_id", "must be 1 to 64 digits"));
        }
        let path = format!("{}/{id}/messages", base.path().trim_end_matches('/'));
        let mut url = base;
        url.set_path(&path);
        Ok(url)
    }

    fn collect_errors(&self, e: &mut Errors) {
        let key = |k: &str| format!("providers.whatsapp.{k}");
        e.check(self.kind == "whatsapp_cloud", &key("kind"), || "must be \"whatsapp_cloud\"".into());
        let id = &self.phone_number_id;
        e.check(
            !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_digit()),
            &key("phone_number_id"),
            || "must be 1 to 64 digits".into(),
        );
        if let Err((k, m)) = self.messages_url() {
            if k != key("phone_number_id") {
                e.push(k, m);
            }
        }
        let token = &self.access_token.0;
        e.check(
            !token.is_empty() && token.len() <= 4096 && token.bytes().all(|b| b.is_ascii_graphic()),
            &key("access_token"),
            || "must be 1 to 4096 visible ASCII characters".into(),
        );
        check_policy("providers.whatsapp", self.policy(), e);
    }
}

impl EmailConfig {
    pub fn policy(&self) -> Policy {
        Policy {
            timeout_ms: self.timeout_ms,
            max_attempts: self.max_attempts,
            retry_base_ms: self.retry_base_ms,
            retry_max_ms: self.retry_max_ms,
            breaker_failures: self.breaker_failures,
            breaker_open_ms: self.breaker_open_ms,
            max_in_flight: self.max_in_flight,
        }
    }

    fn collect_errors(&self, e: &mut Errors) {
        let key = |k: &str| format!("providers.email.{k}");
        e.check(self.kind == "smtp", &key("kind"), || "must be \"smtp\"".into());
        let host_ok =
            !self.host.is_empty() && self.host.len() <= 253 && !self.host.bytes().any(|b| b.is_ascii_whitespace());
        e.check(host_ok, &key("host"), || "must be a host name or IP address".into());
        e.check(self.port != 0, &key("port"), || "must be between 1 and 65535".into());
        e.check(self.starttls || is_loopback(&self.host), &key("starttls"), || {
            "may be false only for a loopback host (127.0.0.0/8, ::1, localhost)".into()
        });
        if self.username.is_some() != self.password.is_some() {
            e.push(
                key(if self.username.is_some() { "password" } else { "username" }),
                "username and password go together",
            );
        }
        e.check(self.password.is_none() || self.starttls, &key("password"), || "is never sent without starttls".into());
        e.check(self.from.parse::<lettre::message::Mailbox>().is_ok(), &key("from"), || {
            "must be an address, e.g. \"Esh3ar <noreply@example.com>\"".into()
        });
        e.check(self.subject.len() <= 200 && !self.subject.chars().any(char::is_control), &key("subject"), || {
            "must be at most 200 bytes without control characters".into()
        });
        check_policy("providers.email", self.policy(), e);
    }
}

fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

impl ProvidersConfig {
    /// Checks every provider; the first error, naming its key
    /// (`providers.<name>.<key>`), as `spawn` reports it.
    pub fn validate(&self) -> Result<(), KeyError> {
        self.errors().into_iter().next().map_or(Ok(()), Err)
    }

    /// Every error of every provider, each naming its key.
    pub fn errors(&self) -> Vec<KeyError> {
        let mut e = Errors::new();
        if let Some(w) = &self.whatsapp {
            w.collect_errors(&mut e);
        }
        if let Some(m) = &self.email {
            m.collect_errors(&mut e);
        }
        e.into_vec()
    }

    /// Whether `channel`'s provider is configured.
    pub fn has(&self, channel: Channel) -> bool {
        match channel {
            Channel::App => true,
            Channel::WhatsApp => self.whatsapp.is_some(),
            Channel::Email => self.email.is_some(),
        }
    }

    /// The configured providers, in [`Channel::FALLBACKS`] order.
    pub fn channels(&self) -> impl Iterator<Item = Channel> + '_ {
        Channel::FALLBACKS.into_iter().filter(|&c| self.has(c))
    }

    /// The targets and policies of the configured providers (the config
    /// was validated).
    pub(super) fn targets(&self) -> Result<Vec<(Channel, Policy, ProviderTarget)>, KeyError> {
        let mut out = Vec::new();
        if let Some(w) = &self.whatsapp {
            let target = ProviderTarget::WhatsApp { url: w.messages_url()?, token: w.access_token.clone() };
            out.push((Channel::WhatsApp, w.policy(), target));
        }
        if let Some(e) = &self.email {
            out.push((Channel::Email, e.policy(), ProviderTarget::Email(Box::new(email_target(e)?))));
        }
        Ok(out)
    }
}

/// Where a provider's requests go. No `Debug`: it holds secrets.
pub enum ProviderTarget {
    WhatsApp { url: Url, token: Redacted },
    Email(Box<EmailTarget>),
}

pub struct EmailTarget {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: lettre::message::Mailbox,
    subject: String,
}

fn email_target(e: &EmailConfig) -> Result<EmailTarget, KeyError> {
    let bad = |key: &str, msg: String| (format!("providers.email.{key}"), msg);
    let tls = if e.starttls {
        let params = TlsParameters::new(e.host.clone()).map_err(|err| bad("host", format!("TLS setup: {err}")))?;
        Tls::Required(params)
    } else {
        Tls::None
    };
    let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(e.host.as_str())
        .port(e.port)
        .tls(tls)
        .timeout(Some(Duration::from_millis(e.timeout_ms)));
    if let (Some(user), Some(password)) = (&e.username, &e.password) {
        builder = builder.credentials(Credentials::new(user.clone(), password.0.clone()));
    }
    let from = e.from.parse().map_err(|_| bad("from", "must be an address".into()))?;
    Ok(EmailTarget { transport: builder.build(), from, subject: e.subject.clone() })
}

/// One provider attempt's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderOutcome {
    pub result: Result<Option<String>, AttemptError>,
    /// The error is the provider's final word (WhatsApp 4xx other than 408
    /// and 429; SMTP 5xx): retrying would not help.
    pub permanent: bool,
    pub retry_after: Option<Duration>,
}

/// Most bytes of a provider message id kept.
pub const PROVIDER_MESSAGE_ID_BYTES_MAX: usize = 200;

/// Sends one job to its provider. For WhatsApp, `body` is the request JSON;
/// for email, the text, and `to` the address.
pub async fn send(
    client: reqwest::Client,
    target: Arc<ProviderTarget>,
    key: Arc<str>,
    to: Arc<str>,
    body: Bytes,
    timeout: Duration,
) -> ProviderOutcome {
    match &*target {
        ProviderTarget::WhatsApp { url, token } => whatsapp(&client, url, token, body, timeout).await,
        ProviderTarget::Email(t) => match tokio::time::timeout(timeout, email(t, &key, &to, body)).await {
            Ok(outcome) => outcome,
            Err(_) => ProviderOutcome { result: Err(AttemptError::Timeout), permanent: false, retry_after: None },
        },
    }
}

async fn whatsapp(
    client: &reqwest::Client,
    url: &Url,
    token: &Redacted,
    body: Bytes,
    timeout: Duration,
) -> ProviderOutcome {
    let failed = |e, permanent| ProviderOutcome { result: Err(e), permanent, retry_after: None };
    let deadline = tokio::time::Instant::now() + timeout;
    let request = client
        .post(url.clone())
        .timeout(timeout)
        .bearer_auth(&token.0)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body)
        .send();
    let mut response = match tokio::time::timeout_at(deadline, request).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) if e.is_timeout() => return failed(AttemptError::Timeout, false),
        Ok(Err(e)) if e.is_connect() => return failed(AttemptError::Connect, false),
        Ok(Err(_)) => return failed(AttemptError::Request, false),
        Err(_) => return failed(AttemptError::Timeout, false),
    };
    let status = response.status().as_u16();
    let retry_after = match status {
        429 | 503 => response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| super::backoff::parse_retry_after(v, std::time::SystemTime::now())),
        _ => None,
    };
    let mut answer = Vec::new();
    let read = async {
        while answer.len() < BODY_READ_BYTES_MAX {
            match response.chunk().await {
                Ok(Some(chunk)) => answer.extend_from_slice(&chunk),
                Ok(None) => return true,
                Err(_) => return false,
            }
        }
        false
    };
    let complete = tokio::time::timeout_at(deadline, read).await.unwrap_or(false);
    if !(200..300).contains(&status) {
        let permanent = (400..500).contains(&status) && status != 408 && status != 429;
        return ProviderOutcome { result: Err(AttemptError::Status(status)), permanent, retry_after };
    }
    // `{"messages":[{"id":"wamid..."}]}`; a 2xx without it is a bad answer
    // (retried: the provider may not have taken it).
    let id = complete.then(|| message_id(&answer)).flatten();
    match id {
        Some(id) => ProviderOutcome { result: Ok(Some(id)), permanent: false, retry_after: None },
        None => failed(AttemptError::Request, false),
    }
}

fn message_id(answer: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(answer).ok()?;
    let id = v.get("messages")?.get(0)?.get("id")?.as_str()?;
    let mut end = id.len().min(PROVIDER_MESSAGE_ID_BYTES_MAX);
    while !id.is_char_boundary(end) {
        end -= 1;
    }
    (!id.is_empty()).then(|| id[..end].to_owned())
}

async fn email(t: &EmailTarget, key: &str, to: &str, body: Bytes) -> ProviderOutcome {
    let failed = |e, permanent| ProviderOutcome { result: Err(e), permanent, retry_after: None };
    let Ok(to) = to.parse::<lettre::message::Mailbox>() else {
        return failed(AttemptError::Status(553), true);
    };
    let text = String::from_utf8_lossy(&body).into_owned();
    let message = Message::builder()
        .from(t.from.clone())
        .to(to)
        .subject(t.subject.clone())
        .message_id(Some(format!("<{key}@esh3ar>")))
        .body(text);
    let Ok(message) = message else { return failed(AttemptError::Status(554), true) };
    match t.transport.send(message).await {
        Ok(_) => ProviderOutcome { result: Ok(None), permanent: false, retry_after: None },
        Err(e) => {
            let code = e.status().and_then(|c| c.to_string().parse::<u16>().ok());
            match code {
                Some(code) => failed(AttemptError::Status(code), e.is_permanent()),
                None if e.is_timeout() => failed(AttemptError::Timeout, false),
                None => failed(AttemptError::Connect, false),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first error a provider's checks find.
    fn first_error(collect: impl FnOnce(&mut Errors)) -> Result<(), KeyError> {
        let mut e = Errors::new();
        collect(&mut e);
        e.into_vec().into_iter().next().map_or(Ok(()), Err)
    }

    fn whatsapp() -> WhatsAppConfig {
        toml::from_str(
            "kind = \"whatsapp_cloud\"\nbase_url = \"https://graph.facebook.com/v21.0\"\n\
             phone_number_id = \"1234567890\"\naccess_token = \"EAAGsecrettoken\"",
        )
        .unwrap()
    }

    #[test]
    fn whatsapp_url_and_secret_stay_hidden() {
        let w = whatsapp();
        assert_eq!(w.messages_url().unwrap().as_str(), "https://graph.facebook.com/v21.0/1234567890/messages");
        assert!(first_error(|e| w.collect_errors(e)).is_ok());
        let shown = format!("{w:?}");
        assert!(!shown.contains("EAAGsecret") && shown.contains("***"), "{shown}");
        let bad = WhatsAppConfig { phone_number_id: "12a".into(), ..whatsapp() };
        assert_eq!(first_error(|e| bad.collect_errors(e)).unwrap_err().0, "providers.whatsapp.phone_number_id");
    }

    #[test]
    fn plain_smtp_only_on_loopback() {
        let email = |host: &str, starttls: bool| -> EmailConfig {
            toml::from_str(&format!(
                "kind = \"smtp\"\nhost = \"{host}\"\nstarttls = {starttls}\nfrom = \"Esh3ar <noreply@example.com>\""
            ))
            .unwrap()
        };
        assert!(first_error(|e| email("127.0.0.1", false).collect_errors(e)).is_ok());
        assert!(first_error(|e| email("localhost", false).collect_errors(e)).is_ok());
        assert_eq!(
            first_error(|e| email("smtp.example.com", false).collect_errors(e)).unwrap_err().0,
            "providers.email.starttls"
        );
        assert!(first_error(|e| email("smtp.example.com", true).collect_errors(e)).is_ok());
    }

    #[test]
    fn message_ids_come_from_the_answer() {
        assert_eq!(message_id(br#"{"messages":[{"id":"wamid.X1"}]}"#).as_deref(), Some("wamid.X1"));
        assert_eq!(message_id(br#"{"messages":[]}"#), None);
        assert_eq!(message_id(b"nope"), None);
    }
}
