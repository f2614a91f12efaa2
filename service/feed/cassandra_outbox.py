"""The Cassandra outbox: ``feed_outbox`` read by one elected publisher per cluster.

Every ``serve`` instance runs a publisher; they elect one through a lease row
(``feed_lease``) taken with a lightweight transaction (``IF NOT EXISTS``,
with a TTL) and renewed (``IF owner = ?``) every ``RENEW_SECONDS``. When the
leader's instance dies its lease expires after ``LEASE_TTL_S`` and another
publisher, trying every ``RENEW_SECONDS``, takes it: within
LEASE_TTL_S + RENEW_SECONDS of the death. A publisher that loses the lease
stops at once; what both published meanwhile carries the same ``Nats-Msg-Id``
and JetStream keeps one.

Rows are partitioned by (shard, minute of receipt) and ordered by event id,
which grows with the receive time. Writes from many processes land out of
that order, a little late, so the publisher reads each shard twice:

- the lead cursor follows the newest rows and publishes them at once;
- the trail cursor passes over the same rows ``LOOKBACK_US`` later (when no
  write begun before can still land, see cassandra.SETTLE_US) and publishes
  what the lead had not seen (it remembers the ids the lead published).

The saved checkpoint is the trail cursors: everything before them is
published. A new leader starts from there; what it publishes again, JetStream
drops as a duplicate.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
from collections import deque
from typing import cast

from service.domain import StoredEvent, now_us
from service.feed.outbox import OUTBOX_BATCH, Outbox, Position, Window
from service.store.cassandra import OUTBOX_MINUTE_US, OUTBOX_SHARDS, SETTLE_US, CassandraStore

log = logging.getLogger(__name__)

LEASE_TTL_S = 6
RENEW_SECONDS = 1.5
LOOKBACK_US = SETTLE_US
POLL_SECONDS = 0.05
MAX_EMPTY_MINUTES = 240  # minutes one read walks through per shard at most
NO_ID = ""
ALL_IDS = "evt_" + "f" * 32

Cursor = tuple[int, str]  # (minute, last event id read in it)


def id_floor(at_us: int) -> str:
    """The smallest event id of a time (service.domain.new_event_id: 48 bits of milliseconds first)."""
    return f"evt_{max(0, at_us // 1000):012x}" + "0" * 20


class CassandraOutbox(Outbox):
    def __init__(self, store: CassandraStore, name: str) -> None:
        self.store = store
        self.name = name
        self.owner = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        self._leader = False
        self._lease_task: asyncio.Task | None = None
        self._seen: set[str] = set()  # ids the lead published, not yet passed by the trail
        self._seen_order: list[deque[str]] = [deque() for _ in range(OUTBOX_SHARDS)]

    @classmethod
    def from_url(cls, url: str, name: str) -> CassandraOutbox:
        return cls(CassandraStore.from_url(url), name)

    async def open(self) -> None:
        while True:
            try:
                await self.store.open()
                break
            except Exception as exc:  # noqa: BLE001 - the cluster is not reachable yet
                log.warning("feed outbox: cassandra unreachable (%s); retrying", exc)
                await asyncio.sleep(RENEW_SECONDS)
        self._lease_task = asyncio.create_task(self._hold_lease())

    async def close(self) -> None:
        if self._lease_task is not None:
            self._lease_task.cancel()
            try:
                await self._lease_task
            except asyncio.CancelledError:
                pass
        await self.store.close()

    async def _hold_lease(self) -> None:
        while True:
            try:
                held = await self.store.hold_feed_lease(self.name, self.owner, LEASE_TTL_S, self._leader)
            except Exception as exc:  # noqa: BLE001 - unreachable: not the leader until renewed
                log.warning("feed lease: %s", exc)
                held = False
            if held != self._leader:
                log.info("feed publisher %s %s the lease", self.owner, "took" if held else "lost")
            self._leader = held
            await asyncio.sleep(RENEW_SECONDS)

    async def lead(self) -> bool:
        return self._leader

    async def checkpoint(self) -> Position:
        saved = await self.store.feed_checkpoints(self.name)
        start = (now_us() - LOOKBACK_US) // OUTBOX_MINUTE_US  # a first publisher starts here
        trail = tuple(saved.get(shard, (start, NO_ID)) for shard in range(OUTBOX_SHARDS))
        self._seen.clear()
        for d in self._seen_order:
            d.clear()
        return trail, trail

    async def save_checkpoint(self, position: Position) -> None:
        _, trail = _cursors(position)
        await self.store.save_feed_checkpoints(self.name, dict(enumerate(trail)))

    async def after(self, position: Position, limit: int = OUTBOX_BATCH) -> Window:
        lead, trail = _cursors(position)
        now = now_us()
        per_shard = max(1, limit // (2 * OUTBOX_SHARDS))  # lead and trail: a window stays within limit
        reads = await asyncio.gather(
            *(self._walk(s, lead[s], (now // OUTBOX_MINUTE_US, ALL_IDS), per_shard) for s in range(OUTBOX_SHARDS)),
            *(
                self._walk(s, trail[s], _min_cursor(lead[s], _cursor_at(now - LOOKBACK_US)), per_shard)
                for s in range(OUTBOX_SHARDS)
            ),
        )
        events: list[StoredEvent] = []
        for rows, _ in reads[:OUTBOX_SHARDS]:
            events.extend(rows)
        for rows, _ in reads[OUTBOX_SHARDS:]:
            events.extend(e for e in rows if e.event_id not in self._seen)  # landed after the lead passed
        new_lead = tuple(cursor for _, cursor in reads[:OUTBOX_SHARDS])
        new_trail = tuple(cursor for _, cursor in reads[OUTBOX_SHARDS:])
        return Window(events, (new_lead, new_trail))

    def published(self, window: Window) -> None:
        _, trail = _cursors(window.position)
        for e in window.events:
            if e.event_id not in self._seen:
                self._seen.add(e.event_id)
                self._seen_order[_shard_of(e)].append(e.event_id)
        for shard, (_, trail_id) in enumerate(trail):
            order = self._seen_order[shard]
            while order and order[0] <= trail_id and trail_id != NO_ID:
                self._seen.discard(order.popleft())

    async def _walk(self, shard: int, cursor: Cursor, upper: Cursor, limit: int) -> tuple[list[StoredEvent], Cursor]:
        """Rows after ``cursor`` up to ``upper`` (inclusive), at most about ``limit``, and the cursor after them."""
        minute, after_id = cursor
        rows: list[StoredEvent] = []
        for _ in range(MAX_EMPTY_MINUTES):
            if (minute, after_id) >= upper and minute >= upper[0]:
                break
            through = upper[1] if minute == upper[0] else ALL_IDS
            got = await self.store.outbox_rows(shard, minute, after_id, through, limit - len(rows))
            rows.extend(got)
            if got:
                after_id = got[-1].event_id
            if len(rows) >= limit or minute >= upper[0]:
                break
            minute, after_id = minute + 1, NO_ID
        return rows, (minute, after_id)

    async def wait_for_more(self, timeout: float) -> None:
        await asyncio.sleep(min(timeout, POLL_SECONDS))


def _cursors(position: Position) -> tuple[tuple[Cursor, ...], tuple[Cursor, ...]]:
    """(lead, trail): a position of this outbox is the cursors of each shard."""
    return cast(tuple[tuple[Cursor, ...], tuple[Cursor, ...]], position)


def _cursor_at(at_us: int) -> Cursor:
    return at_us // OUTBOX_MINUTE_US, id_floor(at_us)


def _min_cursor(a: Cursor, b: Cursor) -> Cursor:
    return a if a <= b else b


def _shard_of(e: StoredEvent) -> int:
    from service.store.cassandra import outbox_partition

    return outbox_partition(e)[0]
