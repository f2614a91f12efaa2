"""JSON <-> protobuf transcoding, driven by message descriptors.

The gateway's hot path. Everything that can be derived from a descriptor is
derived once, when a message's :class:`MessageCodec` is first built (field
tables, name lookups, converters, attribute getters); a request then costs one
walk over its JSON and one walk over the response message.

Request side (JSON -> protobuf), as protojson with ``DiscardUnknown``:

- a field is found by its proto name or its lowerCamelCase ``json_name``;
  unknown fields are ignored, ``null`` leaves a field unset (a
  ``google.protobuf.Value`` field becomes ``null_value``);
- scalars are type-checked (a string where an integer belongs is an error, an
  integer may also come as an integral number or a decimal string, int64 as a
  string or a number), so is every repeated field, map and nested message;
- ``google.protobuf.Struct`` / ``Value`` / ``ListValue`` take any JSON,
  ``Timestamp`` an RFC 3339 string, ``Duration`` ``"1.5s"``, ``FieldMask``
  ``"a.b,c"``, the wrappers their scalar, ``Any`` an object with ``@type``;
- JSON nesting deeper than :data:`MAX_DEPTH` levels (the top-level object is
  level 1) is refused as a whole;
- the first error stops the walk and raises :class:`TranscodeError`, whose
  ``field`` is the path of the offending field in proto names, e.g.
  ``events[3].event``.

Response side (protobuf -> JSON-ready Python values, then ``orjson``):

- proto field names; every field present, defaults too (``""``, ``0``,
  ``false``, ``[]``, ``{}`` for maps);
- an unset message field is ``null``, except ``Struct`` (``{}``) and
  ``ListValue`` (``[]``): a gRPC service cannot tell an empty Struct from an
  unset one (``Struct.update({})`` sets nothing), and "a JSON object" is what
  the API promises; an unset ``optional`` scalar or oneof member is ``null``;
- 64-bit integers are strings (proto3 JSON), 32-bit ones numbers, enums names,
  bytes base64, non-finite doubles ``"NaN"`` / ``"Infinity"`` /
  ``"-Infinity"``;
- ``Timestamp`` is RFC 3339 in UTC with ``Z`` and 0, 3, 6 or 9 fraction
  digits, as protojson writes it; ``Struct`` / ``Value`` are plain JSON where a
  number that is integral and within +-2**53 is an integer (``2``, not ``2.0``).

Query strings and path parameters (:func:`populate_query`,
:func:`set_field_from_string`) follow grpc-gateway's ``DefaultQueryParser``:
dotted names reach into nested messages, repeated fields take repeated keys,
a key whose only value is empty is dropped (so an ``optional`` field stays
unset), more than one value for a singular field is an error, unknown names
are ignored, ``bool`` is Go's ``strconv.ParseBool``.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import struct
from collections.abc import Callable, Iterable
from datetime import date, datetime, timedelta
from operator import attrgetter
from typing import Any

import orjson
from google.protobuf import descriptor_pool, message_factory, struct_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

MAX_DEPTH = 64
"""Deepest JSON nesting accepted in a request; the top-level object is level 1.
The service allows `parameters` 32 levels deep, which sits at level 35 of a
batch request, so this must stay above that."""

MAX_PROTO_DEPTH = 100
"""Deepest message nesting the receiving side decodes (upb's and protobuf-go's
default limit; the root message is level 0). Struct, Value and ListValue make
JSON expensive here: an object nested in a Struct is 3 levels (Struct, map
entry, Value), so a batch's `parameters` can be at most 33 objects deep. A
request that would exceed it is refused here with 400, not left to fail as a
whole inside the service's decoder."""

FD = FieldDescriptor
_INT32 = (-(2**31), 2**31 - 1)
_UINT32 = (0, 2**32 - 1)
_INT64 = (-(2**63), 2**63 - 1)
_UINT64 = (0, 2**64 - 1)
_INT_RANGES = {
    FD.TYPE_INT32: ("int32", _INT32),
    FD.TYPE_SINT32: ("int32", _INT32),
    FD.TYPE_SFIXED32: ("int32", _INT32),
    FD.TYPE_UINT32: ("uint32", _UINT32),
    FD.TYPE_FIXED32: ("uint32", _UINT32),
    FD.TYPE_INT64: ("int64", _INT64),
    FD.TYPE_SINT64: ("int64", _INT64),
    FD.TYPE_SFIXED64: ("int64", _INT64),
    FD.TYPE_UINT64: ("uint64", _UINT64),
    FD.TYPE_FIXED64: ("uint64", _UINT64),
}
_INT64_TYPES = frozenset(t for t, (name, _) in _INT_RANGES.items() if name.endswith("64"))
_FLOAT32_MAX = 3.4028234663852886e38
_MAX_SAFE = 2**53

_INT_TEXT = re.compile(r"[+-]?\d+")
_FLOAT_TEXT = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?(?:([Zz])|([+-])(\d{2}):(\d{2}))"
)
_DURATION = re.compile(r"(-)?(\d+)(?:\.(\d{1,9}))?s")
_TRUE = frozenset(("1", "t", "T", "TRUE", "true", "True"))
_FALSE = frozenset(("0", "f", "F", "FALSE", "false", "False"))
_EPOCH = datetime(1970, 1, 1)
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()
_MIN_SECONDS = -62135596800  # 0001-01-01T00:00:00Z
_MAX_SECONDS = 253402300799  # 9999-12-31T23:59:59Z
_TYPE_URL_PREFIX = "type.googleapis.com/"

_JSON_KIND = {
    str: "string",
    int: "number",
    float: "number",
    bool: "boolean",
    dict: "object",
    list: "array",
    type(None): "null",
}


class TranscodeError(ValueError):
    """A request does not fit its message: INVALID_ARGUMENT for the caller.

    ``field`` is the path of the offending field (``events[3].event``), built
    on the way out of the walk; ``description`` says what is wrong with it.
    """

    def __init__(self, description: str, field: str = "") -> None:
        super().__init__(description)
        self.description = description
        self._parts: list[str | int] = [field] if field else []

    def push(self, part: str | int) -> None:
        """Prefix the path with a field name or a list index (called outward)."""
        self._parts.append(part)

    @property
    def field(self) -> str:
        out: list[str] = []
        for part in reversed(self._parts):
            if isinstance(part, int):
                out.append(f"[{part}]")
            elif part.startswith("["):
                out.append(part)
            else:
                out.append(f".{part}" if out else part)
        return "".join(out)

    def __str__(self) -> str:
        field = self.field
        return f"{field}: {self.description}" if field else self.description


def _got(value: Any) -> str:
    """How an offending JSON value is named in an error."""
    kind = type(value)
    if kind is str:
        text = value if len(value) <= 64 else value[:61] + "..."
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if kind is float and math.isfinite(value) and not value.is_integer():
        return repr(value)
    return _JSON_KIND.get(kind, kind.__name__)


def describe(value: Any) -> str:
    """A JSON value as error messages name it: a quoted string, else its kind."""
    return _got(value)


def _at_each_index(convert: Callable[[Any], Any], items: list) -> list:
    """``convert`` applied to each item in order; an error names the item's index."""
    out = []
    for index, item in enumerate(items):
        try:
            out.append(convert(item))
        except TranscodeError as exc:
            exc.push(index)
            raise
    return out


def _depth_error() -> TranscodeError:
    return TranscodeError(f"JSON nesting is deeper than {MAX_DEPTH} levels")


def _proto_depth_error() -> TranscodeError:
    return TranscodeError(
        f"nesting is too deep to send over gRPC (protobuf decoders stop at {MAX_PROTO_DEPTH} nested "
        "messages, and each JSON object level inside a Struct takes 3 of them)"
    )


# --------------------------------------------------------------------------
# Scalars, JSON side


def _json_string(value: Any) -> str:
    if type(value) is str:
        return value
    raise TranscodeError(f"expected a string, got {_got(value)}")


def _json_bool(value: Any) -> bool:
    if type(value) is bool:
        return value
    raise TranscodeError(f"expected a boolean, got {_got(value)}")


def _int_converter(type_name: str, bounds: tuple[int, int]) -> Callable[[Any], int]:
    low, high = bounds

    def convert(value: Any) -> int:
        kind = type(value)
        if kind is int:
            number = value
        elif kind is float and value.is_integer():
            number = int(value)
        elif kind is str and _INT_TEXT.fullmatch(value):
            number = int(value)
        elif kind is str and _FLOAT_TEXT.fullmatch(value) and float(value).is_integer():
            number = int(float(value))
        else:
            raise TranscodeError(f"expected an integer, got {_got(value)}")
        if low <= number <= high:
            return number
        raise TranscodeError(f"{number} is out of range for {type_name}")

    return convert


def _float_converter(single: bool) -> Callable[[Any], float]:
    def convert(value: Any) -> float:
        kind = type(value)
        if kind is float or kind is int:
            number = float(value)
        elif kind is str:
            if value == "NaN":
                return math.nan
            if value == "Infinity":
                return math.inf
            if value == "-Infinity":
                return -math.inf
            if not _FLOAT_TEXT.fullmatch(value):
                raise TranscodeError(f"expected a number, got {_got(value)}")
            number = float(value)
            if math.isinf(number):
                raise TranscodeError(f"{value} is out of range for double")
        else:
            raise TranscodeError(f"expected a number, got {_got(value)}")
        if single and abs(number) > _FLOAT32_MAX:
            raise TranscodeError(f"{value} is out of range for float")
        return number

    return convert


def _json_bytes(value: Any) -> bytes:
    if type(value) is not str:
        raise TranscodeError(f"expected a base64 string, got {_got(value)}")
    return _decode_base64(value)


def _decode_base64(text: str) -> bytes:
    try:
        padded = text + "=" * (-len(text) % 4)
        if "-" in text or "_" in text:
            return base64.urlsafe_b64decode(padded)
        return base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError):
        raise TranscodeError(f"expected a base64 string, got {_got(text)}") from None


def _enum_converter(field: FieldDescriptor) -> Callable[[Any], int]:
    by_name = {v.name: v.number for v in field.enum_type.values}
    name = field.enum_type.full_name

    def convert(value: Any) -> int:
        kind = type(value)
        if kind is str:
            number = by_name.get(value)
            if number is not None:
                return number
            raise TranscodeError(f"{_got(value)} is not a value of {name}")
        if kind is int and _INT32[0] <= value <= _INT32[1]:
            return value
        if kind is float and value.is_integer() and _INT32[0] <= value <= _INT32[1]:
            return int(value)
        raise TranscodeError(f"expected a {name} name or number, got {_got(value)}")

    return convert


def _scalar_converter(field: FieldDescriptor) -> Callable[[Any], Any]:
    t = field.type
    if t == FD.TYPE_STRING:
        return _json_string
    if t == FD.TYPE_BOOL:
        return _json_bool
    if t in _INT_RANGES:
        return _int_converter(*_INT_RANGES[t])
    if t == FD.TYPE_DOUBLE:
        return _float_converter(single=False)
    if t == FD.TYPE_FLOAT:
        return _float_converter(single=True)
    if t == FD.TYPE_BYTES:
        return _json_bytes
    if t == FD.TYPE_ENUM:
        return _enum_converter(field)
    raise TypeError(f"unsupported field type {t} of {field.full_name}")


# --------------------------------------------------------------------------
# Scalars, query-string side (grpc-gateway's parseField)


def _text_converter(field: FieldDescriptor) -> Callable[[str], Any]:
    t = field.type
    if t == FD.TYPE_STRING:
        return str
    if t == FD.TYPE_BOOL:

        def convert_bool(text: str) -> bool:
            if text in _TRUE:
                return True
            if text in _FALSE:
                return False
            raise TranscodeError(f"expected a boolean, got {_got(text)}")

        return convert_bool
    if t in _INT_RANGES:
        type_name, (low, high) = _INT_RANGES[t]

        def convert_int(text: str) -> int:
            if not _INT_TEXT.fullmatch(text):
                raise TranscodeError(f"expected an integer, got {_got(text)}")
            number = int(text)
            if low <= number <= high:
                return number
            raise TranscodeError(f"{number} is out of range for {type_name}")

        return convert_int
    if t in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
        json_convert = _float_converter(single=t == FD.TYPE_FLOAT)
        specials = {"NaN": "NaN", "nan": "NaN", "Inf": "Infinity", "+Inf": "Infinity", "-Inf": "-Infinity",
                    "inf": "Infinity", "+inf": "Infinity", "-inf": "-Infinity",
                    "Infinity": "Infinity", "-Infinity": "-Infinity"}
        return lambda text: json_convert(specials.get(text, text))
    if t == FD.TYPE_BYTES:
        return _decode_base64
    if t == FD.TYPE_ENUM:
        enum_convert = _enum_converter(field)
        return lambda text: enum_convert(int(text) if _INT_TEXT.fullmatch(text) else text)
    raise TypeError(f"unsupported field type {t} of {field.full_name}")


# --------------------------------------------------------------------------
# Timestamps and durations


def parse_timestamp(text: Any) -> tuple[int, int]:
    """An RFC 3339 date-time to (seconds, nanos) since the epoch, UTC."""
    if type(text) is not str:
        raise TranscodeError(f"expected an RFC 3339 timestamp string, got {_got(text)}")
    m = _RFC3339.fullmatch(text)
    if m is None:
        raise TranscodeError(f"expected an RFC 3339 timestamp such as 2024-01-15T10:30:00Z, got {_got(text)}")
    year, month, day, hour, minute, second = (int(g) for g in m.group(1, 2, 3, 4, 5, 6))
    try:
        days = date(year, month, day).toordinal() - _EPOCH_ORDINAL
    except ValueError:
        raise TranscodeError(f"{_got(text)} is not a valid date") from None
    if hour > 23 or minute > 59 or second > 60:  # :60 is a leap second: the next second
        raise TranscodeError(f"{_got(text)} is not a valid time of day")
    seconds = days * 86400 + hour * 3600 + minute * 60 + second
    if m.group(9):
        off_h, off_m = int(m.group(10)), int(m.group(11))
        if off_h > 23 or off_m > 59:
            raise TranscodeError(f"{_got(text)} has an invalid UTC offset")
        offset = off_h * 3600 + off_m * 60
        seconds -= offset if m.group(9) == "+" else -offset
    if not _MIN_SECONDS <= seconds <= _MAX_SECONDS:
        raise TranscodeError(f"{_got(text)} is outside 0001-01-01 to 9999-12-31")
    fraction = m.group(7)
    return seconds, int(fraction.ljust(9, "0")) if fraction else 0


def format_timestamp(seconds: int, nanos: int) -> str:
    """(seconds, nanos) to RFC 3339 in UTC with Z, as protojson writes it."""
    if not _MIN_SECONDS <= seconds <= _MAX_SECONDS or not 0 <= nanos < 1_000_000_000:
        raise ValueError(f"Timestamp out of range: seconds={seconds} nanos={nanos}")
    text = (_EPOCH + timedelta(seconds=seconds)).isoformat()
    if not nanos:
        return text + "Z"
    if nanos % 1_000_000 == 0:
        return f"{text}.{nanos // 1_000_000:03d}Z"
    if nanos % 1000 == 0:
        return f"{text}.{nanos // 1000:06d}Z"
    return f"{text}.{nanos:09d}Z"


def _parse_duration(text: Any) -> tuple[int, int]:
    m = _DURATION.fullmatch(text) if type(text) is str else None
    if m is None:
        raise TranscodeError(f'expected a duration such as "1.5s", got {_got(text)}')
    seconds = int(m.group(2))
    nanos = int(m.group(3).ljust(9, "0")) if m.group(3) else 0
    if seconds > 315576000000:
        raise TranscodeError(f"duration out of range: {_got(text)}")
    return (-seconds, -nanos) if m.group(1) else (seconds, nanos)


def _format_duration(seconds: int, nanos: int) -> str:
    sign = "-" if seconds < 0 or nanos < 0 else ""
    seconds, nanos = abs(seconds), abs(nanos)
    if not nanos:
        return f"{sign}{seconds}s"
    if nanos % 1_000_000 == 0:
        return f"{sign}{seconds}.{nanos // 1_000_000:03d}s"
    if nanos % 1000 == 0:
        return f"{sign}{seconds}.{nanos // 1000:06d}s"
    return f"{sign}{seconds}.{nanos:09d}s"


def _camel_to_snake(name: str) -> str:
    return re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), name)


def _snake_to_camel(name: str) -> str:
    return re.sub(r"_([a-z0-9])", lambda m: m.group(1).upper(), name)


# --------------------------------------------------------------------------
# Struct, Value, ListValue (the hot part of a batch: event parameters)


def _fill_struct(struct_msg: Any, obj: dict, depth: int, level: int) -> None:
    """Fill a google.protobuf.Struct from a dict at JSON nesting level ``depth``;
    the Struct is at message nesting ``level``."""
    if depth > MAX_DEPTH:
        raise _depth_error()
    if level + 2 > MAX_PROTO_DEPTH and (obj or level > MAX_PROTO_DEPTH):  # entries: +1, their values: +2
        raise _proto_depth_error()
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
            _fill_struct(fields[key].struct_value, value, depth + 1, level + 3)
        else:
            _fill_list(fields[key].list_value, value, depth + 1, level + 3)
    if not obj:
        struct_msg.SetInParent()


def _fill_list(list_msg: Any, items: list, depth: int, level: int) -> None:
    if depth > MAX_DEPTH:
        raise _depth_error()
    if level + 1 > MAX_PROTO_DEPTH and (items or level > MAX_PROTO_DEPTH):  # values: +1
        raise _proto_depth_error()
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
            _fill_struct(add().struct_value, value, depth + 1, level + 2)
        else:
            _fill_list(add().list_value, value, depth + 1, level + 2)
    if not items:
        list_msg.SetInParent()


def _fill_value(value_msg: Any, value: Any, depth: int, level: int) -> None:
    """Fill a google.protobuf.Value at message ``level``; ``depth`` is the JSON
    level of the value's parent."""
    if level > MAX_PROTO_DEPTH:
        raise _proto_depth_error()
    kind = type(value)
    if kind is str:
        value_msg.string_value = value
    elif kind is float or kind is int:
        value_msg.number_value = value
    elif kind is bool:
        value_msg.bool_value = value
    elif value is None:
        value_msg.null_value = 0
    elif kind is dict:
        _fill_struct(value_msg.struct_value, value, depth + 1, level + 1)
    else:
        _fill_list(value_msg.list_value, value, depth + 1, level + 1)


def _number_out(number: float) -> Any:
    if number.is_integer():
        if -_MAX_SAFE <= number <= _MAX_SAFE:
            return int(number)
        return number
    if math.isfinite(number):
        return number
    return "NaN" if math.isnan(number) else ("Infinity" if number > 0 else "-Infinity")


_VALUE_FIELDS = struct_pb2.Value.DESCRIPTOR.fields_by_name
_STRING_VALUE = _VALUE_FIELDS["string_value"]
_NUMBER_VALUE = _VALUE_FIELDS["number_value"]
_BOOL_VALUE = _VALUE_FIELDS["bool_value"]
_STRUCT_VALUE = _VALUE_FIELDS["struct_value"]
_LIST_VALUE = _VALUE_FIELDS["list_value"]


def struct_to_python(struct_msg: Any) -> dict[str, Any]:
    """A Struct as plain JSON values, keys sorted (as protojson writes maps)."""
    return {key: _value_out(value) for key, value in sorted(struct_msg.fields.items())}


def _list_out(list_msg: Any) -> list[Any]:
    return [_value_out(value) for value in list_msg.values]


def _value_out(value: Any) -> Any:
    # ListFields() is one C call that yields the set member of the `kind`
    # oneof; it is cheaper than WhichOneof() followed by getattr().
    members = value.ListFields()
    if not members:
        return None
    field, item = members[0]
    if field is _STRING_VALUE:
        return item
    if field is _NUMBER_VALUE:
        if item.is_integer() and -_MAX_SAFE <= item <= _MAX_SAFE:
            return int(item)
        return item if math.isfinite(item) else _number_out(item)
    if field is _BOOL_VALUE:
        return item
    if field is _STRUCT_VALUE:
        return {key: _value_out(inner) for key, inner in sorted(item.fields.items())}
    if field is _LIST_VALUE:
        return [_value_out(inner) for inner in item.values]
    return None  # null_value


# --------------------------------------------------------------------------
# Message codecs

_WRAPPERS = frozenset(
    f"google.protobuf.{name}"
    for name in ("DoubleValue", "FloatValue", "Int64Value", "UInt64Value", "Int32Value", "UInt32Value",
                 "BoolValue", "StringValue", "BytesValue")
)
WELL_KNOWN_SCALARS = frozenset(
    {"google.protobuf.Timestamp", "google.protobuf.Duration", "google.protobuf.FieldMask"} | _WRAPPERS
)
"""Message types that JSON (and a query string) carry as one scalar value."""

Setter = Callable[[Any, Any, int, int], None]
"""set(message, json_value, json_depth_of_the_message, message_level)."""

Filler = Callable[[Any, Any, int, int], None]
"""fill(message, json_value, json_depth_of_the_parent, message_level): the
message is at nesting ``message_level`` (the request itself is 0)."""


class FieldCodec:
    """Everything about one field that transcoding needs, computed once."""

    __slots__ = ("descriptor", "name", "json_name", "accepts_null", "set", "set_text", "message_codec",
                 "map_value_codec", "repeated", "is_map", "oneof", "plain_type")

    def __init__(self, descriptor: FieldDescriptor, codecs: CodecRegistry) -> None:
        self.descriptor = descriptor
        self.name = descriptor.name
        self.json_name = descriptor.json_name
        self.repeated = descriptor.is_repeated
        message_type = descriptor.message_type
        self.is_map = bool(message_type is not None and message_type.GetOptions().map_entry)
        self.message_codec = (
            codecs.get(message_type) if message_type is not None and not self.is_map else None
        )
        value_type = message_type.fields_by_name["value"].message_type if self.is_map else None
        self.map_value_codec = codecs.get(value_type) if value_type is not None else None
        self.accepts_null = (
            not self.repeated and message_type is not None and message_type.full_name == "google.protobuf.Value"
        )
        oneof = descriptor.containing_oneof
        self.oneof = oneof.name if oneof is not None and not _is_synthetic(oneof) else None
        self.set: Setter = self._make_setter(codecs)
        # Singular string and bool fields take the JSON value as it is: the
        # message walk sets them inline (a fast path; `set` handles the rest).
        self.plain_type = (
            {FD.TYPE_STRING: str, FD.TYPE_BOOL: bool}.get(descriptor.type)
            if not self.repeated and self.oneof is None
            else None
        )
        self.set_text: Callable[[Any, list[str]], None] | None = None  # built on first use

    # -- JSON ------------------------------------------------------------------

    def _make_setter(self, codecs: CodecRegistry) -> Setter:
        name = self.name
        field = self.descriptor
        if self.is_map:
            return self._map_setter(codecs)
        if self.repeated:
            if field.message_type is None:
                convert = _scalar_converter(field)

                def set_scalars(msg: Any, value: Any, depth: int, level: int) -> None:
                    if type(value) is not list:
                        raise TranscodeError(f"expected an array, got {_got(value)}")
                    if depth + 1 > MAX_DEPTH:
                        raise _depth_error()
                    getattr(msg, name).extend(_at_each_index(convert, value))

                return set_scalars

            fill = self.message_codec.fill  # type: ignore[union-attr]

            def set_messages(msg: Any, value: Any, depth: int, level: int) -> None:
                if type(value) is not list:
                    raise TranscodeError(f"expected an array, got {_got(value)}")
                depth += 1
                if depth > MAX_DEPTH:
                    raise _depth_error()
                add = getattr(msg, name).add
                level += 1
                _at_each_index(lambda item: fill(add(), item, depth, level), value)

            return set_messages

        if field.message_type is None:
            convert = _scalar_converter(field)

            def set_scalar(msg: Any, value: Any, depth: int, level: int) -> None:
                setattr(msg, name, convert(value))

            return set_scalar

        fill = self.message_codec.fill  # type: ignore[union-attr]

        def set_message(msg: Any, value: Any, depth: int, level: int) -> None:
            inner = getattr(msg, name)
            inner.SetInParent()
            fill(inner, value, depth, level + 1)

        return set_message

    def _map_setter(self, codecs: CodecRegistry) -> Setter:
        name = self.name
        entry = self.descriptor.message_type
        key_field, value_field = entry.fields_by_name["key"], entry.fields_by_name["value"]
        key_text = _text_converter(key_field)
        value_codec = self.map_value_codec
        convert = _scalar_converter(value_field) if value_codec is None else None

        def set_map(msg: Any, value: Any, depth: int, level: int) -> None:
            if type(value) is not dict:
                raise TranscodeError(f"expected an object, got {_got(value)}")
            depth += 1
            if depth > MAX_DEPTH:
                raise _depth_error()
            if value and level + 1 > MAX_PROTO_DEPTH:
                raise _proto_depth_error()
            target = getattr(msg, name)
            for raw_key, item in value.items():
                try:
                    key = key_text(raw_key)
                    if value_codec is not None:
                        value_codec.fill(target[key], item, depth, level + 2)
                    else:
                        target[key] = convert(item)  # type: ignore[misc]
                except TranscodeError as exc:
                    exc.push(f"[{_got(raw_key)}]")
                    raise

        return set_map

    # -- query strings and path parameters ------------------------------------------

    def text_setter(self) -> Callable[[Any, list[str]], None]:
        if self.set_text is None:
            self.set_text = self._make_text_setter()
        return self.set_text

    def _make_text_setter(self) -> Callable[[Any, list[str]], None]:
        name = self.name
        field = self.descriptor
        if self.is_map:

            def unsupported(msg: Any, values: list[str]) -> None:
                raise TranscodeError("map fields cannot be set from a query string")

            return unsupported
        if field.message_type is None:
            convert_one = _text_converter(field)
        else:
            codec = self.message_codec
            assert codec is not None
            full_name = codec.full_name
            if full_name in ("google.protobuf.Struct", "google.protobuf.Value", "google.protobuf.ListValue"):

                def convert_one(text: str) -> Any:
                    try:
                        return orjson.loads(text)
                    except orjson.JSONDecodeError:
                        raise TranscodeError(f"expected JSON, got {_got(text)}") from None

            elif full_name in WELL_KNOWN_SCALARS:
                convert_one = codec.text_to_json
            else:

                def convert_one(text: str) -> Any:
                    raise TranscodeError(f"a {full_name} cannot be set from a single query value")

        if self.repeated:
            if field.message_type is None:

                def set_repeated(msg: Any, values: list[str]) -> None:
                    getattr(msg, name).extend(_at_each_index(convert_one, values))

                return set_repeated
            fill = self.message_codec.fill  # type: ignore[union-attr]

            def set_repeated_messages(msg: Any, values: list[str]) -> None:
                add = getattr(msg, name).add
                _at_each_index(lambda text: fill(add(), convert_one(text), 1, 1), values)

            return set_repeated_messages

        def set_one(msg: Any, values: list[str]) -> None:
            if len(values) > 1:
                raise TranscodeError(f"takes one value, got {len(values)}")
            value = convert_one(values[0])
            if field.message_type is None:
                setattr(msg, name, value)
            else:
                inner = getattr(msg, name)
                inner.SetInParent()
                self.message_codec.fill(inner, value, 1, 1)  # type: ignore[union-attr]

        return set_one


def _is_synthetic(oneof: Any) -> bool:
    fields = oneof.fields
    return len(fields) == 1 and oneof.name == "_" + fields[0].name


class MessageCodec:
    """JSON <-> one message type. Build through :class:`CodecRegistry`."""

    def __init__(self, descriptor: Descriptor, codecs: CodecRegistry) -> None:
        self.descriptor = descriptor
        self.full_name = descriptor.full_name
        self.cls: type[Message] = codecs.message_class(descriptor)
        self.fields: list[FieldCodec] = []
        self.by_key: dict[str, FieldCodec] = {}
        self.fill: Filler = self._fill_message
        self.to_json: Callable[[Any], Any] = self._write_message
        self.text_to_json: Callable[[str], Any] = str  # query value -> JSON value (well-known scalars)
        self._codecs = codecs

    def _build(self) -> None:
        """Second phase, so that recursive message types find their codec."""
        name = self.full_name
        special = _SPECIAL.get(name)
        if special is not None:
            special(self)
            return
        if name in _WRAPPERS:
            self._build_wrapper()
            return
        for field in self.descriptor.fields:
            codec = FieldCodec(field, self._codecs)
            self.fields.append(codec)
            self.by_key[field.name] = codec
            self.by_key.setdefault(field.json_name, codec)
        self._oneofs = any(f.oneof for f in self.fields)
        self._build_writer()

    # -- JSON -> message ---------------------------------------------------------

    def _fill_message(self, msg: Any, obj: Any, depth: int, level: int) -> None:
        if type(obj) is not dict:
            raise TranscodeError(f"expected an object, got {_got(obj)}")
        depth += 1
        if depth > MAX_DEPTH:
            raise _depth_error()
        if level > MAX_PROTO_DEPTH:
            raise _proto_depth_error()
        by_key = self.by_key
        seen_oneofs: dict[str, str] | None = {} if self._oneofs else None
        for key, value in obj.items():
            field = by_key.get(key)
            if field is None:
                continue  # unknown fields are ignored
            if type(value) is field.plain_type:
                setattr(msg, field.name, value)
                continue
            if value is None and not field.accepts_null:
                continue  # null means "not set"
            if seen_oneofs is not None and field.oneof is not None:
                other = seen_oneofs.setdefault(field.oneof, field.name)
                if other != field.name:
                    raise TranscodeError(f"only one of {other} and {field.name} may be set", field.name)
            try:
                field.set(msg, value, depth, level)
            except TranscodeError as exc:
                exc.push(field.name)
                raise

    def field_to_json(self, msg: Any, name: str) -> Any:
        """One field of ``msg`` as JSON (for an HttpRule's ``response_body``)."""
        field = self.by_key[name]
        convert = _output_converter(field)
        value = getattr(msg, field.name)
        return convert(msg, value) if convert is not None else value

    def parse(self, obj: Any) -> Message:
        """A new message from a decoded JSON value (the top level is depth 1)."""
        msg = self.cls()
        self.fill(msg, obj, 0, 0)
        return msg

    # -- message -> JSON ----------------------------------------------------------

    def _build_writer(self) -> None:
        names = tuple(f.name for f in self.fields)
        self._names = names
        if not names:
            self._getter: Callable[[Any], tuple] = lambda msg: ()
        elif len(names) == 1:
            single = attrgetter(names[0])
            self._getter = lambda msg: (single(msg),)
        else:
            self._getter = attrgetter(*names)
        self._converters = [
            (index, converter)
            for index, converter in ((i, _output_converter(f)) for i, f in enumerate(self.fields))
            if converter is not None
        ]

    def _write_message(self, msg: Any) -> dict[str, Any]:
        raw = self._getter(msg)
        if not self._converters:
            return dict(zip(self._names, raw, strict=True))
        values = list(raw)
        for index, convert in self._converters:
            values[index] = convert(msg, values[index])
        return dict(zip(self._names, values, strict=True))

    # -- well-known types -----------------------------------------------------------

    def _build_wrapper(self) -> None:
        value_field = self.descriptor.fields_by_name["value"]
        convert = _scalar_converter(value_field)
        text_convert = _text_converter(value_field)
        out = _scalar_output(value_field)

        def fill(msg: Any, value: Any, depth: int, level: int) -> None:
            msg.value = convert(value)

        self.fill = fill
        if value_field.type not in (FD.TYPE_STRING, FD.TYPE_BYTES):  # those fill from the text itself
            self.text_to_json = text_convert
        self.to_json = (lambda msg: out(msg.value)) if out is not None else (lambda msg: msg.value)


def _build_timestamp(codec: MessageCodec) -> None:
    def fill(msg: Any, value: Any, depth: int, level: int) -> None:
        msg.seconds, msg.nanos = parse_timestamp(value)

    codec.fill = fill
    codec.to_json = lambda msg: format_timestamp(msg.seconds, msg.nanos)


def _build_duration(codec: MessageCodec) -> None:
    def fill(msg: Any, value: Any, depth: int, level: int) -> None:
        msg.seconds, msg.nanos = _parse_duration(value)

    codec.fill = fill
    codec.to_json = lambda msg: _format_duration(msg.seconds, msg.nanos)


def _build_field_mask(codec: MessageCodec) -> None:
    def fill(msg: Any, value: Any, depth: int, level: int) -> None:
        text = _json_string(value)
        msg.paths.extend(_camel_to_snake(p) for p in text.split(",") if p)

    codec.fill = fill
    codec.to_json = lambda msg: ",".join(_snake_to_camel(p) for p in msg.paths)


def _build_struct(codec: MessageCodec) -> None:
    def fill(msg: Any, value: Any, depth: int, level: int) -> None:
        if type(value) is not dict:
            raise TranscodeError("must be a JSON object")
        _fill_struct(msg, value, depth + 1, level)

    codec.fill = fill
    codec.to_json = struct_to_python


def _build_list_value(codec: MessageCodec) -> None:
    def fill(msg: Any, value: Any, depth: int, level: int) -> None:
        if type(value) is not list:
            raise TranscodeError(f"must be a JSON array, got {_got(value)}")
        _fill_list(msg, value, depth + 1, level)

    codec.fill = fill
    codec.to_json = _list_out


def _build_value(codec: MessageCodec) -> None:
    codec.fill = _fill_value
    codec.to_json = _value_out


def _build_empty(codec: MessageCodec) -> None:
    def fill(msg: Any, value: Any, depth: int, level: int) -> None:
        if type(value) is not dict:
            raise TranscodeError(f"expected an object, got {_got(value)}")

    codec.fill = fill
    codec.to_json = lambda msg: {}


def _build_any(codec: MessageCodec) -> None:
    codecs = codec._codecs

    def fill(msg: Any, value: Any, depth: int, level: int) -> None:
        if type(value) is not dict:
            raise TranscodeError(f"expected an object, got {_got(value)}")
        type_url = value.get("@type")
        if type(type_url) is not str or "/" not in type_url:
            raise TranscodeError('an Any needs a "@type" such as "type.googleapis.com/google.rpc.BadRequest"')
        inner_codec = codecs.by_name(type_url.rpartition("/")[2])
        if inner_codec is None:
            raise TranscodeError(f"unknown message type {_got(type_url)}")
        inner = inner_codec.cls()
        if inner_codec.full_name in _SPECIAL or inner_codec.full_name in _WRAPPERS:
            inner_codec.fill(inner, value.get("value"), depth, 0)
        else:
            inner_codec.fill(inner, {k: v for k, v in value.items() if k != "@type"}, depth, 0)
        msg.Pack(inner, type_url.rpartition("/")[0] + "/" if "/" in type_url else _TYPE_URL_PREFIX)

    codec.fill = fill
    codec.to_json = lambda msg: any_to_python(msg, codecs)


def any_to_python(any_msg: Any, codecs: CodecRegistry) -> dict[str, Any]:
    """An Any as protojson writes it: ``{"@type": url, ...fields}``, or
    ``{"@type": url, "value": <JSON>}`` for well-known types; a type this
    process does not know comes out as base64 under ``"value"``."""
    type_url = any_msg.type_url
    inner_codec = codecs.by_name(type_url.rpartition("/")[2])
    if inner_codec is None:
        return {"@type": type_url, "value": base64.b64encode(any_msg.value).decode()}
    inner = inner_codec.cls.FromString(any_msg.value)
    rendered = inner_codec.to_json(inner)
    if inner_codec.full_name in _SPECIAL or inner_codec.full_name in _WRAPPERS:
        return {"@type": type_url, "value": rendered}
    return {"@type": type_url, **rendered}


_SPECIAL: dict[str, Callable[[MessageCodec], None]] = {
    "google.protobuf.Timestamp": _build_timestamp,
    "google.protobuf.Duration": _build_duration,
    "google.protobuf.FieldMask": _build_field_mask,
    "google.protobuf.Struct": _build_struct,
    "google.protobuf.ListValue": _build_list_value,
    "google.protobuf.Value": _build_value,
    "google.protobuf.Empty": _build_empty,
    "google.protobuf.Any": _build_any,
}


# --------------------------------------------------------------------------
# Output converters: convert(parent_message, attribute_value) -> JSON value


def _scalar_output(field: FieldDescriptor) -> Callable[[Any], Any] | None:
    t = field.type
    if t in _INT64_TYPES:
        return str
    if t == FD.TYPE_BYTES:
        return lambda value: base64.b64encode(value).decode()
    if t == FD.TYPE_ENUM:
        names = {v.number: v.name for v in field.enum_type.values}
        return lambda value: names.get(value, value)
    if t == FD.TYPE_DOUBLE:
        return lambda value: value if math.isfinite(value) else _number_out(value)
    if t == FD.TYPE_FLOAT:
        return _float32_out
    return None


def _float32_out(value: float) -> Any:
    if not math.isfinite(value):
        return _number_out(value)
    for digits in range(6, 10):  # shortest text that reads back as the same float32
        text = f"{value:.{digits}g}"
        if struct.unpack("<f", struct.pack("<f", float(text)))[0] == value:
            return float(text)
    return value


def _output_converter(field: FieldCodec) -> Callable[[Any, Any], Any] | None:
    descriptor = field.descriptor
    name = field.name
    if field.is_map:
        entry = descriptor.message_type
        value_field = entry.fields_by_name["value"]
        key_out: Callable[[Any], str] = str
        if entry.fields_by_name["key"].type == FD.TYPE_BOOL:
            key_out = lambda key: "true" if key else "false"  # noqa: E731
        if field.map_value_codec is not None:
            value_out = field.map_value_codec.to_json
        else:
            value_out = _scalar_output(value_field) or (lambda v: v)
        return lambda msg, value: {key_out(k): value_out(v) for k, v in value.items()}

    codec = field.message_codec
    if field.repeated:
        if codec is not None:
            to_json = codec.to_json
            return lambda msg, value: [to_json(item) for item in value]
        item_out = _scalar_output(descriptor)
        if item_out is None:
            return lambda msg, value: list(value)
        return lambda msg, value: [item_out(item) for item in value]

    if codec is not None:
        to_json = codec.to_json
        full_name = codec.full_name
        if full_name == "google.protobuf.Struct":
            return lambda msg, value: struct_to_python(value)  # unset: {} (see the module docstring)
        if full_name == "google.protobuf.ListValue":
            return lambda msg, value: _list_out(value)

        def message_out(msg: Any, value: Any) -> Any:
            return to_json(value) if msg.HasField(name) else None

        return message_out

    out = _scalar_output(descriptor)
    if descriptor.has_presence:  # proto3 `optional` or a oneof member: null when unset

        def optional_out(msg: Any, value: Any) -> Any:
            if not msg.HasField(name):
                return None
            return out(value) if out is not None else value

        return optional_out
    if out is None:
        return None
    return lambda msg, value: out(value)


class CodecRegistry:
    """One :class:`MessageCodec` per message type, built on first use and kept."""

    def __init__(self, pool: descriptor_pool.DescriptorPool | None = None) -> None:
        self._pool = pool or descriptor_pool.Default()
        self._codecs: dict[str, MessageCodec] = {}

    def get(self, descriptor: Descriptor) -> MessageCodec:
        codec = self._codecs.get(descriptor.full_name)
        if codec is None:
            codec = MessageCodec(descriptor, self)
            self._codecs[descriptor.full_name] = codec
            try:
                codec._build()
            except BaseException:
                del self._codecs[descriptor.full_name]
                raise
        return codec

    def for_class(self, cls: type[Message]) -> MessageCodec:
        return self.get(cls.DESCRIPTOR)

    def by_name(self, full_name: str) -> MessageCodec | None:
        try:
            descriptor = self._pool.FindMessageTypeByName(full_name)
        except KeyError:
            return None
        return self.get(descriptor)

    @staticmethod
    def message_class(descriptor: Descriptor) -> type[Message]:
        return message_factory.GetMessageClass(descriptor)


DEFAULT_CODECS = CodecRegistry()


# --------------------------------------------------------------------------
# Query strings and path parameters


def resolve_field_path(codec: MessageCodec, path: str) -> list[FieldCodec] | None:
    """The field codecs along a dotted path (proto or JSON names), or None when
    some name is unknown. Only the last element may be repeated or a scalar."""
    chain: list[FieldCodec] = []
    current: MessageCodec | None = codec
    parts = path.split(".")
    for index, part in enumerate(parts):
        if current is None:
            raise TranscodeError(f"{chain[-1].name} is not a message", path)
        field = current.by_key.get(part)
        if field is None:
            return None
        chain.append(field)
        last = index == len(parts) - 1
        if not last:
            if field.repeated or field.is_map or field.message_codec is None:
                raise TranscodeError(f"{field.name} is not a message", path)
            if field.message_codec.full_name in WELL_KNOWN_SCALARS or field.message_codec.full_name in _SPECIAL:
                raise TranscodeError(f"{field.name} is not a message with fields", path)
            current = field.message_codec
    return chain


def set_field_from_strings(msg: Any, chain: list[FieldCodec], values: list[str]) -> None:
    """Set the field at the end of ``chain`` from query (or path) text values."""
    target = msg
    for field in chain[:-1]:
        target = getattr(target, field.name)
        target.SetInParent()
    try:
        chain[-1].text_setter()(target, values)
    except TranscodeError as exc:
        for field in reversed(chain):
            exc.push(field.name)
        raise


def set_field_from_string(codec: MessageCodec, msg: Any, path: str, value: str) -> None:
    """Set a path parameter (``{person_id}``, ``{a.b}``) on ``msg``."""
    chain = resolve_field_path(codec, path)
    if chain is None:
        raise TranscodeError("no such field", path)
    set_field_from_strings(msg, chain, [value])


def set_body_field(codec: MessageCodec, msg: Any, path: str, value: Any) -> None:
    """Put a decoded JSON body into the field an HttpRule's ``body`` names."""
    chain = resolve_field_path(codec, path)
    if chain is None:
        raise TranscodeError("no such field", path)
    target = msg
    for field in chain[:-1]:
        target = getattr(target, field.name)
        target.SetInParent()
    last = chain[-1]
    if value is None and not last.accepts_null:
        return
    try:
        last.set(target, value, 0, len(chain) - 1)
    except TranscodeError as exc:
        for field in reversed(chain):
            exc.push(field.name)
        raise


def populate_query(
    codec: MessageCodec,
    msg: Any,
    pairs: Iterable[tuple[str, str]],
    skip: frozenset[str] = frozenset(),
) -> None:
    """Fill ``msg`` from decoded query pairs, as grpc-gateway's DefaultQueryParser.

    ``skip`` holds the top-level names (proto and JSON) taken by path
    parameters or the body: the query cannot override them.
    """
    grouped: dict[str, list[str]] = {}
    for key, value in pairs:
        grouped.setdefault(key, []).append(value)
    for key, values in grouped.items():
        if values == [""]:
            continue  # `?limit=` is "not set", as in grpc-gateway
        head = key.partition(".")[0]
        if head in skip:
            continue
        chain = resolve_field_path(codec, key)
        if chain is None:
            continue  # unknown parameters are ignored
        set_field_from_strings(msg, chain, values)
