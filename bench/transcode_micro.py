"""The gateway's JSON transcoding on its hot paths, next to protobuf's json_format.

    .venv/bin/python -m bench.transcode_micro [--repeat 7] [--seconds 0.2]

One process, no network: each case converts the same prebuilt value in a loop
and reports the best time per conversion over ``--repeat`` rounds, then the
ratio to ``json_format`` (above 1: json_format is slower). The cases are the
REST hot paths:

- ``track``: a POST /api/v1/track body (decoded JSON) to a TrackRequest;
- ``batch``: a POST /api/v1/track/batch body of 100 events to a TrackBatchRequest;
- ``list``: a ListPersonEventsResponse of 50 events to JSON bytes.

The bodies are the benchmark's own (``bench.data``). For requests the gateway
walks the message by its descriptor and fills ``parameters`` with protobuf's
``Struct.update``; the ``by hand`` row fills the Struct with a hand-written walk
instead, to show what that choice costs. For responses the gateway writes Struct
numbers as protojson does (``2``, where json_format writes ``2.0``), so the two
outputs differ in those numbers only. See docs/decisions/gateway-transcoding.md.
"""

from __future__ import annotations

import argparse
import sys
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flameup.events.v1 import events_pb2  # noqa: E402
from google.protobuf import json_format  # noqa: E402

from bench import data  # noqa: E402
from gateway.transcode import DEFAULT_CODECS  # noqa: E402


def _fill_by_hand(struct_msg: Any, obj: dict) -> None:
    """A Struct filled by a hand-written walk: the reference the library is measured against."""
    fields = struct_msg.fields
    for key, value in obj.items():
        kind = type(value)
        if kind is str:
            fields[key].string_value = value
        elif kind is float or kind is int:
            fields[key].number_value = value
        elif kind is bool:
            fields[key].bool_value = value
        elif value is None:
            fields[key].null_value = 0
        elif kind is dict:
            _fill_by_hand(fields[key].struct_value, value)
        else:
            _fill_list_by_hand(fields[key].list_value, value)


def _fill_list_by_hand(list_msg: Any, items: list) -> None:
    add = list_msg.values.add
    for value in items:
        kind = type(value)
        if kind is str:
            add(string_value=value)
        elif kind is float or kind is int:
            add(number_value=value)
        elif kind is bool:
            add(bool_value=value)
        elif value is None:
            add(null_value=0)
        elif kind is dict:
            _fill_by_hand(add().struct_value, value)
        else:
            _fill_list_by_hand(add().list_value, value)


def _by_hand(body: dict) -> events_pb2.TrackRequest:
    msg = events_pb2.TrackRequest(external_id=body["external_id"], event=body["event"])
    _fill_by_hand(msg.parameters, body["parameters"])
    return msg


def _list_response(n: int) -> events_pb2.ListPersonEventsResponse:
    reply = events_pb2.ListPersonEventsResponse(total=n)
    for i in range(n):
        it = data.item(i)
        event = reply.events.add(
            id=f"evt_{i:032x}", workspace_id=data.WORKSPACE, person_id="0" * 36, external_id=it.external_id,
            event=it.event,
        )
        event.parameters.update(it.parameters)
        event.timestamp.FromSeconds(1705314600 + i)
        event.created_at.FromSeconds(1705314600 + i)
    return reply


def cases() -> dict[str, dict[str, Callable[[], Any]]]:
    track_codec = DEFAULT_CODECS.for_class(events_pb2.TrackRequest)
    batch_codec = DEFAULT_CODECS.for_class(events_pb2.TrackBatchRequest)
    list_codec = DEFAULT_CODECS.for_class(events_pb2.ListPersonEventsResponse)
    track = orjson.loads(data.rest_track_bodies(1)[0])
    batch = orjson.loads(data.rest_batch_bodies(1)[0])
    reply = _list_response(50)

    def parse_dict(body: dict, cls: type) -> Any:
        return json_format.ParseDict(body, cls(), ignore_unknown_fields=True)

    assert track_codec.parse(track) == parse_dict(track, events_pb2.TrackRequest) == _by_hand(track)
    assert batch_codec.parse(batch) == parse_dict(batch, events_pb2.TrackBatchRequest)
    return {
        "track": {
            "gateway": lambda: track_codec.parse(track),
            "by hand": lambda: _by_hand(track),
            "json_format": lambda: parse_dict(track, events_pb2.TrackRequest),
        },
        "batch": {
            "gateway": lambda: batch_codec.parse(batch),
            "by hand": lambda: events_pb2.TrackBatchRequest(events=[_by_hand(e) for e in batch["events"]]),
            "json_format": lambda: parse_dict(batch, events_pb2.TrackBatchRequest),
        },
        "list": {
            "gateway": lambda: orjson.dumps(list_codec.to_json(reply)),
            "json_format": lambda: orjson.dumps(
                json_format.MessageToDict(
                    reply, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
                )
            ),
        },
    }


def best_seconds(fn: Callable[[], Any], repeat: int, seconds: float) -> float:
    timer = timeit.Timer(fn)
    number, _ = timer.autorange()
    number = max(1, int(number * seconds / 0.2))
    return min(timer.repeat(repeat=repeat, number=number)) / number


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=7, help="rounds per case; the best counts")
    parser.add_argument("--seconds", type=float, default=0.2, help="about how long one round runs")
    args = parser.parse_args(argv)
    print(f"{'case':<7} {'way':<12} {'us per op':>10} {'json_format / way':>18}")
    for case, ways in cases().items():
        times = {way: best_seconds(fn, args.repeat, args.seconds) for way, fn in ways.items()}
        for way, took in times.items():
            print(f"{case:<7} {way:<12} {took * 1e6:>10.1f} {times['json_format'] / took:>18.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
