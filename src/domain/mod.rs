//! Domain types of the case record: parsed once at the edge, valid by construction.
//!
//! Every type here is built from untrusted protobuf input by a `parse` constructor that
//! returns `Result`; once a value has the type, nothing downstream re-checks it
//! ("parse, don't validate"). Conversions from whole messages collect *all* field
//! violations, so a client fixes a bad record in one round trip. This module does no
//! I/O, no crypto and no consent logic.

/// One invalid field of a request, by its path in the request message.
///
/// Descriptions say what is expected, never echo the rejected value: input may contain
/// patient identifiers or clinical data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    pub field: String,
    pub description: String,
}

/// All the field violations of one request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldViolations(Vec<FieldViolation>);

impl FieldViolations {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.0.push(FieldViolation {
            field: field.into(),
            description: description.into(),
        });
    }

    /// Records the error of a parse result under `field`, returning the value if any.
    pub fn check<T, E: std::fmt::Display>(
        &mut self,
        field: impl Into<String>,
        result: Result<T, E>,
    ) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(err) => {
                self.push(field, err.to_string());
                None
            }
        }
    }

    /// Prefixes every field path with `prefix.` (for nested messages).
    pub fn nest(mut self, prefix: &str) -> Self {
        for v in &mut self.0 {
            v.field = format!("{prefix}.{}", v.field);
        }
        self
    }

    pub fn extend(&mut self, other: FieldViolations) {
        self.0.extend(other.0);
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = &FieldViolation> {
        self.0.iter()
    }

    /// `Ok(())` when there is nothing to report.
    pub fn into_result(self) -> Result<(), FieldViolations> {
        if self.0.is_empty() { Ok(()) } else { Err(self) }
    }
}

impl std::fmt::Display for FieldViolations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} invalid field(s)", self.0.len())
    }
}

impl std::error::Error for FieldViolations {}

mod catalog;
mod codes;
mod dates;
mod record;

pub use catalog::{AliasKind, CodeCatalog, CodeSystem, Lookup, Release, ReleaseInfo, Replacement};
pub use codes::{
    CentreCode, ClientReference, CountryCode, DomainError, HgncSymbol, HgvsVariant, HpoTerm, Icd10,
    Icd11, IcfCode, ORPHA_UNDIAGNOSED, Omim, Orphacode, RegistryCode,
};
pub use dates::{MIN_YEAR, PartialDate, YearMonth};
pub use record::{
    CaseRecord, FindingInput, GeneticFinding, MAX_GENETIC_FINDINGS, MAX_HPO_TERMS, MAX_ICD10,
    MAX_ICD11, MAX_ICF_CODES, MAX_OMIM, MAX_VARIANTS_PER_GENE, Onset, OnsetKind, PatientStatus,
    RecordInput, Sex,
};
