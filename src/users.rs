//! The user directory and opt-out, on each user's home shard.
//!
//! A user enters the directory when they first connect over WebSocket
//! ([`Shard::enter_directory`]) or when an operator registers them
//! (`PUT /v1/users/{id}`, [`Shard::put_user_local`]). A phone blocks or
//! unblocks a sender with a WebSocket frame ([`Shard::set_block`]). Every
//! change journals the user's whole entry (`Record::User`), so the index
//! rebuilds the directory on recovery like everything else.
//!
//! Messages are refused after acceptance, never on the accept path: the
//! home shard checks the directory as it appends each message
//! (`Shard::append_local`) and journals a `Rejected` status right after the
//! `Accepted` record, in the same commit ([`Shard::reject`]).

use std::rc::Rc;

use esh3ar_shards::directory::{UserDraft, UserEntry};
use esh3ar_shards::index::MessageIndex;
use esh3ar_shards::limits::{BLOCKED_CLIENTS_PER_USER_MAX, EMAIL_BYTES_MAX, PHONE_BYTES_MAX};
use esh3ar_shards::record::{Record, StatusChange};
use esh3ar_shards::{Reason, Status};

use crate::clock::now_ms;
use crate::mesh_msg::{AppendRefusal, MeshMsg, UserPut};
use crate::shard::Shard;

/// Most directory entries maintenance journals again in one pass.
pub const CARRY_PER_PASS_MAX: usize = 10_000;

/// What `GET /v1/users/{id}` shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserView {
    pub id: String,
    pub phone: Option<String>,
    pub email: Option<String>,
    pub first_seen_at_ms: u64,
    pub blocked: Vec<String>,
}

impl UserView {
    fn of(id: &str, e: &UserEntry) -> UserView {
        UserView {
            id: id.to_owned(),
            phone: e.phone.as_deref().map(str::to_owned),
            email: e.email.as_deref().map(str::to_owned),
            first_seen_at_ms: e.first_seen_at_ms,
            blocked: e.blocked.iter().map(|c| c.to_string()).collect(),
        }
    }
}

/// Why a block or unblock was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockError {
    /// No business client has this id.
    UnknownClient,
    /// The user already blocks [`BLOCKED_CLIENTS_PER_USER_MAX`] senders.
    TooManyBlocks,
    /// The journal refused the change.
    Journal(AppendRefusal),
}

/// True for a phone number in E.164 form: `+`, then 7 to 15 digits, the
/// first not 0.
pub fn valid_phone(s: &str) -> bool {
    let Some(digits) = s.strip_prefix('+') else { return false };
    s.len() <= PHONE_BYTES_MAX
        && (7..=15).contains(&digits.len())
        && digits.bytes().all(|b| b.is_ascii_digit())
        && !digits.starts_with('0')
}

/// True for a plausible email address: one `@`, a local part of 1 to 64
/// printable ASCII characters without spaces or specials, and a domain of
/// dot-separated labels (letters, digits, `-`, not at either end), at
/// least two of them; at most [`EMAIL_BYTES_MAX`] bytes in all.
pub fn valid_email(s: &str) -> bool {
    let Some((local, domain)) = s.split_once('@') else { return false };
    let local_ok = (1..=64).contains(&local.len())
        && local.bytes().all(|b| b.is_ascii_graphic() && !b"\"(),:;<>@[\\]".contains(&b))
        && !local.starts_with('.')
        && !local.ends_with('.');
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    s.len() <= EMAIL_BYTES_MAX && local_ok && domain.split('.').count() >= 2 && domain.split('.').all(label_ok)
}

impl Shard {
    /// Puts `user` (homed here) in the directory on their first connection.
    /// Not awaited: a crash that loses the record loses no message after
    /// it (the journal keeps order), and the next connection adds it again.
    pub fn enter_directory(&self, user: &str) -> Result<(), AppendRefusal> {
        let mut index = self.index().borrow_mut();
        if index.user(user).is_some() {
            return Ok(());
        }
        let draft = UserDraft::new(now_ms());
        self.journal_user(&mut index, user, &draft).map(|_| ())
    }

    /// Blocks (or unblocks) `client` for `user`. Blocking also rejects the
    /// user's unsettled messages from that client (`recipient_opted_out`),
    /// delivered-but-unacked ones included, so none is delivered again.
    /// Returns the generation to wait for before confirming.
    pub fn set_block(&self, user: &str, client: &str, blocked: bool) -> Result<u64, BlockError> {
        if self.clients().index_of(client).is_none() {
            return Err(BlockError::UnknownClient);
        }
        let mut index = self.index().borrow_mut();
        let mut draft = index.user(user).map_or_else(|| UserDraft::new(now_ms()), UserEntry::draft);
        let already = draft.blocked.iter().any(|c| c == client);
        if blocked == already && index.user(user).is_some() {
            return Ok(self.journal().appended_generation()); // nothing changes
        }
        if blocked {
            if draft.blocked.len() >= BLOCKED_CLIENTS_PER_USER_MAX {
                return Err(BlockError::TooManyBlocks);
            }
            draft.blocked.push(client.to_owned());
        } else {
            draft.blocked.retain(|c| c != client);
        }
        let mut generation = self.journal_user(&mut index, user, &draft).map_err(BlockError::Journal)?;
        if blocked {
            let pending = index.unsettled_from(user, client);
            generation = self.reject(&mut index, &pending, Reason::RecipientOptedOut).map_err(BlockError::Journal)?;
            drop(index);
            let mut bodies = self.bodies().borrow_mut();
            for seq in pending {
                bodies.remove(seq);
            }
        }
        Ok(generation)
    }

    /// `PUT /v1/users/{id}` on the home shard: sets the contact fields
    /// (absent ones are cleared) and enters the user in the directory.
    /// Returns the generation to wait for and the entry as it now is.
    pub fn put_user_local(
        &self,
        user: &str,
        phone: Option<&str>,
        email: Option<&str>,
    ) -> Result<(u64, UserView), AppendRefusal> {
        let mut index = self.index().borrow_mut();
        let mut draft = index.user(user).map_or_else(|| UserDraft::new(now_ms()), UserEntry::draft);
        draft.phone = phone.unwrap_or_default().to_owned();
        draft.email = email.unwrap_or_default().to_owned();
        let generation = self.journal_user(&mut index, user, &draft)?;
        let text = |s: &str| (!s.is_empty()).then(|| s.to_owned());
        let view = UserView {
            id: user.to_owned(),
            phone: text(&draft.phone),
            email: text(&draft.email),
            first_seen_at_ms: draft.first_seen_at_ms,
            blocked: draft.blocked,
        };
        Ok((generation, view))
    }

    /// On the home shard: [`Shard::put_user_local`] for another shard
    /// (the admin listener's), answered once durable from a task of its own.
    pub fn answer_put_user(self: &Rc<Self>, from: u16, req: u64, put: UserPut) {
        let put = self.put_user_local(&put.user, put.phone.as_deref(), put.email.as_deref());
        let shard = self.clone();
        glommio::spawn_local(async move {
            let result = match put {
                Ok((generation, view)) => match shard.journal().wait_durable(generation).await {
                    Ok(()) => Ok(Some(Box::new(view))),
                    Err(e) => Err(AppendRefusal::from(&e)),
                },
                Err(e) => Err(e),
            };
            let _ = shard.send(from as usize, MeshMsg::UserFound { req, result }).await;
        })
        .detach();
    }

    /// `GET /v1/users/{id}` on the home shard.
    pub fn user_view_local(&self, user: &str) -> Option<UserView> {
        self.index().borrow().user(user).map(|e| UserView::of(user, e))
    }

    /// Journals again the directory entries that alone keep the oldest
    /// segments from deletion, so those segments can go once the copies
    /// are durable (see [`Shard::directory_durable`]).
    pub fn carry_directory_forward(&self) -> Result<(), AppendRefusal> {
        let mut index = self.index().borrow_mut();
        let users = index.users_to_carry(self.journal().oldest_unflushed_segment(), CARRY_PER_PASS_MAX);
        for user in &users {
            let Some(draft) = index.user(user).map(UserEntry::draft) else { continue };
            self.journal_user(&mut index, user, &draft)?;
        }
        if !users.is_empty() {
            tracing::debug!(shard = self.id(), count = users.len(), "carried directory entries forward");
        }
        Ok(())
    }

    /// Waits until every directory record appended so far is durable; true
    /// if none was appended meanwhile either, so segments may be deleted
    /// now: an entry's latest record is on disk wherever the index says it
    /// is, so the old copies are no longer needed.
    pub async fn directory_durable(&self) -> bool {
        let generation = self.user_generation().get();
        if self.journal().wait_durable(generation).await.is_err() {
            return false;
        }
        self.journal().durable_generation() >= self.user_generation().get()
    }

    /// Journals `seqs` as rejected for `reason`, each owing its sender an
    /// event where the client wants it, and wakes the receipts task.
    /// Returns the generation of the last record.
    pub fn reject(&self, index: &mut MessageIndex, seqs: &[u64], reason: Reason) -> Result<u64, AppendRefusal> {
        let at_ms = now_ms();
        let mut generation = self.journal().appended_generation();
        let mut owed = false;
        for &seq in seqs {
            let notify = crate::receipts::owes_event(self, index, seq, Status::Rejected);
            let record = Record::Status(StatusChange { seq, status: Status::Rejected, at_ms, notify, reason });
            generation = self.journal().append(&record, index).map_err(|e| AppendRefusal::from(&e))?.generation;
            self.metrics().messages(Status::Rejected, 1);
            owed |= notify;
        }
        if owed {
            self.events_ready().notify_all();
        }
        Ok(generation)
    }

    fn journal_user(&self, index: &mut MessageIndex, user: &str, draft: &UserDraft) -> Result<u64, AppendRefusal> {
        let appended = draft.with_record(user, |record| self.journal().append(record, index));
        let generation = appended.map_err(|e| AppendRefusal::from(&e))?.generation;
        self.user_generation().set(generation);
        Ok(generation)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phones_are_e164() {
        for ok in ["+966512345678", "+14155552671", "+4930123"] {
            assert!(valid_phone(ok), "{ok}");
        }
        for bad in ["966512345678", "+0123456789", "+12", "+1234567890123456", "+96651234567a", "+", ""] {
            assert!(!valid_phone(bad), "{bad}");
        }
    }

    #[test]
    fn emails_are_plausible() {
        for ok in ["a@b.co", "first.last+tag@mail.example.sa", "x_y@sub-domain.example.com"] {
            assert!(valid_email(ok), "{ok}");
        }
        let long = format!("{}@example.com", "a".repeat(65));
        for bad in ["", "a", "a@b", "@b.co", "a@@b.co", "a b@c.co", "a@-b.co", "a@b..co", ".a@b.co", long.as_str()] {
            assert!(!valid_email(bad), "{bad}");
        }
    }
}
