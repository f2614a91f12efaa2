"""An event as the JSON object ListPersonEvents returns for it (the feed's message body).

The gateway writes responses as protojson with proto field names and every
field present; an Event holds scalars, a Struct and Timestamps, written the
same way here from the same message (service.messages.event_message), so a
feed message and a listed event are the same JSON.
"""

from __future__ import annotations

from typing import Any

import orjson
from google.protobuf import struct_pb2, timestamp_pb2
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from protoconv import struct_to_python
from service.domain import StoredEvent
from service.messages import event_message


def message_json(msg: Message) -> dict[str, Any]:
    """protojson of the scalar, Struct and Timestamp fields of a message (UseProtoNames, EmitUnpopulated)."""
    out: dict[str, Any] = {}
    for field in msg.DESCRIPTOR.fields:
        value = getattr(msg, field.name)
        if field.type != FieldDescriptor.TYPE_MESSAGE:
            out[field.name] = list(value) if field.is_repeated else value
        elif isinstance(value, struct_pb2.Struct):
            out[field.name] = struct_to_python(value, sort_keys=True)
        elif isinstance(value, timestamp_pb2.Timestamp):
            out[field.name] = value.ToJsonString() if msg.HasField(field.name) else None
        else:
            out[field.name] = message_json(value) if msg.HasField(field.name) else None
    return out


def event_json(event: StoredEvent) -> bytes:
    """The event's JSON body, UTF-8."""
    return orjson.dumps(message_json(event_message(event)))
