//! Which master secret a database belongs to: the recorded fingerprint (`master_key`,
//! one row) and whether the database holds anything made with a master secret at all.
//!
//! The policy (create a secret only for an empty database, refuse another one) is the
//! composition root's (`startup::open_master_secret`); this module only answers the two
//! questions it asks, and records the fingerprint once.

use super::db;
use chrono::Utc;

use super::{Result, Store, StoreError};
use crate::keys::Fingerprint;

/// Tables whose rows depend on the master secret: pseudonyms (HMACs under keys derived
/// from it), the audit chain (MACs under a key derived from it) and API keys (hashes keyed
/// by a pepper derived from it). Centres, principals and registry settings do not, so an
/// admin may create them before the first start without binding the database to a secret.
const MASTER_DERIVED: [&str; 9] = [
    "consent_events",
    "consent_current",
    "cases",
    "case_versions",
    "case_genes",
    "patients",
    "erasures",
    "audit_log",
    "api_keys",
];

impl Store {
    /// The fingerprint recorded by the first start, if any.
    pub async fn master_fingerprint(&self) -> Result<Option<Fingerprint>> {
        let Some(row) = db::query("SELECT fingerprint FROM master_key WHERE id = 1")
            .fetch_optional(self.pool())
            .await?
        else {
            return Ok(None);
        };
        let hex: String = row.try_get("fingerprint")?;
        Fingerprint::from_hex(&hex).map(Some).ok_or_else(|| {
            StoreError::Corrupt("master key fingerprint is not 64 hex digits".into())
        })
    }

    /// Records `fingerprint` unless one is recorded already, and returns the one on record
    /// (of whichever process came first, when two start at once).
    pub async fn record_master_fingerprint(
        &self,
        fingerprint: &Fingerprint,
    ) -> Result<Fingerprint> {
        db::query(
            "INSERT INTO master_key (id, fingerprint, recorded_at) VALUES (1, $1, $2) \
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(fingerprint.to_hex())
        .bind(Utc::now())
        .execute(self.pool())
        .await?;
        self.master_fingerprint()
            .await?
            .ok_or_else(|| StoreError::Corrupt("master key fingerprint not recorded".into()))
    }

    /// Whether any row depends on the master secret: a consent event, a case (or a version,
    /// gene or research row of one), an erasure tombstone, an audit entry (the chain's head
    /// counts too, so a log emptied by hand still counts as written) or an API key.
    pub async fn holds_master_derived_data(&self) -> Result<bool> {
        for table in MASTER_DERIVED {
            let sql = format!("SELECT 1 FROM {table} LIMIT 1");
            if db::query(&sql).fetch_optional(self.pool()).await?.is_some() {
                return Ok(true);
            }
        }
        let head: i64 = db::query("SELECT seq FROM audit_head WHERE id = 1")
            .fetch_one(self.pool())
            .await?
            .try_get("seq")?;
        Ok(head > 0)
    }
}
