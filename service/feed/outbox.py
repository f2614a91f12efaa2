"""The store as the feed's outbox: stored events in store order after a checkpoint.

The publisher (publisher.py) reads the events stored after its checkpoint,
publishes them, and moves the checkpoint once JetStream acknowledged every one
of them. The checkpoint lives in the store itself, so a publisher that starts
again (after a crash, on another instance) goes on where the last one stopped.

- Cassandra (cassandra_outbox.py): ``feed_outbox``, written with the events,
  read by one elected publisher.
- SQLite: the ``events`` table keeps commit order in its INTEGER PRIMARY KEY
  ``seq`` and one writer commits at a time, so ``seq > checkpoint`` is exactly
  what was committed since; the checkpoint is a row of ``feed_checkpoint`` in
  the same file.
"""

from __future__ import annotations

import abc
import asyncio
import sqlite3
from collections.abc import Hashable
from dataclasses import dataclass

from service.domain import StoredEvent
from service.store.sqlite_engine import SqliteFile

OUTBOX_BATCH = 1000


Position = Hashable
"""Where a publisher is in the outbox; only the outbox knows what it holds."""


@dataclass(frozen=True, slots=True)
class Window:
    """Stored events to publish, in store order, and the position after them."""

    events: list[StoredEvent]
    position: Position


class Outbox(abc.ABC):
    """What the publisher needs from a store."""

    @abc.abstractmethod
    async def open(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    async def lead(self) -> bool:
        """True while this publisher is the one that publishes (one per store).

        A store with a single publisher per file says yes; a shared store elects one."""
        return True

    @abc.abstractmethod
    async def checkpoint(self) -> Position:
        """The saved position: every event before it is known published."""

    @abc.abstractmethod
    async def save_checkpoint(self, position: Position) -> None: ...

    @abc.abstractmethod
    async def after(self, position: Position, limit: int = OUTBOX_BATCH) -> Window:
        """About ``limit`` stored events after ``position``, in store order (the same
        window again for the same position, plus what was stored meanwhile)."""

    def published(self, window: Window) -> None:  # noqa: B027 - most outboxes need no word of it
        """JetStream acknowledged every event of ``window``."""

    @abc.abstractmethod
    async def wait_for_more(self, timeout: float) -> None:
        """Return when events may have been stored since the last ``after``, or after ``timeout``."""


CHECKPOINT_TABLE = """CREATE TABLE IF NOT EXISTS feed_checkpoint (
    name         TEXT PRIMARY KEY,
    seq          INTEGER NOT NULL
)"""
SELECT_CHECKPOINT = "SELECT seq FROM feed_checkpoint WHERE name = ?"
SAVE_CHECKPOINT = (
    "INSERT INTO feed_checkpoint (name, seq) VALUES (?, ?)"
    " ON CONFLICT (name) DO UPDATE SET seq = max(seq, excluded.seq)"
)
SELECT_AFTER = (
    "SELECT e.seq, e.event_id, p.workspace_id, p.person_id, e.external_id, e.event, e.parameters, e.ts,"
    " e.created_at FROM events AS e JOIN persons AS p ON p.person_key = e.person_key"
    " WHERE e.seq > ? ORDER BY e.seq LIMIT ?"
)


class SqliteOutbox(Outbox):
    """The events table of one SQLite file; the checkpoint is named after the stream."""

    POLL_SECONDS = 0.005

    def __init__(self, db: SqliteFile, name: str) -> None:
        self.db = db
        self.name = name
        self._conn: sqlite3.Connection | None = None
        self._data_version = -1

    @classmethod
    def from_url(cls, url: str, name: str) -> SqliteOutbox:
        return cls(SqliteFile.from_url(url), name)

    async def open(self) -> None:
        def connect() -> sqlite3.Connection:
            conn = self.db.connect()
            conn.execute(CHECKPOINT_TABLE)
            return conn

        self._conn = await asyncio.to_thread(connect)

    async def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _c(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("the outbox is closed")
        return self._conn

    async def checkpoint(self) -> Position:
        row = await asyncio.to_thread(lambda: self._c().execute(SELECT_CHECKPOINT, (self.name,)).fetchone())
        return row[0] if row else 0

    async def save_checkpoint(self, position: Position) -> None:
        await asyncio.to_thread(lambda: self._c().execute(SAVE_CHECKPOINT, (self.name, position)))

    async def after(self, position: Position, limit: int = OUTBOX_BATCH) -> Window:
        def read() -> Window:
            conn = self._c()
            self._data_version = conn.execute("PRAGMA data_version").fetchone()[0]
            rows = conn.execute(SELECT_AFTER, (position, limit)).fetchall()
            events = [
                StoredEvent(event_id, workspace_id, person_id, external_id, event, parameters, ts, created_at)
                for _, event_id, workspace_id, person_id, external_id, event, parameters, ts, created_at in rows
            ]
            return Window(events, rows[-1][0] if rows else position)

        return await asyncio.to_thread(read)

    async def wait_for_more(self, timeout: float) -> None:
        """Polls SQLite's data_version (it changes when another connection commits): one cheap
        pragma per POLL_SECONDS while idle."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        conn = self._c()
        while loop.time() < deadline:
            if conn.execute("PRAGMA data_version").fetchone()[0] != self._data_version:
                return
            await asyncio.sleep(self.POLL_SECONDS)


def open_outbox(store_url: str, name: str) -> Outbox:
    from urllib.parse import urlsplit

    scheme = urlsplit(store_url).scheme
    if scheme == "sqlite":
        return SqliteOutbox.from_url(store_url, name)
    if scheme == "cassandra":
        from service.feed.cassandra_outbox import CassandraOutbox

        return CassandraOutbox.from_url(store_url, name)
    raise ValueError(f"unknown store URL scheme {scheme!r}")
