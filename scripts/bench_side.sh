#!/usr/bin/env bash
# `make bench`, side by side: dualsync (relay + apply → PostgreSQL) and the Debezium peer
# (Kafka Connect: Debezium's PostgreSQL connector with the outbox EventRouter, Debezium's JDBC
# sink; scripts/bench_peer.sh) measured in the same run, on the same PostgreSQL cluster and
# broker, from the same outbox table and the same load generator (pgbench, bench/load/*.sql).
# scripts/bench.sh runs it last; it also runs alone (after `make up` and a release build).
# Method and settings: docs/benchmarks-method.md. Writes bench/side.json and bench/side.md.
#
# Each pipeline gets its own database per phase (outbox, business tables, sink tables, so
# latencies are joined in SQL) and its own topics, created with LogAppendTime so "on its
# topic" is the broker's append time for both, read back by scripts/bench_topics.py.
#   drain:  BENCH_DRAIN_EVENTS events committed at full speed with the pipeline stopped (the
#           load generator's rate is measured here), then the pipeline is started.
#   fixed:  BENCH_FIXED_RATE events/s for BENCH_FIXED_SECONDS, BENCH_FIXED_BATCH new orders per
#           transaction (every event keeps its own sink row), after BENCH_FIXED_WARMUP_SECONDS
#           at that rate that are not counted.
# CPU and peak RSS of each process come from /proc (scripts/bench_procs.py).
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# shellcheck source=scripts/bench_peer.sh
. "$REPO_ROOT/scripts/bench_peer.sh"
cd "$REPO_ROOT"

DRAIN_EVENTS="${BENCH_DRAIN_EVENTS:-100000}"
FIXED_RATE="${BENCH_FIXED_RATE:-1000}"
FIXED_SECONDS="${BENCH_FIXED_SECONDS:-600}"
FIXED_WARMUP="${BENCH_FIXED_WARMUP_SECONDS:-120}"
LOAD_CLIENTS="${BENCH_LOAD_CLIENTS:-4}"
LOAD_BATCH="${BENCH_LOAD_BATCH:-250}" # events per load transaction at full speed
# Events per transaction at the fixed rate. Not 1: the outbox's NOTIFY trigger serialised
# commits (PostgreSQL holds the notify queue's lock through the commit's WAL flush), which
# capped single-event transactions at 400-560 commits/s here (3,800/s with the trigger off).
# Since 2026-12-03 the trigger notifies only a waiting relay (docs/outbox.md); kept at 4 so
# that runs stay comparable with the earlier ones.
FIXED_BATCH="${BENCH_FIXED_BATCH:-4}"
FIXED_CLIENTS="${BENCH_FIXED_CLIENTS:-8}"
PIPELINES="${BENCH_PIPELINES:-dualsync debezium}"
# Seconds of `perf record` (DWARF call graphs) on the relay and on apply during dualsync's
# fixed-rate phase; 0 (the default) records nothing. Reports go to bench/profile/.
PROFILE_SECONDS="${BENCH_PROFILE_SECONDS:-0}"
BIN="${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release/dualsync"
CONFIG=connectors/demo.toml
PY_HOME="$TOOLS_DIR/bench-py-1"
PY="$PY_HOME/bin/python"
WORK="$LOG_DIR/bench-side"
PSQL=(psql -X -q -At -v ON_ERROR_STOP=1 -h "$BIND_HOST" -p "$PG_PORT" -U postgres)
mkdir -p "$WORK"
[[ " $PIPELINES " != *" dualsync "* || -x "$BIN" ]] ||
    die "bench: no release build at $BIN (cargo build --release --bin dualsync)"
[[ "$("${PSQL[@]}" -d postgres -c 'SHOW wal_level')" == logical ]] ||
    die "bench: the peer needs wal_level = logical (scripts/up.sh sets it)"
if [[ ! -x "$PY" ]]; then
    log "bench: Python venv with confluent-kafka in $PY_HOME"
    python3 -m venv "$PY_HOME"
    "$PY_HOME/bin/pip" install -q confluent-kafka
fi
debezium_install
# The servers' processes, by the sockets they listen on (they were started elsewhere).
listener_pid() { ss -ltnpH "sport = :$1" | grep -o 'pid=[0-9]*' | head -1 | cut -d= -f2; }
PG_PID="$(listener_pid "$PG_PORT")"
BROKER_PID="$(listener_pid "$KAFKA_PORT")"
[[ -n "$PG_PID" && -n "$BROKER_PID" ]] || die "bench: PostgreSQL or the broker is not running (make up)"

PIDS=()
SAMPLER=
cleanup() {
    [[ -n "$SAMPLER" ]] && kill -TERM "$SAMPLER" 2>/dev/null
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    PIDS=()
    peer_stop
    [[ -n "${DB:-}" ]] && peer_drop_slot "$DB"
    return 0
}
trap cleanup EXIT

sql() { "${PSQL[@]}" -d "$DB" -c "$1"; }
wait_sql() { # wait_sql QUERY: until it returns t (deadline 30 min)
    local end=$((SECONDS + 1800))
    until [[ "$(sql "$1")" == t ]]; do
        ((SECONDS < end)) || die "bench: timed out waiting for: $1"
        sleep 0.2
    done
}
COMMITTED="pg_xact_commit_timestamp((o.txid::text::numeric % 4294967296)::text::xid)" # xid8 → xid

# new_db PIPELINE PHASE: a fresh database with the outbox, the shop's tables, 1,000 customers.
new_db() {
    DB="bench_$2_$1_$(date +%s)"
    "${PSQL[@]}" -d postgres -c "CREATE DATABASE $DB"
    export_pipeline_env "$DB" "$DB" "$DB" "$DB"
    # What `dualsync demo setup` runs (the binary embeds these two files).
    "${PSQL[@]}" -d "$DB" -f connectors/outbox.sql -f connectors/sample_domain.sql 2>/dev/null
    sql "INSERT INTO shop.customers (id, name, email) SELECT 'c' || g, 'n' || g, 'c' || g || '@example.com'
         FROM generate_series(0, 999) g; CREATE SEQUENCE shop.bench_order_ids"
    if [[ "$1" == debezium ]]; then
        peer_prepare "$DB"
        TOPIC="$(peer_topic "$DB")" SINK="public.$(peer_topic "$DB")" VERSION=seq HEADER=seq
    else
        TOPIC="$DB.orders" SINK=replica.orders VERSION=version HEADER=dualsync.version
    fi
    "$PY" scripts/bench_topics.py create "$(kafka_brokers)" "$TOPIC"
}
# Every order at its latest event in the sink.
caught_up() {
    wait_sql "SELECT to_regclass('$SINK') IS NOT NULL" # apply creates dualsync's sink tables
    wait_sql "SELECT NOT EXISTS (
        SELECT 1 FROM (SELECT aggregateid, max(seq) AS seq FROM dualsync.outbox GROUP BY aggregateid) o
        LEFT JOIN $SINK r ON r.id = o.aggregateid WHERE r.$VERSION IS DISTINCT FROM o.seq)"
}
# pgbench with a script of bench/load; extra arguments go to pgbench.
load() {
    local script="$1"
    shift
    pgbench -n -h "$BIND_HOST" -p "$PG_PORT" -U postgres -M prepared -D keys=2500 \
        -f "bench/load/$script" "$@" "$DB" >"$WORK/$DB-pgbench.txt" 2>&1 ||
        die "bench: pgbench failed: $(tail -5 "$WORK/$DB-pgbench.txt")"
}
start_pipeline() { # start_pipeline PIPELINE: its pids in $WORK/$DB-*.pid
    if [[ "$1" == debezium ]]; then
        peer_start "$DB"
        echo "$PEER_PID" >"$WORK/$DB-connect.pid"
    else
        "$BIN" relay --config "$CONFIG" >"$WORK/$DB-relay.log" 2>&1 &
        PIDS+=($!)
        echo $! >"$WORK/$DB-relay.pid"
        "$BIN" apply --config "$CONFIG" --sink postgres >"$WORK/$DB-apply.log" 2>&1 &
        PIDS+=($!)
        echo $! >"$WORK/$DB-apply.pid"
    fi
}
stop_pipeline() {
    if [[ "$1" == debezium ]]; then
        peer_stop
        peer_drop_slot "$DB"
    else
        for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
        for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
        PIDS=()
    fi
}
# The broker's request counts by type (bench/jmx/BrokerRequests.java, compiled once into
# $JMX_HOME), taken before and after each phase: the table shows requests per 1,000 events.
JMX_HOME="$TOOLS_DIR/bench-jmx-$(sha256sum bench/jmx/BrokerRequests.java | cut -c1-12)"
if [[ ! -f "$JMX_HOME/BrokerRequests.class" ]]; then
    mkdir -p "$JMX_HOME"
    javac -d "$JMX_HOME" bench/jmx/BrokerRequests.java || die "bench: javac bench/jmx/BrokerRequests.java failed"
fi
broker_requests() { # broker_requests OUT.json: {} (and a warning) when the broker's JVM cannot be attached to
    java -cp "$JMX_HOME" BrokerRequests "$BROKER_PID" >"$1" 2>"$1.log" && return 0
    warn "bench: cannot read the broker's request counts: $(tail -1 "$1.log")"
    echo '{}' >"$1"
}
SAMPLER_OUT=
start_sampler() { # start_sampler PIPELINE OUT.json
    SAMPLER_OUT="$2"
    broker_requests "$2.requests-before"
    local procs=(postgres="$PG_PID" broker="$BROKER_PID")
    if [[ "$1" == debezium ]]; then
        procs+=(connect="file:$WORK/$DB-connect.pid")
    else
        procs+=(relay="file:$WORK/$DB-relay.pid" apply="file:$WORK/$DB-apply.pid")
    fi
    python3 scripts/bench_procs.py "$2" "${procs[@]}" &
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
# on_topic EXPECTED: every event's append time on its topic, into bench_on_topic.
on_topic() {
    local n
    n=$("$PY" scripts/bench_topics.py dump "$(kafka_brokers)" "$HEADER" "$1" "$WORK/$DB-topic.csv" "$TOPIC")
    [[ "$n" -ge "$1" ]] || warn "bench: only $n of $1 events found on $TOPIC"
    sql "CREATE TABLE bench_on_topic (seq bigint, append_ms bigint)"
    "${PSQL[@]}" -d "$DB" -c "\\copy bench_on_topic FROM '$WORK/$DB-topic.csv' WITH (FORMAT csv)"
}
# Per event: commit (PostgreSQL's commit timestamp), appended to its topic, applied (the sink
# row's updated_at; in the drain only each key's last event has a row).
EVENTS_SQL="SELECT o.seq, $COMMITTED AS committed, to_timestamp(t.append_ms / 1000.0) AS appended, r.updated_at AS applied
    FROM dualsync.outbox o LEFT JOIN bench_on_topic t ON t.seq = o.seq"
pct() { # pct COLUMN: {p50, p99, max} in ms
    echo "json_build_object('p50', round(percentile_cont(0.5) WITHIN GROUP (ORDER BY $1)::numeric, 1),
        'p99', round(percentile_cont(0.99) WITHIN GROUP (ORDER BY $1)::numeric, 1), 'max', round(max($1)::numeric, 1))"
}

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
         FROM ($EVENTS_SQL LEFT JOIN $SINK r ON r.$VERSION = o.seq) e" >"$WORK/$p-drain.json"
    python3 - "$WORK/$p-drain.json" "$WORK/$DB-procs.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1])); d["processes"] = json.load(open(sys.argv[2]))
n = d["events"]
for k in ("to_last_on_topic_s", "first_to_last_on_topic_s", "to_last_applied_s", "first_to_last_applied_s"):
    d[k.replace("_s", "_events_per_s")] = round(n / d[k]) if d[k] else None
json.dump(d, open(sys.argv[1], "w"))
PY
    log "side by side, $p drain: $(cat "$WORK/$p-drain.json")"
}

# profile SECONDS: CPU profiles of the relay and of apply, recorded together from the start of
# the measured window (reported by profile_report once the phase is over, so that the report
# does not load the machine the phase measures).
profile() {
    local proc
    for proc in relay apply; do
        perf record -q -F 199 --call-graph dwarf,8192 -p "$(cat "$WORK/$DB-$proc.pid")" \
            -o "$WORK/$proc.perf" -- sleep "$1" 2>"$WORK/$proc.perf.log" &
    done
    wait
}
# profile_report SECONDS: bench/profile/{relay,apply}.txt: each process's samples by thread and
# library, by function (self), and the call paths that hold most of them (inclusive).
profile_report() {
    local out="$REPO_ROOT/bench/profile" proc
    mkdir -p "$out"
    for proc in relay apply; do
        {
            echo "# dualsync $proc, $1 s of the fixed-rate phase at $FIXED_RATE events/s ($(date -u +%FT%TZ))"
            echo "# perf record -F 199 --call-graph dwarf; self time by thread and library, by function; then inclusive"
            perf report -i "$WORK/$proc.perf" --stdio --no-children --sort comm,dso -g none 2>/dev/null |
                grep -v '^$' | sed -n 1,40p
            perf report -i "$WORK/$proc.perf" --stdio --no-children --sort sym -g none 2>/dev/null |
                grep -v '^[#]' | grep -v '^$' | sed -n 1,60p
            echo "# inclusive (children), by function"
            perf report -i "$WORK/$proc.perf" --stdio --children --sort sym -g none 2>/dev/null |
                grep -v '^[#]' | grep -v '^$' | sed -n 1,80p
        } >"$out/$proc.txt" || warn "bench: profile report of $proc failed"
    done
    log "bench: CPU profiles in $out/relay.txt and $out/apply.txt"
}

fixed() { # fixed PIPELINE
    local p="$1" warm
    new_db "$p" fixed
    start_pipeline "$p"
    # Warm-up, not counted: topics and sink reached, then BENCH_FIXED_WARMUP_SECONDS at the rate
    # (the JVM compiles its hot paths in the first minutes: in the first 600 s run the peer's
    # p99 was 8-16 s in minutes 0-2 and 86-330 ms after, on a machine at load 15-25).
    load order_new.sql -c 1 -j 1 -t 50 -D k="$FIXED_BATCH"
    caught_up
    if ((FIXED_WARMUP > 0)); then
        load order_new.sql -c "$FIXED_CLIENTS" -j 2 -R "$((FIXED_RATE / FIXED_BATCH))" -T "$FIXED_WARMUP" -D k="$FIXED_BATCH"
    fi
    warm=$(sql "SELECT max(seq) FROM dualsync.outbox")
    log "side by side, $p: $FIXED_RATE events/s for $FIXED_SECONDS s"
    start_sampler "$p" "$WORK/$DB-procs.json"
    local profiler=
    if [[ "$p" == dualsync ]] && ((PROFILE_SECONDS > 0)); then
        command -v perf >/dev/null || die "bench: BENCH_PROFILE_SECONDS needs perf (Debian: linux-perf)"
        profile "$PROFILE_SECONDS" &
        profiler=$!
    fi
    load order_new.sql -c "$FIXED_CLIENTS" -j 2 -R "$((FIXED_RATE / FIXED_BATCH))" -T "$FIXED_SECONDS" -D k="$FIXED_BATCH"
    [[ -z "$profiler" ]] || wait "$profiler" || warn "bench: perf record failed: $(cat "$WORK"/*.perf.log)"
    caught_up
    stop_sampler
    stop_pipeline "$p"
    [[ -z "$profiler" ]] || profile_report "$PROFILE_SECONDS"
    on_topic "$(sql "SELECT count(*) FROM dualsync.outbox")"
    sql "WITH e AS (SELECT *, extract(epoch FROM appended - committed) * 1000 AS topic_ms,
                           extract(epoch FROM applied - committed) * 1000 AS applied_ms,
                           floor(extract(epoch FROM committed - min(committed) OVER ()) / 60) AS minute
                    FROM ($EVENTS_SQL LEFT JOIN $SINK r ON r.$VERSION = o.seq) x WHERE seq > $warm)
         SELECT json_build_object('events', count(*), 'missing_on_topic', count(*) - count(appended),
                'missing_applied', count(*) - count(applied),
                'committed_events_per_s', round(count(*) / extract(epoch FROM max(committed) - min(committed))),
                'commit_to_on_topic_ms', $(pct topic_ms), 'commit_to_applied_ms', $(pct applied_ms),
                'per_minute', (SELECT json_agg(json_build_object('minute', minute, 'events', n,
                    'on_topic_p99_ms', t99, 'applied_p99_ms', a99) ORDER BY minute) FROM (
                    SELECT minute, count(*) AS n,
                           round(percentile_cont(0.99) WITHIN GROUP (ORDER BY topic_ms)::numeric, 1) AS t99,
                           round(percentile_cont(0.99) WITHIN GROUP (ORDER BY applied_ms)::numeric, 1) AS a99
                    FROM e GROUP BY minute) m))
         FROM e" >"$WORK/$p-fixed.json"
    python3 - "$WORK/$p-fixed.json" "$WORK/$DB-procs.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1])); d["processes"] = json.load(open(sys.argv[2]))
json.dump(d, open(sys.argv[1], "w"))
PY
    log "side by side, $p fixed rate: $(cat "$WORK/$p-fixed.json")"
}

rm -f "$WORK"/*-drain.json "$WORK"/*-fixed.json
for p in $PIPELINES; do drain "$p"; done
for p in $PIPELINES; do fixed "$p"; done
DB=
python3 scripts/bench_side_report.py "$WORK" "$REPO_ROOT/bench/side.json" "$REPO_ROOT/bench/side.md" \
    "$FIXED_SECONDS" "$LOAD_CLIENTS" "$LOAD_BATCH" "$DBZ_POLL_MS" "$FIXED_CLIENTS" "$FIXED_BATCH" "$FIXED_WARMUP"
cat "$REPO_ROOT/bench/side.md"
