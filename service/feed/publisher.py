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
from service.feed.outbox import Outbox, Position, open_outbox
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
STREAM_NAME_IN_USE = 10058


async def connect(url: str, name: str) -> nats.NATS:
    """A connection that reconnects forever and buffers nothing while it does."""
    while True:
        try:
            return await nats.connect(
                url,
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


class Publisher:
    def __init__(self, outbox: Outbox, js, settings: StreamSettings) -> None:
        self.outbox = outbox
        self.js = js
        self.settings = settings
        self.published = 0

    async def publish(self, events: list[StoredEvent]) -> None:
        """Every event on the stream, or an exception."""
        acks: list[asyncio.Future] = []
        try:
            for e in events:
                acks.append(
                    await self.js.publish_async(
                        event_subject(e.workspace_id, e.event), event_json(e), headers={"Nats-Msg-Id": e.event_id}
                    )
                )
            await asyncio.wait_for(asyncio.gather(*acks), ACK_TIMEOUT)
        finally:
            for ack in acks:  # a cancelled ack gives its slot of the publish window back
                ack.cancel()

    async def run(self, stop: asyncio.Event) -> None:
        position = await self.outbox.checkpoint()
        saved, saved_at = position, time.monotonic()
        acked: collections.deque[tuple[float, Position]] = collections.deque()  # (when, position) not yet saved
        while not stop.is_set():
            if not await self.outbox.lead():
                await _wait(stop, RETRY_SECONDS)
                position = saved = await self.outbox.checkpoint()
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
                window = await self.outbox.after(position)
            except Exception as exc:  # noqa: BLE001 - the store is unreachable: try again
                log.warning("reading the outbox failed (%s: %s); retrying", type(exc).__name__, exc)
                await _wait(stop, RETRY_SECONDS)
                continue
            if not window.events:  # nothing new; the outbox may still have moved past empty ground
                if window.position == position:
                    await self.outbox.wait_for_more(CHECKPOINT_EVERY if acked else IDLE_WAIT)
                else:
                    position = window.position
                    acked.append((time.monotonic(), position))
                continue
            try:
                await self.publish(window.events)
            except Exception as exc:  # noqa: BLE001 - unreachable, timeout, stream error: retry the window
                log.warning(
                    "publishing %d events failed (%s: %s); retrying", len(window.events), type(exc).__name__, exc
                )
                await _wait(stop, RETRY_SECONDS)
                continue
            self.outbox.published(window)
            position = window.position
            acked.append((time.monotonic(), position))
            self.published += len(window.events)


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
        await Publisher(outbox, js, settings).run(stop)
    finally:
        await nc.close()
        await outbox.close()
