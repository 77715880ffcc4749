-- docker-compose only: run once by the postgres image on first start
-- (mounted into /docker-entrypoint-initdb.d). Creates the demo's primary and replica
-- databases, the outbox and the sample shop, as `make demo` does locally.
CREATE DATABASE dualsync_demo;
CREATE DATABASE dualsync_demo_replica;
\connect dualsync_demo
\i /dualsync-connectors/outbox.sql
\i /dualsync-connectors/sample_domain.sql
