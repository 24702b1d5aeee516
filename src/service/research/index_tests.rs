//! The index gives the answers of the SQL reference (`store::research`), query for query.
//!
//! Random registries are written through the real write path (the writer, with the
//! index's hook): submissions from several centres, updates, consent granted with and
//! without expiry, refused, withdrawn (research use only, or inclusion: erasure), and
//! re-consent. Then every query the service answers (CountPatients by each dimension
//! and each pair, with and without filters; DiagnosticDelay; FindExpertise) is put to
//! the SQL reference and to three indexes: the writer's own (the writer applies its commits
//! to it; a query's catch-up applies what it skipped), one that only catches up before each round (another instance),
//! and one loaded afresh at the end (a restart). Each at several instants: now, and just
//! before, at and after an instant at which consents expire. Tables are compared after
//! protection, as the service would publish them.
//!
//! SQLite by default; with `ERN_TEST_DATABASE_URL` on PostgreSQL.

use crate::store::db;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration as StdDuration, Instant};

use chrono::{DateTime, Duration, Utc};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use sqlx::Connection;

use super::CatchUp;
use super::index::Index;
use crate::aggregate::suppress::Rules;
use crate::aggregate::{Dimension, Filter, Key, Known, TableBuilder};
use crate::audit::AuditKey;
use crate::auth::Role;
use crate::consent::{ConsentDecision, Decision, Scope};
use crate::domain::ORPHA_UNDIAGNOSED;
use crate::keys::MasterSecret;
use crate::store::cases::{self, CaseRow};
use crate::store::consent::WithdrawalReason;
use crate::store::research::Selection;
use crate::store::writer::{
    AfterCommit, Command, RecordConsent, SubmitCase, UpdateCase, Withdraw, Writer,
};
use crate::store::{Store, research_index};
use crate::synthetic::Generator;

const CENTRES: [(&str, &str); 5] = [
    ("NL-AMC", "NL"),
    ("NL-UMCU", "NL"),
    ("BE-UZL", "BE"),
    ("DE-CHA", "DE"),
    ("IT-OPBG", "IT"),
];
const REGISTRIES: [&str; 2] = ["ERN-LUNG", "ERN-EYE"];
const GENES: [&str; 5] = ["CFTR", "SCNN1A", "DNAH5", "BRCA2", "ABCA4"];

/// A fresh store: SQLite in `dir`, or a new PostgreSQL database.
async fn fresh_store(dir: &tempfile::TempDir) -> Store {
    let url = match std::env::var("ERN_TEST_DATABASE_URL") {
        Ok(admin) if !admin.is_empty() => {
            let name = format!("ern_index_{}", std::process::id() ^ rand::random::<u32>());
            let mut conn = sqlx::PgConnection::connect(&admin).await.unwrap();
            db::query(&format!("CREATE DATABASE {name}"))
                .execute(&mut conn)
                .await
                .unwrap();
            format!("{}/{name}", admin.rsplit_once('/').unwrap().0)
        }
        _ => format!("sqlite://{}?mode=rwc", dir.path().join("r.db").display()),
    };
    crate::startup::open_store(&url, 8).await.unwrap()
}

struct World {
    store: Store,
    writer: Writer,
    principal: i64,
    registries: Vec<i64>,
    centres: Vec<i64>,
    rng: StdRng,
    generator: Generator,
    /// Instants at which consents expire (the boundary the queries probe).
    expiry: DateTime<Utc>,
    /// (registry, pseudonym, centres with a case) of every patient ever submitted.
    patients: Vec<(i64, String, Vec<i64>)>,
    next: u32,
}

/// Milliseconds only: the database keeps instants in milliseconds.
fn ms(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(t.timestamp_millis()).unwrap()
}

impl World {
    fn row(&mut self) -> CaseRow {
        let n = self.rng.gen_range(0..100_000);
        let mut p = self.generator.patient(n);
        if self.rng.gen_bool(0.15) {
            // An onset dated to a day of the birth month: ages count from it when it is
            // before the month's middle (`domain::birth_midpoint`).
            p.record.onset_kind = crate::proto::OnsetKind::Date as i32;
            p.record.onset_date = format!(
                "{}-{:02}",
                p.record.birth_year_month,
                self.rng.gen_range(1..=28)
            );
        }
        let record = crate::api::convert::case_record(&p.record, Utc::now().date_naive()).unwrap();
        let mut row = cases::to_row(&record);
        let rng = &mut self.rng;
        match rng.gen_range(0..10) {
            0 => row.orphacode = None,
            1 => row.orphacode = Some(i64::from(ORPHA_UNDIAGNOSED)),
            _ => row.orphacode = Some([586, 244, 104, 70][rng.gen_range(0..4)]),
        }
        if rng.gen_bool(0.1) {
            row.diagnosis_year = None;
        }
        if rng.gen_bool(0.1) {
            row.onset_age_days = None;
            row.delay_days = None;
            row.delay_months = None;
        }
        let genes = rng.gen_range(0..4);
        let mut chosen: Vec<&str> = GENES.choose_multiple(rng, genes).copied().collect();
        chosen.sort();
        row.genes = chosen.iter().map(|g| g.to_string()).collect();
        row.genetic_findings = chosen.join(" ");
        row
    }

    /// A decision given a little before now, expiring at one of the probed instants.
    fn decision(&mut self, scope: Scope, decision: Decision) -> ConsentDecision {
        let e = self.expiry;
        let expires_at = match self.rng.gen_range(0..8) {
            0 => Some(e - Duration::milliseconds(1)),
            1 => Some(e),
            2 => Some(e + Duration::milliseconds(1)),
            3 => Some(e + Duration::days(1)),
            _ => None,
        };
        ConsentDecision {
            scope,
            decision,
            given_at: ms(Utc::now() - Duration::days(self.rng.gen_range(1..400))),
            form_version: "test".into(),
            expires_at: expires_at.filter(|_| decision == Decision::Granted),
        }
    }

    fn attestation(&mut self) -> Vec<ConsentDecision> {
        let mut out = Vec::new();
        match self.rng.gen_range(0..10) {
            0 => {}
            1 => out.push(self.decision(Scope::RegistryInclusion, Decision::Refused)),
            _ => out.push(self.decision(Scope::RegistryInclusion, Decision::Granted)),
        }
        match self.rng.gen_range(0..10) {
            0 => {}
            1 | 2 => out.push(self.decision(Scope::ResearchUse, Decision::Refused)),
            _ => out.push(self.decision(Scope::ResearchUse, Decision::Granted)),
        }
        out
    }

    async fn run(&self, commands: Vec<Command>) {
        let mut tasks = tokio::task::JoinSet::new();
        for command in commands {
            let writer = self.writer.clone();
            tasks.spawn(async move { writer.execute(command, None).await });
        }
        while let Some(done) = tasks.join_next().await {
            // Refusals (no consent, no such case) are part of the game; failures are not.
            if let Err(crate::store::writer::WriteError::Store(e)) = done.unwrap() {
                panic!("write failed: {e}");
            }
        }
    }

    /// New patients, each submitted by one centre.
    async fn submit_new(&mut self, n: usize) {
        let mut commands = Vec::new();
        for _ in 0..n {
            self.next += 1;
            let registry_id = self.registries[self.rng.gen_range(0..self.registries.len())];
            let pseudonym = format!("R{registry_id:03}-V001-T{:031}", self.next);
            let centre_id = self.centres[self.rng.gen_range(0..self.centres.len())];
            commands.push(Command::Submit(SubmitCase {
                registry_id,
                pseudonym: pseudonym.clone(),
                centre_id,
                principal_id: self.principal,
                consent: self.attestation(),
                row: self.row(),
                now: Utc::now(),
            }));
            self.patients
                .push((registry_id, pseudonym, vec![centre_id]));
        }
        self.run(commands).await;
    }

    /// One random change for each of `n` distinct known patients.
    async fn change(&mut self, n: usize) {
        let mut picked = BTreeSet::new();
        let mut commands = Vec::new();
        for _ in 0..n {
            let i = self.rng.gen_range(0..self.patients.len());
            if !picked.insert(i) {
                continue;
            }
            let (registry_id, pseudonym, centres) = self.patients[i].clone();
            let now = Utc::now();
            let principal_id = self.principal;
            let command = match self.rng.gen_range(0..8) {
                0 => Command::RecordConsent(RecordConsent {
                    registry_id,
                    pseudonym,
                    principal_id,
                    decisions: vec![ConsentDecision {
                        given_at: ms(now),
                        ..self.decision(Scope::ResearchUse, Decision::Granted)
                    }],
                    now,
                }),
                1 => Command::RecordConsent(RecordConsent {
                    registry_id,
                    pseudonym,
                    principal_id,
                    decisions: vec![ConsentDecision {
                        given_at: ms(now),
                        ..self.decision(Scope::ResearchUse, Decision::Refused)
                    }],
                    now,
                }),
                2 => Command::Withdraw(Withdraw {
                    registry_id,
                    pseudonym,
                    principal_id,
                    scopes: vec![Scope::ResearchUse],
                    reason: WithdrawalReason::PatientRequest,
                    receipt_id: format!("receipt-{}", self.rng.r#gen::<u64>()),
                    now,
                }),
                3 => {
                    self.patients[i].2.clear();
                    Command::Withdraw(Withdraw {
                        registry_id,
                        pseudonym,
                        principal_id,
                        scopes: vec![Scope::RegistryInclusion],
                        reason: WithdrawalReason::PatientRequest,
                        receipt_id: format!("receipt-{}", self.rng.r#gen::<u64>()),
                        now,
                    })
                }
                4 if !centres.is_empty() => Command::Update(UpdateCase {
                    registry_id,
                    pseudonym,
                    centre_id: centres[0],
                    principal_id,
                    expected_version: 0,
                    consent: Vec::new(),
                    row: self.row(),
                    now,
                }),
                _ => {
                    // Another centre (or, after an erasure, any) submits, re-consenting.
                    let centre_id = self.centres[self.rng.gen_range(0..self.centres.len())];
                    self.patients[i].2.push(centre_id);
                    let consent = self
                        .attestation()
                        .into_iter()
                        .map(|d| ConsentDecision {
                            given_at: ms(now),
                            ..d
                        })
                        .collect();
                    Command::Submit(SubmitCase {
                        registry_id,
                        pseudonym,
                        centre_id,
                        principal_id,
                        consent,
                        row: self.row(),
                        now,
                    })
                }
            };
            commands.push(command);
        }
        // Updates: the version on file.
        for command in &mut commands {
            if let Command::Update(u) = command {
                u.expected_version = db::query(
                    "SELECT current_version FROM cases \
                     WHERE registry_id = $1 AND pseudonym = $2 AND centre_id = $3",
                )
                .bind(u.registry_id)
                .bind(&u.pseudonym)
                .bind(u.centre_id)
                .fetch_optional(self.store.pool())
                .await
                .unwrap()
                .map_or(1, |row| row.get("current_version"));
            }
        }
        self.run(commands).await;
    }
}

/// Every query the service answers, for one registry.
fn queries(rng: &mut StdRng, registry_id: i64) -> Vec<(bool, Vec<Dimension>, Vec<Filter>)> {
    let dims = Dimension::ALL;
    let mut groupings: Vec<Vec<Dimension>> = vec![Vec::new()];
    groupings.extend(dims.iter().map(|d| vec![*d]));
    for (i, a) in dims.iter().enumerate() {
        for b in &dims[i + 1..] {
            groupings.push(if rng.gen_bool(0.5) {
                vec![*a, *b]
            } else {
                vec![*b, *a]
            });
        }
    }
    groupings.push(vec![
        Dimension::Centre,
        Dimension::OnsetAgeBand,
        Dimension::Sex,
    ]);
    groupings.push(vec![
        Dimension::Gene,
        Dimension::Country,
        Dimension::Diagnosis,
    ]);
    let mut out = Vec::new();
    for group_by in groupings {
        let delay = group_by.len() <= 3;
        out.push((false, group_by.clone(), Vec::new()));
        out.push((false, group_by.clone(), filters(rng)));
        if delay {
            out.push((true, group_by.clone(), Vec::new()));
            out.push((true, group_by, filters(rng)));
        }
    }
    let _ = registry_id;
    out
}

/// One or two random filters, values known and unknown, "unknown"/"none" included.
fn filters(rng: &mut StdRng) -> Vec<Filter> {
    let mut dims = Dimension::ALL.to_vec();
    dims.shuffle(rng);
    let n = rng.gen_range(1..=2);
    dims.into_iter()
        .take(n)
        .map(|dimension| {
            let candidates: Vec<Key> = match dimension {
                Dimension::Diagnosis => vec![
                    Key::Int(586),
                    Key::Int(244),
                    Key::Int(104),
                    Key::Int(ORPHA_UNDIAGNOSED.into()),
                    Key::Int(1),
                ],
                Dimension::Sex => ["female", "male", "unknown"]
                    .map(|s| Key::Text(s.into()))
                    .to_vec(),
                Dimension::OnsetAgeBand | Dimension::DiagnosisAgeBand => {
                    vec![Key::Int(0), Key::Int(1), Key::Int(4), Key::Missing]
                }
                Dimension::Country => ["NL", "BE", "FR"].map(|s| Key::Text(s.into())).to_vec(),
                Dimension::Centre => ["NL-AMC", "DE-CHA", "XX-NONE"]
                    .map(|s| Key::Text(s.into()))
                    .to_vec(),
                Dimension::DiagnosisYear => {
                    vec![Key::Int(2015), Key::Int(2020), Key::Int(1999), Key::Missing]
                }
                Dimension::PatientStatus => {
                    ["alive", "deceased"].map(|s| Key::Text(s.into())).to_vec()
                }
                Dimension::Gene => {
                    vec![
                        Key::Text("CFTR".into()),
                        Key::Text("DNAH5".into()),
                        Key::Text("NOPE".into()),
                        Key::Missing,
                    ]
                }
            };
            let k = rng.gen_range(1..=candidates.len());
            let values = candidates.choose_multiple(rng, k).cloned().collect();
            Filter { dimension, values }
        })
        .collect()
}

fn rules() -> Rules {
    Rules::new(3, 1).unwrap()
}

fn deadline() -> Instant {
    Instant::now() + StdDuration::from_secs(120)
}

/// Compares every query's answer of `index` with the SQL reference at `now`; returns
/// how many queries were compared.
async fn compare(
    store: &Store,
    index: &Index,
    registries: &[i64],
    now: DateTime<Utc>,
    rng: &mut StdRng,
    name: &str,
) -> usize {
    let mut compared = 0;
    for &registry_id in registries {
        for (delay, group_by, filters) in queries(rng, registry_id) {
            let sel = Selection {
                registry_id,
                group_by: group_by.clone(),
                filters: filters.clone(),
                phenotypes: None,
                now,
            };
            let what = format!("{name}: {group_by:?} {filters:?} delay={delay} at {now}");
            if delay {
                let reference = store
                    .diagnostic_delay(&sel)
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|b| {
                        b.finish(&Known::nothing(), rules(), deadline())
                            .map_err(|e| e.to_string())
                    });
                let ours = index
                    .diagnostic_delay(&sel)
                    .map_err(|e| e.to_string())
                    .and_then(|b| {
                        b.finish(&Known::nothing(), rules(), deadline())
                            .map_err(|e| e.to_string())
                    });
                assert_eq!(ours, reference, "{what}");
            } else {
                let mut b = TableBuilder::new();
                let reference = store
                    .count_patients(&sel, &mut b)
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|()| {
                        b.finish(&group_by, &Known::nothing(), rules(), deadline())
                            .map_err(|e| e.to_string())
                    });
                let ours = index.count(&sel).map_err(|e| e.to_string()).and_then(|b| {
                    b.finish(&group_by, &Known::nothing(), rules(), deadline())
                        .map_err(|e| e.to_string())
                });
                assert_eq!(ours, reference, "{what}");
            }
            compared += 1;
        }
    }
    let code_sets: [&[i64]; 4] = [&[586], &[244, 104], &[70, 586, 1], &[1]];
    let country_sets: [&[&str]; 3] = [&[], &["NL"], &["BE", "DE", "FR"]];
    let registry_sets = [registries.to_vec(), registries[..1].to_vec()];
    for codes in code_sets {
        for countries in country_sets {
            for regs in &registry_sets {
                let countries: Vec<String> = countries.iter().map(|s| s.to_string()).collect();
                let mut reference = store.expertise(codes, regs, &countries, now).await.unwrap();
                let mut ours = index.expertise(codes, regs, &countries, now.timestamp_millis());
                let key = |r: &crate::store::research::ExpertiseRow| {
                    (r.centre_code.clone(), r.registry_id, r.orphacode)
                };
                reference.sort_by_key(key);
                ours.sort_by_key(key);
                assert_eq!(
                    ours, reference,
                    "{name}: expertise {codes:?} {countries:?} {regs:?} at {now}"
                );
                compared += 1;
            }
        }
    }
    compared
}

/// Patients counted at `now` in a registry, by the index.
fn counted(index: &Index, registry_id: i64, now: DateTime<Utc>) -> u64 {
    let sel = Selection {
        registry_id,
        group_by: Vec::new(),
        filters: Vec::new(),
        phenotypes: None,
        now,
    };
    let table = index
        .count(&sel)
        .unwrap()
        .finish(
            &[],
            &Known::nothing(),
            Rules::new(2, 1).unwrap(),
            deadline(),
        )
        .unwrap();
    table.protected.grand_total.unwrap()
}

async fn world() -> (tempfile::TempDir, World, Arc<Index>, Index) {
    world_of(None).await
}

/// [`world`], with `partitions` writers instead of the backend's default.
async fn world_of(partitions: Option<usize>) -> (tempfile::TempDir, World, Arc<Index>, Index) {
    world_with(partitions, false).await
}

/// [`world_of`]; with `follow_up`, what the writer leaves is caught up by
/// [`super::index::follow_up`] as in the service (otherwise only by the queries).
async fn world_with(
    partitions: Option<usize>,
    follow_up: bool,
) -> (tempfile::TempDir, World, Arc<Index>, Index) {
    let dir = tempfile::tempdir().unwrap();
    let store = fresh_store(&dir).await;
    let mut registries = Vec::new();
    for code in REGISTRIES {
        registries.push(store.registry_by_code(code).await.unwrap().unwrap().id);
    }
    let erns: Vec<String> = REGISTRIES.iter().map(|s| s.to_string()).collect();
    let mut centres = Vec::new();
    for (code, country) in CENTRES {
        centres.push(
            store
                .create_centre(code, &format!("{code} hospital"), country, &erns)
                .await
                .unwrap(),
        );
    }
    let principal = store
        .create_principal("index-test", Role::Admin, None, &[])
        .await
        .unwrap();
    // The writer's index, and another instance's (it only ever catches up).
    let live = Arc::new(Index::load(&store).await.unwrap());
    let lagging = Index::load(&store).await.unwrap();
    let master = MasterSecret::generate(&ring::rand::SystemRandom::new()).unwrap();
    let left = follow_up.then(|| {
        let (left, waiting) = tokio::sync::mpsc::channel(1);
        tokio::spawn(super::index::follow_up(
            Arc::downgrade(&live),
            waiting,
            None,
        ));
        left
    });
    let hook: Arc<dyn AfterCommit> = Arc::new(CatchUp {
        index: Arc::clone(&live),
        left,
    });
    let writer = Writer::start_with(
        store.clone(),
        partitions.unwrap_or(store.backend().default_writers()),
        64,
        Arc::new(AuditKey::derive(&master)),
        Arc::new(crate::service::consent::RegistryConsentRules),
        Some(hook),
    );
    let world = World {
        store,
        writer,
        principal,
        registries,
        centres,
        rng: StdRng::seed_from_u64(15),
        generator: Generator::new(15, Utc::now().date_naive()),
        expiry: ms(Utc::now() + Duration::days(30)),
        patients: Vec::new(),
        next: 0,
    };
    (dir, world, live, lagging)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_index_answers_every_query_as_the_sql_reference_does() {
    let (_dir, mut w, live, lagging) = world().await;
    let mut rng = StdRng::seed_from_u64(7);
    let mut compared = 0;
    for round in 0..3 {
        w.submit_new(if round == 0 { 120 } else { 40 }).await;
        w.change(60).await;
        // The writer's index applied what it could after its commits (it catches up
        // once it has answered, and leaves it to the next query while one catches up);
        // a query catches up first.
        live.catch_up().await.unwrap();
        lagging.catch_up().await.unwrap();
        let e = w.expiry;
        let instants = [
            Utc::now(),
            e - Duration::milliseconds(1),
            e,
            e + Duration::milliseconds(1),
            e + Duration::days(2),
        ];
        for now in instants {
            compared += compare(&w.store, &live, &w.registries, now, &mut rng, "writer's").await;
            compared += compare(
                &w.store,
                &lagging,
                &w.registries,
                now,
                &mut rng,
                "caught up",
            )
            .await;
        }
    }
    let reloaded = Index::load(&w.store).await.unwrap();
    compared += compare(
        &w.store,
        &reloaded,
        &w.registries,
        w.expiry,
        &mut rng,
        "reloaded",
    )
    .await;
    assert!(compared > 2000, "{compared}");
    // The data had what the comparison is about: patients expiring at the boundary,
    // erased ones and other centres' cases.
    let at = |t| counted(&live, w.registries[0], t) + counted(&live, w.registries[1], t);
    assert!(at(w.expiry - Duration::milliseconds(1)) > at(w.expiry));
    assert!(at(w.expiry) > at(w.expiry + Duration::milliseconds(1)));
    let erased: i64 = db::query("SELECT COUNT(*) FROM erasures")
        .fetch_scalar(w.store.pool())
        .await
        .unwrap();
    let shared: i64 = db::query(
        "SELECT COUNT(*) FROM (SELECT pseudonym FROM cases GROUP BY registry_id, pseudonym \
         HAVING COUNT(*) > 1) x",
    )
    .fetch_scalar(w.store.pool())
    .await
    .unwrap();
    assert!(erased > 0 && shared > 0, "{erased} erased, {shared} shared");
}

/// The writer applies its own commits to its index once it has answered them: with no
/// other catch-up under way, the index holds every change before any query catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_writer_applies_its_commits_to_its_index() {
    // One partition: an entry alone is then answered only after the hook of every batch
    // before it has returned.
    let (_dir, mut w, live, _) = world_of(Some(1)).await;
    w.submit_new(40).await;
    w.change(30).await;
    barrier(&w).await;
    let loaded = Index::load(&w.store).await.unwrap();
    assert_eq!(live.size().patients, loaded.size().patients);
    let now = Utc::now();
    for &registry_id in &w.registries {
        assert_eq!(
            counted(&live, registry_id, now),
            counted(&loaded, registry_id, now)
        );
    }
}

/// An audit entry alone, through one partition's writer: answered only after the
/// after-commit hook of every batch before it has returned.
async fn barrier(w: &World) {
    w.writer
        .execute(Command::Audit, Some(crate::audit::Entry::default()))
        .await
        .unwrap();
}

/// Once a catch-up of the writer's finds the index must be loaded again, the writer
/// reads no more changes (each read would come to the same verdict, at the cost of the
/// whole log behind the index) until a query's catch-up has reloaded it; then it applies
/// its commits again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_reload_found_due_the_writer_leaves_the_index_to_the_queries() {
    let (_dir, mut w, live, _) = world_of(Some(1)).await;
    let before = live.size().patients;
    *live.hold_turn().await = true;
    w.submit_new(20).await;
    barrier(&w).await;
    assert_eq!(live.size().patients, before, "no change read by the writer");
    live.catch_up().await.unwrap();
    let caught_up = live.size().patients;
    assert!(caught_up > before);
    w.submit_new(20).await;
    barrier(&w).await;
    let loaded = Index::load(&w.store).await.unwrap().size().patients;
    assert!(loaded > caught_up);
    assert_eq!(
        live.size().patients,
        loaded,
        "the writer applies its commits again"
    );
}

/// What the writer leaves to others (a query's catch-up held the turn, or a reload was
/// due) is applied by the follow-up as soon as it may, with no query asked: an erased
/// patient's values do not wait in memory for the next research question.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_writer_leaves_is_applied_without_a_query() {
    let (_dir, mut w, live, lagging) = world_with(Some(1), true).await;
    // Another instance's index, which the writer never tells: caught up every 50 ms.
    let lagging = Arc::new(lagging);
    let (_no_writer, waiting) = tokio::sync::mpsc::channel(1);
    tokio::spawn(super::index::follow_up(
        Arc::downgrade(&lagging),
        waiting,
        Some(StdDuration::from_millis(50)),
    ));
    // The index as loaded afresh, as the index itself holds it (no catch-up).
    let settles = |live: Arc<Index>, store: Store, registries: Vec<i64>| async move {
        let loaded = Index::load(&store).await.unwrap();
        let now = Utc::now();
        let same = |a: &Index, b: &Index| {
            a.size().patients == b.size().patients
                && registries
                    .iter()
                    .all(|&r| counted(a, r, now) == counted(b, r, now))
        };
        let started = Instant::now();
        while !same(&live, &loaded) {
            assert!(
                started.elapsed() < StdDuration::from_secs(60),
                "what the writer left was not applied"
            );
            tokio::time::sleep(StdDuration::from_millis(20)).await;
        }
        loaded.size().patients
    };
    w.submit_new(60).await;
    barrier(&w).await;
    let before = live.size().patients;

    // A query's catch-up holds the turn while erasures and other changes commit.
    let turn = live.hold_turn().await;
    w.change(40).await;
    barrier(&w).await;
    assert_eq!(live.size().patients, before, "left by the writer");
    drop(turn);
    let after = settles(Arc::clone(&live), w.store.clone(), w.registries.clone()).await;
    assert!(
        after < before,
        "erasures among the changes: {after} of {before}"
    );
    settles(Arc::clone(&lagging), w.store.clone(), w.registries.clone()).await;

    // A reload marked due: the writer reads nothing; the follow-up catches up.
    *live.hold_turn().await = true;
    w.change(40).await;
    barrier(&w).await;
    settles(Arc::clone(&live), w.store.clone(), w.registries.clone()).await;
    settles(Arc::clone(&lagging), w.store.clone(), w.registries.clone()).await;

    // The log pruned past the index's position while a query's catch-up holds the turn:
    // only a reload brings the index up to date, and the follow-up does it.
    let turn = live.hold_turn().await;
    w.change(40).await;
    barrier(&w).await;
    db::query("UPDATE research_seq SET pruned_through = seq WHERE id = 1")
        .execute(w.store.pool())
        .await
        .unwrap();
    drop(turn);
    settles(Arc::clone(&live), w.store.clone(), w.registries.clone()).await;
    settles(Arc::clone(&lagging), w.store.clone(), w.registries.clone()).await;
}

/// The follow-up reads the log only for commits that no catch-up begun since has read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follow_up_reads_nothing_a_later_catch_up_has_read() {
    let (_dir, mut w, live, _) = world_of(Some(1)).await;
    w.submit_new(10).await;
    barrier(&w).await;
    let turn = live.hold_turn().await;
    w.submit_new(10).await;
    barrier(&w).await;
    drop(turn);
    let begun = live.begun();
    live.catch_up_left().await.unwrap();
    assert_eq!(live.begun(), begun + 1, "left by the writer: read");
    live.catch_up_left().await.unwrap();
    assert_eq!(live.begun(), begun + 1, "read since: nothing to read");

    let turn = live.hold_turn().await;
    w.submit_new(10).await;
    barrier(&w).await;
    drop(turn);
    live.catch_up().await.unwrap();
    let begun = live.begun();
    live.catch_up_left().await.unwrap();
    assert_eq!(live.begun(), begun, "a query's catch-up read it");
    let loaded = Index::load(&w.store).await.unwrap();
    assert_eq!(live.size().patients, loaded.size().patients);
}

/// A query's catch-up under way never holds up the writer: batches committed meanwhile
/// are answered, and the writer goes on to the next, leaving their changes to the next
/// catch-up (which every query makes before it counts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_writer_never_waits_for_a_catch_up_under_way() {
    let (_dir, mut w, live, _) = world().await;
    let before = live.size().patients;
    let turn = live.hold_turn().await;
    for _ in 0..2 {
        // Two rounds: the writer neither waits before answering nor after.
        tokio::time::timeout(StdDuration::from_secs(60), w.submit_new(20))
            .await
            .expect("the writer waited for the catch-up under way");
    }
    assert_eq!(live.size().patients, before, "left to the next catch-up");
    drop(turn);
    live.catch_up().await.unwrap();
    let loaded = Index::load(&w.store).await.unwrap().size().patients;
    assert!(loaded > before, "{loaded}");
    assert_eq!(live.size().patients, loaded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consent_expiring_at_the_query_instant_is_not_counted() {
    let (_dir, mut w, live, _) = world().await;
    let registry_id = w.registries[0];
    let expiry = w.expiry;
    let mut submit = |n: u32, expires: Option<DateTime<Utc>>| {
        let row = w.row();
        Command::Submit(SubmitCase {
            registry_id,
            pseudonym: format!("R{registry_id:03}-V001-B{n:031}"),
            centre_id: w.centres[0],
            principal_id: w.principal,
            consent: vec![
                ConsentDecision {
                    scope: Scope::RegistryInclusion,
                    decision: Decision::Granted,
                    given_at: ms(Utc::now() - Duration::days(1)),
                    form_version: "t".into(),
                    expires_at: None,
                },
                ConsentDecision {
                    scope: Scope::ResearchUse,
                    decision: Decision::Granted,
                    given_at: ms(Utc::now() - Duration::days(1)),
                    form_version: "t".into(),
                    expires_at: expires,
                },
            ],
            row,
            now: Utc::now(),
        })
    };
    // Four patients per expiry: every count below is published (k = 2).
    let mut commands = Vec::new();
    for (i, expires) in [
        Some(expiry - Duration::milliseconds(1)),
        Some(expiry),
        Some(expiry + Duration::milliseconds(1)),
        None,
    ]
    .into_iter()
    .enumerate()
    {
        for j in 0..4 {
            commands.push(submit((i * 4 + j) as u32, expires));
        }
    }
    w.run(commands).await;
    live.catch_up().await.unwrap();
    let at = |t: DateTime<Utc>| counted(&live, registry_id, t);
    assert_eq!(at(expiry - Duration::milliseconds(2)), 16);
    assert_eq!(
        at(expiry - Duration::milliseconds(1)),
        12,
        "expired at its instant"
    );
    assert_eq!(
        at(expiry),
        8,
        "expiring exactly at the query instant: not counted"
    );
    assert_eq!(at(expiry + Duration::milliseconds(1)), 4);
    // The reference agrees, at each of those instants.
    for t in [-2, -1, 0, 1] {
        let now = expiry + Duration::milliseconds(t);
        let sel = Selection {
            registry_id,
            group_by: Vec::new(),
            filters: Vec::new(),
            phenotypes: None,
            now,
        };
        let mut b = TableBuilder::new();
        w.store.count_patients(&sel, &mut b).await.unwrap();
        let reference = b
            .finish(
                &[],
                &Known::nothing(),
                Rules::new(2, 1).unwrap(),
                deadline(),
            )
            .unwrap();
        assert_eq!(reference.protected.grand_total, Some(at(now)), "at {t} ms");
    }
    // Withdrawals answered to their caller are out of the index once it has caught up, as
    // every query does first: research use of one patient without expiry, inclusion
    // (erasure) of another.
    let withdraw = |n: u32, scope: Scope| {
        Command::Withdraw(Withdraw {
            registry_id,
            pseudonym: format!("R{registry_id:03}-V001-B{n:031}"),
            principal_id: w.principal,
            scopes: vec![scope],
            reason: WithdrawalReason::PatientRequest,
            receipt_id: format!("r{n}"),
            now: Utc::now(),
        })
    };
    let commands = vec![
        withdraw(12, Scope::ResearchUse),
        withdraw(13, Scope::RegistryInclusion),
    ];
    w.run(commands).await;
    live.catch_up().await.unwrap();
    assert_eq!(at(expiry + Duration::milliseconds(1)), 2);
    assert_eq!(at(Utc::now()), 14);
    assert_eq!(
        live.size().patients,
        15,
        "the erased patient's entry is gone"
    );
}

#[tokio::test]
async fn rows_of_an_earlier_version_get_slots_and_are_logged() {
    let (_dir, mut w, _, lagging) = world().await;
    w.submit_new(20).await;
    lagging.catch_up().await.unwrap();
    let before = lagging.size().patients;
    // As if restored from a dump of a version without slots.
    db::query("UPDATE patients SET slot = NULL")
        .execute(w.store.pool())
        .await
        .unwrap();
    let numbered = research_index::number_unnumbered(&w.store).await.unwrap();
    assert_eq!(numbered as usize, before);
    lagging.catch_up().await.unwrap();
    assert_eq!(lagging.size().patients, before);
    let reloaded = Index::load(&w.store).await.unwrap();
    assert_eq!(reloaded.size().patients, before);
}

/// What the service derived from a version's dates before migration 0027: ages from the
/// middle of the birth month whatever the onset, months from its 15th ([onset age,
/// diagnosis age, delay in days, delay in months]).
fn derived_before_0027(birth: &str, kind: &str, onset: Option<&str>, diagnosis: &str) -> [i64; 4] {
    use crate::domain::{PartialDate, YearMonth, least_whole_months, most_whole_months};
    let birth = YearMonth::parse(birth).unwrap().as_partial();
    let age = |d: chrono::NaiveDate| (d - birth.midpoint()).num_days().max(0);
    let (onset_age, onset_anchor) = match (kind, onset) {
        ("date", Some(onset)) => {
            let onset = PartialDate::parse(onset).unwrap();
            (
                age(onset.midpoint()),
                onset.month_anchor().max(birth.month_anchor()),
            )
        }
        _ => (0, birth.month_anchor()),
    };
    let diagnosis = PartialDate::parse(diagnosis).unwrap();
    let diagnosis_age = age(diagnosis.midpoint());
    let days = (diagnosis_age - onset_age).max(0);
    let months = crate::domain::whole_months(
        onset_anchor,
        diagnosis.month_anchor().max(birth.month_anchor()),
    )
    .clamp(least_whole_months(days), most_whole_months(days));
    [onset_age, diagnosis_age, days, months]
}

/// Research rows stored before the delay in whole months was kept (migration 0026), or
/// with ages from the middle of the birth month where an onset dated earlier in it now
/// counts (0027), get it at the next start, from their versions' dates, the same as the
/// writer gives, and the changes are logged for other instances' indexes; two instances
/// starting together fill each row once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delays_of_an_earlier_version_are_filled_in_and_logged() {
    let (_dir, mut w, _, lagging) = world().await;
    w.submit_new(80).await;
    lagging.catch_up().await.unwrap();
    let months = || async {
        db::query(
            "SELECT registry_id, patient, onset_age_days, diagnosis_age_days, delay_days, \
                    delay_months FROM patients ORDER BY registry_id, patient",
        )
        .fetch_all(w.store.pool())
        .await
        .unwrap()
        .iter()
        .map(|r| {
            (
                r.get::<i64>("patient"),
                r.get::<Option<i64>>("delay_days"),
                r.get::<Option<i64>>("delay_months"),
                (
                    r.get::<Option<i64>>("onset_age_days"),
                    r.get::<Option<i64>>("diagnosis_age_days"),
                ),
            )
        })
        .collect::<Vec<_>>()
    };
    let written = months().await;
    let with_delay = written.iter().filter(|(_, d, _, _)| d.is_some()).count();
    assert!(with_delay > 20, "{with_delay} of {}", written.len());
    assert!(
        written
            .iter()
            .all(|(_, d, m, _)| d.is_some() == m.is_some()),
        "the writer keeps both or neither"
    );
    // Migration 0027 on rows as the rule before it left them: every row the new rule
    // changes loses its months there, and the start gives each what the writer does.
    let versions = db::query(
        "SELECT p.registry_id, p.patient, v.birth_year_month, v.onset_kind, v.onset_date, \
                v.diagnosis_date \
         FROM patients p JOIN case_versions v ON v.case_id = p.case_id AND v.version = p.version \
         WHERE p.delay_days IS NOT NULL",
    )
    .fetch_all(w.store.pool())
    .await
    .unwrap();
    let mut changed = 0;
    for v in &versions {
        let before = derived_before_0027(
            &v.get::<String>("birth_year_month"),
            &v.get::<String>("onset_kind"),
            v.get::<Option<String>>("onset_date").as_deref(),
            &v.get::<String>("diagnosis_date"),
        );
        let done = db::query(
            "UPDATE patients SET onset_age_days = $3, diagnosis_age_days = $4, \
                    delay_days = $5, delay_months = $6 \
             WHERE registry_id = $1 AND patient = $2 AND (onset_age_days <> $3 \
               OR diagnosis_age_days <> $4 OR delay_days <> $5 OR delay_months <> $6)",
        )
        .bind(v.get::<i64>("registry_id"))
        .bind(v.get::<i64>("patient"))
        .bind(before[0])
        .bind(before[1])
        .bind(before[2])
        .bind(before[3])
        .execute(w.store.pool())
        .await
        .unwrap();
        changed += done.rows_affected();
    }
    assert!(changed >= 3, "{changed} rows the rule changes");
    assert_ne!(months().await, written);
    let migration = match w.store.backend() {
        crate::store::Backend::Sqlite => {
            include_str!("../../../migrations/sqlite/0027_ages_from_an_early_onset.sql")
        }
        crate::store::Backend::Postgres => {
            include_str!("../../../migrations/postgres/0027_ages_from_an_early_onset.sql")
        }
    };
    db::query(migration).execute(w.store.pool()).await.unwrap();
    let filled = research_index::fill_delay_months(&w.store).await.unwrap();
    assert!(filled.filled >= changed, "{filled:?}, {changed} changed");
    assert!(
        (filled.filled as usize) < with_delay,
        "{filled:?}: only onsets in the birth month"
    );
    assert_eq!(months().await, written, "as the writer gives");
    lagging.catch_up().await.unwrap();
    let counter = || async {
        db::query("SELECT seq FROM research_seq WHERE id = 1")
            .fetch_one(w.store.pool())
            .await
            .unwrap()
            .get::<i64>("seq")
    };
    for round in 0..3 {
        db::query("UPDATE patients SET delay_months = NULL")
            .execute(w.store.pool())
            .await
            .unwrap();
        let logged = counter().await;
        let filled = if round == 0 {
            research_index::fill_delay_months(&w.store)
                .await
                .unwrap()
                .filled
        } else {
            let (a, b) = tokio::join!(
                research_index::fill_delay_months(&w.store),
                research_index::fill_delay_months(&w.store)
            );
            a.unwrap().filled + b.unwrap().filled
        };
        assert_eq!(filled as usize, with_delay, "round {round}");
        assert_eq!(months().await, written, "round {round}");
        assert_eq!(counter().await - logged, with_delay as i64, "round {round}");
        assert_eq!(
            research_index::fill_delay_months(&w.store).await.unwrap(),
            Default::default()
        );
        lagging.catch_up().await.unwrap();
    }
    // A version whose dates do not parse (changed outside the service) leaves its row
    // without months and is counted; the others are filled, and the start goes on.
    db::query("UPDATE patients SET delay_months = NULL")
        .execute(w.store.pool())
        .await
        .unwrap();
    db::query(
        "UPDATE case_versions SET onset_date = '2010-13' WHERE onset_kind = 'date' AND \
         case_id = (SELECT MIN(p.case_id) FROM patients p JOIN case_versions v \
                    ON v.case_id = p.case_id AND v.version = p.version \
                    WHERE p.delay_days IS NOT NULL AND v.onset_kind = 'date')",
    )
    .execute(w.store.pool())
    .await
    .unwrap();
    let done = research_index::fill_delay_months(&w.store).await.unwrap();
    assert_eq!((done.filled as usize, done.unreadable), (with_delay - 1, 1));
    assert_eq!(
        months()
            .await
            .iter()
            .filter(|(_, _, m, _)| m.is_some())
            .count(),
        with_delay - 1
    );
}

/// Two instances starting at once both number the rows without a slot: each row is
/// numbered once, by one of them, and neither fails (the second waits for the counter's
/// lock and then finds none left).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_starting_together_number_each_row_once() {
    let (_dir, mut w, _, lagging) = world().await;
    w.submit_new(20).await;
    lagging.catch_up().await.unwrap();
    let before = lagging.size().patients;
    for round in 0..5 {
        db::query("UPDATE patients SET slot = NULL")
            .execute(w.store.pool())
            .await
            .unwrap();
        let (a, b) = tokio::join!(
            research_index::number_unnumbered(&w.store),
            research_index::number_unnumbered(&w.store)
        );
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!((a + b) as usize, before, "round {round}: {a} and {b}");
        lagging.catch_up().await.unwrap();
        assert_eq!(lagging.size().patients, before);
    }
}

/// A table with more groups than a table may have is refused while it is counted: the
/// scan stops keeping cells past the limit, and the groups are not all built first
/// (here with a limit of 2 cells, far below what the table builder refuses).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_too_fine_is_refused_while_it_is_counted() {
    let (_dir, mut w, live, _) = world().await;
    w.submit_new(60).await;
    live.catch_up().await.unwrap();
    let registry_id = w.registries[0];
    let sel = |group_by: Vec<Dimension>| Selection {
        registry_id,
        group_by,
        filters: Vec::new(),
        phenotypes: None,
        now: Utc::now(),
    };
    let refused = |result: Result<TableBuilder, crate::store::research::ResearchError>| {
        matches!(
            result,
            Err(crate::store::research::ResearchError::Query(
                crate::aggregate::QueryError::TooFine
            ))
        )
    };
    for dims in [vec![Dimension::Centre], vec![Dimension::Gene]] {
        let groups = live.count(&sel(dims.clone())).unwrap().groups();
        assert!(groups > 2, "{dims:?}: {groups} groups, more than 2 needed");
        assert!(
            refused(live.count_within(&sel(dims.clone()), 2)),
            "{dims:?}"
        );
        assert!(
            !refused(live.count_within(&sel(dims.clone()), groups)),
            "{dims:?}"
        );
    }
}
