#!/usr/bin/env bash
# make soak (not part of make test): src/bin/pis-soak.rs with its own broker, release build.
# Payments at a steady rate through one worker with short retention horizons, until every one
# settled (each exactly once, or the run fails); the worker's RSS and payment gauges sampled every
# few seconds, the worker restarted every few minutes to measure its restore. Then a PNG of RSS
# and restore time over the run (scripts/plot_soak.py, matplotlib in a venv under .tools/).
#
# Defaults: 1,000,000 payments at 400/s (about 42 min of publishing; 1,000/s did not keep up on
# a 2-core machine that also runs the broker and the sandbox), retention 60 s, retired
# ids 180 s, a restart every 180 s. Environment:
#   SOAK_PAYMENTS, SOAK_RATE, SOAK_WORKERS, SOAK_PARTITIONS, SOAK_RETENTION_SECS,
#   SOAK_RETIRED_IDS_RETENTION_SECS, SOAK_RESTART_EVERY_SECS (0: never), SOAK_SAMPLE_EVERY_SECS,
#   SOAK_SANDBOX_FORGET_AFTER_SECS, SOAK_LINGER_SECS, SOAK_RUN_DIR (default .run/soak);
#   SOAK_PLOT=0 skips the plot; SOAK_PUBLISH=1 copies the PNG to docs/soak-rss.png.
# Output: $SOAK_RUN_DIR/soak.csv, soak-rss.png, worker logs.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
[[ -x "$HOME/.cargo/bin/cargo" ]] && export PATH="$HOME/.cargo/bin:$PATH"
scripts/prereqs.sh
cargo build --locked --release --bins

run_dir="${SOAK_RUN_DIR:-.run/soak}"
mkdir -p "$(dirname "$run_dir")"
target/release/pis-soak \
  --payments "${SOAK_PAYMENTS:-1000000}" \
  --rate "${SOAK_RATE:-400}" \
  --workers "${SOAK_WORKERS:-1}" \
  --partitions "${SOAK_PARTITIONS:-6}" \
  --retention-secs "${SOAK_RETENTION_SECS:-60}" \
  --retired-ids-retention-secs "${SOAK_RETIRED_IDS_RETENTION_SECS:-180}" \
  --restart-every-secs "${SOAK_RESTART_EVERY_SECS:-180}" \
  --sample-every-secs "${SOAK_SAMPLE_EVERY_SECS:-5}" \
  --sandbox-forget-after-secs "${SOAK_SANDBOX_FORGET_AFTER_SECS:-120}" \
  --linger-secs "${SOAK_LINGER_SECS:-0}" \
  --expect-retired \
  --run-dir "$run_dir" | tee "$run_dir.log"

[[ "${SOAK_PLOT:-1}" == 0 ]] && exit 0
# matplotlib into a venv of its own, once.
venv=.tools/plot-venv
MATPLOTLIB="matplotlib==3.10.*"
if ! "$venv/bin/python" -c 'import matplotlib' >/dev/null 2>&1; then
  if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
    SUDO=""; [[ $(id -u) -eq 0 ]] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-venv >/dev/null
  fi
  echo "soak: installing $MATPLOTLIB into $venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$MATPLOTLIB"
fi
"$venv/bin/python" scripts/plot_soak.py "$run_dir/soak.csv" "$run_dir/soak-rss.png"
if [[ "${SOAK_PUBLISH:-0}" == 1 ]]; then
  cp "$run_dir/soak-rss.png" docs/soak-rss.png
  echo "soak: plot published to docs/soak-rss.png"
fi
