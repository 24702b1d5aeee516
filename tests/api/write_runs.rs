//! The writer applies a run of submissions about distinct patients with one statement per
//! table (`store::writer::submit_run`). Here the same commands, a mix chosen to hit every
//! branch (accepted, consent refused, expired, a second centre, an existing case, a
//! patient twice, officer decisions and a withdrawal between them), are applied once one
//! by one (batches of one) and once all queued together (one batch, with runs): every
//! answer and every row written must be the same, and both audit logs must verify.

use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use ern_registry::api::convert;
use ern_registry::audit::AuditKey;
use ern_registry::auth::Role;
use ern_registry::consent::{ConsentDecision, Decision, Scope};
use ern_registry::fixtures;
use ern_registry::keys::MasterSecret;
use ern_registry::service::consent::RegistryConsentRules;
use ern_registry::store::cases::to_row;
use ern_registry::store::consent::WithdrawalReason;
use ern_registry::store::db;
use ern_registry::store::writer::{
    Command, RecordConsent, SubmitCase, Withdraw, WriteError, Writer,
};

use crate::helpers::*;

/// The ids the commands refer to, the same in both databases (created in the same order).
struct Ids {
    registry: i64,
    centres: [i64; 2],
    physician: i64,
    officer: i64,
}

async fn setup(app: &TestApp) -> Ids {
    app.centre("RUN-A", "NL", &["ERN-LUNG"]).await;
    app.centre("RUN-B", "BE", &["ERN-LUNG"]).await;
    let physician = app
        .store
        .create_principal("run-physician", Role::Physician, Some("RUN-A"), &[])
        .await
        .unwrap();
    let officer = app
        .store
        .create_principal(
            "run-officer",
            Role::ConsentOfficer,
            None,
            &["ERN-LUNG".to_string()],
        )
        .await
        .unwrap();
    let centre = |code: &'static str| async move {
        db::query("SELECT id FROM centres WHERE code = $1")
            .bind(code)
            .fetch_one(app.store.pool())
            .await
            .unwrap()
            .get::<i64>(0)
    };
    Ids {
        registry: app
            .store
            .registry_by_code("ERN-LUNG")
            .await
            .unwrap()
            .unwrap()
            .id,
        centres: [centre("RUN-A").await, centre("RUN-B").await],
        physician,
        officer,
    }
}

fn decision(scope: Scope, d: Decision, at: DateTime<Utc>, expires: Option<i64>) -> ConsentDecision {
    ConsentDecision {
        scope,
        decision: d,
        given_at: at,
        form_version: "v1".into(),
        expires_at: expires.map(|days| at + Duration::days(days)),
    }
}

/// Forty commands over fifteen patients; `now` fixed so both runs write the same values.
fn commands(ids: &Ids, now: DateTime<Utc>) -> Vec<Command> {
    let given = now - Duration::days(30);
    let mut record = fixtures::record();
    let mut out = Vec::new();
    for i in 0..40u32 {
        let patient = i % 15;
        let pseudonym = format!("R013-run{patient:02}");
        // Genes vary, so that multi-row gene inserts carry 0, 1 or 2 per case.
        record.genetic_findings.truncate(1);
        match i % 3 {
            0 => record.genetic_findings.clear(),
            1 => {}
            _ => record
                .genetic_findings
                .push(ern_registry::proto::GeneticFinding {
                    gene: "SCNN1B".into(),
                    variants: vec![],
                }),
        }
        if record.genetic_findings.is_empty() {
            record
                .genetic_findings
                .push(fixtures::record().genetic_findings[0].clone());
            if i % 3 == 0 {
                record.genetic_findings.clear();
            }
        }
        let mut row = to_row(&convert::case_record(&record, fixtures::today()).unwrap());
        row.code_releases = (i % 2 == 0).then(|| "hpo:2025-01-16".to_string());
        let consent = match patient % 5 {
            // Inclusion and research use.
            0 | 1 => vec![
                decision(Scope::RegistryInclusion, Decision::Granted, given, None),
                decision(Scope::ResearchUse, Decision::Granted, given, Some(400)),
            ],
            // Inclusion only: stored, not counted.
            2 => vec![decision(
                Scope::RegistryInclusion,
                Decision::Granted,
                given,
                None,
            )],
            // Refused: not stored.
            3 => vec![decision(
                Scope::RegistryInclusion,
                Decision::Refused,
                given,
                None,
            )],
            // Expired: not stored.
            _ => vec![decision(
                Scope::RegistryInclusion,
                Decision::Granted,
                given,
                Some(10),
            )],
        };
        let command = match i {
            // An officer records research use, then withdraws inclusion, in the middle of
            // the submissions.
            17 => Command::RecordConsent(RecordConsent {
                registry_id: ids.registry,
                pseudonym: "R013-run02".into(),
                principal_id: ids.officer,
                decisions: vec![decision(Scope::ResearchUse, Decision::Granted, now, None)],
                now,
            }),
            29 => Command::Withdraw(Withdraw {
                registry_id: ids.registry,
                pseudonym: "R013-run05".into(),
                principal_id: ids.officer,
                scopes: vec![Scope::RegistryInclusion],
                reason: WithdrawalReason::PatientRequest,
                receipt_id: "RUN-RECEIPT-1".into(),
                now,
            }),
            _ => Command::Submit(SubmitCase {
                registry_id: ids.registry,
                pseudonym,
                // Patients come back from the second centre (a second case) and, every
                // third pass, from the first again (an existing case).
                centre_id: ids.centres[((i / 15) % 2) as usize],
                principal_id: ids.physician,
                consent,
                row,
                now,
            }),
        };
        out.push(command);
    }
    out
}

/// Every row the commands write, in a form that compares across databases.
async fn dump(app: &TestApp) -> Vec<String> {
    let queries = [
        "SELECT id, registry_id, pseudonym, scope, state, given_at, form_version, expires_at, \
                recorded_by, recorded_at, source FROM consent_events ORDER BY id",
        "SELECT registry_id, pseudonym, scope, event_id, state, given_at, expires_at \
         FROM consent_current ORDER BY registry_id, pseudonym, scope",
        "SELECT id, registry_id, pseudonym, centre_id, current_version, created_at, updated_at \
         FROM cases ORDER BY id",
        "SELECT case_id, version, recorded_at, recorded_by, sex, orphacode, genetic_findings, \
                hpo_terms, code_releases, delay_days FROM case_versions ORDER BY case_id, version",
        "SELECT case_id, version, gene FROM case_genes ORDER BY case_id, version, gene",
        "SELECT case_id, version, term FROM case_phenotypes ORDER BY case_id, version, term",
        // Not `slot`: slots are given per transaction, after its commands (one patient
        // created and erased within one batch never gets one).
        "SELECT registry_id, pseudonym, case_id, version, centre_id, country, orphacode, \
                eligible, eligible_until, genes, phenotypes FROM patients \
         ORDER BY registry_id, pseudonym",
        "SELECT receipt_id, registry_id, pseudonym FROM erasures ORDER BY id",
    ];
    let mut rows = Vec::new();
    for sql in queries {
        for row in db::query(sql).fetch_all(app.store.pool()).await.unwrap() {
            let values: Vec<String> = (0..row.len())
                .map(|i| {
                    row.try_get::<Option<i64>>(i)
                        .map(|v| format!("{v:?}"))
                        .or_else(|_| row.try_get::<Option<String>>(i).map(|v| format!("{v:?}")))
                        .unwrap_or_else(|e| format!("<{e}>"))
                })
                .collect();
            rows.push(format!("{}: {}", &sql[7..30], values.join(" | ")));
        }
    }
    rows
}

fn summary(result: &Result<ern_registry::store::writer::Output, WriteError>) -> String {
    match result {
        Ok(output) => format!("{output:?}"),
        Err(e) => format!("error {:?}: {e}", e.outcome()),
    }
}

#[tokio::test]
async fn a_batch_with_runs_writes_what_the_commands_one_by_one_write() {
    let now = fixtures::now();
    let mut answers = Vec::new();
    let mut dumps = Vec::new();
    for max_batch in [1, 512] {
        let app = TestApp::spawn().await;
        let ids = setup(&app).await;
        let master = MasterSecret::load(&app.dir.path().join("master.key")).unwrap();
        let key = Arc::new(AuditKey::derive(&master));
        let writer = Writer::start(
            app.store.clone(),
            1,
            max_batch,
            key.clone(),
            Arc::new(RegistryConsentRules),
        );
        // All queued before the writer looks: join_all polls (and so enqueues) in order,
        // and the writer takes up to `max_batch` at a time.
        let results = futures_util::future::join_all(
            commands(&ids, now)
                .into_iter()
                .map(|c| writer.execute(c, None)),
        )
        .await;
        answers.push(results.iter().map(summary).collect::<Vec<_>>());
        dumps.push(dump(&app).await);
        assert_eq!(
            app.store.verify_audit(&key).await.map(|r| r.is_ok()).ok(),
            Some(true),
            "audit log of the run with batches of {max_batch}"
        );
        drop(writer);
        app.stop().await;
    }
    // The mix really hit every branch.
    let all = answers[0].join("\n");
    for expected in [
        "Case(",
        "AlreadyExists",
        "FailedPrecondition",
        "Consent(",
        "Withdrawn",
    ] {
        assert!(all.contains(expected), "no {expected} among\n{all}");
    }
    assert_eq!(answers[0], answers[1]);
    assert!(dumps[0].len() > 80, "{} rows", dumps[0].len());
    for (one_by_one, batched) in dumps[0].iter().zip(&dumps[1]) {
        assert_eq!(one_by_one, batched);
    }
    assert_eq!(dumps[0].len(), dumps[1].len());
}

/// Counts the writer's calls of its after-commit hook.
#[derive(Default)]
struct CountCommits(std::sync::atomic::AtomicUsize);

impl ern_registry::store::writer::AfterCommit for CountCommits {
    fn after_commit<'a>(
        &'a self,
        _on: Option<db::Db<'a>>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Box::pin(async {})
    }
}

/// Another process holds SQLite's write lock past the writer's busy timeout (as the
/// database being away would on PostgreSQL): the batch fails for want of the database.
/// Every command of it is answered UNAVAILABLE at once, none is retried alone (each
/// retry, and each failure entry, would wait the whole busy timeout again, with the
/// callers queued behind), and nothing is caught up after a commit that did not happen.
/// Once the lock is released the same commands are applied. On a SQLite file whatever
/// the suite's database: its lock is the fault injected (PostgreSQL's case, a stopped
/// cluster, is in `outage`).
#[tokio::test]
async fn a_batch_that_cannot_reach_the_database_is_answered_at_once_without_retries() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("registry.db").display()
    );
    let app = TestApp::spawn_on(dir, url).await;
    let ids = setup(&app).await;
    let master = MasterSecret::load(&app.dir.path().join("master.key")).unwrap();
    let key = Arc::new(AuditKey::derive(&master));
    let commits = Arc::new(CountCommits::default());
    let writer = Writer::start_with(
        app.store.clone(),
        1,
        512,
        key.clone(),
        Arc::new(RegistryConsentRules),
        Some(commits.clone()),
    );
    let batch: Vec<Command> = commands(&ids, fixtures::now())
        .into_iter()
        .take(6)
        .collect();

    let path = app.store.sqlite_path().expect("a SQLite file").to_owned();
    let other = rusqlite::Connection::open(&path).unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    let refused = futures_util::future::join_all(
        batch
            .iter()
            .cloned()
            .map(|c| writer.execute(c, Some(entry()))),
    )
    .await;
    for result in &refused {
        let err = result.as_ref().map(drop).unwrap_err();
        assert_eq!(
            err.outcome(),
            ern_registry::outcome::Outcome::Unavailable,
            "{err}"
        );
        assert!(
            matches!(
                err,
                WriteError::Store(ern_registry::store::StoreError::Unreachable { .. })
            ),
            "not answered from the batch's failure: {err:?}"
        );
    }
    assert_eq!(commits.0.load(std::sync::atomic::Ordering::SeqCst), 0);

    other.execute_batch("ROLLBACK").unwrap();
    drop(other);
    let applied =
        futures_util::future::join_all(batch.into_iter().map(|c| writer.execute(c, Some(entry()))))
            .await;
    assert!(
        applied.iter().any(|r| r.is_ok()),
        "{:?}",
        applied.iter().map(summary).collect::<Vec<_>>()
    );
    assert!(applied.iter().all(|r| {
        r.as_ref()
            .err()
            .is_none_or(|e| e.outcome() != ern_registry::outcome::Outcome::Unavailable)
    }));
    assert!(commits.0.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    assert_eq!(
        app.store.verify_audit(&key).await.map(|r| r.is_ok()).ok(),
        Some(true)
    );
    drop(writer);
    app.stop().await;
}

/// An audit entry for a writer command, as a call would carry.
fn entry() -> ern_registry::audit::Entry {
    ern_registry::audit::Entry {
        method: "CaseService/SubmitCase".into(),
        principal: "run-physician".into(),
        outcome: "OK".into(),
        ..Default::default()
    }
}

/// Consent rules with a bug: they panic, inside the writer's loop.
struct PanickingRules;

impl ern_registry::store::writer::ConsentRules for PanickingRules {
    fn effective_at(
        &self,
        _: &[ern_registry::consent::ConsentEvent],
        _: DateTime<Utc>,
    ) -> DateTime<Utc> {
        panic!("a bug in the consent rules (this test's)")
    }
    fn may_store_case(
        &self,
        _: &[ern_registry::consent::ConsentEvent],
        _: DateTime<Utc>,
    ) -> Result<(), ern_registry::consent::InclusionRefused> {
        panic!("a bug in the consent rules (this test's)")
    }
    fn ends_inclusion(
        &self,
        _: &[ern_registry::consent::ConsentEvent],
        _: &[ern_registry::consent::ConsentEvent],
        _: DateTime<Utc>,
    ) -> bool {
        panic!("a bug in the consent rules (this test's)")
    }
    fn research_eligibility(
        &self,
        _: &[ern_registry::consent::ConsentEvent],
        _: DateTime<Utc>,
    ) -> (bool, Option<DateTime<Utc>>) {
        panic!("a bug in the consent rules (this test's)")
    }
}

/// A writer whose loop panics (on SQLite the thread `ern-writer`, on PostgreSQL a task)
/// stops as at shutdown: the call that met the bug and every later one are answered that
/// the writer stopped (UNAVAILABLE), none is left waiting, and nothing was written.
#[tokio::test]
async fn a_writer_whose_loop_panics_answers_every_caller_that_it_stopped() {
    let now = fixtures::now();
    let app = TestApp::spawn().await;
    let ids = setup(&app).await;
    let master = MasterSecret::load(&app.dir.path().join("master.key")).unwrap();
    let key = Arc::new(AuditKey::derive(&master));
    let writer = Writer::start(app.store.clone(), 1, 512, key, Arc::new(PanickingRules));
    let mut commands = commands(&ids, now).into_iter();
    for _ in 0..3 {
        let command = commands.next().unwrap();
        let answered = tokio::time::timeout(
            std::time::Duration::from_secs(30),
            writer.execute(command, None),
        )
        .await
        .expect("answered, not left waiting");
        assert!(
            matches!(answered, Err(WriteError::ShuttingDown)),
            "{:?}",
            summary(&answered)
        );
        assert_eq!(
            answered.unwrap_err().outcome(),
            ern_registry::outcome::Outcome::Unavailable
        );
    }
    let cases = db::query("SELECT COUNT(*) FROM cases")
        .fetch_one(app.store.pool())
        .await
        .unwrap()
        .get::<i64>(0);
    assert_eq!(cases, 0);
    drop(writer);
    app.stop().await;
}
