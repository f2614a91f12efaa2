"""`python -m service serve`: the whole service as one command.

The supervisor prepares the store in a child process (`python -m service
migrate`: schema, bootstrap key), then starts ``--workers`` gRPC worker
processes sharing one port through SO_REUSEPORT and ``--gateway-workers`` REST
gateway processes sharing another, waits until the gateway's /healthz answers
200 (which asks the gRPC health service), and prints where they listen. Each
gRPC worker also listens on a Unix socket of its own in a private directory,
reports on a pipe once it serves, and the gateways start only after every
gRPC worker does; they call the workers on those sockets, in equal shares. On a
SQLite store it first starts the one process that commits appends
(`python -m service sqlite-writer`, see service/store/sqlite_writer.py) on a
Unix socket in a private directory and passes that socket to each gRPC worker
(`--sqlite-writer`). With the feed on (service/feed/) it first starts a
nats-server (unless given a NATS URL) and, once the store is ready, the feed
publisher (`python -m service feed-publisher`); the gRPC workers get the NATS
URL for StreamEvents. It imports neither gRPC nor a store driver nor a NATS
client itself, so it stays small. On SIGTERM or Ctrl-C it stops the gateways
first (they finish in-flight requests), then the gRPC workers (health
NOT_SERVING, in-flight calls finish, the store commits and closes), then the
publisher, the SQLite writer (it commits what it holds) and nats-server. When
a gRPC worker, gateway or the writer dies unexpectedly the supervisor stops the
rest and exits non-zero, so a process manager can restart the whole unit; the
publisher and nats-server are off the request path and are started again.
Before it starts anything it sets its CPU policy (SCHED_BATCH unless told
otherwise), which every process inherits, and it gives gRPC worker i the i-th
CPU to keep to (see procutil.cpu).
"""

from __future__ import annotations

import errno
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import closing
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

from procutil.cpu import DEFAULT_CPU_POLICY, DEFAULT_WORKER_CPU_AFFINITY, set_cpu_policy, worker_cpus
from procutil.process import PARENT_PID_ENV
from service.feed import natsd
from service.feed.subjects import StreamSettings

log = logging.getLogger("flameup.supervisor")

STARTUP_TIMEOUT = 60.0
READY_FD_ENV = "FLAMEUP_READY_FD"
STOP_TIMEOUT = 15.0


def default_workers() -> int:
    """gRPC worker processes, unless told otherwise: one per CPU."""
    return os.cpu_count() or 1


def default_gateway_workers() -> int:
    """REST gateway processes, unless told otherwise: one per two CPUs, at least one.

    A gateway does about a third of a REST call's CPU; the gRPC workers and
    the SQLite writer do the rest. One gateway per CPU would put more busy
    processes than cores on the machine, and the scheduler's turns would show
    in the tail latency for little more throughput.
    See docs/decisions/gateway-processes.md.
    """
    return max(1, (os.cpu_count() or 1) // 2)


@dataclass(frozen=True)
class ServeConfig:
    store_url: str
    host: str
    grpc_port: int
    http_port: int
    workers: int
    gateway_workers: int
    bootstrap_key: str | None
    key_cache_seconds: float
    log_level: str
    log_format: str = "text"
    retention_days: int | None = None
    cpu_policy: str = DEFAULT_CPU_POLICY
    worker_cpu_affinity: str = DEFAULT_WORKER_CPU_AFFINITY
    feed: bool = True
    nats_url: str | None = None  # an existing NATS; None: run nats-server here
    nats_port: int = 4222  # the local nats-server's (0: any free port)
    nats_data_dir: str | None = None  # the local nats-server's JetStream data (None: beside the store)
    stream: StreamSettings = StreamSettings()


def reserve_port(host: str, port: int) -> socket.socket:
    """Hold the port for the workers: fail now if something else has it, and
    turn port 0 into a concrete port every worker can bind with SO_REUSEPORT.

    The probe binds with SO_REUSEADDR and without SO_REUSEPORT. On Linux that
    fails on a listening socket of any other process, whatever its options,
    and on the held socket of another ``serve`` starting up; it passes over
    the connections a stopped instance left behind (TIME_WAIT, FIN_WAIT), so
    ``serve`` starts again at once on the same ports. The held socket sets
    SO_REUSEPORT alone: with SO_REUSEADDR, another ``serve``'s probe would
    bind next to it. See docs/decisions/port-reservation.md.
    """
    if port:
        with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise SystemExit(f"port {host}:{port} is already in use") from exc
                raise
    held = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    held.bind((host, port))  # bound, never listening: takes no connections
    return held


async def prepare_store(store_url: str, bootstrap_key: str | None) -> None:
    """Create or migrate the schema and, when asked, the bootstrap key."""
    from service.auth import ensure_bootstrap_key
    from service.store import open_store

    store = open_store(store_url)
    await store.open()
    try:
        if bootstrap_key:
            await ensure_bootstrap_key(store, bootstrap_key)
    finally:
        await store.close()


def _wait_healthy(host: str, port: int, deadline: float, procs: list[subprocess.Popen]) -> None:
    """Until the gateway's /healthz answers 200: gateways up, and gRPC SERVING."""
    while True:
        _check_alive(procs)
        try:
            with socket.create_connection((host, port), timeout=1) as conn:
                conn.sendall(f"GET /healthz HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
                if conn.recv(64).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"the service did not become healthy on {host}:{port} in {STARTUP_TIMEOUT:.0f}s")
        time.sleep(0.1)


def _wait_ready(ready: int, count: int, deadline: float, procs: list[subprocess.Popen]) -> None:
    """Until ``count`` workers have reported ready on the pipe (see report_ready)."""
    seen = 0
    while seen < count:
        _check_alive(procs)
        if time.monotonic() > deadline:
            raise SystemExit(f"only {seen} of {count} workers were ready after {STARTUP_TIMEOUT:.0f}s")
        if select.select([ready], [], [], 0.1)[0]:
            seen += len(os.read(ready, count - seen))


def _processes(n: int) -> str:
    return f"{n} process" if n == 1 else f"{n} processes"


def report_ready() -> None:
    """Tell the supervisor this worker serves (a byte on the pipe it passed down)."""
    fd = os.environ.pop(READY_FD_ENV, None)
    if fd is not None:
        os.write(int(fd), b"1")
        os.close(int(fd))


def _check_alive(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is not None:
            name = " ".join(map(str, cast(list[str], p.args)[2:4]))
            raise SystemExit(f"worker {name} (pid {p.pid}) exited with {p.returncode} during start")


def _logging(config: ServeConfig) -> list[str]:
    """The log options every child process gets."""
    return ["--log-level", config.log_level, "--log-format", config.log_format]


def _retention(config: ServeConfig) -> list[str]:
    """The retention option of the processes that read or write events."""
    return [] if config.retention_days is None else ["--retention-days", str(config.retention_days)]


def _spawn(args: list[str], env: dict[str, str], pass_fds: tuple[int, ...] = ()) -> subprocess.Popen:
    # Own session: Ctrl-C reaches only the supervisor, which stops the workers in order.
    return subprocess.Popen([sys.executable, *args], env=env, start_new_session=True, pass_fds=pass_fds)


def _stop(procs: list[subprocess.Popen], timeout: float) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("worker pid %d did not stop in %.0fs; killing it", p.pid, timeout)
            p.kill()
            p.wait()


def serve(config: ServeConfig) -> int:
    set_cpu_policy(config.cpu_policy)  # before any worker starts: they inherit it
    migrate = subprocess.run(
        [sys.executable, "-m", "service", "migrate", "--store", config.store_url, *_logging(config)]
    )
    if migrate.returncode != 0:
        log.error("preparing the store %s failed", config.store_url)
        return 1
    grpc_sock = reserve_port(config.host, config.grpc_port)
    http_sock = reserve_port(config.host, config.http_port)
    grpc_port, http_port = grpc_sock.getsockname()[1], http_sock.getsockname()[1]
    grpc_target = f"{config.host}:{grpc_port}"
    env = {**os.environ, PARENT_PID_ENV: str(os.getpid())}
    env.pop("FLAMEUP_BOOTSTRAP_KEY", None)  # workers need no key; keep it out of their environment

    stopping = False

    def on_signal(signum, frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    nats_procs: list[subprocess.Popen] = []  # serve's own nats-server, when it runs one
    feed_procs: list[subprocess.Popen] = []  # the publisher
    writer_procs: list[subprocess.Popen] = []
    grpc_procs: list[subprocess.Popen] = []
    http_procs: list[subprocess.Popen] = []
    writer_args: list[str] = []  # the workers' --sqlite-writer, when there is a writer process
    # mode 0700: only this user reaches the sockets in it (the writer's, the workers' own)
    run_dir = tempfile.mkdtemp(prefix="flameup-")
    # Every process writes its metrics here and the gateways serve their sum (prometheus-client's
    # multiprocess mode); the gRPC workers share the workspaces' ingest buckets in one file.
    metrics_dir = os.path.join(run_dir, "metrics")
    os.mkdir(metrics_dir)
    env["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    rate_limit_file = os.path.join(run_dir, "rate-limits")
    worker_sockets = [os.path.join(run_dir, f"grpc-{i}.sock") for i in range(config.workers)]
    ready, ready_w = os.pipe()  # workers that must be serving before the next ones start write a byte here
    reporting = {**env, READY_FD_ENV: str(ready_w)}
    feed_url = config.nats_url
    feed_args: list[str] = []  # the workers' and the publisher's --nats-url and stream settings
    nats_data_dir = config.nats_data_dir or natsd.default_data_dir(config.store_url)

    def start_nats(port: int) -> str:
        proc, url = natsd.start(natsd.nats_server_binary(), run_dir, port, nats_data_dir, natsd.DEFAULT_SYNC_INTERVAL)
        nats_procs[:] = [proc]
        return url

    def start_publisher() -> None:
        feed_procs[:] = [
            _spawn(
                [
                    "-m",
                    "service",
                    "feed-publisher",
                    "--store",
                    config.store_url,
                    *feed_args,
                    "--log-level",
                    config.log_level,
                ],
                env,
            )
        ]

    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        if config.feed:
            if feed_url is None:
                feed_url = start_nats(config.nats_port)
            feed_args = ["--nats-url", feed_url, *config.stream.as_args()]
        if urlsplit(config.store_url).scheme == "sqlite":
            socket_path = os.path.join(run_dir, "appends.sock")
            writer_procs.append(
                _spawn(
                    [
                        "-m",
                        "service",
                        "sqlite-writer",
                        "--store",
                        config.store_url,
                        "--socket",
                        socket_path,
                        *_retention(config),
                        *_logging(config),
                    ],
                    reporting,
                    (ready_w,),
                )
            )
            _wait_ready(ready, 1, deadline, writer_procs)
            writer_args = ["--sqlite-writer", socket_path]
        if config.feed:
            start_publisher()
        grpc_procs += [
            _spawn(
                [
                    "-m",
                    "service",
                    "grpc-worker",
                    "--store",
                    config.store_url,
                    *writer_args,
                    *feed_args,
                    "--host",
                    config.host,
                    "--port",
                    str(grpc_port),
                    "--unix-socket",
                    path,
                    "--rate-limit-file",
                    rate_limit_file,
                    *_retention(config),
                    "--key-cache-seconds",
                    str(config.key_cache_seconds),
                    *_logging(config),
                    *(["--cpu", str(cpu)] if cpu is not None else []),
                ],
                reporting,
                (ready_w,),
            )
            for path, cpu in zip(worker_sockets, worker_cpus(config.workers, config.worker_cpu_affinity), strict=True)
        ]
        _wait_ready(ready, config.workers, deadline, writer_procs + grpc_procs)
        # The gateways call each worker on its own socket, their channels spread evenly
        # over them: SO_REUSEPORT places a connection on the shared port by a hash, and a
        # gateway holds few connections, so on the shared port one worker could take most
        # or all of the REST traffic while another idles (docs/decisions/gateway-processes.md).
        targets = [arg for path in worker_sockets for arg in ("--grpc-target", f"unix:{path}")]
        http_procs += [
            _spawn(
                [
                    "-m",
                    "gateway",
                    *targets,
                    "--host",
                    config.host,
                    "--port",
                    str(http_port),
                    *_logging(config),
                ],
                env,
            )
            for _ in range(config.gateway_workers)
        ]
        _wait_healthy(config.host, http_port, deadline, writer_procs + grpc_procs + http_procs)
        feed_line = (
            f"  Feed: NATS {feed_url}{' (this instance runs it)' if nats_procs else ''}, stream"
            f" {config.stream.name}, subjects flameup.events.<workspace_id>.<event token>\n"
            if config.feed
            else "  Feed: off\n"
        )
        print(
            f"Flameup Events is up (store {config.store_url})\n"
            f"  gRPC listening on {grpc_target} ({_processes(config.workers)})\n"
            f"  REST listening on http://{config.host}:{http_port} ({_processes(config.gateway_workers)})\n"
            f"{feed_line}"
            f"  API key: {'FLAMEUP_BOOTSTRAP_KEY (workspace ws_default)' if config.bootstrap_key else 'none yet'};"
            f" create one with:\n"
            f"    .venv/bin/python -m service keys create --store '{config.store_url}'"
            f" --workspace ws_default --scopes events:read,events:write",
            flush=True,
        )
        while not stopping:
            for p in writer_procs + grpc_procs + http_procs:
                if p.poll() is not None:
                    log.error("worker pid %d exited with %s; stopping the service", p.pid, p.returncode)
                    return 1
            # The feed's processes are off the request path: they start again, and the
            # publisher goes on from the checkpoint in the store.
            for p in nats_procs:
                if p.poll() is not None and feed_url is not None:
                    log.error("nats-server pid %d exited with %s; starting it again", p.pid, p.returncode)
                    start_nats(urlsplit(feed_url).port or config.nats_port)
            for p in feed_procs:
                if p.poll() is not None:
                    log.error("feed publisher pid %d exited with %s; starting it again", p.pid, p.returncode)
                    start_publisher()
            time.sleep(0.2)
        log.info("stopping: gateways first, then gRPC workers, the feed publisher, the store's writer, nats-server")
        return 0
    except SystemExit as exc:
        log.error("%s", exc)
        return 1
    finally:
        os.close(ready)
        os.close(ready_w)
        _stop(http_procs, STOP_TIMEOUT)
        _stop(grpc_procs, STOP_TIMEOUT)
        _stop(feed_procs, STOP_TIMEOUT)
        _stop(writer_procs, STOP_TIMEOUT)
        _stop(nats_procs, STOP_TIMEOUT)
        shutil.rmtree(run_dir, ignore_errors=True)
        grpc_sock.close()
        http_sock.close()
