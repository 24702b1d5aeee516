-- Console sessions are keyed by an HMAC of their tokens under a key derived from the
-- master secret (`service::console`), no longer by a plain SHA-256, which anyone who could
-- write to the database could compute for a token of their own (a planted session). The
-- sessions made before cannot be found under the new key: they are ended here, and their
-- users sign in again.
DELETE FROM console_sessions;
