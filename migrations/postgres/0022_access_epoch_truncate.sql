-- The access epoch (0014) is raised by every INSERT, UPDATE and DELETE on the tables that
-- decide access; a TRUNCATE fires none of those triggers, so an operator who emptied
-- api_keys or a table of grants that way left every instance serving from its cache
-- until some other change moved the epoch. Statement triggers on TRUNCATE close that.
-- (SQLite has no TRUNCATE: its `DELETE FROM t` fires the row triggers of 0014.)
CREATE TRIGGER api_keys_access_truncate AFTER TRUNCATE ON api_keys
    FOR EACH STATEMENT EXECUTE FUNCTION access_epoch_raise();
CREATE TRIGGER principals_access_truncate AFTER TRUNCATE ON principals
    FOR EACH STATEMENT EXECUTE FUNCTION access_epoch_raise();
CREATE TRIGGER principal_registries_access_truncate AFTER TRUNCATE ON principal_registries
    FOR EACH STATEMENT EXECUTE FUNCTION access_epoch_raise();
CREATE TRIGGER centre_registries_access_truncate AFTER TRUNCATE ON centre_registries
    FOR EACH STATEMENT EXECUTE FUNCTION access_epoch_raise();
CREATE TRIGGER principal_certificates_access_truncate AFTER TRUNCATE ON principal_certificates
    FOR EACH STATEMENT EXECUTE FUNCTION access_epoch_raise();
CREATE TRIGGER centres_access_truncate AFTER TRUNCATE ON centres
    FOR EACH STATEMENT EXECUTE FUNCTION access_epoch_raise();
CREATE TRIGGER registries_access_truncate AFTER TRUNCATE ON registries
    FOR EACH STATEMENT EXECUTE FUNCTION access_epoch_raise();
