"""protobuf well-known values as plain Python, shared by the service and the gateway.

It imports nothing from ``service`` or ``gateway``, so both may use it while the
gateway stays a pure gRPC client.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import struct_pb2

# Integral numbers within +-2**53 are integers: a Struct carries every number as
# a double, so 2 arrives as 2.0 and goes back out as 2 (JSON clients cannot tell
# larger integers apart from their neighbours anyway).
MAX_SAFE_INTEGER = 2**53

_VALUE_FIELDS = struct_pb2.Value.DESCRIPTOR.fields_by_name
_STRING_VALUE = _VALUE_FIELDS["string_value"]
_NUMBER_VALUE = _VALUE_FIELDS["number_value"]
_BOOL_VALUE = _VALUE_FIELDS["bool_value"]
_STRUCT_VALUE = _VALUE_FIELDS["struct_value"]
_LIST_VALUE = _VALUE_FIELDS["list_value"]


def struct_to_python(struct: struct_pb2.Struct, *, sort_keys: bool = False) -> dict[str, Any]:
    """A Struct as the JSON object it stands for: dicts, lists, strings, bools,
    None, and numbers (integral ones within +-2**53 as ints, others as floats,
    non-finite ones left for the caller to refuse).

    protobuf's own decoder stops at 100 levels, which bounds the recursion.
    ``sort_keys`` orders every object's keys, as protojson writes them.
    """
    fields = struct.fields
    keys = sorted(fields) if sort_keys else fields
    return {key: _value(fields[key], sort_keys) for key in keys}


def _value(value: struct_pb2.Value, sort_keys: bool) -> Any:
    # ListFields() is one C call that yields the set member of the `kind` oneof;
    # it is cheaper than WhichOneof() followed by getattr().
    members = value.ListFields()
    if not members:
        return None
    field, item = members[0]
    if field is _STRING_VALUE or field is _BOOL_VALUE:
        return item
    if field is _NUMBER_VALUE:
        if item.is_integer() and -MAX_SAFE_INTEGER <= item <= MAX_SAFE_INTEGER:
            return int(item)
        return item
    if field is _STRUCT_VALUE:
        return struct_to_python(item, sort_keys=sort_keys)
    if field is _LIST_VALUE:
        return [_value(inner, sort_keys) for inner in item.values]
    return None  # null_value
