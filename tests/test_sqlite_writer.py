"""The SQLite writer process's socket: what a worker sees when the writer is gone or a peer misbehaves.

The store contract suite runs through the writer too (the ``sqlite_writer``
backend of the ``store`` fixture); these are the failure cases.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import struct

import pytest

from service.domain import EventQuery, StoredEvent, new_event_id, now_us, person_id_for
from service.store import StoreUnavailable, open_store
from service.store.sqlite import SqliteClientStore
from service.store.sqlite_engine import GroupCommitter, Tuning
from service.store.sqlite_wire import MAX_FRAME_BYTES


def event(external_id: str) -> StoredEvent:
    at = now_us()
    return StoredEvent(new_event_id(at), "ws_w", person_id_for("ws_w", external_id), external_id, "signed_in",
                       "{}", at, at)


@contextlib.asynccontextmanager
async def worker_store(sqlite_writer, tuning: Tuning | None = None):
    """A writer process (in this loop) and a worker's store that sends it its appends."""
    writer = await sqlite_writer(tuning)
    store = SqliteClientStore.from_url(writer.store_url, writer.socket_path)
    await store.open()
    try:
        yield writer, store
    finally:
        await store.close()


def before_each_commit(monkeypatch, hook) -> None:
    """Run ``hook(events)`` ahead of every commit (it may raise to fail the commit)."""
    real_commit = GroupCommitter._commit

    def commit(self, events):
        hook(events)
        return real_commit(self, events)

    monkeypatch.setattr(GroupCommitter, "_commit", commit)


async def test_a_gone_writer_is_unavailable_and_a_restarted_one_is_used_again(sqlite_writer):
    async with worker_store(sqlite_writer) as (writer, store):
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


async def test_the_writer_drops_a_peer_that_sends_garbage_and_serves_the_others(sqlite_writer):
    async with worker_store(sqlite_writer) as (writer, store):
        for body in (b"{{{", b"[1,2]", b'[1,[["ws","p","e","x","n","{}","not a time",0]]]', b'["1",[]]'):
            await assert_dropped(writer.socket_path, struct.pack(">I", len(body)) + body)
        await assert_dropped(writer.socket_path, struct.pack(">I", MAX_FRAME_BYTES + 1))
        good = event("u2")
        await store.append([good])
        assert (await store.list_events(EventQuery("ws_w", good.person_id))).events == [good]


async def assert_dropped(socket_path: str, frame: bytes) -> None:
    """The writer closes the connection without an answer."""
    reader, writer = await asyncio.open_unix_connection(socket_path)
    writer.write(frame)
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


async def test_a_failed_commit_answers_its_appends_with_an_error_and_the_next_ones_commit(sqlite_writer, monkeypatch):
    failing = {"left": 1}

    def fail_once(events):
        if failing["left"]:
            failing["left"] -= 1
            raise sqlite3.OperationalError("disk I/O error")

    before_each_commit(monkeypatch, fail_once)
    async with worker_store(sqlite_writer) as (_, store):
        lost = event("u3")
        with pytest.raises(StoreUnavailable, match="disk I/O error"):
            await store.append([lost])
        kept = [event("u3"), event("u3")]
        await asyncio.gather(store.append(kept[:1]), store.append(kept[1:]))
        page = await store.list_events(EventQuery("ws_w", lost.person_id))
        assert page.total == 2 and {e.event_id for e in page.events} == {e.event_id for e in kept}


async def test_stopping_the_writer_answers_every_append_it_has_read(sqlite_writer, monkeypatch):
    """Stop arrives during a commit, with more requests read and waiting: they are
    committed and answered before the writer closes its connections."""
    # two requests of 10 per group
    async with worker_store(sqlite_writer, Tuning(max_group_rows=20)) as (writer, store):
        await store.append([event("warm-up")])  # connected: the next requests leave in one write
        # the first group is being committed when stop arrives; the others wait in line
        before_each_commit(monkeypatch, lambda events: writer.stop.set())
        batches = [[event(f"u{i}") for _ in range(10)] for i in range(6)]
        results = await asyncio.gather(*(store.append(b) for b in batches), return_exceptions=True)
        await writer.task
        assert results == [[None] * 10] * 6
        for b in batches:
            assert (await store.list_events(EventQuery("ws_w", b[0].person_id))).total == 10


async def test_small_appends_right_after_a_commit_wait_for_the_gap_and_share_one_commit(sqlite_writer, monkeypatch):
    groups: list[int] = []
    before_each_commit(monkeypatch, lambda events: groups.append(len(events)))
    async with worker_store(sqlite_writer, Tuning(commit_gap_s=0.3)) as (_, store):
        await store.append([event("first")])  # commits at once: nothing committed before it
        singles = [event(f"s{i}") for i in range(5)]
        appends = []
        for e in singles:  # one at a time, 20 ms apart: without the gap, each would be its own commit
            appends.append(asyncio.ensure_future(store.append([e])))
            await asyncio.sleep(0.02)
        await asyncio.gather(*appends)
        assert groups == [1, 5]
        for e in singles:
            assert (await store.list_events(EventQuery("ws_w", e.person_id))).events == [e]


async def test_a_group_of_a_whole_batch_does_not_wait_for_the_gap(sqlite_writer):
    tuning = Tuning(commit_gap_s=60.0)
    async with worker_store(sqlite_writer, tuning) as (_, store):
        await store.append([event("first")])
        batch = [event("big") for _ in range(tuning.small_group_rows)]
        await asyncio.wait_for(store.append(batch), 10)  # would sit out the 60 s gap if it waited
        # a small append waiting out the gap commits as soon as the group grows past the limit
        small = asyncio.ensure_future(store.append([event("small")]))
        await asyncio.sleep(0.05)
        assert not small.done()
        await asyncio.wait_for(store.append([event("big2") for _ in range(tuning.small_group_rows)]), 10)
        await asyncio.wait_for(small, 10)
        assert (await store.list_events(EventQuery("ws_w", person_id_for("ws_w", "big")))).total == len(batch)


async def test_open_store_with_a_writer_socket_sends_appends_there(sqlite_writer):
    writer = await sqlite_writer()
    store = open_store(writer.store_url, sqlite_writer=writer.socket_path)
    await store.open()
    try:
        await writer.close()
        with pytest.raises(StoreUnavailable, match="writer"):  # an embedded store would commit it itself
            await store.append([event("u5")])
    finally:
        await store.close()


def test_a_writer_socket_is_only_for_sqlite_and_never_part_of_the_url():
    with pytest.raises(ValueError, match="only sqlite"):
        open_store("cassandra://127.0.0.1:9042/ks", sqlite_writer="/tmp/appends.sock")
    with pytest.raises(ValueError, match="unknown parameter writer"):
        open_store("sqlite:///./data/events.db?writer=/tmp/appends.sock")
