//! Case records and consent history in SQL.
//!
//! Writes here run inside the writer's transaction and are called only by
//! [`super::writer`]. Reads filter on consent in force *in the same statement* that
//! fetches clinical data, so there is no step between "is consent in force?" and "read the
//! row" in which a withdrawal could slip.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::db::{self, Db, Row};
use chrono::{DateTime, Utc};

use super::{ROWS_PER_STATEMENT, Result, StoreError, consent_model};
use crate::consent::{ConsentDecision, ConsentEvent, Decision, Scope, Source};
use crate::domain::{
    CaseRecord, DomainError, FindingInput, Onset, OnsetKind, PartialDate, PatientStatus,
    RecordInput, Sex,
};

/// A case record as stored: plain column values. Built from and turned back into the
/// domain `CaseRecord` by `crate::store::cases::{to_row, from_row}`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CaseRow {
    pub birth_year_month: String,
    pub sex: String,
    pub status: String,
    pub date_of_death: Option<String>,
    pub first_contact_date: Option<String>,
    pub onset_kind: String,
    pub onset_date: Option<String>,
    pub undiagnosed: bool,
    pub orphacode: Option<i64>,
    pub diagnosis_date: Option<String>,
    pub icd10: String,
    pub icd11: String,
    pub omim: String,
    pub hpo_terms: String,
    pub icf_codes: String,
    pub genetic_findings: String,
    pub genes: Vec<String>,
    pub diagnosis_year: Option<i64>,
    pub onset_age_days: Option<i64>,
    pub diagnosis_age_days: Option<i64>,
    pub delay_days: Option<i64>,
    /// The delay in whole calendar months (`CaseRecord::delay_months`): what research
    /// answers band. `None` also for a version stored before it was kept, until the
    /// start-up fills it in (`research_index::fill_delay_months`).
    pub delay_months: Option<i64>,
    /// The code releases the record was checked against (`CodeCatalog::versions`): ''
    /// for format checks only; `None` for a version stored before code releases existed.
    pub code_releases: Option<String>,
}

/// One stored version of a case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredVersion {
    pub version: i64,
    pub recorded_at: DateTime<Utc>,
    pub recorded_by: String,
    pub row: CaseRow,
}

/// A case of one centre as read back, versions oldest first (the last is current).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredCase {
    pub centre_code: String,
    pub country: String,
    pub versions: Vec<StoredVersion>,
}

/// The consent history of a patient in a registry.
pub async fn load_consent(
    conn: &mut Db<'_>,
    registry_id: i64,
    pseudonym: &str,
) -> Result<Vec<ConsentEvent>> {
    let rows = db::query(
        "SELECT id, scope, state, given_at, expires_at FROM consent_events \
         WHERE patient = (SELECT id FROM patient_keys WHERE registry_id = $1 AND pseudonym = $2) \
         ORDER BY id",
    )
    .bind(registry_id)
    .bind(pseudonym)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter().map(event_from_row).collect()
}

/// A `consent_events` row's columns `id, scope, state, given_at, expires_at`.
fn event_from_row(r: &Row) -> Result<ConsentEvent> {
    let scope: String = r.try_get("scope")?;
    let state: String = r.try_get("state")?;
    Ok(ConsentEvent {
        seq: r.try_get("id")?,
        scope: Scope::parse_db(&scope)
            .ok_or_else(|| StoreError::Corrupt("unknown consent scope".into()))?,
        decision: Decision::parse_db(&state)
            .ok_or_else(|| StoreError::Corrupt("unknown consent state".into()))?,
        given_at: r.try_get("given_at")?,
        expires_at: r.try_get("expires_at")?,
    })
}

/// The patients of `patients` grouped by registry, in chunks of at most
/// [`ROWS_PER_STATEMENT`] pseudonyms (one `IN` list each).
fn by_registry<'a>(conn: &Db<'_>, patients: &[(i64, &'a str)]) -> Vec<(i64, Vec<&'a str>)> {
    let mut grouped: BTreeMap<i64, Vec<&'a str>> = BTreeMap::new();
    for &(registry_id, pseudonym) in patients {
        grouped.entry(registry_id).or_default().push(pseudonym);
    }
    grouped
        .into_iter()
        .flat_map(|(registry_id, pseudonyms)| {
            conn.chunks(&pseudonyms, ROWS_PER_STATEMENT)
                .into_iter()
                .map(|chunk| (registry_id, chunk.to_vec()))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// A list of pseudonyms (`IN (...)`, or one array on PostgreSQL).
const PSEUDONYMS: db::List = db::List(db::Ty::Text);

/// Runs `sql(list)`, a statement about one registry (`$1`) and a list of its pseudonyms
/// (`list`, from `$2`), once per registry and chunk of `patients`; returns each row with
/// its registry id.
async fn by_pseudonyms(
    conn: &mut Db<'_>,
    patients: &[(i64, &str)],
    sql: impl Fn(&str) -> String,
) -> Result<Vec<(i64, Row)>> {
    let mut out = Vec::new();
    for (registry_id, pseudonyms) in by_registry(conn, patients) {
        let sql = sql(&PSEUDONYMS.sql(conn, 2, pseudonyms.len()));
        let mut query = db::query(&sql)
            .persistent(PSEUDONYMS.keeps(conn, pseudonyms.len()))
            .bind(registry_id);
        for pseudonym in &pseudonyms {
            query = query.bind(*pseudonym);
        }
        let query = query.list(conn, 2, &PSEUDONYMS)?;
        for row in query.fetch_all(&mut *conn).await? {
            out.push((registry_id, row));
        }
    }
    Ok(out)
}

/// The patient numbers of several patients (registry id, pseudonym), by the same key:
/// for those new to the registry a `patient_keys` row made now (migration 0019: the number
/// every other table keys a patient by, given in order of first write), and those on file
/// as they are. One multi-row `INSERT` per chunk that makes the new ones and passes over
/// the others (`ON CONFLICT DO NOTHING`), then one statement per registry and chunk to
/// find the others, only if there are any: a batch of new patients takes one statement,
/// not two. (On PostgreSQL a row passed over still takes a number from the identity
/// sequence: numbers only grow, with gaps.)
pub(in crate::store) async fn patient_keys_many(
    conn: &mut Db<'_>,
    patients: &[(i64, &str)],
) -> Result<HashMap<(i64, String), i64>> {
    let mut keys: HashMap<(i64, String), i64> = HashMap::with_capacity(patients.len());
    let mut seen = HashSet::new();
    let distinct: Vec<(i64, &str)> = patients
        .iter()
        .copied()
        .filter(|&patient| seen.insert(patient))
        .collect();
    use db::Ty::{Int, Text};
    const ROWS: db::Rows = db::Rows::of(&[Int, Text]);
    for chunk in conn.chunks(&distinct, ROWS_PER_STATEMENT) {
        let sql = format!(
            "INSERT INTO patient_keys (registry_id, pseudonym) {} \
             ON CONFLICT (registry_id, pseudonym) DO NOTHING \
             RETURNING id, registry_id, pseudonym",
            ROWS.sql(conn, chunk.len())
        );
        let mut query = db::query(&sql).persistent(ROWS.keeps(conn, chunk.len()));
        for (registry_id, pseudonym) in chunk {
            query = query.bind(*registry_id).bind(*pseudonym);
        }
        let query = query.rows(conn, &ROWS)?;
        for row in query.fetch_all(&mut *conn).await? {
            keys.insert(
                (row.try_get("registry_id")?, row.try_get("pseudonym")?),
                row.try_get("id")?,
            );
        }
    }
    let on_file: Vec<(i64, &str)> = distinct
        .into_iter()
        .filter(|&(r, p)| !keys.contains_key(&(r, p.to_owned())))
        .collect();
    if on_file.is_empty() {
        return Ok(keys);
    }
    let found = by_pseudonyms(conn, &on_file, |list| {
        format!(
            "SELECT id, pseudonym FROM patient_keys WHERE registry_id = $1 AND pseudonym {list}"
        )
    })
    .await?;
    for (registry_id, row) in found {
        keys.insert((registry_id, row.try_get("pseudonym")?), row.try_get("id")?);
    }
    Ok(keys)
}

/// The patient number of one patient, made now if they have none ([`patient_keys_many`]).
pub(in crate::store) async fn patient_key(
    conn: &mut Db<'_>,
    registry_id: i64,
    pseudonym: &str,
) -> Result<i64> {
    patient_keys_many(conn, &[(registry_id, pseudonym)])
        .await?
        .remove(&(registry_id, pseudonym.to_owned()))
        .ok_or_else(|| StoreError::Corrupt("a patient key was made but not returned".into()))
}

/// The consent histories of several patients (registry id, pseudonym), each oldest event
/// first as [`load_consent`] gives it (patients with no history are absent), and the
/// (registry id, pseudonym, centre id) of every case they have, and each registry's
/// active key version: what a run of submissions is decided on, in one statement per
/// registry and chunk (one round trip on PostgreSQL, not three).
pub(in crate::store) async fn consent_and_cases_many(
    conn: &mut Db<'_>,
    patients: &[(i64, &str)],
) -> Result<OnFile> {
    let mut on_file = OnFile::default();
    // Kind 0: a consent event (ordered by its id); 1: a case, by its centre; 2: the
    // registry's active key version (in the id column), read in the same statement rather
    // than in a round trip of its own.
    let found = by_pseudonyms(conn, patients, |list| {
        format!(
            "SELECT 0 AS kind, k.pseudonym, e.id, e.scope, e.state, e.given_at, e.expires_at, \
                    0 AS centre_id \
             FROM patient_keys k JOIN consent_events e ON e.patient = k.id \
             WHERE k.registry_id = $1 AND k.pseudonym {list} \
             UNION ALL \
             SELECT 1, k.pseudonym, 0, '', '', NULL, NULL, c.centre_id \
             FROM patient_keys k JOIN cases c ON c.patient = k.id \
             WHERE k.registry_id = $1 AND k.pseudonym {list} \
             UNION ALL \
             SELECT 2, '', r.active_key_version, '', '', NULL, NULL, 0 \
             FROM registries r WHERE r.id = $1 \
             ORDER BY 1, 3"
        )
    })
    .await?;
    for (registry_id, row) in found {
        match row.try_get::<i64>("kind")? {
            0 => on_file
                .histories
                .entry((registry_id, row.try_get("pseudonym")?))
                .or_default()
                .push(event_from_row(&row)?),
            1 => {
                on_file.cases.insert((
                    registry_id,
                    row.try_get("pseudonym")?,
                    row.try_get("centre_id")?,
                ));
            }
            _ => {
                on_file.key_versions.insert(registry_id, row.try_get("id")?);
            }
        }
    }
    Ok(on_file)
}

/// What [`consent_and_cases_many`] found.
#[derive(Debug, Default)]
pub(in crate::store) struct OnFile {
    /// The consent history of each patient with one.
    pub histories: HashMap<(i64, String), Vec<ConsentEvent>>,
    /// (registry, pseudonym, centre) of each case.
    pub cases: HashSet<(i64, String, i64)>,
    /// The active key version of each registry asked about.
    pub key_versions: HashMap<i64, i64>,
}

/// A registry's active key version, read in the caller's transaction.
pub(in crate::store) async fn active_key_version(
    conn: &mut Db<'_>,
    registry_id: i64,
) -> Result<Option<i64>> {
    db::query("SELECT active_key_version FROM registries WHERE id = $1")
        .bind(registry_id)
        .fetch_optional(&mut *conn)
        .await?
        .map(|r| r.try_get("active_key_version"))
        .transpose()
}

/// A decision to append to a patient's history, for [`append_consent_many`].
pub(in crate::store) struct NewDecision<'a> {
    pub registry_id: i64,
    pub pseudonym: &'a str,
    /// The patient's number ([`patient_keys_many`]).
    pub patient: i64,
    pub decision: &'a ConsentDecision,
    pub recorded_by: i64,
    pub source: Source,
    pub now: DateTime<Utc>,
}

/// [`append_consent`] for many decisions at once: one multi-row `INSERT` per chunk into
/// the history, one into `consent_current`. Returns the ids in the order of `decisions`.
///
/// No two decisions may share (registry, patient, scope): the ids come back from
/// `RETURNING` in no promised order and are paired with the decisions by that key, and
/// one upsert may not touch a `consent_current` row twice. (An attestation names each
/// scope at most once, and the writer puts one command per patient in a run.)
pub(in crate::store) async fn append_consent_many(
    conn: &mut Db<'_>,
    decisions: &[NewDecision<'_>],
) -> Result<Vec<i64>> {
    use db::Ty::{Int, Text, Time};
    const ROWS: db::Rows = db::Rows::of(&[
        Int, Int, Text, Text, Text, Time, Text, Time, Int, Time, Text, Int,
    ]);
    // On PostgreSQL the current decisions follow in the same statement, a data-modifying
    // `WITH` (one round trip, not two); on SQLite, which has none, in a second statement
    // on the writer's own connection (no round trip).
    let together = matches!(conn, Db::Pg(_));
    let mut ids = Vec::with_capacity(decisions.len());
    for chunk in conn.chunks(decisions, ROWS_PER_STATEMENT) {
        let insert = format!(
            "INSERT INTO consent_events (patient, registry_id, pseudonym, scope, state, given_at, \
                                         form_version, expires_at, recorded_by, recorded_at, source, \
                                         audit_seq) \
             {}",
            ROWS.sql(conn, chunk.len())
        );
        let sql = if together {
            format!(
                "WITH ev AS ({insert} RETURNING id, patient, registry_id, pseudonym, scope, state, \
                                                given_at, expires_at), \
                      cur AS ({}) \
                 SELECT id, registry_id, pseudonym, scope FROM ev",
                consent_model::current_of_inserted("ev")
            )
        } else {
            format!("{insert} RETURNING id, registry_id, pseudonym, scope")
        };
        let mut query = db::query(&sql).persistent(ROWS.keeps(conn, chunk.len()));
        for d in chunk {
            query = query
                .bind(d.patient)
                .bind(d.registry_id)
                .bind(d.pseudonym)
                .bind(d.decision.scope.as_str())
                .bind(d.decision.decision.as_str())
                .bind(d.decision.given_at)
                .bind(d.decision.form_version.as_str())
                .bind(d.decision.expires_at)
                .bind(d.recorded_by)
                .bind(d.now)
                .bind(d.source.as_str())
                .bind(super::audit::UNTAGGED);
        }
        let query = query.rows(conn, &ROWS)?;
        let mut returned: HashMap<(i64, String, String), i64> = HashMap::new();
        for row in query.fetch_all(&mut *conn).await? {
            let key = (
                row.try_get("registry_id")?,
                row.try_get("pseudonym")?,
                row.try_get("scope")?,
            );
            if returned.insert(key, row.try_get("id")?).is_some() {
                return Err(StoreError::Corrupt(
                    "two consent decisions of one scope for one patient in a run".into(),
                ));
            }
        }
        let mut current = Vec::with_capacity(chunk.len());
        for d in chunk {
            let key = (
                d.registry_id,
                d.pseudonym.to_owned(),
                d.decision.scope.as_str().to_owned(),
            );
            let id = returned.get(&key).copied().ok_or_else(|| {
                StoreError::Corrupt("an inserted consent decision came back without its id".into())
            })?;
            ids.push(id);
            current.push((d.patient, d.registry_id, d.pseudonym, id, d.decision));
        }
        if !together {
            consent_model::record_current_many(conn, &current).await?;
        }
    }
    Ok(ids)
}

/// A new case, for [`insert_cases_many`].
pub(in crate::store) struct NewCase<'a> {
    pub registry_id: i64,
    pub pseudonym: &'a str,
    /// The patient's number ([`patient_keys_many`]).
    pub patient: i64,
    pub centre_id: i64,
    pub recorded_by: i64,
    pub row: &'a CaseRow,
    pub now: DateTime<Utc>,
}

/// [`insert_case`] for many cases at once (each at version 1): one multi-row `INSERT` per
/// table and chunk. Returns the case ids in the order of `cases`, paired by the table's
/// unique key (registry, patient, centre).
pub(in crate::store) async fn insert_cases_many(
    conn: &mut Db<'_>,
    cases: &[NewCase<'_>],
) -> Result<Vec<i64>> {
    use db::Ty::{Int, Text, Time};
    // current_version is 1.
    const ROWS: db::Rows = db::Rows::with_template(
        &[Int, Int, Text, Int, Time, Time],
        "{0}, {1}, {2}, {3}, 1, {4}, {5}",
    );
    let mut ids = Vec::with_capacity(cases.len());
    for chunk in conn.chunks(cases, ROWS_PER_STATEMENT) {
        let sql = format!(
            "INSERT INTO cases (patient, registry_id, pseudonym, centre_id, current_version, \
                                created_at, updated_at) \
             {} RETURNING id, registry_id, pseudonym, centre_id",
            ROWS.sql(conn, chunk.len())
        );
        let mut query = db::query(&sql).persistent(ROWS.keeps(conn, chunk.len()));
        for c in chunk {
            query = query
                .bind(c.patient)
                .bind(c.registry_id)
                .bind(c.pseudonym)
                .bind(c.centre_id)
                .bind(c.now)
                .bind(c.now);
        }
        let query = query.rows(conn, &ROWS)?;
        let mut returned: HashMap<(i64, String, i64), i64> = HashMap::new();
        for row in query.fetch_all(&mut *conn).await? {
            returned.insert(
                (
                    row.try_get("registry_id")?,
                    row.try_get("pseudonym")?,
                    row.try_get("centre_id")?,
                ),
                row.try_get("id")?,
            );
        }
        let mut versions = Vec::with_capacity(chunk.len());
        for c in chunk {
            let id = returned
                .get(&(c.registry_id, c.pseudonym.to_owned(), c.centre_id))
                .copied()
                .ok_or_else(|| {
                    StoreError::Corrupt("an inserted case came back without its id".into())
                })?;
            ids.push(id);
            versions.push((id, c));
        }
        insert_first_versions(conn, &versions).await?;
    }
    Ok(ids)
}

/// Version 1 of each new case, and its genes: one multi-row `INSERT` per table.
async fn insert_first_versions(conn: &mut Db<'_>, cases: &[(i64, &NewCase<'_>)]) -> Result<()> {
    use db::Ty::{Bool, Int, Text, Time};
    const ROWS: db::Rows = db::Rows::of(&[
        Int, Int, Time, Int, Text, Text, Text, Text, Text, Text, Text, Bool, Int, Text, Text, Text,
        Text, Text, Text, Text, Int, Int, Int, Int, Int, Text,
    ]);
    let sql = format!(
        "INSERT INTO case_versions (case_id, version, recorded_at, recorded_by, birth_year_month, \
             sex, status, date_of_death, first_contact_date, onset_kind, onset_date, undiagnosed, \
             orphacode, diagnosis_date, icd10, icd11, omim, hpo_terms, icf_codes, \
             genetic_findings, diagnosis_year, onset_age_days, diagnosis_age_days, delay_days, \
             delay_months, code_releases) \
         {}",
        ROWS.sql(conn, cases.len())
    );
    // On PostgreSQL the terms and genes go in the same statement (a data-modifying
    // `WITH`), one round trip instead of three; as arrays, so that the statement's text
    // depends on the number of versions only and stays prepared. Their parameters come
    // after the versions' (`db::Query::bind_array`).
    let together = matches!(conn, Db::Pg(_));
    let sql = if together {
        let before = if conn.arrays_for(cases.len()) {
            ROWS.types.len()
        } else {
            ROWS.types.len() * cases.len()
        };
        let [a, b, c, d] = [before + 1, before + 2, before + 3, before + 4];
        format!(
            "WITH terms AS (INSERT INTO case_phenotypes (case_id, version, term) \
                            SELECT u.case_id, 1, u.term \
                            FROM UNNEST(${a}::bigint[], ${b}::text[]) AS u(case_id, term)), \
                  genes AS (INSERT INTO case_genes (case_id, version, gene) \
                            SELECT u.case_id, 1, u.gene \
                            FROM UNNEST(${c}::bigint[], ${d}::text[]) AS u(case_id, gene)) \
             {sql}"
        )
    } else {
        sql
    };
    let mut query = db::query(&sql).persistent(ROWS.keeps(conn, cases.len()));
    for (case_id, c) in cases {
        let row = c.row;
        query = query
            .bind(*case_id)
            .bind(1_i64)
            .bind(c.now)
            .bind(c.recorded_by)
            .bind(row.birth_year_month.as_str())
            .bind(row.sex.as_str())
            .bind(row.status.as_str())
            .bind(row.date_of_death.as_deref())
            .bind(row.first_contact_date.as_deref())
            .bind(row.onset_kind.as_str())
            .bind(row.onset_date.as_deref())
            .bind(row.undiagnosed)
            .bind(row.orphacode)
            .bind(row.diagnosis_date.as_deref())
            .bind(row.icd10.as_str())
            .bind(row.icd11.as_str())
            .bind(row.omim.as_str())
            .bind(row.hpo_terms.as_str())
            .bind(row.icf_codes.as_str())
            .bind(row.genetic_findings.as_str())
            .bind(row.diagnosis_year)
            .bind(row.onset_age_days)
            .bind(row.diagnosis_age_days)
            .bind(row.delay_days)
            .bind(row.delay_months)
            .bind(row.code_releases.as_deref());
    }
    let query = query.rows(conn, &ROWS)?;
    // The HPO terms too, for research questions along the ontology (the reference SQL),
    // as `insert_version` writes them.
    let terms: Vec<(i64, &str)> = cases
        .iter()
        .flat_map(|(case_id, c)| {
            c.row
                .hpo_terms
                .split(' ')
                .filter(|t| !t.is_empty())
                .map(move |t| (*case_id, t))
        })
        .collect();
    let genes: Vec<(i64, &str)> = cases
        .iter()
        .flat_map(|(case_id, c)| c.row.genes.iter().map(move |g| (*case_id, g.as_str())))
        .collect();
    if together {
        return query
            .bind_array(conn, db::Ty::Int, terms.iter().map(|t| t.0))?
            .bind_array(conn, db::Ty::Text, terms.iter().map(|t| t.1))?
            .bind_array(conn, db::Ty::Int, genes.iter().map(|g| g.0))?
            .bind_array(conn, db::Ty::Text, genes.iter().map(|g| g.1))?
            .execute(&mut *conn)
            .await
            .map(|_| ());
    }
    query.execute(&mut *conn).await?;
    insert_first_version_values(conn, "case_phenotypes", "term", &terms).await?;
    insert_first_version_values(conn, "case_genes", "gene", &genes).await
}

/// Appends one decision to the patient's consent history; returns its id.
pub(in crate::store) async fn append_consent(
    conn: &mut Db<'_>,
    registry_id: i64,
    pseudonym: &str,
    decision: &ConsentDecision,
    recorded_by: i64,
    source: Source,
    now: DateTime<Utc>,
) -> Result<i64> {
    let patient = patient_key(conn, registry_id, pseudonym).await?;
    let row = db::query(
        "INSERT INTO consent_events (patient, registry_id, pseudonym, scope, state, given_at, \
                                     form_version, expires_at, recorded_by, recorded_at, source, \
                                     audit_seq) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) RETURNING id",
    )
    .bind(patient)
    .bind(registry_id)
    .bind(pseudonym)
    .bind(decision.scope.as_str())
    .bind(decision.decision.as_str())
    .bind(decision.given_at)
    .bind(decision.form_version.as_str())
    .bind(decision.expires_at)
    .bind(recorded_by)
    .bind(now)
    .bind(source.as_str())
    .bind(super::audit::UNTAGGED)
    .fetch_one(&mut *conn)
    .await?;
    let id: i64 = row.try_get("id")?;
    // Keep the decision in force per scope (what expertise searches read) in step.
    consent_model::record_current(conn, patient, registry_id, pseudonym, id, decision).await?;
    Ok(id)
}

/// Sets the research eligibility of the patient's research row (if it has one): what
/// the consent rules make of the decisions in force (`store::writer::ConsentRules`).
pub(in crate::store) async fn set_eligibility(
    conn: &mut Db<'_>,
    registry_id: i64,
    pseudonym: &str,
    eligible: bool,
    until: Option<DateTime<Utc>>,
) -> Result<()> {
    db::query(
        "UPDATE patients SET eligible = $1, eligible_until = $2 \
         WHERE registry_id = $3 \
           AND patient = (SELECT id FROM patient_keys WHERE registry_id = $3 AND pseudonym = $4)",
    )
    .bind(eligible)
    .bind(until)
    .bind(registry_id)
    .bind(pseudonym)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// What represents a patient in research counts: a version of one of their cases, and
/// their research eligibility (as the writer's `ConsentRules` give it).
pub struct Representative<'a> {
    pub case_id: i64,
    pub version: i64,
    pub centre_id: i64,
    pub row: &'a CaseRow,
    pub eligible: bool,
    pub eligible_until: Option<DateTime<Utc>>,
}

/// A patient's research row on file: the case it represents stays (a new version of that
/// case takes its place), and only the eligibility, the patient's consent, is what was
/// just written. So the case that first entered the registry represents the patient, and
/// another centre's case, new or updated, changes nothing of it but the eligibility its
/// attestation gives: were it to take the row's place, a physician submitting a case for
/// a patient another centre treats, and a researcher asking before and after, would read
/// that centre's record off the difference (a privacy audit did, 7 of 7 patients).
static ON_FILE: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    const OF_THE_CASE: [&str; 13] = [
        "version",
        "centre_id",
        "country",
        "orphacode",
        "sex",
        "status",
        "diagnosis_year",
        "onset_age_days",
        "diagnosis_age_days",
        "delay_days",
        "delay_months",
        "genes",
        "phenotypes",
    ];
    let kept: Vec<String> = OF_THE_CASE
        .iter()
        .map(|c| {
            format!(
                "{c} = CASE WHEN patients.case_id = excluded.case_id \
                 THEN excluded.{c} ELSE patients.{c} END"
            )
        })
        .collect();
    format!(
        "ON CONFLICT (registry_id, patient) DO UPDATE SET {}, \
         eligible = excluded.eligible, eligible_until = excluded.eligible_until",
        kept.join(", ")
    )
});

/// Makes `r` (just written) what represents the patient in research counts, unless
/// another case of theirs does ([`ON_FILE`]); their eligibility either way.
pub(in crate::store) async fn set_representative(
    conn: &mut Db<'_>,
    registry_id: i64,
    pseudonym: &str,
    r: Representative<'_>,
) -> Result<()> {
    // A new row's slot ([`slots_at_insert`]): the largest in use plus one. A row on file
    // keeps its own (not updated below).
    let sql = format!(
        "INSERT INTO patients (registry_id, patient, pseudonym, case_id, version, centre_id, \
                               country, orphacode, sex, status, diagnosis_year, onset_age_days, \
                               diagnosis_age_days, delay_days, delay_months, eligible, \
                               eligible_until, genes, phenotypes, slot) \
         VALUES ($1, (SELECT id FROM patient_keys WHERE registry_id = $1 AND pseudonym = $2), \
                 $2, $3, $4, $5, (SELECT country FROM centres WHERE id = $5), $6, $7, $8, \
                 $9, $10, $11, $12, $13, $14, $15, $16, $17, {slot}) \
         {on_file}",
        on_file = *ON_FILE,
        slot = if slots_at_insert(conn) {
            "(SELECT COALESCE(MAX(slot) + 1, 0) FROM patients WHERE registry_id = $1)"
        } else {
            "NULL"
        }
    );
    let query = db::query(&sql).bind(registry_id).bind(pseudonym);
    bind_representative(query, &r).execute(&mut *conn).await?;
    Ok(())
}

/// Rows `(case_id, 1, value)` of a table of a version's values (`case_genes`,
/// `case_phenotypes`): one multi-row `INSERT` per chunk. `table` and `column` are
/// literals of the callers, never input.
async fn insert_first_version_values(
    conn: &mut Db<'_>,
    table: &str,
    column: &str,
    values: &[(i64, &str)],
) -> Result<()> {
    // Version 1.
    const ROWS: db::Rows = db::Rows::with_template(&[db::Ty::Int, db::Ty::Text], "{0}, 1, {1}");
    for chunk in conn.chunks(values, ROWS_PER_STATEMENT) {
        let sql = format!(
            "INSERT INTO {table} (case_id, version, {column}) {}",
            ROWS.sql(conn, chunk.len())
        );
        let mut query = db::query(&sql).persistent(ROWS.keeps(conn, chunk.len()));
        for (case_id, value) in chunk {
            query = query.bind(*case_id).bind(*value);
        }
        query.rows(conn, &ROWS)?.execute(&mut *conn).await?;
    }
    Ok(())
}

/// Whether a research row gets its slot (`research_index`) in the statement that inserts
/// it: on SQLite, where one writer at a time holds the database's write lock from the
/// start of its transaction, so the largest slot in use plus one is free to the commit.
/// Not on PostgreSQL, whose writers, of every instance, run side by side: there
/// `research_index::log_changes` gives slots at the end of the transaction, under the
/// change counter's lock (as it does for any row still without one).
pub(in crate::store) fn slots_at_insert(conn: &Db<'_>) -> bool {
    !matches!(conn, Db::Pg(_))
}

/// The first free slot of each of `registries`, the largest in use plus one, for rows
/// inserted with their slots ([`slots_at_insert`]).
pub(in crate::store) async fn next_slots(
    conn: &mut Db<'_>,
    registries: impl IntoIterator<Item = i64>,
) -> Result<HashMap<i64, i64>> {
    let mut next = HashMap::new();
    for registry_id in registries {
        let row = db::query(
            "SELECT COALESCE(MAX(slot) + 1, 0) AS next FROM patients WHERE registry_id = $1",
        )
        .bind(registry_id)
        .fetch_one(&mut *conn)
        .await?;
        next.insert(registry_id, row.try_get("next")?);
    }
    Ok(next)
}

/// [`set_representative`] for many patients at once (no patient twice): one multi-row
/// upsert per chunk. Each is (registry id, patient number, pseudonym, slot, what
/// represents them), the slot being the one a new row gets ([`slots_at_insert`]; `None`:
/// given by `research_index::log_changes`). A row on file keeps its own.
pub(in crate::store) async fn set_representatives_many(
    conn: &mut Db<'_>,
    representatives: &[(i64, i64, &str, Option<i64>, Representative<'_>)],
) -> Result<()> {
    use db::Ty::{Bool, Int, Text, Time};
    // The country is the centre's.
    const ROWS: db::Rows = db::Rows::with_template(
        &[
            Int, Int, Text, Int, Int, Int, Int, Text, Text, Int, Int, Int, Int, Int, Bool, Time,
            Text, Text, Int,
        ],
        "{0}, {1}, {2}, {3}, {4}, {5}, (SELECT country FROM centres WHERE id = {5}), {6}, {7}, \
         {8}, {9}, {10}, {11}, {12}, {13}, {14}, {15}, {16}, {17}, {18}",
    );
    for chunk in conn.chunks(representatives, ROWS_PER_STATEMENT) {
        let rows = ROWS.sql(conn, chunk.len());
        let sql = format!(
            "INSERT INTO patients (registry_id, patient, pseudonym, case_id, version, centre_id, \
                                   country, orphacode, sex, status, diagnosis_year, \
                                   onset_age_days, diagnosis_age_days, delay_days, delay_months, \
                                   eligible, eligible_until, genes, phenotypes, slot) \
             {rows} {on_file}",
            on_file = *ON_FILE
        );
        let mut query = db::query(&sql).persistent(ROWS.keeps(conn, chunk.len()));
        for (registry_id, patient, pseudonym, slot, r) in chunk {
            query = query.bind(*registry_id).bind(*patient).bind(*pseudonym);
            query = bind_representative(query, r).bind(*slot);
        }
        query.rows(conn, &ROWS)?.execute(&mut *conn).await?;
    }
    Ok(())
}

/// Binds what represents a patient, in the order of `patients`' columns from `case_id` to
/// `phenotypes` (the country is read from the centre, not bound).
fn bind_representative<'q>(query: db::Query<'q>, r: &Representative<'_>) -> db::Query<'q> {
    let row = r.row;
    query
        .bind(r.case_id)
        .bind(r.version)
        .bind(r.centre_id)
        .bind(row.orphacode)
        .bind(row.sex.as_str())
        .bind(row.status.as_str())
        .bind(row.diagnosis_year)
        .bind(row.onset_age_days)
        .bind(row.diagnosis_age_days)
        .bind(row.delay_days)
        .bind(row.delay_months)
        .bind(r.eligible)
        .bind(r.eligible_until)
        // The genes of the version too (as in `case_genes`): the research index reads them
        // with the row.
        .bind(genes_column(row))
        .bind(row.hpo_terms.as_str())
}

/// The `patients.genes` value of a row: its gene symbols, sorted, deduplicated, separated
/// by one space.
fn genes_column(row: &CaseRow) -> String {
    let mut genes: Vec<&str> = row.genes.iter().map(String::as_str).collect();
    genes.sort_unstable();
    genes.dedup();
    genes.join(" ")
}

/// The case of `centre_id` for this patient: (case id, current version).
pub(in crate::store) async fn find_case(
    conn: &mut Db<'_>,
    registry_id: i64,
    pseudonym: &str,
    centre_id: i64,
) -> Result<Option<(i64, i64)>> {
    let row = db::query(
        "SELECT id, current_version FROM cases \
         WHERE patient = (SELECT id FROM patient_keys WHERE registry_id = $1 AND pseudonym = $2) \
           AND centre_id = $3",
    )
    .bind(registry_id)
    .bind(pseudonym)
    .bind(centre_id)
    .fetch_optional(&mut *conn)
    .await?;
    row.map(|r| Ok((r.try_get("id")?, r.try_get("current_version")?)))
        .transpose()
}

/// One case at version 1, one row at a time: what the writer did before runs
/// ([`insert_cases_many`]); kept for the benches' per-row raw insert (`writer_sql`).
#[cfg(feature = "fixtures")]
pub(in crate::store) async fn insert_case(
    conn: &mut Db<'_>,
    registry_id: i64,
    pseudonym: &str,
    centre_id: i64,
    recorded_by: i64,
    row: &CaseRow,
    now: DateTime<Utc>,
) -> Result<i64> {
    let patient = patient_key(conn, registry_id, pseudonym).await?;
    let case_id: i64 = db::query(
        "INSERT INTO cases (patient, registry_id, pseudonym, centre_id, current_version, \
                            created_at, updated_at) \
         VALUES ($1, $2, $3, $4, 1, $5, $5) RETURNING id",
    )
    .bind(patient)
    .bind(registry_id)
    .bind(pseudonym)
    .bind(centre_id)
    .bind(now)
    .fetch_one(&mut *conn)
    .await?
    .try_get("id")?;
    insert_version(conn, case_id, 1, recorded_by, row, now).await?;
    Ok(case_id)
}

/// Stores `row` as `version` of the case and makes it current.
pub(in crate::store) async fn insert_version(
    conn: &mut Db<'_>,
    case_id: i64,
    version: i64,
    recorded_by: i64,
    row: &CaseRow,
    now: DateTime<Utc>,
) -> Result<()> {
    db::query(
        "INSERT INTO case_versions (case_id, version, recorded_at, recorded_by, birth_year_month, sex, \
             status, date_of_death, first_contact_date, onset_kind, onset_date, undiagnosed, orphacode, \
             diagnosis_date, icd10, icd11, omim, hpo_terms, icf_codes, genetic_findings, diagnosis_year, \
             onset_age_days, diagnosis_age_days, delay_days, delay_months, code_releases) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, \
                 $20, $21, $22, $23, $24, $25, $26)",
    )
    .bind(case_id)
    .bind(version)
    .bind(now)
    .bind(recorded_by)
    .bind(row.birth_year_month.as_str())
    .bind(row.sex.as_str())
    .bind(row.status.as_str())
    .bind(row.date_of_death.as_deref())
    .bind(row.first_contact_date.as_deref())
    .bind(row.onset_kind.as_str())
    .bind(row.onset_date.as_deref())
    .bind(row.undiagnosed)
    .bind(row.orphacode)
    .bind(row.diagnosis_date.as_deref())
    .bind(row.icd10.as_str())
    .bind(row.icd11.as_str())
    .bind(row.omim.as_str())
    .bind(row.hpo_terms.as_str())
    .bind(row.icf_codes.as_str())
    .bind(row.genetic_findings.as_str())
    .bind(row.diagnosis_year)
    .bind(row.onset_age_days)
    .bind(row.diagnosis_age_days)
    .bind(row.delay_days)
    .bind(row.delay_months)
    .bind(row.code_releases.as_deref())
    .execute(&mut *conn)
    .await?;
    // The HPO terms too, for research questions along the ontology (the reference SQL).
    for term in row.hpo_terms.split(' ').filter(|t| !t.is_empty()) {
        db::query("INSERT INTO case_phenotypes (case_id, version, term) VALUES ($1, $2, $3)")
            .bind(case_id)
            .bind(version)
            .bind(term)
            .execute(&mut *conn)
            .await?;
    }
    for gene in &row.genes {
        db::query("INSERT INTO case_genes (case_id, version, gene) VALUES ($1, $2, $3)")
            .bind(case_id)
            .bind(version)
            .bind(gene.as_str())
            .execute(&mut *conn)
            .await?;
    }
    if version > 1 {
        db::query("UPDATE cases SET current_version = $1, updated_at = $2 WHERE id = $3")
            .bind(version)
            .bind(now)
            .bind(case_id)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// Case versions stored as ORPHA:616874 (undiagnosed) for a case with a diagnosis: from
/// 2026-12-03 until 2026-12-06 a code release that replaced a deprecated Orphacode by
/// 616874 stored a submitted diagnosis so (now refused, `domain::catalog`). Such a version
/// cannot be read back (`Corrupt`), and research tables counting it take none of their
/// zeros for public by the record rules (`aggregate::impossible`). Returns how many
/// versions, and how many of them are their case's current one; read at start-up (on the
/// Orphacode index).
pub async fn diagnosed_as_undiagnosed(store: &super::Store) -> Result<(i64, i64)> {
    let row = db::query(
        "SELECT COUNT(*) AS versions, \
                COALESCE(SUM(CASE WHEN c.current_version = v.version THEN 1 ELSE 0 END), 0) \
                  AS current \
         FROM case_versions v JOIN cases c ON c.id = v.case_id \
         WHERE v.orphacode = $1 AND v.undiagnosed = $2",
    )
    .bind(i64::from(crate::domain::ORPHA_UNDIAGNOSED))
    .bind(false)
    .fetch_one(store.pool())
    .await?;
    Ok((row.try_get("versions")?, row.try_get("current")?))
}

/// Reads back the case of `centre_id` for a patient, only while REGISTRY_INCLUSION is in
/// force at `now` (checked in the same statement). With `history`, every version.
pub async fn get_case(
    conn: &mut Db<'_>,
    registry_id: i64,
    pseudonym: &str,
    centre_id: i64,
    now: DateTime<Utc>,
    history: bool,
) -> Result<Option<StoredCase>> {
    // Built once: this read runs on every GetCase.
    static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!(
            "SELECT ce.code, ce.country, v.version, v.recorded_at, p.name, v.birth_year_month, v.sex, \
                v.status, v.date_of_death, v.first_contact_date, v.onset_kind, v.onset_date, \
                v.undiagnosed, v.orphacode, v.diagnosis_date, v.icd10, v.icd11, v.omim, v.hpo_terms, \
                v.icf_codes, v.genetic_findings, v.diagnosis_year, v.onset_age_days, \
                v.diagnosis_age_days, v.delay_days, v.delay_months, v.code_releases \
         FROM cases c \
         JOIN centres ce ON ce.id = c.centre_id \
         JOIN case_versions v ON v.case_id = c.id AND (v.version = c.current_version OR $5 = 1) \
         JOIN principals p ON p.id = v.recorded_by \
         WHERE c.patient = (SELECT id FROM patient_keys WHERE registry_id = $1 AND pseudonym = $2) \
           AND c.centre_id = $3 AND {} \
         ORDER BY v.version",
            consent_model::active_in_history("c", Scope::RegistryInclusion, "$4")
        )
    });
    let rows = db::query(&SQL)
        .bind(registry_id)
        .bind(pseudonym)
        .bind(centre_id)
        .bind(now)
        .bind(i64::from(history))
        .fetch_all(&mut *conn)
        .await?;
    let Some(first) = rows.first() else {
        return Ok(None);
    };
    let mut case = StoredCase {
        centre_code: first.try_get("code")?,
        country: first.try_get("country")?,
        versions: Vec::with_capacity(rows.len()),
    };
    for r in &rows {
        case.versions.push(version_from_row(r)?);
    }
    Ok(Some(case))
}

/// A version read from the columns of [`get_case`] and [`list_current`]: `version`,
/// `recorded_at`, the recorder's `name`, `birth_year_month`, ..., `code_releases`.
fn version_from_row(r: &Row) -> Result<StoredVersion> {
    let genetic_findings: String = r.try_get("genetic_findings")?;
    Ok(StoredVersion {
        version: r.try_get("version")?,
        recorded_at: r.try_get("recorded_at")?,
        recorded_by: r.try_get("name")?,
        row: CaseRow {
            birth_year_month: r.try_get("birth_year_month")?,
            sex: r.try_get("sex")?,
            status: r.try_get("status")?,
            date_of_death: r.try_get("date_of_death")?,
            first_contact_date: r.try_get("first_contact_date")?,
            onset_kind: r.try_get("onset_kind")?,
            onset_date: r.try_get("onset_date")?,
            undiagnosed: r.try_get("undiagnosed")?,
            orphacode: r.try_get("orphacode")?,
            diagnosis_date: r.try_get("diagnosis_date")?,
            icd10: r.try_get("icd10")?,
            icd11: r.try_get("icd11")?,
            omim: r.try_get("omim")?,
            hpo_terms: r.try_get("hpo_terms")?,
            icf_codes: r.try_get("icf_codes")?,
            genes: genes_of(&genetic_findings),
            genetic_findings,
            diagnosis_year: r.try_get("diagnosis_year")?,
            onset_age_days: r.try_get("onset_age_days")?,
            diagnosis_age_days: r.try_get("diagnosis_age_days")?,
            delay_days: r.try_get("delay_days")?,
            delay_months: r.try_get("delay_months")?,
            code_releases: r.try_get("code_releases")?,
        },
    })
}

/// The current versions of a centre's cases in a registry whose REGISTRY_INCLUSION
/// consent is in force at `now` (filtered in the same statement, as [`get_case`]), by
/// pseudonym, the first `limit` after `after` ('' : from the start). Pseudonym, version.
pub async fn list_current(
    conn: &mut Db<'_>,
    registry_id: i64,
    centre_id: i64,
    now: DateTime<Utc>,
    after: &str,
    limit: i64,
) -> Result<Vec<(String, StoredVersion)>> {
    let sql = format!(
        "SELECT c.pseudonym, v.version, v.recorded_at, p.name, v.birth_year_month, v.sex, \
                v.status, v.date_of_death, v.first_contact_date, v.onset_kind, v.onset_date, \
                v.undiagnosed, v.orphacode, v.diagnosis_date, v.icd10, v.icd11, v.omim, v.hpo_terms, \
                v.icf_codes, v.genetic_findings, v.diagnosis_year, v.onset_age_days, \
                v.diagnosis_age_days, v.delay_days, v.delay_months, v.code_releases \
         FROM cases c \
         JOIN case_versions v ON v.case_id = c.id AND v.version = c.current_version \
         JOIN principals p ON p.id = v.recorded_by \
         WHERE c.registry_id = $1 AND c.centre_id = $2 AND c.pseudonym > $3 AND {} \
         ORDER BY c.pseudonym LIMIT $5",
        consent_model::active_in_history("c", Scope::RegistryInclusion, "$4")
    );
    let rows = db::query(&sql)
        .bind(registry_id)
        .bind(centre_id)
        .bind(after)
        .bind(now)
        .bind(limit)
        .fetch_all(&mut *conn)
        .await?;
    rows.iter()
        .map(|r| Ok((r.try_get("pseudonym")?, version_from_row(r)?)))
        .collect()
}

/// Gene symbols of an encoded `genetic_findings` column ("GENE|variant GENE2").
pub fn genes_of(encoded: &str) -> Vec<String> {
    encoded
        .split(' ')
        .filter(|f| !f.is_empty())
        .filter_map(|f| f.split('|').next())
        .map(str::to_owned)
        .collect()
}

fn join<T: std::fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The columns of a record, with the derived values research queries group on.
pub fn to_row(r: &CaseRecord) -> CaseRow {
    let text = |d: Option<PartialDate>| d.map(|d| d.to_string());
    CaseRow {
        birth_year_month: r.birth.to_string(),
        sex: r.sex.as_str().to_owned(),
        status: r.status.as_str().to_owned(),
        date_of_death: text(r.date_of_death),
        first_contact_date: text(r.first_contact),
        onset_kind: r.onset.kind().as_str().to_owned(),
        onset_date: text(r.onset.date()),
        undiagnosed: r.undiagnosed,
        orphacode: r.orphacode.as_ref().map(|c| i64::from(c.number())),
        diagnosis_date: text(r.diagnosis_date),
        icd10: join(&r.icd10),
        icd11: join(&r.icd11),
        omim: join(&r.omim),
        hpo_terms: join(&r.hpo_terms),
        icf_codes: join(&r.icf_codes),
        genetic_findings: r
            .genetic_findings
            .iter()
            .map(|f| {
                std::iter::once(f.gene.to_string())
                    .chain(f.variants.iter().map(ToString::to_string))
                    .collect::<Vec<_>>()
                    .join("|")
            })
            .collect::<Vec<_>>()
            .join(" "),
        genes: r
            .genetic_findings
            .iter()
            .map(|f| f.gene.to_string())
            .collect(),
        diagnosis_year: r.diagnosis_date.map(|d| i64::from(d.year())),
        onset_age_days: r.onset_age_days(),
        diagnosis_age_days: r.diagnosis_age_days(),
        delay_days: r.delay_days(),
        delay_months: r.delay_months(),
        code_releases: None,
    }
}

/// What research reads of a version, derived from its dates: the ages at onset and at
/// diagnosis, the delay in days and in whole months ([`CaseRow`]'s columns of them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::store) struct Derived {
    pub onset_age_days: Option<i64>,
    pub diagnosis_age_days: Option<i64>,
    pub delay_days: Option<i64>,
    pub delay_months: Option<i64>,
}

/// [`Derived`] of a stored version's columns, as [`to_row`] gives them; a column that does
/// not parse is reported as corruption.
pub(in crate::store) fn derived_of_columns(
    birth_year_month: &str,
    onset_kind: &str,
    onset_date: Option<&str>,
    diagnosis_date: Option<&str>,
) -> Result<Derived> {
    let corrupt = || StoreError::Corrupt("case_versions row does not parse".into());
    let date = |d: Option<&str>| {
        d.filter(|d| !d.is_empty())
            .map(|d| PartialDate::parse(d).map_err(|_| corrupt()))
            .transpose()
    };
    let birth = crate::domain::YearMonth::parse(birth_year_month).map_err(|_| corrupt())?;
    let onset = match OnsetKind::parse_db(onset_kind).ok_or_else(corrupt)? {
        OnsetKind::Antenatal => Onset::Antenatal,
        OnsetKind::AtBirth => Onset::AtBirth,
        OnsetKind::Date => Onset::Date(date(onset_date)?.ok_or_else(corrupt)?),
        OnsetKind::Unknown => Onset::Unknown,
    };
    let diagnosis = date(diagnosis_date)?;
    let onset_age_days = crate::domain::onset_age_days_of(birth, onset);
    let diagnosis_age_days = crate::domain::diagnosis_age_days_of(birth, onset, diagnosis);
    Ok(Derived {
        onset_age_days,
        diagnosis_age_days,
        delay_days: onset_age_days
            .zip(diagnosis_age_days)
            .map(|(onset, diagnosis)| (diagnosis - onset).max(0)),
        delay_months: crate::domain::delay_months_of(birth, onset, diagnosis),
    })
}

/// Rebuilds the domain record from stored columns, re-checking everything
/// (`CaseRecord::validate`, straight from the columns): a row that does not parse is
/// reported as corruption, never served.
pub fn from_row(row: &CaseRow) -> Result<CaseRecord> {
    let corrupt = || StoreError::Corrupt("case_versions row does not parse".into());
    let words = |s: &str| {
        s.split(' ')
            .filter(|w| !w.is_empty())
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let stored = |what: &'static str| DomainError::Format(what);
    let (icd10, icd11, omim) = (words(&row.icd10), words(&row.icd11), words(&row.omim));
    let (hpo_terms, icf_codes) = (words(&row.hpo_terms), words(&row.icf_codes));
    let findings: Vec<(String, Vec<String>)> = words(&row.genetic_findings)
        .iter()
        .map(|f| {
            let mut parts = f.split('|').map(str::to_owned);
            (parts.next().unwrap_or_default(), parts.collect())
        })
        .collect();
    let orphacode = row
        .orphacode
        .map(|n| format!("ORPHA:{n}"))
        .unwrap_or_default();
    let input = RecordInput {
        birth_year_month: &row.birth_year_month,
        sex: Sex::parse_db(&row.sex).ok_or(stored("a stored sex")),
        status: PatientStatus::parse_db(&row.status).ok_or(stored("a stored status")),
        date_of_death: row.date_of_death.as_deref().unwrap_or_default(),
        first_contact_date: row.first_contact_date.as_deref().unwrap_or_default(),
        onset_kind: OnsetKind::parse_db(&row.onset_kind).ok_or(stored("a stored onset kind")),
        onset_date: row.onset_date.as_deref().unwrap_or_default(),
        undiagnosed: row.undiagnosed,
        orphacode: &orphacode,
        icd10: &icd10,
        icd11: &icd11,
        omim: &omim,
        diagnosis_date: row.diagnosis_date.as_deref().unwrap_or_default(),
        genetic_findings: findings
            .iter()
            .map(|(gene, variants)| FindingInput { gene, variants })
            .collect(),
        hpo_terms: &hpo_terms,
        icf_codes: &icf_codes,
    };
    // Stored records were valid when written; "today" far ahead only disables the
    // not-in-the-future check, which is about the time of writing.
    let far_future = chrono::NaiveDate::from_ymd_opt(9999, 12, 31).expect("valid date");
    CaseRecord::validate(&input, far_future).map_err(|_| corrupt())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto;

    #[test]
    fn rows_round_trip() {
        // The fixture, deceased, with a second ICD-10 code, gene, variant and HPO term:
        // every list column holds more than one entry.
        let valid = crate::fixtures::record();
        let proto_record = proto::CaseRecord {
            status: proto::PatientStatus::Deceased as i32,
            date_of_death: "2020".into(),
            diagnosis: Some(proto::Diagnosis {
                icd10: vec!["E84.0".into(), "E84.1".into()],
                omim: vec![],
                ..valid.diagnosis.clone().unwrap()
            }),
            genetic_findings: vec![
                proto::GeneticFinding {
                    gene: "CFTR".into(),
                    variants: vec![
                        "NM_000492.4:c.1521_1523del".into(),
                        "NM_000492.4:c.350G>A".into(),
                    ],
                },
                proto::GeneticFinding {
                    gene: "SCNN1B".into(),
                    variants: vec![],
                },
            ],
            hpo_terms: vec!["HP:0006528".into(), "HP:0002110".into()],
            icf_codes: vec![],
            ..valid
        };
        let today = chrono::NaiveDate::from_ymd_opt(2026, 1, 1).unwrap();
        let record = crate::api::convert::case_record(&proto_record, today).unwrap();
        let row = to_row(&record);
        assert_eq!(row.genes, ["CFTR", "SCNN1B"]);
        assert_eq!(genes_of(&row.genetic_findings), row.genes);
        assert_eq!(row.orphacode, Some(586));
        assert_eq!(row.diagnosis_year, Some(2016));
        assert_eq!(from_row(&row).unwrap(), record);
        let mut broken = row.clone();
        broken.sex = "x".into();
        assert!(from_row(&broken).is_err());
    }
}
