"""pytest plugin: the real service as a running process tree.

``service`` is session-scoped and parametrized over the store backends: the
whole API suite runs once on SQLite and once on Cassandra. It starts
``python -m service serve`` exactly as `make run` does, on ephemeral ports,
with one gRPC worker and one gateway worker and no key cache (so revocations
show at once), and stops it with SIGTERM at the end.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

import grpc
import pytest

from flameup.events.v1 import events_pb2_grpc

START_TIMEOUT = 90.0


@dataclass
class RunningService:
    store_url: str
    grpc_target: str
    http_url: str
    key: str  # FLAMEUP_BOOTSTRAP_KEY: workspace ws_default, events:read and events:write
    proc: subprocess.Popen
    output: list[str] = field(default_factory=list)
    nats_url: str | None = None  # the feed's NATS, when the feed is on

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "service", *args, "--store", self.store_url],
            capture_output=True, text=True, timeout=60,
        )

    def create_key(self, workspace: str, scopes: str = "events:read,events:write") -> str:
        done = self.cli("keys", "create", "--workspace", workspace, "--scopes", scopes)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    def revoke_key(self, key: str) -> None:
        key_id = key.split("_")[1]
        done = subprocess.run([sys.executable, "-m", "service", "keys", "revoke", key_id, "--store", self.store_url],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.grpc_target)

    def stub(self) -> events_pb2_grpc.EventsServiceStub:
        return events_pb2_grpc.EventsServiceStub(self.channel())

    def metadata(self, key: str | None = None) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {key or self.key}")]


# Every path the REST gateway serves: the routes of the protos' google.api.http
# options, which the gateway and its OpenAPI document must both cover.
REST_PATHS = frozenset({
    "/api/v1/track",
    "/api/v1/track/batch",
    "/api/v1/people/{person_id}/events",
    "/api/v1/people/{person_id}/summary",
    "/api/v1/events/counts",
    "/api/v1/events/names",
    "/api/v1/events/stream",
    "/api/v1/people/{person_id}",
})


def start_service(store_url: str, *, workers: int = 1, gateway_workers: int = 1,
                  extra_env: dict[str, str] | None = None, grpc_port: int = 0, http_port: int = 0,
                  extra_args: tuple[str, ...] = ()) -> RunningService:
    """``serve`` on ``store_url`` and the given ports (0: ephemeral ones), once it says it is up.

    Its own nats-server (the feed) takes a free port and, unless ``FLAMEUP_NATS_DATA_DIR``
    or ``--nats-url`` says otherwise, a data directory of its own."""
    key = "test_" + secrets.token_urlsafe(24)
    env = {**os.environ, "FLAMEUP_BOOTSTRAP_KEY": key, "FLAMEUP_KEY_CACHE_SECONDS": "0",
           "FLAMEUP_NATS_PORT": "0", "FLAMEUP_NATS_DATA_DIR": tempfile.mkdtemp(prefix="flameup-test-nats-"),
           **(extra_env or {})}
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", "serve", "--store", store_url,
         "--grpc-port", str(grpc_port), "--http-port", str(http_port),
         "--workers", str(workers), "--gateway-workers", str(gateway_workers), "--log-level", "warning",
         *extra_args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    output: list[str] = []
    grpc_target = http_url = nats_url = None
    deadline = time.monotonic() + START_TIMEOUT
    while True:  # up to the "API key:" line, the last of the start-up message
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError("service exited during start:\n" + "".join(output))
        output.append(line)
        if m := re.search(r"gRPC listening on (\S+)", line):
            grpc_target = m.group(1)
        if m := re.search(r"REST listening on (\S+)", line):
            http_url = m.group(1)
        if m := re.search(r"Feed: NATS (\S+)", line):
            nats_url = m.group(1).rstrip(",")
        if "API key:" in line and grpc_target and http_url:
            break
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("service did not start in time:\n" + "".join(output))
    # keep draining the output so the service never blocks on a full pipe
    threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True).start()
    return RunningService(store_url, grpc_target, http_url, key, proc, output, nats_url)


def stop_service(svc: RunningService, timeout: float = 30.0) -> int:
    svc.proc.send_signal(signal.SIGTERM)
    try:
        return svc.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        svc.proc.kill()
        raise


@pytest.fixture(scope="session", params=["sqlite", "cassandra"])
def service(request, tmp_path_factory):
    if request.param == "cassandra":
        url = request.getfixturevalue("cassandra_url")
    else:
        url = f"sqlite:///{tmp_path_factory.mktemp('service')}/events.db"
    svc = start_service(url)
    yield svc
    assert stop_service(svc) == 0, "".join(svc.output)
