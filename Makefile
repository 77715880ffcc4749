# dualsync developer tasks. `make` (or `make help`) lists them.
#
# Local servers (no Docker needed) are managed by scripts/*.sh; pass
# SERVERS="postgres mongo" to install/up/down/status to limit them.

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-print-directory

SERVERS ?= all
# Pipeline file for the dlq-* targets (connectors/demo.toml points at the local servers).
CONFIG ?= connectors/demo.toml
DUALSYNC := cargo run --quiet --locked --
STATE_DIR := $(or $(DUALSYNC_STATE_DIR),.local)
COMPOSE ?= docker compose

.PHONY: help install up down status demo test lint fmt bench compose-up compose-down clean-state dlq-list dlq-show dlq-replay chaos

help: ## Show this help
	@echo "Usage: make <target> [SERVERS=\"postgres kafka mongo registry\"]"
	@echo "  (SERVERS=prometheus: the optional Prometheus with dualsync's alert rules, docs/operations.md)"
	@echo "  (SERVERS=ferretdb: the optional FerretDB, the second MongoDB-wire server make test uses)"
	@echo
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | \
		awk 'BEGIN {FS = ":.*## "}; {printf "  %-14s %s\n", $$1, $$2}'

install: ## Install missing local servers (PostgreSQL, Apache Kafka, SecantusDB Mongo, Apicurio registry)
	bash scripts/install.sh $(SERVERS)

up: ## Start local servers (installs what is missing) and write .local/env; SERVERS="all prometheus" adds Prometheus on 127.0.0.1:19090
	bash scripts/up.sh $(SERVERS)

down: ## Stop local servers
	bash scripts/down.sh $(SERVERS)

status: ## Show whether each local server runs, its pid and address
	@bash scripts/status.sh $(SERVERS) || true

demo: ## Run the end-to-end demo (outbox -> Kafka -> PostgreSQL + MongoDB)
	bash scripts/demo.sh

test: ## Run the test suite (starts local servers as needed)
	bash scripts/test.sh

lint: ## Check formatting and clippy warnings
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings

fmt: ## Format the Rust code
	cargo fmt

bench: ## Run the benchmarks (dualsync alone, then beside Debezium); BENCH_PROFILE=production: 3 brokers, RF 3, rate sweep (docs/benchmarks-method.md)
	bash scripts/bench.sh

chaos: ## Fault-injection schedules (CHAOS_RUNS=20 CHAOS_FAULTS=12); report in docs/chaos-report.md
	bash scripts/chaos.sh

dlq-list: ## List dead-letter topics with counts by error class (CONFIG=...)
	$(DUALSYNC) dlq list --config $(CONFIG)

dlq-show: ## Show dead letters (TOPIC=..., ARGS="--class decode --key o1 --limit 20")
	$(DUALSYNC) dlq show --config $(CONFIG) $(if $(TOPIC),--topic $(TOPIC)) $(ARGS)

dlq-replay: ## Dry run of a replay; add CONFIRM=1 to send (TOPIC=... required, ARGS=filters)
	@test -n "$(TOPIC)" || { echo "usage: make dlq-replay TOPIC=<dead-letter topic> [ARGS=...] [CONFIRM=1]"; exit 2; }
	$(DUALSYNC) dlq replay --config $(CONFIG) --topic $(TOPIC) $(if $(CONFIRM),,--dry-run) $(ARGS)

compose-up: ## Start the full stack with Docker Compose (needs a Docker engine)
	$(COMPOSE) up -d --build

compose-down: ## Stop the Docker Compose stack and delete its volumes
	$(COMPOSE) down -v

clean-state: ## Stop local servers and delete all local state (.local)
	bash scripts/down.sh all prometheus ferretdb
	@# up.sh leaves a symlink when the data dir had to live outside the repo.
	@if [ -L "$(STATE_DIR)/pg" ]; then target="$$(readlink "$(STATE_DIR)/pg")"; \
		echo "rm -rf $${target%/pg}"; rm -rf "$${target%/pg}"; fi
	rm -rf "$(STATE_DIR)"
