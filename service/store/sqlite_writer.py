"""The SQLite writer process: the one process that commits appends to a file
that several worker processes serve (``python -m service sqlite-writer``).

SQLite lets one connection write at a time. ``serve`` starts this process and
passes its socket to each gRPC worker (``grpc-worker --sqlite-writer``); a
worker sends the rows of an append over the socket (sqlite_wire.py) and gets
its answer once the group commit that holds them is done. Reads stay in the
workers (WAL readers neither block nor wait for the writer). Why one process
and not a writer per worker: docs/decisions/sqlite-writer-process.md.

The event loop commits, itself (a thread would only hand every group over and
its answers back): the requests read since the last commit are one group (up
to ``max_group_rows`` rows, a request never split), committed in one
transaction; their answers go out, then the timeline merge step runs if one is
due, then the next group. While a commit runs, new requests wait in the
sockets' buffers. A group of fewer than ``small_group_rows`` rows first waits
until ``commit_gap_s`` after the start of the previous commit, gathering what
arrives meanwhile; a batch of the API never waits.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import os
import signal
from collections.abc import Callable

from service.domain import StoredEvent
from service.store.base import StoreUnavailable
from service.store.sqlite_engine import GroupCommitter, SqliteFile, Tuning
from service.store.sqlite_wire import Frames, duplicates, read_frame, row_event

log = logging.getLogger(__name__)


async def serve_writer(
    store_url: str,
    socket_path: str,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[], None] | None = None,
    tuning: Tuning | None = None,
    retention_days: int | None = None,
) -> None:
    """Take appends on ``socket_path`` until ``stop`` is set (without one: SIGTERM/SIGINT).

    With ``retention_days`` it also removes expired events, a step at a time
    between group commits (GroupCommitter.expire_if_due). On stop it takes no
    new connections, answers every append it has read, and closes the file.
    """
    db = SqliteFile.from_url(store_url, tuning)
    tuning = db.tuning
    db.migrate()
    committer = GroupCommitter(db, retention_days)
    committer.open()
    loop = asyncio.get_running_loop()
    pending: collections.deque[tuple[Frames, int, list[StoredEvent]]] = collections.deque()
    pending_rows = 0
    last_commit = -math.inf  # loop time at the start of the last commit
    waiting: asyncio.TimerHandle | None = None  # a small group waiting out the gap
    idle = asyncio.Event()
    idle.set()  # cleared while a commit round is scheduled
    peers: set[asyncio.StreamWriter] = set()

    def schedule() -> None:
        """The next commit: now, or once the gap has passed if the group is small."""
        nonlocal waiting
        wait = last_commit + tuning.commit_gap_s - loop.time()
        if wait > 0 and pending_rows < tuning.small_group_rows:
            waiting = loop.call_later(wait, commit_group)
        else:
            waiting = None
            loop.call_soon(commit_group)

    def commit_group() -> None:
        nonlocal pending_rows, last_commit, waiting
        waiting = None
        last_commit = loop.time()
        group, rows = [], 0
        while pending and rows < tuning.max_group_rows:
            group.append(pending.popleft())
            rows += len(group[-1][2])
        pending_rows -= rows
        error, results = None, []
        try:
            results = committer.commit([e for _, _, events in group for e in events])
        except StoreUnavailable as exc:
            error = str(exc)
        except Exception as exc:
            log.exception("sqlite writer: commit failed")
            error = f"{type(exc).__name__}: {exc}"
        start = 0
        for answers, request_id, events in group:
            mine = results[start : start + len(events)]
            start += len(events)
            answers.send([request_id, error, [] if error is not None else duplicates(mine)])
        loop.call_soon(after_group)  # after the answers' writes, which are queued before it

    def after_group() -> None:
        try:
            committer.merge_if_due()  # SQLite errors are logged there and the step retried later
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
        answers = Frames(writer)
        try:
            while True:
                request_id, rows = await read_frame(reader)
                if not isinstance(request_id, int):
                    raise ValueError(f"request id {request_id!r} is not an integer")
                pending.append((answers, request_id, [row_event(r) for r in rows]))
                pending_rows += len(rows)
                if idle.is_set():
                    idle.clear()
                    schedule()
                elif waiting is not None and pending_rows >= tuning.small_group_rows:
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

    async def expire() -> None:
        """Retention steps on this loop: never while a commit runs (commits are callbacks)."""
        while True:
            await asyncio.sleep(tuning.retention_step_s)
            try:
                committer.expire_if_due()
            except Exception:
                log.exception("sqlite writer: retention step failed")

    expiring = asyncio.create_task(expire()) if retention_days is not None else None
    log.info("sqlite writer serving %s on %s", db.path, socket_path)
    if on_ready is not None:
        on_ready()
    try:
        await stop.wait()
    finally:
        if expiring is not None:
            expiring.cancel()
        server.close()
        await idle.wait()  # every append read so far is committed and answered
        for peer in list(peers):  # a transport's close sends what it holds; workers reconnect to a new writer
            peer.close()
        await asyncio.to_thread(committer.close)
        if os.path.exists(socket_path):
            os.unlink(socket_path)
        log.info("sqlite writer stopped")
