//! `ern-registry upload`: a physician's bulk upload of existing cases, a thin client of
//! `CaseService.SubmitCases`.
//!
//! The file (the CSV template of [`template`], JSON Lines of `SubmitCaseRequest` in the
//! proto JSON form, [`jsonl`], or JSON Lines of `SubmitPhenopacketRequest`, each
//! phenopacket mapped to its record with `api::case::parse_phenopacket`) is read and every line checked first, with the server's
//! own check of a submission (`api::case::parse_submission`) plus what only a whole file
//! shows (a client reference used twice, one that contains the identifier). Every
//! problem is reported with its line and field before anything is sent; with
//! `--send-valid` the valid lines go anyway. The lines then stream through one
//! SubmitCases call, and each acknowledgement is appended to the result file
//! ([`results`]) as it arrives: that file is the journal a re-run resumes from (lines
//! whose number and client reference it records together as accepted or already
//! existing are skipped, and
//! ALREADY_EXISTS from the server counts as done), so an interrupted run (Ctrl-C, a
//! kill, a lost connection) loses nothing the server acknowledged. Rate limiting and an
//! unavailable server pause the stream and resume it with backoff.
//!
//! Identifiers never leave the request messages: the terminal, the log and the result
//! file carry line numbers, client references, pseudonyms, status codes and the checks'
//! field paths and descriptions (which never echo a value). The API key is read from
//! `ERN_API_KEY` or a file, never from the command line (where `ps` would show it).

pub mod jsonl;
pub mod results;
pub mod template;

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::config::{UploadArgs, UploadFormat};
use crate::domain::{FieldViolations, RegistryCode};
use crate::proto::{self, case_service_client::CaseServiceClient};
use results::{Journal, Outcome, Row};

pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// Submissions of one stream sent and not yet answered, at most (the server works on 64
/// at a time).
const WINDOW: usize = 256;

/// The environment variable holding the API key.
pub const API_KEY_ENV: &str = "ERN_API_KEY";

/// One line of the input, read and checked.
pub struct Line {
    /// 1-based line number in the file.
    pub number: u64,
    pub client_reference: String,
    /// The request to send; `None` when the line could not be read at all.
    pub request: Option<proto::SubmitCaseRequest>,
    /// Everything wrong with the line (empty: valid).
    pub violations: FieldViolations,
    /// For a phenopacket, where each field of the record came from: the server's
    /// violations of the record are reported at the phenopacket's elements.
    pub paths: Option<crate::api::phenopacket::Mapped>,
}

/// Checks a request read from line `number`, after the violations found reading it
/// (`read`): the registry, then the server's check of a submission, then that the client
/// reference does not contain the patient's identifier. An empty client reference
/// becomes `line:N`.
pub fn check(
    request: &mut proto::SubmitCaseRequest,
    number: u64,
    read: FieldViolations,
    now: DateTime<Utc>,
) -> FieldViolations {
    if request.client_reference.is_empty() {
        request.client_reference = format!("line:{number}");
    }
    let mut violations = read;
    let already: Vec<String> = violations.iter().map(|v| v.field.clone()).collect();
    if request.registry.is_empty() {
        violations.push("registry", "is required (give --registry)");
    } else {
        violations.check("registry", RegistryCode::parse(&request.registry));
    }
    if let Err(found) = crate::api::case::parse_submission(request, now) {
        // A cell that could not be read was reported as such; its field is then empty or
        // unspecified, which the check would report again.
        violations.extend(found.retain(|v| !already.contains(&v.field)));
    }
    if reference_contains_identifier(request) {
        violations.push(
            "client_reference",
            "must not contain the patient's identifier or name",
        );
    }
    violations
}

/// What a client reference must not contain, as compared ([`plain`]): the national
/// identifier (leading zeros too: a BSN of 012345672 is the one of 12345672), or the whole
/// family name and each of its words of 4 characters or more ("vries" of "de Vries"; the
/// particles van, der, ten are shorter), with diacritics dropped ("muller", "moller") and
/// spelt out ("mueller", "moeller", "gross" of "Groß"). Only needles of 3 characters or
/// more; none for a line that names no patient.
fn identifier_needles(request: &proto::SubmitCaseRequest) -> Vec<String> {
    use proto::patient_identifiers::Kind;
    use unicode_normalization::UnicodeNormalization;
    let needles = match request.patient.as_ref().and_then(|p| p.kind.as_ref()) {
        Some(Kind::National(n)) => vec![plain(&n.value).trim_start_matches('0').to_owned()],
        Some(Kind::Demographic(d)) => {
            // Composed first, so that a name sent decomposed is spelt out the same way.
            let name: String = d.family_name.nfc().collect();
            let words = name
                .split(|c: char| !c.is_alphanumeric())
                .filter(|w| w.chars().count() >= 4);
            std::iter::once(name.as_str())
                .chain(words)
                .flat_map(|word| {
                    [
                        plain(&transliterated(word, false)),
                        plain(&transliterated(word, true)),
                    ]
                })
                .collect()
        }
        None => Vec::new(),
    };
    needles
        .into_iter()
        .filter(|needle| needle.chars().count() >= 3)
        .collect()
}

/// Letters NFKD does not take apart, written with plain letters: without their strokes
/// (ø → o, æ → ae, ß → ss), or with umlauts and strokes spelt out (`spell_out`: ü → ue,
/// ø → oe). Umlauts not spelt out are left to NFKD, which drops their marks.
fn transliterated(s: &str, spell_out: bool) -> String {
    s.chars()
        .map(|c| match c {
            'ä' | 'Ä' if spell_out => "ae".into(),
            'ö' | 'Ö' if spell_out => "oe".into(),
            'ü' | 'Ü' if spell_out => "ue".into(),
            'ø' | 'Ø' if spell_out => "oe".into(),
            'ø' | 'Ø' => "o".into(),
            'æ' | 'Æ' => "ae".into(),
            'œ' | 'Œ' => "oe".into(),
            'ł' | 'Ł' => "l".into(),
            'đ' | 'Đ' => "d".into(),
            'ß' | 'ẞ' => "ss".into(),
            c => c.to_string(),
        })
        .collect()
}

/// A text as references and identifiers are compared: compatibility forms taken apart
/// (NFKD: full-width digits, diacritics as marks), only letters and digits, lower case.
fn plain(s: &str) -> String {
    use unicode_normalization::UnicodeNormalization;
    s.nfkd()
        .filter(|c| c.is_alphanumeric())
        .flat_map(char::to_lowercase)
        .collect()
}

/// Whether the client reference contains the patient's identifier ([`identifier_needles`]):
/// references are echoed in results and logs, identifiers never.
fn reference_contains_identifier(request: &proto::SubmitCaseRequest) -> bool {
    let reference = plain(&request.client_reference);
    identifier_needles(request)
        .iter()
        .any(|needle| reference.contains(needle.as_str()))
}

/// Whether a line's client reference may be written: it was checked against an identifier
/// of the line's patient (an empty one, as an identifier typed into another column leaves,
/// checks nothing) and nothing was found wrong with it.
fn reference_is_checked(line: &Line) -> bool {
    let checked = line
        .request
        .as_ref()
        .is_some_and(|r| !identifier_needles(r).is_empty());
    checked
        && !line
            .violations
            .iter()
            .any(|v| v.field == "client_reference")
}

/// Reads and checks every line of `text` in `format` (`registry` for the lines that name
/// none). A client reference used by an earlier line is a violation of the later one.
pub fn read_lines(
    text: &str,
    format: UploadFormat,
    registry: Option<&str>,
    now: DateTime<Utc>,
) -> Result<Vec<Line>, Error> {
    let mut lines = Vec::new();
    match format {
        UploadFormat::Jsonl => {
            for (at, raw) in text.lines().enumerate() {
                let number = at as u64 + 1;
                if raw.trim().is_empty() {
                    continue;
                }
                lines.push(match jsonl::parse_line(raw) {
                    Ok(mut request) => {
                        if request.registry.is_empty() {
                            request.registry = registry.unwrap_or_default().to_owned();
                        }
                        let violations = check(&mut request, number, FieldViolations::new(), now);
                        Line {
                            number,
                            client_reference: request.client_reference.clone(),
                            request: Some(request),
                            violations,
                            paths: None,
                        }
                    }
                    Err(message) => unreadable(number, message),
                });
            }
        }
        UploadFormat::Phenopackets => {
            for (at, raw) in text.lines().enumerate() {
                let number = at as u64 + 1;
                if raw.trim().is_empty() {
                    continue;
                }
                lines.push(match jsonl::parse_phenopacket_line(raw) {
                    Ok(request) => phenopacket_line(request, number, registry, now),
                    Err(message) => unreadable(number, message),
                });
            }
        }
        UploadFormat::Csv => {
            let registry = registry.ok_or("a CSV file needs --registry (or ERN_REGISTRY)")?;
            let mut reader = csv::ReaderBuilder::new()
                .has_headers(true)
                .from_reader(text.as_bytes());
            let header = template::Header::parse(
                reader
                    .headers()
                    .map_err(|_| "the first line is not a CSV header")?,
            )?;
            let mut numbers = LineNumbers::of(text);
            for record in reader.records() {
                match record {
                    Ok(row) => {
                        let number = row.position().map_or(0, |p| numbers.line_at(p.byte()));
                        let (mut request, read) = template::parse_row(&header, &row, registry);
                        let violations = check(&mut request, number, read, now);
                        lines.push(Line {
                            number,
                            client_reference: request.client_reference.clone(),
                            request: Some(request),
                            violations,
                            paths: None,
                        });
                    }
                    Err(err) => {
                        let number = err.position().map_or(0, |p| numbers.line_at(p.byte()));
                        let message = match err.kind() {
                            csv::ErrorKind::UnequalLengths {
                                expected_len, len, ..
                            } => format!("the row has {len} cells, the header {expected_len}"),
                            csv::ErrorKind::Utf8 { .. } => "not valid UTF-8".to_owned(),
                            _ => "cannot be read as CSV".to_owned(),
                        };
                        lines.push(unreadable(number, message));
                    }
                }
            }
        }
    }
    let mut first_use: HashMap<String, u64> = HashMap::new();
    for line in &mut lines {
        if line.client_reference.is_empty() {
            continue;
        }
        if let Some(first) = first_use.get(&line.client_reference) {
            line.violations
                .push("client_reference", format!("already used on line {first}"));
        } else {
            first_use.insert(line.client_reference.clone(), line.number);
        }
    }
    Ok(lines)
}

/// The file's text; refused when it is not UTF-8, naming the first line that is not (the
/// whole file is refused: its lines are numbered and checked together, and a file in
/// another encoding, Latin-1 from an old spreadsheet, has such bytes on many lines).
fn utf8_text(bytes: Vec<u8>) -> Result<String, String> {
    String::from_utf8(bytes).map_err(|e| {
        let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        let line = LineNumbers::of(std::str::from_utf8(valid).unwrap_or_default())
            .line_at(valid.len() as u64);
        format!(
            "line {line} is not valid UTF-8 (byte {} of the file): save the file as UTF-8 \
             and run the upload again; nothing was sent",
            valid.len() + 1
        )
    })
}

/// The 1-based line, as an editor numbers it, of the CSV record that starts at `byte`:
/// LF, CRLF and a lone CR (old Mac files, Excel's "CSV (Macintosh)") each end a line, as
/// they end a record for the csv crate. Its own line number counts LF only, and is one
/// short after a CRLF (it counts the LF only as it starts the next record) and after the
/// blank lines it skips; the record's byte offset may point at that LF or those lines, so
/// they are stepped over first.
struct LineNumbers<'a> {
    bytes: &'a [u8],
    /// Where the last record started (after the line ends stepped over), and the line
    /// ends before it: a record's line is counted on from the one before, so numbering a
    /// file is linear in its size (it counted from the file's start for every record: a
    /// defences audit of 2026-12-07 measured 22 s for 20,000 lines, 4.2 MB).
    at: usize,
    ends: u64,
}

impl<'a> LineNumbers<'a> {
    fn of(text: &'a str) -> LineNumbers<'a> {
        LineNumbers {
            bytes: text.as_bytes(),
            at: 0,
            ends: 0,
        }
    }

    fn line_at(&mut self, byte: u64) -> u64 {
        let bytes = self.bytes;
        let mut at = usize::try_from(byte).unwrap_or(usize::MAX).min(bytes.len());
        while at < bytes.len() && matches!(bytes[at], b'\r' | b'\n') {
            at += 1;
        }
        if at < self.at {
            // Not after the last one (the reader's records come in order): from the start.
            self.at = 0;
            self.ends = 0;
        }
        // `at` is at a byte that ends no line (or the end), so a CR just before it is a
        // lone one, and a CRLF is never split between two counts.
        let from = self.at;
        self.ends += bytes[from..at]
            .iter()
            .enumerate()
            .filter(|&(i, &b)| {
                b == b'\n' || (b == b'\r' && bytes.get(from + i + 1) != Some(&b'\n'))
            })
            .count() as u64;
        self.at = at;
        1 + self.ends
    }
}

/// A line of a phenopacket file: the phenopacket mapped to the record (with the server's
/// own mapping and checks, violations by JSON path), sent as the `SubmitCaseRequest` it
/// amounts to.
fn phenopacket_line(
    mut given: proto::SubmitPhenopacketRequest,
    number: u64,
    registry: Option<&str>,
    now: DateTime<Utc>,
) -> Line {
    let mut read = FieldViolations::new();
    let paths = crate::api::case::parse_phenopacket(&given.phenopacket, now, &mut read)
        .map(|(_, mapped)| mapped);
    let record = paths.as_ref().map(|mapped| mapped.record.clone());
    let unmapped = record.is_none();
    let mut request = proto::SubmitCaseRequest {
        registry: if given.registry.is_empty() {
            registry.unwrap_or_default().to_owned()
        } else {
            std::mem::take(&mut given.registry)
        },
        patient: given.patient.take(),
        record,
        consent: std::mem::take(&mut given.consent),
        client_reference: std::mem::take(&mut given.client_reference),
    };
    let mut violations = check(&mut request, number, read, now);
    if unmapped {
        // The phenopacket's violations stand for the record's.
        violations = violations.retain(|v| !v.field.starts_with("record"));
    }
    Line {
        number,
        client_reference: request.client_reference.clone(),
        request: Some(request),
        violations,
        paths,
    }
}

fn unreadable(number: u64, message: String) -> Line {
    let mut violations = FieldViolations::new();
    violations.push("(line)", message);
    Line {
        number,
        client_reference: String::new(),
        request: None,
        violations,
        paths: None,
    }
}

/// `field: description; ...` of a line's violations, and how many more were not listed.
fn describe(violations: &FieldViolations) -> String {
    violations
        .iter()
        .map(|v| format!("{}: {}", v.field, v.description))
        .chain(violations.omitted().map(not_listed))
        .collect::<Vec<_>>()
        .join("; ")
}

/// `field: and N more, not listed`, for the violations past those a line lists.
fn not_listed((field, omitted): (&str, usize)) -> String {
    format!(
        "{field}: and {omitted} more from here on, not listed (at most {} are)",
        crate::domain::MAX_LISTED_VIOLATIONS
    )
}

/// The canonical name of a gRPC status code (`FAILED_PRECONDITION`).
fn code_name(code: i32) -> String {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    usize::try_from(code)
        .ok()
        .and_then(|i| NAMES.get(i))
        .map_or_else(|| format!("code {code}"), |name| (*name).to_owned())
}

/// The result file's default path: the input's, with `.results.csv` for its extension.
/// `cases.csv` gives `cases.results.csv`; any other extension is kept (`cases.jsonl`
/// gives `cases.jsonl.results.csv`), so that files of the same name in two formats do not
/// share one journal.
pub fn default_results_path(input: &Path) -> PathBuf {
    match input.extension().and_then(|e| e.to_str()) {
        None | Some("csv") => input.with_extension("results.csv"),
        Some(extension) => input.with_extension(format!("{extension}.results.csv")),
    }
}

/// The format of `path` when not given: JSON Lines for `.jsonl`/`.ndjson`, else CSV.
pub fn format_of(path: &Path) -> UploadFormat {
    match path.extension().and_then(|e| e.to_str()) {
        Some("jsonl" | "ndjson") => UploadFormat::Jsonl,
        _ => UploadFormat::Csv,
    }
}

/// Reads the API key: `ERN_API_KEY`, or the first line of `file`.
fn api_key(file: Option<&Path>) -> Result<SecretString, Error> {
    let key = match file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read the API key file {}: {e}", path.display()))?;
            text.lines().next().unwrap_or("").trim().to_owned()
        }
        None => std::env::var(API_KEY_ENV)
            .unwrap_or_default()
            .trim()
            .to_owned(),
    };
    if key.is_empty() {
        return Err(format!(
            "no API key: set {API_KEY_ENV} or pass --api-key-file (never the key itself on the command line)"
        )
        .into());
    }
    Ok(SecretString::from(key))
}

async fn channel(args: &UploadArgs) -> Result<Channel, Error> {
    let mut endpoint = Endpoint::from_shared(args.server.clone())
        .map_err(|_| "--server is not a URL such as http://127.0.0.1:50051")?
        .connect_timeout(Duration::from_secs(10));
    let tls = args.server.starts_with("https://");
    if tls {
        let ca = args
            .ca_cert
            .as_ref()
            .ok_or("an https server needs --ca-cert (the CA that signed its certificate)")?;
        let read =
            |p: &PathBuf| std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()));
        let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca)?));
        if let (Some(cert), Some(key)) = (&args.client_cert, &args.client_key) {
            config = config.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        endpoint = endpoint.tls_config(config)?;
    } else if args.client_cert.is_some() || args.ca_cert.is_some() {
        return Err("TLS options need an https:// server".into());
    }
    Ok(endpoint.connect_lazy())
}

/// Progress on the terminal: lines done of those to send, rate, time left.
struct Progress {
    total: usize,
    done: usize,
    started: Instant,
    drawn: Instant,
    tty: bool,
}

impl Progress {
    fn new(total: usize) -> Progress {
        let now = Instant::now();
        Progress {
            total,
            done: 0,
            started: now,
            drawn: now,
            tty: std::io::stderr().is_terminal(),
        }
    }

    fn advance(&mut self) {
        self.done += 1;
        let every = if self.tty {
            Duration::from_millis(200)
        } else {
            Duration::from_secs(5)
        };
        if self.drawn.elapsed() >= every {
            self.draw();
        }
    }

    fn draw(&mut self) {
        self.drawn = Instant::now();
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        let rate = self.done as f64 / secs;
        let left = self.total.saturating_sub(self.done);
        let eta = if rate > 0.0 {
            format!("{:.0} s", left as f64 / rate)
        } else {
            "?".to_owned()
        };
        let bar_width = 30;
        let filled = (self.done * bar_width)
            .checked_div(self.total)
            .unwrap_or(bar_width);
        let line = format!(
            "[{}{}] {}/{} lines  {:.0}/s  ETA {}",
            "#".repeat(filled),
            "-".repeat(bar_width - filled),
            self.done,
            self.total,
            rate,
            eta
        );
        if self.tty {
            eprint!("\r{line}\x1b[K");
        } else {
            eprintln!("{line}");
        }
    }

    fn finish(&mut self) {
        self.draw();
        if self.tty {
            eprintln!();
        }
    }
}

/// Counts of this run, for the summary.
#[derive(Default)]
struct Tally {
    accepted: usize,
    already: usize,
    rejected: usize,
}

/// How a pass over the lines still to send ended.
enum PassEnd {
    /// The stream ended (every line sent was answered, or the pass was paused).
    Finished,
    /// The stream failed with a status worth retrying.
    Retry(tonic::Status),
}

/// Runs the command.
pub async fn run(args: UploadArgs) -> Result<(), Error> {
    if args.template {
        print!("{}", template::template());
        return Ok(());
    }
    let path = args.file.clone().ok_or("give the file to upload")?;
    let format = args.format.unwrap_or_else(|| format_of(&path));
    let bytes = std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let text = utf8_text(bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    let results_path = args
        .results
        .clone()
        .unwrap_or_else(|| default_results_path(&path));
    let lines = read_lines(&text, format, args.registry.as_deref(), Utc::now())?;
    drop(text);

    let earlier = results::latest(&results::read(&results_path)?);
    // A line is done when it is valid and its client reference was accepted (or found
    // already there) in an earlier run; an invalid line is reported again, whatever an
    // earlier run made of a line with its reference.
    // A line without a reference of its own (`line:N`) is known by its number alone,
    // which a line inserted above changes: it is sent again (a re-check of 2026-12-07
    // added a patient at the top of such a file and saw the run skip it as done).
    let earlier_row = |line: &Line| {
        let given = line.client_reference != format!("line:{}", line.number);
        earlier
            .get(&(line.number, line.client_reference.clone()))
            .filter(|row| given && line.violations.is_empty() && row.outcome.is_done())
    };
    // The row of each line, for the result file written at the end.
    let mut final_rows: Vec<Option<Row>> = lines.iter().map(|l| earlier_row(l).cloned()).collect();
    let skipped = final_rows.iter().filter(|r| r.is_some()).count();
    let invalid: Vec<usize> = (0..lines.len())
        .filter(|&i| !lines[i].violations.is_empty())
        .collect();
    for &i in &invalid {
        let line = &lines[i];
        for v in line.violations.iter() {
            eprintln!("line {}: {}: {}", line.number, v.field, v.description);
        }
        if let Some(omitted) = line.violations.omitted() {
            eprintln!("line {}: {}", line.number, not_listed(omitted));
        }
        final_rows[i] = Some(Row {
            line: line.number,
            // The reference of an invalid line is written only when it was checked
            // against the line's identifiers and passed: a line with no patient (both
            // kinds of identifier given, or neither) or refused for its reference leaves
            // it out (the result file holds no identifier).
            client_reference: if reference_is_checked(line) {
                line.client_reference.clone()
            } else {
                String::new()
            },
            outcome: Outcome::Invalid,
            pseudonym: String::new(),
            error: describe(&line.violations),
        });
    }
    let valid: Vec<usize> = (0..lines.len())
        .filter(|&i| final_rows[i].is_none())
        .collect();
    eprintln!(
        "{}: {} lines, {} valid to send, {} invalid, {} done in an earlier run",
        path.display(),
        lines.len(),
        valid.len(),
        invalid.len(),
        skipped
    );
    if args.check {
        return if invalid.is_empty() {
            Ok(())
        } else {
            Err(format!("{} invalid lines", invalid.len()).into())
        };
    }
    let mut journal = Journal::open(&results_path)
        .map_err(|e| format!("cannot write {}: {e}", results_path.display()))?;
    for &i in &invalid {
        journal.append(final_rows[i].as_ref().expect("an invalid line has its row"))?;
    }
    if !invalid.is_empty() && !args.send_valid {
        journal.sync()?;
        return Err(format!(
            "{} invalid lines (listed above and in {}); nothing was sent. Fix them, or pass --send-valid to send the {} valid lines",
            invalid.len(),
            results_path.display(),
            valid.len()
        )
        .into());
    }

    let key = api_key(args.api_key_file.as_deref())?;
    let mut bearer: MetadataValue<Ascii> = format!("Bearer {}", key.expose_secret())
        .parse()
        .map_err(|_| "the API key is not valid header text")?;
    bearer.set_sensitive(true);
    drop(key);
    let mut client = CaseServiceClient::new(channel(&args).await?);

    let requests: Arc<Vec<proto::SubmitCaseRequest>> = Arc::new(
        valid
            .iter()
            .map(|&i| {
                lines[i]
                    .request
                    .clone()
                    .expect("a valid line has its request")
            })
            .collect(),
    );
    let mut pending: Vec<usize> = (0..valid.len()).collect();
    let mut progress = Progress::new(valid.len());
    let mut tally = Tally::default();
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let interrupted = interrupted.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                interrupted.store(true, Ordering::SeqCst);
            }
        });
    }
    let mut fruitless = 0u32;
    let mut last_synced = Instant::now();
    while !pending.is_empty() && !interrupted.load(Ordering::SeqCst) {
        let before = pending.len();
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel::<proto::SubmitCaseRequest>(16);
        // At most WINDOW submissions sent and not yet answered: when the server starts
        // refusing (rate limiting), few are in flight, and a stream never sends the
        // server's allowance of refused items (`--max-stream-invalid-items`).
        let window = Arc::new(Semaphore::new(WINDOW));
        let feeder = {
            let requests = requests.clone();
            let order = pending.clone();
            let stop = stop.clone();
            let interrupted = interrupted.clone();
            let window = window.clone();
            tokio::spawn(async move {
                for i in order {
                    let Ok(permit) = window.acquire().await else {
                        break;
                    };
                    permit.forget();
                    if stop.load(Ordering::SeqCst) || interrupted.load(Ordering::SeqCst) {
                        break;
                    }
                    if tx.send(requests[i].clone()).await.is_err() {
                        break;
                    }
                }
            })
        };
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        request
            .metadata_mut()
            .insert("authorization", bearer.clone());
        let end = match client.submit_cases(request).await {
            Err(status) => PassEnd::Retry(status),
            Ok(response) => {
                let mut stream = response.into_inner();
                let mut still: Vec<usize> = Vec::new();
                let mut answered = 0usize;
                let end = loop {
                    match stream.message().await {
                        Ok(Some(result)) => {
                            window.add_permits(1);
                            let Some(&i) = pending.get(result.sequence as usize) else {
                                break PassEnd::Retry(tonic::Status::internal(
                                    "the server answered a submission that was not sent",
                                ));
                            };
                            answered = answered.max(result.sequence as usize + 1);
                            let line = &lines[valid[i]];
                            let mut row = Row {
                                line: line.number,
                                client_reference: line.client_reference.clone(),
                                outcome: Outcome::Accepted,
                                pseudonym: String::new(),
                                error: String::new(),
                            };
                            match result.outcome {
                                Some(proto::submit_cases_result::Outcome::Accepted(a)) => {
                                    row.pseudonym = a.pseudonym;
                                    tally.accepted += 1;
                                }
                                Some(proto::submit_cases_result::Outcome::Rejected(r))
                                    if r.code == tonic::Code::AlreadyExists as i32 =>
                                {
                                    row.outcome = Outcome::AlreadyExists;
                                    row.pseudonym = r.existing_case;
                                    tally.already += 1;
                                }
                                Some(proto::submit_cases_result::Outcome::Rejected(r))
                                    if r.code == tonic::Code::ResourceExhausted as i32
                                        || r.code == tonic::Code::Unavailable as i32
                                        || r.code == tonic::Code::Aborted as i32 =>
                                {
                                    // Rate limited or the server busy, or (ABORTED, the
                                    // one reason a submission is) the registry's key
                                    // rotated while it was in flight: send it again in
                                    // the next pass, after a pause.
                                    stop.store(true, Ordering::SeqCst);
                                    still.push(i);
                                    continue;
                                }
                                Some(proto::submit_cases_result::Outcome::Rejected(r)) => {
                                    let mut error = format!("{}: {}", code_name(r.code), r.message);
                                    for v in &r.field_violations {
                                        // A phenopacket's record: named by its element.
                                        let field = match &line.paths {
                                            Some(paths) if v.field.starts_with("record") => {
                                                paths.path_of(&v.field)
                                            }
                                            _ => v.field.clone(),
                                        };
                                        error.push_str(&format!("; {}: {}", field, v.description));
                                    }
                                    row.outcome = Outcome::Rejected;
                                    row.error = error;
                                    tally.rejected += 1;
                                }
                                None => {
                                    still.push(i);
                                    continue;
                                }
                            }
                            journal.append(&row)?;
                            final_rows[valid[i]] = Some(row);
                            progress.advance();
                            if last_synced.elapsed() >= Duration::from_secs(1) {
                                journal.sync()?;
                                last_synced = Instant::now();
                            }
                        }
                        Ok(None) => break PassEnd::Finished,
                        Err(status) => break PassEnd::Retry(status),
                    }
                };
                // Lines not answered in this pass (never sent, or the stream broke).
                still.extend(pending.iter().skip(answered).copied());
                pending = still;
                end
            }
        };
        feeder.abort();
        journal.sync()?;
        if let PassEnd::Retry(status) = &end {
            use tonic::Code;
            if matches!(
                status.code(),
                Code::Unauthenticated
                    | Code::PermissionDenied
                    | Code::InvalidArgument
                    | Code::NotFound
                    | Code::FailedPrecondition
                    | Code::Unimplemented
            ) {
                progress.finish();
                return Err(format!(
                    "the server refused the upload: {}: {}. {} lines are still to send; re-run to resume",
                    code_name(status.code() as i32),
                    status.message(),
                    pending.len()
                )
                .into());
            }
        }
        if pending.is_empty() || interrupted.load(Ordering::SeqCst) {
            break;
        }
        if pending.len() < before {
            fruitless = 0;
        } else {
            fruitless += 1;
        }
        if fruitless > args.max_retries {
            progress.finish();
            let why = match &end {
                PassEnd::Retry(status) => {
                    format!("{}: {}", code_name(status.code() as i32), status.message())
                }
                PassEnd::Finished => "rate limited".to_owned(),
            };
            return Err(format!(
                "no progress after {} attempts ({why}); {} lines are still to send: re-run to resume",
                args.max_retries + 1,
                pending.len()
            )
            .into());
        }
        let pause = Duration::from_secs(1 << fruitless.min(5));
        let started = Instant::now();
        while started.elapsed() < pause && !interrupted.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    progress.finish();
    journal.sync()?;
    let interrupted = interrupted.load(Ordering::SeqCst);
    if !interrupted {
        journal.rewrite(final_rows.into_iter().flatten())?;
    }
    eprintln!(
        "accepted {}, already in the registry {}, rejected {}, invalid {}, done earlier {}, not sent {}; results in {}",
        tally.accepted,
        tally.already,
        tally.rejected,
        invalid.len(),
        skipped,
        pending.len(),
        results_path.display()
    );
    if interrupted {
        return Err(format!(
            "interrupted: every acknowledged line is in {}; re-run the same command to upload the {} lines left",
            results_path.display(),
            pending.len()
        )
        .into());
    }
    if tally.rejected > 0 || !invalid.is_empty() {
        return Err(format!(
            "{} lines rejected by the server and {} invalid; see {}",
            tally.rejected,
            invalid.len(),
            results_path.display()
        )
        .into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures;

    fn now() -> DateTime<Utc> {
        Utc::now()
    }

    fn fields(v: &FieldViolations) -> Vec<&str> {
        v.iter().map(|v| v.field.as_str()).collect()
    }

    /// The line of `byte` counted from the start, as an editor counts: the reference.
    fn counted_from_the_start(text: &str, byte: usize) -> u64 {
        let bytes = text.as_bytes();
        let mut at = byte.min(bytes.len());
        while at < bytes.len() && matches!(bytes[at], b'\r' | b'\n') {
            at += 1;
        }
        let mut line = 1;
        let mut i = 0;
        while i < at {
            if bytes[i] == b'\n' || (bytes[i] == b'\r' && bytes.get(i + 1) != Some(&b'\n')) {
                line += 1;
            }
            i += 1;
        }
        line
    }

    #[test]
    fn a_file_not_in_utf8_is_refused_naming_its_first_such_line() {
        assert_eq!(utf8_text(b"a,b\r\nc,d\n".to_vec()).unwrap(), "a,b\r\nc,d\n");
        let refused = utf8_text(b"a,b\r\nc,d\ne,M\xfcller\nf,\xff\n".to_vec()).unwrap_err();
        assert!(
            refused.starts_with("line 3 is not valid UTF-8 (byte 13 "),
            "{refused}"
        );
    }

    #[test]
    fn line_numbers_counted_on_are_those_counted_from_the_start() {
        let text = "h1,h2\r\na,b\n\nc,d\re,f\r\n\r\ng,\"x\ny\"\rh,i\n";
        // In order, as the reader's records come, at every byte.
        let mut numbers = LineNumbers::of(text);
        for byte in 0..=text.len() + 2 {
            assert_eq!(
                numbers.line_at(byte as u64),
                counted_from_the_start(text, byte),
                "byte {byte}"
            );
        }
        // Out of order: counted again from the start.
        for byte in [20, 3, 17, 0, text.len()] {
            assert_eq!(
                numbers.line_at(byte as u64),
                counted_from_the_start(text, byte),
                "byte {byte}"
            );
        }
    }

    #[test]
    fn the_template_row_passes_the_servers_check() {
        let text = template::template();
        let lines = read_lines(&text, UploadFormat::Csv, Some("ERN-LUNG"), now()).unwrap();
        assert_eq!(lines.len(), 1);
        assert!(lines[0].violations.is_empty(), "{:?}", lines[0].violations);
        assert_eq!(lines[0].number, 2);
    }

    #[test]
    fn every_problem_of_every_line_is_reported_with_line_and_field() {
        let text = format!(
            "{}client_reference,national_id_country,national_id,birth_year_month,sex,status,onset_kind,orphacode,diagnosis_date\n\
             ,NL,111222334,2015-06,female,alive,unknown,ORPHA:586,2016-03\n\
             dup,NL,111222333,2015-13,female,alive,unknown,ORPHA:586,2016-03\n\
             dup,NL,111222333,2015-06,female,alive,unknown,ORPHA:586,2016-03\n",
            ""
        );
        let lines = read_lines(&text, UploadFormat::Csv, Some("ERN-LUNG"), now()).unwrap();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0].number, 2);
        assert_eq!(lines[0].client_reference, "line:2");
        // The BSN's 11-check, and no consent is not a local matter (it may be on file).
        assert_eq!(fields(&lines[0].violations), ["patient.national.value"]);
        assert_eq!(fields(&lines[1].violations), ["record.birth_year_month"]);
        assert_eq!(fields(&lines[2].violations), ["client_reference"]);
        assert!(
            lines[2]
                .violations
                .iter()
                .next()
                .unwrap()
                .description
                .contains("line 3")
        );
        for line in &lines {
            for v in line.violations.iter() {
                assert!(!v.description.contains("11122233"), "{v:?}");
            }
        }
    }

    /// Line numbers are the file's, whatever its line ends (CRLF is the CSV standard's
    /// and Excel's) and with blank lines between rows; a quoted cell may span lines.
    #[test]
    fn csv_line_numbers_are_the_files_with_crlf_and_blank_lines() {
        let header = "client_reference,national_id_country,national_id,birth_year_month,sex,status,onset_kind,orphacode,diagnosis_date";
        let row = |reference: &str, month: &str| {
            format!("{reference},NL,111222333,2015-{month},female,alive,unknown,ORPHA:586,2016-03")
        };
        let rows = [
            row("a", "06"),
            String::new(),
            row("b", "13"),
            row("\"c\nd\"", "06"),
            row("e", "13"),
        ];
        for end in ["\n", "\r\n", "\r"] {
            let mut text = format!("{header}{end}");
            for r in &rows {
                text.push_str(r);
                text.push_str(end);
            }
            text.push_str("f,NL,1,2,3");
            text.push_str(end);
            let lines = read_lines(&text, UploadFormat::Csv, Some("ERN-LUNG"), now()).unwrap();
            let numbers: Vec<u64> = lines.iter().map(|l| l.number).collect();
            assert_eq!(numbers, [2, 4, 5, 7, 8], "{end:?}");
            assert_eq!(
                fields(&lines[1].violations),
                ["record.birth_year_month"],
                "{end:?}"
            );
            assert_eq!(
                fields(&lines[3].violations),
                ["record.birth_year_month"],
                "{end:?}"
            );
            assert!(lines[4].request.is_none(), "{end:?}");
        }
    }

    #[test]
    fn a_csv_needs_a_registry_and_json_lines_may_name_their_own() {
        assert!(read_lines(&template::template(), UploadFormat::Csv, None, now()).is_err());
        let line = r#"{"patient":{"national":{"issuingCountry":"XT","value":"SYN000000001"}},"record":{"birthYearMonth":"2015-06","sex":"SEX_FEMALE","status":"PATIENT_STATUS_ALIVE","onsetKind":"ONSET_KIND_UNKNOWN","diagnosis":{"orphacode":"ORPHA:586"},"diagnosisDate":"2016"}}"#;
        let text = format!(
            "{line}\n\n{}\nnot json\n",
            line.replacen('{', r#"{"registry":"ERN-EYE","#, 1)
        );
        let lines = read_lines(&text, UploadFormat::Jsonl, None, now()).unwrap();
        assert_eq!(lines.len(), 3);
        assert_eq!(fields(&lines[0].violations), ["registry"]);
        assert_eq!(lines[1].number, 3);
        assert!(lines[1].violations.is_empty(), "{:?}", lines[1].violations);
        assert_eq!(lines[2].number, 4);
        assert_eq!(fields(&lines[2].violations), ["(line)"]);
        let lines = read_lines(&text, UploadFormat::Jsonl, Some("ERN-LUNG"), now()).unwrap();
        assert!(lines[0].violations.is_empty());
        assert_eq!(lines[0].request.as_ref().unwrap().registry, "ERN-LUNG");
        assert_eq!(lines[1].request.as_ref().unwrap().registry, "ERN-EYE");
    }

    #[test]
    fn phenopacket_lines_become_submissions_and_report_elements_by_json_path() {
        let compact: serde_json::Value = serde_json::from_str(fixtures::PHENOPACKET).unwrap();
        let line = |n: u32, bsn: &str, phenopacket: &serde_json::Value| {
            serde_json::json!({
                "patient": {"national": {"issuingCountry": "NL", "value": bsn}},
                "phenopacket": phenopacket,
                "consent": [{"scope": "CONSENT_SCOPE_REGISTRY_INCLUSION",
                             "state": "CONSENT_STATE_GRANTED",
                             "givenAt": "2024-03-01T10:00:00Z", "formVersion": "F-1"}],
                "clientReference": format!("pp-{n}"),
            })
            .to_string()
        };
        let mut unmappable = compact.clone();
        unmappable["phenotypicFeatures"][0]["excluded"] = true.into();
        let text = format!(
            "{}\n{}\n{}\n",
            line(1, &fixtures::bsn(1), &compact),
            // The phenopacket as its text works too.
            line(2, &fixtures::bsn(2), &compact.to_string().into()),
            line(3, "111222334", &unmappable),
        );
        let lines = read_lines(&text, UploadFormat::Phenopackets, Some("ERN-LUNG"), now()).unwrap();
        assert_eq!(lines.len(), 3);
        for line in &lines[..2] {
            assert!(line.violations.is_empty(), "{:?}", line.violations);
            let request = line.request.as_ref().unwrap();
            assert_eq!(request.registry, "ERN-LUNG");
            assert_eq!(request.record.as_ref().unwrap(), &fixtures::record());
        }
        assert_eq!(
            fields(&lines[2].violations),
            [
                "phenopacket.phenotypicFeatures[0].excluded",
                "patient.national.value"
            ]
        );
    }

    #[test]
    fn a_reference_must_not_carry_the_identifier() {
        let mut request = fixtures::submission("ERN-LUNG", fixtures::national("NL", "111.222.333"));
        request.client_reference = "ref-111222333".into();
        let v = check(&mut request, 1, FieldViolations::new(), fixtures::now());
        assert_eq!(fields(&v), ["client_reference"]);
        // The value in full-width digits, compared as the service reads it (a reference
        // itself must be ASCII).
        let mut request =
            fixtures::submission("ERN-LUNG", fixtures::national("NL", "１１１２２２３３３"));
        request.client_reference = "ref-111222333".into();
        let v = check(&mut request, 1, FieldViolations::new(), fixtures::now());
        assert_eq!(fields(&v), ["client_reference"]);
        // A word of the family name, with its diacritics dropped or spelt out; a BSN
        // without its leading zero.
        for (family, reference) in [
            ("de Vries", "vries-77"),
            ("Müller", "mueller-5"),
            ("Müller", "muller-5"),
            ("Groß", "gross-9"),
            ("van der Berg-Smit", "smit-2"),
            ("Møller", "moller-1"),
            ("Møller", "moeller-1"),
            ("Mu\u{308}ller", "mueller-3"),
        ] {
            let mut person = fixtures::person();
            person.family_name = family.into();
            let mut request = fixtures::submission("ERN-LUNG", fixtures::demographic(person));
            request.client_reference = reference.into();
            let v = check(&mut request, 1, FieldViolations::new(), fixtures::now());
            assert_eq!(fields(&v), ["client_reference"], "{family} {reference}");
        }
        let mut request = fixtures::submission("ERN-LUNG", fixtures::national("NL", "012345672"));
        request.client_reference = "pat-12345672".into();
        let v = check(&mut request, 1, FieldViolations::new(), fixtures::now());
        assert_eq!(fields(&v), ["client_reference"]);
        // A particle of three letters is no needle: "ten Cate" may be "patient-17".
        let mut person = fixtures::person();
        person.family_name = "ten Cate".into();
        let mut request = fixtures::submission("ERN-LUNG", fixtures::demographic(person));
        request.client_reference = "patient-17".into();
        let v = check(&mut request, 1, FieldViolations::new(), fixtures::now());
        assert!(fields(&v).is_empty(), "{:?}", fields(&v));
        // An empty identifier checks nothing: such a line's reference is not written.
        let mut request = fixtures::submission("ERN-LUNG", fixtures::national("NL", ""));
        request.client_reference = "123456782".into();
        assert!(identifier_needles(&request).is_empty());
    }

    #[test]
    fn codes_have_their_canonical_names() {
        assert_eq!(code_name(9), "FAILED_PRECONDITION");
        assert_eq!(code_name(16), "UNAUTHENTICATED");
        assert_eq!(code_name(99), "code 99");
    }

    #[test]
    fn the_results_file_sits_next_to_the_input() {
        assert_eq!(
            default_results_path(Path::new("/x/cases.csv")),
            Path::new("/x/cases.results.csv")
        );
        assert_eq!(format_of(Path::new("a.ndjson")), UploadFormat::Jsonl);
        assert_eq!(format_of(Path::new("a.CSV")), UploadFormat::Csv);
    }
}
