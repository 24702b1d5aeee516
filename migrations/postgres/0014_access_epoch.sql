-- The access epoch (PostgreSQL). Keep in step with ../sqlite/0014_access_epoch.sql.
--
-- Instances keep API key rows (with their principal, its registries, its centre and its
-- bound certificates) and registries in memory (`service::access`). Every change to a
-- table those come from raises `epoch`, by the triggers below, in the transaction of the
-- change: whoever makes it (an instance, the admin CLI, an operator in SQL). Each call
-- reads the epoch first and drops what it holds when the epoch moved, so a revocation,
-- a disabling or a changed registry committed before a call starts applies to that call,
-- on every instance. (The row lock the raise takes until commit also orders concurrent
-- changes; a reader never waits for it.)
CREATE TABLE access_epoch (
    id    BIGINT PRIMARY KEY CHECK (id = 1),
    epoch BIGINT NOT NULL
);
INSERT INTO access_epoch (id, epoch) VALUES (1, 0);

CREATE FUNCTION access_epoch_raise() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE access_epoch SET epoch = epoch + 1 WHERE id = 1;
    RETURN NULL;
END
$$;

CREATE TRIGGER api_keys_access_insert AFTER INSERT ON api_keys
    FOR EACH STATEMENT EXECUTE FUNCTION access_epoch_raise();
CREATE TRIGGER api_keys_access_update AFTER UPDATE ON api_keys
    FOR EACH STATEMENT EXECUTE FUNCTION access_epoch_raise();
CREATE TRIGGER api_keys_access_delete AFTER DELETE ON api_keys
    FOR EACH STATEMENT EXECUTE FUNCTION access_epoch_raise();
CREATE TRIGGER principals_access_insert AFTER INSERT ON principals
    FOR EACH STATEMENT EXECUTE FUNCTION access_epoch_raise();
CREATE TRIGGER principals_access_update AFTER UPDATE ON principals
    FOR EACH STATEMENT EXECUTE FUNCTION access_epoch_raise();
CREATE TRIGGER principals_access_delete AFTER DELETE ON principals
    FOR EACH STATEMENT EXECUTE FUNCTION access_epoch_raise();
CREATE TRIGGER principal_registries_access_insert AFTER INSERT ON principal_registries
    FOR EACH STATEMENT EXECUTE FUNCTION access_epoch_raise();
CREATE TRIGGER principal_registries_access_update AFTER UPDATE ON principal_registries
    FOR EACH STATEMENT EXECUTE FUNCTION access_epoch_raise();
CREATE TRIGGER principal_registries_access_delete AFTER DELETE ON principal_registries
    FOR EACH STATEMENT EXECUTE FUNCTION access_epoch_raise();
CREATE TRIGGER centre_registries_access_insert AFTER INSERT ON centre_registries
    FOR EACH STATEMENT EXECUTE FUNCTION access_epoch_raise();
CREATE TRIGGER centre_registries_access_update AFTER UPDATE ON centre_registries
    FOR EACH STATEMENT EXECUTE FUNCTION access_epoch_raise();
CREATE TRIGGER centre_registries_access_delete AFTER DELETE ON centre_registries
    FOR EACH STATEMENT EXECUTE FUNCTION access_epoch_raise();
CREATE TRIGGER principal_certificates_access_insert AFTER INSERT ON principal_certificates
    FOR EACH STATEMENT EXECUTE FUNCTION access_epoch_raise();
CREATE TRIGGER principal_certificates_access_update AFTER UPDATE ON principal_certificates
    FOR EACH STATEMENT EXECUTE FUNCTION access_epoch_raise();
CREATE TRIGGER principal_certificates_access_delete AFTER DELETE ON principal_certificates
    FOR EACH STATEMENT EXECUTE FUNCTION access_epoch_raise();
CREATE TRIGGER registries_access_insert AFTER INSERT ON registries
    FOR EACH STATEMENT EXECUTE FUNCTION access_epoch_raise();
CREATE TRIGGER registries_access_update AFTER UPDATE ON registries
    FOR EACH STATEMENT EXECUTE FUNCTION access_epoch_raise();
CREATE TRIGGER registries_access_delete AFTER DELETE ON registries
    FOR EACH STATEMENT EXECUTE FUNCTION access_epoch_raise();
CREATE TRIGGER centres_access_insert AFTER INSERT ON centres
    FOR EACH STATEMENT EXECUTE FUNCTION access_epoch_raise();
CREATE TRIGGER centres_access_update AFTER UPDATE ON centres
    FOR EACH STATEMENT EXECUTE FUNCTION access_epoch_raise();
CREATE TRIGGER centres_access_delete AFTER DELETE ON centres
    FOR EACH STATEMENT EXECUTE FUNCTION access_epoch_raise();
