#!/usr/bin/env bash
# `make chaos`: runs the fault-injection test (tests/it/chaos.rs) for CHAOS_RUNS seeded
# schedules of CHAOS_FAULTS faults each (seeds CHAOS_FIRST_SEED, +1, ...), and writes one line
# per schedule to docs/chaos-report.md, and a table per network fault kind (partition, slow
# link, resets, relay leader cut-off, PostgreSQL primary failover) from the per-fault lines the
# outbox schedule prints: time until healthy again, longest commit -> applied, what each
# process logged. DUALSYNC_CHAOS_SKIP="leader cut-off" leaves a kind out (e.g. on a build
# without the relay's partition fix, where that check fails by design). A failing schedule is recorded with its log and the run
# goes on; the exit status says whether any failed. DUALSYNC_CHAOS_SEED=<seed> replays one.
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$REPO_ROOT"

RUNS="${CHAOS_RUNS:-20}"
FAULTS="${CHAOS_FAULTS:-12}"
FIRST="${CHAOS_FIRST_SEED:-1}"
# Which schedules: `outbox` (PostgreSQL outbox primary) and/or `mongo` (MongoDB primary
# writing multi-document transactions), each one test of tests/it/chaos*.
SCHEDULES="${CHAOS_SCHEDULES:-outbox mongo}"
REPORT="${CHAOS_REPORT:-$REPO_ROOT/docs/chaos-report.md}"
FAILED=()
mkdir -p "$REPO_ROOT/docs" "$LOG_DIR"

bash scripts/up.sh all
# Toxiproxy (Go module proxy): the outbox schedule routes every connection through it.
install_go_tool toxiproxy
write_env_file
# shellcheck source=/dev/null
. "$ENV_FILE"
export DUALSYNC_TEST_PG_URL DUALSYNC_TEST_KAFKA_BROKERS DUALSYNC_TEST_MONGO_URL \
    DUALSYNC_TEST_PG_BIN DUALSYNC_TEST_MONGOD DUALSYNC_TEST_KAFKA_LIBS DUALSYNC_TEST_TOXIPROXY
log "building the test binary"
cargo test --locked --test it --no-run --quiet

# schedule name -> test filter, summary-line prefix, report section title
filter() { [[ $1 == mongo ]] && echo "chaos::mongo::" || echo "chaos::seeded"; }
prefix() { [[ $1 == mongo ]] && echo "chaos mongo seed" || echo "chaos seed"; }
title() {
    if [[ $1 == mongo ]]; then
        echo "MongoDB primary: multi-document transactions through the change-stream relay"
    else
        echo "PostgreSQL outbox primary"
    fi
}
# The per-fault lines (`chaos fault seed N: kind | target | healthy Xs after the heal | longest
# commit → applied Ys | logs`) summed up per kind: count, healthy-after range, worst latency.
fault_table() {
    python3 - "$1" <<'PY'
import re, sys
kinds = {}
for line in open(sys.argv[1], encoding="utf-8"):
    parts = [p.strip() for p in line.split("|")]
    kind = parts[0].split(":", 1)[1].strip()
    healthy = re.search(r"healthy ([0-9.]+)s", parts[2])
    longest = float(re.search(r"([0-9.]+)s", parts[3]).group(1))
    k = kinds.setdefault(kind, {"n": 0, "healthy": [], "never": 0, "longest": 0.0, "lines": 0})
    k["n"] += 1
    if healthy:
        k["healthy"].append(float(healthy.group(1)))
    else:
        k["never"] += 1
    k["longest"] = max(k["longest"], longest)
    k["lines"] = max([k["lines"]] + [int(n) for n in re.findall(r": (\d+) lines", parts[4])])
print("| fault kind | faults | healthy again after the heal (/readyz 200, lag < 1 s) | longest commit → applied | most lines one process logged |")
print("|---|---|---|---|---|")
for kind, k in kinds.items():
    h = k["healthy"]
    span = f"{min(h):.1f}–{max(h):.1f} s" if h else "-"
    if k["never"]:
        span += f", {k['never']} not within 180 s"
    print(f"| {kind} | {k['n']} | {span} | {k['longest']:.1f} s | {k['lines']} |")
PY
}
LINES_DIR="$(mktemp -d)"
: >"$LINES_DIR/faults"
for ((i = 0; i < RUNS; i++)); do
    seed=$((FIRST + i))
    for schedule in $SCHEDULES; do
        out="$LOG_DIR/chaos-$schedule-$seed.txt"
        log "schedule $((i + 1))/$RUNS ($schedule, seed $seed)"
        if ! DUALSYNC_CHAOS_SEED="$seed" DUALSYNC_CHAOS_FAULTS="$FAULTS" \
            cargo test --locked --test it --quiet "$(filter "$schedule")" -- --nocapture >"$out" 2>&1; then
            echo "- $schedule seed $seed: FAILED: $(grep -h -m1 "seed $seed: " "$out" || echo "see $out")" >>"$LINES_DIR/$schedule"
            log_tail "$out" 40
            log "chaos schedule $schedule with seed $seed failed; replay: DUALSYNC_CHAOS_SEED=$seed DUALSYNC_CHAOS_FAULTS=$FAULTS cargo test --test it $(filter "$schedule") -- --nocapture"
            FAILED+=("$schedule/$seed")
            continue
        fi
        grep -h "^$(prefix "$schedule") $seed:" "$out" | sed 's/^/- /' >>"$LINES_DIR/$schedule"
    done
    # Per-fault measurements, failed schedules' included (what was measured before the failure).
    grep -h "^chaos fault seed $seed:" "$LOG_DIR"/chaos-outbox-"$seed".txt >>"$LINES_DIR/faults" 2>/dev/null || true
done
{
    echo "# Chaos report"
    echo
    echo "\`make chaos\` on $(date -u +%Y-%m-%d), $(nproc) cores: $RUNS schedules of $FAULTS faults per"
    echo "pipeline, on a private three-broker Apache Kafka 4.4 cluster (replication factor 3,"
    echo "min.insync.replicas 2). Each line is the test's own summary."
    for schedule in $SCHEDULES; do
        echo
        echo "## $(title "$schedule")"
        echo
        if [[ $schedule == mongo ]]; then
            echo "Three writers on a private SecantusDB run multi-document transactions (inserts,"
            echo "updates, replaces, deletes and re-inserts of the same documents, interleaved in random"
            echo "orders) and single-document writes on 12 customers and 24 carts; faults: kill -9 of the"
            echo "relay / an apply / both, poison, a standby relay taking over from one killed with -9,"
            echo "restarts of the primary's and the MongoDB sink's servers, kill -9 of a partition leader"
            echo "or of the active KRaft controller; and on the leading relay's own Toxiproxy link to the"
            echo "primary a partition, a slow link, resets, and the leader cut off while a standby relay"
            echo "takes the lease over."
        else
            echo "kill -9 of relay / apply / both, a second relay started and stopped, poison messages,"
            echo "a restart of the MongoDB sink's server, a restart of the PostgreSQL server holding the"
            echo "primary and the PostgreSQL sink, kill -9 of the leader of a partition in use or of the"
            echo "active KRaft controller; writers contending on 20 customers and 150 orders at 200"
            echo "changes/s; every connection through Toxiproxy: partitions, slow links, resets, the relay"
            echo "leader cut off from PostgreSQL, a failover of the primary to its synchronous standby."
        fi
        echo
        cat "$LINES_DIR/$schedule"
    done
    if [[ -s $LINES_DIR/faults ]]; then
        echo
        echo "## Network faults and failover (outbox schedule): recovery per fault kind"
        echo
        fault_table "$LINES_DIR/faults"
    fi
} >"$REPORT"
rm -rf "$LINES_DIR"
if ((${#FAILED[@]})); then
    die "schedules ${FAILED[*]} failed (logs in $LOG_DIR/chaos-<schedule>-<seed>.txt); report in $REPORT"
fi
log "all schedules converged; report in $REPORT"
