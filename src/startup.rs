//! The composition root: builds the application from its configuration (database, keys,
//! writer, services, server) and runs it until asked to stop.
//!
//! `main` parses the command line and calls [`Application::build`]; the integration
//! tests and the benchmark do the same with port 0 and their own database.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ring::rand::SystemRandom;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tracing::{info, warn};

use crate::api::{
    AppState, admin::AdminApi, case::CaseApi, consent::ConsentApi, research::ResearchApi,
};
use crate::audit::AuditKey;
use crate::auth::KeyVerifier;
use crate::config::ServeArgs;
use crate::keys::{KdfFile, KeyError, MasterSecret, MasterSource, Passphrase};
use crate::proto::admin_service_server::AdminServiceServer;
use crate::proto::case_service_server::CaseServiceServer;
use crate::proto::consent_service_server::ConsentServiceServer;
use crate::proto::research_service_server::ResearchServiceServer;
use crate::pseudonym::Pseudonymiser;
use crate::ratelimit::PrincipalLimiter;
use crate::store::writer::Writer;
use crate::store::{Backend, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
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
    let mut config = ServerTlsConfig::new().identity(Identity::from_pem(read(cert)?, read(key)?));
    if let Some(ca) = &args.tls_client_ca {
        config = config
            .client_ca_root(Certificate::from_pem(read(ca)?))
            .client_auth_optional(false);
        info!("mutual TLS: client certificates required");
    }
    Ok(Some(config))
}

/// Serves Prometheus metrics on `addr` (process-wide: a second call in the same process,
/// as in tests, keeps the first exporter).
fn install_metrics(addr: SocketAddr) -> Result<(), StartupError> {
    use metrics_exporter_prometheus::{BuildError, PrometheusBuilder};
    match PrometheusBuilder::new().with_http_listener(addr).install() {
        Ok(()) => {}
        Err(BuildError::FailedToSetGlobalRecorder(_)) => {
            warn!(%addr, "a metrics exporter is already installed in this process");
            return Ok(());
        }
        Err(e) => {
            return Err(StartupError::Metrics {
                addr,
                reason: e.to_string(),
            });
        }
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
        "Calls refused by a per-principal rate limit, by limit"
    );
    info!(%addr, "serving Prometheus metrics at /metrics");
    Ok(())
}

/// Creates the directory a file will live in, if needed.
fn ensure_parent(path: &Path) -> Result<(), StartupError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| StartupError::DataDir {
            path: dir.to_path_buf(),
            source,
        })?;
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

/// Opens the database (creating the SQLite directory if needed) and migrates it.
pub async fn open_store(database_url: &str, max_connections: u32) -> Result<Store, StartupError> {
    if let Some(path) = database_url
        .strip_prefix("sqlite://")
        .map(|p| p.split('?').next().unwrap_or(p))
    {
        ensure_parent(Path::new(path))?;
    }
    let store = Store::connect(database_url, max_connections).await?;
    store.migrate().await?;
    Ok(store)
}

pub struct Application {
    local_addr: SocketAddr,
    listener: TcpListener,
    state: Arc<AppState>,
    args: ServeArgs,
    tls: Option<ServerTlsConfig>,
}

impl Application {
    /// Builds everything and binds the listener; nothing is served until
    /// [`Application::run_until_stopped`].
    pub async fn build(
        args: ServeArgs,
        database_url: &str,
        master_key_file: &Path,
    ) -> Result<Application, StartupError> {
        let kdf_file = args
            .master_kdf_file
            .clone()
            .unwrap_or_else(|| KdfFile::default_path(master_key_file));
        let master = load_master_secret(
            master_key_file,
            &kdf_file,
            args.master_passphrase.as_ref(),
            !args.require_master_key,
        )?;
        if let Some(addr) = args.metrics_listen {
            install_metrics(addr)?;
        }
        let store = open_store(database_url, args.db_max_connections).await?;
        let writers = args
            .writers
            .unwrap_or_else(|| store.backend().default_writers());
        let writers = if store.backend() == Backend::Sqlite {
            1
        } else {
            writers
        };
        let writer = Writer::start(
            store.clone(),
            writers,
            args.max_batch,
            Arc::new(AuditKey::derive(&master)),
        );
        let rng = SystemRandom::new();
        let state = Arc::new(AppState {
            verifier: KeyVerifier::new(&rng).map_err(|_| StartupError::Random)?,
            pseudonymiser: Pseudonymiser::new(&master),
            research_limiter: PrincipalLimiter::per_minute(
                "research queries",
                args.research_queries_per_minute,
            ),
            derivation_limiter: PrincipalLimiter::per_minute(
                "pseudonym derivations",
                args.derivations_per_minute,
            ),
            protection: crate::api::research::ProtectionPool::new(
                args.protection_workers as usize,
                std::time::Duration::from_millis(args.protection_budget_ms),
            ),
            store,
            writer,
        });
        let tls = tls_config(&args)?;
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
        info!(%local_addr, backend = ?state.store.backend(), writers, "ern-registry ready");
        Ok(Application {
            local_addr,
            listener,
            state,
            args,
            tls,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn store(&self) -> &Store {
        &self.state.store
    }

    /// Serves until `shutdown` resolves, then stops taking calls, lets running calls
    /// finish, and drains the write queue.
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
        let incoming = TcpIncoming::from(self.listener).with_nodelay(Some(true));
        let mut server = Server::builder();
        if let Some(tls) = self.tls {
            server = server.tls_config(tls)?;
        }
        let result = server
            .timeout(self.args.request_timeout())
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(cases)
            .add_service(consent)
            .add_service(research)
            .add_service(admin)
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await;
        info!("server stopped; closing the database");
        // The writer tasks finish their queues when the last handle (in the state) goes.
        let store = self.state.store.clone();
        drop(self.state);
        store.close().await;
        result.map_err(Into::into)
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
