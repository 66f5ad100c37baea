//! `GET /v1/events?after=&limit=&wait=`: the event feed of a client with
//! `event_feed = true` (docs/API.md, "Event feed").
//!
//! Each shard keeps the events born on it (`esh3ar_shards::feed`); a read
//! asks every shard for the client's events after its position in the
//! cursor and merges them by event timestamp (ties by shard), keeping each
//! shard's own order. The cursor is every shard's position, so a page never
//! skips an event another shard had not yet written, and reading from the
//! same cursor again returns the same events in the same order while they
//! are retained. An empty page long-polls, looking again every
//! [`POLL_EVERY`], for up to `wait` seconds.

use std::time::{Duration, Instant};

use esh3ar_shards::feed::{FeedEvent, FeedPos};

use super::{ApiError, Authed, Refusal, Reply};
use crate::http::conn::Request;
use crate::mesh_msg::FeedPage;
use crate::shard::{AppendRefusal, MeshMsg, Shard};

/// Most events one page holds.
pub const EVENTS_LIMIT_MAX: usize = 1000;
/// Events per page when `limit` is absent.
pub const EVENTS_LIMIT_DEFAULT: usize = 100;
/// Longest long-poll, in seconds.
pub const EVENTS_WAIT_MAX_SECONDS: u64 = 30;
/// How often an empty long-poll looks again.
const POLL_EVERY: Duration = Duration::from_millis(50);

/// A position per shard. Text form: `<file>-<offset>` in hex per shard,
/// joined by `.`; opaque to clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor(pub Vec<FeedPos>);

impl Cursor {
    /// The start of every shard's feed.
    pub fn start(shards: usize) -> Cursor {
        Cursor(vec![FeedPos::default(); shards])
    }

    /// Parses a cursor of an engine with `shards` shards.
    pub fn parse(text: &[u8], shards: usize) -> Option<Cursor> {
        let text = std::str::from_utf8(text).ok()?;
        let positions: Option<Vec<FeedPos>> = text
            .split('.')
            .map(|p| {
                let (file, offset) = p.split_once('-')?;
                Some(FeedPos {
                    file: u64::from_str_radix(file, 16).ok()?,
                    offset: u64::from_str_radix(offset, 16).ok()?,
                })
            })
            .collect();
        let positions = positions?;
        (positions.len() == shards).then_some(Cursor(positions))
    }

    /// The text form.
    pub fn encode(&self) -> String {
        let parts: Vec<String> = self.0.iter().map(|p| format!("{:x}-{:x}", p.file, p.offset)).collect();
        parts.join(".")
    }
}

/// The `"timestamp"` of a feed entry (0 if it has none), for merging.
fn timestamp(entry: &[u8]) -> u64 {
    const KEY: &[u8] = b"\"timestamp\":";
    let Some(at) = entry.windows(KEY.len()).position(|w| w == KEY) else { return 0 };
    entry[at + KEY.len()..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .fold(0u64, |n, &d| n.saturating_mul(10).saturating_add(u64::from(d - b'0')))
}

/// Merges per-shard pages (each in its shard's order) into at most `limit`
/// events by timestamp, ties by shard; returns them and the cursor after
/// them. A shard whose whole page was taken moves to the position it
/// reported (which may skip files that held nothing).
pub fn merge(pages: Vec<(Vec<FeedEvent>, FeedPos)>, after: &Cursor, limit: usize) -> (Vec<FeedEvent>, Cursor) {
    let mut next = after.clone();
    let mut heads = vec![0usize; pages.len()];
    // Each entry's timestamp, read once (not once per comparison).
    let stamps: Vec<Vec<u64>> =
        pages.iter().map(|(events, _)| events.iter().map(|e| timestamp(&e.json)).collect()).collect();
    let mut out = Vec::new();
    while out.len() < limit {
        let pick = (0..pages.len()).filter(|&s| heads[s] < pages[s].0.len()).min_by_key(|&s| (stamps[s][heads[s]], s));
        let Some(s) = pick else { break };
        let e = pages[s].0[heads[s]].clone();
        next.0[s] = e.pos;
        heads[s] += 1;
        out.push(e);
    }
    for (s, (events, pos)) in pages.iter().enumerate() {
        if heads[s] == events.len() {
            next.0[s] = next.0[s].max(*pos);
        }
    }
    (out, next)
}

/// Reads one page of `client`'s events from every shard, without waiting.
async fn read_page(
    shard: &Shard,
    client: u32,
    after: &Cursor,
    limit: usize,
) -> Result<(Vec<FeedEvent>, Cursor), ApiError> {
    let id = shard.clients().id(client).to_owned();
    let mut pages = Vec::with_capacity(shard.count());
    for (s, &pos) in after.0.iter().enumerate() {
        let page = if s == shard.id() {
            read_local(shard, &id, pos, limit).await
        } else {
            let (from, limit) = (shard.id() as u16, limit as u32);
            match shard.ask(s, |req| MeshMsg::FeedRead { from, req, client, after: pos, limit }).await {
                Ok(MeshMsg::FeedPageRead { page, .. }) => page.map(|p| *p),
                Ok(_) => return Err(ApiError::refusal(Refusal::Home(AppendRefusal::ShuttingDown))),
                Err(e) => return Err(ApiError::refusal(e.into())),
            }
        };
        match page {
            Ok(p) => pages.push((p.events, p.next)),
            Err(()) => {
                return Err(ApiError::new(503, "storage_unavailable", "the event feed cannot be read; retry later"))
            }
        }
    }
    Ok(merge(pages, after, limit))
}

/// This shard's page of `client`'s events after `pos` (also the mesh
/// answer to `FeedRead`). A disk error is logged here and reported as Err.
pub async fn read_local(shard: &Shard, client: &str, pos: FeedPos, limit: usize) -> Result<FeedPage, ()> {
    match shard.feed().read(client, pos, limit).await {
        Ok((events, next)) => Ok(FeedPage { events, next }),
        Err(e) => {
            tracing::error!(shard = shard.id(), client, error = %e, "event feed read failed");
            Err(())
        }
    }
}

/// Answers `GET /v1/events`.
pub(super) async fn get_events(shard: &Shard, req: &Request<'_>, authed: Authed) -> Result<Reply, ApiError> {
    if shard.clients().get(authed.client).feed.is_none() {
        return Err(ApiError::new(
            409,
            "event_feed_disabled",
            "this client has no event feed (its events go to its webhook, or event_feed is not set)",
        ));
    }
    let after = match req.query("after") {
        None | Some(b"") => Cursor::start(shard.count()),
        Some(raw) => Cursor::parse(raw, shard.count())
            .ok_or_else(|| ApiError::invalid("`after` is not a cursor this engine returned as `next`"))?,
    };
    let limit = match req.query("limit") {
        None => EVENTS_LIMIT_DEFAULT,
        Some(raw) => std::str::from_utf8(raw)
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
            .filter(|n| (1..=EVENTS_LIMIT_MAX).contains(n))
            .ok_or_else(|| ApiError::invalid(format!("`limit` must be an integer from 1 to {EVENTS_LIMIT_MAX}")))?,
    };
    let wait = match req.query("wait") {
        None => 0,
        Some(raw) => std::str::from_utf8(raw)
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .filter(|n| *n <= EVENTS_WAIT_MAX_SECONDS)
            .ok_or_else(|| {
                ApiError::invalid(format!("`wait` must be an integer from 0 to {EVENTS_WAIT_MAX_SECONDS} (seconds)"))
            })?,
    };
    let deadline = Instant::now() + Duration::from_secs(wait);
    let (events, next) = loop {
        let (events, next) = read_page(shard, authed.client, &after, limit).await?;
        if !events.is_empty() || Instant::now() >= deadline || shard.shutdown().is_set() {
            break (events, next);
        }
        glommio::timer::sleep(POLL_EVERY.min(deadline - Instant::now())).await;
    };
    let mut body = Vec::with_capacity(64 + events.iter().map(|e| e.json.len() + 1).sum::<usize>());
    body.extend_from_slice(b"{\"events\":[");
    for (i, e) in events.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(&e.json);
    }
    body.extend_from_slice(b"],\"next\":\"");
    body.extend_from_slice(next.encode().as_bytes());
    body.extend_from_slice(b"\"}");
    Ok(Reply { status: 200, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(file: u64, offset: u64, ts: u64) -> FeedEvent {
        FeedEvent { pos: FeedPos { file, offset }, json: format!("{{\"id\":\"e\",\"timestamp\":{ts}}}").into_bytes() }
    }

    #[test]
    fn cursors_roundtrip_and_refuse_junk() {
        let c = Cursor(vec![FeedPos { file: 1_764_000_000_000, offset: 4096 }, FeedPos::default()]);
        assert_eq!(Cursor::parse(c.encode().as_bytes(), 2), Some(c.clone()));
        assert_eq!(Cursor::parse(c.encode().as_bytes(), 3), None, "another shard count");
        for junk in ["", "x", "1-2", "1-2.3", "1-2.3-z", "-.-"] {
            assert_eq!(Cursor::parse(junk.as_bytes(), 2), None, "{junk}");
        }
        assert_eq!(timestamp(b"{\"id\":\"e\",\"type\":\"message.acked\",\"timestamp\":1234,\"data\":{}}"), 1234);
    }

    #[test]
    fn merge_interleaves_by_time_keeps_shard_order_and_never_skips() {
        let after = Cursor::start(2);
        let a = (vec![ev(1, 10, 100), ev(1, 20, 300), ev(1, 30, 500)], FeedPos { file: 1, offset: 30 });
        let b = (vec![ev(2, 10, 200), ev(2, 20, 400)], FeedPos { file: 9, offset: 0 });
        let (out, next) = merge(vec![a.clone(), b.clone()], &after, 3);
        let ts: Vec<u64> = out.iter().map(|e| timestamp(&e.json)).collect();
        assert_eq!(ts, [100, 200, 300]);
        // Shard 0 resumes after its second event, shard 1 after its first:
        // the events not returned are read again next time.
        assert_eq!(next.0, [FeedPos { file: 1, offset: 20 }, FeedPos { file: 2, offset: 10 }]);
        let (all, next) = merge(vec![a, b], &after, 10);
        assert_eq!(all.len(), 5);
        assert_eq!(next.0, [FeedPos { file: 1, offset: 30 }, FeedPos { file: 9, offset: 0 }]);
    }
}
