-- The master secret this database belongs to (SQLite). Keep in step with
-- ../postgres/0007_master_key.sql. One row: the fingerprint of the secret (src/keys.rs,
-- `Fingerprint`: HKDF of the secret under its own label, public, not the secret), written
-- by the first `serve` (or `demo`) and compared at every start after it, so that a lost
-- key file replaced by a new one, or another secret, is refused instead of silently giving
-- every patient new pseudonyms (docs/security.md, "Keys").
CREATE TABLE master_key (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    fingerprint TEXT    NOT NULL,
    recorded_at INTEGER NOT NULL
);
