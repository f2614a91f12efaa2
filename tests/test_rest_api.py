"""The REST gateway over real HTTP against the real gRPC service (both stores)."""

from __future__ import annotations

import json
import re
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from service_support import REST_PATHS

from service.domain import person_id_for

EVENT_FIELDS = {"id", "workspace_id", "person_id", "external_id", "event", "parameters", "timestamp", "created_at"}


def uid() -> str:
    return f"user_{uuid.uuid4().hex[:12]}"


def iso(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.fixture
def http(service):
    with httpx.Client(base_url=service.http_url, headers={"Authorization": f"Bearer {service.key}"},
                      timeout=30) as client:
        yield client


def assert_status(resp: httpx.Response, http_status: int, code: int, field: str | None = None) -> dict:
    assert resp.status_code == http_status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert set(body) == {"code", "message", "details"} and body["code"] == code
    if field is not None:
        assert field in body["message"], body
        (detail,) = body["details"]
        assert detail["@type"] == "type.googleapis.com/google.rpc.BadRequest"
        assert field in [v["field"] for v in detail["field_violations"]]
    return body


def test_track_batch_and_list(http):
    user = uid()
    resp = http.post("/api/v1/track", json={"external_id": user, "event": "purchase_completed",
                                            "parameters": {"amount": 99.99, "qty": 2,
                                                           "nested": {"a": [1, 2.5, {"b": None}]}},
                                            "timestamp": "2024-01-15T10:30:00Z", "unknown_field": "ignored"})
    assert resp.status_code == 200
    body = resp.json()
    assert set(body) == {"success", "event_id", "person_id", "duplicate"} and body["success"] is True
    assert body["duplicate"] is False
    assert body["person_id"] == person_id_for("ws_default", user)

    resp = http.post("/api/v1/track/batch", json={"events": [
        {"external_id": user, "event": "page_viewed", "parameters": {"page": "/home"},
         "timestamp": "2024-01-16T00:00:00+01:00"},
        {"external_id": user, "event": "button_clicked"},
    ]})
    assert resp.status_code == 200 and resp.json()["success"] is True and resp.json()["errors"] == []
    assert resp.json()["duplicates"] == []

    resp = http.get(f"/api/v1/people/{body['person_id']}/events", params={"limit": 2})
    assert resp.status_code == 200
    page = resp.json()
    assert set(page) == {"events", "total", "next_page_token"} and page["total"] == 3 and len(page["events"]) == 2
    assert page["next_page_token"]
    assert all(set(e) == EVENT_FIELDS for e in page["events"])
    assert page["events"][1]["timestamp"] == "2024-01-15T23:00:00Z"

    resp = http.get(f"/api/v1/people/{body['person_id']}/events", params={"event": "purchase_completed"})
    (event,) = resp.json()["events"]
    assert event["id"] == body["event_id"] and event["timestamp"] == "2024-01-15T10:30:00Z"
    # numbers as sent: integers stay integers, decimals keep their digits
    compact = resp.text.replace(" ", "")
    assert re.search(r'"amount":99\.99[,}]', compact) and re.search(r'"qty":2[,}]', compact)
    assert event["parameters"]["nested"] == {"a": [1, 2.5, {"b": None}]}
    assert type(event["parameters"]["qty"]) is int


def test_list_by_external_id_and_time_window(http):
    user = uid()
    base = datetime(2024, 5, 1, tzinfo=UTC)
    http.post("/api/v1/track/batch", json={"events": [
        {"external_id": user, "event": "tick", "timestamp": iso(base + timedelta(hours=h))} for h in range(48)]})
    resp = http.get(f"/api/v1/people/{user}/events", params={
        "id_type": "external_id", "since": iso(base + timedelta(hours=10)), "until": iso(base + timedelta(hours=20)),
        "limit": 3, "offset": 1})
    page = resp.json()
    assert page["total"] == 10 and isinstance(page["total"], int)
    assert [e["timestamp"] for e in page["events"]] == [iso(base + timedelta(hours=h)) for h in (18, 17, 16)]


def test_unknown_person_is_empty(http):
    resp = http.get(f"/api/v1/people/{uuid.uuid4()}/events")
    assert resp.status_code == 200 and resp.json() == {"events": [], "total": 0, "next_page_token": ""}


def test_batch_keeps_valid_events_and_reports_each_rejected_one(http):
    user = uid()
    far_future = iso(datetime.now(UTC) + timedelta(days=3))
    events = [{"external_id": user, "event": f"ok_{i}"} for i in range(100)]
    events[3]["event"] = ""
    events[10]["timestamp"] = "not a time"
    events[20]["timestamp"] = far_future
    events[30]["event"] = "tab\there"
    events[40]["external_id"] = "x" * 300
    events[50]["parameters"] = {"blob": "y" * 40_000}
    events[60]["parameters"] = nested(33)
    resp = http.post("/api/v1/track/batch", json={"events": events})
    assert resp.status_code == 200
    body = resp.json()
    assert body["success"] is False and len(body["event_ids"]) == 100
    rejected = {3: "events[3].event", 10: "events[10].timestamp", 20: "events[20].timestamp",
                30: "events[30].event", 40: "events[40].external_id", 50: "events[50].parameters",
                60: "events[60].parameters"}
    assert [(e["index"], e["field"]) for e in body["errors"]] == list(rejected.items())
    assert all(e["message"] for e in body["errors"])
    assert [i for i, e in enumerate(body["event_ids"]) if e == ""] == list(rejected)
    page = http.get(f"/api/v1/people/{user}/events", params={"id_type": "external_id", "limit": 500}).json()
    assert page["total"] == 93


def nested(depth: int) -> dict:
    value: dict = {"leaf": True}
    for _ in range(depth - 1):
        value = {"d": value}
    return value


def test_parameters_deeper_than_protobuf_carries_reject_the_batch(http):
    # protobuf decodes at most 100 levels and a JSON object costs 3 of them in a
    # Struct: such a body is malformed as a whole, and nothing of it is stored
    user = uid()
    events = [{"external_id": user, "event": "ok"}, {"external_id": user, "event": "x", "parameters": nested(40)}]
    assert_status(http.post("/api/v1/track/batch", json={"events": events}), 400, 3, "events[1].parameters")
    assert http.get(f"/api/v1/people/{user}/events", params={"id_type": "external_id"}).json()["total"] == 0


@pytest.mark.parametrize("payload,field", [
    ({"external_id": "u"}, "event"),
    ({"event": "x"}, "external_id"),
    ({"external_id": "u", "event": "e" * 256}, "event"),
    ({"external_id": "u\u0000", "event": "x"}, "external_id"),
    ({"external_id": "u", "event": "x", "timestamp": "2024-01-15"}, "timestamp"),
    ({"external_id": "u", "event": "x", "parameters": {"s": "z" * 40_000}}, "parameters"),
])
def test_track_validation(http, payload, field):
    assert_status(http.post("/api/v1/track", json=payload), 400, 3, field)


@pytest.mark.parametrize("payload,field", [
    ({"external_id": "u", "event": 5}, "event"),
    ({"external_id": ["u"], "event": "x"}, "external_id"),
    ({"external_id": "u", "event": "x", "parameters": [1, 2]}, "parameters"),
    ({"external_id": "u", "event": "x", "parameters": "text"}, "parameters"),
    ({"external_id": "u", "event": "x", "timestamp": 1705314600}, "timestamp"),
])
def test_wrong_json_types_name_the_field(http, payload, field):
    assert_status(http.post("/api/v1/track", json=payload), 400, 3, field)


@pytest.mark.parametrize("body,content_type", [
    (b"{not json", "application/json"),
    (b"[1, 2]", "application/json"),
    (b"", "application/json"),
    (b'{"events": "nope"}', "application/json"),
])
def test_malformed_bodies_are_400(http, body, content_type):
    for path in ("/api/v1/track", "/api/v1/track/batch"):
        resp = http.post(path, content=body, headers={"Content-Type": content_type})
        assert_status(resp, 400, 3)


@pytest.mark.parametrize("count", [0, 101])
def test_batch_size_rejected_as_a_whole(http, count):
    user = uid()
    resp = http.post("/api/v1/track/batch", json={"events": [{"external_id": user, "event": "x"}] * count})
    assert_status(resp, 400, 3, "events")
    assert http.get(f"/api/v1/people/{user}/events", params={"id_type": "external_id"}).json()["total"] == 0


def test_missing_events_array_is_400(http):
    assert_status(http.post("/api/v1/track/batch", json={}), 400, 3, "events")


def test_body_over_1_mib_is_413(http):
    user = uid()
    big = {"events": [{"external_id": user, "event": "x", "parameters": {"s": "a" * 30_000}}] * 40}
    body = json.dumps(big).encode()
    assert len(body) > 1024 * 1024
    resp = http.post("/api/v1/track/batch", content=body, headers={"Content-Type": "application/json"})
    assert resp.status_code == 413 and resp.json()["code"] == 8
    assert http.get(f"/api/v1/people/{user}/events", params={"id_type": "external_id"}).json()["total"] == 0


def test_body_over_1_mib_without_content_length_is_413(http):
    def chunks():
        yield b'{"events": [{"external_id": "u", "event": "x", "parameters": {"s": "'
        for _ in range(1100):
            yield b"a" * 1024
        yield b'"}}]}'

    resp = http.post("/api/v1/track/batch", content=chunks(), headers={"Content-Type": "application/json"})
    assert resp.status_code == 413


@pytest.mark.parametrize("params,field", [
    ({"limit": "abc"}, "limit"),
    ({"limit": 0}, "limit"),
    ({"limit": 501}, "limit"),
    ({"offset": -5}, "offset"),
    ({"since": "last week"}, "since"),
    ({"since": "2024-02-01T00:00:00Z", "until": "2024-01-01T00:00:00Z"}, "since"),
    ({"id_type": "email"}, "id_type"),
])
def test_list_validation(http, params, field):
    assert_status(http.get(f"/api/v1/people/{uuid.uuid4()}/events", params=params), 400, 3, field)


def test_person_id_must_be_a_uuid_unless_id_type_says_otherwise(http):
    assert_status(http.get("/api/v1/people/user_123/events"), 400, 3, "person_id")


# Auth ------------------------------------------------------------------------

def test_401_carries_www_authenticate(service):
    with httpx.Client(base_url=service.http_url) as client:
        for headers in ({}, {"Authorization": "Bearer fe_deadbeef_nope"}, {"Authorization": "Basic abc"}):
            resp = client.post("/api/v1/track", json={"external_id": "u", "event": "x"}, headers=headers)
            assert_status(resp, 401, 16)
            assert resp.headers["www-authenticate"].startswith("Bearer")


def test_403_without_scope_and_401_after_revocation(service, workspace):
    reader = service.create_key(workspace, "events:read")
    with httpx.Client(base_url=service.http_url, headers={"Authorization": f"Bearer {reader}"}) as client:
        assert_status(client.post("/api/v1/track", json={"external_id": "u", "event": "x"}), 403, 7)
        assert client.get(f"/api/v1/people/{uuid.uuid4()}/events").status_code == 200
        service.revoke_key(reader)
        assert_status(client.get(f"/api/v1/people/{uuid.uuid4()}/events"), 401, 16)


def test_another_workspace_person_is_invisible(service, http, workspace):
    person = http.post("/api/v1/track", json={"external_id": uid(), "event": "private"}).json()["person_id"]
    other = service.create_key(workspace)
    resp = httpx.get(f"{service.http_url}/api/v1/people/{person}/events",
                     headers={"Authorization": f"Bearer {other}"})
    assert resp.json() == {"events": [], "total": 0, "next_page_token": ""}


# Gateway plumbing ----------------------------------------------------------------

def test_healthz_and_openapi(service):
    assert httpx.get(f"{service.http_url}/healthz").json()["status"] == "SERVING"
    doc = httpx.get(f"{service.http_url}/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    assert set(doc["paths"]) == REST_PATHS
    assert set(doc["paths"]["/api/v1/people/{person_id}/events"]) == {"get"}


def test_unknown_path_is_404_status_json(http):
    resp = http.get("/api/v1/nothing")
    assert resp.status_code == 404 and resp.json()["code"] == 5


# REST edge cases: grpc-gateway v2 is the reference (README, "REST plumbing") ------------

@pytest.mark.parametrize("query,field", [
    ("limit=", "limit"),  # grpc-gateway v2: strconv.ParseInt("") fails, 400
    ("offset=", "offset"),
    ("since=", "since"),
    ("limit=1&limit=2", "limit"),  # v2: "too many values for field"
    ("limit=5&limit=", "limit"),
])
def test_empty_and_repeated_query_values_are_400(http, query, field):
    body = assert_status(http.get(f"/api/v1/people/{uuid.uuid4()}/events?{query}"), 400, 3)
    assert body["message"].startswith(f"{field}: ")
    assert body["details"][0]["field_violations"][0]["field"] == field


def test_unknown_query_parameters_and_empty_strings_are_ignored(http):
    resp = http.get(f"/api/v1/people/{uuid.uuid4()}/events?utm_source=x&event=&id_type=&limit=7&foo.bar=1")
    assert resp.status_code == 200 and resp.json() == {"events": [], "total": 0, "next_page_token": ""}


def test_wrong_method_on_a_known_path_is_405_with_allow(http):
    # grpc-gateway v2 answers 501 with the same body; 405 + Allow is our choice (README)
    resp = http.get("/api/v1/track")
    assert_status(resp, 405, 12)
    assert resp.headers["allow"] == "POST" and resp.json()["message"] == "Method Not Allowed"
    resp = http.delete(f"/api/v1/people/{uuid.uuid4()}/events")
    assert_status(resp, 405, 12)
    assert set(resp.headers["allow"].split(", ")) == {"GET", "HEAD"}
    resp = http.head(f"/api/v1/people/{uuid.uuid4()}/events")  # grpc-gateway: 501
    assert resp.status_code == 200 and resp.content == b""


def test_unknown_path_is_404_code_5_without_redirects(http):
    assert assert_status(http.post("/api/v1/nothing", json={}), 404, 5)["message"] == "Not Found"
    assert_status(http.post("/api/v1/track/", json={"external_id": "u", "event": "x"}), 404, 5)


@pytest.mark.parametrize("body,message", [
    (b"", "request body is empty"),  # grpc-gateway v2 would send an empty message; ours is a 400 before the call
    (b"   ", "request body is empty"),
    (b"null", "request body must be a JSON object, got null"),
    (b'{"events": [', "request body is not valid JSON"),
])
def test_empty_null_and_malformed_bodies_say_why(http, body, message):
    resp = http.post("/api/v1/track/batch", content=body, headers={"Content-Type": "application/json"})
    assert assert_status(resp, 400, 3)["message"].startswith(message)


def test_unknown_body_fields_are_ignored_at_every_level(http):
    user = uid()
    resp = http.post("/api/v1/track/batch", json={"events": [{"external_id": user, "event": "x", "extra": [1]}],
                                                   "requestId": "ignored"})
    assert resp.status_code == 200 and resp.json()["success"] is True
    page = http.get(f"/api/v1/people/{user}/events", params={"id_type": "external_id"}).json()
    assert page["total"] == 1 and page["events"][0]["parameters"] == {}


def test_message_id_dedups_track_and_batch(http):
    user, m1, m2 = uid(), str(uuid.uuid4()), str(uuid.uuid4())
    first = http.post("/api/v1/track", json={"external_id": user, "event": "signup", "message_id": m1}).json()
    again = http.post("/api/v1/track", json={"external_id": user, "event": "other", "message_id": m1})
    assert again.status_code == 200
    assert again.json() == {**first, "duplicate": True} and first["duplicate"] is False
    resp = http.post("/api/v1/track/batch", json={"events": [
        {"external_id": user, "event": "a", "message_id": m2},
        {"external_id": user, "event": "b", "message_id": m1},
        {"external_id": user, "event": ""},
        {"external_id": user, "event": "c", "message_id": m2},
    ]})
    body = resp.json()
    assert resp.status_code == 200 and body["duplicates"] == [1, 3] and body["success"] is False
    assert body["event_ids"][1] == first["event_id"] and body["event_ids"][3] == body["event_ids"][0]
    page = http.get(f"/api/v1/people/{first['person_id']}/events").json()
    assert page["total"] == 2 and sorted(e["event"] for e in page["events"]) == ["a", "signup"]
    assert_status(http.post("/api/v1/track", json={"external_id": user, "event": "e", "message_id": "x" * 256}),
                  400, 3, "message_id")


@pytest.mark.parametrize("skew", [timedelta(days=2), -timedelta(days=3)])
def test_sent_at_corrects_a_skewed_client_clock(http, skew):
    user = uid()
    now = datetime.now(UTC)
    client_now = now + skew
    resp = http.post("/api/v1/track", json={"external_id": user, "event": "a", "sent_at": iso(client_now),
                                            "timestamp": iso(client_now - timedelta(hours=1))})
    assert resp.status_code == 200, resp.text
    resp = http.post("/api/v1/track/batch", json={"sent_at": iso(client_now), "events": [
        {"external_id": user, "event": "b", "timestamp": iso(client_now - timedelta(hours=2))}]})
    assert resp.json()["success"] is True, resp.text
    page = http.get(f"/api/v1/people/{user}/events", params={"id_type": "external_id"}).json()
    for event, hours in zip(page["events"], (1, 2)):
        stored = datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00"))
        assert abs(stored - (now - timedelta(hours=hours))) < timedelta(minutes=5)
    assert_status(http.post("/api/v1/track", json={"external_id": user, "event": "a", "sent_at": "now"}),
                  400, 3, "sent_at")


def test_page_tokens_walk_and_bad_ones_are_400(http):
    user = uid()
    resp = http.post("/api/v1/track/batch", json={"events": [
        {"external_id": user, "event": "e", "timestamp": f"2024-02-01T00:00:{i:02d}Z"} for i in range(7)]})
    assert resp.json()["success"] is True
    path, seen, params = f"/api/v1/people/{user}/events", [], {"id_type": "external_id", "limit": 3}
    while True:
        page = http.get(path, params=params).json()
        seen += [e["timestamp"] for e in page["events"]]
        assert page["total"] == 7
        if not page["next_page_token"]:
            break
        params = {**params, "page_token": page["next_page_token"]}
    assert seen == [f"2024-02-01T00:00:{i:02d}Z" for i in reversed(range(7))]
    token = http.get(path, params={"id_type": "external_id", "limit": 3}).json()["next_page_token"]
    for bad, fragment in [({"page_token": "x" + token[1:]}, "page_token"),
                          ({"page_token": token, "event": "other"}, "other filters"),
                          ({"page_token": token, "offset": 3}, "offset")]:
        body = assert_status(http.get(path, params={"id_type": "external_id", **bad}), 400, 3, "page_token")
        assert fragment in body["message"]


def test_person_summary_counts_and_names_over_rest(service, workspace):
    key = service.create_key(workspace)
    headers = {"Authorization": f"Bearer {key}"}
    user = uid()
    with httpx.Client(base_url=service.http_url, headers=headers, timeout=30) as http:
        events = [{"external_id": user, "event": name, "timestamp": f"2024-01-15T{hour:02d}:30:00Z"}
                  for hour, name in [(9, "cart_updated"), (10, "cart_updated"), (11, "purchase_completed")]]
        assert http.post("/api/v1/track/batch", json={"events": events}).json()["success"] is True
        summary = http.get(f"/api/v1/people/{user}/summary", params={"id_type": "external_id"}).json()
        assert summary == {
            "person_id": person_id_for(workspace, user), "total": 3,
            "first_seen": "2024-01-15T09:30:00Z", "last_seen": "2024-01-15T11:30:00Z",
            "events": [
                {"event": "purchase_completed", "count": 1, "first_seen": "2024-01-15T11:30:00Z",
                 "last_seen": "2024-01-15T11:30:00Z"},
                {"event": "cart_updated", "count": 2, "first_seen": "2024-01-15T09:30:00Z",
                 "last_seen": "2024-01-15T10:30:00Z"}]}
        window = http.get(f"/api/v1/people/{user}/summary",
                          params={"id_type": "external_id", "since": "2024-01-15T10:00:00Z"}).json()
        assert window["total"] == 2 and [e["event"] for e in window["events"]] == ["purchase_completed",
                                                                                    "cart_updated"]
        nobody = http.get(f"/api/v1/people/{uid()}/summary", params={"id_type": "external_id"}).json()
        assert nobody["total"] == 0 and nobody["events"] == []
        assert nobody["first_seen"] is None and nobody["last_seen"] is None

        counts = http.get("/api/v1/events/counts", params={
            "event": "cart_updated", "interval": "hour", "since": "2024-01-15T08:00:00Z",
            "until": "2024-01-15T12:00:00Z"}).json()
        assert counts == {"interval": "hour", "total": 2, "buckets": [
            {"start": f"2024-01-15T{h:02d}:00:00Z", "count": int(h in (9, 10)), "unique_persons": int(h in (9, 10))}
            for h in range(8, 12)]}
        days = http.get("/api/v1/events/counts", params={"interval": "day", "until": "2024-01-16T00:00:00Z"}).json()
        assert len(days["buckets"]) == 30 and days["buckets"][-1] == {
            "start": "2024-01-15T00:00:00Z", "count": 3, "unique_persons": 1}
        names = http.get("/api/v1/events/names").json()
        assert [(e["event"], e["count"]) for e in names["events"]] == [("purchase_completed", 1),
                                                                        ("cart_updated", 2)]
        assert_status(http.get("/api/v1/events/counts", params={"interval": "week"}), 400, 3, "interval")
        assert_status(http.get("/api/v1/events/counts", params={"interval": "hour", "since": "2024-01-01T00:00:00Z",
                                                                "until": "2024-03-01T00:00:00Z"}), 400, 3, "since")
    write_only = service.create_key(workspace, scopes="events:write")
    for path in (f"/api/v1/people/{user}/summary?id_type=external_id", "/api/v1/events/counts?interval=day",
                 "/api/v1/events/names"):
        resp = httpx.get(f"{service.http_url}{path}", headers={"Authorization": f"Bearer {write_only}"})
        assert_status(resp, 403, 7)
