"""Write the OpenAPI 3 document of the REST gateway from the proto descriptors.

    python scripts/gen_openapi.py build/descriptors.binpb generated/openapi/events.openapi.json

The input is a FileDescriptorSet with source info and imports (protoc
``--include_imports --include_source_info``). Paths and methods come from the
``google.api.http`` rules (read by the gateway's own :mod:`gateway.rules`),
descriptions from the proto comments, request constraints from the
``buf.validate`` rules, as grpc-gateway's protoc-gen-openapiv2 derives them.
Responses list every field (the gateway always writes them all); errors are
``google.rpc.Status``.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

from buf.validate import validate_pb2
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from gateway.rules import Binding, bindings_for

FD = FieldDescriptor
STATUS = "google.rpc.Status"
ANY = "google.protobuf.Any"
_SCALARS: dict[int, dict[str, Any]] = {
    FD.TYPE_STRING: {"type": "string"},
    FD.TYPE_BOOL: {"type": "boolean"},
    FD.TYPE_INT32: {"type": "integer", "format": "int32"},
    FD.TYPE_SINT32: {"type": "integer", "format": "int32"},
    FD.TYPE_SFIXED32: {"type": "integer", "format": "int32"},
    FD.TYPE_UINT32: {"type": "integer", "format": "int64", "minimum": 0},
    FD.TYPE_FIXED32: {"type": "integer", "format": "int64", "minimum": 0},
    FD.TYPE_INT64: {"type": "string", "format": "int64"},
    FD.TYPE_SINT64: {"type": "string", "format": "int64"},
    FD.TYPE_SFIXED64: {"type": "string", "format": "int64"},
    FD.TYPE_UINT64: {"type": "string", "format": "uint64"},
    FD.TYPE_FIXED64: {"type": "string", "format": "uint64"},
    FD.TYPE_DOUBLE: {"type": "number", "format": "double"},
    FD.TYPE_FLOAT: {"type": "number", "format": "float"},
    FD.TYPE_BYTES: {"type": "string", "format": "byte"},
}
_WELL_KNOWN: dict[str, dict[str, Any]] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {"type": "string", "example": "1.5s"},
    "google.protobuf.Struct": {"type": "object", "additionalProperties": {}},
    "google.protobuf.Value": {},
    "google.protobuf.ListValue": {"type": "array", "items": {}},
    "google.protobuf.Empty": {"type": "object"},
}
_ERRORS = {
    "400": "The request is invalid (INVALID_ARGUMENT); details name the fields.",
    "401": "No API key, or an unknown or revoked one (UNAUTHENTICATED).",
    "403": "The API key lacks the scope (PERMISSION_DENIED).",
    "413": "The request body is too large (RESOURCE_EXHAUSTED).",
    "503": "The service or its storage is unavailable; retry (UNAVAILABLE).",
    "default": "Any other error, as a google.rpc.Status.",
}


def main(descriptor_set: Path, out: Path) -> None:
    files = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set.read_bytes()).file
    pool = descriptor_pool.DescriptorPool()
    for file in files:
        pool.Add(file)
    comments = {name: text for file in files for name, text in _comments(file)}
    ours = [pool.FindFileByName(f.name) for f in files if f.service]
    document = build(bindings_for(ours), comments)
    out.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def build(bindings: list[Binding], comments: dict[str, str]) -> dict[str, Any]:
    requests: set[str] = set()  # every message a request can carry

    def reach(message: Descriptor) -> None:
        if message.full_name not in requests and message.full_name not in _WELL_KNOWN:
            requests.add(message.full_name)
            for field in message.fields:
                if field.message_type is not None:
                    reach(field.message_type)

    for binding in bindings:
        reach(binding.method.input_type)
    builder = _Builder(comments, requests)
    paths: dict[str, dict[str, Any]] = {}
    for binding in bindings:
        path = re.sub(r"\{([^}=]+)(=[^}]*)?\}", r"{\1}", binding.template)
        paths.setdefault(path, {})[binding.http_method.lower()] = builder.operation(binding)
    services = sorted({b.method.containing_service for b in bindings}, key=lambda s: s.full_name)
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "Flameup Events API",
            "version": services[0].file.package.rpartition(".")[2] if services else "v1",
            "description": "\n\n".join(comments.get(s.full_name, "") for s in services),
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


def _comments(file: descriptor_pb2.FileDescriptorProto):
    """(full name, leading comment) of every service, method, message and field."""
    by_path = {tuple(loc.path): loc.leading_comments for loc in file.source_code_info.location}

    def text(path: tuple[int, ...]) -> str:
        return "\n".join(line.removeprefix(" ") for line in by_path.get(path, "").strip("\n").split("\n")).strip()

    def messages(items, prefix: str, path: tuple[int, ...]):
        for i, message in enumerate(items):
            name, here = f"{prefix}.{message.name}", (*path, i)
            yield name, text(here)
            for j, field in enumerate(message.field):
                yield f"{name}.{field.name}", text((*here, 2, j))
            yield from messages(message.nested_type, name, (*here, 3))

    yield from messages(file.message_type, file.package, (4,))
    for i, service in enumerate(file.service):
        yield f"{file.package}.{service.name}", text((6, i))
        for j, method in enumerate(service.method):
            yield f"{file.package}.{service.name}.{method.name}", text((6, i, 2, j))


class _Builder:
    def __init__(self, comments: dict[str, str], requests: set[str]) -> None:
        self.comments = comments
        self.requests = requests  # request messages: their rules say what is required
        self.schemas: dict[str, Any] = {
            ANY: {
                "type": "object",
                "description": "A message of the type its `@type` names, e.g. google.rpc.BadRequest.",
                "properties": {"@type": {"type": "string"}},
                "required": ["@type"],
                "additionalProperties": {},
            },
            STATUS: {
                "type": "object",
                "description": "Every error body: a google.rpc.Status, as grpc-gateway writes it.",
                "properties": {
                    "code": {"type": "integer", "format": "int32", "description": "The gRPC status code."},
                    "message": {"type": "string", "description": "What went wrong, for a developer."},
                    "details": {
                        "type": "array",
                        "items": {"$ref": f"#/components/schemas/{ANY}"},
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
        rules = [r.message for r in method.input_type.GetOptions().Extensions[validate_pb2.message].cel]
        if rules and binding.body != "*":  # a body's schema carries them
            description += "\n\n" + "\n".join(f"- {rule}" for rule in rules)
        op: dict[str, Any] = {
            "operationId": binding.operation_id,
            "tags": [method.containing_service.name],
            "summary": re.split(r"(?<=\.)\s", description, maxsplit=1)[0].replace("\n", " ") or method.name,
            "description": description,
        }
        taken = [v.field_path for v in binding.variables]
        parameters = [self._parameter(method.input_type.fields_by_name[name], "path") for name in taken]
        if binding.body != "*":
            parameters += [
                self._parameter(f, "query")
                for f in method.input_type.fields
                if f.name not in taken and f.name != binding.body
            ]
        if parameters:
            op["parameters"] = parameters
        if binding.body:
            assert binding.body == "*" and not taken, "only body: \"*\" without path variables is used"
            schema = self._ref(method.input_type)
            op["requestBody"] = {"required": True, "content": {"application/json": {"schema": schema}}}
        error = {"$ref": f"#/components/schemas/{STATUS}"}
        if method.server_streaming:
            # grpc-gateway's stream: one {"result": ...} or {"error": Status} object per line;
            # with Accept: text/event-stream, Server-Sent Events (id: cursor, data: event).
            line = {
                "type": "object",
                "title": f"Stream result of {method.output_type.full_name}",
                "properties": {"result": self._ref(method.output_type), "error": error},
            }
            success = {
                "description": "A successful response (streamed).",
                "content": {"application/json": {"schema": line}, "text/event-stream": {"schema": {"type": "string"}}},
            }
        else:
            success = {
                "description": "A successful response.",
                "content": {"application/json": {"schema": self._ref(method.output_type)}},
            }
        op["responses"] = {
            "200": success,
            **{
                status: {"description": text, "content": {"application/json": {"schema": error}}}
                for status, text in _ERRORS.items()
                if status != "413" or binding.body
            },
        }
        return op

    def _parameter(self, field: FieldDescriptor, where: str) -> dict[str, Any]:
        assert field.message_type is None or field.message_type.full_name in _WELL_KNOWN, field.full_name
        schema = self._field_schema(field)
        description = schema.pop("description", "")
        return {
            "name": field.name,
            "in": where,
            "required": where == "path" or _required(field),
            "description": description,
            "schema": schema,
        }

    def _ref(self, message: Descriptor, checked: bool = True) -> dict[str, Any]:
        """A reference to the message's schema; ``checked=False``: its shape
        without the validation rules, for items the service checks one by one."""
        if message.full_name in _WELL_KNOWN:
            return dict(_WELL_KNOWN[message.full_name])
        name = message.full_name if checked else f"{message.full_name}.unchecked"
        if name not in self.schemas:
            self.schemas[name] = {}  # placeholder: recursion ends here
            self.schemas[name] = self._message_schema(message, checked)
        return {"$ref": f"#/components/schemas/{name}"}

    def _message_schema(self, message: Descriptor, checked: bool) -> dict[str, Any]:
        request = message.full_name in self.requests
        fields = message.fields
        schema: dict[str, Any] = {
            "type": "object",
            "properties": {f.name: self._field_schema(f, nullable=request or _prints_null(f), checked=checked)
                           for f in fields},
            # Responses carry every field; requests need what their rules require.
            "required": [f.name for f in fields if not request or (checked and _required(f))],
        }
        if not schema["required"]:
            del schema["required"]
        notes = [r.message for r in message.GetOptions().Extensions[validate_pb2.message].cel] if checked else [
            "Its rules are checked one item at a time: a bad item is reported in the response, not refused "
            "with the request."
        ]
        description = "\n\n".join(filter(None, [self.comments.get(message.full_name, ""), *notes]))
        if description:
            schema["description"] = description
        return schema

    def _field_schema(self, field: FieldDescriptor, *, nullable: bool = False, checked: bool = True) -> dict[str, Any]:
        rules = _rules(field) if checked else validate_pb2.FieldRules()
        message = field.message_type
        if message is not None:
            item = self._ref(message, checked and rules.repeated.items.ignore != validate_pb2.IGNORE_ALWAYS)
        else:
            item = dict(_SCALARS[field.type]) if field.type != FD.TYPE_ENUM else {
                "type": "string", "enum": [v.name for v in field.enum_type.values]
            }
        if field.is_repeated:
            if message is None:  # each item's own rules
                item |= _scalar_constraints(rules.repeated.items)
            schema = {"type": "array", "items": item}
            if rules.repeated.HasField("min_items"):
                schema["minItems"] = rules.repeated.min_items
            if rules.repeated.HasField("max_items"):
                schema["maxItems"] = rules.repeated.max_items
        else:
            schema = item | _scalar_constraints(rules)
        description = self.comments.get(field.full_name)
        if "$ref" in schema and (description or nullable):
            schema = {"allOf": [schema]}
        if nullable and not (checked and _required(field)):
            schema["nullable"] = True  # a request's null leaves the field unset
        if description:
            schema["description"] = description
        return schema


def _prints_null(field: FieldDescriptor) -> bool:
    """A response's unset message field is written as null (grpc-gateway's
    EmitUnpopulated); the gateway writes an unset Struct as {}."""
    return (field.message_type is not None and not field.is_repeated
            and field.message_type.full_name != "google.protobuf.Struct")


def _rules(field: FieldDescriptor) -> validate_pb2.FieldRules:
    return field.GetOptions().Extensions[validate_pb2.field]


def _required(field: FieldDescriptor) -> bool:
    """Whether a request must carry the field: its rules say so, or they
    reject the empty value an absent field without presence has."""
    rules = _rules(field)
    if rules.required:
        return True
    if field.has_presence:
        return False
    return rules.string.min_len > 0 or rules.repeated.min_items > 0


def _scalar_constraints(rules: validate_pb2.FieldRules) -> dict[str, Any]:
    """The buf.validate rules JSON Schema can say; CEL rules stay in the descriptions."""
    out: dict[str, Any] = {}
    kind = rules.WhichOneof("type")
    if kind == "string":
        s = rules.string
        if s.HasField("min_len"):
            out["minLength"] = s.min_len
        if s.HasField("max_len"):
            out["maxLength"] = s.max_len
        if s.HasField("pattern"):
            out["pattern"] = s.pattern
        if s.uuid:
            out["format"] = "uuid"
        if getattr(s, "in"):
            out["enum"] = list(getattr(s, "in"))
    elif kind in ("int32", "int64", "uint32", "uint64", "double", "float"):
        number = getattr(rules, kind)
        if number.HasField("gte"):
            out["minimum"] = number.gte
        if number.HasField("lte"):
            out["maximum"] = number.lte
        if number.HasField("gt"):
            out["minimum"], out["exclusiveMinimum"] = number.gt, True
        if number.HasField("lt"):
            out["maximum"], out["exclusiveMaximum"] = number.lt, True
    return out


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
