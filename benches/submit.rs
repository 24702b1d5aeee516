//! Submission-path benchmark, with the raw limits beside it, measured in the same run.
//!
//! `cargo bench --bench submit` (SQLite), or with `ERN_BENCH_DATABASE_URL=postgres://...`
//! (a database the user may CREATE DATABASE from) for PostgreSQL. Writes a section to
//! `docs/benchmarks.md` (`ERN_BENCH_WRITE=0` to only print). Sizes scale with
//! `ERN_BENCH_SECONDS` (default 5 per figure).
//!
//! Figures:
//! - raw HMAC: pseudonym derivations per second on one core (the crypto limit);
//! - empty gRPC call: health checks per second over loopback (the transport limit);
//! - raw insert: case rows per second, inserted in transactions of 512 rows straight
//!   through sqlx (the storage limit with group commit);
//! - unary submissions: SubmitCase calls per second from concurrent clients, p50/p99;
//! - bulk stream: records per second through SubmitCases.

#[path = "common/report.rs"]
mod report;

use ern_registry::store::db;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chrono::Utc;
use ern_registry::auth::{self, Role};
use ern_registry::config::ServeArgs;
use ern_registry::fixtures;
use ern_registry::keys::MasterSecret;
use ern_registry::proto::{self, case_service_client::CaseServiceClient};
use ern_registry::pseudonym::{PatientIdentity, Pseudonymiser, RegistryRef};
use ern_registry::startup::Application;
use ern_registry::store::{cases, writer_sql};
use ring::rand::SystemRandom;
use secrecy::ExposeSecret;
use sqlx::Connection;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

fn seconds() -> f64 {
    std::env::var("ERN_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5.0)
}

/// Seeds handed out so far: every submission of a run is a different patient.
static NEXT_SEED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The shared valid submission (`ern_registry::fixtures`) of a patient per seed; distinct
/// seeds (below 9,000,000) are distinct patients.
fn submission(seed: u64) -> proto::SubmitCaseRequest {
    fixtures::submission("ERN-LUNG", patient(seed))
}

fn patient(seed: u64) -> proto::PatientIdentifiers {
    fixtures::national("NL", &fixtures::bsn((seed % 9_000_000) as u32))
}

struct Figure {
    name: &'static str,
    per_second: f64,
    detail: String,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn bench_hmac() -> Figure {
    let master = MasterSecret::from_bytes([7u8; 32]);
    let p = Pseudonymiser::new(&master);
    let registry = RegistryRef {
        seq: 13,
        code: "ERN-LUNG",
        key_version: 1,
    };
    let identities: Vec<PatientIdentity> = (0..1000)
        .map(|i| ern_registry::api::convert::patient_identity(&patient(i)).expect("valid"))
        .collect();
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed().as_secs_f64() < seconds() / 2.0 {
        for id in &identities {
            std::hint::black_box(p.derive(registry, id));
        }
        n += identities.len() as u64;
    }
    Figure {
        name: "raw HMAC (pseudonym derivation, 1 core)",
        per_second: n as f64 / start.elapsed().as_secs_f64(),
        detail: "normalise + encode + HMAC-SHA256 + format".into(),
    }
}

async fn bench_empty_grpc(channel: Channel, concurrency: usize) -> Figure {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let mut client = HealthClient::new(channel.clone());
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                client
                    .check(HealthCheckRequest::default())
                    .await
                    .expect("health");
                n += 1;
            }
            n
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(seconds())).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for t in tasks {
        total += t.await.expect("task");
    }
    Figure {
        name: "empty gRPC call (health check)",
        per_second: total as f64 / start.elapsed().as_secs_f64(),
        detail: format!("{concurrency} concurrent callers, one HTTP/2 connection"),
    }
}

async fn bench_raw_insert(app: &Application) -> Figure {
    // The row of the fixture's record: what a unary submission of it stores.
    let record = ern_registry::api::convert::case_record(&fixtures::record(), fixtures::today())
        .expect("valid");
    let row = cases::to_row(&record);
    let centre: i64 = db::query("SELECT id FROM centres WHERE code = 'BENCH'")
        .fetch_scalar(app.store().pool())
        .await
        .expect("centre");
    let principal: i64 = db::query("SELECT id FROM principals WHERE name = 'bench'")
        .fetch_scalar(app.store().pool())
        .await
        .expect("principal");
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed().as_secs_f64() < seconds() {
        let mut tx = app.store().pool().begin().await.expect("begin");
        for _ in 0..512 {
            writer_sql::insert_case(
                &mut tx.db(),
                12,
                &format!("RAW-{n}"),
                centre,
                principal,
                &row,
                Utc::now(),
            )
            .await
            .expect("insert");
            n += 1;
        }
        tx.commit().await.expect("commit");
    }
    Figure {
        name: "raw insert (case + version + gene rows, 512 per transaction)",
        per_second: n as f64 / start.elapsed().as_secs_f64(),
        detail: "straight through sqlx, durable commits".into(),
    }
}

type AddKey =
    Box<dyn FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Send>;
type Client = CaseServiceClient<tonic::service::interceptor::InterceptedService<Channel, AddKey>>;

fn client(channel: Channel, token: &str) -> Client {
    let value: tonic::metadata::MetadataValue<_> =
        format!("Bearer {token}").parse().expect("ascii");
    let f: AddKey = Box::new(move |mut req: tonic::Request<()>| {
        req.metadata_mut().insert("authorization", value.clone());
        Ok(req)
    });
    CaseServiceClient::with_interceptor(channel, f)
}

async fn bench_unary(channels: &[Channel], token: &str, concurrency: usize) -> Figure {
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..concurrency {
        let mut c = client(channels[t % channels.len()].clone(), token);
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let seed = NEXT_SEED.fetch_add(1, Ordering::Relaxed);
                let t0 = Instant::now();
                c.submit_case(submission(seed)).await.expect("submit");
                latencies.push(t0.elapsed());
            }
            latencies
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(seconds())).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("task"));
    }
    let elapsed = start.elapsed().as_secs_f64();
    all.sort();
    Figure {
        name: "unary SubmitCase",
        per_second: all.len() as f64 / elapsed,
        detail: format!(
            "{concurrency} concurrent callers over {} connections; p50 {:.2} ms, p99 {:.2} ms",
            channels.len(),
            percentile(&all, 0.5).as_secs_f64() * 1e3,
            percentile(&all, 0.99).as_secs_f64() * 1e3
        ),
    }
}

async fn bench_bulk(channel: Channel, token: &str, streams: usize) -> Figure {
    let per_stream = (seconds() * 4000.0) as u64;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..streams {
        let mut c = client(channel.clone(), token);
        tasks.push(tokio::spawn(async move {
            let first = NEXT_SEED.fetch_add(per_stream, Ordering::Relaxed);
            let reqs = (first..first + per_stream).map(submission);
            let mut out = c
                .submit_cases(tokio_stream::iter(reqs))
                .await
                .expect("stream")
                .into_inner();
            let mut ok = 0u64;
            while let Some(r) = out.next().await {
                if let Some(proto::submit_cases_result::Outcome::Accepted(_)) =
                    r.expect("result").outcome
                {
                    ok += 1;
                }
            }
            ok
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.expect("task");
    }
    Figure {
        name: "bulk SubmitCases stream",
        per_second: total as f64 / start.elapsed().as_secs_f64(),
        detail: format!("{streams} streams x {per_stream} records"),
    }
}

async fn database_url(dir: &std::path::Path) -> (String, &'static str) {
    match std::env::var("ERN_BENCH_DATABASE_URL") {
        Ok(admin) if !admin.is_empty() => {
            let name = format!("ern_bench_{}", std::process::id());
            let mut conn = sqlx::PgConnection::connect(&admin).await.expect("connect");
            db::query(&format!("DROP DATABASE IF EXISTS {name}"))
                .execute(&mut conn)
                .await
                .expect("drop");
            db::query(&format!("CREATE DATABASE {name}"))
                .execute(&mut conn)
                .await
                .expect("create");
            let (base, _) = admin.rsplit_once('/').expect("db name");
            (format!("{base}/{name}"), "PostgreSQL")
        }
        _ => (
            format!("sqlite://{}?mode=rwc", dir.join("bench.db").display()),
            "SQLite (WAL, synchronous=FULL)",
        ),
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
    let dir = tempfile::tempdir().expect("tempdir");
    let (url, backend) = database_url(dir.path()).await;
    let args = ServeArgs {
        listen: "127.0.0.1:0".parse().expect("addr"),
        // The benchmark is one principal submitting as fast as it can.
        derivations_per_minute: 10_000_000,
        max_calls_in_flight: 1024,
        ..ServeArgs::default()
    };
    let app = Application::build(args, &url, &dir.path().join("master.key"))
        .await
        .expect("app");
    let store = app.store().clone();
    store
        .create_centre("BENCH", "Bench centre", "NL", &["ERN-LUNG".into()])
        .await
        .expect("centre");
    let pid = store
        .create_principal("bench", Role::Physician, Some("BENCH"), &[])
        .await
        .expect("principal");
    let issued = auth::issue_key(&SystemRandom::new(), &app.key_hasher()).expect("key");
    store
        .insert_api_key(&issued.key_id, pid, &issued.secret_hash, None)
        .await
        .expect("key");
    let token = issued.token.expose_secret().to_owned();

    let mut figures = vec![bench_hmac()];
    figures.push(bench_raw_insert(&app).await);
    let addr = app.local_addr();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(async {
        let _ = stop_rx.await;
    }));
    let connect = || async {
        Channel::from_shared(format!("http://{addr}"))
            .expect("uri")
            .connect()
            .await
            .expect("connect")
    };
    let channel = connect().await;
    figures.push(bench_empty_grpc(channel.clone(), 64).await);
    let mut channels = Vec::new();
    for _ in 0..4 {
        channels.push(connect().await);
    }
    figures.push(bench_unary(&channels, &token, 1).await);
    figures.push(bench_unary(&channels, &token, 256).await);
    figures.push(bench_bulk(channel.clone(), &token, 4).await);
    let _ = stop_tx.send(());
    let _ = server.await;

    let empty = figures[2].per_second;
    let insert = figures[1].per_second;
    let hmac = figures[0].per_second;
    let mut out = String::new();
    out.push_str(&format!(
        "\n## {backend}, {}\n\nCommand: `{}cargo bench --bench submit` (ERN_BENCH_SECONDS={}); {} cores.\n\n",
        Utc::now().format("%Y-%m-%d"),
        if backend.starts_with("Postgre") {
            "ERN_BENCH_DATABASE_URL=postgres://... "
        } else {
            ""
        },
        seconds(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    ));
    out.push_str("| figure | per second | vs empty gRPC | vs raw insert | vs raw HMAC | detail |\n|---|---:|---:|---:|---:|---|\n");
    for f in &figures {
        out.push_str(&format!(
            "| {} | {:.0} | {:.2} | {:.2} | {:.3} | {} |\n",
            f.name,
            f.per_second,
            f.per_second / empty,
            f.per_second / insert,
            f.per_second / hmac,
            f.detail
        ));
    }
    report::publish(&out);
}
