"""Copy the protos that proto/ imports out of installed wheels, for protoc and buf offline.

    python scripts/protodeps.py build/protodeps

- google/api/{annotations,http}.proto: the googleapis-common-protos wheel
  ships them as source.
- buf/validate/validate.proto: the protovalidate wheel ships it only as an
  embedded descriptor, so it is written as a FileDescriptorSet
  (protovalidate.binpb, with the well-known files it imports) for protoc's
  --descriptor_set_in.
"""

from __future__ import annotations

import pathlib
import shutil
import sys

import google.api
import protovalidate
from google.protobuf import descriptor_pb2


def main(out: pathlib.Path) -> None:
    api = out / "google" / "api"
    api.mkdir(parents=True, exist_ok=True)
    for name in ("annotations.proto", "http.proto"):
        shutil.copy(pathlib.Path(google.api.__path__[0]) / name, api)

    files = descriptor_pb2.FileDescriptorSet()
    validate = protovalidate.ViolationsPb.desc().file  # buf/validate/validate.proto
    for file in [*validate.dependencies, validate]:
        files.file.add().ParseFromString(file.proto.to_binary())
    (out / "protovalidate.binpb").write_bytes(files.SerializeToString())


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1]))
