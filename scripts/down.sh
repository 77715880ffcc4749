#!/usr/bin/env bash
# Stop the local servers started by scripts/up.sh. Idempotent.
#
#   scripts/down.sh [postgres|kafka|mongo|registry|ferretdb|all]...   (default: all)
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# shellcheck source=scripts/prometheus.sh
. "$(dirname "${BASH_SOURCE[0]}")/prometheus.sh"

down_postgres() {
    local pid bin
    pg_resolve_dirs
    if ! pid="$(server_pid postgres)"; then
        log "postgres: not running"
        rm -f "$(pid_file postgres)"
        return 0
    fi
    log "postgres: stopping (pid $pid, pg_ctl stop -m fast)"
    if bin="$(pg_bin_dir)" && [[ -d "$PG_DATA" ]]; then
        as_pg_user "$bin/pg_ctl" -D "$PG_DATA" -m fast -w -t 30 stop >/dev/null 2>&1 || true
    fi
    if ! wait_for_exit "$pid" 30; then
        warn "postgres: pg_ctl stop did not finish; signalling pid $pid"
        stop_pid postgres "$pid" 10
    fi
    rm -f "$(pid_file postgres)"
    log "postgres: stopped"
}

down_simple() {
    local server="$1" pid
    if ! pid="$(server_pid "$server")"; then
        log "$server: not running"
        rm -f "$(pid_file "$server")"
        return 0
    fi
    log "$server: stopping (pid $pid)"
    stop_pid "$server" "$pid" 20
    rm -f "$(pid_file "$server")"
    log "$server: stopped"
}

# Every node is asked to stop before any is waited for: a node stopped last, alone, would wait
# for a controller quorum that is already gone.
down_kafka() {
    local n pid pids=()
    for ((n = 1; n <= $(kafka_started_nodes); n++)); do
        if pid="$(server_pid "kafka-$n")"; then
            log "kafka-$n: stopping (pid $pid)"
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$n:$pid")
        else
            log "kafka-$n: not running"
        fi
    done
    local entry
    for entry in "${pids[@]}"; do
        n="${entry%%:*}" pid="${entry#*:}"
        stop_pid "kafka-$n" "$pid" 30
        rm -f "$(pid_file "kafka-$n")"
        log "kafka-$n: stopped"
    done
}
down_mongo() { down_simple mongo; }

main() {
    local servers server
    servers="$(servers_from_args "$@")"
    for server in $servers; do
        "down_$server"
    done
}

main "$@"
