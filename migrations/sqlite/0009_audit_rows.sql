-- A complete audit (SQLite). Keep in step with ../postgres/0009_audit_rows.sql.
-- (src/audit.rs, docs/security.md "Audit".)
--
-- Entries of this version are MACed with two more fields: `target` (what an admin action
-- acted on) and `row_hashes` (a hash of every consent event and erasure tombstone the
-- entry's write inserted). `version` says which encoding an entry's MAC covers: 1 for
-- entries written before this migration, 2 from now on.
ALTER TABLE audit_log ADD COLUMN version    INTEGER NOT NULL DEFAULT 1;
ALTER TABLE audit_log ADD COLUMN target     TEXT    NOT NULL DEFAULT '';
ALTER TABLE audit_log ADD COLUMN row_hashes TEXT    NOT NULL DEFAULT '';

-- The entry that wrote each consent event and tombstone (its `row_hashes` lists the row).
-- Rows written before this migration get 0: the first append after it adopts them in one
-- entry (a hash over all of them) and sets `rows_adopted`.
ALTER TABLE consent_events ADD COLUMN audit_seq INTEGER;
ALTER TABLE erasures       ADD COLUMN audit_seq INTEGER;
UPDATE consent_events SET audit_seq = 0;
UPDATE erasures       SET audit_seq = 0;
CREATE INDEX consent_events_audit ON consent_events (audit_seq, id);
CREATE INDEX erasures_audit       ON erasures (audit_seq, id);
ALTER TABLE audit_head ADD COLUMN rows_adopted INTEGER NOT NULL DEFAULT 0;
