-- pgbench script (make bench, fixed-rate phase): :k new orders and their outbox events per
-- transaction. Every event has its own key, so every event's row stays in the sink and
-- commit → applied is measured for each one (not only each key's last).
WITH up AS (
    INSERT INTO shop.orders (id, customer_id, status, total_cents, lines, note)
    SELECT 'n' || nextval('shop.bench_order_ids'), 'c' || (random() * 999)::int, 'NEW',
           (random() * 100000)::bigint, '[{"sku": "s1", "qty": 1}]', 'bench'
    FROM generate_series(1, :k::int)
    RETURNING id, customer_id, status, total_cents, lines, note
)
INSERT INTO dualsync.outbox (aggregatetype, aggregateid, type, payload)
SELECT 'orders', id, 'OrderCreated', jsonb_build_object('id', id, 'customer_id', customer_id,
       'status', status, 'total_cents', total_cents, 'lines', lines, 'note', note)
FROM up ORDER BY id;
