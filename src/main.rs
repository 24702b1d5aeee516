//! The `ern-registry` binary: parses the command line and calls the library.

use std::process::ExitCode;

use chrono::{Duration, Utc};
use clap::Parser;
use ring::rand::SystemRandom;
use tracing_subscriber::EnvFilter;

use ern_registry::auth::{self, Role};
use std::sync::Arc;

use ern_registry::audit::{Anchor, AuditKey, Entry};
use ern_registry::config::{
    AdminCommand, AuditCommand, Cli, Command, GlobalArgs, LogFormat, MasterArgs,
};
use ern_registry::keys::{self, KdfFile, MasterSecret, Passphrase};
use ern_registry::outcome::Outcome;
use ern_registry::pseudonym::Pseudonymiser;
use ern_registry::startup::{self, Application, MasterUse};
use ern_registry::store::admin;
use ern_registry::store::writer::Writer;
use ern_registry::store::{Store, StoreError};
use ern_registry::synthetic;
use sqlx::AnyConnection;

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_env("ERN_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

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
        } => keygen(&cli.global, out, passphrase, master_passphrase_file),
        Command::Admin(cmd) => admin(&cli.global, cmd).await,
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
        } => {
            demo(
                &cli.global,
                &registry,
                patients,
                seed,
                master_key_file,
                master_passphrase_file,
            )
            .await
        }
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

fn keygen(
    global: &GlobalArgs,
    out: Option<std::path::PathBuf>,
    passphrase_mode: bool,
    passphrase_file: Option<std::path::PathBuf>,
) -> Result<(), AnyError> {
    let default_name = if passphrase_mode {
        "master.kdf"
    } else {
        "master.key"
    };
    let path = out.unwrap_or_else(|| global.data_dir.join(default_name));
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
        println!(
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
    println!(
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
) -> Result<(), AnyError> {
    let passphrase = Passphrase::from_env_or_file(master_passphrase_file.as_deref())?;
    let key_file = master_key_file.unwrap_or_else(|| global.data_dir.join("master.key"));
    let kdf_file = KdfFile::default_path(&key_file);
    let store = startup::open_store(&global.database_url(), 4).await?;
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
    );
    let pseudonymiser = Pseudonymiser::new(&master);
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
    .await?;
    drop(writer);
    println!(
        "{registry}: wrote {} synthetic patients (numbers {} to {}) in {:.1} s",
        done.written,
        done.first,
        u64::from(done.first) + done.written,
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
        println!("{}", verified.anchor());
        return Ok(());
    }
    println!(
        "audit log intact: {} entries, every consent event and erasure tombstone as its entry recorded it",
        verified.entries
    );
    if let Some(anchor) = expect_head {
        println!("the anchored head {anchor} is in the log");
    }
    if verified.unadopted > 0 {
        println!(
            "{} consent events and tombstones written before rows were audited are not covered yet; the next write adopts them",
            verified.unadopted
        );
    }
    println!("head: {}", verified.anchor());
    println!(
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
    let kdf_file = KdfFile::default_path(&key_file);
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

async fn list_registries(store: &Store) -> Result<(), AnyError> {
    for r in store.list_registries().await? {
        println!(
            "{:<22} key v{}  k={}  p={}  {}",
            r.code, r.active_key_version, r.min_cell_count, r.protection_level, r.name
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

/// Why an admin action was refused: the code its audit entry records, and the message.
struct Refused {
    code: Outcome,
    message: String,
}

impl From<StoreError> for Refused {
    fn from(err: StoreError) -> Refused {
        Refused {
            code: admin_outcome(&err),
            message: err.to_string(),
        }
    }
}

fn refused(code: Outcome, message: impl Into<String>) -> Refused {
    Refused {
        code,
        message: message.into(),
    }
}

/// What an admin action did: what to print once it is committed, what it acted on if
/// that became known only by doing it, and a key to show once.
#[derive(Default)]
struct Done {
    lines: Vec<String>,
    target: Option<String>,
    key: Option<(auth::IssuedKey, Option<chrono::DateTime<Utc>>)>,
}

/// An admin command that changes something: runs it in one transaction with its audit
/// entry, or, refused, rolls it back and records the refusal. Nothing is printed (no API
/// key shown) before the commit.
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
    let key = AuditKey::derive(&secret);
    let (method, registry, target) = describe(&cmd);
    let mut entry = Entry {
        principal: cli_principal(),
        role: Role::Admin.as_str().into(),
        method: format!("AdminCli/{method}"),
        registry,
        target,
        items: 1,
        ..Entry::default()
    };
    let mut action = store.begin_admin().await?;
    match run_admin(action.conn(), &secret, cmd).await {
        Ok(done) => {
            entry.outcome = Outcome::Ok.name().into();
            if let Some(target) = done.target {
                entry.target = target;
            }
            action.commit(&key, entry).await?;
            for line in done.lines {
                println!("{line}");
            }
            if let Some((issued, expires_at)) = done.key {
                println!(
                    "api key (shown once, store it now): {}",
                    issued.token.as_str()
                );
                println!("key id: {}", issued.key_id);
                if let Some(at) = expires_at {
                    println!("expires: {}", at.to_rfc3339());
                }
            }
            Ok(())
        }
        Err(refusal) => {
            action.rollback().await?;
            entry.outcome = refusal.code.name().into();
            if let Err(e) = store.audit_alone(&key, entry).await {
                eprintln!("warning: the refusal could not be recorded in the audit log: {e}");
            }
            Err(refusal.message.into())
        }
    }
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
        | AdminCommand::RevokeKey { master, .. } => Some(master),
    }
}

/// The audit entry's action, registry and target of an admin command, as given.
fn describe(cmd: &AdminCommand) -> (&'static str, String, String) {
    let none = String::new;
    match cmd {
        AdminCommand::ListRegistries => ("ListRegistries", none(), none()),
        AdminCommand::DisablePrincipal { name, .. } => {
            ("DisablePrincipal", none(), format!("principal {name}"))
        }
        AdminCommand::BindCertificate { principal, .. } => {
            ("BindCertificate", none(), format!("principal {principal}"))
        }
        AdminCommand::RotateKey { registry, .. } => ("RotateKey", registry.clone(), none()),
        AdminCommand::SetMinCellCount { registry, k, .. } => {
            ("SetMinCellCount", registry.clone(), format!("k {k}"))
        }
        AdminCommand::SetProtectionLevel {
            registry, level, ..
        } => (
            "SetProtectionLevel",
            registry.clone(),
            format!("level {level}"),
        ),
        AdminCommand::CreateCentre { code, erns, .. } => {
            ("CreateCentre", erns.join(","), format!("centre {code}"))
        }
        AdminCommand::CreatePrincipal { name, erns, .. } => (
            "CreatePrincipal",
            erns.join(","),
            format!("principal {name}"),
        ),
        AdminCommand::IssueKey { principal, .. } => {
            ("IssueKey", none(), format!("principal {principal}"))
        }
        AdminCommand::RevokeKey { key_id, .. } => ("RevokeKey", none(), format!("key {key_id}")),
    }
}

/// Issues an API key for principal `principal_id` on `conn`; shown after the commit.
async fn issue_key(
    conn: &mut AnyConnection,
    secret: &MasterSecret,
    principal_id: i64,
    expires_in_days: Option<u32>,
) -> Result<(auth::IssuedKey, Option<chrono::DateTime<Utc>>), Refused> {
    let hasher = auth::KeyHasher::derive(secret);
    let issued = auth::issue_key(&SystemRandom::new(), &hasher)
        .map_err(|_| refused(Outcome::Internal, "no system randomness"))?;
    let expires_at = expires_in_days.map(|d| Utc::now() + Duration::days(i64::from(d)));
    admin::insert_api_key(
        conn,
        &issued.key_id,
        principal_id,
        &issued.secret_hash,
        expires_at,
    )
    .await?;
    Ok((issued, expires_at))
}

async fn run_admin(
    conn: &mut AnyConnection,
    secret: &MasterSecret,
    cmd: AdminCommand,
) -> Result<Done, Refused> {
    let mut done = Done::default();
    match cmd {
        AdminCommand::ListRegistries => {}
        AdminCommand::DisablePrincipal { name, .. } => {
            if !admin::disable_principal(conn, &name).await? {
                return Err(refused(
                    Outcome::FailedPrecondition,
                    format!("{name} is disabled already"),
                ));
            }
            done.lines.push(format!(
                "disabled {name}: every key of theirs is refused from the next call on"
            ));
        }
        AdminCommand::BindCertificate {
            principal, cert, ..
        } => {
            use rustls_pki_types::{CertificateDer, pem::PemObject};
            let der = CertificateDer::from_pem_file(&cert).map_err(|e| {
                refused(
                    Outcome::InvalidArgument,
                    format!("{}: not a PEM certificate: {e}", cert.display()),
                )
            })?;
            let fingerprint = auth::certificate_fingerprint(&der);
            admin::bind_certificate(conn, &principal, &fingerprint).await?;
            done.target = Some(format!("principal {principal}, certificate {fingerprint}"));
            done.lines.push(format!(
                "bound certificate {fingerprint} to {principal}: its calls must now present it (mutual TLS)"
            ));
        }
        AdminCommand::RotateKey { registry, .. } => {
            let version = admin::rotate_registry_key(conn, &registry).await?;
            done.target = Some(format!("key version {version}"));
            done.lines.push(format!(
                "{registry}: new patients get pseudonyms of key version {version} from the next call on \
                 (a running service reads it per call); known patients keep theirs"
            ));
        }
        AdminCommand::SetMinCellCount { registry, k, .. } => {
            admin::set_min_cell_count(conn, &registry, k).await?;
            done.lines.push(format!(
                "{registry}: counts below {k} are suppressed from the next query on"
            ));
        }
        AdminCommand::SetProtectionLevel {
            registry, level, ..
        } => {
            admin::set_protection_level(conn, &registry, level).await?;
            done.lines.push(format!(
                "{registry}: every hidden count lies in an interval at least {level} wide, from the next query on"
            ));
        }
        AdminCommand::CreateCentre {
            code,
            name,
            country,
            erns,
            ..
        } => {
            let invalid = |e: ern_registry::domain::DomainError| {
                refused(Outcome::InvalidArgument, e.to_string())
            };
            let code = ern_registry::domain::CentreCode::parse(&code).map_err(invalid)?;
            let country = ern_registry::domain::CountryCode::parse(&country.to_ascii_uppercase())
                .map_err(invalid)?;
            let id =
                admin::create_centre(conn, code.as_str(), name.trim(), country.as_str(), &erns)
                    .await?;
            done.lines.push(format!(
                "created centre {} (id {id}) in {}",
                code.as_str(),
                erns.join(", ")
            ));
        }
        AdminCommand::CreatePrincipal {
            name,
            role,
            centre,
            erns,
            expires_in_days,
            ..
        } => {
            let role = Role::parse(&role).ok_or_else(|| {
                refused(
                    Outcome::InvalidArgument,
                    "role must be physician, consent-officer, researcher or admin",
                )
            })?;
            let name = name.trim();
            if name.is_empty() || name.len() > 128 {
                return Err(refused(
                    Outcome::InvalidArgument,
                    "name must be 1 to 128 characters",
                ));
            }
            let id = admin::create_principal(conn, name, role, centre.as_deref(), &erns).await?;
            let (issued, expires_at) = issue_key(conn, secret, id, expires_in_days).await?;
            done.target = Some(format!("principal {name}, key {}", issued.key_id));
            done.lines.push(format!("created {role} {name} (id {id})"));
            done.key = Some((issued, expires_at));
        }
        AdminCommand::IssueKey {
            principal,
            expires_in_days,
            ..
        } => {
            let id = admin::principal_id(conn, &principal).await?;
            let (issued, expires_at) = issue_key(conn, secret, id, expires_in_days).await?;
            done.target = Some(format!("principal {principal}, key {}", issued.key_id));
            done.key = Some((issued, expires_at));
        }
        AdminCommand::RevokeKey { key_id, .. } => {
            if !admin::revoke_api_key(conn, &key_id).await? {
                return Err(refused(Outcome::NotFound, format!("no live key {key_id}")));
            }
            done.lines.push(format!(
                "revoked key {key_id}; it is refused from the next call on"
            ));
        }
    }
    Ok(done)
}

/// The gRPC code name an admin action's failure is recorded with.
fn admin_outcome(err: &ern_registry::store::StoreError) -> Outcome {
    match err {
        ern_registry::store::StoreError::NotFound(_) => Outcome::NotFound,
        ern_registry::store::StoreError::AlreadyExists(_) => Outcome::AlreadyExists,
        ern_registry::store::StoreError::Invalid(_) => Outcome::InvalidArgument,
        e if e.is_unavailable() => Outcome::Unavailable,
        _ => Outcome::Internal,
    }
}
