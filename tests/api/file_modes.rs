//! File modes: the data files of a running server (the SQLite database and its side files,
//! the lock file, the master key) are the owner's only (0600), and a data dir the service
//! creates is 0700. Files an earlier version left wider are narrowed at start-up; a master
//! key others can read is refused.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use ern_registry::config::ServeArgs;
use ern_registry::keys::KeyError;
use ern_registry::startup::{Application, StartupError};

use crate::helpers::*;

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

fn args() -> ServeArgs {
    ServeArgs {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..ServeArgs::default()
    }
}

/// Every file of a live server's data dir: its database files (with a write in the WAL),
/// its lock file and its master key.
async fn data_files(app: &TestApp) -> Vec<std::path::PathBuf> {
    let mut files = vec![app.dir.path().join("master.key")];
    if app.is_sqlite() {
        files.extend(app.sqlite_files());
        files.push(app.dir.path().join("registry.lock"));
    }
    files
}

#[tokio::test]
async fn a_running_servers_data_files_are_private() {
    let app = TestApp::spawn().await;
    let mut dr = app.physician("dr-modes", "NL-AMC").await;
    dr.submit_case(submission("ERN-LUNG", national("NL", &bsn(1))))
        .await
        .unwrap();
    for file in data_files(&app).await {
        assert_eq!(mode(&file), 0o600, "{}", file.display());
    }
}

#[tokio::test]
async fn a_data_dir_the_service_creates_is_private() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("var").join("ern");
    let url = format!("sqlite://{}?mode=rwc", data.join("registry.db").display());
    let app = Application::build(args(), &url, &data.join("master.key"))
        .await
        .expect("builds");
    for created in [dir.path().join("var"), data.clone()] {
        assert_eq!(mode(&created), 0o700, "{}", created.display());
    }
    for file in ["registry.db", "registry.lock", "master.key"] {
        assert_eq!(mode(&data.join(file)), 0o600, "{file}");
    }
    drop(app);
}

#[tokio::test]
async fn files_left_readable_are_made_private_and_a_readable_key_is_refused() {
    let mut app = TestApp::spawn().await;
    let mut dr = app.physician("dr-modes", "NL-AMC").await;
    dr.submit_case(submission("ERN-LUNG", national("NL", &bsn(1))))
        .await
        .unwrap();
    app.stop_server().await;
    let key = app.dir.path().join("master.key");
    let files: Vec<_> = data_files(&app)
        .await
        .into_iter()
        .filter(|f| *f != key && f.exists())
        .collect();
    if app.is_sqlite() {
        assert!(files.len() >= 2, "{files:?}");
    }
    // As an earlier version left them.
    for file in &files {
        std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let restarted = Application::build(args(), &app.database_url, &key)
        .await
        .expect("starts");
    for file in &files {
        assert_eq!(mode(file), 0o600, "{}", file.display());
    }
    drop(restarted);

    // The master key is a secret: one others could read may have been read, so the
    // service refuses it rather than narrowing it.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
    match Application::build(args(), &app.database_url, &key).await {
        Err(StartupError::Key(KeyError::Permissions(path))) => assert_eq!(path, key),
        Err(other) => panic!("{other}"),
        Ok(_) => panic!("started with a group-readable master key"),
    }
}

/// The command line opens the database too: `admin` and `audit verify` narrow database
/// files an earlier version left readable, as `serve` does; `keygen` creates the missing
/// directories of its key file 0700 and the key 0600.
#[tokio::test]
async fn the_command_line_narrows_modes_and_keygen_creates_private_directories() {
    let mut app = TestApp::spawn().await;
    if !app.is_sqlite() {
        return; // The files are PostgreSQL's, not the service's.
    }
    let mut dr = app.physician("dr-modes", "NL-AMC").await;
    dr.submit_case(submission("ERN-LUNG", national("NL", &bsn(1))))
        .await
        .unwrap();
    app.stop_server().await;
    let db = app.dir.path().join("registry.db");
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ern-registry"))
            .env("ERN_LOG", "warn")
            .arg("--data-dir")
            .arg(app.dir.path())
            .args(["--database-url", &app.database_url])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    for command in [&["admin", "list-registries"][..], &["audit", "verify"][..]] {
        std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
        cli(command);
        assert_eq!(mode(&db), 0o600, "after {command:?}");
    }

    let out = app.dir.path().join("new").join("keys").join("master.key");
    cli(&["keygen", "--out", out.to_str().unwrap()]);
    assert_eq!(mode(&out), 0o600);
    for dir in [
        out.parent().unwrap(),
        out.parent().unwrap().parent().unwrap(),
    ] {
        assert_eq!(mode(dir), 0o700, "{}", dir.display());
    }
}
