//! Receipts: telling the sender what became of each message, from the
//! journal's transactional outbox to the offload thread and back.
//!
//! An event is born with the status change it reports: when a message of a
//! client with a webhook is first delivered, acked, expires, is rejected or
//! fails, the `Status` record that says so is journaled with `notify` set
//! ([`owes_event`]). The index keeps the event owed (and the message's
//! segments on disk) until an `Event` record settles it. This module's task
//! ([`run`], one per shard) hands owed events to the offload thread as
//! signed-webhook jobs, never waiting on it (`try_send`; a full queue is
//! retried on a tick), and journals what the thread reports: each failed
//! attempt, the delivery, or the dead letter after `webhooks.max_attempts`.
//! After a restart, recovery finds every event still owed and this task
//! sends it again with the same `webhook-id` (at least once; receivers
//! dedupe on it).
//!
//! Nothing here is on the ingest or delivery hot path: the records are
//! appended without waiting for their fdatasync (a lost `Event` record
//! means one more delivery of the same event, never a lost one).

use std::collections::{HashSet, VecDeque};
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use esh3ar_shards::id::TrackingId;
use esh3ar_shards::index::MessageIndex;
use esh3ar_shards::record::{EventChange, EventOutcome, Record, EVENT_ERROR_BYTES_MAX};
use esh3ar_shards::{Status, EVENT_STATUSES};
use futures_lite::StreamExt;

use crate::clock::now_ms;
use crate::http::json_string;
use crate::mesh_msg::DeadLetter;
use crate::outbound::{Job, JobSender, Report, ShardLink, TrySendError};
use crate::shard::Shard;

/// How often owed events that found the offload queue full are offered again.
const RETRY_HANDOVER: Duration = Duration::from_millis(100);

/// The status whose event is called `name` (`message.acked` → Acked).
pub fn event_status(name: &str) -> Option<Status> {
    EVENT_STATUSES.into_iter().find(|s| s.event_type() == Some(name))
}

/// The `webhook-id` of an event, stable across attempts and restarts; also
/// its id in the dead-letter queue: `evt_<tracking id>_<status>`.
pub fn event_id(id: TrackingId, status: Status) -> String {
    let mut s = String::with_capacity(32);
    s.push_str("evt_");
    s.push_str(&id.to_string_id());
    s.push('_');
    s.push_str(status.as_str());
    s
}

/// Parses an [`event_id`].
pub fn parse_event_id(s: &str) -> Option<(TrackingId, Status)> {
    let rest = s.strip_prefix("evt_")?;
    let (id, status) = rest.split_once('_')?;
    let id = TrackingId::decode(id.as_bytes())?;
    let status = EVENT_STATUSES.into_iter().find(|st| st.as_str() == status)?;
    Some((id, status))
}

/// Parses a dead-letter id: an event's ([`event_id`]) or a failed
/// delivery's (`dlv_<message id>`, given as status `Accepted`, which owes
/// no event).
pub fn parse_dead_letter_id(s: &str) -> Option<(TrackingId, Status)> {
    match crate::fallback::parse_dead_letter_id(s) {
        Some(id) => Some((id, Status::Accepted)),
        None => parse_event_id(s),
    }
}

/// Whether a change of message `seq` to `status` owes its sender an event:
/// the client has a webhook or a feed that wants it, and (for `delivered`)
/// it is the first delivery.
pub fn owes_event(shard: &Shard, index: &MessageIndex, seq: u64, status: Status) -> bool {
    let Some(meta) = index.get(seq) else { return false };
    if status == Status::Delivered && meta.attempts > 0 {
        return false;
    }
    let clients = shard.clients();
    let Some(client) = clients.index_of(&meta.client) else { return false };
    let client = clients.get(client);
    let wanted = client.webhook.map(|w| w.events).or(client.feed).unwrap_or(0);
    wanted & status.event_bit() != 0
}

/// The event's JSON body: `{"type", "timestamp", "data"}`, where `data` is
/// what `GET /v1/messages/{id}` returns now, plus `reason` where there is one.
pub fn event_body(shard: &Shard, seq: u64, status: Status, since_ms: u64) -> Option<Vec<u8>> {
    let index = shard.index().borrow();
    let meta = index.get(seq)?;
    let view = crate::mesh_msg::StatusView::of(meta, index.provider_message_id(seq));
    let data = crate::business::json::status_json(shard.tracking_id(seq), &view);
    let mut b = Vec::with_capacity(data.len() + 80);
    b.extend_from_slice(b"{\"type\":");
    json_string(&mut b, status.event_type()?);
    b.extend_from_slice(b",\"timestamp\":");
    b.extend_from_slice(itoa::Buffer::new().format(since_ms).as_bytes());
    b.extend_from_slice(b",\"data\":");
    b.extend_from_slice(&data);
    b.push(b'}');
    Some(b)
}

/// A job id: the message and which of its events.
fn job_id(seq: u64, status: Status) -> u64 {
    (seq << 3) | status as u64
}

fn job_event(job: u64) -> Option<(u64, Status)> {
    Some((job >> 3, Status::from_u8((job & 7) as u8)?))
}

/// An event's entry in the event feed: the webhook body with its id first,
/// `{"id", "type", "timestamp", "data"}`.
pub fn feed_entry(shard: &Shard, seq: u64, status: Status, since_ms: u64) -> Option<Vec<u8>> {
    let body = event_body(shard, seq, status, since_ms)?;
    let mut e = Vec::with_capacity(body.len() + 48);
    e.extend_from_slice(b"{\"id\":");
    json_string(&mut e, &event_id(shard.tracking_id(seq), status));
    e.push(b',');
    e.extend_from_slice(&body[1..]);
    Some(e)
}

/// How often the feed's expired files are looked for.
const FEED_EXPIRY_EVERY: Duration = Duration::from_secs(60);

/// An owed event on its way into the feed.
struct FeedItem {
    seq: u64,
    status: Status,
    attempts: u32,
    client: Rc<str>,
    entry: Vec<u8>,
}

/// What this shard's outbox task holds.
struct Outbox {
    shard: Rc<Shard>,
    jobs: JobSender,
    /// Owed events not yet handed over (the offload queue was full).
    waiting: VecDeque<(u64, Status)>,
    /// Handed over, no final report yet.
    in_flight: HashSet<u64>,
    /// Events of feed clients, to append to the feed next.
    feed: Vec<FeedItem>,
    /// The shard's fallback task: reports about its jobs go there.
    fallback: Option<Rc<crate::fallback::Fallbacks>>,
}

/// Runs the outbox of `shard` until shutdown: hands owed events over and
/// journals the reports about them.
pub async fn run(shard: Rc<Shard>, link: ShardLink, fallback: Option<Rc<crate::fallback::Fallbacks>>) {
    let ShardLink { jobs, mut reports } = link;
    let mut outbox = Outbox {
        shard: shard.clone(),
        jobs,
        waiting: VecDeque::new(),
        in_flight: HashSet::new(),
        feed: Vec::new(),
        fallback,
    };
    glommio::spawn_local(expire_feed(shard.clone())).detach();
    enum Wake {
        Report(Option<Report>),
        Fresh,
        Tick,
        Stop,
    }
    loop {
        let fresh = shard.index().borrow_mut().take_fresh_events();
        outbox.waiting.extend(fresh);
        outbox.hand_over();
        if !outbox.feed.is_empty() {
            // Appending awaits the disk, and a wake-up while it does would
            // be missed: look for fresh events (and ready reports) again
            // before sleeping.
            outbox.append_to_feed().await;
            while let Some(Some(r)) = futures_lite::future::poll_once(reports.next()).await {
                outbox.on_report(r);
            }
            continue;
        }
        let tick = !outbox.waiting.is_empty();
        let wake = futures_lite::future::or(
            futures_lite::future::or(async { Wake::Report(reports.next().await) }, async {
                shard.events_ready().notified().await;
                Wake::Fresh
            }),
            futures_lite::future::or(
                async {
                    if tick {
                        glommio::timer::sleep(RETRY_HANDOVER).await;
                    } else {
                        std::future::pending::<()>().await;
                    }
                    Wake::Tick
                },
                async {
                    shard.shutdown().wait().await;
                    Wake::Stop
                },
            ),
        )
        .await;
        match wake {
            Wake::Report(Some(r)) => outbox.on_report(r),
            Wake::Report(None) => {
                tracing::warn!(shard = shard.id(), "the webhook thread is gone; owed events wait for a restart");
                shard.shutdown().wait().await;
                return;
            }
            Wake::Fresh | Wake::Tick => {}
            Wake::Stop => return,
        }
    }
}

impl Outbox {
    /// Offers waiting events to the offload thread until its queue is full.
    fn hand_over(&mut self) {
        while let Some(&(seq, status)) = self.waiting.front() {
            let id = job_id(seq, status);
            let owed = self.shard.index().borrow().event(seq, status).filter(|e| e.dead_at_ms == 0).cloned();
            let Some(event) = owed else {
                self.waiting.pop_front(); // settled or dead meanwhile
                continue;
            };
            if self.in_flight.contains(&id) {
                self.waiting.pop_front();
                continue;
            }
            if let Some(item) = self.feed_item(seq, status, event.since_ms, event.attempts) {
                self.in_flight.insert(id);
                self.feed.push(item);
                self.waiting.pop_front();
                continue;
            }
            let Some(job) = self.job(seq, status, event.since_ms, event.attempts) else {
                self.waiting.pop_front();
                continue;
            };
            match self.jobs.try_send(job) {
                Ok(()) => {
                    self.in_flight.insert(id);
                    self.waiting.pop_front();
                }
                Err(TrySendError::Full(_)) => return,
                Err(TrySendError::Closed(_)) => return,
                Err(TrySendError::Invalid(j)) => {
                    tracing::error!(shard = self.shard.id(), webhook_id = j.webhook_id, "invalid webhook job dropped");
                    self.settle(seq, status, EventOutcome::Dropped, event.attempts, "invalid job");
                    self.waiting.pop_front();
                }
            }
        }
    }

    /// The feed entry of an owed event, if its client reads the feed.
    fn feed_item(&self, seq: u64, status: Status, since_ms: u64, attempts: u32) -> Option<FeedItem> {
        let client = {
            let index = self.shard.index().borrow();
            index.get(seq)?.client.clone()
        };
        let c = self.shard.clients().index_of(&client)?;
        self.shard.clients().get(c).feed?;
        let entry = feed_entry(&self.shard, seq, status, since_ms)?;
        Some(FeedItem { seq, status, attempts, client, entry })
    }

    /// Appends the collected feed events and, once they are durable,
    /// journals them delivered. On a disk error they wait for the next try.
    async fn append_to_feed(&mut self) {
        if self.feed.is_empty() {
            return;
        }
        let items = std::mem::take(&mut self.feed);
        let batch: Vec<(&str, &[u8])> = items.iter().map(|i| (&*i.client, i.entry.as_slice())).collect();
        let result = self.shard.feed().append(now_ms(), &batch).await;
        for i in &items {
            self.in_flight.remove(&job_id(i.seq, i.status));
        }
        match result {
            Ok(()) => {
                for i in &items {
                    self.settle(i.seq, i.status, EventOutcome::Delivered, i.attempts + 1, "");
                }
            }
            Err(e) => {
                tracing::error!(shard = self.shard.id(), error = %e, events = items.len(), "event feed append failed; retrying");
                self.waiting.extend(items.iter().map(|i| (i.seq, i.status)));
            }
        }
    }

    /// The job for an owed event; None (and the event dropped) if its client
    /// has no webhook any more.
    fn job(&self, seq: u64, status: Status, since_ms: u64, attempts: u32) -> Option<Job> {
        let client = {
            let index = self.shard.index().borrow();
            let meta = index.get(seq)?;
            self.shard.clients().index_of(&meta.client)
        };
        let webhook = client.and_then(|c| self.shard.clients().get(c).webhook);
        let Some(webhook) = webhook else {
            tracing::warn!(shard = self.shard.id(), seq, "dropping an owed event: its client has no webhook any more");
            self.settle(seq, status, EventOutcome::Dropped, attempts, "client has no webhook");
            return None;
        };
        let body = event_body(&self.shard, seq, status, since_ms)?;
        Some(Job {
            id: job_id(seq, status),
            shard: self.shard.id(),
            endpoint: webhook.endpoint,
            webhook_id: event_id(self.shard.tracking_id(seq), status),
            body: Bytes::from(body),
            attempts,
            not_before_unix_ms: 0,
            to: String::new(),
            yield_when_open: false,
        })
    }

    fn on_report(&mut self, report: Report) {
        if crate::fallback::is_fallback_job(report.job()) {
            if let Some(fallback) = &self.fallback {
                crate::fallback::on_report(fallback, report);
            }
            return;
        }
        let Some((seq, status)) = job_event(report.job()) else { return };
        match report {
            Report::Delivered { attempts, .. } => {
                self.in_flight.remove(&job_id(seq, status));
                self.settle(seq, status, EventOutcome::Delivered, attempts, "");
            }
            Report::Failed { attempts, error, .. } => {
                self.settle(seq, status, EventOutcome::AttemptFailed, attempts, &error.to_string());
            }
            Report::Exhausted { attempts, error, .. } => {
                self.in_flight.remove(&job_id(seq, status));
                let error = error.map_or_else(|| "attempts exhausted".to_owned(), |e| e.to_string());
                tracing::warn!(
                    shard = self.shard.id(),
                    event = event_id(self.shard.tracking_id(seq), status),
                    attempts,
                    error,
                    "webhook event moved to the dead-letter queue"
                );
                self.settle(seq, status, EventOutcome::DeadLettered, attempts, &error);
            }
            Report::Accepted { .. } => {} // provider jobs only (above)
        }
    }

    /// Journals a step of an owed event (without waiting for its fdatasync).
    fn settle(&self, seq: u64, status: Status, outcome: EventOutcome, attempts: u32, error: &str) {
        record_event(&self.shard, seq, status, outcome, attempts, error);
    }
}

/// Deletes the feed's expired files now and then, until shutdown.
async fn expire_feed(shard: Rc<Shard>) {
    loop {
        let removed = shard.feed().expire(now_ms());
        if removed > 0 {
            tracing::info!(shard = shard.id(), files = removed, "expired event feed files deleted");
        }
        let stop = futures_lite::future::or(
            async {
                glommio::timer::sleep(FEED_EXPIRY_EVERY).await;
                false
            },
            async {
                shard.shutdown().wait().await;
                true
            },
        )
        .await;
        if stop {
            return;
        }
    }
}

/// Appends an `Event` record for message `seq` (not waiting for durability).
/// Returns false if the journal refused it.
pub fn record_event(
    shard: &Shard,
    seq: u64,
    status: Status,
    outcome: EventOutcome,
    attempts: u32,
    error: &str,
) -> bool {
    let mut cut = error.len().min(EVENT_ERROR_BYTES_MAX);
    while !error.is_char_boundary(cut) {
        cut -= 1;
    }
    let record =
        Record::Event(EventChange { seq, event: status, outcome, attempts, at_ms: now_ms(), error: &error[..cut] });
    let mut index = shard.index().borrow_mut();
    shard.journal().append(&record, &mut index).is_ok()
}

/// This shard's dead letters after `after` (seq, status code), of `client`
/// only if set, at most `limit`, in (seq, status) order.
pub fn dead_letters_local(
    shard: &Shard,
    client: Option<&str>,
    after: Option<(u64, u8)>,
    limit: usize,
) -> Vec<DeadLetter> {
    let mut items = event_dead_letters_local(shard, client, after, limit);
    items.extend(delivery_dead_letters_local(shard, client, after, limit));
    items.sort_by_key(|d| d.key);
    items.truncate(limit);
    items
}

/// Failed fallback deliveries (kind `delivery`, key status code 0).
fn delivery_dead_letters_local(
    shard: &Shard,
    client: Option<&str>,
    after: Option<(u64, u8)>,
    limit: usize,
) -> Vec<DeadLetter> {
    let index = shard.index().borrow();
    let mut out = Vec::new();
    let mut cursor = after.map(|(seq, _)| seq);
    // (seq, 0) sorts before the events of the same message, so a cursor on
    // an event of `seq` excludes `seq`'s delivery too: exclusive on seq.
    loop {
        let page = index.fallback_dead_letters(cursor, 256);
        let Some(&(last, _)) = page.last() else { break };
        for (seq, state) in page {
            let Some(meta) = index.get(seq) else { continue };
            if client.is_some_and(|c| c != &*meta.client) {
                continue;
            }
            let id = shard.tracking_id(seq);
            out.push(DeadLetter {
                id: crate::fallback::dead_letter_id(id),
                kind: "delivery",
                message_id: id.to_string_id(),
                client: meta.client.to_string(),
                event_type: "message.failed",
                attempts: state.attempts,
                last_error: state.last_error.as_deref().unwrap_or("").to_owned(),
                dead_at_ms: state.dead_at_ms,
                key: (shard.id() as u16, seq, 0),
            });
            if out.len() >= limit {
                return out;
            }
        }
        cursor = Some(last);
    }
    out
}

fn event_dead_letters_local(
    shard: &Shard,
    client: Option<&str>,
    after: Option<(u64, u8)>,
    limit: usize,
) -> Vec<DeadLetter> {
    let index = shard.index().borrow();
    let after = after.and_then(|(seq, code)| Some((seq, Status::from_u8(code)?)));
    let mut out = Vec::new();
    let mut cursor = after;
    // Filtering by client may skip items: page through the index until
    // `limit` items matched or it is exhausted.
    loop {
        let page = index.dead_letters(cursor, 256);
        let Some(&(last_seq, last_status, _)) = page.last() else { break };
        for (seq, status, e) in page {
            let Some(meta) = index.get(seq) else { continue };
            if client.is_some_and(|c| c != &*meta.client) {
                continue;
            }
            let id = shard.tracking_id(seq);
            out.push(DeadLetter {
                id: event_id(id, status),
                kind: "webhook",
                message_id: id.to_string_id(),
                client: meta.client.to_string(),
                event_type: status.event_type().unwrap_or("message.unknown"),
                attempts: e.attempts,
                last_error: e.last_error.as_deref().unwrap_or("").to_owned(),
                dead_at_ms: e.dead_at_ms,
                key: (shard.id() as u16, seq, status as u8),
            });
            if out.len() >= limit {
                return out;
            }
        }
        cursor = Some((last_seq, last_status));
    }
    out
}

/// Replays (attempts reset) or drops a dead letter of this shard; false if
/// there is none.
pub fn dead_letter_action_local(shard: &Shard, seq: u64, status: Status, replay: bool) -> bool {
    if status == Status::Accepted {
        return crate::fallback::dead_letter_action_local(shard, seq, replay);
    }
    let dead = shard.index().borrow().event(seq, status).map(|e| (e.dead_at_ms != 0, e.attempts));
    let Some((true, attempts)) = dead else { return false };
    let outcome = if replay { EventOutcome::Replayed } else { EventOutcome::Dropped };
    if !record_event(shard, seq, status, outcome, attempts, "") {
        return false;
    }
    if replay {
        shard.events_ready().notify_all();
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_ids_roundtrip_and_name_their_event() {
        let id = TrackingId { shard: 3, seq: 12345 };
        for s in EVENT_STATUSES {
            let e = event_id(id, s);
            assert!(crate::outbound::is_valid_webhook_id(&e), "{e}");
            assert_eq!(parse_event_id(&e), Some((id, s)));
            assert_eq!(event_status(s.event_type().unwrap()), Some(s));
            assert_eq!(job_event(job_id(id.seq, s)), Some((id.seq, s)));
        }
        assert_eq!(parse_event_id("evt_nope_acked"), None);
        assert_eq!(parse_event_id("evt_000g000000000000_accepted"), None);
        assert_eq!(event_status("message.read"), None);
    }
}
