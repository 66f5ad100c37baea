//! Where a configuration comes from: `engine.toml`, an environment's
//! overlay `engine.<env>.toml` (`--env NAME` or `ESH3AR_ENV`), then single
//! keys from `ESH3AR__SECTION__KEY=value` variables, in that order.
//!
//! Merging: tables merge key by key (recursively); any other value (a
//! number, a string, an array such as `[[clients]]`) is replaced whole.
//! Every leaf remembers the layer that set it last, so `esh3ar config check`
//! can print the source of every value.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::config::ConfigError;

/// The prefix of variables that override one key each.
pub const ENV_VAR_PREFIX: &str = "ESH3AR__";
/// The variable naming the environment when `--env` is not given.
pub const ENV_NAME_VAR: &str = "ESH3AR_ENV";

/// A merged configuration document and the source of each of its keys.
#[derive(Debug, Clone)]
pub struct Layered {
    /// The merged document, before defaults and validation.
    pub doc: toml::Table,
    /// Dotted key (`business.listen`, `clients`) -> the layer that set it.
    pub sources: BTreeMap<String, String>,
    /// SHA-256 (hex) of the merged document: what changed since a runtime
    /// version was made from it (`runtime_config`).
    pub hash: String,
}

/// `engine.toml` + `prod` -> `engine.prod.toml`, beside it.
pub fn overlay_path(path: &Path, env: &str) -> PathBuf {
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "engine".into());
    let ext = path.extension().map(|e| format!(".{}", e.to_string_lossy())).unwrap_or_default();
    path.with_file_name(format!("{stem}.{env}{ext}"))
}

/// The environment name: `--env`, else `ESH3AR_ENV`, else none.
pub fn env_name(flag: Option<String>) -> Option<String> {
    flag.or_else(|| std::env::var(ENV_NAME_VAR).ok()).filter(|e| !e.is_empty())
}

/// The `ESH3AR__*` variables of this process.
pub fn process_overrides() -> Vec<(String, String)> {
    std::env::vars().filter(|(k, _)| k.starts_with(ENV_VAR_PREFIX)).collect()
}

fn read_table(path: &Path) -> Result<toml::Table, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
    toml::from_str(&text)
        .map_err(|e| ConfigError::Parse { path: path.into(), message: crate::config::toml_error_text(&e, &text) })
}

/// Reads `path`, merges the overlay of `env` (it must exist) and the
/// `ESH3AR__` overrides in `vars` over it.
pub fn read(path: &Path, env: Option<&str>, vars: &[(String, String)]) -> Result<Layered, ConfigError> {
    let mut doc = read_table(path)?;
    let mut sources = BTreeMap::new();
    let base_label = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    record_sources(&doc, "", &base_label, &mut sources);
    if let Some(env) = env {
        if env.is_empty() || !env.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b)) {
            return Err(ConfigError::Parse {
                path: path.into(),
                message: format!("environment name {env:?} must be letters, digits, - or _"),
            });
        }
        let over_path = overlay_path(path, env);
        let over = read_table(&over_path)?;
        let label = over_path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        merge_tables(&mut doc, over, "", &label, &mut sources);
    }
    for (name, value) in vars {
        let Some(rest) = name.strip_prefix(ENV_VAR_PREFIX) else { continue };
        let keys: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
        if keys.len() < 2 || keys.iter().any(String::is_empty) {
            return Err(ConfigError::Parse {
                path: path.into(),
                message: format!("{name}: expected {ENV_VAR_PREFIX}SECTION__KEY (e.g. ESH3AR__BUSINESS__LISTEN)"),
            });
        }
        set_key(&mut doc, &keys, env_value(value))
            .map_err(|message| ConfigError::Parse { path: path.into(), message: format!("{name}: {message}") })?;
        sources.insert(keys.join("."), format!("env {name}"));
    }
    let hash = hex(&Sha256::digest(toml::to_string(&doc).unwrap_or_default().as_bytes()));
    Ok(Layered { doc, sources, hash })
}

/// A variable's value as TOML when it reads as a TOML value (`5`, `true`,
/// `["a"]`, `"x"`), else as the plain string.
pub fn env_value(raw: &str) -> toml::Value {
    match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut t) => t.remove("v").unwrap_or_else(|| toml::Value::String(raw.into())),
        Err(_) => toml::Value::String(raw.into()),
    }
}

fn set_key(doc: &mut toml::Table, keys: &[String], value: toml::Value) -> Result<(), String> {
    let (last, parents) = keys.split_last().ok_or("empty key")?;
    let mut table = doc;
    for k in parents {
        let entry = table.entry(k.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = match entry {
            toml::Value::Table(t) => t,
            _ => return Err(format!("`{k}` is not a table")),
        };
    }
    table.insert(last.clone(), value);
    Ok(())
}

/// Merges `over` into `base`: tables key by key, other values replaced.
pub fn merge_tables(
    base: &mut toml::Table,
    over: toml::Table,
    prefix: &str,
    label: &str,
    sources: &mut BTreeMap<String, String>,
) {
    for (k, v) in over {
        let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge_tables(b, o, &key, label, sources),
            (_, v) => {
                sources.retain(|s, _| s != &key && !s.starts_with(&format!("{key}.")));
                record_value(&v, &key, label, sources);
                base.insert(k, v);
            }
        }
    }
}

fn record_sources(t: &toml::Table, prefix: &str, label: &str, sources: &mut BTreeMap<String, String>) {
    for (k, v) in t {
        let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
        record_value(v, &key, label, sources);
    }
}

fn record_value(v: &toml::Value, key: &str, label: &str, sources: &mut BTreeMap<String, String>) {
    match v {
        toml::Value::Table(t) => record_sources(t, key, label, sources),
        _ => {
            sources.insert(key.to_owned(), label.to_owned());
        }
    }
}

/// The source of `key` (its own, or that of the nearest enclosing key set
/// whole, like `clients`), or `default`.
pub fn source_of<'a>(sources: &'a BTreeMap<String, String>, key: &str) -> &'a str {
    let mut k = key;
    loop {
        if let Some(s) = sources.get(k) {
            return s;
        }
        match k.rfind(['.', '[']) {
            Some(i) => k = &k[..i],
            None => return "default",
        }
    }
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> toml::Table {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn overlay_merges_tables_and_replaces_other_values() {
        let mut base = table(
            "[engine]\nshards = 2\ndata_dir = \"d\"\n[tiers.basic]\nmessages_per_minute = 60\n\
             [[clients]]\nid = \"a\"\n[[clients]]\nid = \"b\"\n",
        );
        let mut sources = BTreeMap::new();
        record_sources(&base, "", "engine.toml", &mut sources);
        let over = table("[engine]\nshards = 4\n[tiers.gold]\nmessages_per_minute = 600\n[[clients]]\nid = \"c\"\n");
        merge_tables(&mut base, over, "", "engine.prod.toml", &mut sources);
        assert_eq!(base["engine"]["shards"].as_integer(), Some(4));
        assert_eq!(base["engine"]["data_dir"].as_str(), Some("d"), "sibling keys of a merged table stay");
        assert_eq!(base["tiers"]["basic"]["messages_per_minute"].as_integer(), Some(60));
        assert_eq!(base["tiers"]["gold"]["messages_per_minute"].as_integer(), Some(600));
        let clients = base["clients"].as_array().unwrap();
        assert_eq!(clients.len(), 1, "an array is replaced whole, not appended to");
        assert_eq!(source_of(&sources, "engine.shards"), "engine.prod.toml");
        assert_eq!(source_of(&sources, "engine.data_dir"), "engine.toml");
        assert_eq!(source_of(&sources, "clients[0].id"), "engine.prod.toml");
        assert_eq!(source_of(&sources, "business.max_body_bytes"), "default");
    }

    #[test]
    fn env_variables_override_single_keys_with_typed_values() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("engine.toml");
        std::fs::write(&p, "[business]\nlisten = \"127.0.0.1:1\"\n").unwrap();
        std::fs::write(dir.path().join("engine.dev.toml"), "[business]\nmax_body_bytes = 1024\n").unwrap();
        let vars = vec![
            ("ESH3AR__BUSINESS__LISTEN".to_owned(), "127.0.0.1:2".to_owned()),
            ("ESH3AR__TIERS__BASIC__MESSAGES_PER_MINUTE".to_owned(), "5".to_owned()),
        ];
        let l = read(&p, Some("dev"), &vars).unwrap();
        assert_eq!(l.doc["business"]["listen"].as_str(), Some("127.0.0.1:2"));
        assert_eq!(l.doc["business"]["max_body_bytes"].as_integer(), Some(1024));
        assert_eq!(l.doc["tiers"]["basic"]["messages_per_minute"].as_integer(), Some(5), "typed, not a string");
        assert_eq!(source_of(&l.sources, "business.listen"), "env ESH3AR__BUSINESS__LISTEN");
        assert_eq!(source_of(&l.sources, "business.max_body_bytes"), "engine.dev.toml");
        let plain = read(&p, None, &[]).unwrap();
        assert_ne!(plain.hash, l.hash, "the hash covers every layer");
        assert!(read(&p, Some("nope"), &[]).is_err(), "a named overlay must exist");
        let bad = vec![("ESH3AR__LISTEN".to_owned(), "x".to_owned())];
        assert!(read(&p, None, &bad).is_err(), "a variable must name a section and a key");
    }
}
