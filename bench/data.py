"""What the benchmark sends: one deterministic pool of events, three encodings.

The same (external_id, event, parameters) items become prebuilt protobuf bytes
for the gRPC clients, JSON lines for wrk, and store rows for the raw insert, so
every workload writes the same kind of row. Everything here runs before a
timed window starts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from flameup.events.v1 import events_pb2 as pb
from service import domain
from service.auth import BOOTSTRAP_WORKSPACE
from service.domain import StoredEvent
from service.store.base import BUCKET_US, bucket_of

WORKSPACE = BOOTSTRAP_WORKSPACE  # FLAMEUP_BOOTSTRAP_KEY's workspace: the key the bench sends
USERS = 5_000
EVENT_NAMES = (
    "page_viewed", "button_clicked", "item_added_to_cart", "checkout_started", "purchase_completed",
    "signup_completed", "search_performed", "video_played", "email_opened", "session_started",
)
BATCH_SIZE = 100
# grpc_batch_msgid: every event's message_id ends in this placeholder, which the
# client replaces per call with its process and call number (bench/grpc_load.py),
# so that every call sends new ids and a replay can send the same ones again.
MESSAGE_TAG = b"@msgtag@"
MESSAGE_TAG_CHARS = len(MESSAGE_TAG)


@dataclass(frozen=True, slots=True)
class Item:
    external_id: str
    event: str
    parameters: dict


def item(i: int) -> Item:
    """The i-th event of the pool: about 150 bytes of parameters, a nested object included."""
    return Item(
        external_id=f"user_{i * 7919 % USERS:05d}",
        event=EVENT_NAMES[i % len(EVENT_NAMES)],
        parameters={
            "page": f"/products/{i % 97}",
            "plan": ("free", "pro", "team")[i % 3],
            "amount": round(9.99 + (i % 50) * 1.5, 2),
            "items": i % 7 + 1,
            "campaign": {"source": "newsletter", "medium": "email", "tags": ["spring", "sale"]},
        },
    )


def track_request(it: Item) -> pb.TrackRequest:
    req = pb.TrackRequest(external_id=it.external_id, event=it.event)
    req.parameters.update(it.parameters)
    return req


def grpc_track_payloads(n: int) -> list[bytes]:
    return [track_request(item(i)).SerializeToString() for i in range(n)]


def grpc_batch_payloads(n: int, size: int = BATCH_SIZE, *, message_ids: bool = False) -> list[bytes]:
    """Prebuilt TrackBatch requests; with ``message_ids``, every event carries one,
    unique in the pool (b, k) and ending in MESSAGE_TAG."""
    out = []
    for b in range(n):
        events = []
        for k in range(size):
            req = track_request(item(b * size + k))
            if message_ids:
                req.message_id = f"{b:04x}{k:02x}-5f1c6b1e-8d0a-4c47-{MESSAGE_TAG.decode()}"
            events.append(req)
        out.append(pb.TrackBatchRequest(events=events).SerializeToString())
    return out


def _track_json(it: Item) -> dict:
    return {"external_id": it.external_id, "event": it.event, "parameters": it.parameters}


def rest_track_bodies(n: int) -> list[str]:
    return [json.dumps(_track_json(item(i)), separators=(",", ":")) for i in range(n)]


def rest_batch_bodies(n: int, size: int = BATCH_SIZE) -> list[str]:
    return [
        json.dumps({"events": [_track_json(item(b * size + k)) for k in range(size)]}, separators=(",", ":"))
        for b in range(n)
    ]


def stored_rows(n: int, workspace_id: str = WORKSPACE) -> list[StoredEvent]:
    """The pool as the service would store it: same ids, person ids, canonical parameters."""
    person_ids: dict[str, str] = {}
    canonical: dict[tuple, str] = {}
    rows = []
    for i in range(n):
        it = item(i)
        pid = person_ids.get(it.external_id)
        if pid is None:
            pid = person_ids[it.external_id] = domain.person_id_for(workspace_id, it.external_id)
        key = (i % 97, i % 3, i % 50, i % 7)  # what item(i)'s parameters depend on
        params = canonical.get(key)
        if params is None:
            params = canonical[key] = domain.canonical_parameters("parameters", it.parameters)
        now = domain.now_us()
        rows.append(StoredEvent(domain.new_event_id(now), workspace_id, pid, it.external_id, it.event, params, now, now))
    return rows


# Persons for list_person -----------------------------------------------------

@dataclass(frozen=True)
class Person:
    label: str  # "100", "10k", "100k"
    size: int
    external_id: str
    person_id: str
    rows: list[StoredEvent]
    window: tuple[int, int]  # [since_us, until_us), edges mid-day: exercises the edge counts
    filter_event: str  # 10% of the person's events
    rare_event: str  # 0.1%: the event filter has to pass about 1,000 other events per match
    expected_total: int
    expected_event_total: int
    expected_rare_total: int
    expected_window_total: int


def size_label(n: int) -> str:
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


def person(size: int, *, workspace_id: str = WORKSPACE, days: int = 30) -> Person:
    """A person with ``size`` events spread evenly over the last ``days`` days."""
    label = size_label(size)
    external_id = f"bench_person_{label}"
    pid = domain.person_id_for(workspace_id, external_id)
    end = domain.now_us() - 3_600_000_000
    span = days * BUCKET_US
    created = domain.now_us()
    params = domain.canonical_parameters("parameters", item(0).parameters)
    rows = []
    rare_event = "refund_issued"
    for i in range(size):
        ts = end - span * i // size
        name = rare_event if i % 1000 == 500 else EVENT_NAMES[i % len(EVENT_NAMES)]
        rows.append(StoredEvent(domain.new_event_id(created), workspace_id, pid, external_id, name, params, ts,
                                created))
    # About 20 and 10 days ago, each edge near the middle of its day (the stores' bucket), whatever the
    # time of the run: a store that counts the part of an edge day inside the window (Cassandra) then
    # has about half a day of rows on either side of each edge, its worst case. Edges taken from the
    # clock would move that cost with the hour of the run.
    since = bucket_of(end - span * 2 // 3) * BUCKET_US + BUCKET_US // 2 + 1_234_567_891
    until = bucket_of(end - span // 3) * BUCKET_US + BUCKET_US // 2 - 987_654_321
    filter_event = "purchase_completed"
    return Person(
        label, size, external_id, pid, rows, (since, until), filter_event, rare_event,
        expected_total=size,
        expected_event_total=sum(r.event == filter_event for r in rows),
        expected_rare_total=sum(r.event == rare_event for r in rows),
        expected_window_total=sum(since <= r.timestamp_us < until for r in rows),
    )



def grpc_workload(workload: str) -> tuple[str, int, list[bytes]]:
    """(RPC method, events per call, prebuilt requests) of grpc_track / grpc_batch /
    grpc_batch_feed_off / grpc_batch_msgid / grpc_batch_replay."""
    if workload == "grpc_track":
        return "Track", 1, grpc_track_payloads(2_000)
    message_ids = workload in ("grpc_batch_msgid", "grpc_batch_replay")  # grpc_batch_feed_off: as grpc_batch
    return "TrackBatch", BATCH_SIZE, grpc_batch_payloads(200, message_ids=message_ids)


def rest_workload(workload: str) -> tuple[str, int, list[str]]:
    """(path, events per request, prebuilt bodies) of rest_track / rest_batch."""
    if workload == "rest_track":
        return "/api/v1/track", 1, rest_track_bodies(2_000)
    return "/api/v1/track/batch", BATCH_SIZE, rest_batch_bodies(200)
