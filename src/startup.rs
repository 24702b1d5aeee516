//! The composition root: builds the application from its configuration (database, keys,
//! writer, services, server) and runs it until asked to stop.
//!
//! `main` parses the command line and calls [`Application::build`]; the integration
//! tests and the benchmark do the same with port 0 and their own database.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::server::NamedService;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tracing::{debug, error, info, warn};

use crate::api::drain::DrainLayer;
use crate::api::wire::WireContractLayer;
use crate::api::{admin::AdminApi, case::CaseApi, consent::ConsentApi, research::ResearchApi};
use crate::audit::AuditKey;
use crate::auth::{AuthCounters, KeyHasher, KeyVerifier};
use crate::clock::{Clock, SystemClock};
use crate::config::ServeArgs;
use crate::connections::{ConnectionLimits, Connections};
use crate::data_dir::{self, DataDirError, ServerLock};
use crate::health::DatabaseWatch;
use crate::keys::{Fingerprint, KdfFile, KeyError, MasterSecret, MasterSource, Passphrase};
use crate::proto::admin_service_server::AdminServiceServer;
use crate::proto::case_service_server::CaseServiceServer;
use crate::proto::consent_service_server::ConsentServiceServer;
use crate::proto::research_service_server::ResearchServiceServer;
use crate::pseudonym::Pseudonymiser;
use crate::ratelimit::{CallGate, ItemGate, PrincipalLimiter};
use crate::refusals::{Flusher, Refusals};
use crate::service::Services;
use crate::service::consent::RegistryConsentRules;
use crate::service::research::ResearchIndex;
use crate::store::writer::Writer;
use crate::store::{Backend, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    DataFiles(#[from] DataDirError),
    #[error(
        "{origin} is missing, but this database already holds pseudonyms or audit entries \
         made with a master secret ({recorded}). {remedy}. No new secret is created: it \
         would give every patient new pseudonyms and break the audit chain",
        remedy = .origin.remedy()
    )]
    MasterMissing {
        origin: MasterOrigin,
        recorded: RecordedFingerprint,
    },
    #[error(
        "the master secret from {origin} is not the one this database was made with (its \
         fingerprint is {found}, the database's is {recorded}). {remedy}. Nothing was \
         done: another secret would give every patient new pseudonyms and break the audit \
         chain",
        remedy = .origin.remedy()
    )]
    MasterMismatch {
        origin: MasterOrigin,
        recorded: Fingerprint,
        found: Fingerprint,
    },
    #[error(
        "the master secret from {origin} does not verify the last entry of this database's \
         audit log, and the database records no master key fingerprint yet (an earlier \
         version made it): this is not the secret it was last used with, or that entry was \
         modified (`ern-registry audit verify` tells). {remedy}",
        remedy = .origin.remedy()
    )]
    MasterAuditMismatch { origin: MasterOrigin },
    #[error(
        "cannot open the database {database}: {source}. The disk holding it has {free} bytes \
         free: free some room and run the command again"
    )]
    NoRoom {
        database: PathBuf,
        free: u64,
        source: StoreError,
    },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Console(String),
    #[error("reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("no system randomness")]
    Random,
    #[error("cannot serve metrics on {addr}: {reason}")]
    Metrics { addr: SocketAddr, reason: String },
    #[error("cannot read {path}: {source}")]
    TlsFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "refusing plaintext gRPC on {0}, which is not a loopback address: configure --tls-cert and \
         --tls-key, or set --allow-plaintext if a proxy in front terminates TLS"
    )]
    Plaintext(SocketAddr),
    #[error(
        "refusing to serve metrics over plain HTTP on {0}, which is not a loopback address (they \
         name principals): use a loopback address, or set --allow-plaintext if a proxy in front \
         terminates TLS"
    )]
    PlaintextMetrics(SocketAddr),
}

/// The server's TLS configuration, from PEM files; `None` for plaintext, which is only
/// allowed on loopback unless forced.
fn tls_config(args: &ServeArgs) -> Result<Option<ServerTlsConfig>, StartupError> {
    let read = |path: &PathBuf| {
        std::fs::read(path).map_err(|source| StartupError::TlsFile {
            path: path.clone(),
            source,
        })
    };
    let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else {
        if !args.listen.ip().is_loopback() && !args.allow_plaintext {
            return Err(StartupError::Plaintext(args.listen));
        }
        if !args.listen.ip().is_loopback() {
            warn!(listen = %args.listen, "serving PLAINTEXT gRPC on a non-loopback address (--allow-plaintext)");
        }
        return Ok(None);
    };
    let mut config = ServerTlsConfig::new()
        // The private key's PEM read here is wiped once tonic has made its own copy
        // (tonic and rustls keep theirs, unwiped, for the life of the server).
        .identity(Identity::from_pem(
            read(cert)?,
            zeroize::Zeroizing::new(read(key)?),
        ))
        .timeout(TLS_HANDSHAKE_TIMEOUT);
    if let Some(ca) = &args.tls_client_ca {
        config = config
            .client_ca_root(Certificate::from_pem(read(ca)?))
            .client_auth_optional(false);
        info!("mutual TLS: client certificates required");
    }
    Ok(Some(config))
}

/// The metrics are plain HTTP and name principals: like plaintext gRPC and the console, on
/// a loopback address only, unless `--allow-plaintext` (a proxy in front terminates TLS).
fn check_metrics_address(addr: SocketAddr, allow_plaintext: bool) -> Result<(), StartupError> {
    if addr.ip().is_loopback() {
        return Ok(());
    }
    if !allow_plaintext {
        return Err(StartupError::PlaintextMetrics(addr));
    }
    warn!(%addr, "serving metrics over PLAIN HTTP on a non-loopback address (--allow-plaintext)");
    Ok(())
}

/// Serves Prometheus metrics on `addr` (`exporter`: the recorder is process-wide, so a
/// second call in the same process, as in tests, keeps the first and serves nothing).
fn install_metrics(addr: SocketAddr) -> Result<(), StartupError> {
    use metrics_exporter_prometheus::{BuildError, PrometheusBuilder};
    let failed = |reason: String| StartupError::Metrics { addr, reason };
    let listener = std::net::TcpListener::bind(addr).map_err(|e| failed(e.to_string()))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| failed(e.to_string()))?;
    let listener = TcpListener::from_std(listener).map_err(|e| failed(e.to_string()))?;
    match PrometheusBuilder::new().install_recorder() {
        Ok(handle) => {
            // Counters without labels are exported from the start, at 0, so that an
            // alert on one (`ern_synthetic_pseudonym_derivations_total` should stay at 0
            // on a clinical deployment) has a series before the first occurrence; a
            // labelled series appears at its first count (a claims audit of 2026-12-07
            // found these absent after a start). Before the listener serves: its first
            // rendering, kept for a second, has them.
            for name in ZERO_FROM_THE_START {
                metrics::counter!(*name).increment(0);
            }
            crate::exporter::keep_up(handle.clone());
            tokio::spawn(crate::exporter::serve(
                listener,
                handle,
                crate::exporter::Limits::default(),
            ));
        }
        Err(BuildError::FailedToSetGlobalRecorder(_)) => {
            warn!(
                %addr,
                "a metrics recorder is already installed in this process: nothing is served \
                 on this address (the first server's listener serves the metrics)"
            );
            return Ok(());
        }
        Err(e) => return Err(failed(e.to_string())),
    }
    metrics::describe_counter!(
        "ern_calls_total",
        "Calls by method and outcome (gRPC status code name)"
    );
    metrics::describe_counter!(
        "ern_pseudonym_derivations_total",
        "Pseudonym derivations by principal: a principal far above its peers is probing"
    );
    metrics::describe_counter!(
        "ern_rate_limited_total",
        "Calls refused by a rate limit (per principal, per peer, per stream), by limit"
    );
    metrics::describe_counter!(
        "ern_connections_refused_total",
        "Connections closed on accept by a cap (in all, per peer), by limit"
    );
    metrics::describe_counter!(
        "ern_connections_idle_closed_total",
        "Connections closed after the idle timeout without a call"
    );
    metrics::describe_counter!(
        "ern_connections_evicted_total",
        "Connections without a key closed at the cap to give their place to a new connection"
    );
    metrics::describe_gauge!(
        "ern_connections_open",
        "Connections open now, by listener (grpc, console, metrics)"
    );
    metrics::describe_gauge!(
        "ern_connections_without_key",
        "Connections open now on which no call has authenticated (the places a new connection may take at the cap), by listener"
    );
    metrics::describe_gauge!(
        "ern_clock_skew_seconds",
        "PostgreSQL: the database server's clock minus this instance's, beyond the probe's round trip"
    );
    metrics::describe_counter!(
        "ern_argon2_verifications_total",
        "Argon2id verifications of API keys of earlier versions (migrated on success)"
    );
    metrics::describe_counter!(
        "ern_argon2_busy_total",
        "Argon2id checks (API keys of earlier versions, console sign-ins) refused at once because every run allowed was taken"
    );
    info!(%addr, "serving Prometheus metrics at /metrics");
    Ok(())
}

/// The counters without labels, exported at 0 from the start (`install_metrics`).
pub const ZERO_FROM_THE_START: &[&str] = &[
    "ern_synthetic_pseudonym_derivations_total",
    "ern_log_lines_lost_total",
    "ern_back_dated_attestation_refusals_total",
    "ern_argon2_verifications_total",
    "ern_argon2_busy_total",
    "ern_argon2_key_hash_refusals_total",
    "ern_connections_idle_closed_total",
    "ern_connections_evicted_total",
];

/// Creates the directory a file will live in, if needed (0700).
fn ensure_parent(path: &Path) -> Result<(), StartupError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        data_dir::create_private_dir(dir)?;
    }
    Ok(())
}

/// Loads the master key, creating it when allowed (and saying so loudly).
pub fn load_master_key(path: &Path, may_create: bool) -> Result<MasterSecret, StartupError> {
    if !may_create {
        return Ok(MasterSecret::load(path)?);
    }
    ensure_parent(path)?;
    let (secret, created) = MasterSecret::load_or_create(path)?;
    if created {
        warn!(
            path = %path.display(),
            "CREATED A NEW MASTER KEY. Every pseudonym depends on it: back it up now, \
             keep it secret, and never lose it. Losing it unlinks all future submissions \
             from existing records."
        );
    }
    Ok(secret)
}

/// Loads the master secret from the passphrase when one is configured (with its Argon2id
/// parameter file `kdf_file`), else from the key file, refusing the ambiguous cases (see
/// [`MasterSource::select`]). Creates the file it needs when allowed, and says so loudly.
pub fn load_master_secret(
    key_file: &Path,
    kdf_file: &Path,
    passphrase: Option<&Passphrase>,
    may_create: bool,
) -> Result<MasterSecret, StartupError> {
    let (kdf_file, passphrase) = match MasterSource::select(key_file, kdf_file, passphrase)? {
        MasterSource::KeyFile(path) => {
            info!(path = %path.display(), "master secret: key file");
            return load_master_key(path, may_create);
        }
        MasterSource::Passphrase {
            kdf_file,
            passphrase,
        } => (kdf_file, passphrase),
    };
    let (kdf, secret, created) = if may_create {
        ensure_parent(kdf_file)?;
        KdfFile::unlock_or_create(kdf_file, passphrase)?
    } else {
        let kdf = KdfFile::load(kdf_file)?;
        let secret = kdf.unlock(passphrase)?;
        (kdf, secret, false)
    };
    let cost = kdf.params().cost();
    if created {
        warn!(
            path = %kdf_file.display(),
            %cost,
            "CREATED A NEW MASTER KEY PARAMETER FILE (Argon2id salt and cost) for the \
             passphrase. Every pseudonym depends on the passphrase and this file together: \
             back the file up now and never lose either. The passphrase alone cannot \
             recreate the master secret."
        );
    } else {
        info!(
            path = %kdf_file.display(),
            %cost,
            "master secret: derived from the passphrase (Argon2id), check passed"
        );
    }
    Ok(secret)
}

/// Where the master secret comes from, for messages that say how to restore it.
#[derive(Debug, Clone)]
pub enum MasterOrigin {
    KeyFile(PathBuf),
    Passphrase { kdf_file: PathBuf },
}

impl MasterOrigin {
    fn file(&self) -> &Path {
        match self {
            MasterOrigin::KeyFile(path) => path,
            MasterOrigin::Passphrase { kdf_file } => kdf_file,
        }
    }

    fn remedy(&self) -> String {
        match self {
            MasterOrigin::KeyFile(path) => format!(
                "Restore the master key file this database was made with from your backup to \
                 {} (mode 0600) and run the command again",
                path.display()
            ),
            MasterOrigin::Passphrase { kdf_file } => format!(
                "Restore the parameter file this database was made with from your backup to \
                 {} and give the passphrase it was made with",
                kdf_file.display()
            ),
        }
    }
}

impl std::fmt::Display for MasterOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MasterOrigin::KeyFile(path) => write!(f, "the master key file {}", path.display()),
            MasterOrigin::Passphrase { kdf_file } => write!(
                f,
                "the passphrase's master key parameter file {}",
                kdf_file.display()
            ),
        }
    }
}

/// The fingerprint a database records, for messages.
#[derive(Debug)]
pub struct RecordedFingerprint(Option<Fingerprint>);

impl std::fmt::Display for RecordedFingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(fingerprint) => write!(f, "fingerprint {fingerprint}"),
            None => f.write_str("by an earlier version, which recorded no fingerprint"),
        }
    }
}

/// What a command does with the master secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MasterUse {
    /// Writes pseudonyms and audit entries (`serve`, `demo`): creates the secret for an
    /// empty database when `may_create`, and records its fingerprint if none is.
    Write { may_create: bool },
    /// Only reads (`audit verify`): never creates a secret nor records a fingerprint.
    Read,
}

/// Loads the master secret for `store` and makes sure it is the database's own: the one
/// whose fingerprint the database records. A secret is created (when `usage` allows) only
/// for an empty database: no fingerprint recorded and no row made with a secret
/// (`Store::holds_master_derived_data`). Otherwise a missing key or parameter file, a
/// different key and a secret from a wrong passphrase all stop the command, with a
/// message that says what to restore. A database of an earlier version, with data but no
/// fingerprint, takes the fingerprint of the secret its first writing start uses, after
/// that secret has verified the last audit entry (when there is one).
pub async fn open_master_secret(
    store: &Store,
    key_file: &Path,
    kdf_file: &Path,
    passphrase: Option<&Passphrase>,
    usage: MasterUse,
) -> Result<MasterSecret, StartupError> {
    let origin = match MasterSource::select(key_file, kdf_file, passphrase)? {
        MasterSource::KeyFile(path) => MasterOrigin::KeyFile(path.to_path_buf()),
        MasterSource::Passphrase { kdf_file, .. } => MasterOrigin::Passphrase {
            kdf_file: kdf_file.to_path_buf(),
        },
    };
    let recorded = store.master_fingerprint().await?;
    let empty = recorded.is_none() && !store.holds_master_derived_data().await?;
    let may_create = empty && usage == (MasterUse::Write { may_create: true });
    let master = match load_master_secret(key_file, kdf_file, passphrase, may_create) {
        Err(StartupError::Key(KeyError::Read { path, source }))
            if !empty && source.kind() == std::io::ErrorKind::NotFound && path == origin.file() =>
        {
            return Err(StartupError::MasterMissing {
                origin,
                recorded: RecordedFingerprint(recorded),
            });
        }
        other => other?,
    };
    let found = master.fingerprint();
    match recorded {
        Some(recorded) if recorded == found => {
            info!(fingerprint = %found, "master secret: the one this database was made with");
        }
        Some(recorded) => {
            return Err(StartupError::MasterMismatch {
                origin,
                recorded,
                found,
            });
        }
        None if usage == MasterUse::Read => {
            warn!(
                "the database records no master key fingerprint yet: the secret is not checked \
                 until `serve` records the fingerprint of the one it uses"
            );
        }
        None => {
            if !empty
                && store
                    .audit_head_verifies(&AuditKey::derive(&master))
                    .await?
                    == Some(false)
            {
                return Err(StartupError::MasterAuditMismatch { origin });
            }
            let on_record = store.record_master_fingerprint(&found).await?;
            if on_record != found {
                // Another process recorded its own secret first.
                return Err(StartupError::MasterMismatch {
                    origin,
                    recorded: on_record,
                    found,
                });
            }
            if empty {
                info!(fingerprint = %found, "recorded the master secret's fingerprint: this database now starts with this secret only");
            } else {
                warn!(fingerprint = %found, "recorded the fingerprint of the master secret in use for a database of an earlier version: it now starts with this secret only");
            }
        }
    }
    Ok(master)
}

/// Opens the database and migrates it. For SQLite, first creates its directory (0700) and
/// file (0600) if missing and narrows the modes of existing data files (`data_dir`).
pub async fn open_store(database_url: &str, max_connections: u32) -> Result<Store, StartupError> {
    // A URL refused before any file is made for it.
    crate::store::Backend::of_url(database_url)?;
    if let Some(db) = data_dir::sqlite_path(database_url) {
        data_dir::prepare_sqlite_files(&db)?;
    }
    let opened = async {
        let store = Store::open_prepared(database_url, max_connections).await?;
        if let Err(err) = store.check_opened_file().await {
            store.close().await;
            return Err(err);
        }
        store.migrate().await?;
        Ok(store)
    };
    opened.await.map_err(|err| {
        let db = data_dir::sqlite_path(database_url);
        let free = db.as_deref().and_then(crate::health::free_bytes);
        no_room(err, db, free)
    })
}

/// Under this many bytes free, a SQLite database that cannot be opened is said to be on a
/// full disk: SQLite needs room for its `-wal` and `-shm` (32 KiB) before anything else.
const START_ROOM: u64 = 1 << 20;

/// `err`, said as a full disk when the disk holding the SQLite database `db` has less than
/// [`START_ROOM`] bytes `free`: SQLite's own words for it at open are "disk I/O error"
/// (it cannot size its `-shm`), and sqlx's after its retries "pool timed out" (a defences
/// audit of 2026-12-07 found a start on a full disk said nothing of the disk).
fn no_room(err: StoreError, db: Option<PathBuf>, free: Option<u64>) -> StartupError {
    match (db, free) {
        (Some(database), Some(free)) if free < START_ROOM => StartupError::NoRoom {
            database,
            free,
            source: err,
        },
        _ => err.into(),
    }
}

pub struct Application {
    /// The SQLite database's server lock (`data_dir`), held until `run_until_stopped`
    /// returns: it is dropped with what is left of `self`, after the database is closed.
    _lock: Option<ServerLock>,
    local_addr: SocketAddr,
    listener: TcpListener,
    /// The web console's listener (`--console-listen`), if it is on.
    console: Option<TcpListener>,
    state: Arc<Services>,
    args: ServeArgs,
    tls: Option<ServerTlsConfig>,
    /// Dead once every writer has finished (a task, or on a SQLite file the thread
    /// `ern-writer`): each holds the audit key until it ends.
    writer_tasks: Weak<AuditKey>,
}

impl Application {
    /// Builds everything and binds the listener; nothing is served until
    /// [`Application::run_until_stopped`].
    pub async fn build(
        args: ServeArgs,
        database_url: &str,
        master_key_file: &Path,
    ) -> Result<Application, StartupError> {
        Self::build_with_clock(args, database_url, master_key_file, Arc::new(SystemClock)).await
    }

    /// [`Application::build`] with the clock every decision reads (tests move it forward
    /// instead of sleeping; `crate::clock`).
    pub async fn build_with_clock(
        mut args: ServeArgs,
        database_url: &str,
        master_key_file: &Path,
        clock: Arc<dyn Clock>,
    ) -> Result<Application, StartupError> {
        let kdf_file = args
            .master_kdf_file
            .clone()
            .unwrap_or_else(|| KdfFile::default_path(master_key_file));
        // The console's connections are counted beside gRPC's: out of descriptors, the
        // console would shut gRPC out too.
        let console_connections = match args.console_listen {
            Some(_) => u64::from(args.console_max_connections),
            None => 0,
        };
        let metrics_connections = match args.metrics_listen {
            Some(_) => crate::exporter::MAX_CONNECTIONS as u64,
            None => 0,
        };
        raise_open_files_limit(
            u64::from(args.max_connections) + console_connections + metrics_connections,
        );
        // What the arguments alone refuse (a plaintext address that is not loopback, TLS
        // files that cannot be read) is refused before any file is made: a claims audit
        // of 2026-12-07 found a new master key and database left behind by a start
        // refused for its address.
        let tls = tls_config(&args)?;
        if let Some(addr) = args.metrics_listen {
            check_metrics_address(addr, args.allow_plaintext)?;
        }
        if let Some(addr) = args.console_listen {
            crate::console::check_address(addr, args.allow_plaintext)
                .map_err(StartupError::Console)?;
        }
        // One server per SQLite database: locked before anything else touches it (and a
        // URL whose lock could be elsewhere refused first).
        crate::store::Backend::of_url(database_url)?;
        let mut lock = data_dir::sqlite_path(database_url)
            .map(|db| {
                let mut lock = ServerLock::acquire(&db)?;
                lock.hold_database(&db)?;
                Ok::<_, DataDirError>(lock)
            })
            .transpose()?;
        // The listeners are bound once the lock is held (so that a second server started
        // with the same flags hears of the first by its lock, not of a port in use), and
        // before the master key and the database are made: a port in use refused a start
        // only after it had made a new master key and database (a re-check of
        // 2026-12-07), whose fingerprint then refused the intended key. Connections that
        // arrive meanwhile wait in the listeners' backlogs until the server runs.
        let listener =
            TcpListener::bind(args.listen)
                .await
                .map_err(|source| StartupError::Listen {
                    addr: args.listen,
                    source,
                })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| StartupError::Listen {
                addr: args.listen,
                source,
            })?;
        let console = match args.console_listen {
            Some(addr) => {
                let listener = crate::console::bind(addr, args.allow_plaintext)
                    .await
                    .map_err(StartupError::Console)?;
                if !addr.ip().is_loopback() {
                    warn!(%addr, "serving the web console over PLAIN HTTP on a non-loopback address (--allow-plaintext): a TLS-terminating proxy must be in front");
                }
                Some(listener)
            }
            None => None,
        };
        if let Some(addr) = args.metrics_listen {
            install_metrics(addr)?;
        }
        let store = open_store(database_url, args.db_max_connections).await?;
        // Taken out of the arguments the application keeps: used once, then wiped (a
        // `secrecy` box) when this function returns.
        let passphrase = args.master_passphrase.take();
        let master = open_master_secret(
            &store,
            master_key_file,
            &kdf_file,
            passphrase.as_ref(),
            MasterUse::Write {
                may_create: !args.require_master_key,
            },
        )
        .await?;
        let writers = args
            .writers
            .unwrap_or_else(|| store.backend().default_writers());
        let writers = if store.backend() == Backend::Sqlite {
            1
        } else {
            writers
        };
        let audit_key = Arc::new(AuditKey::derive(&master));
        let writer_tasks = Arc::downgrade(&audit_key);
        // Research rows stored before their delays were kept in whole months (migration
        // 0026), or whose ages a later rule changed (0027): filled in before research is
        // answered, with or without the index.
        let delays = crate::store::research_index::fill_delay_months(&store).await?;
        if delays.filled > 0 {
            info!(
                rows = delays.filled,
                "filled in the diagnostic delay in whole months (and the ages) of research rows stored before it was kept, or whose ages a later rule changed"
            );
        }
        if delays.unreadable > 0 {
            warn!(
                rows = delays.unreadable,
                "research rows with a diagnostic delay whose record's dates do not parse (changed outside the service): left without a delay in months, in no delay table"
            );
        }
        let research_index = if args.research_index {
            Some(ResearchIndex::load(&store).await?)
        } else {
            info!("research index off: research queries scan the database");
            None
        };
        // Imports that died before finishing leave staged releases: removed (never in
        // force, never activated; `store::codes::remove_abandoned`).
        crate::store::codes::remove_abandoned(&store, chrono::Utc::now()).await?;
        // Records an earlier version stored against the record rules: reported, never
        // changed (what was sent is not on file; `store::cases::diagnosed_as_undiagnosed`).
        let (versions, current) = crate::store::cases::diagnosed_as_undiagnosed(&store).await?;
        if current > 0 {
            metrics::gauge!("ern_cases_unreadable").set(current as f64);
            warn!(
                versions,
                current,
                "case versions stored as ORPHA:616874 (undiagnosed) with a diagnosis by a code \
                 release's replacement (versions of 2026-12-03 to 2026-12-06) cannot be read \
                 back: have their centres update the current ones with a current Orphacode \
                 (docs/codes.md)"
            );
        } else if versions > 0 {
            info!(
                versions,
                "earlier case versions stored as ORPHA:616874 (undiagnosed) with a diagnosis \
                 stay in their cases' histories, which cannot be read back (docs/codes.md)"
            );
        }
        // The code releases in force; without one, codes get format checks only.
        let codes = Arc::new(crate::service::Codes::new(Default::default()));
        codes.refresh(&store).await?;
        if codes.get().releases().next().is_none() {
            info!(
                mode = %codes.get().mode(),
                "code validation: no code release in force (import one with `ern-registry codes import`)"
            );
        }
        let writer = Writer::start_queued(
            store.clone(),
            writers,
            args.max_batch,
            args.writer_queue,
            audit_key,
            Arc::new(RegistryConsentRules),
            research_index
                .as_ref()
                .map(|index| index.after_commit(&store)),
        );
        if writer.purge_at_start().await {
            debug!("database files purged at start");
        }
        let state = Arc::new(Services {
            verifier: KeyVerifier::new(Arc::new(KeyHasher::derive(&master)))
                .accepting_argon2(args.accept_argon2_key_hashes),
            pseudonymiser: crate::service::Sealed::new(Pseudonymiser::new(&master)),
            research_limiter: PrincipalLimiter::per_minute(
                "research queries",
                args.research_queries_per_minute,
            ),
            derivation_limiter: PrincipalLimiter::per_minute(
                "pseudonym derivations",
                args.derivations_per_minute,
            ),
            refusals: Arc::new(Refusals::per_minute(args.refusals_per_peer_per_minute)),
            calls: CallGate::new(args.max_calls_in_flight),
            max_stream_invalid_items: args.max_stream_invalid_items,
            max_message_bytes: args.max_message_bytes,
            stream_idle_timeout: args.request_timeout(),
            stream_items: ItemGate::new(args.max_stream_items_in_flight),
            exports: Arc::new(ItemGate::new(crate::service::cases::EXPORTS_AT_ONCE)),
            protection: crate::service::research::ProtectionPool::new(
                args.protection_workers as usize,
                std::time::Duration::from_millis(args.protection_budget_ms),
            ),
            database: DatabaseWatch::keeping_free(database_url, args.min_free_disk_bytes),
            console: crate::service::console::ConsoleAuth::new(&master, args.console_limits()),
            clock,
            research_index,
            epoch_reads: crate::service::access::EpochReads::of(store.clone()),
            store,
            writer,
            access: crate::service::access::AccessCache::new(),
            codes,
        });
        info!(%local_addr, backend = ?state.store.backend(), writers, "ern-registry ready");
        Ok(Application {
            _lock: {
                // Admin commands compare the `-shm` they find with the server's
                // (`data_dir::refuse_shm_not_the_servers`).
                if let (Some(lock), Some(db)) = (lock.as_mut(), data_dir::sqlite_path(database_url))
                    && let Some(files) = data_dir::OpenFiles::of(&db)
                    && let Err(e) = lock.record(&files)
                {
                    warn!(error = %e, "could not note the database's -shm in the lock file: admin commands will not tell a replaced one");
                }
                lock
            },
            local_addr,
            listener,
            console,
            state,
            args,
            tls,
            writer_tasks,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The web console's bound address, when it is on.
    pub fn console_addr(&self) -> Option<SocketAddr> {
        self.console.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn store(&self) -> &Store {
        &self.state.store
    }

    /// The code releases in force as the services hold them (tests refresh them at once
    /// instead of waiting for the next look).
    pub fn codes(&self) -> Arc<crate::service::Codes> {
        self.state.codes.clone()
    }

    /// The hash of API keys (under this master secret's pepper): what `admin issue-key`
    /// and tests store for a new key.
    pub fn key_hasher(&self) -> Arc<KeyHasher> {
        self.state.verifier.hasher().clone()
    }

    /// Counts of authentication work (Argon2 runs, key reads).
    pub fn auth_counters(&self) -> Arc<AuthCounters> {
        self.state.verifier.counters().clone()
    }

    /// The turns of export pages per principal (for tests that hold one; not the
    /// services themselves, which the writers outlive only once every holder is gone).
    pub fn export_turns(&self) -> Arc<ItemGate> {
        self.state.exports.clone()
    }

    /// The commands waiting in the writers' queues (it does not keep the writers open).
    pub fn writer_backlog(&self) -> crate::store::writer::Backlog {
        self.state.writer.backlog()
    }

    /// Serves until `shutdown` resolves; then reports NOT_SERVING, stops accepting
    /// connections, gives calls in flight and open streams `--shutdown-grace-secs` to
    /// finish and ends those still open with UNAVAILABLE ([`DrainLayer`]), lets the writer
    /// commit what it has queued (at most [`WRITER_FLUSH_LIMIT`]) and closes the database.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), StartupError> {
        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        health_reporter
            .set_serving::<CaseServiceServer<CaseApi>>()
            .await;
        health_reporter
            .set_serving::<ConsentServiceServer<ConsentApi>>()
            .await;
        health_reporter
            .set_serving::<ResearchServiceServer<ResearchApi>>()
            .await;
        health_reporter
            .set_serving::<AdminServiceServer<AdminApi>>()
            .await;
        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()?;
        let max = self.args.max_message_bytes;
        let cases = CaseServiceServer::new(CaseApi::new(self.state.clone()))
            .max_decoding_message_size(max)
            .max_encoding_message_size(max);
        let consent = ConsentServiceServer::new(ConsentApi::new(self.state.clone()))
            .max_decoding_message_size(max)
            .max_encoding_message_size(max);
        let research = ResearchServiceServer::new(ResearchApi::new(self.state.clone()))
            .max_decoding_message_size(max)
            .max_encoding_message_size(max);
        let admin = AdminServiceServer::new(AdminApi::new(self.state.clone()))
            .max_decoding_message_size(max)
            .max_encoding_message_size(max);
        let services = vec![
            CaseServiceServer::<CaseApi>::NAME,
            ConsentServiceServer::<ConsentApi>::NAME,
            ResearchServiceServer::<ResearchApi>::NAME,
            AdminServiceServer::<AdminApi>::NAME,
        ];
        // `stopping` turns true on the shutdown signal, `deadline` when the grace is over.
        let (stopping_tx, stopping) = watch::channel(false);
        let (deadline_tx, deadline) = watch::channel(false);
        let probe = tokio::spawn(self.state.database.clone().run(
            health_reporter.clone(),
            services.clone(),
            stopping.clone(),
            self.state.writer.backlog(),
        ));
        let grace = self.args.shutdown_grace();
        let signal = async move {
            shutdown.await;
            let _ = stopping_tx.send(true);
            for service in std::iter::once("").chain(services) {
                health_reporter
                    .set_service_status(service, tonic_health::ServingStatus::NotServing)
                    .await;
            }
            info!(
                ?grace,
                "shutting down: NOT_SERVING, no new connections, calls in flight may finish"
            );
        };
        let wire = WireContractLayer::new(
            &[
                crate::proto::FILE_DESCRIPTOR_SET,
                tonic_health::pb::FILE_DESCRIPTOR_SET,
                tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            ],
            max,
            Some(self.state.refusals.clone()),
            Some(crate::api::wire::Unfinished::new(
                self.args.max_connections as usize,
            )),
        );
        let connections = Connections::new(ConnectionLimits {
            max_connections: self.args.max_connections as usize,
            max_per_peer: self.args.max_connections_per_peer as usize,
            idle_timeout: self.args.idle_timeout(),
            max_unread_per_peer: Some(self.args.max_unread_bytes_per_peer),
            max_unread_all: Some(self.args.max_unread_bytes),
            max_reflection_per_peer: Some(self.args.max_reflection_calls_per_peer as usize),
            // A connection without a key (health, reflection, or nothing yet) gives its
            // place to a new one at the cap: callers without a key cannot hold every place.
            evict_without_key: true,
        });
        let incoming = connections.incoming(self.listener, self.args.keepalive());
        let code_refresh = tokio::spawn(
            self.state
                .codes
                .clone()
                .keep_fresh(self.state.store.clone()),
        );
        // PostgreSQL only: the planner's statistics follow the registry's growth.
        let statistics = tokio::spawn(crate::store::statistics::keep_current(
            self.state.store.clone(),
        ));
        // What outage warnings counted after their last line is written once a line is
        // due (within 11 s of that line: `logging::flush_pending_every`), not only when
        // the same warning comes again.
        let pending_warnings = tokio::spawn(crate::logging::flush_pending_every());
        let refusal_summary = Flusher::start(
            self.state.refusals.clone(),
            self.state.writer.clone(),
            Duration::from_secs(self.args.refusal_summary_secs),
            self.state.database.clone(),
        );
        let console_deadline = deadline.clone();
        let mut server = Server::builder();
        if let Some(tls) = self.tls {
            server = server.tls_config(tls)?;
        }
        let serve = server
            .timeout(self.args.request_timeout())
            .http2_keepalive_interval(self.args.keepalive())
            .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
            .http2_max_header_list_size(MAX_HEADER_LIST_BYTES)
            .initial_stream_window_size(STREAM_WINDOW_BYTES)
            .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
            .max_concurrent_streams(self.args.max_streams_per_connection)
            .layer(connections.layer())
            .layer(DrainLayer::new(deadline))
            .layer(wire)
            .layer(connections.admission_layer())
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(cases)
            .add_service(consent)
            .add_service(research)
            .add_service(admin)
            .serve_with_incoming_shutdown(incoming, signal);
        // The web console stops with gRPC: no new connections once `stopping` is set;
        // requests in flight get the grace, then are answered 503 (`console::serve`), and
        // the console is no longer waited for CLOSE_LIMIT later, as gRPC's connections.
        let console = self.console.map(|listener| {
            tokio::spawn(crate::console::serve(
                listener,
                self.state.clone(),
                crate::console::ConsoleLimits {
                    max_connections: self.args.console_max_connections as usize,
                    request_timeout: self.args.request_timeout(),
                    header_timeout: std::time::Duration::from_secs(
                        self.args.console_header_timeout_secs,
                    ),
                },
                stopping.clone(),
                console_deadline,
            ))
        });
        // When the signal came (`None`: gRPC stopped without one, on an error).
        let signal = stopping.clone();
        let mut signalled = stopping.clone();
        let stopped_at = tokio::spawn(async move {
            signalled
                .wait_for(|stop| *stop)
                .await
                .ok()
                .map(|_| tokio::time::Instant::now())
        });
        let result = serve_until_deadline(serve, stopping, deadline_tx, grace).await;
        if let Some(console) = console {
            let abort = console.abort_handle();
            let came = *signal.borrow();
            let at = if came {
                stopped_at.await.ok().flatten()
            } else {
                stopped_at.abort();
                None
            };
            let cut_off = match at {
                Some(at) => tokio::time::timeout_at(at + grace + CLOSE_LIMIT, console)
                    .await
                    .is_err(),
                None => true,
            };
            if cut_off {
                warn!("the web console did not stop by the deadline; its requests are cut off");
                abort.abort();
            }
        }
        probe.abort();
        code_refresh.abort();
        statistics.abort();
        // The last summary of refused calls goes in before the writer drains, within the
        // same limit (its entries are writes like any other).
        let flushed_by = Instant::now() + WRITER_FLUSH_LIMIT;
        if tokio::time::timeout_at(flushed_by.into(), refusal_summary.finish())
            .await
            .is_err()
        {
            warn!("the last summary of refused calls was not written in time");
        }
        info!("server stopped; the writer finishes its queue");
        // The writers finish their queues when the last handle (in the state, which
        // tasks of streams ended at the deadline may still hold for a moment) goes; the
        // database is closed only after them, so that no queued write is cut off.
        let store = self.state.store.clone();
        drop(self.state);
        while self.writer_tasks.strong_count() > 0 {
            if Instant::now() > flushed_by {
                error!(
                    limit = ?WRITER_FLUSH_LIMIT,
                    "the writer did not finish its queue in time; writes not yet committed \
                     are lost (their callers were never told they succeeded)"
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let closing = flushed_by
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(100));
        if tokio::time::timeout(closing, store.close()).await.is_err() {
            warn!("the database connections did not close in time");
        }
        pending_warnings.abort();
        crate::logging::flush_pending(true);
        info!("database closed");
        result
    }
}

/// How long an HTTP/2 keepalive PING may go unanswered before the connection is closed.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// The largest header block a request may have, as HTTP/2 counts it (each field's name
/// and value and 32 bytes; `SETTINGS_MAX_HEADER_LIST_SIZE`). hyper's default is 16 KiB; a
/// gRPC request's fields are a few hundred bytes (a key, a deadline, a user agent, a
/// trace context), and a call waiting for its message holds them (`api::wire`).
const MAX_HEADER_LIST_BYTES: u32 = 8 << 10;

/// How much of one stream's request body HTTP/2 lets a client send ahead of what the
/// service has read (the connection's window stays 1 MiB). h2 allows a connection's
/// unread DATA frames at most half its window in framing overhead (256 bytes less each
/// frame's payload, for payloads under 256 bytes), then closes it with GOAWAY
/// ENHANCE_YOUR_CALM "too_many_data_frames". Clients such as grpcio send each message of
/// a stream in a frame of its own, so with a stream window of 1 MiB, one `SubmitCases`
/// stream of small items (about 130 bytes) that the service falls behind on (a lock held
/// for a moment) had its connection closed, every call on it failing (a defences audit of
/// 2026-12-07: 0.4 s after another process took SQLite's write lock). With 64 KiB per
/// stream, a stream's unread frames stay under that budget for any frame of 29 bytes or
/// more (every valid item is larger), and so do about eight streams of such small items
/// at once on one connection (more share the connection's window and may reach it:
/// open a connection for every few, or send larger messages).
const STREAM_WINDOW_BYTES: u32 = 64 << 10;
/// The connection's window: what every stream of a connection together may send ahead
/// (hyper's default, stated: `docs/security.md` relies on it).
const CONNECTION_WINDOW_BYTES: u32 = 1 << 20;

/// How long a client may take over the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the last summary of refused calls, the writer's queue and the closing of the
/// database may take together, after the server has stopped.
pub const WRITER_FLUSH_LIMIT: Duration = Duration::from_secs(5);

/// How long connections may stay open after the grace (their calls have been ended)
/// before the server stops waiting for them.
const CLOSE_LIMIT: Duration = Duration::from_secs(2);

/// Runs `serve` (which stops accepting when `stopping` turns true and returns when every
/// connection has closed); `grace` after `stopping`, sets `deadline`, which ends every
/// call still open (`DrainLayer`), and stops waiting for connections [`CLOSE_LIMIT`]
/// later.
async fn serve_until_deadline(
    serve: impl Future<Output = Result<(), tonic::transport::Error>>,
    mut stopping: watch::Receiver<bool>,
    deadline: watch::Sender<bool>,
    grace: Duration,
) -> Result<(), StartupError> {
    let deadline_passes = async {
        if stopping.wait_for(|stop| *stop).await.is_err() {
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(grace).await;
        warn!(
            ?grace,
            "shutdown grace over: calls still open end with UNAVAILABLE"
        );
        let _ = deadline.send(true);
        tokio::time::sleep(CLOSE_LIMIT).await;
    };
    tokio::select! {
        result = serve => result.map_err(Into::into),
        () = deadline_passes => {
            warn!("connections still open after the grace; no longer waiting for them");
            Ok(())
        }
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    info!("shutdown requested");
}

/// File descriptors kept beside the connections allowed (gRPC's, the console's and the
/// metrics listener's): the database and its pool, the log, the lock and key files.
const DESCRIPTORS_RESERVED: u64 = 256;

/// Raises the process's soft limit of open files to its hard limit (many systems start
/// a service at a soft limit of 1,024, no more than `--max-connections`' default, and
/// every connection is a descriptor), and warns when the limit leaves fewer than
/// [`DESCRIPTORS_RESERVED`] beside the `max_connections` allowed (gRPC's and the
/// console's; running out, the server stops accepting connections until some close:
/// `connections`).
fn raise_open_files_limit(max_connections: u64) {
    #[cfg(unix)]
    {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: `getrlimit` writes this process's limit into the struct it is given.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
            return;
        }
        if limit.rlim_cur < limit.rlim_max {
            // Linux refuses an unlimited soft limit of open files: its own ceiling then.
            let target = if limit.rlim_max == libc::RLIM_INFINITY {
                1 << 20
            } else {
                limit.rlim_max
            };
            let raised = libc::rlimit {
                rlim_cur: target.max(limit.rlim_cur),
                rlim_max: limit.rlim_max,
            };
            // Where the target is refused (macOS caps it at `kern.maxfilesperproc`),
            // 10,240, the common ceiling there.
            for cur in [
                raised.rlim_cur,
                raised.rlim_cur.min(10_240).max(limit.rlim_cur),
            ] {
                let raised = libc::rlimit {
                    rlim_cur: cur,
                    ..raised
                };
                // SAFETY: `setrlimit` reads the struct it is given.
                if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
                    debug!(from = limit.rlim_cur, to = cur, "open-files limit raised");
                    limit = raised;
                    break;
                }
                debug!(
                    to = cur,
                    error = %std::io::Error::last_os_error(),
                    "the open-files limit could not be raised"
                );
            }
        }
        let needed = max_connections.saturating_add(DESCRIPTORS_RESERVED);
        // `rlim_t` is not `u64` on every Unix.
        #[allow(clippy::unnecessary_cast)]
        let soft = limit.rlim_cur as u64;
        if soft < needed {
            warn!(
                open_files = soft,
                max_connections,
                "the open-files limit leaves too few descriptors beside --max-connections \
                 and --console-max-connections (at least {DESCRIPTORS_RESERVED} more are \
                 needed): raise it (ulimit -n, LimitNOFILE=) or lower them"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A SQLite database that cannot be opened on a disk without room is said to be on a
    /// full disk; with room, or on PostgreSQL, or where the disk cannot be asked, the
    /// error is SQLite's own.
    #[test]
    fn a_database_that_cannot_be_opened_on_a_full_disk_says_so() {
        let db = PathBuf::from("/data/registry.db");
        let failed = || StoreError::Unreachable {
            cause: "disk I/O error".into(),
        };
        let err = no_room(failed(), Some(db.clone()), Some(4096));
        assert!(
            matches!(err, StartupError::NoRoom { free: 4096, .. }),
            "{err}"
        );
        let text = err.to_string();
        assert!(
            text.contains("/data/registry.db")
                && text.contains("disk I/O error")
                && text.contains("has 4096 bytes free: free some room"),
            "{text}"
        );
        for (database, free) in [
            (Some(db.clone()), Some(START_ROOM)),
            (Some(db), None),
            (None, Some(0)),
        ] {
            let err = no_room(failed(), database, free);
            assert!(matches!(err, StartupError::Store(_)), "{err}");
        }
    }

    #[test]
    fn metrics_are_served_off_loopback_only_when_forced() {
        for loopback in ["127.0.0.1:9464", "[::1]:9464"] {
            assert!(check_metrics_address(loopback.parse().unwrap(), false).is_ok());
        }
        let open: SocketAddr = "0.0.0.0:9464".parse().unwrap();
        assert!(matches!(
            check_metrics_address(open, false),
            Err(StartupError::PlaintextMetrics(addr)) if addr == open
        ));
        assert!(check_metrics_address(open, true).is_ok());
        assert!(check_metrics_address("10.1.2.3:9464".parse().unwrap(), false).is_err());
    }
}
