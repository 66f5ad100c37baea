//! What one esh3ar core owns.
//!
//! Each shard (one per CPU) owns a journal, the index of the messages whose
//! recipients live on it, and the sequence numbers behind tracking ids. This
//! crate holds that state and its on-disk format. The format
//! ([`record`], [`commit`], [`scan`]), the group-commit planner
//! ([`group_commit`]), the index and the limiter are pure and unit-tested
//! without a runtime; disk I/O goes through [`storage`] (the journal writer)
//! or plain blocking reads ([`recovery`], before a shard serves). This crate
//! does no socket I/O.

pub mod commit;
pub mod group_commit;
pub mod id;
pub mod index;
pub mod journal;
pub mod limiter;
pub mod limits;
pub mod record;
pub mod recovery;
pub mod routing;
pub mod scan;
pub mod storage;

/// Delivery priority of a message. The numeric value is the on-disk code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Priority {
    /// Delivered and journaled ahead of the others.
    High = 0,
    /// The default.
    Normal = 1,
    /// Shed first under load.
    Low = 2,
}

impl Priority {
    /// Decodes the on-disk code.
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::High),
            1 => Some(Self::Normal),
            2 => Some(Self::Low),
            _ => None,
        }
    }
    /// The API name: `high`, `normal` or `low`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::High => "high",
            Self::Normal => "normal",
            Self::Low => "low",
        }
    }
    /// Parses the API name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "high" => Some(Self::High),
            "normal" => Some(Self::Normal),
            "low" => Some(Self::Low),
            _ => None,
        }
    }
}

/// Status of a message. `Accepted` and `Delivered` are unsettled; the rest
/// are settled (the message will never be delivered again).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Status {
    /// Durable in the journal, not yet written to a connection.
    Accepted = 0,
    /// Written to at least one connection, not yet acknowledged.
    Delivered = 1,
    /// Acknowledged by the recipient.
    Acked = 2,
    /// Its TTL passed before an acknowledgement.
    Expired = 3,
    /// Given up for another reason.
    Failed = 4,
}

impl Status {
    /// Decodes the on-disk code.
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::Accepted),
            1 => Some(Self::Delivered),
            2 => Some(Self::Acked),
            3 => Some(Self::Expired),
            4 => Some(Self::Failed),
            _ => None,
        }
    }
    /// The API name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::Delivered => "delivered",
            Self::Acked => "acked",
            Self::Expired => "expired",
            Self::Failed => "failed",
        }
    }
    /// Settled messages are never delivered again.
    pub fn is_settled(self) -> bool {
        matches!(self, Self::Acked | Self::Expired | Self::Failed)
    }
}
