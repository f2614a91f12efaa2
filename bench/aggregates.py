"""person_summary and event_counts: the aggregate reads over the gRPC API, sequential calls.

- ``person_summary_<size>``: GetPersonSummary of the list_person persons; the
  answer's total must be the person's size.
- ``event_counts_<day|hour>_<big|small>``: GetEventCounts, 30 daily and 168
  hourly buckets ending with the current day or hour, over the benchmark's workspace
  (the ingest runs' millions of events: ``big``) and over a workspace of 10,000
  events loaded before the service starts (``small``, whose counts are checked
  exactly).
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import grpc
from google.protobuf import timestamp_pb2

from bench import data
from bench.data import EVENT_NAMES, Person
from bench.metrics import percentile
from bench.reads import ReadResult, timed
from flameup.events.v1 import events_pb2_grpc
from flameup.events.v1 import events_pb2 as pb
from service import domain
from service.domain import DAY_US, HOUR_US, StoredEvent

SMALL_WORKSPACE = "ws_bench_small"
SMALL_EVENTS = 10_000
SMALL_PERSONS = 500
COUNT_EVENT = "purchase_completed"
# (interval, bucket size, buckets): 30 days, a week of hours
RANGES = (("day", DAY_US, 30), ("hour", HOUR_US, 168))


def small_workspace_rows(end_us: int) -> list[StoredEvent]:
    """SMALL_EVENTS events of SMALL_PERSONS persons spread over the 30 days before ``end_us``."""
    created = domain.now_us()
    params = domain.canonical_parameters("parameters", data.item(0).parameters)
    rows = []
    for i in range(SMALL_EVENTS):
        external_id = f"small_{i % SMALL_PERSONS:04d}"
        ts = end_us - 1 - 30 * DAY_US * i // SMALL_EVENTS
        rows.append(StoredEvent(domain.new_event_id(created), SMALL_WORKSPACE,
                                domain.person_id_for(SMALL_WORKSPACE, external_id), external_id,
                                EVENT_NAMES[i % len(EVENT_NAMES)], params, ts, created))
    return rows


def range_end(now_us: int, size: int = HOUR_US) -> int:
    """The end of a measured range: the next whole bucket (so the current one is in it)."""
    return -(-now_us // size) * size


@contextmanager
def _stub(target: str) -> Iterator[events_pb2_grpc.EventsServiceStub]:
    with grpc.insecure_channel(target) as channel:
        grpc.channel_ready_future(channel).result(timeout=30)  # first_ms: the call, not the connection
        yield events_pb2_grpc.EventsServiceStub(channel)


def _measure(workload: str, call: Callable[[], Any], check: Callable[[Any], None], calls: int,
             total: int, warmup_calls: int = 10) -> ReadResult:
    """Sequential calls; the first answer and the first measured one are checked."""
    latencies, first = timed(call, calls, warmup_calls,
                             lambda i, response: check(response) if i in (0, warmup_calls) else None)
    return ReadResult(workload, calls, percentile(latencies, 50), percentile(latencies, 99),
                      statistics.fmean(latencies), total, first)


def _ts(us: int) -> timestamp_pb2.Timestamp:
    seconds, micros = divmod(us, 1_000_000)
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=micros * 1000)


def measure_summaries(target: str, key: str, persons: list[Person], calls: int) -> list[ReadResult]:
    results = []
    metadata = (("authorization", f"Bearer {key}"),)
    with _stub(target) as stub:
        for p in persons:
            request = pb.GetPersonSummaryRequest(person_id=p.person_id)

            def check(response: pb.GetPersonSummaryResponse, p: Person = p) -> None:
                counted = Counter(r.event for r in p.rows)
                got = {e.event: e.count for e in response.events}
                if response.total != p.size or got != counted:
                    raise AssertionError(f"person_summary_{p.label}: total {response.total}, expected {p.size}")

            results.append(_measure(f"person_summary_{p.label}",
                                    lambda r=request: stub.GetPersonSummary(r, metadata=metadata, timeout=60),
                                    check, calls, p.size))
    return results


def measure_counts(target: str, key: str, label: str, now_us: int, calls: int,
                   expected_rows: list[StoredEvent] | None = None) -> list[ReadResult]:
    """GetEventCounts of COUNT_EVENT over RANGES, each ending with the bucket that holds
    ``now_us``; with ``expected_rows``, every bucket is checked exactly."""
    results = []
    metadata = (("authorization", f"Bearer {key}"),)
    with _stub(target) as stub:
        for interval, size, buckets in RANGES:
            end_us = range_end(now_us, size)
            request = pb.GetEventCountsRequest(event=COUNT_EVENT, interval=interval, since=_ts(end_us - buckets * size),
                                               until=_ts(end_us))
            want = None
            if expected_rows is not None:
                want = [0] * buckets
                for r in expected_rows:
                    if r.event == COUNT_EVENT and end_us - buckets * size <= r.timestamp_us < end_us:
                        want[(r.timestamp_us - (end_us - buckets * size)) // size] += 1

            def check(response: pb.GetEventCountsResponse, workload: str = f"event_counts_{interval}_{label}",
                      buckets: int = buckets, want: list[int] | None = want) -> None:
                if len(response.buckets) != buckets:
                    raise AssertionError(f"{workload}: {len(response.buckets)} buckets, expected {buckets}")
                got = [b.count for b in response.buckets]
                if want is not None and got != want:
                    raise AssertionError(f"{workload}: counts {got}, expected {want}")
                if any(b.unique_persons > b.count for b in response.buckets):
                    raise AssertionError(f"{workload}: more persons than events in a bucket")

            results.append(_measure(f"event_counts_{interval}_{label}",
                                    lambda r=request: stub.GetEventCounts(r, metadata=metadata, timeout=60),
                                    check, calls, sum(want) if want else 0))
    return results
