#!/usr/bin/env bash
# make alerts-test (also part of make test): checks the Prometheus alerting rules and runs their
# unit tests with promtool. Idempotent.
#   1. installs promtool if it is missing (Debian package `prometheus`, which puts it at
#      /usr/bin/promtool) without leaving a Prometheus server running on port 9090;
#   2. promtool check rules helm/pis-worker/files/pis-worker.rules.yml   (syntax, PromQL, templates)
#   3. promtool test rules alerts/pis-worker.rules.test.yml               (every alert fires and stays
#      silent exactly as the test cases say, labels and annotations compared exactly)
# Exits non-zero if either fails. See docs/runbooks.md for the alerts themselves.
#   scripts/alerts-test.sh                 install if missing, check, test
#   scripts/alerts-test.sh --install-only  only make sure promtool and prometheus are installed
#                                          (scripts/alerts-e2e.sh uses this)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

RULES="helm/pis-worker/files/pis-worker.rules.yml"
TESTS="alerts/pis-worker.rules.test.yml"

die() { echo "alerts-test: $*" >&2; exit 1; }

# Stops a Prometheus server that the package's maintainer scripts may have started, and keeps it
# from starting at boot. Only the packaged service is touched (never a Prometheus started by hand,
# e.g. by scripts/alerts-e2e.sh): it is identified by the package's pid file or by the service manager.
stop_packaged_service() {
  if [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null; then
    systemctl stop prometheus.service >/dev/null 2>&1 || true
    systemctl disable prometheus.service >/dev/null 2>&1 || true
  fi
  if [[ -x /etc/init.d/prometheus ]]; then
    # The init script stops by its pid file (/run/prometheus/prometheus.pid) and user prometheus only.
    [[ -f /run/prometheus/prometheus.pid ]] && { /etc/init.d/prometheus stop >/dev/null 2>&1 || true; }
    command -v update-rc.d >/dev/null && { update-rc.d prometheus disable >/dev/null 2>&1 || true; }
  fi
  # The init script's pid file, in case stopping through it did not work.
  local pidfile pid
  for pidfile in /run/prometheus.pid /var/run/prometheus.pid /run/prometheus/prometheus.pid; do
    [[ -f "$pidfile" ]] || continue
    pid="$(cat "$pidfile" 2>/dev/null || true)"
    if [[ "$pid" =~ ^[0-9]+$ ]] && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q '^/usr/bin/prometheus'; then
      kill "$pid" 2>/dev/null || true
    fi
  done
}

install_promtool() {
  [[ $(id -u) -eq 0 ]] || die "promtool is missing and installing it needs root (apt-get install prometheus)"
  echo "alerts-test: installing promtool (Debian package prometheus)"
  # Keep the package's maintainer scripts from starting the server: invoke-rc.d obeys
  # /usr/sbin/policy-rc.d (exit 101 = action forbidden). Put one in place only for this install
  # if the machine has none (Docker images usually do).
  local own_policy=""
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    own_policy=1
  fi
  # Waits for the dpkg lock (another install running) instead of failing at once.
  local apt_opts=(-y -qq --no-install-recommends -o DPkg::Lock::Timeout=300
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
  local ok=0
  if DEBIAN_FRONTEND=noninteractive apt-get install "${apt_opts[@]}" prometheus >/dev/null 2>&1; then
    ok=1
  else
    apt-get update -qq -o DPkg::Lock::Timeout=300 >/dev/null || true
    DEBIAN_FRONTEND=noninteractive apt-get install "${apt_opts[@]}" prometheus >/dev/null && ok=1
  fi
  [[ -n "$own_policy" ]] && rm -f /usr/sbin/policy-rc.d
  stop_packaged_service
  ((ok)) || die "apt-get install prometheus failed"
  [[ -x /usr/bin/promtool ]] || die "the prometheus package did not install /usr/bin/promtool"
}

PROMTOOL="$(command -v promtool || true)"
if [[ -z "$PROMTOOL" || ( "${1:-}" == "--install-only" && ! -x /usr/bin/prometheus ) ]]; then
  install_promtool
  PROMTOOL=/usr/bin/promtool
fi
# Whatever installed it: no packaged server may hold port 9090 (the e2e and developers use their own).
if pgrep -x prometheus >/dev/null 2>&1; then stop_packaged_service; fi
echo "alerts-test: $("$PROMTOOL" --version 2>&1 | head -n1)"
[[ "${1:-}" == "--install-only" ]] && exit 0

[[ -f "$RULES" ]] || die "missing $RULES"
[[ -f "$TESTS" ]] || die "missing $TESTS"

echo "== promtool check rules $RULES"
"$PROMTOOL" check rules "$RULES" || die "promtool check rules failed"

echo "== promtool test rules $TESTS"
"$PROMTOOL" test rules "$TESTS" || die "promtool test rules failed"

# A summary: how many rules were checked and how many test cases passed; also fails if an alert
# lacks a firing or a silent test case. Needs PyYAML (python3-yaml); without it, a short summary.
if ! python3 -c 'import yaml' 2>/dev/null; then
  echo "alerts-test: OK: $(grep -c '^ *- alert:' "$RULES") alerts checked, $(grep -c '^ *- eval_time:' "$TESTS") alert checks passed (install python3-yaml for the coverage check)"
  exit 0
fi
python3 - "$RULES" "$TESTS" <<'PY'
import sys, yaml
rules = yaml.safe_load(open(sys.argv[1]))
tests = yaml.safe_load(open(sys.argv[2]))
alerts = sorted({r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r})
records = [r for g in rules["groups"] for r in g["rules"] if "record" in r]
cases = [c for t in tests["tests"] for c in t.get("alert_rule_test", [])]
firing = [c for c in cases if c.get("exp_alerts")]
silent = [c for c in cases if not c.get("exp_alerts")]
promql = sum(len(t.get("promql_expr_test", [])) for t in tests["tests"])
tested_fire = {c["alertname"] for c in firing}
tested_silent = {c["alertname"] for c in silent}
missing = [a for a in alerts if a not in tested_fire or a not in tested_silent]
problems = []
if missing:
    problems.append("alerts without both a firing and a silent test case: " + ", ".join(missing))
# Every alert: severity, summary, description, and a runbook_url whose anchor is a section of
# docs/runbooks.md named after the alert; the runbook's threshold table gives the same `for:`.
import re
runbook = open("docs/runbooks.md").read()
sections = {h.strip().lower() for h in re.findall(r"^## (.+)$", runbook, re.M)}
table = {(m[0], m[1]): m[2] for m in re.findall(r"^\| \[(\w+)\]\(#\w+\) \| (\w+) \|.*\| (\w+) \|$", runbook, re.M)}
for g in rules["groups"]:
    for r in g["rules"]:
        if "alert" not in r:
            continue
        name, sev = r["alert"], r.get("labels", {}).get("severity")
        notes = r.get("annotations", {})
        if sev not in ("critical", "warning"):
            problems.append(f"{name}: severity must be critical or warning, got {sev!r}")
        for key in ("summary", "description", "runbook_url"):
            if not notes.get(key):
                problems.append(f"{name}: no {key} annotation")
        anchor = notes.get("runbook_url", "").rpartition("#")[2]
        if anchor != name.lower():
            problems.append(f"{name}: runbook_url anchor #{anchor}, expected #{name.lower()}")
        if name.lower() not in sections:
            problems.append(f"{name}: docs/runbooks.md has no section '## {name}'")
        if table.get((name, sev)) != r.get("for", "0s"):
            problems.append(f"{name} ({sev}): for {r.get('for')} but docs/runbooks.md's table says {table.get((name, sev))}")
if problems:
    for p in problems:
        print("alerts-test: " + p, file=sys.stderr)
    sys.exit(1)
alert_rules = sum(1 for g in rules["groups"] for r in g["rules"] if "alert" in r)
print(f"alerts-test: OK: {alert_rules} alerting rules ({len(alerts)} alert names) and {len(records)} recording rules checked; "
      f"{len(tests['tests'])} test groups, {len(cases)} alert checks ({len(firing)} firing, "
      f"{len(silent)} silent) and {promql} PromQL checks passed")
PY
