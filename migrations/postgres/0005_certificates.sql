-- Client certificates bound to principals (mutual TLS). Keep in step with
-- ../sqlite/0005_certificates.sql. A principal with bound certificates must call over a
-- connection that presented one of them.
CREATE TABLE principal_certificates (
    principal_id BIGINT  NOT NULL REFERENCES principals (id),
    fingerprint  TEXT    NOT NULL, -- SHA-256 of the DER certificate, lower-case hex
    created_at   BIGINT  NOT NULL,
    PRIMARY KEY (principal_id, fingerprint)
);
