//! PostgreSQL's planner statistics, kept current while the registry grows.
//!
//! PostgreSQL chooses an index by its statistics of the table, which only `ANALYZE`
//! gathers. Autovacuum runs it once a table has changed by a tenth since the last time,
//! but looks only once a minute (`autovacuum_naptime`). A registry filled quickly (an
//! import, `demo`, the first day of a network) is read and written meanwhile without
//! statistics, and the planner then takes an index that matches only `registry_id`
//! (`cases_registry_centre`, `patients_slot`) for a lookup by registry and pseudonym,
//! scanning every case of the registry each time. Measured from outside (the load client,
//! PostgreSQL 15 on the same 2 cores, about 18,000 cases in one registry): GetCase at 551/s,
//! p50 114 ms, each read 25–55 ms in PostgreSQL; after one `ANALYZE` 1,991/s, p50 30 ms
//! (`docs/benchmarks.md`).
//!
//! So every instance checks, every [`EVERY`], the tables changed since their last
//! analysis by more than [`MIN_CHANGES`] rows and a tenth of the rows it counted (the rule
//! of autovacuum, with a floor that skips a small table's every few rows), and analyzes
//! them then, outside any write (`ANALYZE (SKIP_LOCKED)`: a table another instance or
//! autovacuum is analyzing is left to it). The check is one read of
//! `pg_stat_user_tables`; an analysis reads a sample of at most 30,000 rows of a table
//! (the default statistics target), so its cost does not grow with the table (every table
//! of a bench database, analyzed by hand under full load, took 1.8 s), and as the registry
//! grows it runs ever less often. Only the tables' owner (the role that ran the
//! migrations, as in `deploy/`) or a superuser may analyze them; a server connected as
//! another role leaves the statistics to autovacuum, as before. Not needed on SQLite,
//! whose planner goes by the indexes themselves (a lookup that fills a unique index is
//! taken as one row).

use std::time::Duration;

use tracing::{debug, info, warn};

use super::db;
use super::{Backend, Result, Store};

/// How often an instance checks.
pub const EVERY: Duration = Duration::from_secs(5);

/// A table is analyzed once more rows than this, and than a tenth of the rows its last
/// analysis counted, changed since.
pub const MIN_CHANGES: i64 = 500;

/// Analyzes the tables of the service's schema that changed enough since their last
/// analysis; returns their names. Nothing on SQLite.
pub async fn refresh(store: &Store) -> Result<Vec<String>> {
    if store.backend() != Backend::Postgres {
        return Ok(Vec::new());
    }
    let stale: Vec<String> = db::query(
        "SELECT s.relname::TEXT FROM pg_stat_user_tables s \
         JOIN pg_class c ON c.oid = s.relid \
         WHERE s.schemaname = current_schema() \
           AND pg_has_role(c.relowner, 'USAGE') \
           AND s.n_mod_since_analyze > $1 \
           AND s.n_mod_since_analyze > 0.1 * GREATEST(c.reltuples, 0) \
         ORDER BY s.relname",
    )
    .bind(MIN_CHANGES)
    .fetch_scalars(store.pool())
    .await?;
    if stale.is_empty() {
        return Ok(stale);
    }
    // The names come from the catalog of the service's own schema; quoted all the same.
    let tables: Vec<String> = stale
        .iter()
        .map(|t| format!("\"{}\"", t.replace('"', "\"\"")))
        .collect();
    store
        .pool()
        .execute_raw(&format!("ANALYZE (SKIP_LOCKED) {}", tables.join(", ")))
        .await?;
    debug!(tables = %stale.join(", "), "planner statistics refreshed");
    Ok(stale)
}

/// Runs [`refresh`] every [`EVERY`] until the task is dropped (PostgreSQL only: returns at
/// once on SQLite). A failure is tried again at the next check; the first of a run of
/// failures is a warning, the rest (a database that is away, which the health probe
/// reports) are not repeated every 5 s.
pub async fn keep_current(store: Store) {
    if store.backend() != Backend::Postgres {
        return;
    }
    let mut ticks = tokio::time::interval(EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        ticks.tick().await;
        match refresh(&store).await {
            Ok(_) if failing => {
                failing = false;
                info!("planner statistics refreshed again");
            }
            Ok(_) => {}
            Err(err) if failing => debug!(error = %err, "planner statistics still not refreshed"),
            Err(err) => {
                failing = true;
                warn!(error = %err, "planner statistics not refreshed; trying again every 5 s");
            }
        }
    }
}
