"""The load generators against trivial servers: their ceiling on this machine.

    .venv/bin/python -m bench.calibrate [--duration 10] [--warmup 2]

The gRPC clients of the benchmark (same processes, concurrency and prebuilt
requests) call a do-nothing grpc.aio server (2 processes on one port, on uvloop
and each kept to its own CPU, like the service's workers) that answers every
call with a prebuilt ``success = true`` response; wrk posts the benchmark's
bodies to a do-nothing asyncio HTTP/1.1 server (2 processes, on uvloop like the
gateways). Client and server share the same 2 cores, exactly as in the
benchmark, so the numbers are a floor on what the generators can drive: if they
sit far above the service's results, the generator is not the bottleneck.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import pickle
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

import uvloop

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import data, grpc_load, rest_load  # noqa: E402
from bench.metrics import percentile  # noqa: E402
from bench.run import DEFAULT_CONCURRENCY, LOAD_GENERATOR_CPU_POLICY  # noqa: E402
from bench.service_proc import cpu_seconds  # noqa: E402
from procutil.cpu import DEFAULT_WORKER_CPU_AFFINITY, keep_to_cpu, set_cpu_policy, worker_cpus  # noqa: E402
from service.supervisor import reserve_port  # noqa: E402

SUCCESS = b"\x08\x01"  # TrackResponse / TrackBatchResponse with success = true


def _grpc_server(port: int, cpu: int | None) -> None:
    if cpu is not None:
        keep_to_cpu(cpu)  # as serve does with its gRPC workers, before gRPC starts a thread
    import grpc

    async def serve() -> None:
        async def ok(request: bytes, context) -> bytes:
            return SUCCESS

        handler = grpc.method_handlers_generic_handler("flameup.events.v1.EventsService", {
            "Track": grpc.unary_unary_rpc_method_handler(ok),
            "TrackBatch": grpc.unary_unary_rpc_method_handler(ok),
        })
        server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
        server.add_generic_rpc_handlers((handler,))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await server.stop(0)

    uvloop.run(serve())


class _Http(asyncio.Protocol):
    BODY = b'{"success":true,"event_id":"evt_0","person_id":"p"}'
    RESPONSE = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(BODY)) + BODY

    def connection_made(self, transport) -> None:
        self.transport, self.buf = transport, b""

    def data_received(self, chunk: bytes) -> None:
        self.buf += chunk
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            length = 0
            for line in self.buf[:end].split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            if len(self.buf) < end + 4 + length:
                return
            self.buf = self.buf[end + 4 + length:]
            self.transport.write(self.RESPONSE)


def _http_server(port: int, cpu: int | None) -> None:
    del cpu  # left to the kernel, like the gateways
    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(_Http, "127.0.0.1", port, reuse_port=True)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        async with server:
            await stop.wait()

    uvloop.run(serve())


def _servers(target, n: int) -> tuple[int, list]:
    held = reserve_port("127.0.0.1", 0)  # the port every server process binds, as serve does it
    port = held.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    cpus = worker_cpus(n, DEFAULT_WORKER_CPU_AFFINITY)  # as serve places its gRPC workers
    procs = [ctx.Process(target=target, args=(port, cpu), daemon=True) for cpu in cpus]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    held.close()
    time.sleep(0.5)  # every process listening
    return port, procs


def _stop(procs) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        p.join(10)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.calibrate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--servers", type=int, default=2)
    a = ap.parse_args(argv)
    # Generators and servers alike: the generators as in the benchmark, the servers as serve's default.
    set_cpu_policy(LOAD_GENERATOR_CPU_POLICY)
    print(f"load generators against do-nothing servers ({a.servers} server processes, same 2 cores), "
          f"{a.duration:g} s after {a.warmup:g} s warm-up")
    print(f"{'workload':12} {'calls/s':>10} {'events/s':>11} {'p50 ms':>8} {'p99 ms':>8} {'in flight':>9} "
          f"{'client cores':>12} {'server cores':>12}")
    with tempfile.TemporaryDirectory(prefix="flameup-calibrate-") as tmp:
        port, procs = _servers(_grpc_server, a.servers)
        try:
            for workload in ("grpc_track", "grpc_batch"):
                method, per_call, payloads = data.grpc_workload(workload)
                f = Path(tmp) / f"{workload}.pickle"
                f.write_bytes(pickle.dumps(payloads))
                conc = DEFAULT_CONCURRENCY[workload]
                clients = grpc_load.Clients([
                    grpc_load.ClientJob(f"127.0.0.1:{port}", method, "calibration", str(f), per_call, conc, a.warmup,
                                        a.duration, offset=k * 100) for k in range(a.clients)])
                clients.start()
                time.sleep(max(0.0, clients.measure_at - time.monotonic()))
                pids = [p.pid for p in procs]
                cpu0 = cpu_seconds(pids)
                time.sleep(max(0.0, clients.end_at - time.monotonic()))
                server_cpu = cpu_seconds(pids) - cpu0
                results = clients.results()
                calls = sum(r.calls for r in results)
                lat = sorted(x for r in results for x in r.latencies_ms)
                print(f"{workload:12} {calls / a.duration:>10,.0f} {calls * per_call / a.duration:>11,.0f} "
                      f"{percentile(lat, 50):>8.2f} {percentile(lat, 99):>8.2f} {conc * a.clients:>9} "
                      f"{sum(r.cpu_s for r in results) / a.duration:>12.2f} {server_cpu / a.duration:>12.2f}",
                      flush=True)
        finally:
            _stop(procs)

        wrk = rest_load.ensure_wrk()
        port, procs = _servers(_http_server, a.servers)
        try:
            for workload in ("rest_track", "rest_batch"):
                path, per_request, bodies = data.rest_workload(workload)
                f = Path(tmp) / f"{workload}.jsonl"
                f.write_text("\n".join(bodies) + "\n")
                conc = DEFAULT_CONCURRENCY[workload]
                args = (wrk, f"http://127.0.0.1:{port}", path, f, "calibration")
                rest_load.timed_wrk(*args, connections=conc, duration_s=a.warmup)
                pids = [p.pid for p in procs]
                cpu0 = cpu_seconds(pids)
                r = rest_load.timed_wrk(*args, connections=conc, duration_s=a.duration)
                server_cpu = cpu_seconds(pids) - cpu0
                rate = r.ok_requests / r.duration_s
                print(f"{workload:12} {rate:>10,.0f} {rate * per_request:>11,.0f} {r.p50_ms:>8.2f} {r.p99_ms:>8.2f} "
                      f"{conc:>9} {r.cpu_s / r.duration_s:>12.2f} {server_cpu / r.duration_s:>12.2f}", flush=True)
        finally:
            _stop(procs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
