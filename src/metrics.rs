//! Metrics: what each shard counts (plain `Cell`s it alone touches) and how
//! a scrape gathers them.
//!
//! A shard's [`ShardMetrics`] lives in its `Shard` and is bumped on the hot
//! path with a non-atomic add. `GET /metrics` (and the live dashboard) runs
//! on shard 0: [`gather`] copies its own [`ShardSnapshot`] and asks every
//! other shard for theirs over the mesh (`MeshMsg::MetricsGet`, answered
//! with a boxed snapshot), so nothing is shared between threads but the
//! copy. Every label set is fixed at startup (routes, codes, statuses,
//! priorities, configured clients, shards, configured webhook targets): a
//! scrape costs the same whatever the traffic, and no label ever holds a
//! user or message id. The text is written by [`crate::metrics_text`].

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use esh3ar_shards::histogram::{Histogram, HistogramSnapshot, LATENCY_BOUNDS_SECONDS};
use esh3ar_shards::index::MessageMeta;
use esh3ar_shards::{Priority, Status};

use crate::mesh_msg::MeshMsg;
use crate::shard::Shard;

/// The `route` label of `esh3ar_http_requests_total`, by [`HttpRoute`].
pub const ROUTES: [&str; 5] = ["/v1/messages", "/v1/messages/batch", "/v1/messages/{id}", "/v1/events", "other"];

/// The business API's routes, as counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpRoute {
    Send = 0,
    Batch = 1,
    Status = 2,
    Events = 3,
    /// Unknown paths, and requests refused before routing (framing errors).
    Other = 4,
}

/// The status codes the business listener answers; anything else is counted
/// as `code="other"` (there is none today).
pub const CODES: [u16; 16] = [200, 202, 400, 401, 404, 405, 408, 409, 411, 413, 415, 422, 429, 431, 500, 503];
/// Index of `code="other"`.
const CODE_OTHER: usize = CODES.len();

fn code_index(code: u16) -> usize {
    CODES.iter().position(|&c| c == code).unwrap_or(CODE_OTHER)
}

/// The `code` label of slot `i`.
pub fn code_label(i: usize) -> String {
    CODES.get(i).map_or_else(|| "other".to_owned(), u16::to_string)
}

/// The statuses of `esh3ar_messages_total{status}`, indexed by `Status as usize`.
pub const STATUSES: [Status; 6] =
    [Status::Accepted, Status::Delivered, Status::Acked, Status::Expired, Status::Failed, Status::Rejected];

/// The priorities of `esh3ar_shed_total{priority}`, indexed by `Priority as usize`.
pub const PRIORITIES: [Priority; 3] = [Priority::High, Priority::Normal, Priority::Low];

/// What one shard counts. Touched by its own thread only.
pub struct ShardMetrics {
    /// `ROUTES.len() × (CODES.len() + 1)` counters.
    http: Box<[Cell<u64>]>,
    accept: Histogram,
    delivery: Histogram,
    ack: Histogram,
    messages: [Cell<u64>; STATUSES.len()],
    shed: [Cell<u64>; PRIORITIES.len()],
    /// Per client, by its index in the `ClientTable` (stable across runtime
    /// config versions; grows when a client is added).
    rate_limited: RefCell<Vec<u64>>,
}

fn bump(c: &Cell<u64>, n: u64) {
    c.set(c.get() + n);
}

impl ShardMetrics {
    /// Counters for an engine with `clients` configured clients.
    pub fn new(clients: usize) -> ShardMetrics {
        ShardMetrics {
            http: (0..ROUTES.len() * (CODES.len() + 1)).map(|_| Cell::new(0)).collect(),
            accept: Histogram::new(LATENCY_BOUNDS_SECONDS),
            delivery: Histogram::new(LATENCY_BOUNDS_SECONDS),
            ack: Histogram::new(LATENCY_BOUNDS_SECONDS),
            messages: Default::default(),
            shed: Default::default(),
            rate_limited: RefCell::new(vec![0; clients]),
        }
    }

    /// One answer of the business listener.
    pub fn http_answer(&self, route: HttpRoute, status: u16) {
        bump(&self.http[route as usize * (CODES.len() + 1) + code_index(status)], 1);
    }

    /// A `202` written `seconds` after its request was read.
    pub fn accepted_in(&self, seconds: f64) {
        self.accept.observe(seconds);
    }

    /// `n` messages journaled with `status` (on their home shard).
    pub fn messages(&self, status: Status, n: u64) {
        bump(&self.messages[status as usize], n);
    }

    /// A status change journaled on the home shard at `at_ms`: counts it,
    /// and times a first delivery (since acceptance) or an ack (since the
    /// last delivery) from the message as it was before the change.
    pub fn status_change(&self, status: Status, before: StatusTiming, at_ms: u64) {
        self.messages(status, 1);
        let since = |from_ms: u64| at_ms.saturating_sub(from_ms) as f64 / 1000.0;
        match (status, before) {
            (Status::Delivered, StatusTiming::FirstDelivery { accepted_at_ms }) => {
                self.delivery.observe(since(accepted_at_ms))
            }
            (Status::Acked, StatusTiming::Delivered { delivered_at_ms }) => self.ack.observe(since(delivered_at_ms)),
            _ => {}
        }
    }

    /// A message of `priority` shed under memory pressure.
    pub fn shed(&self, priority: Priority) {
        bump(&self.shed[priority as usize], 1);
    }

    /// A request of client `client` refused with `429`. A client added at
    /// runtime grows the table (bounded by the configured clients).
    pub fn rate_limited(&self, client: u32) {
        let mut counts = self.rate_limited.borrow_mut();
        let i = client as usize;
        if counts.len() <= i {
            counts.resize(i + 1, 0);
        }
        counts[i] += 1;
    }
}

/// What a status change is timed from: the message before the change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusTiming {
    /// Never delivered yet: a delivery now is its first.
    FirstDelivery { accepted_at_ms: u64 },
    /// Delivered and not settled: an ack now ends it.
    Delivered { delivered_at_ms: u64 },
    /// Settled, unknown, or nothing to time.
    Untimed,
}

impl StatusTiming {
    /// Read from the index entry before the change is applied.
    pub fn of(meta: Option<&MessageMeta>) -> StatusTiming {
        match meta {
            Some(m) if m.status.is_settled() => StatusTiming::Untimed,
            Some(m) if m.attempts == 0 => StatusTiming::FirstDelivery { accepted_at_ms: m.accepted_at_ms },
            Some(m) if m.delivered_at_ms > 0 => StatusTiming::Delivered { delivered_at_ms: m.delivered_at_ms },
            _ => StatusTiming::Untimed,
        }
    }
}

/// One shard's metrics at one moment, sendable to shard 0.
#[derive(Debug, Clone)]
pub struct ShardSnapshot {
    pub shard: usize,
    pub http: Vec<u64>,
    pub accept: HistogramSnapshot,
    pub delivery: HistogramSnapshot,
    pub ack: HistogramSnapshot,
    pub messages: Vec<u64>,
    pub shed: Vec<u64>,
    pub rate_limited: Vec<u64>,
    pub fsync: HistogramSnapshot,
    pub commit_records: HistogramSnapshot,
    pub journal_bytes: u64,
    pub pending: u64,
    pub websockets: u64,
    pub business_connections: u64,
    pub memory_used_ratio: f64,
    pub dead_letters: u64,
    /// Offline backlog: messages in the cold store (estimate), moved there
    /// and brought back since start, and the store's bytes on disk.
    pub cold: u64,
    pub spilled_total: u64,
    pub restored_total: u64,
    pub cold_disk_bytes: u64,
    /// The journal refuses new messages for want of disk space.
    pub storage_full: bool,
    /// The runtime config version this shard has installed.
    pub config_version: u64,
}

/// This shard's snapshot (gauges read now).
pub fn snapshot_local(shard: &Shard) -> ShardSnapshot {
    let m = shard.metrics();
    let get = |cells: &[Cell<u64>]| cells.iter().map(Cell::get).collect::<Vec<_>>();
    let journal = shard.journal().stats();
    let (pending, dead_letters) = {
        let index = shard.index().borrow();
        (index.pending_messages() as u64, index.dead_events() as u64)
    };
    ShardSnapshot {
        shard: shard.id(),
        http: get(&m.http),
        accept: m.accept.snapshot(),
        delivery: m.delivery.snapshot(),
        ack: m.ack.snapshot(),
        messages: get(&m.messages),
        shed: get(&m.shed),
        rate_limited: m.rate_limited.borrow().clone(),
        fsync: journal.fsync_seconds.snapshot(),
        commit_records: journal.commit_records.snapshot(),
        journal_bytes: journal.bytes_written.get(),
        pending,
        websockets: shard.sessions().len() as u64,
        business_connections: shard.stats().connections.get(),
        memory_used_ratio: shard.pressure_percent() as f64 / 100.0,
        dead_letters,
        cold: shard.backlog().cold(),
        spilled_total: shard.backlog().spilled_total(),
        restored_total: shard.backlog().restored_total(),
        cold_disk_bytes: shard.backlog().disk_bytes(),
        storage_full: shard.journal().storage_full(),
        config_version: shard.config_version(),
    }
}

/// Every shard's snapshot, in shard order; None if a shard did not answer
/// within `engine.mesh_reply_timeout_ms`.
pub async fn gather(shard: &Rc<Shard>) -> Option<Vec<ShardSnapshot>> {
    let mut all = Vec::with_capacity(shard.count());
    for s in 0..shard.count() {
        if s == shard.id() {
            all.push(snapshot_local(shard));
            continue;
        }
        match shard.ask(s, |req| MeshMsg::MetricsGet { from: shard.id() as u16, req }).await {
            Ok(MeshMsg::Metrics { snapshot, .. }) => all.push(*snapshot),
            _ => return None,
        }
    }
    Some(all)
}

/// The process as the kernel sees it (`/proc/self`): resident bytes, open
/// descriptors, CPU seconds; and how full the data_dir's filesystem is.
/// Small blocking reads of procfs and one statvfs, on the admin path only.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessStats {
    pub resident_bytes: u64,
    pub open_fds: u64,
    pub cpu_seconds: f64,
    /// Used fraction of the data_dir's filesystem, as `df` counts it.
    pub disk_used_ratio: f64,
}

impl ProcessStats {
    /// Reads `/proc/self` and the filesystem of `data_dir`; a field that
    /// cannot be read stays 0.
    pub fn read(data_dir: &std::path::Path) -> ProcessStats {
        // SAFETY: sysconf only reads a system constant.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64;
        // SAFETY: as above.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let resident_pages = std::fs::read_to_string("/proc/self/statm")
            .ok()
            .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
            .unwrap_or(0);
        let cpu_ticks = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|s| {
                // Fields after the command name (which may hold spaces): utime is 14th, stime 15th.
                let rest = &s[s.rfind(')')? + 2..];
                let f: Vec<&str> = rest.split_whitespace().collect();
                Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
            })
            .unwrap_or(0);
        let open_fds = std::fs::read_dir("/proc/self/fd").map(|d| d.count() as u64).unwrap_or(0);
        ProcessStats {
            resident_bytes: resident_pages * page,
            open_fds,
            cpu_seconds: cpu_ticks as f64 / ticks,
            disk_used_ratio: disk_used_ratio(data_dir).unwrap_or(0.0),
        }
    }
}

/// `(blocks - free) / (blocks - free + available)`, the `Use%` of `df`.
fn disk_used_ratio(dir: &std::path::Path) -> Option<f64> {
    let st = statvfs(dir)?;
    let used = st.f_blocks.saturating_sub(st.f_bfree) as f64;
    let total = used + st.f_bavail as f64;
    (total > 0.0).then(|| used / total)
}

/// Bytes of `dir`'s file system an unprivileged writer may still use (`df`'s `Avail`).
pub fn available_bytes(dir: &std::path::Path) -> Option<u64> {
    let st = statvfs(dir)?;
    Some(st.f_bavail.saturating_mul(st.f_frsize))
}

fn statvfs(dir: &std::path::Path) -> Option<libc::statvfs> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: an all-zero statvfs is a valid value of this plain C struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is a NUL-terminated string and `st` a valid, writable statvfs.
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(st)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_has_a_slot_and_unknown_ones_share_other() {
        assert_eq!(code_index(202), 1);
        assert_eq!(code_label(code_index(429)), "429");
        assert_eq!(code_label(code_index(418)), "other");
        let m = ShardMetrics::new(2);
        m.http_answer(HttpRoute::Other, 418);
        m.http_answer(HttpRoute::Send, 202);
        assert_eq!(m.http.iter().map(Cell::get).sum::<u64>(), 2);
        m.rate_limited(7); // a client added at runtime: the table grows
        assert_eq!(m.rate_limited.borrow().as_slice(), &[0, 0, 0, 0, 0, 0, 0, 1]);
    }

    #[test]
    fn process_stats_are_read_from_procfs() {
        let p = ProcessStats::read(std::path::Path::new("/"));
        assert!(p.resident_bytes > 0 && p.open_fds > 0, "{p:?}");
        assert!(p.disk_used_ratio > 0.0 && p.disk_used_ratio <= 1.0, "{p:?}");
    }
}
