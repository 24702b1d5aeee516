//! SQL of the audit log: appending to the chain inside a caller's transaction, listing
//! with filters, and streaming the chain for verification.

use sqlx::{AnyConnection, Row};
use tokio_stream::StreamExt;

use super::{Result, Store, StoreError};
use crate::audit::{AuditKey, Broken, Entry, Stored, Verifier, bounded};

/// Entries per INSERT statement (11 parameters each: well inside both databases' limits).
const INSERT_CHUNK: usize = 256;

/// Appends `entries` (each with its time, in milliseconds) to the chain, in order, inside
/// the caller's transaction. Takes the head row's lock first, so concurrent transactions
/// append one after the other and the numbering follows commit order.
pub async fn append(
    conn: &mut AnyConnection,
    key: &AuditKey,
    entries: &[(i64, Entry)],
) -> Result<()> {
    if entries.is_empty() {
        return Ok(());
    }
    let head = sqlx::query("UPDATE audit_head SET seq = seq + $1 WHERE id = 1 RETURNING seq, mac")
        .bind(entries.len() as i64)
        .fetch_one(&mut *conn)
        .await?;
    let last: i64 = head.try_get(0)?;
    let mut previous: String = head.try_get(1)?;
    let mut seq = last - entries.len() as i64;
    let mut rows = Vec::with_capacity(entries.len());
    for (at, entry) in entries {
        seq += 1;
        let entry = Entry {
            principal: bounded(&entry.principal),
            role: bounded(&entry.role),
            centre: bounded(&entry.centre),
            method: bounded(&entry.method),
            registry: bounded(&entry.registry),
            outcome: bounded(&entry.outcome),
            ..entry.clone()
        };
        let mac = key.mac(&previous, seq, *at, &entry);
        previous = mac.clone();
        rows.push(Stored {
            seq,
            at: *at,
            entry,
            mac,
        });
    }
    // Multi-row inserts: one statement per chunk, not per entry.
    for chunk in rows.chunks(INSERT_CHUNK) {
        let values: Vec<String> = (0..chunk.len())
            .map(|i| {
                let p: Vec<String> = (1..=11).map(|j| format!("${}", i * 11 + j)).collect();
                format!("({})", p.join(", "))
            })
            .collect();
        let sql = format!(
            "INSERT INTO audit_log (seq, at, principal_id, principal, role, centre, method, \
                                    registry, outcome, items, mac) VALUES {}",
            values.join(", ")
        );
        let mut query = sqlx::query(&sql);
        for r in chunk {
            query = query
                .bind(r.seq)
                .bind(r.at)
                .bind(r.entry.principal_id)
                .bind(r.entry.principal.as_str())
                .bind(r.entry.role.as_str())
                .bind(r.entry.centre.as_str())
                .bind(r.entry.method.as_str())
                .bind(r.entry.registry.as_str())
                .bind(r.entry.outcome.as_str())
                .bind(r.entry.items)
                .bind(r.mac.as_str());
        }
        query.execute(&mut *conn).await?;
    }
    sqlx::query("UPDATE audit_head SET mac = $1 WHERE id = 1")
        .bind(previous)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Filters of an audit listing; empty means any.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    pub principal: String,
    pub method: String,
    pub registry: String,
    pub outcome: String,
    /// Milliseconds, inclusive; 0 = open.
    pub since: i64,
    pub until: i64,
    /// Entries after this sequence number (paging).
    pub after_seq: i64,
    pub limit: i64,
}

fn stored_from(row: &sqlx::any::AnyRow) -> Result<Stored, sqlx::Error> {
    Ok(Stored {
        seq: row.try_get(0)?,
        at: row.try_get(1)?,
        entry: Entry {
            principal_id: row.try_get(2)?,
            principal: row.try_get(3)?,
            role: row.try_get(4)?,
            centre: row.try_get(5)?,
            method: row.try_get(6)?,
            registry: row.try_get(7)?,
            outcome: row.try_get(8)?,
            items: row.try_get(9)?,
        },
        mac: row.try_get(10)?,
    })
}

const COLUMNS: &str =
    "seq, at, principal_id, principal, role, centre, method, registry, outcome, items, mac";

/// The outcome of walking the whole chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub entries: u64,
    pub head_seq: i64,
    pub head_mac: String,
}

impl Store {
    /// Audit entries matching `filter`, oldest first, at most `filter.limit`.
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
        if filter.since > 0 {
            n += 1;
            conditions.push(format!("at >= ${n}"));
            times.push(filter.since);
        }
        if filter.until > 0 {
            n += 1;
            conditions.push(format!("at <= ${n}"));
            times.push(filter.until);
        }
        let sql = format!(
            "SELECT {COLUMNS} FROM audit_log WHERE {} ORDER BY seq LIMIT {}",
            conditions.join(" AND "),
            filter.limit.clamp(1, 1000)
        );
        let mut query = sqlx::query(&sql).bind(filter.after_seq);
        for t in texts {
            query = query.bind(t);
        }
        for t in times {
            query = query.bind(t);
        }
        let rows = query.fetch_all(self.pool()).await?;
        rows.iter()
            .map(|r| stored_from(r).map_err(StoreError::from))
            .collect()
    }

    /// Walks the whole chain in sequence order (streamed: memory stays flat), then checks
    /// its end against the head. `Ok(Err(_))` names the first broken entry.
    pub async fn verify_audit(
        &self,
        key: &AuditKey,
    ) -> Result<std::result::Result<Verified, Broken>> {
        let mut conn = self.pool().acquire().await?;
        let head = sqlx::query("SELECT seq, mac FROM audit_head WHERE id = 1")
            .fetch_one(&mut *conn)
            .await?;
        let (head_seq, head_mac): (i64, String) = (head.try_get(0)?, head.try_get(1)?);
        let sql = format!("SELECT {COLUMNS} FROM audit_log WHERE seq <= $1 ORDER BY seq");
        let mut rows = sqlx::query(&sql).bind(head_seq).fetch(&mut *conn);
        let mut verifier = Verifier::new(key);
        while let Some(row) = rows.next().await {
            let stored = stored_from(&row?)?;
            if let Err(broken) = verifier.check(&stored) {
                return Ok(Err(broken));
            }
        }
        drop(rows);
        if let Err(broken) = verifier.finish(head_seq, &head_mac) {
            return Ok(Err(broken));
        }
        Ok(Ok(Verified {
            entries: verifier.checked,
            head_seq,
            head_mac: verifier.head_mac().to_string(),
        }))
    }
}
