"""Helpers of the feed tests: StreamEvents readers and a look at the stream itself."""

from __future__ import annotations

import asyncio
import queue
import threading
import time

import grpc
import nats

from flameup.events.v1 import events_pb2 as pb
from service.feed.subjects import DEFAULT_STREAM

WAIT = 60.0  # how long a test waits for what it expects (a bound, not a measurement)


class Reader:
    """A StreamEvents call read on a thread; ``take(n)`` waits for n more responses."""

    def __init__(self, stub, metadata, request: pb.StreamEventsRequest) -> None:
        self.call = stub.StreamEvents(request, metadata=metadata)
        self.call.initial_metadata()  # the call is accepted: every event stored from now on is in it
        self.queue: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for response in self.call:
                self.queue.put(response)
        except grpc.RpcError as exc:
            self.queue.put(exc)

    def take(self, n: int, timeout: float = WAIT) -> list[pb.StreamEventsResponse]:
        out = []
        deadline = time.monotonic() + timeout
        while len(out) < n:
            item = self.queue.get(timeout=max(0.01, deadline - time.monotonic()))
            if isinstance(item, Exception):
                raise item
            out.append(item)
        return out

    def nothing_more(self, settle: float = 1.0) -> bool:
        """True when no response came within ``settle`` seconds."""
        try:
            item = self.queue.get(timeout=settle)
        except queue.Empty:
            return True
        self.queue.put(item)
        return False

    def close(self) -> None:
        self.call.cancel()
        self.thread.join(10)


def stream_ids(nats_url: str, stream: str = DEFAULT_STREAM, subject: str = "flameup.events.>",
               expect: set[str] | None = None, timeout: float = WAIT) -> list[str]:
    """The Nats-Msg-Id of every message on the stream (in stream order); with ``expect``,
    waits until all of those are there."""

    async def read() -> list[str]:
        nc = await nats.connect(nats_url)
        try:
            js = nc.jetstream()
            deadline = time.monotonic() + timeout
            while True:
                ids: list[str] = []
                info = await js.stream_info(stream)
                seq = info.state.first_seq
                sub = await js.subscribe(subject, ordered_consumer=True, stream=stream)
                try:
                    while seq <= info.state.last_seq:
                        try:
                            msg = await sub.next_msg(timeout=2)
                        except nats.errors.TimeoutError:
                            break  # no more of this subject
                        ids.append(msg.headers["Nats-Msg-Id"])
                        seq = msg.metadata.sequence.stream + 1
                finally:
                    await sub.unsubscribe()
                if expect is None or expect <= set(ids) or time.monotonic() > deadline:
                    return ids
                await asyncio.sleep(0.5)
        finally:
            await nc.close()

    return asyncio.run(read())
