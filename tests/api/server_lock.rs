//! One server per SQLite database: a second `serve` on the same data dir stops at start,
//! naming the first; admin commands still run beside it. On PostgreSQL several servers
//! share one database (the scale-out design).

use std::process::Command;

use ern_registry::config::ServeArgs;
use ern_registry::data_dir::DataDirError;
use ern_registry::startup::{Application, StartupError};

use crate::helpers::*;
use crate::master_key::must_refuse;

fn args() -> ServeArgs {
    ServeArgs {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..ServeArgs::default()
    }
}

/// `serve` of the real binary, as an operator would start it, on `data_dir` (its default
/// database there), on a port of its own.
fn serve(data_dir: &std::path::Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ern-registry"));
    command
        .arg("--data-dir")
        .arg(data_dir)
        .args(["serve", "--listen"])
        .arg(format!("127.0.0.1:{}", free_port()))
        .env("ERN_LOG", "warn")
        .env_remove("DATABASE_URL")
        .env_remove("ERN_MASTER_KEY_FILE");
    command
}

#[tokio::test]
async fn a_second_server_on_the_same_data_dir_refuses_to_start() {
    let mut app = TestApp::spawn().await;
    let key = app.dir.path().join("master.key");
    if !app.is_sqlite() {
        // PostgreSQL: a second server on the same database is welcome.
        drop(
            Application::build(args(), &app.database_url, &key)
                .await
                .expect("a second server on PostgreSQL"),
        );
        return;
    }
    let mut dr = app.physician("dr-lock", "NL-AMC").await;
    dr.submit_case(submission("ERN-LUNG", national("NL", &bsn(1))))
        .await
        .unwrap();

    // The real binary, as an operator would start it, on the same data dir (the TestApp's
    // database is the default one there), on a port of its own.
    let stderr = must_refuse(serve(app.dir.path())).await;
    let lock = app.dir.path().canonicalize().unwrap().join("registry.lock");
    assert!(
        stderr.contains(&format!(
            "another ern-registry server (pid {}) is serving",
            std::process::id()
        )),
        "{stderr}"
    );
    assert!(stderr.contains(&lock.display().to_string()), "{stderr}");

    // In this process too.
    match Application::build(args(), &app.database_url, &key).await {
        Err(StartupError::DataFiles(DataDirError::Locked { .. })) => {}
        Err(other) => panic!("{other}"),
        Ok(_) => panic!("a second server started"),
    }

    // Nor through a symbolic link to the database (the lock is taken beside the file the
    // link resolves to), nor through a linked directory.
    let via_file = app.dir.path().join("elsewhere");
    std::fs::create_dir(&via_file).unwrap();
    std::os::unix::fs::symlink(
        app.dir.path().join("registry.db"),
        via_file.join("registry.db"),
    )
    .unwrap();
    let via_dir = app.dir.path().join("linked");
    std::os::unix::fs::symlink(app.dir.path(), &via_dir).unwrap();
    for linked in [&via_file, &via_dir] {
        let url = format!("sqlite://{}?mode=rwc", linked.join("registry.db").display());
        match Application::build(args(), &url, &key).await {
            Err(StartupError::DataFiles(DataDirError::Locked { .. })) => {}
            Err(other) => panic!("{other}"),
            Ok(_) => panic!("a second server started through {}", linked.display()),
        }
    }
    assert!(!via_file.join("registry.lock").exists());
    // Nor through a `file:` URI or a percent-encoded path, which SQLite and sqlx read as
    // the same file but whose lock would be elsewhere: refused before any file is made
    // (a defences audit of 2026-12-07 served the database from two servers so).
    let dir = app.dir.path().display().to_string();
    let cwd_before: Vec<_> = std::fs::read_dir(".")
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    for url in [
        format!("sqlite://file:{dir}/registry.db"),
        format!("sqlite:file:{dir}/registry.db?mode=rwc"),
        format!("sqlite://{dir}/registry%2Edb"),
        format!("sqlite:sqlite:{dir}/registry.db"),
        format!("sqlite://sqlite://{dir}/registry.db"),
    ] {
        match Application::build(args(), &url, &key).await {
            Err(StartupError::Store(ern_registry::store::StoreError::SqliteUrlNotAPath)) => {}
            Err(other) => panic!("{url}: {other}"),
            Ok(_) => panic!("a second server started through {url}"),
        }
    }
    let cwd_after: Vec<_> = std::fs::read_dir(".")
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(cwd_before, cwd_after, "no file made for a refused URL");
    for made in ["file:", "sqlite:"] {
        assert!(!std::path::Path::new(made).exists(), "{made} made");
    }

    // Nor with its lock file moved aside or deleted while it runs, nor through a hard
    // link to the database (a lock file of its own beside it): the database file itself
    // is locked (a defences audit of 2026-12-07 moved the lock file and started a second
    // server).
    let moved = app.dir.path().join("registry.lock.moved");
    std::fs::rename(&lock, &moved).unwrap();
    let stderr = must_refuse(serve(app.dir.path())).await;
    assert!(
        stderr.contains("holds the database file itself locked"),
        "{stderr}"
    );
    std::fs::rename(&moved, &lock).unwrap();
    // A database file with a second name (a hard link) is opened by no command: SQLite
    // keeps a WAL beside each name, and a re-check of 2026-12-07 corrupted the database
    // with admin commands through a hard link beside the server.
    let hard = app.dir.path().join("hard");
    std::fs::create_dir(&hard).unwrap();
    std::fs::copy(app.dir.path().join("master.key"), hard.join("master.key")).unwrap();
    std::fs::hard_link(app.dir.path().join("registry.db"), hard.join("registry.db")).unwrap();
    let stderr = must_refuse(serve(&hard)).await;
    assert!(stderr.contains("has 2 names (hard links"), "{stderr}");
    for data_dir in [hard.as_path(), app.dir.path()] {
        let output = Command::new(env!("CARGO_BIN_EXE_ern-registry"))
            .args(["admin", "list-registries", "--data-dir"])
            .arg(data_dir)
            .env_remove("DATABASE_URL")
            .env_remove("ERN_MASTER_KEY_FILE")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{}: ran", data_dir.display());
        assert!(stderr.contains("has 2 names (hard links"), "{stderr}");
    }
    assert!(!hard.join("registry.db-wal").exists(), "a second WAL");
    std::fs::remove_file(hard.join("registry.db")).unwrap();

    // Nor does any command open the database's name once the database was renamed away
    // from under its server, which writes on through its open files and its `-wal`
    // under the old name: SQLite would create a new database there and delete that WAL
    // (a defences audit of 2026-12-07 lost acknowledged writes so, through `audit
    // verify`, an admin command and `demo`, where only `serve` was refused).
    let db = app.dir.path().join("registry.db");
    let away = app.dir.path().join("registry.db.away");
    std::fs::rename(&db, &away).unwrap();
    // Its writes are refused while its database is away (`data_dir::OpenFiles`): they
    // would go into a file no one finds (a defences audit of 2026-12-07 had 11,674
    // acknowledged so).
    let refused = dr
        .submit_case(submission("ERN-LUNG", national("NL", &bsn(3))))
        .await
        .expect_err("no write acknowledged into a database moved away");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    let wal = app.dir.path().join("registry.db-wal");
    assert!(wal.exists());
    let commands: [&[&str]; 3] = [
        &["audit", "verify"],
        &["admin", "list-registries"],
        &["demo", "--patients", "10"],
    ];
    for command in commands {
        let output = Command::new(env!("CARGO_BIN_EXE_ern-registry"))
            .args(command)
            .arg("--data-dir")
            .arg(app.dir.path())
            .env_remove("DATABASE_URL")
            .env_remove("ERN_MASTER_KEY_FILE")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{command:?} ran");
        assert!(
            stderr.contains("is missing or empty, but"),
            "{command:?}: {stderr}"
        );
        assert!(!db.exists(), "{command:?} made a new database");
        assert!(wal.exists(), "{command:?} deleted the WAL");
    }
    // `serve` is refused by the lock file first, the first server's.
    let stderr = must_refuse(serve(app.dir.path())).await;
    assert!(stderr.contains("is serving"), "{stderr}");
    assert!(!db.exists() && wal.exists(), "serve: {stderr}");
    std::fs::rename(&away, &db).unwrap();

    // The first one serves on once its health probe has seen the file back, and an admin
    // command runs beside it.
    let mut served = None;
    for _ in 0..100 {
        match dr
            .submit_case(submission("ERN-LUNG", national("NL", &bsn(2))))
            .await
        {
            Err(status) if status.code() == tonic::Code::Unavailable => {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            other => {
                served = Some(other);
                break;
            }
        }
    }
    served
        .expect("served again within 10 s")
        .expect("the first server still serves");
    let admin = Command::new(env!("CARGO_BIN_EXE_ern-registry"))
        .arg("--data-dir")
        .arg(app.dir.path())
        .args(["admin", "list-registries"])
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    assert!(
        admin.status.success(),
        "{}",
        String::from_utf8_lossy(&admin.stderr)
    );
    assert!(String::from_utf8_lossy(&admin.stdout).contains("ERN-LUNG"));

    // Once it has stopped, the next one starts, with every case.
    app.stop_server().await;
    assert_eq!(app.count("cases").await, 2);
    drop(
        Application::build(args(), &app.database_url, &key)
            .await
            .expect("starts once the first has stopped"),
    );
}

/// The first start through a link whose database does not exist yet locks the file the
/// link names: a second server given that file's own path finds the lock held.
#[tokio::test]
async fn a_link_to_a_database_not_there_yet_takes_the_files_lock() {
    if std::env::var("ERN_TEST_DATABASE_URL").is_ok_and(|u| !u.is_empty()) {
        return; // SQLite only
    }
    let dir = tempfile::tempdir().unwrap();
    let real = dir.path().join("real");
    let links = dir.path().join("links");
    std::fs::create_dir(&real).unwrap();
    std::fs::create_dir(&links).unwrap();
    std::os::unix::fs::symlink("../real/registry.db", links.join("registry.db")).unwrap();
    let url =
        |d: &std::path::Path| format!("sqlite://{}?mode=rwc", d.join("registry.db").display());
    let key = dir.path().join("master.key");
    let first = Application::build(args(), &url(&links), &key)
        .await
        .expect("the first server starts through the link");
    assert!(real.join("registry.db").is_file());
    match Application::build(args(), &url(&real), &key).await {
        Err(StartupError::DataFiles(DataDirError::Locked { .. })) => {}
        Err(other) => panic!("{other}"),
        Ok(_) => panic!("a second server started on the file the link names"),
    }
    drop(first);
}
