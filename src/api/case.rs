//! `CaseService`: physicians submit, update and read back their own centre's cases.
//!
//! A submission is handled in this order: authenticate; require the physician role and a
//! registry of the centre's ERNs; convert the whole request to domain types (reporting all
//! violations at once); derive the pseudonym (only now, for an authorised and valid
//! request); hand the write to the writer, which checks consent and commits durably
//! before we answer. The identifiers of the request are wiped when their message is
//! dropped (`ZeroizeOnDrop`, set in build.rs), whichever way the call ends; a handler
//! drops them as soon as they are parsed, so they never wait for the writer.

use std::pin::Pin;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use tokio::sync::mpsc;
use tokio_stream::{Stream, StreamExt, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming};
use tonic_types::StatusExt;

use super::convert::timestamp_to_proto;
use zeroize::Zeroize;

use super::{SharedState, audited, authorize, client_certificate, convert, phenopacket, rejection};
use crate::auth::{PresentedKey, Principal, Role};
use crate::connections::OnConnectionKeyed;
use crate::consent::ConsentDecision;
use crate::domain::{CaseRecord, ClientReference, FieldViolations};
use crate::outcome::Outcome;
use crate::proto::{self, case_service_server::CaseService};
use crate::pseudonym::PatientIdentity;
use crate::ratelimit::{Limit, RateLimited};
use crate::service::{Call, Running, ServiceError, Turns, cases, parse_pseudonym};

/// Submissions of one bulk stream processed concurrently (results stay in order).
const BULK_IN_FLIGHT: usize = 64;

/// The `ErrorInfo` reason of an export page refused because its first phenopacket alone
/// is over the message limit (its metadata's `page_token` goes on after that case).
pub const OVER_MESSAGE_LIMIT: &str = "PHENOPACKET_OVER_MESSAGE_LIMIT";

/// What a bulk stream is waiting for: items read whose result has not been sent yet, and
/// when it last read an item or sent a result. The stream is idle (its client's turn)
/// only while no result is owed.
struct StreamActivity {
    unanswered: std::sync::atomic::AtomicUsize,
    last: std::sync::Mutex<tokio::time::Instant>,
}

impl StreamActivity {
    fn new() -> Self {
        StreamActivity {
            unanswered: 0.into(),
            last: std::sync::Mutex::new(tokio::time::Instant::now()),
        }
    }

    fn touch(&self) {
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = tokio::time::Instant::now();
    }

    fn read_one(&self) {
        self.unanswered
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.touch();
    }

    fn answered_one(&self) {
        self.touch();
        self.unanswered
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// When the stream has been idle for `limit`, if nothing changes before then.
    fn idle_deadline(&self, limit: std::time::Duration) -> tokio::time::Instant {
        let last = *self.last.lock().unwrap_or_else(|e| e.into_inner());
        let owed = self.unanswered.load(std::sync::atomic::Ordering::SeqCst) > 0;
        // While a result is owed the server is the one to move: look again later.
        if owed {
            tokio::time::Instant::now() + limit
        } else {
            last + limit
        }
    }

    /// The next item of `input`; `None` when the stream has been idle for `limit` (no item
    /// read and no result owed).
    async fn next<S: Stream + Unpin>(
        &self,
        input: &mut S,
        limit: std::time::Duration,
    ) -> Option<Option<S::Item>> {
        let next = input.next();
        tokio::pin!(next);
        loop {
            let deadline = self.idle_deadline(limit);
            tokio::select! {
                // An item that has come wins over a deadline passing at the same time.
                biased;
                item = &mut next => return Some(item),
                () = tokio::time::sleep_until(deadline) => {
                    if self.idle_deadline(limit) <= tokio::time::Instant::now() {
                        return None;
                    }
                }
            }
        }
    }
}

pub struct CaseApi {
    state: SharedState,
}

impl CaseApi {
    pub fn new(state: SharedState) -> Self {
        CaseApi { state }
    }
}

fn parse_record(
    record: Option<&proto::CaseRecord>,
    now: DateTime<Utc>,
    violations: &mut FieldViolations,
) -> Option<CaseRecord> {
    match record {
        None => {
            violations.push("record", "is required");
            None
        }
        Some(r) => match convert::case_record(r, now.date_naive()) {
            Ok(record) => Some(record),
            Err(v) => {
                violations.extend(v.nest("record"));
                None
            }
        },
    }
}

fn parse_consent(
    items: &[proto::ScopeConsent],
    now: DateTime<Utc>,
    violations: &mut FieldViolations,
) -> Vec<crate::consent::ConsentDecision> {
    match convert::attestation(items, now) {
        Ok(c) => c,
        Err(v) => {
            violations.extend(v);
            Vec::new()
        }
    }
}

/// Converts and checks a submission's identifiers, record, consent attestation and client
/// reference, reporting every field violation at once. The one check of a submission:
/// the server runs it on every item, and `ern-registry upload` (`crate::upload`) on every
/// line of a file before anything is sent.
pub fn parse_submission(
    request: &proto::SubmitCaseRequest,
    now: DateTime<Utc>,
) -> Result<(PatientIdentity, CaseRecord, Vec<ConsentDecision>), FieldViolations> {
    parse_parts(
        request.patient.as_ref(),
        |violations| parse_record(request.record.as_ref(), now, violations),
        &request.consent,
        &request.client_reference,
        now,
    )
}

/// [`parse_submission`] with the record parsed by `record` (which reports its own
/// violations): the identifiers first, then the record, the consent attestation and the
/// client reference.
fn parse_parts(
    patient: Option<&proto::PatientIdentifiers>,
    record: impl FnOnce(&mut FieldViolations) -> Option<CaseRecord>,
    consent: &[proto::ScopeConsent],
    client_reference: &str,
    now: DateTime<Utc>,
) -> Result<(PatientIdentity, CaseRecord, Vec<ConsentDecision>), FieldViolations> {
    let mut violations = FieldViolations::new();
    let identity = match patient {
        None => {
            violations.push("patient", "is required");
            None
        }
        Some(p) => match crate::api::convert::patient_identity(p) {
            Ok(identity) => Some(identity),
            Err(v) => {
                violations.extend(v.nest("patient"));
                None
            }
        },
    };
    let record = record(&mut violations);
    let consent = parse_consent(consent, now, &mut violations);
    violations.check("client_reference", ClientReference::parse(client_reference));
    match (identity, record) {
        (Some(identity), Some(record)) if violations.is_empty() => Ok((identity, record, consent)),
        _ => Err(violations),
    }
}

/// Reads, maps and checks a phenopacket's JSON text as the record of a submission: the
/// schema's JSON form, every element the record cannot hold, then the record's own
/// checks, each violation named by the phenopacket's JSON path. Returns the paths too,
/// for what the code releases find later. `ern-registry upload` runs it on every line of
/// a phenopacket file before anything is sent.
pub fn parse_phenopacket(
    json: &str,
    now: DateTime<Utc>,
    violations: &mut FieldViolations,
) -> Option<(CaseRecord, phenopacket::Mapped)> {
    let mut parsed = match phenopacket::parse_json(json) {
        Ok(parsed) => parsed,
        Err(v) => {
            violations.extend(v);
            return None;
        }
    };
    let mapped = phenopacket::to_record(&parsed);
    // The ignored elements that may name the patient are overwritten here.
    parsed.id.zeroize();
    if let Some(subject) = parsed.subject.as_mut() {
        subject.id.zeroize();
        subject.alternate_ids.zeroize();
    }
    let mapped = match mapped {
        Ok(mapped) => mapped,
        Err(v) => {
            violations.extend(v);
            return None;
        }
    };
    match convert::case_record(&mapped.record, now.date_naive()) {
        Ok(record) => Some((record, mapped)),
        Err(v) => {
            violations.extend(mapped.rename(&v.nest("record")));
            None
        }
    }
}

/// One submission, start to finish, for an already authenticated physician.
async fn submit_one(
    state: &SharedState,
    principal: &Principal,
    mut request: proto::SubmitCaseRequest,
    call: &mut Call,
) -> Result<proto::SubmitCaseResponse, ServiceError> {
    let access = cases::open(state, principal, &request.registry, "registry", call).await?;
    let parsed = parse_submission(&request, state.clock.now());
    // Parsed (and normalised into the identity, itself wiped on drop): the identifiers of
    // the request are overwritten here, not when the submission is done.
    drop(request.patient.take());
    let (identity, record, consent) = parsed?;
    let submission = cases::Submission {
        identity,
        record,
        consent,
    };
    let stored = cases::submit(state, &access, submission, call).await?;
    Ok(proto::SubmitCaseResponse {
        pseudonym: stored.pseudonym.as_str().to_owned(),
        version: stored.version as u32,
        recorded_at: Some(timestamp_to_proto(stored.recorded_at)),
        replaced_codes: convert::replacements_to_proto(&stored.replaced, "record"),
        code_releases: stored.code_releases,
    })
}

type ResultStream = Pin<Box<dyn Stream<Item = Result<proto::SubmitCasesResult, Status>> + Send>>;

/// A stream of results that tells its producer to start when it is first polled: tonic
/// polls a response's stream only once the handler has answered, so work that must
/// follow the handler's audit entry waits for this.
struct StartedOnPoll<S> {
    inner: S,
    go: Option<tokio::sync::oneshot::Sender<()>>,
}

impl<S: Stream + Unpin> Stream for StartedOnPoll<S> {
    type Item = S::Item;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<S::Item>> {
        if let Some(go) = self.go.take() {
            let _ = go.send(());
        }
        Pin::new(&mut self.inner).poll_next(cx)
    }
}

impl CaseApi {
    async fn submit_case_inner(
        &self,
        request: Request<proto::SubmitCaseRequest>,
        call: &mut Call,
    ) -> Result<Response<proto::SubmitCaseResponse>, Status> {
        let principal = authorize(&self.state, &request, Role::Physician, call).await?;
        let response = submit_one(&self.state, &principal, request.into_inner(), call).await?;
        Ok(Response::new(response))
    }

    async fn submit_cases_inner(
        &self,
        request: Request<Streaming<proto::SubmitCaseRequest>>,
        call: &mut Call,
    ) -> Result<Response<ResultStream>, Status> {
        let principal = authorize(&self.state, &request, Role::Physician, call).await?;
        principal.require_centre().map_err(ServiceError::from)?;
        // An open stream is one of the principal's calls in flight until its input ends.
        let permit = call.take_permit();
        let peer = call.peer();
        let max_invalid = self.state.max_stream_invalid_items;
        let idle_timeout = self.state.stream_idle_timeout;
        // The key is checked again for every item, so that a key revoked (or expired,
        // or its principal disabled) while the stream is open stops it at the next item.
        let key =
            Arc::new(PresentedKey::from_metadata(request.metadata()).map_err(ServiceError::from)?);
        let certificate: Arc<Option<String>> = Arc::new(client_certificate(&request));
        // Each item authenticated keeps the connection's place at the cap on connections.
        let connection = OnConnectionKeyed::of(request.extensions());
        let mut input = request.into_inner();
        let principal_id = principal.id;
        let state = self.state.clone();
        // Submissions are processed concurrently, at most BULK_IN_FLIGHT at a time (a slot
        // is taken before an item's task starts and given back when it ends); their
        // results leave in the order the submissions came.
        let slots = Arc::new(tokio::sync::Semaphore::new(BULK_IN_FLIGHT));
        // An error that ends the input goes the same way, after the results before it.
        let (pending_tx, mut pending_rx) = mpsc::channel::<
            Result<(u64, String, tokio::task::JoinHandle<_>), Status>,
        >(BULK_IN_FLIGHT);
        let (out_tx, out_rx) = mpsc::channel(BULK_IN_FLIGHT);
        let activity = Arc::new(StreamActivity::new());
        let answered = activity.clone();
        // Nothing is read before the stream's opening is recorded: the results are
        // polled only once this handler's answer (after its audit entry) went out. A
        // stream whose entry could not be committed is answered UNAVAILABLE and stores
        // nothing of what it sent.
        let (go, started) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let _permit = permit;
            if started.await.is_err() {
                return;
            }
            let mut sequence = 0u64;
            // The items' writes reach the writer in the stream's order (`Turn`).
            let mut turns = Turns::default();
            loop {
                // A stream that sends nothing for the call deadline, while it waits for no
                // result, is ended: an open stream holds one of the principal's calls in
                // flight and its connection.
                let next = tokio::select! {
                    next = activity.next(&mut input, idle_timeout) => next,
                    // The results have stopped (ended early): nothing more is read.
                    () = pending_tx.closed() => break,
                };
                let item = match next {
                    Some(Some(Ok(item))) => item,
                    Some(None) => break,
                    Some(Some(Err(status))) => {
                        let _ = pending_tx.send(Err(status)).await;
                        break;
                    }
                    None => {
                        metrics::counter!("ern_rate_limited_total", "limit" => "stream_idle")
                            .increment(1);
                        let _ = pending_tx
                            .send(Err(Status::deadline_exceeded(format!(
                                "no item for {} s: the stream is ended (every item sent before has its result above)",
                                idle_timeout.as_secs()
                            ))))
                            .await;
                        break;
                    }
                };
                let reference = match ClientReference::parse(&item.client_reference) {
                    Ok(r) => r.as_str().to_owned(),
                    Err(_) => String::new(),
                };
                // The principal's share of items in progress, across its streams: the
                // next item is not read until one of them finishes.
                let item_permit = state.stream_items.enter(principal_id).await;
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    break;
                };
                let state = state.clone();
                let key = key.clone();
                let certificate = certificate.clone();
                let connection = connection.clone();
                let turn = turns.next_turn();
                let handle = tokio::spawn(async move {
                    let _item_permit = item_permit;
                    let _slot = slot;
                    // Each item is audited on its own, with the write it makes (an item
                    // stopped before its write, as CANCELLED: `Running`).
                    let mut running = Running::new(&state, Call::new("CaseService/SubmitCases"));
                    running.call().from_peer(peer);
                    running.call().in_turn(turn);
                    let result = match state
                        .authenticate_key(&key, certificate.as_ref().as_deref(), running.call())
                        .await
                    {
                        Ok(principal) => {
                            if let Some(connection) = &connection {
                                connection.authenticated(principal.id);
                            }
                            submit_one(&state, &principal, item, running.call()).await
                        }
                        // `item` is dropped unread; its identifiers are wiped with it.
                        Err(e) => Err(e),
                    };
                    running.call().end_turn();
                    let code = result
                        .as_ref()
                        .map_or_else(ServiceError::outcome, |_| Outcome::Ok);
                    match state.record(running.finish(), code).await {
                        Err(_) if result.is_ok() => Err(ServiceError::Unavailable),
                        _ => result,
                    }
                });
                activity.read_one();
                if let Err(mpsc::error::SendError(Ok((_, _, handle)))) =
                    pending_tx.send(Ok((sequence, reference, handle))).await
                {
                    // The results have stopped (ended early): so does this item.
                    handle.abort();
                    break;
                }
                sequence += 1;
            }
        });
        // Results leave in order; a stream that has sent `max_invalid` invalid items is
        // ended (RESOURCE_EXHAUSTED), so that an endless stream of garbage stops costing a
        // key check and an audit entry per item.
        tokio::spawn(async move {
            let mut invalid = 0u32;
            while let Some(pending) = pending_rx.recv().await {
                let (sequence, client_reference, handle) = match pending {
                    Ok(item) => item,
                    Err(status) => {
                        let _ = out_tx.send(Err(status)).await;
                        break;
                    }
                };
                let outcome = match handle.await {
                    Ok(Ok(accepted)) => proto::submit_cases_result::Outcome::Accepted(accepted),
                    Ok(Err(err)) => {
                        if is_invalid_item(&err) {
                            invalid += 1;
                        }
                        proto::submit_cases_result::Outcome::Rejected(rejection(err))
                    }
                    Err(_) => proto::submit_cases_result::Outcome::Rejected(rejection(
                        ServiceError::Unavailable,
                    )),
                };
                let result = proto::SubmitCasesResult {
                    sequence,
                    client_reference,
                    outcome: Some(outcome),
                };
                if out_tx.send(Ok(result)).await.is_err() {
                    break;
                }
                answered.answered_one();
                if invalid >= max_invalid {
                    metrics::counter!("ern_rate_limited_total", "limit" => "stream_invalid_items")
                        .increment(1);
                    let limited = RateLimited {
                        limit: Limit::StreamInvalidItems { max: max_invalid },
                        retry_after: std::time::Duration::from_secs(1),
                    };
                    let _ = out_tx.send(Err(ServiceError::from(limited).into())).await;
                    break;
                }
            }
            // Ended early (the invalid-items limit, or the client went away): the items
            // already read are stopped where they stand. One whose write had reached the
            // writer is still stored, with its audit entry; its result is not sent.
            pending_rx.close();
            while let Some(pending) = pending_rx.recv().await {
                if let Ok((_, _, handle)) = pending {
                    handle.abort();
                }
            }
        });
        Ok(Response::new(Box::pin(StartedOnPoll {
            inner: ReceiverStream::new(out_rx),
            go: Some(go),
        })))
    }

    async fn submit_phenopacket_inner(
        &self,
        request: Request<proto::SubmitPhenopacketRequest>,
        call: &mut Call,
    ) -> Result<Response<proto::SubmitCaseResponse>, Status> {
        let principal = authorize(&self.state, &request, Role::Physician, call).await?;
        let mut req = request.into_inner();
        let access = cases::open(&self.state, &principal, &req.registry, "registry", call).await?;
        let now = self.state.clock.now();
        let mut paths = None;
        let parsed = parse_parts(
            req.patient.as_ref(),
            |violations| {
                let (record, mapped) = parse_phenopacket(&req.phenopacket, now, violations)?;
                paths = Some(mapped);
                Some(record)
            },
            &req.consent,
            &req.client_reference,
            now,
        );
        // As in SubmitCase: the identifiers (and the phenopacket's text, whose subject
        // the client may have filled) are overwritten as soon as they are parsed.
        drop(req.patient.take());
        req.phenopacket.zeroize();
        let (identity, record, consent) = parsed.map_err(ServiceError::from)?;
        let paths = paths.expect("a parsed record has its paths");
        let submission = cases::Submission {
            identity,
            record,
            consent,
        };
        let stored = cases::submit(&self.state, &access, submission, call)
            .await
            .map_err(|e| match e {
                ServiceError::Invalid(v) => ServiceError::Invalid(paths.rename(&v)),
                e => e,
            })?;
        let mut replaced_codes = convert::replacements_to_proto(&stored.replaced, "record");
        for replaced in &mut replaced_codes {
            replaced.field = paths.path_of(&replaced.field);
        }
        Ok(Response::new(proto::SubmitCaseResponse {
            pseudonym: stored.pseudonym.as_str().to_owned(),
            version: stored.version as u32,
            recorded_at: Some(timestamp_to_proto(stored.recorded_at)),
            replaced_codes,
            code_releases: stored.code_releases,
        }))
    }

    async fn export_phenopackets_inner(
        &self,
        request: Request<proto::ExportPhenopacketsRequest>,
        call: &mut Call,
    ) -> Result<Response<proto::ExportPhenopacketsResponse>, Status> {
        let principal = authorize(&self.state, &request, Role::Physician, call).await?;
        let req = request.into_inner();
        let access = cases::open(&self.state, &principal, &req.registry, "registry", call).await?;
        let mut violations = FieldViolations::new();
        let page_size = match req.page_size {
            0 => cases::EXPORT_PAGE_DEFAULT,
            n if n <= cases::EXPORT_PAGE_MAX => n,
            _ => {
                violations.push(
                    "page_size",
                    format!("must be at most {}", cases::EXPORT_PAGE_MAX),
                );
                cases::EXPORT_PAGE_DEFAULT
            }
        };
        let mut after = String::new();
        if !req.page_token.is_empty() {
            match parse_pseudonym(&req.page_token, access.registry()) {
                Ok(p) => after = p.as_str().to_owned(),
                Err(_) => violations.push(
                    "page_token",
                    "is not a next_page_token of an export of this registry",
                ),
            }
        }
        violations.into_result().map_err(ServiceError::from)?;
        let page = cases::export(&self.state, &access, &after, page_size, call).await?;
        let catalog = self.state.codes.get();
        // The page ends early where the next phenopacket would take the answer past the
        // message limit (a case's phenopacket can be ten times its record): the answer
        // is sent, with the token of its last case, and no page larger than the limit is
        // built. A first phenopacket over the limit alone is refused by `within_limit`.
        let max = self.state.max_message_bytes;
        // Each phenopacket's field, and the token's: the last case's pseudonym when more
        // follow, else nothing (the answer's exact size: until 2026-12-07 the token was
        // taken as 130 bytes, and a phenopacket within 87 bytes of the limit was refused,
        // a re-check found).
        let field = |n: usize| 1 + prost::encoding::encoded_len_varint(n as u64) as usize + n;
        let token = |i: usize| {
            if page.more || i + 1 < page.cases.len() {
                field(page.cases[i].pseudonym.len())
            } else {
                0
            }
        };
        let mut size = 0;
        let mut phenopackets = Vec::new();
        for (i, case) in page.cases.iter().enumerate() {
            let context = phenopacket::ExportContext {
                pseudonym: &case.pseudonym,
                recorded_at: case.version.recorded_at,
                recorded_by: &case.version.recorded_by,
                centre: access.centre_code(),
                code_releases: case.version.code_releases.as_deref(),
                catalog: Some(&catalog),
            };
            let record = convert::case_record_to_proto(&case.version.record);
            let json = phenopacket::to_json(&phenopacket::from_record(&record, &context));
            let with_it = size + field(json.len());
            if with_it + token(i) > max && !phenopackets.is_empty() {
                break;
            }
            size = with_it;
            phenopackets.push(json);
        }
        let sent = phenopackets.len();
        if sent > 0 {
            size += token(sent - 1);
        }
        // (`size` is the answer's with what it holds: a first phenopacket that fits, the
        // next not, makes a page of one, not a refusal; until 2026-12-07 the refusal
        // named the case that fitted, a claims audit found.)
        if sent == 1 && size > max {
            // One phenopacket over the limit on its own: the page cannot hold it, and a
            // smaller page would not help. The answer names the case (the caller's own
            // centre's), so that the export can go on past it and the case be read with
            // GetCase.
            call.items(0);
            let first = &page.cases[0].pseudonym;
            // Told from a rate limit (RetryInfo, worth a retry) by its details: a retry
            // would get the same answer (the Python client raises `TooLarge`).
            let mut details = tonic_types::ErrorDetails::with_error_info(
                OVER_MESSAGE_LIMIT,
                "ern-registry",
                [("page_token".to_owned(), first.clone())],
            );
            details.set_resource_info(
                "case",
                first.clone(),
                req.registry.clone(),
                "its phenopacket alone is over the message limit",
            );
            return Err(Status::with_error_details(
                tonic::Code::ResourceExhausted,
                format!(
                    "the phenopacket of case {first} alone would make an answer of about \
                     {size} bytes, over the message limit of {max} bytes \
                     (--max-message-bytes): read that case with GetCase, and go on with \
                     page_token = \"{first}\" to export the cases after it, or raise the limit"
                ),
                details,
            ));
        }
        call.items(sent);
        let more = page.more || sent < page.cases.len();
        let next_page_token = match page.cases.get(sent.wrapping_sub(1)) {
            Some(last) if more => last.pseudonym.clone(),
            _ => String::new(),
        };
        Ok(Response::new(proto::ExportPhenopacketsResponse {
            phenopackets,
            next_page_token,
        }))
    }

    async fn get_case_inner(
        &self,
        request: Request<proto::GetCaseRequest>,
        call: &mut Call,
    ) -> Result<Response<proto::GetCaseResponse>, Status> {
        let principal = authorize(&self.state, &request, Role::Physician, call).await?;
        let req = request.into_inner();
        let access = cases::open(&self.state, &principal, &req.registry, "registry", call).await?;
        let pseudonym = parse_pseudonym(&req.pseudonym, access.registry())?;
        let case = cases::get(&self.state, &access, pseudonym, req.include_history).await?;
        let mut versions: Vec<proto::CaseVersion> = case
            .versions
            .iter()
            .map(|v| proto::CaseVersion {
                version: v.version as u32,
                recorded_at: Some(timestamp_to_proto(v.recorded_at)),
                recorded_by: v.recorded_by.clone(),
                record: Some(convert::case_record_to_proto(&v.record)),
                code_releases: v.code_releases.clone().unwrap_or_default(),
            })
            .collect();
        let current = versions.pop();
        Ok(Response::new(proto::GetCaseResponse {
            case: Some(proto::Case {
                registry: access.registry().code.clone(),
                pseudonym: case.pseudonym.as_str().to_owned(),
                centre: case.centre_code,
                country: case.country,
                current,
                history: versions,
            }),
        }))
    }

    async fn update_case_inner(
        &self,
        request: Request<proto::UpdateCaseRequest>,
        call: &mut Call,
    ) -> Result<Response<proto::UpdateCaseResponse>, Status> {
        let principal = authorize(&self.state, &request, Role::Physician, call).await?;
        let req = request.into_inner();
        let access = cases::open(&self.state, &principal, &req.registry, "registry", call).await?;
        let mut violations = FieldViolations::new();
        let pseudonym = match parse_pseudonym(&req.pseudonym, access.registry()) {
            Ok(p) => Some(p),
            Err(ServiceError::Invalid(v)) => {
                violations.extend(v);
                None
            }
            Err(e) => return Err(e.into()),
        };
        if req.expected_version == 0 {
            violations.push(
                "expected_version",
                "is required: the version the update is based on",
            );
        }
        let now = self.state.clock.now();
        let record = parse_record(req.record.as_ref(), now, &mut violations);
        let consent = parse_consent(&req.consent, now, &mut violations);
        let (Some(pseudonym), Some(record)) = (pseudonym, record) else {
            return Err(ServiceError::Invalid(violations).into());
        };
        violations.into_result().map_err(ServiceError::from)?;
        let update = cases::Update {
            pseudonym,
            expected_version: i64::from(req.expected_version),
            record,
            consent,
        };
        let stored = cases::update(&self.state, &access, update, call).await?;
        Ok(Response::new(proto::UpdateCaseResponse {
            pseudonym: stored.pseudonym.as_str().to_owned(),
            version: stored.version as u32,
            recorded_at: Some(timestamp_to_proto(stored.recorded_at)),
            replaced_codes: convert::replacements_to_proto(&stored.replaced, "record"),
            code_releases: stored.code_releases,
        }))
    }
}

#[tonic::async_trait]
impl CaseService for CaseApi {
    type SubmitCasesStream = ResultStream;

    async fn submit_case(
        &self,
        request: Request<proto::SubmitCaseRequest>,
    ) -> Result<Response<proto::SubmitCaseResponse>, Status> {
        audited!(self, "CaseService/SubmitCase", submit_case_inner, request)
    }

    async fn submit_cases(
        &self,
        request: Request<Streaming<proto::SubmitCaseRequest>>,
    ) -> Result<Response<Self::SubmitCasesStream>, Status> {
        audited!(stream self, "CaseService/SubmitCases", submit_cases_inner, request)
    }

    async fn get_case(
        &self,
        request: Request<proto::GetCaseRequest>,
    ) -> Result<Response<proto::GetCaseResponse>, Status> {
        audited!(self, "CaseService/GetCase", get_case_inner, request)
    }

    async fn submit_phenopacket(
        &self,
        request: Request<proto::SubmitPhenopacketRequest>,
    ) -> Result<Response<proto::SubmitCaseResponse>, Status> {
        audited!(
            self,
            "CaseService/SubmitPhenopacket",
            submit_phenopacket_inner,
            request
        )
    }

    async fn export_phenopackets(
        &self,
        request: Request<proto::ExportPhenopacketsRequest>,
    ) -> Result<Response<proto::ExportPhenopacketsResponse>, Status> {
        audited!(
            self,
            "CaseService/ExportPhenopackets",
            export_phenopackets_inner,
            request
        )
    }

    async fn update_case(
        &self,
        request: Request<proto::UpdateCaseRequest>,
    ) -> Result<Response<proto::UpdateCaseResponse>, Status> {
        audited!(self, "CaseService/UpdateCase", update_case_inner, request)
    }
}

/// A rejection that says the item is unacceptable whatever is on file (malformed, not the
/// caller's to send, over a limit): what an endless stream of garbage gets.
fn is_invalid_item(err: &ServiceError) -> bool {
    matches!(
        err.outcome(),
        Outcome::InvalidArgument
            | Outcome::PermissionDenied
            | Outcome::NotFound
            | Outcome::Unauthenticated
            | Outcome::ResourceExhausted
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A bulk stream is idle only while no result is owed: a client waiting for its
    /// results is never ended for sending nothing, one owed nothing is.
    #[tokio::test]
    async fn a_stream_owed_a_result_is_not_idle() {
        let limit = Duration::from_millis(100);
        let activity = StreamActivity::new();
        let mut silent = tokio_stream::pending::<u32>();
        activity.read_one();
        // Ten limits pass with a result owed: still waiting for the client's next item.
        let waited = tokio::time::timeout(limit * 10, activity.next(&mut silent, limit)).await;
        assert!(waited.is_err(), "ended while a result was owed");
        // Answered: from then on the client's silence counts, and ends it.
        activity.answered_one();
        let ended =
            tokio::time::timeout(Duration::from_secs(30), activity.next(&mut silent, limit))
                .await
                .expect("ended after the limit");
        assert!(ended.is_none());
        // An item that comes is passed on.
        let mut one = tokio_stream::iter([7u32]);
        assert_eq!(activity.next(&mut one, limit).await, Some(Some(7)));
    }
}
