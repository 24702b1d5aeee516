//! The gRPC layer: thin handlers that authenticate, convert protobuf to domain types,
//! call the domain and the store, and convert back.
//!
//! Every error of every handler passes through [`ApiError`] and is mapped to a
//! `tonic::Status` in exactly one place ([`From<ApiError> for Status`]), with the
//! canonical code a client can act on and structured details (`tonic-types`): field
//! violations for INVALID_ARGUMENT, a precondition failure naming the missing consent for
//! FAILED_PRECONDITION. Messages never contain identifiers or clinical values; an internal
//! failure is logged with a reference the client is given, never the cause. A database
//! that cannot be reached now (`StoreError::is_unavailable`) is not an internal failure:
//! UNAVAILABLE with a retry hint, and while the probe (`crate::health`) finds it away,
//! every call is refused so at once, before its handler runs.

pub mod admin;
pub mod case;
pub mod codec;
pub mod consent;
pub mod drain;
pub mod research;
pub mod wire;

use std::sync::Arc;

use chrono::Utc;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};
use tracing::{error, info, warn};
use zeroize::Zeroize;

use crate::audit::{Entry, code_name};
use crate::auth::{AuthError, KeyVerifier, PresentedKey, Principal, Role, Verdict};
use crate::consent::InclusionRefused;
use crate::domain::{FieldViolations, RegistryCode};
use crate::pseudonym::{PatientIdentity, Pseudonym, Pseudonymiser, RegistryRef};
use crate::ratelimit::{CallGate, CallPermit, Peer, PrincipalLimiter, RateLimited};
use crate::refusals::Refusals;
use crate::store::writer::{Command, WriteError, Writer};
use crate::store::{Registry, Store, StoreError};

/// What the handlers share.
pub struct AppState {
    pub store: Store,
    pub writer: Writer,
    pub verifier: KeyVerifier,
    pub pseudonymiser: Pseudonymiser,
    /// Research queries per principal.
    pub research_limiter: PrincipalLimiter,
    /// Pseudonym derivations per principal.
    pub derivation_limiter: PrincipalLimiter,
    /// Calls refused before authentication: per-peer allowance, audit summary.
    pub refusals: Arc<Refusals>,
    /// Calls in flight per principal.
    pub calls: CallGate,
    /// Invalid items a bulk stream may send before it is ended.
    pub max_stream_invalid_items: u32,
    /// Where research tables are protected: off the async runtime, bounded, with a deadline.
    pub protection: research::ProtectionPool,
    /// Whether the database answers (probed every second; see `crate::health`).
    pub database: crate::health::DatabaseWatch,
}

pub type SharedState = Arc<AppState>;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("the request has {} invalid field(s); see the field violations", .0.len())]
    Invalid(FieldViolations),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    MissingConsent(#[from] InclusionRefused),
    #[error(
        "your centre already has a case for this patient in registry {registry}; use UpdateCase"
    )]
    CaseExists { registry: String, pseudonym: String },
    #[error("the case is at version {current}; read it again and re-apply your change")]
    VersionConflict { current: i64 },
    #[error("{0}")]
    Precondition(String),
    #[error(transparent)]
    RateLimited(#[from] RateLimited),
    #[error("the service is shutting down; retry on another instance or later")]
    Unavailable,
    #[error("{0}; retry in a moment")]
    Busy(&'static str),
    #[error("internal error")]
    Internal(#[source] StoreError),
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        ApiError::Internal(err)
    }
}

impl From<FieldViolations> for ApiError {
    fn from(v: FieldViolations) -> Self {
        ApiError::Invalid(v)
    }
}

impl From<WriteError> for ApiError {
    fn from(err: WriteError) -> Self {
        match err {
            WriteError::Consent(refused) => ApiError::MissingConsent(refused),
            // The handler knows the registry and pseudonym and maps these itself; these
            // arms are the fallback.
            WriteError::AlreadyExists => ApiError::CaseExists {
                registry: String::new(),
                pseudonym: String::new(),
            },
            WriteError::NotFound => ApiError::NotFound("no such case of your centre".into()),
            WriteError::VersionConflict { current } => ApiError::VersionConflict { current },
            WriteError::Store(err) => ApiError::Internal(err),
            WriteError::ShuttingDown => ApiError::Unavailable,
            e @ WriteError::UseWithdrawal => ApiError::Precondition(e.to_string()),
        }
    }
}

impl ApiError {
    pub fn code(&self) -> Code {
        match self {
            ApiError::Auth(
                AuthError::MissingCredentials
                | AuthError::InvalidKey
                | AuthError::CertificateMismatch,
            ) => Code::Unauthenticated,
            ApiError::Auth(_) => Code::PermissionDenied,
            ApiError::Invalid(_) => Code::InvalidArgument,
            ApiError::NotFound(_) => Code::NotFound,
            ApiError::MissingConsent(_) => Code::FailedPrecondition,
            ApiError::CaseExists { .. } => Code::AlreadyExists,
            ApiError::VersionConflict { .. } => Code::Aborted,
            ApiError::Precondition(_) => Code::FailedPrecondition,
            ApiError::RateLimited(_) => Code::ResourceExhausted,
            ApiError::Unavailable | ApiError::Busy(_) => Code::Unavailable,
            ApiError::Internal(cause) if cause.is_unavailable() => Code::Unavailable,
            ApiError::Internal(_) => Code::Internal,
        }
    }
}

impl From<ApiError> for Status {
    fn from(err: ApiError) -> Status {
        let code = err.code();
        match err {
            ApiError::Invalid(violations) => {
                let mut details = ErrorDetails::new();
                for v in violations.iter() {
                    details.add_bad_request_violation(v.field.clone(), v.description.clone());
                }
                let message = ApiError::Invalid(violations).to_string();
                Status::with_error_details(code, message, details)
            }
            // One message and one detail, whatever is on file for the patient: said to a
            // physician, who must not learn from it whether a person refused, withdrew or
            // let consent expire (`InclusionRefused` carries no state to tell).
            ApiError::MissingConsent(refused @ InclusionRefused) => Status::with_error_details(
                code,
                refused.to_string(),
                ErrorDetails::with_precondition_failure_violation(
                    "CONSENT",
                    "REGISTRY_INCLUSION",
                    refused.to_string(),
                ),
            ),
            ApiError::CaseExists {
                ref registry,
                ref pseudonym,
            } => {
                let details = ErrorDetails::with_resource_info(
                    "case",
                    pseudonym.clone(),
                    registry.clone(),
                    "",
                );
                Status::with_error_details(code, err.to_string(), details)
            }
            ApiError::RateLimited(limited) => Status::with_error_details(
                code,
                limited.to_string(),
                ErrorDetails::with_retry_info(Some(limited.retry_after)),
            ),
            ApiError::Internal(ref cause) if cause.is_unavailable() => {
                warn!(error = %cause, "database unreachable");
                database_unreachable()
            }
            ApiError::Internal(ref cause) => {
                let reference = incident_reference();
                error!(reference = %reference, error = %cause, "internal error");
                Status::new(
                    code,
                    format!("internal error; quote reference {reference} to the operator"),
                )
            }
            other => Status::new(code, other.to_string()),
        }
    }
}

/// The answer to a call the database cannot serve now: UNAVAILABLE, with the time after
/// which a retry may succeed (gRPC `RetryInfo`: the probe's period).
pub fn database_unreachable() -> Status {
    Status::with_error_details(
        Code::Unavailable,
        "the database is unreachable; retry in a moment",
        ErrorDetails::with_retry_info(Some(crate::health::PROBE_EVERY)),
    )
}

/// A short random reference tying a client-visible error to the server log.
fn incident_reference() -> String {
    let mut bytes = [0u8; 6];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes);
    hex::encode(bytes)
}

/// The body of every RPC method: runs the handler `$inner` inside a [`Call`] named
/// `$method` ("Service/Method") and concludes it (audit entry, metrics, status). While
/// the database is unreachable the handler does not run: the call is refused at once.
macro_rules! audited {
    ($self:ident, $method:literal, $inner:ident, $request:ident) => {{
        let mut call = $crate::api::Call::new($method);
        let result = if $self.state.database.is_reachable() {
            $self.$inner($request, &mut call).await
        } else {
            Err($crate::api::database_unreachable())
        };
        $self.state.conclude(call, result).await
    }};
}
pub(crate) use audited;

/// The audit record of one call, filled in as the handler learns who and what. Every
/// call is concluded with [`AppState::conclude`], which appends it (unless the writer
/// already did, in the transaction of the change it records).
#[derive(Debug, Clone)]
pub struct Call {
    entry: Entry,
    audited: bool,
    /// Where the call came from (for refusals before authentication).
    peer: Peer,
    /// The principal's place among its calls in flight, held until the call is dropped.
    permit: Option<Arc<CallPermit>>,
}

impl Call {
    /// `method` as `Service/Method`.
    pub fn new(method: &str) -> Call {
        Call {
            entry: Entry {
                method: method.into(),
                ..Entry::default()
            },
            audited: false,
            peer: Peer::Unknown,
            permit: None,
        }
    }

    /// The authenticated caller.
    pub fn by(&mut self, principal: &Principal) {
        self.entry.principal_id = Some(principal.id);
        self.entry.principal = principal.name.clone();
        self.entry.role = principal.role.as_str().into();
        self.entry.centre = principal
            .centre
            .as_ref()
            .map(|c| c.code.clone())
            .unwrap_or_default();
    }

    /// The registry the call is about.
    pub fn registry(&mut self, code: &str) {
        self.entry.registry = code.into();
    }

    /// How many records, cells or items the call wrote or returned.
    pub fn items(&mut self, n: usize) {
        self.entry.items = n as i64;
    }

    /// The network peer the call came from.
    pub fn peer(&self) -> Peer {
        self.peer
    }

    /// Sets the peer (for the items of a stream, which are calls of their own).
    pub fn from_peer(&mut self, peer: Peer) {
        self.peer = peer;
    }

    /// Takes the principal's in-flight place out of the call, for a stream to hold while
    /// it is open.
    pub fn take_permit(&mut self) -> Option<Arc<CallPermit>> {
        self.permit.take()
    }

    /// The entry for the writer to append with the change (and its outcome).
    pub fn for_writer(&mut self) -> Option<Entry> {
        self.audited = true;
        Some(self.entry.clone())
    }
}

impl AppState {
    /// Appends the call's audit entry with its outcome, unless the writer appended it
    /// with the change, and passes the result on. A successful call whose entry cannot be
    /// committed fails: nothing is answered that the log does not show.
    pub async fn conclude<T>(
        &self,
        call: Call,
        result: Result<tonic::Response<T>, Status>,
    ) -> Result<tonic::Response<T>, Status> {
        let code = match &result {
            Ok(_) => Code::Ok,
            Err(status) => status.code(),
        };
        metrics::counter!(
            "ern_calls_total",
            "method" => call.entry.method.clone(),
            "outcome" => code_name(code)
        )
        .increment(1);
        // Nothing can be recorded while the database is away, and trying would hold the
        // refused caller until the pool gives up.
        if code == Code::Unavailable && !self.database.is_reachable() {
            warn!(method = %call.entry.method, "call refused while the database is unreachable; not in the audit log");
            return result;
        }
        match self.record(call, code).await {
            Err(err) if result.is_ok() => {
                error!(error = %err, "audit entry not committed; the call fails");
                Err(Status::unavailable(
                    "the call could not be recorded in the audit log; retry later",
                ))
            }
            Err(err) => {
                warn!(error = %err, "audit entry of a failed call not committed");
                result
            }
            Ok(()) => result,
        }
    }

    /// Appends the entry of a call that did not reach the writer (a read, a refusal).
    pub async fn record(&self, call: Call, code: Code) -> Result<(), WriteError> {
        if call.audited {
            return Ok(());
        }
        // A call that never authenticated is counted per peer, not logged one by one: a
        // flood of bad keys must not cost an audit row each (`refusals`).
        if call.entry.principal_id.is_none() {
            self.refusals.note(
                call.peer,
                &call.entry.principal,
                &call.entry.method,
                code_name(code),
            );
            return Ok(());
        }
        let mut entry = call.entry;
        entry.outcome = code_name(code).into();
        self.writer.execute(Command::Audit, Some(entry)).await?;
        Ok(())
    }

    /// Derives a patient's pseudonym for `principal`: the only way the API derives one.
    /// Derivation is an oracle (a BSN is enumerable), so it is rate limited per principal
    /// and counted per principal in the metrics.
    ///
    /// After a key rotation, new patients get pseudonyms of the active key version, and a
    /// patient already known to the registry under an older version keeps that pseudonym
    /// (their records and consent stay linked): the older versions are derived too and
    /// looked up.
    pub async fn derive_pseudonym(
        &self,
        principal: &Principal,
        registry: &Registry,
        identity: &PatientIdentity,
    ) -> Result<Pseudonym, ApiError> {
        if let Err(limited) = self.derivation_limiter.check(principal.id) {
            metrics::counter!("ern_rate_limited_total", "limit" => "pseudonym_derivations")
                .increment(1);
            return Err(limited.into());
        }
        metrics::counter!("ern_pseudonym_derivations_total", "principal" => principal.name.clone())
            .increment(1);
        let active = registry_ref(registry)?;
        let current = self.pseudonymiser.derive(active, identity);
        if active.key_version <= 1 {
            return Ok(current);
        }
        let older: Vec<Pseudonym> = (1..active.key_version)
            .map(|key_version| {
                self.pseudonymiser.derive(
                    RegistryRef {
                        key_version,
                        ..active
                    },
                    identity,
                )
            })
            .collect();
        let candidates: Vec<&str> = older.iter().map(Pseudonym::as_str).collect();
        match self.store.known_pseudonym(registry.id, &candidates).await? {
            Some(known) => Ok(older
                .into_iter()
                .find(|p| p.as_str() == known)
                .unwrap_or(current)),
            None => Ok(current),
        }
    }

    /// Authenticates the caller of a request: a live key of an enabled principal. Then
    /// takes the principal's place among its calls in flight (held by `call`).
    ///
    /// A refusal takes one from the peer's allowance (`refusals`); a peer with none left
    /// is refused here, before any database read, unless it presents a key this process
    /// has verified (another caller behind the same address).
    pub async fn authenticate<T>(
        &self,
        request: &tonic::Request<T>,
        call: &mut Call,
    ) -> Result<Principal, ApiError> {
        let peer = Peer::of(request.remote_addr());
        call.peer = peer;
        let key = PresentedKey::from_metadata(request.metadata());
        if let Err(limited) = self.refusals.check(peer)
            && !key.as_ref().is_ok_and(|key| self.verifier.known_good(key))
        {
            metrics::counter!("ern_rate_limited_total", "limit" => "peer_refusals").increment(1);
            return Err(limited.into());
        }
        let result = match &key {
            Ok(key) => {
                let certificate = client_certificate(request);
                self.authenticate_key(key, certificate.as_deref(), call)
                    .await
            }
            Err(e) => Err(e.clone().into()),
        };
        let principal = match result {
            Ok(principal) => principal,
            Err(err) => {
                if matches!(err, ApiError::Busy(_)) || err.code() == Code::Unauthenticated {
                    self.refusals.charge(peer);
                }
                return Err(err);
            }
        };
        let permit = self.calls.enter(principal.id).await.inspect_err(|_| {
            metrics::counter!("ern_rate_limited_total", "limit" => "calls_in_flight").increment(1);
        })?;
        call.permit = Some(Arc::new(permit));
        Ok(principal)
    }

    /// Checks a presented key against its row (read on every call: revocation, expiry and
    /// disabling take effect at once). A key of an earlier version, hashed with Argon2id,
    /// is re-stored as HMAC once verified.
    pub async fn authenticate_key(
        &self,
        key: &PresentedKey,
        certificate: Option<&str>,
        call: &mut Call,
    ) -> Result<Principal, ApiError> {
        self.verifier.counters().looked_up_key();
        let Some(record) = self.store.load_key(&key.key_id).await? else {
            return Err(AuthError::InvalidKey.into());
        };
        // The key id is public (it names the key, it does not unlock it): a failed
        // attempt on a key that exists is recorded under it. (Ids that name no key are
        // not: they are whatever the caller chose.)
        call.entry.principal = format!("key:{}", key.key_id);
        let now = Utc::now().timestamp_millis();
        let live = record.revoked_at.is_none()
            && record.expires_at.is_none_or(|exp| exp > now)
            && !record.principal_disabled;
        // Verify even a dead key, so that refusing it costs what refusing a wrong secret
        // costs.
        let verified = match self.verifier.verify(key, &record.secret_hash).await {
            Verdict::Valid => true,
            Verdict::Migrate(hash) => {
                match self
                    .store
                    .replace_key_hash(&key.key_id, &record.secret_hash, &hash)
                    .await
                {
                    Ok(true) => {
                        info!(key_id = %key.key_id, "API key hash migrated from Argon2id to HMAC-SHA256")
                    }
                    Ok(false) => {}
                    Err(err) => {
                        warn!(key_id = %key.key_id, error = %err, "API key hash not migrated; it will be on its next use")
                    }
                }
                true
            }
            Verdict::Invalid => false,
            Verdict::Busy => return Err(ApiError::Busy("API key verification is busy")),
        };
        if verified && live {
            call.by(&record.principal);
            // A principal bound to client certificates must present one of them (mutual
            // TLS): a stolen key alone is not enough.
            let bound = &record.bound_certificates;
            if !bound.is_empty() && !certificate.is_some_and(|c| bound.iter().any(|b| b == c)) {
                return Err(AuthError::CertificateMismatch.into());
            }
            Ok(record.principal)
        } else {
            Err(AuthError::InvalidKey.into())
        }
    }

    /// Authenticates and requires `role`.
    pub async fn authorize<T>(
        &self,
        request: &tonic::Request<T>,
        role: Role,
        call: &mut Call,
    ) -> Result<Principal, ApiError> {
        let principal = self.authenticate(request, call).await?;
        principal.require_role(role)?;
        Ok(principal)
    }

    /// Resolves a registry named in a request and checks the caller may act on it.
    /// A malformed code is a field violation; an unknown one NOT_FOUND.
    pub async fn registry_for(
        &self,
        call: &mut Call,
        principal: &Principal,
        code: &str,
        field: &str,
    ) -> Result<Registry, ApiError> {
        let code = RegistryCode::parse(code).map_err(|e| {
            let mut v = FieldViolations::new();
            v.push(field, e.to_string());
            ApiError::Invalid(v)
        })?;
        call.registry(code.as_str());
        let registry = self
            .store
            .registry_by_code(code.as_str())
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("no registry {}", code.as_str())))?;
        principal.require_registry(registry.id, &registry.code)?;
        Ok(registry)
    }
}

/// The fingerprint of the client certificate of the request's connection (mutual TLS).
pub fn client_certificate<T>(request: &tonic::Request<T>) -> Option<String> {
    let certs = request.peer_certs()?;
    certs
        .first()
        .map(|c| crate::auth::certificate_fingerprint(c))
}

/// Parses a pseudonym of `registry`; one of another registry is a field violation.
pub fn parse_pseudonym(text: &str, registry: &Registry) -> Result<Pseudonym, ApiError> {
    let mut v = FieldViolations::new();
    match Pseudonym::parse(text) {
        Ok(p) if i64::from(p.registry_seq()) == registry.id => return Ok(p),
        Ok(_) => v.push("pseudonym", "belongs to another registry"),
        Err(e) => v.push("pseudonym", e.to_string()),
    }
    Err(ApiError::Invalid(v))
}

/// The key reference of a registry for pseudonym derivation.
pub fn registry_ref(registry: &Registry) -> Result<RegistryRef<'_>, ApiError> {
    let corrupt = || ApiError::Internal(StoreError::Corrupt("registry numbering".into()));
    Ok(RegistryRef {
        seq: u16::try_from(registry.id).map_err(|_| corrupt())?,
        code: &registry.code,
        key_version: u16::try_from(registry.active_key_version).map_err(|_| corrupt())?,
    })
}

/// Overwrites the identifier strings of a request in place.
pub fn zeroize_identifiers(patient: &mut Option<crate::proto::PatientIdentifiers>) {
    if let Some(p) = patient.as_mut() {
        match p.kind.as_mut() {
            Some(crate::proto::patient_identifiers::Kind::National(n)) => {
                n.value.zeroize();
                n.issuing_country.zeroize();
            }
            Some(crate::proto::patient_identifiers::Kind::Demographic(d)) => {
                d.given_names.zeroize();
                d.family_name.zeroize();
                d.date_of_birth.zeroize();
                d.place_of_birth.zeroize();
                d.country_of_birth.zeroize();
            }
            None => {}
        }
    }
    *patient = None;
}

/// The per-item outcome of a bulk call: the status a unary call would get.
pub fn rejection(err: ApiError) -> crate::proto::Rejection {
    let code = err.code() as i32;
    let field_violations = match &err {
        ApiError::Invalid(v) => v
            .iter()
            .map(|v| crate::proto::FieldViolation {
                field: v.field.clone(),
                description: v.description.clone(),
            })
            .collect(),
        _ => Vec::new(),
    };
    // The same message the unary call would carry (internal errors get logged there).
    let message = Status::from(err).message().to_owned();
    crate::proto::Rejection {
        code,
        message,
        field_violations,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_writer_audits_the_status_the_client_gets() {
        let errors = [
            WriteError::AlreadyExists,
            WriteError::NotFound,
            WriteError::VersionConflict { current: 2 },
            WriteError::Store(StoreError::Corrupt("x".into())),
            WriteError::ShuttingDown,
            WriteError::UseWithdrawal,
        ];
        for e in errors {
            let code = e.code();
            assert_eq!(ApiError::from(e).code(), code);
        }
    }
}
