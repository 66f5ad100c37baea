//! `engine.toml`: parsed strictly (an unknown key is an error) and checked
//! once at startup, so a running engine never meets a bad setting.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use esh3ar_shards::limits::{
    check_body_and_segment, BLOCK_BYTES, BODY_BYTES_MAX, BODY_BYTES_MIN, CLIENT_ID_BYTES_MAX, HTTP_HEAD_BYTES_MAX,
    MESH_CHANNEL_CAPACITY_MAX, MESH_CHANNEL_CAPACITY_MIN, SEGMENT_BYTES_MAX, SEGMENT_BYTES_MIN, WS_MESSAGE_BYTES_MAX,
    WS_MESSAGE_BYTES_MIN,
};
use serde::{Deserialize, Serialize};

use crate::config_errors::Errors;

/// Default request body limit.
pub const MAX_BODY_BYTES_DEFAULT: usize = 64 * 1024;
/// Hard upper bound for `max_body_bytes`: the one in `esh3ar_shards::limits`,
/// where the journal record that must hold such a body is sized from it.
pub const MAX_BODY_BYTES_LIMIT: usize = BODY_BYTES_MAX;

/// A shard's memory budget must hold at least this many requests at
/// `business.max_body_bytes` (`Config::validate`).
pub const BUDGET_REQUESTS_AT_BODY_MAX_MIN: usize = 4;

/// Default bound on every wait for another shard's answer.
pub const MESH_REPLY_TIMEOUT_MS_DEFAULT: u64 = 5_000;

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub engine: EngineConfig,
    pub business: BusinessConfig,
    pub mobile: MobileConfig,
    pub admin: AdminConfig,
    #[serde(default)]
    pub tiers: BTreeMap<String, TierConfig>,
    #[serde(default)]
    pub clients: Vec<ClientConfig>,
    /// Delivery of signed receipts to clients' webhooks.
    #[serde(default)]
    pub webhooks: crate::outbound::WebhooksConfig,
    /// Asynchronous validation on the recipient's home shard, after the 202.
    #[serde(default)]
    pub validation: ValidationConfig,
    /// The event feed (`GET /v1/events`) of clients with `event_feed = true`.
    #[serde(default)]
    pub events: EventsConfig,
    /// Fallback channels' providers (`[providers.whatsapp]`, `[providers.email]`).
    #[serde(default)]
    pub providers: crate::outbound::ProvidersConfig,
    /// The offline backlog on disk (`[backlog]`).
    #[serde(default)]
    pub backlog: crate::backlog::BacklogConfig,
}

/// Fewest seconds the event feed may keep events.
pub const EVENTS_RETENTION_SECONDS_MIN: u64 = 60;
/// Most seconds the event feed may keep events (a year).
pub const EVENTS_RETENTION_SECONDS_MAX: u64 = 366 * 86_400;

/// `[events]`: the event feed's retention.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EventsConfig {
    /// Events stay readable at least this long (default 7 days).
    #[serde(default = "default_events_retention_seconds")]
    pub retention_seconds: u64,
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig { retention_seconds: default_events_retention_seconds() }
    }
}

fn default_events_retention_seconds() -> u64 {
    7 * 86_400
}

/// `[validation]`: checks made on the home shard after acceptance; a
/// message that fails one becomes `rejected` (docs/API.md).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ValidationConfig {
    /// Reject (`unknown_recipient`) messages to users not in the directory.
    #[serde(default)]
    pub known_recipients_only: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EngineConfig {
    /// Number of shards (one per core); 0 = one per online CPU.
    #[serde(default)]
    pub shards: usize,
    /// Where the journal lives; relative paths are relative to the config file's directory.
    pub data_dir: PathBuf,
    /// Journal segment size before rotation.
    #[serde(default = "default_segment_bytes")]
    pub segment_bytes: u64,
    /// Capacity of each shard-to-shard channel (messages).
    #[serde(default = "default_mesh_capacity")]
    pub mesh_channel_capacity: usize,
    /// Memory the engine may use for work in flight (split over shards):
    /// half of each share is the shedding budget, a quarter at most the
    /// body cache.
    #[serde(default = "default_memory_limit_bytes")]
    pub memory_limit_bytes: usize,
    /// Bytes of recent message bodies each shard keeps in memory for fast
    /// delivery; older bodies are read back from the journal.
    #[serde(default = "default_body_cache_bytes")]
    pub body_cache_bytes: usize,
    /// Most connections a shard serves at once (business + mobile); more are refused.
    #[serde(default = "default_connections_max")]
    pub connections_per_shard_max: usize,
    /// The longest a request waits for another shard: for room in the mesh
    /// channel to it and for its answer. Past it the request gets
    /// `503 shard_timeout` (docs/API.md).
    #[serde(default = "default_mesh_reply_timeout_ms")]
    pub mesh_reply_timeout_ms: u64,
    /// Free space the data_dir's file system keeps for the journal's own
    /// status records (acks, deliveries): under it, new messages get `503
    /// storage_full`. Default: three segments (`EngineConfig::disk_reserve_bytes`).
    #[serde(default, rename = "disk_reserve_bytes")]
    pub disk_reserve_bytes_set: Option<u64>,
}

impl EngineConfig {
    /// `disk_reserve_bytes`, or three segments when not set.
    pub fn disk_reserve_bytes(&self) -> u64 {
        self.disk_reserve_bytes_set.unwrap_or(3 * self.segment_bytes)
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BusinessConfig {
    pub listen: String,
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// A request whose head or body is not complete this long after its first byte is dropped.
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// An idle keep-alive connection is closed after this long.
    #[serde(default = "default_idle_timeout_ms")]
    pub idle_timeout_ms: u64,
    /// TTL of a message that names none.
    #[serde(default = "default_ttl_seconds")]
    pub default_ttl_seconds: u64,
    /// The largest TTL a message may ask for.
    #[serde(default = "default_max_ttl_seconds")]
    pub max_ttl_seconds: u64,
    /// How long a client's `Idempotency-Key` is remembered (1 s to 7 days).
    #[serde(default = "default_idempotency_window_seconds")]
    pub idempotency_window_seconds: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MobileConfig {
    pub listen: String,
    pub token_secret: String,
    /// Largest WebSocket message (and frame) a client may send.
    #[serde(default = "default_ws_message_bytes")]
    pub max_message_bytes: usize,
    /// The server pings a connection that sent nothing for this long, and
    /// closes it after twice this long without a frame.
    #[serde(default = "default_ping_interval_ms")]
    pub ping_interval_ms: u64,
    /// A connection that cannot take a write for this long is a slow reader: closed.
    #[serde(default = "default_ws_write_timeout_ms")]
    pub write_timeout_ms: u64,
    /// Most messages delivered to one connection and not yet acked; delivery
    /// pauses there until acks arrive.
    #[serde(default = "default_max_inflight")]
    pub max_inflight: usize,
    /// The upgrade request must be complete within this (and, on `/v1/hub`,
    /// the SignalR handshake request too).
    #[serde(default = "default_request_timeout_ms")]
    pub handshake_timeout_ms: u64,
    /// SignalR hub (`/v1/hub`): the server sends a ping record after this
    /// long without sending anything (SignalR's KeepAliveInterval, 15 s).
    #[serde(default = "default_hub_keep_alive_ms")]
    pub hub_keep_alive_ms: u64,
    /// SignalR hub: a client silent this long is dropped (SignalR's
    /// ClientTimeoutInterval, 30 s); must exceed `hub_keep_alive_ms`.
    #[serde(default = "default_hub_client_timeout_ms")]
    pub hub_client_timeout_ms: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    pub listen: String,
    /// Bearer token of every admin endpoint but `/healthz`, `/readyz` and
    /// `/metrics` (at least 16 characters). Its actor name is `admin`.
    pub token: String,
    /// More admin tokens, each with the name the audit log records as the
    /// actor of the changes made with it (`[[admin.tokens]]`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tokens: Vec<AdminToken>,
}

/// A named admin token (`[[admin.tokens]] name = "ops-alice", token = "..."`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminToken {
    /// The actor name in the audit log: 1 to 64 of `A-Z a-z 0-9 - _ .`, not `admin` nor `file`.
    pub name: String,
    /// At least 16 characters, distinct from every other admin token.
    pub token: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TierConfig {
    pub messages_per_minute: u64,
    /// Under memory pressure, this tier's low and normal messages are shed
    /// this many percent later (0 to 10).
    #[serde(default)]
    pub shed_offset_percent: u8,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    pub id: String,
    pub api_key: String,
    pub tier: String,
    /// Where this client's receipts go (http or https).
    #[serde(default)]
    pub webhook_url: Option<String>,
    /// `whsec_<base64 of 24 to 64 bytes>`; required with `webhook_url`.
    #[serde(default)]
    pub webhook_secret: Option<String>,
    /// Which events go to the webhook or the feed (default: all of them).
    #[serde(default)]
    pub webhook_events: Option<Vec<String>>,
    /// Keep this client's events in the event feed (`GET /v1/events`)
    /// instead of sending them to a webhook.
    #[serde(default)]
    pub event_feed: bool,
    /// Overrides the tier's limit for this client.
    #[serde(default)]
    pub messages_per_minute: Option<u64>,
    /// Default fallback of this client's messages: after how many seconds
    /// without an app ack (absent: no fallback).
    #[serde(default)]
    pub fallback_after_seconds: Option<u64>,
    /// The fallback channels, in order (default: every configured provider).
    #[serde(default)]
    pub fallback_channels: Option<Vec<String>>,
}

fn default_segment_bytes() -> u64 {
    64 << 20
}
fn default_mesh_capacity() -> usize {
    1024
}
fn default_connections_max() -> usize {
    16_384
}
fn default_mesh_reply_timeout_ms() -> u64 {
    MESH_REPLY_TIMEOUT_MS_DEFAULT
}
fn default_memory_limit_bytes() -> usize {
    1 << 30
}
fn default_body_cache_bytes() -> usize {
    16 << 20
}
fn default_ws_message_bytes() -> usize {
    64 * 1024
}
fn default_ping_interval_ms() -> u64 {
    30_000
}
fn default_hub_keep_alive_ms() -> u64 {
    15_000
}
fn default_hub_client_timeout_ms() -> u64 {
    30_000
}
fn default_ws_write_timeout_ms() -> u64 {
    10_000
}
fn default_max_inflight() -> usize {
    1000
}
fn default_max_body() -> usize {
    MAX_BODY_BYTES_DEFAULT
}
fn default_request_timeout_ms() -> u64 {
    10_000
}
fn default_idle_timeout_ms() -> u64 {
    120_000
}
fn default_ttl_seconds() -> u64 {
    7 * 24 * 3600
}
fn default_max_ttl_seconds() -> u64 {
    30 * 24 * 3600
}
fn default_idempotency_window_seconds() -> u64 {
    24 * 3600
}

/// A configuration error: which key, and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("invalid config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid config {path}: {}", list_errors(errors))]
    Invalid { path: PathBuf, errors: Vec<(String, String)> },
}

/// "`key` message; `key` message".
pub fn list_errors(errors: &[(String, String)]) -> String {
    errors.iter().map(|(k, m)| format!("`{k}` {m}")).collect::<Vec<_>>().join("; ")
}

/// Checks one `[tiers.<name>]` table.
fn validate_tier(name: &str, tier: &TierConfig, e: &mut Errors) {
    e.check(
        (1..=u32::MAX as u64).contains(&tier.messages_per_minute),
        &format!("tiers.{name}.messages_per_minute"),
        || "must be between 1 and 4294967295".into(),
    );
    e.check(tier.shed_offset_percent <= 10, &format!("tiers.{name}.shed_offset_percent"), || {
        "must be between 0 and 10".into()
    });
}

/// Addresses after parsing.
#[derive(Debug, Clone, Copy)]
pub struct Listeners {
    pub business: SocketAddr,
    pub mobile: SocketAddr,
    pub admin: SocketAddr,
}

/// A TOML parse error as `line L, column C: <message>`, without the
/// offending line the full text quotes (it may hold a secret) and with
/// quoted strings of the message hidden.
pub fn toml_error_text(e: &toml::de::Error, text: &str) -> String {
    let at = e.span().map(|span| {
        let before = &text[..span.start.min(text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        format!("line {line}, column {column}: ")
    });
    format!("{}{}", at.unwrap_or_default(), hide_quoted(e.message()))
}

/// `invalid type: string "s3cr3t", expected u64` -> `invalid type: string "…", expected u64`.
fn hide_quoted(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut parts = message.split('"');
    if let Some(first) = parts.next() {
        out.push_str(first);
    }
    for (i, part) in parts.enumerate() {
        out.push('"');
        out.push_str(if i % 2 == 0 { "…" } else { part });
    }
    out
}

impl Config {
    /// Reads, parses and validates a config file with the layers the
    /// process names: the overlay of `ESH3AR_ENV`, then `ESH3AR__*` variables.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Self::load_layered(path, crate::config_layers::env_name(None).as_deref()).map(|(cfg, _)| cfg)
    }

    /// Reads `path`, the overlay of `env` and the process's `ESH3AR__*`
    /// variables; parses and validates the result.
    pub fn load_layered(
        path: &Path,
        env: Option<&str>,
    ) -> Result<(Config, crate::config_layers::Layered), ConfigError> {
        let layered = crate::config_layers::read(path, env, &crate::config_layers::process_overrides())?;
        let cfg = Self::from_document(layered.doc.clone(), path)
            .map_err(|errors| ConfigError::Invalid { path: path.into(), errors })?;
        Ok((cfg, layered))
    }

    /// Parses and validates a merged document; relative `engine.data_dir`
    /// is taken from `path`'s directory. Err lists every error found.
    pub fn from_document(doc: toml::Table, path: &Path) -> Result<Config, Vec<(String, String)>> {
        // Through the text, so that a shape error (wrong type, unknown or
        // missing key) points at its line, which names the key.
        let text = toml::to_string(&doc).map_err(|e| vec![("(document)".to_owned(), e.to_string())])?;
        let mut cfg: Config = toml::from_str(&text).map_err(|e: toml::de::Error| {
            // The full text quotes the offending line, value and all: it
            // finds the key, but only the message (its quoted strings
            // hidden: a secret under a misspelt key) goes out.
            let full = e.to_string();
            let message = hide_quoted(e.message());
            let key = full
                .lines()
                .find_map(|l| l.split_once(" | ").and_then(|(_, code)| code.split_once(" = ")).map(|(k, _)| k.trim()))
                .filter(|k| !k.is_empty())
                .or_else(|| e.message().split('`').nth(1))
                .unwrap_or("(document)")
                .to_owned();
            vec![(key, message)]
        })?;
        if cfg.engine.data_dir.is_relative() {
            if let Some(base) = path.parent().filter(|p| !p.as_os_str().is_empty() && *p != Path::new(".")) {
                cfg.engine.data_dir = base.join(&cfg.engine.data_dir);
            }
        }
        let errors = cfg.validate_all();
        if errors.is_empty() {
            Ok(cfg)
        } else {
            Err(errors)
        }
    }

    /// Checks every key and returns every error found, each naming its key
    /// (empty: valid): every check of every section runs, so one answer
    /// lists all that is wrong. A check that relates keys runs only once
    /// the keys it relates are each valid (it would only repeat them).
    pub fn validate_all(&self) -> Vec<(String, String)> {
        let mut e = Errors::new();
        for (key, addr) in [
            ("business.listen", &self.business.listen),
            ("mobile.listen", &self.mobile.listen),
            ("admin.listen", &self.admin.listen),
        ] {
            e.check(addr.parse::<SocketAddr>().is_ok(), key, || {
                format!("is {addr:?}, expected an address like 127.0.0.1:8080")
            });
        }
        self.validate_engine(&mut e);
        self.validate_business(&mut e);
        if !e.any_under("engine") && !e.any_under("business") {
            // Only meaningful once the sizes it relates are each valid.
            self.validate_memory_for_bodies(&mut e);
        }
        self.validate_mobile(&mut e);
        self.validate_admin(&mut e);
        e.extend(self.webhooks.errors());
        e.check(
            (EVENTS_RETENTION_SECONDS_MIN..=EVENTS_RETENTION_SECONDS_MAX).contains(&self.events.retention_seconds),
            "events.retention_seconds",
            || format!("must be between {EVENTS_RETENTION_SECONDS_MIN} and {EVENTS_RETENTION_SECONDS_MAX}"),
        );
        for (name, tier) in &self.tiers {
            validate_tier(name, tier, &mut e);
        }
        e.extend(self.providers.errors());
        e.extend(self.backlog.problems());
        let mut ids = std::collections::HashSet::new();
        let mut keys = std::collections::HashSet::new();
        for (i, c) in self.clients.iter().enumerate() {
            self.validate_client(i, c, (&mut ids, &mut keys), &mut e);
        }
        e.into_vec()
    }

    fn validate_admin(&self, e: &mut Errors) {
        e.check(self.admin.token.chars().count() >= 16, "admin.token", || "must be at least 16 characters".into());
        let mut names = std::collections::HashSet::new();
        let mut tokens = std::collections::HashSet::from([self.admin.token.as_str()]);
        for (i, t) in self.admin.tokens.iter().enumerate() {
            let key = |f: &str| format!("admin.tokens[{i}].{f}");
            let name_ok = !t.name.is_empty()
                && t.name.len() <= 64
                && t.name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
                && t.name != "admin"
                && t.name != "file";
            if e.check(name_ok, &key("name"), || {
                "must be 1-64 characters of A-Z a-z 0-9 - _ . (not admin or file)".into()
            }) {
                e.check(names.insert(t.name.as_str()), &key("name"), || format!("{:?} is used twice", t.name));
            }
            if e.check(t.token.chars().count() >= 16, &key("token"), || "must be at least 16 characters".into()) {
                e.check(tokens.insert(t.token.as_str()), &key("token"), || "is the same as another admin token".into());
            }
        }
    }

    fn validate_engine(&self, e: &mut Errors) {
        let engine = &self.engine;
        e.check(engine.shards <= 1024, "engine.shards", || format!("is {}, at most 1024", engine.shards));
        let segment_in_range = e.check(
            (SEGMENT_BYTES_MIN..=SEGMENT_BYTES_MAX).contains(&engine.segment_bytes),
            "engine.segment_bytes",
            || format!("must be between {SEGMENT_BYTES_MIN} and {SEGMENT_BYTES_MAX}"),
        );
        if segment_in_range {
            e.check(engine.segment_bytes.is_multiple_of(BLOCK_BYTES), "engine.segment_bytes", || {
                format!("must be a multiple of {BLOCK_BYTES}")
            });
        }
        e.check(
            (MESH_CHANNEL_CAPACITY_MIN..=MESH_CHANNEL_CAPACITY_MAX).contains(&engine.mesh_channel_capacity),
            "engine.mesh_channel_capacity",
            || format!("must be between {MESH_CHANNEL_CAPACITY_MIN} and {MESH_CHANNEL_CAPACITY_MAX}"),
        );
        e.check((100..=600_000).contains(&engine.mesh_reply_timeout_ms), "engine.mesh_reply_timeout_ms", || {
            "must be between 100 and 600000".into()
        });
        e.check(engine.memory_limit_bytes >= (64 << 20), "engine.memory_limit_bytes", || {
            "must be at least 67108864 (64 MiB)".into()
        });
        e.check(engine.connections_per_shard_max > 0, "engine.connections_per_shard_max", || "must be positive".into());
    }

    fn validate_business(&self, e: &mut Errors) {
        let b = &self.business;
        let body_in_range =
            e.check((BODY_BYTES_MIN..=BODY_BYTES_MAX).contains(&b.max_body_bytes), "business.max_body_bytes", || {
                format!("must be between {BODY_BYTES_MIN} and {BODY_BYTES_MAX}")
            });
        // Checked once both are in range: a message at the body limit must
        // fit in one journal segment, or its append could never succeed.
        if body_in_range && !e.any_under("engine.segment_bytes") {
            if let Err(why) = check_body_and_segment(b.max_body_bytes, self.engine.segment_bytes) {
                e.push("engine.segment_bytes", format!("is too small for business.max_body_bytes: {why}"));
            }
        }
        e.check(b.request_timeout_ms >= 100, "business.request_timeout_ms", || "must be at least 100 ms".into());
        e.check(b.idle_timeout_ms >= 100, "business.idle_timeout_ms", || "must be at least 100 ms".into());
        e.check(
            b.default_ttl_seconds > 0 && b.default_ttl_seconds <= b.max_ttl_seconds,
            "business.default_ttl_seconds",
            || "must be positive and at most max_ttl_seconds".into(),
        );
        e.check(
            (1..=7 * 24 * 3600).contains(&b.idempotency_window_seconds),
            "business.idempotency_window_seconds",
            || "must be between 1 and 604800 (7 days)".into(),
        );
    }

    /// A shard's shedding budget must hold a few requests at the body
    /// limit; below that, a message at the limit could never be admitted
    /// (its own buffer would fill the budget).
    fn validate_memory_for_bodies(&self, e: &mut Errors) {
        let shards = self.shard_count();
        let budget = crate::pressure::shard_share_bytes(self, shards) / 2;
        let need = BUDGET_REQUESTS_AT_BODY_MAX_MIN * (HTTP_HEAD_BYTES_MAX + self.business.max_body_bytes);
        e.check(budget >= need, "engine.memory_limit_bytes", || {
            format!(
                "gives each of the {shards} shards a budget of {budget} bytes, less than \
                 {BUDGET_REQUESTS_AT_BODY_MAX_MIN} requests at business.max_body_bytes ({need} bytes); \
                 raise it or lower business.max_body_bytes"
            )
        });
    }

    fn validate_mobile(&self, e: &mut Errors) {
        let m = &self.mobile;
        e.check(
            (WS_MESSAGE_BYTES_MIN..=WS_MESSAGE_BYTES_MAX).contains(&m.max_message_bytes),
            "mobile.max_message_bytes",
            || format!("must be between {WS_MESSAGE_BYTES_MIN} and {WS_MESSAGE_BYTES_MAX}"),
        );
        for (key, ms) in [
            ("mobile.ping_interval_ms", m.ping_interval_ms),
            ("mobile.write_timeout_ms", m.write_timeout_ms),
            ("mobile.handshake_timeout_ms", m.handshake_timeout_ms),
        ] {
            e.check(ms >= 100, key, || "must be at least 100 ms".into());
        }
        let keep_alive_ok =
            e.check((100..=3_600_000).contains(&m.hub_keep_alive_ms), "mobile.hub_keep_alive_ms", || {
                "must be between 100 and 3600000 ms".into()
            });
        e.check(
            (!keep_alive_ok || m.hub_client_timeout_ms > m.hub_keep_alive_ms) && m.hub_client_timeout_ms <= 7_200_000,
            "mobile.hub_client_timeout_ms",
            || "must be greater than mobile.hub_keep_alive_ms and at most 7200000 ms".into(),
        );
        e.check((1..=100_000).contains(&m.max_inflight), "mobile.max_inflight", || {
            "must be between 1 and 100000".into()
        });
        e.check(m.token_secret.len() >= 32, "mobile.token_secret", || "must be at least 32 bytes".into());
    }

    fn validate_client_fallback(&self, i: usize, c: &ClientConfig, e: &mut Errors) {
        let key = |f: &str| format!("clients[{i}].{f}");
        if let Some(after) = c.fallback_after_seconds {
            e.check(after <= self.business.max_ttl_seconds, &key("fallback_after_seconds"), || {
                format!("must be from 0 to business.max_ttl_seconds ({})", self.business.max_ttl_seconds)
            });
        }
        match (&c.fallback_channels, c.fallback_after_seconds) {
            (Some(_), None) => e.push(key("fallback_channels"), "is set but fallback_after_seconds is not"),
            (Some(names), Some(_)) => {
                if let Err(m) = crate::fallback::parse_channels(names.iter().map(String::as_str), &self.providers) {
                    e.push(key("fallback_channels"), m);
                }
            }
            (None, Some(_)) if self.providers.channels().next().is_none() => e.push(
                key("fallback_after_seconds"),
                "is set but no provider is configured ([providers.whatsapp] or [providers.email])",
            ),
            _ => {}
        }
    }

    fn validate_client<'a>(
        &self,
        i: usize,
        c: &'a ClientConfig,
        (ids, keys): (&mut std::collections::HashSet<&'a str>, &mut std::collections::HashSet<&'a str>),
        e: &mut Errors,
    ) {
        let key = |f: &str| format!("clients[{i}].{f}");
        let id_ok = !c.id.is_empty()
            && c.id.len() <= CLIENT_ID_BYTES_MAX
            && c.id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if e.check(id_ok, &key("id"), || format!("must be 1-{CLIENT_ID_BYTES_MAX} characters of A-Z a-z 0-9 - _ .")) {
            e.check(ids.insert(c.id.as_str()), &key("id"), || format!("{:?} is used twice", c.id));
        }
        if e.check(c.api_key.len() >= 16, &key("api_key"), || "must be at least 16 characters".into()) {
            e.check(keys.insert(c.api_key.as_str()), &key("api_key"), || "is shared with another client".into());
        }
        e.check(self.tiers.contains_key(&c.tier), &key("tier"), || {
            format!("{:?} is not a tier defined under [tiers]", c.tier)
        });
        e.extend(crate::outbound::client_webhook_errors(i, c.webhook_url.as_deref(), c.webhook_secret.as_deref()));
        e.check(!(c.event_feed && c.webhook_url.is_some()), &key("event_feed"), || {
            "a client's events go to its webhook or to the feed, not both: remove webhook_url or event_feed".into()
        });
        if let Some(events) = &c.webhook_events {
            e.check(c.webhook_url.is_some() || c.event_feed, &key("webhook_events"), || {
                "is set but neither webhook_url nor event_feed is".into()
            });
            for bad_name in events.iter().filter(|n| crate::receipts::event_status(n).is_none()) {
                e.push(
                    key("webhook_events"),
                    format!(
                        "names {bad_name:?}; known events are message.delivered, message.acked, \
                         message.expired, message.rejected, message.failed"
                    ),
                );
            }
        }
        e.check(c.messages_per_minute != Some(0), &key("messages_per_minute"), || "must be positive".into());
        self.validate_client_fallback(i, c, e);
    }

    /// Parsed listener addresses (validated in `load`).
    pub fn listeners(&self) -> Listeners {
        Listeners {
            business: self.business.listen.parse().expect("validated"),
            mobile: self.mobile.listen.parse().expect("validated"),
            admin: self.admin.listen.parse().expect("validated"),
        }
    }

    /// The shard count to run with.
    pub fn shard_count(&self) -> usize {
        if self.engine.shards > 0 {
            self.engine.shards
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[engine]
data_dir = "d"
[business]
listen = "127.0.0.1:0"
[mobile]
listen = "127.0.0.1:0"
token_secret = "0123456789abcdef0123456789abcdef"
[admin]
listen = "127.0.0.1:0"
token = "admin-token-0123456789"
[tiers.basic]
messages_per_minute = 60
[[clients]]
id = "acme"
api_key = "acme-key-0123456789"
tier = "basic"
"#;

    fn load(text: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("e.toml");
        std::fs::write(&p, text).unwrap();
        Config::load(&p)
    }

    #[test]
    fn good_config_loads_with_defaults() {
        let c = load(GOOD).unwrap();
        assert_eq!(c.business.max_body_bytes, 65536);
        assert_eq!(c.business.request_timeout_ms, 10_000);
        assert!(c.engine.data_dir.ends_with("d"));
    }

    #[test]
    fn unknown_key_is_an_error() {
        let e = load(&GOOD.replace("[admin]", "[admin]\nlisten_typo = 1")).unwrap_err().to_string();
        assert!(e.contains("listen_typo"), "{e}");
    }

    #[test]
    fn bad_values_name_their_key() {
        let e = load(&GOOD.replace("tier = \"basic\"", "tier = \"gold\"")).unwrap_err().to_string();
        assert!(e.contains("clients[0].tier"), "{e}");
        let e = load(&GOOD.replace("127.0.0.1:0\"\n[mobile]", "nowhere\"\n[mobile]")).unwrap_err().to_string();
        assert!(e.contains("business.listen"), "{e}");
        let e = load(&GOOD.replace("0123456789abcdef0123456789abcdef", "short")).unwrap_err().to_string();
        assert!(e.contains("token_secret"), "{e}");
    }

    #[test]
    fn hub_timings_default_to_signalr_and_are_checked() {
        let c = load(GOOD).unwrap();
        assert_eq!((c.mobile.hub_keep_alive_ms, c.mobile.hub_client_timeout_ms), (15_000, 30_000));
        let with = |keys: &str| GOOD.replace("[admin]", &format!("{keys}\n[admin]"));
        let c = load(&with("hub_keep_alive_ms = 1000\nhub_client_timeout_ms = 3000")).unwrap();
        assert_eq!((c.mobile.hub_keep_alive_ms, c.mobile.hub_client_timeout_ms), (1000, 3000));
        let e = load(&with("hub_keep_alive_ms = 50")).unwrap_err().to_string();
        assert!(e.contains("mobile.hub_keep_alive_ms"), "{e}");
        let e = load(&with("hub_keep_alive_ms = 30000")).unwrap_err().to_string();
        assert!(e.contains("mobile.hub_client_timeout_ms"), "{e}");
    }

    #[test]
    fn body_limit_and_segment_size_are_checked_together() {
        let with = |engine: &str, business: &str| {
            GOOD.replace("data_dir = \"d\"", &format!("data_dir = \"d\"\n{engine}"))
                .replace("[business]\n", &format!("[business]\n{business}\n"))
        };
        // The documented maximum body in a segment that can hold it: fine.
        let c = load(&with("shards = 2\nsegment_bytes = 16777216", "max_body_bytes = 4194304")).unwrap();
        assert_eq!(c.business.max_body_bytes, BODY_BYTES_MAX);
        // The same body in a 1 MiB segment could never be appended.
        let e = load(&with("segment_bytes = 1048576", "max_body_bytes = 4194304")).unwrap_err().to_string();
        assert!(e.contains("engine.segment_bytes") && e.contains("max_body_bytes"), "{e}");
        let e = load(&with("", "max_body_bytes = 4194305")).unwrap_err().to_string();
        assert!(e.contains("business.max_body_bytes"), "{e}");
        // 64 MiB over 2 shards leaves each a 4 MiB budget: not even one 4 MiB request.
        let e = load(&with(
            "shards = 2\nsegment_bytes = 16777216\nmemory_limit_bytes = 67108864",
            "max_body_bytes = 4194304",
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("engine.memory_limit_bytes") && e.contains("business.max_body_bytes"), "{e}");
        let e = load(&with("mesh_channel_capacity = 8", "")).unwrap_err().to_string();
        assert!(e.contains("engine.mesh_channel_capacity"), "{e}");
        let e = load(&with("mesh_reply_timeout_ms = 0", "")).unwrap_err().to_string();
        assert!(e.contains("engine.mesh_reply_timeout_ms"), "{e}");
        assert_eq!(load(GOOD).unwrap().engine.mesh_reply_timeout_ms, MESH_REPLY_TIMEOUT_MS_DEFAULT);
    }

    #[test]
    fn webhook_keys_are_checked_naming_the_key() {
        let with = |extra: &str| load(&GOOD.replace("tier = \"basic\"\n", &format!("tier = \"basic\"\n{extra}\n")));
        let secret = "webhook_secret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"";
        assert!(with(&format!("webhook_url = \"https://x.test/h\"\n{secret}")).is_ok());
        for (extra, key) in [
            ("webhook_url = \"https://x.test/h\"".to_owned(), "clients[0].webhook_secret"),
            (format!("webhook_url = \"ftp://x.test/h\"\n{secret}"), "clients[0].webhook_url"),
            ("webhook_url = \"https://x.test/h\"\nwebhook_secret = \"nope\"".to_owned(), "clients[0].webhook_secret"),
            (
                format!("webhook_url = \"https://x.test/h\"\n{secret}\nwebhook_events = [\"message.read\"]"),
                "clients[0].webhook_events",
            ),
        ] {
            let e = with(&extra).unwrap_err().to_string();
            assert!(e.contains(key), "{extra}: {e}");
            assert!(!e.contains("MfKQ9r8G"), "a secret never appears in an error: {e}");
        }
        let e = load(&GOOD.replace("token = \"admin-token-0123456789\"", "token = \"short\"")).unwrap_err();
        assert!(e.to_string().contains("admin.token"), "{e}");
        let e = load(&format!("{GOOD}\n[webhooks]\ntimeout_ms = 0\n")).unwrap_err();
        assert!(e.to_string().contains("webhooks.timeout_ms"), "{e}");
    }

    #[test]
    fn every_error_of_every_section_is_listed_with_its_key() {
        let text = GOOD
            .replace("data_dir = \"d\"", "data_dir = \"d\"\nsegment_bytes = 1000\nmesh_reply_timeout_ms = 1")
            .replace("[business]\n", "[business]\nrequest_timeout_ms = 1\nidle_timeout_ms = 1\n")
            .replace(
                "token_secret = \"0123456789abcdef0123456789abcdef\"",
                "token_secret = \"short-secret-value\"\nmax_inflight = 0",
            )
            .replace("token = \"admin-token-0123456789\"", "token = \"tiny-admin-tok\"")
            .replace("messages_per_minute = 60", "messages_per_minute = 0\nshed_offset_percent = 50")
            .replace(
                "api_key = \"acme-key-0123456789\"\ntier = \"basic\"",
                "api_key = \"short-api-key\"\ntier = \"gold\"\nwebhook_url = \"ftp://x.test/\"",
            )
            + "[webhooks]\ntimeout_ms = 0\nmax_attempts = 0\n";
        let errors = match load(&text) {
            Err(ConfigError::Invalid { errors, .. }) => errors,
            other => panic!("{other:?}"),
        };
        let keys: Vec<&str> = errors.iter().map(|(k, _)| k.as_str()).collect();
        for key in [
            "engine.segment_bytes",
            "engine.mesh_reply_timeout_ms",
            "business.request_timeout_ms",
            "business.idle_timeout_ms",
            "mobile.max_inflight",
            "mobile.token_secret",
            "admin.token",
            "tiers.basic.messages_per_minute",
            "tiers.basic.shed_offset_percent",
            "clients[0].api_key",
            "clients[0].tier",
            "clients[0].webhook_url",
            "clients[0].webhook_secret",
            "webhooks.timeout_ms",
            "webhooks.max_attempts",
        ] {
            assert!(keys.contains(&key), "{key} missing from {keys:?}");
        }
        assert_eq!(keys.iter().filter(|k| **k == "engine.segment_bytes").count(), 1, "one error per cause: {keys:?}");
        assert!(!keys.contains(&"engine.memory_limit_bytes"), "a relation is checked only over valid sizes: {keys:?}");
        let shown = list_errors(&errors);
        for secret in ["short-secret-value", "tiny-admin-tok", "short-api-key"] {
            assert!(!shown.contains(secret), "a value quoted in an error: {shown}");
        }
    }

    #[test]
    fn a_shape_error_names_its_key_but_never_quotes_the_value() {
        let e = load(&GOOD.replace("[engine]\n", "[engine]\nsegment_bytes = \"whsec_supersecret0123\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("segment_bytes"), "{e}");
        assert!(!e.contains("supersecret"), "a value quoted in an error: {e}");
        assert_eq!(
            hide_quoted(r#"invalid type: string "x", expected u64"#),
            r#"invalid type: string "…", expected u64"#
        );
        let text = "[admin]\ntoken = \"s3cr3t-s3cr3t-s3cr3t\n";
        let e = toml::from_str::<toml::Table>(text).unwrap_err();
        let shown = toml_error_text(&e, text);
        assert!(shown.starts_with("line 2, column"), "{shown}");
        assert!(!shown.contains("s3cr3t"), "{shown}");
    }

    #[test]
    fn event_feed_keys_are_checked_naming_the_key() {
        let with = |extra: &str| load(&GOOD.replace("tier = \"basic\"\n", &format!("tier = \"basic\"\n{extra}\n")));
        assert!(with("event_feed = true").is_ok());
        assert!(with("event_feed = true\nwebhook_events = [\"message.acked\"]").is_ok());
        let secret = "webhook_secret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"";
        let both = format!("event_feed = true\nwebhook_url = \"https://x.test/h\"\n{secret}");
        assert!(with(&both).unwrap_err().to_string().contains("clients[0].event_feed"));
        let e = with("webhook_events = [\"message.acked\"]").unwrap_err().to_string();
        assert!(e.contains("clients[0].webhook_events"), "{e}");
        for bad in ["0", "59", "31622401"] {
            let e = load(&format!("{GOOD}\n[events]\nretention_seconds = {bad}\n")).unwrap_err().to_string();
            assert!(e.contains("events.retention_seconds"), "{bad}: {e}");
        }
        assert!(load(&format!("{GOOD}\n[events]\nretention_seconds = 3600\n")).is_ok());
    }
}
