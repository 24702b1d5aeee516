//! Pseudonyms over the wire: deduplication within a registry, unlinkability across.

use ern_registry::proto;
use tonic::Code;

use crate::helpers::*;

/// The fixture's person, spelt another way.
fn spelt(given: &str, family: &str, place: &str) -> proto::PatientIdentifiers {
    // Field by field: the message wipes itself on drop, so `..person()` cannot move out.
    let mut p = person();
    p.given_names = given.into();
    p.family_name = family.into();
    p.place_of_birth = place.into();
    demographic(p)
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
        spelt("Zoë Anne", "Van den Broeck-Müller", "Sint-Niklaas"),
    );
    let first = a
        .submit_case(req.clone())
        .await
        .unwrap()
        .into_inner()
        .pseudonym;
    req.patient = Some(spelt("zoe anne", "VAN DEN BROECK MULLER", "sint niklaas"));
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

#[tokio::test]
async fn derivation_is_rate_limited_per_principal_and_counted_in_metrics() {
    // A free port for the metrics exporter (process-wide; no other test installs one).
    let metrics = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let app = TestApp::spawn_with(ern_registry::config::ServeArgs {
        derivations_per_minute: 3,
        metrics_listen: Some(metrics),
        console_listen: Some("127.0.0.1:0".parse().unwrap()),
        ..Default::default()
    })
    .await;
    let mut dr = app.physician("dr-enumerator", "NL-AMC").await;
    let mut other = app.physician("dr-other", "NL-AMC").await;
    let before = scrape(metrics).await.unwrap();
    for seed in 0..3 {
        dr.submit_case(submission("ERN-EYE", national("NL", &bsn(seed))))
            .await
            .unwrap();
    }
    let err = dr
        .submit_case(submission("ERN-EYE", national("NL", &bsn(3))))
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        tonic::Code::ResourceExhausted,
        "{}",
        err.message()
    );
    let retry = tonic_types::StatusExt::get_error_details(&err)
        .retry_info()
        .and_then(|r| r.retry_delay)
        .expect("retry info");
    assert!(retry > std::time::Duration::from_secs(1));
    // Consent calls with identifiers derive too, and count against the same allowance.
    let mut officer = app.officer("co-limit", &["ERN-EYE"]).await;
    officer
        .record_consent(ern_registry::proto::RecordConsentRequest {
            registry: "ERN-EYE".into(),
            patient: by_identifiers(national("NL", &bsn(0))),
            decisions: inclusion_granted(),
            client_reference: String::new(),
        })
        .await
        .unwrap();
    // Another physician has an allowance of their own.
    other
        .submit_case(submission("ERN-EYE", national("NL", &bsn(10))))
        .await
        .unwrap();
    assert_eq!(app.count("cases").await, 4);

    let text = scrape(metrics).await.unwrap();
    assert!(
        text.contains("ern_pseudonym_derivations_total{principal=\"dr-enumerator\"} 3"),
        "{text}"
    );
    assert!(text.contains("ern_rate_limited_total{limit=\"pseudonym_derivations\"}"));
    // The writer's batches: how many commands each took, and how long each took. Between
    // the two scrapes this test's app committed at least its five accepted writes (other
    // tests' writers, in this process, may add theirs).
    let value = |text: &str, line: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(line))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let grew = |line: &str| value(&text, line) - value(&before, line);
    assert!(grew("ern_writer_batch_commands_sum ") >= 5.0, "{text}");
    assert!(grew("ern_writer_batch_commands_count ") >= 1.0, "{text}");
    assert!(grew("ern_writer_batch_seconds_count ") >= 1.0, "{text}");

    // Web console requests, each with its outcome: sign-ins refused and accepted, and a
    // form refused for its missing security token (the claims audit found only pages
    // that ended in a service answer counted). The recorder is the process's: other
    // tests' sign-ins may add to the same counters, so each is compared with its value
    // before, and a refused sign-in is counted in a task of its own, so it is waited for.
    use crate::console::{Web, console_user};
    use ern_registry::clock::Clock;
    use ern_registry::service::console::current_code;
    let counted = |text: &str, action: &str, outcome: &str| -> f64 {
        text.lines()
            .filter(|l| {
                l.starts_with("ern_console_requests_total{")
                    && l.contains(&format!("action=\"Console/{action}\""))
                    && l.contains(&format!("outcome=\"{outcome}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let before = scrape(metrics).await.unwrap();
    let secret = console_user(
        &app,
        "officer-metrics",
        ern_registry::auth::Role::ConsentOfficer,
        None,
        &["ERN-EYE"],
    )
    .await;
    app.clock.freeze_at(app.clock.now());
    let mut web = Web::new(app.console.unwrap());
    let form = web.get("/sign-in").await;
    let wrong = web
        .post(
            "/sign-in",
            &[
                ("csrf", &form.csrf()),
                ("name", "officer-metrics"),
                ("password", "not the password at all"),
                ("code", &current_code(&secret, app.clock.now())),
            ],
        )
        .await;
    assert_eq!(wrong.status, 401, "{}", wrong.body);
    app.clock.advance(chrono::Duration::seconds(31));
    let signed_in = web.sign_in(&app, "officer-metrics", &secret).await;
    assert_eq!(signed_in.status, 303, "{}", signed_in.body);
    let refused = web.post("/officer/patient", &[("kind", "national")]).await;
    assert_eq!(refused.status, 403, "{}", refused.body);
    let grew = |text: &str, action: &str, outcome: &str| {
        counted(text, action, outcome) - counted(&before, action, outcome)
    };
    let mut text = String::new();
    for _ in 0..100 {
        text = scrape(metrics).await.unwrap();
        if grew(&text, "SignIn", "UNAUTHENTICATED") >= 1.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(grew(&text, "SignIn", "UNAUTHENTICATED") >= 1.0, "{text}");
    assert!(grew(&text, "SignIn", "OK") >= 1.0, "{text}");
    assert!(
        grew(&text, "FindPatient", "PERMISSION_DENIED") >= 1.0,
        "{text}"
    );

    // A call whose audit entry cannot be committed fails (UNAVAILABLE), and is counted so,
    // not as the OK its handler made of it (a fault re-check of 2026-12-07). The receipt of
    // a withdrawal, read back while this app's entries of that method fail.
    let receipt = officer
        .withdraw_consent(withdrawal(
            "ERN-EYE",
            by_identifiers(national("NL", &bsn(0))),
            &[ern_registry::proto::ConsentScope::RegistryInclusion],
        ))
        .await
        .unwrap()
        .into_inner()
        .receipt
        .expect("a receipt")
        .receipt_id;
    fail_audit_entries_of(&app, "ConsentService/GetErasureReceipt").await;
    let calls = |text: &str| -> f64 {
        text.lines()
            .filter(|l| {
                l.starts_with("ern_calls_total{")
                    && l.contains("method=\"ConsentService/GetErasureReceipt\"")
                    && l.contains("outcome=\"UNAVAILABLE\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let before = scrape(metrics).await.unwrap();
    let refused = officer
        .get_erasure_receipt(ern_registry::proto::GetErasureReceiptRequest {
            receipt_id: receipt,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    let text = scrape(metrics).await.unwrap();
    assert!(calls(&text) - calls(&before) >= 1.0, "{text}");
}

/// GET /metrics over plain HTTP/1.1.
/// The metrics as of now: a rendering is served again for `exporter::RENDER_EVERY`, so
/// this waits that long first (and a little more).
async fn scrape(addr: std::net::SocketAddr) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tokio::time::sleep(
        ern_registry::exporter::RENDER_EVERY + std::time::Duration::from_millis(100),
    )
    .await;
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await?;
    let mut body = String::new();
    stream.read_to_string(&mut body).await?;
    Ok(body)
}

#[tokio::test]
async fn after_a_key_rotation_new_patients_get_the_new_version_and_known_ones_keep_theirs() {
    let app = TestApp::spawn().await;
    let mut amc = app.physician("dr-amc", "NL-AMC").await;
    let mut umc = app.physician("dr-umc", "NL-UMC").await;
    let before = amc
        .submit_case(submission("ERN-EYE", national("NL", &bsn(1))))
        .await
        .unwrap()
        .into_inner()
        .pseudonym;
    assert!(before.starts_with("R009-V001-"), "{before}");

    assert_eq!(app.store.rotate_registry_key("ERN-EYE").await.unwrap(), 2);

    // A new patient: the new version.
    let new = amc
        .submit_case(submission("ERN-EYE", national("NL", &bsn(2))))
        .await
        .unwrap()
        .into_inner()
        .pseudonym;
    assert!(new.starts_with("R009-V002-"), "{new}");
    // The known patient, from another centre: still linked under the old pseudonym.
    let again = umc
        .submit_case(submission("ERN-EYE", national("NL", &bsn(1))))
        .await
        .unwrap()
        .into_inner()
        .pseudonym;
    assert_eq!(again, before);
    // And a consent officer naming the patient by identifiers reaches the same records.
    let mut officer = app.officer("co-rot", &["ERN-EYE"]).await;
    let receipt = officer
        .withdraw_consent(withdrawal(
            "ERN-EYE",
            by_identifiers(national("NL", &bsn(1))),
            &[proto::ConsentScope::RegistryInclusion],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(receipt.pseudonym, before);
    assert_eq!(receipt.receipt.unwrap().cases_erased, 2);
    // Other registries are untouched by the rotation.
    let lung = amc
        .submit_case(submission("ERN-LUNG", national("NL", &bsn(3))))
        .await
        .unwrap()
        .into_inner()
        .pseudonym;
    assert!(lung.starts_with("R013-V001-"), "{lung}");
}

/// An officer's request for `seed`'s BSN in ERN-EYE with `decisions`.
fn record_request(
    seed: u32,
    decisions: Vec<ern_registry::proto::ScopeConsent>,
) -> ern_registry::proto::RecordConsentRequest {
    ern_registry::proto::RecordConsentRequest {
        registry: "ERN-EYE".into(),
        patient: by_identifiers(national("NL", &bsn(seed))),
        decisions,
        client_reference: String::new(),
    }
}

/// An officer's invalid request names the patient by identifiers but derives nothing: the
/// derivation allowance is spent only by requests that are valid as a whole.
#[tokio::test]
async fn an_invalid_consent_request_spends_no_derivation() {
    let app = TestApp::spawn_with(ern_registry::config::ServeArgs {
        derivations_per_minute: 2,
        ..Default::default()
    })
    .await;
    let mut officer = app.officer("co-invalid", &["ERN-EYE"]).await;
    for seed in 0..5 {
        // No decision, then no scope and no reason: refused before any derivation.
        let no_decision = officer.record_consent(record_request(seed, vec![])).await;
        let no_scope = officer
            .withdraw_consent(ern_registry::proto::WithdrawConsentRequest {
                registry: "ERN-EYE".into(),
                patient: by_identifiers(national("NL", &bsn(seed))),
                ..Default::default()
            })
            .await;
        for err in [no_decision.unwrap_err(), no_scope.unwrap_err()] {
            assert_eq!(
                err.code(),
                tonic::Code::InvalidArgument,
                "{}",
                err.message()
            );
        }
    }
    // The whole allowance is left: two valid requests derive, the third is refused.
    for seed in 0..2 {
        officer
            .record_consent(record_request(seed, inclusion_granted()))
            .await
            .unwrap();
    }
    let err = officer
        .record_consent(record_request(9, inclusion_granted()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted);
    app.stop().await;
}

/// A pseudonym taken before a key rotation (the web console's "Find a patient" shows one
/// for a patient with nothing on file) cannot start that patient after it: ABORTED, with
/// what to do, and nothing is written. Found again by identifiers, the patient starts
/// under the new version. (The writer's side, for calls in flight across the rotation:
/// `write_runs::no_patient_is_started_under_a_key_version_rotated_away`.)
#[tokio::test]
async fn a_pseudonym_of_a_rotated_key_version_starts_no_patient() {
    use ern_registry::keys::MasterSecret;
    use ern_registry::pseudonym::Pseudonymiser;

    let app = TestApp::spawn().await;
    let master = MasterSecret::load(&app.dir.path().join("master.key")).unwrap();
    let eye = app
        .store
        .registry_by_code("ERN-EYE")
        .await
        .unwrap()
        .unwrap();
    let identity = ern_registry::api::convert::patient_identity(&national("NL", &bsn(5))).unwrap();
    let found_before = Pseudonymiser::new(&master)
        .derive(eye.key_ref().unwrap(), &identity)
        .to_string();
    assert!(found_before.starts_with("R009-V001-"), "{found_before}");
    assert_eq!(app.store.rotate_registry_key("ERN-EYE").await.unwrap(), 2);

    let mut officer = app.officer("co-old-pseudonym", &["ERN-EYE"]).await;
    let mut request = record_request(5, inclusion_granted());
    request.patient = by_pseudonym(&found_before);
    let err = officer.record_consent(request).await.unwrap_err();
    assert_eq!(err.code(), Code::Aborted, "{}", err.message());
    assert!(err.message().contains("rotated"), "{}", err.message());
    assert_eq!(app.count("patient_keys").await, 0);
    // One of a version the registry does not have (0, or above the active one): no retry
    // helps, so INVALID_ARGUMENT on the pseudonym, whatever the call, and nothing is
    // written.
    for version in [0, 3] {
        let never = app
            .pseudonym_under("ERN-EYE", &national("NL", &bsn(5)), version)
            .await;
        let mut request = record_request(5, inclusion_granted());
        request.patient = by_pseudonym(&never);
        let withdrawn = officer
            .withdraw_consent(ern_registry::proto::WithdrawConsentRequest {
                registry: "ERN-EYE".into(),
                patient: by_pseudonym(&never),
                scopes: vec![ern_registry::proto::ConsentScope::Recontact as i32],
                reason: ern_registry::proto::WithdrawalReason::PatientRequest as i32,
            })
            .await;
        let bulk = officer
            .record_consents(ern_registry::proto::RecordConsentsRequest {
                entries: vec![request.clone()],
            })
            .await
            .unwrap()
            .into_inner();
        let recorded = officer.record_consent(request).await;
        for err in [recorded.unwrap_err(), withdrawn.unwrap_err()] {
            assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
            assert_eq!(violations(&err), ["patient.pseudonym"], "{}", err.message());
            assert!(!err.message().contains("rotated"), "{}", err.message());
        }
        let Some(ern_registry::proto::record_consents_result::Outcome::Rejected(rejected)) =
            &bulk.results[0].outcome
        else {
            panic!("{bulk:?}");
        };
        assert!(
            format!("{rejected:?}").contains("patient.pseudonym"),
            "{rejected:?}"
        );
    }
    assert_eq!(app.count("patient_keys").await, 0);

    let recorded = officer
        .record_consent(record_request(5, inclusion_granted()))
        .await
        .unwrap()
        .into_inner();
    assert!(
        recorded.pseudonym.starts_with("R009-V002-"),
        "{}",
        recorded.pseudonym
    );
    app.stop().await;
}
