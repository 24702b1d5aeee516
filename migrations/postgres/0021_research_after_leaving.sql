-- Research eligibility after leaving the registry (PostgreSQL). Keep in step with
-- ../sqlite/0021_research_after_leaving.sql. See docs/consent.md, "Erasure".
--
-- Since this version a RESEARCH_USE grant dated before the patient's latest
-- REGISTRY_INCLUSION withdrawal or refusal does not make them eligible for research, even
-- after a later inclusion (`consent::research_eligibility`). Earlier versions stored such
-- patients as eligible; the writer only recomputes eligibility at a patient's next write.
-- This recomputes it for every research row now: the rule can only take eligibility away,
-- so the rows to change are those counted whose research grant in force (in
-- `consent_current`, the latest on file) is dated before such a decision on file. Each
-- change is logged as the writer logs its own (`research_log`, numbered under
-- `research_seq`), so that a running instance's research index applies it too.
--
-- Writers of earlier instances wait while the rows are chosen and changed (an instance
-- of this version does not run before its migrations): no commit comes between a row
-- chosen and its change, and none adds a row the choice misses.
LOCK TABLE patients IN SHARE ROW EXCLUSIVE MODE;

CREATE TEMP TABLE ern_0021_ended ON COMMIT DROP AS
SELECT p.registry_id, p.patient, p.slot
FROM patients p
JOIN consent_current r ON r.patient = p.patient AND r.scope = 'research_use'
WHERE p.eligible
  AND EXISTS (SELECT 1 FROM consent_events w
              WHERE w.patient = p.patient AND w.scope = 'registry_inclusion'
                AND w.state IN ('withdrawn', 'refused') AND w.given_at > r.given_at);

UPDATE patients SET eligible = FALSE, eligible_until = NULL
WHERE EXISTS (SELECT 1 FROM ern_0021_ended e
              WHERE e.registry_id = patients.registry_id AND e.patient = patients.patient);

-- The counter before the log: its row lock orders these numbers after any writer's.
UPDATE research_seq
SET seq = seq + (SELECT COUNT(*) FROM ern_0021_ended WHERE slot IS NOT NULL)
WHERE id = 1;

INSERT INTO research_log (seq, registry_id, slot)
SELECT (SELECT seq FROM research_seq WHERE id = 1)
           - (SELECT COUNT(*) FROM ern_0021_ended WHERE slot IS NOT NULL)
           + ROW_NUMBER() OVER (ORDER BY e.registry_id, e.slot),
       e.registry_id, e.slot
FROM ern_0021_ended e
WHERE e.slot IS NOT NULL;

DROP TABLE ern_0021_ended;
