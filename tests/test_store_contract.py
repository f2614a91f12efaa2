"""The storage contract: every backend passes these, through the ``store`` fixture.

A store may hold other tests' data (Cassandra's is shared by the session): each
test writes in its own ``workspace`` and asserts only on that."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import itertools
import uuid

import pytest

from service.domain import DAY_S, DEFAULT_DEDUP_WINDOW_DAYS, EventQuery, StoredEvent, new_event_id, now_us, person_id_for
from service.events import EventsCore, ListInput
from service.store import ApiKeyRecord
from service.store.base import BUCKET_US

DAY0 = 19_000 * BUCKET_US  # 2022-01-08T00:00:00Z
_seq = itertools.count()


def make_event(workspace_id, external_id="user_1", event="page_viewed", ts_us=DAY0, *, parameters="{}",
               message_id=None, created_at_us=None):
    return StoredEvent(
        event_id=new_event_id(ts_us + next(_seq)),
        workspace_id=workspace_id,
        person_id=person_id_for(workspace_id, external_id),
        external_id=external_id,
        event=event,
        parameters=parameters,
        timestamp_us=ts_us,
        # a message_id is remembered for the dedup window from when its event was received: now
        created_at_us=created_at_us if created_at_us is not None else now_us() if message_id else ts_us + 1,
        message_id=message_id,
    )


def as_read(*events):
    """Events as reads return them: the message_id is not kept with the event."""
    return [dataclasses.replace(e, message_id=None) for e in events]


def mid():
    return str(uuid.uuid4())


def query(workspace_id, external_id="user_1", **kw):
    return EventQuery(workspace_id=workspace_id, person_id=person_id_for(workspace_id, external_id), **kw)


def newest_first(events):
    return sorted(events, key=lambda e: (e.timestamp_us, e.event_id), reverse=True)


async def test_unknown_person_is_an_empty_page(store, workspace):
    page = await store.list_events(query(workspace, "nobody"))
    assert page.events == [] and page.total == 0


async def test_round_trips_every_field(store, workspace):
    e = make_event(workspace, parameters='{"amount":99.99,"n":2,"items":[{"sku":"A"}],"ok":true,"none":null}')
    await store.append([e])
    page = await store.list_events(query(workspace))
    assert page.events == [e] and page.total == 1


async def test_lists_newest_first_by_timestamp_then_id(store, workspace):
    same_time = [make_event(workspace, ts_us=DAY0 + 5) for _ in range(3)]
    others = [make_event(workspace, ts_us=DAY0 + d) for d in (1, 9, 3 * BUCKET_US, -BUCKET_US)]
    await store.append(same_time + others)
    page = await store.list_events(query(workspace))
    assert page.events == newest_first(same_time + others)
    assert page.total == 7


async def test_limit_offset_and_exact_total(store, workspace):
    events = [make_event(workspace, ts_us=DAY0 + i * BUCKET_US // 7) for i in range(40)]  # ~6 days
    await store.append(events)
    ordered = newest_first(events)
    for limit, offset in [(5, 0), (10, 7), (50, 0), (3, 38), (10, 40), (1, 100)]:
        page = await store.list_events(query(workspace, limit=limit, offset=offset))
        assert page.events == ordered[offset:offset + limit], (limit, offset)
        assert page.total == 40


async def test_event_filter(store, workspace):
    events = [make_event(workspace, event=name, ts_us=DAY0 + i * 3_600_000_000)
              for i, name in enumerate(["a", "b", "a", "c", "a"] * 10)]
    await store.append(events)
    page = await store.list_events(query(workspace, event="a", limit=7, offset=2))
    wanted = newest_first([e for e in events if e.event == "a"])
    assert page.events == wanted[2:9] and page.total == 30
    assert (await store.list_events(query(workspace, event="zzz"))).total == 0


@pytest.mark.parametrize("since,until", [
    (DAY0, DAY0 + 2 * BUCKET_US),                       # whole buckets
    (DAY0 + 5 * 3_600_000_000, DAY0 + 50 * 3_600_000_000),  # partial edges
    (DAY0 + 3_600_000_000, DAY0 + 2 * 3_600_000_000),   # inside one bucket
    (None, DAY0 + BUCKET_US + 1),
    (DAY0 + BUCKET_US - 1, None),
])
async def test_time_window_is_since_inclusive_until_exclusive(store, workspace, since, until):
    hour = 3_600_000_000
    events = [make_event(workspace, event="ab"[i % 2], ts_us=DAY0 - 6 * hour + i * hour) for i in range(90)]
    # events exactly on the boundaries
    events += [make_event(workspace, ts_us=t) for t in (since, until) if t is not None]
    await store.append(events)
    inside = [e for e in events if (since is None or e.timestamp_us >= since) and (until is None or e.timestamp_us < until)]
    page = await store.list_events(query(workspace, since_us=since, until_us=until, limit=500))
    assert page.events == newest_first(inside) and page.total == len(inside)
    page = await store.list_events(query(workspace, since_us=since, until_us=until, event="a", limit=3, offset=1))
    wanted = newest_first([e for e in inside if e.event == "a"])
    assert page.events == wanted[1:4] and page.total == len(wanted)


async def test_people_and_workspaces_are_isolated(store, workspace):
    mine = make_event(workspace, "alice")
    await store.append([mine, make_event(workspace, "bob"), make_event(f"{workspace}_other", "alice")])
    page = await store.list_events(query(workspace, "alice"))
    assert page.events == [mine] and page.total == 1


async def test_appends_accumulate(store, workspace):
    first = [make_event(workspace, ts_us=DAY0 + i) for i in range(5)]
    second = [make_event(workspace, ts_us=DAY0 + i) for i in range(5)]
    await store.append(first)
    await store.append(second)
    page = await store.list_events(query(workspace, limit=500))
    assert page.total == 10 and page.events == newest_first(first + second)


async def test_workspaces_and_keys(store, workspace):
    # key ids and hashes are global, not per workspace: this test's own
    key_id, key_hash = f"k_{workspace}", hashlib.sha256(workspace.encode()).hexdigest()
    assert await store.ensure_workspace(workspace, 1) is True
    assert await store.ensure_workspace(workspace, 2) is False
    assert workspace in await store.list_workspaces()
    key = ApiKeyRecord(key_id, key_hash, workspace, frozenset({"events:read"}), 10)
    await store.put_key(key)
    assert await store.key_by_hash(key_hash) == key
    assert await store.key_by_hash(hashlib.sha256(f"{workspace}_unknown".encode()).hexdigest()) is None
    assert await store.list_keys(workspace) == [key]
    assert key in await store.list_keys()
    assert await store.revoke_key(key_id, 20) is True
    revoked = await store.key_by_hash(key_hash)
    assert revoked.revoked and revoked.revoked_at_us == 20
    assert await store.revoke_key(key_id, 30) is True
    assert (await store.key_by_hash(key_hash)).revoked_at_us == 20  # the first revocation time stays
    assert await store.revoke_key(f"{key_id}_missing", 30) is False


# Idempotent ingest -------------------------------------------------------------


async def test_a_duplicate_message_id_stores_nothing_and_names_the_original(store, workspace):
    m = mid()
    first = make_event(workspace, "alice", "purchase", message_id=m)
    assert await store.append([first]) == [None]
    copy = make_event(workspace, "bob", "other", ts_us=DAY0 + 5 * BUCKET_US, message_id=m)  # the first wins, whatever these say
    assert await store.append([copy]) == [(first.event_id, first.person_id)]
    assert await store.append([copy]) == [(first.event_id, first.person_id)]
    page = await store.list_events(query(workspace, "alice"))
    assert page.events == as_read(first) and page.total == 1
    assert (await store.list_events(query(workspace, "bob"))).total == 0
    assert (await store.list_events(query(workspace, "alice", event="purchase"))).total == 1


async def test_batches_dedup_per_event_and_within_the_batch(store, workspace):
    m1, m2, m3 = mid(), mid(), mid()
    a, b, plain = make_event(workspace, message_id=m1, ts_us=DAY0 + 1), make_event(workspace, message_id=m2, ts_us=DAY0 + 2), make_event(workspace)
    inner = make_event(workspace, message_id=m3, ts_us=DAY0 + 3)
    inner_copy = make_event(workspace, message_id=m3, ts_us=DAY0 + 4)
    assert await store.append([a, b, plain, inner, inner_copy]) == [
        None, None, None, None, (inner.event_id, inner.person_id)]
    fresh, plain_again = make_event(workspace, message_id=mid(), ts_us=DAY0 + 5), make_event(workspace, ts_us=DAY0 + 6)
    replay = [make_event(workspace, message_id=m1), fresh, make_event(workspace, message_id=m2), plain_again]
    assert await store.append(replay) == [(a.event_id, a.person_id), None, (b.event_id, b.person_id), None]
    stored = [a, b, plain, inner, fresh, plain_again]  # events without a message_id are never deduplicated
    page = await store.list_events(query(workspace, limit=500))
    assert page.events == as_read(*newest_first(stored)) and page.total == 6
    window = await store.list_events(query(workspace, since_us=DAY0 + 1, until_us=DAY0 + 5))
    assert window.total == 3  # a, b, inner: the copies count nowhere
    assert (await store.list_events(query(workspace, since_us=DAY0 + 2, until_us=DAY0 + BUCKET_US))).total == 4


async def test_message_ids_are_per_workspace(store, workspace):
    m = mid()
    mine, theirs = make_event(workspace, message_id=m), make_event(f"{workspace}_other", message_id=m)
    assert await store.append([mine, theirs]) == [None, None]
    assert (await store.list_events(query(f"{workspace}_other"))).total == 1


async def test_a_message_id_is_forgotten_after_the_dedup_window(store, workspace):
    """An entry lasts the window from the time the original was received."""
    window_us = DEFAULT_DEDUP_WINDOW_DAYS * DAY_S * 1_000_000
    m = mid()
    first = make_event(workspace, message_id=m, created_at_us=now_us() - window_us + 1_500_000)  # 1.5 s of its window left
    assert await store.append([first]) == [None]
    assert await store.append([make_event(workspace, message_id=m, created_at_us=now_us())]) == [
        (first.event_id, first.person_id)]
    await asyncio.sleep(3.0)  # Cassandra's TTL counts whole seconds
    late = make_event(workspace, message_id=m, ts_us=DAY0 + 7, created_at_us=now_us())
    assert await store.append([late]) == [None]
    assert await store.append([make_event(workspace, message_id=m, created_at_us=now_us())]) == [
        (late.event_id, late.person_id)]
    assert (await store.list_events(query(workspace))).total == 2


# Cursor paging -----------------------------------------------------------------


async def walk(store, q, *, during=None):
    """Every page of a listing by page token, through the core: (events, pages)."""
    core = EventsCore(store)
    listing = ListInput(person_ref=q.person_id, limit=q.limit, event=q.event or "",
                        since_ns=None if q.since_us is None else q.since_us * 1000,
                        until_ns=None if q.until_us is None else q.until_us * 1000)
    seen, pages = [], 0
    while True:
        result = await core.list_person_events(q.workspace_id, listing)
        pages += 1
        seen += result.page.events
        if during is not None:
            await during(pages)
        if not result.next_page_token:
            return seen, pages
        assert len(result.page.events) == q.limit
        listing = dataclasses.replace(listing, page_token=result.next_page_token)


async def test_a_cursor_walk_returns_every_event_once_while_new_ones_arrive(store, workspace):
    hour = 3_600_000_000
    events = [make_event(workspace, event="ab"[i % 3 == 0], ts_us=DAY0 + (i // 4) * 7 * hour) for i in range(120)]
    events += [make_event(workspace, ts_us=DAY0 + 5 * hour) for _ in range(9)]  # a run of equal timestamps
    await store.append(events)
    arrived = []

    async def arrive(pages):  # newer events land while the walk goes on
        batch = [make_event(workspace, event="ab"[pages % 2], ts_us=DAY0 + 30 * BUCKET_US + pages * 1000 + i) for i in range(3)]
        arrived.extend(batch)
        await store.append(batch)

    seen, pages = await walk(store, query(workspace, limit=7), during=arrive)
    assert seen == newest_first(events) and pages == -(-len(events) // 7)
    total = (await store.list_events(query(workspace, limit=7, after=(seen[-1].timestamp_us, seen[-1].event_id)))).total
    assert total == len(events) + len(arrived)  # the total stays exact for the filters
    only_a = [e for e in events + arrived if e.event == "a"]
    assert (await walk(store, query(workspace, limit=5, event="a")))[0] == newest_first(only_a)
    since, until = DAY0 + 20 * hour, DAY0 + 100 * hour
    inside = [e for e in events if since <= e.timestamp_us < until]
    assert (await walk(store, query(workspace, limit=6, since_us=since, until_us=until)))[0] == newest_first(inside)
    assert (await walk(store, query(workspace, limit=500)))[1] == 1


async def test_a_cursor_page_counts_and_ends(store, workspace):
    events = [make_event(workspace, ts_us=DAY0 + i) for i in range(10)]
    await store.append(events)
    ordered = newest_first(events)
    last = ordered[4]
    page = await store.list_events(query(workspace, limit=5, after=(last.timestamp_us, last.event_id)))
    assert page.events == ordered[5:] and page.total == 10 and not page.more
    page = await store.list_events(query(workspace, limit=4, after=(last.timestamp_us, last.event_id)))
    assert page.events == ordered[5:9] and page.more
    assert (await store.list_events(query(workspace, "nobody", after=(DAY0, last.event_id)))).events == []
