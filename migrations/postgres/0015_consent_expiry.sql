-- The consent officers' expiry lists (PostgreSQL). Keep in step with
-- ../sqlite/0015_consent_expiry.sql.
--
-- "Expiring in the next N days" and "expired in the last 90 days" read the granted
-- decisions in force of one registry in order of expiry, a page at a time
-- (`Store::consents_expiring`). Without this index each request scanned every row of the
-- registry in `consent_current`; with it a page is a range of the index in its order, so
-- the cost is the page's size, not the registry's. Partial: most decisions never expire.
-- (pseudonym, scope) finish the key of a row in a registry: the order is total and a
-- page starts after the last row of the one before.
CREATE INDEX consent_current_expiry
    ON consent_current (registry_id, state, expires_at, pseudonym, scope)
    WHERE expires_at IS NOT NULL;
