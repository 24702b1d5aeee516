//! The SQL of research aggregates: counting happens in the database, grouped and
//! filtered there; only the groups (at most a table's worth) come back, as a stream.
//!
//! A patient is counted once per registry, through their research row (`patients`: the
//! values of the case that first entered the registry, kept by the writer), and only while both
//! REGISTRY_INCLUSION and RESEARCH_USE are in force at `now` (the row's eligibility,
//! kept with every consent event). A query is one scan of one registry's rows. Filter
//! values are always bound as parameters, never spliced into the SQL text.

use super::db::{self, Query};
use chrono::{DateTime, Utc};
use tokio_stream::StreamExt;

use super::{Result, Store, StoreError, consent_model};
use crate::aggregate::{
    AGE_BANDS, DelayBuilder, Dimension, Filter, Key, QueryError, TableBuilder, age_band_start_days,
};
use crate::domain::ORPHA_UNDIAGNOSED;

/// What to count: a registry's consented patients, grouped and filtered.
#[derive(Debug, Clone)]
pub struct Selection {
    pub registry_id: i64,
    pub group_by: Vec<Dimension>,
    pub filters: Vec<Filter>,
    /// Only patients with one of these HPO terms (with the other filters: AND).
    pub phenotypes: Option<PhenotypeFilter>,
    pub now: DateTime<Utc>,
}

/// "Patients with this HPO term, or any term below it": a patient counts when their
/// representative version lists any of the terms.
///
/// The research index tests `terms`, the set `service::research` expands from the
/// release in memory (`domain::CodeCatalog`). The SQL reference does not use `terms`: it
/// expands `roots` itself, with a recursive query along `code_parents` of release
/// `release_id`, so the two paths compute the set independently.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PhenotypeFilter {
    /// The terms asked for, and the terms the release in force stores any of them as (an
    /// alternative id's term, an obsolete term's replacement).
    pub roots: Vec<String>,
    /// With descendants: the release (in force) whose hierarchy to follow.
    pub descendants_in: Option<i64>,
    /// `roots` and, with descendants, every term below them in the release.
    pub terms: Vec<String>,
}

/// A centre with cases of the diagnoses searched, in one registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpertiseRow {
    pub centre_code: String,
    pub centre_name: String,
    pub country: String,
    pub registry_id: i64,
    /// The diagnosis these cases have: each code is counted on its own.
    pub orphacode: i64,
    pub cases: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ResearchError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Query(#[from] QueryError),
}

impl From<sqlx::Error> for ResearchError {
    fn from(err: sqlx::Error) -> Self {
        ResearchError::Store(err.into())
    }
}

/// The SQL expression of a dimension's group value over `p` (the patient's research row),
/// `ce` (the centre, joined when needed) and `g` (the gene row, when grouped by gene).
fn expression(dim: Dimension) -> String {
    match dim {
        Dimension::Diagnosis => format!("COALESCE(p.orphacode, {ORPHA_UNDIAGNOSED})"),
        Dimension::Sex => "p.sex".into(),
        Dimension::OnsetAgeBand => age_band("p.onset_age_days"),
        Dimension::DiagnosisAgeBand => age_band("p.diagnosis_age_days"),
        Dimension::Country => "p.country".into(),
        Dimension::Centre => "ce.code".into(),
        Dimension::DiagnosisYear => "p.diagnosis_year".into(),
        Dimension::PatientStatus => "p.status".into(),
        Dimension::Gene => "g.gene".into(),
    }
}

/// `CASE` mapping an age in days to its band index (NULL when unknown).
pub(super) fn age_band(column: &str) -> String {
    // Cast: PostgreSQL types integer literals as INT4, the rest of the schema is BIGINT.
    let mut sql = String::from("CAST((CASE");
    for i in (1..AGE_BANDS.len()).rev() {
        sql.push_str(&format!(
            " WHEN {column} >= {} THEN {i}",
            age_band_start_days(i)
        ));
    }
    sql.push_str(&format!(
        " WHEN {column} IS NOT NULL THEN 0 END) AS BIGINT)"
    ));
    sql
}

/// Whether the dimension's value is an integer (else text).
fn is_integer(dim: Dimension) -> bool {
    matches!(
        dim,
        Dimension::Diagnosis
            | Dimension::OnsetAgeBand
            | Dimension::DiagnosisAgeBand
            | Dimension::DiagnosisYear
    )
}

/// A parameter to bind.
#[derive(Debug, Clone)]
enum Bind {
    Int(i64),
    Text(String),
}

/// SQL text and parameters under construction; `$1` is the registry, `$2` now.
struct Sql {
    text: String,
    binds: Vec<Bind>,
}

impl Sql {
    fn param(&mut self, key: &Key) -> Option<String> {
        let bind = match key {
            Key::Int(n) => Bind::Int(*n),
            Key::Text(s) => Bind::Text(s.clone()),
            Key::Missing => return None,
        };
        self.binds.push(bind);
        Some(format!("${}", self.binds.len() + 2))
    }

    /// `expr` is one of `values` (NULL for `Missing`).
    fn one_of(&mut self, expr: &str, values: &[Key]) -> String {
        let params: Vec<String> = values.iter().filter_map(|k| self.param(k)).collect();
        let mut alternatives = Vec::new();
        if !params.is_empty() {
            alternatives.push(format!("{expr} IN ({})", params.join(", ")));
        }
        if values.contains(&Key::Missing) {
            alternatives.push(format!("{expr} IS NULL"));
        }
        if alternatives.is_empty() {
            "1 = 0".into()
        } else {
            format!("({})", alternatives.join(" OR "))
        }
    }

    fn bind<'q>(&'q self, query: Query<'q>) -> Query<'q> {
        self.binds.iter().fold(query, |q, b| match b {
            Bind::Int(n) => q.bind(*n),
            Bind::Text(s) => q.bind(s.as_str()),
        })
    }
}

/// The name of the `i`th group value in the select list of [`grouped`].
fn group_column(i: usize) -> String {
    format!("group_{i}")
}

/// `SELECT <group values>, <extra> ... FROM <consented patients> WHERE ... GROUP BY ...`.
fn grouped(sel: &Selection, extra_select: &str, extra_group: &[&str], extra_where: &str) -> Sql {
    let mut sql = Sql {
        text: String::new(),
        binds: Vec::new(),
    };
    let by_gene = sel.group_by.contains(&Dimension::Gene);
    // The patient of `p` may be counted at `$2`: both consents granted, not expired.
    let mut conditions = vec![format!(
        "p.registry_id = $1 AND {}",
        consent_model::research_eligible("p", "$2")
    )];
    if !extra_where.is_empty() {
        conditions.push(extra_where.to_string());
    }
    for f in &sel.filters {
        if f.dimension == Dimension::Gene && !by_gene {
            // Filtering by gene without grouping by it: the patient has one of the genes
            // (or none, for "none").
            let genes: Vec<Key> = f
                .values
                .iter()
                .filter(|k| **k != Key::Missing)
                .cloned()
                .collect();
            let mut alternatives = Vec::new();
            if !genes.is_empty() {
                let cond = sql.one_of("g2.gene", &genes);
                alternatives.push(format!(
                    "EXISTS (SELECT 1 FROM case_genes g2 WHERE g2.case_id = p.case_id \
                     AND g2.version = p.version AND {cond})"
                ));
            }
            if f.values.contains(&Key::Missing) {
                alternatives.push(
                    "NOT EXISTS (SELECT 1 FROM case_genes g3 WHERE g3.case_id = p.case_id \
                     AND g3.version = p.version)"
                        .into(),
                );
            }
            conditions.push(format!("({})", alternatives.join(" OR ")));
        } else {
            let cond = sql.one_of(&expression(f.dimension), &f.values);
            conditions.push(cond);
        }
    }
    if let Some(f) = &sel.phenotypes {
        let roots: Vec<String> = f
            .roots
            .iter()
            .filter_map(|t| sql.param(&Key::Text(t.clone())))
            .collect();
        let roots = if roots.is_empty() {
            "NULL".to_string()
        } else {
            roots.join(", ")
        };
        // The roots themselves, also those the release does not know; with descendants,
        // every term below them in the release.
        let below = match f.descendants_in {
            None => String::new(),
            Some(release) => {
                let release = sql.param(&Key::Int(release)).expect("an integer binds");
                format!(
                    " OR h.term IN (WITH RECURSIVE d (code) AS ( \
                         SELECT t.code FROM code_terms t \
                         WHERE t.release_id = {release} AND t.code IN ({roots}) \
                         UNION \
                         SELECT c.code FROM code_parents c JOIN d ON c.parent = d.code \
                         WHERE c.release_id = {release}) \
                     SELECT code FROM d)"
                )
            }
        };
        conditions.push(format!(
            "EXISTS (SELECT 1 FROM case_phenotypes h WHERE h.case_id = p.case_id \
             AND h.version = p.version AND (h.term IN ({roots}){below}))"
        ));
    }
    let groups: Vec<String> = sel.group_by.iter().map(|d| expression(*d)).collect();
    let mut select: Vec<String> = groups
        .iter()
        .enumerate()
        .map(|(i, g)| format!("{g} AS {}", group_column(i)))
        .collect();
    select.push(extra_select.to_string());
    let mut group_by: Vec<String> = groups;
    group_by.extend(extra_group.iter().map(|s| s.to_string()));
    let gene_join = if by_gene {
        " LEFT JOIN case_genes g ON g.case_id = p.case_id AND g.version = p.version"
    } else {
        ""
    };
    let by_centre = sel.group_by.contains(&Dimension::Centre)
        || sel.filters.iter().any(|f| f.dimension == Dimension::Centre);
    let centre_join = if by_centre {
        " JOIN centres ce ON ce.id = p.centre_id"
    } else {
        ""
    };
    sql.text = format!(
        "SELECT {select} FROM patients p{centre_join}{gene_join} \
         WHERE {conditions}{group}{order}",
        select = select.join(", "),
        conditions = conditions.join(" AND "),
        group = if group_by.is_empty() {
            String::new()
        } else {
            format!(" GROUP BY {}", group_by.join(", "))
        },
        // Unknown (NULL) last on both databases, as `Key` orders: SQLite sorts NULL
        // first, PostgreSQL last.
        order = if group_by.is_empty() {
            String::new()
        } else {
            let order: Vec<String> = group_by
                .iter()
                .map(|e| format!("({e}) IS NULL, {e}"))
                .collect();
            format!(" ORDER BY {}", order.join(", "))
        },
    );
    sql
}

fn key_at(row: &db::Row, column: &str, dim: Dimension) -> Result<Key, StoreError> {
    Ok(if is_integer(dim) {
        row.try_get::<Option<i64>>(column)?
            .map_or(Key::Missing, Key::Int)
    } else {
        row.try_get::<Option<String>>(column)?
            .map_or(Key::Missing, Key::Text)
    })
}

/// The group values of a row ([`group_column`]), one per dimension grouped by.
fn keys_of(row: &db::Row, group_by: &[Dimension]) -> Result<Vec<Key>, StoreError> {
    group_by
        .iter()
        .enumerate()
        .map(|(i, d)| key_at(row, &group_column(i), *d))
        .collect()
}

fn count_at(row: &db::Row, column: &str) -> Result<u64, StoreError> {
    let n: i64 = row.try_get(column)?;
    u64::try_from(n).map_err(|_| StoreError::Corrupt("negative count".into()))
}

impl Store {
    /// Counts consented patients per group into `table`. Rows stream from the database;
    /// the scan stops as soon as the table would be too fine to publish.
    pub async fn count_patients(
        &self,
        sel: &Selection,
        table: &mut TableBuilder,
    ) -> Result<(), ResearchError> {
        let sql = grouped(sel, "COUNT(*) AS n", &[], "");
        let query = sql.bind(db::query(&sql.text).bind(sel.registry_id).bind(sel.now));
        let mut conn = self.pool().acquire().await?;
        let mut db = conn.db();
        let mut rows = query.fetch(&mut db);
        while let Some(row) = rows.next().await {
            let row = row?;
            table.add(keys_of(&row, &sel.group_by)?, count_at(&row, "n")?)?;
        }
        Ok(())
    }

    /// Diagnostic delays (whole months) of consented patients with a known delay, per
    /// group, streamed in group order into the delay table.
    /// The histograms are returned unprotected: protection runs off the async runtime.
    pub async fn diagnostic_delay(&self, sel: &Selection) -> Result<DelayBuilder, ResearchError> {
        // Whole calendar months, as the writer stored them (`CaseRecord::delay_months`).
        let months = "p.delay_months";
        let sql = grouped(
            sel,
            &format!("{months} AS months, COUNT(*) AS n"),
            &[months],
            "p.delay_months IS NOT NULL",
        );
        let query = sql.bind(db::query(&sql.text).bind(sel.registry_id).bind(sel.now));
        let mut conn = self.pool().acquire().await?;
        let mut db = conn.db();
        let mut rows = query.fetch(&mut db);
        let mut builder = DelayBuilder::new(&sel.group_by);
        while let Some(row) = rows.next().await {
            let row = row?;
            let m: i64 = row.try_get("months")?;
            builder.add(keys_of(&row, &sel.group_by)?, m, count_at(&row, "n")?)?;
        }
        Ok(builder)
    }

    /// Centres with cases (current versions) of any of `orphacodes` in `registries`,
    /// optionally only in `countries`, counting cases of consented patients per centre,
    /// registry and code.
    pub async fn expertise(
        &self,
        orphacodes: &[i64],
        registries: &[i64],
        countries: &[String],
        now: DateTime<Utc>,
    ) -> Result<Vec<ExpertiseRow>> {
        if orphacodes.is_empty() || registries.is_empty() {
            return Ok(Vec::new());
        }
        let mut n = 1;
        let mut params = |count: usize| {
            let list: Vec<String> = (0..count).map(|i| format!("${}", n + i)).collect();
            n += count;
            list.join(", ")
        };
        let now_param = params(1);
        let codes = params(orphacodes.len());
        let regs = params(registries.len());
        let country_filter = if countries.is_empty() {
            String::new()
        } else {
            format!(" AND ce.country IN ({})", params(countries.len()))
        };
        let sql = format!(
            "SELECT ce.code, ce.name, ce.country, c.registry_id, v.orphacode, COUNT(*) AS n \
             FROM case_versions v \
             JOIN cases c ON c.id = v.case_id AND c.current_version = v.version \
             JOIN centres ce ON ce.id = c.centre_id \
             JOIN patients p ON p.registry_id = c.registry_id AND p.patient = c.patient \
             WHERE v.orphacode IN ({codes}) AND c.registry_id IN ({regs}){country_filter} \
               AND {eligible} \
             GROUP BY ce.code, ce.name, ce.country, c.registry_id, v.orphacode",
            // The patient's research eligibility, as the writer keeps it on their research
            // row (`consent::research_eligibility`, the rule counts and the index apply).
            eligible = consent_model::research_eligible("p", &now_param),
        );
        let mut query = db::query(&sql).bind(now);
        for code in orphacodes {
            query = query.bind(*code);
        }
        for reg in registries {
            query = query.bind(*reg);
        }
        for country in countries {
            query = query.bind(country.as_str());
        }
        let rows = query.fetch_all(self.pool()).await?;
        rows.iter()
            .map(|r| {
                Ok(ExpertiseRow {
                    centre_code: r.try_get("code")?,
                    centre_name: r.try_get("name")?,
                    country: r.try_get("country")?,
                    registry_id: r.try_get("registry_id")?,
                    orphacode: r.try_get("orphacode")?,
                    cases: count_at(r, "n")?,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_values_are_parameters() {
        let sel = Selection {
            registry_id: 9,
            group_by: vec![Dimension::Country, Dimension::Gene],
            filters: vec![
                Filter {
                    dimension: Dimension::Sex,
                    values: vec![Key::Text("female".into())],
                },
                Filter {
                    dimension: Dimension::OnsetAgeBand,
                    values: vec![Key::Int(0), Key::Missing],
                },
            ],
            phenotypes: None,
            now: Utc::now(),
        };
        let sql = grouped(&sel, "COUNT(*)", &[], "");
        assert!(!sql.text.contains("female"));
        assert!(sql.text.contains("p.sex IN ($3)"));
        assert!(sql.text.contains("IN ($4) OR CAST((CASE"));
        assert!(sql.text.contains("LEFT JOIN case_genes g"));
        assert_eq!(sql.binds.len(), 2);
    }

    #[test]
    fn age_bands_in_sql_match_the_domain() {
        let sql = age_band("x");
        assert!(
            sql.starts_with("CAST((CASE WHEN x >= 23741 THEN 6"),
            "{sql}"
        );
        assert!(sql.ends_with("WHEN x IS NOT NULL THEN 0 END) AS BIGINT)"));
    }
}
