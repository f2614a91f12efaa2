"""The gRPC API against a real server process (both stores, via ``service``)."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import grpc
import pytest
from google.protobuf import struct_pb2, timestamp_pb2
from google.protobuf.internal.encoder import _VarintBytes
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from flameup.events.v1 import events_pb2 as pb
from service.domain import person_id_for
from service.servicer import REQUIRED_SCOPE, SERVICE_NAME


def uid() -> str:
    return f"user_{uuid.uuid4().hex[:12]}"


def struct(d) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(d)
    return s


def rfc3339(dt: datetime) -> str:
    return dt.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def bad_request(err: grpc.RpcError) -> list[tuple[str, str]]:
    status = rpc_status.from_call(err)
    detail = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(detail)
    return [(v.field, v.description) for v in detail.field_violations]


@pytest.fixture
def api(service):
    stub = service.stub()
    md = service.metadata()

    class Api:
        def track(self, **kw):
            return stub.Track(pb.TrackRequest(**kw), metadata=md, timeout=10)

        def batch(self, events, **kw):
            return stub.TrackBatch(pb.TrackBatchRequest(events=[pb.TrackRequest(**e) for e in events], **kw),
                                   metadata=md, timeout=10)

        def list(self, person_id, **kw):
            return stub.ListPersonEvents(pb.ListPersonEventsRequest(person_id=person_id, **kw),
                                         metadata=md, timeout=10)

    return Api()


def test_track_then_read_back(api):
    user = uid()
    resp = api.track(external_id=user, event="purchase_completed",
                     parameters=struct({"order_id": "order_789", "amount": 99.99, "qty": 2,
                                        "items": [{"sku": "PROD-001", "quantity": 2}], "gift": False}),
                     timestamp="2024-01-15T10:30:00Z")
    assert resp.success and resp.event_id.startswith("evt_") and len(resp.event_id) == 36
    assert resp.person_id == person_id_for("ws_default", user)
    page = api.list(resp.person_id)
    assert page.total == 1
    (event,) = page.events
    assert event.id == resp.event_id and event.workspace_id == "ws_default"
    assert event.external_id == user and event.event == "purchase_completed"
    assert event.timestamp.ToJsonString() == "2024-01-15T10:30:00Z"
    assert event.created_at.ToDatetime(timezone.utc) > datetime(2025, 1, 1, tzinfo=timezone.utc)
    params = dict(event.parameters)
    assert params["amount"] == 99.99 and params["qty"] == 2 and params["gift"] is False
    assert event.parameters["items"][0]["sku"] == "PROD-001"


def test_timestamp_defaults_to_receipt_time(api):
    before = datetime.now(timezone.utc) - timedelta(seconds=5)
    resp = api.track(external_id=uid(), event="signed_up")
    (event,) = api.list(resp.person_id).events
    assert event.timestamp == event.created_at
    assert before < event.timestamp.ToDatetime(timezone.utc) < before + timedelta(minutes=5)


def test_batch_stores_the_valid_events_and_reports_the_rest(api):
    user = uid()
    events = [{"external_id": user, "event": f"e{i}"} for i in range(100)]
    events[3]["event"] = ""
    events[50]["timestamp"] = "yesterday"
    events[99]["external_id"] = "x" * 256
    resp = api.batch(events)
    assert not resp.success
    assert len(resp.event_ids) == 100
    assert [i for i, e in enumerate(resp.event_ids) if not e] == [3, 50, 99]
    assert [(e.index, e.field) for e in resp.errors] == [
        (3, "events[3].event"), (50, "events[50].timestamp"), (99, "events[99].external_id")]
    assert "empty" in resp.errors[0].message
    page = api.list(user, id_type="external_id", limit=500)
    assert page.total == 97
    assert {e.id for e in page.events} == {e for e in resp.event_ids if e}


def test_batch_all_valid_is_success(api):
    resp = api.batch([{"external_id": uid(), "event": "a"}, {"external_id": uid(), "event": "b"}])
    assert resp.success and all(resp.event_ids) and list(resp.errors) == []


@pytest.mark.parametrize("count", [0, 101])
def test_batch_size_is_checked_as_a_whole(api, count):
    user = uid()
    with pytest.raises(grpc.RpcError) as exc:
        api.batch([{"external_id": user, "event": "x"}] * count)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request(exc.value)[0][0] == "events"
    assert api.list(user, id_type="external_id").total == 0


def test_list_newest_first_with_filters_and_exact_total(api):
    user = uid()
    base = datetime(2024, 3, 1, tzinfo=timezone.utc)
    events = [{"external_id": user, "event": "ab"[i % 2], "timestamp": rfc3339(base + timedelta(hours=7 * i))}
              for i in range(60)]
    ids = api.batch(events).event_ids
    page = api.list(user, id_type="external_id", limit=10, offset=5)
    assert page.total == 60
    assert [e.id for e in page.events] == list(reversed(ids))[5:15]
    page = api.list(user, id_type="external_id", event="a", limit=500)
    assert page.total == 30 and all(e.event == "a" for e in page.events)
    since, until = base + timedelta(hours=70), base + timedelta(hours=140)
    page = api.list(user, id_type="external_id", limit=3,
                    since=timestamp_pb2.Timestamp(seconds=int(since.timestamp())),
                    until=timestamp_pb2.Timestamp(seconds=int(until.timestamp())))
    # events at hours 70, 77, ..., 133: since inclusive, until exclusive
    assert page.total == 10
    assert [e.timestamp.ToDatetime(timezone.utc) for e in page.events] == [
        base + timedelta(hours=h) for h in (133, 126, 119)]


def test_unknown_person_is_empty(api):
    page = api.list(str(uuid.uuid4()))
    assert list(page.events) == [] and page.total == 0


@pytest.mark.parametrize("request_kw,field", [
    ({"person_id": "not-a-uuid"}, "person_id"),
    ({"person_id": "u", "id_type": "email"}, "id_type"),
    ({"limit": 0}, "limit"),
    ({"limit": 501}, "limit"),
    ({"offset": -1}, "offset"),
    ({"since": timestamp_pb2.Timestamp(seconds=200), "until": timestamp_pb2.Timestamp(seconds=100)}, "since"),
    ({"event": "a\x07b"}, "event"),
])
def test_list_validation(service, request_kw, field):
    request_kw.setdefault("person_id", str(uuid.uuid4()))
    with pytest.raises(grpc.RpcError) as exc:
        service.stub().ListPersonEvents(pb.ListPersonEventsRequest(**request_kw), metadata=service.metadata())
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in [f for f, _ in bad_request(exc.value)]
    assert exc.value.details().startswith(field) or f"; {field}" in exc.value.details()


def nested(depth):
    value: dict = {"leaf": 1}
    for _ in range(depth - 1):
        value = {"n": value}
    return value


@pytest.mark.parametrize("kw,field,fragment", [
    ({"external_id": "", "event": "x"}, "external_id", "empty"),
    ({"external_id": "u", "event": ""}, "event", "empty"),
    ({"external_id": "u" * 256, "event": "x"}, "external_id", "255"),
    ({"external_id": "u", "event": "e" * 256}, "event", "255"),
    ({"external_id": "u\nv", "event": "x"}, "external_id", "control"),
    ({"external_id": "u", "event": "x\x00"}, "event", "control"),
    ({"external_id": "u", "event": "x", "timestamp": "2024-13-45T00:00:00Z"}, "timestamp", "date-time"),
    ({"external_id": "u", "event": "x", "timestamp": "1700000000"}, "timestamp", "RFC 3339"),
    ({"external_id": "u", "event": "x", "timestamp": "2024-01-15T10:30:00"}, "timestamp", "RFC 3339"),
    ({"external_id": "u", "event": "x", "timestamp": rfc3339(datetime.now(timezone.utc) + timedelta(hours=25))},
     "timestamp", "future"),
    ({"external_id": "u", "event": "x", "parameters": struct({"blob": "x" * 33_000})}, "parameters", "bytes"),
    ({"external_id": "u", "event": "x", "parameters": struct(nested(33))}, "parameters", "deep"),
])
def test_track_validation_names_the_field(service, kw, field, fragment):
    with pytest.raises(grpc.RpcError) as exc:
        service.stub().Track(pb.TrackRequest(**kw), metadata=service.metadata())
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = bad_request(exc.value)
    assert violations[0][0] == field and fragment in violations[0][1]


def _field(number: int, payload: bytes) -> bytes:
    return _VarintBytes(number << 3 | 2) + _VarintBytes(len(payload)) + payload


def test_undecodable_nesting_is_invalid_argument_not_unknown(service):
    # 40 levels of Struct exceed protobuf's 100-level decoding limit, so even the
    # client library refuses to build it: encode the wire bytes by hand
    struct_bytes = b""
    for _ in range(40):  # Struct{fields: {"d": Value{struct_value: <inner>}}}
        struct_bytes = _field(1, _field(1, b"d") + _field(2, _field(5, struct_bytes)))
    track = _field(1, b"u") + _field(2, b"x") + _field(3, struct_bytes)
    call = service.channel().unary_unary("/flameup.events.v1.EventsService/TrackBatch",
                                         response_deserializer=pb.TrackBatchResponse.FromString)
    with pytest.raises(grpc.RpcError) as exc:
        call(_field(1, track), metadata=service.metadata())
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "nested" in exc.value.details()


def test_limits_are_inclusive(api):
    user = "u" * 255
    soon = rfc3339(datetime.now(timezone.utc) + timedelta(hours=23))
    assert api.track(external_id=user, event="e" * 255, timestamp=soon,
                     parameters=struct(nested(32))).success


# Auth ---------------------------------------------------------------------

@pytest.mark.parametrize("metadata,fragment", [
    ([], "missing"),
    ([("authorization", "Bearer fe_00000000_nope")], "unknown"),
    ([("authorization", "Basic dXNlcjpwYXNz")], "malformed"),
])
def test_unauthenticated(service, metadata, fragment):
    with pytest.raises(grpc.RpcError) as exc:
        service.stub().Track(pb.TrackRequest(external_id="u", event="x"), metadata=metadata)
    assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert fragment in exc.value.details()


def test_revoked_key_is_refused(service, workspace):
    key = service.create_key(workspace)
    stub = service.stub()
    assert stub.Track(pb.TrackRequest(external_id="u", event="x"), metadata=service.metadata(key)).success
    service.revoke_key(key)
    with pytest.raises(grpc.RpcError) as exc:
        stub.Track(pb.TrackRequest(external_id="u", event="x"), metadata=service.metadata(key))
    assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED and "revoked" in exc.value.details()


def test_scopes(service, workspace):
    stub = service.stub()
    reader = service.metadata(service.create_key(workspace, "events:read"))
    writer = service.metadata(service.create_key(workspace, "events:write"))
    assert stub.Track(pb.TrackRequest(external_id="u", event="x"), metadata=writer).success
    for call in (lambda: stub.Track(pb.TrackRequest(external_id="u", event="x"), metadata=reader),
                 lambda: stub.TrackBatch(pb.TrackBatchRequest(), metadata=reader),
                 lambda: stub.ListPersonEvents(pb.ListPersonEventsRequest(person_id="u", id_type="external_id"),
                                               metadata=writer)):
        with pytest.raises(grpc.RpcError) as exc:
            call()
        assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert stub.ListPersonEvents(pb.ListPersonEventsRequest(person_id="u", id_type="external_id"),
                                 metadata=reader).total == 1


def test_a_key_sees_only_its_own_workspace(service, workspace):
    stub = service.stub()
    other = service.metadata(service.create_key(workspace))
    mine = stub.Track(pb.TrackRequest(external_id="shared_name", event="secret"), metadata=service.metadata())
    # the same external_id in another workspace is another person
    theirs = stub.Track(pb.TrackRequest(external_id="shared_name", event="x"), metadata=other)
    assert theirs.person_id != mine.person_id
    page = stub.ListPersonEvents(pb.ListPersonEventsRequest(person_id=mine.person_id), metadata=other)
    assert page.total == 0 and list(page.events) == []


def test_every_rpc_has_a_scope():
    service_desc = pb.DESCRIPTOR.services_by_name["EventsService"]
    assert set(REQUIRED_SCOPE) == {m.name for m in service_desc.methods}


# Standard services ----------------------------------------------------------

def test_health_and_reflection_need_no_key(service):
    channel = service.channel()
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", SERVICE_NAME):
        assert health.Check(health_pb2.HealthCheckRequest(service=name)).status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    (resp,) = refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    assert SERVICE_NAME in {s.name for s in resp.list_services_response.service}


def test_message_id_dedups_track_and_batch(api):
    user, m = uid(), str(uuid.uuid4())
    first = api.track(external_id=user, event="a", message_id=m)
    again = api.track(external_id=user, event="b", message_id=m)
    assert not first.duplicate and again.duplicate
    assert (again.event_id, again.person_id) == (first.event_id, first.person_id)
    resp = api.batch([{"external_id": user, "event": "c", "message_id": m}, {"external_id": user, "event": "d"}])
    assert resp.success and list(resp.duplicates) == [0] and resp.event_ids[0] == first.event_id
    assert api.list(first.person_id).total == 2


@pytest.mark.parametrize("skew", [timedelta(hours=30), -timedelta(days=2)])
def test_sent_at_corrects_a_skewed_client_clock(api, skew):
    user = uid()
    now = datetime.now(timezone.utc)
    client_now = now + skew
    resp = api.track(external_id=user, event="a", timestamp=rfc3339(client_now - timedelta(hours=1)),
                     sent_at=rfc3339(client_now))
    batch = api.batch([{"external_id": user, "event": "b", "timestamp": rfc3339(client_now - timedelta(hours=2))}],
                      sent_at=rfc3339(client_now))
    assert batch.success
    stored = [e.timestamp.ToDatetime(timezone.utc) for e in api.list(resp.person_id).events]
    assert len(stored) == 2
    for at, hours in zip(stored, (1, 2)):
        assert abs(at - (now - timedelta(hours=hours))) < timedelta(minutes=5)
    with pytest.raises(grpc.RpcError) as exc:
        api.batch([{"external_id": user, "event": "b"}], sent_at="later")
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and bad_request(exc.value)[0][0] == "sent_at"


def test_page_token_errors_name_the_field(api):
    user = uid()
    api.batch([{"external_id": user, "event": "e"} for _ in range(3)])
    first = api.list(user, id_type="external_id", limit=2)
    assert first.next_page_token
    rest = api.list(user, id_type="external_id", limit=2, page_token=first.next_page_token)
    assert len(rest.events) == 1 and rest.next_page_token == "" and rest.total == 3
    with pytest.raises(grpc.RpcError) as exc:
        api.list(uid(), id_type="external_id", page_token=first.next_page_token)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request(exc.value) == [("page_token", "belongs to another person's listing")]


def test_aggregates_over_grpc(service, workspace):
    stub, md = service.stub(), service.metadata(service.create_key(workspace))
    user = uid()
    stub.TrackBatch(pb.TrackBatchRequest(events=[
        pb.TrackRequest(external_id=user, event=name, timestamp=f"2024-01-15T{hour:02d}:00:00Z")
        for hour, name in [(9, "a"), (10, "b"), (11, "a")]]), metadata=md, timeout=10)
    summary = stub.GetPersonSummary(pb.GetPersonSummaryRequest(person_id=user, id_type="external_id"),
                                    metadata=md, timeout=10)
    assert summary.person_id == person_id_for(workspace, user) and summary.total == 3
    assert [(e.event, e.count) for e in summary.events] == [("a", 2), ("b", 1)]
    assert summary.first_seen.ToJsonString() == "2024-01-15T09:00:00Z"
    assert summary.events[0].last_seen.ToJsonString() == summary.last_seen.ToJsonString() == "2024-01-15T11:00:00Z"
    nobody = stub.GetPersonSummary(pb.GetPersonSummaryRequest(person_id=str(uuid.uuid4())), metadata=md, timeout=10)
    assert nobody.total == 0 and not nobody.HasField("first_seen") and not nobody.HasField("last_seen")
    counts = stub.GetEventCounts(pb.GetEventCountsRequest(
        interval="hour", since=timestamp_pb2.Timestamp(seconds=1705309200),  # 2024-01-15T09:00:00Z
        until=timestamp_pb2.Timestamp(seconds=1705309200 + 3 * 3600)), metadata=md, timeout=10)
    assert [(b.start.seconds - 1705309200, b.count, b.unique_persons) for b in counts.buckets] == [
        (0, 1, 1), (3600, 1, 1), (7200, 1, 1)]
    assert counts.total == 3 and counts.interval == "hour"
    names = stub.ListEventNames(pb.ListEventNamesRequest(), metadata=md, timeout=10)
    assert [(e.event, e.count) for e in names.events] == [("a", 2), ("b", 1)]


@pytest.mark.parametrize("request_kw,field", [
    ({"interval": ""}, "interval"),
    ({"interval": "week"}, "interval"),
    ({"interval": "day", "event": "a\x07b"}, "event"),
    ({"interval": "hour", "since": timestamp_pb2.Timestamp(seconds=0),
      "until": timestamp_pb2.Timestamp(seconds=3600 * 1001)}, "since"),
    ({"interval": "day", "since": timestamp_pb2.Timestamp(seconds=200),
      "until": timestamp_pb2.Timestamp(seconds=100)}, "since"),
])
def test_event_counts_validation(service, request_kw, field):
    with pytest.raises(grpc.RpcError) as err:
        service.stub().GetEventCounts(pb.GetEventCountsRequest(**request_kw), metadata=service.metadata(), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in [f for f, _ in bad_request(err.value)]
