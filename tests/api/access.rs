//! The access matrix: every RPC, every kind of caller, every target, cell by cell.
//!
//! [`MATRIX`] is the one statement of who may do what; the "Access matrix" section of
//! `docs/security.md` is the same table written out by hand, and the two change together.
//! The walk builds one app with its fixtures, calls every RPC as every caller against
//! every target with a request that would really succeed if the caller were allowed, and
//! reports every cell whose outcome differs in one assertion, so a failure names all the
//! wrong cells at once rather than the first.
//!
//! Outcomes are the status codes a client sees: OK, PERMISSION_DENIED, UNAUTHENTICATED,
//! and NOT_FOUND where the design answers "no such thing of yours" rather than "not
//! allowed" (another centre's case; an erasure receipt of a registry the officer does not
//! serve). For the bulk calls (SubmitCases, RecordConsents) the outcome is the call's
//! status if the call fails, else the code of the first (only) item's result.

use std::time::Instant;

use chrono::{Duration, Utc};
use ern_registry::auth::Role;
use ern_registry::proto::{
    self, ConsentScope as S, ConsentState as St, admin_service_client::AdminServiceClient,
    case_service_client::CaseServiceClient, consent_service_client::ConsentServiceClient,
    research_service_client::ResearchServiceClient,
};
use tonic::Code;
use tonic::transport::Channel;

use crate::helpers::*;

/// Every RPC of the public contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rpc {
    SubmitCase,
    SubmitCases,
    GetCase,
    UpdateCase,
    SubmitPhenopacket,
    ExportPhenopackets,
    RecordConsent,
    RecordConsents,
    WithdrawConsent,
    GetConsent,
    GetErasureReceipt,
    CountPatients,
    DiagnosticDelay,
    FindExpertise,
    ListAuditEntries,
}

/// What a call is about. Case and consent calls name a patient (or a receipt) of a
/// centre; submissions and research calls only the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    /// ERN-LUNG: the case, consent and erasure receipt of a patient of NL-LUNG-A.
    LungA,
    /// ERN-LUNG: the same of a patient of BE-LUNG-B (another centre in the same ERN).
    LungB,
    /// ERN-EYE: the same of a patient of NL-EYE.
    Eye,
}

impl Target {
    const ALL: [Target; 3] = [Target::LungA, Target::LungB, Target::Eye];

    fn registry(self) -> &'static str {
        match self {
            Target::LungA | Target::LungB => "ERN-LUNG",
            Target::Eye => "ERN-EYE",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The callers, in the order of the columns of [`MATRIX`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Caller {
    /// Physician of NL-LUNG-A, a centre in ERN-LUNG only.
    PhysicianLungA,
    /// Physician of NL-EYE, a centre in ERN-EYE only.
    PhysicianEye,
    /// Consent officer bound to registry ERN-LUNG (no centre).
    OfficerLung,
    /// Consent officer bound to centre NL-LUNG-A (so to ERN-LUNG through it).
    OfficerLungA,
    /// Researcher, member of ERN-LUNG.
    ResearcherLung,
    /// Researcher, member of ERN-EYE.
    ResearcherEye,
    Admin,
    /// No `authorization` header.
    NoKey,
    /// A token that is not an API key.
    Malformed,
    /// The NL-LUNG-A physician's key id with a wrong secret.
    WrongSecret,
    /// A NL-LUNG-A physician's key, used once (so this process knows it as valid), then
    /// revoked.
    Revoked,
    /// A NL-LUNG-A physician's key that expired an hour ago.
    Expired,
    /// A NL-LUNG-A physician's live key, used once, then the principal disabled.
    Disabled,
}

const CALLERS: [Caller; 13] = [
    Caller::PhysicianLungA,
    Caller::PhysicianEye,
    Caller::OfficerLung,
    Caller::OfficerLungA,
    Caller::ResearcherLung,
    Caller::ResearcherEye,
    Caller::Admin,
    Caller::NoKey,
    Caller::Malformed,
    Caller::WrongSecret,
    Caller::Revoked,
    Caller::Expired,
    Caller::Disabled,
];

const OK: Code = Code::Ok;
const DENY: Code = Code::PermissionDenied;
const UNAU: Code = Code::Unauthenticated;
const NOTF: Code = Code::NotFound;

/// One RPC against one target: the expected outcome per caller, in [`CALLERS`] order.
struct Row(Rpc, Target, [Code; CALLERS.len()]);

/// The access matrix. Keep `docs/security.md` ("Access matrix") in step with it.
#[rustfmt::skip]
const MATRIX: &[Row] = &[
    //                                          dr    dr    co    co    res   res         no    bad   wrong revkd expd  disab
    //                                          LUNGA EYE   LUNG  LUNGA LUNG  EYE   admin key   token secr  key   key   princ
    Row(Rpc::SubmitCase,        Target::LungA, [OK,   DENY, DENY, DENY, DENY, DENY, DENY, UNAU, UNAU, UNAU, UNAU, UNAU, UNAU]),
    Row(Rpc::SubmitCase,        Target::Eye,   [DENY, OK,   DENY, DENY, DENY, DENY, DENY, UNAU, UNAU, UNAU, UNAU, UNAU, UNAU]),
    Row(Rpc::SubmitCases,       Target::LungA, [OK,   DENY, DENY, DENY, DENY, DENY, DENY, UNAU, UNAU, UNAU, UNAU, UNAU, UNAU]),
    Row(Rpc::SubmitCases,       Target::Eye,   [DENY, OK,   DENY, DENY, DENY, DENY, DENY, UNAU, UNAU, UNAU, UNAU, UNAU, UNAU]),
    Row(Rpc::GetCase,           Target::LungA, [OK,   DENY, DENY, DENY, DENY, DENY, DENY, UNAU, UNAU, UNAU, UNAU, UNAU, UNAU]),
    Row(Rpc::GetCase,           Target::LungB, [NOTF, DENY, DENY, DENY, DENY, DENY, DENY, UNAU, UNAU, UNAU, UNAU, UNAU, UNAU]),
    Row(Rpc::GetCase,           Target::Eye,   [DENY, OK,   DENY, DENY, DENY, DENY, DENY, UNAU, UNAU, UNAU, UNAU, UNAU, UNAU]),
    Row(Rpc::UpdateCase,        Target::LungA, [OK,   DENY, DENY, DENY, DENY, DENY, DENY, UNAU, UNAU, UNAU, UNAU, UNAU, UNAU]),
    Row(Rpc::UpdateCase,        Target::LungB, [NOTF, DENY, DENY, DENY, DENY, DENY, DENY, UNAU, UNAU, UNAU, UNAU, UNAU, UNAU]),
    Row(Rpc::UpdateCase,        Target::Eye,   [DENY, OK,   DENY, DENY, DENY, DENY, DENY, UNAU, UNAU, UNAU, UNAU, UNAU, UNAU]),
    Row(Rpc::SubmitPhenopacket, Target::LungA, [OK,   DENY, DENY, DENY, DENY, DENY, DENY, UNAU, UNAU, UNAU, UNAU, UNAU, UNAU]),
    Row(Rpc::SubmitPhenopacket, Target::Eye,   [DENY, OK,   DENY, DENY, DENY, DENY, DENY, UNAU, UNAU, UNAU, UNAU, UNAU, UNAU]),
    Row(Rpc::ExportPhenopackets, Target::LungA, [OK,  DENY, DENY, DENY, DENY, DENY, DENY, UNAU, UNAU, UNAU, UNAU, UNAU, UNAU]),
    Row(Rpc::ExportPhenopackets, Target::Eye,  [DENY, OK,   DENY, DENY, DENY, DENY, DENY, UNAU, UNAU, UNAU, UNAU, UNAU, UNAU]),
    Row(Rpc::RecordConsent,     Target::LungA, [DENY, DENY, OK,   OK,   DENY, DENY, DENY, UNAU, UNAU, UNAU, UNAU, UNAU, UNAU]),
    Row(Rpc::RecordConsent,     Target::LungB, [DENY, DENY, OK,   OK,   DENY, DENY, DENY, UNAU, UNAU, UNAU, UNAU, UNAU, UNAU]),
    Row(Rpc::RecordConsent,     Target::Eye,   [DENY, DENY, DENY, DENY, DENY, DENY, DENY, UNAU, UNAU, UNAU, UNAU, UNAU, UNAU]),
    Row(Rpc::RecordConsents,    Target::LungA, [DENY, DENY, OK,   OK,   DENY, DENY, DENY, UNAU, UNAU, UNAU, UNAU, UNAU, UNAU]),
    Row(Rpc::RecordConsents,    Target::LungB, [DENY, DENY, OK,   OK,   DENY, DENY, DENY, UNAU, UNAU, UNAU, UNAU, UNAU, UNAU]),
    Row(Rpc::RecordConsents,    Target::Eye,   [DENY, DENY, DENY, DENY, DENY, DENY, DENY, UNAU, UNAU, UNAU, UNAU, UNAU, UNAU]),
    Row(Rpc::WithdrawConsent,   Target::LungA, [DENY, DENY, OK,   OK,   DENY, DENY, DENY, UNAU, UNAU, UNAU, UNAU, UNAU, UNAU]),
    Row(Rpc::WithdrawConsent,   Target::LungB, [DENY, DENY, OK,   OK,   DENY, DENY, DENY, UNAU, UNAU, UNAU, UNAU, UNAU, UNAU]),
    Row(Rpc::WithdrawConsent,   Target::Eye,   [DENY, DENY, DENY, DENY, DENY, DENY, DENY, UNAU, UNAU, UNAU, UNAU, UNAU, UNAU]),
    Row(Rpc::GetConsent,        Target::LungA, [DENY, DENY, OK,   OK,   DENY, DENY, DENY, UNAU, UNAU, UNAU, UNAU, UNAU, UNAU]),
    Row(Rpc::GetConsent,        Target::LungB, [DENY, DENY, OK,   OK,   DENY, DENY, DENY, UNAU, UNAU, UNAU, UNAU, UNAU, UNAU]),
    Row(Rpc::GetConsent,        Target::Eye,   [DENY, DENY, DENY, DENY, DENY, DENY, DENY, UNAU, UNAU, UNAU, UNAU, UNAU, UNAU]),
    Row(Rpc::GetErasureReceipt, Target::LungA, [DENY, DENY, OK,   OK,   DENY, DENY, DENY, UNAU, UNAU, UNAU, UNAU, UNAU, UNAU]),
    Row(Rpc::GetErasureReceipt, Target::LungB, [DENY, DENY, OK,   OK,   DENY, DENY, DENY, UNAU, UNAU, UNAU, UNAU, UNAU, UNAU]),
    Row(Rpc::GetErasureReceipt, Target::Eye,   [DENY, DENY, NOTF, NOTF, DENY, DENY, DENY, UNAU, UNAU, UNAU, UNAU, UNAU, UNAU]),
    Row(Rpc::CountPatients,     Target::LungA, [DENY, DENY, DENY, DENY, OK,   DENY, DENY, UNAU, UNAU, UNAU, UNAU, UNAU, UNAU]),
    Row(Rpc::CountPatients,     Target::Eye,   [DENY, DENY, DENY, DENY, DENY, OK,   DENY, UNAU, UNAU, UNAU, UNAU, UNAU, UNAU]),
    Row(Rpc::DiagnosticDelay,   Target::LungA, [DENY, DENY, DENY, DENY, OK,   DENY, DENY, UNAU, UNAU, UNAU, UNAU, UNAU, UNAU]),
    Row(Rpc::DiagnosticDelay,   Target::Eye,   [DENY, DENY, DENY, DENY, DENY, OK,   DENY, UNAU, UNAU, UNAU, UNAU, UNAU, UNAU]),
    Row(Rpc::FindExpertise,     Target::LungA, [OK,   OK,   DENY, DENY, OK,   DENY, DENY, UNAU, UNAU, UNAU, UNAU, UNAU, UNAU]),
    Row(Rpc::FindExpertise,     Target::Eye,   [OK,   OK,   DENY, DENY, DENY, OK,   DENY, UNAU, UNAU, UNAU, UNAU, UNAU, UNAU]),
    Row(Rpc::ListAuditEntries,  Target::LungA, [DENY, DENY, DENY, DENY, DENY, DENY, OK,   UNAU, UNAU, UNAU, UNAU, UNAU, UNAU]),
    Row(Rpc::ListAuditEntries,  Target::Eye,   [DENY, DENY, DENY, DENY, DENY, DENY, OK,   UNAU, UNAU, UNAU, UNAU, UNAU, UNAU]),
];

/// One app with its fixtures and a key (or a stand-in for one) per caller.
struct World {
    app: TestApp,
    channel: Channel,
    tokens: Vec<Option<String>>,
    /// Per target: the patient's pseudonym, an erasure receipt id, the case's version.
    pseudonyms: [String; 3],
    receipts: [String; 3],
    versions: [u32; 3],
    next_seed: u32,
}

const GIVEN: &str = "2024-03-01T10:00:00Z";

fn bearer(token: Option<&str>) -> Bearer {
    Bearer(token.map(|t| format!("Bearer {t}").parse().unwrap()))
}

fn code_of<T>(result: Result<T, tonic::Status>) -> Code {
    match result {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

fn rejection_code(rejection: &proto::Rejection) -> Code {
    Code::from(rejection.code)
}

/// Issues a key for an existing principal, expiring at `expires_at`.
async fn issue_key_for(
    app: &TestApp,
    principal_id: i64,
    expires_at: Option<chrono::DateTime<Utc>>,
) -> String {
    app.issue_key(principal_id, expires_at).await
}

fn key_id(token: &str) -> &str {
    &token[4..20]
}

impl World {
    async fn build() -> World {
        let app = TestApp::spawn().await;
        app.centre("NL-LUNG-A", "NL", &["ERN-LUNG"]).await;
        app.centre("BE-LUNG-B", "BE", &["ERN-LUNG"]).await;
        app.centre("NL-EYE", "NL", &["ERN-EYE"]).await;
        let channel = app.channel().await;

        let dr_lung_a = app
            .principal("dr-lung-a", Role::Physician, Some("NL-LUNG-A"), &[])
            .await;
        let dr_eye = app
            .principal("dr-eye", Role::Physician, Some("NL-EYE"), &[])
            .await;
        let co_lung = app
            .principal("co-lung", Role::ConsentOfficer, None, &["ERN-LUNG"])
            .await;
        let co_lung_a = app
            .principal("co-lung-a", Role::ConsentOfficer, Some("NL-LUNG-A"), &[])
            .await;
        let res_lung = app
            .principal("res-lung", Role::Researcher, None, &["ERN-LUNG"])
            .await;
        let res_eye = app
            .principal("res-eye", Role::Researcher, None, &["ERN-EYE"])
            .await;
        let admin = app.principal("admin", Role::Admin, None, &[]).await;
        // Not callers: they set up the other centre's patient and the erasures.
        let dr_lung_b = app
            .principal("dr-lung-b", Role::Physician, Some("BE-LUNG-B"), &[])
            .await;
        let co_setup = app
            .principal(
                "co-setup",
                Role::ConsentOfficer,
                None,
                &["ERN-LUNG", "ERN-EYE"],
            )
            .await;

        let mut wrong_secret = dr_lung_a.clone();
        let last = wrong_secret.pop().unwrap();
        wrong_secret.push(if last == '0' { '1' } else { '0' });

        // Per target: a patient with a case (and inclusion and research consent) at the
        // target's centre, and a second patient there whose inclusion is withdrawn for a
        // receipt.
        let submitters = [&dr_lung_a, &dr_lung_b, &dr_eye];
        let mut pseudonyms: [String; 3] = Default::default();
        let mut receipts: [String; 3] = Default::default();
        let mut officer =
            ConsentServiceClient::with_interceptor(channel.clone(), bearer(Some(&co_setup)));
        for target in Target::ALL {
            let i = target.index();
            let mut dr =
                CaseServiceClient::with_interceptor(channel.clone(), bearer(Some(submitters[i])));
            pseudonyms[i] = dr
                .submit_case(submission(
                    target.registry(),
                    national("NL", &bsn(1 + i as u32)),
                ))
                .await
                .unwrap()
                .into_inner()
                .pseudonym;
            let erased = dr
                .submit_case(submission(
                    target.registry(),
                    national("NL", &bsn(11 + i as u32)),
                ))
                .await
                .unwrap()
                .into_inner()
                .pseudonym;
            receipts[i] = officer
                .withdraw_consent(withdrawal(
                    target.registry(),
                    by_pseudonym(&erased),
                    &[S::RegistryInclusion],
                ))
                .await
                .unwrap()
                .into_inner()
                .receipt
                .expect("an erasure receipt")
                .receipt_id;
        }

        // Dead keys of a physician who could otherwise do everything the NL-LUNG-A
        // physician can. The revoked and the disabled key succeed once first, so that this
        // process knows them as valid when they are refused.
        let revoked = app
            .principal("dr-revoked", Role::Physician, Some("NL-LUNG-A"), &[])
            .await;
        let disabled = app
            .principal("dr-disabled", Role::Physician, Some("NL-LUNG-A"), &[])
            .await;
        for token in [&revoked, &disabled] {
            let mut dr = CaseServiceClient::with_interceptor(channel.clone(), bearer(Some(token)));
            dr.get_case(get_case("ERN-LUNG", &pseudonyms[0]))
                .await
                .expect("a live key works before it is killed");
        }
        assert!(app.store.revoke_api_key(key_id(&revoked)).await.unwrap());
        assert!(app.store.disable_principal("dr-disabled").await.unwrap());
        assert!(!app.store.disable_principal("dr-disabled").await.unwrap());
        let expired_id = app
            .store
            .create_principal("dr-expired", Role::Physician, Some("NL-LUNG-A"), &[])
            .await
            .unwrap();
        let expired = issue_key_for(&app, expired_id, Some(Utc::now() - Duration::hours(1))).await;

        let tokens = CALLERS
            .iter()
            .map(|caller| match caller {
                Caller::PhysicianLungA => Some(dr_lung_a.clone()),
                Caller::PhysicianEye => Some(dr_eye.clone()),
                Caller::OfficerLung => Some(co_lung.clone()),
                Caller::OfficerLungA => Some(co_lung_a.clone()),
                Caller::ResearcherLung => Some(res_lung.clone()),
                Caller::ResearcherEye => Some(res_eye.clone()),
                Caller::Admin => Some(admin.clone()),
                Caller::NoKey => None,
                Caller::Malformed => Some("not-an-api-key".to_owned()),
                Caller::WrongSecret => Some(wrong_secret.clone()),
                Caller::Revoked => Some(revoked.clone()),
                Caller::Expired => Some(expired.clone()),
                Caller::Disabled => Some(disabled.clone()),
            })
            .collect();
        World {
            app,
            channel,
            tokens,
            pseudonyms,
            receipts,
            versions: [1; 3],
            next_seed: 1000,
        }
    }

    /// A BSN no other call of the walk has used: every allowed submission is a new case.
    fn fresh_bsn(&mut self) -> String {
        self.next_seed += 1;
        bsn(self.next_seed)
    }

    /// Calls `rpc` about `target` as caller number `caller`, with a minimal request that
    /// succeeds for a caller who is allowed; returns the outcome.
    async fn call(&mut self, rpc: Rpc, target: Target, caller: usize) -> Code {
        let auth = bearer(self.tokens[caller].as_deref());
        let ch = self.channel.clone();
        let mut cases = CaseServiceClient::with_interceptor(ch.clone(), auth.clone());
        let mut consents = ConsentServiceClient::with_interceptor(ch.clone(), auth.clone());
        let mut research = ResearchServiceClient::with_interceptor(ch.clone(), auth.clone());
        let mut admin = AdminServiceClient::with_interceptor(ch, auth);
        let i = target.index();
        let registry = target.registry().to_owned();
        let pseudonym = self.pseudonyms[i].clone();
        let recontact = || proto::RecordConsentRequest {
            registry: registry.clone(),
            patient: by_pseudonym(&pseudonym),
            decisions: vec![consent(S::Recontact, St::Granted, GIVEN)],
            client_reference: String::new(),
        };
        match rpc {
            Rpc::SubmitCase => {
                let patient = national("NL", &self.fresh_bsn());
                code_of(cases.submit_case(submission(&registry, patient)).await)
            }
            Rpc::SubmitCases => {
                let patient = national("NL", &self.fresh_bsn());
                let request = tokio_stream::iter([submission(&registry, patient)]);
                let mut results = match cases.submit_cases(request).await {
                    Ok(response) => response.into_inner(),
                    Err(status) => return status.code(),
                };
                match results.message().await {
                    Err(status) => status.code(),
                    Ok(None) => panic!("SubmitCases ended without a result"),
                    Ok(Some(result)) => match result.outcome {
                        Some(proto::submit_cases_result::Outcome::Accepted(_)) => Code::Ok,
                        Some(proto::submit_cases_result::Outcome::Rejected(r)) => {
                            rejection_code(&r)
                        }
                        None => panic!("SubmitCases result without an outcome"),
                    },
                }
            }
            Rpc::GetCase => code_of(cases.get_case(get_case(&registry, &pseudonym)).await),
            Rpc::UpdateCase => {
                let outcome = cases
                    .update_case(proto::UpdateCaseRequest {
                        registry,
                        pseudonym,
                        expected_version: self.versions[i],
                        record: Some(record()),
                        consent: vec![],
                    })
                    .await;
                if let Ok(updated) = &outcome {
                    self.versions[i] = updated.get_ref().version;
                }
                code_of(outcome)
            }
            Rpc::SubmitPhenopacket => {
                let patient = national("NL", &self.fresh_bsn());
                code_of(
                    cases
                        .submit_phenopacket(phenopacket_submission(&registry, patient))
                        .await,
                )
            }
            Rpc::ExportPhenopackets => code_of(
                cases
                    .export_phenopackets(proto::ExportPhenopacketsRequest {
                        registry,
                        page_size: 0,
                        page_token: String::new(),
                    })
                    .await,
            ),
            Rpc::RecordConsent => code_of(consents.record_consent(recontact()).await),
            Rpc::RecordConsents => {
                let request = proto::RecordConsentsRequest {
                    entries: vec![recontact()],
                };
                match consents.record_consents(request).await {
                    Err(status) => status.code(),
                    Ok(response) => match &response.get_ref().results[0].outcome {
                        Some(proto::record_consents_result::Outcome::Recorded(_)) => Code::Ok,
                        Some(proto::record_consents_result::Outcome::Rejected(r)) => {
                            rejection_code(r)
                        }
                        None => panic!("RecordConsents result without an outcome"),
                    },
                }
            }
            // RECONTACT: allowed, and it leaves the case in place for the other cells.
            Rpc::WithdrawConsent => code_of(
                consents
                    .withdraw_consent(withdrawal(
                        &registry,
                        by_pseudonym(&pseudonym),
                        &[S::Recontact],
                    ))
                    .await,
            ),
            Rpc::GetConsent => code_of(
                consents
                    .get_consent(proto::GetConsentRequest {
                        registry,
                        pseudonym,
                        at: None,
                    })
                    .await,
            ),
            Rpc::GetErasureReceipt => code_of(
                consents
                    .get_erasure_receipt(proto::GetErasureReceiptRequest {
                        receipt_id: self.receipts[i].clone(),
                    })
                    .await,
            ),
            Rpc::CountPatients => code_of(
                research
                    .count_patients(proto::CountPatientsRequest {
                        registry,
                        group_by: vec![],
                        filters: vec![],
                    })
                    .await,
            ),
            Rpc::DiagnosticDelay => code_of(
                research
                    .diagnostic_delay(proto::DiagnosticDelayRequest {
                        registry,
                        group_by: vec![],
                        filters: vec![],
                    })
                    .await,
            ),
            Rpc::FindExpertise => code_of(
                research
                    .find_expertise(proto::FindExpertiseRequest {
                        orphacodes: vec!["ORPHA:586".into()],
                        countries: vec![],
                        registries: vec![registry],
                        ..Default::default()
                    })
                    .await,
            ),
            Rpc::ListAuditEntries => code_of(
                admin
                    .list_audit_entries(proto::ListAuditEntriesRequest {
                        registry,
                        ..Default::default()
                    })
                    .await,
            ),
        }
    }
}

#[tokio::test]
async fn every_cell_of_the_access_matrix_has_its_outcome() {
    let started = Instant::now();
    let mut world = World::build().await;
    let mut wrong = Vec::new();
    let mut cells = 0;
    for Row(rpc, target, expected) in MATRIX {
        for (c, caller) in CALLERS.iter().enumerate() {
            let actual = world.call(*rpc, *target, c).await;
            cells += 1;
            if actual != expected[c] {
                wrong.push(format!(
                    "{rpc:?} on {target:?} as {caller:?}: expected {:?}, got {actual:?}",
                    expected[c]
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {cells} cells differ from the access matrix:\n  {}",
        wrong.len(),
        wrong.join("\n  ")
    );
    // The allowed submissions really stored something; nothing refused did.
    let allowed_submissions = MATRIX
        .iter()
        .filter(|Row(rpc, ..)| {
            matches!(
                rpc,
                Rpc::SubmitCase | Rpc::SubmitCases | Rpc::SubmitPhenopacket
            )
        })
        .flat_map(|Row(_, _, expected)| expected.iter())
        .filter(|&&code| code == OK)
        .count() as i64;
    // Fixtures: a kept and an erased case per target.
    assert_eq!(world.app.count("cases").await, 3 + allowed_submissions);
    eprintln!("access matrix: {cells} cells in {:?}", started.elapsed());
}

#[tokio::test]
async fn revoking_a_cached_key_refuses_the_very_next_call() {
    let app = TestApp::spawn().await;
    app.centre("NL-LUNG-A", "NL", &["ERN-LUNG"]).await;
    let token = app
        .principal("dr-a", Role::Physician, Some("NL-LUNG-A"), &[])
        .await;
    let mut dr = app.client(Some(&token)).await;
    let pseudonym = dr
        .submit_case(submission("ERN-LUNG", national("NL", &bsn(1))))
        .await
        .unwrap()
        .into_inner()
        .pseudonym;
    // A key that has worked (and that this process now knows as valid) ...
    dr.get_case(get_case("ERN-LUNG", &pseudonym)).await.unwrap();

    assert!(app.store.revoke_api_key(key_id(&token)).await.unwrap());
    let err = dr
        .get_case(get_case("ERN-LUNG", &pseudonym))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = dr
        .submit_case(submission("ERN-LUNG", national("NL", &bsn(2))))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert_eq!(app.count("cases").await, 1);

    // Revocation is of the key, not the principal: a new key of the same physician works.
    let id = app.store.principal_id("dr-a").await.unwrap();
    let fresh = issue_key_for(&app, id, None).await;
    let mut dr = app.client(Some(&fresh)).await;
    dr.get_case(get_case("ERN-LUNG", &pseudonym)).await.unwrap();
}

#[tokio::test]
async fn a_key_is_refused_once_it_has_expired() {
    let app = TestApp::spawn().await;
    app.centre("NL-LUNG-A", "NL", &["ERN-LUNG"]).await;
    let id = app
        .store
        .create_principal("dr-a", Role::Physician, Some("NL-LUNG-A"), &[])
        .await
        .unwrap();
    let expires_at = Utc::now() + Duration::seconds(2);
    let token = issue_key_for(&app, id, Some(expires_at)).await;
    let mut dr = app.client(Some(&token)).await;
    dr.submit_case(submission("ERN-LUNG", national("NL", &bsn(1))))
        .await
        .expect("the key works until it expires");

    app.clock.advance(Duration::seconds(3));
    let err = dr
        .submit_case(submission("ERN-LUNG", national("NL", &bsn(2))))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert_eq!(app.count("cases").await, 1);
}
