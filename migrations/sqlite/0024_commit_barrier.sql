-- A row the SQLite writer changes after a COMMIT that failed (`store::writer`,
-- `overwrite_failed_commit`). A COMMIT can fail after the transaction's pages reached the
-- WAL (its sync failed): SQLite then leaves the WAL's index as it was, so the next write
-- overwrites those pages, but until one does a restart would replay the transaction the
-- writer answered as failed. Raising `count` is that next write, committed before the
-- failure is answered. (An UPDATE that changes nothing writes no page: hence a count.)
CREATE TABLE commit_barrier (
    id    INTEGER PRIMARY KEY CHECK (id = 1),
    count INTEGER NOT NULL
);
INSERT INTO commit_barrier (id, count) VALUES (1, 0);
