-- A protection level per registry beside k (research suppression). Keep in step with
-- ../postgres/0006_protection_level.sql. Every value an answer hides lies, for anyone who
-- reads the answer, in an interval at least this wide (docs/privacy.md).
ALTER TABLE registries
    ADD COLUMN protection_level INTEGER NOT NULL DEFAULT 1
    CHECK (protection_level >= 1 AND protection_level <= 100);
