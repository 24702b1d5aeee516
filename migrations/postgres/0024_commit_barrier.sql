-- SQLite's 0024 adds the row its writer changes after a COMMIT that failed, so that a
-- transaction answered as failed cannot come back from the WAL at a restart. PostgreSQL
-- does not need it (a COMMIT it did not answer is asked about: `store::writer::landed`);
-- the table keeps the two schemas alike.
CREATE TABLE commit_barrier (
    id    BIGINT PRIMARY KEY CHECK (id = 1),
    count BIGINT NOT NULL
);
INSERT INTO commit_barrier (id, count) VALUES (1, 0);
