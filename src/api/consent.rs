//! `ConsentService`: consent officers record, read and withdraw consent.
//!
//! Writes go through the writer (partitioned by patient), so a withdrawal is serialised
//! with every submission about the same patient, and the erasure commits in the same
//! transaction as the withdrawal. No response of this service carries clinical data, and
//! none names who recorded a decision or erased a record (nor the form label they typed)
//! to anyone but the recorder and the recorder's centre: that name tells which centre
//! treats the patient.

use chrono::{DateTime, Utc};
use ring::rand::SecureRandom;
use tonic::{Request, Response, Status};

use super::{
    ApiError, Call, SharedState, audited, parse_pseudonym, rejection, zeroize_identifiers,
};
use crate::auth::{Principal, Role};
use crate::consent::{self, ConsentEvent, Scope, timestamp_from_proto, timestamp_to_proto};
use crate::domain::{ClientReference, FieldViolations};
use crate::proto::{self, consent_service_server::ConsentService};
use crate::pseudonym::{PatientIdentity, Pseudonym};
use crate::store::Registry;
use crate::store::consent::{self as consent_store, ConsentRecord, WithdrawalReason};
use crate::store::writer::{Command, Output, RecordConsent, Withdraw};

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

/// Now, at the millisecond precision the store keeps.
fn now_millis() -> DateTime<Utc> {
    DateTime::from_timestamp_millis(Utc::now().timestamp_millis())
        .expect("current time is in range")
}

/// Overwrites the identifiers of a patient reference, if it holds any.
fn zeroize_patient_ref(patient: &mut Option<proto::PatientRef>) {
    if let Some(proto::patient_ref::Kind::Identifiers(ids)) =
        patient.as_mut().and_then(|p| p.kind.as_mut())
    {
        zeroize_identifiers(&mut Some(std::mem::take(ids)));
    }
}

/// Resolves the patient of a request to a pseudonym of `registry`: from identifiers
/// (derived here, identifiers zeroised at once) or from a pseudonym given.
async fn resolve_patient(
    state: &SharedState,
    principal: &Principal,
    registry: &Registry,
    patient: &mut Option<proto::PatientRef>,
    violations: &mut FieldViolations,
) -> Result<Option<Pseudonym>, ApiError> {
    use proto::patient_ref::Kind;
    let Some(kind) = patient.as_mut().and_then(|p| p.kind.as_mut()) else {
        violations.push("patient", "identifiers or a pseudonym are required");
        return Ok(None);
    };
    match kind {
        Kind::Pseudonym(text) => match parse_pseudonym(text, registry) {
            Ok(p) => Ok(Some(p)),
            Err(ApiError::Invalid(v)) => {
                violations.extend(v.nest("patient"));
                Ok(None)
            }
            Err(e) => Err(e),
        },
        Kind::Identifiers(ids) => {
            let identity = PatientIdentity::from_proto(ids);
            let mut taken = Some(std::mem::take(ids));
            zeroize_identifiers(&mut taken);
            match identity {
                Ok(identity) => Ok(Some(
                    state
                        .derive_pseudonym(principal, registry, &identity)
                        .await?,
                )),
                Err(v) => {
                    violations.extend(v.nest("patient.identifiers"));
                    Ok(None)
                }
            }
        }
    }
}

/// Whether `viewer` may see who recorded a decision (or erased a record): the recorder
/// themself, and principals of the recorder's centre. A recorder's name (and the form
/// label their centre typed, which often names the hospital) tells which centre treats
/// the patient; an officer of another centre, or of the ERN, acts on the patient's
/// consent without needing that.
fn recorder_visible_to(viewer: &Principal, recorder_id: i64, recorder_centre: Option<i64>) -> bool {
    viewer.id == recorder_id
        || viewer
            .centre
            .as_ref()
            .is_some_and(|c| recorder_centre == Some(c.id))
}

/// A decision on file as `viewer` may see it: to anyone but the recorder's centre, the
/// role it was recorded in (`source`) and the dates, without the recorder's name or the
/// form label.
fn event_to_proto(e: &ConsentRecord, viewer: &Principal) -> proto::ConsentEvent {
    let (recorded_by, form_version) =
        if recorder_visible_to(viewer, e.recorder_id, e.recorder_centre) {
            (e.recorded_by.clone(), e.form_version.clone())
        } else {
            (String::new(), String::new())
        };
    proto::ConsentEvent {
        id: e.id as u64,
        scope: e.scope.to_proto() as i32,
        state: e.decision.to_proto() as i32,
        given_at: Some(timestamp_to_proto(e.given_at)),
        form_version,
        expires_at: e.expires_at.map(timestamp_to_proto),
        recorded_at: Some(timestamp_to_proto(e.recorded_at)),
        recorded_by,
        source: e.source.clone(),
    }
}

/// The decision in force per scope at `at`.
pub fn status_at(history: &[ConsentRecord], at: DateTime<Utc>) -> proto::ConsentStatus {
    let events: Vec<ConsentEvent> = history
        .iter()
        .map(|e| ConsentEvent {
            seq: e.id,
            scope: e.scope,
            decision: e.decision,
            given_at: e.given_at,
            expires_at: e.expires_at,
        })
        .collect();
    proto::ConsentStatus {
        at: Some(timestamp_to_proto(at)),
        scopes: Scope::ALL
            .into_iter()
            .map(|scope| match consent::in_force(&events, scope, at) {
                None => proto::ScopeStatus {
                    scope: scope.to_proto() as i32,
                    ..Default::default()
                },
                Some(e) => proto::ScopeStatus {
                    scope: scope.to_proto() as i32,
                    state: e.decision.to_proto() as i32,
                    active: consent::is_active(&events, scope, at),
                    given_at: Some(timestamp_to_proto(e.given_at)),
                    expires_at: e.expires_at.map(timestamp_to_proto),
                },
            })
            .collect(),
    }
}

async fn history(
    state: &SharedState,
    registry_id: i64,
    pseudonym: &str,
) -> Result<Vec<ConsentRecord>, ApiError> {
    let mut conn = state
        .store
        .pool()
        .acquire()
        .await
        .map_err(|e| ApiError::Internal(e.into()))?;
    Ok(consent_store::history(&mut conn, registry_id, pseudonym).await?)
}

/// One RecordConsent, start to finish, for an authenticated officer.
async fn record_one(
    state: &SharedState,
    principal: &Principal,
    mut request: proto::RecordConsentRequest,
    call: &mut Call,
) -> Result<proto::RecordConsentResponse, ApiError> {
    let registry = match state
        .registry_for(call, principal, &request.registry, "registry")
        .await
    {
        Ok(r) => r,
        Err(e) => {
            zeroize_patient_ref(&mut request.patient);
            return Err(e);
        }
    };
    let mut violations = FieldViolations::new();
    let pseudonym = resolve_patient(
        state,
        principal,
        &registry,
        &mut request.patient,
        &mut violations,
    )
    .await?;
    let now = now_millis();
    let decisions = if request.decisions.is_empty() {
        violations.push("decisions", "at least one decision is required");
        Vec::new()
    } else {
        match consent::parse_attestation(&request.decisions, now) {
            Ok(d) => d,
            Err(v) => {
                // parse_attestation names its items "consent[i]"; here they are decisions.
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
    let Some(pseudonym) = pseudonym else {
        return Err(ApiError::Invalid(violations));
    };
    violations.into_result()?;
    let command = Command::RecordConsent(RecordConsent {
        registry_id: registry.id,
        pseudonym: pseudonym.as_str().to_owned(),
        principal_id: principal.id,
        decisions,
        now,
    });
    let ids = match state.writer.execute(command, call.for_writer()).await? {
        Output::Consent(ids) => ids,
        _ => return Err(ApiError::Unavailable),
    };
    let history = history(state, registry.id, pseudonym.as_str()).await?;
    Ok(proto::RecordConsentResponse {
        pseudonym: pseudonym.as_str().to_owned(),
        recorded: history
            .iter()
            .filter(|e| ids.contains(&e.id))
            .map(|e| event_to_proto(e, principal))
            .collect(),
        in_force: Some(status_at(&history, now)),
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

/// A fresh receipt id: "rcpt-" and 128 random bits in hex.
fn new_receipt_id() -> Result<String, ApiError> {
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| ApiError::Unavailable)?;
    Ok(format!("rcpt-{}", hex::encode(bytes)))
}

impl ConsentApi {
    async fn record_consent_inner(
        &self,
        request: Request<proto::RecordConsentRequest>,
        call: &mut Call,
    ) -> Result<Response<proto::RecordConsentResponse>, Status> {
        let principal = match self
            .state
            .authorize(&request, Role::ConsentOfficer, call)
            .await
        {
            Ok(p) => p,
            Err(e) => {
                let mut inner = request.into_inner();
                zeroize_patient_ref(&mut inner.patient);
                return Err(e.into());
            }
        };
        Ok(Response::new(
            record_one(&self.state, &principal, request.into_inner(), call).await?,
        ))
    }

    async fn record_consents_inner(
        &self,
        request: Request<proto::RecordConsentsRequest>,
        call: &mut Call,
    ) -> Result<Response<proto::RecordConsentsResponse>, Status> {
        let principal = self
            .state
            .authorize(&request, Role::ConsentOfficer, call)
            .await?;
        let entries = request.into_inner().entries;
        if entries.is_empty() || entries.len() > MAX_BULK_ENTRIES {
            let mut v = FieldViolations::new();
            v.push(
                "entries",
                format!("must have 1 to {MAX_BULK_ENTRIES} entries"),
            );
            return Err(ApiError::Invalid(v).into());
        }
        // Each patient is its own writer command (atomic per patient); they run
        // concurrently and are grouped into transactions by the writer.
        let handles: Vec<_> = entries
            .into_iter()
            .map(|entry| {
                let reference = ClientReference::parse(&entry.client_reference)
                    .map(|r| r.as_str().to_owned())
                    .unwrap_or_default();
                let state = self.state.clone();
                let principal = principal.clone();
                (
                    reference,
                    tokio::spawn(async move {
                        // Each entry is audited on its own, with the write it makes.
                        let mut call = Call::new("ConsentService/RecordConsents");
                        call.by(&principal);
                        let result = record_one(&state, &principal, entry, &mut call).await;
                        let code = result
                            .as_ref()
                            .map_or_else(ApiError::code, |_| tonic::Code::Ok);
                        match state.record(call, code).await {
                            Err(_) if result.is_ok() => Err(ApiError::Unavailable),
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
                    ApiError::Unavailable,
                )),
            };
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
        let principal = match self
            .state
            .authorize(&request, Role::ConsentOfficer, call)
            .await
        {
            Ok(p) => p,
            Err(e) => {
                let mut inner = request.into_inner();
                zeroize_patient_ref(&mut inner.patient);
                return Err(e.into());
            }
        };
        let mut req = request.into_inner();
        let registry = match self
            .state
            .registry_for(call, &principal, &req.registry, "registry")
            .await
        {
            Ok(r) => r,
            Err(e) => {
                zeroize_patient_ref(&mut req.patient);
                return Err(e.into());
            }
        };
        let mut violations = FieldViolations::new();
        let pseudonym = resolve_patient(
            &self.state,
            &principal,
            &registry,
            &mut req.patient,
            &mut violations,
        )
        .await?;
        let mut scopes = Vec::new();
        if req.scopes.is_empty() {
            violations.push("scopes", "at least one scope is required");
        }
        for (i, &value) in req.scopes.iter().enumerate() {
            match Scope::from_proto(value) {
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
        let (Some(pseudonym), Some(reason)) = (pseudonym, reason) else {
            return Err(ApiError::Invalid(violations).into());
        };
        violations.into_result().map_err(ApiError::from)?;
        let now = now_millis();
        let receipt_id = new_receipt_id()?;
        let command = Command::Withdraw(Withdraw {
            registry_id: registry.id,
            pseudonym: pseudonym.as_str().to_owned(),
            principal_id: principal.id,
            scopes,
            reason,
            receipt_id: receipt_id.clone(),
            now,
        });
        let erased = match self
            .state
            .writer
            .execute(command, call.for_writer())
            .await
            .map_err(ApiError::from)?
        {
            Output::Withdrawn { erased, .. } => erased,
            _ => return Err(ApiError::Unavailable.into()),
        };
        let history = history(&self.state, registry.id, pseudonym.as_str()).await?;
        let receipt = erased.map(|(cases, versions)| proto::ErasureReceipt {
            receipt_id,
            registry: registry.code.clone(),
            pseudonym: pseudonym.as_str().to_owned(),
            erased_at: Some(timestamp_to_proto(now)),
            erased_by: principal.name.clone(),
            reason: reason_to_proto(reason),
            cases_erased: cases as u32,
            versions_erased: versions as u32,
        });
        Ok(Response::new(proto::WithdrawConsentResponse {
            pseudonym: pseudonym.as_str().to_owned(),
            in_force: Some(status_at(&history, now)),
            receipt,
        }))
    }

    async fn get_consent_inner(
        &self,
        request: Request<proto::GetConsentRequest>,
        call: &mut Call,
    ) -> Result<Response<proto::GetConsentResponse>, Status> {
        let principal = self
            .state
            .authorize(&request, Role::ConsentOfficer, call)
            .await?;
        let req = request.into_inner();
        let registry = self
            .state
            .registry_for(call, &principal, &req.registry, "registry")
            .await?;
        let mut violations = FieldViolations::new();
        let pseudonym = match parse_pseudonym(&req.pseudonym, &registry) {
            Ok(p) => Some(p),
            Err(ApiError::Invalid(v)) => {
                violations.extend(v);
                None
            }
            Err(e) => return Err(e.into()),
        };
        let at = match req.at.as_ref().map(timestamp_from_proto) {
            None => Utc::now(),
            Some(Some(t)) => t,
            Some(None) => {
                violations.push("at", "is not a valid timestamp");
                Utc::now()
            }
        };
        let Some(pseudonym) = pseudonym else {
            return Err(ApiError::Invalid(violations).into());
        };
        violations.into_result().map_err(ApiError::from)?;
        let history = history(&self.state, registry.id, pseudonym.as_str()).await?;
        Ok(Response::new(proto::GetConsentResponse {
            pseudonym: pseudonym.as_str().to_owned(),
            in_force: Some(status_at(&history, at)),
            history: history
                .iter()
                .map(|e| event_to_proto(e, &principal))
                .collect(),
        }))
    }

    async fn get_erasure_receipt_inner(
        &self,
        request: Request<proto::GetErasureReceiptRequest>,
        call: &mut Call,
    ) -> Result<Response<proto::ErasureReceipt>, Status> {
        let principal = self
            .state
            .authorize(&request, Role::ConsentOfficer, call)
            .await?;
        let receipt_id = request.into_inner().receipt_id;
        let well_formed = receipt_id.len() == 37
            && receipt_id.starts_with("rcpt-")
            && receipt_id[5..].bytes().all(|b| b.is_ascii_hexdigit());
        if !well_formed {
            let mut v = FieldViolations::new();
            v.push(
                "receipt_id",
                "must be a receipt id as issued: \"rcpt-\" and 32 hex digits",
            );
            return Err(ApiError::Invalid(v).into());
        }
        let mut conn = self
            .state
            .store
            .pool()
            .acquire()
            .await
            .map_err(|e| ApiError::Internal(e.into()))?;
        let not_found =
            || ApiError::NotFound("no erasure receipt with this id in your registries".into());
        let erasure = consent_store::erasure_by_receipt(&mut conn, &receipt_id)
            .await
            .map_err(ApiError::from)?
            .ok_or_else(not_found)?;
        // A receipt of a registry the officer does not serve is not theirs to see.
        if !principal.registries.contains(&erasure.registry_id) {
            return Err(not_found().into());
        }
        // Who erased it, as in the consent history: for the eraser's centre only.
        let shown = recorder_visible_to(&principal, erasure.eraser_id, erasure.eraser_centre);
        let erased_by = if shown {
            erasure.erased_by
        } else {
            String::new()
        };
        Ok(Response::new(proto::ErasureReceipt {
            receipt_id: erasure.receipt_id,
            registry: erasure.registry_code,
            pseudonym: erasure.pseudonym,
            erased_at: Some(timestamp_to_proto(erasure.erased_at)),
            erased_by,
            reason: reason_to_proto(erasure.reason),
            cases_erased: erasure.cases_erased as u32,
            versions_erased: erasure.versions_erased as u32,
        }))
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
