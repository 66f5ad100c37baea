//! esh3ar: a durable, thread-per-core messaging engine.
//!
//! `src/` is the shell around the [`esh3ar_shards`] core: configuration,
//! CLI, runtime bootstrap ([`server`]), and the protocols ([`http`],
//! [`business`], [`admin`]). docs/ARCHITECTURE.md is the map.

pub mod accept;
pub mod admin;
pub mod admin_config;
pub mod backlog;
pub mod business;
pub mod clients;
pub mod clock;
pub mod config;
pub mod config_errors;
pub mod config_layers;
pub mod dashboard;
pub mod delivery;
pub mod disk_room;
pub mod dispatch;
pub mod fallback;
pub mod http;
pub mod huge_alloc;
pub mod idempotency;
pub mod journal_cli;
pub mod mesh;
pub mod mesh_msg;
pub mod metrics;
pub mod metrics_text;
pub mod mobile;
pub mod notify;
pub mod outbound;
pub mod pressure;
pub mod receipts;
pub mod runtime_config;
pub mod server;
pub mod shard;
pub mod shutdown;
pub mod token;
pub mod users;

/// The home shard of a recipient user.
pub fn route(user: &str, shards: usize) -> usize {
    esh3ar_shards::routing::home_shard(user.as_bytes(), shards)
}
