"""Copy imported .proto files out of the installed Python wheels.

Usage: python scripts/protodeps.py OUT_DIR IMPORT_PATH...

Each IMPORT_PATH (e.g. google/rpc/error_details.proto) is looked up under the
entries of sys.path, where wheels such as googleapis-common-protos install
their .proto files next to the generated modules, and copied to
OUT_DIR/IMPORT_PATH. No network: only what the virtualenv already holds.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


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
        shutil.copyfile(find(import_path), target)


if __name__ == "__main__":
    main(*sys.argv[1:])
