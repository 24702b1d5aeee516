//! The write path: group commit of concurrent submissions.
//!
//! Every write of clinical data or consent is a [`Command`] sent to a writer task. A
//! writer takes whatever has queued up (up to `max_batch`), applies it in one transaction,
//! commits (on SQLite with `synchronous = FULL`, so the commit is fsynced) and only then
//! answers each caller. Under load, one fsync covers hundreds of submissions; when idle,
//! a submission is committed alone at once, with no added latency.
//!
//! Commands are partitioned over writers by a hash of the patient (registry, pseudonym), so
//! all writes about one patient are applied in arrival order by one writer and never race
//! each other. SQLite allows one writer at a time, so it gets one partition; PostgreSQL
//! gets several.
//!
//! Each command checks everything that can refuse it (consent, existence, version) before
//! it writes anything, so a refused command needs no rollback. If the transaction fails
//! for a database reason, the batch is retried one command per transaction, so one bad
//! command cannot fail the others.
//!
//! A command that erased (a REGISTRY_INCLUSION withdrawal) is answered only after the
//! commit *and* a purge pass ([`super::purge`]): on SQLite a WAL checkpoint that takes the
//! erased bytes out of every database file. The other commands of its batch are answered
//! at the commit, as always.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use sqlx::AnyConnection;
use tokio::sync::{mpsc, oneshot};
use tracing::{error, warn};

use tonic::Code;

use super::audit as audit_store;
use super::cases::{self, CaseRow};
use super::consent::{self as consent_store, WithdrawalReason};
use super::millis;
use super::purge::{self, Purger};
use super::{Store, StoreError};
use crate::audit::{AuditKey, Entry, code_name};
use crate::consent::{
    self, ConsentDecision, ConsentEvent, Decision, InclusionRefused, Scope, Source,
};

/// Queue length per writer before senders wait (back-pressure).
const QUEUE_DEPTH: usize = 8192;

/// Stores a new case of a centre, with the physician's consent attestation.
#[derive(Debug, Clone)]
pub struct SubmitCase {
    pub registry_id: i64,
    pub pseudonym: String,
    pub centre_id: i64,
    pub principal_id: i64,
    pub consent: Vec<ConsentDecision>,
    pub row: CaseRow,
    pub now: DateTime<Utc>,
}

/// Stores a new version of an existing case of the centre.
#[derive(Debug, Clone)]
pub struct UpdateCase {
    pub registry_id: i64,
    pub pseudonym: String,
    pub centre_id: i64,
    pub principal_id: i64,
    pub expected_version: i64,
    pub consent: Vec<ConsentDecision>,
    pub row: CaseRow,
    pub now: DateTime<Utc>,
}

/// A consent officer's decisions (granted or refused) for one patient.
#[derive(Debug, Clone)]
pub struct RecordConsent {
    pub registry_id: i64,
    pub pseudonym: String,
    pub principal_id: i64,
    pub decisions: Vec<ConsentDecision>,
    pub now: DateTime<Utc>,
}

/// A consent officer's withdrawal, effective at `now`. Withdrawing REGISTRY_INCLUSION
/// erases the patient's record in the registry and leaves a tombstone with `receipt_id`.
#[derive(Debug, Clone)]
pub struct Withdraw {
    pub registry_id: i64,
    pub pseudonym: String,
    pub principal_id: i64,
    pub scopes: Vec<Scope>,
    pub reason: WithdrawalReason,
    pub receipt_id: String,
    pub now: DateTime<Utc>,
}

#[derive(Debug, Clone)]
pub enum Command {
    Submit(SubmitCase),
    Update(UpdateCase),
    RecordConsent(RecordConsent),
    Withdraw(Withdraw),
    /// Nothing to change: only the audit entry that comes with it (a read, a refusal).
    Audit,
}

impl Command {
    fn patient(&self) -> (i64, &str) {
        match self {
            Command::Submit(c) => (c.registry_id, &c.pseudonym),
            Command::Update(c) => (c.registry_id, &c.pseudonym),
            Command::RecordConsent(c) => (c.registry_id, &c.pseudonym),
            Command::Withdraw(c) => (c.registry_id, &c.pseudonym),
            Command::Audit => (0, ""),
        }
    }
}

/// What a committed case command stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    pub version: i64,
    pub recorded_at: DateTime<Utc>,
}

/// What a committed command did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    Case(Written),
    /// Ids of the consent events appended.
    Consent(Vec<i64>),
    /// Ids of the withdrawal events; (cases, versions) erased when REGISTRY_INCLUSION
    /// was withdrawn.
    Withdrawn {
        events: Vec<i64>,
        erased: Option<(i64, i64)>,
    },
    Audited,
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Consent(#[from] InclusionRefused),
    #[error("your centre already has a case for this patient in this registry")]
    AlreadyExists,
    #[error("no such case of your centre")]
    NotFound,
    #[error("the case is at version {current}, not the expected one")]
    VersionConflict { current: i64 },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the write queue is closed: the service is shutting down")]
    ShuttingDown,
    #[error(
        "the registry holds this patient's record: withdraw REGISTRY_INCLUSION instead (erases it, with a receipt)"
    )]
    UseWithdrawal,
}

impl WriteError {
    /// The status a client gets for this error (`api::ApiError` maps it the same way;
    /// a test holds them together). Recorded as the outcome of the audit entry.
    pub fn code(&self) -> Code {
        match self {
            WriteError::Consent(_) | WriteError::UseWithdrawal => Code::FailedPrecondition,
            WriteError::AlreadyExists => Code::AlreadyExists,
            WriteError::NotFound => Code::NotFound,
            WriteError::VersionConflict { .. } => Code::Aborted,
            WriteError::Store(_) => Code::Internal,
            WriteError::ShuttingDown => Code::Unavailable,
        }
    }
}

type Reply = oneshot::Sender<Result<Output, WriteError>>;

/// A command, the audit entry recording it (its outcome filled in by the writer), and
/// where to answer.
type Job = (Command, Option<Entry>, Reply);

/// The outcome of a job, ready to be answered.
struct Answer {
    reply: Reply,
    result: Result<Output, WriteError>,
    /// The receipt, when the command erased a record: answered only after a purge.
    erased: Option<String>,
}

impl Answer {
    fn new(command: &Command, reply: Reply, result: Result<Output, WriteError>) -> Answer {
        // Only a REGISTRY_INCLUSION withdrawal erases: RecordConsent refuses to end the
        // inclusion of a stored record (WriteError::UseWithdrawal), and expiry keeps it.
        let erased = match (command, &result) {
            (
                Command::Withdraw(w),
                Ok(Output::Withdrawn {
                    erased: Some(_), ..
                }),
            ) => Some(w.receipt_id.clone()),
            _ => None,
        };
        Answer {
            reply,
            result,
            erased,
        }
    }
}

/// Handle to the writer tasks; cheap to clone.
#[derive(Clone)]
pub struct Writer {
    queues: Vec<mpsc::Sender<Job>>,
}

impl Writer {
    /// Starts `partitions` writer tasks over `store`. They stop when every handle is
    /// dropped, after finishing what was queued.
    /// Audit entries are appended with the key `audit`.
    pub fn start(
        store: Store,
        partitions: usize,
        max_batch: usize,
        audit: Arc<AuditKey>,
    ) -> Writer {
        let partitions = partitions.max(1);
        let max_batch = max_batch.max(1);
        let purger = Arc::new(Purger::new(store.clone()));
        let queues = (0..partitions)
            .map(|_| {
                let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
                tokio::spawn(run(
                    store.clone(),
                    rx,
                    max_batch,
                    audit.clone(),
                    purger.clone(),
                ));
                tx
            })
            .collect();
        Writer { queues }
    }

    /// Applies a case command and waits until it is durably committed (or refused).
    pub async fn execute_case(
        &self,
        command: Command,
        audit: Option<Entry>,
    ) -> Result<Written, WriteError> {
        match self.execute(command, audit).await? {
            Output::Case(w) => Ok(w),
            _ => Err(WriteError::Store(StoreError::Corrupt(
                "writer answered a case command with another output".into(),
            ))),
        }
    }

    /// Applies `command` and waits until it is durably committed (or refused), together
    /// with its audit entry: the entry is appended in the same transaction, with the
    /// command's outcome, whether the command succeeds or is refused. A command that
    /// erased returns once the erased data is purged; if the purge cannot be confirmed
    /// (SQLite), it returns `StoreError::NotPurged` although the erasure is committed.
    pub async fn execute(
        &self,
        command: Command,
        audit: Option<Entry>,
    ) -> Result<Output, WriteError> {
        let (registry_id, pseudonym) = command.patient();
        let mut h = DefaultHasher::new();
        (registry_id, pseudonym).hash(&mut h);
        let queue = &self.queues[(h.finish() % self.queues.len() as u64) as usize];
        let (tx, rx) = oneshot::channel();
        queue
            .send((command, audit, tx))
            .await
            .map_err(|_| WriteError::ShuttingDown)?;
        rx.await.map_err(|_| WriteError::ShuttingDown)?
    }
}

async fn run(
    store: Store,
    mut rx: mpsc::Receiver<Job>,
    max_batch: usize,
    key: Arc<AuditKey>,
    purger: Arc<Purger>,
) {
    let mut batch: Vec<Job> = Vec::with_capacity(max_batch);
    loop {
        let received = if purger.is_pending() {
            // A purge could not complete: retry it when due, even while idle.
            match tokio::time::timeout(purge::RETRY_EVERY, rx.recv_many(&mut batch, max_batch))
                .await
            {
                Ok(n) => n,
                Err(_) => {
                    purger.retry(false).await;
                    continue;
                }
            }
        } else {
            rx.recv_many(&mut batch, max_batch).await
        };
        if received == 0 {
            break;
        }
        let jobs = std::mem::take(&mut batch);
        let answers = apply_jobs(&store, &key, jobs).await;
        deliver(&purger, answers).await;
        purger.retry(false).await;
    }
    // Shutting down: a last, full attempt at a purge still pending.
    purger.retry(true).await;
}

/// Applies the jobs in one transaction or, if that fails, one transaction each.
async fn apply_jobs(store: &Store, key: &AuditKey, jobs: Vec<Job>) -> Vec<Answer> {
    let commands: Vec<(&Command, Option<&Entry>)> =
        jobs.iter().map(|(c, a, _)| (c, a.as_ref())).collect();
    match apply_batch(store, key, &commands).await {
        Ok(results) => jobs
            .into_iter()
            .zip(results)
            .map(|((command, _, reply), result)| Answer::new(&command, reply, result))
            .collect(),
        Err(err) if jobs.len() == 1 => {
            error!(error = %err, "write failed");
            jobs.into_iter()
                .next()
                .map(|(command, _, reply)| {
                    Answer::new(&command, reply, Err(WriteError::Store(err)))
                })
                .into_iter()
                .collect()
        }
        Err(err) => {
            warn!(error = %err, batch = jobs.len(), "batch failed; retrying one by one");
            let mut answers = Vec::with_capacity(jobs.len());
            for (command, audit, reply) in jobs {
                let result = match apply_batch(store, key, &[(&command, audit.as_ref())]).await {
                    Ok(mut r) => r.pop().unwrap_or(Err(WriteError::ShuttingDown)),
                    Err(err) => {
                        error!(error = %err, "write failed");
                        Err(WriteError::Store(err))
                    }
                };
                answers.push(Answer::new(&command, reply, result));
            }
            answers
        }
    }
}

/// Answers every job: at once, except those that erased, which are answered after a purge
/// pass (with an error instead of their receipt if the pass could not purge).
async fn deliver(purger: &Purger, answers: Vec<Answer>) {
    let mut erasures = Vec::new();
    for answer in answers {
        if answer.erased.is_some() {
            erasures.push(answer);
        } else {
            let _ = answer.reply.send(answer.result);
        }
    }
    if erasures.is_empty() {
        return;
    }
    let receipts: Vec<String> = erasures.iter().filter_map(|a| a.erased.clone()).collect();
    let purged = purger.after_erasure(&receipts).await;
    for answer in erasures {
        let result = match &purged {
            Ok(()) => answer.result,
            Err(cause) => Err(WriteError::Store(StoreError::NotPurged {
                receipt: answer.erased.unwrap_or_default(),
                cause: cause.to_string(),
            })),
        };
        let _ = answer.reply.send(result);
    }
}

/// Applies commands in one transaction, with their audit entries appended at its end (so
/// the chain's lock is held only briefly). `Err` means the transaction failed as a whole
/// and nothing was committed, audit entries included; refusals of single commands are in
/// the `Ok` vector, and their entries record the refusal.
async fn apply_batch(
    store: &Store,
    key: &AuditKey,
    commands: &[(&Command, Option<&Entry>)],
) -> Result<Vec<Result<Output, WriteError>>, StoreError> {
    let mut tx = store.pool().begin().await?;
    let mut results = Vec::with_capacity(commands.len());
    let mut entries = Vec::new();
    for (command, audit) in commands {
        let result = match command {
            Command::Submit(c) => submit(&mut tx, c).await.map(Output::Case),
            Command::Update(c) => update(&mut tx, c).await.map(Output::Case),
            Command::RecordConsent(c) => record_consent(&mut tx, c).await,
            Command::Withdraw(c) => withdraw(&mut tx, c).await,
            Command::Audit => Ok(Output::Audited),
        };
        if let Some(entry) = audit {
            let outcome = match &result {
                Ok(_) => Code::Ok,
                Err(e) => e.code(),
            };
            let mut entry = (*entry).clone();
            // An entry that comes with a change records the change's outcome; one that
            // comes alone (Command::Audit) carries the outcome of its call already.
            if entry.outcome.is_empty() {
                entry.outcome = code_name(outcome).to_string();
            }
            entries.push((millis(Utc::now()), entry));
        }
        match result {
            Err(WriteError::Store(err)) => return Err(err),
            other => results.push(other),
        }
    }
    audit_store::append(&mut tx, key, &entries).await?;
    tx.commit().await?;
    Ok(results)
}

/// The consent history with the attested decisions appended as if already on file.
async fn consent_with(
    conn: &mut AnyConnection,
    registry_id: i64,
    pseudonym: &str,
    attested: &[ConsentDecision],
) -> Result<Vec<ConsentEvent>, StoreError> {
    let mut events = cases::load_consent(conn, registry_id, pseudonym).await?;
    let next = events.last().map_or(0, |e| e.seq) + 1;
    events.extend(attested.iter().enumerate().map(|(i, d)| ConsentEvent {
        seq: next + i as i64,
        scope: d.scope,
        decision: d.decision,
        given_at: d.given_at,
        expires_at: d.expires_at,
    }));
    Ok(events)
}

async fn record_attestation(
    conn: &mut AnyConnection,
    registry_id: i64,
    pseudonym: &str,
    attested: &[ConsentDecision],
    principal_id: i64,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    for decision in attested {
        cases::append_consent(
            conn,
            registry_id,
            pseudonym,
            decision,
            principal_id,
            Source::PhysicianAttestation,
            now,
        )
        .await?;
    }
    Ok(())
}

async fn submit(conn: &mut AnyConnection, c: &SubmitCase) -> Result<Written, WriteError> {
    let events = consent_with(conn, c.registry_id, &c.pseudonym, &c.consent).await?;
    consent::check_inclusion(&events, c.now)?;
    if cases::find_case(conn, c.registry_id, &c.pseudonym, c.centre_id)
        .await?
        .is_some()
    {
        return Err(WriteError::AlreadyExists);
    }
    record_attestation(
        conn,
        c.registry_id,
        &c.pseudonym,
        &c.consent,
        c.principal_id,
        c.now,
    )
    .await?;
    let case_id = cases::insert_case(
        conn,
        c.registry_id,
        &c.pseudonym,
        c.centre_id,
        c.principal_id,
        &c.row,
        c.now,
    )
    .await?;
    represent(
        conn,
        c.registry_id,
        &c.pseudonym,
        case_id,
        1,
        c.centre_id,
        &c.row,
        &events,
        c.now,
    )
    .await?;
    Ok(Written {
        version: 1,
        recorded_at: c.now,
    })
}

/// Makes the version just written represent the patient in research counts, with the
/// eligibility its consent history gives.
#[allow(clippy::too_many_arguments)]
async fn represent(
    conn: &mut AnyConnection,
    registry_id: i64,
    pseudonym: &str,
    case_id: i64,
    version: i64,
    centre_id: i64,
    row: &CaseRow,
    events: &[ConsentEvent],
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let (eligible, eligible_until) = consent::research_eligibility(events, now);
    cases::set_representative(
        conn,
        registry_id,
        pseudonym,
        cases::Representative {
            case_id,
            version,
            centre_id,
            row,
            eligible,
            eligible_until,
        },
    )
    .await
}

async fn update(conn: &mut AnyConnection, c: &UpdateCase) -> Result<Written, WriteError> {
    let Some((case_id, current)) =
        cases::find_case(conn, c.registry_id, &c.pseudonym, c.centre_id).await?
    else {
        return Err(WriteError::NotFound);
    };
    if current != c.expected_version {
        return Err(WriteError::VersionConflict { current });
    }
    let events = consent_with(conn, c.registry_id, &c.pseudonym, &c.consent).await?;
    consent::check_inclusion(&events, c.now)?;
    record_attestation(
        conn,
        c.registry_id,
        &c.pseudonym,
        &c.consent,
        c.principal_id,
        c.now,
    )
    .await?;
    let version = current + 1;
    cases::insert_version(conn, case_id, version, c.principal_id, &c.row, c.now).await?;
    represent(
        conn,
        c.registry_id,
        &c.pseudonym,
        case_id,
        version,
        c.centre_id,
        &c.row,
        &events,
        c.now,
    )
    .await?;
    Ok(Written {
        version,
        recorded_at: c.now,
    })
}

async fn record_consent(conn: &mut AnyConnection, c: &RecordConsent) -> Result<Output, WriteError> {
    let before = cases::load_consent(conn, c.registry_id, &c.pseudonym).await?;
    let after = consent_with(conn, c.registry_id, &c.pseudonym, &c.decisions).await?;
    let was_included = consent::is_active(&before, Scope::RegistryInclusion, c.now);
    let still_included = consent::is_active(&after, Scope::RegistryInclusion, c.now);
    if was_included
        && !still_included
        && consent_store::has_cases(conn, c.registry_id, &c.pseudonym).await?
    {
        return Err(WriteError::UseWithdrawal);
    }
    let mut ids = Vec::with_capacity(c.decisions.len());
    for decision in &c.decisions {
        ids.push(
            cases::append_consent(
                conn,
                c.registry_id,
                &c.pseudonym,
                decision,
                c.principal_id,
                Source::ConsentOfficer,
                c.now,
            )
            .await?,
        );
    }
    cases::refresh_eligibility(conn, c.registry_id, &c.pseudonym).await?;
    Ok(Output::Consent(ids))
}

async fn withdraw(conn: &mut AnyConnection, c: &Withdraw) -> Result<Output, WriteError> {
    let mut events = Vec::with_capacity(c.scopes.len());
    let mut erased = None;
    for &scope in &c.scopes {
        let decision = ConsentDecision {
            scope,
            decision: Decision::Withdrawn,
            given_at: c.now,
            form_version: "withdrawal".into(),
            expires_at: None,
        };
        let id = cases::append_consent(
            conn,
            c.registry_id,
            &c.pseudonym,
            &decision,
            c.principal_id,
            Source::ConsentOfficer,
            c.now,
        )
        .await?;
        events.push(id);
        if scope == Scope::RegistryInclusion {
            let counts = consent_store::erase_patient(conn, c.registry_id, &c.pseudonym).await?;
            consent_store::insert_erasure(
                conn,
                &c.receipt_id,
                c.registry_id,
                &c.pseudonym,
                c.now,
                c.principal_id,
                c.reason,
                counts,
                id,
            )
            .await?;
            erased = Some(counts);
        }
    }
    cases::refresh_eligibility(conn, c.registry_id, &c.pseudonym).await?;
    Ok(Output::Withdrawn { events, erased })
}
