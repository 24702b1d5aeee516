//! Every statement the service runs, on the connection it runs on: a pooled connection of
//! sqlx's native SQLite or PostgreSQL driver (scans, the admin CLI, every read and the
//! writer on PostgreSQL), or a rusqlite connection of SQLite's own, where a statement is a
//! direct call into the engine with no hand-off between threads: the writer's, on its own
//! thread (`super::writer`), and the read-only ones of the request path's short reads,
//! used in place on the task that reads (`super::readers`).
//!
//! The repositories are written once against [`Db`], with the same SQL for all three:
//! numbered parameters (`$1`), bound here by their number on each driver. Values are
//! integers, text, blobs, instants and flags. An instant ([`DateTime<Utc>`], kept to the
//! millisecond) is a `TIMESTAMPTZ` on PostgreSQL and integer milliseconds since the Unix
//! epoch on SQLite, which has no time type; a flag is a `BOOLEAN` on PostgreSQL and 0/1 on
//! SQLite. Both are converted here and nowhere else: a repository binds and reads
//! `DateTime<Utc>` and `bool`. There is no `Any` layer: arguments go to the driver as they
//! are and rows come back as the driver's own, so nothing is converted twice. On [`Db::Lite`] every
//! future completes at its first poll: the statements run synchronously on the thread
//! that polls it.
//!
//! Repositories read a row's columns by name ([`Row::try_get`] with a [`Column`]), so a
//! select list may change order without changing what is read. A name is the one the
//! database reports: a plain `t.col` is `col`, an expression needs an alias (`COUNT(*) AS
//! n`), in lower case. An unknown name is an error, and so is a name two columns share.
//! Rows of SQLite's own connections carry their statement's column names, one copy for
//! all its rows. Only [`Query::fetch_scalar`] and [`Query::fetch_scalars`] read by
//! number: the first column of a one-column result.

use std::fmt::Write as _;
use std::pin::Pin;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use rusqlite::types::{Value, ValueRef};
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgPool, PgRow};
use sqlx::sqlite::{SqlitePool, SqliteRow};
use sqlx::{Executor, PgConnection, Postgres, Row as _, Sqlite, SqliteConnection, Transaction};
use tokio_stream::{Stream, StreamExt};

use super::{Result, StoreError};

/// The pool of the database the service runs on, with sqlx's driver for it.
#[derive(Debug, Clone)]
pub enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

impl Pool {
    /// A connection of the pool, for several statements in a row.
    pub async fn acquire(&self) -> Result<Conn> {
        Ok(match self {
            Pool::Sqlite(pool) => Conn::Sqlite(pool.acquire().await?),
            Pool::Postgres(pool) => Conn::Postgres(pool.acquire().await?),
        })
    }

    /// A transaction on a connection of the pool; rolled back when dropped uncommitted.
    ///
    /// On PostgreSQL, sqlx's BEGIN dropped while it waits for the database's answer (a call
    /// cancelled by its client, a timeout) leaves the transaction open on a connection that
    /// goes back to the pool: sqlx counts the transaction only once the answer came, and
    /// rolls back only what it counted. The next users of that connection would then run
    /// inside it (their writes uncommitted until someone ended it; under a server default
    /// of REPEATABLE READ, their reads of an old snapshot). So there the BEGIN runs to its
    /// end in a task of its own; if nobody waits for it any more, the transaction is
    /// dropped, and rolled back, there. (sqlx's SQLite worker rolls back a BEGIN nobody
    /// waits for itself.)
    pub async fn begin(&self) -> Result<Tx> {
        Ok(match self {
            Pool::Sqlite(pool) => Tx::Sqlite(pool.begin().await?),
            Pool::Postgres(pool) => {
                use tracing::Instrument as _;
                let pool = pool.clone();
                let begun = tokio::spawn(
                    async move { pool.begin().await }.instrument(tracing::Span::current()),
                )
                .await;
                match begun {
                    Ok(tx) => Tx::Postgres(tx?),
                    Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                    // The runtime is shutting down.
                    Err(e) => {
                        return Err(StoreError::Unreachable {
                            cause: format!("a transaction's BEGIN did not complete: {e}"),
                        });
                    }
                }
            }
        })
    }

    /// A transaction on a connection of the pool, begun by `start`: a BEGIN and the
    /// statements that should run with it, sent as one simple query (one round trip on
    /// PostgreSQL). sqlx is not told of it: it ends with [`RawTx::commit`] or
    /// [`RawTx::rollback`], and its connection is closed instead of going back to the
    /// pool if it does not end so, `start` failing half-way included (after a failed
    /// statement PostgreSQL keeps the transaction open, aborted, until a ROLLBACK).
    pub async fn begin_raw(&self, start: &str) -> Result<RawTx> {
        let mut tx = RawTx {
            conn: self.acquire().await?,
            ended: false,
        };
        tx.conn.db().execute_raw(start).await?;
        Ok(tx)
    }

    /// Closes every connection, waiting for those in use to come back.
    pub async fn close(&self) {
        match self {
            Pool::Sqlite(pool) => pool.close().await,
            Pool::Postgres(pool) => pool.close().await,
        }
    }

    /// Runs `sql` (several statements, no parameters) on a connection of the pool.
    pub async fn execute_raw(&self, sql: &str) -> Result<()> {
        self.acquire().await?.db().execute_raw(sql).await
    }
}

/// A connection taken from the [`Pool`]; it goes back when dropped.
pub enum Conn {
    Sqlite(PoolConnection<Sqlite>),
    Postgres(PoolConnection<Postgres>),
}

impl Conn {
    /// Closes the connection when it is dropped instead of returning it to the pool (its
    /// session state is in doubt).
    pub fn close_on_drop(&mut self) {
        match self {
            Conn::Sqlite(conn) => conn.close_on_drop(),
            Conn::Postgres(conn) => conn.close_on_drop(),
        }
    }

    pub fn db(&mut self) -> Db<'_> {
        match self {
            Conn::Sqlite(conn) => Db::Sqlite(conn),
            Conn::Postgres(conn) => Db::Pg(conn),
        }
    }
}

/// A connection of its own, outside the pool (the health probe's).
pub enum Single {
    Sqlite(SqliteConnection),
    Postgres(PgConnection),
}

impl Single {
    /// Connects to `url` (`sqlite:` or `postgres://`), with the driver's default settings.
    pub async fn connect(url: &str) -> Result<Single> {
        use sqlx::Connection as _;
        Ok(match super::Backend::of_url(url)? {
            super::Backend::Sqlite => Single::Sqlite(SqliteConnection::connect(url).await?),
            super::Backend::Postgres => Single::Postgres(PgConnection::connect(url).await?),
        })
    }

    pub fn db(&mut self) -> Db<'_> {
        match self {
            Single::Sqlite(conn) => Db::Sqlite(conn),
            Single::Postgres(conn) => Db::Pg(conn),
        }
    }
}

/// A transaction on a connection of the [`Pool`].
pub enum Tx {
    Sqlite(Transaction<'static, Sqlite>),
    Postgres(Transaction<'static, Postgres>),
}

impl Tx {
    pub fn db(&mut self) -> Db<'_> {
        match self {
            Tx::Sqlite(tx) => Db::Sqlite(tx),
            Tx::Postgres(tx) => Db::Pg(tx),
        }
    }

    pub async fn commit(self) -> Result<()> {
        match self {
            Tx::Sqlite(tx) => tx.commit().await?,
            Tx::Postgres(tx) => tx.commit().await?,
        }
        Ok(())
    }

    pub async fn rollback(self) -> Result<()> {
        match self {
            Tx::Sqlite(tx) => tx.rollback().await?,
            Tx::Postgres(tx) => tx.rollback().await?,
        }
        Ok(())
    }
}

/// A transaction begun and ended by raw statements ([`Pool::begin_raw`]).
pub struct RawTx {
    conn: Conn,
    /// Ended by a COMMIT or ROLLBACK the database answered: the connection may go back.
    ended: bool,
}

impl RawTx {
    pub fn db(&mut self) -> Db<'_> {
        self.conn.db()
    }

    pub async fn commit(mut self) -> Result<()> {
        self.conn.db().execute_raw("COMMIT").await?;
        self.ended = true;
        Ok(())
    }

    pub async fn rollback(mut self) -> Result<()> {
        self.conn.db().execute_raw("ROLLBACK").await?;
        self.ended = true;
        Ok(())
    }

    /// Rolls the transaction back in a task of its own, for a caller that only read and
    /// need not wait for that round trip. The connection goes back to the pool once the
    /// ROLLBACK was answered, and is closed if it failed (or if the runtime is shutting
    /// down and the task never runs).
    pub fn rollback_in_background(self) {
        use tracing::Instrument as _;
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(
                async move {
                    let _ = self.rollback().await;
                }
                .instrument(tracing::Span::current()),
            );
        }
    }
}

impl Drop for RawTx {
    /// A connection whose transaction did not end cleanly never goes back to the pool:
    /// the next user would run inside it.
    fn drop(&mut self) {
        if !self.ended {
            self.conn.close_on_drop();
        }
    }
}

/// A connection, or a transaction on one.
pub enum Db<'c> {
    Sqlite(&'c mut SqliteConnection),
    Pg(&'c mut PgConnection),
    Lite(&'c mut rusqlite::Connection),
}

/// Where a [`Query`] runs: a connection ([`Db`], [`Conn`], [`Tx`]), or any connection of
/// the [`Pool`] for that one statement.
pub enum On<'r, 'c> {
    Db(&'r mut Db<'c>),
    Pool(&'r Pool),
    Conn(&'r mut Conn),
    Tx(&'r mut Tx),
    Sqlite(&'r mut SqliteConnection),
    Pg(&'r mut PgConnection),
}

/// `From<&mut $t> for On` for each connection type, as its variant.
macro_rules! on_from {
    ($($t:ty => $variant:ident),* $(,)?) => {
        $(
            impl<'r> From<&'r mut $t> for On<'r, 'static> {
                fn from(conn: &'r mut $t) -> Self {
                    On::$variant(conn)
                }
            }
        )*
    };
}

on_from! {
    Conn => Conn,
    Tx => Tx,
    SqliteConnection => Sqlite,
    PgConnection => Pg,
}

/// `$query.$method(db)` on the connection `$on` names (one of the pool's, for `&Pool`).
macro_rules! run_on {
    ($on:expr, $query:ident . $method:ident) => {
        match $on.into() {
            On::Db(db) => $query.$method(db).await,
            On::Pool(pool) => $query.$method(&mut pool.acquire().await?.db()).await,
            On::Conn(conn) => $query.$method(&mut conn.db()).await,
            On::Tx(tx) => $query.$method(&mut tx.db()).await,
            On::Sqlite(conn) => $query.$method(&mut Db::Sqlite(conn)).await,
            On::Pg(conn) => $query.$method(&mut Db::Pg(conn)).await,
        }
    };
}

impl<'r, 'c> From<&'r mut Db<'c>> for On<'r, 'c> {
    fn from(db: &'r mut Db<'c>) -> Self {
        On::Db(db)
    }
}

impl<'r> From<&'r Pool> for On<'r, 'static> {
    fn from(pool: &'r Pool) -> Self {
        On::Pool(pool)
    }
}

impl<'c> Db<'c> {
    /// Runs `sql`, which may hold several statements and takes no parameters.
    pub async fn execute_raw(&mut self, sql: &str) -> Result<()> {
        match self {
            Db::Sqlite(conn) => {
                conn.execute(sql).await?;
            }
            Db::Pg(conn) => {
                conn.execute(sql).await?;
            }
            Db::Lite(conn) => conn.execute_batch(sql)?,
        }
        Ok(())
    }

    /// The chunks a multi-row statement over `items` is cut into, one statement each.
    ///
    /// Through sqlx, up to `max` rows each: every statement is a round trip, so few and
    /// large; their text varies with the row count, so only small ones are kept prepared
    /// ([`Db::keeps`], `super::cacheable`). On the SQLite writer's own connection a
    /// statement is a direct call, and what costs is preparing one: chunks are powers of
    /// two up to [`LITE_MAX_ROWS`], seven shapes per statement, each prepared once and
    /// kept, so a batch parses nothing.
    pub fn chunks<'a, T>(&self, items: &'a [T], max: usize) -> Vec<&'a [T]> {
        match self {
            Db::Sqlite(_) | Db::Pg(_) => items.chunks(max.max(1)).collect(),
            Db::Lite(_) => {
                let mut out = Vec::new();
                let mut rest = items;
                while !rest.is_empty() {
                    let n = rest.len().min(LITE_MAX_ROWS.min(max.max(1)));
                    // The largest power of two not above n.
                    let shape = 1 << (usize::BITS - 1 - n.leading_zeros());
                    let (chunk, tail) = rest.split_at(shape);
                    out.push(chunk);
                    rest = tail;
                }
                out
            }
        }
    }

    /// Whether a statement of `rows` rows is kept prepared: through sqlx only small ones
    /// (`super::cacheable`); on the writer's connection every shape [`Db::chunks`] makes.
    pub fn keeps(&self, rows: usize) -> bool {
        match self {
            Db::Sqlite(_) | Db::Pg(_) => super::cacheable(rows),
            Db::Lite(_) => rows <= LITE_MAX_ROWS,
        }
    }

    /// Whether a statement over `n` rows or values binds them as arrays (one per column):
    /// on PostgreSQL when the statement would not be kept prepared as `VALUES`/`IN`
    /// (`super::cacheable`). Small batches keep the exact statements, which PostgreSQL
    /// plans best (measured: an `= ANY` of one pseudonym took 0.3 ms where `IN ($2)` took
    /// under 0.04); large ones get one statement text for any size, prepared once.
    pub fn arrays_for(&self, n: usize) -> bool {
        matches!(self, Db::Pg(_)) && !super::cacheable(n)
    }

    /// Whether a statement over a batch of `n` rows or values ([`Rows`], [`List`]) is kept
    /// prepared: always with arrays (one text for any size), else as [`Db::keeps`].
    pub fn keeps_batch(&self, n: usize) -> bool {
        self.arrays_for(n) || self.keeps(n)
    }

    /// A shorter-lived handle on the same connection.
    pub fn reborrow(&mut self) -> Db<'_> {
        match self {
            Db::Sqlite(conn) => Db::Sqlite(conn),
            Db::Pg(conn) => Db::Pg(conn),
            Db::Lite(conn) => Db::Lite(conn),
        }
    }
}

/// The most rows of one statement on the SQLite writer's connection ([`Db::chunks`]).
pub const LITE_MAX_ROWS: usize = 64;

/// A parameter value. NULLs keep their type: PostgreSQL types a parameter by what is
/// bound to it.
#[derive(Debug, Clone)]
pub enum Arg {
    Int(Option<i64>),
    Text(Option<String>),
    Blob(Option<Vec<u8>>),
    Bool(Option<bool>),
    /// An instant, to the millisecond (the precision the store keeps).
    Time(Option<DateTime<Utc>>),
}

/// The instant `ms` milliseconds after the Unix epoch, for the instants kept as integer
/// milliseconds in memory (an audit entry's time, which its MAC covers; the research
/// index's expiries). One outside chrono's range (some 262,000 years) is refused.
pub fn instant(ms: i64) -> Result<DateTime<Utc>> {
    DateTime::from_timestamp_millis(ms)
        .ok_or_else(|| StoreError::Corrupt(format!("instant {ms} ms is out of range")))
}

/// `t` to the millisecond, rounded down, as the store keeps it on both databases.
fn to_millisecond(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(t.timestamp_millis()).unwrap_or(t)
}

pub trait IntoArg {
    fn into_arg(self) -> Arg;
}

macro_rules! into_arg {
    ($($t:ty => $variant:ident($conv:expr)),* $(,)?) => {
        $(
            impl IntoArg for $t {
                fn into_arg(self) -> Arg {
                    #[allow(clippy::redundant_closure_call)]
                    Arg::$variant(Some(($conv)(self)))
                }
            }
            impl IntoArg for Option<$t> {
                fn into_arg(self) -> Arg {
                    #[allow(clippy::redundant_closure_call)]
                    Arg::$variant(self.map($conv))
                }
            }
        )*
    };
}

into_arg! {
    i64 => Int(|v| v),
    i32 => Int(i64::from),
    bool => Bool(|v| v),
    DateTime<Utc> => Time(to_millisecond),
    String => Text(|v| v),
    &String => Text(|v: &String| v.clone()),
    &str => Text(str::to_owned),
    Vec<u8> => Blob(|v| v),
    &Vec<u8> => Blob(|v: &Vec<u8>| v.clone()),
    &[u8] => Blob(<[u8]>::to_vec),
}

/// A statement with its parameters, run by [`Query::execute`] or a `fetch_*`.
pub struct Query<'q> {
    sql: &'q str,
    args: Vec<Arg>,
    persistent: bool,
    /// PostgreSQL: the rows' values bound as one array per column ([`Query::rows`]).
    arrays: Option<Vec<Array>>,
}

/// A statement, prepared once per connection and kept (see [`Query::persistent`]).
pub fn query(sql: &str) -> Query<'_> {
    Query {
        sql,
        args: Vec::new(),
        persistent: true,
        arrays: None,
    }
}

/// The SQL type of a column of a multi-row statement ([`Rows`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ty {
    Int,
    Text,
    Blob,
    Bool,
    Time,
}

impl Ty {
    fn pg_array(self) -> &'static str {
        match self {
            Ty::Int => "bigint[]",
            Ty::Text => "text[]",
            Ty::Blob => "bytea[]",
            Ty::Bool => "boolean[]",
            Ty::Time => "timestamptz[]",
        }
    }
}

/// One column's values of many rows, bound as one PostgreSQL array.
#[derive(Debug, Clone)]
enum Array {
    Int(Vec<Option<i64>>),
    Text(Vec<Option<String>>),
    Blob(Vec<Option<Vec<u8>>>),
    Bool(Vec<Option<bool>>),
    Time(Vec<Option<DateTime<Utc>>>),
}

impl Array {
    /// An array of `ty` holding `values`; refused (`what` names it in the error) when a
    /// value is not of `ty`.
    fn of(ty: Ty, values: impl ExactSizeIterator<Item = Arg>, what: &str) -> Result<Array> {
        let mut array = match ty {
            Ty::Int => Array::Int(Vec::with_capacity(values.len())),
            Ty::Text => Array::Text(Vec::with_capacity(values.len())),
            Ty::Blob => Array::Blob(Vec::with_capacity(values.len())),
            Ty::Bool => Array::Bool(Vec::with_capacity(values.len())),
            Ty::Time => Array::Time(Vec::with_capacity(values.len())),
        };
        for value in values {
            match (&mut array, value) {
                (Array::Int(v), Arg::Int(x)) => v.push(x),
                (Array::Text(v), Arg::Text(x)) => v.push(x),
                (Array::Blob(v), Arg::Blob(x)) => v.push(x),
                (Array::Bool(v), Arg::Bool(x)) => v.push(x),
                (Array::Time(v), Arg::Time(x)) => v.push(x),
                (_, other) => {
                    return Err(StoreError::Corrupt(format!(
                        "{what} value is {other:?}, not of the type {ty:?}"
                    )));
                }
            }
        }
        Ok(array)
    }
}

/// A list of values a statement tests a column against, its last parameters: `IN ($k,
/// $k+1, ...)`, one parameter per value, and for a longer list on PostgreSQL
/// ([`Db::arrays_for`]) `= ANY($k::text[])`, one array, so the statement has one text
/// whatever the number of values (prepared once per connection). The values are bound one by one either way; [`Query::list`] turns
/// them into the array on PostgreSQL.
#[derive(Debug, Clone, Copy)]
pub struct List(pub Ty);

impl List {
    /// The test for `n` values whose first parameter is `$first`: `IN (...)` or `= ANY(...)`.
    pub fn sql(&self, db: &Db<'_>, first: usize, n: usize) -> String {
        if db.arrays_for(n) {
            return format!("= ANY(${first}::{})", self.0.pg_array());
        }
        let mut out = String::with_capacity(6 + n * 6);
        out.push_str("IN (");
        for i in first..first + n {
            if i > first {
                out.push_str(", ");
            }
            let _ = write!(out, "${i}");
        }
        out.push(')');
        out
    }

    /// Whether the statement with `n` values is kept prepared ([`Db::keeps_batch`]).
    pub fn keeps(&self, db: &Db<'_>, n: usize) -> bool {
        db.keeps_batch(n)
    }
}

/// The rows of a multi-row statement (`INSERT INTO t (...) <rows> [ON CONFLICT ...]`), by
/// the types of the values each row binds and, optionally, a row template where `{i}` is
/// the row's value `i` (for constants and subqueries: `"{0}, 1, {1}"`).
///
/// On SQLite, and for a small batch on PostgreSQL, the rows are `VALUES (...), ...`, one
/// parameter per value, row after row: the statement's text varies with the number of
/// rows. A larger batch on PostgreSQL ([`Db::arrays_for`]) is
/// `SELECT <template> FROM UNNEST($1::bigint[], ...)`, one array parameter per column:
/// one statement text whatever the number of rows, prepared once per connection and kept,
/// so a large batch is not parsed and planned afresh.
/// The values are bound the same way on both (row after row, [`Query::bind`]);
/// [`Query::rows`] turns them into the arrays on PostgreSQL.
#[derive(Debug, Clone, Copy)]
pub struct Rows {
    pub types: &'static [Ty],
    pub template: Option<&'static str>,
}

impl Rows {
    pub const fn of(types: &'static [Ty]) -> Rows {
        Rows {
            types,
            template: None,
        }
    }

    pub const fn with_template(types: &'static [Ty], template: &'static str) -> Rows {
        Rows {
            types,
            template: Some(template),
        }
    }

    /// Appends the row template to `out` with value `i` written by `value(out, i)`: one
    /// pass over the template, no string per value (the writer builds these statements for
    /// every batch, hundreds of values each). A `{` not followed by a value's number and
    /// `}` is copied as it is.
    fn push_row(&self, out: &mut String, value: impl Fn(&mut String, usize)) {
        let Some(template) = self.template else {
            for i in 0..self.types.len() {
                if i > 0 {
                    out.push_str(", ");
                }
                value(out, i);
            }
            return;
        };
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            out.push_str(&rest[..open]);
            let after = &rest[open + 1..];
            let index = after.find('}').and_then(|close| {
                let digits = &after[..close];
                let i = digits.parse::<usize>().ok()?;
                // Exactly the decimal form of `i`: no sign, no leading zero.
                (digits.bytes().all(|b| b.is_ascii_digit())
                    && !(digits.len() > 1 && digits.starts_with('0'))
                    && i < self.types.len())
                .then_some((close, i))
            });
            match index {
                Some((close, i)) => {
                    value(out, i);
                    rest = &after[close + 1..];
                }
                None => {
                    out.push('{');
                    rest = after;
                }
            }
        }
        out.push_str(rest);
    }

    /// The row template with value `i` written `value(i)`.
    fn row(&self, value: impl Fn(usize) -> String) -> String {
        let mut out = String::new();
        self.push_row(&mut out, |out, i| out.push_str(&value(i)));
        out
    }

    /// The rows part of the statement for `n` rows on `db`.
    pub fn sql(&self, db: &Db<'_>, n: usize) -> String {
        let c = self.types.len();
        if db.arrays_for(n) {
            let arrays = self
                .types
                .iter()
                .enumerate()
                .map(|(i, ty)| format!("${}::{}", i + 1, ty.pg_array()))
                .collect::<Vec<_>>()
                .join(", ");
            let names = (0..c)
                .map(|i| format!("v{i}"))
                .collect::<Vec<_>>()
                .join(", ");
            return format!(
                "SELECT {} FROM UNNEST({arrays}) AS u({names})",
                self.row(|i| format!("u.v{i}"))
            );
        }
        let mut out = String::with_capacity(8 + n * (c * 7 + 4));
        out.push_str("VALUES ");
        for r in 0..n {
            if r > 0 {
                out.push_str(", ");
            }
            out.push('(');
            self.push_row(&mut out, |out, i| {
                let _ = write!(out, "${}", 1 + r * c + i);
            });
            out.push(')');
        }
        out
    }

    /// Whether the statement of `n` rows is kept prepared ([`Db::keeps_batch`]).
    pub fn keeps(&self, db: &Db<'_>, n: usize) -> bool {
        db.keeps_batch(n)
    }
}

/// What a statement changed.
#[derive(Debug, Clone, Copy)]
pub struct Done {
    rows_affected: u64,
}

impl Done {
    pub fn rows_affected(&self) -> u64 {
        self.rows_affected
    }
}

/// `$query` as a statement of sqlx's driver for `$db` (`Sqlite` or `Postgres`), its
/// arguments bound in order, then its arrays (PostgreSQL only: [`Query::rows`]).
macro_rules! sqlx_query {
    (@arrays Sqlite, $q:ident, $arrays:ident) => {{
        debug_assert!($arrays.is_none(), "arrays are bound on PostgreSQL only");
        $q
    }};
    (@arrays Postgres, $q:ident, $arrays:ident) => {{
        let mut q = $q;
        for array in $arrays.into_iter().flatten() {
            q = match array {
                Array::Int(v) => q.bind(v),
                Array::Text(v) => q.bind(v),
                Array::Blob(v) => q.bind(v),
                Array::Bool(v) => q.bind(v),
                Array::Time(v) => q.bind(v),
            };
        }
        q
    }};
    // An instant: integer milliseconds on SQLite, a TIMESTAMPTZ on PostgreSQL.
    (@time Sqlite, $q:ident, $t:ident) => {
        $q.bind($t.map(|t| t.timestamp_millis()))
    };
    (@time Postgres, $q:ident, $t:ident) => {
        $q.bind($t)
    };
    ($db:ident, $query:expr) => {{
        let Query {
            sql,
            args,
            persistent,
            arrays,
        } = $query;
        let mut q = sqlx::query::<$db>(sql).persistent(persistent);
        for arg in args {
            q = match arg {
                Arg::Int(v) => q.bind(v),
                Arg::Text(v) => q.bind(v),
                Arg::Blob(v) => q.bind(v),
                Arg::Bool(v) => q.bind(v),
                Arg::Time(v) => sqlx_query!(@time $db, q, v),
            };
        }
        sqlx_query!(@arrays $db, q, arrays)
    }};
}

impl<'q> Query<'q> {
    /// Binds the next numbered parameter.
    pub fn bind(mut self, value: impl IntoArg) -> Self {
        self.args.push(value.into_arg());
        self
    }

    /// The values bound so far, row after row, as the rows of `rows` on `db`: one array
    /// per column when [`Db::arrays_for`] says so ([`Rows`]), else unchanged. Refuses values that
    /// do not make whole rows or do not match the column's type.
    pub fn rows(mut self, db: &Db<'_>, rows: &Rows) -> Result<Self> {
        let c = rows.types.len();
        if c == 0 || !self.args.len().is_multiple_of(c) {
            return Err(StoreError::Corrupt(format!(
                "{} values bound for rows of {c}",
                self.args.len()
            )));
        }
        let n = self.args.len() / c;
        if !db.arrays_for(n) {
            return Ok(self);
        }
        let mut columns: Vec<Vec<Arg>> = (0..c).map(|_| Vec::with_capacity(n)).collect();
        for (k, arg) in std::mem::take(&mut self.args).into_iter().enumerate() {
            columns[k % c].push(arg);
        }
        let arrays = columns
            .into_iter()
            .zip(rows.types.iter())
            .enumerate()
            .map(|(k, (values, &ty))| {
                Array::of(
                    ty,
                    values.into_iter(),
                    &format!("column {} of a row", k + 1),
                )
            })
            .collect::<Result<Vec<Array>>>()?;
        self.arrays = Some(arrays);
        Ok(self)
    }

    /// The values bound from parameter `$first` on, the statement's last, as the values of
    /// `list` on `db`: one array when [`Db::arrays_for`] says so ([`List`]), else
    /// unchanged. Refuses a
    /// value not of the list's type.
    pub fn list(mut self, db: &Db<'_>, first: usize, list: &List) -> Result<Self> {
        if first == 0 || first > self.args.len() + 1 {
            return Err(StoreError::Corrupt(format!(
                "a list from parameter ${first} of a statement with {} values",
                self.args.len()
            )));
        }
        if !db.arrays_for(self.args.len() + 1 - first) {
            return Ok(self);
        }
        let values = self.args.split_off(first - 1);
        let array = Array::of(list.0, values.into_iter(), "a list")?;
        self.arrays.get_or_insert_with(Vec::new).push(array);
        Ok(self)
    }

    /// Binds `values` as one PostgreSQL array of `ty`, after every value bound one by one
    /// and every array bound before it (whatever [`Query::rows`] or [`Query::list`] made
    /// of them): its parameter is numbered after theirs. PostgreSQL only: refused on
    /// SQLite, which has no arrays. Refuses a value not of `ty`.
    pub fn bind_array<T: IntoArg>(
        mut self,
        db: &Db<'_>,
        ty: Ty,
        values: impl ExactSizeIterator<Item = T>,
    ) -> Result<Self> {
        if !matches!(db, Db::Pg(_)) {
            return Err(StoreError::Corrupt(
                "an array bound to a statement for SQLite".into(),
            ));
        }
        let array = Array::of(ty, values.map(IntoArg::into_arg), "an array")?;
        self.arrays.get_or_insert_with(Vec::new).push(array);
        Ok(self)
    }

    /// Whether the prepared statement is kept in the connection's cache (see
    /// `super::cacheable`).
    pub fn persistent(mut self, keep: bool) -> Self {
        self.persistent = keep;
        self
    }

    pub async fn execute<'r, 'c>(self, on: impl Into<On<'r, 'c>>) -> Result<Done>
    where
        'c: 'r,
    {
        run_on!(on, self.execute_on)
    }

    pub async fn fetch_all<'r, 'c>(self, on: impl Into<On<'r, 'c>>) -> Result<Vec<Row>>
    where
        'c: 'r,
    {
        run_on!(on, self.fetch_all_on)
    }

    pub async fn fetch_optional<'r, 'c>(self, on: impl Into<On<'r, 'c>>) -> Result<Option<Row>>
    where
        'c: 'r,
    {
        run_on!(on, self.fetch_optional_on)
    }

    pub async fn fetch_one<'r, 'c>(self, on: impl Into<On<'r, 'c>>) -> Result<Row>
    where
        'c: 'r,
    {
        self.fetch_optional(on)
            .await?
            .ok_or(StoreError::Database(sqlx::Error::RowNotFound))
    }

    /// The first column of the one row the statement gives.
    pub async fn fetch_scalar<'r, 'c, T: Decode>(self, on: impl Into<On<'r, 'c>>) -> Result<T>
    where
        'c: 'r,
    {
        self.fetch_one(on).await?.try_get(0)
    }

    /// The first column of every row the statement gives.
    pub async fn fetch_scalars<'r, 'c, T: Decode>(self, on: impl Into<On<'r, 'c>>) -> Result<Vec<T>>
    where
        'c: 'r,
    {
        self.fetch_all(on)
            .await?
            .iter()
            .map(|row| row.try_get(0))
            .collect()
    }

    /// The rows one at a time, as the driver reads them (for scans too large to hold).
    /// On SQLite's own connections ([`Db::Lite`]) the rows are read first: scans run on the
    /// pool.
    pub fn fetch<'e>(
        self,
        db: &'e mut Db<'_>,
    ) -> Pin<Box<dyn Stream<Item = Result<Row>> + Send + 'e>>
    where
        'q: 'e,
    {
        match db {
            Db::Sqlite(conn) => Box::pin(
                sqlx_query!(Sqlite, self)
                    .fetch(&mut **conn)
                    .map(|row| Ok(Row::Sqlite(row?))),
            ),
            Db::Pg(conn) => Box::pin(
                sqlx_query!(Postgres, self)
                    .fetch(&mut **conn)
                    .map(|row| Ok(Row::Pg(row?))),
            ),
            Db::Lite(conn) => {
                let rows = self.run_lite(conn, true).map(|(rows, _)| rows);
                match rows {
                    Ok(rows) => Box::pin(tokio_stream::iter(rows.into_iter().map(Ok))),
                    Err(err) => Box::pin(tokio_stream::once(Err(err))),
                }
            }
        }
    }

    async fn execute_on(self, db: &mut Db<'_>) -> Result<Done> {
        let rows_affected = match db {
            Db::Sqlite(conn) => sqlx_query!(Sqlite, self)
                .execute(&mut **conn)
                .await?
                .rows_affected(),
            Db::Pg(conn) => sqlx_query!(Postgres, self)
                .execute(&mut **conn)
                .await?
                .rows_affected(),
            Db::Lite(conn) => self.run_lite(conn, false)?.1,
        };
        Ok(Done { rows_affected })
    }

    async fn fetch_all_on(self, db: &mut Db<'_>) -> Result<Vec<Row>> {
        Ok(match db {
            Db::Sqlite(conn) => sqlx_query!(Sqlite, self)
                .fetch_all(&mut **conn)
                .await?
                .into_iter()
                .map(Row::Sqlite)
                .collect(),
            Db::Pg(conn) => sqlx_query!(Postgres, self)
                .fetch_all(&mut **conn)
                .await?
                .into_iter()
                .map(Row::Pg)
                .collect(),
            Db::Lite(conn) => self.run_lite(conn, true)?.0,
        })
    }

    async fn fetch_optional_on(self, db: &mut Db<'_>) -> Result<Option<Row>> {
        Ok(match db {
            Db::Sqlite(conn) => sqlx_query!(Sqlite, self)
                .fetch_optional(&mut **conn)
                .await?
                .map(Row::Sqlite),
            Db::Pg(conn) => sqlx_query!(Postgres, self)
                .fetch_optional(&mut **conn)
                .await?
                .map(Row::Pg),
            Db::Lite(conn) => self.run_lite(conn, true)?.0.into_iter().next(),
        })
    }

    /// Runs the statement on the engine directly; its rows when `rows`, and the number
    /// of rows it changed.
    fn run_lite(&self, conn: &rusqlite::Connection, rows: bool) -> Result<(Vec<Row>, u64)> {
        // `?N`, not `$N`: SQLite numbers `$N` parameters by first appearance, and finding a
        // name's number costs a scan of the statement's names per parameter.
        let sql = numbered(self.sql);
        if self.persistent {
            let mut stmt = conn.prepare_cached(&sql)?;
            bind_and_step(conn, &mut stmt, &self.args, rows)
        } else {
            // Not cached: finalised when dropped, like sqlx's non-persistent statements.
            let mut stmt = conn.prepare(&sql)?;
            bind_and_step(conn, &mut stmt, &self.args, rows)
        }
    }
}

/// `sql` with every `$N` parameter written `?N` (same number; outside quoted text).
fn numbered(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut quote: Option<char> = None;
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '\'' || c == '"' => quote = Some(c),
            None if c == '$' && chars.peek().is_some_and(char::is_ascii_digit) => {
                out.push('?');
                continue;
            }
            None => {}
        }
        out.push(c);
    }
    out
}

/// Binds `args` to parameters `?1`, `?2`, ... and steps the statement to its end.
fn bind_and_step(
    conn: &rusqlite::Connection,
    stmt: &mut rusqlite::Statement<'_>,
    args: &[Arg],
    rows: bool,
) -> Result<(Vec<Row>, u64)> {
    let count = stmt.parameter_count();
    if count > args.len() {
        return Err(StoreError::Corrupt(format!(
            "statement parameter ${} has no value bound",
            args.len() + 1
        )));
    }
    for (i, arg) in args.iter().take(count).enumerate() {
        let index = i + 1;
        match arg {
            Arg::Int(v) => stmt.raw_bind_parameter(index, v)?,
            Arg::Text(v) => stmt.raw_bind_parameter(index, v)?,
            Arg::Blob(v) => stmt.raw_bind_parameter(index, v)?,
            Arg::Bool(v) => stmt.raw_bind_parameter(index, v.map(i64::from))?,
            Arg::Time(v) => stmt.raw_bind_parameter(index, v.map(|t| t.timestamp_millis()))?,
        }
    }
    let columns = stmt.column_count();
    let mut out = Vec::new();
    // The column names, shared by the statement's rows: read at its first row, so a
    // statement without rows costs nothing more.
    let mut names: Option<Arc<[String]>> = None;
    let mut cursor = stmt.raw_query();
    while let Some(row) = cursor.next()? {
        if rows {
            let mut values = Vec::with_capacity(columns);
            for c in 0..columns {
                values.push(Value::from(row.get_ref(c)?));
            }
            let names = names.get_or_insert_with(|| {
                let stmt: &rusqlite::Statement<'_> = row.as_ref();
                stmt.column_names().into_iter().map(str::to_owned).collect()
            });
            out.push(Row::Lite {
                names: Arc::clone(names),
                values,
            });
        }
    }
    drop(cursor);
    Ok((out, conn.changes()))
}

/// A result row of any of the three connections.
pub enum Row {
    Sqlite(SqliteRow),
    Pg(PgRow),
    /// A row of the SQLite writer's own connection: the statement's column names (one
    /// copy for all its rows) and the row's values.
    Lite {
        names: Arc<[String]>,
        values: Vec<Value>,
    },
}

/// A column of a [`Row`]: its position (`usize`) or its name (`&str`). A name is
/// compared exactly with the name the database reports: an alias as written (lower
/// case, unquoted, reads the same on both databases), a plain `t.col` as `col`.
pub trait Column: Copy + std::fmt::Display {
    /// The column's position in `row`.
    fn position(self, row: &Row) -> Result<usize>;
}

impl Column for usize {
    fn position(self, _row: &Row) -> Result<usize> {
        Ok(self)
    }
}

/// A name no column has is an error, and so is one two columns have (`p.id, c.id`
/// without aliases): a read must not depend on the order of the select list.
impl Column for &str {
    fn position(self, row: &Row) -> Result<usize> {
        match row {
            Row::Sqlite(r) => find(self, r.columns().iter().map(sqlx::Column::name)),
            Row::Pg(r) => find(self, r.columns().iter().map(sqlx::Column::name)),
            Row::Lite { names, .. } => find(self, names.iter().map(String::as_str)),
        }
    }
}

/// The position of the one column named `name` among `names`.
fn find<'a>(name: &str, mut names: impl Iterator<Item = &'a str>) -> Result<usize> {
    let Some(position) = names.position(|n| n == name) else {
        return Err(StoreError::Database(sqlx::Error::ColumnNotFound(
            name.to_owned(),
        )));
    };
    if names.any(|n| n == name) {
        return Err(StoreError::Database(sqlx::Error::ColumnDecode {
            index: name.to_owned(),
            source: "more than one column has this name".into(),
        }));
    }
    Ok(position)
}

impl Row {
    /// The number of columns.
    pub fn len(&self) -> usize {
        match self {
            Row::Sqlite(row) => row.len(),
            Row::Pg(row) => row.len(),
            Row::Lite { values, .. } => values.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The column (by name or number) as a `T`; panics when it is not one (for tests,
    /// like sqlx's).
    pub fn get<T: Decode>(&self, column: impl Column) -> T {
        self.try_get(column)
            .unwrap_or_else(|e| panic!("column {column}: {e}"))
    }

    /// The column (by name or number) as a `T`.
    pub fn try_get<T: Decode>(&self, column: impl Column) -> Result<T> {
        let index = column.position(self)?;
        // A value that does not decode: the error names the column as it was asked for.
        let named = |err: sqlx::Error| match err {
            sqlx::Error::ColumnDecode { source, .. } => sqlx::Error::ColumnDecode {
                index: column.to_string(),
                source,
            },
            other => other,
        };
        match self {
            Row::Sqlite(row) => T::from_sqlite(row, index).map_err(|e| named(e).into()),
            Row::Pg(row) => T::from_pg(row, index).map_err(|e| named(e).into()),
            Row::Lite { values, .. } => {
                let value = values.get(index).ok_or_else(|| {
                    StoreError::Database(sqlx::Error::ColumnIndexOutOfBounds {
                        index,
                        len: values.len(),
                    })
                })?;
                T::from_lite(value.into()).map_err(|expected| {
                    StoreError::Database(sqlx::Error::ColumnDecode {
                        index: column.to_string(),
                        source: format!("expected {expected}").into(),
                    })
                })
            }
        }
    }
}

/// A column type readable from every connection: integers, text, blobs, and the flags and
/// instants the databases keep differently (see the module's doc).
pub trait Decode: Sized {
    /// The value of an engine column, or what was expected instead.
    fn from_lite(value: ValueRef<'_>) -> std::result::Result<Self, &'static str>;

    /// Column `index` of a row of sqlx's SQLite driver.
    fn from_sqlite(row: &SqliteRow, index: usize) -> sqlx::Result<Self>;

    /// Column `index` of a PostgreSQL row.
    fn from_pg(row: &PgRow, index: usize) -> sqlx::Result<Self>;
}

impl Decode for i64 {
    fn from_lite(value: ValueRef<'_>) -> std::result::Result<Self, &'static str> {
        value.as_i64().map_err(|_| "an integer")
    }

    fn from_sqlite(row: &SqliteRow, index: usize) -> sqlx::Result<Self> {
        row.try_get(index)
    }

    /// Any integer column: PostgreSQL types an integer literal or a `CASE` of them
    /// (`SELECT 0`, `THEN 1 ELSE 0`) as INT4, the schema's columns are BIGINT.
    fn from_pg(row: &PgRow, index: usize) -> sqlx::Result<Self> {
        use sqlx::{TypeInfo as _, ValueRef as _};
        match row.try_get_raw(index)?.type_info().name() {
            "INT4" => row.try_get::<i32, _>(index).map(i64::from),
            "INT2" => row.try_get::<i16, _>(index).map(i64::from),
            _ => row.try_get(index),
        }
    }
}

/// Types both sqlx drivers decode as the schema keeps them on both databases.
macro_rules! decode_as_is {
    ($($t:ty => $lite:expr, $expected:literal;)*) => {
        $(
            impl Decode for $t {
                fn from_lite(value: ValueRef<'_>) -> std::result::Result<Self, &'static str> {
                    #[allow(clippy::redundant_closure_call)]
                    ($lite)(value).ok_or($expected)
                }

                fn from_sqlite(row: &SqliteRow, index: usize) -> sqlx::Result<Self> {
                    row.try_get(index)
                }

                fn from_pg(row: &PgRow, index: usize) -> sqlx::Result<Self> {
                    row.try_get(index)
                }
            }
        )*
    };
}

decode_as_is! {
    String => |v: ValueRef<'_>| v.as_str().ok().map(str::to_owned), "UTF-8 text";
    Vec<u8> => |v: ValueRef<'_>| v.as_blob().ok().map(<[u8]>::to_vec), "a blob";
    // A flag: 0 or 1 on SQLite (sqlx's driver reads any integer, as SQLite's own truth
    // rule does), a BOOLEAN on PostgreSQL.
    bool => |v: ValueRef<'_>| v.as_i64().ok().map(|i| i != 0), "a flag (an integer)";
}

/// An instant: integer milliseconds since the Unix epoch on SQLite, a `TIMESTAMPTZ` on
/// PostgreSQL. (sqlx's own SQLite decoding would read an integer as *seconds*.)
impl Decode for DateTime<Utc> {
    fn from_lite(value: ValueRef<'_>) -> std::result::Result<Self, &'static str> {
        let ms = value
            .as_i64()
            .map_err(|_| "an instant (integer milliseconds)")?;
        DateTime::from_timestamp_millis(ms).ok_or("an instant in chrono's range")
    }

    fn from_sqlite(row: &SqliteRow, index: usize) -> sqlx::Result<Self> {
        let ms: i64 = row.try_get(index)?;
        DateTime::from_timestamp_millis(ms).ok_or_else(|| sqlx::Error::ColumnDecode {
            index: index.to_string(),
            source: format!("instant {ms} ms is out of range").into(),
        })
    }

    /// In the binary form (microseconds since 2000-01-01) with checked arithmetic: sqlx's
    /// own decoding adds without a check and panics on an instant past chrono's range
    /// (`infinity`, the year 290000), which anyone who can write to the database could
    /// store (a re-check of 2026-12-07 stopped a writer partition and `audit verify` so).
    fn from_pg(row: &PgRow, index: usize) -> sqlx::Result<Self> {
        use sqlx::ValueRef as _;
        let raw = row.try_get_raw(index)?;
        if raw.is_null() || raw.format() != sqlx::postgres::PgValueFormat::Binary {
            // NULL is the caller's error to report; the text form is parsed with checks.
            return row.try_get(index);
        }
        let undecodable = |what: &str| sqlx::Error::ColumnDecode {
            index: index.to_string(),
            source: what.to_owned().into(),
        };
        let bytes: [u8; 8] = raw
            .as_bytes()
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| undecodable("an instant is 8 bytes"))?;
        let micros = i64::from_be_bytes(bytes);
        DateTime::from_timestamp(946_684_800, 0)
            .and_then(|epoch| epoch.checked_add_signed(chrono::TimeDelta::microseconds(micros)))
            .ok_or_else(|| undecodable("an instant out of range (infinity?)"))
    }
}

impl<T: Decode> Decode for Option<T> {
    fn from_lite(value: ValueRef<'_>) -> std::result::Result<Self, &'static str> {
        match value {
            ValueRef::Null => Ok(None),
            other => T::from_lite(other).map(Some),
        }
    }

    fn from_sqlite(row: &SqliteRow, index: usize) -> sqlx::Result<Self> {
        use sqlx::ValueRef as _;
        if row.try_get_raw(index)?.is_null() {
            Ok(None)
        } else {
            T::from_sqlite(row, index).map(Some)
        }
    }

    fn from_pg(row: &PgRow, index: usize) -> sqlx::Result<Self> {
        use sqlx::ValueRef as _;
        if row.try_get_raw(index)?.is_null() {
            Ok(None)
        } else {
            T::from_pg(row, index).map(Some)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::Connection;

    /// The same statements through both connections give the same answers: parameters
    /// bound by number (out of order, used twice), typed NULLs, flags, blobs, RETURNING,
    /// rows changed, uncached statements, and a value of the wrong type refused.
    #[tokio::test]
    async fn both_connections_answer_alike() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        let url = format!("sqlite://{}?mode=rwc", path.display());
        let mut pooled = SqliteConnection::connect(&url).await.unwrap();
        sqlx::query(
            "CREATE TABLE t (id INTEGER PRIMARY KEY, a TEXT NOT NULL, b INTEGER, \
             flag INTEGER NOT NULL, data BLOB)",
        )
        .execute(&mut pooled)
        .await
        .unwrap();
        let mut lite = rusqlite::Connection::open(&path).unwrap();
        let mut answers = Vec::new();
        for (round, db) in [Db::Sqlite(&mut pooled), Db::Lite(&mut lite)]
            .iter_mut()
            .enumerate()
        {
            let base = 10 * round as i64;
            let inserted = query(
                "INSERT INTO t (id, a, b, flag, data) VALUES ($2, $1, $3, $4, $5), \
                 ($2 + 1, $1, NULL, $4, NULL) RETURNING id, a",
            )
            .bind("text")
            .bind(base + 1)
            .bind(None::<i64>)
            .bind(true)
            .bind(vec![0u8, 255])
            .persistent(false)
            .fetch_all(&mut *db)
            .await
            .unwrap();
            let ids: Vec<(i64, String)> = inserted
                .iter()
                .map(|r| (r.try_get::<i64>(0).unwrap() - base, r.try_get(1).unwrap()))
                .collect();
            let done = query("UPDATE t SET b = $1 WHERE id > $2 AND id <= $2 + 2")
                .bind(7i64)
                .bind(base)
                .execute(&mut *db)
                .await
                .unwrap();
            let row = query("SELECT a, b, flag, data FROM t WHERE id = $1")
                .bind(base + 1)
                .fetch_one(&mut *db)
                .await
                .unwrap();
            let read: (String, Option<i64>, i64, Option<Vec<u8>>) = (
                row.try_get(0).unwrap(),
                row.try_get(1).unwrap(),
                row.try_get(2).unwrap(),
                row.try_get(3).unwrap(),
            );
            assert!(row.try_get::<i64>(0).is_err(), "text read as an integer");
            let none = query("SELECT a FROM t WHERE id = $1")
                .bind(-1i64)
                .fetch_optional(&mut *db)
                .await
                .unwrap();
            answers.push((ids, done.rows_affected(), read, none.is_none()));
        }
        assert_eq!(answers[0], answers[1]);
        assert_eq!(
            answers[0],
            (
                vec![(1, "text".to_string()), (2, "text".to_string())],
                2,
                ("text".to_string(), Some(7), 1, Some(vec![0u8, 255])),
                true
            )
        );
    }

    #[test]
    fn numbered_parameters_keep_their_numbers_outside_quoted_text() {
        assert_eq!(
            numbered("SELECT $2, '$1', \"a$3\", $10 || '|' FROM t WHERE x = $1"),
            "SELECT ?2, '$1', \"a$3\", ?10 || '|' FROM t WHERE x = ?1"
        );
        assert_eq!(numbered("SELECT $ FROM t"), "SELECT $ FROM t");
    }

    /// The writer's connection cuts rows into power-of-two shapes (so few statements to
    /// prepare), sqlx's into chunks of up to `max`; both keep every row, in order.
    #[test]
    fn chunks_cover_every_row_in_order() {
        let mut lite = rusqlite::Connection::open_in_memory().unwrap();
        let items: Vec<usize> = (0..300).collect();
        for n in [0, 1, 2, 3, 63, 64, 65, 255, 300] {
            let db = Db::Lite(&mut lite);
            let chunks = db.chunks(&items[..n], 256);
            assert!(
                chunks
                    .iter()
                    .all(|c| c.len().is_power_of_two() && c.len() <= 64)
            );
            assert_eq!(chunks.concat(), items[..n].to_vec());
            assert!(chunks.iter().all(|c| db.keeps(c.len())));
        }
        assert_eq!(
            Db::Lite(&mut lite)
                .chunks(&items[..100], 256)
                .iter()
                .map(|c| c.len())
                .collect::<Vec<_>>(),
            vec![64, 32, 4]
        );
        assert_eq!(
            Db::Lite(&mut lite)
                .chunks(&items[..100], 8)
                .iter()
                .map(|c| c.len())
                .collect::<Vec<_>>(),
            vec![8; 12].into_iter().chain([4]).collect::<Vec<_>>()
        );
    }

    /// PostgreSQL types an integer literal, and a `CASE` of them, as INT4, and a SMALLINT
    /// cast as INT2; all are read as `i64`, NULLs of them as `None`, and text is still
    /// refused. Runs on the PostgreSQL pass of `scripts/test` (`ERN_TEST_DATABASE_URL`).
    #[tokio::test]
    async fn postgres_integers_of_every_width_read_as_i64() {
        let Ok(url) = std::env::var("ERN_TEST_DATABASE_URL") else {
            return;
        };
        if url.is_empty() {
            return;
        }
        let mut conn = PgConnection::connect(&url).await.unwrap();
        let row = query(
            "SELECT 0, CASE WHEN $1 > 0 THEN 1 ELSE 0 END, CAST(7 AS SMALLINT), \
             CAST(NULL AS INT4), CAST(9000000000 AS BIGINT), 'x'",
        )
        .bind(5i64)
        .fetch_one(&mut conn)
        .await
        .unwrap();
        assert_eq!(row.try_get::<i64>(0).unwrap(), 0);
        assert_eq!(row.try_get::<i64>(1).unwrap(), 1);
        assert_eq!(row.try_get::<i64>(2).unwrap(), 7);
        assert_eq!(row.try_get::<Option<i64>>(3).unwrap(), None);
        assert_eq!(row.try_get::<Option<i64>>(4).unwrap(), Some(9_000_000_000));
        assert!(row.try_get::<i64>(5).is_err(), "text read as an integer");
        assert!(row.try_get::<i64>(3).is_err(), "NULL read as an integer");
    }

    /// A pool of one PostgreSQL connection to `ERN_TEST_DATABASE_URL`; `None` when unset
    /// (the SQLite pass of `scripts/test`).
    async fn one_connection_pool() -> Option<Pool> {
        let url = std::env::var("ERN_TEST_DATABASE_URL").ok()?;
        if url.is_empty() {
            return None;
        }
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(&url)
            .await
            .unwrap();
        Some(Pool::Postgres(pool))
    }

    /// Whether the pool's connection is inside a transaction begun before: now() is the
    /// transaction's start, so two statements a moment apart see the same instant.
    async fn in_open_transaction(pool: &Pool) -> bool {
        let mut conn = pool.acquire().await.unwrap();
        let mut at = Vec::with_capacity(2);
        for _ in 0..2 {
            let now: String = query("SELECT CAST(now() AS TEXT)")
                .fetch_scalar(&mut conn)
                .await
                .unwrap();
            at.push(now);
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        at[0] == at[1]
    }

    /// A raw transaction whose opening fails half-way (PostgreSQL keeps it open, aborted),
    /// or that is dropped without COMMIT or ROLLBACK, never hands its connection back to the
    /// pool: with a pool of one connection, the next statement would fail "current
    /// transaction is aborted" or run inside the transaction. Runs on the PostgreSQL pass
    /// of `scripts/test` (`ERN_TEST_DATABASE_URL`).
    #[tokio::test]
    async fn a_raw_transaction_that_did_not_end_cleanly_closes_its_connection() {
        let Some(pool) = one_connection_pool().await else {
            return;
        };
        assert!(!in_open_transaction(&pool).await, "the check itself");
        // Fails at its second statement: the first opened the transaction.
        let failed = pool.begin_raw("BEGIN; SELECT 1 / 0;").await;
        assert!(failed.is_err());
        assert!(!in_open_transaction(&pool).await);
        // Dropped without an end.
        let mut tx = pool.begin_raw("BEGIN;").await.unwrap();
        query("SELECT 1").execute(&mut tx.db()).await.unwrap();
        drop(tx);
        assert!(!in_open_transaction(&pool).await);
        // Ended: its connection goes back, outside any transaction.
        let tx = pool.begin_raw("BEGIN; SELECT 1;").await.unwrap();
        tx.commit().await.unwrap();
        assert!(!in_open_transaction(&pool).await);
        pool.close().await;
    }

    /// A BEGIN whose caller stops waiting for it (after one poll, or a timer that fires at
    /// once, then ever later) never leaves its transaction open on a connection of the
    /// pool. Runs on the PostgreSQL pass of `scripts/test` (`ERN_TEST_DATABASE_URL`). Whether
    /// a cut lands between the BEGIN's sending and its answer depends on timing: with the
    /// BEGIN awaited in place (no task of its own) this failed in 1 run of 5 on an idle
    /// machine and in 3 to 5 of 5 on a busy one; with the task it cannot fail that way.
    #[tokio::test]
    async fn a_begin_cut_short_leaves_no_transaction_open_on_the_pool() {
        let Some(pool) = one_connection_pool().await else {
            return;
        };
        let mut cut = 0;
        for micros in (0..1500).step_by(3) {
            if micros % 300 == 0 {
                // Dropped after one poll, whatever the timer does.
                let mut begin = Box::pin(pool.begin());
                if futures_util::FutureExt::now_or_never(begin.as_mut()).is_none() {
                    cut += 1;
                }
            }
            let attempt =
                tokio::time::timeout(std::time::Duration::from_micros(micros), pool.begin()).await;
            match attempt {
                Err(_) => cut += 1,
                Ok(tx) => tx.unwrap().rollback().await.unwrap(),
            }
            assert!(
                !in_open_transaction(&pool).await,
                "a transaction left open after {micros} µs"
            );
        }
        assert!(cut > 0, "no BEGIN was cut short");
        pool.close().await;
    }

    /// A multi-row statement's rows: `VALUES` with a parameter per value on SQLite, one
    /// array per column under `UNNEST` on PostgreSQL (the same text for any number of
    /// rows); the template's constants and repeated values kept in both.
    #[test]
    fn rows_and_lists_are_parameters_on_sqlite_and_arrays_on_postgresql() {
        const ROWS: Rows = Rows::with_template(&[Ty::Int, Ty::Text], "{0}, 1, {1}, {0}");
        let mut lite = rusqlite::Connection::open_in_memory().unwrap();
        assert_eq!(
            ROWS.sql(&Db::Lite(&mut lite), 2),
            "VALUES ($1, 1, $2, $1), ($3, 1, $4, $3)"
        );
        assert_eq!(
            Rows::of(&[Ty::Int, Ty::Blob]).sql(&Db::Lite(&mut lite), 1),
            "VALUES ($1, $2)"
        );
        assert_eq!(
            List(Ty::Text).sql(&Db::Lite(&mut lite), 2, 3),
            "IN ($2, $3, $4)"
        );
        // Only `{i}` of a value `i` is a value; other braces stay as written.
        const ODD: Rows = Rows::with_template(&[Ty::Int], "'{}', {x}, {1}, {+0}, {00}, {0}{0}, {");
        assert_eq!(
            ODD.sql(&Db::Lite(&mut lite), 2),
            "VALUES ('{}', {x}, {1}, {+0}, {00}, $1$1, {), ('{}', {x}, {1}, {+0}, {00}, $2$2, {)"
        );
    }

    /// On PostgreSQL a large batch's rows go in as arrays, NULLs and all, a small one's as
    /// `VALUES`, and both come back as bound; a list likewise (`= ANY` of one array, or
    /// `IN`). A value of the wrong type, or values that do not make whole rows, are
    /// refused. Runs on the PostgreSQL pass of `scripts/test` (`ERN_TEST_DATABASE_URL`).
    #[tokio::test]
    async fn postgresql_rows_and_lists_go_in_as_arrays_when_large() {
        let Ok(url) = std::env::var("ERN_TEST_DATABASE_URL") else {
            return;
        };
        if url.is_empty() {
            return;
        }
        const ROWS: Rows = Rows::with_template(&[Ty::Int, Ty::Text, Ty::Blob], "{0}, 7, {1}, {2}");
        const TEXTS: List = List(Ty::Text);
        let mut conn = PgConnection::connect(&url).await.unwrap();
        let mut db = Db::Pg(&mut conn);
        db.execute_raw(
            "CREATE TEMPORARY TABLE rows_t (a BIGINT, k BIGINT NOT NULL, b TEXT, c BYTEA)",
        )
        .await
        .unwrap();
        assert!(
            ROWS.sql(&db, 3)
                .starts_with("VALUES ($1, 7, $2, $3), ($4, 7")
        );
        assert!(
            ROWS.sql(&db, 9)
                .starts_with("SELECT u.v0, 7, u.v1, u.v2 FROM UNNEST($1::bigint[]")
        );
        assert_eq!(
            ROWS.sql(&db, 9),
            ROWS.sql(&db, 256),
            "one text for any large batch"
        );
        assert!(ROWS.keeps(&db, 256), "a large batch is one text, kept");
        assert_eq!(ROWS.keeps(&db, 3), db.keeps(3));
        assert_eq!(TEXTS.sql(&db, 2, 3), "IN ($2, $3, $4)");
        assert_eq!(TEXTS.sql(&db, 2, 9), "= ANY($2::text[])");
        for n in [3usize, 12] {
            db.execute_raw("DELETE FROM rows_t").await.unwrap();
            let sql = format!(
                "INSERT INTO rows_t (a, k, b, c) {} RETURNING a",
                ROWS.sql(&db, n)
            );
            let mut q = query(&sql);
            let mut expected = Vec::new();
            for i in 0..n as i64 {
                // Every third row all NULLs.
                if i % 3 == 2 {
                    q = q
                        .bind(None::<i64>)
                        .bind(None::<String>)
                        .bind(None::<Vec<u8>>);
                    expected.push((None, 7, None, None));
                } else if i == 0 {
                    q = q.bind(1i64).bind("t0").bind(Vec::<u8>::new());
                    expected.push((Some(1), 7, Some("t0".to_string()), Some(vec![])));
                } else {
                    q = q
                        .bind(10 + i)
                        .bind(format!("t{i}"))
                        .bind(vec![i as u8, 255]);
                    expected.push((
                        Some(10 + i),
                        7,
                        Some(format!("t{i}")),
                        Some(vec![i as u8, 255]),
                    ));
                }
            }
            let inserted = q
                .rows(&db, &ROWS)
                .unwrap()
                .fetch_all(&mut db)
                .await
                .unwrap();
            assert_eq!(inserted.len(), n);
            type Read = (Option<i64>, i64, Option<String>, Option<Vec<u8>>);
            let mut read: Vec<Read> = query("SELECT a, k, b, c FROM rows_t")
                .fetch_all(&mut db)
                .await
                .unwrap()
                .iter()
                .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
                .collect();
            read.sort();
            expected.sort();
            assert_eq!(read, expected, "{n} rows");
            // The texts of the rows, as a list.
            let wanted: Vec<String> = (0..n).map(|i| format!("t{i}")).collect();
            let sql_list = format!(
                "SELECT COUNT(*) FROM rows_t WHERE k = $1 AND b {}",
                TEXTS.sql(&db, 2, wanted.len())
            );
            let mut q = query(&sql_list).bind(7i64);
            for w in &wanted {
                q = q.bind(w.as_str());
            }
            let found: i64 = q
                .list(&db, 2, &TEXTS)
                .unwrap()
                .fetch_scalar(&mut db)
                .await
                .unwrap();
            assert_eq!(
                found as usize,
                expected.iter().filter(|e| e.2.is_some()).count()
            );
        }
        let sql = format!("INSERT INTO rows_t (a, k, b, c) {}", ROWS.sql(&db, 9));
        let mut wrong = query(&sql);
        for _ in 0..9 {
            wrong = wrong.bind("not a number").bind("x").bind(vec![0u8]);
        }
        assert!(wrong.rows(&db, &ROWS).is_err());
        let partial = query(&sql).bind(1i64).bind("x");
        assert!(partial.rows(&db, &ROWS).is_err());
        let mut wrong_list = query("SELECT $1").bind(1i64);
        for i in 0..9i64 {
            wrong_list = wrong_list.bind(i);
        }
        assert!(wrong_list.list(&db, 2, &TEXTS).is_err());
    }

    /// A database file in `dir` through sqlx's SQLite driver and through rusqlite, and the
    /// PostgreSQL test database when `ERN_TEST_DATABASE_URL` is set (the second pass of
    /// `scripts/test`).
    async fn every_connection(
        dir: &tempfile::TempDir,
    ) -> (SqliteConnection, rusqlite::Connection, Option<PgConnection>) {
        let path = dir.path().join("db.sqlite");
        let url = format!("sqlite://{}?mode=rwc", path.display());
        let pooled = SqliteConnection::connect(&url).await.unwrap();
        let lite = rusqlite::Connection::open(&path).unwrap();
        let pg = match std::env::var("ERN_TEST_DATABASE_URL") {
            Ok(url) if !url.is_empty() => Some(PgConnection::connect(&url).await.unwrap()),
            _ => None,
        };
        (pooled, lite, pg)
    }

    /// Instants and flags go in and come back alike on all three connections: an instant to
    /// the millisecond, rounded down (as a comparison with a bound instant sees it too),
    /// NULLs, before 1970; kept as integer milliseconds (not seconds, as sqlx's own SQLite
    /// decoding would read them) and 0/1 on SQLite, as TIMESTAMPTZ and BOOLEAN on
    /// PostgreSQL, in single rows and, on PostgreSQL, in arrays. PostgreSQL is tested when
    /// `ERN_TEST_DATABASE_URL` is set (the second pass of `scripts/test`).
    #[tokio::test]
    async fn instants_and_flags_read_back_alike_on_every_connection() {
        let dir = tempfile::tempdir().unwrap();
        let (mut pooled, mut lite, mut pg) = every_connection(&dir).await;
        Db::Sqlite(&mut pooled)
            .execute_raw("CREATE TABLE times (id INTEGER, at INTEGER, until INTEGER, flag INTEGER)")
            .await
            .unwrap();
        if let Some(pg) = pg.as_mut() {
            Db::Pg(pg)
                .execute_raw(
                    "CREATE TEMPORARY TABLE times \
                     (id BIGINT, at TIMESTAMPTZ, until TIMESTAMPTZ, flag BOOLEAN)",
                )
                .await
                .unwrap();
        }
        let exact = DateTime::from_timestamp_millis(1_709_287_200_123).unwrap();
        let at = exact + chrono::TimeDelta::nanoseconds(999_999);
        let before_1970 = DateTime::from_timestamp_millis(-1).unwrap();
        const ROWS: Rows = Rows::of(&[Ty::Int, Ty::Time, Ty::Time, Ty::Bool]);
        let mut dbs = vec![Db::Sqlite(&mut pooled), Db::Lite(&mut lite)];
        if let Some(pg) = pg.as_mut() {
            dbs.push(Db::Pg(pg));
        }
        for db in &mut dbs {
            db.execute_raw("DELETE FROM times").await.unwrap();
            for n in [2usize, 12] {
                let sql = format!(
                    "INSERT INTO times (id, at, until, flag) {}",
                    ROWS.sql(db, n)
                );
                let mut q = query(&sql);
                for i in 0..n as i64 {
                    let id = 100 * n as i64 + i;
                    q = match i % 2 {
                        0 => q.bind(id).bind(at).bind(None::<DateTime<Utc>>).bind(true),
                        _ => q.bind(id).bind(before_1970).bind(Some(exact)).bind(false),
                    };
                }
                q.rows(db, &ROWS).unwrap().execute(&mut *db).await.unwrap();
            }
            let rows = query("SELECT at, until, flag, id FROM times ORDER BY id")
                .fetch_all(&mut *db)
                .await
                .unwrap();
            assert_eq!(rows.len(), 14);
            for row in &rows {
                let even = row.get::<i64>(3) % 2 == 0;
                let (want_at, want_until) = if even {
                    (exact, None)
                } else {
                    (before_1970, Some(exact))
                };
                assert_eq!(row.get::<DateTime<Utc>>(0), want_at);
                assert_eq!(row.get::<Option<DateTime<Utc>>>(1), want_until);
                assert_eq!(row.get::<bool>(2), even);
            }
            // A bound instant is rounded down too: `at` equals the instant `at` was bound
            // from, nanoseconds and all.
            let same: i64 = query("SELECT COUNT(*) FROM times WHERE at = $1 AND flag = $2")
                .bind(at)
                .bind(true)
                .fetch_scalar(&mut *db)
                .await
                .unwrap();
            assert_eq!(same, 7);
        }
        // SQLite keeps milliseconds and 0/1.
        let raw: Vec<i64> = query("SELECT at FROM times WHERE flag = 1 ORDER BY id LIMIT 1")
            .fetch_all(&mut Db::Lite(&mut lite))
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(raw, [1_709_287_200_123]);
    }

    /// A column read by name gives what it gives by number, on all three connections: a
    /// plain column, a qualified one (`t.col` is `col`), an alias of an expression, NULLs,
    /// instants and flags, the rows of a join and of `RETURNING`. A name no column has is
    /// an error, and so is one two columns have. PostgreSQL is tested when
    /// `ERN_TEST_DATABASE_URL` is set (the second pass of `scripts/test`).
    #[tokio::test]
    async fn columns_read_by_name_as_by_number_on_every_connection() {
        let dir = tempfile::tempdir().unwrap();
        let (mut pooled, mut lite, mut pg) = every_connection(&dir).await;
        Db::Sqlite(&mut pooled)
            .execute_raw(
                "CREATE TABLE named (id INTEGER PRIMARY KEY, label TEXT, at INTEGER, \
                 flag INTEGER, other INTEGER); \
                 CREATE TABLE others (id INTEGER PRIMARY KEY, label TEXT)",
            )
            .await
            .unwrap();
        if let Some(pg) = pg.as_mut() {
            Db::Pg(pg)
                .execute_raw(
                    "CREATE TEMPORARY TABLE named (id BIGINT PRIMARY KEY, label TEXT, \
                     at TIMESTAMPTZ, flag BOOLEAN, other BIGINT); \
                     CREATE TEMPORARY TABLE others (id BIGINT PRIMARY KEY, label TEXT)",
                )
                .await
                .unwrap();
        }
        let at = DateTime::from_timestamp_millis(1_709_287_200_123).unwrap();
        let mut dbs = vec![Db::Sqlite(&mut pooled), Db::Lite(&mut lite)];
        if let Some(pg) = pg.as_mut() {
            dbs.push(Db::Pg(pg));
        }
        for db in &mut dbs {
            db.execute_raw("DELETE FROM named; DELETE FROM others")
                .await
                .unwrap();
            let returned = query(
                "INSERT INTO named (id, label, at, flag, other) \
                 VALUES (1, 'one', $1, $2, 10), (2, NULL, $1, $3, 20) RETURNING id, label",
            )
            .bind(at)
            .bind(true)
            .bind(false)
            .fetch_all(&mut *db)
            .await
            .unwrap();
            let returned: Vec<(i64, Option<String>)> = returned
                .iter()
                .map(|r| (r.get("id"), r.get("label")))
                .collect();
            assert_eq!(returned.len(), 2);
            assert!(returned.contains(&(1, Some("one".to_string()))));
            assert!(returned.contains(&(2, None)));
            query("INSERT INTO others (id, label) VALUES (10, 'ten'), (20, 'twenty')")
                .execute(&mut *db)
                .await
                .unwrap();
            let rows = query(
                "SELECT t.id, t.label, t.at, t.flag, o.label AS other_label, \
                        COUNT(*) OVER () AS n, t.id + 1 AS next_id \
                 FROM named t JOIN others o ON o.id = t.other ORDER BY t.id",
            )
            .fetch_all(&mut *db)
            .await
            .unwrap();
            assert_eq!(rows.len(), 2);
            for row in &rows {
                assert_eq!(row.get::<i64>("id"), row.get::<i64>(0));
                assert_eq!(
                    row.get::<Option<String>>("label"),
                    row.get::<Option<String>>(1)
                );
                assert_eq!(row.get::<DateTime<Utc>>("at"), row.get::<DateTime<Utc>>(2));
                assert_eq!(row.get::<bool>("flag"), row.get::<bool>(3));
                assert_eq!(row.get::<String>("other_label"), row.get::<String>(4));
                assert_eq!(row.get::<i64>("n"), row.get::<i64>(5));
                assert_eq!(row.get::<i64>("next_id"), row.get::<i64>(6));
            }
            type Read = (i64, Option<String>, DateTime<Utc>, bool, String, i64, i64);
            let read: Vec<Read> = rows
                .iter()
                .map(|r| {
                    (
                        r.get("id"),
                        r.get("label"),
                        r.get("at"),
                        r.get("flag"),
                        r.get("other_label"),
                        r.get("n"),
                        r.get("next_id"),
                    )
                })
                .collect();
            assert_eq!(
                read,
                [
                    (1, Some("one".into()), at, true, "ten".into(), 2, 2),
                    (2, None, at, false, "twenty".into(), 2, 3),
                ]
            );
            let row = &rows[0];
            let unknown = row.try_get::<i64>("missing").unwrap_err();
            assert!(
                matches!(&unknown, StoreError::Database(sqlx::Error::ColumnNotFound(name)) if name == "missing"),
                "{unknown}"
            );
            // Names compare exactly: `t.id` is `id`, not `t.id`; an alias is as written.
            assert!(row.try_get::<i64>("t.id").is_err());
            assert!(row.try_get::<i64>("NEXT_ID").is_err());
            // A wrong type is an error naming the column as asked for.
            let wrong = row.try_get::<i64>("other_label").unwrap_err();
            assert!(wrong.to_string().contains("other_label"), "{wrong}");
            // Two columns of one name: reading that name is an error.
            let twice = query(
                "SELECT t.label, o.label FROM named t JOIN others o ON o.id = t.other \
                 WHERE t.id = 1",
            )
            .fetch_one(&mut *db)
            .await
            .unwrap();
            let ambiguous = twice.try_get::<String>("label").unwrap_err();
            assert!(ambiguous.to_string().contains("label"), "{ambiguous}");
            assert_eq!(twice.get::<String>(1), "ten");
        }
    }

    /// `get` of an unknown name panics, naming it.
    #[test]
    #[should_panic(expected = "column missing")]
    fn getting_an_unknown_name_panics_with_the_name() {
        let mut lite = rusqlite::Connection::open_in_memory().unwrap();
        let row = futures_util::FutureExt::now_or_never(
            query("SELECT 1 AS one").fetch_one(&mut Db::Lite(&mut lite)),
        )
        .expect("runs at once")
        .unwrap();
        assert_eq!(row.get::<i64>("one"), 1);
        row.get::<i64>("missing");
    }

    /// A parameter with no value bound is an error, not a NULL.
    #[tokio::test]
    async fn a_missing_parameter_is_an_error() {
        let mut lite = rusqlite::Connection::open_in_memory().unwrap();
        let err = query("SELECT $1, $2")
            .bind(1i64)
            .fetch_all(&mut Db::Lite(&mut lite))
            .await
            .err()
            .expect("refused");
        assert!(err.to_string().contains("$2"), "{err}");
    }
}
