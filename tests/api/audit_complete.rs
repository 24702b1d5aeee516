//! A complete audit (issue #12), tested as the attacker: someone with write access to the
//! database (not the master secret) edits tables with SQL, then the real `audit verify`
//! binary must fail and name what was touched. Also: admin CLI actions and failed writes
//! are in the chain, and an anchored head catches a truncated tail.

use std::path::PathBuf;
use std::process::{Command, Output};

use ern_registry::proto::{self, ConsentScope};
use ern_registry::store::db;
use tonic::Code;

use crate::helpers::*;

impl TestApp {
    fn key_file(&self) -> PathBuf {
        self.dir.path().join("master.key")
    }

    /// Runs the real binary against this app's database and master key.
    fn cli(&self, args: &[&str]) -> Output {
        self.cli_with(args, &[])
    }

    /// [`TestApp::cli`] with these environment variables set too.
    fn cli_with(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_ern-registry"))
            .arg("--database-url")
            .arg(&self.database_url)
            .args(args)
            .env("ERN_MASTER_KEY_FILE", self.key_file())
            .env_remove("ERN_MASTER_PASSPHRASE")
            .env_remove("ERN_MASTER_PASSPHRASE_FILE")
            .envs(env.iter().copied())
            .output()
            .expect("run the binary")
    }

    async fn sql(&self, sql: &str) {
        self.store
            .pool()
            .execute_raw(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    async fn ids(&self, sql: &str) -> Vec<i64> {
        db::query(sql)
            .fetch_all(self.store.pool())
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<i64>(0))
            .collect()
    }

    /// `audit verify` (with `extra` arguments) must fail; returns its stderr.
    fn verify_fails(&self, extra: &[&str], what: &str) -> String {
        let mut args = vec!["audit", "verify"];
        args.extend_from_slice(extra);
        let out = self.cli(&args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !out.status.success(),
            "{what}: audit verify succeeded: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        stderr
    }

    /// `audit verify` (with `extra` arguments) must succeed; returns its stdout.
    fn verify_passes(&self, extra: &[&str], what: &str) -> String {
        let mut args = vec!["audit", "verify"];
        args.extend_from_slice(extra);
        let out = self.cli(&args);
        assert!(
            out.status.success(),
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// An app with `n` accepted submissions: entries 1..=n.
async fn app_with_submissions(n: u32) -> TestApp {
    let app = TestApp::spawn().await;
    let mut dr = app.physician("dr-audit", "NL-AMC").await;
    for seed in 0..n {
        dr.submit_case(submission("ERN-LUNG", national("NL", &bsn(seed))))
            .await
            .unwrap();
    }
    app
}

/// Copies audit row `from` to a new row numbered `to`, column by column, unchanged.
fn copy_entry(from: i64, to: i64) -> String {
    format!(
        "DROP TABLE IF EXISTS attack_copy; \
         CREATE TABLE attack_copy AS SELECT * FROM audit_log WHERE seq = {from}; \
         UPDATE attack_copy SET seq = {to}; \
         INSERT INTO audit_log SELECT * FROM attack_copy; DROP TABLE attack_copy;"
    )
}

#[tokio::test]
async fn audit_verify_reads_past_the_head_and_checks_the_head_both_ways() {
    let app = app_with_submissions(6).await;
    app.verify_passes(&[], "intact");
    let save_head = "DROP TABLE IF EXISTS attack_head; \
                     CREATE TABLE attack_head AS SELECT * FROM audit_head;";
    let restore_head = "UPDATE audit_head SET seq = (SELECT seq FROM attack_head), \
                        mac = (SELECT mac FROM attack_head);";
    app.sql(save_head).await;

    // A row appended after the head (the head left alone).
    app.sql(&copy_entry(6, 7)).await;
    let stderr = app.verify_fails(&[], "row after the head");
    assert!(stderr.contains("entry 7:"), "{stderr}");
    app.sql("DELETE FROM audit_log WHERE seq = 7").await;
    app.verify_passes(&[], "restored");

    // The head moved back to entry 4 (with entry 4's MAC): entries 5 and 6 lie after it.
    app.sql("UPDATE audit_head SET seq = 4, mac = (SELECT mac FROM audit_log WHERE seq = 4)")
        .await;
    let stderr = app.verify_fails(&[], "head moved back");
    assert!(stderr.contains("entry 5:"), "{stderr}");
    // ... and an entry after it edited: named itself.
    app.sql("UPDATE audit_log SET outcome = 'NOT_FOUND' WHERE seq = 6")
        .await;
    let stderr = app.verify_fails(&[], "head moved back, later row edited");
    assert!(stderr.contains("entry 6:"), "{stderr}");
    app.sql("UPDATE audit_log SET outcome = 'OK' WHERE seq = 6")
        .await;
    app.sql(restore_head).await;
    app.verify_passes(&[], "restored");

    // The head reset to nothing: every entry lies after it.
    app.sql("UPDATE audit_head SET seq = 0, mac = ''").await;
    let stderr = app.verify_fails(&[], "head reset to 0");
    assert!(stderr.contains("entry 1:"), "{stderr}");
    app.sql(restore_head).await;

    // The head pointing past the last row: entry 7 is missing.
    app.sql("UPDATE audit_head SET seq = 9").await;
    let stderr = app.verify_fails(&[], "head ahead");
    assert!(stderr.contains("entry 7:"), "{stderr}");
    app.sql(restore_head).await;

    // The head's MAC replaced.
    app.sql("UPDATE audit_head SET mac = (SELECT mac FROM audit_log WHERE seq = 5)")
        .await;
    let stderr = app.verify_fails(&[], "head MAC");
    assert!(stderr.contains("entry 6:"), "{stderr}");
    app.sql(restore_head).await;

    // A row slipped in before the first entry.
    app.sql(&copy_entry(1, 0)).await;
    let stderr = app.verify_fails(&[], "row numbered 0");
    assert!(stderr.contains("entry 0:"), "{stderr}");
    app.sql("DELETE FROM audit_log WHERE seq = 0").await;

    // Deleted and swapped rows are named too.
    app.sql(
        "UPDATE audit_log SET seq = -5 WHERE seq = 5; \
             UPDATE audit_log SET seq = 5 WHERE seq = 4; \
             UPDATE audit_log SET seq = 4 WHERE seq = -5;",
    )
    .await;
    let stderr = app.verify_fails(&[], "swapped");
    assert!(stderr.contains("entry 4:"), "{stderr}");
    app.sql(
        "UPDATE audit_log SET seq = -5 WHERE seq = 5; \
             UPDATE audit_log SET seq = 5 WHERE seq = 4; \
             UPDATE audit_log SET seq = 4 WHERE seq = -5;",
    )
    .await;
    app.verify_passes(&[], "restored");
    app.sql("DELETE FROM audit_log WHERE seq = 3").await;
    let stderr = app.verify_fails(&[], "deleted");
    assert!(stderr.contains("entry 3:"), "{stderr}");
}

#[tokio::test]
async fn a_type_confused_column_is_named_with_its_entry() {
    let app = app_with_submissions(4).await;
    if !app.is_sqlite() {
        return; // PostgreSQL's typed columns refuse a text in an integer column.
    }
    let items = app.ids("SELECT items FROM audit_log WHERE seq = 3").await[0];
    app.sql("UPDATE audit_log SET items = 'many' WHERE seq = 3")
        .await;
    let stderr = app.verify_fails(&[], "text in items");
    assert!(stderr.contains("entry 3: its items"), "{stderr}");
    app.sql(&format!(
        "UPDATE audit_log SET items = {items} WHERE seq = 3"
    ))
    .await;
    app.verify_passes(&[], "restored");
    app.sql("UPDATE audit_log SET principal = X'6472' WHERE seq = 2")
        .await;
    let stderr = app.verify_fails(&[], "blob in principal");
    assert!(stderr.contains("entry 2: its principal"), "{stderr}");
    app.sql("UPDATE audit_log SET principal = 'dr-audit' WHERE seq = 2")
        .await;
    app.verify_passes(&[], "restored");
    app.sql("UPDATE audit_head SET seq = 'four'").await;
    let stderr = app.verify_fails(&[], "text in the head");
    assert!(stderr.contains("head"), "{stderr}");
}

const INCLUSION: &[ConsentScope] = &[ConsentScope::RegistryInclusion];

/// Runs `attack`, expects `audit verify` to fail naming `named`, runs `undo` and expects
/// the log intact again.
async fn attack(app: &TestApp, what: &str, attack: &str, named: &str, undo: &str) {
    app.sql(attack).await;
    let stderr = app.verify_fails(&[], what);
    assert!(
        stderr.contains(named),
        "{what}: wanted {named:?} in {stderr}"
    );
    app.sql(undo).await;
    app.verify_passes(&[], &format!("{what}, undone"));
}

#[tokio::test]
async fn consent_history_and_erasure_tombstones_are_tamper_evident() {
    let app = TestApp::spawn().await;
    let mut dr = app.physician("dr-audit", "NL-AMC").await;
    let erased = dr
        .submit_case(submission("ERN-EYE", national("NL", &bsn(1))))
        .await
        .unwrap()
        .into_inner()
        .pseudonym;
    dr.submit_case(submission("ERN-EYE", national("NL", &bsn(2))))
        .await
        .unwrap();
    let mut officer = app.officer("co-eye", &["ERN-EYE"]).await;
    officer
        .record_consent(proto::RecordConsentRequest {
            registry: "ERN-EYE".into(),
            patient: by_identifiers(national("NL", &bsn(3))),
            decisions: vec![consent(
                ConsentScope::Recontact,
                proto::ConsentState::Granted,
                "2024-05-01T00:00:00Z",
            )],
            client_reference: String::new(),
        })
        .await
        .unwrap();
    officer
        .withdraw_consent(withdrawal("ERN-EYE", by_pseudonym(&erased), INCLUSION))
        .await
        .unwrap();
    app.verify_passes(&[], "intact");
    let events = app.ids("SELECT id FROM consent_events ORDER BY id").await;
    assert_eq!(
        events.len(),
        7,
        "2 + 2 attested, 1 recorded, the inclusion withdrawn and the research grant with it"
    );
    let withdrawal_event = events[5];
    // The first patient's inclusion grant: superseded by the withdrawal, so no other row
    // refers to it and it can be deleted.
    let superseded = events[0];
    let research_of_second = events[3];
    let tombstone = app.ids("SELECT id FROM erasures").await[0];
    let save = "DROP TABLE IF EXISTS attack_events; DROP TABLE IF EXISTS attack_erasures; \
                CREATE TABLE attack_events AS SELECT * FROM consent_events; \
                CREATE TABLE attack_erasures AS SELECT * FROM erasures;";
    app.sql(save).await;

    // The withdrawal turned back into a grant.
    attack(
        &app,
        "withdrawal edited",
        &format!("UPDATE consent_events SET state = 'granted' WHERE id = {withdrawal_event}"),
        &format!("consent event {withdrawal_event}:"),
        &format!("UPDATE consent_events SET state = 'withdrawn' WHERE id = {withdrawal_event}"),
    )
    .await;
    // A decision deleted.
    attack(
        &app,
        "event deleted",
        &format!("DELETE FROM consent_events WHERE id = {superseded}"),
        &format!("consent event {superseded}:"),
        &format!("INSERT INTO consent_events SELECT * FROM attack_events WHERE id = {superseded}"),
    )
    .await;
    // A decision inserted (a copy of a real one, under a new id).
    attack(
        &app,
        "event inserted",
        &format!(
            "DROP TABLE IF EXISTS attack_copy; \
             CREATE TABLE attack_copy AS SELECT * FROM consent_events WHERE id = {research_of_second}; \
             UPDATE attack_copy SET id = 9999, given_at = {later}; \
             INSERT INTO consent_events SELECT * FROM attack_copy;",
            later = app.one_ms_later("given_at"),
        ),
        "consent event 9999:",
        "DELETE FROM consent_events WHERE id = 9999",
    )
    .await;
    // PostgreSQL only (it keeps microseconds, and orders decisions of the same instant by
    // them; the store writes whole milliseconds): a decision dated a part of a millisecond
    // later, and one dated past chrono's range (named, not a panic).
    if !app.is_sqlite() {
        for (what, date) in [
            (
                "dated 500 microseconds later",
                "given_at + INTERVAL '500 microseconds'",
            ),
            ("dated at infinity", "'infinity'"),
        ] {
            attack(
                &app,
                what,
                &format!("UPDATE consent_events SET given_at = {date} WHERE id = {superseded}"),
                &format!("consent event {superseded}:"),
                &format!(
                    "UPDATE consent_events SET given_at = \
                     (SELECT given_at FROM attack_events WHERE id = {superseded}) \
                     WHERE id = {superseded}"
                ),
            )
            .await;
        }
    }
    // `refile(table, row, e)`: the rows of `table` matching `row` filed under the number
    // of event `e`'s patient (as saved).
    let refile = |table: &str, row: &str, e: i64| {
        format!(
            "UPDATE {table} SET patient = (SELECT patient FROM attack_events WHERE id = {e}) \
             WHERE {row}"
        )
    };
    // A decision moved to another patient: it is read by the patient's number (migration
    // 0019), which its row hash does not cover.
    let withdrawal_row = format!("id = {withdrawal_event}");
    attack(
        &app,
        "withdrawal moved to another patient",
        &refile("consent_events", &withdrawal_row, research_of_second),
        &format!("consent event {withdrawal_event}: filed under a patient number"),
        &refile("consent_events", &withdrawal_row, withdrawal_event),
    )
    .await;
    // Two patients' whole histories swapped, through their keys. `keys(a, b, c, d)`: the
    // key of event `a`'s patient gives way, the key of event `b`'s patient takes event
    // `c`'s pseudonym, then the first takes event `d`'s (pseudonyms as saved).
    let keys = |a: i64, b: i64, c: i64, d: i64| {
        let patient = |e: i64| format!("(SELECT patient FROM attack_events WHERE id = {e})");
        let pseudonym = |e: i64| format!("(SELECT pseudonym FROM attack_events WHERE id = {e})");
        format!(
            "UPDATE patient_keys SET pseudonym = 'giving way' WHERE id = {}; \
             UPDATE patient_keys SET pseudonym = {} WHERE id = {}; \
             UPDATE patient_keys SET pseudonym = {} WHERE id = {};",
            patient(a),
            pseudonym(c),
            patient(b),
            pseudonym(d),
            patient(a),
        )
    };
    let (first, second) = (superseded, research_of_second);
    attack(
        &app,
        "patient keys swapped",
        &keys(first, second, first, second),
        &format!("consent event {superseded}: filed under a patient number"),
        &keys(first, second, second, first),
    )
    .await;
    // A record moved to another patient: read and counted under that patient's consent.
    let case = app.ids("SELECT id FROM cases").await[0];
    let recontact = events[4];
    let case_row = format!("id = {case}");
    attack(
        &app,
        "case moved to another patient",
        &refile("cases", &case_row, recontact),
        &format!("case {case}: filed under a patient number"),
        &refile("cases", &case_row, research_of_second),
    )
    .await;
    // A decision in force (what research counts read) moved to another patient.
    let current_row = format!("event_id = {recontact}");
    attack(
        &app,
        "decision in force moved",
        &refile("consent_current", &current_row, research_of_second),
        &format!("decision in force of consent event {recontact}: filed under"),
        &refile("consent_current", &current_row, recontact),
    )
    .await;
    if !app.is_sqlite() {
        // A second number for a pseudonym, once the keys' unique constraint is gone (on
        // SQLite it cannot be dropped without rebuilding the table): a lookup would take
        // one and hide the decisions filed under the other.
        attack(
            &app,
            "a pseudonym with two numbers",
            "ALTER TABLE patient_keys DROP CONSTRAINT patient_keys_registry_id_pseudonym_key; \
             INSERT INTO patient_keys (registry_id, pseudonym) \
             SELECT registry_id, pseudonym FROM patient_keys ORDER BY id LIMIT 1",
            "patient keys: a pseudonym of registry",
            "DELETE FROM patient_keys WHERE id = (SELECT MAX(id) FROM patient_keys); \
             ALTER TABLE patient_keys ADD CONSTRAINT patient_keys_registry_id_pseudonym_key \
             UNIQUE (registry_id, pseudonym)",
        )
        .await;
    }
    if app.is_sqlite() {
        // SQLite's column may hold NULL (PostgreSQL's is NOT NULL): a decision with no
        // number would be found by no lookup.
        attack(
            &app,
            "withdrawal hidden",
            &format!("UPDATE consent_events SET patient = NULL WHERE id = {withdrawal_event}"),
            &format!("consent event {withdrawal_event}: filed under a patient number"),
            &refile("consent_events", &withdrawal_row, withdrawal_event),
        )
        .await;
    }
    // The tombstone says less was erased; then it disappears altogether.
    attack(
        &app,
        "tombstone edited",
        &format!("UPDATE erasures SET cases_erased = 0 WHERE id = {tombstone}"),
        &format!("erasure tombstone {tombstone}:"),
        &format!("UPDATE erasures SET cases_erased = 1 WHERE id = {tombstone}"),
    )
    .await;
    attack(
        &app,
        "tombstone deleted",
        &format!("DELETE FROM erasures WHERE id = {tombstone}"),
        &format!("erasure tombstone {tombstone}:"),
        "INSERT INTO erasures SELECT * FROM attack_erasures",
    )
    .await;
    if app.is_sqlite() {
        attack(
            &app,
            "type-confused event",
            &format!(
                "UPDATE consent_events SET given_at = 'soon' WHERE id = {}",
                events[0]
            ),
            &format!("consent event {}:", events[0]),
            &format!(
                "UPDATE consent_events SET given_at = \
                 (SELECT given_at FROM attack_events WHERE id = {0}) WHERE id = {0}",
                events[0]
            ),
        )
        .await;
    }
}

/// A self-signed client certificate (PEM) in `dir`.
fn certificate(dir: &std::path::Path) -> PathBuf {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["client".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let path = dir.join("client.pem");
    std::fs::write(&path, cert.pem()).unwrap();
    path
}

#[tokio::test]
async fn admin_cli_actions_are_audited_with_their_outcome() {
    let app = TestApp::spawn().await;
    let cert = certificate(app.dir.path());
    let cert = cert.to_str().unwrap();
    let ok = |args: &[&str]| {
        let out = app.cli(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    ok(&[
        "admin",
        "create-centre",
        "--code",
        "NL-AMC",
        "--name",
        "AMC",
        "--country",
        "NL",
        "--ern",
        "ERN-EYE",
    ]);
    let created = ok(&[
        "admin",
        "create-principal",
        "--name",
        "dr-cli",
        "--role",
        "physician",
        "--centre",
        "NL-AMC",
    ]);
    let key_id = |out: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix("key id: "))
            .unwrap()
            .to_string()
    };
    let first_key = key_id(&created);
    ok(&["admin", "issue-key", "--principal", "dr-cli"]);
    ok(&["admin", "revoke-key", "--key-id", &first_key]);
    ok(&["admin", "rotate-key", "--registry", "ERN-EYE"]);
    ok(&[
        "admin",
        "set-min-cell-count",
        "--registry",
        "ERN-EYE",
        "--k",
        "7",
    ]);
    ok(&[
        "admin",
        "set-protection-level",
        "--registry",
        "ERN-EYE",
        "--level",
        "3",
    ]);
    ok(&[
        "admin",
        "bind-certificate",
        "--principal",
        "dr-cli",
        "--cert",
        cert,
    ]);
    ok(&["admin", "disable-principal", "--name", "dr-cli"]);
    // Refused actions are recorded with their outcome.
    let again = app.cli(&[
        "admin",
        "create-centre",
        "--code",
        "NL-AMC",
        "--name",
        "AMC",
        "--country",
        "NL",
        "--ern",
        "ERN-EYE",
    ]);
    assert!(!again.status.success());
    let unknown = app.cli(&["admin", "rotate-key", "--registry", "ERN-NONE"]);
    assert!(!unknown.status.success());
    // A principal of a shape the service refuses: an admin bound to a centre.
    let misshapen = app.cli(&[
        "admin",
        "create-principal",
        "--name",
        "root-at-amc",
        "--role",
        "admin",
        "--centre",
        "NL-AMC",
    ]);
    assert!(!misshapen.status.success());
    assert!(
        String::from_utf8_lossy(&misshapen.stderr).contains("bound to no centre"),
        "{}",
        String::from_utf8_lossy(&misshapen.stderr)
    );
    let bad_cert = app.cli(&[
        "admin",
        "bind-certificate",
        "--principal",
        "dr-cli",
        "--cert",
        "/nonexistent/cert.pem",
    ]);
    assert!(!bad_cert.status.success());

    let rows =
        db::query("SELECT principal, role, method, registry, outcome FROM audit_log ORDER BY seq")
            .fetch_all(app.store.pool())
            .await
            .unwrap();
    let cli: Vec<(String, String, String, String)> = rows
        .iter()
        .filter(|r| r.get::<String>(0).starts_with("admin-cli"))
        .map(|r| (r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect();
    let expected = [
        ("AdminCli/CreateCentre", "ERN-EYE", "OK"),
        ("AdminCli/CreatePrincipal", "", "OK"),
        ("AdminCli/IssueKey", "", "OK"),
        ("AdminCli/RevokeKey", "", "OK"),
        ("AdminCli/RotateKey", "ERN-EYE", "OK"),
        ("AdminCli/SetMinCellCount", "ERN-EYE", "OK"),
        ("AdminCli/SetProtectionLevel", "ERN-EYE", "OK"),
        ("AdminCli/BindCertificate", "", "OK"),
        ("AdminCli/DisablePrincipal", "", "OK"),
        ("AdminCli/CreateCentre", "ERN-EYE", "ALREADY_EXISTS"),
        ("AdminCli/RotateKey", "ERN-NONE", "NOT_FOUND"),
        ("AdminCli/CreatePrincipal", "", "INVALID_ARGUMENT"),
        ("AdminCli/BindCertificate", "", "INVALID_ARGUMENT"),
    ];
    assert_eq!(
        cli.iter()
            .map(|(_, m, r, o)| (m.as_str(), r.as_str(), o.as_str()))
            .collect::<Vec<_>>(),
        expected,
        "{rows:?}",
        rows = cli
    );
    assert!(cli.iter().all(|(role, ..)| role == "admin"));
    // What was acted on is named: the key revoked, the principal disabled.
    let targets: Vec<String> = db::query(
        "SELECT target FROM audit_log WHERE method IN ('AdminCli/RevokeKey', 'AdminCli/DisablePrincipal') ORDER BY seq",
    )
    .fetch_all(app.store.pool())
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect();
    assert_eq!(
        targets,
        [format!("key {first_key}"), "principal dr-cli".to_string()]
    );
    app.verify_passes(&[], "admin entries chain");
}

/// Makes inserting a case of centre `centre` fail (a database error, not a refusal).
async fn fail_cases_of(app: &TestApp, centre: &str) {
    let id = app
        .ids(&format!("SELECT id FROM centres WHERE code = '{centre}'"))
        .await[0];
    if app.is_sqlite() {
        app.sql(&format!(
            "CREATE TRIGGER cases_fail BEFORE INSERT ON cases WHEN NEW.centre_id = {id} \
             BEGIN SELECT RAISE(ABORT, 'cases blocked'); END;"
        ))
        .await;
    } else {
        app.sql(&format!(
            "CREATE FUNCTION cases_fail() RETURNS trigger AS $$ \
             BEGIN IF NEW.centre_id = {id} THEN RAISE EXCEPTION 'cases blocked'; END IF; \
             RETURN NEW; END $$ LANGUAGE plpgsql; \
             CREATE TRIGGER cases_fail BEFORE INSERT ON cases \
             FOR EACH ROW EXECUTE FUNCTION cases_fail();"
        ))
        .await;
    }
}

#[tokio::test]
async fn a_write_whose_transaction_fails_still_leaves_its_entry() {
    let app = TestApp::spawn().await;
    let mut good = app.physician("dr-good", "NL-AMC").await;
    let mut bad = app.physician("dr-bad", "BE-UZL").await;
    fail_cases_of(&app, "BE-UZL").await;

    // Alone: its transaction rolls back.
    let err = bad
        .submit_case(submission("ERN-LUNG", national("NL", &bsn(1))))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Internal, "{err:?}");
    // Together with good writes (one batch or several: the failing one is retried alone).
    let mut calls = Vec::new();
    for seed in 10..16 {
        let (mut good, mut bad) = (good.clone(), bad.clone());
        calls.push(tokio::spawn(async move {
            good.submit_case(submission("ERN-LUNG", national("NL", &bsn(seed))))
                .await
                .map(|_| ())
                .map_err(|e| e.code())
        }));
        calls.push(tokio::spawn(async move {
            bad.submit_case(submission("ERN-LUNG", national("NL", &bsn(seed + 100))))
                .await
                .map(|_| ())
                .map_err(|e| e.code())
        }));
    }
    let mut results = Vec::new();
    for call in calls {
        results.push(call.await.unwrap());
    }
    assert_eq!(
        results.iter().filter(|r| r.is_ok()).count(),
        6,
        "{results:?}"
    );
    assert_eq!(
        results
            .iter()
            .filter(|r| **r == Err(Code::Internal))
            .count(),
        6
    );
    good.submit_case(submission("ERN-LUNG", national("NL", &bsn(50))))
        .await
        .unwrap();

    let outcomes: Vec<(String, String)> = app.pairs("SELECT principal, outcome FROM audit_log WHERE method = 'CaseService/SubmitCase' ORDER BY seq").await;
    let count = |who: &str, outcome: &str| {
        outcomes
            .iter()
            .filter(|(p, o)| p == who && o == outcome)
            .count()
    };
    assert_eq!(count("dr-bad", "INTERNAL"), 7, "{outcomes:?}");
    assert_eq!(count("dr-good", "OK"), 7, "{outcomes:?}");
    assert_eq!(app.count("cases").await, 7);
    app.verify_passes(&[], "failure entries chain");
}

#[tokio::test]
async fn an_anchored_head_finds_a_truncated_or_rewritten_tail() {
    // Entries 1-4 write (consent events), 5 and 6 only read.
    let app = TestApp::spawn().await;
    let mut dr = app.physician("dr-audit", "NL-AMC").await;
    let mut pseudonym = String::new();
    for seed in 0..4 {
        pseudonym = dr
            .submit_case(submission("ERN-LUNG", national("NL", &bsn(seed))))
            .await
            .unwrap()
            .into_inner()
            .pseudonym;
    }
    for _ in 0..2 {
        dr.get_case(get_case("ERN-LUNG", &pseudonym)).await.unwrap();
    }
    let out = app.cli(&["audit", "head"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let anchor = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let mac6: String = db::query("SELECT mac FROM audit_log WHERE seq = 6")
        .fetch_one(app.store.pool())
        .await
        .unwrap()
        .get(0);
    assert_eq!(anchor, format!("6:{mac6}"));
    // `audit verify` prints the same anchor.
    let stdout = app.verify_passes(&["--expect-head", &anchor], "anchor at the head");
    assert!(stdout.contains(&anchor), "{stdout}");

    // The log grows: the anchor is still in it.
    dr.get_case(get_case("ERN-LUNG", &pseudonym)).await.unwrap();
    app.verify_passes(&["--expect-head", &anchor], "anchor inside the chain");

    // An anchor that is not in the chain: a wrong MAC for entry 6.
    let wrong = format!("6:{}", "0".repeat(64));
    let stderr = app.verify_fails(&["--expect-head", &wrong], "wrong anchor");
    assert!(stderr.contains("entry 6:"), "{stderr}");

    // A clean truncation of the reads back to entry 4, head and all: the chain alone
    // looks intact; the anchor shows it.
    app.sql(
        "DELETE FROM audit_log WHERE seq > 4; \
         UPDATE audit_head SET seq = 4, mac = (SELECT mac FROM audit_log WHERE seq = 4);",
    )
    .await;
    app.verify_passes(&[], "truncation without an anchor is not detected");
    let stderr = app.verify_fails(&["--expect-head", &anchor], "truncated");
    assert!(stderr.contains("entry 6:"), "{stderr}");
    // Truncating an entry that wrote consent events shows without an anchor: its rows
    // name an entry that is gone.
    let events = app
        .ids("SELECT id FROM consent_events WHERE audit_seq = 4 ORDER BY id")
        .await;
    app.sql(
        "DELETE FROM audit_log WHERE seq > 3; \
         UPDATE audit_head SET seq = 3, mac = (SELECT mac FROM audit_log WHERE seq = 3);",
    )
    .await;
    let stderr = app.verify_fails(&[], "truncated writes");
    assert!(
        stderr.contains(&format!("consent event {}:", events[0])),
        "{stderr}"
    );
    // A malformed anchor is refused, not ignored.
    let out = app.cli(&["audit", "verify", "--expect-head", "six"]);
    assert!(!out.status.success());
}

#[tokio::test]
async fn rows_written_before_rows_were_audited_are_adopted_once() {
    // A database as an earlier version left it: consent events and a tombstone that name
    // no entry (migration 0009 marks them 0), and no adoption yet.
    let app = TestApp::spawn().await;
    let mut dr = app.physician("dr-audit", "NL-AMC").await;
    let erased = dr
        .submit_case(submission("ERN-EYE", national("NL", &bsn(1))))
        .await
        .unwrap()
        .into_inner()
        .pseudonym;
    let mut officer = app.officer("co-eye", &["ERN-EYE"]).await;
    officer
        .withdraw_consent(withdrawal("ERN-EYE", by_pseudonym(&erased), INCLUSION))
        .await
        .unwrap();
    app.sql(
        "DELETE FROM audit_log; UPDATE audit_head SET seq = 0, mac = '', rows_adopted = 0; \
         UPDATE consent_events SET audit_seq = 0; UPDATE erasures SET audit_seq = 0;",
    )
    .await;
    let stdout = app.verify_passes(&[], "legacy rows before adoption");
    // Two attested, the inclusion withdrawn with the research grant, and the tombstone.
    assert!(
        stdout.contains("5 consent events and tombstones"),
        "{stdout}"
    );

    // The next write adopts them in an entry of its own, before its own.
    dr.submit_case(submission("ERN-EYE", national("NL", &bsn(2))))
        .await
        .unwrap();
    let methods: Vec<(String, i64)> = app
        .pairs("SELECT method, items FROM audit_log ORDER BY seq")
        .await;
    assert_eq!(methods[0], ("AuditLog/AdoptRows".to_string(), 5));
    assert_eq!(methods[1].0, "CaseService/SubmitCase");
    app.verify_passes(&[], "adopted");
    let legacy = app
        .ids("SELECT id FROM consent_events WHERE audit_seq = 1")
        .await;
    assert_eq!(legacy.len(), 4);

    // An adopted row edited: the adoption entry names it as a whole.
    attack(
        &app,
        "adopted row edited",
        &format!(
            "UPDATE consent_events SET form_version = 'forged' WHERE id = {}",
            legacy[0]
        ),
        "entry 1:",
        &format!(
            "UPDATE consent_events SET form_version = 'ERN-2024-01' WHERE id = {}",
            legacy[0]
        ),
    )
    .await;
    // A row slipped in as if written before the upgrade.
    let plant = format!(
        "DROP TABLE IF EXISTS attack_copy; \
         CREATE TABLE attack_copy AS SELECT * FROM consent_events WHERE id = {}; \
         UPDATE attack_copy SET id = 9999, audit_seq = 0; \
         INSERT INTO consent_events SELECT * FROM attack_copy;",
        legacy[1]
    );
    app.sql(&plant).await;
    let stderr = app.verify_fails(&[], "planted legacy row");
    assert!(stderr.contains("consent event 9999:"), "{stderr}");
    // ... and the head's flag reset, so that the service adopts it: that adoption, after
    // entries of this version, is named.
    app.sql("UPDATE audit_head SET rows_adopted = 0").await;
    dr.submit_case(submission("ERN-EYE", national("NL", &bsn(3))))
        .await
        .unwrap();
    let late = app
        .ids("SELECT seq FROM audit_log WHERE method = 'AuditLog/AdoptRows' ORDER BY seq")
        .await;
    assert_eq!(late.len(), 2);
    let stderr = app.verify_fails(&[], "late adoption");
    assert!(stderr.contains(&format!("entry {}:", late[1])), "{stderr}");
}

/// An admin command run through sudo names both users: the process's, and the one who
/// invoked sudo (`SUDO_USER`), so an entry says who was behind a shared root account.
#[tokio::test]
async fn an_admin_command_through_sudo_names_the_invoking_user() {
    let app = TestApp::spawn().await;
    let out = app.cli_with(
        &[
            "admin",
            "create-centre",
            "--code",
            "NL-SUDO",
            "--name",
            "Sudo hospital",
            "--country",
            "NL",
            "--ern",
            "ERN-EYE",
        ],
        &[("SUDO_USER", "operator-on-call")],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let principal: String = db::query(
        "SELECT principal FROM audit_log WHERE method = 'AdminCli/CreateCentre' ORDER BY seq DESC",
    )
    .fetch_one(app.store.pool())
    .await
    .unwrap()
    .get(0);
    assert!(
        principal.starts_with("admin-cli:") && principal.ends_with(" (sudo from operator-on-call)"),
        "{principal}"
    );
}

/// An admin command prints what it made (an API key) only after its transaction with its
/// audit entry committed: when the entry cannot be written, the command fails, nothing
/// was created, and no key was shown.
#[tokio::test]
async fn an_admin_command_whose_entry_fails_shows_no_key_and_creates_nothing() {
    let app = TestApp::spawn().await;
    fail_audit_entries_of(&app, "AdminCli/CreatePrincipal").await;
    const CREATE: &[&str] = &[
        "admin",
        "create-principal",
        "--name",
        "dr-unrecorded",
        "--role",
        "researcher",
        "--ern",
        "ERN-EYE",
    ];
    let out = app.cli(CREATE);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(
        !stdout.contains("key id") && !stdout.contains("ern_"),
        "a key was shown: {stdout}"
    );
    assert!(
        app.ids("SELECT id FROM principals WHERE name = 'dr-unrecorded'")
            .await
            .is_empty()
    );
    // The same command, once its entry can be written, creates and shows the key.
    app.sql(if app.is_sqlite() {
        "DROP TRIGGER audit_fail"
    } else {
        "DROP TRIGGER audit_fail ON audit_log"
    })
    .await;
    let out = app.cli(CREATE);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("key id"));
}
