"""The publisher process (``python -m service feed-publisher``): the outbox onto JetStream.

``serve`` starts one per instance (and starts it again when it dies). It
declares the stream, then loops: read the events stored after the checkpoint
(in store order), publish them with a window of outstanding acks, and once
JetStream acknowledged all of them move the checkpoint past them. A failed
window (NATS unreachable, a timeout) is published again from the checkpoint:
``Nats-Msg-Id`` is the event id, so JetStream drops what it already has within
its duplicate window. Ingest never waits for any of this; while NATS is away
the events wait in the store and go out when it is back.

The connection buffers nothing while it reconnects (``pending_size=0``): a
publish then fails at once, so a window never half-reaches the stream across
a reconnect, and events of one person reach the stream in the order they were
stored.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import signal
import time
from collections.abc import Callable

import nats
from nats.js import api
from nats.js.errors import BadRequestError

from service.domain import StoredEvent
from service.feed.outbox import Outbox, Position, Window, open_outbox
from service.feed.render import event_json
from service.feed.subjects import StreamSettings, deletion_subject, event_subject

log = logging.getLogger("flameup.feed.publisher")

ACK_TIMEOUT = 10.0
RETRY_SECONDS = 0.5
CHECKPOINT_EVERY = 0.2  # seconds between checkpoint saves
# The saved checkpoint trails JetStream's acks by more than the local server's
# sync_interval (natsd.DEFAULT_SYNC_INTERVAL): what a machine crash may take from the
# stream is published again. A restart republishes this much; the duplicate window drops it.
CHECKPOINT_LAG = 2.0
IDLE_WAIT = 1.0
MAX_WINDOWS = 4  # windows published and not yet acknowledged, at most
STREAM_NAME_IN_USE = 10058
ATOMIC_DUPLICATE = 10201  # "atomic publish batch contains duplicate message id"


async def connect(url: str, name: str) -> nats.NATS:
    """A connection that reconnects forever and buffers nothing while it does."""
    while True:
        try:
            return await nats.connect(
                [u.strip() for u in url.split(",") if u.strip()],  # one server or several, comma separated
                name=name,
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.25,
                connect_timeout=2,
                pending_size=0,
            )
        except Exception as exc:  # noqa: BLE001 - unreachable, refused, DNS: try again
            log.warning("NATS at %s unreachable (%s); retrying", url, exc)
            await asyncio.sleep(RETRY_SECONDS)


def stream_config(settings: StreamSettings) -> api.StreamConfig:
    return api.StreamConfig(
        name=settings.name,
        subjects=settings.subjects,
        retention=api.RetentionPolicy.LIMITS,
        storage=api.StorageType.FILE,
        discard=api.DiscardPolicy.OLD,
        max_age=settings.max_age_s,
        duplicate_window=settings.duplicate_window_s,
        num_replicas=settings.replicas,
        allow_atomic=True,  # a window is one atomic batch (nats-server 2.12 or later)
    )


async def declare_stream(js, settings: StreamSettings) -> None:
    """Create the stream, or bring an existing one to these settings."""
    config = stream_config(settings)
    try:
        await js.add_stream(config)
    except BadRequestError as exc:
        if exc.err_code != STREAM_NAME_IN_USE:
            raise
        await js.update_stream(config)


async def publish_deletion(js, workspace_id: str, person_id: str, deleted_events: int, notice_id: str) -> None:
    """A deletion notice on ``flameup.deletions.<workspace_id>`` (``Nats-Msg-Id``: ``notice_id``)."""
    import orjson

    body = orjson.dumps({"workspace_id": workspace_id, "person_id": person_id, "deleted_events": deleted_events})
    await js.publish(deletion_subject(workspace_id), body, headers={"Nats-Msg-Id": notice_id}, timeout=ACK_TIMEOUT)


class PublishFailed(Exception):
    """JetStream refused a message or a batch, or did not answer in time."""


class _Acks:
    """JetStream's answers to the windows in flight, on one subscription.

    Every answer of window w comes on ``<inbox>.<w>``; the window is done when all
    its answers came without an error, and its future gives how many of them said
    the message was a duplicate. Cheaper per message than a future each (nats-py's
    publish_async), which the drain's rate feels.
    """

    def __init__(self, nc: nats.NATS) -> None:
        self.nc = nc
        self.prefix = nc.new_inbox()
        self._windows: dict[int, tuple[asyncio.Future, list[int]]] = {}  # w -> (done, [owed, duplicates])
        self._next = 0

    async def start(self) -> None:
        await self.nc.subscribe(self.prefix + ".*", cb=self._on_answer)

    def expect(self, answers: int) -> tuple[str, asyncio.Future]:
        """A new window owed ``answers`` answers: its reply subject and its future."""
        w, self._next = self._next, self._next + 1
        done = asyncio.get_running_loop().create_future()
        self._windows[w] = (done, [answers, 0])
        done.add_done_callback(lambda _: self._windows.pop(w, None))
        return f"{self.prefix}.{w}", done

    async def _on_answer(self, msg) -> None:
        entry = self._windows.get(int(msg.subject.rpartition(".")[2]))
        if entry is None or entry[0].done():
            return
        done, state = entry
        if b'"error"' in msg.data or not msg.data:  # an API error, or a status (no responders: no stream)
            status = (msg.headers or {}).get("Status", "")
            done.set_exception(PublishFailed(msg.data.decode(errors="replace")[:300] or f"status {status}"))
            return
        state[0] -= 1
        if b'"duplicate":true' in msg.data:
            state[1] += 1
        if not state[0]:
            done.set_result(state[1])


class Publisher:
    """Windows of the outbox onto the stream, up to MAX_WINDOWS in flight on one connection.

    A window goes as one atomic batch (JetStream's allow_atomic: stored whole or not at
    all, one answer), so a failed window never leaves part of itself on the stream. An
    atomic batch refuses a message id the stream already has, which happens only when
    events are published again (after a crash, a failure, a new leader): until a window
    comes back with no duplicate, windows go one at a time, message by message, and
    JetStream drops the duplicates one by one.

    The checkpoint moves past a window only when it and every window before it were
    acknowledged; on a failure every window in flight is dropped and the outbox is read
    again from there.
    """

    def __init__(self, outbox: Outbox, nc: nats.NATS, settings: StreamSettings) -> None:
        self.outbox = outbox
        self.nc = nc
        self.settings = settings
        self.acks = _Acks(nc)
        self.batch_prefix = nc.new_inbox().rpartition(".")[2]  # batch ids unique to this publisher
        self.published = 0

    async def send(self, events: list[StoredEvent], atomic: bool) -> asyncio.Future:
        """Publish every event; the future gives the number of duplicates once JetStream
        acknowledged them all."""
        reply, done = self.acks.expect(1 if atomic else len(events))
        batch = f"{self.batch_prefix}-{reply.rpartition('.')[2]}"
        last = len(events)
        try:
            for i, e in enumerate(events, 1):
                headers = {"Nats-Msg-Id": e.event_id}
                if atomic:
                    headers["Nats-Batch-Id"] = batch
                    headers["Nats-Batch-Sequence"] = str(i)
                    if i == last:
                        headers["Nats-Batch-Commit"] = "1"
                await self.nc.publish(
                    event_subject(e.workspace_id, e.event),
                    event_json(e),
                    reply=reply if not atomic or i == last else "",
                    headers=headers,
                )
        except BaseException:
            done.cancel()
            raise
        return done

    async def publish(self, events: list[StoredEvent], atomic: bool = True) -> int:
        """Every event on the stream (or an exception); how many were duplicates."""
        return await asyncio.wait_for(await self.send(events, atomic), ACK_TIMEOUT)

    async def run(self, stop: asyncio.Event) -> None:
        await self.acks.start()
        position = read = await self.outbox.checkpoint()  # acknowledged up to; read up to
        saved, saved_at = position, time.monotonic()
        acked: collections.deque[tuple[float, Position]] = collections.deque()  # (when, position) not yet saved
        inflight: collections.deque[tuple[Window, asyncio.Future]] = collections.deque()
        recovering = True  # events may be on the stream already: one window at a time, message by message

        def drop_inflight() -> None:
            for _, done in inflight:
                done.cancel()
            inflight.clear()

        while not stop.is_set():
            if not await self.outbox.lead():
                drop_inflight()
                await _wait(stop, RETRY_SECONDS)
                position = read = saved = await self.outbox.checkpoint()
                acked.clear()
                continue
            now = time.monotonic()
            if now - saved_at >= CHECKPOINT_EVERY:
                durable = saved
                while acked and acked[0][0] <= now - CHECKPOINT_LAG:
                    durable = acked.popleft()[1]
                if durable != saved:
                    await self.outbox.save_checkpoint(durable)
                    saved = durable
                saved_at = now
            try:
                room = len(inflight) < (1 if recovering else MAX_WINDOWS)
                window = await self.outbox.after(read) if room else None
                if window is not None and window.events:
                    inflight.append((window, await self.send(window.events, atomic=not recovering)))
                    read = window.position
                    continue
                if not inflight:  # nothing new; the outbox may still have moved past empty ground
                    assert window is not None
                    if window.position == read:
                        await self.outbox.wait_for_more(CHECKPOINT_EVERY if acked else IDLE_WAIT)
                    else:
                        position = read = window.position
                        acked.append((time.monotonic(), position))
                    continue
                done_window, done = inflight[0]
                duplicates = await asyncio.wait_for(asyncio.shield(done), ACK_TIMEOUT)
            except Exception as exc:  # noqa: BLE001 - unreachable, timeout, refused, store down: again from here
                duplicate_batch = isinstance(exc, PublishFailed) and str(ATOMIC_DUPLICATE) in str(exc)
                if not duplicate_batch:
                    log.warning(
                        "publishing failed (%s: %s); again from the last acknowledged event", type(exc).__name__, exc
                    )
                drop_inflight()
                read = position
                recovering = True
                if not duplicate_batch:
                    await _wait(stop, RETRY_SECONDS)
                continue
            recovering = recovering and duplicates > 0
            inflight.popleft()
            self.outbox.published(done_window)
            position = done_window.position
            acked.append((time.monotonic(), position))
            self.published += len(done_window.events)
        drop_inflight()


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        pass


async def serve_publisher(
    store_url: str,
    nats_url: str,
    settings: StreamSettings,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[], None] | None = None,
) -> None:
    """Publish until SIGTERM/SIGINT (or ``stop``)."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    outbox = open_outbox(store_url, settings.name)
    await outbox.open()
    nc = await connect(nats_url, "flameup-feed-publisher")
    try:
        js = nc.jetstream()
        while True:
            try:
                await declare_stream(js, settings)
                break
            except Exception as exc:  # noqa: BLE001 - JetStream not ready yet
                log.warning("declaring stream %s failed (%s); retrying", settings.name, exc)
                await asyncio.sleep(RETRY_SECONDS)
        if on_ready is not None:
            on_ready()
        await Publisher(outbox, nc, settings).run(stop)
    finally:
        await nc.close()
        await outbox.close()
