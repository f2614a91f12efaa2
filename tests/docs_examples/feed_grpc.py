"""The README's gRPC feed consumer, as users copy it: only the target is
GRPC_TARGET and the key API_KEY, and lines marked "harness" are ours."""

import os  # harness
from pathlib import Path

import grpc

from flameup.events.v1 import events_pb2, events_pb2_grpc

KEY = os.environ["API_KEY"]  # harness
TARGET = os.environ["GRPC_TARGET"]  # harness: 127.0.0.1:50051 in the README
os.chdir(os.environ["WORK_DIR"])  # harness: the cursor file goes there

stub = events_pb2_grpc.EventsServiceStub(grpc.insecure_channel(TARGET))
auth = [("authorization", f"Bearer {KEY}")]
cursor_file = Path("campaigns.cursor")


def trigger_campaigns(event):
    print(event.event, event.id, flush=True)


while True:  # resume where the last run stopped: no event missed, none twice
    after = cursor_file.read_text() if cursor_file.exists() else ""
    request = events_pb2.StreamEventsRequest(events=["purchase_completed"], after=after)
    try:
        call = stub.StreamEvents(request, metadata=auth)
        call.initial_metadata()  # harness: tell the test it listens
        print("listening", flush=True)  # harness
        for response in call:
            trigger_campaigns(response.event)
            cursor_file.write_text(response.cursor)
    except grpc.RpcError as err:
        if err.code() != grpc.StatusCode.UNAVAILABLE:
            raise
