"""The SQLite stores: the engine (sqlite_engine.py) behind the async Store interface.

``sqlite:///./data/events.db`` (relative path) or ``sqlite:////var/lib/flameup/events.db``
(absolute). Query parameters: ``synchronous=NORMAL|FULL`` (NORMAL, the default,
survives a crash or kill of the process; FULL also survives power loss, at the
cost of an fsync per commit), ``busy_timeout_ms`` (default 10000) and
``dedup_window_days`` (default 7: how long a message_id is remembered).

Two shapes, one per role; both read on a small thread pool with a connection
per thread, so the asyncio loop never blocks on the file:

- ``SqliteStore`` commits on its own writer thread: appends queue up, and the
  thread commits whatever has queued in one transaction (group commit). Tests,
  the CLI and ``migrate`` use it, and ``open_store(url)`` returns it.
- ``SqliteClientStore`` sends its appends to the writer process
  (sqlite_writer.py) over its Unix socket. ``serve``'s gRPC workers use it:
  ``open_store(url, sqlite_writer=socket)``.
"""

from __future__ import annotations

import asyncio
import queue
import sqlite3
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from service.domain import CountBucket, EventPage, EventQuery, NameStats, Original, RateLimit, StoredEvent
from service.store import sqlite_engine as engine
from service.store.base import ApiKeyRecord, Store, StoreUnavailable, dedup_window_seconds, settle
from service.store.sqlite_engine import GroupCommitter, SqliteFile, Tuning
from service.store.sqlite_wire import WriterClient

T = TypeVar("T")


class _SqliteReads(Store):
    """Reads, workspaces and keys on a thread pool; ``open`` creates or migrates the schema."""

    def __init__(self, db: SqliteFile) -> None:
        self.db = db
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        # Removals run on a thread of their own: a long one never holds up reads.
        self._removals: ThreadPoolExecutor | None = None

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self.db.connect()
            with self._connections_lock:
                self._connections.append(conn)
        return conn

    async def _run(self, fn: Callable[[sqlite3.Connection], T], pool: ThreadPoolExecutor | None = None) -> T:
        pool = pool or self._pool
        if pool is None:
            raise StoreUnavailable("the store is closed")

        def call() -> T:
            try:
                return fn(self._conn())
            except sqlite3.OperationalError as exc:  # locked past busy_timeout, disk full, I/O error
                raise StoreUnavailable(f"sqlite: {exc}") from exc

        return await asyncio.get_running_loop().run_in_executor(pool, call)

    async def open(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="sqlite-read")
        self._removals = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-removal")
        await self._run(engine.migrate)

    async def close(self) -> None:
        for pool in (self._removals, self._pool):
            if pool is not None:
                pool.shutdown(wait=True)
        self._pool = self._removals = None
        with self._connections_lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
        self._local = threading.local()

    async def list_events(self, query: EventQuery) -> EventPage:
        return await self._run(lambda conn: engine.list_events(conn, query))

    async def person_summary(
        self, workspace_id: str, person_id: str, since_us: int | None, until_us: int | None
    ) -> list[NameStats]:
        return await self._run(lambda conn: engine.person_summary(conn, workspace_id, person_id, since_us, until_us))

    async def event_counts(
        self, workspace_id: str, event: str | None, interval_us: int, start_us: int, end_us: int
    ) -> list[CountBucket]:
        return await self._run(
            lambda conn: engine.event_counts(conn, workspace_id, event, interval_us, start_us, end_us)
        )

    async def event_names(self, workspace_id: str, since_us: int | None, until_us: int | None) -> list[NameStats]:
        return await self._run(lambda conn: engine.event_names(conn, workspace_id, since_us, until_us))

    async def delete_person(self, workspace_id: str, person_id: str) -> int:
        if self._removals is None:
            raise StoreUnavailable("the store is closed")
        return await self._run(
            lambda conn: engine.delete_person(conn, workspace_id, person_id, self.db.tuning), self._removals
        )

    async def ensure_workspace(self, workspace_id: str, created_at_us: int) -> bool:
        return await self._run(lambda conn: engine.ensure_workspace(conn, workspace_id, created_at_us))

    async def list_workspaces(self) -> list[str]:
        return await self._run(engine.list_workspaces)

    async def set_rate_limit(self, workspace_id: str, limit: RateLimit | None) -> bool:
        return await self._run(lambda conn: engine.set_rate_limit(conn, workspace_id, limit))

    async def rate_limit(self, workspace_id: str) -> RateLimit | None:
        return await self._run(lambda conn: engine.rate_limit(conn, workspace_id))

    async def put_key(self, key: ApiKeyRecord) -> None:
        await self._run(lambda conn: engine.put_key(conn, key))

    async def key_by_hash(self, key_hash: str) -> ApiKeyRecord | None:
        return await self._run(lambda conn: engine.key_by_hash(conn, key_hash))

    async def list_keys(self, workspace_id: str | None = None) -> list[ApiKeyRecord]:
        return await self._run(lambda conn: engine.list_keys(conn, workspace_id))

    async def revoke_key(self, key_id: str, revoked_at_us: int) -> bool:
        return await self._run(lambda conn: engine.revoke_key(conn, key_id, revoked_at_us))


def _settle_all(waiters: list[tuple[asyncio.Future, list[Original | None]]], error: BaseException | None) -> None:
    for done, results in waiters:
        settle(done, results, error)


class SqliteStore(_SqliteReads):
    """The embedded store: appends are committed on this store's own writer thread."""

    def __init__(
        self,
        path: str,
        *,
        synchronous: str = "NORMAL",
        busy_timeout_ms: int = 10_000,
        tuning: Tuning | None = None,
        dedup_window_s: int = dedup_window_seconds(None),
        retention_days: int | None = None,
    ) -> None:
        super().__init__(SqliteFile(path, synchronous, busy_timeout_ms, tuning or Tuning(), dedup_window_s))
        self.retention_days = retention_days
        self._writes: queue.SimpleQueue = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._committer: GroupCommitter | None = None

    @classmethod
    def from_url(cls, url: str, tuning: Tuning | None = None, retention_days: int | None = None) -> SqliteStore:
        db = SqliteFile.from_url(url, tuning)
        return cls(
            db.path,
            synchronous=db.synchronous,
            busy_timeout_ms=db.busy_timeout_ms,
            tuning=db.tuning,
            dedup_window_s=db.dedup_window_s,
            retention_days=retention_days,
        )

    async def open(self) -> None:
        """Create or migrate the schema, then start the writer and checkpointer threads."""
        await super().open()
        self._committer = GroupCommitter(self.db, self.retention_days)
        await asyncio.to_thread(self._committer.open)
        self._writes = queue.SimpleQueue()
        self._writer = threading.Thread(
            target=self._write_loop, args=(self._committer,), name="sqlite-writer", daemon=True
        )
        self._writer.start()

    async def close(self) -> None:
        if self._writer is not None:
            self._writes.put(None)  # the writer commits what is queued before it, then stops
            await asyncio.to_thread(self._writer.join)
            self._writer = None
        if self._committer is not None:
            await asyncio.to_thread(self._committer.close)
            self._committer = None
        await super().close()

    async def append(self, events: Sequence[StoredEvent]) -> list[Original | None]:
        if not events:
            return []
        if self._writer is None:
            raise StoreUnavailable("the store is closed")
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self._writes.put((events, loop, done))
        return await asyncio.shield(done)  # a cancelled caller must not abandon a commit in flight

    def _write_loop(self, committer: GroupCommitter) -> None:
        max_rows = self.db.tuning.max_group_rows
        # Without a retention the thread sleeps until an append comes; with one it wakes
        # up for the retention steps too.
        wait = None if self.retention_days is None else self.db.tuning.retention_step_s
        stop = False
        while not stop:
            try:
                item = self._writes.get(timeout=wait)
            except queue.Empty:
                committer.expire_if_due()
                continue
            if item is None:
                break
            group, rows = [item], len(item[0])
            while rows < max_rows:
                try:
                    nxt = self._writes.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                group.append(nxt)
                rows += len(nxt[0])
            results = committer.commit_or_error([e for events, _, _ in group for e in events])
            error = results if isinstance(results, BaseException) else None
            # One wake-up per event loop for the whole group, not one per waiter.
            by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future, list[Original | None]]]] = {}
            start = 0
            for events, loop, done in group:
                mine = [] if isinstance(results, BaseException) else results[start : start + len(events)]
                start += len(events)
                by_loop.setdefault(loop, []).append((done, mine))
            for loop, waiters in by_loop.items():
                try:
                    loop.call_soon_threadsafe(_settle_all, waiters, error)
                except RuntimeError:  # that loop is closed: nobody is waiting any more
                    pass
            committer.merge_if_due()  # after the answers: a step delays the next group, not this one
            committer.expire_if_due()


class SqliteClientStore(_SqliteReads):
    """A worker's store: appends go to the writer process on ``writer_socket``; reads stay here."""

    def __init__(
        self, path: str, writer_socket: str, *, synchronous: str = "NORMAL", busy_timeout_ms: int = 10_000
    ) -> None:
        super().__init__(SqliteFile(path, synchronous, busy_timeout_ms))
        self.writer_socket = writer_socket
        self._client: WriterClient | None = None

    @classmethod
    def from_url(cls, url: str, writer_socket: str) -> SqliteClientStore:
        db = SqliteFile.from_url(url)
        return cls(db.path, writer_socket, synchronous=db.synchronous, busy_timeout_ms=db.busy_timeout_ms)

    async def open(self) -> None:
        await super().open()
        self._client = WriterClient(self.writer_socket)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
        await super().close()

    async def append(self, events: Sequence[StoredEvent]) -> list[Original | None]:
        if not events:
            return []
        if self._client is None:
            raise StoreUnavailable("the store is closed")
        return await self._client.append(events)
