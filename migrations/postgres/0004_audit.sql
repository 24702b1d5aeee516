-- Audit log (PostgreSQL). Keep in step with ../sqlite/0004_audit.sql.
-- Append-only, MAC-chained (src/audit.rs): never updated, never deleted by the service.
CREATE TABLE audit_log (
    seq          BIGINT  PRIMARY KEY,
    at           BIGINT  NOT NULL,
    principal_id BIGINT,
    principal    TEXT    NOT NULL,
    role         TEXT    NOT NULL,
    centre       TEXT    NOT NULL,
    method       TEXT    NOT NULL,
    registry     TEXT    NOT NULL,
    outcome      TEXT    NOT NULL,
    items        BIGINT  NOT NULL,
    mac          TEXT    NOT NULL
);
CREATE INDEX audit_log_principal ON audit_log (principal_id, seq);
CREATE INDEX audit_log_at ON audit_log (at);

-- The head of the chain: the last sequence number and its MAC. Appends take this row's
-- lock, so entries are numbered without gaps in commit order.
CREATE TABLE audit_head (
    id  BIGINT  PRIMARY KEY CHECK (id = 1),
    seq BIGINT  NOT NULL,
    mac TEXT    NOT NULL
);
INSERT INTO audit_head (id, seq, mac) VALUES (1, 0, '');
