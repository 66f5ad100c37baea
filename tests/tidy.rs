//! Architecture invariants, checked by reading the source tree (the idea of
//! rust-analyzer's tidy tests). docs/ARCHITECTURE.md ("Architecture
//! invariants") states each one; these keep them true.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every `.rs` file under `dir`, recursively, sorted.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("cannot read {}: {e}", d.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// The code of a file without its comments (line comments and doc
/// comments), with 1-based line numbers: prose may name what code must not use.
fn code_lines(path: &Path) -> Vec<(usize, String)> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    text.lines()
        .enumerate()
        .map(|(i, line)| (i + 1, line.split("//").next().unwrap_or("").to_owned()))
        .filter(|(_, code)| !code.trim().is_empty())
        .collect()
}

/// `file:line: code` for every code line of `files` containing one of `needles`.
fn find(files: &[PathBuf], needles: &[&str]) -> Vec<String> {
    let mut hits = Vec::new();
    for f in files {
        for (n, code) in code_lines(f) {
            if needles.iter().any(|needle| code.contains(needle)) {
                hits.push(format!("{}:{n}: {}", f.strip_prefix(root()).unwrap_or(f).display(), code.trim()));
            }
        }
    }
    hits
}

/// The scanner itself finds what it looks for (so the checks below cannot
/// pass by reading nothing).
#[test]
fn the_scanner_sees_code_and_skips_comments() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("x.rs");
    std::fs::write(&f, "// uses std::net in prose\nuse std::net::TcpStream; // real\n").unwrap();
    let hits = find(&[f], &["std::net"]);
    assert_eq!(hits.len(), 1, "{hits:?}");
    assert!(hits[0].contains(":2:"), "{hits:?}");
    assert!(rust_files(&root().join("shards/src")).len() >= 5);
    assert!(rust_files(&root().join("src")).len() >= 10);
}

/// `shards/` is what one core owns, testable without sockets: it opens none.
#[test]
fn shards_crate_does_no_socket_io() {
    let files = rust_files(&root().join("shards/src"));
    let hits = find(&files, &["glommio::net", "std::net", "socket2", "TcpStream", "TcpListener", "UdpSocket"]);
    assert!(hits.is_empty(), "shards/ must not touch sockets:\n{}", hits.join("\n"));
    let manifest = std::fs::read_to_string(root().join("shards/Cargo.toml")).unwrap();
    assert!(!manifest.contains("socket2"), "shards/Cargo.toml must not depend on socket2");
}

/// `shard.rs` holds a shard's state; the protocols sit above it
/// (`dispatch.rs` routes mesh messages to them).
#[test]
fn shard_state_imports_no_protocol() {
    let files = [root().join("src/shard.rs")];
    let mut needles = Vec::new();
    for m in ["business", "http", "mobile", "admin"] {
        for prefix in ["crate::", "super::", "esh3ar::"] {
            needles.push(format!("{prefix}{m}"));
        }
        // `use crate::{business, ...}` and friends.
        needles.push(format!("{{{m}"));
        needles.push(format!(" {m},"));
        needles.push(format!(" {m}}}"));
    }
    let needles: Vec<&str> = needles.iter().map(String::as_str).collect();
    let hits = find(&files, &needles);
    assert!(hits.is_empty(), "src/shard.rs must not import a protocol module:\n{}", hits.join("\n"));
}

/// Nothing on the message path takes a lock: per-shard state is
/// `Rc`/`RefCell`, cross-shard traffic is mesh messages. A lock is allowed
/// only in startup/shutdown code, listed here with the reason.
#[test]
fn no_lock_on_the_message_path() {
    const ALLOWED: &[(&str, &str)] = &[(
        "src/server.rs",
        "startup only: each executor takes its seed from a list once; startup errors are collected for the exit message",
    )];
    let mut files = rust_files(&root().join("src"));
    files.extend(rust_files(&root().join("shards/src")));
    let hits = find(&files, &["Mutex", "RwLock"]);
    let allowed = |hit: &str| ALLOWED.iter().any(|(file, _)| hit.starts_with(&format!("{file}:")));
    let bad: Vec<&String> = hits.iter().filter(|h| !allowed(h)).collect();
    assert!(
        bad.is_empty(),
        "locks outside the allowlist:\n{}",
        bad.iter().map(|s| s.as_str()).collect::<Vec<_>>().join("\n")
    );
    // The allowlist stays honest: every entry is still needed.
    for (file, reason) in ALLOWED {
        assert!(
            hits.iter().any(|h| h.starts_with(&format!("{file}:"))),
            "{file} holds no lock any more ({reason}): drop it from the list"
        );
    }
}
