#!/usr/bin/env bash
# The curl examples of the Flameup Events API documentation, as users copy
# them: only the host is $BASE_URL and the key $API_KEY; user_123 is
# $EXTERNAL_ID. Prints one JSON response per line.
set -euo pipefail

curl -sS -X POST "$BASE_URL/api/v1/track" \
-H "Content-Type: application/json" \
-H "Authorization: Bearer $API_KEY" \
-d '{
"external_id": "'"$EXTERNAL_ID"'",
"event": "purchase_completed",
"parameters": {
"order_id": "order_789",
"amount": 99.99,
"currency": "USD"
}
}'
echo

curl -sS -X POST "$BASE_URL/api/v1/track/batch" \
-H "Content-Type: application/json" \
-H "Authorization: Bearer $API_KEY" \
-d '{
"events": [
{"external_id": "'"$EXTERNAL_ID"'", "event": "page_viewed", "parameters": {"page": "/home"}},
{"external_id": "'"$EXTERNAL_ID"'", "event": "button_clicked", "parameters": {"button": "signup"}}
]
}'
echo

curl -sS "$BASE_URL/api/v1/people/$EXTERNAL_ID/events?id_type=external_id&limit=100&event=purchase_completed" \
-H "Authorization: Bearer $API_KEY"
echo
