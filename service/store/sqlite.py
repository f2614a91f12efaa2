"""The embedded store: one SQLite file in WAL mode, shaped like the wide rows.

``sqlite:///./data/events.db`` (relative path) or ``sqlite:////var/lib/flameup/events.db``
(absolute). Query parameters: ``synchronous=NORMAL|FULL`` (NORMAL, the default,
survives a crash or kill of the process; FULL also survives power loss, at the
cost of an fsync per commit), ``busy_timeout_ms`` (default 10000) and
``writer=<socket>``: send appends to the writer process on that Unix socket
instead of committing them here (``serve`` sets it; see sqlite_writer.py),
``dedup_window_days`` (default 7): how long a message_id is remembered.

Layout: each (workspace, person) gets a small integer ``person_key``. Events
are stored in commit order (``events``, keyed by ``seq``, so inserts append) and
each has an entry in a person's timeline, ``(person_key, ts, event_id)`` with
the event name and the row's ``seq``, like Cassandra's wide rows: a person's
page is one range read backwards, and the event filter is checked on the
entries as they pass.

The timeline is two tables with the same shape (schema 3). New entries go to
``recent``, which stays small (about MERGE_FROM_ROWS entries), so a group
commit dirties few pages however large the history is. The writer thread moves
entries from ``recent`` into ``timeline`` in steps, a range of persons per
transaction, sweeping the person keys round and round: one step touches each
timeline page of those persons once for all their new entries. Inserting every
event straight into one big person index dirtied a page of its own per event
once the index outgrew the cache (raw group commits at 600k-900k rows: 28-31k
events/s, against 55-63k this way). Reads merge the two ranges (a UNION ALL
in timeline order); a step moves entries in one transaction, so a reader's
snapshot sees each entry exactly once.

Exact totals: per-day counts (``bucket_counts``) cover the entries in
``timeline``, and the step that moves entries adds their counts in the same
transaction, a person at a time. A read sums at most a few hundred day rows
and counts the person's few entries still in ``recent``. Updating the counts
in every group commit instead dirtied about half of the count table's pages
per 100-event commit (53 of 69 pages written), more than the events did.

SQLite is synchronous: appends go to one writer thread that commits whatever
has queued up in one transaction (group commit) with multi-row statements
(the GIL is taken back once per statement, not once per row), and a
checkpointer thread moves the WAL into the database outside the commits.
Reads run on a small thread pool with a connection per thread.

Idempotent ingest (docs/idempotent-ingest.md): ``dedup`` maps (workspace,
message_id) to the event that claimed it. A commit looks its events' ids up in
the same transaction that inserts them, under SQLite's write lock, so no two
commits, of any process, can both claim one message_id; a duplicate is never
inserted and so counts nowhere. Each commit also deletes at most
DEDUP_CLEANUP_ROWS expired entries, oldest first by the ``created_at`` index. The asyncio
loop never blocks on the file, except in the writer process, whose loop does
nothing but commit (``open(caller_commits=True)``, see sqlite_writer.py).
"""

from __future__ import annotations

import asyncio
import ctypes
import itertools
import logging
import os
import queue
import sqlite3
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar
from urllib.parse import parse_qs, urlsplit

from service.domain import EventPage, EventQuery, Original, StoredEvent, now_us
from service.store.base import (
    BUCKET_US,
    ApiKeyRecord,
    Store,
    StoreUnavailable,
    dedup_window_s,
    settle,
    split_window,
)
from service.store.sqlite_writer import WriterClient

T = TypeVar("T")
log = logging.getLogger(__name__)

SCHEMA_VERSION = 4
# Each version is a list of statements, applied in order in one transaction.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        """CREATE TABLE persons (
            person_key   INTEGER PRIMARY KEY,
            workspace_id TEXT NOT NULL,
            person_id    TEXT NOT NULL,
            UNIQUE (workspace_id, person_id)
        )""",
        """CREATE TABLE events (
            event_id     TEXT NOT NULL,
            person_key   INTEGER NOT NULL,
            ts           INTEGER NOT NULL,  -- when it happened, microseconds since the epoch
            external_id  TEXT NOT NULL,
            event        TEXT NOT NULL,
            parameters   TEXT NOT NULL,     -- canonical JSON object
            created_at   INTEGER NOT NULL
        )""",
        "CREATE UNIQUE INDEX events_timeline ON events (person_key, ts, event_id)",
        "CREATE INDEX events_by_name ON events (person_key, event, ts, event_id)",
        # Exact per-day counts: event_key '' counts every event of the day.
        """CREATE TABLE bucket_counts (
            person_key   INTEGER NOT NULL,
            event_key    TEXT NOT NULL,
            bucket       INTEGER NOT NULL,
            n            INTEGER NOT NULL,
            PRIMARY KEY (person_key, event_key, bucket)
        ) WITHOUT ROWID""",
        """CREATE TABLE workspaces (
            workspace_id TEXT PRIMARY KEY,
            created_at   INTEGER NOT NULL
        )""",
        """CREATE TABLE api_keys (
            key_id       TEXT PRIMARY KEY,
            key_hash     TEXT NOT NULL UNIQUE,
            workspace_id TEXT NOT NULL REFERENCES workspaces (workspace_id),
            scopes       TEXT NOT NULL,     -- space separated
            created_at   INTEGER NOT NULL,
            revoked_at   INTEGER
        )""",
    ),
    # One index instead of two: the timeline carries the event name, and the event
    # filter reads it from the index (no row lookups) while it walks the timeline.
    # Every insert into a person-keyed index dirties a page of its own; the second
    # index was more than half of a commit's cost (raw inserts at 1M rows: 12.6k ->
    # 24k events/s). The cost moves to reads of rare events, which walk the person's
    # timeline past the events of other names (about 7 ms per 100,000 passed).
    2: (
        "DROP INDEX events_by_name",
        "DROP INDEX events_timeline",
        "CREATE INDEX events_timeline ON events (person_key, ts, event_id, event)",
    ),
    # The timeline leaves the events table: a small ``recent`` table takes every new
    # entry and the writer moves them into ``timeline`` in sorted steps (see the
    # module docstring). The entries point at their row by ``seq``, an INTEGER
    # PRIMARY KEY: a plain rowid may change on VACUUM, so the rows are copied once.
    # bucket_counts counts timeline's entries from now on: all of them, here.
    3: (
        """CREATE TABLE events_v3 (
            seq          INTEGER PRIMARY KEY,  -- commit order; timeline entries point here
            event_id     TEXT NOT NULL,
            person_key   INTEGER NOT NULL,
            ts           INTEGER NOT NULL,
            external_id  TEXT NOT NULL,
            event        TEXT NOT NULL,
            parameters   TEXT NOT NULL,
            created_at   INTEGER NOT NULL
        )""",
        """INSERT INTO events_v3 (seq, event_id, person_key, ts, external_id, event, parameters, created_at)
            SELECT rowid, event_id, person_key, ts, external_id, event, parameters, created_at
            FROM events ORDER BY rowid""",
        "DROP TABLE events",
        "ALTER TABLE events_v3 RENAME TO events",
        *(f"""CREATE TABLE {table} (
            person_key   INTEGER NOT NULL,
            ts           INTEGER NOT NULL,
            event_id     TEXT NOT NULL,
            event        TEXT NOT NULL,
            seq          INTEGER NOT NULL,
            PRIMARY KEY (person_key, ts, event_id)
        ) WITHOUT ROWID""" for table in ("timeline", "recent")),
        """INSERT INTO timeline (person_key, ts, event_id, event, seq)
            SELECT person_key, ts, event_id, event, seq FROM events ORDER BY person_key, ts, event_id""",
    ),
    # Idempotent ingest: the event that claimed each message_id, while the dedup
    # window lasts (created_at: when that event was received).
    4: (
        """CREATE TABLE dedup (
            workspace_id TEXT NOT NULL,
            message_id   TEXT NOT NULL,
            event_id     TEXT NOT NULL,
            person_id    TEXT NOT NULL,
            created_at   INTEGER NOT NULL,
            PRIMARY KEY (workspace_id, message_id)
        ) WITHOUT ROWID""",
        "CREATE INDEX dedup_expiry ON dedup (created_at)",
    ),
}

# Multi-row statements: ROWS_PER_STATEMENT rows of values in one INSERT.
ROWS_PER_STATEMENT = 500
EVENT_COLUMNS = 7
INSERT_EVENTS = (
    "INSERT INTO events (event_id, person_key, ts, external_id, event, parameters, created_at) VALUES "
)
INSERT_PERSONS = "INSERT OR IGNORE INTO persons (workspace_id, person_id) VALUES "
SELECT_PERSON_KEYS = (
    "SELECT workspace_id, person_id, person_key FROM persons WHERE (workspace_id, person_id) IN (VALUES {values})"
)
SELECT_PERSON_KEY = "SELECT person_key FROM persons WHERE workspace_id = ? AND person_id = ?"
# The rows of a commit get seq numbers above the largest before it; their timeline
# entries are staged from the rows themselves.
MAX_SEQ = "SELECT coalesce(max(seq), 0) FROM events"
STAGE_ENTRIES = (
    "INSERT INTO recent (person_key, ts, event_id, event, seq)"
    " SELECT person_key, ts, event_id, event, seq FROM events WHERE seq > ?"
)
COUNT_RECENT = "SELECT count(*) FROM recent"
SELECT_CLAIMS = (
    "SELECT workspace_id, message_id, event_id, person_id, created_at FROM dedup"
    " WHERE (workspace_id, message_id) IN (VALUES {values})"
)
# A claim replaces an expired one that the cleanup has not reached yet.
INSERT_CLAIMS = "INSERT INTO dedup (workspace_id, message_id, event_id, person_id, created_at) VALUES "
INSERT_CLAIMS_END = (
    " ON CONFLICT (workspace_id, message_id) DO UPDATE SET event_id = excluded.event_id,"
    " person_id = excluded.person_id, created_at = excluded.created_at"
)
EXPIRE_CLAIMS = (
    "DELETE FROM dedup WHERE (workspace_id, message_id) IN"
    " (SELECT workspace_id, message_id FROM dedup WHERE created_at < ? ORDER BY created_at LIMIT ?)"
)
# A merge step: the persons after the cursor up to the one holding the n-th entry.
MERGE_BOUNDARY = "SELECT person_key FROM recent WHERE person_key > ? ORDER BY person_key LIMIT 1 OFFSET ?"
MERGE_ENTRIES = (
    "INSERT INTO timeline (person_key, ts, event_id, event, seq)"
    " SELECT person_key, ts, event_id, event, seq FROM recent WHERE person_key > ? AND person_key <= ?"
)
# bucket_of(ts) in SQL: floor division (SQLite's / truncates toward zero).
_BUCKET_SQL = f"(ts - ((ts % {BUCKET_US}) + {BUCKET_US}) % {BUCKET_US}) / {BUCKET_US}"
# Each moved entry counts once under its event name and once under '' (every event).
# (WHERE true: SQLite's parser needs it between a SELECT and ON CONFLICT.)
MERGE_COUNTS = (
    "INSERT INTO bucket_counts (person_key, event_key, bucket, n)"
    " SELECT person_key, event_key, bucket, count(*) FROM ("
    + " UNION ALL ".join(f"SELECT person_key, {key} AS event_key, {_BUCKET_SQL} AS bucket FROM recent"
                         " WHERE person_key > ? AND person_key <= ?" for key in ("event", "''"))
    + ") WHERE true GROUP BY person_key, event_key, bucket"
    " ON CONFLICT (person_key, event_key, bucket) DO UPDATE SET n = n + excluded.n"
)
DROP_MERGED = "DELETE FROM recent WHERE person_key > ? AND person_key <= ?"
# Reads merge both tables in timeline order (SQLite walks the two ranges side by
# side) and fetch the rows of the page only. Named parameters: :person, :event,
# :since, :until, :limit, :offset.
TIMELINE_TABLES = ("timeline", "recent")
SELECT_EVENTS = (
    "SELECT e.event_id, e.external_id, e.event, e.parameters, e.ts, e.created_at FROM ("
    + " UNION ALL ".join(f"SELECT ts, event_id, seq FROM {t} WHERE person_key = :person{{filters}}"
                         for t in TIMELINE_TABLES)
    + " ORDER BY ts DESC, event_id DESC LIMIT :limit OFFSET :offset) AS page"
    " JOIN events AS e ON e.seq = page.seq ORDER BY page.ts DESC, page.event_id DESC"
)
COUNT_ENTRIES = "SELECT count(*) FROM {table} WHERE person_key = :person{filters}"
# The day counts of the entries in timeline (see the module docstring).
SUM_BUCKETS = (
    "SELECT coalesce(sum(n), 0) FROM bucket_counts"
    " WHERE person_key = ? AND event_key = ? AND bucket >= ? AND bucket <= ?"
)
INSERT_WORKSPACE = "INSERT OR IGNORE INTO workspaces (workspace_id, created_at) VALUES (?, ?)"
SELECT_WORKSPACES = "SELECT workspace_id FROM workspaces ORDER BY workspace_id"
INSERT_KEY = (
    "INSERT INTO api_keys (key_id, key_hash, workspace_id, scopes, created_at, revoked_at)"
    " VALUES (?, ?, ?, ?, ?, ?)"
)
KEY_COLUMNS = "key_id, key_hash, workspace_id, scopes, created_at, revoked_at"
SELECT_KEY_BY_HASH = f"SELECT {KEY_COLUMNS} FROM api_keys WHERE key_hash = ?"
SELECT_KEYS = f"SELECT {KEY_COLUMNS} FROM api_keys ORDER BY workspace_id, created_at"
SELECT_KEYS_OF = f"SELECT {KEY_COLUMNS} FROM api_keys WHERE workspace_id = ? ORDER BY created_at"
REVOKE_KEY = "UPDATE api_keys SET revoked_at = coalesce(revoked_at, ?) WHERE key_id = ?"

PAGE_BYTES = 16 * 1024
# The most rows one group commit takes: bigger groups spill the writer's page cache
# and were slower per event (raw commits at 600k rows: 45k events/s at 1,000, 34k at 5,000).
MAX_GROUP_ROWS = 1000
# The writer's page cache (the default 2 MiB makes every commit re-read index pages).
WRITER_CACHE_KIB = 16 * 1024
# Checkpoints run on their own thread every CHECKPOINT_SECONDS; a commit runs one
# itself only if the WAL outgrows WAL_SAFETY_BYTES (the checkpointer is stuck).
CHECKPOINT_SECONDS = 0.25
# Between checkpoints the same thread starts the writeback of both files this often.
WRITEBACK_SECONDS = 0.05
WAL_SAFETY_BYTES = 80 * 1024 * 1024
# The writer merges ``recent`` into ``timeline`` once it holds MERGE_FROM_ROWS
# entries, one step of about MERGE_STEP_ROWS entries after each group commit
# (raw group commits of 300 rows at 600k-900k rows: 141k events/s at 20k/2k,
# 154k at 50k/2k, 156k at 50k/5k, 132k at 100k/4k; bigger steps hold the write
# lock longer, so the answers of the groups behind them wait longer).
MERGE_FROM_ROWS = 50_000
MERGE_STEP_ROWS = 2_000
MAX_PERSON_KEY_CACHE = 100_000
# Expired dedup entries one commit deletes at most: more than a group inserts, so
# the table shrinks back to the window's entries; bounded, so no commit stalls.
DEDUP_CLEANUP_ROWS = 2 * MAX_GROUP_ROWS
_MIN_BUCKET, _MAX_BUCKET = -(2**62), 2**62
_MAX_KEY = 2**63 - 1


class _Writeback:
    """Starts the kernel's writeback of files' dirty pages, without waiting (Linux).

    A checkpoint under synchronous=NORMAL ends with fsyncs of the WAL and the
    database. The longer dirty data waits in the page cache, the more each fsync
    has to write, and while it runs the writer's own WAL writes stall (on ext4 a
    write that updates the file's mtime waits for the journal commit the fsync
    forces): that was the p99 of the batch workloads. sync_file_range(WRITE)
    starts writing now, commits no journal and changes no durability guarantee
    (the checkpoints still fsync); back to back it took grpc_batch p99 from
    52-63 ms to 38-47 ms. Elsewhere this does nothing.
    """

    SYNC_FILE_RANGE_WRITE = 2

    def __init__(self, paths: list[str]) -> None:
        self._paths = paths
        self._fds: list[int] = []
        self._sync_file_range = None
        if sys.platform == "linux":
            try:
                fn = ctypes.CDLL(None, use_errno=True).sync_file_range
            except (OSError, AttributeError):
                return
            fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
            self._sync_file_range = fn

    def start(self) -> None:
        if self._sync_file_range is None:
            return
        if not self._fds:
            try:
                for path in self._paths:
                    self._fds.append(os.open(path, os.O_RDONLY))
            except OSError:  # the WAL appears with the first write
                self.close()
                return
        for fd in self._fds:
            self._sync_file_range(fd, 0, 0, self.SYNC_FILE_RANGE_WRITE)

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []


def _settle_all(waiters: list[tuple[asyncio.Future, list[Original | None]]], error: BaseException | None) -> None:
    for done, results in waiters:
        settle(done, results, error)


def _values(rows: int, columns: int) -> str:
    return ", ".join(["(" + ", ".join("?" * columns) + ")"] * rows)


def _chunks(items: list, size: int = ROWS_PER_STATEMENT):
    for i in range(0, len(items), size):
        yield items[i:i + size]


class SqliteStore(Store):
    def __init__(self, path: str, *, synchronous: str = "NORMAL", busy_timeout_ms: int = 10_000,
                 writer: str | None = None, dedup_window_s: int = dedup_window_s(None)) -> None:
        if synchronous.upper() not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be NORMAL or FULL, got {synchronous!r}")
        self.path = path
        self._synchronous = synchronous.upper()
        self._busy_timeout_ms = busy_timeout_ms
        self._dedup_window_us = dedup_window_s * 1_000_000
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._writes: queue.SimpleQueue | None = None
        self._writer: threading.Thread | None = None
        self._checkpointer: threading.Thread | None = None
        self._closing = threading.Event()
        self._writer_socket = writer
        self._writer_client: WriterClient | None = None
        self._caller_conn: sqlite3.Connection | None = None  # open(caller_commits=True)
        # Writer thread only: (workspace_id, person_id) -> person_key, known committed;
        # the entries in ``recent`` (None: not counted yet) and the merge cursor.
        self._person_keys: dict[tuple[str, str], int] = {}
        self._recent_rows: int | None = None
        self._merged_through = -1

    @classmethod
    def from_url(cls, url: str) -> SqliteStore:
        parts = urlsplit(url)
        # sqlite:///./data/x.db -> ./data/x.db ; sqlite:////abs/x.db -> /abs/x.db
        path = parts.path[1:] if parts.path.startswith("/") else parts.path
        if not path:
            raise ValueError(f"sqlite URL needs a file path, e.g. sqlite:///./data/events.db, got {url!r}")
        params = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        return cls(
            path,
            synchronous=params.get("synchronous", "NORMAL"),
            busy_timeout_ms=int(params.get("busy_timeout_ms", 10_000)),
            writer=params.get("writer") or None,
            dedup_window_s=dedup_window_s(params.get("dedup_window_days")),
        )

    # Connections ----------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=self._busy_timeout_ms / 1000, isolation_level=None,
                               check_same_thread=False)
        # Only a new, empty file takes a page size (before WAL mode is set); an existing
        # database keeps its own. 16 KiB pages: a commit's scattered index inserts dirty
        # fewer pages, and the WAL takes fewer, larger writes (raw inserts at 400k rows
        # went from 24k to 33k events/s against 4 KiB pages).
        conn.execute(f"PRAGMA page_size = {PAGE_BYTES}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {self._synchronous}")
        conn.execute("PRAGMA foreign_keys = ON")
        # A statement's temporary data (the statement journal of the INSERT ... SELECT that
        # stages a commit's timeline entries) in memory: on disk it cost every commit a
        # temp file created, unlinked and closed in /var/tmp; the writer's CPU per event
        # fell 10-15% (grpc_track, grpc_batch, rest_track, back to back, two pairs).
        conn.execute("PRAGMA temp_store = MEMORY")
        page_bytes = conn.execute("PRAGMA page_size").fetchone()[0]
        conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_SAFETY_BYTES // page_bytes}")
        with self._connections_lock:
            self._connections.append(conn)
        return conn

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
        return conn

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._pool is None:
            raise StoreUnavailable("the store is closed")

        def call() -> T:
            try:
                return fn(self._conn())
            except sqlite3.OperationalError as exc:  # locked past busy_timeout, disk full, I/O error
                raise StoreUnavailable(f"sqlite: {exc}") from exc

        return await asyncio.get_running_loop().run_in_executor(self._pool, call)

    async def open(self, *, caller_commits: bool = False) -> None:
        """Create or migrate the schema and start the threads.

        ``caller_commits``: start no writer thread; the caller commits groups
        itself with commit_group() and merge_if_due(), on its own thread. The
        writer process does that on its event loop, which has nothing else to
        do: handing every group to a thread and its answers back cost it about
        a sixth of its CPU (grpc_batch: 11.2 -> 9.3 us of writer CPU per event).
        """
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="sqlite-read")
        await self._run(self._migrate)
        if self._writer_socket is not None:  # appends go to the writer process
            self._writer_client = WriterClient(self._writer_socket)
            return
        self._closing.clear()
        if caller_commits:
            self._caller_conn = self._writer_connection()
        else:
            self._writes = queue.SimpleQueue()
            self._writer = threading.Thread(target=self._write_loop, name="sqlite-writer", daemon=True)
            self._writer.start()
        self._checkpointer = threading.Thread(target=self._checkpoint_loop, name="sqlite-checkpoint", daemon=True)
        self._checkpointer.start()

    @staticmethod
    def _migrate(conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")  # one process migrates; the others wait, then see the version
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RuntimeError(f"database schema version {version} is newer than this code ({SCHEMA_VERSION})")
            for v in range(version + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[v]:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {v}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    async def close(self) -> None:
        if self._writer_client is not None:
            await self._writer_client.close()
            self._writer_client = None
        if self._writer is not None:
            self._writes.put(None)  # the writer commits what is queued before it, then stops
            await asyncio.to_thread(self._writer.join)
            self._writer = None
        if self._checkpointer is not None:
            self._closing.set()
            await asyncio.to_thread(self._checkpointer.join)
            self._checkpointer = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._caller_conn = None
        with self._connections_lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
        self._local = threading.local()

    # Events ---------------------------------------------------------------

    async def append(self, events: Sequence[StoredEvent]) -> list[Original | None]:
        if not events:
            return []
        if self._writer_client is not None:
            return await self._writer_client.append(events)
        if self._writer is None:
            raise StoreUnavailable("the store is closed" if self._caller_conn is None
                                   else "this store's caller commits: use commit_group()")
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self._writes.put((events, loop, done))
        return await asyncio.shield(done)  # a cancelled caller must not abandon a commit in flight

    def commit_group(self, events: list[StoredEvent]) -> list[Original | None]:
        """Commit one group of appends on the calling thread (open(caller_commits=True));
        per event, what append() answers.

        Raises StoreUnavailable when SQLite fails; nothing of the group is then stored.
        """
        if self._caller_conn is None:
            raise StoreUnavailable("the store is closed or commits on its own thread")
        results = self._commit_or_error(self._caller_conn, events)
        if isinstance(results, BaseException):
            raise results
        return results

    def merge_if_due(self) -> None:
        """The timeline merge step, when one is due (open(caller_commits=True)):
        after a group's answers are out, so a step delays the next group only."""
        if self._caller_conn is not None:
            self._merge_if_due(self._caller_conn)

    def _writer_connection(self) -> sqlite3.Connection:
        conn = self._connect()
        conn.execute(f"PRAGMA cache_size = -{WRITER_CACHE_KIB}")
        return conn

    def _commit_or_error(self, conn: sqlite3.Connection,
                         events: list[StoredEvent]) -> list[Original | None] | BaseException:
        try:
            return self._commit(conn, events)
        except Exception as exc:  # every waiter gets an answer, whatever went wrong
            return StoreUnavailable(f"sqlite: {exc}") if isinstance(exc, sqlite3.Error) else exc

    def _write_loop(self) -> None:
        conn = self._writer_connection()
        stop = False
        while not stop:
            item = self._writes.get()
            if item is None:
                break
            group, rows = [item], len(item[0])
            while rows < MAX_GROUP_ROWS:
                try:
                    nxt = self._writes.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                group.append(nxt)
                rows += len(nxt[0])
            results = self._commit_or_error(conn, [e for events, _, _ in group for e in events])
            error = results if isinstance(results, BaseException) else None
            # One wake-up per event loop for the whole group, not one per waiter.
            by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future, list[Original | None]]]] = {}
            start = 0
            for events, loop, done in group:
                mine = [] if error is not None else results[start:start + len(events)]
                start += len(events)
                by_loop.setdefault(loop, []).append((done, mine))
            for loop, waiters in by_loop.items():
                try:
                    loop.call_soon_threadsafe(_settle_all, waiters, error)
                except RuntimeError:  # that loop is closed: nobody is waiting any more
                    pass
            self._merge_if_due(conn)  # after the answers: a step delays the next group, not this one

    def _checkpoint_loop(self) -> None:
        """Copy the WAL into the database off the commit path (PASSIVE: never
        waits for, nor blocks, readers and writers), and between checkpoints
        start the writeback of both files (see _Writeback)."""
        conn = self._connect()
        writeback = _Writeback([self.path, self.path + "-wal"])
        rounds = round(CHECKPOINT_SECONDS / WRITEBACK_SECONDS)
        try:
            for tick in itertools.count(1):
                if self._closing.wait(WRITEBACK_SECONDS):
                    return
                writeback.start()
                if tick % rounds:
                    continue
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.Error as exc:  # busy or I/O: the next round tries again
                    log.debug("sqlite checkpoint: %s", exc)
        finally:
            writeback.close()

    def _commit(self, conn: sqlite3.Connection, events: list[StoredEvent]) -> list[Original | None]:
        """One transaction for a group of appends: message claims, persons, rows.

        While the transaction is open every other writer process waits, so the
        statements' values are built before it starts whenever every person
        already has a key (the usual case); only new persons (or duplicates,
        which leave the group) need it first.
        """
        cached = self._person_keys
        missing = {p for e in events if (p := (e.workspace_id, e.person_id)) not in cached}
        statements = None if missing else self._statements(events, cached)
        claims = any(e.message_id is not None for e in events)
        conn.execute("BEGIN IMMEDIATE")
        try:
            results: list[Original | None] = [None] * len(events)
            if claims:
                results = self._claim_messages(conn, events)
                if any(results):
                    events = [e for e, original in zip(events, results) if original is None]
                    missing = {p for e in events if (p := (e.workspace_id, e.person_id)) not in cached}
                    statements = None
            conn.execute(EXPIRE_CLAIMS, (now_us() - self._dedup_window_us, DEDUP_CLEANUP_ROWS))
            new_keys = self._assign_person_keys(conn, missing) if missing else {}
            (last_seq,) = conn.execute(MAX_SEQ).fetchone()
            for sql, values in statements or self._statements(events, {**cached, **new_keys}):
                conn.execute(sql, values)
            conn.execute(STAGE_ENTRIES, (last_seq,))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        if new_keys:  # only keys of a committed transaction may be remembered
            if len(cached) + len(new_keys) > MAX_PERSON_KEY_CACHE:
                cached.clear()
            cached.update(new_keys)
        if self._recent_rows is not None:
            self._recent_rows += len(events)
        return results

    def _claim_messages(self, conn: sqlite3.Connection, events: list[StoredEvent]) -> list[Original | None]:
        """Per event, None when it claims its message_id (or has none), else the
        original it duplicates: a live claim from before this group, or an
        earlier event of this group. Inside the commit's transaction."""
        wanted = list({(e.workspace_id, e.message_id) for e in events if e.message_id is not None})
        claims: dict[tuple[str, str], tuple[str, str, int]] = {}
        for chunk in _chunks(wanted):
            flat = [v for key in chunk for v in key]
            for workspace_id, message_id, event_id, person_id, created_at in conn.execute(
                    SELECT_CLAIMS.format(values=_values(len(chunk), 2)), flat):
                claims[(workspace_id, message_id)] = (event_id, person_id, created_at)
        results: list[Original | None] = []
        new: dict[tuple[str, str], StoredEvent] = {}
        for e in events:
            if e.message_id is None:
                results.append(None)
                continue
            key = (e.workspace_id, e.message_id)
            claim = claims.get(key)
            if claim is not None and claim[2] + self._dedup_window_us > e.created_at_us:
                results.append(claim[:2])
                continue
            claims[key] = (e.event_id, e.person_id, e.created_at_us)
            new[key] = e
            results.append(None)
        rows = [v for e in new.values() for v in (e.workspace_id, e.message_id, e.event_id, e.person_id,
                                                   e.created_at_us)]
        for chunk in _chunks(rows, ROWS_PER_STATEMENT * 5):
            conn.execute(INSERT_CLAIMS + _values(len(chunk) // 5, 5) + INSERT_CLAIMS_END, chunk)
        return results

    def _merge_if_due(self, conn: sqlite3.Connection) -> None:
        """One merge step when ``recent`` has grown past MERGE_FROM_ROWS.

        A step moves the entries of the persons after the cursor, up to the one
        holding the MERGE_STEP_ROWS-th entry (persons whole), in one transaction;
        past the last person the cursor starts over. Other processes writing the
        same file keep their own counts; a step is correct whichever runs it.
        A failed step changes nothing and is tried again after the next commit.
        """
        try:
            if self._recent_rows is None:
                (self._recent_rows,) = conn.execute(COUNT_RECENT).fetchone()
            if self._recent_rows < MERGE_FROM_ROWS:
                return
            after = self._merged_through
            conn.execute("BEGIN IMMEDIATE")
            try:
                row = conn.execute(MERGE_BOUNDARY, (after, MERGE_STEP_ROWS - 1)).fetchone()
                through = row[0] if row else _MAX_KEY
                conn.execute(MERGE_ENTRIES, (after, through))
                conn.execute(MERGE_COUNTS, (after, through) * 2)
                moved = conn.execute(DROP_MERGED, (after, through)).rowcount
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            log.warning("sqlite: timeline merge step failed (tried again later): %s", exc)
            return
        if row is None:  # swept past the last person: count afresh and start over
            self._merged_through, self._recent_rows = -1, None
        else:
            self._merged_through, self._recent_rows = through, self._recent_rows - moved

    @staticmethod
    def _statements(events: list[StoredEvent], keys: dict[tuple[str, str], int]) -> list[tuple[str, list]]:
        """The multi-row INSERTs of the events, in timeline order (person, time).

        Staging their entries then writes ``recent`` in key order, so consecutive
        entries of a person land on the same page (arrival order within a group
        means nothing).
        """
        rows = []
        keyed = sorted(((keys[(e.workspace_id, e.person_id)], e.timestamp_us, i) for i, e in enumerate(events)))
        for key, _, i in keyed:
            e = events[i]
            rows.extend((e.event_id, key, e.timestamp_us, e.external_id, e.event, e.parameters, e.created_at_us))
        return [
            (INSERT_EVENTS + _values(len(chunk) // EVENT_COLUMNS, EVENT_COLUMNS), chunk)
            for chunk in _chunks(rows, ROWS_PER_STATEMENT * EVENT_COLUMNS)
        ]

    @staticmethod
    def _assign_person_keys(conn: sqlite3.Connection, people: set[tuple[str, str]]) -> dict[tuple[str, str], int]:
        """The person_key of each (workspace, person), created when new."""
        missing = list(people)
        found: dict[tuple[str, str], int] = {}
        for chunk in _chunks(missing):
            flat = [v for p in chunk for v in p]
            conn.execute(INSERT_PERSONS + _values(len(chunk), 2), flat)
            for workspace_id, person_id, key in conn.execute(
                    SELECT_PERSON_KEYS.format(values=_values(len(chunk), 2)), flat):
                found[(workspace_id, person_id)] = key
        return found

    async def list_events(self, query: EventQuery) -> EventPage:
        return await self._run(lambda conn: self._list(conn, query))

    @staticmethod
    def _list(conn: sqlite3.Connection, q: EventQuery) -> EventPage:
        conn.execute("BEGIN")  # page and total from one snapshot
        try:
            row = conn.execute(SELECT_PERSON_KEY, (q.workspace_id, q.person_id)).fetchone()
            if row is None:
                return EventPage([], 0)
            args = {"person": row[0], "event": q.event, "since": q.since_us, "until": q.until_us,
                    "limit": q.limit, "offset": q.offset}
            if q.after is not None:  # keyset paging: one row more tells whether more follow
                args.update(after_ts=q.after[0], after_id=q.after[1], limit=q.limit + 1)
            filters = "" if q.event is None else " AND event = :event"
            range_filters = ("" if q.since_us is None else " AND ts >= :since") + (
                "" if q.until_us is None else " AND ts < :until")
            # The total: day counts of timeline's whole days, timeline's entries in the
            # partial days at the window's edges, and the person's entries in recent.
            first, last, edges = split_window(q.since_us, q.until_us)
            total = 0
            if (first is None or last is None) or first <= last:
                total += conn.execute(
                    SUM_BUCKETS,
                    (row[0], q.event or "", _MIN_BUCKET if first is None else first,
                     _MAX_BUCKET if last is None else last),
                ).fetchone()[0]
            edge_sql = COUNT_ENTRIES.format(table="timeline", filters=filters + " AND ts >= :start AND ts < :end")
            for start, end in edges:
                total += conn.execute(edge_sql, {**args, "start": start, "end": end}).fetchone()[0]
            total += conn.execute(COUNT_ENTRIES.format(table="recent", filters=filters + range_filters),
                                  args).fetchone()[0]
            # The total is exact, so an offset past it (or an event that never occurred)
            # needs no walk of the timeline.
            after = "" if q.after is None else " AND (ts, event_id) < (:after_ts, :after_id)"
            rows = [] if q.offset >= total else conn.execute(
                SELECT_EVENTS.format(filters=filters + range_filters + after), args).fetchall()
        finally:
            conn.execute("COMMIT")
        events = [
            StoredEvent(event_id, q.workspace_id, q.person_id, external_id, event, parameters, ts, created_at)
            for event_id, external_id, event, parameters, ts, created_at in rows[:q.limit]
        ]
        return EventPage(events, total, more=len(rows) > q.limit)

    # Workspaces and keys ----------------------------------------------------

    async def ensure_workspace(self, workspace_id: str, created_at_us: int) -> bool:
        return await self._run(
            lambda conn: conn.execute(INSERT_WORKSPACE, (workspace_id, created_at_us)).rowcount == 1
        )

    async def list_workspaces(self) -> list[str]:
        return await self._run(lambda conn: [r[0] for r in conn.execute(SELECT_WORKSPACES)])

    async def put_key(self, key: ApiKeyRecord) -> None:
        await self._run(lambda conn: conn.execute(INSERT_KEY, (
            key.key_id, key.key_hash, key.workspace_id, " ".join(sorted(key.scopes)),
            key.created_at_us, key.revoked_at_us,
        )))

    async def key_by_hash(self, key_hash: str) -> ApiKeyRecord | None:
        row = await self._run(lambda conn: conn.execute(SELECT_KEY_BY_HASH, (key_hash,)).fetchone())
        return _key(row) if row else None

    async def list_keys(self, workspace_id: str | None = None) -> list[ApiKeyRecord]:
        if workspace_id is None:
            rows = await self._run(lambda conn: conn.execute(SELECT_KEYS).fetchall())
        else:
            rows = await self._run(lambda conn: conn.execute(SELECT_KEYS_OF, (workspace_id,)).fetchall())
        return [_key(r) for r in rows]

    async def revoke_key(self, key_id: str, revoked_at_us: int) -> bool:
        return await self._run(lambda conn: conn.execute(REVOKE_KEY, (revoked_at_us, key_id)).rowcount == 1)


def _key(row: tuple) -> ApiKeyRecord:
    key_id, key_hash, workspace_id, scopes, created_at, revoked_at = row
    return ApiKeyRecord(key_id, key_hash, workspace_id, frozenset(scopes.split()), created_at, revoked_at)

