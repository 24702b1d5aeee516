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
//!
//! **One read of the epoch for many calls.** Under load, hundreds of calls start while
//! one read of the epoch is under way. A call may use any read that *began after the
//! call did* (it sees every change committed before the call started), so [`EpochReads`]
//! keeps at most one read in flight: calls that arrive meanwhile wait for the next one,
//! which starts as soon as the current one ends and answers them all. A call never uses a
//! read that began before it. On SQLite, whose reads run in place on the calling task
//! (`store::readers`) in a few microseconds, each call reads the epoch itself instead:
//! sharing a read would cost a task and a wake-up per call, more than the read.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use crate::store::{KeyRecord, Registry, Store};

/// Reads the epoch from the database; `None` if the read failed (the caller then reads
/// on its own, and gets the database's error).
pub type ReadEpoch =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Option<i64>> + Send>> + Send + Sync>;

/// Coalesced reads of the access epoch (see the module's doc).
pub struct EpochReads {
    read: ReadEpoch,
    queue: Arc<Mutex<Queue>>,
}

#[derive(Default)]
struct Queue {
    /// Whether a reader task runs.
    reading: bool,
    /// Calls waiting for a read that begins after they arrived.
    waiting: Vec<oneshot::Sender<Option<i64>>>,
}

impl EpochReads {
    pub fn new(read: ReadEpoch) -> EpochReads {
        EpochReads {
            read,
            queue: Arc::new(Mutex::new(Queue::default())),
        }
    }

    /// Reads of `store`'s epoch.
    pub fn of(store: Store) -> EpochReads {
        EpochReads::new(Arc::new(move || {
            let store = store.clone();
            Box::pin(async move { store.access_epoch().await.ok() })
        }))
    }

    /// The epoch, from a read that began after this call; `None` if that read failed.
    pub async fn read(&self) -> Option<i64> {
        let (tx, rx) = oneshot::channel();
        let start = {
            let Ok(mut queue) = self.queue.lock() else {
                return None;
            };
            queue.waiting.push(tx);
            !std::mem::replace(&mut queue.reading, true)
        };
        if start {
            let read = self.read.clone();
            let queue = self.queue.clone();
            tokio::spawn(async move {
                // Whatever happens to this task, the next call starts a reader again.
                let _reset = ResetOnDrop(queue.clone());
                loop {
                    let batch = match queue.lock() {
                        Ok(mut q) if !q.waiting.is_empty() => std::mem::take(&mut q.waiting),
                        _ => break,
                    };
                    // Every call in `batch` arrived before this read begins.
                    let epoch = read().await;
                    for waiter in batch {
                        let _ = waiter.send(epoch);
                    }
                }
            });
        }
        rx.await.ok().flatten()
    }
}

/// Marks the reader as stopped, under the queue's lock (so a call that queued just before
/// is served by the reader it then starts).
struct ResetOnDrop(Arc<Mutex<Queue>>);

impl Drop for ResetOnDrop {
    fn drop(&mut self) {
        if let Ok(mut queue) = self.0.lock() {
            queue.reading = false;
            // A reader that ends (or dies) with calls still queued hands them a failed
            // read: each then reads on its own.
            for waiter in queue.waiting.drain(..) {
                let _ = waiter.send(None);
            }
        }
    }
}

/// Most key rows (and registries) held.
pub const CAPACITY: usize = 10_000;

#[derive(Default)]
pub struct AccessCache {
    inner: Mutex<Held>,
}

impl std::fmt::Debug for EpochReads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EpochReads")
    }
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
    use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
    use tokio::sync::Semaphore;

    /// A database whose epoch reads wait for `gate` and return the value at their start.
    struct FakeDb {
        epoch: AtomicI64,
        reads: AtomicUsize,
        gate: Semaphore,
    }

    fn reads_of(db: &Arc<FakeDb>) -> EpochReads {
        let db = db.clone();
        EpochReads::new(Arc::new(move || {
            let db = db.clone();
            Box::pin(async move {
                db.reads.fetch_add(1, Ordering::SeqCst);
                let at_start = db.epoch.load(Ordering::SeqCst);
                db.gate.acquire().await.ok()?.forget();
                Some(at_start)
            })
        }))
    }

    #[tokio::test]
    async fn concurrent_calls_share_reads_and_none_uses_a_read_begun_before_it() {
        let db = Arc::new(FakeDb {
            epoch: AtomicI64::new(1),
            reads: AtomicUsize::new(0),
            gate: Semaphore::new(0),
        });
        let reads = Arc::new(reads_of(&db));
        // A first call: its read begins and waits at the gate.
        let first = tokio::spawn({
            let reads = reads.clone();
            async move { reads.read().await }
        });
        while db.reads.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        // A change commits, then a hundred calls start: none may get the first read.
        db.epoch.store(2, Ordering::SeqCst);
        let later: Vec<_> = (0..100)
            .map(|_| {
                let reads = reads.clone();
                tokio::spawn(async move { reads.read().await })
            })
            .collect();
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        db.gate.add_permits(1000);
        assert_eq!(first.await.unwrap(), Some(1));
        for call in later {
            assert_eq!(
                call.await.unwrap(),
                Some(2),
                "a call used a read begun before it"
            );
        }
        // The hundred shared one read (two at most, if the first ended early).
        let n = db.reads.load(Ordering::SeqCst);
        assert!((2..=3).contains(&n), "{n} reads for 101 calls");
        // And the reader stops when idle, and starts again for the next call.
        db.epoch.store(3, Ordering::SeqCst);
        assert_eq!(reads.read().await, Some(3));
    }

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
