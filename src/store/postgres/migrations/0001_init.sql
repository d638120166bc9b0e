-- totpd schema 1: the records are the codec's bytes (a version byte, then postcard), the same
-- bytes a sled store and a backup file hold; the other columns are what queries look up by.

-- Never reused: a removed user's id is not given again (a sequence never goes back).
CREATE SEQUENCE user_ids AS BIGINT START 1;

CREATE TABLE users (
    id          BIGINT PRIMARY KEY,
    username    TEXT NOT NULL UNIQUE,
    totp_active BOOLEAN NOT NULL,
    record      BYTEA NOT NULL
);

-- Login keys by their digest (the key itself is never stored).
CREATE TABLE login_keys (
    digest       BYTEA PRIMARY KEY,
    user_id      BIGINT NOT NULL,
    created_at   BIGINT NOT NULL,
    last_used_at BIGINT NOT NULL,
    record       BYTEA NOT NULL
);
CREATE INDEX login_keys_user ON login_keys (user_id);

-- Only an index: a temp token's state (attempts left, expiry) lives in its user's record.
CREATE TABLE temp_tokens (
    digest     BYTEA PRIMARY KEY,
    user_id    BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE INDEX temp_tokens_expiry ON temp_tokens (expires_at);

CREATE TABLE audit_events (
    seq    BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    time   BIGINT NOT NULL,
    record BYTEA NOT NULL
);
CREATE INDEX audit_events_time ON audit_events (time, seq);

-- The master-key check record.
CREATE TABLE meta (
    name  TEXT PRIMARY KEY,
    value BYTEA NOT NULL
);
