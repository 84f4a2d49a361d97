#!/usr/bin/env bash
# make chaos / make chaos-ci: the chaos suite (src/bin/pis-chaos.rs) with its own broker.
#   full: 10,000 payments, 3 replicas, a SIGKILL every 20 s, bank faults; then 1,000 payments
#         with the broker SIGKILLed and restarted every 45 s (persistent storage). Release build.
#   ci:   400 payments, 2 replicas, a SIGKILL every 8 s, bank faults; memory storage, debug
#         build (already built by the tests).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
[[ -x "$HOME/.cargo/bin/cargo" ]] && export PATH="$HOME/.cargo/bin:$PATH"
mode="${1:-ci}"
scripts/prereqs.sh
case "$mode" in
  full)
    cargo build --locked --release --bins
    # 1. Load: 10,000 payments, 3 replicas SIGKILLed and replaced, bank faults.
    target/release/pis-chaos --payments "${CHAOS_PAYMENTS:-10000}" --psus 500 --partitions 6 \
      --workers 3 --kill-every-secs 20 --timeout-secs 3000 --run-dir .run/chaos
    # 2. Broker restarts (SIGKILL + restart on persistent storage) under the same faults.
    #    At 1,000 payments: the test broker (Tansu built with sqlite) stops answering metadata
    #    requests under heavier restart load (docs/broker.md).
    scripts/broker.sh install persistent
    exec target/release/pis-chaos --persistent --broker-restart-every-secs 45 \
      --payments "${CHAOS_RESTART_PAYMENTS:-1000}" --psus 100 --partitions 6 --workers 3 \
      --kill-every-secs 20 --timeout-secs 1500 --run-dir .run/chaos-restarts
    ;;
  ci)
    cargo build --locked --bins
    exec target/debug/pis-chaos --payments "${CHAOS_PAYMENTS:-400}" --psus 60 --partitions 4 \
      --workers 2 --kill-every-secs 8 --timeout-secs 600 --run-dir .run/chaos-ci
    ;;
  *) echo "usage: $0 full|ci" >&2; exit 2 ;;
esac
