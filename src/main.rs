//! The `ern-registry` binary: parses the command line and calls the library.

use std::process::ExitCode;

use chrono::{Duration, Utc};
use clap::Parser;
use ring::rand::SystemRandom;
use tracing_subscriber::EnvFilter;

use ern_registry::auth::{self, Role};
use std::sync::Arc;

use ern_registry::audit::AuditKey;
use ern_registry::config::{AdminCommand, AuditCommand, Cli, Command, GlobalArgs, LogFormat};
use ern_registry::keys::{self, KdfFile, MasterSecret, Passphrase};
use ern_registry::pseudonym::Pseudonymiser;
use ern_registry::startup::{self, Application};
use ern_registry::store::Store;
use ern_registry::store::writer::Writer;
use ern_registry::synthetic;

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
            master_key_file,
            master_passphrase_file,
        }) => audit_verify(&cli.global, master_key_file, master_passphrase_file).await,
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
        std::fs::create_dir_all(dir)?;
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
    let master = startup::load_master_secret(&key_file, &kdf_file, passphrase.as_ref(), true)?;
    let store = startup::open_store(&global.database_url(), 4).await?;
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

/// Walks the audit chain; an error (non-zero exit) names the first broken entry.
async fn audit_verify(
    global: &GlobalArgs,
    master_key_file: Option<std::path::PathBuf>,
    master_passphrase_file: Option<std::path::PathBuf>,
) -> Result<(), AnyError> {
    let key_file = master_key_file.unwrap_or_else(|| global.data_dir.join("master.key"));
    let kdf_file = KdfFile::default_path(&key_file);
    let passphrase = Passphrase::from_env_or_file(master_passphrase_file.as_deref())?;
    let master = startup::load_master_secret(&key_file, &kdf_file, passphrase.as_ref(), false)?;
    let store = open(global).await?;
    let result = store.verify_audit(&AuditKey::derive(&master)).await?;
    store.close().await;
    match result {
        Ok(v) => {
            println!(
                "audit log intact: {} entries; head entry {} with MAC {}",
                v.entries,
                v.head_seq,
                if v.head_mac.is_empty() {
                    "-"
                } else {
                    &v.head_mac
                }
            );
            println!(
                "record the head elsewhere (e.g. in your ticketing system) to detect a truncated tail later"
            );
            Ok(())
        }
        Err(broken) => Err(format!("audit log BROKEN: {broken}").into()),
    }
}

async fn open(global: &GlobalArgs) -> Result<Store, AnyError> {
    Ok(startup::open_store(&global.database_url(), 2).await?)
}

async fn print_new_key(
    store: &Store,
    principal_id: i64,
    expires_in_days: Option<u32>,
) -> Result<(), AnyError> {
    let issued = tokio::task::spawn_blocking(|| auth::issue_key(&SystemRandom::new()))
        .await?
        .map_err(|_| "no system randomness")?;
    let expires_at = expires_in_days.map(|d| Utc::now() + Duration::days(i64::from(d)));
    store
        .insert_api_key(
            &issued.key_id,
            principal_id,
            &issued.secret_hash,
            expires_at,
        )
        .await?;
    println!(
        "api key (shown once, store it now): {}",
        issued.token.as_str()
    );
    println!("key id: {}", issued.key_id);
    if let Some(at) = expires_at {
        println!("expires: {}", at.to_rfc3339());
    }
    Ok(())
}

async fn admin(global: &GlobalArgs, cmd: AdminCommand) -> Result<(), AnyError> {
    let store = open(global).await?;
    match cmd {
        AdminCommand::ListRegistries => {
            for r in store.list_registries().await? {
                println!(
                    "{:<22} key v{}  k={}  p={}  {}",
                    r.code, r.active_key_version, r.min_cell_count, r.protection_level, r.name
                );
            }
        }
        AdminCommand::DisablePrincipal { name } => {
            if store.disable_principal(&name).await? {
                println!("disabled {name}: every key of theirs is refused from the next call on");
            } else {
                return Err(format!("{name} is disabled already").into());
            }
        }
        AdminCommand::BindCertificate { principal, cert } => {
            use rustls_pki_types::{CertificateDer, pem::PemObject};
            let der = CertificateDer::from_pem_file(&cert)
                .map_err(|e| format!("{}: not a PEM certificate: {e}", cert.display()))?;
            let fingerprint = auth::certificate_fingerprint(&der);
            store.bind_certificate(&principal, &fingerprint).await?;
            println!(
                "bound certificate {fingerprint} to {principal}: its calls must now present it (mutual TLS)"
            );
        }
        AdminCommand::RotateKey { registry } => {
            let version = store.rotate_registry_key(&registry).await?;
            println!(
                "{registry}: new patients get pseudonyms of key version {version} from the next call on \
                 (a running service reads it per call); known patients keep theirs"
            );
        }
        AdminCommand::SetMinCellCount { registry, k } => {
            store.set_min_cell_count(&registry, k).await?;
            println!("{registry}: counts below {k} are suppressed from the next query on");
        }
        AdminCommand::SetProtectionLevel { registry, level } => {
            store.set_protection_level(&registry, level).await?;
            println!(
                "{registry}: every hidden count lies in an interval at least {level} wide, from the next query on"
            );
        }
        AdminCommand::CreateCentre {
            code,
            name,
            country,
            erns,
        } => {
            let code = ern_registry::domain::CentreCode::parse(&code)?;
            let country = ern_registry::domain::CountryCode::parse(&country.to_ascii_uppercase())?;
            let id = store
                .create_centre(code.as_str(), name.trim(), country.as_str(), &erns)
                .await?;
            println!(
                "created centre {} (id {id}) in {}",
                code.as_str(),
                erns.join(", ")
            );
        }
        AdminCommand::CreatePrincipal {
            name,
            role,
            centre,
            erns,
            expires_in_days,
        } => {
            let role = Role::parse(&role)
                .ok_or("role must be physician, consent-officer, researcher or admin")?;
            let name = name.trim();
            if name.is_empty() || name.len() > 128 {
                return Err("name must be 1 to 128 characters".into());
            }
            let id = store
                .create_principal(name, role, centre.as_deref(), &erns)
                .await?;
            println!("created {role} {name} (id {id})");
            print_new_key(&store, id, expires_in_days).await?;
        }
        AdminCommand::IssueKey {
            principal,
            expires_in_days,
        } => {
            let id = store.principal_id(&principal).await?;
            print_new_key(&store, id, expires_in_days).await?;
        }
        AdminCommand::RevokeKey { key_id } => {
            if store.revoke_api_key(&key_id).await? {
                println!("revoked key {key_id}; it is refused from the next call on");
            } else {
                return Err(format!("no live key {key_id}").into());
            }
        }
    }
    store.close().await;
    Ok(())
}
