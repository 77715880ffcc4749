-- dualsync outbox, version 1. Idempotent: safe to run again (`dualsync outbox migrate` runs it).
--
-- Columns follow Debezium's outbox conventions (id, aggregatetype, aggregateid, type, payload),
-- plus what ordering and operations need. Applications insert the first five (and optionally
-- traceparent) in the same transaction as their own writes; everything else is filled in here.
--
-- Ordering contract (see README "Outbox contract"): the BEFORE INSERT trigger takes a
-- transaction-scoped advisory lock on (aggregatetype, aggregateid) and only then draws `seq`.
-- A second transaction writing the same aggregate waits on that lock until the first commits or
-- aborts, so for one aggregate `seq` order is commit order, whatever the writers locked
-- themselves. Different aggregates never wait on each other (up to 64-bit hash collisions).

CREATE SCHEMA IF NOT EXISTS dualsync;

CREATE SEQUENCE IF NOT EXISTS dualsync.outbox_seq AS bigint;

CREATE TABLE IF NOT EXISTS dualsync.outbox (
    seq            bigint      NOT NULL,
    id             uuid        NOT NULL DEFAULT gen_random_uuid(),
    aggregatetype  text        NOT NULL CHECK (aggregatetype <> ''),
    aggregateid    text        NOT NULL CHECK (aggregateid <> ''),
    type           text        NOT NULL,
    -- The aggregate's state after the event, as JSON; NULL deletes the aggregate.
    payload        jsonb,
    -- W3C trace context of the writer, forwarded as a Kafka header.
    traceparent    text,
    created_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    txid           xid8        NOT NULL DEFAULT pg_current_xact_id(),
    -- Set by the relay once Kafka acknowledged the event; purged after the retention.
    published_at   timestamptz,
    CONSTRAINT outbox_pkey PRIMARY KEY (seq),
    CONSTRAINT outbox_id_key UNIQUE (id)
);

-- The relay's work queue: unpublished rows in seq order.
CREATE INDEX IF NOT EXISTS outbox_unpublished ON dualsync.outbox (seq) WHERE published_at IS NULL;
-- The purge of published rows.
CREATE INDEX IF NOT EXISTS outbox_published_at ON dualsync.outbox (published_at) WHERE published_at IS NOT NULL;

CREATE OR REPLACE FUNCTION dualsync.outbox_assign_seq() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- Serialise writers of one aggregate until commit, then number the row: seq follows
    -- commit order per aggregate. The key space (one bigint) is distinct from the relay's
    -- leader lock (two ints).
    PERFORM pg_advisory_xact_lock(hashtextextended(NEW.aggregatetype || '/' || NEW.aggregateid, 0));
    NEW.seq := nextval('dualsync.outbox_seq');
    NEW.published_at := NULL;
    RETURN NEW;
END
$$;

-- `capture = "wal"`: the same numbering without the lock. The WAL hands the relay each
-- transaction at its commit, in commit order, and the relay derives versions from the commit
-- LSN, so `seq` need not follow commit order and writers of one aggregate need not wait for
-- each other. The row is born marked (published_at = created_at): the WAL relay publishes it
-- from the stream, a polling read never sees it, and the purge deletes it after the retention.
-- `dualsync outbox migrate` points the trigger here (connectors/outbox_wal.sql) only when no
-- pipeline polls this outbox; this file points it back at the locking function.
CREATE OR REPLACE FUNCTION dualsync.outbox_assign_seq_unlocked() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.seq := nextval('dualsync.outbox_seq');
    NEW.published_at := NEW.created_at;
    RETURN NEW;
END
$$;

-- Relays of this outbox, by the key of the advisory lock each holds while it waits for work.
CREATE TABLE IF NOT EXISTS dualsync.outbox_relays (
    lock_key       integer     PRIMARY KEY,
    pipeline       text        NOT NULL,
    registered_at  timestamptz NOT NULL DEFAULT now()
);

-- Wakes a waiting relay, and only a waiting one. A NOTIFY serialises commits: PostgreSQL holds
-- a database-wide lock from a notifying transaction's pre-commit until its commit is flushed,
-- which capped one-event transactions at 400-560 commits/s on the benchmark machine (3,800
-- without). A relay that waits holds an exclusive advisory lock (class 1685289335, "dsyw";
-- key in dualsync.outbox_relays). A writer that can take that lock in shared mode knows the
-- relay is busy and skips the NOTIFY; it then holds the shared lock until its transaction ends,
-- so the relay cannot start waiting (it cannot take the exclusive lock) before that writer's
-- row is committed and visible to its next read. With no relay registered yet, every insert
-- notifies, as before. Security definer: writers need no privilege on dualsync.outbox_relays.
CREATE OR REPLACE FUNCTION dualsync.outbox_notify() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    relay integer;
    registered boolean := false;
BEGIN
    FOR relay IN SELECT lock_key FROM dualsync.outbox_relays LOOP
        registered := true;
        IF NOT pg_try_advisory_xact_lock_shared(1685289335, relay) THEN
            -- Payload-free: PostgreSQL folds identical notifications of one transaction.
            PERFORM pg_notify('dualsync_outbox', '');
            RETURN NULL;
        END IF;
    END LOOP;
    IF NOT registered THEN
        PERFORM pg_notify('dualsync_outbox', '');
    END IF;
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS outbox_assign_seq ON dualsync.outbox;
CREATE TRIGGER outbox_assign_seq BEFORE INSERT ON dualsync.outbox
    FOR EACH ROW EXECUTE FUNCTION dualsync.outbox_assign_seq();

DROP TRIGGER IF EXISTS outbox_notify ON dualsync.outbox;
CREATE TRIGGER outbox_notify AFTER INSERT ON dualsync.outbox
    FOR EACH STATEMENT EXECUTE FUNCTION dualsync.outbox_notify();

-- Rows must not change once written: an UPDATE of the event columns would publish something
-- other than what was committed. Only the relay's published_at is writable, and seq inside
-- `dualsync outbox resequence` (which sets dualsync.resequence for its transaction only) after
-- the sequence went backwards.
CREATE OR REPLACE FUNCTION dualsync.outbox_immutable() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF (NEW.id, NEW.aggregatetype, NEW.aggregateid, NEW.type, NEW.payload, NEW.traceparent)
       IS DISTINCT FROM
       (OLD.id, OLD.aggregatetype, OLD.aggregateid, OLD.type, OLD.payload, OLD.traceparent)
       OR (NEW.seq IS DISTINCT FROM OLD.seq
           AND current_setting('dualsync.resequence', true) IS DISTINCT FROM 'on') THEN
        RAISE EXCEPTION 'dualsync.outbox rows are immutable (only published_at may change)';
    END IF;
    RETURN NEW;
END
$$;

DROP TRIGGER IF EXISTS outbox_immutable ON dualsync.outbox;
CREATE TRIGGER outbox_immutable BEFORE UPDATE ON dualsync.outbox
    FOR EACH ROW EXECUTE FUNCTION dualsync.outbox_immutable();

-- An outbox event without a table row (`capture = "wal"` only; docs/outbox.md#emit): a
-- transactional logical-decoding message with prefix 'dualsync', decoded by the WAL relay in
-- commit order with the transaction's other writes, and nothing stored or purged. Its content
-- is the JSON object {"id", "aggregatetype", "aggregateid", "type", "payload", "traceparent"};
-- `id` is generated here and returned. Arguments are checked like the table's CHECKs, so a
-- writer gets the error when it calls, not the relay later. A polling relay never sees these
-- events: call it only on a database whose pipelines stream the WAL.
CREATE OR REPLACE FUNCTION dualsync.emit(aggregatetype text, aggregateid text, type text,
                                         payload jsonb, traceparent text DEFAULT NULL)
RETURNS uuid
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    event_id uuid := gen_random_uuid();
BEGIN
    IF coalesce(emit.aggregatetype, '') = '' OR coalesce(emit.aggregateid, '') = '' THEN
        RAISE EXCEPTION 'dualsync.emit: aggregatetype and aggregateid must be non-empty (got % and %)',
            quote_nullable(emit.aggregatetype), quote_nullable(emit.aggregateid)
            USING ERRCODE = 'check_violation';
    END IF;
    IF emit.type IS NULL THEN
        RAISE EXCEPTION 'dualsync.emit: type must not be null' USING ERRCODE = 'not_null_violation';
    END IF;
    PERFORM pg_logical_emit_message(true, 'dualsync', jsonb_build_object(
        'id', event_id,
        'aggregatetype', emit.aggregatetype,
        'aggregateid', emit.aggregateid,
        'type', emit.type,
        'payload', emit.payload,
        'traceparent', emit.traceparent)::text);
    RETURN event_id;
END
$$;
