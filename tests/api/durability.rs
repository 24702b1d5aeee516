//! An acknowledged submission survives `kill -9` of the server process.

use ern_registry::store::db;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ern_registry::proto::GetCaseRequest;

use crate::helpers::*;

fn start(dir: &std::path::Path, url: &str, port: u16) -> Child {
    Command::new(env!("CARGO_BIN_EXE_ern-registry"))
        .args([
            "--data-dir",
            dir.to_str().unwrap(),
            "--database-url",
            url,
            "serve",
            "--listen",
        ])
        .arg(format!("127.0.0.1:{port}"))
        .env("ERN_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the server binary")
}

async fn wait_ready(port: u16) -> tonic::transport::Channel {
    for _ in 0..200 {
        if let Ok(ch) = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{port}"))
            .unwrap()
            .connect()
            .await
        {
            return ch;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("server did not come up");
}

#[tokio::test]
async fn acknowledged_submissions_survive_kill_9() {
    // The TestApp only provides the database and the principals; the server under test
    // is the real binary in its own process.
    let app = TestApp::spawn().await;
    app.centre("NL-AMC", "NL", &["ERN-EYE"]).await;
    let token = app
        .principal(
            "dr-a",
            ern_registry::auth::Role::Physician,
            Some("NL-AMC"),
            &[],
        )
        .await;
    // One server per data dir: the TestApp's stops, its database and key stay.
    let mut app = app;
    app.stop_server().await;
    let url = app.database_url.clone();
    let dir = app.dir.path().to_path_buf();
    // Same master key as the TestApp (in the same data dir), so pseudonyms agree.
    let port = free_port();
    let mut server = start(&dir, &url, port);
    let channel = wait_ready(port).await;
    let bearer = Bearer(Some(format!("Bearer {token}").parse().unwrap()));
    let client = ern_registry::proto::case_service_client::CaseServiceClient::with_interceptor(
        channel,
        bearer.clone(),
    );
    // Eight callers submit without pause; the server is killed while their calls are in
    // flight. Every submission acknowledged before the kill must be stored; the ones cut
    // off may or may not be.
    const CALLERS: u32 = 8;
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut callers = tokio::task::JoinSet::new();
    for caller in 0..CALLERS {
        let mut client = client.clone();
        let acked = acked.clone();
        callers.spawn(async move {
            for i in 0.. {
                let patient = 9000 + caller * 10_000 + i;
                match client
                    .submit_case(submission("ERN-EYE", national("NL", &bsn(patient))))
                    .await
                {
                    Ok(r) => acked.lock().unwrap().push(r.into_inner().pseudonym),
                    Err(_) => return, // cut off by the kill
                }
            }
        });
    }
    while acked.lock().unwrap().len() < 200 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    server.kill().unwrap(); // SIGKILL, with calls in flight
    server.wait().unwrap();
    // Each caller ends at its first failed call: the one the kill cut off.
    while let Some(done) = callers.join_next().await {
        done.unwrap();
    }
    let acked = std::mem::take(&mut *acked.lock().unwrap());

    let port = free_port();
    let mut server = start(&dir, &url, port);
    let channel = wait_ready(port).await;
    let mut client = ern_registry::proto::case_service_client::CaseServiceClient::with_interceptor(
        channel, bearer,
    );
    for p in acked {
        client
            .get_case(GetCaseRequest {
                registry: "ERN-EYE".into(),
                pseudonym: p,
                include_history: false,
            })
            .await
            .expect("an acknowledged case is still there");
    }
    server.kill().unwrap();
    server.wait().unwrap();
}

#[tokio::test]
async fn every_connection_commits_durably() {
    let app = TestApp::spawn().await;
    // Hold several connections at once, so that each is a distinct one, and read the
    // settings in force on each: a connection opened without them would lose
    // acknowledged writes in a power failure (a kill -9 alone cannot show that).
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(app.store.pool().acquire().await.unwrap());
    }
    for conn in &mut held {
        if app.is_sqlite() {
            let sync: i64 = db::query("PRAGMA synchronous")
                .fetch_scalar(&mut *conn)
                .await
                .unwrap();
            let journal: String = db::query("PRAGMA journal_mode")
                .fetch_scalar(&mut *conn)
                .await
                .unwrap();
            assert_eq!((sync, journal.as_str()), (2, "wal"), "FULL and WAL");
            let secure: i64 = db::query("PRAGMA secure_delete")
                .fetch_scalar(&mut *conn)
                .await
                .unwrap();
            assert_eq!(secure, 1, "erasures overwrite what they delete");
        } else {
            let fsync: String = db::query("SHOW fsync")
                .fetch_scalar(&mut *conn)
                .await
                .unwrap();
            let commit: String = db::query("SHOW synchronous_commit")
                .fetch_scalar(&mut *conn)
                .await
                .unwrap();
            assert_eq!(fsync, "on");
            assert_ne!(commit, "off");
        }
    }
}

/// Every PostgreSQL session of the service ends a transaction its client left idle (a
/// dead host would otherwise hold the audit chain's head and its patients' locks, and
/// every instance's writers behind them, for hours), probes idle connections and reads
/// at READ COMMITTED unless told otherwise: also when the database's own defaults say
/// otherwise (`store::PG_SESSION`).
#[tokio::test]
async fn every_postgresql_session_ends_abandoned_transactions_whatever_the_defaults() {
    let app = TestApp::spawn().await;
    if app.is_sqlite() {
        return;
    }
    let database: String = db::query("SELECT current_database()")
        .fetch_scalar(app.store.pool())
        .await
        .unwrap();
    for sql in [
        "SET default_transaction_isolation = 'repeatable read'",
        "SET idle_in_transaction_session_timeout = 0",
        "SET tcp_keepalives_idle = 7200",
    ] {
        db::query(&format!("ALTER DATABASE \"{database}\" {sql}"))
            .execute(app.store.pool())
            .await
            .unwrap();
    }
    let store = ern_registry::store::Store::connect(&app.database_url, 4)
        .await
        .unwrap();
    let mut conn = store.pool().acquire().await.unwrap();
    for (name, expected) in [
        ("default_transaction_isolation", "read committed"),
        ("idle_in_transaction_session_timeout", "1min"),
    ] {
        let value: String = db::query(&format!("SHOW {name}"))
            .fetch_scalar(&mut conn)
            .await
            .unwrap();
        assert_eq!(value, expected, "{name}");
    }
    // Over TCP (the tests' server listens on loopback), the keepalive settings apply.
    let idle: String = db::query("SHOW tcp_keepalives_idle")
        .fetch_scalar(&mut conn)
        .await
        .unwrap();
    assert_eq!(idle, "30");
}

#[test]
fn settings_that_lose_acknowledged_writes_are_refused() {
    use ern_registry::store::Durability;
    let sqlite = |journal: &str, sync| Durability::Sqlite {
        journal_mode: journal.into(),
        synchronous: sync,
        secure_delete: 1,
    };
    assert!(sqlite("wal", 2).check().is_ok());
    let keeps_erased = Durability::Sqlite {
        journal_mode: "wal".into(),
        synchronous: 2,
        secure_delete: 0,
    };
    assert!(
        keeps_erased.check().is_err(),
        "erased records would stay in free pages"
    );
    assert!(sqlite("wal", 3).check().is_ok());
    assert!(
        sqlite("wal", 1).check().is_err(),
        "NORMAL loses the last commits"
    );
    assert!(sqlite("wal", 0).check().is_err());
    assert!(sqlite("delete", 2).check().is_err());
    let pg = |fsync: &str, commit: &str| Durability::Postgres {
        fsync: fsync.into(),
        synchronous_commit: commit.into(),
    };
    assert!(pg("on", "on").check().is_ok());
    assert!(pg("on", "remote_apply").check().is_ok());
    assert!(pg("off", "on").check().is_err());
    assert!(pg("on", "off").check().is_err());
}
