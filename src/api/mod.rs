//! The gRPC layer: thin handlers that read the caller's credentials, convert protobuf to
//! domain types, call the service layer (`crate::service`) and convert back.
//!
//! Every error of every handler passes through [`ServiceError`] and is mapped to a
//! `tonic::Status` in exactly one place ([`From<ServiceError> for Status`]), with the
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
pub mod convert;
pub mod drain;
pub mod json;
pub mod phenopacket;
pub mod research;
pub mod wire;

use std::sync::Arc;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};
use tracing::{error, warn};

use crate::auth::{PresentedKey, Principal, Role};
use crate::connections::Connections;
use crate::consent::InclusionRefused;
use crate::outcome::Outcome;
use crate::ratelimit::Peer;
use crate::service::{Call, Credentials, ServiceError, Services};

pub type SharedState = Arc<Services>;

impl From<ServiceError> for Status {
    fn from(err: ServiceError) -> Status {
        let code = code_of(err.outcome());
        match err {
            ServiceError::Invalid(violations) => {
                let mut details = ErrorDetails::new();
                for (field, description) in answered_violations(&violations) {
                    details.add_bad_request_violation(field, description);
                }
                let message = ServiceError::Invalid(violations).to_string();
                Status::with_error_details(code, message, details)
            }
            // One message and one detail, whatever is on file for the patient: said to a
            // physician, who must not learn from it whether a person refused, withdrew or
            // let consent expire (`InclusionRefused` carries no state to tell).
            ServiceError::MissingConsent(refused @ InclusionRefused) => Status::with_error_details(
                code,
                refused.to_string(),
                ErrorDetails::with_precondition_failure_violation(
                    "CONSENT",
                    "REGISTRY_INCLUSION",
                    refused.to_string(),
                ),
            ),
            ServiceError::CaseExists {
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
            ServiceError::RateLimited(limited) => Status::with_error_details(
                code,
                limited.to_string(),
                ErrorDetails::with_retry_info(Some(limited.retry_after)),
            ),
            ServiceError::Internal(crate::store::StoreError::CommitUnknown { ref cause }) => {
                static WARNING: crate::logging::Throttled = crate::logging::Throttled::new(
                    tracing::Level::WARN,
                    "outcome of a commit unknown",
                );
                if let Some(calls) = WARNING.due() {
                    warn!(error = %cause, calls, "outcome of a commit unknown (calls answered so since the last such line)");
                }
                Status::new(
                    Code::Unavailable,
                    "the write's commit failed without a final answer from the database: it \
                     may or may not be stored; read it back before sending it again",
                )
            }
            ServiceError::Internal(ref cause) if cause.is_unavailable() => {
                static WARNING: crate::logging::Throttled =
                    crate::logging::Throttled::new(tracing::Level::WARN, "database unreachable");
                if let Some(calls) = WARNING.due() {
                    warn!(error = %cause, calls, "database unreachable (calls answered so since the last such line)");
                }
                database_unreachable()
            }
            ServiceError::Internal(ref cause) => {
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

/// The violations an answer lists, as (field, description): those `violations` listed
/// (at most [`crate::domain::MAX_LISTED_VIOLATIONS`], of at most
/// [`crate::domain::MAX_LISTED_BYTES`]), then, when some were not, one more
/// entry under the first of their fields that says how many. The message counts them all.
fn answered_violations(
    violations: &crate::domain::FieldViolations,
) -> impl Iterator<Item = (String, String)> + '_ {
    let listed = violations
        .iter()
        .map(|v| (v.field.clone(), v.description.clone()));
    let rest = violations.omitted().map(|(field, omitted)| {
        (
            field.to_owned(),
            format!(
                "and {omitted} more invalid field(s) from here on, not listed (an answer lists \
                 at most {}, of at most {} bytes of paths and descriptions): fix those above \
                 and send again",
                crate::domain::MAX_LISTED_VIOLATIONS,
                crate::domain::MAX_LISTED_BYTES
            ),
        )
    });
    listed.chain(rest)
}

/// The answer to a call the database cannot serve now: UNAVAILABLE, with the time after
/// which a retry may succeed (gRPC `RetryInfo`: the probe's period).
pub fn database_unreachable() -> Status {
    Status::with_error_details(
        Code::Unavailable,
        "the database cannot serve calls now (unreachable, locked by another process, or its \
         disk full); retry in a moment",
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
/// A one-message answer over `--max-message-bytes` is refused here, so that the call's
/// entry records the refusal the caller gets (`stream`: a streaming answer, whose
/// messages are checked as they leave).
macro_rules! audited {
    ($self:ident, $method:literal, $inner:ident, $request:ident) => {
        $crate::api::audited!(@run $self, $method, $inner, $request, |answer, wrote| {
            $crate::api::within_limit(&$self.state, answer, wrote)
        })
    };
    (stream $self:ident, $method:literal, $inner:ident, $request:ident) => {
        $crate::api::audited!(@run $self, $method, $inner, $request, |answer, _| Ok(answer))
    };
    (@run $self:ident, $method:literal, $inner:ident, $request:ident, $check:expr) => {{
        // From here the call is the handler's to record, not the wire layer's.
        if let Some(seen) = $request.extensions().get::<$crate::api::wire::Seen>() {
            seen.mark();
        }
        // Dropped before it is concluded (the call abandoned), it records the call itself.
        let mut running =
            $crate::service::Running::new(&$self.state, $crate::service::Call::new($method));
        let result = if $self.state.database.is_reachable() {
            $self.$inner($request, running.call()).await
        } else {
            Err($crate::api::database_unreachable())
        };
        let wrote = running.call().wrote();
        let result = result.and_then(|answer| $check(answer, wrote));
        $crate::api::conclude(&$self.state, running.finish(), result).await
    }};
}
pub(crate) use audited;
/// `answer`, or RESOURCE_EXHAUSTED when its message is larger than `--max-message-bytes`
/// (the transport would refuse to send it, after the call was recorded as answered).
/// `wrote`: the call's change is committed (its entry with it), which the refusal says.
pub fn within_limit<T: prost::Message>(
    services: &Services,
    answer: tonic::Response<T>,
    wrote: bool,
) -> Result<tonic::Response<T>, Status> {
    let size = answer.get_ref().encoded_len();
    let max = services.max_message_bytes;
    if size <= max {
        return Ok(answer);
    }
    if wrote {
        // Not RESOURCE_EXHAUSTED, which clients retry as "nothing was done" (the Python
        // client does): OUT_OF_RANGE, tonic's own code for an answer over its limit.
        return Err(Status::out_of_range(format!(
            "the call's changes are committed (each result as it would have been \
             answered), but its answer would be {size} bytes, over the message limit of {max} \
             bytes (--max-message-bytes): do not send it again as if nothing was done; raise \
             the limit, or look the results up (a submission sent again is answered \
             ALREADY_EXISTS with its pseudonym)"
        )));
    }
    Err(Status::resource_exhausted(format!(
        "the answer would be {size} bytes, over the message limit of {max} bytes \
         (--max-message-bytes): ask for less (a smaller page, or no history)"
    )))
}

/// Appends the call's audit entry with its outcome, unless the writer appended it with
/// the change, and passes the result on. A successful call whose entry cannot be
/// committed fails: nothing is answered that the log does not show.
pub async fn conclude<T>(
    services: &Arc<Services>,
    call: Call,
    result: Result<tonic::Response<T>, Status>,
) -> Result<tonic::Response<T>, Status> {
    let outcome = match &result {
        Ok(_) => Outcome::Ok,
        Err(status) => outcome_of(status.code()),
    };
    // Counted with the outcome the caller gets (a call whose entry cannot be committed
    // fails): below, once that is known.
    let count = |method: &str, outcome: Outcome| {
        metrics::counter!(
            "ern_calls_total",
            "method" => method.to_owned(),
            "outcome" => outcome.name()
        )
        .increment(1);
    };
    // Nothing can be recorded while the database is away, and trying would hold the
    // refused caller until the pool gives up. (The wire layer counts it in the
    // per-address summary: it carries no `wire::AUDITED` mark.)
    if outcome == Outcome::Unavailable && !services.database.is_reachable() {
        count(call.method(), outcome);
        static WARNING: crate::logging::Throttled = crate::logging::Throttled::new(
            tracing::Level::WARN,
            "calls refused while the database is unreachable; not in the audit log",
        );
        if let Some(calls) = WARNING.due() {
            warn!(method = %call.method(), calls, "calls refused while the database is unreachable (since the last such line); not in the audit log");
        }
        return result;
    }
    let method = call.method().to_owned();
    let recorded = services.record(call, outcome).await;
    count(
        &method,
        match (&recorded, &result) {
            (Err(_), Ok(_)) => Outcome::Unavailable,
            _ => outcome,
        },
    );
    match recorded {
        Err(err) if result.is_ok() => {
            static WARNING: crate::logging::Throttled = crate::logging::Throttled::new(
                tracing::Level::ERROR,
                "audit entries not committed; the calls fail",
            );
            if let Some(calls) = WARNING.due() {
                error!(error = %err, calls, "audit entries not committed; the calls fail (since the last such line)");
            }
            Err(Status::unavailable(
                "the call could not be recorded in the audit log; retry later",
            ))
        }
        Err(err) => {
            // Unmarked: the wire layer counts it in the per-address summary instead.
            static WARNING: crate::logging::Throttled = crate::logging::Throttled::new(
                tracing::Level::WARN,
                "audit entries of failed calls not committed",
            );
            if let Some(calls) = WARNING.due() {
                warn!(error = %err, calls, "audit entries of failed calls not committed (since the last such line)");
            }
            result
        }
        // A failure recorded (or counted in the summary of refusals) is marked, so that the
        // wire layer does not count it again; the layer removes the mark.
        Ok(()) => result.map_err(|mut status| {
            status.metadata_mut().insert(
                wire::AUDITED,
                tonic::metadata::MetadataValue::from_static("1"),
            );
            status
        }),
    }
}

/// What the caller of `request` presents: its API key, the fingerprint of its client
/// certificate, its network peer.
pub fn credentials<T>(request: &tonic::Request<T>) -> Credentials {
    Credentials {
        key: PresentedKey::from_metadata(request.metadata()),
        certificate: client_certificate(request),
        peer: Peer::of(request.remote_addr()),
    }
}

/// Authenticates the caller of `request` ([`Services::authenticate`]). Its connection
/// then keeps its place at the cap on connections ([`Connections::key_holder`]).
pub async fn authenticate<T>(
    services: &Services,
    request: &tonic::Request<T>,
    call: &mut Call,
) -> Result<Principal, ServiceError> {
    let principal = services.authenticate(&credentials(request), call).await?;
    Connections::key_holder(request.extensions(), principal.id);
    Ok(principal)
}

/// Authenticates the caller of `request` and requires `role` (its connection then keeps
/// its place, as with [`authenticate`]).
pub async fn authorize<T>(
    services: &Services,
    request: &tonic::Request<T>,
    role: Role,
    call: &mut Call,
) -> Result<Principal, ServiceError> {
    let principal = services
        .authorize(&credentials(request), role, call)
        .await?;
    Connections::key_holder(request.extensions(), principal.id);
    Ok(principal)
}

/// The gRPC status code of an outcome.
pub fn code_of(outcome: Outcome) -> Code {
    Code::from(outcome.number())
}

/// The outcome of a gRPC status code.
pub fn outcome_of(code: Code) -> Outcome {
    Outcome::from_number(code as i32)
}

/// The fingerprint of the client certificate of the request's connection (mutual TLS).
pub fn client_certificate<T>(request: &tonic::Request<T>) -> Option<String> {
    let certs = request.peer_certs()?;
    certs
        .first()
        .map(|c| crate::auth::certificate_fingerprint(c))
}

/// The per-item outcome of a bulk call: the status a unary call would get.
pub fn rejection(err: ServiceError) -> crate::proto::Rejection {
    let code = err.outcome().number();
    let field_violations = match &err {
        ServiceError::Invalid(v) => answered_violations(v)
            .map(|(field, description)| crate::proto::FieldViolation { field, description })
            .collect(),
        _ => Vec::new(),
    };
    let existing_case = match &err {
        ServiceError::CaseExists { pseudonym, .. } => pseudonym.clone(),
        _ => String::new(),
    };
    // The same message the unary call would carry (internal errors get logged there).
    let message = Status::from(err).message().to_owned();
    crate::proto::Rejection {
        code,
        message,
        field_violations,
        existing_case,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_lists_at_most_so_many_violations_and_says_how_many_more() {
        let many = |n: usize| {
            let mut v = crate::domain::FieldViolations::new();
            for i in 0..n {
                v.push(format!("hpo_terms[{i}]"), "is not an HPO term");
            }
            ServiceError::Invalid(v)
        };
        let status = Status::from(many(1_536));
        assert!(
            status.message().contains("1536 invalid field(s)"),
            "{}",
            status.message()
        );
        let listed = status.get_details_bad_request().unwrap().field_violations;
        assert_eq!(listed.len(), crate::domain::MAX_LISTED_VIOLATIONS + 1);
        assert_eq!(listed[99].field, "hpo_terms[99]");
        assert_eq!(listed[100].field, "hpo_terms[100]");
        assert!(
            listed[100].description.starts_with("and 1436 more"),
            "{}",
            listed[100].description
        );
        let bulk = rejection(many(1_536));
        assert_eq!(
            bulk.field_violations.len(),
            crate::domain::MAX_LISTED_VIOLATIONS + 1
        );
        assert_eq!(
            bulk.field_violations[100].description,
            listed[100].description
        );
        // Up to the cap, every violation and nothing more.
        for n in [1, crate::domain::MAX_LISTED_VIOLATIONS] {
            let listed = Status::from(many(n))
                .get_details_bad_request()
                .unwrap()
                .field_violations;
            assert_eq!(listed.len(), n);
            assert!(listed.iter().all(|v| v.description == "is not an HPO term"));
        }
    }

    #[test]
    fn every_outcome_is_its_grpc_code_and_back() {
        for outcome in Outcome::ALL {
            assert_eq!(outcome_of(code_of(outcome)), outcome);
            assert_eq!(code_of(outcome) as i32, outcome.number());
        }
    }
}
