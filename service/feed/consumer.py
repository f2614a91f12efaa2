"""One StreamEvents call's view of the feed stream.

Each call gets an ephemeral pull consumer (memory state, no acks, filtered
to the caller's workspace and event names, removed when the call ends or
after ``INACTIVE_SECONDS`` if the worker died) and pulls at most
``PULL_BATCH`` messages ahead of what the caller has taken: a slow or
stalled client holds that much in this worker and nothing anywhere else,
and it slows neither ingest (the publisher never waits for consumers) nor
the other consumers (each has its own). When NATS goes away mid-call, the
call carries on from its last delivered message once it is back.

The cursor is ``<stream sequence>-<last 8 hex digits of the event id>``: the
sequence says where to resume, the digits check that the cursor names the
event the stream holds there (not one of another stream, or one the stream
no longer has).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass

import nats
from nats.aio.msg import Msg
from nats.js import api
from nats.js.errors import NotFoundError

from service.feed.publisher import RETRY_SECONDS, connect
from service.feed.subjects import SUBJECT_PREFIX, StreamSettings, event_filters

log = logging.getLogger(__name__)

PULL_BATCH = 256
PULL_EXPIRES_S = 10.0
HEARTBEAT_S = 2.0
INACTIVE_SECONDS = 30.0
GIVE_UP_SECONDS = 30.0  # NATS unreachable this long mid-call: the call ends UNAVAILABLE
_CURSOR = re.compile(r"([1-9][0-9]{0,19})-([0-9a-f]{8})")


class FeedUnavailable(Exception):
    """The feed (NATS) cannot be reached or is off (gRPC UNAVAILABLE)."""


class CursorError(ValueError):
    """A cursor that cannot be resumed; ``out_of_range``: older than the stream keeps."""

    def __init__(self, message: str, *, out_of_range: bool = False) -> None:
        super().__init__(message)
        self.out_of_range = out_of_range


@dataclass(frozen=True, slots=True)
class FeedMessage:
    body: bytes  # the event's JSON
    cursor: str


def make_cursor(stream_seq: int, event_id: str) -> str:
    return f"{stream_seq}-{event_id[-8:]}"


def parse_cursor(cursor: str) -> tuple[int, str]:
    m = _CURSOR.fullmatch(cursor)
    if m is None:
        raise CursorError("not a cursor of this feed (use the cursor of a StreamEvents response)")
    return int(m.group(1)), m.group(2)


class Feed:
    """A worker's connection to the feed stream (connected in the background)."""

    def __init__(self, url: str, settings: StreamSettings) -> None:
        self.url = url
        self.settings = settings
        self._nc: nats.NATS | None = None
        self._connecting: asyncio.Task | None = None

    async def start(self) -> None:
        self._connecting = asyncio.create_task(self._connect())

    async def _connect(self) -> None:
        self._nc = await connect(self.url, "flameup-stream-events")

    async def close(self) -> None:
        if self._connecting is not None and not self._connecting.done():
            self._connecting.cancel()
        if self._nc is not None:
            await self._nc.close()

    def _js(self):
        if self._nc is None or not self._nc.is_connected:
            raise FeedUnavailable("the feed's NATS server is unreachable; retry later")
        return self._nc.jetstream()

    async def start_sequence(self, workspace_id: str, after: str, since_rfc3339: str | None) -> int | str:
        """Where a call starts: a stream sequence, or a time (RFC 3339) given as ``since``.

        Neither ``after`` nor ``since``: the sequence after the stream's last message
        now, so every event stored from now on is in the call. Raises CursorError for a
        cursor it cannot resume from, FeedUnavailable when NATS is away.
        """
        if since_rfc3339 is not None and not after:
            return since_rfc3339
        js = self._js()
        try:
            info = await js.stream_info(self.settings.name)
            if not after:
                return info.state.last_seq + 1
            seq, check = parse_cursor(after)
            if seq + 1 < (info.state.first_seq or 1):
                raise CursorError(
                    "the cursor is older than the feed keeps (its retention); start from a"
                    " time with since, or from now",
                    out_of_range=True,
                )
            if seq > info.state.last_seq:
                raise CursorError("the cursor is ahead of the feed stream (not one of its cursors)")
            try:
                msg = await js.get_msg(self.settings.name, seq)
            except NotFoundError:
                return seq + 1  # removed by retention since: nothing after it is lost
        except (nats.errors.Error, TimeoutError) as exc:
            raise FeedUnavailable(f"the feed's NATS server is unreachable ({exc}); retry later") from exc
        event_id = (msg.headers or {}).get("Nats-Msg-Id", "")
        if not event_id.endswith(check) or not msg.subject.startswith(f"{SUBJECT_PREFIX}.{workspace_id}."):
            raise CursorError("not a cursor of this workspace's feed")
        return seq + 1

    async def messages(self, workspace_id: str, events: list[str], start: int | str) -> AsyncIterator[FeedMessage]:
        """The workspace's events from ``start`` (see start_sequence), as they reach the stream."""
        filters = event_filters(workspace_id, events)
        next_seq: int | str = start
        failing_since: float | None = None
        loop = asyncio.get_running_loop()
        while True:
            try:
                async for seq, msg in self._pull(filters, next_seq):
                    failing_since = None
                    next_seq = seq + 1
                    yield FeedMessage(msg.data, make_cursor(seq, (msg.headers or {}).get("Nats-Msg-Id", "")))
            except (nats.errors.Error, TimeoutError, FeedUnavailable) as exc:
                now = loop.time()
                failing_since = failing_since or now
                if now - failing_since > GIVE_UP_SECONDS:
                    raise FeedUnavailable(f"the feed's NATS server is unreachable ({exc}); resume later") from exc
                log.info("StreamEvents: pulling failed (%s); resuming", exc)
                await asyncio.sleep(RETRY_SECONDS)

    async def _pull(self, filters: list[str], start: int | str) -> AsyncIterator[tuple[int, Msg]]:
        js = self._js()
        nc = self._nc
        assert nc is not None
        config = api.ConsumerConfig(
            ack_policy=api.AckPolicy.NONE,
            mem_storage=True,
            num_replicas=1,
            inactive_threshold=INACTIVE_SECONDS,
        )
        if len(filters) == 1:
            config.filter_subject = filters[0]
        else:
            config.filter_subjects = filters
        if isinstance(start, int):
            config.deliver_policy, config.opt_start_seq = api.DeliverPolicy.BY_START_SEQUENCE, start
        else:
            config.deliver_policy = api.DeliverPolicy.BY_START_TIME
            config.opt_start_time = start  # type: ignore[assignment]  # RFC 3339, sent as it is
        info = await js._jsm.add_consumer(self.settings.name, config=config)
        consumer = info.name
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox, pending_msgs_limit=4 * PULL_BATCH, pending_bytes_limit=-1)
        next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{self.settings.name}.{consumer}"
        request = json.dumps(
            {"batch": PULL_BATCH, "expires": int(PULL_EXPIRES_S * 1e9), "idle_heartbeat": int(HEARTBEAT_S * 1e9)}
        ).encode()
        credit = 0  # messages still owed by the outstanding pull requests
        try:
            while True:
                if credit <= PULL_BATCH // 2:
                    await nc.publish(next_subject, request, reply=inbox)
                    credit += PULL_BATCH
                msg = await sub.next_msg(timeout=3 * HEARTBEAT_S)
                status = (msg.headers or {}).get("Status") if msg.headers else None
                if status == "100":  # idle heartbeat
                    continue
                if status in ("408", "409"):  # a request expired or ended: its rest is not owed
                    pending = (msg.headers or {}).get("Nats-Pending-Messages")
                    credit = max(0, credit - int(pending)) if pending else 0
                    if status == "409" and "Deleted" in (msg.headers or {}).get("Description", ""):
                        raise FeedUnavailable("the stream's consumer is gone")
                    continue
                if status is not None:
                    continue
                credit -= 1
                yield msg.metadata.sequence.stream, msg
        finally:
            try:
                await sub.unsubscribe()
                if nc.is_connected:
                    await js._jsm.delete_consumer(self.settings.name, consumer)
            except Exception:  # noqa: BLE001 - it expires by itself after INACTIVE_SECONDS
                pass
