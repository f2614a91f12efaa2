"""SQLite's message_id claims: checked and inserted inside the commit, expired by
a bounded cleanup in every commit (docs/idempotent-ingest.md)."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator

from service.domain import StoredEvent, new_event_id, now_us, person_id_for
from service.store import sqlite_engine
from service.store.sqlite_engine import GroupCommitter, SqliteFile, Tuning

WS = "ws_dedup"
WINDOW_S = 3600


def _event(message_id: str | None, created_at_us: int, external_id: str = "u") -> StoredEvent:
    return StoredEvent(new_event_id(created_at_us), WS, person_id_for(WS, external_id), external_id, "e", "{}",
                       created_at_us, created_at_us, message_id)


def _query(path: str, sql: str, args: tuple = ()) -> list[tuple]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def _claims(path: str) -> list[str]:
    return sorted(r[0] for r in _query(
        path, "SELECT e.message_id FROM (SELECT seq FROM claims UNION ALL SELECT seq FROM new_claims) AS c"
              " JOIN events AS e ON e.seq = c.seq"))


def _stored(path: str) -> int:
    return _query(path, "SELECT count(*) FROM events")[0][0]


def _staged(path: str) -> int:
    return _query(path, "SELECT count(*) FROM new_claims")[0][0]


@contextlib.contextmanager
def _committer(path: str, tuning: Tuning | None = None) -> Iterator[GroupCommitter]:
    db = SqliteFile(path, tuning=tuning or Tuning(), dedup_window_s=WINDOW_S)
    db.migrate()
    committer = GroupCommitter(db)
    committer.open()
    try:
        yield committer
    finally:
        committer.close()


def test_each_commit_deletes_at_most_a_bounded_number_of_expired_claims(tmp_path):
    path = str(tmp_path / "events.db")
    # every commit with claims merges all staged claims into claims, where the cleanup runs
    tuning = Tuning(dedup_cleanup_rows=3, claims_merge_from_rows=1, claims_merge_step_rows=1000)
    with _committer(path, tuning) as committer:
        old = now_us() - WINDOW_S * 1_000_000 - 5_000_000  # received longer ago than the window
        assert committer.commit([_event(f"old{i}", old + i) for i in range(7)]) == [None] * 7
        assert _claims(path) == ["old3", "old4", "old5", "old6"]  # the same commit expired the 3 oldest
        live = _event("live", now_us())
        assert committer.commit([live, _event(None, now_us())]) == [None, None]
        assert _claims(path) == ["live", "old6"]
        assert committer.commit([_event(None, now_us())]) == [None]
        assert _claims(path) == ["live"]  # the live claim stays
        again = _event("live", now_us(), external_id="other")
        assert committer.commit([again]) == [(live.event_id, live.person_id)]
        # an expired claim the cleanup has not reached yet is replaced, not matched
        assert committer.commit([_event("old9", old)]) == [None]
        fresh = _event("old9", now_us())
        assert committer.commit([fresh]) == [None]
        assert committer.commit([_event("old9", now_us())]) == [(fresh.event_id, fresh.person_id)]


def test_a_commit_that_fails_keeps_no_claim(tmp_path):
    path = str(tmp_path / "events.db")
    with _committer(path) as committer:
        bad = _event("m1", now_us())
        bad = StoredEvent(bad.event_id, bad.workspace_id, bad.person_id, bad.external_id, bad.event, None,  # NOT NULL
                          bad.timestamp_us, bad.created_at_us, bad.message_id)
        error = committer.commit_or_error([bad])
        assert isinstance(error, Exception)
        assert _claims(path) == []
        good = _event("m1", now_us())
        assert committer.commit([good]) == [None]


def test_messages_of_one_claim_key_are_told_apart_by_the_original(tmp_path, monkeypatch):
    monkeypatch.setattr(sqlite_engine, "claim_key", lambda workspace_id, message_id: 7)  # every id collides
    path = str(tmp_path / "events.db")
    with _committer(path) as committer:
        first = _event("m1", now_us())
        assert committer.commit([first]) == [None]
        # another message of the key, while m1's claim lives: stored, without a claim
        assert committer.commit([_event("m2", now_us())]) == [None]
        assert committer.commit([_event("m2", now_us())]) == [None]
        assert _claims(path) == ["m1"]
        # copies in one group are still told apart, claim or no claim
        m3 = _event("m3", now_us())
        assert committer.commit([m3, _event("m3", now_us()), _event("m1", now_us())]) == [
            None, (m3.event_id, m3.person_id), (first.event_id, first.person_id)]
        # the same message_id in another workspace is another message
        other = StoredEvent(new_event_id(now_us()), "ws_other", person_id_for("ws_other", "u"), "u", "e", "{}",
                            now_us(), now_us(), "m1")
        assert committer.commit([other]) == [None]
        assert _stored(path) == 5 and _claims(path) == ["m1"]


def test_migration_keeps_the_claims_of_schema_4(tmp_path):
    path = str(tmp_path / "events.db")
    conn = sqlite3.connect(path, isolation_level=None)
    for version in range(1, 5):
        for statement in sqlite_engine.MIGRATIONS[version]:
            conn.execute(statement)
    conn.execute("PRAGMA user_version = 4")
    received = now_us()
    original = _event("m1", received)
    unclaimed = _event(None, received, external_id="v")
    conn.execute("INSERT INTO persons (workspace_id, person_id) VALUES (?, ?), (?, ?)",
                 (WS, original.person_id, WS, unclaimed.person_id))
    for e in (original, unclaimed):
        conn.execute("INSERT INTO events (event_id, person_key, ts, external_id, event, parameters, created_at)"
                     " SELECT ?, person_key, ?, ?, ?, ?, ? FROM persons WHERE person_id = ?",
                     (e.event_id, e.timestamp_us, e.external_id, e.event, e.parameters, e.created_at_us, e.person_id))
    conn.execute("INSERT INTO dedup (workspace_id, message_id, event_id, person_id, created_at) VALUES (?, ?, ?, ?, ?)",
                 (WS, "m1", original.event_id, original.person_id, received))
    conn.close()
    with _committer(path) as committer:  # migrates
        assert _claims(path) == ["m1"]
        assert committer.commit([_event("m1", now_us(), external_id="w"), _event("m2", now_us())]) == [
            (original.event_id, original.person_id), None]
        assert committer.commit([_event("m2", now_us())])[0] is not None
    assert _query(path, "SELECT name FROM sqlite_master WHERE name LIKE 'dedup%'") == []
    assert _query(path, "SELECT message_id FROM events WHERE event_id = ?", (unclaimed.event_id,)) == [(None,)]


def test_staged_claims_move_into_claims_in_key_range_steps_and_still_answer(tmp_path):
    path = str(tmp_path / "events.db")
    with _committer(path, Tuning(claims_merge_from_rows=4, claims_merge_step_rows=2)) as committer:
        originals = [_event(f"m{i}", now_us(), external_id=f"u{i}") for i in range(12)]
        for i in range(0, 12, 3):
            assert committer.commit(originals[i:i + 3]) == [None] * 3
            assert _staged(path) <= 4 + 3  # a step after each commit with claims keeps the staged table small
        assert _claims(path) == sorted(f"m{i}" for i in range(12))
        assert _staged(path) < 12  # some moved
        copies = [_event(f"m{i}", now_us()) for i in range(12)]
        assert committer.commit(copies) == [(e.event_id, e.person_id) for e in originals]
        assert _stored(path) == 12


def test_a_staged_claim_wins_over_the_expired_one_it_replaces(tmp_path):
    path = str(tmp_path / "events.db")
    tuning = Tuning(claims_merge_from_rows=2, claims_merge_step_rows=1000, dedup_cleanup_rows=0)
    with _committer(path, tuning) as committer:
        old = now_us() - WINDOW_S * 1_000_000 - 5_000_000
        assert committer.commit([_event("x", old), _event("a", now_us()), _event("b", now_us())]) == [None] * 3
        assert _staged(path) == 0  # all merged into claims
        fresh = _event("x", now_us())
        assert committer.commit([fresh]) == [None]  # the expired claim is no claim
        assert _staged(path) == 1  # x now in both tables: expired in claims, fresh in new_claims
        assert committer.commit([_event("x", now_us())]) == [(fresh.event_id, fresh.person_id)]


def test_a_claim_whose_row_is_gone_is_replaced_even_when_its_seq_is_taken_again(tmp_path):
    path = str(tmp_path / "events.db")
    with _committer(path) as committer:
        assert committer.commit([_event("m1", now_us())]) == [None]
        conn = sqlite3.connect(path)
        conn.execute("DELETE FROM events")  # as removing its person does, leaving the claim
        conn.commit()
        conn.close()
        assert committer.commit([_event(None, now_us(), external_id="v")]) == [None]  # takes the freed seq
        again = _event("m1", now_us())
        assert committer.commit([again]) == [None]
        assert committer.commit([_event("m1", now_us())]) == [(again.event_id, again.person_id)]
