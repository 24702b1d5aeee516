//! The service layer: one home for each use case's rules.
//!
//! Every use case (submit a case, record consent, withdraw, count patients, ...) is a
//! method of a service here, and owns, in this order: authentication and authorisation of
//! the caller (role, centre, ERN), pseudonym derivation (rate limited and counted; the
//! only path to [`Pseudonymiser::derive`] outside the demo generator), consent policy, the
//! write through [`Writer`] or the read through the store, and the audit record of the
//! outcome ([`Call`]). It speaks domain types and [`ServiceError`]; it knows neither
//! protobuf nor gRPC. `api` converts protobuf to domain types and back and maps
//! [`ServiceError`] to a `tonic::Status` in one place; `store` runs SQL and holds no
//! policy.
//!
//! - [`cases`]: physicians submit, update and read their centre's cases;
//! - [`consent`]: consent officers record, read and withdraw consent, look up receipts;
//! - [`research`]: aggregates for researchers, where-is-the-expertise for physicians;
//! - [`admin`]: the audit log for admins;
//! - [`console`]: sign-in for people (password, TOTP, sessions, CSRF, lockout).

pub mod access;
pub mod admin;
pub mod cases;
pub mod consent;
pub mod console;
pub mod research;

use std::sync::Arc;

use tracing::{info, warn};

use crate::audit::Entry;
use crate::auth::{AuthError, KeyVerifier, PresentedKey, Principal, Role, Verdict};
use crate::clock::Clock;
use crate::consent::InclusionRefused;
use crate::domain::{CodeCatalog, FieldViolations, RegistryCode};
use crate::outcome::Outcome;
use crate::pseudonym::{PatientIdentity, Pseudonym, Pseudonymiser};
use crate::ratelimit::{CallGate, CallPermit, ItemGate, Peer, PrincipalLimiter, RateLimited};
use crate::refusals::Refusals;
use crate::store::writer::{Command, WriteError, Writer};
use crate::store::{Registry, Store, StoreError};

/// Charges `peer` one refusal, and counts it (CANCELLED) in the summary of refused calls,
/// when dropped armed: an authentication whose future is dropped before it ends
/// (`Services::authenticate`). Not while the database is unreachable: a call abandoned
/// then would not have been charged either (UNAVAILABLE).
struct ChargedIfAbandoned<'a> {
    refusals: &'a Refusals,
    database: &'a crate::health::DatabaseWatch,
    peer: crate::ratelimit::Peer,
    method: &'a str,
    armed: bool,
}

impl Drop for ChargedIfAbandoned<'_> {
    fn drop(&mut self) {
        if self.armed && self.database.is_reachable() {
            self.refusals.charge(self.peer);
            self.refusals
                .note(self.peer, "", self.method, Outcome::Cancelled.name());
        }
    }
}

/// The service's pseudonymiser, sealed: any module can hold it (`startup` builds
/// [`Services`]), only this one can derive with it, in [`Services::derive_pseudonym`],
/// behind its rate limit. The compiler keeps `api` and `console` from deriving around it.
pub struct Sealed(Pseudonymiser);

impl Sealed {
    pub fn new(pseudonymiser: Pseudonymiser) -> Sealed {
        Sealed(pseudonymiser)
    }
}

/// What the services share: the store, the writer, the key verifier, the pseudonymiser and
/// the limits. One per process, behind an `Arc`.
pub struct Services {
    pub store: Store,
    pub writer: Writer,
    pub verifier: KeyVerifier,
    /// Reachable only through [`Services::derive_pseudonym`].
    pub pseudonymiser: Sealed,
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
    /// The largest message a call may receive or answer (`--max-message-bytes`).
    pub max_message_bytes: usize,
    /// How long a bulk stream owed no result may send no item before it is ended
    /// (`--request-timeout-secs`).
    pub stream_idle_timeout: std::time::Duration,
    /// Bulk-stream items in progress per principal, across its streams.
    pub stream_items: ItemGate,
    /// Export pages being read per principal ([`cases::EXPORTS_AT_ONCE`]).
    pub exports: Arc<ItemGate>,
    /// Where research tables are protected: off the async runtime, bounded, with a deadline.
    pub protection: research::ProtectionPool,
    /// The in-memory research index; `None`: research queries scan the database.
    pub research_index: Option<research::ResearchIndex>,
    /// Whether the database answers (probed every second; see `crate::health`).
    pub database: crate::health::DatabaseWatch,
    /// The clock of every decision (`crate::clock`).
    pub clock: Arc<dyn Clock>,
    /// Key rows and registries, held while the access epoch stands (`access`).
    pub access: access::AccessCache,
    /// Reads of the access epoch, shared by the calls that start during one.
    pub epoch_reads: access::EpochReads,
    /// The code releases in force, in memory (`domain::CodeCatalog`).
    pub codes: Arc<Codes>,
    /// The web console's sign-in keys and session limits (`console`).
    pub console: console::ConsoleAuth,
}

/// How often a server looks whether another code release was put in force.
pub const CODE_REFRESH: std::time::Duration = std::time::Duration::from_secs(10);

/// The code releases in force, held in memory and swapped whole: a submission is checked
/// against one catalog from start to end, and a catalog is never changed in place.
/// [`Codes::refresh`] loads the releases in force again when they changed (another
/// release put in force by `ern-registry codes`); a server calls it at start and every
/// [`CODE_REFRESH`].
pub struct Codes {
    current: std::sync::RwLock<Arc<CodeCatalog>>,
    /// Held for a whole refresh, so two refreshes (the periodic one and one asked for)
    /// never interleave: a catalog read before a change cannot replace one read after it.
    refreshing: tokio::sync::Mutex<()>,
}

impl Codes {
    pub fn new(catalog: CodeCatalog) -> Codes {
        Codes {
            current: std::sync::RwLock::new(Arc::new(catalog)),
            refreshing: tokio::sync::Mutex::new(()),
        }
    }

    /// The catalog in force now.
    pub fn get(&self) -> Arc<CodeCatalog> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Loads the releases in force if they are not the ones in memory; logs the
    /// validation mode when it changes. Returns whether it changed.
    pub async fn refresh(&self, store: &Store) -> Result<bool, StoreError> {
        let _one_at_a_time = self.refreshing.lock().await;
        let in_force = store.code_releases_in_force().await?;
        if in_force == self.get().fingerprint() {
            return Ok(false);
        }
        let catalog = store.load_code_catalog().await?;
        info!(mode = %catalog.mode(), "code validation");
        // A release no longer in force reads 0 (a series is never removed).
        let previous = self.get();
        for old in previous.releases() {
            if !catalog.releases().any(|r| r.info.id == old.info.id) {
                metrics::gauge!("ern_code_release_in_force",
                    "system" => old.info.system.as_str(),
                    "version" => old.info.version.clone())
                .set(0.0);
            }
        }
        for release in catalog.releases() {
            metrics::gauge!("ern_code_release_in_force",
                "system" => release.info.system.as_str(),
                "version" => release.info.version.clone())
            .set(release.len() as f64);
        }
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(catalog);
        Ok(true)
    }

    /// Refreshes every [`CODE_REFRESH`] until the task is dropped.
    pub async fn keep_fresh(self: Arc<Self>, store: Store) {
        let mut tick = tokio::time::interval(CODE_REFRESH);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = self.refresh(&store).await {
                warn!(error = %e, "code releases not reloaded; checking against the ones in memory");
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
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
    /// Another change came first (ABORTED): sending the call again settles it.
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    RateLimited(#[from] RateLimited),
    #[error("the service is shutting down; retry on another instance or later")]
    Unavailable,
    #[error("{0}; retry in a moment")]
    Busy(&'static str),
    #[error("internal error")]
    Internal(#[source] StoreError),
}

impl From<StoreError> for ServiceError {
    fn from(err: StoreError) -> Self {
        ServiceError::Internal(err)
    }
}

impl From<FieldViolations> for ServiceError {
    fn from(v: FieldViolations) -> Self {
        ServiceError::Invalid(v)
    }
}

impl From<WriteError> for ServiceError {
    fn from(err: WriteError) -> Self {
        match err {
            WriteError::Consent(refused) => ServiceError::MissingConsent(refused),
            // The handler knows the registry and pseudonym and maps these itself; these
            // arms are the fallback.
            WriteError::AlreadyExists => ServiceError::CaseExists {
                registry: String::new(),
                pseudonym: String::new(),
            },
            WriteError::NotFound => ServiceError::NotFound("no such case of your centre".into()),
            WriteError::VersionConflict { current } => ServiceError::VersionConflict { current },
            WriteError::Store(err) => ServiceError::Internal(err),
            WriteError::ShuttingDown => ServiceError::Unavailable,
            e @ WriteError::UseWithdrawal => ServiceError::Precondition(e.to_string()),
            e @ WriteError::KeyRotated => ServiceError::Conflict(e.to_string()),
            // Only a pseudonym given by the caller (a consent call's `patient`) can be of
            // a version the registry does not have: a derived one is of the active one.
            e @ WriteError::UnknownKeyVersion => {
                let mut v = FieldViolations::new();
                v.push("patient.pseudonym", e.to_string());
                ServiceError::Invalid(v)
            }
        }
    }
}

impl ServiceError {
    /// How a use case that fails so ends: recorded in its audit entry, and the status
    /// code `api` answers with.
    pub fn outcome(&self) -> Outcome {
        match self {
            ServiceError::Auth(
                AuthError::MissingCredentials
                | AuthError::InvalidKey
                | AuthError::CertificateMismatch
                | AuthError::SignInFailed
                | AuthError::NoSession
                | AuthError::SessionExpired,
            ) => Outcome::Unauthenticated,
            ServiceError::Auth(_) => Outcome::PermissionDenied,
            ServiceError::Invalid(_) => Outcome::InvalidArgument,
            ServiceError::NotFound(_) => Outcome::NotFound,
            ServiceError::MissingConsent(_) => Outcome::FailedPrecondition,
            ServiceError::CaseExists { .. } => Outcome::AlreadyExists,
            ServiceError::VersionConflict { .. } | ServiceError::Conflict(_) => Outcome::Aborted,
            ServiceError::Precondition(_) => Outcome::FailedPrecondition,
            ServiceError::RateLimited(_) => Outcome::ResourceExhausted,
            ServiceError::Unavailable | ServiceError::Busy(_) => Outcome::Unavailable,
            ServiceError::Internal(cause) if cause.is_unavailable() => Outcome::Unavailable,
            ServiceError::Internal(_) => Outcome::Internal,
        }
    }
}

/// The audit record of one call, filled in as the handler learns who and what. Every
/// call is concluded with [`api::conclude`], which appends it (unless the writer
/// already did, in the transaction of the change it records).
#[derive(Debug)]
pub struct Call {
    entry: Entry,
    audited: bool,
    /// Changes made by the call's parts, audited on their own ([`Call::changed`]).
    changed: bool,
    /// Where the call came from (for refusals before authentication).
    peer: Peer,
    /// The principal's place among its calls in flight, held until the call is dropped.
    permit: Option<Arc<CallPermit>>,
    /// The access epoch read at the start of the call (`access`).
    epoch: Option<i64>,
    /// Its place in its stream's order of writes ([`Turn`]), for a bulk item.
    turn: Option<Turn>,
}

/// An item's place in the order of its stream's writes: the items of a `SubmitCases`
/// stream run side by side, but each hands its write to the writer only after the item
/// before it has handed over its own, or has ended without one (and the one before that
/// has gone too). So the writer applies
/// them in the stream's order, and of two items about one patient the first is the one
/// stored (a defences audit of 2026-12-07 saw the later one stored and the first refused
/// ALREADY_EXISTS, on a server just started).
#[derive(Debug)]
pub struct Turn {
    before: Option<tokio::sync::oneshot::Receiver<()>>,
    /// Dropped (once its write is handed over, or once the item before has gone when
    /// this one ends without a write), it lets the next item go.
    handed: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Turn {
    /// An item that ends without having waited for its turn (refused before its write,
    /// or abandoned) lets the next one go only once the item before it has gone: else an
    /// item refused early between two about one patient would let the second overtake
    /// the first (a re-check of 2026-12-07 saw that in 100 of 100 streams under an
    /// overload).
    fn drop(&mut self) {
        let (Some(before), Some(handed)) = (self.before.take(), self.handed.take()) else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    let _ = before.await;
                    drop(handed);
                });
            }
            // No runtime left (the process is ending): nothing more is written.
            Err(_) => drop(handed),
        }
    }
}

/// The turns of a stream's items, one after the other.
#[derive(Default)]
pub struct Turns {
    last: Option<tokio::sync::oneshot::Receiver<()>>,
}

impl Turns {
    /// The next item's turn.
    pub fn next_turn(&mut self) -> Turn {
        let (handed, next) = tokio::sync::oneshot::channel();
        Turn {
            before: self.last.replace(next),
            handed: Some(handed),
        }
    }
}

impl Turn {
    /// Waits until the item before has handed over its write or ended.
    async fn wait(&mut self) {
        // Kept in place while it waits: a wait cut short (the item cancelled) still has
        // its `Drop` wait for the item before.
        if let Some(before) = &mut self.before {
            let _ = before.await;
            self.before = None;
        }
    }
}

impl Call {
    /// The method, as `Service/Method`.
    pub fn method(&self) -> &str {
        &self.entry.method
    }

    /// `method` as `Service/Method`.
    pub fn new(method: &str) -> Call {
        Call {
            entry: Entry {
                method: method.into(),
                ..Entry::default()
            },
            audited: false,
            changed: false,
            peer: Peer::Unknown,
            permit: None,
            epoch: None,
            turn: None,
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

    /// Gives the call (a bulk item) its place in its stream's order of writes.
    pub fn in_turn(&mut self, turn: Turn) {
        self.turn = Some(turn);
    }

    /// Gives up the call's turn (a bulk item that has written, or will not write): the
    /// next item goes, without waiting for this one's audit entry.
    pub fn end_turn(&mut self) {
        self.turn = None;
    }

    /// Takes the principal's in-flight place out of the call, for a stream to hold while
    /// it is open.
    pub fn take_permit(&mut self) -> Option<Arc<CallPermit>> {
        self.permit.take()
    }

    /// Whether the call changed anything: its entry went to the writer with a change
    /// ([`Call::for_writer`]), or it made changes of its own calls ([`Call::changed`]).
    pub fn wrote(&self) -> bool {
        self.audited || self.changed
    }

    /// The call's parts made changes, each audited on its own (the entries of
    /// RecordConsents): the call's own entry is still its to append.
    pub fn changed(&mut self) {
        self.changed = true;
    }

    /// The entry for the writer to append with the change (and its outcome).
    pub fn for_writer(&mut self) -> Option<Entry> {
        self.audited = true;
        Some(self.entry.clone())
    }
}

/// A call while its handler runs. If it is dropped before it is concluded (the client
/// reset the stream, its deadline or the server's passed, the server is shutting down)
/// after its caller authenticated, it leaves a trace as a finished call does, with the
/// outcome CANCELLED:
/// - admitted among its principal's calls in flight, its entry is appended from a task
///   of its own, which keeps the call's place until the entry is committed (so a caller
///   that abandons calls in a loop waits for their entries like for any call);
/// - abandoned while it waited for such a place (it holds none), or a bulk item (the
///   stream holds the place), it is counted in its address's summary of refused calls
///   under its principal's name: a count, not a row each;
/// - unless its entry went to the writer with a change: the writer appends it, whatever
///   becomes of the caller.
///
/// A call abandoned before authentication is the refusal summary's (`ChargedIfAbandoned`).
/// Once [`Running::finish`] hands the call to its concluding, [`Services::record`] keeps
/// this guard over it until its entry has room in a writer's queue: a drop while the
/// entry waits for room leaves the same trace. A change's entry goes to the writer only
/// with the change ([`Services::write`]): a drop while the change waits for room leaves
/// it too.
pub struct Running {
    services: Arc<Services>,
    call: Option<Call>,
    /// The metric a call abandoned here is counted in.
    counter: Counter,
    /// Whether a drop records the call (see [`Running::disarm`]).
    armed: bool,
}

/// Where [`Running`] counts a call it records as abandoned.
enum Counter {
    /// `ern_calls_total`: a gRPC call.
    Calls,
    /// `ern_console_requests_total`: a web console request.
    Console,
    /// Nowhere: the call was concluded, and counted with its outcome then.
    Counted,
}

impl Running {
    /// A gRPC call.
    pub fn new(services: &Arc<Services>, call: Call) -> Running {
        Running::counted_in(services, call, Counter::Calls)
    }

    /// A web console request.
    pub fn console(services: &Arc<Services>, call: Call) -> Running {
        Running::counted_in(services, call, Counter::Console)
    }

    fn counted_in(services: &Arc<Services>, call: Call, counter: Counter) -> Running {
        Running {
            services: services.clone(),
            call: Some(call),
            counter,
            armed: true,
        }
    }

    /// From here a drop records nothing (a page that only shows an empty form, which is
    /// not audited); the call, and its place among its principal's calls in flight, are
    /// kept until the guard goes.
    pub fn disarm(&mut self) {
        self.armed = false;
    }

    /// The call, taken out: from here whoever took it answers for its entry.
    fn take(&mut self) -> Call {
        self.call.take().expect("a running call is concluded once")
    }

    /// The call, for the handler to fill in.
    pub fn call(&mut self) -> &mut Call {
        self.call
            .as_mut()
            .expect("a running call is concluded once")
    }

    /// The call, to conclude: from here its concluding owns it.
    pub fn finish(mut self) -> Call {
        self.call.take().expect("a running call is concluded once")
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let Some(call) = self.call.take() else {
            return;
        };
        if !self.armed || call.audited || call.entry.principal_id.is_none() {
            return;
        }
        match self.counter {
            Counter::Calls => metrics::counter!(
                "ern_calls_total",
                "method" => call.method().to_owned(),
                "outcome" => Outcome::Cancelled.name()
            )
            .increment(1),
            Counter::Console => metrics::counter!(
                "ern_console_requests_total",
                "action" => call.method().to_owned(),
                "outcome" => Outcome::Cancelled.name()
            )
            .increment(1),
            Counter::Counted => {}
        }
        let runtime = tokio::runtime::Handle::try_current();
        if runtime.is_err() {
            warn!(method = %call.method(), "a call abandoned after the runtime stopped is counted in its address's summary, which may have been written already");
        }
        if call.permit.is_none() || runtime.is_err() {
            self.services.refusals.note(
                call.peer,
                &call.entry.principal,
                &call.entry.method,
                Outcome::Cancelled.name(),
            );
            return;
        }
        let Ok(runtime) = runtime else { return };
        let services = self.services.clone();
        runtime.spawn(async move {
            let method = call.method().to_owned();
            if let Err(err) = services.record(call, Outcome::Cancelled).await {
                warn!(%method, error = %err, "the audit entry of an abandoned call was not committed");
            }
        });
    }
}

/// What a caller presents: the API key (or why none could be read), the fingerprint of
/// its client certificate (mutual TLS) and where it called from. Built by `api` from the
/// request's metadata and connection.
pub struct Credentials {
    pub key: Result<PresentedKey, AuthError>,
    pub certificate: Option<String>,
    pub peer: Peer,
}

impl Services {
    /// Hands a change to its writer with the call's entry, and waits until both are
    /// committed (or the change refused, its entry with the refusal). The entry goes only
    /// once the change has room in the writer's queue: a call dropped while it waits for
    /// room is still the [`Running`] guard's to record (CANCELLED), as nothing was handed
    /// over; from the hand-over on, the writer appends the entry with the change's outcome.
    pub async fn write(
        &self,
        command: Command,
        call: &mut Call,
    ) -> Result<crate::store::writer::Output, WriteError> {
        // A bulk item waits for its turn; handed over, it gives the next item its turn.
        let mut turn = call.turn.take();
        if let Some(turn) = &mut turn {
            turn.wait().await;
        }
        let room = self.writer.room(command).await?;
        let answer = room.hand_over(call.for_writer());
        drop(turn);
        answer.await
    }

    /// [`Services::write`] of a case command.
    pub async fn write_case(
        &self,
        command: Command,
        call: &mut Call,
    ) -> Result<crate::store::writer::Written, WriteError> {
        self.write(command, call).await?.into_case()
    }

    /// Appends the entry of a call that did not reach the writer (a read, a refusal).
    /// Until the entry has room in a writer's queue the call stays under a [`Running`]
    /// guard: dropped while it waits (the caller gone, its answer not sent), the call is
    /// recorded as abandoned, CANCELLED, as [`Running`] says.
    pub async fn record(self: &Arc<Self>, call: Call, outcome: Outcome) -> Result<(), WriteError> {
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
                outcome.name(),
            );
            return Ok(());
        }
        let mut waiting = Running::counted_in(self, call, Counter::Counted);
        let room = self.writer.room(Command::Audit).await;
        // From here nothing waits: the entry is handed over, or the queue is closed (the
        // writers are gone; a second try from the guard would fail the same way).
        // The call (its place among its principal's calls in flight) is kept until the
        // entry is committed.
        let mut call = waiting.take();
        let room = room?;
        let mut entry = std::mem::take(&mut call.entry);
        entry.outcome = outcome.name().into();
        room.execute(Some(entry)).await?;
        drop(call);
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
    async fn derive_pseudonym(
        &self,
        principal: &Principal,
        registry: &Registry,
        identity: &PatientIdentity,
    ) -> Result<Pseudonym, ServiceError> {
        if let Err(limited) = self.derivation_limiter.check(principal.id) {
            metrics::counter!("ern_rate_limited_total", "limit" => "pseudonym_derivations")
                .increment(1);
            return Err(limited.into());
        }
        metrics::counter!("ern_pseudonym_derivations_total", "principal" => principal.name.clone())
            .increment(1);
        let candidates = self
            .pseudonymiser
            .0
            .candidates(registry.key_ref()?, identity);
        let known = self
            .store
            .known_pseudonym(registry.id, &candidates.older())
            .await?;
        Ok(candidates.choose(known.as_deref()))
    }

    /// Authenticates a caller: a live key of an enabled principal. Then takes the
    /// principal's place among its calls in flight (held by `call`).
    ///
    /// A refusal takes one from the peer's allowance (`refusals`); a peer with none left
    /// is refused here, before any database read, unless it presents a key that
    /// authenticated a call in this process (`KeyVerifier::known_good`: another caller
    /// behind the same address).
    pub async fn authenticate(
        &self,
        credentials: &Credentials,
        call: &mut Call,
    ) -> Result<Principal, ServiceError> {
        let peer = credentials.peer;
        call.peer = peer;
        let key = &credentials.key;
        // A key that authenticated a call in this process: it passes an exhausted
        // allowance, and its call is not charged if abandoned.
        let known_good = key.as_ref().is_ok_and(|key| {
            self.verifier
                .known_good(key, credentials.certificate.as_deref())
        });
        if let Err(limited) = self.refusals.check(peer)
            && !known_good
        {
            metrics::counter!("ern_rate_limited_total", "limit" => "peer_refusals").increment(1);
            return Err(limited.into());
        }
        // Abandoned half-way (the client reset the stream, a deadline passed, perhaps while
        // its key was read from the database), it costs the address as a failure would;
        // unless its key authenticated a call in this process (it would have passed).
        let method = call.method().to_owned();
        let mut pending = ChargedIfAbandoned {
            refusals: &self.refusals,
            database: &self.database,
            peer,
            method: &method,
            armed: !known_good,
        };
        let result = match key {
            Ok(key) => {
                self.authenticate_key(key, credentials.certificate.as_deref(), call)
                    .await
            }
            Err(e) => Err(e.clone().into()),
        };
        pending.armed = false;
        let principal = match result {
            Ok(principal) => principal,
            Err(err) => {
                if matches!(err, ServiceError::Busy(_)) || err.outcome() == Outcome::Unauthenticated
                {
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

    /// Checks a presented key against its row (as the database holds it when the call
    /// starts, through the access cache, `access`: revocation, expiry and
    /// disabling take effect at once). A key of an earlier version, hashed with Argon2id,
    /// is re-stored as HMAC once verified.
    pub async fn authenticate_key(
        &self,
        key: &PresentedKey,
        certificate: Option<&str>,
        call: &mut Call,
    ) -> Result<Principal, ServiceError> {
        let epoch = self.access_epoch(call).await?;
        let record = match self.access.key(epoch, &key.key_id) {
            Some(record) => record,
            None => {
                self.verifier.counters().looked_up_key();
                let Some(record) = self.store.load_key(&key.key_id).await? else {
                    // A key deleted since it was verified here no longer passes an
                    // address's spent allowance either.
                    self.verifier.forget(&key.key_id);
                    return Err(AuthError::InvalidKey.into());
                };
                self.access.hold_key(epoch, &key.key_id, &record);
                record
            }
        };
        // The key id is public (it names the key, it does not unlock it): a failed
        // attempt on a key that exists is recorded under it. (Ids that name no key are
        // not: they are whatever the caller chose.)
        call.entry.principal = format!("key:{}", key.key_id);
        let now = self.clock.now();
        let live = record.revoked_at.is_none()
            && record.expires_at.is_none_or(|exp| exp > now)
            && !record.principal_disabled;
        // Verify even a dead key, so that refusing it costs what refusing a wrong secret
        // costs.
        // A migrated key is remembered under its new HMAC hash (`KeyVerifier::remember`).
        let mut migrated = None;
        let verified = match self.verifier.verify(key, &record.secret_hash).await {
            Verdict::Valid => true,
            Verdict::Migrate(hash) => {
                migrated = Some(hash.clone());
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
            Verdict::Busy => return Err(ServiceError::Busy("API key verification is busy")),
        };
        if !verified {
            return Err(AuthError::InvalidKey.into());
        }
        if !live {
            // Its holder keeps nothing from having used it before (`refusals`).
            self.verifier.forget(&key.key_id);
            return Err(AuthError::InvalidKey.into());
        }
        call.by(&record.principal);
        // A principal bound to client certificates must present one of them (mutual
        // TLS): a stolen key alone is not enough.
        let bound = &record.bound_certificates;
        if !bound.is_empty() && !certificate.is_some_and(|c| bound.iter().any(|b| b == c)) {
            self.verifier.forget_unless_bound_to(&key.key_id, bound);
            return Err(AuthError::CertificateMismatch.into());
        }
        let presented = certificate.filter(|_| !bound.is_empty());
        let hmac_hash = migrated.as_deref().unwrap_or(&record.secret_hash);
        self.verifier.remember(key, hmac_hash, presented);
        Ok(record.principal)
    }

    /// The access epoch of the call: read from the database once, at its first need.
    async fn access_epoch(&self, call: &mut Call) -> Result<i64, ServiceError> {
        if let Some(epoch) = call.epoch {
            return Ok(epoch);
        }
        // Read in place on SQLite (a few microseconds, less than handing it to a shared
        // read); shared between the calls that arrive while it runs elsewhere.
        let shared = if self.store.reads_in_place() {
            None
        } else {
            self.epoch_reads.read().await
        };
        let epoch = match shared {
            Some(epoch) => epoch,
            // Or the shared read failed: read alone, for the database's own error.
            None => self.store.access_epoch().await?,
        };
        call.epoch = Some(epoch);
        Ok(epoch)
    }

    /// Authenticates and requires `role`.
    pub async fn authorize(
        &self,
        credentials: &Credentials,
        role: Role,
        call: &mut Call,
    ) -> Result<Principal, ServiceError> {
        let principal = self.authenticate(credentials, call).await?;
        principal.require_role(role)?;
        Ok(principal)
    }

    /// Resolves a registry named in a request and checks the caller may act on it.
    /// A malformed code is a field violation; an unknown one NOT_FOUND, without the code:
    /// neither the answer nor the call's audit entry repeats what the caller typed there
    /// until it names a registry (it could be an identifier typed in the wrong field).
    pub async fn registry_for(
        &self,
        call: &mut Call,
        principal: &Principal,
        code: &str,
        field: &str,
    ) -> Result<Registry, ServiceError> {
        let code = RegistryCode::parse(code).map_err(|e| {
            let mut v = FieldViolations::new();
            v.push(field, e.to_string());
            ServiceError::Invalid(v)
        })?;
        let epoch = self.access_epoch(call).await?;
        let registry = match self.access.registry(epoch, code.as_str()) {
            Some(registry) => registry,
            None => {
                let registry = self
                    .store
                    .registry_by_code(code.as_str())
                    .await?
                    .ok_or_else(|| ServiceError::NotFound(NO_SUCH_REGISTRY.into()))?;
                self.access.hold_registry(epoch, &registry);
                registry
            }
        };
        call.registry(&registry.code);
        principal.require_registry(registry.id, &registry.code)?;
        Ok(registry)
    }
}

/// The NOT_FOUND of a registry code that no registry has: without the code
/// ([`Services::registry_for`]).
pub const NO_SUCH_REGISTRY: &str = "no registry has that code";

/// The registries `principal` may act on (its centre's ERNs' and its own), in order.
pub async fn registries_of(
    services: &Services,
    principal: &Principal,
) -> Result<Vec<Registry>, ServiceError> {
    Ok(services
        .store
        .list_registries()
        .await?
        .into_iter()
        .filter(|r| principal.registries.contains(&r.id))
        .collect())
}

/// Parses a pseudonym of `registry`; one of another registry is a field violation.
pub fn parse_pseudonym(text: &str, registry: &Registry) -> Result<Pseudonym, ServiceError> {
    let mut v = FieldViolations::new();
    match Pseudonym::parse(text) {
        Ok(p) if i64::from(p.registry_seq()) == registry.id => return Ok(p),
        Ok(_) => v.push("pseudonym", "belongs to another registry"),
        Err(e) => v.push("pseudonym", e.to_string()),
    }
    Err(ServiceError::Invalid(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An authentication dropped half-way is charged to its address and counted
    /// (CANCELLED); one that ended is not charged by the guard (its outcome decides), nor
    /// one dropped while the database is unreachable.
    #[test]
    fn an_abandoned_authentication_is_charged_to_its_address() {
        let refusals = Refusals::per_minute(1);
        let database = crate::health::DatabaseWatch::new("sqlite::memory:");
        let peer = crate::ratelimit::Peer::of(Some("192.0.2.7:1".parse().unwrap()));
        let guard = |armed| ChargedIfAbandoned {
            refusals: &refusals,
            database: &database,
            peer,
            method: "CaseService/GetCase",
            armed,
        };
        drop(guard(false));
        assert!(refusals.check(peer).is_ok());
        database.set_reachable(false);
        drop(guard(true));
        assert!(refusals.check(peer).is_ok());
        database.set_reachable(true);
        drop(guard(true));
        assert!(refusals.check(peer).is_err());
        let counted: Vec<(String, i64)> = refusals
            .drain()
            .into_iter()
            .map(|e| (e.outcome, e.items))
            .collect();
        assert_eq!(counted, [("CANCELLED".to_string(), 1)]);
    }

    /// The writer records a command's outcome in its audit entry itself: it must be the
    /// outcome the caller is answered with.
    #[test]
    fn the_writer_audits_the_outcome_the_caller_gets() {
        let errors = [
            WriteError::AlreadyExists,
            WriteError::NotFound,
            WriteError::VersionConflict { current: 2 },
            WriteError::Store(StoreError::Corrupt("x".into())),
            WriteError::ShuttingDown,
            WriteError::UseWithdrawal,
            WriteError::KeyRotated,
            WriteError::UnknownKeyVersion,
        ];
        for e in errors {
            let outcome = e.outcome();
            assert_eq!(ServiceError::from(e).outcome(), outcome);
        }
    }
}
