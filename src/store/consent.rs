//! Consent history as officers see it, erasure of a patient's record, and receipts.
//!
//! Erasure runs inside the writer's transaction together with the withdrawal it follows
//! from, so there is no instant at which the withdrawal is on file and the record still
//! exists, nor the other way round.

use super::db::{self, Db};
use chrono::{DateTime, Utc};

use super::{Result, StoreError};
use crate::consent::{Decision, Scope};

/// Why consent was withdrawn, as kept in the tombstone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WithdrawalReason {
    PatientRequest,
    RepresentativeRequest,
    ConsentInvalid,
    Other,
}

impl WithdrawalReason {
    pub fn as_str(self) -> &'static str {
        match self {
            WithdrawalReason::PatientRequest => "patient_request",
            WithdrawalReason::RepresentativeRequest => "representative_request",
            WithdrawalReason::ConsentInvalid => "consent_invalid",
            WithdrawalReason::Other => "other",
        }
    }

    pub fn parse_db(s: &str) -> Option<Self> {
        [
            WithdrawalReason::PatientRequest,
            WithdrawalReason::RepresentativeRequest,
            WithdrawalReason::ConsentInvalid,
            WithdrawalReason::Other,
        ]
        .into_iter()
        .find(|r| r.as_str() == s)
    }
}

/// One consent decision on file, with who recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsentRecord {
    pub id: i64,
    pub scope: Scope,
    pub decision: Decision,
    pub given_at: DateTime<Utc>,
    pub form_version: String,
    pub expires_at: Option<DateTime<Utc>>,
    pub recorded_at: DateTime<Utc>,
    /// The recorder's name; `recorder_id` and `recorder_centre` say whose it is (the API
    /// shows it only to the recorder's centre).
    pub recorded_by: String,
    pub recorder_id: i64,
    pub recorder_centre: Option<i64>,
    pub source: String,
}

/// The full consent history of a patient in a registry, in the order recorded.
pub async fn history(
    conn: &mut Db<'_>,
    registry_id: i64,
    pseudonym: &str,
) -> Result<Vec<ConsentRecord>> {
    let rows = db::query(
        "SELECT e.id, e.scope, e.state, e.given_at, e.form_version, e.expires_at, e.recorded_at, \
                p.name, e.source, p.id AS recorder_id, p.centre_id \
         FROM consent_events e JOIN principals p ON p.id = e.recorded_by \
         WHERE e.patient = (SELECT id FROM patient_keys WHERE registry_id = $1 AND pseudonym = $2) \
         ORDER BY e.id",
    )
    .bind(registry_id)
    .bind(pseudonym)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter()
        .map(|r| {
            let scope: String = r.try_get("scope")?;
            let state: String = r.try_get("state")?;
            Ok(ConsentRecord {
                id: r.try_get("id")?,
                scope: Scope::parse_db(&scope)
                    .ok_or_else(|| StoreError::Corrupt("unknown consent scope".into()))?,
                decision: Decision::parse_db(&state)
                    .ok_or_else(|| StoreError::Corrupt("unknown consent state".into()))?,
                given_at: r.try_get("given_at")?,
                form_version: r.try_get("form_version")?,
                expires_at: r.try_get("expires_at")?,
                recorded_at: r.try_get("recorded_at")?,
                recorded_by: r.try_get("name")?,
                source: r.try_get("source")?,
                recorder_id: r.try_get("recorder_id")?,
                recorder_centre: r.try_get("centre_id")?,
            })
        })
        .collect()
}

/// Whether any centre holds a record of this patient in the registry.
pub(in crate::store) async fn has_cases(
    conn: &mut Db<'_>,
    registry_id: i64,
    pseudonym: &str,
) -> Result<bool> {
    let row = db::query(
        "SELECT COUNT(*) AS n FROM cases \
         WHERE patient = (SELECT id FROM patient_keys WHERE registry_id = $1 AND pseudonym = $2)",
    )
    .bind(registry_id)
    .bind(pseudonym)
    .fetch_one(&mut *conn)
    .await?;
    Ok(row.try_get::<i64>("n")? > 0)
}

/// Deletes every case of the patient in the registry with all versions and gene rows.
/// Returns (cases, versions) erased.
pub(in crate::store) async fn erase_patient(
    conn: &mut Db<'_>,
    registry_id: i64,
    pseudonym: &str,
) -> Result<(i64, i64)> {
    let counts = db::query(
        "SELECT COUNT(DISTINCT c.id) AS cases, COUNT(v.version) AS versions FROM cases c \
         LEFT JOIN case_versions v ON v.case_id = c.id \
         WHERE c.patient = (SELECT id FROM patient_keys WHERE registry_id = $1 AND pseudonym = $2)",
    )
    .bind(registry_id)
    .bind(pseudonym)
    .fetch_one(&mut *conn)
    .await?;
    let (cases, versions): (i64, i64) = (counts.try_get("cases")?, counts.try_get("versions")?);
    for sql in [
        "DELETE FROM patients WHERE registry_id = $1 \
         AND patient = (SELECT id FROM patient_keys WHERE registry_id = $1 AND pseudonym = $2)",
        "DELETE FROM case_genes WHERE case_id IN (SELECT id FROM cases WHERE patient = \
         (SELECT id FROM patient_keys WHERE registry_id = $1 AND pseudonym = $2))",
        "DELETE FROM case_phenotypes WHERE case_id IN (SELECT id FROM cases WHERE patient = \
         (SELECT id FROM patient_keys WHERE registry_id = $1 AND pseudonym = $2))",
        "DELETE FROM case_versions WHERE case_id IN (SELECT id FROM cases WHERE patient = \
         (SELECT id FROM patient_keys WHERE registry_id = $1 AND pseudonym = $2))",
        "DELETE FROM cases \
         WHERE patient = (SELECT id FROM patient_keys WHERE registry_id = $1 AND pseudonym = $2)",
    ] {
        db::query(sql)
            .bind(registry_id)
            .bind(pseudonym)
            .execute(&mut *conn)
            .await?;
    }
    Ok((cases, versions))
}

/// A tombstone, as stored and as shown on a receipt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Erasure {
    pub receipt_id: String,
    pub registry_id: i64,
    pub registry_code: String,
    pub pseudonym: String,
    pub erased_at: DateTime<Utc>,
    /// The withdrawing officer's name; `eraser_id` and `eraser_centre` say whose it is.
    pub erased_by: String,
    pub eraser_id: i64,
    pub eraser_centre: Option<i64>,
    pub reason: WithdrawalReason,
    pub cases_erased: i64,
    pub versions_erased: i64,
}

/// Inserts a tombstone; returns its id (the audit entry of the withdrawal covers it).
#[allow(clippy::too_many_arguments)]
pub(in crate::store) async fn insert_erasure(
    conn: &mut Db<'_>,
    receipt_id: &str,
    registry_id: i64,
    pseudonym: &str,
    erased_at: DateTime<Utc>,
    erased_by: i64,
    reason: WithdrawalReason,
    (cases, versions): (i64, i64),
    consent_event_id: i64,
) -> Result<i64> {
    let row = db::query(
        "INSERT INTO erasures (receipt_id, registry_id, pseudonym, erased_at, erased_by, reason, \
                               cases_erased, versions_erased, consent_event_id, audit_seq) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING id",
    )
    .bind(receipt_id)
    .bind(registry_id)
    .bind(pseudonym)
    .bind(erased_at)
    .bind(erased_by)
    .bind(reason.as_str())
    .bind(cases)
    .bind(versions)
    .bind(consent_event_id)
    .bind(super::audit::UNTAGGED)
    .fetch_one(&mut *conn)
    .await?;
    row.try_get("id")
}

pub async fn erasure_by_receipt(conn: &mut Db<'_>, receipt_id: &str) -> Result<Option<Erasure>> {
    let row = db::query(
        "SELECT x.receipt_id, x.registry_id, r.code, x.pseudonym, x.erased_at, p.name, x.reason, \
                x.cases_erased, x.versions_erased, p.id, p.centre_id \
         FROM erasures x JOIN registries r ON r.id = x.registry_id JOIN principals p ON p.id = x.erased_by \
         WHERE x.receipt_id = $1",
    )
    .bind(receipt_id)
    .fetch_optional(&mut *conn)
    .await?;
    row.map(|r| {
        let reason: String = r.try_get("reason")?;
        Ok(Erasure {
            receipt_id: r.try_get("receipt_id")?,
            registry_id: r.try_get("registry_id")?,
            registry_code: r.try_get("code")?,
            pseudonym: r.try_get("pseudonym")?,
            erased_at: r.try_get("erased_at")?,
            erased_by: r.try_get("name")?,
            eraser_id: r.try_get("id")?,
            eraser_centre: r.try_get("centre_id")?,
            reason: WithdrawalReason::parse_db(&reason)
                .ok_or_else(|| StoreError::Corrupt("unknown withdrawal reason".into()))?,
            cases_erased: r.try_get("cases_erased")?,
            versions_erased: r.try_get("versions_erased")?,
        })
    })
    .transpose()
}
