#!/usr/bin/env bash
# `make bench BENCH_PROFILE=production`: dualsync and the Debezium peer on a durable cluster
# (issue #39; method: docs/benchmarks-method.md, "The production profile"). Starts its own
# three-node KRaft cluster (scripts/up.sh with KAFKA_NODES=3, its own state folder and ports
# from BENCH_PROD_KAFKA_PORT, 29092: the shared single node on 19092 is left alone) and stops
# it at the end. Topics: replication factor 3, min.insync.replicas 2; both producers acks=all.
# Phases (BENCH_PROD_PHASES, default "sweep scale drain"):
#   sweep  a rate sweep to the knee, both pipelines: steps of BENCH_SWEEP_RATES events/s, each
#          BENCH_SWEEP_WARMUP_SECONDS not counted then BENCH_SWEEP_SECONDS measured; per step
#          commit → on topic and → applied p50/p99/max, the backlog's slope, CPU per process;
#          then for dualsync one more step at BENCH_FAILOVER_RATE with a standby relay and the
#          leader killed halfway (time to resume, p99 across the gap);
#   scale  apply scale-out: one backlog on a 6-partition topic drained by 1, 2 and 3 apply
#          processes in one group (BENCH_SCALE_APPLIES): events/s and CPU per event;
#   drain  a large backlog (BENCH_BIG_DRAIN_EVENTS, 1,000,000) drained by each pipeline with RSS
#          sampled every BENCH_RSS_EVERY_SECONDS, then the outbox purge (retention
#          BENCH_PURGE_RETENTION_SECS) timed until the outbox is empty.
# Writes bench/production.json, bench/production.md and bench/sweep.svg (bench/report/).
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# shellcheck source=scripts/bench_lib.sh
. "$REPO_ROOT/scripts/bench_lib.sh"
# shellcheck source=scripts/bench_peer.sh
. "$REPO_ROOT/scripts/bench_peer.sh"
cd "$REPO_ROOT"

BENCH_PROFILE=production
PHASES="${BENCH_PROD_PHASES:-sweep scale drain}"
PIPELINES="${BENCH_PIPELINES:-dualsync debezium}"
RATES="${BENCH_SWEEP_RATES:-1000 2000 5000 10000 20000}"
STEP_SECONDS="${BENCH_SWEEP_SECONDS:-180}"
STEP_WARMUP="${BENCH_SWEEP_WARMUP_SECONDS:-60}"
# How long a pipeline may take to catch up after a step before the sweep gives up on it.
CATCHUP_SECONDS="${BENCH_SWEEP_CATCHUP_SECONDS:-600}"
SWEEP_CLIENTS="${BENCH_SWEEP_CLIENTS:-8}"
# New orders per load transaction: at least 4 (the default profile's), more at high rates so
# that pgbench commits at most BENCH_SWEEP_MAX_TPS transactions a second.
MAX_TPS="${BENCH_SWEEP_MAX_TPS:-250}"
FAILOVER_RATE="${BENCH_FAILOVER_RATE-5000}" # set and empty: no failover step
SCALE_EVENTS="${BENCH_SCALE_EVENTS:-300000}"
SCALE_APPLIES="${BENCH_SCALE_APPLIES:-1 2 3}"
BIG_EVENTS="${BENCH_BIG_DRAIN_EVENTS:-1000000}"
RSS_EVERY="${BENCH_RSS_EVERY_SECONDS:-5}"
PURGE_RETENTION="${BENCH_PURGE_RETENTION_SECS:-1}"
BIN="${BENCH_BIN:-${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release/dualsync}"
CONFIG=connectors/demo.toml
WORK="$LOG_DIR/bench-production"
OUT="${BENCH_OUT_DIR:-$REPO_ROOT/bench}" # a short check run: BENCH_OUT_DIR=/tmp/somewhere
mkdir -p "$WORK"
rm -f "$WORK"/*.json
[[ -x "$BIN" ]] || die "bench: no release build at $BIN (cargo build --release --bin dualsync)"

# The cluster: scripts/up.sh's three-node KRaft cluster, in a state folder and on ports of its own.
PROD_STATE="$STATE_DIR/bench-production"
PROD_PORT="${BENCH_PROD_KAFKA_PORT:-29092}"
cluster() { # cluster up|down
    DUALSYNC_STATE_DIR="$PROD_STATE" KAFKA_NODES=3 DUALSYNC_KAFKA_PORT="$PROD_PORT" \
        DUALSYNC_KAFKA_CONTROLLER_PORT="$((PROD_PORT + 100))" DUALSYNC_KAFKA_SASL_PORT="$((PROD_PORT + 4))" \
        bash scripts/"$1".sh kafka
}
cleanup() {
    [[ -n "$SAMPLER" ]] && kill -TERM "$SAMPLER" 2>/dev/null
    stop_pids
    peer_stop
    [[ -n "${DB:-}" ]] && peer_drop_slot "$DB"
    [[ -n "${BENCH_KEEP_CLUSTER:-}" ]] || cluster down
    return 0
}
trap cleanup EXIT
cluster up
KAFKA_NODES=3 KAFKA_PORT="$PROD_PORT" PARTITIONS=3 REPLICATION=3
bench_python
debezium_install
jmx_setup
PG_PID="$(listener_pid "$PG_PORT")"
[[ -n "$PG_PID" && "$(broker_pids)" =~ ^[0-9]+,[0-9]+,[0-9]+$ ]] || die "bench: PostgreSQL or a broker is not running"
# Debezium's producer: acks=all said explicitly (Connect's default since Kafka 3.0).
export BENCH_CONNECT_PRODUCER_ACKS=all
# The leading relay's /metrics (the failover step asks which relay leads); the standby's.
RELAY_HTTP_PORT="${BENCH_RELAY_HTTP_PORT:-29464}"
STANDBY_HTTP_PORT=$((RELAY_HTTP_PORT + 1))

# sweep PIPELINE: the rate steps on one pipeline, then (dualsync) the failover step.
sweep() {
    local p="$1" rate k from to t0 missed=""
    new_db "$p" sweep
    start_pipeline "$p"
    load order_new.sql -c 1 -j 1 -t 50 -D k=4
    caught_up
    : >"$WORK/$p-steps.txt"
    for rate in $RATES; do
        if [[ -n "$missed" ]]; then
            echo "$rate skipped 0 0 - -" >>"$WORK/$p-steps.txt"
            continue
        fi
        k=$(((rate + MAX_TPS - 1) / MAX_TPS))
        ((k >= 4)) || k=4
        log "sweep, $p: $rate events/s ($k per transaction), ${STEP_WARMUP} s warm-up + ${STEP_SECONDS} s"
        ((STEP_WARMUP == 0)) || load order_new.sql -c "$SWEEP_CLIENTS" -j 2 -R "$((rate / k))" -T "$STEP_WARMUP" -D k="$k"
        from=$(sql "SELECT max(seq) FROM dualsync.outbox")
        step "$p" "$rate" "$k" "$WORK/$DB-step-$rate-procs.json" ""
        to=$(sql "SELECT max(seq) FROM dualsync.outbox")
        echo "$rate measured $from $to $WORK/$DB-step-$rate-procs.json -" >>"$WORK/$p-steps.txt"
        if ! (caught_up_recent "$CATCHUP_SECONDS"); then
            warn "sweep, $p: not caught up ${CATCHUP_SECONDS} s after the $rate events/s step; higher rates skipped"
            missed=1
        fi
    done
    if [[ "$p" == dualsync && -n "$FAILOVER_RATE" && -z "$missed" ]]; then
        failover_step
    fi
    stop_pipeline "$p"
    on_topic "$(sql "SELECT count(*) FROM dualsync.outbox")"
    local kind procs killed
    while read -r rate kind from to procs killed; do
        [[ "$kind" == skipped ]] && continue
        step_report "$rate" "$kind" "$from" "$to" "$procs" "$killed" >"$WORK/$p-step-$rate-$kind.json"
        log "sweep, $p, $rate events/s ($kind): $(cut -c1-400 "$WORK/$p-step-$rate-$kind.json")"
    done <"$WORK/$p-steps.txt"
    cp "$WORK/$p-steps.txt" "$WORK/$p-steps.done"
    drop_phase
}
# drop_phase: the phase's database and topic, once its figures are taken. A full run commits
# about 15 million events; kept, their rows and three replicas filled the disk (92 GB) on
# 2026-12-07 before the last drain.
drop_phase() {
    "$PY" bench/report/topics.py delete "$(kafka_brokers)" "$TOPIC" || warn "bench: could not delete topic $TOPIC"
    "${PSQL[@]}" -d postgres -c "DROP DATABASE $DB WITH (FORCE)" >/dev/null || warn "bench: could not drop $DB"
}
# step_report RATE KIND FROM TO PROCS KILLED_AT: one step's JSON. The backlog (events of the
# step committed and not yet applied) is sampled each second from the events' own times, and
# its slope fitted by least squares: flat when it grows by less than 1 % of the rate a second.
step_report() {
    local rate="$1" kind="$2" from="$3" to="$4" procs="$5" killed="$6" gap="NULL"
    if [[ "$kind" == failover ]]; then
        gap="json_build_object('killed_at', '$killed',
            'resume_s', (SELECT round(extract(epoch FROM min(appended) - '$killed')::numeric, 3) FROM e
                WHERE appended > '$killed'::timestamptz + interval '20 ms'),
            'first_later_commit_on_topic_s', (SELECT round(extract(epoch FROM min(appended) - '$killed')::numeric, 3)
                FROM e WHERE committed > '$killed'),
            'gap_commit_to_applied_ms', (SELECT $(pct applied_ms) FROM e WHERE committed BETWEEN '$killed'::timestamptz - interval '1 s' AND '$killed'::timestamptz + interval '10 s'))"
    fi
    sql "WITH e AS (SELECT *, extract(epoch FROM appended - committed) * 1000 AS topic_ms,
                           extract(epoch FROM applied - committed) * 1000 AS applied_ms
                    FROM ($EVENTS_SQL) x WHERE seq > $from AND seq <= $to),
         t AS (SELECT min(committed) AS t0, max(committed) AS t1 FROM e),
         c AS (SELECT floor(extract(epoch FROM committed - t0)) AS s, count(*) AS n FROM e, t GROUP BY 1),
         a AS (SELECT floor(extract(epoch FROM applied - t0)) AS s, count(*) AS n FROM e, t WHERE applied IS NOT NULL GROUP BY 1),
         b AS (SELECT g.s, sum(coalesce(c.n, 0)) OVER w - sum(coalesce(a.n, 0)) OVER w AS backlog
               FROM t CROSS JOIN generate_series(0, floor(extract(epoch FROM t1 - t0))::int) g(s)
               LEFT JOIN c ON c.s = g.s LEFT JOIN a ON a.s = g.s WINDOW w AS (ORDER BY g.s))
         SELECT json_build_object('rate', $rate, 'kind', '$kind', 'procs_file', '$procs', 'events', count(*),
                'committed_events_per_s', round(count(*) / nullif(extract(epoch FROM max(committed) - min(committed)), 0)),
                'missing_on_topic', count(*) - count(appended), 'missing_applied', count(*) - count(applied),
                'commit_to_on_topic_ms', $(pct topic_ms), 'commit_to_applied_ms', $(pct applied_ms),
                'backlog', (SELECT json_build_object('slope_per_s', round(regr_slope(backlog, s)::numeric, 2),
                    'mean', round(avg(backlog)), 'max', max(backlog), 'samples', count(*)) FROM b),
                'failover', $gap)
         FROM e"
}
# caught_up_recent SECONDS: the newest 1,000 events applied (each has a key of its own, so a
# look-up each by the sink's key). Each partition is applied in order and the newest 1,000
# events span every partition, so this means all are: a cheap stand-in for caught_up's full
# scan, which costs seconds per poll once the outbox holds millions of rows.
caught_up_recent() {
    wait_sql "SELECT count(*) = 1000 FROM (SELECT aggregateid, seq FROM dualsync.outbox ORDER BY seq DESC LIMIT 1000) o
              JOIN $SINK r ON r.id = o.aggregateid AND r.$VERSION = o.seq" "$1"
}
# step PIPELINE RATE K PROCS.json HALFWAY_HOOK: one measured window of STEP_SECONDS at RATE,
# with pgbench's own CPU sampled as `loadgen`; HALFWAY_HOOK runs halfway through.
step() {
    local p="$1" rate="$2" k="$3" procs="$4" hook="$5"
    # The sampler first: reading the brokers' request counts starts JVMs, which takes seconds.
    rm -f "$WORK/$DB-loadgen.pid"
    start_sampler "$p" "$procs" loadgen="file:$WORK/$DB-loadgen.pid"
    pgbench -n -h "$BIND_HOST" -p "$PG_PORT" -U postgres -M prepared -f bench/load/order_new.sql \
        -c "$SWEEP_CLIENTS" -j 2 -R "$((rate / k))" -T "$STEP_SECONDS" -D k="$k" "$DB" \
        >"$WORK/$DB-step-$rate-pgbench.txt" 2>&1 &
    local gen=$!
    echo "$gen" >"$WORK/$DB-loadgen.pid"
    if [[ -n "$hook" ]]; then
        sleep "$((STEP_SECONDS / 2))"
        "$hook"
    fi
    wait "$gen" || die "bench: pgbench failed: $(tail -5 "$WORK/$DB-step-$rate-pgbench.txt")"
    stop_sampler
}
# failover_step: FAILOVER_RATE with a standby relay, the leader killed (SIGKILL) halfway.
failover_step() {
    local rate="$FAILOVER_RATE" k from to
    k=$(((rate + MAX_TPS - 1) / MAX_TPS))
    ((k >= 4)) || k=4
    "$BIN" relay --config "$CONFIG" --http-port "$STANDBY_HTTP_PORT" >"$WORK/$DB-standby.log" 2>&1 &
    PIDS+=($!)
    STANDBY=$!
    log "sweep, dualsync: $rate events/s with a standby relay, the leader killed halfway"
    ((STEP_WARMUP == 0)) || load order_new.sql -c "$SWEEP_CLIENTS" -j 2 -R "$((rate / k))" -T "$STEP_WARMUP" -D k="$k"
    from=$(sql "SELECT max(seq) FROM dualsync.outbox")
    step dualsync "$rate" "$k" "$WORK/$DB-failover-procs.json" kill_leader
    to=$(sql "SELECT max(seq) FROM dualsync.outbox")
    echo "$rate failover $from $to $WORK/$DB-failover-procs.json $KILLED_AT" >>"$WORK/dualsync-steps.txt"
    (caught_up_recent "$CATCHUP_SECONDS") || warn "sweep: not caught up after the failover step"
}
kill_leader() {
    local leader="" pair
    # The gauge carries the process's const labels: dualsync_relay_leader{...} 1.
    for pair in "$RELAY_HTTP_PORT:$(cat "$WORK/$DB-relay.pid")" "$STANDBY_HTTP_PORT:$STANDBY"; do
        curl -fsS "http://$BIND_HOST:${pair%%:*}/metrics" 2>/dev/null |
            grep -Eq '^dualsync_relay_leader(\{[^}]*\})? 1$' && leader="${pair#*:}"
    done
    [[ -n "$leader" ]] || { warn "sweep: neither relay reports leading; killing the first"; leader=$(cat "$WORK/$DB-relay.pid"); }
    kill -KILL "$leader"
    KILLED_AT=$(sql "SELECT clock_timestamp()")
    log "sweep, dualsync: killed the leading relay (pid $leader) at $KILLED_AT"
}

# scale: one backlog on a 6-partition topic, published by the relay, then drained by 1, 2, 3
# apply processes in one group, each count into a sink schema and group of its own.
scale() {
    local n i t0 pids
    PARTITIONS=6 new_db dualsync scale
    export DUALSYNC_KAFKA__PARTITIONS=6
    log "scale-out: $SCALE_EVENTS events on 6 partitions"
    load orders_batch.sql -c "$LOAD_CLIENTS" -j 2 -t "$((SCALE_EVENTS / LOAD_CLIENTS / LOAD_BATCH))" -D k="$LOAD_BATCH"
    "$BIN" relay --config "$CONFIG" --http-port 0 >"$WORK/$DB-relay.log" 2>&1 &
    PIDS+=($!)
    wait_sql "SELECT NOT EXISTS (SELECT 1 FROM dualsync.outbox WHERE published_at IS NULL)"
    stop_pids
    for n in $SCALE_APPLIES; do
        export DUALSYNC_SINKS__POSTGRES__SCHEMA="replica_$n" DUALSYNC_APPLY__GROUP_ID="$DB-n$n-{sink}"
        pids=""
        start_sampler scale "$WORK/$DB-scale-$n-procs.json" apply="file:$WORK/$DB-apply-$n.pids"
        t0=$(sql "SELECT clock_timestamp()")
        for ((i = 1; i <= n; i++)); do
            "$BIN" apply --config "$CONFIG" --sink postgres --http-port 0 >"$WORK/$DB-apply-$n-$i.log" 2>&1 &
            PIDS+=($!)
            pids+="${pids:+,}$!"
        done
        echo "$pids" >"$WORK/$DB-apply-$n.pids"
        SINK="replica_$n.orders" VERSION=version caught_up "$CATCHUP_SECONDS"
        stop_sampler
        stop_pids
        sql "SELECT json_build_object('applies', $n, 'events', (SELECT count(*) FROM dualsync.outbox),
                'seconds', round(extract(epoch FROM max(updated_at) - '$t0')::numeric, 2),
                'procs_file', '$WORK/$DB-scale-$n-procs.json') FROM replica_$n.orders" >"$WORK/scale-$n.json"
        log "scale-out, $n apply: $(cat "$WORK/scale-$n.json")"
    done
    unset DUALSYNC_SINKS__POSTGRES__SCHEMA DUALSYNC_APPLY__GROUP_ID
    drop_phase
}

# The large drain's aftermath (drain() calls it once its figures are taken): the relay is
# started again with source.retention_secs = BENCH_PURGE_RETENTION_SECS (1), so its purge
# deletes the whole drained outbox at once, and the bench times it until the outbox is empty
# (deadline 30 minutes): the purge's rate against the drain's. Debezium purges nothing
# (deleting outbox rows is the application's job there).
after_drain() {
    [[ "$1" == dualsync ]] || { drop_phase; return 0; }
    local t0 rows total end=$((SECONDS + 1800))
    total=$(sql "SELECT count(*) FROM dualsync.outbox")
    t0=$(sql "SELECT clock_timestamp()")
    DUALSYNC_SOURCE__RETENTION_SECS="$PURGE_RETENTION" "$BIN" relay --config "$CONFIG" --http-port 0 \
        >"$WORK/$DB-purge-relay.log" 2>&1 &
    PIDS+=($!)
    : >"$WORK/purge-series.txt"
    while rows=$(sql "SELECT count(*) FROM dualsync.outbox") && ((rows > 0)); do
        echo "$(sql "SELECT round(extract(epoch FROM clock_timestamp() - '$t0')::numeric, 1)") $rows" >>"$WORK/purge-series.txt"
        ((SECONDS < end)) || { warn "bench: the outbox still holds $rows rows"; break; }
        sleep "$RSS_EVERY"
    done
    stop_pids
    sql "SELECT json_build_object('retention_s', $PURGE_RETENTION, 'rows_left', $rows,
            'rows', $total,
            'empty_after_s', round(extract(epoch FROM clock_timestamp() - '$t0')::numeric, 1))" \
        >"$WORK/purge.json"
    drop_phase
}

for phase in $PHASES; do
    case "$phase" in
        sweep) for p in $PIPELINES; do sweep "$p"; done ;;
        scale) scale ;;
        drain)
            export BENCH_PROCS_SERIES_S="$RSS_EVERY"
            DRAIN_EVENTS="$BIG_EVENTS"
            for p in $PIPELINES; do drain "$p"; done
            unset BENCH_PROCS_SERIES_S
            ;;
        *) die "bench: unknown phase '$phase' in BENCH_PROD_PHASES (sweep, scale, drain)" ;;
    esac
done
DB=
python3 bench/report/production.py "$WORK" "$OUT/production.json" "$OUT/production.md" "$OUT/sweep.svg" \
    "rates=$RATES" "step_seconds=$STEP_SECONDS" "warmup_seconds=$STEP_WARMUP" "clients=$SWEEP_CLIENTS" \
    "max_tps=$MAX_TPS" "failover_rate=$FAILOVER_RATE" "big_drain_events=$BIG_EVENTS" "purge_retention_s=$PURGE_RETENTION"
cat "$OUT/production.md"
