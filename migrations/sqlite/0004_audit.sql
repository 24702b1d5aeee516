-- Audit log (SQLite). Keep in step with ../postgres/0004_audit.sql.
-- Append-only, MAC-chained (src/audit.rs): never updated, never deleted by the service.
CREATE TABLE audit_log (
    seq          INTEGER PRIMARY KEY,
    at           INTEGER NOT NULL,
    principal_id INTEGER,
    principal    TEXT    NOT NULL,
    role         TEXT    NOT NULL,
    centre       TEXT    NOT NULL,
    method       TEXT    NOT NULL,
    registry     TEXT    NOT NULL,
    outcome      TEXT    NOT NULL,
    items        INTEGER NOT NULL,
    mac          TEXT    NOT NULL
);
CREATE INDEX audit_log_principal ON audit_log (principal_id, seq);
CREATE INDEX audit_log_at ON audit_log (at);

-- The head of the chain: the last sequence number and its MAC. Appends take this row's
-- lock, so entries are numbered without gaps in commit order.
CREATE TABLE audit_head (
    id  INTEGER PRIMARY KEY CHECK (id = 1),
    seq INTEGER NOT NULL,
    mac TEXT    NOT NULL
);
INSERT INTO audit_head (id, seq, mac) VALUES (1, 0, '');
