#!/usr/bin/env bash
# The curl examples of the Flameup Events API documentation, as users copy
# them: only the host is $BASE_URL and the key $API_KEY; user_123 is
# $EXTERNAL_ID. Prints one JSON response per line.
set -euo pipefail

# A new UUID per event (uuidgen, where installed, does the same): a retry sends
# the same message_id again, and the event is stored once.
new_id() { python3 -c 'import uuid; print(uuid.uuid4())'; }
MESSAGE_ID=$(new_id)

track() {
curl -sS -X POST "$BASE_URL/api/v1/track" \
-H "Content-Type: application/json" \
-H "Authorization: Bearer $API_KEY" \
-d '{
"external_id": "'"$EXTERNAL_ID"'",
"event": "purchase_completed",
"message_id": "'"$MESSAGE_ID"'",
"parameters": {
"order_id": "order_789",
"amount": 99.99,
"currency": "USD"
}
}'
echo
}
track
track  # a retry: answered with the same event_id and "duplicate": true, stored once

curl -sS -X POST "$BASE_URL/api/v1/track/batch" \
-H "Content-Type: application/json" \
-H "Authorization: Bearer $API_KEY" \
-d '{
"events": [
{"external_id": "'"$EXTERNAL_ID"'", "event": "page_viewed", "message_id": "'"$(new_id)"'", "parameters": {"page": "/home"}},
{"external_id": "'"$EXTERNAL_ID"'", "event": "button_clicked", "message_id": "'"$(new_id)"'", "parameters": {"button": "signup"}}
]
}'
echo

curl -sS "$BASE_URL/api/v1/people/$EXTERNAL_ID/events?id_type=external_id&limit=100&event=purchase_completed" \
-H "Authorization: Bearer $API_KEY"
echo
