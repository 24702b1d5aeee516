//! Sign-in for people: the web console's passwords, TOTP second factor, sessions, CSRF
//! tokens and lockout. The console (`crate::console`) is HTTP and HTML only; every rule
//! about who may sign in, for how long a session lives and when an account is held back
//! is here, and every page then calls the same use cases as gRPC (`service::consent`,
//! `service::research`, ...) with the [`Principal`] a session yields.
//!
//! - **Password**: Argon2id (19 MiB, 2 passes: `Argon2::default()`), a fresh salt each;
//!   a person's password has little entropy, unlike an API key's secret, so here the slow
//!   hash earns its cost. At most [`MAX_CONCURRENT_SIGN_INS`] Argon2 runs at once, on
//!   threads of their own that keep their memory ([`Argon2Runner`]); a sign-in that finds
//!   them taken is refused at once (UNAVAILABLE), never queued. A stored hash that names
//!   higher costs, or another algorithm, matches no password.
//! - **TOTP** (RFC 6238: SHA-1, 6 digits, 30 s, one step of drift either way). The secret
//!   is sealed with AES-256-GCM under a key derived from the master secret (bound to the
//!   principal's id), so a copy of the database alone does not give the second factor. A
//!   code is accepted once: the step of the last accepted code is kept.
//! - **Lockout**: after [`LOCK_AFTER`] failures in a row with one name, each further
//!   failure holds sign-ins with that name back for 1 minute, doubling up to 1 hour;
//!   refused while held, even with the right password. Counted per name tried, whether it
//!   names a console user or not, so that being held back tells nothing about the name; a
//!   name's count is forgotten [`FORGET_FAILURES_AFTER`] after its last failure (once its
//!   hold has ended). The counter is in the database (every instance sees it), keyed by an
//!   HMAC of the name ([`name_mac`]), timed by the services' clock. Failures also take
//!   from the network peer's allowance of refusals (`refusals`), as a wrong API key does.
//! - **Sessions** are rows keyed by the HMAC-SHA256 of a 256-bit random token under a key
//!   derived from the master secret (the cookie holds the token, the database only its
//!   MAC), so that whoever can write to the database but lacks the master secret cannot
//!   plant a session (a defences audit of 2026-12-07 did, when the key was a plain
//!   SHA-256, and signed in as any officer); they end on sign-out, after
//!   `idle` without a request, `absolute` after sign-in, when the principal is disabled, or
//!   when its password or second factor is set again.
//! - **CSRF**: each form carries HMAC-SHA256(key from the master secret, session token),
//!   checked in constant time; the sign-in form, before any session, one of a random
//!   pre-session cookie.

use std::sync::{Arc, OnceLock};

use argon2::Argon2;
use argon2::password_hash::{PasswordHasher, SaltString};
use chrono::{DateTime, Duration, Utc};
use ring::rand::{SecureRandom, SystemRandom};
use ring::{aead, hkdf, hmac};
use secrecy::{ExposeSecret, SecretString};
use totp_rs::{Algorithm, TOTP};
use tracing::info;
use zeroize::Zeroizing;

use super::{Call, ServiceError, Services};
use crate::auth::{Argon2Runner, AuthError, Principal};
use crate::keys::MasterSecret;
use crate::ratelimit::{Limit, Peer, RateLimited};

/// Argon2 runs (sign-ins) at once; further sign-ins are refused at once.
pub const MAX_CONCURRENT_SIGN_INS: usize = 2;
/// Failed sign-ins in a row before the account is held back.
pub const LOCK_AFTER: i64 = 5;
/// The first hold; doubles with every further failure.
pub const FIRST_LOCK: Duration = Duration::minutes(1);
/// The longest hold.
pub const MAX_LOCK: Duration = Duration::hours(1);
/// How long after its last failure a name's failures are forgotten (once its hold ended).
pub const FORGET_FAILURES_AFTER: Duration = Duration::hours(24);
/// Passwords: at least this many characters.
pub const MIN_PASSWORD_CHARS: usize = 12;
const MAX_PASSWORD_CHARS: usize = 256;
/// TOTP: seconds per step, digits.
const TOTP_STEP: i64 = 30;
const TOTP_DIGITS: usize = 6;
const TOTP_SECRET_BYTES: usize = 20;
/// The issuer an authenticator app shows.
pub const TOTP_ISSUER: &str = "ern-registry";

const SALT: &[u8] = b"ern-registry";
const SEAL_INFO: &[u8] = b"ern-registry console totp seal v1";
const CSRF_INFO: &[u8] = b"ern-registry console csrf v1";
const NAME_INFO: &[u8] = b"ern-registry console sign-in names v1";
const SESSION_INFO: &[u8] = b"ern-registry console sessions v1";
const SEALED_PREFIX: &str = "aes256gcm$";

/// How long sessions live.
#[derive(Debug, Clone, Copy)]
pub struct SessionLimits {
    /// Ended after this long without a request.
    pub idle: Duration,
    /// Ended this long after sign-in, whatever happens.
    pub absolute: Duration,
}

impl Default for SessionLimits {
    fn default() -> Self {
        SessionLimits {
            idle: Duration::minutes(15),
            absolute: Duration::hours(8),
        }
    }
}

/// The console's keys and limits: one per process, in [`Services`].
pub struct ConsoleAuth {
    seal: aead::LessSafeKey,
    csrf: hmac::Key,
    /// Keys the names sign-in failures are counted under ([`name_mac`]).
    names: hmac::Key,
    /// Keys sessions' rows by their tokens ([`token_hash`]).
    sessions: hmac::Key,
    argon2: Argon2Runner,
    pub limits: SessionLimits,
}

impl std::fmt::Debug for ConsoleAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleAuth")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

fn derive(master: &MasterSecret, info: &'static [u8], len: usize) -> Zeroizing<Vec<u8>> {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, SALT).extract(master.expose_secret());
    let mut out = Zeroizing::new(vec![0u8; len]);
    prk.expand(&[info], Len(len))
        .and_then(|okm| okm.fill(&mut out))
        .expect("HKDF-SHA256 gives 32 bytes");
    out
}

fn sealing_key(master: &MasterSecret) -> aead::LessSafeKey {
    let bytes = derive(master, SEAL_INFO, 32);
    aead::LessSafeKey::new(
        aead::UnboundKey::new(&aead::AES_256_GCM, &bytes).expect("32 bytes make an AES-256 key"),
    )
}

fn names_key(master: &MasterSecret) -> hmac::Key {
    hmac::Key::new(hmac::HMAC_SHA256, &derive(master, NAME_INFO, 32))
}

/// What failed sign-ins with `name` are counted under: its HMAC-SHA256 (hex) under a key
/// derived from the master secret, so that the names tried (a mistyped name, a password
/// typed into the name field) are not kept readable. For the admin command line, which
/// clears a name's failures with a new password; the server uses [`ConsoleAuth`]'s key.
pub fn name_mac(master: &MasterSecret, name: &str) -> String {
    mac_of(&names_key(master), name)
}

fn mac_of(key: &hmac::Key, name: &str) -> String {
    hex::encode(hmac::sign(key, name.as_bytes()).as_ref())
}

impl ConsoleAuth {
    pub fn new(master: &MasterSecret, limits: SessionLimits) -> ConsoleAuth {
        // Made now, once per process: made at the first sign-in with a name that has no
        // password, it would make that answer alone slower by a whole Argon2 hash (and
        // run it on the async runtime).
        decoy_hash();
        ConsoleAuth {
            seal: sealing_key(master),
            csrf: hmac::Key::new(hmac::HMAC_SHA256, &derive(master, CSRF_INFO, 32)),
            names: names_key(master),
            sessions: hmac::Key::new(hmac::HMAC_SHA256, &derive(master, SESSION_INFO, 32)),
            // Passwords are hashed at `Argon2::default()`'s costs ([`hash_password`]).
            argon2: Argon2Runner::new(MAX_CONCURRENT_SIGN_INS, argon2::Params::default()),
            limits,
        }
    }

    /// The CSRF token of forms in the session (or pre-session) whose token is `token`.
    pub fn csrf_token(&self, token: &str) -> String {
        hex::encode(hmac::sign(&self.csrf, token.as_bytes()).as_ref())
    }

    /// Whether `presented` is the CSRF token of `token` (constant time).
    pub fn csrf_valid(&self, token: &str, presented: &str) -> bool {
        let mut tag = [0u8; 32];
        presented.len() == 64
            && hex::decode_to_slice(presented, &mut tag).is_ok()
            && hmac::verify(&self.csrf, token.as_bytes(), &tag).is_ok()
    }
}

/// Seals a TOTP secret for `principal_id`'s row.
fn seal(key: &aead::LessSafeKey, principal_id: i64, secret: &[u8]) -> Result<String, ServiceError> {
    let mut nonce = [0u8; 12];
    SystemRandom::new()
        .fill(&mut nonce)
        .map_err(|_| ServiceError::Unavailable)?;
    let mut buf = Zeroizing::new(secret.to_vec());
    key.seal_in_place_append_tag(
        aead::Nonce::assume_unique_for_key(nonce),
        aead::Aad::from(principal_id.to_be_bytes()),
        &mut *buf,
    )
    .map_err(|_| ServiceError::Unavailable)?;
    Ok(format!(
        "{SEALED_PREFIX}{}{}",
        hex::encode(nonce),
        hex::encode(&*buf)
    ))
}

fn open(key: &aead::LessSafeKey, principal_id: i64, sealed: &str) -> Option<Zeroizing<Vec<u8>>> {
    let hex_text = sealed.strip_prefix(SEALED_PREFIX)?;
    let mut bytes = Zeroizing::new(hex::decode(hex_text).ok()?);
    if bytes.len() < 12 + 16 {
        return None;
    }
    let mut nonce = [0u8; 12];
    nonce.copy_from_slice(&bytes[..12]);
    let plain = key
        .open_in_place(
            aead::Nonce::assume_unique_for_key(nonce),
            aead::Aad::from(principal_id.to_be_bytes()),
            &mut bytes[12..],
        )
        .ok()?;
    Some(Zeroizing::new(plain.to_vec()))
}

/// The authenticator (totp-rs, RFC 6238) of `secret` for `account`.
fn authenticator(secret: &[u8], account: &str) -> TOTP {
    let account: String = account
        .chars()
        .map(|c| if c == ':' { '-' } else { c })
        .collect();
    TOTP::new_unchecked(
        Algorithm::SHA1,
        TOTP_DIGITS,
        1,
        TOTP_STEP as u64,
        secret.to_vec(),
        Some(TOTP_ISSUER.to_owned()),
        account,
    )
}

/// The TOTP code of `secret` at time step `step`.
fn totp_code(secret: &[u8], step: i64) -> Zeroizing<String> {
    let time = u64::try_from(step * TOTP_STEP).unwrap_or(0);
    Zeroizing::new(authenticator(secret, "").generate(time))
}

fn equal_ct(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The time step of `code` for `secret` at `now` (one step of drift either way) that is
/// later than `last`: a code is good once.
fn totp_step(secret: &[u8], code: &str, now: DateTime<Utc>, last: i64) -> Option<i64> {
    let code: String = code.chars().filter(|c| !c.is_whitespace()).collect();
    let current = now.timestamp().div_euclid(TOTP_STEP);
    (current - 1..=current + 1)
        .filter(|&step| step > last)
        .find(|&step| equal_ct(totp_code(secret, step).as_bytes(), code.as_bytes()))
}

/// The otpauth URI of a TOTP secret (what `admin enrol-totp` prints and shows as a QR
/// code): the secret in base32, with the issuer and the principal's name.
pub fn otpauth_uri(secret: &[u8], account: &str) -> String {
    authenticator(secret, account).get_url()
}

/// The secret of an otpauth URI (for tests and tools).
pub fn secret_of_uri(uri: &str) -> Option<Vec<u8>> {
    TOTP::from_url_unchecked(uri).ok().map(|t| t.secret.clone())
}

/// The current TOTP code of `secret` by `now` (for tests and tools).
pub fn current_code(secret: &[u8], now: DateTime<Utc>) -> String {
    totp_code(secret, now.timestamp().div_euclid(TOTP_STEP)).to_string()
}

/// Checks a new password against the policy; the message says what is wrong.
pub fn check_password(password: &str) -> Result<(), String> {
    let n = password.chars().count();
    if n < MIN_PASSWORD_CHARS {
        return Err(format!(
            "a password has at least {MIN_PASSWORD_CHARS} characters"
        ));
    }
    if n > MAX_PASSWORD_CHARS {
        return Err(format!(
            "a password has at most {MAX_PASSWORD_CHARS} characters"
        ));
    }
    Ok(())
}

/// Hashes a password with Argon2id and a fresh salt (PHC string).
pub fn hash_password(password: &str) -> Result<String, ServiceError> {
    let mut salt = [0u8; 16];
    SystemRandom::new()
        .fill(&mut salt)
        .map_err(|_| ServiceError::Unavailable)?;
    let salt = SaltString::encode_b64(&salt).map_err(|_| ServiceError::Unavailable)?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|_| ServiceError::Unavailable)
}

/// A hash no password matches, verified for names without credentials, so that a wrong
/// name costs what a wrong password costs.
fn decoy_hash() -> &'static str {
    static DECOY: OnceLock<String> = OnceLock::new();
    DECOY.get_or_init(|| {
        let mut random = [0u8; 32];
        let _ = SystemRandom::new().fill(&mut random);
        hash_password(&hex::encode(random)).unwrap_or_default()
    })
}

/// A fresh random TOTP secret for enrolment, sealed for the principal's row, and its
/// otpauth URI (shown once).
pub fn new_totp(
    master: &MasterSecret,
    principal_id: i64,
    account: &str,
) -> Result<(String, SecretString), ServiceError> {
    let mut secret = Zeroizing::new([0u8; TOTP_SECRET_BYTES]);
    SystemRandom::new()
        .fill(secret.as_mut())
        .map_err(|_| ServiceError::Unavailable)?;
    let sealed = seal(&sealing_key(master), principal_id, secret.as_ref())?;
    let uri = SecretString::from(otpauth_uri(secret.as_ref(), account));
    Ok((sealed, uri))
}

/// What a person types to sign in.
pub struct SignIn<'a> {
    pub name: &'a str,
    pub password: &'a SecretString,
    pub code: &'a str,
    pub peer: Peer,
}

/// A new session: its token (for the cookie only) and who it is for.
pub struct NewSession {
    pub token: SecretString,
    pub principal: Principal,
}

/// The key of a session's row: the HMAC-SHA256 (hex) of its token under a key derived
/// from the master secret.
fn token_hash(auth: &ConsoleAuth, token: &str) -> String {
    mac_of(&auth.sessions, token)
}

fn is_token(token: &str) -> bool {
    token.len() == 64 && token.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A fresh 256-bit random token, in hex (sessions and pre-sessions).
pub fn new_token() -> Result<SecretString, ServiceError> {
    let mut bytes = Zeroizing::new([0u8; 32]);
    SystemRandom::new()
        .fill(bytes.as_mut())
        .map_err(|_| ServiceError::Unavailable)?;
    Ok(SecretString::from(hex::encode(bytes.as_ref())))
}

/// How long the `failures`-th failure in a row with one name holds its sign-ins back, if
/// at all.
pub fn lock_for(failures: i64) -> Option<Duration> {
    if failures < LOCK_AFTER {
        return None;
    }
    let doublings = u32::try_from(failures - LOCK_AFTER)
        .unwrap_or(u32::MAX)
        .min(16);
    Some((FIRST_LOCK * 2i32.pow(doublings)).min(MAX_LOCK))
}

/// Signs a person in with name, password and TOTP code; the session is recorded in the
/// database, the sign-in (or its failure) in the audit log.
pub async fn sign_in(
    services: &Services,
    input: SignIn<'_>,
    call: &mut Call,
) -> Result<NewSession, ServiceError> {
    call.peer = input.peer;
    services.refusals.check(input.peer).inspect_err(|_| {
        metrics::counter!("ern_rate_limited_total", "limit" => "peer_refusals").increment(1);
    })?;
    let auth = &services.console;
    let now = services.clock.now();
    // Held back or not is decided per name tried, whether it names a console user or not,
    // before any check: otherwise a name that is held back after five failures while
    // others are not would tell which names are real.
    let name_mac = mac_of(&auth.names, input.name);
    let credentials = services.store.console_credentials(input.name).await?;
    if let Some(cred) = &credentials {
        call.entry.principal_id = Some(cred.principal_id);
        call.entry.principal = input.name.to_owned();
        call.entry.role = cred.role.clone();
        call.entry.centre = cred.centre.clone();
    }
    if let Some(until) = services.store.sign_in_held(&name_mac, now).await? {
        services.refusals.charge(input.peer);
        let retry_after = (until - now).to_std().unwrap_or_default();
        return Err(RateLimited {
            limit: Limit::SignInLocked,
            retry_after,
        }
        .into());
    }
    // No such principal, or no password: the same Argon2 work as a wrong password.
    let hash = credentials
        .as_ref()
        .and_then(|c| c.password_hash.as_deref())
        .unwrap_or(decoy_hash());
    // Refused as busy (both Argon2 runs taken), the attempt is charged to the address as
    // on gRPC: otherwise a flood behind a few slow attempts would be refused for free.
    let password_ok = verify_password(auth, input.password, hash)
        .await
        .inspect_err(|_| services.refusals.charge(input.peer))?;
    let step = match (&credentials, password_ok) {
        (Some(cred), true) if cred.password_hash.is_some() && !cred.disabled => {
            match &cred.totp_sealed {
                Some(sealed) => open(&auth.seal, cred.principal_id, sealed)
                    .and_then(|secret| totp_step(&secret, input.code, now, cred.totp_last_step)),
                None => None,
            }
        }
        _ => None,
    };
    // A failure: charged to the address and counted for the name, whichever check failed
    // (a wrong password or code, a code used before, a principal gone meanwhile).
    let failed = || async {
        services.refusals.charge(input.peer);
        let failures = services
            .store
            .sign_in_failed(&name_mac, now, now - FORGET_FAILURES_AFTER, lock_for)
            .await?;
        if let Some(hold) = lock_for(failures) {
            info!(
                failures,
                hold_secs = hold.num_seconds(),
                "console sign-ins with one name held back after failures"
            );
        }
        Err::<NewSession, ServiceError>(AuthError::SignInFailed.into())
    };
    let (Some(cred), Some(step)) = (credentials, step) else {
        return failed().await;
    };
    // A principal bound to client certificates calls with one of them; the console sees
    // none (said only to whoever gave the right password and code).
    if cred.certificate_bound {
        return Err(AuthError::ConsoleCertificateBound.into());
    }
    if !services
        .store
        .console_success(cred.principal_id, &name_mac, step)
        .await?
    {
        // A code used before (or raced by a sign-in with the same code): a failure like a
        // wrong code, so that a used code and the right password learn nothing for free.
        return failed().await;
    }
    let Some((principal, false)) = services.store.principal_by_id(cred.principal_id).await? else {
        return failed().await;
    };
    call.by(&principal);
    let limits = auth.limits;
    // Sessions of this principal that have ended are removed here, so the table follows
    // the live ones.
    services
        .store
        .delete_console_sessions_of(
            principal.id,
            now - limits.absolute,
            now - limits.idle,
            false,
        )
        .await?;
    let token = new_token()?;
    services
        .store
        .insert_console_session(&token_hash(auth, token.expose_secret()), principal.id, now)
        .await?;
    info!(principal = principal.id, "console sign-in");
    Ok(NewSession { token, principal })
}

async fn verify_password(
    auth: &ConsoleAuth,
    password: &SecretString,
    hash: &str,
) -> Result<bool, ServiceError> {
    let Some(run) = auth
        .argon2
        .try_verify(password.expose_secret().as_bytes(), hash)
    else {
        metrics::counter!("ern_argon2_busy_total").increment(1);
        return Err(ServiceError::Busy("sign-in is busy"));
    };
    Ok(run.await)
}

/// The principal of a live session, after the same checks an API key gets on every call
/// (the principal still enabled, its place among its calls in flight). A session past
/// its idle or absolute limit is ended here.
pub async fn session(
    services: &Services,
    token: &str,
    peer: Peer,
    call: &mut Call,
) -> Result<Principal, ServiceError> {
    call.peer = peer;
    if !is_token(token) {
        return Err(AuthError::NoSession.into());
    }
    let hash = token_hash(&services.console, token);
    let Some(row) = services.store.console_session(&hash).await? else {
        return Err(AuthError::NoSession.into());
    };
    let now = services.clock.now();
    let limits = services.console.limits;
    let ended = |at: DateTime<Utc>, limit: Duration| now - at >= limit;
    if ended(row.created_at, limits.absolute) || ended(row.last_seen_at, limits.idle) {
        services.store.delete_console_session(&hash).await?;
        return Err(AuthError::SessionExpired.into());
    }
    let principal = match services.store.principal_by_id(row.principal_id).await? {
        Some((principal, false)) => principal,
        _ => {
            services.store.delete_console_session(&hash).await?;
            return Err(AuthError::NoSession.into());
        }
    };
    call.by(&principal);
    if services.store.certificate_bound(principal.id).await? {
        services.store.delete_console_session(&hash).await?;
        return Err(AuthError::ConsoleCertificateBound.into());
    }
    services.store.touch_console_session(&hash, now).await?;
    let permit = services.calls.enter(principal.id).await.inspect_err(|_| {
        metrics::counter!("ern_rate_limited_total", "limit" => "calls_in_flight").increment(1);
    })?;
    call.permit = Some(Arc::new(permit));
    Ok(principal)
}

/// Ends a session (sign-out).
pub async fn sign_out(services: &Services, token: &str) -> Result<(), ServiceError> {
    if is_token(token) {
        services
            .store
            .delete_console_session(&token_hash(&services.console, token))
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 6238 appendix B, SHA-1 (the 8-digit codes' last 6 digits).
    #[test]
    fn totp_codes_are_rfc_6238() {
        let secret = b"12345678901234567890";
        for (t, code) in [
            (59i64, "287082"),
            (1_111_111_109, "081804"),
            (1_234_567_890, "005924"),
            (2_000_000_000, "279037"),
        ] {
            assert_eq!(totp_code(secret, t / 30).as_str(), code, "t = {t}");
        }
    }

    #[test]
    fn a_code_is_good_once_and_within_one_step() {
        let secret = b"12345678901234567890";
        let now = DateTime::from_timestamp(1_234_567_890, 0).unwrap();
        let step = now.timestamp() / 30;
        assert_eq!(totp_step(secret, "005924", now, 0), Some(step));
        assert_eq!(totp_step(secret, "005924", now, step), None);
        let later = now + Duration::seconds(30);
        assert_eq!(totp_step(secret, "005924", later, 0), Some(step));
        let much_later = now + Duration::seconds(90);
        assert_eq!(totp_step(secret, "005924", much_later, 0), None);
        assert_eq!(totp_step(secret, "000000", now, 0), None);
    }

    #[test]
    fn a_sealed_secret_opens_only_for_its_principal_and_key() {
        let master = MasterSecret::from_bytes([7; 32]);
        let key = sealing_key(&master);
        let sealed = seal(&key, 4, b"secret bytes").unwrap();
        assert_eq!(open(&key, 4, &sealed).unwrap().as_slice(), b"secret bytes");
        assert!(open(&key, 5, &sealed).is_none());
        let other = sealing_key(&MasterSecret::from_bytes([8; 32]));
        assert!(open(&other, 4, &sealed).is_none());
        assert!(!sealed.contains(&hex::encode(b"secret bytes")));
    }

    #[test]
    fn the_uri_carries_the_secret_and_gives_it_back() {
        let uri = otpauth_uri(b"12345678901234567890", "officer:one");
        assert!(
            uri.starts_with("otpauth://totp/ern-registry:officer-one?"),
            "{uri}"
        );
        assert_eq!(secret_of_uri(&uri).unwrap(), b"12345678901234567890");
    }

    #[test]
    fn csrf_tokens_belong_to_their_session() {
        let auth = ConsoleAuth::new(&MasterSecret::from_bytes([1; 32]), SessionLimits::default());
        let t = auth.csrf_token("a");
        assert!(auth.csrf_valid("a", &t));
        assert!(!auth.csrf_valid("b", &t));
        assert!(!auth.csrf_valid("a", ""));
        assert!(!auth.csrf_valid("a", &"0".repeat(64)));
    }

    #[test]
    fn lockout_starts_at_the_fifth_failure_and_doubles_to_an_hour() {
        assert_eq!(lock_for(4), None);
        assert_eq!(lock_for(5), Some(Duration::minutes(1)));
        assert_eq!(lock_for(6), Some(Duration::minutes(2)));
        assert_eq!(lock_for(11), Some(Duration::minutes(60)));
        assert_eq!(lock_for(100), Some(Duration::hours(1)));
    }

    #[test]
    fn passwords_are_hashed_with_argon2id_and_salted() {
        let a = hash_password("correct horse battery").unwrap();
        let b = hash_password("correct horse battery").unwrap();
        assert!(a.starts_with("$argon2id$"));
        assert_ne!(a, b);
        assert!(check_password("short").is_err());
        assert!(check_password("long enough password").is_ok());
    }
}
