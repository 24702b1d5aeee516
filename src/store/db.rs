//! The connection the write path runs its statements on: a pooled sqlx connection (any
//! reader, and the writer on PostgreSQL), or the SQLite writer's own rusqlite connection
//! on its own thread (`super::writer`), where a statement is a direct call into the
//! engine with no hand-off between threads.
//!
//! The repositories of the write path (`cases`, `consent`, `consent_model`, `audit`,
//! `research_index`) are written once against [`Db`], with the same SQL for both: numbered
//! parameters (`$1`), bound here by their number on either driver. Values are the ones the
//! schema stores on both databases: integers (times in milliseconds, flags 0/1), text,
//! blobs. On [`Db::Lite`] every future completes at its first poll: the statements run
//! synchronously on the writer's thread.

use rusqlite::types::{Value, ValueRef};
use sqlx::any::AnyRow;
use sqlx::{Any, AnyConnection, Executor, Row as _};

use super::{Result, StoreError};

/// A connection, or a transaction on one.
pub enum Db<'c> {
    Any(&'c mut AnyConnection),
    Lite(&'c mut rusqlite::Connection),
}

impl<'c> Db<'c> {
    /// Runs `sql`, which may hold several statements and takes no parameters.
    pub async fn execute_raw(&mut self, sql: &str) -> Result<()> {
        match self {
            Db::Any(conn) => {
                conn.execute(sql).await?;
            }
            Db::Lite(conn) => conn.execute_batch(sql)?,
        }
        Ok(())
    }

    /// The chunks a multi-row statement over `items` is cut into, one statement each.
    ///
    /// Through sqlx (`Any`), up to `max` rows each: every statement is a round trip, so
    /// few and large; their text varies with the row count, so only small ones are kept
    /// prepared ([`Db::keeps`], `super::cacheable`). On the SQLite writer's own connection
    /// a statement is a direct call, and what costs is preparing one: chunks are powers of
    /// two up to [`LITE_MAX_ROWS`], seven shapes per statement, each prepared once and
    /// kept, so a batch parses nothing.
    pub fn chunks<'a, T>(&self, items: &'a [T], max: usize) -> Vec<&'a [T]> {
        match self {
            Db::Any(_) => items.chunks(max.max(1)).collect(),
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
            Db::Any(_) => super::cacheable(rows),
            Db::Lite(_) => rows <= LITE_MAX_ROWS,
        }
    }

    /// A shorter-lived handle on the same connection.
    pub fn reborrow(&mut self) -> Db<'_> {
        match self {
            Db::Any(conn) => Db::Any(conn),
            Db::Lite(conn) => Db::Lite(conn),
        }
    }
}

impl<'c> From<&'c mut AnyConnection> for Db<'c> {
    fn from(conn: &'c mut AnyConnection) -> Self {
        Db::Any(conn)
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
}

/// A statement, prepared once per connection and kept (see [`Query::persistent`]).
pub fn query(sql: &str) -> Query<'_> {
    Query {
        sql,
        args: Vec::new(),
        persistent: true,
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

impl<'q> Query<'q> {
    /// Binds the next numbered parameter.
    pub fn bind(mut self, value: impl IntoArg) -> Self {
        self.args.push(value.into_arg());
        self
    }

    /// Whether the prepared statement is kept in the connection's cache (see
    /// `super::cacheable`).
    pub fn persistent(mut self, keep: bool) -> Self {
        self.persistent = keep;
        self
    }

    fn sqlx(&self) -> sqlx::query::Query<'q, Any, sqlx::any::AnyArguments<'q>> {
        let mut q = sqlx::query(self.sql).persistent(self.persistent);
        for arg in &self.args {
            q = match arg.clone() {
                Arg::Int(v) => q.bind(v),
                Arg::Text(v) => q.bind(v),
                Arg::Blob(v) => q.bind(v),
                Arg::Bool(v) => q.bind(v),
            };
        }
        q
    }

    pub async fn execute(self, db: &mut Db<'_>) -> Result<Done> {
        match db {
            Db::Any(conn) => {
                let done = self.sqlx().execute(&mut **conn).await?;
                Ok(Done {
                    rows_affected: done.rows_affected(),
                })
            }
            Db::Lite(conn) => {
                let (_, rows_affected) = self.run_lite(conn, false)?;
                Ok(Done { rows_affected })
            }
        }
    }

    pub async fn fetch_all(self, db: &mut Db<'_>) -> Result<Vec<Row>> {
        match db {
            Db::Any(conn) => Ok(self
                .sqlx()
                .fetch_all(&mut **conn)
                .await?
                .into_iter()
                .map(Row::Any)
                .collect()),
            Db::Lite(conn) => Ok(self.run_lite(conn, true)?.0),
        }
    }

    pub async fn fetch_optional(self, db: &mut Db<'_>) -> Result<Option<Row>> {
        Ok(self.fetch_all(db).await?.into_iter().next())
    }

    pub async fn fetch_one(self, db: &mut Db<'_>) -> Result<Row> {
        self.fetch_optional(db)
            .await?
            .ok_or(StoreError::Database(sqlx::Error::RowNotFound))
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
        }
    }
    let columns = stmt.column_count();
    let mut out = Vec::new();
    let mut cursor = stmt.raw_query();
    while let Some(row) = cursor.next()? {
        if rows {
            let mut values = Vec::with_capacity(columns);
            for c in 0..columns {
                values.push(Value::from(row.get_ref(c)?));
            }
            out.push(Row::Lite(values));
        }
    }
    drop(cursor);
    Ok((out, conn.changes()))
}

/// A result row of either driver.
pub enum Row {
    Any(AnyRow),
    Lite(Vec<Value>),
}

impl Row {
    /// Column `index` as a `T`.
    pub fn try_get<T: Decode>(&self, index: usize) -> Result<T> {
        match self {
            Row::Any(row) => Ok(row.try_get::<T, _>(index)?),
            Row::Lite(values) => {
                let value = values.get(index).ok_or_else(|| {
                    StoreError::Database(sqlx::Error::ColumnIndexOutOfBounds {
                        index,
                        len: values.len(),
                    })
                })?;
                T::from_lite(value.into()).map_err(|expected| {
                    StoreError::Database(sqlx::Error::ColumnDecode {
                        index: index.to_string(),
                        source: format!("expected {expected}").into(),
                    })
                })
            }
        }
    }
}

/// A column type readable from both drivers. Flags are read as integers (0/1): sqlx's
/// `Any` driver does not read an integer column as a `bool`.
pub trait Decode: Sized + for<'r> sqlx::Decode<'r, Any> + sqlx::Type<Any> {
    /// The value of an engine column, or what was expected instead.
    fn from_lite(value: ValueRef<'_>) -> std::result::Result<Self, &'static str>;
}

impl Decode for i64 {
    fn from_lite(value: ValueRef<'_>) -> std::result::Result<Self, &'static str> {
        value.as_i64().map_err(|_| "an integer")
    }
}

impl Decode for String {
    fn from_lite(value: ValueRef<'_>) -> std::result::Result<Self, &'static str> {
        value.as_str().map(str::to_owned).map_err(|_| "UTF-8 text")
    }
}

impl Decode for Vec<u8> {
    fn from_lite(value: ValueRef<'_>) -> std::result::Result<Self, &'static str> {
        value.as_blob().map(<[u8]>::to_vec).map_err(|_| "a blob")
    }
}

impl<T: Decode> Decode for Option<T> {
    fn from_lite(value: ValueRef<'_>) -> std::result::Result<Self, &'static str> {
        match value {
            ValueRef::Null => Ok(None),
            other => T::from_lite(other).map(Some),
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
        sqlx::any::install_default_drivers();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        let url = format!("sqlite://{}?mode=rwc", path.display());
        let mut any = AnyConnection::connect(&url).await.unwrap();
        sqlx::query(
            "CREATE TABLE t (id INTEGER PRIMARY KEY, a TEXT NOT NULL, b INTEGER, \
             flag INTEGER NOT NULL, data BLOB)",
        )
        .execute(&mut any)
        .await
        .unwrap();
        let mut lite = rusqlite::Connection::open(&path).unwrap();
        let mut answers = Vec::new();
        for (round, db) in [Db::Any(&mut any), Db::Lite(&mut lite)]
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
            .fetch_all(db)
            .await
            .unwrap();
            let ids: Vec<(i64, String)> = inserted
                .iter()
                .map(|r| (r.try_get::<i64>(0).unwrap() - base, r.try_get(1).unwrap()))
                .collect();
            let done = query("UPDATE t SET b = $1 WHERE id > $2 AND id <= $2 + 2")
                .bind(7i64)
                .bind(base)
                .execute(db)
                .await
                .unwrap();
            let row = query("SELECT a, b, flag, data FROM t WHERE id = $1")
                .bind(base + 1)
                .fetch_one(db)
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
                .fetch_optional(db)
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
