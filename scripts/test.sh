#!/usr/bin/env bash
# make test: prerequisites, lint, then unit and integration tests against a real Tansu broker
# started here on a free port (and stopped on exit).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
[[ -x "$HOME/.cargo/bin/cargo" ]] && export PATH="$HOME/.cargo/bin:$PATH"
scripts/prereqs.sh

echo "== lint"
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings

RUN_DIR="$(mktemp -d "${TMPDIR:-/tmp}/pis-test.XXXXXX")"
PORT="$(scripts/free-port.sh)"
cleanup() { scripts/broker.sh stop "$RUN_DIR" >/dev/null 2>&1; rm -rf "$RUN_DIR"; }
trap cleanup EXIT
scripts/broker.sh start "$PORT" "$RUN_DIR"
export PIS_TEST_BROKERS="127.0.0.1:$PORT"

echo "== tests (broker $PIS_TEST_BROKERS)"
cargo test --locked --all-targets -- --test-threads "${PIS_TEST_THREADS:-2}" 2>&1 | tee "$RUN_DIR/cargo-test.log"

echo "== chaos (reduced): SIGKILLed replicas and bank faults, checked end to end"
scripts/chaos.sh ci

echo "== benchmark harness, smoke run: 1 and 2 replicas, every payment must settle exactly once"
echo "   (a debug build on a shared machine: these figures are not benchmarks; make bench is)"
target/debug/pis-bench --brokers "$PIS_TEST_BROKERS" --payments 300 --warmup 20 --workers 1,2 \
  --run-dir "$RUN_DIR/bench-smoke"

echo "== soak harness, short run: 3,000 payments at 500/s, horizons 5 s / 15 s, one restart"
echo "   (make soak is the real one: a million payments)"
target/debug/pis-soak --brokers "$PIS_TEST_BROKERS" --payments 3000 --rate 500 --partitions 4 \
  --retention-secs 5 --retired-ids-retention-secs 15 --sandbox-forget-after-secs 5 \
  --restart-every-secs 4 --max-restarts 1 --sample-every-secs 1 --linger-secs 8 --expect-retired \
  --run-dir "$RUN_DIR/soak-smoke"

echo "== alert rules (promtool check + unit tests)"
scripts/alerts-test.sh

echo "== helm chart (lint, render, schema validation)"
scripts/helm-test.sh

# One closing line for the whole run (pipefail above already failed the run on any failure).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed;?$/) p += $(i-1); if ($i ~ /^failed;?$/) f += $(i-1) } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$RUN_DIR/cargo-test.log"
