-- Research aggregation (SQLite). Keep in step with ../postgres/0003_research.sql.

-- The consent decision in force per (registry, patient, scope): the consent_events row
-- with the latest (given_at, id). Kept in the same transaction as every append to
-- consent_events (given_at never lies after the moment it is recorded, so the latest
-- event on file is the one in force at any later query). Research queries join this
-- table instead of searching the history per patient.
CREATE TABLE consent_current (
    registry_id INTEGER NOT NULL REFERENCES registries (id),
    pseudonym   TEXT    NOT NULL,
    scope       TEXT    NOT NULL,
    event_id    INTEGER NOT NULL REFERENCES consent_events (id),
    state       TEXT    NOT NULL,
    given_at    INTEGER NOT NULL,
    expires_at  INTEGER,
    PRIMARY KEY (registry_id, pseudonym, scope)
);

INSERT INTO consent_current (registry_id, pseudonym, scope, event_id, state, given_at, expires_at)
SELECT e.registry_id, e.pseudonym, e.scope, e.id, e.state, e.given_at, e.expires_at
FROM consent_events e
WHERE NOT EXISTS (
    SELECT 1 FROM consent_events x
    WHERE x.registry_id = e.registry_id AND x.pseudonym = e.pseudonym AND x.scope = e.scope
      AND (x.given_at > e.given_at OR (x.given_at = e.given_at AND x.id > e.id))
);

-- One row per patient (pseudonym) of a registry with at least one case: the case whose
-- newest version was written last represents the patient in research counts, so a
-- patient seen at two centres is counted once.
CREATE TABLE patients (
    registry_id INTEGER NOT NULL REFERENCES registries (id),
    pseudonym   TEXT    NOT NULL,
    case_id     INTEGER NOT NULL REFERENCES cases (id),
    PRIMARY KEY (registry_id, pseudonym)
);

INSERT INTO patients (registry_id, pseudonym, case_id)
SELECT c.registry_id, c.pseudonym, c.id
FROM cases c
WHERE NOT EXISTS (
    SELECT 1 FROM cases x
    WHERE x.registry_id = c.registry_id AND x.pseudonym = c.pseudonym
      AND (x.updated_at > c.updated_at OR (x.updated_at = c.updated_at AND x.id > c.id))
);

-- "Where is the expertise": cases by diagnosis, newest version only.
CREATE INDEX case_versions_orphacode ON case_versions (orphacode, case_id, version);
