#!/usr/bin/env bash
# make chaos / make chaos-ci: the chaos suite (src/bin/pis-chaos.rs) with its own broker.
#   full: 10,000 payments, 3 replicas with a SIGKILL every 20 s, bank faults, and the broker
#         SIGKILLed and restarted every 30 s on persistent storage (Tansu + sqlite); then the same
#         load with signable orphans (PSUs sign everything pending at the bank) on a memory
#         broker. Release build. Each part gives its consents with one more SIGKILL while the
#         consent calls are in flight (--kill-during-consents).
#   ci:   400 payments, 2 replicas, a SIGKILL every 12 s, bank faults, and the dedicated API down
#         for 8 s every 30 s with the workers' fallback switch-over on (2 s); then 200 with signable
#         orphans and retention acting (5 s / 30 s horizons); memory storage, debug build
#         (already built by the tests).
# Both under the workers' default policy for lost answers (hold); a "person" resolves them. Both
# with --consents: before the load half of the PSUs give CAF and AIS consents at the sandbox,
# some debtor accounts get a low balance, payments name their debtor account and some ask for a
# funds check; the checker also checks consents, refusals for funds and settlement evidence.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
[[ -x "$HOME/.cargo/bin/cargo" ]] && export PATH="$HOME/.cargo/bin:$PATH"
mode="${1:-ci}"
scripts/prereqs.sh
case "$mode" in
  full)
    cargo build --locked --release --bins
    scripts/broker.sh install persistent
    target/release/pis-chaos --persistent --broker-restart-every-secs 30 \
      --payments "${CHAOS_PAYMENTS:-10000}" --psus 500 --partitions 6 --workers 3 \
      --kill-every-secs 20 --consents --kill-during-consents --timeout-secs 1800 \
      --run-dir .run/chaos
    exec env PIS_SNAPSHOT_INTERVAL_SECS=5 PIS_SNAPSHOT_MIN_RECORDS=500 \
      target/release/pis-chaos --orphans-signable \
      --payments "${CHAOS_PAYMENTS:-10000}" --psus 500 --partitions 6 --workers 3 \
      --kill-every-secs 20 --consents --kill-during-consents --timeout-secs 1800 \
      --run-dir .run/chaos-signable
    ;;
  ci)
    cargo build --locked --bins
    # Snapshots every few seconds: restores after the SIGKILLs start at a snapshot.
    export PIS_SNAPSHOT_INTERVAL_SECS=3 PIS_SNAPSHOT_MIN_RECORDS=100
    target/debug/pis-chaos --payments "${CHAOS_PAYMENTS:-400}" --psus 60 --partitions 4 \
      --workers 2 --kill-every-secs 12 --timeout-secs 600 --bank-sca-expiry-secs 45 \
      --fallback-after-secs 2 --dedicated-outage-every-secs 30 --dedicated-outage-secs 8 \
      --consents --run-dir .run/chaos-ci
    # Retention acts during this run (final payments retired after 5 s, ids forgotten after
    # 30 s), so retired records go through restores after SIGKILLs.
    exec env PIS_RETENTION_SECS=5 PIS_RETIRED_IDS_RETENTION_SECS=30 \
      target/debug/pis-chaos --orphans-signable --payments "${CHAOS_PAYMENTS_SIGNABLE:-200}" \
      --psus 40 --partitions 4 --workers 2 --kill-every-secs 12 --timeout-secs 600 \
      --bank-sca-expiry-secs 45 --consents --run-dir .run/chaos-ci-signable
    ;;
  *) echo "usage: $0 full|ci" >&2; exit 2 ;;
esac
