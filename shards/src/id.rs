//! Tracking ids: the home shard and a per-shard sequence number, as an
//! opaque URL-safe string, so a status lookup goes straight to the owner.

/// A decoded tracking id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TrackingId {
    /// The home shard of the recipient.
    pub shard: u16,
    /// The sequence number within that shard's journal.
    pub seq: u64,
}

const ALPHABET: &[u8; 32] = b"0123456789abcdefghjkmnpqrstvwxyz"; // Crockford base32, lower case
/// Length of an encoded id: 80 bits in base32.
pub const ENCODED_LEN: usize = 16;

impl TrackingId {
    /// Encodes as 16 lower-case base32 characters.
    pub fn encode(self) -> [u8; ENCODED_LEN] {
        let v: u128 = ((self.shard as u128) << 64) | self.seq as u128;
        let mut out = [0u8; ENCODED_LEN];
        for (i, slot) in out.iter_mut().enumerate() {
            let shift = 5 * (ENCODED_LEN - 1 - i);
            *slot = ALPHABET[((v >> shift) & 31) as usize];
        }
        out
    }

    /// Encodes as a `String`.
    pub fn to_string_id(self) -> String {
        String::from_utf8(self.encode().to_vec()).expect("alphabet is ASCII")
    }

    /// Decodes an id; `None` for anything that is not one we minted.
    pub fn decode(s: &[u8]) -> Option<Self> {
        if s.len() != ENCODED_LEN {
            return None;
        }
        let mut v: u128 = 0;
        for &c in s {
            let d = ALPHABET.iter().position(|&a| a == c)? as u128;
            v = (v << 5) | d;
        }
        Some(Self { shard: (v >> 64) as u16, seq: v as u64 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn roundtrips(shard: u16, seq: u64) {
            let id = TrackingId { shard, seq };
            prop_assert_eq!(TrackingId::decode(&id.encode()), Some(id));
        }
        #[test]
        fn garbage_never_panics(s in "\\PC{0,40}") {
            let _ = TrackingId::decode(s.as_bytes());
        }
    }

    #[test]
    fn rejects_foreign_strings() {
        assert_eq!(TrackingId::decode(b"short"), None);
        assert_eq!(TrackingId::decode(b"UUUUUUUUUUUUUUUU"), None);
    }
}
