"""The OpenAPI document `make generate` writes from the descriptors, as the gateway serves it."""

from __future__ import annotations

import json

import pytest
import schemathesis
from service_support import REST_PATHS
from starlette.testclient import TestClient

from gateway.app import create_app
from gateway.openapi import openapi_document


@pytest.fixture(scope="module")
def doc():
    return json.loads(openapi_document())


def test_document_is_valid_openapi_3(doc):
    assert doc["openapi"].startswith("3.0")
    schemathesis.openapi.from_dict(doc).validate()  # against the OpenAPI 3.0 meta-schema


def test_paths_parameters_bodies_and_errors(doc):
    assert set(doc["paths"]) == REST_PATHS
    assert list(doc["paths"]["/api/v1/track/batch"]) == ["post"]
    batch = doc["paths"]["/api/v1/track/batch"]["post"]
    assert batch["operationId"] == "EventsService_TrackBatch"
    assert batch["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/flameup.events.v1.TrackBatchRequest"
    }
    status = {"$ref": "#/components/schemas/google.rpc.Status"}
    for code in ("400", "401", "403", "413", "503", "default"):
        assert batch["responses"][code]["content"]["application/json"]["schema"] == status
    listing = doc["paths"]["/api/v1/people/{person_id}/events"]["get"]
    assert "requestBody" not in listing and "413" not in listing["responses"]
    params = {(p["name"], p["in"]): p for p in listing["parameters"]}
    assert set(params) == {
        ("person_id", "path"),
        ("id_type", "query"),
        ("limit", "query"),
        ("offset", "query"),
        ("event", "query"),
        ("since", "query"),
        ("until", "query"),
        ("page_token", "query"),
    }
    assert params[("since", "query")]["schema"] == {"type": "string", "format": "date-time"}
    counts = doc["paths"]["/api/v1/events/counts"]["get"]
    params = {(p["name"], p["in"]): p for p in counts["parameters"]}
    assert set(params) == {("event", "query"), ("interval", "query"), ("since", "query"), ("until", "query")}
    assert params[("interval", "query")]["schema"]["enum"] == ["hour", "day"]
    summary = doc["paths"]["/api/v1/people/{person_id}/summary"]["get"]
    assert {p["name"] for p in summary["parameters"]} == {"person_id", "id_type", "since", "until"}
    schemas = doc["components"]["schemas"]
    assert schemas["google.rpc.Status"]["required"] == ["code", "message", "details"]


def test_comments_become_descriptions(doc):
    listing = doc["paths"]["/api/v1/people/{person_id}/events"]["get"]
    assert listing["summary"] == (
        "ListPersonEvents returns one person's events, newest first (timestamp, then id, descending), "
        "with the exact number of events that match the filters."
    )
    # The message-level rules JSON Schema cannot state are listed in the description.
    assert "- since must be before until" in listing["description"]
    params = {p["name"]: p for p in listing["parameters"]}
    assert params["limit"]["description"] == "Page size, 1 to 500; 50 when absent."
    track = doc["components"]["schemas"]["flameup.events.v1.TrackRequest"]
    assert track["description"] == "TrackRequest is one event as a client sends it."


def test_validation_rules_become_constraints(doc):
    schemas = doc["components"]["schemas"]
    track = schemas["flameup.events.v1.TrackRequest"]
    assert track["required"] == ["external_id", "event"]
    for name in ("external_id", "event"):
        field = track["properties"][name]
        assert (field["minLength"], field["maxLength"]) == (1, 255)
        assert field["pattern"] == "^[^\\x00-\\x1F\\x7F-\\x9F]*$"
    assert track["properties"]["parameters"]["type"] == "object"
    batch = schemas["flameup.events.v1.TrackBatchRequest"]
    assert batch["required"] == ["events"]
    events = batch["properties"]["events"]
    assert (events["minItems"], events["maxItems"]) == (1, 100)
    # A bad event of a batch is reported in the 200 response: the items' schema has no rules.
    assert events["items"] == {"$ref": "#/components/schemas/flameup.events.v1.TrackRequest.unchecked"}
    item = schemas["flameup.events.v1.TrackRequest.unchecked"]
    assert "required" not in item and set(item["properties"]["event"]) == {"type", "nullable", "description"}
    params = {p["name"]: p for p in doc["paths"]["/api/v1/people/{person_id}/events"]["get"]["parameters"]}
    assert params["limit"]["schema"] == {"type": "integer", "format": "int32", "minimum": 1, "maximum": 500}
    assert params["offset"]["schema"]["minimum"] == 0
    assert params["id_type"]["schema"]["enum"] == ["", "person_id", "external_id"]
    assert params["limit"]["required"] is False and params["person_id"]["required"] is True


def test_responses_list_every_field_with_its_json_type(doc):
    schemas = doc["components"]["schemas"]
    event = schemas["flameup.events.v1.Event"]
    assert event["required"] == [
        "id", "workspace_id", "person_id", "external_id", "event", "parameters", "timestamp", "created_at"
    ]
    assert event["properties"]["parameters"]["type"] == "object"
    assert event["properties"]["timestamp"]["format"] == "date-time"
    page = schemas["flameup.events.v1.ListPersonEventsResponse"]
    assert page["required"] == ["events", "total", "next_page_token"]
    assert page["properties"]["total"]["type"] == "integer"
    assert schemas["flameup.events.v1.TrackBatchResponse"]["required"] == ["success", "event_ids", "errors", "duplicates"]
    assert schemas["flameup.events.v1.TrackResponse"]["required"] == ["success", "event_id", "person_id", "duplicate"]


def test_the_gateway_serves_the_generated_document():
    reply = TestClient(create_app("127.0.0.1:1")).get("/openapi.json")
    assert reply.status_code == 200 and reply.headers["content-type"] == "application/json"
    assert reply.content == openapi_document()
