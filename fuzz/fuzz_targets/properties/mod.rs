//! The properties of the input edge, shared by the fuzz targets (`fuzz/fuzz_targets/`) and
//! the stable proptest suite (`tests/api/malformed.rs`; `tests/api/main.rs` includes this
//! file by path), so both check exactly the same thing. Both start from the valid messages
//! of `ern_registry::fixtures`, as every other test does.
//!
//! For any input: nothing panics; what a parser accepts re-parses to itself; a rejected
//! request is a set of field violations whose paths name real fields of the message
//! (indices within bounds); and no violation description contains a patient identifier
//! (national value, names, date of birth, place of birth), raw or in the normalised form
//! the pseudonymiser keys on.
//!
//! The leak check must not cry wolf when a random "name" such as `must` happens to be a
//! word of a fixed description. A candidate identifier therefore counts only when it is
//! not a substring of (a) the descriptions the conversions give for a fixed battery of
//! probe inputs that hold no random data ([`template_corpus`]), nor (b) the descriptions
//! the same request gives with its identifiers swapped for fixed ones (the record and
//! consent parts do not see the patient, so their descriptions must be identical).
//! Anything else found in a description was put there by the input: a leak.
//!
//! Every function panics (with a message that names the property, never the input's
//! identifiers) when a property fails: that is what the fuzzer and proptest look for.

#![allow(dead_code)]

use std::sync::OnceLock;

use ern_registry::aggregate::Dimension;
use ern_registry::api::convert::{
    attestation as parse_attestation, timestamp as timestamp_from_proto, timestamp_to_proto,
};
use ern_registry::auth::PresentedKey;
use ern_registry::consent;
use ern_registry::domain::{
    CentreCode, ClientReference, CountryCode, FieldViolations, HgncSymbol, HgvsVariant, HpoTerm,
    Icd10, Icd11, IcfCode, Omim, Orphacode, PartialDate, RegistryCode, YearMonth,
};
use ern_registry::fixtures::{self, now, today};
use ern_registry::proto;
use ern_registry::pseudonym::{Pseudonym, check_bsn, compact_national, normalise_text};

/// Shortest identifier (in characters) the leak check looks for; shorter strings occur
/// in any English sentence.
pub const MIN_SECRET_CHARS: usize = 4;

// ---------------------------------------------------------------------------------------
// Valid messages, the base of "near-valid" inputs: the shared fixtures
// (`ern_registry::fixtures`), with a few fields set so that the base reaches more rules.

/// The fixtures' attestation with research use refused: both states in the base.
pub fn valid_consent() -> Vec<proto::ScopeConsent> {
    let mut items = fixtures::inclusion_granted();
    items[1].state = proto::ConsentState::Refused as i32;
    items
}

/// The fixtures' submission (national identifier) with a client reference.
pub fn valid_submission() -> proto::SubmitCaseRequest {
    proto::SubmitCaseRequest {
        consent: valid_consent(),
        client_reference: "batch-1:row.7".into(),
        ..fixtures::submission("ERN-LUNG", fixtures::national("NL", fixtures::BSN))
    }
}

/// A recording for the fixtures' person (demographic identifiers), with a client
/// reference.
pub fn valid_record_consent() -> proto::RecordConsentRequest {
    proto::RecordConsentRequest {
        client_reference: "officer-7".into(),
        ..fixtures::consent_request(
            "ERN-LUNG",
            fixtures::by_identifiers(fixtures::demographic(fixtures::person())),
            valid_consent(),
        )
    }
}

pub fn valid_withdrawal() -> proto::WithdrawConsentRequest {
    fixtures::withdrawal(
        "ERN-LUNG",
        fixtures::by_identifiers(fixtures::national("NL", fixtures::BSN)),
        &[proto::ConsentScope::RegistryInclusion],
    )
}

// ---------------------------------------------------------------------------------------
// String parsers.

/// Checks that an accepted code is the input verbatim and re-parses to itself.
macro_rules! code_round_trip {
    ($s:expr, $($ty:ty),+ $(,)?) => {
        $(
            if let Ok(code) = <$ty>::parse($s) {
                assert_eq!(code.as_str(), $s, "{} keeps its text", stringify!($ty));
                assert_eq!(code.to_string(), $s, "{} displays its text", stringify!($ty));
                assert_eq!(<$ty>::parse(code.as_str()).as_ref(), Ok(&code));
            }
        )+
    };
}

/// Every parser of a single string, with the invariant of each accepted value.
pub fn string_parsers(s: &str) {
    code_round_trip!(
        s,
        Orphacode,
        Icd10,
        Icd11,
        Omim,
        HpoTerm,
        HgncSymbol,
        HgvsVariant,
        IcfCode,
        CountryCode,
        RegistryCode,
        CentreCode,
        ClientReference,
    );
    if let Ok(code) = Orphacode::parse(s) {
        assert_eq!(Orphacode::from_number(code.number()), Ok(code));
    }
    if let Ok(d) = PartialDate::parse(s) {
        assert_eq!(d.to_string(), s, "a partial date displays as given");
        assert!(d.earliest() <= d.midpoint() && d.midpoint() <= d.latest());
        let _ = d.is_future(today());
    }
    if let Ok(ym) = YearMonth::parse(s) {
        assert_eq!(ym.to_string(), s, "a year-month displays as given");
        assert_eq!(PartialDate::parse(s), Ok(ym.as_partial()));
    }
    if let Ok(p) = Pseudonym::parse(s) {
        assert_eq!(p.as_str(), s);
        assert!(p.registry_seq() <= 999 && p.key_version() <= 999);
        let _ = format!("{p:?}");
    }
    if let Ok(key) = PresentedKey::parse(s) {
        assert_eq!(key.key_id.len(), 16);
        assert!(s.contains(&key.key_id));
    }
    if let Some(bsn) = check_bsn(s) {
        assert_eq!(bsn.len(), 9, "a BSN has 9 digits");
        assert!(bsn.ends_with(s), "a BSN is only left-padded");
        assert_eq!(
            check_bsn(&bsn).as_deref().map(String::as_str),
            Some(bsn.as_str())
        );
    }
    if let Some(compact) = compact_national(s) {
        assert!(
            !compact.is_empty()
                && compact
                    .bytes()
                    .all(|b| b.is_ascii_digit() || b.is_ascii_uppercase()),
            "a national value is ASCII letters (upper case) and digits"
        );
        // Sized once to what it holds and never grown: no unwiped copy left behind.
        assert_eq!(compact.capacity(), compact.len());
        assert_eq!(compact_national(&compact).as_deref(), Some(&*compact));
    }
    let folded = normalise_text(s);
    assert!(
        folded.chars().all(char::is_alphanumeric),
        "normalised text is letters and digits only"
    );
    for dimension in Dimension::ALL {
        if let Ok(key) = dimension.parse_value(s) {
            // A filter value in the published form parses back to the same group.
            let label = dimension.label(&key);
            assert_eq!(
                dimension.parse_value(&label).as_ref(),
                Ok(&key),
                "{}: label of a parsed value re-parses",
                dimension.name()
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// Field paths.

/// Replaces every `[n]` of a path with `[]`, returning the pattern and the indices.
fn pattern_of(path: &str) -> Option<(String, Vec<usize>)> {
    let mut pattern = String::with_capacity(path.len());
    let mut indices = Vec::new();
    let mut rest = path;
    while let Some(open) = rest.find('[') {
        pattern.push_str(&rest[..open]);
        let close = rest[open..].find(']')? + open;
        let digits = &rest[open + 1..close];
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        indices.push(digits.parse().ok()?);
        pattern.push_str("[]");
        rest = &rest[close + 1..];
    }
    pattern.push_str(rest);
    let segments_ok = pattern.split('.').all(|seg| {
        let name = seg.strip_suffix("[]").unwrap_or(seg);
        name.as_bytes().first().is_some_and(u8::is_ascii_lowercase)
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    });
    segments_ok.then_some((pattern, indices))
}

const IDENTIFIER_PATHS: &[&str] = &[
    "kind",
    "national.issuing_country",
    "national.value",
    "demographic.given_names",
    "demographic.family_name",
    "demographic.date_of_birth",
    "demographic.sex_at_birth",
    "demographic.place_of_birth",
    "demographic.country_of_birth",
];

const RECORD_PATHS: &[&str] = &[
    "birth_year_month",
    "sex",
    "status",
    "date_of_death",
    "first_contact_date",
    "onset_kind",
    "onset_date",
    "diagnosis.orphacode",
    "diagnosis_date",
    "diagnosis.icd10",
    "diagnosis.icd10[]",
    "diagnosis.icd11",
    "diagnosis.icd11[]",
    "diagnosis.omim",
    "diagnosis.omim[]",
    "hpo_terms",
    "hpo_terms[]",
    "icf_codes",
    "icf_codes[]",
    "genetic_findings",
    "genetic_findings[].gene",
    "genetic_findings[].variants",
    "genetic_findings[].variants[]",
];

const DECISION_PATHS: &[&str] = &["scope", "state", "given_at", "form_version", "expires_at"];

/// The length of the repeated field `pattern` (with `[]` for earlier indices, which are
/// in `indices`) of a case record, or `None` when the path names no repeated field.
fn record_list_len(r: &proto::CaseRecord, pattern: &str, indices: &[usize]) -> Option<usize> {
    let d = r.diagnosis.clone().unwrap_or_default();
    Some(match pattern {
        "diagnosis.icd10" => d.icd10.len(),
        "diagnosis.icd11" => d.icd11.len(),
        "diagnosis.omim" => d.omim.len(),
        "hpo_terms" => r.hpo_terms.len(),
        "icf_codes" => r.icf_codes.len(),
        "genetic_findings" => r.genetic_findings.len(),
        "genetic_findings[].variants" => r.genetic_findings.get(indices[0])?.variants.len(),
        _ => return None,
    })
}

/// Checks every index of `path` against the lengths `len_of` gives for its prefixes.
fn indices_in_bounds(
    path: &str,
    indices: &[usize],
    len_of: impl Fn(&str, &[usize]) -> Option<usize>,
) {
    // Walk the pattern: at the k-th "[]", the prefix before it names a repeated field.
    let mut seen = 0;
    let mut prefix = String::new();
    let (pattern, _) = pattern_of(path).expect("checked");
    let mut rest = pattern.as_str();
    while let Some(at) = rest.find("[]") {
        prefix.push_str(&rest[..at]);
        let len = len_of(&prefix, &indices[..seen])
            .unwrap_or_else(|| panic!("{path}: no repeated field at {prefix}"));
        assert!(
            indices[seen] < len,
            "{path}: index out of bounds ({len} entries)"
        );
        prefix.push_str("[]");
        seen += 1;
        rest = &rest[at + 2..];
    }
}

fn with_prefix<'a>(prefix: &str, paths: &'a [&'a str]) -> impl Iterator<Item = String> + 'a {
    let prefix = prefix.to_owned();
    paths.iter().map(move |p| format!("{prefix}.{p}"))
}

/// Known fields of a SubmitCaseRequest's violations.
fn submission_paths() -> &'static [String] {
    static PATHS: OnceLock<Vec<String>> = OnceLock::new();
    PATHS.get_or_init(|| {
        let mut paths: Vec<String> = ["registry", "patient", "record", "consent"]
            .map(String::from)
            .to_vec();
        paths.push("client_reference".into());
        paths.extend(with_prefix("patient", IDENTIFIER_PATHS));
        paths.extend(with_prefix("record", RECORD_PATHS));
        paths.extend(with_prefix("consent[]", DECISION_PATHS));
        paths
    })
}

/// Known fields of the violations of consent service requests.
fn consent_paths() -> &'static [String] {
    static PATHS: OnceLock<Vec<String>> = OnceLock::new();
    PATHS.get_or_init(|| {
        let mut paths: Vec<String> = [
            "registry",
            "patient",
            "patient.pseudonym",
            "decisions",
            "client_reference",
            "scopes",
            "scopes[]",
            "reason",
        ]
        .map(String::from)
        .to_vec();
        paths.extend(with_prefix("patient.identifiers", IDENTIFIER_PATHS));
        paths.extend(with_prefix("decisions[]", DECISION_PATHS));
        paths
    })
}

/// Every violation of a SubmitCaseRequest names a field of it, with indices in bounds.
pub fn check_submission_paths(req: &proto::SubmitCaseRequest, v: &FieldViolations) {
    let empty = proto::CaseRecord::default();
    let record = req.record.as_ref().unwrap_or(&empty);
    for violation in v.iter() {
        let path = violation.field.as_str();
        let (pattern, indices) =
            pattern_of(path).unwrap_or_else(|| panic!("{path:?} is not a field path"));
        assert!(
            submission_paths().contains(&pattern),
            "{path:?} names no field of SubmitCaseRequest"
        );
        indices_in_bounds(path, &indices, |prefix, earlier| match prefix {
            "consent" => Some(req.consent.len()),
            p => record_list_len(record, p.strip_prefix("record.")?, earlier),
        });
        assert!(
            !violation.description.trim().is_empty(),
            "{path}: empty description"
        );
    }
}

/// Every violation of a consent request names a field of it, with indices in bounds.
pub fn check_consent_paths(decisions: &[proto::ScopeConsent], scopes: &[i32], v: &FieldViolations) {
    for violation in v.iter() {
        let path = violation.field.as_str();
        let (pattern, indices) =
            pattern_of(path).unwrap_or_else(|| panic!("{path:?} is not a field path"));
        assert!(
            consent_paths().contains(&pattern),
            "{path:?} names no field of the consent request"
        );
        indices_in_bounds(path, &indices, |prefix, _| match prefix {
            "decisions" => Some(decisions.len()),
            "scopes" => Some(scopes.len()),
            _ => None,
        });
        assert!(
            !violation.description.trim().is_empty(),
            "{path}: empty description"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Identifiers never in a description.

/// The identifier strings of a patient, and the forms derived from them that the
/// pseudonymiser keys on, that are long enough to look for.
pub fn identifier_secrets(p: &proto::PatientIdentifiers) -> Vec<String> {
    use proto::patient_identifiers::Kind;
    let mut raw: Vec<&str> = Vec::new();
    match &p.kind {
        None => {}
        Some(Kind::National(n)) => raw.push(&n.value),
        Some(Kind::Demographic(d)) => {
            raw.extend([
                d.given_names.as_str(),
                d.family_name.as_str(),
                d.date_of_birth.as_str(),
                d.place_of_birth.as_str(),
            ]);
        }
    }
    let mut out = Vec::new();
    for s in raw {
        let compact: String = s
            .chars()
            .filter(|c| !matches!(c, ' ' | '.' | '-'))
            .map(|c| c.to_ascii_uppercase())
            .collect();
        for candidate in [
            s.to_owned(),
            s.trim().to_owned(),
            compact,
            normalise_text(s).to_string(),
        ] {
            if candidate.chars().count() >= MIN_SECRET_CHARS && !out.contains(&candidate) {
                out.push(candidate);
            }
        }
    }
    out
}

/// Descriptions the conversions give for inputs with no random data: the text a random
/// identifier may coincide with without having leaked.
pub fn template_corpus() -> &'static str {
    static CORPUS: OnceLock<String> = OnceLock::new();
    CORPUS.get_or_init(|| {
        use proto::patient_identifiers::Kind;
        let mut texts: Vec<String> = Vec::new();
        let mut add = |v: FieldViolations| texts.extend(v.iter().map(|v| v.description.clone()));
        let long = "x".repeat(300);
        let national = |country: &str, value: &str| proto::PatientIdentifiers {
            kind: Some(Kind::National(proto::NationalIdentifier {
                issuing_country: country.into(),
                value: value.into(),
            })),
        };
        let demographic =
            |text: &str, dob: &str, sex: i32, country: &str| proto::PatientIdentifiers {
                kind: Some(Kind::Demographic(proto::DemographicIdentifiers {
                    given_names: text.into(),
                    family_name: text.into(),
                    date_of_birth: dob.into(),
                    sex_at_birth: sex,
                    place_of_birth: text.into(),
                    country_of_birth: country.into(),
                })),
            };
        let probes = [
            proto::PatientIdentifiers { kind: None },
            national("", ""),
            national("XX", "!!"),
            national("NL", "12345678"),
            national("NL", "ABC"),
            national("nld", &long),
            demographic("", "", 0, ""),
            demographic("!!", "1999-02-30", 99, "zz"),
            demographic(&long, &long, 1, "XX"),
            demographic("-", "2999-01-01", 1, "NL"),
        ];
        for p in &probes {
            if let Err(v) = ern_registry::api::convert::patient_identity(p) {
                add(v);
            }
        }
        // Record and consent templates, for the messages that check both together.
        let mut record = fixtures::record();
        record.birth_year_month = "x".into();
        record.sex = 99;
        record.diagnosis = None;
        if let Err(v) = ern_registry::api::convert::case_record(&record, today()) {
            add(v);
        }
        if let Err(v) =
            ern_registry::api::convert::case_record(&proto::CaseRecord::default(), today())
        {
            add(v);
        }
        let items = vec![proto::ScopeConsent::default(); 2];
        if let Err(v) = parse_attestation(&items, now()) {
            add(v);
        }
        texts.join("\n")
    })
}

/// Asserts that no text of `texts` contains a secret, except where the secret is also
/// a substring of the fixed templates or of `neutral` (what the request gives with
/// identifiers that are not the patient's).
pub fn assert_no_secret<'a>(
    what: &str,
    texts: impl IntoIterator<Item = &'a str>,
    secrets: &[String],
    neutral: &str,
) {
    let corpus = template_corpus();
    let live: Vec<&String> = secrets
        .iter()
        .filter(|s| !corpus.contains(s.as_str()) && !neutral.contains(s.as_str()))
        .collect();
    for text in texts {
        for secret in &live {
            // Never print the secret or the text: this message may end up in CI logs.
            assert!(
                !text.contains(secret.as_str()),
                "{what} contains a patient identifier ({} characters)",
                secret.chars().count()
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// Request conversions, as the handlers do them (without the store).

/// The conversion of a SubmitCaseRequest, as `api::case::submit_one` does it once the
/// registry is known, with the round-trip checks of what is accepted.
pub fn convert_submission(req: &proto::SubmitCaseRequest) -> FieldViolations {
    let mut v = FieldViolations::new();
    match req.patient.as_ref() {
        None => v.push("patient", "is required"),
        Some(p) => match ern_registry::api::convert::patient_identity(p) {
            Ok(identity) => {
                assert!(!identity.encode().is_empty());
                let shown = format!("{identity:?}");
                assert!(
                    shown == "PatientIdentity::National(..)"
                        || shown == "PatientIdentity::Demographic(..)",
                    "Debug of PatientIdentity shows no identifier"
                );
            }
            Err(e) => v.extend(e.nest("patient")),
        },
    }
    match req.record.as_ref() {
        None => v.push("record", "is required"),
        Some(r) => match ern_registry::api::convert::case_record(r, today()) {
            Ok(record) => {
                let again = ern_registry::api::convert::case_record(
                    &ern_registry::api::convert::case_record_to_proto(&record),
                    today(),
                )
                .expect("an accepted record re-parses");
                assert_eq!(again, record, "an accepted record round-trips");
                assert!(record.delay_days().is_none_or(|d| d >= 0));
                assert!(record.onset_age_days().is_none_or(|d| d >= 0));
                assert!(record.diagnosis_age_days().is_none_or(|d| d >= 0));
            }
            Err(e) => v.extend(e.nest("record")),
        },
    }
    match parse_attestation(&req.consent, now()) {
        Ok(decisions) => check_decisions(&decisions),
        Err(e) => v.extend(e),
    }
    v.check(
        "client_reference",
        ClientReference::parse(&req.client_reference),
    );
    v
}

fn check_decisions(decisions: &[consent::ConsentDecision]) {
    for d in decisions {
        assert!(
            d.given_at <= now(),
            "a recorded decision is never in the future"
        );
        assert!(d.expires_at.is_none_or(|e| e > d.given_at));
        assert!(!d.form_version.is_empty());
    }
}

/// All checks of one SubmitCaseRequest; returns its violations.
pub fn submission(req: &proto::SubmitCaseRequest) -> FieldViolations {
    let _ = RegistryCode::parse(&req.registry);
    let v = convert_submission(req);
    check_submission_paths(req, &v);
    if let Some(patient) = &req.patient {
        let secrets = identifier_secrets(patient);
        if !secrets.is_empty() {
            let mut swapped = req.clone();
            swapped.patient = Some(fixtures::national("NL", fixtures::BSN));
            let neutral = descriptions(&convert_submission(&swapped));
            assert_no_secret(
                "a violation description",
                v.iter().map(|v| v.description.as_str()),
                &secrets,
                &neutral,
            );
        }
    }
    v
}

pub fn descriptions(v: &FieldViolations) -> String {
    v.iter()
        .map(|v| v.description.as_str())
        .collect::<Vec<_>>()
        .join("\n")
}

/// The patient part of a consent request, as `api::consent::resolve_patient` does it
/// (a pseudonym's registry is not checked: that needs the store).
fn convert_patient_ref(patient: Option<&proto::PatientRef>, v: &mut FieldViolations) {
    use proto::patient_ref::Kind;
    match patient.and_then(|p| p.kind.as_ref()) {
        None => v.push("patient", "identifiers or a pseudonym are required"),
        Some(Kind::Pseudonym(text)) => {
            if let Err(e) = Pseudonym::parse(text) {
                v.push("patient.pseudonym", e.to_string());
            }
        }
        Some(Kind::Identifiers(ids)) => {
            if let Err(e) = ern_registry::api::convert::patient_identity(ids) {
                v.extend(e.nest("patient.identifiers"));
            }
        }
    }
}

fn patient_secrets(patient: Option<&proto::PatientRef>) -> Vec<String> {
    match patient.and_then(|p| p.kind.as_ref()) {
        Some(proto::patient_ref::Kind::Identifiers(ids)) => identifier_secrets(ids),
        _ => Vec::new(),
    }
}

fn convert_record_consent(req: &proto::RecordConsentRequest) -> FieldViolations {
    let mut v = FieldViolations::new();
    convert_patient_ref(req.patient.as_ref(), &mut v);
    if req.decisions.is_empty() {
        v.push("decisions", "at least one decision is required");
    } else {
        match parse_attestation(&req.decisions, now()) {
            Ok(decisions) => check_decisions(&decisions),
            Err(e) => {
                for item in e.iter() {
                    v.push(
                        item.field.replacen("consent", "decisions", 1),
                        item.description.clone(),
                    );
                }
            }
        }
    }
    v.check(
        "client_reference",
        ClientReference::parse(&req.client_reference),
    );
    v
}

/// All checks of one RecordConsentRequest; returns its violations.
pub fn record_consent(req: &proto::RecordConsentRequest) -> FieldViolations {
    let _ = RegistryCode::parse(&req.registry);
    let v = convert_record_consent(req);
    check_consent_paths(&req.decisions, &[], &v);
    let secrets = patient_secrets(req.patient.as_ref());
    if !secrets.is_empty() {
        let mut swapped = req.clone();
        swapped.patient = valid_record_consent().patient;
        let neutral = descriptions(&convert_record_consent(&swapped));
        assert_no_secret(
            "a violation description",
            v.iter().map(|v| v.description.as_str()),
            &secrets,
            &neutral,
        );
    }
    v
}

fn convert_withdrawal(req: &proto::WithdrawConsentRequest) -> FieldViolations {
    let mut v = FieldViolations::new();
    convert_patient_ref(req.patient.as_ref(), &mut v);
    if req.scopes.is_empty() {
        v.push("scopes", "at least one scope is required");
    }
    let mut seen = Vec::new();
    for (i, &value) in req.scopes.iter().enumerate() {
        match ern_registry::api::convert::scope(value) {
            None => v.push(
                format!("scopes[{i}]"),
                "must be REGISTRY_INCLUSION, RESEARCH_USE or RECONTACT",
            ),
            Some(s) if seen.contains(&s) => v.push(format!("scopes[{i}]"), "is a duplicate"),
            Some(s) => {
                assert_eq!(
                    ern_registry::api::convert::scope(ern_registry::api::convert::scope_to_proto(
                        s
                    )),
                    Some(s)
                );
                seen.push(s);
            }
        }
    }
    match proto::WithdrawalReason::try_from(req.reason) {
        Ok(proto::WithdrawalReason::Unspecified) | Err(_) => v.push(
            "reason",
            "is required: one of the WITHDRAWAL_REASON_ values",
        ),
        Ok(_) => {}
    }
    v
}

/// All checks of one WithdrawConsentRequest; returns its violations.
pub fn withdrawal(req: &proto::WithdrawConsentRequest) -> FieldViolations {
    let _ = RegistryCode::parse(&req.registry);
    let v = convert_withdrawal(req);
    check_consent_paths(&[], &req.scopes, &v);
    let secrets = patient_secrets(req.patient.as_ref());
    if !secrets.is_empty() {
        let mut swapped = req.clone();
        swapped.patient = valid_withdrawal().patient;
        let neutral = descriptions(&convert_withdrawal(&swapped));
        assert_no_secret(
            "a violation description",
            v.iter().map(|v| v.description.as_str()),
            &secrets,
            &neutral,
        );
    }
    v
}

/// A timestamp from the wire either is refused or survives the round trip.
pub fn timestamp(t: &prost_types::Timestamp) {
    if let Some(at) = timestamp_from_proto(t) {
        let back = timestamp_to_proto(at);
        assert_eq!(
            timestamp_from_proto(&back),
            Some(at),
            "timestamp round-trips"
        );
    }
}

/// The public pieces of the research request conversions (the handlers' own helpers are
/// private): dimensions, filter values, expertise codes.
pub fn research(group_by: &[i32], filters: &[proto::Filter]) {
    for &value in group_by {
        if let Some(d) = Dimension::from_proto(value) {
            assert_eq!(Dimension::from_proto(d.to_proto()), Some(d));
        }
    }
    for f in filters {
        let _ = Dimension::from_proto(f.dimension);
        for value in &f.values {
            for d in Dimension::ALL {
                if let Ok(key) = d.parse_value(value) {
                    assert_eq!(d.parse_value(&d.label(&key)).as_ref(), Ok(&key));
                }
            }
        }
    }
}
