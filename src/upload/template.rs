//! The CSV template of `ern-registry upload`: one case per row, in columns a spreadsheet
//! can hold, turned into a `SubmitCaseRequest`. Pure: no I/O.
//!
//! Multi-valued cells separate their values with `;`. Enumerations take their short
//! lower-case names (`female`, `lost_to_follow_up`, `at_birth`) or the proto's names
//! (`SEX_FEMALE`). A cell that cannot be read is reported under the request field it
//! fills (`record.sex`), like the server's own checks, and never echoed: cells hold
//! identifiers and clinical data.

use chrono::{DateTime, NaiveDate, Utc};

use crate::domain::FieldViolations;
use crate::proto;

/// The template's columns, in order, with what each holds (the README's table).
pub const COLUMNS: &[(&str, &str)] = &[
    (
        "client_reference",
        "your label of the row (letters, digits, -_.:, at most 64; no identifiers); empty: line:N",
    ),
    (
        "national_id_country",
        "ISO 3166-1 alpha-2 country that issued the national identifier, e.g. NL",
    ),
    ("national_id", "the national identifier (for NL the BSN)"),
    (
        "given_names",
        "demographic identification (when there is no national identifier)",
    ),
    ("family_name", "demographic identification"),
    ("date_of_birth", "demographic identification, YYYY-MM-DD"),
    (
        "sex_at_birth",
        "demographic identification: female, male, undetermined, unknown",
    ),
    ("place_of_birth", "demographic identification"),
    (
        "country_of_birth",
        "demographic identification, ISO 3166-1 alpha-2",
    ),
    ("birth_year_month", "YYYY-MM"),
    ("sex", "female, male, undetermined, unknown"),
    ("status", "alive, deceased, lost_to_follow_up, opted_out"),
    (
        "date_of_death",
        "partial date (YYYY, YYYY-MM or YYYY-MM-DD)",
    ),
    ("first_contact_date", "partial date"),
    ("onset_kind", "antenatal, at_birth, date, unknown"),
    ("onset_date", "partial date; with onset_kind date"),
    ("undiagnosed", "true or false (empty: false)"),
    ("orphacode", "ORPHA:nnnn"),
    ("icd10", "ICD-10 codes; separated by ;"),
    ("icd11", "ICD-11 codes; separated by ;"),
    ("omim", "OMIM:nnnnnn entries; separated by ;"),
    ("diagnosis_date", "partial date"),
    (
        "genetic_findings",
        "GENE or GENE=HGVS variant; separated by ; (a gene's variants are merged)",
    ),
    ("hpo_terms", "HP:nnnnnnn; separated by ;"),
    ("icf_codes", "ICF codes; separated by ;"),
    (
        "consent_registry_inclusion",
        "granted or refused (empty: none attested)",
    ),
    ("consent_research_use", "granted or refused"),
    ("consent_recontact", "granted or refused"),
    (
        "consent_given_at",
        "when the consent form was signed: YYYY-MM-DD or RFC 3339",
    ),
    ("consent_form_version", "e.g. ERN-LUNG-2024-01"),
    ("consent_expires_at", "optional: YYYY-MM-DD or RFC 3339"),
];

/// The example row printed by `upload --template` (a valid case, with a synthetic
/// identifier of the issuer `XT`, which no country can hold).
pub const EXAMPLE: &[&str] = &[
    "case-0001",
    "XT",
    "SYN900000001",
    "",
    "",
    "",
    "",
    "",
    "",
    "2015-06",
    "female",
    "alive",
    "",
    "2015-10",
    "date",
    "2015-09",
    "false",
    "ORPHA:586",
    "E84.0",
    "",
    "",
    "2016-03-14",
    "CFTR=NM_000492.4:c.1521_1523del",
    "HP:0006528;HP:0002205",
    "",
    "granted",
    "granted",
    "",
    "2024-03-01",
    "ERN-LUNG-2024-01",
    "",
];

/// The template: the header and the example row, as CSV text.
pub fn template() -> String {
    let mut out = csv::Writer::from_writer(Vec::new());
    out.write_record(COLUMNS.iter().map(|(name, _)| *name))
        .expect("in memory");
    out.write_record(EXAMPLE).expect("in memory");
    String::from_utf8(out.into_inner().expect("in memory")).expect("UTF-8")
}

/// Where each template column sits in a file's header.
#[derive(Debug, Clone)]
pub struct Header {
    index: Vec<Option<usize>>,
}

impl Header {
    /// Reads a file's header. Unknown columns (a typo would drop data silently) and
    /// repeated ones are refused; the template's columns may come in any order, and any
    /// may be missing (read as empty).
    pub fn parse(names: &csv::StringRecord) -> Result<Header, String> {
        let mut index = vec![None; COLUMNS.len()];
        for (at, name) in names.iter().enumerate() {
            let name = name.trim().trim_start_matches('\u{feff}');
            let Some(column) = COLUMNS.iter().position(|(c, _)| *c == name) else {
                return Err(format!(
                    "column {} of the header is not a template column (see `ern-registry upload --template`)",
                    at + 1
                ));
            };
            if index[column].replace(at).is_some() {
                return Err(format!("column {name} appears twice in the header"));
            }
        }
        Ok(Header { index })
    }

    fn cell<'a>(&self, row: &'a csv::StringRecord, name: &str) -> &'a str {
        let column = COLUMNS
            .iter()
            .position(|(c, _)| *c == name)
            .expect("a template column");
        self.index[column]
            .and_then(|at| row.get(at))
            .map(str::trim)
            .unwrap_or("")
    }
}

/// The values of a multi-valued cell.
fn list(cell: &str) -> Vec<String> {
    cell.split(';')
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
        .collect()
}

/// An enumeration cell: a short name, or the proto's full name. Empty is 0 (unspecified,
/// which the checks then refuse where a value is required).
fn enumeration(
    cell: &str,
    prefix: &str,
    names: &[(&str, i32)],
    field: &str,
    violations: &mut FieldViolations,
) -> i32 {
    if cell.is_empty() {
        return 0;
    }
    let short = cell
        .strip_prefix(prefix)
        .unwrap_or(cell)
        .to_ascii_lowercase()
        .replace([' ', '-'], "_");
    match names.iter().find(|(name, _)| *name == short) {
        Some((_, value)) => *value,
        None => {
            let expected: Vec<&str> = names.iter().map(|(n, _)| *n).collect();
            violations.push(field, format!("one of {}", expected.join(", ")));
            0
        }
    }
}

const SEXES: &[(&str, i32)] = &[
    ("female", proto::Sex::Female as i32),
    ("male", proto::Sex::Male as i32),
    ("undetermined", proto::Sex::Undetermined as i32),
    ("unknown", proto::Sex::Unknown as i32),
];

const STATUSES: &[(&str, i32)] = &[
    ("alive", proto::PatientStatus::Alive as i32),
    ("deceased", proto::PatientStatus::Deceased as i32),
    (
        "lost_to_follow_up",
        proto::PatientStatus::LostToFollowUp as i32,
    ),
    ("opted_out", proto::PatientStatus::OptedOut as i32),
];

const ONSETS: &[(&str, i32)] = &[
    ("antenatal", proto::OnsetKind::Antenatal as i32),
    ("at_birth", proto::OnsetKind::AtBirth as i32),
    ("date", proto::OnsetKind::Date as i32),
    ("unknown", proto::OnsetKind::Unknown as i32),
];

const STATES: &[(&str, i32)] = &[
    ("granted", proto::ConsentState::Granted as i32),
    ("refused", proto::ConsentState::Refused as i32),
];

/// A point in time: a date (midnight UTC) or RFC 3339.
fn instant(cell: &str, field: &str, violations: &mut FieldViolations) -> Option<DateTime<Utc>> {
    if let Ok(date) = NaiveDate::parse_from_str(cell, "%Y-%m-%d") {
        return Some(date.and_hms_opt(0, 0, 0)?.and_utc());
    }
    match DateTime::parse_from_rfc3339(cell) {
        Ok(t) => Some(t.with_timezone(&Utc)),
        Err(_) => {
            violations.push(field, "a date YYYY-MM-DD or an RFC 3339 instant");
            None
        }
    }
}

fn truth(cell: &str, field: &str, violations: &mut FieldViolations) -> bool {
    match cell.to_ascii_lowercase().as_str() {
        "" | "false" | "no" | "0" => false,
        "true" | "yes" | "1" => true,
        _ => {
            violations.push(field, "true or false");
            false
        }
    }
}

/// Reads one row of the template into a request for `registry`. The violations are
/// those of reading the cells (an unknown enumeration name, a malformed instant); the
/// request's content is checked afterwards like any other (`super::check`).
pub fn parse_row(
    header: &Header,
    row: &csv::StringRecord,
    registry: &str,
) -> (proto::SubmitCaseRequest, FieldViolations) {
    let mut v = FieldViolations::new();
    let cell = |name: &str| header.cell(row, name);

    let demographic_columns = [
        "given_names",
        "family_name",
        "date_of_birth",
        "sex_at_birth",
        "place_of_birth",
        "country_of_birth",
    ];
    let national = !cell("national_id").is_empty() || !cell("national_id_country").is_empty();
    let demographic = demographic_columns.iter().any(|c| !cell(c).is_empty());
    let kind = match (national, demographic) {
        (true, true) => {
            v.push(
                "patient",
                "give either national_id_country and national_id or the demographic columns, not both",
            );
            None
        }
        (true, false) => Some(proto::patient_identifiers::Kind::National(
            proto::NationalIdentifier {
                issuing_country: cell("national_id_country").to_owned(),
                value: cell("national_id").to_owned(),
            },
        )),
        (false, true) => Some(proto::patient_identifiers::Kind::Demographic(
            proto::DemographicIdentifiers {
                given_names: cell("given_names").to_owned(),
                family_name: cell("family_name").to_owned(),
                date_of_birth: cell("date_of_birth").to_owned(),
                sex_at_birth: enumeration(
                    cell("sex_at_birth"),
                    "SEX_",
                    SEXES,
                    "patient.demographic.sex_at_birth",
                    &mut v,
                ),
                place_of_birth: cell("place_of_birth").to_owned(),
                country_of_birth: cell("country_of_birth").to_owned(),
            },
        )),
        // No identification at all: the check reports `patient` as required.
        (false, false) => None,
    };
    let patient = kind.map(|kind| proto::PatientIdentifiers { kind: Some(kind) });

    let mut genetic_findings: Vec<proto::GeneticFinding> = Vec::new();
    for entry in list(cell("genetic_findings")) {
        let (gene, variant) = match entry.split_once('=') {
            Some((gene, variant)) => (gene.trim().to_owned(), Some(variant.trim().to_owned())),
            None => (entry, None),
        };
        let at = match genetic_findings.iter().position(|f| f.gene == gene) {
            Some(at) => at,
            None => {
                genetic_findings.push(proto::GeneticFinding {
                    gene,
                    variants: Vec::new(),
                });
                genetic_findings.len() - 1
            }
        };
        if let Some(variant) = variant.filter(|v| !v.is_empty()) {
            genetic_findings[at].variants.push(variant);
        }
    }

    let record = proto::CaseRecord {
        birth_year_month: cell("birth_year_month").to_owned(),
        sex: enumeration(cell("sex"), "SEX_", SEXES, "record.sex", &mut v),
        status: enumeration(
            cell("status"),
            "PATIENT_STATUS_",
            STATUSES,
            "record.status",
            &mut v,
        ),
        date_of_death: cell("date_of_death").to_owned(),
        first_contact_date: cell("first_contact_date").to_owned(),
        onset_kind: enumeration(
            cell("onset_kind"),
            "ONSET_KIND_",
            ONSETS,
            "record.onset_kind",
            &mut v,
        ),
        onset_date: cell("onset_date").to_owned(),
        undiagnosed: truth(cell("undiagnosed"), "record.undiagnosed", &mut v),
        diagnosis: Some(proto::Diagnosis {
            orphacode: cell("orphacode").to_owned(),
            icd10: list(cell("icd10")),
            icd11: list(cell("icd11")),
            omim: list(cell("omim")),
        }),
        diagnosis_date: cell("diagnosis_date").to_owned(),
        genetic_findings,
        hpo_terms: list(cell("hpo_terms")),
        icf_codes: list(cell("icf_codes")),
    };

    let scopes = [
        (
            "consent_registry_inclusion",
            proto::ConsentScope::RegistryInclusion,
        ),
        ("consent_research_use", proto::ConsentScope::ResearchUse),
        ("consent_recontact", proto::ConsentScope::Recontact),
    ];
    let mut consent = Vec::new();
    let attested = scopes.iter().any(|(c, _)| !cell(c).is_empty());
    if attested {
        let given_at = match cell("consent_given_at") {
            "" => {
                v.push("consent_given_at", "is required with a consent column");
                None
            }
            c => instant(c, "consent_given_at", &mut v),
        };
        let expires_at = match cell("consent_expires_at") {
            "" => None,
            c => instant(c, "consent_expires_at", &mut v),
        };
        for (column, scope) in scopes {
            if cell(column).is_empty() {
                continue;
            }
            let state = enumeration(cell(column), "CONSENT_STATE_", STATES, column, &mut v);
            consent.push(proto::ScopeConsent {
                scope: scope as i32,
                state,
                given_at: given_at.map(crate::api::convert::timestamp_to_proto),
                form_version: cell("consent_form_version").to_owned(),
                expires_at: expires_at.map(crate::api::convert::timestamp_to_proto),
            });
        }
    }

    let request = proto::SubmitCaseRequest {
        registry: registry.to_owned(),
        patient,
        record: Some(record),
        consent,
        client_reference: cell("client_reference").to_owned(),
    };
    (request, v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str) -> (Header, Vec<csv::StringRecord>) {
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(true)
            .from_reader(text.as_bytes());
        let header = Header::parse(reader.headers().unwrap()).unwrap();
        let rows = reader.records().map(Result::unwrap).collect();
        (header, rows)
    }

    fn fields(v: &FieldViolations) -> Vec<&str> {
        v.iter().map(|v| v.field.as_str()).collect()
    }

    #[test]
    fn the_template_has_a_value_for_every_column() {
        assert_eq!(COLUMNS.len(), EXAMPLE.len());
        let (header, rows) = read(&template());
        assert_eq!(rows.len(), 1);
        let (request, violations) = parse_row(&header, &rows[0], "ERN-LUNG");
        assert!(violations.is_empty(), "{violations:?}");
        assert_eq!(request.client_reference, "case-0001");
        let record = request.record.as_ref().unwrap();
        assert_eq!(record.sex, proto::Sex::Female as i32);
        assert_eq!(record.onset_kind, proto::OnsetKind::Date as i32);
        assert_eq!(record.hpo_terms, ["HP:0006528", "HP:0002205"]);
        assert_eq!(record.genetic_findings[0].gene, "CFTR");
        assert_eq!(
            record.genetic_findings[0].variants,
            ["NM_000492.4:c.1521_1523del"]
        );
        assert_eq!(request.consent.len(), 2);
        assert_eq!(
            request.consent[0].scope,
            proto::ConsentScope::RegistryInclusion as i32
        );
        assert_eq!(
            request.consent[0].given_at.as_ref().unwrap().seconds,
            1_709_251_200
        );
        match request.patient.as_ref().unwrap().kind.as_ref().unwrap() {
            proto::patient_identifiers::Kind::National(n) => {
                assert_eq!(n.issuing_country, "XT");
            }
            proto::patient_identifiers::Kind::Demographic(_) => panic!("national expected"),
        }
    }

    #[test]
    fn the_readme_documents_every_column() {
        let readme = include_str!("../../README.md");
        for (name, holds) in COLUMNS {
            let row = format!("| `{name}` | {holds} |");
            assert!(readme.contains(&row), "README.md lacks {row}");
        }
    }

    #[test]
    fn columns_may_come_in_any_order_and_be_missing() {
        let (header, rows) = read("sex,client_reference,icd10\nSEX_MALE,a-1, E84.0 ;E84.1;;\n");
        let (request, violations) = parse_row(&header, &rows[0], "ERN-LUNG");
        assert!(violations.is_empty());
        let record = request.record.unwrap();
        assert_eq!(record.sex, proto::Sex::Male as i32);
        assert_eq!(record.diagnosis.unwrap().icd10, ["E84.0", "E84.1"]);
        assert_eq!(request.client_reference, "a-1");
        assert!(request.patient.is_none());
    }

    #[test]
    fn unknown_and_repeated_columns_are_refused() {
        let header = csv::StringRecord::from(vec!["client_reference", "orphacod"]);
        assert!(Header::parse(&header).unwrap_err().contains("column 2"));
        let header = csv::StringRecord::from(vec!["sex", "sex"]);
        assert!(Header::parse(&header).is_err());
    }

    #[test]
    fn unreadable_cells_are_reported_by_field_without_their_value() {
        let (header, rows) = read(
            "sex,status,onset_kind,undiagnosed,consent_research_use,consent_given_at\n\
             femme,dead,sometime,perhaps,maybe,March 2024\n",
        );
        let (_, violations) = parse_row(&header, &rows[0], "ERN-LUNG");
        let mut sorted = fields(&violations);
        sorted.sort();
        assert_eq!(
            sorted,
            [
                "consent_given_at",
                "consent_research_use",
                "record.onset_kind",
                "record.sex",
                "record.status",
                "record.undiagnosed",
            ]
        );
        for v in violations.iter() {
            for value in ["femme", "dead", "sometime", "perhaps", "maybe", "March"] {
                assert!(!v.description.contains(value), "{v:?}");
            }
        }
    }

    #[test]
    fn national_and_demographic_identification_are_exclusive() {
        let (header, rows) = read(
            "national_id_country,national_id,family_name\nNL,111222333,\nNL,111222333,Jansen\n,,Jansen\n",
        );
        let (first, v) = parse_row(&header, &rows[0], "ERN-LUNG");
        assert!(v.is_empty());
        assert!(matches!(
            first.patient.as_ref().unwrap().kind,
            Some(proto::patient_identifiers::Kind::National(_))
        ));
        let (_, v) = parse_row(&header, &rows[1], "ERN-LUNG");
        assert_eq!(fields(&v), ["patient"]);
        let (third, v) = parse_row(&header, &rows[2], "ERN-LUNG");
        assert!(v.is_empty());
        assert!(matches!(
            third.patient.as_ref().unwrap().kind,
            Some(proto::patient_identifiers::Kind::Demographic(_))
        ));
    }

    #[test]
    fn a_genes_variants_are_merged_into_one_finding() {
        let (header, rows) = read(
            "genetic_findings\n\"CFTR=NM_000492.4:c.1521_1523del; CFTR=NM_000492.4:c.350G>A;BRCA1\"\n",
        );
        let (request, _) = parse_row(&header, &rows[0], "ERN-LUNG");
        let findings = request.record.unwrap().genetic_findings;
        assert_eq!(findings.len(), 2);
        assert_eq!(findings[0].variants.len(), 2);
        assert_eq!(findings[1].gene, "BRCA1");
        assert!(findings[1].variants.is_empty());
    }
}
