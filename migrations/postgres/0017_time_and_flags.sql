-- Real time and boolean columns (PostgreSQL). Keep in step with ../sqlite/0017_time_and_flags.sql.
-- (src/store/db.rs converts; docs/architecture.md "Storage".)
--
-- Every instant becomes a TIMESTAMPTZ and every flag a BOOLEAN, so that the database says
-- what its columns hold to whoever reads it in SQL (an operator, a backup check, a
-- reporting tool). Instants were integer milliseconds since the Unix epoch. The
-- conversion is exact, so every stored instant, and every audit MAC computed over one,
-- reads back the same: the epoch plus whole days plus the milliseconds of the day, two
-- products PostgreSQL computes without rounding, with days of 24 hours (UTC, set for
-- this migration). (One product of n milliseconds is a float8 one, rounded by up to 16
-- microseconds after the year 4253, which read back a millisecond early.) Flags were 0/1
-- (CHECKed on two of the four). Each ALTER rewrites its table once; on a large registry
-- the upgrade takes about as long as copying `case_versions` and `audit_log`.

SET LOCAL TimeZone = 'UTC';

-- The instant `ms` milliseconds after the Unix epoch, exactly (above). For this migration
-- only: dropped at its end (in the schema, not `pg_temp`, which a hardened database may
-- not let the service's role use).
CREATE FUNCTION ern_0017_instant(ms BIGINT) RETURNS TIMESTAMPTZ LANGUAGE sql STABLE
    AS $$ SELECT TIMESTAMPTZ 'epoch' + (ms / 86400000) * INTERVAL '1 day'
                 + (ms % 86400000) * INTERVAL '1 millisecond' $$;

-- Instants.
ALTER TABLE registries
    ALTER COLUMN created_at TYPE TIMESTAMPTZ USING ern_0017_instant(created_at);
ALTER TABLE centres
    ALTER COLUMN created_at TYPE TIMESTAMPTZ USING ern_0017_instant(created_at);
ALTER TABLE principals
    ALTER COLUMN created_at  TYPE TIMESTAMPTZ USING ern_0017_instant(created_at),
    ALTER COLUMN disabled_at TYPE TIMESTAMPTZ USING ern_0017_instant(disabled_at);
ALTER TABLE api_keys
    ALTER COLUMN created_at TYPE TIMESTAMPTZ USING ern_0017_instant(created_at),
    ALTER COLUMN expires_at TYPE TIMESTAMPTZ USING ern_0017_instant(expires_at),
    ALTER COLUMN revoked_at TYPE TIMESTAMPTZ USING ern_0017_instant(revoked_at);
ALTER TABLE principal_certificates
    ALTER COLUMN created_at TYPE TIMESTAMPTZ USING ern_0017_instant(created_at);
ALTER TABLE consent_events
    ALTER COLUMN given_at    TYPE TIMESTAMPTZ USING ern_0017_instant(given_at),
    ALTER COLUMN expires_at  TYPE TIMESTAMPTZ USING ern_0017_instant(expires_at),
    ALTER COLUMN recorded_at TYPE TIMESTAMPTZ USING ern_0017_instant(recorded_at);
ALTER TABLE consent_current
    ALTER COLUMN given_at   TYPE TIMESTAMPTZ USING ern_0017_instant(given_at),
    ALTER COLUMN expires_at TYPE TIMESTAMPTZ USING ern_0017_instant(expires_at);
ALTER TABLE cases
    ALTER COLUMN created_at TYPE TIMESTAMPTZ USING ern_0017_instant(created_at),
    ALTER COLUMN updated_at TYPE TIMESTAMPTZ USING ern_0017_instant(updated_at);
ALTER TABLE case_versions
    ALTER COLUMN recorded_at TYPE TIMESTAMPTZ USING ern_0017_instant(recorded_at),
    ALTER COLUMN undiagnosed TYPE BOOLEAN USING undiagnosed <> 0;
ALTER TABLE erasures
    ALTER COLUMN erased_at TYPE TIMESTAMPTZ USING ern_0017_instant(erased_at);
ALTER TABLE patients
    ALTER COLUMN eligible       TYPE BOOLEAN USING eligible <> 0,
    ALTER COLUMN eligible_until TYPE TIMESTAMPTZ USING ern_0017_instant(eligible_until);
ALTER TABLE audit_log
    ALTER COLUMN at TYPE TIMESTAMPTZ USING ern_0017_instant(at);
ALTER TABLE master_key
    ALTER COLUMN recorded_at TYPE TIMESTAMPTZ USING ern_0017_instant(recorded_at);
-- `locked_until` 0 (the epoch) is "not held back", as before.
ALTER TABLE console_credentials
    ALTER COLUMN locked_until DROP DEFAULT,
    ALTER COLUMN locked_until TYPE TIMESTAMPTZ USING ern_0017_instant(locked_until),
    ALTER COLUMN locked_until SET DEFAULT TIMESTAMPTZ 'epoch',
    ALTER COLUMN updated_at   TYPE TIMESTAMPTZ USING ern_0017_instant(updated_at);
ALTER TABLE console_sessions
    ALTER COLUMN created_at   TYPE TIMESTAMPTZ USING ern_0017_instant(created_at),
    ALTER COLUMN last_seen_at TYPE TIMESTAMPTZ USING ern_0017_instant(last_seen_at);

-- Flags of the code releases: the 0/1 CHECKs go (a BOOLEAN has no third value), and the
-- partial index of the release in force is made again on the boolean.
DROP INDEX code_releases_in_force;
ALTER TABLE code_releases
    DROP CONSTRAINT code_releases_in_force_check,
    ALTER COLUMN in_force DROP DEFAULT,
    ALTER COLUMN in_force TYPE BOOLEAN USING in_force <> 0,
    ALTER COLUMN in_force SET DEFAULT FALSE,
    ALTER COLUMN imported_at TYPE TIMESTAMPTZ USING ern_0017_instant(imported_at),
    ALTER COLUMN staged_at   TYPE TIMESTAMPTZ USING ern_0017_instant(staged_at);
CREATE UNIQUE INDEX code_releases_in_force ON code_releases (system) WHERE in_force;
ALTER TABLE code_terms
    DROP CONSTRAINT code_terms_obsolete_check,
    ALTER COLUMN obsolete TYPE BOOLEAN USING obsolete <> 0;

DROP FUNCTION ern_0017_instant(BIGINT);
