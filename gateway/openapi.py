"""An OpenAPI 3.0 document generated from the same descriptors as the routes.

Paths and methods come from the HTTP bindings, parameters from the path
variables and (for rules without ``body: "*"``) the remaining request fields,
schemas from the message descriptors, as grpc-gateway's protoc-gen-openapiv2
derives them. Error responses are ``google.rpc.Status``.

Descriptions are the comments of the ``.proto`` source. Generated ``_pb2``
modules do not carry source info, so the comments are read from the ``.proto``
file itself when it can be found (by default in ``proto/`` at the repository
root); without it the document simply has no descriptions.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor, FileDescriptor

from gateway.rules import Binding

FD = FieldDescriptor
PROTO_ROOTS = (Path(__file__).resolve().parent.parent / "proto",)
STATUS_SCHEMA = "google.rpc.Status"
ANY_SCHEMA = "google.protobuf.Any"

_INT32_TYPES = {FD.TYPE_INT32, FD.TYPE_SINT32, FD.TYPE_SFIXED32}
_UINT32_TYPES = {FD.TYPE_UINT32, FD.TYPE_FIXED32}
_INT64_TYPES = {FD.TYPE_INT64, FD.TYPE_SINT64, FD.TYPE_SFIXED64}
_UINT64_TYPES = {FD.TYPE_UINT64, FD.TYPE_FIXED64}
_WRAPPED = {
    "google.protobuf.DoubleValue": {"type": "number", "format": "double"},
    "google.protobuf.FloatValue": {"type": "number", "format": "float"},
    "google.protobuf.Int64Value": {"type": "string", "format": "int64"},
    "google.protobuf.UInt64Value": {"type": "string", "format": "uint64"},
    "google.protobuf.Int32Value": {"type": "integer", "format": "int32"},
    "google.protobuf.UInt32Value": {"type": "integer", "format": "int64"},
    "google.protobuf.BoolValue": {"type": "boolean"},
    "google.protobuf.StringValue": {"type": "string"},
    "google.protobuf.BytesValue": {"type": "string", "format": "byte"},
}
_WELL_KNOWN: dict[str, dict[str, Any]] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {"type": "string", "example": "1.5s"},
    "google.protobuf.FieldMask": {"type": "string"},
    "google.protobuf.Struct": {"type": "object", "additionalProperties": {}},
    "google.protobuf.Value": {},
    "google.protobuf.ListValue": {"type": "array", "items": {}},
    "google.protobuf.Empty": {"type": "object"},
    **_WRAPPED,
}


def build_openapi(
    files: Sequence[FileDescriptor],
    bindings: Sequence[Binding],
    *,
    title: str = "Flameup Events API",
    proto_roots: Iterable[Path] = PROTO_ROOTS,
) -> dict[str, Any]:
    comments: dict[str, str] = {}
    for file in files:
        comments.update(proto_comments(file, proto_roots))
    builder = _Builder(comments)
    paths: dict[str, dict[str, Any]] = {}
    for binding in bindings:
        path = _openapi_path(binding)
        paths.setdefault(path, {})[binding.http_method.lower()] = builder.operation(binding)
    services = sorted({b.method.containing_service for b in bindings}, key=lambda s: s.full_name)
    version = files[0].package.rpartition(".")[2] if files else "v1"
    return {
        "openapi": "3.0.3",
        "info": {
            "title": title,
            "version": version,
            "description": "\n\n".join(comments[s.full_name] for s in services if s.full_name in comments),
        },
        "tags": [{"name": s.name, "description": comments.get(s.full_name, "")} for s in services],
        "paths": paths,
        "components": {
            "schemas": builder.schemas,
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer", "description": "An API key: `Bearer <key>`."}
            },
        },
        "security": [{"bearerAuth": []}],
    }


def _openapi_path(binding: Binding) -> str:
    """The template with `{field=...}` reduced to `{field}`, as OpenAPI writes it."""
    return re.sub(r"\{([^}=]+)(=[^}]*)?\}", r"{\1}", binding.template)


class _Builder:
    def __init__(self, comments: dict[str, str]) -> None:
        self.comments = comments
        self.schemas: dict[str, Any] = {
            ANY_SCHEMA: {
                "type": "object",
                "description": "A message of the type its `@type` names, e.g. google.rpc.BadRequest.",
                "properties": {"@type": {"type": "string"}},
                "additionalProperties": {},
            },
            STATUS_SCHEMA: {
                "type": "object",
                "description": "Every error body: a google.rpc.Status, as grpc-gateway writes it.",
                "properties": {
                    "code": {"type": "integer", "format": "int32", "description": "The gRPC status code."},
                    "message": {"type": "string", "description": "What went wrong, for a developer."},
                    "details": {
                        "type": "array",
                        "items": {"$ref": f"#/components/schemas/{ANY_SCHEMA}"},
                        "description": "Machine-readable details, e.g. a google.rpc.BadRequest "
                        "with one field_violations entry per bad field.",
                    },
                },
                "required": ["code", "message", "details"],
            },
        }

    def operation(self, binding: Binding) -> dict[str, Any]:
        method = binding.method
        description = self.comments.get(method.full_name, "")
        op: dict[str, Any] = {
            "operationId": binding.operation_id,
            "tags": [method.containing_service.name],
            "summary": _first_sentence(description) or method.name,
            "description": description,
        }
        parameters = self._parameters(binding)
        if parameters:
            op["parameters"] = parameters
        if binding.body:
            op["requestBody"] = {"required": True, "content": {"application/json": {"schema": self._body(binding)}}}
        op["responses"] = self._responses(binding)
        return op

    def _parameters(self, binding: Binding) -> list[dict[str, Any]]:
        request = binding.method.input_type
        out: list[dict[str, Any]] = []
        for variable in binding.variables:
            field = _field_at(request, variable.field_path)
            out.append(
                {
                    "name": variable.field_path,
                    "in": "path",
                    "required": True,
                    "schema": self._scalar_schema(field),
                    "description": self.comments.get(field.full_name, ""),
                }
            )
        if binding.body == "*":
            return out
        taken = {v.field_path.split(".")[0] for v in binding.variables}
        if binding.body:
            taken.add(binding.body.split(".")[0])
        for field in request.fields:
            if field.name not in taken:
                out.extend(self._query_parameters(field, field.name, set()))
        return out

    def _query_parameters(self, field: FieldDescriptor, name: str, seen: set[str]) -> list[dict[str, Any]]:
        message = field.message_type
        if message is not None and message.GetOptions().map_entry:
            return []  # maps cannot travel in a query string
        if message is not None and message.full_name not in _WELL_KNOWN:
            if message.full_name in seen or field.is_repeated:
                return []
            nested: list[dict[str, Any]] = []
            for inner in message.fields:
                nested.extend(self._query_parameters(inner, f"{name}.{inner.name}", seen | {message.full_name}))
            return nested
        schema = self._scalar_schema(field)
        param: dict[str, Any] = {
            "name": name,
            "in": "query",
            "required": False,
            "description": self.comments.get(field.full_name, ""),
        }
        if field.is_repeated:
            param.update(schema={"type": "array", "items": schema}, style="form", explode=True)
        else:
            param["schema"] = schema
        return [param]

    def _body(self, binding: Binding) -> dict[str, Any]:
        request = binding.method.input_type
        if binding.body != "*":
            return self._field_schema(_field_at(request, binding.body), nullable=False)
        if not binding.variables:
            return self._ref(request)
        # The body is the request without the fields the path takes.
        taken = {v.field_path.split(".")[0] for v in binding.variables}
        schema = self._message_schema(request)
        schema["properties"] = {k: v for k, v in schema["properties"].items() if k not in taken}
        return schema

    def _responses(self, binding: Binding) -> dict[str, Any]:
        response = binding.method.output_type
        if binding.response_body:
            schema = self._field_schema(response.fields_by_name[binding.response_body], nullable=True)
        else:
            schema = self._ref(response)
        error = {"$ref": f"#/components/schemas/{STATUS_SCHEMA}"}

        def error_response(text: str) -> dict[str, Any]:
            return {"description": text, "content": {"application/json": {"schema": error}}}

        out: dict[str, Any] = {
            "200": {"description": "A successful response.", "content": {"application/json": {"schema": schema}}},
            "400": error_response("The request is invalid (INVALID_ARGUMENT); details name the fields."),
            "401": error_response("No API key, or an unknown or revoked one (UNAUTHENTICATED)."),
            "403": error_response("The API key lacks the scope (PERMISSION_DENIED)."),
        }
        if binding.body:
            out["413"] = error_response("The request body is too large (RESOURCE_EXHAUSTED).")
        out["503"] = error_response("The service or its storage is unavailable; retry (UNAVAILABLE).")
        out["default"] = error_response("An unexpected error response.")
        return out

    # -- schemas ---------------------------------------------------------------------

    def _ref(self, message: Descriptor) -> dict[str, Any]:
        if message.full_name in _WELL_KNOWN:
            return dict(_WELL_KNOWN[message.full_name])
        if message.full_name not in self.schemas:
            self.schemas[message.full_name] = {}  # placeholder: recursion ends here
            self.schemas[message.full_name] = self._message_schema(message)
        return {"$ref": f"#/components/schemas/{message.full_name}"}

    def _message_schema(self, message: Descriptor) -> dict[str, Any]:
        schema: dict[str, Any] = {
            "type": "object",
            "properties": {f.name: self._field_schema(f, nullable=True) for f in message.fields},
        }
        description = self.comments.get(message.full_name)
        if description:
            schema["description"] = description
        return schema

    def _field_schema(self, field: FieldDescriptor, *, nullable: bool) -> dict[str, Any]:
        message = field.message_type
        if message is not None and message.GetOptions().map_entry:
            value = message.fields_by_name["value"]
            values = self._field_schema(value, nullable=False)
            schema: dict[str, Any] = {"type": "object", "additionalProperties": values}
        elif field.is_repeated:
            item = self._ref(message) if message is not None else self._scalar_schema(field)
            schema = {"type": "array", "items": item}
        elif message is not None:
            ref = self._ref(message)
            if "$ref" in ref:
                schema = {"allOf": [ref], "nullable": True} if nullable else ref
            else:
                schema = ref
                if nullable and message.full_name not in (
                    "google.protobuf.Struct", "google.protobuf.ListValue", "google.protobuf.Value"
                ):
                    schema["nullable"] = True
        else:
            schema = self._scalar_schema(field)
            if nullable and field.has_presence:
                schema["nullable"] = True
        description = self.comments.get(field.full_name)
        if description:
            schema = {**schema, "description": description}
        return schema

    def _scalar_schema(self, field: FieldDescriptor) -> dict[str, Any]:
        t = field.type
        if field.message_type is not None:
            return dict(_WELL_KNOWN.get(field.message_type.full_name, {"type": "string"}))
        if t == FD.TYPE_STRING:
            return {"type": "string"}
        if t == FD.TYPE_BOOL:
            return {"type": "boolean"}
        if t in _INT32_TYPES:
            return {"type": "integer", "format": "int32"}
        if t in _UINT32_TYPES:
            return {"type": "integer", "format": "int64", "minimum": 0}
        if t in _INT64_TYPES:
            return {"type": "string", "format": "int64"}
        if t in _UINT64_TYPES:
            return {"type": "string", "format": "uint64"}
        if t == FD.TYPE_DOUBLE:
            return {"type": "number", "format": "double"}
        if t == FD.TYPE_FLOAT:
            return {"type": "number", "format": "float"}
        if t == FD.TYPE_BYTES:
            return {"type": "string", "format": "byte"}
        if t == FD.TYPE_ENUM:
            return {"type": "string", "enum": [v.name for v in field.enum_type.values]}
        return {}


def _field_at(message: Descriptor, path: str) -> FieldDescriptor:
    field = None
    for name in path.split("."):
        field = message.fields_by_name[name]
        message = field.message_type
    assert field is not None
    return field


def _first_sentence(text: str) -> str:
    first = text.split("\n\n")[0].replace("\n", " ")
    match = re.match(r"(.+?\.)(\s|$)", first)
    return (match.group(1) if match else first).strip()


# --------------------------------------------------------------------------
# Comments from the .proto source

_BLOCK = re.compile(r"^\s*(message|service|enum)\s+(\w+)\s*\{")
_NOT_FIELD = re.compile(r"(option|reserved|extensions)\b")
_RPC = re.compile(r"^\s*rpc\s+(\w+)\s*\(")
_FIELD = re.compile(r"^\s*(?:optional\s+|repeated\s+|required\s+)?(?:map\s*<[^>]*>|[\w.]+)\s+(\w+)\s*=\s*-?\d+")


def proto_comments(file: FileDescriptor, roots: Iterable[Path] = PROTO_ROOTS) -> dict[str, str]:
    """Leading (else trailing) comments of the messages, fields, enums,
    services and methods of ``file``, by full name, read from its ``.proto``
    source under one of ``roots``; empty when the source is not there."""
    for root in roots:
        path = Path(root) / file.name
        if path.is_file():
            try:
                return parse_proto_comments(path.read_text(encoding="utf-8"), file.package)
            except (OSError, UnicodeDecodeError):  # pragma: no cover
                return {}
    return {}


def parse_proto_comments(text: str, package: str) -> dict[str, str]:
    """A small line-oriented reader for conventionally formatted (buf format)
    proto files; good enough for descriptions, never needed for serving."""
    comments: dict[str, str] = {}
    scope: list[tuple[str, str | None]] = []  # (kind, name) per open brace
    pending: list[str] = []
    prefix = package + "." if package else ""

    def full(name: str) -> str:
        names = [n for kind, n in scope if n is not None]
        return prefix + ".".join([*names, name])

    for raw_line in text.splitlines():
        code, comment = _split_comment(raw_line)
        stripped = code.strip()
        if not stripped:
            if comment is not None:
                pending.append(comment[1:] if comment.startswith(" ") else comment)
                continue
            pending = []
            continue
        enclosing = scope[-1][0] if scope else None
        name: str | None = None
        opened: str | None = None
        if m := _BLOCK.match(code):
            name, opened = m.group(2), m.group(1)
        elif m := _RPC.match(code):
            if enclosing == "service":
                name = m.group(1)
        elif enclosing == "message" and (m := _FIELD.match(code)) and not _NOT_FIELD.match(stripped):
            name = m.group(1)
        if name is not None:
            key = full(name)
            if pending:
                comments[key] = "\n".join(pending).strip()
            elif comment and comment.strip():
                comments[key] = comment.strip()
        pending = []
        opens, closes = code.count("{"), code.count("}")
        if opened is not None:
            scope.append((opened, name))
            opens -= 1
        elif name is not None and _RPC.match(code) and opens:
            scope.append(("rpc", None))
            opens -= 1
        for _ in range(opens):
            scope.append(("block", None))
        for _ in range(closes):
            if scope:
                scope.pop()
    return comments


def _split_comment(line: str) -> tuple[str, str | None]:
    """(code with string literals blanked, text after `//` or None)."""
    code: list[str] = []
    quote: str | None = None
    index = 0
    while index < len(line):
        char = line[index]
        if quote is not None:
            if char == "\\":
                index += 2
                continue
            if char == quote:
                quote = None
                code.append(char)
        elif char in "\"'":
            quote = char
            code.append(char)
        elif line.startswith("//", index):
            return "".join(code), line[index + 2:]
        else:
            code.append(char)
        index += 1
    return "".join(code), None
