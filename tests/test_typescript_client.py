"""The TypeScript client in clients/typescript (stubs from the README's
recipe, calls through @connectrpc/connect-node over gRPC) against the running
service: its node:test suite tracks, batches, lists with filters, reads a
BadRequest detail and reads a StreamEvents server stream to the third event.
`make typescript-client` builds it first (`make test` does); a missing build is
skipped locally and fails in CI. The README's ten-line
TypeScript example runs too, next to the compiled client (it is plain
JavaScript as well)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
CLIENT = ROOT / "clients" / "typescript"
BUILT_TEST = CLIENT / "dist" / "test" / "client.test.js"


@pytest.fixture(scope="module")
def built_client() -> Path:
    if shutil.which("node") and BUILT_TEST.exists():
        return BUILT_TEST
    missing = "the TypeScript client is not built (needs node): run `make typescript-client`"
    if os.environ.get("CI"):
        pytest.fail(missing)
    pytest.skip(missing)


def test_typescript_client(service, built_client):
    key = service.create_key(f"ws_ts_{os.getpid()}")
    env = {**os.environ, "FLAMEUP_GRPC_URL": f"http://{service.grpc_target}", "FLAMEUP_API_KEY": key}
    done = subprocess.run(["node", "--test", "--test-reporter=tap", str(built_client)],
                          cwd=CLIENT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "# pass 5" in done.stdout and "# fail 0" in done.stdout, done.stdout


def test_readme_typescript_example(service, built_client):
    (example,) = re.findall(r"```ts\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert "http://127.0.0.1:50051" in example and "${KEY}" in example  # what the harness replaces
    key = service.create_key(f"ws_ts_readme_{os.getpid()}")
    script = CLIENT / "dist" / "src" / "readme_example.mjs"  # beside dist/src/gen, as ./gen/… in the README
    script.write_text(f"const KEY = {key!r};\n" + example.replace("http://127.0.0.1:50051", f"http://{service.grpc_target}"))
    done = subprocess.run(["node", str(script)], cwd=CLIENT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "1\n"  # a fresh workspace: the one event just tracked
