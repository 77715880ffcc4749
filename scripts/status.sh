#!/usr/bin/env bash
# One line per local server: running/stopped, pid, address.
#
#   scripts/status.sh [postgres|kafka|mongo|registry|ferretdb|all]...   (default: all)
#
# Exit status: 0 when every listed server runs, 3 otherwise.
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# shellcheck source=scripts/prometheus.sh
. "$(dirname "${BASH_SOURCE[0]}")/prometheus.sh"

main() {
    local servers server pid state rc=0 port note
    servers="$(servers_from_args "$@")"
    for server in $servers; do
        if [[ "$server" == prometheus ]]; then
            status_prometheus || rc=3
            continue
        fi
        if [[ "$server" == kafka ]]; then
            KAFKA_NODES="$(kafka_started_nodes)"
            local n
            for ((n = 1; n <= KAFKA_NODES; n++)); do
                port=$((KAFKA_PORT + n - 1))
                note=""
                if pid="$(server_pid "kafka-$n")"; then
                    state=running
                    port_open "$port" || note=" (not accepting connections yet)"
                else
                    state=stopped
                    pid=-
                    rc=3
                fi
                printf '%-9s %-8s pid %-8s %s%s\n' "kafka-$n" "$state" "$pid" "$BIND_HOST:$port" "$note"
            done
            continue
        fi
        port="$(server_port "$server")"
        note=""
        if pid="$(server_pid "$server")"; then
            state=running
            port_open "$port" || note=" (not accepting connections yet)"
        else
            state=stopped
            pid=-
            rc=3
        fi
        printf '%-9s %-8s pid %-8s %s%s\n' "$server" "$state" "$pid" "$(server_address "$server")" "$note"
    done
    return "$rc"
}

main "$@"
