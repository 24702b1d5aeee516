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

/// Violations one request's answer lists at most; the rest are counted. A request of a few
/// kilobytes with every entry invalid has over 1,500, and an answer's details travel in
/// its headers, which no HTTP/2 flow control holds back (`docs/security.md`).
pub const MAX_LISTED_VIOLATIONS: usize = 100;

/// Bytes a violation's field path keeps at most: its start and its end around "…". A
/// phenopacket's JSON paths nest as deep as its JSON (`VariationSet.members` is
/// recursive).
pub const MAX_FIELD_PATH: usize = 160;

/// Bytes of field paths and descriptions one request's answer lists at most: a deep
/// phenopacket's paths and a code release's hints (near terms with their labels) make
/// some violations a few hundred bytes, and 100 of them 22 KB of details (measured
/// 2026-12-06), sent in the answer's headers. 4 KiB keeps the details, in base64, with
/// the rest of the trailers under 8 KiB, what grpc-java takes by default.
pub const MAX_LISTED_BYTES: usize = 4 << 10;

/// All the field violations of one request: the first ones listed, at most
/// [`MAX_LISTED_VIOLATIONS`] of at most [`MAX_LISTED_BYTES`] in all, the rest counted,
/// with the field of the first of them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldViolations {
    listed: Vec<FieldViolation>,
    /// Bytes of the listed ones' paths and descriptions.
    listed_bytes: usize,
    omitted: usize,
    first_omitted: Option<String>,
}

fn size(v: &FieldViolation) -> usize {
    v.field.len() + v.description.len()
}

/// `field` cut to [`MAX_FIELD_PATH`] bytes: its start and its end around "…".
fn short_path(field: String) -> String {
    if field.len() <= MAX_FIELD_PATH {
        return field;
    }
    const HEAD: usize = MAX_FIELD_PATH / 2 - 8;
    const TAIL: usize = MAX_FIELD_PATH / 2;
    let head = (0..=HEAD)
        .rev()
        .find(|&i| field.is_char_boundary(i))
        .unwrap_or(0);
    let tail = (field.len() - TAIL..field.len())
        .find(|&i| field.is_char_boundary(i))
        .unwrap_or(field.len());
    format!("{}…{}", &field[..head], &field[tail..])
}

impl FieldViolations {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, field: impl Into<String>, description: impl Into<String>) {
        let field = short_path(field.into());
        let description = description.into();
        let bytes = field.len() + description.len();
        if self.omitted == 0
            && self.listed.len() < MAX_LISTED_VIOLATIONS
            && self.listed_bytes + bytes <= MAX_LISTED_BYTES
        {
            self.listed_bytes += bytes;
            self.listed.push(FieldViolation { field, description });
        } else {
            self.omitted += 1;
            self.first_omitted.get_or_insert(field);
        }
    }

    /// Moves the last listed violations past [`MAX_LISTED_BYTES`] to the omitted ones
    /// (after their paths grew).
    fn within_budget(&mut self) {
        let mut listed = 0;
        let keep = self
            .listed
            .iter()
            .take_while(|v| {
                listed += size(v);
                listed <= MAX_LISTED_BYTES
            })
            .count();
        if keep < self.listed.len() {
            let cut: Vec<FieldViolation> = self.listed.drain(keep..).collect();
            self.omitted += cut.len();
            self.first_omitted = cut.into_iter().next().map(|v| v.field);
        }
        self.listed_bytes = self.listed.iter().map(size).sum();
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
    pub fn nest(self, prefix: &str) -> Self {
        self.map_fields(|field| format!("{prefix}.{field}"))
    }

    /// Every field path (the first omitted one's too) as `f` names it.
    pub fn map_fields(mut self, mut f: impl FnMut(&str) -> String) -> Self {
        for v in &mut self.listed {
            v.field = short_path(f(&v.field));
        }
        if let Some(field) = &mut self.first_omitted {
            *field = short_path(f(field));
        }
        self.within_budget();
        self
    }

    /// The listed violations `keep` keeps; the omitted ones stay counted (unseen, they
    /// cannot be told apart).
    pub fn retain(mut self, keep: impl FnMut(&FieldViolation) -> bool) -> Self {
        self.listed.retain(keep);
        self.listed_bytes = self.listed.iter().map(size).sum();
        self
    }

    pub fn extend(&mut self, other: FieldViolations) {
        for v in other.listed {
            self.push(v.field, v.description);
        }
        if let Some(field) = other.first_omitted {
            self.first_omitted.get_or_insert(field);
        }
        self.omitted += other.omitted;
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every violation, listed or not.
    pub fn len(&self) -> usize {
        self.listed.len() + self.omitted
    }

    /// The listed violations.
    pub fn iter(&self) -> impl Iterator<Item = &FieldViolation> {
        self.listed.iter()
    }

    /// The violations not listed: the field of the first, and how many.
    pub fn omitted(&self) -> Option<(&str, usize)> {
        self.first_omitted.as_deref().map(|f| (f, self.omitted))
    }

    /// `Ok(())` when there is nothing to report.
    pub fn into_result(self) -> Result<(), FieldViolations> {
        if self.is_empty() { Ok(()) } else { Err(self) }
    }
}

impl std::fmt::Display for FieldViolations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} invalid field(s)", self.len())
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
pub use dates::{MIN_YEAR, PartialDate, YearMonth, whole_months};
pub use record::{
    CaseRecord, FindingInput, GeneticFinding, MAX_GENETIC_FINDINGS, MAX_HPO_TERMS, MAX_ICD10,
    MAX_ICD11, MAX_ICF_CODES, MAX_OMIM, MAX_VARIANTS_PER_GENE, Onset, OnsetKind, PatientStatus,
    RecordInput, Sex, birth_anchor, birth_midpoint, delay_months_of, diagnosis_age_days_of,
    least_whole_months, most_whole_months, onset_age_days_of,
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn violations_past_the_cap_are_counted_not_kept() {
        let mut v = FieldViolations::new();
        for i in 0..1_536 {
            v.push(format!("hpo_terms[{i}]"), "is not an HPO term");
        }
        assert_eq!(v.len(), 1_536);
        assert_eq!(v.iter().count(), MAX_LISTED_VIOLATIONS);
        assert_eq!(v.omitted(), Some(("hpo_terms[100]", 1_436)));
        // Nested and merged, the counts and the first omitted field follow.
        let mut all = FieldViolations::new();
        all.push("registry", "is required");
        all.extend(v.nest("record"));
        assert_eq!(all.len(), 1_537);
        assert_eq!(all.iter().count(), MAX_LISTED_VIOLATIONS);
        assert_eq!(all.iter().last().unwrap().field, "record.hpo_terms[98]");
        assert_eq!(all.omitted(), Some(("record.hpo_terms[99]", 1_437)));
        assert_eq!(all.to_string(), "1537 invalid field(s)");
        // Renamed or filtered, the omitted ones stay counted.
        let renamed = all.map_fields(|f| f.replace("record.hpo_terms", "features"));
        assert_eq!(renamed.omitted(), Some(("features[99]", 1_437)));
        let kept = renamed.retain(|v| v.field != "registry");
        assert_eq!((kept.len(), kept.iter().count()), (1_536, 99));
        // Under the cap nothing is omitted.
        let mut few = FieldViolations::new();
        few.push("a", "b");
        assert_eq!(few.omitted(), None);
        assert!(FieldViolations::new().into_result().is_ok());
    }

    #[test]
    fn the_listed_violations_keep_to_a_byte_budget() {
        let listed_bytes = |v: &FieldViolations| v.iter().map(size).sum::<usize>();
        let mut v = FieldViolations::new();
        let hint = "is not a term of the release in force; near terms: ".repeat(4);
        for i in 0..100 {
            v.push(format!("record.hpo_terms[{i}]"), hint.clone());
        }
        assert_eq!(v.len(), 100);
        let listed = v.iter().count();
        assert!(listed < 100 && listed > 10, "{listed}");
        assert!(listed_bytes(&v) <= MAX_LISTED_BYTES);
        assert_eq!(
            v.omitted(),
            Some((format!("record.hpo_terms[{listed}]").as_str(), 100 - listed))
        );
        // A small one after them is not listed out of order.
        v.push("registry", "is required");
        assert_eq!(v.iter().count(), listed);
        // Paths that grow when nested are held to the budget again.
        let nested = v.nest(&"x".repeat(150));
        assert!(listed_bytes(&nested) <= MAX_LISTED_BYTES);
        assert!(nested.iter().count() < listed);
        assert_eq!(nested.len(), 101);
        let first = nested.omitted().unwrap().0.to_string();
        assert!(
            first.ends_with(&format!(".record.hpo_terms[{}]", nested.iter().count())),
            "{first}"
        );
    }

    #[test]
    fn a_long_field_path_keeps_its_start_and_its_end() {
        let deep = format!("phenopacket{}.unknownKey", ".members[0]".repeat(40));
        let mut v = FieldViolations::new();
        v.push(deep.clone(), "is not a field of the message");
        let kept = &v.iter().next().unwrap().field;
        assert!(kept.len() <= MAX_FIELD_PATH, "{} bytes", kept.len());
        assert!(kept.starts_with("phenopacket.members[0]"), "{kept}");
        assert!(kept.ends_with(".members[0].unknownKey"), "{kept}");
        assert!(kept.contains('…'));
        // Nesting cuts again; multi-byte characters are cut at their boundaries.
        let nested = v.nest(&"ü".repeat(200));
        let kept = &nested.iter().next().unwrap().field;
        assert!(kept.len() <= MAX_FIELD_PATH, "{} bytes", kept.len());
        assert!(
            kept.starts_with("üü") && kept.ends_with(".unknownKey"),
            "{kept}"
        );
        // A short path is kept whole.
        let mut short = FieldViolations::new();
        short.push("record.sex", "is required");
        assert_eq!(short.iter().next().unwrap().field, "record.sex");
    }
}
