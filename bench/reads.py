"""list_person: one person's newest page over the gRPC API, sequential calls.

Every answer is checked: `total` must be the exact count of the person's
matching events and the page must hold min(limit, total) events, newest first.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import timestamp_pb2

from bench.data import Person
from bench.metrics import percentile
from flameup.events.v1 import events_pb2 as pb
from flameup.events.v1 import events_pb2_grpc

LIMIT = 50


@dataclass
class ReadResult:
    workload: str
    calls: int
    p50_ms: float
    p99_ms: float
    mean_ms: float
    total: int
    first_ms: float  # the first call of the variant, before the warm-up: what a cold read pays


def _ts(us: int) -> timestamp_pb2.Timestamp:
    seconds, micros = divmod(us, 1_000_000)
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=micros * 1000)


def variants(p: Person) -> list[tuple[str, pb.ListPersonEventsRequest, int]]:
    """(workload name, request, expected total) for no filter, an event filter, a window, and a rare event."""
    base = f"list_person_{p.label}"
    since, until = p.window
    return [
        (base, pb.ListPersonEventsRequest(person_id=p.person_id, limit=LIMIT), p.expected_total),
        (f"{base}_event", pb.ListPersonEventsRequest(person_id=p.person_id, limit=LIMIT, event=p.filter_event),
         p.expected_event_total),
        (f"{base}_window", pb.ListPersonEventsRequest(person_id=p.person_id, limit=LIMIT, since=_ts(since),
                                                      until=_ts(until)), p.expected_window_total),
        (f"{base}_rare", pb.ListPersonEventsRequest(person_id=p.person_id, limit=LIMIT, event=p.rare_event),
         p.expected_rare_total),
    ]


def measure(target: str, key: str, person: Person, calls: int, warmup_calls: int = 10) -> list[ReadResult]:
    with stub_for(target) as stub:
        return [timed(workload, lambda r=request: stub.ListPersonEvents(r, metadata=auth(key), timeout=30),
                      lambda response, w=workload, e=expected, r=request: _check(w, response, e, r),
                      calls, warmup_calls, expected)
                for workload, request, expected in variants(person)]


def auth(key: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {key}"),)


@contextlib.contextmanager
def stub_for(target: str) -> Iterator[events_pb2_grpc.EventsServiceStub]:
    with grpc.insecure_channel(target) as channel:
        grpc.channel_ready_future(channel).result(timeout=30)  # first_ms: the call, not the connection
        yield events_pb2_grpc.EventsServiceStub(channel)


def timed(workload: str, call: Callable[[], Any], check: Callable[[Any], None], calls: int, warmup_calls: int,
          total: int) -> ReadResult:
    """``calls`` sequential calls after ``warmup_calls``; the first call's answer and
    the first measured one are checked."""
    latencies = []
    first = 0.0
    for i in range(warmup_calls + calls):
        started = time.perf_counter()
        response = call()
        elapsed = (time.perf_counter() - started) * 1000
        if i == 0:
            first = elapsed
        if i >= warmup_calls:
            latencies.append(elapsed)
        if i == 0 or i == warmup_calls:
            check(response)
    latencies.sort()
    return ReadResult(workload, calls, percentile(latencies, 50), percentile(latencies, 99),
                      statistics.fmean(latencies), total, first)


def _check(workload: str, response: pb.ListPersonEventsResponse, expected: int,
           request: pb.ListPersonEventsRequest) -> None:
    if response.total != expected:
        raise AssertionError(f"{workload}: total {response.total}, expected {expected}")
    if len(response.events) != min(LIMIT, expected):
        raise AssertionError(f"{workload}: {len(response.events)} events on the page, expected {min(LIMIT, expected)}")
    keys = [(e.timestamp.seconds, e.timestamp.nanos, e.id) for e in response.events]
    if keys != sorted(keys, reverse=True):
        raise AssertionError(f"{workload}: the page is not newest first")
    if request.event and any(e.event != request.event for e in response.events):
        raise AssertionError(f"{workload}: the page holds events other than {request.event!r}")

