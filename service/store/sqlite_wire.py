"""The SQLite writer process's socket protocol, and a worker's end of it.

Frames on the Unix socket: a 4-byte big-endian length, then JSON.

- request: ``[id, [[workspace_id, person_id, event_id, external_id, event, parameters, ts_us, created_at_us,
  message_id or null], ...]]``
- response: ``[id, null, [[index, event_id, person_id], ...]]`` once committed, listing the
  request's duplicates (by message_id) with their originals; or ``[id, "why not", []]``

``WriterClient`` keeps many appends in flight on one connection and
reconnects after the writer process went away.
"""

from __future__ import annotations

import asyncio
import itertools
import struct
from collections.abc import Sequence
from typing import Any

import orjson

from service.domain import Original, StoredEvent
from service.store.base import StoreUnavailable

_HEADER = struct.Struct(">I")
# An append is at most a batch of the API (100 events of up to 32 KiB each) or a
# bulk load; the writer refuses bigger frames rather than buffering without bound.
MAX_FRAME_BYTES = 64 * 1024 * 1024


def frame(payload: object) -> bytes:
    body = orjson.dumps(payload)
    return _HEADER.pack(len(body)) + body


async def read_frame(reader: asyncio.StreamReader) -> Any:
    (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    if size > MAX_FRAME_BYTES:
        raise ValueError(f"frame of {size} bytes is over the {MAX_FRAME_BYTES} byte limit")
    return orjson.loads(await reader.readexactly(size))


def event_row(e: StoredEvent) -> tuple:
    return (
        e.workspace_id,
        e.person_id,
        e.event_id,
        e.external_id,
        e.event,
        e.parameters,
        e.timestamp_us,
        e.created_at_us,
        e.message_id,
    )


def row_event(row: Sequence) -> StoredEvent:
    workspace_id, person_id, event_id, external_id, event, parameters, ts_us, created_at_us, message_id = row
    if not (
        all(isinstance(v, str) for v in row[:6])
        and all(type(v) is int for v in row[6:8])
        and (message_id is None or isinstance(message_id, str))
    ):
        raise ValueError("a row is not six strings, two integers and a message_id (a string or null)")
    return StoredEvent(
        event_id, workspace_id, person_id, external_id, event, parameters, ts_us, created_at_us, message_id
    )


def duplicates(results: Sequence[Original | None]) -> list[list]:
    """A response's duplicates: [index, event_id, person_id] of each."""
    return [[i, *original] for i, original in enumerate(results) if original is not None]


class Frames:
    """Frames written to a stream, coalesced: every frame queued while the event
    loop runs one round goes out in one write (one system call), not one each."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self._queued: list[bytes] = []

    def send(self, payload: object) -> None:
        if not self._queued:
            asyncio.get_running_loop().call_soon(self._flush)
        self._queued.append(frame(payload))

    def _flush(self) -> None:
        frames, self._queued = self._queued, []
        if not self.writer.is_closing():
            self.writer.write(b"".join(frames))


class WriterClient:
    """A worker's end: appends go to the writer process, many in flight on one connection."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[tuple[str | None, list]]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._frames: Frames | None = None
        self._reading: asyncio.Task | None = None
        self._connecting = asyncio.Lock()

    async def append(self, events: Sequence[StoredEvent]) -> list[Original | None]:
        frames = await self._connection()
        request_id = next(self._ids)
        answer = asyncio.get_running_loop().create_future()
        self._pending[request_id] = answer
        frames.send([request_id, [event_row(e) for e in events]])
        # A cancelled caller must not lose track of a commit in flight: it completes anyway.
        error, found = await asyncio.shield(answer)  # (str | None, [[index, event_id, person_id], ...])
        if error is not None:
            raise StoreUnavailable(f"sqlite writer: {error}")
        results: list[Original | None] = [None] * len(events)
        for i, event_id, person_id in found:
            results[i] = (event_id, person_id)
        return results

    async def _connection(self) -> Frames:
        async with self._connecting:
            if self._writer is None or self._writer.is_closing():
                try:
                    reader, self._writer = await asyncio.open_unix_connection(self.socket_path)
                except OSError as exc:
                    raise StoreUnavailable(f"cannot reach the sqlite writer at {self.socket_path}: {exc}") from exc
                self._frames = Frames(self._writer)
                self._reading = asyncio.create_task(self._read_answers(reader, self._writer))
            assert self._frames is not None
            return self._frames

    async def _read_answers(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        reason = "closed the connection"
        try:
            while True:
                request_id, error, found = await read_frame(reader)
                answer = self._pending.pop(request_id, None)
                if answer is not None and not answer.done():
                    answer.set_result((error, found))
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
