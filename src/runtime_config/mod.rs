//! Runtime configuration: the effective config as a JSON document, its
//! secrets redacted for display, the diff between two versions, the keys
//! that need a restart, and the durable store of versions and the audit
//! log (`store.rs`). The admin API (`admin_config.rs`) and startup
//! (`server.rs`) use these; shards only receive the result
//! (`Shard::install_config`).

pub mod store;

use serde_json::Value;

use crate::config::Config;

/// What a secret shows in `GET /v1/config`, in diffs and in the audit log.
/// Sent back unchanged in a `PUT` or `PATCH`, it keeps the current value.
pub const SECRET_PLACEHOLDER: &str = "<redacted>";

/// Secret keys, with `[*]` for any array position.
pub const SECRET_KEYS: &[&str] = &[
    "admin.token",
    "admin.tokens[*].token",
    "mobile.token_secret",
    "clients[*].api_key",
    "clients[*].webhook_secret",
    "providers.whatsapp.access_token",
    "providers.email.password",
];

/// Keys whose change needs a restart: they size channels, files or
/// sockets at startup, or build the providers' connections. A key listed
/// as a table (`providers.whatsapp`) covers every key under it except
/// [`PROVIDER_RUNTIME_KEYS`]. Everything else changes at runtime, clients'
/// webhooks included: the offload thread's endpoint table grows
/// (`outbound::OutboundUpdate`), and every attempt sets its own timeout
/// (`webhooks.timeout_ms`). The one exception is not a key: a webhook
/// that finds that table full (`outbound::ENDPOINTS_MAX` per process
/// lifetime) is refused as `clients[<id>].webhook_url` by `ClientTable::next`.
pub const RESTART_KEYS: &[&str] = &[
    "engine.shards",
    "engine.data_dir",
    "engine.segment_bytes",
    "engine.mesh_channel_capacity",
    "engine.connections_per_shard_max",
    "engine.body_cache_bytes",
    "business.listen",
    "mobile.listen",
    "admin.listen",
    "webhooks.queue_capacity",
    "webhooks.max_jobs_held",
    "events.retention_seconds",
    "backlog.cache_bytes",
    "backlog.write_buffer_bytes",
    "providers.whatsapp",
    "providers.email",
];

/// Provider keys that change at runtime (the offload thread takes them).
pub const PROVIDER_RUNTIME_KEYS: &[&str] =
    &["max_attempts", "retry_base_ms", "retry_max_ms", "breaker_failures", "breaker_open_ms", "max_in_flight"];

/// The config as JSON, with every secret (unredacted) and no nulls.
pub fn to_json(cfg: &Config) -> Value {
    let mut v = serde_json::to_value(cfg).unwrap_or(Value::Null);
    strip_nulls(&mut v);
    v
}

fn strip_nulls(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.retain(|_, v| !v.is_null());
            m.values_mut().for_each(strip_nulls);
        }
        Value::Array(a) => a.iter_mut().for_each(strip_nulls),
        _ => {}
    }
}

/// Parses and validates a JSON config document (the body of a `PUT`, a
/// patched document, a stored version). Err lists every error.
pub fn from_json(v: &Value, path: &std::path::Path) -> Result<Config, Vec<(String, String)>> {
    let mut v = v.clone();
    strip_nulls(&mut v);
    let doc: toml::Table = serde_json::from_value(v)
        .map_err(|e| vec![("(document)".to_owned(), format!("is not a config document: {e}"))])?;
    Config::from_document(doc, path)
}

/// `clients[3].api_key` -> `clients[*].api_key`.
fn generic(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    let mut in_brackets = false;
    for ch in key.chars() {
        match ch {
            '[' => {
                in_brackets = true;
                out.push_str("[*");
            }
            ']' => {
                in_brackets = false;
                out.push(']');
            }
            _ if in_brackets => {}
            _ => out.push(ch),
        }
    }
    out
}

/// True for a key holding a secret (any array position).
pub fn is_secret(key: &str) -> bool {
    SECRET_KEYS.contains(&generic(key).as_str())
}

fn join(prefix: &str, k: &str) -> String {
    if prefix.is_empty() {
        k.to_owned()
    } else {
        format!("{prefix}.{k}")
    }
}

/// Replaces every secret with [`SECRET_PLACEHOLDER`].
pub fn redact(v: &mut Value) {
    redact_at(v, "");
}

fn redact_at(v: &mut Value, key: &str) {
    match v {
        Value::Object(m) => m.iter_mut().for_each(|(k, v)| redact_at(v, &join(key, k))),
        Value::Array(a) => a.iter_mut().enumerate().for_each(|(i, v)| redact_at(v, &format!("{key}[{i}]"))),
        Value::String(s) if is_secret(key) => *s = SECRET_PLACEHOLDER.to_owned(),
        _ => {}
    }
}

/// A redacted copy.
pub fn redacted(v: &Value) -> Value {
    let mut v = v.clone();
    redact(&mut v);
    v
}

/// Puts the current value back wherever `new` holds the placeholder at a
/// secret key. Array items are matched by identity, not position: a
/// client by `id`, an admin token by `name`. Err names each placeholder
/// with no current value to keep (a new client sent with `<redacted>`).
pub fn unredact(new: &mut Value, current: &Value) -> Result<(), Vec<(String, String)>> {
    let mut errors = Vec::new();
    unredact_at(new, Some(current), "", &mut errors);
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

fn item_identity(v: &Value) -> Option<&Value> {
    v.get("id").or_else(|| v.get("name"))
}

fn unredact_at(v: &mut Value, cur: Option<&Value>, key: &str, errors: &mut Vec<(String, String)>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m.iter_mut() {
                unredact_at(v, cur.and_then(|c| c.get(k)), &join(key, k), errors);
            }
        }
        Value::Array(a) => {
            for (i, item) in a.iter_mut().enumerate() {
                let same = item_identity(item)
                    .and_then(|id| cur.and_then(Value::as_array)?.iter().find(|c| item_identity(c) == Some(id)));
                unredact_at(item, same, &format!("{key}[{i}]"), errors);
            }
        }
        Value::String(s) if s == SECRET_PLACEHOLDER && is_secret(key) => match cur {
            Some(Value::String(c)) => *s = c.clone(),
            _ => errors.push((key.to_owned(), format!("is {SECRET_PLACEHOLDER:?} but has no current value to keep"))),
        },
        _ => {}
    }
}

/// One changed key between two versions; secrets shown as the placeholder.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// Dotted key; clients as `clients[<id>]`, admin tokens as `admin.tokens[<name>]`.
    pub key: String,
    pub old: Option<Value>,
    pub new: Option<Value>,
}

impl Change {
    /// `{"key", "old", "new"}` (absent sides are null).
    pub fn to_json(&self) -> Value {
        serde_json::json!({"key": self.key, "old": self.old, "new": self.new})
    }
}

/// Every key that differs between `old` and `new` (both unredacted),
/// with secrets redacted in the result.
pub fn diff(old: &Value, new: &Value) -> Vec<Change> {
    let mut out = Vec::new();
    diff_at(old, new, "", &mut out);
    out
}

fn shown(v: &Value, key: &str) -> Value {
    let mut v = v.clone();
    redact_at(&mut v, key);
    v
}

fn diff_at(old: &Value, new: &Value, key: &str, out: &mut Vec<Change>) {
    if old == new {
        return;
    }
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for k in keys {
                let k2 = join(key, k);
                match (a.get(k), b.get(k)) {
                    (Some(x), Some(y)) => diff_at(x, y, &k2, out),
                    (x, y) => {
                        out.push(Change { new: y.map(|y| shown(y, &k2)), old: x.map(|x| shown(x, &k2)), key: k2 })
                    }
                }
            }
        }
        (Value::Array(a), Value::Array(b))
            if a.iter().chain(b).all(|v| item_identity(v).is_some_and(Value::is_string)) =>
        {
            let id_of = |v: &Value| item_identity(v).and_then(Value::as_str).unwrap_or("").to_owned();
            let ids: std::collections::BTreeSet<String> = a.iter().chain(b).map(id_of).collect();
            for id in ids {
                let k2 = format!("{key}[{id}]");
                let find = |list: &Vec<Value>| list.iter().find(|v| id_of(v) == id).cloned();
                match (find(a), find(b)) {
                    (Some(x), Some(y)) => diff_at(&x, &y, &k2, out),
                    (x, y) => {
                        out.push(Change { new: y.map(|y| shown(&y, &k2)), old: x.map(|x| shown(&x, &k2)), key: k2 })
                    }
                }
            }
        }
        _ => out.push(Change { key: key.to_owned(), old: Some(shown(old, key)), new: Some(shown(new, key)) }),
    }
}

/// The changed keys that need a restart.
pub fn restart_keys(changes: &[Change]) -> Vec<String> {
    let mut keys: Vec<String> = changes
        .iter()
        .filter(|c| {
            RESTART_KEYS.iter().any(|r| {
                let under = c.key.strip_prefix(r).is_some_and(|rest| rest.is_empty() || rest.starts_with('.'));
                let provider_tuning = r.starts_with("providers.")
                    && c.key.strip_prefix(&format!("{r}.")).is_some_and(|k| PROVIDER_RUNTIME_KEYS.contains(&k));
                under && !provider_tuning
            })
        })
        .map(|c| c.key.clone())
        .collect();
    keys.dedup();
    keys
}

/// A one-line summary: the first few changed keys, values for non-secrets.
pub fn summary(changes: &[Change]) -> String {
    const SHOWN_MAX: usize = 5;
    let fmt = |v: &Option<Value>| match v {
        None => "(none)".to_owned(),
        Some(Value::Object(_) | Value::Array(_)) => "{…}".to_owned(),
        Some(v) => v.to_string(),
    };
    let mut parts: Vec<String> =
        changes.iter().take(SHOWN_MAX).map(|c| format!("{}: {} -> {}", c.key, fmt(&c.old), fmt(&c.new))).collect();
    if changes.len() > SHOWN_MAX {
        parts.push(format!("and {} more", changes.len() - SHOWN_MAX));
    }
    if parts.is_empty() {
        "no change".into()
    } else {
        parts.join("; ")
    }
}

/// Applies an RFC 7386 JSON merge patch.
pub fn merge_patch(doc: &mut Value, patch: &Value) {
    json_patch::merge(doc, patch);
}

/// Flattens a document to `key = value` pairs (arrays of tables by index),
/// for `esh3ar config check`.
pub fn flatten(v: &Value) -> Vec<(String, Value)> {
    fn walk(v: &Value, key: &str, out: &mut Vec<(String, Value)>) {
        match v {
            Value::Object(m) => m.iter().for_each(|(k, v)| walk(v, &join(key, k), out)),
            Value::Array(a) if a.iter().any(Value::is_object) => {
                a.iter().enumerate().for_each(|(i, v)| walk(v, &format!("{key}[{i}]"), out))
            }
            _ => out.push((key.to_owned(), v.clone())),
        }
    }
    let mut out = Vec::new();
    walk(v, "", &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn doc() -> Value {
        json!({
            "admin": {"listen": "127.0.0.1:0", "token": "admin-token-0123456789",
                      "tokens": [{"name": "ops-alice", "token": "alice-token-0123456789"}]},
            "mobile": {"token_secret": "s".repeat(32)},
            "tiers": {"basic": {"messages_per_minute": 60}},
            "clients": [
                {"id": "acme", "api_key": "acme-key-0123456789", "tier": "basic",
                 "webhook_secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"},
                {"id": "beta", "api_key": "beta-key-0123456789", "tier": "basic"}
            ],
            "providers": {"email": {"password": "hunter2-password", "max_attempts": 3, "host": "h"}}
        })
    }

    #[test]
    fn redaction_hides_every_secret_and_nothing_else() {
        let r = redacted(&doc());
        let text = r.to_string();
        for secret in ["admin-token-0123", "alice-token", "ssssssss", "acme-key", "beta-key", "MfKQ9r8G", "hunter2"] {
            assert!(!text.contains(secret), "{secret} leaked: {text}");
        }
        assert_eq!(r["clients"][0]["id"], "acme");
        assert_eq!(r["clients"][1]["api_key"], SECRET_PLACEHOLDER);
        assert_eq!(r["providers"]["email"]["host"], "h");
    }

    #[test]
    fn unredact_keeps_current_secrets_matched_by_identity() {
        let cur = doc();
        let mut new = redacted(&cur);
        // Reordered clients: matched by id, not position.
        new["clients"].as_array_mut().unwrap().reverse();
        new["clients"][0]["api_key"] = json!("beta-key-rotated-0123");
        unredact(&mut new, &cur).unwrap();
        assert_eq!(new["clients"][0]["api_key"], "beta-key-rotated-0123");
        assert_eq!(new["clients"][1]["api_key"], "acme-key-0123456789");
        assert_eq!(new["clients"][1]["webhook_secret"], cur["clients"][0]["webhook_secret"]);
        assert_eq!(new["admin"]["tokens"][0]["token"], "alice-token-0123456789");
        assert_eq!(new["mobile"]["token_secret"], cur["mobile"]["token_secret"]);
        // A new client cannot keep a secret it never had.
        let mut added = redacted(&cur);
        added["clients"].as_array_mut().unwrap().push(json!({"id": "new", "api_key": SECRET_PLACEHOLDER}));
        let errors = unredact(&mut added, &cur).unwrap_err();
        assert_eq!(errors[0].0, "clients[2].api_key");
        // The placeholder at a key that is not secret is just a value.
        let mut odd = cur.clone();
        odd["clients"][0]["tier"] = json!(SECRET_PLACEHOLDER);
        unredact(&mut odd, &cur).unwrap();
        assert_eq!(odd["clients"][0]["tier"], SECRET_PLACEHOLDER);
    }

    #[test]
    fn diff_names_keys_matches_clients_by_id_and_redacts() {
        let old = doc();
        let mut new = doc();
        new["tiers"]["basic"]["messages_per_minute"] = json!(5);
        new["clients"][0]["api_key"] = json!("acme-key-rotated-0123");
        new["clients"].as_array_mut().unwrap().remove(1);
        new["clients"].as_array_mut().unwrap().push(json!({"id": "gamma", "api_key": "gamma-key-0123456789"}));
        let changes = diff(&old, &new);
        let keys: Vec<&str> = changes.iter().map(|c| c.key.as_str()).collect();
        assert_eq!(
            keys,
            ["clients[acme].api_key", "clients[beta]", "clients[gamma]", "tiers.basic.messages_per_minute"]
        );
        let text = format!("{changes:?}");
        for secret in ["acme-key", "beta-key", "gamma-key", "MfKQ9r8G"] {
            assert!(!text.contains(secret), "{secret} leaked: {text}");
        }
        assert_eq!(changes[3].old, Some(json!(60)));
        assert_eq!(changes[3].new, Some(json!(5)));
        assert!(diff(&old, &old).is_empty());
        assert!(summary(&changes).contains("tiers.basic.messages_per_minute: 60 -> 5"));
    }

    #[test]
    fn restart_keys_cover_sizes_and_provider_connections_but_not_tuning() {
        let ch = |k: &str| Change { key: k.into(), old: None, new: None };
        let changes = [
            ch("business.listen"),
            ch("engine.shards"),
            ch("tiers.basic.messages_per_minute"),
            ch("providers.email.max_attempts"),
            ch("providers.email.host"),
            ch("providers.whatsapp"),
            ch("business.listen_other"),
            ch("webhooks.timeout_ms"),
            ch("webhooks.max_in_flight_per_endpoint"),
            ch("webhooks.queue_capacity"),
            ch("webhooks.max_jobs_held"),
            ch("clients[acme].webhook_url"),
            ch("clients[new]"),
        ];
        assert_eq!(
            restart_keys(&changes),
            [
                "business.listen",
                "engine.shards",
                "providers.email.host",
                "providers.whatsapp",
                "webhooks.queue_capacity",
                "webhooks.max_jobs_held"
            ]
        );
        // The list holds only keys that size something at startup.
        assert!(!RESTART_KEYS.iter().any(|k| k.starts_with("clients") || *k == "webhooks.timeout_ms"));
    }

    #[test]
    fn merge_patch_follows_rfc_7386() {
        // The example of RFC 7386 section 3.
        let mut target = json!({"title": "Goodbye!", "author": {"givenName": "John", "familyName": "Doe"},
                                "tags": ["example", "sample"], "content": "This will be unchanged"});
        let patch = json!({"title": "Hello!", "phoneNumber": "+01-123-456-7890",
                           "author": {"familyName": null}, "tags": ["example"]});
        merge_patch(&mut target, &patch);
        assert_eq!(
            target,
            json!({"title": "Hello!", "author": {"givenName": "John"}, "tags": ["example"],
                   "content": "This will be unchanged", "phoneNumber": "+01-123-456-7890"})
        );
    }
}
