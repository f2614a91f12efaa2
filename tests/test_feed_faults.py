"""The feed loses nothing: SIGKILL of each process kind during sustained ingest, and NATS
away for 30 s. After each, every acknowledged event id is on the stream (both stores).

A killed nats-server or publisher is started again by ``serve`` and ingest never
stops; a killed gRPC worker or SQLite writer stops the whole service (a process
manager restarts it): the test starts it again on the same store and NATS data.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

import grpc
import pytest
from feed_support import stream_ids
from service_support import start_service, stop_service

from flameup.events.v1 import events_pb2 as pb
from service.feed import natsd

pytestmark = pytest.mark.slow

INGEST_SECONDS = 4.0


@pytest.fixture(params=["sqlite", "cassandra"])
def store_url(request, tmp_path):
    if request.param == "cassandra":
        return request.getfixturevalue("cassandra_url")
    return f"sqlite:///{tmp_path}/events.db"


class Ingest:
    """TrackBatch calls in a loop on a thread; remembers the ids of every acknowledged event."""

    def __init__(self, target: str, key: str) -> None:
        self.target, self.key = target, key
        self.acked: set[str] = set()
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        channel = grpc.insecure_channel(self.target)
        stub = __import__("flameup.events.v1.events_pb2_grpc", fromlist=["x"]).EventsServiceStub(channel)
        n = 0
        while not self._stop.is_set():
            request = pb.TrackBatchRequest(events=[
                pb.TrackRequest(external_id=f"person_{(n + i) % 37}", event=f"fault.{i % 3}") for i in range(20)])
            n += 20
            try:
                reply = stub.TrackBatch(request, metadata=[("authorization", f"Bearer {self.key}")], timeout=10)
                self.acked.update(reply.event_ids)
            except grpc.RpcError:
                self.failures += 1
                time.sleep(0.05)
            time.sleep(0.01)
        channel.close()

    def stop(self) -> set[str]:
        self._stop.set()
        self._thread.join(30)
        return self.acked


def _children(pid: int) -> dict[str, int]:
    """The supervisor's child processes by kind."""
    kinds = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            args = (proc / "cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) != pid:
            continue
        # python -m service <command> ..., or the nats-server binary
        kind = args[3] if args[1:3] == ["-m", "service"] else os.path.basename(args[0])
        kinds[kind] = int(proc.name)
    return kinds


def _wait_for_child(pid: int, kind: str, not_pid: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (new := _children(pid).get(kind)) and new != not_pid:
            return
        time.sleep(0.1)
    raise AssertionError(f"{kind} was not started again")


@pytest.mark.parametrize("kind", ["feed-publisher", "nats-server", "grpc-worker", "sqlite-writer"])
def test_sigkill_of_any_process_loses_no_acknowledged_event(store_url, kind):
    if kind == "sqlite-writer" and not store_url.startswith("sqlite"):
        pytest.skip("only SQLite has a writer process")
    nats_dir = tempfile.mkdtemp(prefix="flameup-test-nats-")
    stream = f"FAULTS_{uuid.uuid4().hex[:8].upper()}"  # its own checkpoint and lease on a shared keyspace
    env = {"FLAMEUP_NATS_DATA_DIR": nats_dir, "FLAMEUP_FEED_STREAM": stream}
    svc = start_service(store_url, extra_env=env)
    restarted = None
    workspace = f"ws_fault_{uuid.uuid4().hex[:8]}"  # the keyspace may hold other tests' events
    try:
        ingest = Ingest(svc.grpc_target, svc.create_key(workspace))
        time.sleep(INGEST_SECONDS / 2)
        victim = _children(svc.proc.pid)[kind]
        os.kill(victim, signal.SIGKILL)
        if kind in ("feed-publisher", "nats-server"):
            _wait_for_child(svc.proc.pid, kind, victim)
            time.sleep(INGEST_SECONDS / 2)
            acked = ingest.stop()
            assert ingest.failures == 0  # the feed is off the request path
            nats_url = svc.nats_url
        else:
            assert svc.proc.wait(60) != 0  # the service stops as a whole
            acked = ingest.stop()
            # The same store and NATS data: a process manager's restart.
            restarted = start_service(store_url, extra_env=env)
            nats_url = restarted.nats_url
        assert acked
        on_stream = stream_ids(nats_url, stream, f"flameup.events.{workspace}.>", expect=acked)
        assert acked - set(on_stream) == set()
        if kind in ("feed-publisher", "nats-server"):
            assert set(on_stream) == acked
    finally:
        for s in (restarted, svc):
            if s is not None and s.proc.poll() is None:
                stop_service(s)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_nats_away_for_30_seconds_then_back_loses_nothing(store_url):
    run_dir = tempfile.mkdtemp(prefix="flameup-test-nats-run-")
    data_dir = os.path.join(run_dir, "data")
    port = _free_port()
    binary = natsd.nats_server_binary()
    nats_proc, nats_url = natsd.start(binary, run_dir, port, data_dir, natsd.DEFAULT_SYNC_INTERVAL)
    stream = f"OUTAGE_{uuid.uuid4().hex[:8].upper()}"
    svc = start_service(store_url, extra_args=("--nats-url", nats_url, "--feed-stream", stream))
    workspace = f"ws_outage_{uuid.uuid4().hex[:8]}"
    try:
        ingest = Ingest(svc.grpc_target, svc.create_key(workspace))
        time.sleep(2)
        nats_proc.terminate()
        nats_proc.wait(30)
        time.sleep(30)  # ingest goes on meanwhile
        nats_proc, _ = natsd.start(binary, run_dir, port, data_dir, natsd.DEFAULT_SYNC_INTERVAL)
        time.sleep(2)
        acked = ingest.stop()
        assert ingest.failures == 0
        on_stream = stream_ids(nats_url, stream, f"flameup.events.{workspace}.>", expect=acked, timeout=120)
        assert set(on_stream) == acked
    finally:
        stop_service(svc)
        nats_proc.terminate()
        try:
            nats_proc.wait(30)
        except subprocess.TimeoutExpired:
            nats_proc.kill()


def test_cassandra_instances_elect_one_publisher_and_another_takes_over(cassandra_url):
    """Two instances over one keyspace and one NATS: one lease holder publishes; when its
    instance dies, the other's publisher takes the lease and nothing acknowledged is lost."""
    from service.store.cassandra import CassandraStore

    run_dir = tempfile.mkdtemp(prefix="flameup-test-nats-run-")
    nats_proc, nats_url = natsd.start(natsd.nats_server_binary(), run_dir, 0, os.path.join(run_dir, "data"),
                                      natsd.DEFAULT_SYNC_INTERVAL)
    stream = f"ELECT_{uuid.uuid4().hex[:8].upper()}"
    args = ("--nats-url", nats_url, "--feed-stream", stream)
    first, second = start_service(cassandra_url, extra_args=args), start_service(cassandra_url, extra_args=args)
    workspace = f"ws_elect_{uuid.uuid4().hex[:8]}"
    try:
        key = first.create_key(workspace)

        def lease_owner() -> str | None:
            async def read():
                store = CassandraStore.from_url(cassandra_url)
                await store.open()
                try:
                    return await store.feed_lease_owner(stream)
                finally:
                    await store.close()
            import asyncio
            return asyncio.run(read())

        deadline = time.monotonic() + 60
        while (owner := lease_owner()) is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert owner is not None
        leader_pid = int(owner.split("-")[-2])
        leader = next(s for s in (first, second) if _children(s.proc.pid).get("feed-publisher") == leader_pid)
        survivor = second if leader is first else first

        ingest = Ingest(survivor.grpc_target, key)
        time.sleep(2)
        for pid in _children(leader.proc.pid).values():
            os.kill(pid, signal.SIGKILL)
        os.kill(leader.proc.pid, signal.SIGKILL)
        time.sleep(4)
        acked = ingest.stop()
        assert ingest.failures == 0
        on_stream = stream_ids(nats_url, stream, f"flameup.events.{workspace}.>", expect=acked, timeout=120)
        assert set(on_stream) == acked
        assert lease_owner() != owner
    finally:
        for s in (first, second):
            if s.proc.poll() is None:
                stop_service(s)
        nats_proc.terminate()
        nats_proc.wait(30)
