//! ResearchService: aggregates over consented patients only, small counts suppressed.

use ern_registry::auth::Role;
use ern_registry::proto::{
    self, ConsentScope, ConsentState, Dimension, research_service_client::ResearchServiceClient,
};
use ern_registry::store::db;
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::helpers::*;

type Research = ResearchServiceClient<InterceptedService<Channel, Bearer>>;

impl TestApp {
    async fn research_client(&self, token: &str) -> Research {
        let bearer = Bearer(Some(format!("Bearer {token}").parse().unwrap()));
        ResearchServiceClient::with_interceptor(self.channel().await, bearer)
    }

    async fn researcher(&self, name: &str, erns: &[&str]) -> Research {
        let token = self.principal(name, Role::Researcher, None, erns).await;
        self.research_client(&token).await
    }
}

/// A patient to submit: who, where, what.
#[derive(Clone)]
struct Patient {
    seed: u32,
    centre: &'static str,
    orphacode: &'static str,
    sex: proto::Sex,
    /// Onset and diagnosis dates (birth is 2015-06).
    onset: &'static str,
    diagnosis: &'static str,
    gene: Option<&'static str>,
}

fn patient(seed: u32, centre: &'static str, orphacode: &'static str, sex: proto::Sex) -> Patient {
    Patient {
        seed,
        centre,
        orphacode,
        sex,
        onset: "2015-09",
        diagnosis: "2016-03-14",
        gene: Some("CFTR"),
    }
}

fn request_for(p: &Patient) -> proto::SubmitCaseRequest {
    let mut req = submission("ERN-LUNG", national("NL", &bsn(p.seed)));
    let rec = req.record.as_mut().unwrap();
    rec.sex = p.sex as i32;
    rec.onset_date = p.onset.into();
    rec.diagnosis_date = p.diagnosis.into();
    rec.first_contact_date = String::new();
    let dx = rec.diagnosis.as_mut().unwrap();
    dx.orphacode = p.orphacode.into();
    dx.icd10.clear();
    dx.icd11.clear();
    dx.omim.clear();
    rec.genetic_findings = match p.gene {
        Some(g) => vec![proto::GeneticFinding {
            gene: g.into(),
            variants: vec![],
        }],
        None => vec![],
    };
    req
}

/// Two centres (NL, BE) in ERN-EYE and ERN-LUNG, each with a physician; submits the
/// patients to ERN-LUNG.
async fn populate(app: &TestApp, patients: &[Patient]) {
    app.centre("BE-UZL", "BE", &["ERN-EYE", "ERN-LUNG"]).await;
    let mut nl = app.physician("dr-nl", "NL-AMC").await;
    let mut be = app.physician("dr-be", "BE-UZL").await;
    for p in patients {
        let client = if p.centre == "NL-AMC" {
            &mut nl
        } else {
            &mut be
        };
        client.submit_case(request_for(p)).await.unwrap();
    }
}

/// NL: 12 CF female, 7 CF male, 3 PCD female; BE: 8 CF female, 2 CF male.
fn cohort() -> Vec<Patient> {
    let mut out = Vec::new();
    let mut seed = 100;
    let mut add = |n, centre, code, sex| {
        for _ in 0..n {
            seed += 1;
            out.push(patient(seed, centre, code, sex));
        }
    };
    add(12, "NL-AMC", "ORPHA:586", proto::Sex::Female);
    add(7, "NL-AMC", "ORPHA:586", proto::Sex::Male);
    add(3, "NL-AMC", "ORPHA:244", proto::Sex::Female);
    add(8, "BE-UZL", "ORPHA:586", proto::Sex::Female);
    add(2, "BE-UZL", "ORPHA:586", proto::Sex::Male);
    out
}

fn count_request(group_by: &[Dimension]) -> proto::CountPatientsRequest {
    proto::CountPatientsRequest {
        registry: "ERN-LUNG".into(),
        group_by: group_by.iter().map(|d| *d as i32).collect(),
        filters: vec![],
    }
}

fn filter(dimension: Dimension, values: &[&str]) -> proto::Filter {
    proto::Filter {
        dimension: dimension as i32,
        values: values.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// Every count a table publishes, cells and totals.
fn published(t: &proto::CountTable) -> Vec<u64> {
    let mut out: Vec<u64> = t
        .rows
        .iter()
        .flat_map(|r| r.cells.iter().chain(r.total.iter()))
        .chain(t.column_totals.iter())
        .chain(t.grand_total.iter())
        .filter_map(|c| c.count)
        .collect();
    out.sort();
    out
}

fn cell(t: &proto::CountTable, row: &str, col: &[&str]) -> Option<u64> {
    let r = t.rows.iter().position(|r| r.label == row).unwrap();
    let c = t.columns.iter().position(|c| c.values == col).unwrap();
    t.rows[r].cells[c].count
}

/// The researcher's count of every consented patient of ERN-LUNG, now.
async fn total(researcher: &mut Research) -> Option<u64> {
    let t = researcher
        .count_patients(count_request(&[]))
        .await
        .unwrap()
        .into_inner();
    grand_total(&t)
}

fn grand_total(t: &proto::CountTable) -> Option<u64> {
    t.grand_total.as_ref().unwrap().count
}

#[tokio::test]
async fn counts_by_country_and_sex_suppress_small_cells_and_their_complements() {
    let app = TestApp::spawn().await;
    populate(&app, &cohort()).await;
    let mut researcher = app.researcher("res-lung", &["ERN-LUNG"]).await;

    let t = researcher
        .count_patients(count_request(&[Dimension::Country, Dimension::Sex]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(t.min_cell_count, 5);
    assert_eq!(t.unit, "patients");
    assert_eq!(t.row_dimension, Dimension::Country as i32);
    let rows: Vec<&str> = t.rows.iter().map(|r| r.label.as_str()).collect();
    assert_eq!(rows, ["BE", "NL"]);
    // BE male = 2 is below k: hidden. In a 2 x 2 table with its totals published, hiding
    // one cell means hiding all four (any one would give the others away).
    for (row, col) in [
        ("BE", "male"),
        ("BE", "female"),
        ("NL", "male"),
        ("NL", "female"),
    ] {
        assert_eq!(cell(&t, row, &[col]), None, "{row} {col}");
    }
    assert_eq!(t.suppressed, 4);
    let row_totals: Vec<Option<u64>> = t.rows.iter().map(|r| r.total.unwrap().count).collect();
    assert_eq!(row_totals, [Some(10), Some(22)]);
    let col_totals: Vec<Option<u64>> = t.column_totals.iter().map(|c| c.count).collect();
    assert_eq!(col_totals, [Some(23), Some(9)]);
    assert_eq!(grand_total(&t), Some(32));
    assert!(
        published(&t).iter().all(|&n| n == 0 || n >= 5),
        "{:?}",
        published(&t)
    );

    // One-way by diagnosis: PCD (3) is hidden, and so must CF be, or the total tells.
    let t = researcher
        .count_patients(count_request(&[Dimension::Diagnosis]))
        .await
        .unwrap()
        .into_inner();
    assert!(t.column_totals.is_empty());
    assert!(
        t.rows
            .iter()
            .all(|r| r.total.is_none() && r.cells.len() == 1)
    );
    let by_label = |label: &str| t.rows.iter().find(|r| r.label == label).unwrap().cells[0].count;
    assert_eq!(by_label("ORPHA:244"), None);
    assert_eq!(by_label("ORPHA:586"), None);
    assert_eq!(grand_total(&t), Some(32));

    // No dimension at all: the total.
    let t = researcher
        .count_patients(count_request(&[]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(t.rows.len(), 1);
    assert_eq!(t.rows[0].cells[0].count, Some(32));
}

#[tokio::test]
async fn filters_narrow_the_table_and_gene_counts_pairs() {
    let app = TestApp::spawn().await;
    populate(&app, &cohort()).await;
    let mut researcher = app.researcher("res-lung", &["ERN-LUNG"]).await;

    let mut req = count_request(&[Dimension::Sex]);
    req.filters = vec![
        filter(Dimension::Country, &["NL"]),
        filter(Dimension::Diagnosis, &["ORPHA:586"]),
    ];
    let t = researcher.count_patients(req).await.unwrap().into_inner();
    assert_eq!(grand_total(&t), Some(19));
    let female = t.rows.iter().find(|r| r.label == "female").unwrap();
    assert_eq!(female.cells[0].count, Some(12));
    assert_eq!(
        t.rows.iter().find(|r| r.label == "male").unwrap().cells[0].count,
        Some(7)
    );

    let mut req = count_request(&[Dimension::Gene]);
    req.filters = vec![filter(Dimension::Gene, &["CFTR", "none"])];
    let t = researcher.count_patients(req).await.unwrap().into_inner();
    assert_eq!(t.unit, "patient-gene pairs");
    assert_eq!(grand_total(&t), Some(32));

    // A table that matches nobody: no rows, no columns, no column totals; a total of 0.
    let mut req = count_request(&[Dimension::Sex, Dimension::Country]);
    req.filters = vec![filter(Dimension::Country, &["MT"])];
    let t = researcher.count_patients(req).await.unwrap().into_inner();
    assert!(t.rows.is_empty() && t.columns.is_empty(), "{t:?}");
    assert_eq!(t.column_totals.len(), t.columns.len());
    assert_eq!(grand_total(&t), Some(0));

    let mut req = count_request(&[Dimension::DiagnosisAgeBand, Dimension::OnsetAgeBand]);
    req.filters = vec![filter(Dimension::DiagnosisYear, &["2016"])];
    let t = researcher.count_patients(req).await.unwrap().into_inner();
    // Born 2015-06, onset 2015-09, diagnosed 2016-03: all under one year at both.
    assert_eq!(t.rows.len(), 1);
    assert_eq!(t.rows[0].label, "<1");
    assert_eq!(t.columns[0].values, ["<1"]);
    assert_eq!(grand_total(&t), Some(32));
}

#[tokio::test]
async fn a_withdrawn_or_expired_consent_leaves_the_very_next_query() {
    let app = TestApp::spawn().await;
    let mut patients = cohort();
    patients.truncate(12); // 12 NL female CF
    populate(&app, &patients).await;
    let mut researcher = app.researcher("res-lung", &["ERN-LUNG"]).await;
    let mut officer = app.officer("officer", &["ERN-LUNG"]).await;
    assert_eq!(total(&mut researcher).await, Some(12));

    // Withdraw research use: the record stays, the count drops at once.
    officer
        .withdraw_consent(withdrawal(
            "ERN-LUNG",
            by_identifiers(national("NL", &bsn(101))),
            &[ConsentScope::ResearchUse],
        ))
        .await
        .unwrap();
    assert_eq!(app.count("cases").await, 12);
    assert_eq!(total(&mut researcher).await, Some(11));

    // Withdraw inclusion: erased, and gone from the count.
    officer
        .withdraw_consent(withdrawal(
            "ERN-LUNG",
            by_identifiers(national("NL", &bsn(102))),
            &[ConsentScope::RegistryInclusion],
        ))
        .await
        .unwrap();
    assert_eq!(total(&mut researcher).await, Some(10));

    // A research consent that expires: counted before, not after.
    let expiry = chrono::Utc::now() + chrono::Duration::seconds(4);
    let mut grant = consent(
        ConsentScope::ResearchUse,
        ConsentState::Granted,
        "2025-01-01T00:00:00Z",
    );
    grant.expires_at = Some(prost_types::Timestamp {
        seconds: expiry.timestamp(),
        nanos: expiry.timestamp_subsec_nanos() as i32,
    });
    officer
        .record_consent(proto::RecordConsentRequest {
            registry: "ERN-LUNG".into(),
            patient: by_identifiers(national("NL", &bsn(103))),
            decisions: vec![grant],
            client_reference: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(total(&mut researcher).await, Some(10));
    app.clock.advance(chrono::Duration::seconds(5));
    assert_eq!(total(&mut researcher).await, Some(9));

    // Patients without research consent were never counted: submit one with inclusion only.
    let mut dr = app.physician("dr-2", "NL-AMC").await;
    let mut req = request_for(&patient(999, "NL-AMC", "ORPHA:586", proto::Sex::Male));
    req.consent.truncate(1);
    dr.submit_case(req).await.unwrap();
    assert_eq!(total(&mut researcher).await, Some(9));
}

#[tokio::test]
async fn a_patient_seen_at_two_centres_counts_once() {
    let app = TestApp::spawn().await;
    let mut patients = cohort();
    patients.truncate(6);
    populate(&app, &patients).await;
    let mut be = app.physician("dr-be-2", "BE-UZL").await;
    // The same patient (seed 101), submitted by the Belgian centre too.
    be.submit_case(request_for(&patient(
        101,
        "BE-UZL",
        "ORPHA:586",
        proto::Sex::Female,
    )))
    .await
    .unwrap();
    let mut researcher = app.researcher("res-lung", &["ERN-LUNG"]).await;
    let t = researcher
        .count_patients(count_request(&[Dimension::Centre]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(grand_total(&t), Some(6));
}

/// A physician who submits a case for a patient another centre treats, and a researcher
/// who asks before and after, learn nothing of that centre's record: the case that first
/// entered the registry keeps representing the patient (every count the same). The
/// representing centre's update changes what is counted; the other centre's update of its
/// own case does not. (Until 2026-12-07 the case written last represented the patient,
/// and a privacy audit read the first centre's record off the difference.)
#[tokio::test]
async fn another_centres_case_does_not_change_what_represents_the_patient() {
    let app = TestApp::spawn().await;
    populate(&app, &cohort()).await;
    let mut researcher = app.researcher("res-lung", &["ERN-LUNG"]).await;
    let mut by = async |dimension: Dimension| -> Vec<u64> {
        published(
            &researcher
                .count_patients(count_request(&[dimension]))
                .await
                .unwrap()
                .into_inner(),
        )
    };
    let tables = [Dimension::Sex, Dimension::Centre, Dimension::Diagnosis];
    let mut before = Vec::new();
    for d in tables {
        before.push(by(d).await);
    }
    // 9 male, 23 female (12 + 3 + 8 with BE's); BE-UZL 10, NL-AMC 22.
    assert_eq!(before[0], [9, 23, 32], "{before:?}");
    assert_eq!(before[1], [10, 22, 32], "{before:?}");

    // BE's physician submits NL's patient 101 (CF, female) as PCD, male.
    let mut be = app.physician("dr-be-2", "BE-UZL").await;
    let mut other = patient(101, "BE-UZL", "ORPHA:244", proto::Sex::Male);
    other.gene = None;
    let pseudonym = be
        .submit_case(request_for(&other))
        .await
        .unwrap()
        .into_inner()
        .pseudonym;
    let mut after = Vec::new();
    for d in tables {
        after.push(by(d).await);
    }
    assert_eq!(after, before, "another centre's case changes no count");
    // BE updates its own case: still nothing.
    let mut changed = request_for(&patient(101, "BE-UZL", "ORPHA:586", proto::Sex::Male));
    be.update_case(proto::UpdateCaseRequest {
        registry: "ERN-LUNG".into(),
        pseudonym: pseudonym.clone(),
        expected_version: 1,
        record: changed.record.take(),
        consent: vec![],
    })
    .await
    .unwrap();
    let mut after = Vec::new();
    for d in tables {
        after.push(by(d).await);
    }
    assert_eq!(after, before, "nor its update");
    // NL updates the case that represents the patient: counted as updated.
    let mut nl = app.physician("dr-nl-2", "NL-AMC").await;
    let mut changed = request_for(&patient(101, "NL-AMC", "ORPHA:586", proto::Sex::Male));
    nl.update_case(proto::UpdateCaseRequest {
        registry: "ERN-LUNG".into(),
        pseudonym,
        expected_version: 1,
        record: changed.record.take(),
        consent: vec![],
    })
    .await
    .unwrap();
    assert_eq!(by(Dimension::Sex).await, [10, 22, 32]);
    assert_eq!(by(Dimension::Centre).await, before[1]);
}

#[tokio::test]
async fn the_threshold_is_per_registry_and_set_by_an_admin() {
    let app = TestApp::spawn().await;
    populate(&app, &cohort()).await;
    let mut researcher = app.researcher("res-lung", &["ERN-LUNG"]).await;
    let mut req = count_request(&[Dimension::Sex]);
    req.filters = vec![
        filter(Dimension::Country, &["NL"]),
        filter(Dimension::Diagnosis, &["ORPHA:586"]),
    ];
    let t = researcher
        .count_patients(req.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        t.rows.iter().find(|r| r.label == "male").unwrap().cells[0].count,
        Some(7)
    );

    app.store.set_min_cell_count("ERN-LUNG", 10).await.unwrap();
    let t = researcher.count_patients(req).await.unwrap().into_inner();
    assert_eq!(t.min_cell_count, 10);
    assert_eq!(
        t.rows.iter().find(|r| r.label == "male").unwrap().cells[0].count,
        None
    );
    assert!(published(&t).iter().all(|&n| n == 0 || n >= 10));
    assert!(app.store.set_min_cell_count("ERN-LUNG", 1).await.is_err());
}

#[tokio::test]
async fn diagnostic_delay_in_bands_with_quantiles_only_for_fully_published_groups() {
    let app = TestApp::spawn().await;
    let mut patients = Vec::new();
    // 8 NL patients diagnosed within a year; 7 NL patients after about 3 years;
    // 3 BE patients after about 12 years; 5 DE patients in each of those three bands.
    for i in 0..8 {
        patients.push(patient(200 + i, "NL-AMC", "ORPHA:586", proto::Sex::Female));
    }
    for i in 0..7 {
        let mut p = patient(300 + i, "NL-AMC", "ORPHA:586", proto::Sex::Female);
        p.diagnosis = "2018-09";
        patients.push(p);
    }
    for i in 0..3 {
        let mut p = patient(400 + i, "BE-UZL", "ORPHA:586", proto::Sex::Male);
        p.diagnosis = "2026-01";
        patients.push(p);
    }
    for (i, diagnosis) in ["2016-03-14", "2018-09", "2026-01"].iter().enumerate() {
        for j in 0..5 {
            let mut p = patient(
                600 + 10 * i as u32 + j,
                "DE-CHA",
                "ORPHA:586",
                proto::Sex::Male,
            );
            p.diagnosis = diagnosis;
            patients.push(p);
        }
    }
    // Unknown onset: no delay, not in this table.
    let mut unknown = patient(500, "NL-AMC", "ORPHA:586", proto::Sex::Female);
    unknown.onset = "";
    patients.push(unknown);
    let mut requests: Vec<_> = patients.iter().map(request_for).collect();
    requests
        .last_mut()
        .unwrap()
        .record
        .as_mut()
        .unwrap()
        .onset_kind = proto::OnsetKind::Unknown as i32;
    app.centre("BE-UZL", "BE", &["ERN-EYE", "ERN-LUNG"]).await;
    app.centre("DE-CHA", "DE", &["ERN-LUNG"]).await;
    let mut nl = app.physician("dr-nl", "NL-AMC").await;
    let mut be = app.physician("dr-be", "BE-UZL").await;
    let mut de = app.physician("dr-de", "DE-CHA").await;
    for (p, req) in patients.iter().zip(requests) {
        let client = match p.centre {
            "NL-AMC" => &mut nl,
            "BE-UZL" => &mut be,
            _ => &mut de,
        };
        client.submit_case(req).await.unwrap();
    }

    let mut researcher = app.researcher("res-lung", &["ERN-LUNG"]).await;
    let r = researcher
        .diagnostic_delay(proto::DiagnosticDelayRequest {
            registry: "ERN-LUNG".into(),
            group_by: vec![Dimension::Country as i32],
            filters: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.bands, ["<1y", "1-5y", "5-10y", "10-20y", ">20y"]);
    assert_eq!(r.unit, "patients");
    let by_gene = researcher
        .diagnostic_delay(proto::DiagnosticDelayRequest {
            registry: "ERN-LUNG".into(),
            group_by: vec![Dimension::Gene as i32],
            filters: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_gene.unit, "patient-gene pairs");
    // 33 patients with a known delay; published only if it gives nothing away.
    assert!(r.grand_total.unwrap().count.is_none_or(|n| n == 33));
    let nl = r.groups.iter().find(|g| g.labels == ["NL"]).unwrap();
    let be = r.groups.iter().find(|g| g.labels == ["BE"]).unwrap();
    let de = r.groups.iter().find(|g| g.labels == ["DE"]).unwrap();
    assert_eq!(be.total.unwrap().count, None);
    // BE's zeros are hidden with its total (published, "<1y 0" and "1-5y 0" would say
    // its few patients all waited longer), and DE's counts hide with them, as their
    // complements: the cheapest. NL's group is published whole, with its quantiles.
    for band in [0, 1] {
        assert_eq!(be.bands[band].count, None, "BE's zero in band {band}");
    }
    assert_eq!(de.total.unwrap().count, None);
    assert_eq!(de.quantiles, None);
    assert!(nl.bands.iter().all(|b| b.count.is_some()), "{nl:?}");
    let q = nl.quantiles.unwrap();
    assert!(
        q.median_years < 1.0 && q.p90_years > 2.5 && q.p90_years < 3.5,
        "{q:?}"
    );
    assert_eq!(be.quantiles, None, "3 patients: below k, no quantiles");
    assert_eq!(be.bands[3].count, None, "3 in 10-20y: suppressed");
    let counts: Vec<u64> = r
        .groups
        .iter()
        .flat_map(|g| g.bands.iter().chain(g.total.iter()))
        .chain(r.band_totals.iter())
        .filter_map(|c| c.count)
        .collect();
    assert!(counts.iter().all(|&n| n == 0 || n >= 5), "{counts:?}");
    // Overall quantiles only when no count of the table is hidden (here Belgium's are).
    assert_eq!(r.overall, None);
}

#[tokio::test]
async fn expertise_is_shown_in_volume_bands_to_physicians_and_researchers() {
    let app = TestApp::spawn().await;
    populate(&app, &cohort()).await;
    let physician_token = app
        .principal("dr-eye", Role::Physician, Some("NL-AMC"), &[])
        .await;
    let mut physician = app.research_client(&physician_token).await;
    let req = proto::FindExpertiseRequest {
        orphacodes: vec!["ORPHA:586".into(), "ORPHA:244".into()],
        countries: vec![],
        registries: vec![],
        ..Default::default()
    };
    let r = physician
        .find_expertise(req.clone())
        .await
        .unwrap()
        .into_inner();
    let centres: Vec<(&str, &str, &str)> = r
        .centres
        .iter()
        .map(|c| {
            (
                c.centre_code.as_str(),
                c.registry.as_str(),
                c.volume.as_ref().unwrap().label.as_str(),
            )
        })
        .collect();
    // Over two codes, a centre's volume is the sum of its two bands: NL-AMC's 10-19 and
    // 1-9 make 11-28. So the answer follows from the one-code answers, and sets of codes
    // that overlap ({A, B}, {A, C}, {B, C}) cannot pin one code's count below k.
    assert_eq!(
        centres,
        [
            ("NL-AMC", "ERN-LUNG", "11-28"),
            ("BE-UZL", "ERN-LUNG", "10-19")
        ]
    );
    let mut summed: std::collections::BTreeMap<(String, String), (u32, Option<u32>)> =
        Default::default();
    for code in &req.orphacodes {
        let one = physician
            .find_expertise(proto::FindExpertiseRequest {
                orphacodes: vec![code.clone()],
                ..req.clone()
            })
            .await
            .unwrap()
            .into_inner();
        for c in one.centres {
            let band = c.volume.unwrap();
            let entry = summed
                .entry((c.centre_code, c.registry))
                .or_insert((0, Some(0)));
            entry.0 += band.min;
            entry.1 = entry.1.zip(band.max).map(|(a, b)| a + b);
        }
    }
    for c in &r.centres {
        let band = c.volume.as_ref().unwrap();
        let at = (c.centre_code.clone(), c.registry.clone());
        assert_eq!(summed[&at], (band.min, band.max), "{at:?}");
    }
    assert_eq!(r.registries.len(), 24, "a physician searches every ERN");

    let r = physician
        .find_expertise(proto::FindExpertiseRequest {
            orphacodes: vec!["ORPHA:244".into()],
            countries: vec!["NL".into()],
            registries: vec![],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.centres.len(), 1);
    let band = r.centres[0].volume.clone().unwrap();
    assert_eq!(
        (band.min, band.max, band.label.as_str()),
        (1, Some(9), "1-9")
    );

    // A researcher of another ERN finds nothing there, and may not ask for ERN-LUNG.
    let mut eye = app.researcher("res-eye", &["ERN-EYE"]).await;
    let r = eye.find_expertise(req.clone()).await.unwrap().into_inner();
    assert!(r.centres.is_empty());
    assert_eq!(r.registries, ["ERN-EYE"]);
    let mut asks_lung = req.clone();
    asks_lung.registries = vec!["ERN-LUNG".into()];
    let err = eye.find_expertise(asks_lung).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    // A code no registry has is NOT_FOUND, as for every call that names a registry.
    let mut asks_nothing = req.clone();
    asks_nothing.registries = vec!["ERN-NOPE".into()];
    let err = eye.find_expertise(asks_nothing).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert_eq!(err.message(), "no registry has that code");

    // Consent officers have no business here.
    let officer_token = app
        .principal("officer", Role::ConsentOfficer, None, &["ERN-LUNG"])
        .await;
    let err = app
        .research_client(&officer_token)
        .await
        .find_expertise(req)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn only_researchers_of_the_ern_may_count() {
    let app = TestApp::spawn().await;
    populate(&app, &cohort()[..6]).await;
    let physician_token = app
        .principal("dr-x", Role::Physician, Some("NL-AMC"), &[])
        .await;
    let err = app
        .research_client(&physician_token)
        .await
        .count_patients(count_request(&[]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    let mut eye = app.researcher("res-eye", &["ERN-EYE"]).await;
    let err = eye.count_patients(count_request(&[])).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = eye
        .diagnostic_delay(proto::DiagnosticDelayRequest {
            registry: "ERN-LUNG".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    let mut anonymous = ResearchServiceClient::new(app.channel().await);
    let err = anonymous
        .count_patients(count_request(&[]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn malformed_queries_name_the_field() {
    let app = TestApp::spawn().await;
    let mut researcher = app.researcher("res-lung", &["ERN-LUNG"]).await;
    let cases: Vec<(proto::CountPatientsRequest, &str)> = vec![
        (
            proto::CountPatientsRequest {
                registry: "ERN-LUNG".into(),
                group_by: vec![Dimension::Sex as i32, Dimension::Sex as i32],
                filters: vec![],
            },
            "group_by[1]",
        ),
        (
            proto::CountPatientsRequest {
                registry: "ERN-LUNG".into(),
                group_by: vec![0],
                filters: vec![],
            },
            "group_by[0]",
        ),
        (
            proto::CountPatientsRequest {
                registry: "ERN-LUNG".into(),
                group_by: vec![1, 2, 3, 4, 5],
                filters: vec![],
            },
            "group_by",
        ),
        (
            proto::CountPatientsRequest {
                registry: "ERN-LUNG".into(),
                group_by: vec![],
                filters: vec![filter(Dimension::Diagnosis, &["586"])],
            },
            "filters[0].values[0]",
        ),
        (
            proto::CountPatientsRequest {
                registry: "ERN-LUNG".into(),
                group_by: vec![],
                filters: vec![filter(Dimension::Sex, &[])],
            },
            "filters[0].values",
        ),
        (
            proto::CountPatientsRequest {
                registry: "not a registry".into(),
                group_by: vec![],
                filters: vec![],
            },
            "registry",
        ),
    ];
    for (req, field) in cases {
        let err = researcher.count_patients(req).await.unwrap_err();
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{field}: {}",
            err.message()
        );
        assert_eq!(violations(&err), [field]);
    }
    let err = researcher
        .find_expertise(proto::FindExpertiseRequest::default())
        .await
        .unwrap_err();
    assert_eq!(violations(&err), ["orphacodes"]);
}

#[tokio::test]
async fn research_queries_are_rate_limited_per_principal() {
    let app = TestApp::spawn_with(ern_registry::config::ServeArgs {
        research_queries_per_minute: 3,
        ..Default::default()
    })
    .await;
    let mut first = app.researcher("res-1", &["ERN-LUNG"]).await;
    let mut second = app.researcher("res-2", &["ERN-LUNG"]).await;
    for _ in 0..3 {
        first.count_patients(count_request(&[])).await.unwrap();
    }
    let err = first.count_patients(count_request(&[])).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
    let retry = tonic_types::StatusExt::get_error_details(&err)
        .retry_info()
        .and_then(|r| r.retry_delay)
        .expect("retry info");
    assert!(retry > std::time::Duration::from_secs(1), "{retry:?}");
    // Expertise searches count against the same allowance.
    let err = first
        .find_expertise(proto::FindExpertiseRequest {
            orphacodes: vec!["ORPHA:586".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    // Another researcher is not affected.
    second.count_patients(count_request(&[])).await.unwrap();
}

/// The research tables as rows of text, for comparison.
async fn snapshot(app: &TestApp) -> Vec<String> {
    let mut out = Vec::new();
    for sql in [
        "SELECT registry_id, pseudonym, scope, event_id, state, given_at, expires_at \
         FROM consent_current ORDER BY registry_id, pseudonym, scope",
        "SELECT registry_id, pseudonym, case_id, version, centre_id, country, orphacode, sex, \
                status, diagnosis_year, onset_age_days, diagnosis_age_days, delay_days, \
                eligible, eligible_until \
         FROM patients ORDER BY registry_id, pseudonym",
    ] {
        for row in db::query(sql).fetch_all(app.store.pool()).await.unwrap() {
            let mut fields = Vec::new();
            for i in 0..row.len() {
                let text = row
                    .try_get::<Option<i64>>(i)
                    .map(|v| format!("{v:?}"))
                    .or_else(|_| row.try_get::<Option<String>>(i).map(|v| format!("{v:?}")))
                    // PostgreSQL's instants and flags (integers on SQLite).
                    .or_else(|_| {
                        row.try_get::<Option<chrono::DateTime<chrono::Utc>>>(i)
                            .map(|v| format!("{v:?}"))
                    })
                    .or_else(|_| row.try_get::<Option<bool>>(i).map(|v| format!("{v:?}")))
                    .unwrap();
                fields.push(text);
            }
            out.push(fields.join("|"));
        }
    }
    out
}

#[tokio::test]
async fn the_migration_backfill_matches_what_the_writer_keeps() {
    // Upgrading a registry with data: migration 0003 fills consent_current and patients
    // from the history. Its SQL must agree with what the writer maintains.
    let app = TestApp::spawn().await;
    let mut patients = cohort();
    patients.truncate(8);
    populate(&app, &patients).await;
    let mut officer = app.officer("officer", &["ERN-LUNG"]).await;
    officer
        .withdraw_consent(withdrawal(
            "ERN-LUNG",
            by_identifiers(national("NL", &bsn(101))),
            &[ConsentScope::ResearchUse],
        ))
        .await
        .unwrap();
    // A patient new to the registry from the second centre. (Of a patient with cases at
    // two centres, 0003 took the case written last, the rule until 2026-12-07; the writer
    // now keeps the first: such rows of an upgraded registry stay as they were.)
    let mut be = app.physician("dr-be-2", "BE-UZL").await;
    be.submit_case(request_for(&patient(
        150,
        "BE-UZL",
        "ORPHA:244",
        proto::Sex::Male,
    )))
    .await
    .unwrap();
    let kept = snapshot(&app).await;
    assert!(kept.len() > 16);

    let dialect = if app.is_sqlite() {
        "sqlite"
    } else {
        "postgres"
    };
    let migration = std::fs::read_to_string(format!(
        "{}/migrations/{dialect}/0003_research.sql",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    app.store
        .pool()
        .execute_raw("DELETE FROM patients; DELETE FROM consent_current;")
        .await
        .unwrap();
    // On PostgreSQL, 0003 computed `eligible` as an integer, which 0017 turned into a
    // BOOLEAN (the instants it copies are of the same type at both ends): the replay takes
    // the same path.
    if !app.is_sqlite() {
        app.store
            .pool()
            .execute_raw(
                "ALTER TABLE patients ALTER COLUMN eligible TYPE BIGINT USING eligible::INT",
            )
            .await
            .unwrap();
    }
    for statement in migration.split(';').map(str::trim) {
        let sql: String = statement
            .lines()
            .filter(|l| !l.trim_start().starts_with("--"))
            .collect::<Vec<_>>()
            .join("\n");
        if sql.trim_start().starts_with("INSERT INTO") {
            // Since migration 0019 both tables are keyed by the patient's number, which it
            // filled from `patient_keys` as here: 0003's rows, each with its number.
            let (insert, select) = sql.split_at(sql.find("SELECT").unwrap());
            let insert = insert.replacen('(', "(patient, ", 1);
            let keyed = format!(
                "{insert} SELECT (SELECT k.id FROM patient_keys k \
                 WHERE k.registry_id = r.registry_id AND k.pseudonym = r.pseudonym), r.* \
                 FROM ({select}) r"
            );
            app.store.pool().execute_raw(&keyed).await.unwrap();
        }
    }
    if !app.is_sqlite() {
        app.store
            .pool()
            .execute_raw(
                "ALTER TABLE patients ALTER COLUMN eligible TYPE BOOLEAN USING eligible <> 0",
            )
            .await
            .unwrap();
    }
    assert_eq!(snapshot(&app).await, kept);
}

/// Research queries racing withdrawals on one server: no query counts a patient whose
/// withdrawal was answered before the query started, and none drops a patient whose
/// withdrawal had not started when the query ended. (Across two server processes:
/// `instance_races.rs`.)
#[tokio::test]
async fn queries_racing_withdrawals_never_count_an_answered_withdrawal() {
    use std::time::Instant;
    let app = TestApp::spawn_with(ern_registry::config::ServeArgs {
        research_queries_per_minute: 100_000,
        ..Default::default()
    })
    .await;
    const PATIENTS: u64 = 24;
    const WITHDRAWN: u64 = 16;
    let patients: Vec<Patient> = (0..PATIENTS as u32)
        .map(|i| patient(700 + i, "NL-AMC", "ORPHA:586", proto::Sex::Female))
        .collect();
    populate(&app, &patients).await;
    let researcher = app.researcher("res-lung", &["ERN-LUNG"]).await;
    let officer = app.officer("officer", &["ERN-LUNG"]).await;
    assert_eq!(total(&mut researcher.clone()).await, Some(PATIENTS));
    let mut withdrawals = Vec::new();
    for (i, p) in patients.iter().take(WITHDRAWN as usize).enumerate() {
        let (mut officer, seed) = (officer.clone(), p.seed);
        let scope = if i % 2 == 0 {
            ConsentScope::ResearchUse
        } else {
            ConsentScope::RegistryInclusion
        };
        withdrawals.push(tokio::spawn(async move {
            tokio::time::sleep(jitter(i as u64, 20_000)).await;
            let started = Instant::now();
            officer
                .withdraw_consent(withdrawal(
                    "ERN-LUNG",
                    by_identifiers(national("NL", &bsn(seed))),
                    &[scope],
                ))
                .await
                .unwrap();
            (started, Instant::now())
        }));
    }
    let mut queries = Vec::new();
    for n in 0..40u64 {
        let mut researcher = researcher.clone();
        queries.push(tokio::spawn(async move {
            tokio::time::sleep(jitter(100 + n, 24_000)).await;
            let started = Instant::now();
            let count = total(&mut researcher).await.expect("at least k");
            (started, count, Instant::now())
        }));
    }
    let mut done = Vec::new();
    for w in withdrawals {
        done.push(w.await.unwrap());
    }
    for q in queries {
        let (started, count, ended) = q.await.unwrap();
        let answered_before = done.iter().filter(|(_, acked)| *acked < started).count() as u64;
        let begun_before = done.iter().filter(|(begun, _)| *begun < ended).count() as u64;
        assert!(
            count <= PATIENTS - answered_before,
            "a query counted a patient whose withdrawal was answered before it started"
        );
        assert!(
            count >= PATIENTS - begun_before,
            "a query missed a patient not yet withdrawn"
        );
    }
    assert_eq!(
        total(&mut researcher.clone()).await,
        Some(PATIENTS - WITHDRAWN)
    );
}

#[tokio::test]
async fn the_genes_backfill_matches_what_the_writer_keeps() {
    // Upgrading a registry with data: migration 0011 fills `patients.genes` from the gene
    // rows. Its SQL must agree with what the writer keeps.
    let app = TestApp::spawn().await;
    let mut patients = cohort();
    patients.truncate(6);
    patients[1].gene = None;
    populate(&app, &patients).await;
    let mut dr = app.physician("dr-genes", "NL-AMC").await;
    let mut req = request_for(&patient(901, "NL-AMC", "ORPHA:586", proto::Sex::Male));
    req.record.as_mut().unwrap().genetic_findings = ["SCNN1B", "CFTR", "DNAH5"]
        .iter()
        .map(|g| proto::GeneticFinding {
            gene: g.to_string(),
            variants: vec![],
        })
        .collect();
    dr.submit_case(req).await.unwrap();
    let genes = || async {
        db::query("SELECT pseudonym, genes FROM patients ORDER BY pseudonym")
            .fetch_all(app.store.pool())
            .await
            .unwrap()
            .iter()
            .map(|row| (row.get::<String>(0), row.get::<String>(1)))
            .collect::<Vec<_>>()
    };
    let kept = genes().await;
    assert!(
        kept.iter().any(|(_, g)| g == "CFTR DNAH5 SCNN1B"),
        "{kept:?}"
    );
    assert!(kept.iter().any(|(_, g)| g.is_empty()), "{kept:?}");

    let dialect = if app.is_sqlite() {
        "sqlite"
    } else {
        "postgres"
    };
    let migration = std::fs::read_to_string(format!(
        "{}/migrations/{dialect}/0011_research_index.sql",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    db::query("UPDATE patients SET genes = 'stale'")
        .execute(app.store.pool())
        .await
        .unwrap();
    let backfill = migration
        .split(';')
        .map(|s| {
            s.lines()
                .filter(|l| !l.trim_start().starts_with("--"))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .find(|s| s.trim_start().starts_with("UPDATE patients SET genes"))
        .expect("the backfill of genes");
    app.store.pool().execute_raw(&backfill).await.unwrap();
    assert_eq!(genes().await, kept);
}

/// Grouped by gene, a table counts (patient, gene) pairs: three patients with two genes
/// each make six pairs, a total that could be published (each gene's 3 hidden, its
/// interval reaching k = 5) while the patients are fewer than k, and the rows would list
/// their genes. Such a table is answered as one whose every count is hidden: no row, no
/// group. The same question over more patients lists its genes.
#[tokio::test]
async fn a_few_patients_behind_many_gene_pairs_list_no_gene() {
    let app = TestApp::spawn().await;
    let mut patients = cohort();
    patients.truncate(19); // NL-AMC's cystic fibrosis patients, one gene each
    populate(&app, &patients).await;
    let mut be = app.physician("dr-be2", "BE-UZL").await;
    for seed in 900..903 {
        let mut req = request_for(&patient(seed, "BE-UZL", "ORPHA:244", proto::Sex::Female));
        req.record.as_mut().unwrap().genetic_findings = ["CFTR", "DNAH5"]
            .into_iter()
            .map(|g| proto::GeneticFinding {
                gene: g.into(),
                variants: vec![],
            })
            .collect();
        be.submit_case(req).await.unwrap();
    }
    let mut researcher = app.researcher("res-lung", &["ERN-LUNG"]).await;
    let only_be = vec![filter(Dimension::Centre, &["BE-UZL"])];
    let counted = researcher
        .count_patients(proto::CountPatientsRequest {
            filters: only_be.clone(),
            ..count_request(&[Dimension::Gene])
        })
        .await
        .unwrap()
        .into_inner();
    assert!(counted.rows.is_empty(), "{counted:?}");
    assert_eq!(counted.grand_total.unwrap().count, None);
    assert_eq!(counted.suppressed, 1);
    let delay = researcher
        .diagnostic_delay(proto::DiagnosticDelayRequest {
            registry: "ERN-LUNG".into(),
            group_by: vec![Dimension::Gene as i32],
            filters: only_be,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        delay.groups.is_empty() && delay.band_totals.is_empty(),
        "{delay:?}"
    );
    assert_eq!(
        (delay.grand_total.unwrap().count, delay.suppressed),
        (None, 1)
    );
    // Over every patient, the genes are listed.
    let all = researcher
        .count_patients(count_request(&[Dimension::Gene]))
        .await
        .unwrap()
        .into_inner();
    let genes: Vec<&str> = all.rows.iter().map(|r| r.label.as_str()).collect();
    assert_eq!(genes, ["CFTR", "DNAH5"], "{all:?}");
}
