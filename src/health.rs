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
//!
//! A writer whose loop has ended while the service runs (a panic in it: the writer then
//! stops as at shutdown, `store::writer`) stores nothing more until a restart: the probe
//! counts it as failed, so health is NOT_SERVING and calls are refused at once, and an
//! error is logged once, saying to restart. (Until 2026-12-07 health stayed SERVING and
//! every write was answered "shutting down": a fault audit killed the writer's thread
//! with a log write that failed.)
//!
//! On PostgreSQL the same probe reads the database server's clock, and the process's clock
//! is compared with it ([`skew_ms`]): instances date consent decisions by their own
//! clocks, so one that runs behind or ahead of the others can order a decision wrongly
//! (`docs/scaling.md`, "The command's clock"). A skew past [`MAX_SKEW`] is a warning
//! (when it begins, every ten minutes while it lasts, and when it ends), and every probe
//! sets `ern_clock_skew_seconds`; health does not change for it (the database's clock may
//! be the one that is wrong).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::store::StoreError;
use crate::store::db::{self, Single};
use tokio::sync::watch;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tracing::{error, info, warn};

use crate::store::writer::Backlog;

/// How often the database is probed; also the retry hint of a refused call.
pub const PROBE_EVERY: Duration = Duration::from_secs(1);
/// How long a probe (a connection, if one is needed, and `SELECT 1`) may take.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// A clock skew to the database's past which the probe warns.
pub const MAX_SKEW: Duration = Duration::from_secs(1);
/// How often a skew that lasts is warned of again.
const SKEW_WARN_EVERY: Duration = Duration::from_secs(600);

/// The skew of this process's clock to the database's (milliseconds, positive when the
/// database's is ahead), from the database's reading `database` taken between the local
/// readings `before` and `after` (milliseconds since the epoch); `None` when it cannot be
/// told from the round trip's own length (the skew is within half of it). The skew is
/// measured from the round trip's midpoint, less that half: what it is at least.
pub fn skew_ms(before: i64, database: i64, after: i64) -> Option<i64> {
    let half = (after - before).max(0) / 2;
    let off = database - (before + half);
    match off.abs() - half {
        beyond if beyond > 0 => Some(beyond * off.signum()),
        _ => None,
    }
}

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
    /// SQLite's database file and `-shm` as the server opened them: a probe fails once
    /// either was deleted, moved or replaced (`None`: not SQLite, or not to be read).
    files: Option<crate::data_dir::OpenFiles>,
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
    /// On SQLite the database's files are taken as they are now (the server has them
    /// open), and a probe fails once one of them is another ([`crate::data_dir::OpenFiles`]).
    pub fn keeping_free(url: &str, min_free: u64) -> DatabaseWatch {
        let room = crate::data_dir::sqlite_path(url)
            .filter(|_| min_free > 0)
            .map(|path| (path, min_free));
        DatabaseWatch {
            inner: Arc::new(Inner {
                url: url.to_owned(),
                reachable: AtomicBool::new(true),
                room,
                files: crate::data_dir::sqlite_path(url)
                    .and_then(|path| crate::data_dir::OpenFiles::of(&path)),
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
    /// reports each change to `reporter` for `services` (and the server, `""`). A probe
    /// also fails once a writer of `writers` has stopped (module doc).
    pub async fn run(
        self,
        reporter: HealthReporter,
        services: Vec<&'static str>,
        mut stopping: watch::Receiver<bool>,
        writers: Backlog,
    ) {
        let mut writer_stopped = false;
        let mut conn: Option<Single> = None;
        let mut skew = SkewWarnings::default();
        let mut ticks = tokio::time::interval(PROBE_EVERY);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = stopping.wait_for(|stop| *stop) => break,
            }
            let outcome = tokio::time::timeout(PROBE_TIMEOUT, self.probe(&mut conn)).await;
            let reachable = match outcome {
                Ok(Ok(measured)) => {
                    skew.observe(measured, tokio::time::Instant::now());
                    true
                }
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
            if !writer_stopped && writers.stopped() {
                writer_stopped = true;
                error!(
                    "a writer has stopped while the service runs: no write can be stored; \
                     health NOT_SERVING until the service is restarted"
                );
            }
            let reachable = reachable && !writer_stopped;
            if self.inner.reachable.swap(reachable, Ordering::AcqRel) == reachable {
                continue;
            }
            let status = if reachable {
                info!("database reachable again: health SERVING");
                ServingStatus::Serving
            } else if writer_stopped {
                // Said above.
                ServingStatus::NotServing
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

    /// Probes once; on PostgreSQL, returns the clock skew measured (`skew_ms`; `Some(0)`
    /// when within the round trip).
    async fn probe(&self, conn: &mut Option<Single>) -> Result<Option<i64>, StoreError> {
        // Before any connection is made: a new one would make a new `-shm`.
        if let Some(files) = &self.inner.files {
            files
                .check()
                .map_err(|cause| StoreError::FilesChanged { cause })?;
        }
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
                let before = chrono::Utc::now().timestamp_millis();
                let row = db::query(
                    "SELECT current_setting('transaction_read_only') AS read_only, \
                     CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT) AS now_ms",
                )
                .fetch_one(&mut conn.db())
                .await?;
                let after = chrono::Utc::now().timestamp_millis();
                let read_only: String = row.try_get("read_only")?;
                if read_only == "on" {
                    return Err(StoreError::Unreachable {
                        cause: "the database is read-only (a standby, or \
                                default_transaction_read_only)"
                            .into(),
                    });
                }
                let database: i64 = row.try_get("now_ms")?;
                return Ok(Some(skew_ms(before, database, after).unwrap_or(0)));
            }
        }
        Ok(None)
    }
}

/// The warnings of a clock skew: when it passes [`MAX_SKEW`], every
/// [`SKEW_WARN_EVERY`] while it lasts, and when it ends.
#[derive(Default)]
struct SkewWarnings {
    /// Since when the skew has been past the bound, and when it was last warned of.
    past: Option<(tokio::time::Instant, tokio::time::Instant)>,
}

impl SkewWarnings {
    /// Takes the skew a probe measured at `now`.
    fn observe(&mut self, measured: Option<i64>, now: tokio::time::Instant) {
        let Some(skew) = measured else {
            return;
        };
        metrics::gauge!("ern_clock_skew_seconds").set(skew as f64 / 1000.0);
        let past = skew.unsigned_abs() > MAX_SKEW.as_millis() as u64;
        match (past, &mut self.past) {
            (true, Some((_, warned))) if now.duration_since(*warned) < SKEW_WARN_EVERY => {}
            (true, state) => {
                let since = state.map_or(now, |(since, _)| since);
                *state = Some((since, now));
                warn!(
                    skew_ms = skew,
                    "this instance's clock differs from the database server's by more than \
                     {} s (positive: the database's is ahead): consent decisions are dated by \
                     each instance's clock, so keep every instance's and the database's clock \
                     synchronised (NTP; docs/scaling.md)",
                    MAX_SKEW.as_secs()
                );
            }
            (false, state @ Some(_)) => {
                *state = None;
                info!(
                    skew_ms = skew,
                    "clock within the bound of the database server's again"
                );
            }
            (false, None) => {}
        }
    }
}

/// The bytes free for this process (`statvfs`: blocks available to unprivileged users)
/// on the file system holding the file `database`; `None` if it cannot be asked.
pub fn free_bytes(database: &std::path::Path) -> Option<u64> {
    let dir = match database.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => std::path::Path::new("."),
    };
    let stat = rustix::fs::statvfs(dir).ok()?;
    Some(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// Whether the file system holding `database` has `min_free` bytes free for this process
/// (`statvfs`: blocks available to unprivileged users). SELECT 1 reads no page, so it
/// cannot tell a full disk; every call writes its audit entry, so a disk without room
/// fails them all. A file system that cannot be asked is not taken for full.
fn check_room(database: &std::path::Path, min_free: u64) -> Result<(), StoreError> {
    let Some(free) = free_bytes(database) else {
        return Ok(());
    };
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

    /// A writer that has stopped while the service runs turns health NOT_SERVING (and
    /// calls are refused at once: `is_reachable`), though the database answers.
    #[tokio::test]
    async fn a_stopped_writer_turns_health_not_serving() {
        use tonic_health::pb::HealthCheckRequest;
        use tonic_health::pb::health_server::Health;

        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("h.db").display());
        let reporter = HealthReporter::new();
        let server = tonic_health::server::HealthService::from_health_reporter(reporter.clone());
        reporter
            .set_service_status("", ServingStatus::Serving)
            .await;
        let watch = DatabaseWatch::new(&url);
        let (_stop, stopping) = watch::channel(false);
        tokio::spawn(watch.clone().run(
            reporter,
            Vec::new(),
            stopping,
            Backlog::of_a_stopped_writer(),
        ));
        let status = || async {
            server
                .check(tonic::Request::new(HealthCheckRequest {
                    service: String::new(),
                }))
                .await
                .unwrap()
                .into_inner()
                .status
        };
        // Reachable at first (`new`); the first probe, at once, finds the writer stopped.
        for _ in 0..20 {
            if !watch.is_reachable() {
                break;
            }
            tokio::time::sleep(PROBE_EVERY).await;
        }
        assert!(!watch.is_reachable());
        assert_eq!(status().await, ServingStatus::NotServing as i32);
    }

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

    #[test]
    fn the_skew_is_what_the_round_trip_cannot_explain() {
        // The database read 1,000 during a round trip from 0 to 10: it is at least 990
        // ahead (had it read at 10).
        assert_eq!(skew_ms(0, 1_000, 10), Some(990));
        // Behind by at least 500.
        assert_eq!(skew_ms(1_000, 500, 1_010), Some(-500));
        // Within the round trip: no skew can be told.
        assert_eq!(skew_ms(0, 3, 10), None);
        assert_eq!(skew_ms(0, 10, 10), None);
        assert_eq!(skew_ms(0, 0, 10), None);
        // A slow round trip hides a small skew; not a large one.
        assert_eq!(skew_ms(0, 2_000, 3_000), None);
        assert_eq!(skew_ms(0, 5_000, 3_000), Some(2_000));
        // A clock that went backwards between the readings counts as no round trip.
        assert_eq!(skew_ms(10, 2_000, 0), Some(1_990));
    }

    #[test]
    fn a_skew_is_warned_of_when_it_begins_again_while_it_lasts_and_when_it_ends() {
        let start = tokio::time::Instant::now();
        let at = |secs: u64| start + Duration::from_secs(secs);
        let mut warnings = SkewWarnings::default();
        warnings.observe(Some(900), at(0));
        assert!(warnings.past.is_none());
        warnings.observe(Some(-1_500), at(1));
        assert_eq!(warnings.past, Some((at(1), at(1))));
        warnings.observe(Some(-1_500), at(61));
        assert_eq!(warnings.past, Some((at(1), at(1))), "not warned again yet");
        warnings.observe(Some(2_000), at(601));
        assert_eq!(warnings.past, Some((at(1), at(601))), "warned again");
        // A probe without a reading (SQLite) changes nothing; one within the bound ends it.
        warnings.observe(None, at(602));
        assert!(warnings.past.is_some());
        warnings.observe(Some(0), at(603));
        assert!(warnings.past.is_none());
    }
}
