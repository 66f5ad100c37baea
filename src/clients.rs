//! Business clients and their API keys.
//!
//! Keys are found by their SHA-256 digest and then compared in constant
//! time, so neither the lookup nor the comparison leaks how much of a
//! guessed key was right, and the cost does not grow with the client count.
//!
//! A client's index (`u32`) travels between shards (mesh messages) and
//! keys its rate window and idempotency reservations, so it is stable for
//! a client id across runtime config versions ([`ClientTable::next`]): new
//! clients get new indices, a removed client keeps its slot as a tombstone
//! that no longer authenticates. Indices are not stored on disk: records
//! carry client ids, so a restart may number clients afresh.

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
    /// Removed at runtime: its slot stays (its index may still be in
    /// flight between shards) but it no longer authenticates.
    pub removed: bool,
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
#[derive(Debug, Clone)]
pub struct ClientTable {
    clients: Vec<Client>,
    /// SHA-256 of an API key -> the client and the key itself (compared in
    /// constant time). Kept apart from `clients` so that a shard can take a
    /// new version's clients while still authenticating with the old keys
    /// ([`ClientTable::with_keys_of`]).
    by_key_digest: HashMap<[u8; 32], (u32, Vec<u8>)>,
    by_id: HashMap<String, u32>,
    /// The next webhook endpoint id to give: after the startup webhooks
    /// and the providers (`outbound::provider_endpoints`), then after
    /// every id announced to the offload thread ([`ClientTable::next`]).
    endpoints: u32,
}

impl ClientTable {
    /// Builds the table from a validated config.
    pub fn from_config(cfg: &Config) -> Self {
        let empty =
            ClientTable { clients: Vec::new(), by_key_digest: HashMap::new(), by_id: HashMap::new(), endpoints: 0 };
        // Webhooks take ids 0.. in client order (as `endpoints` lists
        // them for `outbound::spawn`); the providers follow them. A
        // validated config has far fewer than `ENDPOINTS_MAX` (spawn
        // checks), so this cannot fail.
        let mut table = empty.build(cfg).unwrap_or_else(|_| unreachable!("a first table has room for its endpoints"));
        table.endpoints += cfg.providers.channels().count() as u32;
        table
    }

    /// The table of a new config version, keeping every index of this one
    /// (a removed client becomes a tombstone, with its webhook endpoint)
    /// and every endpoint id of a client that keeps a webhook. A client
    /// given a webhook gets a new endpoint id, not below `announced`
    /// (`ControlSender::endpoints`: ids once announced to the offload
    /// thread are never reused). Err names the clients whose webhook finds
    /// the endpoint table full ([`crate::outbound::ENDPOINTS_MAX`] per
    /// process lifetime): those need a restart.
    pub fn next(&self, cfg: &Config, announced: u32) -> Result<ClientTable, Vec<String>> {
        let mut table = self.clone();
        table.endpoints = table.endpoints.max(announced);
        table.build(cfg)
    }

    /// This table's clients with `older`'s keys: the first phase of a
    /// runtime change, while some shards may not know the new indices yet.
    pub fn with_keys_of(mut self, older: &ClientTable) -> ClientTable {
        self.by_key_digest = older.by_key_digest.clone();
        self
    }

    fn build(mut self, cfg: &Config) -> Result<ClientTable, Vec<String>> {
        let mut restart = Vec::new();
        for c in &mut self.clients {
            c.removed = true;
            c.api_key.clear();
        }
        self.by_key_digest.clear();
        for c in cfg.clients.iter() {
            let limit = c.messages_per_minute.unwrap_or_else(|| cfg.tiers[&c.tier].messages_per_minute);
            let i = match self.by_id.get(&c.id) {
                Some(&i) => i,
                None => {
                    let i = self.clients.len() as u32;
                    self.by_id.insert(c.id.clone(), i);
                    self.clients.push(Client {
                        id: c.id.clone(),
                        api_key: Vec::new(),
                        tier: String::new(),
                        messages_per_minute: 0,
                        shed_offset_percent: 0,
                        webhook: None,
                        feed: None,
                        fallback: None,
                        removed: true,
                    });
                    i
                }
            };
            self.by_key_digest.insert(Sha256::digest(c.api_key.as_bytes()).into(), (i, c.api_key.as_bytes().to_vec()));
            let events = match &c.webhook_events {
                None => ALL_EVENTS,
                Some(names) => {
                    names.iter().filter_map(|n| crate::receipts::event_status(n)).fold(0, |set, s| set | s.event_bit())
                }
            };
            let old_endpoint = self.clients[i as usize].webhook.map(|w| w.endpoint);
            let webhook = match (&c.webhook_url, old_endpoint) {
                (None, _) => None,
                (Some(_), Some(endpoint)) => Some(Webhook { endpoint, events }),
                (Some(_), None) if (self.endpoints as usize) < crate::outbound::ENDPOINTS_MAX => {
                    let endpoint = EndpointId(self.endpoints);
                    self.endpoints += 1;
                    Some(Webhook { endpoint, events })
                }
                (Some(_), None) => {
                    restart.push(format!("clients[{}].webhook_url", c.id));
                    None
                }
            };
            self.clients[i as usize] = Client {
                id: c.id.clone(),
                api_key: c.api_key.as_bytes().to_vec(),
                tier: c.tier.clone(),
                messages_per_minute: limit,
                shed_offset_percent: cfg.tiers[&c.tier].shed_offset_percent,
                webhook,
                feed: c.event_feed.then_some(events),
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
                removed: false,
            };
        }
        if restart.is_empty() {
            Ok(self)
        } else {
            Err(restart)
        }
    }

    /// The webhook endpoints of `cfg`'s clients with their ids in this
    /// table: what the offload thread takes after a runtime change.
    pub fn endpoints_of(&self, cfg: &Config) -> Vec<(EndpointId, Endpoint)> {
        cfg.clients
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                let id = self.by_id.get(&c.id).and_then(|&x| self.clients[x as usize].webhook)?.endpoint;
                let parsed =
                    crate::outbound::parse_client_webhook(i, c.webhook_url.as_deref(), c.webhook_secret.as_deref());
                match parsed {
                    Ok(Some((url, secret))) => Some((id, Endpoint { name: c.id.clone(), url, secret })),
                    _ => None,
                }
            })
            .collect()
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
        let (i, stored) = self.by_key_digest.get(&digest)?;
        bool::from(stored.as_slice().ct_eq(key)).then_some(*i)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(clients: &str) -> Config {
        let text = format!(
            "[engine]\ndata_dir = \"d\"\n[business]\nlisten = \"127.0.0.1:0\"\n[mobile]\nlisten = \"127.0.0.1:0\"\n\
             token_secret = \"0123456789abcdef0123456789abcdef\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
             token = \"admin-token-0123456789\"\n[tiers.basic]\nmessages_per_minute = 60\n{clients}"
        );
        Config::from_document(toml::from_str(&text).unwrap(), std::path::Path::new("e.toml")).unwrap()
    }

    fn client(id: &str, key: &str) -> String {
        format!("[[clients]]\nid = \"{id}\"\napi_key = \"{key}\"\ntier = \"basic\"\n")
    }

    #[test]
    fn indices_are_stable_across_versions_and_removed_clients_are_tombstones() {
        let v1 =
            ClientTable::from_config(&cfg(&(client("a", "a-key-0123456789ab") + &client("b", "b-key-0123456789ab"))));
        let (a, b) = (v1.index_of("a").unwrap(), v1.index_of("b").unwrap());
        // b removed, c added, a's key rotated.
        let v2 = v1.next(&cfg(&(client("c", "c-key-0123456789ab") + &client("a", "a-key-rotated-0123"))), 0).unwrap();
        assert_eq!(v2.index_of("a"), Some(a));
        assert_eq!(v2.index_of("b"), Some(b), "a tombstone keeps its index");
        let c = v2.index_of("c").unwrap();
        assert!(c != a && c != b);
        assert!(v2.get(b).removed);
        assert_eq!(v2.authenticate(b"b-key-0123456789ab"), None, "a removed client does not authenticate");
        assert_eq!(v2.authenticate(b"a-key-0123456789ab"), None, "a rotated key does not either");
        assert_eq!(v2.authenticate(b"a-key-rotated-0123"), Some(a));
        assert_eq!(v2.authenticate(b"c-key-0123456789ab"), Some(c));
        // Phase one: new clients known, old keys still in force.
        let prepared = v2.clone().with_keys_of(&v1);
        assert_eq!(prepared.authenticate(b"a-key-0123456789ab"), Some(a));
        assert_eq!(prepared.authenticate(b"c-key-0123456789ab"), None);
        assert_eq!(prepared.id(c), "c");
        // b comes back: same index.
        let v3 = v2.next(&cfg(&client("b", "b-key-0123456789ab")), 0).unwrap();
        assert_eq!(v3.index_of("b"), Some(b));
        assert_eq!(v3.authenticate(b"b-key-0123456789ab"), Some(b));
    }
}

#[cfg(test)]
mod endpoint_tests {
    use super::*;

    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    fn cfg(clients: &[(&str, Option<&str>)]) -> Config {
        let mut text = "[engine]\ndata_dir = \"d\"\n[business]\nlisten = \"127.0.0.1:0\"\n[mobile]\n\
                        listen = \"127.0.0.1:0\"\ntoken_secret = \"0123456789abcdef0123456789abcdef\"\n[admin]\n\
                        listen = \"127.0.0.1:0\"\ntoken = \"admin-token-0123456789\"\n[tiers.basic]\n\
                        messages_per_minute = 60\n[providers.email]\nkind = \"smtp\"\nhost = \"127.0.0.1\"\nstarttls = false\n\
                        from = \"e@example.com\"\n"
            .to_owned();
        for (id, url) in clients {
            text += &format!("[[clients]]\nid = \"{id}\"\napi_key = \"{id}-key-0123456789ab\"\ntier = \"basic\"\n");
            if let Some(url) = url {
                text += &format!("webhook_url = \"{url}\"\nwebhook_secret = \"{SECRET}\"\n");
            }
        }
        Config::from_document(toml::from_str(&text).unwrap(), std::path::Path::new("e.toml")).unwrap()
    }

    fn endpoint(t: &ClientTable, id: &str) -> Option<EndpointId> {
        t.get(t.index_of(id)?).webhook.map(|w| w.endpoint)
    }

    #[test]
    fn webhooks_added_at_runtime_get_new_ids_after_the_providers_and_never_reuse_one() {
        let v1 = ClientTable::from_config(&cfg(&[("a", Some("http://a.test/h")), ("b", None)]));
        assert_eq!(endpoint(&v1, "a"), Some(EndpointId(0)));
        // Endpoint 1 is the email provider: the next webhook is 2.
        let v2 = v1.next(&cfg(&[("a", Some("http://a2.test/h")), ("b", Some("http://b.test/h"))]), 2).unwrap();
        assert_eq!(endpoint(&v2, "a"), Some(EndpointId(0)), "a changed URL keeps its endpoint");
        assert_eq!(endpoint(&v2, "b"), Some(EndpointId(2)));
        let eps: Vec<(u32, String)> = v2
            .endpoints_of(&cfg(&[("a", Some("http://a2.test/h")), ("b", Some("http://b.test/h"))]))
            .into_iter()
            .map(|(id, e)| (id.0, e.url.to_string()))
            .collect();
        assert_eq!(eps, [(0, "http://a2.test/h".to_owned()), (2, "http://b.test/h".to_owned())]);
        // Ids announced by a change that was then not stored are not given again.
        let v3 = v1.next(&cfg(&[("a", None), ("b", None), ("c", Some("http://c.test/h"))]), 3).unwrap();
        assert_eq!(endpoint(&v3, "c"), Some(EndpointId(3)));
        assert_eq!(endpoint(&v3, "a"), None, "a client without a webhook has no endpoint");
        // A removed client keeps its endpoint in its tombstone.
        let v4 = v2.next(&cfg(&[("b", Some("http://b.test/h"))]), 3).unwrap();
        assert!(v4.get(v4.index_of("a").unwrap()).removed);
        assert_eq!(endpoint(&v4, "a"), Some(EndpointId(0)));
    }
}
