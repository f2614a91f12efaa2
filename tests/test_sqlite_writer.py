"""The SQLite writer process's socket: what a worker sees when the writer is gone or a peer misbehaves.

The store contract suite runs through the writer too (the ``sqlite_writer``
backend of the ``store`` fixture); these are the failure cases.
"""

from __future__ import annotations

import asyncio
import struct

import pytest

from service.domain import EventQuery, StoredEvent, new_event_id, now_us, person_id_for
from service.store import StoreUnavailable
from service.store.sqlite import SqliteStore
from service.store.sqlite_writer import MAX_FRAME_BYTES


def event(external_id: str) -> StoredEvent:
    at = now_us()
    return StoredEvent(new_event_id(at), "ws_w", person_id_for("ws_w", external_id), external_id, "signed_in",
                       "{}", at, at)


async def test_a_gone_writer_is_unavailable_and_a_restarted_one_is_used_again(sqlite_writer):
    writer = await sqlite_writer()
    store = SqliteStore.from_url(writer.store_url)
    await store.open()
    try:
        first = event("u1")
        await store.append([first])
        await writer.close()  # commits what it holds, closes the connection, removes the socket
        with pytest.raises(StoreUnavailable, match="writer"):
            await store.append([event("u1")])

        await sqlite_writer()
        second = event("u1")
        await store.append([second])  # reconnects
        page = await store.list_events(EventQuery("ws_w", first.person_id))
        assert page.total == 2 and {e.event_id for e in page.events} == {first.event_id, second.event_id}
    finally:
        await store.close()


async def test_the_writer_drops_a_peer_that_sends_garbage_and_serves_the_others(sqlite_writer):
    writer = await sqlite_writer()
    store = SqliteStore.from_url(writer.store_url)
    await store.open()
    try:
        for body in (b"{{{", b"[1,2]", b'[1,[["ws","p","e","x","n","{}","not a time",0]]]', b'["1",[]]'):
            await assert_dropped(writer.socket_path, struct.pack(">I", len(body)) + body)
        await assert_dropped(writer.socket_path, struct.pack(">I", MAX_FRAME_BYTES + 1))
        good = event("u2")
        await store.append([good])
        assert (await store.list_events(EventQuery("ws_w", good.person_id))).events == [good]
    finally:
        await store.close()


async def assert_dropped(socket_path: str, frame: bytes) -> None:
    """The writer closes the connection without an answer."""
    reader, writer = await asyncio.open_unix_connection(socket_path)
    writer.write(frame)
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
