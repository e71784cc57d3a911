#!/usr/bin/env bash
# Every method of the purchase service, paying included, a batch, a notification and error
# cases, with curl.
#
# Start the server with demo data and the example payment provider first (see the README),
# then:
#   examples/curl.sh
# Settings: RPC_URL (default http://127.0.0.1:8080/rpc), TOKEN (default demo-alice; a buyer
# not yet registered for every course), STAFF_TOKEN (default demo-support),
# PROVIDER_URL (default http://127.0.0.1:8090, examples/payment_provider.py),
# PAY_WITH: "provider" (default: pay at the example provider, as the browser does) or
# "sign-payment" (sign the payment event with `rpc-server sign-payment`, the operator's
# tool: run it where the server's RPC_SERVER_* settings and database are).
# Exits non-zero as soon as an answer is not the expected one.
set -euo pipefail

RPC_URL="${RPC_URL:-http://127.0.0.1:8080/rpc}"
TOKEN="${TOKEN:-demo-alice}"
STAFF_TOKEN="${STAFF_TOKEN:-demo-support}"
PROVIDER_URL="${PROVIDER_URL:-http://127.0.0.1:8090}"
PAY_WITH="${PAY_WITH:-provider}"
case "$PAY_WITH" in
  provider | sign-payment) ;;
  *) echo "PAY_WITH must be provider or sign-payment, not '$PAY_WITH'" >&2; exit 2 ;;
esac

# rpc BODY [TOKEN]: POST a JSON-RPC body, print the answer (or the HTTP status if empty).
rpc() {
  local body="$1" token="${2:-$TOKEN}"
  echo ">>> $body" >&2
  curl --silent --show-error --fail-with-body --write-out '%{stderr}<<< HTTP %{http_code}\n' \
    -H 'Content-Type: application/json' -H "Authorization: Bearer $token" \
    --data "$body" "$RPC_URL"
  echo
}

# field PATH: read JSON on stdin, print the value at PATH (for example '["result"]'):
# strings as they are, anything else as JSON.
field() {
  python3 -c "import json, sys; v = json.load(sys.stdin)$1; print(v if isinstance(v, str) else json.dumps(v))"
}

# expect ANSWER PATH VALUE: stop unless the answer's value at PATH is VALUE.
expect() {
  local got
  got=$(echo "$1" | field "$2")
  if [ "$got" != "$3" ]; then
    echo "unexpected answer: $2 is $got, not $3" >&2
    exit 1
  fi
}

# pay PURCHASE_ID: print the signed payment event (a payment_proof) that pays for it.
pay() {
  if [ "$PAY_WITH" = sign-payment ]; then
    rpc-server sign-payment "$1"
  else
    # The provider charges what the shop stores, signs the event, posts it to the shop's
    # webhook and hands the same event back.
    curl --silent --show-error --fail-with-body -H 'Content-Type: application/json' \
      --data '{"purchase_id": "'"$1"'"}' "$PROVIDER_URL/pay" | field '["payment_proof"]'
  fi
}

echo "== course.list (needs no token)"
courses=$(rpc '{"jsonrpc": "2.0", "method": "course.list", "id": 1}')
echo "$courses"

echo "== registration.list: the courses this buyer may not buy again"
registrations=$(rpc '{"jsonrpc": "2.0", "method": "registration.list", "id": 2}')
echo "$registrations"
course=$(python3 -c 'import json, sys
registered = {r["course"] for r in json.loads(sys.argv[2])["result"]}
print(next((c["slug"] for c in json.loads(sys.argv[1])["result"] if c["slug"] not in registered), ""))
' "$courses" "$registrations")
if [ -z "$course" ]; then
  echo "this buyer is registered for every course already: run again with a new buyer's" \
    'token, TOKEN=$(rpc-server create-token you@example.com | tail -n 1)' >&2
  exit 1
fi

echo "== purchase.create (params by name; retry-safe with an idempotency_key)"
created=$(rpc '{"jsonrpc": "2.0", "method": "purchase.create",
  "params": {"course": "'"$course"'", "idempotency_key": "curl-'"$RANDOM$RANDOM"'"}, "id": 3}')
echo "$created"
expect "$created" '["result"]["state"]' pending
purchase_id=$(echo "$created" | field '["result"]["purchase_id"]')

echo "== purchase.get (params by position)"
rpc '{"jsonrpc": "2.0", "method": "purchase.get", "params": ["'"$purchase_id"'"], "id": 4}'

echo "== purchase.list (first page of 2, then the next with next_cursor)"
page=$(rpc '{"jsonrpc": "2.0", "method": "purchase.list", "params": {"limit": 2}, "id": 5}')
echo "$page"
cursor=$(echo "$page" | field '["result"]["next_cursor"]')
if [ "$cursor" != "null" ]; then
  rpc '{"jsonrpc": "2.0", "method": "purchase.list",
    "params": {"limit": 2, "cursor": "'"$cursor"'"}, "id": 6}'
fi

echo "== purchase.fulfill without paying: 402 Payment not verified, nothing changes"
unpaid=$(rpc '{"jsonrpc": "2.0", "method": "purchase.fulfill",
  "params": {"purchase_id": "'"$purchase_id"'", "purchase_state": "fulfilled"}, "id": 7}')
echo "$unpaid"
expect "$unpaid" '["error"]["code"]' 402
expect "$unpaid" '["error"]["data"]["reason"]' missing

echo "== pay ($PAY_WITH): the signed payment event is the proof"
proof=$(pay "$purchase_id")
echo "$proof"

echo "== purchase.fulfill with the proof, twice: the second answer is identical"
fulfill='{"jsonrpc": "2.0", "method": "purchase.fulfill",
  "params": {"purchase_id": "'"$purchase_id"'", "purchase_state": "fulfilled",
             "payment_proof": '"$proof"'}, "id": 8}'
first=$(rpc "$fulfill")
second=$(rpc "$fulfill")
echo "$first"
expect "$first" '["result"]["purchase"]["state"]' fulfilled
if [ "$first" != "$second" ]; then
  echo "unexpected answer: the repeat answered $second" >&2
  exit 1
fi
echo "(identical)"

echo "== purchase.events: every state change, who made it, on what evidence"
events=$(rpc '{"jsonrpc": "2.0", "method": "purchase.events",
  "params": {"purchase_id": "'"$purchase_id"'"}, "id": 9}')
echo "$events"
expect "$events" '["result"][-1]["to_state"]' fulfilled
expect "$events" '["result"][-1]["evidence"]' payment_event

echo "== registration.list"
rpc '{"jsonrpc": "2.0", "method": "registration.list", "id": 10}'

echo "== a batch: answers come back in one array, the notification gets none"
rpc '[
  {"jsonrpc": "2.0", "method": "course.list", "id": "a"},
  {"jsonrpc": "2.0", "method": "purchase.get", "params": {"purchase_id": "'"$purchase_id"'"}, "id": "b"},
  {"jsonrpc": "2.0", "method": "purchase.list", "params": {"limit": 1}}
]'

echo "== a notification alone: HTTP 204, no body"
rpc '{"jsonrpc": "2.0", "method": "course.list"}'

echo "== staff (the support desk) sees every user's purchases"
rpc '{"jsonrpc": "2.0", "method": "purchase.list", "params": {"limit": 3}, "id": 11}' "$STAFF_TOKEN"

echo "== errors"
rpc '{"jsonrpc": "2.0", "method": "purchase.fulfill",
  "params": {"purchase_id": "'"$purchase_id"'", "purchase_state": "canceled"}, "id": 12}'  # 409
rpc '{"jsonrpc": "2.0", "method": "purchase.create", "params": {"course": "'"$course"'"}, "id": 13}'  # 409: registered already
rpc '{"jsonrpc": "2.0", "method": "purchase.get", "params": {"purchase_id": "'"$purchase_id"'"}, "id": 14}' demo-bob  # 404
rpc '{"jsonrpc": "2.0", "method": "purchase.get", "params": {"purchase_id": "x"}, "id": 15}' no-such-token  # 401
rpc '{"jsonrpc": "2.0", "method": "purchase.create", "params": {"course": "cobol"}, "id": 16}'  # 404
rpc '{"jsonrpc": "2.0", "method": "purchase.fulfill",
  "params": {"purchase_id": "'"$purchase_id"'", "purchase_state": "pending", "redirect_url": "x"}, "id": 17}'  # -32602
rpc '{"jsonrpc": "2.0", "method": "purchase.refund", "id": 18}'  # -32601
rpc '[1, 2]'  # two -32600
rpc '{"jsonrpc": "2.0", "method": '  # -32700
