//! The Orphanet nomenclature as Orphadata publishes it, read as a stream of XML events
//! (`quick-xml`), one element path at a time.
//!
//! - `en_product1.xml` ("Rare diseases and alignment with terminologies and databases"):
//!   every `Disorder` with its `OrphaCode` and preferred `Name`; a `DisorderFlag` whose
//!   label starts with "Inactive" (deprecated, obsolete, non rare in Europe) makes the
//!   code obsolete, and its "Moved to" (or else "Referred to") association names the code
//!   to use instead. Product 1 gives no hierarchy.
//! - `en_product3_*.xml` (the classifications): nested `ClassificationNode`s; each child
//!   node's disorder is a subtype of its parent node's. Only with these does a release
//!   give the hierarchy that "this Orphacode or any of its subtypes" expands along.
//!
//! The release's version is the date the product was generated (the root `JDBOR`
//! element's `date` attribute, `2024-12-02 07:40:52` gives `2024-12-02`).

use std::path::Path;

use quick_xml::Reader;
use quick_xml::encoding::DecodingReader;
use quick_xml::events::Event;

use super::{Header, ImportError, Item, iso_date_prefix, open};

/// A streaming walk over an XML file: the path of element names from the root, and the
/// text of the element being read.
struct Walk<R: std::io::BufRead> {
    reader: Reader<DecodingReader<R>>,
    buf: Vec<u8>,
    path: Vec<String>,
    text: String,
}

enum Step {
    Start,
    /// The element at the end of `path` closes; `text` holds its text.
    End,
    Eof,
}

impl<R: std::io::BufRead> Walk<R> {
    fn new(reader: R) -> Self {
        // Orphadata declares (and writes) ISO-8859-1: decoded to UTF-8 as declared.
        let mut reader = Reader::from_reader(DecodingReader::new(reader));
        // Text is trimmed per element (an entity splits a text into several events).
        reader.config_mut().trim_text(false);
        Walk {
            reader,
            buf: Vec::new(),
            path: Vec::new(),
            text: String::new(),
        }
    }

    fn ends_with(&self, tail: &[&str]) -> bool {
        self.path.len() >= tail.len()
            && self.path[self.path.len() - tail.len()..]
                .iter()
                .zip(tail)
                .all(|(a, b)| a == b)
    }

    /// The next start or end of an element; `attrs` gets the attributes of the root.
    fn step(
        &mut self,
        path: &Path,
        root_attrs: &mut Vec<(String, String)>,
    ) -> Result<Step, ImportError> {
        loop {
            self.buf.clear();
            let event = self
                .reader
                .read_event_into(&mut self.buf)
                .map_err(|e| ImportError::file(path, e))?;
            match event {
                Event::Start(e) => {
                    if self.path.is_empty() {
                        for a in e.attributes().flatten() {
                            let key = a.key.as_ref().to_owned();
                            let value = a
                                .normalized_value(quick_xml::XmlVersion::Implicit1_0)
                                .map_err(|e| ImportError::file(path, e))?
                                .into_owned();
                            root_attrs.push((key, value));
                        }
                    }
                    self.path.push(e.local_name().as_ref().to_owned());
                    self.text.clear();
                    return Ok(Step::Start);
                }
                Event::Decl(d) => {
                    if let Some(encoding) = d.encoder() {
                        self.reader.get_mut().set_encoding(encoding);
                    }
                }
                Event::Empty(_) => {}
                Event::Text(t) => self.text.push_str(&t.xml10_content()),
                Event::CData(t) => self.text.push_str(&t),
                Event::GeneralRef(r) => {
                    if let Some(c) = r
                        .resolve_char_ref()
                        .map_err(|e| ImportError::file(path, e))?
                    {
                        self.text.push(c);
                    } else if let Some(s) = quick_xml::escape::resolve_xml_entity(&r) {
                        self.text.push_str(s);
                    }
                }
                Event::End(_) => return Ok(Step::End),
                Event::Eof => return Ok(Step::Eof),
                _ => {}
            }
        }
    }

    fn close(&mut self) {
        self.path.pop();
        self.text.clear();
    }
}

fn root_header(
    path: &Path,
    attrs: &[(String, String)],
    root: Option<&str>,
) -> Result<Header, ImportError> {
    if root != Some("JDBOR") {
        return Err(ImportError::file(
            path,
            "the root element is not JDBOR: not an Orphadata product",
        ));
    }
    let date = attrs
        .iter()
        .find(|(k, _)| k == "date")
        .and_then(|(_, v)| iso_date_prefix(v));
    Ok(Header {
        version: date.clone(),
        released_on: date,
    })
}

/// Reads `en_product1.xml`.
pub fn read_product1(
    path: &Path,
    on_header: &mut dyn FnMut(&Header) -> Result<(), ImportError>,
    sink: &mut dyn FnMut(Item) -> Result<(), ImportError>,
) -> Result<Header, ImportError> {
    let mut walk = Walk::new(open(path)?);
    let mut attrs = Vec::new();
    let mut header = None;
    // The disorder being read.
    let mut code: Option<String> = None;
    let mut label = String::new();
    let mut inactive = false;
    let mut target: Option<String> = None;
    let mut moved_to: Option<String> = None;
    let mut referred_to: Option<String> = None;
    let mut disorders = 0usize;
    loop {
        match walk.step(path, &mut attrs)? {
            Step::Eof => break,
            Step::Start => {
                if walk.path.len() == 1 {
                    let found = root_header(path, &attrs, walk.path.first().map(String::as_str))?;
                    on_header(&found)?;
                    header = Some(found);
                }
                if walk.ends_with(&["DisorderList", "Disorder"]) {
                    code = None;
                    label.clear();
                    inactive = false;
                    moved_to = None;
                    referred_to = None;
                }
            }
            Step::End => {
                if walk.ends_with(&["DisorderList", "Disorder", "OrphaCode"]) {
                    code = Some(format!("ORPHA:{}", walk.text.trim()));
                } else if walk.ends_with(&["DisorderList", "Disorder", "Name"]) {
                    label = walk.text.trim().to_owned();
                } else if walk.ends_with(&["DisorderFlag", "Label"]) {
                    inactive |= walk.text.trim().to_lowercase().starts_with("inactive");
                } else if walk.ends_with(&["TargetDisorder", "OrphaCode"]) {
                    target = Some(format!("ORPHA:{}", walk.text.trim()));
                } else if walk.ends_with(&["DisorderDisorderAssociationType", "Name"]) {
                    match walk.text.trim() {
                        "Moved to" => moved_to = target.take(),
                        "Referred to" => referred_to = target.take(),
                        _ => target = None,
                    }
                } else if walk.ends_with(&["DisorderList", "Disorder"]) {
                    let Some(code) = code.take().filter(|c| c.len() > "ORPHA:".len()) else {
                        return Err(ImportError::file(
                            path,
                            format!("disorder {} has no OrphaCode", disorders + 1),
                        ));
                    };
                    disorders += 1;
                    sink(Item::Term {
                        code,
                        label: std::mem::take(&mut label),
                        obsolete: inactive,
                        replaced_by: if inactive {
                            moved_to.take().or(referred_to.take())
                        } else {
                            None
                        },
                    })?;
                }
                walk.close();
            }
        }
    }
    let header = header.ok_or_else(|| ImportError::file(path, "empty"))?;
    if disorders == 0 {
        return Err(ImportError::file(path, "holds no Disorder"));
    }
    Ok(header)
}

/// Reads a classification file (`en_product3_*.xml`): its nodes as terms (known from
/// product 1 already, as a rule) and each node's children as its subtypes.
pub fn read_classification(
    path: &Path,
    sink: &mut dyn FnMut(Item) -> Result<(), ImportError>,
) -> Result<(), ImportError> {
    let mut walk = Walk::new(open(path)?);
    let mut attrs = Vec::new();
    // One entry per open ClassificationNode: its disorder's code, once read.
    let mut nodes: Vec<Option<String>> = Vec::new();
    let mut label = String::new();
    let mut links = 0usize;
    loop {
        match walk.step(path, &mut attrs)? {
            Step::Eof => break,
            Step::Start => {
                if walk.path.len() == 1 {
                    root_header(path, &attrs, walk.path.first().map(String::as_str))?;
                }
                if walk.ends_with(&["ClassificationNode"]) {
                    nodes.push(None);
                }
            }
            Step::End => {
                if walk.ends_with(&["ClassificationNode", "Disorder", "Name"]) {
                    label = walk.text.trim().to_owned();
                } else if walk.ends_with(&["ClassificationNode", "Disorder", "OrphaCode"]) {
                    let code = format!("ORPHA:{}", walk.text.trim());
                    if let Some(top) = nodes.last_mut() {
                        *top = Some(code);
                    }
                } else if walk.ends_with(&["ClassificationNode", "Disorder"]) {
                    let Some(Some(code)) = nodes.last().cloned() else {
                        return Err(ImportError::file(
                            path,
                            "a classification node without an OrphaCode",
                        ));
                    };
                    sink(Item::Term {
                        code: code.clone(),
                        label: std::mem::take(&mut label),
                        obsolete: false,
                        replaced_by: None,
                    })?;
                    if let Some(Some(parent)) = nodes.len().checked_sub(2).map(|i| &nodes[i]) {
                        links += 1;
                        sink(Item::Parent {
                            code,
                            parent: parent.clone(),
                        })?;
                    }
                } else if walk.ends_with(&["ClassificationNode"]) {
                    nodes.pop();
                }
                walk.close();
            }
        }
    }
    if links == 0 {
        return Err(ImportError::file(
            path,
            "holds no classification link: not an Orphanet classification (en_product3_*.xml)",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::{Source, fixture, read_all};
    use super::*;

    #[test]
    fn product1_and_a_classification_give_names_obsoletes_and_subtypes() {
        let (header, items) = read_all(&Source::Orphanet {
            product1: fixture("en_product1.xml"),
            classifications: vec![fixture("en_product3_156.xml")],
        });
        assert_eq!(header.version.as_deref(), Some("2024-12-02"));
        assert!(items.contains(&Item::Term {
            code: "ORPHA:558".into(),
            label: "Marfan syndrome".into(),
            obsolete: false,
            replaced_by: None,
        }));
        assert!(items.contains(&Item::Term {
            code: "ORPHA:99999".into(),
            label: "Deprecated entity: moved & merged".into(),
            obsolete: true,
            replaced_by: Some("ORPHA:558".into()),
        }));
        // Obsolete without a "Moved to" or "Referred to": no replacement.
        assert!(items.contains(&Item::Term {
            code: "ORPHA:88888".into(),
            label: "Obsolete entity without successor".into(),
            obsolete: true,
            replaced_by: None,
        }));
        // The file is ISO-8859-1, as Orphadata publishes it.
        assert!(items.contains(&Item::Term {
            code: "ORPHA:289390".into(),
            label: "Sj\u{f6}gren syndrome".into(),
            obsolete: false,
            replaced_by: None,
        }));
        assert!(items.contains(&Item::Parent {
            code: "ORPHA:284963".into(),
            parent: "ORPHA:558".into(),
        }));
        assert!(items.contains(&Item::Parent {
            code: "ORPHA:558".into(),
            parent: "ORPHA:98249".into(),
        }));
    }

    #[test]
    fn a_file_that_is_not_an_orphadata_product_is_refused() {
        let err = read_product1(&fixture("hp.obo"), &mut |_| Ok(()), &mut |_| Ok(())).unwrap_err();
        assert!(!err.to_string().is_empty());
    }
}
