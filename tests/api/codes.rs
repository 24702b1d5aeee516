//! Code releases (issue #18): `ern-registry codes import` of the published formats,
//! validation against the release in force, questions along the ontology (the research
//! index and the SQL reference give the same answers), names beside codes.

use ern_registry::store::db;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ern_registry::auth::Role;
use ern_registry::config::ServeArgs;
use ern_registry::proto::{self, Dimension, research_service_client::ResearchServiceClient};
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::helpers::*;

type Research = ResearchServiceClient<InterceptedService<Channel, Bearer>>;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/codes")
        .join(name)
}

impl TestApp {
    /// Runs the real binary against this app's database and master key.
    fn codes_cli(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_ern-registry"))
            .arg("--database-url")
            .arg(&self.database_url)
            .arg("codes")
            .args(args)
            .env("ERN_MASTER_KEY_FILE", self.dir.path().join("master.key"))
            .env_remove("ERN_MASTER_PASSPHRASE")
            .env_remove("ERN_MASTER_PASSPHRASE_FILE")
            .output()
            .expect("run the binary")
    }

    fn codes_ok(&self, args: &[&str]) -> String {
        let out = self.codes_cli(args);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "codes {args:?}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }

    /// Imports the three fixture releases (HPO with its annotation files, Orphanet with
    /// a classification, HGNC) and lets the server take them up at once.
    async fn import_fixture_releases(&self) {
        let path = |n: &str| fixture(n).display().to_string();
        self.codes_ok(&[
            "import",
            "hpo",
            "--obo",
            &path("hp.obo"),
            "--hpoa",
            &path("phenotype.hpoa"),
            "--genes-to-phenotype",
            &path("genes_to_phenotype.txt"),
        ]);
        self.codes_ok(&[
            "import",
            "orphanet",
            "--product1",
            &path("en_product1.xml"),
            "--classification",
            &path("en_product3_156.xml"),
        ]);
        self.codes_ok(&["import", "hgnc", "--tsv", &path("hgnc_complete_set.txt")]);
        // Taken up now (the server's own look, every 10 s, may have come first).
        self.codes.refresh(&self.store).await.unwrap();
    }

    async fn researcher_client(&self, name: &str) -> Research {
        let token = self
            .principal(name, Role::Researcher, None, &["ERN-LUNG"])
            .await;
        let bearer = Bearer(Some(format!("Bearer {token}").parse().unwrap()));
        ResearchServiceClient::with_interceptor(self.channel().await, bearer)
    }
}

/// "field: description" of each violation of an INVALID_ARGUMENT status.
fn described(status: &tonic::Status) -> Vec<String> {
    use tonic_types::StatusExt;
    status
        .get_error_details()
        .bad_request()
        .map(|b| {
            b.field_violations
                .iter()
                .map(|v| format!("{}: {}", v.field, v.description))
                .collect()
        })
        .unwrap_or_default()
}

/// The fixture submission with these HPO terms, Orphacode and gene.
fn case(seed: u32, hpo: &[&str], orphacode: &str, gene: &str) -> proto::SubmitCaseRequest {
    let mut req = submission("ERN-LUNG", national("NL", &bsn(seed)));
    let rec = req.record.as_mut().unwrap();
    rec.hpo_terms = hpo.iter().map(|t| t.to_string()).collect();
    rec.diagnosis.as_mut().unwrap().orphacode = orphacode.into();
    rec.genetic_findings[0].gene = gene.into();
    rec.genetic_findings[0].variants.clear();
    req
}

#[tokio::test]
async fn without_a_release_codes_are_checked_by_format_only() {
    let app = TestApp::spawn().await;
    let mut dr = app.physician("dr-format", "NL-AMC").await;
    // A well-formed term and Orphacode that no release holds: accepted, as before.
    let r = dr
        .submit_case(case(1, &["HP:9999999"], "ORPHA:9999999", "ZZZ9"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.code_releases, "");
    assert!(r.replaced_codes.is_empty());
    let out = app.codes_ok(&["list"]);
    assert!(out.contains("no code release on file"), "{out}");
    assert!(logs().contains("format checks only"));
}

#[tokio::test]
async fn submissions_are_checked_against_the_releases_in_force() {
    let app = TestApp::spawn().await;
    app.import_fixture_releases().await;
    let listed = app.codes_ok(&["list"]);
    for line in [
        "hpo       2025-01-16     IN FORCE dated 2025-01-16",
        "orphanet  2024-12-02     IN FORCE",
        "hgnc      2025-02-25     IN FORCE",
    ] {
        assert!(listed.contains(line), "{listed}");
    }
    // The codes listed are the codes stored: an Orphanet classification node already in
    // product 1 is counted once.
    for (system, release_terms) in app
        .pairs::<String, i64>("SELECT system, terms FROM code_releases")
        .await
    {
        let stored: i64 = db::query(
            "SELECT COUNT(*) FROM code_terms t JOIN code_releases r ON r.id = t.release_id \
             WHERE r.system = $1",
        )
        .bind(&system)
        .fetch_scalar(app.store.pool())
        .await
        .unwrap();
        assert_eq!(release_terms, stored, "{system}");
    }
    let mut dr = app.physician("dr-codes", "NL-AMC").await;

    // Unknown, obsolete (without a replacement) and renamed codes: INVALID_ARGUMENT on
    // each field, with a hint and never the code sent.
    let status = dr
        .submit_case(case(
            2,
            &["HP:0001251", "HP:0030057"],
            "ORPHA:88888",
            "ABCC7",
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let v = described(&status);
    let has = |field: &str, text: &str| {
        assert!(
            v.iter().any(|x| x.starts_with(field) && x.contains(text)),
            "{field} / {text}: {v:?}"
        )
    };
    has(
        "record.hpo_terms[0]",
        "is not a code of HPO 2025-01-16; near matches: HP:0001250 (Seizure)",
    );
    has("record.hpo_terms[1]", "is obsolete in HPO 2025-01-16");
    has(
        "record.diagnosis.orphacode",
        "is obsolete in Orphanet 2024-12-02 and has no replacement; choose a current code",
    );
    has(
        "record.genetic_findings[0].gene",
        "a previous symbol of CFTR (CF transmembrane conductance regulator)",
    );
    assert!(
        !v.iter()
            .any(|x| x.contains("HP:0001251") || x.contains("ABCC7"))
    );
    assert_eq!(app.count("cases").await, 0);

    // A deprecated Orphacode "moved to" another, an obsolete term with a replacement,
    // and a merged id: stored as the current codes, and the answer says so.
    let r = dr
        .submit_case(case(
            3,
            &["HP:0000057", "HP:0000624"],
            "ORPHA:99999",
            "FBN1",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.replaced_codes.len(), 3, "{:?}", r.replaced_codes);
    let orpha = &r.replaced_codes[0];
    assert_eq!(
        (
            orpha.field.as_str(),
            orpha.given.as_str(),
            orpha.stored.as_str()
        ),
        ("record.diagnosis.orphacode", "ORPHA:99999", "ORPHA:558")
    );
    assert!(
        orpha.note.contains(
            "obsolete in Orphanet 2024-12-02, replaced by ORPHA:558 (Marfan syndrome); stored as ORPHA:558"
        ),
        "{}",
        orpha.note
    );
    let first = &r.replaced_codes[1];
    assert_eq!(
        (
            first.field.as_str(),
            first.given.as_str(),
            first.stored.as_str()
        ),
        ("record.hpo_terms[0]", "HP:0000057", "HP:0008665")
    );
    assert!(
        first
            .note
            .contains("replaced by HP:0008665 (Clitoral hypertrophy)")
    );
    assert_eq!(r.replaced_codes[2].stored, "HP:0000286");
    assert_eq!(
        r.code_releases,
        "hpo 2025-01-16, orphanet 2024-12-02, hgnc 2025-02-25"
    );
    let stored = dr
        .get_case(get_case("ERN-LUNG", &r.pseudonym))
        .await
        .unwrap()
        .into_inner()
        .case
        .unwrap()
        .current
        .unwrap();
    let stored_record = stored.record.unwrap();
    assert_eq!(stored_record.hpo_terms, ["HP:0008665", "HP:0000286"]);
    assert_eq!(
        stored_record.diagnosis.unwrap().orphacode,
        "ORPHA:558",
        "stored as the replacement"
    );
    assert_eq!(stored.code_releases, r.code_releases);

    // Imports are audited like every admin action.
    let methods: Vec<String> = db::query(
        "SELECT method FROM audit_log WHERE method = 'AdminCli/ImportCodes' AND outcome = 'OK'",
    )
    .fetch_scalars(app.store.pool())
    .await
    .unwrap();
    assert_eq!(methods.len(), 3);
}

#[tokio::test]
async fn several_releases_are_kept_and_one_is_in_force() {
    let app = TestApp::spawn().await;
    app.import_fixture_releases().await;
    let obo = fixture("hp.obo").display().to_string();
    // The same release again, and a file that is no HPO release: refused, recorded in
    // the audit log, and nothing of them stays on file.
    let (releases, terms) = (
        app.count("code_releases").await,
        app.count("code_terms").await,
    );
    let out = app.codes_cli(&["import", "hpo", "--obo", &obo]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
    let not_obo = fixture("en_product1.xml").display().to_string();
    let out = app.codes_cli(&["import", "hpo", "--obo", &not_obo]);
    assert!(!out.status.success());
    assert_eq!(app.count("code_releases").await, releases);
    assert_eq!(app.count("code_terms").await, terms);
    let refused: Vec<String> = db::query(
        "SELECT outcome FROM audit_log WHERE method = 'AdminCli/ImportCodes' AND outcome <> 'OK'",
    )
    .fetch_scalars(app.store.pool())
    .await
    .unwrap();
    assert_eq!(refused.len(), 2, "{refused:?}");
    // Another version, kept beside the one in force.
    app.codes_ok(&[
        "import",
        "hpo",
        "--obo",
        &obo,
        "--version",
        "2025-01-16-rerun",
        "--keep-current",
    ]);
    let listed = app.codes_ok(&["list"]);
    assert!(
        listed.contains("hpo       2025-01-16     IN FORCE"),
        "{listed}"
    );
    assert!(
        listed.contains("hpo       2025-01-16-rerun         "),
        "{listed}"
    );
    assert!(!app.codes.refresh(&app.store).await.unwrap());
    app.codes_ok(&[
        "activate",
        "--system",
        "hpo",
        "--version",
        "2025-01-16-rerun",
    ]);
    // Taken up now (the server's own look, every 10 s, may have come first).
    app.codes.refresh(&app.store).await.unwrap();
    let mut dr = app.physician("dr-versions", "NL-AMC").await;
    let r = dr
        .submit_case(case(4, &["HP:0001250"], "ORPHA:586", "CFTR"))
        .await
        .unwrap()
        .into_inner();
    assert!(r.code_releases.contains("hpo 2025-01-16-rerun"));
    let out = app.codes_cli(&["activate", "--system", "hpo", "--version", "1999"]);
    assert!(!out.status.success());
}

/// Counts of the cohort below, asked in every way along the ontology.
async fn ontology_answers(research: &mut Research) -> Vec<String> {
    let count =
        |filters: Vec<proto::Filter>, group_by: Vec<Dimension>| proto::CountPatientsRequest {
            registry: "ERN-LUNG".into(),
            group_by: group_by.into_iter().map(|d| d as i32).collect(),
            filters,
        };
    let filter = |dimension: Dimension, values: &[&str], include_descendants: bool| proto::Filter {
        dimension: dimension as i32,
        values: values.iter().map(|s| s.to_string()).collect(),
        include_descendants,
    };
    let mut answers = Vec::new();
    let show = |t: proto::CountTable| {
        let rows: Vec<String> = t
            .rows
            .iter()
            .map(|r| format!("{}={:?}", r.label, r.cells[0].count))
            .collect();
        format!(
            "total={:?} rows={rows:?} names={:?}",
            t.grand_total.unwrap().count,
            t.names
                .iter()
                .map(|n| format!("{} {}", n.code, n.name))
                .collect::<Vec<_>>()
        )
    };
    for request in [
        count(
            vec![filter(Dimension::Phenotype, &["HP:0001250"], true)],
            vec![],
        ),
        count(
            vec![filter(Dimension::Phenotype, &["HP:0001250"], false)],
            vec![],
        ),
        count(
            vec![filter(Dimension::Phenotype, &["HP:0007359"], true)],
            vec![],
        ),
        count(
            vec![filter(Dimension::Diagnosis, &["ORPHA:558"], true)],
            vec![Dimension::Diagnosis],
        ),
        count(
            vec![
                filter(Dimension::Diagnosis, &["ORPHA:98249"], true),
                filter(Dimension::Phenotype, &["HP:0000118"], true),
            ],
            vec![Dimension::Gene],
        ),
        // An alternative id of Seizure, with descendants: Seizure's.
        count(
            vec![filter(Dimension::Phenotype, &["HP:0001262"], true)],
            vec![],
        ),
        // A term the release does not know, with descendants: what is stored under it.
        count(
            vec![filter(Dimension::Phenotype, &["HP:9999999"], true)],
            vec![],
        ),
    ] {
        answers.push(show(
            research.count_patients(request).await.unwrap().into_inner(),
        ));
    }
    let delay = research
        .diagnostic_delay(proto::DiagnosticDelayRequest {
            registry: "ERN-LUNG".into(),
            group_by: vec![Dimension::Diagnosis as i32],
            filters: vec![filter(Dimension::Phenotype, &["HP:0001250"], true)],
        })
        .await
        .unwrap()
        .into_inner();
    answers.push(format!(
        "delay total={:?} names={:?}",
        delay.grand_total.unwrap().count,
        delay.names
    ));
    answers
}

#[tokio::test]
async fn research_follows_the_ontology_alike_on_the_index_and_in_sql() {
    let app = TestApp::spawn().await;
    let mut dr = app.physician("dr-onto", "NL-AMC").await;
    // Stored before any release: a term no release knows.
    for seed in 900..905 {
        dr.submit_case(case(seed, &["HP:9999999"], "ORPHA:9999999", "ZZZ9"))
            .await
            .unwrap();
    }
    app.import_fixture_releases().await;
    let mut seed = 1000;
    for (n, hpo, orpha, gene) in [
        (5, "HP:0002069", "ORPHA:284963", "FBN1"),
        (3, "HP:0002384", "ORPHA:284973", "FBN1"),
        (6, "HP:0006528", "ORPHA:586", "CFTR"),
    ] {
        for _ in 0..n {
            seed += 1;
            dr.submit_case(case(seed, &[hpo], orpha, gene))
                .await
                .unwrap();
        }
    }
    let mut research = app.researcher_client("res-onto").await;
    let indexed = ontology_answers(&mut research).await;
    let expected_first = [
        // Seizure and everything below it: 5 + 3.
        "total=Some(8) rows=[\"all=Some(8)\"] names=[]",
        // The term alone: nobody is coded with exactly it (zero is published).
        "total=Some(0) rows=[\"all=Some(0)\"] names=[]",
        // Focal-onset seizure and below: the 3 only, below k: suppressed, and so no row
        // is listed.
        "total=None rows=[] names=[]",
    ];
    assert_eq!(indexed[..3], expected_first, "{indexed:#?}");
    // Marfan syndrome with its subtypes (5 and 3): the 3 is suppressed, and with it its
    // complement, exactly as without the ontology; names beside the codes.
    assert!(
        indexed[3].starts_with("total=Some(8) rows=[\"ORPHA:284963=None\", \"ORPHA:284973=None\"]"),
        "{indexed:#?}"
    );
    assert!(
        indexed[3].contains("ORPHA:284963 Marfan syndrome type 1"),
        "{indexed:#?}"
    );
    assert!(indexed[4].contains("FBN1 fibrillin 1"), "{indexed:#?}");
    assert!(
        indexed[5].starts_with("total=Some(8)"),
        "an alternative id stands for its term: {indexed:#?}"
    );
    assert!(
        indexed[6].starts_with("total=Some(5)"),
        "a term no release knows stands for itself: {indexed:#?}"
    );
    assert!(
        indexed[7].starts_with("delay total=Some(8)"),
        "{indexed:#?}"
    );

    // The SQL reference, on the same database, expands along the stored release itself.
    let app = app
        .restarted_with(ServeArgs {
            research_index: false,
            ..ServeArgs::default()
        })
        .await;
    let token = app
        .principal("res-onto-sql", Role::Researcher, None, &["ERN-LUNG"])
        .await;
    let bearer = Bearer(Some(format!("Bearer {token}").parse().unwrap()));
    let mut research = ResearchServiceClient::with_interceptor(app.channel().await, bearer);
    let scanned = ontology_answers(&mut research).await;
    assert_eq!(indexed, scanned);
}

#[tokio::test]
async fn expertise_is_found_by_disease_name() {
    let app = TestApp::spawn().await;
    app.import_fixture_releases().await;
    let mut dr = app.physician("dr-name", "NL-AMC").await;
    for seed in 0..3 {
        dr.submit_case(case(2000 + seed, &["HP:0000286"], "ORPHA:558", "FBN1"))
            .await
            .unwrap();
    }
    let mut research = app.researcher_client("res-name").await;
    let r = research
        .find_expertise(proto::FindExpertiseRequest {
            disease_name_prefix: "marfan".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let diseases: Vec<(String, String)> = r
        .diseases
        .iter()
        .map(|d| (d.code.clone(), d.name.clone()))
        .collect();
    assert_eq!(
        diseases,
        [
            ("ORPHA:558".to_string(), "Marfan syndrome".to_string()),
            ("ORPHA:284963".into(), "Marfan syndrome type 1".into()),
            ("ORPHA:284973".into(), "Marfan syndrome type 2".into()),
        ]
    );
    assert_eq!(r.centres.len(), 1);
    assert_eq!(r.centres[0].centre_code, "NL-AMC");
    let status = research
        .find_expertise(proto::FindExpertiseRequest {
            disease_name_prefix: "ma".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn ontology_questions_need_the_release_in_force() {
    let app = TestApp::spawn().await;
    let mut research = app.researcher_client("res-none").await;
    let status = research
        .count_patients(proto::CountPatientsRequest {
            registry: "ERN-LUNG".into(),
            group_by: vec![],
            filters: vec![proto::Filter {
                dimension: Dimension::Phenotype as i32,
                values: vec!["HP:0001250".into()],
                include_descendants: true,
            }],
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(status.message().contains("no HPO release is in force"));
    let status = research
        .count_patients(proto::CountPatientsRequest {
            registry: "ERN-LUNG".into(),
            group_by: vec![Dimension::Phenotype as i32],
            filters: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn the_console_research_pages_filter_along_the_ontology_and_name_the_codes() {
    use crate::console::{Web, console_app, console_user, error_next_to};
    let app = console_app(ServeArgs::default()).await;
    app.import_fixture_releases().await;
    let mut dr = app.physician("dr-console-onto", "NL-AMC").await;
    let mut seed = 3000;
    for (n, hpo, orpha, gene) in [
        (5, "HP:0002069", "ORPHA:284963", "FBN1"),
        (3, "HP:0002384", "ORPHA:284973", "FBN1"),
        (6, "HP:0006528", "ORPHA:586", "CFTR"),
    ] {
        for _ in 0..n {
            seed += 1;
            dr.submit_case(case(seed, &[hpo], orpha, gene))
                .await
                .unwrap();
        }
    }
    let secret = console_user(&app, "res-console", Role::Researcher, None, &["ERN-LUNG"]).await;
    let mut web = Web::new(app.console.unwrap());
    web.sign_in(&app, "res-console", &secret).await;
    let form = web.get("/research").await;
    assert!(form.body.contains("value=\"PHENOTYPE\""), "{}", form.body);
    assert!(
        form.body
            .contains("<label for=\"filters-0--include_descendants\">")
    );
    let csrf = form.csrf();
    let ask = |path: &'static str, extra: Vec<(&'static str, &'static str)>| {
        let mut fields = vec![
            ("csrf", csrf.clone()),
            ("registry", "ERN-LUNG".to_string()),
            ("group_by[0]", "DIAGNOSIS".to_string()),
        ];
        fields.extend(extra.into_iter().map(|(k, v)| (k, v.to_string())));
        (path, fields)
    };
    let post = async |web: &mut Web, (path, fields): (&str, Vec<(&str, String)>)| {
        let fields: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
        web.post(path, &fields).await
    };

    // Marfan syndrome with its subtypes: both subtypes' rows, named; not cystic fibrosis.
    let marfan = post(
        &mut web,
        ask(
            "/research/count",
            vec![
                ("filters[0].dimension", "DIAGNOSIS"),
                ("filters[0].values", "ORPHA:558"),
                ("filters[0].include_descendants", "on"),
            ],
        ),
    )
    .await;
    assert_eq!(marfan.status, 200, "{}", marfan.body);
    assert!(
        marfan
            .body
            .contains("ORPHA:284963 <span class=\"name\">Marfan syndrome type 1</span>"),
        "{}",
        marfan.body
    );
    assert!(
        marfan
            .body
            .contains("ORPHA:284973 <span class=\"name\">Marfan syndrome type 2</span>")
    );
    assert!(!marfan.body.contains("ORPHA:586"));
    // The code alone: nobody is coded with exactly it.
    let alone = post(
        &mut web,
        ask(
            "/research/count",
            vec![
                ("filters[0].dimension", "DIAGNOSIS"),
                ("filters[0].values", "ORPHA:558"),
            ],
        ),
    )
    .await;
    assert_eq!(alone.status, 200);
    assert!(!alone.body.contains("ORPHA:284963"));

    // Seizure and every term below it (5 + 3), in the count table and the delay chart.
    let seizure = vec![
        ("filters[0].dimension", "PHENOTYPE"),
        ("filters[0].values", "HP:0001250"),
        ("filters[0].include_descendants", "on"),
    ];
    let counted = post(&mut web, ask("/research/count", seizure.clone())).await;
    assert_eq!(counted.status, 200, "{}", counted.body);
    assert!(counted.body.contains("Marfan syndrome type 1"));
    assert!(!counted.body.contains("Cystic fibrosis"));
    let delay = post(&mut web, ask("/research/delay", seizure)).await;
    assert_eq!(delay.status, 200, "{}", delay.body);
    assert!(
        delay
            .body
            .contains("ORPHA:284963 <span class=\"name\">Marfan syndrome type 1</span>")
    );

    // Codes the releases in force do not hold: an error next to the field, with the
    // release's near matches; nothing counted.
    let unknown = post(
        &mut web,
        ask(
            "/research/count",
            vec![
                ("filters[0].dimension", "PHENOTYPE"),
                ("filters[0].values", "HP:0001251"),
                ("filters[1].dimension", "DIAGNOSIS"),
                ("filters[1].values", "ORPHA:5580"),
            ],
        ),
    )
    .await;
    assert_eq!(unknown.status, 400, "{}", unknown.body);
    assert!(
        error_next_to(
            &unknown,
            "filters[0].values",
            "HP:0001251 is not a code of HPO 2025-01-16; near matches: HP:0001250 (Seizure)"
        ),
        "{}",
        unknown.body
    );
    assert!(
        error_next_to(
            &unknown,
            "filters[1].values",
            "ORPHA:5580 is not a code of Orphanet 2024-12-02; near matches: ORPHA:558 (Marfan syndrome)"
        ),
        "{}",
        unknown.body
    );
    // Descendants of a dimension without any: next to the check box.
    let sex = post(
        &mut web,
        ask(
            "/research/count",
            vec![
                ("filters[0].dimension", "SEX"),
                ("filters[0].values", "female"),
                ("filters[0].include_descendants", "on"),
            ],
        ),
    )
    .await;
    assert_eq!(sex.status, 400);
    assert!(error_next_to(
        &sex,
        "filters[0].include_descendants",
        "only a diagnosis"
    ));
}

/// Inserts what an import leaves when it dies before finishing: a staged release of
/// `system` with a code, whose last batch was committed at `heartbeat` (ms); its id.
async fn staged_release(app: &TestApp, system: &str, heartbeat: i64) -> i64 {
    use ern_registry::store::db;
    let id: i64 = db::query(
        "INSERT INTO code_releases (system, version, released_on, imported_at, source, terms, \
                                    in_force, staged_at) \
         VALUES ($1, $2, NULL, $3, 'a file', 0, FALSE, $3) RETURNING id",
    )
    .bind(system)
    .bind(format!("(importing at {heartbeat})"))
    .bind(chrono::DateTime::from_timestamp_millis(heartbeat).unwrap())
    .fetch_one(app.store.pool())
    .await
    .unwrap()
    .try_get(0)
    .unwrap();
    db::query(
        "INSERT INTO code_terms (release_id, code, label, obsolete, replaced_by) \
         VALUES ($1, 'HP:0000001', 'All', FALSE, NULL)",
    )
    .bind(id)
    .execute(app.store.pool())
    .await
    .unwrap();
    id
}

async fn release_exists(app: &TestApp, id: i64) -> bool {
    db::query("SELECT 1 FROM code_releases WHERE id = $1")
        .bind(id)
        .fetch_optional(app.store.pool())
        .await
        .unwrap()
        .is_some()
}

/// Removing a refused or abandoned import never touches a finished release: neither the
/// import's clean-up after an error whose commit landed all the same (its answer lost),
/// nor the sweep of abandoned imports, however late, takes a finished release's rows.
/// A staged release goes with its rows.
#[tokio::test]
async fn a_finished_release_is_never_discarded() {
    use ern_registry::store::codes;
    let app = TestApp::spawn().await;
    app.import_fixture_releases().await;
    let terms = |id: i64| {
        let pool = app.store.pool();
        async move {
            let n: i64 = db::query("SELECT COUNT(*) FROM code_terms WHERE release_id = $1")
                .bind(id)
                .fetch_scalar(pool)
                .await
                .unwrap();
            n
        }
    };
    let in_force = app.store.code_releases_in_force().await.unwrap();
    assert_eq!(in_force.len(), 3, "{in_force:?}");
    // One finished but put out of force (as `codes import --activate false` leaves one):
    // finished all the same.
    db::query("UPDATE code_releases SET in_force = FALSE WHERE id = $1")
        .bind(in_force[0])
        .execute(app.store.pool())
        .await
        .unwrap();
    let mut before = Vec::new();
    for &id in &in_force {
        let n = terms(id).await;
        assert!(n > 0, "release {id} holds no code");
        assert!(!codes::discard(&app.store, id).await.unwrap());
        before.push(n);
    }
    let a_day_later = chrono::Utc::now() + chrono::Duration::days(1);
    assert_eq!(
        codes::remove_abandoned(&app.store, a_day_later)
            .await
            .unwrap(),
        Vec::<String>::new()
    );
    for (&id, n) in in_force.iter().zip(before) {
        assert!(release_exists(&app, id).await);
        assert_eq!(terms(id).await, n, "release {id}");
    }
    assert_eq!(
        app.store.code_releases_in_force().await.unwrap(),
        in_force[1..]
    );

    let staged = staged_release(&app, "orphanet", chrono::Utc::now().timestamp_millis()).await;
    for sql in [
        "INSERT INTO code_parents (release_id, code, parent) VALUES ($1, 'HP:0000002', 'HP:0000001')",
        "INSERT INTO code_aliases (release_id, alias, code, kind) VALUES ($1, 'HP:0000003', 'HP:0000001', 'alt_id')",
    ] {
        db::query(sql)
            .bind(staged)
            .execute(app.store.pool())
            .await
            .unwrap();
    }
    assert!(codes::discard(&app.store, staged).await.unwrap());
    assert!(!release_exists(&app, staged).await);
    for table in ["code_terms", "code_parents", "code_aliases"] {
        let left: i64 = db::query(&format!(
            "SELECT COUNT(*) FROM {table} WHERE release_id = $1"
        ))
        .bind(staged)
        .fetch_scalar(app.store.pool())
        .await
        .unwrap();
        assert_eq!(left, 0, "{table}");
    }
}

#[tokio::test]
async fn an_import_that_died_is_removed_at_the_next_start_or_import_and_never_put_in_force() {
    let app = TestApp::spawn().await;
    let now = chrono::Utc::now().timestamp_millis();
    let hour_ago = now - 3_600_000;
    // A crashed import (no batch for an hour), and one another process is writing now.
    let crashed = staged_release(&app, "hpo", hour_ago).await;
    let running = staged_release(&app, "hgnc", now).await;
    // Neither can be put in force.
    for (system, at) in [("hpo", hour_ago), ("hgnc", now)] {
        let out = app.codes_cli(&[
            "activate",
            "--system",
            system,
            "--version",
            &format!("(importing at {at})"),
        ]);
        assert!(!out.status.success(), "{out:?}");
    }
    assert_eq!(
        app.store.code_releases_in_force().await.unwrap(),
        Vec::<i64>::new()
    );

    // A server start removes the crashed one with its rows, and keeps the live one.
    let app = app.restarted_with(ServeArgs::default()).await;
    assert!(!release_exists(&app, crashed).await);
    assert!(release_exists(&app, running).await);
    let left: i64 = db::query("SELECT COUNT(*) FROM code_terms WHERE release_id = $1")
        .bind(crashed)
        .fetch_scalar(app.store.pool())
        .await
        .unwrap();
    assert_eq!(left, 0);
    assert!(logs().contains("removed a code release whose import stopped without finishing"));

    // The next import removes one that died since, and goes ahead.
    let crashed_again = staged_release(&app, "orphanet", hour_ago).await;
    app.codes_ok(&[
        "import",
        "hgnc",
        "--tsv",
        &fixture("hgnc_complete_set.txt").display().to_string(),
    ]);
    assert!(!release_exists(&app, crashed_again).await);
    let listed = app.codes_ok(&["list"]);
    assert!(
        listed.contains("hgnc      2025-02-25     IN FORCE"),
        "{listed}"
    );
    assert!(
        !listed.contains(&format!("(importing at {hour_ago})")),
        "{listed}"
    );
}

#[tokio::test]
async fn a_phenopacket_is_checked_against_the_releases_and_exported_with_them() {
    let app = TestApp::spawn().await;
    app.import_fixture_releases().await;
    let mut dr = app.physician("dr-pp", "NL-AMC").await;

    // The release's verdict on a code names the phenopacket's element.
    let mut request = phenopacket_submission("ERN-LUNG", national("NL", &bsn(40)));
    request.phenopacket = PHENOPACKET
        .replace("\"HP:0006528\"", "\"HP:0001251\"")
        .replace("\"ORPHA:586\"", "\"ORPHA:424242\"");
    let status = dr.submit_phenopacket(request).await.unwrap_err();
    let v = described(&status);
    assert!(
        v.iter()
            .any(|x| x
                .starts_with("phenopacket.phenotypicFeatures[0].type.id: is not a code of HPO")),
        "{v:?}"
    );
    assert!(
        v.iter()
            .any(|x| x.starts_with("phenopacket.diseases[0].term.id: ")),
        "{v:?}"
    );

    // An obsolete term is stored as its replacement; the answer names the element.
    let mut request = phenopacket_submission("ERN-LUNG", national("NL", &bsn(41)));
    request.phenopacket = PHENOPACKET.replace("\"HP:0006528\"", "\"HP:0000057\"");
    let r = dr.submit_phenopacket(request).await.unwrap().into_inner();
    assert_eq!(r.replaced_codes.len(), 1, "{:?}", r.replaced_codes);
    assert_eq!(
        r.replaced_codes[0].field,
        "phenopacket.phenotypicFeatures[0].type.id"
    );

    // The export names the releases the record was checked against, and the labels.
    let page = dr
        .export_phenopackets(proto::ExportPhenopacketsRequest {
            registry: "ERN-LUNG".into(),
            page_size: 0,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let value: serde_json::Value = serde_json::from_str(&page.phenopackets[0]).unwrap();
    let resources = value["metaData"]["resources"].as_array().unwrap();
    let version = |prefix: &str| {
        resources
            .iter()
            .find(|r| r["namespacePrefix"] == prefix)
            .map(|r| r["version"].as_str().unwrap_or_default().to_owned())
    };
    assert_eq!(version("HP").as_deref(), Some("2025-01-16"));
    assert_eq!(version("ORPHA").as_deref(), Some("2024-12-02"));
    assert_eq!(version("hgnc.symbol").as_deref(), Some("2025-02-25"));
    assert_eq!(
        value["phenotypicFeatures"][0]["type"]["id"], "HP:0008665",
        "{value}"
    );
    assert_eq!(value["diseases"][0]["term"]["label"], "Cystic fibrosis");

    // `upload --format phenopackets`: the server's verdict names the element too.
    let key = app
        .principal("dr-pp-upload", Role::Physician, Some("NL-AMC"), &[])
        .await;
    let mut phenopacket: serde_json::Value = serde_json::from_str(PHENOPACKET).unwrap();
    phenopacket["phenotypicFeatures"][0]["type"]["id"] = "HP:0001251".into();
    let line = serde_json::json!({
        "registry": "ERN-LUNG",
        "patient": {"national": {"issuingCountry": "NL", "value": bsn(42)}},
        "phenopacket": phenopacket,
        "consent": [{"scope": "CONSENT_SCOPE_REGISTRY_INCLUSION", "state": "CONSENT_STATE_GRANTED",
                     "givenAt": GIVEN, "formVersion": FORM_VERSION}],
        "clientReference": "pp-42",
    });
    let file = app.dir.path().join("phenopackets.jsonl");
    std::fs::write(&file, format!("{line}\n")).unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_ern-registry"));
    command
        .args(["upload", "--format", "phenopackets", "--server"])
        .arg(format!("http://{}", app.addr))
        .arg(&file)
        .env("ERN_API_KEY", &key)
        .env_remove("ERN_API_KEY_FILE")
        .env_remove("ERN_REGISTRY")
        .stdin(std::process::Stdio::null());
    // Off the test's runtime, which serves the server.
    let output = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    assert!(!output.status.success());
    let results =
        std::fs::read_to_string(app.dir.path().join("phenopackets.jsonl.results.csv")).unwrap();
    assert!(
        results.contains("pp-42,rejected,,INVALID_ARGUMENT: ")
            && results.contains("phenopacket.phenotypicFeatures[0].type.id: is not a code of HPO"),
        "{results}"
    );
}

/// A case version an earlier version stored as ORPHA:616874 (undiagnosed) with a
/// diagnosis (a code release's replacement, 2026-12-03 to 2026-12-06) is reported at
/// start-up and is not read back as a record; an update by its centre makes the case's
/// current version readable again (its history still holds the broken version).
#[tokio::test]
async fn a_diagnosis_stored_as_undiagnosed_is_reported_at_start_up() {
    let app = TestApp::spawn().await;
    let mut dr = app.physician("dr-legacy", "NL-AMC").await;
    let first = dr
        .submit_case(case(71, &["HP:0006528"], "ORPHA:586", "CFTR"))
        .await
        .unwrap()
        .into_inner();
    dr.submit_case(case(72, &["HP:0006528"], "ORPHA:586", "CFTR"))
        .await
        .unwrap();
    // As such a version stored it: the code replaced, the diagnosis date kept.
    db::query(
        "UPDATE case_versions SET orphacode = 616874 \
         WHERE case_id IN (SELECT id FROM cases WHERE pseudonym = $1)",
    )
    .bind(&first.pseudonym)
    .execute(app.store.pool())
    .await
    .unwrap();
    let app = app.restarted_with(ServeArgs::default()).await;
    assert!(
        logs().contains("current Orphacode (docs/codes.md) versions=1 current=1"),
        "{}",
        logs()
    );
    let mut dr = app.physician("dr-legacy-2", "NL-AMC").await;
    let status = dr
        .get_case(get_case("ERN-LUNG", &first.pseudonym))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Internal, "{status:?}");
    // The centre sends the case again, with a current code: it reads back.
    dr.update_case(proto::UpdateCaseRequest {
        registry: "ERN-LUNG".into(),
        pseudonym: first.pseudonym.clone(),
        expected_version: 1,
        record: case(71, &["HP:0006528"], "ORPHA:586", "CFTR").record,
        consent: vec![],
    })
    .await
    .unwrap();
    let current_only = proto::GetCaseRequest {
        include_history: false,
        ..get_case("ERN-LUNG", &first.pseudonym)
    };
    let back = dr.get_case(current_only).await.unwrap().into_inner();
    let current = back.case.unwrap().current.unwrap();
    assert_eq!(
        current.record.unwrap().diagnosis.unwrap().orphacode,
        "ORPHA:586"
    );
    // The history still holds the version that breaks the rules.
    let status = dr
        .get_case(get_case("ERN-LUNG", &first.pseudonym))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Internal, "{status:?}");
    drop(dr);
    app.restarted_with(ServeArgs::default()).await;
    assert!(
        logs().contains("cannot be read back (docs/codes.md) versions=1"),
        "{}",
        logs()
    );
}

/// Migration 0023 recounts the codes of releases imported before a release counted the
/// codes it stored (an Orphanet classification node already in product 1 was counted
/// twice): run again on a database whose counts are off, it sets them from the terms.
#[tokio::test]
async fn migration_0023_recounts_the_codes_of_earlier_imports() {
    let app = TestApp::spawn().await;
    app.import_fixture_releases().await;
    db::query("UPDATE code_releases SET terms = terms + 4")
        .execute(app.store.pool())
        .await
        .unwrap();
    let migration = if app.is_sqlite() {
        include_str!("../../migrations/sqlite/0023_code_release_terms.sql")
    } else {
        include_str!("../../migrations/postgres/0023_code_release_terms.sql")
    };
    app.store.pool().execute_raw(migration).await.unwrap();
    let releases = app
        .pairs::<i64, i64>("SELECT id, terms FROM code_releases")
        .await;
    assert_eq!(releases.len(), 3);
    for (id, terms) in releases {
        let stored: i64 = db::query("SELECT COUNT(*) FROM code_terms WHERE release_id = $1")
            .bind(id)
            .fetch_scalar(app.store.pool())
            .await
            .unwrap();
        assert_eq!(terms, stored);
    }
}
