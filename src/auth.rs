//! Authentication (API keys) and authorisation (role and ERN) of every call.
//!
//! An API key reads `ern_<key id: 16 hex>_<secret: 64 hex>`. The key id is public and
//! indexes the `api_keys` row; the secret is 256 random bits of which only an Argon2id
//! hash is stored, and it is shown once when issued.
//!
//! Argon2id costs tens of milliseconds by design, far too much for every call of a
//! service that takes thousands of submissions a second. So a successful verification is
//! remembered: the [`KeyVerifier`] keeps, per key id, an HMAC (under a random key that
//! lives only in this process) of the stored hash and the presented secret. A later call
//! with the same secret against the same stored hash matches that tag with a constant-time
//! comparison instead of paying Argon2 again. The key's database row is still read on
//! every call, so revocation, expiry and a disabled principal take effect on the very next
//! call, and a re-issued hash never matches an old tag. Failed verifications are never
//! cached, and at most [`MAX_CONCURRENT_HASHES`] Argon2 runs at once, so a flood of bad
//! keys cannot eat every core.
//!
//! Authorisation is deny by default: a handler states the role it needs and the registry
//! it touches, and [`Principal`] refuses anything else.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use ring::{hmac, rand::SecureRandom};
use tokio::sync::Semaphore;
use zeroize::Zeroizing;

/// Most Argon2 verifications running at once.
pub const MAX_CONCURRENT_HASHES: usize = 2;
/// Most remembered verifications; past this, the cache is cleared and refills.
const CACHE_CAPACITY: usize = 100_000;
const KEY_PREFIX: &str = "ern_";

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
    ring::digest::digest(&ring::digest::SHA256, der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A presented API key, split into its public id and its secret.
pub struct PresentedKey {
    pub key_id: String,
    secret: Zeroizing<String>,
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
            secret: Zeroizing::new(secret.to_owned()),
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

/// A newly issued API key: the full token (show it once) and what to store.
pub struct IssuedKey {
    pub token: Zeroizing<String>,
    pub key_id: String,
    pub secret_hash: String,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Argon2id with the OWASP-recommended minimum (19 MiB, 2 passes, 1 lane).
fn argon2() -> Argon2<'static> {
    let params = Params::new(19 * 1024, 2, 1, None).expect("static Argon2 parameters are valid");
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

/// Issues a fresh key. Slow (one Argon2id hash); call off the async executor.
pub fn issue_key(rng: &dyn SecureRandom) -> Result<IssuedKey, ring::error::Unspecified> {
    let mut id = [0u8; 8];
    let mut secret = Zeroizing::new([0u8; 32]);
    let mut salt = [0u8; 16];
    rng.fill(&mut id)?;
    rng.fill(secret.as_mut())?;
    rng.fill(&mut salt)?;
    let key_id = hex(&id);
    let secret_hex = Zeroizing::new(hex(secret.as_ref()));
    let salt = SaltString::encode_b64(&salt).map_err(|_| ring::error::Unspecified)?;
    let secret_hash = argon2()
        .hash_password(secret_hex.as_bytes(), &salt)
        .map_err(|_| ring::error::Unspecified)?
        .to_string();
    let token = Zeroizing::new(format!("{KEY_PREFIX}{key_id}_{}", secret_hex.as_str()));
    Ok(IssuedKey {
        token,
        key_id,
        secret_hash,
    })
}

/// Verifies presented secrets against stored hashes, remembering successes.
pub struct KeyVerifier {
    tag_key: hmac::Key,
    verified: RwLock<HashMap<String, hmac::Tag>>,
    hashing: Arc<Semaphore>,
}

impl KeyVerifier {
    pub fn new(rng: &dyn SecureRandom) -> Result<KeyVerifier, ring::error::Unspecified> {
        Ok(KeyVerifier {
            tag_key: hmac::Key::generate(hmac::HMAC_SHA256, rng)?,
            verified: RwLock::new(HashMap::new()),
            hashing: Arc::new(Semaphore::new(MAX_CONCURRENT_HASHES)),
        })
    }

    fn tag_message(stored_hash: &str, secret: &str) -> Zeroizing<Vec<u8>> {
        let mut msg = Zeroizing::new(Vec::with_capacity(stored_hash.len() + secret.len() + 1));
        msg.extend_from_slice(stored_hash.as_bytes());
        msg.push(0);
        msg.extend_from_slice(secret.as_bytes());
        msg
    }

    /// Whether `key`'s secret matches `stored_hash` (an Argon2 PHC string).
    pub async fn verify(&self, key: &PresentedKey, stored_hash: &str) -> bool {
        let msg = Self::tag_message(stored_hash, &key.secret);
        if self.cached(&key.key_id, &msg) {
            return true;
        }
        let Ok(_permit) = self.hashing.clone().acquire_owned().await else {
            return false;
        };
        // Many calls with a key not yet cached (a client opening with a burst) queue
        // here; the first one to get a permit verifies, the rest find its result.
        if self.cached(&key.key_id, &msg) {
            return true;
        }
        let secret = key.secret.clone();
        let stored = stored_hash.to_owned();
        let ok = tokio::task::spawn_blocking(move || {
            PasswordHash::new(&stored)
                .map(|parsed| argon2().verify_password(secret.as_bytes(), &parsed).is_ok())
                .unwrap_or(false)
        })
        .await
        .unwrap_or(false);
        if ok {
            let tag = hmac::sign(&self.tag_key, &msg);
            if let Ok(mut map) = self.verified.write() {
                if map.len() >= CACHE_CAPACITY {
                    map.clear();
                }
                map.insert(key.key_id.clone(), tag);
            }
        }
        ok
    }

    fn cached(&self, key_id: &str, msg: &[u8]) -> bool {
        let tag = self
            .verified
            .read()
            .map(|m| m.get(key_id).cloned())
            .unwrap_or(None);
        tag.is_some_and(|tag| hmac::verify(&self.tag_key, msg, tag.as_ref()).is_ok())
    }

    /// Forgets a key (after revocation in this process; other processes rely on the
    /// database row, which is read on every call anyway).
    pub fn forget(&self, key_id: &str) {
        if let Ok(mut map) = self.verified.write() {
            map.remove(key_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;

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

    #[tokio::test]
    async fn issued_key_verifies_and_a_wrong_secret_does_not() {
        let rng = SystemRandom::new();
        let issued = issue_key(&rng).unwrap();
        let verifier = KeyVerifier::new(&rng).unwrap();
        let key = PresentedKey::parse(&issued.token).unwrap();
        assert_eq!(key.key_id, issued.key_id);
        assert!(verifier.verify(&key, &issued.secret_hash).await);
        // Second time from the cache.
        assert!(verifier.verify(&key, &issued.secret_hash).await);

        let mut wrong = issued.token.to_string();
        let last = wrong.pop().unwrap();
        wrong.push(if last == '0' { '1' } else { '0' });
        let wrong = PresentedKey::parse(&wrong).unwrap();
        assert!(!verifier.verify(&wrong, &issued.secret_hash).await);
    }

    #[tokio::test]
    async fn cached_success_does_not_survive_a_new_hash() {
        let rng = SystemRandom::new();
        let issued = issue_key(&rng).unwrap();
        let other = issue_key(&rng).unwrap();
        let verifier = KeyVerifier::new(&rng).unwrap();
        let key = PresentedKey::parse(&issued.token).unwrap();
        assert!(verifier.verify(&key, &issued.secret_hash).await);
        // The same key id now stored with another hash: the cache must not vouch for it.
        assert!(!verifier.verify(&key, &other.secret_hash).await);
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
