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
            let view = shard.lookup_local(seq, client);
            shard.reply(from, MeshMsg::Found { req, view });
        }
        MeshMsg::RateTake { from, req, client, n } => {
            let decision = shard.rate_take_local(client, n);
            shard.reply(from, MeshMsg::RateTaken { req, decision });
        }
        MeshMsg::RateRefund { client, n, at_sec } => shard.rate_refund_local(client, n, at_sec),
        MeshMsg::Appended { req, .. } | MeshMsg::Found { req, .. } | MeshMsg::RateTaken { req, .. } => {
            shard.replies().complete(req, msg)
        }
        MeshMsg::Adopt(adoption) => crate::mobile::adopt(shard.clone(), *adoption),
    }
}
