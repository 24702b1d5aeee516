//! The server binary with a log that cannot be written: its standard error is `/dev/full`,
//! where every write fails with ENOSPC, as a log file on a full disk or a pipe whose reader
//! has gone would fail. A failed log write used to panic the thread that logged
//! (`tracing-subscriber` reports it with `eprintln!`): when that was the SQLite writer,
//! every later write was refused until a restart, while health said SERVING (fault
//! audit of 2026-12-07). Now the line is dropped and counted (`ern_registry::logging`).

use ern_registry::auth::Role;
use ern_registry::proto::case_service_client::CaseServiceClient;
use ern_registry::proto::consent_service_client::ConsentServiceClient;
use ern_registry::proto::{ConsentScope as S, ConsentState as St};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_that_cannot_be_written_stops_no_thread() {
    if !std::path::Path::new("/dev/full").exists() {
        eprintln!("skipped: no /dev/full on this machine");
        return;
    }
    let mut app = TestApp::spawn().await;
    app.centre("NL-FULL", "NL", &["ERN-LUNG"]).await;
    let physician = app
        .principal("dr-full", Role::Physician, Some("NL-FULL"), &[])
        .await;
    let officer = app
        .principal("co-full", Role::ConsentOfficer, None, &["ERN-LUNG"])
        .await;
    app.stop_server().await;

    let (mut server, channel) = ServerProcess::start(&app, |command| {
        command
            // Everything logged, so that the writer's thread logs too.
            .env("ERN_LOG", "debug")
            .env("ERN_LOG_FORMAT", "text")
            .stderr(std::fs::File::create("/dev/full").unwrap());
    })
    .await;
    let bearer = |token: &str| Bearer(Some(format!("Bearer {token}").parse().unwrap()));
    let mut cases = CaseServiceClient::with_interceptor(channel.clone(), bearer(&physician));
    let mut consent = ConsentServiceClient::with_interceptor(channel.clone(), bearer(&officer));

    let patient = national("NL", &bsn(6200));
    cases
        .submit_case(submission("ERN-LUNG", patient.clone()))
        .await
        .unwrap();
    consent
        .withdraw_consent(withdrawal(
            "ERN-LUNG",
            by_identifiers(patient.clone()),
            &[S::RegistryInclusion],
        ))
        .await
        .unwrap();
    // An inclusion attested as given before the withdrawal: refused, and the writer's
    // thread logs a warning for the operator (`writer::note_back_dated_refusal`).
    let mut back_dated = submission("ERN-LUNG", patient);
    back_dated.consent = vec![consent_at_far_back()];
    let refused = cases.submit_case(back_dated).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");

    // The writer still writes, and health still follows the database.
    for seed in 6201..6204 {
        cases
            .submit_case(submission("ERN-LUNG", national("NL", &bsn(seed))))
            .await
            .unwrap_or_else(|status| panic!("a write after the warning: {status:?}"));
    }
    let health = HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(health.status(), ServingStatus::Serving);
    assert!(
        server.child.try_wait().unwrap().is_none(),
        "the server exited"
    );
    server.kill();
    app.stop().await;
}

/// REGISTRY_INCLUSION granted on 1 January 1990.
fn consent_at_far_back() -> ern_registry::proto::ScopeConsent {
    consent(S::RegistryInclusion, St::Granted, "1990-01-01T00:00:00Z")
}
