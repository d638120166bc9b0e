\set id random(1, 100000)
UPDATE bench_row SET n = n + 1 WHERE id = :id;
