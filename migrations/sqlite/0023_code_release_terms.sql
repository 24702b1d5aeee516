-- Code releases imported before 2026-12-06 counted the items read, so an Orphanet
-- classification node already in product 1 was counted twice. Recounted from the terms
-- stored (SQLite). Keep in step with ../postgres/0023_code_release_terms.sql.
UPDATE code_releases
SET terms = (SELECT COUNT(*) FROM code_terms t WHERE t.release_id = code_releases.id)
WHERE staged_at IS NULL;
