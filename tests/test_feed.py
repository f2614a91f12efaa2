"""The real-time feed on both stores: StreamEvents over gRPC and REST, and the stream itself."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import grpc
import httpx
import nats
import pytest
from feed_support import WAIT, Reader
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from hypothesis import given
from hypothesis import strategies as st

from flameup.events.v1 import events_pb2 as pb
from service.feed.subjects import decode_token, encode_token, event_filters, event_subject

NAMES = ["signup", "page.view", "a b*>c", "größe ✓", "~%2E"]


def uid() -> str:
    return f"user_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def ws(service):
    """A workspace of the test's own, its key and a stub."""
    workspace = f"ws_feed_{uuid.uuid4().hex[:10]}"
    key = service.create_key(workspace)

    class Ws:
        id = workspace
        metadata = service.metadata(key)
        stub = service.stub()
        http = httpx.Client(base_url=service.http_url, headers={"Authorization": f"Bearer {key}"}, timeout=WAIT)

        def track(self, event: str = "signup", external_id: str | None = None) -> str:
            request = pb.TrackRequest(external_id=external_id or uid(), event=event)
            reply = self.stub.Track(request, metadata=self.metadata, timeout=10)
            return reply.event_id

        def reader(self, **request) -> Reader:
            return Reader(self.stub, self.metadata, pb.StreamEventsRequest(**request))

    yield Ws()
    Ws.http.close()


# Subject tokens -------------------------------------------------------------

@given(st.text(min_size=1, max_size=300))
def test_an_event_token_is_one_subject_token_and_gives_the_name_back(name):
    token = encode_token(name)
    assert token and not set(token) & set(". *>\t\r\n") and token.isascii() and token.isprintable()
    assert decode_token(token) == name


def test_plain_names_stay_readable_and_the_encoding_is_documented_percent_encoding():
    assert encode_token("purchase_completed") == "purchase_completed"
    assert encode_token("page.view") == "page%2Eview"
    assert encode_token("größe") == "gr%C3%B6%C3%9Fe"
    assert event_subject("ws_a", "a b") == "flameup.events.ws_a.a%20b"
    assert event_filters("ws_a") == ["flameup.events.ws_a.*"]
    with pytest.raises(ValueError):
        decode_token("a.b")


# The message body ------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.text(max_size=8)
    | st.integers(min_value=-(2**53), max_value=2**53)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=12,
)


@given(st.dictionaries(st.text(max_size=6), json_values, max_size=5),
       st.integers(min_value=0, max_value=4_000_000_000_000_000), st.sampled_from([0, 1000, 123_456, 7]))
def test_the_body_is_the_event_as_the_gateway_writes_it(parameters, ts_us, micros):
    from gateway.transcode import CodecRegistry
    from service import domain
    from service.domain import StoredEvent
    from service.feed.render import event_json
    from service.messages import event_message

    stored = StoredEvent("evt_" + "0" * 32, "ws_a", "p", "x", "größe.✓", domain.canonical_parameters("p", parameters),
                         ts_us, ts_us - ts_us % 1_000_000 + micros)
    gateway = CodecRegistry().for_class(pb.Event).to_json(event_message(stored))
    assert json.loads(event_json(stored)) == gateway
    assert list(json.loads(event_json(stored))) == list(gateway)  # the fields in the same order


# StreamEvents over gRPC ---------------------------------------------------------

def test_a_tracked_event_is_delivered_once_with_the_listed_json(service, ws):
    reader = ws.reader()
    try:
        event_id = ws.track("signup")
        (got,) = reader.take(1)
        assert got.event.id == event_id and got.event.workspace_id == ws.id and got.cursor
        assert reader.nothing_more()
    finally:
        reader.close()
    listed = ws.http.get(f"/api/v1/people/{got.event.person_id}/events").json()["events"][0]
    assert listed == json.loads(json.dumps(_rest_json(got.event)))


def _rest_json(event: pb.Event) -> dict:
    from google.protobuf import json_format

    return json_format.MessageToDict(event, preserving_proto_field_name=True)


def test_resume_after_a_cursor_has_no_gap_and_no_duplicate(service, ws):
    reader = ws.reader()
    person = uid()  # the order holds per person
    try:
        ids = [ws.track("signup", person) for _ in range(5)]
        first = reader.take(2)
    finally:
        reader.close()
    more = [ws.track("signup", person) for _ in range(3)]
    again = ws.reader(after=first[-1].cursor)
    try:
        rest = again.take(6)
        assert again.nothing_more()
    finally:
        again.close()
    assert [r.event.id for r in first + rest] == ids + more


def test_since_starts_at_a_time_and_the_filters_keep_only_the_named_events(service, ws):
    since = time.time()
    person = uid()
    ids = {name: ws.track(name, person) for name in NAMES}
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(since - 1)) + "Z"
    reader = ws.reader(since=_ts(stamp), events=["page.view", "a b*>c", "größe ✓"])
    try:
        got = reader.take(3)
        assert reader.nothing_more()
    finally:
        reader.close()
    assert [r.event.id for r in got] == [ids["page.view"], ids["a b*>c"], ids["größe ✓"]]


def test_a_key_sees_only_its_own_workspace(service, ws):
    other_key = service.create_key(f"ws_feed_other_{uuid.uuid4().hex[:8]}")
    other = Reader(service.stub(), service.metadata(other_key), pb.StreamEventsRequest())
    mine = ws.reader()
    try:
        event_id = ws.track("signup")
        (got,) = mine.take(1)
        assert got.event.id == event_id
        assert other.nothing_more()
        with pytest.raises(grpc.RpcError) as err:  # a cursor of another workspace
            Reader(service.stub(), service.metadata(other_key), pb.StreamEventsRequest(after=got.cursor)).take(1)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        mine.close()
        other.close()


def test_stream_events_needs_the_read_scope_and_checks_its_request(service, ws):
    write_only = service.create_key(ws.id, "events:write")
    with pytest.raises(grpc.RpcError) as err:
        list(ws.stub.StreamEvents(pb.StreamEventsRequest(), metadata=service.metadata(write_only), timeout=10))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as err:
        list(ws.stub.StreamEvents(pb.StreamEventsRequest(), metadata=[("authorization", "Bearer nope")], timeout=10))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    for request, field in ((pb.StreamEventsRequest(events=["ok", ""]), "events[1]"),
                           (pb.StreamEventsRequest(after="12"), "after"),
                           (pb.StreamEventsRequest(after="1-abcdef01", since=_ts("2020-01-01T00:00:00Z")), "after")):
        with pytest.raises(grpc.RpcError) as err:
            list(ws.stub.StreamEvents(request, metadata=ws.metadata, timeout=10))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        detail = error_details_pb2.BadRequest()
        assert rpc_status.from_call(err.value).details[0].Unpack(detail)
        assert detail.field_violations[0].field == field


# The stream on NATS ------------------------------------------------------------

def test_the_stream_holds_the_event_json_under_its_subject_with_the_id_header(service, ws):
    name = "page.view ✓"
    event_id = ws.track(name)
    person = None

    async def find():
        nc = await nats.connect(service.nats_url)
        try:
            sub = await nc.jetstream().subscribe(event_subject(ws.id, name), ordered_consumer=True,
                                                 stream="FLAMEUP_EVENTS")
            return await sub.next_msg(timeout=WAIT)
        finally:
            await nc.close()

    msg = asyncio.run(find())
    assert msg.headers["Nats-Msg-Id"] == event_id
    body = json.loads(msg.data)
    person = body["person_id"]
    listed = ws.http.get(f"/api/v1/people/{person}/events").json()["events"]
    assert body == next(e for e in listed if e["id"] == event_id)
    assert decode_token(msg.subject.split(".")[-1]) == name


# REST ------------------------------------------------------------------------

def _lines(response, n: int) -> list[dict]:
    out = []
    for line in response.iter_lines():
        if line:
            out.append(json.loads(line))
            if len(out) == n:
                break
    return out


def test_rest_streams_json_lines_as_grpc_gateway_does(service, ws):
    person = uid()
    ids = [ws.track("signup", person) for _ in range(2)]
    with ws.http.stream("GET", "/api/v1/events/stream", params={"since": "2000-01-01T00:00:00Z"}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("application/json")
        got = _lines(response, 2)
    assert [g["result"]["event"]["id"] for g in got] == ids and all(g["result"]["cursor"] for g in got)
    with ws.http.stream("GET", "/api/v1/events/stream", params={"after": got[0]["result"]["cursor"]}) as response:
        (rest,) = _lines(response, 1)
    assert rest["result"]["event"]["id"] == ids[1]


def test_rest_errors_before_the_first_message_are_ordinary_responses(service, ws):
    bad = ws.http.get("/api/v1/events/stream", params={"after": "not-a-cursor"})
    assert bad.status_code == 400 and bad.json()["code"] == 3
    assert bad.json()["details"][0]["field_violations"][0]["field"] == "after"
    assert httpx.get(f"{service.http_url}/api/v1/events/stream").status_code == 401


def test_server_sent_events_carry_the_cursor_as_id_and_resume_with_last_event_id(service, ws):
    person = uid()
    ids = [ws.track("signup", person) for _ in range(3)]
    sse = {"Accept": "text/event-stream"}
    with ws.http.stream("GET", "/api/v1/events/stream", params={"since": "2000-01-01T00:00:00Z"},
                        headers=sse) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = _sse(response, 1)
    assert events[0]["event"] == "event" and json.loads(events[0]["data"])["id"] == ids[0]
    with ws.http.stream("GET", "/api/v1/events/stream", params={"since": "2000-01-01T00:00:00Z"},
                        headers={**sse, "Last-Event-ID": events[0]["id"]}) as response:
        rest = _sse(response, 2)
    assert [json.loads(e["data"])["id"] for e in rest] == ids[1:]


def _sse(response, n: int) -> list[dict]:
    out, current = [], {}
    for line in response.iter_lines():
        if not line:
            if "data" in current:
                out.append(current)
                if len(out) == n:
                    return out
            current = {}
        elif not line.startswith(":"):
            field, _, value = line.partition(": ")
            current[field] = value
    return out


def test_a_stalled_consumer_holds_back_neither_ingest_nor_another_consumer(service, ws):
    stalled = ws.http.stream("GET", "/api/v1/events/stream")
    stalled.__enter__()  # a response that is never read
    reader = ws.reader()
    try:
        person = uid()
        ids = []
        for _ in range(20):
            batch = ws.stub.TrackBatch(pb.TrackBatchRequest(events=[
                pb.TrackRequest(external_id=person, event="bulk", parameters=_params(2000)) for _ in range(100)]),
                metadata=ws.metadata, timeout=30)
            ids.extend(batch.event_ids)
        got = reader.take(len(ids))
        assert [g.event.id for g in got] == ids
    finally:
        reader.close()
        stalled.__exit__(None, None, None)


def _params(size: int):
    from google.protobuf import struct_pb2

    s = struct_pb2.Struct()
    s.update({"blob": "x" * size})
    return s


def _ts(text: str):
    from google.protobuf import timestamp_pb2

    t = timestamp_pb2.Timestamp()
    t.FromJsonString(text)
    return t
