//! `ResearchService`: aggregate queries with small-count suppression.
//!
//! Thin: validates the request into dimensions and filters, lets
//! `crate::service::research` answer (who may ask, the allowance, protection), converts
//! the table. Nothing here ever sees a row or a pseudonym.

use std::collections::BTreeSet;

use prost_types::Timestamp;
use tonic::{Request, Response, Status};

use super::convert::timestamp_to_proto;
use super::{SharedState, audited, authenticate};
use crate::aggregate::{
    CountTable, DELAY_BANDS, Dimension, Filter, MAX_COUNT_DIMENSIONS, MAX_DELAY_DIMENSIONS,
    MAX_EXPERTISE_CODES, MAX_FILTER_VALUES, Quantiles,
};
use crate::domain::{CountryCode, FieldViolations, HpoTerm, ORPHA_UNDIAGNOSED, Orphacode};
use crate::proto::{self, research_service_server::ResearchService};
use crate::service::research::{self, Along, ResearchAccess};
use crate::service::{Call, ServiceError};
use crate::store::Registry;

pub struct ResearchApi {
    state: SharedState,
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
            // A filter only (`parse_filters`): not a dimension of tables.
            P::Unspecified | P::Phenotype => return None,
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
            None if value == proto::Dimension::Phenotype as i32 => v.push(
                format!("group_by[{i}]"),
                "PHENOTYPE is a filter only: a patient has many terms",
            ),
            None => v.push(format!("group_by[{i}]"), "is not a dimension"),
            Some(d) if !seen.insert(d) => v.push(format!("group_by[{i}]"), "is repeated"),
            Some(d) => dims.push(d),
        }
    }
    dims
}

/// The PHENOTYPE filter: HPO terms (by format; a term no release knows matches what is
/// stored under it), with or without their descendants.
fn parse_phenotypes(f: &proto::Filter, field: &str, v: &mut FieldViolations) -> Along {
    let mut along = Along {
        phenotype_descendants: f.include_descendants,
        ..Along::default()
    };
    if f.values.is_empty() || f.values.len() > MAX_FILTER_VALUES {
        v.push(
            format!("{field}.values"),
            format!("give 1 to {MAX_FILTER_VALUES} values"),
        );
        return along;
    }
    for (j, text) in f.values.iter().enumerate() {
        match HpoTerm::parse(text) {
            Ok(t) if !along.phenotypes.contains(&t) => along.phenotypes.push(t),
            Ok(_) => {}
            Err(e) => v.push(format!("{field}.values[{j}]"), e.to_string()),
        }
    }
    along
}

fn parse_filters(filters: &[proto::Filter], v: &mut FieldViolations) -> (Vec<Filter>, Along) {
    let mut along = Along::default();
    if filters.len() > Dimension::ALL.len() + 1 {
        v.push("filters", "at most one filter per dimension");
        return (Vec::new(), along);
    }
    let mut seen = BTreeSet::new();
    let mut out = Vec::with_capacity(filters.len());
    for (i, f) in filters.iter().enumerate() {
        let field = format!("filters[{i}]");
        if f.dimension == proto::Dimension::Phenotype as i32 {
            if !along.phenotypes.is_empty() {
                v.push(format!("{field}.dimension"), "has another filter already");
                continue;
            }
            let phenotypes = parse_phenotypes(f, &field, v);
            along.phenotypes = phenotypes.phenotypes;
            along.phenotype_descendants = phenotypes.phenotype_descendants;
            continue;
        }
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
        if f.include_descendants {
            if dimension == Dimension::Diagnosis {
                along.diagnosis_subtypes = true;
            } else {
                v.push(
                    format!("{field}.include_descendants"),
                    "only DIAGNOSIS and PHENOTYPE have descendants",
                );
            }
        }
        out.push(Filter { dimension, values });
    }
    (out, along)
}

fn code_names(names: Vec<(String, String)>) -> Vec<proto::CodeName> {
    names
        .into_iter()
        .map(|(code, name)| proto::CodeName { code, name })
        .collect()
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
        // One per column: a table that matched nobody has none (its protected form is a
        // single zero cell, with a total for a column that is not published).
        column_totals: p
            .col_totals
            .iter()
            .take(table.column_labels.len())
            .map(|c| proto::Cell { count: *c })
            .collect(),
        grand_total: cell(p.grand_total),
        suppressed: table.suppressed() as u32,
        as_of: Some(as_of),
        names: Vec::new(),
    }
}

impl ResearchApi {
    /// The caller (a researcher of the registry asked about) and what to count: the
    /// request's (registry, group_by, filters) validated, at most `max` dimensions.
    async fn selection<T>(
        &self,
        request: &Request<T>,
        (registry, group_by, filters): (&str, &[i32], &[proto::Filter]),
        max: usize,
        call: &mut Call,
    ) -> Result<(ResearchAccess, Vec<Dimension>, Vec<Filter>, Along), ServiceError> {
        let principal = authenticate(&self.state, request, call).await?;
        let access = research::open(&self.state, &principal, registry, call).await?;
        let mut v = FieldViolations::new();
        let group_by = parse_group_by(group_by, max, &mut v);
        let (filters, along) = parse_filters(filters, &mut v);
        v.into_result()?;
        Ok((access, group_by, filters, along))
    }

    async fn count_patients_inner(
        &self,
        request: Request<proto::CountPatientsRequest>,
        call: &mut Call,
    ) -> Result<Response<proto::CountTable>, Status> {
        let req = request.get_ref();
        let (access, group_by, filters, along) = self
            .selection(
                &request,
                (&req.registry, &req.group_by, &req.filters),
                MAX_COUNT_DIMENSIONS,
                call,
            )
            .await?;
        let counted =
            research::count_patients(&self.state, &access, group_by, filters, &along, call).await?;
        let mut names = Vec::new();
        let table = &counted.table;
        if let Some(d) = table.row_dimension {
            names.extend(research::names(&self.state, d, &table.row_labels));
        }
        for (c, d) in table.column_dimensions.iter().enumerate() {
            let labels: Vec<String> = table
                .column_labels
                .iter()
                .filter_map(|values| values.get(c).cloned())
                .collect();
            names.extend(research::names(&self.state, *d, &labels));
        }
        let mut answer = table_to_proto(
            access.registry(),
            counted.table,
            counted.by_gene,
            timestamp_to_proto(counted.as_of),
        );
        answer.names = code_names(names);
        Ok(Response::new(answer))
    }

    async fn diagnostic_delay_inner(
        &self,
        request: Request<proto::DiagnosticDelayRequest>,
        call: &mut Call,
    ) -> Result<Response<proto::DiagnosticDelayResponse>, Status> {
        let req = request.get_ref();
        let (access, group_by, filters, along) = self
            .selection(
                &request,
                (&req.registry, &req.group_by, &req.filters),
                MAX_DELAY_DIMENSIONS,
                call,
            )
            .await?;
        let dimensions: Vec<i32> = group_by.iter().map(|d| d.to_proto()).collect();
        let grouped = group_by.clone();
        let by_gene = group_by.contains(&Dimension::Gene);
        let (table, now) =
            research::diagnostic_delay(&self.state, &access, group_by, filters, &along, call)
                .await?;
        let mut names = Vec::new();
        for (i, d) in grouped.iter().enumerate() {
            let labels: Vec<String> = table
                .groups
                .iter()
                .filter_map(|g| g.labels.get(i).cloned())
                .collect();
            names.extend(research::names(&self.state, *d, &labels));
        }
        let registry = access.registry();
        Ok(Response::new(proto::DiagnosticDelayResponse {
            registry: registry.code.clone(),
            min_cell_count: registry.min_cell_count as u32,
            protection_level: registry.protection_level as u32,
            group_by: dimensions,
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
            names: code_names(names),
            unit: if by_gene {
                "patient-gene pairs"
            } else {
                "patients"
            }
            .to_string(),
        }))
    }

    async fn find_expertise_inner(
        &self,
        request: Request<proto::FindExpertiseRequest>,
        call: &mut Call,
    ) -> Result<Response<proto::FindExpertiseResponse>, Status> {
        let principal = authenticate(&self.state, &request, call).await?;
        let access = research::open_expertise(&self.state, &principal)?;
        let req = request.get_ref();
        let mut v = FieldViolations::new();
        let mut codes = BTreeSet::new();
        let by_name = !req.disease_name_prefix.is_empty();
        if by_name {
            let prefix = req.disease_name_prefix.trim();
            if !req.orphacodes.is_empty() {
                v.push(
                    "disease_name_prefix",
                    "give Orphacodes or a disease name prefix, not both",
                );
            } else if !(3..=100).contains(&prefix.chars().count()) {
                v.push("disease_name_prefix", "must be 3 to 100 characters");
            } else {
                for (code, _) in research::diseases_named(&self.state, prefix, MAX_EXPERTISE_CODES)?
                {
                    if let Ok(c) = Orphacode::parse(&code)
                        && c.number() != ORPHA_UNDIAGNOSED
                    {
                        codes.insert(i64::from(c.number()));
                    }
                }
            }
        } else if req.orphacodes.is_empty() || req.orphacodes.len() > MAX_EXPERTISE_CODES {
            v.push(
                "orphacodes",
                format!("give 1 to {MAX_EXPERTISE_CODES} Orphacodes"),
            );
        }
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
            research::expertise_registries(&self.state, &access, &req.registries, &mut v).await?
        };
        v.into_result().map_err(ServiceError::from)?;
        let codes: Vec<i64> = codes.into_iter().collect();
        let countries: Vec<String> = countries.into_iter().collect();
        let diseases: Vec<proto::CodeName> = codes
            .iter()
            .map(|n| {
                let code = format!("ORPHA:{n}");
                let name = research::names(
                    &self.state,
                    Dimension::Diagnosis,
                    std::slice::from_ref(&code),
                )
                .pop()
                .map(|(_, name)| name)
                .unwrap_or_default();
                proto::CodeName { code, name }
            })
            .collect();
        let (centres, now) = if codes.is_empty() {
            // No disease has a name with the prefix: nowhere to look. Logged as any answer.
            tracing::info!(
                principal = principal.id,
                role = principal.role.as_str(),
                registries = registries.len(),
                codes = 0,
                centres = 0,
                "research expertise"
            );
            (Vec::new(), self.state.clock.now())
        } else {
            research::find_expertise(&self.state, &access, &codes, &countries, &registries, call)
                .await?
        };
        Ok(Response::new(proto::FindExpertiseResponse {
            centres: centres
                .into_iter()
                .map(|c| proto::ExpertiseCentre {
                    centre_code: c.centre_code,
                    centre_name: c.centre_name,
                    country: c.country,
                    registry: c.registry,
                    volume: Some(proto::VolumeBand {
                        min: c.volume.min as u32,
                        max: c.volume.max.map(|m| m as u32),
                        label: c.volume.label(),
                    }),
                })
                .collect(),
            registries: registries.iter().map(|r| r.code.clone()).collect(),
            as_of: Some(timestamp_to_proto(now)),
            diseases,
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
