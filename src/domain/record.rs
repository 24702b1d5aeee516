//! The case record (the EU RD Platform common data elements, `docs/architecture.md`).

use std::collections::HashSet;
use std::hash::Hash;

use chrono::NaiveDate;

use super::codes::{
    HgncSymbol, HgvsVariant, HpoTerm, Icd10, Icd11, IcfCode, ORPHA_UNDIAGNOSED, Omim, Orphacode,
};
use super::dates::{PartialDate, YearMonth};
use super::{DomainError, FieldViolations};

/// Upper bounds of the repeated fields of a record.
pub const MAX_ICD10: usize = 32;
pub const MAX_ICD11: usize = 32;
pub const MAX_OMIM: usize = 32;
pub const MAX_GENETIC_FINDINGS: usize = 64;
pub const MAX_VARIANTS_PER_GENE: usize = 16;
pub const MAX_HPO_TERMS: usize = 256;
pub const MAX_ICF_CODES: usize = 128;

/// Days a prenatal finding may precede the birth month (antenatal onset only).
const PRENATAL_ALLOWANCE_DAYS: u64 = 280;

macro_rules! db_enum {
    ($(#[$doc:meta])* $name:ident { $($variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $($variant),+ }

        impl $name {
            /// Every value.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The value's stable name (as stored).
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }

            pub fn parse_db(s: &str) -> Option<Self> {
                match s { $($text => Some($name::$variant),)+ _ => None }
            }
        }
    };
}

db_enum!(
    /// Sex as in the common data elements.
    Sex {
        Female = "female",
        Male = "male",
        Undetermined = "undetermined",
        Unknown = "unknown",
    }
);

db_enum!(
    /// Vital and follow-up status.
    PatientStatus {
        Alive = "alive",
        Deceased = "deceased",
        LostToFollowUp = "lost_to_follow_up",
        OptedOut = "opted_out",
    }
);

db_enum!(
    /// How the onset is known.
    OnsetKind {
        Antenatal = "antenatal",
        AtBirth = "at_birth",
        Date = "date",
        Unknown = "unknown",
    }
);

/// Onset of the first signs of the disease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Onset {
    Antenatal,
    AtBirth,
    Date(PartialDate),
    Unknown,
}

impl Onset {
    pub fn kind(&self) -> OnsetKind {
        match self {
            Onset::Antenatal => OnsetKind::Antenatal,
            Onset::AtBirth => OnsetKind::AtBirth,
            Onset::Date(_) => OnsetKind::Date,
            Onset::Unknown => OnsetKind::Unknown,
        }
    }

    pub fn date(&self) -> Option<PartialDate> {
        match self {
            Onset::Date(d) => Some(*d),
            _ => None,
        }
    }
}

/// A gene with the variants found in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GeneticFinding {
    pub gene: HgncSymbol,
    pub variants: Vec<HgvsVariant>,
}

/// A case record as it arrives, before any check: texts as sent, the enumerations already
/// mapped from their wire values (an `Err` is reported as a violation of its field, in
/// its place among the others). Built by `api::convert` from a request and by
/// `store::cases` from stored columns; [`CaseRecord::validate`] is the one place a record
/// is checked.
#[derive(Debug, Clone)]
pub struct RecordInput<'a> {
    pub birth_year_month: &'a str,
    pub sex: Result<Sex, DomainError>,
    pub status: Result<PatientStatus, DomainError>,
    pub date_of_death: &'a str,
    pub first_contact_date: &'a str,
    pub onset_kind: Result<OnsetKind, DomainError>,
    pub onset_date: &'a str,
    pub undiagnosed: bool,
    pub orphacode: &'a str,
    pub icd10: &'a [String],
    pub icd11: &'a [String],
    pub omim: &'a [String],
    pub diagnosis_date: &'a str,
    pub genetic_findings: Vec<FindingInput<'a>>,
    pub hpo_terms: &'a [String],
    pub icf_codes: &'a [String],
}

/// A genetic finding as it arrives: the gene and its variants, as sent.
#[derive(Debug, Clone, Copy)]
pub struct FindingInput<'a> {
    pub gene: &'a str,
    pub variants: &'a [String],
}

/// A valid case record: every code well-formed, dates consistent with each other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaseRecord {
    pub birth: YearMonth,
    pub sex: Sex,
    pub status: PatientStatus,
    pub date_of_death: Option<PartialDate>,
    pub first_contact: Option<PartialDate>,
    pub onset: Onset,
    pub undiagnosed: bool,
    pub orphacode: Option<Orphacode>,
    pub diagnosis_date: Option<PartialDate>,
    pub icd10: Vec<Icd10>,
    pub icd11: Vec<Icd11>,
    pub omim: Vec<Omim>,
    pub genetic_findings: Vec<GeneticFinding>,
    pub hpo_terms: Vec<HpoTerm>,
    pub icf_codes: Vec<IcfCode>,
}

/// Parses a repeated field element by element, with bounds and duplicate checks.
fn parse_list<T: Eq + Hash + Clone>(
    v: &mut FieldViolations,
    field: &str,
    items: &[String],
    max: usize,
    parse: impl Fn(&str) -> Result<T, DomainError>,
) -> Vec<T> {
    if items.len() > max {
        v.push(field, format!("must have at most {max} entries"));
        return Vec::new();
    }
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        if let Some(value) = v.check(format!("{field}[{i}]"), parse(item)) {
            if seen.insert(value.clone()) {
                out.push(value);
            } else {
                v.push(
                    format!("{field}[{i}]"),
                    "is a duplicate of an earlier entry",
                );
            }
        }
    }
    out
}

fn optional_date(v: &mut FieldViolations, field: &str, s: &str) -> Option<PartialDate> {
    if s.is_empty() {
        None
    } else {
        v.check(field, PartialDate::parse(s))
    }
}

impl CaseRecord {
    /// Checks a record as it arrives. Reports every violation, with paths relative to the
    /// record (`diagnosis.orphacode`, `hpo_terms[2]`); `today` is the UTC date, and a
    /// date of the record may name at most the day after it: a day that has begun
    /// somewhere east of Greenwich (a birth at 00:30 in Europe on the 1st of a month is
    /// not in the future there).
    pub fn validate(r: &RecordInput<'_>, today: NaiveDate) -> Result<Self, FieldViolations> {
        let today = today.succ_opt().unwrap_or(today);
        let mut v = FieldViolations::new();
        let birth = v.check("birth_year_month", YearMonth::parse(r.birth_year_month));
        let sex = v.check("sex", r.sex);
        let status = v.check("status", r.status);
        let mut date_of_death = optional_date(&mut v, "date_of_death", r.date_of_death);
        if date_of_death.is_some() && status.is_some_and(|s| s != PatientStatus::Deceased) {
            v.push(
                "date_of_death",
                "is only allowed with PATIENT_STATUS_DECEASED",
            );
            date_of_death = None;
        }
        let first_contact = optional_date(&mut v, "first_contact_date", r.first_contact_date);
        let onset_kind = v.check("onset_kind", r.onset_kind);
        let onset = match onset_kind {
            Some(OnsetKind::Date) => {
                if r.onset_date.is_empty() {
                    v.push("onset_date", "is required with ONSET_KIND_DATE");
                    None
                } else {
                    v.check("onset_date", PartialDate::parse(r.onset_date))
                        .map(Onset::Date)
                }
            }
            Some(kind) => {
                if !r.onset_date.is_empty() {
                    v.push("onset_date", "is only allowed with ONSET_KIND_DATE");
                }
                Some(match kind {
                    OnsetKind::Antenatal => Onset::Antenatal,
                    OnsetKind::AtBirth => Onset::AtBirth,
                    _ => Onset::Unknown,
                })
            }
            None => None,
        };

        let orphacode = if r.orphacode.is_empty() {
            None
        } else {
            v.check("diagnosis.orphacode", Orphacode::parse(r.orphacode))
        };
        let diagnosis_date = optional_date(&mut v, "diagnosis_date", r.diagnosis_date);
        if r.undiagnosed {
            if orphacode
                .as_ref()
                .is_some_and(|c| c.number() != ORPHA_UNDIAGNOSED)
            {
                v.push(
                    "diagnosis.orphacode",
                    "must be empty or ORPHA:616874 for an undiagnosed case",
                );
            }
            if !r.diagnosis_date.is_empty() {
                v.push("diagnosis_date", "must be empty for an undiagnosed case");
            }
            if r.hpo_terms.is_empty() {
                v.push(
                    "hpo_terms",
                    "are required for an undiagnosed case (describe the phenotype)",
                );
            }
        } else {
            if r.orphacode.is_empty() {
                v.push(
                    "diagnosis.orphacode",
                    "is required unless the case is undiagnosed",
                );
            } else if orphacode
                .as_ref()
                .is_some_and(|c| c.number() == ORPHA_UNDIAGNOSED)
            {
                v.push(
                    "diagnosis.orphacode",
                    "ORPHA:616874 (undiagnosed) needs undiagnosed set",
                );
            }
            if r.diagnosis_date.is_empty() {
                v.push(
                    "diagnosis_date",
                    "is required unless the case is undiagnosed",
                );
            }
        }
        let icd10 = parse_list(&mut v, "diagnosis.icd10", r.icd10, MAX_ICD10, Icd10::parse);
        let icd11 = parse_list(&mut v, "diagnosis.icd11", r.icd11, MAX_ICD11, Icd11::parse);
        let omim = parse_list(&mut v, "diagnosis.omim", r.omim, MAX_OMIM, Omim::parse);
        let hpo_terms = parse_list(
            &mut v,
            "hpo_terms",
            r.hpo_terms,
            MAX_HPO_TERMS,
            HpoTerm::parse,
        );
        let icf_codes = parse_list(
            &mut v,
            "icf_codes",
            r.icf_codes,
            MAX_ICF_CODES,
            IcfCode::parse,
        );

        let mut genetic_findings = Vec::new();
        if r.genetic_findings.len() > MAX_GENETIC_FINDINGS {
            v.push(
                "genetic_findings",
                format!("must have at most {MAX_GENETIC_FINDINGS} entries"),
            );
        } else {
            let mut genes = HashSet::new();
            for (i, f) in r.genetic_findings.iter().enumerate() {
                let field = format!("genetic_findings[{i}]");
                let gene = v.check(format!("{field}.gene"), HgncSymbol::parse(f.gene));
                if gene.as_ref().is_some_and(|g| !genes.insert(g.clone())) {
                    v.push(
                        format!("{field}.gene"),
                        "is a duplicate of an earlier finding; list its variants together",
                    );
                }
                let variants = parse_list(
                    &mut v,
                    &format!("{field}.variants"),
                    f.variants,
                    MAX_VARIANTS_PER_GENE,
                    HgvsVariant::parse,
                );
                if let Some(gene) = gene {
                    genetic_findings.push(GeneticFinding { gene, variants });
                }
            }
        }

        // Dates: none in the future, none contradicting another.
        let dated = [
            ("date_of_death", date_of_death),
            ("first_contact_date", first_contact),
            ("onset_date", onset.and_then(|o| o.date())),
            ("diagnosis_date", diagnosis_date),
        ];
        let mut flagged: HashSet<&str> = HashSet::new();
        let mut flag = |v: &mut FieldViolations, field: &'static str, msg: &str| {
            if flagged.insert(field) {
                v.push(field, msg);
            }
        };
        if birth.is_some_and(|b| b.as_partial().is_future(today)) {
            flag(&mut v, "birth_year_month", "must not be in the future");
        }
        for (field, date) in dated {
            if date.is_some_and(|d| d.is_future(today)) {
                flag(&mut v, field, "must not be in the future");
            }
        }
        if let Some(birth) = birth.map(|b| b.as_partial()) {
            let prenatal_ok = matches!(onset, Some(Onset::Antenatal));
            let before_birth = |d: PartialDate| {
                if prenatal_ok {
                    d.latest() + chrono::Days::new(PRENATAL_ALLOWANCE_DAYS) < birth.earliest()
                } else {
                    d.definitely_before(&birth)
                }
            };
            for (field, date) in dated {
                if date.is_some_and(|d| field != "date_of_death" && before_birth(d)) {
                    flag(&mut v, field, "must not be before birth");
                }
            }
            if date_of_death.is_some_and(|d| d.definitely_before(&birth)) {
                flag(&mut v, "date_of_death", "must not be before birth");
            }
        }
        if let Some(death) = date_of_death {
            for (field, date) in &dated[1..] {
                if date.is_some_and(|d| death.definitely_before(&d)) {
                    flag(
                        &mut v,
                        "date_of_death",
                        &format!(
                            "must not be before the {}",
                            field.trim_end_matches("_date").replace('_', " ")
                        ),
                    );
                }
            }
        }

        v.into_result()?;
        Ok(CaseRecord {
            birth: birth.expect("no violations"),
            sex: sex.expect("no violations"),
            status: status.expect("no violations"),
            date_of_death,
            first_contact,
            onset: onset.expect("no violations"),
            undiagnosed: r.undiagnosed,
            orphacode,
            diagnosis_date,
            icd10,
            icd11,
            omim,
            genetic_findings,
            hpo_terms,
            icf_codes,
        })
    }

    /// Estimated age at onset in days (midpoints of partial dates); 0 for onset before
    /// or at birth, `None` when unknown.
    pub fn onset_age_days(&self) -> Option<i64> {
        let birth = self.birth.as_partial().midpoint();
        match self.onset {
            Onset::Antenatal | Onset::AtBirth => Some(0),
            Onset::Date(d) => Some((d.midpoint() - birth).num_days().max(0)),
            Onset::Unknown => None,
        }
    }

    /// Estimated age at diagnosis in days (0 for a prenatal diagnosis).
    pub fn diagnosis_age_days(&self) -> Option<i64> {
        let birth = self.birth.as_partial().midpoint();
        self.diagnosis_date
            .map(|d| (d.midpoint() - birth).num_days().max(0))
    }

    /// Diagnostic delay, onset to diagnosis, in days; 0 when the diagnosis came first
    /// (e.g. newborn screening), `None` when either end is unknown.
    pub fn delay_days(&self) -> Option<i64> {
        Some((self.diagnosis_age_days()? - self.onset_age_days()?).max(0))
    }
}

#[cfg(test)]
mod future_tests {
    use chrono::NaiveDate;

    /// A date of a record may name the day after the UTC date (a day that has begun east
    /// of Greenwich), not the day after that.
    #[test]
    fn a_date_may_name_the_day_after_the_utc_date_not_later() {
        let today = NaiveDate::from_ymd_opt(2026, 11, 30).unwrap();
        let future = |first_contact: &str| {
            let mut record = crate::fixtures::record();
            record.first_contact_date = first_contact.into();
            crate::api::convert::case_record(&record, today)
                .err()
                .is_some_and(|v| {
                    v.iter().any(|v| {
                        v.field == "first_contact_date"
                            && v.description == "must not be in the future"
                    })
                })
        };
        for accepted in ["2026-11-30", "2026-12-01", "2026-12"] {
            let mut record = crate::fixtures::record();
            record.first_contact_date = accepted.into();
            assert!(
                crate::api::convert::case_record(&record, today).is_ok(),
                "{accepted}"
            );
        }
        assert!(!future("2026-12"));
        assert!(future("2026-12-02"));
        assert!(future("2027"));
    }
}
