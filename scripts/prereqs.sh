#!/usr/bin/env bash
# Installs what building and testing pis-worker needs and is missing. Idempotent, no prompts.
set -euo pipefail

need_apt=()
for pkg in build-essential pkg-config libssl-dev zlib1g-dev python3 python3-pip curl; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need_apt+=("$pkg")
done
if ((${#need_apt[@]})); then
  echo "prereqs: installing ${need_apt[*]}"
  SUDO=""; [[ $(id -u) -eq 0 ]] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null; then
  [[ -x "$HOME/.cargo/bin/cargo" ]] && export PATH="$HOME/.cargo/bin:$PATH"
fi
command -v cargo >/dev/null || { echo "prereqs: cargo (Rust 1.85+) is required and was not found" >&2; exit 1; }
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt >/dev/null 2>&1 || true
"$(dirname "$0")/broker.sh" install >/dev/null
# An independent Avro implementation for the interop tests.
python3 -c "import fastavro" 2>/dev/null || python3 -m pip install --quiet --disable-pip-version-check fastavro >/dev/null
