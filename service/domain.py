"""The domain core: validation, identity, ids and limits from the API contract.

Nothing here knows about gRPC, HTTP or a particular store. The servicer turns
protobuf messages into the plain values these functions take, and turns
:class:`ValidationError` into INVALID_ARGUMENT with a BadRequest detail.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import math
import random
import re
import struct
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

MAX_NAME_CHARS = 255
MAX_PARAMETERS_BYTES = 32 * 1024
MAX_PARAMETERS_DEPTH = 32
MAX_FUTURE_US = 24 * 3600 * 1_000_000
MIN_BATCH, MAX_BATCH = 1, 100
DEFAULT_LIMIT, MAX_LIMIT = 50, 500
HOUR_US = 3_600_000_000
DAY_US = 24 * HOUR_US
INTERVALS = {"hour": HOUR_US, "day": DAY_US}  # the bucket sizes of event counts
MAX_COUNT_BUCKETS = 1000
DEFAULT_COUNTS_RANGE_US = 30 * DAY_US
MAX_OFFSET = 2**31 - 1
DEFAULT_DEDUP_WINDOW_DAYS = 7
DAY_S = 86_400
ID_TYPES = ("person_id", "external_id")

# A fixed namespace makes person ids reproducible in any process, any language:
# person_id = uuid5(PERSON_NAMESPACE, workspace_id + "\n" + external_id).
# "\n" cannot occur in either part (control characters are rejected).
PERSON_NAMESPACE = uuid.UUID("6f1c2a4e-3b7d-5e8f-9a0b-1c2d3e4f5a6b")

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# RFC 3339 date-time: ASCII digits, a "T" or space separator, optional
# fraction, and a zone that is either Z or a numeric offset (no naive times).
_RFC3339 = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt ]([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]{1,9}))?"
    r"(?:([Zz])|([+-])([0-9]{2}):([0-9]{2}))"
)
# A UUID as RFC 9562 writes it: 8-4-4-4-12 hex digits, either case.
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


@dataclass(frozen=True, slots=True)
class FieldViolation:
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


class ValidationError(ValueError):
    """One or more fields of a request break the contract."""

    def __init__(self, *violations: FieldViolation) -> None:
        super().__init__("; ".join(map(str, violations)))
        self.violations = violations

    @classmethod
    def of(cls, field: str, message: str) -> ValidationError:
        return cls(FieldViolation(field, message))


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """An event as every store keeps it. Times are microseconds since the epoch."""

    event_id: str
    workspace_id: str
    person_id: str
    external_id: str
    event: str
    parameters: str  # a JSON object, canonical: see canonical_parameters()
    timestamp_us: int
    created_at_us: int
    message_id: str | None = None  # the client's id of the event, for deduplication


# What a store answers for one appended event: None when it was stored, else
# the (event_id, person_id) of the event stored earlier with its message_id.
Original = tuple[str, str]


@dataclass(frozen=True, slots=True)
class EventQuery:
    """One page of one person's timeline; since is inclusive, until exclusive."""

    workspace_id: str
    person_id: str
    limit: int = DEFAULT_LIMIT
    offset: int = 0
    event: str | None = None
    since_us: int | None = None
    until_us: int | None = None
    # Keyset paging: only events strictly older than (timestamp_us, event_id) in
    # the listing order; offset is then 0, and the cursor is before until_us.
    after: tuple[int, str] | None = None


@dataclass(frozen=True, slots=True)
class EventPage:
    events: list[StoredEvent]
    total: int
    # With ``after``: whether events follow this page (stores read one more row).
    more: bool = False


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A workspace's ingest limit: a token bucket of ``burst`` events refilled
    at ``events_per_second``. A batch takes one token per event it holds."""

    events_per_second: float
    burst: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.events_per_second) and self.events_per_second > 0):
            raise ValueError(f"events per second must be a positive number, got {self.events_per_second}")
        if self.burst < 1:
            raise ValueError(f"the burst must be at least 1 event, got {self.burst}")


@dataclass(frozen=True, slots=True)
class NameStats:
    """One event name's exact count and first and last time (microseconds)."""

    event: str
    count: int
    first_us: int
    last_us: int


@dataclass(frozen=True, slots=True)
class CountBucket:
    """One UTC hour or day of a workspace's events: starts at start_us."""

    start_us: int
    count: int
    unique_persons: int


def by_last_seen(stats: list[NameStats]) -> list[NameStats]:
    """Most recently seen first; ties by name, so the order is stable."""
    return sorted(stats, key=lambda s: (-s.last_us, s.event))


def now_us() -> int:
    return time.time_ns() // 1000


def check_name(field: str, value: str) -> str:
    """event and external_id: 1 to 255 characters, no control characters."""
    if not value:
        raise ValidationError.of(field, "must not be empty")
    if len(value) > MAX_NAME_CHARS:
        raise ValidationError.of(field, f"must be at most {MAX_NAME_CHARS} characters, got {len(value)}")
    if _CONTROL.search(value):
        raise ValidationError.of(field, "must not contain control characters")
    return value


# Active users repeat; uncached, uuid5 (SHA-1, UUID objects) is several % of a worker.
@functools.lru_cache(maxsize=16_384)
def person_id_for(workspace_id: str, external_id: str) -> str:
    return str(uuid.uuid5(PERSON_NAMESPACE, f"{workspace_id}\n{external_id}"))


def parse_person_id(field: str, value: str) -> str:
    """The canonical (lowercase) form of a person UUID."""
    if not _UUID.fullmatch(value):
        raise ValidationError.of(field, "must be a UUID (pass id_type=external_id to look a person up by your own id)")
    return value.lower()


_last_id_ms = 0
_id_seq = 0


def new_event_id(at_us: int) -> str:
    """ "evt_" + 32 hex digits: 48 bits of milliseconds, then 80 random bits.

    Like UUIDv7, ids sort by the time the service received the event. Within one
    process and one millisecond a counter in the top random bits keeps them
    increasing, so ties on timestamp still list in arrival order.

    The random bits only have to make ids unique, not unguessable: they come
    from ``random`` (seeded from the OS at start and again in a forked child),
    not from a getrandom() system call per event, which would cost about a
    tenth of a bulk insert's time.
    """
    global _last_id_ms, _id_seq
    ms = at_us // 1000
    if ms <= _last_id_ms:
        ms = _last_id_ms
        _id_seq += 1
    else:
        _last_id_ms, _id_seq = ms, random.getrandbits(12)
    tail = ((_id_seq & 0xFFFF) << 64) | random.getrandbits(64)
    return f"evt_{ms & 0xFFFFFFFFFFFF:012x}{tail:020x}"


def parse_timestamp(field: str, value: str) -> int:
    """An RFC 3339 date-time to microseconds since the epoch (UTC)."""
    m = _RFC3339.fullmatch(value)
    if not m:
        raise ValidationError.of(
            field, f"must be an RFC 3339 timestamp such as 2024-01-15T10:30:00Z, got {value[:64]!r}"
        )
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    frac, zulu, sign, off_h, off_m = m.group(7), m.group(8), m.group(9), m.group(10), m.group(11)
    # RFC 3339 allows a leap second (:60); it maps onto the next second.
    leap = second == 60
    try:
        local = datetime(year, month, day, hour, minute, 59 if leap else second, tzinfo=UTC)
    except ValueError:
        raise ValidationError.of(field, f"is not a valid date-time: {value[:64]!r}") from None
    offset = 0
    if not zulu:
        if int(off_h) > 23 or int(off_m) > 59:
            raise ValidationError.of(field, f"has an invalid UTC offset: {value[:64]!r}")
        offset = (int(off_h) * 60 + int(off_m)) * 60 * (1 if sign == "+" else -1)
    seconds = int(local.timestamp()) + leap - offset
    micros = int((frac or "0")[:6].ljust(6, "0"))
    return seconds * 1_000_000 + micros


def clock_skew(field: str, sent_at: str, received_us: int) -> int:
    """What to add to a client's timestamps: received − sent_at, the client's clock error."""
    return received_us - parse_timestamp(field, sent_at)


def check_event_time(field: str, ts_us: int, received_us: int) -> int:
    if ts_us > received_us + MAX_FUTURE_US:
        raise ValidationError.of(field, "must not be more than 24 hours in the future")
    if ts_us < 0:
        raise ValidationError.of(field, "must not be before 1970-01-01T00:00:00Z")
    return ts_us


def format_timestamp(ts_us: int) -> str:
    """Microseconds to RFC 3339 in UTC with a Z (fraction only when non-zero)."""
    seconds, micros = divmod(ts_us, 1_000_000)
    base = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{base}.{micros:06d}Z" if micros else f"{base}Z"


def canonical_parameters(field: str, value: Any) -> str:
    """A parameters object as canonical JSON text, or a ValidationError.

    Integral numbers are written as integers (protobuf's Struct carries every
    number as a double, so 2 arrives as 2.0 and must go back out as 2); other
    numbers keep their shortest round-trip form (99.99 stays 99.99).
    """
    if value is None:
        return "{}"
    if not isinstance(value, dict):
        raise ValidationError.of(field, "must be a JSON object")
    normalized = _normalize(field, value, 1)
    text = orjson.dumps(normalized)
    if len(text) > MAX_PARAMETERS_BYTES:
        raise ValidationError.of(field, f"must be at most {MAX_PARAMETERS_BYTES} bytes serialized, got {len(text)}")
    return text.decode()


def _normalize(field: str, value: Any, depth: int) -> Any:
    """Depth counts containers: {"a": 1} is 1 deep, {"a": {"b": [1]}} is 3.

    Strings, the most common values, are passed through without a call.
    """
    if isinstance(value, (dict, list)):
        if depth > MAX_PARAMETERS_DEPTH:
            raise ValidationError.of(field, f"must not be nested more than {MAX_PARAMETERS_DEPTH} levels deep")
        if isinstance(value, dict):
            return {k: v if type(v) is str else _normalize(field, v, depth + 1) for k, v in value.items()}
        return [v if type(v) is str else _normalize(field, v, depth + 1) for v in value]
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValidationError.of(field, "numbers must be finite")
        if value.is_integer() and abs(value) <= 2**53:
            return int(value)
    return value


def parse_parameters(text: str) -> dict[str, Any]:
    return orjson.loads(text)


# Page tokens ------------------------------------------------------------------
# A token is base64url (no padding) of: version (1 byte), the person's UUID
# (16), a digest of the workspace and filters (8), the last event's timestamp
# (8, signed) and id (16: the 32 hex digits), then a BLAKE2b checksum (8) of
# all that. It carries nothing secret: the checksum catches damaged and edited
# tokens, the digest a token reused with other filters or another workspace.

_TOKEN_VERSION = 1
_TOKEN = struct.Struct(">B16s8sq16s")
_CHECKSUM_BYTES = 8


def _filters_digest(q: EventQuery) -> bytes:
    text = f"{q.workspace_id}\n{q.event or ''}\n{q.since_us}\n{q.until_us}"
    return hashlib.blake2b(text.encode(), digest_size=8).digest()


def _checksum(payload: bytes) -> bytes:
    return hashlib.blake2b(payload, digest_size=_CHECKSUM_BYTES, person=b"flameup-page").digest()


def page_token(q: EventQuery, last: StoredEvent) -> str:
    """The token that continues the listing ``q`` after its event ``last``."""
    payload = _TOKEN.pack(
        _TOKEN_VERSION,
        uuid.UUID(q.person_id).bytes,
        _filters_digest(q),
        last.timestamp_us,
        bytes.fromhex(last.event_id[4:]),
    )
    return base64.urlsafe_b64encode(payload + _checksum(payload)).rstrip(b"=").decode()


def parse_page_token(field: str, token: str, q: EventQuery) -> tuple[int, str]:
    """The (timestamp_us, event_id) a token of the listing ``q`` continues after.

    A token that is damaged, edited, of another person, or of other filters is a
    ValidationError naming ``field``.
    """
    try:
        raw = base64.b64decode(token + "=" * (-len(token) % 4), altchars=b"-_", validate=True)
    except (ValueError, TypeError):
        raw = b""
    if len(raw) != _TOKEN.size + _CHECKSUM_BYTES:
        raise ValidationError.of(field, "is not a page token of this service; pass next_page_token unchanged")
    payload, checksum = raw[: _TOKEN.size], raw[_TOKEN.size :]
    if _checksum(payload) != checksum:
        raise ValidationError.of(field, "is damaged or was edited; pass next_page_token unchanged")
    version, person, digest, ts_us, event_id = _TOKEN.unpack(payload)
    if version != _TOKEN_VERSION:
        raise ValidationError.of(field, f"has an unknown version {version}; start the listing again")
    if str(uuid.UUID(bytes=person)) != q.person_id:
        raise ValidationError.of(field, "belongs to another person's listing")
    if digest != _filters_digest(q):
        raise ValidationError.of(
            field, "was issued for other filters (event, since, until); use the same ones, or start again without it"
        )
    return ts_us, "evt_" + event_id.hex()
