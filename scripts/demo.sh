#!/usr/bin/env bash
# `make demo`: installs and starts the local servers, runs the relay and two apply processes
# (PostgreSQL and MongoDB sinks) on sample traffic, and prints what arrived where.
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$REPO_ROOT"

CHANGES="${DEMO_CHANGES:-5000}"
bash scripts/up.sh all
log "building dualsync"
cargo build --locked --quiet
BIN="$REPO_ROOT/target/debug/dualsync"
CONFIG=connectors/demo.toml

# Each run gets its own topics, consumer groups and databases, so runs never mix.
RUN="$(date +%s)"
PSQL=(psql -X -q -v ON_ERROR_STOP=1 -h "$BIND_HOST" -p "$PG_PORT" -U postgres -d postgres)
"${PSQL[@]}" -c "DROP DATABASE IF EXISTS dualsync_demo WITH (FORCE)" \
    -c "DROP DATABASE IF EXISTS dualsync_demo_replica WITH (FORCE)" \
    -c "CREATE DATABASE dualsync_demo" -c "CREATE DATABASE dualsync_demo_replica"
export_pipeline_env "shop-$RUN" dualsync_demo dualsync_demo_replica "demo_replica_$RUN"

"$BIN" demo setup --config "$CONFIG"

PIDS=()
stop_all() {
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    local status=0
    for pid in "${PIDS[@]}"; do wait "$pid" || status=$?; done
    return "$status"
}
trap 'stop_all || true' EXIT

mkdir -p "$LOG_DIR"
"$BIN" relay --config "$CONFIG" >"$LOG_DIR/demo-relay.log" 2>&1 & PIDS+=($!)
"$BIN" apply --config "$CONFIG" --sink postgres >"$LOG_DIR/demo-apply-postgres.log" 2>&1 & PIDS+=($!)
"$BIN" apply --config "$CONFIG" --sink mongo --http-port 9466 >"$LOG_DIR/demo-apply-mongo.log" 2>&1 & PIDS+=($!)
log "relay and apply running (logs in $LOG_DIR/demo-*.log); generating $CHANGES order changes"

"$BIN" demo load --config "$CONFIG" --changes "$CHANGES"
if ! "$BIN" demo report --config "$CONFIG" --wait 180; then
    log_tail "$LOG_DIR/demo-relay.log" 20
    log_tail "$LOG_DIR/demo-apply-postgres.log" 20
    log_tail "$LOG_DIR/demo-apply-mongo.log" 20
    exit 1
fi
trap - EXIT
log "stopping relay and apply (SIGTERM: they drain and commit)"
stop_all
log "demo finished; servers keep running (make down stops them)"
