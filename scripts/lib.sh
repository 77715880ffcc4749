# shellcheck shell=bash disable=SC2034 # variables are used by the sourcing scripts
# Shared helpers for the local-infrastructure scripts (install/up/down/status).
#
# Source it:   . "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# It is safe under `set -euo pipefail` and defines no side effects beyond
# variables and functions (directories are created by ensure_state_dirs).
#
# Environment knobs (all optional):
#   DUALSYNC_STATE_DIR      data/logs/pids/env   (default: $REPO_ROOT/.local)
#   DUALSYNC_TOOLS_DIR      downloaded/built tools, shared across clones
#                           (default: $HOME/.dualsync/tools)
#   DUALSYNC_PG_PORT        PostgreSQL port      (default: 55432)
#   DUALSYNC_KAFKA_PORT     Kafka client port of node 1 (default: 19092; node N: +N-1)
#   DUALSYNC_KAFKA_CONTROLLER_PORT  KRaft controller port of node 1 (default: 19192)
#   DUALSYNC_KAFKA_SASL_PORT  SASL_SSL listener of node 1 (default: 19096; node N: +N-1)
#   KAFKA_NODES / DUALSYNC_KAFKA_NODES  brokers in the local cluster: 1 (default) or 3
#   DUALSYNC_KAFKA_HEAP     JVM heap of each broker (default: 1g for one node, 768m each for three)
#   DUALSYNC_MONGO_PORT     Mongo (SecantusDB)   (default: 27117)
#   DUALSYNC_REGISTRY_PORT  schema registry (Apicurio) (default: 18081; scripts/registry.sh)
#   DUALSYNC_FERRETDB_PORT  FerretDB, the second MongoDB-wire server (default: 27118; scripts/ferretdb.sh)
#   DUALSYNC_START_TIMEOUT  seconds to wait for a server to answer (default: 60)

if [[ -n "${DUALSYNC_LIB_LOADED:-}" ]]; then
    return 0
fi
DUALSYNC_LIB_LOADED=1

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
STATE_DIR="${DUALSYNC_STATE_DIR:-$REPO_ROOT/.local}"
TOOLS_DIR="${DUALSYNC_TOOLS_DIR:-${HOME:-/root}/.dualsync/tools}"
# Relative overrides are taken relative to the current directory.
[[ "$STATE_DIR" == /* ]] || STATE_DIR="$PWD/$STATE_DIR"
[[ "$TOOLS_DIR" == /* ]] || TOOLS_DIR="$PWD/$TOOLS_DIR"
LOG_DIR="$STATE_DIR/logs"
PID_DIR="$STATE_DIR/pids"
ENV_FILE="$STATE_DIR/env"

BIND_HOST=127.0.0.1
PG_PORT="${DUALSYNC_PG_PORT:-55432}"
KAFKA_PORT="${DUALSYNC_KAFKA_PORT:-19092}"
MONGO_PORT="${DUALSYNC_MONGO_PORT:-27117}"
KAFKA_CONTROLLER_PORT="${DUALSYNC_KAFKA_CONTROLLER_PORT:-19192}"
KAFKA_SASL_PORT="${DUALSYNC_KAFKA_SASL_PORT:-19096}"
KAFKA_NODES="${KAFKA_NODES:-${DUALSYNC_KAFKA_NODES:-1}}"
START_TIMEOUT="${DUALSYNC_START_TIMEOUT:-60}"

# Apache Kafka's jars from Maven Central (scripts/kafka/pom.xml names them).
KAFKA_VERSION=4.4.0
KAFKA_HOME="$TOOLS_DIR/kafka-$KAFKA_VERSION"
KAFKA_LIBS="$KAFKA_HOME/libs"
# SCRAM user of the SASL_SSL listener (its password: $STATE_DIR/kafka/sasl-password).
KAFKA_SASL_USER=dualsync

SECANTUS_VERSION=0.7.0b3
SECANTUS_HOME="$TOOLS_DIR/secantusdb-$SECANTUS_VERSION"
SECANTUS_BIN="$SECANTUS_HOME/bin/secantusd-py"

ALL_SERVERS=(postgres kafka mongo registry)

# Rust tools installed by rustup live here; cargo may not be on PATH in CI.
if [[ -d "${HOME:-/root}/.cargo/bin" && ":$PATH:" != *":${HOME:-/root}/.cargo/bin:"* ]]; then
    PATH="${HOME:-/root}/.cargo/bin:$PATH"
    export PATH
fi

# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------
log() { printf '[dualsync %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
warn() { printf '[dualsync %s] WARNING: %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() {
    printf '[dualsync %s] ERROR: %s\n' "$(date +%H:%M:%S)" "$*" >&2
    exit 1
}

# Run a command as root: directly when we are root, else through sudo.
run_as_root() {
    if [[ "$(id -u)" -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root (or sudo) to run: $*"
    fi
}

# Print the last lines of a log file to stderr (used on failures).
log_tail() {
    local file="$1" lines="${2:-40}"
    if [[ -r "$file" ]]; then
        printf -- '----- last %s lines of %s -----\n' "$lines" "$file" >&2
        tail -n "$lines" "$file" >&2 || true
        printf -- '----- end of %s -----\n' "$file" >&2
    else
        printf -- '(log file %s does not exist or is not readable)\n' "$file" >&2
    fi
}

# --------------------------------------------------------------------------
# Argument handling: [postgres|kafka|mongo|registry|all] ... -> list of servers
# --------------------------------------------------------------------------
# Usage: mapfile -t servers < <(parse_servers "$@")
parse_servers() {
    if [[ $# -eq 0 ]]; then
        printf '%s\n' "${ALL_SERVERS[@]}"
        return 0
    fi
    local arg
    for arg in "$@"; do
        case "$arg" in
            all) printf '%s\n' "${ALL_SERVERS[@]}" ;;
            postgres | pg) echo postgres ;;
            kafka) echo kafka ;;
            mongo | mongodb | secantus) echo mongo ;;
            registry | apicurio) echo registry ;;
            # Optional, never part of `all`: scripts/test.sh starts it (scripts/ferretdb.sh).
            ferretdb | ferret) echo ferretdb ;;
            # Optional, never part of `all`: see scripts/prometheus.sh.
            prometheus) echo prometheus ;;
            *)
                echo "unknown server '$arg' (expected postgres|kafka|mongo|registry|ferretdb|prometheus|all)" >&2
                return 2
                ;;
        esac
    done | awk '!seen[$0]++'
}

# Validate the argument list, die with a usage message on error.
servers_from_args() {
    local out
    if ! out="$(parse_servers "$@")"; then
        die "usage: $(basename "$0") [postgres|kafka|mongo|registry|ferretdb|prometheus|all]..."
    fi
    printf '%s\n' "$out"
}

# --------------------------------------------------------------------------
# State directories / pid files
# --------------------------------------------------------------------------
ensure_state_dirs() {
    mkdir -p "$STATE_DIR" "$LOG_DIR" "$PID_DIR"
}

pid_file() { echo "$PID_DIR/$1.pid"; }
log_file() { echo "$LOG_DIR/$1.log"; }

server_port() {
    case "$1" in
        postgres) echo "$PG_PORT" ;;
        kafka) echo "$KAFKA_PORT" ;;
        mongo) echo "$MONGO_PORT" ;;
        registry) echo "$REGISTRY_PORT" ;;
        ferretdb) echo "$FERRETDB_PORT" ;;
        *) die "unknown server $1" ;;
    esac
}

# A substring that must appear in /proc/PID/cmdline for the process to be
# considered ours (guards against PID reuse after a reboot or crash).
server_cmd_pattern() {
    case "$1" in
        postgres) echo postgres ;;
        kafka | kafka-*) echo kafka.Kafka ;;
        mongo) echo secantusd ;;
        registry) echo apicurio-registry-runner ;;
        ferretdb) echo ferretdb ;;
    esac
}

# pid_alive PID PATTERN -> 0 when PID is a live process whose command line
# contains PATTERN.
pid_alive() {
    local pid="$1" pattern="${2:-}"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    if [[ -n "$pattern" && -r "/proc/$pid/cmdline" ]]; then
        tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "$pattern" || return 1
    fi
    # A zombie is not alive.
    if [[ -r "/proc/$pid/stat" ]]; then
        local state
        state="$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null || true)"
        [[ "$state" != Z ]] || return 1
    fi
    return 0
}

# read_pid SERVER -> prints the pid from the pid file (or nothing).
read_pid() {
    local f
    f="$(pid_file "$1")"
    [[ -r "$f" ]] || return 0
    head -n1 "$f" 2>/dev/null | tr -dc '0-9' || true
}

# server_pid SERVER -> prints the pid when the server is running, else
# returns 1. For postgres, a running postmaster found via postmaster.pid is
# adopted even if our pid file is missing.
server_pid() {
    local server="$1" pid
    pid="$(read_pid "$server")"
    if [[ -n "$pid" ]] && pid_alive "$pid" "$(server_cmd_pattern "$server")"; then
        echo "$pid"
        return 0
    fi
    if [[ "$server" == postgres ]]; then
        pg_resolve_dirs
        if [[ -r "$PG_DATA/postmaster.pid" ]]; then
            pid="$(head -n1 "$PG_DATA/postmaster.pid" | tr -dc '0-9')"
            if [[ -n "$pid" ]] && pid_alive "$pid" postgres; then
                if [[ -d "$PID_DIR" ]]; then echo "$pid" >"$(pid_file postgres)"; fi
                echo "$pid"
                return 0
            fi
        fi
    fi
    return 1
}

# --------------------------------------------------------------------------
# Ports
# --------------------------------------------------------------------------
# port_open PORT [HOST] -> 0 when a TCP connect succeeds.
port_open() {
    local port="$1" host="${2:-$BIND_HOST}"
    timeout 2 bash -c "exec 3<>/dev/tcp/$host/$port" 2>/dev/null
}

# wait_for_port NAME PORT LOGFILE [PID] [DEADLINE_SECONDS]
# Polls until the port accepts connections. Fails early (with the log tail)
# when PID dies, and at the deadline with a message naming server and log.
wait_for_port() {
    local name="$1" port="$2" logf="$3" pid="${4:-}" timeout="${5:-$START_TIMEOUT}"
    local deadline=$((SECONDS + timeout))
    while ((SECONDS < deadline)); do
        if port_open "$port"; then
            return 0
        fi
        if [[ -n "$pid" ]] && ! kill -0 "$pid" 2>/dev/null; then
            log_tail "$logf"
            die "$name (pid $pid) exited before listening on $BIND_HOST:$port; see $logf"
        fi
        sleep 0.2
    done
    log_tail "$logf"
    die "$name did not accept connections on $BIND_HOST:$port within ${timeout}s; see $logf"
}

# kafka_ping HOST PORT -> 0 when the broker answers a Kafka ApiVersions (v0)
# request with error_code 0: a real protocol round trip, stdlib python only.
kafka_ping() {
    local host="$1" port="$2"
    command -v python3 >/dev/null 2>&1 || { port_open "$port" "$host"; return; }
    python3 - "$host" "$port" <<'PY'
import socket, struct, sys
host, port = sys.argv[1], int(sys.argv[2])
client = b"dualsync-up"
# request header v1: api_key=18 (ApiVersions), api_version=0, correlation_id, client_id
body = struct.pack(">hhih", 18, 0, 4242, len(client)) + client
try:
    with socket.create_connection((host, port), timeout=3) as s:
        s.settimeout(3)
        s.sendall(struct.pack(">i", len(body)) + body)
        def recv(n):
            buf = b""
            while len(buf) < n:
                chunk = s.recv(n - len(buf))
                if not chunk:
                    raise EOFError("connection closed")
                buf += chunk
            return buf
        size = struct.unpack(">i", recv(4))[0]
        resp = recv(size)
        corr, err = struct.unpack(">ih", resp[:6])
        sys.exit(0 if corr == 4242 and err == 0 else 1)
except Exception:
    sys.exit(1)
PY
}

# wait_until DESCRIPTION DEADLINE_SECONDS COMMAND... -> polls COMMAND until
# it succeeds; returns 1 (no exit) at the deadline.
wait_until() {
    local desc="$1" timeout="$2"
    shift 2
    local deadline=$((SECONDS + timeout))
    while ((SECONDS < deadline)); do
        if "$@" >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.2
    done
    warn "timed out after ${timeout}s waiting for: $desc"
    return 1
}

# wait_for_exit PID DEADLINE_SECONDS -> 0 when the process is gone.
wait_for_exit() {
    local pid="$1" timeout="$2"
    local deadline=$((SECONDS + timeout))
    while ((SECONDS < deadline)); do
        pid_alive "$pid" || return 0
        sleep 0.2
    done
    ! pid_alive "$pid"
}

# Fail clearly when something else already listens on our port.
ensure_port_free() {
    local name="$1" port="$2"
    if port_open "$port"; then
        local who=""
        if command -v ss >/dev/null 2>&1; then
            who="$(ss -ltnpH "sport = :$port" 2>/dev/null | head -n1 || true)"
        fi
        die "cannot start $name: $BIND_HOST:$port is already in use by another process${who:+ ($who)}; stop it or set DUALSYNC_$(echo "$name" | tr '[:lower:]' '[:upper:]' | sed 's/POSTGRES/PG/')_PORT"
    fi
}

# Start COMMAND in its own session, detached from the terminal, with output
# appended to LOGFILE; writes the pid to PIDFILE.
# Usage: spawn_detached LOGFILE PIDFILE WORKDIR COMMAND [ARGS...]
spawn_detached() {
    local logf="$1" pidf="$2" workdir="$3"
    shift 3
    mkdir -p "$(dirname "$logf")" "$(dirname "$pidf")"
    printf '\n===== %s starting: %s =====\n' "$(date '+%Y-%m-%d %H:%M:%S')" "$*" >>"$logf"
    # In a non-interactive shell a background job is not a process-group
    # leader, so setsid execs in place (no fork) and $! is the server's pid.
    (
        cd "$workdir" || exit 1
        exec setsid nohup "$@" </dev/null >>"$logf" 2>&1
    ) &
    echo "$!" >"$pidf"
}

# Stop a process started by spawn_detached: TERM, wait, KILL as last resort.
# Usage: stop_pid NAME PID [GRACE_SECONDS]
stop_pid() {
    local name="$1" pid="$2" grace="${3:-20}"
    local target="$pid"
    # Signal the whole process group when the server leads its own group.
    if [[ "$(ps -o pgid= -p "$pid" 2>/dev/null | tr -d ' ')" == "$pid" ]]; then
        target="-$pid"
    fi
    kill -TERM -- "$target" 2>/dev/null || true
    if wait_for_exit "$pid" "$grace"; then
        return 0
    fi
    warn "$name (pid $pid) did not exit within ${grace}s after SIGTERM; sending SIGKILL"
    kill -KILL -- "$target" 2>/dev/null || true
    wait_for_exit "$pid" 10 || die "$name (pid $pid) survived SIGKILL"
}

# --------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------
# Newest installed server binaries: /usr/lib/postgresql/<major>/bin
pg_bin_dir() {
    local d best="" best_ver=-1 ver
    for d in /usr/lib/postgresql/*/bin; do
        [[ -x "$d/initdb" ]] || continue
        ver="$(basename "$(dirname "$d")")"
        [[ "$ver" =~ ^[0-9]+$ ]] || continue
        if ((ver > best_ver)); then
            best_ver="$ver"
            best="$d"
        fi
    done
    [[ -n "$best" ]] || return 1
    echo "$best"
}

# Run a command as the postgres OS user when we are root (initdb/pg_ctl
# refuse to run as root); as ourselves otherwise.
as_pg_user() {
    if [[ "$(id -u)" -eq 0 ]]; then
        (cd / && runuser -u postgres -- "$@")
    else
        "$@"
    fi
}

# Can the user that runs postgres traverse into (and list) DIR?
pg_user_can_access() {
    local dir="$1"
    if [[ "$(id -u)" -eq 0 ]]; then
        (cd / && runuser -u postgres -- test -x "$dir" -a -r "$dir") 2>/dev/null
    else
        test -x "$dir" -a -r "$dir"
    fi
}

# Sets PG_BASE (parent of data and socket dir), PG_DATA, PG_SOCKET_DIR.
# Prefers $STATE_DIR; falls back to /var/tmp/dualsync-pg-<hash> when the
# postgres user cannot traverse the repository path (e.g. a clone under
# /root, which is mode 0700).
pg_resolve_dirs() {
    [[ -z "${PG_BASE:-}" ]] || return 0
    mkdir -p "$STATE_DIR"
    if pg_user_can_access "$STATE_DIR"; then
        PG_BASE="$STATE_DIR"
        PG_BASE_FALLBACK=0
    else
        local hash
        hash="$(printf '%s' "$(cd "$STATE_DIR" && pwd -P)" | cksum | awk '{print $1}')"
        PG_BASE="/var/tmp/dualsync-pg-$hash"
        PG_BASE_FALLBACK=1
    fi
    PG_DATA="$PG_BASE/pg"
    PG_SOCKET_DIR="$PG_BASE/pg-socket"
    # Unix socket paths are limited to 107 bytes ("/.s.PGSQL.NNNNN" is 15).
    if ((${#PG_SOCKET_DIR} > 90)); then
        PG_SOCKET_DIR="/tmp"
    fi
}

pg_url() { echo "postgres://postgres@$BIND_HOST:$PG_PORT/postgres"; }
# Nodes of the local cluster as it was started (status/down follow the running
# cluster, not KAFKA_NODES).
kafka_started_nodes() {
    if [[ -r "$STATE_DIR/kafka/nodes" ]]; then cat "$STATE_DIR/kafka/nodes"; else echo "$KAFKA_NODES"; fi
}

# Client address of every node of the local cluster, comma-separated.
kafka_brokers() {
    local i out=""
    for ((i = 1; i <= KAFKA_NODES; i++)); do
        out+="${out:+,}$BIND_HOST:$((KAFKA_PORT + i - 1))"
    done
    echo "$out"
}
mongo_url() { echo "mongodb://$BIND_HOST:$MONGO_PORT/?directConnection=true"; }

# mongo_wire_ping URL -> 0 when the server at URL answers `ping` with ok: 1 (a real round trip
# with the pymongo that ships in SecantusDB's venv).
mongo_wire_ping() {
    "$SECANTUS_HOME/bin/python" -c "import sys, pymongo
c = pymongo.MongoClient(sys.argv[1], serverSelectionTimeoutMS=2000)
sys.exit(0 if c.admin.command('ping').get('ok') == 1 else 1)" "$1"
}

server_address() {
    case "$1" in
        postgres) pg_url ;;
        kafka) kafka_brokers ;;
        mongo) mongo_url ;;
        registry) registry_url ;;
        ferretdb) ferretdb_url ;;
    esac
}

# (Re)write $STATE_DIR/env, sourced by tests and the demo: unquoted
# `export KEY=VALUE` lines, so it is also trivial to parse. The server URLs,
# plus the server programs for tests that run a private server of their own.
write_env_file() {
    ensure_state_dirs
    local tmp="$ENV_FILE.tmp.$$"
    {
        echo "export DUALSYNC_TEST_PG_URL=$(pg_url)"
        echo "export DUALSYNC_TEST_KAFKA_BROKERS=$(kafka_brokers)"
        echo "export DUALSYNC_TEST_MONGO_URL=$(mongo_url)"
        echo "export DUALSYNC_TEST_PG_BIN=$(pg_bin_dir || true)"
        echo "export DUALSYNC_TEST_MONGOD=$SECANTUS_BIN"
        echo "export DUALSYNC_TEST_KAFKA_LIBS=$KAFKA_LIBS"
        echo "export DUALSYNC_TEST_REGISTRY_URL=$(registry_url)"
        # The second MongoDB-wire server the MongoDB sink tests also run against, when it is
        # installed (scripts/test.sh installs and starts it).
        if [[ -x "$(go_tool_bin ferretdb)" ]]; then
            echo "export DUALSYNC_TEST_FERRETDB_URL=$(ferretdb_url)"
            # Its program, for the tests that run a FerretDB of their own.
            echo "export DUALSYNC_TEST_FERRETDB=$(go_tool_bin ferretdb)"
        fi
        if [[ -r "$STATE_DIR/kafka/sasl-password" ]]; then
            echo "export DUALSYNC_TEST_KAFKA_SASL_BROKERS=$BIND_HOST:$KAFKA_SASL_PORT"
            echo "export DUALSYNC_TEST_KAFKA_SASL_USER=$KAFKA_SASL_USER"
            echo "export DUALSYNC_TEST_KAFKA_SASL_PASSWORD_FILE=$STATE_DIR/kafka/sasl-password"
            echo "export DUALSYNC_TEST_KAFKA_CA=$STATE_DIR/kafka/tls/ca.pem"
        fi
        # The fault tests' proxy (installed by scripts/test.sh), when it is there.
        if [[ -x "$(go_tool_bin toxiproxy)" ]]; then
            echo "export DUALSYNC_TEST_TOXIPROXY=$(go_tool_bin toxiproxy)"
        fi
        # The chart's tests (tests/it/helm.rs) and the compose file's (tests/it/compose.rs).
        if [[ -x "$(go_tool_bin helm)" ]]; then
            echo "export DUALSYNC_TEST_HELM=$(go_tool_bin helm)"
        fi
        # The traces test's Jaeger (tests/it/traces.rs).
        if [[ -x "$(go_tool_bin jaeger)" ]]; then
            echo "export DUALSYNC_TEST_JAEGER=$(go_tool_bin jaeger)"
        fi
        if command -v docker-compose >/dev/null 2>&1; then
            echo "export DUALSYNC_TEST_DOCKER_COMPOSE=$(command -v docker-compose)"
        fi
    } >"$tmp"
    mv -f "$tmp" "$ENV_FILE"
}

# --------------------------------------------------------------------------
# Pipeline environment for the demo and the benchmark
# --------------------------------------------------------------------------
# export_pipeline_env NAME SOURCE_DB REPLICA_DB MONGO_DB: points connectors/demo.toml at the
# local servers with its own pipeline name, topics and databases (through DUALSYNC_* overrides).
export_pipeline_env() {
    local name="$1" source_db="$2" replica_db="$3" mongo_db="$4"
    export DUALSYNC_PIPELINE__NAME="$name"
    export DUALSYNC_KAFKA__TOPIC_TEMPLATE="$name.{aggregatetype}"
    export DUALSYNC_RELAY__DEAD_LETTER_TOPIC="$name.relay.dlq"
    export DUALSYNC_SOURCE__URL="postgres://postgres@$BIND_HOST:$PG_PORT/$source_db"
    export DUALSYNC_KAFKA__BROKERS="$BIND_HOST:$KAFKA_PORT"
    export DUALSYNC_SINKS__POSTGRES__URL="postgres://postgres@$BIND_HOST:$PG_PORT/$replica_db"
    export DUALSYNC_SINKS__MONGO__URL="mongodb://$BIND_HOST:$MONGO_PORT/?directConnection=true"
    export DUALSYNC_SINKS__MONGO__DATABASE="$mongo_db"
}

# Test tools built with `go install` (Toxiproxy, Helm, Jaeger).
# shellcheck source=scripts/go_tools.sh
. "$REPO_ROOT/scripts/go_tools.sh"

# The schema registry's install/up/down (the fifth server).
# shellcheck source=scripts/registry.sh
. "$REPO_ROOT/scripts/registry.sh"

# FerretDB's install/up/down (the sixth server, a second MongoDB-wire server).
# shellcheck source=scripts/ferretdb.sh
. "$REPO_ROOT/scripts/ferretdb.sh"
