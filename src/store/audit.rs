//! SQL of the audit log: appending to the chain inside a caller's transaction (tagging the
//! consent events and erasure tombstones the entries' writes inserted), listing with
//! filters, and verifying the whole log with the rows it covers.
//!
//! Verification reads in one transaction (a snapshot: REPEATABLE READ on PostgreSQL, one
//! read transaction on SQLite), so a server writing meanwhile cannot make rows and
//! entries disagree; it pages through the chain by sequence number, and for each page
//! reads the rows that name its entries (`audit_seq`, indexed), so memory stays flat
//! however long the log. Last, it checks that every row found by a patient's number
//! (migration 0019) carries the number of its own pseudonym: a scan of those tables.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use tokio_stream::StreamExt;

use super::db::{self, Db};
use super::{Backend, Result, Store, StoreError};
use crate::audit::{
    ADOPTION_METHOD, AdoptionDigest, Anchor, AuditKey, Broken, CoveredRow, Covers, Entry, Head,
    RowCheck, Stored, Table, VERSION, Value, Verifier, bounded, row_hash,
};

/// The `audit_seq` of a consent event or tombstone from its insert until its entry tags it,
/// in the same transaction ([`tag_rows`]; never committed: the verifier finds any row
/// whose number is past the chain's head). The largest number rather than NULL: the
/// index `(audit_seq, id)` then takes the row at its end, where its entry's number puts it
/// a moment later, so the tag moves it within one page instead of from the NULLs at the
/// index's start to its end (two pages written per commit; measured on SQLite, 2026-12-07).
/// Every insert binds it (the column has no default): a row inserted without it (NULL)
/// would not be tagged, and its batch would fail with `tag_rows`' error, loudly.
pub(in crate::store) const UNTAGGED: i64 = i64::MAX;

/// Entries per INSERT statement (14 parameters each: well inside both databases' limits).
const INSERT_CHUNK: usize = 256;
/// Rows tagged with their entry per UPDATE statement.
const TAG_CHUNK: usize = 500;
/// Entries verified per page.
const PAGE: i64 = 1000;

/// The rows a command inserted, for its audit entry to cover.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Wrote {
    /// Ids of the consent events inserted.
    pub consent_events: Vec<i64>,
    /// Ids of the erasure tombstones inserted.
    pub erasures: Vec<i64>,
}

impl Wrote {
    fn ids(&self, table: Table) -> &[i64] {
        match table {
            Table::ConsentEvents => &self.consent_events,
            Table::Erasures => &self.erasures,
        }
    }
}

/// An entry to append: its time (milliseconds), the entry, and the rows its write inserted.
#[derive(Debug, Clone)]
pub struct Pending {
    pub at: i64,
    pub entry: Entry,
    pub wrote: Wrote,
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Int,
    Text,
    /// An instant, hashed as its integer milliseconds since the Unix epoch (the value the
    /// column held when the rows were first audited, on both databases).
    Time,
    OptTime,
}

/// The columns of a covered row, in the order they are hashed (the id first).
fn columns(table: Table) -> &'static [(&'static str, Kind)] {
    use Kind::*;
    match table {
        Table::ConsentEvents => &[
            ("id", Int),
            ("registry_id", Int),
            ("pseudonym", Text),
            ("scope", Text),
            ("state", Text),
            ("given_at", Time),
            ("form_version", Text),
            ("expires_at", OptTime),
            ("recorded_by", Int),
            ("recorded_at", Time),
            ("source", Text),
        ],
        Table::Erasures => &[
            ("id", Int),
            ("receipt_id", Text),
            ("registry_id", Int),
            ("pseudonym", Text),
            ("erased_at", Time),
            ("erased_by", Int),
            ("reason", Text),
            ("cases_erased", Int),
            ("versions_erased", Int),
            ("consent_event_id", Int),
        ],
    }
}

fn column_list(table: Table) -> String {
    columns(table)
        .iter()
        .map(|(name, _)| *name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Decodes a covered row (its columns by name, as [`column_list`] selects them) and
/// hashes it: (id, hash). Strict: a value of another type than the column's is an
/// error naming the column (and the id, when that much is readable).
/// A covered row's value that is not of its column's type: the row's id (if readable) and
/// the column.
type Unreadable = (Option<i64>, &'static str);

fn hash_row(table: Table, row: &db::Row) -> std::result::Result<(i64, [u8; 32]), Unreadable> {
    enum Owned {
        Int(i64),
        Null,
        Text(String),
    }
    // An instant as the hash covers it: whole milliseconds, as the store writes every
    // instant on both databases. PostgreSQL keeps microseconds, and its SQL orders by
    // them (which decision of the same day is in force): a stored instant with a part
    // of a millisecond was written by someone else, so it is hashed as what it is, and
    // the row fails its hash (a defences audit of 2026-12-07 moved a grant 500 us past
    // a refusal of the same instant, putting the grant in force, and the row had hashed
    // as before).
    let instant = |t: DateTime<Utc>| {
        if t.timestamp_subsec_nanos().is_multiple_of(1_000_000) {
            Owned::Int(t.timestamp_millis())
        } else {
            Owned::Text(t.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true))
        }
    };
    let mut id = None;
    let mut values = Vec::with_capacity(columns(table).len());
    for (i, &(name, kind)) in columns(table).iter().enumerate() {
        let value = match kind {
            Kind::Int => row.try_get::<i64>(name).map(Owned::Int),
            Kind::Text => row.try_get::<String>(name).map(Owned::Text),
            Kind::Time => row.try_get::<DateTime<Utc>>(name).map(instant),
            Kind::OptTime => row
                .try_get::<Option<DateTime<Utc>>>(name)
                .map(|v| v.map_or(Owned::Null, instant)),
        }
        .map_err(|_| (id, name))?;
        if i == 0
            && let Owned::Int(n) = value
        {
            id = Some(n);
        }
        values.push(value);
    }
    let borrowed: Vec<Value<'_>> = values
        .iter()
        .map(|v| match v {
            Owned::Int(n) => Value::Int(*n),
            Owned::Null => Value::Null,
            Owned::Text(s) => Value::Text(s),
        })
        .collect();
    Ok((id.unwrap_or_default(), row_hash(table, &borrowed)))
}

fn corrupt(table: Table, (id, column): Unreadable) -> StoreError {
    StoreError::Corrupt(format!(
        "{table} {}: its {column} is not readable as stored",
        id.map_or_else(|| "?".to_string(), |id| id.to_string())
    ))
}

/// Appends `pending` to the chain, in order, inside the caller's transaction. Takes the
/// head row's lock first, so concurrent transactions append one after the other and the
/// numbering follows commit order. Each entry covers the consent events and tombstones
/// its write inserted: they are tagged with the entry's number and their hashes go into
/// the MACed entry. The first append after migration 0009 first adopts, in one entry,
/// the rows written before rows were audited.
pub async fn append(
    conn: &mut Db<'_>,
    key: &AuditKey,
    pending: &[Pending],
) -> Result<Option<Head>> {
    if pending.is_empty() {
        return Ok(None);
    }
    let head =
        db::query("UPDATE audit_head SET seq = seq WHERE id = 1 RETURNING seq, mac, rows_adopted")
            .fetch_one(&mut *conn)
            .await?;
    let mut seq: i64 = head.try_get("seq")?;
    let mut previous: String = head.try_get("mac")?;
    let adopted: i64 = head.try_get("rows_adopted")?;
    let mut rows = Vec::with_capacity(pending.len() + 1);
    if adopted == 0
        && let Some(entry) = adopt(conn, seq + 1).await?
    {
        seq += 1;
        let at = pending[0].at;
        let mac = key.mac(&previous, seq, at, &entry);
        previous = mac.clone();
        rows.push(Stored {
            seq,
            at,
            version: VERSION,
            entry,
            mac,
        });
    }
    let mut covered = tag_rows(conn, seq + 1, pending).await?;
    for p in pending {
        seq += 1;
        let entry = Entry {
            principal: bounded(&p.entry.principal),
            role: bounded(&p.entry.role),
            centre: bounded(&p.entry.centre),
            method: bounded(&p.entry.method),
            registry: bounded(&p.entry.registry),
            outcome: bounded(&p.entry.outcome),
            target: bounded(&p.entry.target),
            rows: Covers::format_rows(&covered.remove(&seq).unwrap_or_default()),
            ..p.entry.clone()
        };
        let mac = key.mac(&previous, seq, p.at, &entry);
        previous = mac.clone();
        rows.push(Stored {
            seq,
            at: p.at,
            version: VERSION,
            entry,
            mac,
        });
    }
    // Multi-row inserts: one statement per chunk, not per entry.
    use db::Ty::{Int, Text, Time};
    const ROWS: db::Rows = db::Rows::of(&[
        Int, Time, Int, Int, Text, Text, Text, Text, Text, Text, Int, Text, Text, Text,
    ]);
    let chunks = conn.chunks(&rows, INSERT_CHUNK);
    // On PostgreSQL the last chunk's statement moves the head too, to its last entry (one
    // round trip less per batch: a data-modifying `WITH`, which SQLite does not have).
    let head_with_last = matches!(conn, Db::Pg(_));
    let last = chunks.len() - 1;
    for (k, chunk) in chunks.into_iter().enumerate() {
        let sql = if head_with_last && k == last {
            format!(
                "WITH entries AS (INSERT INTO audit_log ({COLUMNS}) {} RETURNING seq, mac) \
                 UPDATE audit_head SET seq = e.seq, mac = e.mac, rows_adopted = 1 \
                 FROM (SELECT seq, mac FROM entries ORDER BY seq DESC LIMIT 1) AS e \
                 WHERE id = 1",
                ROWS.sql(conn, chunk.len())
            )
        } else {
            format!(
                "INSERT INTO audit_log ({COLUMNS}) {}",
                ROWS.sql(conn, chunk.len())
            )
        };
        let mut query = db::query(&sql).persistent(ROWS.keeps(conn, chunk.len()));
        for r in chunk {
            query = query
                .bind(r.seq)
                .bind(db::instant(r.at)?)
                .bind(r.version)
                .bind(r.entry.principal_id)
                .bind(r.entry.principal.as_str())
                .bind(r.entry.role.as_str())
                .bind(r.entry.centre.as_str())
                .bind(r.entry.method.as_str())
                .bind(r.entry.registry.as_str())
                .bind(r.entry.outcome.as_str())
                .bind(r.entry.items)
                .bind(r.entry.target.as_str())
                .bind(r.entry.rows.as_str())
                .bind(r.mac.as_str());
        }
        let done = query.rows(conn, &ROWS)?.execute(&mut *conn).await?;
        if head_with_last && k == last && done.rows_affected() != 1 {
            return Err(StoreError::Corrupt(
                "the audit chain's head was not moved to its last entry".into(),
            ));
        }
    }
    if !head_with_last {
        db::query("UPDATE audit_head SET seq = $1, mac = $2, rows_adopted = 1 WHERE id = 1")
            .bind(seq)
            .bind(previous.as_str())
            .execute(&mut *conn)
            .await?;
    }
    Ok(Some(Head { seq, mac: previous }))
}

/// Whether the entry `head` names is in the log with that MAC: after a COMMIT whose answer
/// was lost (the connection broke), whether the transaction that appended it landed. No
/// other transaction can write that MAC (it chains every entry before it).
pub async fn holds(conn: &mut Db<'_>, head: &Head) -> Result<bool> {
    let found = db::query("SELECT mac FROM audit_log WHERE seq = $1")
        .bind(head.seq)
        .fetch_optional(&mut *conn)
        .await?;
    Ok(match found {
        Some(row) => row.try_get::<String>("mac")? == head.mac,
        None => false,
    })
}

/// Tags the rows `pending` wrote with their entries' numbers (the first entry is `first`)
/// and returns their hashes per entry. Only rows not yet tagged are taken: a row is
/// covered by exactly one entry.
async fn tag_rows(
    conn: &mut Db<'_>,
    first: i64,
    pending: &[Pending],
) -> Result<BTreeMap<i64, Vec<CoveredRow>>> {
    let mut covered: BTreeMap<i64, Vec<CoveredRow>> = BTreeMap::new();
    for table in Table::ALL {
        let pairs: Vec<(i64, i64)> = pending
            .iter()
            .enumerate()
            .flat_map(|(i, p)| {
                p.wrote
                    .ids(table)
                    .iter()
                    .map(move |&id| (id, first + i as i64))
            })
            .collect();
        // (id, entry) pairs: in a large batch on PostgreSQL two arrays (`db::Rows`), one
        // statement text.
        const PAIRS: db::Rows = db::Rows::of(&[db::Ty::Int, db::Ty::Int]);
        for chunk in conn.chunks(&pairs, TAG_CHUNK) {
            let sql = if conn.arrays_for(chunk.len()) {
                format!(
                    "UPDATE {t} SET audit_seq = u.tag_seq \
                     FROM UNNEST($1::bigint[], $2::bigint[]) AS u(tag_id, tag_seq) \
                     WHERE id = u.tag_id AND audit_seq = {UNTAGGED} RETURNING audit_seq, {columns}",
                    t = table.sql(),
                    columns = column_list(table),
                )
            } else {
                // The pairs as a table of `VALUES` joined on the row's id: one lookup per
                // pair. (A `CASE id WHEN $1 THEN $2 ...` of the whole chunk was tested
                // against every row it updated: quadratic, a third of this statement's
                // time for a chunk of 500.) Every value cast, so that PostgreSQL types them.
                let mut pairs = String::with_capacity(chunk.len() * 48);
                for i in 0..chunk.len() {
                    if i > 0 {
                        pairs.push_str(", ");
                    }
                    let _ = write!(
                        pairs,
                        "(CAST(${} AS BIGINT), CAST(${} AS BIGINT))",
                        2 * i + 1,
                        2 * i + 2
                    );
                }
                format!(
                    "UPDATE {t} SET audit_seq = u.tag_seq \
                     FROM (SELECT column1 AS tag_id, column2 AS tag_seq FROM (VALUES {pairs}) AS v) AS u \
                     WHERE id = u.tag_id AND audit_seq = {UNTAGGED} RETURNING audit_seq, {columns}",
                    t = table.sql(),
                    columns = column_list(table),
                )
            };
            let mut query = db::query(&sql).persistent(PAIRS.keeps(conn, chunk.len()));
            for &(id, seq) in chunk {
                query = query.bind(id).bind(seq);
            }
            let tagged = query.rows(conn, &PAIRS)?.fetch_all(&mut *conn).await?;
            if tagged.len() != chunk.len() {
                return Err(StoreError::Corrupt(format!(
                    "{} of {} {table} rows written in this transaction could be tagged with their audit entry",
                    tagged.len(),
                    chunk.len()
                )));
            }
            for row in &tagged {
                let seq: i64 = row.try_get("audit_seq")?;
                let (id, hash) = hash_row(table, row).map_err(|e| corrupt(table, e))?;
                covered
                    .entry(seq)
                    .or_default()
                    .push(CoveredRow::new(table, id, &hash));
            }
        }
    }
    for rows in covered.values_mut() {
        rows.sort_by_key(|r| (r.table, r.id));
    }
    Ok(covered)
}

/// Tags the rows written before rows were audited (`audit_seq` 0, set by migration 0009)
/// with entry `seq` and returns that entry, covering them all with one digest; `None`
/// when there are none.
async fn adopt(conn: &mut Db<'_>, seq: i64) -> Result<Option<Entry>> {
    let mut digest = AdoptionDigest::default();
    for table in Table::ALL {
        let t = table.sql();
        db::query(&format!(
            "UPDATE {t} SET audit_seq = $1 WHERE audit_seq = 0"
        ))
        .bind(seq)
        .execute(&mut *conn)
        .await?;
        let sql = format!(
            "SELECT {} FROM {t} WHERE audit_seq = $1 ORDER BY id",
            column_list(table)
        );
        for row in db::query(&sql).bind(seq).fetch_all(&mut *conn).await? {
            let (_, hash) = hash_row(table, &row).map_err(|e| corrupt(table, e))?;
            digest.add(table, &hash);
        }
    }
    if digest.rows() == 0 {
        return Ok(None);
    }
    Ok(Some(Entry {
        principal: "ern-registry".into(),
        method: ADOPTION_METHOD.into(),
        outcome: "OK".into(),
        items: digest.rows(),
        rows: digest.finish(),
        ..Entry::default()
    }))
}

/// Filters of an audit listing; empty means any.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    pub principal: String,
    pub method: String,
    pub registry: String,
    pub outcome: String,
    /// Inclusive bounds of the entries' times; `None`: open.
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    /// Entries after this sequence number (paging).
    pub after_seq: i64,
    pub limit: i64,
}

/// An entry of the log as [`COLUMNS`] selects it; `Err` names the column that does not
/// hold a value of its type.
fn stored_from(row: &db::Row) -> std::result::Result<Stored, &'static str> {
    fn get<T: db::Decode>(
        row: &db::Row,
        name: &'static str,
    ) -> std::result::Result<T, &'static str> {
        row.try_get(name).map_err(|_| name)
    }
    Ok(Stored {
        seq: get(row, "seq")?,
        at: get::<DateTime<Utc>>(row, "at")?.timestamp_millis(),
        version: get(row, "version")?,
        entry: Entry {
            principal_id: get(row, "principal_id")?,
            principal: get(row, "principal")?,
            role: get(row, "role")?,
            centre: get(row, "centre")?,
            method: get(row, "method")?,
            registry: get(row, "registry")?,
            outcome: get(row, "outcome")?,
            items: get(row, "items")?,
            target: get(row, "target")?,
            rows: get(row, "row_hashes")?,
        },
        mac: get(row, "mac")?,
    })
}

fn stored_or_corrupt(row: &db::Row) -> Result<Stored> {
    stored_from(row).map_err(|column| {
        let seq = row
            .try_get::<i64>("seq")
            .map_or_else(|_| "?".to_string(), |s| s.to_string());
        StoreError::Corrupt(format!("audit entry {seq}: its {column} is not readable"))
    })
}

const COLUMNS: &str = "seq, at, version, principal_id, principal, role, centre, method, \
                       registry, outcome, items, target, row_hashes, mac";

/// The outcome of verifying the whole log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub entries: u64,
    pub head_seq: i64,
    /// Hex; empty for an empty log.
    pub head_mac: String,
    /// Consent events and tombstones written before rows were audited and not adopted
    /// yet (the next append adopts them); unchecked until then.
    pub unadopted: i64,
}

impl Verified {
    /// The head, to record outside the database (`audit head`).
    pub fn anchor(&self) -> Anchor {
        Anchor {
            seq: self.head_seq,
            mac: if self.head_mac.is_empty() {
                Anchor::GENESIS_MAC.to_string()
            } else {
                self.head_mac.clone()
            },
        }
    }
}

impl Store {
    /// Audit entries matching `filter`, oldest first, at most `filter.limit` (1 to 1,001:
    /// a page of at most 1,000 and one more, to tell whether another follows).
    pub async fn audit_entries(&self, filter: &AuditFilter) -> Result<Vec<Stored>> {
        let mut conditions = vec!["seq > $1".to_string()];
        let mut texts: Vec<&str> = Vec::new();
        for (column, value) in [
            ("principal", &filter.principal),
            ("method", &filter.method),
            ("registry", &filter.registry),
            ("outcome", &filter.outcome),
        ] {
            if !value.is_empty() {
                texts.push(value);
                conditions.push(format!("{column} = ${}", texts.len() + 1));
            }
        }
        let mut n = texts.len() + 1;
        let mut times = Vec::new();
        if let Some(since) = filter.since {
            n += 1;
            conditions.push(format!("at >= ${n}"));
            times.push(since);
        }
        if let Some(until) = filter.until {
            n += 1;
            conditions.push(format!("at <= ${n}"));
            times.push(until);
        }
        let sql = format!(
            "SELECT {COLUMNS} FROM audit_log WHERE {} ORDER BY seq LIMIT {}",
            conditions.join(" AND "),
            filter.limit.clamp(1, 1001)
        );
        let mut query = db::query(&sql).bind(filter.after_seq);
        for t in texts {
            query = query.bind(t);
        }
        for t in times {
            query = query.bind(t);
        }
        let rows = query.fetch_all(self.pool()).await?;
        rows.iter().map(stored_or_corrupt).collect()
    }

    /// Whether the last entry of the chain (the head's) carries the MAC `key` gives it
    /// after the entry before it: one link, however long the log, to recognise the key
    /// the log was last written with. `None` for an empty
    /// log; `Some(false)` also when either entry is missing.
    pub async fn audit_head_verifies(&self, key: &AuditKey) -> Result<Option<bool>> {
        let head = db::query("SELECT seq, mac FROM audit_head WHERE id = 1")
            .fetch_one(self.pool())
            .await?;
        let (head_seq, head_mac): (i64, String) = (head.try_get("seq")?, head.try_get("mac")?);
        if head_seq == 0 {
            return Ok(None);
        }
        let sql =
            format!("SELECT {COLUMNS} FROM audit_log WHERE seq >= $1 AND seq <= $2 ORDER BY seq");
        let rows = db::query(&sql)
            .bind(head_seq - 1)
            .bind(head_seq)
            .fetch_all(self.pool())
            .await?;
        let entries = rows
            .iter()
            .map(stored_or_corrupt)
            .collect::<Result<Vec<_>>>()?;
        let (previous, last) = match &entries[..] {
            [last] if head_seq == 1 && last.seq == 1 => (String::new(), last),
            [previous, last] if last.seq == head_seq => (previous.mac.clone(), last),
            _ => return Ok(Some(false)),
        };
        Ok(Some(last.mac == head_mac && key.verify(&previous, last)))
    }

    /// Verifies the whole log: every entry (not only those up to the head) in sequence
    /// order, the head both ways, every consent event and tombstone against the entry
    /// that wrote it, no such row covered by no entry, and every row found by a patient's
    /// number filed under its own pseudonym's. `Ok(Err(_))` names the first problem found.
    pub async fn verify_audit(
        &self,
        key: &AuditKey,
    ) -> Result<std::result::Result<Verified, Broken>> {
        self.verify_audit_against(key, None).await
    }

    /// [`Store::verify_audit`], and the entry `anchor` names (a head recorded earlier)
    /// must be in the chain with that MAC: a log truncated or rewritten since fails.
    pub async fn verify_audit_against(
        &self,
        key: &AuditKey,
        anchor: Option<Anchor>,
    ) -> Result<std::result::Result<Verified, Broken>> {
        let mut tx = self.pool().begin().await?;
        if self.backend() == Backend::Postgres {
            tx.db()
                .execute_raw("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                .await?;
        }
        let result = verify_in(&mut tx.db(), key, anchor).await;
        tx.rollback().await?;
        result
    }
}

async fn read_head(conn: &mut Db<'_>) -> Result<std::result::Result<Head, Broken>> {
    let Some(row) = db::query("SELECT seq, mac FROM audit_head WHERE id = 1")
        .fetch_optional(&mut *conn)
        .await?
    else {
        return Ok(Err(Broken::HeadUnreadable {
            problem: "missing (its row was deleted)".into(),
        }));
    };
    let unreadable = |column: &str| Broken::HeadUnreadable {
        problem: format!("its {column} is not readable as stored (type changed)"),
    };
    let Ok(seq) = row.try_get::<i64>("seq") else {
        return Ok(Err(unreadable("seq")));
    };
    let Ok(mac) = row.try_get::<String>("mac") else {
        return Ok(Err(unreadable("mac")));
    };
    Ok(Ok(Head { seq, mac }))
}

/// Returns early with `Ok(Err(broken))` from a function returning
/// `Result<Result<_, Broken>>`.
macro_rules! broken {
    ($e:expr) => {
        if let Err(broken) = $e {
            return Ok(Err(broken));
        }
    };
}

async fn verify_in(
    conn: &mut Db<'_>,
    key: &AuditKey,
    anchor: Option<Anchor>,
) -> Result<std::result::Result<Verified, Broken>> {
    let head = match read_head(conn).await? {
        Ok(head) => head,
        Err(broken) => return Ok(Err(broken)),
    };
    let mut verifier = Verifier::new(key).with_anchor(anchor);
    let mut after = i64::MIN;
    let sql = format!("SELECT {COLUMNS} FROM audit_log WHERE seq > $1 ORDER BY seq LIMIT {PAGE}");
    loop {
        let page = db::query(&sql).bind(after).fetch_all(&mut *conn).await?;
        let Some(first) = page.first() else {
            break;
        };
        let first = first.try_get::<i64>("seq")?;
        let mut rows = RowCheck::default();
        for row in &page {
            let stored = match stored_from(row) {
                Ok(stored) => stored,
                Err(column) => {
                    let seq = row.try_get("seq").unwrap_or(verifier.next_seq());
                    return Ok(Err(Broken::Unreadable { seq, column }));
                }
            };
            // The MAC covers whole milliseconds, all the service writes; PostgreSQL keeps
            // microseconds, so a time moved within its millisecond is told here.
            if row
                .try_get::<DateTime<Utc>>("at")
                .is_ok_and(|at| at.timestamp_subsec_nanos() % 1_000_000 != 0)
            {
                return Ok(Err(Broken::PartOfAMillisecond { seq: stored.seq }));
            }
            broken!(verifier.check(&stored));
            broken!(rows.expect(&stored));
            after = stored.seq;
        }
        broken!(check_rows(conn, &mut rows, first, after).await?);
        broken!(rows.finish());
        if (page.len() as i64) < PAGE {
            break;
        }
    }
    broken!(verifier.finish(&head));
    let last = verifier.next_seq() - 1;
    // Rows naming no entry of the chain. Rows of before migration 0009 (0) are allowed
    // only while no entry of this version exists: the first append adopts them.
    let lowest = if verifier.current_seen() { 1 } else { 0 };
    for table in Table::ALL {
        let sql = format!(
            "SELECT id FROM {} WHERE audit_seq IS NULL OR audit_seq < $1 OR audit_seq > $2 \
             OR audit_seq <> CAST(audit_seq AS BIGINT) ORDER BY id LIMIT 1",
            table.sql()
        );
        if let Some(row) = db::query(&sql)
            .bind(lowest)
            .bind(last)
            .fetch_optional(&mut *conn)
            .await?
        {
            let id = row.try_get("id")?;
            return Ok(Err(Broken::RowUncovered { table, id }));
        }
    }
    // Since migration 0019 the history, the decisions in force, the cases and the research
    // rows are found by the patient's number, which no row hash covers (it did not exist
    // when rows were first audited). Every such row's number must be the one
    // `patient_keys` gives its own registry and pseudonym, and every pseudonym must have
    // one number: otherwise a decision could be moved to another patient or hidden, or a
    // record read or counted under another patient's consent, without changing a hash.
    if let Some(row) = db::query(
        "SELECT registry_id, COUNT(*) AS n FROM patient_keys \
         GROUP BY registry_id, pseudonym HAVING COUNT(*) > 1 LIMIT 1",
    )
    .fetch_optional(&mut *conn)
    .await?
    {
        return Ok(Err(Broken::KeyDuplicated {
            registry_id: row.try_get("registry_id")?,
            count: row.try_get("n")?,
        }));
    }
    for (table, row_id, name) in [
        ("consent_events", "id", "consent event"),
        ("cases", "id", "case"),
        (
            "consent_current",
            "event_id",
            "decision in force of consent event",
        ),
        ("patients", "case_id", "research row of case"),
    ] {
        let sql = format!(
            "SELECT t.{row_id} AS row_id FROM {table} t \
             WHERE t.patient IS NULL OR NOT EXISTS (SELECT 1 FROM patient_keys k \
                 WHERE k.id = t.patient AND k.registry_id = t.registry_id \
                   AND k.pseudonym = t.pseudonym) \
             ORDER BY t.{row_id} LIMIT 1"
        );
        if let Some(row) = db::query(&sql).fetch_optional(&mut *conn).await? {
            let id: i64 = row.try_get("row_id")?;
            return Ok(Err(Broken::RowMisfiled {
                row: format!("{name} {id}"),
            }));
        }
    }
    let mut unadopted = 0;
    if lowest == 0 {
        for table in Table::ALL {
            let sql = format!(
                "SELECT COUNT(*) AS n FROM {} WHERE audit_seq = 0",
                table.sql()
            );
            unadopted += db::query(&sql)
                .fetch_one(&mut *conn)
                .await?
                .try_get::<i64>("n")?;
        }
    }
    Ok(Ok(Verified {
        entries: verifier.checked,
        head_seq: head.seq,
        head_mac: verifier.head_mac().to_string(),
        unadopted,
    }))
}

/// Feeds `rows` every consent event and tombstone naming an entry from `first` to `last`,
/// table by table, each in (entry, id) order.
async fn check_rows(
    conn: &mut Db<'_>,
    rows: &mut RowCheck,
    first: i64,
    last: i64,
) -> Result<std::result::Result<(), Broken>> {
    for table in Table::ALL {
        let sql = format!(
            "SELECT audit_seq, {} FROM {} WHERE audit_seq >= $1 AND audit_seq <= $2 \
             ORDER BY audit_seq, id",
            column_list(table),
            table.sql()
        );
        let mut stream = db::query(&sql).bind(first).bind(last).fetch(&mut *conn);
        while let Some(row) = stream.next().await {
            let row = row?;
            let (id, hash) = match hash_row(table, &row) {
                Ok(hashed) => hashed,
                Err((id, column)) => {
                    let id = id.unwrap_or_default();
                    return Ok(Err(Broken::RowUnreadable { table, id, column }));
                }
            };
            let Ok(seq) = row.try_get::<i64>("audit_seq") else {
                return Ok(Err(Broken::RowUnreadable {
                    table,
                    id,
                    column: "audit_seq",
                }));
            };
            broken!(rows.row(table, seq, id, &hash));
        }
    }
    Ok(Ok(()))
}
