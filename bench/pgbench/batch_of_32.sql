WITH input AS (SELECT DISTINCT ON (id) id FROM (SELECT (random()*17999)::bigint + 1 AS id FROM generate_series(1, 32)) s),
changed AS (UPDATE users u SET record = u.record, totp_active = true FROM input i WHERE u.id = i.id RETURNING u.id),
new_keys AS (INSERT INTO login_keys (digest, user_id, created_at, last_used_at, record) SELECT sha256(int8send(c.id) || int8send((random()*1e15)::bigint)), c.id, 1, 1, decode(repeat('ab', 60), 'hex') FROM changed c ON CONFLICT (digest) DO NOTHING),
new_events AS (INSERT INTO audit_events (time, record) SELECT 1800000000, decode(repeat('cd', 100), 'hex') FROM changed)
SELECT count(*) FROM changed;
