\set uid random(1, 18000)
SELECT u.record FROM temp_tokens t JOIN users u ON u.id = t.user_id WHERE t.digest = sha256(int8send(:uid));
