//! What authentication and authorisation read on every call, held in memory: API key rows
//! (with the principal, its registries, its centre and its bound certificates) and
//! registries.
//!
//! **Kept correct by one number.** Every change to a table these come from raises the
//! database's access epoch in the transaction of the change (triggers of migration
//! `0014_access_epoch`): a change by this instance, another instance, the admin CLI or an
//! operator in SQL alike. A call reads the epoch first, one single-row statement, and
//! uses what is held only if it was read under that same epoch; when the epoch moved,
//! everything held is dropped. So a revocation, a disabled principal, a new certificate
//! binding, a changed grant or a rotated registry key committed before a call starts
//! applies to that call, on every instance, exactly as when every call read the rows.
//! Expiry needs no epoch: the key's expiry is held and compared with the clock per call.
//!
//! **Never newer than the epoch it is filed under.** A row is filed under the epoch its
//! caller read *before* reading the row, and only while the cache is still at that epoch:
//! a row read after a change but filed under the epoch before it would only be dropped
//! early, and a row read before a change cannot be filed under the epoch after it.
//!
//! **Bounded.** Only rows that exist are held (a key id that names no key is not), at
//! most [`CAPACITY`] of each kind; when full, everything is dropped and refilled by use.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::store::{KeyRecord, Registry};

/// Most key rows (and registries) held.
pub const CAPACITY: usize = 10_000;

#[derive(Default)]
pub struct AccessCache {
    inner: Mutex<Held>,
}

#[derive(Default)]
struct Held {
    /// The epoch everything here was read under; `None` before the first call.
    epoch: Option<i64>,
    keys: HashMap<String, KeyRecord>,
    registries: HashMap<String, Registry>,
}

impl Held {
    /// Moves to `epoch` if it is newer (dropping everything); whether what is held may be
    /// used by, and filed for, a call that read `epoch`.
    fn at(&mut self, epoch: i64) -> bool {
        match self.epoch {
            Some(held) if held == epoch => true,
            Some(held) if held > epoch => false,
            _ => {
                self.epoch = Some(epoch);
                self.keys.clear();
                self.registries.clear();
                true
            }
        }
    }
}

impl AccessCache {
    pub fn new() -> AccessCache {
        AccessCache::default()
    }

    /// The key row held for `key_id`, if read under `epoch`.
    pub fn key(&self, epoch: i64, key_id: &str) -> Option<KeyRecord> {
        let mut held = self.inner.lock().ok()?;
        if !held.at(epoch) {
            return None;
        }
        held.keys.get(key_id).cloned()
    }

    /// Holds `record`, read after the caller read `epoch`.
    pub fn hold_key(&self, epoch: i64, key_id: &str, record: &KeyRecord) {
        if let Ok(mut held) = self.inner.lock()
            && held.at(epoch)
        {
            if held.keys.len() >= CAPACITY {
                held.keys.clear();
            }
            held.keys.insert(key_id.to_owned(), record.clone());
        }
    }

    /// The registry held for `code`, if read under `epoch`.
    pub fn registry(&self, epoch: i64, code: &str) -> Option<Registry> {
        let mut held = self.inner.lock().ok()?;
        if !held.at(epoch) {
            return None;
        }
        held.registries.get(code).cloned()
    }

    /// Holds `registry`, read after the caller read `epoch`.
    pub fn hold_registry(&self, epoch: i64, registry: &Registry) {
        if let Ok(mut held) = self.inner.lock()
            && held.at(epoch)
        {
            if held.registries.len() >= CAPACITY {
                held.registries.clear();
            }
            held.registries
                .insert(registry.code.clone(), registry.clone());
        }
    }

    /// Key rows held (for tests and metrics).
    pub fn keys_held(&self) -> usize {
        self.inner.lock().map(|h| h.keys.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{Principal, Role};
    use std::collections::BTreeSet;

    fn record(name: &str) -> KeyRecord {
        KeyRecord {
            secret_hash: "h".into(),
            expires_at: None,
            revoked_at: None,
            principal_disabled: false,
            principal: Principal {
                id: 1,
                name: name.into(),
                role: Role::Researcher,
                centre: None,
                registries: BTreeSet::new(),
            },
            bound_certificates: vec![],
        }
    }

    fn registry(code: &str, version: i64) -> Registry {
        Registry {
            id: 13,
            code: code.into(),
            name: "lung".into(),
            active_key_version: version,
            min_cell_count: 5,
            protection_level: 1,
        }
    }

    #[test]
    fn what_is_held_is_used_only_under_the_epoch_it_was_read_under() {
        let cache = AccessCache::new();
        assert!(cache.key(1, "k").is_none());
        cache.hold_key(1, "k", &record("a"));
        cache.hold_registry(1, &registry("ERN-LUNG", 1));
        assert_eq!(cache.key(1, "k").unwrap().principal.name, "a");
        assert_eq!(cache.registry(1, "ERN-LUNG").unwrap().active_key_version, 1);
        // A change anywhere raised the epoch: nothing held is used, and it is gone.
        assert!(cache.key(2, "k").is_none());
        assert!(cache.registry(2, "ERN-LUNG").is_none());
        assert_eq!(cache.keys_held(), 0);
    }

    #[test]
    fn a_row_read_before_a_change_is_never_filed_under_the_epoch_after_it() {
        let cache = AccessCache::new();
        // Call A reads epoch 1, then (slowly) the row; meanwhile a revocation raises
        // the epoch and call B moves the cache to 2.
        assert!(cache.key(1, "k").is_none());
        assert!(cache.key(2, "k").is_none());
        cache.hold_key(1, "k", &record("stale"));
        cache.hold_registry(1, &registry("ERN-LUNG", 1));
        assert!(cache.key(2, "k").is_none(), "the stale row was filed");
        assert!(cache.registry(2, "ERN-LUNG").is_none());
        // And a call that read the older epoch does not use what the newer one holds.
        cache.hold_key(2, "k", &record("fresh"));
        assert!(cache.key(1, "k").is_none());
        assert_eq!(cache.key(2, "k").unwrap().principal.name, "fresh");
    }

    #[test]
    fn it_is_bounded() {
        let cache = AccessCache::new();
        for i in 0..CAPACITY + 5 {
            cache.hold_key(1, &format!("k{i}"), &record("a"));
        }
        assert!(cache.keys_held() <= CAPACITY);
    }
}
