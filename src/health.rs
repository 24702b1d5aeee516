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
//! timeout; the next successful probe turns them back to SERVING. This module never
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
        DatabaseWatch {
            inner: Arc::new(Inner {
                url: url.to_owned(),
                reachable: AtomicBool::new(true),
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
