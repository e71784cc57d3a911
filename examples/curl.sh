#!/usr/bin/env bash
# Every method of the purchase service, a batch, a notification and error cases, with curl.
#
# Start the server with demo data first (see the README), then:
#   examples/curl.sh
# Settings: RPC_URL (default http://127.0.0.1:8080/rpc), TOKEN (default demo-alice),
# STAFF_TOKEN (default demo-support).
set -euo pipefail

RPC_URL="${RPC_URL:-http://127.0.0.1:8080/rpc}"
TOKEN="${TOKEN:-demo-alice}"
STAFF_TOKEN="${STAFF_TOKEN:-demo-support}"

# rpc BODY [TOKEN]: POST a JSON-RPC body, print the answer (or the HTTP status if empty).
rpc() {
  local body="$1" token="${2:-$TOKEN}"
  echo ">>> $body" >&2
  curl --silent --show-error --fail-with-body --write-out '%{stderr}<<< HTTP %{http_code}\n' \
    -H 'Content-Type: application/json' -H "Authorization: Bearer $token" \
    --data "$body" "$RPC_URL"
  echo
}

field() { python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }

echo "== course.list (needs no token)"
rpc '{"jsonrpc": "2.0", "method": "course.list", "id": 1}'

echo "== purchase.create (params by name; retry-safe with an idempotency_key)"
created=$(rpc '{"jsonrpc": "2.0", "method": "purchase.create",
  "params": {"course": "python-basics", "idempotency_key": "curl-'"$RANDOM$RANDOM"'"}, "id": 2}')
echo "$created"
purchase_id=$(echo "$created" | field '["result"]["purchase_id"]')

echo "== purchase.get (params by position)"
rpc '{"jsonrpc": "2.0", "method": "purchase.get", "params": ["'"$purchase_id"'"], "id": 3}'

echo "== purchase.list (first page of 2, then the next with next_cursor)"
page=$(rpc '{"jsonrpc": "2.0", "method": "purchase.list", "params": {"limit": 2}, "id": 4}')
echo "$page"
cursor=$(echo "$page" | field '["result"]["next_cursor"]')
if [ "$cursor" != "None" ]; then
  rpc '{"jsonrpc": "2.0", "method": "purchase.list",
    "params": {"limit": 2, "cursor": "'"$cursor"'"}, "id": 5}'
fi

echo "== purchase.fulfill, twice: the second answer is identical and changes nothing"
fulfill='{"jsonrpc": "2.0", "method": "purchase.fulfill",
  "params": {"purchase_id": "'"$purchase_id"'", "purchase_state": "fulfilled"}, "id": 6}'
first=$(rpc "$fulfill")
second=$(rpc "$fulfill")
echo "$first"
[ "$first" = "$second" ] && echo "(identical)"

echo "== registration.list"
rpc '{"jsonrpc": "2.0", "method": "registration.list", "id": 7}'

echo "== a batch: answers come back in one array, the notification gets none"
rpc '[
  {"jsonrpc": "2.0", "method": "course.list", "id": "a"},
  {"jsonrpc": "2.0", "method": "purchase.get", "params": {"purchase_id": "'"$purchase_id"'"}, "id": "b"},
  {"jsonrpc": "2.0", "method": "purchase.list", "params": {"limit": 1}}
]'

echo "== a notification alone: HTTP 204, no body"
rpc '{"jsonrpc": "2.0", "method": "course.list"}'

echo "== staff (the support desk) sees every user's purchases"
rpc '{"jsonrpc": "2.0", "method": "purchase.list", "params": {"limit": 3}, "id": 8}' "$STAFF_TOKEN"

echo "== errors"
rpc '{"jsonrpc": "2.0", "method": "purchase.fulfill",
  "params": {"purchase_id": "'"$purchase_id"'", "purchase_state": "canceled"}, "id": 9}'  # 409
rpc '{"jsonrpc": "2.0", "method": "purchase.get", "params": {"purchase_id": "'"$purchase_id"'"}, "id": 10}' demo-bob  # 404
rpc '{"jsonrpc": "2.0", "method": "purchase.get", "params": {"purchase_id": "x"}, "id": 11}' no-such-token  # 401
rpc '{"jsonrpc": "2.0", "method": "purchase.create", "params": {"course": "cobol"}, "id": 12}'  # 404
rpc '{"jsonrpc": "2.0", "method": "purchase.fulfill",
  "params": {"purchase_id": "'"$purchase_id"'", "purchase_state": "pending", "redirect_url": "x"}, "id": 13}'  # -32602
rpc '{"jsonrpc": "2.0", "method": "purchase.refund", "id": 14}'  # -32601
rpc '[1, 2]'  # two -32600
rpc '{"jsonrpc": "2.0", "method": '  # -32700
