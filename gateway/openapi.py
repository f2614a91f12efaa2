"""The OpenAPI 3 document of the REST gateway.

``make generate`` writes it from the proto descriptors
(scripts/gen_openapi.py) to generated/openapi/, which installs as the
``flameup.openapi`` package data; the gateway serves it as it is.
"""

from __future__ import annotations

from pathlib import Path

import flameup.openapi

DOCUMENT = "events.openapi.json"


def openapi_document() -> bytes:
    """The generated document, from the source tree or an installed package."""
    for directory in flameup.openapi.__path__:  # a namespace package: no importlib.resources.files
        path = Path(directory) / DOCUMENT
        if path.is_file():
            return path.read_bytes()
    raise FileNotFoundError(f"{DOCUMENT} is not installed with flameup.openapi; run `make generate`")
