//! Idempotency keys of the clients homed on a shard: the first answer to a
//! request with an `Idempotency-Key`, kept for the idempotency window so a
//! retry gets it again instead of sending the messages twice.
//!
//! Rebuilt from the journal's `Idempotency` records like the rest of the
//! index. An entry keeps the segment holding its record from deletion until
//! it expires (a restart must find every key answered within the window).
//! Entries expire oldest first ([`IdempotencyKeys::expire`]); memory is
//! [`IdempotencyKeys::bytes`], counted in the shard's memory budget.

use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;

use hashbrown::HashMap;

use crate::record::IdempotencyRecord;

/// Bytes an entry costs besides its key, client id and answer (map slot,
/// hash, expiry queue slot).
pub const ENTRY_OVERHEAD_BYTES: usize = 128;

/// A remembered answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyEntry {
    /// SHA-256 of the request body it answered.
    pub body_sha256: [u8; 32],
    /// Unix ms of the answer.
    pub at_ms: u64,
    /// HTTP status of the answer.
    pub status: u16,
    /// JSON body of the answer.
    pub response: Rc<[u8]>,
    /// The segment holding its record.
    pub segment: u64,
}

/// The keys of one shard's clients, by (client id, key).
#[derive(Debug, Default)]
pub struct IdempotencyKeys {
    map: HashMap<(Rc<str>, Rc<str>), KeyEntry>,
    /// (at_ms, client, key) in the order records were applied.
    order: VecDeque<(u64, Rc<str>, Rc<str>)>,
    /// Live entries per segment.
    per_segment: BTreeMap<u64, u64>,
    bytes: usize,
}

impl IdempotencyKeys {
    /// Applies an `Idempotency` record found in `segment` (a later record
    /// for the same key replaces the earlier one).
    pub fn apply(&mut self, segment: u64, r: &IdempotencyRecord<'_>) {
        let (client, key): (Rc<str>, Rc<str>) = (Rc::from(r.client), Rc::from(r.key));
        let entry = KeyEntry {
            body_sha256: r.body_sha256,
            at_ms: r.at_ms,
            status: r.status,
            response: Rc::from(r.response),
            segment,
        };
        let size = entry_bytes(&client, &key, &entry);
        if let Some(old) = self.map.insert((client.clone(), key.clone()), entry) {
            self.unpin(old.segment);
            self.bytes -= entry_bytes(&client, &key, &old);
        }
        *self.per_segment.entry(segment).or_default() += 1;
        self.bytes += size;
        self.order.push_back((r.at_ms, client, key));
    }

    /// The answer remembered for `key` of `client`, if any.
    pub fn get(&self, client: &str, key: &str) -> Option<&KeyEntry> {
        self.map.get(&Borrowed(client, key)) // no allocation per lookup
    }

    /// Forgets the entries answered before `before_ms`; returns how many.
    pub fn expire(&mut self, before_ms: u64) -> usize {
        let mut n = 0;
        while let Some((at, _, _)) = self.order.front() {
            if *at >= before_ms {
                break;
            }
            let Some((at, client, key)) = self.order.pop_front() else { break };
            let k = (client, key);
            // A key answered again later has a newer entry: keep that one.
            if self.map.get(&k).is_some_and(|e| e.at_ms == at) {
                if let Some(old) = self.map.remove(&k) {
                    self.unpin(old.segment);
                    self.bytes -= entry_bytes(&k.0, &k.1, &old);
                    n += 1;
                }
            }
        }
        n
    }

    fn unpin(&mut self, segment: u64) {
        if let Some(n) = self.per_segment.get_mut(&segment) {
            *n -= 1;
            if *n == 0 {
                self.per_segment.remove(&segment);
            }
        }
    }

    /// True if a live entry's record lies in `segment`.
    pub fn pins(&self, segment: u64) -> bool {
        self.per_segment.contains_key(&segment)
    }

    /// Live entries.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when no key is remembered.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Memory the entries hold, about.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// A lookup key borrowing the client and key: hashes like the owned pair.
#[derive(Hash)]
struct Borrowed<'a>(&'a str, &'a str);

impl hashbrown::Equivalent<(Rc<str>, Rc<str>)> for Borrowed<'_> {
    fn equivalent(&self, k: &(Rc<str>, Rc<str>)) -> bool {
        self.0 == &*k.0 && self.1 == &*k.1
    }
}

fn entry_bytes(client: &str, key: &str, e: &KeyEntry) -> usize {
    ENTRY_OVERHEAD_BYTES + client.len() + key.len() + e.response.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec<'a>(key: &'a str, at_ms: u64, response: &'a [u8]) -> IdempotencyRecord<'a> {
        IdempotencyRecord { client: "acme", key, body_sha256: [7; 32], at_ms, status: 202, response }
    }

    #[test]
    fn remembers_expires_and_pins_its_segment() {
        let mut k = IdempotencyKeys::default();
        k.apply(1, &rec("a", 100, b"{\"id\":1}"));
        k.apply(2, &rec("b", 200, b"{\"id\":2}"));
        assert_eq!(k.get("acme", "a").map(|e| e.status), Some(202));
        assert!(k.get("other", "a").is_none());
        assert!(k.pins(1) && k.pins(2));
        let before = k.bytes();
        assert_eq!(k.expire(150), 1);
        assert!(k.get("acme", "a").is_none() && !k.pins(1) && k.pins(2));
        assert!(k.bytes() < before);
        // Answered again later: the newer entry survives the older's expiry.
        k.apply(3, &rec("b", 300, b"{\"id\":3}"));
        assert!(!k.pins(2) && k.pins(3));
        assert_eq!(k.expire(250), 0);
        assert_eq!(&*k.get("acme", "b").unwrap().response, b"{\"id\":3}");
        assert_eq!(k.expire(301), 1);
        assert!(k.is_empty() && k.bytes() == 0);
    }
}
