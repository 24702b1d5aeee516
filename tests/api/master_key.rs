//! Key identity: a database starts only with the master secret it was made with. A missing
//! key file, another key, a recreated parameter file or a wrong passphrase stop `serve`
//! (and `demo` and `audit verify`) with a message that says what to restore; a new secret
//! is created only for an empty database.

use ern_registry::store::db;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ern_registry::auth::Role;
use ern_registry::config::ServeArgs;
use ern_registry::keys::{KdfFile, KeyError, MasterSecret, Passphrase};
use ern_registry::startup::{Application, StartupError, open_store};
use zeroize::Zeroizing;

use crate::helpers::*;

const PASSPHRASE: &[u8] = b"correct horse battery staple";

fn args() -> ServeArgs {
    ServeArgs {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..ServeArgs::default()
    }
}

fn passphrase(bytes: &[u8]) -> Passphrase {
    Passphrase::new(Zeroizing::new(bytes.to_vec())).unwrap()
}

/// Builds the server in this process and expects it to refuse.
async fn refused(args: ServeArgs, url: &str, key_file: &Path) -> StartupError {
    match Application::build(args, url, key_file).await {
        Ok(_) => panic!("the server started"),
        Err(e) => e,
    }
}

/// A TestApp with one submitted case (a pseudonym and audit entries), its server stopped.
async fn app_with_a_patient(args: ServeArgs) -> TestApp {
    let mut app = TestApp::spawn_with(args).await;
    let mut dr = app.physician("dr-key", "NL-AMC").await;
    dr.submit_case(submission("ERN-LUNG", national("NL", &bsn(1))))
        .await
        .unwrap();
    app.stop_server().await;
    app
}

fn key_file(app: &TestApp) -> PathBuf {
    app.dir.path().join("master.key")
}

/// Puts another, valid key file at `path`.
fn other_key(path: &Path) {
    let _ = std::fs::remove_file(path);
    MasterSecret::create_new(path).unwrap();
}

fn binary() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ern-registry"));
    command
        .env("ERN_LOG", "warn")
        .env_remove("ERN_MASTER_KEY_FILE")
        .env_remove("ERN_MASTER_PASSPHRASE")
        .env_remove("ERN_MASTER_PASSPHRASE_FILE")
        .env_remove("ERN_MASTER_KDF_FILE")
        .env_remove("ERN_REQUIRE_MASTER_KEY");
    command
}

/// Runs the binary and expects it to stop by itself, unsuccessfully, within a while;
/// returns what it printed on stderr. One that keeps running (a server that started) is
/// killed and fails the test.
pub async fn must_refuse(mut command: Command) -> String {
    let mut child = command
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the binary");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut stderr = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
            assert!(!status.success(), "it succeeded: {stderr}");
            return stderr;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("it did not stop: it started");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `serve` of the real binary on `app`'s database and key file.
fn serve(app: &TestApp) -> Command {
    let mut command = binary();
    command
        .arg("--data-dir")
        .arg(app.dir.path())
        .args(["--database-url", &app.database_url, "serve", "--listen"])
        .arg(format!("127.0.0.1:{}", free_port()));
    command
}

#[tokio::test]
async fn serve_refuses_a_missing_key_file_instead_of_creating_one() {
    let app = app_with_a_patient(args()).await;
    let key = key_file(&app);
    let backup = app.dir.path().join("backup.key");
    std::fs::rename(&key, &backup).unwrap();

    let stderr = must_refuse(serve(&app)).await;
    assert!(
        stderr.contains(&format!("the master key file {} is missing", key.display())),
        "{stderr}"
    );
    assert!(
        stderr.contains("Restore the master key file this database was made with from your backup"),
        "{stderr}"
    );
    assert!(stderr.contains("No new secret is created"), "{stderr}");
    assert!(!key.exists(), "a new key was created");

    // Restored from the backup, it starts.
    std::fs::rename(&backup, &key).unwrap();
    Application::build(args(), &app.database_url, &key)
        .await
        .expect("starts with its own key");
}

/// `keygen` does not make a key where `serve` would take it for a database bound to
/// another (a defences audit of 2026-12-07 deleted `master.key` and got a new one);
/// `--out` writes one elsewhere, and a database not there yet gets one.
#[tokio::test]
async fn keygen_refuses_a_new_key_for_a_database_bound_to_one() {
    let app = app_with_a_patient(args()).await;
    let key = key_file(&app);
    let backup = app.dir.path().join("backup.key");
    std::fs::rename(&key, &backup).unwrap();
    let keygen = |extra: &[&str]| {
        let mut command = binary();
        command
            .arg("--data-dir")
            .arg(app.dir.path())
            .args(["--database-url", &app.database_url, "keygen"])
            .args(extra)
            .env_remove("ERN_MASTER_KEY_FILE");
        command
    };
    let stderr = must_refuse(keygen(&[])).await;
    assert!(
        stderr.contains("is bound to a master secret already"),
        "{stderr}"
    );
    assert!(!key.exists(), "a new key was written");
    let elsewhere = app.dir.path().join("elsewhere.key");
    let made = keygen(&["--out", elsewhere.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    assert!(elsewhere.exists());
    // A new data directory gets its key.
    let fresh = tempfile::tempdir().unwrap();
    let made = binary()
        .arg("--data-dir")
        .arg(fresh.path())
        .arg("keygen")
        .env_remove("DATABASE_URL")
        .env_remove("ERN_MASTER_KEY_FILE")
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    assert!(fresh.path().join("master.key").exists());
}

#[tokio::test]
async fn serve_refuses_another_key() {
    let app = app_with_a_patient(args()).await;
    let key = key_file(&app);
    let fingerprint = MasterSecret::load(&key).unwrap().fingerprint();
    let elsewhere = tempfile::tempdir().unwrap();
    let moved = elsewhere.path().join("restored.key");
    std::fs::copy(&key, &moved).unwrap();
    other_key(&key);
    let err = refused(args(), &app.database_url, &key).await;
    assert!(
        matches!(&err, StartupError::MasterMismatch { recorded, .. } if *recorded == fingerprint),
        "{err}"
    );
    let message = err.to_string();
    assert!(
        message.contains("is not the one this database was made with"),
        "{message}"
    );
    assert!(message.contains(&fingerprint.to_string()), "{message}");
    assert!(message.contains("from your backup"), "{message}");

    // The right key starts it, wherever it lies.
    Application::build(args(), &app.database_url, &moved)
        .await
        .expect("starts with its own key");
}

#[tokio::test]
async fn serve_refuses_a_lost_parameter_file_or_a_wrong_passphrase() {
    let with_passphrase = |bytes: &[u8]| ServeArgs {
        master_passphrase: Some(passphrase(bytes)),
        ..args()
    };
    let app = app_with_a_patient(with_passphrase(PASSPHRASE)).await;
    let key = key_file(&app);
    let kdf = KdfFile::default_path(&key);
    let backup = app.dir.path().join("backup.kdf");
    std::fs::copy(&kdf, &backup).unwrap();

    // A wrong passphrase.
    let err = refused(
        with_passphrase(b"correct horse battery stapler"),
        &app.database_url,
        &key,
    )
    .await;
    assert!(
        matches!(err, StartupError::Key(KeyError::WrongPassphrase(_))),
        "{err}"
    );

    // The parameter file lost: the right passphrase alone does not recreate the secret,
    // and no new salt is drawn.
    std::fs::remove_file(&kdf).unwrap();
    let err = refused(with_passphrase(PASSPHRASE), &app.database_url, &key).await;
    assert!(matches!(err, StartupError::MasterMissing { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("Restore the parameter file this database was made with from your backup"),
        "{err}"
    );
    assert!(!kdf.exists(), "a new parameter file was created");

    // A new parameter file (another salt) for the same passphrase: another secret.
    KdfFile::create_new(&kdf, &passphrase(PASSPHRASE)).unwrap();
    let err = refused(with_passphrase(PASSPHRASE), &app.database_url, &key).await;
    assert!(matches!(err, StartupError::MasterMismatch { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("give the passphrase it was made with"),
        "{err}"
    );

    // The backup and the passphrase together start it.
    std::fs::remove_file(&kdf).unwrap();
    std::fs::copy(&backup, &kdf).unwrap();
    Application::build(with_passphrase(PASSPHRASE), &app.database_url, &key)
        .await
        .expect("starts with its own parameter file and passphrase");
}

/// The admin command line finds the passphrase's parameter file where `serve` is told
/// it is (`--master-kdf-file`, `ERN_MASTER_KDF_FILE`), not only beside the key file.
#[tokio::test]
async fn admin_commands_take_the_parameter_file_serve_is_given() {
    let app = app_with_a_patient(ServeArgs {
        master_passphrase: Some(passphrase(PASSPHRASE)),
        ..args()
    })
    .await;
    let moved = app.dir.path().join("elsewhere.kdf");
    std::fs::rename(KdfFile::default_path(&key_file(&app)), &moved).unwrap();
    let verify = |kdf: Option<(&str, &Path)>| {
        let mut command = binary();
        command
            .arg("--data-dir")
            .arg(app.dir.path())
            .args(["--database-url", &app.database_url, "audit", "verify"])
            .env(
                "ERN_MASTER_PASSPHRASE",
                std::str::from_utf8(PASSPHRASE).unwrap(),
            )
            .env_remove("ERN_MASTER_KDF_FILE");
        match kdf {
            Some(("flag", path)) => {
                command.arg("--master-kdf-file").arg(path);
            }
            Some((_, path)) => {
                command.env("ERN_MASTER_KDF_FILE", path);
            }
            None => {}
        }
        command.output().unwrap()
    };
    for how in ["flag", "environment"] {
        let out = verify(Some((how, &moved)));
        assert!(
            out.status.success(),
            "{how}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Without it, the parameter file is looked for beside the key file, and not found.
    let out = verify(None);
    assert!(!out.status.success());
    assert!(
        !KdfFile::default_path(&key_file(&app)).exists(),
        "no parameter file was created"
    );
}

#[tokio::test]
async fn a_database_of_an_earlier_version_takes_the_fingerprint_of_the_key_in_use() {
    let app = app_with_a_patient(args()).await;
    let key = key_file(&app);
    let fingerprint = MasterSecret::load(&key).unwrap().fingerprint();
    assert_eq!(
        app.store.master_fingerprint().await.unwrap(),
        Some(fingerprint.clone()),
        "recorded at first start"
    );
    // As an earlier version left it: data, no fingerprint.
    db::query("DELETE FROM master_key")
        .execute(app.store.pool())
        .await
        .unwrap();

    // Without its key it does not start, and gets no new one.
    let backup = app.dir.path().join("backup.key");
    std::fs::rename(&key, &backup).unwrap();
    let err = refused(args(), &app.database_url, &key).await;
    assert!(matches!(err, StartupError::MasterMissing { .. }), "{err}");
    assert!(err.to_string().contains("earlier version"), "{err}");
    assert!(!key.exists(), "a new key was created");

    // Another key does not verify the last audit entry.
    other_key(&key);
    let err = refused(args(), &app.database_url, &key).await;
    assert!(
        matches!(err, StartupError::MasterAuditMismatch { .. }),
        "{err}"
    );
    assert_eq!(app.store.master_fingerprint().await.unwrap(), None);

    // Its own key starts it and is recorded; from then on another key is refused.
    std::fs::remove_file(&key).unwrap();
    std::fs::rename(&backup, &key).unwrap();
    drop(
        Application::build(args(), &app.database_url, &key)
            .await
            .expect("starts with the key in use"),
    );
    assert_eq!(
        app.store.master_fingerprint().await.unwrap(),
        Some(fingerprint)
    );
    let other = app.dir.path().join("other.key");
    other_key(&other);
    let err = refused(args(), &app.database_url, &other).await;
    assert!(matches!(err, StartupError::MasterMismatch { .. }), "{err}");
}

#[tokio::test]
async fn only_an_empty_database_gets_a_new_key() {
    // Centres and principals depend on no secret: an admin may create them before the
    // first start, and the first start still creates the key.
    let dir = tempfile::tempdir().unwrap();
    let url = fresh_database(&dir).await;
    let store = open_store(&url, 2).await.unwrap();
    store
        .create_centre("NL-AMC", "AMC", "NL", &["ERN-LUNG".into()])
        .await
        .unwrap();
    store
        .create_principal("dr-first", Role::Physician, Some("NL-AMC"), &[])
        .await
        .unwrap();
    assert!(!store.holds_master_derived_data().await.unwrap());
    let key = dir.path().join("master.key");
    drop(
        Application::build(args(), &url, &key)
            .await
            .expect("an empty database gets a new key"),
    );
    assert_eq!(
        store.master_fingerprint().await.unwrap(),
        Some(MasterSecret::load(&key).unwrap().fingerprint())
    );
    // Bound to that key from now on, even before any patient: the key is not replaced.
    std::fs::remove_file(&key).unwrap();
    let err = refused(args(), &url, &key).await;
    assert!(matches!(err, StartupError::MasterMissing { .. }), "{err}");
    assert!(!key.exists());
}

/// `audit verify` or `demo` on `app`'s database with the key file `key`.
fn run(app: &TestApp, subcommand: &[&str], key: &Path) -> Command {
    let mut command = binary();
    command
        .args(["--database-url", &app.database_url])
        .args(subcommand)
        .arg("--master-key-file")
        .arg(key);
    command
}

#[tokio::test]
async fn audit_verify_checks_the_key_too() {
    let app = app_with_a_patient(args()).await;
    let other = app.dir.path().join("other.key");
    other_key(&other);
    let stderr = must_refuse(run(&app, &["audit", "verify"], &other)).await;
    assert!(
        stderr.contains("is not the one this database was made with"),
        "{stderr}"
    );
    // Said for this command, not in `serve`'s words (a claims audit of 2026-12-07).
    assert!(
        stderr.contains("run the command again") && !stderr.contains("start"),
        "{stderr}"
    );
    let own = run(&app, &["audit", "verify"], &key_file(&app))
        .output()
        .unwrap();
    assert!(
        own.status.success(),
        "{}",
        String::from_utf8_lossy(&own.stderr)
    );
}

/// `demo` checks the key of a database it may write to (synthetic patients only).
#[tokio::test]
async fn demo_checks_the_key_too() {
    let mut app = TestApp::spawn_with(args()).await;
    app.stop_server().await;
    let own = run(&app, &["demo", "--patients", "3"], &key_file(&app))
        .output()
        .unwrap();
    assert!(
        own.status.success(),
        "{}",
        String::from_utf8_lossy(&own.stderr)
    );
    let cases = app.count("cases").await;
    assert_eq!(cases, 3);

    let other = app.dir.path().join("other.key");
    other_key(&other);
    let stderr = must_refuse(run(&app, &["demo", "--patients", "3"], &other)).await;
    assert!(
        stderr.contains("is not the one this database was made with"),
        "{stderr}"
    );
    let missing = app.dir.path().join("missing.key");
    let stderr = must_refuse(run(&app, &["demo", "--patients", "3"], &missing)).await;
    assert!(stderr.contains("is missing"), "{stderr}");
    assert!(!missing.exists(), "demo created a new key");
    assert_eq!(app.count("cases").await, cases, "demo wrote nothing");

    let own = run(&app, &["demo", "--patients", "3"], &key_file(&app))
        .output()
        .unwrap();
    assert!(
        own.status.success(),
        "{}",
        String::from_utf8_lossy(&own.stderr)
    );
    assert_eq!(app.count("cases").await, cases + 3, "demo added patients");
}

/// A database with a real patient is refused before the key is even read: nothing is
/// written, not even a new key file.
#[tokio::test]
async fn demo_refuses_a_database_with_real_patients_whatever_the_key() {
    let app = app_with_a_patient(args()).await;
    let tables = [
        "cases",
        "consent_events",
        "centres",
        "principals",
        "audit_log",
    ];
    let mut before = Vec::new();
    for table in tables {
        before.push(app.count(table).await);
    }
    let missing = app.dir.path().join("missing.key");
    for key in [key_file(&app), missing.clone()] {
        let stderr = must_refuse(run(&app, &["demo", "--patients", "3"], &key)).await;
        assert!(
            stderr.contains("refused: this database holds patient data"),
            "{stderr}"
        );
    }
    assert!(!missing.exists(), "demo created a new key");
    for (table, count) in tables.iter().zip(before) {
        assert_eq!(app.count(table).await, count, "{table}");
    }
}

/// `--require-master-key`: even an empty database gets no new secret; the server refuses
/// to start without the key file, and starts once it is there.
#[tokio::test]
async fn require_master_key_refuses_to_create_one_even_for_an_empty_database() {
    let dir = tempfile::tempdir().unwrap();
    let url = fresh_database(&dir).await;
    let key = dir.path().join("master.key");
    let strict = ServeArgs {
        require_master_key: true,
        ..args()
    };
    let err = refused(strict.clone(), &url, &key).await;
    assert!(matches!(err, StartupError::Key(_)), "{err}");
    assert!(!key.exists(), "a key was created");
    // Without the flag, the empty database gets its key; with it, that key is used.
    drop(
        Application::build(args(), &url, &key)
            .await
            .expect("an empty database gets a new key"),
    );
    assert!(key.exists());
    drop(
        Application::build(strict, &url, &key)
            .await
            .expect("starts with the key in place"),
    );
}
