//! The write path: group commit of concurrent submissions.
//!
//! Every write of clinical data or consent is a [`Command`] sent to a writer (a task; on a
//! SQLite file the thread `ern-writer`, [`lite_thread`]). A
//! writer takes whatever has queued up (up to `max_batch`), applies it in one transaction,
//! commits (on SQLite with `synchronous = FULL`, so the commit is fsynced) and only then
//! answers each caller. Under load, one fsync covers hundreds of submissions; when idle,
//! a submission is committed alone at once, with no added latency.
//!
//! Commands are partitioned over writers by a hash of the patient (registry, pseudonym), so
//! all writes about one patient are applied in arrival order by one writer and never race
//! each other. SQLite allows one writer at a time, so it gets one partition; PostgreSQL
//! gets several. An audit entry sent alone (a read's, a refusal's) is about no patient's
//! rows and goes to the writers in turn.
//!
//! Within a batch, a run of consecutive submissions about distinct patients (the common
//! case under load, and every bulk stream) is applied with one statement per table
//! ([`submit_run`]): their consent histories and existing cases are read in one
//! statement each, each submission is decided on its own by the same rules in the same
//! order as [`submit`], and what the accepted ones write goes in multi-row `INSERT`s
//! (`tests/api/write_runs.rs` checks it writes what the commands one by one write). A
//! patient seen twice starts a new run, so that the second sees what the first wrote;
//! every other command is applied on its own, in order.
//!
//! That ordering ends at the process. On PostgreSQL several instances share the database,
//! and each command reads consent, then writes, under READ COMMITTED: a withdrawal
//! committed by another instance between the two would leave a case stored (and counted in
//! research) after its erasure. So every transaction first takes a transaction-scoped
//! advisory lock per patient it touches ([`begin_sql`]), all at once and in key order
//! (no deadlock between batches), before its first read; the instance holding it commits
//! before the next one reads. SQLite needs none: one server per database (`data_dir`), and
//! its write lock makes a transaction that read a stale snapshot fail rather than write.
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
//!
//! The in-memory research index of every instance follows the research rows through a
//! change log (`super::research_index`): a transaction reads its patients' research slots
//! before its commands and, as its last statements, numbers and logs the slots it changed
//! under one counter's lock, so that the log's numbers commit in order. After the commit,
//! once it has answered the batch, the writer lets its own index catch up
//! ([`AfterCommit`]).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;
use std::future::Future;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, oneshot};
use tracing::{error, warn};

use super::audit::{self as audit_store, Pending, Wrote};
use super::cases::{self, CaseRow};
use super::consent::{self as consent_store, WithdrawalReason};
use super::db::Db;
use super::purge::{self, Purger};
use super::research_index;
use super::{Backend, Store, StoreError};
use crate::audit::{AuditKey, Entry};
use crate::consent::{ConsentDecision, ConsentEvent, Decision, InclusionRefused, Scope, Source};
use crate::outcome::Outcome;

/// Queue length per writer before senders wait (back-pressure): the default of `serve
/// --writer-queue`.
pub const QUEUE_DEPTH: usize = 8192;

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
    /// The command's name, for an entry the writer makes itself.
    fn name(&self) -> &'static str {
        match self {
            Command::Submit(_) => "Submit",
            Command::Update(_) => "Update",
            Command::RecordConsent(_) => "RecordConsent",
            Command::Withdraw(_) => "Withdraw",
            Command::Audit => "Audit",
        }
    }

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

impl Output {
    /// The answer to a case command.
    pub fn into_case(self) -> Result<Written, WriteError> {
        match self {
            Output::Case(w) => Ok(w),
            _ => Err(WriteError::Store(StoreError::Corrupt(
                "writer answered a case command with another output".into(),
            ))),
        }
    }
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
    #[error(
        "the registry's pseudonym key was rotated while this call was in flight, and the \
         registry has nothing on file for the patient under the earlier key version: send \
         the call again (a pseudonym taken from before the rotation: find the patient by \
         identifiers again first)"
    )]
    KeyRotated,
    #[error(
        "is of a pseudonym key version this registry does not have: give the patient's \
         identifiers, or a pseudonym as an answer of this registry gave it"
    )]
    UnknownKeyVersion,
}

impl WriteError {
    /// The outcome of the command, recorded in its audit entry (the service maps the
    /// error to the same outcome: `service::ServiceError::outcome`).
    pub fn outcome(&self) -> Outcome {
        match self {
            WriteError::Consent(_) | WriteError::UseWithdrawal => Outcome::FailedPrecondition,
            WriteError::AlreadyExists => Outcome::AlreadyExists,
            WriteError::NotFound => Outcome::NotFound,
            WriteError::VersionConflict { .. } | WriteError::KeyRotated => Outcome::Aborted,
            WriteError::UnknownKeyVersion => Outcome::InvalidArgument,
            WriteError::Store(e) if e.is_unavailable() => Outcome::Unavailable,
            WriteError::Store(_) => Outcome::Internal,
            WriteError::ShuttingDown => Outcome::Unavailable,
        }
    }
}

/// The consent rules the writer applies, inside its transaction and under the patient's
/// lock, to the history it has just read. They are the service layer's
/// (`service::consent::RegistryConsentRules`), handed to the writer at start: the writer
/// reads, asks and writes; it decides nothing about consent itself.
pub trait ConsentRules: Send + Sync + 'static {
    /// The instant at which a command that arrived at `now` applies the rules, given the
    /// history on file.
    fn effective_at(&self, history: &[ConsentEvent], now: DateTime<Utc>) -> DateTime<Utc>;

    /// Whether a case of the patient may be stored (or updated) at `at`, the history
    /// including the decisions attested with it.
    fn may_store_case(
        &self,
        history: &[ConsentEvent],
        at: DateTime<Utc>,
    ) -> Result<(), InclusionRefused>;

    /// Whether officer decisions that take the history from `before` to `after` end the
    /// patient's inclusion at `at` (in force before and not after), or record a refusal of
    /// it (also over an inclusion that had expired): refused (a withdrawal, with its
    /// erasure, must be used) while the registry holds a record of the patient.
    fn ends_inclusion(
        &self,
        before: &[ConsentEvent],
        after: &[ConsentEvent],
        at: DateTime<Utc>,
    ) -> bool;

    /// The patient's research eligibility at `at`: whether counted, and until when.
    fn research_eligibility(
        &self,
        history: &[ConsentEvent],
        at: DateTime<Utc>,
    ) -> (bool, Option<DateTime<Utc>>);
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
            // A withdrawal that may have committed gets its purge all the same.
            (Command::Withdraw(w), Err(WriteError::Store(StoreError::CommitUnknown { .. }))) => {
                Some(w.receipt_id.clone())
            }
            _ => None,
        };
        Answer {
            reply,
            result,
            erased,
        }
    }
}

/// Told by the writer after every commit of a batch that wrote about patients, once the
/// batch's callers are answered and before it takes the next batch: how the research
/// index (`service::research`) applies the batch's changes (from the change log,
/// `super::research_index`) on the writer's thread (or its task, through the pool). It
/// cannot fail the batch: the commit is done, and every research query catches up with
/// the log before it counts anyway (so the index may also leave it to be applied later).
/// Not told when nothing committed, nor after a COMMIT whose outcome is unknown
/// (PostgreSQL): if that one landed, the next commit's catch-up, or the next query's,
/// applies it.
///
/// `on`: on a SQLite file, the writer's own connection (on its thread, outside any
/// transaction), to read the changes on; otherwise `None`, to read them through the pool.
pub trait AfterCommit: Send + Sync {
    fn after_commit<'a>(
        &'a self,
        on: Option<Db<'a>>,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>>;
}

/// Handle to the writers; cheap to clone.
#[derive(Clone)]
pub struct Writer {
    queues: Vec<mpsc::Sender<Job>>,
    /// The writer the next audit-only command goes to.
    next: Arc<AtomicUsize>,
    /// Physical erasure after erasures (`purge`), shared by the partitions.
    purger: Arc<Purger>,
}

impl Writer {
    /// Starts `partitions` writers over `store`. They stop when every handle is
    /// dropped, after finishing what was queued.
    /// Audit entries are appended with the key `audit`.
    pub fn start(
        store: Store,
        partitions: usize,
        max_batch: usize,
        audit: Arc<AuditKey>,
        rules: Arc<dyn ConsentRules>,
    ) -> Writer {
        Self::start_with(store, partitions, max_batch, audit, rules, None)
    }

    /// [`Writer::start`], telling `after_commit` of every commit once it has answered.
    pub fn start_with(
        store: Store,
        partitions: usize,
        max_batch: usize,
        audit: Arc<AuditKey>,
        rules: Arc<dyn ConsentRules>,
        after_commit: Option<Arc<dyn AfterCommit>>,
    ) -> Writer {
        Self::start_queued(
            store,
            partitions,
            max_batch,
            QUEUE_DEPTH,
            audit,
            rules,
            after_commit,
        )
    }

    /// [`Writer::start_with`], each writer holding up to `queue` commands for its next
    /// transaction (`serve --writer-queue`).
    pub fn start_queued(
        store: Store,
        partitions: usize,
        max_batch: usize,
        queue: usize,
        audit: Arc<AuditKey>,
        rules: Arc<dyn ConsentRules>,
        after_commit: Option<Arc<dyn AfterCommit>>,
    ) -> Writer {
        let partitions = partitions.max(1);
        let max_batch = max_batch.max(1);
        let purger = Arc::new(Purger::new(store.clone()));
        let queues = (0..partitions)
            .map(|_| {
                let (tx, rx) = mpsc::channel(queue.max(1));
                start_writer(
                    &store,
                    audit.clone(),
                    rules.clone(),
                    after_commit.clone(),
                    rx,
                    max_batch,
                    purger.clone(),
                );
                tx
            })
            .collect();
        Writer {
            queues,
            next: Arc::new(AtomicUsize::new(0)),
            purger,
        }
    }

    /// On SQLite, purges the database files at start, before the first call is served:
    /// a process killed between an erasure's commit and its purge left the erased bytes
    /// in the WAL (`purge`), and the erasure's receipt can be read back with
    /// `GetErasureReceipt`. `false`: the checkpoint could not complete (another process
    /// reading the database, say); it was logged, and the writer retries it every few
    /// seconds as after any erasure. On PostgreSQL nothing to do (`true`): its pass is
    /// hygiene, not a claim a receipt makes.
    pub async fn purge_at_start(&self) -> bool {
        if self.purger.backend() != Backend::Sqlite {
            return true;
        }
        if self.purger.at_start().await {
            return true;
        }
        // The writers retry a pending purge only when they wake for work: an idle server
        // must retry too.
        let purger = Arc::downgrade(&self.purger);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(purge::RETRY_EVERY).await;
                let Some(purger) = purger.upgrade() else {
                    return;
                };
                if !purger.is_pending() {
                    return;
                }
                purger.retry(false).await;
            }
        });
        false
    }

    /// Applies a case command and waits until it is durably committed (or refused).
    pub async fn execute_case(
        &self,
        command: Command,
        audit: Option<Entry>,
    ) -> Result<Written, WriteError> {
        self.execute(command, audit).await?.into_case()
    }

    /// Applies `command` and waits until it is durably committed (or refused), together
    /// with its audit entry: the entry is appended in the same transaction, with the
    /// command's outcome, whether the command succeeds or is refused. A command that
    /// erased returns once the erased data is purged; if the purge cannot be confirmed
    /// (SQLite), it returns `StoreError::NotPurged` although the erasure is committed.
    ///
    /// Dropped while it waits for room in a full queue, the command and its entry are
    /// dropped with it: a caller that must leave a trace takes the [`Writer::room`] first.
    pub async fn execute(
        &self,
        command: Command,
        audit: Option<Entry>,
    ) -> Result<Output, WriteError> {
        self.room(command).await?.execute(audit).await
    }

    /// Waits for room for `command` in its writer's queue (`serve --writer-queue`
    /// commands each). Until the room is taken, nothing is handed over: a caller dropped
    /// while it waits still has the command's audit entry, and can record what became of
    /// the call. [`Room::execute`] then hands the command over at once, with no further
    /// wait for room.
    pub async fn room(&self, command: Command) -> Result<Room<'_>, WriteError> {
        // Commands about a patient go to that patient's writer; an entry alone (a read, a
        // refusal) to the next writer in turn, so reads never queue behind one of them.
        let partition = if matches!(command, Command::Audit) {
            self.next.fetch_add(1, Ordering::Relaxed)
        } else {
            let (registry_id, pseudonym) = command.patient();
            let mut h = DefaultHasher::new();
            (registry_id, pseudonym).hash(&mut h);
            h.finish() as usize
        };
        let partition = partition % self.queues.len();
        let permit = self.queues[partition]
            .reserve()
            .await
            .map_err(|_| WriteError::ShuttingDown)?;
        Ok(Room { permit, command })
    }

    /// The commands waiting in the writers' queues, read without keeping them open.
    pub fn backlog(&self) -> Backlog {
        Backlog(self.queues.iter().map(mpsc::Sender::downgrade).collect())
    }
}

/// Room for a command in its writer's queue ([`Writer::room`]), with the command.
pub struct Room<'a> {
    permit: mpsc::Permit<'a, Job>,
    command: Command,
}

impl Room<'_> {
    /// Hands the command and its entry to the writer and waits until they are durably
    /// committed, as [`Writer::execute`]. From here the writer applies them whatever
    /// becomes of the caller.
    pub async fn execute(self, audit: Option<Entry>) -> Result<Output, WriteError> {
        self.hand_over(audit).await
    }

    /// [`Room::execute`] in two steps: the command is in the writer's queue when this
    /// returns, and the future returned waits for its answer.
    pub fn hand_over(
        self,
        audit: Option<Entry>,
    ) -> impl std::future::Future<Output = Result<Output, WriteError>> {
        let (tx, rx) = oneshot::channel();
        self.permit.send((self.command, audit, tx));
        async move { rx.await.map_err(|_| WriteError::ShuttingDown)? }
    }
}

/// The writers' queues, seen from outside ([`Writer::backlog`]): holding it does not keep
/// a writer running.
#[derive(Clone)]
pub struct Backlog(Vec<mpsc::WeakSender<Job>>);

impl Backlog {
    /// Commands waiting in each writer's queue, and the queue's size (none once the
    /// writers have stopped).
    pub fn queued(&self) -> Vec<(usize, usize)> {
        self.0
            .iter()
            .filter_map(mpsc::WeakSender::upgrade)
            .map(|q| (q.max_capacity() - q.capacity(), q.max_capacity()))
            .collect()
    }

    /// Whether a writer's loop has ended (its queue closed, or every handle on it gone):
    /// at shutdown, or after a panic in the loop ([`lite_thread`]). Until the service
    /// stops, no write can then be stored, and health says so (`health`).
    pub fn stopped(&self) -> bool {
        self.0
            .iter()
            .any(|q| q.upgrade().is_none_or(|q| q.is_closed()))
    }

    /// The backlog of a writer whose loop has ended, for tests of what follows.
    #[cfg(test)]
    pub(crate) fn of_a_stopped_writer() -> Backlog {
        let (queue, _) = mpsc::channel::<Job>(1);
        Backlog(vec![queue.downgrade()])
    }
}

/// What applies a writer's batches: where, and with which key, rules and hook.
struct Applier {
    /// Declared before `key`: dropped first (the server closes the pool once every writer
    /// has dropped its key).
    on: On,
    key: Arc<AuditKey>,
    rules: Arc<dyn ConsentRules>,
    after_commit: Option<Arc<dyn AfterCommit>>,
}

/// The connections a writer applies its batches on.
enum On {
    /// On PostgreSQL (and SQLite in memory): a pooled connection per transaction, on the
    /// writer's task.
    Pool(Store),
    /// On a SQLite file: the writer's own connection, on the thread of its own that runs
    /// this writer's loop ([`lite_thread`]), applying each batch with direct calls into
    /// the engine. No hand-off between threads per statement, nor per batch. With the
    /// identity of the database's files when it opened (`None`: not to be read), checked
    /// before each batch.
    Lite(rusqlite::Connection, Option<crate::data_dir::OpenFiles>),
}

/// Starts a writer's loop over `rx`: on a SQLite file on a thread of its own with its own
/// connection ([`lite_thread`]); otherwise, or if that connection or thread cannot be
/// had, as a task writing through the pool.
fn start_writer(
    store: &Store,
    key: Arc<AuditKey>,
    rules: Arc<dyn ConsentRules>,
    after_commit: Option<Arc<dyn AfterCommit>>,
    rx: mpsc::Receiver<Job>,
    max_batch: usize,
    purger: Arc<Purger>,
) {
    let pool = |rx, key, rules, after_commit, purger| {
        let applier = Applier {
            on: On::Pool(store.clone()),
            key,
            rules,
            after_commit,
        };
        tokio::spawn(async move { run(applier, rx, max_batch, purger).await.close() });
    };
    let Some(path) = store.sqlite_path() else {
        return pool(rx, key, rules, after_commit, purger);
    };
    let conn = match Store::open_sqlite_writer(path) {
        Ok(conn) => (conn, crate::data_dir::OpenFiles::of(path)),
        Err(e) => {
            // The pool's connections work (the store is connected): write through them.
            error!(error = %e, "the writer's own SQLite connection failed to open; writing through the pool");
            return pool(rx, key, rules, after_commit, purger);
        }
    };
    // Timers on: the purge's retries and the pool's acquire have timeouts.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            error!(error = %e, "the writer thread's runtime failed to start; writing through the pool");
            return pool(rx, key, rules, after_commit, purger);
        }
    };
    // The loop's inputs are handed to the thread once it runs, so that they are still
    // here for the pool's loop if it cannot start.
    let (hand_over, inputs) = std::sync::mpsc::sync_channel(1);
    let spawned = std::thread::Builder::new()
        .name("ern-writer".into())
        .spawn(move || {
            if let Ok((rx, key, rules, after_commit, purger)) = inputs.recv() {
                let applier = Applier {
                    on: On::Lite(conn.0, conn.1),
                    key,
                    rules,
                    after_commit,
                };
                lite_thread(runtime, applier, rx, max_batch, purger);
            }
        });
    match spawned {
        Ok(_) => {
            // The thread waits for this one message, with room for it.
            let _ = hand_over.send((rx, key, rules, after_commit, purger));
        }
        Err(e) => {
            error!(error = %e, "the writer thread failed to start; writing through the pool");
            pool(rx, key, rules, after_commit, purger);
        }
    }
}

/// A batch applied: its answers, and whether the hook is to be told of its commit.
struct Batch {
    answers: Vec<Answer>,
    catch_up: bool,
}

impl Applier {
    /// Applies `jobs`; [`Batch::catch_up`] if they wrote about patients and committed.
    async fn apply(&mut self, jobs: Vec<Job>) -> Batch {
        let about_patients = about_patients(&jobs);
        if let On::Lite(_, Some(files)) = &self.on
            && let Err(cause) = files.check()
        {
            return Batch {
                answers: refuse_all(jobs, &cause),
                catch_up: false,
            };
        }
        let mut target = match &mut self.on {
            On::Pool(store) => Target::Pool(store),
            On::Lite(conn, _) => Target::Lite(conn),
        };
        let applied = apply_jobs(&mut target, &self.key, self.rules.as_ref(), jobs).await;
        // Nothing committed, nothing to catch up with (and while the database is away the
        // catch-up would wait for the pool).
        Batch {
            catch_up: about_patients && applied.committed && self.after_commit.is_some(),
            answers: applied.answers,
        }
    }

    /// Tells the hook of a commit: on SQLite's own connection the research index reads
    /// the batch's changes there too; otherwise through the pool.
    async fn catch_up(&mut self) {
        if let Some(hook) = &self.after_commit {
            let on = match &mut self.on {
                On::Lite(conn, _) => Some(Db::Lite(conn)),
                On::Pool(_) => None,
            };
            hook.after_commit(on).await;
        }
    }

    /// Closes the writer's own connection, if it has one, then drops the audit key.
    fn close(self) {
        if let On::Lite(conn, _) = self.on {
            // Closed before the audit key goes: the server closes the pool once every
            // writer has dropped its key (`startup`), and the last connection to close
            // checkpoints the WAL.
            if let Err((_, e)) = conn.close() {
                warn!(error = %e, "the writer's SQLite connection did not close cleanly");
            }
        }
        drop(self.key);
    }
}

/// The SQLite writer's thread: runs the writer's loop ([`run`]) on its own connection.
/// Callers' commands arrive here straight from their tasks and are answered from here,
/// so a submission alone crosses between threads twice (to this thread and back), not
/// four times through a task in between. The write path's code is async (it is shared
/// with PostgreSQL), but on this connection nothing in it waits: a current-thread runtime
/// (`runtime`, timers only) drives each batch to its end. What does wait here is rare and
/// was waited for by the loop before as well: a purge after an erasure (through the
/// pool), and the research index's trips to the pool after a commit (a centre it has not
/// seen, a reload). The tasks sqlx spawns to give a pool connection back run on this
/// runtime, whenever the loop waits for commands; under a load that never lets it wait,
/// such a connection stays out of the pool for a while (harmless: it holds no
/// transaction).
///
/// If the loop panics, the writer stops as it would at shutdown: the queue is dropped,
/// so every caller waiting or still to come is answered that the writer stopped, and a
/// purge still pending gets its last attempt. Health then turns NOT_SERVING until the
/// service is restarted ([`Backlog::stopped`], `health`).
fn lite_thread(
    runtime: tokio::runtime::Runtime,
    applier: Applier,
    rx: mpsc::Receiver<Job>,
    max_batch: usize,
    purger: Arc<Purger>,
) {
    let looped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        runtime.block_on(run(applier, rx, max_batch, purger.clone()))
    }));
    let applier = match looped {
        Ok(applier) => Some(applier),
        Err(_) => {
            // The applier went with the loop: `Applier` declares its connection
            // before its key, so the connection was closed before the key was dropped.
            error!("the writer thread has stopped: its loop panicked");
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                runtime.block_on(purger.retry(true))
            }));
            None
        }
    };
    // The pool connections this runtime's tasks still hold are given back or closed
    // first, while the audit key (which the server waits for before it closes the pool)
    // is still held, except after a panic.
    drop(runtime);
    if let Some(applier) = applier {
        applier.close();
    }
}

/// The connection a batch is applied on.
enum Target<'a> {
    Pool(&'a Store),
    Lite(&'a mut rusqlite::Connection),
}

/// Whether a batch writes about patients (anything but audit entries of reads).
fn about_patients(jobs: &[Job]) -> bool {
    jobs.iter().any(|(c, _, _)| !matches!(c, Command::Audit))
}

/// A writer's loop: takes what has queued up, applies it, answers, until every handle is
/// dropped; returns the applier to be closed.
async fn run(
    mut applier: Applier,
    mut rx: mpsc::Receiver<Job>,
    max_batch: usize,
    purger: Arc<Purger>,
) -> Applier {
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
        let started = std::time::Instant::now();
        metrics::histogram!("ern_writer_batch_commands").record(jobs.len() as f64);
        let applied = applier.apply(jobs).await;
        // Applied and committed: what every command of the batch waited for after it was
        // taken (a purge's wait is `ern_erasure_purge_seconds`).
        metrics::histogram!("ern_writer_batch_seconds").record(started.elapsed().as_secs_f64());
        deliver(&purger, applied.answers).await;
        // Then the research index catches up, while the callers already have their answers
        // (a query catches up before it counts in any case).
        if applied.catch_up {
            applier.catch_up().await;
        }
        purger.retry(false).await;
    }
    // Shutting down: a last, full attempt at a purge still pending.
    purger.retry(true).await;
    applier
}

/// Answers every job that its files changed under the server (`cause`,
/// `data_dir::OpenFiles`), writing nothing: not even the entries of the refused calls,
/// which would go where the writes would.
fn refuse_all(jobs: Vec<Job>, cause: &str) -> Vec<Answer> {
    static ERROR: crate::logging::Throttled = crate::logging::Throttled::new(
        tracing::Level::ERROR,
        "the database's files changed under the server: writes refused, nothing written",
    );
    if let Some(batches) = ERROR.due() {
        error!(error = %cause, batches, "the database's files changed under the server: writes refused, nothing written (batches since the last such line)");
    }
    let entries = jobs
        .iter()
        .filter(|(command, audit, _)| audit.is_some() && !matches!(command, Command::Audit))
        .count();
    if entries > 0 {
        note_unrecorded(entries);
    }
    answer_all(jobs, || StoreError::FilesChanged {
        cause: cause.to_owned(),
    })
}

/// Answers every job with the error `error` makes (one per job: errors are not `Clone`).
fn answer_all(jobs: Vec<Job>, error: impl Fn() -> StoreError) -> Vec<Answer> {
    jobs.into_iter()
        .map(|(command, _, reply)| Answer::new(&command, reply, Err(WriteError::Store(error()))))
        .collect()
}

/// What [`apply_jobs`] answered, and whether any of its transactions committed.
struct BatchAnswers {
    answers: Vec<Answer>,
    committed: bool,
}

/// How long the entries of a batch that failed for want of the database may take to
/// append: the attempt is made once, and its callers wait for it.
const FAILURE_ENTRIES_LIMIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Applies the jobs in one transaction or, if that fails, one transaction each; but when
/// the batch failed because the database cannot be reached, every job is answered with
/// that at once ([`Retry::None`]).
async fn apply_jobs(
    target: &mut Target<'_>,
    key: &AuditKey,
    rules: &dyn ConsentRules,
    jobs: Vec<Job>,
) -> BatchAnswers {
    let commands: Vec<(&Command, Option<&Entry>)> =
        jobs.iter().map(|(c, a, _)| (c, a.as_ref())).collect();
    let err = match apply_batch(target, key, rules, &commands).await {
        Ok(results) => {
            let answers = jobs
                .into_iter()
                .zip(results)
                .map(|((command, _, reply), result)| Answer::new(&command, reply, result))
                .collect();
            return BatchAnswers {
                answers,
                committed: true,
            };
        }
        Err(err) => err,
    };
    drop(commands);
    // Whether a command retried alone committed (a refusal commits its entry).
    let mut committed = false;
    let answers = match retry_after(&err) {
        // Perhaps committed: applying the commands again could apply them twice, and an
        // entry saying they failed could be false. Each caller is told the outcome is
        // unknown.
        Retry::None if matches!(err, StoreError::CommitUnknown { .. }) => {
            let cause = match &err {
                StoreError::CommitUnknown { cause } => cause.clone(),
                other => other.to_string(),
            };
            answer_all(jobs, || StoreError::CommitUnknown {
                cause: cause.clone(),
            })
        }
        // The database cannot be reached (or, on SQLite, another process holds its lock):
        // it would refuse each command alone the same way, after the same wait, and the
        // calls queued behind this batch would wait for every one of those waits. The
        // failed commands' entries are appended in one transaction, attempted once.
        Retry::None => {
            static WARNING: crate::logging::Throttled = crate::logging::Throttled::new(
                tracing::Level::WARN,
                "batches failed: the database cannot be reached",
            );
            if let Some(batches) = WARNING.due() {
                warn!(error = %err, batch = jobs.len(), batches, "batches failed: the database cannot be reached (since the last such line)");
            }
            let cause = err.to_string();
            let unreachable = WriteError::Store(StoreError::Unreachable {
                cause: cause.clone(),
            });
            let entries: Vec<Entry> = jobs
                .iter()
                .filter(|(command, _, _)| !matches!(command, Command::Audit))
                .filter_map(|(_, audit, _)| audit.clone())
                .collect();
            if waited_for_database(&err) {
                // It just waited as long as it may for the database: a second wait
                // would end the same way.
                if !entries.is_empty() {
                    note_unrecorded(entries.len());
                }
            } else {
                audit_failures(target, key, entries, unreachable.outcome()).await;
            }
            answer_all(jobs, || StoreError::Unreachable {
                cause: cause.clone(),
            })
        }
        Retry::Each if jobs.len() == 1 => {
            error!(error = %err, "write failed");
            let mut answers = Vec::with_capacity(1);
            if let Some((command, audit, reply)) = jobs.into_iter().next() {
                let err = WriteError::Store(err);
                audit_failure(target, key, &command, audit, &err).await;
                answers.push(Answer::new(&command, reply, Err(err)));
            }
            answers
        }
        Retry::Each => {
            warn!(error = %err, batch = jobs.len(), "batch failed; retrying one by one");
            let mut answers = Vec::with_capacity(jobs.len());
            let mut unreachable: Option<String> = None;
            let mut unrecorded = 0usize;
            for (command, audit, reply) in jobs {
                // The database went away during the retries: the rest are answered so,
                // and their entries cannot be appended either.
                if let Some(cause) = &unreachable {
                    let err = WriteError::Store(StoreError::Unreachable {
                        cause: cause.clone(),
                    });
                    if audit.is_some() && !matches!(command, Command::Audit) {
                        unrecorded += 1;
                    }
                    answers.push(Answer::new(&command, reply, Err(err)));
                    continue;
                }
                let result =
                    match apply_batch(target, key, rules, &[(&command, audit.as_ref())]).await {
                        Ok(mut r) => {
                            committed = true;
                            r.pop().unwrap_or(Err(WriteError::ShuttingDown))
                        }
                        // Perhaps committed: no entry saying it failed (as above).
                        Err(err @ StoreError::CommitUnknown { .. }) => {
                            unreachable = Some(err.to_string());
                            Err(WriteError::Store(err))
                        }
                        Err(err) => {
                            error!(error = %err, "write failed");
                            let away = retry_after(&err) == Retry::None;
                            if away {
                                unreachable = Some(err.to_string());
                            }
                            let waited = waited_for_database(&err);
                            let err = WriteError::Store(err);
                            if away && waited {
                                if audit.is_some() && !matches!(command, Command::Audit) {
                                    unrecorded += 1;
                                }
                            } else {
                                audit_failure(target, key, &command, audit, &err).await;
                            }
                            Err(err)
                        }
                    };
                answers.push(Answer::new(&command, reply, result));
            }
            if unrecorded > 0 {
                note_unrecorded(unrecorded);
            }
            answers
        }
    };
    BatchAnswers { answers, committed }
}

/// Logs that `entries` audit entries of failed writes could not be committed, the database
/// being away: at most one line every `logging::OUTAGE_LINE_EVERY`, with the batches since.
fn note_unrecorded(entries: usize) {
    static WARNING: crate::logging::Throttled = crate::logging::Throttled::new(
        tracing::Level::WARN,
        "audit entries of failed writes not committed: the database cannot be reached",
    );
    if let Some(batches) = WARNING.due() {
        warn!(
            entries,
            batches,
            "audit entries of failed writes not committed: the database cannot be reached (batches since the last such line)"
        );
    }
}

/// What to do after a batch's transaction failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retry {
    /// Apply each command in a transaction of its own: one of them may be what failed
    /// the batch (a constraint, a value the database refused).
    Each,
    /// Retry nothing: the commit's outcome is unknown, or the database cannot be reached
    /// now and would refuse every command alone as well.
    None,
}

fn retry_after(err: &StoreError) -> Retry {
    if err.is_unavailable() {
        Retry::None
    } else {
        Retry::Each
    }
}

/// Whether `err` ended a wait for the database to let the writer in: no connection of
/// the pool within its timeout, the pool closed, or SQLite's write lock held by another
/// process past the busy timeout.
fn waited_for_database(err: &StoreError) -> bool {
    match err {
        StoreError::Database(sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed) => true,
        StoreError::Sqlite(rusqlite::Error::SqliteFailure(e, _)) => {
            e.code == rusqlite::ErrorCode::DatabaseBusy
        }
        _ => false,
    }
}

/// [`audit_failure`] for the entries of several commands that failed with `outcome`, in
/// one transaction, attempted once and for at most [`FAILURE_ENTRIES_LIMIT`].
async fn audit_failures(
    target: &mut Target<'_>,
    key: &AuditKey,
    entries: Vec<Entry>,
    outcome: Outcome,
) {
    let at = Utc::now().timestamp_millis();
    let pending: Vec<Pending> = entries
        .into_iter()
        .map(|mut entry| {
            entry.outcome = outcome.name().to_string();
            Pending {
                at,
                entry,
                wrote: Wrote::default(),
            }
        })
        .collect();
    if pending.is_empty() {
        return;
    }
    let count = pending.len();
    let appended = match target {
        Target::Pool(store) => {
            let deadline = tokio::time::Instant::now() + FAILURE_ENTRIES_LIMIT;
            in_time(store, deadline, async |db: &mut Db<'_>| {
                db.execute_raw("BEGIN").await?;
                audit_store::append(db, key, &pending).await?;
                db.execute_raw("COMMIT").await
            })
            .await
        }
        // On the writer's own connection every statement runs to its end when called: a
        // timer could not cut one short. Only a busy database keeps one waiting (its busy
        // timeout), and a batch that failed so is not recorded (`waited_for_database`).
        Target::Lite(_) => {
            let mut tx = match Tx::begin(target, None).await {
                Ok(tx) => tx,
                Err(e) => {
                    note_failure_entries_lost(&e, count);
                    return;
                }
            };
            match audit_store::append(&mut tx.db(), key, &pending).await {
                Ok(_) => tx.commit().await,
                Err(err) => {
                    tx.rollback().await;
                    Err(err)
                }
            }
        }
    };
    if let Err(e) = appended {
        note_failure_entries_lost(&e, count);
    }
}

/// Logs that the entries of failed writes could not be committed: at most one line every
/// `logging::OUTAGE_LINE_EVERY`, with the times since.
fn note_failure_entries_lost(error: &StoreError, entries: usize) {
    static WARNING: crate::logging::Throttled = crate::logging::Throttled::new(
        tracing::Level::WARN,
        "audit entries of failed writes not committed",
    );
    if let Some(times) = WARNING.due() {
        warn!(%error, entries, times, "audit entries of failed writes not committed (times since the last such line)");
    }
}

/// Runs `work` on a connection of `store`'s pool by `deadline`, the wait for the connection
/// included; past it, [`StoreError::Unreachable`]. `work` runs its own transaction with raw
/// statements. A connection whose work did not end cleanly (an error, or the deadline
/// passed while a statement was under way) is closed instead of going back to the pool: the
/// work may have left a transaction open on it (sqlx does not roll back a transaction
/// whose BEGIN was cut short), and the next user of the connection would run inside it.
async fn in_time<T>(
    store: &Store,
    deadline: tokio::time::Instant,
    work: impl AsyncFnOnce(&mut Db<'_>) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    let late = || StoreError::Unreachable {
        cause: "no answer from the database in time".into(),
    };
    let mut conn = tokio::time::timeout_at(deadline, store.pool().acquire())
        .await
        .map_err(|_| late())??;
    let done = {
        let mut db = conn.db();
        tokio::time::timeout_at(deadline, work(&mut db))
            .await
            .unwrap_or_else(|_| Err(late()))
    };
    if done.is_err() {
        conn.close_on_drop();
    }
    done
}

/// Appends the entry of a write whose transaction failed (and rolled back with the entry
/// it carried), in a transaction of its own, with the outcome the caller gets: a failed
/// write is in the log too. The entry of an audit-only job is not: its call fails because
/// its entry could not be written (`api::conclude`), so there is nothing true to
/// record. If this append fails as well (the database is away, the log refuses writes),
/// the failure is logged.
async fn audit_failure(
    target: &mut Target<'_>,
    key: &AuditKey,
    command: &Command,
    audit: Option<Entry>,
    err: &WriteError,
) {
    let (Some(entry), false) = (audit, matches!(command, Command::Audit)) else {
        return;
    };
    audit_failures(target, key, vec![entry], err.outcome()).await;
}

/// A write transaction on a [`Target`].
enum Tx<'a> {
    Pool(super::db::Tx),
    /// On PostgreSQL: begun with [`begin_sql`].
    Raw(super::db::RawTx),
    Lite(&'a mut rusqlite::Connection),
}

impl Tx<'_> {
    /// Begins a write transaction. On PostgreSQL `start` is the whole opening of the
    /// transaction ([`begin_sql`]), sent as one simple query: the BEGIN, its isolation level
    /// and the patients' locks in one round trip, on a connection that is closed unless
    /// the transaction ends cleanly.
    async fn begin<'a>(
        target: &'a mut Target<'_>,
        start: Option<String>,
    ) -> Result<Tx<'a>, StoreError> {
        Ok(match target {
            Target::Pool(store) => match start {
                Some(start) => Tx::Raw(store.pool().begin_raw(&start).await?),
                None => Tx::Pool(store.pool().begin().await?),
            },
            Target::Lite(conn) => {
                if !conn.is_autocommit() {
                    // Left open by something that failed half-way (the research index's
                    // read after the last commit): end it, or BEGIN would fail.
                    warn!("the writer's connection was still in a transaction; rolled back");
                    conn.execute_batch("ROLLBACK")?;
                }
                // IMMEDIATE: the write lock is taken here, so a statement of the batch
                // never finds the database taken by another process (the admin CLI)
                // half-way through.
                conn.execute_batch("BEGIN IMMEDIATE")?;
                Tx::Lite(conn)
            }
        })
    }

    fn db(&mut self) -> Db<'_> {
        match self {
            Tx::Pool(tx) => tx.db(),
            Tx::Raw(tx) => tx.db(),
            Tx::Lite(conn) => Db::Lite(conn),
        }
    }

    /// Commits; on failure the transaction is rolled back before the error is returned.
    async fn commit(self) -> Result<(), StoreError> {
        match self {
            Tx::Pool(tx) => tx.commit().await,
            Tx::Raw(tx) => tx.commit().await,
            Tx::Lite(conn) => {
                let committed = conn.execute_batch("COMMIT");
                if committed.is_err() {
                    Tx::Lite(conn).rollback().await;
                }
                Ok(committed?)
            }
        }
    }

    /// Rolled back now, not when sqlx gets round to a dropped transaction: until then its
    /// connection would keep SQLite's write lock, and the retry of the batch's jobs one by
    /// one, on another connection, would find it locked.
    async fn rollback(self) {
        let rolled_back = match self {
            Tx::Pool(tx) => tx.rollback().await,
            Tx::Raw(tx) => tx.rollback().await,
            // A failed statement may have ended the transaction already.
            Tx::Lite(conn) if conn.is_autocommit() => Ok(()),
            Tx::Lite(conn) => conn.execute_batch("ROLLBACK").map_err(StoreError::from),
        };
        if let Err(e) = rolled_back {
            warn!(error = %e, "rollback of a failed write transaction failed");
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
/// the chain's lock is held only briefly); each entry covers the consent events and
/// tombstones its command inserted (`store::audit::append`). `Err` means the transaction
/// failed as a whole and nothing was committed, audit entries included (the caller then
/// records the failure: [`audit_failure`]), except [`StoreError::CommitUnknown`]: a
/// COMMIT PostgreSQL did not answer, and whether it landed could not be read (nothing to
/// retry or record then). Refusals of single commands are in the `Ok` vector, and their
/// entries record the refusal.
async fn apply_batch(
    target: &mut Target<'_>,
    key: &AuditKey,
    rules: &dyn ConsentRules,
    commands: &[(&Command, Option<&Entry>)],
) -> Result<Vec<Result<Output, WriteError>>, StoreError> {
    let backend = match target {
        Target::Pool(store) => store.backend(),
        Target::Lite(_) => Backend::Sqlite,
    };
    let mut tx = Tx::begin(target, begin_sql(backend, commands)).await?;
    let (results, head) = match apply_in(&mut tx.db(), key, rules, commands).await {
        Ok(applied) => applied,
        Err(err) => {
            tx.rollback().await;
            return Err(err);
        }
    };
    let Err(err) = tx.commit().await else {
        return Ok(results);
    };
    if backend == Backend::Sqlite {
        return Err(match overwrite_failed_commit(target).await {
            Ok(()) => err,
            Err(barrier) => {
                static WARNING: crate::logging::Throttled = crate::logging::Throttled::new(
                    tracing::Level::ERROR,
                    "COMMIT failed, and the write after it as well: whether a batch is stored is unknown",
                );
                if let Some(batches) = WARNING.due() {
                    error!(error = %err, barrier = %barrier, batches, "COMMIT failed, and the write after it as well: whether the batch is stored is unknown until a write succeeds or the service restarts (batches since the last such line)");
                }
                StoreError::CommitUnknown {
                    cause: err.to_string(),
                }
            }
        });
    }
    // A COMMIT can fail after the database committed (PostgreSQL: the connection broke
    // before its answer came). Answered as a failure, the batch would be applied again,
    // one command at a time: consent events twice, a second entry per call. So ask the
    // database whether the batch's last entry is in the log. Not on SQLite, whose failed
    // COMMIT is made final above, nor when PostgreSQL answered with an error (it refused
    // the commit), nor for a batch that wrote no entry.
    let (Target::Pool(store), Some(head)) = (&*target, head) else {
        return Err(err);
    };
    if store.backend() != Backend::Postgres || !commit_may_have_landed(&err) {
        return Err(err);
    }
    let asked = landed(store, &head).await;
    match asked {
        Ok(true) => {
            warn!(error = %err, seq = head.seq, "COMMIT failed, but the batch is in the database: answered as committed");
            Ok(results)
        }
        Ok(false) => Err(err),
        Err(check) => {
            error!(error = %err, check = %check, "COMMIT failed and whether it landed cannot be read");
            Err(StoreError::CommitUnknown {
                cause: err.to_string(),
            })
        }
    }
}

/// Makes a failed SQLite COMMIT final. The COMMIT may have failed after the batch's pages
/// were written to the WAL, its commit frame included (the sync failed): SQLite then
/// leaves the WAL's index as it was, so other connections do not see the batch and the
/// next write transaction writes its pages over it. Until one does, a restart (whose
/// recovery reads the WAL itself) would bring the batch back, with audit entries saying
/// its writes succeeded, though their callers were told they failed (fault audit of
/// 2026-12-07). So a write follows at once, before anyone is answered: `commit_barrier`'s
/// count raised and committed, durably. `Ok`: the failed batch can no longer come back.
/// `Err`: that write failed too, and whether the batch is stored stays unknown until
/// some write succeeds or the service restarts.
async fn overwrite_failed_commit(target: &mut Target<'_>) -> Result<(), StoreError> {
    let mut tx = Tx::begin(target, None).await?;
    // An upsert: a row removed by hand is put back rather than nothing written.
    let raised = super::db::query(
        "INSERT INTO commit_barrier (id, count) VALUES (1, 1) \
         ON CONFLICT (id) DO UPDATE SET count = commit_barrier.count + 1",
    )
    .execute(&mut tx.db())
    .await;
    match raised {
        Ok(_) => tx.commit().await,
        Err(err) => {
            tx.rollback().await;
            Err(err)
        }
    }
}

/// Whether a failed COMMIT may have committed: the database did not answer it (the
/// connection broke or timed out). An error the database answered with is a refusal, and
/// final.
fn commit_may_have_landed(err: &StoreError) -> bool {
    matches!(err, StoreError::Database(e) if !matches!(e, sqlx::Error::Database(_)))
}

/// How long [`landed`] waits for a transaction still committing.
const LANDED_WAIT: &str = "4s";

/// The longest a PostgreSQL writer transaction waits for a lock ([`begin_sql`]): well
/// within `--request-timeout-secs` (30 s by default) with a failure entry's own wait.
pub const WRITER_LOCK_WAIT: &str = "10s";
/// How long [`landed`] may take in all, a connection included: while the database is
/// down, the pool would wait its whole acquire timeout, and the calls queued behind this
/// batch with it.
const LANDED_LIMIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Whether the audit entry `head` is in the log (see [`audit_store::holds`]), read on
/// another connection of the pool (PostgreSQL). The transaction whose COMMIT went
/// unanswered may still be committing, holding the chain head's row lock: a share lock
/// on that row waits for it to end (at most [`LANDED_WAIT`]; past that, an error: the
/// outcome is unknown), so that a commit in progress is not taken for a failed one.
async fn landed(store: &Store, head: &crate::audit::Head) -> Result<bool, StoreError> {
    let deadline = tokio::time::Instant::now() + LANDED_LIMIT;
    in_time(store, deadline, async |db: &mut Db<'_>| {
        // READ COMMITTED whatever the server's default: after the wait for the lock, the
        // check reads what committed meanwhile (under REPEATABLE READ the lock's wait would
        // end in a serialization failure).
        db.execute_raw("BEGIN ISOLATION LEVEL READ COMMITTED")
            .await?;
        db.execute_raw(&format!("SET LOCAL lock_timeout = '{LANDED_WAIT}'"))
            .await?;
        super::db::query("SELECT 1 FROM audit_head WHERE id = 1 FOR SHARE")
            .fetch_one(&mut *db)
            .await?;
        let held = audit_store::holds(db, head).await?;
        db.execute_raw("ROLLBACK").await?;
        Ok(held)
    })
    .await
}

/// Each command's result, and the audit head the batch wrote (`None`: no entry).
type Applied = (Vec<Result<Output, WriteError>>, Option<crate::audit::Head>);

/// The body of [`apply_batch`], inside its transaction.
async fn apply_in(
    tx: &mut Db<'_>,
    key: &AuditKey,
    rules: &dyn ConsentRules,
    commands: &[(&Command, Option<&Entry>)],
) -> Result<Applied, StoreError> {
    // Only a withdrawal deletes a research row (erasure), and with it the slot to log.
    let erasable = commands
        .iter()
        .filter(|(c, _)| matches!(c, Command::Withdraw(_)))
        .map(|(c, _)| c.patient())
        .collect();
    let research = research_index::slots_before(tx, &erasable).await?;
    let mut results = Vec::with_capacity(commands.len());
    let mut entries = Vec::new();
    let mut start = 0;
    while start < commands.len() {
        // A run of submissions about distinct patients is applied with one statement per
        // table; any other command on its own, in order.
        let end = submit_run_end(commands, start);
        let outcomes = if end > start + 1 {
            let run: Vec<&SubmitCase> = commands[start..end]
                .iter()
                .filter_map(|(c, _)| match c {
                    Command::Submit(s) => Some(s),
                    _ => None,
                })
                .collect();
            submit_run(tx, rules, &run)
                .await?
                .into_iter()
                .map(|(r, wrote)| (r.map(Output::Case), wrote))
                .collect()
        } else {
            let command = commands[start].0;
            // The consent events and tombstones the command inserts: its entry covers them.
            let mut wrote = Wrote::default();
            let result = match command {
                Command::Submit(c) => submit(tx, rules, c, &mut wrote).await.map(Output::Case),
                Command::Update(c) => update(tx, rules, c, &mut wrote).await.map(Output::Case),
                Command::RecordConsent(c) => record_consent(tx, rules, c, &mut wrote).await,
                Command::Withdraw(c) => withdraw(tx, rules, c, &mut wrote).await,
                Command::Audit => Ok(Output::Audited),
            };
            vec![(result, wrote)]
        };
        for ((command, audit), (result, wrote)) in commands[start..end].iter().zip(outcomes) {
            // Rows are never left uncovered, even by a command sent without an entry.
            let audit = match audit {
                Some(entry) => Some(Entry::clone(entry)),
                None if wrote != Wrote::default() => Some(Entry {
                    method: format!("Writer/{}", command.name()),
                    ..Entry::default()
                }),
                None => None,
            };
            if let Some(entry) = audit {
                let outcome = match &result {
                    Ok(_) => Outcome::Ok,
                    Err(e) => e.outcome(),
                };
                let mut entry = entry;
                // An entry that comes with a change records the change's outcome; one that
                // comes alone (Command::Audit) carries the outcome of its call already.
                if entry.outcome.is_empty() {
                    entry.outcome = outcome.name().to_string();
                }
                entries.push(Pending {
                    at: Utc::now().timestamp_millis(),
                    entry,
                    wrote,
                });
            }
            match result {
                Err(WriteError::Store(err)) => return Err(err),
                other => results.push(other),
            }
        }
        start = end;
    }
    let head = audit_store::append(tx, key, &entries).await?;
    let changed = patients_of(commands, &results);
    research_index::log_changes(tx, &research, &changed).await?;
    Ok((results, head))
}

/// The patients of the commands that succeeded (a refused command writes nothing): the
/// research rows the change log must name.
fn patients_of<'a>(
    commands: &[(&'a Command, Option<&Entry>)],
    results: &[Result<Output, WriteError>],
) -> BTreeSet<(i64, &'a str)> {
    commands
        .iter()
        .zip(results)
        .filter(|((c, _), r)| !matches!(c, Command::Audit) && r.is_ok())
        .map(|((c, _), _)| c.patient())
        .collect()
}

/// How a writer transaction begins on PostgreSQL (`None`: SQLite, a plain BEGIN), in one
/// round trip ([`super::db::Pool::begin_raw`]): BEGIN; the isolation level pinned to READ
/// COMMITTED whatever the server's default; and one `pg_advisory_xact_lock` per patient
/// ([`patient_lock_key`]), sorted and deduplicated, which makes this transaction wait for
/// every other transaction, of any instance, about the same patients, and them for it
/// until it ends. Transactions that take their locks in one global order cannot deadlock
/// on them, and nothing else is locked while waiting (the audit chain's head and then the
/// research change log's counter are locked after the commands). Under READ COMMITTED each
/// later statement reads a snapshot taken after the lock was granted, so it sees
/// everything the previous holder committed (PostgreSQL makes a commit visible before it
/// releases the transaction's locks); under REPEATABLE READ the snapshot would be the lock
/// statement's own, taken before the wait. `SET TRANSACTION`, not `BEGIN ISOLATION LEVEL`:
/// on a connection found inside a transaction that already read (one whose end was lost),
/// BEGIN is only a warning, but SET TRANSACTION fails, and so does the batch, rather than
/// run in that transaction's snapshot. If any statement fails, the rest do not run, the
/// error is the batch's, and the connection is closed, never returned to the pool inside
/// the aborted transaction. Only commands that read or change a patient's consent or cases
/// lock; an audit-only batch takes nothing.
///
/// No lock is waited for longer than [`WRITER_LOCK_WAIT`]: a table or row held by
/// something else (an operator's `LOCK TABLE`, a stuck session) fails the batch with
/// `lock_not_available`, rolled back, and its callers get UNAVAILABLE within their
/// deadline; waiting without a limit, they got CANCELLED at the deadline while their
/// writes committed once the lock was released (a fault injection).
fn begin_sql(backend: Backend, commands: &[(&Command, Option<&Entry>)]) -> Option<String> {
    if backend != Backend::Postgres {
        return None;
    }
    let mut keys = BTreeSet::new();
    for (command, _) in commands {
        if !matches!(command, Command::Audit) {
            let (registry_id, pseudonym) = command.patient();
            keys.insert(patient_lock_key(registry_id, pseudonym));
        }
    }
    // Integers formatted here, never input; quoted and cast so that i64::MIN parses too.
    // Several statements in one string: one simple query, run in this order.
    let mut sql = format!(
        "BEGIN; SET TRANSACTION ISOLATION LEVEL READ COMMITTED; \
         SET LOCAL lock_timeout = '{WRITER_LOCK_WAIT}';"
    );
    if !keys.is_empty() {
        // First, before any patient's: the rotation lock, shared ([`ROTATION_LOCK`]).
        let (a, b) = ROTATION_LOCK;
        let _ = write!(sql, " SELECT pg_advisory_xact_lock_shared({a}, {b});");
    }
    for key in keys {
        let _ = write!(sql, " SELECT pg_advisory_xact_lock('{key}'::bigint);");
    }
    Some(sql)
}

/// The PostgreSQL advisory lock (two-integer form: a space of its own, apart from the
/// patients' single-integer keys) that orders key rotations against writer transactions.
/// Every writer transaction about patients takes it shared, before its patients' locks;
/// `admin rotate-key` takes it exclusively, first in its transaction, then raises the
/// version (`super::admin::lock_rotation`). So a rotation waits for the transactions in
/// progress, and those that begin after it wait for its commit: a transaction reads one
/// active key version from start to end, and a patient it starts under the earlier
/// version is committed before any call can derive under the new one ([`may_start`]).
/// Shared holders do not wait for each other. No cycle can form: writers take this lock
/// before any other, and the rotation takes it before any other (the audit chain's head
/// after it, which writers take last), holding no patient's lock. A rotation gives up
/// after `super::admin::ROTATION_LOCK_TIMEOUT` rather than hold every write back behind a
/// transaction that does not end.
pub const ROTATION_LOCK: (i32, i32) = (0x45524e52, 1);

/// The advisory-lock key of a patient: the first 8 bytes of SHA-256 over a label, the
/// registry id and the pseudonym. Defined here, not by `std`'s hasher (which may change
/// between Rust releases), so that every instance, of any version (a rolling upgrade
/// runs two), takes the same lock for the same patient. A collision between two patients
/// only makes one wait for the other.
fn patient_lock_key(registry_id: i64, pseudonym: &str) -> i64 {
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    digest.update(b"ern-registry patient lock v1\0");
    digest.update(&registry_id.to_be_bytes());
    digest.update(pseudonym.as_bytes());
    let mut key = [0u8; 8];
    key.copy_from_slice(&digest.finish().as_ref()[..8]);
    i64::from_be_bytes(key)
}

/// The consent history with the attested decisions appended as if already on file.
async fn consent_with(
    conn: &mut Db<'_>,
    registry_id: i64,
    pseudonym: &str,
    attested: &[ConsentDecision],
) -> Result<Vec<ConsentEvent>, StoreError> {
    let mut events = cases::load_consent(conn, registry_id, pseudonym).await?;
    with_attested(&mut events, attested);
    Ok(events)
}

/// Whether `attested` grants REGISTRY_INCLUSION with a date before the latest
/// REGISTRY_INCLUSION decision on file: a grant that loses to a decision recorded after
/// the date it claims.
fn attested_before_a_later_decision(
    on_file: &[ConsentEvent],
    attested: &[ConsentDecision],
) -> bool {
    let latest = on_file
        .iter()
        .filter(|e| e.scope == Scope::RegistryInclusion)
        .map(|e| e.given_at)
        .max();
    attested.iter().any(|d| {
        d.scope == Scope::RegistryInclusion
            && d.decision == Decision::Granted
            && latest.is_some_and(|latest| d.given_at < latest)
    })
}

/// What a back-dated attestation can probe for (docs/consent.md, "What a physician still
/// learns"): seen by the operator, not the caller.
fn note_back_dated_refusal(principal_id: i64, what: &str) {
    metrics::counter!("ern_back_dated_attestation_refusals_total").increment(1);
    warn!(
        principal = principal_id,
        "{what} attesting an inclusion dated before a later decision on file was refused"
    );
}

/// Appends the attested decisions to a history read from file, as if already on file.
fn with_attested(events: &mut Vec<ConsentEvent>, attested: &[ConsentDecision]) {
    let next = events.last().map_or(0, |e| e.seq) + 1;
    events.extend(attested.iter().enumerate().map(|(i, d)| ConsentEvent {
        seq: next + i as i64,
        scope: d.scope,
        decision: d.decision,
        given_at: d.given_at,
        expires_at: d.expires_at,
    }));
}

async fn record_attestation(
    conn: &mut Db<'_>,
    registry_id: i64,
    pseudonym: &str,
    attested: &[ConsentDecision],
    principal_id: i64,
    now: DateTime<Utc>,
) -> Result<Vec<i64>, StoreError> {
    let mut ids = Vec::with_capacity(attested.len());
    for decision in attested {
        ids.push(
            cases::append_consent(
                conn,
                registry_id,
                pseudonym,
                decision,
                principal_id,
                Source::PhysicianAttestation,
                now,
            )
            .await?,
        );
    }
    Ok(ids)
}

/// A submission on its own: a run of one ([`submit_run`] holds the rules).
async fn submit(
    conn: &mut Db<'_>,
    rules: &dyn ConsentRules,
    c: &SubmitCase,
    wrote: &mut Wrote,
) -> Result<Written, WriteError> {
    let Some((result, written)) = submit_run(conn, rules, &[c]).await?.pop() else {
        return Err(WriteError::Store(StoreError::Corrupt(
            "a run of one submission answered nothing".into(),
        )));
    };
    *wrote = written;
    result
}

/// The end of the run of submissions that starts at `start`: consecutive `Submit`
/// commands about distinct patients (so that none needs to see what another of the run
/// wrote). `start + 1` when `start` is not a submission.
fn submit_run_end(commands: &[(&Command, Option<&Entry>)], start: usize) -> usize {
    let mut patients = BTreeSet::new();
    let mut end = start;
    while let Some((Command::Submit(c), _)) = commands.get(end) {
        if !patients.insert((c.registry_id, c.pseudonym.as_str())) {
            break;
        }
        end += 1;
    }
    end.max(start + 1)
}

/// [`submit`] for a run of submissions about distinct patients, with the same checks in
/// the same order, but one statement per table for the whole run: the consent histories
/// and existing cases are read at once, each submission is decided on its own, and what
/// the accepted ones write goes in multi-row statements. Answers in the order of `run`.
async fn submit_run(
    conn: &mut Db<'_>,
    rules: &dyn ConsentRules,
    run: &[&SubmitCase],
) -> Result<Vec<(Result<Written, WriteError>, Wrote)>, StoreError> {
    let patients: Vec<(i64, &str)> = run
        .iter()
        .map(|c| (c.registry_id, c.pseudonym.as_str()))
        .collect();
    let cases::OnFile {
        mut histories,
        cases: existing,
        key_versions,
    } = cases::consent_and_cases_many(conn, &patients).await?;
    let mut outcomes: Vec<(Result<Written, WriteError>, Wrote)> = Vec::with_capacity(run.len());
    // The accepted submissions: index in `run`, history with the attestation, instant.
    let mut accepted = Vec::with_capacity(run.len());
    for (i, c) in run.iter().enumerate() {
        let mut events = histories
            .remove(&(c.registry_id, c.pseudonym.clone()))
            .unwrap_or_default();
        let first = events.is_empty();
        let back_dated = attested_before_a_later_decision(&events, &c.consent);
        with_attested(&mut events, &c.consent);
        let at = rules.effective_at(&events, c.now);
        let starts = if first {
            may_start(&c.pseudonym, key_versions.get(&c.registry_id).copied())
        } else {
            Ok(())
        };
        // Consent first: a submission refused for consent gets that one answer whatever
        // is on file (`docs/security.md`, "Refusals"), also during a rotation.
        let decided = match (rules.may_store_case(&events, at), starts) {
            (Err(refused), _) => {
                if back_dated {
                    note_back_dated_refusal(c.principal_id, "a submission");
                }
                Err(WriteError::Consent(refused))
            }
            // A submission's pseudonym is derived under the active version read by the
            // call: one the registry never had means the database went back (a restore
            // to before a rotation), not a caller's mistake.
            (Ok(()), Err(WriteError::UnknownKeyVersion)) => {
                Err(WriteError::Store(StoreError::Corrupt(
                    "a submission's pseudonym is of a key version the registry does not have \
                     (was the database restored to before a key rotation?)"
                        .into(),
                )))
            }
            (Ok(()), Err(cannot_start)) => Err(cannot_start),
            (Ok(()), Ok(()))
                if existing.contains(&(c.registry_id, c.pseudonym.clone(), c.centre_id)) =>
            {
                Err(WriteError::AlreadyExists)
            }
            (Ok(()), Ok(())) => {
                accepted.push((i, events, at));
                Ok(Written {
                    version: 1,
                    recorded_at: c.now,
                })
            }
        };
        outcomes.push((decided, Wrote::default()));
    }
    if accepted.is_empty() {
        return Ok(outcomes);
    }
    // The patients' numbers, made for those new to the registry (in the order of the run,
    // after every number given before: migration 0019).
    let wanted: Vec<(i64, &str)> = accepted
        .iter()
        .map(|(i, _, _)| (run[*i].registry_id, run[*i].pseudonym.as_str()))
        .collect();
    let keys = cases::patient_keys_many(conn, &wanted).await?;
    let patient_ids = wanted
        .iter()
        .map(|&(r, p)| {
            keys.get(&(r, p.to_owned())).copied().ok_or_else(|| {
                StoreError::Corrupt("a patient of the run came back without a number".into())
            })
        })
        .collect::<Result<Vec<i64>, StoreError>>()?;
    let decisions: Vec<cases::NewDecision<'_>> = accepted
        .iter()
        .zip(&patient_ids)
        .flat_map(|((i, _, _), &patient)| {
            let c = run[*i];
            c.consent.iter().map(move |decision| cases::NewDecision {
                registry_id: c.registry_id,
                pseudonym: &c.pseudonym,
                patient,
                decision,
                recorded_by: c.principal_id,
                source: Source::PhysicianAttestation,
                now: c.now,
            })
        })
        .collect();
    let mut event_ids = cases::append_consent_many(conn, &decisions)
        .await?
        .into_iter();
    for (i, _, _) in &accepted {
        outcomes[*i].1.consent_events = event_ids.by_ref().take(run[*i].consent.len()).collect();
    }
    let new_cases: Vec<cases::NewCase<'_>> = accepted
        .iter()
        .zip(&patient_ids)
        .map(|((i, _, _), &patient)| {
            let c = run[*i];
            cases::NewCase {
                registry_id: c.registry_id,
                pseudonym: &c.pseudonym,
                patient,
                centre_id: c.centre_id,
                recorded_by: c.principal_id,
                row: &c.row,
                now: c.now,
            }
        })
        .collect();
    let case_ids = cases::insert_cases_many(conn, &new_cases).await?;
    // Slots for the research rows the run creates, where rows get them as they are
    // inserted: a patient with no case on file has no research row (the row represents
    // one of their cases and goes with the last of them). Were one there all the same, it
    // would keep its slot and the number given here would go unused.
    let with_a_case: HashSet<(i64, &str)> =
        existing.iter().map(|(r, p, _)| (*r, p.as_str())).collect();
    let new_rows: Vec<bool> = accepted
        .iter()
        .map(|(i, _, _)| !with_a_case.contains(&(run[*i].registry_id, run[*i].pseudonym.as_str())))
        .collect();
    let mut next_slots = if cases::slots_at_insert(conn) && new_rows.contains(&true) {
        let registries: BTreeSet<i64> = accepted
            .iter()
            .zip(&new_rows)
            .filter(|(_, new)| **new)
            .map(|((i, _, _), _)| run[*i].registry_id)
            .collect();
        cases::next_slots(conn, registries).await?
    } else {
        HashMap::new()
    };
    let representatives: Vec<(i64, i64, &str, Option<i64>, cases::Representative<'_>)> = accepted
        .iter()
        .zip(case_ids)
        .zip(&patient_ids)
        .zip(new_rows)
        .map(|((((i, events, at), case_id), &patient), new_row)| {
            let c = run[*i];
            let (eligible, eligible_until) = rules.research_eligibility(events, *at);
            let slot = next_slots
                .get_mut(&c.registry_id)
                .filter(|_| new_row)
                .map(|next| {
                    *next += 1;
                    *next - 1
                });
            (
                c.registry_id,
                patient,
                c.pseudonym.as_str(),
                slot,
                cases::Representative {
                    case_id,
                    version: 1,
                    centre_id: c.centre_id,
                    row: &c.row,
                    eligible,
                    eligible_until,
                },
            )
        })
        .collect();
    cases::set_representatives_many(conn, &representatives).await?;
    Ok(outcomes)
}

/// Makes the version just written represent the patient in research counts, with the
/// eligibility its consent history gives.
#[allow(clippy::too_many_arguments)]
async fn represent(
    conn: &mut Db<'_>,
    rules: &dyn ConsentRules,
    registry_id: i64,
    pseudonym: &str,
    case_id: i64,
    version: i64,
    centre_id: i64,
    row: &CaseRow,
    events: &[ConsentEvent],
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let (eligible, eligible_until) = rules.research_eligibility(events, now);
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

async fn update(
    conn: &mut Db<'_>,
    rules: &dyn ConsentRules,
    c: &UpdateCase,
    wrote: &mut Wrote,
) -> Result<Written, WriteError> {
    // The history is read first, whether or not the case exists, so that a case that
    // does not exist and one without consent take the same steps.
    let events = consent_with(conn, c.registry_id, &c.pseudonym, &c.consent).await?;
    let Some((case_id, current)) =
        cases::find_case(conn, c.registry_id, &c.pseudonym, c.centre_id).await?
    else {
        return Err(WriteError::NotFound);
    };
    // Consent before the version, and without it the answer for a case that does not
    // exist: a record the caller may not see (consent lapsed, refused) is not told apart
    // from an erased one, also not by a stale `expected_version`, and the audit entry says
    // NOT_FOUND too. An attestation sent with the update counts, so a renewed consent
    // still brings a lapsed record back.
    let at = rules.effective_at(&events, c.now);
    if rules.may_store_case(&events, at).is_err() {
        // The attested decisions are the history's last (`with_attested`).
        let on_file = &events[..events.len().saturating_sub(c.consent.len())];
        if attested_before_a_later_decision(on_file, &c.consent) {
            note_back_dated_refusal(c.principal_id, "an update");
        }
        return Err(WriteError::NotFound);
    }
    if current != c.expected_version {
        return Err(WriteError::VersionConflict { current });
    }
    wrote.consent_events = record_attestation(
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
        rules,
        c.registry_id,
        &c.pseudonym,
        case_id,
        version,
        c.centre_id,
        &c.row,
        &events,
        at,
    )
    .await?;
    Ok(Written {
        version,
        recorded_at: c.now,
    })
}

/// Whether a command may record the first decision on file for `pseudonym`, given the
/// registry's active key version read in the command's transaction: only under that
/// version (`docs/pseudonyms.md`, "Key rotation"). Past a rotation, no patient can be
/// started under an earlier version, so a call that derives under the new one and finds
/// nothing on file under the earlier ones cannot be overtaken by one still in flight
/// from before it (which would split the patient across two pseudonyms).
/// A pseudonym of a version the registry never had (0, or above the active one; or of a
/// registry without one) was never given by it: [`WriteError::UnknownKeyVersion`], as no
/// retry helps.
fn may_start(pseudonym: &str, active: Option<i64>) -> Result<(), WriteError> {
    match (crate::pseudonym::key_version_of(pseudonym), active) {
        (Some(version), Some(active)) if i64::from(version) == active => Ok(()),
        (Some(version), Some(active)) if version >= 1 && i64::from(version) < active => {
            Err(WriteError::KeyRotated)
        }
        _ => Err(WriteError::UnknownKeyVersion),
    }
}

/// [`may_start`] for a command about one patient whose history on file is `history`.
async fn check_start(
    conn: &mut Db<'_>,
    registry_id: i64,
    pseudonym: &str,
    history: &[ConsentEvent],
) -> Result<(), WriteError> {
    if !history.is_empty() {
        return Ok(());
    }
    let active = cases::active_key_version(conn, registry_id).await?;
    may_start(pseudonym, active)
}

async fn record_consent(
    conn: &mut Db<'_>,
    rules: &dyn ConsentRules,
    c: &RecordConsent,
    wrote: &mut Wrote,
) -> Result<Output, WriteError> {
    let before = cases::load_consent(conn, c.registry_id, &c.pseudonym).await?;
    check_start(conn, c.registry_id, &c.pseudonym, &before).await?;
    let after = consent_with(conn, c.registry_id, &c.pseudonym, &c.decisions).await?;
    let at = rules.effective_at(&after, c.now);
    if rules.ends_inclusion(&before, &after, at)
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
    wrote.consent_events.clone_from(&ids);
    refresh_eligibility(conn, rules, c.registry_id, &c.pseudonym).await?;
    Ok(Output::Consent(ids))
}

async fn withdraw(
    conn: &mut Db<'_>,
    rules: &dyn ConsentRules,
    c: &Withdraw,
    wrote: &mut Wrote,
) -> Result<Output, WriteError> {
    let mut events = Vec::with_capacity(Scope::ALL.len());
    let mut erased = None;
    // Dated no earlier than anything on file, so that it is in force from its commit on,
    // also over a decision another instance committed, dated after this call arrived.
    let history = cases::load_consent(conn, c.registry_id, &c.pseudonym).await?;
    check_start(conn, c.registry_id, &c.pseudonym, &history).await?;
    let given_at = rules.effective_at(&history, c.now);
    let scopes = crate::consent::withdrawn_scopes(&history, &c.scopes, given_at);
    for &scope in &scopes {
        let decision = ConsentDecision {
            scope,
            decision: Decision::Withdrawn,
            given_at,
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
        wrote.consent_events.push(id);
        if scope == Scope::RegistryInclusion {
            let counts = consent_store::erase_patient(conn, c.registry_id, &c.pseudonym).await?;
            let tombstone = consent_store::insert_erasure(
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
            wrote.erasures.push(tombstone);
            erased = Some(counts);
        }
    }
    refresh_eligibility(conn, rules, c.registry_id, &c.pseudonym).await?;
    Ok(Output::Withdrawn { events, erased })
}

/// Recomputes the research eligibility of the patient's research row (if it has one) from
/// the decisions on file; after appending consent events without a case write.
async fn refresh_eligibility(
    conn: &mut Db<'_>,
    rules: &dyn ConsentRules,
    registry_id: i64,
    pseudonym: &str,
) -> Result<(), StoreError> {
    let events = cases::load_consent(conn, registry_id, pseudonym).await?;
    // The decisions in force from the latest date given on file on, as `consent_current`
    // holds them; whether the earlier expiry has passed is the query's business.
    let (eligible, until) = match events.iter().map(|e| e.given_at).max() {
        Some(latest) => rules.research_eligibility(&events, latest),
        None => (false, None),
    };
    cases::set_eligibility(conn, registry_id, pseudonym, eligible, until).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_is_retried_command_by_command_only_when_the_database_answered() {
        use std::io::{Error, ErrorKind};
        let refused =
            StoreError::Database(sqlx::Error::Io(Error::from(ErrorKind::ConnectionRefused)));
        assert_eq!(retry_after(&refused), Retry::None);
        assert!(!waited_for_database(&refused));
        let no_connection = StoreError::Database(sqlx::Error::PoolTimedOut);
        assert_eq!(retry_after(&no_connection), Retry::None);
        assert!(waited_for_database(&no_connection));
        let unknown = StoreError::CommitUnknown { cause: "x".into() };
        assert_eq!(retry_after(&unknown), Retry::None);
        // A statement the database refused: one command may be the cause.
        let refusal = StoreError::Sqlite(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CONSTRAINT),
            None,
        ));
        assert_eq!(retry_after(&refusal), Retry::Each);
        assert!(!waited_for_database(&refusal));
        assert_eq!(retry_after(&StoreError::Corrupt("x".into())), Retry::Each);
    }

    #[test]
    fn an_attested_grant_dated_before_a_later_inclusion_decision_is_recognised() {
        let at = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc);
        let event = |scope, decision, given: &str| ConsentEvent {
            seq: 1,
            scope,
            decision,
            given_at: at(given),
            expires_at: None,
        };
        let grant = |scope, given: &str| ConsentDecision {
            scope,
            decision: Decision::Granted,
            given_at: at(given),
            form_version: "f".into(),
            expires_at: None,
        };
        let withdrawn = [event(
            Scope::RegistryInclusion,
            Decision::Withdrawn,
            "2024-01-01T00:00:00Z",
        )];
        let old = [grant(Scope::RegistryInclusion, "1990-01-01T00:00:00Z")];
        let new = [grant(Scope::RegistryInclusion, "2025-01-01T00:00:00Z")];
        assert!(attested_before_a_later_decision(&withdrawn, &old));
        assert!(!attested_before_a_later_decision(&withdrawn, &new));
        assert!(!attested_before_a_later_decision(&[], &old));
        let other_scope = [event(
            Scope::ResearchUse,
            Decision::Withdrawn,
            "2024-01-01T00:00:00Z",
        )];
        assert!(!attested_before_a_later_decision(&other_scope, &old));
        assert!(!attested_before_a_later_decision(
            &withdrawn,
            &[grant(Scope::ResearchUse, "1990-01-01T00:00:00Z")]
        ));
    }

    #[test]
    fn patient_lock_keys_are_fixed_by_their_definition() {
        // Instances of different versions share a database during a rolling upgrade: a
        // changed key would let them write about one patient at once.
        assert_eq!(
            patient_lock_key(3, "R003-0123456789abcdef"),
            -5385635654714174390
        );
        assert_ne!(
            patient_lock_key(3, "R003-0123456789abcdef"),
            patient_lock_key(4, "R003-0123456789abcdef")
        );
        assert_ne!(
            patient_lock_key(3, "R003-0123456789abcdef"),
            patient_lock_key(3, "R003-0123456789abcdee")
        );
    }
}
