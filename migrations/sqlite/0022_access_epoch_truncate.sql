-- PostgreSQL's 0022 adds triggers on TRUNCATE to the access epoch's (0014). SQLite has no
-- TRUNCATE: `DELETE FROM t` without a WHERE fires 0014's row triggers (SQLite's truncate
-- optimisation is off for tables with triggers). Nothing to do; the number keeps the two
-- sets in step.
SELECT 1;
