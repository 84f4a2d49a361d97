#!/usr/bin/env bash
# The consents part of the demo (issue 13): a CAF consent granted and a payment refused for
# funds before it reaches the bank; an AIS consent granted and a settlement confirmed from the
# debtor account's booked history. Called by scripts/demo.sh once its broker, sandbox and
# worker run, with their environment:
#   BIN=<pis-worker binary> RUN=<demo run dir> ADMIN_PORT=<sandbox operator port> scripts/demo-portal.sh
# (PIS_BROKERS exported, default topic names). Exits 1 if an expected event does not come.
set -euo pipefail
: "${BIN:?BIN: the pis-worker binary}" "${RUN:?RUN: the demo run directory}"
: "${ADMIN_PORT:?ADMIN_PORT: the sandbox operator port}" "${PIS_BROKERS:?PIS_BROKERS: the broker}"
ADMIN="http://127.0.0.1:$ADMIN_PORT"
EVENTS="$RUN/portal-events.txt"
CAF_PSU=psu-erin
AIS_PSU=psu-frank
CAF_IBAN=BE71096123456769   # Belfius accounts (bank codes 096, 063)
AIS_IBAN=BE41063012345610
CREDITOR=BE68539007547034

echo "== consents, funds checks and settlement evidence"
# Every status event, payment and consent, into a file the steps below wait on.
"$BIN" watch --from-beginning --timeout-secs 180 >"$EVENTS" 2>"$RUN/portal-watch.log" &
WATCH=$!
trap 'kill "$WATCH" 2>/dev/null || true' EXIT

send() { "$BIN" send "$@" >/dev/null; }

# Waits for the first event line matching the extended regex $1, prints it and stores it in
# $LINE; fails the demo after 60 s.
LINE=""
await() {
  for _ in $(seq 1 600); do
    LINE="$(grep -E "$1" "$EVENTS" 2>/dev/null | head -1 || true)"
    if [[ -n "$LINE" ]]; then echo "  $LINE"; return 0; fi
    sleep 0.1
  done
  echo "demo-portal: no event matching /$1/ within 60 s; events seen:" >&2
  sed 's/^/  /' "$EVENTS" >&2
  exit 1
}

# The PSU opens the consent URI of $1's PENDING event and acts ($2: grant / refuse) at the
# bank, as $3 (AIS: on the accounts $4); prints the redirect URL their browser brings back.
consent_at_bank() {
  local uri
  uri="$(grep -E "^consent $1 .* PENDING .* consent_uri=" "$EVENTS" | head -1 | sed -E 's/.* consent_uri=([^ ]+).*/\1/')"
  python3 - "$uri" "$2" "$3" "${4:-}" "$ADMIN" <<'PY'
import json, sys, urllib.parse, urllib.request
uri, action, psu, accounts, admin = sys.argv[1:6]
parsed = urllib.parse.urlparse(uri)
bank_id = parsed.path.rstrip("/").rsplit("/", 1)[-1]
query = {"psu": psu}
state = urllib.parse.parse_qs(parsed.query).get("state")
if state:
    query["state"] = state[0]
if accounts:
    query["accounts"] = accounts
url = f"{admin}/admin/consents/{bank_id}/{action}?{urllib.parse.urlencode(query)}"
with urllib.request.urlopen(urllib.request.Request(url, method="POST")) as answer:
    print(json.load(answer)["redirect_url"])
PY
}

echo "-- client: $CAF_PSU is asked for a CAF consent (funds confirmation) on $CAF_IBAN"
send request-consent --consent-id demo-caf-1 --psu-id "$CAF_PSU" --scope CAF --account-iban "$CAF_IBAN"
await "^consent demo-caf-1 .* PENDING "
echo "-- $CAF_PSU opens the consent URI and grants it at the bank; the client hands back the redirect"
send complete-consent --consent-id demo-caf-1 --psu-id "$CAF_PSU" \
  --redirect-url "$(consent_at_bank demo-caf-1 grant "$CAF_PSU")"
await "^consent demo-caf-1 .* GRANTED "

echo "-- the bank: $CAF_IBAN holds 100.00; a payment of 250.00 from it, with funds_check"
curl -fsS -X POST -H 'content-type: application/json' -d '{"balance": "100.00"}' \
  "$ADMIN/admin/accounts/$CAF_IBAN/balance" >/dev/null
send initiate --payment-id demo-funds-1 --psu-id "$CAF_PSU" --amount 250.00 --creditor-name "Meubelzaak Claes" \
  --creditor-iban "$CREDITOR" --debtor-iban "$CAF_IBAN" --funds-check
await "^demo-funds-1 .* REJECTED .*reason=INSUFFICIENT_FUNDS"
echo "   (refused before initiation: the bank's payment interface saw $(curl -fsS "$ADMIN/admin/counters" \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["initiations_by_e2e"].get("demo-funds-1", 0))') initiation of it)"

echo "-- client: $AIS_PSU is asked for an AIS consent (account information); the PSU picks $AIS_IBAN"
send request-consent --consent-id demo-ais-1 --psu-id "$AIS_PSU" --scope AIS
await "^consent demo-ais-1 .* PENDING "
send complete-consent --consent-id demo-ais-1 --psu-id "$AIS_PSU" \
  --redirect-url "$(consent_at_bank demo-ais-1 grant "$AIS_PSU" "$AIS_IBAN")"
await "^consent demo-ais-1 .* GRANTED "

echo "-- $AIS_PSU pays 35.00 from $AIS_IBAN, signs at the bank; once executed, the worker reads the account's history"
send initiate --payment-id demo-settle-1 --psu-id "$AIS_PSU" --amount 35.00 --creditor-name "Fietsen Maes" \
  --creditor-iban "$CREDITOR" --debtor-iban "$AIS_IBAN" --remittance "bike repair"
await "^demo-settle-1 .* SCA_PENDING .* sca="
SCA_URL="$(sed -E 's/.* sca=([^ ]+).*/\1/' <<<"$LINE")"
REDIRECT="$("$BIN" psu --admin-url "$ADMIN" sign --sca-url "$SCA_URL" --psu "$AIS_PSU")"
send complete-sca --payment-id demo-settle-1 --psu-id "$AIS_PSU" --redirect-url "$REDIRECT"
await "^demo-settle-1 .* SETTLED .* settlement=BOOKED"
echo "   the bank's booking of it on $AIS_IBAN:"
curl -fsS "$ADMIN/admin/accounts/$AIS_IBAN" | python3 -c '
import json, sys
for b in json.load(sys.stdin)["bookings"]:
    if b["end_to_end_id"] == "demo-settle-1":
        print("  transaction_ref={} debit={:.2f} {} e2e={} date={}".format(
            b["reference"], -b["amount_minor"] / 100, b["currency"], b["end_to_end_id"], b["execution_date"]))'
echo "== consents part complete"
