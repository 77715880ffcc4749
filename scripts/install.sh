#!/usr/bin/env bash
# Install the local servers used by the tests and the demo, only what is
# missing. Idempotent; prints what it did.
#
#   scripts/install.sh [postgres|kafka|mongo|registry|ferretdb|all]...   (default: all)
#
#   postgres  Debian's `postgresql` package (binaries only; the system
#             cluster is never used; scripts/up.sh runs its own cluster)
#   kafka     Apache Kafka's jars from Maven Central (scripts/kafka/pom.xml) into
#             $TOOLS_DIR/kafka-<version>/libs, with Java and Maven from Debian
#             when missing (about 20 seconds)
#   mongo     SecantusDB (MongoDB wire protocol) from PyPI in a venv at
#             $TOOLS_DIR/secantusdb-<version>
#   registry  Apicurio Registry built from its Maven Central jars
#             (scripts/registry/) into $TOOLS_DIR/apicurio-registry-<version>
#             (about a minute the first time; scripts/registry.sh)
#   ferretdb  FerretDB built with `go install` from the Go module proxy into
#             $TOOLS_DIR/ferretdb-<version>/bin (needs Go; scripts/ferretdb.sh)
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# shellcheck source=scripts/prometheus.sh
. "$(dirname "${BASH_SOURCE[0]}")/prometheus.sh"

apt_install() {
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found; install these packages by hand: $*"
    log "apt-get update && apt-get install -y $*"
    run_as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
    run_as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"
}

# --------------------------------------------------------------------------
install_postgres() {
    local bin
    if bin="$(pg_bin_dir)"; then
        log "postgres: already installed ($bin/initdb, $("$bin/postgres" --version 2>/dev/null || echo '?'))"
    else
        log "postgres: no /usr/lib/postgresql/*/bin/initdb; installing Debian package 'postgresql'"
        # We only need the binaries: tell postgresql-common not to create
        # (and start) the system 'main' cluster on port 5432.
        if [[ ! -e /etc/postgresql-common/createcluster.conf ]]; then
            apt_install postgresql-common
        fi
        if [[ -w /etc/postgresql-common/createcluster.conf ]] &&
            ! grep -q '^create_main_cluster *= *false' /etc/postgresql-common/createcluster.conf; then
            log "postgres: setting create_main_cluster = false in /etc/postgresql-common/createcluster.conf"
            sed -i 's/^#\? *create_main_cluster *=.*/create_main_cluster = false/' /etc/postgresql-common/createcluster.conf
            grep -q '^create_main_cluster' /etc/postgresql-common/createcluster.conf ||
                echo 'create_main_cluster = false' >>/etc/postgresql-common/createcluster.conf
        fi
        apt_install postgresql
        bin="$(pg_bin_dir)" || die "postgres: 'postgresql' installed but no /usr/lib/postgresql/*/bin/initdb found"
        log "postgres: installed $bin"
    fi
    # Debian's package creates and may start a system cluster on port 5432;
    # we never use it (our cluster lives in \$STATE_DIR/pg), so leave it be.
    id postgres >/dev/null 2>&1 || [[ "$(id -u)" -ne 0 ]] ||
        die "postgres: OS user 'postgres' is missing (needed to run initdb as non-root)"
    command -v runuser >/dev/null 2>&1 || [[ "$(id -u)" -ne 0 ]] ||
        die "postgres: 'runuser' (util-linux) is missing"
}

# --------------------------------------------------------------------------
kafka_installed() {
    [[ -r "$KAFKA_HOME/.complete" && -r "$KAFKA_LIBS/kafka_2.13-$KAFKA_VERSION.jar" ]]
}

install_java_tools() {
    local need=()
    # A JDK, not only a JRE: the interop tests run their Java as single source files
    # (java Consume.java), which needs the jdk.compiler module.
    command -v javac >/dev/null 2>&1 || need+=(openjdk-17-jdk-headless)
    command -v mvn >/dev/null 2>&1 || need+=(maven)
    command -v openssl >/dev/null 2>&1 || need+=(openssl)
    if ((${#need[@]})); then
        apt_install "${need[@]}"
    fi
}

install_kafka() {
    # Cheap when present; also run when Kafka is installed, so a machine with only a JRE
    # gets the JDK the interop tests need.
    install_java_tools
    if kafka_installed; then
        log "kafka: already installed (Apache Kafka $KAFKA_VERSION, $KAFKA_LIBS)"
        return 0
    fi
    mkdir -p "$TOOLS_DIR"
    exec 9>"$TOOLS_DIR/.kafka-$KAFKA_VERSION.lock"
    flock 9
    if kafka_installed; then
        log "kafka: installed by a concurrent run ($KAFKA_LIBS)"
        return 0
    fi
    rm -rf "$KAFKA_HOME"
    mkdir -p "$KAFKA_LIBS"
    local mvn_log="$TOOLS_DIR/kafka-$KAFKA_VERSION.install.log"
    log "kafka: fetching Apache Kafka $KAFKA_VERSION and its dependencies from Maven Central into $KAFKA_LIBS"
    if ! mvn -B -q -f "$REPO_ROOT/scripts/kafka/pom.xml" -Dkafka.version="$KAFKA_VERSION" \
        dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$KAFKA_LIBS" \
        >"$mvn_log" 2>&1; then
        log_tail "$mvn_log" 40
        rm -rf "$KAFKA_HOME"
        die "kafka: mvn dependency:copy-dependencies failed; see $mvn_log"
    fi
    [[ -r "$KAFKA_LIBS/kafka_2.13-$KAFKA_VERSION.jar" ]] ||
        die "kafka: Maven finished but $KAFKA_LIBS/kafka_2.13-$KAFKA_VERSION.jar is missing; see $mvn_log"
    touch "$KAFKA_HOME/.complete"
    log "kafka: installed $(find "$KAFKA_LIBS" -name '*.jar' | wc -l) jars into $KAFKA_LIBS"
}

# --------------------------------------------------------------------------
secantus_installed() {
    [[ -x "$SECANTUS_BIN" && -x "$SECANTUS_HOME/bin/python" ]] &&
        "$SECANTUS_HOME/bin/python" -c \
            "import importlib.metadata as m, sys; sys.exit(m.version('secantusdb') != '$SECANTUS_VERSION')" \
            >/dev/null 2>&1
}

install_mongo() {
    if secantus_installed; then
        log "mongo: already installed ($SECANTUS_BIN, secantusdb $SECANTUS_VERSION)"
        return 0
    fi
    mkdir -p "$TOOLS_DIR"
    exec 8>"$TOOLS_DIR/.secantusdb-$SECANTUS_VERSION.lock"
    flock 8
    if secantus_installed; then
        log "mongo: installed by a concurrent run ($SECANTUS_BIN)"
        return 0
    fi
    local py
    py="$(command -v python3 || true)"
    [[ -n "$py" ]] || {
        apt_install python3 python3-venv
        py="$(command -v python3)"
    }
    if [[ -e "$SECANTUS_HOME" ]]; then
        log "mongo: removing incomplete install at $SECANTUS_HOME"
        rm -rf "$SECANTUS_HOME"
    fi
    log "mongo: creating venv $SECANTUS_HOME ($("$py" --version 2>&1))"
    if ! "$py" -m venv "$SECANTUS_HOME" >/dev/null 2>&1; then
        rm -rf "$SECANTUS_HOME"
        log "mongo: 'python3 -m venv' failed (ensurepip missing?); installing python3-venv"
        apt_install python3-venv
        "$py" -m venv "$SECANTUS_HOME"
    fi
    log "mongo: pip install secantusdb==$SECANTUS_VERSION"
    local pip_log="$TOOLS_DIR/secantusdb-$SECANTUS_VERSION.install.log"
    if ! "$SECANTUS_HOME/bin/python" -m pip install --disable-pip-version-check -q \
        "secantusdb==$SECANTUS_VERSION" >"$pip_log" 2>&1; then
        log_tail "$pip_log" 40
        rm -rf "$SECANTUS_HOME"
        die "mongo: pip install secantusdb==$SECANTUS_VERSION failed; see $pip_log"
    fi
    secantus_installed || die "mongo: install finished but $SECANTUS_BIN is missing; see $pip_log"
    log "mongo: installed $SECANTUS_BIN"
}

main() {
    local servers server
    servers="$(servers_from_args "$@")"
    for server in $servers; do
        "install_$server"
    done
}

main "$@"
