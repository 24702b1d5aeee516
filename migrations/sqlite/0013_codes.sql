-- Code releases (SQLite). Keep in step with ../postgres/0013_codes.sql. (src/codes/,
-- src/store/codes.rs, src/domain/catalog.rs, docs/codes.md.)
--
-- A release of a code system (HPO, Orphanet, HGNC) as imported by `ern-registry codes
-- import`: its version and date as the release files state them. Several releases of a
-- system may be kept; at most one per system is in force (`in_force` = 1), and that one is
-- what submissions are checked against and research questions expand along.
CREATE TABLE code_releases (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    system      TEXT    NOT NULL CHECK (system IN ('hpo', 'orphanet', 'hgnc')),
    version     TEXT    NOT NULL,
    released_on TEXT,
    imported_at INTEGER NOT NULL,
    source      TEXT    NOT NULL,
    terms       INTEGER NOT NULL,
    in_force    INTEGER NOT NULL DEFAULT 0 CHECK (in_force IN (0, 1)),
    UNIQUE (system, version)
);
CREATE UNIQUE INDEX code_releases_in_force ON code_releases (system) WHERE in_force = 1;

-- The codes of a release with their preferred label. `obsolete` = 1: the release keeps
-- the code only as obsolete (deprecated); `replaced_by`: the code the release names
-- instead (HPO `replaced_by`, Orphanet "Moved to"), if any.
CREATE TABLE code_terms (
    release_id  INTEGER NOT NULL REFERENCES code_releases (id) ON DELETE CASCADE,
    code        TEXT    NOT NULL,
    label       TEXT    NOT NULL,
    obsolete    INTEGER NOT NULL CHECK (obsolete IN (0, 1)),
    replaced_by TEXT,
    PRIMARY KEY (release_id, code)
);

-- The hierarchy a release gives: `code` is a direct subtype (HPO is_a, Orphanet
-- classification child) of `parent`.
CREATE TABLE code_parents (
    release_id INTEGER NOT NULL REFERENCES code_releases (id) ON DELETE CASCADE,
    code       TEXT    NOT NULL,
    parent     TEXT    NOT NULL,
    PRIMARY KEY (release_id, code, parent)
);
CREATE INDEX code_parents_parent ON code_parents (release_id, parent);

-- Other names of a code in a release: `alt_id` (HPO: a merged term's id, stored as the
-- primary one), `previous` and `alias` (HGNC previous and alias symbols, given as hints).
CREATE TABLE code_aliases (
    release_id INTEGER NOT NULL REFERENCES code_releases (id) ON DELETE CASCADE,
    alias      TEXT    NOT NULL,
    code       TEXT    NOT NULL,
    kind       TEXT    NOT NULL CHECK (kind IN ('alt_id', 'previous', 'alias')),
    PRIMARY KEY (release_id, alias, code)
);

-- The releases a version was checked against ("hpo 2025-01-16, orphanet 4.1.7"), or ''
-- when none was in force (format checks only). NULL: stored before code releases existed.
ALTER TABLE case_versions ADD COLUMN code_releases TEXT;

-- HPO terms of each version, for research questions along the ontology (as case_genes).
CREATE TABLE case_phenotypes (
    case_id INTEGER NOT NULL,
    version INTEGER NOT NULL,
    term    TEXT    NOT NULL,
    PRIMARY KEY (case_id, version, term),
    FOREIGN KEY (case_id, version) REFERENCES case_versions (case_id, version) ON DELETE CASCADE
);
WITH RECURSIVE split (case_id, version, term, rest) AS (
    SELECT case_id, version, '', hpo_terms || ' ' FROM case_versions WHERE hpo_terms <> ''
    UNION ALL
    SELECT case_id, version, substr(rest, 1, instr(rest, ' ') - 1), substr(rest, instr(rest, ' ') + 1)
    FROM split WHERE rest <> ''
)
INSERT OR IGNORE INTO case_phenotypes (case_id, version, term)
SELECT case_id, version, term FROM split WHERE term <> '';

-- The HPO terms of the version that represents the patient (as stored in the version,
-- separated by one space), kept by the writer with the row, loaded by the research index.
ALTER TABLE patients ADD COLUMN phenotypes TEXT NOT NULL DEFAULT '';
UPDATE patients SET phenotypes = COALESCE(
    (SELECT v.hpo_terms FROM case_versions v
     WHERE v.case_id = patients.case_id AND v.version = patients.version), '');
