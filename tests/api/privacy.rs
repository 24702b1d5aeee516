//! Identifiers never reach the database, the log, or an error message.

use ern_registry::proto;
use ern_registry::store::db;

use crate::helpers::*;

/// A valid BSN nobody else in the suite uses, and a name that appears nowhere else.
fn canary_bsn() -> String {
    bsn(73_120_461)
}
const CANARY_NAME: &str = "Qwyxlvorthian";

fn canary_demographic() -> proto::PatientIdentifiers {
    // Field by field: the message wipes itself on drop, so `..person()` cannot move out.
    let mut canary = person();
    canary.given_names = "Aurelia".into();
    canary.family_name = CANARY_NAME.into();
    canary.place_of_birth = "Ootmarsum".into();
    canary.country_of_birth = "NL".into();
    demographic(canary)
}

fn contains_canary(haystack: &[u8]) -> bool {
    let bsn = canary_bsn();
    let needles = [
        bsn.as_bytes(),
        CANARY_NAME.as_bytes(),
        CANARY_NAME.to_lowercase().as_bytes().to_vec().leak(),
    ];
    needles
        .iter()
        .any(|n| haystack.windows(n.len()).any(|w| w == *n))
}

#[tokio::test]
async fn canary_identifiers_are_never_stored_logged_or_echoed() {
    let app = TestApp::spawn().await;
    let mut dr = app.physician("dr-a", "NL-AMC").await;
    dr.submit_case(submission("ERN-EYE", national("NL", &canary_bsn())))
        .await
        .unwrap();
    dr.submit_case(submission("ERN-EYE", canary_demographic()))
        .await
        .unwrap();

    // Errors of requests carrying the canary: invalid record, missing consent, duplicate.
    let mut invalid = submission("ERN-LUNG", national("NL", &canary_bsn()));
    invalid.record.as_mut().unwrap().birth_year_month = canary_bsn();
    let mut no_consent = submission("ERN-LUNG", canary_demographic());
    no_consent.consent.clear();
    let mut bad_name = submission("ERN-LUNG", canary_demographic());
    if let Some(proto::patient_identifiers::Kind::Demographic(d)) =
        bad_name.patient.as_mut().and_then(|p| p.kind.as_mut())
    {
        d.date_of_birth = format!("{CANARY_NAME}-01");
    }
    for req in [
        invalid,
        no_consent,
        bad_name,
        submission("ERN-EYE", national("NL", &canary_bsn())),
        submission("ERN-BOND", national("NL", &canary_bsn())),
    ] {
        let err = dr.submit_case(req).await.unwrap_err();
        assert!(
            !contains_canary(err.message().as_bytes()),
            "{:?}",
            err.code()
        );
        assert!(!contains_canary(err.details()), "{:?}", err.code());
        assert!(!contains_canary(format!("{:?}", err.metadata()).as_bytes()));
    }

    let url = app.database_url.clone();
    let sqlite = app.is_sqlite();
    let files = app.sqlite_files();
    // Every table's content, as text (works for both databases).
    let mut dump = Vec::new();
    for table in [
        "registries",
        "centres",
        "principals",
        "api_keys",
        "consent_events",
        "cases",
        "case_versions",
        "case_genes",
    ] {
        let cols = if sqlite {
            "*".to_string()
        } else {
            format!("CAST({table} AS TEXT)")
        };
        let rows = db::query(&format!("SELECT {cols} FROM {table}"))
            .fetch_all(app.store.pool())
            .await
            .unwrap();
        for row in rows {
            for i in 0..row.len() {
                if let Ok(Some(s)) = row.try_get::<Option<String>>(i) {
                    dump.extend_from_slice(s.as_bytes());
                }
            }
        }
    }
    assert!(!dump.is_empty());
    assert!(
        !contains_canary(&dump),
        "an identifier reached the database"
    );
    app.stop().await;
    if sqlite {
        for f in files {
            if let Ok(bytes) = std::fs::read(&f) {
                assert!(
                    !contains_canary(&bytes),
                    "an identifier reached {}",
                    f.display()
                );
            }
        }
    }
    let logs = logs();
    assert!(logs.len() > 100, "the log capture works");
    assert!(
        !contains_canary(logs.as_bytes()),
        "an identifier reached the log"
    );
    let _ = url;
}
