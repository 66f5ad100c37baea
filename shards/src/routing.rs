//! Home shards: which core owns a user or a client.

/// The shard that owns everything about `key` (a user id or a client id):
/// its journal records, pending queue and live connections.
///
/// Stable across restarts as long as the shard count is unchanged; the
/// engine refuses to start on a data directory made with another count.
pub fn home_shard(key: &[u8], shards: usize) -> usize {
    assert!(shards > 0, "shard count must be positive");
    (seahash::hash(key) % shards as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spreads_users_over_shards() {
        let mut counts = [0usize; 4];
        for i in 0..4000 {
            counts[home_shard(format!("user-{i}").as_bytes(), 4)] += 1;
        }
        for c in counts {
            assert!((800..1200).contains(&c), "uneven spread: {counts:?}");
        }
    }

    #[test]
    fn is_stable() {
        assert_eq!(home_shard(b"alice", 8), home_shard(b"alice", 8));
        assert_eq!(home_shard(b"alice", 1), 0);
    }
}
