"""Schemathesis fuzzes the live REST gateway from the OpenAPI document it serves.

Every operation gets schema-valid and schema-invalid requests, authenticated
with a real key, on both stores, and every built-in check runs on each
response: no 5xx, documented status codes and content types, responses that
match their schemas, valid data accepted and invalid data rejected. On top,
each tracking call is checked against the store: an accepted event is stored,
a rejected one is not.
"""

from __future__ import annotations

import json
import re
from datetime import datetime

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from buf.validate import validate_pb2
from flameup.events.v1 import events_pb2, events_pb2_grpc
from gateway.openapi import openapi_document
from service import domain

WORKSPACE = "ws_fuzz"
TIMESTAMP_FORM = re.compile(
    events_pb2.TrackRequest.DESCRIPTOR.fields_by_name["timestamp"].GetOptions().Extensions[validate_pb2.field].string.pattern
)


@pytest.fixture(scope="session")
def fuzz_key(service):
    return service.create_key(WORKSPACE)


@pytest.fixture(scope="session")
def fuzz_stub(service):
    with service.channel() as channel:
        yield events_pb2_grpc.EventsServiceStub(channel)


# The document the gateway serves (test_openapi checks it is this one). Loaded
# directly: schemathesis' fixture-based loader does not run under pytest 9.
# The event stream is left out: a valid request never ends (tests/test_feed.py covers it).
schema = schemathesis.openapi.from_dict(json.loads(openapi_document())).exclude(path="/api/v1/events/stream")
# Unknown query parameters are ignored, as grpc-gateway does (the contract's
# "unknown request fields are ignored"): adding one does not make a request invalid.
schema.config.generation.update(allow_extra_parameters=False)
A_TIME = "2024-01-15T10:30:00Z"


@schema.hook("map_case")
def within_the_rules_json_schema_cannot_state(ctx, case):
    """Keep generated requests inside the rules the document states only in
    words (see the proto comments), so that "schema-valid" means valid: a
    well-formed timestamp or sent_at is a real time, and the timestamp, shifted
    by sent_at's clock error, is not before 1970 nor more than a day ahead;
    since < until; person_id is a UUID unless id_type is external_id; a page
    token is one the service issued (none here); event counts span at most
    1,000 buckets. Only values the schema allows
    are changed, so invalid requests stay invalid."""
    batch_sent_at = _real_sent_at(case.body) if case.path.endswith("/batch") else None
    for item in _items(case):
        if not isinstance(item, dict):
            continue
        sent_at = _real_sent_at(item) or batch_sent_at
        timestamp = item.get("timestamp")
        if isinstance(timestamp, str) and TIMESTAMP_FORM.search(timestamp) and timestamp:
            now = domain.now_us()
            try:
                skew = domain.clock_skew("sent_at", sent_at, now) if sent_at else 0
                domain.check_event_time("timestamp", domain.parse_timestamp("timestamp", timestamp) + skew, now)
            except domain.ValidationError:
                item["timestamp"] = sent_at or A_TIME  # a timestamp equal to sent_at is "now"
    if case.query is None:
        case.query = {}
    query, path = case.query, case.path_parameters or {}
    if query.get("page_token"):
        query["page_token"] = ""
    since, until = _datetime(query.get("since")), _datetime(query.get("until"))
    if since is not None and until is not None and since >= until:
        query["since"], query["until"] = query["until"], query["since"]
        if since == until:
            del query["until"]
    interval = query.get("interval")
    interval_us = domain.INTERVALS.get(interval) if isinstance(interval, str) else None
    if case.path == "/api/v1/events/counts" and interval_us and _datetime(query.get("since")) is not None:
        # at most 1,000 buckets: without since the range is the 30 days before until
        until_us = domain.now_us() if _datetime(query.get("until")) is None else domain.parse_timestamp(
            "until", query["until"])
        if -(-until_us // interval_us) - domain.parse_timestamp("since", query["since"]) // interval_us > 1000:
            del query["since"]
    person_id = path.get("person_id")
    if isinstance(person_id, str) and query.get("id_type", "") in ("", "person_id"):
        try:
            domain.parse_person_id("person_id", person_id)
        except domain.ValidationError:
            query["id_type"] = "external_id"
    return case


def _real_sent_at(body) -> str | None:
    """A body's well-formed sent_at, made a real time when it is not one; None when absent or malformed."""
    sent_at = body.get("sent_at") if isinstance(body, dict) else None
    if not (isinstance(sent_at, str) and sent_at and TIMESTAMP_FORM.search(sent_at)):
        return None
    try:
        domain.parse_timestamp("sent_at", sent_at)
    except domain.ValidationError:
        body["sent_at"] = sent_at = A_TIME
    return sent_at


def _datetime(text):
    try:
        return datetime.fromisoformat(text) if isinstance(text, str) else None
    except ValueError:
        return None


def _items(case) -> list:
    """The events a tracking request carries, as sent (any JSON)."""
    body = case.body
    if case.path.endswith("/batch"):
        body = body.get("events") if isinstance(body, dict) else None
        return body if isinstance(body, list) else []
    return [body]


def _external_ids(case) -> list[str]:
    """The valid external ids a tracking request names: the people whose events it may store."""
    valid = set()
    for item in _items(case):
        external_id = item.get("external_id") if isinstance(item, dict) else None
        if isinstance(external_id, str):
            try:
                valid.add(domain.check_name("external_id", external_id))
            except domain.ValidationError:
                pass
    return sorted(valid)


def _stored(stub, service, key: str, external_id: str) -> int:
    reply = stub.ListPersonEvents(
        events_pb2.ListPersonEventsRequest(person_id=external_id, id_type="external_id", limit=1),
        metadata=service.metadata(key),
    )
    return reply.total


@schema.parametrize()
@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
def test_rest_api_conforms_to_its_openapi_document(case, service, fuzz_key, fuzz_stub):
    tracking = case.method == "POST"
    people = _external_ids(case) if tracking else []
    before = {p: _stored(fuzz_stub, service, fuzz_key, p) for p in people}
    response = case.call_and_validate(base_url=service.http_url, headers={"Authorization": f"Bearer {fuzz_key}"})
    assert response.status_code < 500, response.text
    if not tracking:
        return
    body = response.json()
    accepted: dict[str, int] = dict.fromkeys(people, 0)
    if response.status_code == 200:  # a duplicate (an earlier example's message_id) stores nothing
        ids = body["event_ids"] if case.path.endswith("/batch") else [body["event_id"]]
        duplicates = set(body["duplicates"]) if case.path.endswith("/batch") else {0} if body["duplicate"] else set()
        for index, (item, event_id) in enumerate(zip(_items(case), ids, strict=True)):
            if event_id and index not in duplicates:
                accepted[item["external_id"]] += 1
    for person in people:
        assert _stored(fuzz_stub, service, fuzz_key, person) == before[person] + accepted[person], (person, body)
