-- The in-memory research index (PostgreSQL). Keep in step with ../sqlite/0011_research_index.sql.
-- (src/service/research/index.rs, src/store/research_index.rs, docs/scaling.md "Research
-- index".)
--
-- Every instance keeps, per registry, columns of small codes with one entry per research
-- row (`patients`), at the row's `slot`: a number per registry, given to the row by the
-- writer when it creates it and never changed while the row lives. Slots let an instance
-- find a patient's entry without holding the pseudonym. They are given in order of
-- creation after the largest one in use, under the change counter's lock (below), so two
-- writers never give the same one.
ALTER TABLE patients ADD COLUMN slot BIGINT;
UPDATE patients SET slot = n.slot
FROM (SELECT registry_id, pseudonym,
             ROW_NUMBER() OVER (PARTITION BY registry_id ORDER BY case_id) - 1 AS slot
      FROM patients) AS n
WHERE patients.registry_id = n.registry_id AND patients.pseudonym = n.pseudonym;
CREATE UNIQUE INDEX patients_slot ON patients (registry_id, slot);

-- The genes of the version that represents the patient (the gene symbols of its
-- `case_genes` rows, sorted, separated by one space; '' for none), kept by the writer
-- with the row: an instance loads a million research rows with their genes in one scan.
ALTER TABLE patients ADD COLUMN genes TEXT    NOT NULL DEFAULT '';
UPDATE patients SET genes = COALESCE(
    (SELECT string_agg(g.gene, ' ' ORDER BY g.gene) FROM case_genes g
     WHERE g.case_id = patients.case_id AND g.version = patients.version),
    '');

-- The change counter: one row, raised by every writer transaction that changes research
-- rows, in that transaction, as its last statement before the commit. Its row lock makes
-- those transactions commit one after the other, in the order of their numbers, so an
-- instance that reads `seq` = n has every change numbered up to n and none after.
-- `pruned_through`: the log holds no change numbered at or below it any more.
CREATE TABLE research_seq (
    id             BIGINT  PRIMARY KEY CHECK (id = 1),
    seq            BIGINT  NOT NULL,
    pruned_through BIGINT  NOT NULL
);
INSERT INTO research_seq (id, seq, pruned_through) VALUES (1, 0, 0);

-- The change log: which slot of which registry each change touched (no pseudonym, no
-- clinical value: an instance reads the slot's research row afresh, or finds it gone).
CREATE TABLE research_log (
    seq         BIGINT  PRIMARY KEY,
    registry_id BIGINT  NOT NULL,
    slot        BIGINT  NOT NULL
);
