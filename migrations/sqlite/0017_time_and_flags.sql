-- Real time and boolean columns (SQLite). Keep in step with ../postgres/0017_time_and_flags.sql.
-- (src/store/db.rs converts; docs/architecture.md "Storage".)
--
-- SQLite has no time and no boolean type: an instant stays integer milliseconds since the
-- Unix epoch and a flag stays 0/1 (CHECKed where it was), and `store::db` turns them into
-- `DateTime<Utc>` and `bool` on the way in and out, as it turns PostgreSQL's TIMESTAMPTZ
-- and BOOLEAN, so no repository sees the difference. The one change: the partial index of
-- the release in force is made on the flag itself, as on PostgreSQL, so the statements
-- that test `in_force` (not `in_force = 1`, which PostgreSQL refuses for a BOOLEAN) match
-- it on both databases.
DROP INDEX code_releases_in_force;
CREATE UNIQUE INDEX code_releases_in_force ON code_releases (system) WHERE in_force;
