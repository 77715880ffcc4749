#!/usr/bin/env bash
# What the writers' per-aggregate lock costs them: pgbench commits one outbox row per
# transaction from BENCH_CLIENTS concurrent writers, all on ONE aggregate (the lock's worst
# case) and then on 10,000 aggregates, once with the polling trigger (connectors/outbox.sql:
# advisory lock, then seq) and once with the WAL capture's (connectors/outbox_wal.sql: seq
# only). The polling case has a relay registered that is busy, as under load, so writers skip
# the NOTIFY and only the lock differs. Each writer's transaction holds BENCH_WORK_MS of work
# after its insert (0 = insert and commit only). Prints pgbench's tps and latency per case and
# the load average. Uses a throw-away database on $DUALSYNC_TEST_PG_URL's server (the trigger
# alone is measured: no slot, no relay).
set -euo pipefail
export PGOPTIONS="-c client_min_messages=warning"
: "${DUALSYNC_TEST_PG_URL:?source .local/env first}"
BIN=${DUALSYNC_TEST_PG_BIN:-/usr/lib/postgresql/15/bin}
CLIENTS=${BENCH_CLIENTS:-8}
SECS=${BENCH_SECS:-15}
WORK_MS=${BENCH_WORK_MS:-0}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DB=bench_writer_lock_$$
BASE=${DUALSYNC_TEST_PG_URL%/*}
URL="$BASE/$DB"
"$BIN/psql" -qAt "$DUALSYNC_TEST_PG_URL" -c "CREATE DATABASE $DB"
trap '"$BIN/psql" -qAt "$DUALSYNC_TEST_PG_URL" -c "DROP DATABASE IF EXISTS $DB" >/dev/null' EXIT
"$BIN/psql" -qAt "$URL" -f "$ROOT/connectors/outbox.sql" >/dev/null
"$BIN/psql" -qAt "$URL" -c "INSERT INTO dualsync.outbox_relays VALUES (1, 'bench')"
SCRIPT=$(mktemp)
trap '"$BIN/psql" -qAt "$DUALSYNC_TEST_PG_URL" -c "DROP DATABASE IF EXISTS $DB" >/dev/null; rm -f "$SCRIPT"' EXIT
for mode in poll wal; do
    if [ "$mode" = wal ]; then
        "$BIN/psql" -qAt "$URL" -f "$ROOT/connectors/outbox_wal.sql" >/dev/null
    fi
    for aggregates in 1 10000; do
        {
            echo "\\set a random(1, $aggregates)"
            echo "BEGIN;"
            echo "INSERT INTO dualsync.outbox (aggregatetype, aggregateid, type, payload) VALUES ('orders', 'o' || :a, 'updated', '{\"n\": 1}');"
            if [ "$WORK_MS" != 0 ]; then echo "SELECT pg_sleep($WORK_MS / 1000.0);"; fi
            echo "COMMIT;"
        } >"$SCRIPT"
        out=$("$BIN/pgbench" -n -c "$CLIENTS" -j 2 -T "$SECS" -f "$SCRIPT" "$URL" 2>&1)
        tps=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' <<<"$out")
        lat=$(sed -n 's/^latency average = \([0-9.]*\) ms/\1/p' <<<"$out")
        printf '%-4s aggregates=%-5s clients=%s work=%sms  tps=%-8s latency avg=%s ms  load=%s\n' \
            "$mode" "$aggregates" "$CLIENTS" "$WORK_MS" "$tps" "$lat" "$(cut -d' ' -f1-3 /proc/loadavg)"
    done
done
