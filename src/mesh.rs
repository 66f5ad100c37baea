//! The channel mesh between shards: one bounded SPSC channel for every
//! ordered pair of shards.
//!
//! The channels are created on the main thread and handed to each shard
//! whole ([`MeshSeed`]); a shard only connects its own ends. We do not use
//! glommio's `MeshBuilder`: its clones share an `Rc`, so cloning or dropping
//! them on several executor threads races on the reference count (seen as
//! SIGSEGV at startup under parallel test load).

use glommio::channels::shared_channel::{self, ConnectedReceiver, ConnectedSender, SharedReceiver, SharedSender};

/// One shard's unconnected ends of the mesh. `Send`: travels to its thread.
pub struct MeshSeed<T: Send + 'static> {
    /// The shard this seed belongs to.
    pub id: usize,
    senders: Vec<Option<SharedSender<T>>>,
    receivers: Vec<Option<SharedReceiver<T>>>,
}

/// Builds the mesh of `shards` shards with `capacity` messages per channel.
pub fn build<T: Send + 'static>(shards: usize, capacity: usize) -> Vec<MeshSeed<T>> {
    let mut seeds: Vec<MeshSeed<T>> = (0..shards)
        .map(|id| MeshSeed {
            id,
            senders: (0..shards).map(|_| None).collect(),
            receivers: (0..shards).map(|_| None).collect(),
        })
        .collect();
    for from in 0..shards {
        for to in 0..shards {
            if from != to {
                let (tx, rx) = shared_channel::new_bounded(capacity);
                seeds[from].senders[to] = Some(tx);
                seeds[to].receivers[from] = Some(rx);
            }
        }
    }
    seeds
}

/// A shard's connected senders.
pub struct Mesh<T: Send + 'static> {
    id: usize,
    senders: Vec<Option<ConnectedSender<T>>>,
}

impl<T: Send + 'static> MeshSeed<T> {
    /// Connects this shard's ends (inside its executor). Every shard must
    /// connect: a sender's connection completes with its receiver's.
    pub async fn connect(self) -> (Mesh<T>, Vec<(usize, ConnectedReceiver<T>)>) {
        // A connecting end is re-polled only when its executor wakes up, and
        // the peer's connection does not wake it: without a tick, a shard
        // that parks before its peers connect would wait forever (seen with
        // 8 shards on 2 CPUs). Tick every millisecond until connected.
        let connected = std::rc::Rc::new(std::cell::Cell::new(false));
        let ticker = {
            let connected = connected.clone();
            glommio::spawn_local(async move {
                while !connected.get() {
                    glommio::timer::sleep(std::time::Duration::from_millis(1)).await;
                }
            })
        };
        // Spawned, not awaited one by one: the peers connect in any order.
        let senders: Vec<_> =
            self.senders.into_iter().map(|s| s.map(|s| glommio::spawn_local(s.connect()).detach())).collect();
        let receivers: Vec<_> = self
            .receivers
            .into_iter()
            .enumerate()
            .filter_map(|(peer, r)| r.map(|r| (peer, glommio::spawn_local(r.connect()).detach())))
            .collect();
        let mut connected_senders = Vec::with_capacity(senders.len());
        for s in senders {
            connected_senders.push(match s {
                Some(task) => task.await,
                None => None,
            });
        }
        let mut connected_receivers = Vec::with_capacity(receivers.len());
        for (peer, task) in receivers {
            if let Some(r) = task.await {
                connected_receivers.push((peer, r));
            }
        }
        connected.set(true);
        ticker.await;
        (Mesh { id: self.id, senders: connected_senders }, connected_receivers)
    }
}

impl<T: Send + 'static> Mesh<T> {
    /// This shard's id.
    pub fn peer_id(&self) -> usize {
        self.id
    }

    /// Sends to shard `to`, waiting for room. Err(msg) if the channel is
    /// closed or `to` is this shard.
    pub async fn send_to(&self, to: usize, msg: T) -> Result<(), T> {
        match self.senders.get(to).and_then(Option::as_ref) {
            Some(s) => s.send(msg).await.map_err(|e| match e {
                glommio::GlommioError::Closed(glommio::ResourceType::Channel(m))
                | glommio::GlommioError::WouldBlock(glommio::ResourceType::Channel(m)) => m,
                _ => unreachable!("send fails only as closed"),
            }),
            None => Err(msg),
        }
    }

    /// Sends to shard `to` if there is room now.
    pub fn try_send_to(&self, to: usize, msg: T) -> Result<(), T> {
        match self.senders.get(to).and_then(Option::as_ref) {
            Some(s) => s.try_send(msg).map_err(|e| match e {
                glommio::GlommioError::Closed(glommio::ResourceType::Channel(m))
                | glommio::GlommioError::WouldBlock(glommio::ResourceType::Channel(m)) => m,
                _ => unreachable!("try_send fails only as closed or full"),
            }),
            None => Err(msg),
        }
    }
}
