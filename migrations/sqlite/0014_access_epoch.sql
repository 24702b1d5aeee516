-- The access epoch (SQLite). Keep in step with ../postgres/0014_access_epoch.sql.
--
-- Instances keep API key rows (with their principal, its registries, its centre and its
-- bound certificates) and registries in memory (`service::access`). Every change to a
-- table those come from raises `epoch`, by the triggers below, in the transaction of the
-- change: whoever makes it (an instance, the admin CLI, an operator in SQL). Each call
-- reads the epoch first and drops what it holds when the epoch moved, so a revocation,
-- a disabling or a changed registry committed before a call starts applies to that call,
-- on every instance.
CREATE TABLE access_epoch (
    id    INTEGER PRIMARY KEY CHECK (id = 1),
    epoch INTEGER NOT NULL
);
INSERT INTO access_epoch (id, epoch) VALUES (1, 0);

CREATE TRIGGER api_keys_access_insert AFTER INSERT ON api_keys
BEGIN UPDATE access_epoch SET epoch = epoch + 1 WHERE id = 1; END;
CREATE TRIGGER api_keys_access_update AFTER UPDATE ON api_keys
BEGIN UPDATE access_epoch SET epoch = epoch + 1 WHERE id = 1; END;
CREATE TRIGGER api_keys_access_delete AFTER DELETE ON api_keys
BEGIN UPDATE access_epoch SET epoch = epoch + 1 WHERE id = 1; END;
CREATE TRIGGER principals_access_insert AFTER INSERT ON principals
BEGIN UPDATE access_epoch SET epoch = epoch + 1 WHERE id = 1; END;
CREATE TRIGGER principals_access_update AFTER UPDATE ON principals
BEGIN UPDATE access_epoch SET epoch = epoch + 1 WHERE id = 1; END;
CREATE TRIGGER principals_access_delete AFTER DELETE ON principals
BEGIN UPDATE access_epoch SET epoch = epoch + 1 WHERE id = 1; END;
CREATE TRIGGER principal_registries_access_insert AFTER INSERT ON principal_registries
BEGIN UPDATE access_epoch SET epoch = epoch + 1 WHERE id = 1; END;
CREATE TRIGGER principal_registries_access_update AFTER UPDATE ON principal_registries
BEGIN UPDATE access_epoch SET epoch = epoch + 1 WHERE id = 1; END;
CREATE TRIGGER principal_registries_access_delete AFTER DELETE ON principal_registries
BEGIN UPDATE access_epoch SET epoch = epoch + 1 WHERE id = 1; END;
CREATE TRIGGER centre_registries_access_insert AFTER INSERT ON centre_registries
BEGIN UPDATE access_epoch SET epoch = epoch + 1 WHERE id = 1; END;
CREATE TRIGGER centre_registries_access_update AFTER UPDATE ON centre_registries
BEGIN UPDATE access_epoch SET epoch = epoch + 1 WHERE id = 1; END;
CREATE TRIGGER centre_registries_access_delete AFTER DELETE ON centre_registries
BEGIN UPDATE access_epoch SET epoch = epoch + 1 WHERE id = 1; END;
CREATE TRIGGER principal_certificates_access_insert AFTER INSERT ON principal_certificates
BEGIN UPDATE access_epoch SET epoch = epoch + 1 WHERE id = 1; END;
CREATE TRIGGER principal_certificates_access_update AFTER UPDATE ON principal_certificates
BEGIN UPDATE access_epoch SET epoch = epoch + 1 WHERE id = 1; END;
CREATE TRIGGER principal_certificates_access_delete AFTER DELETE ON principal_certificates
BEGIN UPDATE access_epoch SET epoch = epoch + 1 WHERE id = 1; END;
CREATE TRIGGER registries_access_insert AFTER INSERT ON registries
BEGIN UPDATE access_epoch SET epoch = epoch + 1 WHERE id = 1; END;
CREATE TRIGGER registries_access_update AFTER UPDATE ON registries
BEGIN UPDATE access_epoch SET epoch = epoch + 1 WHERE id = 1; END;
CREATE TRIGGER registries_access_delete AFTER DELETE ON registries
BEGIN UPDATE access_epoch SET epoch = epoch + 1 WHERE id = 1; END;
CREATE TRIGGER centres_access_insert AFTER INSERT ON centres
BEGIN UPDATE access_epoch SET epoch = epoch + 1 WHERE id = 1; END;
CREATE TRIGGER centres_access_update AFTER UPDATE ON centres
BEGIN UPDATE access_epoch SET epoch = epoch + 1 WHERE id = 1; END;
CREATE TRIGGER centres_access_delete AFTER DELETE ON centres
BEGIN UPDATE access_epoch SET epoch = epoch + 1 WHERE id = 1; END;
