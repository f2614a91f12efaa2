"""Copy imported .proto files out of the installed Python wheels.

Usage: python scripts/protodeps.py OUT_DIR IMPORT_PATH...

Each IMPORT_PATH (e.g. google/rpc/error_details.proto) is looked up under the
entries of sys.path, where wheels such as googleapis-common-protos install
their .proto files next to the generated modules, and copied to
OUT_DIR/IMPORT_PATH. No network: only what the virtualenv already holds.

buf/validate/validate.proto is the exception: the protovalidate wheel ships it
only as an embedded descriptor, so it is written back as .proto source, and
protoc must compile that source to the very same descriptor.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_encoding, text_format

FDP = descriptor_pb2.FieldDescriptorProto


def _protovalidate() -> list[bytes]:
    """validate.proto's descriptor, after those of the files it imports."""
    import protovalidate

    file = protovalidate.ViolationsPb.desc().file
    return [f.proto.to_binary() for f in [*file.dependencies, file]]


EMBEDDED: dict[str, Callable[[], list[bytes]]] = {"buf/validate/validate.proto": _protovalidate}


def find(import_path: str) -> Path:
    for entry in sys.path:
        candidate = Path(entry or ".") / import_path
        if candidate.is_file():
            return candidate
    sys.exit(f"protodeps: {import_path} is in no installed package (is the wheel that ships it in pyproject.toml?)")


def main(out: str, *import_paths: str) -> None:
    for import_path in import_paths:
        target = Path(out) / import_path
        target.parent.mkdir(parents=True, exist_ok=True)
        if import_path in EMBEDDED:
            pool = descriptor_pool.DescriptorPool()  # knows the file's own option extensions
            for serialized in EMBEDDED[import_path]():
                pool.AddSerializedFile(serialized)
            descriptor = descriptor_pb2.FileDescriptorProto.FromString(serialized)
            options = message_factory.GetMessageClass(pool.FindMessageTypeByName("google.protobuf.FieldOptions"))
            target.write_text(proto_source(descriptor, options), encoding="utf-8")
            _check_round_trip(out, descriptor)
        else:
            shutil.copyfile(find(import_path), target)


# --------------------------------------------------------------------------
# A FileDescriptorProto back to .proto source: the proto2 subset validate.proto
# uses (messages, oneofs, enums, reserved names and ranges, extension ranges,
# extensions, file options, message-valued field options).

_TYPES = {
    value: name.removeprefix("TYPE_").lower()
    for name, value in FDP.Type.items()
    if name not in ("TYPE_MESSAGE", "TYPE_ENUM", "TYPE_GROUP")
}
_MAX_FIELD = 536_870_912  # exclusive end of "to max"


def proto_source(file: descriptor_pb2.FileDescriptorProto, field_options: type) -> str:
    """``field_options``: a FieldOptions class whose pool has the extensions the file's fields use."""
    lines = [f'syntax = "{file.syntax or "proto2"}";', "", f"package {file.package};", ""]
    lines += [f'import "{dependency}";' for dependency in file.dependency] + [""]
    lines += [f"option {field.name} = {_scalar(value)};" for field, value in file.options.ListFields()] + [""]
    for enum in file.enum_type:
        lines += _enum(enum) + [""]
    for message in file.message_type:
        lines += _message(message, field_options) + [""]
    for extendee in dict.fromkeys(x.extendee for x in file.extension):
        lines.append(f"extend {extendee} {{")
        lines += ["  " + _field(x, field_options) for x in file.extension if x.extendee == extendee]
        lines += ["}", ""]
    return "\n".join(lines)


def _scalar(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + text_encoding.CEscape(value, as_utf8=True) + '"'
    return str(value)


def _reserved(ranges, names, end_offset: int) -> list[str]:
    spans = [str(r.start) if r.end - end_offset == r.start else f"{r.start} to {r.end - end_offset}" for r in ranges]
    lines = [f"reserved {', '.join(spans)};"] if spans else []
    return lines + ([f"reserved {', '.join(_scalar(n) for n in names)};"] if names else [])


def _enum(enum: descriptor_pb2.EnumDescriptorProto) -> list[str]:
    body = _reserved(enum.reserved_range, enum.reserved_name, 0)  # enum ranges include their end
    body += [f"{value.name} = {value.number};" for value in enum.value]
    return [f"enum {enum.name} {{", *("  " + line for line in body), "}"]


def _message(message: descriptor_pb2.DescriptorProto, field_options: type) -> list[str]:
    body = _reserved(message.reserved_range, message.reserved_name, 1)
    done: set[int] = set()
    for field in message.field:
        if not field.HasField("oneof_index"):
            body.append(_field(field, field_options))
        elif field.oneof_index not in done:
            done.add(field.oneof_index)
            members = [f for f in message.field if f.HasField("oneof_index") and f.oneof_index == field.oneof_index]
            body.append(f"oneof {message.oneof_decl[field.oneof_index].name} {{")
            body += ["  " + _field(member, field_options, label=False) for member in members]
            body.append("}")
    for r in message.extension_range:
        body.append(f"extensions {r.start} to {'max' if r.end == _MAX_FIELD else r.end - 1};")
    return [f"message {message.name} {{", *("  " + line for line in body), "}"]


def _field(field: descriptor_pb2.FieldDescriptorProto, field_options: type, label: bool = True) -> str:
    kind = field.type_name if field.type in (FDP.TYPE_MESSAGE, FDP.TYPE_ENUM) else _TYPES[field.type]
    prefix = {FDP.LABEL_REPEATED: "repeated ", FDP.LABEL_REQUIRED: "required "}.get(field.label, "optional ")
    options = [f"({ext.full_name}) = {{{text_format.MessageToString(value, as_one_line=True)}}}"
               if ext.is_extension else f"{ext.name} = {_scalar(value)}"
               for ext, value in field_options.FromString(field.options.SerializeToString()).ListFields()]
    suffix = f" [{', '.join(options)}]" if options else ""
    return f"{prefix if label else ''}{kind} {field.name} = {field.number}{suffix};"


def _check_round_trip(out: str, descriptor: descriptor_pb2.FileDescriptorProto) -> None:
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        built = Path(tmp) / "built.binpb"
        args = ["protoc", f"-I{out}", f"-I{well_known}", f"--descriptor_set_out={built}", descriptor.name]
        if protoc.main(args) != 0:
            sys.exit(f"protodeps: protoc cannot compile the {descriptor.name} written from its descriptor")
        (compiled,) = descriptor_pb2.FileDescriptorSet.FromString(built.read_bytes()).file
    if compiled != descriptor:
        sys.exit(f"protodeps: {descriptor.name} written from its descriptor compiles to another descriptor")


if __name__ == "__main__":
    main(*sys.argv[1:])
