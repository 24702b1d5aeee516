//! The code releases in force (HPO, Orphanet, HGNC), held in memory, and the checks and
//! questions that need them: does a code exist in the release, what replaces an obsolete
//! one, what is its preferred label, which codes lie below it in the hierarchy.
//!
//! [`CodeCatalog`] is built by `store::codes` from the releases in force and held by
//! `service::Services` (swapped whole when an operator puts another release in force);
//! nothing here does I/O. Without a release of a system, that system's codes get the
//! format checks of `domain::codes` only, as before releases existed.
//!
//! Messages never echo a rejected code (input is untrusted; see `domain::codes`): a hint
//! names the codes the release offers instead.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;

use super::codes::{HpoTerm, ORPHA_UNDIAGNOSED, Orphacode};
use super::record::CaseRecord;
use super::{DomainError, FieldViolations};

/// A code system whose releases can be imported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CodeSystem {
    Hpo,
    Orphanet,
    Hgnc,
}

impl CodeSystem {
    pub const ALL: [CodeSystem; 3] = [CodeSystem::Hpo, CodeSystem::Orphanet, CodeSystem::Hgnc];

    /// As stored (`code_releases.system`) and typed on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            CodeSystem::Hpo => "hpo",
            CodeSystem::Orphanet => "orphanet",
            CodeSystem::Hgnc => "hgnc",
        }
    }

    /// As people write it.
    pub fn name(self) -> &'static str {
        match self {
            CodeSystem::Hpo => "HPO",
            CodeSystem::Orphanet => "Orphanet",
            CodeSystem::Hgnc => "HGNC",
        }
    }

    pub fn parse(s: &str) -> Option<CodeSystem> {
        CodeSystem::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

impl fmt::Display for CodeSystem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A release as stored: which system, its version and date as the files state them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseInfo {
    pub id: i64,
    pub system: CodeSystem,
    pub version: String,
    /// ISO date of the release, when the files give one.
    pub released_on: Option<String>,
    pub imported_at: chrono::DateTime<chrono::Utc>,
    /// The files it was imported from (names only).
    pub source: String,
    pub terms: i64,
    pub in_force: bool,
}

/// How another name of a code relates to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AliasKind {
    /// HPO `alt_id`: the id of a term merged into this one; stored as this one.
    AltId,
    /// HGNC previous symbol: given as a hint only.
    Previous,
    /// HGNC alias symbol: given as a hint only.
    Alias,
}

impl AliasKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AliasKind::AltId => "alt_id",
            AliasKind::Previous => "previous",
            AliasKind::Alias => "alias",
        }
    }

    pub fn parse(s: &str) -> Option<AliasKind> {
        match s {
            "alt_id" => Some(AliasKind::AltId),
            "previous" => Some(AliasKind::Previous),
            "alias" => Some(AliasKind::Alias),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
struct Term {
    label: String,
    obsolete: bool,
    replaced_by: Option<String>,
}

/// One release of one system, in memory: its codes with labels, the hierarchy, aliases.
#[derive(Debug, Clone)]
pub struct Release {
    pub info: ReleaseInfo,
    terms: HashMap<String, Term>,
    children: HashMap<String, Vec<String>>,
    parents: usize,
    aliases: HashMap<String, Vec<(String, AliasKind)>>,
}

/// What a release says about a code that was sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// A current code of the release.
    Current,
    /// Stored as another code: `note` says why (obsolete and replaced, or merged).
    Replaced { by: String, note: String },
    /// Not accepted: the description of the field violation, with a hint if there is one.
    Rejected(String),
}

impl Release {
    pub fn new(info: ReleaseInfo) -> Release {
        Release {
            info,
            terms: HashMap::new(),
            children: HashMap::new(),
            parents: 0,
            aliases: HashMap::new(),
        }
    }

    pub fn add_term(
        &mut self,
        code: String,
        label: String,
        obsolete: bool,
        replaced_by: Option<String>,
    ) {
        self.terms.insert(
            code,
            Term {
                label,
                obsolete,
                replaced_by,
            },
        );
    }

    pub fn add_parent(&mut self, code: String, parent: String) {
        self.children.entry(parent).or_default().push(code);
        self.parents += 1;
    }

    pub fn add_alias(&mut self, alias: String, code: String, kind: AliasKind) {
        self.aliases.entry(alias).or_default().push((code, kind));
    }

    /// "HPO 2025-01-16".
    pub fn name(&self) -> String {
        format!("{} {}", self.info.system.name(), self.info.version)
    }

    /// Number of codes (current and obsolete).
    pub fn len(&self) -> usize {
        self.terms.len()
    }

    pub fn is_empty(&self) -> bool {
        self.terms.is_empty()
    }

    /// Whether the release gives a hierarchy (HPO always; Orphanet with its
    /// classifications imported).
    pub fn has_hierarchy(&self) -> bool {
        self.parents > 0
    }

    /// The preferred label of a code of the release.
    pub fn label(&self, code: &str) -> Option<&str> {
        self.terms.get(code).map(|t| t.label.as_str())
    }

    /// Whether the release holds `code` at all: as a code (current or obsolete) or as
    /// another name of one (a merged id, a previous symbol, an alias).
    pub fn knows(&self, code: &str) -> bool {
        self.terms.contains_key(code) || self.aliases.contains_key(code)
    }

    /// `code` and every code below it in the hierarchy (subtypes at any depth), each once,
    /// `code` first; empty when the release does not know `code`.
    pub fn descendants(&self, code: &str) -> Vec<&str> {
        let Some((root, _)) = self.terms.get_key_value(code) else {
            return Vec::new();
        };
        let mut seen: HashSet<&str> = HashSet::from([root.as_str()]);
        let mut out = vec![root.as_str()];
        let mut queue = VecDeque::from([root.as_str()]);
        while let Some(next) = queue.pop_front() {
            for child in self.children.get(next).into_iter().flatten() {
                if seen.insert(child.as_str()) {
                    out.push(child.as_str());
                    queue.push_back(child.as_str());
                }
            }
        }
        out
    }

    /// Current codes whose label starts with `prefix` (case-insensitive), by label, at
    /// most `limit`.
    pub fn search_labels(&self, prefix: &str, limit: usize) -> Vec<(&str, &str)> {
        let prefix = prefix.to_lowercase();
        let mut found: Vec<(&str, &str)> = self
            .terms
            .iter()
            .filter(|(_, t)| !t.obsolete && t.label.to_lowercase().starts_with(&prefix))
            .map(|(c, t)| (c.as_str(), t.label.as_str()))
            .collect();
        found.sort_by(|a, b| a.1.cmp(b.1).then(a.0.cmp(b.0)));
        found.truncate(limit);
        found
    }

    fn current(&self, code: &str) -> bool {
        self.terms.get(code).is_some_and(|t| !t.obsolete)
    }

    fn with_label(&self, code: &str) -> String {
        match self.label(code) {
            Some(label) => format!("{code} ({label})"),
            None => code.to_owned(),
        }
    }

    /// What the release says about `code`. `replace`: whether an obsolete code with a
    /// replacement (and a merged id) is stored as its replacement (HPO) or rejected with
    /// the replacement as a hint.
    pub fn lookup(&self, code: &str, replace: bool) -> Lookup {
        let name = self.name();
        if let Some(term) = self.terms.get(code) {
            if !term.obsolete {
                return Lookup::Current;
            }
            return match term.replaced_by.as_deref().filter(|r| self.current(r)) {
                Some(by) if replace => Lookup::Replaced {
                    by: by.to_owned(),
                    note: format!(
                        "obsolete in {name}, replaced by {}; stored as {by}",
                        self.with_label(by)
                    ),
                },
                Some(by) => Lookup::Rejected(format!(
                    "is obsolete in {name}; use {} instead",
                    self.with_label(by)
                )),
                None => Lookup::Rejected(format!(
                    "is obsolete in {name} and has no replacement; choose a current code"
                )),
            };
        }
        if let Some(targets) = self.aliases.get(code) {
            let current: Vec<&(String, AliasKind)> =
                targets.iter().filter(|(c, _)| self.current(c)).collect();
            if let [(by, AliasKind::AltId)] = current.as_slice()
                && replace
            {
                return Lookup::Replaced {
                    by: by.clone(),
                    note: format!(
                        "an alternative id of {} in {name}; stored as {by}",
                        self.with_label(by)
                    ),
                };
            }
            if !current.is_empty() {
                let names: Vec<String> = current
                    .iter()
                    .take(5)
                    .map(|(c, kind)| {
                        let what = match kind {
                            AliasKind::AltId => "an alternative id",
                            AliasKind::Previous => "a previous symbol",
                            AliasKind::Alias => "an alias",
                        };
                        format!("{what} of {}", self.with_label(c))
                    })
                    .collect();
                return Lookup::Rejected(format!(
                    "is not a current code of {name}: it is {}; send the current code",
                    names.join(", ")
                ));
            }
        }
        let near = self.near(code);
        if near.is_empty() {
            Lookup::Rejected(format!("is not a code of {name}"))
        } else {
            let names: Vec<String> = near.iter().map(|c| self.with_label(c)).collect();
            Lookup::Rejected(format!(
                "is not a code of {name}; near matches: {}",
                names.join(", ")
            ))
        }
    }

    /// Current codes one edit away from `code` (a character replaced, left out, added, or
    /// two neighbours swapped), at most three, in order.
    fn near(&self, code: &str) -> Vec<String> {
        let (prefix, body) = match code.find(':') {
            Some(i) => code.split_at(i + 1),
            None => ("", code),
        };
        let alphabet: &[u8] = if prefix.is_empty() {
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-"
        } else {
            b"0123456789"
        };
        let fixed_width = self.info.system == CodeSystem::Hpo;
        let body = body.as_bytes();
        let mut candidates: Vec<Vec<u8>> = Vec::new();
        for i in 0..body.len() {
            for &c in alphabet {
                if c != body[i] {
                    let mut v = body.to_vec();
                    v[i] = c;
                    candidates.push(v);
                }
            }
            if i + 1 < body.len() && body[i] != body[i + 1] {
                let mut v = body.to_vec();
                v.swap(i, i + 1);
                candidates.push(v);
            }
            if !fixed_width {
                let mut v = body.to_vec();
                v.remove(i);
                candidates.push(v);
            }
        }
        if !fixed_width {
            for i in 0..=body.len() {
                for &c in alphabet {
                    let mut v = body.to_vec();
                    v.insert(i, c);
                    candidates.push(v);
                }
            }
        }
        let mut found: Vec<String> = Vec::new();
        for c in candidates {
            let Ok(c) = String::from_utf8(c) else {
                continue;
            };
            let c = format!("{prefix}{c}");
            if self.current(&c) && !found.contains(&c) {
                found.push(c);
            }
        }
        found.sort();
        found.truncate(3);
        found
    }
}

/// A code of a submitted record that was stored as another one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replacement {
    /// The field, relative to the record (`hpo_terms[2]`).
    pub field: String,
    pub given: String,
    pub stored: String,
    pub note: String,
}

/// The releases in force, one per system at most.
#[derive(Debug, Clone, Default)]
pub struct CodeCatalog {
    releases: Vec<Release>,
}

impl CodeCatalog {
    /// No release: format checks only.
    pub fn empty() -> CodeCatalog {
        CodeCatalog::default()
    }

    /// The catalog of these releases (the last one of a system wins).
    pub fn new(releases: Vec<Release>) -> CodeCatalog {
        let mut catalog = CodeCatalog::default();
        for release in releases {
            catalog
                .releases
                .retain(|r| r.info.system != release.info.system);
            catalog.releases.push(release);
        }
        catalog.releases.sort_by_key(|r| r.info.system);
        catalog
    }

    pub fn release(&self, system: CodeSystem) -> Option<&Release> {
        self.releases.iter().find(|r| r.info.system == system)
    }

    pub fn releases(&self) -> impl Iterator<Item = &Release> {
        self.releases.iter()
    }

    /// The ids of the releases in force, ascending (changes when another is put in force).
    pub fn fingerprint(&self) -> Vec<i64> {
        let mut ids: Vec<i64> = self.releases.iter().map(|r| r.info.id).collect();
        ids.sort_unstable();
        ids
    }

    /// The releases a record is checked against, as stored with each version
    /// ("hpo 2025-01-16, orphanet 4.1.7"); '' for format checks only.
    pub fn versions(&self) -> String {
        self.releases
            .iter()
            .map(|r| format!("{} {}", r.info.system, r.info.version))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The validation mode, for the log and the health details.
    pub fn mode(&self) -> String {
        let mut parts: Vec<String> = Vec::new();
        for system in CodeSystem::ALL {
            parts.push(match self.release(system) {
                Some(r) => format!("{} checked against {}", system.name(), r.info.version),
                None => format!(
                    "{}: format checks only (no release in force)",
                    system.name()
                ),
            });
        }
        parts.join("; ")
    }

    /// The preferred label of a code, from the release in force of its system.
    pub fn label(&self, system: CodeSystem, code: &str) -> Option<&str> {
        self.release(system)?.label(code)
    }

    /// Checks a (well-formed) record against the releases in force: every Orphacode, HPO
    /// term and HGNC symbol must be a current code of its release. Deprecated Orphacodes
    /// and obsolete HPO terms with a replacement, and merged HPO ids, are replaced in
    /// `record` (returned as [`Replacement`]s); an HPO replacement already in the list is
    /// dropped as a duplicate.
    /// Field paths are relative to the record.
    pub fn check(&self, record: &mut CaseRecord) -> Result<Vec<Replacement>, FieldViolations> {
        let mut v = FieldViolations::new();
        let mut replaced = Vec::new();
        if let (Some(release), Some(code)) =
            (self.release(CodeSystem::Orphanet), record.orphacode.clone())
            && code.number() != ORPHA_UNDIAGNOSED
        {
            match release.lookup(code.as_str(), true) {
                Lookup::Current => {}
                Lookup::Replaced { by, note } => {
                    if let Some(by_code) = v.check(
                        "diagnosis.orphacode",
                        Orphacode::parse(&by)
                            .map_err(|_| DomainError::Rule("has a malformed replacement"))
                            .and_then(|by| {
                                // A diagnosed case is never stored as undiagnosed: that
                                // needs no diagnosis date, and research tables rest on it
                                // (`aggregate::impossible`).
                                if by.number() == ORPHA_UNDIAGNOSED {
                                    Err(DomainError::Rule(
                                        "is deprecated in the release in force and replaced by ORPHA:616874 (undiagnosed): give the diagnosis a current code, or submit the case as undiagnosed",
                                    ))
                                } else {
                                    Ok(by)
                                }
                            }),
                    ) {
                        replaced.push(Replacement {
                            field: "diagnosis.orphacode".into(),
                            given: code.to_string(),
                            stored: by,
                            note,
                        });
                        record.orphacode = Some(by_code);
                    }
                }
                Lookup::Rejected(why) => v.push("diagnosis.orphacode", why),
            }
        }
        if let Some(release) = self.release(CodeSystem::Hpo) {
            let mut terms: Vec<HpoTerm> = Vec::with_capacity(record.hpo_terms.len());
            for (i, term) in record.hpo_terms.iter().enumerate() {
                let field = format!("hpo_terms[{i}]");
                let stored = match release.lookup(term.as_str(), true) {
                    Lookup::Current => term.clone(),
                    Lookup::Replaced { by, note } => {
                        let Some(by_term) = v.check(
                            field.clone(),
                            HpoTerm::parse(&by)
                                .map_err(|_| DomainError::Rule("has a malformed replacement")),
                        ) else {
                            continue;
                        };
                        let duplicate =
                            record.hpo_terms.contains(&by_term) || terms.contains(&by_term);
                        replaced.push(Replacement {
                            field: field.clone(),
                            given: term.to_string(),
                            stored: by.clone(),
                            note: if duplicate {
                                format!("{note}, which the record lists already (kept once)")
                            } else {
                                note
                            },
                        });
                        if duplicate {
                            continue;
                        }
                        by_term
                    }
                    Lookup::Rejected(why) => {
                        v.push(field, why);
                        continue;
                    }
                };
                terms.push(stored);
            }
            record.hpo_terms = terms;
        }
        if let Some(release) = self.release(CodeSystem::Hgnc) {
            for (i, finding) in record.genetic_findings.iter().enumerate() {
                if let Lookup::Rejected(why) | Lookup::Replaced { note: why, .. } =
                    release.lookup(finding.gene.as_str(), false)
                {
                    v.push(format!("genetic_findings[{i}].gene"), why);
                }
            }
        }
        v.into_result()?;
        Ok(replaced)
    }

    /// The codes a research filter value stands for: the value and, with
    /// `with_descendants`, every code below it in the release in force. `None` when the
    /// system has no release in force, or (with descendants) when its release gives no
    /// hierarchy; an empty list when the release does not know the code.
    pub fn expand(
        &self,
        system: CodeSystem,
        code: &str,
        with_descendants: bool,
    ) -> Option<Vec<String>> {
        let release = self.release(system)?;
        if !with_descendants {
            return Some(vec![code.to_owned()]);
        }
        if !release.has_hierarchy() {
            return None;
        }
        Some(
            release
                .descendants(code)
                .into_iter()
                .map(str::to_owned)
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{GeneticFinding, HgncSymbol, Orphacode};

    fn info(system: CodeSystem, id: i64) -> ReleaseInfo {
        ReleaseInfo {
            id,
            system,
            version: "test".into(),
            released_on: None,
            imported_at: chrono::DateTime::UNIX_EPOCH,
            source: String::new(),
            terms: 0,
            in_force: true,
        }
    }

    fn hpo() -> Release {
        let mut r = Release::new(info(CodeSystem::Hpo, 1));
        r.add_term(
            "HP:0000118".into(),
            "Phenotypic abnormality".into(),
            false,
            None,
        );
        r.add_term("HP:0001250".into(), "Seizure".into(), false, None);
        r.add_term(
            "HP:0002069".into(),
            "Bilateral tonic-clonic seizure".into(),
            false,
            None,
        );
        r.add_term(
            "HP:0007359".into(),
            "Focal-onset seizure".into(),
            false,
            None,
        );
        r.add_term(
            "HP:0000057".into(),
            "obsolete Clitoromegaly".into(),
            true,
            Some("HP:0008665".into()),
        );
        r.add_term(
            "HP:0008665".into(),
            "Clitoral hypertrophy".into(),
            false,
            None,
        );
        r.add_term("HP:0000001".into(), "obsolete All".into(), true, None);
        r.add_parent("HP:0001250".into(), "HP:0000118".into());
        r.add_parent("HP:0002069".into(), "HP:0001250".into());
        r.add_parent("HP:0007359".into(), "HP:0001250".into());
        r.add_alias("HP:0000624".into(), "HP:0007359".into(), AliasKind::AltId);
        r
    }

    fn record(terms: &[&str]) -> CaseRecord {
        let mut r =
            crate::api::convert::case_record(&crate::fixtures::record(), crate::fixtures::today())
                .expect("the fixture is valid");
        r.hpo_terms = terms.iter().map(|t| HpoTerm::parse(t).unwrap()).collect();
        r
    }

    #[test]
    fn descendants_are_the_term_and_everything_below_it() {
        let r = hpo();
        let mut d = r.descendants("HP:0001250");
        d.sort();
        assert_eq!(d, ["HP:0001250", "HP:0002069", "HP:0007359"]);
        assert!(r.descendants("HP:9999999").is_empty());
    }

    #[test]
    fn obsolete_hpo_terms_are_stored_as_their_replacement_and_say_so() {
        let catalog = CodeCatalog::new(vec![hpo()]);
        let mut r = record(&["HP:0000057", "HP:0001250", "HP:0000624"]);
        let replaced = catalog.check(&mut r).unwrap();
        let stored: Vec<&str> = r.hpo_terms.iter().map(HpoTerm::as_str).collect();
        assert_eq!(stored, ["HP:0008665", "HP:0001250", "HP:0007359"]);
        assert_eq!(replaced.len(), 2);
        assert_eq!(replaced[0].field, "hpo_terms[0]");
        assert!(
            replaced[0]
                .note
                .contains("replaced by HP:0008665 (Clitoral hypertrophy)")
        );
        assert!(replaced[1].note.contains("alternative id"));
    }

    #[test]
    fn a_replacement_already_listed_is_kept_once() {
        let catalog = CodeCatalog::new(vec![hpo()]);
        let mut r = record(&["HP:0008665", "HP:0000057"]);
        let replaced = catalog.check(&mut r).unwrap();
        assert_eq!(r.hpo_terms.len(), 1);
        assert!(replaced[0].note.contains("kept once"));
    }

    #[test]
    fn unknown_and_unreplaced_obsolete_terms_are_rejected_with_a_hint() {
        let catalog = CodeCatalog::new(vec![hpo()]);
        let mut r = record(&["HP:0001251", "HP:0000001"]);
        let v = catalog.check(&mut r).unwrap_err();
        let all: Vec<_> = v.iter().collect();
        assert_eq!(all[0].field, "hpo_terms[0]");
        assert!(
            all[0]
                .description
                .contains("near matches: HP:0001250 (Seizure)")
        );
        assert!(!all[0].description.contains("HP:0001251"));
        assert_eq!(all[1].field, "hpo_terms[1]");
        assert!(all[1].description.contains("obsolete"));
    }

    #[test]
    fn orphacodes_and_genes_are_checked_against_their_releases() {
        let mut orpha = Release::new(info(CodeSystem::Orphanet, 2));
        orpha.add_term("ORPHA:558".into(), "Marfan syndrome".into(), false, None);
        orpha.add_term(
            "ORPHA:1000".into(),
            "old".into(),
            true,
            Some("ORPHA:558".into()),
        );
        let mut hgnc = Release::new(info(CodeSystem::Hgnc, 3));
        hgnc.add_term(
            "CFTR".into(),
            "CF transmembrane conductance regulator".into(),
            false,
            None,
        );
        hgnc.add_alias("ABC35".into(), "CFTR".into(), AliasKind::Alias);
        let catalog = CodeCatalog::new(vec![orpha, hgnc]);
        let mut r = record(&[]);
        r.orphacode = Some(Orphacode::parse("ORPHA:1000").unwrap());
        r.genetic_findings = vec![GeneticFinding {
            gene: HgncSymbol::parse("ABC35").unwrap(),
            variants: vec![],
        }];
        let v = catalog.check(&mut r).unwrap_err();
        let all: Vec<_> = v.iter().collect();
        assert_eq!(all.len(), 1, "{all:?}");
        assert_eq!(all[0].field, "genetic_findings[0].gene");
        assert!(all[0].description.contains("an alias of CFTR"));
        // A deprecated Orphacode with a replacement is stored as its replacement, and
        // the record says so.
        r.genetic_findings[0].gene = HgncSymbol::parse("CFTR").unwrap();
        r.orphacode = Some(Orphacode::parse("ORPHA:1000").unwrap());
        let replaced = catalog.check(&mut r).unwrap();
        assert_eq!(r.orphacode.as_ref().unwrap().as_str(), "ORPHA:558");
        assert_eq!(replaced.len(), 1);
        assert_eq!(
            (replaced[0].field.as_str(), replaced[0].given.as_str()),
            ("diagnosis.orphacode", "ORPHA:1000")
        );
        assert!(
            replaced[0]
                .note
                .contains("replaced by ORPHA:558 (Marfan syndrome)"),
            "{replaced:?}"
        );
        assert_eq!(catalog.check(&mut r), Ok(vec![]));
        // Never replaced by "undiagnosed": a diagnosed case keeps its diagnosis date, and
        // an undiagnosed one has none.
        let mut orpha = Release::new(info(CodeSystem::Orphanet, 4));
        orpha.add_term(
            "ORPHA:616874".into(),
            "Rare disorder without a determined diagnosis after full investigation".into(),
            false,
            None,
        );
        orpha.add_term(
            "ORPHA:1001".into(),
            "old".into(),
            true,
            Some("ORPHA:616874".into()),
        );
        let to_undiagnosed = CodeCatalog::new(vec![orpha]);
        r.orphacode = Some(Orphacode::parse("ORPHA:1001").unwrap());
        let v = to_undiagnosed.check(&mut r).unwrap_err();
        let all: Vec<_> = v.iter().collect();
        assert_eq!(all[0].field, "diagnosis.orphacode");
        assert!(all[0].description.contains("ORPHA:616874"), "{all:?}");
        assert_eq!(r.orphacode.as_ref().unwrap().as_str(), "ORPHA:1001");
        // Product 1 alone gives no hierarchy: subtypes cannot be asked for.
        assert_eq!(
            catalog.expand(CodeSystem::Orphanet, "ORPHA:558", true),
            None
        );
        assert_eq!(
            catalog.expand(CodeSystem::Orphanet, "ORPHA:558", false),
            Some(vec!["ORPHA:558".to_string()])
        );
    }

    #[test]
    fn without_a_release_only_formats_are_checked() {
        let catalog = CodeCatalog::empty();
        let mut r = record(&["HP:9999999"]);
        assert_eq!(catalog.check(&mut r), Ok(vec![]));
        assert_eq!(catalog.versions(), "");
        assert!(catalog.mode().contains("HPO: format checks only"));
        assert_eq!(catalog.expand(CodeSystem::Hpo, "HP:0001250", true), None);
    }
}
