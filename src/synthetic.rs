//! Synthetic patients for demos and benchmarks, with realistic shapes: diagnoses with
//! skewed prevalence (Zipf), onset mostly in childhood, and diagnostic delays as reported
//! for rare diseases (about 72% diagnosed more than a year after onset, about 20% more
//! than twenty years after). Centres are skewed in size too.
//!
//! Every record is built as a client would send it and validated by the same code as a
//! submission (`api::convert::case_record`); every patient gets a synthetic national
//! identifier ([`identifier`]), validated and pseudonymised by the same code as a real one
//! (`api::convert::patient_identity`, [`Pseudonymiser::candidates`]); records are
//! written through the [`Writer`], so consent and research tables are maintained exactly
//! as in service.
//!
//! Two rules keep synthetic and real patients apart. A synthetic identifier is issued by
//! [`SYNTHETIC_ISSUER`], a code no country can hold, so it can never be a real patient's
//! (and never yields a real patient's pseudonym). And [`populate`] writes only into a
//! database whose patient data is all its own ([`check_synthetic_only`]): it refuses,
//! writing nothing, a database with one case, consent decision or erasure recorded by
//! anyone but [`GENERATOR_PRINCIPAL`].

use chrono::{Duration, NaiveDate, TimeZone, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Exp, Zipf};
use tokio::task::JoinSet;

use crate::audit::Entry;
use crate::auth::Role;
use crate::consent::{ConsentDecision, Decision};
use crate::proto;
use crate::pseudonym::{Pseudonymiser, SYNTHETIC_DIGITS, SYNTHETIC_ISSUER, SYNTHETIC_PREFIX};
use crate::store::writer::{Command, SubmitCase, WriteError, Writer};
use crate::store::{Store, StoreError, cases};

/// Diagnoses (Orphacode number, a gene) drawn with Zipf-distributed prevalence: the first
/// is the most common.
const DIAGNOSES: [(u32, &str); 40] = [
    (586, "CFTR"),
    (244, "DNAH5"),
    (60, "SERPINA1"),
    (558, "FBN1"),
    (636, "NF1"),
    (791, "RHO"),
    (98896, "DMD"),
    (70, "SMN1"),
    (355, "GBA1"),
    (324, "GLA"),
    (716, "PAH"),
    (778, "MECP2"),
    (908, "FMR1"),
    (399, "HTT"),
    (117, "BTD"),
    (79318, "PMM2"),
    (93, "ASPA"),
    (309, "COL7A1"),
    (1653, "COL1A1"),
    (732, "PKD1"),
    (166, "MTM1"),
    (34587, "ABCA4"),
    (65, "LRRK2"),
    (2398, "TTR"),
    (85163, "CNGB3"),
    (1572, "CHD7"),
    (3389, "TSC2"),
    (99, "POLG"),
    (269, "FXN"),
    (43, "ABCD1"),
    (58, "GALC"),
    (580, "IDUA"),
    (579, "IDS"),
    (101330, "PRPH2"),
    (773, "TSC1"),
    (1897, "PTPN11"),
    (893, "ATP7B"),
    (217012, "SCN1A"),
    (2409, "USH2A"),
    (104, "SOD1"),
];

/// Demo centres (code, name, country), largest first (Zipf-distributed volumes).
pub const CENTRES: [(&str, &str, &str); 24] = [
    ("NL-AMC", "Amsterdam UMC", "NL"),
    ("DE-CHA", "Charite Berlin", "DE"),
    ("FR-NCK", "Hopital Necker-Enfants Malades", "FR"),
    ("IT-BGM", "Ospedale Pediatrico Bambino Gesu", "IT"),
    ("ES-VDH", "Hospital Vall d'Hebron", "ES"),
    ("BE-UZL", "UZ Leuven", "BE"),
    ("SE-KAR", "Karolinska University Hospital", "SE"),
    ("PL-CZD", "Children's Memorial Health Institute", "PL"),
    ("AT-MUW", "Medical University of Vienna", "AT"),
    ("DK-RGH", "Rigshospitalet", "DK"),
    ("NL-RUMC", "Radboudumc", "NL"),
    ("DE-LMU", "LMU Klinikum", "DE"),
    ("FR-HCL", "Hospices Civils de Lyon", "FR"),
    ("IT-GAS", "IRCCS Giannina Gaslini", "IT"),
    ("CZ-FNM", "Motol University Hospital", "CZ"),
    ("PT-CHL", "Centro Hospitalar Lisboa Central", "PT"),
    ("IE-CHI", "Children's Health Ireland", "IE"),
    ("FI-HUS", "Helsinki University Hospital", "FI"),
    ("HU-SEM", "Semmelweis University", "HU"),
    ("SI-UKC", "UMC Ljubljana", "SI"),
    ("EE-TYK", "Tartu University Hospital", "EE"),
    ("LT-SAN", "Vilnius University Hospital Santaros", "LT"),
    ("GR-AGS", "Aghia Sophia Children's Hospital", "GR"),
    ("LU-CHL", "Centre Hospitalier de Luxembourg", "LU"),
];

/// The principal synthetic records are recorded by: an admin principal, which the API
/// never lets submit a case or record consent.
pub const GENERATOR_PRINCIPAL: &str = "synthetic-data-generator";

/// Synthetic patients per registry: one for each synthetic identifier.
pub const MAX_PATIENTS: u32 = 10u32.pow(SYNTHETIC_DIGITS as u32);

/// The synthetic national identifier value of patient `n` (below [`MAX_PATIENTS`]), e.g.
/// `SYN000000042`, issued by [`SYNTHETIC_ISSUER`]: distinct `n` give distinct values.
pub fn identifier(n: u32) -> String {
    debug_assert!(n < MAX_PATIENTS);
    format!("{SYNTHETIC_PREFIX}{n:0width$}", width = SYNTHETIC_DIGITS)
}

/// One synthetic patient as a client would submit it.
#[derive(Debug, Clone)]
pub struct SyntheticPatient {
    pub identifiers: proto::PatientIdentifiers,
    /// Index into [`CENTRES`].
    pub centre: usize,
    pub record: proto::CaseRecord,
    pub consent: Vec<proto::ScopeConsent>,
}

fn ymd(d: NaiveDate) -> String {
    d.format("%Y-%m-%d").to_string()
}

fn ym(d: NaiveDate) -> String {
    d.format("%Y-%m").to_string()
}

fn years(y: f64) -> Duration {
    Duration::days((y * 365.25) as i64)
}

fn timestamp(d: NaiveDate) -> prost_types::Timestamp {
    let t = Utc.from_utc_datetime(&d.and_hms_opt(12, 0, 0).expect("noon exists"));
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: 0,
    }
}

/// Generates patients deterministically from a seed: patient `n` is always the same.
pub struct Generator {
    seed: u64,
    today: NaiveDate,
    diagnoses: Zipf<f64>,
    centres: Zipf<f64>,
    childhood_onset: Exp<f64>,
}

impl Generator {
    pub fn new(seed: u64, today: NaiveDate) -> Generator {
        Generator {
            seed,
            today,
            diagnoses: Zipf::new(DIAGNOSES.len() as u64, 1.1).expect("valid Zipf"),
            centres: Zipf::new(CENTRES.len() as u64, 0.9).expect("valid Zipf"),
            childhood_onset: Exp::new(1.0 / 4.0).expect("valid rate"),
        }
    }

    /// The patient `n`, with a record that passes validation.
    pub fn patient(&self, n: u32) -> SyntheticPatient {
        let mut rng = StdRng::seed_from_u64(self.seed ^ (u64::from(n) << 20) ^ 0x5eed);
        loop {
            let p = self.draw(n, &mut rng);
            // Month-resolution dates can rarely contradict each other at the edges
            // (e.g. death in the month of diagnosis); draw again.
            if crate::api::convert::case_record(&p.record, self.today).is_ok() {
                return p;
            }
        }
    }

    fn draw(&self, n: u32, rng: &mut StdRng) -> SyntheticPatient {
        let today = self.today;
        // Age at onset, in years: antenatal / at birth, childhood (mostly early), adult.
        let (onset_kind, onset_age) = match rng.gen_range(0..100) {
            0..=2 => (proto::OnsetKind::Antenatal, 0.0),
            3..=7 => (proto::OnsetKind::AtBirth, 0.0),
            8..=74 => (
                proto::OnsetKind::Date,
                self.childhood_onset.sample(rng).min(17.9),
            ),
            75..=94 => (proto::OnsetKind::Date, rng.gen_range(18.0..70.0)),
            _ => (proto::OnsetKind::Unknown, rng.gen_range(0.0..40.0)),
        };
        // Diagnostic delay: 28% within a year, 52% 1-20 years (log-uniform), 20% over 20.
        let delay = match rng.gen_range(0..100) {
            0..=27 => rng.gen_range(0.0..1.0),
            28..=79 => (rng.gen_range(0.0f64..20f64.ln())).exp().max(1.0),
            _ => rng.gen_range(20.0..40.0),
        };
        let follow_up = rng.gen_range(0.0..8.0);
        let undiagnosed = rng.gen_range(0..100) < 4;
        let birth = today - years(onset_age + delay + follow_up) - Duration::days(31);
        let onset = birth + years(onset_age);
        let diagnosed = onset + years(delay);
        let rank = self.diagnoses.sample(rng) as usize - 1;
        let (code, gene) = DIAGNOSES[rank.min(DIAGNOSES.len() - 1)];
        let sex = match rng.gen_range(0..1000) {
            0..=489 => proto::Sex::Female,
            490..=979 => proto::Sex::Male,
            980..=984 => proto::Sex::Undetermined,
            _ => proto::Sex::Unknown,
        };
        let (status, date_of_death) = match rng.gen_range(0..100) {
            0..=87 => (proto::PatientStatus::Alive, String::new()),
            88..=93 => {
                let span = (today - diagnosed).num_days().max(1);
                let death = diagnosed + Duration::days(rng.gen_range(0..span));
                (proto::PatientStatus::Deceased, ymd(death))
            }
            94..=97 => (proto::PatientStatus::LostToFollowUp, String::new()),
            _ => (proto::PatientStatus::OptedOut, String::new()),
        };
        let genetic_findings = match rng.gen_range(0..100) {
            0..=74 => vec![gene],
            75..=79 => vec![gene, DIAGNOSES[rng.gen_range(0..DIAGNOSES.len())].1],
            _ => vec![],
        }
        .into_iter()
        .filter(|_| !undiagnosed)
        .enumerate()
        .filter(|(i, g)| *i == 0 || *g != gene)
        .map(|(_, g)| proto::GeneticFinding {
            gene: g.into(),
            variants: vec![],
        })
        .collect();
        let record = proto::CaseRecord {
            birth_year_month: ym(birth),
            sex: sex as i32,
            status: status as i32,
            date_of_death,
            first_contact_date: if undiagnosed {
                String::new()
            } else {
                ym(diagnosed)
            },
            onset_kind: onset_kind as i32,
            onset_date: if onset_kind == proto::OnsetKind::Date {
                ym(onset)
            } else {
                String::new()
            },
            undiagnosed,
            diagnosis: Some(proto::Diagnosis {
                orphacode: if undiagnosed {
                    String::new()
                } else {
                    format!("ORPHA:{code}")
                },
                icd10: vec![],
                icd11: vec![],
                omim: vec![],
            }),
            diagnosis_date: if undiagnosed {
                String::new()
            } else {
                ymd(diagnosed)
            },
            genetic_findings,
            hpo_terms: if undiagnosed {
                vec![format!("HP:{:07}", rng.gen_range(1..=3_000_000))]
            } else {
                vec![]
            },
            icf_codes: vec![],
        };
        // Consent: inclusion always (else there is no record); research use granted by
        // most, some with an expiry (a few already past), refused by some, not asked of
        // a few.
        let given = diagnosed.min(today);
        let grant = |scope: proto::ConsentScope, state: proto::ConsentState| proto::ScopeConsent {
            scope: scope as i32,
            state: state as i32,
            given_at: Some(timestamp(given)),
            form_version: "ERN-2024-01".into(),
            expires_at: None,
        };
        let mut consent = vec![grant(
            proto::ConsentScope::RegistryInclusion,
            proto::ConsentState::Granted,
        )];
        match rng.gen_range(0..100) {
            0..=74 => consent.push(grant(
                proto::ConsentScope::ResearchUse,
                proto::ConsentState::Granted,
            )),
            75..=84 => {
                let mut c = grant(
                    proto::ConsentScope::ResearchUse,
                    proto::ConsentState::Granted,
                );
                let until = given + Duration::days(rng.gen_range(365..3650));
                c.expires_at = Some(timestamp(until));
                consent.push(c);
            }
            85..=94 => consent.push(grant(
                proto::ConsentScope::ResearchUse,
                proto::ConsentState::Refused,
            )),
            _ => {}
        }
        SyntheticPatient {
            identifiers: proto::PatientIdentifiers {
                kind: Some(proto::patient_identifiers::Kind::National(
                    proto::NationalIdentifier {
                        issuing_country: SYNTHETIC_ISSUER.into(),
                        value: identifier(n),
                    },
                )),
            },
            centre: (self.centres.sample(rng) as usize - 1).min(CENTRES.len() - 1),
            record,
            consent,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SyntheticError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("writing a synthetic case failed: {0}")]
    Write(#[from] WriteError),
    #[error("no registry {0}")]
    NoRegistry(String),
    #[error("at most {MAX_PATIENTS} synthetic patients per registry")]
    TooMany,
    #[error(
        "refused: this database holds patient data that the synthetic-data generator did not \
         write ({0} recorded by another principal); demo writes only into a database with no \
         patients or synthetic ones only, and wrote nothing"
    )]
    NotSynthetic(&'static str),
    #[error(
        "refused: a principal named {GENERATOR_PRINCIPAL} exists and is not the generator's (an \
         admin); demo wrote nothing"
    )]
    GeneratorName,
}

/// Refuses a database that holds patient data not written by the generator: a case
/// version, consent decision or erasure recorded by any principal but the admin principal
/// [`GENERATOR_PRINCIPAL`] (`Store::patient_data_not_recorded_by`), or a principal of
/// another role under that name. The rule is for the whole database, not one registry:
/// demo data must never share a database (its centres, principals, master secret) with
/// real patients. Returns the generator principal's id, if it exists. Reads only.
pub async fn check_synthetic_only(store: &Store) -> Result<Option<i64>, SyntheticError> {
    let generator = match store.principal_role(GENERATOR_PRINCIPAL).await? {
        Some((id, role)) if role == Role::Admin.as_str() => Some(id),
        Some(_) => return Err(SyntheticError::GeneratorName),
        None => None,
    };
    match store
        .patient_data_not_recorded_by(GENERATOR_PRINCIPAL)
        .await?
    {
        Some(what) => Err(SyntheticError::NotSynthetic(what)),
        None => Ok(generator),
    }
}

/// What [`populate`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Populated {
    pub written: u64,
    pub first: u32,
}

/// Creates the demo centres (members of `registry_code`) if missing, and writes
/// `patients` new synthetic patients to the registry, numbered after those already there
/// (so running it again adds more). `progress` is called now and then with the count.
///
/// Refuses, before it writes anything, a database that holds patient data it did not
/// write ([`check_synthetic_only`]).
pub async fn populate(
    store: &Store,
    writer: &Writer,
    pseudonymiser: &Pseudonymiser,
    registry_code: &str,
    patients: u32,
    seed: u64,
    progress: impl Fn(u64),
) -> Result<Populated, SyntheticError> {
    let registry = store
        .registry_by_code(registry_code)
        .await?
        .ok_or_else(|| SyntheticError::NoRegistry(registry_code.into()))?;
    let generator_id = check_synthetic_only(store).await?;
    let first = u32::try_from(store.patients_in_registry(registry.id).await?)
        .map_err(|_| SyntheticError::TooMany)?;
    if u64::from(first) + u64::from(patients) > u64::from(MAX_PATIENTS) {
        return Err(SyntheticError::TooMany);
    }
    // Checked: from here on it writes.
    let principal_id = match generator_id {
        Some(id) => id,
        None => {
            store
                .create_principal(GENERATOR_PRINCIPAL, Role::Admin, None, &[])
                .await?
        }
    };
    let mut centre_ids = Vec::with_capacity(CENTRES.len());
    for (code, name, country) in CENTRES {
        centre_ids.push(
            store
                .ensure_centre(code, name, country, registry.id)
                .await?,
        );
    }
    let today = Utc::now().date_naive();
    let generator = Generator::new(seed, today);
    let mut in_flight = JoinSet::new();
    let mut written = 0u64;
    for n in first..first + patients {
        let p = generator.patient(n);
        let identity = crate::api::convert::patient_identity(&p.identifiers)
            .expect("valid synthetic identifier");
        // The registry's rule, as `service::Services::derive_pseudonym` applies it.
        let candidates = pseudonymiser.candidates(registry.key_ref()?, &identity);
        let known = store
            .known_pseudonym(registry.id, &candidates.older())
            .await?;
        let pseudonym = candidates.choose(known.as_deref());
        let record =
            crate::api::convert::case_record(&p.record, today).expect("validated when drawn");
        let now = Utc::now();
        let consent = p
            .consent
            .iter()
            .map(|c| {
                let at = |t: &prost_types::Timestamp| {
                    chrono::DateTime::from_timestamp(t.seconds, 0).unwrap_or(now)
                };
                ConsentDecision {
                    scope: crate::api::convert::scope(c.scope).expect("valid scope"),
                    decision: if c.state == proto::ConsentState::Granted as i32 {
                        Decision::Granted
                    } else {
                        Decision::Refused
                    },
                    given_at: c.given_at.as_ref().map_or(now, at).min(now),
                    form_version: c.form_version.clone(),
                    expires_at: c.expires_at.as_ref().map(at),
                }
            })
            .collect();
        let command = Command::Submit(SubmitCase {
            registry_id: registry.id,
            pseudonym: pseudonym.as_str().to_owned(),
            centre_id: centre_ids[p.centre],
            principal_id,
            consent,
            row: cases::to_row(&record),
            now,
        });
        let writer = writer.clone();
        let audit = Entry {
            principal_id: Some(principal_id),
            principal: GENERATOR_PRINCIPAL.into(),
            role: Role::Admin.as_str().into(),
            method: "demo/SyntheticCase".into(),
            registry: registry.code.clone(),
            items: 1,
            ..Entry::default()
        };
        in_flight.spawn(async move { writer.execute_case(command, Some(audit)).await });
        while in_flight.len() >= 512 {
            if let Some(done) = in_flight.join_next().await {
                done.expect("writer task")?;
                written += 1;
                if written.is_multiple_of(10_000) {
                    progress(written);
                }
            }
        }
    }
    while let Some(done) = in_flight.join_next().await {
        done.expect("writer task")?;
        written += 1;
    }
    progress(written);
    Ok(Populated { written, first })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(n: u32) -> Vec<SyntheticPatient> {
        let g = Generator::new(7, NaiveDate::from_ymd_opt(2026, 11, 1).unwrap());
        (0..n).map(|i| g.patient(i)).collect()
    }

    #[test]
    fn patients_are_valid_distinct_and_deterministic() {
        let a = sample(300);
        let b = sample(300);
        let mut values = std::collections::BTreeSet::new();
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x.record, y.record);
            let identity = crate::api::convert::patient_identity(&x.identifiers).unwrap();
            assert!(identity.is_synthetic());
            let Some(proto::patient_identifiers::Kind::National(id)) = &x.identifiers.kind else {
                panic!("national identifier expected");
            };
            assert!(values.insert(id.value.clone()));
        }
    }

    #[test]
    fn every_patient_number_has_a_valid_synthetic_identifier() {
        for n in [0, 1, 42, 8_999_999, MAX_PATIENTS - 1] {
            let ids = proto::PatientIdentifiers {
                kind: Some(proto::patient_identifiers::Kind::National(
                    proto::NationalIdentifier {
                        issuing_country: SYNTHETIC_ISSUER.into(),
                        value: identifier(n),
                    },
                )),
            };
            assert!(
                crate::api::convert::patient_identity(&ids)
                    .unwrap()
                    .is_synthetic(),
                "{n}"
            );
        }
        assert_eq!(identifier(42), "SYN000000042");
        assert_eq!(identifier(MAX_PATIENTS - 1), "SYN999999999");
    }

    #[test]
    fn the_shapes_are_those_of_rare_disease() {
        let today = NaiveDate::from_ymd_opt(2026, 11, 1).unwrap();
        let patients = sample(4000);
        let records: Vec<crate::domain::CaseRecord> = patients
            .iter()
            .map(|p| crate::api::convert::case_record(&p.record, today).unwrap())
            .collect();
        let delays: Vec<i64> = records.iter().filter_map(|r| r.delay_days()).collect();
        let share = |f: &dyn Fn(i64) -> bool| {
            delays.iter().filter(|&&d| f(d)).count() as f64 / delays.len() as f64
        };
        let over_one = share(&|d| d > 365);
        let over_twenty = share(&|d| d > 20 * 365);
        assert!((0.66..0.78).contains(&over_one), "{over_one}");
        assert!((0.16..0.24).contains(&over_twenty), "{over_twenty}");
        let childhood = records
            .iter()
            .filter_map(|r| r.onset_age_days())
            .filter(|&d| d < 18 * 365)
            .count() as f64
            / records
                .iter()
                .filter(|r| r.onset_age_days().is_some())
                .count() as f64;
        assert!((0.7..0.85).contains(&childhood), "{childhood}");
        // Skewed prevalence: the commonest diagnosis is many times the median one.
        let mut per_code = std::collections::BTreeMap::<String, usize>::new();
        for p in &patients {
            let code = p.record.diagnosis.as_ref().unwrap().orphacode.clone();
            *per_code.entry(code).or_default() += 1;
        }
        let top = per_code.get("ORPHA:586").copied().unwrap_or(0);
        let mut counts: Vec<usize> = per_code.values().copied().collect();
        counts.sort();
        assert!(top > 5 * counts[counts.len() / 2], "{top} vs {counts:?}");
    }
}
