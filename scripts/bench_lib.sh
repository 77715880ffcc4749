# shellcheck shell=bash disable=SC2034 # sourced by scripts/bench_side.sh, bench_guard.sh, bench_production.sh
# What the benchmark scripts share: SQL against the bench database, waiting on a condition,
# a fresh database holding the outbox and the shop's tables, and the load generator (pgbench
# with a script of bench/load/). Expects scripts/lib.sh sourced, and $WORK (a log folder).

PSQL=(psql -X -q -At -v ON_ERROR_STOP=1 -h "$BIND_HOST" -p "$PG_PORT" -U postgres)
# The writing transaction's commit time of an outbox row `o` (track_commit_timestamp is on).
COMMITTED="pg_xact_commit_timestamp((o.txid::text::numeric % 4294967296)::text::xid)" # xid8 → xid

sql() { "${PSQL[@]}" -d "$DB" -c "$1"; }
wait_sql() { # wait_sql QUERY [SECONDS]: until it returns t (deadline: 30 min unless given)
    local end=$((SECONDS + ${2:-1800})) out
    # A query PostgreSQL refuses stops the bench at once (not after the deadline).
    until out=$(sql "$1") || die "bench: the query failed: $1" && [[ "$out" == t ]]; do
        ((SECONDS < end)) || die "bench: timed out waiting for: $1 (logs in $WORK)"
        sleep 0.2
    done
}

# bench_database DB: creates DB with the outbox, the shop's tables (what `dualsync demo setup`
# runs; the binary embeds these two files), 1,000 customers written directly (no events) and
# the sequence bench/load/order_new.sql numbers new orders with; sets $DB and points
# connectors/demo.toml's pipeline at it (name, topics, source and sink databases).
bench_database() {
    DB="$1"
    "${PSQL[@]}" -d postgres -c "CREATE DATABASE $DB"
    export_pipeline_env "$DB" "$DB" "$DB" "$DB"
    "${PSQL[@]}" -d "$DB" -f connectors/outbox.sql -f connectors/sample_domain.sql >/dev/null 2>&1
    sql "INSERT INTO shop.customers (id, name, email) SELECT 'c' || g, 'n' || g, 'c' || g || '@example.com'
         FROM generate_series(0, 999) g; CREATE SEQUENCE shop.bench_order_ids"
}

# load SCRIPT PGBENCH_ARGS...: pgbench with bench/load/SCRIPT against $DB (output in $WORK).
load() {
    local script="$1"
    shift
    pgbench -n -h "$BIND_HOST" -p "$PG_PORT" -U postgres -M prepared -D keys=2500 \
        -f "bench/load/$script" "$@" "$DB" >"$WORK/$DB-pgbench.txt" 2>&1 ||
        die "bench: pgbench failed: $(tail -5 "$WORK/$DB-pgbench.txt")"
}

# ---- the pipelines side by side (scripts/bench_side.sh, scripts/bench_production.sh) ----------
# BENCH_PARTITIONS / BENCH_REPLICATION: the topics' partitions and replication factor (the
# production profile: 3 brokers, RF 3, min.insync.replicas 2).
PARTITIONS="${BENCH_PARTITIONS:-3}"
DRAIN_EVENTS="${BENCH_DRAIN_EVENTS:-100000}"
LOAD_CLIENTS="${BENCH_LOAD_CLIENTS:-4}"
LOAD_BATCH="${BENCH_LOAD_BATCH:-250}" # events per load transaction at full speed
REPLICATION="${BENCH_REPLICATION:-1}"

# bench_python: the venv with confluent-kafka that reads the topics back (made on first use).
bench_python() {
    PY="$TOOLS_DIR/bench-py-1/bin/python"
    [[ -x "$PY" ]] && return 0
    log "bench: Python venv with confluent-kafka in $TOOLS_DIR/bench-py-1"
    python3 -m venv "$TOOLS_DIR/bench-py-1"
    "$TOOLS_DIR/bench-py-1/bin/pip" install -q confluent-kafka
}
# The servers' processes, by the sockets they listen on (they were started elsewhere).
listener_pid() { ss -ltnpH "sport = :$1" | grep -o 'pid=[0-9]*' | head -1 | cut -d= -f2; }
# broker_pids: every node's pid, comma-separated (bench/report/procs.py sums them).
broker_pids() {
    local i out=""
    for ((i = 0; i < KAFKA_NODES; i++)); do out+="${out:+,}$(listener_pid "$((KAFKA_PORT + i))")"; done
    echo "$out"
}

# new_db PIPELINE PHASE: a fresh database (bench_database) for one pipeline, its topic created
# with LogAppendTime (so "on its topic" is the broker's append time for both pipelines) and
# what the peer needs; sets TOPIC, SINK (the sink table), VERSION (its version column), HEADER
# (the record header naming the event), TOPIC_KEY (the outbox column HEADER holds) and
# EVENTS_SQL. Pipelines: dualsync (polling capture), dualsync_wal (capture from the WAL: slot
# and publication made by `dualsync outbox migrate`, dropped by stop_pipeline), debezium.
new_db() {
    bench_database "bench_$2_$1_$(date +%s)"
    export DUALSYNC_KAFKA__BROKERS="$(kafka_brokers)" DUALSYNC_KAFKA__PARTITIONS="$PARTITIONS" \
        DUALSYNC_KAFKA__REPLICATION_FACTOR="$REPLICATION"
    unset DUALSYNC_SOURCE__CAPTURE DUALSYNC_SOURCE__SLOT_NAME DUALSYNC_SOURCE__PUBLICATION
    TOPIC_KEY=seq
    case "$1" in
        debezium)
            peer_prepare "$DB"
            TOPIC="$(peer_topic "$DB")" SINK="public.$(peer_topic "$DB")" VERSION=seq HEADER=seq
            ;;
        dualsync_wal)
            export DUALSYNC_SOURCE__CAPTURE=wal DUALSYNC_SOURCE__SLOT_NAME="${DB}_wal" \
                DUALSYNC_SOURCE__PUBLICATION="${DB}_wal"
            "$BIN" outbox migrate --config "$CONFIG" >"$WORK/$DB-migrate.log" 2>&1 ||
                die "bench: dualsync outbox migrate failed: $(tail -5 "$WORK/$DB-migrate.log")"
            # The version on the topic and in the sink is the WAL position, not the outbox seq:
            # events are matched on the topic by their id, in the sink by key.
            TOPIC="$DB.orders" SINK=replica.orders VERSION=version HEADER=dualsync.event_id TOPIC_KEY=id
            ;;
        *) TOPIC="$DB.orders" SINK=replica.orders VERSION=version HEADER=dualsync.version ;;
    esac
    events_sql
    "$PY" bench/report/topics.py create "$(kafka_brokers)" "$PARTITIONS" "$REPLICATION" "$TOPIC"
}
# events_sql: EVENTS_SQL, one row per event: its commit (PostgreSQL's commit timestamp), first
# append to its topic, and applied (the sink row's updated_at; in the drain only each key's
# last event has a row). TOPIC_KEY=id (capture from the WAL): no outbox seq on the topic or in
# the sink, so matched by event id and by key.
events_sql() {
    local sink_join="r.$VERSION = o.seq" from="dualsync.outbox o"
    if [[ "$TOPIC_KEY" == id ]]; then
        sink_join="r.id = o.aggregateid AND o.last_of_key"
        from="(SELECT *, seq = max(seq) OVER (PARTITION BY aggregateid) AS last_of_key FROM dualsync.outbox) o"
    fi
    EVENTS_SQL="SELECT o.seq, $COMMITTED AS committed, to_timestamp(t.append_ms / 1000.0) AS appended, r.updated_at AS applied
        FROM $from LEFT JOIN bench_on_topic t ON t.$TOPIC_KEY = o.$TOPIC_KEY LEFT JOIN $SINK r ON $sink_join"
}
# caught_up [SECONDS]: every order at its latest event in the sink. Capture from the WAL
# versions events by WAL position, so there the sink row's document is compared with its last
# event's payload (total_cents is random in 0..100,000 per event: a repeat of one key's last
# two payloads is rare).
caught_up() {
    wait_sql "SELECT to_regclass('$SINK') IS NOT NULL" "${1:-1800}" # apply creates dualsync's sink tables
    if [[ "$TOPIC_KEY" == id ]]; then
        wait_sql "SELECT NOT EXISTS (
            SELECT 1 FROM (SELECT DISTINCT ON (aggregateid) aggregateid, payload FROM dualsync.outbox
                           ORDER BY aggregateid, seq DESC) o
            LEFT JOIN $SINK r ON r.id = o.aggregateid
            WHERE r.doc IS DISTINCT FROM o.payload)" "${1:-1800}"
        return
    fi
    wait_sql "SELECT NOT EXISTS (
        SELECT 1 FROM (SELECT aggregateid, max(seq) AS seq FROM dualsync.outbox GROUP BY aggregateid) o
        LEFT JOIN $SINK r ON r.id = o.aggregateid WHERE r.$VERSION IS DISTINCT FROM o.seq)" "${1:-1800}"
}
PIDS=()
# The relay's /metrics port (0: any free port; the machine may run other pipelines on the
# config's 9464/9465).
RELAY_HTTP_PORT="${BENCH_RELAY_HTTP_PORT:-0}"
start_pipeline() { # start_pipeline PIPELINE: its pids in $WORK/$DB-*.pid
    if [[ "$1" == debezium ]]; then
        peer_start "$DB"
        echo "$PEER_PID" >"$WORK/$DB-connect.pid"
    else
        "$BIN" relay --config "$CONFIG" --http-port "$RELAY_HTTP_PORT" >"$WORK/$DB-relay.log" 2>&1 &
        PIDS+=($!)
        echo $! >"$WORK/$DB-relay.pid"
        "$BIN" apply --config "$CONFIG" --sink postgres --http-port 0 >"$WORK/$DB-apply.log" 2>&1 &
        PIDS+=($!)
        echo $! >"$WORK/$DB-apply.pid"
    fi
}
stop_pids() {
    local pid
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    PIDS=()
}
stop_pipeline() {
    if [[ "$1" == debezium ]]; then
        peer_stop
        peer_drop_slot "$DB"
    else
        stop_pids
        wal_drop_slot "$DB"
    fi
}
# wal_drop_slot DB: the WAL relay's slot, once it is stopped (a slot left behind holds WAL).
wal_drop_slot() {
    "${PSQL[@]}" -d postgres -c "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
        WHERE slot_name = '${1}_wal' AND NOT active" >/dev/null || true
}
# The broker's request counts by type (bench/jmx/BrokerRequests.java, compiled once into
# $JMX_HOME), taken before and after each phase: the table shows requests per 1,000 events.
jmx_setup() {
    JMX_HOME="$TOOLS_DIR/bench-jmx-$(sha256sum bench/jmx/BrokerRequests.java | cut -c1-12)"
    [[ -f "$JMX_HOME/BrokerRequests.class" ]] && return 0
    mkdir -p "$JMX_HOME"
    javac -d "$JMX_HOME" bench/jmx/BrokerRequests.java || die "bench: javac bench/jmx/BrokerRequests.java failed"
}
broker_requests() { # broker_requests OUT.json: summed over the brokers; {} (and a warning) when a JVM cannot be attached to
    local pid readers=()
    for pid in $(broker_pids | tr , ' '); do # side by side: each attach starts a JVM
        java -cp "$JMX_HOME" BrokerRequests "$pid" >"$1.$pid" 2>"$1.$pid.log" &
        readers+=($!)
    done
    for pid in "${readers[@]}"; do
        wait "$pid" && continue
        warn "bench: cannot read the broker's request counts: $(cat "$1".*.log | tail -1)"
        echo '{}' >"$1"
        return 0
    done
    python3 - "$1" $(broker_pids | tr , ' ') <<'PY'
import collections, json, sys
total = collections.Counter()
for pid in sys.argv[2:]:
    total.update(json.load(open(f"{sys.argv[1]}.{pid}")))
json.dump(total, open(sys.argv[1], "w"))
PY
}
SAMPLER=
SAMPLER_OUT=
# start_sampler PIPELINE OUT.json [NAME=PID...]: CPU and RSS of the pipeline's processes,
# PostgreSQL and the broker(s), and any extra processes named (bench/report/procs.py).
start_sampler() {
    local pipeline="$1"
    SAMPLER_OUT="$2"
    shift 2
    broker_requests "$SAMPLER_OUT.requests-before"
    local procs=(postgres="$PG_PID" broker="$(broker_pids)" "$@")
    if [[ "$pipeline" == debezium ]]; then
        procs+=(connect="file:$WORK/$DB-connect.pid")
    elif [[ "$pipeline" == dualsync* ]]; then
        procs+=(relay="file:$WORK/$DB-relay.pid" apply="file:$WORK/$DB-apply.pid")
    fi
    python3 bench/report/procs.py "$SAMPLER_OUT" "${procs[@]}" &
    SAMPLER=$!
}
stop_sampler() { # the broker's requests meanwhile go into OUT.json as broker.requests
    kill -TERM "$SAMPLER"
    wait "$SAMPLER" || true
    SAMPLER=
    broker_requests "$SAMPLER_OUT.requests-after"
    python3 - "$SAMPLER_OUT" <<'PY'
import json, sys
out = sys.argv[1]
procs, before, after = (json.load(open(f)) for f in (out, out + ".requests-before", out + ".requests-after"))
if "broker" in procs:
    procs["broker"]["requests"] = {k: n - before.get(k, 0) for k, n in after.items() if n > before.get(k, 0)}
json.dump(procs, open(out, "w"))
PY
}
# on_topic EXPECTED: every event's first append time on its topic, into bench_on_topic (a
# relay failover publishes some events twice: the first copy counts).
on_topic() {
    local n type=bigint
    [[ "$TOPIC_KEY" == seq ]] || type=uuid
    n=$("$PY" bench/report/topics.py dump "$(kafka_brokers)" "$HEADER" "$1" "$WORK/$DB-topic.csv" "$TOPIC")
    [[ "$n" -ge "$1" ]] || warn "bench: only $n of $1 events found on $TOPIC"
    sql "CREATE TABLE bench_on_topic_all ($TOPIC_KEY $type, append_ms bigint)"
    "${PSQL[@]}" -d "$DB" -c "\\copy bench_on_topic_all FROM '$WORK/$DB-topic.csv' WITH (FORMAT csv)"
    sql "CREATE TABLE bench_on_topic AS SELECT $TOPIC_KEY, min(append_ms) AS append_ms FROM bench_on_topic_all GROUP BY 1;
         CREATE INDEX ON bench_on_topic ($TOPIC_KEY)"
}
pct() { # pct COLUMN: {p50, p99, max} in ms
    echo "json_build_object('p50', round(percentile_cont(0.5) WITHIN GROUP (ORDER BY $1)::numeric, 1),
        'p99', round(percentile_cont(0.99) WITHIN GROUP (ORDER BY $1)::numeric, 1), 'max', round(max($1)::numeric, 1))"
}

# drain PIPELINE: DRAIN_EVENTS events committed with the pipeline stopped, then the pipeline
# started: the rates, and CPU and RSS while it drains, into $WORK/PIPELINE-drain.json.
drain() { # drain PIPELINE
    local p="$1" t0
    new_db "$p" drain
    log "side by side, $p: committing $DRAIN_EVENTS events with the pipeline stopped"
    local per_client=$((DRAIN_EVENTS / LOAD_CLIENTS / LOAD_BATCH))
    load orders_batch.sql -c "$LOAD_CLIENTS" -j 2 -t "$per_client" -D k="$LOAD_BATCH"
    local events
    events=$(sql "SELECT count(*) FROM dualsync.outbox")
    start_sampler "$p" "$WORK/$DB-procs.json"
    t0=$(sql "SELECT clock_timestamp()")
    start_pipeline "$p"
    caught_up
    stop_sampler
    stop_pipeline "$p"
    on_topic "$events"
    sql "SELECT json_build_object('events', count(*), 'started_at', '$t0',
            'load_events_per_s', round(count(*) / extract(epoch FROM max(committed) - min(committed))),
            'to_last_on_topic_s', round(extract(epoch FROM max(appended) - '$t0')::numeric, 2),
            'first_to_last_on_topic_s', round(extract(epoch FROM max(appended) - min(appended))::numeric, 2),
            'to_last_applied_s', round(extract(epoch FROM max(applied) - '$t0')::numeric, 2),
            'first_to_last_applied_s', round(extract(epoch FROM max(applied) - min(appended))::numeric, 2),
            'missing_on_topic', count(*) - count(appended))
         FROM ($EVENTS_SQL) e" >"$WORK/$p-drain.json"
    python3 - "$WORK/$p-drain.json" "$WORK/$DB-procs.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1])); d["processes"] = json.load(open(sys.argv[2]))
n = d["events"]
for k in ("to_last_on_topic_s", "first_to_last_on_topic_s", "to_last_applied_s", "first_to_last_applied_s"):
    d[k.replace("_s", "_events_per_s")] = round(n / d[k]) if d[k] else None
json.dump(d, open(sys.argv[1], "w"))
PY
    log "side by side, $p drain: $(cut -c1-600 "$WORK/$p-drain.json")"
    # What the production profile measures after a drain (the outbox purge), if defined.
    if declare -F after_drain >/dev/null; then after_drain "$p"; fi
}

