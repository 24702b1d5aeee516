//! The HGNC complete set (`hgnc_complete_set.txt`, tab-separated, one approved gene a
//! line, multi-valued fields quoted and separated by `|`), read a line at a time.
//!
//! From each line: the approved `symbol` and its `name` (the label); `status` other than
//! "Approved" makes it obsolete; `prev_symbol` and `alias_symbol` become aliases that
//! submissions are pointed to the approved symbol with. The file states no version: the
//! release's date is the latest `date_modified` of its lines, and that date is its
//! version unless the operator names one (`codes import hgnc --version`).

use std::path::Path;

use super::{Header, ImportError, Item, iso_date_prefix, open};
use crate::domain::AliasKind;

pub fn read_complete_set(
    path: &Path,
    on_header: &mut dyn FnMut(&Header) -> Result<(), ImportError>,
    sink: &mut dyn FnMut(Item) -> Result<(), ImportError>,
) -> Result<Header, ImportError> {
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(b'\t')
        .flexible(true)
        .from_reader(open(path)?);
    let headers = reader
        .headers()
        .map_err(|e| ImportError::file(path, e))?
        .clone();
    let column = |name: &str| headers.iter().position(|h| h == name);
    let (Some(symbol_col), Some(name_col), Some(status_col)) =
        (column("symbol"), column("name"), column("status"))
    else {
        return Err(ImportError::file(
            path,
            "has no symbol, name and status columns: not the HGNC complete set",
        ));
    };
    let alias_col = column("alias_symbol");
    let prev_col = column("prev_symbol");
    let modified_col = column("date_modified");
    on_header(&Header::default())?;
    let mut latest: Option<String> = None;
    let mut genes = 0usize;
    let mut record = csv::StringRecord::new();
    while reader
        .read_record(&mut record)
        .map_err(|e| ImportError::file(path, e))?
    {
        let field = |i: Option<usize>| i.and_then(|i| record.get(i)).unwrap_or("").trim();
        let symbol = field(Some(symbol_col));
        if symbol.is_empty() {
            return Err(ImportError::file(
                path,
                format!("line {} has no symbol", genes + 2),
            ));
        }
        let status = field(Some(status_col));
        for (col, kind) in [
            (prev_col, AliasKind::Previous),
            (alias_col, AliasKind::Alias),
        ] {
            for alias in field(col).split('|').map(str::trim) {
                if !alias.is_empty() && alias != symbol {
                    sink(Item::Alias {
                        alias: alias.to_owned(),
                        code: symbol.to_owned(),
                        kind,
                    })?;
                }
            }
        }
        if let Some(date) = iso_date_prefix(field(modified_col))
            && latest.as_ref().is_none_or(|l| *l < date)
        {
            latest = Some(date);
        }
        genes += 1;
        sink(Item::Term {
            code: symbol.to_owned(),
            label: field(Some(name_col)).to_owned(),
            obsolete: status != "Approved",
            replaced_by: None,
        })?;
    }
    if genes == 0 {
        return Err(ImportError::file(path, "holds no gene"));
    }
    Ok(Header {
        version: latest.clone(),
        released_on: latest,
    })
}

#[cfg(test)]
mod tests {
    use super::super::{Source, fixture, read_all};
    use super::*;

    #[test]
    fn the_complete_set_gives_symbols_names_and_aliases() {
        let (header, items) = read_all(&Source::Hgnc {
            tsv: fixture("hgnc_complete_set.txt"),
        });
        assert_eq!(header.version.as_deref(), Some("2025-02-25"));
        assert!(items.contains(&Item::Term {
            code: "CFTR".into(),
            label: "CF transmembrane conductance regulator".into(),
            obsolete: false,
            replaced_by: None,
        }));
        assert!(items.contains(&Item::Alias {
            alias: "ABCC7".into(),
            code: "CFTR".into(),
            kind: AliasKind::Previous,
        }));
        assert!(items.contains(&Item::Alias {
            alias: "MRP7".into(),
            code: "CFTR".into(),
            kind: AliasKind::Alias,
        }));
    }
}
