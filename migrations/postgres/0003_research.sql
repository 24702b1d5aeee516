-- Research aggregation (PostgreSQL). Keep in step with ../sqlite/0003_research.sql.

-- The consent decision in force per (registry, patient, scope): the consent_events row
-- with the latest (given_at, id). Kept in the same transaction as every append to
-- consent_events (given_at never lies after the moment it is recorded, so the latest
-- event on file is the one in force at any later query).
CREATE TABLE consent_current (
    registry_id BIGINT  NOT NULL REFERENCES registries (id),
    pseudonym   TEXT    NOT NULL,
    scope       TEXT    NOT NULL,
    event_id    BIGINT  NOT NULL REFERENCES consent_events (id),
    state       TEXT    NOT NULL,
    given_at    BIGINT  NOT NULL,
    expires_at  BIGINT,
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

-- One row per patient (pseudonym) of a registry with at least one case: what research
-- counts, kept by the writer in the transaction of every case write and consent event.
-- The case written last represents the patient (a patient seen at two centres counts
-- once); its aggregation values are copied here, with the research eligibility: both
-- REGISTRY_INCLUSION and RESEARCH_USE granted (eligible = 1), until the earlier of their
-- expiries (NULL: no expiry). A research query is then one scan of one registry's rows.
CREATE TABLE patients (
    registry_id        BIGINT  NOT NULL REFERENCES registries (id),
    pseudonym          TEXT    NOT NULL,
    case_id            BIGINT  NOT NULL REFERENCES cases (id),
    version            BIGINT  NOT NULL,
    centre_id          BIGINT  NOT NULL REFERENCES centres (id),
    country            TEXT    NOT NULL,
    orphacode          BIGINT,
    sex                TEXT    NOT NULL,
    status             TEXT    NOT NULL,
    diagnosis_year     BIGINT,
    onset_age_days     BIGINT,
    diagnosis_age_days BIGINT,
    delay_days         BIGINT,
    eligible           BIGINT  NOT NULL,
    eligible_until     BIGINT,
    PRIMARY KEY (registry_id, pseudonym)
);

INSERT INTO patients (registry_id, pseudonym, case_id, version, centre_id, country, orphacode,
                      sex, status, diagnosis_year, onset_age_days, diagnosis_age_days,
                      delay_days, eligible, eligible_until)
SELECT c.registry_id, c.pseudonym, c.id, c.current_version, c.centre_id, ce.country, v.orphacode,
       v.sex, v.status, v.diagnosis_year, v.onset_age_days, v.diagnosis_age_days, v.delay_days,
       CASE WHEN ri.state = 'granted' AND ru.state = 'granted' THEN 1 ELSE 0 END,
       CASE WHEN ri.expires_at IS NULL THEN ru.expires_at
            WHEN ru.expires_at IS NULL OR ri.expires_at < ru.expires_at THEN ri.expires_at
            ELSE ru.expires_at END
FROM cases c
JOIN case_versions v ON v.case_id = c.id AND v.version = c.current_version
JOIN centres ce ON ce.id = c.centre_id
LEFT JOIN consent_current ri ON ri.registry_id = c.registry_id AND ri.pseudonym = c.pseudonym
    AND ri.scope = 'registry_inclusion'
LEFT JOIN consent_current ru ON ru.registry_id = c.registry_id AND ru.pseudonym = c.pseudonym
    AND ru.scope = 'research_use'
WHERE NOT EXISTS (
    SELECT 1 FROM cases x
    WHERE x.registry_id = c.registry_id AND x.pseudonym = c.pseudonym
      AND (x.updated_at > c.updated_at OR (x.updated_at = c.updated_at AND x.id > c.id))
);

-- "Where is the expertise": cases by diagnosis, newest version only.
CREATE INDEX case_versions_orphacode ON case_versions (orphacode, case_id, version);
