#!/usr/bin/env bash
# `make chaos`: runs the fault-injection test (tests/it/chaos.rs) for CHAOS_RUNS seeded
# schedules of CHAOS_FAULTS faults each (seeds CHAOS_FIRST_SEED, +1, ...), and writes one line
# per schedule to docs/chaos-report.md. A failing schedule is recorded with its log and the run
# goes on; the exit status says whether any failed. DUALSYNC_CHAOS_SEED=<seed> replays one.
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$REPO_ROOT"

RUNS="${CHAOS_RUNS:-20}"
FAULTS="${CHAOS_FAULTS:-12}"
FIRST="${CHAOS_FIRST_SEED:-1}"
REPORT="$REPO_ROOT/docs/chaos-report.md"
FAILED=()
mkdir -p "$REPO_ROOT/docs" "$LOG_DIR"

bash scripts/up.sh all
# shellcheck source=/dev/null
. "$ENV_FILE"
export DUALSYNC_TEST_PG_URL DUALSYNC_TEST_KAFKA_BROKERS DUALSYNC_TEST_MONGO_URL \
    DUALSYNC_TEST_PG_BIN DUALSYNC_TEST_MONGOD DUALSYNC_TEST_KAFKA_LIBS
log "building the test binary"
cargo test --locked --test it --no-run --quiet

{
    echo "# Chaos report"
    echo
    echo "\`make chaos\` on $(date -u +%Y-%m-%d), $(nproc) cores: $RUNS schedules of $FAULTS faults"
    echo "(kill -9 of relay / apply / both, a second relay started and stopped, poison messages,"
    echo "a restart of the MongoDB sink's server, a restart of the PostgreSQL server holding the"
    echo "primary and the PostgreSQL sink, kill -9 of the leader of a partition in use or of the"
    echo "active KRaft controller of a private three-broker Apache Kafka 4.4 cluster, replication"
    echo "factor 3, min.insync.replicas 2), writers contending on 20 customers and 150 orders at"
    echo "200 changes/s."
    echo "Each line is the test's own summary."
    echo
} >"$REPORT"
for ((i = 0; i < RUNS; i++)); do
    seed=$((FIRST + i))
    out="$LOG_DIR/chaos-$seed.txt"
    log "schedule $((i + 1))/$RUNS (seed $seed)"
    if ! DUALSYNC_CHAOS_SEED="$seed" DUALSYNC_CHAOS_FAULTS="$FAULTS" \
        cargo test --locked --test it --quiet chaos -- --nocapture >"$out" 2>&1; then
        echo "- seed $seed: FAILED: $(grep -h -m1 "^seed $seed: " "$out" || echo "see $out")" >>"$REPORT"
        log_tail "$out" 40
        log "chaos schedule with seed $seed failed; replay: DUALSYNC_CHAOS_SEED=$seed DUALSYNC_CHAOS_FAULTS=$FAULTS cargo test --test it chaos -- --nocapture"
        FAILED+=("$seed")
        continue
    fi
    grep -h "^chaos seed $seed:" "$out" | sed 's/^/- /' >>"$REPORT"
done
if ((${#FAILED[@]})); then
    die "schedules with seeds ${FAILED[*]} failed (logs in $LOG_DIR/chaos-<seed>.txt); report in docs/chaos-report.md"
fi
log "all $RUNS schedules converged; report in docs/chaos-report.md"
