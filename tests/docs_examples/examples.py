"""The Python examples of the Flameup Events API documentation, as users copy
them: only the host is BASE_URL, and lines marked "harness" are ours."""

import json  # harness
import os  # harness
import uuid
from datetime import datetime

import requests

API_KEY = os.environ["API_KEY"]  # harness
BASE_URL = os.environ["BASE_URL"]  # harness
EXTERNAL_ID = os.environ["EXTERNAL_ID"]  # harness: user_123 in the docs
results = {}  # harness


def track_event(external_id, event_name, parameters=None, message_id=None):
    # A new UUID per event; a retry of the same event sends the same one, and
    # the service stores the event once (the answer says "duplicate": true).
    message_id = message_id or str(uuid.uuid4())
    response = requests.post(
        f'{BASE_URL}/api/v1/track',
        headers={
            'Content-Type': 'application/json',
            'Authorization': f'Bearer {API_KEY}'
        },
        json={
            'external_id': external_id,
            'event': event_name,
            'message_id': message_id,
            'parameters': parameters or {}
        }
    )
    return response.json()


# Track a page view
results['page_viewed'] = track_event(EXTERNAL_ID, 'page_viewed', {
    'page': '/pricing',
    'referrer': '/home'
})

# Track a purchase
results['purchase_completed'] = track_event(EXTERNAL_ID, 'purchase_completed', {
    'order_id': 'order_789',
    'amount': 99.99,
    'currency': 'USD',
    'items': [
        {'sku': 'PROD-001', 'name': 'Widget', 'quantity': 2},
        {'sku': 'PROD-002', 'name': 'Gadget', 'quantity': 1}
    ]
})

# Batch Track Events
response = requests.post(
    f'{BASE_URL}/api/v1/track/batch',
    headers={
        'Content-Type': 'application/json',
        'Authorization': f'Bearer {API_KEY}'
    },
    json={
        'events': [
            {
                'external_id': EXTERNAL_ID,
                'event': 'page_viewed',
                'message_id': str(uuid.uuid4()),
                'parameters': {'page': '/home'}
            },
            {
                'external_id': EXTERNAL_ID,
                'event': 'button_clicked',
                'message_id': str(uuid.uuid4()),
                'parameters': {'button': 'signup'}
            },
            {
                'external_id': EXTERNAL_ID + '_456',
                'event': 'purchase_completed',
                'message_id': str(uuid.uuid4()),
                'parameters': {'amount': 99.99}
            }
        ]
    }
)
result = response.json()
results['batch'] = result  # harness

# Get Person Events
person_id = results['purchase_completed']['person_id']  # harness
response = requests.get(
    f'{BASE_URL}/api/v1/people/{person_id}/events',
    headers={'Authorization': f'Bearer {API_KEY}'},
    params={
        'limit': 100,
        'event': 'purchase_completed',
        'since': '2024-01-01T00:00:00Z'
    }
)
data = response.json()
events = data['events']
results['person_events'] = data  # harness

print(json.dumps(results))  # harness
