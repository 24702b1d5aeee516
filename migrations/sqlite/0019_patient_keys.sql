-- A number per patient, in order of first write (SQLite). Keep in step with
-- ../postgres/0019_patient_keys.sql. (docs/architecture.md "Patient keys";
-- docs/benchmarks.md "Patient keys in order of arrival".)
--
-- A pseudonym is an HMAC: uniformly spread, so every index keyed by it takes each new
-- patient at a random place, one page of its own per patient. A submission entered five
-- such indexes (consent history, current consent, the case's unique key, the research
-- row, the centre's cases), and the pages they dirtied were most of what a commit writes:
-- the same rows with pseudonyms in increasing order inserted about five times as fast.
-- `patient_keys` gives each patient an `id` the first time anything is written about them;
-- the history, the decisions in force, the cases and the research rows are keyed by that
-- number, which grows with every new patient, so their indexes are appended to. Two
-- indexes stay keyed by the pseudonym: `patient_keys`' own, and `cases_registry_centre`
-- (ExportPhenopackets pages a centre's cases in pseudonym order). A key row is never deleted or changed (an erasure
-- keeps the consent history, which refers to it) and holds no more than the history
-- already did. The tables keep their `pseudonym` column, so rows read back still carry it.
CREATE TABLE patient_keys (
    id          INTEGER PRIMARY KEY,
    registry_id INTEGER NOT NULL REFERENCES registries (id),
    pseudonym   TEXT    NOT NULL,
    UNIQUE (registry_id, pseudonym)
);
INSERT INTO patient_keys (registry_id, pseudonym)
SELECT registry_id, pseudonym FROM consent_events
UNION SELECT registry_id, pseudonym FROM consent_current
UNION SELECT registry_id, pseudonym FROM cases
UNION SELECT registry_id, pseudonym FROM patients
ORDER BY 1, 2;

-- The history: the key column, and the index of a patient's decisions by it. (SQLite adds
-- a column only without NOT NULL here; the writer always sets it, and
-- tests/api/migrations.rs checks no row lacks it.)
ALTER TABLE consent_events ADD COLUMN patient INTEGER REFERENCES patient_keys (id);
UPDATE consent_events SET patient = (
    SELECT k.id FROM patient_keys k
    WHERE k.registry_id = consent_events.registry_id AND k.pseudonym = consent_events.pseudonym);
DROP INDEX consent_events_in_force;
CREATE INDEX consent_events_in_force ON consent_events (patient, scope, given_at, id);

-- The decisions in force, keyed by patient number and scope.
CREATE TABLE consent_current_by_key (
    patient     INTEGER NOT NULL REFERENCES patient_keys (id),
    scope       TEXT    NOT NULL,
    registry_id INTEGER NOT NULL REFERENCES registries (id),
    pseudonym   TEXT    NOT NULL,
    event_id    INTEGER NOT NULL REFERENCES consent_events (id),
    state       TEXT    NOT NULL,
    given_at    INTEGER NOT NULL,
    expires_at  INTEGER,
    PRIMARY KEY (patient, scope)
) WITHOUT ROWID;
INSERT INTO consent_current_by_key (patient, scope, registry_id, pseudonym, event_id, state,
                                    given_at, expires_at)
SELECT k.id, c.scope, c.registry_id, c.pseudonym, c.event_id, c.state, c.given_at, c.expires_at
FROM consent_current c
JOIN patient_keys k ON k.registry_id = c.registry_id AND k.pseudonym = c.pseudonym;
DROP INDEX consent_current_expiry;
DROP TABLE consent_current;
ALTER TABLE consent_current_by_key RENAME TO consent_current;
CREATE INDEX consent_current_expiry
    ON consent_current (registry_id, state, expires_at, pseudonym, scope)
    WHERE expires_at IS NOT NULL;

-- Cases keyed (patient, centre), and the tables that refer to them. SQLite cannot drop a
-- table's UNIQUE constraint, so `cases` is built anew; its versions, their genes and HPO
-- terms, and the research rows refer to it and are built anew with it, in this order:
-- renamed out of the way (a rename carries the references of the tables renamed later),
-- built, filled with the same rows and ids, and the old ones dropped children first, so
-- that no drop cascades into a table still in use. The whole migration is one transaction.
DROP INDEX cases_registry_centre;
DROP INDEX case_versions_orphacode;
DROP INDEX patients_slot;
ALTER TABLE patients RENAME TO patients_before_keys;
ALTER TABLE case_phenotypes RENAME TO case_phenotypes_before_keys;
ALTER TABLE case_genes RENAME TO case_genes_before_keys;
ALTER TABLE case_versions RENAME TO case_versions_before_keys;
ALTER TABLE cases RENAME TO cases_before_keys;

CREATE TABLE cases (
    id              INTEGER PRIMARY KEY,
    patient         INTEGER NOT NULL REFERENCES patient_keys (id),
    registry_id     INTEGER NOT NULL REFERENCES registries (id),
    pseudonym       TEXT    NOT NULL,
    centre_id       INTEGER NOT NULL REFERENCES centres (id),
    current_version INTEGER NOT NULL,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    UNIQUE (patient, centre_id)
);
CREATE TABLE case_versions (
    case_id            INTEGER NOT NULL REFERENCES cases (id) ON DELETE CASCADE,
    version            INTEGER NOT NULL,
    recorded_at        INTEGER NOT NULL,
    recorded_by        INTEGER NOT NULL REFERENCES principals (id),
    birth_year_month   TEXT    NOT NULL,
    sex                TEXT    NOT NULL,
    status             TEXT    NOT NULL,
    date_of_death      TEXT,
    first_contact_date TEXT,
    onset_kind         TEXT    NOT NULL,
    onset_date         TEXT,
    undiagnosed        INTEGER NOT NULL,
    orphacode          INTEGER,            -- the number of ORPHA:nnnn
    diagnosis_date     TEXT,
    icd10              TEXT    NOT NULL,   -- space-separated codes
    icd11              TEXT    NOT NULL,
    omim               TEXT    NOT NULL,
    hpo_terms          TEXT    NOT NULL,
    icf_codes          TEXT    NOT NULL,
    genetic_findings   TEXT    NOT NULL,   -- "GENE|variant|variant GENE2"
    diagnosis_year     INTEGER,
    onset_age_days     INTEGER,
    diagnosis_age_days INTEGER,
    delay_days         INTEGER,
    code_releases      TEXT,
    PRIMARY KEY (case_id, version)
);
CREATE TABLE case_genes (
    case_id INTEGER NOT NULL,
    version INTEGER NOT NULL,
    gene    TEXT    NOT NULL,
    PRIMARY KEY (case_id, version, gene),
    FOREIGN KEY (case_id, version) REFERENCES case_versions (case_id, version) ON DELETE CASCADE
);
CREATE TABLE case_phenotypes (
    case_id INTEGER NOT NULL,
    version INTEGER NOT NULL,
    term    TEXT    NOT NULL,
    PRIMARY KEY (case_id, version, term),
    FOREIGN KEY (case_id, version) REFERENCES case_versions (case_id, version) ON DELETE CASCADE
);
CREATE TABLE patients (
    registry_id        INTEGER NOT NULL REFERENCES registries (id),
    patient            INTEGER NOT NULL REFERENCES patient_keys (id),
    pseudonym          TEXT    NOT NULL,
    case_id            INTEGER NOT NULL REFERENCES cases (id),
    version            INTEGER NOT NULL,
    centre_id          INTEGER NOT NULL REFERENCES centres (id),
    country            TEXT    NOT NULL,
    orphacode          INTEGER,
    sex                TEXT    NOT NULL,
    status             TEXT    NOT NULL,
    diagnosis_year     INTEGER,
    onset_age_days     INTEGER,
    diagnosis_age_days INTEGER,
    delay_days         INTEGER,
    eligible           INTEGER NOT NULL,
    eligible_until     INTEGER,
    slot               INTEGER,
    genes              TEXT    NOT NULL DEFAULT '',
    phenotypes         TEXT    NOT NULL DEFAULT '',
    PRIMARY KEY (registry_id, patient)
) WITHOUT ROWID;

INSERT INTO cases (id, patient, registry_id, pseudonym, centre_id, current_version, created_at,
                   updated_at)
SELECT c.id, k.id, c.registry_id, c.pseudonym, c.centre_id, c.current_version, c.created_at,
       c.updated_at
FROM cases_before_keys c
JOIN patient_keys k ON k.registry_id = c.registry_id AND k.pseudonym = c.pseudonym
ORDER BY c.id;
INSERT INTO case_versions (case_id, version, recorded_at, recorded_by, birth_year_month, sex,
                           status, date_of_death, first_contact_date, onset_kind, onset_date,
                           undiagnosed, orphacode, diagnosis_date, icd10, icd11, omim, hpo_terms,
                           icf_codes, genetic_findings, diagnosis_year, onset_age_days,
                           diagnosis_age_days, delay_days, code_releases)
SELECT case_id, version, recorded_at, recorded_by, birth_year_month, sex, status, date_of_death,
       first_contact_date, onset_kind, onset_date, undiagnosed, orphacode, diagnosis_date, icd10,
       icd11, omim, hpo_terms, icf_codes, genetic_findings, diagnosis_year, onset_age_days,
       diagnosis_age_days, delay_days, code_releases
FROM case_versions_before_keys ORDER BY case_id, version;
INSERT INTO case_genes (case_id, version, gene)
SELECT case_id, version, gene FROM case_genes_before_keys ORDER BY case_id, version, gene;
INSERT INTO case_phenotypes (case_id, version, term)
SELECT case_id, version, term FROM case_phenotypes_before_keys ORDER BY case_id, version, term;
INSERT INTO patients (registry_id, patient, pseudonym, case_id, version, centre_id, country,
                      orphacode, sex, status, diagnosis_year, onset_age_days, diagnosis_age_days,
                      delay_days, eligible, eligible_until, slot, genes, phenotypes)
SELECT p.registry_id, k.id, p.pseudonym, p.case_id, p.version, p.centre_id, p.country,
       p.orphacode, p.sex, p.status, p.diagnosis_year, p.onset_age_days, p.diagnosis_age_days,
       p.delay_days, p.eligible, p.eligible_until, p.slot, p.genes, p.phenotypes
FROM patients_before_keys p
JOIN patient_keys k ON k.registry_id = p.registry_id AND k.pseudonym = p.pseudonym;

DROP TABLE patients_before_keys;
DROP TABLE case_phenotypes_before_keys;
DROP TABLE case_genes_before_keys;
DROP TABLE case_versions_before_keys;
DROP TABLE cases_before_keys;

-- A centre's cases in pseudonym order (ExportPhenopackets: 0018), as before; GetCase and
-- UpdateCase now find a case by its unique (patient, centre).
CREATE INDEX cases_registry_centre ON cases (registry_id, centre_id, pseudonym);
CREATE INDEX case_versions_orphacode ON case_versions (orphacode, case_id, version);
CREATE UNIQUE INDEX patients_slot ON patients (registry_id, slot);
