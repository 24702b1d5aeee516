//! The case record (the EU RD Platform common data elements, `docs/architecture.md`).

use std::collections::HashSet;
use std::hash::Hash;

use chrono::NaiveDate;

use super::codes::{
    HgncSymbol, HgvsVariant, HpoTerm, Icd10, Icd11, IcfCode, ORPHA_UNDIAGNOSED, Omim, Orphacode,
};
use super::dates::{PartialDate, YearMonth};
use super::{DomainError, FieldViolations};
use crate::proto;

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
    ($(#[$doc:meta])* $name:ident, $proto:ty, $what:literal { $($variant:ident = $text:literal <- $pv:ident),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $($variant),+ }

        impl $name {
            /// The value as stored in the database.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }

            pub fn parse_db(s: &str) -> Option<Self> {
                match s { $($text => Some($name::$variant),)+ _ => None }
            }

            /// From the protobuf enum; `_UNSPECIFIED` and unknown numbers are refused.
            pub fn from_proto(value: i32) -> Result<Self, DomainError> {
                match <$proto>::try_from(value) {
                    $(Ok(<$proto>::$pv) => Ok($name::$variant),)+
                    _ => Err(DomainError::Format($what)),
                }
            }

            pub fn to_proto(self) -> i32 {
                match self { $($name::$variant => <$proto>::$pv as i32),+ }
            }
        }
    };
}

db_enum!(
    /// Sex as in the common data elements.
    Sex, proto::Sex, "one of SEX_FEMALE, SEX_MALE, SEX_UNDETERMINED, SEX_UNKNOWN" {
        Female = "female" <- Female,
        Male = "male" <- Male,
        Undetermined = "undetermined" <- Undetermined,
        Unknown = "unknown" <- Unknown,
    }
);

db_enum!(
    /// Vital and follow-up status.
    PatientStatus, proto::PatientStatus,
    "one of PATIENT_STATUS_ALIVE, PATIENT_STATUS_DECEASED, PATIENT_STATUS_LOST_TO_FOLLOW_UP, PATIENT_STATUS_OPTED_OUT" {
        Alive = "alive" <- Alive,
        Deceased = "deceased" <- Deceased,
        LostToFollowUp = "lost_to_follow_up" <- LostToFollowUp,
        OptedOut = "opted_out" <- OptedOut,
    }
);

db_enum!(
    /// How the onset is known.
    OnsetKind, proto::OnsetKind,
    "one of ONSET_KIND_ANTENATAL, ONSET_KIND_AT_BIRTH, ONSET_KIND_DATE, ONSET_KIND_UNKNOWN" {
        Antenatal = "antenatal" <- Antenatal,
        AtBirth = "at_birth" <- AtBirth,
        Date = "date" <- Date,
        Unknown = "unknown" <- Unknown,
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
    /// Converts and checks a record from the wire. Reports every violation, with paths
    /// relative to the record (`diagnosis.orphacode`, `hpo_terms[2]`).
    pub fn from_proto(r: &proto::CaseRecord, today: NaiveDate) -> Result<Self, FieldViolations> {
        let mut v = FieldViolations::new();
        let birth = v.check("birth_year_month", YearMonth::parse(&r.birth_year_month));
        let sex = v.check("sex", Sex::from_proto(r.sex));
        let status = v.check("status", PatientStatus::from_proto(r.status));
        let mut date_of_death = optional_date(&mut v, "date_of_death", &r.date_of_death);
        if date_of_death.is_some() && status.is_some_and(|s| s != PatientStatus::Deceased) {
            v.push(
                "date_of_death",
                "is only allowed with PATIENT_STATUS_DECEASED",
            );
            date_of_death = None;
        }
        let first_contact = optional_date(&mut v, "first_contact_date", &r.first_contact_date);
        let onset_kind = v.check("onset_kind", OnsetKind::from_proto(r.onset_kind));
        let onset = match onset_kind {
            Some(OnsetKind::Date) => {
                if r.onset_date.is_empty() {
                    v.push("onset_date", "is required with ONSET_KIND_DATE");
                    None
                } else {
                    v.check("onset_date", PartialDate::parse(&r.onset_date))
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

        let empty = proto::Diagnosis::default();
        let diagnosis = r.diagnosis.as_ref().unwrap_or(&empty);
        let orphacode = if diagnosis.orphacode.is_empty() {
            None
        } else {
            v.check(
                "diagnosis.orphacode",
                Orphacode::parse(&diagnosis.orphacode),
            )
        };
        let diagnosis_date = optional_date(&mut v, "diagnosis_date", &r.diagnosis_date);
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
            if diagnosis.orphacode.is_empty() {
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
        let icd10 = parse_list(
            &mut v,
            "diagnosis.icd10",
            &diagnosis.icd10,
            MAX_ICD10,
            Icd10::parse,
        );
        let icd11 = parse_list(
            &mut v,
            "diagnosis.icd11",
            &diagnosis.icd11,
            MAX_ICD11,
            Icd11::parse,
        );
        let omim = parse_list(
            &mut v,
            "diagnosis.omim",
            &diagnosis.omim,
            MAX_OMIM,
            Omim::parse,
        );
        let hpo_terms = parse_list(
            &mut v,
            "hpo_terms",
            &r.hpo_terms,
            MAX_HPO_TERMS,
            HpoTerm::parse,
        );
        let icf_codes = parse_list(
            &mut v,
            "icf_codes",
            &r.icf_codes,
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
                let gene = v.check(format!("{field}.gene"), HgncSymbol::parse(&f.gene));
                if gene.as_ref().is_some_and(|g| !genes.insert(g.clone())) {
                    v.push(
                        format!("{field}.gene"),
                        "is a duplicate of an earlier finding; list its variants together",
                    );
                }
                let variants = parse_list(
                    &mut v,
                    &format!("{field}.variants"),
                    &f.variants,
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

    pub fn to_proto(&self) -> proto::CaseRecord {
        fn strings<T: std::fmt::Display>(items: &[T]) -> Vec<String> {
            items.iter().map(ToString::to_string).collect()
        }
        let text = |d: Option<PartialDate>| d.map(|d| d.to_string()).unwrap_or_default();
        proto::CaseRecord {
            birth_year_month: self.birth.to_string(),
            sex: self.sex.to_proto(),
            status: self.status.to_proto(),
            date_of_death: text(self.date_of_death),
            first_contact_date: text(self.first_contact),
            onset_kind: self.onset.kind().to_proto(),
            onset_date: text(self.onset.date()),
            undiagnosed: self.undiagnosed,
            diagnosis: Some(proto::Diagnosis {
                orphacode: self
                    .orphacode
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_default(),
                icd10: strings(&self.icd10),
                icd11: strings(&self.icd11),
                omim: strings(&self.omim),
            }),
            diagnosis_date: text(self.diagnosis_date),
            genetic_findings: self
                .genetic_findings
                .iter()
                .map(|f| proto::GeneticFinding {
                    gene: f.gene.to_string(),
                    variants: strings(&f.variants),
                })
                .collect(),
            hpo_terms: strings(&self.hpo_terms),
            icf_codes: strings(&self.icf_codes),
        }
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
mod tests {
    use super::*;
    use proptest::prelude::*;

    use crate::fixtures::{record as valid, today};

    fn fields(r: &proto::CaseRecord) -> Vec<String> {
        match CaseRecord::from_proto(r, today()) {
            Ok(_) => Vec::new(),
            Err(v) => v.iter().map(|v| v.field.clone()).collect(),
        }
    }

    #[test]
    fn a_valid_record_round_trips() {
        let record = CaseRecord::from_proto(&valid(), today()).unwrap();
        assert_eq!(record.to_proto(), valid());
        assert_eq!(record.onset_age_days(), Some(92));
        assert_eq!(
            record.delay_days(),
            Some(record.diagnosis_age_days().unwrap() - 92)
        );
    }

    #[test]
    fn undiagnosed_rules() {
        let mut r = valid();
        r.undiagnosed = true;
        assert_eq!(fields(&r), ["diagnosis.orphacode", "diagnosis_date"]);
        r.diagnosis.as_mut().unwrap().orphacode = "ORPHA:616874".into();
        r.diagnosis_date.clear();
        assert!(fields(&r).is_empty());
        r.hpo_terms.clear();
        assert_eq!(fields(&r), ["hpo_terms"]);
        let mut r = valid();
        r.diagnosis.as_mut().unwrap().orphacode = "ORPHA:616874".into();
        assert_eq!(
            fields(&r),
            ["diagnosis.orphacode"],
            "undiagnosed code needs the flag"
        );
    }

    #[test]
    fn required_and_enum_fields() {
        let r = proto::CaseRecord::default();
        let f = fields(&r);
        for expected in [
            "birth_year_month",
            "sex",
            "status",
            "onset_kind",
            "diagnosis.orphacode",
            "diagnosis_date",
        ] {
            assert!(f.iter().any(|x| x == expected), "{expected} in {f:?}");
        }
        let mut r = valid();
        r.sex = 99;
        assert_eq!(fields(&r), ["sex"]);
        let mut r = valid();
        r.onset_kind = proto::OnsetKind::AtBirth as i32;
        assert_eq!(fields(&r), ["onset_date"], "date only with ONSET_KIND_DATE");
        r.onset_date.clear();
        assert!(fields(&r).is_empty());
        let mut r = valid();
        r.onset_date.clear();
        assert_eq!(fields(&r), ["onset_date"]);
    }

    #[test]
    fn dates_are_consistent() {
        let mut r = valid();
        r.onset_date = "2015-03".into();
        assert_eq!(fields(&r), ["onset_date"], "onset before birth");
        r.onset_kind = proto::OnsetKind::Antenatal as i32;
        r.onset_date.clear();
        r.diagnosis_date = "2015-03-01".into();
        assert!(
            fields(&r).is_empty(),
            "prenatal diagnosis with antenatal onset"
        );
        r.diagnosis_date = "2013-01-01".into();
        assert_eq!(fields(&r), ["diagnosis_date"], "beyond any pregnancy");

        let mut r = valid();
        r.status = proto::PatientStatus::Deceased as i32;
        r.date_of_death = "2016".into();
        assert!(fields(&r).is_empty(), "overlapping partial dates are fine");
        r.date_of_death = "2015-07".into();
        assert_eq!(fields(&r), ["date_of_death"]);

        let mut r = valid();
        r.first_contact_date = "2030".into();
        assert_eq!(fields(&r), ["first_contact_date"]);
        let mut r = valid();
        r.diagnosis_date = "2015-08-01".into();
        assert!(
            fields(&r).is_empty(),
            "diagnosis before onset (screening) is allowed"
        );
        let record = CaseRecord::from_proto(&r, today()).unwrap();
        assert_eq!(record.delay_days(), Some(0));
    }

    #[test]
    fn repeated_fields_are_bounded_and_deduplicated() {
        let mut r = valid();
        r.hpo_terms = vec![
            "HP:0006528".into(),
            "HP:0000001".into(),
            "HP:0006528".into(),
        ];
        assert_eq!(fields(&r), ["hpo_terms[2]"]);
        r.hpo_terms = vec!["HP:0000001".into(); MAX_HPO_TERMS + 1];
        assert_eq!(fields(&r), ["hpo_terms"]);
        let mut r = valid();
        r.genetic_findings.push(r.genetic_findings[0].clone());
        assert_eq!(fields(&r), ["genetic_findings[1].gene"]);
    }

    proptest! {
        #[test]
        fn arbitrary_records_never_panic(
            birth in "\\PC{0,10}", death in "[0-9-]{0,10}", onset in "[0-9-]{0,10}",
            diag in "[0-9-]{0,10}", sex in -1i32..6, status in -1i32..6, kind in -1i32..6,
            undiagnosed: bool, code in "(ORPHA:)?[0-9]{0,8}",
        ) {
            let mut r = valid();
            r.birth_year_month = birth;
            r.date_of_death = death;
            r.onset_date = onset;
            r.diagnosis_date = diag;
            r.sex = sex;
            r.status = status;
            r.onset_kind = kind;
            r.undiagnosed = undiagnosed;
            r.diagnosis.as_mut().unwrap().orphacode = code;
            if let Ok(record) = CaseRecord::from_proto(&r, today()) {
                // What was accepted re-parses to the same thing.
                prop_assert_eq!(CaseRecord::from_proto(&record.to_proto(), today()).unwrap(), record.clone());
                prop_assert!(record.delay_days().is_none_or(|d| d >= 0));
            }
        }
    }
}
