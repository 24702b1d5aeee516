//! Code releases in the database: importing one (its files read on a blocking thread by
//! `crate::codes`, written here in multi-row batches as they come, so memory stays
//! bounded whatever the release's size), listing them, putting one in force, and loading
//! the releases in force into a [`CodeCatalog`].
//!
//! An import writes its rows first, a batch per short transaction, under a release row
//! with a placeholder version that is never in force ([`stage`]); the admin transaction
//! that appends the audit entry (`service::admin::run_action`) then gives it its version
//! and puts it in force ([`finish`]), or, refused, it is removed ([`discard`]). So a
//! running server's writes never wait for a whole import, and a release is only ever
//! usable once complete and audited. An import that dies between the two (a crash, a
//! kill) leaves a staged release whose heartbeat (`staged_at`, raised with each batch)
//! stops: [`remove_abandoned`] removes it at the next server start or import.

use super::db::{self, Db};
use chrono::{DateTime, Utc};
use tokio::sync::mpsc;

use super::{Result, Store, StoreError};
use crate::codes::{Header, ImportError, Item, Source};
use crate::domain::{AliasKind, CodeCatalog, CodeSystem, Release, ReleaseInfo};

/// Items sent from the reading thread to the writer at a time.
const BATCH: usize = 2_000;
/// Rows per INSERT statement (5 parameters each at most: well below both databases' limits).
const ROWS_PER_STATEMENT: usize = 200;

enum Message {
    Header(Header),
    Items(Vec<Item>),
}

/// A release whose files are read and whose rows are written, not yet finished: listed
/// with a placeholder version, never in force, until [`finish`] (in the audited admin
/// transaction) gives it its version; [`discard`] removes it.
#[derive(Debug, Clone)]
pub struct Staged {
    pub release_id: i64,
    pub system: CodeSystem,
    pub header: Header,
    pub terms: u64,
    pub parents: u64,
    pub aliases: u64,
    /// How long reading and writing took.
    pub elapsed: std::time::Duration,
}

/// What an import did.
#[derive(Debug, Clone)]
pub struct Imported {
    pub info: ReleaseInfo,
    pub parents: u64,
    pub aliases: u64,
}

/// Reads the release in `source` and writes its rows, a batch per transaction (each
/// short: a running server's writes go on between them), under a new release row that
/// is not in force. On any error what was written is removed again.
pub async fn stage(store: &Store, source: Source, now: DateTime<Utc>) -> Result<Staged> {
    let started = std::time::Instant::now();
    remove_abandoned(store, now).await?;
    let system = source.system();
    let described = source.describe();
    let (tx, mut rx) = mpsc::channel::<Message>(4);
    let reader = tokio::task::spawn_blocking(move || {
        let mut batch: Vec<Item> = Vec::with_capacity(BATCH);
        let closed = || ImportError::File {
            path: Default::default(),
            message: "the import stopped".into(),
        };
        let header = source.read(
            &mut |h| {
                tx.blocking_send(Message::Header(h.clone()))
                    .map_err(|_| closed())
            },
            &mut |item| {
                batch.push(item);
                if batch.len() == BATCH {
                    let full = std::mem::replace(&mut batch, Vec::with_capacity(BATCH));
                    tx.blocking_send(Message::Items(full))
                        .map_err(|_| closed())?;
                }
                Ok(())
            },
        )?;
        if !batch.is_empty() {
            tx.blocking_send(Message::Items(batch))
                .map_err(|_| closed())?;
        }
        Ok::<Header, ImportError>(header)
    });

    let mut release_id: Option<i64> = None;
    let (mut terms, mut parents, mut aliases) = (0u64, 0u64, 0u64);
    let mut failure: Option<StoreError> = None;
    while let Some(message) = rx.recv().await {
        let step = async {
            let mut db = store.pool().begin().await?;
            match message {
                Message::Header(header) => {
                    // A placeholder version until the files are read whole (HGNC states its
                    // date only through its lines): `finish` gives the real one.
                    let id: i64 = db::query(
                        "INSERT INTO code_releases (system, version, released_on, imported_at, \
                                                    source, terms, in_force, staged_at) \
                         VALUES ($1, $2, $3, $4, $5, 0, FALSE, $4) RETURNING id",
                    )
                    .bind(system.as_str())
                    .bind(format!("(importing at {})", now.timestamp_millis()))
                    .bind(header.released_on.as_deref())
                    .bind(now)
                    .bind(described.as_str())
                    .fetch_one(&mut db)
                    .await?
                    .try_get("id")?;
                    release_id = Some(id);
                }
                Message::Items(items) => {
                    let id = release_id
                        .ok_or_else(|| StoreError::Invalid("items before the header".into()))?;
                    let counts = insert_items(&mut db.db(), id, &items).await?;
                    // The heartbeat: this import is alive (`remove_abandoned`).
                    db::query("UPDATE code_releases SET staged_at = $1 WHERE id = $2")
                        .bind(Utc::now())
                        .bind(id)
                        .execute(&mut db)
                        .await?;
                    terms += counts.0;
                    parents += counts.1;
                    aliases += counts.2;
                }
            }
            db.commit().await?;
            Ok::<(), StoreError>(())
        }
        .await;
        if let Err(e) = step {
            failure = Some(e);
            break;
        }
    }
    drop(rx);
    let read = reader
        .await
        .map_err(|e| StoreError::Invalid(format!("the release reader failed: {e}")));
    let outcome = match (failure, read) {
        (Some(e), _) => Err(e),
        (None, Err(e)) => Err(e),
        (None, Ok(Err(e))) => Err(StoreError::Invalid(e.to_string())),
        (None, Ok(Ok(header))) => match release_id {
            Some(release_id) => Ok(Staged {
                release_id,
                system,
                header,
                terms,
                parents,
                aliases,
                elapsed: started.elapsed(),
            }),
            None => Err(StoreError::Invalid("the files hold no release".into())),
        },
    };
    if outcome.is_err()
        && let Some(id) = release_id
    {
        discard(store, id).await?;
    }
    outcome
}

/// How long a staged release may go without a committed batch before it counts as
/// abandoned (its import crashed or was killed). A live import commits a batch every
/// few seconds at most.
pub const ABANDONED_AFTER: std::time::Duration = std::time::Duration::from_secs(10 * 60);

/// Removes the releases whose import stopped without finishing: staged (never finished,
/// never in force) and without a committed batch for [`ABANDONED_AFTER`] before
/// `now`. Returns what was removed ("hpo (importing at …)"), for the log. Run at
/// a server's start and at the start of every import; an import still running in
/// another process keeps its release (its heartbeat is recent).
pub async fn remove_abandoned(store: &Store, now: DateTime<Utc>) -> Result<Vec<String>> {
    let stale_before = now - ABANDONED_AFTER;
    // One statement that decides and deletes: an import that finishes, or commits a batch,
    // after a separate SELECT would otherwise lose its rows. `ON DELETE CASCADE` removes
    // the release's codes, hierarchy and aliases with it.
    let rows = db::query(
        "DELETE FROM code_releases \
         WHERE staged_at IS NOT NULL AND staged_at < $1 AND NOT in_force \
         RETURNING id, system, version",
    )
    .bind(stale_before)
    .fetch_all(store.pool())
    .await?;
    let mut removed = Vec::with_capacity(rows.len());
    for row in rows {
        let id: i64 = row.try_get("id")?;
        let system: String = row.try_get("system")?;
        let version: String = row.try_get("version")?;
        tracing::warn!(
            release_id = id,
            system = %system,
            version = %version,
            "removed a code release whose import stopped without finishing (a crash or a kill)"
        );
        removed.push(format!("{system} {version}"));
    }
    removed.sort();
    Ok(removed)
}

/// Removes a release and its rows if it is still staged: never finished, so never in
/// force. A finished release (its import's commit landed although its answer was lost,
/// say) is left as it is. Returns whether it was removed.
pub async fn discard(store: &Store, release_id: i64) -> Result<bool> {
    // The release row's condition and its removal are one statement, and `ON DELETE
    // CASCADE` takes the codes, hierarchy and aliases with it, in the same transaction: a
    // release that finished is never emptied.
    let done = db::query(
        "DELETE FROM code_releases WHERE id = $1 AND staged_at IS NOT NULL AND NOT in_force",
    )
    .bind(release_id)
    .execute(store.pool())
    .await?;
    Ok(done.rows_affected() > 0)
}

/// Finishes a staged release on `conn` (the audited admin transaction): its version
/// (`version`, or what the files state; ALREADY_EXISTS if the system has it already),
/// date and size, and, with `activate`, puts it in force (the one in force before is
/// kept, no longer in force).
pub async fn finish(
    conn: &mut Db<'_>,
    staged: &Staged,
    version: Option<String>,
    activate: bool,
) -> Result<Imported> {
    let system = staged.system;
    let Some(version) = version.or(staged.header.version.clone()) else {
        return Err(StoreError::Invalid(
            "the files state no version: name one with --version".into(),
        ));
    };
    let exists = db::query("SELECT 1 FROM code_releases WHERE system = $1 AND version = $2")
        .bind(system.as_str())
        .bind(version.as_str())
        .fetch_optional(&mut *conn)
        .await?;
    if exists.is_some() {
        return Err(StoreError::AlreadyExists(format!(
            "{} release {version}",
            system.name()
        )));
    }
    let finished = db::query(
        "UPDATE code_releases SET version = $1, released_on = $2, terms = $3, staged_at = NULL \
         WHERE id = $4 AND staged_at IS NOT NULL",
    )
    .bind(version.as_str())
    .bind(staged.header.released_on.as_deref())
    .bind(staged.terms as i64)
    .bind(staged.release_id)
    .execute(&mut *conn)
    .await?;
    if finished.rows_affected() != 1 {
        return Err(StoreError::Invalid(
            "the imported rows are gone (removed as an abandoned import): import again".into(),
        ));
    }
    if activate {
        set_in_force(conn, system, &version).await?;
    }
    let info = release_info(conn, staged.release_id).await?;
    Ok(Imported {
        info,
        parents: staged.parents,
        aliases: staged.aliases,
    })
}

/// Inserts a batch of items; returns how many terms, parents and aliases it added (a code,
/// link or alias met again is not counted twice).
async fn insert_items(
    conn: &mut Db<'_>,
    release_id: i64,
    items: &[Item],
) -> Result<(u64, u64, u64)> {
    let mut terms = Vec::new();
    let mut parents = Vec::new();
    let mut aliases = Vec::new();
    for item in items {
        match item {
            Item::Term { .. } => terms.push(item),
            Item::Parent { .. } => parents.push(item),
            Item::Alias { .. } => aliases.push(item),
        }
    }
    // A code met again (an Orphanet classification node already in product 1) keeps its
    // first row; the same for a link or an alias given twice.
    let mut added = (0u64, 0u64, 0u64);
    for chunk in terms.chunks(ROWS_PER_STATEMENT) {
        let sql = values_sql(
            "INSERT INTO code_terms (release_id, code, label, obsolete, replaced_by) VALUES ",
            5,
            chunk.len(),
            " ON CONFLICT DO NOTHING",
        );
        let mut q = db::query(&sql);
        for item in chunk {
            if let Item::Term {
                code,
                label,
                obsolete,
                replaced_by,
            } = item
            {
                q = q
                    .bind(release_id)
                    .bind(code.as_str())
                    .bind(label.as_str())
                    .bind(*obsolete)
                    .bind(replaced_by.as_deref());
            }
        }
        added.0 += q.execute(&mut *conn).await?.rows_affected();
    }
    for chunk in parents.chunks(ROWS_PER_STATEMENT) {
        let sql = values_sql(
            "INSERT INTO code_parents (release_id, code, parent) VALUES ",
            3,
            chunk.len(),
            " ON CONFLICT DO NOTHING",
        );
        let mut q = db::query(&sql);
        for item in chunk {
            if let Item::Parent { code, parent } = item {
                q = q.bind(release_id).bind(code.as_str()).bind(parent.as_str());
            }
        }
        added.1 += q.execute(&mut *conn).await?.rows_affected();
    }
    for chunk in aliases.chunks(ROWS_PER_STATEMENT) {
        let sql = values_sql(
            "INSERT INTO code_aliases (release_id, alias, code, kind) VALUES ",
            4,
            chunk.len(),
            " ON CONFLICT DO NOTHING",
        );
        let mut q = db::query(&sql);
        for item in chunk {
            if let Item::Alias { alias, code, kind } = item {
                q = q
                    .bind(release_id)
                    .bind(alias.as_str())
                    .bind(code.as_str())
                    .bind(kind.as_str());
            }
        }
        added.2 += q.execute(&mut *conn).await?.rows_affected();
    }
    Ok(added)
}

/// `head` followed by `rows` groups of `width` placeholders, then `tail`.
fn values_sql(head: &str, width: usize, rows: usize, tail: &str) -> String {
    let mut sql = String::from(head);
    let mut n = 1;
    for r in 0..rows {
        if r > 0 {
            sql.push_str(", ");
        }
        sql.push('(');
        for c in 0..width {
            if c > 0 {
                sql.push_str(", ");
            }
            sql.push_str(&format!("${n}"));
            n += 1;
        }
        sql.push(')');
    }
    sql.push_str(tail);
    sql
}

/// Puts release `version` of `system` in force (and the one in force before out).
pub async fn set_in_force(conn: &mut Db<'_>, system: CodeSystem, version: &str) -> Result<()> {
    // A staged release (an import not finished, or abandoned) is never put in force.
    let found = db::query(
        "SELECT id FROM code_releases WHERE system = $1 AND version = $2 AND staged_at IS NULL",
    )
    .bind(system.as_str())
    .bind(version)
    .fetch_optional(&mut *conn)
    .await?;
    if found.is_none() {
        return Err(StoreError::NotFound(format!(
            "{} release {version}",
            system.name()
        )));
    }
    db::query("UPDATE code_releases SET in_force = FALSE WHERE system = $1 AND in_force")
        .bind(system.as_str())
        .execute(&mut *conn)
        .await?;
    db::query("UPDATE code_releases SET in_force = TRUE WHERE system = $1 AND version = $2")
        .bind(system.as_str())
        .bind(version)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

const INFO_COLUMNS: &str = "id, system, version, released_on, imported_at, source, terms, in_force";

fn info_row(r: &db::Row) -> Result<ReleaseInfo> {
    let system: String = r.try_get("system")?;
    Ok(ReleaseInfo {
        id: r.try_get("id")?,
        system: CodeSystem::parse(&system)
            .ok_or_else(|| StoreError::Corrupt("unknown code system".into()))?,
        version: r.try_get("version")?,
        released_on: r.try_get("released_on")?,
        imported_at: r.try_get("imported_at")?,
        source: r.try_get("source")?,
        terms: r.try_get("terms")?,
        in_force: r.try_get("in_force")?,
    })
}

async fn release_info(conn: &mut Db<'_>, id: i64) -> Result<ReleaseInfo> {
    let row = db::query(&format!(
        "SELECT {INFO_COLUMNS} FROM code_releases WHERE id = $1"
    ))
    .bind(id)
    .fetch_one(&mut *conn)
    .await?;
    info_row(&row)
}

impl Store {
    /// Every release on file, by system and import time.
    pub async fn code_releases(&self) -> Result<Vec<ReleaseInfo>> {
        let rows = db::query(&format!(
            "SELECT {INFO_COLUMNS} FROM code_releases ORDER BY system, imported_at, id"
        ))
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(info_row).collect()
    }

    /// The ids of the releases in force, ascending: cheap, to see whether the catalog in
    /// memory is still the one in force (`CodeCatalog::fingerprint`). Asked every
    /// `service::CODE_REFRESH`, so on SQLite it is read in place (`super::readers`: a
    /// handful of rows) rather than on a connection of sqlx's pool. Through the pool, this
    /// one read every ten seconds was what made the server's memory grow under load: each
    /// found the database changed, read its pages afresh on a worker thread that did nothing
    /// else, and that thread's malloc arena grew by them, about 25 KiB a minute per
    /// connection (docs/benchmarks.md, "Memory over long soaks: the cause").
    pub async fn code_releases_in_force(&self) -> Result<Vec<i64>> {
        let mut reader = self.reader().await?;
        let rows = db::query("SELECT id FROM code_releases WHERE in_force ORDER BY id")
            .fetch_all(&mut reader.db())
            .await?;
        rows.iter().map(|r| r.try_get("id")).collect()
    }

    /// The releases in force, whole, as the catalog submissions are checked against.
    pub async fn load_code_catalog(&self) -> Result<CodeCatalog> {
        let mut conn = self.pool().acquire().await?;
        let rows = db::query(&format!(
            "SELECT {INFO_COLUMNS} FROM code_releases WHERE in_force ORDER BY system"
        ))
        .fetch_all(&mut conn)
        .await?;
        let mut releases = Vec::new();
        for row in &rows {
            let info = info_row(row)?;
            let id = info.id;
            let mut release = Release::new(info);
            let terms = db::query(
                "SELECT code, label, obsolete, replaced_by FROM code_terms WHERE release_id = $1",
            )
            .bind(id)
            .fetch_all(&mut conn)
            .await?;
            for t in &terms {
                release.add_term(
                    t.try_get("code")?,
                    t.try_get("label")?,
                    t.try_get("obsolete")?,
                    t.try_get("replaced_by")?,
                );
            }
            let parents = db::query("SELECT code, parent FROM code_parents WHERE release_id = $1")
                .bind(id)
                .fetch_all(&mut conn)
                .await?;
            for p in &parents {
                release.add_parent(p.try_get("code")?, p.try_get("parent")?);
            }
            let aliases =
                db::query("SELECT alias, code, kind FROM code_aliases WHERE release_id = $1")
                    .bind(id)
                    .fetch_all(&mut conn)
                    .await?;
            for a in &aliases {
                let kind: String = a.try_get("kind")?;
                release.add_alias(
                    a.try_get("alias")?,
                    a.try_get("code")?,
                    AliasKind::parse(&kind)
                        .ok_or_else(|| StoreError::Corrupt("unknown alias kind".into()))?,
                );
            }
            releases.push(release);
        }
        Ok(CodeCatalog::new(releases))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The refresh every ten seconds reads in place on SQLite, never on sqlx's pool: with
    /// every connection of the pool taken, it still answers (through the pool it would
    /// fail when the pool's acquire timeout ran out; and its reads there grew the memory of
    /// sqlx's worker threads).
    #[tokio::test]
    async fn the_releases_in_force_are_read_without_the_pool() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("c.db").display());
        let store = Store::connect(&url, 2).await.unwrap();
        store.migrate().await.unwrap();
        let held = [
            store.pool().acquire().await.unwrap(),
            store.pool().acquire().await.unwrap(),
        ];
        assert_eq!(
            store.code_releases_in_force().await.unwrap(),
            Vec::<i64>::new()
        );
        drop(held);
    }

    #[test]
    fn values_are_numbered_in_order() {
        assert_eq!(
            values_sql("INSERT INTO t (a, b) VALUES ", 2, 2, ""),
            "INSERT INTO t (a, b) VALUES ($1, $2), ($3, $4)"
        );
    }
}
