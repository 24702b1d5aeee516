//! `ResearchService`: aggregate queries with small-count suppression.
//!
//! Thin: validates the request into a [`Selection`], lets the database count, lets
//! [`crate::aggregate`] assemble and protect the table, converts it. Nothing here ever
//! sees a row or a pseudonym.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use prost_types::Timestamp;
use tonic::{Request, Response, Status};
use tracing::info;

use super::{ApiError, Call, SharedState, audited};
use crate::aggregate::suppress::Rules;
use crate::aggregate::{
    self, CountTable, DELAY_BANDS, Dimension, Filter, MAX_COUNT_DIMENSIONS, MAX_DELAY_DIMENSIONS,
    MAX_EXPERTISE_CODES, MAX_FILTER_VALUES, Quantiles, QueryError, TableBuilder,
};
use crate::auth::{AuthError, Principal, Role};
use crate::consent::timestamp_to_proto;
use crate::domain::{CountryCode, FieldViolations, ORPHA_UNDIAGNOSED, Orphacode, RegistryCode};
use crate::proto::{self, research_service_server::ResearchService};
use crate::store::research::{ResearchError, Selection};
use crate::store::{Registry, StoreError};

pub struct ResearchApi {
    state: SharedState,
}

/// Where research tables are protected: a bounded pool of blocking threads, so that one
/// large table cannot stall other calls on the async runtime, and a deadline per query.
/// A table not proven safe by its deadline is never published (fail closed).
pub struct ProtectionPool {
    permits: Arc<tokio::sync::Semaphore>,
    budget: Duration,
}

impl ProtectionPool {
    /// At most `workers` protections at once, each given `budget` from the moment it asks
    /// (waiting for a worker counts).
    pub fn new(workers: usize, budget: Duration) -> Self {
        ProtectionPool {
            permits: Arc::new(tokio::sync::Semaphore::new(workers.max(1))),
            budget,
        }
    }

    /// Runs `work` (given its deadline) on a blocking thread.
    pub async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce(Instant) -> Result<T, QueryError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let deadline = Instant::now() + self.budget;
        let permit =
            tokio::time::timeout_at(deadline.into(), Arc::clone(&self.permits).acquire_owned())
                .await
                .map_err(|_| ApiError::Busy("every research worker is busy"))?
                .map_err(|_| ApiError::Unavailable)?;
        let joined = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            work(deadline)
        })
        .await
        .map_err(|_| ApiError::Internal(StoreError::Invalid("table protection panicked".into())))?;
        joined.map_err(|e| ApiError::from(ResearchError::Query(e)))
    }
}

/// The registry's disclosure rules, as the store keeps them (checked there on write).
fn rules_of(registry: &Registry) -> Result<Rules, ApiError> {
    let level = |v: i64| u64::try_from(v).unwrap_or(0);
    Rules::new(
        level(registry.min_cell_count),
        level(registry.protection_level),
    )
    .map_err(|e| ApiError::Internal(StoreError::Invalid(e.to_string())))
}

impl ResearchApi {
    pub fn new(state: SharedState) -> Self {
        ResearchApi { state }
    }
}

impl Dimension {
    pub fn from_proto(value: i32) -> Option<Dimension> {
        use proto::Dimension as P;
        Some(match P::try_from(value).ok()? {
            P::Unspecified => return None,
            P::Diagnosis => Dimension::Diagnosis,
            P::Sex => Dimension::Sex,
            P::OnsetAgeBand => Dimension::OnsetAgeBand,
            P::DiagnosisAgeBand => Dimension::DiagnosisAgeBand,
            P::Country => Dimension::Country,
            P::Centre => Dimension::Centre,
            P::DiagnosisYear => Dimension::DiagnosisYear,
            P::PatientStatus => Dimension::PatientStatus,
            P::Gene => Dimension::Gene,
        })
    }

    pub fn to_proto(self) -> i32 {
        use proto::Dimension as P;
        (match self {
            Dimension::Diagnosis => P::Diagnosis,
            Dimension::Sex => P::Sex,
            Dimension::OnsetAgeBand => P::OnsetAgeBand,
            Dimension::DiagnosisAgeBand => P::DiagnosisAgeBand,
            Dimension::Country => P::Country,
            Dimension::Centre => P::Centre,
            Dimension::DiagnosisYear => P::DiagnosisYear,
            Dimension::PatientStatus => P::PatientStatus,
            Dimension::Gene => P::Gene,
        }) as i32
    }
}

impl From<ResearchError> for ApiError {
    fn from(err: ResearchError) -> Self {
        match err {
            ResearchError::Store(e) => ApiError::Internal(e),
            ResearchError::Query(QueryError::TooFine) => {
                let mut v = FieldViolations::new();
                v.push("group_by", QueryError::TooFine.to_string());
                ApiError::Invalid(v)
            }
            ResearchError::Query(e @ QueryError::Unprovable) => {
                ApiError::Precondition(e.to_string())
            }
            ResearchError::Query(QueryError::Invalid(msg)) => {
                ApiError::Internal(StoreError::Invalid(msg))
            }
        }
    }
}

/// Validates group-by dimensions: known, distinct, at most `max`.
fn parse_group_by(values: &[i32], max: usize, v: &mut FieldViolations) -> Vec<Dimension> {
    if values.len() > max {
        v.push("group_by", format!("at most {max} dimensions"));
        return Vec::new();
    }
    let mut seen = BTreeSet::new();
    let mut dims = Vec::with_capacity(values.len());
    for (i, &value) in values.iter().enumerate() {
        match Dimension::from_proto(value) {
            None => v.push(format!("group_by[{i}]"), "is not a dimension"),
            Some(d) if !seen.insert(d) => v.push(format!("group_by[{i}]"), "is repeated"),
            Some(d) => dims.push(d),
        }
    }
    dims
}

fn parse_filters(filters: &[proto::Filter], v: &mut FieldViolations) -> Vec<Filter> {
    if filters.len() > Dimension::ALL.len() {
        v.push("filters", "at most one filter per dimension");
        return Vec::new();
    }
    let mut seen = BTreeSet::new();
    let mut out = Vec::with_capacity(filters.len());
    for (i, f) in filters.iter().enumerate() {
        let field = format!("filters[{i}]");
        let Some(dimension) = Dimension::from_proto(f.dimension) else {
            v.push(format!("{field}.dimension"), "is not a dimension");
            continue;
        };
        if !seen.insert(dimension) {
            v.push(format!("{field}.dimension"), "has another filter already");
            continue;
        }
        if f.values.is_empty() || f.values.len() > MAX_FILTER_VALUES {
            v.push(
                format!("{field}.values"),
                format!("give 1 to {MAX_FILTER_VALUES} values"),
            );
            continue;
        }
        let mut values = Vec::with_capacity(f.values.len());
        for (j, text) in f.values.iter().enumerate() {
            match dimension.parse_value(text) {
                Ok(key) => values.push(key),
                Err(msg) if text.len() <= 64 => v.push(format!("{field}.values[{j}]"), msg),
                Err(_) => v.push(format!("{field}.values[{j}]"), "is too long"),
            }
        }
        out.push(Filter { dimension, values });
    }
    out
}

fn cell(value: Option<u64>) -> Option<proto::Cell> {
    Some(proto::Cell { count: value })
}

fn quantiles(q: Option<Quantiles>) -> Option<proto::DelayQuantiles> {
    q.map(|q| proto::DelayQuantiles {
        p25_years: q.p25,
        median_years: q.median,
        p75_years: q.p75,
        p90_years: q.p90,
    })
}

fn table_to_proto(
    registry: &Registry,
    table: CountTable,
    by_gene: bool,
    as_of: Timestamp,
) -> proto::CountTable {
    let p = &table.protected;
    let ncols = table.column_labels.len();
    let one_way = table.column_dimensions.is_empty();
    let rows = table
        .row_labels
        .iter()
        .enumerate()
        .map(|(r, label)| proto::TableRow {
            label: label.clone(),
            cells: p.cells[r * ncols..(r + 1) * ncols]
                .iter()
                .map(|c| proto::Cell { count: *c })
                .collect(),
            total: if one_way { None } else { cell(p.row_totals[r]) },
        })
        .collect();
    proto::CountTable {
        registry: registry.code.clone(),
        min_cell_count: registry.min_cell_count as u32,
        protection_level: registry.protection_level as u32,
        unit: if by_gene {
            "patient-gene pairs"
        } else {
            "patients"
        }
        .into(),
        row_dimension: table.row_dimension.map_or(0, Dimension::to_proto),
        column_dimensions: table
            .column_dimensions
            .iter()
            .map(|d| d.to_proto())
            .collect(),
        columns: table
            .column_labels
            .iter()
            .map(|values| proto::ColumnKey {
                values: values.clone(),
            })
            .collect(),
        rows,
        column_totals: p
            .col_totals
            .iter()
            .map(|c| proto::Cell { count: *c })
            .collect(),
        grand_total: cell(p.grand_total),
        suppressed: table.suppressed() as u32,
        as_of: Some(as_of),
    }
}

impl ResearchApi {
    /// The caller (a researcher) and the registry they asked about, if it is theirs.
    async fn researcher_registry<T>(
        &self,
        request: &Request<T>,
        code: &str,
        call: &mut Call,
    ) -> Result<(Principal, Registry), ApiError> {
        let principal = self
            .state
            .authorize(request, Role::Researcher, call)
            .await?;
        self.state
            .research_limiter
            .check(principal.id)
            .inspect_err(|_| {
                metrics::counter!("ern_rate_limited_total", "limit" => "research_queries")
                    .increment(1);
            })?;
        let registry = self
            .state
            .registry_for(call, &principal, code, "registry")
            .await?;
        Ok((principal, registry))
    }

    /// The caller (a researcher of the registry asked about) and what to count: the
    /// request's (registry, group_by, filters) validated, at most `max` dimensions.
    async fn selection<T>(
        &self,
        request: &Request<T>,
        (registry, group_by, filters): (&str, &[i32], &[proto::Filter]),
        max: usize,
        call: &mut Call,
    ) -> Result<(Principal, Registry, Selection), ApiError> {
        let (principal, registry) = self.researcher_registry(request, registry, call).await?;
        let mut v = FieldViolations::new();
        let group_by = parse_group_by(group_by, max, &mut v);
        let filters = parse_filters(filters, &mut v);
        v.into_result()?;
        let selection = Selection {
            registry_id: registry.id,
            group_by,
            filters,
            now: Utc::now(),
        };
        Ok((principal, registry, selection))
    }

    /// The registries the caller may search for expertise: a researcher's own; for a
    /// physician every registry (finding where expertise is, for a referral, is their
    /// use of it); restricted to `asked` when given.
    async fn expertise_registries(
        &self,
        principal: &Principal,
        asked: &[String],
        v: &mut FieldViolations,
    ) -> Result<Vec<Registry>, ApiError> {
        let all = self.state.store.list_registries().await?;
        let allowed: Vec<Registry> = match principal.role {
            Role::Physician => all,
            Role::Researcher => all
                .into_iter()
                .filter(|r| principal.registries.contains(&r.id))
                .collect(),
            _ => {
                return Err(AuthError::WrongRole {
                    needed: "physician or researcher",
                }
                .into());
            }
        };
        if asked.is_empty() {
            return Ok(allowed);
        }
        let mut chosen = Vec::new();
        for (i, code) in asked.iter().enumerate() {
            let Ok(code) = RegistryCode::parse(code) else {
                v.push(format!("registries[{i}]"), "is not a registry code");
                continue;
            };
            match allowed.iter().find(|r| r.code == code.as_str()) {
                Some(r) => chosen.push(r.clone()),
                None => {
                    return Err(AuthError::ForeignRegistry {
                        registry: code.as_str().into(),
                    }
                    .into());
                }
            }
        }
        Ok(chosen)
    }
}

impl ResearchApi {
    async fn count_patients_inner(
        &self,
        request: Request<proto::CountPatientsRequest>,
        call: &mut Call,
    ) -> Result<Response<proto::CountTable>, Status> {
        let req = request.get_ref();
        let (principal, registry, selection) = self
            .selection(
                &request,
                (&req.registry, &req.group_by, &req.filters),
                MAX_COUNT_DIMENSIONS,
                call,
            )
            .await?;
        let now = selection.now;
        let mut builder = TableBuilder::new();
        self.state
            .store
            .count_patients(&selection, &mut builder)
            .await
            .map_err(ApiError::from)?;
        let rules = rules_of(&registry)?;
        let group_by = selection.group_by.clone();
        let table = self
            .state
            .protection
            .run(move |deadline| builder.finish(&group_by, rules, deadline))
            .await?;
        call.items(table.protected.cells.len());
        info!(
            principal = principal.id,
            registry = %registry.code,
            dimensions = selection.group_by.len(),
            filters = selection.filters.len(),
            cells = table.protected.cells.len(),
            suppressed = table.suppressed(),
            "research count"
        );
        let by_gene = selection.group_by.contains(&Dimension::Gene);
        Ok(Response::new(table_to_proto(
            &registry,
            table,
            by_gene,
            timestamp_to_proto(now),
        )))
    }

    async fn diagnostic_delay_inner(
        &self,
        request: Request<proto::DiagnosticDelayRequest>,
        call: &mut Call,
    ) -> Result<Response<proto::DiagnosticDelayResponse>, Status> {
        let req = request.get_ref();
        let (principal, registry, selection) = self
            .selection(
                &request,
                (&req.registry, &req.group_by, &req.filters),
                MAX_DELAY_DIMENSIONS,
                call,
            )
            .await?;
        let now = selection.now;
        let rules = rules_of(&registry)?;
        let builder = self
            .state
            .store
            .diagnostic_delay(&selection)
            .await
            .map_err(ApiError::from)?;
        let table = self
            .state
            .protection
            .run(move |deadline| builder.finish(rules, deadline))
            .await?;
        call.items(table.groups.len());
        info!(
            principal = principal.id,
            registry = %registry.code,
            groups = table.groups.len(),
            suppressed = table.suppressed,
            "research diagnostic delay"
        );
        Ok(Response::new(proto::DiagnosticDelayResponse {
            registry: registry.code.clone(),
            min_cell_count: registry.min_cell_count as u32,
            protection_level: registry.protection_level as u32,
            group_by: selection.group_by.iter().map(|d| d.to_proto()).collect(),
            bands: DELAY_BANDS.iter().map(|b| b.0.to_string()).collect(),
            groups: table
                .groups
                .into_iter()
                .map(|g| proto::DelayGroup {
                    labels: g.labels,
                    bands: g
                        .bands
                        .into_iter()
                        .map(|c| proto::Cell { count: c })
                        .collect(),
                    total: cell(g.total),
                    quantiles: quantiles(g.quantiles),
                })
                .collect(),
            band_totals: table
                .band_totals
                .into_iter()
                .map(|c| proto::Cell { count: c })
                .collect(),
            grand_total: cell(table.grand_total),
            overall: quantiles(table.overall),
            suppressed: table.suppressed as u32,
            as_of: Some(timestamp_to_proto(now)),
        }))
    }

    async fn find_expertise_inner(
        &self,
        request: Request<proto::FindExpertiseRequest>,
        call: &mut Call,
    ) -> Result<Response<proto::FindExpertiseResponse>, Status> {
        let principal = self.state.authenticate(&request, call).await?;
        if !matches!(principal.role, Role::Physician | Role::Researcher) {
            return Err(ApiError::from(AuthError::WrongRole {
                needed: "physician or researcher",
            })
            .into());
        }
        self.state
            .research_limiter
            .check(principal.id)
            .inspect_err(|_| {
                metrics::counter!("ern_rate_limited_total", "limit" => "research_queries")
                    .increment(1);
            })
            .map_err(ApiError::from)?;
        let req = request.get_ref();
        let mut v = FieldViolations::new();
        if req.orphacodes.is_empty() || req.orphacodes.len() > MAX_EXPERTISE_CODES {
            v.push(
                "orphacodes",
                format!("give 1 to {MAX_EXPERTISE_CODES} Orphacodes"),
            );
        }
        let mut codes = BTreeSet::new();
        for (i, text) in req.orphacodes.iter().take(MAX_EXPERTISE_CODES).enumerate() {
            match Orphacode::parse(text) {
                Ok(c) if c.number() == ORPHA_UNDIAGNOSED => v.push(
                    format!("orphacodes[{i}]"),
                    "is the code of undiagnosed cases, not a diagnosis",
                ),
                Ok(c) => {
                    codes.insert(i64::from(c.number()));
                }
                Err(e) => v.push(format!("orphacodes[{i}]"), e.to_string()),
            }
        }
        if req.countries.len() > MAX_FILTER_VALUES {
            v.push("countries", format!("at most {MAX_FILTER_VALUES}"));
        }
        let mut countries = BTreeSet::new();
        for (i, text) in req.countries.iter().take(MAX_FILTER_VALUES).enumerate() {
            match CountryCode::parse(text) {
                Ok(c) => {
                    countries.insert(c.as_str().to_string());
                }
                Err(e) => v.push(format!("countries[{i}]"), e.to_string()),
            }
        }
        if req.registries.len() > 64 {
            v.push("registries", "at most 64");
        }
        let registries = if req.registries.len() > 64 {
            Vec::new()
        } else {
            self.expertise_registries(&principal, &req.registries, &mut v)
                .await?
        };
        v.into_result().map_err(ApiError::from)?;
        let now = Utc::now();
        let ids: Vec<i64> = registries.iter().map(|r| r.id).collect();
        let codes: Vec<i64> = codes.into_iter().collect();
        let countries: Vec<String> = countries.into_iter().collect();
        let rows = self
            .state
            .store
            .expertise(&codes, &ids, &countries, now)
            .await
            .map_err(ApiError::from)?;
        let mut centres: Vec<(aggregate::VolumeBand, proto::ExpertiseCentre)> = rows
            .into_iter()
            .filter_map(|row| {
                let registry = registries.iter().find(|r| r.id == row.registry_id)?;
                let band = aggregate::volume_band(
                    row.cases,
                    registry.min_cell_count as u64,
                    registry.protection_level as u64,
                );
                let centre = proto::ExpertiseCentre {
                    centre_code: row.centre_code,
                    centre_name: row.centre_name,
                    country: row.country,
                    registry: registry.code.clone(),
                    volume: Some(proto::VolumeBand {
                        min: band.min as u32,
                        max: band.max.map(|m| m as u32),
                        label: band.label(),
                    }),
                };
                Some((band, centre))
            })
            .collect();
        // Largest band first; within a band by centre code, never by the exact count.
        centres.sort_by(|(a, ca), (b, cb)| {
            b.min
                .cmp(&a.min)
                .then_with(|| ca.centre_code.cmp(&cb.centre_code))
                .then_with(|| ca.registry.cmp(&cb.registry))
        });
        call.items(centres.len());
        info!(
            principal = principal.id,
            role = principal.role.as_str(),
            codes = codes.len(),
            centres = centres.len(),
            "research expertise"
        );
        Ok(Response::new(proto::FindExpertiseResponse {
            centres: centres.into_iter().map(|(_, c)| c).collect(),
            registries: registries.iter().map(|r| r.code.clone()).collect(),
            as_of: Some(timestamp_to_proto(now)),
        }))
    }
}

#[tonic::async_trait]
impl ResearchService for ResearchApi {
    async fn count_patients(
        &self,
        request: Request<proto::CountPatientsRequest>,
    ) -> Result<Response<proto::CountTable>, Status> {
        audited!(
            self,
            "ResearchService/CountPatients",
            count_patients_inner,
            request
        )
    }

    async fn diagnostic_delay(
        &self,
        request: Request<proto::DiagnosticDelayRequest>,
    ) -> Result<Response<proto::DiagnosticDelayResponse>, Status> {
        audited!(
            self,
            "ResearchService/DiagnosticDelay",
            diagnostic_delay_inner,
            request
        )
    }

    async fn find_expertise(
        &self,
        request: Request<proto::FindExpertiseRequest>,
    ) -> Result<Response<proto::FindExpertiseResponse>, Status> {
        audited!(
            self,
            "ResearchService/FindExpertise",
            find_expertise_inner,
            request
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::Key;

    /// A one-way table with small cells, so protection has work to do.
    fn builder() -> TableBuilder {
        let mut b = TableBuilder::new();
        for (i, n) in [1u64, 2, 30, 3, 40].into_iter().enumerate() {
            b.add(vec![Key::Int(i as i64)], n).unwrap();
        }
        b
    }

    #[tokio::test]
    async fn a_table_not_proven_in_time_is_refused_not_published() {
        let pool = ProtectionPool::new(1, Duration::ZERO);
        let rules = Rules::new(5, 1).unwrap();
        let b = builder();
        let err = pool
            .run(move |deadline| b.finish(&[Dimension::Sex], rules, deadline))
            .await
            .unwrap_err();
        let status = Status::from(err);
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        assert!(status.message().contains("coarser") || status.message().contains("fewer"));
    }

    #[tokio::test]
    async fn protection_runs_within_its_budget_off_the_runtime() {
        let pool = ProtectionPool::new(1, Duration::from_secs(5));
        let rules = Rules::new(5, 1).unwrap();
        let b = builder();
        let table = pool
            .run(move |deadline| b.finish(&[Dimension::Sex], rules, deadline))
            .await
            .unwrap();
        assert_eq!(table.protected.cells[0], None);
        assert_eq!(table.protected.grand_total, Some(76));
    }
}
