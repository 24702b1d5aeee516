//! `TestApp`: the real server on an ephemeral port, with its own fresh database.
//!
//! SQLite by default (a file in a temporary directory). With `ERN_TEST_DATABASE_URL`
//! set to a PostgreSQL URL (of a database the test user may `CREATE DATABASE` from, e.g.
//! `postgres://postgres@127.0.0.1:5433/postgres`), each app gets a fresh PostgreSQL
//! database instead, so the same tests run on both.
//!
//! The valid messages (record, submission, identifiers, consent) are the shared
//! `ern_registry::fixtures`, re-exported here so that `use crate::helpers::*` brings both.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use ern_registry::auth::{self, Role};
use ern_registry::clock::TestClock;
use ern_registry::config::ServeArgs;
use ern_registry::proto::case_service_client::CaseServiceClient;
use ern_registry::startup::Application;
use ern_registry::store::Store;
use ern_registry::store::db;
use ring::rand::SystemRandom;
use secrecy::ExposeSecret;
use sqlx::Connection;
use tempfile::TempDir;
use tokio::sync::oneshot;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

pub use ern_registry::fixtures::*;

/// Everything every test app logged, for tests that check what never reaches the log.
pub static LOGS: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct LogSink;

impl Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOGS.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn init_logging() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter("trace,h2=info,hyper=info,tower=info,sqlx=info")
            .with_writer(|| LogSink)
            .with_ansi(false)
            .try_init();
    });
}

pub fn logs() -> String {
    String::from_utf8_lossy(&LOGS.lock().unwrap()).into_owned()
}

pub type Client = CaseServiceClient<InterceptedService<Channel, Bearer>>;

#[derive(Clone)]
pub struct Bearer(pub Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

pub struct TestApp {
    pub addr: SocketAddr,
    pub store: Store,
    pub database_url: String,
    /// The server's clock: move it forward instead of sleeping until something expires.
    pub clock: Arc<TestClock>,
    pub dir: TempDir,
    /// Authentication work done by the server (Argon2 runs, key reads).
    pub auth: std::sync::Arc<auth::AuthCounters>,
    /// The server's API key hash (its master secret's pepper).
    pub key_hasher: std::sync::Arc<auth::KeyHasher>,
    /// The code releases the server checks against (refresh it after an import instead
    /// of waiting for the server's next look).
    pub codes: Arc<ern_registry::service::Codes>,
    /// The web console's address, when the app was started with `console_listen`.
    pub console: Option<SocketAddr>,
    /// The commands waiting in the server's writer queues.
    pub backlog: ern_registry::store::writer::Backlog,
    /// The server's turns of export pages per principal.
    pub export_turns: Arc<ern_registry::ratelimit::ItemGate>,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
}

/// The names of the tests' PostgreSQL databases: this, the creation time in seconds since
/// 1970, `_`, 16 random hex digits.
const TEST_DATABASE_PREFIX: &str = "ern_test_";

/// Once per test process: drops the test databases of earlier runs, those created more
/// than an hour ago (no run lasts that long) or named before the creation time was in
/// the name; one still in use is never dropped (DROP DATABASE refuses it). Tests leave
/// their databases behind (a failing test's is worth a look), and
/// a developer's PostgreSQL would otherwise collect them by the thousand.
async fn drop_leftover_databases(conn: &mut sqlx::PgConnection) {
    static DONE: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    DONE.get_or_init(|| async {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock after 1970")
            .as_secs();
        let names: Vec<String> =
            db::query("SELECT datname::text FROM pg_database WHERE datname LIKE 'ern\\_test\\_%'")
                .fetch_scalars(&mut *conn)
                .await
                .expect("list test databases");
        for name in names {
            let created = name
                .strip_prefix(TEST_DATABASE_PREFIX)
                .and_then(|rest| rest.split_once('_'))
                .and_then(|(secs, _)| secs.parse::<u64>().ok());
            if created.is_some_and(|c| now.saturating_sub(c) < 3600) {
                continue;
            }
            // Another run may be dropping it too, or still using an old-style one: skip.
            let _ = db::query(&format!("DROP DATABASE IF EXISTS {name}"))
                .execute(&mut *conn)
                .await;
        }
    })
    .await;
}

/// A fresh database URL: a SQLite file in `dir`, or a new PostgreSQL database.
pub async fn fresh_database(dir: &TempDir) -> String {
    match std::env::var("ERN_TEST_DATABASE_URL") {
        Ok(admin_url) if !admin_url.is_empty() => {
            let mut bytes = [0u8; 8];
            ring::rand::SecureRandom::fill(&SystemRandom::new(), &mut bytes).unwrap();
            let name: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            // Its creation time in the name, so that a later run can tell leftovers.
            let created = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock after 1970")
                .as_secs();
            let name = format!("{TEST_DATABASE_PREFIX}{created}_{name}");
            let mut conn = sqlx::PgConnection::connect(&admin_url)
                .await
                .expect("connect to test PostgreSQL");
            drop_leftover_databases(&mut conn).await;
            db::query(&format!("CREATE DATABASE {name}"))
                .execute(&mut conn)
                .await
                .expect("create test database");
            let (base, _) = admin_url
                .rsplit_once('/')
                .expect("URL with a database name");
            format!("{base}/{name}")
        }
        _ => format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("registry.db").display()
        ),
    }
}

impl TestApp {
    pub async fn spawn() -> TestApp {
        Self::spawn_with(ServeArgs::default()).await
    }

    pub async fn spawn_with(args: ServeArgs) -> TestApp {
        Self::spawn_via(args, |url| url.to_owned()).await
    }

    /// An app whose server reaches its fresh database at `route(url)` (e.g. through a
    /// proxy the test controls) instead of `url`; `database_url` stays the direct one.
    pub async fn spawn_via(args: ServeArgs, route: impl FnOnce(&str) -> String) -> TestApp {
        init_logging();
        let dir = tempfile::tempdir().unwrap();
        let database_url = fresh_database(&dir).await;
        Self::start(args, dir, database_url, route).await
    }

    /// An app on a database the test prepared (e.g. as an earlier version left it), with
    /// its master key file at `dir/master.key`.
    pub async fn spawn_on(dir: TempDir, database_url: String) -> TestApp {
        Self::spawn_on_with(ServeArgs::default(), dir, database_url).await
    }

    /// [`TestApp::spawn_on`] with `args`.
    pub async fn spawn_on_with(args: ServeArgs, dir: TempDir, database_url: String) -> TestApp {
        init_logging();
        Self::start(args, dir, database_url, |url| url.to_owned()).await
    }

    async fn start(
        mut args: ServeArgs,
        dir: TempDir,
        database_url: String,
        route: impl FnOnce(&str) -> String,
    ) -> TestApp {
        args.listen = "127.0.0.1:0".parse().unwrap();
        let key_file = dir.path().join("master.key");
        let clock = Arc::new(TestClock::new());
        let app =
            Application::build_with_clock(args, &route(&database_url), &key_file, clock.clone())
                .await
                .expect("application builds");
        let addr = app.local_addr();
        let console = app.console_addr();
        let store = app.store().clone();
        let (auth, key_hasher) = (app.auth_counters(), app.key_hasher());
        let codes = app.codes();
        let backlog = app.writer_backlog();
        let export_turns = app.export_turns();
        let (tx, rx) = oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            app.run_until_stopped(async {
                let _ = rx.await;
            })
            .await
            .expect("server runs");
        });
        TestApp {
            addr,
            store,
            database_url,
            clock,
            dir,
            auth,
            key_hasher,
            codes,
            console,
            backlog,
            export_turns,
            shutdown: Some(tx),
            server: Some(server),
        }
    }

    /// Stops this server and starts another with `args` on the same database and files.
    pub async fn restarted_with(mut self, args: ServeArgs) -> TestApp {
        self.stop_server().await;
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        let url = self.database_url.clone();
        Self::start(args, dir, url, |u| u.to_owned()).await
    }

    /// Stops the server and waits until it has drained.
    pub async fn stop(mut self) {
        self.stop_server().await;
    }

    /// Stops the server and waits until it has drained (releasing its lock on the data
    /// dir), keeping the data dir, for another server on the same files; `store` is
    /// connected again (the server closed it).
    pub async fn stop_server(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(server) = self.server.take() {
            server.await.unwrap();
            self.store = Store::connect(&self.database_url, 4).await.unwrap();
        }
    }

    pub fn is_sqlite(&self) -> bool {
        self.database_url.starts_with("sqlite:")
    }

    pub fn sqlite_files(&self) -> Vec<PathBuf> {
        let db = self.dir.path().join("registry.db");
        vec![
            db.clone(),
            db.with_extension("db-wal"),
            db.with_extension("db-shm"),
        ]
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .expect("connect to the test server")
    }

    pub async fn client(&self, token: Option<&str>) -> Client {
        let bearer = Bearer(token.map(|t| format!("Bearer {t}").parse().unwrap()));
        CaseServiceClient::with_interceptor(self.channel().await, bearer)
    }

    pub async fn centre(&self, code: &str, country: &str, erns: &[&str]) {
        let erns: Vec<String> = erns.iter().map(|s| s.to_string()).collect();
        self.store
            .create_centre(code, &format!("{code} hospital"), country, &erns)
            .await
            .unwrap();
    }

    /// Creates a principal and returns its API key.
    pub async fn principal(
        &self,
        name: &str,
        role: Role,
        centre: Option<&str>,
        erns: &[&str],
    ) -> String {
        let erns: Vec<String> = erns.iter().map(|s| s.to_string()).collect();
        let id = self
            .store
            .create_principal(name, role, centre, &erns)
            .await
            .unwrap();
        self.issue_key(id, None).await
    }

    /// Issues a key for an existing principal, expiring at `expires_at`.
    pub async fn issue_key(
        &self,
        principal_id: i64,
        expires_at: Option<chrono::DateTime<chrono::Utc>>,
    ) -> String {
        let issued = auth::issue_key(&SystemRandom::new(), &self.key_hasher).unwrap();
        self.store
            .insert_api_key(
                &issued.key_id,
                principal_id,
                &issued.secret_hash,
                expires_at,
            )
            .await
            .unwrap();
        issued.token.expose_secret().to_owned()
    }

    /// A centre in ERN-EYE and ERN-LUNG with a physician; returns the physician's client.
    pub async fn physician(&self, name: &str, centre: &str) -> Client {
        let token = self.physician_key(name, centre).await;
        self.client(Some(&token)).await
    }

    /// Creates a physician of `centre` (created in NL for ERN-EYE and ERN-LUNG if it does
    /// not exist yet) and returns its API key.
    pub async fn physician_key(&self, name: &str, centre: &str) -> String {
        if self
            .store
            .registry_by_code("ERN-EYE")
            .await
            .unwrap()
            .is_none()
        {
            panic!("registries not seeded");
        }
        let exists = db::query("SELECT 1 FROM centres WHERE code = $1")
            .bind(centre)
            .fetch_optional(self.store.pool())
            .await
            .unwrap()
            .is_some();
        if !exists {
            self.centre(centre, "NL", &["ERN-EYE", "ERN-LUNG"]).await;
        }
        self.principal(name, Role::Physician, Some(centre), &[])
            .await
    }

    /// The first two columns of every row `sql` gives (tests only; no parameters).
    pub async fn pairs<A: db::Decode, B: db::Decode>(&self, sql: &str) -> Vec<(A, B)> {
        db::query(sql)
            .fetch_all(self.store.pool())
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    }

    /// Counts rows of a table (tests only; the name is a literal).
    /// The pseudonym of the patient named by `ids` in `registry` under key version
    /// `key_version` (whether or not the registry has that version), with this app's
    /// master key.
    pub async fn pseudonym_under(
        &self,
        registry: &str,
        ids: &ern_registry::proto::PatientIdentifiers,
        key_version: u16,
    ) -> String {
        let master =
            ern_registry::keys::MasterSecret::load(&self.dir.path().join("master.key")).unwrap();
        let registry = self
            .store
            .registry_by_code(registry)
            .await
            .unwrap()
            .unwrap();
        let identity = ern_registry::api::convert::patient_identity(ids).unwrap();
        ern_registry::pseudonym::Pseudonymiser::new(&master)
            .derive(
                ern_registry::pseudonym::RegistryRef {
                    key_version,
                    ..registry.key_ref().unwrap()
                },
                &identity,
            )
            .to_string()
    }

    pub async fn count(&self, table: &str) -> i64 {
        db::query(&format!("SELECT COUNT(*) FROM {table}"))
            .fetch_one(self.store.pool())
            .await
            .unwrap()
            .try_get::<i64>(0)
            .unwrap()
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// A pseudo-random delay below `max_micros` µs, fixed by `seed`: spreads the tasks of a
/// race test so that both orders happen.
pub fn jitter(seed: u64, max_micros: u64) -> std::time::Duration {
    let x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    std::time::Duration::from_micros((x >> 33) % max_micros)
}

/// A loopback port free at the time of the call, for a server binary started by a test.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Field paths of an INVALID_ARGUMENT status.
pub fn violations(status: &tonic::Status) -> Vec<String> {
    use tonic_types::StatusExt;
    status
        .get_error_details()
        .bad_request()
        .map(|b| b.field_violations.iter().map(|v| v.field.clone()).collect())
        .unwrap_or_default()
}

pub type OfficerClient = ern_registry::proto::consent_service_client::ConsentServiceClient<
    InterceptedService<Channel, Bearer>,
>;

impl TestApp {
    /// A consent officer acting for `erns` (no centre); returns their client.
    pub async fn officer(&self, name: &str, erns: &[&str]) -> OfficerClient {
        let token = self.principal(name, Role::ConsentOfficer, None, erns).await;
        let bearer = Bearer(Some(format!("Bearer {token}").parse().unwrap()));
        ern_registry::proto::consent_service_client::ConsentServiceClient::with_interceptor(
            self.channel().await,
            bearer,
        )
    }
}

impl TestApp {
    /// SQL for the instant `ms` milliseconds after the Unix epoch, as an operator writes it
    /// on the test's database: a TIMESTAMPTZ on PostgreSQL, integer milliseconds on SQLite
    /// (`store::db`).
    pub fn instant_sql(&self, ms: i64) -> String {
        match self.store.backend() {
            ern_registry::store::Backend::Sqlite => ms.to_string(),
            ern_registry::store::Backend::Postgres => {
                format!("(TIMESTAMPTZ 'epoch' + {ms} * INTERVAL '1 millisecond')")
            }
        }
    }

    /// SQL for the instant in `column` one millisecond later.
    pub fn one_ms_later(&self, column: &str) -> String {
        match self.store.backend() {
            ern_registry::store::Backend::Sqlite => format!("{column} + 1"),
            ern_registry::store::Backend::Postgres => {
                format!("{column} + INTERVAL '1 millisecond'")
            }
        }
    }
}

/// Makes every audit entry of `method` fail to be written (a trigger named `audit_fail`
/// on `audit_log`, on either database), as a full disk or a broken log would.
pub async fn fail_audit_entries_of(app: &TestApp, method: &str) {
    // `method` is the test's own constant, never input.
    let sql = if app.is_sqlite() {
        format!(
            "CREATE TRIGGER audit_fail BEFORE INSERT ON audit_log \
             WHEN NEW.method = '{method}' \
             BEGIN SELECT RAISE(ABORT, 'audit blocked'); END;"
        )
    } else {
        format!(
            "CREATE FUNCTION audit_fail() RETURNS trigger AS $$ \
             BEGIN IF NEW.method = '{method}' THEN \
             RAISE EXCEPTION 'audit blocked'; END IF; RETURN NEW; END $$ LANGUAGE plpgsql; \
             CREATE TRIGGER audit_fail BEFORE INSERT ON audit_log \
             FOR EACH ROW EXECUTE FUNCTION audit_fail();"
        )
    };
    app.store
        .pool()
        .execute_raw(&sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// The server's writer held: its next transaction cannot take a lock it needs until
/// [`HeldWriter::release`] (SQLite: another connection's write transaction, for up to the
/// writer's busy timeout of 10 s; PostgreSQL: the audit chain head's row).
pub enum HeldWriter {
    Sqlite(rusqlite::Connection),
    Postgres(db::Conn),
}

impl HeldWriter {
    pub async fn hold(app: &TestApp) -> HeldWriter {
        if let Some(path) = app.store.sqlite_path() {
            let other = rusqlite::Connection::open(path).unwrap();
            other.execute_batch("BEGIN IMMEDIATE").unwrap();
            return HeldWriter::Sqlite(other);
        }
        let mut conn = app.store.pool().acquire().await.unwrap();
        db::query("BEGIN").execute(&mut conn.db()).await.unwrap();
        db::query("SELECT seq FROM audit_head WHERE id = 1 FOR UPDATE")
            .fetch_all(&mut conn.db())
            .await
            .unwrap();
        HeldWriter::Postgres(conn)
    }

    /// Fills the held writer's queue with calls made by `call`, each in a task of its own
    /// (held until the writer is released): once it returns, a command finds no room.
    /// A call goes at a time, each given time to reach the writer (its transaction, or
    /// its queue) before the next, until the queue is full.
    pub async fn fill<F, Fut>(
        &self,
        app: &TestApp,
        mut call: F,
    ) -> Vec<tokio::task::JoinHandle<Fut::Output>>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future + Send + 'static,
        Fut::Output: Send + 'static,
    {
        let full = || {
            let queues = app.backlog.queued();
            !queues.is_empty() && queues.iter().all(|&(waiting, size)| waiting == size)
        };
        let mut held = Vec::new();
        for _ in 0..20 {
            held.push(tokio::spawn(call()));
            for _ in 0..100 {
                if full() {
                    return held;
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
        panic!(
            "the writer's queue did not fill: {:?}",
            app.backlog.queued()
        );
    }

    pub async fn release(self) {
        match self {
            HeldWriter::Sqlite(other) => other.execute_batch("ROLLBACK").unwrap(),
            HeldWriter::Postgres(mut conn) => {
                db::query("ROLLBACK").execute(&mut conn.db()).await.unwrap();
            }
        }
    }
}

/// The server binary as a child process on a [`TestApp`]'s files (its database and master
/// key; the app's own server stopped first), on a port of its own; killed when dropped.
pub struct ServerProcess {
    pub child: std::process::Child,
}

impl ServerProcess {
    /// Starts `serve`, with `configure` adding to its command (environment, standard
    /// error), and waits until it takes connections: then a channel to it.
    pub async fn start(
        app: &TestApp,
        configure: impl FnOnce(&mut std::process::Command),
    ) -> (ServerProcess, Channel) {
        let port = free_port();
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_ern-registry"));
        command
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .env("DATABASE_URL", &app.database_url)
            .env("ERN_DATA_DIR", app.dir.path())
            .env_remove("ERN_MASTER_PASSPHRASE")
            .env_remove("ERN_MASTER_PASSPHRASE_FILE")
            .env_remove("ERN_MASTER_KEY_FILE")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null());
        configure(&mut command);
        let mut server = ServerProcess {
            child: command.spawn().expect("the binary starts"),
        };
        let started = std::time::Instant::now();
        loop {
            let connected = Channel::from_shared(format!("http://127.0.0.1:{port}"))
                .unwrap()
                .connect()
                .await;
            if let Ok(channel) = connected {
                return (server, channel);
            }
            if let Some(exit) = server.child.try_wait().unwrap() {
                panic!("the server exited before it listened: {exit}");
            }
            assert!(
                started.elapsed() < std::time::Duration::from_secs(60),
                "the server did not listen"
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    /// Kills it at once (SIGKILL: no shutdown, nothing flushed) and waits for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
