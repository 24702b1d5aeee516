//! The master secret: the root of every per-registry pseudonym key (derived with HKDF in
//! [`crate::pseudonym`]). It comes from one of two places, chosen by [`MasterSource`]:
//!
//! - a **key file** (mode 0600) holding 32 random bytes, one line:
//!   `ern-registry-master-key v1 <64 hex digits>`;
//! - a **passphrase** stretched with Argon2id (version 0x13, 32-byte output). Its salt and
//!   cost are recorded in a parameter file (mode 0600), one line:
//!   `ern-registry-master-kdf v1 argon2id m=<KiB> t=<passes> p=<lanes> salt=<32 hex digits>
//!   check=<64 hex digits>`, where `check` is HMAC-SHA256(derived secret,
//!   `"ern-registry master check v1"`).
//!
//! The check is there because a mistyped passphrase would otherwise give a valid-looking
//! but different secret, and every new submission would silently get a pseudonym that
//! links to nothing: a wrong passphrase must stop the start instead. Its price is that the
//! parameter file, like a password hash, lets whoever reads it test guesses offline at the
//! Argon2id cost; hence mode 0600, a minimum passphrase length and a minimum cost. The
//! passphrase is never written anywhere, and the copies this module makes are wiped.
//!
//! Both secrets are `secrecy` boxes: one heap block each, wiped on drop, no `Debug` that
//! shows them, read only through [`ExposeSecret::expose_secret`] (easy to find in a
//! review). The master secret is filled in place in its block (random bytes, the Argon2id
//! output, the decoded key file): this module leaves no copy of it on the stack.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use argon2::{Algorithm, Argon2, Version};
use ring::rand::{SecureRandom, SystemRandom};
use ring::{hkdf, hmac};
use secrecy::{ExposeSecret, ExposeSecretMut, SecretBox, SecretSlice};
use zeroize::Zeroizing;

const HEADER: &str = "ern-registry-master-key v1 ";
const KDF_HEADER: &str = "ern-registry-master-kdf v1 argon2id ";
const CHECK_LABEL: &[u8] = b"ern-registry master check v1";
const FINGERPRINT_SALT: &[u8] = b"ern-registry";
const FINGERPRINT_INFO: &[u8] = b"ern-registry master fingerprint v1";
const SALT_BYTES: usize = 16;

/// The environment variable holding the master passphrase (never a flag: flags show in
/// the process list).
pub const PASSPHRASE_ENV: &str = "ERN_MASTER_PASSPHRASE";
/// Shortest accepted passphrase, in bytes.
pub const MIN_PASSPHRASE_BYTES: usize = 16;
/// Longest accepted passphrase, in bytes.
pub const MAX_PASSPHRASE_BYTES: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("{0} already exists; refusing to overwrite it")]
    Exists(PathBuf),
    #[error("{0} is readable by group or others; run `chmod 600` on it")]
    Permissions(PathBuf),
    #[error(
        "master key file {0} is not an ern-registry master key (expected `{HEADER}<64 hex digits>`)"
    )]
    Format(PathBuf),
    #[error("the system random number generator failed")]
    Random,
    #[error(
        "{0} is not an ern-registry master key parameter file (expected `{KDF_HEADER}m=<KiB> \
         t=<passes> p=<lanes> salt=<32 hex digits> check=<64 hex digits>`)"
    )]
    KdfFormat(PathBuf),
    #[error(
        "Argon2id cost {0} is outside the accepted range (at least {min}, at most {max})",
        min = Cost::MINIMUM,
        max = Cost::MAXIMUM
    )]
    KdfCost(Cost),
    #[error("Argon2id failed: {0}")]
    Argon2(argon2::Error),
    #[error(
        "the master passphrase is shorter than {MIN_PASSPHRASE_BYTES} bytes; \
         use a long random one (e.g. six or more diceware words)"
    )]
    WeakPassphrase,
    #[error("the master passphrase is longer than {MAX_PASSPHRASE_BYTES} bytes")]
    LongPassphrase,
    #[error("both {PASSPHRASE_ENV} and a master passphrase file are set; set only one of them")]
    PassphraseTwice,
    #[error(
        "the master passphrase does not match {0} (wrong passphrase, or an edited parameter \
         file); refusing to start, since another secret would silently give every patient \
         different pseudonyms"
    )]
    WrongPassphrase(PathBuf),
    #[error(
        "a master passphrase is configured but the master key file {key_file} exists too; \
         use one or the other (unset the passphrase, or move the key file away to use \
         {kdf_file})"
    )]
    Ambiguous {
        key_file: PathBuf,
        kdf_file: PathBuf,
    },
    #[error(
        "{0} exists, so the master secret comes from a passphrase, but none is configured: \
         set {PASSPHRASE_ENV} or --master-passphrase-file"
    )]
    PassphraseMissing(PathBuf),
}

/// 32 secret bytes, wiped from memory on drop, never printed. They stay in one heap
/// block: moving a `MasterSecret` moves a pointer and leaves no copy of the bytes behind
/// (a `Zeroizing<[u8; 32]>` moved by value could leave one in the frame it left).
pub struct MasterSecret(SecretBox<[u8; 32]>);

impl std::fmt::Debug for MasterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterSecret(..)")
    }
}

impl ExposeSecret<[u8; 32]> for MasterSecret {
    fn expose_secret(&self) -> &[u8; 32] {
        self.0.expose_secret()
    }
}

impl MasterSecret {
    /// Zeroes in the secret's heap block, to be filled in place.
    fn zeroed() -> Self {
        MasterSecret(SecretBox::new(Box::new([0u8; 32])))
    }

    fn bytes_mut(&mut self) -> &mut [u8; 32] {
        self.0.expose_secret_mut()
    }

    pub fn generate(rng: &dyn SecureRandom) -> Result<Self, KeyError> {
        let mut secret = Self::zeroed();
        rng.fill(secret.bytes_mut()).map_err(|_| KeyError::Random)?;
        Ok(secret)
    }

    /// For tests and benchmarks with fixed keys.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        let mut secret = Self::zeroed();
        *secret.bytes_mut() = bytes;
        secret
    }

    /// Derives the secret from a passphrase with Argon2id (version 0x13, 32-byte output)
    /// under `params`. Refuses a passphrase shorter than [`MIN_PASSPHRASE_BYTES`].
    pub fn from_passphrase(passphrase: &[u8], params: &KdfParams) -> Result<Self, KeyError> {
        check_passphrase_length(passphrase.len())?;
        let Cost { m_kib, t, p } = params.cost;
        let argon2_params = argon2::Params::new(m_kib, t, p, Some(32)).map_err(KeyError::Argon2)?;
        // Our own working memory, so that it can be wiped: its last blocks are all it
        // takes to recompute the output.
        let mut blocks =
            Zeroizing::new(vec![argon2::Block::default(); argon2_params.block_count()]);
        let mut secret = Self::zeroed();
        Argon2::new(Algorithm::Argon2id, Version::V0x13, argon2_params)
            .hash_password_into_with_memory(
                passphrase,
                &params.salt,
                secret.bytes_mut(),
                blocks.as_mut_slice(),
            )
            .map_err(KeyError::Argon2)?;
        Ok(secret)
    }

    /// The key of the check stored in a parameter file (HMAC-SHA256 of [`CHECK_LABEL`]).
    fn check_key(&self) -> hmac::Key {
        hmac::Key::new(hmac::HMAC_SHA256, self.expose_secret())
    }

    /// The secret's public name, which a database records to recognise the secret it was
    /// made with ([`Fingerprint`]).
    pub fn fingerprint(&self) -> Fingerprint {
        let prk =
            hkdf::Salt::new(hkdf::HKDF_SHA256, FINGERPRINT_SALT).extract(self.expose_secret());
        let mut bytes = [0u8; 32];
        prk.expand(&[FINGERPRINT_INFO], Len32)
            .and_then(|okm| okm.fill(&mut bytes))
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        Fingerprint(bytes)
    }

    /// Reads a key file, refusing one that group or others may read.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let text = read_private(path, 256)?;
        Self::decode(text.trim_end()).ok_or_else(|| KeyError::Format(path.to_path_buf()))
    }

    fn decode(text: &str) -> Option<Self> {
        let hex = text.strip_prefix(HEADER)?.as_bytes();
        if hex.len() != 64 {
            return None;
        }
        let mut secret = Self::zeroed();
        let bytes = secret.bytes_mut();
        for (i, pair) in hex.chunks(2).enumerate() {
            let nibble = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
            bytes[i] = nibble(pair[0])? << 4 | nibble(pair[1])?;
        }
        Some(secret)
    }

    fn encode(&self) -> Zeroizing<String> {
        let mut text = Zeroizing::new(String::with_capacity(HEADER.len() + 65));
        text.push_str(HEADER);
        for b in self.expose_secret().iter() {
            text.push(char::from_digit(u32::from(b >> 4), 16).expect("nibble"));
            text.push(char::from_digit(u32::from(b & 0xf), 16).expect("nibble"));
        }
        text.push('\n');
        text
    }

    /// Generates a key and writes it to `path` (mode 0600, fsynced), never replacing an
    /// existing file: the key is written to a temporary file and hard-linked into place,
    /// which fails if `path` exists.
    pub fn create_new(path: &Path) -> Result<Self, KeyError> {
        let secret = Self::generate(&SystemRandom::new())?;
        if path.exists() {
            return Err(KeyError::Exists(path.to_path_buf()));
        }
        write_new_file(path, secret.encode().as_bytes())?;
        Ok(secret)
    }

    /// Loads the key at `path`, or creates it if there is none. `true` when created.
    pub fn load_or_create(path: &Path) -> Result<(Self, bool), KeyError> {
        match Self::load(path) {
            Ok(secret) => Ok((secret, false)),
            Err(KeyError::Read { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                match Self::create_new(path) {
                    Ok(secret) => Ok((secret, true)),
                    // Another process created it first: use theirs.
                    Err(KeyError::Exists(_)) => Ok((Self::load(path)?, false)),
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    }
}

struct Len32;

impl hkdf::KeyType for Len32 {
    fn len(&self) -> usize {
        32
    }
}

/// The public name of a master secret: `HKDF-SHA256(salt = "ern-registry", IKM = secret,
/// info = "ern-registry master fingerprint v1")`, 32 bytes. The database records it at
/// first start so that a start with another secret (a lost key file replaced by a new
/// one, the wrong backup, a recreated parameter file) is refused instead of silently
/// giving every patient new pseudonyms.
///
/// It is not secret, and it is not the secret: HKDF is one-way, and its label makes it
/// unrelated to every key derived for pseudonyms and the audit chain. It does let whoever
/// holds it test a candidate secret, which gains nothing: a key file's secret is 256
/// random bits, and a passphrase's costs an Argon2id run per guess, with the salt of the
/// parameter file, which is not in the database.
#[derive(Clone, PartialEq, Eq)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// From the 64 lower-case hex digits [`Fingerprint::to_hex`] gives.
    pub fn from_hex(hex: &str) -> Option<Self> {
        let mut bytes = [0u8; 32];
        parse_hex(hex, &mut bytes)?;
        Some(Fingerprint(bytes))
    }

    /// 64 lower-case hex digits, as stored.
    pub fn to_hex(&self) -> String {
        let mut text = String::with_capacity(64);
        push_hex(&mut text, &self.0);
        text
    }
}

/// The first 16 hex digits, enough to tell two secrets apart in a message or a log.
impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex()[..16])
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

/// Reads a small file that must not be readable by group or others (on Unix).
fn read_private(path: &Path, limit: u64) -> Result<Zeroizing<String>, KeyError> {
    let read_err = |source| KeyError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = open_private(path)?;
    // One byte more than the limit, so that a longer file is not read as its first part.
    let mut text = Zeroizing::new(String::with_capacity(limit as usize + 64));
    io::Read::read_to_string(&mut io::Read::take(file, limit + 1), &mut text).map_err(read_err)?;
    Ok(text)
}

/// Opens `path` for reading, refusing a file that group or others may read.
fn open_private(path: &Path) -> Result<File, KeyError> {
    let read_err = |source| KeyError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(read_err)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = file.metadata().map_err(read_err)?.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(KeyError::Permissions(path.to_path_buf()));
        }
    }
    Ok(file)
}

/// Writes `contents` to a new file at `path` (mode 0600, fsynced), never replacing an
/// existing file: it is written to a temporary file and hard-linked into place, which
/// fails if `path` exists.
fn write_new_file(path: &Path, contents: &[u8]) -> Result<(), KeyError> {
    let write_err = |source| KeyError::Write {
        path: path.to_path_buf(),
        source,
    };
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut suffix = [0u8; 8];
    SystemRandom::new()
        .fill(&mut suffix)
        .map_err(|_| KeyError::Random)?;
    let tmp = dir.join(format!(
        ".master-key-{:016x}.tmp",
        u64::from_le_bytes(suffix)
    ));
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let result = (|| {
        let mut file = options.open(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        fs::hard_link(&tmp, path)
    })();
    let _ = fs::remove_file(&tmp);
    match result {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            return Err(KeyError::Exists(path.to_path_buf()));
        }
        Err(e) => return Err(write_err(e)),
    }
    #[cfg(unix)]
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(write_err)?;
    Ok(())
}

fn push_hex(text: &mut String, bytes: &[u8]) {
    text.push_str(&hex::encode(bytes));
}

/// Lower-case hex only (as written), exactly `out.len()` bytes.
fn parse_hex(text: &str, out: &mut [u8]) -> Option<()> {
    if text.bytes().any(|b| b.is_ascii_uppercase()) {
        return None;
    }
    hex::decode_to_slice(text, out).ok()
}

fn check_passphrase_length(len: usize) -> Result<(), KeyError> {
    if len < MIN_PASSPHRASE_BYTES {
        Err(KeyError::WeakPassphrase)
    } else if len > MAX_PASSPHRASE_BYTES {
        Err(KeyError::LongPassphrase)
    } else {
        Ok(())
    }
}

/// A master passphrase of [`MIN_PASSPHRASE_BYTES`] to [`MAX_PASSPHRASE_BYTES`] bytes,
/// wiped from memory on drop, never printed.
#[derive(Clone)]
pub struct Passphrase(SecretSlice<u8>);

impl fmt::Debug for Passphrase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Passphrase(..)")
    }
}

impl Passphrase {
    pub fn new(bytes: Zeroizing<Vec<u8>>) -> Result<Self, KeyError> {
        check_passphrase_length(bytes.len())?;
        // A copy of exactly its length, so that boxing it reallocates nothing (which
        // would leave the bytes unwiped in the freed block); `bytes`, with whatever spare
        // capacity it has, is wiped when it is dropped here.
        Ok(Passphrase(SecretSlice::from(bytes.to_vec())))
    }

    /// The first line of a file, without its line ending (`\n` or `\r\n`).
    pub fn read_file(path: &Path) -> Result<Self, KeyError> {
        // Room for the longest line and its ending, allocated once: nothing is reallocated
        // (and left behind unwiped) while reading.
        const LIMIT: usize = MAX_PASSPHRASE_BYTES + 2;
        // Refused if group or others may read it, as the key and parameter files are: with
        // the parameter file it gives the master secret.
        let file = open_private(path)?;
        let mut bytes = Zeroizing::new(Vec::with_capacity(LIMIT + 64));
        io::Read::read_to_end(&mut io::Read::take(file, LIMIT as u64 + 1), &mut bytes).map_err(
            |source| KeyError::Read {
                path: path.to_path_buf(),
                source,
            },
        )?;
        if let Some(end) = bytes.iter().position(|&b| b == b'\n') {
            bytes.truncate(end);
            if bytes.last() == Some(&b'\r') {
                bytes.pop();
            }
        }
        Self::new(bytes)
    }

    /// The passphrase from [`PASSPHRASE_ENV`] or else from `file`; `None` when neither is
    /// set. Both set is an error. A set but empty variable counts as set (and too short),
    /// so that a blank placeholder fails rather than silently selecting the key file.
    pub fn from_env_or_file(file: Option<&Path>) -> Result<Option<Self>, KeyError> {
        let from_env =
            std::env::var_os(PASSPHRASE_ENV).map(|v| Zeroizing::new(v.into_encoded_bytes()));
        Self::resolve(from_env, file)
    }

    fn resolve(
        from_env: Option<Zeroizing<Vec<u8>>>,
        file: Option<&Path>,
    ) -> Result<Option<Self>, KeyError> {
        match (from_env, file) {
            (Some(_), Some(_)) => Err(KeyError::PassphraseTwice),
            (Some(bytes), None) => Self::new(bytes).map(Some),
            (None, Some(path)) => Self::read_file(path).map(Some),
            (None, None) => Ok(None),
        }
    }
}

impl ExposeSecret<[u8]> for Passphrase {
    fn expose_secret(&self) -> &[u8] {
        self.0.expose_secret()
    }
}

/// Argon2id cost: memory in KiB, passes over it, lanes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cost {
    pub m_kib: u32,
    pub t: u32,
    pub p: u32,
}

impl Cost {
    /// What new parameter files get: RFC 9106's second recommended choice (64 MiB, 3
    /// passes), about 0.1 to 0.3 s once per start. One lane, because the argon2 crate
    /// computes lanes one after another: more would cost us time but an attacker nothing.
    pub const DEFAULT: Cost = Cost {
        m_kib: 64 * 1024,
        t: 3,
        p: 1,
    };
    /// The least accepted: OWASP's minimum for Argon2id (19 MiB, 2 passes, 1 lane).
    pub const MINIMUM: Cost = Cost {
        m_kib: 19 * 1024,
        t: 2,
        p: 1,
    };
    /// The most accepted, so that an edited file cannot make the start allocate or
    /// compute without bound.
    pub const MAXIMUM: Cost = Cost {
        m_kib: 4 * 1024 * 1024,
        t: 64,
        p: 16,
    };

    fn within(self, low: Cost, high: Cost) -> bool {
        (low.m_kib..=high.m_kib).contains(&self.m_kib)
            && (low.t..=high.t).contains(&self.t)
            && (low.p..=high.p).contains(&self.p)
    }
}

/// `m=<KiB> t=<passes> p=<lanes>`, as in the parameter file.
impl fmt::Display for Cost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "m={} t={} p={}", self.m_kib, self.t, self.p)
    }
}

/// Everything the derivation takes besides the passphrase: cost and salt (not secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KdfParams {
    cost: Cost,
    salt: [u8; SALT_BYTES],
}

impl KdfParams {
    /// Refuses a cost outside [`Cost::MINIMUM`]..=[`Cost::MAXIMUM`].
    pub fn new(cost: Cost, salt: [u8; SALT_BYTES]) -> Result<Self, KeyError> {
        if !cost.within(Cost::MINIMUM, Cost::MAXIMUM) {
            return Err(KeyError::KdfCost(cost));
        }
        Ok(KdfParams { cost, salt })
    }

    /// [`Cost::DEFAULT`] with a fresh random salt.
    pub fn generate(rng: &dyn SecureRandom) -> Result<Self, KeyError> {
        let mut salt = [0u8; SALT_BYTES];
        rng.fill(&mut salt).map_err(|_| KeyError::Random)?;
        Self::new(Cost::DEFAULT, salt)
    }

    /// Any cost Argon2 itself accepts, for fast unit tests; unreachable from the command
    /// line, which only ever uses [`KdfParams::new`].
    #[cfg(test)]
    fn insecure_for_tests(cost: Cost, salt: [u8; SALT_BYTES]) -> Self {
        KdfParams { cost, salt }
    }

    pub fn cost(&self) -> Cost {
        self.cost
    }

    pub fn salt(&self) -> &[u8; SALT_BYTES] {
        &self.salt
    }
}

/// A master key parameter file: the Argon2id parameters of the passphrase and the check
/// that recognises the right one.
#[derive(Debug, Clone)]
pub struct KdfFile {
    path: PathBuf,
    params: KdfParams,
    check: [u8; 32],
}

impl KdfFile {
    /// Where the parameter file is by default: `master.kdf` next to the key file.
    pub fn default_path(key_file: &Path) -> PathBuf {
        key_file.with_file_name("master.kdf")
    }

    /// Reads a parameter file, refusing one that group or others may read, one not in
    /// the canonical format, and one whose cost is out of range.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        Self::load_within(path, Cost::MINIMUM)
    }

    fn load_within(path: &Path, floor: Cost) -> Result<Self, KeyError> {
        let text = read_private(path, 512)?;
        let format = || KeyError::KdfFormat(path.to_path_buf());
        let (cost, salt, check) = Self::decode(text.trim_end()).ok_or_else(format)?;
        if !cost.within(floor, Cost::MAXIMUM) {
            return Err(KeyError::KdfCost(cost));
        }
        let file = KdfFile {
            path: path.to_path_buf(),
            params: KdfParams { cost, salt },
            check,
        };
        // One spelling only (no leading zeros, no upper-case hex, single spaces): the line
        // as written, with or without its line ending, and nothing after it.
        let canonical = file.encode();
        if *text != canonical && *text != canonical.trim_end_matches('\n') {
            return Err(format());
        }
        Ok(file)
    }

    fn decode(text: &str) -> Option<(Cost, [u8; SALT_BYTES], [u8; 32])> {
        let fields: Vec<&str> = text.strip_prefix(KDF_HEADER)?.split(' ').collect();
        let [m, t, p, salt_hex, check_hex] = fields[..] else {
            return None;
        };
        let number = |field: &str, name: &str| field.strip_prefix(name)?.parse::<u32>().ok();
        let cost = Cost {
            m_kib: number(m, "m=")?,
            t: number(t, "t=")?,
            p: number(p, "p=")?,
        };
        let mut salt = [0u8; SALT_BYTES];
        parse_hex(salt_hex.strip_prefix("salt=")?, &mut salt)?;
        let mut check = [0u8; 32];
        parse_hex(check_hex.strip_prefix("check=")?, &mut check)?;
        Some((cost, salt, check))
    }

    fn encode(&self) -> String {
        let mut text = format!("{KDF_HEADER}{} salt=", self.params.cost);
        push_hex(&mut text, &self.params.salt);
        text.push_str(" check=");
        push_hex(&mut text, &self.check);
        text.push('\n');
        text
    }

    /// Draws a fresh salt, derives the secret from `passphrase` with [`Cost::DEFAULT`] and
    /// writes the parameter file (mode 0600, fsynced), never replacing an existing one.
    pub fn create_new(
        path: &Path,
        passphrase: &Passphrase,
    ) -> Result<(KdfFile, MasterSecret), KeyError> {
        let params = KdfParams::generate(&SystemRandom::new())?;
        Self::create_with(path, passphrase.expose_secret(), params)
    }

    fn create_with(
        path: &Path,
        passphrase: &[u8],
        params: KdfParams,
    ) -> Result<(KdfFile, MasterSecret), KeyError> {
        // Checked first to spare the derivation; `write_new_file` closes the race.
        if path.exists() {
            return Err(KeyError::Exists(path.to_path_buf()));
        }
        let secret = MasterSecret::from_passphrase(passphrase, &params)?;
        let mut check = [0u8; 32];
        check.copy_from_slice(hmac::sign(&secret.check_key(), CHECK_LABEL).as_ref());
        let file = KdfFile {
            path: path.to_path_buf(),
            params,
            check,
        };
        write_new_file(path, file.encode().as_bytes())?;
        Ok((file, secret))
    }

    /// Derives the secret and verifies it against the stored check (in constant time).
    pub fn unlock(&self, passphrase: &Passphrase) -> Result<MasterSecret, KeyError> {
        self.unlock_bytes(passphrase.expose_secret())
    }

    fn unlock_bytes(&self, passphrase: &[u8]) -> Result<MasterSecret, KeyError> {
        let secret = MasterSecret::from_passphrase(passphrase, &self.params)?;
        hmac::verify(&secret.check_key(), CHECK_LABEL, &self.check)
            .map_err(|_| KeyError::WrongPassphrase(self.path.clone()))?;
        Ok(secret)
    }

    /// Loads the parameter file at `path` and unlocks it, or creates it if there is none.
    /// `true` when created.
    pub fn unlock_or_create(
        path: &Path,
        passphrase: &Passphrase,
    ) -> Result<(KdfFile, MasterSecret, bool), KeyError> {
        let load_and_unlock = || {
            let file = Self::load(path)?;
            let secret = file.unlock(passphrase)?;
            Ok((file, secret, false))
        };
        match load_and_unlock() {
            Err(KeyError::Read { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                match Self::create_new(path, passphrase) {
                    Ok((file, secret)) => Ok((file, secret, true)),
                    // Another process created it first: use theirs.
                    Err(KeyError::Exists(_)) => load_and_unlock(),
                    Err(e) => Err(e),
                }
            }
            other => other,
        }
    }

    pub fn params(&self) -> &KdfParams {
        &self.params
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Where the master secret comes from.
#[derive(Debug)]
pub enum MasterSource<'a> {
    /// 32 random bytes in a key file.
    KeyFile(&'a Path),
    /// A passphrase, with the parameter file that records its salt and cost.
    Passphrase {
        kdf_file: &'a Path,
        passphrase: &'a Passphrase,
    },
}

impl<'a> MasterSource<'a> {
    /// The passphrase when one is configured, else the key file. Refuses the two
    /// ambiguous cases: a passphrase while the key file exists, and an existing parameter
    /// file without a passphrase (falling back to the key file would then create a new
    /// key and silently change every pseudonym).
    pub fn select(
        key_file: &'a Path,
        kdf_file: &'a Path,
        passphrase: Option<&'a Passphrase>,
    ) -> Result<Self, KeyError> {
        let exists = |path: &Path| {
            path.try_exists().map_err(|source| KeyError::Read {
                path: path.to_path_buf(),
                source,
            })
        };
        match passphrase {
            Some(_) if exists(key_file)? => Err(KeyError::Ambiguous {
                key_file: key_file.to_path_buf(),
                kdf_file: kdf_file.to_path_buf(),
            }),
            Some(passphrase) => Ok(MasterSource::Passphrase {
                kdf_file,
                passphrase,
            }),
            None if exists(kdf_file)? => Err(KeyError::PassphraseMissing(kdf_file.to_path_buf())),
            None => Ok(MasterSource::KeyFile(key_file)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_load_and_refuse_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.key");
        let (created, fresh) = MasterSecret::load_or_create(&path).unwrap();
        assert!(fresh);
        let (loaded, fresh) = MasterSecret::load_or_create(&path).unwrap();
        assert!(!fresh);
        assert_eq!(created.expose_secret(), loaded.expose_secret());
        assert!(matches!(
            MasterSecret::create_new(&path),
            Err(KeyError::Exists(_))
        ));
        assert_eq!(
            MasterSecret::load(&path).unwrap().expose_secret(),
            created.expose_secret()
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                fs::metadata(&path).unwrap().permissions().mode() & 0o777,
                0o600
            );
            fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
            assert!(matches!(
                MasterSecret::load(&path),
                Err(KeyError::Permissions(_))
            ));
        }
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporary file left"
        );
    }

    #[test]
    fn rejects_malformed_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.key");
        let mut options = OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        options
            .open(&path)
            .unwrap()
            .write_all(b"ern-registry-master-key v1 abc\n")
            .unwrap();
        assert!(matches!(
            MasterSecret::load(&path),
            Err(KeyError::Format(_))
        ));
        let secret = MasterSecret::from_bytes([0xab; 32]);
        let text = secret.encode();
        assert_eq!(
            MasterSecret::decode(text.trim_end())
                .unwrap()
                .expose_secret(),
            &[0xab; 32]
        );
        assert!(!format!("{secret:?}").contains("ab"));
    }

    #[test]
    fn fingerprint_matches_pinned_vector() {
        // HKDF-SHA256(salt "ern-registry", IKM 00..1f, info "ern-registry master
        // fingerprint v1"), reproduced with Python's hmac module. It must never change:
        // every database records it and refuses to start with a secret that gives another.
        let secret = MasterSecret::from_bytes(std::array::from_fn(|i| i as u8));
        let fingerprint = secret.fingerprint();
        assert_eq!(fingerprint.to_hex(), PINNED_FINGERPRINT);
        assert_eq!(
            Fingerprint::from_hex(PINNED_FINGERPRINT).unwrap(),
            fingerprint
        );
        assert_eq!(fingerprint.to_string(), PINNED_FINGERPRINT[..16]);
        assert_ne!(&fingerprint.0, secret.expose_secret());
        assert_ne!(MasterSecret::from_bytes([0; 32]).fingerprint(), fingerprint);
        assert!(Fingerprint::from_hex(&PINNED_FINGERPRINT.to_uppercase()).is_none());
        assert!(Fingerprint::from_hex(&PINNED_FINGERPRINT[1..]).is_none());
    }

    const PINNED_FINGERPRINT: &str =
        "a596b49d49aa906c22531e00ef9d515b82710fdd6822cd8e75736e66613ce8c2";

    /// Cheap Argon2id parameters, so that the unit tests stay fast.
    const TEST_COST: Cost = Cost {
        m_kib: 256,
        t: 2,
        p: 1,
    };
    const TEST_FLOOR: Cost = Cost {
        m_kib: 8,
        t: 1,
        p: 1,
    };
    const PASSPHRASE: &[u8] = b"correct horse battery staple";

    fn test_params() -> KdfParams {
        let salt: [u8; SALT_BYTES] = std::array::from_fn(|i| i as u8);
        KdfParams::insecure_for_tests(TEST_COST, salt)
    }

    fn hex(bytes: &[u8]) -> String {
        let mut text = String::new();
        push_hex(&mut text, bytes);
        text
    }

    fn passphrase(bytes: &[u8]) -> Passphrase {
        Passphrase::new(Zeroizing::new(bytes.to_vec())).unwrap()
    }

    fn write_private(path: &Path, text: &str) {
        let _ = fs::remove_file(path);
        write_new_file(path, text.as_bytes()).unwrap();
    }

    #[test]
    fn passphrase_derivation_matches_pinned_vector() {
        // Argon2id v0x13, m=256 KiB, t=2, p=1, salt 00..0f, 32-byte output. Computed once
        // with this implementation and reproduced by an independent implementation written
        // from RFC 9106. It must never change: existing deployments would derive another
        // secret from the same passphrase.
        let secret = MasterSecret::from_passphrase(PASSPHRASE, &test_params()).unwrap();
        assert_eq!(hex(secret.expose_secret()), PINNED_SECRET);
        let check = hmac::sign(&secret.check_key(), CHECK_LABEL);
        assert_eq!(hex(check.as_ref()), PINNED_CHECK);
        // Salt and cost both matter.
        let mut salt = *test_params().salt();
        salt[0] ^= 1;
        let other = KdfParams::insecure_for_tests(TEST_COST, salt);
        assert_ne!(
            MasterSecret::from_passphrase(PASSPHRASE, &other)
                .unwrap()
                .expose_secret(),
            secret.expose_secret()
        );
        let other = KdfParams::insecure_for_tests(Cost { t: 3, ..TEST_COST }, salt);
        assert_ne!(
            MasterSecret::from_passphrase(PASSPHRASE, &other)
                .unwrap()
                .expose_secret(),
            secret.expose_secret()
        );
    }

    const PINNED_SECRET: &str = "7989cae79eab72e4e4f4124a6acde0796b3cb91920807721145cf29a5a1daaa6";
    const PINNED_CHECK: &str = "1f26c6c001b36e4b4a8ce59cae065ef5f899dbdcb750f85fef9c0ab3989565da";

    #[test]
    fn parameter_file_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.kdf");
        let (created, secret) = KdfFile::create_with(&path, PASSPHRASE, test_params()).unwrap();
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(
            text,
            format!(
                "ern-registry-master-kdf v1 argon2id m=256 t=2 p=1 \
                 salt=000102030405060708090a0b0c0d0e0f check={PINNED_CHECK}\n"
            )
        );
        let loaded = KdfFile::load_within(&path, TEST_FLOOR).unwrap();
        assert_eq!(loaded.params(), created.params());
        assert_eq!(loaded.check, created.check);
        assert_eq!(loaded.path(), path);
        let unlocked = loaded.unlock(&passphrase(PASSPHRASE)).unwrap();
        assert_eq!(unlocked.expose_secret(), secret.expose_secret());
        assert!(!text.contains("horse"));
    }

    #[test]
    fn wrong_passphrase_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.kdf");
        KdfFile::create_with(&path, PASSPHRASE, test_params()).unwrap();
        let file = KdfFile::load_within(&path, TEST_FLOOR).unwrap();
        for wrong in [
            &b"correct horse battery stapler"[..],
            b"Correct horse battery staple",
            b"correct horse battery staple ",
        ] {
            assert!(matches!(
                file.unlock(&passphrase(wrong)),
                Err(KeyError::WrongPassphrase(p)) if p == path
            ));
        }
        assert!(file.unlock(&passphrase(PASSPHRASE)).is_ok());
    }

    #[test]
    fn weak_or_overlong_passphrases_are_refused() {
        let params = test_params();
        for short in [&b""[..], b"hunter2", b"fifteen bytes!!"] {
            assert!(matches!(
                MasterSecret::from_passphrase(short, &params),
                Err(KeyError::WeakPassphrase)
            ));
            assert!(matches!(
                Passphrase::new(Zeroizing::new(short.to_vec())),
                Err(KeyError::WeakPassphrase)
            ));
        }
        assert!(MasterSecret::from_passphrase(b"sixteen bytes!!!", &params).is_ok());
        let long = vec![b'a'; MAX_PASSPHRASE_BYTES + 1];
        assert!(matches!(
            Passphrase::new(Zeroizing::new(long)),
            Err(KeyError::LongPassphrase)
        ));
        let err = Passphrase::new(Zeroizing::new(b"hunter2".to_vec())).unwrap_err();
        assert!(err.to_string().contains("shorter than 16 bytes"), "{err}");
    }

    #[test]
    fn cost_below_the_floor_is_refused() {
        let salt = [7u8; SALT_BYTES];
        for weak in [
            Cost {
                m_kib: 19 * 1024 - 1,
                ..Cost::DEFAULT
            },
            Cost {
                t: 1,
                ..Cost::DEFAULT
            },
            Cost {
                p: 0,
                ..Cost::DEFAULT
            },
            Cost {
                t: 65,
                ..Cost::DEFAULT
            },
        ] {
            assert!(matches!(
                KdfParams::new(weak, salt),
                Err(KeyError::KdfCost(c)) if c == weak
            ));
        }
        assert!(KdfParams::new(Cost::MINIMUM, salt).is_ok());
        assert!(KdfParams::new(Cost::DEFAULT, salt).is_ok());
        assert!(Cost::DEFAULT.within(Cost::MINIMUM, Cost::MAXIMUM));
        // A file with a weak cost is refused by the loader the server uses.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.kdf");
        KdfFile::create_with(&path, PASSPHRASE, test_params()).unwrap();
        assert!(matches!(
            KdfFile::load(&path),
            Err(KeyError::KdfCost(c)) if c == TEST_COST
        ));
    }

    #[test]
    fn parameter_file_refuses_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.kdf");
        KdfFile::create_with(&path, PASSPHRASE, test_params()).unwrap();
        let before = fs::read(&path).unwrap();
        assert!(matches!(
            KdfFile::create_with(&path, b"another long passphrase", test_params()),
            Err(KeyError::Exists(_))
        ));
        assert!(matches!(
            KdfFile::create_new(&path, &passphrase(PASSPHRASE)),
            Err(KeyError::Exists(_))
        ));
        assert_eq!(fs::read(&path).unwrap(), before);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                fs::metadata(&path).unwrap().permissions().mode() & 0o777,
                0o600
            );
            fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
            assert!(matches!(
                KdfFile::load_within(&path, TEST_FLOOR),
                Err(KeyError::Permissions(_))
            ));
        }
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporary file left"
        );
    }

    #[test]
    fn tampered_parameter_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.kdf");
        KdfFile::create_with(&path, PASSPHRASE, test_params()).unwrap();
        let good = fs::read_to_string(&path).unwrap();
        // Well-formed edits of salt, cost or check: the right passphrase no longer fits.
        for edited in [
            good.replace("salt=00", "salt=01"),
            good.replace(" t=2 ", " t=3 "),
            good.replace(" m=256 ", " m=512 "),
            good.replace(PINNED_CHECK, &PINNED_CHECK.replace('f', "e")),
        ] {
            assert_ne!(edited, good);
            write_private(&path, &edited);
            let file = KdfFile::load_within(&path, TEST_FLOOR).unwrap();
            assert!(
                matches!(
                    file.unlock(&passphrase(PASSPHRASE)),
                    Err(KeyError::WrongPassphrase(_))
                ),
                "{edited}"
            );
        }
        // Anything not in the one canonical spelling.
        for malformed in [
            String::new(),
            good.replace("v1", "v2"),
            good.replace("argon2id", "argon2i"),
            good.replace(" t=2 ", " t=02 "),
            good.replace(" t=2 ", " t=+2 "),
            good.replace(" t=2 ", "  t=2 "),
            good.replace("0a0b", "0A0b"),
            good.replace("salt=00", "salt="),
            good.replace(" check=", " checksum="),
            good.trim_end().to_owned() + " extra=1\n",
            good.replace(" p=1", ""),
            good.clone() + "\n",
            good.trim_end().to_owned() + " \n",
            good.replace('\n', "\r\n"),
            // Past the 512 bytes read: not taken as its first part.
            good.clone() + "x".repeat(600).as_str(),
        ] {
            assert_ne!(malformed, good);
            write_private(&path, &malformed);
            assert!(
                matches!(
                    KdfFile::load_within(&path, TEST_FLOOR),
                    Err(KeyError::KdfFormat(_))
                ),
                "{malformed:?}"
            );
        }
    }

    #[test]
    fn passphrase_file_gives_its_first_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("passphrase");
        for (text, expected) in [
            ("correct horse battery staple\n", PASSPHRASE),
            ("correct horse battery staple", PASSPHRASE),
            ("correct horse battery staple\r\nsecond line\n", PASSPHRASE),
            (" spaces  are kept \n", b" spaces  are kept "),
        ] {
            write_private(&path, text);
            let read = Passphrase::read_file(&path).unwrap();
            assert_eq!(read.expose_secret(), expected);
            assert_eq!(format!("{read:?}"), "Passphrase(..)");
        }
        write_private(&path, "too short\ncorrect horse battery staple\n");
        assert!(matches!(
            Passphrase::read_file(&path),
            Err(KeyError::WeakPassphrase)
        ));
        write_private(&path, &"x".repeat(5000));
        assert!(matches!(
            Passphrase::read_file(&path),
            Err(KeyError::LongPassphrase)
        ));
        // A file group or others may read is refused, as the key file is.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            write_private(&path, "correct horse battery staple\n");
            fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
            assert!(matches!(
                Passphrase::read_file(&path),
                Err(KeyError::Permissions(_))
            ));
            write_private(&path, "correct horse battery staple\n");
        }
        let from_env = || Some(Zeroizing::new(PASSPHRASE.to_vec()));
        assert!(matches!(
            Passphrase::resolve(from_env(), Some(&path)),
            Err(KeyError::PassphraseTwice)
        ));
        assert_eq!(
            Passphrase::resolve(from_env(), None)
                .unwrap()
                .unwrap()
                .expose_secret(),
            PASSPHRASE
        );
        assert!(Passphrase::resolve(None, None).unwrap().is_none());
        assert!(matches!(
            Passphrase::resolve(Some(Zeroizing::new(Vec::new())), None),
            Err(KeyError::WeakPassphrase)
        ));
    }

    #[test]
    fn source_selection_refuses_ambiguity() {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("master.key");
        let kdf_file = KdfFile::default_path(&key_file);
        assert_eq!(kdf_file, dir.path().join("master.kdf"));
        let pass = passphrase(PASSPHRASE);
        assert!(matches!(
            MasterSource::select(&key_file, &kdf_file, None),
            Ok(MasterSource::KeyFile(_))
        ));
        assert!(matches!(
            MasterSource::select(&key_file, &kdf_file, Some(&pass)),
            Ok(MasterSource::Passphrase { .. })
        ));
        // A key file and a passphrase: which one is meant?
        MasterSecret::create_new(&key_file).unwrap();
        assert!(matches!(
            MasterSource::select(&key_file, &kdf_file, Some(&pass)),
            Err(KeyError::Ambiguous { .. })
        ));
        // A parameter file without a passphrase: never fall back to the key file.
        fs::remove_file(&key_file).unwrap();
        KdfFile::create_with(&kdf_file, PASSPHRASE, test_params()).unwrap();
        assert!(matches!(
            MasterSource::select(&key_file, &kdf_file, None),
            Err(KeyError::PassphraseMissing(_))
        ));
        assert!(matches!(
            MasterSource::select(&key_file, &kdf_file, Some(&pass)),
            Ok(MasterSource::Passphrase { .. })
        ));
    }

    #[test]
    fn unlock_or_create_uses_the_default_cost() {
        // The production path, with the real (64 MiB) cost.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.kdf");
        let pass = passphrase(PASSPHRASE);
        let (file, created, fresh) = KdfFile::unlock_or_create(&path, &pass).unwrap();
        assert!(fresh);
        assert_eq!(file.params().cost(), Cost::DEFAULT);
        let (_, loaded, fresh) = KdfFile::unlock_or_create(&path, &pass).unwrap();
        assert!(!fresh);
        assert_eq!(loaded.expose_secret(), created.expose_secret());
        assert!(matches!(
            KdfFile::unlock_or_create(&path, &passphrase(b"not the right passphrase")),
            Err(KeyError::WrongPassphrase(_))
        ));
        // Another salt, another secret: the same passphrase elsewhere is unrelated.
        let elsewhere = dir.path().join("other.kdf");
        let (_, other, _) = KdfFile::unlock_or_create(&elsewhere, &pass).unwrap();
        assert_ne!(other.expose_secret(), created.expose_secret());
    }
}
