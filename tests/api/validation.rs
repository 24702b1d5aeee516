//! Invalid requests: INVALID_ARGUMENT with every field violation, nothing stored.

use ern_registry::proto;
use tonic::Code;

use crate::helpers::*;

async fn rejected_fields(app: &TestApp, req: proto::SubmitCaseRequest) -> Vec<String> {
    let mut dr = app
        .physician(&format!("dr-{}", rand_suffix()), "NL-AMC")
        .await;
    let err = dr.submit_case(req).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    violations(&err)
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

#[tokio::test]
async fn all_violations_are_reported_at_once() {
    let app = TestApp::spawn().await;
    let mut req = submission("ERN-EYE", national("NL", "123456789"));
    let r = req.record.as_mut().unwrap();
    r.birth_year_month = "2015-13".into();
    r.diagnosis.as_mut().unwrap().orphacode = "ORPHA:0".into();
    r.diagnosis.as_mut().unwrap().icd10 = vec!["E84.0".into(), "84E".into()];
    r.hpo_terms = vec!["HP:123".into()];
    r.genetic_findings[0].variants = vec!["c.1521del".into()];
    r.sex = 0;
    req.consent[0].form_version = String::new();
    req.client_reference = "has spaces".into();
    let fields = rejected_fields(&app, req).await;
    for expected in [
        "patient.national.value",
        "record.birth_year_month",
        "record.diagnosis.orphacode",
        "record.diagnosis.icd10[1]",
        "record.hpo_terms[0]",
        "record.genetic_findings[0].variants[0]",
        "record.sex",
        "consent[0].form_version",
        "client_reference",
    ] {
        assert!(
            fields.iter().any(|f| f == expected),
            "missing {expected} in {fields:?}"
        );
    }
    assert_eq!(app.count("cases").await, 0);
    assert_eq!(app.count("consent_events").await, 0);
}

#[tokio::test]
async fn each_code_format_is_checked() {
    let app = TestApp::spawn().await;
    type Mutation = Box<dyn Fn(&mut proto::CaseRecord)>;
    let cases: Vec<(&str, Mutation)> = vec![
        (
            "record.diagnosis.orphacode",
            Box::new(|r| r.diagnosis.as_mut().unwrap().orphacode = "558".into()),
        ),
        (
            "record.diagnosis.icd10[0]",
            Box::new(|r| r.diagnosis.as_mut().unwrap().icd10 = vec!["E842.00".into()]),
        ),
        (
            "record.diagnosis.icd11[0]",
            Box::new(|r| r.diagnosis.as_mut().unwrap().icd11 = vec!["IO00".into()]),
        ),
        (
            "record.diagnosis.omim[0]",
            Box::new(|r| r.diagnosis.as_mut().unwrap().omim = vec!["OMIM:21970".into()]),
        ),
        (
            "record.hpo_terms[0]",
            Box::new(|r| r.hpo_terms = vec!["HP:00065280".into()]),
        ),
        (
            "record.genetic_findings[0].gene",
            Box::new(|r| r.genetic_findings[0].gene = "cftr".into()),
        ),
        (
            "record.icf_codes[0]",
            Box::new(|r| r.icf_codes = vec!["x440".into()]),
        ),
    ];
    for (i, (field, mutate)) in cases.into_iter().enumerate() {
        let mut req = submission("ERN-EYE", national("NL", &bsn(100 + i as u32)));
        mutate(req.record.as_mut().unwrap());
        let fields = rejected_fields(&app, req).await;
        assert_eq!(fields, vec![field.to_string()]);
    }
}

#[tokio::test]
async fn contradictory_dates_are_rejected() {
    let app = TestApp::spawn().await;
    let mut req = submission("ERN-EYE", national("NL", &bsn(200)));
    req.record.as_mut().unwrap().diagnosis_date = "2014-01-01".into();
    assert_eq!(
        rejected_fields(&app, req).await,
        vec!["record.diagnosis_date"]
    );

    let mut req = submission("ERN-EYE", national("NL", &bsn(201)));
    let r = req.record.as_mut().unwrap();
    r.status = proto::PatientStatus::Deceased as i32;
    r.date_of_death = "2015-07".into();
    assert_eq!(
        rejected_fields(&app, req).await,
        vec!["record.date_of_death"]
    );

    let mut req = submission("ERN-EYE", national("NL", &bsn(202)));
    req.record.as_mut().unwrap().date_of_death = "2020".into();
    assert_eq!(
        rejected_fields(&app, req).await,
        vec!["record.date_of_death"],
        "death date needs DECEASED"
    );

    let mut req = submission("ERN-EYE", national("NL", &bsn(203)));
    req.record.as_mut().unwrap().diagnosis_date = "2999-01-01".into();
    assert_eq!(
        rejected_fields(&app, req).await,
        vec!["record.diagnosis_date"],
        "future date"
    );
}

#[tokio::test]
async fn missing_parts_are_reported() {
    let app = TestApp::spawn().await;
    let req = proto::SubmitCaseRequest {
        registry: "ERN-EYE".into(),
        ..Default::default()
    };
    let fields = rejected_fields(&app, req).await;
    assert!(fields.contains(&"patient".to_string()), "{fields:?}");
    assert!(fields.contains(&"record".to_string()), "{fields:?}");
}

#[tokio::test]
async fn malformed_and_unknown_registries_are_told_apart() {
    let app = TestApp::spawn().await;
    let mut dr = app.physician("dr-a", "NL-AMC").await;
    let err = dr
        .submit_case(submission("ern eye", national("NL", &bsn(300))))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(violations(&err), vec!["registry"]);
    let err = dr
        .submit_case(submission("ERN-NOPE", national("NL", &bsn(300))))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn oversized_messages_are_refused() {
    let app = TestApp::spawn().await;
    let mut dr = app.physician("dr-a", "NL-AMC").await;
    let mut req = submission("ERN-EYE", national("NL", &bsn(400)));
    req.record.as_mut().unwrap().hpo_terms = vec!["HP:0000001".to_string(); 200_000];
    let err = dr.submit_case(req).await.unwrap_err();
    // The code gRPC names for a message over a configured limit, and the limit.
    assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
    assert!(err.message().contains("1048576 bytes"), "{}", err.message());
}
