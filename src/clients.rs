//! Business clients and their API keys.
//!
//! Keys are found by their SHA-256 digest and then compared in constant
//! time, so neither the lookup nor the comparison leaks how much of a
//! guessed key was right, and the cost does not grow with the client count.

use hashbrown::HashMap;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use esh3ar_shards::{EventSet, ALL_EVENTS};

use crate::config::Config;
use crate::outbound::{Endpoint, EndpointId};

/// One configured client.
#[derive(Debug, Clone)]
pub struct Client {
    pub id: String,
    pub api_key: Vec<u8>,
    pub tier: String,
    pub messages_per_minute: u64,
    /// Moves the shedding thresholds of this client's low and normal
    /// messages up (its tier is shed later).
    pub shed_offset_percent: u8,
    /// Where its receipts go, if it has a webhook.
    pub webhook: Option<Webhook>,
    /// The events kept in its event feed, if it reads them there
    /// (`event_feed = true`; never together with a webhook).
    pub feed: Option<EventSet>,
    /// Default fallback of its messages (`fallback_after_seconds`).
    pub fallback: Option<crate::fallback::FallbackSpec>,
}

/// A client's webhook, as the shards see it (the URL and secret live on
/// the offload thread only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Webhook {
    /// The client's endpoint on the offload thread.
    pub endpoint: EndpointId,
    /// The events it wants (bit `1 << status`).
    pub events: EventSet,
}

/// All clients, indexed by position (the index travels between shards).
#[derive(Debug)]
pub struct ClientTable {
    clients: Vec<Client>,
    by_key_digest: HashMap<[u8; 32], u32>,
    by_id: HashMap<String, u32>,
}

impl ClientTable {
    /// Builds the table from a validated config.
    pub fn from_config(cfg: &Config) -> Self {
        let mut clients = Vec::with_capacity(cfg.clients.len());
        let mut by_key_digest = HashMap::new();
        let mut by_id = HashMap::new();
        let mut endpoints = 0u32;
        for (i, c) in cfg.clients.iter().enumerate() {
            let limit = c.messages_per_minute.unwrap_or_else(|| cfg.tiers[&c.tier].messages_per_minute);
            by_key_digest.insert(Sha256::digest(c.api_key.as_bytes()).into(), i as u32);
            by_id.insert(c.id.clone(), i as u32);
            let events = match &c.webhook_events {
                None => ALL_EVENTS,
                Some(names) => {
                    names.iter().filter_map(|n| crate::receipts::event_status(n)).fold(0, |set, s| set | s.event_bit())
                }
            };
            let webhook = c.webhook_url.as_ref().map(|_| {
                let endpoint = EndpointId(endpoints);
                endpoints += 1;
                Webhook { endpoint, events }
            });
            let feed = c.event_feed.then_some(events);
            clients.push(Client {
                id: c.id.clone(),
                api_key: c.api_key.as_bytes().to_vec(),
                tier: c.tier.clone(),
                messages_per_minute: limit,
                shed_offset_percent: cfg.tiers[&c.tier].shed_offset_percent,
                webhook,
                feed,
                fallback: c.fallback_after_seconds.map(|after| crate::fallback::FallbackSpec {
                    after_seconds: after.min(u32::MAX as u64) as u32,
                    channels: match &c.fallback_channels {
                        Some(names) => {
                            crate::fallback::parse_channels(names.iter().map(String::as_str), &cfg.providers)
                                .unwrap_or_default()
                        }
                        None => crate::fallback::default_channels(&cfg.providers),
                    },
                }),
            });
        }
        Self { clients, by_key_digest, by_id }
    }

    /// The webhook endpoints for the offload thread, in [`EndpointId`] order.
    /// The config was validated, so every URL and secret parses.
    pub fn endpoints(cfg: &Config) -> Vec<Endpoint> {
        cfg.clients
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                let parsed =
                    crate::outbound::parse_client_webhook(i, c.webhook_url.as_deref(), c.webhook_secret.as_deref());
                match parsed {
                    Ok(Some((url, secret))) => Some(Endpoint { name: c.id.clone(), url, secret }),
                    _ => None,
                }
            })
            .collect()
    }

    /// The client with id `id`.
    pub fn index_of(&self, id: &str) -> Option<u32> {
        self.by_id.get(id).copied()
    }

    /// The client whose key is `key`.
    pub fn authenticate(&self, key: &[u8]) -> Option<u32> {
        let digest: [u8; 32] = Sha256::digest(key).into();
        let &i = self.by_key_digest.get(&digest)?;
        let client = &self.clients[i as usize];
        bool::from(client.api_key.as_slice().ct_eq(key)).then_some(i)
    }

    /// The id of client `i`.
    pub fn id(&self, i: u32) -> &str {
        &self.clients[i as usize].id
    }

    /// Client `i`.
    pub fn get(&self, i: u32) -> &Client {
        &self.clients[i as usize]
    }

    /// Number of clients.
    pub fn len(&self) -> usize {
        self.clients.len()
    }

    /// True when no client is configured.
    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }
}
