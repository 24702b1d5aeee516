-- The cases of a centre in pseudonym order (SQLite). Keep in step with
-- ../postgres/0018_cases_by_centre.sql.
--
-- `cases_registry_centre` was (registry_id, centre_id). A page of a centre's cases
-- (ExportPhenopackets, `store::cases::list_current`: `registry_id = $1 AND centre_id = $2
-- AND pseudonym > $3 ORDER BY pseudonym LIMIT $5`) had to read and sort every case of
-- the centre for each page; with the pseudonym as third column it is a range of the
-- index, read in its order and cut at the page's end. A lookup of one case (GetCase,
-- UpdateCase: registry, pseudonym and centre) now fills this index as it fills the
-- unique one, so the planner cannot take it for a scan of the centre's cases, which
-- PostgreSQL did while a fast-growing table had no statistics yet (`store::statistics`).
-- The index is built inside the migration's transaction: on a large registry, writes to
-- `cases` wait for it (about as long as reading the table once).
DROP INDEX cases_registry_centre;
CREATE INDEX cases_registry_centre ON cases (registry_id, centre_id, pseudonym);
