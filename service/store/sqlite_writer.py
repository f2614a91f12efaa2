"""One writer process for a SQLite file that several worker processes serve.

SQLite lets one connection write at a time. When every gRPC worker commits its
own groups, the workers queue on the file's write lock (SQLite's busy handler
polls it with sleeps of 1 to 100 ms) and each commit competes with its own
worker's request handling for the GIL; both showed up as commit stalls and as
p99 latency. So ``serve`` starts one writer process
(``python -m service sqlite-writer``) that owns every append: a worker sends
the rows of an append over a Unix socket and gets its answer once the group
commit that holds them is done. Reads stay in the workers (WAL readers neither
block nor wait for the writer).

A worker's store URL names the socket: ``sqlite:///./data/events.db?writer=/tmp/flameup-x/appends.sock``;
``serve`` adds it, in a directory only its user can enter.

Frames on the socket: a 4-byte big-endian length, then JSON.

- request: ``[id, [[workspace_id, person_id, event_id, external_id, event, parameters, ts_us, created_at_us,
  message_id or null], ...]]``
- response: ``[id, null, [[index, event_id, person_id], ...]]`` once committed, listing the
  request's duplicates (by message_id) with their originals; or ``[id, "why not", []]``
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import math
import os
import signal
import struct
from collections.abc import Callable, Sequence

import orjson

from service.domain import Original, StoredEvent
from service.store.base import StoreUnavailable

log = logging.getLogger(__name__)

_HEADER = struct.Struct(">I")
# An append is at most a batch of the API (100 events of up to 32 KiB each) or a
# bulk load; the writer refuses bigger frames rather than buffering without bound.
MAX_FRAME_BYTES = 64 * 1024 * 1024
# A group smaller than SMALL_GROUP_ROWS waits until COMMIT_GAP_S after the start of
# the previous commit: under single events a commit held 2 or 3 of them, and each
# cost the writer a transaction and a WAL write of its pages. Back to back with the
# gap: the writer's CPU per event under grpc_track 76-81 -> 66-68 µs, grpc_track
# 3.2-3.4k -> 3.6-3.7k events/s at p99 30 -> 22-24 ms, rest_track p99 32-33 ->
# 21-27 ms. A batch of the API (100 rows) never waits: with a few batches in
# flight, a wait for every group only idled the writer (grpc_batch 5% slower).
COMMIT_GAP_S = 0.002
SMALL_GROUP_ROWS = 64


def _frame(payload: object) -> bytes:
    body = orjson.dumps(payload)
    return _HEADER.pack(len(body)) + body


async def _read_frame(reader: asyncio.StreamReader) -> object:
    (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    if size > MAX_FRAME_BYTES:
        raise ValueError(f"frame of {size} bytes is over the {MAX_FRAME_BYTES} byte limit")
    return orjson.loads(await reader.readexactly(size))


def _row(e: StoredEvent) -> tuple:
    return (e.workspace_id, e.person_id, e.event_id, e.external_id, e.event, e.parameters, e.timestamp_us,
            e.created_at_us, e.message_id)


def _event(row: Sequence) -> StoredEvent:
    workspace_id, person_id, event_id, external_id, event, parameters, ts_us, created_at_us, message_id = row
    if not (all(isinstance(v, str) for v in row[:6]) and all(type(v) is int for v in row[6:8])
            and (message_id is None or isinstance(message_id, str))):
        raise ValueError("a row is not six strings, two integers and a message_id (string or null)")
    return StoredEvent(event_id, workspace_id, person_id, external_id, event, parameters, ts_us, created_at_us,
                       message_id)


def _duplicates(results: Sequence[Original | None]) -> list[list]:
    return [[i, *original] for i, original in enumerate(results) if original is not None]


class _Frames:
    """Frames written to a stream, coalesced: every frame queued while the event
    loop runs one round goes out in one write (one system call), not one each."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self._queued: list[bytes] = []

    def send(self, payload: object) -> None:
        if not self._queued:
            asyncio.get_running_loop().call_soon(self._flush)
        self._queued.append(_frame(payload))

    def _flush(self) -> None:
        frames, self._queued = self._queued, []
        if not self.writer.is_closing():
            self.writer.write(b"".join(frames))


class WriterClient:
    """A worker's end: appends go to the writer process, many in flight on one connection."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._frames: _Frames | None = None
        self._reading: asyncio.Task | None = None
        self._connecting = asyncio.Lock()

    async def append(self, events: Sequence[StoredEvent]) -> list[Original | None]:
        frames = await self._connection()
        request_id = next(self._ids)
        answer = asyncio.get_running_loop().create_future()
        self._pending[request_id] = answer
        frames.send([request_id, [_row(e) for e in events]])
        # A cancelled caller must not lose track of a commit in flight: it completes anyway.
        error, duplicates = await asyncio.shield(answer)
        if error is not None:
            raise StoreUnavailable(f"sqlite writer: {error}")
        results: list[Original | None] = [None] * len(events)
        for i, event_id, person_id in duplicates:
            results[i] = (event_id, person_id)
        return results

    async def _connection(self) -> _Frames:
        async with self._connecting:
            if self._writer is None or self._writer.is_closing():
                try:
                    reader, self._writer = await asyncio.open_unix_connection(self.socket_path)
                except OSError as exc:
                    raise StoreUnavailable(f"cannot reach the sqlite writer at {self.socket_path}: {exc}") from exc
                self._frames = _Frames(self._writer)
                self._reading = asyncio.create_task(self._read_answers(reader, self._writer))
            return self._frames

    async def _read_answers(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        reason = "closed the connection"
        try:
            while True:
                request_id, error, duplicates = await _read_frame(reader)
                answer = self._pending.pop(request_id, None)
                if answer is not None and not answer.done():
                    answer.set_result((error, duplicates))
        except asyncio.IncompleteReadError:
            pass
        except Exception as exc:  # a broken frame or socket: nothing more can be trusted on it
            reason = f"{type(exc).__name__}: {exc}"
        finally:
            writer.close()
            # Whether these were committed is unknown: the callers see UNAVAILABLE, as for a timeout.
            pending, self._pending = self._pending, {}
            for answer in pending.values():
                if not answer.done():
                    answer.set_result((f"the writer process {reason} before answering", []))

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._reading is not None:
            await asyncio.gather(self._reading, return_exceptions=True)
        self._writer = self._frames = self._reading = None


async def serve_writer(store_url: str, socket_path: str, stop: asyncio.Event | None = None,
                       on_ready: Callable[[], None] | None = None) -> None:
    """Take appends on ``socket_path`` until ``stop`` is set (without one: SIGTERM/SIGINT).

    The event loop commits, itself: the requests read since the last commit
    are one group (up to MAX_GROUP_ROWS rows, a request never split), committed
    in one transaction; their answers go out, then the timeline merge step runs
    if one is due, then the next group. While a commit runs, new requests wait
    in the sockets' buffers. A group of fewer than SMALL_GROUP_ROWS rows first
    waits until COMMIT_GAP_S after the start of the previous commit, gathering
    what arrives meanwhile. On stop it takes no new connections, answers every
    append it has read, and closes the store.
    """
    from service.store.sqlite import MAX_GROUP_ROWS, SqliteStore

    store = SqliteStore.from_url(store_url)
    await store.open(caller_commits=True)
    loop = asyncio.get_running_loop()
    pending: collections.deque[tuple[_Frames, int, list[StoredEvent]]] = collections.deque()
    pending_rows = 0
    last_commit = -math.inf  # loop time at the start of the last commit
    waiting: asyncio.TimerHandle | None = None  # a small group waiting out the gap
    idle = asyncio.Event()
    idle.set()  # cleared while a commit round is scheduled
    peers: set[asyncio.StreamWriter] = set()

    def schedule() -> None:
        """The next commit: now, or once the gap has passed if the group is small."""
        nonlocal waiting
        wait = last_commit + COMMIT_GAP_S - loop.time()
        if wait > 0 and pending_rows < SMALL_GROUP_ROWS:
            waiting = loop.call_later(wait, commit_group)
        else:
            waiting = None
            loop.call_soon(commit_group)

    def commit_group() -> None:
        nonlocal pending_rows, last_commit, waiting
        waiting = None
        last_commit = loop.time()
        group, rows = [], 0
        while pending and rows < MAX_GROUP_ROWS:
            group.append(pending.popleft())
            rows += len(group[-1][2])
        pending_rows -= rows
        error, results = None, []
        try:
            results = store.commit_group([e for _, _, events in group for e in events])
        except StoreUnavailable as exc:
            error = str(exc)
        except Exception as exc:
            log.exception("sqlite writer: commit failed")
            error = f"{type(exc).__name__}: {exc}"
        start = 0
        for answers, request_id, events in group:
            mine = results[start:start + len(events)]
            start += len(events)
            answers.send([request_id, error, [] if error is not None else _duplicates(mine)])
        loop.call_soon(after_group)  # after the answers' writes, which are queued before it

    def after_group() -> None:
        try:
            store.merge_if_due()  # SQLite errors are logged there and the step retried later
        except Exception:
            log.exception("sqlite writer: timeline merge step failed")
        finally:  # the next group (or the end of stop) never waits on a failed step
            if pending:
                schedule()
            else:
                idle.set()

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal pending_rows
        peers.add(writer)
        answers = _Frames(writer)
        try:
            while True:
                request_id, rows = await _read_frame(reader)
                if not isinstance(request_id, int):
                    raise ValueError(f"request id {request_id!r} is not an integer")
                pending.append((answers, request_id, [_event(r) for r in rows]))
                pending_rows += len(rows)
                if idle.is_set():
                    idle.clear()
                    schedule()
                elif waiting is not None and pending_rows >= SMALL_GROUP_ROWS:
                    waiting.cancel()  # no longer small: schedule() commits it now
                    schedule()
        except asyncio.IncompleteReadError:
            pass  # the worker closed its end
        except Exception as exc:
            log.warning("sqlite writer: dropping a connection: %s: %s", type(exc).__name__, exc)
            writer.close()
        finally:
            peers.discard(writer)

    if os.path.exists(socket_path):
        os.unlink(socket_path)  # a stale socket of a previous run
    server = await asyncio.start_unix_server(connection, path=socket_path)
    os.chmod(socket_path, 0o600)
    if stop is None:
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    log.info("sqlite writer serving %s on %s", store.path, socket_path)
    if on_ready is not None:
        on_ready()
    try:
        await stop.wait()
    finally:
        server.close()
        await idle.wait()  # every append read so far is committed and answered
        for peer in list(peers):  # a transport's close sends what it holds; workers reconnect to a new writer
            peer.close()
        await store.close()
        if os.path.exists(socket_path):
            os.unlink(socket_path)
        log.info("sqlite writer stopped")
