"""The gRPC workers' Prometheus metrics (prometheus-client).

Under ``serve`` every process writes its values to files in
``PROMETHEUS_MULTIPROC_DIR`` (a directory in serve's private run directory,
set before any process starts), and the gateways serve their sum at
``/metrics`` on the REST port. A worker started on its own keeps them in its
own registry.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

REQUESTS = Counter(
    "flameup_grpc_requests",
    "EventsService calls answered, by method and gRPC status code",
    ["method", "code"],
)
LATENCY = Histogram(
    "flameup_grpc_request_seconds",
    "Time from a call's arrival in the worker to its answer, by method",
    ["method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
EVENTS_STORED = Counter("flameup_events_stored", "Events stored (accepted and committed)")
DUPLICATES = Counter(
    "flameup_duplicate_events", "Events answered as duplicates of an earlier event with the same message_id"
)
RATE_LIMITED = Counter(
    "flameup_rate_limited_requests",
    "Calls refused with RESOURCE_EXHAUSTED because their workspace was over its ingest limit",
    ["method"],
)
PEOPLE_DELETED = Counter("flameup_people_deleted", "DeletePerson calls that completed")
EVENTS_DELETED = Counter("flameup_events_deleted", "Events removed by DeletePerson")
