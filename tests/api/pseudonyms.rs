//! Pseudonyms over the wire: deduplication within a registry, unlinkability across.

use ern_registry::proto;
use tonic::Code;

use crate::helpers::*;

fn demographic(given: &str, family: &str, place: &str) -> proto::PatientIdentifiers {
    proto::PatientIdentifiers {
        kind: Some(proto::patient_identifiers::Kind::Demographic(
            proto::DemographicIdentifiers {
                given_names: given.into(),
                family_name: family.into(),
                date_of_birth: "2015-06-02".into(),
                sex_at_birth: proto::Sex::Female as i32,
                place_of_birth: place.into(),
                country_of_birth: "BE".into(),
            },
        )),
    }
}

#[tokio::test]
async fn same_patient_two_registries_gives_unlinkable_pseudonyms() {
    let app = TestApp::spawn().await;
    let mut dr = app.physician("dr-a", "NL-AMC").await;
    let eye = dr
        .submit_case(submission("ERN-EYE", national("NL", &bsn(1))))
        .await
        .unwrap()
        .into_inner()
        .pseudonym;
    let lung = dr
        .submit_case(submission("ERN-LUNG", national("NL", &bsn(1))))
        .await
        .unwrap()
        .into_inner()
        .pseudonym;
    assert_ne!(eye, lung);
    assert_ne!(eye[10..], lung[10..], "not even the keyed part is shared");
}

#[tokio::test]
async fn demographic_spelling_variants_give_the_same_pseudonym() {
    let app = TestApp::spawn().await;
    let mut a = app.physician("dr-a", "NL-AMC").await;
    let mut b = app.physician("dr-b", "BE-UZL").await;
    let mut req = submission(
        "ERN-EYE",
        demographic("Zoë Anne", "Van den Broeck-Müller", "Sint-Niklaas"),
    );
    let first = a
        .submit_case(req.clone())
        .await
        .unwrap()
        .into_inner()
        .pseudonym;
    req.patient = Some(demographic(
        "zoe anne",
        "VAN DEN BROECK MULLER",
        "sint niklaas",
    ));
    req.consent.clear();
    let second = b.submit_case(req).await.unwrap().into_inner().pseudonym;
    assert_eq!(first, second);
}

#[tokio::test]
async fn a_bsn_failing_the_eleven_check_is_rejected() {
    let app = TestApp::spawn().await;
    let mut dr = app.physician("dr-a", "NL-AMC").await;
    let good = bsn(42);
    let mut bad = good.clone().into_bytes();
    bad[8] = if bad[8] == b'9' { b'0' } else { bad[8] + 1 };
    let bad = String::from_utf8(bad).unwrap();
    let err = dr
        .submit_case(submission("ERN-EYE", national("NL", &bad)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(violations(&err), vec!["patient.national.value"]);
    // Any other country's identifier is not held to the BSN rule.
    dr.submit_case(submission("ERN-EYE", national("DE", &bad)))
        .await
        .unwrap();
}
