//! The Human Phenotype Ontology as the HPO project publishes it: `hp.obo`, read one frame
//! at a time with `fastobo`'s sequential parser, and the annotation files
//! `phenotype.hpoa` and `genes_to_phenotype.txt`, checked against it.
//!
//! From `hp.obo`: every `[Term]` with its `name`, `is_obsolete` and `replaced_by` (the
//! registry stores an obsolete term as its replacement), its `is_a` parents (the
//! hierarchy research questions expand along) and its `alt_id`s (ids merged into it).
//! The release's version is the header's `data-version` (`hp/releases/2025-01-16` gives
//! `2025-01-16`), its date the date in it.

use std::io::BufRead;
use std::path::Path;

use fastobo::ast::{Frame, HeaderClause, TermClause};
use fastobo::parser::SequentialParser;

use super::{Header, ImportError, Item, iso_date_prefix, open};
use crate::domain::AliasKind;

/// Reads `hp.obo`.
pub fn read_obo(
    path: &Path,
    on_header: &mut dyn FnMut(&Header) -> Result<(), ImportError>,
    sink: &mut dyn FnMut(Item) -> Result<(), ImportError>,
) -> Result<Header, ImportError> {
    read_obo_from(open(path)?, path, on_header, sink)
}

fn read_obo_from(
    reader: impl BufRead,
    path: &Path,
    on_header: &mut dyn FnMut(&Header) -> Result<(), ImportError>,
    sink: &mut dyn FnMut(Item) -> Result<(), ImportError>,
) -> Result<Header, ImportError> {
    let mut header: Option<Header> = None;
    let mut terms = 0usize;
    for frame in SequentialParser::from(reader) {
        let frame = frame.map_err(|e| ImportError::file(path, e))?;
        match frame {
            Frame::Header(h) => {
                let mut found = Header::default();
                for clause in h.iter() {
                    if let HeaderClause::DataVersion(v) = clause {
                        let v = v.as_str();
                        let version = v.rsplit('/').next().unwrap_or(v).to_owned();
                        found.released_on = iso_date_prefix(&version);
                        found.version = Some(version);
                    }
                }
                if found.version.is_none() {
                    return Err(ImportError::file(
                        path,
                        "the header has no data-version: not an HPO release file",
                    ));
                }
                on_header(&found)?;
                header = Some(found);
            }
            Frame::Term(term) => {
                if header.is_none() {
                    return Err(ImportError::file(path, "a term before the header"));
                }
                let code = term.id().as_ref().to_string();
                if !code.starts_with("HP:") {
                    // Other ontologies' classes the file may reference: not HPO terms.
                    continue;
                }
                let mut label = String::new();
                let mut obsolete = false;
                let mut replaced_by = None;
                for line in term.clauses() {
                    match line.as_ref() {
                        TermClause::Name(name) => label = name.as_str().to_owned(),
                        TermClause::IsObsolete(b) => obsolete = *b,
                        TermClause::ReplacedBy(by) => replaced_by = Some(by.to_string()),
                        TermClause::IsA(parent) => {
                            let parent = parent.to_string();
                            if parent.starts_with("HP:") {
                                sink(Item::Parent {
                                    code: code.clone(),
                                    parent,
                                })?;
                            }
                        }
                        TermClause::AltId(alt) => sink(Item::Alias {
                            alias: alt.to_string(),
                            code: code.clone(),
                            kind: AliasKind::AltId,
                        })?,
                        _ => {}
                    }
                }
                terms += 1;
                sink(Item::Term {
                    code,
                    label,
                    obsolete,
                    replaced_by,
                })?;
            }
            Frame::Typedef(_) | Frame::Instance(_) => {}
        }
    }
    let header = header.ok_or_else(|| ImportError::file(path, "empty: no OBO header"))?;
    if terms == 0 {
        return Err(ImportError::file(path, "holds no HP term"));
    }
    Ok(header)
}

/// Checks that `phenotype.hpoa` is of the ontology's release (its `#version:` line).
pub fn check_hpoa(path: &Path, header: &Header) -> Result<(), ImportError> {
    let reader = open(path)?;
    for line in reader.lines() {
        let line = line.map_err(|e| ImportError::file(path, e))?;
        let Some(comment) = line.strip_prefix('#') else {
            break;
        };
        if let Some(version) = comment.strip_prefix("version:") {
            let version = version.trim();
            return if Some(version) == header.version.as_deref() {
                Ok(())
            } else {
                Err(ImportError::file(
                    path,
                    format!(
                        "is of release {version}, the ontology of {}: import files of one release",
                        header.version.as_deref().unwrap_or("?")
                    ),
                ))
            };
        }
    }
    Err(ImportError::file(
        path,
        "has no #version line: not a phenotype.hpoa file",
    ))
}

/// Checks that `genes_to_phenotype.txt` has the published header (gene id, symbol, HPO
/// id, ...) and that every line has an HPO id.
pub fn check_genes_to_phenotype(path: &Path) -> Result<(), ImportError> {
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(b'\t')
        .flexible(true)
        .from_reader(open(path)?);
    let headers = reader
        .headers()
        .map_err(|e| ImportError::file(path, e))?
        .clone();
    let Some(hpo_column) = headers.iter().position(|h| h == "hpo_id") else {
        return Err(ImportError::file(
            path,
            "has no hpo_id column: not a genes_to_phenotype.txt file",
        ));
    };
    for (i, record) in reader.records().enumerate() {
        let record = record.map_err(|e| ImportError::file(path, e))?;
        if !record
            .get(hpo_column)
            .is_some_and(|id| id.starts_with("HP:"))
        {
            return Err(ImportError::file(
                path,
                format!("line {} has no HPO id", i + 2),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::{Source, fixture, read_all};
    use super::*;

    fn source() -> Source {
        Source::Hpo {
            obo: fixture("hp.obo"),
            hpoa: Some(fixture("phenotype.hpoa")),
            genes_to_phenotype: Some(fixture("genes_to_phenotype.txt")),
        }
    }

    #[test]
    fn hp_obo_gives_terms_parents_obsoletes_and_alt_ids() {
        let (header, items) = read_all(&source());
        assert_eq!(header.version.as_deref(), Some("2025-01-16"));
        assert_eq!(header.released_on.as_deref(), Some("2025-01-16"));
        assert!(items.contains(&Item::Term {
            code: "HP:0001250".into(),
            label: "Seizure".into(),
            obsolete: false,
            replaced_by: None,
        }));
        assert!(items.contains(&Item::Term {
            code: "HP:0000057".into(),
            label: "obsolete Clitoromegaly".into(),
            obsolete: true,
            replaced_by: Some("HP:0008665".into()),
        }));
        assert!(items.contains(&Item::Parent {
            code: "HP:0002069".into(),
            parent: "HP:0001250".into(),
        }));
        assert!(items.contains(&Item::Alias {
            alias: "HP:0000624".into(),
            code: "HP:0000286".into(),
            kind: AliasKind::AltId,
        }));
    }

    #[test]
    fn annotation_files_of_another_release_are_refused() {
        let header = Header {
            version: Some("2024-04-26".into()),
            released_on: None,
        };
        let err = check_hpoa(&fixture("phenotype.hpoa"), &header).unwrap_err();
        assert!(
            err.to_string().contains("is of release 2025-01-16"),
            "{err}"
        );
    }

    #[test]
    fn a_file_without_a_data_version_is_not_an_hpo_release() {
        let text = "format-version: 1.2\n\n[Term]\nid: HP:0000001\nname: All\n";
        let err = read_obo_from(
            text.as_bytes(),
            Path::new("x.obo"),
            &mut |_| Ok(()),
            &mut |_| Ok(()),
        )
        .unwrap_err();
        assert!(err.to_string().contains("no data-version"), "{err}");
    }
}
