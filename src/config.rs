//! Command line and environment: one typed structure per subcommand, safe defaults.
//!
//! Every option has an environment variable (`ERN_...`, and the conventional
//! `DATABASE_URL`). With no options at all, `serve` listens on loopback, keeps its
//! SQLite database and master key under `./data/`, and needs nothing else.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::keys::Passphrase;

#[derive(Debug, Parser)]
#[command(
    name = "ern-registry",
    version,
    about = "Pseudonymised patient registry service for the European Reference Networks"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Args)]
pub struct GlobalArgs {
    /// Directory for the embedded database and the master key file.
    #[arg(long, env = "ERN_DATA_DIR", default_value = "data", global = true)]
    pub data_dir: PathBuf,
    /// Database: sqlite://PATH or postgres://USER@HOST/DB. Default: SQLite in the data dir.
    #[arg(long, env = "DATABASE_URL", global = true)]
    pub database_url: Option<String>,
    /// Log format.
    #[arg(long, env = "ERN_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
}

impl GlobalArgs {
    pub fn database_url(&self) -> String {
        self.database_url.clone().unwrap_or_else(|| {
            format!(
                "sqlite://{}?mode=rwc",
                self.data_dir.join("registry.db").display()
            )
        })
    }

    /// `--database-url` with any password replaced, for logs.
    pub fn database_url_redacted(&self) -> String {
        redact_url(&self.database_url())
    }
}

/// Replaces the password of `scheme://user:password@host/...` with `***`, parsing the URL
/// as the database driver does (the last `@` of the authority ends the user info, so a
/// password with an unencoded `@` is hidden whole). A URL that does not parse is not
/// printed at all: it might still hold a password.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) => {
            if parsed.password().is_some() {
                // Only fails for URLs that cannot have a password, which this one has.
                let _ = parsed.set_password(Some("***"));
            }
            parsed.to_string()
        }
        Err(_) => "(a database URL that does not parse)".to_string(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

// Parsed once at start-up: the size of `serve`'s options costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gRPC service.
    Serve(ServeArgs),
    /// Create a new master key file (mode 0600). Refuses to overwrite one.
    Keygen {
        /// Where to write it. Default: where `serve` will look for it, given the same
        /// environment: ERN_MASTER_KEY_FILE or <data dir>/master.key; with --passphrase,
        /// ERN_MASTER_KDF_FILE, or master.kdf next to that key file.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Passphrase mode: write the Argon2id parameter file (fresh salt, cost, check)
        /// for the passphrase in ERN_MASTER_PASSPHRASE or --master-passphrase-file,
        /// instead of a key file.
        #[arg(long)]
        passphrase: bool,
        /// File holding the master passphrase (first line).
        #[arg(long, env = "ERN_MASTER_PASSPHRASE_FILE")]
        master_passphrase_file: Option<PathBuf>,
    },
    /// Administration: centres, principals, API keys, registries. Every command that
    /// changes something is recorded in the audit log (who: the OS user), so it needs the
    /// master key.
    #[command(subcommand)]
    Admin(AdminCommand),
    /// The tamper-evident audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Code releases (HPO, Orphanet, HGNC) that submissions are checked against and
    /// research questions expand along. Importing and activating are recorded in the
    /// audit log, so they need the master key. See docs/codes.md.
    #[command(subcommand)]
    Codes(CodesCommand),
    /// Fill a registry with synthetic patients (demo centres, identifiers of the synthetic
    /// issuer XT, realistic distributions) through the same write path as submissions. For demos and
    /// benchmarks only: never on a registry with real patients.
    Demo {
        /// Registry (ERN) code.
        #[arg(long, default_value = "ERN-LUNG")]
        registry: String,
        /// How many patients to add (after those already there).
        #[arg(long, default_value_t = 2000)]
        patients: u32,
        /// Seed of the generator: the same seed gives the same patients.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Master key file. Default: <data dir>/master.key (created if missing).
        #[arg(long, env = "ERN_MASTER_KEY_FILE")]
        master_key_file: Option<PathBuf>,
        /// File holding the master passphrase (first line); see `serve --help`.
        #[arg(long, env = "ERN_MASTER_PASSPHRASE_FILE")]
        master_passphrase_file: Option<PathBuf>,
        /// Argon2id parameter file of the passphrase, as `serve` is given it. Default:
        /// master.kdf next to the master key file.
        #[arg(long, env = "ERN_MASTER_KDF_FILE")]
        master_kdf_file: Option<PathBuf>,
    },
    /// Bulk upload of cases from a CSV file in the template's columns (`--template`) or
    /// JSON Lines of SubmitCaseRequest in the proto JSON form, streamed through
    /// CaseService.SubmitCases. Every line is checked locally first; the result file
    /// records each line's outcome, and a re-run skips the lines already accepted. The
    /// API key comes from ERN_API_KEY or --api-key-file, never from a flag.
    Upload(UploadArgs),
}

/// The format of an upload file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum UploadFormat {
    /// The CSV template (`upload --template`).
    Csv,
    /// JSON Lines: one SubmitCaseRequest per line, in the proto JSON form.
    Jsonl,
    /// JSON Lines of GA4GH Phenopackets v2: one SubmitPhenopacketRequest per line, in
    /// the proto JSON form, its `phenopacket` a JSON object or its text.
    Phenopackets,
}

#[derive(Debug, Clone, Args)]
pub struct UploadArgs {
    /// The file to upload (`.csv` or `.jsonl`/`.ndjson`; see --format).
    #[arg(required_unless_present = "template")]
    pub file: Option<PathBuf>,
    /// Print the CSV template (the header and an example row) and exit.
    #[arg(long)]
    pub template: bool,
    /// The server: http://HOST:PORT, or https://HOST:PORT for TLS.
    #[arg(long, env = "ERN_SERVER", default_value = "http://127.0.0.1:50051")]
    pub server: String,
    /// Registry (ERN) code of every line of a CSV file, and of the JSON lines that name
    /// none.
    #[arg(long, env = "ERN_REGISTRY")]
    pub registry: Option<String>,
    /// The file's format. Default: from its extension (.jsonl and .ndjson are JSON Lines,
    /// anything else CSV); phenopackets only when named.
    #[arg(long, value_enum)]
    pub format: Option<UploadFormat>,
    /// The result file (CSV: line, client reference, outcome, pseudonym, error). Default:
    /// the input file's name with `.results.csv` for `.csv` (`cases.results.csv`), after
    /// its extension otherwise (`cases.jsonl.results.csv`). Also the record a re-run
    /// resumes from.
    #[arg(long)]
    pub results: Option<PathBuf>,
    /// Send the valid lines even when some lines are invalid (the invalid ones are
    /// reported in the result file and not sent).
    #[arg(long)]
    pub send_valid: bool,
    /// Check every line and report, but send nothing.
    #[arg(long)]
    pub check: bool,
    /// File whose first line is the API key (instead of the ERN_API_KEY variable).
    #[arg(long, env = "ERN_API_KEY_FILE")]
    pub api_key_file: Option<PathBuf>,
    /// CA certificate (PEM) to verify the server's certificate by (https).
    #[arg(long, env = "ERN_TLS_CA")]
    pub ca_cert: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS, with --client-key.
    #[arg(long, env = "ERN_TLS_CLIENT_CERT", requires = "client_key")]
    pub client_cert: Option<PathBuf>,
    /// Private key (PEM) of the client certificate.
    #[arg(long, env = "ERN_TLS_CLIENT_KEY", requires = "client_cert")]
    pub client_key: Option<PathBuf>,
    /// Passes over the lines still to send that may end without progress (the server
    /// unavailable, or rate limiting) before the upload gives up.
    #[arg(long, default_value_t = 8)]
    pub max_retries: u32,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "ERN_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Serve the web console (HTML over HTTP/1.1, for consent officers, researchers and
    /// physicians who sign in with a password and a TOTP code) on this address, e.g.
    /// 127.0.0.1:8080. Off when unset. It serves plain HTTP: on loopback only, unless
    /// --allow-plaintext is set for a TLS-terminating proxy in front. See docs/console.md.
    #[arg(long, env = "ERN_CONSOLE_LISTEN")]
    pub console_listen: Option<SocketAddr>,
    /// A console session without a request for this many minutes ends.
    #[arg(long, env = "ERN_CONSOLE_IDLE_MINUTES", default_value_t = 15,
          value_parser = clap::value_parser!(u32).range(1..=1440))]
    pub console_idle_minutes: u32,
    /// A console session ends this many hours after sign-in, whatever happens.
    #[arg(long, env = "ERN_CONSOLE_SESSION_HOURS", default_value_t = 8,
          value_parser = clap::value_parser!(u32).range(1..=168))]
    pub console_session_hours: u32,
    /// Web console connections open at once, from everyone together (behind a proxy
    /// every user has its address); further ones are closed on accept. A request not
    /// answered within --request-timeout-secs (its body included) is answered 503.
    #[arg(long, env = "ERN_CONSOLE_MAX_CONNECTIONS", default_value_t = 128,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub console_max_connections: u32,
    /// A web console connection that does not send a request's headers within this many
    /// seconds (idle between requests included) is closed.
    #[arg(long, env = "ERN_CONSOLE_HEADER_TIMEOUT_SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub console_header_timeout_secs: u64,
    /// Master key file; created (mode 0600) on first start if missing.
    #[arg(long, env = "ERN_MASTER_KEY_FILE")]
    pub master_key_file: Option<PathBuf>,
    /// Refuse to create a master key: fail if the key file (with a passphrase: the
    /// parameter file) is missing (production).
    #[arg(long, env = "ERN_REQUIRE_MASTER_KEY", default_value_t = false)]
    pub require_master_key: bool,
    /// Largest message a call may send or be answered with, in bytes (1 KiB to 64 MiB).
    #[arg(long, env = "ERN_MAX_MESSAGE_BYTES", default_value_t = 1024 * 1024,
          value_parser = clap::builder::TypedValueParser::map(
              clap::value_parser!(u64).range(1024..=64 * 1024 * 1024), |n| n as usize))]
    pub max_message_bytes: usize,
    /// Group-commit writers. Default: 2 on PostgreSQL; SQLite always has one.
    #[arg(long, env = "ERN_WRITERS")]
    pub writers: Option<usize>,
    /// Most writes committed in one transaction.
    #[arg(long, env = "ERN_MAX_BATCH", default_value_t = 512)]
    pub max_batch: usize,
    /// Commands waiting in each writer's queue (1 to 1,000,000; a transaction takes up to
    /// `--max-batch` of them); a call finds it full only under an overload, and waits for
    /// room.
    #[arg(long, env = "ERN_WRITER_QUEUE", default_value_t = crate::store::writer::QUEUE_DEPTH,
          value_parser = clap::builder::TypedValueParser::map(
              clap::value_parser!(u64).range(1..=1_000_000), |n| n as usize))]
    pub writer_queue: usize,
    /// Database connection pool size (1 to 1,024).
    #[arg(long, env = "ERN_DB_MAX_CONNECTIONS", default_value_t = 16,
          value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub db_max_connections: u32,
    /// Deadline for any one call, in seconds.
    #[arg(long, env = "ERN_REQUEST_TIMEOUT_SECS", default_value_t = 30)]
    pub request_timeout_secs: u64,
    /// On SIGTERM or Ctrl-C: seconds that calls in flight and open streams get to finish
    /// before they are ended with UNAVAILABLE. Connections still open 2 s later are no
    /// longer waited for; the writer then commits what it has queued (at most 5 more
    /// seconds) and the process exits 0. Keep grace + 7 below the orchestrator's kill
    /// timeout (30 s in Kubernetes; 10 s for `docker stop` unless raised with
    /// `docker run --stop-timeout`).
    #[arg(long, env = "ERN_SHUTDOWN_GRACE_SECS", default_value_t = 20,
          value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub shutdown_grace_secs: u64,
    /// Research queries (ResearchService calls) each principal may make per minute; a
    /// burst of up to this many is allowed, then calls are refused (RESOURCE_EXHAUSTED,
    /// with the time to wait) until the rate allows again.
    #[arg(long, env = "ERN_RESEARCH_QUERIES_PER_MINUTE", default_value_t = 60,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub research_queries_per_minute: u32,
    /// Time a research answer may take to be proven safe (cell suppression and its audit),
    /// in milliseconds, counted from when it asks for a worker. An answer not proven safe
    /// in time is not given (FAILED_PRECONDITION: ask a coarser question).
    #[arg(long, env = "ERN_PROTECTION_BUDGET_MS", default_value_t = 5_000,
          value_parser = clap::value_parser!(u64).range(10..=120_000))]
    pub protection_budget_ms: u64,
    /// Answer research queries from the in-memory research index, loaded from the
    /// database at start and kept in step with every commit (of every instance); false:
    /// from SQL scans of the database (slower, the reference implementation).
    #[arg(long, env = "ERN_RESEARCH_INDEX", default_value_t = true,
          action = clap::ArgAction::Set)]
    pub research_index: bool,
    /// Research tables protected at once, each on a blocking thread off the async runtime;
    /// one question at a time per principal. Further queries wait for their turn and a
    /// worker within their budget.
    #[arg(long, env = "ERN_PROTECTION_WORKERS", default_value_t = 2,
          value_parser = clap::value_parser!(u64).range(1..=64))]
    pub protection_workers: u64,
    /// Pseudonym derivations (submissions and consent calls that send identifiers) each
    /// principal may make per minute, in bursts of up to as many; beyond, calls fail with
    /// RESOURCE_EXHAUSTED and the time to wait. Raise it for a bulk migration.
    #[arg(long, env = "ERN_DERIVATIONS_PER_MINUTE", default_value_t = 1200,
          value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub derivations_per_minute: u32,
    /// Calls refused before authentication (no key, a wrong or dead key), or abandoned
    /// while authenticating with a key not known to this process, that one network peer
    /// (an IPv4 address, an IPv6 /64) may cause per minute, in bursts of as many.
    /// Beyond, its calls are refused with RESOURCE_EXHAUSTED and the time to wait, without
    /// a database read, unless they present a key this process has verified before.
    /// Refusals of calls in flight together may overdraw it by up to five minutes of it,
    /// repaid before the peer is let through again.
    #[arg(long, env = "ERN_REFUSALS_PER_PEER_PER_MINUTE", default_value_t = 300,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub refusals_per_peer_per_minute: u32,
    /// Refused unauthenticated calls are audited as one entry per peer, method and outcome
    /// with their number, written every this many seconds (held while the database is
    /// unreachable) and at shutdown.
    #[arg(long, env = "ERN_REFUSAL_SUMMARY_SECS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub refusal_summary_secs: u64,
    /// Calls of one principal running at once (an open bulk stream is one); as many more
    /// wait for one of them to finish, and beyond that calls are refused with
    /// RESOURCE_EXHAUSTED.
    #[arg(long, env = "ERN_MAX_CALLS_IN_FLIGHT", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_calls_in_flight: u32,
    /// Accept API keys whose stored hash is the Argon2id hash of an earlier version (each
    /// is re-stored as HMAC on its next use). Off by default: whoever can write the
    /// `api_keys` table could plant an Argon2id hash of a secret of their own, which needs
    /// no master secret. Turn it on only while keys issued before the HMAC scheme are
    /// being migrated (docs/security.md, "Keys of earlier versions").
    #[arg(long, env = "ERN_ACCEPT_ARGON2_KEY_HASHES", default_value_t = false,
          action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub accept_argon2_key_hashes: bool,
    /// Invalid items (rejected as INVALID_ARGUMENT, PERMISSION_DENIED, NOT_FOUND,
    /// UNAUTHENTICATED or RESOURCE_EXHAUSTED) one bulk stream may send before it is ended
    /// with RESOURCE_EXHAUSTED.
    #[arg(long, env = "ERN_MAX_STREAM_INVALID_ITEMS", default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub max_stream_invalid_items: u32,
    /// Bulk-stream items of one principal processed at once, across all its open
    /// streams; the next item is not read until one finishes (flow control holds the
    /// client).
    #[arg(long, env = "ERN_MAX_STREAM_ITEMS_IN_FLIGHT", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_stream_items_in_flight: u32,
    /// Connections open at once; further ones are closed on accept.
    #[arg(long, env = "ERN_MAX_CONNECTIONS", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_connections: u32,
    /// Connections open at once from one peer (an IPv4 address, an IPv6 /64).
    #[arg(long, env = "ERN_MAX_CONNECTIONS_PER_PEER", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_connections_per_peer: u32,
    /// Concurrent HTTP/2 streams (calls) per connection (SETTINGS_MAX_CONCURRENT_STREAMS).
    #[arg(long, env = "ERN_MAX_STREAMS_PER_CONNECTION", default_value_t = 200,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_streams_per_connection: u32,
    /// Bytes of answers one peer (an IPv4 address, an IPv6 /64) may leave unread (held by
    /// the server until its HTTP/2 windows take them and they are written to its
    /// connections) before its new calls are refused with RESOURCE_EXHAUSTED. The default
    /// is what one principal's calls running and waiting (2 x --max-calls-in-flight) can
    /// have on their way at the largest message (--max-message-bytes).
    #[arg(long, env = "ERN_MAX_UNREAD_BYTES_PER_PEER", default_value_t = 128 << 20,
          value_parser = clap::value_parser!(u64).range(65_536..=1 << 40))]
    pub max_unread_bytes_per_peer: u64,
    /// Bytes of answers all peers together may leave unread. At or past it, a peer already
    /// holding more than its share (this over --max-connections) gets no answer of a call
    /// that changes nothing (a read, a research query, health, reflection): new ones are
    /// refused and those produced are dropped, with RESOURCE_EXHAUSTED; a peer within its
    /// share still gets its next answer. Writes' answers are always sent. Reads' answers
    /// held stay under this plus, per connection, its share and one answer chunk.
    #[arg(long, env = "ERN_MAX_UNREAD_BYTES", default_value_t = 512 << 20,
          value_parser = clap::value_parser!(u64).range(65_536..=1 << 40))]
    pub max_unread_bytes: u64,
    /// SQLite: free bytes the file system holding the database must keep. With less, the
    /// health probe fails (NOT_SERVING) and calls are refused at once with UNAVAILABLE, as
    /// when the database is away, until there is room again (checked every second). 0:
    /// not checked. Ignored on PostgreSQL (its server's disk is not this host's).
    #[arg(long, env = "ERN_MIN_FREE_DISK_BYTES", default_value_t = 64 << 20,
          value_parser = clap::value_parser!(u64).range(0..=1 << 50))]
    pub min_free_disk_bytes: u64,
    /// Reflection calls (which need no key) under way at once from one peer; past it
    /// RESOURCE_EXHAUSTED. A reflection stream counts while it is open.
    #[arg(long, env = "ERN_MAX_REFLECTION_CALLS_PER_PEER", default_value_t = 32,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_reflection_calls_per_peer: u32,
    /// A connection without any call for this many seconds is closed (0: never).
    #[arg(long, env = "ERN_IDLE_TIMEOUT_SECS", default_value_t = 300,
          value_parser = clap::value_parser!(u64).range(0..=86_400))]
    pub idle_timeout_secs: u64,
    /// HTTP/2 keepalive: a PING every this many seconds on every connection; one not
    /// acknowledged within 20 s closes it. Also the idle time before TCP keepalive probes.
    /// 0 turns both off.
    #[arg(long, env = "ERN_KEEPALIVE_SECS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(0..=86_400))]
    pub keepalive_secs: u64,
    /// Serve Prometheus metrics (plain HTTP, GET /metrics) on this address, e.g.
    /// 127.0.0.1:9464: a loopback address unless --allow-plaintext is set (they name
    /// principals). Off when unset.
    #[arg(long, env = "ERN_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// TLS certificate chain (PEM) of the service. With --tls-key, calls are served over
    /// TLS only.
    #[arg(long, env = "ERN_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM) of the service.
    #[arg(long, env = "ERN_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// CA certificate(s) (PEM) that sign client certificates: enables mutual TLS, and
    /// every connection must present a client certificate signed by one of them. A
    /// principal bound to certificates (`admin bind-certificate`) must present one of its
    /// own.
    #[arg(long, env = "ERN_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Serve plaintext gRPC on a non-loopback address. Without TLS the service refuses to
    /// listen anywhere but loopback unless this is set (e.g. behind a TLS-terminating
    /// proxy in the same pod). The web console and the metrics, always plain HTTP, need a
    /// loopback address unless this is set, with or without TLS.
    #[arg(long, env = "ERN_ALLOW_PLAINTEXT", default_value_t = false)]
    pub allow_plaintext: bool,
    /// File holding the master passphrase (first line, line ending stripped). With a
    /// passphrase (from this file or ERN_MASTER_PASSPHRASE, never a flag, so that it
    /// stays out of the process list), the master secret is derived from it with
    /// Argon2id instead of read from the key file.
    #[arg(long, env = "ERN_MASTER_PASSPHRASE_FILE")]
    pub master_passphrase_file: Option<PathBuf>,
    /// Argon2id parameter file of the passphrase (salt, cost, check); created (mode 0600)
    /// on first start if missing. Default: master.kdf next to the master key file.
    #[arg(long, env = "ERN_MASTER_KDF_FILE")]
    pub master_kdf_file: Option<PathBuf>,
    /// The passphrase itself: set by `main` from ERN_MASTER_PASSPHRASE or the file.
    #[arg(skip)]
    pub master_passphrase: Option<Passphrase>,
}

impl ServeArgs {
    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_secs.max(1))
    }

    /// `None` when connections may stay idle.
    pub fn idle_timeout(&self) -> Option<Duration> {
        (self.idle_timeout_secs > 0).then(|| Duration::from_secs(self.idle_timeout_secs))
    }

    /// `None` when keepalive is off.
    pub fn keepalive(&self) -> Option<Duration> {
        (self.keepalive_secs > 0).then(|| Duration::from_secs(self.keepalive_secs))
    }

    /// How long console sessions live.
    pub fn console_limits(&self) -> crate::service::console::SessionLimits {
        crate::service::console::SessionLimits {
            idle: chrono::Duration::minutes(i64::from(self.console_idle_minutes)),
            absolute: chrono::Duration::hours(i64::from(self.console_session_hours)),
        }
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }
}

/// The defaults of `serve`, for embedding (tests, benchmarks).
impl Default for ServeArgs {
    fn default() -> Self {
        ServeArgs {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            console_listen: None,
            console_idle_minutes: 15,
            console_session_hours: 8,
            console_max_connections: 128,
            console_header_timeout_secs: 30,
            master_key_file: None,
            require_master_key: false,
            max_message_bytes: 1024 * 1024,
            writers: None,
            max_batch: 512,
            writer_queue: crate::store::writer::QUEUE_DEPTH,
            db_max_connections: 16,
            request_timeout_secs: 30,
            shutdown_grace_secs: 20,
            research_queries_per_minute: 60,
            protection_budget_ms: 5_000,
            protection_workers: 2,
            research_index: true,
            derivations_per_minute: 1200,
            refusals_per_peer_per_minute: 300,
            refusal_summary_secs: 60,
            max_calls_in_flight: 64,
            max_stream_invalid_items: 1000,
            accept_argon2_key_hashes: false,
            max_stream_items_in_flight: 256,
            max_connections: 1024,
            max_connections_per_peer: 64,
            max_streams_per_connection: 200,
            max_unread_bytes_per_peer: 128 << 20,
            max_unread_bytes: 512 << 20,
            min_free_disk_bytes: 64 << 20,
            max_reflection_calls_per_peer: 32,
            idle_timeout_secs: 300,
            keepalive_secs: 60,
            metrics_listen: None,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            allow_plaintext: false,
            master_passphrase_file: None,
            master_kdf_file: None,
            master_passphrase: None,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Verify the whole log: every entry's MAC link (also entries after the head), the
    /// head both ways, and every consent event and erasure tombstone against the entry
    /// that wrote it. Exits non-zero naming the entry (or row) on any modification,
    /// deletion, insertion or reordering; prints the head as ID:MAC. Needs the master key.
    Verify {
        #[command(flatten)]
        master: MasterArgs,
        /// A head recorded earlier (ID:MAC, as `audit head` prints it): also fail unless
        /// that entry is still in the log with that MAC. Detects a tail deleted together
        /// with the head, which the log alone cannot show.
        #[arg(long, value_name = "ID:MAC")]
        expect_head: Option<crate::audit::Anchor>,
    },
    /// Verify the whole log (as `verify`) and print only its head, ID:MAC, to record
    /// outside the database (a ticket, another system) for `verify --expect-head`.
    Head {
        #[command(flatten)]
        master: MasterArgs,
    },
}

/// Where the master secret is, for commands that need a key derived from it: every
/// changing admin command appends its audit entry to the MAC chain, and an API key's hash
/// is keyed by a pepper derived from the master secret.
#[derive(Debug, Clone, Args)]
pub struct MasterArgs {
    /// Master key file. Default: <data dir>/master.key (with a passphrase, its parameter
    /// file master.kdf beside it).
    #[arg(long, env = "ERN_MASTER_KEY_FILE", global = true)]
    pub master_key_file: Option<PathBuf>,
    /// File holding the master passphrase (first line); see `serve --help`.
    #[arg(long, env = "ERN_MASTER_PASSPHRASE_FILE", global = true)]
    pub master_passphrase_file: Option<PathBuf>,
    /// Argon2id parameter file of the passphrase, as `serve` is given it. Default:
    /// master.kdf next to the master key file.
    #[arg(long, env = "ERN_MASTER_KDF_FILE", global = true)]
    pub master_kdf_file: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum CodesCommand {
    /// Import a release from its published files. It is put in force for its system
    /// unless --keep-current is given; releases imported before are kept.
    Import {
        #[command(subcommand)]
        release: ImportRelease,
        /// The release's version; default: what the files state (HPO: data-version;
        /// Orphanet: the product's date; HGNC: the latest date_modified).
        #[arg(long, global = true)]
        version: Option<String>,
        /// Keep the release in force as it is; activate this one later.
        #[arg(long, global = true)]
        keep_current: bool,
        #[command(flatten)]
        master: MasterArgs,
    },
    /// List the releases on file and which one of each system is in force.
    List,
    /// Put a release on file in force for its system.
    Activate {
        /// hpo, orphanet or hgnc.
        #[arg(long)]
        system: String,
        #[arg(long)]
        version: String,
        #[command(flatten)]
        master: MasterArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum ImportRelease {
    /// The Human Phenotype Ontology: hp.obo, optionally with phenotype.hpoa and
    /// genes_to_phenotype.txt of the same release (phenotype.hpoa is checked against it by
    /// its #version; genes_to_phenotype.txt carries none).
    Hpo {
        /// hp.obo.
        #[arg(long)]
        obo: PathBuf,
        /// phenotype.hpoa.
        #[arg(long)]
        hpoa: Option<PathBuf>,
        /// genes_to_phenotype.txt.
        #[arg(long)]
        genes_to_phenotype: Option<PathBuf>,
    },
    /// The Orphanet nomenclature: en_product1.xml, optionally with classification files
    /// (en_product3_*.xml; repeat) for the hierarchy of subtypes.
    Orphanet {
        /// en_product1.xml.
        #[arg(long)]
        product1: PathBuf,
        /// en_product3_*.xml; repeatable.
        #[arg(long = "classification")]
        classifications: Vec<PathBuf>,
    },
    /// The HGNC complete set (hgnc_complete_set.txt, tab-separated).
    Hgnc {
        #[arg(long)]
        tsv: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// List the registries (one per ERN).
    ListRegistries,
    /// Disable a principal (someone who left): all their keys are refused from the next
    /// call on; their records and audit entries stay.
    DisablePrincipal {
        #[arg(long)]
        name: String,
        #[command(flatten)]
        master: MasterArgs,
    },
    /// Bind a client certificate to a principal: from then on the principal's calls must
    /// come over mutual TLS with this (or another bound) certificate.
    BindCertificate {
        #[arg(long)]
        principal: String,
        /// The client certificate (PEM).
        #[arg(long)]
        cert: PathBuf,
        #[command(flatten)]
        master: MasterArgs,
    },
    /// Start a new key version for a registry's pseudonyms. Patients the registry does
    /// not know yet get pseudonyms of the new version; known patients keep theirs, so
    /// every record stays linked. Safe with calls in flight: a call that would start a
    /// patient under the old version after the rotation is refused with ABORTED, and sent
    /// again it derives under the new one. On PostgreSQL it waits up to 2 s for the writes
    /// in progress, and changes nothing if they do not end (docs/pseudonyms.md, "Key
    /// rotation").
    RotateKey {
        /// Registry (ERN) code, e.g. ERN-EYE.
        #[arg(long)]
        registry: String,
        #[command(flatten)]
        master: MasterArgs,
    },
    /// Set a registry's research threshold k: counts from 1 to k-1 are never published
    /// (default 5).
    SetMinCellCount {
        /// Registry (ERN) code, e.g. ERN-EYE.
        #[arg(long)]
        registry: String,
        /// The new threshold, 2 to 100.
        #[arg(long)]
        k: i64,
        #[command(flatten)]
        master: MasterArgs,
    },
    /// Set a registry's protection level p: for every count a research answer hides,
    /// the interval anyone can prove from the answer is at least p wide (default 1: no
    /// hidden count is ever pinned to one value). See docs/privacy.md.
    SetProtectionLevel {
        /// Registry (ERN) code, e.g. ERN-EYE.
        #[arg(long)]
        registry: String,
        /// The new level, 1 to 100.
        #[arg(long)]
        level: i64,
        #[command(flatten)]
        master: MasterArgs,
    },
    /// Create a centre and the ERNs it belongs to.
    CreateCentre {
        /// Short code, e.g. NL-AMC.
        #[arg(long)]
        code: String,
        #[arg(long)]
        name: String,
        /// ISO 3166-1 alpha-2 country code.
        #[arg(long)]
        country: String,
        /// Registry (ERN) code the centre is a member of; repeat for several.
        #[arg(long = "ern", required = true)]
        erns: Vec<String>,
        #[command(flatten)]
        master: MasterArgs,
    },
    /// Create a principal and print its first API key (shown once).
    CreatePrincipal {
        #[arg(long)]
        name: String,
        /// physician, consent-officer, researcher or admin.
        #[arg(long)]
        role: String,
        /// Centre code (physicians; consent officers of a centre).
        #[arg(long)]
        centre: Option<String>,
        /// Registry (ERN) code (researchers; registry consent officers); repeatable.
        #[arg(long = "ern")]
        erns: Vec<String>,
        /// Key lifetime in days (default: no expiry).
        #[arg(long)]
        expires_in_days: Option<u32>,
        #[command(flatten)]
        master: MasterArgs,
    },
    /// Issue another API key for a principal (shown once).
    IssueKey {
        #[arg(long)]
        principal: String,
        #[arg(long)]
        expires_in_days: Option<u32>,
        #[command(flatten)]
        master: MasterArgs,
    },
    /// Revoke an API key by its id (the 16 hex digits after `ern_`).
    RevokeKey {
        #[arg(long)]
        key_id: String,
        #[command(flatten)]
        master: MasterArgs,
    },
    /// Set a principal's web console password (at least 12 characters), read from the
    /// first line of standard input (or --password-file), hashed with Argon2id. Ends the
    /// principal's console sessions.
    SetPassword {
        #[arg(long)]
        principal: String,
        /// Read the password from the first line of this file instead of standard input.
        #[arg(long)]
        password_file: Option<PathBuf>,
        #[command(flatten)]
        master: MasterArgs,
    },
    /// Give a principal a new TOTP second factor for the web console; prints the otpauth
    /// URI and a terminal QR code to scan into an authenticator app (shown once). Ends
    /// the principal's console sessions.
    EnrolTotp {
        #[arg(long)]
        principal: String,
        #[command(flatten)]
        master: MasterArgs,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("postgres://ern:s3cret@db:5432/ern"),
            "postgres://ern:***@db:5432/ern"
        );
        assert_eq!(redact_url("postgres://ern@db/ern"), "postgres://ern@db/ern");
        // An unencoded `@` or `:` in the password: none of it may show.
        for url in [
            "postgres://ern:p@ss:w0rd@db:5432/ern",
            "postgres://ern:s3cret@@db/ern?sslmode=require",
            "postgres://ern:%40secret@db/ern",
        ] {
            let shown = redact_url(url);
            assert!(shown.starts_with("postgres://ern:***@db"), "{shown}");
            for part in ["p@ss", "ss:w0rd", "w0rd", "s3cret", "secret"] {
                assert!(!shown.contains(part), "{shown}");
            }
        }
        assert_eq!(
            redact_url("not a url: pw"),
            "(a database URL that does not parse)"
        );
        assert_eq!(
            redact_url("sqlite://data/registry.db"),
            "sqlite://data/registry.db"
        );
    }

    /// The master-key flags are taken after the system word of `codes import` too, as
    /// docs/codes.md writes them (global: also on the command that has a subcommand).
    #[test]
    fn codes_import_takes_the_master_key_flags_after_its_system() {
        for args in [
            [
                "ern-registry",
                "codes",
                "import",
                "hpo",
                "--obo",
                "hp.obo",
                "--master-key-file",
                "k",
            ],
            [
                "ern-registry",
                "codes",
                "import",
                "--master-key-file",
                "k",
                "hpo",
                "--obo",
                "hp.obo",
            ],
        ] {
            let cli = Cli::try_parse_from(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
            let Command::Codes(CodesCommand::Import { master, .. }) = cli.command else {
                panic!("expected codes import")
            };
            assert_eq!(master.master_key_file, Some(PathBuf::from("k")), "{args:?}");
        }
    }

    #[test]
    fn cli_parses_serve_defaults() {
        let cli = Cli::try_parse_from(["ern-registry", "serve"]).unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("expected serve")
        };
        assert_eq!(args.listen.to_string(), "127.0.0.1:50051");
        assert!(cli.global.database_url().starts_with("sqlite://"));
        assert!(!args.accept_argon2_key_hashes, "off by default");
    }

    /// A pool of no connections was a panic at start (a defences audit of 2026-12-07);
    /// now a range error, as for the other limits.
    #[test]
    fn the_pool_size_is_range_checked() {
        for bad in ["0", "1025"] {
            let err = Cli::try_parse_from(["ern-registry", "serve", "--db-max-connections", bad])
                .err()
                .unwrap_or_else(|| panic!("--db-max-connections {bad} accepted"));
            assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation);
        }
        assert!(
            Cli::try_parse_from(["ern-registry", "serve", "--db-max-connections", "1"]).is_ok()
        );
    }

    /// `--accept-argon2-key-hashes` alone (as the log line and the README say) turns it
    /// on; with a value, the value.
    #[test]
    fn the_argon2_acceptance_flag_takes_a_value_or_none() {
        for (args, expected) in [
            (
                &["ern-registry", "serve", "--accept-argon2-key-hashes"][..],
                true,
            ),
            (
                &[
                    "ern-registry",
                    "serve",
                    "--accept-argon2-key-hashes",
                    "true",
                ][..],
                true,
            ),
            (
                &[
                    "ern-registry",
                    "serve",
                    "--accept-argon2-key-hashes",
                    "false",
                ][..],
                false,
            ),
        ] {
            let cli = Cli::try_parse_from(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
            let Command::Serve(serve) = cli.command else {
                panic!("expected serve")
            };
            assert_eq!(serve.accept_argon2_key_hashes, expected, "{args:?}");
        }
    }
}
