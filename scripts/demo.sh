#!/usr/bin/env bash
# make demo: a real Kafka-protocol broker (Tansu), the Belfius sandbox simulator over mutual TLS
# and the worker; sample payments are published and their status events shown live. Then the
# simulator's dedicated API goes down and the worker switches to the bank's fallback interface and
# back (docs/belfius.md §7.5). Everything started here is stopped on exit.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
[[ -x "$HOME/.cargo/bin/cargo" ]] && export PATH="$HOME/.cargo/bin:$PATH"
scripts/prereqs.sh
echo "== building pis-worker"
cargo build --locked --quiet
BIN="$ROOT/target/debug/pis-worker"

RUN="$ROOT/.run/demo"
rm -rf "$RUN"; mkdir -p "$RUN"
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  scripts/broker.sh stop "$RUN"
}
trap cleanup EXIT

KAFKA_PORT="$(scripts/free-port.sh)"
API_PORT="$(scripts/free-port.sh)"
ADMIN_PORT="$(scripts/free-port.sh)"
BANX_PORT="$(scripts/free-port.sh)"
export PIS_BROKERS="127.0.0.1:$KAFKA_PORT"
export PIS_LOG="${PIS_LOG:-info,rdkafka=warn}"
# Tansu compacts without honouring min.compaction.lag.ms (docs/guarantees.md).
export PIS_STATE_COMPACTION=false
export PIS_HTTP_ADDR="127.0.0.1:$(scripts/free-port.sh)"

echo "== starting the broker"
scripts/broker.sh start "$KAFKA_PORT" "$RUN"

echo "== starting the Belfius sandbox simulator (HTTPS, client certificate required)"
"$BIN" sandbox --listen "127.0.0.1:$API_PORT" --banx-listen "127.0.0.1:$BANX_PORT" \
  --admin-listen "127.0.0.1:$ADMIN_PORT" --verify-signatures \
  --tls-dir "$RUN/tls" --settle-after-ms 3000 >"$RUN/sandbox.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 100); do [[ -f "$RUN/tls/client-key.pem" ]] && grep -q "sandbox:" "$RUN/sandbox.log" && break; sleep 0.1; done
grep "sandbox:" "$RUN/sandbox.log"

echo "== starting the worker"
"$BIN" keygen >"$RUN/state.key"
PIS_STATE_KEY_FILE="$RUN/state.key" PIS_CLIENT_SECRET=sandbox-secret "$BIN" run \
  --client-id pis-worker-demo \
  --belfius-url "https://127.0.0.1:$API_PORT/" --banx-url "https://127.0.0.1:$BANX_PORT/" \
  --qseal-key-file "$RUN/tls/qseal-key.pem" --qseal-cert-file "$RUN/tls/qseal.pem" \
  --bank-ca-file "$RUN/tls/ca.pem" \
  --qwac-cert-file "$RUN/tls/client.pem" --qwac-key-file "$RUN/tls/client-key.pem" \
  --create-topics 3 --session-timeout-ms 6000 --poll-fast-ms 1500 \
  --bank-circuit-consecutive-failures 3 --bank-circuit-open-ms 2000 \
  --fallback-enabled --fallback-after-secs 3 --fallback-back-after-secs 2 \
  --fallback-belfius-url "https://127.0.0.1:$API_PORT/" --fallback-banx-url "https://127.0.0.1:$BANX_PORT/" \
  --fallback-session-path /fallback/session --fallback-payments-path /fallback/payments \
  --fallback-key-id "SN=demo,CA=pis-worker test QSeal" >"$RUN/worker.log" 2>&1 &
WORKER=$!
PIDS+=($WORKER)
for _ in $(seq 1 150); do grep -q "partition restored" "$RUN/worker.log" 2>/dev/null && break; sleep 0.2; done
grep -q "partition restored" "$RUN/worker.log" || { echo "worker did not start; log:"; cat "$RUN/worker.log"; exit 1; }
echo "worker: running (log $RUN/worker.log)"

echo "== status events (pis-worker watch)"
# Also kept in a file: the PSUs below open the SCA URLs the worker published there.
"$BIN" watch --from-beginning --until-final 5 --timeout-secs 120 > >(tee "$RUN/events.txt") &
WATCH=$!
PIDS+=($WATCH)
sleep 1

send() { "$BIN" send "$@" >/dev/null; }
echo "-- client: 4 payments, a standing order, and one record that is not a command"
send initiate --payment-id demo-pay-1 --psu-id psu-alice --amount 25.00 --creditor-name "Bakkerij Peeters" --creditor-iban BE68539007547034 --remittance "bread"
send initiate --payment-id demo-pay-2 --psu-id psu-bob --amount 1200.50 --creditor-name "Garage Dupont" --creditor-iban BE71096123456769 --language nl
send initiate --payment-id demo-pay-3 --psu-id psu-carol --amount 10.00 --creditor-name "Typo" --creditor-iban BE68539007547035
send initiate --payment-id demo-pay-4 --psu-id psu-dave --amount 42.00 --creditor-name "AUTO-SIGN Shop" --creditor-iban DE89370400440532013000
send periodic --payment-id demo-so-5 --psu-id psu-alice --amount 750.00 --creditor-name "Landlord" \
  --creditor-iban BE71096123456769 --start-date "$(date -d '+7 days' +%F)" --frequency MONTHLY
send raw --key psu-alice --value "this is not an Avro command"
sleep 4

# The SCA URL the worker published for a payment (its SCA_PENDING event): the bank's URL with
# the worker's OAuth state, which the bank brings back on the redirect.
sca_url() {
  for _ in $(seq 1 100); do
    # `|| true`: no match yet is not an error (set -e and pipefail would end the demo here).
    url="$(grep -E "^$1 .* sca=" "${EVENTS:-$RUN/events.txt}" 2>/dev/null | sed -E 's/.* sca=([^ ]+).*/\1/' | tail -1 || true)"
    [[ -n "$url" ]] && { echo "$url"; return; }
    sleep 0.1
  done
  echo "demo: no SCA URL published for $1" >&2
  return 1
}
psu() { "$BIN" psu --admin-url "http://127.0.0.1:$ADMIN_PORT" "$1" --sca-url "$(sca_url "$2")" --psu "$3"; }

echo "-- PSU alice opens demo-pay-1's SCA URL and signs; her browser returns with a code and the state"
URL1="$(psu sign demo-pay-1 psu-alice)"
send complete-sca --payment-id demo-pay-1 --psu-id psu-alice --redirect-url "$URL1"
echo "-- PSU bob refuses demo-pay-2; his browser returns with an error (final once the bank confirms)"
URL2="$(psu reject demo-pay-2 psu-bob)"
send complete-sca --payment-id demo-pay-2 --psu-id psu-bob --redirect-url "$URL2"

echo "-- alice signs her standing order demo-so-5 too; it becomes ACTIVE"
URL5="$(psu sign demo-so-5 psu-alice)"
send complete-sca --payment-id demo-so-5 --psu-id psu-alice --redirect-url "$URL5"
sleep 4
echo "-- the client cancels demo-so-5: the worker asks the bank, with alice's PIS token"
send cancel --payment-id demo-so-5 --psu-id psu-alice

wait "$WATCH" || { echo "demo: not every payment reached a final state; worker log:"; tail -30 "$RUN/worker.log"; exit 1; }

echo "== the dedicated API goes down; the worker switches to the bank's fallback interface and back"
EVENTS="$RUN/events-fallback.txt"
# From the beginning (a new reader may join after the first events), showing only this part's
# payments: the five final ones above and these two.
"$BIN" watch --from-beginning --until-final 7 --timeout-secs 120 | grep --line-buffered '^demo-fb' > >(tee "$EVENTS") &
WATCH=$!
PIDS+=($WATCH)
ADMIN="http://127.0.0.1:$ADMIN_PORT"
# Waits until the worker's Belfius route is on $1 (dedicated | fallback); prints how long it took.
route_is() {
  local t0=$SECONDS
  for _ in $(seq 1 300); do
    if curl -s "http://$PIS_HTTP_ADDR/metrics" | grep -q "^pis_bank_route{brand=\"belfius\",interface=\"$1\"} 1$"; then
      echo "   worker: belfius route is now $1 (after $((SECONDS - t0)) s)"; return 0
    fi
    sleep 0.2
  done
  echo "demo: the belfius route never went to $1; worker log:"; tail -20 "$RUN/worker.log"; exit 1
}
send initiate --payment-id demo-fb-6 --psu-id psu-erin --amount 15.00 --creditor-name "Fietsen Janssens" --creditor-iban BE68539007547034
sca_url demo-fb-6 >/dev/null
echo "-- demo-fb-6 is initiated through the dedicated API; then the simulator's dedicated API answers 503 to everything"
curl -sf -X PUT -H 'content-type: application/json' "$ADMIN/admin/faults" \
  -d '{"rules":[{"endpoint":"any","probability":1.0,"fault":{"kind":"status","status":503}}]}'
echo "-- demo-fb-6's status polls fail, the circuit opens, and after PIS_FALLBACK_AFTER_SECS (3 s here) the route switches"
route_is fallback
send initiate --payment-id demo-fb-7 --psu-id psu-frank --amount 99.00 --creditor-name "Boekhandel Claes" --creditor-iban BE71096123456769
echo "-- frank signs demo-fb-7, initiated through the fallback; his browser returns without a code (the fallback has no PKCE):"
echo "   $(psu sign demo-fb-7 psu-frank)"
echo "   the worker learns the signature by polling the fallback (the dedicated API still answers 503)"
for _ in $(seq 1 150); do grep -qE '^demo-fb-7 .* SETTLED' "$EVENTS" && break; sleep 0.2; done
curl -sf -X DELETE "$ADMIN/admin/faults"
echo "-- the dedicated API is back: a probe closes the circuit, and after PIS_FALLBACK_BACK_AFTER_SECS (2 s) the route returns"
route_is dedicated
echo "-- erin signs demo-fb-6; the code exchange goes to the dedicated API again"
URL6="$(psu sign demo-fb-6 psu-erin)"
send complete-sca --payment-id demo-fb-6 --psu-id psu-erin --redirect-url "$URL6"
wait "$WATCH" || { echo "demo: the fallback payments did not reach a final state; worker log:"; tail -30 "$RUN/worker.log"; exit 1; }
BIN="$BIN" RUN="$RUN" ADMIN_PORT="$ADMIN_PORT" scripts/demo-portal.sh  # consents, funds checks, settlement evidence
echo "== dead-lettered: $(grep -cE 'command (dead-lettered|refused)' "$RUN/worker.log") record(s); from the worker log:"
grep -E 'command (dead-lettered|refused)' "$RUN/worker.log" | sed -e 's/\x1b\[[0-9;]*m//g' \
  | sed -E -e 's/^.*command (dead-lettered|refused)/  command \1/'
echo "== the sandbox's counters (QSeal signatures it verified, tokens, cancellations)"
curl -s "http://127.0.0.1:$ADMIN_PORT/admin/counters" | python3 -c '
import json, sys
c = json.load(sys.stdin)
print("  " + ", ".join(f"{k}={c[k]}" for k in ("initiations", "signatures_checked", "signatures_failed", "tokens_issued", "cancellations", "invalidated_token_uses") if k in c))
print("  initiations by authorization: " + ", ".join(f"{k}={v}" for k, v in c.get("initiations_by_auth", {}).items()))'
echo "== the worker's metrics (curl http://$PIS_HTTP_ADDR/metrics, non-zero samples of a few series)"
sleep 6 # the payment gauges refresh every 5 s
curl -s "http://$PIS_HTTP_ADDR/metrics" \
  | grep -E '^pis_(payments|state_transitions_total|bank_requests_total|assigned_partitions|commands_consumed_total|dlq_records_total|bank_route|bank_route_switches_total|bank_fallback_requests_total)' \
  | grep -v ' 0$' | sed 's/^/  /' || true
echo "  readyz: $(curl -s "http://$PIS_HTTP_ADDR/readyz")"
echo "== demo complete; stopping broker, sandbox and worker"
