"""HTTP bindings derived from the ``google.api.http`` options of a proto file.

Nothing here is written per route: :func:`bindings_for` reads every method of
every service in the given file descriptors, and each ``HttpRule`` (plus its
``additional_bindings``) becomes one :class:`Binding`. The app turns bindings
into Starlette routes, the OpenAPI document is generated from the same list.

Path templates follow ``google/api/http.proto``::

    Template = "/" Segments [ Verb ] ;
    Segment  = "*" | "**" | LITERAL | Variable ;
    Variable = "{" FieldPath [ "=" Segments ] "}" ;

``{field}`` (also dotted, ``{a.b}``) captures one segment; ``{name=shelves/*}``
captures ``shelves/<segment>`` into ``name``; ``**`` captures the rest of the
path. Each capture becomes a Starlette path parameter named ``p0``, ``p1``...
(field paths may contain dots, Starlette names may not), and
:meth:`PathVariable.value` puts a variable's text back together.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from google.api import annotations_pb2, http_pb2
from google.protobuf.descriptor import Descriptor, FileDescriptor, MethodDescriptor

HTTP_METHODS = ("get", "put", "post", "delete", "patch")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")


@dataclass(frozen=True, slots=True)
class PathVariable:
    """One ``{field=...}`` of a template."""

    field_path: str
    parts: tuple[str, ...]  # literal text, or ":pN" for the Starlette parameter pN

    def value(self, path_params: Mapping[str, str]) -> str:
        return "/".join(path_params[p[1:]] if p.startswith(":") else p for p in self.parts)


@dataclass(frozen=True, slots=True)
class Binding:
    """One HTTP method + path template bound to one gRPC method."""

    method: MethodDescriptor
    http_method: str  # upper case: "GET", "POST", ...
    template: str  # as written in the proto: "/api/v1/people/{person_id}/events"
    route_path: str  # as Starlette matches it: "/api/v1/people/{p0}/events"
    variables: tuple[PathVariable, ...]
    body: str  # "" (no body), "*" (the whole request) or a field path
    response_body: str  # "" (the whole response) or a top-level response field

    @property
    def grpc_path(self) -> str:
        """The gRPC method path, "/flameup.events.v1.EventsService/Track"."""
        return f"/{self.method.containing_service.full_name}/{self.method.name}"

    @property
    def operation_id(self) -> str:
        return f"{self.method.containing_service.name}_{self.method.name}"


class TemplateError(ValueError):
    pass


def bindings_for(files: Iterable[FileDescriptor]) -> list[Binding]:
    """Every HTTP binding of every method of every service in ``files``.

    Raises :class:`TemplateError` for a template it cannot serve or for two
    bindings of the same HTTP method and path.
    """
    out: list[Binding] = []
    seen: dict[tuple[str, str], str] = {}
    for file in files:
        for service in file.services_by_name.values():
            for method in service.methods:
                options = method.GetOptions()
                if not options.HasExtension(annotations_pb2.http):
                    continue
                rule = options.Extensions[annotations_pb2.http]
                for one in (rule, *rule.additional_bindings):
                    binding = _binding(method, one)
                    key = (binding.http_method, binding.route_path)
                    if key in seen:
                        raise TemplateError(
                            f"{binding.http_method} {binding.template} is bound to both "
                            f"{seen[key]} and {method.full_name}"
                        )
                    seen[key] = method.full_name
                    out.append(binding)
    return out


def _binding(method: MethodDescriptor, rule: http_pb2.HttpRule) -> Binding:
    kind = rule.WhichOneof("pattern")
    if kind is None:
        raise TemplateError(f"{method.full_name}: an HttpRule without a pattern")
    if kind == "custom":
        http_method, template = rule.custom.kind.upper(), rule.custom.path
    else:
        http_method, template = kind.upper(), getattr(rule, kind)
    route_path, variables = parse_template(template)
    for variable in variables:
        _check_field_path(method, variable.field_path)
    if rule.body and rule.body != "*":
        _check_field_path(method, rule.body)
    if rule.response_body and rule.response_body not in method.output_type.fields_by_name:
        raise TemplateError(f"{method.full_name}: response_body {rule.response_body!r} is not a response field")
    return Binding(method, http_method, template, route_path, tuple(variables), rule.body, rule.response_body)


def _check_field_path(method: MethodDescriptor, path: str) -> None:
    message: Descriptor | None = method.input_type
    for name in path.split("."):
        field = message.fields_by_name.get(name) if message is not None else None
        if field is None:
            raise TemplateError(f"{method.full_name}: {path!r} is not a field of {method.input_type.full_name}")
        message = field.message_type


def parse_template(template: str) -> tuple[str, list[PathVariable]]:
    """A google.api.http path template to a Starlette path and its variables."""
    if not template.startswith("/"):
        raise TemplateError(f"a path template starts with '/': {template!r}")
    body, verb = _split_verb(template)
    counter = itertools.count()
    out: list[str] = []
    variables: list[PathVariable] = []
    for segment in _segments(body[1:]):
        if segment.startswith("{"):
            inner = segment[1:-1]
            field_path, _, sub = inner.partition("=")
            if not _IDENT.fullmatch(field_path):
                raise TemplateError(f"bad variable {segment!r} in {template!r}")
            parts: list[str] = []
            for piece in (sub or "*").split("/"):
                parts.append(_capture(piece, counter, out, template))
            variables.append(PathVariable(field_path, tuple(parts)))
        else:
            _capture(segment, counter, out, template)
    return "/" + "/".join(out) + (f":{verb}" if verb else ""), variables


def _capture(piece: str, counter: Iterator[int], out: list[str], template: str) -> str:
    """Append one segment to ``out``; return it as a PathVariable part."""
    if piece == "*":
        name = f"p{next(counter)}"
        out.append("{" + name + "}")
        return ":" + name
    if piece == "**":
        name = f"p{next(counter)}"
        out.append("{" + name + ":path}")
        return ":" + name
    if not piece or any(c in piece for c in "{}*"):
        raise TemplateError(f"bad segment {piece!r} in {template!r}")
    out.append(piece)
    return piece


def _split_verb(template: str) -> tuple[str, str]:
    depth = 0
    for index in range(len(template) - 1, -1, -1):
        char = template[index]
        if char == "}":
            depth += 1
        elif char == "{":
            depth -= 1
        elif char == "/" and depth == 0:
            break
        elif char == ":" and depth == 0:
            return template[:index], template[index + 1 :]
    return template, ""


def _segments(text: str) -> list[str]:
    segments: list[str] = []
    current = ""
    depth = 0
    for char in text:
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
        if char == "/" and depth == 0:
            segments.append(current)
            current = ""
        else:
            current += char
    segments.append(current)
    if depth != 0:
        raise TemplateError(f"unbalanced braces in {text!r}")
    return segments
