//! Refusals are no oracle, written as the attacker.
//!
//! A physician of any centre of the ERN can submit any person's identifiers. When the
//! submission is refused, what they are told must not depend on what is on file for that
//! person: never registered, refused, withdrawn, expired, or registered in another
//! registry all answer with the same bytes. Likewise a read or an update of a case the
//! caller cannot see says nothing about why, also when it is their own centre's case and
//! its consent lapsed (stored) or was withdrawn (erased). And a consent officer learns who
//! recorded a consent decision (and so which centre treats the patient) only when they are
//! of the recorder's centre.

use ern_registry::auth::Role;
use ern_registry::keys::MasterSecret;
use ern_registry::proto::{self, ConsentScope as S, ConsentState as St};
use ern_registry::pseudonym::{Pseudonymiser, RegistryRef};
use ern_registry::store::db;
use prost::Message;
use tokio_stream::StreamExt;
use tonic::Code;
use tonic_types::StatusExt;

use crate::helpers::*;

const REGISTRY: &str = "ERN-EYE";

/// Everything a client can observe of a refusal: the code, the message, the encoded
/// error details, and the metadata (but `date`, which the transport sets).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Observed {
    code: Code,
    message: String,
    /// Escaped byte for byte (`\xNN`), so equal strings are equal bytes.
    details: String,
    metadata: Vec<(String, String)>,
}

fn observe(status: &tonic::Status) -> Observed {
    let mut metadata: Vec<(String, String)> = status
        .metadata()
        .clone()
        .into_headers()
        .iter()
        .filter(|(name, _)| name.as_str() != "date")
        .map(|(name, value)| {
            (
                name.as_str().to_owned(),
                String::from_utf8_lossy(value.as_bytes()).into_owned(),
            )
        })
        .collect();
    metadata.sort();
    Observed {
        code: status.code(),
        message: status.message().to_owned(),
        details: status.details().escape_ascii().to_string(),
        metadata,
    }
}

/// Asserts that every (state, observation) pair equals the first, naming the odd one.
fn assert_all_alike<T: std::fmt::Debug + PartialEq>(what: &str, seen: &[(&str, T)]) {
    let (first_state, first) = &seen[0];
    for (state, observed) in &seen[1..] {
        assert_eq!(
            observed, first,
            "{what}: a patient who is {state} is told apart from one who is {first_state}"
        );
    }
}

/// The pseudonym the service derives for `seed`'s BSN in `registry` (computed here, from
/// the master key, so that the test knows it for patients the service never saw).
async fn pseudonym_of(app: &TestApp, registry: &str, seed: u32) -> String {
    let master = MasterSecret::load(&app.dir.path().join("master.key")).unwrap();
    let registry = app.store.registry_by_code(registry).await.unwrap().unwrap();
    let identity =
        ern_registry::api::convert::patient_identity(&national("NL", &bsn(seed))).unwrap();
    Pseudonymiser::new(&master)
        .derive(
            RegistryRef {
                seq: registry.id as u16,
                code: &registry.code,
                key_version: registry.active_key_version as u16,
            },
            &identity,
        )
        .as_str()
        .to_owned()
}

/// A submission of `seed`'s patient to ERN-EYE with no consent attested.
fn bare_submission(seed: u32) -> proto::SubmitCaseRequest {
    let mut req = submission(REGISTRY, national("NL", &bsn(seed)));
    req.consent.clear();
    req
}

fn recording(seed: u32, decisions: Vec<proto::ScopeConsent>) -> proto::RecordConsentRequest {
    consent_request(
        REGISTRY,
        by_identifiers(national("NL", &bsn(seed))),
        decisions,
    )
}

/// Inclusion (and research use) granted now, expiring in `secs` seconds.
fn expiring_in(secs: i64) -> Vec<proto::ScopeConsent> {
    let now = chrono::Utc::now();
    let at = |t: chrono::DateTime<chrono::Utc>| prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: 0,
    };
    let mut consent = inclusion_granted();
    for c in &mut consent {
        c.given_at = Some(at(now - chrono::Duration::seconds(1)));
        c.expires_at = Some(at(now + chrono::Duration::seconds(secs)));
    }
    consent
}

#[tokio::test]
async fn a_physician_is_told_the_same_whatever_consent_is_on_file() {
    let app = TestApp::spawn().await;
    let mut attacker = app.physician("dr-probe", "NL-AMC").await;
    let mut other = app.physician("dr-other", "BE-UZL").await;
    let mut officer = app.officer("co-eye", &["ERN-EYE", "ERN-LUNG"]).await;

    // One patient per state of what is on file in ERN-EYE.
    const NEVER: u32 = 9_100;
    const OTHER_SCOPES: u32 = 9_101;
    const REFUSED: u32 = 9_102;
    const WITHDRAWN: u32 = 9_103;
    const WITHDRAWN_UNSTORED: u32 = 9_104;
    const EXPIRED: u32 = 9_105;
    const EXPIRED_STORED: u32 = 9_106;
    const OTHER_REGISTRY: u32 = 9_107;
    const OWN_EXPIRED: u32 = 9_108;
    const INCLUDED_ELSEWHERE: u32 = 9_109;
    const OWN_WITHDRAWN: u32 = 9_110;

    officer
        .record_consent(recording(
            OTHER_SCOPES,
            vec![
                consent(S::ResearchUse, St::Granted, "2024-03-01T10:00:00Z"),
                consent(S::Recontact, St::Granted, "2024-03-01T10:00:00Z"),
            ],
        ))
        .await
        .unwrap();
    officer
        .record_consent(recording(
            REFUSED,
            vec![consent(
                S::RegistryInclusion,
                St::Refused,
                "2024-03-01T10:00:00Z",
            )],
        ))
        .await
        .unwrap();
    // Withdrawn after another centre stored a record (erased), after the attacker's own
    // centre did (erased), and without one.
    other
        .submit_case(submission(REGISTRY, national("NL", &bsn(WITHDRAWN))))
        .await
        .unwrap();
    attacker
        .submit_case(submission(REGISTRY, national("NL", &bsn(OWN_WITHDRAWN))))
        .await
        .unwrap();
    officer
        .record_consent(recording(WITHDRAWN_UNSTORED, inclusion_granted()))
        .await
        .unwrap();
    for seed in [WITHDRAWN, OWN_WITHDRAWN, WITHDRAWN_UNSTORED] {
        officer
            .withdraw_consent(withdrawal(
                REGISTRY,
                by_identifiers(national("NL", &bsn(seed))),
                &[S::RegistryInclusion],
            ))
            .await
            .unwrap();
    }
    // Expired long ago (nothing stored), and expiring in a moment over stored records
    // (another centre's, and the attacker's own), which stay stored.
    let mut expired = consent(S::RegistryInclusion, St::Granted, "2020-01-01T00:00:00Z");
    expired.expires_at = Some(ts("2021-01-01T00:00:00Z"));
    officer
        .record_consent(recording(EXPIRED, vec![expired]))
        .await
        .unwrap();
    let mut req = submission(REGISTRY, national("NL", &bsn(EXPIRED_STORED)));
    req.consent = expiring_in(2);
    other.submit_case(req).await.unwrap();
    let mut req = submission(REGISTRY, national("NL", &bsn(OWN_EXPIRED)));
    req.consent = expiring_in(2);
    attacker.submit_case(req).await.unwrap();
    // Included in another registry of the same ERNs only.
    other
        .submit_case(submission("ERN-LUNG", national("NL", &bsn(OTHER_REGISTRY))))
        .await
        .unwrap();
    // Included, with another centre's case (for the reads: that case must stay unseen).
    other
        .submit_case(submission(
            REGISTRY,
            national("NL", &bsn(INCLUDED_ELSEWHERE)),
        ))
        .await
        .unwrap();
    app.clock.advance(chrono::Duration::seconds(4));
    let cases_before = app.count("cases").await;
    let events_before = app.count("consent_events").await;

    let refused_states = [
        ("never registered", NEVER),
        ("registered for other scopes only", OTHER_SCOPES),
        ("refused", REFUSED),
        ("withdrawn (record erased)", WITHDRAWN),
        ("withdrawn (nothing stored)", WITHDRAWN_UNSTORED),
        ("expired", EXPIRED),
        ("expired (another centre's record stored)", EXPIRED_STORED),
        ("included in another registry only", OTHER_REGISTRY),
        ("expired (own centre's record stored)", OWN_EXPIRED),
    ];

    // SubmitCase: one status, byte for byte.
    let mut unary = Vec::new();
    for (state, seed) in refused_states {
        let err = attacker
            .submit_case(bare_submission(seed))
            .await
            .expect_err(state);
        unary.push((state, observe(&err)));
    }
    // ... and whatever the physician attests: a consent older than the withdrawal on
    // file (it loses), a refusal, an inclusion that has expired.
    let attested = [
        (
            "withdrawn, granted attested from before the withdrawal",
            WITHDRAWN,
            consent(S::RegistryInclusion, St::Granted, "2019-05-01T10:00:00Z"),
        ),
        (
            "refused on file, refused attested",
            REFUSED,
            consent(S::RegistryInclusion, St::Refused, "2024-04-01T10:00:00Z"),
        ),
        (
            "never registered, refused attested",
            NEVER,
            consent(S::RegistryInclusion, St::Refused, "2024-04-01T10:00:00Z"),
        ),
        ("never registered, an expired inclusion attested", NEVER, {
            let mut c = consent(S::RegistryInclusion, St::Granted, "2020-01-01T00:00:00Z");
            c.expires_at = Some(ts("2021-01-01T00:00:00Z"));
            c
        }),
    ];
    for (state, seed, decision) in attested {
        let mut req = bare_submission(seed);
        req.consent = vec![decision];
        let err = attacker.submit_case(req).await.expect_err(state);
        unary.push((state, observe(&err)));
    }
    assert_all_alike("SubmitCase", &unary);
    let refusal = unary[0].1.clone();
    assert_eq!(
        refusal.code,
        Code::FailedPrecondition,
        "{}",
        refusal.message
    );
    let pf = attacker
        .submit_case(bare_submission(NEVER))
        .await
        .unwrap_err()
        .get_error_details()
        .precondition_failure()
        .cloned()
        .expect("a precondition failure");
    assert_eq!(pf.violations.len(), 1);
    assert_eq!(pf.violations[0].r#type, "CONSENT");
    assert_eq!(pf.violations[0].subject, "REGISTRY_INCLUSION");

    // SubmitCases: the same rejection for every item, and the unary call's message.
    let requests: Vec<_> = refused_states
        .iter()
        .map(|(_, seed)| bare_submission(*seed))
        .collect();
    let mut results = attacker
        .submit_cases(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    let mut bulk = Vec::new();
    for (state, _) in refused_states {
        let result = results.next().await.expect(state).unwrap();
        match result.outcome.unwrap() {
            proto::submit_cases_result::Outcome::Rejected(rejection) => {
                bulk.push((state, rejection.encode_to_vec()));
                assert_eq!(rejection.code, refusal.code as i32, "{state}");
                assert_eq!(rejection.message, refusal.message, "{state}");
            }
            proto::submit_cases_result::Outcome::Accepted(_) => panic!("{state}: accepted"),
        }
    }
    assert_all_alike("SubmitCases", &bulk);
    assert_eq!(app.count("cases").await, cases_before, "nothing stored");
    assert_eq!(
        app.count("consent_events").await,
        events_before,
        "nothing recorded"
    );

    // GetCase and UpdateCase of a case the attacker cannot see: one NOT_FOUND each,
    // whether the pseudonym was never used, its patient refused, withdrew (erased, also
    // the attacker's own case), expired (also over the attacker's own stored case), or
    // another centre holds an included case.
    let mut hidden = Vec::new();
    for (state, seed) in refused_states {
        hidden.push((state, pseudonym_of(&app, REGISTRY, seed).await));
    }
    hidden.push((
        "included, another centre's case",
        pseudonym_of(&app, REGISTRY, INCLUDED_ELSEWHERE).await,
    ));
    hidden.push((
        "withdrawn (own centre's record erased)",
        pseudonym_of(&app, REGISTRY, OWN_WITHDRAWN).await,
    ));
    let mut reads = Vec::new();
    for (state, p) in &hidden {
        let err = attacker
            .get_case(get_case(REGISTRY, p))
            .await
            .expect_err(state);
        reads.push((*state, observe(&err)));
    }
    assert_all_alike("GetCase", &reads);
    assert_eq!(reads[0].1.code, Code::NotFound);
    // UpdateCase, with the current version of a stored case (1) and a stale one (2): the
    // attacker's own case whose consent lapsed answers as one that was erased or never
    // existed, so an update does not tell an expiry from a withdrawal either.
    let mut updates = Vec::new();
    for (state, p) in &hidden {
        for expected_version in [1, 2] {
            let err = attacker
                .update_case(proto::UpdateCaseRequest {
                    registry: REGISTRY.into(),
                    pseudonym: p.clone(),
                    expected_version,
                    record: Some(record()),
                    consent: vec![],
                })
                .await
                .expect_err(state);
            updates.push((*state, observe(&err)));
        }
    }
    assert_all_alike("UpdateCase", &updates);
    assert_eq!(updates[0].1.code, Code::NotFound);
    // The audit log records the same outcome for all of them.
    let outcomes: Vec<String> = db::query(
        "SELECT outcome FROM audit_log \
         WHERE principal = 'dr-probe' AND method = 'CaseService/UpdateCase'",
    )
    .fetch_scalars(app.store.pool())
    .await
    .unwrap();
    assert_eq!(outcomes.len(), updates.len());
    assert!(outcomes.iter().all(|o| o == "NOT_FOUND"), "{outcomes:?}");
    assert_eq!(app.count("cases").await, cases_before, "nothing stored");

    // A consent renewed with the update brings the attacker's own lapsed case back: the
    // version check applies again, then the update is stored.
    let p = pseudonym_of(&app, REGISTRY, OWN_EXPIRED).await;
    let renewed = |expected_version| proto::UpdateCaseRequest {
        registry: REGISTRY.into(),
        pseudonym: p.clone(),
        expected_version,
        record: Some(record()),
        consent: expiring_in(3600),
    };
    let err = attacker.update_case(renewed(2)).await.unwrap_err();
    assert_eq!(err.code(), Code::Aborted, "{}", err.message());
    let updated = attacker.update_case(renewed(1)).await.unwrap().into_inner();
    assert_eq!(updated.version, 2);
}

/// A consent officer of `centre`; returns their client.
async fn centre_officer(app: &TestApp, name: &str, centre: &str) -> OfficerClient {
    let token = app
        .principal(name, Role::ConsentOfficer, Some(centre), &[])
        .await;
    let bearer = Bearer(Some(format!("Bearer {token}").parse().unwrap()));
    proto::consent_service_client::ConsentServiceClient::with_interceptor(
        app.channel().await,
        bearer,
    )
}

async fn history_seen_by(
    officer: &mut OfficerClient,
    pseudonym: &str,
) -> proto::GetConsentResponse {
    officer
        .get_consent(proto::GetConsentRequest {
            registry: REGISTRY.into(),
            pseudonym: pseudonym.into(),
            at: None,
        })
        .await
        .unwrap()
        .into_inner()
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

#[tokio::test]
async fn only_the_recorders_centre_sees_who_recorded_a_consent() {
    let app = TestApp::spawn().await;
    // The treating centre: its physician attests with the submission, its officer
    // records a recontact consent, both on forms that carry the hospital's name.
    let mut dr = app.physician("dr-amc-treating", "NL-AMC").await;
    app.centre("BE-UZL", "BE", &["ERN-EYE"]).await;
    let mut co_amc = centre_officer(&app, "co-amc-smit", "NL-AMC").await;
    let mut co_uzl = centre_officer(&app, "co-uzl-peeters", "BE-UZL").await;
    let mut co_ern = app.officer("co-ern-eye", &["ERN-EYE"]).await;

    let mut req = submission(REGISTRY, national("NL", &bsn(9_200)));
    for c in &mut req.consent {
        c.form_version = "AMC-Amsterdam-2024".into();
    }
    let p = dr.submit_case(req).await.unwrap().into_inner().pseudonym;
    let mut recontact = consent(S::Recontact, St::Granted, "2024-04-01T10:00:00Z");
    recontact.form_version = "AMC-Amsterdam-recontact".into();
    co_amc
        .record_consent(proto::RecordConsentRequest {
            registry: REGISTRY.into(),
            patient: by_pseudonym(&p),
            decisions: vec![recontact],
            client_reference: String::new(),
        })
        .await
        .unwrap();
    // An officer of another centre records a decision too: their own is theirs to see.
    let own = co_uzl
        .record_consent(proto::RecordConsentRequest {
            registry: REGISTRY.into(),
            patient: by_pseudonym(&p),
            decisions: vec![consent(S::Recontact, St::Refused, "2024-05-01T10:00:00Z")],
            client_reference: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(own.recorded[0].recorded_by, "co-uzl-peeters");

    let treating_centre = ["dr-amc-treating", "co-amc-smit", "NL-AMC", "AMC-Amsterdam"];

    // Another centre's officer: roles and dates, nothing that names the treating centre
    // or its people, anywhere in the answer.
    let seen = history_seen_by(&mut co_uzl, &p).await;
    assert_eq!(seen.history.len(), 4);
    let sources: Vec<&str> = seen.history.iter().map(|e| e.source.as_str()).collect();
    assert_eq!(
        sources,
        [
            "physician_attestation",
            "physician_attestation",
            "consent_officer",
            "consent_officer"
        ]
    );
    for e in &seen.history[..3] {
        assert_eq!(e.recorded_by, "", "{e:?}");
        assert!(e.recorded_at.is_some() && e.given_at.is_some(), "{e:?}");
    }
    assert_eq!(seen.history[3].recorded_by, "co-uzl-peeters");
    let bytes = seen.encode_to_vec();
    for name in treating_centre {
        assert!(!contains(&bytes, name), "{name} shown to another centre");
    }

    // An officer bound to the ERN, of no centre: sees nobody's but their own.
    let seen = history_seen_by(&mut co_ern, &p).await;
    assert!(seen.history.iter().all(|e| e.recorded_by.is_empty()));
    let bytes = seen.encode_to_vec();
    for name in treating_centre.iter().chain(&["co-uzl-peeters"]) {
        assert!(!contains(&bytes, name), "{name} shown to an ERN officer");
    }

    // The treating centre's own officer sees its centre's recorders and forms, and not
    // the other centre's.
    let seen = history_seen_by(&mut co_amc, &p).await;
    let recorders: Vec<&str> = seen
        .history
        .iter()
        .map(|e| e.recorded_by.as_str())
        .collect();
    assert_eq!(
        recorders,
        ["dr-amc-treating", "dr-amc-treating", "co-amc-smit", ""]
    );
    assert_eq!(seen.history[0].form_version, "AMC-Amsterdam-2024");
    assert_eq!(seen.history[2].form_version, "AMC-Amsterdam-recontact");
    assert!(!contains(&seen.encode_to_vec(), "co-uzl-peeters"));

    // The treating centre's officer withdraws: the receipt names them to their own
    // centre only, like the withdrawal in the history.
    let receipt = co_amc
        .withdraw_consent(withdrawal(
            REGISTRY,
            by_pseudonym(&p),
            &[S::RegistryInclusion],
        ))
        .await
        .unwrap()
        .into_inner()
        .receipt
        .unwrap();
    assert_eq!(receipt.erased_by, "co-amc-smit");
    let lookup = proto::GetErasureReceiptRequest {
        receipt_id: receipt.receipt_id.clone(),
    };
    let elsewhere = co_uzl
        .get_erasure_receipt(lookup.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(elsewhere.erased_by, "");
    assert_eq!(elsewhere.cases_erased, 1);
    let bytes = elsewhere.encode_to_vec();
    for name in treating_centre {
        assert!(!contains(&bytes, name), "{name} shown on a receipt");
    }
    let colleague = centre_officer(&app, "co-amc-jansen", "NL-AMC").await;
    let home = colleague
        .clone()
        .get_erasure_receipt(lookup)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(home, receipt);
    let withdrawal_event = history_seen_by(&mut co_uzl, &p)
        .await
        .history
        .pop()
        .unwrap();
    assert_eq!(withdrawal_event.state, St::Withdrawn as i32);
    assert_eq!(withdrawal_event.source, "consent_officer");
    assert_eq!(withdrawal_event.recorded_by, "");
}

/// The limit "What a physician still learns" names (docs/consent.md): the
/// REGISTRY_INCLUSION decision in force is the one given last, so an attested grant dated
/// before a later refusal, withdrawal or expired grant on file loses to it. A grant dated
/// far back is stored for a person with nothing on file, or with a later grant still in
/// force, and refused for one withdrawn since; dated now, it is stored for that one too.
/// This test holds the behaviour the doc states, so that a change to it is seen.
#[tokio::test]
async fn a_back_dated_attestation_tells_whether_a_later_decision_is_on_file() {
    let app = TestApp::spawn().await;
    let mut physician = app.physician("dr-backdate", "NL-AMC").await;
    let mut other = app.physician("dr-elsewhere", "BE-UZL").await;
    let mut officer = app.officer("co-backdate", &[REGISTRY]).await;
    const NOTHING: u32 = 9_200;
    const WITHDRAWN: u32 = 9_201;
    const GRANTED_LATER: u32 = 9_202;
    other
        .submit_case(submission(REGISTRY, national("NL", &bsn(WITHDRAWN))))
        .await
        .unwrap();
    officer
        .withdraw_consent(withdrawal(
            REGISTRY,
            by_identifiers(national("NL", &bsn(WITHDRAWN))),
            &[S::RegistryInclusion],
        ))
        .await
        .unwrap();
    officer
        .record_consent(recording(GRANTED_LATER, inclusion_granted()))
        .await
        .unwrap();
    let attesting = |seed, given_at: &str| {
        let mut req = bare_submission(seed);
        req.consent = vec![consent(S::RegistryInclusion, St::Granted, given_at)];
        req
    };
    const FAR_BACK: &str = "1990-01-01T00:00:00Z";
    physician
        .submit_case(attesting(NOTHING, FAR_BACK))
        .await
        .unwrap();
    physician
        .submit_case(attesting(GRANTED_LATER, FAR_BACK))
        .await
        .unwrap();
    let refused = physician
        .submit_case(attesting(WITHDRAWN, FAR_BACK))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    // The date is what decides: the same patient, a grant given now.
    let now = ern_registry::clock::Clock::now(&*app.clock).to_rfc3339();
    physician
        .submit_case(attesting(WITHDRAWN, &now))
        .await
        .unwrap();
    app.stop().await;
}

/// A back-dated attestation sent with an update of a lapsed case is refused as NOT_FOUND,
/// like any update without consent, and seen by the operator as a submission's is (log
/// line and `ern_back_dated_attestation_refusals_total`).
#[tokio::test]
async fn a_back_dated_attestation_with_an_update_is_seen_by_the_operator() {
    let app = TestApp::spawn().await;
    let mut dr = app.physician("dr-update-probe", "NL-AMC").await;
    let mut request = submission(REGISTRY, national("NL", &bsn(9_300)));
    let mut lapsing = consent(S::RegistryInclusion, St::Granted, "2024-03-01T10:00:00Z");
    let soon = ern_registry::clock::Clock::now(&*app.clock) + chrono::Duration::days(1);
    lapsing.expires_at = Some(ts(&soon.to_rfc3339()));
    request.consent = vec![lapsing];
    let pseudonym = dr
        .submit_case(request)
        .await
        .unwrap()
        .into_inner()
        .pseudonym;
    // Lapsed.
    app.clock.advance(chrono::Duration::days(2));
    let update = proto::UpdateCaseRequest {
        registry: REGISTRY.into(),
        pseudonym,
        expected_version: 1,
        record: Some(record()),
        consent: vec![consent(
            S::RegistryInclusion,
            St::Granted,
            "2020-01-01T00:00:00Z",
        )],
    };
    let refused = dr.update_case(update).await.unwrap_err();
    assert_eq!(refused.code(), Code::NotFound);
    assert!(
        logs().contains(
            "an update attesting an inclusion dated before a later decision on file was refused"
        ),
        "{}",
        logs()
    );
}
