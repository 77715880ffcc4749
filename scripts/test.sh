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
    DUALSYNC_TEST_PG_BIN DUALSYNC_TEST_MONGOD

log "building tests"
cargo test --all-targets --no-run --locked
log "running tests against $DUALSYNC_TEST_PG_URL, $DUALSYNC_TEST_KAFKA_BROKERS, $DUALSYNC_TEST_MONGO_URL"
cargo test --all-targets --locked -- "$@"
