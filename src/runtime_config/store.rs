//! The durable record of runtime configuration: one file per version
//! under `<data_dir>/config/versions/` (written to a temp file, fsynced,
//! renamed, directory fsynced) and the append-only `<data_dir>/audit.log`
//! (one JSON line per change, rollback or refused attempt, fdatasynced
//! before the admin API answers).
//!
//! A version file holds the whole config, secrets included (like
//! `engine.toml` itself: the data dir must be private; files are created
//! with mode 0600). The audit log never holds a secret.

use std::fs;
use std::io::{self, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use esh3ar_shards::recovery::ensure_dir;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Versions kept on disk and in memory; older ones are deleted (and can
/// no longer be rolled back to).
pub const VERSIONS_KEPT_MAX: usize = 1000;

/// What `GET /v1/config/versions` lists about a version.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VersionMeta {
    pub version: u64,
    /// Unix ms when it was made.
    pub at_ms: u64,
    /// `admin`, a named admin token, or `file` (startup or SIGHUP).
    pub actor: String,
    /// `PUT /v1/config from 127.0.0.1:5555`, `rollback to 3`, `SIGHUP`, `startup`.
    pub source: String,
    /// The changed keys, secrets redacted.
    pub summary: String,
    /// SHA-256 of the config file layers current when this version was made.
    pub file_hash: String,
}

/// A stored version: its metadata and the whole config (with secrets).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredVersion {
    #[serde(flatten)]
    pub meta: VersionMeta,
    pub config: Value,
}

/// The versions directory and the audit log of one data dir.
pub struct Store {
    dir: PathBuf,
    audit: Option<fs::File>,
    versions: Vec<StoredVersion>,
}

fn version_path(dir: &Path, v: u64) -> PathBuf {
    dir.join(format!("v-{v:020}.json"))
}

/// The versions stored under `data_dir`, oldest first (read-only).
pub fn read_versions(data_dir: &Path) -> io::Result<Vec<StoredVersion>> {
    let dir = data_dir.join("config").join("versions");
    let mut versions = Vec::new();
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(versions),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let path = entry?.path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if !(name.starts_with("v-") && name.ends_with(".json")) {
            continue; // a `.tmp` left by a crash before its rename
        }
        let text = fs::read(&path)?;
        let v: StoredVersion = serde_json::from_slice(&text)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{} is damaged: {e}", path.display())))?;
        versions.push(v);
    }
    versions.sort_by_key(|v| v.meta.version);
    Ok(versions)
}

impl Store {
    /// Opens (creating) the store of `data_dir` and its audit log.
    pub fn open(data_dir: &Path) -> io::Result<Store> {
        let dir = data_dir.join("config").join("versions");
        ensure_dir(&dir)?;
        let versions = read_versions(data_dir)?;
        let audit = fs::OpenOptions::new().create(true).append(true).mode(0o600).open(data_dir.join("audit.log"))?;
        Ok(Store { dir, audit: Some(audit), versions })
    }

    /// The newest version.
    pub fn latest(&self) -> Option<&StoredVersion> {
        self.versions.last()
    }

    /// Version `v`, if still kept.
    pub fn get(&self, v: u64) -> Option<&StoredVersion> {
        self.versions.iter().find(|s| s.meta.version == v)
    }

    /// Every kept version's metadata, oldest first.
    pub fn metas(&self) -> impl Iterator<Item = &VersionMeta> {
        self.versions.iter().map(|v| &v.meta)
    }

    /// Stores a new version durably (temp file, fsync, rename, dir fsync),
    /// then forgets the oldest beyond [`VERSIONS_KEPT_MAX`].
    pub fn append(&mut self, version: StoredVersion) -> io::Result<()> {
        let bytes = serde_json::to_vec(&version).map_err(io::Error::other)?;
        let path = version_path(&self.dir, version.meta.version);
        let tmp = path.with_extension("json.tmp");
        {
            let mut f = fs::OpenOptions::new().create(true).truncate(true).write(true).mode(0o600).open(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
        }
        fs::rename(&tmp, &path)?;
        fs::File::open(&self.dir)?.sync_all()?;
        self.versions.push(version);
        while self.versions.len() > VERSIONS_KEPT_MAX {
            let old = self.versions.remove(0);
            let _ = fs::remove_file(version_path(&self.dir, old.meta.version));
        }
        Ok(())
    }

    /// Appends one JSON line to the audit log and fdatasyncs it.
    pub fn audit(&mut self, line: &Value) -> io::Result<()> {
        let Some(f) = self.audit.as_mut() else { return Err(io::Error::other("audit log not open")) };
        let mut bytes = serde_json::to_vec(line).map_err(io::Error::other)?;
        bytes.push(b'\n');
        f.write_all(&bytes)?;
        f.sync_data()
    }
}
