//! Protobuf ⇄ domain conversions of the case record: the wire's enumerations and
//! structure, mapped to `domain::RecordInput` (checked by `CaseRecord::validate`, the one
//! place a record is checked) and back. The domain knows nothing of protobuf.

use chrono::{DateTime, NaiveDate, Utc};

use crate::consent::{self, AttestationItem, ConsentDecision, Decision, Scope};
use crate::domain::{
    CaseRecord, DomainError, FieldViolations, FindingInput, OnsetKind, PartialDate, PatientStatus,
    RecordInput, Sex,
};
use crate::proto;
use crate::pseudonym::{DemographicInput, IdentifiersInput, NationalInput, PatientIdentity};

/// A `proto::Sex` value; `_UNSPECIFIED` and unknown numbers are refused.
pub fn sex(value: i32) -> Result<Sex, DomainError> {
    match proto::Sex::try_from(value) {
        Ok(proto::Sex::Female) => Ok(Sex::Female),
        Ok(proto::Sex::Male) => Ok(Sex::Male),
        Ok(proto::Sex::Undetermined) => Ok(Sex::Undetermined),
        Ok(proto::Sex::Unknown) => Ok(Sex::Unknown),
        _ => Err(DomainError::Format(
            "one of SEX_FEMALE, SEX_MALE, SEX_UNDETERMINED, SEX_UNKNOWN",
        )),
    }
}

pub fn sex_to_proto(sex: Sex) -> i32 {
    (match sex {
        Sex::Female => proto::Sex::Female,
        Sex::Male => proto::Sex::Male,
        Sex::Undetermined => proto::Sex::Undetermined,
        Sex::Unknown => proto::Sex::Unknown,
    }) as i32
}

/// A `proto::PatientStatus` value; `_UNSPECIFIED` and unknown numbers are refused.
pub fn status(value: i32) -> Result<PatientStatus, DomainError> {
    match proto::PatientStatus::try_from(value) {
        Ok(proto::PatientStatus::Alive) => Ok(PatientStatus::Alive),
        Ok(proto::PatientStatus::Deceased) => Ok(PatientStatus::Deceased),
        Ok(proto::PatientStatus::LostToFollowUp) => Ok(PatientStatus::LostToFollowUp),
        Ok(proto::PatientStatus::OptedOut) => Ok(PatientStatus::OptedOut),
        _ => Err(DomainError::Format(
            "one of PATIENT_STATUS_ALIVE, PATIENT_STATUS_DECEASED, PATIENT_STATUS_LOST_TO_FOLLOW_UP, PATIENT_STATUS_OPTED_OUT",
        )),
    }
}

pub fn status_to_proto(status: PatientStatus) -> i32 {
    (match status {
        PatientStatus::Alive => proto::PatientStatus::Alive,
        PatientStatus::Deceased => proto::PatientStatus::Deceased,
        PatientStatus::LostToFollowUp => proto::PatientStatus::LostToFollowUp,
        PatientStatus::OptedOut => proto::PatientStatus::OptedOut,
    }) as i32
}

/// A `proto::OnsetKind` value; `_UNSPECIFIED` and unknown numbers are refused.
pub fn onset_kind(value: i32) -> Result<OnsetKind, DomainError> {
    match proto::OnsetKind::try_from(value) {
        Ok(proto::OnsetKind::Antenatal) => Ok(OnsetKind::Antenatal),
        Ok(proto::OnsetKind::AtBirth) => Ok(OnsetKind::AtBirth),
        Ok(proto::OnsetKind::Date) => Ok(OnsetKind::Date),
        Ok(proto::OnsetKind::Unknown) => Ok(OnsetKind::Unknown),
        _ => Err(DomainError::Format(
            "one of ONSET_KIND_ANTENATAL, ONSET_KIND_AT_BIRTH, ONSET_KIND_DATE, ONSET_KIND_UNKNOWN",
        )),
    }
}

pub fn onset_kind_to_proto(kind: OnsetKind) -> i32 {
    (match kind {
        OnsetKind::Antenatal => proto::OnsetKind::Antenatal,
        OnsetKind::AtBirth => proto::OnsetKind::AtBirth,
        OnsetKind::Date => proto::OnsetKind::Date,
        OnsetKind::Unknown => proto::OnsetKind::Unknown,
    }) as i32
}

/// Converts and checks a record from the wire (`CaseRecord::validate`).
pub fn case_record(r: &proto::CaseRecord, today: NaiveDate) -> Result<CaseRecord, FieldViolations> {
    let empty = proto::Diagnosis::default();
    let diagnosis = r.diagnosis.as_ref().unwrap_or(&empty);
    let input = RecordInput {
        birth_year_month: &r.birth_year_month,
        sex: sex(r.sex),
        status: status(r.status),
        date_of_death: &r.date_of_death,
        first_contact_date: &r.first_contact_date,
        onset_kind: onset_kind(r.onset_kind),
        onset_date: &r.onset_date,
        undiagnosed: r.undiagnosed,
        orphacode: &diagnosis.orphacode,
        icd10: &diagnosis.icd10,
        icd11: &diagnosis.icd11,
        omim: &diagnosis.omim,
        diagnosis_date: &r.diagnosis_date,
        genetic_findings: r
            .genetic_findings
            .iter()
            .map(|f| FindingInput {
                gene: &f.gene,
                variants: &f.variants,
            })
            .collect(),
        hpo_terms: &r.hpo_terms,
        icf_codes: &r.icf_codes,
    };
    CaseRecord::validate(&input, today)
}

/// A record for the wire.
/// Codes stored as another, with their field paths under `prefix` (`record`).
pub fn replacements_to_proto(
    replaced: &[crate::domain::Replacement],
    prefix: &str,
) -> Vec<proto::CodeReplacement> {
    replaced
        .iter()
        .map(|r| proto::CodeReplacement {
            field: format!("{prefix}.{}", r.field),
            given: r.given.clone(),
            stored: r.stored.clone(),
            note: r.note.clone(),
        })
        .collect()
}

pub fn case_record_to_proto(record: &CaseRecord) -> proto::CaseRecord {
    fn strings<T: std::fmt::Display>(items: &[T]) -> Vec<String> {
        items.iter().map(ToString::to_string).collect()
    }
    let text = |d: Option<PartialDate>| d.map(|d| d.to_string()).unwrap_or_default();
    proto::CaseRecord {
        birth_year_month: record.birth.to_string(),
        sex: sex_to_proto(record.sex),
        status: status_to_proto(record.status),
        date_of_death: text(record.date_of_death),
        first_contact_date: text(record.first_contact),
        onset_kind: onset_kind_to_proto(record.onset.kind()),
        onset_date: text(record.onset.date()),
        undiagnosed: record.undiagnosed,
        diagnosis: Some(proto::Diagnosis {
            orphacode: record
                .orphacode
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
            icd10: strings(&record.icd10),
            icd11: strings(&record.icd11),
            omim: strings(&record.omim),
        }),
        diagnosis_date: text(record.diagnosis_date),
        genetic_findings: record
            .genetic_findings
            .iter()
            .map(|f| proto::GeneticFinding {
                gene: f.gene.to_string(),
                variants: strings(&f.variants),
            })
            .collect(),
        hpo_terms: strings(&record.hpo_terms),
        icf_codes: strings(&record.icf_codes),
    }
}

/// Converts, checks and normalises a patient's identifiers from the wire
/// (`PatientIdentity::parse`).
pub fn patient_identity(p: &proto::PatientIdentifiers) -> Result<PatientIdentity, FieldViolations> {
    use proto::patient_identifiers::Kind;
    PatientIdentity::parse(p.kind.as_ref().map(|kind| match kind {
        Kind::National(n) => IdentifiersInput::National(NationalInput {
            issuing_country: &n.issuing_country,
            value: &n.value,
        }),
        Kind::Demographic(d) => IdentifiersInput::Demographic(DemographicInput {
            given_names: &d.given_names,
            family_name: &d.family_name,
            date_of_birth: &d.date_of_birth,
            sex_at_birth: sex(d.sex_at_birth),
            place_of_birth: &d.place_of_birth,
            country_of_birth: &d.country_of_birth,
        }),
    }))
}

/// A consent scope from the wire; `_UNSPECIFIED` and unknown numbers are `None`.
pub fn scope(value: i32) -> Option<Scope> {
    match proto::ConsentScope::try_from(value).ok()? {
        proto::ConsentScope::RegistryInclusion => Some(Scope::RegistryInclusion),
        proto::ConsentScope::ResearchUse => Some(Scope::ResearchUse),
        proto::ConsentScope::Recontact => Some(Scope::Recontact),
        proto::ConsentScope::Unspecified => None,
    }
}

pub fn scope_to_proto(scope: Scope) -> i32 {
    (match scope {
        Scope::RegistryInclusion => proto::ConsentScope::RegistryInclusion,
        Scope::ResearchUse => proto::ConsentScope::ResearchUse,
        Scope::Recontact => proto::ConsentScope::Recontact,
    }) as i32
}

/// A consent state from the wire; `_UNSPECIFIED` and unknown numbers are `None`.
pub fn decision(value: i32) -> Option<Decision> {
    match proto::ConsentState::try_from(value).ok()? {
        proto::ConsentState::Granted => Some(Decision::Granted),
        proto::ConsentState::Refused => Some(Decision::Refused),
        proto::ConsentState::Withdrawn => Some(Decision::Withdrawn),
        proto::ConsentState::Unspecified => None,
    }
}

pub fn decision_to_proto(decision: Decision) -> i32 {
    (match decision {
        Decision::Granted => proto::ConsentState::Granted,
        Decision::Refused => proto::ConsentState::Refused,
        Decision::Withdrawn => proto::ConsentState::Withdrawn,
    }) as i32
}

/// Converts and checks the consent attested with a submission
/// (`consent::check_attestation`).
pub fn attestation(
    items: &[proto::ScopeConsent],
    now: DateTime<Utc>,
) -> Result<Vec<ConsentDecision>, FieldViolations> {
    let items: Vec<AttestationItem<'_>> = items
        .iter()
        .map(|item| AttestationItem {
            scope: scope(item.scope),
            decision: decision(item.state),
            given_at: item.given_at.as_ref().map(timestamp),
            form_version: &item.form_version,
            expires_at: item.expires_at.as_ref().map(timestamp),
        })
        .collect();
    consent::check_attestation(&items, now)
}

/// Converts a protobuf timestamp; `None` when out of chrono's range or malformed (nanos
/// must be 0..=999,999,999, as protobuf defines them: chrono would otherwise read a larger
/// value as a leap second).
pub fn timestamp(t: &prost_types::Timestamp) -> Option<DateTime<Utc>> {
    let nanos = u32::try_from(t.nanos).ok().filter(|n| *n < 1_000_000_000)?;
    DateTime::from_timestamp(t.seconds, nanos)
}

pub fn timestamp_to_proto(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: i32::try_from(t.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::MAX_HPO_TERMS;
    use proptest::prelude::*;

    use crate::fixtures::{record as valid, today};

    fn fields(r: &proto::CaseRecord) -> Vec<String> {
        match case_record(r, today()) {
            Ok(_) => Vec::new(),
            Err(v) => v.iter().map(|v| v.field.clone()).collect(),
        }
    }

    #[test]
    fn a_valid_record_round_trips() {
        let record = case_record(&valid(), today()).unwrap();
        assert_eq!(case_record_to_proto(&record), valid());
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
        let record = case_record(&r, today()).unwrap();
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
            if let Ok(record) = case_record(&r, today()) {
                // What was accepted re-parses to the same thing.
                prop_assert_eq!(case_record(&case_record_to_proto(&record), today()).unwrap(), record.clone());
                prop_assert!(record.delay_days().is_none_or(|d| d >= 0));
            }
        }
    }
}

#[cfg(test)]
mod attestation_tests {
    use super::*;
    use crate::domain::MIN_YEAR;

    fn t(days: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000 + days * 86_400, 0).unwrap()
    }

    fn item(scope: proto::ConsentScope, state: proto::ConsentState) -> proto::ScopeConsent {
        crate::fixtures::consent_at(scope, state, t(0))
    }

    #[test]
    fn attestation_rejects_withdrawal_future_dates_duplicates_and_reports_all() {
        let mut future = item(
            proto::ConsentScope::ResearchUse,
            proto::ConsentState::Granted,
        );
        future.given_at = Some(timestamp_to_proto(t(30)));
        future.form_version = String::new();
        let items = [
            item(
                proto::ConsentScope::RegistryInclusion,
                proto::ConsentState::Withdrawn,
            ),
            future,
            item(
                proto::ConsentScope::RegistryInclusion,
                proto::ConsentState::Granted,
            ),
        ];
        let err = attestation(&items, t(1)).unwrap_err();
        let fields: Vec<_> = err.iter().map(|v| v.field.as_str()).collect();
        assert!(fields.contains(&"consent[0].state"), "{fields:?}");
        assert!(fields.contains(&"consent[1].given_at"), "{fields:?}");
        assert!(fields.contains(&"consent[1].form_version"), "{fields:?}");
        assert!(fields.contains(&"consent[2].scope"), "{fields:?}");
    }

    #[test]
    fn consent_dates_follow_the_rules_of_record_dates() {
        let year = |y: i32| {
            let at = chrono::NaiveDate::from_ymd_opt(y, 1, 1)
                .unwrap()
                .and_hms_opt(0, 0, 0)
                .unwrap()
                .and_utc();
            Some(timestamp_to_proto(at))
        };
        let mut ancient = item(
            proto::ConsentScope::RegistryInclusion,
            proto::ConsentState::Granted,
        );
        ancient.given_at = year(1);
        let mut far = item(
            proto::ConsentScope::ResearchUse,
            proto::ConsentState::Granted,
        );
        far.expires_at = year(9000);
        let err = attestation(&[ancient, far], t(1)).unwrap_err();
        let fields: Vec<_> = err.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(fields, ["consent[0].given_at", "consent[1].expires_at"]);
        let mut oldest = item(
            proto::ConsentScope::RegistryInclusion,
            proto::ConsentState::Granted,
        );
        oldest.given_at = year(MIN_YEAR);
        assert!(attestation(&[oldest], t(1)).is_ok());
    }

    #[test]
    fn attestation_accepts_valid_decisions() {
        let mut research = item(
            proto::ConsentScope::ResearchUse,
            proto::ConsentState::Refused,
        );
        research.expires_at = Some(timestamp_to_proto(t(400)));
        let items = [
            item(
                proto::ConsentScope::RegistryInclusion,
                proto::ConsentState::Granted,
            ),
            research,
        ];
        let parsed = attestation(&items, t(1)).unwrap();
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed[1].decision, Decision::Refused);
        assert_eq!(parsed[1].expires_at, Some(t(400)));
    }

    #[test]
    fn attestation_rejects_expiry_before_given() {
        let mut i = item(
            proto::ConsentScope::RegistryInclusion,
            proto::ConsentState::Granted,
        );
        i.expires_at = Some(timestamp_to_proto(t(-1)));
        let err = attestation(&[i], t(1)).unwrap_err();
        assert_eq!(err.iter().next().unwrap().field, "consent[0].expires_at");
    }

    #[test]
    fn timestamps_with_out_of_range_nanos_are_malformed() {
        let t = |seconds, nanos| timestamp(&prost_types::Timestamp { seconds, nanos });
        assert!(t(59, 999_999_999).is_some());
        assert_eq!(t(59, 1_500_000_000), None);
        assert_eq!(t(0, -1), None);
    }
}
