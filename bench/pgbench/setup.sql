-- A schema "exp" shaped like totpd's (migration 0001): 18 000 users with 352-byte records and a
-- temp token each, and pgbench's 100 000-row table, for the statement experiments in BENCHMARKS.md.
DROP SCHEMA IF EXISTS exp CASCADE;
CREATE SCHEMA exp;
SET search_path = exp;
CREATE TABLE users (id BIGINT PRIMARY KEY, username TEXT NOT NULL UNIQUE, totp_active BOOLEAN NOT NULL, record BYTEA NOT NULL);
CREATE TABLE login_keys (digest BYTEA PRIMARY KEY, user_id BIGINT NOT NULL, created_at BIGINT NOT NULL, last_used_at BIGINT NOT NULL, record BYTEA NOT NULL);
CREATE INDEX login_keys_user ON login_keys (user_id);
CREATE TABLE temp_tokens (digest BYTEA PRIMARY KEY, user_id BIGINT NOT NULL, expires_at BIGINT NOT NULL);
CREATE INDEX temp_tokens_expiry ON temp_tokens (expires_at);
CREATE TABLE audit_events (seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, time BIGINT NOT NULL, record BYTEA NOT NULL);
CREATE INDEX audit_events_time ON audit_events (time, seq);
INSERT INTO users SELECT i, 'user' || i, true, decode(repeat(md5(i::text), 22), 'hex') FROM generate_series(1, 18000) i;
INSERT INTO temp_tokens SELECT sha256(int8send(i)), i, 2000000000 FROM generate_series(1, 18000) i;
CREATE TABLE bench_row (id INT PRIMARY KEY, n BIGINT NOT NULL DEFAULT 0);
INSERT INTO bench_row (id) SELECT generate_series(1, 100000);
VACUUM ANALYZE;
