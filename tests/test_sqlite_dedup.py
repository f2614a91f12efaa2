"""SQLite's message_id claims: checked and inserted inside the commit, expired by
a bounded cleanup in every commit (docs/idempotent-ingest.md)."""

from __future__ import annotations

import sqlite3

from service.domain import StoredEvent, new_event_id, now_us, person_id_for
from service.store.sqlite_engine import GroupCommitter, SqliteFile, Tuning

WS = "ws_dedup"
WINDOW_S = 3600


def _event(message_id: str | None, created_at_us: int, external_id: str = "u") -> StoredEvent:
    return StoredEvent(new_event_id(created_at_us), WS, person_id_for(WS, external_id), external_id, "e", "{}",
                       created_at_us, created_at_us, message_id)


def _claims(path: str) -> list[str]:
    conn = sqlite3.connect(path)
    try:
        return sorted(r[0] for r in conn.execute("SELECT message_id FROM dedup"))
    finally:
        conn.close()


def test_each_commit_deletes_at_most_a_bounded_number_of_expired_claims(tmp_path):
    path = str(tmp_path / "events.db")
    db = SqliteFile(path, tuning=Tuning(dedup_cleanup_rows=3), dedup_window_s=WINDOW_S)
    db.migrate()
    committer = GroupCommitter(db)
    committer.open()
    try:
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
    finally:
        committer.close()


def test_a_commit_that_fails_keeps_no_claim(tmp_path):
    path = str(tmp_path / "events.db")
    db = SqliteFile(path, dedup_window_s=WINDOW_S)
    db.migrate()
    committer = GroupCommitter(db)
    committer.open()
    try:
        bad = _event("m1", now_us())
        bad = StoredEvent(bad.event_id, bad.workspace_id, bad.person_id, bad.external_id, bad.event, None,  # NOT NULL
                          bad.timestamp_us, bad.created_at_us, bad.message_id)
        error = committer.commit_or_error([bad])
        assert isinstance(error, Exception)
        assert _claims(path) == []
        good = _event("m1", now_us())
        assert committer.commit([good]) == [None]
    finally:
        committer.close()
