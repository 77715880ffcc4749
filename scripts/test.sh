#!/usr/bin/env bash
# `make test`: installs and starts what the tests need (PostgreSQL, Apache Kafka, SecantusDB, the
# Apicurio schema registry, FerretDB; Prometheus and promtool from Debian) and the interop tests'
# Python venv (scripts/interop.sh), Toxiproxy, Helm and Jaeger (scripts/go_tools.sh),
# docker-compose (Debian), runs the alert rules' promtool unit tests, then every test (unit,
# property and integration) against those real servers, the throughput guard
# (scripts/bench_guard.sh), and the MongoDB sink's tests a second time against FerretDB.
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$REPO_ROOT"

# FerretDB (built from its Go module source, scripts/ferretdb.sh): the second MongoDB-wire server.
bash scripts/up.sh all ferretdb
# Prometheus and promtool (Debian package): the alert rules' unit tests and the live dashboard
# test (tests/it/dashboard.rs, which starts its own Prometheus) need them.
# shellcheck source=scripts/prometheus.sh
. scripts/prometheus.sh
install_prometheus
log "alert rules: promtool check rules and promtool test rules"
test_prometheus_rules
# Toxiproxy (Go module proxy) for the fault tests that cut, slow and reset network links.
install_go_tool toxiproxy
# Helm (Go module proxy; compiled once, 4 to 17 min on a fresh machine: docs/contributors.md)
# for the chart's tests, and Debian's docker-compose (1.29, `config` needs no Docker engine)
# for the compose file's: tests/it/helm.rs, tests/it/compose.rs.
install_go_tool helm
# Jaeger (Go module proxy; one large build, the time it takes: docs/contributors.md) for the
# traces test against a real collector and query API: tests/it/traces.rs.
install_go_tool jaeger
install_docker_compose
write_env_file
# shellcheck source=/dev/null
. "$ENV_FILE"

# The independent implementations the interoperability tests compare with (installed once).
bash scripts/interop.sh python >/dev/null
bash scripts/interop.sh java >/dev/null
log "building tests"
cargo test --all-targets --no-run --locked
bash scripts/interop.sh >/dev/null
log "running tests against $DUALSYNC_TEST_PG_URL, $DUALSYNC_TEST_KAFKA_BROKERS, $DUALSYNC_TEST_MONGO_URL, $DUALSYNC_TEST_REGISTRY_URL"
if [[ $# -gt 0 ]]; then
    cargo test --all-targets --locked -- "$@"
    exit 0
fi
# Everything but the fault-injection schedules, then the two schedules (PostgreSQL outbox,
# MongoDB primary) one after the other: each runs its own three-broker Kafka cluster and
# databases and kills processes and brokers, which on two cores is best not shared. The short CI schedule uses a fixed
# seed so a red run replays exactly (see DUALSYNC_CHAOS_SEED's default below and the chaos
# report in docs/ for what it draws). Override with DUALSYNC_CHAOS_SEED. The outbox schedule
# starts with a network partition, a slow link and the relay leader cut off from PostgreSQL
# (DUALSYNC_CHAOS_FIRST), then draws the rest from the seed.
# One test at a time: each integration test runs real processes against shared servers, and
# on two cores two of them side by side made timing-sensitive ones flaky (seen 2026-12-03).
cargo test --all-targets --locked -- --skip chaos:: --test-threads=1
# The throughput guard (scripts/bench_guard.sh, about 40 s): the combined drain of relay and
# apply against the relay alone, measured side by side with the debug build just tested, so
# the machine's speed cancels out; fails on a bad regression (docs/benchmarks-method.md).
log "running the throughput guard"
bash scripts/bench_guard.sh
log "running the short fault-injection schedules"
DUALSYNC_CHAOS_SEED="${DUALSYNC_CHAOS_SEED:-5}" \
    DUALSYNC_CHAOS_FIRST="${DUALSYNC_CHAOS_FIRST:-partition,slow link,leader cut-off}" \
    cargo test --test it --locked -- chaos:: --test-threads=1
# The MongoDB sink's tests once more, against FerretDB (a second, independent MongoDB-wire
# server): DUALSYNC_TEST_MONGO_URL is the sink's URL in these tests, and none of them reads a
# change stream (FerretDB has none; the MongoDB source's tests stay on SecantusDB). The tests
# left out and why: docs/delivery-contract-mongodb.md, "Which server each feature is tested on".
FERRETDB_SINK_TESTS=(
    mongo_servers::
    sinks::mongo_sink_version_guard
    sinks::mongo_sink_never_resurrects_a_record_whose_tombstone_was_purged
    mongo_delivery::concurrent_first_inserts_keep_the_newest_version
    mongo_delivery::a_write_concern_error_is_retried_not_fatal
    end_to_end::outbox_to_both_sinks_and_replay_changes_nothing
    subscriptions::apply_consumes_exactly_its_listed_topics_or_its_regex
)
log "running the MongoDB sink's tests against FerretDB ($DUALSYNC_TEST_FERRETDB_URL)"
DUALSYNC_TEST_MONGO_URL="$DUALSYNC_TEST_FERRETDB_URL" \
    cargo test --test it --locked -- "${FERRETDB_SINK_TESTS[@]}" --test-threads=1
