-- The web console's sign-in and sessions (PostgreSQL). Keep in step with
-- ../sqlite/0012_console.sql. See docs/console.md.
--
-- A principal who uses the console has a password (an Argon2id PHC string) and a TOTP
-- secret, sealed with AES-256-GCM under a key derived from the master secret (whoever can
-- only read the database learns neither). `totp_last_step` is the last time step a code
-- was accepted for: a code is never accepted twice. `failures` counts the sign-ins that
-- failed since the last one that succeeded; from the fifth on, `locked_until` (ms) holds
-- the next sign-in back, doubling each time.
CREATE TABLE console_credentials (
    principal_id   BIGINT  NOT NULL PRIMARY KEY REFERENCES principals (id),
    password_hash  TEXT,
    totp_sealed    TEXT,
    totp_last_step BIGINT  NOT NULL DEFAULT 0,
    failures       BIGINT  NOT NULL DEFAULT 0,
    locked_until   BIGINT  NOT NULL DEFAULT 0,
    updated_at     BIGINT  NOT NULL
);

-- Sessions, server-side, so that every instance behind a load balancer knows them and a
-- sign-out ends one everywhere. Only the SHA-256 of the cookie's 256-bit token is kept.
CREATE TABLE console_sessions (
    token_hash   TEXT    NOT NULL PRIMARY KEY,
    principal_id BIGINT  NOT NULL REFERENCES principals (id),
    created_at   BIGINT  NOT NULL,
    last_seen_at BIGINT  NOT NULL
);
CREATE INDEX console_sessions_principal ON console_sessions (principal_id);
