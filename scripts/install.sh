#!/usr/bin/env bash
# Install the local servers used by the tests and the demo, only what is
# missing. Idempotent; prints what it did.
#
#   scripts/install.sh [postgres|kafka|mongo|all]...   (default: all)
#
#   postgres  Debian's `postgresql` package (binaries only; the system
#             cluster is never used; scripts/up.sh runs its own cluster)
#   kafka     Tansu broker built with `cargo install` into
#             $TOOLS_DIR/tansu-<version> (10-40 minutes on 2 cores, once)
#   mongo     SecantusDB (MongoDB wire protocol) from PyPI in a venv at
#             $TOOLS_DIR/secantusdb-<version>
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

run_as_root() {
    if [[ "$(id -u)" -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root (or sudo) to run: $*"
    fi
}

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
tansu_installed() { [[ -x "$TANSU_BIN" ]] && "$TANSU_BIN" --version >/dev/null 2>&1; }

# pid of an already running `cargo install tansu` (ours or someone else's).
running_tansu_install() {
    pgrep -f 'cargo install tansu' 2>/dev/null | head -n1 || true
}

install_kafka() {
    if tansu_installed; then
        log "kafka: already installed ($TANSU_BIN, $("$TANSU_BIN" --version 2>/dev/null | head -n1))"
        return 0
    fi
    mkdir -p "$TOOLS_DIR"
    local lock="$TOOLS_DIR/.tansu-$TANSU_VERSION.lock"
    exec 9>"$lock"
    local other
    other="$(running_tansu_install)"
    if [[ -n "$other" ]]; then
        log "kafka: a 'cargo install tansu' is already running (pid $other); waiting for it instead of starting a second build"
    fi
    # Wait for a concurrent install: our own lock, or a foreign cargo process.
    local waited=0
    while true; do
        other="$(running_tansu_install)"
        if [[ -z "$other" ]] && flock -n 9; then
            break
        fi
        if ((waited % 120 == 0)); then
            log "kafka: still waiting for the running tansu build (${waited}s so far)..."
        fi
        sleep 10
        waited=$((waited + 10))
        if ((waited > 5400)); then
            die "kafka: gave up waiting for the other tansu build after ${waited}s"
        fi
    done
    if tansu_installed; then
        log "kafka: installed by the concurrent build ($TANSU_BIN)"
        return 0
    fi

    if ! command -v cargo >/dev/null 2>&1; then
        die "kafka: cargo not found (install Rust with rustup, or put ~/.cargo/bin on PATH)"
    fi
    # Native build dependencies: tansu's -sys crates (aws-lc, libsql,
    # zstd, lz4, bzip2, lzma, libgit2) build vendored C code with the `cc`
    # crate, so a C/C++ toolchain and pkg-config suffice (no cmake, protoc
    # or OpenSSL headers). Install what is missing.
    local need=()
    command -v cc >/dev/null 2>&1 && command -v c++ >/dev/null 2>&1 || need+=(build-essential)
    command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)
    if ((${#need[@]})); then
        apt_install "${need[@]}"
    fi

    local build_log="$TOOLS_DIR/tansu-$TANSU_VERSION.install.log"
    log "kafka: building Tansu $TANSU_VERSION with cargo install; this takes 10-40 minutes on 2 cores (once, cached in $TOOLS_DIR)"
    log "kafka: build log: $build_log"
    local cmd=(cargo install tansu --version "$TANSU_VERSION" --locked
        --features "$TANSU_FEATURES" --root "$TANSU_HOME")
    log "kafka: CARGO_TARGET_DIR=$TANSU_BUILD_DIR ${cmd[*]}"
    CARGO_TARGET_DIR="$TANSU_BUILD_DIR" "${cmd[@]}" >"$build_log" 2>&1 &
    local cargo_pid=$! elapsed=0
    while kill -0 "$cargo_pid" 2>/dev/null; do
        sleep 5
        elapsed=$((elapsed + 5))
        if ((elapsed % 60 == 0)); then
            log "kafka: still building (${elapsed}s): $(grep -E '^\s*(Compiling|Downloaded|Installing|Finished)' "$build_log" | tail -n1 | sed 's/^ *//')"
        fi
    done
    if ! wait "$cargo_pid"; then
        log_tail "$build_log" 60
        die "kafka: cargo install tansu failed; see $build_log"
    fi
    tansu_installed || die "kafka: build finished but $TANSU_BIN does not run; see $build_log"
    log "kafka: installed $TANSU_BIN in ${elapsed}s"
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
