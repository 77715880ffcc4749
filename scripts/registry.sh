# shellcheck shell=bash disable=SC2034 # variables are used by the sourcing scripts
# The fifth local server: a Confluent-API schema registry for the tests (Apicurio Registry,
# in-memory storage, Confluent-compatible API under /apis/ccompat/v7). Sourced at the end of
# lib.sh; defines install_registry, up_registry, down_registry and registry_url.
#
# Apicurio publishes no runnable distribution on Maven Central, so install_registry builds one
# from its Central jars with the small Maven project in scripts/registry/ (why 2.4.2.Final and
# what that project works around: see its pom.xml) into $TOOLS_DIR/apicurio-registry-<version>,
# rebuilt only when scripts/registry/ changes. Needs Java 17+ and Maven.
#
# Knobs: DUALSYNC_REGISTRY_PORT (default 18081), DUALSYNC_REGISTRY_HEAP (default 384m).

REGISTRY_PORT="${DUALSYNC_REGISTRY_PORT:-18081}"
REGISTRY_HEAP="${DUALSYNC_REGISTRY_HEAP:-384m}"
APICURIO_VERSION=2.4.2.Final
APICURIO_HOME="$TOOLS_DIR/apicurio-registry-$APICURIO_VERSION"
APICURIO_JAR="$APICURIO_HOME/apicurio-registry-runner-1-runner.jar"
APICURIO_SOURCE="$REPO_ROOT/scripts/registry"
APICURIO_BUILD_DIR="${HOME:-/root}/.dualsync/build-apicurio"

# The Confluent-compatible API's base URL (what `[schema_registry] url` takes).
registry_url() { echo "http://$BIND_HOST:$REGISTRY_PORT/apis/ccompat/v7"; }

# A hash of the build project: a changed pom or resource means a rebuild.
registry_source_hash() {
    (cd "$APICURIO_SOURCE" && find . -type f -not -path './target/*' | LC_ALL=C sort | xargs sha256sum) |
        sha256sum | cut -c1-16
}

registry_installed() {
    [[ -r "$APICURIO_JAR" && -r "$APICURIO_HOME/.source" ]] &&
        [[ "$(cat "$APICURIO_HOME/.source")" == "$(registry_source_hash)" ]]
}

# Major version of `java` on PATH (0 when missing).
java_major() {
    command -v java >/dev/null 2>&1 || { echo 0; return; }
    java -version 2>&1 | awk -F'"' '/version/ {split($2, v, "."); print (v[1] == "1" ? v[2] : v[1]); exit}'
}

install_registry() {
    if registry_installed; then
        log "registry: already installed ($APICURIO_HOME, Apicurio Registry $APICURIO_VERSION)"
        return 0
    fi
    # A JDK, not only a runtime: the build compiles ConfigIndexStandIn.java.
    if (($(java_major) < 17)) || ! command -v javac >/dev/null 2>&1 || ! command -v mvn >/dev/null 2>&1; then
        declare -F apt_install >/dev/null || die "registry: needs a JDK 17+ and Maven on PATH"
        log "registry: installing a JDK 17 and Maven (Debian packages)"
        apt_install openjdk-17-jdk-headless maven
    fi
    mkdir -p "$TOOLS_DIR"
    local logf="$TOOLS_DIR/apicurio-registry-$APICURIO_VERSION.install.log"
    log "registry: building Apicurio Registry $APICURIO_VERSION from Maven Central (a few minutes the first time; log $logf)"
    rm -rf "$APICURIO_BUILD_DIR"
    mkdir -p "$APICURIO_BUILD_DIR"
    cp -r "$APICURIO_SOURCE/." "$APICURIO_BUILD_DIR/"
    rm -rf "$APICURIO_BUILD_DIR/target"
    if ! mvn -B -f "$APICURIO_BUILD_DIR/pom.xml" package >"$logf" 2>&1; then
        log_tail "$logf" 40
        die "registry: Maven build of Apicurio Registry failed; see $logf"
    fi
    local tmp="$APICURIO_HOME.tmp.$$"
    rm -rf "$tmp"
    mkdir -p "$tmp"
    cp "$APICURIO_BUILD_DIR/target/apicurio-registry-runner-1-runner.jar" "$tmp/"
    cp -r "$APICURIO_BUILD_DIR/target/lib" "$tmp/"
    registry_source_hash >"$tmp/.source"
    rm -rf "$APICURIO_HOME"
    mv "$tmp" "$APICURIO_HOME"
    rm -rf "$APICURIO_BUILD_DIR"
    log "registry: installed $APICURIO_JAR"
}

# 0 when the registry answers its Confluent API: GET /subjects is a JSON list.
registry_ping() {
    local body
    body="$(curl -sf --max-time 3 "$(registry_url)/subjects" 2>/dev/null)" || return 1
    [[ "$body" == \[* ]]
}

up_registry() {
    local pid logf pidf
    logf="$(log_file registry)"
    pidf="$(pid_file registry)"
    if pid="$(server_pid registry)"; then
        log "registry: already running (pid $pid) at $(registry_url)"
    else
        [[ -r "$APICURIO_JAR" ]] || die "registry: $APICURIO_JAR missing (run scripts/install.sh registry)"
        ensure_port_free registry "$REGISTRY_PORT"
        log "registry: starting Apicurio Registry $APICURIO_VERSION (in-memory, log $logf)"
        # BACKWARD is the Confluent registry's default compatibility; Apicurio's is none.
        spawn_detached "$logf" "$pidf" "$APICURIO_HOME" \
            java -XX:+UseSerialGC -Xmx"$REGISTRY_HEAP" \
            -Dquarkus.http.host="$BIND_HOST" -Dquarkus.http.port="$REGISTRY_PORT" \
            -Dregistry.rules.global.compatibility=BACKWARD \
            -jar "$APICURIO_JAR"
        pid="$(read_pid registry)"
        wait_for_port registry "$REGISTRY_PORT" "$logf" "$pid"
    fi
    if ! wait_until "registry answer on $(registry_url)/subjects" "$START_TIMEOUT" registry_ping; then
        log_tail "$logf"
        die "registry: $BIND_HOST:$REGISTRY_PORT accepts connections but GET $(registry_url)/subjects fails; see $logf"
    fi
    log "registry: ready, pid $(read_pid registry), listening on $BIND_HOST:$REGISTRY_PORT ($(registry_url))"
}

down_registry() {
    local pid
    if ! pid="$(server_pid registry)"; then
        log "registry: not running"
        rm -f "$(pid_file registry)"
        return 0
    fi
    log "registry: stopping (pid $pid)"
    stop_pid registry "$pid" 20
    rm -f "$(pid_file registry)"
    log "registry: stopped"
}
