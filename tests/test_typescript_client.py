"""The TypeScript client in clients/typescript (stubs from the README's
recipe, calls through @connectrpc/connect-node over gRPC) against the running
service: its node:test suite tracks, batches, lists with filters and reads a
BadRequest detail. `make typescript-client` builds it first (`make test` does);
a missing build is skipped locally and fails in CI."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

CLIENT = Path(__file__).parent.parent / "clients" / "typescript"
BUILT_TEST = CLIENT / "dist" / "test" / "client.test.js"


@pytest.fixture(scope="module")
def built_client() -> Path:
    missing = "node is not installed" if shutil.which("node") is None else \
        None if BUILT_TEST.exists() else "the TypeScript client is not built: run `make typescript-client`"
    if missing:
        if os.environ.get("CI"):
            pytest.fail(missing)
        pytest.skip(missing)
    return BUILT_TEST


def test_typescript_client(service, built_client):
    key = service.create_key(f"ws_ts_{os.getpid()}")
    env = {**os.environ, "FLAMEUP_GRPC_URL": f"http://{service.grpc_target}", "FLAMEUP_API_KEY": key}
    done = subprocess.run(["node", "--test", "--test-reporter=tap", str(built_client)],
                          cwd=CLIENT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "# pass 4" in done.stdout and "# fail 0" in done.stdout, done.stdout
