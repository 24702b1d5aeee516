//! A database outage as clients see it: the server reaches PostgreSQL through a TCP proxy
//! the test controls, which cuts every connection (and refuses new ones) and then lets
//! them through again. While it is cut, calls are UNAVAILABLE with a retry hint (never
//! INTERNAL or CANCELLED) and health is NOT_SERVING; once it is back, SERVING and calls
//! succeed again, with no restart.
//!
//! PostgreSQL only (`ERN_TEST_DATABASE_URL`); on SQLite the test says it is skipped. An
//! embedded database has no network to lose: its "not now" (SQLITE_BUSY past the busy
//! timeout) is held by the store's `sqlite_busy_is_unavailable` unit test.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ern_registry::config::ServeArgs;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use tonic_types::StatusExt;

use crate::helpers::{TestApp, bsn, get_case, national, submission};

/// A TCP proxy to the database that can be cut and restored.
struct Proxy {
    addr: SocketAddr,
    /// `true` while cut; behind the same lock as the links, so that no link is opened
    /// between a cut's flag and its aborts.
    links: Arc<Mutex<(bool, Vec<JoinHandle<()>>)>>,
    /// Armed by [`Proxy::lose_next_commit`].
    lose_commit: Arc<AtomicBool>,
    /// How long the link stays open after the lost COMMIT is passed on, in ms.
    lose_after: Arc<AtomicU64>,
    accept: JoinHandle<()>,
}

/// Relays one connection. When `lose_commit` is armed, the next COMMIT a client sends
/// reaches the database, but its answer never reaches the client: the link is closed
/// `lose_after` ms later (the connection broke "after COMMIT").
async fn relay(
    client: TcpStream,
    server: TcpStream,
    lose_commit: Arc<AtomicBool>,
    lose_after: Arc<AtomicU64>,
) {
    let (mut from_client, mut to_client) = client.into_split();
    let (mut from_server, mut to_server) = server.into_split();
    let mute = Arc::new(AtomicBool::new(false));
    let muted = mute.clone();
    let down = async move {
        let mut buf = vec![0u8; 16 * 1024];
        while let Ok(n @ 1..) = from_server.read(&mut buf).await {
            // Muted: still read, so that the database is never held up writing.
            if !muted.load(Ordering::SeqCst) && to_client.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
    };
    let up = async move {
        let mut buf = vec![0u8; 16 * 1024];
        while let Ok(n @ 1..) = from_client.read(&mut buf).await {
            // The simple query `COMMIT` (sqlx ends a transaction so): 'Q', its length, text.
            const COMMIT: &[u8] = b"Q\0\0\0\x0bCOMMIT\0";
            let commit = buf[..n].windows(COMMIT.len()).any(|w| w == COMMIT);
            if commit && lose_commit.swap(false, Ordering::SeqCst) {
                mute.store(true, Ordering::SeqCst);
                let _ = to_server.write_all(&buf[..n]).await;
                let after = lose_after.load(Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(after)).await;
                return;
            }
            if to_server.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
    };
    tokio::select! {
        _ = down => {}
        _ = up => {}
    }
}

impl Proxy {
    async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let links: Arc<Mutex<(bool, Vec<JoinHandle<()>>)>> = Arc::default();
        let shared = links.clone();
        let lose_commit = Arc::new(AtomicBool::new(false));
        let armed = lose_commit.clone();
        let lose_after = Arc::new(AtomicU64::new(0));
        let after = lose_after.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let mut links = shared.lock().unwrap();
                if links.0 {
                    // Cut: the connection is closed at once.
                    drop(client);
                    continue;
                }
                let (armed, after) = (armed.clone(), after.clone());
                links.1.push(tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(target).await {
                        relay(client, server, armed, after).await;
                    }
                }));
            }
        });
        Proxy {
            addr,
            links,
            lose_commit,
            lose_after,
            accept,
        }
    }

    /// The next COMMIT reaches the database but its answer is lost with its connection,
    /// closed `after` it was passed on.
    fn lose_next_commit(&self, after: Duration) {
        self.lose_after
            .store(after.as_millis() as u64, Ordering::SeqCst);
        self.lose_commit.store(true, Ordering::SeqCst);
    }

    fn commit_lost(&self) -> bool {
        !self.lose_commit.load(Ordering::SeqCst)
    }

    /// Closes every open connection; new ones are closed as soon as they are accepted.
    fn cut(&self) {
        let mut links = self.links.lock().unwrap();
        links.0 = true;
        for link in links.1.drain(..) {
            link.abort();
        }
    }

    fn restore(&self) {
        self.links.lock().unwrap().0 = false;
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

/// `url` with its host and port replaced by `addr`.
fn through(url: &str, addr: SocketAddr) -> String {
    let (scheme, rest) = url.split_once("://").unwrap();
    let (user, rest) = match rest.split_once('@') {
        Some((user, rest)) => (format!("{user}@"), rest),
        None => (String::new(), rest),
    };
    let path = rest.find('/').map_or("", |i| &rest[i..]);
    format!("{scheme}://{user}{addr}{path}")
}

/// The host and port of a database URL.
async fn target(url: &str) -> SocketAddr {
    let rest = url.split_once("://").unwrap().1;
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    let host = rest.split('/').next().unwrap();
    let host = if host.contains(':') {
        host.to_owned()
    } else {
        format!("{host}:5432")
    };
    tokio::net::lookup_host(host).await.unwrap().next().unwrap()
}

async fn health(client: &mut HealthClient<tonic::transport::Channel>, service: &str) -> i32 {
    client
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
}

/// Waits until the server and every service report `status`.
async fn until_health(
    client: &mut HealthClient<tonic::transport::Channel>,
    status: ServingStatus,
    within: Duration,
) {
    let started = Instant::now();
    let services = [
        "",
        "ern_registry.v1.CaseService",
        "ern_registry.v1.ConsentService",
        "ern_registry.v1.ResearchService",
        "ern_registry.v1.AdminService",
    ];
    loop {
        let mut all = true;
        for service in services {
            all &= health(client, service).await == status as i32;
        }
        if all {
            return;
        }
        assert!(
            started.elapsed() < within,
            "health did not turn {status:?} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Submits the case of patient `seed` and returns its pseudonym, with a health client
/// that has seen the server SERVING.
async fn first_case_and_a_serving_probe(
    app: &TestApp,
    dr: &mut crate::helpers::Client,
    seed: u32,
) -> (String, HealthClient<tonic::transport::Channel>) {
    let pseudonym = dr
        .submit_case(submission("ERN-LUNG", national("NL", &bsn(seed))))
        .await
        .unwrap()
        .into_inner()
        .pseudonym;
    let mut probe = HealthClient::new(app.channel().await);
    until_health(&mut probe, ServingStatus::Serving, Duration::ZERO).await;
    (pseudonym, probe)
}

fn assert_unavailable_with_retry_hint(status: &tonic::Status) {
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let retry = status
        .get_error_details()
        .retry_info()
        .and_then(|r| r.retry_delay)
        .expect("a RetryInfo with a delay");
    assert!(retry > Duration::ZERO && retry <= Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_is_unavailable_with_a_retry_hint_and_not_serving_until_it_is_back() {
    let Some(admin_url) = std::env::var("ERN_TEST_DATABASE_URL")
        .ok()
        .filter(|u| !u.is_empty())
    else {
        eprintln!(
            "skipped: needs PostgreSQL (ERN_TEST_DATABASE_URL); SQLite's case is the store's \
             sqlite_busy_is_unavailable"
        );
        return;
    };
    let proxy = Proxy::start(target(&admin_url).await).await;
    let app = TestApp::spawn_via(ServeArgs::default(), |url| through(url, proxy.addr)).await;
    let mut dr = app.physician("dr-outage", "NL-OUTAGE").await;
    let (pseudonym, mut probe) = first_case_and_a_serving_probe(&app, &mut dr, 5100).await;

    proxy.cut();
    // At once, before the probe has noticed: the pool's connections are dead and new ones
    // are cut. UNAVAILABLE, promptly, with a retry hint.
    let started = Instant::now();
    let status = dr
        .get_case(get_case("ERN-LUNG", &pseudonym))
        .await
        .unwrap_err();
    assert_unavailable_with_retry_hint(&status);
    assert!(
        started.elapsed() < Duration::from_secs(12),
        "{:?}",
        started.elapsed()
    );

    until_health(
        &mut probe,
        ServingStatus::NotServing,
        Duration::from_secs(5),
    )
    .await;
    // Known to be away: refused at once, reads and writes alike.
    for _ in 0..3 {
        let started = Instant::now();
        let status = dr
            .submit_case(submission("ERN-LUNG", national("NL", &bsn(5101))))
            .await
            .unwrap_err();
        assert_unavailable_with_retry_hint(&status);
        let status = dr
            .get_case(get_case("ERN-LUNG", &pseudonym))
            .await
            .unwrap_err();
        assert_unavailable_with_retry_hint(&status);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
    }

    proxy.restore();
    until_health(&mut probe, ServingStatus::Serving, Duration::from_secs(5)).await;
    dr.get_case(get_case("ERN-LUNG", &pseudonym))
        .await
        .expect("served again once the database is back");
    dr.submit_case(submission("ERN-LUNG", national("NL", &bsn(5101))))
        .await
        .expect("writes again once the database is back");
    app.stop().await;
}

/// A COMMIT that reached PostgreSQL but whose answer was lost (the connection broke): the
/// writer asks the database whether the batch landed, on another connection, and answers
/// as committed. Applied again, it would have been stored twice or, alone, answered
/// UNAVAILABLE with a second entry saying it failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_whose_answer_is_lost_is_answered_by_what_the_database_holds() {
    let Some(admin_url) = std::env::var("ERN_TEST_DATABASE_URL")
        .ok()
        .filter(|u| !u.is_empty())
    else {
        eprintln!("skipped: needs PostgreSQL (ERN_TEST_DATABASE_URL)");
        return;
    };
    let proxy = Proxy::start(target(&admin_url).await).await;
    let app = TestApp::spawn_via(ServeArgs::default(), |url| through(url, proxy.addr)).await;
    let mut dr = app.physician("dr-commit", "NL-COMMIT").await;
    first_case_and_a_serving_probe(&app, &mut dr, 5200).await;
    let submissions = "SELECT COUNT(*), COALESCE(SUM(CASE WHEN outcome = 'OK' THEN 1 ELSE 0 END), 0) \
                       FROM audit_log WHERE method LIKE '%SubmitCase'";
    let before: Vec<(i64, i64)> = app.pairs(submissions).await;
    assert_eq!(before, vec![(1, 1)]);

    // Answer lost after the commit is done.
    proxy.lose_next_commit(Duration::from_millis(500));
    let stored = dr
        .submit_case(submission("ERN-LUNG", national("NL", &bsn(5201))))
        .await
        .expect("the database committed it: answered as stored");
    assert!(
        proxy.commit_lost(),
        "the write's COMMIT went through the proxy"
    );
    assert_eq!(app.count("cases").await, 2);
    // One entry for the call, saying OK: none for a failure that did not happen.
    assert_eq!(app.pairs::<i64, i64>(submissions).await, vec![(2, 2)]);
    // And the case is there, under the pseudonym returned.
    dr.get_case(get_case("ERN-LUNG", &stored.into_inner().pseudonym))
        .await
        .expect("the case answered as stored is stored");

    // Answer lost while the commit is still under way (a deferred trigger makes it take a
    // second): the check waits for it instead of taking it for a failure and applying the
    // write again.
    app.store
        .pool()
        .execute_raw(
            "CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN PERFORM pg_sleep(1); RETURN NULL; END $$; \
             CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON audit_log \
             DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit()",
        )
        .await
        .unwrap();
    proxy.lose_next_commit(Duration::ZERO);
    dr.submit_case(submission("ERN-LUNG", national("NL", &bsn(5202))))
        .await
        .expect("committed after its answer was lost: answered as stored");
    assert!(proxy.commit_lost());
    app.store
        .pool()
        .execute_raw("DROP TRIGGER slow_commit ON audit_log; DROP FUNCTION slow_commit()")
        .await
        .unwrap();
    assert_eq!(app.count("cases").await, 3);
    assert_eq!(app.pairs::<i64, i64>(submissions).await, vec![(3, 3)]);

    let head = app
        .store
        .verify_audit(&app.audit_key())
        .await
        .unwrap()
        .expect("the audit chain verifies");
    assert!(head.head_seq >= 3);
    app.stop().await;
}

/// A PostgreSQL cluster of the test's own (initdb + pg_ctl in a temp dir, loopback only),
/// so that stopping it disturbs no other test. Needs `ERN_TEST_PG_BIN` (the directory of
/// `initdb` and `pg_ctl`; `scripts/test` sets it) and, when the tests run as root,
/// `ERN_TEST_PG_USER` (the user the cluster runs as: initdb refuses root).
struct OwnPostgres {
    bin: std::path::PathBuf,
    user: Option<String>,
    dir: tempfile::TempDir,
    port: u16,
}

impl OwnPostgres {
    fn from_env() -> Option<OwnPostgres> {
        let bin = std::env::var("ERN_TEST_PG_BIN")
            .ok()
            .filter(|b| !b.is_empty())?;
        let user = std::env::var("ERN_TEST_PG_USER")
            .ok()
            .filter(|u| !u.is_empty());
        let dir = tempfile::tempdir().unwrap();
        if let Some(user) = &user {
            let chowned = std::process::Command::new("chown")
                .arg(user)
                .arg(dir.path())
                .status()
                .unwrap();
            assert!(chowned.success());
        }
        let pg = OwnPostgres {
            bin: bin.into(),
            user,
            dir,
            port: crate::helpers::free_port(),
        };
        pg.run(
            "initdb",
            &[
                "-D",
                &pg.data(),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
            ],
        );
        pg.start();
        Some(pg)
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let tool = self.bin.join(tool);
        let mut command = match &self.user {
            Some(user) => {
                let mut c = std::process::Command::new("runuser");
                c.args(["-u", user, "--"]).arg(&tool);
                c
            }
            None => std::process::Command::new(&tool),
        };
        let out = command.args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{} {args:?}: {}",
            tool.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn start(&self) {
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {}",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("log").display().to_string();
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data(),
                "-l",
                &log,
                "-w",
                "-o",
                &options,
                "start",
            ],
        );
    }

    /// A real shutdown: sessions are told so (57P01) and the port closes.
    fn stop(&self) {
        self.run("pg_ctl", &["-D", &self.data(), "-m", "fast", "-w", "stop"]);
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        let _ = std::process::Command::new(match &self.user {
            Some(_) => "runuser".into(),
            None => self.bin.join("pg_ctl"),
        })
        .args(match &self.user {
            Some(user) => vec![
                "-u".to_owned(),
                user.clone(),
                "--".to_owned(),
                self.bin.join("pg_ctl").display().to_string(),
            ],
            None => vec![],
        })
        .args(["-D", &self.data(), "-m", "immediate", "stop"])
        .output();
    }
}

/// The real thing: PostgreSQL itself is stopped (`pg_ctl stop -m fast`) and started again
/// while eight callers submit and read (a millisecond between calls). Every call that fails says
/// UNAVAILABLE (never INTERNAL, CANCELLED or UNKNOWN), health is NOT_SERVING while the
/// database is down and SERVING once it is back, and calls succeed again with no restart
/// of the service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_stopped_and_started_under_load_is_unavailable_then_served_again() {
    let Some(pg) = OwnPostgres::from_env() else {
        eprintln!("skipped: needs ERN_TEST_PG_BIN (scripts/test sets it)");
        return;
    };
    let app = TestApp::spawn_on(tempfile::tempdir().unwrap(), pg.url()).await;
    let token = app.physician_key("dr-restart", "NL-RESTART").await;
    let mut dr = app.client(Some(&token)).await;
    let (pseudonym, mut probe) = first_case_and_a_serving_probe(&app, &mut dr, 6100).await;

    #[derive(Default)]
    struct Seen {
        ok: u64,
        failed: Vec<Code>,
    }
    let seen = Arc::new(Mutex::new(Seen::default()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut callers = tokio::task::JoinSet::new();
    for caller in 0..8u32 {
        let (seen, stop) = (seen.clone(), stop.clone());
        let mut client = app.client(Some(&token)).await;
        let pseudonym = pseudonym.clone();
        callers.spawn(async move {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let result = if caller % 2 == 0 {
                    i += 1;
                    let patient = 6200 + caller * 100_000 + i;
                    client
                        .submit_case(submission("ERN-LUNG", national("NL", &bsn(patient))))
                        .await
                        .map(drop)
                } else {
                    client
                        .get_case(get_case("ERN-LUNG", &pseudonym))
                        .await
                        .map(drop)
                };
                {
                    let mut seen = seen.lock().unwrap();
                    match result {
                        Ok(()) => seen.ok += 1,
                        Err(status) => seen.failed.push(status.code()),
                    }
                }
                // A moment between calls, so that those refused at once while the
                // database is known to be down do not spin.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        });
    }
    let ok_now = |seen: &Arc<Mutex<Seen>>| seen.lock().unwrap().ok;
    let until_more_ok = |seen: Arc<Mutex<Seen>>, more: u64| async move {
        let from = ok_now(&seen);
        let started = Instant::now();
        while ok_now(&seen) < from + more {
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "calls did not succeed"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    until_more_ok(seen.clone(), 50).await;

    pg.stop();
    until_health(
        &mut probe,
        ServingStatus::NotServing,
        Duration::from_secs(10),
    )
    .await;
    let status = dr
        .get_case(get_case("ERN-LUNG", &pseudonym))
        .await
        .unwrap_err();
    assert_unavailable_with_retry_hint(&status);
    // The callers see it too (a call that was waiting for a pool connection when the
    // database went down ends when that wait does: the pool's 10 s acquire timeout).
    let started = Instant::now();
    while seen.lock().unwrap().failed.is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the load never saw the outage"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Down for longer than the pool's acquire timeout, so that the writes that were
    // queued when it stopped find no connection: the writer answers such a batch at once
    // instead of retrying it write by write, each retry and each failure entry waiting
    // the whole timeout again (which passed the 30 s request timeout: CANCELLED).
    tokio::time::sleep(Duration::from_secs(12)).await;

    pg.start();
    until_health(&mut probe, ServingStatus::Serving, Duration::from_secs(10)).await;
    until_more_ok(seen.clone(), 50).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    while let Some(done) = callers.join_next().await {
        done.unwrap();
    }
    let wrong: Vec<Code> = seen
        .lock()
        .unwrap()
        .failed
        .iter()
        .copied()
        .filter(|c| *c != Code::Unavailable)
        .collect();
    assert!(wrong.is_empty(), "outage answered as {wrong:?}");
    app.stop().await;
}

/// A PostgreSQL that answers but takes no writes (a standby after a failover; here
/// `default_transaction_read_only` on the database) fails every call (each is audited):
/// health turns NOT_SERVING and calls are UNAVAILABLE with a retry hint, never INTERNAL;
/// writable again, the server serves again without a restart. (They were INTERNAL, with
/// health SERVING, before: a claims audit's fault injection.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_database_is_unavailable_and_not_serving_until_it_takes_writes() {
    let Some(admin_url) = postgres_admin_url() else {
        return;
    };
    let app = TestApp::spawn().await;
    let token = app.physician_key("dr-readonly", "NL-READONLY").await;
    let mut dr = app.client(Some(&token)).await;
    let (pseudonym, mut probe) = first_case_and_a_serving_probe(&app, &mut dr, 6900).await;
    let database = app
        .database_url
        .rsplit('/')
        .next()
        .unwrap()
        .split('?')
        .next()
        .unwrap()
        .to_owned();
    let admin = ern_registry::store::Store::connect(&admin_url, 1)
        .await
        .unwrap();
    // New sessions of the database are read-only; the server's are ended, so its pool
    // and its probe open new ones.
    let set = |on: bool| {
        format!(
            "ALTER DATABASE \"{database}\" SET default_transaction_read_only = {}",
            if on { "on" } else { "off" }
        )
    };
    let cut = format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{database}' \
         AND pid <> pg_backend_pid()"
    );
    for sql in [set(true), cut.clone()] {
        ern_registry::store::db::query(&sql)
            .execute(admin.pool())
            .await
            .unwrap();
    }
    until_health(
        &mut probe,
        ServingStatus::NotServing,
        Duration::from_secs(10),
    )
    .await;
    // Calls get UNAVAILABLE: refused at once while the probe says so, and those that
    // reached the database before (its error, 25006, is one of "not now").
    for i in 0..5 {
        let status = dr
            .submit_case(submission("ERN-LUNG", national("NL", &bsn(6901 + i))))
            .await
            .unwrap_err();
        assert_unavailable_with_retry_hint(&status);
    }
    let status = dr
        .get_case(get_case("ERN-LUNG", &pseudonym))
        .await
        .unwrap_err();
    assert_unavailable_with_retry_hint(&status);
    for sql in [set(false), cut] {
        ern_registry::store::db::query(&sql)
            .execute(admin.pool())
            .await
            .unwrap();
    }
    until_health(&mut probe, ServingStatus::Serving, Duration::from_secs(10)).await;
    served_again(&mut dr, &pseudonym).await;
    dr.submit_case(submission("ERN-LUNG", national("NL", &bsn(6999))))
        .await
        .unwrap();
    app.stop().await;
}

/// The PostgreSQL server's URL the tests run against (`ERN_TEST_DATABASE_URL`), or `None`
/// (said on stderr) when they run on SQLite.
fn postgres_admin_url() -> Option<String> {
    let url = std::env::var("ERN_TEST_DATABASE_URL")
        .ok()
        .filter(|u| u.starts_with("postgres"));
    if url.is_none() {
        eprintln!("skipped: needs PostgreSQL (ERN_TEST_DATABASE_URL)");
    }
    url
}

/// Reads the case until it is served (UNAVAILABLE meanwhile, nothing else), for 10 s at
/// most.
async fn served_again(dr: &mut crate::helpers::Client, pseudonym: &str) {
    for _ in 0..100 {
        match dr.get_case(get_case("ERN-LUNG", pseudonym)).await {
            Ok(_) => return,
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    panic!("not served again");
}

/// A PostgreSQL database that refuses new sessions is "not reachable now", as a stopped
/// server is: "does not exist" (3D000: renamed or dropped under the server) and "not
/// currently accepting connections" (55000: `ALLOW_CONNECTIONS false`) are both
/// classified so, and calls while the database refuses them are UNAVAILABLE with a retry
/// hint, never INTERNAL; once it takes sessions again, the server serves again. (Both
/// were INTERNAL, one error log line per call, for the calls that reached the database
/// before health turned NOT_SERVING and for every item of an open stream: a defences
/// audit.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_refusing_sessions_is_unavailable_not_internal() {
    use sqlx::Connection as _;
    let Some(admin_url) = postgres_admin_url() else {
        return;
    };
    let admin = ern_registry::store::Store::connect(&admin_url, 1)
        .await
        .unwrap();
    let run = |sql: String| {
        let admin = admin.clone();
        async move {
            ern_registry::store::db::query(&sql)
                .execute(admin.pool())
                .await
                .unwrap();
        }
    };
    let url_of = |database: &str| {
        let mut url = url::Url::parse(&admin_url).unwrap();
        url.set_path(database);
        url.to_string()
    };
    let refusing = format!("ern_refusing_{}", std::process::id());
    run(format!("DROP DATABASE IF EXISTS {refusing}")).await;
    run(format!("CREATE DATABASE {refusing}")).await;
    run(format!("ALTER DATABASE {refusing} ALLOW_CONNECTIONS false")).await;
    for (what, database) in [("missing", "ern_no_such_database"), ("refusing", &refusing)] {
        let err = sqlx::PgConnection::connect(&url_of(database))
            .await
            .err()
            .unwrap_or_else(|| panic!("{what}: connected"));
        assert!(
            ern_registry::store::unreachable_now(&err),
            "{what}: {err} taken for a fault"
        );
    }
    run(format!("ALTER DATABASE {refusing} ALLOW_CONNECTIONS true")).await;
    run(format!("DROP DATABASE {refusing}")).await;

    let app = TestApp::spawn().await;
    let token = app.physician_key("dr-refused", "NL-REFUSED").await;
    let mut dr = app.client(Some(&token)).await;
    let (pseudonym, mut probe) = first_case_and_a_serving_probe(&app, &mut dr, 7200).await;
    let database = url::Url::parse(&app.database_url).unwrap().path()[1..].to_owned();
    let allow = |on: bool| format!("ALTER DATABASE \"{database}\" ALLOW_CONNECTIONS {on}");
    let cut = format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{database}' \
         AND pid <> pg_backend_pid()"
    );
    run(allow(false)).await;
    run(cut.clone()).await;
    // At once, before health says so: these reach the database's refusal.
    for i in 0..5 {
        let status = dr
            .submit_case(submission("ERN-LUNG", national("NL", &bsn(7201 + i))))
            .await
            .unwrap_err();
        assert_unavailable_with_retry_hint(&status);
    }
    until_health(
        &mut probe,
        ServingStatus::NotServing,
        Duration::from_secs(10),
    )
    .await;
    run(allow(true)).await;
    until_health(&mut probe, ServingStatus::Serving, Duration::from_secs(10)).await;
    served_again(&mut dr, &pseudonym).await;
    app.stop().await;
}

/// A lock the writer cannot get (here the audit chain head's row, held by another
/// session) fails its batch after the writer's lock wait (`writer::WRITER_LOCK_WAIT`),
/// rolled back: the caller gets UNAVAILABLE within its deadline, and nothing is stored
/// when the lock is released. (The writer waited without a limit before: the caller got
/// CANCELLED at its deadline, and the write committed once the lock went: a fault
/// injection.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_the_writer_cannot_get_fails_its_write_within_the_deadline() {
    if !std::env::var("ERN_TEST_DATABASE_URL").is_ok_and(|u| u.starts_with("postgres")) {
        eprintln!("skipped: needs PostgreSQL (ERN_TEST_DATABASE_URL)");
        return;
    }
    let app = TestApp::spawn().await;
    let token = app.physician_key("dr-locked", "NL-LOCKED").await;
    let mut dr = app.client(Some(&token)).await;
    let (_, _probe) = first_case_and_a_serving_probe(&app, &mut dr, 7100).await;
    let cases = app.count("cases").await;
    let writer = crate::helpers::HeldWriter::hold(&app).await;
    let started = Instant::now();
    let status = dr
        .submit_case(submission("ERN-LUNG", national("NL", &bsn(7101))))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    writer.release().await;
    assert_eq!(app.count("cases").await, cases);
    dr.submit_case(submission("ERN-LUNG", national("NL", &bsn(7101))))
        .await
        .unwrap();
    app.stop().await;
}

/// SQLite: SELECT 1 reads no page, so the probe also asks how much room the database's
/// file system has (`--min-free-disk-bytes`): with less, health is NOT_SERVING and calls are
/// UNAVAILABLE with a retry hint at once (every call writes its audit entry); once there
/// is room again, SERVING and calls succeed, with no restart. The test takes room with a
/// file of its own beside the database, with margins for what other tests write meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_without_room_is_unavailable_and_not_serving_until_there_is_room() {
    if std::env::var("ERN_TEST_DATABASE_URL").is_ok_and(|u| u.starts_with("postgres")) {
        eprintln!("skipped: SQLite only (PostgreSQL's disk is its server's)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let free = || {
        let stat = rustix::fs::statvfs(dir.path()).unwrap();
        stat.f_bavail * stat.f_frsize
    };
    const MIB: u64 = 1 << 20;
    let before = free();
    if before < 1024 * MIB {
        eprintln!("skipped: needs 1 GiB free in the temporary directory");
        return;
    }
    let app = TestApp::spawn_with(ServeArgs {
        min_free_disk_bytes: before - 128 * MIB,
        ..ServeArgs::default()
    })
    .await;
    let database = ern_registry::data_dir::sqlite_path(&app.database_url).unwrap();
    let same_disk = rustix::fs::statvfs(database.parent().unwrap())
        .unwrap()
        .f_fsid
        == rustix::fs::statvfs(dir.path()).unwrap().f_fsid;
    assert!(
        same_disk,
        "the test's file must take room on the database's disk"
    );
    let token = app.physician_key("dr-room", "NL-ROOM").await;
    let mut dr = app.client(Some(&token)).await;
    let (pseudonym, mut probe) = first_case_and_a_serving_probe(&app, &mut dr, 7100).await;
    // Take 512 MiB: under the bound by about 384 MiB.
    let filler = dir.path().join("filler");
    {
        use std::io::Write;
        let mut file = std::fs::File::create(&filler).unwrap();
        let chunk = vec![1u8; MIB as usize];
        for _ in 0..512 {
            file.write_all(&chunk).unwrap();
        }
        file.sync_all().unwrap();
    }
    until_health(
        &mut probe,
        ServingStatus::NotServing,
        Duration::from_secs(10),
    )
    .await;
    let status = dr
        .submit_case(submission("ERN-LUNG", national("NL", &bsn(7101))))
        .await
        .unwrap_err();
    assert_unavailable_with_retry_hint(&status);
    assert!(status.message().contains("disk full"), "{status:?}");
    let status = dr
        .get_case(get_case("ERN-LUNG", &pseudonym))
        .await
        .unwrap_err();
    assert_unavailable_with_retry_hint(&status);
    std::fs::remove_file(&filler).unwrap();
    until_health(&mut probe, ServingStatus::Serving, Duration::from_secs(10)).await;
    let mut answered = false;
    for _ in 0..50 {
        if dr.get_case(get_case("ERN-LUNG", &pseudonym)).await.is_ok() {
            answered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(answered);
}

/// SQLite's database file or its `-shm` moved away under the running server (a defences
/// audit of 2026-12-07 deleted them: writes acknowledged into a file that was gone, and
/// with a new `-shm` an admin command's revocation reported done and lost): the next write
/// is refused UNAVAILABLE at once and health turns NOT_SERVING; an admin command beside
/// the server without its `-shm` is refused; with the file back, the server serves again
/// and what it acknowledged before is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_files_moved_under_the_server_refuse_writes_while_they_are_away() {
    if std::env::var("ERN_TEST_DATABASE_URL").is_ok_and(|u| u.starts_with("postgres")) {
        eprintln!("skipped: SQLite only");
        return;
    }
    for (seed, suffix) in [(7300u32, "-shm"), (7400, "")] {
        let app = TestApp::spawn().await;
        let database = ern_registry::data_dir::sqlite_path(&app.database_url).unwrap();
        let token = app.physician_key("dr-files", "NL-FILES").await;
        let mut dr = app.client(Some(&token)).await;
        let (pseudonym, mut probe) = first_case_and_a_serving_probe(&app, &mut dr, seed).await;
        let mut name = database.clone().into_os_string();
        name.push(suffix);
        let file = std::path::PathBuf::from(name);
        let aside = file.with_extension("aside");
        std::fs::rename(&file, &aside).unwrap();
        if suffix == "-shm" {
            let refused = ern_registry::data_dir::prepare_sqlite_files(&database).unwrap_err();
            assert!(
                matches!(
                    refused,
                    ern_registry::data_dir::DataDirError::ShmMissingWhileServed { .. }
                ),
                "{refused}"
            );
            // Nor with another one in its place (a copy, as a `sqlite3` query would make
            // one anew: a re-check of 2026-12-07 lost a revocation so).
            std::fs::copy(&aside, &file).unwrap();
            let refused = ern_registry::data_dir::prepare_sqlite_files(&database).unwrap_err();
            assert!(
                matches!(
                    refused,
                    ern_registry::data_dir::DataDirError::ShmMissingWhileServed { .. }
                ),
                "{refused}"
            );
            std::fs::remove_file(&file).unwrap();
        }
        let status = dr
            .submit_case(submission("ERN-LUNG", national("NL", &bsn(seed + 1))))
            .await
            .unwrap_err();
        assert_unavailable_with_retry_hint(&status);
        until_health(
            &mut probe,
            ServingStatus::NotServing,
            Duration::from_secs(10),
        )
        .await;
        std::fs::rename(&aside, &file).unwrap();
        until_health(&mut probe, ServingStatus::Serving, Duration::from_secs(10)).await;
        dr.get_case(get_case("ERN-LUNG", &pseudonym)).await.unwrap();
        dr.submit_case(submission("ERN-LUNG", national("NL", &bsn(seed + 2))))
            .await
            .unwrap();
        // Refused, not stored.
        dr.submit_case(submission("ERN-LUNG", national("NL", &bsn(seed + 1))))
            .await
            .unwrap();
        app.stop().await;
    }
}

/// A failing disk under SQLite's WAL, in the server binary (a shim loaded with
/// LD_PRELOAD, `tests/fixtures/fail_wal_sync.c`). A COMMIT whose sync fails has written
/// the batch's pages, its commit frame included, to the WAL: SQLite leaves the WAL's index
/// as it was, but a restart would bring the batch back until a later write overwrites it
/// (fault audit of 2026-12-07: answered INTERNAL, then stored after a restart with an entry
/// saying OK). So the writer writes at once after a failed COMMIT (`commit_barrier`),
/// before answering:
/// - one sync fails: that write succeeds, the submission is answered as failed, and after
///   a kill and a restart it is not stored (its failure entry is);
/// - every sync fails and, after the first, every write: that write fails too, and the
///   caller is told the outcome is unknown (UNAVAILABLE, "may or may not be stored"), not
///   that it failed. After a kill and a restart it may be either; the chain verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_sqlite_commit_is_final_or_answered_as_unknown() {
    use crate::helpers::{Bearer, ServerProcess};
    use ern_registry::proto::case_service_client::CaseServiceClient;

    let dir = tempfile::tempdir().unwrap();
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("registry.db").display()
    );
    let mut app = TestApp::spawn_on(dir, url).await;
    app.centre("NL-WAL", "NL", &["ERN-LUNG"]).await;
    let token = app
        .principal(
            "dr-wal",
            ern_registry::auth::Role::Physician,
            Some("NL-WAL"),
            &[],
        )
        .await;
    app.stop_server().await;
    // No connection of the test's may keep the WAL's index open: the restart must be the
    // first to open the database again, and so read the WAL (SQLite's recovery).
    app.store.close().await;

    let shim = app.dir.path().join("fail_wal_sync.so");
    let built = std::process::Command::new("cc")
        .args(["-shared", "-fPIC", "-O1", "-o"])
        .arg(&shim)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/fail_wal_sync.c"
        ))
        .arg("-ldl")
        .status()
        .expect("a C compiler (cc) builds the fault shim");
    assert!(built.success(), "the fault shim did not build");
    let ctl = app.dir.path().join("fail-wal-sync");
    let (mut server, channel) = ServerProcess::start(&app, |command| {
        command
            .env("LD_PRELOAD", &shim)
            .env("FAIL_WAL_SYNC", &ctl)
            .stderr(std::process::Stdio::null());
    })
    .await;
    let bearer = Bearer(Some(format!("Bearer {token}").parse().unwrap()));
    let mut client = CaseServiceClient::with_interceptor(channel, bearer);
    let patient = |seed| submission("ERN-LUNG", national("NL", &bsn(seed)));
    client.submit_case(patient(6300)).await.unwrap();

    std::fs::write(&ctl, "once").unwrap();
    let failed = client.submit_case(patient(6301)).await.unwrap_err();
    assert!(!ctl.exists(), "no sync of the WAL failed");
    assert_eq!(failed.code(), Code::Internal, "{failed:?}");

    std::fs::write(&ctl, "sticky").unwrap();
    let unknown = client.submit_case(patient(6302)).await.unwrap_err();
    assert_eq!(unknown.code(), Code::Unavailable, "{unknown:?}");
    assert!(
        unknown.message().contains("may or may not be stored"),
        "{unknown:?}"
    );
    server.kill();
    std::fs::remove_file(&ctl).unwrap();

    app.store = ern_registry::store::Store::connect(&app.database_url, 2)
        .await
        .unwrap();
    let stored = |seed: u32| {
        let app = &app;
        async move {
            let pseudonym = app
                .pseudonym_under("ERN-LUNG", &national("NL", &bsn(seed)), 1)
                .await;
            ern_registry::store::db::query("SELECT COUNT(*) FROM cases WHERE pseudonym = $1")
                .bind(pseudonym)
                .fetch_one(app.store.pool())
                .await
                .unwrap()
                .get::<i64>(0)
        }
    };
    assert_eq!(stored(6300).await, 1);
    assert_eq!(
        stored(6301).await,
        0,
        "a write answered as failed came back"
    );
    let maybe = stored(6302).await;
    let outcomes: Vec<String> = ern_registry::store::db::query(
        "SELECT outcome FROM audit_log WHERE method LIKE '%SubmitCase' ORDER BY seq",
    )
    .fetch_all(app.store.pool())
    .await
    .unwrap()
    .iter()
    .map(|r| r.get::<String>(0))
    .collect();
    let ok = if maybe == 1 { 2 } else { 1 };
    assert_eq!(
        outcomes.iter().filter(|o| *o == "OK").count(),
        ok,
        "{outcomes:?} (6302 stored: {maybe})"
    );
    assert_eq!(
        outcomes.iter().filter(|o| *o == "INTERNAL").count(),
        1,
        "{outcomes:?}"
    );
    let master =
        ern_registry::keys::MasterSecret::load(&app.dir.path().join("master.key")).unwrap();
    let key = ern_registry::audit::AuditKey::derive(&master);
    assert_eq!(
        app.store.verify_audit(&key).await.map(|r| r.is_ok()).ok(),
        Some(true)
    );
    app.store.close().await;
}
