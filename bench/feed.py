"""The feed's workloads: ``feed_lag`` and ``feed_drain``.

- ``feed_lag``: TrackBatch calls paced at a given rate (half of the store's
  ``grpc_batch`` in the same run) while a JetStream consumer on the bench
  workspace's subjects notes when each event arrives; the lag of an event is
  from the moment its call was acknowledged to the moment the consumer got it
  (one process, one clock). An event that arrives before its call's answer
  counts 0.
- ``feed_drain``: the service starts on a store holding a backlog the feed has
  not published, and a marker event is tracked after it; the rate is the
  backlog's messages over the time between the stream's own timestamps of its
  first message and of the marker.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass

import grpc
import nats
from nats.js.api import ConsumerConfig, DeliverPolicy

from bench.data import BATCH_SIZE, WORKSPACE, grpc_batch_payloads
from bench.metrics import percentile
from flameup.events.v1 import events_pb2 as pb
from service.feed.subjects import DEFAULT_STREAM

PACE_CONCURRENCY = 16  # calls in flight at most; the pace, not this, sets the rate


@dataclass
class LagResult:
    events: int
    rate: float  # events/s sent in the window
    p50_ms: float
    p99_ms: float
    max_ms: float
    missing: int  # acknowledged in the window, never seen on the stream


def measure_lag(grpc_target: str, key: str, nats_url: str, rate: float, warmup: float, duration: float) -> LagResult:
    return asyncio.run(_lag(grpc_target, key, nats_url, rate, warmup, duration))


async def _lag(grpc_target: str, key: str, nats_url: str, rate: float, warmup: float, duration: float) -> LagResult:
    payloads = grpc_batch_payloads(200)
    acked: dict[str, float] = {}
    seen: dict[str, float] = {}
    nc = await nats.connect(nats_url)
    sub = await nc.jetstream().subscribe(
        f"flameup.events.{WORKSPACE}.>",
        stream=DEFAULT_STREAM,
        ordered_consumer=True,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.NEW),
        pending_msgs_limit=-1,
        pending_bytes_limit=-1,
    )

    async def consume() -> None:
        async for msg in sub.messages:
            seen.setdefault(msg.headers["Nats-Msg-Id"], time.monotonic())

    consumer = asyncio.create_task(consume())
    channel = grpc.aio.insecure_channel(grpc_target)
    call = channel.unary_unary("/flameup.events.v1.EventsService/TrackBatch")
    metadata = (("authorization", f"Bearer {key}"),)
    interval = BATCH_SIZE / rate
    start = time.monotonic() + 0.5
    measure_from, end = start + warmup, start + warmup + duration
    measured: list[str] = []
    slots = itertools.count()
    errors = 0

    async def worker() -> None:
        """Takes the next slot of the pace, waits for its time, sends its batch."""
        nonlocal errors
        while (at := start + (i := next(slots)) * interval) < end:
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            try:
                reply = pb.TrackBatchResponse.FromString(await call(payloads[i % len(payloads)], metadata=metadata))
            except grpc.aio.AioRpcError:
                errors += 1
                continue
            now = time.monotonic()
            for event_id in reply.event_ids:
                acked[event_id] = now
            if measure_from <= at:
                measured.extend(reply.event_ids)

    await asyncio.gather(*(worker() for _ in range(PACE_CONCURRENCY)))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(e not in seen for e in measured[-1000:]):
        await asyncio.sleep(0.1)
    await asyncio.sleep(1)
    consumer.cancel()
    await sub.unsubscribe()
    await nc.close()
    await channel.close()
    lags = sorted(max(0.0, seen[e] - acked[e]) * 1000 for e in measured if e in seen)
    if errors:
        raise RuntimeError(f"{errors} TrackBatch calls failed during feed_lag")
    return LagResult(
        len(measured),
        len(measured) / duration,
        percentile(lags, 50),
        percentile(lags, 99),
        lags[-1] if lags else 0.0,
        sum(e not in seen for e in measured),
    )


@dataclass
class DrainResult:
    events: int
    seconds: float

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0


MARKER = "bench_drain_marker"


def last_seq(nats_url: str) -> int:
    """The stream's last sequence now (0: no stream yet)."""

    async def read() -> int:
        nc = await nats.connect(nats_url)
        try:
            return (await nc.jetstream().stream_info(DEFAULT_STREAM)).state.last_seq
        except nats.js.errors.NotFoundError:
            return 0
        finally:
            await nc.close()

    return asyncio.run(read())


def measure_drain(nats_url: str, grpc_target: str, key: str, first_seq: int, timeout: float = 900.0) -> DrainResult:
    """The service has just started on a store with a backlog, which the stream takes from
    ``first_seq`` on: tracks a marker event (stored after the whole backlog), waits for it
    on the stream, and takes the rate from the stream's own times of the backlog's first
    message and the marker."""
    return asyncio.run(_drain(nats_url, grpc_target, key, first_seq, timeout))


async def _drain(nats_url: str, grpc_target: str, key: str, first_seq: int, timeout: float) -> DrainResult:
    async with grpc.aio.insecure_channel(grpc_target) as channel:
        track = channel.unary_unary(
            "/flameup.events.v1.EventsService/Track",
            request_serializer=pb.TrackRequest.SerializeToString,
            response_deserializer=pb.TrackResponse.FromString,
        )
        await track(pb.TrackRequest(external_id="bench_drain", event=MARKER),
                    metadata=(("authorization", f"Bearer {key}"),), timeout=30)
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            try:
                marker = await js.get_last_msg(DEFAULT_STREAM, f"flameup.events.{WORKSPACE}.{MARKER}")
            except nats.js.errors.NotFoundError:
                await asyncio.sleep(0.1)
                continue
            first = await js.get_msg(DEFAULT_STREAM, first_seq)
            return DrainResult(marker.seq - first_seq, (marker.time - first.time).total_seconds())
    finally:
        await nc.close()
    raise RuntimeError(f"the feed did not publish its backlog within {timeout:.0f} s")
