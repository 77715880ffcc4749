# shellcheck shell=bash disable=SC2034 # variables are used by the sourcing scripts
# The sixth local server: FerretDB, a second MongoDB-wire server, independent of SecantusDB,
# that the MongoDB sink tests run against as well (scripts/test.sh's second pass). Sourced at
# the end of lib.sh; defines install_ferretdb, up_ferretdb, down_ferretdb and ferretdb_url.
#
# Built from the Go module proxy with `go install` (scripts/go_tools.sh) into
# $TOOLS_DIR/ferretdb-<version>/bin. Its SQLite backend keeps the data in
# $STATE_DIR/ferretdb: a storage engine of its own, with no load on or coupling to the
# PostgreSQL the other tests share (the PostgreSQL backend would turn every sink test's
# documents into tables of that server and tie FerretDB's start to it). FerretDB has no change
# streams: the MongoDB source's tests stay on SecantusDB.
#
# Knobs: DUALSYNC_FERRETDB_PORT (default 27118).

FERRETDB_PORT="${DUALSYNC_FERRETDB_PORT:-27118}"
FERRETDB_DIR="$STATE_DIR/ferretdb"

ferretdb_url() { echo "mongodb://$BIND_HOST:$FERRETDB_PORT/?directConnection=true"; }

# `go install github.com/FerretDB/FerretDB/cmd/ferretdb@v…` builds a program that panics at
# start: FerretDB reads its version from build/version/version.txt, a file its release builds
# generate and its module zip leaves out. So the module's source is fetched from the Go module
# proxy (`go mod download`), given that file (as FerretDB's build/version docs say to), and
# built with `go build`.
install_ferretdb() {
    local bin module dir tmp logf
    bin="$(go_tool_bin ferretdb)"
    if [[ -x "$bin" ]]; then
        log "ferretdb: already installed ($bin)"
        return 0
    fi
    command -v go >/dev/null 2>&1 || die "ferretdb: the Go toolchain is needed to build FerretDB; install Go 1.22 or newer"
    module="github.com/FerretDB/FerretDB@v$FERRETDB_VERSION"
    mkdir -p "$TOOLS_DIR"
    logf="$TOOLS_DIR/ferretdb-$FERRETDB_VERSION.install.log"
    log "ferretdb: go mod download $module and go build ./cmd/ferretdb (a few minutes the first time; log $logf)"
    dir="$(GOFLAGS=-mod=mod go mod download -json "$module" 2>>"$logf" |
        sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p')"
    [[ -n "$dir" && -d "$dir" ]] || { log_tail "$logf"; die "ferretdb: go mod download $module failed; see $logf"; }
    tmp="$(mktemp -d)"
    cp -r "$dir/." "$tmp/src"
    chmod -R u+w "$tmp/src"
    echo "v$FERRETDB_VERSION" >"$tmp/src/build/version/version.txt"
    if ! (cd "$tmp/src" && GOFLAGS=-mod=mod go build -trimpath -o "$tmp/ferretdb" ./cmd/ferretdb) >>"$logf" 2>&1; then
        log_tail "$logf" 40
        rm -rf "$tmp"
        die "ferretdb: go build of $module failed; see $logf"
    fi
    mkdir -p "$(dirname "$bin")"
    mv -f "$tmp/ferretdb" "$bin"
    rm -rf "$tmp"
    log "ferretdb: installed $bin"
}

# 0 when FerretDB answers a `ping` with ok: 1 (with SecantusDB's pymongo when it is installed;
# otherwise an open port is taken as the answer).
ferretdb_ping() {
    if [[ -x "$SECANTUS_HOME/bin/python" ]]; then
        mongo_wire_ping "$(ferretdb_url)"
    else
        port_open "$FERRETDB_PORT"
    fi
}

up_ferretdb() {
    local pid logf pidf bin
    logf="$(log_file ferretdb)"
    pidf="$(pid_file ferretdb)"
    bin="$(go_tool_bin ferretdb)"
    if pid="$(server_pid ferretdb)"; then
        log "ferretdb: already running (pid $pid) at $(ferretdb_url)"
    else
        [[ -x "$bin" ]] || die "ferretdb: $bin missing (run scripts/install.sh ferretdb)"
        ensure_port_free ferretdb "$FERRETDB_PORT"
        mkdir -p "$FERRETDB_DIR/data"
        log "ferretdb: starting FerretDB $FERRETDB_VERSION (SQLite in $FERRETDB_DIR/data, log $logf)"
        # No debug/metrics listener (its default port 8088 is anyone's) and no telemetry
        # reports (this machine reaches no such service).
        spawn_detached "$logf" "$pidf" "$FERRETDB_DIR" \
            "$bin" --handler=sqlite --sqlite-url="file:$FERRETDB_DIR/data/" \
            --state-dir="$FERRETDB_DIR" --listen-addr="$BIND_HOST:$FERRETDB_PORT" \
            --debug-addr=- --telemetry=disable --log-level=warn
        pid="$(read_pid ferretdb)"
        wait_for_port ferretdb "$FERRETDB_PORT" "$logf" "$pid"
    fi
    if ! wait_until "ferretdb ping on $BIND_HOST:$FERRETDB_PORT" "$START_TIMEOUT" ferretdb_ping; then
        log_tail "$logf"
        die "ferretdb: $BIND_HOST:$FERRETDB_PORT does not answer a ping; see $logf"
    fi
    log "ferretdb: ready, pid $(read_pid ferretdb), listening on $BIND_HOST:$FERRETDB_PORT ($(ferretdb_url))"
}

down_ferretdb() {
    local pid
    if ! pid="$(server_pid ferretdb)"; then
        log "ferretdb: not running"
        rm -f "$(pid_file ferretdb)"
        return 0
    fi
    log "ferretdb: stopping (pid $pid)"
    stop_pid ferretdb "$pid" 20
    rm -f "$(pid_file ferretdb)"
    log "ferretdb: stopped"
}
