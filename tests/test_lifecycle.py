"""The service as an operator sees it: start, keys CLI, graceful stop under load."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time

import grpc
import httpx
import pytest

from flameup.events.v1 import events_pb2 as pb
from flameup.events.v1 import events_pb2_grpc
from service.domain import EventQuery, person_id_for
from service.store.sqlite import SqliteStore
from service.supervisor import reserve_port
from service_support import start_service, stop_service


def test_sigterm_under_load_loses_no_acknowledged_event(tmp_path):
    url = f"sqlite:///{tmp_path}/events.db"
    svc = start_service(url, workers=2)
    acked: list[str] = []
    errors: list[grpc.StatusCode] = []
    stop = threading.Event()

    def writer(n: int) -> None:
        stub = svc.stub()
        i = 0
        while not stop.is_set():
            try:
                resp = stub.TrackBatch(pb.TrackBatchRequest(events=[
                    pb.TrackRequest(external_id=f"load_{n}", event=f"e{i}_{j}") for j in range(20)]),
                    metadata=svc.metadata(), timeout=10)
                acked.extend(resp.event_ids)
            except grpc.RpcError as exc:
                # after the stop began: refused (UNAVAILABLE), or dropped by the
                # server before a handler took it (CANCELLED); never acknowledged
                errors.append(exc.code())
                time.sleep(0.05)
            i += 1

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while len(acked) < 10 * 20 and time.monotonic() < deadline:  # writes flow: stop under load
        time.sleep(0.05)
    assert len(acked) >= 10 * 20, "too few batches were acknowledged before the stop"
    assert stop_service(svc) == 0
    stop.set()
    for t in threads:
        t.join(20)
    assert set(errors) <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}

    async def stored_ids() -> set[str]:
        store = SqliteStore.from_url(url)
        await store.open()
        try:
            ids: set[str] = set()
            for n in range(4):
                offset = 0
                while True:
                    page = await store.list_events(EventQuery("ws_default", person_id_for("ws_default", f"load_{n}"),
                                                              limit=500, offset=offset))
                    ids.update(e.event_id for e in page.events)
                    offset += 500
                    if offset >= page.total:
                        break
            return ids
        finally:
            await store.close()

    missing = set(acked) - asyncio.run(stored_ids())
    assert not missing, f"{len(missing)} of {len(acked)} acknowledged events are gone"


@pytest.mark.parametrize("which", ["grpc", "http"])
def test_serve_refuses_a_port_in_use(tmp_path, which):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ports = {"grpc": "0", "http": "0", which: str(port)}
        done = subprocess.run(
            [sys.executable, "-m", "service", "serve", "--store", f"sqlite:///{tmp_path}/e.db",
             "--grpc-port", ports["grpc"], "--http-port", ports["http"]],
            capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"port 127.0.0.1:{port} is already in use" in done.stderr and "is up" not in done.stdout


@pytest.mark.parametrize("options", [(), (socket.SO_REUSEADDR,), (socket.SO_REUSEPORT,),
                                     (socket.SO_REUSEADDR, socket.SO_REUSEPORT)],
                         ids=["plain", "reuseaddr", "reuseport", "both"])
def test_a_port_another_socket_listens_on_is_not_reserved(options):
    with socket.socket() as taken:
        for option in options:
            taken.setsockopt(socket.SOL_SOCKET, option, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit, match=f"port 127.0.0.1:{port} is already in use"):
            reserve_port("127.0.0.1", port)


def test_a_reserved_port_is_not_reserved_twice():
    with reserve_port("127.0.0.1", 0) as held:  # another serve, its workers not listening yet
        port = held.getsockname()[1]
        with pytest.raises(SystemExit, match=f"port 127.0.0.1:{port} is already in use"):
            reserve_port("127.0.0.1", port)


WAITING = {"04": "FIN_WAIT1", "05": "FIN_WAIT2", "06": "TIME_WAIT"}  # state codes of Linux's /proc/net/tcp


def _left_behind(port: int) -> set[str]:
    """The states of the closed TCP connections whose own end is ``port`` and that still hold it."""
    states = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as rows:
            next(rows)
            for row in rows:
                local, state = row.split()[1], row.split()[3]
                if int(local.rsplit(":", 1)[1], 16) == port and state in WAITING:
                    states.add(WAITING[state])
    return states


def _track_over_both(svc, channel: grpc.Channel, clients: list[httpx.Client], user: str) -> None:
    """An event over gRPC on ``channel`` and one over REST on each client's connection."""
    stub = events_pb2_grpc.EventsServiceStub(channel)
    assert stub.Track(pb.TrackRequest(external_id=user, event="grpc"), metadata=svc.metadata(), timeout=10).success
    for i, client in enumerate(clients):
        resp = client.post(f"{svc.http_url}/api/v1/track", json={"external_id": user, "event": f"rest_{i}"},
                           headers={"Authorization": f"Bearer {svc.key}"})
        assert resp.status_code == 200, resp.text


def _http2_connection(port: int) -> socket.socket:
    """A client connection to the gRPC port that the server has taken (its SETTINGS arrived)."""
    conn = socket.create_connection(("127.0.0.1", port), timeout=20)
    conn.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000"))  # preface, SETTINGS
    assert conn.recv(9, socket.MSG_PEEK)[3] == 0x04  # the server's SETTINGS frame, left to read
    return conn


def _answer_pings_to_the_end(conn: socket.socket) -> None:
    """Read the HTTP/2 frames the server sends to the end of its stream, answering its PINGs (a
    server that stops awaits the ack of the PING it sends with its GOAWAY). It never closes:
    unlike a gRPC channel, which closes on the GOAWAY, it leaves the server to close first."""
    with conn.makefile("rb") as frames:
        while len(head := frames.read(9)) == 9:
            payload = frames.read(int.from_bytes(head[:3], "big"))
            if head[3] == 0x6 and not head[4] & 0x1:  # PING, not an ack
                conn.sendall(bytes.fromhex("000008060100000000") + payload)


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="reads Linux's TCP tables")
def test_serve_starts_again_at_once_on_the_ports_it_served(tmp_path):
    url = f"sqlite:///{tmp_path}/e.db"
    svc = start_service(url)
    grpc_port, http_port = int(svc.grpc_target.rsplit(":", 1)[1]), int(svc.http_url.rsplit(":", 1)[1])
    channel, clients = svc.channel(), [httpx.Client(timeout=10) for _ in range(4)]
    raw = [_http2_connection(grpc_port) for _ in range(4)]
    readers = [threading.Thread(target=_answer_pings_to_the_end, args=(conn,)) for conn in raw]
    for reader in readers:
        reader.start()
    _track_over_both(svc, channel, clients, "before")
    assert stop_service(svc) == 0  # with every connection open: the service closes them
    for reader in readers:
        reader.join(10)
    channel.close()
    for connection in clients[:2] + raw[:2]:
        connection.close()
    try:  # the other two of each stay open: the service's ends wait in FIN_WAIT
        for port in (grpc_port, http_port):
            left = _left_behind(port)
            assert "TIME_WAIT" in left and left & {"FIN_WAIT1", "FIN_WAIT2"}, (port, left)

        again = start_service(url, grpc_port=grpc_port, http_port=http_port)
        try:
            assert (again.grpc_target, again.http_url) == (svc.grpc_target, svc.http_url)
            with again.channel() as fresh, httpx.Client(timeout=10) as client:
                _track_over_both(again, fresh, [client], "after")
        finally:
            assert stop_service(again) == 0, "".join(again.output)
    finally:
        for connection in clients[2:] + raw[2:]:
            connection.close()


def test_keys_cli_lists_without_revealing_keys(tmp_path):
    url = f"sqlite:///{tmp_path}/e.db"
    run = lambda *a: subprocess.run([sys.executable, "-m", "service", *a, "--store", url],  # noqa: E731
                                    capture_output=True, text=True, timeout=60)
    created = run("keys", "create", "--workspace", "ws_cli", "--scopes", "events:read")
    assert created.returncode == 0
    key = created.stdout.strip()
    key_id = key.split("_")[1]
    listing = run("keys", "list")
    assert key_id in listing.stdout and key not in listing.stdout and "events:read" in listing.stdout
    assert run("keys", "revoke", key_id).returncode == 0
    assert run("keys", "revoke", "nope").returncode == 1
    assert "ws_cli" in run("workspaces", "list").stdout
    bad = run("keys", "create", "--workspace", "acme", "--scopes", "events:read")
    assert bad.returncode == 2 and "ws_" in bad.stderr
    bad = run("keys", "create", "--workspace", "ws_x", "--scopes", "events:admin")
    assert bad.returncode == 2 and "scopes" in bad.stderr


@pytest.mark.parametrize("role", ["grpc-worker", "sqlite-writer"])
def test_supervisor_stops_when_a_worker_dies(tmp_path, role):
    svc = start_service(f"sqlite:///{tmp_path}/e.db")
    workers = subprocess.run(["pgrep", "-f", f"{role} --store sqlite:///{tmp_path}"],
                             capture_output=True, text=True).stdout.split()
    assert workers
    subprocess.run(["kill", "-KILL", workers[0]], check=True)
    assert svc.proc.wait(30) == 1


def test_serve_refuses_a_weak_bootstrap_key(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "service", "serve", "--store", f"sqlite:///{tmp_path}/e.db",
         "--grpc-port", "0", "--http-port", "0"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "FLAMEUP_BOOTSTRAP_KEY": "short"})
    assert done.returncode == 1 and "at least 16 characters" in done.stderr


def test_migrate_is_idempotent(tmp_path):
    url = f"sqlite:///{tmp_path}/e.db"
    for _ in range(2):
        done = subprocess.run([sys.executable, "-m", "service", "migrate", "--store", url],
                              capture_output=True, text=True, timeout=60,
                              env={**os.environ, "FLAMEUP_BOOTSTRAP_KEY": "a-long-enough-bootstrap-key"})
        assert done.returncode == 0, done.stderr
    listing = subprocess.run([sys.executable, "-m", "service", "keys", "list", "--store", url],
                             capture_output=True, text=True, timeout=60).stdout
    assert listing.count("ws_default") == 1



async def test_a_version_1_sqlite_file_migrates_with_its_events(tmp_path):
    """A file written under schema 1 (two person indexes on a rowid table) opens
    under the current schema with every event, total and event filter intact."""
    import sqlite3

    from service.domain import DAY_US, NameStats, new_event_id, now_us
    from service.store.base import bucket_of
    from service.store.sqlite_engine import MIGRATIONS, SCHEMA_VERSION

    path = str(tmp_path / "v1.db")
    conn = sqlite3.connect(path, isolation_level=None)
    for statement in MIGRATIONS[1]:
        conn.execute(statement)
    conn.execute("PRAGMA user_version = 1")
    at = now_us()
    pid = person_id_for("ws_m", "u")
    conn.execute("INSERT INTO persons (workspace_id, person_id) VALUES ('ws_other', 'p'), ('ws_m', ?)", (pid,))
    ids = [new_event_id(at) for _ in range(10)]
    # rows and counts as schema 1 held them, written by hand: the store's own code writes schema 3
    conn.executemany(
        "INSERT INTO events (event_id, person_key, ts, external_id, event, parameters, created_at)"
        " VALUES (?, 2, ?, 'u', ?, '{\"i\":' || ? || '}', ?)",
        [(ids[i], at - i, ("a", "b")[i % 2], i, at) for i in range(10)])
    for key, n in (("", 10), ("a", 5), ("b", 5)):
        conn.execute("INSERT INTO bucket_counts VALUES (2, ?, ?, ?)", (key, bucket_of(at), n))
    conn.close()

    store = SqliteStore(path)
    await store.open()
    try:
        page = await store.list_events(EventQuery("ws_m", pid, event="b"))
        assert page.total == 5 and [e.event_id for e in page.events] == ids[1::2]
        page = await store.list_events(EventQuery("ws_m", pid, limit=3, offset=2))
        assert page.total == 10 and [e.event_id for e in page.events] == ids[2:5]
        assert [e.parameters for e in page.events] == ['{"i":2}', '{"i":3}', '{"i":4}']
        # the aggregates are built from the migrated rows
        times = {name: [at - i for i in range(10) if ("a", "b")[i % 2] == name] for name in "ab"}
        stats = sorted(await store.person_summary("ws_m", pid, None, None), key=lambda s: s.event)
        assert stats == [NameStats(k, 5, min(v), max(v)) for k, v in sorted(times.items())]
        assert sorted(await store.event_names("ws_m", None, None), key=lambda s: s.event) == stats
        day = bucket_of(at) * DAY_US
        assert [(b.count, b.unique_persons) for b in await store.event_counts("ws_m", None, DAY_US, day, day + DAY_US)] == [(10, 1)]
        windowed = sorted(await store.person_summary("ws_m", pid, at - 4, at + 1), key=lambda s: s.event)
        assert [(s.event, s.count) for s in windowed] == [("a", 3), ("b", 2)]
    finally:
        await store.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("SELECT count(*) FROM timeline").fetchone()[0] == 10
    assert conn.execute("SELECT count(*) FROM recent").fetchone()[0] == 0
    indexes = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'events'")}
    assert indexes == set()  # the timeline is its own table now; the rows have only their seq key
    conn.close()


def test_sqlite_writeback_hint_starts_and_leaves_no_descriptor_open(tmp_path):
    from service.store.sqlite_engine import _Writeback

    data, missing = tmp_path / "db", tmp_path / "db-wal"
    data.write_bytes(b"x" * 65536)
    before = len(os.listdir("/proc/self/fd"))
    writeback = _Writeback([str(data), str(missing)])
    writeback.start()  # one file is missing (no WAL yet): nothing stays open
    assert len(os.listdir("/proc/self/fd")) == before
    missing.write_bytes(b"y")
    writeback.start()
    assert len(os.listdir("/proc/self/fd")) == before + (2 if sys.platform == "linux" else 0)
    writeback.close()
    assert len(os.listdir("/proc/self/fd")) == before


def _service_threads(root: int) -> dict[int, str]:
    """tid -> command line of every thread of ``root`` and of its descendants."""
    threads, pids = {}, [root]
    while pids:
        pid = pids.pop()
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()
            threads.update((int(tid), cmd) for tid in os.listdir(f"/proc/{pid}/task"))
            children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
        except FileNotFoundError:
            continue  # gone meanwhile
        pids += map(int, children)
    return threads


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="SCHED_BATCH is Linux's")
@pytest.mark.parametrize(("policy", "expected", "started_as"), [
    (None, "SCHED_BATCH", "SCHED_OTHER"),  # the default
    ("normal", "SCHED_OTHER", "SCHED_BATCH"),  # asked for, even when started from a batch process
])
def test_every_service_thread_runs_the_cpu_policy(tmp_path, policy, expected, started_as):
    own = os.sched_getscheduler(0)
    os.sched_setscheduler(0, getattr(os, started_as), os.sched_param(0))
    try:
        svc = start_service(f"sqlite:///{tmp_path}/e.db", extra_env={"FLAMEUP_CPU_POLICY": policy} if policy else None)
    finally:
        os.sched_setscheduler(0, own, os.sched_param(0))
    try:
        threads = _service_threads(svc.proc.pid)
        roles = " ".join(threads.values())
        assert all(role in roles for role in ("sqlite-writer", "grpc-worker", "gateway"))
        policies = {}
        for tid in threads:
            try:
                policies[tid] = os.sched_getscheduler(tid)
            except ProcessLookupError:
                continue
        wrong = {tid: threads[tid] for tid, p in policies.items() if p != getattr(os, expected)}
        assert len(policies) > 10 and not wrong, f"threads not {expected}: {wrong}"
    finally:
        assert stop_service(svc) == 0


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="CPU affinity is Linux's")
@pytest.mark.parametrize("affinity", [None, "off"])  # None: the default, auto
def test_each_grpc_worker_keeps_to_its_own_cpu(tmp_path, affinity):
    allowed = sorted(os.sched_getaffinity(0))
    svc = start_service(f"sqlite:///{tmp_path}/e.db", workers=2,
                        extra_env={"FLAMEUP_WORKER_CPU_AFFINITY": affinity} if affinity else None)
    try:
        threads = _service_threads(svc.proc.pid)
        workers: dict[int, tuple[str, set]] = {}  # tid -> (its process's command line, its CPUs)
        for tid, cmd in threads.items():
            if "grpc-worker" in cmd:
                try:
                    workers[tid] = (cmd, os.sched_getaffinity(tid))
                except ProcessLookupError:
                    continue
        by_process = {cmd: {frozenset(cpus) for c, cpus in workers.values() if c == cmd} for cmd, _ in workers.values()}
        assert len(by_process) == 2 and len(workers) > 10
        if affinity == "off":
            assert all(masks == {frozenset(allowed)} for masks in by_process.values()), by_process
            assert all("--cpu" not in cmd for cmd in by_process)
        else:
            # worker i (serve passes --cpu i) and every one of its threads, on the i-th allowed CPU
            expected = {frozenset({allowed[0]}), frozenset({allowed[1 % len(allowed)]})}
            assert {mask for masks in by_process.values() for mask in masks} == expected, by_process
            for cmd, masks in by_process.items():
                assert masks == {frozenset({int(cmd.split("--cpu ")[1].split()[0])})}, (cmd, masks)
    finally:
        assert stop_service(svc) == 0


@pytest.mark.parametrize(("env", "choices"), [("FLAMEUP_CPU_POLICY", "batch, normal"),
                                             ("FLAMEUP_WORKER_CPU_AFFINITY", "auto, off")])
def test_serve_refuses_an_unknown_cpu_setting(tmp_path, env, choices):
    done = subprocess.run(
        [sys.executable, "-m", "service", "serve", "--store", f"sqlite:///{tmp_path}/e.db",
         "--grpc-port", "0", "--http-port", "0"],
        capture_output=True, text=True, timeout=60, env={**os.environ, env: "fast"})
    assert done.returncode == 2 and f"{env} must be one of {choices}, got 'fast'" in done.stderr
