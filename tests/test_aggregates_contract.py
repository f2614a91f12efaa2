"""The aggregates' contract: every store's person summary, event counts and event
names equal what counting the stored events gives, through the ``store`` fixture
(every backend). The property tests draw random sequences of tracks, batches,
backdated events, duplicates (message_id) and retried appends and compare every
aggregate with a count over the events the store lists back."""

from __future__ import annotations

import asyncio
import secrets
from collections import Counter, defaultdict

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.domain import DAY_US, HOUR_US, CountBucket, NameStats, by_last_seen
from tests.test_store_contract import DAY0, make_event, query

NAMES = ("cart_updated", "purchase_completed", "page_viewed")


def name_stats(events) -> list[NameStats]:
    """What a count over the events gives, per event name."""
    by_name = defaultdict(list)
    for e in events:
        by_name[e.event].append(e.timestamp_us)
    return by_last_seen([NameStats(name, len(ts), min(ts), max(ts)) for name, ts in by_name.items()])


def counted_buckets(events, event, interval_us, start_us, end_us) -> list[CountBucket]:
    n, persons = Counter(), defaultdict(set)
    for e in events:
        if (event is None or e.event == event) and start_us <= e.timestamp_us < end_us:
            start = e.timestamp_us // interval_us * interval_us
            n[start] += 1
            persons[start].add(e.person_id)
    return [CountBucket(start, n[start], len(persons[start])) for start in sorted(n)]


def within(events, since, until):
    return [e for e in events if (since is None or e.timestamp_us >= since) and (until is None or e.timestamp_us < until)]


async def stored_events(store, workspace, external_ids):
    """Every event the store lists back for these persons (the reference the aggregates must equal)."""
    events = []
    for external_id in external_ids:
        offset = 0
        while True:
            page = await store.list_events(query(workspace, external_id, limit=500, offset=offset))
            events += page.events
            offset += len(page.events)
            if offset >= page.total:
                break
    return events


async def check_all(store, workspace, external_ids, windows):
    """Every aggregate against a count of the stored events; on a store that
    writes counts back for later readers, again once they are stored."""
    await check_aggregates(store, workspace, external_ids, windows)
    if hasattr(store, "wait_for_writebacks"):
        await store.wait_for_writebacks()
        await check_aggregates(store, workspace, external_ids, windows)


async def check_aggregates(store, workspace, external_ids, windows):
    events = await stored_events(store, workspace, external_ids)
    for since, until in windows:
        for external_id in external_ids:
            mine = [e for e in events if e.external_id == external_id]
            got = by_last_seen(await store.person_summary(workspace, mine[0].person_id if mine else
                                                          query(workspace, external_id).person_id, since, until))
            assert got == name_stats(within(mine, since, until)), (external_id, since, until)
        hour_since = None if since is None else since // HOUR_US * HOUR_US
        hour_until = None if until is None else -(-until // HOUR_US) * HOUR_US
        got = by_last_seen(await store.event_names(workspace, hour_since, hour_until))
        assert got == name_stats(within(events, hour_since, hour_until)), (since, until)
    for interval in (HOUR_US, DAY_US):
        start = (DAY0 - 3 * DAY_US) // interval * interval
        end = DAY0 + 4 * DAY_US
        for event in (None, *NAMES):
            got = await store.event_counts(workspace, event, interval, start, end)
            assert got == counted_buckets(events, event, interval, start, end), (event, interval)


async def test_an_unknown_person_and_an_empty_workspace(store, workspace):
    assert await store.person_summary(workspace, query(workspace, "nobody").person_id, None, None) == []
    assert await store.event_names(workspace, None, None) == []
    assert await store.event_counts(workspace, None, DAY_US, DAY0, DAY0 + DAY_US) == []


async def test_person_summary_counts_first_and_last(store, workspace):
    events = [make_event(workspace, event=name, ts_us=DAY0 + i * 5 * HOUR_US)
              for i, name in enumerate(["cart_updated", "purchase_completed", "cart_updated"] * 5)]
    events.append(make_event(workspace, "someone_else", event="cart_updated", ts_us=DAY0 + 100 * DAY_US))
    await store.append(events)
    person = query(workspace).person_id
    got = by_last_seen(await store.person_summary(workspace, person, None, None))
    cart = [e.timestamp_us for e in events[:15] if e.event == "cart_updated"]
    buys = [e.timestamp_us for e in events[:15] if e.event == "purchase_completed"]
    assert got == [NameStats("cart_updated", 10, min(cart), max(cart)),
                   NameStats("purchase_completed", 5, min(buys), max(buys))]
    # a window with edges inside days
    since, until = DAY0 + 7 * HOUR_US, DAY0 + 2 * DAY_US + 3 * HOUR_US
    got = by_last_seen(await store.person_summary(workspace, person, since, until))
    assert got == name_stats(within(events[:15], since, until))


async def test_event_counts_per_hour_and_day_with_unique_persons(store, workspace):
    events = [make_event(workspace, f"user_{i % 4}", event=NAMES[i % 2], ts_us=DAY0 + i * 20 * 60_000_000)
              for i in range(100)]  # every 20 minutes for 33 hours, 4 persons
    await store.append(events[:60])
    await store.append(events[60:])
    for interval in (HOUR_US, DAY_US):
        for event in (None, NAMES[0], NAMES[2]):
            got = await store.event_counts(workspace, event, interval, DAY0, DAY0 + 3 * DAY_US)
            assert got == counted_buckets(events, event, interval, DAY0, DAY0 + 3 * DAY_US)
    day = await store.event_counts(workspace, None, DAY_US, DAY0, DAY0 + DAY_US)
    assert day == [CountBucket(DAY0, 72, 4)]


async def test_event_names_most_recently_seen_first(store, workspace):
    events = [make_event(workspace, f"user_{i}", event=name, ts_us=DAY0 + i * HOUR_US)
              for i, name in enumerate(["a", "b", "c", "a", "b", "a"])]
    await store.append(events)
    got = by_last_seen(await store.event_names(workspace, None, None))
    assert [s.event for s in got] == ["a", "b", "c"] and [s.count for s in got] == [3, 2, 1]
    assert got == name_stats(events)
    got = by_last_seen(await store.event_names(workspace, DAY0 + HOUR_US, DAY0 + 4 * HOUR_US))
    assert got == name_stats(events[1:4])


async def test_backdated_events_count_in_their_own_bucket(store, workspace):
    now = [make_event(workspace, ts_us=DAY0 + 10 * DAY_US + i) for i in range(3)]
    old = [make_event(workspace, "user_2", ts_us=DAY0 + 2 * HOUR_US)]
    await store.append(now)
    await store.append(old)
    await check_all(store, workspace, ["user_1", "user_2"], [(None, None), (DAY0, DAY0 + DAY_US)])
    got = await store.event_counts(workspace, None, DAY_US, DAY0, DAY0 + 11 * DAY_US)
    assert got == [CountBucket(DAY0, 1, 1), CountBucket(DAY0 + 10 * DAY_US, 3, 1)]


async def test_a_duplicate_counts_nowhere(store, workspace):
    first = make_event(workspace, event="purchase_completed", ts_us=DAY0 + HOUR_US, message_id="m1")
    assert await store.append([first]) == [None]
    copies = [make_event(workspace, "user_2", event="cart_updated", ts_us=DAY0 + 5 * DAY_US, message_id="m1"),
              make_event(workspace, event="purchase_completed", ts_us=DAY0 + HOUR_US, message_id="m1")]
    assert await store.append(copies) == [(first.event_id, first.person_id)] * 2
    assert await store.event_names(workspace, None, None) == [
        NameStats("purchase_completed", 1, first.timestamp_us, first.timestamp_us)]
    assert await store.event_counts(workspace, None, DAY_US, DAY0, DAY0 + 10 * DAY_US) == [CountBucket(DAY0, 1, 1)]
    assert await store.person_summary(workspace, copies[0].person_id, None, None) == []
    await check_all(store, workspace, ["user_1", "user_2"], [(None, None)])


async def test_concurrent_appends_count_exactly(store, workspace):
    batches = [[make_event(workspace, f"user_{(b + i) % 5}", event=NAMES[i % 3], ts_us=DAY0 + (b * 7 + i) * 600_000_000)
                for i in range(20)] for b in range(8)]
    await asyncio.gather(*(store.append(batch) for batch in batches))
    await check_all(store, workspace, [f"user_{i}" for i in range(5)],
                    [(None, None), (DAY0 + HOUR_US, DAY0 + 9 * HOUR_US)])


async def test_reads_racing_appends_never_leave_a_wrong_count(store, workspace):
    """Reads that count dirty buckets (and store their counts) while appends land in
    the same buckets: once the appends are done, every aggregate is exact."""
    person = query(workspace).person_id

    async def append(round_):
        await store.append([make_event(workspace, f"user_{i % 3}", event=NAMES[i % 2],
                                       ts_us=DAY0 + HOUR_US + round_ * 1000 + i) for i in range(10)])

    async def read():
        await store.event_counts(workspace, None, HOUR_US, DAY0, DAY0 + DAY_US)
        await store.event_counts(workspace, NAMES[0], DAY_US, DAY0, DAY0 + DAY_US)
        await store.event_names(workspace, None, None)
        await store.person_summary(workspace, person, None, None)

    for round_ in range(8):
        await asyncio.gather(append(round_), read(), read())
    await check_all(store, workspace, ["user_0", "user_1", "user_2"], [(None, None), (DAY0, DAY0 + DAY_US)])
    assert await store.event_counts(workspace, None, DAY_US, DAY0, DAY0 + DAY_US) == [CountBucket(DAY0, 80, 3)]


# Property tests ---------------------------------------------------------------

_times = st.integers(min_value=-3 * DAY_US, max_value=3 * DAY_US).map(lambda d: DAY0 + d)
# (person, event name, time, message_id or None): message ids from a small pool, so
# that copies within an append, across appends and across persons are duplicates.
_event = st.tuples(st.integers(0, 3), st.sampled_from(NAMES), _times, st.one_of(st.none(), st.integers(0, 5)))
# An append: 1 to 12 events (a track is one); whether it is retried: the same
# events again, concurrently with another append (those with a message_id are
# duplicates, the others are stored again, as a retry without one is); whether
# the aggregates are checked right after it (later appends then land in buckets
# already counted, backdated or not).
_append = st.tuples(st.lists(_event, min_size=1, max_size=12), st.booleans(), st.booleans())
_window = st.tuples(st.one_of(st.none(), _times), st.one_of(st.none(), _times)).filter(
    lambda w: w[0] is None or w[1] is None or w[0] < w[1])


async def test_aggregates_equal_a_count_of_the_stored_events(store):
    loop = asyncio.get_running_loop()

    @settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
    @given(appends=st.lists(_append, min_size=1, max_size=6), windows=st.lists(_window, max_size=2))
    def check(appends, windows):
        asyncio.run_coroutine_threadsafe(run(appends, windows), loop).result()

    async def run(appends, windows):
        workspace = f"ws_prop_{secrets.token_hex(6)}"
        people = [f"user_{p}" for p in (0, 1, 2, 3, 9)]
        for items, twice, check_now in appends:
            def prepare():
                return [make_event(workspace, f"user_{p}", event=name, ts_us=ts,
                                   message_id=None if m is None else f"m{m}") for p, name, ts, m in items]

            await store.append(prepare())
            if twice:  # retried, concurrently with another append
                await asyncio.gather(store.append(prepare()),
                                     store.append([make_event(workspace, "user_9", ts_us=DAY0)]))
            if check_now:
                await check_all(store, workspace, people, [(None, None)])
        await check_all(store, workspace, people, [(None, None), *windows])

    await asyncio.to_thread(check)
