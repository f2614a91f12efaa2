"""Retention (--retention-days): old events are refused, hidden from reads and removed from storage."""

from __future__ import annotations

import asyncio
import sqlite3
import time

import httpx
import pytest

from service.domain import EventQuery, StoredEvent, ValidationError, new_event_id, now_us, person_id_for
from service.events import EventsCore, ListInput, TrackInput
from service.store import sqlite_engine
from service.store.base import BUCKET_US, bucket_of, retention_cutoff, retention_expiry
from service.store.sqlite import SqliteStore
from service.store.sqlite_engine import GroupCommitter, SqliteFile, Tuning
from tests.service_support import start_service, stop_service

DAY0 = 19_000 * BUCKET_US
HOUR_US = 3_600_000_000


def event(workspace: str, external_id: str, ts_us: int, name: str = "e") -> StoredEvent:
    return StoredEvent(new_event_id(ts_us), workspace, person_id_for(workspace, external_id), external_id, name, "{}",
                       ts_us, ts_us)


def test_the_cutoff_is_the_start_of_a_day_and_a_day_expires_when_it_passes_it():
    now = DAY0 + 5 * BUCKET_US + 7 * HOUR_US
    assert retention_cutoff(now, 2) == DAY0 + 3 * BUCKET_US
    assert retention_expiry(bucket_of(DAY0 + 3 * BUCKET_US), 2) == DAY0 + 6 * BUCKET_US  # kept today, gone tomorrow
    assert retention_cutoff(retention_expiry(7, 2), 2) == 8 * BUCKET_US


async def test_reads_leave_out_what_is_older_than_the_retention_and_counts_stay_exact(store, workspace):
    now = DAY0 + 5 * BUCKET_US + 7 * HOUR_US
    events = [event(workspace, "u", DAY0 + i * 6 * HOUR_US, "a" if i % 2 else "b") for i in range(22)]
    await store.append(events)
    core = EventsCore(store, clock=lambda: now, retention_days=2)  # keeps DAY0 + 3 days on
    cutoff = DAY0 + 3 * BUCKET_US
    kept = sorted((e for e in events if e.timestamp_us >= cutoff), key=lambda e: (e.timestamp_us, e.event_id),
                  reverse=True)
    async def listing(**kw):
        return (await core.list_person_events(workspace, ListInput("u", "external_id", **kw))).page

    page = await listing(limit=500)
    assert page.events == kept and page.total == len(kept) == 10
    assert (await listing(event="a")).total == len([e for e in kept if e.event == "a"])
    since_ns = (DAY0 + BUCKET_US) * 1000  # before the cutoff: the cutoff wins
    until_ns = (cutoff + BUCKET_US + HOUR_US) * 1000
    page = await listing(since_ns=since_ns, until_ns=until_ns)
    assert page.total == len([e for e in kept if e.timestamp_us < until_ns // 1000])
    page = await listing(until_ns=cutoff * 1000)
    assert page.events == [] and page.total == 0
    # page tokens name the filters the caller sent, and walk the kept events only
    seen, token = [], ""
    while True:
        result = await core.list_person_events(workspace, ListInput("u", "external_id", limit=4, page_token=token))
        seen += result.page.events
        if not (token := result.next_page_token):
            break
    assert seen == kept
    # an event older than the retention is refused, naming the field
    with pytest.raises(ValidationError) as err:
        await core.track(workspace, TrackInput("u", "e", timestamp="2022-01-09T00:00:00Z"))
    assert err.value.violations[0].field == "timestamp" and "2 days" in err.value.violations[0].message
    result = await core.track_batch(workspace, [TrackInput("u", "e", timestamp="2022-01-12T00:00:00Z"),
                                                TrackInput("u", "e", timestamp="2022-01-08T23:59:59Z")])
    assert result.event_ids[0] and [(i, v.field) for i, v in result.errors] == [(1, "events[1].timestamp")]


def _rows(path: str, workspace: str, external_id: str) -> tuple[int, int, int]:
    """(events, timeline entries, day count rows) of one person in the file."""
    conn = sqlite3.connect(path)
    try:
        row = conn.execute(sqlite_engine.SELECT_PERSON_KEY, (workspace, person_id_for(workspace, external_id))).fetchone()
        return tuple(conn.execute(f"SELECT count(*) FROM {t} WHERE person_key = ?", (row[0],)).fetchone()[0]
                     for t in ("events", "(SELECT person_key FROM timeline UNION ALL SELECT person_key FROM recent)",
                               "bucket_counts"))
    finally:
        conn.close()


def test_sqlite_retention_steps_remove_old_rows_entries_and_counts(tmp_path):
    path = str(tmp_path / "events.db")
    tuning = Tuning(merge_from_rows=20, merge_step_rows=1000, removal_chunk_rows=7, retention_step_persons=2)
    db = SqliteFile(path, tuning=tuning)
    db.migrate()
    committer = GroupCommitter(db)
    committer.open()
    reader = db.connect()
    today = bucket_of(now_us()) * BUCKET_US
    people = [f"p{i}" for i in range(5)]
    try:
        for day in range(6):  # each person: 4 events a day over the last 6 days, partly merged into timeline
            committer.commit([event("ws_r", p, today - day * BUCKET_US + i * HOUR_US) for p in people for i in range(4)])
            committer.merge_if_due()
        cutoff = retention_cutoff(now_us(), 2)
        cursor, steps = -1, 0
        while True:
            cursor, _ = sqlite_engine.expire_step(reader, cutoff, cursor, tuning)
            steps += 1
            if cursor == -1 and sqlite_engine.expire_step(reader, cutoff, -1, tuning)[1] == 0:
                break
        assert steps > 3  # it took several small steps
        for p in people:
            assert _rows(path, "ws_r", p) == (12, 12, 6)  # 3 days x 4 events; 3 days x (all, "e")
            page = sqlite_engine.list_events(reader, EventQuery("ws_r", person_id_for("ws_r", p), limit=500))
            assert page.total == 12 and min(e.timestamp_us for e in page.events) >= cutoff
            [summary] = sqlite_engine.person_summary(reader, "ws_r", person_id_for("ws_r", p), None, None)
            assert (summary.count, summary.first_us) == (12, min(e.timestamp_us for e in page.events))
    finally:
        reader.close()
        committer.close()


async def _until(check, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not await check():
        assert time.monotonic() < deadline, "not removed in time"
        await asyncio.sleep(0.1)


async def test_the_embedded_store_sweeps_on_its_writer_thread(tmp_path):
    path = str(tmp_path / "events.db")
    store = SqliteStore(path, tuning=Tuning(retention_step_s=0.01), retention_days=1)
    await store.open()
    try:
        today = bucket_of(now_us()) * BUCKET_US
        old, new = event("ws_r", "u", today - 3 * BUCKET_US), event("ws_r", "u", today)
        await store.append([old, new])

        async def swept() -> bool:
            return _rows(path, "ws_r", "u")[0] == 1

        await _until(swept)
        page = await store.list_events(EventQuery("ws_r", person_id_for("ws_r", "u")))
        assert page.events == [new] and page.total == 1
    finally:
        await store.close()


async def test_serve_removes_expired_events_from_a_sqlite_file(tmp_path):
    path = str(tmp_path / "events.db")
    store = SqliteStore(path)
    await store.open()
    today = bucket_of(now_us()) * BUCKET_US
    await store.append([event("ws_default", "u", today - 10 * BUCKET_US), event("ws_default", "u", today)])
    await store.close()
    assert _rows(path, "ws_default", "u")[0] == 2
    svc = start_service(f"sqlite:///{path}", extra_env={"FLAMEUP_RETENTION_DAYS": "3"})
    try:
        async def swept() -> bool:
            return _rows(path, "ws_default", "u")[0] == 1

        await _until(swept)
        reply = httpx.get(f"{svc.http_url}/api/v1/people/u/events", params={"id_type": "external_id"},
                          headers={"Authorization": f"Bearer {svc.key}"}).json()
        assert reply["total"] == 1
    finally:
        assert stop_service(svc) == 0


async def test_cassandra_writes_carry_the_ttl_of_their_day(cassandra_url):
    from service.store.cassandra import CassandraStore

    store = CassandraStore.from_url(cassandra_url, retention_days=2)
    await store.open()
    try:
        now = now_us()
        today = bucket_of(now) * BUCKET_US
        kept, expired = event("ws_ttl", "u", today), event("ws_ttl", "old", today - 5 * BUCKET_US)
        await store.append([kept, expired])
        session = store._session
        row = session.execute("SELECT TTL(parameters) FROM events_by_person WHERE workspace_id = %s AND person_id = %s"
                              " AND bucket = %s", ("ws_ttl", kept.person_id, bucket_of(today))).one()
        expected = (retention_expiry(bucket_of(today), 2) - now) / 1e6
        assert expected - 60 < row[0] <= expected + 1
        marks = session.execute("SELECT TTL(written_at) FROM person_buckets WHERE workspace_id = %s AND person_id = %s",
                                ("ws_ttl", kept.person_id)).all()
        assert marks and all(0 < m[0] <= expected + 1 for m in marks)

        async def gone() -> bool:  # past the cutoff already: a TTL of one second
            return not session.execute(
                "SELECT ts FROM events_by_person WHERE workspace_id = %s AND person_id = %s AND bucket = %s",
                ("ws_ttl", expired.person_id, bucket_of(expired.timestamp_us))).all()

        await _until(gone, 30)
    finally:
        await store.close()
