"""An event as the JSON object ListPersonEvents returns for it (the feed's message body).

The gateway writes an Event as protojson with proto field names and every
field present: the fields in proto order, ``parameters`` with its keys sorted
and integral numbers (within +-2**53) as integers, Timestamps as RFC 3339 in
UTC with 0, 3 or 6 fractional digits. Stored parameters are already canonical
(service.domain.canonical_parameters: integral numbers as integers), so the
object is written here straight from the stored row, with no protobuf
message in between: the publisher renders every event. tests/test_feed.py
checks it against the gateway's own rendering of service.messages.event_message.
"""

from __future__ import annotations

import functools
from datetime import UTC, datetime

import orjson

from service.domain import StoredEvent

_SORTED = orjson.OPT_SORT_KEYS


@functools.lru_cache(maxsize=4096)
def _second(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")


def rfc3339(micros: int) -> str:
    """A time as protobuf's Timestamp.ToJsonString writes it (microsecond precision)."""
    seconds, rest = divmod(micros, 1_000_000)
    if not rest:
        return _second(seconds) + "Z"
    if rest % 1000 == 0:
        return f"{_second(seconds)}.{rest // 1000:03d}Z"
    return f"{_second(seconds)}.{rest:06d}Z"


def event_json(e: StoredEvent) -> bytes:
    """The event's JSON body, UTF-8."""
    parameters = b"{}" if e.parameters == "{}" else orjson.dumps(orjson.loads(e.parameters), option=_SORTED)
    return orjson.dumps(
        {
            "id": e.event_id,
            "workspace_id": e.workspace_id,
            "person_id": e.person_id,
            "external_id": e.external_id,
            "event": e.event,
            "parameters": orjson.Fragment(parameters),
            "timestamp": rfc3339(e.timestamp_us),
            "created_at": rfc3339(e.created_at_us),
        }
    )
