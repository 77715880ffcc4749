# shellcheck shell=bash disable=SC2034 # sourced by scripts/bench_side.sh
# The benchmark's peer: a Kafka Connect standalone worker running Debezium's PostgreSQL
# connector (pgoutput, outbox EventRouter) and Debezium's JDBC sink, installed from Maven
# Central (bench/debezium/pom.xml) into $TOOLS_DIR/debezium-<version>, reused when present.
# Settings are explained in docs/benchmarks-method.md.

DEBEZIUM_VERSION=3.6.1
DEBEZIUM_HOME="$TOOLS_DIR/debezium-$DEBEZIUM_VERSION"
# Connect's own default heap (bin/connect-standalone.sh).
CONNECT_HEAP="${BENCH_CONNECT_HEAP:--Xms256M -Xmx2G}"
# The source task's wait for more change events before it hands a batch over (Debezium's
# default is 500 ms; dualsync's relay lingers 2 ms).
DBZ_POLL_MS="${BENCH_DBZ_POLL_MS:-10}"

# Copies the worker's classpath (lib/) and one plugin directory per connector (plugins/): the
# plugins leave out Kafka's, SLF4J's and Jackson's core jars, which the worker provides (a
# second jackson-databind in a plugin rejects the worker's Jackson modules that Hibernate
# discovers: "BlackbirdModule not a subtype").
# Reused while bench/debezium/pom.xml is unchanged (.complete holds its checksum).
debezium_install() {
    local sum
    sum="$(sha256sum "$REPO_ROOT/bench/debezium/pom.xml" | awk '{print $1}')"
    [[ "$(cat "$DEBEZIUM_HOME/.complete" 2>/dev/null)" == "$sum" ]] && return 0
    command -v mvn >/dev/null || die "bench: mvn is needed to fetch Debezium from Maven Central"
    log "installing Kafka Connect + Debezium $DEBEZIUM_VERSION into $DEBEZIUM_HOME (Maven Central)"
    local tmp="$DEBEZIUM_HOME.tmp" pom="$REPO_ROOT/bench/debezium/pom.xml"
    rm -rf "$tmp"
    mkdir -p "$tmp"
    mvn -q -B -f "$pom" -P worker dependency:copy-dependencies -DoutputDirectory="$tmp/lib" >&2
    local plugin
    for plugin in postgres jdbc; do
        mvn -q -B -f "$pom" -P "$plugin" dependency:copy-dependencies -DexcludeScope=provided \
            -DexcludeGroupIds=org.apache.kafka,org.slf4j \
            -DexcludeArtifactIds=jackson-core,jackson-databind,jackson-annotations \
            -DoutputDirectory="$tmp/plugins/debezium-connector-$plugin" >&2
    done
    echo "$sum" >"$tmp/.complete"
    rm -rf "$DEBEZIUM_HOME"
    mv "$tmp" "$DEBEZIUM_HOME"
}

# peer_prepare DB: what the connectors need in the bench database before any event is written:
# a publication of the outbox alone, the replication slot (so a backlog written now is
# streamed later: no snapshot), and the sink table the JDBC sink upserts into. The sink table
# takes updated_at from a trigger (the upsert only writes id, payload, seq): now(), the
# sink transaction's start, as dualsync's sink writes it.
peer_prepare() {
    local db="$1"
    "${PSQL[@]}" -d "$db" -c "CREATE PUBLICATION bench_dbz FOR TABLE dualsync.outbox" \
        -c "SELECT 1 FROM pg_create_logical_replication_slot('${db}_dbz', 'pgoutput')" \
        -c "CREATE TABLE public.${db}_dbz_orders (id text PRIMARY KEY, payload jsonb, seq bigint,
                updated_at timestamptz NOT NULL DEFAULT now())" \
        -c "CREATE FUNCTION public.bench_touch() RETURNS trigger LANGUAGE plpgsql AS
                \$\$ BEGIN NEW.updated_at := now(); RETURN NEW; END \$\$" \
        -c "CREATE TRIGGER bench_touch BEFORE INSERT OR UPDATE ON public.${db}_dbz_orders
                FOR EACH ROW EXECUTE FUNCTION public.bench_touch()" >/dev/null
}
peer_topic() { echo "${1}_dbz_orders"; }

# peer_start DB: writes the worker's and connectors' properties under $LOG_DIR/dbz-DB and
# starts the worker; its pid in $PEER_PID (and $LOG_DIR/dbz-DB/pid).
peer_start() {
    local db="$1" dir="$LOG_DIR/dbz-$1"
    mkdir -p "$dir"
    cat >"$dir/worker.properties" <<PROPS
bootstrap.servers=$(kafka_brokers)
key.converter=org.apache.kafka.connect.json.JsonConverter
value.converter=org.apache.kafka.connect.json.JsonConverter
key.converter.schemas.enable=true
value.converter.schemas.enable=true
offset.storage.file.filename=$dir/offsets
offset.flush.interval.ms=1000
plugin.path=$DEBEZIUM_HOME/plugins
plugin.discovery=only_scan
listeners=http://$BIND_HOST:0
${BENCH_CONNECT_PRODUCER_ACKS:+producer.acks=$BENCH_CONNECT_PRODUCER_ACKS}
PROPS
    cat >"$dir/source.properties" <<PROPS
name=${db}-source
connector.class=io.debezium.connector.postgresql.PostgresConnector
tasks.max=1
plugin.name=pgoutput
database.hostname=$BIND_HOST
database.port=$PG_PORT
database.user=postgres
database.password=
database.dbname=$db
topic.prefix=${db}_dbz
slot.name=${db}_dbz
publication.name=bench_dbz
publication.autocreate.mode=disabled
snapshot.mode=no_data
table.include.list=dualsync.outbox
column.exclude.list=dualsync.outbox.txid,dualsync.outbox.published_at
poll.interval.ms=$DBZ_POLL_MS
tombstones.on.delete=false
transforms=outbox
transforms.outbox.type=io.debezium.transforms.outbox.EventRouter
transforms.outbox.table.field.event.id=id
transforms.outbox.table.field.event.key=aggregateid
transforms.outbox.table.field.event.payload=payload
transforms.outbox.route.by.field=aggregatetype
transforms.outbox.route.topic.replacement=${db}_dbz_\${routedByValue}
transforms.outbox.table.fields.additional.placement=seq:envelope:seq,seq:header:seq,type:header:eventType
transforms.outbox.table.expand.json.payload=false
PROPS
    cat >"$dir/sink.properties" <<PROPS
name=${db}-sink
connector.class=io.debezium.connector.jdbc.JdbcSinkConnector
tasks.max=1
topics=$(peer_topic "$db")
connection.url=jdbc:postgresql://$BIND_HOST:$PG_PORT/$db
connection.username=postgres
connection.password=
insert.mode=upsert
primary.key.mode=record_key
primary.key.fields=id
delete.enabled=false
schema.evolution=none
# The EventRouter's key is the bare aggregate id; the sink wants a struct key.
transforms=key
transforms.key.type=org.apache.kafka.connect.transforms.HoistField\$Key
transforms.key.field=id
PROPS
    # shellcheck disable=SC2086 # the heap options are several words
    java $CONNECT_HEAP -XX:+UseG1GC -Djava.awt.headless=true \
        -cp "$DEBEZIUM_HOME/lib/*" org.apache.kafka.connect.cli.ConnectStandalone \
        "$dir/worker.properties" "$dir/source.properties" "$dir/sink.properties" \
        >"$dir/connect.log" 2>&1 &
    PEER_PID=$!
    echo "$PEER_PID" >"$dir/pid"
}

# peer_stop: stops the worker (TERM, then KILL after 30 s).
peer_stop() {
    [[ -n "${PEER_PID:-}" ]] || return 0
    kill -TERM "$PEER_PID" 2>/dev/null || true
    local end=$((SECONDS + 30))
    while kill -0 "$PEER_PID" 2>/dev/null && ((SECONDS < end)); do sleep 0.2; done
    kill -KILL "$PEER_PID" 2>/dev/null || true
    wait "$PEER_PID" 2>/dev/null || true
    PEER_PID=
}

# peer_drop_slot DB: a forgotten slot keeps WAL on the shared cluster forever.
peer_drop_slot() {
    "${PSQL[@]}" -d postgres -c "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
        WHERE slot_name = '${1}_dbz' AND NOT active" >/dev/null || true
}
