//! Authentication (API keys) and authorisation (role and ERN) of every call.
//!
//! An API key reads `ern_<key id: 16 hex>_<secret: 64 hex>`. The key id is public and
//! indexes the `api_keys` row; the secret is 256 random bits, shown once when issued, of
//! which only a keyed hash is stored: HMAC-SHA256, under a pepper derived with HKDF from
//! the master secret, of the key id and the secret ([`KeyHasher`]).
//!
//! Why not a password hash. Argon2id and its kin make guessing a *low-entropy* password
//! expensive; a 256-bit random secret cannot be guessed at any price, so their slowness
//! buys nothing against a thief of the table, while it costs the service tens of
//! milliseconds and 19 MiB per attempt: a flood of wrong secrets for a (public) key id
//! took every core. The pepper adds what a plain hash would not: whoever can write the
//! `api_keys` table but does not hold the master secret cannot plant a key of their own.
//! Verification is one HMAC, compared in constant time (`ring::hmac::verify`), on every
//! call; nothing needs caching.
//!
//! Keys issued by earlier versions carry an Argon2id hash, which anyone who can write the
//! table can make without the master secret: such hashes never match unless the operator
//! accepts them while those keys are migrated (`serve --accept-argon2-key-hashes`,
//! [`KeyVerifier::accepting_argon2`]), and then only at the costs earlier versions used
//! ([`earlier_version_hash`]). Such a key is verified with
//! Argon2id once and, on success, re-stored as HMAC ([`Verdict::Migrate`]). At most one
//! Argon2 run goes on at a time, and a call that finds it busy is refused at once
//! ([`Verdict::Busy`]) rather than queued: a flood against a key id not yet migrated costs
//! at most one core, and no memory beyond that one run.
//!
//! The only memory kept per key is what a successful call adds: [`KeyVerifier`] remembers
//! the stored hash of keys that authenticated a call in this process (right secret, live
//! key, bound certificate presented), so that a caller whose network
//! address has used up its allowance of refusals (`refusals`) can still be let through,
//! without a database read, when it presents a valid key.
//!
//! Authorisation is deny by default: a handler states the role it needs and the registry
//! it touches, and [`Principal`] refuses anything else.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use argon2::password_hash::PasswordHash;
use argon2::{Algorithm, Argon2, Params, Version};
use ring::{hkdf, hmac, rand::SecureRandom};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::Semaphore;
use tracing::warn;
use zeroize::Zeroizing;

use crate::keys::MasterSecret;

/// Most Argon2 verifications (of keys not yet migrated) running at once.
pub const MAX_CONCURRENT_ARGON2: usize = 1;
/// Most keys remembered as verified; past this, the table is cleared and refills.
const KNOWN_CAPACITY: usize = 100_000;
const KEY_PREFIX: &str = "ern_";
/// How a stored HMAC hash starts; the rest is 64 hex digits.
pub const HMAC_HASH_PREFIX: &str = "hmac-sha256$";
const PEPPER_SALT: &[u8] = b"ern-registry";
const PEPPER_INFO: &[u8] = b"ern-registry api key pepper v1";
const HASH_LABEL: &[u8] = b"ern-registry api key v1";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Physician,
    ConsentOfficer,
    Researcher,
    Admin,
}

impl Role {
    pub const ALL: [Role; 4] = [
        Role::Physician,
        Role::ConsentOfficer,
        Role::Researcher,
        Role::Admin,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Physician => "physician",
            Role::ConsentOfficer => "consent_officer",
            Role::Researcher => "researcher",
            Role::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        let s = s.replace('-', "_");
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The centre a principal belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CentreRef {
    pub id: i64,
    pub code: String,
    pub country: String,
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub id: i64,
    pub name: String,
    pub role: Role,
    pub centre: Option<CentreRef>,
    /// Registries this principal may act on: those of its centre's ERNs, plus those it is
    /// bound to directly.
    pub registries: BTreeSet<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing credentials: send `authorization: Bearer <api key>`")]
    MissingCredentials,
    #[error("invalid API key")]
    InvalidKey,
    #[error("this call needs the {needed} role")]
    WrongRole { needed: &'static str },
    #[error("your principal is not bound to a centre")]
    NoCentre,
    #[error("this principal must call over a connection with its bound client certificate")]
    CertificateMismatch,
    #[error("you are not a member of the ERN that keeps registry {registry}")]
    ForeignRegistry { registry: String },
    /// The web console: a wrong name, password or code (which one is not said).
    #[error("wrong name, password or code")]
    SignInFailed,
    /// The web console: no session, or one that was ended (signed out, disabled).
    #[error("you are not signed in")]
    NoSession,
    /// The web console: the principal is bound to client certificates, which the console
    /// cannot check.
    #[error(
        "this account is bound to client certificates: it works over gRPC with one of them, not in the web console"
    )]
    ConsoleCertificateBound,
    /// The web console: the session passed its idle or absolute time limit.
    #[error("your session has expired; sign in again")]
    SessionExpired,
}

impl Principal {
    /// Deny unless the caller has `role`.
    pub fn require_role(&self, role: Role) -> Result<(), AuthError> {
        if self.role == role {
            Ok(())
        } else {
            Err(AuthError::WrongRole {
                needed: role.as_str(),
            })
        }
    }

    /// Deny unless the caller may act on registry `registry_id` (named `code` in errors).
    pub fn require_registry(&self, registry_id: i64, code: &str) -> Result<(), AuthError> {
        if self.registries.contains(&registry_id) {
            Ok(())
        } else {
            Err(AuthError::ForeignRegistry {
                registry: code.to_owned(),
            })
        }
    }

    pub fn require_centre(&self) -> Result<&CentreRef, AuthError> {
        self.centre.as_ref().ok_or(AuthError::NoCentre)
    }
}

/// The SHA-256 fingerprint (lower-case hex) of a DER-encoded certificate.
pub fn certificate_fingerprint(der: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, der))
}

/// A presented API key, split into its public id and its secret (never printed; wiped
/// on drop; read only by this module, to hash it).
pub struct PresentedKey {
    pub key_id: String,
    secret: SecretString,
}

impl PresentedKey {
    /// Parses `ern_<16 hex>_<64 hex>`; anything else is [`AuthError::InvalidKey`].
    pub fn parse(token: &str) -> Result<PresentedKey, AuthError> {
        let rest = token
            .strip_prefix(KEY_PREFIX)
            .ok_or(AuthError::InvalidKey)?;
        let (id, secret) = rest.split_once('_').ok_or(AuthError::InvalidKey)?;
        let is_hex = |s: &str, n: usize| {
            s.len() == n
                && s.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        if !is_hex(id, 16) || !is_hex(secret, 64) {
            return Err(AuthError::InvalidKey);
        }
        Ok(PresentedKey {
            key_id: id.to_owned(),
            secret: SecretString::from(secret),
        })
    }

    /// From gRPC metadata `authorization: Bearer <key>`.
    pub fn from_metadata(
        metadata: &tonic::metadata::MetadataMap,
    ) -> Result<PresentedKey, AuthError> {
        let value = metadata
            .get("authorization")
            .ok_or(AuthError::MissingCredentials)?
            .to_str()
            .map_err(|_| AuthError::InvalidKey)?;
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .ok_or(AuthError::MissingCredentials)?;
        PresentedKey::parse(token.trim())
    }
}

/// A newly issued API key: the full token (show it once: `token.expose_secret()`) and
/// what to store.
pub struct IssuedKey {
    pub token: SecretString,
    pub key_id: String,
    pub secret_hash: String,
}

fn unhex32(s: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

/// The Argon2 memory cost (KiB), passes and lanes keys of earlier versions were hashed
/// with: the OWASP-recommended minimum (19 MiB, 2 passes, 1 lane).
const EARLIER_M_COST: u32 = 19 * 1024;
const EARLIER_T_COST: u32 = 2;
const EARLIER_P_COST: u32 = 1;

/// The costs keys of earlier versions were hashed with: the highest a stored key hash may
/// name ([`earlier_version_hash`]).
fn earlier_params() -> Params {
    Params::new(EARLIER_M_COST, EARLIER_T_COST, EARLIER_P_COST, None)
        .expect("static Argon2 parameters are valid")
}

/// Argon2id as keys of earlier versions were hashed.
#[cfg(test)]
fn argon2() -> Argon2<'static> {
    Argon2::new(Algorithm::Argon2id, Version::V0x13, earlier_params())
}

/// `phc` parsed, if it is a hash an earlier version could have written: Argon2id, version
/// 0x13, a 32-byte output, and costs no higher than [`argon2`]'s. A stored hash names its
/// own costs, and a row written by hand could name gigabytes or hours: refused unread.
fn earlier_version_hash(phc: &str) -> Option<PasswordHash<'_>> {
    let parsed = PasswordHash::new(phc).ok()?;
    let algorithm = Algorithm::try_from(parsed.algorithm).ok()?;
    let params = Params::try_from(&parsed).ok()?;
    let fits = algorithm == Algorithm::Argon2id
        && parsed.version == Some(Version::V0x13 as u32)
        && parsed.hash.is_some_and(|h| h.len() == 32)
        && params.m_cost() <= EARLIER_M_COST
        && params.t_cost() <= EARLIER_T_COST
        && params.p_cost() == EARLIER_P_COST;
    fits.then_some(parsed)
}

/// Argon2id verifications on threads of their own, each reusing one block buffer.
///
/// Run on tokio's blocking pool, each verification allocated its memory (19 MiB) on
/// whichever of up to 512 threads took it, and glibc kept those allocations in the
/// threads' arenas: after a flood of console sign-ins about 300 MB stayed resident. Here
/// `threads` long-lived threads (started at the first run) each keep one buffer, wiped
/// after every run, so what Argon2 holds is at most `threads` buffers of the costs
/// allowed. A run starts only when a thread is free ([`Argon2Runner::try_verify`]):
/// nothing queues.
pub struct Argon2Runner {
    threads: usize,
    /// The highest costs a stored hash may name: a row written by hand could name
    /// gigabytes or hours, and is refused unread.
    max: Params,
    free: Arc<Semaphore>,
    /// The threads' queue, once they are started (at the first run).
    jobs: std::sync::Mutex<Option<std::sync::mpsc::Sender<Argon2Job>>>,
}

struct Argon2Job {
    password: Zeroizing<Vec<u8>>,
    phc: String,
    answer: tokio::sync::oneshot::Sender<bool>,
    /// A thread's place, given back when the run ends (not when its caller gives up).
    _free: tokio::sync::OwnedSemaphorePermit,
}

impl std::fmt::Debug for Argon2Runner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Argon2Runner")
            .field("threads", &self.threads)
            .finish_non_exhaustive()
    }
}

impl Argon2Runner {
    /// `threads` runs at once, of hashes whose costs are at most `max`'s.
    pub fn new(threads: usize, max: Params) -> Argon2Runner {
        Argon2Runner {
            threads,
            max,
            free: Arc::new(Semaphore::new(threads)),
            jobs: std::sync::Mutex::new(None),
        }
    }

    /// Whether `password` matches the PHC string `phc` (false for one that is not
    /// Argon2id v0x13 within the costs allowed); `None` at once when every thread is busy.
    /// The run goes on to its end if the future is dropped.
    pub fn try_verify(
        &self,
        password: &[u8],
        phc: &str,
    ) -> Option<impl Future<Output = bool> + Send + 'static> {
        let free = Arc::clone(&self.free).try_acquire_owned().ok()?;
        let (answer, answered) = tokio::sync::oneshot::channel();
        let job = Argon2Job {
            password: Zeroizing::new(password.to_vec()),
            phc: phc.to_owned(),
            answer,
            _free: free,
        };
        let mut jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        if jobs.is_none() {
            *jobs = self.start_threads();
        }
        // No thread could be started, or none is left: busy (started again at the next
        // run), never a wrong password.
        if jobs.as_ref()?.send(job).is_err() {
            *jobs = None;
            return None;
        }
        drop(jobs);
        Some(async move { answered.await.unwrap_or(false) })
    }

    /// Starts the threads; `None` when none could be.
    fn start_threads(&self) -> Option<std::sync::mpsc::Sender<Argon2Job>> {
        let (sender, receiver) = std::sync::mpsc::channel::<Argon2Job>();
        let receiver = Arc::new(std::sync::Mutex::new(receiver));
        let mut started = 0;
        for i in 0..self.threads {
            let (receiver, max) = (Arc::clone(&receiver), self.max.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("argon2-{i}"))
                .spawn(move || run_argon2_jobs(&receiver, &max));
            match spawned {
                Ok(_) => started += 1,
                Err(err) => warn!(error = %err, "an Argon2 thread could not be started"),
            }
        }
        (started > 0).then_some(sender)
    }
}

/// An Argon2 thread: runs the jobs it takes in one buffer of its own, until the runner
/// (the queue's sender) is dropped.
fn run_argon2_jobs(jobs: &std::sync::Mutex<std::sync::mpsc::Receiver<Argon2Job>>, max: &Params) {
    let mut blocks = Vec::new();
    loop {
        let Ok(Ok(job)) = jobs.lock().map(|jobs| jobs.recv()) else {
            return;
        };
        let Argon2Job {
            password,
            phc,
            answer,
            _free,
        } = job;
        let ok = argon2_verify(&mut blocks, max, &password, &phc);
        // The place is free before the answer: a caller that tries again once answered
        // finds it free.
        drop(_free);
        let _ = answer.send(ok);
    }
}

/// Whether `password` matches `phc`, computed in `blocks` (grown to the hash's memory
/// cost, kept, and wiped after the run); false for a hash that is not Argon2id v0x13
/// within `max`'s costs.
fn argon2_verify(
    blocks: &mut Vec<argon2::Block>,
    max: &Params,
    password: &[u8],
    phc: &str,
) -> bool {
    use zeroize::Zeroize;
    let Ok(parsed) = PasswordHash::new(phc) else {
        return false;
    };
    let (Some(salt), Some(expected)) = (parsed.salt, parsed.hash) else {
        return false;
    };
    let Ok(params) = Params::try_from(&parsed) else {
        return false;
    };
    let fits = Algorithm::try_from(parsed.algorithm) == Ok(Algorithm::Argon2id)
        && parsed.version == Some(Version::V0x13 as u32)
        && params.m_cost() <= max.m_cost()
        && params.t_cost() <= max.t_cost()
        && params.p_cost() <= max.p_cost();
    if !fits {
        return false;
    }
    let mut salt_bytes = [0u8; 64];
    let Ok(salt) = salt.decode_b64(&mut salt_bytes) else {
        return false;
    };
    let count = params.block_count();
    if blocks.len() < count {
        blocks.resize(count, argon2::Block::default());
    }
    let mut out = Zeroizing::new(vec![0u8; expected.len()]);
    let computed = Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password_into_with_memory(password, salt, &mut out, &mut blocks[..count]);
    blocks[..count].iter_mut().for_each(Zeroize::zeroize);
    // `Output`'s equality is constant-time.
    computed.is_ok() && argon2::password_hash::Output::new(&out).is_ok_and(|out| out == expected)
}

/// The keyed hash of API key secrets: HMAC-SHA256 under a pepper derived from the master
/// secret (HKDF, its own label, so it is unrelated to every pseudonym and audit key).
///
/// The pepper stays a `ring::hmac::Key` rather than a `secrecy` box: ring gives no way to
/// read a key's bytes back and its `Debug` names only the algorithm, which is all a
/// `SecretBox` adds; ring does not wipe it on drop, but it lives as long as the process.
pub struct KeyHasher(hmac::Key);

impl std::fmt::Debug for KeyHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyHasher(..)")
    }
}

impl KeyHasher {
    pub fn derive(master: &MasterSecret) -> KeyHasher {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, PEPPER_SALT).extract(master.expose_secret());
        let okm = prk
            .expand(&[PEPPER_INFO], hmac::HMAC_SHA256)
            .expect("an HMAC-SHA256 key is a valid HKDF-SHA256 length");
        KeyHasher(hmac::Key::from(okm))
    }

    /// label ‖ len(key id) ‖ key id ‖ secret: the key id binds a hash to its row.
    fn message(key_id: &str, secret: &str) -> Zeroizing<Vec<u8>> {
        let mut msg = Zeroizing::new(Vec::with_capacity(
            HASH_LABEL.len() + 8 + key_id.len() + secret.len(),
        ));
        msg.extend_from_slice(HASH_LABEL);
        msg.extend_from_slice(&(key_id.len() as u64).to_be_bytes());
        msg.extend_from_slice(key_id.as_bytes());
        msg.extend_from_slice(secret.as_bytes());
        msg
    }

    /// The stored form: `hmac-sha256$<64 hex>`.
    pub fn hash(&self, key_id: &str, secret: &str) -> String {
        let tag = hmac::sign(&self.0, &Self::message(key_id, secret));
        format!("{HMAC_HASH_PREFIX}{}", hex::encode(tag.as_ref()))
    }

    /// Whether `secret` is the one hashed to `stored` (constant time).
    fn verify(&self, key_id: &str, secret: &str, stored: &[u8; 32]) -> bool {
        hmac::verify(&self.0, &Self::message(key_id, secret), stored).is_ok()
    }
}

/// Issues a fresh key, hashed with `hasher`.
pub fn issue_key(
    rng: &dyn SecureRandom,
    hasher: &KeyHasher,
) -> Result<IssuedKey, ring::error::Unspecified> {
    let mut id = [0u8; 8];
    let mut secret = Zeroizing::new([0u8; 32]);
    rng.fill(&mut id)?;
    rng.fill(secret.as_mut())?;
    let key_id = hex::encode(id);
    let mut secret_hex = Zeroizing::new([0u8; 64]);
    hex::encode_to_slice(secret.as_ref(), secret_hex.as_mut()).expect("32 bytes are 64 hex digits");
    let secret_hex = std::str::from_utf8(secret_hex.as_ref()).expect("hex digits are ASCII");
    let secret_hash = hasher.hash(&key_id, secret_hex);
    // Allocated once at its final size: nothing is reallocated (and left unwiped), and
    // boxing it into the `SecretString` copies nothing.
    let mut token = String::with_capacity(KEY_PREFIX.len() + key_id.len() + 1 + secret_hex.len());
    token.push_str(KEY_PREFIX);
    token.push_str(&key_id);
    token.push('_');
    token.push_str(secret_hex);
    let token = SecretString::from(token);
    Ok(IssuedKey {
        token,
        key_id,
        secret_hash,
    })
}

/// A stored hash, by kind.
enum StoredHash<'a> {
    Hmac([u8; 32]),
    /// An Argon2 PHC string of an earlier version.
    Argon2(&'a str),
    Unknown,
}

impl<'a> StoredHash<'a> {
    fn parse(stored: &'a str) -> StoredHash<'a> {
        if let Some(hex) = stored.strip_prefix(HMAC_HASH_PREFIX) {
            return unhex32(hex).map_or(StoredHash::Unknown, StoredHash::Hmac);
        }
        if stored.starts_with("$argon2") {
            return StoredHash::Argon2(stored);
        }
        StoredHash::Unknown
    }
}

/// What checking a presented secret against a stored hash found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The secret matches.
    Valid,
    /// The secret matches an Argon2 hash of an earlier version: store this HMAC hash
    /// instead, so that the key never costs Argon2 again.
    Migrate(String),
    /// It does not match (or the stored hash is of no known kind).
    Invalid,
    /// The hash is Argon2 and the one Argon2 run allowed at a time is taken: refused
    /// without trying, so that a flood cannot queue work or memory.
    Busy,
}

/// Counts of the work authentication did, for the metrics and for tests that assert a
/// flood did not cause it.
#[derive(Debug, Default)]
pub struct AuthCounters {
    argon2_runs: AtomicU64,
    key_lookups: AtomicU64,
}

impl AuthCounters {
    /// Argon2 verifications started (keys of earlier versions).
    pub fn argon2_runs(&self) -> u64 {
        self.argon2_runs.load(Ordering::Relaxed)
    }

    /// API key rows read from the database.
    pub fn key_lookups(&self) -> u64 {
        self.key_lookups.load(Ordering::Relaxed)
    }

    pub(crate) fn looked_up_key(&self) {
        self.key_lookups.fetch_add(1, Ordering::Relaxed);
    }
}

/// A key that authenticated a call ([`KeyVerifier::remember`]).
#[derive(Clone, PartialEq, Eq)]
struct Known {
    /// Its stored HMAC hash.
    hash: [u8; 32],
    /// The bound client certificate it came with; `None`: its principal is bound to none.
    certificate: Option<String>,
}

/// Verifies presented secrets against stored hashes.
pub struct KeyVerifier {
    hasher: Arc<KeyHasher>,
    /// Whether Argon2id hashes of earlier versions are verified (and migrated) at all
    /// (`serve --accept-argon2-key-hashes`); otherwise they never match.
    accepts_argon2: bool,
    /// Key id → stored HMAC of keys verified in this process. Only a correct secret adds
    /// an entry, so its size follows the valid keys in use, not what callers send.
    known: RwLock<HashMap<String, Known>>,
    argon2: Argon2Runner,
    counters: Arc<AuthCounters>,
}

impl KeyVerifier {
    pub fn new(hasher: Arc<KeyHasher>) -> KeyVerifier {
        KeyVerifier {
            hasher,
            accepts_argon2: false,
            known: RwLock::new(HashMap::new()),
            argon2: Argon2Runner::new(MAX_CONCURRENT_ARGON2, earlier_params()),
            counters: Arc::new(AuthCounters::default()),
        }
    }

    /// Whether Argon2id hashes of earlier versions are verified (off by default: a hash
    /// anyone with write access to `api_keys` can make, without the master secret).
    pub fn accepting_argon2(mut self, accepts: bool) -> KeyVerifier {
        self.accepts_argon2 = accepts;
        self
    }

    pub fn hasher(&self) -> &Arc<KeyHasher> {
        &self.hasher
    }

    pub fn counters(&self) -> &Arc<AuthCounters> {
        &self.counters
    }

    /// Checks `key`'s secret against `stored_hash` (an HMAC hash, or an Argon2 PHC string
    /// of an earlier version).
    pub async fn verify(&self, key: &PresentedKey, stored_hash: &str) -> Verdict {
        match StoredHash::parse(stored_hash) {
            StoredHash::Hmac(stored) => {
                if self
                    .hasher
                    .verify(&key.key_id, key.secret.expose_secret(), &stored)
                {
                    Verdict::Valid
                } else {
                    Verdict::Invalid
                }
            }
            StoredHash::Argon2(_) if !self.accepts_argon2 => {
                metrics::counter!("ern_argon2_key_hash_refusals_total").increment(1);
                warn!(
                    key_id = %key.key_id,
                    "an API key with an Argon2id hash of an earlier version was refused: reissue the key, or start with --accept-argon2-key-hashes while such keys are migrated"
                );
                Verdict::Invalid
            }
            StoredHash::Argon2(phc) => match earlier_version_hash(phc) {
                Some(parsed) => self.verify_argon2(key, parsed).await,
                None => {
                    metrics::counter!("ern_argon2_key_hash_refusals_total").increment(1);
                    warn!(
                        key_id = %key.key_id,
                        "an API key's stored Argon2 hash is not one an earlier version wrote (algorithm, version or costs): refused without running it"
                    );
                    Verdict::Invalid
                }
            },
            StoredHash::Unknown => Verdict::Invalid,
        }
    }

    async fn verify_argon2(&self, key: &PresentedKey, parsed: PasswordHash<'_>) -> Verdict {
        // Fail fast: a call that would wait for Argon2 is refused, never queued. The run
        // goes on if the caller gives up, and holds its place until it ends.
        let Some(run) = self
            .argon2
            .try_verify(key.secret.expose_secret().as_bytes(), &parsed.to_string())
        else {
            metrics::counter!("ern_argon2_busy_total").increment(1);
            return Verdict::Busy;
        };
        self.counters.argon2_runs.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("ern_argon2_verifications_total").increment(1);
        if !run.await {
            return Verdict::Invalid;
        }
        Verdict::Migrate(self.hasher.hash(&key.key_id, key.secret.expose_secret()))
    }

    /// Remembers `key` as one that authenticated a call in this process: its secret
    /// verified against `hmac_hash` (the stored HMAC hash, or the one a migration stores),
    /// the key was live, and `certificate` is the bound client certificate it came with
    /// (`None` for a principal bound to none). Only then: a key that verifies but is
    /// revoked, expired or disabled is never remembered ([`KeyVerifier::forget`] it
    /// instead), and one presented without its bound certificate is not either, so neither
    /// passes the allowance of its address (`refusals`).
    pub fn remember(&self, key: &PresentedKey, hmac_hash: &str, certificate: Option<&str>) {
        let StoredHash::Hmac(hash) = StoredHash::parse(hmac_hash) else {
            return;
        };
        let stored = Known {
            hash,
            certificate: certificate.map(str::to_owned),
        };
        let held = |known: &HashMap<String, Known>| known.get(&key.key_id) == Some(&stored);
        // Every authenticated call comes here: most find their key held already.
        if self.known.read().is_ok_and(|known| held(&known)) {
            return;
        }
        if let Ok(mut known) = self.known.write() {
            if held(&known) {
                return;
            }
            if known.len() >= KNOWN_CAPACITY {
                known.clear();
            }
            known.insert(key.key_id.clone(), stored);
        }
    }

    /// Whether `key` is one that authenticated a call in this process ([`Self::remember`]),
    /// with its secret and, for a principal bound to client certificates, over a
    /// connection presenting the certificate it authenticated with: no database read.
    /// Says nothing about whether the key is still live (the caller then authenticates in
    /// full, and a key found dead is forgotten); used to let a valid caller through while
    /// its address is refused.
    pub fn known_good(&self, key: &PresentedKey, certificate: Option<&str>) -> bool {
        let stored = self
            .known
            .read()
            .map(|m| m.get(&key.key_id).cloned())
            .unwrap_or(None);
        stored.is_some_and(|stored| {
            stored
                .certificate
                .as_deref()
                .is_none_or(|bound| certificate == Some(bound))
                && self
                    .hasher
                    .verify(&key.key_id, key.secret.expose_secret(), &stored.hash)
        })
    }

    /// Keys remembered as verified.
    pub fn known_keys(&self) -> usize {
        self.known.read().map(|m| m.len()).unwrap_or(0)
    }

    /// Forgets `key_id` if it was remembered with no certificate, or with one not in
    /// `bound`: its principal has been bound to certificates since (or to others), and
    /// the key alone must not keep the pass.
    pub fn forget_unless_bound_to(&self, key_id: &str, bound: &[String]) {
        if let Ok(mut known) = self.known.write()
            && known.get(key_id).is_some_and(|k| {
                k.certificate
                    .as_ref()
                    .is_none_or(|c| !bound.iter().any(|b| b == c))
            })
        {
            known.remove(key_id);
        }
    }

    /// Forgets a key: one whose secret verified but which authenticates no call any more
    /// (revoked, expired, disabled). Not for one presented without its bound certificate:
    /// whoever holds the certificate keeps the pass (a thief of the key alone must not be
    /// able to take it from them).
    pub fn forget(&self, key_id: &str) {
        if let Ok(mut known) = self.known.write() {
            known.remove(key_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;

    fn phc(algorithm: Algorithm, m_cost: u32, t_cost: u32, password: &str) -> String {
        use argon2::password_hash::{PasswordHasher, SaltString};
        let params = Params::new(m_cost, t_cost, 1, None).unwrap();
        Argon2::new(algorithm, Version::V0x13, params)
            .hash_password(
                password.as_bytes(),
                &SaltString::encode_b64(&[7u8; 16]).unwrap(),
            )
            .unwrap()
            .to_string()
    }

    #[test]
    fn argon2_runs_in_one_reused_buffer_and_only_within_the_costs_allowed() {
        let max = Params::new(64, 2, 1, None).unwrap();
        let mut blocks = Vec::new();
        let right = phc(Algorithm::Argon2id, 64, 2, "correct horse");
        assert!(argon2_verify(&mut blocks, &max, b"correct horse", &right));
        assert_eq!(blocks.len(), 64);
        let buffer = blocks.as_ptr();
        assert!(!argon2_verify(&mut blocks, &max, b"correct horsf", &right));
        // A smaller hash runs in the same buffer, which is wiped after every run.
        let small = phc(Algorithm::Argon2id, 32, 1, "battery");
        assert!(argon2_verify(&mut blocks, &max, b"battery", &small));
        assert_eq!(blocks.as_ptr(), buffer);
        assert!(blocks.iter().all(|b| b.as_ref().iter().all(|&w| w == 0)));
        // Costs above those allowed, another algorithm, garbage: no match, nothing run.
        let mut untouched = Vec::new();
        for refused in [
            phc(Algorithm::Argon2id, 128, 2, "correct horse"),
            phc(Algorithm::Argon2id, 64, 3, "correct horse"),
            phc(Algorithm::Argon2i, 64, 2, "correct horse"),
            phc(Algorithm::Argon2d, 64, 2, "correct horse"),
            "$argon2id$v=19$m=4194304,t=2,p=1$BwcHBwcHBwcHBwcHBwcHBw$AAAA".to_owned(),
            "not a hash".to_owned(),
        ] {
            assert!(
                !argon2_verify(&mut untouched, &max, b"correct horse", &refused),
                "{refused}"
            );
        }
        assert!(untouched.is_empty());
    }

    #[tokio::test]
    async fn argon2_runs_never_queue_and_keep_their_place_until_they_end() {
        let runner = Argon2Runner::new(1, Params::default());
        let hash = phc(Algorithm::Argon2id, Params::DEFAULT_M_COST, 2, "pw");
        let first = runner.try_verify(b"pw", &hash).expect("a free thread");
        // The one thread is taken: refused at once, not queued.
        assert!(runner.try_verify(b"pw", &hash).is_none());
        // A caller that gives up does not free the thread while its run goes on.
        drop(first);
        assert!(runner.try_verify(b"pw", &hash).is_none());
        let mut next = None;
        for _ in 0..200 {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            next = runner.try_verify(b"pw", &hash);
            if next.is_some() {
                break;
            }
        }
        assert!(next.expect("free again once the run ended").await);
        assert!(!runner.try_verify(b"pv", &hash).unwrap().await);
    }

    #[test]
    fn role_round_trips_and_accepts_dashes() {
        for role in Role::ALL {
            assert_eq!(Role::parse(role.as_str()), Some(role));
        }
        assert_eq!(Role::parse("consent-officer"), Some(Role::ConsentOfficer));
        assert_eq!(Role::parse("root"), None);
    }

    #[test]
    fn malformed_keys_are_rejected() {
        for bad in [
            "",
            "ern_",
            "ern_0123456789abcdef",
            "ern_0123456789abcdef_short",
            "xyz_0123456789abcdef_0000000000000000000000000000000000000000000000000000000000000000",
            "ern_0123456789ABCDEF_0000000000000000000000000000000000000000000000000000000000000000",
        ] {
            assert!(PresentedKey::parse(bad).is_err(), "{bad}");
        }
    }

    fn hasher(seed: u8) -> Arc<KeyHasher> {
        Arc::new(KeyHasher::derive(&MasterSecret::from_bytes([seed; 32])))
    }

    fn wrong(token: &str) -> PresentedKey {
        let mut wrong = token.to_string();
        let last = wrong.pop().unwrap();
        wrong.push(if last == '0' { '1' } else { '0' });
        PresentedKey::parse(&wrong).unwrap()
    }

    /// The Argon2id PHC string an earlier version stored for `token`'s secret.
    fn legacy_hash(token: &str) -> String {
        use argon2::password_hash::{PasswordHasher, SaltString};
        let secret = &token[21..];
        let salt = SaltString::encode_b64(&[9u8; 16]).unwrap();
        argon2()
            .hash_password(secret.as_bytes(), &salt)
            .unwrap()
            .to_string()
    }

    #[tokio::test]
    async fn issued_key_verifies_and_a_wrong_secret_does_not() {
        let rng = SystemRandom::new();
        let verifier = KeyVerifier::new(hasher(1));
        let issued = issue_key(&rng, verifier.hasher()).unwrap();
        assert!(issued.secret_hash.starts_with(HMAC_HASH_PREFIX));
        let key = PresentedKey::parse(issued.token.expose_secret()).unwrap();
        assert_eq!(key.key_id, issued.key_id);
        assert_eq!(
            verifier.verify(&key, &issued.secret_hash).await,
            Verdict::Valid
        );
        assert_eq!(
            verifier
                .verify(&wrong(issued.token.expose_secret()), &issued.secret_hash)
                .await,
            Verdict::Invalid
        );
        assert_eq!(verifier.counters().argon2_runs(), 0);
    }

    #[tokio::test]
    async fn a_hash_is_bound_to_its_pepper_and_its_key_id() {
        let rng = SystemRandom::new();
        let issued = issue_key(&rng, &hasher(1)).unwrap();
        let key = PresentedKey::parse(issued.token.expose_secret()).unwrap();
        // Another master secret: another pepper.
        let other = KeyVerifier::new(hasher(2));
        assert_eq!(
            other.verify(&key, &issued.secret_hash).await,
            Verdict::Invalid
        );
        // The same secret under another key id.
        let moved = format!(
            "ern_{}_{}",
            "0123456789abcdef",
            &issued.token.expose_secret()[21..]
        );
        let moved = PresentedKey::parse(&moved).unwrap();
        let verifier = KeyVerifier::new(hasher(1));
        assert_eq!(
            verifier.verify(&moved, &issued.secret_hash).await,
            Verdict::Invalid
        );
        assert_eq!(verifier.verify(&key, "not a hash").await, Verdict::Invalid);
    }

    #[tokio::test]
    async fn a_legacy_argon2_hash_verifies_once_and_is_migrated() {
        let rng = SystemRandom::new();
        let refusing = KeyVerifier::new(hasher(1));
        let issued = issue_key(&rng, refusing.hasher()).unwrap();
        let legacy = legacy_hash(issued.token.expose_secret());
        let key = PresentedKey::parse(issued.token.expose_secret()).unwrap();
        // Not accepted by default: the right secret does not match, and nothing runs.
        assert_eq!(refusing.verify(&key, &legacy).await, Verdict::Invalid);
        assert_eq!(refusing.counters().argon2_runs(), 0);
        let verifier = KeyVerifier::new(hasher(1)).accepting_argon2(true);
        assert_eq!(
            verifier
                .verify(&wrong(issued.token.expose_secret()), &legacy)
                .await,
            Verdict::Invalid
        );
        match verifier.verify(&key, &legacy).await {
            Verdict::Migrate(hash) => assert_eq!(hash, issued.secret_hash),
            other => panic!("{other:?}"),
        }
        assert_eq!(verifier.counters().argon2_runs(), 2);
    }

    #[test]
    fn only_hashes_an_earlier_version_could_have_written_are_run() {
        let good = legacy_hash(&format!("ern_{:016x}_{:064x}", 1, 2));
        assert!(
            good.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{good}"
        );
        assert!(earlier_version_hash(&good).is_some());
        // Edited in place: parsed only, never run.
        for planted in [
            good.replace("m=19456", "m=1048576"),
            good.replace("t=2", "t=3"),
            good.replace("p=1", "p=2"),
            good.replace("$argon2id$", "$argon2i$"),
            good.replace("$v=19$", "$v=16$"),
            good.rsplit_once('$')
                .map(|(head, _)| format!("{head}$AAAA"))
                .unwrap(),
        ] {
            assert_ne!(planted, good);
            assert!(earlier_version_hash(&planted).is_none(), "{planted}");
        }
        // Lower costs than the earlier versions' are ones they could not have written
        // either, but cost the service less: taken.
        assert!(earlier_version_hash(&good.replace("m=19456", "m=8192")).is_some());
    }

    #[tokio::test]
    async fn argon2_is_refused_at_once_while_busy() {
        let rng = SystemRandom::new();
        let verifier = KeyVerifier::new(hasher(1)).accepting_argon2(true);
        let issued = issue_key(&rng, verifier.hasher()).unwrap();
        let legacy = legacy_hash(issued.token.expose_secret());
        let held = Arc::clone(&verifier.argon2.free)
            .try_acquire_owned()
            .unwrap();
        let key = PresentedKey::parse(issued.token.expose_secret()).unwrap();
        assert_eq!(verifier.verify(&key, &legacy).await, Verdict::Busy);
        assert_eq!(verifier.counters().argon2_runs(), 0);
        drop(held);
        assert!(matches!(
            verifier.verify(&key, &legacy).await,
            Verdict::Migrate(_)
        ));
    }

    #[tokio::test]
    async fn only_a_correct_secret_is_remembered() {
        let rng = SystemRandom::new();
        let verifier = KeyVerifier::new(hasher(1));
        let issued = issue_key(&rng, verifier.hasher()).unwrap();
        let key = PresentedKey::parse(issued.token.expose_secret()).unwrap();
        for _ in 0..100 {
            let _ = verifier
                .verify(&wrong(issued.token.expose_secret()), &issued.secret_hash)
                .await;
        }
        assert_eq!(verifier.known_keys(), 0);
        assert!(!verifier.known_good(&key, None));
        // Verifying alone remembers nothing: the caller remembers a key once it is found
        // live as well.
        assert!(matches!(
            verifier.verify(&key, &issued.secret_hash).await,
            Verdict::Valid
        ));
        assert_eq!(verifier.known_keys(), 0);
        verifier.remember(
            &wrong(issued.token.expose_secret()),
            "argon2id$not-hmac",
            None,
        );
        assert_eq!(verifier.known_keys(), 0);
        verifier.remember(&key, &issued.secret_hash, None);
        assert_eq!(verifier.known_keys(), 1);
        assert!(verifier.known_good(&key, None));
        assert!(verifier.known_good(&key, Some("any")));
        assert!(!verifier.known_good(&wrong(issued.token.expose_secret()), None));
        verifier.forget(&issued.key_id);
        assert!(!verifier.known_good(&key, None));
        // A key of a principal bound to certificates passes only with the one it came with.
        verifier.remember(&key, &issued.secret_hash, Some("cert-a"));
        assert!(verifier.known_good(&key, Some("cert-a")));
        assert!(!verifier.known_good(&key, Some("cert-b")));
        assert!(!verifier.known_good(&key, None));
        // Presented without it: the holder of cert-a keeps the pass.
        verifier.forget_unless_bound_to(&issued.key_id, &["cert-a".into()]);
        assert!(verifier.known_good(&key, Some("cert-a")));
        // Remembered before its principal was bound: the binding takes the pass away.
        verifier.remember(&key, &issued.secret_hash, None);
        verifier.forget_unless_bound_to(&issued.key_id, &["cert-a".into()]);
        assert!(!verifier.known_good(&key, None));
    }

    #[test]
    fn principal_denies_by_default() {
        let p = Principal {
            id: 1,
            name: "dr".into(),
            role: Role::Physician,
            centre: None,
            registries: BTreeSet::from([3]),
        };
        assert!(p.require_role(Role::Physician).is_ok());
        assert!(p.require_role(Role::Researcher).is_err());
        assert!(p.require_registry(3, "ERN-EYE").is_ok());
        assert!(p.require_registry(4, "ERN-LUNG").is_err());
        assert_eq!(p.require_centre(), Err(AuthError::NoCentre));
    }
}
