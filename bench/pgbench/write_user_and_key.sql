\set uid random(1, 18000)
\set r random(1, 1000000000000)
WITH changed AS (UPDATE users SET record = record, totp_active = true WHERE id = :uid RETURNING id), new_key AS (INSERT INTO login_keys (digest, user_id, created_at, last_used_at, record) SELECT sha256(int8send(:r)), id, 1, 1, decode(repeat('ab', 60), 'hex') FROM changed) SELECT count(*) FROM changed;
