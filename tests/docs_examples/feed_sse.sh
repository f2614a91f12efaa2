# The README's Server-Sent Events consumer: BASE_URL is http://127.0.0.1:8080 there.
curl -sN -H "Accept: text/event-stream" -H "Authorization: Bearer $API_KEY" \
  "$BASE_URL/api/v1/events/stream?events=purchase_completed"
