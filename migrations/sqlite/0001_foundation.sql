-- Foundation schema (SQLite). Keep in step with ../postgres/0001_foundation.sql.
-- Instants are milliseconds since the Unix epoch (UTC); calendar dates are ISO text
-- (possibly partial: YYYY, YYYY-MM, YYYY-MM-DD). No table holds a patient identifier.

CREATE TABLE registries (
    id                 INTEGER PRIMARY KEY CHECK (id BETWEEN 1 AND 999), -- pseudonym prefix R{id:03}
    code               TEXT    NOT NULL UNIQUE,
    name               TEXT    NOT NULL,
    scope              TEXT    NOT NULL,
    active_key_version INTEGER NOT NULL DEFAULT 1 CHECK (active_key_version BETWEEN 1 AND 999),
    min_cell_count     INTEGER NOT NULL DEFAULT 5 CHECK (min_cell_count >= 2),
    created_at         INTEGER NOT NULL
);

CREATE TABLE centres (
    id         INTEGER PRIMARY KEY,
    code       TEXT    NOT NULL UNIQUE,
    name       TEXT    NOT NULL,
    country    TEXT    NOT NULL,
    created_at INTEGER NOT NULL
);

-- ERN membership of a centre: its physicians may submit to these registries.
CREATE TABLE centre_registries (
    centre_id   INTEGER NOT NULL REFERENCES centres (id),
    registry_id INTEGER NOT NULL REFERENCES registries (id),
    PRIMARY KEY (centre_id, registry_id)
);

CREATE TABLE principals (
    id          INTEGER PRIMARY KEY,
    name        TEXT    NOT NULL UNIQUE,
    role        TEXT    NOT NULL CHECK (role IN ('physician', 'consent_officer', 'researcher', 'admin')),
    centre_id   INTEGER REFERENCES centres (id),
    created_at  INTEGER NOT NULL,
    disabled_at INTEGER
);

-- Registries a researcher or registry-level consent officer is bound to directly.
CREATE TABLE principal_registries (
    principal_id INTEGER NOT NULL REFERENCES principals (id),
    registry_id  INTEGER NOT NULL REFERENCES registries (id),
    PRIMARY KEY (principal_id, registry_id)
);

-- API keys: only an Argon2id hash of the secret part is stored.
CREATE TABLE api_keys (
    key_id       TEXT    PRIMARY KEY,
    principal_id INTEGER NOT NULL REFERENCES principals (id),
    secret_hash  TEXT    NOT NULL,
    created_at   INTEGER NOT NULL,
    expires_at   INTEGER,
    revoked_at   INTEGER
);
CREATE INDEX api_keys_principal ON api_keys (principal_id);

-- Consent history: append-only. The decision in force for a scope is the one with the
-- latest given_at (ties: latest id) among those given by the time asked about.
CREATE TABLE consent_events (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    registry_id  INTEGER NOT NULL REFERENCES registries (id),
    pseudonym    TEXT    NOT NULL,
    scope        TEXT    NOT NULL CHECK (scope IN ('registry_inclusion', 'research_use', 'recontact')),
    state        TEXT    NOT NULL CHECK (state IN ('granted', 'refused', 'withdrawn')),
    given_at     INTEGER NOT NULL,
    form_version TEXT    NOT NULL,
    expires_at   INTEGER,
    recorded_by  INTEGER NOT NULL REFERENCES principals (id),
    recorded_at  INTEGER NOT NULL,
    source       TEXT    NOT NULL CHECK (source IN ('physician_attestation', 'consent_officer'))
);
CREATE INDEX consent_events_in_force ON consent_events (registry_id, pseudonym, scope, given_at, id);

-- One case per (registry, patient, submitting centre); its versions hold the record.
CREATE TABLE cases (
    id              INTEGER PRIMARY KEY,
    registry_id     INTEGER NOT NULL REFERENCES registries (id),
    pseudonym       TEXT    NOT NULL,
    centre_id       INTEGER NOT NULL REFERENCES centres (id),
    current_version INTEGER NOT NULL,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    UNIQUE (registry_id, pseudonym, centre_id)
);
CREATE INDEX cases_registry_centre ON cases (registry_id, centre_id);

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
    -- Derived at write time for aggregation (midpoints of partial dates, in days).
    diagnosis_year     INTEGER,
    onset_age_days     INTEGER,
    diagnosis_age_days INTEGER,
    delay_days         INTEGER,
    PRIMARY KEY (case_id, version)
);

-- Genes of each version, for aggregation by gene.
CREATE TABLE case_genes (
    case_id INTEGER NOT NULL,
    version INTEGER NOT NULL,
    gene    TEXT    NOT NULL,
    PRIMARY KEY (case_id, version, gene),
    FOREIGN KEY (case_id, version) REFERENCES case_versions (case_id, version) ON DELETE CASCADE
);
