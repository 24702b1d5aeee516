//! Research-query benchmark: time per aggregate query over a registry of synthetic
//! patients (default 1,000,000), on SQLite or PostgreSQL, with the memory the query phase
//! needs beside it.
//!
//! `cargo bench --bench research` (SQLite; the registry is built once, then kept in
//! `target/bench-research/` and reused), or with `ERN_BENCH_DATABASE_URL=postgres://...`
//! (a database the user may CREATE DATABASE from; the registry is kept in database
//! `ern_bench_research`). `ERN_BENCH_PATIENTS` sets the size, `ERN_BENCH_RUNS` the runs
//! per query (default 5). Writes a section to `docs/benchmarks.md` (`ERN_BENCH_WRITE=0`
//! to only print).
//!
//! The data come from `ern-registry demo`'s generator (`synthetic`), written through the
//! service's own write path. Each query is what a `ResearchService` call does below the
//! gRPC layer: the SQL aggregation, the table assembly and the cell suppression.

#[path = "common/report.rs"]
mod report;

use std::time::{Duration, Instant};

use chrono::Utc;
use ern_registry::aggregate::suppress::Rules;
use ern_registry::aggregate::{Dimension, Filter, Key, TableBuilder};
use ern_registry::keys::MasterSecret;
use ern_registry::pseudonym::Pseudonymiser;
use ern_registry::startup::open_store;
use ern_registry::store::research::Selection;
use ern_registry::store::writer::Writer;
use ern_registry::store::{Backend, Store};
use ern_registry::synthetic;
use ring::rand::SystemRandom;
use sqlx::Connection;

const REGISTRY: &str = "ERN-LUNG";

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

async fn database_url() -> (String, &'static str) {
    match std::env::var("ERN_BENCH_DATABASE_URL") {
        Ok(admin) if !admin.is_empty() => {
            sqlx::any::install_default_drivers();
            let name = "ern_bench_research";
            let mut conn = sqlx::AnyConnection::connect(&admin).await.expect("connect");
            let exists = sqlx::query("SELECT 1 FROM pg_database WHERE datname = $1")
                .bind(name)
                .fetch_optional(&mut conn)
                .await
                .expect("look up database")
                .is_some();
            if !exists {
                sqlx::query(&format!("CREATE DATABASE {name}"))
                    .execute(&mut conn)
                    .await
                    .expect("create");
            }
            let (base, _) = admin.rsplit_once('/').expect("db name");
            (format!("{base}/{name}"), "PostgreSQL")
        }
        _ => {
            let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/target/bench-research");
            std::fs::create_dir_all(dir).expect("bench dir");
            (
                format!("sqlite://{dir}/registry.db?mode=rwc"),
                "SQLite (WAL, synchronous=FULL)",
            )
        }
    }
}

/// Peak resident memory since the last reset, in MiB (Linux).
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Resets the peak-memory mark (Linux: `echo 5 > /proc/self/clear_refs`).
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

struct Query {
    name: &'static str,
    kind: Kind,
}

enum Kind {
    Count(Vec<Dimension>, Vec<Filter>),
    Delay(Vec<Dimension>),
    Expertise(Vec<i64>),
}

fn queries() -> Vec<Query> {
    let cf = || Filter {
        dimension: Dimension::Diagnosis,
        values: vec![Key::Int(586)],
    };
    vec![
        Query {
            name: "count: total",
            kind: Kind::Count(vec![], vec![]),
        },
        Query {
            name: "count by diagnosis",
            kind: Kind::Count(vec![Dimension::Diagnosis], vec![]),
        },
        Query {
            name: "count by country x sex",
            kind: Kind::Count(vec![Dimension::Country, Dimension::Sex], vec![]),
        },
        Query {
            name: "count by diagnosis x country",
            kind: Kind::Count(vec![Dimension::Diagnosis, Dimension::Country], vec![]),
        },
        Query {
            name: "count by centre x onset age band x sex",
            kind: Kind::Count(
                vec![Dimension::Centre, Dimension::OnsetAgeBand, Dimension::Sex],
                vec![],
            ),
        },
        Query {
            name: "count by gene, diagnosis ORPHA:586",
            kind: Kind::Count(vec![Dimension::Gene], vec![cf()]),
        },
        Query {
            name: "count by diagnosis year, ORPHA:586",
            kind: Kind::Count(vec![Dimension::DiagnosisYear], vec![cf()]),
        },
        Query {
            name: "diagnostic delay, overall",
            kind: Kind::Delay(vec![]),
        },
        Query {
            name: "diagnostic delay by country",
            kind: Kind::Delay(vec![Dimension::Country]),
        },
        Query {
            name: "diagnostic delay by diagnosis x sex",
            kind: Kind::Delay(vec![Dimension::Diagnosis, Dimension::Sex]),
        },
        Query {
            name: "expertise: ORPHA:586 (commonest)",
            kind: Kind::Expertise(vec![586]),
        },
        Query {
            name: "expertise: ORPHA:104 (rarest)",
            kind: Kind::Expertise(vec![104]),
        },
    ]
}

/// Runs one query; returns (cells, suppressed) to show what was computed.
async fn run(store: &Store, registry_id: i64, rules: Rules, q: &Query) -> (usize, usize) {
    let now = Utc::now();
    let deadline = Instant::now() + Duration::from_secs(60);
    match &q.kind {
        Kind::Count(group_by, filters) => {
            let sel = Selection {
                registry_id,
                group_by: group_by.clone(),
                filters: filters.clone(),
                now,
            };
            let mut builder = TableBuilder::new();
            store
                .count_patients(&sel, &mut builder)
                .await
                .expect("count");
            let table = builder.finish(group_by, rules, deadline).expect("table");
            (table.protected.cells.len(), table.suppressed())
        }
        Kind::Delay(group_by) => {
            let sel = Selection {
                registry_id,
                group_by: group_by.clone(),
                filters: vec![],
                now,
            };
            let builder = store.diagnostic_delay(&sel).await.expect("delay");
            let table = builder.finish(rules, deadline).expect("delay table");
            (table.groups.len() * 5, table.suppressed)
        }
        Kind::Expertise(codes) => {
            let rows = store
                .expertise(codes, &[registry_id], &[], now)
                .await
                .expect("expertise");
            (rows.len(), 0)
        }
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async_main());
}

async fn async_main() {
    let target: u32 = env_or("ERN_BENCH_PATIENTS", 1_000_000);
    let runs: usize = env_or("ERN_BENCH_RUNS", 5);
    let (url, backend) = database_url().await;
    let store = open_store(&url, 4).await.expect("open store");
    let registry = store
        .registry_by_code(REGISTRY)
        .await
        .expect("registry")
        .expect("seeded");
    let have = store
        .patients_in_registry(registry.id)
        .await
        .expect("count") as u32;
    if have < target {
        let started = Instant::now();
        let master = MasterSecret::generate(&SystemRandom::new()).expect("key");
        let partitions = store.backend().default_writers();
        let writer = Writer::start(
            store.clone(),
            partitions,
            512,
            std::sync::Arc::new(ern_registry::audit::AuditKey::derive(&master)),
            std::sync::Arc::new(ern_registry::service::consent::RegistryConsentRules),
        );
        let done = synthetic::populate(
            &store,
            &writer,
            &Pseudonymiser::new(&master),
            REGISTRY,
            target - have,
            1,
            |n| eprintln!("generated {n}"),
        )
        .await
        .expect("populate");
        eprintln!(
            "wrote {} synthetic patients in {:.0} s ({:.0}/s)",
            done.written,
            started.elapsed().as_secs_f64(),
            done.written as f64 / started.elapsed().as_secs_f64()
        );
        if store.backend() == Backend::Postgres {
            sqlx::query("ANALYZE")
                .execute(store.pool())
                .await
                .expect("analyze");
        }
    }
    let patients = store
        .patients_in_registry(registry.id)
        .await
        .expect("count");
    let rules = Rules::new(
        registry.min_cell_count as u64,
        registry.protection_level as u64,
    )
    .expect("rules");

    reset_peak_rss();
    let baseline = peak_rss_mib();
    let mut lines = Vec::new();
    for q in queries() {
        // One warm-up, then timed runs.
        let (cells, suppressed) = run(&store, registry.id, rules, &q).await;
        let mut times: Vec<Duration> = Vec::with_capacity(runs);
        for _ in 0..runs {
            let t = Instant::now();
            run(&store, registry.id, rules, &q).await;
            times.push(t.elapsed());
        }
        times.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let line = format!(
            "| {} | {:.0} | {:.0} | {} | {} |\n",
            q.name,
            ms(times[times.len() / 2]),
            ms(times[times.len() - 1]),
            cells,
            suppressed
        );
        eprint!("{line}");
        lines.push(line);
    }
    let peak = peak_rss_mib();

    let mut out = format!(
        "\n## Research queries, {backend}, {}\n\nCommand: `{}cargo bench --bench research` \
         (ERN_BENCH_RUNS={runs}); {} cores; {patients} synthetic patients in {REGISTRY} \
         (`ern-registry demo` generator), k = {}, p = {}. Time per query below the gRPC layer: SQL \
         aggregation, table assembly and cell suppression; median and slowest of {runs} runs \
         after one warm-up.\n\n",
        Utc::now().format("%Y-%m-%d"),
        if backend.starts_with("Postgre") {
            "ERN_BENCH_DATABASE_URL=postgres://... "
        } else {
            ""
        },
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        rules.k(),
        rules.protection(),
    );
    out.push_str(
        "| query | median ms | slowest ms | cells | suppressed |\n|---|---:|---:|---:|---:|\n",
    );
    for l in &lines {
        out.push_str(l);
    }
    if let (Some(base), Some(peak)) = (baseline, peak) {
        out.push_str(&format!(
            "\nResident memory of the bench process during the query phase: {base:.0} MiB at \
             its start, peak {peak:.0} MiB (rows stream from the database; only groups are \
             held).\n"
        ));
    }
    report::publish(&out);
    store.close().await;
}
