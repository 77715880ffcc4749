#!/usr/bin/env bash
# Start the local servers (installing what is missing), wait until they
# answer, and (re)write $STATE_DIR/env for the tests and the demo.
#
#   scripts/up.sh [postgres|kafka|mongo|all]...   (default: all)
#
# A server whose pid file points at a live process is left alone.
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# --------------------------------------------------------------------------
# PostgreSQL: private cluster in $STATE_DIR/pg (or a /var/tmp fallback)
# --------------------------------------------------------------------------
pg_write_config() {
    # Rewritten on every start so port/socket changes take effect.
    local conf="$PG_DATA/dualsync.conf" tmp
    tmp="$(mktemp)"
    cat >"$tmp" <<EOF
# Managed by scripts/up.sh; rewritten on every start.
listen_addresses = '$BIND_HOST'
port = $PG_PORT
unix_socket_directories = '$PG_SOCKET_DIR'
wal_level = logical
max_connections = 200
max_replication_slots = 20
max_wal_senders = 20
# Commit times of transactions (the bench measures commit → published with them).
track_commit_timestamp = on
EOF
    install -m 0600 "$tmp" "$conf"
    rm -f "$tmp"
    if [[ "$(id -u)" -eq 0 ]]; then chown postgres:postgres "$conf"; fi

    tmp="$(mktemp)"
    cat >"$tmp" <<EOF
# Managed by scripts/up.sh: trust on loopback/local only (dev cluster).
# TYPE  DATABASE     USER  ADDRESS        METHOD
local   all          all                  trust
host    all          all   127.0.0.1/32   trust
local   replication  all                  trust
host    replication  all   127.0.0.1/32   trust
EOF
    install -m 0600 "$tmp" "$PG_DATA/pg_hba.conf"
    rm -f "$tmp"
    if [[ "$(id -u)" -eq 0 ]]; then chown postgres:postgres "$PG_DATA/pg_hba.conf"; fi
}

pg_init_cluster() {
    local bin="$1"
    if [[ -s "$PG_DATA/PG_VERSION" ]]; then
        return 0
    fi
    log "postgres: initdb $PG_DATA (superuser 'postgres', UTF8, trust on loopback)"
    mkdir -p "$PG_DATA"
    chmod 0700 "$PG_DATA"
    if [[ "$(id -u)" -eq 0 ]]; then chown postgres:postgres "$PG_DATA"; fi
    local init_log
    init_log="$(log_file postgres-initdb)"
    if ! as_pg_user "$bin/initdb" -D "$PG_DATA" -U postgres -E UTF8 --locale=C.UTF-8 \
        --auth-local=trust --auth-host=trust >"$init_log" 2>&1; then
        log_tail "$init_log"
        die "postgres: initdb failed; see $init_log"
    fi
    grep -q "^include_if_exists = 'dualsync.conf'" "$PG_DATA/postgresql.conf" ||
        echo "include_if_exists = 'dualsync.conf'" >>"$PG_DATA/postgresql.conf"
}

# After a crash (e.g. kill -9 of the postmaster) its children linger for a
# moment and keep postmaster.pid's shared memory busy, so a new postmaster
# refuses to start. Wait (with a deadline) until no process works in PG_DATA.
pg_orphans() {
    local d old real
    real="$(readlink -f "$PG_DATA")"
    # The old postmaster itself, even as a not-yet-reaped zombie: postgres
    # checks it with kill(pid, 0), which succeeds on a zombie.
    if [[ -r "$PG_DATA/postmaster.pid" ]]; then
        old="$(head -n1 "$PG_DATA/postmaster.pid" | tr -dc '0-9')"
        [[ -n "$old" && -e "/proc/$old" ]] && echo "$old"
    fi
    for d in /proc/[0-9]*; do
        [[ "$(readlink "$d/cwd" 2>/dev/null)" == "$real" ]] && echo "${d#/proc/}"
    done
    return 0
}

pg_wait_for_orphans() {
    local logf="$1" left
    [[ -n "$(pg_orphans)" ]] || return 0
    log "postgres: processes of a previous (crashed) server still use $PG_DATA; waiting for them to exit"
    local deadline=$((SECONDS + 30))
    while left="$(pg_orphans)" && [[ -n "$left" ]]; do
        if ((SECONDS >= deadline)); then
            die "postgres: leftover processes $(echo "$left" | tr '\n' ' ')still use $PG_DATA after 30s; stop them (kill PID) and retry; see $logf"
        fi
        sleep 0.2
    done
}

up_postgres() {
    local bin pid logf
    bin="$(pg_bin_dir)" || die "postgres: no /usr/lib/postgresql/*/bin/initdb (run scripts/install.sh postgres)"
    pg_resolve_dirs
    logf="$(log_file postgres)"
    if pid="$(server_pid postgres)"; then
        log "postgres: already running (pid $pid) at $(pg_url)"
    else
        ensure_port_free postgres "$PG_PORT"
        mkdir -p "$PG_BASE"
        if [[ "$PG_BASE_FALLBACK" == 1 ]]; then
            warn "postgres: the postgres OS user cannot traverse $STATE_DIR; using $PG_BASE for the data directory instead"
            chmod 0755 "$PG_BASE"
            # Make the real location discoverable (and removable by make clean-state).
            ln -sfn "$PG_DATA" "$STATE_DIR/pg"
        fi
        pg_init_cluster "$bin"
        if [[ "$PG_SOCKET_DIR" != /tmp ]]; then
            mkdir -p "$PG_SOCKET_DIR"
            chmod 0755 "$PG_SOCKET_DIR"
            if [[ "$(id -u)" -eq 0 ]]; then chown postgres:postgres "$PG_SOCKET_DIR"; fi
        fi
        pg_write_config
        pg_wait_for_orphans "$logf"
        log "postgres: starting ($bin/pg_ctl, data $PG_DATA, log $logf)"
        printf '\n===== %s starting postgres =====\n' "$(date '+%Y-%m-%d %H:%M:%S')" >>"$logf"
        # No -l: the server inherits pg_ctl's stdout, a log file opened here by
        # us, so it works even when the postgres user cannot write $LOG_DIR.
        if ! as_pg_user "$bin/pg_ctl" -D "$PG_DATA" -w -t "$START_TIMEOUT" start \
            </dev/null >>"$logf" 2>&1; then
            log_tail "$logf"
            die "postgres: pg_ctl start failed or timed out after ${START_TIMEOUT}s; see $logf"
        fi
        pid="$(head -n1 "$PG_DATA/postmaster.pid" | tr -dc '0-9')"
        echo "$pid" >"$(pid_file postgres)"
    fi
    local deadline=$((SECONDS + START_TIMEOUT))
    until "$bin/pg_isready" -q -h "$BIND_HOST" -p "$PG_PORT" -U postgres -d postgres -t 2; do
        if ((SECONDS >= deadline)); then
            log_tail "$logf"
            die "postgres: pg_isready -h $BIND_HOST -p $PG_PORT failed for ${START_TIMEOUT}s; see $logf"
        fi
        sleep 0.2
    done
    log "postgres: ready, pid $(read_pid postgres), listening on $BIND_HOST:$PG_PORT ($(pg_url); data $PG_DATA)"
}

# --------------------------------------------------------------------------
# Kafka: Tansu broker
# --------------------------------------------------------------------------
up_kafka() {
    local pid logf pidf storage
    logf="$(log_file kafka)"
    pidf="$(pid_file kafka)"
    if pid="$(server_pid kafka)"; then
        log "kafka: already running (pid $pid) at $(kafka_brokers)"
    else
        [[ -x "$TANSU_BIN" ]] || die "kafka: $TANSU_BIN missing (run scripts/install.sh kafka)"
        ensure_port_free kafka "$KAFKA_PORT"
        case "$KAFKA_STORAGE" in
            memory) storage="memory://tansu/" ;;
            sqlite)
                mkdir -p "$STATE_DIR/kafka"
                # Tansu 0.6 resolves sqlite://<host>/<path> as
                # $PWD/<host>/<path> (always relative to its working
                # directory, $STATE_DIR here; absolute paths are not possible).
                storage="sqlite://kafka/tansu.db"
                ;;
            *) die "kafka: DUALSYNC_KAFKA_STORAGE must be 'memory' or 'sqlite', not '$KAFKA_STORAGE'" ;;
        esac
        log "kafka: starting Tansu (storage $storage, log $logf)"
        # Tansu also reads its options from env vars (LISTENER_URL,
        # STORAGE_ENGINE, SCHEMA_REGISTRY, ...); flags win, and a stray
        # SCHEMA_REGISTRY would turn on message validation, so drop it.
        spawn_detached "$logf" "$pidf" "$STATE_DIR" \
            env -u SCHEMA_REGISTRY "$TANSU_BIN" broker \
            --listener-url "tcp://$BIND_HOST:$KAFKA_PORT" \
            --advertised-listener-url "tcp://$BIND_HOST:$KAFKA_PORT" \
            --storage-engine "$storage"
        pid="$(read_pid kafka)"
        wait_for_port kafka "$KAFKA_PORT" "$logf" "$pid"
    fi
    if ! wait_until "Kafka ApiVersions answer from $BIND_HOST:$KAFKA_PORT" "$START_TIMEOUT" \
        kafka_ping "$BIND_HOST" "$KAFKA_PORT"; then
        log_tail "$logf"
        die "kafka: $BIND_HOST:$KAFKA_PORT accepts connections but does not answer Kafka ApiVersions; see $logf"
    fi
    log "kafka: ready, pid $(read_pid kafka), listening on $BIND_HOST:$KAFKA_PORT (brokers $(kafka_brokers))"
}

# --------------------------------------------------------------------------
# Mongo: SecantusDB (one-node replica set 'secantus'; use directConnection)
# --------------------------------------------------------------------------
up_mongo() {
    local pid logf pidf
    logf="$(log_file mongo)"
    pidf="$(pid_file mongo)"
    if pid="$(server_pid mongo)"; then
        log "mongo: already running (pid $pid) at $(mongo_url)"
    else
        [[ -x "$SECANTUS_BIN" ]] || die "mongo: $SECANTUS_BIN missing (run scripts/install.sh mongo)"
        ensure_port_free mongo "$MONGO_PORT"
        mkdir -p "$STATE_DIR/mongo"
        log "mongo: starting SecantusDB (data $STATE_DIR/mongo, log $logf)"
        # Working directory $STATE_DIR/mongo: secantusd-py auto-discovers a
        # ./secantusd.toml, so never run it from a directory that may have one.
        spawn_detached "$logf" "$pidf" "$STATE_DIR/mongo" \
            "$SECANTUS_BIN" --host "$BIND_HOST" --port "$MONGO_PORT" \
            --storage-path "$STATE_DIR/mongo"
        pid="$(read_pid mongo)"
        wait_for_port mongo "$MONGO_PORT" "$logf" "$pid"
    fi
    # A real round trip (hello/ping) with the pymongo that ships in the venv.
    if ! wait_until "mongo ping on $BIND_HOST:$MONGO_PORT" "$START_TIMEOUT" \
        "$SECANTUS_HOME/bin/python" -c "import sys, pymongo
c = pymongo.MongoClient('$(mongo_url)', serverSelectionTimeoutMS=2000)
sys.exit(0 if c.admin.command('ping').get('ok') == 1 else 1)"; then
        log_tail "$logf"
        die "mongo: server on $BIND_HOST:$MONGO_PORT does not answer a ping; see $logf"
    fi
    log "mongo: ready, pid $(read_pid mongo), listening on $BIND_HOST:$MONGO_PORT ($(mongo_url))"
}

main() {
    local servers server
    servers="$(servers_from_args "$@")"
    ensure_state_dirs
    # Install only what is needed and missing (fast no-op otherwise).
    # shellcheck disable=SC2086 # word splitting of the server list is intended
    bash "$REPO_ROOT/scripts/install.sh" $servers
    for server in $servers; do
        "up_$server"
    done
    write_env_file
    log "wrote $ENV_FILE (source it: . $ENV_FILE)"
}

main "$@"
