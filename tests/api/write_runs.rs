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
    AfterCommit, Command, RecordConsent, SubmitCase, Withdraw, WriteError, Writer,
};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

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
        let pseudonym = format!("R013-V001-run{patient:02}");
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
                pseudonym: "R013-V001-run02".into(),
                principal_id: ids.officer,
                decisions: vec![decision(Scope::ResearchUse, Decision::Granted, now, None)],
                now,
            }),
            29 => Command::Withdraw(Withdraw {
                registry_id: ids.registry,
                pseudonym: "R013-V001-run05".into(),
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
        // Not `slot`: slots depend on how the commands are grouped into transactions (a
        // slot freed by an erasure may be given again; `new_research_rows_get_unique_...`
        // below).
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
        let (writer, key) = writer_of(&app, max_batch);
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

/// The slots of new research rows (`store::research_index`), for six new patients queued
/// together in decreasing pseudonym order and one patient on file coming back from a
/// second centre: on SQLite each row gets its slot as it is inserted, the largest in use
/// plus one, so in the order of the submissions; on PostgreSQL at the end of each
/// transaction, in pseudonym order. On both, the row on file keeps its slot, no slot is
/// given twice, and the change log names every slot the submissions touched, once,
/// after the numbers before them.
#[tokio::test]
async fn new_research_rows_get_unique_slots_and_every_one_is_logged() {
    let app = TestApp::spawn().await;
    let ids = setup(&app).await;
    let (writer, key) = writer_of(&app, 512);
    let now = fixtures::now();
    let given = now - Duration::days(30);
    let submit = |pseudonym: &str, centre: usize| {
        Command::Submit(SubmitCase {
            registry_id: ids.registry,
            pseudonym: pseudonym.into(),
            centre_id: ids.centres[centre],
            principal_id: ids.physician,
            consent: vec![
                decision(Scope::RegistryInclusion, Decision::Granted, given, None),
                decision(Scope::ResearchUse, Decision::Granted, given, None),
            ],
            row: to_row(&convert::case_record(&fixtures::record(), fixtures::today()).unwrap()),
            now,
        })
    };
    let store = &app.store;
    let registry = ids.registry;
    // Three patients on file, in a batch of their own.
    for result in futures_util::future::join_all(
        ["R013-V001-slot-a", "R013-V001-slot-b", "R013-V001-slot-m"]
            .map(|p| writer.execute(submit(p, 0), None)),
    )
    .await
    {
        result.unwrap();
    }
    let before = slots(store, registry).await;
    assert_eq!(
        before
            .iter()
            .map(|(_, s)| s.unwrap())
            .collect::<std::collections::BTreeSet<_>>(),
        (0..3).collect(),
        "{before:?}"
    );
    let seq_before = seq(store).await;

    // Six new patients, queued in decreasing pseudonym order, and patient "m" again from
    // the second centre, in the middle.
    let mut batch: Vec<Command> = ["z", "y", "x"]
        .iter()
        .map(|p| submit(&format!("R013-V001-slot-{p}"), 0))
        .collect();
    batch.push(submit("R013-V001-slot-m", 1));
    batch.extend(
        ["w", "v", "u"]
            .iter()
            .map(|p| submit(&format!("R013-V001-slot-{p}"), 0)),
    );
    for result in
        futures_util::future::join_all(batch.into_iter().map(|c| writer.execute(c, None))).await
    {
        result.unwrap();
    }

    let after: std::collections::BTreeMap<String, i64> = slots(store, registry)
        .await
        .into_iter()
        .map(|(p, s)| (p, s.expect("every research row has a slot")))
        .collect();
    for (pseudonym, slot) in &before {
        assert_eq!(Some(after[pseudonym]), *slot, "{pseudonym} kept its slot");
    }
    let new: Vec<i64> = ["z", "y", "x", "w", "v", "u"]
        .iter()
        .map(|p| after[&format!("R013-V001-slot-{p}")])
        .collect();
    if app.store.backend() == ern_registry::store::Backend::Sqlite {
        // In the order of the run, however the writer cut it into transactions.
        assert_eq!(new, (3..9).collect::<Vec<_>>(), "{after:?}");
    } else {
        // In pseudonym order within a transaction (the writer may have taken the first
        // command alone).
        let mut sorted = new.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (3..9).collect::<Vec<_>>(), "{after:?}");
    }

    // Logged: the six new slots and the slot of "m" (its row is written again: the
    // eligibility the second centre's attestation gives; the first centre's case still
    // represents it), each once, numbered after the counter's value before the batch.
    let log = logged(store, registry, seq_before).await;
    let mut slots_logged: Vec<i64> = log.iter().map(|&(_, slot)| slot).collect();
    slots_logged.sort_unstable();
    let mut want: Vec<i64> = (3..9).chain([after["R013-V001-slot-m"]]).collect();
    want.sort_unstable();
    assert_eq!(slots_logged, want, "{log:?}");
    let seq_after = seq(store).await;
    assert!(
        log.iter().all(|&(n, _)| n > seq_before && n <= seq_after),
        "{log:?} not within ({seq_before}, {seq_after}]"
    );
    assert_eq!(
        app.store.verify_audit(&key).await.map(|r| r.is_ok()).ok(),
        Some(true)
    );
    drop(writer);
    app.stop().await;
}

/// One writer on `app`'s store with the service's consent rules, taking batches of up to
/// `max_batch`, and its audit key.
fn writer_of(app: &TestApp, max_batch: usize) -> (Writer, Arc<AuditKey>) {
    let master = MasterSecret::load(&app.dir.path().join("master.key")).unwrap();
    let key = Arc::new(AuditKey::derive(&master));
    let writer = Writer::start(
        app.store.clone(),
        1,
        max_batch,
        key.clone(),
        Arc::new(RegistryConsentRules),
    );
    (writer, key)
}

/// (pseudonym, slot) of the research rows of a registry.
async fn slots(store: &ern_registry::store::Store, registry: i64) -> Vec<(String, Option<i64>)> {
    db::query("SELECT pseudonym, slot FROM patients WHERE registry_id = $1 ORDER BY pseudonym")
        .bind(registry)
        .fetch_all(store.pool())
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get::<String>(0), r.get::<Option<i64>>(1)))
        .collect()
}

/// (number, slot) of the change log's rows of a registry numbered after `after`.
async fn logged(store: &ern_registry::store::Store, registry: i64, after: i64) -> Vec<(i64, i64)> {
    db::query("SELECT seq, slot FROM research_log WHERE registry_id = $1 AND seq > $2")
        .bind(registry)
        .bind(after)
        .fetch_all(store.pool())
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get::<i64>(0), r.get::<i64>(1)))
        .collect()
}

/// The change counter.
async fn seq(store: &ern_registry::store::Store) -> i64 {
    db::query("SELECT seq FROM research_seq WHERE id = 1")
        .fetch_one(store.pool())
        .await
        .unwrap()
        .get::<i64>(0)
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
    other.execute_batch("ROLLBACK").unwrap();
    // The hook would be told after the answers: an entry of its own, answered once the
    // writer (one partition: entries alone go to each partition in turn) has taken its
    // next batch, comes after it.
    writer.execute(Command::Audit, Some(entry())).await.unwrap();
    assert_eq!(commits.0.load(std::sync::atomic::Ordering::SeqCst), 0);

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
    // After the hook, as above.
    writer.execute(Command::Audit, Some(entry())).await.unwrap();
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
/// the writer stopped (UNAVAILABLE), none is left waiting, and nothing was written. Its
/// backlog says it stopped, which turns health NOT_SERVING (`health`).
#[tokio::test]
async fn a_writer_whose_loop_panics_answers_every_caller_that_it_stopped() {
    let now = fixtures::now();
    let app = TestApp::spawn().await;
    let ids = setup(&app).await;
    let master = MasterSecret::load(&app.dir.path().join("master.key")).unwrap();
    let key = Arc::new(AuditKey::derive(&master));
    let writer = Writer::start(app.store.clone(), 1, 512, key, Arc::new(PanickingRules));
    assert!(!writer.backlog().stopped());
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
    assert!(writer.backlog().stopped());
    drop(writer);
    app.stop().await;
}

/// Told of every commit of the writer; while `hold` is set, holds the writer there (its
/// loop, once it has answered the batch and before it takes more) until released, so
/// that commands sent meanwhile queue and come as one batch.
struct Gate {
    hold: AtomicBool,
    entered: tokio::sync::Notify,
    release: tokio::sync::Semaphore,
    commits: AtomicUsize,
}

impl Default for Gate {
    fn default() -> Self {
        Gate {
            hold: AtomicBool::new(false),
            entered: tokio::sync::Notify::new(),
            release: tokio::sync::Semaphore::new(0),
            commits: AtomicUsize::new(0),
        }
    }
}

impl AfterCommit for Gate {
    fn after_commit<'a>(
        &'a self,
        _on: Option<db::Db<'a>>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>> {
        Box::pin(async move {
            self.commits.fetch_add(1, Ordering::SeqCst);
            if self.hold.load(Ordering::SeqCst) {
                self.entered.notify_one();
                let _ = self.release.acquire().await;
            }
        })
    }
}

/// A call in flight across `admin rotate-key` (derived under the old key version, applied
/// after the rotation) may not start a patient under the old version: a call after the
/// rotation finds nothing on file under it and starts the same person under the new one,
/// splitting them across two pseudonyms. So the writer starts a patient only under the
/// registry's active version, read in its transaction (`store::writer::may_start`): alone
/// and in a run, by submission, officer decision and withdrawal. Sent again, the call
/// derives under the new version. A patient on file under the old version goes on there.
#[tokio::test]
async fn no_patient_is_started_under_a_key_version_rotated_away() {
    use ern_registry::outcome::Outcome;
    use ern_registry::pseudonym::{Pseudonymiser, RegistryRef};

    let app = TestApp::spawn().await;
    let ids = setup(&app).await;
    let master = MasterSecret::load(&app.dir.path().join("master.key")).unwrap();
    let gate = Arc::new(Gate::default());
    let writer = Writer::start_with(
        app.store.clone(),
        1,
        64,
        Arc::new(AuditKey::derive(&master)),
        Arc::new(RegistryConsentRules),
        Some(gate.clone()),
    );
    let pseudonymiser = Pseudonymiser::new(&master);
    let lung = app
        .store
        .registry_by_code("ERN-LUNG")
        .await
        .unwrap()
        .unwrap();
    let under = |seed: u32, key_version: u16| {
        let identity = convert::patient_identity(&national("NL", &bsn(seed))).unwrap();
        let registry = RegistryRef {
            key_version,
            ..lung.key_ref().unwrap()
        };
        pseudonymiser.derive(registry, &identity).to_string()
    };
    let now = fixtures::now();
    let given = now - Duration::days(1);
    let submit = |pseudonym: String, centre: usize| {
        Command::Submit(SubmitCase {
            registry_id: ids.registry,
            pseudonym,
            centre_id: ids.centres[centre],
            principal_id: ids.physician,
            consent: vec![decision(
                Scope::RegistryInclusion,
                Decision::Granted,
                given,
                None,
            )],
            row: to_row(&convert::case_record(&fixtures::record(), fixtures::today()).unwrap()),
            now,
        })
    };
    let record = |pseudonym: String| {
        Command::RecordConsent(RecordConsent {
            registry_id: ids.registry,
            pseudonym,
            principal_id: ids.officer,
            decisions: vec![decision(Scope::ResearchUse, Decision::Granted, given, None)],
            now,
        })
    };
    let withdraw = |pseudonym: String| {
        Command::Withdraw(Withdraw {
            registry_id: ids.registry,
            pseudonym,
            principal_id: ids.officer,
            scopes: vec![Scope::Recontact],
            reason: WithdrawalReason::PatientRequest,
            receipt_id: "ROTATED-RECEIPT".into(),
            now,
        })
    };
    let on_file = |pseudonym: String| {
        let store = app.store.clone();
        async move {
            db::query("SELECT count(*) FROM patient_keys WHERE pseudonym = $1")
                .bind(pseudonym.as_str())
                .fetch_one(store.pool())
                .await
                .unwrap()
                .get::<i64>(0)
        }
    };

    // Patient 1 is on file under version 1 before the rotation.
    writer.execute(submit(under(1, 1), 0), None).await.unwrap();
    assert_eq!(app.store.rotate_registry_key("ERN-LUNG").await.unwrap(), 2);

    // Patient 2, new, under version 1 after it: refused, whatever the command.
    for command in [
        submit(under(2, 1), 0),
        record(under(2, 1)),
        withdraw(under(2, 1)),
    ] {
        let err = writer.execute(command, None).await.unwrap_err();
        assert!(matches!(err, WriteError::KeyRotated), "{err:?}");
        assert_eq!(err.outcome(), Outcome::Aborted);
    }
    assert_eq!(on_file(under(2, 1)).await, 0);
    // Under a version the registry does not have (0, or above the active one): refused
    // as invalid, as no retry can help; a submission, whose pseudonym the call derived
    // under the active version, as the database's fault (it went back).
    for version in [0, 3] {
        for command in [record(under(6, version)), withdraw(under(6, version))] {
            let err = writer.execute(command, None).await.unwrap_err();
            assert!(matches!(err, WriteError::UnknownKeyVersion), "{err:?}");
            assert_eq!(err.outcome(), Outcome::InvalidArgument);
        }
        let err = writer
            .execute(submit(under(6, version), 0), None)
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                WriteError::Store(ern_registry::store::StoreError::Corrupt(_))
            ),
            "{err:?}"
        );
        assert_eq!(err.outcome(), Outcome::Internal);
        assert_eq!(on_file(under(6, version)).await, 0);
    }
    // In a run of submissions too, next to ones that start under version 2: the writer
    // is held after its commit of another command while the three queue, then takes
    // them as one batch (one commit more).
    // The hooks of the commits before are done (an entry's answer comes after them; one
    // partition), so the gate holds the next command's.
    writer.execute(Command::Audit, Some(entry())).await.unwrap();
    gate.hold.store(true, Ordering::SeqCst);
    let held = tokio::spawn({
        let writer = writer.clone();
        let command = record(under(5, 2));
        async move { writer.execute(command, None).await }
    });
    gate.entered.notified().await;
    let commits = gate.commits.load(Ordering::SeqCst);
    let results = {
        let mut run = std::pin::pin!(futures_util::future::join_all(
            [
                submit(under(3, 2), 0),
                submit(under(2, 1), 1),
                submit(under(4, 2), 0),
            ]
            .into_iter()
            .map(|c| writer.execute(c, None)),
        ));
        // One poll sends all three into the queue.
        std::future::poll_fn(|cx| {
            assert!(run.as_mut().poll(cx).is_pending());
            std::task::Poll::Ready(())
        })
        .await;
        gate.hold.store(false, Ordering::SeqCst);
        gate.release.add_permits(1);
        held.await.unwrap().unwrap();
        run.await
    };
    // The hook is told of a commit once its batch is answered: an entry's answer comes
    // after it (one partition).
    writer.execute(Command::Audit, Some(entry())).await.unwrap();
    // The held command's commit, then the three's.
    assert_eq!(
        gate.commits.load(Ordering::SeqCst),
        commits + 1,
        "one batch"
    );
    assert!(results[0].is_ok() && results[2].is_ok(), "{results:?}");
    assert!(
        matches!(results[1], Err(WriteError::KeyRotated)),
        "{results:?}"
    );
    // Sent again as a call after the rotation derives it: under version 2.
    writer.execute(submit(under(2, 2), 0), None).await.unwrap();
    assert_eq!(on_file(under(2, 1)).await, 0);
    assert_eq!(on_file(under(2, 2)).await, 1);
    // Patient 1 goes on under version 1: another centre's case, an officer's decision.
    writer.execute(submit(under(1, 1), 1), None).await.unwrap();
    writer.execute(record(under(1, 1)), None).await.unwrap();
    assert_eq!(on_file(under(1, 2)).await, 0);
    drop(writer);
    app.stop().await;
}

/// Until its grant shows in `pg_locks`, waits for a transaction waiting for the rotation
/// lock in `mode` (`ShareLock`: a writer; `ExclusiveLock`: a rotation).
async fn waiting_for_rotation_lock(probe: &mut sqlx::PgConnection, mode: &str) {
    use sqlx::Row as _;
    let (a, b) = ern_registry::store::writer::ROTATION_LOCK;
    for _ in 0..3000 {
        let waiting: i64 = sqlx::query(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted \
             AND classid = $1::oid AND objid = $2::oid AND objsubid = 2 AND mode = $3 \
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        .bind(i64::from(a))
        .bind(i64::from(b))
        .bind(mode)
        .fetch_one(&mut *probe)
        .await
        .unwrap()
        .get(0);
        if waiting > 0 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("no transaction came to wait for the rotation lock in {mode}");
}

/// On PostgreSQL a key rotation and the writers' transactions wait for each other
/// (`store::writer::ROTATION_LOCK`), so that no transaction reads the active key version
/// and commits a patient under it after a rotation has committed in between (another
/// instance could by then have derived under the new version and found nothing). Here a
/// transaction on a connection of the test's own holds the lock as each side would.
#[tokio::test]
async fn a_key_rotation_and_writer_transactions_wait_for_each_other() {
    use sqlx::{Connection as _, Executor as _};
    let app = TestApp::spawn().await;
    if app.store.backend() != ern_registry::store::Backend::Postgres {
        return;
    }
    let ids = setup(&app).await;
    let (a, b) = ern_registry::store::writer::ROTATION_LOCK;
    let mut holder = sqlx::PgConnection::connect(&app.database_url)
        .await
        .unwrap();
    let mut probe = sqlx::PgConnection::connect(&app.database_url)
        .await
        .unwrap();
    let version = || async {
        app.store
            .registry_by_code("ERN-LUNG")
            .await
            .unwrap()
            .unwrap()
            .active_key_version
    };

    let master = Arc::new(MasterSecret::load(&app.dir.path().join("master.key")).unwrap());
    // `admin rotate-key` as the command line runs it, in a task.
    let rotate = || {
        let store = app.store.clone();
        let master = master.clone();
        tokio::spawn(async move {
            ern_registry::service::admin::run_action(
                &store,
                &master,
                "test-operator",
                ern_registry::service::admin::AdminAction::RotateKey {
                    registry: "ERN-LUNG".into(),
                },
            )
            .await
        })
    };

    // A writer's transaction in progress: the rotation waits for its end. Meanwhile the
    // writer appends its audit entries (the chain's head, which the rotation's own entry
    // needs too): taken in that order by both, the two would wait for each other.
    holder.execute("BEGIN").await.unwrap();
    holder
        .execute(format!("SELECT pg_advisory_xact_lock_shared({a}, {b})").as_str())
        .await
        .unwrap();
    let rotation = rotate();
    waiting_for_rotation_lock(&mut probe, "ExclusiveLock").await;
    assert_eq!(version().await, 1);
    holder
        .execute("UPDATE audit_head SET seq = seq WHERE id = 1")
        .await
        .unwrap();
    holder.execute("COMMIT").await.unwrap();
    assert!(rotation.await.unwrap().is_ok());
    assert_eq!(version().await, 2);

    // A writer's transaction that does not end: the rotation gives up (and with it the
    // writes queued behind it go on), changing nothing, with a message saying so.
    holder.execute("BEGIN").await.unwrap();
    holder
        .execute(format!("SELECT pg_advisory_xact_lock_shared({a}, {b})").as_str())
        .await
        .unwrap();
    let refused = rotate().await.unwrap().err().expect("the rotation gave up");
    assert_eq!(
        refused.outcome,
        ern_registry::outcome::Outcome::Unavailable,
        "{}",
        refused.message
    );
    assert!(
        refused.message.contains("did not end"),
        "{}",
        refused.message
    );
    assert_eq!(version().await, 2);
    holder.execute("COMMIT").await.unwrap();

    // A rotation in progress: a writer's transaction about a patient waits for its commit.
    holder.execute("BEGIN").await.unwrap();
    holder
        .execute(format!("SELECT pg_advisory_xact_lock({a}, {b})").as_str())
        .await
        .unwrap();
    let writer = Writer::start(
        app.store.clone(),
        1,
        64,
        Arc::new(AuditKey::derive(&master)),
        Arc::new(RegistryConsentRules),
    );
    let now = fixtures::now();
    let command = Command::RecordConsent(RecordConsent {
        registry_id: ids.registry,
        pseudonym: "R013-V002-waits".into(),
        principal_id: ids.officer,
        decisions: vec![decision(Scope::ResearchUse, Decision::Granted, now, None)],
        now,
    });
    let write = tokio::spawn({
        let writer = writer.clone();
        async move { writer.execute(command, None).await }
    });
    waiting_for_rotation_lock(&mut probe, "ShareLock").await;
    holder.execute("COMMIT").await.unwrap();
    write.await.unwrap().unwrap();
    drop(writer);
    app.stop().await;
}
