"""JSON <-> protobuf for the types the API's protos use, driven by descriptors.

The gateway stays generic over the descriptors: every message is walked by
its fields, nothing is written per message. What it walks is deliberately
small, the types ``proto/`` uses:

- ``string``, ``bool`` and ``int32`` fields, singular (also ``optional``) or
  repeated;
- message fields, singular or repeated, of messages built from these;
- ``google.protobuf.Struct`` and ``google.protobuf.Timestamp`` fields;
- in responses only, ``google.protobuf.Duration`` (``google.rpc.RetryInfo``
  in error details).

Anything else (maps, enums, bytes, 64-bit integers, floating point, oneofs,
other well-known types) raises :class:`UnsupportedTypeError` when the message's
codec is built, which the app does for every bound method when it is created:
a proto that would transcode wrongly stops the gateway at startup.

The well-known types use protobuf's own JSON: ``Timestamp.FromJsonString`` /
``ToJsonString`` and ``Struct.update``. Struct output is the one hand-written
piece (see ``docs/decisions/gateway-transcoding.md``): protobuf's Python ``json_format``
writes every number of a Struct as a float (``2.0``), where protojson, and so
grpc-gateway, writes ``2``.

Request side (JSON -> protobuf), as protojson with ``DiscardUnknown``:

- a field is found by its proto name or its lowerCamelCase ``json_name``;
  unknown fields are ignored, ``null`` leaves a field unset;
- values are type-checked (an ``int32`` also takes an integral number or a
  decimal string, as protojson does);
- JSON nesting deeper than :data:`MAX_DEPTH` levels, or a Struct nested deeper
  than protobuf decoders accept (:data:`MAX_PROTO_DEPTH`), is refused;
- the first error stops the walk and raises :class:`TranscodeError`, whose
  ``field`` is the path of the offending field in proto names, e.g.
  ``events[3].event``.

Response side (protobuf -> JSON-ready Python values, then ``orjson``), as
protojson with ``UseProtoNames`` and ``EmitUnpopulated``:

- proto field names; every field present, defaults too (``""``, ``0``,
  ``false``, ``[]``); an unset message field or ``optional`` scalar is
  ``null``, except ``Struct``, which is ``{}``: a gRPC service cannot tell an
  empty Struct from an unset one (``Struct.update({})`` sets nothing), and "a
  JSON object" is what the API promises;
- a Struct number that is integral and within +-2**53 is an integer.

Query strings and path parameters (:func:`populate_query`,
:func:`set_field_from_string`) follow grpc-gateway v2's ``DefaultQueryParser``:
dotted names reach into nested messages, repeated fields take repeated keys,
more than one value for a singular field is an error, so is an empty value
where a number or a timestamp belongs (``?limit=``), unknown names are ignored,
``bool`` is Go's ``strconv.ParseBool``.
"""

from __future__ import annotations

import base64
import math
import re
from collections.abc import Callable, Iterable
from operator import attrgetter
from typing import Any, cast

from google.protobuf import descriptor_pool, json_format, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from protoconv import struct_to_python

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
STRUCT = "google.protobuf.Struct"
TIMESTAMP = "google.protobuf.Timestamp"
DURATION = "google.protobuf.Duration"
_INT32 = (-(2**31), 2**31 - 1)
_INT_TEXT = re.compile(r"[+-]?\d+")
_FLOAT_TEXT = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_TRUE = frozenset(("1", "t", "T", "TRUE", "true", "True"))
_FALSE = frozenset(("0", "f", "F", "FALSE", "false", "False"))
_SCALARS = {FD.TYPE_STRING: "string", FD.TYPE_BOOL: "bool", FD.TYPE_INT32: "int32"}
_JSON_KIND = {
    str: "string",
    int: "number",
    float: "number",
    bool: "boolean",
    dict: "object",
    list: "array",
    type(None): "null",
}


class UnsupportedTypeError(TypeError):
    """A proto uses a type the gateway does not transcode (raised at startup)."""


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
            else:
                out.append(f".{part}" if out else part)
        return "".join(out)

    def __str__(self) -> str:
        field = self.field
        return f"{field}: {self.description}" if field else self.description


def describe(value: Any) -> str:
    """A JSON value as error messages name it: a quoted string, else its kind."""
    kind = type(value)
    if kind is str:
        text = value if len(value) <= 64 else value[:61] + "..."
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if kind is float and math.isfinite(value) and not value.is_integer():
        return repr(value)
    return _JSON_KIND.get(kind, kind.__name__)


def _depth_error() -> TranscodeError:
    return TranscodeError(f"JSON nesting is deeper than {MAX_DEPTH} levels")


def _proto_depth_error() -> TranscodeError:
    return TranscodeError(
        f"nesting is too deep to send over gRPC (protobuf decoders stop at {MAX_PROTO_DEPTH} nested "
        "messages, and each JSON object level inside a Struct takes 3 of them)"
    )


# --------------------------------------------------------------------------
# Scalars: JSON values and query-string text


def _json_string(value: Any) -> str:
    if type(value) is str:
        return value
    raise TranscodeError(f"expected a string, got {describe(value)}")


def _json_bool(value: Any) -> bool:
    if type(value) is bool:
        return value
    raise TranscodeError(f"expected a boolean, got {describe(value)}")


def _int32(number: int) -> int:
    if _INT32[0] <= number <= _INT32[1]:
        return number
    raise TranscodeError(f"{number} is out of range for int32")


def _json_int32(value: Any) -> int:
    kind = type(value)
    if kind is int:
        return _int32(value)
    if kind is float and value.is_integer():
        return _int32(int(value))
    if kind is str and _INT_TEXT.fullmatch(value):
        return _int32(int(value))
    if kind is str and _FLOAT_TEXT.fullmatch(value) and float(value).is_integer():
        return _int32(int(float(value)))
    raise TranscodeError(f"expected an integer, got {describe(value)}")


def _text_bool(text: str) -> bool:
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise TranscodeError(f"expected a boolean, got {describe(text)}")


def _text_int32(text: str) -> int:
    if _INT_TEXT.fullmatch(text):
        return _int32(int(text))
    raise TranscodeError(f"expected an integer, got {describe(text)}")


_FROM_JSON: dict[int, Callable[[Any], Any]] = {
    FD.TYPE_STRING: _json_string,
    FD.TYPE_BOOL: _json_bool,
    FD.TYPE_INT32: _json_int32,
}
_FROM_TEXT: dict[int, Callable[[str], Any]] = {
    FD.TYPE_STRING: str,
    FD.TYPE_BOOL: _text_bool,
    FD.TYPE_INT32: _text_int32,
}


# --------------------------------------------------------------------------
# Well-known types: protobuf's own JSON, plus the checks a request needs


def _fill_timestamp(msg: Any, value: Any) -> None:
    if type(value) is not str:
        raise TranscodeError(f"expected an RFC 3339 timestamp string, got {describe(value)}")
    try:
        msg.FromJsonString(value)
    except ValueError as exc:
        raise TranscodeError(
            f"expected an RFC 3339 timestamp such as 2024-01-15T10:30:00Z, got {describe(value)} ({exc})"
        ) from None


def _check_struct(obj: dict, depth: int, level: int) -> None:
    """Refuse a Struct's JSON (at JSON ``depth``, message ``level``) that nests
    deeper than the request may or protobuf decoders can."""
    if depth > MAX_DEPTH:
        raise _depth_error()
    if level > MAX_PROTO_DEPTH or (obj and level + 2 > MAX_PROTO_DEPTH):  # entries: +1, their values: +2
        raise _proto_depth_error()
    for value in obj.values():
        kind = type(value)
        if kind is dict:
            _check_struct(value, depth + 1, level + 3)
        elif kind is list:
            _check_list(value, depth + 1, level + 3)


def _check_list(items: list, depth: int, level: int) -> None:
    if depth > MAX_DEPTH:
        raise _depth_error()
    if level > MAX_PROTO_DEPTH or (items and level + 1 > MAX_PROTO_DEPTH):  # values: +1
        raise _proto_depth_error()
    for value in items:
        kind = type(value)
        if kind is dict:
            _check_struct(value, depth + 1, level + 2)
        elif kind is list:
            _check_list(value, depth + 1, level + 2)


def _fill_struct(msg: Any, value: Any, depth: int, level: int) -> None:
    if type(value) is not dict:
        raise TranscodeError(f"must be a JSON object, got {describe(value)}")
    _check_struct(value, depth + 1, level)
    msg.update(value)


def struct_to_json(struct_msg: Any) -> dict[str, Any]:
    """A Struct as protojson writes it: keys sorted, integral numbers within
    +-2**53 as integers."""
    return struct_to_python(struct_msg, sort_keys=True)


_WELL_KNOWN_OUT: dict[str, Callable[[Any], Any]] = {
    STRUCT: struct_to_json,
    TIMESTAMP: lambda msg: msg.ToJsonString(),
    DURATION: lambda msg: msg.ToJsonString(),
}
_REQUEST_WELL_KNOWN = frozenset({STRUCT, TIMESTAMP})


# --------------------------------------------------------------------------
# Message codecs

Setter = Callable[[Any, Any, int, int], None]
"""set(message, json_value, json_depth_of_the_message, message_level)."""


class FieldCodec:
    """Everything about one field that transcoding needs, computed once."""

    __slots__ = ("descriptor", "name", "json_name", "repeated", "message_codec", "set", "plain_type", "_set_text")

    def __init__(self, descriptor: FieldDescriptor, codecs: CodecRegistry) -> None:
        self.descriptor = descriptor
        self.name = descriptor.name
        self.json_name = descriptor.json_name
        self.repeated = descriptor.is_repeated
        message_type = descriptor.message_type
        _check_supported(descriptor)
        self.message_codec = codecs.get(message_type) if message_type is not None else None
        self.set: Setter = self._make_setter()
        # Singular string and bool fields take the JSON value as it is: the
        # message walk sets them inline (a fast path; `set` handles the rest).
        self.plain_type = None if self.repeated else {FD.TYPE_STRING: str, FD.TYPE_BOOL: bool}.get(descriptor.type)
        self._set_text: Callable[[Any, list[str]], None] | None = None  # built on first use

    def _make_setter(self) -> Setter:
        name = self.name
        codec = self.message_codec
        if codec is None:
            convert = _FROM_JSON[self.descriptor.type]
            if not self.repeated:

                def set_scalar(msg: Any, value: Any, depth: int, level: int) -> None:
                    setattr(msg, name, convert(value))

                return set_scalar

            def set_scalars(msg: Any, value: Any, depth: int, level: int) -> None:
                if type(value) is not list:
                    raise TranscodeError(f"expected an array, got {describe(value)}")
                getattr(msg, name).extend(_at_each_index(convert, value))

            return set_scalars

        fill = codec.fill
        if not self.repeated:

            def set_message(msg: Any, value: Any, depth: int, level: int) -> None:
                inner = getattr(msg, name)
                inner.SetInParent()
                fill(inner, value, depth, level + 1)

            return set_message

        def set_messages(msg: Any, value: Any, depth: int, level: int) -> None:
            if type(value) is not list:
                raise TranscodeError(f"expected an array, got {describe(value)}")
            depth += 1
            if depth > MAX_DEPTH:
                raise _depth_error()
            add = getattr(msg, name).add
            _at_each_index(lambda item: fill(add(), item, depth, level + 1), value)

        return set_messages

    def set_text(self, msg: Any, values: list[str]) -> None:
        """Set this field of ``msg`` from query (or path) text values."""
        if self._set_text is None:
            self._set_text = self._make_text_setter()
        self._set_text(msg, values)

    def _make_text_setter(self) -> Callable[[Any, list[str]], None]:
        name = self.name
        codec = self.message_codec
        if codec is None:
            convert = _FROM_TEXT[self.descriptor.type]
            if self.repeated:
                return lambda msg, values: getattr(msg, name).extend(_at_each_index(convert, values))

            def set_one(msg: Any, values: list[str]) -> None:
                setattr(msg, name, convert(_single(values)))

            return set_one
        if codec.full_name == TIMESTAMP and not self.repeated:
            return lambda msg, values: _fill_timestamp(getattr(msg, name), _single(values))

        def unsupported(msg: Any, values: list[str]) -> None:
            raise TranscodeError(f"a {codec.full_name} cannot be set from a query parameter")

        return unsupported


def _check_supported(field: FieldDescriptor) -> None:
    """Raise :class:`UnsupportedTypeError`, naming the field, for a type the gateway does not transcode."""
    message_type = field.message_type
    problem = ""
    if message_type is None and field.type not in _SCALARS:
        problem = f"field type {_type_name(field)}"
    elif message_type is not None and message_type.GetOptions().map_entry:
        problem = "a map"
    elif message_type is not None and message_type.full_name.startswith("google.protobuf."):
        if message_type.full_name not in _WELL_KNOWN_OUT:
            problem = message_type.full_name
    oneof = field.containing_oneof
    if oneof is not None and not (len(oneof.fields) == 1 and oneof.name == "_" + field.name):  # not `optional`
        problem = "a oneof member"
    if problem:
        raise UnsupportedTypeError(
            f"{field.full_name}: {problem} is not supported by the gateway (supported: string, bool, int32, "
            "optional and repeated fields, messages, google.protobuf.Struct and Timestamp)"
        )


def _single(values: list[str]) -> str:
    if len(values) > 1:
        raise TranscodeError(f"takes one value, got {len(values)}")
    return values[0]


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


def _type_name(field: FieldDescriptor) -> str:
    names = {value: name for name, value in vars(FD).items() if name.startswith("TYPE_")}
    return names.get(field.type, str(field.type)).removeprefix("TYPE_").lower()


class MessageCodec:
    """JSON <-> one message type. Build through :class:`CodecRegistry`."""

    def __init__(self, descriptor: Descriptor, codecs: CodecRegistry) -> None:
        self.descriptor = descriptor
        self.full_name = descriptor.full_name
        self.cls: type[Message] = message_factory.GetMessageClass(descriptor)
        self.fields: list[FieldCodec] = []
        self.by_key: dict[str, FieldCodec] = {}
        self.fill: Setter = self._fill_message
        self.to_json: Callable[[Any], Any] = self._write_message
        self._codecs = codecs

    def _build(self) -> None:
        """Second phase, so that recursive message types find their codec."""
        name = self.full_name
        if name in _WELL_KNOWN_OUT:
            self.to_json = _WELL_KNOWN_OUT[name]
            if name == STRUCT:
                self.fill = _fill_struct
            elif name == TIMESTAMP:
                self.fill = lambda msg, value, depth, level: _fill_timestamp(msg, value)
            else:
                self.fill = self._response_only
            return
        if name.startswith("google.protobuf."):
            raise UnsupportedTypeError(f"{name} is not supported by the gateway")
        for field in self.descriptor.fields:
            codec = FieldCodec(field, self._codecs)
            self.fields.append(codec)
            self.by_key[field.name] = codec
            self.by_key.setdefault(field.json_name, codec)
        self._build_writer()

    def check_request(self) -> None:
        """Raise :class:`UnsupportedTypeError` when this message, or one it
        holds, has a type the gateway writes in responses but cannot read."""
        seen: set[str] = set()

        def visit(codec: MessageCodec, path: str) -> None:
            if codec.full_name in _WELL_KNOWN_OUT:
                if codec.full_name not in _REQUEST_WELL_KNOWN:
                    raise UnsupportedTypeError(f"{path}: {codec.full_name} is supported in responses only")
                return
            if codec.full_name in seen:
                return
            seen.add(codec.full_name)
            for field in codec.fields:
                if field.message_codec is not None:
                    visit(field.message_codec, field.descriptor.full_name)

        visit(self, self.full_name)

    def _response_only(self, msg: Any, value: Any, depth: int, level: int) -> None:
        raise TranscodeError(f"a {self.full_name} is not accepted in requests")

    # -- JSON -> message ---------------------------------------------------------

    def _fill_message(self, msg: Any, obj: Any, depth: int, level: int) -> None:
        if type(obj) is not dict:
            raise TranscodeError(f"expected an object, got {describe(obj)}")
        depth += 1
        if depth > MAX_DEPTH:
            raise _depth_error()
        if level > MAX_PROTO_DEPTH:
            raise _proto_depth_error()
        by_key = self.by_key
        for key, value in obj.items():
            field = by_key.get(key)
            if field is None:
                continue  # unknown fields are ignored
            if type(value) is field.plain_type:
                setattr(msg, field.name, value)
                continue
            if value is None:
                continue  # null means "not set"
            try:
                field.set(msg, value, depth, level)
            except TranscodeError as exc:
                exc.push(field.name)
                raise

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

    def field_to_json(self, msg: Any, name: str) -> Any:
        """One field of ``msg`` as JSON (for an HttpRule's ``response_body``)."""
        field = self.by_key[name]
        convert = _output_converter(field)
        value = getattr(msg, field.name)
        return convert(msg, value) if convert is not None else value


def _output_converter(field: FieldCodec) -> Callable[[Any, Any], Any] | None:
    """convert(parent_message, attribute_value) -> JSON value; None: as it is."""
    name = field.name
    codec = field.message_codec
    if field.repeated:
        if codec is None:
            return lambda msg, value: list(value)
        to_json = codec.to_json
        return lambda msg, value: [to_json(item) for item in value]
    if codec is None:
        if field.descriptor.has_presence:  # proto3 `optional`: null when unset
            return lambda msg, value: value if msg.HasField(name) else None
        return None
    if codec.full_name == STRUCT:
        return lambda msg, value: struct_to_json(value)  # unset: {} (see the module docstring)
    to_json = codec.to_json
    return lambda msg, value: to_json(value) if msg.HasField(name) else None


class CodecRegistry:
    """One :class:`MessageCodec` per message type, built on first use and kept."""

    def __init__(self, pool: descriptor_pool.DescriptorPool | None = None) -> None:
        self._pool = pool or descriptor_pool.Default()
        self._codecs: dict[str, MessageCodec] = {}

    def get(self, descriptor: Descriptor) -> MessageCodec:
        """The codec of a message type; :class:`UnsupportedTypeError` when the
        type, or one it holds, is not supported."""
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

    def request(self, descriptor: Descriptor) -> MessageCodec:
        """The codec of a request type: :meth:`get` plus :meth:`MessageCodec.check_request`."""
        codec = self.get(descriptor)
        codec.check_request()
        return codec

    def for_class(self, cls: type[Message]) -> MessageCodec:
        return self.get(cast(Descriptor, cls.DESCRIPTOR))

    def any_to_json(self, any_msg: Any) -> dict[str, Any]:
        """An Any (an error detail) as protojson writes it: ``{"@type": url, ...fields}``.

        Detail types the codecs support (google.rpc.BadRequest, RetryInfo) are
        written as responses are; any other known type by ``json_format``; a
        type this process does not know as base64 under ``"value"``.
        """
        type_url = any_msg.type_url
        try:
            descriptor = self._pool.FindMessageTypeByName(type_url.rpartition("/")[2])
        except KeyError:
            return {"@type": type_url, "value": base64.b64encode(any_msg.value).decode()}
        try:
            codec = self.get(descriptor)
        except UnsupportedTypeError:
            return json_format.MessageToDict(any_msg, preserving_proto_field_name=True)
        inner = codec.cls.FromString(any_msg.value)
        rendered = codec.to_json(inner)
        if codec.full_name in _WELL_KNOWN_OUT:
            return {"@type": type_url, "value": rendered}
        return {"@type": type_url, **rendered}


DEFAULT_CODECS = CodecRegistry()


# --------------------------------------------------------------------------
# Query strings, path parameters and body fields


def resolve_field_path(codec: MessageCodec, path: str) -> list[FieldCodec] | None:
    """The field codecs along a dotted path (proto or JSON names), or None when
    some name is unknown. Only the last element may be repeated or a scalar."""
    chain: list[FieldCodec] = []
    current = codec
    parts = path.split(".")
    for index, part in enumerate(parts):
        field = current.by_key.get(part)
        if field is None:
            return None
        chain.append(field)
        if index < len(parts) - 1:
            inner = field.message_codec
            if field.repeated or inner is None or inner.full_name in _WELL_KNOWN_OUT:
                raise TranscodeError(f"{field.name} is not a message with fields", path)
            current = inner
    return chain


def _target(msg: Any, chain: list[FieldCodec]) -> Any:
    """The message that holds the last field of ``chain``, created on the way."""
    for field in chain[:-1]:
        msg = getattr(msg, field.name)
        msg.SetInParent()
    return msg


def _named(exc: TranscodeError, chain: list[FieldCodec]) -> TranscodeError:
    for field in reversed(chain):
        exc.push(field.name)
    return exc


def set_field_from_string(codec: MessageCodec, msg: Any, path: str, value: str) -> None:
    """Set a path parameter (``{person_id}``, ``{a.b}``) on ``msg``."""
    chain = resolve_field_path(codec, path)
    if chain is None:
        raise TranscodeError("no such field", path)
    try:
        chain[-1].set_text(_target(msg, chain), [value])
    except TranscodeError as exc:
        raise _named(exc, chain) from None


def set_body_field(codec: MessageCodec, msg: Any, path: str, value: Any) -> None:
    """Put a decoded JSON body into the field an HttpRule's ``body`` names."""
    chain = resolve_field_path(codec, path)
    if chain is None:
        raise TranscodeError("no such field", path)
    if value is None:
        return
    try:
        chain[-1].set(_target(msg, chain), value, 0, len(chain) - 1)
    except TranscodeError as exc:
        raise _named(exc, chain) from None


def populate_query(
    codec: MessageCodec,
    msg: Any,
    pairs: Iterable[tuple[str, str]],
    skip: frozenset[str] = frozenset(),
) -> None:
    """Fill ``msg`` from decoded query pairs, as grpc-gateway v2's DefaultQueryParser.

    ``skip`` holds the top-level names (proto and JSON) taken by path
    parameters or the body: the query cannot override them.
    """
    grouped: dict[str, list[str]] = {}
    for key, value in pairs:
        grouped.setdefault(key, []).append(value)
    for key, values in grouped.items():
        if key.partition(".")[0] in skip:
            continue
        chain = resolve_field_path(codec, key)
        if chain is None:
            continue  # unknown parameters are ignored
        try:
            chain[-1].set_text(_target(msg, chain), values)
        except TranscodeError as exc:
            raise _named(exc, chain) from None
