//! Fallback channels: a message not acked on the app within `after_seconds`
//! is sent through WhatsApp or email, on the recipient's home shard.
//!
//! The state machine lives in the journal (`Fallback` records, kind 7) and
//! the index (`MessageIndex::fallback`): planned at acceptance (in the same
//! commit as the message), handed to a provider (`Sending`), failed attempts
//! (`AttemptFailed`, with the next try's time), a channel given up
//! (`ChannelFailed`: permanent error, attempts spent, no contact, breaker
//! open with another channel left), `Delivered` (status `delivered`, with
//! the channel and the provider's id; the message leaves the app queue),
//! `Exhausted` (status `failed`, reason `channels_exhausted`, a dead letter
//! of kind `delivery`), `Replayed` and `Dropped` (from the dead-letter queue).
//!
//! This module's task ([`run`], one per shard with providers configured)
//! hands due fallbacks to the offload thread (`try_send`, never waiting) and
//! journals the provider's reports, which reach it through the receipts
//! outbox's report channel ([`is_fallback_job`]). After `kill -9`, recovery
//! rebuilds every fallback: those handed over without a final answer are
//! handed over again (the answer may have been lost: the only case where a
//! provider sees a message twice), the others wait for their due time.
//! Records are appended without waiting for their fdatasync: a lost one
//! only repeats a step.

use std::collections::HashSet;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use esh3ar_shards::record::{FallbackChange, FallbackStep, Record, EVENT_ERROR_BYTES_MAX};
use esh3ar_shards::{Channel, ChannelList, Status};

use crate::clock::now_ms;
use crate::http::json_string;
use crate::outbound::{EndpointId, Job, JobSender, OutboundStatus, Report, TrySendError};
use crate::shard::Shard;

/// How often due fallbacks are looked for.
const TICK: Duration = Duration::from_millis(50);
/// Most fallbacks handed over per tick (the offload queue bounds it too).
const HANDOVER_PER_TICK_MAX: usize = 4096;
/// Job ids of fallback jobs carry this in their low 3 bits (receipts' event
/// jobs carry a status code, 1 to 5).
const JOB_TAG: u64 = 7;

/// A message's fallback: after how long, through which channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FallbackSpec {
    pub after_seconds: u32,
    pub channels: ChannelList,
}

/// Parses a list of channel names (`fallback_channels`, `fallback.channels`):
/// known, configured, not repeated, one or two. The error says why.
pub fn parse_channels<'a>(
    names: impl Iterator<Item = &'a str>,
    providers: &crate::outbound::ProvidersConfig,
) -> Result<ChannelList, String> {
    let mut channels = Vec::new();
    for name in names {
        let Some(c) = Channel::parse_fallback(name) else {
            return Err(format!("names {name:?}; known channels are \"whatsapp\" and \"email\""));
        };
        if !providers.has(c) {
            return Err(format!("names {name:?} but [providers.{name}] is not configured"));
        }
        channels.push(c);
    }
    if channels.is_empty() {
        return Err("must name at least one channel".into());
    }
    ChannelList::of(&channels).ok_or_else(|| "names a channel twice".to_owned())
}

/// Every configured provider's channel, in the default order.
pub fn default_channels(providers: &crate::outbound::ProvidersConfig) -> ChannelList {
    let all: Vec<Channel> = providers.channels().collect();
    ChannelList::of(&all).unwrap_or_default()
}

/// Whether a report's job is a fallback job (else a receipts event).
pub fn is_fallback_job(job: u64) -> bool {
    job & 7 == JOB_TAG
}

fn job_id(seq: u64) -> u64 {
    (seq << 3) | JOB_TAG
}

/// The provider endpoints of the offload thread, as the shard needs them.
#[derive(Debug, Clone, Default)]
pub struct Providers {
    /// (channel, endpoint) of each configured provider.
    pub endpoints: Vec<(Channel, EndpointId)>,
    /// Breaker states (written by the offload thread).
    pub status: Option<Arc<OutboundStatus>>,
}

impl Providers {
    fn endpoint(&self, channel: Channel) -> Option<EndpointId> {
        self.endpoints.iter().find(|(c, _)| *c == channel).map(|&(_, e)| e)
    }

    fn breaker_open(&self, channel: Channel) -> bool {
        let (Some(e), Some(status)) = (self.endpoint(channel), &self.status) else { return false };
        status.breaker(e.0 as usize) == Some(crate::outbound::BreakerState::Open)
    }
}

/// Journals the plan of a message just accepted (same open commit).
pub fn plan(
    shard: &Shard,
    index: &mut esh3ar_shards::index::MessageIndex,
    seq: u64,
    accepted_at_ms: u64,
    spec: FallbackSpec,
) -> Result<u64, esh3ar_shards::journal::JournalError> {
    let change = FallbackChange {
        seq,
        step: FallbackStep::Planned,
        at_ms: accepted_at_ms,
        channel: 0,
        channels: spec.channels.0,
        attempts: 0,
        when_ms: accepted_at_ms + u64::from(spec.after_seconds) * 1000,
        notify: false,
        text: "",
    };
    shard.journal().append(&Record::Fallback(change), index).map(|a| a.generation)
}

/// The fallback state of one shard's task.
pub struct Fallbacks {
    shard: Rc<Shard>,
    jobs: JobSender,
    providers: Providers,
    /// Handed over, no final report yet.
    in_flight: std::cell::RefCell<HashSet<u64>>,
}

impl Fallbacks {
    pub fn new(shard: Rc<Shard>, jobs: JobSender, providers: Providers) -> Rc<Fallbacks> {
        Rc::new(Fallbacks { shard, jobs, providers, in_flight: Default::default() })
    }
}

/// Runs the fallbacks of `fb`'s shard until shutdown.
pub async fn run(fb: Rc<Fallbacks>) {
    let mut jobs = fb.jobs.duplicate();
    // After a restart: what was handed over without a final answer goes again.
    let mut retry: Vec<u64> = fb.shard.index().borrow().fallbacks_sending();
    loop {
        let mut still = Vec::new();
        for seq in retry {
            if !hand_over(&fb, &mut jobs, seq).await {
                still.push(seq);
            }
        }
        retry = still;
        let due = fb.shard.index().borrow().fallbacks_due(now_ms(), HANDOVER_PER_TICK_MAX);
        for seq in due {
            if !hand_over(&fb, &mut jobs, seq).await {
                break; // the offload queue is full: next tick
            }
        }
        let stop = futures_lite::future::or(
            async {
                glommio::timer::sleep(TICK).await;
                false
            },
            async {
                fb.shard.shutdown().wait().await;
                true
            },
        )
        .await;
        if stop {
            return;
        }
    }
}

/// Picks the channel for message `seq` and hands it over. False when the
/// offload queue is full (nothing journaled; try again later).
async fn hand_over(fb: &Fallbacks, jobs: &mut JobSender, seq: u64) -> bool {
    if fb.in_flight.borrow().contains(&seq) {
        return true;
    }
    loop {
        let Some(pick) = choose(fb, seq) else { return true };
        let (channel, contact, yields) = match pick {
            Choice::Gone => return true,
            Choice::Skip(channel, why) => {
                journal(&fb.shard, seq, FallbackStep::ChannelFailed, channel as u8, 0, 0, false, why);
                continue;
            }
            Choice::Exhausted => {
                let last = fb.shard.index().borrow().fallback(seq).and_then(|s| s.last_error.clone());
                let error = format!("every channel failed; last error: {}", last.as_deref().unwrap_or("none"));
                exhaust(fb, seq, &error);
                return true;
            }
            Choice::Send { channel, contact, yields } => (channel, contact, yields),
        };
        let Some(job) = job(fb, seq, channel, contact, yields).await else { return true };
        return match jobs.try_send(job) {
            Ok(()) => {
                fb.in_flight.borrow_mut().insert(seq);
                let attempts = fb.shard.index().borrow().fallback(seq).map_or(0, |s| s.attempts);
                journal(&fb.shard, seq, FallbackStep::Sending, channel as u8, attempts, 0, false, "");
                true
            }
            Err(TrySendError::Full(_) | TrySendError::Closed(_)) => false,
            Err(TrySendError::Invalid(_)) => {
                journal(&fb.shard, seq, FallbackStep::ChannelFailed, channel as u8, 0, 0, false, "invalid job");
                continue;
            }
        };
    }
}

enum Choice {
    /// Settled or no fallback any more.
    Gone,
    /// This channel cannot be used (journal it and look at the next).
    Skip(Channel, &'static str),
    Exhausted,
    Send {
        channel: Channel,
        contact: String,
        yields: bool,
    },
}

/// The first channel from the current one with a contact and a provider;
/// one whose breaker is open is skipped when a later one can take it.
fn choose(fb: &Fallbacks, seq: u64) -> Option<Choice> {
    let index = fb.shard.index().borrow();
    let Some(state) = index.fallback(seq).filter(|s| s.dead_at_ms == 0) else { return Some(Choice::Gone) };
    let meta = index.get(seq)?;
    if meta.status.is_settled() {
        return Some(Choice::Gone);
    }
    let user = index.user(&meta.to);
    let contact = |c: Channel| -> Option<String> {
        let u = user?;
        match c {
            Channel::WhatsApp => u.phone.as_deref().map(str::to_owned),
            Channel::Email => u.email.as_deref().map(str::to_owned),
            Channel::App => None,
        }
    };
    let rest: Vec<Channel> = state.channels.iter().skip(state.current as usize).collect();
    let Some(&channel) = rest.first() else { return Some(Choice::Exhausted) };
    if fb.providers.endpoint(channel).is_none() {
        return Some(Choice::Skip(channel, "provider not configured"));
    }
    let Some(to) = contact(channel) else {
        let why = if channel == Channel::WhatsApp { "no phone in the directory" } else { "no email in the directory" };
        return Some(Choice::Skip(channel, why));
    };
    let later_usable = rest[1..]
        .iter()
        .any(|&c| fb.providers.endpoint(c).is_some() && contact(c).is_some() && !fb.providers.breaker_open(c));
    if fb.providers.breaker_open(channel) && later_usable {
        return Some(Choice::Skip(channel, "breaker open"));
    }
    Some(Choice::Send { channel, contact: to, yields: later_usable })
}

async fn job(fb: &Fallbacks, seq: u64, channel: Channel, to: String, yields: bool) -> Option<Job> {
    let endpoint = fb.providers.endpoint(channel)?;
    let (attempts, retry_at) = {
        let index = fb.shard.index().borrow();
        let s = index.fallback(seq)?;
        (s.attempts, s.retry_at_ms)
    };
    let text = fb.shard.bodies().borrow().get(seq).map(|b| b.to_vec());
    let text = match text {
        Some(t) => t,
        None => read_body(fb, seq).await?,
    };
    let body = match channel {
        Channel::WhatsApp => whatsapp_body(&to, &text),
        _ => text,
    };
    let id = fb.shard.tracking_id(seq).to_string_id();
    Some(Job {
        id: job_id(seq),
        shard: fb.shard.id(),
        endpoint,
        webhook_id: format!("msg_{id}_{}", channel.as_str()),
        body: Bytes::from(body),
        attempts,
        not_before_unix_ms: retry_at,
        to,
        yield_when_open: yields,
    })
}

async fn read_body(fb: &Fallbacks, seq: u64) -> Option<Vec<u8>> {
    let (segment, offset, bytes) = {
        let index = fb.shard.index().borrow();
        let m = index.get(seq)?;
        (m.segment, m.offset, m.record_bytes)
    };
    match fb.shard.journal().read_body(segment, offset, bytes).await {
        Ok(body) => Some(body),
        Err(e) => {
            tracing::error!(shard = fb.shard.id(), seq, error = %e, "cannot read a message body for its fallback");
            None
        }
    }
}

/// `{"messaging_product":"whatsapp","to":…,"type":"text","text":{"body":…}}`.
pub fn whatsapp_body(to: &str, text: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(96 + to.len() + text.len() * 2);
    b.extend_from_slice(b"{\"messaging_product\":\"whatsapp\",\"to\":");
    json_string(&mut b, to);
    b.extend_from_slice(b",\"type\":\"text\",\"text\":{\"body\":");
    json_string(&mut b, &String::from_utf8_lossy(text));
    b.extend_from_slice(b"}}");
    b
}

/// A report about a fallback job (from the receipts outbox's channel).
pub fn on_report(fb: &Fallbacks, report: Report) {
    let seq = report.job() >> 3;
    let channel = {
        let index = fb.shard.index().borrow();
        let Some(s) = index.fallback(seq) else {
            fb.in_flight.borrow_mut().remove(&seq);
            return;
        };
        s.channels.get(s.current as usize).map_or(0, |c| c as u8)
    };
    match report {
        Report::Accepted { provider_message_id, .. } => {
            fb.in_flight.borrow_mut().remove(&seq);
            let notify = {
                let index = fb.shard.index().borrow();
                crate::receipts::owes_event(&fb.shard, &index, seq, Status::Delivered)
            };
            let id = provider_message_id.unwrap_or_default();
            journal(&fb.shard, seq, FallbackStep::Delivered, channel, 0, 0, notify, &id);
            if notify {
                fb.shard.events_ready().notify_all();
            }
        }
        Report::Failed { attempts, error, retry_at_unix_ms, .. } => {
            let error = error.to_string();
            journal(&fb.shard, seq, FallbackStep::AttemptFailed, channel, attempts, retry_at_unix_ms, false, &error);
        }
        Report::Exhausted { attempts, error, .. } => {
            fb.in_flight.borrow_mut().remove(&seq);
            let error = error.map_or_else(|| "attempts exhausted".to_owned(), |e| e.to_string());
            journal(&fb.shard, seq, FallbackStep::ChannelFailed, channel, attempts, 0, false, &error);
            // The next channel is due now: the task's next tick hands it over.
        }
        Report::Delivered { .. } => {
            fb.in_flight.borrow_mut().remove(&seq);
        }
    }
}

fn exhaust(fb: &Fallbacks, seq: u64, error: &str) {
    let notify = {
        let index = fb.shard.index().borrow();
        crate::receipts::owes_event(&fb.shard, &index, seq, Status::Failed)
    };
    tracing::warn!(shard = fb.shard.id(), seq, "every fallback channel failed; the message is dead-lettered");
    journal(&fb.shard, seq, FallbackStep::Exhausted, 0, 0, 0, notify, error);
    if notify {
        fb.shard.events_ready().notify_all();
    }
}

/// Appends a `Fallback` record (not waiting for its fdatasync).
#[allow(clippy::too_many_arguments)]
pub fn journal(
    shard: &Shard,
    seq: u64,
    step: FallbackStep,
    channel: u8,
    attempts: u32,
    when_ms: u64,
    notify: bool,
    text: &str,
) -> bool {
    let mut cut = text.len().min(EVENT_ERROR_BYTES_MAX);
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    let change = FallbackChange {
        seq,
        step,
        at_ms: now_ms(),
        channel,
        channels: 0,
        attempts,
        when_ms,
        notify,
        text: &text[..cut],
    };
    let mut index = shard.index().borrow_mut();
    shard.journal().append(&Record::Fallback(change), &mut index).is_ok()
}

/// The dead-letter id of a message's failed delivery: `dlv_<message id>`.
pub fn dead_letter_id(id: esh3ar_shards::id::TrackingId) -> String {
    format!("dlv_{}", id.to_string_id())
}

/// Parses a [`dead_letter_id`].
pub fn parse_dead_letter_id(s: &str) -> Option<esh3ar_shards::id::TrackingId> {
    esh3ar_shards::id::TrackingId::decode(s.strip_prefix("dlv_")?.as_bytes())
}

/// Replays (from the first channel, now) or drops the dead-lettered
/// delivery of message `seq`; false if there is none.
pub fn dead_letter_action_local(shard: &Shard, seq: u64, replay: bool) -> bool {
    let dead = shard.index().borrow().fallback(seq).is_some_and(|s| s.dead_at_ms != 0);
    if !dead {
        return false;
    }
    let step = if replay { FallbackStep::Replayed } else { FallbackStep::Dropped };
    journal(shard, seq, step, 0, 0, 0, false, "")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_ids_never_collide_with_event_jobs() {
        for seq in [0u64, 1, 12345] {
            assert!(is_fallback_job(job_id(seq)));
            assert_eq!(job_id(seq) >> 3, seq);
            for status in 1..=5u64 {
                assert!(!is_fallback_job((seq << 3) | status));
            }
        }
    }

    #[test]
    fn whatsapp_body_has_the_cloud_api_shape() {
        let b = whatsapp_body("+966500000001", b"hi \"there\"");
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["messaging_product"], "whatsapp");
        assert_eq!(v["to"], "+966500000001");
        assert_eq!(v["type"], "text");
        assert_eq!(v["text"]["body"], "hi \"there\"");
    }
}
