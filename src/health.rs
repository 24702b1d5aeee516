//! Whether the database answers, probed every second: it drives the `grpc.health.v1`
//! statuses and lets calls fail fast while the database is away.
//!
//! Every call needs the database (keys are read on every call, every call is audited), so
//! the service is only as available as its database. A probe runs `SELECT 1` (on
//! PostgreSQL: reads `transaction_read_only`, and a database that takes no writes fails
//! it) every [`PROBE_EVERY`] on a connection of its own, outside the pool, so that a pool busy
//! with real work is never taken for a dead database. When a probe fails (an error, or no
//! answer within [`PROBE_TIMEOUT`]), every service's health status, and the server's
//! (`""`), turns NOT_SERVING and calls are refused at once with UNAVAILABLE and a retry
//! hint (`api::database_unreachable`) instead of waiting for the pool's connection
//! timeout; the next successful probe turns them back to SERVING. On SQLite, whose
//! `SELECT 1` reads no page, the probe also fails while the file system holding the
//! database has less than `--min-free-disk-bytes` free ([`check_room`]). This module never
//! touches data: it only asks the database whether it is there.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::store::StoreError;
use crate::store::db::{self, Single};
use tokio::sync::watch;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tracing::{info, warn};

/// How often the database is probed; also the retry hint of a refused call.
pub const PROBE_EVERY: Duration = Duration::from_secs(1);
/// How long a probe (a connection, if one is needed, and `SELECT 1`) may take.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Whether the database answered its last probe; cheap to clone and to read.
#[derive(Clone)]
pub struct DatabaseWatch {
    inner: Arc<Inner>,
}

struct Inner {
    /// May hold a password: never printed.
    url: String,
    reachable: AtomicBool,
    /// SQLite's database file and the free bytes its file system must keep
    /// (`--min-free-disk-bytes`; `None`: not checked).
    room: Option<(std::path::PathBuf, u64)>,
}

impl fmt::Debug for DatabaseWatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseWatch")
            .field("reachable", &self.is_reachable())
            .finish_non_exhaustive()
    }
}

impl DatabaseWatch {
    /// A watch of the database at `url`, taken to be reachable (the server just connected
    /// to it) until a probe says otherwise.
    pub fn new(url: &str) -> DatabaseWatch {
        DatabaseWatch::keeping_free(url, 0)
    }

    /// The same, and on SQLite the file system holding the database must keep `min_free`
    /// bytes free (0: not checked): with less, the probe fails, as for a database away.
    pub fn keeping_free(url: &str, min_free: u64) -> DatabaseWatch {
        let room = crate::data_dir::sqlite_path(url)
            .filter(|_| min_free > 0)
            .map(|path| (path, min_free));
        DatabaseWatch {
            inner: Arc::new(Inner {
                url: url.to_owned(),
                reachable: AtomicBool::new(true),
                room,
            }),
        }
    }

    /// As if the last probe had (not) been answered.
    #[cfg(test)]
    pub(crate) fn set_reachable(&self, reachable: bool) {
        self.inner.reachable.store(reachable, Ordering::Release);
    }

    /// Whether the database answered the last probe.
    pub fn is_reachable(&self) -> bool {
        self.inner.reachable.load(Ordering::Acquire)
    }

    /// Probes every [`PROBE_EVERY`] until `stopping` turns true (or its sender goes), and
    /// reports each change to `reporter` for `services` (and the server, `""`).
    pub async fn run(
        self,
        reporter: HealthReporter,
        services: Vec<&'static str>,
        mut stopping: watch::Receiver<bool>,
    ) {
        let mut conn: Option<Single> = None;
        let mut ticks = tokio::time::interval(PROBE_EVERY);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = stopping.wait_for(|stop| *stop) => break,
            }
            let outcome = tokio::time::timeout(PROBE_TIMEOUT, self.probe(&mut conn)).await;
            let reachable = match outcome {
                Ok(Ok(())) => true,
                Ok(Err(error)) => {
                    conn = None;
                    if self.is_reachable() {
                        warn!(%error, "database probe failed");
                    }
                    false
                }
                Err(_) => {
                    conn = None;
                    if self.is_reachable() {
                        warn!(timeout = ?PROBE_TIMEOUT, "database probe got no answer in time");
                    }
                    false
                }
            };
            // Shutting down: the server reports NOT_SERVING itself, and must not be undone.
            if *stopping.borrow() {
                break;
            }
            if self.inner.reachable.swap(reachable, Ordering::AcqRel) == reachable {
                continue;
            }
            let status = if reachable {
                info!("database reachable again: health SERVING");
                ServingStatus::Serving
            } else {
                warn!(
                    "database unreachable: health NOT_SERVING; calls are refused with \
                     UNAVAILABLE until it answers again"
                );
                ServingStatus::NotServing
            };
            for service in std::iter::once("").chain(services.iter().copied()) {
                reporter.set_service_status(service, status).await;
            }
        }
    }

    async fn probe(&self, conn: &mut Option<Single>) -> Result<(), StoreError> {
        let conn = match conn {
            Some(conn) => conn,
            None => conn.insert(Single::connect(&self.inner.url).await?),
        };
        match conn {
            Single::Sqlite(_) => {
                db::query("SELECT 1").execute(&mut conn.db()).await?;
                if let Some((path, min_free)) = &self.inner.room {
                    check_room(path, *min_free)?;
                }
            }
            // A PostgreSQL that answers but takes no writes (a standby after a failover,
            // `default_transaction_read_only`) fails every call too: every call is
            // audited.
            Single::Postgres(_) => {
                let read_only: String =
                    db::query("SELECT current_setting('transaction_read_only')")
                        .fetch_scalar(&mut conn.db())
                        .await?;
                if read_only == "on" {
                    return Err(StoreError::Unreachable {
                        cause: "the database is read-only (a standby, or \
                                default_transaction_read_only)"
                            .into(),
                    });
                }
            }
        }
        Ok(())
    }
}

/// Whether the file system holding `database` has `min_free` bytes free for this process
/// (`statvfs`: blocks available to unprivileged users). SELECT 1 reads no page, so it
/// cannot tell a full disk; every call writes its audit entry, so a disk without room
/// fails them all. A file system that cannot be asked is not taken for full.
fn check_room(database: &std::path::Path, min_free: u64) -> Result<(), StoreError> {
    let dir = match database.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => std::path::Path::new("."),
    };
    let Ok(stat) = rustix::fs::statvfs(dir) else {
        return Ok(());
    };
    let free = stat.f_bavail.saturating_mul(stat.f_frsize);
    if free < min_free {
        return Err(StoreError::Unreachable {
            cause: format!(
                "the disk holding the database has {free} bytes free, under \
                 --min-free-disk-bytes ({min_free}): calls would fail to write their audit \
                 entries; free some room"
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_is_checked_on_the_databases_file_system() {
        let dir = tempfile::tempdir().unwrap();
        let database = dir.path().join("registry.db");
        assert!(check_room(&database, 1).is_ok());
        let err = check_room(&database, u64::MAX).unwrap_err();
        assert!(err.to_string().contains("--min-free-disk-bytes"), "{err}");
        // A relative path without a directory is the working directory's.
        assert!(check_room(std::path::Path::new("registry.db"), 1).is_ok());
        // Only SQLite files are checked, and only with a bound.
        let watch = |url: &str, min: u64| DatabaseWatch::keeping_free(url, min).inner.room.clone();
        assert!(watch("sqlite://data/r.db?mode=rwc", 1).is_some());
        assert!(watch("sqlite://data/r.db?mode=rwc", 0).is_none());
        assert!(watch("sqlite::memory:", 1).is_none());
        assert!(watch("postgres://u@h/db", 1).is_none());
    }
}
