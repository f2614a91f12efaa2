"""The Cassandra backend: per-person timelines partitioned by UTC day.

``cassandra://host1,host2:9042/keyspace?consistency=LOCAL_QUORUM&protocol_version=3&local_dc=dc1``

URL parts (all optional except a host):

- hosts: comma separated contact points; one port for all (default 9042);
  ``user:password@`` before them turns on PlainTextAuthProvider.
- path: the keyspace (default ``flameup_events``), created when missing.
- ``consistency``: for every read and write (default LOCAL_QUORUM; LWTs use
  LOCAL_SERIAL, or SERIAL when the consistency is not a LOCAL_ one).
- ``protocol_version``: left to the driver unless given. Cassandra 2.1 needs
  ``protocol_version=3`` (it answers newer versions with an error the driver
  does not step down from).
- ``local_dc``: the datacenter whose nodes coordinate requests.
- ``replication_factor=N`` (SimpleStrategy, default 1) or
  ``replication=dc1:3,dc2:3`` (NetworkTopologyStrategy): only used when this
  store creates the keyspace; an existing keyspace is never altered.
- ``connect_timeout`` / ``request_timeout``: seconds (default 3 / 5). While the
  cluster is down requests fail at once (no live host) or within
  request_timeout (a node that hangs), as StoreUnavailable. In a cluster, an
  idempotent request whose coordinator has not answered within SPECULATE_AFTER
  (1 s) is also sent to the next host, so one hung node fails nothing.
- ``dedup_window_days``: how long a message_id is remembered (default 7; the
  claims' TTL).

Data model (docs/cassandra.md has the why):

- ``events_by_person``: PRIMARY KEY ((workspace_id, person_id, bucket), ts, event_id),
  newest first. A bucket is a UTC day (service.store.base.bucket_of).
- ``events_by_name``: the same rows keyed ((workspace_id, person_id, event, bucket), ts, event_id)
  for the event filter.
- ``person_buckets``: PRIMARY KEY ((workspace_id, person_id), event_key, bucket) with
  bucket DESC; event_key '' is every event, otherwise the event name. One row per
  day that has events, holding an exact count ``n`` valid as of ``counted_at`` and
  the time ``written_at`` of the last write into that day. The row with
  bucket = SUMMARY_BUCKET sorts first and carries the same three values for the
  person's whole history.
- ``dedup``: PRIMARY KEY ((workspace_id, message_id)), holding the whole event
  that claimed the message_id (a lightweight transaction, IF NOT EXISTS) with
  a TTL of the dedup window; docs/idempotent-ingest.md has the protocol.
- ``person_hours``: PRIMARY KEY ((workspace_id, person_id, event_key, bucket), hour):
  exact counts of the hours of a past day, ``n`` valid as of ``counted_at``, stored
  by readers that counted a window's edge day hour by hour. They are trusted under
  the day's ``written_at``, by the same rule as the day's own count.

How ``total`` stays exact without counters (which are not idempotent under
retries): a write marks every day it touches (and the summary) dirty *before*
its rows, with ``written_at = W0 + SETTLE`` at cell timestamp W0, then writes the
rows, then marks them again with ``written_at = W1`` at cell timestamp W1 (later,
so it wins). A count started at S is stored as ``n, counted_at = S`` at cell
timestamp S, so the latest-started count wins. A reader trusts ``n`` only when
``counted_at >= written_at``; otherwise it counts that one day partition itself
(COUNT(*)) and, when the count started after ``written_at``, writes it back in
the background, coalesced per bucket. A write that failed half way leaves its
days dirty for at least SETTLE, longer than any of its rows can still land.

A since/until window cuts its first and last day: only the part of such an edge
day inside the window counts (or, when shorter, the part outside it, taken from
the day's trusted count). On a past day that is not dirty that part is counted
hour by hour, whole hours from ``person_hours`` where their count is trusted
(``counted_at >= written_at`` of the day) and otherwise counted and written
back, so the next window with an edge on that day counts at most an hour's rows
at each end. Today is counted in one piece: it is still being written.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import zlib
from collections import defaultdict
from collections.abc import Awaitable, Iterable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar, cast
from urllib.parse import parse_qs, unquote, urlsplit

from cassandra import (
    ConsistencyLevel,
    CoordinationFailure,
    DriverException,
    OperationTimedOut,
    Timeout,
    Unavailable,
)
from cassandra.auth import PlainTextAuthProvider
from cassandra.cluster import (
    EXEC_PROFILE_DEFAULT,
    Cluster,
    ExecutionProfile,
    NoHostAvailable,
    ResponseFuture,
    Session,
)
from cassandra.connection import ConnectionException
from cassandra.policies import (
    ConstantSpeculativeExecutionPolicy,
    DCAwareRoundRobinPolicy,
    ExponentialReconnectionPolicy,
    RetryPolicy,
    TokenAwarePolicy,
)
from cassandra.protocol import IsBootstrappingErrorMessage, OverloadedErrorMessage
from cassandra.query import BatchStatement, BatchType, BoundStatement, PreparedStatement

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
    Store,
    StoreUnavailable,
    bucket_of,
    dedup_window_seconds,
    retention_expiry,
    settle,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
_Write = tuple[PreparedStatement, tuple, int]  # a statement, its values, its estimated bytes

DEFAULT_KEYSPACE = "flameup_events"
DEFAULT_PORT = 9042
DEFAULT_CONSISTENCY = "LOCAL_QUORUM"
DEFAULT_CONNECT_TIMEOUT = 3.0
DEFAULT_REQUEST_TIMEOUT = 5.0
DDL_TIMEOUT = 60.0
# The reconnection delay grows from 0.5 s to this, so the store finds a node
# that came back within a couple of seconds, with no restart.
MAX_RECONNECT_DELAY = 2.0
# Seconds without an answer before an idempotent request is also sent to the next host
# (well above a healthy statement's latency, well below request_timeout).
SPECULATE_AFTER = 1.0

ALL_EVENTS = ""  # event_key of the counts over every event name
SUMMARY_BUCKET = 2**62  # the whole-history row; sorts before every day (bucket DESC)
MIN_BUCKET = -(2**62)
# How long a day stays dirty after a write that may have failed half way: longer
# than any server write timeout plus the client timeout, after which no row of
# that write can still land.
SETTLE_US = 60 * 1_000_000
INDEX_PAGE = 2000  # person_buckets rows per page: tiny rows
FIRST_INDEX_PAGE = 64  # when the summary is clean only the newest days are needed
ROW_PAGE = 200  # event rows per page: parameters may be up to 32 KiB each
MAX_BATCH_BYTES = 256 * 1024  # rows of one partition go in unlogged batches up to this size
# Writes of several partitions share a batch up to these (Cassandra's defaults for
# batch_size_warn_threshold_in_kb and unlogged_batch_across_partitions_warn_threshold).
MAX_SHARED_BATCH_BYTES = 5 * 1024
MAX_SHARED_BATCH_PARTITIONS = 10
MARK_BYTES = 80  # estimated size of one written_at mark, plus its event key
WS_ROW_BYTES = 80  # estimated size of a workspace_events or workspace_persons row, plus its event name
CONCURRENCY = 32  # requests in flight per store call

_KEYSPACE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,47}")
_DC_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_HOST = re.compile(r"\[(?P<v6>[0-9A-Fa-f:.]+)\](?::(?P<p6>\d+))?|(?P<host>[A-Za-z0-9_.-]+)(?::(?P<port>\d+))?")

# CQL ----------------------------------------------------------------------
# Common to Cassandra 2.1 and 4.x/5.x: no sum/min/max, JSON, date/smallint,
# materialized views, PER PARTITION LIMIT or GROUP BY; bigint microseconds for
# times; never a bound None (it writes a tombstone in protocol v3).

CREATE_KEYSPACE = "CREATE KEYSPACE IF NOT EXISTS {keyspace} WITH replication = {replication}"

CREATE_SCHEMA_VERSION = """
CREATE TABLE IF NOT EXISTS schema_version (
    scope text,
    version int,
    description text,
    applied_at bigint,
    PRIMARY KEY (scope, version)
)"""
SCHEMA_SCOPE = "flameup_events"
SELECT_SCHEMA_VERSIONS = "SELECT version FROM schema_version WHERE scope = ?"
INSERT_SCHEMA_VERSION = "INSERT INTO schema_version (scope, version, description, applied_at) VALUES (?, ?, ?, ?)"

CREATE_EVENTS_BY_PERSON = """
CREATE TABLE IF NOT EXISTS events_by_person (
    workspace_id text,
    person_id text,
    bucket bigint,
    ts bigint,
    event_id text,
    event text,
    external_id text,
    parameters text,
    created_at bigint,
    PRIMARY KEY ((workspace_id, person_id, bucket), ts, event_id)
) WITH CLUSTERING ORDER BY (ts DESC, event_id DESC)"""

CREATE_EVENTS_BY_NAME = """
CREATE TABLE IF NOT EXISTS events_by_name (
    workspace_id text,
    person_id text,
    event text,
    bucket bigint,
    ts bigint,
    event_id text,
    external_id text,
    parameters text,
    created_at bigint,
    PRIMARY KEY ((workspace_id, person_id, event, bucket), ts, event_id)
) WITH CLUSTERING ORDER BY (ts DESC, event_id DESC)"""

# Overwritten cells, read often: leveled compaction keeps a read to few sstables.
CREATE_PERSON_BUCKETS = """
CREATE TABLE IF NOT EXISTS person_buckets (
    workspace_id text,
    person_id text,
    event_key text,
    bucket bigint,
    n bigint,
    counted_at bigint,
    written_at bigint,
    PRIMARY KEY ((workspace_id, person_id), event_key, bucket)
) WITH CLUSTERING ORDER BY (event_key ASC, bucket DESC)
  AND compaction = {'class': 'LeveledCompactionStrategy'}"""

# Exact counts of the hours of a past day, for the edges of since/until windows
# (written by readers, once per hour and day until a write into that day).
CREATE_PERSON_HOURS = """
CREATE TABLE IF NOT EXISTS person_hours (
    workspace_id text,
    person_id text,
    event_key text,
    bucket bigint,
    hour int,
    n bigint,
    counted_at bigint,
    PRIMARY KEY ((workspace_id, person_id, event_key, bucket), hour)
) WITH compaction = {'class': 'LeveledCompactionStrategy'}"""

# One partition per (workspace, message_id): the claim of a message, holding the
# whole event that claimed it, so that whoever finds the claim can (re)write that
# event (docs/idempotent-ingest.md). Rows expire by TTL (the dedup window).
CREATE_DEDUP = """
CREATE TABLE IF NOT EXISTS dedup (
    workspace_id text,
    message_id text,
    event_id text,
    person_id text,
    external_id text,
    event text,
    parameters text,
    ts bigint,
    created_at bigint,
    PRIMARY KEY ((workspace_id, message_id))
)"""

# A workspace's aggregates (docs/aggregations.md). One row per event and hour, and
# one per (bucket, event key, person), both idempotent: their counts are exact.
# workspace_buckets holds those counts, trusted as person_buckets' are.
CREATE_WORKSPACE_EVENTS = """
CREATE TABLE IF NOT EXISTS workspace_events (
    workspace_id text,
    hour bigint,
    event text,
    ts bigint,
    event_id text,
    PRIMARY KEY ((workspace_id, hour), event, ts, event_id)
)"""

CREATE_WORKSPACE_PERSONS = """
CREATE TABLE IF NOT EXISTS workspace_persons (
    workspace_id text,
    grain bigint,
    bucket bigint,
    event_key text,
    person_id text,
    PRIMARY KEY ((workspace_id, grain, bucket), event_key, person_id)
)"""

CREATE_WORKSPACE_BUCKETS = """
CREATE TABLE IF NOT EXISTS workspace_buckets (
    workspace_id text,
    grain bigint,
    bucket bigint,
    event_key text,
    n bigint,
    u bigint,
    first_ts bigint,
    last_ts bigint,
    counted_at bigint,
    written_at bigint,
    PRIMARY KEY ((workspace_id, grain), bucket, event_key)
) WITH compaction = {'class': 'LeveledCompactionStrategy'}"""

# The message_ids a person's events claimed, so that deleting the person finds
# their claims (which hold the whole event). Written before the claims, with
# the same TTL.
CREATE_DEDUP_BY_PERSON = """
CREATE TABLE IF NOT EXISTS dedup_by_person (
    workspace_id text,
    person_id text,
    message_id text,
    PRIMARY KEY ((workspace_id, person_id), message_id)
)"""

# Workspaces and keys are few: one partition each lists them in one read.
CREATE_WORKSPACES = """
CREATE TABLE IF NOT EXISTS workspaces (
    shard int,
    workspace_id text,
    created_at bigint,
    PRIMARY KEY (shard, workspace_id)
)"""

CREATE_API_KEYS = """
CREATE TABLE IF NOT EXISTS api_keys (
    shard int,
    key_id text,
    key_hash text,
    workspace_id text,
    scopes text,
    created_at bigint,
    revoked_at bigint,
    PRIMARY KEY (shard, key_id)
)"""

# The authentication hot path: one partition read by hash.
CREATE_API_KEYS_BY_HASH = """
CREATE TABLE IF NOT EXISTS api_keys_by_hash (
    key_hash text PRIMARY KEY,
    key_id text,
    workspace_id text,
    scopes text,
    created_at bigint,
    revoked_at bigint
)"""

# The feed's outbox (service/feed/cassandra_outbox.py): every event once more, written
# with its rows, in partitions of one minute of receive time per shard (a person's
# events share a shard), ordered by event id (time-ordered). Rows expire after
# OUTBOX_TTL_S, well after any publisher has read them.
OUTBOX_SHARDS = 4
OUTBOX_MINUTE_US = 60 * 1_000_000
OUTBOX_TTL_S = 14 * 86_400
CREATE_FEED_OUTBOX = f"""
CREATE TABLE IF NOT EXISTS feed_outbox (
    shard int,
    minute bigint,
    event_id text,
    workspace_id text,
    person_id text,
    external_id text,
    event text,
    parameters text,
    ts bigint,
    created_at bigint,
    PRIMARY KEY ((shard, minute), event_id)
) WITH default_time_to_live = {OUTBOX_TTL_S}"""

# The publisher's position per outbox shard, and the lease that elects one publisher.
CREATE_FEED_CHECKPOINT = """
CREATE TABLE IF NOT EXISTS feed_checkpoint (
    name text,
    shard int,
    minute bigint,
    event_id text,
    PRIMARY KEY (name, shard)
)"""
CREATE_FEED_LEASE = """
CREATE TABLE IF NOT EXISTS feed_lease (
    name text PRIMARY KEY,
    owner text
)"""

# A workspace's ingest limit; no row means none. A table of its own, created
# idempotently (ALTER TABLE ... ADD is not idempotent across Cassandra versions).
CREATE_WORKSPACE_LIMITS = """
CREATE TABLE IF NOT EXISTS workspace_limits (
    workspace_id text PRIMARY KEY,
    events_per_second double,
    burst int
)"""

# (version, description, statements): applied in order, each statement idempotent.
MIGRATIONS: tuple[tuple[int, str, tuple[str, ...]], ...] = (
    (
        1,
        "timelines, bucket counts, workspaces, api keys",
        (
            CREATE_EVENTS_BY_PERSON,
            CREATE_EVENTS_BY_NAME,
            CREATE_PERSON_BUCKETS,
            CREATE_WORKSPACES,
            CREATE_API_KEYS,
            CREATE_API_KEYS_BY_HASH,
        ),
    ),
    (2, "hour counts of past days, for the edges of time windows", (CREATE_PERSON_HOURS,)),
    (3, "message_id claims, for idempotent ingest", (CREATE_DEDUP,)),
    (
        4,
        "workspace aggregates: events and distinct persons per hour and day",
        (CREATE_WORKSPACE_EVENTS, CREATE_WORKSPACE_PERSONS, CREATE_WORKSPACE_BUCKETS),
    ),
    (
        5,
        "the feed's outbox, checkpoints and publisher lease",
        (CREATE_FEED_OUTBOX, CREATE_FEED_CHECKPOINT, CREATE_FEED_LEASE),
    ),
    (6, "ingest limits per workspace", (CREATE_WORKSPACE_LIMITS,)),
    (7, "the claims of each person, for deleting a person", (CREATE_DEDUP_BY_PERSON,)),
)
SCHEMA_VERSION = MIGRATIONS[-1][0]
# Tables holding data (what tests truncate between cases).
DATA_TABLES = (
    "events_by_person",
    "events_by_name",
    "person_buckets",
    "person_hours",
    "dedup",
    "dedup_by_person",
    "workspace_events",
    "workspace_persons",
    "workspace_buckets",
    "workspaces",
    "api_keys",
    "api_keys_by_hash",
    "workspace_limits",
    "feed_outbox",
    "feed_checkpoint",
    "feed_lease",
)

INSERT_EVENT = (
    "INSERT INTO events_by_person"
    " (workspace_id, person_id, bucket, ts, event_id, event, external_id, parameters, created_at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) USING TTL ?"
)
INSERT_EVENT_BY_NAME = (
    "INSERT INTO events_by_name"
    " (workspace_id, person_id, event, bucket, ts, event_id, external_id, parameters, created_at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) USING TTL ?"
)
INSERT_OUTBOX = (
    "INSERT INTO feed_outbox"
    " (shard, minute, event_id, workspace_id, person_id, external_id, event, parameters, ts, created_at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
SELECT_OUTBOX = (
    "SELECT event_id, workspace_id, person_id, external_id, event, parameters, ts, created_at FROM feed_outbox"
    " WHERE shard = ? AND minute = ? AND event_id > ? AND event_id <= ? LIMIT ?"
)
SELECT_FEED_CHECKPOINTS = "SELECT shard, minute, event_id FROM feed_checkpoint WHERE name = ?"
SAVE_FEED_CHECKPOINT = "UPDATE feed_checkpoint SET minute = ?, event_id = ? WHERE name = ? AND shard = ?"
TAKE_FEED_LEASE = "INSERT INTO feed_lease (name, owner) VALUES (?, ?) IF NOT EXISTS USING TTL ?"
RENEW_FEED_LEASE = "UPDATE feed_lease USING TTL ? SET owner = ? WHERE name = ? IF owner = ?"
SELECT_FEED_LEASE = "SELECT owner FROM feed_lease WHERE name = ?"
SELECT_EVENTS = (
    "SELECT ts, event_id, event, external_id, parameters, created_at FROM events_by_person"
    " WHERE workspace_id = ? AND person_id = ? AND bucket = ? AND ts >= ? AND ts < ? LIMIT ?"
)
SELECT_EVENTS_BY_NAME = (
    "SELECT ts, event_id, event, external_id, parameters, created_at FROM events_by_name"
    " WHERE workspace_id = ? AND person_id = ? AND event = ? AND bucket = ? AND ts >= ? AND ts < ? LIMIT ?"
)
# Keyset paging: the rows of the cursor's own timestamp after the cursor's id.
SELECT_EVENTS_AT = (
    "SELECT ts, event_id, event, external_id, parameters, created_at FROM events_by_person"
    " WHERE workspace_id = ? AND person_id = ? AND bucket = ? AND ts = ? AND event_id < ? LIMIT ?"
)
SELECT_EVENTS_BY_NAME_AT = (
    "SELECT ts, event_id, event, external_id, parameters, created_at FROM events_by_name"
    " WHERE workspace_id = ? AND person_id = ? AND event = ? AND bucket = ? AND ts = ? AND event_id < ? LIMIT ?"
)
# Claims a message_id; when it is taken, Cassandra answers with the claim's row.
CLAIM_MESSAGE = (
    "INSERT INTO dedup (workspace_id, message_id, event_id, person_id, external_id, event, parameters, ts,"
    " created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) IF NOT EXISTS USING TTL ?"
)
COUNT_EVENTS = (
    "SELECT COUNT(*) FROM events_by_person"
    " WHERE workspace_id = ? AND person_id = ? AND bucket = ? AND ts >= ? AND ts < ?"
)
COUNT_EVENTS_BY_NAME = (
    "SELECT COUNT(*) FROM events_by_name"
    " WHERE workspace_id = ? AND person_id = ? AND event = ? AND bucket = ? AND ts >= ? AND ts < ?"
)
MARK_WRITTEN = (
    "UPDATE person_buckets USING TIMESTAMP ? AND TTL ? SET written_at = ?"
    " WHERE workspace_id = ? AND person_id = ? AND event_key = ? AND bucket = ?"
)
SAVE_COUNT = (
    "UPDATE person_buckets USING TIMESTAMP ? AND TTL ? SET n = ?, counted_at = ?"
    " WHERE workspace_id = ? AND person_id = ? AND event_key = ? AND bucket = ?"
)
SELECT_HOURS = (
    "SELECT hour, n, counted_at FROM person_hours"
    " WHERE workspace_id = ? AND person_id = ? AND event_key = ? AND bucket = ?"
)
SAVE_HOUR_COUNT = (
    "UPDATE person_hours USING TIMESTAMP ? AND TTL ? SET n = ?, counted_at = ?"
    " WHERE workspace_id = ? AND person_id = ? AND event_key = ? AND bucket = ? AND hour = ?"
)
SELECT_BUCKETS = (
    "SELECT bucket, n, counted_at, written_at FROM person_buckets"
    " WHERE workspace_id = ? AND person_id = ? AND event_key = ?"
)
SELECT_BUCKET_RANGE = (
    "SELECT bucket, n, counted_at, written_at FROM person_buckets"
    " WHERE workspace_id = ? AND person_id = ? AND event_key = ? AND bucket >= ? AND bucket <= ?"
)
# Deleting a person: every (event_key, day) of the index names the partitions to drop.
DELETE_DAY = "DELETE FROM events_by_person USING TIMESTAMP ? WHERE workspace_id = ? AND person_id = ? AND bucket = ?"
DELETE_DAY_BY_NAME = (
    "DELETE FROM events_by_name USING TIMESTAMP ? WHERE workspace_id = ? AND person_id = ? AND event = ? AND bucket = ?"
)
DELETE_HOURS = (
    "DELETE FROM person_hours USING TIMESTAMP ?"
    " WHERE workspace_id = ? AND person_id = ? AND event_key = ? AND bucket = ?"
)
DELETE_INDEX = "DELETE FROM person_buckets USING TIMESTAMP ? WHERE workspace_id = ? AND person_id = ?"
# The person's rows of a day (what the feed's outbox holds of them), and an outbox row.
SELECT_DAY_ROWS = (
    "SELECT event_id, created_at FROM events_by_person WHERE workspace_id = ? AND person_id = ? AND bucket = ?"
)
DROP_OUTBOX_ROW = "DELETE FROM feed_outbox USING TIMESTAMP ? WHERE shard = ? AND minute = ? AND event_id = ?"
INDEX_CLAIM = "INSERT INTO dedup_by_person (workspace_id, person_id, message_id) VALUES (?, ?, ?) USING TTL ?"
SELECT_PERSON_CLAIMS = "SELECT message_id FROM dedup_by_person WHERE workspace_id = ? AND person_id = ?"
# Only the person's own claim: another person's event may hold the same message_id.
DROP_CLAIM = "DELETE FROM dedup WHERE workspace_id = ? AND message_id = ? IF person_id = ?"
DROP_PERSON_CLAIMS = "DELETE FROM dedup_by_person USING TIMESTAMP ? WHERE workspace_id = ? AND person_id = ?"

SELECT_PERSON_INDEX = (
    "SELECT event_key, bucket, n, counted_at, written_at FROM person_buckets WHERE workspace_id = ? AND person_id = ?"
)
SELECT_FIRST_BY_NAME = (
    "SELECT ts FROM events_by_name WHERE workspace_id = ? AND person_id = ? AND event = ? AND bucket = ?"
    " AND ts >= ? AND ts < ? ORDER BY ts ASC LIMIT 1"
)
SELECT_LAST_BY_NAME = (
    "SELECT ts FROM events_by_name WHERE workspace_id = ? AND person_id = ? AND event = ? AND bucket = ?"
    " AND ts >= ? AND ts < ? LIMIT 1"
)
INSERT_WS_EVENT = "INSERT INTO workspace_events (workspace_id, hour, event, ts, event_id) VALUES (?, ?, ?, ?, ?)"
INSERT_WS_PERSON = (
    "INSERT INTO workspace_persons (workspace_id, grain, bucket, event_key, person_id) VALUES (?, ?, ?, ?, ?)"
)
MARK_WS_WRITTEN = (
    "UPDATE workspace_buckets USING TIMESTAMP ? SET written_at = ?"
    " WHERE workspace_id = ? AND grain = ? AND bucket = ? AND event_key = ?"
)
SAVE_WS_COUNT = (
    "UPDATE workspace_buckets USING TIMESTAMP ? SET n = ?, u = ?, first_ts = ?, last_ts = ?, counted_at = ?"
    " WHERE workspace_id = ? AND grain = ? AND bucket = ? AND event_key = ?"
)
SELECT_WS_BUCKETS = (
    "SELECT bucket, event_key, n, u, first_ts, last_ts, counted_at, written_at FROM workspace_buckets"
    " WHERE workspace_id = ? AND grain = ? AND bucket >= ? AND bucket < ?"
)
COUNT_WS_EVENTS = "SELECT COUNT(*) FROM workspace_events WHERE workspace_id = ? AND hour = ?"
COUNT_WS_EVENTS_BY_NAME = "SELECT COUNT(*) FROM workspace_events WHERE workspace_id = ? AND hour = ? AND event = ?"
SELECT_WS_FIRST = "SELECT ts FROM workspace_events WHERE workspace_id = ? AND hour = ? AND event = ? LIMIT 1"
SELECT_WS_LAST = (
    "SELECT ts FROM workspace_events WHERE workspace_id = ? AND hour = ? AND event = ?"
    " ORDER BY event DESC, ts DESC LIMIT 1"
)
COUNT_WS_PERSONS = (
    "SELECT COUNT(*) FROM workspace_persons WHERE workspace_id = ? AND grain = ? AND bucket = ? AND event_key = ?"
)

INSERT_WORKSPACE = "INSERT INTO workspaces (shard, workspace_id, created_at) VALUES (0, ?, ?) IF NOT EXISTS"
SELECT_WORKSPACES = "SELECT workspace_id FROM workspaces WHERE shard = 0"
SELECT_WORKSPACE = "SELECT workspace_id FROM workspaces WHERE shard = 0 AND workspace_id = ?"
SET_RATE_LIMIT = "INSERT INTO workspace_limits (workspace_id, events_per_second, burst) VALUES (?, ?, ?)"
DELETE_RATE_LIMIT = "DELETE FROM workspace_limits WHERE workspace_id = ?"
SELECT_RATE_LIMIT = "SELECT events_per_second, burst FROM workspace_limits WHERE workspace_id = ?"

KEY_COLUMNS = "key_id, key_hash, workspace_id, scopes, created_at, revoked_at"
INSERT_KEY = (
    "INSERT INTO api_keys (shard, key_id, key_hash, workspace_id, scopes, created_at)"
    " VALUES (0, ?, ?, ?, ?, ?) IF NOT EXISTS"
)
INSERT_KEY_BY_HASH = (
    "INSERT INTO api_keys_by_hash (key_hash, key_id, workspace_id, scopes, created_at) VALUES (?, ?, ?, ?, ?)"
)
SELECT_KEY_BY_HASH = f"SELECT {KEY_COLUMNS} FROM api_keys_by_hash WHERE key_hash = ?"
SELECT_KEY = f"SELECT {KEY_COLUMNS} FROM api_keys WHERE shard = 0 AND key_id = ?"
SELECT_KEYS = f"SELECT {KEY_COLUMNS} FROM api_keys WHERE shard = 0"
REVOKE_KEY = "UPDATE api_keys SET revoked_at = ? WHERE shard = 0 AND key_id = ?"
REVOKE_KEY_BY_HASH = "UPDATE api_keys_by_hash SET revoked_at = ? WHERE key_hash = ?"

# Driver errors that mean "not reachable now, retry later".
_UNAVAILABLE = (
    NoHostAvailable,
    OperationTimedOut,
    Unavailable,
    Timeout,
    CoordinationFailure,
    ConnectionException,
    OverloadedErrorMessage,
    IsBootstrappingErrorMessage,
    OSError,
)


@dataclass
class CassandraStats:
    """What the store asked of Cassandra (tests and the benchmark read these)."""

    statements: int = 0  # requests sent, every page and every batch counted once
    event_rows: int = 0  # event rows fetched (including rows skipped inside a bucket for an offset)
    index_rows: int = 0  # person_buckets rows fetched
    hour_rows: int = 0  # person_hours rows fetched (a window's past edge days)
    counts: int = 0  # COUNT(*) of one bucket: a dirty day, or (part of) a window's edge day
    count_writebacks: int = 0  # recounts stored for the next reader
    rows_written: int = 0  # rows written: each event's two, its workspace hour's, its new persons of hour and day

    def reset(self) -> None:
        for f in fields(self):
            setattr(self, f.name, 0)

    def snapshot(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(slots=True)
class _SharedBatch:
    """Writes of several small partitions with the same replicas, one request."""

    statements: list[BoundStatement] = field(default_factory=list)
    size: int = 0
    partitions: int = 0

    def fits(self, size: int) -> bool:
        return self.size + size <= MAX_SHARED_BATCH_BYTES and self.partitions < MAX_SHARED_BATCH_PARTITIONS

    def add(self, statements: list[BoundStatement], size: int) -> None:
        self.statements.extend(statements)
        self.size += size
        self.partitions += 1


@dataclass(slots=True)
class _Bucket:
    """One day of the index as read, and how much of it the window covers."""

    bucket: int
    n: int | None  # trusted count, None when it must be counted
    written_at: int
    start_us: int  # the part of the day inside the window: [start_us, end_us)
    end_us: int
    whole: bool = True
    day_n: int | None = None  # a window's edge day: the trusted count of the whole day
    # a window's past edge day: the stored hour counts (hour -> (n, counted_at)), to be
    # trusted under written_at; None when the day is counted in one piece
    hours: dict[int, tuple[int, int]] | None = None

    def outside(self) -> list[tuple[int, int]]:
        """The parts of the day outside the window."""
        day_start, day_end = self.bucket * BUCKET_US, (self.bucket + 1) * BUCKET_US
        return [(a, b) for a, b in ((day_start, self.start_us), (self.end_us, day_end)) if a < b]


@dataclass
class _Settings:
    hosts: list[str]
    port: int = DEFAULT_PORT
    keyspace: str = DEFAULT_KEYSPACE
    consistency: str = DEFAULT_CONSISTENCY
    protocol_version: int | None = None
    local_dc: str | None = None
    replication: dict[str, str] = field(default_factory=lambda: {"class": "SimpleStrategy", "replication_factor": "1"})
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT
    dedup_window_s: int = dedup_window_seconds(None)
    username: str | None = None
    password: str | None = None


def parse_url(url: str) -> _Settings:
    """The settings a cassandra:// URL names (ValueError when it is malformed)."""
    parts = urlsplit(url)
    if parts.scheme != "cassandra":
        raise ValueError(f"not a cassandra:// URL: {url!r}")
    netloc = parts.netloc
    username = password = None
    if "@" in netloc:
        creds, netloc = netloc.rsplit("@", 1)
        username, _, password = creds.partition(":")
        username, password = unquote(username), unquote(password)
    hosts, ports = [], set()
    for item in filter(None, netloc.split(",")):
        m = _HOST.fullmatch(item)
        if not m:
            raise ValueError(f"bad host {item!r} in {url!r}")
        hosts.append(m.group("v6") or m.group("host"))
        if port := m.group("p6") or m.group("port"):
            ports.add(int(port))
    if not hosts:
        raise ValueError(f"cassandra URL needs at least one host, e.g. cassandra://127.0.0.1:9042/ks: {url!r}")
    if len(ports) > 1:
        raise ValueError(f"every host must use the same port: {url!r}")
    settings = _Settings(hosts=hosts, port=ports.pop() if ports else DEFAULT_PORT)
    if keyspace := parts.path.strip("/"):
        settings.keyspace = keyspace
    if not _KEYSPACE_NAME.fullmatch(settings.keyspace):
        raise ValueError(f"keyspace must be a letter then up to 47 letters, digits or _: {settings.keyspace!r}")
    settings.username, settings.password = username, password

    params = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
    known = {
        "consistency",
        "protocol_version",
        "local_dc",
        "replication_factor",
        "replication",
        "connect_timeout",
        "request_timeout",
        "dedup_window_days",
    }
    if unknown := set(params) - known:
        raise ValueError(f"unknown cassandra URL parameter(s) {sorted(unknown)}; known: {sorted(known)}")
    if "consistency" in params:
        settings.consistency = params["consistency"].upper()
    if settings.consistency not in ConsistencyLevel.name_to_value:
        raise ValueError(f"unknown consistency {settings.consistency!r}")
    if "protocol_version" in params:
        settings.protocol_version = int(params["protocol_version"])
    if dc := params.get("local_dc"):
        if not _DC_NAME.fullmatch(dc):
            raise ValueError(f"bad local_dc {dc!r}")
        settings.local_dc = dc
    if "replication_factor" in params and "replication" in params:
        raise ValueError(
            "give replication_factor (SimpleStrategy) or replication=dc:n,... (NetworkTopologyStrategy), not both"
        )
    if "replication_factor" in params:
        rf = _positive_int("replication_factor", params["replication_factor"])
        settings.replication["replication_factor"] = str(rf)
    if "replication" in params:
        settings.replication = {"class": "NetworkTopologyStrategy"}
        for item in params["replication"].split(","):
            dc, _, factor = item.partition(":")
            if not _DC_NAME.fullmatch(dc):
                raise ValueError(f"bad datacenter {dc!r} in replication={params['replication']!r}")
            settings.replication[dc] = str(_positive_int(f"replication factor of {dc}", factor))
    if "dedup_window_days" in params:
        settings.dedup_window_s = dedup_window_seconds(params["dedup_window_days"])
    for name in ("connect_timeout", "request_timeout"):
        if name in params:
            value = float(params[name])
            if not 0 < value <= 600:
                raise ValueError(f"{name} must be in (0, 600] seconds, got {value}")
            setattr(settings, name, value)
    return settings


def _positive_int(name: str, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {text!r}")
    return value


def _replication_cql(replication: dict[str, str]) -> str:
    # Only validated identifiers and integers reach this map (parse_url).
    return "{" + ", ".join(f"'{k}': '{v}'" for k, v in replication.items()) + "}"


def _unavailable(exc: BaseException) -> StoreUnavailable:
    if isinstance(exc, NoHostAvailable):
        detail = "; ".join(f"{host}: {type(err).__name__}: {err}" for host, err in exc.errors.items())
        message = f"cassandra unavailable: no host could take the request ({detail or 'no live host'})"
    elif isinstance(exc, OperationTimedOut):
        message = f"cassandra unavailable: no answer within the request timeout ({exc})"
    else:
        message = f"cassandra unavailable: {type(exc).__name__}: {exc}"
    return StoreUnavailable(message)


class CassandraStore(Store):
    def __init__(self, settings: _Settings, retention_days: int | None = None) -> None:
        self.settings = settings
        self.retention_days = retention_days
        self.keyspace = settings.keyspace
        self.stats = CassandraStats()
        self._cluster: Cluster | None = None
        self._session: Session | None = None
        self._ps: dict[str, PreparedStatement] = {}
        self._cl = ConsistencyLevel.name_to_value[settings.consistency]
        self._serial_cl = (
            ConsistencyLevel.LOCAL_SERIAL if settings.consistency.startswith("LOCAL_") else ConsistencyLevel.SERIAL
        )
        # Background count write-backs, one per bucket at a time (driver futures,
        # not asyncio tasks: they must outlive the event loop of the call that
        # started them, e.g. under asyncio.run in tests and CLIs).
        self._writebacks: dict[tuple, ResponseFuture] = {}
        self._writebacks_lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str, retention_days: int | None = None) -> CassandraStore:
        return cls(parse_url(url), retention_days)

    # Lifecycle --------------------------------------------------------------

    async def open(self) -> None:
        await asyncio.to_thread(self._open_sync)

    def _open_sync(self) -> None:
        s = self.settings
        profile = ExecutionProfile(
            load_balancing_policy=TokenAwarePolicy(DCAwareRoundRobinPolicy(local_dc=s.local_dc)),
            retry_policy=RetryPolicy(),
            # A node that stops answering with its connections open (a partition, a stall)
            # is only marked down by gossip and heartbeats, many seconds later: meanwhile an
            # idempotent request it coordinates is sent once more to the next host after
            # SPECULATE_AFTER, instead of failing after request_timeout.
            speculative_execution_policy=ConstantSpeculativeExecutionPolicy(SPECULATE_AFTER, 1),
            consistency_level=self._cl,
            serial_consistency_level=self._serial_cl,
            request_timeout=s.request_timeout,
        )
        kwargs: dict[str, Any] = {}
        if s.protocol_version is not None:
            kwargs["protocol_version"] = s.protocol_version
        if s.username is not None:
            kwargs["auth_provider"] = PlainTextAuthProvider(s.username, s.password or "")
        cluster = Cluster(
            contact_points=s.hosts,
            port=s.port,
            execution_profiles={EXEC_PROFILE_DEFAULT: profile},
            schema_metadata_enabled=False,  # only our keyspace is loaded, below
            connect_timeout=s.connect_timeout,
            control_connection_timeout=s.connect_timeout,
            reconnection_policy=ExponentialReconnectionPolicy(0.5, MAX_RECONNECT_DELAY),
            idle_heartbeat_interval=5,
            idle_heartbeat_timeout=max(2 * s.request_timeout, 5),
            **kwargs,
        )
        try:
            session = cluster.connect()
            self._create_keyspace(session)
            session.set_keyspace(self.keyspace)
            self._migrate(session, cluster)
            # Token-aware routing needs the keyspace's replication and, on protocol
            # v3, the tables' partition keys: load just those.
            try:
                cluster.refresh_keyspace_metadata(self.keyspace)
                for table in ("schema_version", *DATA_TABLES):
                    cluster.refresh_table_metadata(self.keyspace, table)
            except DriverException as exc:  # routing degrades to round robin in the local DC
                log.warning("cassandra: no keyspace metadata, requests are not token-aware: %s", exc)
            self._prepare(session)
        except _UNAVAILABLE as exc:
            cluster.shutdown()
            raise _unavailable(exc) from exc
        except BaseException:
            cluster.shutdown()
            raise
        self._cluster, self._session = cluster, session
        log.info(
            "cassandra store open: keyspace %s on %s (consistency %s)", self.keyspace, ",".join(s.hosts), s.consistency
        )

    def _create_keyspace(self, session: Session) -> None:
        # DDL takes no bind markers: the keyspace name and the replication map
        # are validated by parse_url before they reach this text.
        session.execute(
            CREATE_KEYSPACE.format(keyspace=self.keyspace, replication=_replication_cql(self.settings.replication)),
            timeout=DDL_TIMEOUT,
        )
        self._await_schema_agreement(session.cluster)

    def _migrate(self, session: Session, cluster: Cluster) -> None:
        session.execute(CREATE_SCHEMA_VERSION, timeout=DDL_TIMEOUT)
        self._await_schema_agreement(cluster)
        select = session.prepare(SELECT_SCHEMA_VERSIONS)
        select.consistency_level = self._cl
        applied = {row.version for row in session.execute(select, (SCHEMA_SCOPE,))}
        if applied and max(applied) > SCHEMA_VERSION:
            log.warning(
                "keyspace %s has schema version %d, newer than this code (%d)",
                self.keyspace,
                max(applied),
                SCHEMA_VERSION,
            )
        insert = session.prepare(INSERT_SCHEMA_VERSION)
        insert.consistency_level = self._cl
        for version, description, statements in MIGRATIONS:
            if version in applied:
                continue
            log.info("cassandra schema: applying version %d (%s)", version, description)
            for statement in statements:
                session.execute(statement, timeout=DDL_TIMEOUT)
                self._await_schema_agreement(cluster)
            session.execute(insert, (SCHEMA_SCOPE, version, description, now_us()))

    @staticmethod
    def _await_schema_agreement(cluster: Cluster) -> None:
        if not cluster.control_connection.wait_for_schema_agreement(wait_time=DDL_TIMEOUT):
            raise StoreUnavailable(f"cassandra nodes did not agree on the schema within {DDL_TIMEOUT:.0f}s")

    def _prepare(self, session: Session) -> None:
        idempotent = {
            "insert_event": INSERT_EVENT,
            "insert_event_by_name": INSERT_EVENT_BY_NAME,
            "select_events": SELECT_EVENTS,
            "select_events_by_name": SELECT_EVENTS_BY_NAME,
            "select_events_at": SELECT_EVENTS_AT,
            "select_events_by_name_at": SELECT_EVENTS_BY_NAME_AT,
            "count_events": COUNT_EVENTS,
            "count_events_by_name": COUNT_EVENTS_BY_NAME,
            "mark_written": MARK_WRITTEN,
            "save_count": SAVE_COUNT,
            "select_hours": SELECT_HOURS,
            "save_hour_count": SAVE_HOUR_COUNT,
            "select_buckets": SELECT_BUCKETS,
            "select_bucket_range": SELECT_BUCKET_RANGE,
            "select_person_index": SELECT_PERSON_INDEX,
            "select_first_by_name": SELECT_FIRST_BY_NAME,
            "select_last_by_name": SELECT_LAST_BY_NAME,
            "insert_ws_event": INSERT_WS_EVENT,
            "insert_ws_person": INSERT_WS_PERSON,
            "mark_ws_written": MARK_WS_WRITTEN,
            "save_ws_count": SAVE_WS_COUNT,
            "select_ws_buckets": SELECT_WS_BUCKETS,
            "count_ws_events": COUNT_WS_EVENTS,
            "count_ws_events_by_name": COUNT_WS_EVENTS_BY_NAME,
            "select_ws_first": SELECT_WS_FIRST,
            "select_ws_last": SELECT_WS_LAST,
            "count_ws_persons": COUNT_WS_PERSONS,
            "select_workspaces": SELECT_WORKSPACES,
            "select_workspace": SELECT_WORKSPACE,
            "delete_day": DELETE_DAY,
            "select_day_rows": SELECT_DAY_ROWS,
            "drop_outbox_row": DROP_OUTBOX_ROW,
            "delete_day_by_name": DELETE_DAY_BY_NAME,
            "delete_hours": DELETE_HOURS,
            "delete_index": DELETE_INDEX,
            "index_claim": INDEX_CLAIM,
            "select_person_claims": SELECT_PERSON_CLAIMS,
            "drop_person_claims": DROP_PERSON_CLAIMS,
            "set_rate_limit": SET_RATE_LIMIT,
            "delete_rate_limit": DELETE_RATE_LIMIT,
            "select_rate_limit": SELECT_RATE_LIMIT,
            "insert_key_by_hash": INSERT_KEY_BY_HASH,
            "select_key_by_hash": SELECT_KEY_BY_HASH,
            "select_key": SELECT_KEY,
            "select_keys": SELECT_KEYS,
            "revoke_key": REVOKE_KEY,
            "revoke_key_by_hash": REVOKE_KEY_BY_HASH,
            "insert_outbox": INSERT_OUTBOX,
            "select_outbox": SELECT_OUTBOX,
            "select_feed_checkpoints": SELECT_FEED_CHECKPOINTS,
            "save_feed_checkpoint": SAVE_FEED_CHECKPOINT,
            "select_feed_lease": SELECT_FEED_LEASE,
        }
        # Lightweight transactions report whether *this* attempt applied: a retry
        # could see its own first attempt as "not applied". A claim is the exception:
        # _claim takes a claim holding its own event id as won, so the driver may
        # retry it and send it again to the next host (speculative execution).
        idempotent["claim_message"] = CLAIM_MESSAGE
        not_idempotent = {
            "insert_workspace": INSERT_WORKSPACE,
            "insert_key": INSERT_KEY,
            "drop_claim": DROP_CLAIM,
            "take_feed_lease": TAKE_FEED_LEASE,
            "renew_feed_lease": RENEW_FEED_LEASE,
        }
        for names, is_idempotent in ((idempotent, True), (not_idempotent, False)):
            for name, cql in names.items():
                ps = session.prepare(cql)
                ps.consistency_level = self._cl
                ps.serial_consistency_level = self._serial_cl
                ps.is_idempotent = is_idempotent
                self._ps[name] = ps

    async def close(self) -> None:
        cluster, self._cluster, self._session = self._cluster, None, None
        if cluster is None:
            return

        def finish() -> None:
            self._finish_writebacks()
            cluster.shutdown()

        await asyncio.to_thread(finish)

    async def wait_for_writebacks(self) -> None:
        """Wait for the count write-backs started so far (tests and benchmarks)."""
        await asyncio.to_thread(self._finish_writebacks)

    def _finish_writebacks(self) -> None:
        with self._writebacks_lock:
            pending = list(self._writebacks.values())
        for future in pending:  # best effort: they only spare the next reader a count
            try:
                future.result()
            except Exception:
                pass

    # The async bridge ----------------------------------------------------------

    def _require_session(self) -> Session:
        if self._session is None:
            raise StoreUnavailable("the cassandra store is not open")
        return self._session

    async def _page(
        self,
        statement: Any,
        params: Sequence[Any] | None = None,
        *,
        fetch_size: int | None = None,
        paging_state: bytes | None = None,
    ) -> tuple[list, bytes | None]:
        """One page of a statement's result, awaited without blocking the loop.

        The driver completes requests on its own I/O thread; the callback only
        hands the outcome to this loop with call_soon_threadsafe.
        """
        session = self._require_session()
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        if params is not None:
            statement = statement.bind(params)
        if fetch_size is not None:
            statement.fetch_size = fetch_size
        self.stats.statements += 1
        try:
            future = session.execute_async(statement, paging_state=paging_state)
        except _UNAVAILABLE as exc:
            raise _unavailable(exc) from exc

        def deliver(result: Any, error: BaseException | None) -> None:
            try:
                loop.call_soon_threadsafe(settle, waiter, result, error)
            except RuntimeError:  # the caller's loop is gone: nobody waits
                pass

        future.add_callbacks(lambda rows: deliver(future, None), lambda exc: deliver(None, exc))
        try:
            done = await waiter
            result = done.result()  # already complete: does not block
        except _UNAVAILABLE as exc:
            raise _unavailable(exc) from exc
        return list(result.current_rows), result.paging_state

    async def _all(self, statement: Any, params: Sequence[Any], *, fetch_size: int) -> list:
        rows, state = await self._page(statement, params, fetch_size=fetch_size)
        while state is not None:
            more, state = await self._page(statement, params, fetch_size=fetch_size, paging_state=state)
            rows.extend(more)
        return rows

    async def _execute(self, name: str, params: Sequence[Any]) -> list:
        rows, _ = await self._page(self._ps[name], params)
        return rows

    @staticmethod
    async def _gather(aws: Iterable[Awaitable[T]], limit: int = CONCURRENCY) -> list[T]:
        """Run awaitables concurrently, at most ``limit`` at a time; every one
        finishes before the first error (if any) is raised."""
        sem = asyncio.Semaphore(limit)

        async def one(aw: Awaitable[T]) -> T:
            async with sem:
                return await aw

        results = await asyncio.gather(*(one(aw) for aw in aws), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return results  # type: ignore[return-value]

    # Events -------------------------------------------------------------------

    async def append(self, events: Sequence[StoredEvent]) -> list[Original | None]:
        """Claim the events' message_ids, then write in three waves: dirty marks,
        rows, clean marks.

        An event whose message_id is claimed already is a duplicate: the claim's
        event (the original) is written again in its place, the same rows under
        the same keys, so that the original is stored for sure when the
        duplicate is answered, even if the process that claimed it died before
        its rows (docs/idempotent-ingest.md).

        Each wave sends every partition's writes at once, small partitions packed
        together by replica (see _write_partitions): a batch of the API holding 100
        persons costs a few dozen requests, not four per person.
        """
        if not events:
            return []
        self._require_session()
        results: list[Original | None] = [None] * len(events)
        writes: dict[str, StoredEvent] = {}  # by event_id: an original found twice is written once
        claims: dict[tuple[str, str], list[int]] = {}  # (workspace, message_id) -> indexes, first first
        for i, e in enumerate(events):
            if e.message_id is None:
                writes[e.event_id] = e
            else:
                claims.setdefault((e.workspace_id, e.message_id), []).append(i)
        if claims:
            firsts = [events[indexes[0]] for indexes in claims.values()]
            # Indexed by person before they are claimed: a claim is never out of a deletion's reach.
            index = self._ps["index_claim"]
            await self._write_partitions(
                [[(index, (e.workspace_id, e.person_id, e.message_id, self._claim_ttl(e)), MARK_BYTES)] for e in firsts]
            )
            originals = await self._gather(self._claim(e) for e in firsts)
            for e, original, indexes in zip(firsts, originals, claims.values(), strict=True):
                writes[original.event_id] = original
                for i in indexes if original is not e else indexes[1:]:
                    results[i] = (original.event_id, original.person_id)
        await self._write_events(list(writes.values()))
        return results

    async def _claim(self, e: StoredEvent) -> StoredEvent:
        """Claim e's message_id (a lightweight transaction): e when it won, else
        the event that holds the claim."""
        rows = await self._execute(
            "claim_message",
            (
                e.workspace_id,
                e.message_id,
                e.event_id,
                e.person_id,
                e.external_id,
                e.event,
                e.parameters,
                e.timestamp_us,
                e.created_at_us,
                self._claim_ttl(e),
            ),
        )
        row = rows[0]
        # A retried claim may find its own first attempt (same event_id): then it won.
        if row[0] or row.event_id == e.event_id:
            return e
        return StoredEvent(
            event_id=row.event_id,
            workspace_id=e.workspace_id,
            person_id=row.person_id,
            external_id=row.external_id,
            event=row.event,
            parameters=row.parameters,
            timestamp_us=row.ts,
            created_at_us=row.created_at,
            message_id=e.message_id,
        )

    def _claim_ttl(self, e: StoredEvent) -> int:
        """A claim lasts the window from the time the event was received."""
        window = self.settings.dedup_window_s
        return min(window, max(1, -(-(e.created_at_us + window * 1_000_000 - now_us()) // 1_000_000)))

    async def _write_events(self, events: Sequence[StoredEvent]) -> None:
        if not events:
            return
        keys: dict[tuple[str, str], set[tuple[str, int]]] = {}
        ws_keys: dict[str, set[tuple[int, int, str]]] = defaultdict(set)  # workspace -> (grain, bucket, event_key)
        ws_persons: set[tuple[str, int, int, str, str]] = set()
        rows: dict[tuple, list[_Write]] = defaultdict(list)
        insert, insert_by_name = self._ps["insert_event"], self._ps["insert_event_by_name"]
        insert_ws_event, insert_ws_person = self._ps["insert_ws_event"], self._ps["insert_ws_person"]
        insert_outbox = self._ps["insert_outbox"]
        for e in events:
            b = bucket_of(e.timestamp_us)
            person = (e.workspace_id, e.person_id)
            if (person_keys := keys.get(person)) is None:
                person_keys = keys[person] = {(ALL_EVENTS, SUMMARY_BUCKET)}
            person_keys.update(((ALL_EVENTS, b), (e.event, b), (e.event, SUMMARY_BUCKET)))
            hour = e.timestamp_us - e.timestamp_us % HOUR_US
            rows[("workspace_events", e.workspace_id, hour)].append(
                (
                    insert_ws_event,
                    (e.workspace_id, hour, e.event, e.timestamp_us, e.event_id),
                    WS_ROW_BYTES + len(e.event),
                )
            )
            for grain, bucket in ((HOUR_US, hour), (BUCKET_US, b * BUCKET_US)):
                for key in (ALL_EVENTS, e.event):
                    ws_keys[e.workspace_id].add((grain, bucket, key))
                    if (person_row := (e.workspace_id, grain, bucket, key, e.person_id)) not in ws_persons:
                        ws_persons.add(person_row)
                        rows[("workspace_persons", e.workspace_id, grain, bucket)].append(
                            (insert_ws_person, person_row, WS_ROW_BYTES + len(key))
                        )
            size = len(e.parameters) + len(e.external_id) + len(e.event) + 96
            ttl = self._ttl(b)
            rows[(*person, "", b)].append(
                (
                    insert,
                    (
                        e.workspace_id,
                        e.person_id,
                        b,
                        e.timestamp_us,
                        e.event_id,
                        e.event,
                        e.external_id,
                        e.parameters,
                        e.created_at_us,
                        ttl,
                    ),
                    size,
                )
            )
            rows[(*person, e.event, b)].append(
                (
                    insert_by_name,
                    (
                        e.workspace_id,
                        e.person_id,
                        e.event,
                        b,
                        e.timestamp_us,
                        e.event_id,
                        e.external_id,
                        e.parameters,
                        e.created_at_us,
                        ttl,
                    ),
                    size,
                )
            )
            shard, minute = outbox_partition(e)
            rows[("feed_outbox", shard, minute)].append(
                (
                    insert_outbox,
                    (
                        shard,
                        minute,
                        e.event_id,
                        e.workspace_id,
                        e.person_id,
                        e.external_id,
                        e.event,
                        e.parameters,
                        e.timestamp_us,
                        e.created_at_us,
                    ),
                    size,
                )
            )
        # Shielded: a caller that gives up (a deadline) must not abandon the end marks.
        work = asyncio.ensure_future(self._append(keys, ws_keys, list(rows.values())))
        work.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved even if nobody waits
        await asyncio.shield(work)

    async def _append(
        self,
        keys: dict[tuple[str, str], set[tuple[str, int]]],
        ws_keys: dict[str, set[tuple[int, int, str]]],
        rows: list[list[_Write]],
    ) -> None:
        # 1. Dirty before any row can land, for long enough to outlive a failed write.
        w0 = now_us()
        await self._write_partitions(self._marks(keys, ws_keys, stamp=w0, value=w0 + SETTLE_US))
        try:
            # 2. The rows.
            await self._write_partitions(rows)
            self.stats.rows_written += sum(map(len, rows))
            # 3. Written: a count that starts from now on sees every row above.
            w1 = max(now_us(), w0 + 1)
            await self._write_partitions(self._marks(keys, ws_keys, stamp=w1, value=w1))
        except BaseException:
            # Some rows may still land. Mark dirty again with a fresh stamp, so the end
            # mark of a concurrent write (stamped after w0) cannot hide them.
            again = now_us()
            try:
                await self._write_partitions(self._marks(keys, ws_keys, stamp=again, value=again + SETTLE_US))
            except Exception:
                pass  # unreachable too: step 1 still keeps these days dirty
            raise

    def _marks(
        self,
        keys: dict[tuple[str, str], set[tuple[str, int]]],
        ws_keys: dict[str, set[tuple[int, int, str]]] | None = None,
        *,
        stamp: int,
        value: int,
    ) -> list[list[_Write]]:
        """The written_at marks of each person's days (one partition per person)
        and of each workspace's hours and days (one partition per workspace and grain)."""
        ps = self._ps["mark_written"]
        marks = [
            [
                (ps, (stamp, self._ttl(bucket), value, workspace_id, person_id, key, bucket), MARK_BYTES + len(key))
                for key, bucket in sorted(person_keys)
            ]
            for (workspace_id, person_id), person_keys in keys.items()
        ]
        ws_ps = self._ps["mark_ws_written"]
        for workspace_id, buckets in (ws_keys or {}).items():
            by_grain: dict[int, list[_Write]] = defaultdict(list)
            for grain, bucket, key in sorted(buckets):
                by_grain[grain].append((ws_ps, (stamp, value, workspace_id, grain, bucket, key), MARK_BYTES + len(key)))
            marks.extend(by_grain.values())
        return marks

    def _ttl(self, bucket: int) -> int:
        """The TTL (seconds; 0: none) of what is written for a day: until the day passes the
        retention cutoff. The whole-history row lives as long as a day written now."""
        days = self.retention_days
        if days is None:
            return 0
        if bucket == SUMMARY_BUCKET:
            bucket = bucket_of(now_us())
        return max(1, -(-(retention_expiry(bucket, days) - now_us()) // 1_000_000))

    async def _mark(
        self, workspace_id: str, person_id: str, keys: set[tuple[str, int]], *, stamp: int, value: int
    ) -> None:
        await self._write_partitions(self._marks({(workspace_id, person_id): keys}, stamp=stamp, value=value))

    async def _write_partitions(self, partitions: list[list[_Write]]) -> None:
        """Every partition's writes, concurrently, in as few requests as is polite.

        A partition with more than MAX_SHARED_BATCH_BYTES goes alone, in unlogged
        batches of up to MAX_BATCH_BYTES. Smaller ones share unlogged batches with
        others that have the same replicas (the driver's token map), so the
        coordinator it is routed to owns every row: at most
        MAX_SHARED_BATCH_PARTITIONS partitions and MAX_SHARED_BATCH_BYTES each,
        Cassandra's default thresholds for warning about a batch.
        """
        requests: list[list[BoundStatement]] = []
        open_batches: dict[frozenset, _SharedBatch] = {}  # by replica set
        metadata = self._cluster.metadata if self._cluster is not None else None
        for partition in partitions:
            bound = [ps.bind(params) for ps, params, _ in partition]
            size = sum(item[2] for item in partition)
            if size > MAX_SHARED_BATCH_BYTES:
                requests.extend([b for b, _ in chunk] for chunk in _chunks(list(zip(bound, partition, strict=True))))
                continue
            routing_key = bound[0].routing_key  # None without table metadata: then one group for all
            replicas = frozenset(
                metadata.get_replicas(self.keyspace, routing_key)
                if metadata is not None and routing_key is not None
                else ()
            )
            batch = open_batches.get(replicas)
            if batch is None or not batch.fits(size):
                batch = open_batches[replicas] = _SharedBatch()
                requests.append(batch.statements)
            batch.add(bound, size)
        await self._gather(self._send(statements) for statements in requests)

    async def _write_batch(self, statements: list[_Write]) -> None:
        """Statements of one partition: alone, or as one unlogged batch."""
        await self._send([ps.bind(params) for ps, params, _ in statements])

    async def _send(self, statements: list[BoundStatement]) -> None:
        if len(statements) == 1:
            await self._page(statements[0])
            return
        batch = BatchStatement(batch_type=BatchType.UNLOGGED, consistency_level=self._cl)
        batch.is_idempotent = True
        for statement in statements:
            batch.add(statement)
        await self._page(batch)

    # The feed's outbox (service/feed/cassandra_outbox.py) ------------------------

    async def outbox_rows(
        self, shard: int, minute: int, after_id: str, through_id: str, limit: int
    ) -> list[StoredEvent]:
        """The outbox rows of one partition with after_id < event_id <= through_id, by event id."""
        rows = await self._execute("select_outbox", (shard, minute, after_id, through_id, limit))
        return [
            StoredEvent(
                r.event_id, r.workspace_id, r.person_id, r.external_id, r.event, r.parameters, r.ts, r.created_at
            )
            for r in rows
        ]

    async def feed_checkpoints(self, name: str) -> dict[int, tuple[int, str]]:
        """shard -> (minute, event id) of the last position saved for the feed ``name``."""
        return {r.shard: (r.minute, r.event_id) for r in await self._execute("select_feed_checkpoints", (name,))}

    async def save_feed_checkpoints(self, name: str, positions: dict[int, tuple[int, str]]) -> None:
        await self._gather(
            self._execute("save_feed_checkpoint", (minute, event_id, name, shard))
            for shard, (minute, event_id) in positions.items()
        )

    async def hold_feed_lease(self, name: str, owner: str, ttl_s: int, held: bool) -> bool:
        """Take the lease (``held`` False) or renew it (True); True when ``owner`` holds it now."""
        if held:
            rows = await self._execute("renew_feed_lease", (ttl_s, owner, name, owner))
        else:
            rows = await self._execute("take_feed_lease", (name, owner, ttl_s))
        return bool(rows) and bool(rows[0][0])

    async def feed_lease_owner(self, name: str) -> str | None:
        """Which publisher holds the feed's lease now (None: nobody)."""
        rows = await self._execute("select_feed_lease", (name,))
        return rows[0].owner if rows else None

    async def list_events(self, query: EventQuery) -> EventPage:
        self._require_session()
        q = query
        if q.since_us is not None and q.until_us is not None and q.until_us <= q.since_us:
            return EventPage([], 0)
        event_key = q.event if q.event is not None else ALL_EVENTS
        pk = (q.workspace_id, q.person_id, event_key)
        if q.after is not None:  # the total (from the counts) and the page, concurrently
            counted = asyncio.ensure_future(self._total(q, pk))
            try:
                events, more = await self._read_after(q, pk)
            finally:
                total = await counted
            return EventPage(events, total, more)
        prefetched = None
        if q.since_us is None and q.until_us is None:
            total, buckets = await self._whole_history(pk, q.offset, q.limit)
        else:
            total, buckets, prefetched = await self._window(q, pk)
        events = await self._read_page(q, buckets, total, prefetched)
        return EventPage(events, total)

    async def _whole_history(self, pk: tuple[str, str, str], offset: int, limit: int) -> tuple[int, list[_Bucket]]:
        """The total and enough newest days (with exact counts) to cover the page.

        A clean summary row gives the total, and only the newest days are read;
        otherwise every day is read (and counted where dirty), and the summed
        total is written back for the next reader.
        """
        started = now_us()
        ps = self._ps["select_buckets"]
        rows, state = await self._page(ps, pk, fetch_size=FIRST_INDEX_PAGE)
        self.stats.index_rows += len(rows)
        if not rows:
            return 0, []
        summary = rows[0] if rows[0].bucket == SUMMARY_BUCKET else None
        days = [self._day(r, None, None) for r in (rows[1:] if summary is not None else rows)]
        if summary is not None and _clean(summary):
            total = summary.n
            covered = min(offset + limit, total) if offset < total else 0
            while True:
                await self._count_dirty(pk, days, until_covered=covered)
                if state is None or sum(d.n for d in days if d.n is not None) >= covered:
                    break
                rows, state = await self._page(ps, pk, fetch_size=INDEX_PAGE, paging_state=state)
                self.stats.index_rows += len(rows)
                days.extend(self._day(r, None, None) for r in rows)
            return total, days
        while state is not None:
            rows, state = await self._page(ps, pk, fetch_size=INDEX_PAGE, paging_state=state)
            self.stats.index_rows += len(rows)
            days.extend(self._day(r, None, None) for r in rows)
        await self._count_dirty(pk, days)
        total = sum(d.n for d in days)
        if summary is None or started >= (summary.written_at or 0):
            self._write_back(pk, SUMMARY_BUCKET, total, started)
        return total, days

    async def _window(
        self, q: EventQuery, pk: tuple[str, str, str]
    ) -> tuple[int, list[_Bucket], tuple[_Bucket, list[StoredEvent]] | None]:
        """The days of a since/until window with exact counts, and, without an
        offset, the newest day's page, read while the edge and dirty days are
        counted (it does not depend on the counts): one round trip less."""
        since_us, until_us = q.since_us, q.until_us
        lo = MIN_BUCKET if since_us is None else bucket_of(since_us)
        hi = SUMMARY_BUCKET - 1 if until_us is None else bucket_of(until_us - 1)
        # The past days the window cuts: their hour counts are read alongside the index.
        today = bucket_of(now_us())
        edges = sorted(
            {
                day
                for day, edge in ((lo, since_us), (hi, until_us))
                if edge is not None and edge % BUCKET_US and day < today
            }
        )
        rows, *edge_hours = await self._gather(
            [
                self._all(self._ps["select_bucket_range"], (*pk, lo, hi), fetch_size=INDEX_PAGE),
                *(self._hours(pk, day) for day in edges),
            ]
        )
        self.stats.index_rows += len(rows)
        hours = cast(dict[int, dict[int, tuple[int, int]]], dict(zip(edges, edge_hours, strict=True)))
        days = [self._day(r, since_us, until_us, hours.get(r.bucket)) for r in rows]
        if days and q.offset == 0 and q.after is None:
            _, newest_page = await self._gather([self._count_dirty(pk, days), self._read_day(q, days[0], 0, q.limit)])
            prefetched = (days[0], cast(list[StoredEvent], newest_page))
        else:
            await self._count_dirty(pk, days)
            prefetched = None
        return sum(d.n or 0 for d in days), days, prefetched

    async def _hours(self, pk: tuple[str, str, str], bucket: int) -> dict[int, tuple[int, int]]:
        """The stored hour counts of a day: hour -> (n, counted_at), trusted or not."""
        rows = await self._execute("select_hours", (*pk, bucket))
        self.stats.hour_rows += len(rows)
        return {r.hour: (r.n, r.counted_at) for r in rows if r.n is not None and r.counted_at is not None}

    @staticmethod
    def _day(
        row: Any, since_us: int | None, until_us: int | None, hours: dict[int, tuple[int, int]] | None = None
    ) -> _Bucket:
        start, end = row.bucket * BUCKET_US, (row.bucket + 1) * BUCKET_US
        whole = (since_us is None or since_us <= start) and (until_us is None or until_us >= end)
        if not whole:
            start = start if since_us is None else max(start, since_us)
            end = end if until_us is None else min(end, until_us)
        clean = _clean(row)
        n = row.n if whole and clean else None
        return _Bucket(
            row.bucket,
            n,
            row.written_at or 0,
            start,
            end,
            whole,
            None if whole or not clean else row.n,
            None if whole else hours,
        )

    async def _count_dirty(
        self, pk: tuple[str, str, str], days: list[_Bucket], *, until_covered: int | None = None
    ) -> None:
        """Give every day that lacks a trusted count (dirty, or cut by the window)
        its exact count; with ``until_covered``, only the newest days needed to
        cover that many rows."""
        while True:
            todo: list[_Bucket] = []
            covered = 0
            for d in days:
                if until_covered is not None and covered >= until_covered:
                    break
                if d.n is None:
                    todo.append(d)
                else:
                    covered += d.n
            if not todo:
                return
            counts = await self._gather(self._count(pk, d) for d in todo)
            for d, (n, started) in zip(todo, counts, strict=True):
                d.n = n
                if d.whole and started >= d.written_at:
                    self._write_back(pk, d.bucket, n, started)

    async def _count(self, pk: tuple[str, str, str], d: _Bucket) -> tuple[int, int]:
        """The exact count of the day's part inside the window, and when the count started.

        For an edge day whose whole-day count is trusted, the smaller side is
        counted: the part outside the window, taken from the day's count, when
        that part is the shorter one (rows are assumed spread over the day).
        """
        started = now_us()
        outside = d.outside()
        if d.day_n is not None and sum(b - a for a, b in outside) < d.end_us - d.start_us:
            excluded = await self._gather(self._count_part(pk, d, a, b, started) for a, b in outside)
            return d.day_n - sum(excluded), started
        return await self._count_part(pk, d, d.start_us, d.end_us, started), started

    async def _count_part(self, pk: tuple[str, str, str], d: _Bucket, start_us: int, end_us: int, started: int) -> int:
        """The exact count of [start_us, end_us) within day ``d``. On a past edge day
        that is not dirty, whole hours come from their stored counts where trusted
        (or are counted and stored), and only the cut hours at either end are
        counted row by row."""
        first, last = -(-start_us // HOUR_US), end_us // HOUR_US  # the whole hours inside: [first, last)
        if d.hours is None or d.written_at > started or first >= last:
            return await self._count_range(pk, d.bucket, start_us, end_us)
        counts = [
            self._count_range(pk, d.bucket, a, b)
            for a, b in ((start_us, first * HOUR_US), (last * HOUR_US, end_us))
            if a < b
        ]
        known = 0
        midnight = d.bucket * (BUCKET_US // HOUR_US)  # in hours since the epoch
        for hour in range(first - midnight, last - midnight):
            n, counted_at = d.hours.get(hour, (None, 0))
            if n is not None and counted_at >= d.written_at:
                known += n
            else:
                counts.append(self._count_hour(pk, d, hour))
        return known + sum(await self._gather(counts))

    async def _count_hour(self, pk: tuple[str, str, str], d: _Bucket, hour: int) -> int:
        started = now_us()
        start = d.bucket * BUCKET_US + hour * HOUR_US
        n = await self._count_range(pk, d.bucket, start, start + HOUR_US)
        if started >= d.written_at:
            self._write_back(pk, d.bucket, n, started, hour=hour)
        return n

    async def _count_range(self, pk: tuple[str, str, str], bucket: int, start_us: int, end_us: int) -> int:
        workspace_id, person_id, event_key = pk
        self.stats.counts += 1
        if event_key == ALL_EVENTS:
            rows = await self._execute("count_events", (workspace_id, person_id, bucket, start_us, end_us))
        else:
            rows = await self._execute(
                "count_events_by_name", (workspace_id, person_id, event_key, bucket, start_us, end_us)
            )
        return rows[0][0]

    def _write_back(
        self, pk: tuple[str, str, str], bucket: int, n: int, started: int, *, hour: int | None = None
    ) -> None:
        """Store a count (of a day, or of one hour of it) for the next reader, in the
        background; one per bucket and hour at a time."""
        if hour is None:
            self._save_count((*pk, bucket, hour), "save_count", (started, self._ttl(bucket), n, started, *pk, bucket))
        else:
            self._save_count(
                (*pk, bucket, hour), "save_hour_count", (started, self._ttl(bucket), n, started, *pk, bucket, hour)
            )

    def _save_count(self, key: tuple, statement: str, params: tuple) -> None:
        """Run a count's write-back in the background, one per ``key`` at a time."""
        session = self._session
        if session is None:
            return
        with self._writebacks_lock:
            if key in self._writebacks:
                return
            bound = self._ps[statement].bind(params)
            try:
                future = session.execute_async(bound)
            except Exception:
                return
            self._writebacks[key] = future
        self.stats.statements += 1
        self.stats.count_writebacks += 1

        def forget(_: Any) -> None:
            with self._writebacks_lock:
                if self._writebacks.get(key) is future:
                    del self._writebacks[key]

        def failed(exc: BaseException) -> None:
            log.debug("count write-back for %s failed: %s", key, exc)
            forget(None)

        future.add_callbacks(forget, failed)

    async def _read_page(
        self,
        q: EventQuery,
        days: list[_Bucket],
        total: int,
        prefetched: tuple[_Bucket, list[StoredEvent]] | None = None,
    ) -> list[StoredEvent]:
        """Skip whole days by their counts, then read just the rows of the page
        (a day whose first rows were already read is not read again)."""
        skip, remaining = q.offset, min(q.limit, max(total - q.offset, 0))
        plan: list[tuple[_Bucket, int, int]] = []  # (day, rows to skip in it, rows to take)
        for d in days:
            if remaining <= 0:
                break
            n = d.n or 0
            if skip >= n:
                skip -= n
                continue
            take = min(n - skip, remaining)
            plan.append((d, skip, take))
            skip, remaining = 0, remaining - take
        if plan and prefetched is not None:
            day, rows = prefetched
            first, skip, take = plan[0]
            if first is day and skip == 0 and take <= len(rows):
                return rows[:take] + await self._read_page_plan(q, plan[1:])
        return await self._read_page_plan(q, plan)

    async def _read_page_plan(self, q: EventQuery, plan: list[tuple[_Bucket, int, int]]) -> list[StoredEvent]:
        pages = await self._gather(self._read_day(q, d, s, t) for d, s, t in plan)
        return [e for page in pages for e in page]

    async def _read_day(self, q: EventQuery, d: _Bucket, skip: int, take: int) -> list[StoredEvent]:
        return await self._read_rows(
            q, "select_events", "select_events_by_name", (d.bucket, d.start_us, d.end_us), skip + take, skip=skip
        )

    async def _total(self, q: EventQuery, pk: tuple[str, str, str]) -> int:
        """The exact count of the listing's events (a cursor page reads no days for it)."""
        if q.since_us is None and q.until_us is None:
            return (await self._whole_history(pk, 0, 0))[0]
        return (await self._window(q, pk))[0]

    async def _read_after(self, q: EventQuery, pk: tuple[str, str, str]) -> tuple[list[StoredEvent], bool]:
        """Keyset paging: up to q.limit events after q.after, and whether more follow.

        Starts at the cursor's day (the rows of the cursor's timestamp after its
        id, then the older rows of that day) and goes on to older days in the
        index, one day at a time until the page is full: a deep page reads what
        the first one does.
        """
        after_ts, after_id = q.after  # type: ignore[misc]
        lo = MIN_BUCKET if q.since_us is None else bucket_of(q.since_us)
        hi = bucket_of(after_ts) if q.until_us is None else min(bucket_of(after_ts), bucket_of(q.until_us - 1))
        want = q.limit + 1
        out: list[StoredEvent] = []
        if lo > hi:
            return out, False
        ps = self._ps["select_bucket_range"]
        rows, state = await self._page(ps, (*pk, lo, hi), fetch_size=FIRST_INDEX_PAGE)
        while True:
            self.stats.index_rows += len(rows)
            for r in rows:
                start, end = r.bucket * BUCKET_US, (r.bucket + 1) * BUCKET_US
                start = start if q.since_us is None else max(start, q.since_us)
                end = end if q.until_us is None else min(end, q.until_us)
                if start <= after_ts < end:
                    out += await self._read_rows(
                        q,
                        "select_events_at",
                        "select_events_by_name_at",
                        (r.bucket, after_ts, after_id),
                        want - len(out),
                    )
                if len(out) < want and start < min(end, after_ts):
                    out += await self._read_rows(
                        q,
                        "select_events",
                        "select_events_by_name",
                        (r.bucket, start, min(end, after_ts)),
                        want - len(out),
                    )
                if len(out) >= want:
                    return out[: q.limit], True
            if state is None:
                return out, False
            rows, state = await self._page(ps, (*pk, lo, hi), fetch_size=INDEX_PAGE, paging_state=state)

    async def _read_rows(
        self, q: EventQuery, all_events: str, by_name: str, where: tuple, limit: int, *, skip: int = 0
    ) -> list[StoredEvent]:
        """Up to ``limit`` rows of one day's partition (``where``: the statement's
        values after the partition's person and event), the first ``skip`` dropped."""
        if q.event is None:
            ps, params = self._ps[all_events], (q.workspace_id, q.person_id, *where, limit)
        else:
            ps, params = self._ps[by_name], (q.workspace_id, q.person_id, q.event, *where, limit)
        rows = await self._all(ps, params, fetch_size=min(limit, ROW_PAGE))
        self.stats.event_rows += len(rows)  # rows skipped for an offset too
        return _events(q, rows[skip:])

    # Aggregates ----------------------------------------------------------------

    async def person_summary(
        self, workspace_id: str, person_id: str, since_us: int | None, until_us: int | None
    ) -> list[NameStats]:
        """One read of the person's index partition; per event name, its count
        from the whole-history row (no window, when clean) or its days (dirty and
        edge days counted, as for ``total``), and the first and last time from
        one row read at each end."""
        self._require_session()
        if since_us is not None and until_us is not None and until_us <= since_us:
            return []
        started = now_us()
        rows = await self._all(self._ps["select_person_index"], (workspace_id, person_id), fetch_size=INDEX_PAGE)
        self.stats.index_rows += len(rows)
        by_name: dict[str, list[Any]] = defaultdict(list)
        for r in rows:
            if r.event_key != ALL_EVENTS:
                by_name[r.event_key].append(r)
        stats = await self._gather(
            self._name_summary((workspace_id, person_id, event), event_rows, since_us, until_us, started)
            for event, event_rows in by_name.items()
        )
        return [s for s in stats if s is not None]

    async def _name_summary(
        self, pk: tuple[str, str, str], rows: list[Any], since_us: int | None, until_us: int | None, started: int
    ) -> NameStats | None:
        lo = MIN_BUCKET if since_us is None else bucket_of(since_us)
        hi = SUMMARY_BUCKET - 1 if until_us is None else bucket_of(until_us - 1)
        summary = next((r for r in rows if r.bucket == SUMMARY_BUCKET), None)
        days = [self._day(r, since_us, until_us) for r in rows if lo <= r.bucket <= hi]  # newest first
        whole_history = since_us is None and until_us is None
        if whole_history and summary is not None and _clean(summary):
            n = summary.n
        else:
            await self._count_dirty(pk, days)
            n = sum(d.n for d in days)
            if whole_history and (summary is None or started >= (summary.written_at or 0)):
                self._write_back(pk, SUMMARY_BUCKET, n, started)
        if not n:
            return None
        last, first = await self._gather(
            [self._end_ts(pk, days, "select_last_by_name"), self._end_ts(pk, days[::-1], "select_first_by_name")]
        )
        if first is None or last is None:  # rows of a failed write counted, then gone: count again later
            return None
        return NameStats(pk[2], n, first, last)

    async def _end_ts(self, pk: tuple[str, str, str], days: list[_Bucket], statement: str) -> int | None:
        """The time of the first row that ``statement`` finds in the days, in their order."""
        for d in days:
            if d.n == 0:
                continue
            rows = await self._execute(statement, (*pk, d.bucket, d.start_us, d.end_us))
            self.stats.event_rows += len(rows)
            if rows:
                return rows[0].ts
        return None

    async def event_counts(
        self, workspace_id: str, event: str | None, interval_us: int, start_us: int, end_us: int
    ) -> list[CountBucket]:
        self._require_session()
        key = event or ALL_EVENTS
        started = now_us()
        rows = [r for r in await self._ws_buckets(workspace_id, interval_us, start_us, end_us) if r.event_key == key]
        counts = await self._gather(self._ws_count(workspace_id, interval_us, r, started) for r in rows)
        return [CountBucket(r.bucket, n, u) for r, (n, u, _, _) in zip(rows, counts, strict=True) if n]

    async def event_names(self, workspace_id: str, since_us: int | None, until_us: int | None) -> list[NameStats]:
        """The days inside the window and the hours of its partial edge days."""
        self._require_session()
        started = now_us()
        lo = MIN_BUCKET if since_us is None else since_us
        hi = SUMMARY_BUCKET if until_us is None else until_us
        day_lo, day_hi = -(-lo // BUCKET_US) * BUCKET_US, hi // BUCKET_US * BUCKET_US
        ranges = (
            [(BUCKET_US, day_lo, day_hi), (HOUR_US, lo, day_lo), (HOUR_US, day_hi, hi)]
            if day_lo < day_hi
            else [(HOUR_US, lo, hi)]
        )
        ranges = [(grain, a, b) for grain, a, b in ranges if a < b]
        row_lists = await self._gather(self._ws_buckets(workspace_id, grain, a, b) for grain, a, b in ranges)
        named = [
            (grain, r)
            for (grain, _, _), rows in zip(ranges, row_lists, strict=True)
            for r in rows
            if r.event_key != ALL_EVENTS
        ]
        counts = await self._gather(self._ws_count(workspace_id, grain, r, started) for grain, r in named)
        stats: dict[str, NameStats] = {}
        for (_, r), (n, _, first, last) in zip(named, counts, strict=True):
            if not n:
                continue
            have = stats.get(r.event_key)
            stats[r.event_key] = (
                NameStats(r.event_key, n, first, last)
                if have is None
                else NameStats(r.event_key, have.count + n, min(have.first_us, first), max(have.last_us, last))
            )
        return list(stats.values())

    async def _ws_buckets(self, workspace_id: str, grain: int, start_us: int, end_us: int) -> list[Any]:
        rows = await self._all(
            self._ps["select_ws_buckets"], (workspace_id, grain, start_us, end_us), fetch_size=INDEX_PAGE
        )
        self.stats.index_rows += len(rows)
        return rows

    async def _ws_count(self, workspace_id: str, grain: int, row: Any, started: int) -> tuple[int, int, int, int]:
        """A workspace bucket's (n, distinct persons, first_ts, last_ts): as stored
        when counted after the bucket's last write, else counted (an hour from its
        rows, a day from its hours) and written back when the count started after
        that write. ``started`` is a time before ``row`` was read."""
        if _clean(row) and row.u is not None:
            return row.n, row.u, row.first_ts or 0, row.last_ts or 0
        key, bucket = row.event_key, row.bucket
        persons = self._execute("count_ws_persons", (workspace_id, grain, bucket, key))
        if grain == HOUR_US:
            self.stats.counts += 1
            if key == ALL_EVENTS:  # first and last are kept for event names only
                n_rows, u_rows = await self._gather([self._execute("count_ws_events", (workspace_id, bucket)), persons])
                first = last = 0
            else:
                n_rows, u_rows, first_rows, last_rows = await self._gather(
                    [
                        self._execute("count_ws_events_by_name", (workspace_id, bucket, key)),
                        persons,
                        self._execute("select_ws_first", (workspace_id, bucket, key)),
                        self._execute("select_ws_last", (workspace_id, bucket, key)),
                    ]
                )
                first = first_rows[0].ts if first_rows else 0
                last = last_rows[0].ts if last_rows else 0
            n, u = n_rows[0][0], u_rows[0][0]
        else:
            hour_rows, u_rows = await self._gather(
                [self._ws_buckets(workspace_id, HOUR_US, bucket, bucket + grain), persons]
            )
            hours = [r for r in hour_rows if r.event_key == key]
            counted = [
                c for c in await self._gather(self._ws_count(workspace_id, HOUR_US, r, started) for r in hours) if c[0]
            ]
            n, u = sum(c[0] for c in counted), u_rows[0][0]
            first = min((c[2] for c in counted), default=0)
            last = max((c[3] for c in counted), default=0)
        if started >= (row.written_at or 0):
            self._save_count(
                (workspace_id, grain, bucket, key),
                "save_ws_count",
                (started, n, u, first, last, started, workspace_id, grain, bucket, key),
            )
        return n, u, first, last

    # Workspaces and keys --------------------------------------------------------

    async def ensure_workspace(self, workspace_id: str, created_at_us: int) -> bool:
        rows = await self._execute("insert_workspace", (workspace_id, created_at_us))
        return bool(rows[0][0])  # [applied]

    async def list_workspaces(self) -> list[str]:
        rows = await self._all(self._ps["select_workspaces"], (), fetch_size=INDEX_PAGE)
        return sorted(r.workspace_id for r in rows)

    async def delete_person(self, workspace_id: str, person_id: str) -> int:
        """Drop every partition of the person, at the store's consistency.

        The index (person_buckets) names them: each day's rows and rows by
        name, the hour counts of each day, then the index itself, last, so a
        call that failed half way finds everything again when repeated. The
        deletes are partition tombstones written with the timestamp of the
        call's start: rows written after it (events tracked later) survive
        them. The days' rows are read first: their number is the answer, and
        their rows in the feed's outbox are deleted before anything else of them.

        The person's dedup claims go before anything else (a claim holds its
        whole event, and a copy of its message would write that event again):
        each only if it is still the person's, then their index.
        """
        stamp = now_us()
        person = (workspace_id, person_id)
        claimed = await self._all(self._ps["select_person_claims"], person, fetch_size=INDEX_PAGE)
        await self._gather(self._execute("drop_claim", (workspace_id, r.message_id, person_id)) for r in claimed)
        if claimed:
            await self._execute("drop_person_claims", (stamp, *person))
        index = await self._all(self._ps["select_person_index"], person, fetch_size=INDEX_PAGE)
        keys = [(r.event_key, r.bucket) for r in index if r.bucket != SUMMARY_BUCKET]
        days = sorted({bucket for key, bucket in keys if key == ALL_EVENTS})
        # The rows of each day: their count is the answer, and the feed's outbox rows of
        # those still in it (written in the last OUTBOX_TTL_S) go before they are published.
        rows = [
            r
            for day_rows in await self._gather(
                self._all(self._ps["select_day_rows"], (*person, day), fetch_size=INDEX_PAGE) for day in days
            )
            for r in day_rows
        ]
        shard, in_outbox = outbox_shard(workspace_id, person_id), stamp - OUTBOX_TTL_S * 1_000_000
        await self._gather(
            self._execute("drop_outbox_row", (stamp, shard, r.created_at // OUTBOX_MINUTE_US, r.event_id))
            for r in rows
            if r.created_at >= in_outbox
        )
        await self._gather(
            [
                *(self._execute("delete_day", (stamp, *person, day)) for day in days),
                *(
                    self._execute("delete_day_by_name", (stamp, *person, key, day))
                    for key, day in keys
                    if key != ALL_EVENTS
                ),
                *(self._execute("delete_hours", (stamp, *person, key, day)) for key, day in keys),
            ]
        )
        if index:
            await self._execute("delete_index", (stamp, *person))
        return len(rows)

    async def set_rate_limit(self, workspace_id: str, limit: RateLimit | None) -> bool:
        if not await self._execute("select_workspace", (workspace_id,)):
            return False
        if limit is None:
            await self._execute("delete_rate_limit", (workspace_id,))
        else:
            await self._execute("set_rate_limit", (workspace_id, limit.events_per_second, limit.burst))
        return True

    async def rate_limit(self, workspace_id: str) -> RateLimit | None:
        rows = await self._execute("select_rate_limit", (workspace_id,))
        return RateLimit(rows[0].events_per_second, rows[0].burst) if rows else None

    async def put_key(self, key: ApiKeyRecord) -> None:
        if not await self._execute("select_workspace", (key.workspace_id,)):
            raise ValueError(f"workspace {key.workspace_id!r} does not exist")
        scopes = " ".join(sorted(key.scopes))
        # The insert by id claims the key id (a lightweight transaction); only then
        # is the key made usable by its hash. A retried put_key finds its own row.
        rows = await self._execute(
            "insert_key", (key.key_id, key.key_hash, key.workspace_id, scopes, key.created_at_us)
        )
        if not rows[0][0] and rows[0].key_hash != key.key_hash:
            raise ValueError(f"key id {key.key_id!r} is taken")
        await self._execute(
            "insert_key_by_hash", (key.key_hash, key.key_id, key.workspace_id, scopes, key.created_at_us)
        )
        if key.revoked_at_us is not None:
            await self.revoke_key(key.key_id, key.revoked_at_us)

    async def key_by_hash(self, key_hash: str) -> ApiKeyRecord | None:
        rows = await self._execute("select_key_by_hash", (key_hash,))
        return _key(rows[0]) if rows else None

    async def list_keys(self, workspace_id: str | None = None) -> list[ApiKeyRecord]:
        rows = await self._all(self._ps["select_keys"], (), fetch_size=INDEX_PAGE)
        keys = [_key(r) for r in rows if workspace_id is None or r.workspace_id == workspace_id]
        return sorted(keys, key=lambda k: (k.workspace_id, k.created_at_us, k.key_id))

    async def revoke_key(self, key_id: str, revoked_at_us: int) -> bool:
        rows = await self._execute("select_key", (key_id,))
        if not rows:
            return False
        row = rows[0]
        if row.revoked_at is not None:
            return True  # the first revocation time stays
        await self._gather(
            [
                self._execute("revoke_key_by_hash", (revoked_at_us, row.key_hash)),
                self._execute("revoke_key", (revoked_at_us, key_id)),
            ]
        )
        return True


def outbox_partition(e: StoredEvent) -> tuple[int, int]:
    """(shard, minute) of an event's outbox row: the shard from the person, the minute from its receipt."""
    return outbox_shard(e.workspace_id, e.person_id), e.created_at_us // OUTBOX_MINUTE_US


def outbox_shard(workspace_id: str, person_id: str) -> int:
    """The outbox shard of a person's events."""
    return zlib.crc32(f"{workspace_id}/{person_id}".encode()) % OUTBOX_SHARDS


def _clean(row: Any) -> bool:
    """A stored count is exact when no write into its bucket came after the count started."""
    return row.n is not None and row.counted_at is not None and row.counted_at >= (row.written_at or 0)


def _chunks(items: list[tuple[BoundStatement, _Write]]) -> Iterable[list[tuple[BoundStatement, _Write]]]:
    """One partition's writes in batches of at most MAX_BATCH_BYTES (at least one each)."""
    chunk: list[tuple[BoundStatement, _Write]] = []
    size = 0
    for item in items:
        if chunk and size + item[1][2] > MAX_BATCH_BYTES:
            yield chunk
            chunk, size = [], 0
        chunk.append(item)
        size += item[1][2]
    if chunk:
        yield chunk


def _events(q: EventQuery, rows: list) -> list[StoredEvent]:
    return [
        StoredEvent(
            event_id=r.event_id,
            workspace_id=q.workspace_id,
            person_id=q.person_id,
            external_id=r.external_id,
            event=r.event,
            parameters=r.parameters,
            timestamp_us=r.ts,
            created_at_us=r.created_at,
        )
        for r in rows
    ]


def _key(row: Any) -> ApiKeyRecord:
    return ApiKeyRecord(
        row.key_id,
        row.key_hash,
        row.workspace_id,
        frozenset((row.scopes or "").split()),
        row.created_at,
        row.revoked_at,
    )
