//! Cases: physicians submit, update and read back their own centre's cases.
//!
//! A submission runs in this order: the caller is authenticated (by `api`, through
//! [`Services::authorize`]); [`open`] requires the physician role, a centre, and a
//! registry of the centre's ERNs, and returns the [`CaseAccess`] every other function here
//! takes (no access, no call); `api` converts the request to domain types, reporting all
//! violations at once; only then does [`submit`] derive the pseudonym (rate limited,
//! counted) and hand the write to the writer, which checks consent and commits durably
//! before anything is answered.

use chrono::{DateTime, Utc};

use super::{Call, ServiceError, Services};
use crate::auth::{CentreRef, Principal, Role};
use crate::consent::ConsentDecision;
use crate::domain::{CaseRecord, CodeCatalog, Replacement};
use crate::pseudonym::{PatientIdentity, Pseudonym};
use crate::store::cases;
use crate::store::writer::{Command, SubmitCase, UpdateCase, WriteError};
use crate::store::{Registry, StoreError};

/// A physician's access to one registry: proof that the caller is a physician of a
/// centre that is a member of the registry's ERN. Only [`open`] makes one.
#[derive(Debug, Clone)]
pub struct CaseAccess {
    principal: Principal,
    centre: CentreRef,
    registry: Registry,
}

impl CaseAccess {
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn principal(&self) -> &Principal {
        &self.principal
    }
}

/// Requires that `principal` is a physician of a centre and may act on the registry
/// `registry_code` (a malformed code is a violation of `field`, an unknown one NOT_FOUND,
/// one outside the centre's ERNs PERMISSION_DENIED).
/// Requires the physician role (the web console's form, before any case is read).
pub fn require_physician(principal: &Principal) -> Result<(), ServiceError> {
    Ok(principal.require_role(Role::Physician)?)
}

pub async fn open(
    services: &Services,
    principal: &Principal,
    registry_code: &str,
    field: &str,
    call: &mut Call,
) -> Result<CaseAccess, ServiceError> {
    principal.require_role(Role::Physician)?;
    let centre = principal.require_centre()?.clone();
    let registry = services
        .registry_for(call, principal, registry_code, field)
        .await?;
    Ok(CaseAccess {
        principal: principal.clone(),
        centre,
        registry,
    })
}

/// A new case as submitted: who the patient is, the record, and the consent the
/// physician attests.
pub struct Submission {
    pub identity: PatientIdentity,
    pub record: CaseRecord,
    pub consent: Vec<ConsentDecision>,
}

/// A new version of an existing case of the centre.
pub struct Update {
    pub pseudonym: Pseudonym,
    /// The version the update is based on (optimistic concurrency: ABORTED if stale).
    pub expected_version: i64,
    pub record: CaseRecord,
    pub consent: Vec<ConsentDecision>,
}

/// What a submission or an update stored.
#[derive(Debug, Clone)]
pub struct Stored {
    pub pseudonym: Pseudonym,
    pub version: i64,
    pub recorded_at: DateTime<Utc>,
    /// Codes stored as another (obsolete HPO terms as their replacement), with why.
    pub replaced: Vec<Replacement>,
    /// The code releases the record was checked against ('' : format checks only).
    pub code_releases: String,
}

/// Checks `record` against the code releases in force (`domain::CodeCatalog`): unknown
/// and obsolete codes are violations of their field (under `record.`), with a hint;
/// obsolete HPO terms with a replacement are replaced. Returns the row to store, which
/// keeps the releases' versions, and the replacements made.
fn check_codes(
    catalog: &CodeCatalog,
    mut record: CaseRecord,
) -> Result<(cases::CaseRow, Vec<Replacement>), ServiceError> {
    let replaced = catalog
        .check(&mut record)
        .map_err(|v| ServiceError::Invalid(v.nest("record")))?;
    let mut row = cases::to_row(&record);
    row.code_releases = Some(catalog.versions());
    Ok((row, replaced))
}

/// A case of the caller's centre as read back: versions oldest first, the last current.
#[derive(Debug, Clone)]
pub struct CaseView {
    pub pseudonym: Pseudonym,
    pub centre_code: String,
    pub country: String,
    pub versions: Vec<VersionView>,
}

#[derive(Debug, Clone)]
pub struct VersionView {
    pub version: i64,
    pub recorded_at: DateTime<Utc>,
    pub recorded_by: String,
    pub record: CaseRecord,
    /// The code releases the version was checked against ('' : format checks only;
    /// `None`: stored before code releases existed).
    pub code_releases: Option<String>,
}

/// Submits a new case: derives the pseudonym (the identity is dropped right after), then
/// the writer checks consent (attested plus on file) and that the centre has no case of
/// the patient yet, and commits the case, version 1 and the consent events.
pub async fn submit(
    services: &Services,
    access: &CaseAccess,
    submission: Submission,
    call: &mut Call,
) -> Result<Stored, ServiceError> {
    let Submission {
        identity,
        record,
        consent,
    } = submission;
    // Checked before the pseudonym is derived: only a valid request derives one.
    let codes = services.codes.get();
    let (row, replaced) = check_codes(&codes, record)?;
    let pseudonym = services
        .derive_pseudonym(&access.principal, &access.registry, &identity)
        .await?;
    drop(identity);
    let command = Command::Submit(SubmitCase {
        registry_id: access.registry.id,
        pseudonym: pseudonym.as_str().to_owned(),
        centre_id: access.centre.id,
        principal_id: access.principal.id,
        consent,
        row,
        // To the millisecond, as it is stored: decided on what is kept.
        now: super::consent::now_millis(services),
    });
    match services.write_case(command, call).await {
        Ok(written) => Ok(Stored {
            pseudonym,
            version: written.version,
            recorded_at: written.recorded_at,
            replaced,
            code_releases: codes.versions(),
        }),
        Err(WriteError::AlreadyExists) => Err(ServiceError::CaseExists {
            registry: access.registry.code.clone(),
            pseudonym: pseudonym.as_str().to_owned(),
        }),
        Err(e) => Err(e.into()),
    }
}

/// Stores a new version of a case of the caller's centre.
pub async fn update(
    services: &Services,
    access: &CaseAccess,
    update: Update,
    call: &mut Call,
) -> Result<Stored, ServiceError> {
    let codes = services.codes.get();
    let (row, replaced) = check_codes(&codes, update.record)?;
    let command = Command::Update(UpdateCase {
        registry_id: access.registry.id,
        pseudonym: update.pseudonym.as_str().to_owned(),
        centre_id: access.centre.id,
        principal_id: access.principal.id,
        expected_version: update.expected_version,
        consent: update.consent,
        row,
        // To the millisecond, as it is stored: decided on what is kept.
        now: super::consent::now_millis(services),
    });
    match services.write_case(command, call).await {
        Ok(written) => Ok(Stored {
            pseudonym: update.pseudonym,
            version: written.version,
            recorded_at: written.recorded_at,
            replaced,
            code_releases: codes.versions(),
        }),
        Err(WriteError::NotFound) => Err(ServiceError::NotFound(format!(
            "no case of your centre with this pseudonym in {}",
            access.registry.code
        ))),
        Err(e) => Err(e.into()),
    }
}

/// Reads a case of the caller's centre, filtered on REGISTRY_INCLUSION in force now in
/// the same statement. No case, another centre's case and no consent all answer the same
/// NOT_FOUND.
pub async fn get(
    services: &Services,
    access: &CaseAccess,
    pseudonym: Pseudonym,
    include_history: bool,
) -> Result<CaseView, ServiceError> {
    let mut conn = services.store.reader().await?;
    let stored = cases::get_case(
        &mut conn.db(),
        access.registry.id,
        pseudonym.as_str(),
        access.centre.id,
        services.clock.now(),
        include_history,
    )
    .await?
    .ok_or_else(|| {
        ServiceError::NotFound(format!(
            "no case of your centre with this pseudonym in {} (or no REGISTRY_INCLUSION consent in force)",
            access.registry.code
        ))
    })?;
    let versions = stored
        .versions
        .iter()
        .map(|v| {
            Ok(VersionView {
                version: v.version,
                recorded_at: v.recorded_at,
                recorded_by: v.recorded_by.clone(),
                record: cases::from_row(&v.row)?,
                code_releases: v.row.code_releases.clone(),
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    Ok(CaseView {
        pseudonym,
        centre_code: stored.centre_code,
        country: stored.country,
        versions,
    })
}

/// Phenopackets per export page, when the caller names no size, and at most.
pub const EXPORT_PAGE_DEFAULT: u32 = 50;
pub const EXPORT_PAGE_MAX: u32 = 200;

/// Export pages one principal reads from the database at once; its further export calls
/// wait for a turn (within their deadline). A page holds a connection of the database
/// pool while it walks up to 201 current cases: without turns, one principal's calls in
/// flight (64) could take the whole pool (16; `docs/security.md`).
pub const EXPORTS_AT_ONCE: u32 = 2;

/// A page of an export, and whether another follows.
#[derive(Debug, Clone)]
pub struct ExportPage {
    pub cases: Vec<Exported>,
    pub more: bool,
}

/// One case of an export page: its pseudonym and current version.
#[derive(Debug, Clone)]
pub struct Exported {
    pub pseudonym: String,
    pub version: VersionView,
}

/// A page of the caller's centre's cases in the registry, current versions only, by
/// pseudonym after `after` ('' : the first page). The same cases [`get`] reads: of the
/// caller's centre, REGISTRY_INCLUSION in force now (filtered in the statement). The
/// call's audit entry counts the cases returned.
pub async fn export(
    services: &Services,
    access: &CaseAccess,
    after: &str,
    page_size: u32,
    call: &mut Call,
) -> Result<ExportPage, ServiceError> {
    let _turn = services.exports.enter(access.principal.id).await;
    let mut conn = services.store.pool().acquire().await?;
    // One more than the page: whether another page follows, so that the last page never
    // carries a token that leads to an empty one.
    let mut rows = cases::list_current(
        &mut conn.db(),
        access.registry.id,
        access.centre.id,
        services.clock.now(),
        after,
        i64::from(page_size) + 1,
    )
    .await?;
    let more = rows.len() > page_size as usize;
    rows.truncate(page_size as usize);
    call.items(rows.len());
    let cases = rows
        .into_iter()
        .map(|(pseudonym, v)| {
            Ok(Exported {
                pseudonym,
                version: VersionView {
                    version: v.version,
                    recorded_at: v.recorded_at,
                    recorded_by: v.recorded_by,
                    record: cases::from_row(&v.row)?,
                    code_releases: v.row.code_releases,
                },
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    Ok(ExportPage { cases, more })
}

impl CaseAccess {
    /// Code of the caller's centre.
    pub fn centre_code(&self) -> &str {
        &self.centre.code
    }
}
