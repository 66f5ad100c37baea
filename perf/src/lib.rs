//! esh3ar-perf: the bundled load generator and benchmark harness.
//!
//! Thread-per-core (glommio, one executor per generator core) so the
//! generator is not the bottleneck. It drives esh3ar through its public
//! protocols (HTTP business API, WebSocket mobile API), a bare `ceiling`
//! HTTP server on the same runtime, and durable peers through their own
//! protocols (Redis Streams, NATS JetStream, RabbitMQ quorum queues), with
//! the same load shapes, and reports throughput and latency percentiles
//! from HdrHistogram. docs/PERFORMANCE.md holds the latest figures.

pub mod backlog;
pub mod ceiling;
pub mod cli;
pub mod clock;
pub mod disk;
pub mod engine;
pub mod fallback;
pub mod http_client;
pub mod http_server;
pub mod net;
pub mod payload;
pub mod peers;
pub mod plot;
pub mod receipts;
pub mod replay;
pub mod report;
pub mod scenario;
pub mod stats;
pub mod ws;
