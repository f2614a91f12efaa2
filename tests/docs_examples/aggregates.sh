#!/usr/bin/env bash
# The README's campaign and analytics examples, as users copy them: only the
# host is $BASE_URL, the key $API_KEY and user_123 $EXTERNAL_ID. Lines marked
# "harness" set the scene (a cart updated 25 hours ago, no purchase since) and
# are not in the README. Prints one JSON response per line.
set -euo pipefail

CART_AT=$(date -u -d '25 hours ago' +%Y-%m-%dT%H:%M:%SZ)  # harness
curl -sS -o /dev/null -X POST "$BASE_URL/api/v1/track/batch" -H "Content-Type: application/json" \
-H "Authorization: Bearer $API_KEY" -d '{"events": [
    {"external_id": "'"$EXTERNAL_ID"'", "event": "cart_updated", "timestamp": "'"$CART_AT"'"},
    {"external_id": "'"$EXTERNAL_ID"'", "event": "logged_in", "timestamp": "'"$CART_AT"'"}]}'  # harness

curl -s "$BASE_URL/api/v1/people/$EXTERNAL_ID/summary?id_type=external_id" -H "Authorization: Bearer $API_KEY"
echo
curl -s "$BASE_URL/api/v1/people/$EXTERNAL_ID/events?id_type=external_id&event=purchase_completed&since=$CART_AT&limit=1" \
  -H "Authorization: Bearer $API_KEY"
echo
curl -s "$BASE_URL/api/v1/events/counts?event=purchase_completed&interval=day" -H "Authorization: Bearer $API_KEY"
echo
curl -s "$BASE_URL/api/v1/events/names" -H "Authorization: Bearer $API_KEY"
echo
