//! Runtime configuration over the admin API (docs/API.md, "Runtime
//! configuration"): `GET`/`PUT`/`PATCH /v1/config`, `GET
//! /v1/config/versions`, `POST /v1/config/rollback`, and SIGHUP, which
//! re-reads the file the same way. Runs on shard 0 (the admin listener).
//!
//! A change is validated completely first (every error listed, nothing
//! changed), then: the new version is stored durably, the offload thread
//! takes its part (control channel), every shard installs it in two
//! phases (`Shard::install_config`: first every shard learns the new
//! clients, then authentication switches, so a client index never reaches
//! a shard that does not know it), the audit line is fdatasynced, and only
//! then the answer goes out. One change at a time: a second one meanwhile
//! gets `409 config_change_in_progress`.

use std::cell::{Cell, RefCell};
use std::path::PathBuf;
use std::rc::Rc;

use serde_json::{json, Value};

use crate::clients::ClientTable;
use crate::clock::now_ms;
use crate::config::Config;
use crate::config_layers::Layered;
use crate::mesh_msg::{ConfigUpdate, MeshMsg};
use crate::outbound::{ControlSender, EndpointId, OutboundUpdate};
use crate::runtime_config::store::{Store, StoredVersion, VersionMeta};
use crate::runtime_config::{self as rc, Change};
use crate::shard::Shard;

/// Where the file configuration comes from (for SIGHUP and startup).
#[derive(Debug, Clone)]
pub struct ConfigOrigin {
    pub path: PathBuf,
    pub env: Option<String>,
}

/// The version in force.
struct Current {
    version: u64,
    /// The whole config, secrets included.
    json: Value,
    file_hash: String,
}

/// Shard 0's runtime configuration state.
pub struct ConfigAdmin {
    store: RefCell<Store>,
    current: RefCell<Current>,
    origin: ConfigOrigin,
    control: RefCell<ControlSender>,
    provider_endpoints: Vec<(esh3ar_shards::Channel, EndpointId)>,
    busy: Cell<bool>,
    /// False while the version in force is stored but some shard may not
    /// have taken it (an apply timed out): the next change, even an empty
    /// one, applies it again.
    applied: Cell<bool>,
}

/// An answer: status and JSON body.
pub type Answer = (u16, Vec<u8>);

fn error_body(code: &str, message: &str, extra: Option<(&str, Value)>) -> Vec<u8> {
    let mut e = json!({"code": code, "message": message});
    if let Some((k, v)) = extra {
        e[k] = v;
    }
    json!({"error": e}).to_string().into_bytes()
}

fn errors_json(errors: &[(String, String)]) -> Value {
    Value::Array(errors.iter().map(|(k, m)| json!({"key": k, "message": m})).collect())
}

/// What startup hands the admin: the store, the version in force and the
/// effective config.
pub struct Started {
    pub cfg: Config,
    pub store: Store,
    version: u64,
    json: Value,
    file_hash: String,
}

impl Started {
    /// The version in force.
    pub fn version(&self) -> u64 {
        self.version
    }
}

/// At startup: the effective config. No version yet: the file's is
/// version 1. The file (all its layers) unchanged since the latest version
/// was made: the latest version wins (runtime changes survive restarts).
/// The file changed: it becomes a new version with actor `file`.
pub fn startup(file_cfg: Config, layered: &Layered, origin: &ConfigOrigin) -> anyhow::Result<Started> {
    let data_dir = file_cfg.engine.data_dir.clone();
    let mut store = Store::open(&data_dir)
        .map_err(|e| anyhow::anyhow!("cannot open the config versions in {}: {e}", data_dir.display()))?;
    let file_json = rc::to_json(&file_cfg);
    if let Some(latest) = store.latest().filter(|l| l.meta.file_hash == layered.hash) {
        let cfg = rc::from_json(&latest.config, &origin.path).map_err(|errors| {
            anyhow::anyhow!(
                "config version {} in {} is invalid: {}",
                latest.meta.version,
                data_dir.display(),
                crate::config::list_errors(&errors)
            )
        })?;
        let (version, json) = (latest.meta.version, latest.config.clone());
        tracing::info!(version, "config: the file is unchanged since version {version}; it stays in force");
        return Ok(Started { cfg, store, version, json, file_hash: layered.hash.clone() });
    }
    let (old_version, old_json) = store.latest().map_or((0, json!({})), |l| (l.meta.version, l.config.clone()));
    let changes = rc::diff(&old_json, &file_json);
    let version = old_version + 1;
    let summary = if old_version == 0 { "initial configuration".to_owned() } else { rc::summary(&changes) };
    let meta = VersionMeta {
        version,
        at_ms: now_ms(),
        actor: "file".into(),
        source: format!("startup from {}", origin.path.display()),
        summary,
        file_hash: layered.hash.clone(),
    };
    store.append(StoredVersion { meta, config: file_json.clone() })?;
    let line = audit_line("file", "startup", "start", "applied", old_version, Some(version), &changes, &[]);
    store.audit(&line)?;
    Ok(Started { cfg: file_cfg, store, version, json: file_json, file_hash: layered.hash.clone() })
}

#[allow(clippy::too_many_arguments)]
fn audit_line(
    actor: &str,
    source: &str,
    action: &str,
    result: &str,
    old: u64,
    new: Option<u64>,
    changes: &[Change],
    errors: &[(String, String)],
) -> Value {
    let mut line = json!({
        "at_ms": now_ms(), "actor": actor, "source": source, "action": action, "result": result,
        "old_version": old, "new_version": new,
        "diff": changes.iter().map(Change::to_json).collect::<Vec<_>>(),
    });
    if !errors.is_empty() {
        line["errors"] = errors_json(errors);
    }
    line
}

impl ConfigAdmin {
    pub fn new(
        started: Started,
        origin: ConfigOrigin,
        control: ControlSender,
        provider_endpoints: Vec<(esh3ar_shards::Channel, EndpointId)>,
    ) -> Rc<ConfigAdmin> {
        let Started { store, version, json, file_hash, .. } = started;
        Rc::new(ConfigAdmin {
            store: RefCell::new(store),
            current: RefCell::new(Current { version, json, file_hash }),
            origin,
            control: RefCell::new(control),
            provider_endpoints,
            busy: Cell::new(false),
            applied: Cell::new(true),
        })
    }

    /// The version in force.
    pub fn version(&self) -> u64 {
        self.current.borrow().version
    }

    /// `GET /v1/config`.
    pub fn get(&self) -> Answer {
        let cur = self.current.borrow();
        (200, json!({"version": cur.version, "config": rc::redacted(&cur.json)}).to_string().into_bytes())
    }

    /// `GET /v1/config/versions`.
    pub fn versions(&self) -> Answer {
        let store = self.store.borrow();
        let list: Vec<Value> = store
            .metas()
            .map(|m| {
                json!({"version": m.version, "at_ms": m.at_ms, "actor": m.actor, "source": m.source, "summary": m.summary})
            })
            .collect();
        (200, json!({"current": self.version(), "versions": list}).to_string().into_bytes())
    }

    /// The document a `PUT` body holds (TOML or JSON by `content_type`).
    pub fn put_candidate(&self, content_type: &[u8], body: &[u8]) -> Result<Value, Answer> {
        let ct = String::from_utf8_lossy(content_type).to_ascii_lowercase();
        let media = ct.split(';').next().unwrap_or("").trim().to_owned();
        let doc: Value = match media.as_str() {
            "application/json" => serde_json::from_slice(body)
                .map_err(|e| (400, error_body("malformed_json", &format!("the body is not JSON: {e}"), None)))?,
            "application/toml" | "text/toml" | "text/x-toml" => {
                let text = std::str::from_utf8(body)
                    .map_err(|_| (400, error_body("invalid_utf8", "the body is not UTF-8", None)))?;
                let t: toml::Table = toml::from_str(text).map_err(|e| {
                    let msg = format!("the body is not TOML: {}", crate::config::toml_error_text(&e, text));
                    (400, error_body("malformed_toml", &msg, None))
                })?;
                serde_json::to_value(t).unwrap_or(Value::Null)
            }
            _ => {
                let msg = "PUT /v1/config takes application/json or application/toml";
                return Err((415, error_body("unsupported_media_type", msg, None)));
            }
        };
        // `GET`'s answer is accepted as is: `{"version", "config"}`.
        match doc {
            Value::Object(mut m) if m.contains_key("config") && m.len() <= 2 => {
                if let Some(v) = m.get("version").and_then(Value::as_u64) {
                    if v != self.version() {
                        let msg = format!("the config is at version {}, not {v}: GET it again", self.version());
                        return Err((409, error_body("version_conflict", &msg, None)));
                    }
                }
                Ok(m.remove("config").unwrap_or(Value::Null))
            }
            other => Ok(other),
        }
    }

    /// The document a `PATCH` (JSON merge patch) makes of the current one.
    pub fn patch_candidate(&self, content_type: &[u8], body: &[u8]) -> Result<Value, Answer> {
        let ct = String::from_utf8_lossy(content_type).to_ascii_lowercase();
        let media = ct.split(';').next().unwrap_or("").trim().to_owned();
        if media != "application/merge-patch+json" && media != "application/json" {
            let msg = "PATCH /v1/config takes a JSON merge patch (application/merge-patch+json)";
            return Err((415, error_body("unsupported_media_type", msg, None)));
        }
        let patch: Value = serde_json::from_slice(body)
            .map_err(|e| (400, error_body("malformed_json", &format!("the body is not JSON: {e}"), None)))?;
        let mut doc = rc::redacted(&self.current.borrow().json);
        rc::merge_patch(&mut doc, &patch);
        Ok(doc)
    }

    /// The document of stored version `v` (`POST /v1/config/rollback`).
    pub fn rollback_candidate(&self, body: &[u8]) -> Result<(u64, Value), Answer> {
        let v = serde_json::from_slice::<Value>(body).ok().and_then(|b| b.get("version").and_then(Value::as_u64));
        let Some(v) = v else {
            return Err((400, error_body("invalid_field", "the body must be {\"version\": N}", None)));
        };
        match self.store.borrow().get(v) {
            Some(stored) => Ok((v, stored.config.clone())),
            None => Err((404, error_body("not_found", &format!("no stored version {v}"), None))),
        }
    }

    /// Validates `candidate` (secrets left as the placeholder keep their
    /// value) and, if valid and different, makes it the new version
    /// everywhere. Every outcome but "no change" is audited.
    pub async fn change(
        &self,
        shard: &Rc<Shard>,
        who: (&str, &str),
        action: &str,
        candidate: Result<Value, Vec<(String, String)>>,
        file_hash: Option<String>,
    ) -> Answer {
        if self.busy.replace(true) {
            let msg = "another config change is being applied; retry";
            return (409, error_body("config_change_in_progress", msg, None));
        }
        let answer = self.change_now(shard, who, action, candidate, file_hash).await;
        self.busy.set(false);
        answer
    }

    async fn change_now(
        &self,
        shard: &Rc<Shard>,
        (actor, source): (&str, &str),
        action: &str,
        candidate: Result<Value, Vec<(String, String)>>,
        file_hash: Option<String>,
    ) -> Answer {
        let (old_version, old_json, old_hash) = {
            let c = self.current.borrow();
            (c.version, c.json.clone(), c.file_hash.clone())
        };
        let refuse = |status: u16, code: &str, message: &str, errors: Vec<(String, String)>, key: &str| {
            let line = audit_line(actor, source, action, "refused", old_version, None, &[], &errors);
            if let Err(e) = self.store.borrow_mut().audit(&line) {
                tracing::error!(error = %e, "config: cannot write the audit log");
            }
            tracing::warn!(actor, source, action, errors = %crate::config::list_errors(&errors), "config change refused");
            (status, error_body(code, message, Some((key, errors_json(&errors)))))
        };
        let parsed = candidate.and_then(|mut doc| {
            rc::unredact(&mut doc, &old_json)?;
            rc::from_json(&doc, &self.origin.path)
        });
        let new_cfg = match parsed {
            Ok(cfg) => cfg,
            Err(errors) => {
                let msg = "the configuration is invalid; nothing was changed";
                return refuse(400, "invalid_config", msg, errors, "errors");
            }
        };
        let new_json = rc::to_json(&new_cfg);
        let changes = rc::diff(&old_json, &new_json);
        if changes.is_empty() {
            if !self.applied.get() {
                return self.reapply(shard, (actor, source), &new_cfg, old_version).await;
            }
            return (200, json!({"version": old_version, "changed": false, "changes": []}).to_string().into_bytes());
        }
        let mut restart = rc::restart_keys(&changes);
        let announced = self.control.borrow().endpoints();
        let table = match shard.clients().next(&new_cfg, announced) {
            Ok(t) => Some(t),
            Err(keys) => {
                restart.extend(keys);
                None
            }
        };
        let Some(table) = table.filter(|_| restart.is_empty()) else {
            let errors: Vec<(String, String)> =
                restart.into_iter().map(|k| (k, "can only change with a restart".to_owned())).collect();
            let msg = "these keys need a restart: change the file and restart; nothing was changed";
            return refuse(409, "requires_restart", msg, errors, "keys");
        };
        let update = Box::new(OutboundUpdate {
            webhooks: new_cfg.webhooks.clone(),
            endpoints: table.endpoints_of(&new_cfg),
            providers: self.provider_policies(&new_cfg),
        });
        if let Err(e) = self.control.borrow_mut().try_send(update) {
            let why = if e.is_full() { "busy" } else { "stopped" };
            let msg = format!("the offload thread is {why}; nothing was changed, retry");
            return (503, error_body("offload_unavailable", &msg, None));
        }
        let version = old_version + 1;
        let meta = VersionMeta {
            version,
            at_ms: now_ms(),
            actor: actor.into(),
            source: source.into(),
            summary: rc::summary(&changes),
            file_hash: file_hash.unwrap_or(old_hash),
        };
        let file_hash = meta.file_hash.clone();
        if let Err(e) = self.store.borrow_mut().append(StoredVersion { meta, config: new_json.clone() }) {
            tracing::error!(error = %e, "config: cannot store the new version");
            let msg = "the new version could not be stored; the engine keeps the current one (the offload \
                       thread may already use the new webhook settings: send the change again)";
            return (503, error_body("storage_unavailable", msg, None));
        }
        *self.current.borrow_mut() = Current { version, json: new_json, file_hash };
        self.applied.set(false);
        if let Err(e) = apply_everywhere(shard, &new_cfg, &table, version).await {
            tracing::error!(error = %e, version, "config: a shard did not take the new version");
            return (503, error_body("shard_timeout", &format!("{e}; the version is stored: retry to apply it"), None));
        }
        self.applied.set(true);
        let line = audit_line(actor, source, action, "applied", old_version, Some(version), &changes, &[]);
        if let Err(e) = self.store.borrow_mut().audit(&line) {
            tracing::error!(error = %e, "config: cannot write the audit log");
            let msg = "applied, but the audit log could not be written";
            return (500, error_body("audit_unavailable", msg, None));
        }
        tracing::info!(actor, source, version, summary = %rc::summary(&changes), "config: new version applied");
        let changes: Vec<Value> = changes.iter().map(Change::to_json).collect();
        (200, json!({"version": version, "changed": true, "changes": changes}).to_string().into_bytes())
    }

    /// Applies the stored version in force again on every shard (after an
    /// apply that timed out), and audits it.
    async fn reapply(&self, shard: &Rc<Shard>, (actor, source): (&str, &str), cfg: &Config, version: u64) -> Answer {
        let announced = self.control.borrow().endpoints();
        let table = match shard.clients().next(cfg, announced) {
            Ok(t) => t,
            Err(keys) => {
                let msg = format!("version {version} cannot be applied again without a restart ({})", keys.join(", "));
                return (409, error_body("requires_restart", &msg, None));
            }
        };
        if let Err(e) = apply_everywhere(shard, cfg, &table, version).await {
            tracing::error!(error = %e, version, "config: a shard did not take the version again");
            return (503, error_body("shard_timeout", &format!("{e}; the version is stored: retry to apply it"), None));
        }
        self.applied.set(true);
        let line = audit_line(actor, source, "reapply", "applied", version, Some(version), &[], &[]);
        if let Err(e) = self.store.borrow_mut().audit(&line) {
            tracing::error!(error = %e, "config: cannot write the audit log");
        }
        tracing::info!(actor, source, version, "config: version applied again on every shard");
        (200, json!({"version": version, "changed": false, "reapplied": true, "changes": []}).to_string().into_bytes())
    }

    fn provider_policies(&self, cfg: &Config) -> Vec<(EndpointId, crate::outbound::Policy)> {
        self.provider_endpoints
            .iter()
            .filter_map(|&(channel, id)| {
                let policy = match channel {
                    esh3ar_shards::Channel::WhatsApp => cfg.providers.whatsapp.as_ref()?.policy(),
                    esh3ar_shards::Channel::Email => cfg.providers.email.as_ref()?.policy(),
                    _ => return None,
                };
                Some((id, policy))
            })
            .collect()
    }

    /// SIGHUP: re-reads the file layers and applies them like a `PUT` by
    /// actor `file`. Invalid: logged and audited, nothing changes.
    pub async fn reload(&self, shard: &Rc<Shard>) {
        let vars = crate::config_layers::process_overrides();
        let read = crate::config_layers::read(&self.origin.path, self.origin.env.as_deref(), &vars);
        let (candidate, hash) = match read {
            Ok(l) => {
                let hash = l.hash.clone();
                (Config::from_document(l.doc, &self.origin.path).map(|c| rc::to_json(&c)), Some(hash))
            }
            Err(e) => (Err(vec![("(file)".to_owned(), e.to_string())]), None),
        };
        let (status, body) = self.change(shard, ("file", "SIGHUP"), "reload", candidate, hash).await;
        let body = String::from_utf8_lossy(&body);
        if status == 200 {
            tracing::info!(%body, "SIGHUP: configuration file re-read");
        } else {
            tracing::error!(status, %body, "SIGHUP: configuration file refused; nothing changed");
        }
    }
}

/// Installs `version` on every shard, in two phases (see the module doc).
/// Every ask is bounded by `engine.mesh_reply_timeout_ms`.
async fn apply_everywhere(shard: &Rc<Shard>, cfg: &Config, table: &ClientTable, version: u64) -> Result<(), String> {
    for prepare in [true, false] {
        for s in 0..shard.count() {
            let update = if prepare {
                ConfigUpdate::Prepare { version, cfg: Box::new(cfg.clone()), clients: Box::new(table.clone()) }
            } else {
                ConfigUpdate::Commit { version }
            };
            if s == shard.id() {
                shard.install_config(update);
                continue;
            }
            let update = Box::new(update);
            match shard.ask(s, |req| MeshMsg::ConfigApply { from: shard.id() as u16, req, update }).await {
                Ok(MeshMsg::ConfigApplied { .. }) => {}
                _ => return Err(format!("shard {s} did not take config version {version} in time")),
            }
        }
    }
    Ok(())
}
