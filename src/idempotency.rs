//! Idempotent sends: `Idempotency-Key` on `POST /v1/messages` and
//! `/v1/messages/batch` (docs/API.md, "Idempotent sends").
//!
//! A key lives on its client's home shard, beside the client's rate-limit
//! window. A keyed request first asks that shard ([`begin_local`]): a key
//! answered within `business.idempotency_window_seconds` gets its first
//! answer again (or `422` if the body differs); a key whose first request is
//! still in flight gets `409`; otherwise the key is reserved and the request
//! runs as usual. Before a `202` is written, its answer is journaled on the
//! client's home shard and made durable ([`finish_local`]), so no crash can
//! forget a key whose answer the client saw. A request that ends otherwise
//! releases the reservation ([`abort_local`]); only 202s are remembered.
//!
//! Unkeyed requests take none of this path.

use esh3ar_shards::record::{IdempotencyRecord, Record};

use crate::clock::now_ms;
use crate::mesh_msg::AppendRefusal;
use crate::shard::Shard;

/// Longest key, in bytes.
pub const KEY_BYTES_MAX: usize = 255;

/// What the client's home shard says about a keyed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Begin {
    /// First use (or expired): reserved; run the request.
    New,
    /// Answered before with the same body: this answer again.
    Replay { status: u16, body: Vec<u8> },
    /// Answered before with another body.
    Conflict,
    /// The first request with this key has not finished.
    InFlight,
}

/// A valid key: 1 to 255 visible ASCII characters.
pub fn valid_key(key: &[u8]) -> Option<&str> {
    let ok = !key.is_empty() && key.len() <= KEY_BYTES_MAX && key.iter().all(|b| (0x21..=0x7e).contains(b));
    ok.then(|| std::str::from_utf8(key).ok()).flatten()
}

/// On the client's home shard: looks the key up and reserves it if new.
pub fn begin_local(shard: &Shard, client: u32, key: &str, body_sha256: [u8; 32]) -> Begin {
    let window_ms = shard.cfg().business.idempotency_window_seconds * 1000;
    let now = now_ms();
    {
        let index = shard.index().borrow();
        let clients = shard.clients();
        let id = clients.id(client);
        if let Some(e) = index.idempotency().get(id, key).filter(|e| e.at_ms + window_ms > now) {
            return if e.body_sha256 == body_sha256 {
                Begin::Replay { status: e.status, body: e.response.to_vec() }
            } else {
                Begin::Conflict
            };
        }
    }
    let mut in_flight = shard.idempotency_in_flight().borrow_mut();
    match in_flight.get(&(client, Box::from(key))) {
        Some(_) => Begin::InFlight,
        None => {
            in_flight.insert((client, Box::from(key)), body_sha256);
            Begin::New
        }
    }
}

/// On the client's home shard: journals the answer of a keyed request and
/// waits until it is durable, then releases the reservation.
pub async fn finish_local(
    shard: &Shard,
    client: u32,
    key: &str,
    body_sha256: [u8; 32],
    status: u16,
    response: &[u8],
) -> Result<(), AppendRefusal> {
    let appended = {
        let clients = shard.clients();
        let record = Record::Idempotency(IdempotencyRecord {
            client: clients.id(client),
            key,
            body_sha256,
            at_ms: now_ms(),
            status,
            response,
        });
        let mut index = shard.index().borrow_mut();
        shard.journal().append(&record, &mut index)
    };
    let result = match appended {
        Ok(a) => shard.journal().wait_durable(a.generation).await.map_err(|e| AppendRefusal::from(&e)),
        Err(e) => Err(AppendRefusal::from(&e)),
    };
    abort_local(shard, client, key);
    result
}

/// On the client's home shard: releases a reservation.
pub fn abort_local(shard: &Shard, client: u32, key: &str) {
    shard.idempotency_in_flight().borrow_mut().remove(&(client, Box::from(key)));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_visible_ascii_of_1_to_255_bytes() {
        assert_eq!(valid_key(b"order-42"), Some("order-42"));
        assert!(valid_key(&[b'k'; 255]).is_some());
        assert!(valid_key(&[b'k'; 256]).is_none());
        assert!(valid_key(b"").is_none());
        assert!(valid_key(b"with space").is_none());
        assert!(valid_key("é".as_bytes()).is_none());
    }
}
