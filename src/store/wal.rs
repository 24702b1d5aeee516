//! SQLite's WAL copied back into the database file beside the writer, not in it.
//!
//! SQLite checkpoints by itself at the end of a commit that leaves the WAL at 1,000 pages
//! or more (`wal_autocheckpoint`): on the writer's connection that is inside the commit of
//! one batch, whose callers then wait for the pages to be copied back and for the database
//! file's fsync, on top of their own commit (a profile at one caller put 3% of the
//! writer's time there, every few dozen commits: the slowest answers). So the writer's
//! connection does not checkpoint (`Store::open_sqlite_writer`), and every [`EVERY`] a
//! PASSIVE checkpoint runs on a pool connection, beside the writer: it copies what no
//! reader still needs, waits for no one, and holds no lock the writer takes, so a commit
//! goes on while it runs. Once every frame is copied back, the writer starts the WAL
//! afresh at its next transaction, as after the automatic checkpoint. An erasure's purge
//! still runs its own TRUNCATE checkpoint (`purge`); one that finds this one running
//! tries again a moment later.
//!
//! Durability does not depend on it: a commit is durable once the WAL is fsynced.

use std::time::Duration;

use tracing::{info, warn};

use super::db;
use super::{Backend, Result, Store};
use crate::logging::Throttled;

/// How often the WAL is checkpointed.
pub const EVERY: Duration = Duration::from_millis(250);

/// Checkpoints the WAL every [`EVERY`] (SQLite with a database file only; returns at
/// once otherwise). A failed checkpoint is tried again at the next tick; its warning is
/// throttled.
pub async fn keep_short(store: Store) {
    if store.backend() != Backend::Sqlite || store.sqlite_path().is_none() {
        return;
    }
    let mut ticks = tokio::time::interval(EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let warning = Throttled::new();
    let mut failing = false;
    loop {
        ticks.tick().await;
        match passive(&store).await {
            Ok(_) if failing => {
                failing = false;
                info!("the WAL is checkpointed again");
            }
            Ok(_) => {}
            Err(err) => {
                failing = true;
                if let Some(times) = warning.due() {
                    warn!(
                        error = %err,
                        times,
                        "WAL checkpoint failed (tried again every {} ms; commits are \
                         durable without it, but the WAL grows until it succeeds)",
                        EVERY.as_millis()
                    );
                }
            }
        }
    }
}

/// One `PRAGMA wal_checkpoint(PASSIVE)`: (busy, WAL frames, frames copied back).
pub async fn passive(store: &Store) -> Result<(i64, i64, i64)> {
    let row = db::query("PRAGMA wal_checkpoint(PASSIVE)")
        .persistent(false)
        .fetch_one(store.pool())
        .await?;
    Ok((
        row.try_get("busy")?,
        row.try_get("log")?,
        row.try_get("checkpointed")?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The writer's connection leaves checkpoints to [`keep_short`], and a PASSIVE
    /// checkpoint beside it copies its commits back while it holds its connection open.
    #[tokio::test]
    async fn the_writer_does_not_checkpoint_and_a_passive_checkpoint_beside_it_does() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.db");
        let url = format!("sqlite://{}?mode=rwc", path.display());
        let store = Store::connect(&url, 2).await.unwrap();
        let writer = Store::open_sqlite_writer(&path).unwrap();
        let autocheckpoint: i64 = writer
            .query_row("PRAGMA wal_autocheckpoint", [], |r| r.get(0))
            .unwrap();
        assert_eq!(autocheckpoint, 0);
        writer
            .execute_batch(
                "CREATE TABLE t (x INTEGER PRIMARY KEY, y BLOB); \
                 WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 3000) \
                 INSERT INTO t SELECT i, randomblob(2000) FROM n;",
            )
            .unwrap();
        // Well past SQLite's 1,000 pages, and nothing copied back by the writer.
        let db_size = std::fs::metadata(&path).unwrap().len();
        assert!(
            db_size < 100 * 4096,
            "the writer checkpointed: {db_size} bytes"
        );
        let (busy, log, copied) = passive(&store).await.unwrap();
        assert_eq!(busy, 0);
        assert!(log > 1000 && copied == log, "{log} frames, {copied} copied");
        assert!(std::fs::metadata(&path).unwrap().len() > 1000 * 4096);
        drop(writer);
        store.close().await;
    }
}
