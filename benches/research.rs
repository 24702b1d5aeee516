//! Research-query benchmark, end to end over gRPC: the real server (`Application`) on a
//! registry of synthetic patients (default 1,000,000), on SQLite or PostgreSQL, a
//! researcher's client calling `ResearchService` over loopback. Measured: the time per
//! call as the client sees it (authentication, rate limit, the research index or the
//! SQL scan, table assembly, cell suppression, the audit entry's commit, encoding), the
//! server's start-up (migrations and the research index's load), and the index's memory
//! (its own accounting, and the process's resident memory around the start).
//!
//! `cargo bench --bench research` (SQLite; the registry is built once, then kept in
//! `target/bench-research/` and reused), or with `ERN_BENCH_DATABASE_URL=postgres://...`
//! (a database the user may CREATE DATABASE from; the registry is kept in database
//! `ern_bench_research`). `ERN_BENCH_PATIENTS` sets the size, `ERN_BENCH_RUNS` the timed
//! calls per query with the index (default 20), `ERN_BENCH_SQL_RUNS` those with the SQL
//! scans (`--research-index=false`, default 3; 0 skips them). Writes a section to
//! `docs/benchmarks.md` (`ERN_BENCH_WRITE=0` to only print).
//!
//! The data come from `ern-registry demo`'s generator (`synthetic`), written through the
//! service's own write path, under a master key kept beside the data
//! (`bench-master.key`). A registry built by an earlier version of this bench has no
//! kept key: the bench then makes one and, as the audit chain of that registry was made
//! with a key nobody has, empties the chain (the bench reads research rows only), so the
//! server accepts the new key.

#[path = "common/report.rs"]
mod report;

use ern_registry::store::db;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use chrono::Utc;
use ern_registry::auth::{self, Role};
use ern_registry::config::ServeArgs;
use ern_registry::keys::MasterSecret;
use ern_registry::proto::{self, Dimension as D, research_service_client::ResearchServiceClient};
use ern_registry::pseudonym::Pseudonymiser;
use ern_registry::startup::{Application, open_store};
use ern_registry::store::writer::Writer;
use ern_registry::store::{Backend, Store};
use ern_registry::synthetic;
use sqlx::Connection;
use tonic::transport::Channel;

const REGISTRY: &str = "ERN-LUNG";
const RESEARCHER: &str = "bench-researcher";

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// (database URL, backend name, directory of the kept files).
async fn database_url() -> (String, &'static str, PathBuf) {
    let dir = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/target/bench-research"
    ));
    std::fs::create_dir_all(&dir).expect("bench dir");
    match std::env::var("ERN_BENCH_DATABASE_URL") {
        Ok(admin) if !admin.is_empty() => {
            let name = "ern_bench_research";
            let mut conn = sqlx::PgConnection::connect(&admin).await.expect("connect");
            let exists = db::query("SELECT 1 FROM pg_database WHERE datname = $1")
                .bind(name)
                .fetch_optional(&mut conn)
                .await
                .expect("look up database")
                .is_some();
            if !exists {
                db::query(&format!("CREATE DATABASE {name}"))
                    .execute(&mut conn)
                    .await
                    .expect("create");
            }
            let (base, _) = admin.rsplit_once('/').expect("db name");
            let pg = dir.join("postgres");
            std::fs::create_dir_all(&pg).expect("bench dir");
            (format!("{base}/{name}"), "PostgreSQL", pg)
        }
        _ => (
            format!("sqlite://{}/registry.db?mode=rwc", dir.display()),
            "SQLite (WAL, synchronous=FULL)",
            dir,
        ),
    }
}

/// Resident memory now and its peak, in MiB (Linux).
fn rss_mib() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kib| kib.parse::<f64>().ok())
            .map_or(0.0, |kib| kib / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// CPU time of this process so far (user + system), in seconds (Linux).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses): utime is the 14th field of
    // the line, stime the 15th, in clock ticks (100 per second on Linux).
    let rest = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// Fills the registry up to `target` patients (if needed) under the kept master key,
/// adopting a registry of an earlier bench that kept none (module doc).
/// Returns the key file and how long opening the store took (with any migrations).
async fn prepare(url: &str, dir: &std::path::Path, target: u32) -> (PathBuf, Duration) {
    let key_file = dir.join("bench-master.key");
    let opened = Instant::now();
    let store = open_store(url, 4).await.expect("open store");
    let opened = opened.elapsed();
    let registry = store
        .registry_by_code(REGISTRY)
        .await
        .expect("registry")
        .expect("seeded");
    let have = store
        .patients_in_registry(registry.id)
        .await
        .expect("count") as u32;
    if !key_file.exists()
        && store
            .master_fingerprint()
            .await
            .expect("fingerprint")
            .is_none()
    {
        if have > 0 {
            eprintln!("adopting a registry without a kept master key: emptying its audit chain");
            store
                .pool()
                .execute_raw(
                    "DELETE FROM audit_log; UPDATE audit_head SET seq = 0, mac = '' WHERE id = 1",
                )
                .await
                .expect("empty the audit chain");
        }
        MasterSecret::load_or_create(&key_file).expect("create the bench key");
    }
    let master = MasterSecret::load(&key_file).expect("bench key");
    if have < target {
        let started = Instant::now();
        let writer = Writer::start(
            store.clone(),
            store.backend().default_writers(),
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
            db::query("ANALYZE")
                .execute(store.pool())
                .await
                .expect("analyze");
        }
    }
    store.close().await;
    (key_file, opened)
}

/// A started server and a researcher's client of it.
struct Server {
    research: Client,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
    /// Wall time of `Application::build` (migrations, master key, index load).
    build: Duration,
    store: Store,
}

type AddKey =
    Box<dyn FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Send>;
type Client =
    ResearchServiceClient<tonic::service::interceptor::InterceptedService<Channel, AddKey>>;

async fn start(url: &str, key_file: &std::path::Path, index: bool) -> Server {
    let args = ServeArgs {
        listen: "127.0.0.1:0".parse().expect("addr"),
        research_queries_per_minute: 100_000,
        research_index: index,
        protection_budget_ms: 60_000,
        request_timeout_secs: 300,
        ..ServeArgs::default()
    };
    let started = Instant::now();
    let app = Application::build(args, url, key_file)
        .await
        .expect("the server starts");
    let build = started.elapsed();
    let store = app.store().clone();
    let principal = match store.principal_id(RESEARCHER).await {
        Ok(id) => id,
        Err(_) => store
            .create_principal(RESEARCHER, Role::Researcher, None, &[REGISTRY.into()])
            .await
            .expect("researcher"),
    };
    let issued = auth::issue_key(&ring::rand::SystemRandom::new(), &app.key_hasher()).expect("key");
    store
        .insert_api_key(&issued.key_id, principal, &issued.secret_hash, None)
        .await
        .expect("key");
    let addr = app.local_addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        app.run_until_stopped(async {
            let _ = stopped.await;
        })
        .await
        .expect("server runs");
    });
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let value: tonic::metadata::MetadataValue<_> = format!(
        "Bearer {}",
        secrecy::ExposeSecret::expose_secret(&issued.token)
    )
    .parse()
    .expect("ascii");
    let add: AddKey = Box::new(move |mut req: tonic::Request<()>| {
        req.metadata_mut().insert("authorization", value.clone());
        Ok(req)
    });
    Server {
        research: ResearchServiceClient::with_interceptor(channel, add),
        stop,
        task,
        build,
        store,
    }
}

impl Server {
    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
        self.store.close().await;
    }
}

struct Query {
    name: &'static str,
    kind: Kind,
}

enum Kind {
    Count(Vec<D>, Vec<proto::Filter>),
    Delay(Vec<D>),
    /// FindExpertise over these codes (each counted and banded on its own, then summed).
    Expertise(&'static [&'static str]),
}

fn queries() -> Vec<Query> {
    let cf = || proto::Filter {
        dimension: D::Diagnosis as i32,
        values: vec!["ORPHA:586".into()],
        ..Default::default()
    };
    let count = |name, dims: &[D], filters| Query {
        name,
        kind: Kind::Count(dims.to_vec(), filters),
    };
    let delay = |name, dims: &[D]| Query {
        name,
        kind: Kind::Delay(dims.to_vec()),
    };
    vec![
        count("count: total", &[], vec![]),
        count("count by diagnosis", &[D::Diagnosis], vec![]),
        count("count by country x sex", &[D::Country, D::Sex], vec![]),
        count(
            "count by diagnosis x country",
            &[D::Diagnosis, D::Country],
            vec![],
        ),
        count(
            "count by centre x onset age band x sex",
            &[D::Centre, D::OnsetAgeBand, D::Sex],
            vec![],
        ),
        count("count by gene, diagnosis ORPHA:586", &[D::Gene], vec![cf()]),
        count(
            "count by diagnosis year, ORPHA:586",
            &[D::DiagnosisYear],
            vec![cf()],
        ),
        delay("diagnostic delay, overall", &[]),
        delay("diagnostic delay by country", &[D::Country]),
        delay(
            "diagnostic delay by diagnosis x sex",
            &[D::Diagnosis, D::Sex],
        ),
        Query {
            name: "expertise: ORPHA:586 (commonest)",
            kind: Kind::Expertise(&["ORPHA:586"]),
        },
        Query {
            name: "expertise: ORPHA:104 (rarest)",
            kind: Kind::Expertise(&["ORPHA:104"]),
        },
        Query {
            name: "expertise: 10 codes (the ten commonest)",
            kind: Kind::Expertise(&[
                "ORPHA:586",
                "ORPHA:244",
                "ORPHA:60",
                "ORPHA:558",
                "ORPHA:636",
                "ORPHA:791",
                "ORPHA:98896",
                "ORPHA:70",
                "ORPHA:355",
                "ORPHA:324",
            ]),
        },
    ]
}

/// One call; returns (cells, suppressed).
async fn call(client: &mut Client, q: &Query) -> (usize, u32) {
    match &q.kind {
        Kind::Count(dims, filters) => {
            let t = client
                .count_patients(proto::CountPatientsRequest {
                    registry: REGISTRY.into(),
                    group_by: dims.iter().map(|d| *d as i32).collect(),
                    filters: filters.clone(),
                })
                .await
                .expect("count")
                .into_inner();
            (t.rows.iter().map(|r| r.cells.len()).sum(), t.suppressed)
        }
        Kind::Delay(dims) => {
            let r = client
                .diagnostic_delay(proto::DiagnosticDelayRequest {
                    registry: REGISTRY.into(),
                    group_by: dims.iter().map(|d| *d as i32).collect(),
                    filters: vec![],
                })
                .await
                .expect("delay")
                .into_inner();
            (r.groups.len() * r.bands.len(), r.suppressed)
        }
        Kind::Expertise(codes) => {
            let r = client
                .find_expertise(proto::FindExpertiseRequest {
                    orphacodes: codes.iter().map(|c| c.to_string()).collect(),
                    countries: vec![],
                    registries: vec![REGISTRY.into()],
                    ..Default::default()
                })
                .await
                .expect("expertise")
                .into_inner();
            (r.centres.len(), 0)
        }
    }
}

/// Per query: (median, p95, slowest) in ms, cells, suppressed.
struct Timed {
    median: f64,
    p95: f64,
    slowest: f64,
    cells: usize,
    suppressed: u32,
}

async fn time_queries(client: &mut Client, runs: usize) -> Vec<Timed> {
    let mut out = Vec::new();
    for q in queries() {
        let (cells, suppressed) = call(client, &q).await; // warm-up
        let mut times: Vec<f64> = Vec::with_capacity(runs);
        for _ in 0..runs {
            let t = Instant::now();
            call(client, &q).await;
            times.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        times.sort_by(f64::total_cmp);
        // Nearest rank.
        let rank = |p: f64| times[((p * runs as f64).ceil() as usize).clamp(1, runs) - 1];
        let timed = Timed {
            median: rank(0.5),
            p95: rank(0.95),
            slowest: times[runs - 1],
            cells,
            suppressed,
        };
        eprintln!(
            "{}: median {:.1} ms, p95 {:.1} ms, slowest {:.1} ms",
            q.name, timed.median, timed.p95, timed.slowest
        );
        out.push(timed);
    }
    out
}

/// A gauge's value from the Prometheus text.
fn gauge(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
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
    let runs: usize = env_or("ERN_BENCH_RUNS", 20).max(1);
    let sql_runs: usize = env_or("ERN_BENCH_SQL_RUNS", 3);
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .expect("metrics recorder");
    let (url, backend, dir) = database_url().await;
    let (key_file, migrated) = prepare(&url, &dir, target).await;

    // Two starts: the first in a process that has not read the database yet.
    let (rss_before, _) = rss_mib();
    let cpu_before = cpu_seconds();
    let first = start(&url, &key_file, true).await;
    let first_cpu = cpu_seconds() - cpu_before;
    let (rss_after, _) = rss_mib();
    let first_build = first.build;
    let first_load =
        gauge(&metrics.render(), "ern_research_index_load_seconds").unwrap_or(f64::NAN);
    first.stop().await;
    let cpu_before = cpu_seconds();
    let mut server = start(&url, &key_file, true).await;
    let second_cpu = cpu_seconds() - cpu_before;
    let load_average = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into());
    let rendered = metrics.render();
    let second_load = gauge(&rendered, "ern_research_index_load_seconds").unwrap_or(f64::NAN);
    let load_seconds = first_load.max(second_load);
    let patients = gauge(&rendered, "ern_research_index_patients").unwrap_or(0.0);
    let bytes = gauge(&rendered, "ern_research_index_bytes").unwrap_or(0.0);
    let per_patient = bytes / patients.max(1.0);
    let registry = server
        .store
        .registry_by_code(REGISTRY)
        .await
        .expect("registry")
        .expect("seeded");
    eprintln!(
        "starts {:.2} s and {:.2} s; index loads {first_load:.2} s and {second_load:.2} s, \
         {patients} patients, {bytes} bytes ({per_patient:.1} per patient); RSS {rss_before:.0} \
         -> {rss_after:.0} MiB; opening the store (with migrations) {:.2} s",
        first_build.as_secs_f64(),
        server.build.as_secs_f64(),
        migrated.as_secs_f64(),
    );
    let indexed = time_queries(&mut server.research, runs).await;
    let build = server.build;
    server.stop().await;
    let scanned = if sql_runs > 0 {
        let mut sql = start(&url, &key_file, false).await;
        let t = time_queries(&mut sql.research, sql_runs).await;
        sql.stop().await;
        Some(t)
    } else {
        None
    };

    let mut out = format!(
        "\n## Research queries end to end over gRPC, research index, {backend}, {}\n\n\
         Command: `{}cargo bench --bench research` (ERN_BENCH_RUNS={runs}, \
         ERN_BENCH_SQL_RUNS={sql_runs}); {} cores; {patients} synthetic patients in \
         {REGISTRY} (`ern-registry demo` generator), k = {}, p = {}. Time per call as the \
         client sees it over loopback (authentication, rate limit, catch-up with the change \
         log, the index's scan, table assembly, cell suppression, the audit entry's commit); \
         median, 95th percentile (nearest rank) and slowest of {runs} calls after one \
         warm-up. The last column: the same call answered by SQL scans \
         (`--research-index=false`), median of {sql_runs}.\n\n",
        Utc::now().format("%Y-%m-%d"),
        if backend.starts_with("Postgre") {
            "ERN_BENCH_DATABASE_URL=postgres://... "
        } else {
            ""
        },
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        registry.min_cell_count,
        registry.protection_level,
    );
    out.push_str(
        "| query | median ms | p95 ms | slowest ms | cells | suppressed | SQL median ms |\n\
         |---|---:|---:|---:|---:|---:|---:|\n",
    );
    for (i, (q, t)) in queries().iter().zip(&indexed).enumerate() {
        let sql = scanned
            .as_ref()
            .map_or("-".to_string(), |s| format!("{:.0}", s[i].median));
        out.push_str(&format!(
            "| {} | {:.1} | {:.1} | {:.1} | {} | {} | {sql} |\n",
            q.name, t.median, t.p95, t.slowest, t.cells, t.suppressed
        ));
    }
    let worst_query = queries()
        .iter()
        .zip(&indexed)
        .filter(|(q, _)| !matches!(q.kind, Kind::Expertise(_)))
        .map(|(_, t)| t.p95)
        .fold(0.0, f64::max);
    let commonest = indexed[10].p95;
    let verdict = |ok: bool| if ok { "met" } else { "**not met**" };
    // The goals are for 1,000,000 patients, and p95 <= 500 ms at 10,000,000 (bench only);
    // the start-up goal is for 1,000,000 only.
    let budget_ms = if patients >= 10_000_000.0 {
        500.0
    } else {
        50.0
    };
    let start_verdict = if (patients - 1_000_000.0).abs() < 1.0 {
        verdict(load_seconds <= 5.0).to_string()
    } else {
        format!(
            "not judged at this size (the goal is for 1,000,000 patients; {:.2} s per million here)",
            load_seconds / (patients / 1_000_000.0).max(1e-9)
        )
    };
    out.push_str(&format!(
        "\nGoals of issue #15: every count and delay call p95 <= {budget_ms:.0} ms: {} (slowest p95 \
         {worst_query:.1} ms); expertise for the commonest diagnosis p95 <= {budget_ms:.0} ms: {} \
         ({commonest:.1} ms); index load at start-up <= 5 s: {} (two starts: the load took \
         {first_load:.2} s and {second_load:.2} s, the whole start {:.2} s and {:.2} s, using \
         {first_cpu:.1} s and {second_cpu:.1} s of CPU (all threads), while the machine's \
         load average was {load_average}; opening the database before them took {:.2} s, \
         migrations included); memory <= 64 \
         bytes per patient: {} ({per_patient:.1} bytes per patient by the \
         index's own accounting, {:.0} MiB for {patients} patients; the process's resident \
         memory grew by {:.0} MiB over the first start, which includes the database \
         connections' caches).\n",
        verdict(worst_query <= budget_ms),
        verdict(commonest <= budget_ms),
        start_verdict,
        first_build.as_secs_f64(),
        build.as_secs_f64(),
        migrated.as_secs_f64(),
        verdict(per_patient <= 64.0),
        bytes / 1024.0 / 1024.0,
        rss_after - rss_before,
    ));
    report::publish(&out);
}
