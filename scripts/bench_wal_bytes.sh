#!/usr/bin/env bash
# WAL written on the primary per outbox event, `capture = "poll"` against `capture = "wal"`:
# BENCH_EVENTS single-row transactions (pgbench, one writer) while a relay of the given mode
# publishes them to Kafka; the window runs from a CHECKPOINT before the first insert until
# every event is published (polling: every row marked; WAL: the slot confirmed past the last
# insert), so polling's marking UPDATEs are in it and the later purge DELETE (both modes) is
# not. WAL is cluster-wide: run it with nothing else writing to the server. Uses a throw-away
# database on $DUALSYNC_TEST_PG_URL's server, the debug build, and the local Kafka.
# Usage: scripts/bench_wal_bytes.sh poll|wal
set -euo pipefail
export PGOPTIONS="-c client_min_messages=warning"
: "${DUALSYNC_TEST_PG_URL:?source .local/env first}"
MODE=${1:?poll or wal}
N=${BENCH_EVENTS:-10000}
PG_BIN=${DUALSYNC_TEST_PG_BIN:-/usr/lib/postgresql/15/bin}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DUALSYNC=${BENCH_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/debug/dualsync}
BASE=${DUALSYNC_TEST_PG_URL%/*}
DB=bench_wal_bytes_${MODE}_$$
NAME=walbytes_$$
WORK=$(mktemp -d)
psql=(psql -q -At)
"${psql[@]}" "$BASE/postgres" -c "CREATE DATABASE $DB"
cleanup() {
    [[ -n "${RELAY:-}" ]] && kill "$RELAY" 2>/dev/null && wait "$RELAY" 2>/dev/null
    "${psql[@]}" "$BASE/postgres" -c "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '$NAME'" >/dev/null
    "${psql[@]}" "$BASE/postgres" -c "DROP DATABASE IF EXISTS $DB" >/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT
cat >"$WORK/pipeline.toml" <<TOML
[pipeline]
name = "$NAME"
[source]
kind = "postgres_outbox"
url = "$BASE/$DB"
capture = "$MODE"
slot_name = "$NAME"
publication = "$NAME"
[kafka]
brokers = "${DUALSYNC_TEST_KAFKA_BROKERS:-127.0.0.1:19092}"
topic_template = "$NAME.{aggregatetype}"
partitions = 3
replication_factor = 1
[encoding]
schemas_dir = "$ROOT/schemas"
[http]
host = "127.0.0.1"
relay_port = 0
apply_port = 0
TOML
"$DUALSYNC" outbox migrate --config "$WORK/pipeline.toml" >/dev/null
cat >"$WORK/insert.sql" <<'SQL'
INSERT INTO dualsync.outbox (aggregatetype, aggregateid, type, payload)
VALUES ('customers', 'c' || (random() * 1000000)::int, 'Updated',
        jsonb_build_object('id', 'c1', 'name', 'A customer', 'email', 'a@example.com', 'order_count', 3));
SQL
"$DUALSYNC" relay --config "$WORK/pipeline.toml" >"$WORK/relay.log" 2>&1 &
RELAY=$!
for _ in $(seq 1 60); do
    grep -q "active leader" "$WORK/relay.log" && break
    sleep 0.5
done
"${psql[@]}" "$BASE/$DB" -c CHECKPOINT
start=$("${psql[@]}" "$BASE/$DB" -c "SELECT pg_current_wal_lsn()")
"$PG_BIN/pgbench" -n -c 1 -t "$N" -f "$WORK/insert.sql" "$BASE/$DB" >"$WORK/pgbench.log"
last=$("${psql[@]}" "$BASE/$DB" -c "SELECT pg_current_wal_insert_lsn()")
if [[ $MODE == poll ]]; then
    done_sql="SELECT count(*) = 0 FROM dualsync.outbox WHERE published_at IS NULL"
else
    done_sql="SELECT confirmed_flush_lsn >= '$last' FROM pg_replication_slots WHERE slot_name = '$NAME'"
fi
for _ in $(seq 1 240); do
    [[ $("${psql[@]}" "$BASE/$DB" -c "$done_sql") == t ]] && break
    sleep 0.5
done
[[ $("${psql[@]}" "$BASE/$DB" -c "$done_sql") == t ]] || { echo "not all published; relay log: $WORK/relay.log" >&2; exit 1; }
end=$("${psql[@]}" "$BASE/$DB" -c "SELECT pg_current_wal_lsn()")
bytes=$("${psql[@]}" "$BASE/$DB" -c "SELECT pg_wal_lsn_diff('$end', '$start')")
echo "capture = $MODE: $N events, $bytes bytes of WAL, $((bytes / N)) bytes per event (load average $(cut -d' ' -f1-3 /proc/loadavg))"
