#!/usr/bin/env bash
# `make bench`: measures the pipeline on the local servers with the release build and writes
# bench/results.json, a Markdown summary (bench/summary.md) for BENCHMARKS.md and a chart
# (bench/chart.svg).
#
# Phases, each on its own fresh topics and tables:
#   1. relay drain: BENCH_CHANGES order changes (plus their customer events) are committed with
#      the relay stopped, then the relay publishes the backlog: relay events/s.
#   2. apply drain, per sink: the published backlog is applied by one apply process into the
#      PostgreSQL sink, then into the MongoDB sink: apply events/s per sink.
#   0. stage baselines, no dualsync in the loop: the broker alone (examples/broker_baseline.rs,
#      dualsync's producer and consumer settings), the relay's encoding alone
#      (examples/encode_baseline.rs: JSON → validated Avro message, no server), a raw batched upsert into a PostgreSQL table
#      shaped like the sink's (1,000-row statements), and raw 1,000-document upsert batches into
#      MongoDB with pymongo, so the pipeline's figures can be read against each stage's ceiling.
#   3. latency: everything running, BENCH_RATE order changes/s for BENCH_LATENCY_CHANGES
#      changes: commit→publish (the writing transaction's commit timestamp → published_at;
#      from the row's insert, created_at, too) and commit→applied (→ the PostgreSQL sink's
#      updated_at, for the last event of each key) percentiles,
#      after a warm-up load so topic creation and the first rebalance are not counted.
#      3b, run before 3: the same at a light load (BENCH_LIGHT_RATE changes/s, one writer):
#      commit→publish, and where the relay's time goes (bench/report/breakdown.py).
#   4. end to end: relay and apply → PostgreSQL running while BENCH_CHANGES order changes are
#      committed at full speed: events/s from the first commit to the last row applied.
#   5. side by side with Debezium (scripts/bench_side.sh, docs/benchmarks-method.md): backlog
#      drain and fixed-rate latency of dualsync polling, dualsync capturing from the WAL and
#      Debezium; CPU and RSS per process, WAL bytes and the writers' commit latency.
# Timing is taken from the databases' own clocks; nothing here asserts a number.
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$REPO_ROOT"

CHANGES="${BENCH_CHANGES:-50000}"
# 750 order changes/s commit about 1,000 events/s (the load writes ~1.3 events per change).
RATE="${BENCH_RATE:-750}"
LATENCY_CHANGES="${BENCH_LATENCY_CHANGES:-15000}"
LIGHT_RATE="${BENCH_LIGHT_RATE:-150}"
LIGHT_CHANGES="${BENCH_LIGHT_CHANGES:-3000}"
OUT_DIR="$REPO_ROOT/bench"
mkdir -p "$OUT_DIR" "$LOG_DIR"

bash scripts/up.sh all
log "building dualsync (release)"
cargo build --release --locked --quiet --bin dualsync --example broker_baseline --example encode_baseline
# BENCH_PROFILE=production: the three-broker profile (RF 3, min.insync.replicas 2, acks=all):
# the rate sweep, apply scale-out and the large drain (scripts/bench_production.sh).
case "${BENCH_PROFILE:-default}" in
    default) ;;
    production) exec bash scripts/bench_production.sh ;;
    *) die "bench: BENCH_PROFILE is default or production, not '$BENCH_PROFILE'" ;;
esac
BIN="${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release/dualsync"
BASELINE_ROWS="${BENCH_BASELINE_ROWS:-100000}"
BASELINE_MONGO_DOCS="${BENCH_BASELINE_MONGO_DOCS:-20000}"
CONFIG=connectors/demo.toml
PSQL=(psql -X -q -At -v ON_ERROR_STOP=1 -h "$BIND_HOST" -p "$PG_PORT" -U postgres)
[[ "$("${PSQL[@]}" -d postgres -c 'SHOW track_commit_timestamp')" == on ]] ||
    die "bench: the local PostgreSQL runs without track_commit_timestamp (started by an older scripts/up.sh): make down SERVERS=postgres && make up"

now() { date +%s.%N; }
rate() { awk -v n="$1" -v a="$2" -v b="$3" 'BEGIN { printf "%.0f", n / (b - a) }'; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }
# config_http_port KEY: a port of the [http] section of $CONFIG.
config_http_port() { sed -n "s/^$1 *= *\([0-9]*\).*/\1/p" "$CONFIG"; }
# wait_applied N PORT: until the apply process on PORT counts N events handled (deadline 30 min).
wait_applied() {
    local end=$((SECONDS + 1800)) done
    while :; do
        done=$(curl -fsS "http://$BIND_HOST:$2/metrics" 2>/dev/null |
            awk '/^dualsync_events_(applied|dead_lettered)_total\{/ { n += $NF } END { printf "%d", n }')
        [[ "${done:-0}" -ge "$1" ]] && return 0
        ((SECONDS < end)) || die "bench: timed out waiting for apply to handle $1 events (at ${done:-0})"
        sleep 0.2
    done
}
PIDS=()
stop_all() {
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    PIDS=()
}
trap stop_all EXIT

# One pipeline per phase: fresh database (sink tables live in its `replica` schema so
# latencies can be joined in SQL), topics and groups.
new_pipeline() {
    local name
    name="bench_$1_$(date +%s)"
    "${PSQL[@]}" -d postgres -c "CREATE DATABASE $name"
    export_pipeline_env "$name" "$name" "$name" "$name"
    DB="$name"
    "$BIN" demo setup --config "$CONFIG" >/dev/null
}
sql() { "${PSQL[@]}" -d "$DB" -c "$1"; }
wait_sql() { # wait_sql QUERY: until it returns t (deadline 30 min)
    local end=$((SECONDS + 1800))
    until [[ "$(sql "$1")" == t ]]; do
        ((SECONDS < end)) || die "bench: timed out waiting for: $1"
        sleep 0.2
    done
}
# Milliseconds to an outbox row's `published_at` (set once Kafka acknowledged it) from the
# writing transaction's commit (PostgreSQL's commit timestamp, scripts/up.sh turns on
# track_commit_timestamp) and from the row's insert (`created_at`, earlier by the rest of
# the writer's transaction and its commit).
COMMIT_TIME="pg_xact_commit_timestamp((txid::text::numeric % 4294967296)::text::xid)" # xid8 → xid
COMMIT_MS="extract(epoch FROM published_at - $COMMIT_TIME) * 1000"
INSERT_MS="extract(epoch FROM published_at - created_at) * 1000"
percentiles() { # percentiles MS_EXPRESSION AFTER_SEQ: "p50 p99 max" of the outbox rows after it
    sql "SELECT round(percentile_cont(0.5) WITHIN GROUP (ORDER BY ms)::numeric, 1) || ' ' ||
                round(percentile_cont(0.99) WITHIN GROUP (ORDER BY ms)::numeric, 1) || ' ' || round(max(ms)::numeric, 1)
         FROM (SELECT $1 AS ms FROM dualsync.outbox WHERE seq > $2) l"
}
committed_rate() { # committed_rate AFTER_SEQ: events/s the writers committed after that row
    sql "SELECT round(count(*) / extract(epoch FROM max(created_at) - min(created_at)))
         FROM dualsync.outbox WHERE seq > $1"
}
peak_rss_kb() { awk '/VmHWM/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }

# ---- 0: stage baselines --------------------------------------------------------------------
log "phase 0: stage baselines (broker alone, raw PostgreSQL upserts, raw MongoDB upserts)"
BROKER_JSON=$("${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release/examples/broker_baseline" "$(kafka_brokers)" "$BASELINE_ROWS" 300)
log "broker: $BROKER_JSON"
ENCODE_JSON=$("${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release/examples/encode_baseline" 200000)
log "relay encoding alone: $ENCODE_JSON"
new_pipeline baseline
sql "CREATE TABLE bench_raw (id text PRIMARY KEY, doc jsonb, version bigint NOT NULL,
     deleted boolean NOT NULL DEFAULT false, updated_at timestamptz NOT NULL DEFAULT now())"
{
    for ((b = 0; b < BASELINE_ROWS / 1000; b++)); do
        echo "INSERT INTO bench_raw AS t (id, doc, version, deleted, updated_at)
              SELECT 'o' || (g % 10000), jsonb_build_object('id', 'o' || (g % 10000), 'customer_id', 'c' || (g % 1000),
                     'status', 'paid', 'total_cents', g, 'lines', jsonb_build_array(jsonb_build_object('sku', 's1', 'qty', 1)), 'note', 'n'),
                     g, false, now()
              FROM generate_series($((b * 1000 + 1)), $((b * 1000 + 1000))) g
              ON CONFLICT (id) DO UPDATE SET doc = EXCLUDED.doc, version = EXCLUDED.version,
                  deleted = EXCLUDED.deleted, updated_at = EXCLUDED.updated_at
              WHERE t.version < EXCLUDED.version;"
    done
} >"$LOG_DIR/bench-raw-upsert.sql"
t0=$(now)
"${PSQL[@]}" -d "$DB" -f "$LOG_DIR/bench-raw-upsert.sql"
t1=$(now)
RAW_PG_RPS=$(rate "$BASELINE_ROWS" "$t0" "$t1")
log "raw PostgreSQL upsert: $BASELINE_ROWS rows in $(secs "$t0" "$t1")s"
RAW_MONGO_RPS=$("$SECANTUS_HOME/bin/python" - "$(mongo_url)" "$DB" "$BASELINE_MONGO_DOCS" <<'PY'
import sys, time, pymongo
url, db, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
coll = pymongo.MongoClient(url)[db].bench_raw
start = time.time()
for b in range(n // 1000):
    coll.bulk_write([pymongo.UpdateOne(
        {"_id": f"o{(b * 1000 + i) % 10000}"},
        {"$set": {"customer_id": f"c{i % 1000}", "status": "paid", "total_cents": b * 1000 + i,
                  "lines": [{"sku": "s1", "qty": 1}], "note": "n",
                  "_dualsync": {"version": b * 1000 + i, "deleted": False}}},
        upsert=True) for i in range(1000)], ordered=False)
print(round(n / (time.time() - start)))
PY
)
log "raw MongoDB upsert: $RAW_MONGO_RPS docs/s"

# ---- 1 + 2: backlog drains ---------------------------------------------------------------
new_pipeline drain
log "phase 1: committing $CHANGES order changes with the relay stopped"
"$BIN" demo load --config "$CONFIG" --customers 1000 --orders 10000 --changes "$CHANGES" --writers 4 | tee "$LOG_DIR/bench-load.txt"
EVENTS=$(sql "SELECT count(*) FROM dualsync.outbox")
t0=$(now)
"$BIN" relay --config "$CONFIG" >"$LOG_DIR/bench-relay.log" 2>&1 & RELAY=$!; PIDS+=("$RELAY")
wait_sql "SELECT count(*) = 0 FROM dualsync.outbox WHERE published_at IS NULL"
t1=$(now)
RELAY_RSS=$(peak_rss_kb "$RELAY")
RELAY_EPS=$(rate "$EVENTS" "$t0" "$t1")
log "relay: $EVENTS events in $(secs "$t0" "$t1")s"

LIVE_EXPECTED=$(sql "SELECT (SELECT count(*) FROM shop.orders) + (SELECT count(*) FROM shop.customers)")
declare -A APPLY_EPS APPLY_RSS
for sink in postgres mongo; do
    t0=$(now)
    "$BIN" apply --config "$CONFIG" --sink "$sink" >"$LOG_DIR/bench-apply-$sink.log" 2>&1 & APPLY=$!; PIDS+=("$APPLY")
    if [[ "$sink" == postgres ]]; then
        wait_sql "SELECT to_regclass('replica.orders') IS NOT NULL AND to_regclass('replica.customers') IS NOT NULL"
        wait_sql "SELECT (SELECT count(*) FROM replica.orders WHERE NOT deleted) + (SELECT count(*) FROM replica.customers WHERE NOT deleted) = $LIVE_EXPECTED
                  AND (SELECT coalesce(max(version), 0) FROM replica.orders) = (SELECT max(seq) FROM dualsync.outbox WHERE aggregatetype = 'orders')"
    else
        # From apply's own counters: every event written, stale or dead-lettered. Polling the
        # sink instead (count_documents every 200 ms) took CPU from the single-threaded
        # SecantusDB server the raw baseline has to itself, and live counts match before the
        # last change of an existing order lands.
        wait_applied "$EVENTS" "$(config_http_port apply_port)"
    fi
    t1=$(now)
    APPLY_RSS[$sink]=$(peak_rss_kb "$APPLY")
    APPLY_EPS[$sink]=$(rate "$EVENTS" "$t0" "$t1")
    log "apply $sink: $EVENTS events in $(secs "$t0" "$t1")s"
    kill -TERM "$APPLY"; wait "$APPLY" || true
done
stop_all

# ---- 3: latency at a fixed rate ----------------------------------------------------------
new_pipeline latency
# The relay's per-batch debug line says where its time goes (bench/report/breakdown.py).
RUST_LOG=info,dualsync::relay=debug "$BIN" relay --config "$CONFIG" >"$LOG_DIR/bench-relay-latency.log" 2>&1 & PIDS+=($!)
"$BIN" apply --config "$CONFIG" --sink postgres >"$LOG_DIR/bench-apply-latency.log" 2>&1 & PIDS+=($!)
# Warm-up: topics created, partitions assigned, sink tables created; only later events count.
"$BIN" demo load --config "$CONFIG" --customers 1000 --orders 10000 --changes 100 --writers 1 --seed 7 >/dev/null
wait_sql "SELECT to_regclass('replica.orders') IS NOT NULL AND (SELECT coalesce(max(version), 0) FROM replica.orders) = (SELECT max(seq) FROM dualsync.outbox WHERE aggregatetype = 'orders')"
# 3b first, at a light load (BENCH_LIGHT_RATE changes/s, one writer), on the same pipeline:
# measured after the heavier load instead, it measures the catch-up from that load (autovacuum,
# apply and broker still busy): p99 20-153 ms in seven runs on 2026-12-02, 13-51 ms in four
# runs with this order.
LIGHT_FROM=$(sql "SELECT max(seq) FROM dualsync.outbox")
LIGHT_SINCE=$(date -u +%Y-%m-%dT%H:%M:%S)
log "phase 3b: $LIGHT_CHANGES order changes at $LIGHT_RATE/s"
"$BIN" demo load --config "$CONFIG" --customers 1000 --orders 10000 --changes "$LIGHT_CHANGES" --writers 1 --rate "$LIGHT_RATE" --seed 11 >/dev/null
wait_sql "SELECT count(*) = 0 FROM dualsync.outbox WHERE published_at IS NULL"
LIGHT=$(percentiles "$COMMIT_MS" "$LIGHT_FROM")
LIGHT_INSERT=$(percentiles "$INSERT_MS" "$LIGHT_FROM")
LIGHT_EPS=$(committed_rate "$LIGHT_FROM")
LIGHT_UNTIL=$(date -u +%Y-%m-%dT%H:%M:%S)
WARM=$(sql "SELECT max(seq) FROM dualsync.outbox")
log "phase 3: $LATENCY_CHANGES order changes at $RATE/s"
"$BIN" demo load --config "$CONFIG" --customers 1000 --orders 10000 --changes "$LATENCY_CHANGES" --writers 4 --rate "$RATE" >/dev/null
wait_sql "SELECT count(*) = 0 FROM dualsync.outbox WHERE published_at IS NULL"
wait_sql "SELECT to_regclass('replica.orders') IS NOT NULL AND (SELECT coalesce(max(version), 0) FROM replica.orders) = (SELECT max(seq) FROM dualsync.outbox WHERE aggregatetype = 'orders')"
PUB=$(percentiles "$COMMIT_MS" "$WARM")
PUB_INSERT=$(percentiles "$INSERT_MS" "$WARM")
APP=$(sql "SELECT round(percentile_cont(0.5) WITHIN GROUP (ORDER BY ms)::numeric, 1) || ' ' || round(percentile_cont(0.99) WITHIN GROUP (ORDER BY ms)::numeric, 1) || ' ' || round(max(ms)::numeric, 1) || ' ' || count(*)
           FROM (SELECT extract(epoch FROM r.updated_at - $COMMIT_TIME) * 1000 AS ms
                 FROM replica.orders r JOIN dualsync.outbox o ON o.seq = r.version WHERE o.seq > $WARM) l")
LAT_EPS=$(committed_rate "$WARM")
log "latency phase: $LAT_EPS events/s committed"
stop_all
BREAKDOWN=$(python3 bench/report/breakdown.py "$LOG_DIR/bench-relay-latency.log" "$LIGHT_SINCE" "$LIGHT_UNTIL")
log "light load, relay batches: $BREAKDOWN"
read -r PUB_P50 PUB_P99 PUB_MAX <<<"$PUB"
read -r APP_P50 APP_P99 APP_MAX APP_N <<<"$APP"
read -r LIGHT_P50 LIGHT_P99 LIGHT_MAX <<<"$LIGHT"
read -r LIGHT_INS_P50 LIGHT_INS_P99 LIGHT_INS_MAX <<<"$LIGHT_INSERT"
read -r PUB_INS_P50 PUB_INS_P99 PUB_INS_MAX <<<"$PUB_INSERT"

# ---- 4: end to end at full speed ---------------------------------------------------------
# Everything running while the writers commit as fast as they can: events/s from the first
# commit to the last row visible in the PostgreSQL sink (both clocks are PostgreSQL's).
new_pipeline e2e
"$BIN" relay --config "$CONFIG" >"$LOG_DIR/bench-relay-e2e.log" 2>&1 & PIDS+=($!)
"$BIN" apply --config "$CONFIG" --sink postgres >"$LOG_DIR/bench-apply-e2e.log" 2>&1 & PIDS+=($!)
log "phase 4: $CHANGES order changes at full speed, relay and apply running"
"$BIN" demo load --config "$CONFIG" --customers 1000 --orders 10000 --changes "$CHANGES" --writers 4 >/dev/null
wait_sql "SELECT count(*) = 0 FROM dualsync.outbox WHERE published_at IS NULL"
wait_sql "SELECT to_regclass('replica.orders') IS NOT NULL AND to_regclass('replica.customers') IS NOT NULL"
# Every key at its latest event (not only the newest key: partitions are applied side by side).
caught_up() { # caught_up AGGREGATE
    echo "NOT EXISTS (SELECT 1 FROM (SELECT aggregateid, max(seq) AS seq FROM dualsync.outbox
            WHERE aggregatetype = '$1' GROUP BY aggregateid) o
          LEFT JOIN replica.$1 r ON r.id = o.aggregateid WHERE r.version IS DISTINCT FROM o.seq)"
}
wait_sql "SELECT $(caught_up orders) AND $(caught_up customers)"
read -r E2E_EVENTS E2E_SECS <<<"$(sql "SELECT count(*) || ' ' || round(extract(epoch FROM
    greatest((SELECT max(updated_at) FROM replica.orders), (SELECT max(updated_at) FROM replica.customers))
    - min(created_at))::numeric, 1) FROM dualsync.outbox")"
E2E_EPS=$(rate "$E2E_EVENTS" 0 "$E2E_SECS")
log "end to end: $E2E_EVENTS events from first commit to last row applied in ${E2E_SECS}s"
stop_all

DATE="$(date -u +%Y-%m-%d)"
RSS_PG="${APPLY_RSS[postgres]}"
RSS_MONGO="${APPLY_RSS[mongo]}"
CPU="$(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo)"
cat >"$OUT_DIR/results.json" <<JSON
{
  "date": "$DATE",
  "profile": "default (one Kafka node, RF 1)",
  "machine": "$CPU, $(uname -m)",
  "versions": {"dualsync": "$("$BIN" --version | awk '{print $2}')", "postgres": "$("${PSQL[@]}" -d postgres -c 'SHOW server_version' | awk '{print $1}')", "kafka": "$KAFKA_VERSION", "secantusdb": "$SECANTUS_VERSION"},
  "end_to_end_postgres": {"events": $E2E_EVENTS, "seconds": $E2E_SECS, "events_per_s": $E2E_EPS},
  "drain": {"events": $EVENTS, "relay_events_per_s": $RELAY_EPS, "apply_postgres_events_per_s": ${APPLY_EPS[postgres]}, "apply_mongo_events_per_s": ${APPLY_EPS[mongo]}},
  "baselines": {"broker": $BROKER_JSON, "relay_encode": $ENCODE_JSON, "raw_postgres_upsert_rows_per_s": $RAW_PG_RPS, "raw_postgres_upsert_rows": $BASELINE_ROWS, "raw_mongo_upsert_docs_per_s": $RAW_MONGO_RPS, "raw_mongo_upsert_docs": $BASELINE_MONGO_DOCS},
  "peak_rss_kib": {"relay": $RELAY_RSS, "apply_postgres": ${APPLY_RSS[postgres]}, "apply_mongo": ${APPLY_RSS[mongo]}},
  "latency": {"rate_changes_per_s": $RATE, "events_per_s": $LAT_EPS, "changes": $LATENCY_CHANGES,
              "commit_to_published_ms": {"p50": $PUB_P50, "p99": $PUB_P99, "max": $PUB_MAX},
              "insert_to_published_ms": {"p50": $PUB_INS_P50, "p99": $PUB_INS_P99, "max": $PUB_INS_MAX},
              "commit_to_applied_postgres_ms": {"p50": $APP_P50, "p99": $APP_P99, "max": $APP_MAX, "samples": $APP_N}},
  "light_latency": {"rate_changes_per_s": $LIGHT_RATE, "events_per_s": $LIGHT_EPS, "changes": $LIGHT_CHANGES,
                    "commit_to_published_ms": {"p50": $LIGHT_P50, "p99": $LIGHT_P99, "max": $LIGHT_MAX},
                    "insert_to_published_ms": {"p50": $LIGHT_INS_P50, "p99": $LIGHT_INS_P99, "max": $LIGHT_INS_MAX},
                    "relay_batches": $BREAKDOWN}
}
JSON
ACK_MD=$(python3 -c 'import json,sys; d=json.loads(sys.argv[1])["ack_ms"]; print("%s/s (p50 / p99 / max) | %s / %s / %s" % (d["rate_per_s"], d["p50"], d["p99"], d["max"]))' "$BROKER_JSON")
BREAKDOWN_MD=$(python3 -c 'import json,sys; d=json.loads(sys.argv[1]); print("; ".join("%s / %s" % (d[k]["p50"], d[k]["p99"]) for k in ("waited_ms", "publish_ms", "mark_ms")))' "$BREAKDOWN")
cat >"$OUT_DIR/summary.md" <<MD
| measurement ($DATE, $CPU; default profile: one Kafka node, RF 1) | result |
| --- | --- |
| baseline: broker alone, produce / consume ($BASELINE_ROWS × 300 B, dualsync's client settings) | $(python3 -c "import json,sys; d=json.loads(sys.argv[1]); print(d['produce_per_s'], '/', d['consume_per_s'])" "$BROKER_JSON") messages/s |
| baseline: broker acknowledgement of one message at a time, $ACK_MD ms |
| baseline: the relay's encoding alone (JSON parse, validation, Avro, headers; one core) | $(python3 -c "import json,sys; d=json.loads(sys.argv[1]); print(d['events_per_s'], 'events/s,', d['us_per_event'], 'µs/event')" "$ENCODE_JSON") |
| baseline: raw PostgreSQL upsert, 1,000-row statements ($BASELINE_ROWS rows) | $RAW_PG_RPS rows/s |
| baseline: raw MongoDB upsert, 1,000-document unordered bulk writes ($BASELINE_MONGO_DOCS docs, pymongo) | $RAW_MONGO_RPS docs/s |
| end to end, relay + apply → PostgreSQL running, $E2E_EVENTS events committed at full speed: first commit → last row applied | $E2E_EPS events/s (${E2E_SECS} s) |
| relay, backlog of $EVENTS events | $RELAY_EPS events/s |
| apply → PostgreSQL, same backlog | ${APPLY_EPS[postgres]} events/s |
| apply → MongoDB (SecantusDB), same backlog | ${APPLY_EPS[mongo]} events/s |
| commit → published at $RATE changes/s = $LAT_EPS events/s (p50 / p99 / max; from the row's insert: $PUB_INS_P50 / $PUB_INS_P99 / $PUB_INS_MAX) | $PUB_P50 / $PUB_P99 / $PUB_MAX ms |
| commit → applied in PostgreSQL (p50 / p99 / max, $APP_N samples) | $APP_P50 / $APP_P99 / $APP_MAX ms |
| commit → published at a light load, $LIGHT_RATE changes/s = $LIGHT_EPS events/s (p50 / p99 / max; from the row's insert: $LIGHT_INS_P50 / $LIGHT_INS_P99 / $LIGHT_INS_MAX) | $LIGHT_P50 / $LIGHT_P99 / $LIGHT_MAX ms |
| light load, the relay's batches (p50 / p99): oldest row inserted → read; handed to the producer → acknowledged; acknowledged → marked published | $BREAKDOWN_MD ms |
| peak RSS relay / apply-postgres / apply-mongo | $((RELAY_RSS / 1024)) / $((RSS_PG / 1024)) / $((RSS_MONGO / 1024)) MiB |
MD

# ---- 5: side by side with Debezium ------------------------------------------------------
# scripts/bench_side.sh: dualsync and the Debezium peer, same outbox, broker and load
# generator; its results go into results.json ("side_by_side") and below the summary.
stop_all
bash scripts/bench_side.sh
python3 - "$OUT_DIR/results.json" "$OUT_DIR/side.json" <<'PY'
import json, sys
results = json.load(open(sys.argv[1]))
results["side_by_side"] = json.load(open(sys.argv[2]))
json.dump(results, open(sys.argv[1], "w"), indent=1)
PY
{ echo; cat "$OUT_DIR/side.md"; } >>"$OUT_DIR/summary.md"
python3 bench/report/chart.py "$OUT_DIR/results.json" "$OUT_DIR/chart.svg"
cat "$OUT_DIR/summary.md"
log "results in bench/results.json, bench/summary.md and bench/chart.svg"
