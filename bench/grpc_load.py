"""The gRPC load generator: several processes, each a grpc.aio channel with N calls in flight.

Design (why it is not the bottleneck):
- Requests are serialized protobuf bytes built before the run; the multicallable
  has no serializer, so the client does no protobuf work per call. A response
  is checked by its first two bytes (``success = true`` is field 1, serialized
  first as 08 01) and only parsed when that check fails.
- Each process runs grpc.aio on uvloop, as the service's workers do (about 8%
  less client CPU per call than asyncio's own loop against the service).
- Each process runs ``concurrency`` coroutines in a closed loop (send, await,
  send again) spread over a few channels (own TCP connections, so the kernel's
  SO_REUSEPORT spreads them over the service's workers); no Python threads, no
  per-call retries or deadlines (each costs CPU per call), no allocation per
  call beyond grpc's own.
- All processes share one schedule on CLOCK_MONOTONIC (system-wide on Linux):
  warm-up until ``measure_at``, measure until ``end_at``. Calls that complete
  inside the window count (throughput and latency); each process reports the
  CPU time it used inside the window, so the client's share of the machine is
  known.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import pickle
import time
from dataclasses import dataclass, field

import grpc
import uvloop

from bench.data import MESSAGE_TAG, MESSAGE_TAG_CHARS
from flameup.events.v1 import events_pb2 as pb

SUCCESS_PREFIX = b"\x08\x01"  # field 1 (bool success) = true, serialized first
RESPONSE_TYPES = {"Track": pb.TrackResponse, "TrackBatch": pb.TrackBatchResponse}


@dataclass
class ClientJob:
    target: str
    method: str  # "Track" or "TrackBatch"
    key: str
    payloads_file: str  # pickled list[bytes]: keeps the spawn arguments small
    events_per_call: int
    concurrency: int
    warmup_s: float
    duration_s: float
    offset: int = 0  # where this process starts in the payload pool
    # Payloads with message_ids (grpc_batch_msgid): this process's number, so that its
    # calls' ids differ from every other process's; with ``replay_calls``, the
    # process sends its first ``replay_calls`` calls of that run again, round and
    # round (grpc_batch_replay: every event a duplicate).
    message_ids: int | None = None
    replay_calls: int = 0
    channels: int = 64  # connections per process; the in-flight calls are spread over them
    timeout: float = 30.0  # how long after the window a call may still be unanswered


@dataclass
class ClientResult:
    calls: int = 0  # completed successfully inside the window
    events: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    acknowledged_events: int = 0  # all successful calls, warm-up included (for the stored-rows check)
    errors: int = 0  # failed calls or responses with success = false, any time
    first_error: str = ""
    sequence: int = 0  # calls made with message_ids, warm-up included (what a replay sends again)
    cpu_s: float = 0.0  # this process's CPU time inside the window


def _client_main(job: ClientJob, conn) -> None:
    """Entry point of one client process: connect, say ready, get the schedule, run, report."""
    try:
        conn.send(uvloop.run(_client(job, conn)))
    except BaseException as exc:  # report, never hang the parent
        conn.send(exc)
        raise


async def _client(job: ClientJob, conn) -> ClientResult:
    result = ClientResult()
    # No retries (a failed call is counted, never hidden) and no per-call deadline: both cost the
    # client (and the server) CPU per call: with both on, a process drives about half the calls/s
    # against a do-nothing server (python -m bench.calibrate).
    # The run as a whole is bounded instead (the asyncio.wait below).
    options = [("grpc.max_receive_message_length", 16 * 1024 * 1024), ("grpc.enable_retries", 0),
               ("grpc.enable_http_proxy", 0)]
    # Several connections per process: the service's workers share one port through
    # SO_REUSEPORT, and the kernel places each connection on a worker by a hash, so a
    # few connections can leave one worker with most of the calls and make runs disagree.
    # With 64 per process (as many clients would open) the workers' CPU differs by about
    # a tenth of a core at most; the per-worker CPU the benchmark prints shows the spread.
    # A local subchannel pool makes each channel its own TCP connection.
    channels = [grpc.aio.insecure_channel(job.target, options=[*options, ("grpc.use_local_subchannel_pool", 1)])
                for _ in range(job.channels)]
    try:
        for channel in channels:
            await asyncio.wait_for(channel.channel_ready(), 30)
        calls = [channel.unary_unary(f"/flameup.events.v1.EventsService/{job.method}")  # bytes in, bytes out
                 for channel in channels]
        metadata = (("authorization", f"Bearer {job.key}"),)
        with open(job.payloads_file, "rb") as f:
            payloads = pickle.load(f)
        n = len(payloads)
        conn.send("ready")
        measure_at, end_at = conn.recv()  # the same schedule for every process
        response_type = RESPONSE_TYPES[job.method]
        latencies = result.latencies_ms
        monotonic = time.monotonic

        def tagged(seq: int) -> bytes:
            """Call ``seq``'s request: its payload with the ids made this call's own."""
            if job.replay_calls:
                seq %= job.replay_calls
            tag = b"%02x%06x" % (job.message_ids, seq)
            assert len(tag) == MESSAGE_TAG_CHARS
            return payloads[(job.offset + seq) % n].replace(MESSAGE_TAG, tag)

        expect_duplicates = bool(job.replay_calls)

        async def loop(worker: int) -> None:
            i = job.offset + worker * 7
            while True:
                start = monotonic()
                if start >= end_at:
                    return
                i += 1
                if job.message_ids is None:
                    payload = payloads[i % n]
                else:
                    payload = tagged(result.sequence)
                    result.sequence += 1
                try:
                    # round-robin over the connections, so every one carries load even at low concurrency
                    response = await calls[i % len(calls)](payload, metadata=metadata)
                except grpc.aio.AioRpcError as exc:
                    result.errors += 1
                    result.first_error = result.first_error or f"{exc.code().name}: {exc.details()}"
                    await asyncio.sleep(0.01)  # a failing server must not turn the loop into a spin
                    continue
                done = monotonic()
                if response[:2] != SUCCESS_PREFIX and not response_type.FromString(response).success:
                    result.errors += 1
                    result.first_error = result.first_error or f"success=false: {response_type.FromString(response)}"
                    continue
                if job.message_ids is not None:  # every event new, or (a replay) every one a duplicate
                    duplicates = len(response_type.FromString(response).duplicates)
                    if duplicates != (job.events_per_call if expect_duplicates else 0):
                        result.errors += 1
                        result.first_error = result.first_error or f"{duplicates} duplicates in a batch"
                        continue
                result.acknowledged_events += job.events_per_call
                if measure_at <= done <= end_at:
                    result.calls += 1
                    latencies.append((done - start) * 1000.0)

        async def cpu_window() -> None:
            await asyncio.sleep(max(0.0, measure_at - monotonic()))
            cpu0 = time.process_time()  # all threads of this process, grpc's own included
            await asyncio.sleep(max(0.0, end_at - monotonic()))
            result.cpu_s = time.process_time() - cpu0

        loops = [asyncio.ensure_future(loop(w)) for w in range(job.concurrency)]
        await cpu_window()
        done, stuck = await asyncio.wait(loops, timeout=max(0.0, end_at - monotonic()) + job.timeout)
        for task in stuck:  # a call still unanswered `timeout` seconds after the window: a failure
            task.cancel()
            result.errors += 1
            result.first_error = result.first_error or f"no answer within {job.timeout:g} s after the run"
        for task in done:
            task.result()  # re-raise a bug in the loop itself
    finally:
        for channel in channels:
            await channel.close()
    result.events = result.calls * job.events_per_call
    return result


class Clients:
    """The client processes of one workload (spawned: grpc and fork do not mix).

    ``start`` returns once every process is connected and has its schedule:
    warm-up until ``measure_at``, measured until ``end_at`` (CLOCK_MONOTONIC,
    shared by all processes on Linux).
    """

    def __init__(self, jobs: list[ClientJob]) -> None:
        self.jobs = jobs
        self.measure_at = self.end_at = 0.0
        ctx = multiprocessing.get_context("spawn")
        self._pipes = []
        self._procs = []
        for job in jobs:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_client_main, args=(job, child), daemon=True)
            self._pipes.append(parent)
            self._procs.append(proc)

    def _recv(self, pipe, timeout: float):
        if not pipe.poll(timeout):
            raise TimeoutError("a gRPC client process did not answer in time")
        try:
            message = pipe.recv()
        except EOFError:
            raise RuntimeError("a gRPC client process exited without an answer (see its traceback above)") from None
        if isinstance(message, BaseException):
            raise RuntimeError(f"a gRPC client process failed: {message!r}") from message
        return message

    def start(self) -> None:
        for proc in self._procs:
            proc.start()
        for pipe in self._pipes:
            self._recv(pipe, 60)
        job = self.jobs[0]
        self.measure_at = time.monotonic() + job.warmup_s
        self.end_at = self.measure_at + job.duration_s
        for pipe in self._pipes:
            pipe.send((self.measure_at, self.end_at))

    def results(self) -> list[ClientResult]:
        timeout = max(0.0, self.end_at - time.monotonic()) + self.jobs[0].timeout + 30
        try:
            return [self._recv(pipe, timeout) for pipe in self._pipes]
        finally:
            for proc in self._procs:
                proc.join(10)
                if proc.is_alive():
                    proc.kill()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]
