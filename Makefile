# pis-worker: every entry point a developer or CI needs. Each target installs what it lacks.
SHELL := /bin/bash
.DEFAULT_GOAL := help
CARGO ?= cargo

.PHONY: help build test lint demo bench soak chaos chaos-ci alerts-test alerts-e2e helm-test broker-install clean

help: ## List the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

build: ## Build the pis-worker binary
	@scripts/prereqs.sh
	$(CARGO) build --locked

test: ## Install what is missing, lint, run unit + integration tests on a real broker
	@scripts/test.sh

lint: ## cargo fmt --check and clippy -D warnings
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets --locked -- -D warnings

demo: ## Broker + Belfius sandbox + worker; payments move through their states
	@scripts/demo.sh

bench: ## Benchmarks: hot-path CPU per step, end-to-end throughput/latency with 1 and 2 replicas
	@scripts/bench.sh

soak: ## Soak: 1,000,000 payments at 400/s, RSS and restore time sampled, PNG plot (SOAK_* to change)
	@scripts/soak.sh

chaos: ## Full chaos run: 10,000 payments, 3 replicas, SIGKILLs, bank faults, broker restarts (persistent)
	@scripts/chaos.sh full

chaos-ci: ## Reduced chaos run (a few minutes), also part of make test
	@scripts/chaos.sh ci

alerts-test: ## promtool check + unit tests of the alert rules (also part of make test)
	@scripts/alerts-test.sh

alerts-e2e: ## Real Prometheus scrapes a worker; a failing bank makes the alert fire
	@scripts/alerts-e2e.sh

helm-test: ## helm lint, helm template (default + full values), schema validation (also in make test)
	@scripts/helm-test.sh

broker-install: ## Install the Tansu broker into .tools/
	@scripts/broker.sh install

clean: ## Remove build output, tools and run state
	rm -rf target .tools .run
