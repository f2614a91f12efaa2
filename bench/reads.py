"""list_person: one person's newest page over the gRPC API, sequential calls.

Every answer is checked: `total` must be the exact count of the person's
matching events and the page must hold min(limit, total) events, newest first.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import timestamp_pb2

from bench.data import Person
from bench.metrics import percentile
from flameup.events.v1 import events_pb2 as pb
from flameup.events.v1 import events_pb2_grpc

LIMIT = 50
# Cursor paging: pages of CURSOR_LIMIT, the deep page being page CURSOR_DEPTH (or the
# person's last full page when it has fewer).
CURSOR_LIMIT = 100
CURSOR_DEPTH = 1_000


@dataclass
class ReadResult:
    workload: str
    calls: int
    p50_ms: float
    p99_ms: float
    mean_ms: float
    total: int
    first_ms: float  # the first call of the variant, before the warm-up: what a cold read pays
    page: int = 1  # the page number, for the cursor variants


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
    metadata = (("authorization", f"Bearer {key}"),)
    results = []
    with grpc.insecure_channel(target) as channel:
        grpc.channel_ready_future(channel).result(timeout=30)  # first_ms: the call, not the connection
        stub = events_pb2_grpc.EventsServiceStub(channel)
        for workload, request, expected in variants(person):
            def check(i: int, response, workload=workload, expected=expected, request=request) -> None:
                if i == 0 or i == warmup_calls:
                    _check(workload, response, expected, request)

            latencies, first = timed(lambda r=request: stub.ListPersonEvents(r, metadata=metadata, timeout=60), calls,
                                     warmup_calls, check)
            results.append(ReadResult(
                workload, calls, percentile(latencies, 50), percentile(latencies, 99),
                statistics.fmean(latencies), expected, first,
            ))
    return results


def timed(call: Callable[[], Any], calls: int, warmup_calls: int,
          check: Callable[[int, Any], None]) -> tuple[list[float], float]:
    """Sequential calls: the latencies after the warm-up (sorted, ms) and the first call's;
    ``check(i, response)`` sees every answer."""
    latencies, first = [], 0.0
    for i in range(warmup_calls + calls):
        started = time.perf_counter()
        response = call()
        elapsed = (time.perf_counter() - started) * 1000
        if i == 0:
            first = elapsed
        if i >= warmup_calls:
            latencies.append(elapsed)
        check(i, response)
    latencies.sort()
    return latencies, first


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



def measure_cursor(target: str, key: str, person: Person, calls: int, warmup_calls: int = 10) -> list[ReadResult]:
    """Page 1 and the deep page of the person by page token (limit CURSOR_LIMIT), and the
    same deep page by offset, each called repeatedly; the walk to the deep page is
    checked: every event once, newest first, and the deep page equals the offset one."""
    metadata = (("authorization", f"Bearer {key}"),)
    depth = min(CURSOR_DEPTH, person.size // CURSOR_LIMIT)
    base = f"list_person_{person.label}"
    with grpc.insecure_channel(target) as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        stub = events_pb2_grpc.EventsServiceStub(channel)
        first = pb.ListPersonEventsRequest(person_id=person.person_id, limit=CURSOR_LIMIT)
        request, seen, last = first, set(), None
        for _ in range(depth - 1):  # the walk to the deep page
            response = stub.ListPersonEvents(request, metadata=metadata, timeout=60)
            keys = [(e.timestamp.seconds, e.timestamp.nanos, e.id) for e in response.events]
            if len(keys) != CURSOR_LIMIT or keys != sorted(keys, reverse=True) or (last and keys[0] >= last):
                raise AssertionError(f"{base}_cursor: a page of the walk is short or out of order")
            seen.update(k[2] for k in keys)
            last = keys[-1]
            request = pb.ListPersonEventsRequest(person_id=person.person_id, limit=CURSOR_LIMIT,
                                                 page_token=response.next_page_token)
        if len(seen) != (depth - 1) * CURSOR_LIMIT:
            raise AssertionError(f"{base}_cursor: the walk repeated events")
        offset = pb.ListPersonEventsRequest(person_id=person.person_id, limit=CURSOR_LIMIT,
                                            offset=(depth - 1) * CURSOR_LIMIT)
        deep_ids = [e.id for e in stub.ListPersonEvents(request, metadata=metadata, timeout=60).events]
        if deep_ids != [e.id for e in stub.ListPersonEvents(offset, metadata=metadata, timeout=60).events] \
                or seen.intersection(deep_ids):
            raise AssertionError(f"{base}_cursor: page {depth} by token differs from the same page by offset")
        results = []
        for workload, req in ((f"{base}_cursor_page1", first), (f"{base}_cursor_deep", request),
                              (f"{base}_offset_deep", offset)):
            def check(i: int, response, workload=workload) -> None:
                if i == 0 and (response.total != person.expected_total or len(response.events) != CURSOR_LIMIT):
                    raise AssertionError(f"{workload}: total {response.total}, {len(response.events)} events")

            latencies, first_ms = timed(lambda r=req: stub.ListPersonEvents(r, metadata=metadata, timeout=60), calls,
                                         warmup_calls, check)
            results.append(ReadResult(workload, calls, percentile(latencies, 50), percentile(latencies, 99),
                                      statistics.fmean(latencies), person.expected_total, first_ms, page=depth))
    return results
