"""Core values as protobuf messages: what the servicer answers and the feed publishes."""

from __future__ import annotations

from flameup.events.v1 import events_pb2
from service import domain
from service.domain import StoredEvent


def event_message(e: StoredEvent) -> events_pb2.Event:
    msg = events_pb2.Event(
        id=e.event_id,
        workspace_id=e.workspace_id,
        person_id=e.person_id,
        external_id=e.external_id,
        event=e.event,
    )
    msg.parameters.update(domain.parse_parameters(e.parameters))
    set_micros(msg.timestamp, e.timestamp_us)
    set_micros(msg.created_at, e.created_at_us)
    return msg


def set_micros(ts, micros: int) -> None:
    seconds, rest = divmod(micros, 1_000_000)
    ts.seconds, ts.nanos = seconds, rest * 1000
