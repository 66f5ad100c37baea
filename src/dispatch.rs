//! Routes mesh messages to what handles them. It sits above the protocols
//! (a hand-over of a WebSocket goes to `mobile`), so that `shard.rs` can
//! hold state without importing any protocol.

use std::rc::Rc;

use glommio::channels::shared_channel::ConnectedReceiver;

use crate::mesh_msg::MeshMsg;
use crate::shard::Shard;

/// Drains the channel from one peer until it closes. Never awaits anything
/// but the next message: every answer that needs durability or channel
/// room goes out from a spawned task, so a receiver always makes progress
/// and two shards flooding each other cannot deadlock
/// (docs/ARCHITECTURE.md, "Cross-shard waits").
pub async fn run_receiver(shard: Rc<Shard>, rx: ConnectedReceiver<MeshMsg>) {
    while let Some(msg) = rx.recv().await {
        on_mesh(&shard, msg);
    }
}

/// Handles one message from another shard, synchronously.
pub fn on_mesh(shard: &Rc<Shard>, msg: MeshMsg) {
    match msg {
        MeshMsg::Append { from, req, items } => shard.answer_append(from, req, items),
        MeshMsg::Lookup { from, req, seq, client } => {
            // May read the cold store (its blocking thread): answered from a task.
            let shard = shard.clone();
            glommio::spawn_local(async move {
                let view = shard.lookup_local(seq, client).await;
                shard.reply(from, MeshMsg::Found { req, view });
            })
            .detach();
        }
        MeshMsg::RateTake { from, req, client, n } => {
            let decision = shard.rate_take_local(client, n);
            shard.reply(from, MeshMsg::RateTaken { req, decision });
        }
        MeshMsg::RateRefund { client, n, at_sec } => shard.rate_refund_local(client, n, at_sec),
        MeshMsg::DeadLetters { from, req, client, after, limit } => {
            let items = crate::receipts::dead_letters_local(shard, client.as_deref(), after, limit as usize);
            shard.reply(from, MeshMsg::DeadLetterList { req, items });
        }
        MeshMsg::DeadLetterAction { from, req, seq, status, replay } => {
            let found = crate::receipts::dead_letter_action_local(shard, seq, status, replay);
            shard.reply(from, MeshMsg::DeadLetterDone { req, found });
        }
        MeshMsg::Appended { req, .. }
        | MeshMsg::Found { req, .. }
        | MeshMsg::RateTaken { req, .. }
        | MeshMsg::DeadLetterList { req, .. }
        | MeshMsg::DeadLetterDone { req, .. } => shard.replies().complete(req, msg),
        MeshMsg::Adopt(adoption) => crate::mobile::adopt(shard.clone(), *adoption),
        MeshMsg::PutUser { from, req, put } => shard.answer_put_user(from, req, *put),
        MeshMsg::GetUser { from, req, user } => {
            let result = Ok(shard.user_view_local(&user).map(Box::new));
            shard.reply(from, MeshMsg::UserFound { req, result });
        }
        MeshMsg::UserFound { req, .. } | MeshMsg::ConfigApplied { req, .. } => shard.replies().complete(req, msg),
        MeshMsg::ConfigApply { from, req, update } => {
            let version = update.version();
            shard.install_config(*update);
            shard.reply(from, MeshMsg::ConfigApplied { req, version });
        }
        MeshMsg::IdemBegin(r) => {
            let begin = crate::idempotency::begin_local(shard, r.client, &r.key, r.body_sha256);
            shard.reply(r.from, MeshMsg::IdemBegun { req: r.req, begin: Box::new(begin) });
        }
        MeshMsg::IdemFinish(r) => {
            let shard = shard.clone();
            glommio::spawn_local(async move {
                let result =
                    crate::idempotency::finish_local(&shard, r.client, &r.key, r.body_sha256, r.status, &r.response)
                        .await;
                let _ = shard.send(r.from as usize, MeshMsg::IdemFinished { req: r.req, result }).await;
            })
            .detach();
        }
        MeshMsg::IdemAbort(r) => crate::idempotency::abort_local(shard, r.client, &r.key),
        MeshMsg::IdemBegun { req, .. } | MeshMsg::IdemFinished { req, .. } => shard.replies().complete(req, msg),
        MeshMsg::FeedRead { from, req, client, after, limit } => {
            let shard = shard.clone();
            glommio::spawn_local(async move {
                let id = shard.clients().id(client).to_owned();
                let page = crate::business::events::read_local(&shard, &id, after, limit as usize).await.map(Box::new);
                let _ = shard.send(from as usize, MeshMsg::FeedPageRead { req, page }).await;
            })
            .detach();
        }
        MeshMsg::FeedPageRead { req, .. } => shard.replies().complete(req, msg),
        MeshMsg::MetricsGet { from, req } => {
            let snapshot = Box::new(crate::metrics::snapshot_local(shard));
            shard.reply(from, MeshMsg::Metrics { req, snapshot });
        }
        MeshMsg::Metrics { req, .. } => shard.replies().complete(req, msg),
    }
}
