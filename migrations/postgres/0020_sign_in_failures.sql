-- Failed console sign-ins per name tried (PostgreSQL). Keep in step with
-- ../sqlite/0020_sign_in_failures.sql. See docs/console.md, "Lockout".
--
-- Until now failures were counted on `console_credentials`, that is only for names of
-- principals with console credentials: after five failures such a name answered "held
-- back" while any other name went on answering "wrong name, password or code", which told
-- an attacker which names are console users. Failures are now counted per name tried,
-- whatever it names, and every name is held back alike. `name_mac` is the HMAC-SHA256 (hex)
-- of the name under a key derived from the master secret, so that a mistyped name, or a
-- password typed into the name field, is not kept readable. A row is forgotten a day after
-- its last failure once its hold has ended; a success, or a new password, deletes it.
-- Counts start afresh with this migration (a hold in force at the upgrade ends with it).
CREATE TABLE console_sign_in_failures (
    name_mac        TEXT        NOT NULL PRIMARY KEY,
    failures        BIGINT      NOT NULL,
    locked_until    TIMESTAMPTZ NOT NULL,
    last_failure_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX console_sign_in_failures_last ON console_sign_in_failures (last_failure_at);

ALTER TABLE console_credentials DROP COLUMN failures, DROP COLUMN locked_until;
