//! Two server processes on one PostgreSQL, written as the race they must survive.
//!
//! Per-patient ordering inside one process (the writer's partitions) does not reach across
//! processes: each instance checks consent, then writes, under READ COMMITTED. If a
//! withdrawal commits on instance B between instance A's consent read and A's commit, A
//! would store a case after the erasure, research-eligible. The writer therefore takes a
//! per-patient transaction-scoped advisory lock before reading consent, and applies the
//! consent rules no earlier than the latest decision on file (a withdrawal may be dated
//! after a submission that waited for it) (`store::writer`, `docs/scaling.md`). Here the
//! real binary runs twice on one database: withdrawals on B race submissions, updates and
//! reads on A, and afterwards no case, no version and no research row may be left for a
//! patient whose inclusion is withdrawn. Without the lock this fails in every run; it
//! needs no artificial widening of the race.
//!
//! PostgreSQL only (`ERN_TEST_DATABASE_URL`): on SQLite one server serves a data dir
//! (`server_lock.rs`), so there is no second instance to race.

use ern_registry::store::db;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ern_registry::auth::Role;
use ern_registry::proto::{self, ConsentScope as S};
use tonic::Code;
use tonic::transport::Channel;

use crate::helpers::*;

const REGISTRY: &str = "ERN-EYE";
const PATIENTS: u32 = 32;
const ROUNDS: u32 = 8;

/// A server process, killed when dropped (also when an assertion fails).
struct Instance {
    child: Child,
    port: u16,
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the real binary on `url`, with the master key of `dir` (the same for both, so
/// they derive the same pseudonyms); its log goes to `dir/<name>.log`.
async fn start(dir: &Path, url: &str, name: &str) -> Instance {
    let port = free_port();
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_ern-registry"))
        .arg("--data-dir")
        .arg(dir)
        .args(["--database-url", url, "serve", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        // Room for the test's bursts: every call of a principal at once, no derivation
        // limit in the way.
        .args(["--max-calls-in-flight", "10000"])
        .args(["--derivations-per-minute", "1000000"])
        .args(["--research-queries-per-minute", "100000"])
        .env("ERN_LOG", "warn")
        .env_remove("DATABASE_URL")
        .env_remove("ERN_MASTER_KEY_FILE")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start the server binary");
    let instance = Instance { child, port };
    for _ in 0..400 {
        if channel(&instance).await.is_some() {
            return instance;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "{name} did not come up: {}",
        std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default()
    );
}

async fn channel(instance: &Instance) -> Option<Channel> {
    Channel::from_shared(format!("http://127.0.0.1:{}", instance.port))
        .unwrap()
        .connect()
        .await
        .ok()
}

fn bearer(token: &str) -> Bearer {
    Bearer(Some(format!("Bearer {token}").parse().unwrap()))
}

/// How many rows of `table` (with `registry_id` and `pseudonym`, or reached through
/// `cases`) belong to a patient whose REGISTRY_INCLUSION in force is not granted, i.e.
/// were stored or kept after a withdrawal without a newer consent; `filter` narrows the
/// rows of `t`.
async fn rows_without_inclusion(app: &TestApp, from: &str, filter: &str) -> i64 {
    db::query(&format!(
        "SELECT COUNT(*) FROM {from} \
         WHERE {filter} AND NOT EXISTS (SELECT 1 FROM consent_current k \
                           WHERE k.registry_id = t.registry_id AND k.pseudonym = t.pseudonym \
                             AND k.scope = 'registry_inclusion' AND k.state = 'granted')"
    ))
    .fetch_scalar(app.store.pool())
    .await
    .unwrap()
}

type Timed = (Instant, Result<(), Code>);

#[tokio::test]
async fn withdrawals_on_one_instance_race_writes_on_another() {
    let mut app = TestApp::spawn().await;
    if app.is_sqlite() {
        return; // One server per SQLite data dir: nothing to race across processes.
    }
    app.centre("NL-AMC", "NL", &[REGISTRY]).await;
    app.centre("BE-UZL", "BE", &[REGISTRY]).await;
    let dr_a = app
        .principal("dr-a", Role::Physician, Some("NL-AMC"), &[])
        .await;
    let dr_b = app
        .principal("dr-b", Role::Physician, Some("BE-UZL"), &[])
        .await;
    let officer = app
        .principal("co-eye", Role::ConsentOfficer, None, &[REGISTRY])
        .await;
    // The TestApp only provides the database, the principals and the master key; the
    // servers under test are two processes of the real binary.
    app.stop_server().await;
    let dir = app.dir.path().to_path_buf();
    let url = app.database_url.clone();
    let a = start(&dir, &url, "instance-a").await;
    let b = start(&dir, &url, "instance-b").await;
    let (on_a, on_b) = (channel(&a).await.unwrap(), channel(&b).await.unwrap());
    let case_client = |ch: &Channel, token: &str| {
        proto::case_service_client::CaseServiceClient::with_interceptor(ch.clone(), bearer(token))
    };
    let dr_a = case_client(&on_a, &dr_a);
    let dr_b = case_client(&on_a, &dr_b);
    let officer = proto::consent_service_client::ConsentServiceClient::with_interceptor(
        on_b.clone(),
        bearer(&officer),
    );

    let (mut stored_then_erased, mut refused) = (0u32, 0u32);
    // Answers no client may get (collected, so the tables are checked in any case).
    let mut odd: Vec<String> = Vec::new();
    for round in 0..ROUNDS {
        // Each patient included, with NL-AMC's case, submitted on A.
        let mut patients = Vec::new();
        for i in 0..PATIENTS {
            let seed = 30_000 + round * 100 + i;
            let p = dr_a
                .clone()
                .submit_case(submission(REGISTRY, national("NL", &bsn(seed))))
                .await
                .unwrap()
                .into_inner()
                .pseudonym;
            patients.push((seed, p));
        }
        // The race: B withdraws while A takes BE-UZL's submission (on the consent on
        // file: no attestation, or one signed before the withdrawal), NL-AMC's update and
        // both centres' reads.
        let mut tasks = Vec::new();
        for (seed, p) in patients {
            let (mut officer, mut dr_a, mut dr_b) = (officer.clone(), dr_a.clone(), dr_b.clone());
            tasks.push(tokio::spawn(async move {
                let k = u64::from(seed);
                let withdraw = async {
                    tokio::time::sleep(jitter(k, 2000)).await;
                    officer
                        .withdraw_consent(withdrawal(
                            REGISTRY,
                            by_pseudonym(&p),
                            &[S::RegistryInclusion],
                        ))
                        .await
                        .unwrap();
                    Instant::now()
                };
                let mut submit_b = dr_b.clone();
                let submit = async move {
                    tokio::time::sleep(jitter(k + 1, 2000)).await;
                    let mut req = submission(REGISTRY, national("NL", &bsn(seed)));
                    if seed % 2 == 0 {
                        req.consent.clear();
                    }
                    let started = Instant::now();
                    let r = submit_b.submit_case(req).await;
                    (started, r.map(|_| ()).map_err(|e| e.code()))
                };
                let mut update_a = dr_a.clone();
                let update_p = p.clone();
                let update = async move {
                    tokio::time::sleep(jitter(k + 2, 2000)).await;
                    let started = Instant::now();
                    let r = update_a
                        .update_case(proto::UpdateCaseRequest {
                            registry: REGISTRY.into(),
                            pseudonym: update_p,
                            expected_version: 1,
                            record: Some(record()),
                            consent: vec![],
                        })
                        .await;
                    (started, r.map(|_| ()).map_err(|e| e.code()))
                };
                let reads = async {
                    let mut seen: Vec<Timed> = Vec::new();
                    for n in 0..8u64 {
                        tokio::time::sleep(jitter(k + 3 + n, 2000) / 2).await;
                        let reader = if n % 2 == 0 { &mut dr_a } else { &mut dr_b };
                        let started = Instant::now();
                        let r = reader.get_case(get_case(REGISTRY, &p)).await;
                        seen.push((started, r.map(|_| ()).map_err(|e| e.code())));
                    }
                    seen
                };
                let (withdrawn_at, submitted, updated, reads) =
                    tokio::join!(withdraw, submit, update, reads);
                (withdrawn_at, submitted, updated, reads)
            }));
        }
        for t in tasks {
            let (withdrawn_at, (submit_started, submitted), (update_started, updated), reads) =
                t.await.unwrap();
            for (started, r) in reads {
                match r {
                    Ok(()) if started > withdrawn_at => {
                        odd.push("a read on A after the withdrawal on B saw the record".into())
                    }
                    Ok(()) | Err(Code::NotFound) => {}
                    Err(code) => odd.push(format!("a read answered {code:?}")),
                }
            }
            match submitted {
                Ok(()) if submit_started > withdrawn_at => {
                    odd.push("a submission on A after the withdrawal on B was stored".into())
                }
                Ok(()) => stored_then_erased += 1,
                Err(Code::FailedPrecondition) => refused += 1,
                Err(code) => odd.push(format!("a submission answered {code:?}")),
            }
            match updated {
                Ok(()) if update_started > withdrawn_at => {
                    odd.push("an update on A after the withdrawal on B was stored".into())
                }
                Ok(()) | Err(Code::NotFound) => {}
                Err(code) => odd.push(format!("an update answered {code:?}")),
            }
        }
    }

    // Nothing stored, kept or research-counted for a patient whose inclusion in force is
    // not granted (every patient here ends withdrawn, none re-consented).
    let cases = rows_without_inclusion(&app, "cases t", "TRUE").await;
    let versions = rows_without_inclusion(
        &app,
        "case_versions v JOIN cases t ON t.id = v.case_id",
        "TRUE",
    )
    .await;
    let research = rows_without_inclusion(&app, "patients t", "TRUE").await;
    let eligible = rows_without_inclusion(&app, "patients t", "t.eligible").await;
    eprintln!(
        "{} submissions on A stored before the withdrawal on B, {} refused after it; \
         left after a withdrawal: {cases} cases, {versions} versions, {research} research rows \
         ({eligible} research-eligible); odd answers: {odd:?}",
        stored_then_erased, refused
    );
    assert_eq!(
        (cases, versions, research, eligible),
        (0, 0, 0, 0),
        "a write on A committed after the withdrawal on B: (cases, versions, research rows, \
         research-eligible rows) of withdrawn patients"
    );
    assert!(odd.is_empty(), "{odd:?}");
    assert_eq!(app.count("cases").await, 0);
    assert_eq!(app.count("patients").await, 0);
    assert_eq!(
        app.count("erasures").await,
        i64::from(PATIENTS * ROUNDS),
        "one erasure per withdrawal"
    );
    // The race was a race: both orders happened.
    assert!(
        stored_then_erased > 0 && refused > 0,
        "{stored_then_erased} stored, {refused} refused"
    );
    drop((a, b));
}

/// Research queries on one instance, withdrawals and submissions on the other: a query
/// counts every patient whose submission on B was answered before it started, and no
/// patient whose withdrawal on B was answered before it started. Instance A learns of B's
/// commits only through the change log (`store::research_index`): without its catch-up,
/// A's index would never see them.
#[tokio::test]
async fn research_on_one_instance_sees_what_another_committed_before_it() {
    let mut app = TestApp::spawn().await;
    if app.is_sqlite() {
        return; // One server per SQLite data dir: nothing to race across processes.
    }
    app.centre("NL-AMC", "NL", &[REGISTRY]).await;
    let physician = app
        .principal("dr-a", Role::Physician, Some("NL-AMC"), &[])
        .await;
    let officer = app
        .principal("co-eye", Role::ConsentOfficer, None, &[REGISTRY])
        .await;
    let researcher = app
        .principal("res-eye", Role::Researcher, None, &[REGISTRY])
        .await;
    app.stop_server().await;
    let dir = app.dir.path().to_path_buf();
    let url = app.database_url.clone();
    let a = start(&dir, &url, "research-a").await;
    let b = start(&dir, &url, "research-b").await;
    let (on_a, on_b) = (channel(&a).await.unwrap(), channel(&b).await.unwrap());
    let physician = proto::case_service_client::CaseServiceClient::with_interceptor(
        on_b.clone(),
        bearer(&physician),
    );
    let officer = proto::consent_service_client::ConsentServiceClient::with_interceptor(
        on_b.clone(),
        bearer(&officer),
    );
    let research = proto::research_service_client::ResearchServiceClient::with_interceptor(
        on_a.clone(),
        bearer(&researcher),
    );
    let total = |mut research: proto::research_service_client::ResearchServiceClient<_>| async move {
        let t = research
            .count_patients(proto::CountPatientsRequest {
                registry: REGISTRY.into(),
                group_by: vec![],
                filters: vec![],
            })
            .await
            .unwrap()
            .into_inner();
        t.grand_total
            .and_then(|c| c.count)
            .expect("a total of at least k")
    };

    const NEW: u64 = 24;
    const WITHDRAWN: u64 = 16;
    let mut base = 0u64;
    for round in 0..4u32 {
        // B stores new patients; A counts every one of them from the next query on.
        let mut pseudonyms = Vec::new();
        for i in 0..NEW as u32 {
            let seed = 40_000 + round * 100 + i;
            pseudonyms.push(
                physician
                    .clone()
                    .submit_case(submission(REGISTRY, national("NL", &bsn(seed))))
                    .await
                    .unwrap()
                    .into_inner()
                    .pseudonym,
            );
        }
        assert_eq!(
            total(research.clone()).await,
            base + NEW,
            "A counts the patients B stored before the query"
        );
        // B withdraws (research use or inclusion) while A counts.
        let mut withdrawals = Vec::new();
        for (i, p) in pseudonyms.iter().take(WITHDRAWN as usize).enumerate() {
            let (mut officer, p) = (officer.clone(), p.clone());
            let scope = if i % 2 == 0 {
                S::ResearchUse
            } else {
                S::RegistryInclusion
            };
            withdrawals.push(tokio::spawn(async move {
                tokio::time::sleep(jitter(u64::from(round) * 100 + i as u64, 20_000)).await;
                let started = Instant::now();
                officer
                    .withdraw_consent(withdrawal(REGISTRY, by_pseudonym(&p), &[scope]))
                    .await
                    .unwrap();
                (started, Instant::now())
            }));
        }
        let mut queries = Vec::new();
        for n in 0..40u64 {
            let research = research.clone();
            queries.push(tokio::spawn(async move {
                tokio::time::sleep(jitter(1_000 + u64::from(round) * 100 + n, 24_000)).await;
                let started = Instant::now();
                let count = total(research).await;
                (started, count, Instant::now())
            }));
        }
        let mut done = Vec::new();
        for w in withdrawals {
            done.push(w.await.unwrap());
        }
        for q in queries {
            let (started, count, ended) = q.await.unwrap();
            let answered_before = done.iter().filter(|(_, acked)| *acked < started).count() as u64;
            let begun_before = done.iter().filter(|(begun, _)| *begun < ended).count() as u64;
            assert!(
                count <= base + NEW - answered_before,
                "a query on A counted a patient whose withdrawal B had answered before it \
                 started ({count} > {})",
                base + NEW - answered_before
            );
            assert!(
                count >= base + NEW - begun_before,
                "a query on A missed a patient not yet withdrawn ({count} < {})",
                base + NEW - begun_before
            );
        }
        base += NEW - WITHDRAWN;
        assert_eq!(total(research.clone()).await, base);
    }
    // B's own index, caught up with its own writes, agrees.
    let on_b_research = proto::research_service_client::ResearchServiceClient::with_interceptor(
        on_b.clone(),
        bearer(&researcher),
    );
    assert_eq!(total(on_b_research).await, base);
    drop((a, b));
}
