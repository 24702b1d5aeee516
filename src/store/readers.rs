//! Short reads on the request path (a case, a page of an export, a consent history, a
//! receipt) on SQLite's own read-only connections, run in place on the task that asks.
//!
//! Through sqlx's SQLite driver every statement is handed to the connection's worker
//! thread and its rows handed back: two thread switches and a copy of every value per
//! statement. A profile of GetCase at 64 calls in flight put 40% of the server's CPU on
//! those worker threads. A read here is a direct call into the engine instead, the way the
//! writer already writes (`super::writer`): the statement is prepared once per connection
//! and kept, and its rows are read as it steps.
//!
//! **Why in place is safe.** In WAL mode a reader never waits for the writer: it reads the
//! last commit before it began, so a read costs what its pages cost, tens of microseconds
//! for the reads above, each bounded (one case's versions, a page of at most
//! `service::cases::EXPORT_PAGE_MAX` cases, one patient's consent history). That is less
//! than the hand-off it replaces; a task that ran a long scan here would hold a runtime
//! thread for as long, so scans (research, the audit log, exports of the whole registry)
//! stay on sqlx's pool, which streams.
//!
//! **Least privilege.** The connections are opened read-only: a statement that would write
//! fails. They see every commit acknowledged before the read began, as sqlx's do.
//!
//! **How many.** A lease is taken for one read and given back when dropped. A read here
//! never waits, so no more are out at once than there are runtime threads; at most
//! [`MAX_IDLE`] are kept between reads and any others are closed. On PostgreSQL, reads take
//! a connection of the pool instead ([`Reader::Pool`]).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::Result;
use super::db::{Conn, Db, Pool};

/// Most idle read-only connections kept between reads.
pub const MAX_IDLE: usize = 8;

/// SQLite's page cache per read-only connection, in KiB (SQLite's default is 2 MiB).
const CACHE_KIB: i64 = 8 * 1024;

/// The read-only connections of one SQLite database file.
pub(crate) struct LiteReaders {
    path: PathBuf,
    idle: Mutex<Vec<rusqlite::Connection>>,
}

impl std::fmt::Debug for LiteReaders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiteReaders")
            .field("path", &self.path)
            .field("idle", &self.idle.lock().map(|idle| idle.len()).ok())
            .finish()
    }
}

impl LiteReaders {
    pub(crate) fn new(path: &Path) -> Arc<LiteReaders> {
        Arc::new(LiteReaders {
            path: path.to_owned(),
            idle: Mutex::new(Vec::new()),
        })
    }

    /// An idle connection, or a new one (opened on a blocking thread: opening reads the
    /// file's header and takes a shared-memory lock).
    async fn lease(self: &Arc<Self>) -> Result<Lease> {
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let conn = match idle {
            Some(conn) => conn,
            None => {
                let path = self.path.clone();
                tokio::task::spawn_blocking(move || open(&path))
                    .await
                    .map_err(|e| {
                        super::StoreError::Corrupt(format!("opening a read connection: {e}"))
                    })??
            }
        };
        Ok(Lease {
            conn: Some(conn),
            home: Arc::clone(self),
        })
    }

    /// Idle connections now (for tests).
    #[cfg(test)]
    fn idle(&self) -> usize {
        self.idle.lock().unwrap().len()
    }
}

/// A read-only connection to `path`.
fn open(path: &Path) -> Result<rusqlite::Connection> {
    use rusqlite::OpenFlags;
    let conn = rusqlite::Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    // The busy timeout of every other connection of the service: in WAL mode a reader is
    // only kept waiting while a connection recovers the log after a crash.
    conn.execute_batch(&format!(
        "PRAGMA busy_timeout = 10000; PRAGMA cache_size = -{CACHE_KIB};"
    ))?;
    Ok(conn)
}

/// A read-only connection out of [`LiteReaders`]; it goes back when dropped.
pub struct Lease {
    conn: Option<rusqlite::Connection>,
    home: Arc<LiteReaders>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        let mut idle = self.home.idle.lock().unwrap_or_else(|e| e.into_inner());
        // A connection left inside a transaction (a read that failed half way cannot do
        // that today, but a future one might) is not handed to the next read.
        if idle.len() < MAX_IDLE && conn.is_autocommit() {
            idle.push(conn);
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

/// A [`Reader`]: from `readers` when the database has them, else from `pool`.
pub(crate) async fn reader(readers: Option<&Arc<LiteReaders>>, pool: &Pool) -> Result<Reader> {
    Ok(match readers {
        Some(readers) => Reader::Lite(readers.lease().await?),
        None => Reader::Pool(pool.acquire().await?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;
    use crate::store::db::query;

    async fn store(dir: &tempfile::TempDir) -> Store {
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("r.db").display());
        let store = Store::connect(&url, 4).await.unwrap();
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
    async fn leases_come_back_and_at_most_max_idle_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir).await;
        let readers = store.readers.clone().expect("a file database has readers");
        let first = store.reader().await.unwrap();
        drop(first);
        assert_eq!(readers.idle(), 1);
        // The same connection again: no new one is opened.
        let again = store.reader().await.unwrap();
        assert_eq!(readers.idle(), 0);
        drop(again);
        let mut many = Vec::new();
        for _ in 0..MAX_IDLE + 3 {
            many.push(store.reader().await.unwrap());
        }
        assert_eq!(readers.idle(), 0);
        drop(many);
        assert_eq!(readers.idle(), MAX_IDLE);
    }

    #[tokio::test]
    async fn a_connection_left_in_a_transaction_is_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir).await;
        let readers = store.readers.clone().unwrap();
        let mut reader = store.reader().await.unwrap();
        reader.db().execute_raw("BEGIN").await.unwrap();
        drop(reader);
        assert_eq!(readers.idle(), 0);
    }
}
