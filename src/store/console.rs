//! The SQL of the web console's sign-in and sessions (`console_credentials`,
//! `console_sessions`, migration 0012; `console_sign_in_failures`, migration 0020), and the
//! consent expiry lists officers follow up.
//! No rule lives here: who may sign in, when a session ends and what is locked are
//! `service::console`'s decisions; this module reads and writes the rows it is told to.

use std::collections::BTreeSet;

use super::db::{self, Db};
use chrono::{DateTime, TimeDelta, Utc};

use super::{Result, Store, StoreError};
use crate::auth::{CentreRef, Principal, Role};
use crate::consent::Scope;

/// Most forgotten names removed by one failed sign-in.
pub const FORGET_AT_ONCE: i64 = 100;

/// What a sign-in needs from a principal's console credentials.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub principal_id: i64,
    /// The principal's role and centre (code, empty for none), for the audit entry of a
    /// refused sign-in too.
    pub role: String,
    pub centre: String,
    pub disabled: bool,
    /// Argon2id PHC string; `None`: no password set.
    pub password_hash: Option<String>,
    /// The TOTP secret, sealed; `None`: not enrolled.
    pub totp_sealed: Option<String>,
    pub totp_last_step: i64,
    /// Bound to client certificates (`admin bind-certificate`): the console, which sees
    /// none, may not sign it in.
    pub certificate_bound: bool,
}

/// A session row.
#[derive(Debug, Clone)]
pub struct SessionRow {
    pub principal_id: i64,
    pub created_at: DateTime<Utc>,
    pub last_seen_at: DateTime<Utc>,
}

/// A consent decision in force that expires (or expired) at `expires_at`.
#[derive(Debug, Clone)]
pub struct Expiring {
    pub registry_id: i64,
    pub registry_code: String,
    pub pseudonym: String,
    pub scope: Scope,
    pub expires_at: DateTime<Utc>,
}

impl Expiring {
    /// The cursor of the page that starts after this row.
    pub fn cursor(&self) -> ExpiryCursor {
        ExpiryCursor {
            expires_at: self.expires_at,
            registry_id: self.registry_id,
            pseudonym: self.pseudonym.clone(),
            scope: self.scope.as_str().to_owned(),
        }
    }
}

/// Where a page of an expiry list starts: after the row with these values (the list's
/// order is expiry, registry id, pseudonym, scope; instants to the millisecond).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpiryCursor {
    pub expires_at: DateTime<Utc>,
    pub registry_id: i64,
    pub pseudonym: String,
    pub scope: String,
}

/// A page of an expiry list.
#[derive(Debug, Clone, Default)]
pub struct ExpiringPage {
    pub items: Vec<Expiring>,
    /// Rows follow this page.
    pub more: bool,
}

impl Store {
    /// The console credentials of the principal named `name` (a principal without any
    /// has a row of `None`s); `None` when there is no such principal.
    pub async fn console_credentials(&self, name: &str) -> Result<Option<Credentials>> {
        let row = db::query(
            "SELECT p.id, p.role, p.disabled_at, c.password_hash, c.totp_sealed, \
                    COALESCE(c.totp_last_step, 0) AS totp_last_step, \
                    COALESCE(ce.code, '') AS centre, \
                    EXISTS (SELECT 1 FROM principal_certificates b WHERE b.principal_id = p.id) \
                      AS certificate_bound \
             FROM principals p LEFT JOIN console_credentials c ON c.principal_id = p.id \
             LEFT JOIN centres ce ON ce.id = p.centre_id \
             WHERE p.name = $1",
        )
        .bind(name)
        .fetch_optional(self.pool())
        .await?;
        row.map(|r| {
            Ok(Credentials {
                principal_id: r.try_get("id")?,
                role: r.try_get("role")?,
                centre: r.try_get("centre")?,
                disabled: r.try_get::<Option<DateTime<Utc>>>("disabled_at")?.is_some(),
                password_hash: r.try_get("password_hash")?,
                totp_sealed: r.try_get("totp_sealed")?,
                totp_last_step: r.try_get("totp_last_step")?,
                certificate_bound: r.try_get("certificate_bound")?,
            })
        })
        .transpose()
    }

    /// Whether the principal is bound to client certificates (checked per console request:
    /// a binding made after sign-in ends the session).
    pub async fn certificate_bound(&self, principal_id: i64) -> Result<bool> {
        let row = db::query(
            "SELECT EXISTS (SELECT 1 FROM principal_certificates WHERE principal_id = $1) AS bound",
        )
        .bind(principal_id)
        .fetch_one(self.pool())
        .await?;
        row.try_get("bound")
    }

    /// Until when sign-ins with the name whose MAC is `name_mac` are held back, if they
    /// are at `now` (a hold whose row is forgotten counts for nothing).
    pub async fn sign_in_held(
        &self,
        name_mac: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<DateTime<Utc>>> {
        let row = db::query(
            "SELECT locked_until FROM console_sign_in_failures \
             WHERE name_mac = $1 AND locked_until > $2",
        )
        .bind(name_mac)
        .bind(now)
        .fetch_optional(self.pool())
        .await?;
        row.map(|r| r.try_get("locked_until")).transpose()
    }

    /// Counts a failed sign-in with the name whose MAC is `name_mac` and, when
    /// `hold_for` the new count says so, holds the name's sign-ins back until then (never
    /// shortening a hold another instance set meanwhile), in one transaction. A name whose
    /// last failure is older than `forget_before` and whose hold has ended is forgotten:
    /// its count starts again at one. Such rows are also deleted, up to
    /// [`FORGET_AT_ONCE`] per call (so that no one sign-in pays for a flood of names a day
    /// before; a row changed meanwhile by another instance is not deleted). Returns the
    /// name's failures since it was last forgotten or cleared.
    pub async fn sign_in_failed(
        &self,
        name_mac: &str,
        now: DateTime<Utc>,
        forget_before: DateTime<Utc>,
        hold_for: impl Fn(i64) -> Option<TimeDelta>,
    ) -> Result<i64> {
        let mut tx = self.pool().begin().await?;
        db::query(
            "DELETE FROM console_sign_in_failures WHERE name_mac IN \
             (SELECT name_mac FROM console_sign_in_failures \
              WHERE last_failure_at < $1 AND locked_until <= $2 LIMIT $3) \
             AND last_failure_at < $1 AND locked_until <= $2",
        )
        .bind(forget_before)
        .bind(now)
        .bind(FORGET_AT_ONCE)
        .execute(&mut tx)
        .await?;
        let row = db::query(
            "INSERT INTO console_sign_in_failures (name_mac, failures, locked_until, last_failure_at) \
             VALUES ($1, 1, $2, $3) \
             ON CONFLICT (name_mac) DO UPDATE SET \
               failures = CASE \
                 WHEN console_sign_in_failures.last_failure_at < $4 \
                  AND console_sign_in_failures.locked_until <= $3 THEN 1 \
                 ELSE console_sign_in_failures.failures + 1 END, \
               last_failure_at = excluded.last_failure_at \
             RETURNING failures",
        )
        .bind(name_mac)
        .bind(DateTime::UNIX_EPOCH)
        .bind(now)
        .bind(forget_before)
        .fetch_one(&mut tx)
        .await?;
        let failures = row.try_get("failures")?;
        if let Some(hold) = hold_for(failures) {
            db::query(
                "UPDATE console_sign_in_failures SET locked_until = $2 \
                 WHERE name_mac = $1 AND locked_until < $2",
            )
            .bind(name_mac)
            .bind(now + hold)
            .execute(&mut tx)
            .await?;
        }
        tx.commit().await?;
        Ok(failures)
    }

    /// Records a successful sign-in with the name whose MAC is `name_mac`, of the
    /// principal `principal_id` with the code of time step `step`: clears the name's
    /// failures and hold. Returns false, changing nothing, when a code of this step or a
    /// later one was accepted before (a replayed code).
    pub async fn console_success(
        &self,
        principal_id: i64,
        name_mac: &str,
        step: i64,
    ) -> Result<bool> {
        let mut tx = self.pool().begin().await?;
        let done = db::query(
            "UPDATE console_credentials SET totp_last_step = $2 \
             WHERE principal_id = $1 AND totp_last_step < $2",
        )
        .bind(principal_id)
        .bind(step)
        .execute(&mut tx)
        .await?;
        if done.rows_affected() != 1 {
            tx.rollback().await?;
            return Ok(false);
        }
        db::query("DELETE FROM console_sign_in_failures WHERE name_mac = $1")
            .bind(name_mac)
            .execute(&mut tx)
            .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Starts a session: the hash of its token, for `principal_id`, at `now`.
    pub async fn insert_console_session(
        &self,
        token_hash: &str,
        principal_id: i64,
        now: DateTime<Utc>,
    ) -> Result<()> {
        db::query(
            "INSERT INTO console_sessions (token_hash, principal_id, created_at, last_seen_at) \
             VALUES ($1, $2, $3, $3)",
        )
        .bind(token_hash)
        .bind(principal_id)
        .bind(now)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    pub async fn console_session(&self, token_hash: &str) -> Result<Option<SessionRow>> {
        let row = db::query(
            "SELECT principal_id, created_at, last_seen_at FROM console_sessions WHERE token_hash = $1",
        )
        .bind(token_hash)
        .fetch_optional(self.pool())
        .await?;
        row.map(|r| {
            Ok(SessionRow {
                principal_id: r.try_get("principal_id")?,
                created_at: r.try_get("created_at")?,
                last_seen_at: r.try_get("last_seen_at")?,
            })
        })
        .transpose()
    }

    pub async fn touch_console_session(&self, token_hash: &str, now: DateTime<Utc>) -> Result<()> {
        db::query("UPDATE console_sessions SET last_seen_at = $2 WHERE token_hash = $1")
            .bind(token_hash)
            .bind(now)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    pub async fn delete_console_session(&self, token_hash: &str) -> Result<()> {
        db::query("DELETE FROM console_sessions WHERE token_hash = $1")
            .bind(token_hash)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// Ends the principal's sessions that started before `created_before` or were last
    /// used before `seen_before` (expired ones), and, with `all`, every one.
    pub async fn delete_console_sessions_of(
        &self,
        principal_id: i64,
        created_before: DateTime<Utc>,
        seen_before: DateTime<Utc>,
        all: bool,
    ) -> Result<()> {
        db::query(
            "DELETE FROM console_sessions WHERE principal_id = $1 \
             AND ($4 OR created_at < $2 OR last_seen_at < $3)",
        )
        .bind(principal_id)
        .bind(created_before)
        .bind(seen_before)
        .bind(all)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// The principal `id` as authentication makes it (role, centre, registries), and
    /// whether it is disabled.
    pub async fn principal_by_id(&self, id: i64) -> Result<Option<(Principal, bool)>> {
        let Some(row) = db::query(
            "SELECT p.name, p.role, p.disabled_at, c.id, c.code, c.country \
             FROM principals p LEFT JOIN centres c ON c.id = p.centre_id WHERE p.id = $1",
        )
        .bind(id)
        .fetch_optional(self.pool())
        .await?
        else {
            return Ok(None);
        };
        let role: String = row.try_get("role")?;
        let role = Role::parse(&role).ok_or_else(|| StoreError::Corrupt("unknown role".into()))?;
        let centre = match row.try_get::<Option<i64>>("id")? {
            None => None,
            Some(cid) => Some(CentreRef {
                id: cid,
                code: row.try_get("code")?,
                country: row.try_get("country")?,
            }),
        };
        let registries: BTreeSet<i64> = db::query(
            "SELECT registry_id FROM principal_registries WHERE principal_id = $1 \
             UNION SELECT registry_id FROM centre_registries WHERE centre_id = $2",
        )
        .bind(id)
        .bind(centre.as_ref().map(|c| c.id))
        .fetch_all(self.pool())
        .await?
        .iter()
        .map(|r| r.try_get::<i64>("registry_id"))
        .collect::<std::result::Result<_, _>>()?;
        let disabled = row
            .try_get::<Option<DateTime<Utc>>>("disabled_at")?
            .is_some();
        Ok(Some((
            Principal {
                id,
                name: row.try_get("name")?,
                role,
                centre,
                registries,
            },
            disabled,
        )))
    }

    /// A page of the granted decisions in force in `registries` whose expiry lies in
    /// `[from, to)`, in the order (expiry, registry, pseudonym, scope), starting after
    /// `after` (the last row of the page before), at most `limit` rows; `more` tells
    /// whether rows follow.
    ///
    /// One query per registry, each a range of the index `consent_current_expiry`
    /// (migration 0015) read in its order and cut at `limit + 1` rows: the work is the
    /// page's, whatever the size of the registry.
    pub async fn consents_expiring(
        &self,
        registries: &[i64],
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        after: Option<&ExpiryCursor>,
        limit: i64,
    ) -> Result<ExpiringPage> {
        let mut items = Vec::new();
        for &registry_id in registries {
            // Rows at the cursor's instant come after it in a later registry, after its
            // (pseudonym, scope) in its own registry, and not at all in an earlier one.
            let (low, at, relation, pseudonym, scope) = match after {
                None => (from, from - TimeDelta::milliseconds(1), 1, "", ""),
                Some(c) => (
                    from.max(c.expires_at),
                    c.expires_at,
                    (registry_id - c.registry_id).signum(),
                    c.pseudonym.as_str(),
                    c.scope.as_str(),
                ),
            };
            let rows = db::query(
                "SELECT r.code, c.pseudonym, c.scope, c.expires_at \
                 FROM consent_current c JOIN registries r ON r.id = c.registry_id \
                 WHERE c.registry_id = $1 AND c.state = 'granted' \
                   AND c.expires_at >= $2 AND c.expires_at < $3 \
                   AND (c.expires_at > $4 OR (c.expires_at = $4 AND ($5 = 1 OR ($5 = 0 \
                        AND (c.pseudonym > $6 OR (c.pseudonym = $6 AND c.scope > $7)))))) \
                 ORDER BY c.expires_at, c.pseudonym, c.scope LIMIT $8",
            )
            .bind(registry_id)
            .bind(low)
            .bind(to)
            .bind(at)
            .bind(relation)
            .bind(pseudonym)
            .bind(scope)
            .bind(limit + 1)
            .fetch_all(self.pool())
            .await?;
            for r in rows {
                let scope: String = r.try_get("scope")?;
                items.push(Expiring {
                    registry_id,
                    registry_code: r.try_get("code")?,
                    pseudonym: r.try_get("pseudonym")?,
                    scope: Scope::parse_db(&scope)
                        .ok_or_else(|| StoreError::Corrupt("unknown consent scope".into()))?,
                    expires_at: r.try_get("expires_at")?,
                });
            }
        }
        items.sort_by(|a, b| {
            (a.expires_at, a.registry_id, &a.pseudonym, a.scope.as_str()).cmp(&(
                b.expires_at,
                b.registry_id,
                &b.pseudonym,
                b.scope.as_str(),
            ))
        });
        let limit = usize::try_from(limit).unwrap_or(0);
        let more = items.len() > limit;
        items.truncate(limit);
        Ok(ExpiringPage { items, more })
    }
}

/// Sets (or replaces) a principal's console password; clears the failures and the hold
/// of its name, whose MAC is `name_mac`.
pub async fn set_password(
    conn: &mut Db<'_>,
    principal_id: i64,
    name_mac: &str,
    hash: &str,
    now: DateTime<Utc>,
) -> Result<()> {
    db::query(
        "INSERT INTO console_credentials (principal_id, password_hash, updated_at) VALUES ($1, $2, $3) \
         ON CONFLICT (principal_id) DO UPDATE SET password_hash = excluded.password_hash, \
         updated_at = excluded.updated_at",
    )
    .bind(principal_id)
    .bind(hash)
    .bind(now)
    .execute(&mut *conn)
    .await?;
    db::query("DELETE FROM console_sign_in_failures WHERE name_mac = $1")
        .bind(name_mac)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Sets (or replaces) a principal's sealed TOTP secret.
pub async fn set_totp(
    conn: &mut Db<'_>,
    principal_id: i64,
    sealed: &str,
    now: DateTime<Utc>,
) -> Result<()> {
    db::query(
        "INSERT INTO console_credentials (principal_id, totp_sealed, updated_at) VALUES ($1, $2, $3) \
         ON CONFLICT (principal_id) DO UPDATE SET totp_sealed = excluded.totp_sealed, \
         totp_last_step = 0, updated_at = excluded.updated_at",
    )
    .bind(principal_id)
    .bind(sealed)
    .bind(now)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Ends every console session of a principal (a new password or second factor).
pub async fn end_sessions(conn: &mut Db<'_>, principal_id: i64) -> Result<()> {
    db::query("DELETE FROM console_sessions WHERE principal_id = $1")
        .bind(principal_id)
        .execute(&mut *conn)
        .await?;
    Ok(())
}
