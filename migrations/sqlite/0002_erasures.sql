-- Erasure tombstones: one row per withdrawal of REGISTRY_INCLUSION. Proof that the
-- patient's record was erased, and by whom; no clinical data, ever.
CREATE TABLE erasures (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    receipt_id       TEXT    NOT NULL UNIQUE,
    registry_id      INTEGER NOT NULL REFERENCES registries (id),
    pseudonym        TEXT    NOT NULL,
    erased_at        INTEGER NOT NULL,
    erased_by        INTEGER NOT NULL REFERENCES principals (id),
    reason           TEXT    NOT NULL CHECK (reason IN ('patient_request', 'representative_request', 'consent_invalid', 'other')),
    cases_erased     INTEGER NOT NULL CHECK (cases_erased >= 0),
    versions_erased  INTEGER NOT NULL CHECK (versions_erased >= 0),
    consent_event_id INTEGER NOT NULL REFERENCES consent_events (id)
);
CREATE INDEX erasures_patient ON erasures (registry_id, pseudonym);
