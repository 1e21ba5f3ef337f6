-- Umbra controller schema, version 1.
--
-- Portable SQL (runs on SQLite and PostgreSQL): TEXT/BIGINT/INTEGER columns, composite primary
-- keys, no AUTOINCREMENT/SERIAL (sequences live in `counters`). Every row carries `org`.
-- Times are Unix seconds unless the column says `_ms`. Booleans are INTEGER 0/1.

-- Named monotonic counters per organisation: `snapshot_version`, `audit_seq`.
CREATE TABLE counters (
    org TEXT NOT NULL,
    name TEXT NOT NULL,
    value BIGINT NOT NULL,
    PRIMARY KEY (org, name)
);

-- The organisation CA: certificate in clear, private key sealed under the operator's KEK.
CREATE TABLE ca (
    org TEXT NOT NULL,
    cert_pem TEXT NOT NULL,
    sealed_key TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (org)
);

-- Admin API bearer tokens, stored as SHA-256 hex only.
CREATE TABLE admin_tokens (
    org TEXT NOT NULL,
    id TEXT NOT NULL,
    hash TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (org, id)
);

CREATE TABLE users (
    org TEXT NOT NULL,
    id TEXT NOT NULL,
    disabled INTEGER NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (org, id)
);

CREATE TABLE user_groups (
    org TEXT NOT NULL,
    name TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (org, name)
);

CREATE TABLE group_members (
    org TEXT NOT NULL,
    group_name TEXT NOT NULL,
    user_id TEXT NOT NULL,
    PRIMARY KEY (org, group_name, user_id),
    FOREIGN KEY (org, group_name) REFERENCES user_groups (org, name) ON DELETE CASCADE,
    FOREIGN KEY (org, user_id) REFERENCES users (org, id) ON DELETE CASCADE
);

CREATE TABLE services (
    org TEXT NOT NULL,
    name TEXT NOT NULL,
    target TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (org, name)
);

-- Connectors a service may be served by, by connector name.
CREATE TABLE service_connectors (
    org TEXT NOT NULL,
    service TEXT NOT NULL,
    connector TEXT NOT NULL,
    PRIMARY KEY (org, service, connector),
    FOREIGN KEY (org, service) REFERENCES services (org, name) ON DELETE CASCADE
);

CREATE TABLE policies (
    org TEXT NOT NULL,
    name TEXT NOT NULL,
    body TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (org, name)
);

-- One-time enrollment tokens, stored as SHA-256 hex of the secret only.
CREATE TABLE enroll_tokens (
    org TEXT NOT NULL,
    id TEXT NOT NULL,
    hash TEXT NOT NULL,
    role TEXT NOT NULL,
    user_id TEXT,
    name TEXT,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    used_at BIGINT,
    used_by TEXT,
    PRIMARY KEY (org, id),
    UNIQUE (hash)
);

CREATE TABLE devices (
    org TEXT NOT NULL,
    id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT,
    PRIMARY KEY (org, id)
);

CREATE TABLE connectors (
    org TEXT NOT NULL,
    id TEXT NOT NULL,
    name TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT,
    PRIMARY KEY (org, id)
);
CREATE INDEX connectors_by_name ON connectors (org, name);

CREATE TABLE brokers (
    org TEXT NOT NULL,
    id TEXT NOT NULL,
    name TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT,
    server_name TEXT NOT NULL,
    quic_addr TEXT,
    tcp_addr TEXT,
    snapshot_version BIGINT NOT NULL DEFAULT 0,
    last_seen BIGINT NOT NULL DEFAULT 0,
    -- JSON array of the live streams reported by the last heartbeat.
    streams TEXT NOT NULL DEFAULT '[]',
    PRIMARY KEY (org, id)
);

-- Every certificate issued, so revocation can name serials.
CREATE TABLE certificates (
    org TEXT NOT NULL,
    serial TEXT NOT NULL,
    role TEXT NOT NULL,
    subject TEXT NOT NULL,
    issued_at BIGINT NOT NULL,
    not_after BIGINT NOT NULL,
    revoked_at BIGINT,
    PRIMARY KEY (org, serial)
);
CREATE INDEX certificates_by_subject ON certificates (org, role, subject);

CREATE TABLE audit (
    org TEXT NOT NULL,
    seq BIGINT NOT NULL,
    at_ms BIGINT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    result TEXT NOT NULL,
    detail TEXT NOT NULL,
    -- Who reported it: `controller` or the identity URI of a broker.
    source TEXT NOT NULL,
    PRIMARY KEY (org, seq)
);
