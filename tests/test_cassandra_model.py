"""The Cassandra data model: what a list call reads for a person with a long history.

A person with 100,000 events over about 400 days. A page of the newest 50 must
read a bounded number of rows and issue a bounded number of statements, with an
exact total, however long the history is; only days that changed since their
last count are counted again.
"""

from __future__ import annotations

import asyncio
import bisect
import secrets
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import pytest

from service.domain import EventQuery, StoredEvent, new_event_id, person_id_for
from service.store.base import BUCKET_US, bucket_of
from service.store.cassandra import (
    FIRST_INDEX_PAGE,
    MAX_SHARED_BATCH_PARTITIONS,
    OUTBOX_SHARDS,
    SETTLE_US,
    CassandraStore,
)

pytestmark = [pytest.mark.cassandra, pytest.mark.slow]

N_EVENTS = 100_000
STEP_US = 347_000_000  # one event every 347 s: 100,000 events span about 400 days
NAMES = ("page_viewed", "signed_in", "purchase_completed", "searched")
END_US = 20_000 * BUCKET_US + 13 * 3_600_000_000  # 2024-10-04T13:00:00Z, mid-day
CHUNK = 5_000  # events per append call while loading


@dataclass
class Person:
    workspace_id: str
    person_id: str
    events: list[StoredEvent]  # newest first: (timestamp, event id) descending

    def query(self, **kw) -> EventQuery:
        return EventQuery(self.workspace_id, self.person_id, **kw)

    def expected(self, event=None, since=None, until=None) -> list[StoredEvent]:
        return [e for e in self.events
                if (event is None or e.event == event)
                and (since is None or e.timestamp_us >= since)
                and (until is None or e.timestamp_us < until)]


def make_person(workspace_id: str, external_id: str, n: int, step_us: int = STEP_US) -> Person:
    person_id = person_id_for(workspace_id, external_id)
    events = [
        StoredEvent(new_event_id(END_US), workspace_id, person_id, external_id, NAMES[i % len(NAMES)],
                    f'{{"i":{i}}}', END_US - i * step_us, END_US)
        for i in range(n)
    ]
    events.sort(key=lambda e: (e.timestamp_us, e.event_id), reverse=True)
    return Person(workspace_id, person_id, events)


async def load(store: CassandraStore, person: Person, concurrency: int = 2) -> float:
    """Append the person's events in big chunks through the store; seconds taken."""
    sem = asyncio.Semaphore(concurrency)

    async def one(chunk):
        async with sem:
            await store.append(chunk)

    started = time.perf_counter()
    await asyncio.gather(*(one(person.events[i:i + CHUNK]) for i in range(0, len(person.events), CHUNK)))
    return time.perf_counter() - started


@pytest.fixture(scope="module")
async def model(cassandra_session_store):
    """The session's store, a heavy person (100,000 events) and a light one (1,000)."""
    store = cassandra_session_store
    ws = f"ws_model_{secrets.token_hex(4)}"  # its own workspace: the keyspace holds other tests' data
    heavy = make_person(ws, "heavy", N_EVENTS)
    light = make_person(ws, "light", 1_000)
    seconds = await load(store, heavy)
    await load(store, light)
    print(f"\nloaded {N_EVENTS} events through append in {seconds:.1f}s ({N_EVENTS / seconds:,.0f} events/s)")
    return store, heavy, light


async def warm_list(store: CassandraStore, q: EventQuery):
    """List once (counting any day written since its last count), let the counts
    be stored, then list again with fresh statistics: what a reader pays once
    the counts are in place."""
    await store.list_events(q)
    await store.wait_for_writebacks()
    store.stats.reset()
    started = time.perf_counter()
    page = await store.list_events(q)
    return page, time.perf_counter() - started, store.stats.snapshot()


async def test_first_list_after_a_bulk_load_counts_each_dirty_day_once(model):
    store, heavy, _ = model
    days = len({bucket_of(e.timestamp_us) for e in heavy.events})
    store.stats.reset()
    page = await store.list_events(heavy.query(limit=50))
    assert page.total == N_EVENTS and page.events == heavy.events[:50]
    stats = store.stats.snapshot()
    # every day was written and never counted: each is counted once, then stored
    assert stats["counts"] == days and stats["index_rows"] == days + 1
    await store.wait_for_writebacks()
    store.stats.reset()
    page = await store.list_events(heavy.query(limit=50))
    assert page.total == N_EVENTS and store.stats.counts == 0


async def test_newest_page_reads_a_bounded_number_of_rows(model):
    store, heavy, light = model
    page, seconds, stats = await warm_list(store, heavy.query(limit=50))
    print(f"\nnewest 50 of {N_EVENTS}: {seconds * 1000:.1f} ms, {stats}")
    assert page.total == N_EVENTS
    assert page.events == heavy.events[:50]
    assert stats["counts"] == 0
    assert stats["event_rows"] == 50  # no row read twice, none skipped
    assert stats["index_rows"] <= FIRST_INDEX_PAGE  # the summary row and the newest days only
    assert stats["statements"] <= 3  # one index page, the one or two days the page spans

    # the same page of a person with 1% of the history costs the same
    light_page, _, light_stats = await warm_list(store, light.query(limit=50))
    assert light_page.total == 1_000 and light_page.events == light.events[:50]
    assert stats["statements"] <= light_stats["statements"] + 1
    assert stats["event_rows"] == light_stats["event_rows"]


async def test_event_filter_reads_the_by_name_table(model):
    store, heavy, _ = model
    wanted = heavy.expected(event="purchase_completed")
    page, seconds, stats = await warm_list(store, heavy.query(limit=50, event="purchase_completed"))
    print(f"\nnewest 50 purchase_completed of {len(wanted)}: {seconds * 1000:.1f} ms, {stats}")
    assert page.total == len(wanted) == N_EVENTS // len(NAMES)
    assert page.events == wanted[:50]
    assert stats["counts"] == 0 and stats["event_rows"] == 50
    assert stats["index_rows"] <= FIRST_INDEX_PAGE and stats["statements"] <= 3


@pytest.mark.parametrize("event", [None, "signed_in"])
@pytest.mark.parametrize("since_at, until_at, cut_hours", [
    ((8, 0), (20, 0), 0),
    ((20, 0), (4, 0), 0),
    ((8, 20), (19, 45), 2),
])
async def test_time_window_counts_only_the_cut_hours_of_its_edge_days(model, event, since_at, until_at, cut_hours):
    """Each edge day is counted from its smaller side: the part inside the window
    (20:00 to midnight, midnight to 04:00), or the part outside it, subtracted
    from the day's count (08:00 and 20:00 cut off the shorter part). The first
    list counts that side's whole hours and stores them; after it, only an hour
    the window cuts is counted row by row."""
    store, heavy, _ = model
    since = END_US - 200 * BUCKET_US + _minutes_after_end(*since_at)
    until = END_US - 100 * BUCKET_US + _minutes_after_end(*until_at)
    wanted = heavy.expected(event=event, since=since, until=until)
    page, seconds, stats = await warm_list(store, heavy.query(limit=50, offset=10, event=event,
                                                              since_us=since, until_us=until))
    print(f"\nwindow of 100 days, event={event}: {seconds * 1000:.1f} ms, {stats}")
    assert page.total == len(wanted) > 10_000 // (4 if event else 1)
    assert page.events == wanted[10:60]
    days_in_window = bucket_of(until) - bucket_of(since) + 1
    assert stats["counts"] == cut_hours
    assert stats["count_writebacks"] == 0  # the whole hours were stored by the first list
    assert stats["index_rows"] <= days_in_window
    assert 0 < stats["hour_rows"] <= 2 * 24
    assert stats["event_rows"] <= 60  # the 10 skipped rows of the newest day, then the page
    assert stats["statements"] <= 1 + 2 + cut_hours + 2  # index, both days' hours, the cut hours, the page


def _minutes_after_end(hour: int, minute: int) -> int:
    """From END_US (13:00) to hour:minute of the same day, in microseconds."""
    return ((hour - 13) * 60 + minute) * 60_000_000


async def test_stored_hour_counts_give_way_to_a_later_write(model):
    """A write into an edge day makes its stored hour counts untrusted (the
    day's written_at is after them): the next window counts those hours again,
    exactly, the new row included, and stores them anew."""
    store, heavy, _ = model
    person = make_person(heavy.workspace_id, "hours", 2_000, step_us=150_000_000)  # about 3.5 days
    await load(store, person)
    since = END_US - 2 * BUCKET_US + _minutes_after_end(5, 30)  # cuts the day before yesterday
    until = END_US - BUCKET_US + _minutes_after_end(18, 10)  # and yesterday
    query = person.query(limit=10, since_us=since, until_us=until)
    page, _, stats = await warm_list(store, query)
    assert page.total == len(person.expected(since=since, until=until)) and stats["count_writebacks"] == 0
    counts_when_warm = stats["counts"]

    # one new row inside the window and one outside it, both on the first edge day
    for ts in (since + 3_600_000_000, since - 3_600_000_000):
        extra = StoredEvent(new_event_id(END_US), person.workspace_id, person.person_id, "hours", "searched",
                            "{}", ts, END_US)
        await store.append([extra])
        person.events.insert(bisect.bisect_left([(-e.timestamp_us, e.event_id) for e in person.events],
                                                (-extra.timestamp_us, extra.event_id)), extra)
    store.stats.reset()
    page = await store.list_events(query)
    wanted = person.expected(since=since, until=until)
    assert page.total == len(wanted) and page.events == wanted[:10]
    assert store.stats.counts > counts_when_warm and store.stats.count_writebacks > 0
    await store.wait_for_writebacks()
    store.stats.reset()
    page = await store.list_events(query)
    assert page.total == len(wanted) and store.stats.counts == counts_when_warm


async def test_deep_offset_skips_whole_days_by_their_counts(model):
    store, heavy, _ = model
    page, seconds, stats = await warm_list(store, heavy.query(limit=50, offset=60_000))
    print(f"\noffset 60,000: {seconds * 1000:.1f} ms, {stats}")
    assert page.total == N_EVENTS and page.events == heavy.events[60_000:60_050]
    per_day = BUCKET_US // STEP_US + 1
    assert stats["event_rows"] <= 50 + per_day  # only the day where the page starts is read from its top
    assert stats["counts"] == 0 and stats["statements"] <= 4


async def test_a_write_dirties_only_its_day(model):
    store, _, light = model
    await warm_list(store, light.query(limit=5))
    middle = light.events[500]
    extra = StoredEvent(new_event_id(END_US), light.workspace_id, light.person_id, "light", "searched", "{}",
                        middle.timestamp_us + 1, END_US)
    await store.append([extra])
    light.events.insert(bisect.bisect_left([(-e.timestamp_us, e.event_id) for e in light.events],
                                           (-extra.timestamp_us, extra.event_id)), extra)
    store.stats.reset()
    page = await store.list_events(light.query(limit=600))
    assert page.total == 1_001 and page.events == light.events[:600]
    # the summary is dirty, so every day is looked up, but only the written day is counted
    assert store.stats.counts == 1


async def test_a_write_that_may_have_failed_keeps_its_day_dirty(model):
    """Rows of a write whose end was never marked (a crash, a timeout) are
    counted row by row on every read until SETTLE has passed, never trusted
    from a count that may have missed a late row."""
    store, _, light = model
    day = bucket_of(light.events[0].timestamp_us)
    w0 = int(time.time() * 1_000_000)
    # what _append does before the rows, and then the rows, but no end mark
    await store._mark(light.workspace_id, light.person_id, {("", day), ("", 2**62)}, stamp=w0, value=w0 + SETTLE_US)
    late = StoredEvent(new_event_id(END_US), light.workspace_id, light.person_id, "light", "searched", "{}",
                       light.events[0].timestamp_us + 1, END_US)
    await store._write_batch([(store._ps["insert_event"], (
        late.workspace_id, late.person_id, day, late.timestamp_us, late.event_id, late.event,
        late.external_id, late.parameters, late.created_at_us), 0)])
    for _ in range(2):
        store.stats.reset()
        page = await store.list_events(light.query(limit=1))
        assert page.events == [late] and page.total == len(light.events) + 1
        assert store.stats.counts == 1 and store.stats.count_writebacks == 0
        await store.wait_for_writebacks()


async def test_person_summary_reads_the_index_and_two_rows_per_event_name(model):
    """Once the counts are stored, a summary of the 100,000-event person is one read of
    its index partition (one row per event key and day: no count) and a row read at
    each end per event name, as for the 1,000-event person."""
    store, heavy, light = model
    for person in (light, heavy):
        await store.person_summary(person.workspace_id, person.person_id, None, None)
        await store.wait_for_writebacks()
        store.stats.reset()
        stats = await store.person_summary(person.workspace_id, person.person_id, None, None)
        assert sorted((s.event, s.count, s.first_us, s.last_us) for s in stats) == sorted(
            (name, len(mine), mine[-1].timestamp_us, mine[0].timestamp_us)
            for name in NAMES if (mine := person.expected(event=name)))
        days = len({bucket_of(e.timestamp_us) for e in person.events})
        snapshot = store.stats.snapshot()
        assert snapshot["counts"] == 0 and snapshot["event_rows"] == 2 * len(NAMES)
        assert snapshot["statements"] <= 1 + -(-snapshot["index_rows"] // 2000) + 2 * len(NAMES)
        assert snapshot["index_rows"] <= (days + 1) * (len(NAMES) + 1)


async def test_a_batch_of_many_people_costs_a_few_requests(model):
    """TrackBatch's worst case, 100 events of 100 people: the small partitions
    share unlogged batches by replica (one node here, so all of them), so the
    append is a few dozen requests instead of four per person, and every total
    is still exact."""
    store, heavy, _ = model
    people = [make_person(heavy.workspace_id, f"many-{i}", 1) for i in range(100)]
    store.stats.reset()
    await store.append([p.events[0] for p in people])
    # two mark waves over 100 person_buckets partitions and the workspace's two
    # (hours, days); one row wave over 200 small partitions, and three larger ones,
    # alone: the workspace's hour of events and its hour's and day's persons; plus the
    # feed's outbox rows: a partition per shard and minute
    marks = -(-(100 + 2) // MAX_SHARED_BATCH_PARTITIONS)
    rows = -(-200 // MAX_SHARED_BATCH_PARTITIONS) + 3
    assert 2 * marks + rows < store.stats.statements <= 2 * marks + rows + OUTBOX_SHARDS
    assert store.stats.rows_written == 2 * 100 + 100 + 4 * 100 + 100
    for p in people:
        page = await store.list_events(p.query())
        assert page.total == 1 and page.events == p.events


async def test_a_keyspace_of_schema_1_gains_the_hour_counts_on_open(cassandra_url):
    """A keyspace made by the code before person_hours (schema 1) is migrated
    when the store opens: its events stay, and windows store hour counts."""
    import service.store.cassandra as cassandra_store
    from cassandra_support import drop_keyspace

    keyspace = f"flameup_upgrade_{secrets.token_hex(3)}"
    address = urlsplit(cassandra_url)
    url = address._replace(path=f"/{keyspace}").geturl()
    person = make_person("ws_upgrade", "upgraded", 500, step_us=600_000_000)  # about 3.5 days
    try:
        old = CassandraStore.from_url(url)
        await old.open()
        await load(old, person)
        # what the code before person_hours left: no such table, schema version 1 only
        old._session.execute("DROP TABLE person_hours", timeout=60)
        old._session.execute("DELETE FROM schema_version WHERE scope = %s AND version = 2",
                             (cassandra_store.SCHEMA_SCOPE,))
        await old.close()
        store = CassandraStore.from_url(url)
        await store.open()
        try:
            versions = {row.version for row in store._session.execute(
                "SELECT version FROM schema_version WHERE scope = %s", (cassandra_store.SCHEMA_SCOPE,))}
            assert versions == set(range(1, cassandra_store.SCHEMA_VERSION + 1))
            since = END_US - 2 * BUCKET_US + _minutes_after_end(9, 15)
            until = END_US - BUCKET_US + _minutes_after_end(16, 40)
            page, _, stats = await warm_list(store, person.query(limit=5, since_us=since, until_us=until))
            wanted = person.expected(since=since, until=until)
            assert page.total == len(wanted) and page.events == wanted[:5]
            assert stats["hour_rows"] > 0 and stats["count_writebacks"] == 0
        finally:
            await store.close()
    finally:
        await asyncio.to_thread(drop_keyspace, address.hostname, address.port, keyspace)


async def test_a_claim_whose_writer_died_is_completed_by_the_next_copy(cassandra_session_store, workspace):
    """The claim holds the whole event: when the process that claimed a message died
    before writing its rows, the next copy writes the original's rows before it is
    answered as a duplicate, and every total counts the event once."""
    store = cassandra_session_store
    now = int(time.time() * 1_000_000)
    original = StoredEvent(new_event_id(now), workspace, person_id_for(workspace, "u"), "u", "signed_up", '{"a":1}',
                           now - BUCKET_US, now, "m-1")
    assert await store._claim(original) is original  # claimed; then the process died: no rows
    q = EventQuery(workspace, original.person_id)
    assert (await store.list_events(q)).total == 0
    copy = StoredEvent(new_event_id(now + 1), workspace, person_id_for(workspace, "v"), "v", "other", "{}",
                       now, now + 1, "m-1")
    assert await store.append([copy]) == [(original.event_id, original.person_id)]
    page = await store.list_events(q)
    stored = StoredEvent(original.event_id, workspace, original.person_id, "u", "signed_up", '{"a":1}',
                         now - BUCKET_US, now)
    assert page.events == [stored] and page.total == 1
    assert await store.append([copy]) == [(original.event_id, original.person_id)]  # rewritten, still one row
    assert (await store.list_events(q)).total == 1
    assert (await store.list_events(EventQuery(workspace, original.person_id, event="signed_up",
                                               since_us=now - 2 * BUCKET_US, until_us=now))).total == 1
    assert (await store.list_events(EventQuery(workspace, copy.person_id))).total == 0
    # a claim retried after a lost answer finds its own first attempt: won
    assert await store._claim(copy) is not copy and await store._claim(original) is original
