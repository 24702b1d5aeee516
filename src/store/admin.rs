//! Administration: centres, principals, API keys, registry settings, each on a connection
//! the caller chooses, so that the admin command line can run an action and its audit
//! entry in one transaction ([`AdminAction`]). The `Store` methods of the same names run
//! each in a transaction of its own, unaudited (tests, demo data).
//!
//! An admin action's entry records the OS user (`admin-cli:<user>`), the action
//! (`AdminCli/<Action>`), the registry, what it acted on (`target`) and its outcome; a
//! refused action rolls back and its entry is appended alone, so refusals are in the
//! chain too.

use super::db::{self, Db, Tx};
use chrono::{DateTime, Utc};

use super::audit::{self as audit_store, Pending, Wrote};
use super::{
    DisclosureSetting, MIN_CELL_COUNT_RANGE, PROTECTION_LEVEL_RANGE, Result, Store, StoreError,
    insert_centre, resolve_registries,
};
use crate::audit::{AuditKey, Entry};
use crate::auth::Role;

/// An admin action in progress: its transaction, committed with the action's audit
/// entry ([`AdminAction::commit`]), or dropped (rolled back) when the action fails.
pub struct AdminAction {
    tx: Tx,
}

impl Store {
    /// Starts an admin action. It takes the chain's head lock first: on SQLite that makes
    /// the transaction a writer from its first statement, so a server committing beside it
    /// makes it wait (busy timeout) rather than fail on a stale read; on PostgreSQL it
    /// holds appends back for the few milliseconds an action takes.
    ///
    /// `rotation`: the action rotates a registry's key ([`rotate_registry_key`]), and
    /// takes the rotation lock before the head's ([`lock_rotation`]): a writer
    /// transaction holds the former shared and takes the latter to append its entries,
    /// so taken the other way round the two would wait for each other.
    pub async fn begin_admin(&self, rotation: bool) -> Result<AdminAction> {
        let mut tx = self.pool().begin().await?;
        if rotation {
            lock_rotation(&mut tx.db()).await?;
        }
        db::query("UPDATE audit_head SET seq = seq WHERE id = 1")
            .execute(&mut tx)
            .await?;
        Ok(AdminAction { tx })
    }

    /// Appends `entry` (an admin action that failed and was rolled back) in a
    /// transaction of its own.
    pub async fn audit_alone(&self, key: &AuditKey, entry: Entry) -> Result<()> {
        let mut tx = self.pool().begin().await?;
        append(&mut tx.db(), key, entry).await?;
        tx.commit().await?;
        Ok(())
    }
}

impl AdminAction {
    /// The connection the action's statements run on.
    pub fn conn(&mut self) -> Db<'_> {
        self.tx.db()
    }

    /// Appends the action's entry and commits both.
    pub async fn commit(mut self, key: &AuditKey, entry: Entry) -> Result<()> {
        append(&mut self.tx.db(), key, entry).await?;
        self.tx.commit().await?;
        Ok(())
    }

    /// Undoes the action (it failed); its entry is then appended alone
    /// ([`Store::audit_alone`]).
    pub async fn rollback(self) -> Result<()> {
        self.tx.rollback().await?;
        Ok(())
    }
}

async fn append(conn: &mut Db<'_>, key: &AuditKey, entry: Entry) -> Result<()> {
    let pending = [Pending {
        at: Utc::now().timestamp_millis(),
        entry,
        wrote: Wrote::default(),
    }];
    audit_store::append(conn, key, &pending).await?;
    Ok(())
}

/// Sets a registry's research threshold k or protection level.
pub(super) async fn set_disclosure_setting(
    conn: &mut Db<'_>,
    code: &str,
    setting: DisclosureSetting,
    value: i64,
) -> Result<()> {
    let (column, what, range) = match setting {
        DisclosureSetting::MinCellCount => {
            ("min_cell_count", "minimum cell count", MIN_CELL_COUNT_RANGE)
        }
        DisclosureSetting::ProtectionLevel => (
            "protection_level",
            "protection level",
            PROTECTION_LEVEL_RANGE,
        ),
    };
    if !range.contains(&value) {
        return Err(StoreError::Invalid(format!(
            "the {what} must be {} to {}",
            range.start(),
            range.end()
        )));
    }
    let sql = format!("UPDATE registries SET {column} = $1 WHERE code = $2");
    let done = db::query(&sql)
        .bind(value)
        .bind(code)
        .execute(&mut *conn)
        .await?;
    if done.rows_affected() == 0 {
        return Err(StoreError::NotFound(format!("registry {code}")));
    }
    Ok(())
}

/// Sets a registry's minimum published cell count k (2..=100).
pub async fn set_min_cell_count(conn: &mut Db<'_>, code: &str, k: i64) -> Result<()> {
    set_disclosure_setting(conn, code, DisclosureSetting::MinCellCount, k).await
}

/// Sets a registry's protection level (1..=100).
pub async fn set_protection_level(conn: &mut Db<'_>, code: &str, level: i64) -> Result<()> {
    set_disclosure_setting(conn, code, DisclosureSetting::ProtectionLevel, level).await
}

/// Creates a centre that is a member of the ERNs keeping `registries`.
pub async fn create_centre(
    conn: &mut Db<'_>,
    code: &str,
    name: &str,
    country: &str,
    registries: &[String],
) -> Result<i64> {
    let exists = db::query("SELECT id FROM centres WHERE code = $1")
        .bind(code)
        .fetch_optional(&mut *conn)
        .await?;
    if exists.is_some() {
        return Err(StoreError::AlreadyExists(format!("centre {code}")));
    }
    let id = insert_centre(conn, code, name, country).await?;
    for registry_id in resolve_registries(conn, registries).await? {
        db::query("INSERT INTO centre_registries (centre_id, registry_id) VALUES ($1, $2)")
            .bind(id)
            .bind(registry_id)
            .execute(&mut *conn)
            .await?;
    }
    Ok(id)
}

/// Creates a principal (which shapes make sense is the service's rule:
/// `service::admin::check_principal_shape`).
pub async fn create_principal(
    conn: &mut Db<'_>,
    name: &str,
    role: Role,
    centre: Option<&str>,
    registries: &[String],
) -> Result<i64> {
    let exists = db::query("SELECT id FROM principals WHERE name = $1")
        .bind(name)
        .fetch_optional(&mut *conn)
        .await?;
    if exists.is_some() {
        return Err(StoreError::AlreadyExists(format!("principal {name}")));
    }
    let centre_id: Option<i64> = match centre {
        None => None,
        Some(code) => Some(
            db::query("SELECT id FROM centres WHERE code = $1")
                .bind(code)
                .fetch_optional(&mut *conn)
                .await?
                .ok_or_else(|| StoreError::NotFound(format!("centre {code}")))?
                .try_get("id")?,
        ),
    };
    let id: i64 = db::query(
        "INSERT INTO principals (name, role, centre_id, created_at) VALUES ($1, $2, $3, $4) RETURNING id",
    )
    .bind(name)
    .bind(role.as_str())
    .bind(centre_id)
    .bind(Utc::now())
    .fetch_one(&mut *conn)
    .await?
    .try_get("id")?;
    for registry_id in resolve_registries(conn, registries).await? {
        db::query("INSERT INTO principal_registries (principal_id, registry_id) VALUES ($1, $2)")
            .bind(id)
            .bind(registry_id)
            .execute(&mut *conn)
            .await?;
    }
    Ok(id)
}

/// How long a rotation waits for the writer transactions in progress (on PostgreSQL):
/// while it waits, new ones wait behind it.
pub const ROTATION_LOCK_TIMEOUT: &str = "2s";

/// On PostgreSQL, takes the rotation lock (`super::writer::ROTATION_LOCK`) exclusively
/// for the rest of the transaction on `conn`, before any other lock: it waits for the
/// writer transactions in progress on every instance, and holds off new ones until the
/// transaction ends. If they have not ended after [`ROTATION_LOCK_TIMEOUT`] (one stuck
/// behind a lock of its own, say), the wait fails ([`StoreError::is_lock_timeout`])
/// rather than keep every write waiting. Nothing to do on SQLite, where a transaction
/// that writes is serialised with every other.
pub async fn lock_rotation(conn: &mut Db<'_>) -> Result<()> {
    if !matches!(conn, Db::Pg(_)) {
        return Ok(());
    }
    let (a, b) = super::writer::ROTATION_LOCK;
    // Constants, formatted: the two int4 arguments of this form of the function.
    for sql in [
        format!("SET LOCAL lock_timeout = '{ROTATION_LOCK_TIMEOUT}'"),
        format!("SELECT pg_advisory_xact_lock({a}, {b})"),
        "SET LOCAL lock_timeout TO DEFAULT".to_string(),
    ] {
        db::query(&sql).execute(&mut *conn).await?;
    }
    Ok(())
}

/// Starts a new key version for a registry: pseudonyms of patients it does not know
/// yet carry the new version; known patients keep theirs. Returns the new version.
///
/// Run in a transaction that took the rotation lock first ([`lock_rotation`]).
pub async fn rotate_registry_key(conn: &mut Db<'_>, code: &str) -> Result<i64> {
    let row = db::query(
        "UPDATE registries SET active_key_version = active_key_version + 1 \
         WHERE code = $1 AND active_key_version < 999 RETURNING active_key_version",
    )
    .bind(code)
    .fetch_optional(&mut *conn)
    .await?;
    match row {
        Some(r) => Ok(r.try_get("active_key_version")?),
        None => Err(StoreError::NotFound(format!(
            "registry {code} (or its key version is already 999)"
        ))),
    }
}

pub async fn principal_id(conn: &mut Db<'_>, name: &str) -> Result<i64> {
    db::query("SELECT id FROM principals WHERE name = $1")
        .bind(name)
        .fetch_optional(&mut *conn)
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("principal {name}")))?
        .try_get("id")
}

pub async fn insert_api_key(
    conn: &mut Db<'_>,
    key_id: &str,
    principal_id: i64,
    secret_hash: &str,
    expires_at: Option<DateTime<Utc>>,
) -> Result<()> {
    db::query(
        "INSERT INTO api_keys (key_id, principal_id, secret_hash, created_at, expires_at) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(key_id)
    .bind(principal_id)
    .bind(secret_hash)
    .bind(Utc::now())
    .bind(expires_at)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Revokes a key; returns whether a live key was revoked.
pub async fn revoke_api_key(conn: &mut Db<'_>, key_id: &str) -> Result<bool> {
    let done =
        db::query("UPDATE api_keys SET revoked_at = $1 WHERE key_id = $2 AND revoked_at IS NULL")
            .bind(Utc::now())
            .bind(key_id)
            .execute(&mut *conn)
            .await?;
    Ok(done.rows_affected() == 1)
}

/// Disables a principal: every key of theirs is refused from the next call on (the
/// keys stay on file, for the audit log's sake). Returns false if already disabled.
pub async fn disable_principal(conn: &mut Db<'_>, name: &str) -> Result<bool> {
    let id = principal_id(conn, name).await?;
    let done =
        db::query("UPDATE principals SET disabled_at = $1 WHERE id = $2 AND disabled_at IS NULL")
            .bind(Utc::now())
            .bind(id)
            .execute(&mut *conn)
            .await?;
    Ok(done.rows_affected() == 1)
}

/// Binds a client certificate (its SHA-256 fingerprint) to a principal.
pub async fn bind_certificate(conn: &mut Db<'_>, principal: &str, fingerprint: &str) -> Result<()> {
    let id = principal_id(conn, principal).await?;
    db::query(
        "INSERT INTO principal_certificates (principal_id, fingerprint, created_at) \
         VALUES ($1, $2, $3) ON CONFLICT (principal_id, fingerprint) DO NOTHING",
    )
    .bind(id)
    .bind(fingerprint)
    .bind(Utc::now())
    .execute(&mut *conn)
    .await?;
    Ok(())
}
