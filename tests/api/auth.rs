//! Authentication and authorisation: deny by default, per role and per ERN.

use ern_registry::auth::Role;
use ern_registry::proto::{GetCaseRequest, UpdateCaseRequest};
use tonic::Code;

use crate::helpers::*;

#[tokio::test]
async fn calls_without_a_key_are_unauthenticated() {
    let app = TestApp::spawn().await;
    let mut anon = app.client(None).await;
    let err = anon
        .submit_case(submission("ERN-EYE", national("NL", &bsn(1))))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("Bearer"), "{}", err.message());
}

#[tokio::test]
async fn a_wrong_or_malformed_key_is_unauthenticated() {
    let app = TestApp::spawn().await;
    app.centre("NL-AMC", "NL", &["ERN-EYE"]).await;
    let token = app
        .principal("dr-a", Role::Physician, Some("NL-AMC"), &[])
        .await;
    let mut forged = token.clone();
    let last = forged.pop().unwrap();
    forged.push(if last == 'a' { 'b' } else { 'a' });
    for bad in [forged.as_str(), "ern_nonsense", "not-a-key"] {
        let mut c = app.client(Some(bad)).await;
        let err = c
            .submit_case(submission("ERN-EYE", national("NL", &bsn(1))))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{bad}");
    }
    assert_eq!(app.count("cases").await, 0);
}

#[tokio::test]
async fn a_revoked_key_is_refused_on_the_next_call() {
    let app = TestApp::spawn().await;
    app.centre("NL-AMC", "NL", &["ERN-EYE"]).await;
    let token = app
        .principal("dr-a", Role::Physician, Some("NL-AMC"), &[])
        .await;
    let mut dr = app.client(Some(&token)).await;
    dr.submit_case(submission("ERN-EYE", national("NL", &bsn(1))))
        .await
        .unwrap();
    let key_id = &token[4..20];
    assert!(app.store.revoke_api_key(key_id).await.unwrap());
    let err = dr
        .submit_case(submission("ERN-EYE", national("NL", &bsn(2))))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn a_key_revoked_while_a_bulk_stream_is_open_stops_it_at_the_next_item() {
    use ern_registry::proto::submit_cases_result::Outcome;
    let app = TestApp::spawn().await;
    app.centre("NL-AMC", "NL", &["ERN-EYE"]).await;
    let token = app
        .principal("dr-a", Role::Physician, Some("NL-AMC"), &[])
        .await;
    let mut dr = app.client(Some(&token)).await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut results = dr
        .submit_cases(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tx.send(submission("ERN-EYE", national("NL", &bsn(1))))
        .await
        .unwrap();
    let first = results.message().await.unwrap().unwrap();
    assert!(matches!(first.outcome, Some(Outcome::Accepted(_))));
    assert!(app.store.revoke_api_key(&token[4..20]).await.unwrap());
    tx.send(submission("ERN-EYE", national("NL", &bsn(2))))
        .await
        .unwrap();
    let second = results.message().await.unwrap().unwrap();
    match second.outcome {
        Some(Outcome::Rejected(r)) => assert_eq!(r.code, Code::Unauthenticated as i32),
        other => panic!("{other:?}"),
    }
    assert_eq!(app.count("cases").await, 1);
}

#[tokio::test]
async fn other_roles_may_not_submit() {
    let app = TestApp::spawn().await;
    app.centre("NL-AMC", "NL", &["ERN-EYE"]).await;
    for (name, role, centre, erns) in [
        ("res", Role::Researcher, None, &["ERN-EYE"][..]),
        ("officer", Role::ConsentOfficer, Some("NL-AMC"), &[][..]),
        ("root", Role::Admin, None, &[][..]),
    ] {
        let token = app.principal(name, role, centre, erns).await;
        let mut c = app.client(Some(&token)).await;
        let err = c
            .submit_case(submission("ERN-EYE", national("NL", &bsn(1))))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{name}");
        assert!(err.message().contains("physician"), "{}", err.message());
    }
    assert_eq!(app.count("cases").await, 0);
}

#[tokio::test]
async fn a_physician_may_not_submit_to_a_foreign_ern() {
    let app = TestApp::spawn().await;
    let mut dr = app.physician("dr-a", "NL-AMC").await; // ERN-EYE and ERN-LUNG
    let err = dr
        .submit_case(submission("ERN-BOND", national("NL", &bsn(1))))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("ERN-BOND"), "{}", err.message());
    assert_eq!(app.count("cases").await, 0);
}

#[tokio::test]
async fn another_centres_case_can_be_neither_read_nor_updated() {
    let app = TestApp::spawn().await;
    let mut a = app.physician("dr-a", "NL-AMC").await;
    let mut b = app.physician("dr-b", "NL-UMCG").await;
    let p = a
        .submit_case(submission("ERN-EYE", national("NL", &bsn(1))))
        .await
        .unwrap()
        .into_inner()
        .pseudonym;
    let err = b
        .get_case(GetCaseRequest {
            registry: "ERN-EYE".into(),
            pseudonym: p.clone(),
            include_history: true,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = b
        .update_case(UpdateCaseRequest {
            registry: "ERN-EYE".into(),
            pseudonym: p.clone(),
            expected_version: 1,
            record: Some(record()),
            consent: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    // The owner still can.
    a.get_case(GetCaseRequest {
        registry: "ERN-EYE".into(),
        pseudonym: p,
        include_history: false,
    })
    .await
    .unwrap();
}
