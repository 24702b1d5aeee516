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

    /// Estimated age at onset in days (midpoints of partial dates, from
    /// [`birth_midpoint`]); 0 for onset before or at birth, `None` when unknown.
    pub fn onset_age_days(&self) -> Option<i64> {
        onset_age_days_of(self.birth, self.onset)
    }

    /// Estimated age at diagnosis in days (midpoints, from [`birth_midpoint`]; 0 for a
    /// prenatal diagnosis).
    pub fn diagnosis_age_days(&self) -> Option<i64> {
        diagnosis_age_days_of(self.birth, self.onset, self.diagnosis_date)
    }

    /// Diagnostic delay, onset to diagnosis, in whole calendar months
    /// ([`super::dates::whole_months`], partial dates at their
    /// [`PartialDate::month_anchor`], an onset before birth or at it counted from the
    /// birth's, [`birth_anchor`]); 0 when the diagnosis came first, `None` when either end
    /// is unknown. What research answers band and take quantiles of.
    pub fn delay_months(&self) -> Option<i64> {
        delay_months_of(self.birth, self.onset, self.diagnosis_date)
    }

    /// Diagnostic delay, onset to diagnosis, in days; 0 when the diagnosis came first
    /// (e.g. newborn screening), `None` when either end is unknown.
    pub fn delay_days(&self) -> Option<i64> {
        Some((self.diagnosis_age_days()? - self.onset_age_days()?).max(0))
    }
}

/// [`CaseRecord::onset_age_days`] of a record born in `birth` with `onset`.
pub fn onset_age_days_of(birth: YearMonth, onset: Onset) -> Option<i64> {
    match onset {
        Onset::Antenatal | Onset::AtBirth => Some(0),
        Onset::Date(d) => Some(
            (d.midpoint() - birth_midpoint(birth, onset))
                .num_days()
                .max(0),
        ),
        Onset::Unknown => None,
    }
}

/// [`CaseRecord::diagnosis_age_days`] of a record born in `birth`, with `onset`, diagnosed
/// on `diagnosis`.
pub fn diagnosis_age_days_of(
    birth: YearMonth,
    onset: Onset,
    diagnosis: Option<PartialDate>,
) -> Option<i64> {
    let birth = birth_midpoint(birth, onset);
    diagnosis.map(|d| (d.midpoint() - birth).num_days().max(0))
}

/// [`CaseRecord::delay_months`] of a record born in `birth`, with `onset` and diagnosed on
/// `diagnosis`.
pub fn delay_months_of(
    birth: YearMonth,
    onset: Onset,
    diagnosis: Option<PartialDate>,
) -> Option<i64> {
    let record_birth = birth_midpoint(birth, onset);
    let age = |d: NaiveDate| (d - record_birth).num_days().max(0);
    let anchor_birth = birth_anchor(birth, onset);
    let (onset_age, onset) = match onset {
        Onset::Antenatal | Onset::AtBirth => (0, anchor_birth),
        Onset::Date(d) => (age(d.midpoint()), d.month_anchor().max(anchor_birth)),
        Onset::Unknown => return None,
    };
    let diagnosis = diagnosis?;
    let days = (age(diagnosis.midpoint()) - onset_age).max(0);
    let months = super::dates::whole_months(onset, diagnosis.month_anchor().max(anchor_birth));
    // Within what the delay in days allows: the anchors are a day from the midpoints at
    // most, and where the precisions of the two ends differ the months could otherwise
    // say a year the days do not (an onset in March 2010, at its 16th, to a diagnosis
    // on 15 March 2011 is 364 days), and research answers band ages by the days.
    Some(months.clamp(least_whole_months(days), most_whole_months(days)))
}

/// The day a record's ages count from: the midpoint of the birth month, or an onset dated
/// to a day before it in the birth month (the patient was born by then). Born in January
/// 2010 with an onset on 5 January 2010: ages, and the delay in days, count from the 5th,
/// not the 16th, so a diagnosis on 10 January 2015 is at 5 years and after 5 years.
pub fn birth_midpoint(birth: YearMonth, onset: Onset) -> NaiveDate {
    an_onset_in_the_birth_month_before(birth, onset, birth.as_partial().midpoint())
}

/// The day whole months count from when the onset is at or before birth: the birth
/// month's [`PartialDate::month_anchor`] (its 15th), or an onset dated to a day before it
/// in the birth month, as [`birth_midpoint`].
pub fn birth_anchor(birth: YearMonth, onset: Onset) -> NaiveDate {
    an_onset_in_the_birth_month_before(birth, onset, birth.as_partial().month_anchor())
}

/// `onset`'s day when it is dated to a day of the birth month before `day`, else `day`.
fn an_onset_in_the_birth_month_before(birth: YearMonth, onset: Onset, day: NaiveDate) -> NaiveDate {
    match onset {
        Onset::Date(d)
            if d.is_day()
                && d.earliest() >= birth.as_partial().earliest()
                && d.earliest() < day =>
        {
            d.earliest()
        }
        _ => day,
    }
}

/// The fewest whole calendar months `days` days hold whatever day they start on: 12 for
/// each whole year of the most days a year can take (`365 Y + ceil(Y / 4)` for Y years,
/// with their leap days), nothing for the rest.
pub fn least_whole_months(days: i64) -> i64 {
    let days = days.max(0);
    let mut years = days / 365;
    while years > 0 && 365 * years + (years + 3) / 4 > days {
        years -= 1;
    }
    12 * years
}

/// The most whole calendar months `days` days can hold: Y years take at least `365 Y`
/// days, and the rest of a year at most 11 months.
pub fn most_whole_months(days: i64) -> i64 {
    12 * (days.max(0) / 365) + 11
}

#[cfg(test)]
mod delay_tests {
    use super::*;

    fn months(birth: &str, onset: &str, diagnosis: &str) -> Option<i64> {
        let onset = match onset {
            "antenatal" => Onset::Antenatal,
            "birth" => Onset::AtBirth,
            "" => Onset::Unknown,
            date => Onset::Date(PartialDate::parse(date).unwrap()),
        };
        let diagnosis = (!diagnosis.is_empty()).then(|| PartialDate::parse(diagnosis).unwrap());
        delay_months_of(YearMonth::parse(birth).unwrap(), onset, diagnosis)
    }

    /// Whole years are whole years whatever the leap days between and the precision of
    /// the dates: a delay of exactly five years is 60 months (in the band "5-10y").
    #[test]
    fn whole_years_are_whole_years_at_every_precision() {
        for (onset, diagnosis, expected) in [
            ("2010-03-15", "2015-03-15", 60), // one leap day between: 1,826 days
            ("2011-03-01", "2016-03-01", 60), // two: 1,827 days
            ("2010-01", "2015-01", 60),
            ("2012", "2017", 60), // midpoints 1 and 2 July
            ("2013-05-10", "2014-05-10", 12),
            ("2005-06-01", "2015-06-01", 120),
            ("1999-12-31", "2019-12-31", 240),
            ("2010-03-16", "2015-03-15", 59), // a day short
            ("2010-01", "2014-12", 59),
            ("2012", "2016", 48),
            ("2010-01-31", "2010-02-28", 0),
            ("2010-01-31", "2010-03-01", 1),
            ("2012-02-29", "2013-02-28", 11),
            ("2012-02-29", "2013-03-01", 12),
            ("2010-01-15", "2010-01", 0), // the 15th: the same day
            ("2010-01-14", "2010-02", 1),
        ] {
            assert_eq!(
                months("1990-01", onset, diagnosis),
                Some(expected),
                "{onset} to {diagnosis}"
            );
        }
    }

    /// The months never say a year the days do not: an onset dated by its month to a
    /// diagnosis on a day before that month's middle is cut to the days' 11 months.
    #[test]
    fn the_months_stay_within_what_the_days_allow() {
        assert_eq!(months("1990-01", "2010-03", "2011-03-15"), Some(11));
        let mut rng_state = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = |n: u64| {
            rng_state ^= rng_state << 13;
            rng_state ^= rng_state >> 7;
            rng_state ^= rng_state << 17;
            rng_state % n
        };
        for _ in 0..20_000 {
            let date = |next: &mut dyn FnMut(u64) -> u64| {
                let year = 1990 + next(30) as i32;
                match next(3) {
                    0 => format!("{year}"),
                    1 => format!("{year}-{:02}", 1 + next(12)),
                    _ => {
                        let d = NaiveDate::from_ymd_opt(year, 1, 1).unwrap()
                            + chrono::Days::new(next(365));
                        d.format("%Y-%m-%d").to_string()
                    }
                }
            };
            let (birth, onset, diagnosis) = ("1990-01", date(&mut next), date(&mut next));
            let m = months(birth, &onset, &diagnosis).unwrap();
            let b = birth_midpoint(
                YearMonth::parse(birth).unwrap(),
                Onset::Date(PartialDate::parse(&onset).unwrap()),
            );
            let age = |d: &str| {
                (PartialDate::parse(d).unwrap().midpoint() - b)
                    .num_days()
                    .max(0)
            };
            let days = (age(&diagnosis) - age(&onset)).max(0);
            assert!(
                least_whole_months(days) <= m && m <= most_whole_months(days),
                "{onset} to {diagnosis}: {m} months, {days} days"
            );
        }
        // The bounds themselves: a span of Y years and its leap days, from any day.
        let start = NaiveDate::from_ymd_opt(1896, 1, 1).unwrap();
        for offset in 0..(4 * 366) {
            let from = start + chrono::Days::new(offset);
            for years in [1_u32, 4, 5, 17, 20] {
                // Around the year's end, where a whole year begins.
                for extra in 0..40_u64 {
                    let to = from + chrono::Days::new(u64::from(years) * 365 - 20 + extra);
                    let days = (to - from).num_days();
                    let whole = super::super::dates::whole_months(from, to);
                    assert!(
                        least_whole_months(days) <= whole && whole <= most_whole_months(days),
                        "{from} to {to}: {whole} months in {days} days"
                    );
                }
            }
        }
    }

    /// The proto's examples of the birth month (`DiagnosticDelayResponse.bands`): an onset
    /// at birth counts from the middle of the birth month (days from the 16th of January,
    /// months from the 15th); an onset dated to a day before it in the birth month counts
    /// from that day, and so do the ages (the patient was born by then).
    #[test]
    fn an_onset_early_in_the_birth_month_counts_from_its_day() {
        assert_eq!(months("2010-01", "birth", "2011-01-15"), Some(11));
        assert_eq!(months("2010-01", "birth", "2011-01-16"), Some(12));
        assert_eq!(months("2010-01", "2010-01-05", "2011-01-15"), Some(12));
        assert_eq!(months("2010-01", "2010-01-05", "2011-01-04"), Some(11));
        assert_eq!(months("2010-01", "2010-01-05", "2015-01-10"), Some(60));
        assert_eq!(months("2010-01", "2010-01-05", "2015-01-04"), Some(59));
        // Later in the birth month, or to the month: as any onset date.
        assert_eq!(months("2010-01", "2010-01-20", "2015-01-19"), Some(59));
        assert_eq!(months("2010-01", "2010-01-20", "2015-01-20"), Some(60));
        assert_eq!(months("2010-01", "2010-01", "2015-01-10"), Some(59));
        // Before the birth month (antenatal), or a year: from the birth's middle.
        assert_eq!(months("2010-02", "2010-01-05", "2015-02-10"), Some(59));
        assert_eq!(months("2010-07", "2010", "2015-07-14"), Some(59));
        assert_eq!(months("1990-01", "2010-03", "2011-03-15"), Some(11));
        // The ages count from the onset's day too: 5 years at diagnosis, onset at 0.
        let record = |onset: &str, diagnosis: &str| {
            let mut r = crate::fixtures::record();
            r.birth_year_month = "2010-01".into();
            r.onset_kind = crate::proto::OnsetKind::Date as i32;
            r.onset_date = onset.into();
            r.diagnosis_date = diagnosis.into();
            crate::api::convert::case_record(
                &r,
                chrono::NaiveDate::from_ymd_opt(2026, 1, 1).unwrap(),
            )
            .unwrap()
        };
        let r = record("2010-01-05", "2015-01-10");
        assert_eq!(r.onset_age_days(), Some(0));
        assert_eq!(r.diagnosis_age_days(), Some(1831));
        assert_eq!(r.delay_days(), Some(1831));
        let r = record("2010-01-20", "2015-01-10");
        assert_eq!(r.onset_age_days(), Some(4));
        assert_eq!(r.diagnosis_age_days(), Some(1820));
    }

    #[test]
    fn a_diagnosis_first_or_at_birth_and_unknown_ends() {
        // Diagnosed before the onset (newborn screening): 0.
        assert_eq!(months("2010-01", "2012-05", "2010-02"), Some(0));
        // Onset at birth or before: from the birth's 15th.
        assert_eq!(months("2010-01", "birth", "2011-01"), Some(12));
        assert_eq!(months("2010-01", "antenatal", "2011-01-14"), Some(11));
        // A date before the birth counts from the birth.
        assert_eq!(months("2010-09", "2010", "2011-09-15"), Some(12));
        assert_eq!(months("2010-01", "", "2011-01"), None);
        assert_eq!(months("2010-01", "birth", ""), None);
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
