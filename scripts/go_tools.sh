# shellcheck shell=bash disable=SC2034 # variables are used by the sourcing scripts
# Test tools built from the Go module proxy with `go install`, each into
# $TOOLS_DIR/<name>-<version>/bin and reused while that version is there:
#
#   toxiproxy  Shopify's fault proxy (network partitions, slow links, resets) for the fault tests
#   helm       the Kubernetes package manager: `helm lint` / `helm template` of deploy/helm/dualsync
#   ferretdb   FerretDB, a second, independent MongoDB-wire server (SQLite backend) that the
#              MongoDB sink tests run against besides SecantusDB; scripts/ferretdb.sh builds it
#              (with `go build`: `go install` of it makes a program that cannot start)
#   jaeger     Jaeger v1 all-in-one (in-memory, OTLP HTTP in, query API out) for tests/it/traces.rs
#
# Source it after lib.sh; `install_go_tool toxiproxy` installs one, `go_tool_bin toxiproxy`
# prints the path of its program. Also `install_docker_compose` (Debian's package, for the
# compose file's test; not a Go tool, but a test tool installed the same way, when missing).

TOXIPROXY_VERSION=2.5.0
HELM_VERSION=4.3.2
FERRETDB_VERSION=1.24.2
JAEGER_VERSION=1.75.0

# NAME -> "module@version program-name"
go_tool_spec() {
    case "$1" in
        toxiproxy) echo "github.com/Shopify/toxiproxy/v2/cmd/server@v$TOXIPROXY_VERSION toxiproxy-server" ;;
        helm) echo "helm.sh/helm/v4/cmd/helm@v$HELM_VERSION helm" ;;
        ferretdb) echo "github.com/FerretDB/FerretDB/cmd/ferretdb@v$FERRETDB_VERSION ferretdb" ;;
        jaeger) echo "github.com/jaegertracing/jaeger/cmd/jaeger@v$JAEGER_VERSION jaeger" ;;
        *) die "no Go tool named '$1'" ;;
    esac
}

go_tool_home() {
    local spec module version
    spec="$(go_tool_spec "$1")"
    module="${spec%% *}"
    version="${module##*@v}"
    echo "$TOOLS_DIR/$1-$version"
}

go_tool_bin() {
    local spec
    spec="$(go_tool_spec "$1")"
    echo "$(go_tool_home "$1")/bin/${spec##* }"
}

# go_install_in DIR MODULE@VERSION: `go install` into DIR. A module whose go.mod has `replace`
# directives (Jaeger's) refuses `go install m@v`; it is built as a tool of a throw-away module
# instead (`go get -tool`, then `go install` there), which ignores those replaces as any
# dependent would.
go_install_in() {
    local dir="$1" module="$2"
    if GOBIN="$dir" GOFLAGS=-mod=mod go install "$module"; then
        return 0
    fi
    mkdir -p "$dir/mod"
    (
        cd "$dir/mod" &&
            go mod init dualsync-tools.invalid/build &&
            go get -tool "$module" &&
            GOBIN="$dir" GOFLAGS=-mod=mod go install "${module%@*}"
    )
}

install_go_tool() {
    local name="$1" spec module program home bin tmp
    spec="$(go_tool_spec "$name")"
    module="${spec%% *}"
    program="${spec##* }"
    home="$(go_tool_home "$name")"
    bin="$home/bin/$program"
    if [[ -x "$bin" ]]; then
        log "$name: already installed ($bin)"
        return 0
    fi
    command -v go >/dev/null 2>&1 || die "$name: the Go toolchain is needed to build $module (go install); install Go 1.22 or newer"
    log "$name: go install $module (into $home)"
    tmp="$(mktemp -d)"
    if ! go_install_in "$tmp" "$module" >"$tmp/install.log" 2>&1; then
        log_tail "$tmp/install.log" 40
        rm -rf "$tmp"
        die "$name: go install $module failed"
    fi
    mkdir -p "$home/bin"
    # `go install` names the program after the module path's last element (often `server`).
    mv -f "$tmp/$(basename "${module%@*}")" "$bin"
    rm -rf "$tmp"
    log "$name: installed $bin"
}

# Debian's docker-compose (1.29.2 on bookworm) for tests/it/compose.rs: `docker-compose config`
# validates docker-compose.yml without a Docker engine. Without its recommended docker.io.
install_docker_compose() {
    if command -v docker-compose >/dev/null 2>&1; then
        log "docker-compose: already installed ($(docker-compose version --short 2>/dev/null || echo '?'))"
        return 0
    fi
    command -v apt-get >/dev/null 2>&1 || die "docker-compose: apt-get not found; install docker-compose (1.29 or newer) by hand"
    log "docker-compose: apt-get install -y --no-install-recommends docker-compose"
    run_as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null
    run_as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends docker-compose >/dev/null \
        || die "docker-compose: apt-get install failed"
    log "docker-compose: installed $(docker-compose version --short 2>/dev/null || echo '?')"
}
