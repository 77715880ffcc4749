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
# topic" is the broker's append time for both, read back by bench/report/topics.py.
#   drain:  BENCH_DRAIN_EVENTS events committed at full speed with the pipeline stopped (the
#           load generator's rate is measured here), then the pipeline is started.
#   fixed:  BENCH_FIXED_RATE events/s for BENCH_FIXED_SECONDS, BENCH_FIXED_BATCH new orders per
#           transaction (every event keeps its own sink row), after BENCH_FIXED_WARMUP_SECONDS
#           at that rate that are not counted.
# CPU and peak RSS of each process come from /proc (bench/report/procs.py).
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# shellcheck source=scripts/bench_lib.sh
. "$REPO_ROOT/scripts/bench_lib.sh"
# shellcheck source=scripts/bench_peer.sh
. "$REPO_ROOT/scripts/bench_peer.sh"
cd "$REPO_ROOT"

FIXED_RATE="${BENCH_FIXED_RATE:-1000}"
FIXED_SECONDS="${BENCH_FIXED_SECONDS:-600}"
FIXED_WARMUP="${BENCH_FIXED_WARMUP_SECONDS:-120}"
# Events per transaction at the fixed rate. Not 1: the outbox's NOTIFY trigger serialised
# commits (PostgreSQL holds the notify queue's lock through the commit's WAL flush), which
# capped single-event transactions at 400-560 commits/s here (3,800/s with the trigger off).
# Since 2026-12-03 the trigger notifies only a waiting relay (docs/outbox.md); kept at 4 so
# that runs stay comparable with the earlier ones.
FIXED_BATCH="${BENCH_FIXED_BATCH:-4}"
FIXED_CLIENTS="${BENCH_FIXED_CLIENTS:-8}"
# dualsync_wal: dualsync with `[source] capture = "wal"` (issue #38), beside polling.
PIPELINES="${BENCH_PIPELINES:-dualsync dualsync_wal debezium}"
# Seconds of `perf record` (DWARF call graphs) on the relay and on apply during dualsync's
# fixed-rate phase; 0 (the default) records nothing. Reports go to bench/profile/.
PROFILE_SECONDS="${BENCH_PROFILE_SECONDS:-0}"
BIN="${BENCH_BIN:-${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release/dualsync}"
CONFIG=connectors/demo.toml
WORK="$LOG_DIR/bench-side"
mkdir -p "$WORK"
[[ " $PIPELINES " != *" dualsync"* || -x "$BIN" ]] ||
    die "bench: no release build at $BIN (cargo build --release --bin dualsync)"
[[ "$("${PSQL[@]}" -d postgres -c 'SHOW wal_level')" == logical ]] ||
    die "bench: the peer needs wal_level = logical (scripts/up.sh sets it)"
bench_python
debezium_install
jmx_setup
PG_PID="$(listener_pid "$PG_PORT")"
BROKER_PID="$(listener_pid "$KAFKA_PORT")"
[[ -n "$PG_PID" && -n "$BROKER_PID" ]] || die "bench: PostgreSQL or the broker is not running (make up)"

cleanup() {
    [[ -n "$SAMPLER" ]] && kill -TERM "$SAMPLER" 2>/dev/null
    stop_pids
    peer_stop
    [[ -n "${DB:-}" ]] && peer_drop_slot "$DB" && wal_drop_slot "$DB"
    return 0
}
trap cleanup EXIT

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
    # WAL written on the cluster while the window's events are committed and applied (the
    # sink is on the same cluster, so its writes count, for every pipeline alike).
    local wal_from wal_to
    wal_from=$(sql "SELECT pg_current_wal_insert_lsn()")
    # The writers' commit latency: pgbench's per-transaction log (elapsed minus schedule lag).
    rm -f "$WORK/$DB-tx".*
    load order_new.sql -c "$FIXED_CLIENTS" -j 2 -R "$((FIXED_RATE / FIXED_BATCH))" -T "$FIXED_SECONDS" -D k="$FIXED_BATCH" \
        -l --log-prefix="$WORK/$DB-tx"
    [[ -z "$profiler" ]] || wait "$profiler" || warn "bench: perf record failed: $(cat "$WORK"/*.perf.log)"
    caught_up
    wal_to=$(sql "SELECT pg_current_wal_insert_lsn()")
    stop_sampler
    stop_pipeline "$p"
    [[ -z "$profiler" ]] || profile_report "$PROFILE_SECONDS"
    on_topic "$(sql "SELECT count(*) FROM dualsync.outbox")"
    sql "WITH e AS (SELECT *, extract(epoch FROM appended - committed) * 1000 AS topic_ms,
                           extract(epoch FROM applied - committed) * 1000 AS applied_ms,
                           floor(extract(epoch FROM committed - min(committed) OVER ()) / 60) AS minute
                    FROM ($EVENTS_SQL) x WHERE seq > $warm)
         SELECT json_build_object('events', count(*), 'missing_on_topic', count(*) - count(appended),
                'missing_applied', count(*) - count(applied),
                'committed_events_per_s', round(count(*) / extract(epoch FROM max(committed) - min(committed))),
                'commit_to_on_topic_ms', $(pct topic_ms), 'commit_to_applied_ms', $(pct applied_ms),
                'wal_bytes_per_event', round(pg_wal_lsn_diff('$wal_to', '$wal_from') / count(*)),
                'per_minute', (SELECT json_agg(json_build_object('minute', minute, 'events', n,
                    'on_topic_p99_ms', t99, 'applied_p99_ms', a99) ORDER BY minute) FROM (
                    SELECT minute, count(*) AS n,
                           round(percentile_cont(0.99) WITHIN GROUP (ORDER BY topic_ms)::numeric, 1) AS t99,
                           round(percentile_cont(0.99) WITHIN GROUP (ORDER BY applied_ms)::numeric, 1) AS a99
                    FROM e GROUP BY minute) m))
         FROM e" >"$WORK/$p-fixed.json"
    python3 - "$WORK/$p-fixed.json" "$WORK/$DB-procs.json" "$WORK/$DB-tx".* <<'PY'
import json, sys
d = json.load(open(sys.argv[1])); d["processes"] = json.load(open(sys.argv[2]))
# pgbench -l lines: client, transaction, elapsed µs, script, epoch s, µs, schedule lag µs.
lat = sorted((int(f[2]) - int(f[6])) / 1000 for log in sys.argv[3:] for f in map(str.split, open(log)) if len(f) >= 7)
if lat:
    q = lambda x: round(lat[min(len(lat) - 1, int(x * len(lat)))], 2)
    d["writer_commit_ms"] = {"transactions": len(lat), "p50": q(0.5), "p99": q(0.99), "max": round(lat[-1], 2)}
json.dump(d, open(sys.argv[1], "w"))
PY
    log "side by side, $p fixed rate: $(cat "$WORK/$p-fixed.json")"
}

rm -f "$WORK"/*-drain.json "$WORK"/*-fixed.json
for p in $PIPELINES; do drain "$p"; done
for p in $PIPELINES; do fixed "$p"; done
DB=
python3 bench/report/side_report.py "$WORK" "$REPO_ROOT/bench/side.json" "$REPO_ROOT/bench/side.md" \
    "$FIXED_SECONDS" "$LOAD_CLIENTS" "$LOAD_BATCH" "$DBZ_POLL_MS" "$FIXED_CLIENTS" "$FIXED_BATCH" "$FIXED_WARMUP"
cat "$REPO_ROOT/bench/side.md"
