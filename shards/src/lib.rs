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

pub mod cold;
pub mod commit;
pub mod directory;
pub mod feed;
pub mod group_commit;
pub mod histogram;
pub mod id;
pub mod idempotency;
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
    /// Given up for another reason (see its [`Reason`]).
    Failed = 4,
    /// Refused after acceptance by asynchronous validation (see its [`Reason`]).
    Rejected = 5,
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
            5 => Some(Self::Rejected),
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
            Self::Rejected => "rejected",
        }
    }
    /// Settled messages are never delivered again.
    pub fn is_settled(self) -> bool {
        matches!(self, Self::Acked | Self::Expired | Self::Failed | Self::Rejected)
    }

    /// The event a transition to this status owes the sender, if any:
    /// `message.delivered`, `.acked`, `.expired`, `.failed`, `.rejected`.
    pub fn event_type(self) -> Option<&'static str> {
        match self {
            Self::Accepted => None,
            Self::Delivered => Some("message.delivered"),
            Self::Acked => Some("message.acked"),
            Self::Expired => Some("message.expired"),
            Self::Failed => Some("message.failed"),
            Self::Rejected => Some("message.rejected"),
        }
    }

    /// The bit of this status in an event set ([`EventSet`]).
    pub fn event_bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// A set of statuses whose events are owed (bit `1 << status`).
pub type EventSet = u8;

/// Every status whose change owes the sender an event.
pub const EVENT_STATUSES: [Status; 5] =
    [Status::Delivered, Status::Acked, Status::Expired, Status::Rejected, Status::Failed];

/// The set of every event.
pub const ALL_EVENTS: EventSet = {
    let mut set = 0;
    let mut i = 0;
    while i < EVENT_STATUSES.len() {
        set |= 1 << (EVENT_STATUSES[i] as u8);
        i += 1;
    }
    set
};

/// A way to reach a user: the app (WebSocket) or a fallback channel. The
/// numeric value is the on-disk code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Channel {
    /// The esh3ar app over WebSocket.
    App = 0,
    /// WhatsApp (Cloud API), to the directory's `phone`.
    WhatsApp = 1,
    /// Email (SMTP), to the directory's `email`.
    Email = 2,
}

impl Channel {
    /// The fallback channels, in their default order.
    pub const FALLBACKS: [Channel; 2] = [Channel::WhatsApp, Channel::Email];

    /// Decodes the on-disk code.
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::App),
            1 => Some(Self::WhatsApp),
            2 => Some(Self::Email),
            _ => None,
        }
    }
    /// The API name: `app`, `whatsapp`, `email`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::App => "app",
            Self::WhatsApp => "whatsapp",
            Self::Email => "email",
        }
    }
    /// Parses a fallback channel's API name (`app` is not one).
    pub fn parse_fallback(s: &str) -> Option<Self> {
        Self::FALLBACKS.into_iter().find(|c| c.as_str() == s)
    }
}

/// An ordered list of at most two distinct fallback channels, packed in one
/// byte (first channel in the low nibble, second in the high; 0 = none).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct ChannelList(pub u8);

impl ChannelList {
    /// Builds a list; None for a repeated channel, `app`, or more than two.
    pub fn of(channels: &[Channel]) -> Option<Self> {
        let mut packed = 0u8;
        for (i, &c) in channels.iter().enumerate() {
            if i >= 2 || c == Channel::App || channels[..i].contains(&c) {
                return None;
            }
            packed |= (c as u8) << (4 * i);
        }
        Some(Self(packed))
    }
    /// The channels, in order.
    pub fn iter(self) -> impl Iterator<Item = Channel> {
        [self.0 & 0xf, self.0 >> 4].into_iter().map_while(|c| Channel::from_u8(c).filter(|&c| c != Channel::App))
    }
    /// The channel at position `i`.
    pub fn get(self, i: usize) -> Option<Channel> {
        self.iter().nth(i)
    }
    /// True when the list names no channel.
    pub fn is_empty(self) -> bool {
        self.iter().next().is_none()
    }
}

/// Why a message was rejected or failed. The numeric value is the on-disk code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Reason {
    /// No reason (statuses other than rejected and failed).
    None = 0,
    /// The recipient blocked the sender.
    RecipientOptedOut = 1,
    /// `validation.known_recipients_only` and the recipient is not in the directory.
    UnknownRecipient = 2,
    /// Every delivery channel was tried and failed.
    ChannelsExhausted = 3,
}

impl Reason {
    /// Decodes the on-disk code.
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::None),
            1 => Some(Self::RecipientOptedOut),
            2 => Some(Self::UnknownRecipient),
            3 => Some(Self::ChannelsExhausted),
            _ => None,
        }
    }
    /// The API name (`reason` in statuses and events); None for [`Reason::None`].
    pub fn as_str(self) -> Option<&'static str> {
        match self {
            Self::None => None,
            Self::RecipientOptedOut => Some("recipient_opted_out"),
            Self::UnknownRecipient => Some("unknown_recipient"),
            Self::ChannelsExhausted => Some("channels_exhausted"),
        }
    }
}
