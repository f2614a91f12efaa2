"""Unit tests of the REST gateway's building blocks; no events service needed.

- JSON -> protobuf and protobuf -> JSON (gateway.transcode), on the real
  flameup.events.v1 messages and on a test file built here that has every
  kind of field the gateway supports;
- the refusal, when the app is created, of protos with types it does not
  transcode;
- query strings and path parameters, as grpc-gateway v2 parses them;
- the route table and the OpenAPI document derived from the descriptors;
- the gRPC code -> HTTP status table and the google.rpc.Status error body;
- the app end to end against a stand-in gRPC server (a generic handler in
  this process) and against nothing at all (unreachable target).
"""

from __future__ import annotations

import itertools
import socket
import threading
from concurrent import futures

import grpc
import orjson
import pytest
from google.api import annotations_pb2  # noqa: F401  (registers google.api.http for text_format)
from google.protobuf import (
    any_pb2,
    descriptor_pb2,
    descriptor_pool,
    duration_pb2,
    json_format,
    message_factory,
    text_format,
    wrappers_pb2,  # noqa: F401  (test files depend on it)
)
from google.protobuf.message import DecodeError
from google.rpc import code_pb2, error_details_pb2, status_pb2
from service_support import REST_PATHS
from starlette.testclient import TestClient

from flameup.events.v1 import events_pb2
from gateway import transcode
from gateway.app import HTTP_STATUS_BY_CODE, create_app, http_status_from_code, status_from_rpc_error
from gateway.rules import TemplateError, bindings_for, parse_template
from gateway.transcode import (
    DEFAULT_CODECS,
    MAX_DEPTH,
    CodecRegistry,
    TranscodeError,
    UnsupportedTypeError,
    populate_query,
    set_field_from_string,
)

CODECS = DEFAULT_CODECS
BATCH = CODECS.for_class(events_pb2.TrackBatchRequest)
TRACK = CODECS.for_class(events_pb2.TrackRequest)
LIST = CODECS.for_class(events_pb2.ListPersonEventsRequest)
EVENT = CODECS.for_class(events_pb2.Event)

# --------------------------------------------------------------------------
# A test proto with every kind of field the gateway supports.

_TEST_PROTO = """
name: "gateway_test/v1/things.proto"
package: "gateway_test.v1"
syntax: "proto3"
dependency: "google/api/annotations.proto"
dependency: "google/protobuf/timestamp.proto"
dependency: "google/protobuf/struct.proto"
message_type {
  name: "Inner"
  field { name: "n" number: 1 type: TYPE_INT32 label: LABEL_OPTIONAL proto3_optional: true oneof_index: 0 }
  field { name: "s" number: 2 type: TYPE_STRING label: LABEL_OPTIONAL }
  oneof_decl { name: "_n" }
}
message_type {
  name: "Thing"
  field { name: "name" number: 1 type: TYPE_STRING label: LABEL_OPTIONAL }
  field { name: "i32" number: 2 type: TYPE_INT32 label: LABEL_OPTIONAL }
  field { name: "flag" number: 5 type: TYPE_BOOL label: LABEL_OPTIONAL }
  field { name: "tags" number: 10 type: TYPE_STRING label: LABEL_REPEATED }
  field { name: "nums" number: 11 type: TYPE_INT32 label: LABEL_REPEATED }
  field { name: "inner" number: 12 type: TYPE_MESSAGE type_name: ".gateway_test.v1.Inner" label: LABEL_OPTIONAL }
  field { name: "inners" number: 13 type: TYPE_MESSAGE type_name: ".gateway_test.v1.Inner" label: LABEL_REPEATED }
  field { name: "at" number: 15 type: TYPE_MESSAGE type_name: ".google.protobuf.Timestamp" label: LABEL_OPTIONAL }
  field { name: "meta" number: 16 type: TYPE_MESSAGE type_name: ".google.protobuf.Struct" label: LABEL_OPTIONAL }
  field { name: "maybe" number: 18 type: TYPE_INT32 label: LABEL_OPTIONAL proto3_optional: true oneof_index: 0 }
  field { name: "first_name" number: 25 type: TYPE_STRING label: LABEL_OPTIONAL }
  oneof_decl { name: "_maybe" }
}
service {
  name: "ThingService"
  method {
    name: "GetThing" input_type: ".gateway_test.v1.Thing" output_type: ".gateway_test.v1.Thing"
    options { [google.api.http] { get: "/v1/things/{name}"
                                  additional_bindings { get: "/v1/by-inner/{inner.s}/things" } } }
  }
  method {
    name: "PutInner" input_type: ".gateway_test.v1.Thing" output_type: ".gateway_test.v1.Thing"
    options { [google.api.http] { put: "/v1/{name=shelves/*}/inner" body: "inner" } }
  }
  method {
    name: "Create" input_type: ".gateway_test.v1.Thing" output_type: ".gateway_test.v1.Thing"
    options { [google.api.http] { post: "/v1/things" body: "*" response_body: "inner" } }
  }
  method {
    name: "Delete" input_type: ".gateway_test.v1.Thing" output_type: ".gateway_test.v1.Thing"
    options { [google.api.http] { delete: "/v1/things/{name}" } }
  }
}
"""


def _add_file(text: str):
    proto = text_format.Parse(text, descriptor_pb2.FileDescriptorProto())
    pool = descriptor_pool.Default()
    try:
        return pool.FindFileByName(proto.name)
    except KeyError:
        return pool.Add(proto)


THINGS_FILE = _add_file(_TEST_PROTO)
THING_DESCRIPTOR = THINGS_FILE.message_types_by_name["Thing"]
Thing = message_factory.GetMessageClass(THING_DESCRIPTOR)
THING = CODECS.get(THING_DESCRIPTOR)


def _error(codec, obj) -> TranscodeError:
    with pytest.raises(TranscodeError) as info:
        codec.parse(obj)
    return info.value


def _round_trip(codec, obj):
    """JSON -> message -> wire -> message -> JSON."""
    msg = codec.parse(obj)
    again = codec.cls.FromString(msg.SerializeToString())
    return codec.to_json(again)


def _nested(levels: int) -> dict:
    value: dict = {}
    for _ in range(levels - 1):
        value = {"a": value}
    return value


# --------------------------------------------------------------------------
# Protos the gateway does not transcode are refused when the app is created

_FILE_NUMBERS = itertools.count()
_UNSUPPORTED = {  # the field `x` of a message `Bad`
    "int64": "type: TYPE_INT64",
    "uint32": "type: TYPE_UINT32",
    "double": "type: TYPE_DOUBLE",
    "bytes": "type: TYPE_BYTES label: LABEL_REPEATED",
    "enum": 'type: TYPE_ENUM type_name: ".google.protobuf.NullValue"',
    "map": 'type: TYPE_MESSAGE type_name: "Bad.XEntry" label: LABEL_REPEATED',
    "oneof": "type: TYPE_STRING oneof_index: 0",
    "wrapper": 'type: TYPE_MESSAGE type_name: ".google.protobuf.Int32Value"',
    "value": 'type: TYPE_MESSAGE type_name: ".google.protobuf.Value"',
    "duration": 'type: TYPE_MESSAGE type_name: ".google.protobuf.Duration"',
}


def _file_with(kind: str, side: str):
    """A file whose one GET method takes (side "request") or returns ("response") ``Bad``."""
    pkg = f"gateway_bad{next(_FILE_NUMBERS)}"
    types = {"request": ("Bad", "Ok"), "response": ("Ok", "Bad")}[side]
    return _add_file(f"""
name: "{pkg}/bad.proto" package: "{pkg}" syntax: "proto3"
dependency: ["google/api/annotations.proto", "google/protobuf/struct.proto", "google/protobuf/duration.proto",
             "google/protobuf/wrappers.proto"]
message_type {{ name: "Ok" field {{ name: "id" number: 1 type: TYPE_STRING }} }}
message_type {{
  name: "Bad" field {{ name: "id" number: 1 type: TYPE_STRING }} field {{ name: "x" number: 2 {_UNSUPPORTED[kind]} }}
  {'oneof_decl { name: "choice" }' if kind == "oneof" else ""}
  nested_type {{ name: "XEntry" options {{ map_entry: true }}
                field {{ name: "key" number: 1 type: TYPE_STRING }} field {{ name: "value" number: 2 type: TYPE_STRING }} }}
}}
service {{ name: "BadService" method {{ name: "Get" input_type: "{types[0]}" output_type: "{types[1]}"
                                       options {{ [google.api.http] {{ get: "/v1/bad/{{id}}" }} }} }} }}
""")


@pytest.mark.parametrize(("kind", "side"), [(k, s) for k in _UNSUPPORTED for s in ("request", "response")
                                            if (k, s) != ("duration", "response")])
def test_the_app_refuses_at_startup_a_type_it_cannot_transcode_naming_the_field(kind, side):
    bad = _file_with(kind, side)
    with pytest.raises(UnsupportedTypeError) as info:
        create_app("127.0.0.1:1", files=[bad])
    assert str(info.value).startswith(f"{bad.package}.Bad.x: ")


def test_duration_is_written_in_responses_but_refused_in_requests():
    assert create_app("127.0.0.1:1", files=[_file_with("duration", "response")])
    with pytest.raises(UnsupportedTypeError, match="Duration is supported in responses only"):
        create_app("127.0.0.1:1", files=[_file_with("duration", "request")])
    with pytest.raises(UnsupportedTypeError, match=r"\.Bad\.x: field type int64 is not supported"):
        CodecRegistry().get(_file_with("int64", "request").message_types_by_name["Bad"])


# --------------------------------------------------------------------------
# JSON -> protobuf


def test_batch_request_matches_protobufs_own_json_parser():
    body = {
        "events": [
            {
                "external_id": f"user_{i}",
                "event": "purchase_completed",
                "parameters": {"amount": 99.99, "qty": 2, "items": [{"sku": "a"}, []], "none": None, "ok": True},
                "timestamp": "2024-01-15T10:30:00Z",
            }
            for i in range(100)
        ]
    }
    assert BATCH.parse(body) == json_format.ParseDict(body, events_pb2.TrackBatchRequest())


def test_lower_camel_case_names_are_accepted_and_unknown_fields_ignored():
    msg = TRACK.parse({"externalId": "u1", "event": "e", "surprise": {"x": [1]}, "alsoUnknown": 3})
    assert msg == events_pb2.TrackRequest(external_id="u1", event="e")
    assert THING.parse({"firstName": "Ada"}).first_name == "Ada"


def test_null_leaves_a_field_unset():
    msg = TRACK.parse({"external_id": None, "event": "e", "parameters": None})
    assert msg.external_id == "" and not msg.HasField("parameters")
    assert not THING.parse({"at": None, "maybe": None}).HasField("maybe")


def test_empty_objects_and_arrays_are_kept():
    msg = TRACK.parse({"parameters": {"o": {}, "l": [], "nested": [{}, []]}})
    assert TRACK.to_json(msg)["parameters"] == {"l": [], "nested": [{}, []], "o": {}}
    assert TRACK.parse({"parameters": {}}).HasField("parameters")


def test_every_supported_kind():
    thing = THING.parse(
        {
            "name": "n",
            "i32": -7,
            "flag": True,
            "tags": ["x", "y"],
            "nums": [1, "2", 3.0],
            "maybe": 0,
            "inner": {"n": 5},
            "inners": [{"s": "a"}, {}],
            "meta": {"k": [1, "v"]},
            "at": "2024-01-15T10:30:00.25+01:00",
        }
    )
    assert thing.i32 == -7 and thing.flag is True and list(thing.tags) == ["x", "y"] and list(thing.nums) == [1, 2, 3]
    assert thing.HasField("maybe") and thing.maybe == 0
    assert thing.inner.n == 5 and [i.s for i in thing.inners] == ["a", ""]
    assert (thing.at.seconds, thing.at.nanos) == (1705311000, 250_000_000)
    assert THING.to_json(thing)["meta"] == {"k": [1, "v"]}


@pytest.mark.parametrize(
    ("codec", "body", "message"),
    [
        (BATCH, {"events": [{}, {}, {}, {"event": 5}]}, "events[3].event: expected a string, got number"),
        (BATCH, {"events": [{"parameters": [1]}]}, "events[0].parameters: must be a JSON object, got array"),
        (BATCH, {"events": [{"parameters": "x"}]}, 'events[0].parameters: must be a JSON object, got "x"'),
        (BATCH, {"events": {"event": "e"}}, "events: expected an array, got object"),
        (BATCH, {"events": [{}, "e"]}, 'events[1]: expected an object, got "e"'),
        (BATCH, {"events": [{"external_id": True}]}, "events[0].external_id: expected a string, got boolean"),
        (BATCH, {"events": [{"timestamp": 1705314600}]}, "events[0].timestamp: expected a string, got number"),
        (TRACK, {"event": ["a"]}, "event: expected a string, got array"),
        (THING, {"i32": "abc"}, 'i32: expected an integer, got "abc"'),
        (THING, {"i32": 1.5}, "i32: expected an integer, got 1.5"),
        (THING, {"i32": 2**31}, "i32: 2147483648 is out of range for int32"),
        (THING, {"flag": "true"}, 'flag: expected a boolean, got "true"'),
        (THING, {"inners": [{}, {}, {"n": "x"}]}, 'inners[2].n: expected an integer, got "x"'),
        (THING, {"inner": []}, "inner: expected an object, got array"),
        (THING, {"tags": ["a", 1]}, "tags[1]: expected a string, got number"),
        (THING, {"nums": 1}, "nums: expected an array, got number"),
        (THING, {"at": 5}, "at: expected an RFC 3339 timestamp string, got number"),
    ],
)
def test_type_errors_name_the_field(codec, body, message):
    error = _error(codec, body)
    assert str(error) == message
    assert message.startswith(error.field + ": ")


@pytest.mark.parametrize("text", ["noon", "2024-01-15T10:30:00", "2024-02-30T00:00:00Z"])
def test_timestamps_are_read_by_protobuf_and_bad_ones_name_the_field(text):
    error = _error(THING, {"at": text})
    assert error.field == "at"
    assert error.description.startswith(f'expected an RFC 3339 timestamp such as 2024-01-15T10:30:00Z, got "{text}"')


def test_parameters_33_deep_reach_the_service_which_owns_that_rule():
    # The service rejects parameters deeper than 32 for that event alone; the
    # gateway must let 33 through, in a batch too, so one event cannot sink a batch.
    msg = BATCH.parse({"events": [{"parameters": _nested(33)}, {"event": "fine"}]})
    decoded = events_pb2.TrackBatchRequest.FromString(msg.SerializeToString())
    assert len(decoded.events) == 2
    assert TRACK.parse({"parameters": _nested(34)}).HasField("parameters")


def test_nesting_protobuf_cannot_carry_is_refused_as_a_whole_naming_the_field():
    # In a batch, 34 objects deep is 101 nested messages: upb (the service's
    # decoder) stops at 100 and would fail the whole call with UNKNOWN.
    body = {"events": [{"event": "fine"}, {"parameters": _nested(34)}]}
    error = _error(BATCH, body)
    assert error.field == "events[1].parameters"
    assert error.description.startswith("nesting is too deep to send over gRPC")
    built = events_pb2.TrackBatchRequest()
    built.events.add().parameters.update(body["events"][1]["parameters"])
    with pytest.raises(DecodeError):  # what the service would meet
        events_pb2.TrackBatchRequest.FromString(built.SerializeToString())


def test_lists_count_towards_the_nesting_limits():
    # each array inside an array costs 2 messages (ListValue, Value); the Struct sits at level 1
    assert TRACK.parse({"parameters": {"l": [[[]]] * 2, "deep": _list_nested(49)}}).HasField("parameters")
    error = _error(TRACK, {"parameters": {"l": [[[]]] * 2, "deep": _list_nested(50)}})
    assert error.field == "parameters" and error.description.startswith("nesting is too deep to send over gRPC")
    assert MAX_DEPTH > 33 + 3  # parameters 33 objects deep sit at JSON level 36 of a batch


def _list_nested(levels: int) -> list:
    value: list = []
    for _ in range(levels - 1):
        value = [value]
    return value


# --------------------------------------------------------------------------
# protobuf -> JSON


def test_struct_numbers_come_back_as_sent():
    params = {
        "qty": 2,
        "price": 99.99,
        "zero": 0,
        "negative": -5,
        "limit": 2**53,
        "beyond": 2.0**54,
        "small": 1e-7,
        "half": 0.5,
        "nested": {"list": [1, 2.5, "x", None, True, False, {"deep": [[]]}], "empty": {}},
        "text": "",
    }
    out = _round_trip(TRACK, {"parameters": params})["parameters"]
    assert out == params
    assert type(out["qty"]) is int and type(out["limit"]) is int and type(out["nested"]["list"][0]) is int
    assert type(out["beyond"]) is float and type(out["price"]) is float
    text = orjson.dumps(out)
    assert b'"qty":2,' in text and b'"price":99.99' in text and b"2.0" not in text


def test_every_field_is_present_with_defaults():
    assert EVENT.to_json(events_pb2.Event()) == {
        "id": "",
        "workspace_id": "",
        "person_id": "",
        "external_id": "",
        "event": "",
        "parameters": {},  # an unset Struct is the empty object (see transcode's docstring)
        "timestamp": None,
        "created_at": None,
    }
    batch = CODECS.for_class(events_pb2.TrackBatchResponse)
    assert batch.to_json(events_pb2.TrackBatchResponse()) == {
        "success": False, "event_ids": [], "errors": [], "duplicates": []}
    reply = events_pb2.TrackBatchResponse(
        success=False, event_ids=["evt_1", "", "evt_1"], errors=[events_pb2.BatchError(index=1, field="events[1].event")],
        duplicates=[2],
    )
    assert orjson.loads(orjson.dumps(batch.to_json(reply))) == {
        "success": False,
        "event_ids": ["evt_1", "", "evt_1"],
        "errors": [{"index": 1, "field": "events[1].event", "message": ""}],
        "duplicates": [2],
    }
    track = CODECS.for_class(events_pb2.TrackResponse)
    assert track.to_json(events_pb2.TrackResponse()) == {
        "success": False, "event_id": "", "person_id": "", "duplicate": False}
    out = THING.to_json(Thing())
    assert out["maybe"] is None and out["inner"] is None and out["at"] is None  # unset optional and messages
    assert out["meta"] == {} and out["tags"] == [] and out["nums"] == [] and out["i32"] == 0
    assert THING.to_json(Thing(maybe=0))["maybe"] == 0


def test_list_response_keeps_total_a_number_and_timestamps_rfc3339():
    codec = CODECS.for_class(events_pb2.ListPersonEventsResponse)
    reply = events_pb2.ListPersonEventsResponse(total=3)
    event = reply.events.add(id="evt_1", event="e")
    event.parameters.update({"b": 1, "a": {"z": 1, "y": 2}})
    event.timestamp.FromSeconds(1705314600)
    event.created_at.seconds, event.created_at.nanos = 1705314600, 123_000_000
    text = orjson.dumps(codec.to_json(reply))
    assert b'"total":3' in text
    assert b'"timestamp":"2024-01-15T10:30:00Z"' in text
    assert b'"created_at":"2024-01-15T10:30:00.123Z"' in text
    assert b'"parameters":{"a":{"y":2,"z":1},"b":1}' in text  # map keys sorted, as protojson writes them


def test_error_details_are_written_as_protojson_writes_them():
    retry, bad = any_pb2.Any(), any_pb2.Any()
    retry.Pack(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=1, nanos=500_000_000)))
    bad.Pack(error_details_pb2.BadRequest(field_violations=[{"field": "f", "description": "d"}]))
    assert CODECS.any_to_json(retry) == {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retry_delay": "1.500s"}
    assert CODECS.any_to_json(bad)["field_violations"] == [
        {"field": "f", "description": "d", "reason": "", "localized_message": None}
    ]
    info = any_pb2.Any()  # a detail type the codecs do not walk (a map): protobuf's json_format
    info.Pack(error_details_pb2.ErrorInfo(reason="R", metadata={"k": "v"}))
    assert CODECS.any_to_json(info) == {
        "@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "R", "metadata": {"k": "v"}
    }
    unknown = any_pb2.Any(type_url="type.googleapis.com/nobody.Knows", value=b"\x01")
    assert CODECS.any_to_json(unknown) == {"@type": "type.googleapis.com/nobody.Knows", "value": "AQ=="}


# --------------------------------------------------------------------------
# Query strings and path parameters (grpc-gateway v2's DefaultQueryParser)


def _query(codec, pairs, skip=frozenset()):
    msg = codec.cls()
    populate_query(codec, msg, pairs, skip)
    return msg


def test_optional_presence_follows_the_query():
    assert not _query(LIST, []).HasField("limit")
    given = _query(LIST, [("limit", "0"), ("offset", "20")])
    assert given.HasField("limit") and given.limit == 0 and given.offset == 20


def test_list_query_parameters():
    msg = _query(
        LIST,
        [
            ("idType", "external_id"),
            ("event", "purchase"),
            ("since", "2024-01-15T10:30:00Z"),
            ("until", "2024-01-15T12:30:00.5+02:00"),
            ("unknown", "ignored"),
            ("person_id", "from-the-query"),
        ],
        skip=frozenset({"person_id", "personId"}),
    )
    assert msg.id_type == "external_id" and msg.event == "purchase" and msg.person_id == ""
    assert (msg.since.seconds, msg.since.nanos) == (1705314600, 0)
    assert (msg.until.seconds, msg.until.nanos) == (1705314600, 500_000_000)
    assert not msg.HasField("limit")


def test_an_empty_string_value_sets_the_empty_string():
    assert _query(LIST, [("event", ""), ("id_type", "")]) == events_pb2.ListPersonEventsRequest()


@pytest.mark.parametrize(
    ("pairs", "message"),
    [
        ([("limit", "abc")], 'limit: expected an integer, got "abc"'),
        ([("limit", "")], 'limit: expected an integer, got ""'),  # grpc-gateway v2: 400 too
        ([("limit", "1_0")], 'limit: expected an integer, got "1_0"'),
        ([("limit", " 5")], 'limit: expected an integer, got " 5"'),
        ([("limit", "99999999999")], "limit: 99999999999 is out of range for int32"),
        ([("limit", "1"), ("limit", "2")], "limit: takes one value, got 2"),
        ([("limit", "1"), ("limit", "")], "limit: takes one value, got 2"),
        ([("since", "")], 'since: expected an RFC 3339 timestamp such as 2024-01-15T10:30:00Z, got ""'),
        ([("since", "noon")], 'since: expected an RFC 3339 timestamp such as 2024-01-15T10:30:00Z, got "noon"'),
        ([("since.seconds", "5")], "since.seconds: since is not a message with fields"),
    ],
)
def test_query_errors_name_the_parameter(pairs, message):
    with pytest.raises(TranscodeError) as info:
        _query(LIST, pairs)
    assert str(info.value).startswith(message)


def test_query_repeated_nested_and_typed_values():
    msg = _query(
        THING,
        [
            ("tags", "a"),
            ("tags", "b"),
            ("nums", "1"),
            ("nums", "-2"),
            ("inner.n", "0"),
            ("inner.s", "x y"),
            ("flag", "t"),
            ("at", "2024-01-15T10:30:00Z"),
        ],
    )
    assert list(msg.tags) == ["a", "b"] and list(msg.nums) == [1, -2]
    assert msg.inner.HasField("n") and msg.inner.n == 0 and msg.inner.s == "x y"
    assert msg.flag is True and msg.at.seconds == 1705314600
    for text, expected in (("1", True), ("TRUE", True), ("False", False), ("0", False)):
        assert _query(THING, [("flag", text)]).flag is expected
    with pytest.raises(TranscodeError, match='flag: expected a boolean, got "yes"'):
        _query(THING, [("flag", "yes")])
    with pytest.raises(TranscodeError, match="nums\\[1\\]: expected an integer"):
        _query(THING, [("nums", "1"), ("nums", "x")])
    with pytest.raises(TranscodeError, match="meta: a google.protobuf.Struct cannot be set from a query parameter"):
        _query(THING, [("meta", "{}")])


def test_path_parameters_set_dotted_fields():
    msg = Thing()
    set_field_from_string(THING, msg, "inner.s", "from-path")
    set_field_from_string(THING, msg, "name", "shelves/1")
    assert msg.inner.s == "from-path" and msg.name == "shelves/1"
    with pytest.raises(TranscodeError, match="i32: expected an integer"):
        set_field_from_string(THING, msg, "i32", "x")


# --------------------------------------------------------------------------
# Routes and OpenAPI, from the descriptors


def test_routes_are_exactly_the_documented_paths():
    bindings = bindings_for([events_pb2.DESCRIPTOR])
    assert {(b.http_method, b.template, b.method.name, b.body) for b in bindings} == {
        ("POST", "/api/v1/track", "Track", "*"),
        ("POST", "/api/v1/track/batch", "TrackBatch", "*"),
        ("GET", "/api/v1/people/{person_id}/events", "ListPersonEvents", ""),
        ("GET", "/api/v1/people/{person_id}/summary", "GetPersonSummary", ""),
        ("GET", "/api/v1/events/counts", "GetEventCounts", ""),
        ("GET", "/api/v1/events/names", "ListEventNames", ""),
        ("GET", "/api/v1/events/stream", "StreamEvents", ""),
        ("DELETE", "/api/v1/people/{person_id}", "DeletePerson", ""),
    }
    listing = next(b for b in bindings if b.method.name == "ListPersonEvents")
    assert listing.grpc_path == "/flameup.events.v1.EventsService/ListPersonEvents"
    assert listing.route_path == "/api/v1/people/{p0}/events"
    assert listing.variables[0].field_path == "person_id"
    app = create_app("127.0.0.1:1")
    assert {r.path for r in app.routes} == {
        "/api/v1/track",
        "/api/v1/track/batch",
        "/api/v1/people/{p0}/events",
        "/api/v1/people/{p0}/summary",
        "/api/v1/events/counts",
        "/api/v1/events/names",
        "/api/v1/events/stream",
        "/api/v1/people/{p0}",
        "/healthz",
        "/metrics",
        "/openapi.json",
    }


def test_test_service_bindings_cover_every_rule_shape():
    bindings = {(b.http_method, b.template): b for b in bindings_for([THINGS_FILE])}
    assert set(bindings) == {
        ("GET", "/v1/things/{name}"),
        ("GET", "/v1/by-inner/{inner.s}/things"),  # an additional binding, dotted variable
        ("PUT", "/v1/{name=shelves/*}/inner"),
        ("POST", "/v1/things"),
        ("DELETE", "/v1/things/{name}"),
    }
    put = bindings[("PUT", "/v1/{name=shelves/*}/inner")]
    assert put.route_path == "/v1/shelves/{p0}/inner" and put.body == "inner"
    assert put.variables[0].value({"p0": "7"}) == "shelves/7"
    assert bindings[("POST", "/v1/things")].response_body == "inner"


@pytest.mark.parametrize(
    ("template", "route", "values"),
    [
        ("/v1/things", "/v1/things", []),
        ("/v1/{a.b}/x", "/v1/{p0}/x", [("a.b", {"p0": "1"}, "1")]),
        ("/v1/{name=shelves/*/books/*}:publish", "/v1/shelves/{p0}/books/{p1}:publish",
         [("name", {"p0": "s", "p1": "b"}, "shelves/s/books/b")]),
        ("/v1/files/{path=**}", "/v1/files/{p0:path}", [("path", {"p0": "a/b/c"}, "a/b/c")]),
        ("/v1/*/x", "/v1/{p0}/x", []),
    ],
)
def test_path_templates(template, route, values):
    path, variables = parse_template(template)
    assert path == route
    assert [(v.field_path, v.value(params)) for (v, (_, params, _)) in zip(variables, values, strict=True)] == [
        (field, expected) for field, _, expected in values
    ]
    assert len(variables) == len(values)


@pytest.mark.parametrize("template", ["v1/x", "/v1/{a b}", "/v1/{a", "/v1//x", "/v1/x*"])
def test_bad_templates_are_refused(template):
    with pytest.raises(TemplateError):
        parse_template(template)


def test_grpc_gateway_status_table():
    assert HTTP_STATUS_BY_CODE == {
        code_pb2.OK: 200,
        code_pb2.CANCELLED: 499,
        code_pb2.UNKNOWN: 500,
        code_pb2.INVALID_ARGUMENT: 400,
        code_pb2.DEADLINE_EXCEEDED: 504,
        code_pb2.NOT_FOUND: 404,
        code_pb2.ALREADY_EXISTS: 409,
        code_pb2.PERMISSION_DENIED: 403,
        code_pb2.UNAUTHENTICATED: 401,
        code_pb2.RESOURCE_EXHAUSTED: 429,
        code_pb2.FAILED_PRECONDITION: 400,
        code_pb2.ABORTED: 409,
        code_pb2.OUT_OF_RANGE: 400,
        code_pb2.UNIMPLEMENTED: 501,
        code_pb2.INTERNAL: 500,
        code_pb2.UNAVAILABLE: 503,
        code_pb2.DATA_LOSS: 500,
    }
    assert len(HTTP_STATUS_BY_CODE) == len(grpc.StatusCode)
    assert http_status_from_code(99) == 500


def _bad_request_status(field="events", description="must hold 1 to 100 events, got 0"):
    status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=f"{field}: {description}")
    status.details.add().Pack(
        error_details_pb2.BadRequest(
            field_violations=[error_details_pb2.BadRequest.FieldViolation(field=field, description=description)]
        )
    )
    return status


def test_rich_status_comes_from_the_trailers_and_falls_back_to_the_code():
    rich = _bad_request_status()
    error = grpc.aio.AioRpcError(
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(("grpc-status-details-bin", rich.SerializeToString())),
        rich.message,
    )
    assert status_from_rpc_error(error) == rich
    plain = grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "down")
    assert status_from_rpc_error(plain) == status_pb2.Status(code=code_pb2.UNAVAILABLE, message="down")
    # A rich status whose code disagrees with the call's is not trusted.
    mismatched = grpc.aio.AioRpcError(
        grpc.StatusCode.INTERNAL,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(("grpc-status-details-bin", rich.SerializeToString())),
        "boom",
    )
    assert status_from_rpc_error(mismatched) == status_pb2.Status(code=code_pb2.INTERNAL, message="boom")


# --------------------------------------------------------------------------
# The app, against a stand-in gRPC server and against nothing


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _StandIn:
    """A gRPC server in this process that answers EventsService calls from a script."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, object, dict[str, str]]] = []
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        handlers = {
            "Track": self._method("Track", events_pb2.TrackRequest, self.track),
            "TrackBatch": self._method("TrackBatch", events_pb2.TrackBatchRequest, self.track_batch),
            "ListPersonEvents": self._method(
                "ListPersonEvents", events_pb2.ListPersonEventsRequest, self.list_person_events
            ),
        }
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("flameup.events.v1.EventsService", handlers),)
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def _method(self, name, request_cls, behaviour):
        def handle(request, context):
            self.seen.append((name, request, dict(context.invocation_metadata())))
            return behaviour(request, context)

        return grpc.unary_unary_rpc_method_handler(
            handle, request_deserializer=request_cls.FromString, response_serializer=lambda m: m.SerializeToString()
        )

    def track(self, request, context):
        if request.event == "unauthenticated":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown API key")
        if request.event == "slow":
            threading.Event().wait(1.0)
        return events_pb2.TrackResponse(success=True, event_id="evt_1", person_id="p")

    def track_batch(self, request, context):
        if not request.events:
            from grpc_status import rpc_status

            context.abort_with_status(rpc_status.to_status(_bad_request_status()))
        return events_pb2.TrackBatchResponse(success=True, event_ids=[f"evt_{i}" for i in range(len(request.events))])

    def list_person_events(self, request, context):
        reply = events_pb2.ListPersonEventsResponse(total=1)
        event = reply.events.add(id="evt_1", person_id=request.person_id, event="e")
        event.parameters.update({"qty": 2, "price": 99.99})
        event.timestamp.FromSeconds(1705314600)
        return reply

    def stop(self) -> None:
        self.server.stop(None)


@pytest.fixture(scope="module")
def stand_in():
    server = _StandIn()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(stand_in):
    app = create_app(f"127.0.0.1:{stand_in.port}", timeout=0.5)
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


AUTH = {"Authorization": "Bearer fe_test_key"}


def test_app_forwards_the_request_and_headers(client, stand_in):
    reply = client.post(
        "/api/v1/track",
        headers={**AUTH, "X-Request-Id": "req-1"},
        json={"external_id": "u1", "event": "e", "parameters": {"n": 2}, "extra": True},
    )
    assert reply.status_code == 200 and reply.headers["content-type"] == "application/json"
    assert reply.json() == {"success": True, "event_id": "evt_1", "person_id": "p", "duplicate": False}
    name, request, metadata = stand_in.seen[-1]
    assert name == "Track" and request.external_id == "u1" and request.parameters["n"] == 2
    assert metadata["authorization"] == "Bearer fe_test_key" and metadata["x-request-id"] == "req-1"


def test_app_builds_get_requests_from_path_and_query(client, stand_in):
    reply = client.get("/api/v1/people/u%201/events?id_type=external_id&limit=5&person_id=ignored", headers=AUTH)
    assert reply.status_code == 200
    assert reply.json()["events"][0]["parameters"] == {"price": 99.99, "qty": 2}
    assert b'"qty":2' in reply.content and b'"total":1' in reply.content
    _, request, _ = stand_in.seen[-1]
    assert request.person_id == "u 1" and request.id_type == "external_id"
    assert request.HasField("limit") and request.limit == 5 and not request.HasField("offset")


def test_app_passes_the_rich_status_on(client):
    reply = client.post("/api/v1/track/batch", headers=AUTH, json={"events": []})
    assert reply.status_code == 400
    assert reply.json() == {
        "code": 3,
        "message": "events: must hold 1 to 100 events, got 0",
        "details": [
            {
                "@type": "type.googleapis.com/google.rpc.BadRequest",
                "field_violations": [
                    {
                        "field": "events",
                        "description": "must hold 1 to 100 events, got 0",
                        "reason": "",
                        "localized_message": None,
                    }
                ],
            }
        ],
    }


def test_app_maps_grpc_codes_to_http(client):
    reply = client.post("/api/v1/track", json={"event": "unauthenticated"})
    assert reply.status_code == 401 and reply.headers["www-authenticate"] == "Bearer"
    assert reply.json() == {"code": 16, "message": "unknown API key", "details": []}
    reply = client.post("/api/v1/track", headers=AUTH, json={"event": "slow"})  # the deadline is 0.5 s here
    assert reply.status_code == 504 and reply.json()["code"] == 4


def test_app_rejects_bad_bodies_before_calling(client, stand_in):
    calls = len(stand_in.seen)
    reply = client.post("/api/v1/track/batch", headers=AUTH, json={"events": [{}, {"event": 5}]})
    assert reply.status_code == 400
    assert reply.json()["message"] == "events[1].event: expected a string, got number"
    assert reply.json()["details"][0]["field_violations"][0]["field"] == "events[1].event"
    for body in (b"", b"{oops", b"[1, 2]", b'"text"'):
        reply = client.post("/api/v1/track/batch", headers=AUTH, content=body)
        assert reply.status_code == 400 and reply.json()["code"] == 3
    assert client.get("/api/v1/people/u/events?limit=abc", headers=AUTH).json()["message"] == (
        'limit: expected an integer, got "abc"'
    )
    assert len(stand_in.seen) == calls


def test_app_limits_the_body_to_one_mebibyte(client, stand_in):
    calls = len(stand_in.seen)
    big = b'{"events": [], "pad": "' + b"x" * (1024 * 1024) + b'"}'
    reply = client.post("/api/v1/track/batch", headers=AUTH, content=big)
    assert reply.status_code == 413
    assert reply.json() == {
        "code": 8,
        "message": "request body is larger than the limit of 1048576 bytes",
        "details": [],
    }

    def chunks():  # no Content-Length: the running count decides
        for _ in range(11):
            yield b" " * 100_000

    assert client.post("/api/v1/track/batch", headers=AUTH, content=chunks()).status_code == 413
    just_fits = b'{"events": [{"event": "e"}], "pad": "' + b"x" * (1024 * 1024 - 60) + b'"}'
    assert len(just_fits) <= 1024 * 1024
    assert client.post("/api/v1/track/batch", headers=AUTH, content=just_fits).status_code == 200
    assert len(stand_in.seen) == calls + 1


def test_app_serves_openapi(client):
    doc = client.get("/openapi.json").json()
    assert set(doc["paths"]) == REST_PATHS


def test_app_without_a_grpc_server():
    app = create_app(f"127.0.0.1:{_free_port()}", timeout=2.0)
    with TestClient(app) as unreachable:
        reply = unreachable.post("/api/v1/track", headers=AUTH, json={"external_id": "u", "event": "e"})
        assert reply.status_code == 503 and reply.json()["code"] == 14
        reply = unreachable.get("/healthz")
        assert reply.status_code == 503 and reply.json()["status"] == "UNKNOWN"


def test_app_healthz_reports_the_grpc_health_service():
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with TestClient(create_app(f"127.0.0.1:{port}")) as test_client:
            servicer.set("", health_pb2.HealthCheckResponse.SERVING)
            assert test_client.get("/healthz").json() == {"status": "SERVING"}
            servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
            reply = test_client.get("/healthz")
            assert reply.status_code == 503 and reply.json() == {"status": "NOT_SERVING"}
    finally:
        server.stop(None)


def test_app_unexpected_errors_are_a_500_status_without_a_traceback(stand_in, monkeypatch):
    app = create_app(f"127.0.0.1:{stand_in.port}")

    def explode(*args, **kwargs):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(transcode, "populate_query", explode)
    with TestClient(app, raise_server_exceptions=False) as test_client:
        reply = test_client.get("/api/v1/people/u/events?limit=1", headers=AUTH)
    assert reply.status_code == 500
    assert reply.json() == {"code": 13, "message": "internal error", "details": []}
    assert "secret" not in reply.text



def test_app_spreads_its_channels_evenly_over_several_targets(stand_in):
    """serve gives the gateways each gRPC worker's own socket: calls alternate between them."""
    other = _StandIn()
    try:
        app = create_app([f"127.0.0.1:{stand_in.port}", f"127.0.0.1:{other.port}"], channels=3)
        before = len(stand_in.seen)
        with TestClient(app) as test_client:
            for i in range(8):
                reply = test_client.post("/api/v1/track", headers=AUTH, json={"external_id": f"u{i}", "event": "e"})
                assert reply.status_code == 200
        # 3 channels round up to 2 per target, taken in turn: 4 calls each
        assert len(stand_in.seen) - before == 4 and len(other.seen) == 4
    finally:
        other.stop()
