"""SQLite's timeline is two tables: new entries in ``recent``, moved into ``timeline``
in merge steps. Whatever the split, reads must be exactly those of one timeline."""

from __future__ import annotations

import random
import sqlite3

import pytest

from service.domain import EventQuery, StoredEvent, new_event_id, person_id_for
from service.store import sqlite_engine
from service.store.base import BUCKET_US
from service.store.sqlite import SqliteStore
from service.store.sqlite_engine import GroupCommitter, SqliteFile, Tuning

WS = "ws_timeline"
DAY0 = 19_000 * BUCKET_US
NAMES = ("viewed", "clicked", "bought")


def _tables(path: str) -> dict[str, int]:
    conn = sqlite3.connect(path)
    try:
        counts = {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("events", "timeline", "recent")}
        counts["in_both"] = conn.execute(
            "SELECT count(*) FROM timeline JOIN recent USING (person_key, ts, event_id)").fetchone()[0]
        return counts
    finally:
        conn.close()


def test_reads_are_exact_while_merge_steps_move_entries(tmp_path):
    path = str(tmp_path / "events.db")
    db = SqliteFile(path, tuning=Tuning(merge_from_rows=10, merge_step_rows=4))
    reader = db.connect()
    sqlite_engine.migrate(reader)
    committer = GroupCommitter(db)  # the test runs each commit and merge step itself
    committer.open()
    rnd = random.Random(7)
    users = [f"u{i}" for i in range(6)]
    model: dict[str, list[StoredEvent]] = {u: [] for u in users}
    splits = set()  # (entries in timeline > 0, entries in recent > 0) seen after appends
    try:
        for _ in range(40):
            batch = []
            for _ in range(rnd.randint(1, 7)):
                user = rnd.choice(users)
                ts = DAY0 + rnd.randrange(5 * BUCKET_US)
                batch.append(StoredEvent(new_event_id(ts), WS, person_id_for(WS, user), user, rnd.choice(NAMES),
                                         "{}", ts, ts))
                model[user].append(batch[-1])
            committer.commit(batch)
            committer.merge_if_due()
            counts = _tables(path)
            assert counts["timeline"] + counts["recent"] == counts["events"] and counts["in_both"] == 0
            splits.add((counts["timeline"] > 0, counts["recent"] > 0))
            for user in rnd.sample(users, 2):
                since = DAY0 + rnd.randrange(2 * BUCKET_US)
                until = since + rnd.randrange(3 * BUCKET_US)
                for kw in ({}, {"event": "clicked"}, {"since_us": since, "until_us": until},
                           {"event": "viewed", "since_us": since}, {"limit": 3, "offset": 2}):
                    page = sqlite_engine.list_events(reader, EventQuery(WS, person_id_for(WS, user), **kw))
                    expected = [e for e in model[user]
                                if kw.get("event") in (None, e.event)
                                and kw.get("since_us", -1) <= e.timestamp_us
                                and ("until_us" not in kw or e.timestamp_us < kw["until_us"])]
                    expected.sort(key=lambda e: (e.timestamp_us, e.event_id), reverse=True)
                    offset, limit = kw.get("offset", 0), kw.get("limit", 50)
                    assert page.total == len(expected), kw
                    assert page.events == expected[offset:offset + limit], kw
    finally:
        committer.close()
        reader.close()
    # the reads above ran with entries only in recent, and split between both tables
    assert {(False, True), (True, True)} <= splits, splits


async def test_a_merge_step_sweeps_every_person_and_starts_over(tmp_path):
    path = str(tmp_path / "events.db")
    store = SqliteStore(path, tuning=Tuning(merge_from_rows=1, merge_step_rows=1_000))
    await store.open()
    try:
        events = [StoredEvent(new_event_id(DAY0 + i), WS, person_id_for(WS, f"u{i % 5}"), f"u{i % 5}", "viewed",
                              "{}", DAY0 + i, DAY0) for i in range(20)]
        await store.append(events[:10])  # its step moves everything: the cursor passes the last person
        await store.append(events[10:])  # so this one's step starts from the first person again
    finally:
        await store.close()  # the writer finishes its steps before it stops
    assert _tables(path) == {"events": 20, "timeline": 20, "recent": 0, "in_both": 0}
    store = SqliteStore(path)
    await store.open()
    try:
        page = await store.list_events(EventQuery(WS, person_id_for(WS, "u3")))
        assert page.total == 4 and [e.timestamp_us for e in page.events] == [DAY0 + 18, DAY0 + 13, DAY0 + 8, DAY0 + 3]
    finally:
        await store.close()


@pytest.mark.parametrize("broken", ["boundary", "move"])
async def test_a_failed_merge_step_loses_nothing(tmp_path, monkeypatch, broken):
    """A step that fails halfway rolls back: every entry stays where it was, and appends go on."""
    sql = {"boundary": "MERGE_BOUNDARY", "move": "MERGE_ENTRIES"}[broken]
    monkeypatch.setattr(sqlite_engine, sql, "SELECT * FROM no_such_table")  # that statement fails
    path = str(tmp_path / "events.db")
    store = SqliteStore(path, tuning=Tuning(merge_from_rows=1))
    await store.open()
    try:
        for i in range(3):
            await store.append([StoredEvent(new_event_id(DAY0 + i), WS, person_id_for(WS, "u"), "u", "viewed", "{}",
                                            DAY0 + i, DAY0)])
        assert _tables(path) == {"events": 3, "timeline": 0, "recent": 3, "in_both": 0}
        assert (await store.list_events(EventQuery(WS, person_id_for(WS, "u")))).total == 3
    finally:
        await store.close()


def test_the_day_of_a_timestamp_in_sql_is_bucket_of():
    from service.store.base import bucket_of
    from service.store.sqlite_engine import _BUCKET_SQL

    conn = sqlite3.connect(":memory:")
    for ts in (0, 1, BUCKET_US - 1, BUCKET_US, DAY0 + 5, 2**62, -1, -BUCKET_US, -BUCKET_US - 1):
        assert conn.execute(f"SELECT {_BUCKET_SQL} FROM (SELECT ? AS ts)", (ts,)).fetchone()[0] == bucket_of(ts), ts


def test_deleting_a_person_empties_both_tables_rows_and_day_counts(tmp_path):
    path = str(tmp_path / "events.db")
    db = SqliteFile(path, tuning=Tuning(merge_from_rows=10, merge_step_rows=50, removal_chunk_rows=7))
    reader = db.connect()
    sqlite_engine.migrate(reader)
    committer = GroupCommitter(db)
    committer.open()
    gone, kept = person_id_for(WS, "gone"), person_id_for(WS, "kept")

    def event(person: str, i: int) -> StoredEvent:
        ts = DAY0 + i * BUCKET_US // 10
        return StoredEvent(new_event_id(ts), WS, person, "x", NAMES[i % 3], "{}", ts, ts)

    try:
        for round_ in range(6):  # entries of both persons end up in timeline and in recent
            committer.commit([event(p, round_ * 10 + i) for i in range(10) for p in (gone, kept)])
            committer.merge_if_due()
        committer.commit([event(p, 60 + i) for i in range(5) for p in (gone, kept)])  # left in recent
        counts = _tables(path)
        assert counts["timeline"] > 0 and counts["recent"] > 0

        def person_rows(person: str) -> list[int]:
            key = reader.execute(sqlite_engine.SELECT_PERSON_KEY, (WS, person)).fetchone()[0]
            return [reader.execute(f"SELECT count(*) FROM {t} WHERE person_key = ?", (key,)).fetchone()[0]
                    for t in ("events", "timeline", "recent", "bucket_counts")]

        kept_before = person_rows(kept)
        assert sqlite_engine.delete_person(reader, WS, gone, db.tuning) == 65
        assert person_rows(gone) == [0, 0, 0, 0]
        assert person_rows(kept) == kept_before
        assert sqlite_engine.list_events(reader, EventQuery(WS, kept)).total == 65
        assert sqlite_engine.delete_person(reader, WS, gone, db.tuning) == 0
    finally:
        committer.close()
        reader.close()


def test_events_committed_while_a_person_is_deleted_are_kept(tmp_path, monkeypatch):
    path = str(tmp_path / "events.db")
    db = SqliteFile(path, tuning=Tuning(removal_chunk_rows=3, removal_pause_s=0))
    reader = db.connect()
    sqlite_engine.migrate(reader)
    committer = GroupCommitter(db)
    committer.open()
    person = person_id_for(WS, "p")

    def event(i: int) -> StoredEvent:
        return StoredEvent(new_event_id(DAY0 + i), WS, person, "p", "e", "{}", DAY0 + i, DAY0 + i)

    during = [event(100), event(-100)]  # one newer and one older than everything deleted
    pauses = []

    def pause(seconds: float) -> None:  # between two of the deletion's transactions: the writer's turn
        if not pauses:
            committer.commit(during)
        pauses.append(seconds)

    monkeypatch.setattr(sqlite_engine.time, "sleep", pause)
    try:
        committer.commit([event(i) for i in range(10)])
        assert sqlite_engine.delete_person(reader, WS, person, db.tuning) == 10
        assert pauses  # it did pause between transactions
        page = sqlite_engine.list_events(reader, EventQuery(WS, person))
        assert page.total == 2 and {e.event_id for e in page.events} == {e.event_id for e in during}
    finally:
        committer.close()
        reader.close()


def test_deleting_a_person_drops_the_claims_of_their_message_ids(tmp_path):
    path = str(tmp_path / "events.db")
    db = SqliteFile(path, tuning=Tuning(removal_chunk_rows=4))
    reader = db.connect()
    sqlite_engine.migrate(reader)
    committer = GroupCommitter(db)
    committer.open()
    gone, kept = person_id_for(WS, "gone"), person_id_for(WS, "kept")

    def event(person: str, i: int) -> StoredEvent:
        return StoredEvent(new_event_id(DAY0 + i), WS, person, "x", "e", "{}", DAY0 + i, DAY0 + i,
                           message_id=f"{person}-{i}")

    def claims() -> int:
        return sum(reader.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in sqlite_engine.CLAIM_TABLES)

    try:
        committer.commit([event(p, i) for i in range(10) for p in (gone, kept)])
        committer.merge_if_due()
        assert claims() == 20
        assert sqlite_engine.delete_person(reader, WS, gone, db.tuning) == 10
        assert claims() == 10
        [original] = committer.commit([event(kept, 3)])  # kept's claims still answer
        assert original is not None and original[1] == kept
        assert sqlite_engine.list_events(reader, EventQuery(WS, kept)).total == 10
    finally:
        committer.close()
        reader.close()
