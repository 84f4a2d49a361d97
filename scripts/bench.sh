#!/usr/bin/env bash
# make bench: performance, measured (never asserted in tests). Release build.
#   1. benches/hot_path.rs: CPU per call of each pure step on the hot path (no I/O).
#   2. src/bin/pis-bench.rs: payments end to end through real worker processes, a real broker
#      and the sandbox over mTLS; throughput, latency, and CPU per payment of each process.
#      Every measured payment must end SETTLED exactly once, or the run fails.
#      a. throughput: commands published as fast as possible, with 1 and with 2 replicas;
#      b. latency: commands published at BENCH_RATE/s (default 1000, below saturation).
# BENCH_PAYMENTS (default 30000; the latency run takes a third), BENCH_WORKERS (default 1,2) and
# BENCH_RATE change the runs.
# Results are also written to .run/bench-results.md.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
[[ -x "$HOME/.cargo/bin/cargo" ]] && export PATH="$HOME/.cargo/bin:$PATH"
scripts/prereqs.sh
cargo build --locked --release --bins
mkdir -p .run
out=.run/bench-results.md
{
  echo "# make bench, $(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo
  echo "## Hot path (cargo bench --bench hot_path)"
  echo
  cargo bench --locked --bench hot_path
  echo
  echo "## End to end, throughput (pis-bench)"
  echo
  payments="${BENCH_PAYMENTS:-30000}"
  target/release/pis-bench --payments "$payments" --workers "${BENCH_WORKERS:-1,2}" \
    --run-dir .run/bench
  echo
  echo "## End to end, latency at ${BENCH_RATE:-1000} commands/s (pis-bench --rate)"
  echo
  target/release/pis-bench --payments "$((payments / 3))" --workers 1 \
    --rate "${BENCH_RATE:-1000}" --run-dir .run/bench
} | tee "$out.partial"
mv "$out.partial" "$out"
echo "bench: results in $out"
