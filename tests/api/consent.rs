//! The consent gate at submission: no active REGISTRY_INCLUSION, nothing stored.

use ern_registry::proto::{self, ConsentScope, ConsentState, GetCaseRequest};
use tonic::Code;
use tonic_types::StatusExt;

use crate::helpers::*;

async fn refused(app: &TestApp, consent: Vec<proto::ScopeConsent>, seed: u32) -> tonic::Status {
    let mut dr = app.physician(&format!("dr-{seed}"), "NL-AMC").await;
    let mut req = submission("ERN-EYE", national("NL", &bsn(seed)));
    req.consent = consent;
    let err = dr.submit_case(req).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    assert_eq!(app.count("cases").await, 0);
    assert_eq!(app.count("case_versions").await, 0);
    assert_eq!(
        app.count("consent_events").await,
        0,
        "a refused submission leaves nothing behind"
    );
    err
}

#[tokio::test]
async fn submission_without_consent_is_refused_and_nothing_is_stored() {
    let app = TestApp::spawn().await;
    let err = refused(&app, vec![], 1).await;
    let pf = err
        .get_error_details()
        .precondition_failure()
        .cloned()
        .unwrap();
    assert_eq!(pf.violations[0].r#type, "CONSENT");
    assert_eq!(pf.violations[0].subject, "REGISTRY_INCLUSION");
}

#[tokio::test]
async fn research_consent_alone_is_not_enough() {
    let app = TestApp::spawn().await;
    refused(
        &app,
        vec![consent(
            ConsentScope::ResearchUse,
            ConsentState::Granted,
            "2024-01-01T00:00:00Z",
        )],
        2,
    )
    .await;
}

#[tokio::test]
async fn refused_inclusion_is_refused() {
    let app = TestApp::spawn().await;
    refused(
        &app,
        vec![consent(
            ConsentScope::RegistryInclusion,
            ConsentState::Refused,
            "2024-01-01T00:00:00Z",
        )],
        3,
    )
    .await;
}

#[tokio::test]
async fn expired_inclusion_is_refused() {
    let app = TestApp::spawn().await;
    let mut c = consent(
        ConsentScope::RegistryInclusion,
        ConsentState::Granted,
        "2020-01-01T00:00:00Z",
    );
    c.expires_at = Some(ts("2021-01-01T00:00:00Z"));
    let err = refused(&app, vec![c], 4).await;
    // Said like every other refusal: the answer never tells the states apart
    // (consent_oracle.rs probes that as an attacker would).
    let nothing = refused(&app, vec![], 8).await;
    assert_eq!(err.message(), nothing.message());
}

#[tokio::test]
async fn consent_on_file_covers_a_second_centre_and_the_patient_is_deduplicated() {
    let app = TestApp::spawn().await;
    let mut a = app.physician("dr-a", "NL-AMC").await;
    let mut b = app.physician("dr-b", "NL-UMCG").await;
    let first = a
        .submit_case(submission("ERN-EYE", national("NL", &bsn(5))))
        .await
        .unwrap()
        .into_inner();
    // Centre B submits the same patient (BSN written differently) without attesting
    // consent again: the consent on file for the patient in this registry counts.
    let spaced = bsn(5);
    let spaced = format!("{}.{}.{}", &spaced[..4], &spaced[4..6], &spaced[6..]);
    let mut req = submission("ERN-EYE", national("nl", &spaced));
    req.consent.clear();
    let second = b.submit_case(req).await.unwrap().into_inner();
    assert_eq!(
        first.pseudonym, second.pseudonym,
        "same patient, same registry, same pseudonym"
    );
    assert_eq!(app.count("cases").await, 2, "one case per centre");
    b.get_case(GetCaseRequest {
        registry: "ERN-EYE".into(),
        pseudonym: second.pseudonym,
        include_history: false,
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn consent_history_is_appended_not_overwritten() {
    let app = TestApp::spawn().await;
    let mut dr = app.physician("dr-a", "NL-AMC").await;
    let p = dr
        .submit_case(submission("ERN-EYE", national("NL", &bsn(6))))
        .await
        .unwrap()
        .into_inner()
        .pseudonym;
    dr.update_case(proto::UpdateCaseRequest {
        registry: "ERN-EYE".into(),
        pseudonym: p,
        expected_version: 1,
        record: Some(record()),
        consent: vec![consent(
            ConsentScope::Recontact,
            ConsentState::Refused,
            "2024-05-01T00:00:00Z",
        )],
    })
    .await
    .unwrap();
    assert_eq!(app.count("consent_events").await, 3);
}

#[tokio::test]
async fn physicians_cannot_attest_a_withdrawal() {
    let app = TestApp::spawn().await;
    let mut dr = app.physician("dr-a", "NL-AMC").await;
    let mut req = submission("ERN-EYE", national("NL", &bsn(7)));
    req.consent = vec![consent(
        ConsentScope::RegistryInclusion,
        ConsentState::Withdrawn,
        "2024-01-01T00:00:00Z",
    )];
    let err = dr.submit_case(req).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(violations(&err), vec!["consent[0].state"]);
}
