//! Persistence: one SQL schema on SQLite (embedded default) and PostgreSQL (production).
//!
//! Every query is written once, in the common subset of both dialects (`$1` placeholders,
//! instants and flags bound and read as `DateTime<Utc>` and `bool`, which `db` keeps as
//! `TIMESTAMPTZ` and `BOOLEAN` on PostgreSQL and as integer milliseconds and 0/1 on
//! SQLite; text for dates); the schema itself is kept per
//! dialect under `migrations/`. Reads go to the pool of sqlx's native driver for the
//! database (`db::Pool`), through `db::query`. Writes of clinical
//! data and consent go through the [`writer::Writer`], which batches concurrent requests
//! into one transaction (group commit) and answers each only after the commit is durable;
//! on a SQLite file it applies them on a connection of its own, on its own thread
//! ([`db::Db::Lite`]), on PostgreSQL on the pool's.
//!
//! This module never sees a patient identifier: it stores pseudonyms, and it is the only
//! module that speaks SQL.

/// The writer's own statements, for tests and benches that must put rows on file exactly
/// as the writer does (`tests/api/consent_model.rs`, the raw-insert baseline of
/// `benches/submit.rs`). Compiled only with the `fixtures` feature: in a normal build these
/// statements are private to `store` (`pub(in crate::store)`) and only `store::writer` calls
/// them, inside its transaction.
#[cfg(feature = "fixtures")]
pub mod writer_sql {
    use super::db::Db;
    use chrono::{DateTime, Utc};

    use super::Result;
    use super::cases::{CaseRow, Representative};
    use crate::consent::{ConsentDecision, Source};

    pub async fn insert_case(
        conn: &mut Db<'_>,
        registry_id: i64,
        pseudonym: &str,
        centre_id: i64,
        principal_id: i64,
        row: &CaseRow,
        now: DateTime<Utc>,
    ) -> Result<i64> {
        super::cases::insert_case(
            conn,
            registry_id,
            pseudonym,
            centre_id,
            principal_id,
            row,
            now,
        )
        .await
    }

    pub async fn append_consent(
        conn: &mut Db<'_>,
        registry_id: i64,
        pseudonym: &str,
        decision: &ConsentDecision,
        principal_id: i64,
        source: Source,
        now: DateTime<Utc>,
    ) -> Result<i64> {
        super::cases::append_consent(
            conn,
            registry_id,
            pseudonym,
            decision,
            principal_id,
            source,
            now,
        )
        .await
    }

    pub async fn set_representative(
        conn: &mut Db<'_>,
        registry_id: i64,
        pseudonym: &str,
        representative: Representative<'_>,
    ) -> Result<()> {
        super::cases::set_representative(conn, registry_id, pseudonym, representative).await
    }

    pub async fn set_eligibility(
        conn: &mut Db<'_>,
        registry_id: i64,
        pseudonym: &str,
        eligible: bool,
        until: Option<DateTime<Utc>>,
    ) -> Result<()> {
        super::cases::set_eligibility(conn, registry_id, pseudonym, eligible, until).await
    }
}

pub mod admin;
pub mod audit;
pub mod cases;
pub mod codes;
pub mod consent;
pub mod consent_model;
pub mod console;
pub mod db;
pub mod master;
pub mod purge;
pub mod readers;
pub mod research;
pub mod research_index;
pub mod statistics;
pub mod writer;

use std::collections::BTreeSet;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::Executor;
use sqlx::pool::PoolOptions;
use sqlx::postgres::PgConnectOptions;
use sqlx::sqlite::SqliteConnectOptions;

use db::{Db, Pool, query};

use crate::auth::{CentreRef, Principal, Role};

/// ERN registries seeded at first start (code, name, scope), in a fixed order: the
/// position (1-based) is the registry number in pseudonyms, so it must never change.
const ERN_SEED: &str = include_str!("../erns.csv");

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// From the SQLite writer's own connection (`db::Db::Lite`).
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("migration failed: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
    #[error("unsupported database URL: use sqlite://PATH or postgres://...")]
    UnsupportedUrl,
    #[error(
        "a SQLite database URL names its file as a plain path, sqlite://PATH (no file: URI or \
         other scheme, no ':' in its first component, no percent-encoding, not ending in \
         .lock; of the options only mode and cache): the server's lock beside the file must \
         be the one every server of that database takes"
    )]
    SqliteUrlNotAPath,
    #[error(
        "SQLite opened another file ({opened}) than the URL names ({named}); give the \
         database as a plain path, sqlite://PATH"
    )]
    OpenedAnotherFile { named: String, opened: String },
    #[error("{0} already exists")]
    AlreadyExists(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("stored data is inconsistent: {0}")]
    Corrupt(String),
    #[error(
        "erasure {receipt} is committed, but its data may still be in the database files: {cause}"
    )]
    NotPurged { receipt: String, cause: String },
    /// The database did not answer a COMMIT, and could not be asked whether it landed.
    #[error("the outcome of a commit is unknown: {cause}")]
    CommitUnknown { cause: String },
    /// A write not attempted on its own because its batch failed for want of the
    /// database (`writer`): the batch's cause.
    #[error("the database cannot be reached: {cause}")]
    Unreachable { cause: String },
    /// A SQLite database's file or `-shm` was deleted, moved or replaced under the server
    /// (`data_dir::OpenFiles`): writes are refused until it restarts.
    #[error("{cause}")]
    FilesChanged { cause: String },
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

impl StoreError {
    /// Whether a lock was not granted within the transaction's `lock_timeout`
    /// (PostgreSQL's `lock_not_available`): the rotation lock, `admin::lock_rotation`.
    pub fn is_lock_timeout(&self) -> bool {
        matches!(self, StoreError::Database(sqlx::Error::Database(e)) if e.code().as_deref() == Some("55P03"))
    }

    /// Whether the error says the database cannot be reached *now*, so that the same call
    /// may well succeed in a moment (the API answers UNAVAILABLE with a retry hint, never
    /// INTERNAL): see [`unreachable_now`].
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Database(err) => unreachable_now(err),
            StoreError::CommitUnknown { .. }
            | StoreError::Unreachable { .. }
            | StoreError::FilesChanged { .. } => true,
            // SQLite still busy after its busy timeout (another process holds the lock),
            // its disk full, or its file not to be opened: see `unreachable_now`.
            StoreError::Sqlite(rusqlite::Error::SqliteFailure(err, _)) => {
                sqlite_not_now(err.extended_code)
            }
            _ => false,
        }
    }
}

/// Whether a SQLite result code (extended; its low byte is the primary code) says the
/// database cannot be written or read *now* rather than that the statement is wrong:
/// SQLITE_BUSY (5) past the busy timeout, SQLITE_FULL (13, the disk full), SQLITE_CANTOPEN
/// (14, a file that cannot be opened). Each may pass once the operator acts. Not
/// SQLITE_IOERR: it may be one bad sector under one command (the writer then retries the
/// batch's commands one by one), a damaged file system (an incident, not an outage), or a
/// failed sync after which the WAL may still hold the commit.
fn sqlite_not_now(extended_code: i32) -> bool {
    matches!(extended_code & 0xff, 5 | 13 | 14)
}

/// Whether a database error means "not reachable now" rather than "wrong": no connection
/// to be had (pool timeout, pool closed at shutdown), a connection refused, reset or cut
/// (I/O errors of those kinds), PostgreSQL shutting down, restarting or recovering
/// (SQLSTATE class 08 connection exceptions; 57P01 admin shutdown, 57P02 crash shutdown,
/// 57P03 cannot connect now), out of resources (class 53: disk full, out of memory, too
/// many connections, which sqlx itself retries), read-only (25006: a standby after a
/// failover, or `default_transaction_read_only`), a lock not granted in time (55P03: the
/// writer's `lock_timeout`, `writer::WRITER_LOCK_WAIT`; the transaction is rolled back),
/// the database refusing new sessions (55000: "not currently accepting connections", an
/// operator's `ALLOW_CONNECTIONS false`; 3D000: "does not exist", renamed or dropped while
/// the server runs: a new connection of the pool fails so; the server's own statements
/// raise neither), or
/// SQLite still busy after its busy timeout (another process holds the write lock), its
/// disk full or its file not to be opened ([`sqlite_not_now`]).
pub fn unreachable_now(err: &sqlx::Error) -> bool {
    use sqlx::error::DatabaseError;
    use std::io::ErrorKind;
    match err {
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => true,
        sqlx::Error::Io(io) => matches!(
            io.kind(),
            ErrorKind::ConnectionRefused
                | ErrorKind::ConnectionReset
                | ErrorKind::ConnectionAborted
                | ErrorKind::NotConnected
                | ErrorKind::BrokenPipe
                | ErrorKind::UnexpectedEof
                | ErrorKind::TimedOut
                | ErrorKind::AddrNotAvailable
                | ErrorKind::HostUnreachable
                | ErrorKind::NetworkUnreachable
                | ErrorKind::NetworkDown
        ),
        sqlx::Error::Database(db) => {
            if let Some(pg) = db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
                let code = pg.code();
                code.starts_with("08")
                    || code.starts_with("53")
                    || matches!(
                        code,
                        "57P01" | "57P02" | "57P03" | "25006" | "55P03" | "55000" | "3D000"
                    )
            } else if let Some(sqlite) = db.try_downcast_ref::<sqlx::sqlite::SqliteError>() {
                sqlite
                    .code()
                    .and_then(|code| code.parse::<i32>().ok())
                    .is_some_and(sqlite_not_now)
            } else {
                false
            }
        }
        _ => false,
    }
}

/// The thresholds an admin may set for small-count suppression.
pub const MIN_CELL_COUNT_RANGE: std::ops::RangeInclusive<i64> = 2..=100;
/// Allowed protection levels of a registry.
pub const PROTECTION_LEVEL_RANGE: std::ops::RangeInclusive<i64> = 1..=100;

/// What the database does with a commit before it reports success.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Durability {
    /// `synchronous`: 0 OFF, 1 NORMAL, 2 FULL, 3 EXTRA. `secure_delete`: 1 when deleted
    /// content is overwritten (an erasure must not stay readable in free pages).
    Sqlite {
        journal_mode: String,
        synchronous: i64,
        secure_delete: i64,
    },
    Postgres {
        fsync: String,
        synchronous_commit: String,
    },
}

impl Durability {
    /// Refuses settings under which an acknowledged write could be lost in a crash or a
    /// power failure: SQLite must journal to a WAL with `synchronous` FULL or EXTRA (every
    /// commit fsynced); PostgreSQL must have `fsync` on and `synchronous_commit` not off.
    /// And on SQLite settings under which an erasure would stay readable: `secure_delete`
    /// must be on.
    pub fn check(&self) -> Result<()> {
        let unsafe_ = |what: String| {
            Err(StoreError::Invalid(format!(
                "the database would not keep acknowledged writes through a crash: {what}"
            )))
        };
        match self {
            Durability::Sqlite {
                journal_mode,
                synchronous,
                secure_delete,
            } => {
                if !journal_mode.eq_ignore_ascii_case("wal") {
                    return unsafe_(format!("SQLite journal_mode is {journal_mode}, not wal"));
                }
                if *synchronous < 2 {
                    return unsafe_(format!("SQLite synchronous is {synchronous}, not FULL (2)"));
                }
                if *secure_delete != 1 {
                    return Err(StoreError::Invalid(format!(
                        "SQLite secure_delete is {secure_delete}, not 1: erased records would \
                         stay readable in the file's free pages"
                    )));
                }
            }
            Durability::Postgres {
                fsync,
                synchronous_commit,
            } => {
                if fsync != "on" {
                    return unsafe_(format!("PostgreSQL fsync is {fsync}; set fsync = on"));
                }
                if synchronous_commit == "off" {
                    return unsafe_(
                        "PostgreSQL synchronous_commit is off; set it to on".to_string(),
                    );
                }
            }
        }
        Ok(())
    }
}

/// The two disclosure-control settings of a registry.
#[derive(Debug, Clone, Copy)]
enum DisclosureSetting {
    MinCellCount,
    ProtectionLevel,
}

/// A registry as the service needs it on the request path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registry {
    pub id: i64,
    pub code: String,
    pub name: String,
    pub active_key_version: i64,
    pub min_cell_count: i64,
    /// Least width of the interval anyone can prove for a hidden research count.
    pub protection_level: i64,
}

impl Registry {
    /// The key reference of the registry for pseudonym derivation: its number, code and
    /// active key version.
    pub fn key_ref(&self) -> Result<crate::pseudonym::RegistryRef<'_>> {
        let corrupt = || StoreError::Corrupt("registry numbering".into());
        Ok(crate::pseudonym::RegistryRef {
            seq: u16::try_from(self.id).map_err(|_| corrupt())?,
            code: &self.code,
            key_version: u16::try_from(self.active_key_version).map_err(|_| corrupt())?,
        })
    }
}

/// What authentication needs from an API key's row.
#[derive(Debug, Clone)]
pub struct KeyRecord {
    pub secret_hash: String,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub principal_disabled: bool,
    pub principal: Principal,
    /// SHA-256 fingerprints (hex) of the client certificates bound to the principal; when
    /// any, calls must come over a connection that presented one of them.
    pub bound_certificates: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Store {
    pool: Pool,
    backend: Backend,
    /// The database file, on SQLite (not in memory): the writer opens its own
    /// connection to it (`writer`).
    sqlite_path: Option<std::path::PathBuf>,
    /// SQLite's own read-only connections to that file, for short reads (`readers`).
    readers: Option<std::sync::Arc<readers::LiteReaders>>,
}

/// `$from, $from+1, ...`: `n` numbered parameters, for an `IN (...)` list.
pub(in crate::store) fn placeholders(from: usize, n: usize) -> String {
    (from..from + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The most rows one multi-row statement carries: at the widest row written
/// (`case_versions`, 25 columns) 6,400 parameters, well inside SQLite's 32,766 and
/// PostgreSQL's 65,535 (there the rows of an `INSERT` are one array per column,
/// `db::Rows`, so only the other multi-row statements count their parameters).
///
/// Their text varies with the number of rows, except the PostgreSQL `INSERT`s of
/// `db::Rows`: see [`cacheable`].
pub(in crate::store) const ROWS_PER_STATEMENT: usize = 256;

/// Whether a statement of `rows` rows (or list items) is kept in the connection's cache
/// of prepared statements. Small ones are (a quiet server's batches of one are prepared
/// once); large ones are prepared afresh each time, since one cached statement per row
/// count, per connection, would hold megabytes (measured: server memory 163 MiB after 35 s
/// of load with all of them kept, 70 MiB with none).
pub(in crate::store) fn cacheable(rows: usize) -> bool {
    rows <= 8
}

impl Backend {
    /// SQL for the instant `expr` as integer milliseconds since the Unix epoch, for the
    /// few statements that compute with an instant rather than compare it (the research
    /// index's packed row). Exact: the store keeps instants to the millisecond.
    pub fn millis_sql(self, expr: &str) -> String {
        match self {
            Backend::Sqlite => expr.to_owned(),
            Backend::Postgres => format!("FLOOR(EXTRACT(EPOCH FROM {expr}) * 1000)::BIGINT"),
        }
    }

    /// The database a URL names: `sqlite:...` or `postgres://` / `postgresql://`.
    pub fn of_url(url: &str) -> Result<Backend> {
        if let Some(rest) = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
        {
            // The lock file (`data_dir::sqlite_path`) is found from the path as written;
            // SQLite would read a `file:` URI, and sqlx decodes `%XX`, so either could name
            // the database by a path whose lock is elsewhere (a defences audit of
            // 2026-12-07 served one database from two servers so).
            // A scheme left in the path (`sqlite:sqlite:…`: sqlx strips every one), a URI
            // (`file:`), `%XX`, or a name whose lock would be the file itself.
            let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
            // Of sqlx's options only the open mode and the cache: another VFS or
            // `immutable` would open the file without the locks every server shares.
            let allowed = |option: &str| {
                matches!(
                    option,
                    "" | "mode=rw"
                        | "mode=rwc"
                        | "mode=ro"
                        | "mode=memory"
                        | "cache=shared"
                        | "cache=private"
                )
            };
            if !query.split('&').all(allowed) {
                return Err(StoreError::SqliteUrlNotAPath);
            }
            let first = path.split('/').find(|c| !c.is_empty()).unwrap_or("");
            if (first.contains(':') && path != ":memory:")
                || path.contains('%')
                || path.ends_with(".lock")
            {
                return Err(StoreError::SqliteUrlNotAPath);
            }
            Ok(Backend::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Backend::Postgres)
        } else {
            Err(StoreError::UnsupportedUrl)
        }
    }

    /// Writer partitions by default: one on SQLite (a single-writer database), two on
    /// PostgreSQL. Every write transaction, after its commands, takes the audit chain's
    /// head and then the research change log's counter, and holds both to its commit, so
    /// on PostgreSQL one partition applies its commands while another appends, logs and
    /// commits; more partitions mostly wait for the head. Measured against four
    /// (docs/benchmarks.md, 2026-12-05): more submissions and reads per second, and a
    /// lower median latency at half load.
    pub fn default_writers(self) -> usize {
        match self {
            Backend::Sqlite => 1,
            Backend::Postgres => 2,
        }
    }
}

/// The settings every PostgreSQL session of the service starts with, whatever the
/// server's defaults (`docs/scaling.md`, "Several instances", "Why it is safe"):
/// - a transaction left open by a client that no longer speaks (its host died, the
///   network to it broke) is ended by the server after a minute, releasing its locks:
///   the audit chain's head and its patients' locks, which every other instance's
///   writers would otherwise wait for until the operating system gave the connection up
///   (hours, by default). Nothing of the service leaves a transaction idle for long:
///   its statements follow each other at the speed of the code between them;
/// - the server probes an idle connection after 30 s, every 10 s, and drops it after 3
///   unanswered probes (TCP keepalive), and drops one whose data it sent stays
///   unacknowledged for 60 s (`tcp_user_timeout`: a backend sending to a dead client is
///   busy, not idle in its transaction); both ignored on a Unix socket;
/// - READ COMMITTED unless a transaction says otherwise: the writer's sets it itself;
///   the others (an admin action, the entries of failed writes) append to the audit
///   chain with `UPDATE … RETURNING` on its head, which under REPEATABLE READ would fail
///   when another transaction appended first.
///
/// They are set by `SET` on each new connection, after it is made, so they win over the
/// URL's options, `PGOPTIONS` and the role's and database's defaults, and need no
/// `options` startup parameter (which PgBouncer refuses).
const PG_SESSION: [(&str, &str); 6] = [
    ("idle_in_transaction_session_timeout", "60s"),
    ("tcp_user_timeout", "60000"),
    ("tcp_keepalives_idle", "30"),
    ("tcp_keepalives_interval", "10"),
    ("tcp_keepalives_count", "3"),
    ("default_transaction_isolation", "read committed"),
];

/// The options of the SQLite URL `url`. Unless `create`, and for a database file already
/// there when this is asked, the file is never created by a connection the pool opens
/// (later ones included): if the file is renamed away while a server runs, such a
/// connection would otherwise make a new empty database under the old name, beside the
/// `-wal` the server writes on through, and SQLite would take that WAL for a stale one
/// and delete it (a defences audit of 2026-12-07 lost acknowledged writes so through
/// another command). It fails instead ("unable to open database file").
fn sqlite_options(url: &str, create: bool) -> Result<SqliteConnectOptions> {
    let options = SqliteConnectOptions::from_str(url)?;
    // No file (an in-memory database): nothing to create.
    let Some(db) = crate::data_dir::sqlite_path(url) else {
        return Ok(options);
    };
    Ok(match create && !db.exists() {
        true => options,
        false => options.create_if_missing(false),
    })
}

/// [`PG_SESSION`] as one simple query of `SET` statements (constants, formatted).
fn pg_session_sql() -> String {
    PG_SESSION
        .iter()
        .map(|(name, value)| format!("SET {name} = '{value}';"))
        .collect::<Vec<_>>()
        .join(" ")
}

impl Store {
    /// Connects, applying per-connection settings: on SQLite WAL journaling, full
    /// synchronous commits (an acknowledged write survives a crash or power loss),
    /// foreign keys and a busy timeout for the admin CLI writing beside the server; on
    /// PostgreSQL [`PG_SESSION`].
    /// A SQLite file is created if missing when this connects (tests; the commands use
    /// [`Store::open_prepared`]).
    pub async fn connect(url: &str, max_connections: u32) -> Result<Store> {
        Self::connect_creating(url, max_connections, true).await
    }

    /// [`Store::connect`] to a SQLite file already made (`data_dir::prepare_sqlite_files`),
    /// which no connection creates again: if the file is renamed away before or while the
    /// pool opens a connection, that connection fails ("unable to open database file")
    /// instead of making a new empty database beside the `-wal` a server writes on
    /// through, which SQLite would take for a stale one and delete (a re-check of
    /// 2026-12-07 renamed it between a command's check and its open).
    pub async fn open_prepared(url: &str, max_connections: u32) -> Result<Store> {
        Self::connect_creating(url, max_connections, false).await
    }

    async fn connect_creating(url: &str, max_connections: u32, create: bool) -> Result<Store> {
        let backend = Backend::of_url(url)?;
        let pool = match backend {
            Backend::Sqlite => Pool::Sqlite(
                PoolOptions::new()
                    .max_connections(max_connections)
                    .acquire_timeout(Duration::from_secs(10))
                    .after_connect(|conn: &mut sqlx::SqliteConnection, _meta| {
                        Box::pin(async move {
                            conn.execute(
                                "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; \
                                 PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 10000; \
                                 PRAGMA secure_delete = ON;",
                            )
                            .await?;
                            Ok(())
                        })
                    })
                    .connect_with(sqlite_options(url, create)?)
                    .await?,
            ),
            Backend::Postgres => Pool::Postgres(
                PoolOptions::new()
                    .max_connections(max_connections)
                    .acquire_timeout(Duration::from_secs(10))
                    .after_connect(|conn: &mut sqlx::PgConnection, _meta| {
                        Box::pin(async move {
                            // No arguments: sent as one simple query, all statements.
                            let sql = pg_session_sql();
                            conn.execute(sql.as_str()).await?;
                            Ok(())
                        })
                    })
                    .connect_with(PgConnectOptions::from_str(url)?)
                    .await?,
            ),
        };
        let sqlite_path = match backend {
            Backend::Sqlite => crate::data_dir::sqlite_path(url),
            Backend::Postgres => None,
        };
        let readers = sqlite_path.as_deref().map(readers::LiteReaders::new);
        let store = Store {
            pool,
            backend,
            sqlite_path,
            readers,
        };
        store.durability().await?.check()?;
        Ok(store)
    }

    /// The durability settings in force on a connection of the pool: SQLite's journal
    /// mode, `synchronous` level and `secure_delete`; PostgreSQL's `fsync` and
    /// `synchronous_commit`.
    pub async fn durability(&self) -> Result<Durability> {
        let mut conn = self.pool.acquire().await?;
        Ok(match self.backend {
            Backend::Sqlite => Durability::Sqlite {
                journal_mode: query("PRAGMA journal_mode").fetch_scalar(&mut conn).await?,
                synchronous: query("PRAGMA synchronous").fetch_scalar(&mut conn).await?,
                secure_delete: query("PRAGMA secure_delete")
                    .fetch_scalar(&mut conn)
                    .await?,
            },
            Backend::Postgres => Durability::Postgres {
                fsync: query("SHOW fsync").fetch_scalar(&mut conn).await?,
                synchronous_commit: query("SHOW synchronous_commit")
                    .fetch_scalar(&mut conn)
                    .await?,
            },
        })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// A connection for one short, bounded read on the request path: on SQLite one of its
    /// own read-only connections, used in place; else one of the pool's (`readers`).
    pub async fn reader(&self) -> Result<readers::Reader> {
        readers::reader(self.readers.as_ref(), &self.pool).await
    }

    /// Whether [`Store::reader`] would read in place now (SQLite's own connections), so
    /// that a read costs less than sharing it between calls would.
    pub fn reads_in_place(&self) -> bool {
        self.readers.as_ref().is_some_and(|r| r.in_place())
    }

    /// The SQLite database file; `None` on PostgreSQL and for an in-memory database.
    pub fn sqlite_path(&self) -> Option<&std::path::Path> {
        self.sqlite_path.as_deref()
    }

    /// Checks that the file SQLite opened (`PRAGMA database_list`) is the one the URL
    /// names ([`Store::sqlite_path`], where the server's lock was taken): the same file
    /// (device and inode), whatever the spelling of its path. A URL SQLite or sqlx reads
    /// otherwise than `data_dir::sqlite_path` does is refused so, whichever form it takes
    /// (a re-check of 2026-12-07 served one database from two servers through
    /// `sqlite:sqlite:…`, after `file:` and `%XX` were refused).
    pub async fn check_opened_file(&self) -> Result<()> {
        let Some(named) = self.sqlite_path.as_deref() else {
            return Ok(());
        };
        let rows = db::query("PRAGMA database_list")
            .persistent(false)
            .fetch_all(self.pool())
            .await?;
        let mut opened = String::new();
        for row in &rows {
            if row.try_get::<String>("name")? == "main" {
                opened = row.try_get::<String>("file")?;
            }
        }
        let same = {
            use std::os::unix::fs::MetadataExt;
            match (std::fs::metadata(named), std::fs::metadata(&opened)) {
                (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
                _ => false,
            }
        };
        if same {
            Ok(())
        } else {
            Err(StoreError::OpenedAnotherFile {
                named: named.display().to_string(),
                opened,
            })
        }
    }

    /// A connection of SQLite's own for the writer, with the settings of the pool's
    /// connections ([`Store::connect`]), checked the same way.
    pub(in crate::store) fn open_sqlite_writer(
        path: &std::path::Path,
    ) -> Result<rusqlite::Connection> {
        let conn = rusqlite::Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; \
             PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 10000; \
             PRAGMA secure_delete = ON;",
        )?;
        // A page cache of up to 32 MiB instead of SQLite's 2 MiB: every insert walks the
        // indexes of its table, and at a million patients their pages no longer fit in 2
        // MiB (a profile of `demo` showed reads and cache spills in the writer).
        conn.execute_batch("PRAGMA cache_size = -32768")?;
        // Statement journals in memory: a multi-row statement inside the batch's
        // transaction keeps one (to undo just that statement if it fails), and with the
        // default they spill to a temporary file past 64 KiB, a write per page (7% of the
        // writer thread at 256 submissions in flight). They never carry durability: the
        // WAL does.
        conn.execute_batch("PRAGMA temp_store = MEMORY")?;
        // Every statement of the write path in each of its shapes (`db::Db::chunks`: seven
        // per multi-row statement, about fifteen of those), with room to spare.
        conn.set_prepared_statement_cache_capacity(256);
        let durability = Durability::Sqlite {
            journal_mode: conn.query_row("PRAGMA journal_mode", [], |r| r.get(0))?,
            synchronous: conn.query_row("PRAGMA synchronous", [], |r| r.get(0))?,
            secure_delete: conn.query_row("PRAGMA secure_delete", [], |r| r.get(0))?,
        };
        durability.check()?;
        Ok(conn)
    }

    pub async fn close(&self) {
        if let Some(readers) = &self.readers {
            readers.close();
        }
        self.pool.close().await;
    }

    /// Applies the migrations under `migrations/<dialect>/` and seeds the ERN registries.
    pub async fn migrate(&self) -> Result<()> {
        match self.backend {
            Backend::Sqlite => {
                let Pool::Sqlite(pool) = &self.pool else {
                    unreachable!("a SQLite store has a SQLite pool")
                };
                sqlx::migrate!("./migrations/sqlite").run(pool).await?
            }
            Backend::Postgres => {
                let Pool::Postgres(pool) = &self.pool else {
                    unreachable!("a PostgreSQL store has a PostgreSQL pool")
                };
                sqlx::migrate!("./migrations/postgres").run(pool).await?
            }
        }
        self.seed_registries().await
    }

    async fn seed_registries(&self) -> Result<()> {
        let now = Utc::now();
        let mut tx = self.pool.begin().await?;
        for (i, line) in ERN_SEED
            .lines()
            .skip(1)
            .filter(|l| !l.trim().is_empty())
            .enumerate()
        {
            let mut fields = line.splitn(3, ',');
            let (Some(code), Some(name), Some(scope)) =
                (fields.next(), fields.next(), fields.next())
            else {
                return Err(StoreError::Corrupt(format!(
                    "seed line {} malformed",
                    i + 2
                )));
            };
            db::query(
                "INSERT INTO registries (id, code, name, scope, created_at) VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (id) DO NOTHING",
            )
            .bind(i as i64 + 1)
            .bind(code.trim())
            .bind(name.trim())
            .bind(scope.trim())
            .bind(now)
            .execute(&mut tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn list_registries(&self) -> Result<Vec<Registry>> {
        let rows = db::query(
            "SELECT id, code, name, active_key_version, min_cell_count, protection_level FROM registries ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(registry_from_row).collect()
    }

    /// The access epoch: raised in the transaction of every change to the rows API keys
    /// and registries are read from (triggers of migration 0014); what
    /// `service::access` checks before it trusts what it holds.
    pub async fn access_epoch(&self) -> Result<i64> {
        let mut reader = self.reader().await?;
        db::query("SELECT epoch FROM access_epoch WHERE id = 1")
            .fetch_one(&mut reader.db())
            .await?
            .try_get("epoch")
    }

    pub async fn registry_by_code(&self, code: &str) -> Result<Option<Registry>> {
        let row = db::query(
            "SELECT id, code, name, active_key_version, min_cell_count, protection_level FROM registries WHERE code = $1",
        )
        .bind(code)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(registry_from_row).transpose()
    }

    /// Sets a registry's minimum published cell count k (2..=100).
    pub async fn set_min_cell_count(&self, code: &str, k: i64) -> Result<()> {
        let mut conn = self.pool.acquire().await?;
        admin::set_min_cell_count(&mut conn.db(), code, k).await
    }

    /// Sets a registry's protection level (1..=100): the least width of the interval an
    /// attacker can prove for any value a research answer hides.
    pub async fn set_protection_level(&self, code: &str, level: i64) -> Result<()> {
        let mut conn = self.pool.acquire().await?;
        admin::set_protection_level(&mut conn.db(), code, level).await
    }

    /// Creates a centre that is a member of the ERNs keeping `registries`.
    pub async fn create_centre(
        &self,
        code: &str,
        name: &str,
        country: &str,
        registries: &[String],
    ) -> Result<i64> {
        let mut tx = self.pool.begin().await?;
        let id = admin::create_centre(&mut tx.db(), code, name, country, registries).await?;
        tx.commit().await?;
        Ok(id)
    }

    /// Creates a principal, unaudited: for tests, benches and the demo generator's own
    /// principal. The admin command line creates principals through
    /// `service::admin::run_action`, which checks their shape and audits.
    pub async fn create_principal(
        &self,
        name: &str,
        role: Role,
        centre: Option<&str>,
        registries: &[String],
    ) -> Result<i64> {
        let mut tx = self.pool.begin().await?;
        let id = admin::create_principal(&mut tx.db(), name, role, centre, registries).await?;
        tx.commit().await?;
        Ok(id)
    }

    /// The centre `code`, created if missing, and made a member of `registry_id`'s ERN
    /// if it is not yet (for demo data).
    pub async fn ensure_centre(
        &self,
        code: &str,
        name: &str,
        country: &str,
        registry_id: i64,
    ) -> Result<i64> {
        let mut tx = self.pool.begin().await?;
        let id: i64 = match db::query("SELECT id FROM centres WHERE code = $1")
            .bind(code)
            .fetch_optional(&mut tx)
            .await?
        {
            Some(row) => row.try_get("id")?,
            None => insert_centre(&mut tx.db(), code, name, country).await?,
        };
        db::query(
            "INSERT INTO centre_registries (centre_id, registry_id) VALUES ($1, $2) \
             ON CONFLICT (centre_id, registry_id) DO NOTHING",
        )
        .bind(id)
        .bind(registry_id)
        .execute(&mut tx)
        .await?;
        tx.commit().await?;
        Ok(id)
    }

    /// The first of `candidates` (lowest key version) the registry knows: a pseudonym with
    /// a consent decision on file.
    pub async fn known_pseudonym(
        &self,
        registry_id: i64,
        candidates: &[&str],
    ) -> Result<Option<String>> {
        if candidates.is_empty() {
            return Ok(None);
        }
        let params: Vec<String> = (0..candidates.len())
            .map(|i| format!("${}", i + 2))
            .collect();
        let sql = format!(
            "SELECT k.pseudonym FROM patient_keys k \
             WHERE k.registry_id = $1 AND k.pseudonym IN ({}) \
               AND EXISTS (SELECT 1 FROM consent_current c WHERE c.patient = k.id) \
             ORDER BY k.pseudonym LIMIT 1",
            params.join(", ")
        );
        let mut query = db::query(&sql).bind(registry_id);
        for c in candidates {
            query = query.bind(*c);
        }
        query
            .fetch_optional(&self.pool)
            .await?
            .map(|r| r.try_get("pseudonym"))
            .transpose()
    }

    /// Starts a new key version for a registry: pseudonyms of patients it does not know
    /// yet carry the new version; known patients keep theirs. Returns the new version.
    pub async fn rotate_registry_key(&self, code: &str) -> Result<i64> {
        let mut tx = self.pool.begin().await?;
        admin::lock_rotation(&mut tx.db()).await?;
        let version = admin::rotate_registry_key(&mut tx.db(), code).await?;
        tx.commit().await?;
        Ok(version)
    }

    /// Patients (pseudonyms with a case) in a registry.
    pub async fn patients_in_registry(&self, registry_id: i64) -> Result<i64> {
        db::query("SELECT COUNT(*) AS n FROM patients WHERE registry_id = $1")
            .bind(registry_id)
            .fetch_one(&self.pool)
            .await?
            .try_get("n")
    }

    /// The first kind of patient data recorded by a principal other than the admin
    /// principal `generator` (`"a case"`, `"a consent decision"`, `"an erasure"`), or
    /// `None` when every case version, consent event and erasure tombstone in the database
    /// was recorded by it (or there is none). `demo` writes only into such a database.
    pub async fn patient_data_not_recorded_by(
        &self,
        generator: &str,
    ) -> Result<Option<&'static str>> {
        const GENERATOR: &str = "SELECT id FROM principals WHERE name = $1 AND role = $2";
        let checks = [
            ("a case", "case_versions", "recorded_by"),
            ("a consent decision", "consent_events", "recorded_by"),
            ("an erasure", "erasures", "erased_by"),
        ];
        for (what, table, recorder) in checks {
            let found = db::query(&format!(
                "SELECT 1 FROM {table} WHERE {recorder} NOT IN ({GENERATOR}) LIMIT 1"
            ))
            .bind(generator)
            .bind(Role::Admin.as_str())
            .fetch_optional(&self.pool)
            .await?;
            if found.is_some() {
                return Ok(Some(what));
            }
        }
        Ok(None)
    }

    /// The id and role of the principal `name`, if there is one.
    pub async fn principal_role(&self, name: &str) -> Result<Option<(i64, String)>> {
        db::query("SELECT id, role FROM principals WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?
            .map(|row| Ok((row.try_get("id")?, row.try_get("role")?)))
            .transpose()
    }

    pub async fn principal_id(&self, name: &str) -> Result<i64> {
        let mut conn = self.pool.acquire().await?;
        admin::principal_id(&mut conn.db(), name).await
    }

    pub async fn insert_api_key(
        &self,
        key_id: &str,
        principal_id: i64,
        secret_hash: &str,
        expires_at: Option<DateTime<Utc>>,
    ) -> Result<()> {
        let mut conn = self.pool.acquire().await?;
        admin::insert_api_key(
            &mut conn.db(),
            key_id,
            principal_id,
            secret_hash,
            expires_at,
        )
        .await
    }

    /// Replaces a key's stored hash (an Argon2 hash of an earlier version by its HMAC),
    /// if it is still `old`; returns whether it was replaced.
    pub async fn replace_key_hash(&self, key_id: &str, old: &str, new: &str) -> Result<bool> {
        let done = db::query(
            "UPDATE api_keys SET secret_hash = $1 WHERE key_id = $2 AND secret_hash = $3",
        )
        .bind(new)
        .bind(key_id)
        .bind(old)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Revokes a key; returns whether a live key was revoked.
    pub async fn revoke_api_key(&self, key_id: &str) -> Result<bool> {
        let mut conn = self.pool.acquire().await?;
        admin::revoke_api_key(&mut conn.db(), key_id).await
    }

    /// Disables a principal: every key of theirs is refused from the next call on (the
    /// keys stay on file, for the audit log's sake). Returns false if already disabled.
    pub async fn disable_principal(&self, name: &str) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let disabled = admin::disable_principal(&mut tx.db(), name).await?;
        tx.commit().await?;
        Ok(disabled)
    }

    /// Binds a client certificate (its SHA-256 fingerprint) to a principal.
    pub async fn bind_certificate(&self, principal: &str, fingerprint: &str) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        admin::bind_certificate(&mut tx.db(), principal, fingerprint).await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn load_key(&self, key_id: &str) -> Result<Option<KeyRecord>> {
        let Some(row) = db::query(
            "SELECT k.secret_hash, k.expires_at, k.revoked_at, p.id AS principal_id, p.name, p.role, \
                    p.disabled_at, c.id AS centre_id, c.code, c.country \
             FROM api_keys k JOIN principals p ON p.id = k.principal_id \
             LEFT JOIN centres c ON c.id = p.centre_id \
             WHERE k.key_id = $1",
        )
        .bind(key_id)
        .fetch_optional(&self.pool)
        .await?
        else {
            return Ok(None);
        };
        let principal_id: i64 = row.try_get("principal_id")?;
        let role: String = row.try_get("role")?;
        let role = Role::parse(&role).ok_or_else(|| StoreError::Corrupt("unknown role".into()))?;
        let centre = match row.try_get::<Option<i64>>("centre_id")? {
            None => None,
            Some(id) => Some(CentreRef {
                id,
                code: row.try_get("code")?,
                country: row.try_get("country")?,
            }),
        };
        let registries: BTreeSet<i64> = db::query(
            "SELECT registry_id FROM principal_registries WHERE principal_id = $1 \
             UNION SELECT registry_id FROM centre_registries WHERE centre_id = $2",
        )
        .bind(principal_id)
        .bind(centre.as_ref().map(|c| c.id))
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| r.try_get::<i64>("registry_id"))
        .collect::<Result<_, _>>()?;
        let bound_certificates =
            db::query("SELECT fingerprint FROM principal_certificates WHERE principal_id = $1")
                .bind(principal_id)
                .fetch_all(&self.pool)
                .await?
                .iter()
                .map(|r| r.try_get::<String>("fingerprint"))
                .collect::<Result<_, _>>()?;
        Ok(Some(KeyRecord {
            bound_certificates,
            secret_hash: row.try_get("secret_hash")?,
            expires_at: row.try_get("expires_at")?,
            revoked_at: row.try_get("revoked_at")?,
            principal_disabled: row
                .try_get::<Option<DateTime<Utc>>>("disabled_at")?
                .is_some(),
            principal: Principal {
                id: principal_id,
                name: row.try_get("name")?,
                role,
                centre,
                registries,
            },
        }))
    }
}

async fn insert_centre(conn: &mut Db<'_>, code: &str, name: &str, country: &str) -> Result<i64> {
    db::query(
        "INSERT INTO centres (code, name, country, created_at) VALUES ($1, $2, $3, $4) RETURNING id",
    )
    .bind(code)
    .bind(name)
    .bind(country)
    .bind(Utc::now())
    .fetch_one(&mut *conn)
    .await?
    .try_get("id")
}

fn registry_from_row(row: &db::Row) -> Result<Registry> {
    Ok(Registry {
        id: row.try_get("id")?,
        code: row.try_get("code")?,
        name: row.try_get("name")?,
        active_key_version: row.try_get("active_key_version")?,
        min_cell_count: row.try_get("min_cell_count")?,
        protection_level: row.try_get("protection_level")?,
    })
}

async fn resolve_registries(conn: &mut Db<'_>, codes: &[String]) -> Result<Vec<i64>> {
    let mut ids = Vec::with_capacity(codes.len());
    for code in codes {
        let id: i64 = db::query("SELECT id FROM registries WHERE code = $1")
            .bind(code)
            .fetch_optional(&mut *conn)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("registry {code}")))?
            .try_get("id")?;
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    Ok(ids)
}

#[cfg(test)]
mod build_tests {
    /// The SQLite linked in (sqlx's and rusqlite's alike) was built with the project's
    /// `.cargo/config.toml`: without memory statistics, whose one process-wide mutex every
    /// heap allocation and free of every connection took.
    #[test]
    fn sqlite_is_built_without_memory_statistics() {
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        let mut statement = conn.prepare("PRAGMA compile_options").unwrap();
        let options: Vec<String> = statement
            .query_map([], |row| row.get(0))
            .unwrap()
            .collect::<std::result::Result<_, _>>()
            .unwrap();
        assert!(
            options.iter().any(|o| o == "DEFAULT_MEMSTATUS=0"),
            "LIBSQLITE3_FLAGS of .cargo/config.toml not applied: {options:?}"
        );
    }
}

#[cfg(test)]
mod url_tests {
    use super::*;

    /// The URLs whose lock `data_dir::sqlite_path` would find elsewhere than beside the
    /// file SQLite opens are refused; plain paths, with or without sqlx's options, are not.
    #[test]
    fn only_plain_sqlite_paths_are_taken() {
        for url in [
            "sqlite://file:d1/registry.db",
            "sqlite:file:d1/registry.db?mode=rwc",
            "sqlite://d1/registry%2Edb",
            "sqlite:sqlite:d1/registry.db",
            "sqlite://sqlite://d1/registry.db",
            "sqlite://sqlite:file:d1/registry.db",
            "sqlite://d1/registry.lock",
            "sqlite://d1/registry.db?vfs=unix-excl",
            "sqlite://d1/registry.db?mode=rwc&immutable=true",
            "sqlite://d1/registry.db?mode=%6Demory",
        ] {
            assert!(
                matches!(Backend::of_url(url), Err(StoreError::SqliteUrlNotAPath)),
                "{url}"
            );
        }
        for url in [
            "sqlite://d1/registry.db?mode=rwc",
            "sqlite:d1/registry.db",
            "sqlite:///tmp/a:b/registry.db",
            "sqlite::memory:",
        ] {
            assert!(matches!(Backend::of_url(url), Ok(Backend::Sqlite)), "{url}");
        }
    }

    /// A store whose URL names one file while SQLite opened another is refused, whatever
    /// made the two differ.
    #[tokio::test]
    async fn the_file_opened_must_be_the_file_named() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.db"), dir.path().join("b.db"));
        std::fs::write(&b, b"").unwrap();
        let mut store = Store::connect(&format!("sqlite://{}?mode=rwc", a.display()), 1)
            .await
            .unwrap();
        store.check_opened_file().await.unwrap();
        store.sqlite_path = Some(b.clone());
        assert!(matches!(
            store.check_opened_file().await,
            Err(StoreError::OpenedAnotherFile { .. })
        ));
        // Through a symbolic link: the same file.
        let link = dir.path().join("link.db");
        std::os::unix::fs::symlink(&a, &link).unwrap();
        store.sqlite_path = Some(link);
        store.check_opened_file().await.unwrap();
        store.close().await;
    }

    /// A connection the pool opens after its database file was renamed away does not
    /// make a new database under the old name (beside the `-wal` its server writes on
    /// through, which SQLite would then delete).
    #[tokio::test]
    async fn a_later_connection_does_not_recreate_a_database_renamed_away() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("registry.db");
        std::fs::write(&db, b"").unwrap();
        let store = Store::connect(&format!("sqlite://{}?mode=rwc", db.display()), 4)
            .await
            .unwrap();
        // Every connection the pool has open is held, so the next one is opened anew.
        let Pool::Sqlite(pool) = store.pool() else {
            unreachable!("a SQLite URL")
        };
        let mut held = Vec::new();
        while pool.num_idle() > 0 {
            held.push(store.pool().acquire().await.unwrap());
        }
        assert!(pool.size() < 4);
        std::fs::rename(&db, dir.path().join("away.db")).unwrap();
        assert!(store.pool().acquire().await.is_err());
        assert!(!db.exists(), "a new database was made");
        drop(held);
        store.close().await;
    }
}

#[cfg(test)]
mod unavailable_tests {
    use super::*;
    use sqlx::Connection;

    #[test]
    fn connection_failures_are_unavailable_and_mistakes_are_not() {
        use std::io::{Error, ErrorKind};
        for kind in [
            ErrorKind::ConnectionRefused,
            ErrorKind::ConnectionReset,
            ErrorKind::UnexpectedEof,
        ] {
            assert!(StoreError::Database(sqlx::Error::Io(Error::from(kind))).is_unavailable());
        }
        assert!(StoreError::Database(sqlx::Error::PoolTimedOut).is_unavailable());
        assert!(
            !StoreError::Database(sqlx::Error::Io(ErrorKind::PermissionDenied.into()))
                .is_unavailable()
        );
        assert!(!StoreError::Database(sqlx::Error::RowNotFound).is_unavailable());
        assert!(!StoreError::Corrupt("x".into()).is_unavailable());
    }

    /// A real SQLITE_BUSY through the sqlx driver the service's pool uses: another
    /// connection holds the write lock past the busy timeout. A constraint violation is
    /// not "unavailable": retrying it would fail the same way.
    #[tokio::test]
    async fn sqlite_busy_is_unavailable() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("b.db").display());
        let mut holder = sqlx::SqliteConnection::connect(&url).await.unwrap();
        db::query("CREATE TABLE t (x INTEGER PRIMARY KEY)")
            .execute(&mut holder)
            .await
            .unwrap();
        let mut other = sqlx::SqliteConnection::connect(&url).await.unwrap();
        db::query("PRAGMA busy_timeout = 0")
            .execute(&mut other)
            .await
            .unwrap();
        db::query("BEGIN IMMEDIATE")
            .execute(&mut holder)
            .await
            .unwrap();
        let busy = db::query("INSERT INTO t VALUES (1)")
            .execute(&mut other)
            .await
            .unwrap_err();
        assert!(busy.is_unavailable());
        db::query("INSERT INTO t VALUES (1)")
            .execute(&mut holder)
            .await
            .unwrap();
        db::query("COMMIT").execute(&mut holder).await.unwrap();
        let duplicate = db::query("INSERT INTO t VALUES (1)")
            .execute(&mut other)
            .await
            .unwrap_err();
        assert!(!duplicate.is_unavailable());
    }

    /// A full disk (here: the database's page limit reached, which SQLite reports as
    /// SQLITE_FULL, as it does for a full disk) is "not now", through either driver: the
    /// caller gets UNAVAILABLE and may send it again once there is room.
    #[tokio::test]
    async fn sqlite_full_is_unavailable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.db");
        let url = format!("sqlite://{}?mode=rwc", path.display());
        let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
        db::query("CREATE TABLE t (x TEXT)")
            .execute(&mut conn)
            .await
            .unwrap();
        db::query("PRAGMA max_page_count = 3")
            .execute(&mut conn)
            .await
            .unwrap();
        let full = db::query("INSERT INTO t VALUES (zeroblob(100000))")
            .execute(&mut conn)
            .await
            .unwrap_err();
        assert!(full.is_unavailable(), "{full}");
        let lite = rusqlite::Connection::open(&path).unwrap();
        lite.pragma_update(None, "max_page_count", 3).unwrap();
        let full = lite
            .execute("INSERT INTO t VALUES (zeroblob(100000))", [])
            .unwrap_err();
        assert!(StoreError::Sqlite(full).is_unavailable());
        assert!(
            !StoreError::Sqlite(
                lite.execute("INSERT INTO missing VALUES (1)", [])
                    .unwrap_err()
            )
            .is_unavailable()
        );
    }

    /// The same through the SQLite writer's own connection (`db::Db::Lite`): SQLITE_BUSY
    /// past the busy timeout is "not now", a constraint violation is not.
    #[tokio::test]
    async fn sqlite_busy_on_the_writers_connection_is_unavailable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.db");
        let holder = rusqlite::Connection::open(&path).unwrap();
        holder
            .execute_batch("PRAGMA journal_mode = WAL; CREATE TABLE t (x INTEGER PRIMARY KEY)")
            .unwrap();
        let mut writer = Store::open_sqlite_writer(&path).unwrap();
        writer.execute_batch("PRAGMA busy_timeout = 0").unwrap();
        holder.execute_batch("BEGIN IMMEDIATE").unwrap();
        let insert = |db: &mut db::Db<'_>| {
            let q = db::query("INSERT INTO t VALUES ($1)").bind(1i64);
            futures_util::FutureExt::now_or_never(q.execute(&mut *db)).expect("runs at once")
        };
        let busy = insert(&mut db::Db::Lite(&mut writer)).unwrap_err();
        assert!(busy.is_unavailable(), "{busy}");
        holder
            .execute_batch("INSERT INTO t VALUES (1); COMMIT")
            .unwrap();
        let duplicate = insert(&mut db::Db::Lite(&mut writer)).unwrap_err();
        assert!(!duplicate.is_unavailable(), "{duplicate}");
    }
}
