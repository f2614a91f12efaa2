"""The storage contract: every backend passes these, through the ``store`` fixture.

A store may hold other tests' data (Cassandra's is shared by the session): each
test writes in its own ``workspace`` and asserts only on that."""

from __future__ import annotations

import hashlib
import itertools

import pytest

from service.domain import EventQuery, RateLimit, StoredEvent, new_event_id, person_id_for
from service.store import ApiKeyRecord
from service.store.base import BUCKET_US

DAY0 = 19_000 * BUCKET_US  # 2022-01-08T00:00:00Z
_seq = itertools.count()


def make_event(workspace_id, external_id="user_1", event="page_viewed", ts_us=DAY0, *, parameters="{}"):
    return StoredEvent(
        event_id=new_event_id(ts_us + next(_seq)),
        workspace_id=workspace_id,
        person_id=person_id_for(workspace_id, external_id),
        external_id=external_id,
        event=event,
        parameters=parameters,
        timestamp_us=ts_us,
        created_at_us=ts_us + 1,
    )


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


async def test_rate_limits_are_stored_with_the_workspace(store, workspace):
    assert await store.set_rate_limit(workspace, RateLimit(5.0, 10)) is False  # no such workspace yet
    await store.ensure_workspace(workspace, 1)
    assert await store.rate_limit(workspace) is None  # the default: none
    assert await store.set_rate_limit(workspace, RateLimit(2.5, 7)) is True
    assert await store.rate_limit(workspace) == RateLimit(2.5, 7)
    assert await store.set_rate_limit(workspace, None) is True
    assert await store.rate_limit(workspace) is None


HOUR_US = 3_600_000_000


async def test_delete_person_removes_every_event_and_count_and_nothing_else(store, workspace):
    # more entries than one removal transaction takes, over several days and two names
    alice = [make_event(workspace, "alice", "a" if i % 3 else "b", DAY0 + i * HOUR_US // 10) for i in range(1100)]
    bob = [make_event(workspace, "bob", "a", DAY0 + i * HOUR_US) for i in range(30)]
    await store.append(alice[:600] + bob)
    await store.append(alice[600:])
    windows = [{}, {"event": "a"}, {"event": "b"}, {"since_us": DAY0 + HOUR_US, "until_us": DAY0 + 3 * BUCKET_US},
               {"since_us": DAY0 + BUCKET_US}, {"until_us": DAY0 + 2 * BUCKET_US + 5}]
    bob_before = [await store.list_events(query(workspace, "bob", limit=500, **w)) for w in windows]
    assert (await store.list_events(query(workspace, "alice"))).total == 1100  # counts exist before

    assert await store.delete_person(workspace, person_id_for(workspace, "alice")) == 1100
    for w in windows:
        page = await store.list_events(query(workspace, "alice", limit=500, **w))
        assert page.events == [] and page.total == 0, w
    assert [await store.list_events(query(workspace, "bob", limit=500, **w)) for w in windows] == bob_before
    assert bob_before[0].total == 30

    assert await store.delete_person(workspace, person_id_for(workspace, "alice")) == 0  # repeating is harmless
    assert await store.delete_person(workspace, person_id_for(workspace, "nobody")) == 0
    later = make_event(workspace, "alice", "a", DAY0 + 5)  # tracked after the delete: kept
    await store.append([later])
    for w in windows[:2]:
        page = await store.list_events(query(workspace, "alice", **w))
        assert page.events == [later] and page.total == 1
