//! Withdrawals racing submissions and reads: no erased record reappears, and no read
//! or submission that starts after a withdrawal's reply sees the patient's record.
//! Plus the consent rules that must refuse, one test each.

use ern_registry::store::db;
use std::time::Instant;

use ern_registry::proto::{self, ConsentScope as S, ConsentState as St};
use tonic::Code;

use crate::helpers::*;

#[tokio::test]
async fn withdrawals_race_submissions_and_reads() {
    let app = TestApp::spawn().await;
    let a = app.physician("dr-a", "NL-AMC").await;
    let b = app.physician("dr-b", "BE-UZL").await;
    let officer = app.officer("co-eye", &["ERN-EYE"]).await;
    const PATIENTS: u32 = 24;
    for round in 0..3u32 {
        let mut pseudonyms = Vec::new();
        for i in 0..PATIENTS {
            let seed = 10_000 + round * 100 + i;
            let mut a = a.clone();
            pseudonyms.push(
                a.submit_case(submission("ERN-EYE", national("NL", &bsn(seed))))
                    .await
                    .unwrap()
                    .into_inner()
                    .pseudonym,
            );
        }
        let mut tasks = Vec::new();
        for (i, p) in pseudonyms.iter().enumerate() {
            let seed = 10_000 + round * 100 + i as u32;
            let (mut officer, mut a, mut b, p) = (officer.clone(), a.clone(), b.clone(), p.clone());
            tasks.push(tokio::spawn(async move {
                let k = u64::from(seed);
                let withdraw = async {
                    tokio::time::sleep(jitter(k, 3000)).await;
                    officer
                        .withdraw_consent(withdrawal(
                            "ERN-EYE",
                            by_pseudonym(&p),
                            &[S::RegistryInclusion],
                        ))
                        .await
                        .unwrap();
                    Instant::now()
                };
                let submit = async {
                    tokio::time::sleep(jitter(k + 1, 3000)).await;
                    let mut req = submission("ERN-EYE", national("NL", &bsn(seed)));
                    req.consent.clear();
                    let started = Instant::now();
                    let result = b.submit_case(req).await;
                    (started, result.map(|_| ()).map_err(|e| e.code()))
                };
                let reads = async {
                    let mut seen = Vec::new();
                    for n in 0..12u64 {
                        tokio::time::sleep(jitter(k + 2 + n, 3000) / 4).await;
                        let started = Instant::now();
                        let r = a.get_case(get_case("ERN-EYE", &p)).await;
                        seen.push((started, r.map(|_| ()).map_err(|e| e.code())));
                    }
                    seen
                };
                let (withdrawn_at, (submit_started, submitted), reads) =
                    tokio::join!(withdraw, submit, reads);
                (p, withdrawn_at, submit_started, submitted, reads)
            }));
        }
        for t in tasks {
            let (p, withdrawn_at, submit_started, submitted, reads) = t.await.unwrap();
            for (started, r) in reads {
                match r {
                    Ok(()) => assert!(
                        started < withdrawn_at,
                        "a read after the withdrawal saw the record"
                    ),
                    Err(code) => assert_eq!(code, Code::NotFound),
                }
            }
            match submitted {
                Ok(()) => assert!(
                    submit_started < withdrawn_at,
                    "a submission after the withdrawal was stored"
                ),
                Err(code) => assert_eq!(code, Code::FailedPrecondition),
            }
            let rows: i64 = db::query("SELECT COUNT(*) FROM cases WHERE pseudonym = $1")
                .bind(&p)
                .fetch_scalar(app.store.pool())
                .await
                .unwrap();
            assert_eq!(rows, 0, "an erased record reappeared");
            let mut a = a.clone();
            assert_eq!(
                a.get_case(get_case("ERN-EYE", &p))
                    .await
                    .unwrap_err()
                    .code(),
                Code::NotFound
            );
        }
    }
    assert_eq!(app.count("case_versions").await, 0);
    assert_eq!(app.count("erasures").await, i64::from(PATIENTS) * 3);
}

#[tokio::test]
async fn consent_of_another_registry_does_not_count() {
    let app = TestApp::spawn().await;
    let mut dr = app.physician("dr-a", "NL-AMC").await;
    dr.submit_case(submission("ERN-EYE", national("NL", &bsn(20))))
        .await
        .unwrap();
    let mut req = submission("ERN-LUNG", national("NL", &bsn(20)));
    req.consent.clear();
    let err = dr.submit_case(req).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(app.count("cases").await, 1);
}

#[tokio::test]
async fn an_attestation_older_than_the_withdrawal_is_refused() {
    let app = TestApp::spawn().await;
    let mut dr = app.physician("dr-a", "NL-AMC").await;
    dr.submit_case(submission("ERN-EYE", national("NL", &bsn(21))))
        .await
        .unwrap();
    let mut officer = app.officer("co-eye", &["ERN-EYE"]).await;
    officer
        .withdraw_consent(withdrawal(
            "ERN-EYE",
            by_identifiers(national("NL", &bsn(21))),
            &[S::RegistryInclusion],
        ))
        .await
        .unwrap();
    // A form signed yesterday (before the withdrawal) does not override it.
    let yesterday = chrono::Utc::now() - chrono::Duration::days(1);
    let mut req = submission("ERN-EYE", national("NL", &bsn(21)));
    req.consent = vec![proto::ScopeConsent {
        given_at: Some(prost_types::Timestamp {
            seconds: yesterday.timestamp(),
            nanos: 0,
        }),
        ..consent(S::RegistryInclusion, St::Granted, "2024-03-01T10:00:00Z")
    }];
    let err = dr.submit_case(req).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    // Refused without saying why: the message does not tell a withdrawal from a refusal
    // or from nothing on file (consent_oracle.rs).
    assert!(!err.message().contains("withdr"), "{}", err.message());
    assert_eq!(app.count("cases").await, 0);
}

#[tokio::test]
async fn an_expired_inclusion_hides_the_record_from_read_back() {
    let app = TestApp::spawn().await;
    let mut dr = app.physician("dr-a", "NL-AMC").await;
    let mut req = submission("ERN-EYE", national("NL", &bsn(22)));
    let soon = chrono::Utc::now() + chrono::Duration::seconds(2);
    req.consent[0].expires_at = Some(prost_types::Timestamp {
        seconds: soon.timestamp() + 1,
        nanos: 0,
    });
    let p = dr.submit_case(req).await.unwrap().into_inner().pseudonym;
    dr.get_case(get_case("ERN-EYE", &p)).await.unwrap();
    app.clock.advance(chrono::Duration::seconds(4));
    let err = dr.get_case(get_case("ERN-EYE", &p)).await.unwrap_err();
    assert_eq!(
        err.code(),
        Code::NotFound,
        "expired consent counts as absent"
    );
}

#[tokio::test]
async fn an_inclusion_is_in_force_until_the_instant_it_expires_and_not_at_it() {
    let app = TestApp::spawn().await;
    let mut dr = app.physician("dr-a", "NL-AMC").await;
    let mut req = submission("ERN-EYE", national("NL", &bsn(23)));
    let expiry = chrono::Utc::now() + chrono::Duration::days(30);
    let expiry = chrono::DateTime::from_timestamp(expiry.timestamp(), 0).unwrap();
    req.consent[0].expires_at = Some(prost_types::Timestamp {
        seconds: expiry.timestamp(),
        nanos: 0,
    });
    let p = dr.submit_case(req).await.unwrap().into_inner().pseudonym;
    app.clock
        .freeze_at(expiry - chrono::Duration::milliseconds(1));
    dr.get_case(get_case("ERN-EYE", &p))
        .await
        .expect("in force a millisecond before it expires");
    for at in [expiry, expiry + chrono::Duration::milliseconds(1)] {
        app.clock.freeze_at(at);
        let err = dr.get_case(get_case("ERN-EYE", &p)).await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "at {at}: expired");
    }
}
