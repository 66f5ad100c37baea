//! `[webhooks]` settings and the per-client `webhook_url` / `webhook_secret`
//! checks. Strict like `config.rs` (an unknown key is an error) and checked
//! once at startup; every error names its key so `ConfigError::Invalid` can
//! report it as is.

use serde::{Deserialize, Serialize};
use url::Url;

use super::signing::Secret;
use crate::config_errors::Errors;

/// Longest webhook URL accepted (bytes).
pub const WEBHOOK_URL_BYTES_MAX: usize = 2048;

/// A validation error: (key, message), as `config.rs` reports them.
pub use crate::config_errors::KeyError;

/// The `[webhooks]` table. Every limit has a unit in its name.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WebhooksConfig {
    /// One attempt, connect to last byte read, must finish within this.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Backoff before retry n is uniform in `[0, min(retry_max_ms, retry_base_ms * 2^(n-1))]` (full jitter).
    #[serde(default = "default_retry_base_ms")]
    pub retry_base_ms: u64,
    #[serde(default = "default_retry_max_ms")]
    pub retry_max_ms: u64,
    /// After this many failed attempts a job is reported `Exhausted`.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Consecutive failures that open an endpoint's breaker.
    #[serde(default = "default_breaker_failures")]
    pub breaker_failures: u32,
    /// How long an open breaker sends nothing before one half-open probe.
    #[serde(default = "default_breaker_open_ms")]
    pub breaker_open_ms: u64,
    #[serde(default = "default_max_in_flight_per_endpoint")]
    pub max_in_flight_per_endpoint: u32,
    /// Capacity of the job channel (all shards share it) and of each
    /// shard's report channel (messages).
    #[serde(default = "default_queue_capacity")]
    pub queue_capacity: usize,
    /// Most jobs the offload thread holds at once (in flight, waiting for a
    /// slot or a breaker, or waiting for a retry timer). At the limit it
    /// stops taking jobs off the channel, so shards see `Full`.
    #[serde(default = "default_max_jobs_held")]
    pub max_jobs_held: usize,
}

fn default_timeout_ms() -> u64 {
    5_000
}
fn default_retry_base_ms() -> u64 {
    1_000
}
fn default_retry_max_ms() -> u64 {
    300_000
}
fn default_max_attempts() -> u32 {
    15
}
fn default_breaker_failures() -> u32 {
    5
}
fn default_breaker_open_ms() -> u64 {
    30_000
}
fn default_max_in_flight_per_endpoint() -> u32 {
    16
}
fn default_queue_capacity() -> usize {
    4_096
}
fn default_max_jobs_held() -> usize {
    16_384
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        WebhooksConfig {
            timeout_ms: default_timeout_ms(),
            retry_base_ms: default_retry_base_ms(),
            retry_max_ms: default_retry_max_ms(),
            max_attempts: default_max_attempts(),
            breaker_failures: default_breaker_failures(),
            breaker_open_ms: default_breaker_open_ms(),
            max_in_flight_per_endpoint: default_max_in_flight_per_endpoint(),
            queue_capacity: default_queue_capacity(),
            max_jobs_held: default_max_jobs_held(),
        }
    }
}

const DAY_MS: u64 = 24 * 3600 * 1000;

impl WebhooksConfig {
    /// Checks every value; the first error, naming its key
    /// (`webhooks.<name>`), as `spawn` reports it.
    pub fn validate(&self) -> Result<(), KeyError> {
        self.errors().into_iter().next().map_or(Ok(()), Err)
    }

    /// Every error, each naming its key (`webhooks.<name>`).
    pub fn errors(&self) -> Vec<KeyError> {
        let mut e = Errors::new();
        let key = |k: &str| format!("webhooks.{k}");
        e.check((10..=super::TIMEOUT_MS_MAX).contains(&self.timeout_ms), &key("timeout_ms"), || {
            "must be between 10 and 300000".into()
        });
        let base_ok = e.check((1..=DAY_MS).contains(&self.retry_base_ms), &key("retry_base_ms"), || {
            "must be between 1 and 86400000".into()
        });
        e.check(
            (!base_ok || self.retry_max_ms >= self.retry_base_ms) && self.retry_max_ms <= DAY_MS,
            &key("retry_max_ms"),
            || "must be at least retry_base_ms and at most 86400000".into(),
        );
        e.check((1..=1_000).contains(&self.max_attempts), &key("max_attempts"), || "must be between 1 and 1000".into());
        e.check((1..=1_000).contains(&self.breaker_failures), &key("breaker_failures"), || {
            "must be between 1 and 1000".into()
        });
        e.check((1..=DAY_MS).contains(&self.breaker_open_ms), &key("breaker_open_ms"), || {
            "must be between 1 and 86400000".into()
        });
        e.check((1..=1_024).contains(&self.max_in_flight_per_endpoint), &key("max_in_flight_per_endpoint"), || {
            "must be between 1 and 1024".into()
        });
        e.check((1..=1 << 20).contains(&self.queue_capacity), &key("queue_capacity"), || {
            "must be between 1 and 1048576".into()
        });
        e.check((1..=1 << 24).contains(&self.max_jobs_held), &key("max_jobs_held"), || {
            "must be between 1 and 16777216".into()
        });
        e.into_vec()
    }
}

/// Checks a `webhook_url`: http or https, a host, no userinfo, no fragment.
/// The message never repeats the URL (it may carry a token in its query).
pub fn parse_webhook_url(raw: &str) -> Result<Url, String> {
    if raw.len() > WEBHOOK_URL_BYTES_MAX {
        return Err(format!("is longer than {WEBHOOK_URL_BYTES_MAX} bytes"));
    }
    let url = Url::parse(raw).map_err(|e| format!("is not a valid URL ({e})"))?;
    if url.scheme() != "http" && url.scheme() != "https" {
        return Err(format!("has scheme {:?}; only http and https are allowed", url.scheme()));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("has no host".into());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("must not carry a user name or password (use webhook_secret)".into());
    }
    if url.fragment().is_some() {
        return Err("must not have a #fragment".into());
    }
    Ok(url)
}

/// Every error of one client's webhook keys (`clients[index].webhook_url`
/// and `.webhook_secret`): both are checked.
pub fn client_webhook_errors(index: usize, url: Option<&str>, secret: Option<&str>) -> Vec<KeyError> {
    let key = |f: &str| format!("clients[{index}].{f}");
    let mut e = Errors::new();
    match (url, secret) {
        (None, None) => {}
        (None, Some(_)) => e.push(key("webhook_secret"), "is set but webhook_url is not"),
        (Some(u), s) => {
            if let Err(m) = parse_webhook_url(u) {
                e.push(key("webhook_url"), m);
            }
            match s.map(Secret::parse) {
                None => e.push(key("webhook_secret"), "is required when webhook_url is set"),
                Some(Err(m)) => e.push(key("webhook_secret"), m),
                Some(Ok(_)) => {}
            }
        }
    }
    e.into_vec()
}

/// Checks one client's webhook keys (`clients[index].webhook_url` and
/// `.webhook_secret`). `Ok(None)`: the client has no webhook.
pub fn parse_client_webhook(
    index: usize,
    url: Option<&str>,
    secret: Option<&str>,
) -> Result<Option<(Url, Secret)>, KeyError> {
    let key = |f: &str| format!("clients[{index}].{f}");
    match (url, secret) {
        (None, None) => Ok(None),
        (None, Some(_)) => Err((key("webhook_secret"), "is set but webhook_url is not".into())),
        (Some(_), None) => Err((key("webhook_secret"), "is required when webhook_url is set".into())),
        (Some(u), Some(s)) => {
            let url = parse_webhook_url(u).map_err(|m| (key("webhook_url"), m))?;
            let secret = Secret::parse(s).map_err(|m| (key("webhook_secret"), m))?;
            Ok(Some((url, secret)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    #[test]
    fn defaults_are_valid_and_match_the_issue() {
        let c: WebhooksConfig = toml::from_str("").unwrap();
        c.validate().unwrap();
        assert_eq!((c.timeout_ms, c.retry_base_ms, c.retry_max_ms, c.max_attempts), (5_000, 1_000, 300_000, 15));
        assert_eq!((c.breaker_failures, c.breaker_open_ms, c.max_in_flight_per_endpoint), (5, 30_000, 16));
    }

    #[test]
    fn unknown_key_is_an_error() {
        let e = toml::from_str::<WebhooksConfig>("timeout = 5").unwrap_err().to_string();
        assert!(e.contains("timeout"), "{e}");
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases: &[(&str, &str)] = &[
            ("timeout_ms = 0", "webhooks.timeout_ms"),
            ("retry_base_ms = 0", "webhooks.retry_base_ms"),
            ("retry_base_ms = 500\nretry_max_ms = 100", "webhooks.retry_max_ms"),
            ("max_attempts = 0", "webhooks.max_attempts"),
            ("breaker_failures = 0", "webhooks.breaker_failures"),
            ("breaker_open_ms = 0", "webhooks.breaker_open_ms"),
            ("max_in_flight_per_endpoint = 0", "webhooks.max_in_flight_per_endpoint"),
            ("max_in_flight_per_endpoint = 5000", "webhooks.max_in_flight_per_endpoint"),
            ("queue_capacity = 0", "webhooks.queue_capacity"),
            ("max_jobs_held = 0", "webhooks.max_jobs_held"),
        ];
        for (text, key) in cases {
            let c: WebhooksConfig = toml::from_str(text).unwrap();
            let (k, _) = c.validate().unwrap_err();
            assert_eq!(&k, key, "{text}");
        }
    }

    #[test]
    fn urls_other_than_plain_http_or_https_are_refused() {
        assert!(parse_webhook_url("https://hooks.example.com/esh3ar?x=1").is_ok());
        assert!(parse_webhook_url("http://127.0.0.1:8080/hook").is_ok());
        for bad in [
            "ftp://example.com/",
            "file:///etc/passwd",
            "javascript:alert(1)",
            "https://user:pw@example.com/",
            "https://user@example.com/",
            "https://example.com/hook#frag",
            "not a url",
            "https://",
            "",
        ] {
            assert!(parse_webhook_url(bad).is_err(), "{bad:?} accepted");
        }
        let long = format!("https://example.com/{}", "a".repeat(WEBHOOK_URL_BYTES_MAX));
        assert!(parse_webhook_url(&long).is_err());
    }

    #[test]
    fn url_errors_never_echo_the_url() {
        let e = parse_webhook_url("https://user:topsecret@example.com/").unwrap_err();
        assert!(!e.contains("topsecret"), "{e}");
    }

    #[test]
    fn client_webhook_needs_both_keys() {
        assert!(parse_client_webhook(0, None, None).unwrap().is_none());
        let (url, _) = parse_client_webhook(0, Some("https://example.com/h"), Some(SECRET)).unwrap().unwrap();
        assert_eq!(url.host_str(), Some("example.com"));
        let (k, _) = parse_client_webhook(3, Some("https://example.com/h"), None).unwrap_err();
        assert_eq!(k, "clients[3].webhook_secret");
        let (k, _) = parse_client_webhook(3, None, Some(SECRET)).unwrap_err();
        assert_eq!(k, "clients[3].webhook_secret");
        let (k, _) = parse_client_webhook(1, Some("gopher://example.com/"), Some(SECRET)).unwrap_err();
        assert_eq!(k, "clients[1].webhook_url");
        let (k, m) = parse_client_webhook(1, Some("https://example.com/"), Some("whsec_!!!")).unwrap_err();
        assert_eq!(k, "clients[1].webhook_secret");
        assert!(!m.contains("!!!"), "{m}");
    }
}
