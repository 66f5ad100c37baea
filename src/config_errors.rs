//! The collector of config validation errors: every check runs and every
//! failure is kept, each with its key path (`engine.segment_bytes`,
//! `clients[2].api_key`) and a message that never quotes a value (a value
//! may be a secret). `Config::validate_all`, the `[webhooks]` and
//! `[providers.*]` checks and the admin API's `400 invalid_config` use it.

/// A validation error: (key, message).
pub type KeyError = (String, String);

/// Every error found so far, in the order the checks ran.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Errors {
    list: Vec<KeyError>,
}

impl Errors {
    pub fn new() -> Errors {
        Errors::default()
    }

    /// Records `message` for `key`.
    pub fn push(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.list.push((key.into(), message.into()));
    }

    /// Records `message()` for `key` unless `ok`; returns `ok`, so a check
    /// that only makes sense after another can follow it.
    pub fn check(&mut self, ok: bool, key: &str, message: impl FnOnce() -> String) -> bool {
        if !ok {
            self.push(key, message());
        }
        ok
    }

    /// Records the error of a check that stops at its first one; returns
    /// whether it passed.
    pub fn take(&mut self, result: Result<(), KeyError>) -> bool {
        match result {
            Ok(()) => true,
            Err(e) => {
                self.list.push(e);
                false
            }
        }
    }

    /// True if an error names `key` or a key under it (`engine` covers
    /// `engine.shards`, `clients[0]` covers `clients[0].tier`).
    pub fn any_under(&self, key: &str) -> bool {
        self.list.iter().any(|(k, _)| {
            k.strip_prefix(key).is_some_and(|rest| rest.is_empty() || rest.starts_with('.') || rest.starts_with('['))
        })
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Ok if nothing was recorded, else every error.
    pub fn into_result(self) -> Result<(), Vec<KeyError>> {
        if self.list.is_empty() {
            Ok(())
        } else {
            Err(self.list)
        }
    }

    pub fn into_vec(self) -> Vec<KeyError> {
        self.list
    }
}

impl Extend<KeyError> for Errors {
    fn extend<I: IntoIterator<Item = KeyError>>(&mut self, iter: I) {
        self.list.extend(iter);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_failed_check_is_kept_in_order_and_passing_ones_add_nothing() {
        let mut e = Errors::new();
        assert!(e.check(true, "engine.shards", || unreachable!("not called when ok")));
        assert!(!e.check(false, "engine.segment_bytes", || "must be a multiple of 4096".into()));
        assert!(e.take(Ok(())));
        assert!(!e.take(Err(("webhooks.max_attempts".into(), "must be between 1 and 1000".into()))));
        e.push("clients[1].tier", "\"gold\" is not a tier");
        e.extend([("clients[10].id".to_owned(), "is used twice".to_owned())]);
        assert_eq!(e.len(), 4);
        let keys: Vec<String> = e.clone().into_vec().into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["engine.segment_bytes", "webhooks.max_attempts", "clients[1].tier", "clients[10].id"]);
        assert!(e.clone().into_result().is_err());
        assert_eq!(Errors::new().into_result(), Ok(()));
    }

    #[test]
    fn any_under_matches_a_key_and_its_children_only() {
        let mut e = Errors::new();
        e.push("engine.segment_bytes", "x");
        e.push("clients[1].tier", "x");
        assert!(e.any_under("engine"));
        assert!(e.any_under("engine.segment_bytes"));
        assert!(!e.any_under("engine.segment"), "a prefix of a name is not a parent");
        assert!(e.any_under("clients[1]") && e.any_under("clients"));
        assert!(!e.any_under("clients[10]") && !e.any_under("business"));
    }
}
