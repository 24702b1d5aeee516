//! Reading code release files as they are published: the HPO ontology (`hp.obo`, with
//! `fastobo`) and its annotation files (`phenotype.hpoa`, `genes_to_phenotype.txt`), the
//! Orphanet nomenclature (`en_product1.xml`) and classifications (`en_product3_*.xml`,
//! with `quick-xml`), and the HGNC complete set (TSV, with `csv`).
//!
//! Every reader streams: it holds one OBO frame, one XML element path or one TSV line at
//! a time and hands what it finds to a sink in [`Item`]s, so a release of any size is
//! read in bounded memory; `store::codes` writes the items in batches as they come. The
//! readers know nothing of the database, and check only what the format promises (a
//! release file that is not what it claims is refused with the line or element at fault).

pub mod hgnc;
pub mod hpo;
pub mod orphanet;

use std::path::{Path, PathBuf};

use crate::domain::{AliasKind, CodeSystem};

/// One fact of a release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    Term {
        code: String,
        label: String,
        obsolete: bool,
        replaced_by: Option<String>,
    },
    /// `code` is a direct subtype of `parent`.
    Parent { code: String, parent: String },
    Alias {
        alias: String,
        code: String,
        kind: AliasKind,
    },
}

/// What the release files say about themselves.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Header {
    pub version: Option<String>,
    /// ISO date (YYYY-MM-DD).
    pub released_on: Option<String>,
}

/// Why a release file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
}

impl ImportError {
    pub fn file(path: &Path, message: impl std::fmt::Display) -> ImportError {
        ImportError::File {
            path: path.to_owned(),
            message: message.to_string(),
        }
    }
}

/// The files of one release to import.
#[derive(Debug, Clone)]
pub enum Source {
    Hpo {
        obo: PathBuf,
        /// `phenotype.hpoa`: checked to be of the same release (its `#version`).
        hpoa: Option<PathBuf>,
        /// `genes_to_phenotype.txt`: each line must name an `HP:` term (the file carries
        /// no release to compare).
        genes_to_phenotype: Option<PathBuf>,
    },
    Orphanet {
        product1: PathBuf,
        /// Classification files (`en_product3_*.xml`): the hierarchy.
        classifications: Vec<PathBuf>,
    },
    Hgnc {
        tsv: PathBuf,
    },
}

impl Source {
    pub fn system(&self) -> CodeSystem {
        match self {
            Source::Hpo { .. } => CodeSystem::Hpo,
            Source::Orphanet { .. } => CodeSystem::Orphanet,
            Source::Hgnc { .. } => CodeSystem::Hgnc,
        }
    }

    /// The file names, as the release records its source.
    pub fn describe(&self) -> String {
        let name = |p: &PathBuf| {
            p.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        let names: Vec<String> = match self {
            Source::Hpo {
                obo,
                hpoa,
                genes_to_phenotype,
            } => std::iter::once(obo)
                .chain(hpoa)
                .chain(genes_to_phenotype)
                .map(name)
                .collect(),
            Source::Orphanet {
                product1,
                classifications,
            } => std::iter::once(product1)
                .chain(classifications)
                .map(name)
                .collect(),
            Source::Hgnc { tsv } => vec![name(tsv)],
        };
        names.join(" ")
    }

    /// Reads the release: the header first (`on_header`, once, before any item), then
    /// every item. Returns the header again, completed by what only the end of the files
    /// tells (HGNC: the latest modification date).
    pub fn read(
        &self,
        on_header: &mut dyn FnMut(&Header) -> Result<(), ImportError>,
        sink: &mut dyn FnMut(Item) -> Result<(), ImportError>,
    ) -> Result<Header, ImportError> {
        match self {
            Source::Hpo {
                obo,
                hpoa,
                genes_to_phenotype,
            } => {
                let header = hpo::read_obo(obo, on_header, sink)?;
                if let Some(hpoa) = hpoa {
                    hpo::check_hpoa(hpoa, &header)?;
                }
                if let Some(g2p) = genes_to_phenotype {
                    hpo::check_genes_to_phenotype(g2p)?;
                }
                Ok(header)
            }
            Source::Orphanet {
                product1,
                classifications,
            } => {
                let header = orphanet::read_product1(product1, on_header, sink)?;
                for file in classifications {
                    orphanet::read_classification(file, sink)?;
                }
                Ok(header)
            }
            Source::Hgnc { tsv } => hgnc::read_complete_set(tsv, on_header, sink),
        }
    }
}

/// Opens a release file for buffered reading.
fn open(path: &Path) -> Result<std::io::BufReader<std::fs::File>, ImportError> {
    let file = std::fs::File::open(path).map_err(|e| ImportError::file(path, e))?;
    Ok(std::io::BufReader::with_capacity(1 << 16, file))
}

/// The date at the start of `s` if it is an ISO date (YYYY-MM-DD).
fn iso_date_prefix(s: &str) -> Option<String> {
    let d = s.get(..10)?;
    chrono::NaiveDate::parse_from_str(d, "%Y-%m-%d")
        .ok()
        .map(|_| d.to_owned())
}

#[cfg(test)]
pub(crate) fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/codes")
        .join(name)
}

#[cfg(test)]
pub(crate) fn read_all(source: &Source) -> (Header, Vec<Item>) {
    let mut items = Vec::new();
    let mut headers = 0;
    let header = source
        .read(
            &mut |_| {
                headers += 1;
                Ok(())
            },
            &mut |item| {
                items.push(item);
                Ok(())
            },
        )
        .expect("the fixture reads");
    assert_eq!(headers, 1);
    (header, items)
}
