#!/usr/bin/env bash
# The throughput guard `make test` runs (scripts/test.sh): fails when the pipeline's drain
# regresses badly against a stage measured beside it in the same run, so the machine's own
# speed and load cancel out (the method and how the threshold was chosen:
# docs/benchmarks-method.md, "The guard in make test").
#
# Measures, BENCH_GUARD_PAIRS times and alternating, over a backlog of BENCH_GUARD_EVENTS
# events committed while nothing runs (pgbench, bench/load/orders_batch.sql):
#   relay alone:     relay start → the last outbox row marked published;
#   relay + apply:   relay and apply → PostgreSQL started together → the last row applied.
# The ratio is the relay alone's time over the combined time (the combined drain's rate as a
# share of the relay alone's); the guard takes the median of the pairs' ratios and fails
# below BENCH_GUARD_MIN_RATIO. It uses the build `make test` just made (the debug binary),
# the shared PostgreSQL and Kafka, and fresh databases and topics (dropped afterwards).
# BENCH_GUARD_OUT=FILE appends one JSON line per run (the ratios, the load average).
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# shellcheck source=scripts/bench_lib.sh
. "$REPO_ROOT/scripts/bench_lib.sh"
cd "$REPO_ROOT"

EVENTS="${BENCH_GUARD_EVENTS:-20000}"
PAIRS="${BENCH_GUARD_PAIRS:-5}"
# Chosen from 12 runs on the loaded 2-core machine (docs/benchmarks-method.md).
MIN_RATIO="${BENCH_GUARD_MIN_RATIO:-0.45}"
BIN="${BENCH_GUARD_BIN:-${CARGO_TARGET_DIR:-$REPO_ROOT/target}/debug/dualsync}"
CONFIG=connectors/demo.toml
[[ -x "$BIN" ]] || die "bench guard: no dualsync binary at $BIN (cargo build --bin dualsync)"
command -v pgbench >/dev/null || die "bench guard: pgbench is missing (Debian: postgresql-client)"
WORK="$LOG_DIR/bench-guard"
mkdir -p "$WORK"

PIDS=()
DBS=()
cleanup() {
    local pid db
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    PIDS=()
    for db in "${DBS[@]}"; do
        "${PSQL[@]}" -d postgres -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" 2>/dev/null || true
    done
}
trap cleanup EXIT

# backlog KIND: a fresh database with BENCH_GUARD_EVENTS events committed, nothing running.
backlog() {
    local db="guard_$1_$(date +%s%N | cut -c1-13)"
    DBS+=("$db")
    bench_database "$db"
    load orders_batch.sql -c 4 -j 2 -t "$((EVENTS / 1000))" -D k=250
}

# drain KIND: DRAIN_SECS, the seconds from the start of the pipeline (the relay alone, or
# relay + apply) to its last write, both from PostgreSQL's clock. (Not printed for a command
# substitution: its subshell would lose DBS and PIDS, and with them the clean-up.)
drain() {
    backlog "$1"
    local t0 secs
    t0=$(sql "SELECT clock_timestamp()")
    "$BIN" relay --config "$CONFIG" --http-port 0 >"$WORK/$DB-relay.log" 2>&1 &
    PIDS+=($!)
    if [[ "$1" == relay ]]; then
        wait_sql "SELECT NOT EXISTS (SELECT 1 FROM dualsync.outbox WHERE published_at IS NULL)" 300
        secs=$(sql "SELECT extract(epoch FROM max(published_at) - '$t0') FROM dualsync.outbox")
    else
        "$BIN" apply --config "$CONFIG" --sink postgres --http-port 0 >"$WORK/$DB-apply.log" 2>&1 &
        PIDS+=($!)
        wait_sql "SELECT to_regclass('replica.orders') IS NOT NULL" 300
        wait_sql "SELECT NOT EXISTS (
            SELECT 1 FROM (SELECT aggregateid, max(seq) AS seq FROM dualsync.outbox GROUP BY aggregateid) o
            LEFT JOIN replica.orders r ON r.id = o.aggregateid WHERE r.version IS DISTINCT FROM o.seq)" 300
        secs=$(sql "SELECT extract(epoch FROM max(updated_at) - '$t0') FROM replica.orders")
    fi
    local pid
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    PIDS=()
    DRAIN_SECS="$secs"
}

log "bench guard: $PAIRS pairs of drains of $EVENTS events (relay alone, relay + apply), $BIN"
started=$SECONDS
load_before=$(cut -d' ' -f1 /proc/loadavg)
ratios=()
for ((i = 1; i <= PAIRS; i++)); do
    drain relay
    relay_s=$DRAIN_SECS
    drain both
    both_s=$DRAIN_SECS
    ratio=$(awk -v a="$relay_s" -v b="$both_s" 'BEGIN { printf "%.3f", a / b }')
    ratios+=("$ratio")
    log "bench guard: pair $i: relay alone $(awk -v s="$relay_s" -v n="$EVENTS" 'BEGIN { printf "%.0f events/s (%.2f s)", n / s, s }'), relay + apply $(awk -v s="$both_s" -v n="$EVENTS" 'BEGIN { printf "%.0f events/s (%.2f s)", n / s, s }'): ratio $ratio"
done
median=$(printf '%s\n' "${ratios[@]}" | sort -n | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }')
load_after=$(cut -d' ' -f1 /proc/loadavg)
if [[ -n "${BENCH_GUARD_OUT:-}" ]]; then
    printf '{"date": "%s", "events": %s, "ratios": [%s], "median": %s, "load_avg_1m": [%s, %s], "seconds": %s}\n' \
        "$(date -u +%FT%TZ)" "$EVENTS" "$(
            IFS=,
            echo "${ratios[*]}"
        )" "$median" "$load_before" "$load_after" "$((SECONDS - started))" >>"$BENCH_GUARD_OUT"
fi
if awk -v m="$median" -v t="$MIN_RATIO" 'BEGIN { exit !(m < t) }'; then
    die "bench guard: the combined drain (relay + apply) ran at $median of the relay alone's rate (median of ${ratios[*]}), below the threshold $MIN_RATIO: a throughput regression in apply or between the stages (docs/benchmarks-method.md, \"The guard in make test\"; logs in $WORK)"
fi
log "bench guard: passed: combined drain at $median of the relay alone (pairs: ${ratios[*]}; threshold $MIN_RATIO; load average $load_before → $load_after; $((SECONDS - started)) s)"
