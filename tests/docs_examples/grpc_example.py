"""The README's gRPC example from Python, as users copy it: only the target is
GRPC_TARGET and the key API_KEY, and lines marked "harness" are ours."""

import json
import os  # harness
import uuid

import grpc
from google.protobuf import struct_pb2

from flameup.events.v1 import events_pb2, events_pb2_grpc

KEY = os.environ["API_KEY"]  # harness
TARGET = os.environ["GRPC_TARGET"]  # harness: 127.0.0.1:50051 in the README
EXTERNAL_ID = os.environ["EXTERNAL_ID"]  # harness: user_123 in the README

# Retry the writes when the service is briefly unavailable (a restart, a store
# outage): safe, because every event carries a message_id that the service
# deduplicates, so a retried Track or TrackBatch stores each event once.
SERVICE_CONFIG = json.dumps({
    "methodConfig": [{
        "name": [
            {"service": "flameup.events.v1.EventsService", "method": "Track"},
            {"service": "flameup.events.v1.EventsService", "method": "TrackBatch"},
        ],
        "timeout": "10s",
        "retryPolicy": {
            "maxAttempts": 5,
            "initialBackoff": "0.2s",
            "maxBackoff": "5s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        },
    }]
})

channel = grpc.insecure_channel(TARGET, options=[
    ("grpc.enable_retries", 1),
    ("grpc.service_config", SERVICE_CONFIG),
])
stub = events_pb2_grpc.EventsServiceStub(channel)
auth = [("authorization", f"Bearer {KEY}")]

params = struct_pb2.Struct()
params.update({"order_id": "order_789", "amount": 99.99})
resp = stub.Track(events_pb2.TrackRequest(external_id=EXTERNAL_ID, event="purchase_completed",
                                          message_id=str(uuid.uuid4()), parameters=params), metadata=auth)
page = stub.ListPersonEvents(events_pb2.ListPersonEventsRequest(person_id=resp.person_id, limit=10),
                             metadata=auth)
print(page.total, [e.event for e in page.events])
