//! The user directory of one shard: the users homed here who connected at
//! least once or were registered by an operator, with their contact fields
//! and the senders each one blocked.
//!
//! Like the rest of the index it is a pure function of the journal: each
//! change journals the user's whole entry ([`UserRecord`]), and
//! [`crate::index::MessageIndex::apply`] keeps the latest one. Because the
//! latest record supersedes the others, an entry needs exactly one record on
//! disk: the segment holding it stays until maintenance appends the entry
//! again to a newer segment (see `MessageIndex::users_to_carry`).

use std::rc::Rc;

use crate::record::{ClientList, Record, UserRecord};

/// Bytes one directory entry costs in memory, for the memory budget: the
/// map slot (key `Rc<str>` 16 + [`UserEntry`] 72, at most 7/8 full, plus a
/// control byte), the interned id's allocation (16 + its bytes) and its
/// interner slot (17), rounded up; contact fields and blocked ids (16 bytes
/// each, the ids shared with the index) come on top.
pub const USER_ENTRY_BYTES: usize = 192;

// The size `USER_ENTRY_BYTES` and docs/ARCHITECTURE.md count on.
const _: () = assert!(std::mem::size_of::<UserEntry>() <= 72);

/// What the shard knows about one user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserEntry {
    /// Unix ms the user entered the directory.
    pub first_seen_at_ms: u64,
    /// Phone number (E.164), if registered.
    pub phone: Option<Box<str>>,
    /// Email address, if registered.
    pub email: Option<Box<str>>,
    /// Client ids the user blocked (a few at most: a linear scan is fastest).
    pub blocked: Vec<Rc<str>>,
    /// Segment holding the entry's latest record.
    pub segment: u64,
}

impl UserEntry {
    /// True when the user blocked `client`.
    pub fn blocks(&self, client: &str) -> bool {
        self.blocked.iter().any(|c| &**c == client)
    }

    /// An owned copy to change and journal.
    pub fn draft(&self) -> UserDraft {
        UserDraft {
            first_seen_at_ms: self.first_seen_at_ms,
            phone: self.phone.as_deref().unwrap_or_default().to_owned(),
            email: self.email.as_deref().unwrap_or_default().to_owned(),
            blocked: self.blocked.iter().map(|c| c.to_string()).collect(),
        }
    }
}

/// A user's entry as it is about to be journaled (empty strings: absent).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserDraft {
    /// Unix ms the user entered the directory.
    pub first_seen_at_ms: u64,
    /// Phone number, or empty.
    pub phone: String,
    /// Email address, or empty.
    pub email: String,
    /// Blocked client ids.
    pub blocked: Vec<String>,
}

impl UserDraft {
    /// A user entering the directory at `now_ms`.
    pub fn new(now_ms: u64) -> UserDraft {
        UserDraft { first_seen_at_ms: now_ms, ..UserDraft::default() }
    }

    /// Calls `f` with the record of this entry for `user`.
    pub fn with_record<R>(&self, user: &str, f: impl FnOnce(&Record<'_>) -> R) -> R {
        let mut buf = Vec::new();
        let blocked = ClientList::build(self.blocked.iter().map(String::as_str), &mut buf);
        f(&Record::User(UserRecord {
            user,
            first_seen_at_ms: self.first_seen_at_ms,
            phone: &self.phone,
            email: &self.email,
            blocked,
        }))
    }
}

/// The entry a record states, its strings interned by `intern`.
pub(crate) fn entry_of(u: &UserRecord<'_>, segment: u64, mut intern: impl FnMut(&str) -> Rc<str>) -> UserEntry {
    let text = |s: &str| (!s.is_empty()).then(|| Box::from(s));
    UserEntry {
        first_seen_at_ms: u.first_seen_at_ms,
        phone: text(u.phone),
        email: text(u.email),
        blocked: u.blocked.iter().map(&mut intern).collect(),
        segment,
    }
}
