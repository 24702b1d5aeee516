//! The attacker of research answers, end to end: random small registries with many small
//! cells, filled over gRPC, asked every kind of research question, and every answer
//! handed to an LP solver (`common/lp_attacker.rs`, independent of the service's audit)
//! that takes all the answer publishes and bounds each hidden count.

use ern_registry::auth::Role;
use ern_registry::config::ServeArgs;
use ern_registry::proto::{self, Dimension, research_service_client::ResearchServiceClient};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::helpers::*;
use crate::lp_attacker::{Interval, Published};

/// Every way an answer's hidden counts break the rules: narrower than `p`, or provably
/// below `k` (a hidden count whose upper bound is below k was a count below k: the true
/// value always lies within the attacker's interval).
fn broken(intervals: &[Interval], k: u64, p: u64, hidden: &mut usize) -> Vec<String> {
    *hidden += intervals.len();
    intervals
        .iter()
        .filter(|iv| iv.width() < p || iv.hi.is_some_and(|hi| hi < k))
        .map(|iv| format!("{iv:?}"))
        .collect()
}

/// The values the question's `filters` allow of the dimensions in `of` that `dims` does
/// not group by: every combination, as labels to add to a group's (one combination, empty,
/// when none is filtered). A filter of a dimension is known to every patient counted.
fn filter_combinations(
    dims: &[Dimension],
    filters: &[proto::Filter],
    of: &[Dimension],
) -> Vec<Vec<(Dimension, String)>> {
    let mut combinations = vec![Vec::new()];
    for &dim in of {
        if dims.contains(&dim) {
            continue;
        }
        let Some(filter) = filters.iter().find(|f| f.dimension == dim as i32) else {
            continue;
        };
        combinations = combinations
            .into_iter()
            .flat_map(|c| {
                filter.values.iter().map(move |v| {
                    let mut c = c.clone();
                    c.push((dim, v.clone()));
                    c
                })
            })
            .collect();
    }
    combinations
}

fn count_view(t: &proto::CountTable, filters: &[proto::Filter]) -> Published {
    if t.rows.is_empty() {
        // Its total hidden, a table lists no row and no column: the total alone.
        return Published {
            rows: 0,
            cols: 0,
            two_way: false,
            empty_rows: false,
            empty_cols: false,
            one_row: false,
            cells: vec![],
            row_totals: vec![],
            col_totals: vec![],
            grand: t.grand_total.as_ref().unwrap().count,
        };
    }
    let two_way = !t.column_dimensions.is_empty();
    let cols = t.columns.len().max(1);
    // What the attacker knows besides what is published: the rules every record passes
    // (an undiagnosed case has no diagnosis year or age band at diagnosis, a diagnosed one
    // has both), so the cells they forbid are 0.
    let dims: Vec<Dimension> = std::iter::once(t.row_dimension)
        .chain(t.column_dimensions.iter().copied())
        .map(|d| Dimension::try_from(d).unwrap())
        .collect();
    let combinations = filter_combinations(
        &dims,
        filters,
        &[
            Dimension::Diagnosis,
            Dimension::DiagnosisYear,
            Dimension::DiagnosisAgeBand,
            Dimension::OnsetAgeBand,
        ],
    );
    // And that no date is in the future: diagnosed in year y at an age below the band's
    // end, born after 1 January of y less that age; an onset at the onset band's start
    // or later is that much later, and its midpoint no later than that of a date that
    // begins the day after today (the day, its month's midpoint or its year's).
    let today = chrono::Utc::now().date_naive();
    let first = today + chrono::Days::new(1);
    let midpoint = |from: chrono::NaiveDate, to: chrono::NaiveDate| from + (to - from) / 2;
    let month_first = chrono::Datelike::with_day(&first, 1).unwrap();
    let month_last = (month_first + chrono::Months::new(1)).pred_opt().unwrap();
    let year_first = chrono::Datelike::with_ordinal(&first, 1).unwrap();
    let year_last = (year_first + chrono::Months::new(12)).pred_opt().unwrap();
    let latest = first
        .max(midpoint(month_first, month_last))
        .max(midpoint(year_first, year_last));
    let band_start = |label: &str| {
        ern_registry::aggregate::AGE_BANDS
            .iter()
            .position(|b| b.0 == label)
    };
    let years_days = |years: u32| chrono::Days::new((f64::from(years) * 365.25).round() as u64);
    let future = |year: Option<&str>, band: Option<&str>, onset: Option<&str>| {
        let Some(first_day) = year
            .and_then(|y| y.parse::<i32>().ok())
            .and_then(|y| chrono::NaiveDate::from_ymd_opt(y, 1, 1))
        else {
            return false;
        };
        if first_day > first {
            return true;
        }
        let bands = ern_registry::aggregate::AGE_BANDS;
        let (Some(band), Some(onset)) = (band.and_then(band_start), onset.and_then(band_start))
        else {
            return false;
        };
        let Some(next) = bands.get(band + 1) else {
            return false;
        };
        first_day - years_days(next.1) + chrono::Days::new(1) + years_days(bands[onset].1) > latest
    };
    let forbidden_with = |row: &str, column: &[String], known: &[(Dimension, String)]| {
        let values: Vec<(Dimension, &str)> = dims
            .iter()
            .copied()
            .zip(std::iter::once(row).chain(column.iter().map(String::as_str)))
            .chain(known.iter().map(|(d, v)| (*d, v.as_str())))
            .collect();
        let of = |d: Dimension| values.iter().find(|(x, _)| *x == d).map(|(_, v)| *v);
        let dated = |v: &str| v != "unknown";
        let undiagnosed = of(Dimension::Diagnosis).map(|v| v == "undiagnosed");
        let (year, band) = (
            of(Dimension::DiagnosisYear),
            of(Dimension::DiagnosisAgeBand),
        );
        undiagnosed.is_some_and(|u| [year, band].into_iter().flatten().any(|v| dated(v) == u))
            || matches!((year, band), (Some(y), Some(b)) if dated(y) != dated(b))
            || future(year, band, of(Dimension::OnsetAgeBand))
    };
    let forbidden = |row: &str, column: &[String]| {
        combinations
            .iter()
            .all(|known| forbidden_with(row, column, known))
    };
    let no_columns = vec![String::new()];
    Published {
        rows: t.rows.len(),
        cols,
        two_way,
        // Rows and columns are listed only when some patient has them, but a table of one
        // row also lists, hidden, the zeros of the table of its dimensions (any hidden
        // cell of it may be 0; for a row protected as the one-way table of its cells, that
        // makes this attacker weaker than the real one, who would know them at least 1:
        // tests/suppression.rs covers one-way tables).
        empty_rows: false,
        empty_cols: false,
        one_row: two_way && t.rows.len() == 1,
        cells: t
            .rows
            .iter()
            .flat_map(|r| {
                r.cells.iter().enumerate().map(|(j, c)| {
                    let column = t.columns.get(j).map_or(&no_columns, |k| &k.values);
                    if two_way && forbidden(&r.label, column) {
                        assert_eq!(c.count, Some(0), "a forbidden cell is published as 0");
                        Some(0)
                    } else {
                        c.count
                    }
                })
            })
            .collect(),
        row_totals: if two_way {
            t.rows
                .iter()
                .map(|r| r.total.as_ref().unwrap().count)
                .collect()
        } else {
            vec![]
        },
        col_totals: t.column_totals.iter().map(|c| c.count).collect(),
        grand: t.grand_total.as_ref().unwrap().count,
    }
}

/// The bands of delay a group cannot have, as anyone can work them out from its labels: a
/// delay (days) is the age at diagnosis less the age at onset, or 0; its whole calendar
/// months are at least 12 for each year of 366 days (365 Y + ceil(Y / 4) for Y years) and
/// at most 11 more than 12 for each year of 365; an age band bounds an age, and a
/// diagnosis year the age at diagnosis (no birth before 1880). Generous by a day on the
/// least, as the service.
fn delay_bands_ruled_out(dims: &[Dimension], labels: &[String]) -> Vec<bool> {
    use ern_registry::aggregate::{
        AGE_BANDS, DELAY_BANDS, age_band_start_days, delay_band_start_months,
    };
    let label = |dim: Dimension| {
        dims.iter()
            .position(|&d| d == dim)
            .map(|i| labels[i].as_str())
    };
    let band =
        |dim: Dimension| label(dim).and_then(|l| AGE_BANDS.iter().position(|(name, _)| *name == l));
    let first = |b: usize| age_band_start_days(b);
    let last = |b: usize| (b + 1 < AGE_BANDS.len()).then(|| age_band_start_days(b + 1) - 1);
    let mut diagnosis = (0i64, None::<i64>);
    if let Some(b) = band(Dimension::DiagnosisAgeBand) {
        diagnosis = (first(b), last(b));
    }
    if let Some(year) = label(Dimension::DiagnosisYear).and_then(|y| y.parse::<i64>().ok()) {
        // From 1 January 1880 (born then, with an onset dated on the day: the earliest day
        // ages count from) to the year's end.
        let first_birth = chrono::NaiveDate::from_ymd_opt(1880, 1, 1).unwrap();
        let last_day = chrono::NaiveDate::from_ymd_opt(year as i32, 12, 31).unwrap();
        let most = (last_day - first_birth).num_days().max(0);
        diagnosis.1 = Some(diagnosis.1.map_or(most, |l| l.min(most)));
    }
    let onset = band(Dimension::OnsetAgeBand).map_or((0, None), |b| (first(b), last(b)));
    let least_days = onset.1.map_or(0, |l| (diagnosis.0 - l - 1).max(0));
    let least = 12
        * (0..=least_days / 365)
            .rev()
            .find(|&y| 365 * y + (y + 3) / 4 <= least_days)
            .unwrap_or(0);
    let most = diagnosis.1.map(|l| 12 * ((l - onset.0).max(0) / 365) + 11);
    if most.is_some_and(|m| m < least) {
        // No one can have these values together.
        return vec![true; DELAY_BANDS.len()];
    }
    (0..DELAY_BANDS.len())
        .map(|b| {
            let from = delay_band_start_months(b);
            let until = (b + 1 < DELAY_BANDS.len()).then(|| delay_band_start_months(b + 1));
            most.is_some_and(|m| m < from) || until.is_some_and(|u| u <= least)
        })
        .collect()
}

fn delay_view(d: &proto::DiagnosticDelayResponse, filters: &[proto::Filter]) -> Published {
    let grand = d.grand_total.as_ref().unwrap().count;
    let dims: Vec<Dimension> = d
        .group_by
        .iter()
        .map(|&x| Dimension::try_from(x).unwrap())
        .collect();
    if d.groups.is_empty() && grand.is_none() {
        // Its total hidden, a delay table lists no group: the band totals and their sum.
        return Published {
            rows: d.band_totals.len(),
            cols: 1,
            two_way: false,
            empty_rows: true,
            empty_cols: false,
            one_row: false,
            cells: d.band_totals.iter().map(|c| c.count).collect(),
            row_totals: vec![],
            col_totals: vec![],
            grand,
        };
    }
    Published {
        rows: d.groups.len().max(1),
        cols: d.bands.len(),
        two_way: true,
        // Every band is listed; a group only when some patient is in it.
        empty_rows: false,
        empty_cols: true,
        one_row: false,
        cells: if d.groups.is_empty() {
            vec![Some(0); d.bands.len()]
        } else {
            d.groups
                .iter()
                .flat_map(|g| {
                    // What the attacker knows besides what is published: a band is
                    // ruled out when the group's labels rule it out with every value
                    // the question's filters allow (the filters are the attacker's).
                    let mut ruled_out = vec![true; d.bands.len()];
                    for known in filter_combinations(
                        &dims,
                        filters,
                        &[
                            Dimension::OnsetAgeBand,
                            Dimension::DiagnosisAgeBand,
                            Dimension::DiagnosisYear,
                        ],
                    ) {
                        // Everyone with a delay has both dates: "unknown" adds no one.
                        if known.iter().any(|(_, v)| v == "unknown") {
                            continue;
                        }
                        let dims: Vec<Dimension> = dims
                            .iter()
                            .copied()
                            .chain(known.iter().map(|(d, _)| *d))
                            .collect();
                        let labels: Vec<String> = g
                            .labels
                            .iter()
                            .cloned()
                            .chain(known.iter().map(|(_, v)| v.clone()))
                            .collect();
                        for (out, this) in ruled_out
                            .iter_mut()
                            .zip(delay_bands_ruled_out(&dims, &labels))
                        {
                            *out &= this;
                        }
                    }
                    g.bands.iter().zip(ruled_out).map(|(c, out)| {
                        if out {
                            assert_eq!(c.count, Some(0), "a band ruled out is published as 0");
                            Some(0)
                        } else {
                            c.count
                        }
                    })
                })
                .collect()
        },
        row_totals: if d.groups.is_empty() {
            vec![Some(0)]
        } else {
            d.groups
                .iter()
                .map(|g| g.total.as_ref().unwrap().count)
                .collect()
        },
        col_totals: d.band_totals.iter().map(|c| c.count).collect(),
        grand: d.grand_total.as_ref().unwrap().count,
    }
}

const CODES: [&str; 4] = ["ORPHA:586", "ORPHA:244", "ORPHA:1899", "ORPHA:98896"];
const GENES: [Option<&str>; 3] = [Some("CFTR"), Some("DNAH5"), None];
const CENTRES: [&str; 3] = ["NL-AMC", "BE-UZL", "DE-CHA"];
const DIMENSIONS: [Dimension; 9] = [
    Dimension::Diagnosis,
    Dimension::Sex,
    Dimension::OnsetAgeBand,
    Dimension::DiagnosisAgeBand,
    Dimension::Country,
    Dimension::Centre,
    Dimension::DiagnosisYear,
    Dimension::Gene,
    Dimension::PatientStatus,
];

/// A random case: small categories, so that tables have many small cells.
fn random_case(rng: &mut StdRng, registry: &str, seed: u32) -> proto::SubmitCaseRequest {
    let mut req = submission(registry, national("NL", &bsn(seed)));
    let rec = req.record.as_mut().unwrap();
    let birth_year = rng.gen_range(1995..=2015);
    let birth_month = rng.gen_range(1..=12);
    rec.birth_year_month = format!("{birth_year}-{birth_month:02}");
    rec.sex = [proto::Sex::Female, proto::Sex::Male][rng.gen_range(0..2)] as i32;
    let onset = birth_year * 12 + birth_month - 1 + rng.gen_range(1..=72);
    let diagnosis = (onset + rng.gen_range(0..=150)).min(2026 * 12 + 5);
    rec.onset_date = format!("{}-{:02}", onset / 12, onset % 12 + 1);
    rec.diagnosis_date = format!("{}-{:02}-15", diagnosis / 12, diagnosis % 12 + 1);
    rec.first_contact_date = String::new();
    let dx = rec.diagnosis.as_mut().unwrap();
    dx.orphacode = CODES[rng.gen_range(0..CODES.len())].into();
    dx.icd10.clear();
    dx.icd11.clear();
    dx.omim.clear();
    if rng.gen_range(0..6) == 0 {
        // Undiagnosed: no diagnosis code and no diagnosis date, an HPO term instead.
        dx.orphacode.clear();
        rec.undiagnosed = true;
        rec.diagnosis_date.clear();
        rec.hpo_terms = vec!["HP:0006528".into()];
    }
    rec.status = [
        proto::PatientStatus::Alive,
        proto::PatientStatus::Deceased,
        proto::PatientStatus::LostToFollowUp,
    ][rng.gen_range(0..3)] as i32;
    rec.genetic_findings = match GENES[rng.gen_range(0..GENES.len())] {
        Some(g) => vec![proto::GeneticFinding {
            gene: g.into(),
            variants: vec![],
        }],
        None => vec![],
    };
    req
}

fn random_dimensions(rng: &mut StdRng, max: usize) -> Vec<i32> {
    let n = rng.gen_range(1..=max);
    let mut dims = DIMENSIONS.to_vec();
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(dims.remove(rng.gen_range(0..dims.len())) as i32);
    }
    out
}

fn random_filters(rng: &mut StdRng) -> Vec<proto::Filter> {
    let filter = |dimension: Dimension, values: &[&str]| proto::Filter {
        dimension: dimension as i32,
        values: values.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    match rng.gen_range(0..9) {
        0 => vec![filter(Dimension::Sex, &["female"])],
        1 => vec![filter(Dimension::Country, &["NL", "BE"])],
        2 => vec![filter(Dimension::Diagnosis, &CODES[..2])],
        // Filters that bound the delay or the age (a claims audit pinned a hidden count
        // with one the service did not take into account).
        3 => vec![filter(Dimension::OnsetAgeBand, &["<1", "unknown"])],
        4 => vec![filter(Dimension::DiagnosisAgeBand, &["<1", "12-17"])],
        5 => vec![
            filter(Dimension::OnsetAgeBand, &["1-4", "5-11"]),
            filter(Dimension::DiagnosisYear, &["2010", "2015", "2020"]),
        ],
        // Recent years, where an old onset with a young diagnosis needs a future date (a
        // privacy audit pinned a count of 1 through such cells).
        6 => vec![filter(Dimension::DiagnosisYear, &["2024", "2025", "2026"])],
        _ => vec![],
    }
}

#[tokio::test]
async fn an_lp_attacker_narrows_no_hidden_count_of_any_research_answer() {
    let app = TestApp::spawn_with(ServeArgs {
        research_queries_per_minute: 100_000,
        derivations_per_minute: 1_000_000,
        ..ServeArgs::default()
    })
    .await;
    let registries = ["ERN-LUNG", "ERN-EYE", "ERN-SKIN"];
    app.centre("BE-UZL", "BE", &registries).await;
    app.centre("DE-CHA", "DE", &registries).await;
    app.centre("NL-AMC", "NL", &registries).await;
    let mut physicians = Vec::new();
    for (i, centre) in CENTRES.iter().enumerate() {
        physicians.push(app.physician(&format!("dr-{i}"), centre).await);
    }
    let token = app
        .principal("attacker", Role::Researcher, None, &registries)
        .await;
    let bearer = Bearer(Some(format!("Bearer {token}").parse().unwrap()));
    let mut researcher = ResearchServiceClient::with_interceptor(app.channel().await, bearer);

    let mut rng = StdRng::seed_from_u64(0x11_2026);
    let mut seed = 1_000;
    let mut answers = 0;
    let mut hidden = 0;
    for registry in registries {
        let k = rng.gen_range(2..=20);
        let p = rng.gen_range(1..=4);
        app.store.set_min_cell_count(registry, k).await.unwrap();
        app.store.set_protection_level(registry, p).await.unwrap();
        let (k, p) = (k as u64, p as u64);
        let patients = rng.gen_range(60..=140);
        for _ in 0..patients {
            seed += 1;
            let req = random_case(&mut rng, registry, seed);
            let physician = rng.gen_range(0..physicians.len());
            physicians[physician].submit_case(req).await.unwrap();
        }

        for _ in 0..12 {
            let filters = random_filters(&mut rng);
            let t = researcher
                .count_patients(proto::CountPatientsRequest {
                    registry: registry.into(),
                    group_by: random_dimensions(&mut rng, 4),
                    filters: filters.clone(),
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!((t.min_cell_count, t.protection_level), (k as u32, p as u32));
            let found = broken(&count_view(&t, &filters).attack(), k, p, &mut hidden);
            assert!(
                found.is_empty(),
                "{registry} k={k} p={p}: {found:?} in {t:?}"
            );
            answers += 1;
        }

        for _ in 0..8 {
            let filters = random_filters(&mut rng);
            let d = researcher
                .diagnostic_delay(proto::DiagnosticDelayRequest {
                    registry: registry.into(),
                    group_by: random_dimensions(&mut rng, 3),
                    filters: filters.clone(),
                })
                .await
                .unwrap()
                .into_inner();
            let found = broken(&delay_view(&d, &filters).attack(), k, p, &mut hidden);
            assert!(
                found.is_empty(),
                "{registry} k={k} p={p}: {found:?} in {d:?}"
            );
            // Quantiles exactly where their presence follows from published values.
            for g in &d.groups {
                let all_shown = g.total.as_ref().unwrap().count.is_some()
                    && g.bands.iter().all(|b| b.count.is_some());
                assert_eq!(g.quantiles.is_some(), all_shown, "{g:?}");
            }
            // Overall quantiles only when no count of the table is hidden.
            let all_shown = d.grand_total.as_ref().unwrap().count.is_some()
                && d.band_totals.iter().all(|b| b.count.is_some())
                && d.groups.iter().all(|g| {
                    g.total.as_ref().unwrap().count.is_some()
                        && g.bands.iter().all(|b| b.count.is_some())
                });
            assert_eq!(d.overall.is_some(), all_shown);
            answers += 1;
        }

        let e = researcher
            .find_expertise(proto::FindExpertiseRequest {
                orphacodes: CODES.iter().map(|s| s.to_string()).collect(),
                countries: vec![],
                registries: vec![registry.into()],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(!e.centres.is_empty());
        for c in &e.centres {
            let band = c.volume.as_ref().unwrap();
            if let Some(max) = band.max {
                assert!(u64::from(max) >= k, "band {} lies below k={k}", band.label);
                assert!(
                    u64::from(max - band.min) >= p,
                    "band {} narrower than p={p}",
                    band.label
                );
            }
        }
    }
    assert_eq!(answers, 60);
    // The answers had plenty to attack: the test cannot pass on empty suppression.
    assert!(hidden >= 300, "only {hidden} hidden counts attacked");
    eprintln!("{answers} answers, {hidden} hidden counts attacked");
}
