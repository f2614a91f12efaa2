"""The REST load generator: `wrk` (C, epoll, Debian's package) with bench/wrk_post.lua."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

LUA = Path(__file__).resolve().parent / "wrk_post.lua"


def ensure_wrk() -> str:
    """The wrk binary; installed from Debian when missing and we are root."""
    path = shutil.which("wrk")
    if path:
        return path
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SystemExit("wrk is not installed: run `sudo apt-get install -y wrk` (Debian/Ubuntu) and retry")
    print("wrk not found: installing it with apt-get (Debian package wrk)", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=True, env=env, stdout=subprocess.DEVNULL)
    path = shutil.which("wrk")
    if not path:
        raise SystemExit("apt-get install wrk did not provide a wrk binary")
    return path


@dataclass
class WrkResult:
    requests: int
    duration_s: float
    non2xx: int
    not_success: int
    socket_errors: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    first_bad: str
    cpu_s: float  # wrk's own CPU time (user + system)

    @property
    def ok_requests(self) -> int:
        return self.requests - self.non2xx - self.not_success


def run_wrk(wrk: str, http_url: str, path: str, bodies_file: Path, key: str, *, connections: int,
            duration_s: float, threads: int = 2, timeout_s: float = 10.0, on_start=None) -> WrkResult:
    threads = max(1, min(threads, connections))
    cmd = [wrk, f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration_s))}s", f"--timeout={timeout_s:g}s",
           "-s", str(LUA), http_url, "--", path, str(bodies_file), key]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if on_start:
        on_start()
    stdout, stderr = proc.communicate(timeout=duration_s + timeout_s + 60)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk exited with {proc.returncode}: {stderr.strip() or stdout.strip()}")
    line = next((ln for ln in stdout.splitlines() if ln.startswith("WRK_JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no summary:\n{stdout}\n{stderr}")
    s = json.loads(line.removeprefix("WRK_JSON "))
    return WrkResult(
        requests=s["requests"], duration_s=s["duration_us"] / 1e6, non2xx=s["non2xx"], not_success=s["not_success"],
        socket_errors=s["connect_errors"] + s["read_errors"] + s["write_errors"] + s["timeout_errors"],
        p50_ms=s["p50_us"] / 1000, p90_ms=s["p90_us"] / 1000, p99_ms=s["p99_us"] / 1000, max_ms=s["max_us"] / 1000,
        first_bad=s["first_bad"], cpu_s=0.0,
    )


def children_cpu_s() -> float:
    """CPU time of this process's reaped children (wrk), for the client's share of the machine."""
    t = os.times()
    return t.children_user + t.children_system


def timed_wrk(*args, **kwargs) -> WrkResult:
    """run_wrk plus wrk's CPU time (the only child reaped meanwhile)."""
    before = children_cpu_s()
    started = time.monotonic()
    result = run_wrk(*args, **kwargs)
    result.cpu_s = children_cpu_s() - before
    result.duration_s = result.duration_s or time.monotonic() - started
    return result
