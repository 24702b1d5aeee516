//! The `ern-registry` binary: parses the command line and calls the library.

use std::process::ExitCode;

use clap::Parser;
use secrecy::ExposeSecret;
use tracing_subscriber::EnvFilter;

use std::sync::Arc;

use ern_registry::audit::{Anchor, AuditKey};
use ern_registry::config::{
    AdminCommand, AuditCommand, Cli, CodesCommand, Command, GlobalArgs, ImportRelease, LogFormat,
    MasterArgs,
};
use ern_registry::keys::{self, KdfFile, MasterSecret, Passphrase};
use ern_registry::pseudonym::Pseudonymiser;
use ern_registry::service::admin::{self as admin_service, AdminAction};
use ern_registry::startup::{self, Application, MasterUse};
use ern_registry::store::Store;
use ern_registry::store::writer::Writer;
use ern_registry::synthetic;

/// The log filter when `ERN_LOG` is unset: the HTTP/2 library's warnings are left out,
/// because a client makes them at will (one line per connection that resets more
/// streams than it may before they are accepted: 6.6 GB a day from one address in the
/// defences audit of 2026-12-06); its errors stay.
const DEFAULT_LOG_FILTER: &str = "info,h2=error";

fn init_logging(format: LogFormat) {
    let filter =
        EnvFilter::try_from_env("ERN_LOG").unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        // A line that cannot be written is dropped and counted, never a panic of the
        // thread that logs (`ern_registry::logging`).
        .with_writer(ern_registry::logging::LogSink)
        .log_internal_errors(false);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// Prints a line on standard output. When the reader has gone (`... | head`), the process
/// ends the way SIGPIPE ends other Unix tools (status 141, never success), instead of
/// panicking; whatever the command did is already committed.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout().lock(), $($arg)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(141);
            }
            eprintln!("error: standard output: {e}");
            std::process::exit(1);
        }
    }};
}

/// mimalloc instead of glibc's malloc for the Rust side of the process (docs/benchmarks.md,
/// "The allocator").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.global.log_format);
    let result = match cli.command {
        Command::Serve(args) => serve(&cli.global, args).await,
        Command::Keygen {
            out,
            passphrase,
            master_passphrase_file,
        } => keygen(&cli.global, out, passphrase, master_passphrase_file).await,
        Command::Admin(cmd) => admin(&cli.global, cmd).await,
        Command::Codes(cmd) => codes(&cli.global, cmd).await,
        Command::Audit(AuditCommand::Verify {
            master,
            expect_head,
        }) => audit_verify(&cli.global, &master, expect_head, false).await,
        Command::Audit(AuditCommand::Head { master }) => {
            audit_verify(&cli.global, &master, None, true).await
        }
        Command::Demo {
            registry,
            patients,
            seed,
            master_key_file,
            master_passphrase_file,
            master_kdf_file,
        } => {
            demo(
                &cli.global,
                &registry,
                patients,
                seed,
                master_key_file,
                master_passphrase_file,
                master_kdf_file,
            )
            .await
        }
        Command::Upload(args) => ern_registry::upload::run(args)
            .await
            .map_err(|e| e as AnyError),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

type AnyError = Box<dyn std::error::Error>;

async fn serve(
    global: &GlobalArgs,
    mut args: ern_registry::config::ServeArgs,
) -> Result<(), AnyError> {
    args.master_passphrase = Passphrase::from_env_or_file(args.master_passphrase_file.as_deref())?;
    let key_file = args
        .master_key_file
        .clone()
        .unwrap_or_else(|| global.data_dir.join("master.key"));
    tracing::info!(
        listen = %args.listen,
        database = %global.database_url_redacted(),
        master_key_file = %key_file.display(),
        max_message_bytes = args.max_message_bytes,
        max_batch = args.max_batch,
        request_timeout_secs = args.request_timeout_secs,
        "starting ern-registry {}",
        env!("CARGO_PKG_VERSION")
    );
    let app = Application::build(args, &global.database_url(), &key_file).await?;
    app.run_until_stopped(startup::shutdown_signal()).await?;
    Ok(())
}

/// Refuses a new secret where `serve` would take it for a database already bound to one
/// (a fingerprint recorded, or rows made with a secret): its key file is to be restored
/// from backup, not replaced (a defences audit of 2026-12-07 deleted `master.key` and got
/// a new one beside the database, which every command then refused). A SQLite file not
/// there yet is new; a database that cannot be read is not taken for new.
async fn refuse_if_bound(global: &GlobalArgs) -> Result<(), AnyError> {
    let url = global.database_url();
    if ern_registry::data_dir::sqlite_path(&url).is_some_and(|db| !db.exists()) {
        return Ok(());
    }
    let cannot = |e: &dyn std::fmt::Display| {
        format!(
            "cannot check that the database ({}) is new: {e}; keygen makes a master secret \
             only for a new database (give --out PATH to write one elsewhere)",
            global.database_url_redacted()
        )
    };
    let store = startup::open_store(&url, 1).await.map_err(|e| cannot(&e))?;
    let bound = match store.master_fingerprint().await {
        Ok(Some(_)) => Ok(true),
        Ok(None) => store.holds_master_derived_data().await,
        Err(e) => Err(e),
    };
    store.close().await;
    if bound.map_err(|e| cannot(&e))? {
        return Err(format!(
            "the database ({}) is bound to a master secret already: restore the key file (or \
             the passphrase's parameter file) it was made with from backup; a new one would \
             be refused by every command (give --out PATH to write a secret elsewhere)",
            global.database_url_redacted()
        )
        .into());
    }
    Ok(())
}

async fn keygen(
    global: &GlobalArgs,
    out: Option<std::path::PathBuf>,
    passphrase_mode: bool,
    passphrase_file: Option<std::path::PathBuf>,
) -> Result<(), AnyError> {
    // Where `serve` would look: only for a new database.
    if out.is_none() {
        refuse_if_bound(global).await?;
    }
    // Where `serve` looks, given the same environment.
    let env_path = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(std::path::PathBuf::from)
    };
    let key_file =
        env_path("ERN_MASTER_KEY_FILE").unwrap_or_else(|| global.data_dir.join("master.key"));
    let path = out.unwrap_or_else(|| {
        if passphrase_mode {
            env_path("ERN_MASTER_KDF_FILE").unwrap_or_else(|| KdfFile::default_path(&key_file))
        } else {
            key_file
        }
    });
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        ern_registry::data_dir::create_private_dir(dir)?;
    }
    if passphrase_mode {
        let passphrase =
            Passphrase::from_env_or_file(passphrase_file.as_deref())?.ok_or_else(|| {
                format!(
                    "--passphrase needs {} or --master-passphrase-file",
                    keys::PASSPHRASE_ENV
                )
            })?;
        let (kdf, _) = KdfFile::create_new(&path, &passphrase)?;
        say!(
            "wrote the master key parameters (Argon2id {}, fresh salt, check) to {} (mode \
             0600); back it up: the passphrase alone cannot recreate the master secret",
            kdf.params().cost(),
            path.display()
        );
        return Ok(());
    }
    if passphrase_file.is_some() || std::env::var_os(keys::PASSPHRASE_ENV).is_some() {
        return Err(
            "a master passphrase is configured: use `keygen --passphrase`, or unset it to \
             create a key file"
                .into(),
        );
    }
    MasterSecret::create_new(&path)?;
    say!(
        "wrote a new master key to {} (mode 0600); back it up and keep it secret",
        path.display()
    );
    Ok(())
}

async fn demo(
    global: &GlobalArgs,
    registry: &str,
    patients: u32,
    seed: u64,
    master_key_file: Option<std::path::PathBuf>,
    master_passphrase_file: Option<std::path::PathBuf>,
    master_kdf_file: Option<std::path::PathBuf>,
) -> Result<(), AnyError> {
    let passphrase = Passphrase::from_env_or_file(master_passphrase_file.as_deref())?;
    let key_file = master_key_file.unwrap_or_else(|| global.data_dir.join("master.key"));
    let kdf_file = master_kdf_file.unwrap_or_else(|| KdfFile::default_path(&key_file));
    let store = startup::open_store(&global.database_url(), 4).await?;
    // Before the master secret, which a first start would create or record: a database
    // with real patients is refused with nothing written (`populate` checks again).
    synthetic::check_synthetic_only(&store).await?;
    let master = startup::open_master_secret(
        &store,
        &key_file,
        &kdf_file,
        passphrase.as_ref(),
        MasterUse::Write { may_create: true },
    )
    .await?;
    let partitions = store.backend().default_writers();
    let writer = Writer::start(
        store.clone(),
        partitions,
        256,
        Arc::new(AuditKey::derive(&master)),
        Arc::new(ern_registry::service::consent::RegistryConsentRules),
    );
    let pseudonymiser = Pseudonymiser::new(&master);
    // PostgreSQL: the fill is the fast growth the planner's statistics must follow (the
    // writer's lookups by pseudonym scan a registry without them); nothing on SQLite.
    let statistics = tokio::spawn(ern_registry::store::statistics::keep_current(store.clone()));
    let started = std::time::Instant::now();
    let done = synthetic::populate(
        &store,
        &writer,
        &pseudonymiser,
        registry,
        patients,
        seed,
        |n| eprintln!("{n} patients written"),
    )
    .await;
    statistics.abort();
    let done = done?;
    drop(writer);
    // The server that starts next finds statistics of the filled tables.
    ern_registry::store::statistics::refresh(&store).await?;
    say!(
        "{registry}: wrote {} synthetic patients (numbers {} to {}) in {:.1} s",
        done.written,
        done.first,
        (u64::from(done.first) + done.written).saturating_sub(1),
        started.elapsed().as_secs_f64()
    );
    store.close().await;
    Ok(())
}

/// Verifies the whole audit log; an error (non-zero exit) names the entry or row found
/// broken. With `head_only`, prints just the head (`ID:MAC`) for recording elsewhere.
async fn audit_verify(
    global: &GlobalArgs,
    master: &MasterArgs,
    expect_head: Option<Anchor>,
    head_only: bool,
) -> Result<(), AnyError> {
    let store = open(global).await?;
    let secret = master_secret(global, &store, master, MasterUse::Read).await?;
    let result = store
        .verify_audit_against(&AuditKey::derive(&secret), expect_head.clone())
        .await?;
    store.close().await;
    let verified = result.map_err(|broken| format!("audit log BROKEN: {broken}"))?;
    if head_only {
        say!("{}", verified.anchor());
        return Ok(());
    }
    say!(
        "audit log intact: {} entries, every consent event and erasure tombstone as its entry recorded it",
        verified.entries
    );
    if let Some(anchor) = expect_head {
        say!("the anchored head {anchor} is in the log");
    }
    if verified.unadopted > 0 {
        say!(
            "{} consent events and tombstones written before rows were audited are not covered yet; the next write adopts them",
            verified.unadopted
        );
    }
    say!("head: {}", verified.anchor());
    say!(
        "record the head elsewhere (e.g. in your ticketing system) and pass it to `audit verify --expect-head` later: a log truncated since then, head and all, fails"
    );
    Ok(())
}

async fn open(global: &GlobalArgs) -> Result<Store, AnyError> {
    Ok(startup::open_store(&global.database_url(), 2).await?)
}

/// The master secret of `store`, from the key file or passphrase `master` names.
async fn master_secret(
    global: &GlobalArgs,
    store: &Store,
    master: &MasterArgs,
    usage: MasterUse,
) -> Result<MasterSecret, AnyError> {
    let key_file = master
        .master_key_file
        .clone()
        .unwrap_or_else(|| global.data_dir.join("master.key"));
    let kdf_file = master
        .master_kdf_file
        .clone()
        .unwrap_or_else(|| KdfFile::default_path(&key_file));
    let passphrase = Passphrase::from_env_or_file(master.master_passphrase_file.as_deref())?;
    Ok(
        startup::open_master_secret(store, &key_file, &kdf_file, passphrase.as_ref(), usage)
            .await?,
    )
}

async fn admin(global: &GlobalArgs, cmd: AdminCommand) -> Result<(), AnyError> {
    let store = open(global).await?;
    let result = match cmd {
        AdminCommand::ListRegistries => list_registries(&store).await,
        cmd => audited_admin(global, &store, cmd).await,
    };
    store.close().await;
    result
}

/// `ern-registry codes ...`: importing and activating run as audited admin actions.
async fn codes(global: &GlobalArgs, cmd: CodesCommand) -> Result<(), AnyError> {
    let store = open(global).await?;
    let result = match cmd {
        CodesCommand::List => list_code_releases(&store).await,
        CodesCommand::Import {
            release,
            version,
            keep_current,
            master,
        } => {
            let source = match release {
                ImportRelease::Hpo {
                    obo,
                    hpoa,
                    genes_to_phenotype,
                } => ern_registry::codes::Source::Hpo {
                    obo,
                    hpoa,
                    genes_to_phenotype,
                },
                ImportRelease::Orphanet {
                    product1,
                    classifications,
                } => ern_registry::codes::Source::Orphanet {
                    product1,
                    classifications,
                },
                ImportRelease::Hgnc { tsv } => ern_registry::codes::Source::Hgnc { tsv },
            };
            import_codes(global, &store, &master, source, version, !keep_current).await
        }
        CodesCommand::Activate {
            system,
            version,
            master,
        } => match ern_registry::domain::CodeSystem::parse(&system) {
            Some(system) => {
                let action = AdminAction::ActivateCodes { system, version };
                run_audited(global, &store, &master, action).await
            }
            None => Err("--system must be hpo, orphanet or hgnc".into()),
        },
    };
    store.close().await;
    result
}

async fn list_code_releases(store: &Store) -> Result<(), AnyError> {
    let releases = store.code_releases().await?;
    if releases.is_empty() {
        say!("no code release on file: codes get format checks only");
    }
    for r in releases {
        say!(
            "{:<9} {:<14} {} dated {:<10} {:>7} codes  from {}",
            r.system.as_str(),
            r.version,
            if r.in_force { "IN FORCE" } else { "        " },
            r.released_on.as_deref().unwrap_or("unknown"),
            r.terms,
            r.source
        );
    }
    Ok(())
}

/// Imports a code release (`service::admin::import_codes`: audited, like every admin
/// action that changes something).
async fn import_codes(
    global: &GlobalArgs,
    store: &Store,
    master: &MasterArgs,
    source: ern_registry::codes::Source,
    version: Option<String>,
    activate: bool,
) -> Result<(), AnyError> {
    let secret = master_secret(global, store, master, MasterUse::Write { may_create: false })
        .await
        .map_err(|e| {
            format!(
                "{e}\n(this command records itself in the audit log, so it needs the database's master key)"
            )
        })?;
    let done =
        admin_service::import_codes(store, &secret, &cli_principal(), source, version, activate)
            .await?;
    for line in done.lines {
        say!("{line}");
    }
    Ok(())
}

/// Runs an admin action that changes something, with its audit entry.
async fn run_audited(
    global: &GlobalArgs,
    store: &Store,
    master: &MasterArgs,
    action: AdminAction,
) -> Result<(), AnyError> {
    let secret = master_secret(global, store, master, MasterUse::Write { may_create: false })
        .await
        .map_err(|e| {
            format!(
                "{e}\n(this command records itself in the audit log, so it needs the database's master key)"
            )
        })?;
    let done = admin_service::run_action(store, &secret, &cli_principal(), action).await?;
    for line in done.lines {
        say!("{line}");
    }
    Ok(())
}

async fn list_registries(store: &Store) -> Result<(), AnyError> {
    for r in store.list_registries().await? {
        say!(
            "{:<22} key v{}  k={}  p={}  {}",
            r.code,
            r.active_key_version,
            r.min_cell_count,
            r.protection_level,
            r.name
        );
    }
    Ok(())
}

/// Who runs the admin command line, as its audit entries name them: `admin-cli:<user>`
/// (the process's user; with the invoking user when run through sudo), or `admin-cli`.
fn cli_principal() -> String {
    let sudo = std::env::var("SUDO_USER").ok().filter(|u| !u.is_empty());
    match (os_user(), sudo) {
        (Some(user), Some(by)) if by != user => format!("admin-cli:{user} (sudo from {by})"),
        (Some(user), _) => format!("admin-cli:{user}"),
        (None, _) => "admin-cli".to_string(),
    }
}

/// The name of the process's user: the owner of `/proc/self` looked up in `/etc/passwd`
/// (Linux), else `$USER`.
fn os_user() -> Option<String> {
    #[cfg(unix)]
    if let Ok(meta) = std::fs::metadata("/proc/self") {
        use std::os::unix::fs::MetadataExt;
        let uid = meta.uid().to_string();
        let name = std::fs::read_to_string("/etc/passwd")
            .ok()
            .and_then(|passwd| {
                passwd.lines().find_map(|line| {
                    let mut fields = line.split(':');
                    let name = fields.next()?;
                    (fields.nth(1)? == uid).then(|| name.to_string())
                })
            });
        return Some(name.unwrap_or_else(|| format!("uid {uid}")));
    }
    std::env::var("USER").ok().filter(|u| !u.is_empty())
}

/// An admin command that changes something: run by `service::admin::run_action`, in one
/// transaction with its audit entry (a refusal is recorded too). Nothing is printed (no
/// API key shown) before the commit.
async fn audited_admin(
    global: &GlobalArgs,
    store: &Store,
    cmd: AdminCommand,
) -> Result<(), AnyError> {
    let Some(master) = admin_master(&cmd) else {
        return Err("not an admin command that changes something".into());
    };
    let secret = master_secret(global, store, master, MasterUse::Write { may_create: false })
        .await
        .map_err(|e| {
            format!(
                "{e}\n(admin commands record themselves in the audit log, so they need the database's master key)"
            )
        })?;
    let Some(action) = admin_action(cmd) else {
        return Err("not an admin command that changes something".into());
    };
    let done = admin_service::run_action(store, &secret, &cli_principal(), action).await?;
    for line in done.lines {
        say!("{line}");
    }
    if let Some((issued, expires_at)) = done.key {
        say!(
            "api key (shown once, store it now): {}",
            issued.token.expose_secret()
        );
        say!("key id: {}", issued.key_id);
        if let Some(at) = expires_at {
            say!("expires: {}", at.to_rfc3339());
        }
    }
    if let Some(uri) = done.totp_uri {
        say!("otpauth URI (shown once): {}", uri.expose_secret());
        match qrcode::QrCode::new(uri.expose_secret().as_bytes()) {
            Ok(code) => say!(
                "{}",
                code.render::<qrcode::render::unicode::Dense1x2>()
                    .dark_color(qrcode::render::unicode::Dense1x2::Light)
                    .light_color(qrcode::render::unicode::Dense1x2::Dark)
                    .quiet_zone(true)
                    .build()
            ),
            Err(e) => eprintln!("(no QR code: {e}; type the URI instead)"),
        }
    }
    Ok(())
}

/// The action of an admin command that changes something (a certificate file is read
/// here; a file that cannot be read is refused, and recorded, like a malformed one).
fn admin_action(cmd: AdminCommand) -> Option<AdminAction> {
    Some(match cmd {
        AdminCommand::ListRegistries => return None,
        AdminCommand::DisablePrincipal { name, .. } => AdminAction::DisablePrincipal { name },
        AdminCommand::BindCertificate {
            principal, cert, ..
        } => AdminAction::BindCertificate {
            principal,
            pem: std::fs::read(&cert).map_err(|e| format!("{}: {e}", cert.display())),
        },
        AdminCommand::RotateKey { registry, .. } => AdminAction::RotateKey { registry },
        AdminCommand::SetMinCellCount { registry, k, .. } => {
            AdminAction::SetMinCellCount { registry, k }
        }
        AdminCommand::SetProtectionLevel {
            registry, level, ..
        } => AdminAction::SetProtectionLevel { registry, level },
        AdminCommand::CreateCentre {
            code,
            name,
            country,
            erns,
            ..
        } => AdminAction::CreateCentre {
            code,
            name,
            country,
            erns,
        },
        AdminCommand::CreatePrincipal {
            name,
            role,
            centre,
            erns,
            expires_in_days,
            ..
        } => AdminAction::CreatePrincipal {
            name,
            role,
            centre,
            erns,
            expires_in_days,
        },
        AdminCommand::IssueKey {
            principal,
            expires_in_days,
            ..
        } => AdminAction::IssueKey {
            principal,
            expires_in_days,
        },
        AdminCommand::RevokeKey { key_id, .. } => AdminAction::RevokeKey { key_id },
        AdminCommand::SetPassword {
            principal,
            password_file,
            ..
        } => AdminAction::SetPassword {
            principal,
            password: read_password(password_file.as_deref()),
        },
        AdminCommand::EnrolTotp { principal, .. } => AdminAction::EnrolTotp { principal },
    })
}

/// The first line of `file`, or of standard input, without its line ending (empty when
/// neither can be read: refused as too short).
fn read_password(file: Option<&std::path::Path>) -> secrecy::SecretString {
    let mut text = zeroize::Zeroizing::new(String::new());
    match file {
        Some(path) => {
            if let Ok(read) = std::fs::read_to_string(path) {
                *text = read;
            }
        }
        None => {
            if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
                eprintln!("new console password (at least 12 characters), then Enter:");
            }
            let _ = std::io::stdin().read_line(&mut text);
        }
    }
    let line = text.lines().next().unwrap_or("");
    secrecy::SecretString::from(line.to_owned())
}

/// The master key arguments of an admin command that changes something.
fn admin_master(cmd: &AdminCommand) -> Option<&MasterArgs> {
    match cmd {
        AdminCommand::ListRegistries => None,
        AdminCommand::DisablePrincipal { master, .. }
        | AdminCommand::BindCertificate { master, .. }
        | AdminCommand::RotateKey { master, .. }
        | AdminCommand::SetMinCellCount { master, .. }
        | AdminCommand::SetProtectionLevel { master, .. }
        | AdminCommand::CreateCentre { master, .. }
        | AdminCommand::CreatePrincipal { master, .. }
        | AdminCommand::IssueKey { master, .. }
        | AdminCommand::RevokeKey { master, .. }
        | AdminCommand::SetPassword { master, .. }
        | AdminCommand::EnrolTotp { master, .. } => Some(master),
    }
}
