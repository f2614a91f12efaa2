"""The service under test: `python -m service serve`, exactly as `make run` starts it.

Ephemeral ports, a bootstrap key in FLAMEUP_BOOTSTRAP_KEY (workspace ws_default),
default key cache. Also: the process tree's RSS and CPU time from /proc.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT = 120.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# The worker processes of `serve`, by the word in their command line.
ROLES = ("grpc-worker", "sqlite-writer", "gateway", "feed-publisher", "nats-server")


@dataclass
class Service:
    store_url: str
    grpc_target: str
    http_url: str
    key: str
    proc: subprocess.Popen
    output: list[str] = field(default_factory=list)
    nats_url: str | None = None  # the feed's NATS, when the feed is on

    def tree(self) -> dict[int, str]:
        """pid -> role ("supervisor", or one of ROLES) of every live service process."""
        pids = {self.proc.pid: "supervisor"}
        for pid in descendants(self.proc.pid):
            cmd = cmdline(pid)
            pids[pid] = next((role for role in ROLES if role in cmd), "other")
        return pids

    def tail(self, lines: int = 40) -> str:
        return "".join(self.output[-lines:])


def start(store_url: str, *, workers: int, gateway_workers: int, cpu_policy: str, worker_cpu_affinity: str,
          log_level: str = "warning", nats_data_dir: str | None = None, extra_args: tuple[str, ...] = ()) -> Service:
    """``serve`` with its own nats-server on a free port (its data in ``nats_data_dir``)."""
    key = "bench_" + secrets.token_urlsafe(24)
    env = {**os.environ, "FLAMEUP_BOOTSTRAP_KEY": key, "PYTHONUNBUFFERED": "1", "FLAMEUP_NATS_PORT": "0",
           **({"FLAMEUP_NATS_DATA_DIR": nats_data_dir} if nats_data_dir else {})}
    cmd = [sys.executable, "-m", "service", "serve", "--store", store_url, "--grpc-port", "0", "--http-port", "0",
           "--workers", str(workers), "--gateway-workers", str(gateway_workers), "--cpu-policy", cpu_policy,
           "--worker-cpu-affinity", worker_cpu_affinity, "--log-level", log_level, *extra_args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output: list[str] = []
    found: dict[str, str] = {}
    deadline = time.monotonic() + START_TIMEOUT

    def read() -> None:
        for line in proc.stdout:
            output.append(line)
            for name, pattern in (("grpc", r"gRPC listening on (\S+)"), ("http", r"REST listening on (\S+)"),
                                  ("nats", r"Feed: NATS (\S+?)[,\s]"), ("feed_off", r"Feed: (off)")):
                if m := re.search(pattern, line):
                    found[name] = m.group(1)

    threading.Thread(target=read, daemon=True).start()  # also keeps the pipe drained afterwards
    while len(found) < 3:
        if proc.poll() is not None:
            time.sleep(0.2)
            raise RuntimeError(f"the service exited with {proc.returncode} during start:\n" + "".join(output[-40:]))
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("the service did not start in time:\n" + "".join(output[-40:]))
        time.sleep(0.05)
    return Service(store_url, found["grpc"], found["http"], key, proc, output, found.get("nats"))


def stop(svc: Service, timeout: float = 60.0) -> int:
    if svc.proc.poll() is None:
        svc.proc.send_signal(signal.SIGTERM)
    try:
        return svc.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        for pid in descendants(svc.proc.pid):
            _kill(pid)
        svc.proc.kill()
        svc.proc.wait()
        return -9


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# /proc ---------------------------------------------------------------------

def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()  # fields from 3 (state) on; comm may hold spaces


def all_pids() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid in all_pids():
        if (st := _stat(pid)) is not None:
            children.setdefault(int(st[1]), []).append(pid)
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def cpu_seconds(pids) -> float:
    """User + system CPU time of the given processes (all their threads)."""
    total = 0
    for pid in pids:
        if (st := _stat(pid)) is not None:
            total += int(st[11]) + int(st[12])  # utime, stime (fields 14 and 15)
    return total / CLOCK_TICKS
