#!/usr/bin/env bash
# make alerts-e2e: the alerting rules against a real Prometheus and a real worker.
#
#   broker (Tansu) + Belfius sandbox simulator + pis-worker (metrics on PIS_HTTP_ADDR), as in
#   scripts/demo.sh; a Prometheus (the Debian package's /usr/bin/prometheus, run by hand with its
#   own config, a temporary storage dir and a free port, never the packaged service) scrapes the
#   worker every second and evaluates helm/pis-worker/files/pis-worker.rules.yml every second.
#   The sandbox is switched to fail half of the bank calls with 503 (admin API PUT /admin/faults;
#   half, not all, so that traffic goes on even once a circuit breaker opens on a dead bank),
#   payments are published with `pis-worker send initiate`, and the script polls Prometheus's
#   /api/v1/alerts until PisBankErrorRatioHigh is `firing` (exit 0) or the timeout passes (exit 1).
#   It also fails if any rule reports an evaluation error (/api/v1/rules).
#
# The `for:` durations of the real rules are minutes. The rules Prometheus loads here are a copy,
# rendered into the run directory, in which every `for:` is replaced by `for: 10s` (sed); nothing
# else is changed (same expressions, thresholds, windows and labels).
#
#   scripts/alerts-e2e.sh                 the real stack (builds target/debug/pis-worker)
#   scripts/alerts-e2e.sh --fake-worker   no broker, sandbox or worker: a small Python server
#                                         serves synthetic /metrics (docs/metrics.md names) with 75 %
#                                         of bank calls failing; checks the Prometheus half alone.
#                                         PIS_E2E_FAKE_ERROR_RATE=0.01 (3 % failing) must time out.
# Environment: PIS_E2E_TIMEOUT_SECS (default 240), PIS_E2E_FAULT_PROBABILITY (default 0.5),
# PIS_E2E_SKIP_BUILD=1 (use the existing target/debug/pis-worker instead of building).
# Logs, kept after the run: .run/alerts-e2e/ (worker.log, sandbox.log, prometheus.log, send.log).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
[[ -x "$HOME/.cargo/bin/cargo" ]] && export PATH="$HOME/.cargo/bin:$PATH"

MODE=real
case "${1:-}" in
  "") ;;
  --fake-worker) MODE=fake ;;
  *) echo "usage: $0 [--fake-worker]" >&2; exit 2 ;;
esac
TIMEOUT="${PIS_E2E_TIMEOUT_SECS:-240}"
FAULT_P="${PIS_E2E_FAULT_PROBABILITY:-0.5}"
ALERT=PisBankErrorRatioHigh
RULES="helm/pis-worker/files/pis-worker.rules.yml"

die() { echo "alerts-e2e: $*" >&2; exit 1; }

RUN="$ROOT/.run/alerts-e2e"
rm -rf "$RUN"; mkdir -p "$RUN/prometheus-data"
PIDS=()
BROKER_STARTED=""
cleanup() {
  local rc=$?
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [[ -n "$BROKER_STARTED" ]]; then scripts/broker.sh stop "$RUN" >/dev/null 2>&1 || true; fi
  # The TSDB is throwaway; the logs stay (.run/ is not versioned; the next run starts afresh).
  rm -rf "$RUN/prometheus-data"
  exit "$rc"
}
trap cleanup EXIT

# ------------------------------------------------------------------ Prometheus (binary only)
scripts/alerts-test.sh --install-only >/dev/null
PROMETHEUS=/usr/bin/prometheus
[[ -x "$PROMETHEUS" ]] || die "$PROMETHEUS missing after installing the prometheus package"
PROMTOOL="$(command -v promtool || echo /usr/bin/promtool)"

# ------------------------------------------------------------------ the scrape target
METRICS_PORT="$(scripts/free-port.sh)"
if [[ "$MODE" == real ]]; then
  scripts/prereqs.sh
  BIN="$ROOT/target/debug/pis-worker"
  if [[ -z "${PIS_E2E_SKIP_BUILD:-}" || ! -x "$BIN" ]]; then
    echo "== building pis-worker"
    cargo build --locked --quiet
  fi
  KAFKA_PORT="$(scripts/free-port.sh)"
  API_PORT="$(scripts/free-port.sh)"
  ADMIN_PORT="$(scripts/free-port.sh)"
  BANX_PORT="$(scripts/free-port.sh)"
  export PIS_BROKERS="127.0.0.1:$KAFKA_PORT"
  export PIS_LOG="${PIS_LOG:-info,rdkafka=warn}"

  echo "== starting the broker"
  BROKER_STARTED=1
  scripts/broker.sh start "$KAFKA_PORT" "$RUN"

  echo "== starting the Belfius sandbox simulator"
  CLIENT_ID=pis-worker-alerts-e2e   # the sandbox refuses (4xx) any other Client-ID
  "$BIN" sandbox --listen "127.0.0.1:$API_PORT" --banx-listen "127.0.0.1:$BANX_PORT" \
    --admin-listen "127.0.0.1:$ADMIN_PORT" --verify-signatures --client-id "$CLIENT_ID" \
    --tls-dir "$RUN/tls" --settle-after-ms 3000 >"$RUN/sandbox.log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 1 100); do [[ -f "$RUN/tls/client-key.pem" ]] && grep -q "sandbox:" "$RUN/sandbox.log" && break; sleep 0.1; done
  grep -q "sandbox:" "$RUN/sandbox.log" || { cat "$RUN/sandbox.log"; die "the sandbox did not start"; }

  echo "== starting the worker (metrics on 127.0.0.1:$METRICS_PORT)"
  "$BIN" keygen >"$RUN/state.key"
  PIS_HTTP_ADDR="127.0.0.1:$METRICS_PORT" \
  PIS_STATE_KEY_FILE="$RUN/state.key" PIS_CLIENT_SECRET=sandbox-secret "$BIN" run \
    --client-id "$CLIENT_ID" \
    --belfius-url "https://127.0.0.1:$API_PORT/" --banx-url "https://127.0.0.1:$BANX_PORT/" \
    --qseal-key-file "$RUN/tls/qseal-key.pem" --qseal-cert-file "$RUN/tls/qseal.pem" \
    --bank-ca-file "$RUN/tls/ca.pem" \
    --qwac-cert-file "$RUN/tls/client.pem" --qwac-key-file "$RUN/tls/client-key.pem" \
    --create-topics 3 --session-timeout-ms 6000 --poll-fast-ms 1000 >"$RUN/worker.log" 2>&1 &
  WORKER=$!
  PIDS+=("$WORKER")
  for _ in $(seq 1 150); do grep -q "partition restored" "$RUN/worker.log" 2>/dev/null && break; sleep 0.2; done
  grep -q "partition restored" "$RUN/worker.log" || { tail -40 "$RUN/worker.log"; die "the worker did not start"; }
  for _ in $(seq 1 50); do curl -fsS "http://127.0.0.1:$METRICS_PORT/metrics" 2>/dev/null | grep -q '^pis_' && break; sleep 0.2; done
  curl -fsS "http://127.0.0.1:$METRICS_PORT/metrics" 2>/dev/null | grep -q '^pis_' \
    || die "the worker serves no pis_* metrics on http://127.0.0.1:$METRICS_PORT/metrics (PIS_HTTP_ADDR)"
  echo "worker: running, /metrics answers (log $RUN/worker.log)"

  echo "== bank faults: $FAULT_P of all bank calls answer 503"
  curl -fsS -X PUT "http://127.0.0.1:$ADMIN_PORT/admin/faults" -H 'content-type: application/json' \
    -d "{\"rules\":[{\"endpoint\":\"any\",\"probability\":$FAULT_P,\"fault\":{\"kind\":\"status\",\"status\":503,\"retry_after_secs\":null}}]}" \
    || die "could not set the sandbox faults"
  curl -fsS "http://127.0.0.1:$ADMIN_PORT/admin/faults"; echo

  # Payments keep coming so that bank calls (initiations, then status polls) keep happening:
  # one a second, for as long as the check runs (stopped on exit).
  (
    i=0
    while ((i < 600)); do
      i=$((i + 1))
      "$BIN" send initiate --payment-id "alerts-e2e-$i" --psu-id "psu-e2e-$((i % 7))" \
        --amount "$((10 + i % 90)).00" --creditor-name "E2E Shop" \
        --creditor-iban BE68539007547034 >/dev/null 2>>"$RUN/send.log" || echo "send $i failed" >>"$RUN/send.log"
      sleep 1
    done
  ) &
  PIDS+=($!)
else
  echo "== fake worker: synthetic /metrics on 127.0.0.1:$METRICS_PORT"
  python3 - "$METRICS_PORT" "${PIS_E2E_FAKE_ERROR_RATE:-1}" >"$RUN/fake-worker.log" 2>&1 <<'PY' &
import http.server, sys, time
start = time.time()
err = float(sys.argv[2])   # failing calls a second per error class (3 classes); 1 ok call a second
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path != "/metrics":
            self.send_response(404); self.end_headers(); return
        t = time.time() - start
        lines = [
            '# TYPE pis_build_info gauge', 'pis_build_info{version="fake"} 1',
            '# TYPE pis_assigned_partitions gauge', 'pis_assigned_partitions 3',
            '# TYPE pis_broker_reachable gauge', 'pis_broker_reachable 1',
            '# TYPE pis_restores_in_progress gauge', 'pis_restores_in_progress 0',
            '# TYPE pis_restore_last_duration_seconds gauge', 'pis_restore_last_duration_seconds 0.4',
            '# TYPE pis_circuit_breaker_state gauge',
            'pis_circuit_breaker_state{host="belfius"} 0', 'pis_circuit_breaker_state{host="banx"} 0',
            '# TYPE pis_oldest_payment_age_seconds gauge',
        ] + [f'pis_oldest_payment_age_seconds{{state="{s}"}} 0' for s in ("SCA_PENDING", "OUTCOME_UNKNOWN", "INITIATING", "CANCELLING")] + [
            '# TYPE pis_consumer_lag gauge',
            'pis_consumer_lag{topic="pis.payment-commands",partition="0"} 0',
            '# TYPE pis_commands_consumed_total counter',
            f'pis_commands_consumed_total{{type="initiate",outcome="accepted"}} {int(t)}',
            '# TYPE pis_bank_requests_total counter',
            # by default 1 call a second succeeds, 3 fail (5xx, timeout, 429): 75 %; circuit_open
            # calls never reached the bank and are not counted
            f'pis_bank_requests_total{{endpoint="initiate",status_class="2xx"}} {int(t)}',
            f'pis_bank_requests_total{{endpoint="initiate",status_class="5xx"}} {int(err * t)}',
            f'pis_bank_requests_total{{endpoint="status",status_class="timeout"}} {int(err * t)}',
            f'pis_bank_requests_total{{endpoint="status",status_class="429"}} {int(err * t)}',
            f'pis_bank_requests_total{{endpoint="status",status_class="circuit_open"}} {int(50 * t)}',
            '# TYPE pis_dlq_records_total counter', 'pis_dlq_records_total{class="BAD_FRAMING"} 0',
            '# TYPE pis_token_refreshes_total counter',
            'pis_token_refreshes_total{result="ok"} 0', 'pis_token_refreshes_total{result="failed"} 0',
            '# TYPE pis_token_exchanges_total counter',
            'pis_token_exchanges_total{result="ok"} 0', 'pis_token_exchanges_total{result="failed"} 0',
        ]
        body = ("\n".join(lines) + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
PY
  PIDS+=($!)
  for _ in $(seq 1 50); do curl -fsS "http://127.0.0.1:$METRICS_PORT/metrics" >/dev/null 2>&1 && break; sleep 0.1; done
  curl -fsS "http://127.0.0.1:$METRICS_PORT/metrics" >/dev/null || die "the fake worker did not start"
fi

# ------------------------------------------------------------------ Prometheus, by hand
PROM_PORT="$(scripts/free-port.sh)"
# The rules as shipped, with every `for:` shortened to 10 s (see the header).
sed -E 's/^([[:space:]]*)for:[[:space:]].*$/\1for: 10s/' "$RULES" >"$RUN/pis-worker.rules.yml"
grep -q 'for: 10s' "$RUN/pis-worker.rules.yml" || die "rendering the rules copy failed"
"$PROMTOOL" check rules "$RUN/pis-worker.rules.yml" >/dev/null || die "the rendered rules copy does not check"
cat >"$RUN/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - $RUN/pis-worker.rules.yml
scrape_configs:
  - job_name: pis-worker
    static_configs:
      - targets: ["127.0.0.1:$METRICS_PORT"]
EOF
"$PROMTOOL" check config "$RUN/prometheus.yml" >/dev/null || die "prometheus.yml does not check"
echo "== starting Prometheus on 127.0.0.1:$PROM_PORT (rules evaluated every second, for: 10s)"
"$PROMETHEUS" --config.file="$RUN/prometheus.yml" --storage.tsdb.path="$RUN/prometheus-data" \
  --web.listen-address="127.0.0.1:$PROM_PORT" --storage.tsdb.retention.time=1h \
  >"$RUN/prometheus.log" 2>&1 &
PIDS+=($!)
PROM="http://127.0.0.1:$PROM_PORT"
for _ in $(seq 1 100); do curl -fsS "$PROM/-/ready" >/dev/null 2>&1 && break; sleep 0.2; done
curl -fsS "$PROM/-/ready" >/dev/null 2>&1 || { tail -20 "$RUN/prometheus.log"; die "Prometheus did not become ready"; }

# One line about the alert's state, the error ratio and the target; exit 0 once it is firing.
check() {
  python3 - "$PROM" "$ALERT" <<'PY'
import json, sys, urllib.parse, urllib.request
prom, alert = sys.argv[1], sys.argv[2]
def get(path):
    with urllib.request.urlopen(prom + path, timeout=5) as r:
        return json.load(r)["data"]
def scalar(q):
    res = get("/api/v1/query?query=" + urllib.parse.quote(q))["result"]
    return res[0]["value"][1] if res else "none"
alerts = [a for a in get("/api/v1/alerts")["alerts"] if a["labels"].get("alertname") == alert]
states = ", ".join(f'{a["labels"].get("severity")}={a["state"]}' for a in alerts) or "inactive"
up = scalar('up{job="pis-worker"}')
print(f"  {alert}: {states}; pis:bank_error_ratio:rate5m={scalar('pis:bank_error_ratio:rate5m')} "
      f"sent/s={scalar('pis:bank_requests_sent:rate5m')} up={up}", flush=True)
sys.exit(0 if any(a["state"] == "firing" for a in alerts) else 3)
PY
}

echo "== waiting up to ${TIMEOUT} s for $ALERT to fire ($PROM/api/v1/alerts)"
t0=$SECONDS
fired=""
while ((SECONDS - t0 < TIMEOUT)); do
  if check; then fired=1; break; fi
  sleep 5
done
if [[ -z "$fired" ]]; then
  echo "alerts-e2e: $ALERT did not fire within ${TIMEOUT} s" >&2
  curl -s "$PROM/api/v1/targets" | python3 -c 'import json,sys; [print("  target", t["scrapeUrl"], t["health"], t.get("lastError","")) for t in json.load(sys.stdin)["data"]["activeTargets"]]' >&2 || true
  curl -s "http://127.0.0.1:$METRICS_PORT/metrics" | grep '^pis_bank_requests_total' >&2 || true
  [[ "$MODE" == real ]] && { echo "-- end of worker log:" >&2; tail -20 "$RUN/worker.log" >&2; }
  echo "logs: $RUN" >&2
  exit 1
fi
echo "alerts-e2e: $ALERT is firing after $((SECONDS - t0)) s"
curl -s "$PROM/api/v1/alerts" | python3 -c '
import json, sys
for a in json.load(sys.stdin)["data"]["alerts"]:
    labels, notes = a["labels"], a["annotations"]
    print("  %s %s %s: %s" % (labels["alertname"], labels.get("severity"), a["state"], notes.get("summary")))'

# Every rule must have evaluated without error against the real metrics.
curl -s "$PROM/api/v1/rules" | python3 -c '
import json, sys
bad = [(r["name"], r.get("lastError")) for g in json.load(sys.stdin)["data"]["groups"] for r in g["rules"] if r.get("health") == "err"]
for name, err in bad: print(f"  rule {name}: {err}", file=sys.stderr)
sys.exit(1 if bad else 0)' || die "some rules failed to evaluate (see above)"
echo "alerts-e2e: OK ($MODE worker): every rule evaluates; $ALERT reached firing through Prometheus"
