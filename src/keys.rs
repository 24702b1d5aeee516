//! The master secret: created once, kept in a key file (mode 0600), and the root of
//! every per-registry pseudonym key (derived with HKDF in [`crate::pseudonym`]).
//!
//! File format, one line: `ern-registry-master-key v1 <64 hex digits>`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use ring::rand::{SecureRandom, SystemRandom};
use zeroize::{Zeroize, Zeroizing};

const HEADER: &str = "ern-registry-master-key v1 ";

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read master key file {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot write master key file {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("master key file {0} already exists; refusing to overwrite it")]
    Exists(PathBuf),
    #[error("master key file {0} is readable by group or others; run `chmod 600` on it")]
    Permissions(PathBuf),
    #[error(
        "master key file {0} is not an ern-registry master key (expected `{HEADER}<64 hex digits>`)"
    )]
    Format(PathBuf),
    #[error("the system random number generator failed")]
    Random,
}

/// 32 secret bytes, wiped from memory on drop, never printed.
pub struct MasterSecret(Zeroizing<[u8; 32]>);

impl std::fmt::Debug for MasterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterSecret(..)")
    }
}

impl MasterSecret {
    pub fn generate(rng: &dyn SecureRandom) -> Result<Self, KeyError> {
        let mut bytes = Zeroizing::new([0u8; 32]);
        rng.fill(bytes.as_mut()).map_err(|_| KeyError::Random)?;
        Ok(MasterSecret(bytes))
    }

    /// For tests and benchmarks with fixed keys.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        MasterSecret(Zeroizing::new(bytes))
    }

    pub fn expose(&self) -> &[u8; 32] {
        &self.0
    }

    /// Reads a key file, refusing one that group or others may read.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
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
        let mut text = Zeroizing::new(String::new());
        io::Read::read_to_string(&mut io::Read::take(file, 256), &mut text).map_err(read_err)?;
        Self::decode(text.trim_end()).ok_or_else(|| KeyError::Format(path.to_path_buf()))
    }

    fn decode(text: &str) -> Option<Self> {
        let hex = text.strip_prefix(HEADER)?.as_bytes();
        if hex.len() != 64 {
            return None;
        }
        let mut bytes = Zeroizing::new([0u8; 32]);
        for (i, pair) in hex.chunks(2).enumerate() {
            let nibble = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
            bytes[i] = nibble(pair[0])? << 4 | nibble(pair[1])?;
        }
        Some(MasterSecret(bytes))
    }

    fn encode(&self) -> Zeroizing<String> {
        let mut text = Zeroizing::new(String::with_capacity(HEADER.len() + 65));
        text.push_str(HEADER);
        for b in self.0.iter() {
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
        let write_err = |source| KeyError::Write {
            path: path.to_path_buf(),
            source,
        };
        if path.exists() {
            return Err(KeyError::Exists(path.to_path_buf()));
        }
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
            let mut text = secret.encode();
            file.write_all(text.as_bytes())?;
            text.zeroize();
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
        assert_eq!(created.expose(), loaded.expose());
        assert!(matches!(
            MasterSecret::create_new(&path),
            Err(KeyError::Exists(_))
        ));
        assert_eq!(
            MasterSecret::load(&path).unwrap().expose(),
            created.expose()
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
            MasterSecret::decode(text.trim_end()).unwrap().expose(),
            &[0xab; 32]
        );
        assert!(!format!("{secret:?}").contains("ab"));
    }
}
