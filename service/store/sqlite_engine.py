"""The SQLite storage engine: one file in WAL mode, shaped like the wide rows.

Synchronous code only; the stores (sqlite.py) and the writer process
(sqlite_writer.py) decide on which thread or loop it runs. The reasons for the
layout, with their measurements, are in docs/decisions/sqlite-storage.md.

- ``SqliteFile``: the file and how every connection to it is set up (pragmas),
  parsed from a ``sqlite:///path?synchronous=NORMAL|FULL&busy_timeout_ms=N&dedup_window_days=D``
  URL, and how long a message_id is remembered (default 7 days).
- ``migrate``: creates or upgrades the schema (``MIGRATIONS``, ``PRAGMA user_version``).
- ``GroupCommitter``: the one writing connection. ``commit`` stores a group of
  appends in one transaction; ``merge_if_due`` runs a timeline merge step; a
  checkpointer thread copies the WAL into the database and starts the kernel's
  writeback between checkpoints.
- ``list_events`` and the workspace and key functions: reads and small writes
  on any connection.

Layout: each (workspace, person) gets a small integer ``person_key``. Events
are stored in commit order (``events``, keyed by ``seq``) and each has an entry
in a person's timeline, ``(person_key, ts, event_id)`` with the event name and
the row's ``seq``: a person's page is one range read backwards, and the event
filter is checked on the entries as they pass.

The timeline is two tables of the same shape. New entries go to ``recent``,
which stays small (about ``merge_from_rows`` entries), so a group commit
dirties few pages however long the history is. Merge steps move entries from
``recent`` into ``timeline``, a range of persons per transaction, sweeping the
person keys round and round. Reads merge the two ranges (a UNION ALL in
timeline order); a step moves entries in one transaction, so a reader's
snapshot sees each entry exactly once.

Exact totals: per-day counts (``bucket_counts``) cover the entries in
``timeline``; the step that moves entries adds their counts in the same
transaction. A read sums at most a few hundred day rows and counts the
person's few entries still in ``recent``.

Idempotent ingest (docs/idempotent-ingest.md): ``claims`` maps
``claim_key(workspace, message_id)``, a 64-bit hash, to the row of the event
that claimed it, which keeps its message_id: a hit is verified against that row,
and the duplicate answer read from it. A commit looks its events' keys up in the
same transaction that inserts them, under SQLite's write lock, so no two
commits, of any process, can both claim one message_id; a duplicate is never
inserted and so counts nowhere. Claims are keyed at random, so new ones go to
the small ``new_claims`` and move into ``claims`` a key range at a time, as the
timeline's entries do (a step inside a commit with claims). Each commit also
deletes at most ``dedup_cleanup_rows`` expired claims of ``claims``, oldest
first by its ``created_at`` index.

Keyset paging: a page after (ts, event_id) adds ``(ts, event_id) < (?, ?)`` to
both timeline ranges, which SQLite seeks to in the (person_key, ts, event_id)
key: a deep page reads what the first one does.
"""

from __future__ import annotations

import collections
import ctypes
import hashlib
import itertools
import logging
import os
import sqlite3
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from service.domain import (
    HOUR_US,
    CountBucket,
    EventPage,
    EventQuery,
    NameStats,
    Original,
    RateLimit,
    StoredEvent,
    now_us,
)
from service.store.base import (
    BUCKET_US,
    ApiKeyRecord,
    StoreUnavailable,
    bucket_of,
    dedup_window_seconds,
    retention_cutoff,
    split_window,
)

log = logging.getLogger(__name__)

SCHEMA_VERSION = 7
# The claims of message_ids: new ones are staged in the first, merged into the second.
CLAIM_TABLES = ("new_claims", "claims")
# Each version is a list of statements, applied in order in one transaction.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        """CREATE TABLE persons (
            person_key   INTEGER PRIMARY KEY,
            workspace_id TEXT NOT NULL,
            person_id    TEXT NOT NULL,
            UNIQUE (workspace_id, person_id)
        )""",
        """CREATE TABLE events (
            event_id     TEXT NOT NULL,
            person_key   INTEGER NOT NULL,
            ts           INTEGER NOT NULL,  -- when it happened, microseconds since the epoch
            external_id  TEXT NOT NULL,
            event        TEXT NOT NULL,
            parameters   TEXT NOT NULL,     -- canonical JSON object
            created_at   INTEGER NOT NULL
        )""",
        "CREATE UNIQUE INDEX events_timeline ON events (person_key, ts, event_id)",
        "CREATE INDEX events_by_name ON events (person_key, event, ts, event_id)",
        # Exact per-day counts: event_key '' counts every event of the day.
        """CREATE TABLE bucket_counts (
            person_key   INTEGER NOT NULL,
            event_key    TEXT NOT NULL,
            bucket       INTEGER NOT NULL,
            n            INTEGER NOT NULL,
            PRIMARY KEY (person_key, event_key, bucket)
        ) WITHOUT ROWID""",
        """CREATE TABLE workspaces (
            workspace_id TEXT PRIMARY KEY,
            created_at   INTEGER NOT NULL
        )""",
        """CREATE TABLE api_keys (
            key_id       TEXT PRIMARY KEY,
            key_hash     TEXT NOT NULL UNIQUE,
            workspace_id TEXT NOT NULL REFERENCES workspaces (workspace_id),
            scopes       TEXT NOT NULL,     -- space separated
            created_at   INTEGER NOT NULL,
            revoked_at   INTEGER
        )""",
    ),
    # One index instead of two: the timeline carries the event name, and the event
    # filter reads it from the index (no row lookups) while it walks the timeline.
    # Every insert into a person-keyed index dirties a page of its own; the second
    # index was more than half of a commit's cost. The cost moves to reads of rare
    # events, which walk the person's timeline past the events of other names.
    2: (
        "DROP INDEX events_by_name",
        "DROP INDEX events_timeline",
        "CREATE INDEX events_timeline ON events (person_key, ts, event_id, event)",
    ),
    # The timeline leaves the events table: a small ``recent`` table takes every new
    # entry and the writer moves them into ``timeline`` in sorted steps (see the
    # module docstring). The entries point at their row by ``seq``, an INTEGER
    # PRIMARY KEY: a plain rowid may change on VACUUM, so the rows are copied once.
    # bucket_counts counts timeline's entries from now on: all of them, here.
    3: (
        """CREATE TABLE events_v3 (
            seq          INTEGER PRIMARY KEY,  -- commit order; timeline entries point here
            event_id     TEXT NOT NULL,
            person_key   INTEGER NOT NULL,
            ts           INTEGER NOT NULL,
            external_id  TEXT NOT NULL,
            event        TEXT NOT NULL,
            parameters   TEXT NOT NULL,
            created_at   INTEGER NOT NULL
        )""",
        """INSERT INTO events_v3 (seq, event_id, person_key, ts, external_id, event, parameters, created_at)
            SELECT rowid, event_id, person_key, ts, external_id, event, parameters, created_at
            FROM events ORDER BY rowid""",
        "DROP TABLE events",
        "ALTER TABLE events_v3 RENAME TO events",
        *(
            f"""CREATE TABLE {table} (
            person_key   INTEGER NOT NULL,
            ts           INTEGER NOT NULL,
            event_id     TEXT NOT NULL,
            event        TEXT NOT NULL,
            seq          INTEGER NOT NULL,
            PRIMARY KEY (person_key, ts, event_id)
        ) WITHOUT ROWID"""
            for table in ("timeline", "recent")
        ),
        """INSERT INTO timeline (person_key, ts, event_id, event, seq)
            SELECT person_key, ts, event_id, event, seq FROM events ORDER BY person_key, ts, event_id""",
    ),
    # Idempotent ingest: the event that claimed each message_id, while the dedup
    # window lasts (created_at: when that event was received).
    4: (
        """CREATE TABLE dedup (
            workspace_id TEXT NOT NULL,
            message_id   TEXT NOT NULL,
            event_id     TEXT NOT NULL,
            person_id    TEXT NOT NULL,
            created_at   INTEGER NOT NULL,
            PRIMARY KEY (workspace_id, message_id)
        ) WITHOUT ROWID""",
        "CREATE INDEX dedup_expiry ON dedup (created_at)",
    ),
    # Compact claims (docs/idempotent-ingest.md): a claim is keyed by claim_key(),
    # a 64-bit hash of (workspace_id, message_id), and points at the original's row,
    # which now keeps its message_id to verify a hit: about a fifth of a version 4
    # claim's bytes. New claims go to the small ``new_claims`` and move into
    # ``claims`` in key-range steps, as the timeline's entries do, so a commit
    # dirties few of the big table's pages. claim_key() is a function of the
    # migrating connection (see migrate).
    5: (
        "ALTER TABLE events ADD COLUMN message_id TEXT",  # the client's id; NULL: none
        *(
            f"""CREATE TABLE {table} (
            claim_key    INTEGER PRIMARY KEY,  -- claim_key(workspace_id, message_id)
            seq          INTEGER NOT NULL,     -- the original's row in events
            created_at   INTEGER NOT NULL      -- when the original was received
        )"""
            for table in CLAIM_TABLES
        ),
        "CREATE INDEX dedup_by_event ON dedup (event_id)",
        """UPDATE events SET message_id = d.message_id FROM dedup AS d WHERE d.event_id = events.event_id""",
        # Two ids of one hash (never seen): the first keeps the claim, the other's row is a stored event.
        """INSERT OR IGNORE INTO claims (claim_key, seq, created_at)
            SELECT claim_key(d.workspace_id, d.message_id), e.seq, d.created_at
            FROM events AS e JOIN dedup AS d ON d.event_id = e.event_id ORDER BY e.seq""",
        "DROP TABLE dedup",
        # Only claims expires through an index: new_claims' claims all move there within
        # one sweep of the keys, and an index merge steps delete from at random would
        # cost each step about as many pages as the claims it moves.
        "CREATE INDEX claims_expiry ON claims (created_at)",
    ),
    # Aggregates (docs/aggregations.md): the day counts gain the first and last time of
    # their day, ``person_events`` sums a person's history per event name (both kept by
    # the merge step, for timeline's entries), and a workspace's series (one per event
    # name, '' for every event) count events and distinct persons per hour and day,
    # kept by every group commit. Built here from the rows already stored.
    6: (
        "ALTER TABLE bucket_counts ADD COLUMN first_ts INTEGER",
        "ALTER TABLE bucket_counts ADD COLUMN last_ts INTEGER",
        f"""UPDATE bucket_counts SET (first_ts, last_ts) = (
            SELECT min(t.ts), max(t.ts) FROM timeline AS t
            WHERE t.person_key = bucket_counts.person_key
              AND t.ts >= bucket_counts.bucket * {BUCKET_US} AND t.ts < (bucket_counts.bucket + 1) * {BUCKET_US}
              AND (bucket_counts.event_key = '' OR t.event = bucket_counts.event_key))""",
        """CREATE TABLE person_events (
            person_key   INTEGER NOT NULL,
            event        TEXT NOT NULL,
            n            INTEGER NOT NULL,
            first_ts     INTEGER NOT NULL,
            last_ts      INTEGER NOT NULL,
            PRIMARY KEY (person_key, event)
        ) WITHOUT ROWID""",
        """INSERT INTO person_events (person_key, event, n, first_ts, last_ts)
            SELECT person_key, event, count(*), min(ts), max(ts) FROM timeline GROUP BY person_key, event""",
        """CREATE TABLE series (
            series_key   INTEGER PRIMARY KEY,
            workspace_id TEXT NOT NULL,
            event_key    TEXT NOT NULL,     -- '' = every event
            UNIQUE (workspace_id, event_key)
        )""",
        # grain: HOUR_US, DAY_US, or 0 for the whole history (bucket 0, no person set)
        """CREATE TABLE series_counts (
            series_key   INTEGER NOT NULL,
            grain        INTEGER NOT NULL,
            bucket       INTEGER NOT NULL,  -- the bucket's first microsecond
            n            INTEGER NOT NULL,
            u            INTEGER NOT NULL,  -- distinct persons (rows of series_persons)
            first_ts     INTEGER NOT NULL,
            last_ts      INTEGER NOT NULL,
            PRIMARY KEY (series_key, grain, bucket)
        ) WITHOUT ROWID""",
        """CREATE TABLE series_persons (
            series_key   INTEGER NOT NULL,
            grain        INTEGER NOT NULL,
            bucket       INTEGER NOT NULL,
            person_key   INTEGER NOT NULL,
            PRIMARY KEY (series_key, grain, bucket, person_key)
        ) WITHOUT ROWID""",
        """INSERT INTO series (workspace_id, event_key)
            SELECT DISTINCT p.workspace_id, k.event_key FROM persons AS p
            JOIN (SELECT DISTINCT person_key, event AS event_key FROM events
                  UNION SELECT DISTINCT person_key, '' FROM events) AS k ON k.person_key = p.person_key""",
        *(
            f"""INSERT OR IGNORE INTO series_persons (series_key, grain, bucket, person_key)
            SELECT s.series_key, {grain}, e.ts - ((e.ts % {grain}) + {grain}) % {grain}, e.person_key
            FROM events AS e JOIN persons AS p ON p.person_key = e.person_key
            JOIN series AS s ON s.workspace_id = p.workspace_id AND s.event_key IN ('', e.event)"""
            for grain in (HOUR_US, BUCKET_US)
        ),
        *(
            f"""INSERT INTO series_counts (series_key, grain, bucket, n, u, first_ts, last_ts)
            SELECT s.series_key, {grain}, {bucket}, count(*), 0, min(e.ts), max(e.ts)
            FROM events AS e JOIN persons AS p ON p.person_key = e.person_key
            JOIN series AS s ON s.workspace_id = p.workspace_id AND s.event_key IN ('', e.event)
            GROUP BY 1, 2, 3"""
            for grain, bucket in (
                (HOUR_US, f"e.ts - ((e.ts % {HOUR_US}) + {HOUR_US}) % {HOUR_US}"),
                (BUCKET_US, f"e.ts - ((e.ts % {BUCKET_US}) + {BUCKET_US}) % {BUCKET_US}"),
                (0, "0"),
            )
        ),
        """UPDATE series_counts SET u = (
            SELECT count(*) FROM series_persons AS sp WHERE sp.series_key = series_counts.series_key
              AND sp.grain = series_counts.grain AND sp.bucket = series_counts.bucket)
            WHERE grain != 0""",
    ),
    # A workspace's ingest limit (NULL: none), read with its keys by every worker.
    7: (
        "ALTER TABLE workspaces ADD COLUMN events_per_second REAL",
        "ALTER TABLE workspaces ADD COLUMN burst INTEGER",
    ),
}

# Multi-row statements: ROWS_PER_STATEMENT rows of values in one INSERT.
ROWS_PER_STATEMENT = 500
EVENT_COLUMNS = 8
INSERT_EVENTS = (
    "INSERT INTO events (event_id, person_key, ts, external_id, event, parameters, created_at, message_id) VALUES "
)
INSERT_PERSONS = "INSERT OR IGNORE INTO persons (workspace_id, person_id) VALUES "
# The VALUES drive a join on the (workspace_id, person_id) index: a row-value
# IN (VALUES ...) would scan the whole table instead.
SELECT_PERSON_KEYS = (
    "SELECT p.workspace_id, p.person_id, p.person_key FROM (VALUES {values}) AS v"
    " JOIN persons AS p ON p.workspace_id = v.column1 AND p.person_id = v.column2"
)
SELECT_PERSON_KEY = "SELECT person_key FROM persons WHERE workspace_id = ? AND person_id = ?"
# The rows of a commit get seq numbers above the largest before it; their timeline
# entries are staged from the rows themselves.
MAX_SEQ = "SELECT coalesce(max(seq), 0) FROM events"
STAGE_ENTRIES = (
    "INSERT INTO recent (person_key, ts, event_id, event, seq)"
    " SELECT person_key, ts, event_id, event, seq FROM events WHERE seq > ?"
)
COUNT_RECENT = "SELECT count(*) FROM recent"
# The claims of a group's keys in both tables, with what a hit is verified against
# and answered with: the original's workspace, message_id, event_id and person_id.
# A claim whose row is gone (removed with its person) finds nothing and is replaced,
# also when a later row took its seq (its created_at differs).
SELECT_CLAIMS = (
    "SELECT c.claim_key, c.created_at, p.workspace_id, e.message_id, e.event_id, p.person_id FROM ("
    + " UNION ALL ".join(
        f"SELECT claim_key, seq, created_at FROM {t} WHERE claim_key IN ({{marks}})" for t in CLAIM_TABLES
    )
    + ") AS c JOIN events AS e ON e.seq = c.seq AND e.created_at = c.created_at"
    " JOIN persons AS p ON p.person_key = e.person_key"
)
# The rows of this commit that claim their message_id get a claim pointing at them.
SELECT_CLAIMING_ROWS = "SELECT seq, event_id, created_at FROM events WHERE seq > ? AND message_id IS NOT NULL"
CLAIM_COLUMNS = 3
# A claim replaces an expired one that the cleanup has not reached yet.
_REPLACE_CLAIM = " ON CONFLICT (claim_key) DO UPDATE SET seq = excluded.seq, created_at = excluded.created_at"
INSERT_CLAIMS = "INSERT INTO new_claims (claim_key, seq, created_at) VALUES "
INSERT_CLAIMS_END = _REPLACE_CLAIM
# The oldest expired claims, through the created_at index.
EXPIRE_CLAIMS = (
    "DELETE FROM claims WHERE claim_key IN"
    " (SELECT claim_key FROM claims WHERE created_at < ? ORDER BY created_at LIMIT ?)"
)
# A claims merge step: new_claims' keys from the cursor up to the n-th one, into claims.
COUNT_NEW_CLAIMS = "SELECT count(*) FROM new_claims"
CLAIMS_MERGE_BOUNDARY = "SELECT claim_key FROM new_claims WHERE claim_key >= ? ORDER BY claim_key LIMIT 1 OFFSET ?"
MERGE_CLAIMS = (
    "INSERT INTO claims (claim_key, seq, created_at)"
    " SELECT claim_key, seq, created_at FROM new_claims WHERE claim_key >= ? AND claim_key <= ?" + _REPLACE_CLAIM
)
DROP_MERGED_CLAIMS = "DELETE FROM new_claims WHERE claim_key >= ? AND claim_key <= ?"
# A merge step: the persons after the cursor up to the one holding the n-th entry.
MERGE_BOUNDARY = "SELECT person_key FROM recent WHERE person_key > ? ORDER BY person_key LIMIT 1 OFFSET ?"
MERGE_ENTRIES = (
    "INSERT INTO timeline (person_key, ts, event_id, event, seq)"
    " SELECT person_key, ts, event_id, event, seq FROM recent WHERE person_key > ? AND person_key <= ?"
)
# bucket_of(ts) in SQL: floor division (SQLite's / truncates toward zero).
_BUCKET_SQL = f"(ts - ((ts % {BUCKET_US}) + {BUCKET_US}) % {BUCKET_US}) / {BUCKET_US}"
# Each moved entry counts once under its event name and once under '' (every event).
# (WHERE true: SQLite's parser needs it between a SELECT and ON CONFLICT.)
MERGE_COUNTS = (
    "INSERT INTO bucket_counts (person_key, event_key, bucket, n, first_ts, last_ts)"
    " SELECT person_key, event_key, bucket, count(*), min(ts), max(ts) FROM ("
    + " UNION ALL ".join(
        f"SELECT person_key, {key} AS event_key, {_BUCKET_SQL} AS bucket, ts FROM recent"
        " WHERE person_key > ? AND person_key <= ?"
        for key in ("event", "''")
    )
    + ") WHERE true GROUP BY person_key, event_key, bucket"
    " ON CONFLICT (person_key, event_key, bucket) DO UPDATE SET n = n + excluded.n,"
    " first_ts = min(first_ts, excluded.first_ts), last_ts = max(last_ts, excluded.last_ts)"
)
# A person's whole history per event name, moved along with the entries.
MERGE_PERSON_EVENTS = (
    "INSERT INTO person_events (person_key, event, n, first_ts, last_ts)"
    " SELECT person_key, event, count(*), min(ts), max(ts) FROM recent"
    " WHERE person_key > ? AND person_key <= ? GROUP BY person_key, event"
    " ON CONFLICT (person_key, event) DO UPDATE SET n = n + excluded.n,"
    " first_ts = min(first_ts, excluded.first_ts), last_ts = max(last_ts, excluded.last_ts)"
)
DROP_MERGED = "DELETE FROM recent WHERE person_key > ? AND person_key <= ?"
# Reads merge both tables in timeline order (SQLite walks the two ranges side by
# side) and fetch the rows of the page only. Named parameters: :person, :event,
# :since, :until, :after_ts, :after_id, :limit, :offset.
TIMELINE_TABLES = ("timeline", "recent")
SELECT_EVENTS = (
    "SELECT e.event_id, e.external_id, e.event, e.parameters, e.ts, e.created_at FROM ("
    + " UNION ALL ".join(
        f"SELECT ts, event_id, seq FROM {t} WHERE person_key = :person{{filters}}" for t in TIMELINE_TABLES
    )
    + " ORDER BY ts DESC, event_id DESC LIMIT :limit OFFSET :offset) AS page"
    " JOIN events AS e ON e.seq = page.seq ORDER BY page.ts DESC, page.event_id DESC"
)
COUNT_ENTRIES = "SELECT count(*) FROM {table} WHERE person_key = :person{filters}"
# The day counts of the entries in timeline (see the module docstring).
SUM_BUCKETS = (
    "SELECT coalesce(sum(n), 0) FROM bucket_counts"
    " WHERE person_key = ? AND event_key = ? AND bucket >= ? AND bucket <= ?"
)
# A workspace's aggregates, kept by every group commit (see GroupCommitter._aggregate).
GRAINS = (HOUR_US, BUCKET_US)  # per hour and per day; grain 0 is the whole history
WHOLE_HISTORY = 0
INSERT_SERIES = "INSERT OR IGNORE INTO series (workspace_id, event_key) VALUES "
SELECT_SERIES_KEYS = (  # the VALUES drive a join on the index, as for persons
    "SELECT s.workspace_id, s.event_key, s.series_key FROM (VALUES {values}) AS v"
    " JOIN series AS s ON s.workspace_id = v.column1 AND s.event_key = v.column2"
)
SELECT_SERIES_KEY = "SELECT series_key FROM series WHERE workspace_id = ? AND event_key = ?"
# Only the rows really inserted come back: a person counts once per bucket, whoever commits.
INSERT_SERIES_PERSONS = (
    "INSERT OR IGNORE INTO series_persons (series_key, grain, bucket, person_key) VALUES {values}"
    " RETURNING series_key, grain, bucket"
)
UPSERT_SERIES_COUNTS = (
    "INSERT INTO series_counts (series_key, grain, bucket, n, u, first_ts, last_ts) VALUES {values}"
    " ON CONFLICT (series_key, grain, bucket) DO UPDATE SET n = n + excluded.n, u = u + excluded.u,"
    " first_ts = min(first_ts, excluded.first_ts), last_ts = max(last_ts, excluded.last_ts)"
)
SELECT_SERIES_BUCKETS = (
    "SELECT bucket, n, u FROM series_counts WHERE series_key = ? AND grain = ? AND bucket >= ? AND bucket < ?"
    " ORDER BY bucket"
)
SELECT_NAMES = (
    "SELECT s.event_key, c.n, c.first_ts, c.last_ts FROM series AS s JOIN series_counts AS c"
    " ON c.series_key = s.series_key AND c.grain = ? AND c.bucket >= ? AND c.bucket < ?"
    " WHERE s.workspace_id = ? AND s.event_key != ''"
)
# A person's summary: person_events covers timeline's entries, recent adds the rest.
SELECT_PERSON_EVENTS = "SELECT event, n, first_ts, last_ts FROM person_events WHERE person_key = ?"
SELECT_DAY_STATS = (
    "SELECT event_key, n, first_ts, last_ts FROM bucket_counts"
    " WHERE person_key = ? AND event_key != '' AND bucket >= ? AND bucket <= ?"
)
ENTRY_STATS = (
    "SELECT event, count(*), min(ts), max(ts) FROM {table} WHERE person_key = ? AND ts >= ? AND ts < ? GROUP BY event"
)

# Removals (a person's deletion, retention): a chunk of entries, then their counts, entries and rows.
PERSON_ENTRIES = "SELECT ts, event_id, event, seq FROM {table} WHERE person_key = ? AND seq <= ? LIMIT ?"
DROP_ENTRY = "DELETE FROM {table} WHERE person_key = ? AND ts = ? AND event_id = ?"
DROP_ROW = "DELETE FROM events WHERE seq = ?"
UNCOUNT = "UPDATE bucket_counts SET n = n - ? WHERE person_key = ? AND event_key = ? AND bucket = ?"
DROP_EMPTY_COUNTS = "DELETE FROM bucket_counts WHERE person_key = ? AND n <= 0"
UNCOUNT_SERIES = "UPDATE series_counts SET n = n - ? WHERE series_key = ? AND grain = ? AND bucket = ?"
DROP_SERIES_PERSON = "DELETE FROM series_persons WHERE series_key = ? AND grain = ? AND bucket = ? AND person_key = ?"
UNCOUNT_SERIES_PERSON = "UPDATE series_counts SET u = u - 1 WHERE series_key = ? AND grain = ? AND bucket = ?"
DROP_EMPTY_SERIES = "DELETE FROM series_counts WHERE series_key = ? AND grain = ? AND bucket = ? AND n <= 0"
# Whether the person still has an entry in a bucket (of one name, or of any: event_key '').
HAS_ENTRY = "SELECT 1 FROM {table} WHERE person_key = ? AND ts >= ? AND ts < ? AND ? IN ('', event) LIMIT 1"
UNCOUNT_PERSON_EVENT = "UPDATE person_events SET n = n - ? WHERE person_key = ? AND event = ?"
DROP_EMPTY_PERSON_EVENTS = "DELETE FROM person_events WHERE person_key = ? AND n <= 0"
# The first time of a name left in timeline, after its oldest entries were removed (retention).
RESET_FIRST_TS = (
    "UPDATE person_events SET first_ts = (SELECT ts FROM timeline WHERE person_key = ?1 AND event = ?2"
    " ORDER BY ts LIMIT 1) WHERE person_key = ?1 AND event = ?2 AND first_ts <= ?3"
)
# The claims of removed rows: by their key, only while they still point at that row
# (a later event may hold the key's claim since).
REMOVED_CLAIMS = "SELECT seq, message_id FROM events WHERE seq IN ({marks}) AND message_id IS NOT NULL"
DROP_CLAIM = "DELETE FROM {table} WHERE claim_key = ? AND seq = ?"
NEXT_PERSONS = "SELECT person_key, workspace_id FROM persons WHERE person_key > ? ORDER BY person_key LIMIT ?"
EXPIRED_ENTRIES = "SELECT ts, event_id, event, seq FROM {table} WHERE person_key = ? AND ts < ? LIMIT ?"
INSERT_WORKSPACE = "INSERT OR IGNORE INTO workspaces (workspace_id, created_at) VALUES (?, ?)"
SELECT_WORKSPACES = "SELECT workspace_id FROM workspaces ORDER BY workspace_id"
SET_RATE_LIMIT = "UPDATE workspaces SET events_per_second = ?, burst = ? WHERE workspace_id = ?"
SELECT_RATE_LIMIT = "SELECT events_per_second, burst FROM workspaces WHERE workspace_id = ?"
INSERT_KEY = (
    "INSERT INTO api_keys (key_id, key_hash, workspace_id, scopes, created_at, revoked_at) VALUES (?, ?, ?, ?, ?, ?)"
)
KEY_COLUMNS = "key_id, key_hash, workspace_id, scopes, created_at, revoked_at"
SELECT_KEY_BY_HASH = f"SELECT {KEY_COLUMNS} FROM api_keys WHERE key_hash = ?"
SELECT_KEYS = f"SELECT {KEY_COLUMNS} FROM api_keys ORDER BY workspace_id, created_at"
SELECT_KEYS_OF = f"SELECT {KEY_COLUMNS} FROM api_keys WHERE workspace_id = ? ORDER BY created_at"
REVOKE_KEY = "UPDATE api_keys SET revoked_at = coalesce(revoked_at, ?) WHERE key_id = ?"

PAGE_BYTES = 16 * 1024
_MIN_BUCKET, _MAX_BUCKET = -(2**62), 2**62
_MAX_KEY = 2**63 - 1
_MIN_KEY = -(2**63)


@dataclass(frozen=True)
class Tuning:
    """The knobs of the SQLite store; the defaults are what the service runs with
    (docs/decisions/sqlite-storage.md says why)."""

    # The most rows one group commit takes: bigger groups spill the writer's page cache.
    max_group_rows: int = 1000
    # The writing connection's page cache (SQLite's default 2 MiB makes every commit re-read index pages).
    writer_cache_kib: int = 16 * 1024
    # The checkpointer copies the WAL into the database this often, and between
    # checkpoints starts the writeback of both files every writeback_seconds.
    checkpoint_seconds: float = 0.25
    writeback_seconds: float = 0.05
    # A commit checkpoints itself only if the WAL outgrows this (the checkpointer is stuck).
    wal_safety_bytes: int = 80 * 1024 * 1024
    # Merge ``recent`` into ``timeline`` once it holds merge_from_rows entries, one
    # step of about merge_step_rows entries after each group commit (bigger steps hold
    # the write lock longer, so the groups behind them wait longer).
    merge_from_rows: int = 50_000
    merge_step_rows: int = 2_000
    max_person_key_cache: int = 100_000
    # series_persons rows the writer remembers as committed (about 60 bytes each): a
    # person seen again in the same hour or day then costs no insert.
    known_person_rows: int = 300_000
    # Expired dedup entries one commit deletes at most: more than a group inserts, so
    # the table shrinks back to the window's entries; bounded, so no commit stalls.
    dedup_cleanup_rows: int = 2000
    # New claims wait in ``new_claims`` (a commit's random inserts then dirty its few
    # pages) until it holds claims_merge_from_rows; then every commit with claims
    # moves about claims_merge_step_rows of them, a range of keys, into ``claims``
    # (more than a group adds, so the staged table stays near its size).
    claims_merge_from_rows: int = 50_000
    claims_merge_step_rows: int = 2_000
    # The writer process: a group of fewer than small_group_rows rows waits until
    # commit_gap_s after the start of the previous commit, gathering what arrives meanwhile.
    commit_gap_s: float = 0.002
    small_group_rows: int = 64
    # Deleting a person (and retention) removes this many timeline entries, their rows and
    # counts, per transaction, and lets other writers have the file for removal_pause_s
    # between two: ingest waits at most one such transaction.
    removal_chunk_rows: int = 200
    removal_pause_s: float = 0.005
    # Retention: a step looks at up to retention_step_persons persons (an index seek each)
    # and removes up to removal_chunk_rows expired entries, one transaction; steps follow
    # one another every retention_step_s, and a sweep over every person starts
    # retention_sweep_s after the previous one began.
    retention_step_persons: int = 1000
    retention_step_s: float = 0.05
    retention_sweep_s: float = 60.0


@dataclass(frozen=True)
class SqliteFile:
    """One database file and how every connection to it is set up.

    ``synchronous``: NORMAL (the default) survives a crash or kill of the
    process; FULL also survives power loss, at the cost of an fsync per commit.
    """

    path: str
    synchronous: str = "NORMAL"
    busy_timeout_ms: int = 10_000
    tuning: Tuning = field(default_factory=Tuning)
    dedup_window_s: int = dedup_window_seconds(None)  # how long a message_id is remembered

    def __post_init__(self) -> None:
        if self.synchronous.upper() not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be NORMAL or FULL, got {self.synchronous!r}")
        object.__setattr__(self, "synchronous", self.synchronous.upper())

    @classmethod
    def from_url(cls, url: str, tuning: Tuning | None = None) -> SqliteFile:
        """``sqlite:///./data/x.db`` (relative path) or ``sqlite:////abs/x.db`` (absolute);
        query parameters ``synchronous``, ``busy_timeout_ms`` and ``dedup_window_days``."""
        parts = urlsplit(url)
        path = parts.path[1:] if parts.path.startswith("/") else parts.path
        if not path:
            raise ValueError(f"sqlite URL needs a file path, e.g. sqlite:///./data/events.db, got {url!r}")
        params = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        known = ("synchronous", "busy_timeout_ms", "dedup_window_days")
        if unknown := sorted(set(params) - set(known)):
            raise ValueError(f"sqlite URL {url!r}: unknown parameter {', '.join(unknown)} (known: {', '.join(known)})")
        return cls(
            path,
            synchronous=params.get("synchronous", "NORMAL"),
            busy_timeout_ms=int(params.get("busy_timeout_ms", 10_000)),
            tuning=tuning or Tuning(),
            dedup_window_s=dedup_window_seconds(params.get("dedup_window_days")),
        )

    def connect(self) -> sqlite3.Connection:
        """A new connection (autocommit: every transaction is begun explicitly), usable from any thread."""
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(
            self.path, timeout=self.busy_timeout_ms / 1000, isolation_level=None, check_same_thread=False
        )
        # Only a new, empty file takes a page size (before WAL mode is set); an existing
        # database keeps its own. 16 KiB pages: a commit's scattered index inserts dirty
        # fewer pages, and the WAL takes fewer, larger writes.
        conn.execute(f"PRAGMA page_size = {PAGE_BYTES}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {self.synchronous}")
        conn.execute("PRAGMA foreign_keys = ON")
        # A statement's temporary data (the statement journal of the INSERT ... SELECT that
        # stages a commit's timeline entries) in memory: on disk it cost every commit a
        # temp file created, unlinked and closed.
        conn.execute("PRAGMA temp_store = MEMORY")
        page_bytes = conn.execute("PRAGMA page_size").fetchone()[0]
        conn.execute(f"PRAGMA wal_autocheckpoint = {self.tuning.wal_safety_bytes // page_bytes}")
        return conn

    def migrate(self) -> None:
        """Create or upgrade the schema, on a connection of its own."""
        conn = self.connect()
        try:
            migrate(conn)
        finally:
            conn.close()


def migrate(conn: sqlite3.Connection) -> None:
    """Create or upgrade the schema to SCHEMA_VERSION, in one transaction."""
    conn.create_function("claim_key", 2, claim_key, deterministic=True)
    conn.execute("BEGIN IMMEDIATE")  # one process migrates; the others wait, then see the version
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError(f"database schema version {version} is newer than this code ({SCHEMA_VERSION})")
        for v in range(version + 1, SCHEMA_VERSION + 1):
            for statement in MIGRATIONS[v]:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {v}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def claim_key(workspace_id: str, message_id: str) -> int:
    """The key of a message's claim: BLAKE2b of (workspace_id, message_id) cut to
    64 bits, signed (an INTEGER PRIMARY KEY). Two messages of one key are told
    apart by the original's row; the later one, while the first's claim lives, is
    stored without a claim (one chance in 2**64 per pair of ids)."""
    digest = hashlib.blake2b(f"{workspace_id}\0{message_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class _Writeback:
    """Starts the kernel's writeback of files' dirty pages, without waiting (Linux).

    A checkpoint under synchronous=NORMAL ends with fsyncs of the WAL and the
    database. The longer dirty data waits in the page cache, the more each fsync
    has to write, and while it runs the writer's own WAL writes stall (on ext4 a
    write that updates the file's mtime waits for the journal commit the fsync
    forces). sync_file_range(WRITE) starts writing now, commits no journal and
    changes no durability guarantee (the checkpoints still fsync). Elsewhere
    this does nothing.
    """

    SYNC_FILE_RANGE_WRITE = 2

    def __init__(self, paths: list[str]) -> None:
        self._paths = paths
        self._fds: list[int] = []
        self._sync_file_range = None
        if sys.platform == "linux":
            try:
                fn = ctypes.CDLL(None, use_errno=True).sync_file_range
            except (OSError, AttributeError):
                return
            fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
            self._sync_file_range = fn

    def start(self) -> None:
        if self._sync_file_range is None:
            return
        if not self._fds:
            try:
                for path in self._paths:
                    self._fds.append(os.open(path, os.O_RDONLY))
            except OSError:  # the WAL appears with the first write
                self.close()
                return
        for fd in self._fds:
            self._sync_file_range(fd, 0, 0, self.SYNC_FILE_RANGE_WRITE)

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []


def _values(rows: int, columns: int) -> str:
    return ", ".join(["(" + ", ".join("?" * columns) + ")"] * rows)


def _chunks(items: list, size: int = ROWS_PER_STATEMENT):
    for i in range(0, len(items), size):
        yield items[i : i + size]


class GroupCommitter:
    """The writing side of one file: group commits, merge steps, the checkpointer.

    One thread (or event loop) calls ``commit`` and ``merge_if_due``; ``open``
    and ``close`` bracket them. Other processes may write the same file with
    their own committer: each keeps its own counts, and a merge step is correct
    whichever runs it.
    """

    def __init__(self, db: SqliteFile, retention_days: int | None = None) -> None:
        self.db = db
        self._tuning = db.tuning
        self._retention_days = retention_days
        # The retention sweep: where the next step starts, when it is due, when the sweep began.
        self._expired_through = -1
        self._next_expiry = 0.0
        self._sweep_started = 0.0
        self._conn: sqlite3.Connection | None = None
        self._checkpointer: threading.Thread | None = None
        self._closing = threading.Event()
        # (workspace_id, person_id) -> person_key, known committed; the entries in
        # ``recent`` (None: not counted yet) and the merge cursor.
        self._person_keys: dict[tuple[str, str], int] = {}
        self._series_keys: dict[tuple[str, str], int] = {}  # (workspace_id, event_key) -> series_key
        # series_persons rows known committed, by (series_key, grain, bucket): see _remember_persons
        self._known_persons: dict[tuple[int, int, int], set[int]] = {}
        self._known_person_rows = 0
        self._data_version: int | None = None  # PRAGMA data_version when they were last known valid
        self._recent_rows: int | None = None
        self._merged_through = -1
        # The claims in ``new_claims`` (None: not counted yet) and where the next claims merge step starts.
        self._new_claims: int | None = None
        self._claims_merge_from = _MIN_KEY

    def open(self) -> None:
        """Open the writing connection and start the checkpointer thread (the schema must be current)."""
        self._conn = self.db.connect()
        self._conn.execute(f"PRAGMA cache_size = -{self._tuning.writer_cache_kib}")
        self._closing.clear()
        self._checkpointer = threading.Thread(target=self._checkpoint_loop, name="sqlite-checkpoint", daemon=True)
        self._checkpointer.start()

    def close(self) -> None:
        """Stop the checkpointer and close the connection (blocks for up to writeback_seconds)."""
        if self._checkpointer is not None:
            self._closing.set()
            self._checkpointer.join()
            self._checkpointer = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def commit(self, events: list[StoredEvent]) -> list[Original | None]:
        """Commit one group of appends; per event, what Store.append answers.
        Raises StoreUnavailable when SQLite fails (nothing of the group is then stored)."""
        results = self.commit_or_error(events)
        if isinstance(results, BaseException):
            raise results
        return results

    def commit_or_error(self, events: list[StoredEvent]) -> list[Original | None] | BaseException:
        """Commit one group of appends; per event, what Store.append answers, or
        the error that every waiter of the group gets."""
        if self._conn is None:
            return StoreUnavailable("the store is closed")
        try:
            return self._commit(events)
        except Exception as exc:  # every waiter gets an answer, whatever went wrong
            return StoreUnavailable(f"sqlite: {exc}") if isinstance(exc, sqlite3.Error) else exc

    def _checkpoint_loop(self) -> None:
        """Copy the WAL into the database off the commit path (PASSIVE: never
        waits for, nor blocks, readers and writers), and between checkpoints
        start the writeback of both files (see _Writeback)."""
        conn = self.db.connect()
        writeback = _Writeback([self.db.path, self.db.path + "-wal"])
        rounds = round(self._tuning.checkpoint_seconds / self._tuning.writeback_seconds)
        try:
            for tick in itertools.count(1):
                if self._closing.wait(self._tuning.writeback_seconds):
                    return
                writeback.start()
                if tick % rounds:
                    continue
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.Error as exc:  # busy or I/O: the next round tries again
                    log.debug("sqlite checkpoint: %s", exc)
        finally:
            writeback.close()
            conn.close()

    def _commit(self, events: list[StoredEvent]) -> list[Original | None]:
        """One transaction for a group of appends: message claims, persons, rows,
        staged timeline entries.

        While the transaction is open every other writer process waits, so the
        statements' values are built before it starts whenever every person
        already has a key (the usual case); only new persons, or duplicates
        (which leave the group), need it first.
        """
        conn = self._conn
        assert conn is not None  # commit_or_error checked
        # Another connection committed since (a person's deletion in a worker, a key):
        # series_persons rows this committer remembers may be gone.
        if (version := conn.execute("PRAGMA data_version").fetchone()[0]) != self._data_version:
            self._data_version = version
            self.forget_persons()
        cached, series_cached = self._person_keys, self._series_keys
        missing = {p for e in events if (p := (e.workspace_id, e.person_id)) not in cached}
        missing_series = {
            k for e in events for k in ((e.workspace_id, e.event), (e.workspace_id, "")) if k not in series_cached
        }
        statements = None if missing else self._statements(events, cached)
        aggregates = None if missing or missing_series else _aggregates(events, cached, series_cached)
        claims = any(e.message_id is not None for e in events)
        conn.execute("BEGIN IMMEDIATE")
        try:
            results: list[Original | None] = [None] * len(events)
            claimed: dict[str, int] = {}
            if claims:
                results, claimed = self._claim_messages(conn, events)
                if any(results):
                    events = [e for e, original in zip(events, results, strict=True) if original is None]
                    missing = {p for e in events if (p := (e.workspace_id, e.person_id)) not in cached}
                    statements = aggregates = None
            new_keys = self._assign_person_keys(conn, missing) if missing else {}
            new_series = _assign_series_keys(conn, missing_series) if missing_series else {}
            (last_seq,) = conn.execute(MAX_SEQ).fetchone()
            for sql, values in statements or self._statements(events, {**cached, **new_keys}):
                conn.execute(sql, values)
            claims_merge = None
            if claimed:
                self._insert_claims(conn, claimed, last_seq)
                claims_merge = self._merge_claims_if_due(conn, len(claimed))
            conn.execute(
                EXPIRE_CLAIMS, (now_us() - self.db.dedup_window_s * 1_000_000, self._tuning.dedup_cleanup_rows)
            )
            conn.execute(STAGE_ENTRIES, (last_seq,))
            written = _store_aggregates(
                conn,
                aggregates or _aggregates(events, {**cached, **new_keys}, {**series_cached, **new_series}),
                self._known_persons,
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        # only keys and rows of a committed transaction may be remembered
        for known, new in ((cached, new_keys), (series_cached, new_series)):
            if new:
                if len(known) + len(new) > self._tuning.max_person_key_cache:
                    known.clear()
                known.update(new)
        self._remember_persons(written)
        if self._recent_rows is not None:
            self._recent_rows += len(events)
        if claims_merge is not None:
            self._new_claims, self._claims_merge_from = claims_merge
        return results

    def _claim_messages(
        self, conn: sqlite3.Connection, events: list[StoredEvent]
    ) -> tuple[list[Original | None], dict[str, int]]:
        """Per event, None when it is stored (it has no message_id, claims it, or
        its key is held by another message's live claim), else the original it
        duplicates: a live claim from before this group, or an earlier event of
        this group; and the claim keys of the claiming events, by event_id. Runs
        inside the commit's transaction."""
        window_us = self.db.dedup_window_s * 1_000_000
        keys = {
            (e.workspace_id, e.message_id): claim_key(e.workspace_id, e.message_id)
            for e in events
            if e.message_id is not None
        }
        # claim key -> (workspace_id, message_id, event_id, person_id, created_at) of its original
        held: dict[int, tuple[str, str, str, str, int]] = {}
        for chunk in _chunks(sorted(set(keys.values()))):
            for key, created_at, workspace_id, message_id, event_id, person_id in conn.execute(
                SELECT_CLAIMS.format(marks=", ".join("?" * len(chunk))), chunk * len(CLAIM_TABLES)
            ):
                if key not in held or held[key][4] < created_at:  # staged: replaced an expired one
                    held[key] = (workspace_id, message_id, event_id, person_id, created_at)
        results: list[Original | None] = []
        stored: dict[tuple[str, str], Original] = {}  # this group's events with a message_id
        claimed: dict[str, int] = {}
        for e in events:
            if e.message_id is None:
                results.append(None)
                continue
            message = (e.workspace_id, e.message_id)
            if (first := stored.get(message)) is not None:
                results.append(first)
                continue
            key = keys[message]
            claim = held.get(key)
            live = claim is not None and claim[4] + window_us > e.created_at_us
            if claim is not None and live and claim[:2] == message:
                results.append(claim[2:4])
                continue
            if not live:  # a live claim of another message of this key: stored without a claim
                held[key] = (*message, e.event_id, e.person_id, e.created_at_us)
                claimed[e.event_id] = key
            stored[message] = (e.event_id, e.person_id)
            results.append(None)
        return results, claimed

    @staticmethod
    def _insert_claims(conn: sqlite3.Connection, claimed: dict[str, int], last_seq: int) -> None:
        """The claims of this commit's claiming rows (seq above last_seq), in key order."""
        rows = sorted(
            (claimed[event_id], seq, created_at)
            for seq, event_id, created_at in conn.execute(SELECT_CLAIMING_ROWS, (last_seq,))
            if event_id in claimed
        )
        flat = [v for row in rows for v in row]
        for chunk in _chunks(flat, ROWS_PER_STATEMENT * CLAIM_COLUMNS):
            conn.execute(INSERT_CLAIMS + _values(len(chunk) // CLAIM_COLUMNS, CLAIM_COLUMNS) + INSERT_CLAIMS_END, chunk)

    def _merge_claims_if_due(self, conn: sqlite3.Connection, added: int) -> tuple[int | None, int]:
        """One claims merge step inside the commit when ``new_claims`` has grown past
        claims_merge_from_rows: the staged claims from the cursor's key up to the
        claims_merge_step_rows-th one move into ``claims``, whose pages of that key
        range each take many claims at once. Past the last key the cursor starts
        over and the staged claims are counted afresh. Returns the count and cursor
        to keep once the commit is through."""
        staged = self._new_claims
        staged = conn.execute(COUNT_NEW_CLAIMS).fetchone()[0] if staged is None else staged + added
        start = self._claims_merge_from
        if staged < self._tuning.claims_merge_from_rows:
            return staged, start
        row = conn.execute(CLAIMS_MERGE_BOUNDARY, (start, self._tuning.claims_merge_step_rows - 1)).fetchone()
        through = row[0] if row else _MAX_KEY
        conn.execute(MERGE_CLAIMS, (start, through))
        moved = conn.execute(DROP_MERGED_CLAIMS, (start, through)).rowcount
        if through == _MAX_KEY:
            return None, _MIN_KEY
        return staged - moved, through + 1

    def _remember_persons(self, written: dict[tuple[int, int, int], set[int]]) -> None:
        """Keep the series_persons rows of committed groups, so that a person seen
        again in a bucket costs no insert; at most known_person_rows of them."""
        known = self._known_persons
        added = sum(map(len, written.values()))
        if self._known_person_rows + added > self._tuning.known_person_rows:
            known.clear()
            self._known_person_rows = 0
        for key, persons in written.items():
            if (have := known.get(key)) is None:
                known[key] = set(persons)
            else:
                have |= persons
        self._known_person_rows += added

    def forget_persons(self) -> None:
        """Drop the remembered series_persons rows: whatever deletes such rows
        (a person's deletion, retention) calls this on the writer."""
        self._known_persons.clear()
        self._known_person_rows = 0

    def merge_if_due(self) -> None:
        """One merge step when ``recent`` has grown past merge_from_rows.

        Run it after a group's answers are out: a step delays the next group only.
        A step moves the entries of the persons after the cursor, up to the one
        holding the merge_step_rows-th entry (persons whole), in one transaction;
        past the last person the cursor starts over. A failed step changes
        nothing and is tried again after the next commit.
        """
        conn = self._conn
        if conn is None:
            return
        try:
            if self._recent_rows is None:
                (self._recent_rows,) = conn.execute(COUNT_RECENT).fetchone()
            if self._recent_rows < self._tuning.merge_from_rows:
                return
            after = self._merged_through
            conn.execute("BEGIN IMMEDIATE")
            try:
                row = conn.execute(MERGE_BOUNDARY, (after, self._tuning.merge_step_rows - 1)).fetchone()
                through = row[0] if row else _MAX_KEY
                conn.execute(MERGE_ENTRIES, (after, through))
                conn.execute(MERGE_COUNTS, (after, through) * 2)
                conn.execute(MERGE_PERSON_EVENTS, (after, through))
                moved = conn.execute(DROP_MERGED, (after, through)).rowcount
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            log.warning("sqlite: timeline merge step failed (tried again later): %s", exc)
            return
        if row is None:  # swept past the last person: count afresh and start over
            self._merged_through, self._recent_rows = -1, None
        else:
            self._merged_through, self._recent_rows = through, self._recent_rows - moved

    def expire_if_due(self) -> None:
        """A retention step when one is due (see Tuning); none without a retention.

        Runs between group commits, as merge steps do; a failed step is logged and
        tried again at the next one.
        """
        conn, days = self._conn, self._retention_days
        now = time.monotonic()
        if conn is None or days is None or now < self._next_expiry:
            return
        if self._expired_through == -1:
            self._sweep_started = now
        try:
            cursor, removed = expire_step(conn, retention_cutoff(now_us(), days), self._expired_through, self._tuning)
            if removed:
                self.forget_persons()
        except sqlite3.Error as exc:
            log.warning("sqlite: retention step failed (tried again later): %s", exc)
            self._next_expiry = now + self._tuning.retention_step_s
            return
        self._expired_through = cursor
        self._next_expiry = now + self._tuning.retention_step_s
        if cursor == -1:  # swept every person: the next sweep in due time
            self._next_expiry = max(self._next_expiry, self._sweep_started + self._tuning.retention_sweep_s)

    @staticmethod
    def _statements(events: list[StoredEvent], keys: dict[tuple[str, str], int]) -> list[tuple[str, list]]:
        """The multi-row INSERTs of the events, in timeline order (person, time).

        Staging their entries then writes ``recent`` in key order, so consecutive
        entries of a person land on the same page (arrival order within a group
        means nothing).
        """
        rows: list = []
        keyed = sorted(((keys[(e.workspace_id, e.person_id)], e.timestamp_us, i) for i, e in enumerate(events)))
        for key, _, i in keyed:
            e = events[i]
            rows.extend(
                (e.event_id, key, e.timestamp_us, e.external_id, e.event, e.parameters, e.created_at_us, e.message_id)
            )
        return [
            (INSERT_EVENTS + _values(len(chunk) // EVENT_COLUMNS, EVENT_COLUMNS), chunk)
            for chunk in _chunks(rows, ROWS_PER_STATEMENT * EVENT_COLUMNS)
        ]

    @staticmethod
    def _assign_person_keys(conn: sqlite3.Connection, people: set[tuple[str, str]]) -> dict[tuple[str, str], int]:
        """The person_key of each (workspace, person), created when new."""
        missing = list(people)
        found: dict[tuple[str, str], int] = {}
        for chunk in _chunks(missing):
            flat = [v for p in chunk for v in p]
            conn.execute(INSERT_PERSONS + _values(len(chunk), 2), flat)
            for workspace_id, person_id, key in conn.execute(
                SELECT_PERSON_KEYS.format(values=_values(len(chunk), 2)), flat
            ):
                found[(workspace_id, person_id)] = key
        return found


def _assign_series_keys(conn: sqlite3.Connection, series: set[tuple[str, str]]) -> dict[tuple[str, str], int]:
    """The series_key of each (workspace, event_key), created when new."""
    found: dict[tuple[str, str], int] = {}
    for chunk in _chunks(sorted(series)):
        flat = [v for k in chunk for v in k]
        conn.execute(INSERT_SERIES + _values(len(chunk), 2), flat)
        for workspace_id, event_key, key in conn.execute(
            SELECT_SERIES_KEYS.format(values=_values(len(chunk), 2)), flat
        ):
            found[(workspace_id, event_key)] = key
    return found


# (series_key, grain, bucket) -> [n, first_ts, last_ts, person keys (None for the whole history)]
_Buckets = dict[tuple[int, int, int], list]


def _aggregates(
    events: list[StoredEvent], person_keys: dict[tuple[str, str], int], series_keys: dict[tuple[str, str], int]
) -> _Buckets:
    """What one group commit adds to its workspaces' series. One dictionary step
    per event (its workspace, name and hour); the rest per group, with set
    operations: a group commit's events share few hours."""
    by_hour: dict[tuple[str, str, int], tuple[list[int], set[int]]] = {}
    for e in events:
        ts = e.timestamp_us
        group = by_hour.get(key := (e.workspace_id, e.event, ts - ts % HOUR_US))
        if group is None:
            group = by_hour[key] = ([], set())
        group[0].append(ts)
        group[1].add(person_keys[(e.workspace_id, e.person_id)])
    buckets: _Buckets = {}
    for (workspace_id, event, hour), (times, persons) in by_hour.items():
        n, first, last = len(times), min(times), max(times)
        for series in (series_keys[(workspace_id, event)], series_keys[(workspace_id, "")]):
            for grain, bucket in ((HOUR_US, hour), (BUCKET_US, hour - hour % BUCKET_US), (WHOLE_HISTORY, 0)):
                b = buckets.get(key3 := (series, grain, bucket))
                if b is None:
                    buckets[key3] = [n, first, last, set(persons) if grain else None]
                else:
                    b[0] += n
                    b[1], b[2] = min(b[1], first), max(b[2], last)
                    if grain:
                        b[3] |= persons
    return buckets


def _store_aggregates(
    conn: sqlite3.Connection, buckets: _Buckets, known: dict[tuple[int, int, int], set[int]]
) -> dict[tuple[int, int, int], set[int]]:
    """Insert the commit's person rows, then add its counts: ``u`` grows by the
    person rows really inserted (a person already counted in a bucket is not
    returned by the insert), inside the commit's transaction. ``known``: rows
    committed earlier, which need no insert. Returns the rows it wrote or found."""
    written = {key: fresh for key, b in buckets.items() if b[3] and (fresh := b[3] - known.get(key, set()))}
    rows = sorted((*key, person) for key, fresh in written.items() for person in fresh)
    new_persons: dict[tuple[int, int, int], int] = {}
    for chunk in _chunks(rows):
        for key in conn.execute(
            INSERT_SERIES_PERSONS.format(values=_values(len(chunk), 4)), [v for row in chunk for v in row]
        ):
            new_persons[key] = new_persons.get(key, 0) + 1
    counts = sorted((*key, n, new_persons.get(key, 0), first, last) for key, (n, first, last, _) in buckets.items())
    for chunk in _chunks(counts):
        conn.execute(UPSERT_SERIES_COUNTS.format(values=_values(len(chunk), 7)), [v for row in chunk for v in row])
    return written


# Reads and small writes, on any connection ------------------------------------


def list_events(conn: sqlite3.Connection, q: EventQuery) -> EventPage:
    """A page of a person's timeline, newest first, and the exact total, from one snapshot."""
    conn.execute("BEGIN")
    try:
        row = conn.execute(SELECT_PERSON_KEY, (q.workspace_id, q.person_id)).fetchone()
        if row is None:
            return EventPage([], 0)
        args = {
            "person": row[0],
            "event": q.event,
            "since": q.since_us,
            "until": q.until_us,
            "limit": q.limit,
            "offset": q.offset,
        }
        if q.after is not None:  # keyset paging: one row more tells whether more follow
            args.update(after_ts=q.after[0], after_id=q.after[1], limit=q.limit + 1)
        filters = "" if q.event is None else " AND event = :event"
        range_filters = ("" if q.since_us is None else " AND ts >= :since") + (
            "" if q.until_us is None else " AND ts < :until"
        )
        # The total: day counts of timeline's whole days, timeline's entries in the
        # partial days at the window's edges, and the person's entries in recent.
        first, last, edges = split_window(q.since_us, q.until_us)
        total = 0
        if (first is None or last is None) or first <= last:
            total += conn.execute(
                SUM_BUCKETS,
                (row[0], q.event or "", _MIN_BUCKET if first is None else first, _MAX_BUCKET if last is None else last),
            ).fetchone()[0]
        edge_sql = COUNT_ENTRIES.format(table="timeline", filters=filters + " AND ts >= :start AND ts < :end")
        for start, end in edges:
            total += conn.execute(edge_sql, {**args, "start": start, "end": end}).fetchone()[0]
        total += conn.execute(COUNT_ENTRIES.format(table="recent", filters=filters + range_filters), args).fetchone()[0]
        # The total is exact, so an offset past it (or an event that never occurred)
        # needs no walk of the timeline.
        page_filters = filters + range_filters
        if q.after is not None:
            # The cursor lies inside the window (the token is bound to it), so it replaces
            # ``until`` as the upper bound: SQLite then seeks to it in the key, and the
            # lower bound stays ``since``.
            page_filters = (
                filters
                + ("" if q.since_us is None else " AND ts >= :since")
                + (" AND (ts, event_id) < (:after_ts, :after_id)")
            )
        rows = [] if q.offset >= total else conn.execute(SELECT_EVENTS.format(filters=page_filters), args).fetchall()
    finally:
        conn.execute("COMMIT")
    events = [
        StoredEvent(event_id, q.workspace_id, q.person_id, external_id, event, parameters, ts, created_at)
        for event_id, external_id, event, parameters, ts, created_at in rows[: q.limit]
    ]
    return EventPage(events, total, more=len(rows) > q.limit)


def _add_stats(into: dict[str, list[int]], rows) -> None:
    """Sum (event, n, first_ts, last_ts) rows into event -> [n, first, last]."""
    for event, n, first, last in rows:
        if not n:
            continue
        have = into.get(event)
        if have is None:
            into[event] = [n, first, last]
        else:
            have[0] += n
            have[1] = min(have[1], first)
            have[2] = max(have[2], last)


def _name_stats(stats: dict[str, list[int]]) -> list[NameStats]:
    return [NameStats(event, n, first, last) for event, (n, first, last) in stats.items()]


def person_summary(
    conn: sqlite3.Connection, workspace_id: str, person_id: str, since_us: int | None, until_us: int | None
) -> list[NameStats]:
    """Per event name: person_events (no window) or the window's whole days'
    counts and its edges' entries, for timeline; the person's entries in recent
    added; from one snapshot."""
    conn.execute("BEGIN")
    try:
        row = conn.execute(SELECT_PERSON_KEY, (workspace_id, person_id)).fetchone()
        if row is None:
            return []
        person = row[0]
        lo = _MIN_BUCKET if since_us is None else since_us
        hi = _MAX_BUCKET if until_us is None else until_us
        stats: dict[str, list[int]] = {}
        if since_us is None and until_us is None:
            _add_stats(stats, conn.execute(SELECT_PERSON_EVENTS, (person,)))
        else:
            first, last, edges = split_window(since_us, until_us)
            if (first is None or last is None) or first <= last:
                _add_stats(
                    stats,
                    conn.execute(
                        SELECT_DAY_STATS,
                        (person, _MIN_BUCKET if first is None else first, _MAX_BUCKET if last is None else last),
                    ),
                )
            for start, end in edges:
                _add_stats(stats, conn.execute(ENTRY_STATS.format(table="timeline"), (person, start, end)))
        _add_stats(stats, conn.execute(ENTRY_STATS.format(table="recent"), (person, lo, hi)))
    finally:
        conn.execute("COMMIT")
    return _name_stats(stats)


def event_counts(
    conn: sqlite3.Connection, workspace_id: str, event: str | None, interval_us: int, start_us: int, end_us: int
) -> list[CountBucket]:
    row = conn.execute(SELECT_SERIES_KEY, (workspace_id, event or "")).fetchone()
    if row is None:
        return []
    return [
        CountBucket(bucket, n, u)
        for bucket, n, u in conn.execute(SELECT_SERIES_BUCKETS, (row[0], interval_us, start_us, end_us))
    ]


def event_names(
    conn: sqlite3.Connection, workspace_id: str, since_us: int | None, until_us: int | None
) -> list[NameStats]:
    """The whole-history rows, or the window's whole days plus the hours of its
    partial edge days (the window is in whole hours)."""
    stats: dict[str, list[int]] = {}
    if since_us is None and until_us is None:
        _add_stats(stats, conn.execute(SELECT_NAMES, (WHOLE_HISTORY, 0, 1, workspace_id)))
        return _name_stats(stats)
    lo = _MIN_BUCKET if since_us is None else since_us
    hi = _MAX_BUCKET if until_us is None else until_us
    day_lo, day_hi = -(-lo // BUCKET_US) * BUCKET_US, hi // BUCKET_US * BUCKET_US
    conn.execute("BEGIN")
    try:
        if day_lo < day_hi:
            _add_stats(stats, conn.execute(SELECT_NAMES, (BUCKET_US, day_lo, day_hi, workspace_id)))
            hour_ranges = [(lo, day_lo), (day_hi, hi)]
        else:
            hour_ranges = [(lo, hi)]
        for a, b in hour_ranges:
            if a < b:
                _add_stats(stats, conn.execute(SELECT_NAMES, (HOUR_US, a, b, workspace_id)))
    finally:
        conn.execute("COMMIT")
    return _name_stats(stats)


def delete_person(conn: sqlite3.Connection, workspace_id: str, person_id: str, tuning: Tuning) -> int:
    """Remove the person's events committed before the call, their timeline
    entries, day counts and message_id claims, in transactions of at most
    removal_chunk_rows entries; the number of events removed.

    ``recent`` goes first: a merge step running meanwhile only moves entries
    from it into ``timeline``, which is swept after it, so none is missed.
    The person's key stays (it holds no data of the person but the derived
    person_id), so events tracked later keep their place.
    """
    row = conn.execute(SELECT_PERSON_KEY, (workspace_id, person_id)).fetchone()
    if row is None:
        return 0
    person_key = row[0]
    (through,) = conn.execute(MAX_SEQ).fetchone()  # rows committed after this are kept
    removed = 0
    for table in ("recent", "timeline"):
        while True:
            conn.execute("BEGIN IMMEDIATE")
            try:
                entries = conn.execute(
                    PERSON_ENTRIES.format(table=table), (person_key, through, tuning.removal_chunk_rows)
                ).fetchall()
                _remove(conn, table, person_key, workspace_id, entries)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            removed += len(entries)
            if len(entries) < tuning.removal_chunk_rows:
                break
            time.sleep(tuning.removal_pause_s)  # the writer's turn
    return removed


def expire_step(conn: sqlite3.Connection, cutoff_us: int, after: int, tuning: Tuning) -> tuple[int, int]:
    """One retention step: remove the entries older than ``cutoff_us`` of the persons
    after ``after`` (person keys), with their rows and day counts, in one transaction of
    at most removal_chunk_rows entries. Returns ``(cursor, removed)``: where the next
    step starts (-1: past the last person) and how many entries went."""
    budget = tuning.removal_chunk_rows
    removed = 0
    conn.execute("BEGIN IMMEDIATE")
    try:
        persons = conn.execute(NEXT_PERSONS, (after, tuning.retention_step_persons)).fetchall()
        cursor = persons[-1][0] if len(persons) == tuning.retention_step_persons else -1
        for person_key, workspace_id in persons:
            for table in ("recent", "timeline"):
                entries = conn.execute(
                    EXPIRED_ENTRIES.format(table=table), (person_key, cutoff_us, budget - removed)
                ).fetchall()
                _remove(conn, table, person_key, workspace_id, entries)
                removed += len(entries)
            if removed >= budget:
                cursor = person_key - 1  # it may have more: the next step starts with it
                break
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return cursor, removed


def _remove(conn: sqlite3.Connection, table: str, person_key: int, workspace_id: str, entries: list[tuple]) -> None:
    """Drop entries ``(ts, event_id, event, seq)`` of one person from ``table``, their
    rows, the message_id claims of those rows, and (for ``timeline``, which they
    count in) their day counts."""
    if not entries:
        return
    seqs = [seq for *_, seq in entries]
    claimed = conn.execute(REMOVED_CLAIMS.format(marks=", ".join("?" * len(seqs))), seqs).fetchall()
    if claimed:
        keys = [(claim_key(workspace_id, message_id), seq) for seq, message_id in claimed]
        for claims in CLAIM_TABLES:
            conn.executemany(DROP_CLAIM.format(table=claims), keys)
    conn.executemany(DROP_ENTRY.format(table=table), [(person_key, ts, event_id) for ts, event_id, _, _ in entries])
    conn.executemany(DROP_ROW, [(seq,) for seq in seqs])
    _uncount_series(conn, person_key, workspace_id, entries)
    if table == "timeline":
        counts: collections.Counter[tuple[str, int]] = collections.Counter()
        for ts, _, event, _ in entries:
            day = bucket_of(ts)
            counts[(event, day)] += 1
            counts[("", day)] += 1
        conn.executemany(UNCOUNT, [(n, person_key, key, day) for (key, day), n in counts.items()])
        conn.execute(DROP_EMPTY_COUNTS, (person_key,))
        # person_events covers timeline's entries too: the names' counts, then the first
        # time of a name whose oldest entry went (the last time only moves when all go).
        names: collections.Counter[str] = collections.Counter(event for _, _, event, _ in entries)
        newest = {event: max(ts for ts, _, e, _ in entries if e == event) for event in names}
        conn.executemany(UNCOUNT_PERSON_EVENT, [(n, person_key, event) for event, n in names.items()])
        conn.execute(DROP_EMPTY_PERSON_EVENTS, (person_key,))
        conn.executemany(RESET_FIRST_TS, [(person_key, event, newest[event]) for event in names])


def _uncount_series(conn: sqlite3.Connection, person_key: int, workspace_id: str, entries: list[tuple]) -> None:
    """Take removed entries out of their workspace's series (every commit counted them,
    wherever they are now): the counts of each hour, day and the whole history, and the
    person from each bucket where they have no entry left. A bucket's first and last
    time stay as they were (bounds, no longer exact, until the bucket empties)."""
    series: dict[str, int | None] = {}
    counts: collections.Counter[tuple[int, str, int, int]] = collections.Counter()
    for ts, _, event, _ in entries:
        for event_key in (event, ""):
            if event_key not in series:
                row = conn.execute(SELECT_SERIES_KEY, (workspace_id, event_key)).fetchone()
                series[event_key] = None if row is None else row[0]
            if (key := series[event_key]) is None:
                continue
            for grain in GRAINS:
                counts[(key, event_key, grain, ts - ts % grain)] += 1
            counts[(key, event_key, WHOLE_HISTORY, 0)] += 1
    conn.executemany(UNCOUNT_SERIES, [(n, key, grain, bucket) for (key, _, grain, bucket), n in counts.items()])
    for key, event_key, grain, bucket in counts:
        if grain == WHOLE_HISTORY or any(
            conn.execute(HAS_ENTRY.format(table=t), (person_key, bucket, bucket + grain, event_key)).fetchone()
            for t in TIMELINE_TABLES
        ):
            continue
        if conn.execute(DROP_SERIES_PERSON, (key, grain, bucket, person_key)).rowcount:
            conn.execute(UNCOUNT_SERIES_PERSON, (key, grain, bucket))
    conn.executemany(DROP_EMPTY_SERIES, [(key, grain, bucket) for key, _, grain, bucket in counts])


def ensure_workspace(conn: sqlite3.Connection, workspace_id: str, created_at_us: int) -> bool:
    return conn.execute(INSERT_WORKSPACE, (workspace_id, created_at_us)).rowcount == 1


def list_workspaces(conn: sqlite3.Connection) -> list[str]:
    return [r[0] for r in conn.execute(SELECT_WORKSPACES)]


def set_rate_limit(conn: sqlite3.Connection, workspace_id: str, limit: RateLimit | None) -> bool:
    values = (None, None) if limit is None else (limit.events_per_second, limit.burst)
    return conn.execute(SET_RATE_LIMIT, (*values, workspace_id)).rowcount == 1


def rate_limit(conn: sqlite3.Connection, workspace_id: str) -> RateLimit | None:
    row = conn.execute(SELECT_RATE_LIMIT, (workspace_id,)).fetchone()
    return None if row is None or row[0] is None else RateLimit(row[0], row[1])


def put_key(conn: sqlite3.Connection, key: ApiKeyRecord) -> None:
    conn.execute(
        INSERT_KEY,
        (
            key.key_id,
            key.key_hash,
            key.workspace_id,
            " ".join(sorted(key.scopes)),
            key.created_at_us,
            key.revoked_at_us,
        ),
    )


def key_by_hash(conn: sqlite3.Connection, key_hash: str) -> ApiKeyRecord | None:
    row = conn.execute(SELECT_KEY_BY_HASH, (key_hash,)).fetchone()
    return _key(row) if row else None


def list_keys(conn: sqlite3.Connection, workspace_id: str | None = None) -> list[ApiKeyRecord]:
    if workspace_id is None:
        return [_key(r) for r in conn.execute(SELECT_KEYS).fetchall()]
    return [_key(r) for r in conn.execute(SELECT_KEYS_OF, (workspace_id,)).fetchall()]


def revoke_key(conn: sqlite3.Connection, key_id: str, revoked_at_us: int) -> bool:
    return conn.execute(REVOKE_KEY, (revoked_at_us, key_id)).rowcount == 1


def _key(row: tuple) -> ApiKeyRecord:
    key_id, key_hash, workspace_id, scopes, created_at, revoked_at = row
    return ApiKeyRecord(key_id, key_hash, workspace_id, frozenset(scopes.split()), created_at, revoked_at)
