//! Short reads on the request path (a case, a consent history, an erasure receipt, the
//! access epoch of every call) on SQLite's own read-only connections, run in place on the
//! task that asks.
//!
//! Through sqlx's SQLite driver every statement is handed to the connection's worker
//! thread and its rows handed back: two thread switches and a copy of every value per
//! statement. A profile of GetCase at 64 calls in flight put 40% of the server's CPU on
//! those worker threads. A read here is a direct call into the engine instead, the way the
//! writer already writes (`super::writer`): the statement is prepared once per connection
//! and kept, and its rows are read as it steps.
//!
//! **What may run here.** A read in place holds its runtime thread until it ends, so only
//! reads found through a unique key and bounded by one patient go here: one case with its
//! versions, one patient's consent history, one receipt, one row of the epoch, and the
//! ids of the code releases in force (a handful of rows, every ten seconds). Each costs
//! tens of microseconds when its pages are in the OS's cache, less than the hand-off it
//! replaces (docs/benchmarks.md). Anything that walks many rows stays on sqlx's pool:
//! research, the audit log, and ExportPhenopackets, whose page of at most 200 cases may
//! have to pass over many cases whose consent ended.
//!
//! **What may keep it waiting.** In WAL mode a reader does not wait for the writer: it reads
//! the last commit before it began. It waits for a lock only while another connection
//! recovers the WAL after a crash, and then for at most [`BUSY_TIMEOUT_MS`] in SQLite's
//! busy handler (the call is answered UNAVAILABLE, to be retried); SQLite's own retries
//! when a read begins during a checkpoint's reset of the WAL are short and rare. It waits for the disk like any read: a disk that hangs
//! hangs the reads in place with the runtime threads they hold, where through sqlx it hung
//! sqlx's threads (and the writer's thread either way).
//!
//! **Least privilege.** The connections are opened read-only: a statement that would write
//! fails. They see every commit acknowledged before the read began, as sqlx's do.
//!
//! **How many.** A lease is taken for one read and given back when dropped; a connection
//! left inside a transaction is closed instead. At most [`MAX_CONNECTIONS`] are open; when
//! all are out, or one cannot be opened (the first failure is logged as a warning, and
//! none is tried again for five seconds), the read takes a connection of sqlx's pool
//! instead ([`Reader::Pool`]), as every read does on PostgreSQL. [`LiteReaders::close`]
//! closes them when the store closes; dropping the store closes them too.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use super::Result;
use super::db::{Conn, Db, Pool};

/// Most read-only connections open at once (the pool's default size, `--db-max-connections`).
pub const MAX_CONNECTIONS: usize = 16;

/// How long a read in place waits for a lock (only held while the WAL is recovered).
pub const BUSY_TIMEOUT_MS: u32 = 100;

/// SQLite's page cache per read-only connection, in KiB (SQLite's default is 2 MiB).
const CACHE_KIB: i64 = 8 * 1024;

/// The read-only connections of one SQLite database file.
pub(in crate::store) struct LiteReaders {
    path: PathBuf,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    idle: Vec<rusqlite::Connection>,
    /// Connections open: idle, leased, or being opened.
    open: usize,
    closed: bool,
    /// When the last open failed, or a retry after one began: for [`RETRY_OPEN_AFTER`]
    /// reads go to the pool without trying (one read retries per period).
    failed_at: Option<Instant>,
    /// Whether the last open failed (the first failure of a run is a warning).
    failing: bool,
}

/// How long after a failed open reads use the pool before the next open is tried.
const RETRY_OPEN_AFTER: Duration = Duration::from_secs(5);

impl std::fmt::Debug for LiteReaders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.state();
        f.debug_struct("LiteReaders")
            .field("path", &self.path)
            .field("idle", &state.idle.len())
            .field("open", &state.open)
            .finish()
    }
}

/// A connection being opened, counted in [`State::open`]: the count is released when this
/// is dropped, unless [`Opening::leased`] handed it to a lease. It travels with the open
/// to its blocking thread and back, so a connection whose reader gave up waiting (the call
/// was cancelled) is closed before its count is released.
struct Opening {
    home: Arc<LiteReaders>,
    counted: bool,
}

impl Opening {
    fn leased(mut self, conn: rusqlite::Connection) -> Lease {
        self.counted = false;
        Lease::of(&self.home, conn)
    }
}

impl Drop for Opening {
    fn drop(&mut self) {
        if self.counted {
            self.home.state().open -= 1;
        }
    }
}

impl LiteReaders {
    pub(in crate::store) fn new(path: &Path) -> Arc<LiteReaders> {
        Arc::new(LiteReaders {
            path: path.to_owned(),
            state: Mutex::new(State::default()),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An idle connection, or a new one (opened on a blocking thread: opening reads the
    /// file's header and maps its shared memory). `None` when closed, when
    /// [`MAX_CONNECTIONS`] are out, or when a new one cannot be opened (and for
    /// [`RETRY_OPEN_AFTER`] after that).
    async fn lease(self: &Arc<Self>) -> Option<Lease> {
        let opening = {
            let mut state = self.state();
            if state.closed {
                return None;
            }
            if let Some(conn) = state.idle.pop() {
                return Some(Lease::of(self, conn));
            }
            if state.open >= MAX_CONNECTIONS
                || state
                    .failed_at
                    .is_some_and(|at| at.elapsed() < RETRY_OPEN_AFTER)
            {
                return None;
            }
            state.open += 1;
            if state.failed_at.is_some() {
                // A retry after a failure: the others keep using the pool meanwhile.
                state.failed_at = Some(Instant::now());
            }
            Opening {
                home: Arc::clone(self),
                counted: true,
            }
        };
        let path = self.path.clone();
        // The result before the count: a tuple drops its fields in order.
        let opened = tokio::task::spawn_blocking(move || (open(&path), opening)).await;
        let (error, opening) = match opened {
            Ok((Ok(conn), opening)) => {
                let mut state = self.state();
                state.failed_at = None;
                let recovered = std::mem::replace(&mut state.failing, false);
                if state.closed {
                    // Closed while it opened: not for a read after the close.
                    drop(state);
                    drop(conn);
                    return None;
                }
                drop(state);
                if recovered {
                    info!("read-only SQLite connections open again; short reads run in place");
                }
                return Some(opening.leased(conn));
            }
            Ok((Err(e), opening)) => (e.to_string(), Some(opening)),
            // The blocking thread panicked (its guard freed the slot), or the runtime is
            // shutting down.
            Err(e) => (e.to_string(), None),
        };
        // The back-off starts before the slot is freed, so no read opens in between.
        let first = {
            let mut state = self.state();
            state.failed_at = Some(Instant::now());
            !std::mem::replace(&mut state.failing, true)
        };
        drop(opening);
        if first {
            warn!(%error, "a read-only SQLite connection could not be opened; short reads use the pool");
        } else {
            debug!(%error, "a read-only SQLite connection could not be opened");
        }
        None
    }

    /// Whether a read now would run in place: not closed, not backing off after a failed
    /// open, and a connection idle or one more allowed.
    pub(in crate::store) fn in_place(&self) -> bool {
        let state = self.state();
        !state.closed
            && (!state.idle.is_empty()
                || (state.open < MAX_CONNECTIONS
                    && state
                        .failed_at
                        .is_none_or(|at| at.elapsed() >= RETRY_OPEN_AFTER)))
    }

    /// Closes the idle connections; those leased close when given back.
    pub(in crate::store) fn close(&self) {
        let idle = {
            let mut state = self.state();
            state.closed = true;
            let idle = std::mem::take(&mut state.idle);
            state.open -= idle.len();
            idle
        };
        drop(idle);
    }

    /// (Idle, open) connections now (for tests).
    #[cfg(test)]
    fn counts(&self) -> (usize, usize) {
        let state = self.state();
        (state.idle.len(), state.open)
    }
}

/// A read-only connection to `path`.
fn open(path: &Path) -> Result<rusqlite::Connection> {
    use rusqlite::OpenFlags;
    let conn = rusqlite::Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.execute_batch(&format!(
        "PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}; PRAGMA cache_size = -{CACHE_KIB};"
    ))?;
    Ok(conn)
}

/// A read-only connection out of [`LiteReaders`]; it goes back when dropped.
pub struct Lease {
    conn: Option<rusqlite::Connection>,
    home: Arc<LiteReaders>,
}

impl Lease {
    fn of(home: &Arc<LiteReaders>, conn: rusqlite::Connection) -> Lease {
        Lease {
            conn: Some(conn),
            home: Arc::clone(home),
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        let mut state = self.home.state();
        // A connection left inside a transaction (no read here opens one, but a future
        // one might) is not handed to the next read.
        if !state.closed && conn.is_autocommit() {
            state.idle.push(conn);
        } else {
            state.open -= 1;
            drop(state);
            drop(conn);
        }
    }
}

/// A connection for one short read: read-only on SQLite's own connection, else one of the
/// pool's (see the module's doc).
pub enum Reader {
    Lite(Lease),
    Pool(Conn),
}

impl Reader {
    pub fn db(&mut self) -> Db<'_> {
        match self {
            Reader::Lite(lease) => Db::Lite(
                lease
                    .conn
                    .as_mut()
                    .expect("a lease holds its connection until dropped"),
            ),
            Reader::Pool(conn) => conn.db(),
        }
    }
}

/// A [`Reader`]: from `readers` when the database has them and one is free, else from
/// `pool`.
pub(in crate::store) async fn reader(
    readers: Option<&Arc<LiteReaders>>,
    pool: &Pool,
) -> Result<Reader> {
    if let Some(readers) = readers
        && let Some(lease) = readers.lease().await
    {
        return Ok(Reader::Lite(lease));
    }
    Ok(Reader::Pool(pool.acquire().await?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;
    use crate::store::db::query;

    async fn store(dir: &tempfile::TempDir) -> Store {
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("r.db").display());
        let store = Store::connect(&url, 8).await.unwrap();
        store
            .pool()
            .execute_raw("CREATE TABLE t (x INTEGER NOT NULL)")
            .await
            .unwrap();
        store
    }

    #[tokio::test]
    async fn a_read_sees_every_earlier_commit_and_cannot_write() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir).await;
        for x in [1_i64, 2] {
            query("INSERT INTO t (x) VALUES ($1)")
                .bind(x)
                .execute(store.pool())
                .await
                .unwrap();
            let mut reader = store.reader().await.unwrap();
            assert!(matches!(reader, Reader::Lite(_)));
            let sum: i64 = query("SELECT SUM(x) FROM t")
                .fetch_scalar(&mut reader.db())
                .await
                .unwrap();
            assert_eq!(sum, x * (x + 1) / 2);
        }
        let mut reader = store.reader().await.unwrap();
        let err = query("INSERT INTO t (x) VALUES (3)")
            .execute(&mut reader.db())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("readonly"), "{err}");
    }

    #[tokio::test]
    async fn leases_come_back_and_past_the_limit_reads_use_the_pool() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir).await;
        let readers = store.readers.clone().expect("a file database has readers");
        let first = store.reader().await.unwrap();
        assert_eq!(readers.counts(), (0, 1));
        drop(first);
        assert_eq!(readers.counts(), (1, 1));
        // The same connection again: no new one is opened.
        let again = store.reader().await.unwrap();
        assert_eq!(readers.counts(), (0, 1));
        drop(again);
        let mut many = Vec::new();
        for _ in 0..MAX_CONNECTIONS + 3 {
            many.push(store.reader().await.unwrap());
        }
        assert_eq!(readers.counts(), (0, MAX_CONNECTIONS));
        let pooled = many.iter().filter(|r| matches!(r, Reader::Pool(_))).count();
        assert_eq!(pooled, 3);
        // A read on a pool connection answers alike.
        let mut last = many.pop().unwrap();
        assert!(matches!(last, Reader::Pool(_)));
        let none: Option<i64> = query("SELECT SUM(x) FROM t")
            .fetch_scalar(&mut last.db())
            .await
            .unwrap();
        assert_eq!(none, None);
        drop(many);
        assert_eq!(readers.counts(), (MAX_CONNECTIONS, MAX_CONNECTIONS));
    }

    #[tokio::test]
    async fn a_connection_left_in_a_transaction_is_closed() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir).await;
        let readers = store.readers.clone().unwrap();
        let mut reader = store.reader().await.unwrap();
        reader.db().execute_raw("BEGIN").await.unwrap();
        drop(reader);
        assert_eq!(readers.counts(), (0, 0));
    }

    #[tokio::test]
    async fn closing_closes_the_idle_connections_and_those_given_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir).await;
        let readers = store.readers.clone().unwrap();
        let idle = store.reader().await.unwrap();
        let leased = store.reader().await.unwrap();
        drop(idle);
        assert_eq!(readers.counts(), (1, 2));
        assert!(readers.in_place());
        readers.close();
        assert!(!readers.in_place());
        assert_eq!(readers.counts(), (0, 1));
        drop(leased);
        assert_eq!(readers.counts(), (0, 0));
        // Reads after closing use the pool (closed too when the store closes).
        assert!(matches!(store.reader().await.unwrap(), Reader::Pool(_)));
    }

    #[tokio::test]
    async fn a_file_that_cannot_be_opened_sends_reads_to_the_pool() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir).await;
        let missing = LiteReaders::new(&dir.path().join("missing.db"));
        let mut reader = reader(Some(&missing), store.pool()).await.unwrap();
        assert!(matches!(reader, Reader::Pool(_)));
        assert_eq!(missing.counts(), (0, 0));
        // Not tried again for a while: reads go straight to the pool.
        assert!(missing.state().failed_at.is_some());
        assert!(missing.lease().await.is_none());
        assert!(!missing.in_place());
        // After the back-off one read tries again; failing, it starts a new back-off.
        missing.state().failed_at = Some(Instant::now() - RETRY_OPEN_AFTER * 2);
        assert!(missing.in_place());
        assert!(missing.lease().await.is_none());
        assert!(!missing.in_place());
        assert!(missing.state().failing);
        assert_eq!(missing.counts(), (0, 0));
        let rows: i64 = query("SELECT COUNT(*) FROM t")
            .fetch_scalar(&mut reader.db())
            .await
            .unwrap();
        assert_eq!(rows, 0);
        // Read-only: it is not created either.
        assert!(!dir.path().join("missing.db").exists());
    }

    /// Dropping the store frees the readers and closes their connections, as dropping a
    /// pool does (nothing keeps them alive: a connection opened for a lease holds no
    /// reference once leased).
    #[tokio::test]
    async fn dropping_the_store_closes_its_connections() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir).await;
        let weak = Arc::downgrade(store.readers.as_ref().unwrap());
        let first = store.reader().await.unwrap();
        let second = store.reader().await.unwrap();
        drop((first, second));
        assert_eq!(weak.upgrade().unwrap().counts(), (2, 2));
        drop(store);
        assert!(weak.upgrade().is_none());
    }
}
