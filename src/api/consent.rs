//! `ConsentService`: consent officers record, read and withdraw consent.
//!
//! Protobuf in and out; the rules (who may act, who sees a recorder's name, what a
//! withdrawal erases) are in `crate::service::consent`. Identifiers in a `PatientRef` are
//! wiped when it is dropped (`ZeroizeOnDrop`, set in build.rs): [`parse_patient`] takes
//! it and drops it as soon as the identity is parsed; every other exit drops it too. The
//! identity (itself wiped on drop) is derived only once the whole request is valid
//! ([`derive_patient`]): an invalid request spends none of the officer's allowance.

use tonic::{Request, Response, Status};

use super::convert::{timestamp as timestamp_from_proto, timestamp_to_proto};
use super::{SharedState, audited, authorize, rejection};
use crate::auth::{Principal, Role};
use crate::domain::{ClientReference, FieldViolations};
use crate::outcome::Outcome;
use crate::proto::{self, consent_service_server::ConsentService};
use crate::pseudonym::Pseudonym;
use crate::service::consent::{
    self as consent_service, ConsentAccess, ConsentView, EntryTurn, EventView, PatientOrder,
    Receipt, ScopeStatus,
};
use crate::service::{Call, ServiceError, parse_pseudonym};
use crate::store::consent::WithdrawalReason;

/// Most entries of one RecordConsents call.
pub const MAX_BULK_ENTRIES: usize = 1000;

pub struct ConsentApi {
    state: SharedState,
}

impl ConsentApi {
    pub fn new(state: SharedState) -> Self {
        ConsentApi { state }
    }
}

/// The patient a request names, parsed: a pseudonym, or identifiers not yet derived.
enum PatientKey {
    Pseudonym(Pseudonym),
    Identity(crate::pseudonym::PatientIdentity),
}

/// Parses the patient a request names; violations are added to `violations` (and `None`
/// returned). Nothing is derived here: [`derive_patient`] derives, once the whole request
/// is known to be valid, so that an invalid request spends none of the officer's
/// derivation allowance.
fn parse_patient(
    access: &ConsentAccess,
    patient: Option<proto::PatientRef>,
    violations: &mut FieldViolations,
) -> Result<Option<PatientKey>, ServiceError> {
    use proto::patient_ref::Kind;
    let identity = match patient.as_ref().and_then(|p| p.kind.as_ref()) {
        None => {
            violations.push("patient", "identifiers or a pseudonym are required");
            return Ok(None);
        }
        Some(Kind::Pseudonym(text)) => {
            return match parse_pseudonym(text, access.registry()) {
                Ok(p) => Ok(Some(PatientKey::Pseudonym(p))),
                Err(ServiceError::Invalid(v)) => {
                    violations.extend(v.nest("patient"));
                    Ok(None)
                }
                Err(e) => Err(e),
            };
        }
        Some(Kind::Identifiers(ids)) => crate::api::convert::patient_identity(ids),
    };
    // Parsed (and normalised into `identity`, itself wiped on drop): the identifiers of
    // the request are overwritten here.
    drop(patient);
    match identity {
        Ok(identity) => Ok(Some(PatientKey::Identity(identity))),
        Err(v) => {
            violations.extend(v.nest("patient.identifiers"));
            Ok(None)
        }
    }
}

/// The pseudonym of a parsed patient: identifiers are derived (rate limited per principal).
async fn derive_patient(
    state: &SharedState,
    access: &ConsentAccess,
    patient: PatientKey,
) -> Result<Pseudonym, ServiceError> {
    match patient {
        PatientKey::Pseudonym(p) => Ok(p),
        PatientKey::Identity(identity) => consent_service::resolve(state, access, identity).await,
    }
}

fn event_to_proto(e: &EventView) -> proto::ConsentEvent {
    proto::ConsentEvent {
        id: e.id as u64,
        scope: crate::api::convert::scope_to_proto(e.scope),
        state: crate::api::convert::decision_to_proto(e.decision),
        given_at: Some(timestamp_to_proto(e.given_at)),
        form_version: e.form_version.clone(),
        expires_at: e.expires_at.map(timestamp_to_proto),
        recorded_at: Some(timestamp_to_proto(e.recorded_at)),
        recorded_by: e.recorded_by.clone(),
        source: e.source.clone(),
    }
}

fn status_to_proto(
    at: chrono::DateTime<chrono::Utc>,
    scopes: &[ScopeStatus],
) -> proto::ConsentStatus {
    proto::ConsentStatus {
        at: Some(timestamp_to_proto(at)),
        scopes: scopes
            .iter()
            .map(|s| match &s.in_force {
                None => proto::ScopeStatus {
                    scope: crate::api::convert::scope_to_proto(s.scope),
                    ..Default::default()
                },
                Some(e) => proto::ScopeStatus {
                    scope: crate::api::convert::scope_to_proto(s.scope),
                    state: crate::api::convert::decision_to_proto(e.decision),
                    active: e.active,
                    given_at: Some(timestamp_to_proto(e.given_at)),
                    expires_at: e.expires_at.map(timestamp_to_proto),
                },
            })
            .collect(),
    }
}

fn in_force(view: &ConsentView) -> Option<proto::ConsentStatus> {
    Some(status_to_proto(view.at, &view.in_force))
}

fn receipt_to_proto(r: Receipt) -> proto::ErasureReceipt {
    proto::ErasureReceipt {
        receipt_id: r.receipt_id,
        registry: r.registry,
        pseudonym: r.pseudonym,
        erased_at: Some(timestamp_to_proto(r.erased_at)),
        erased_by: r.erased_by,
        reason: reason_to_proto(r.reason),
        cases_erased: r.cases_erased as u32,
        versions_erased: r.versions_erased as u32,
    }
}

/// One RecordConsent, start to finish, for an authenticated officer; `turn`: its place in
/// a RecordConsents call ([`PatientOrder`]), whose entries share one time of the call (so
/// that an entry recorded after another of its patient is never dated before it).
async fn record_one(
    state: &SharedState,
    principal: &Principal,
    mut request: proto::RecordConsentRequest,
    call: &mut Call,
    turn: Option<(&EntryTurn, chrono::DateTime<chrono::Utc>)>,
) -> Result<proto::RecordConsentResponse, ServiceError> {
    let access =
        consent_service::open(state, principal, &request.registry, "registry", call).await?;
    let mut violations = FieldViolations::new();
    let patient = parse_patient(&access, request.patient.take(), &mut violations)?;
    let now = turn.map_or_else(|| consent_service::now_millis(state), |(_, now)| now);
    let decisions = if request.decisions.is_empty() {
        violations.push("decisions", "at least one decision is required");
        Vec::new()
    } else {
        match crate::api::convert::attestation(&request.decisions, now) {
            Ok(d) => d,
            Err(v) => {
                // convert::attestation names its items "consent[i]"; here they are decisions.
                for item in v.iter() {
                    violations.push(
                        item.field.replacen("consent", "decisions", 1),
                        item.description.clone(),
                    );
                }
                Vec::new()
            }
        }
    };
    violations.check(
        "client_reference",
        ClientReference::parse(&request.client_reference),
    );
    let Some(patient) = patient else {
        return Err(ServiceError::Invalid(violations));
    };
    violations.into_result()?;
    let pseudonym = derive_patient(state, &access, patient).await?;
    let turn = turn.map(|(turn, _)| turn);
    let view =
        consent_service::record(state, &access, pseudonym, decisions, now, turn, call).await?;
    Ok(proto::RecordConsentResponse {
        pseudonym: view.pseudonym.as_str().to_owned(),
        recorded: view.events.iter().map(event_to_proto).collect(),
        in_force: in_force(&view),
    })
}

fn reason_from_proto(value: i32) -> Option<WithdrawalReason> {
    match proto::WithdrawalReason::try_from(value).ok()? {
        proto::WithdrawalReason::PatientRequest => Some(WithdrawalReason::PatientRequest),
        proto::WithdrawalReason::RepresentativeRequest => {
            Some(WithdrawalReason::RepresentativeRequest)
        }
        proto::WithdrawalReason::ConsentInvalid => Some(WithdrawalReason::ConsentInvalid),
        proto::WithdrawalReason::Other => Some(WithdrawalReason::Other),
        proto::WithdrawalReason::Unspecified => None,
    }
}

fn reason_to_proto(reason: WithdrawalReason) -> i32 {
    (match reason {
        WithdrawalReason::PatientRequest => proto::WithdrawalReason::PatientRequest,
        WithdrawalReason::RepresentativeRequest => proto::WithdrawalReason::RepresentativeRequest,
        WithdrawalReason::ConsentInvalid => proto::WithdrawalReason::ConsentInvalid,
        WithdrawalReason::Other => proto::WithdrawalReason::Other,
    }) as i32
}

impl ConsentApi {
    async fn record_consent_inner(
        &self,
        request: Request<proto::RecordConsentRequest>,
        call: &mut Call,
    ) -> Result<Response<proto::RecordConsentResponse>, Status> {
        let principal = authorize(&self.state, &request, Role::ConsentOfficer, call).await?;
        Ok(Response::new(
            record_one(&self.state, &principal, request.into_inner(), call, None).await?,
        ))
    }

    async fn record_consents_inner(
        &self,
        request: Request<proto::RecordConsentsRequest>,
        call: &mut Call,
    ) -> Result<Response<proto::RecordConsentsResponse>, Status> {
        let principal = authorize(&self.state, &request, Role::ConsentOfficer, call).await?;
        let entries = request.into_inner().entries;
        if entries.is_empty() || entries.len() > MAX_BULK_ENTRIES {
            let mut v = FieldViolations::new();
            v.push(
                "entries",
                format!("must have 1 to {MAX_BULK_ENTRIES} entries"),
            );
            return Err(ServiceError::Invalid(v).into());
        }
        // Each entry is its own writer command (atomic per entry); entries of different
        // patients run concurrently and are grouped into transactions by the writer, those
        // of one patient one after another, in request order (`PatientOrder`).
        let order = PatientOrder::new(entries.len());
        let now = consent_service::now_millis(&self.state);
        let handles: Vec<_> = entries
            .into_iter()
            .enumerate()
            .map(|(index, entry)| {
                let reference = ClientReference::parse(&entry.client_reference)
                    .map(|r| r.as_str().to_owned())
                    .unwrap_or_default();
                let state = self.state.clone();
                let principal = principal.clone();
                let turn = order.turn(index);
                (
                    reference,
                    tokio::spawn(async move {
                        // Each entry is audited on its own, with the write it makes.
                        let mut call = Call::new("ConsentService/RecordConsents");
                        call.by(&principal);
                        let result =
                            record_one(&state, &principal, entry, &mut call, Some((&turn, now)))
                                .await;
                        // Its write is committed (or refused): the next entry of the same
                        // patient may go.
                        drop(turn);
                        let outcome = result
                            .as_ref()
                            .map_or_else(ServiceError::outcome, |_| Outcome::Ok);
                        match state.record(call, outcome).await {
                            Err(_) if result.is_ok() => Err(ServiceError::Unavailable),
                            _ => result,
                        }
                    }),
                )
            })
            .collect();
        let mut results = Vec::with_capacity(handles.len());
        for (index, (client_reference, handle)) in handles.into_iter().enumerate() {
            let outcome = match handle.await {
                Ok(Ok(recorded)) => proto::record_consents_result::Outcome::Recorded(recorded),
                Ok(Err(err)) => proto::record_consents_result::Outcome::Rejected(rejection(err)),
                Err(_) => proto::record_consents_result::Outcome::Rejected(rejection(
                    ServiceError::Unavailable,
                )),
            };
            if matches!(outcome, proto::record_consents_result::Outcome::Recorded(_)) {
                call.changed();
            }
            results.push(proto::RecordConsentsResult {
                index: index as u32,
                client_reference,
                outcome: Some(outcome),
            });
        }
        Ok(Response::new(proto::RecordConsentsResponse { results }))
    }

    async fn withdraw_consent_inner(
        &self,
        request: Request<proto::WithdrawConsentRequest>,
        call: &mut Call,
    ) -> Result<Response<proto::WithdrawConsentResponse>, Status> {
        let principal = authorize(&self.state, &request, Role::ConsentOfficer, call).await?;
        let mut req = request.into_inner();
        let access =
            consent_service::open(&self.state, &principal, &req.registry, "registry", call).await?;
        let mut violations = FieldViolations::new();
        let patient = parse_patient(&access, req.patient.take(), &mut violations)?;
        let mut scopes = Vec::new();
        if req.scopes.is_empty() {
            violations.push("scopes", "at least one scope is required");
        }
        for (i, &value) in req.scopes.iter().enumerate() {
            match crate::api::convert::scope(value) {
                None => violations.push(
                    format!("scopes[{i}]"),
                    "must be REGISTRY_INCLUSION, RESEARCH_USE or RECONTACT",
                ),
                Some(s) if scopes.contains(&s) => {
                    violations.push(format!("scopes[{i}]"), "is a duplicate")
                }
                Some(s) => scopes.push(s),
            }
        }
        let reason = reason_from_proto(req.reason);
        if reason.is_none() {
            violations.push(
                "reason",
                "is required: one of the WITHDRAWAL_REASON_ values",
            );
        }
        let (Some(patient), Some(reason)) = (patient, reason) else {
            return Err(ServiceError::Invalid(violations).into());
        };
        violations.into_result().map_err(ServiceError::from)?;
        let pseudonym = derive_patient(&self.state, &access, patient).await?;
        let withdrawn =
            consent_service::withdraw(&self.state, &access, pseudonym, scopes, reason, call)
                .await?;
        Ok(Response::new(proto::WithdrawConsentResponse {
            pseudonym: withdrawn.view.pseudonym.as_str().to_owned(),
            in_force: in_force(&withdrawn.view),
            receipt: withdrawn.receipt.map(receipt_to_proto),
        }))
    }

    async fn get_consent_inner(
        &self,
        request: Request<proto::GetConsentRequest>,
        call: &mut Call,
    ) -> Result<Response<proto::GetConsentResponse>, Status> {
        let principal = authorize(&self.state, &request, Role::ConsentOfficer, call).await?;
        let req = request.into_inner();
        let access =
            consent_service::open(&self.state, &principal, &req.registry, "registry", call).await?;
        let mut violations = FieldViolations::new();
        let pseudonym = match parse_pseudonym(&req.pseudonym, access.registry()) {
            Ok(p) => Some(p),
            Err(ServiceError::Invalid(v)) => {
                violations.extend(v);
                None
            }
            Err(e) => return Err(e.into()),
        };
        let at = match req.at.as_ref().map(timestamp_from_proto) {
            None => self.state.clock.now(),
            Some(Some(t)) => t,
            Some(None) => {
                violations.push("at", "is not a valid timestamp");
                self.state.clock.now()
            }
        };
        let Some(pseudonym) = pseudonym else {
            return Err(ServiceError::Invalid(violations).into());
        };
        violations.into_result().map_err(ServiceError::from)?;
        let view = consent_service::get(&self.state, &access, pseudonym, at).await?;
        Ok(Response::new(proto::GetConsentResponse {
            pseudonym: view.pseudonym.as_str().to_owned(),
            in_force: in_force(&view),
            history: view.events.iter().map(event_to_proto).collect(),
        }))
    }

    async fn get_erasure_receipt_inner(
        &self,
        request: Request<proto::GetErasureReceiptRequest>,
        call: &mut Call,
    ) -> Result<Response<proto::ErasureReceipt>, Status> {
        let principal = authorize(&self.state, &request, Role::ConsentOfficer, call).await?;
        let receipt_id = request.into_inner().receipt_id;
        if !consent_service::is_receipt_id(&receipt_id) {
            let mut v = FieldViolations::new();
            v.push(
                "receipt_id",
                "must be a receipt id as issued: \"rcpt-\" and 32 hex digits",
            );
            return Err(ServiceError::Invalid(v).into());
        }
        let receipt = consent_service::receipt(&self.state, &principal, &receipt_id, call).await?;
        Ok(Response::new(receipt_to_proto(receipt)))
    }
}

#[tonic::async_trait]
impl ConsentService for ConsentApi {
    async fn record_consent(
        &self,
        request: Request<proto::RecordConsentRequest>,
    ) -> Result<Response<proto::RecordConsentResponse>, Status> {
        audited!(
            self,
            "ConsentService/RecordConsent",
            record_consent_inner,
            request
        )
    }

    async fn record_consents(
        &self,
        request: Request<proto::RecordConsentsRequest>,
    ) -> Result<Response<proto::RecordConsentsResponse>, Status> {
        audited!(
            self,
            "ConsentService/RecordConsents",
            record_consents_inner,
            request
        )
    }

    async fn withdraw_consent(
        &self,
        request: Request<proto::WithdrawConsentRequest>,
    ) -> Result<Response<proto::WithdrawConsentResponse>, Status> {
        audited!(
            self,
            "ConsentService/WithdrawConsent",
            withdraw_consent_inner,
            request
        )
    }

    async fn get_consent(
        &self,
        request: Request<proto::GetConsentRequest>,
    ) -> Result<Response<proto::GetConsentResponse>, Status> {
        audited!(
            self,
            "ConsentService/GetConsent",
            get_consent_inner,
            request
        )
    }

    async fn get_erasure_receipt(
        &self,
        request: Request<proto::GetErasureReceiptRequest>,
    ) -> Result<Response<proto::ErasureReceipt>, Status> {
        audited!(
            self,
            "ConsentService/GetErasureReceipt",
            get_erasure_receipt_inner,
            request
        )
    }
}
