#!/usr/bin/env bash
# Start the local servers (installing what is missing), wait until they
# answer, and (re)write $STATE_DIR/env for the tests and the demo.
#
#   scripts/up.sh [postgres|kafka|mongo|registry|ferretdb|all]...   (default: all)
#
# A server whose pid file points at a live process is left alone.
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# shellcheck source=scripts/prometheus.sh
. "$(dirname "${BASH_SOURCE[0]}")/prometheus.sh"

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
# Kafka: Apache Kafka in KRaft mode, KAFKA_NODES combined broker+controller
# nodes, data in $STATE_DIR/kafka/node-N (durable across down/up and kill -9)
# --------------------------------------------------------------------------
KAFKA_DIR="$STATE_DIR/kafka"

kafka_java() {
    local java=java
    [[ -n "${JAVA_HOME:-}" && -x "$JAVA_HOME/bin/java" ]] && java="$JAVA_HOME/bin/java"
    echo "$java"
}

# A self-signed CA and a server certificate for 127.0.0.1/localhost, and the
# SCRAM password of the SASL_SSL listener; made once, kept with the data.
kafka_ensure_secrets() {
    local tls="$KAFKA_DIR/tls"
    if [[ ! -r "$tls/server.p12" ]]; then
        mkdir -p "$tls"
        log "kafka: making a local CA and a server certificate in $tls"
        openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=dualsync local CA" \
            -keyout "$tls/ca.key" -out "$tls/ca.pem" >/dev/null 2>&1
        openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
            -keyout "$tls/server.key" -out "$tls/server.csr" >/dev/null 2>&1
        printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' >"$tls/san.ext"
        openssl x509 -req -in "$tls/server.csr" -CA "$tls/ca.pem" -CAkey "$tls/ca.key" \
            -CAcreateserial -days 3650 -extfile "$tls/san.ext" -out "$tls/server.pem" >/dev/null 2>&1
        openssl rand -hex 16 >"$tls/keystore-password"
        openssl pkcs12 -export -in "$tls/server.pem" -inkey "$tls/server.key" \
            -certfile "$tls/ca.pem" -name kafka -passout "file:$tls/keystore-password" \
            -out "$tls/server.p12"
        chmod 600 "$tls"/*
        chmod 644 "$tls/ca.pem"
    fi
    if [[ ! -r "$KAFKA_DIR/sasl-password" ]]; then
        openssl rand -hex 16 >"$KAFKA_DIR/sasl-password"
        chmod 600 "$KAFKA_DIR/sasl-password"
    fi
}

# kafka_write_config NODE -> $KAFKA_DIR/node-N/server.properties (rewritten on every start).
kafka_write_config() {
    local n="$1" i voters="" rf=1 isr=1 dir="$KAFKA_DIR/node-$1" ksp
    for ((i = 1; i <= KAFKA_NODES; i++)); do
        voters+="${voters:+,}$BIND_HOST:$((KAFKA_CONTROLLER_PORT + i - 1))"
    done
    if ((KAFKA_NODES >= 3)); then rf=3 isr=2; fi
    ksp="$(cat "$KAFKA_DIR/tls/keystore-password")"
    mkdir -p "$dir/data"
    cat >"$dir/server.properties" <<EOF
# Managed by scripts/up.sh; rewritten on every start.
process.roles=broker,controller
node.id=$n
controller.quorum.bootstrap.servers=$voters
controller.listener.names=CONTROLLER
listeners=PLAINTEXT://$BIND_HOST:$((KAFKA_PORT + n - 1)),CONTROLLER://$BIND_HOST:$((KAFKA_CONTROLLER_PORT + n - 1)),SASL_SSL://$BIND_HOST:$((KAFKA_SASL_PORT + n - 1))
advertised.listeners=PLAINTEXT://$BIND_HOST:$((KAFKA_PORT + n - 1)),SASL_SSL://$BIND_HOST:$((KAFKA_SASL_PORT + n - 1))
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SASL_SSL:SASL_SSL
inter.broker.listener.name=PLAINTEXT
log.dirs=$dir/data
# SASL_SSL: SCRAM-SHA-512 over TLS (users are stored in the cluster metadata).
sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
ssl.keystore.type=PKCS12
ssl.keystore.location=$KAFKA_DIR/tls/server.p12
ssl.keystore.password=$ksp
ssl.key.password=$ksp
# Topics are created by dualsync with the settings it asks for, never by a stray produce.
auto.create.topics.enable=false
num.partitions=1
default.replication.factor=$rf
min.insync.replicas=$isr
offsets.topic.replication.factor=$rf
offsets.topic.num.partitions=10
transaction.state.log.replication.factor=$rf
transaction.state.log.min.isr=$isr
transaction.state.log.num.partitions=4
share.coordinator.state.topic.replication.factor=$rf
share.coordinator.state.topic.min.isr=$isr
# A local cluster for tests: groups form at once instead of after 3 s.
group.initial.rebalance.delay.ms=0
num.network.threads=2
num.io.threads=4
EOF
}

kafka_storage_tool() {
    "$(kafka_java)" -Xmx256m -cp "$KAFKA_LIBS/*" kafka.tools.StorageTool "$@"
}

# A stable directory id per node (a KRaft voter names its log directory's id).
kafka_directory_id() {
    local f="$KAFKA_DIR/node-$1.directory-id"
    [[ -r "$f" ]] || kafka_storage_tool random-uuid 2>/dev/null | tail -n1 >"$f"
    cat "$f"
}

# Format node N's storage once (KRaft needs a cluster id and the initial voters).
kafka_format() {
    local n="$1" dir="$KAFKA_DIR/node-$1" cluster_id i voters="" flog
    [[ -r "$dir/data/meta.properties" ]] && return 0
    if [[ ! -r "$KAFKA_DIR/cluster.id" ]]; then
        kafka_storage_tool random-uuid 2>/dev/null | tail -n1 >"$KAFKA_DIR/cluster.id"
    fi
    cluster_id="$(cat "$KAFKA_DIR/cluster.id")"
    flog="$(log_file "kafka-$n-format")"
    log "kafka: formatting node $n storage $dir/data (cluster $cluster_id)"
    local args=(format -t "$cluster_id" -c "$dir/server.properties"
        --add-scram "SCRAM-SHA-512=[name=$KAFKA_SASL_USER,password=$(cat "$KAFKA_DIR/sasl-password")]")
    if ((KAFKA_NODES == 1)); then
        args+=(--standalone)
    else
        # Every node knows the initial voters: node-id@host:port:directory-id.
        for ((i = 1; i <= KAFKA_NODES; i++)); do
            voters+="${voters:+,}$i@$BIND_HOST:$((KAFKA_CONTROLLER_PORT + i - 1)):$(kafka_directory_id "$i")"
        done
        args+=(--initial-controllers "$voters")
    fi
    if ! kafka_storage_tool "${args[@]}" >"$flog" 2>&1; then
        log_tail "$flog"
        die "kafka: formatting node $n failed; see $flog"
    fi
}

kafka_heap() {
    if [[ -n "${DUALSYNC_KAFKA_HEAP:-}" ]]; then
        echo "$DUALSYNC_KAFKA_HEAP"
    elif ((KAFKA_NODES == 1)); then
        echo 1g
    else
        echo 768m
    fi
}

up_kafka_node() {
    local n="$1" pid logf pidf port
    logf="$(log_file "kafka-$n")"
    pidf="$(pid_file "kafka-$n")"
    port=$((KAFKA_PORT + n - 1))
    if pid="$(server_pid "kafka-$n")"; then
        log "kafka: node $n already running (pid $pid) at $BIND_HOST:$port"
        return 0
    fi
    ensure_port_free kafka "$port"
    kafka_write_config "$n"
    kafka_format "$n"
    log "kafka: starting node $n (Apache Kafka $KAFKA_VERSION, heap $(kafka_heap), log $logf)"
    spawn_detached "$logf" "$pidf" "$KAFKA_DIR/node-$n" \
        "$(kafka_java)" "-Xms$(kafka_heap)" "-Xmx$(kafka_heap)" -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
        -Djava.awt.headless=true -Dorg.slf4j.simpleLogger.showDateTime=true \
        -cp "$KAFKA_LIBS/*" kafka.Kafka "$KAFKA_DIR/node-$n/server.properties"
}

up_kafka() {
    [[ "$KAFKA_NODES" == 1 || "$KAFKA_NODES" == 3 ]] || die "kafka: KAFKA_NODES must be 1 or 3, not '$KAFKA_NODES'"
    [[ -r "$KAFKA_LIBS/kafka_2.13-$KAFKA_VERSION.jar" ]] || die "kafka: $KAFKA_LIBS missing (run scripts/install.sh kafka)"
    mkdir -p "$KAFKA_DIR"
    if [[ -r "$KAFKA_DIR/nodes" && "$(cat "$KAFKA_DIR/nodes")" != "$KAFKA_NODES" ]]; then
        die "kafka: $KAFKA_DIR holds a $(cat "$KAFKA_DIR/nodes")-node cluster, not $KAFKA_NODES; run 'make down SERVERS=kafka', delete $KAFKA_DIR (or set DUALSYNC_STATE_DIR) to change it"
    fi
    echo "$KAFKA_NODES" >"$KAFKA_DIR/nodes"
    kafka_ensure_secrets
    local n port logf
    for ((n = 1; n <= KAFKA_NODES; n++)); do
        up_kafka_node "$n"
    done
    for ((n = 1; n <= KAFKA_NODES; n++)); do
        port=$((KAFKA_PORT + n - 1))
        logf="$(log_file "kafka-$n")"
        wait_for_port "kafka node $n" "$port" "$logf" "$(read_pid "kafka-$n")" 120
        if ! wait_until "Kafka ApiVersions answer from $BIND_HOST:$port" "$START_TIMEOUT" \
            kafka_ping "$BIND_HOST" "$port"; then
            log_tail "$logf"
            die "kafka: $BIND_HOST:$port accepts connections but does not answer Kafka ApiVersions; see $logf"
        fi
    done
    log "kafka: ready, $KAFKA_NODES node(s), brokers $(kafka_brokers), SASL_SSL from $BIND_HOST:$KAFKA_SASL_PORT"
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
        mongo_wire_ping "$(mongo_url)"; then
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
