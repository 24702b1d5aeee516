-- Abandoned code imports (SQLite). Keep in step with ../postgres/0016_code_release_staging.sql.
-- (src/store/codes.rs, docs/codes.md "Importing".)
--
-- An import writes its rows under a release row with a placeholder version before the
-- audited step finishes it. `staged_at` is set while the release is being imported and
-- raised with every batch the import commits (a heartbeat); `finish` clears it. A release
-- whose heartbeat stopped (its import crashed or was killed) is removed at the next start
-- of a server and at the start of the next import, and cannot be put in force meanwhile.
-- NULL: a finished release.
ALTER TABLE code_releases ADD COLUMN staged_at INTEGER;
UPDATE code_releases SET staged_at = imported_at WHERE version LIKE '(importing at %';
