"""Which packages load which: the gateway is a gRPC client that stands on its own."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def _loaded_after_importing(*modules: str) -> set[str]:
    """Every module in sys.modules of a fresh interpreter once ``modules`` are imported."""
    code = ("import importlib, json, sys\n"
            f"for name in {list(modules)!r}:\n"
            "    importlib.import_module(name)\n"
            "print(json.dumps(sorted(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout))


def _of(packages: tuple[str, ...], loaded: set[str]) -> set[str]:
    return {name for name in loaded if name.split(".")[0] in packages}


def test_the_gateway_loads_nothing_of_the_service():
    loaded = _loaded_after_importing("gateway.app", "gateway.__main__")
    assert {"gateway.app", "gateway.__main__", "procutil.process"} <= loaded
    assert not _of(("service",), loaded)


@pytest.mark.parametrize("module", ["procutil", "procutil.process", "procutil.cpu", "protoconv"])
def test_the_shared_helpers_load_neither_side(module):
    loaded = _loaded_after_importing(module)
    assert module in loaded
    assert not _of(("service", "gateway"), loaded)
