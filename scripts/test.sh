#!/usr/bin/env bash
# `make test`: installs and starts what the tests need (PostgreSQL, Tansu, SecantusDB), then
# runs every test (unit, property and integration) against those real servers.
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$REPO_ROOT"

bash scripts/up.sh all
# shellcheck source=/dev/null
. "$ENV_FILE"
export DUALSYNC_TEST_PG_URL DUALSYNC_TEST_KAFKA_BROKERS DUALSYNC_TEST_MONGO_URL \
    DUALSYNC_TEST_PG_BIN DUALSYNC_TEST_MONGOD DUALSYNC_TEST_TANSU

# The independent implementations the interoperability tests compare with (installed once).
bash scripts/interop.sh python >/dev/null
bash scripts/interop.sh java >/dev/null
log "building tests"
cargo test --all-targets --no-run --locked
log "running tests against $DUALSYNC_TEST_PG_URL, $DUALSYNC_TEST_KAFKA_BROKERS, $DUALSYNC_TEST_MONGO_URL"
if [[ $# -gt 0 ]]; then
    cargo test --all-targets --locked -- "$@"
    exit 0
fi
# Everything but the fault-injection schedule, then the schedule alone: it kills and restarts
# processes and servers, and Tansu 0.6's group coordinator stalls more often when the machine
# is also busy with thirty other tests. The short CI schedule uses a fixed seed so a red run
# replays exactly; seed 5 draws one fault of most kinds (two primary restarts, a broker crash,
# poison, a relay kill -9, a MongoDB sink restart). Override with DUALSYNC_CHAOS_SEED.
cargo test --all-targets --locked -- --skip chaos::
log "running the short fault-injection schedule"
DUALSYNC_CHAOS_SEED="${DUALSYNC_CHAOS_SEED:-5}" cargo test --test it --locked -- chaos::
