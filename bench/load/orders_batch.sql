-- pgbench script (make bench, side-by-side phases): one transaction changes :k orders of this
-- client's own key range (:keys keys, so clients never wait on each other) and writes their
-- outbox events, in one multi-row statement. Keys are sorted so row and advisory locks are
-- always taken in the same order.
\set n random(0, :keys - 1)
WITH src AS (
    SELECT 'o' || (:client_id::int * :keys::int + (:n::int + g * 97) % :keys::int) AS id, g
    FROM generate_series(1, :k::int) g
), up AS (
    INSERT INTO shop.orders AS o (id, customer_id, status, total_cents, lines, note)
    SELECT id, 'c' || (g % 1000), 'PAID', (random() * 100000)::bigint, '[{"sku": "s1", "qty": 1}]', 'bench'
    FROM src ORDER BY id
    ON CONFLICT (id) DO UPDATE SET status = EXCLUDED.status, total_cents = EXCLUDED.total_cents
    RETURNING id, customer_id, status, total_cents, lines, note
)
INSERT INTO dualsync.outbox (aggregatetype, aggregateid, type, payload)
SELECT 'orders', id, 'OrderChanged', jsonb_build_object('id', id, 'customer_id', customer_id,
       'status', status, 'total_cents', total_cents, 'lines', lines, 'note', note)
FROM up ORDER BY id;
