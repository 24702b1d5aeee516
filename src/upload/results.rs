//! The result file of an upload: one CSV row per line of the input, `line,
//! client_reference, outcome, pseudonym, error`. It is also the journal a re-run resumes
//! from: a row is appended and flushed the moment the server acknowledges the line, so
//! an interrupted run loses no acknowledged line, and the next run skips every line whose
//! number and client reference are recorded together as `accepted` or `already_exists`. A run that ends (not interrupted)
//! rewrites the file with one row per line of the input, in line order.
//!
//! It holds no identifier: line numbers, the client's own references, pseudonyms, status
//! codes and the checks' descriptions (which never echo a value).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

pub const HEADER: [&str; 5] = ["line", "client_reference", "outcome", "pseudonym", "error"];

/// What became of one line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Stored now; the row carries the pseudonym.
    Accepted,
    /// The centre already has a case for this patient: done (a resumed upload, or a
    /// case submitted before).
    AlreadyExists,
    /// Refused by the server (the error says why).
    Rejected,
    /// Refused by the local check; not sent.
    Invalid,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Accepted => "accepted",
            Outcome::AlreadyExists => "already_exists",
            Outcome::Rejected => "rejected",
            Outcome::Invalid => "invalid",
        }
    }

    fn parse(s: &str) -> Option<Outcome> {
        Some(match s {
            "accepted" => Outcome::Accepted,
            "already_exists" => Outcome::AlreadyExists,
            "rejected" => Outcome::Rejected,
            "invalid" => Outcome::Invalid,
            _ => return None,
        })
    }

    /// Whether the line needs no further upload.
    pub fn is_done(self) -> bool {
        matches!(self, Outcome::Accepted | Outcome::AlreadyExists)
    }
}

/// One row of the result file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub line: u64,
    pub client_reference: String,
    pub outcome: Outcome,
    pub pseudonym: String,
    pub error: String,
}

/// Reads the rows of an earlier run (none if there is no file). A row cut short by a
/// crash, or otherwise unreadable, is skipped: its line is simply uploaded again.
pub fn read(path: &Path) -> io::Result<Vec<Row>> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(true)
        .from_reader(file);
    let mut rows = Vec::new();
    for record in reader.records() {
        let Ok(record) = record else { continue };
        if record.len() != HEADER.len() {
            continue;
        }
        let (Ok(line), Some(outcome)) = (record[0].parse(), Outcome::parse(&record[2])) else {
            continue;
        };
        rows.push(Row {
            line,
            client_reference: record[1].to_owned(),
            outcome,
            pseudonym: record[3].to_owned(),
            error: record[4].to_owned(),
        });
    }
    Ok(rows)
}

/// The row that tells what became of each line, by its line number and client reference:
/// the last one recording it done (accepted or already there), else the last one. A line
/// is known by both: a reference recorded done at another line number may have been
/// given since to another patient's line (an audit of 2026-12-07 renamed the reference
/// of a stored line and saw the next run skip, as done, the line that then had the old
/// reference), so such a line is sent again, and ALREADY_EXISTS counts it done.
pub fn latest(rows: &[Row]) -> HashMap<(u64, String), Row> {
    let mut by_line: HashMap<(u64, String), Row> = HashMap::new();
    for row in rows {
        let at = (row.line, row.client_reference.clone());
        let keep_done = by_line
            .get(&at)
            .is_some_and(|earlier| earlier.outcome.is_done() && !row.outcome.is_done());
        if !keep_done {
            by_line.insert(at, row.clone());
        }
    }
    by_line
}

/// The result file, open for appending.
pub struct Journal {
    path: PathBuf,
    file: File,
}

fn encode(row: &Row) -> Vec<u8> {
    let mut out = csv::Writer::from_writer(Vec::new());
    out.write_record([
        row.line.to_string().as_str(),
        &row.client_reference,
        row.outcome.as_str(),
        &row.pseudonym,
        &row.error,
    ])
    .expect("in memory");
    out.into_inner().expect("in memory")
}

impl Journal {
    /// Opens (or creates, with its header) the result file for appending; a last row cut
    /// short by a crash is ended so that the next row starts on a line of its own.
    pub fn open(path: &Path) -> io::Result<Journal> {
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)?;
        let len = file.metadata()?.len();
        if len == 0 {
            file.write_all(format!("{}\n", HEADER.join(",")).as_bytes())?;
        } else {
            let mut last = [0u8; 1];
            file.seek(SeekFrom::Start(len - 1))?;
            file.read_exact(&mut last)?;
            if last[0] != b'\n' {
                file.write_all(b"\n")?;
            }
        }
        Ok(Journal {
            path: path.to_owned(),
            file,
        })
    }

    /// Appends a row in one write: it is in the file (the OS's) when this returns, so
    /// killing the uploader cannot lose it.
    pub fn append(&mut self, row: &Row) -> io::Result<()> {
        self.file.write_all(&encode(row))
    }

    /// Forces the rows to disk.
    pub fn sync(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Replaces the file with `rows` (the outcome of each line of the input as it is
    /// now), through a temporary file and a rename: a crash leaves the old file or the
    /// new one.
    pub fn rewrite(self, rows: impl IntoIterator<Item = Row>) -> io::Result<()> {
        self.file.sync_data()?;
        let tmp = self.path.with_extension("tmp");
        {
            let mut out = File::create(&tmp)?;
            out.write_all(format!("{}\n", HEADER.join(",")).as_bytes())?;
            for row in rows {
                out.write_all(&encode(&row))?;
            }
            out.sync_all()?;
        }
        std::fs::rename(&tmp, &self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(line: u64, reference: &str, outcome: Outcome) -> Row {
        Row {
            line,
            client_reference: reference.into(),
            outcome,
            pseudonym: String::new(),
            error: "record.sex: one of a, b; \"quoted\"".into(),
        }
    }

    #[test]
    fn rows_round_trip_and_the_last_per_reference_wins() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.csv");
        let mut journal = Journal::open(&path).unwrap();
        journal.append(&row(2, "b", Outcome::Invalid)).unwrap();
        journal.append(&row(1, "a", Outcome::Accepted)).unwrap();
        drop(journal);
        let mut journal = Journal::open(&path).unwrap();
        journal
            .append(&row(2, "b", Outcome::AlreadyExists))
            .unwrap();
        let rows = read(&path).unwrap();
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0], row(2, "b", Outcome::Invalid));
        let at = |line: u64, reference: &str| (line, reference.to_owned());
        let latest = latest(&rows);
        assert_eq!(latest[&at(2, "b")].outcome, Outcome::AlreadyExists);
        // A later refusal of the same line does not undo its upload.
        let mut repeated = rows.clone();
        repeated.push(row(1, "a", Outcome::Rejected));
        assert_eq!(
            super::latest(&repeated)[&at(1, "a")].outcome,
            Outcome::Accepted
        );
        // The reference at another line is another line.
        repeated.push(row(9, "a", Outcome::Invalid));
        let latest = super::latest(&repeated);
        assert_eq!(latest[&at(9, "a")].outcome, Outcome::Invalid);
        assert_eq!(latest[&at(1, "a")].outcome, Outcome::Accepted);
        journal
            .rewrite([
                row(1, "a", Outcome::Accepted),
                row(2, "b", Outcome::AlreadyExists),
            ])
            .unwrap();
        let rows = read(&path).unwrap();
        assert_eq!(
            rows,
            [
                row(1, "a", Outcome::Accepted),
                row(2, "b", Outcome::AlreadyExists)
            ]
        );
    }

    #[test]
    fn a_row_cut_short_by_a_crash_is_skipped_and_the_next_starts_afresh() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.csv");
        std::fs::write(
            &path,
            "line,client_reference,outcome,pseudonym,error\n1,a,accepted,R1,\n2,b,acc",
        )
        .unwrap();
        let mut journal = Journal::open(&path).unwrap();
        journal.append(&row(3, "c", Outcome::Rejected)).unwrap();
        let rows = read(&path).unwrap();
        let references: Vec<&str> = rows.iter().map(|r| r.client_reference.as_str()).collect();
        assert_eq!(references, ["a", "c"]);
    }
}
