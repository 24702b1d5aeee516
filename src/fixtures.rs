//! Test fixtures: the one valid case record, submission, set of identifiers and consent
//! attestation that the unit tests, the integration tests (`tests/`), the benches
//! (`benches/`) and the fuzz targets (`fuzz/`) all start from, so that "a valid case" is
//! written once and a change to the contract is made in one place.
//!
//! Everything here is valid as it stands. A test that needs something else builds it from
//! these, with struct update syntax or by changing a field of the returned value, so the
//! variant shows only what differs. The data are invented: BSNs that pass the 11-check,
//! names and places nobody in particular has, a cystic fibrosis case as textbooks describe
//! it.
//!
//! Why a library module behind a feature rather than a file under `tests/common` included
//! with `#[path]`: the fuzz crate is a separate Cargo workspace and the library's own unit
//! tests are a fourth consumer; a module of the library is the one place all of them can
//! reach, and it is compiled once rather than into every test binary. It is compiled only
//! for this crate's unit tests (`cfg(test)`) or with the `fixtures` feature, which nothing
//! in a normal build turns on: the crate enables it for its integration tests and benches
//! through a dev-dependency on itself, and the fuzz crate through its dependency.
//! Dev-dependencies take no part in `cargo build`, so the release binary (and any crate
//! depending on this one without the feature) contains no test patient. Nothing outside
//! tests, benches and fuzz targets may use this module.

use chrono::{DateTime, NaiveDate, Utc};

use crate::proto;

/// A valid BSN (passes the 11-check), for tests that need one fixed number.
pub const BSN: &str = "123456782";

/// The form version of every fixture's consent decision.
pub const FORM_VERSION: &str = "ERN-2024-01";

/// When the fixtures' consent was given (RFC 3339).
pub const GIVEN: &str = "2024-03-01T10:00:00Z";

/// The fixed "today" of record conversions that do not go through a server (its clock
/// reads the system time): later than every date of [`record`].
pub fn today() -> NaiveDate {
    NaiveDate::from_ymd_opt(2026, 11, 24).expect("valid date")
}

/// The fixed "now" of consent conversions that do not go through a server: noon of
/// [`today`].
pub fn now() -> DateTime<Utc> {
    today().and_hms_opt(12, 0, 0).expect("valid time").and_utc()
}

/// A valid Dutch BSN for `seed`, for tests and benchmarks of the real `NL` path
/// (synthetic patients of `demo` use the synthetic issuer instead:
/// `crate::synthetic::identifier`): the first 8-digit prefix from `10,000,000 + 10 · seed`
/// on that has a check digit, and that digit. Each seed owns ten prefixes, at most one
/// without a check digit, so distinct seeds below 9,000,000 give distinct BSNs.
pub fn bsn(seed: u32) -> String {
    let first = 10_000_000 + (seed % 9_000_000) * 10;
    (first..first + 10)
        .flat_map(|prefix| (0..10).map(move |check| format!("{prefix}{check}")))
        .find_map(|digits| crate::pseudonym::check_bsn(&digits).map(|bsn| bsn.to_string()))
        .expect("one of ten prefixes has a check digit")
}

/// A national identifier, e.g. `national("NL", &bsn(1))`.
pub fn national(country: &str, value: &str) -> proto::PatientIdentifiers {
    proto::PatientIdentifiers {
        kind: Some(proto::patient_identifiers::Kind::National(
            proto::NationalIdentifier {
                issuing_country: country.into(),
                value: value.into(),
            },
        )),
    }
}

/// A valid set of demographic identifiers (a girl born in Leuven). Multi-word given and
/// family names, so that normalisation has something to do.
pub fn person() -> proto::DemographicIdentifiers {
    proto::DemographicIdentifiers {
        given_names: "Anna Maria".into(),
        family_name: "van den Broeck".into(),
        date_of_birth: "2015-06-12".into(),
        sex_at_birth: proto::Sex::Female as i32,
        place_of_birth: "Leuven".into(),
        country_of_birth: "BE".into(),
    }
}

/// Demographic identifiers as a patient's identifiers, e.g. `demographic(person())` or
/// `demographic(DemographicIdentifiers { family_name: .., ..person() })`.
pub fn demographic(person: proto::DemographicIdentifiers) -> proto::PatientIdentifiers {
    proto::PatientIdentifiers {
        kind: Some(proto::patient_identifiers::Kind::Demographic(person)),
    }
}

/// An RFC 3339 time, e.g. `"2024-03-01T10:00:00Z"`.
pub fn utc(rfc3339: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(rfc3339)
        .expect("RFC 3339 time")
        .to_utc()
}

/// An RFC 3339 time as a protobuf timestamp.
pub fn ts(rfc3339: &str) -> prost_types::Timestamp {
    crate::api::convert::timestamp_to_proto(utc(rfc3339))
}

/// One consent decision on the fixtures' form, given at `given` (RFC 3339), no expiry.
pub fn consent(
    scope: proto::ConsentScope,
    state: proto::ConsentState,
    given: &str,
) -> proto::ScopeConsent {
    consent_at(scope, state, utc(given))
}

/// One consent decision on the fixtures' form, given at `given`, no expiry.
pub fn consent_at(
    scope: proto::ConsentScope,
    state: proto::ConsentState,
    given: DateTime<Utc>,
) -> proto::ScopeConsent {
    proto::ScopeConsent {
        scope: scope as i32,
        state: state as i32,
        given_at: Some(crate::api::convert::timestamp_to_proto(given)),
        form_version: FORM_VERSION.into(),
        expires_at: None,
    }
}

/// The attestation of a submission: registry inclusion and research use granted at
/// [`GIVEN`], without expiry.
pub fn inclusion_granted() -> Vec<proto::ScopeConsent> {
    vec![
        consent(
            proto::ConsentScope::RegistryInclusion,
            proto::ConsentState::Granted,
            GIVEN,
        ),
        consent(
            proto::ConsentScope::ResearchUse,
            proto::ConsentState::Granted,
            GIVEN,
        ),
    ]
}

/// A valid, diagnosed case record (cystic fibrosis, onset in infancy, diagnosed at nine
/// months), with every list holding one valid entry.
pub fn record() -> proto::CaseRecord {
    proto::CaseRecord {
        birth_year_month: "2015-06".into(),
        sex: proto::Sex::Female as i32,
        status: proto::PatientStatus::Alive as i32,
        date_of_death: String::new(),
        first_contact_date: "2016-02".into(),
        onset_kind: proto::OnsetKind::Date as i32,
        onset_date: "2015-09".into(),
        undiagnosed: false,
        diagnosis: Some(proto::Diagnosis {
            orphacode: "ORPHA:586".into(),
            icd10: vec!["E84.0".into()],
            icd11: vec!["CA25".into()],
            omim: vec!["OMIM:219700".into()],
        }),
        diagnosis_date: "2016-03-14".into(),
        genetic_findings: vec![proto::GeneticFinding {
            gene: "CFTR".into(),
            variants: vec!["NM_000492.4:c.1521_1523del".into()],
        }],
        hpo_terms: vec!["HP:0006528".into()],
        icf_codes: vec!["b440".into()],
    }
}

/// A valid submission of [`record`] for `patient` to `registry`, with
/// [`inclusion_granted`] and no client reference.
pub fn submission(registry: &str, patient: proto::PatientIdentifiers) -> proto::SubmitCaseRequest {
    proto::SubmitCaseRequest {
        registry: registry.into(),
        patient: Some(patient),
        record: Some(record()),
        consent: inclusion_granted(),
        client_reference: String::new(),
    }
}

/// [`record`] as a GA4GH Phenopacket v2, in the schema's JSON form, as a client writes one
/// (labels, a full date of birth, a local `subject.id`, the variant in `hgvs.c` syntax):
/// it maps to exactly [`record`].
pub const PHENOPACKET: &str = include_str!("../docs/examples/phenopacket.json");

/// A valid SubmitPhenopacket of [`PHENOPACKET`] for `patient` to `registry`, with
/// [`inclusion_granted`] and no client reference.
pub fn phenopacket_submission(
    registry: &str,
    patient: proto::PatientIdentifiers,
) -> proto::SubmitPhenopacketRequest {
    proto::SubmitPhenopacketRequest {
        registry: registry.into(),
        patient: Some(patient),
        phenopacket: PHENOPACKET.into(),
        consent: inclusion_granted(),
        client_reference: String::new(),
    }
}

/// A patient named by identifiers, in a consent request.
pub fn by_identifiers(ids: proto::PatientIdentifiers) -> Option<proto::PatientRef> {
    Some(proto::PatientRef {
        kind: Some(proto::patient_ref::Kind::Identifiers(ids)),
    })
}

/// A patient named by pseudonym, in a consent request.
pub fn by_pseudonym(p: &str) -> Option<proto::PatientRef> {
    Some(proto::PatientRef {
        kind: Some(proto::patient_ref::Kind::Pseudonym(p.to_string())),
    })
}

/// An officer's recording of `decisions` for `patient`, without client reference.
pub fn consent_request(
    registry: &str,
    patient: Option<proto::PatientRef>,
    decisions: Vec<proto::ScopeConsent>,
) -> proto::RecordConsentRequest {
    proto::RecordConsentRequest {
        registry: registry.into(),
        patient,
        decisions,
        client_reference: String::new(),
    }
}

/// A withdrawal of `scopes` at the patient's request.
pub fn withdrawal(
    registry: &str,
    patient: Option<proto::PatientRef>,
    scopes: &[proto::ConsentScope],
) -> proto::WithdrawConsentRequest {
    proto::WithdrawConsentRequest {
        registry: registry.into(),
        patient,
        scopes: scopes.iter().map(|s| *s as i32).collect(),
        reason: proto::WithdrawalReason::PatientRequest as i32,
    }
}

/// A read of a case, with its history.
pub fn get_case(registry: &str, pseudonym: &str) -> proto::GetCaseRequest {
    proto::GetCaseRequest {
        registry: registry.into(),
        pseudonym: pseudonym.into(),
        include_history: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fixtures are what they promise: every consumer relies on them being valid.
    #[test]
    fn every_fixture_is_valid() {
        crate::api::convert::case_record(&record(), today()).expect("record");
        crate::api::convert::patient_identity(&national("NL", BSN)).expect("national");
        crate::api::convert::patient_identity(&national("NL", &bsn(7))).expect("derived BSN");
        crate::api::convert::patient_identity(&demographic(person())).expect("demographic");
        crate::api::convert::attestation(&inclusion_granted(), now()).expect("consent");
    }
}
