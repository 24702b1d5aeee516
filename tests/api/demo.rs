//! `demo` is safe: it writes only into a database whose patients are all synthetic (or
//! that has none), and its patients carry identifiers of the synthetic issuer, which no
//! real patient can hold and which the service validates and pseudonymises like any
//! other. The binary's refusal (exit code, key untouched) is in `master_key.rs`.

use std::sync::Arc;

use chrono::Utc;
use ern_registry::audit::AuditKey;
use ern_registry::keys::MasterSecret;
use ern_registry::pseudonym::{Pseudonymiser, SYNTHETIC_ISSUER};
use ern_registry::store::db;
use ern_registry::store::writer::Writer;
use ern_registry::synthetic::{self, CENTRES, GENERATOR_PRINCIPAL, Generator, SyntheticError};
use tonic::Code;

use crate::helpers::*;

/// Every table `demo` writes to.
const TABLES: [&str; 10] = [
    "cases",
    "case_versions",
    "consent_events",
    "consent_current",
    "patients",
    "centres",
    "centre_registries",
    "principals",
    "audit_log",
    "master_key",
];

async fn row_counts(app: &TestApp) -> Vec<i64> {
    let mut counts = Vec::new();
    for table in TABLES {
        counts.push(app.count(table).await);
    }
    counts
}

fn master(app: &TestApp) -> MasterSecret {
    MasterSecret::load(&app.dir.path().join("master.key")).unwrap()
}

/// What `ern-registry demo --registry ERN-LUNG --seed 1` does, with the app's key.
async fn demo(app: &TestApp, patients: u32) -> Result<synthetic::Populated, SyntheticError> {
    let master = master(app);
    let writer = Writer::start(
        app.store.clone(),
        1,
        64,
        Arc::new(AuditKey::derive(&master)),
        Arc::new(ern_registry::service::consent::RegistryConsentRules),
    );
    synthetic::populate(
        &app.store,
        &writer,
        &Pseudonymiser::new(&master),
        "ERN-LUNG",
        patients,
        1,
        |_| {},
    )
    .await
}

async fn lung_patients(app: &TestApp) -> i64 {
    let lung = app
        .store
        .registry_by_code("ERN-LUNG")
        .await
        .unwrap()
        .unwrap();
    app.store.patients_in_registry(lung.id).await.unwrap()
}

fn synthetic(n: u32) -> ern_registry::proto::PatientIdentifiers {
    national(SYNTHETIC_ISSUER, &synthetic::identifier(n))
}

#[tokio::test]
async fn demo_fills_an_empty_registry_and_adds_more_on_every_run() {
    let app = TestApp::spawn().await;
    let first = demo(&app, 30).await.unwrap();
    assert_eq!((first.written, first.first), (30, 0));
    let second = demo(&app, 20).await.unwrap();
    assert_eq!((second.written, second.first), (20, 30));
    assert_eq!(lung_patients(&app).await, 50);
    // Every row is the generator's.
    assert_eq!(
        app.store
            .patient_data_not_recorded_by(GENERATOR_PRINCIPAL)
            .await
            .unwrap(),
        None
    );
}

#[tokio::test]
async fn demo_refuses_a_database_with_one_case_it_did_not_write_and_writes_nothing() {
    let app = TestApp::spawn().await;
    // A real case in another registry: the rule is for the whole database.
    let mut dr = app.physician("dr-real", "NL-AMC").await;
    dr.submit_case(submission("ERN-EYE", national("NL", &bsn(1))))
        .await
        .unwrap();
    let before = row_counts(&app).await;
    let err = demo(&app, 10).await.unwrap_err();
    assert!(
        matches!(err, SyntheticError::NotSynthetic("a case")),
        "{err}"
    );
    assert!(err.to_string().starts_with("refused"), "{err}");
    assert_eq!(row_counts(&app).await, before, "demo wrote nothing");
}

#[tokio::test]
async fn demo_refuses_a_database_with_a_consent_decision_it_did_not_write() {
    let app = TestApp::spawn().await;
    demo(&app, 5).await.unwrap();
    let mut officer = app.officer("officer", &["ERN-LUNG"]).await;
    officer
        .record_consent(ern_registry::proto::RecordConsentRequest {
            registry: "ERN-LUNG".into(),
            patient: by_identifiers(national("NL", &bsn(7))),
            decisions: inclusion_granted(),
            client_reference: String::new(),
        })
        .await
        .unwrap();
    let before = row_counts(&app).await;
    let err = demo(&app, 5).await.unwrap_err();
    assert!(
        matches!(err, SyntheticError::NotSynthetic("a consent decision")),
        "{err}"
    );
    assert_eq!(row_counts(&app).await, before, "demo wrote nothing");
}

/// A synthetic identifier submitted through the API is validated and pseudonymised like
/// any other: the same pseudonym as demo's. The case is still the physician's, so demo
/// refuses the database from then on.
#[tokio::test]
async fn synthetic_identifiers_take_the_real_path_and_a_physicians_case_is_not_synthetic() {
    let app = TestApp::spawn().await;
    demo(&app, 10).await.unwrap();
    let mut dr = app.physician("dr-test", "NL-TEST").await;
    let submitted = dr
        .submit_case(submission("ERN-LUNG", synthetic(0)))
        .await
        .unwrap()
        .into_inner();
    // Demo's patient 0 and the physician's are one patient of the registry.
    assert_eq!(lung_patients(&app).await, 10);
    let same: i64 = db::query("SELECT COUNT(*) FROM cases WHERE pseudonym = $1")
        .bind(&submitted.pseudonym)
        .fetch_one(app.store.pool())
        .await
        .unwrap()
        .get(0);
    assert_eq!(same, 2, "demo's case and the physician's");
    // And from the centre demo gave it, it already exists.
    let today = Utc::now().date_naive();
    let centre = CENTRES[Generator::new(1, today).patient(0).centre].0;
    let mut same_centre = app.physician("dr-same", centre).await;
    let err = same_centre
        .submit_case(submission("ERN-LUNG", synthetic(0)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);

    let err = demo(&app, 5).await.unwrap_err();
    assert!(
        matches!(err, SyntheticError::NotSynthetic("a case")),
        "{err}"
    );
    // A synthetic identifier of another format, or another user-assigned issuer, is refused.
    for ids in [
        national(SYNTHETIC_ISSUER, "SYN42"),
        national("XX", &synthetic::identifier(1)),
    ] {
        let err = dr
            .submit_case(submission("ERN-LUNG", ids))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
    }
}

/// Demo derives pseudonyms by the registry's rule (`Pseudonymiser::candidates`): after a key
/// rotation its new patients get the new key version, and a patient the registry knows
/// keeps the pseudonym of the old one.
#[tokio::test]
async fn the_registry_derivation_keeps_known_patients_and_demo_follows_key_rotation() {
    let app = TestApp::spawn().await;
    demo(&app, 4).await.unwrap();
    app.store.rotate_registry_key("ERN-LUNG").await.unwrap();
    demo(&app, 3).await.unwrap();
    let versions: Vec<String> = db::query("SELECT pseudonym FROM cases ORDER BY id")
        .fetch_all(app.store.pool())
        .await
        .unwrap()
        .iter()
        .map(|row| row.get::<String>(0)[5..9].to_owned())
        .collect();
    assert_eq!(
        versions,
        ["V001"; 4]
            .into_iter()
            .chain(["V002"; 3])
            .collect::<Vec<_>>()
    );

    let lung = app
        .store
        .registry_by_code("ERN-LUNG")
        .await
        .unwrap()
        .unwrap();
    let pseudonymiser = Pseudonymiser::new(&master(&app));
    let derive = async |n: u32| {
        let identity = ern_registry::api::convert::patient_identity(&synthetic(n)).unwrap();
        let candidates = pseudonymiser.candidates(lung.key_ref().unwrap(), &identity);
        let known = app
            .store
            .known_pseudonym(lung.id, &candidates.older())
            .await
            .unwrap();
        candidates.choose(known.as_deref()).to_string()
    };
    assert!(derive(0).await.contains("-V001-"), "known: keeps version 1");
    assert!(derive(100).await.contains("-V002-"), "new: active version");
}
