//! Admin: the audit log, read by admins over gRPC (listing it is itself audited, by the
//! call's own entry), and the actions of the admin command line (`ern-registry admin
//! ...`): their rules, and the audit entry each is committed with, in its transaction
//! ([`run_action`]).

use crate::store::db::Db;
use chrono::{DateTime, Duration, Utc};
use ring::rand::SystemRandom;

use secrecy::{ExposeSecret, SecretString};

use super::{Call, ServiceError, Services, console};
use crate::audit::{AuditKey, Entry, Stored};
use crate::auth::{self, Principal, Role};
use crate::keys::MasterSecret;
use crate::outcome::Outcome;
use crate::store::audit::AuditFilter;
use crate::store::console as console_store;
use crate::store::{Store, StoreError, admin};

/// One page of the audit log, oldest first, and the sequence number to continue after
/// (0 when this page is the last).
pub struct AuditPage {
    pub entries: Vec<Stored>,
    pub next_after_seq: u64,
}

/// The entries matching `filter` (at most `filter.limit`), for an admin.
pub async fn list_audit_entries(
    services: &Services,
    principal: &Principal,
    filter: &AuditFilter,
    call: &mut Call,
) -> Result<AuditPage, ServiceError> {
    principal.require_role(Role::Admin)?;
    // One entry more than the page, to tell whether another page follows (a page that is
    // exactly full and the last gives 0, not a token to an empty page).
    let probe = AuditFilter {
        limit: filter.limit.saturating_add(1),
        ..filter.clone()
    };
    let mut entries = services.store.audit_entries(&probe).await?;
    let more = i64::try_from(entries.len()).is_ok_and(|n| n > filter.limit);
    entries.truncate(usize::try_from(filter.limit).unwrap_or(0));
    call.items(entries.len());
    let next_after_seq = if more {
        entries.last().map_or(0, |e| e.seq as u64)
    } else {
        0
    };
    Ok(AuditPage {
        entries,
        next_after_seq,
    })
}

// ----- The admin command line's actions -----

/// An action of the admin command line (`ern-registry admin ...`) that changes something.
/// The command line reads its arguments (and a certificate file) into one of these; the
/// rules and the audit entry are here.
#[derive(Debug, Clone)]
pub enum AdminAction {
    DisablePrincipal {
        name: String,
    },
    /// `pem`: the certificate file's bytes, or why it could not be read.
    BindCertificate {
        principal: String,
        pem: Result<Vec<u8>, String>,
    },
    RotateKey {
        registry: String,
    },
    SetMinCellCount {
        registry: String,
        k: i64,
    },
    SetProtectionLevel {
        registry: String,
        level: i64,
    },
    CreateCentre {
        code: String,
        name: String,
        country: String,
        erns: Vec<String>,
    },
    CreatePrincipal {
        name: String,
        role: String,
        centre: Option<String>,
        erns: Vec<String>,
        expires_in_days: Option<u32>,
    },
    IssueKey {
        principal: String,
        expires_in_days: Option<u32>,
    },
    RevokeKey {
        key_id: String,
    },
    /// `ern-registry codes import`: a code release from its published files, with the
    /// version they state (or `version`), put in force unless `activate` is false.
    /// Built by [`import_codes`] once the files are read and their rows written
    /// (`staged`, or why not): this action gives the release its version and puts it in
    /// force, in the audited transaction.
    ImportCodes {
        system: crate::domain::CodeSystem,
        files: String,
        staged: Result<crate::store::codes::Staged, Refused>,
        version: Option<String>,
        activate: bool,
    },
    /// `ern-registry codes activate`: put a release on file in force for its system.
    ActivateCodes {
        system: crate::domain::CodeSystem,
        version: String,
    },
    /// Sets a principal's web console password (ends their console sessions).
    SetPassword {
        principal: String,
        password: SecretString,
    },
    /// Gives a principal a new TOTP secret for the web console, shown once as an otpauth
    /// URI (ends their console sessions).
    EnrolTotp {
        principal: String,
    },
}

/// Why an admin action was refused: the outcome its audit entry records, and the message.
#[derive(Debug, Clone)]
pub struct Refused {
    pub outcome: Outcome,
    pub message: String,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Refused {}

impl From<StoreError> for Refused {
    fn from(err: StoreError) -> Refused {
        Refused {
            outcome: store_outcome(&err),
            message: err.to_string(),
        }
    }
}

fn refused(outcome: Outcome, message: impl Into<String>) -> Refused {
    Refused {
        outcome,
        message: message.into(),
    }
}

/// The outcome a failed admin action is recorded with.
fn store_outcome(err: &StoreError) -> Outcome {
    match err {
        StoreError::NotFound(_) => Outcome::NotFound,
        StoreError::AlreadyExists(_) => Outcome::AlreadyExists,
        StoreError::Invalid(_) => Outcome::InvalidArgument,
        e if e.is_unavailable() => Outcome::Unavailable,
        _ => Outcome::Internal,
    }
}

/// What an admin action did, committed with its audit entry: what to tell the operator,
/// and an API key to show once.
#[derive(Default)]
pub struct Done {
    pub lines: Vec<String>,
    target: Option<String>,
    pub key: Option<(auth::IssuedKey, Option<DateTime<Utc>>)>,
    /// A TOTP enrolment's otpauth URI, to show once (text and QR code).
    pub totp_uri: Option<SecretString>,
}

/// Which principals make sense: physicians belong to a centre (their registries are
/// those of its ERNs); researchers are members of at least one ERN; consent officers act
/// for a centre or for registries; admins are bound to neither.
pub fn check_principal_shape(
    role: Role,
    has_centre: bool,
    has_registries: bool,
) -> Result<(), Refused> {
    let invalid = |m: &str| Err(refused(Outcome::InvalidArgument, m));
    match role {
        Role::Physician if !has_centre => invalid("a physician belongs to a centre (--centre)"),
        Role::Physician if has_registries => {
            invalid("a physician's registries are those of its centre's ERNs; drop --ern")
        }
        Role::Researcher if !has_registries => {
            invalid("a researcher is a member of at least one ERN (--ern)")
        }
        Role::ConsentOfficer if !has_centre && !has_registries => {
            invalid("a consent officer acts for a centre (--centre) or registries (--ern)")
        }
        Role::Admin if has_centre || has_registries => {
            invalid("an admin is bound to no centre or ERN")
        }
        _ => Ok(()),
    }
}

/// Runs an admin action in one transaction with its audit entry (by `operator`), or,
/// refused, rolls it back and records the refusal in an entry of its own. Nothing is
/// returned to show (no API key) before the commit.
pub async fn run_action(
    store: &Store,
    secret: &MasterSecret,
    operator: &str,
    action: AdminAction,
) -> Result<Done, Refused> {
    let key = AuditKey::derive(secret);
    let (method, registry, target) = describe(&action);
    let mut entry = Entry {
        principal: operator.to_owned(),
        role: Role::Admin.as_str().into(),
        method: format!("AdminCli/{method}"),
        registry,
        target,
        items: 1,
        ..Entry::default()
    };
    let rotation = matches!(action, AdminAction::RotateKey { .. });
    let mut tx = match store.begin_admin(rotation).await {
        Ok(tx) => tx,
        Err(err) if rotation && err.is_lock_timeout() => {
            let refusal = refused(
                Outcome::Unavailable,
                format!(
                    "writes in progress did not end within {} (one may be stuck waiting for a \
                     lock): nothing changed; run it again",
                    crate::store::admin::ROTATION_LOCK_TIMEOUT
                ),
            );
            entry.outcome = refusal.outcome.name().into();
            if let Err(e) = store.audit_alone(&key, entry).await {
                tracing::warn!(error = %e, "the refusal of an admin action could not be recorded in the audit log");
            }
            return Err(refusal);
        }
        Err(err) => return Err(err.into()),
    };
    match apply(&mut tx.conn(), secret, action).await {
        Ok(done) => {
            entry.outcome = Outcome::Ok.name().into();
            if let Some(target) = &done.target {
                entry.target.clone_from(target);
            }
            tx.commit(&key, entry).await?;
            Ok(done)
        }
        Err(refusal) => {
            tx.rollback().await?;
            entry.outcome = refusal.outcome.name().into();
            if let Err(e) = store.audit_alone(&key, entry).await {
                tracing::warn!(error = %e, "the refusal of an admin action could not be recorded in the audit log");
            }
            Err(refusal)
        }
    }
}

/// `ern-registry codes import`: reads the release files and writes their rows (a batch
/// per short transaction, never in force: `store::codes::stage`), then runs
/// [`AdminAction::ImportCodes`], which gives the release its version and puts it in force
/// in one transaction with its audit entry. A refused import (files that do not parse, a
/// version on file already) is recorded like any refused action, and its rows removed.
pub async fn import_codes(
    store: &Store,
    secret: &MasterSecret,
    operator: &str,
    source: crate::codes::Source,
    version: Option<String>,
    activate: bool,
) -> Result<Done, Refused> {
    let (system, files) = (source.system(), source.describe());
    let staged = crate::store::codes::stage(store, source, Utc::now()).await;
    let release_id = staged.as_ref().ok().map(|s| s.release_id);
    let action = AdminAction::ImportCodes {
        system,
        files,
        staged: staged.map_err(Refused::from),
        version,
        activate,
    };
    let result = run_action(store, secret, operator, action).await;
    if result.is_err()
        && let Some(id) = release_id
        && let Err(e) = crate::store::codes::discard(store, id).await
    {
        tracing::warn!(error = %e, release_id = id, "a refused code release was not removed");
    }
    result
}

/// The audit entry's action, registry and target of an admin action, as given.
fn describe(action: &AdminAction) -> (&'static str, String, String) {
    let none = String::new;
    match action {
        AdminAction::DisablePrincipal { name } => {
            ("DisablePrincipal", none(), format!("principal {name}"))
        }
        AdminAction::BindCertificate { principal, .. } => {
            ("BindCertificate", none(), format!("principal {principal}"))
        }
        AdminAction::RotateKey { registry } => ("RotateKey", registry.clone(), none()),
        AdminAction::SetMinCellCount { registry, k } => {
            ("SetMinCellCount", registry.clone(), format!("k {k}"))
        }
        AdminAction::SetProtectionLevel {
            registry, level, ..
        } => (
            "SetProtectionLevel",
            registry.clone(),
            format!("level {level}"),
        ),
        AdminAction::CreateCentre { code, erns, .. } => {
            ("CreateCentre", erns.join(","), format!("centre {code}"))
        }
        AdminAction::CreatePrincipal { name, erns, .. } => (
            "CreatePrincipal",
            erns.join(","),
            format!("principal {name}"),
        ),
        AdminAction::IssueKey { principal, .. } => {
            ("IssueKey", none(), format!("principal {principal}"))
        }
        AdminAction::RevokeKey { key_id } => ("RevokeKey", none(), format!("key {key_id}")),
        AdminAction::ImportCodes {
            system,
            files,
            version,
            ..
        } => (
            "ImportCodes",
            none(),
            format!(
                "{system} release {} from {files}",
                version.as_deref().unwrap_or("(as the files state)"),
            ),
        ),
        AdminAction::ActivateCodes { system, version } => (
            "ActivateCodes",
            none(),
            format!("{system} release {version}"),
        ),
        AdminAction::SetPassword { principal, .. } => {
            ("SetPassword", none(), format!("principal {principal}"))
        }
        AdminAction::EnrolTotp { principal } => {
            ("EnrolTotp", none(), format!("principal {principal}"))
        }
    }
}

/// Issues an API key for principal `principal_id` on `conn`; shown after the commit.
async fn issue_key(
    conn: &mut Db<'_>,
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

async fn apply(
    conn: &mut Db<'_>,
    secret: &MasterSecret,
    action: AdminAction,
) -> Result<Done, Refused> {
    let mut done = Done::default();
    match action {
        AdminAction::DisablePrincipal { name } => {
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
        AdminAction::BindCertificate { principal, pem } => {
            use rustls_pki_types::{CertificateDer, pem::PemObject};
            let der = pem
                .and_then(|pem| CertificateDer::from_pem_slice(&pem).map_err(|e| e.to_string()))
                .map_err(|e| {
                    refused(
                        Outcome::InvalidArgument,
                        format!("not a PEM certificate: {e}"),
                    )
                })?;
            let fingerprint = auth::certificate_fingerprint(&der);
            admin::bind_certificate(conn, &principal, &fingerprint).await?;
            done.target = Some(format!("principal {principal}, certificate {fingerprint}"));
            done.lines.push(format!(
                "bound certificate {fingerprint} to {principal}: its calls must now present it (mutual TLS)"
            ));
        }
        AdminAction::RotateKey { registry } => {
            let version = admin::rotate_registry_key(conn, &registry).await?;
            done.target = Some(format!("key version {version}"));
            done.lines.push(format!(
                "{registry}: new patients get pseudonyms of key version {version} from the next call on \
                 (a running service reads it per call); known patients keep theirs"
            ));
        }
        AdminAction::SetMinCellCount { registry, k } => {
            admin::set_min_cell_count(conn, &registry, k).await?;
            done.lines.push(format!(
                "{registry}: counts below {k} are suppressed from the next query on"
            ));
        }
        AdminAction::SetProtectionLevel {
            registry, level, ..
        } => {
            admin::set_protection_level(conn, &registry, level).await?;
            done.lines.push(format!(
                "{registry}: every hidden count lies in an interval at least {level} wide, from the next query on"
            ));
        }
        AdminAction::CreateCentre {
            code,
            name,
            country,
            erns,
        } => {
            let invalid =
                |e: crate::domain::DomainError| refused(Outcome::InvalidArgument, e.to_string());
            let code = crate::domain::CentreCode::parse(&code).map_err(invalid)?;
            let country = crate::domain::CountryCode::parse(&country.to_ascii_uppercase())
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
        AdminAction::CreatePrincipal {
            name,
            role,
            centre,
            erns,
            expires_in_days,
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
            check_principal_shape(role, centre.is_some(), !erns.is_empty())?;
            let id = admin::create_principal(conn, name, role, centre.as_deref(), &erns).await?;
            let (issued, expires_at) = issue_key(conn, secret, id, expires_in_days).await?;
            done.target = Some(format!("principal {name}, key {}", issued.key_id));
            done.lines.push(format!("created {role} {name} (id {id})"));
            done.key = Some((issued, expires_at));
        }
        AdminAction::IssueKey {
            principal,
            expires_in_days,
        } => {
            let id = admin::principal_id(conn, &principal).await?;
            let (issued, expires_at) = issue_key(conn, secret, id, expires_in_days).await?;
            done.target = Some(format!("principal {principal}, key {}", issued.key_id));
            done.key = Some((issued, expires_at));
        }
        AdminAction::RevokeKey { key_id } => {
            if !admin::revoke_api_key(conn, &key_id).await? {
                return Err(refused(Outcome::NotFound, format!("no live key {key_id}")));
            }
            done.lines.push(format!(
                "revoked key {key_id}; it is refused from the next call on"
            ));
        }
        AdminAction::ImportCodes {
            staged,
            version,
            activate,
            ..
        } => {
            // Refused with the outcome of why: files that hold no valid release, or a
            // database that failed while their rows were written.
            let staged = staged?;
            let imported = crate::store::codes::finish(conn, &staged, version, activate).await?;
            let info = &imported.info;
            done.target = Some(format!(
                "{} release {} ({} codes) from {}",
                info.system, info.version, info.terms, info.source
            ));
            done.lines.push(format!(
                "imported {} release {} (dated {}): {} codes, {} parent links, {} aliases, in {:.1} s",
                info.system.name(),
                info.version,
                info.released_on.as_deref().unwrap_or("unknown"),
                info.terms,
                imported.parents,
                imported.aliases,
                staged.elapsed.as_secs_f64()
            ));
            done.lines.push(if info.in_force {
                format!(
                    "it is in force: running servers check {} codes against it within {} s",
                    info.system.name(),
                    super::CODE_REFRESH.as_secs()
                )
            } else {
                format!(
                    "not in force; put it in force with `ern-registry codes activate --system {} --version {}`",
                    info.system, info.version
                )
            });
        }
        AdminAction::ActivateCodes { system, version } => {
            crate::store::codes::set_in_force(conn, system, &version).await?;
            done.lines.push(format!(
                "{} release {version} is in force: running servers check {} codes against it within {} s",
                system.name(),
                system.name(),
                super::CODE_REFRESH.as_secs()
            ));
        }
        AdminAction::SetPassword {
            principal,
            password,
        } => {
            console::check_password(password.expose_secret())
                .map_err(|m| refused(Outcome::InvalidArgument, m))?;
            let id = admin::principal_id(conn, &principal).await?;
            let hash = console::hash_password(password.expose_secret())
                .map_err(|_| refused(Outcome::Internal, "no system randomness"))?;
            let name_mac = console::name_mac(secret, &principal);
            console_store::set_password(conn, id, &name_mac, &hash, Utc::now()).await?;
            console_store::end_sessions(conn, id).await?;
            done.lines.push(format!(
                "set the web console password of {principal} (Argon2id); their console sessions are ended"
            ));
        }
        AdminAction::EnrolTotp { principal } => {
            let id = admin::principal_id(conn, &principal).await?;
            let (sealed, uri) = console::new_totp(secret, id, &principal)
                .map_err(|_| refused(Outcome::Internal, "no system randomness"))?;
            console_store::set_totp(conn, id, &sealed, Utc::now()).await?;
            console_store::end_sessions(conn, id).await?;
            done.lines.push(format!(
                "enrolled a new TOTP second factor for {principal}; their console sessions are ended. \
                 Scan the QR code (or type the URI) into their authenticator app now: it is shown once"
            ));
            done.totp_uri = Some(uri);
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_principals_that_make_sense_are_created() {
        let ok = |role, centre, registries| check_principal_shape(role, centre, registries).is_ok();
        assert!(ok(Role::Physician, true, false));
        assert!(!ok(Role::Physician, false, false));
        assert!(!ok(Role::Physician, true, true));
        assert!(ok(Role::Researcher, false, true));
        assert!(ok(Role::Researcher, true, true));
        assert!(!ok(Role::Researcher, true, false));
        assert!(ok(Role::ConsentOfficer, true, false));
        assert!(ok(Role::ConsentOfficer, false, true));
        assert!(!ok(Role::ConsentOfficer, false, false));
        assert!(ok(Role::Admin, false, false));
        assert!(!ok(Role::Admin, true, false));
        assert!(!ok(Role::Admin, false, true));
        let refusal = check_principal_shape(Role::Admin, true, false).unwrap_err();
        assert_eq!(refusal.outcome, Outcome::InvalidArgument);
    }
}
