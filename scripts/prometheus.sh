#!/usr/bin/env bash
# Optional local Prometheus (Debian package `prometheus`, which also brings promtool) that
# scrapes the local relay and apply processes and evaluates deploy/prometheus/dualsync-alerts.yml.
#
#   scripts/prometheus.sh install | up | down | status | test-rules
#
# Source it for the functions install_prometheus / up_prometheus / down_prometheus /
# status_prometheus / test_prometheus_rules (scripts/up.sh and scripts/test.sh do).
#
# Environment knobs (all optional):
#   DUALSYNC_PROMETHEUS_PORT     web UI and API on 127.0.0.1 (default: 19090; never the
#                                package's 9090)
#   DUALSYNC_PROMETHEUS_TARGETS  relay/apply endpoints to scrape, space-separated
#                                (default: 127.0.0.1:9464 127.0.0.1:9465 127.0.0.1:9466,
#                                the ports of `make demo`)
# Data and the generated prometheus.yml live in $STATE_DIR/prometheus, the log in
# $LOG_DIR/prometheus.log.

# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PROMETHEUS_PORT="${DUALSYNC_PROMETHEUS_PORT:-19090}"
PROMETHEUS_TARGETS="${DUALSYNC_PROMETHEUS_TARGETS:-$BIND_HOST:9464 $BIND_HOST:9465 $BIND_HOST:9466}"
PROMETHEUS_DIR="$STATE_DIR/prometheus"
PROMETHEUS_RULES="$REPO_ROOT/deploy/prometheus/dualsync-alerts.yml"
PROMETHEUS_RULE_TESTS="$REPO_ROOT/deploy/prometheus/dualsync-alerts.test.yml"

prometheus_url() { echo "http://$BIND_HOST:$PROMETHEUS_PORT"; }

# Installs the Debian package when prometheus or promtool is missing. The package's own
# service (port 9090) is kept from starting: a policy-rc.d that denies service starts is put
# in place for the install when none exists (Debian's documented mechanism), then removed.
install_prometheus() {
    if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
        log "prometheus: already installed ($(prometheus --version 2>&1 | head -n1))"
        return 0
    fi
    command -v apt-get >/dev/null 2>&1 || die "prometheus: apt-get not found; install Prometheus and promtool by hand"
    local sudo=()
    if [[ "$(id -u)" -ne 0 ]]; then
        command -v sudo >/dev/null 2>&1 || die "prometheus: need root (or sudo) to install the Debian package 'prometheus'"
        sudo=(sudo)
    fi
    local policy=/usr/sbin/policy-rc.d added=0
    if [[ ! -e "$policy" ]]; then
        printf '#!/bin/sh\n# dualsync scripts/prometheus.sh: no service starts during the install\nexit 101\n' |
            "${sudo[@]}" tee "$policy" >/dev/null
        "${sudo[@]}" chmod 0755 "$policy"
        added=1
    fi
    log "prometheus: apt-get install -y --no-install-recommends prometheus (its system service is not started)"
    local rc=0
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q || rc=$?
    if ((rc == 0)); then
        "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus || rc=$?
    fi
    if ((added)); then "${sudo[@]}" rm -f "$policy"; fi
    ((rc == 0)) || die "prometheus: apt-get failed (exit $rc)"
    command -v promtool >/dev/null 2>&1 || die "prometheus: package installed but promtool is missing"
    log "prometheus: installed $(prometheus --version 2>&1 | head -n1)"
}

prometheus_pid() {
    local pid
    pid="$(read_pid prometheus)"
    [[ -n "$pid" ]] && pid_alive "$pid" prometheus && echo "$pid"
}

# (Re)writes the scrape configuration: job dualsync-relay for the first target, dualsync-apply
# for the rest (the alert DualsyncProcessDown expects `dualsync-*` job names).
write_prometheus_config() {
    mkdir -p "$PROMETHEUS_DIR"
    local first rest t
    read -r first rest <<<"$PROMETHEUS_TARGETS"
    {
        echo "# Managed by scripts/prometheus.sh; rewritten on every start."
        echo "global:"
        echo "  scrape_interval: 5s"
        echo "  evaluation_interval: 5s"
        echo "rule_files:"
        echo "  - $PROMETHEUS_RULES"
        echo "scrape_configs:"
        echo "  - job_name: dualsync-relay"
        echo "    static_configs:"
        echo "      - targets: ['$first']"
        if [[ -n "$rest" ]]; then
            echo "  - job_name: dualsync-apply"
            echo "    static_configs:"
            echo "      - targets:"
            for t in $rest; do echo "          - '$t'"; done
        fi
    } >"$PROMETHEUS_DIR/prometheus.yml"
    promtool check config "$PROMETHEUS_DIR/prometheus.yml" >/dev/null ||
        die "prometheus: promtool rejects $PROMETHEUS_DIR/prometheus.yml"
}

up_prometheus() {
    local pid logf pidf
    logf="$(log_file prometheus)"
    pidf="$(pid_file prometheus)"
    ensure_state_dirs
    if pid="$(prometheus_pid)"; then
        log "prometheus: already running (pid $pid) at $(prometheus_url)"
        return 0
    fi
    command -v prometheus >/dev/null 2>&1 || die "prometheus: not installed (run scripts/prometheus.sh install)"
    ensure_port_free prometheus "$PROMETHEUS_PORT"
    write_prometheus_config
    log "prometheus: starting (scraping $PROMETHEUS_TARGETS, data $PROMETHEUS_DIR/data, log $logf)"
    spawn_detached "$logf" "$pidf" "$PROMETHEUS_DIR" \
        prometheus --config.file="$PROMETHEUS_DIR/prometheus.yml" \
        --storage.tsdb.path="$PROMETHEUS_DIR/data" \
        --web.listen-address="$BIND_HOST:$PROMETHEUS_PORT"
    pid="$(read_pid prometheus)"
    wait_for_port prometheus "$PROMETHEUS_PORT" "$logf" "$pid"
    if ! wait_until "prometheus /-/ready on $BIND_HOST:$PROMETHEUS_PORT" "$START_TIMEOUT" \
        curl -fsS "$(prometheus_url)/-/ready"; then
        log_tail "$logf"
        die "prometheus: not ready; see $logf"
    fi
    log "prometheus: ready, pid $pid, $(prometheus_url) (alert rules: $PROMETHEUS_RULES)"
}

down_prometheus() {
    local pid
    if ! pid="$(prometheus_pid)"; then
        log "prometheus: not running"
        rm -f "$(pid_file prometheus)"
        return 0
    fi
    log "prometheus: stopping (pid $pid)"
    stop_pid prometheus "$pid" 20
    rm -f "$(pid_file prometheus)"
    log "prometheus: stopped"
}

status_prometheus() {
    local pid
    if pid="$(prometheus_pid)"; then
        printf '%-10s %-8s pid %-8s %s\n' prometheus running "$pid" "$(prometheus_url)"
    else
        printf '%-10s %-8s pid %-8s %s\n' prometheus stopped - "$(prometheus_url)"
        return 3
    fi
}

# promtool check + unit tests of the alert rules.
test_prometheus_rules() {
    command -v promtool >/dev/null 2>&1 || die "promtool: not installed (run scripts/prometheus.sh install)"
    promtool check rules "$PROMETHEUS_RULES"
    promtool test rules "$PROMETHEUS_RULE_TESTS"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    set -euo pipefail
    case "${1:-}" in
        install) install_prometheus ;;
        up) install_prometheus && up_prometheus ;;
        down) down_prometheus ;;
        status) status_prometheus ;;
        test-rules) test_prometheus_rules ;;
        *) die "usage: $(basename "$0") install|up|down|status|test-rules" ;;
    esac
fi
