"""Cassandra goes away and comes back: the store fails fast, never hangs, and
recovers by itself with every acknowledged event intact.

These tests stop the local node (scripts/cassandra.sh down --kill, or SIGSTOP),
so they run after every other test (marker ``runs_last``, ordered by
tests/cassandra_support.py) and always leave Cassandra running.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections.abc import Awaitable, Callable

import grpc
import pytest
from cassandra_support import cassandra_address, cassandra_pid, script

from flameup.events.v1 import events_pb2 as pb
from service.domain import EventQuery, StoredEvent, new_event_id, now_us, person_id_for
from service.store.base import BUCKET_US, StoreUnavailable

pytestmark = [pytest.mark.cassandra, pytest.mark.slow, pytest.mark.runs_last]

# A dead node fails at once (no live host); a hung one within the request
# timeout (5 s by default). Either way well before this.
FAIL_WITHIN = 7.0
# The driver retries the node every 0.5 to 2 s; the node itself needs ~5-10 s to start.
RECOVER_WITHIN = 60.0


@pytest.fixture
def managed_node():
    """A node these tests may stop; restarted afterwards whatever happened."""
    if not cassandra_address()[2]:
        pytest.skip("FLAMEUP_TEST_CASSANDRA names a node these tests must not stop")
    yield
    if script("status", timeout=30).returncode != 0:
        done = script("up")
        assert done.returncode == 0, f"could not restart cassandra:\n{done.stdout}{done.stderr}"


def events_for(workspace: str, external_id: str, n: int) -> list[StoredEvent]:
    person = person_id_for(workspace, external_id)
    base = now_us() - 3 * BUCKET_US
    out = []
    for _ in range(n):
        ts = base + random.randrange(3 * BUCKET_US)  # spread over four days
        out.append(StoredEvent(new_event_id(now_us()), workspace, person, external_id, random.choice("ab"),
                               '{"k":1}', ts, now_us()))
    return out


async def fails_fast(make: Callable[[], Awaitable[object]]) -> float:
    """The call raises StoreUnavailable, well within FAIL_WITHIN; never hangs."""
    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as info:
        await asyncio.wait_for(make(), 30)  # a TimeoutError here would fail the test: it hung
    elapsed = time.monotonic() - started
    assert elapsed < FAIL_WITHIN, f"took {elapsed:.1f}s to fail: {info.value}"
    assert "cassandra" in str(info.value)
    return elapsed


async def recovered(make: Callable[[], Awaitable[object]]) -> float:
    """Seconds until the call succeeds again, with no reconnect or restart by anyone."""
    started = time.monotonic()
    last: Exception | None = None
    while time.monotonic() - started < RECOVER_WITHIN:
        try:
            await asyncio.wait_for(make(), 30)
            return time.monotonic() - started
        except StoreUnavailable as exc:
            last = exc
            await asyncio.sleep(0.25)
    pytest.fail(f"the store did not recover within {RECOVER_WITHIN:.0f}s: {last}")


async def stored(store, workspace: str, external_id: str) -> list[StoredEvent]:
    """Every stored event of the person, page by page; the total must match."""
    person = person_id_for(workspace, external_id)
    out: list[StoredEvent] = []
    while True:
        page = await store.list_events(EventQuery(workspace, person, limit=500, offset=len(out)))
        out.extend(page.events)
        if not page.events:
            assert page.total == len(out), "total disagrees with the rows listed"
            return out


async def test_store_fails_fast_while_cassandra_is_down_and_recovers_by_itself(cassandra_store, managed_node,
                                                                                 workspace):
    store = cassandra_store
    people = ["alice", "bob", "carol"]
    acked: dict[str, set[str]] = {p: set() for p in people}
    failures: list[float] = []
    stop = asyncio.Event()
    writes_after_restart = asyncio.Event()
    restarted = False

    async def writer() -> None:
        while not stop.is_set():
            who = random.choice(people)
            batch = events_for(workspace, who, 10)
            started = time.monotonic()
            try:
                await asyncio.wait_for(store.append(batch), 30)
            except StoreUnavailable:
                failures.append(time.monotonic() - started)
                await asyncio.sleep(0.05)
                continue
            acked[who].update(e.event_id for e in batch)
            if restarted:
                writes_after_restart.set()

    task = asyncio.create_task(writer())
    try:
        await asyncio.sleep(1.0)
        assert sum(map(len, acked.values())) > 0, "nothing was acknowledged before the outage"
        done = await asyncio.to_thread(script, "down", "--kill")
        assert done.returncode == 0, done.stderr
        await asyncio.sleep(0.5)

        q = EventQuery(workspace, person_id_for(workspace, "alice"))
        await fails_fast(lambda: store.append(events_for(workspace, "alice", 3)))
        await fails_fast(lambda: store.list_events(q))
        await fails_fast(lambda: store.key_by_hash("ab" * 32))  # the authentication hot path
        await fails_fast(lambda: store.ensure_workspace(workspace, 1))
        assert failures and max(failures) < FAIL_WITHIN

        done = await asyncio.to_thread(script, "up")
        assert done.returncode == 0, f"{done.stdout}{done.stderr}"
        restarted = True
        seconds = await recovered(lambda: store.list_events(q))
        print(f"\nrecovered {seconds:.1f}s after the node answered CQL again")
        await asyncio.wait_for(writes_after_restart.wait(), RECOVER_WITHIN)
    finally:
        stop.set()
        await task

    for who in people:
        ids = [e.event_id for e in await stored(store, workspace, who)]
        missing = acked[who] - set(ids)
        assert not missing, f"{len(missing)} of {len(acked[who])} acknowledged events of {who} are gone"
        assert len(ids) == len(set(ids))


async def test_a_hung_node_times_out_instead_of_hanging(cassandra_store, managed_node, workspace):
    store = cassandra_store
    before = events_for(workspace, "dave", 20)
    await store.append(before)
    pid = cassandra_pid()
    assert pid, "no pid for the local node"
    q = EventQuery(workspace, person_id_for(workspace, "dave"), limit=100)
    os.kill(pid, signal.SIGSTOP)  # connections stay open, nothing answers
    try:
        await fails_fast(lambda: store.list_events(q))
        await fails_fast(lambda: store.append(events_for(workspace, "dave", 3)))
    finally:
        os.kill(pid, signal.SIGCONT)
    await recovered(lambda: store.list_events(q))
    assert {e.event_id for e in before} <= {e.event_id for e in await stored(store, workspace, "dave")}


def test_grpc_answers_unavailable_while_cassandra_is_down(cassandra_url, managed_node, workspace):
    from service_support import start_service, stop_service

    svc = start_service(cassandra_url)
    try:
        stub, md = svc.stub(), svc.metadata(svc.create_key(workspace))

        def batch(who: str, n: int):
            return stub.TrackBatch(pb.TrackBatchRequest(events=[
                pb.TrackRequest(external_id=who, event="outage_test") for _ in range(n)]),
                metadata=md, timeout=20)

        acked = set(batch("erin", 20).event_ids)
        assert script("down", "--kill", timeout=60).returncode == 0
        for call in (lambda: batch("erin", 1),
                     lambda: stub.ListPersonEvents(pb.ListPersonEventsRequest(
                         person_id="erin", id_type="external_id"), metadata=md, timeout=20)):
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value
            assert time.monotonic() - started < FAIL_WITHIN
        done = script("up")
        assert done.returncode == 0, f"{done.stdout}{done.stderr}"
        deadline = time.monotonic() + RECOVER_WITHIN
        while True:
            try:
                acked |= set(batch("erin", 5).event_ids)
                break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                assert time.monotonic() < deadline, f"the service did not recover: {exc}"
                time.sleep(0.25)
        page = stub.ListPersonEvents(pb.ListPersonEventsRequest(person_id="erin", id_type="external_id",
                                                                limit=500), metadata=md, timeout=20)
        assert page.total == len(acked) and {e.id for e in page.events} == acked
    finally:
        assert stop_service(svc) == 0, "".join(svc.output)
