//! `ern-registry upload` (the binary) against the real server: a mixed file of 10,000
//! lines checked, refused whole, then sent valid-only, killed mid-way, resumed on a
//! restarted server, and every output scanned for identifiers; the template and JSON
//! Lines; the API key never on the command line.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use ern_registry::auth::Role;
use ern_registry::config::ServeArgs;

use crate::helpers::*;

const LINES: usize = 10_000;

fn upload(server: &TestApp, key: Option<&str>) -> Command {
    upload_to(&format!("http://{}", server.addr), key)
}

fn upload_to(url: &str, key: Option<&str>) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ern-registry"));
    command
        .arg("upload")
        .arg("--server")
        .arg(url)
        .env_remove("ERN_API_KEY")
        .env_remove("ERN_API_KEY_FILE")
        .env_remove("ERN_REGISTRY")
        .env("ERN_LOG", "debug")
        .stdin(Stdio::null());
    if let Some(key) = key {
        command.env("ERN_API_KEY", key);
    }
    command
}

async fn run(mut command: Command) -> Output {
    tokio::task::spawn_blocking(move || command.output().expect("the binary runs"))
        .await
        .unwrap()
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The rows of a result file: (line, client reference, outcome, pseudonym, error).
fn rows(path: &Path) -> Vec<[String; 5]> {
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .from_path(path)
        .unwrap();
    reader
        .records()
        .filter_map(Result::ok)
        .filter(|r| r.len() == 5)
        .map(|r| std::array::from_fn(|i| r[i].to_owned()))
        .collect()
}

/// Line `i` of the mixed file: what is wrong with it, if anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Valid,
    Demographic,
    BadOrphacode,
    BadBsn,
    BadSex,
    DuplicateReference,
}

fn kind(i: usize) -> Kind {
    if i == LINES - 5 {
        Kind::DuplicateReference
    } else if i % 10 == 3 {
        Kind::BadOrphacode
    } else if i % 10 == 7 {
        Kind::BadBsn
    } else if i % 50 == 11 {
        Kind::BadSex
    } else if i % 25 == 5 {
        Kind::Demographic
    } else {
        Kind::Valid
    }
}

fn is_valid(i: usize) -> bool {
    matches!(kind(i), Kind::Valid | Kind::Demographic)
}

/// A BSN that fails the 11-check: a valid one with its last digit changed.
fn broken(bsn: &str) -> String {
    let last = bsn.as_bytes()[8] - b'0';
    format!("{}{}", &bsn[..8], (last + 1) % 10)
}

/// The mixed file, and every identifier in it (to scan the outputs for).
fn mixed_csv() -> (String, Vec<String>) {
    let mut out = csv::Writer::from_writer(Vec::new());
    out.write_record([
        "client_reference",
        "national_id_country",
        "national_id",
        "given_names",
        "family_name",
        "date_of_birth",
        "sex_at_birth",
        "place_of_birth",
        "country_of_birth",
        "birth_year_month",
        "sex",
        "status",
        "onset_kind",
        "onset_date",
        "orphacode",
        "diagnosis_date",
        "hpo_terms",
        "consent_registry_inclusion",
        "consent_research_use",
        "consent_given_at",
        "consent_form_version",
    ])
    .unwrap();
    let mut identifiers = Vec::new();
    for i in 0..LINES {
        let kind = kind(i);
        let reference = if kind == Kind::DuplicateReference {
            "ref-0".to_owned()
        } else {
            format!("ref-{i}")
        };
        let bsn = bsn(i as u32);
        let (country, national) = match kind {
            Kind::Demographic => (String::new(), String::new()),
            Kind::BadBsn => ("NL".to_owned(), broken(&bsn)),
            _ => ("NL".to_owned(), bsn),
        };
        if !national.is_empty() {
            identifiers.push(national.clone());
        }
        let (given, family, dob, sex_at_birth, place, born_in) = if kind == Kind::Demographic {
            let family = format!("Zyxwquist{i}");
            identifiers.push(family.clone());
            (
                "Anna Maria",
                family,
                "1990-01-15",
                "female",
                "Utrecht",
                "NL",
            )
        } else {
            ("", String::new(), "", "", "", "")
        };
        let orphacode = if kind == Kind::BadOrphacode {
            "ORPHA-586"
        } else {
            "ORPHA:586"
        };
        let sex = if kind == Kind::BadSex {
            "femme"
        } else {
            "female"
        };
        out.write_record([
            reference.as_str(),
            &country,
            &national,
            given,
            &family,
            dob,
            sex_at_birth,
            place,
            born_in,
            "2015-06",
            sex,
            "alive",
            "date",
            "2015-09",
            orphacode,
            "2016-03-14",
            "HP:0006528",
            "granted",
            "granted",
            "2024-03-01",
            "ERN-LUNG-2024-01",
        ])
        .unwrap();
    }
    let text = String::from_utf8(out.into_inner().unwrap()).unwrap();
    (text, identifiers)
}

/// Fails the test if `haystack` contains one of `identifiers`: every run of 9 digits is
/// looked up among the BSNs, and every family name is searched for.
fn assert_no_identifier(what: &str, haystack: &str, identifiers: &HashSet<String>) {
    let bytes = haystack.as_bytes();
    for start in 0..bytes.len().saturating_sub(8) {
        let window = &haystack[start..start + 9];
        if window.bytes().all(|b| b.is_ascii_digit()) && identifiers.contains(window) {
            panic!("{what} contains an identifier");
        }
    }
    assert!(
        !haystack.contains("Zyxwquist"),
        "{what} contains a family name"
    );
}

/// Waits until the result file records at least `n` accepted lines (the upload still
/// running).
async fn accepted_at_least(path: &Path, n: usize, child: &mut std::process::Child) {
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the upload ended ({status}) before {n} lines were accepted");
        }
        let accepted = std::fs::read_to_string(path)
            .map(|t| t.matches(",accepted,").count())
            .unwrap_or(0);
        if accepted >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_file_of_ten_thousand_lines_is_checked_sent_interrupted_and_resumed() {
    // A derivation limit the upload cannot finish within: after the burst of 600, ten a
    // second. The test kills it once 650 lines are accepted: after it has been rate
    // limited and resumed on its own.
    let mut app = TestApp::spawn_with(ServeArgs {
        derivations_per_minute: 600,
        ..ServeArgs::default()
    })
    .await;
    app.centre("NL-UPL", "NL", &["ERN-LUNG"]).await;
    let key = app
        .principal("dr-upload", Role::Physician, Some("NL-UPL"), &[])
        .await;
    let work = tempfile::tempdir().unwrap();
    let input = work.path().join("cases.csv");
    let results = work.path().join("cases.results.csv");
    let (csv_text, identifiers) = mixed_csv();
    std::fs::write(&input, &csv_text).unwrap();
    let identifiers: HashSet<String> = identifiers.into_iter().collect();
    let valid = (0..LINES).filter(|&i| is_valid(i)).count();
    let invalid = LINES - valid;
    assert_eq!(invalid, 2201);
    let mut outputs = String::new();

    // 1. Invalid lines: all reported, with line and field; nothing sent.
    let mut command = upload(&app, Some(&key));
    command.arg(&input).args(["--registry", "ERN-LUNG"]);
    let first = run(command).await;
    assert!(!first.status.success());
    let said = text(&first);
    outputs.push_str(&said);
    let reported: Vec<&str> = said.lines().filter(|l| l.starts_with("line ")).collect();
    assert_eq!(reported.len(), invalid, "one violation per invalid line");
    assert!(said.contains("line 5: record.diagnosis.orphacode: "));
    assert!(said.contains("line 9: patient.national.value: "));
    assert!(said.contains("line 13: record.sex: one of female, male"));
    assert!(said.contains(&format!(
        "line {}: client_reference: already used on line 2",
        LINES - 5 + 2
    )));
    assert!(said.contains("nothing was sent"));
    assert_eq!(app.count("cases").await, 0);

    // 2. --send-valid, interrupted (SIGINT, as Ctrl-C) once 650 lines are accepted: it
    // stops sending, records the answers to what it sent and exits. Every case stored is
    // in the result file.
    let accepted_rows = |results: &Path| -> HashSet<String> {
        rows(results)
            .into_iter()
            .filter(|r| r[2] == "accepted")
            .map(|r| {
                assert!(r[3].starts_with('R'), "an accepted row has its pseudonym");
                r[1].clone()
            })
            .collect()
    };
    let send_valid_logged = |name: &str| {
        let log = std::fs::File::create(work.path().join(name)).unwrap();
        let mut command = upload(&app, Some(&key));
        command
            .arg(&input)
            .args(["--registry", "ERN-LUNG", "--send-valid"])
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        command.spawn().unwrap()
    };
    let mut child = send_valid_logged("run2.log");
    accepted_at_least(&results, 650, &mut child).await;
    let interrupt = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(interrupt.success());
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert!(!status.success());
    let said = std::fs::read_to_string(work.path().join("run2.log")).unwrap();
    assert!(
        said.contains("interrupted: every acknowledged line is in"),
        "{said}"
    );
    outputs.push_str(&said);
    let interrupted_at = accepted_rows(&results);
    assert!(interrupted_at.len() >= 650 && interrupted_at.len() < valid);
    let found_there = rows(&results)
        .iter()
        .filter(|r| r[2] == "already_exists")
        .count();
    assert_eq!(
        app.count("cases").await as usize,
        interrupted_at.len() + found_there
    );

    // 2b. Resumed, and killed (SIGKILL) once 50 more lines are accepted: everything
    // acknowledged is in the result file and stored.
    let mut child = send_valid_logged("run2b.log");
    accepted_at_least(&results, interrupted_at.len() + 50, &mut child).await;
    child.kill().unwrap();
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert!(!status.success());
    outputs.push_str(&std::fs::read_to_string(work.path().join("run2b.log")).unwrap());
    let acknowledged = accepted_rows(&results);
    assert!(interrupted_at.is_subset(&acknowledged));
    assert!(acknowledged.len() < valid);
    let done: HashSet<String> = rows(&results)
        .into_iter()
        .filter(|r| r[2] == "accepted" || r[2] == "already_exists")
        .map(|r| r[1].clone())
        .collect();
    assert!(app.count("cases").await as usize >= done.len());

    // 3. The server restarts (without the limit); the same command resumes.
    app.stop_server().await;
    let dir = std::mem::replace(&mut app.dir, tempfile::tempdir().unwrap());
    let url = app.database_url.clone();
    drop(app);
    let app = TestApp::spawn_on_with(
        ServeArgs {
            derivations_per_minute: 1_000_000,
            ..ServeArgs::default()
        },
        dir,
        url,
    )
    .await;
    let mut command = upload(&app, Some(&key));
    command
        .arg(&input)
        .args(["--registry", "ERN-LUNG", "--send-valid"]);
    let third = run(command).await;
    let said = text(&third);
    outputs.push_str(&said);
    // Not a success: the invalid lines are still there.
    assert!(!third.status.success(), "{said}");
    assert!(
        said.contains(&format!(
            "rejected 0, invalid {invalid}, done earlier {}, not sent 0",
            done.len()
        )),
        "{said}"
    );
    assert_eq!(app.count("cases").await as usize, valid);

    // One row per line, in order: every valid line done, every invalid one explained.
    let final_rows = rows(&results);
    assert_eq!(final_rows.len(), LINES);
    for (i, row) in final_rows.iter().enumerate() {
        assert_eq!(row[0], (i + 2).to_string());
        if is_valid(i) {
            assert!(
                row[2] == "accepted" || row[2] == "already_exists",
                "line {}: {}",
                row[0],
                row[2]
            );
            assert_eq!(row[1], format!("ref-{i}"));
            if row[2] == "accepted" {
                assert!(row[3].starts_with('R'));
            }
        } else {
            assert_eq!(row[2], "invalid");
            assert!(row[3].is_empty());
            let field = match kind(i) {
                Kind::BadOrphacode => "record.diagnosis.orphacode: ",
                Kind::BadBsn => "patient.national.value: ",
                Kind::BadSex => "record.sex: ",
                _ => "client_reference: ",
            };
            assert!(row[4].starts_with(field), "{}", row[4]);
        }
    }
    // Rows acknowledged before the kill kept their pseudonyms.
    let accepted_refs: HashSet<String> = final_rows
        .iter()
        .filter(|r| r[2] == "accepted")
        .map(|r| r[1].clone())
        .collect();
    assert!(acknowledged.is_subset(&accepted_refs));

    // 4. Once more: nothing left to send.
    let mut command = upload(&app, Some(&key));
    command
        .arg(&input)
        .args(["--registry", "ERN-LUNG", "--send-valid"]);
    let fourth = run(command).await;
    let said = text(&fourth);
    outputs.push_str(&said);
    assert!(
        said.contains(&format!(
            "accepted 0, already in the registry 0, rejected 0, invalid {invalid}, done earlier {valid}"
        )),
        "{said}"
    );
    assert_eq!(app.count("cases").await as usize, valid);

    // No identifier in the terminal output, the tool's log, the result file or the
    // server's log.
    assert_no_identifier("the terminal output", &outputs, &identifiers);
    assert_no_identifier(
        "the result file",
        &std::fs::read_to_string(&results).unwrap(),
        &identifiers,
    );
    assert!(!logs().contains("Zyxwquist"), "the server log");
    app.stop().await;
}

/// A physician of a new centre `centre` (in ERN-LUNG) and a temporary working directory
/// holding its API key in the file `api-key`.
async fn physician_with_key_file(
    app: &TestApp,
    centre: &str,
    name: &str,
) -> (tempfile::TempDir, std::path::PathBuf) {
    app.centre(centre, "NL", &["ERN-LUNG"]).await;
    let key = app
        .principal(name, Role::Physician, Some(centre), &[])
        .await;
    let work = tempfile::tempdir().unwrap();
    let key_file = work.path().join("api-key");
    std::fs::write(&key_file, format!("{key}\n")).unwrap();
    (work, key_file)
}

/// A JSON line of a valid submission to ERN-LUNG for the national identifier `value` of
/// `country`, with `reference`.
fn json_line(country: &str, value: &str, reference: &str) -> String {
    format!(
        r#"{{"registry":"ERN-LUNG","patient":{{"national":{{"issuingCountry":"{country}","value":"{value}"}}}},"record":{{"birthYearMonth":"2015-06","sex":"SEX_FEMALE","status":"PATIENT_STATUS_ALIVE","onsetKind":"ONSET_KIND_UNKNOWN","diagnosis":{{"orphacode":"ORPHA:586"}},"diagnosisDate":"2016","hpoTerms":["HP:0006528"]}},"consent":[{{"scope":"CONSENT_SCOPE_REGISTRY_INCLUSION","state":"CONSENT_STATE_GRANTED","givenAt":"2024-03-01T10:00:00Z","formVersion":"F-1"}}],"clientReference":"{reference}"}}"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_template_and_json_lines_upload_with_a_key_file() {
    let app = TestApp::spawn().await;
    let (work, key_file) = physician_with_key_file(&app, "NL-TPL", "dr-template").await;

    // The template: a header and an example row that the server accepts.
    let mut command = upload(&app, None);
    command.arg("--template");
    let template = run(command).await;
    assert!(template.status.success());
    let template_csv = work.path().join("template.csv");
    std::fs::write(&template_csv, &template.stdout).unwrap();
    assert_eq!(String::from_utf8_lossy(&template.stdout).lines().count(), 2);
    let mut command = upload(&app, None);
    command
        .arg(&template_csv)
        .args(["--registry", "ERN-LUNG", "--api-key-file"])
        .arg(&key_file);
    let sent = run(command).await;
    assert!(sent.status.success(), "{}", text(&sent));
    let template_rows = rows(&work.path().join("template.results.csv"));
    assert_eq!(template_rows.len(), 1);
    assert_eq!(template_rows[0][1], "case-0001");
    assert_eq!(template_rows[0][2], "accepted");

    // JSON Lines in the proto JSON form: the template's patient again (ALREADY_EXISTS
    // counts as done), a new one, a blank line, a line that is not JSON.
    let line = |value: &str, reference: &str| json_line("XT", value, reference);
    let jsonl = work.path().join("cases.jsonl");
    std::fs::write(
        &jsonl,
        format!(
            "{}\n{}\n\n{{\"patient\": SYN000000003}}\n",
            line("SYN900000001", "j-1"),
            line("SYN000000002", "j-2")
        ),
    )
    .unwrap();
    // --check: the same report, nothing sent, no result file.
    let mut command = upload(&app, None);
    command.arg(&jsonl).arg("--check");
    let checked = run(command).await;
    assert!(!checked.status.success());
    assert!(text(&checked).contains("line 4: (line): not a SubmitCaseRequest"));
    assert!(!work.path().join("cases.jsonl.results.csv").exists());

    let mut command = upload(&app, None);
    command.arg(&jsonl).arg("--api-key-file").arg(&key_file);
    let refused = run(command).await;
    assert!(!refused.status.success());
    let said = text(&refused);
    assert!(
        said.contains("line 4: (line): not a SubmitCaseRequest"),
        "{said}"
    );
    assert!(!said.contains("SYN000000003"));
    assert_eq!(app.count("cases").await, 1);

    let mut command = upload(&app, None);
    command
        .arg(&jsonl)
        .arg("--send-valid")
        .arg("--api-key-file")
        .arg(&key_file);
    let sent = run(command).await;
    let said = text(&sent);
    assert!(!sent.status.success(), "the invalid line is still reported");
    assert!(said.contains("accepted 1, already in the registry 1, rejected 0, invalid 1"));
    let result_rows = rows(&work.path().join("cases.jsonl.results.csv"));
    // The case already on file is named, as the template run's row named it.
    assert_eq!(result_rows[0][3], template_rows[0][3]);
    assert!(!result_rows[0][3].is_empty());
    let outcomes: Vec<(String, String)> = result_rows
        .into_iter()
        .map(|r| (r[0].clone(), r[2].clone()))
        .collect();
    assert_eq!(
        outcomes,
        [
            ("1".to_owned(), "already_exists".to_owned()),
            ("2".to_owned(), "accepted".to_owned()),
            ("4".to_owned(), "invalid".to_owned()),
        ]
    );
    for output in [&refused, &sent] {
        for id in ["SYN900000001", "SYN000000002", "SYN000000003"] {
            assert!(!text(output).contains(id));
        }
    }
    app.stop().await;
}

/// A line is done for a re-run only at its own line number: a reference recorded done
/// and since given to another patient's line (the stored line renamed, its duplicate
/// kept) is sent again, and stored. A reference refused for holding the patient's
/// identifier (leading zeros of a BSN ignored) is not written to the result file.
/// (Both from a defences audit of 2026-12-07.)
#[tokio::test]
async fn a_reference_renamed_is_no_other_lines_and_one_with_the_identifier_is_not_written() {
    let app = TestApp::spawn().await;
    let (work, key_file) = physician_with_key_file(&app, "NL-REN", "dr-rename").await;
    let line = json_line;
    let jsonl = work.path().join("cases.jsonl");
    let send = || {
        let mut command = upload(&app, None);
        command
            .arg(&jsonl)
            .arg("--send-valid")
            .arg("--api-key-file")
            .arg(&key_file);
        command
    };
    let results = work.path().join("cases.jsonl.results.csv");
    // Patient A as c-1; patient B with the same reference (invalid: a reference used
    // twice); references holding the identifier, one without the BSN's leading zero.
    std::fs::write(
        &jsonl,
        [
            line("XT", "SYN900000021", "c-1"),
            line("XT", "SYN900000022", "c-1"),
            line("XT", "SYN900000023", "ref-syn900000023"),
            line("NL", "012345672", "pat-12345672"),
        ]
        .join("\n"),
    )
    .unwrap();
    let first = run(send()).await;
    assert!(
        text(&first).contains("accepted 1, already in the registry 0, rejected 0, invalid 3"),
        "{}",
        text(&first)
    );
    let written = std::fs::read_to_string(&results).unwrap();
    for identifier in ["900000023", "12345672"] {
        assert!(!written.contains(identifier), "{written}");
        assert!(!text(&first).contains(identifier));
    }
    let references: Vec<String> = rows(&results).into_iter().map(|r| r[1].clone()).collect();
    assert_eq!(references, ["c-1", "", "", ""]);
    assert_eq!(app.count("cases").await, 1);

    // The stored line renamed, patient B's line keeping c-1: B is sent and stored, A is
    // already there.
    std::fs::write(
        &jsonl,
        [
            line("XT", "SYN900000021", "c-1a"),
            line("XT", "SYN900000022", "c-1"),
        ]
        .join("\n"),
    )
    .unwrap();
    let second = run(send()).await;
    assert!(second.status.success(), "{}", text(&second));
    assert!(
        text(&second).contains("accepted 1, already in the registry 1"),
        "{}",
        text(&second)
    );
    assert_eq!(app.count("cases").await, 2);
    // Run again: both lines done, nothing sent.
    let third = run(send()).await;
    assert!(text(&third).contains("done earlier 2"), "{}", text(&third));

    // Lines without references are known by their numbers alone: a patient added at the
    // top is sent, not taken for the line that was there (a re-check of 2026-12-07).
    let unreferenced = |value: &str| line("XT", value, "").replace(r#","clientReference":"""#, "");
    std::fs::write(
        &jsonl,
        [unreferenced("SYN900000031"), unreferenced("SYN900000032")].join("\n"),
    )
    .unwrap();
    std::fs::remove_file(&results).unwrap();
    let fourth = run(send()).await;
    assert!(text(&fourth).contains("accepted 2"), "{}", text(&fourth));
    std::fs::write(
        &jsonl,
        [
            unreferenced("SYN900000033"),
            unreferenced("SYN900000031"),
            unreferenced("SYN900000032"),
        ]
        .join("\n"),
    )
    .unwrap();
    let fifth = run(send()).await;
    assert!(
        text(&fifth).contains("accepted 1, already in the registry 2"),
        "{}",
        text(&fifth)
    );
    assert_eq!(app.count("cases").await, 5);

    // A line naming a patient both ways (refused: no patient read) keeps its reference out.
    let both = line("XT", "SYN900000034", "bsn-900000034").replace(
        r#""patient":{"#,
        r#""patient":{"demographic":{"givenNames":"Jan","familyName":"Pietersma","dateOfBirth":"1980-01-01","sexAtBirth":"SEX_MALE","placeOfBirth":"Utrecht","countryOfBirth":"NL"},"#,
    );
    std::fs::write(&jsonl, both).unwrap();
    let sixth = run(send()).await;
    assert!(!sixth.status.success());
    let written = std::fs::read_to_string(&results).unwrap();
    assert!(!written.contains("900000034"), "{written}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_over_mutual_tls_with_a_client_certificate() {
    let pki = crate::tls::Pki::new();
    let app = TestApp::spawn_with(pki.args(true)).await;
    app.centre("NL-MTLS", "NL", &["ERN-LUNG"]).await;
    let key = app
        .principal("dr-mtls", Role::Physician, Some("NL-MTLS"), &[])
        .await;
    let work = tempfile::tempdir().unwrap();
    let (cert, cert_key) = pki.client("dr-mtls");
    std::fs::write(work.path().join("client.pem"), cert).unwrap();
    std::fs::write(work.path().join("client.key"), cert_key).unwrap();
    let input = work.path().join("t.csv");
    std::fs::write(&input, ern_registry::upload::template::template()).unwrap();
    let https = format!("https://localhost:{}", app.addr.port());

    // Without a client certificate the server refuses the connection.
    let mut command = upload_to(&https, Some(&key));
    command
        .arg(&input)
        .args(["--registry", "ERN-LUNG", "--max-retries", "0"])
        .arg("--ca-cert")
        .arg(&pki.ca);
    let refused = run(command).await;
    assert!(!refused.status.success());
    assert!(
        text(&refused).contains("1 lines are still to send"),
        "{}",
        text(&refused)
    );
    assert_eq!(app.count("cases").await, 0);

    let mut command = upload_to(&https, Some(&key));
    command
        .arg(&input)
        .args(["--registry", "ERN-LUNG"])
        .arg("--ca-cert")
        .arg(&pki.ca)
        .arg("--client-cert")
        .arg(work.path().join("client.pem"))
        .arg("--client-key")
        .arg(work.path().join("client.key"));
    let sent = run(command).await;
    assert!(sent.status.success(), "{}", text(&sent));
    assert_eq!(app.count("cases").await, 1);
    app.stop().await;
}

#[tokio::test]
async fn the_api_key_is_never_a_flag() {
    let app = TestApp::spawn().await;
    let work = tempfile::tempdir().unwrap();
    let input: PathBuf = work.path().join("t.csv");
    std::fs::write(&input, ern_registry::upload::template::template()).unwrap();
    let mut command = upload(&app, None);
    command.arg(&input).args(["--registry", "ERN-LUNG"]);
    let output = run(command).await;
    assert!(!output.status.success());
    assert!(text(&output).contains("no API key: set ERN_API_KEY or pass --api-key-file"));
    let mut command = upload(&app, None);
    command
        .arg(&input)
        .args(["--registry", "ERN-LUNG", "--api-key", "ern_x.y"]);
    let output = run(command).await;
    assert!(!output.status.success());
    assert!(text(&output).contains("unexpected argument '--api-key'"));
    app.stop().await;
}
