"""The proto's buf.validate rules and the service's own validation agree.

The service enforces the contract itself (service/domain.py, service/events.py:
field-path errors, one bad event of a batch costs only that event); the proto
states the same rules for every client and generator. Hypothesis generates
messages near every edge and protovalidate must accept exactly what the
service accepts.

A few rules no annotation can state stay with the service alone: the
parameters' size, depth and finite numbers, and whether a well-formed
timestamp is a real date no more than 24 hours ahead. The generators keep
those in range, and the last test pins the gap down.
"""

from __future__ import annotations

import asyncio
import functools
import re
from datetime import datetime, timedelta, timezone

import protovalidate
import pytest
from google.protobuf import timestamp_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from buf.validate import validate_pb2
from flameup.events.v1 import events_pb2
from service import domain
from service.domain import ValidationError
from service.events import EventsCore
from service.servicer import list_input, track_input

WORKSPACE = "ws_rules"
NOW_US = domain.now_us()


class _Discard:
    async def append(self, events) -> list[None]:
        return [None] * len(events)  # "stored"


CORE = EventsCore(_Discard(), clock=lambda: NOW_US)
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

CONTROL = [chr(c) for c in (*range(0x20), *range(0x7F, 0xA0))]
names = st.one_of(
    st.text(max_size=12),
    st.text(st.characters(codec="utf-8"), min_size=250, max_size=260),
    st.sampled_from(["", "a" * 255, "a" * 256, "é" * 255, "é" * 256, "😀" * 255, "😀" * 256, " ", "\u00a0", "\u2028"]),
    st.builds(lambda a, c, b: a + c + b, st.text(max_size=3), st.sampled_from(CONTROL), st.text(max_size=3)),
)
_recent = st.datetimes(
    min_value=datetime(1970, 1, 2), max_value=datetime.fromtimestamp(NOW_US / 1e6) - timedelta(days=1)
)


def _rfc3339(moment: datetime, sep: str, digits: int, zone: str) -> str:
    fraction = f".{moment.microsecond:06d}000"[: digits + 1] if digits else ""
    if zone in ("Z", "z"):
        return moment.strftime(f"%Y-%m-%d{sep}%H:%M:%S") + fraction + zone
    offset = timedelta(hours=int(zone[1:3]), minutes=int(zone[4:])) * (1 if zone[0] == "+" else -1)
    return (moment + offset).strftime(f"%Y-%m-%d{sep}%H:%M:%S") + fraction + zone


TIMESTAMP_FORM = re.compile(
    events_pb2.TrackRequest.DESCRIPTOR.fields_by_name["timestamp"].GetOptions().Extensions[validate_pb2.field].string.pattern
)
timestamps = st.one_of(
    st.just(""),
    st.builds(_rfc3339, _recent, st.sampled_from("Tt "), st.integers(0, 9), st.sampled_from(["Z", "z", "+05:30", "-08:00"])),
    st.text(max_size=30).filter(lambda text: not TIMESTAMP_FORM.search(text)),
    st.sampled_from([
        "2024-01-15T10:30:00",  # no zone
        "2024-13-15T10:30:00Z",
        "2024-01-15T24:00:00Z",
        "2024-01-15T10:30:00+05:60",
        "2024-01-15T10:30:00.Z",
        "2024-01-15T10:30:00.1234567890Z",  # ten fraction digits
        "2024-01-15T10:30:00Z\n",
        "\u0662\u0660\u0662\u0664-01-15T10:30:00Z",  # Arabic-Indic digits
        "2024-1-15T10:30:00Z",
        "2024-01-15_10:30:00Z",
    ]),
)
parameters = st.none() | st.dictionaries(
    st.text(max_size=5), st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=5), max_size=3
)


@st.composite
def track_requests(draw) -> events_pb2.TrackRequest:
    request = events_pb2.TrackRequest(external_id=draw(names), event=draw(names), timestamp=draw(timestamps),
                                      message_id=draw(names))  # empty: no message_id, valid
    if (params := draw(parameters)) is not None:
        request.parameters.update(params)
    return request


_uuids = st.uuids().map(str)
person_refs = st.one_of(
    names,
    _uuids,
    _uuids.map(str.upper),
    st.uuids().map(lambda u: u.hex),  # no hyphens
    _uuids.map(lambda u: "{" + u + "}"),
    _uuids.map(lambda u: "urn:uuid:" + u),
    _uuids.map(lambda u: u[:-1] + "g"),
)
int32 = st.one_of(st.integers(-3, 3), st.integers(497, 503), st.sampled_from([-(2**31), 2**31 - 1]))
seconds = st.integers(0, 4_102_444_800)  # 1970 to 2100
nanos = st.integers(0, 999_999_999)


@st.composite
def list_requests(draw) -> events_pb2.ListPersonEventsRequest:
    request = events_pb2.ListPersonEventsRequest(
        person_id=draw(person_refs),
        id_type=draw(st.sampled_from(["", "person_id", "external_id", "External_id", "external_id ", "uuid"])),
        event=draw(st.just("") | names),
    )
    if (limit := draw(st.none() | int32)) is not None:
        request.limit = limit
    if (offset := draw(st.none() | int32)) is not None:
        request.offset = offset
    since = None
    if draw(st.booleans()):
        since = timestamp_pb2.Timestamp(seconds=draw(seconds), nanos=draw(nanos))
        request.since.CopyFrom(since)
    if draw(st.booleans()):
        if since is not None and draw(st.booleans()):  # near since: the edge of since < until
            delta = draw(st.sampled_from([-1000, -1, 0, 1, 999, 1000, 1001, 86_400 * 10**9]))
            request.until.FromNanoseconds(max(0, since.ToNanoseconds() + delta))
        else:
            request.until.CopyFrom(timestamp_pb2.Timestamp(seconds=draw(seconds), nanos=draw(nanos)))
    return request


def protovalidate_accepts(message) -> bool:
    return not protovalidate.collect_violations(message)


def service_accepts(check, *args) -> bool:
    try:
        check(*args)
    except ValidationError:
        return False
    return True


@SETTINGS
@given(track_requests())
def test_track_request(request):
    service = service_accepts(CORE.prepare, WORKSPACE, track_input(request), NOW_US)
    assert service == protovalidate_accepts(request), protovalidate.collect_violations(request)


@SETTINGS
@given(list_requests())
def test_list_person_events_request(request):
    service = service_accepts(EventsCore.list_query, WORKSPACE, list_input(request))
    assert service == protovalidate_accepts(request), protovalidate.collect_violations(request)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(track_requests(), min_size=1, max_size=8), st.sampled_from([1, 2, 99, 100, 101]))
def test_each_batch_item_and_the_batch_size(items, size):
    """The service rejects exactly the events protovalidate finds fault with, each
    checked as a TrackRequest; the batch as a whole only for its size."""
    batch = events_pb2.TrackBatchRequest(events=(items * size)[:size])
    inputs = [track_input(item) for item in batch.events]
    try:
        result = asyncio.run(CORE.track_batch(WORKSPACE, inputs))
    except ValidationError as exc:
        assert [v.field for v in exc.violations] == ["events"]
        assert [v.proto.rule_id for v in protovalidate.collect_violations(batch)] == ["repeated.max_items"]
        return
    assert protovalidate_accepts(batch)  # the items' own rules are not the batch's
    rejected = {index for index, _ in result.errors}
    assert rejected == {i for i, item in enumerate(batch.events) if not protovalidate_accepts(item)}


@pytest.mark.parametrize("size", [0, 1, 100, 101])
def test_batch_size_bounds(size):
    batch = events_pb2.TrackBatchRequest(events=[events_pb2.TrackRequest(external_id="u", event="e")] * size)
    inputs = [track_input(item) for item in batch.events]
    service = service_accepts(lambda: asyncio.run(CORE.track_batch(WORKSPACE, inputs)))
    assert service == protovalidate_accepts(batch) == (1 <= size <= 100)


@pytest.mark.parametrize(
    "request_fields",
    [
        {"timestamp": "2024-02-30T10:30:00Z"},  # no such day
        {"timestamp": "2023-02-29T10:30:00Z"},  # not a leap year
        {"timestamp": "1969-12-31T23:59:59Z"},  # before the epoch
        {"timestamp": "9999-01-01T00:00:00Z"},  # more than 24 hours ahead
        {"parameters": {"n": float("nan")}},
        {"parameters": {"a": functools.reduce(lambda inner, _: [inner], range(33), [])}},  # 34 deep
        {"parameters": {"a": "x" * 40_000}},  # over 32 KiB
    ],
)
def test_rules_only_the_service_can_check(request_fields):
    """Well-formed as far as the annotations can tell, rejected by the service."""
    parameters = request_fields.pop("parameters", None)
    request = events_pb2.TrackRequest(external_id="u", event="e", **request_fields)
    if parameters is not None:
        request.parameters.update(parameters)
    assert protovalidate_accepts(request)
    assert not service_accepts(CORE.prepare, WORKSPACE, track_input(request), NOW_US)
