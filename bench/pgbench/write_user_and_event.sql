\set uid random(1, 18000)
WITH changed AS (UPDATE users SET record = record, totp_active = true WHERE id = :uid RETURNING id), new_events AS (INSERT INTO audit_events (time, record) SELECT 1800000000, decode(repeat('cd', 100), 'hex') FROM changed) SELECT count(*) FROM changed;
