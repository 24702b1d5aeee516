//! Consent officers: record, read and withdraw consent; withdrawal erases at once.

use ern_registry::clock::Clock;
use ern_registry::config::ServeArgs;
use ern_registry::proto::{self, ConsentScope as S, ConsentState as St};
use ern_registry::store::db;
use tonic::Code;

use crate::helpers::*;

const INCLUSION: &[S] = &[S::RegistryInclusion];

#[tokio::test]
async fn officer_records_consent_and_reads_history_and_state_in_force() {
    let app = TestApp::spawn().await;
    let mut officer = app.officer("co-eye", &["ERN-EYE"]).await;
    let mut expiring = consent(S::Recontact, St::Granted, "2024-03-01T10:00:00Z");
    expiring.expires_at = Some(ts("2025-03-01T10:00:00Z"));
    let recorded = officer
        .record_consent(proto::RecordConsentRequest {
            registry: "ERN-EYE".into(),
            patient: by_identifiers(national("NL", &bsn(1))),
            decisions: vec![
                consent(S::RegistryInclusion, St::Granted, "2024-03-01T10:00:00Z"),
                consent(S::ResearchUse, St::Refused, "2024-03-01T10:00:00Z"),
                expiring,
            ],
            client_reference: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(recorded.recorded.len(), 3);
    assert!(
        recorded
            .recorded
            .iter()
            .all(|e| e.recorded_by == "co-eye" && e.source == "consent_officer")
    );
    let status = |s: &proto::ConsentStatus, scope: S| {
        s.scopes
            .iter()
            .find(|x| x.scope == scope as i32)
            .copied()
            .unwrap()
    };
    let now = recorded.in_force.unwrap();
    assert!(status(&now, S::RegistryInclusion).active);
    assert_eq!(status(&now, S::ResearchUse).state, St::Refused as i32);
    assert!(
        !status(&now, S::Recontact).active,
        "expired counts as absent"
    );

    // The physician's submission finds the consent on file.
    let mut dr = app.physician("dr-a", "NL-AMC").await;
    let mut req = submission("ERN-EYE", national("NL", &bsn(1)));
    req.consent.clear();
    let submitted = dr.submit_case(req).await.unwrap().into_inner();
    assert_eq!(submitted.pseudonym, recorded.pseudonym);

    // State at a date before anything was given: nothing in force.
    let got = officer
        .get_consent(proto::GetConsentRequest {
            registry: "ERN-EYE".into(),
            pseudonym: recorded.pseudonym.clone(),
            at: Some(ts("2024-01-01T00:00:00Z")),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.history.len(), 3);
    assert!(
        got.history.windows(2).all(|w| w[0].id < w[1].id),
        "oldest first"
    );
    let then = got.in_force.unwrap();
    assert!(
        then.scopes
            .iter()
            .all(|s| s.state == St::Unspecified as i32 && !s.active)
    );
    let mid = officer
        .get_consent(proto::GetConsentRequest {
            registry: "ERN-EYE".into(),
            pseudonym: recorded.pseudonym,
            at: Some(ts("2024-06-01T00:00:00Z")),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        status(mid.in_force.as_ref().unwrap(), S::Recontact).active,
        "not yet expired then"
    );
}

#[tokio::test]
async fn withdrawing_inclusion_erases_every_version_at_once_with_a_receipt() {
    let app = TestApp::spawn().await;
    let mut a = app.physician("dr-a", "NL-AMC").await;
    let mut b = app.physician("dr-b", "BE-UZL").await;
    let p = a
        .submit_case(submission("ERN-EYE", national("NL", &bsn(2))))
        .await
        .unwrap()
        .into_inner()
        .pseudonym;
    a.update_case(proto::UpdateCaseRequest {
        registry: "ERN-EYE".into(),
        pseudonym: p.clone(),
        expected_version: 1,
        record: Some(record()),
        consent: vec![],
    })
    .await
    .unwrap();
    let mut other_centre = submission("ERN-EYE", national("NL", &bsn(2)));
    other_centre.consent.clear();
    b.submit_case(other_centre).await.unwrap();
    // Another patient, and the same patient in another registry, stay.
    a.submit_case(submission("ERN-EYE", national("NL", &bsn(3))))
        .await
        .unwrap();
    a.submit_case(submission("ERN-LUNG", national("NL", &bsn(2))))
        .await
        .unwrap();
    assert_eq!(app.count("cases").await, 4);

    let mut officer = app.officer("co-eye", &["ERN-EYE"]).await;
    let response = officer
        .withdraw_consent(withdrawal("ERN-EYE", by_pseudonym(&p), INCLUSION))
        .await
        .unwrap()
        .into_inner();
    let receipt = response.receipt.expect("a receipt");
    assert_eq!((receipt.cases_erased, receipt.versions_erased), (2, 3));
    assert_eq!(receipt.pseudonym, p);
    assert_eq!(receipt.erased_by, "co-eye");
    assert_eq!(
        receipt.reason,
        proto::WithdrawalReason::PatientRequest as i32
    );

    // Gone, for every centre, at once.
    assert_eq!(
        a.get_case(get_case("ERN-EYE", &p))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    assert_eq!(
        b.get_case(get_case("ERN-EYE", &p))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    assert_eq!(app.count("cases").await, 2);
    let left: i64 = db::query("SELECT COUNT(*) FROM case_versions v JOIN cases c ON c.id = v.case_id WHERE c.pseudonym = $1")
        .bind(&p)
        .fetch_scalar(app.store.pool())
        .await
        .unwrap();
    assert_eq!(left, 0);

    // The receipt can be looked up later; the tombstone holds no clinical data.
    let again = officer
        .get_erasure_receipt(proto::GetErasureReceiptRequest {
            receipt_id: receipt.receipt_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again, receipt);
    let mut lung_officer = app.officer("co-lung", &["ERN-LUNG"]).await;
    let err = lung_officer
        .get_erasure_receipt(proto::GetErasureReceiptRequest {
            receipt_id: receipt.receipt_id,
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::NotFound,
        "another registry's receipt is not shown"
    );

    // A new submission is refused while the withdrawal is in force, even with an old form.
    let err = a
        .submit_case(submission("ERN-EYE", national("NL", &bsn(2))))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    // Re-consent given after the withdrawal lets the patient back in.
    let mut again = submission("ERN-EYE", national("NL", &bsn(2)));
    again.consent = vec![proto::ScopeConsent {
        given_at: Some(prost_types::Timestamp {
            seconds: chrono::Utc::now().timestamp() + 1,
            nanos: 0,
        }),
        ..consent(S::RegistryInclusion, St::Granted, "2024-03-01T10:00:00Z")
    }];
    a.submit_case(again).await.unwrap();
}

#[tokio::test]
async fn withdrawing_research_use_keeps_the_record() {
    let app = TestApp::spawn().await;
    let mut dr = app.physician("dr-a", "NL-AMC").await;
    let p = dr
        .submit_case(submission("ERN-EYE", national("NL", &bsn(4))))
        .await
        .unwrap()
        .into_inner()
        .pseudonym;
    let mut officer = app.officer("co-eye", &["ERN-EYE"]).await;
    let response = officer
        .withdraw_consent(withdrawal(
            "ERN-EYE",
            by_identifiers(national("NL", &bsn(4))),
            &[S::ResearchUse],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.pseudonym, p);
    assert!(response.receipt.is_none());
    let research = response
        .in_force
        .unwrap()
        .scopes
        .into_iter()
        .find(|s| s.scope == S::ResearchUse as i32)
        .unwrap();
    assert_eq!(research.state, St::Withdrawn as i32);
    assert!(!research.active);
    dr.get_case(get_case("ERN-EYE", &p)).await.unwrap();
}

#[tokio::test]
async fn refusing_inclusion_over_a_stored_record_must_go_through_withdrawal() {
    let app = TestApp::spawn().await;
    let mut dr = app.physician("dr-a", "NL-AMC").await;
    dr.submit_case(submission("ERN-EYE", national("NL", &bsn(5))))
        .await
        .unwrap();
    let mut officer = app.officer("co-eye", &["ERN-EYE"]).await;
    let err = officer
        .record_consent(proto::RecordConsentRequest {
            registry: "ERN-EYE".into(),
            patient: by_identifiers(national("NL", &bsn(5))),
            decisions: vec![consent(
                S::RegistryInclusion,
                St::Refused,
                "2025-01-01T00:00:00Z",
            )],
            client_reference: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    assert!(err.message().contains("withdraw"));
    assert_eq!(app.count("consent_events").await, 2, "nothing recorded");
}

#[tokio::test]
async fn refusing_inclusion_after_it_expired_must_go_through_withdrawal_too() {
    let app = TestApp::spawn().await;
    let mut dr = app.physician("dr-a", "NL-AMC").await;
    // Inclusion granted until tomorrow; the record is stored.
    let now = chrono::Utc::now();
    let rfc3339 =
        |t: chrono::DateTime<chrono::Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let mut req = submission("ERN-EYE", national("NL", &bsn(7)));
    for c in &mut req.consent {
        if c.scope == S::RegistryInclusion as i32 {
            c.expires_at = Some(ts(&rfc3339(now + chrono::Duration::days(1))));
        }
    }
    let pseudonym = dr.submit_case(req).await.unwrap().into_inner().pseudonym;
    // Two days on, the inclusion has expired: the record is hidden, not erased.
    app.clock.advance(chrono::Duration::days(2));
    let hidden = dr
        .get_case(get_case("ERN-EYE", &pseudonym))
        .await
        .unwrap_err();
    assert_eq!(hidden.code(), Code::NotFound);
    assert_eq!(app.count("cases").await, 1);
    // A refusal recorded over it would leave the record on file: refused as over a live
    // inclusion, so that the refusal goes through withdrawal and its erasure.
    let mut officer = app.officer("co-eye", &["ERN-EYE"]).await;
    let events = app.count("consent_events").await;
    let err = officer
        .record_consent(proto::RecordConsentRequest {
            registry: "ERN-EYE".into(),
            patient: by_identifiers(national("NL", &bsn(7))),
            decisions: vec![consent(
                S::RegistryInclusion,
                St::Refused,
                &rfc3339(now + chrono::Duration::hours(36)),
            )],
            client_reference: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    assert!(err.message().contains("withdraw"));
    assert_eq!(
        app.count("consent_events").await,
        events,
        "nothing recorded"
    );
    // Other decisions about the patient are still recorded.
    officer
        .record_consent(proto::RecordConsentRequest {
            registry: "ERN-EYE".into(),
            patient: by_identifiers(national("NL", &bsn(7))),
            decisions: vec![consent(
                S::Recontact,
                St::Refused,
                &rfc3339(now + chrono::Duration::hours(36)),
            )],
            client_reference: String::new(),
        })
        .await
        .unwrap();
    officer
        .withdraw_consent(withdrawal(
            "ERN-EYE",
            by_identifiers(national("NL", &bsn(7))),
            INCLUSION,
        ))
        .await
        .unwrap();
    assert_eq!(app.count("cases").await, 0, "erased");
}

#[tokio::test]
async fn officers_are_scoped_to_their_registries_and_role() {
    let app = TestApp::spawn().await;
    let mut officer = app.officer("co-eye", &["ERN-EYE"]).await;
    let err = officer
        .withdraw_consent(withdrawal(
            "ERN-LUNG",
            by_identifiers(national("NL", &bsn(6))),
            INCLUSION,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    // A physician may not use the consent service at all.
    let mut dr = app.physician("dr-a", "NL-AMC").await;
    let p = dr
        .submit_case(submission("ERN-EYE", national("NL", &bsn(6))))
        .await
        .unwrap()
        .into_inner()
        .pseudonym;
    let token = app
        .principal(
            "dr-x",
            ern_registry::auth::Role::Physician,
            Some("NL-AMC"),
            &[],
        )
        .await;
    let bearer = Bearer(Some(format!("Bearer {token}").parse().unwrap()));
    let mut as_physician = proto::consent_service_client::ConsentServiceClient::with_interceptor(
        app.channel().await,
        bearer,
    );
    let err = as_physician
        .withdraw_consent(withdrawal("ERN-EYE", by_pseudonym(&p), INCLUSION))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    // And an officer never gets clinical data: the case service refuses them.
    let token = app
        .principal(
            "co-2",
            ern_registry::auth::Role::ConsentOfficer,
            None,
            &["ERN-EYE"],
        )
        .await;
    let mut officer_on_cases = app.client(Some(&token)).await;
    let err = officer_on_cases
        .get_case(get_case("ERN-EYE", &p))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(app.count("cases").await, 1);
}

#[tokio::test]
async fn bad_requests_list_every_violation() {
    let app = TestApp::spawn().await;
    let mut officer = app.officer("co-eye", &["ERN-EYE"]).await;
    let err = officer
        .withdraw_consent(proto::WithdrawConsentRequest {
            registry: "ERN-EYE".into(),
            patient: by_pseudonym("R009-V001-NOTAPSEUDONYM"),
            scopes: vec![0, S::ResearchUse as i32, S::ResearchUse as i32],
            reason: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        violations(&err),
        ["patient.pseudonym", "scopes[0]", "scopes[2]", "reason"]
    );
    let err = officer
        .record_consent(proto::RecordConsentRequest {
            registry: "ERN-EYE".into(),
            patient: by_identifiers(national("NL", "123456781")),
            decisions: vec![consent(
                S::RegistryInclusion,
                St::Withdrawn,
                "2024-03-01T10:00:00Z",
            )],
            client_reference: "a b".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        violations(&err),
        [
            "patient.identifiers.national.value",
            "decisions[0].state",
            "client_reference"
        ]
    );
}

#[tokio::test]
async fn bulk_consent_is_atomic_per_patient_with_a_result_each() {
    let app = TestApp::spawn().await;
    let mut officer = app.officer("co-eye", &["ERN-EYE"]).await;
    let entries: Vec<_> = (0..40u32)
        .map(|i| proto::RecordConsentRequest {
            registry: "ERN-EYE".into(),
            patient: by_identifiers(national(
                "NL",
                &if i == 13 {
                    "123456781".to_string()
                } else {
                    bsn(1000 + i)
                },
            )),
            decisions: if i == 21 {
                // One good and one bad decision: nothing of this patient is recorded.
                vec![
                    consent(S::RegistryInclusion, St::Granted, "2024-03-01T10:00:00Z"),
                    consent(S::ResearchUse, St::Granted, "2999-01-01T00:00:00Z"),
                ]
            } else {
                inclusion_granted()
            },
            client_reference: format!("row-{i}"),
        })
        .collect();
    let results = officer
        .record_consents(proto::RecordConsentsRequest { entries })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(results.len(), 40);
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r.index as usize, i);
        assert_eq!(r.client_reference, format!("row-{i}"));
        let rejected = matches!(
            r.outcome,
            Some(proto::record_consents_result::Outcome::Rejected(_))
        );
        assert_eq!(rejected, i == 13 || i == 21, "row {i}");
    }
    assert_eq!(app.count("consent_events").await, 38 * 2);
    let err = officer
        .record_consents(proto::RecordConsentsRequest { entries: vec![] })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

/// A write whose answer is over `--max-message-bytes` once its changes are committed is
/// answered OUT_OF_RANGE, saying so (not RESOURCE_EXHAUSTED, which clients retry as
/// "nothing was done"), and its changes are on file.
#[tokio::test]
async fn a_committed_write_whose_answer_is_too_large_says_it_is_committed() {
    let app = TestApp::spawn_with(ern_registry::config::ServeArgs {
        max_message_bytes: 4096,
        ..Default::default()
    })
    .await;
    let mut officer = app.officer("co-eye", &["ERN-EYE"]).await;
    let entries: Vec<_> = (0..40u32)
        .map(|i| proto::RecordConsentRequest {
            registry: "ERN-EYE".into(),
            patient: by_identifiers(national("NL", &bsn(6000 + i))),
            decisions: vec![consent(
                S::RegistryInclusion,
                St::Granted,
                "2024-03-01T10:00:00Z",
            )],
            client_reference: String::new(),
        })
        .collect();
    let status = officer
        .record_consents(proto::RecordConsentsRequest { entries })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(status.message().contains("committed"), "{status:?}");
    assert_eq!(app.count("consent_events").await, 40);
}

/// Withdrawing REGISTRY_INCLUSION withdraws the patient's research and recontact grants
/// with it: a research grant signed before the withdrawal does not come back into force
/// when the patient is later included again on a new inclusion form only.
#[tokio::test]
async fn withdrawing_inclusion_ends_the_other_grants_too() {
    let app = TestApp::spawn().await;
    let mut dr = app.physician("dr-a", "NL-AMC").await;
    let mut request = submission("ERN-EYE", national("NL", &bsn(77)));
    request
        .consent
        .push(consent(S::Recontact, St::Granted, "2024-03-01T10:00:00Z"));
    let pseudonym = dr
        .submit_case(request)
        .await
        .unwrap()
        .into_inner()
        .pseudonym;
    let mut officer = app.officer("co-eye", &["ERN-EYE"]).await;
    let withdrawn = officer
        .withdraw_consent(withdrawal(
            "ERN-EYE",
            by_pseudonym(&pseudonym),
            &[S::RegistryInclusion],
        ))
        .await
        .unwrap()
        .into_inner();
    let state = |status: &proto::ConsentStatus, scope: S| {
        let s = status
            .scopes
            .iter()
            .find(|s| s.scope == scope as i32)
            .unwrap();
        (s.state, s.active)
    };
    let now = withdrawn.in_force.unwrap();
    for scope in [S::RegistryInclusion, S::ResearchUse, S::Recontact] {
        assert_eq!(
            state(&now, scope),
            (St::Withdrawn as i32, false),
            "{scope:?}"
        );
    }
    // Included again on a new form, inclusion only: no research use until it is granted
    // again.
    app.clock.advance(chrono::Duration::seconds(1));
    let mut again = submission("ERN-EYE", national("NL", &bsn(77)));
    again.consent = vec![consent(
        S::RegistryInclusion,
        St::Granted,
        &app.clock.now().to_rfc3339(),
    )];
    assert_eq!(
        dr.submit_case(again).await.unwrap().into_inner().pseudonym,
        pseudonym
    );
    let got = officer
        .get_consent(proto::GetConsentRequest {
            registry: "ERN-EYE".into(),
            pseudonym: pseudonym.clone(),
            at: None,
        })
        .await
        .unwrap()
        .into_inner()
        .in_force
        .unwrap();
    assert!(state(&got, S::RegistryInclusion).1);
    assert_eq!(state(&got, S::ResearchUse), (St::Withdrawn as i32, false));
    let eligible: Vec<(i64, i64)> = app
        .pairs(
            "SELECT CAST(CASE WHEN p.eligible THEN 1 ELSE 0 END AS BIGINT), \
                    CAST(0 AS BIGINT) FROM patients p JOIN patient_keys k ON k.id = p.patient",
        )
        .await;
    assert_eq!(eligible, [(0, 0)], "not counted in research");
}

/// A refusal of inclusion ends a stay in the registry as a withdrawal does: the patient's
/// research grant from before it does not count once they are included again, until a
/// new one is given; a research grant given after a refusal counts.
#[tokio::test]
async fn a_research_grant_from_before_a_refusal_of_inclusion_does_not_count_after_it() {
    let app = TestApp::spawn().await;
    let mut officer = app.officer("co-eye", &["ERN-EYE"]).await;
    let mut dr = app.physician("dr-a", "NL-AMC").await;
    let (declined, refused_first) = (
        declined_then_included(&mut officer, &mut dr, 81, GIVEN).await,
        refused_then_granted(&mut officer, &mut dr, 82).await,
    );
    assert_eq!(
        eligibility(&app).await,
        [(declined.clone(), 0), (refused_first.clone(), 1)]
            .into_iter()
            .collect::<std::collections::BTreeMap<_, _>>()
    );
    // A new research grant, given after the refusal, counts.
    officer
        .record_consent(proto::RecordConsentRequest {
            registry: "ERN-EYE".into(),
            patient: by_pseudonym(&declined),
            decisions: vec![consent(S::ResearchUse, St::Granted, "2024-06-01T10:00:00Z")],
            client_reference: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(eligibility(&app).await[&declined], 1);
}

/// Migration 0021 recomputes the research eligibility that an earlier version stored for
/// a patient who left the registry, or declined it, after their research grant and was
/// included again: no longer counted, and the change is logged for the research index of
/// any running instance. Other patients keep theirs.
#[tokio::test]
async fn migration_0021_ends_the_eligibility_stored_for_a_research_grant_from_before_leaving() {
    let mut app = TestApp::spawn().await;
    let mut officer = app.officer("co-eye", &["ERN-EYE"]).await;
    let mut dr = app.physician("dr-a", "NL-AMC").await;
    let declined = declined_then_included(&mut officer, &mut dr, 83, GIVEN).await;
    let refused_first = refused_then_granted(&mut officer, &mut dr, 84).await;
    // Research granted at the very instant of the refusal: it counts (at or after).
    let same_instant =
        declined_then_included(&mut officer, &mut dr, 86, "2024-04-01T10:00:00Z").await;
    let never_left = dr
        .submit_case(submission("ERN-EYE", national("NL", &bsn(85))))
        .await
        .unwrap()
        .into_inner()
        .pseudonym;
    app.stop_server().await;
    // As an earlier version stored them: every one of them counted, until some instant.
    let pool = app.store.pool();
    let until = app.instant_sql(4_102_444_800_000);
    db::query(&format!(
        "UPDATE patients SET eligible = TRUE, eligible_until = {until}"
    ))
    .execute(pool)
    .await
    .unwrap();
    let seq_before = research_seq(&app).await;
    db::query("DELETE FROM _sqlx_migrations WHERE version = 21")
        .execute(pool)
        .await
        .unwrap();
    app.store.migrate().await.unwrap();
    let expected = [
        (declined.clone(), 0),
        (refused_first, 1),
        (same_instant, 1),
        (never_left, 1),
    ];
    assert_eq!(eligibility(&app).await, expected.into_iter().collect());
    let without_end: Vec<(String, i64)> = app
        .pairs(
            "SELECT k.pseudonym, CAST(0 AS BIGINT) FROM patients p \
             JOIN patient_keys k ON k.id = p.patient WHERE p.eligible_until IS NULL",
        )
        .await;
    assert_eq!(
        without_end,
        [(declined.clone(), 0)],
        "the ended row keeps no end"
    );
    // One change logged, for the declined patient's slot, numbered after every change
    // before.
    assert_eq!(research_seq(&app).await, seq_before + 1);
    let logged: Vec<(i64, String)> = app
        .pairs(&format!(
            "SELECT CAST(l.seq AS BIGINT), k.pseudonym FROM research_log l \
             JOIN patients p ON p.registry_id = l.registry_id AND p.slot = l.slot \
             JOIN patient_keys k ON k.id = p.patient WHERE l.seq > {seq_before}"
        ))
        .await;
    assert_eq!(logged, [(seq_before + 1, declined)]);
}

/// Inclusion at GIVEN, research granted at `research_at`, inclusion refused on 2024-04-01
/// (no record yet, so a refusal may be recorded), then a case submitted with inclusion
/// granted on 2024-05-01 and no research decision: the patient's pseudonym.
async fn declined_then_included(
    officer: &mut OfficerClient,
    dr: &mut Client,
    n: u32,
    research_at: &str,
) -> String {
    let decisions = [
        (S::RegistryInclusion, St::Granted, GIVEN),
        (S::ResearchUse, St::Granted, research_at),
        (S::RegistryInclusion, St::Refused, "2024-04-01T10:00:00Z"),
    ];
    decided_then_included(officer, dr, n, &decisions, &[S::RegistryInclusion]).await
}

/// Inclusion refused at GIVEN, then a case submitted with inclusion and research granted
/// on 2024-05-01: the patient's pseudonym.
async fn refused_then_granted(officer: &mut OfficerClient, dr: &mut Client, n: u32) -> String {
    let decisions = [(S::RegistryInclusion, St::Refused, GIVEN)];
    let attested = [S::RegistryInclusion, S::ResearchUse];
    decided_then_included(officer, dr, n, &decisions, &attested).await
}

/// The officer's `decisions` for patient `n`, one call each, then a case submitted
/// attesting `attested` granted on 2024-05-01: the patient's pseudonym.
async fn decided_then_included(
    officer: &mut OfficerClient,
    dr: &mut Client,
    n: u32,
    decisions: &[(S, St, &str)],
    attested: &[S],
) -> String {
    let patient = national("NL", &bsn(n));
    for &(scope, state, at) in decisions {
        officer
            .record_consent(proto::RecordConsentRequest {
                registry: "ERN-EYE".into(),
                patient: by_identifiers(patient.clone()),
                decisions: vec![consent(scope, state, at)],
                client_reference: String::new(),
            })
            .await
            .unwrap();
    }
    let mut request = submission("ERN-EYE", patient);
    request.consent = attested
        .iter()
        .map(|&scope| consent(scope, St::Granted, "2024-05-01T10:00:00Z"))
        .collect();
    dr.submit_case(request)
        .await
        .unwrap()
        .into_inner()
        .pseudonym
}

/// The number of the research index's latest change.
async fn research_seq(app: &TestApp) -> i64 {
    let row = db::query("SELECT CAST(seq AS BIGINT) AS seq FROM research_seq")
        .fetch_one(app.store.pool())
        .await
        .unwrap();
    row.try_get::<i64>("seq").unwrap()
}

/// Every research row's eligibility (1 or 0), by the patient's pseudonym.
async fn eligibility(app: &TestApp) -> std::collections::BTreeMap<String, i64> {
    app.pairs(
        "SELECT k.pseudonym, CAST(CASE WHEN p.eligible THEN 1 ELSE 0 END AS BIGINT) \
         FROM patients p JOIN patient_keys k ON k.id = p.patient",
    )
    .await
    .into_iter()
    .collect()
}

/// Entries of one RecordConsents call that name the same patient are recorded in request
/// order, however each names them: here a grant by identifiers (derived first) and then a
/// refusal by pseudonym (nothing to derive or look up, so it would reach the writer first
/// if entries raced), both given at the same instant, where the one recorded last is in
/// force.
#[tokio::test]
async fn bulk_entries_of_one_patient_are_recorded_in_request_order() {
    const PATIENTS: u32 = 100;
    let app = TestApp::spawn().await;
    let mut officer = app.officer("co-eye", &["ERN-EYE"]).await;
    let mut pseudonyms = Vec::new();
    for i in 0..PATIENTS {
        let recorded = officer
            .record_consent(proto::RecordConsentRequest {
                registry: "ERN-EYE".into(),
                patient: by_identifiers(national("NL", &bsn(5000 + i))),
                decisions: vec![consent(
                    S::RegistryInclusion,
                    St::Granted,
                    "2024-03-01T10:00:00Z",
                )],
                client_reference: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        pseudonyms.push(recorded.pseudonym);
    }
    // After a rotation, an entry by identifiers also looks its patient up among the
    // earlier version's pseudonyms (a database read) before it may be recorded: it takes
    // longer to reach the writer than one by pseudonym.
    assert_eq!(app.store.rotate_registry_key("ERN-EYE").await.unwrap(), 2);
    let at = "2024-06-01T10:00:00Z";
    let entries: Vec<_> = (0..PATIENTS)
        .flat_map(|i| {
            [
                proto::RecordConsentRequest {
                    registry: "ERN-EYE".into(),
                    patient: by_identifiers(national("NL", &bsn(5000 + i))),
                    decisions: vec![consent(S::RegistryInclusion, St::Granted, at)],
                    client_reference: format!("grant-{i}"),
                },
                proto::RecordConsentRequest {
                    registry: "ERN-EYE".into(),
                    patient: by_pseudonym(&pseudonyms[i as usize]),
                    decisions: vec![consent(S::RegistryInclusion, St::Refused, at)],
                    client_reference: format!("refuse-{i}"),
                },
            ]
        })
        .collect();
    let results = officer
        .record_consents(proto::RecordConsentsRequest { entries })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert!(results.iter().all(|r| matches!(
        r.outcome,
        Some(proto::record_consents_result::Outcome::Recorded(_))
    )));
    for pseudonym in &pseudonyms {
        let got = officer
            .get_consent(proto::GetConsentRequest {
                registry: "ERN-EYE".into(),
                pseudonym: pseudonym.clone(),
                at: None,
            })
            .await
            .unwrap()
            .into_inner();
        let sources: Vec<i32> = got.history.iter().map(|e| e.state).collect();
        assert_eq!(
            sources,
            [St::Granted as i32, St::Granted as i32, St::Refused as i32],
            "recorded in request order"
        );
        let inclusion = got
            .in_force
            .unwrap()
            .scopes
            .into_iter()
            .find(|s| s.scope == S::RegistryInclusion as i32)
            .unwrap();
        assert_eq!(inclusion.state, St::Refused as i32);
    }
}

/// Where `needle` occurs among the SQLite files (database, WAL, shared memory).
fn sqlite_files_holding(app: &TestApp, needle: &str) -> Vec<String> {
    app.sqlite_files()
        .iter()
        .filter(|file| {
            let bytes = std::fs::read(file).unwrap_or_default();
            bytes.windows(needle.len()).any(|w| w == needle.as_bytes())
        })
        .map(|file| file.display().to_string())
        .collect()
}

/// Markers of the erased patient's two record versions, and of a patient who stays.
const ERASED: [&str; 2] = [
    "NM_999123.4:c.4242_4243delinsGATTACA",
    "NM_999123.4:c.5151_5152delinsCATTAG",
];
const KEPT: &str = "NM_999123.4:c.6161_6162delinsTAGCAT";

/// Stores a patient with two versions of their record (each with an `ERASED` marker) and
/// a patient who stays (`KEPT`); returns the first one's pseudonym.
async fn two_versions_and_a_kept_patient(app: &TestApp) -> String {
    let mut dr = app.physician("dr-a", "NL-AMC").await;
    let with_variant = |patient: u32, variant: &str| {
        let mut req = submission("ERN-EYE", national("NL", &bsn(patient)));
        req.record.as_mut().unwrap().genetic_findings[0].variants = vec![variant.into()];
        req
    };
    let p = dr
        .submit_case(with_variant(7, ERASED[0]))
        .await
        .unwrap()
        .into_inner()
        .pseudonym;
    let mut second = record();
    second.genetic_findings[0].variants = vec![ERASED[1].into()];
    dr.update_case(proto::UpdateCaseRequest {
        registry: "ERN-EYE".into(),
        pseudonym: p.clone(),
        expected_version: 1,
        record: Some(second),
        consent: vec![],
    })
    .await
    .unwrap();
    dr.submit_case(with_variant(8, KEPT)).await.unwrap();
    p
}

/// Withdraws `pseudonym`'s inclusion and waits for the receipt (one case, two versions).
async fn withdraw_until_the_receipt(app: &TestApp, pseudonym: &str) {
    let mut officer = app.officer("co-eye", &["ERN-EYE"]).await;
    let receipt = officer
        .withdraw_consent(withdrawal("ERN-EYE", by_pseudonym(pseudonym), INCLUSION))
        .await
        .unwrap()
        .into_inner()
        .receipt
        .expect("an erasure receipt");
    assert_eq!((receipt.cases_erased, receipt.versions_erased), (1, 2));
}

/// The receipt is the promise: when it arrives, the erased record is in no SQLite file,
/// so a file-level backup taken from then on cannot hold it. Scanned while the server
/// runs, with no shutdown and no checkpoint but the server's own. The kept patient's
/// marker shows that the scan does find what is still stored.
#[tokio::test]
async fn erased_clinical_data_is_in_no_sqlite_file_when_the_receipt_arrives() {
    let app = TestApp::spawn().await;
    if !app.is_sqlite() {
        return; // PostgreSQL: the next test.
    }
    let p = two_versions_and_a_kept_patient(&app).await;
    for marker in ERASED.iter().chain([&KEPT]) {
        assert!(
            !sqlite_files_holding(&app, marker).is_empty(),
            "{marker} stored"
        );
    }
    withdraw_until_the_receipt(&app, &p).await;
    for marker in ERASED {
        assert_eq!(
            sqlite_files_holding(&app, marker),
            Vec::<String>::new(),
            "erased data still on disk when the receipt arrived"
        );
    }
    assert!(!sqlite_files_holding(&app, KEPT).is_empty());
}

/// A process killed between an erasure's commit and its purge leaves the erased bytes in
/// the WAL; the receipt can still be read back. The next start purges the files before
/// its port opens. Here the WAL is left so by a connection that deletes a row and is then
/// leaked (no checkpoint at its close), as a killed server would leave it. When another
/// process's read transaction keeps that checkpoint from completing, the server starts
/// all the same and, idle, purges once the reader is gone.
#[tokio::test]
async fn a_start_purges_what_a_killed_process_left_in_the_wal() {
    for reader_at_start in [false, true] {
        let canary = format!("left-in-the-wal-by-a-killed-process-{reader_at_start}");
        let mut app = TestApp::spawn().await;
        if !app.is_sqlite() {
            return; // PostgreSQL: its purge makes no claim (docs/consent.md).
        }
        app.stop_server().await;
        let path = app
            .database_url
            .trim_start_matches("sqlite://")
            .split('?')
            .next()
            .unwrap()
            .to_owned();
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(&format!(
            "PRAGMA secure_delete = ON; PRAGMA wal_autocheckpoint = 0; \
             CREATE TABLE killed_canary (x TEXT); \
             INSERT INTO killed_canary VALUES ('{canary}'); \
             DELETE FROM killed_canary; DROP TABLE killed_canary;"
        ))
        .unwrap();
        // Killed: no close, so no checkpoint.
        std::mem::forget(conn);
        assert!(
            !sqlite_files_holding(&app, &canary).is_empty(),
            "the WAL holds the deleted row before the start"
        );
        let reader = reader_at_start.then(|| {
            let reader = rusqlite::Connection::open(&path).unwrap();
            reader
                .execute_batch("BEGIN; SELECT COUNT(*) FROM registries;")
                .unwrap();
            reader
        });
        let app = app.restarted_with(ServeArgs::default()).await;
        let Some(reader) = reader else {
            assert_eq!(
                sqlite_files_holding(&app, &canary),
                Vec::<String>::new(),
                "still on disk when the port opened"
            );
            continue;
        };
        assert!(
            logs().contains("the checkpoint at start could not complete"),
            "the failed purge is logged"
        );
        reader.execute_batch("COMMIT").unwrap();
        drop(reader);
        // No call: the retry comes from the server on its own.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !sqlite_files_holding(&app, &canary).is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "not purged 30 s after the reader ended"
            );
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }
}

/// The tables a withdrawal erases from (`store::consent`), as `store::purge` vacuums them.
const CLINICAL_TABLES: [&str; 5] = [
    "patients",
    "case_genes",
    "case_phenotypes",
    "case_versions",
    "cases",
];

/// The clinical tables' heap tuples, live or dead, that hold `needle` (PostgreSQL, read
/// page by page with `pageinspect`: a dead tuple that no VACUUM pruned is still listed).
async fn postgres_tuples_holding(conn: &mut sqlx::PgConnection, needle: &str) -> Vec<String> {
    use sqlx::Row;
    let mut found = Vec::new();
    for table in CLINICAL_TABLES {
        let pages: i64 = sqlx::query(
            "SELECT (pg_relation_size($1::regclass) / current_setting('block_size')::int)::bigint",
        )
        .bind(table)
        .fetch_one(&mut *conn)
        .await
        .unwrap()
        .get(0);
        for page in 0..pages {
            let rows = sqlx::query(
                "SELECT lp, t_data FROM heap_page_items(get_raw_page($1, $2::int)) \
                 WHERE t_data IS NOT NULL",
            )
            .bind(table)
            .bind(page)
            .fetch_all(&mut *conn)
            .await
            .unwrap();
            for row in rows {
                let data: Vec<u8> = row.get(1);
                if data.windows(needle.len()).any(|w| w == needle.as_bytes()) {
                    found.push(format!("{table} page {page} item {}", row.get::<i16, _>(0)));
                }
            }
        }
    }
    found
}

/// The receipt on PostgreSQL: the erased rows are deleted and the dead tuples pruned by
/// the VACUUM that runs before the answer, so no heap tuple of a clinical table, live or
/// dead, holds the record any more (their bytes may stay in the pages' free space until
/// overwritten: `docs/consent.md`). Without the VACUUM the dead tuples are listed.
#[tokio::test]
async fn erased_clinical_data_is_in_no_postgresql_tuple_when_the_receipt_arrives() {
    use sqlx::Connection;
    let app = TestApp::spawn().await;
    if app.is_sqlite() {
        return; // SQLite: the test above.
    }
    let mut pg = sqlx::PgConnection::connect(&app.database_url)
        .await
        .unwrap();
    db::query("CREATE EXTENSION IF NOT EXISTS pageinspect")
        .execute(&mut pg)
        .await
        .expect("pageinspect (PostgreSQL's contrib) and a superuser for the test");
    let p = two_versions_and_a_kept_patient(&app).await;
    for marker in ERASED.iter().chain([&KEPT]) {
        assert!(
            !postgres_tuples_holding(&mut pg, marker).await.is_empty(),
            "{marker} stored"
        );
    }
    withdraw_until_the_receipt(&app, &p).await;
    for marker in ERASED {
        assert_eq!(
            postgres_tuples_holding(&mut pg, marker).await,
            Vec::<String>::new(),
            "an erased record's tuple is left when the receipt arrived"
        );
    }
    assert!(!postgres_tuples_holding(&mut pg, KEPT).await.is_empty());
}
