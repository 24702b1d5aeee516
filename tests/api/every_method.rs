//! Deny by default and a complete audit, for every method of the contract, found from the
//! compiled descriptors rather than listed by hand: a method added to a `.proto` without
//! the authentication and audit path of the others (`api::audited!`) fails here.
//!
//! Each method is called over raw HTTP/2 with one empty message (the smallest request
//! there is): without credentials it must be UNAUTHENTICATED and counted in the audit
//! summary of refused calls; with a physician's key it must leave an audit entry naming
//! the physician and the method, whatever its outcome.

use ern_registry::proto::FILE_DESCRIPTOR_SET;
use ern_registry::store::db;
use prost::Message;
use tonic::Code;

use crate::helpers::TestApp;
use crate::wire::{GRPC, call, framed};

/// Every method of the registry's own services: (gRPC path, audit name).
fn methods() -> Vec<(String, String)> {
    let set = prost_types::FileDescriptorSet::decode(FILE_DESCRIPTOR_SET).unwrap();
    let mut out = Vec::new();
    for file in set.file {
        if file.package() != "ern_registry.v1" {
            continue;
        }
        for service in &file.service {
            for method in &service.method {
                out.push((
                    format!("/ern_registry.v1.{}/{}", service.name(), method.name()),
                    format!("{}/{}", service.name(), method.name()),
                ));
            }
        }
    }
    out.sort();
    out
}

#[tokio::test]
async fn every_method_refuses_the_anonymous_and_audits_every_call() {
    let methods = methods();
    assert!(methods.len() >= 15, "{methods:?}");
    // One interval of the refusals' summary for the whole test (its per-address cap counts
    // per interval).
    let mut app = TestApp::spawn_with(ern_registry::config::ServeArgs {
        refusal_summary_secs: 3600,
        ..Default::default()
    })
    .await;
    let token = format!("Bearer {}", app.physician_key("dr-every", "NL-EVERY").await);
    let empty = || vec![framed(0, &[])];

    for (path, _) in &methods {
        let answer = call(app.addr, path, GRPC, &[], empty()).await;
        assert_eq!(answer.code(), Code::Unauthenticated, "{path} without a key");
        let answer = call(app.addr, path, GRPC, &[("authorization", &token)], empty()).await;
        assert_ne!(
            answer.code(),
            Code::Internal,
            "{path} with an empty message"
        );
    }
    // The refusals' summary is written at shutdown at the latest.
    app.stop_server().await;

    let rows: Vec<(String, Option<i64>, String, String, i64)> =
        db::query("SELECT method, principal_id, principal, outcome, items FROM audit_log")
            .fetch_all(app.store.pool())
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
            .collect();
    // The anonymous refusals are summarised per method, at most 8 counts for the address,
    // then one `(other)` count of its own: every call counted once.
    let anonymous = |method: &str, outcome: &str| {
        rows.iter()
            .filter(|(m, id, principal, o, _)| {
                m == method && id.is_none() && principal.starts_with("peer:") && o == outcome
            })
            .map(|r| r.4)
            .sum::<i64>()
    };
    let named = methods
        .iter()
        .filter(|(_, audited_as)| anonymous(audited_as, "UNAUTHENTICATED") == 1)
        .count();
    assert_eq!(named, methods.len().min(8), "{rows:?}");
    assert_eq!(
        named as i64 + anonymous("(other)", "(other)"),
        methods.len() as i64,
        "{rows:?}"
    );
    for (_, audited_as) in &methods {
        assert!(
            rows.iter()
                .any(|(method, id, principal, _, _)| method == audited_as
                    && id.is_some()
                    && principal == "dr-every"),
            "{audited_as}: the physician's call left no entry"
        );
    }
}
