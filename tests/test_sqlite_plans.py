"""The commit's lookups by key use an index: a scan would cost a commit the whole table."""

from __future__ import annotations

import sqlite3

import pytest

from service.store import sqlite_engine


def _plan(conn: sqlite3.Connection, sql: str) -> list[str]:
    return [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql, [0] * sql.count("?"))]


@pytest.mark.parametrize(
    ("statement", "table"),
    [
        (sqlite_engine.SELECT_PERSON_KEYS.format(values=sqlite_engine._values(3, 2)), "persons"),
        (sqlite_engine.SELECT_CLAIMS.format(marks="?, ?, ?"), "claims"),
        (sqlite_engine.SELECT_CLAIMS.format(marks="?, ?, ?"), "new_claims"),
        (sqlite_engine.SELECT_CLAIMING_ROWS, "events"),
        (sqlite_engine.EXPIRE_CLAIMS, "claims"),
        (sqlite_engine.CLAIMS_MERGE_BOUNDARY, "new_claims"),
        (sqlite_engine.MERGE_CLAIMS, "new_claims"),
        (sqlite_engine.DROP_MERGED_CLAIMS, "new_claims"),
        (sqlite_engine.SELECT_SERIES_KEYS.format(values=sqlite_engine._values(3, 2)), "series"),
        (sqlite_engine.SELECT_SERIES_KEY, "series"),
        (sqlite_engine.SELECT_SERIES_BUCKETS, "series_counts"),
        (sqlite_engine.SELECT_PERSON_EVENTS, "person_events"),
        (sqlite_engine.SELECT_NAMES, "series_counts"),
    ],
    ids=["person_keys", "claims", "new_claims", "claiming_rows", "expire_claims", "claims_boundary", "merge_claims",
         "drop_merged_claims", "series_keys", "series_key", "series_buckets", "person_events", "names"],
)
def test_a_lookup_by_key_searches_an_index(tmp_path, statement, table):
    conn = sqlite3.connect(tmp_path / "events.db", isolation_level=None)
    sqlite_engine.migrate(conn)
    plan = _plan(conn, statement)
    assert not [step for step in plan if step.startswith(f"SCAN {table}") or step.startswith(("SCAN p", "SCAN s", "SCAN c"))], plan
    assert any(step.startswith("SEARCH") for step in plan), plan
