-- The sample shop used by `make demo` and the tests: business tables written together with
-- their outbox rows in one transaction.
CREATE SCHEMA IF NOT EXISTS shop;

CREATE TABLE IF NOT EXISTS shop.customers (
    id          text PRIMARY KEY,
    name        text NOT NULL,
    email       text NOT NULL,
    order_count int  NOT NULL DEFAULT 0
);

CREATE TABLE IF NOT EXISTS shop.orders (
    id          text PRIMARY KEY,
    customer_id text NOT NULL REFERENCES shop.customers (id),
    status      text NOT NULL,
    total_cents bigint NOT NULL,
    lines       jsonb NOT NULL DEFAULT '[]',
    note        text
);
