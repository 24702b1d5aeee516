//! Physical erasure: after a withdrawal's erasure commits, and before its receipt is
//! answered, the erased bytes are pushed out of the database files as far as the engine
//! allows. Called only by [`super::writer`], for every committed command that erased.
//!
//! **SQLite.** `secure_delete = ON` zeroes deleted cells in the pages the erasing
//! transaction writes, but in WAL mode those pages go to the `-wal` file first: until a
//! checkpoint, the database file and the WAL's older frames (the submission's) still hold
//! the record, and a file-level backup taken then keeps it. So a pass runs
//! `PRAGMA wal_checkpoint(TRUNCATE)`, which copies every committed page back into the
//! database file and truncates the WAL to zero bytes; the `-shm` file holds only the WAL
//! index (frame and page numbers), never page content. The checkpoint must wait for readers
//! whose snapshot still uses the WAL (they may be reading the record right now: its bytes
//! are legitimately in use); their queries are short, so a pass waits for them, within a
//! bound, and checks the result (`busy` must be 0). A receipt on SQLite therefore means
//! "gone from every database file". When the bound passes first, the withdrawal is answered
//! with an error instead of a receipt, loudly logged and counted; the erasure itself stays
//! committed (nothing to undo), and the writer retries the checkpoint every few seconds
//! until it succeeds.
//!
//! **PostgreSQL** has no secure delete, and no statement removes a deleted row's bytes
//! from a table file short of rewriting the table (`VACUUM FULL`, which locks the tables
//! against every read and write for seconds on a large registry). A pass waits (bounded)
//! until no transaction older than the erasure is still open, then runs `VACUUM` on the
//! five tables the erasure deletes from, which prunes the dead rows and their index
//! entries: no tool that reads tuples finds them any more, but their bytes stay in the
//! pages' free space until new rows overwrite them. That is hygiene, not a claim a receipt
//! makes, so a pass that cannot complete is logged and counted but does not fail the
//! withdrawal. `docs/consent.md` says what stays where, and for how long.
//!
//! Concurrent erasures (PostgreSQL runs several writer partitions) share passes: a pass
//! covers every erasure committed before it started, so a caller whose erasure is covered
//! by a pass that completed while it waited does not start another.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::db::{self, Db, Pool};
use tokio::sync::Mutex;
use tracing::{debug, error, info, warn};

use super::{Backend, Result as StoreResult, Store, StoreError};

/// How long a withdrawal's reply may wait, on SQLite, for readers that keep the checkpoint
/// from completing.
const SQLITE_WAIT: Duration = Duration::from_secs(15);
/// Longest wait inside one checkpoint attempt (the connection's busy handler); attempts
/// repeat until the overall wait is spent.
const SQLITE_ATTEMPT_WAIT: Duration = Duration::from_secs(1);
/// A deferred retry waits only briefly, so that it never stalls the writer for long.
const SQLITE_RETRY_WAIT: Duration = Duration::from_millis(200);
/// How often the writer retries a purge that could not complete.
pub const RETRY_EVERY: Duration = Duration::from_secs(5);
/// How long a PostgreSQL pass waits for transactions older than the erasure to end.
const POSTGRES_HORIZON_WAIT: Duration = Duration::from_secs(5);
const POSTGRES_POLL: Duration = Duration::from_millis(10);
/// How long a PostgreSQL pass waits for a connection of the pool.
const POSTGRES_CONNECTION_WAIT: Duration = Duration::from_secs(5);

/// The tables an erasure deletes from (`consent::erase_patient`). Skips a table an
/// autovacuum is busy with instead of queueing behind it; index entries are always
/// removed (otherwise VACUUM may keep them when few pages changed).
const POSTGRES_VACUUM: &str = "VACUUM (INDEX_CLEANUP ON, SKIP_LOCKED) patients, case_genes, case_phenotypes, case_versions, cases";

/// Client transactions of this database that started before `$1` (microseconds since the
/// epoch) and still hold a transaction id or a snapshot: dead rows they might see cannot be
/// pruned yet. Sessions of other roles show no `xact_start` to an unprivileged role and
/// are not counted.
const POSTGRES_OLDER_TRANSACTIONS: &str = "SELECT COUNT(*) FROM pg_stat_activity \
     WHERE datname = current_database() AND pid <> pg_backend_pid() \
       AND backend_type = 'client backend' \
       AND (backend_xid IS NOT NULL OR backend_xmin IS NOT NULL) \
       AND xact_start < to_timestamp(CAST($1 AS DOUBLE PRECISION) / 1000000)";

/// The purge after an erasure could not be confirmed (SQLite): the erased record may still
/// be in the WAL or the database file.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Incomplete(String);

impl From<StoreError> for Incomplete {
    fn from(err: StoreError) -> Self {
        Incomplete(err.to_string())
    }
}

/// Runs purge passes for the writer partitions of one store.
pub struct Purger {
    store: Store,
    /// Passes started so far; pass `n` covers every erasure committed before it started.
    started: AtomicU64,
    /// Whether an erasure is committed whose purge is not confirmed (cheap check for the
    /// writer loop; the details are in `state`).
    pending: AtomicBool,
    state: Mutex<State>,
    sqlite_wait: Duration,
}

#[derive(Default)]
struct State {
    /// The latest pass that completed (on SQLite: whose checkpoint succeeded).
    completed: u64,
    /// Receipts of erasures committed but not confirmed purged.
    unpurged: Vec<String>,
    last_retry: Option<Instant>,
}

impl Purger {
    pub fn new(store: Store) -> Purger {
        Purger::with_wait(store, SQLITE_WAIT)
    }

    fn with_wait(store: Store, sqlite_wait: Duration) -> Purger {
        Purger {
            store,
            started: AtomicU64::new(0),
            pending: AtomicBool::new(false),
            state: Mutex::new(State::default()),
            sqlite_wait,
        }
    }

    /// Purges after the erasures with these receipts committed; call before answering
    /// them. `Err` (SQLite only) means the erased data may still be in the files: the
    /// caller must not hand out the receipts as if it were gone.
    pub async fn after_erasure(&self, receipts: &[String]) -> Result<(), Incomplete> {
        // Passes numbered from here on start after this point, hence after the commit.
        let needed = self.started.load(Ordering::SeqCst) + 1;
        let mut state = self.state.lock().await;
        if state.completed >= needed {
            return Ok(());
        }
        let pass = self.started.fetch_add(1, Ordering::SeqCst) + 1;
        let begun = Instant::now();
        match self.store.backend() {
            Backend::Sqlite => {
                let result = checkpoint(self.store.pool(), self.sqlite_wait).await;
                record("sqlite", begun, result.is_ok());
                match result {
                    Ok(()) => {
                        state.completed = pass;
                        self.cleared(&mut state);
                        debug!(
                            ?receipts,
                            elapsed_ms = begun.elapsed().as_millis() as u64,
                            "erased data purged from the SQLite files"
                        );
                        Ok(())
                    }
                    Err(err) => {
                        state.unpurged.extend(receipts.iter().cloned());
                        state.last_retry = Some(Instant::now());
                        self.pending.store(true, Ordering::SeqCst);
                        error!(
                            ?receipts,
                            error = %err,
                            "ERASURE NOT PURGED: the erasure is committed, but the erased data \
                             may still be in the SQLite WAL or database file; the withdrawal is \
                             answered with an error and the checkpoint retried"
                        );
                        Err(err)
                    }
                }
            }
            Backend::Postgres => {
                let result = vacuum(self.store.pool()).await;
                record("postgres", begun, matches!(result, Ok(true)));
                match result {
                    Ok(true) => debug!(
                        ?receipts,
                        elapsed_ms = begun.elapsed().as_millis() as u64,
                        "erased rows pruned"
                    ),
                    Ok(false) => warn!(
                        ?receipts,
                        "a transaction older than the erasure stayed open: VACUUM may have \
                         left the erased rows unpruned (autovacuum prunes them later)"
                    ),
                    Err(err) => error!(?receipts, error = %err, "VACUUM after an erasure failed"),
                }
                state.completed = pass;
                Ok(())
            }
        }
    }

    /// The pass at a server's start (SQLite): `false` when the checkpoint could not
    /// complete, which leaves the purge pending (logged; [`Purger::retry`] takes it up).
    pub async fn at_start(&self) -> bool {
        let mut state = self.state.lock().await;
        let pass = self.started.fetch_add(1, Ordering::SeqCst) + 1;
        match checkpoint(self.store.pool(), self.sqlite_wait).await {
            Ok(()) => {
                state.completed = pass;
                true
            }
            Err(err) => {
                state
                    .unpurged
                    .push("(any erasure before this start)".to_owned());
                state.last_retry = Some(Instant::now());
                self.pending.store(true, Ordering::SeqCst);
                error!(
                    error = %err,
                    "ERASURE NOT PURGED: the checkpoint at start could not complete; data \
                     erased before a kill or crash may still be in the SQLite WAL or database \
                     file; retried every few seconds"
                );
                false
            }
        }
    }

    /// The database the passes run on.
    pub fn backend(&self) -> Backend {
        self.store.backend()
    }

    /// Whether an erasure waits for its purge (SQLite, after a failed pass).
    pub fn is_pending(&self) -> bool {
        self.pending.load(Ordering::SeqCst)
    }

    /// Retries a pending purge, briefly, at most every [`RETRY_EVERY`] unless `force`.
    pub async fn retry(&self, force: bool) {
        if !self.is_pending() {
            return;
        }
        let mut state = self.state.lock().await;
        if !force && state.last_retry.is_some_and(|t| t.elapsed() < RETRY_EVERY) {
            return;
        }
        state.last_retry = Some(Instant::now());
        let wait = if force {
            self.sqlite_wait
        } else {
            SQLITE_RETRY_WAIT
        };
        let pass = self.started.fetch_add(1, Ordering::SeqCst) + 1;
        let begun = Instant::now();
        let result = checkpoint(self.store.pool(), wait).await;
        record("sqlite", begun, result.is_ok());
        match result {
            Ok(()) => {
                state.completed = pass;
                self.cleared(&mut state);
            }
            Err(err) => {
                warn!(receipts = ?state.unpurged, error = %err, "erased data still not purged");
            }
        }
    }

    fn cleared(&self, state: &mut State) {
        if !state.unpurged.is_empty() {
            info!(receipts = ?state.unpurged,
                  "erased data of earlier erasures is now purged from the SQLite files");
            state.unpurged.clear();
        }
        self.pending.store(false, Ordering::SeqCst);
    }
}

fn record(backend: &'static str, begun: Instant, ok: bool) {
    let outcome = if ok { "ok" } else { "incomplete" };
    metrics::counter!("ern_erasure_purges_total", "backend" => backend, "outcome" => outcome)
        .increment(1);
    metrics::histogram!("ern_erasure_purge_seconds", "backend" => backend)
        .record(begun.elapsed().as_secs_f64());
}

/// `PRAGMA wal_checkpoint(TRUNCATE)` until it completes (`busy` = 0) or `wait` is spent.
/// Each attempt lets the connection's busy handler wait for readers and writers, for at
/// most [`SQLITE_ATTEMPT_WAIT`]; the connection's own busy timeout is restored afterwards.
async fn checkpoint(pool: &Pool, wait: Duration) -> Result<(), Incomplete> {
    let deadline = Instant::now() + wait;
    let mut conn = pool.acquire().await?;
    let busy_timeout: i64 = db::query("PRAGMA busy_timeout")
        .fetch_scalar(&mut conn)
        .await?;
    let mut attempts = 0u32;
    let result = loop {
        attempts += 1;
        let attempt_wait = deadline
            .saturating_duration_since(Instant::now())
            .min(SQLITE_ATTEMPT_WAIT);
        let attempt = checkpoint_once(&mut conn.db(), attempt_wait).await;
        match attempt {
            Err(err) => break Err(Incomplete::from(err)),
            // Not busy, and no WAL.
            Ok((0, -1, _)) => {
                break Err(Incomplete(
                    "the database is not in WAL mode; checkpoint impossible".into(),
                ));
            }
            Ok((0, _, _)) => break Ok(()),
            // Busy before it began: another connection's checkpoint holds the checkpoint
            // lock (the automatic one after a commit on a pool connection, or another
            // process's: the admin command line), and SQLite calls no busy handler for
            // that lock. It is short: try again in a moment.
            Ok((_, -1, _)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Ok((_, log, copied)) if Instant::now() >= deadline => {
                break Err(Incomplete(format!(
                    "the WAL checkpoint stayed busy for {} ms ({attempts} attempts; \
                     {copied} of {log} WAL frames copied back): a reader or another \
                     process held the database",
                    wait.as_millis()
                )));
            }
            Ok(_) => {}
        }
    };
    if conn
        .db()
        .execute_raw(&format!("PRAGMA busy_timeout = {busy_timeout}"))
        .await
        .is_err()
    {
        conn.close_on_drop();
    }
    result
}

/// One `PRAGMA wal_checkpoint(TRUNCATE)` whose busy handler waits at most `wait`:
/// (busy, WAL frames, frames copied back).
async fn checkpoint_once(conn: &mut Db<'_>, wait: Duration) -> StoreResult<(i64, i64, i64)> {
    conn.execute_raw(&format!("PRAGMA busy_timeout = {}", wait.as_millis()))
        .await?;
    let row = db::query("PRAGMA wal_checkpoint(TRUNCATE)")
        .persistent(false)
        .fetch_one(&mut *conn)
        .await?;
    Ok((
        row.try_get("busy")?,
        row.try_get("log")?,
        row.try_get("checkpointed")?,
    ))
}

/// Waits (bounded) until no transaction older than now is open, then VACUUMs the tables
/// an erasure deletes from. `Ok(false)`: the wait ran out, so VACUUM may have kept the
/// erased rows for an older snapshot.
async fn vacuum(pool: &Pool) -> StoreResult<bool> {
    // The writer waits for this pass (and every batch queued behind it): while the
    // database is away, not for the pool's whole acquire timeout.
    let mut conn = tokio::time::timeout(POSTGRES_CONNECTION_WAIT, pool.acquire())
        .await
        .map_err(|_| StoreError::Unreachable {
            cause: format!(
                "no connection for VACUUM within {} s",
                POSTGRES_CONNECTION_WAIT.as_secs()
            ),
        })??;
    let since: i64 =
        db::query("SELECT CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000000 AS BIGINT)")
            .fetch_scalar(&mut conn)
            .await?;
    let deadline = Instant::now() + POSTGRES_HORIZON_WAIT;
    let horizon_passed = loop {
        let older: i64 = db::query(POSTGRES_OLDER_TRANSACTIONS)
            .bind(since)
            .fetch_scalar(&mut conn)
            .await?;
        if older == 0 {
            break true;
        }
        if Instant::now() >= deadline {
            break false;
        }
        tokio::time::sleep(POSTGRES_POLL).await;
    };
    // VACUUM cannot run in a transaction block: sent as a simple query, in autocommit.
    conn.db().execute_raw(POSTGRES_VACUUM).await?;
    Ok(horizon_passed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::Connection;

    const MARKER: &str = "NM_999777.1:c.77_78delinsPURGETEST";

    fn files_hold_marker(db: &std::path::Path) -> Vec<String> {
        ["", "-wal", "-shm"]
            .iter()
            .filter_map(|suffix| {
                let path = format!("{}{suffix}", db.display());
                let bytes = std::fs::read(&path).unwrap_or_default();
                bytes
                    .windows(MARKER.len())
                    .any(|w| w == MARKER.as_bytes())
                    .then_some(path)
            })
            .collect()
    }

    /// A reader whose snapshot predates the erasure keeps the checkpoint from completing:
    /// the pass must report it (no receipt), stay pending, and purge once the reader ends.
    #[tokio::test]
    async fn a_blocked_checkpoint_is_reported_and_retried_until_purged() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("p.db");
        let url = format!("sqlite://{}?mode=rwc", db.display());
        let store = Store::connect(&url, 4).await.unwrap();
        store
            .pool()
            .execute_raw("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT NOT NULL)")
            .await
            .unwrap();
        db::query("INSERT INTO t (v) VALUES ($1), ('other')")
            .bind(MARKER)
            .execute(store.pool())
            .await
            .unwrap();
        let mut reader = sqlx::SqliteConnection::connect(&url).await.unwrap();
        sqlx::raw_sql("BEGIN; SELECT COUNT(*) FROM t;")
            .execute(&mut reader)
            .await
            .unwrap();
        db::query("DELETE FROM t WHERE v = $1")
            .bind(MARKER)
            .execute(store.pool())
            .await
            .unwrap();

        let purger = Purger::with_wait(store.clone(), Duration::from_millis(300));
        let receipts = vec!["ER-test".to_string()];
        assert!(purger.after_erasure(&receipts).await.is_err());
        assert!(purger.is_pending());
        assert!(!files_hold_marker(&db).is_empty());

        sqlx::raw_sql("COMMIT").execute(&mut reader).await.unwrap();
        purger.retry(true).await;
        assert!(!purger.is_pending());
        assert_eq!(files_hold_marker(&db), Vec::<String>::new());
        assert_eq!(
            std::fs::metadata(dir.path().join("p.db-wal"))
                .unwrap()
                .len(),
            0
        );
        // The next erasure needs a pass of its own, and gets one.
        assert!(purger.after_erasure(&receipts).await.is_ok());
    }

    /// Another connection may checkpoint at any moment (a pool connection's automatic
    /// checkpoint after a commit, the admin command line): a pass that finds its
    /// checkpoint under way (SQLite says "busy", with no WAL figures) waits for it instead
    /// of failing the withdrawal.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_checkpoint_under_way_on_another_connection_is_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("p.db");
        let url = format!("sqlite://{}?mode=rwc", db.display());
        let store = Store::connect(&url, 4).await.unwrap();
        store
            .pool()
            .execute_raw("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB NOT NULL)")
            .await
            .unwrap();
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let checkpoints = std::sync::Arc::new(AtomicU64::new(0));
        let other = std::thread::spawn({
            let (db, stop, checkpoints) = (db.clone(), stop.clone(), checkpoints.clone());
            move || {
                let conn = rusqlite::Connection::open(&db).unwrap();
                conn.busy_timeout(Duration::from_secs(5)).unwrap();
                // A commit, a checkpoint of it, a pause (another process writing now and
                // then; the server's own writer waits while a purge runs).
                while !stop.load(Ordering::Relaxed) {
                    conn.execute("INSERT INTO t (v) VALUES (randomblob(20000))", [])
                        .unwrap();
                    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
                        .unwrap();
                    checkpoints.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        });
        let purger = Purger::with_wait(store.clone(), Duration::from_secs(5));
        let receipts = vec!["ER-test".to_string()];
        // At least 50 passes, and until the other connection has checkpointed 50 times
        // meanwhile (so that they overlapped, however the threads are scheduled).
        let mut passes = 0;
        while passes < 50 || checkpoints.load(Ordering::Relaxed) < 50 {
            purger.after_erasure(&receipts).await.unwrap();
            passes += 1;
        }
        stop.store(true, Ordering::Relaxed);
        other.join().unwrap();
    }
}
