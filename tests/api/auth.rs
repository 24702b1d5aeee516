//! Authentication and authorisation: deny by default, per role and per ERN.

use ern_registry::auth::Role;
use ern_registry::proto::{GetCaseRequest, UpdateCaseRequest};
use ern_registry::store::{Backend, db};
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

/// Key rows and registries are held in memory (`service::access`) while the access epoch
/// stands. Changes made past the service, straight in SQL as an operator (or another
/// instance, or the admin CLI) would make them, apply to the next call all the same:
/// the database's triggers raise the epoch.
#[tokio::test]
async fn changes_made_in_sql_past_the_service_apply_to_the_next_call() {
    let app = TestApp::spawn().await;
    app.centre("NL-AMC", "NL", &["ERN-EYE", "ERN-LUNG"]).await;
    let token = app
        .principal("dr-a", Role::Physician, Some("NL-AMC"), &[])
        .await;
    let mut dr = app.client(Some(&token)).await;
    let sql = |statement: &str| {
        let pool = app.store.pool().clone();
        let statement = statement.replace("{an instant}", &app.instant_sql(1));
        async move { db::query(&statement).execute(&pool).await.unwrap() }
    };
    // Held after the first calls.
    for i in 1..=3 {
        dr.submit_case(submission("ERN-EYE", national("NL", &bsn(i))))
            .await
            .unwrap();
    }
    let lookups = app.auth.key_lookups();
    dr.submit_case(submission("ERN-EYE", national("NL", &bsn(4))))
        .await
        .unwrap();
    assert_eq!(app.auth.key_lookups(), lookups, "the key row is held");

    // The centre leaves ERN-EYE: refused in ERN-EYE at once, still admitted to ERN-LUNG.
    sql("DELETE FROM centre_registries WHERE registry_id = (SELECT id FROM registries WHERE code = 'ERN-EYE')").await;
    let err = dr
        .submit_case(submission("ERN-EYE", national("NL", &bsn(5))))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    dr.submit_case(submission("ERN-LUNG", national("NL", &bsn(5))))
        .await
        .unwrap();

    // The principal is disabled by hand: the next call is refused.
    sql("UPDATE principals SET disabled_at = {an instant} WHERE name = 'dr-a'").await;
    let err = dr
        .submit_case(submission("ERN-LUNG", national("NL", &bsn(6))))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    sql("UPDATE principals SET disabled_at = NULL WHERE name = 'dr-a'").await;
    dr.submit_case(submission("ERN-LUNG", national("NL", &bsn(6))))
        .await
        .unwrap();

    // The centre's grants emptied at once (PostgreSQL: TRUNCATE, which fires no DELETE
    // trigger; SQLite has none): the next call is refused.
    let empty = if app.store.backend() == Backend::Postgres {
        "TRUNCATE centre_registries"
    } else {
        "DELETE FROM centre_registries"
    };
    sql(empty).await;
    let err = dr
        .submit_case(submission("ERN-LUNG", national("NL", &bsn(7))))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    // The key is revoked by hand: the next call is refused.
    sql("UPDATE api_keys SET revoked_at = {an instant}").await;
    let err = dr
        .submit_case(submission("ERN-LUNG", national("NL", &bsn(7))))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
}
