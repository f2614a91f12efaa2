"""What the service needs from storage, and nothing more.

Every backend implements :class:`Store` and passes ``tests/test_store_contract.py``.
Backends are chosen by URL (see :func:`service.store.open_store`).
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from service.domain import (
    DAY_S,
    DEFAULT_DEDUP_WINDOW_DAYS,
    CountBucket,
    EventPage,
    EventQuery,
    NameStats,
    Original,
    RateLimit,
    StoredEvent,
)

# Buckets group a person's timeline by UTC day. Cassandra partitions by them so
# that no partition grows without bound; every store keeps exact per-bucket
# counts so that `total` never needs a scan of a long history.
BUCKET_US = 86_400 * 1_000_000


def bucket_of(ts_us: int) -> int:
    return ts_us // BUCKET_US


# Retention keeps today and the ``days`` UTC days before it: an event is removed once its
# day is older than that, so the cutoff always falls on a day's start and the day counts of
# every store stay exact without counting within a day. The bound is Cassandra's (a TTL of
# at most 20 years).
MAX_RETENTION_DAYS = 7300


def retention_cutoff(now_us: int, days: int) -> int:
    """The oldest time still kept under a retention of ``days``."""
    return (bucket_of(now_us) - days) * BUCKET_US


def retention_expiry(bucket: int, days: int) -> int:
    """When the events of day ``bucket`` pass the cutoff of a retention of ``days``."""
    return (bucket + days + 1) * BUCKET_US


def dedup_window_seconds(days: str | float | None) -> int:
    """The dedup window in whole seconds (at least one) from a number of days
    (a store URL's ``dedup_window_days``; None: the default)."""
    if days is None:
        days = DEFAULT_DEDUP_WINDOW_DAYS
    try:
        value = float(days)
    except ValueError:
        value = -1.0
    if not 0 < value <= 3650:
        raise ValueError(f"dedup_window_days must be a number of days in (0, 3650], got {days!r}")
    return max(1, round(value * DAY_S))


class StoreUnavailable(Exception):
    """The store cannot be reached now; the caller may retry (gRPC UNAVAILABLE)."""


@dataclass(frozen=True, slots=True)
class ApiKeyRecord:
    """An API key as stored: never the key itself, only its SHA-256."""

    key_id: str  # short public handle, shown by `keys list`, used by `keys revoke`
    key_hash: str  # hex SHA-256 of the full key
    workspace_id: str
    scopes: frozenset[str]
    created_at_us: int
    revoked_at_us: int | None = None

    @property
    def revoked(self) -> bool:
        return self.revoked_at_us is not None


class Store(abc.ABC):
    """A per-person timeline store plus the workspace and key registry."""

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and create or migrate the schema (idempotent, versioned)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Finish pending writes and release connections."""

    # Events -------------------------------------------------------------

    @abc.abstractmethod
    async def append(self, events: Sequence[StoredEvent]) -> list[Original | None]:
        """Store events durably. When this returns, every event is stored, or is
        a duplicate: per event, None (stored) or the (event_id, person_id) of
        the event stored earlier with the same (workspace_id, message_id)
        within the dedup window, which is then stored for sure. A duplicate
        stores nothing and counts nowhere. Of copies within ``events`` the first
        wins; concurrent appends of one message_id, from any process, store it
        exactly once.

        Raises StoreUnavailable when the store cannot take them; then the caller
        reports failure for all of them.
        """

    @abc.abstractmethod
    async def list_events(self, query: EventQuery) -> EventPage:
        """A page of one person's events, newest first (timestamp, then id,
        descending), and the exact count of events matching the filters
        (``after`` does not narrow the count). With ``after``, the page starts
        after that (timestamp, event_id) and ``more`` says whether events
        follow it."""

    @abc.abstractmethod
    async def delete_person(self, workspace_id: str, person_id: str) -> int:
        """Remove every event of the person stored before the call, with every
        count and dedup entry derived from them; the number of events removed
        (0 when none).

        Events appended while it runs or after it are kept. A person being
        deleted may show part of their events until it returns.
        """

    # Aggregates: kept as events are written, so reads never count events ----

    @abc.abstractmethod
    async def person_summary(
        self, workspace_id: str, person_id: str, since_us: int | None, until_us: int | None
    ) -> list[NameStats]:
        """Per event name, the person's exact count and first and last time in
        [since, until) (None: unbounded), in any order; names without events left out."""

    @abc.abstractmethod
    async def event_counts(
        self, workspace_id: str, event: str | None, interval_us: int, start_us: int, end_us: int
    ) -> list[CountBucket]:
        """The workspace's buckets of ``interval_us`` (HOUR_US or DAY_US) in
        [start_us, end_us), both aligned to the interval, that hold events of
        ``event`` (None: every event), in time order, with exact counts and
        distinct persons."""

    @abc.abstractmethod
    async def event_names(self, workspace_id: str, since_us: int | None, until_us: int | None) -> list[NameStats]:
        """Per event name of the workspace, its exact count and first and last
        time in [since, until) (whole UTC hours; None: unbounded), in any order."""

    # Workspaces and keys ------------------------------------------------

    @abc.abstractmethod
    async def ensure_workspace(self, workspace_id: str, created_at_us: int) -> bool:
        """Create the workspace unless it exists; True when it was created."""

    @abc.abstractmethod
    async def list_workspaces(self) -> list[str]: ...

    @abc.abstractmethod
    async def set_rate_limit(self, workspace_id: str, limit: RateLimit | None) -> bool:
        """Set (or with None, lift) the workspace's ingest limit; False when no such workspace exists."""

    @abc.abstractmethod
    async def rate_limit(self, workspace_id: str) -> RateLimit | None:
        """The workspace's ingest limit; None when it has none (the default)."""

    @abc.abstractmethod
    async def put_key(self, key: ApiKeyRecord) -> None:
        """Store a new key (its workspace must exist)."""

    @abc.abstractmethod
    async def key_by_hash(self, key_hash: str) -> ApiKeyRecord | None: ...

    @abc.abstractmethod
    async def list_keys(self, workspace_id: str | None = None) -> list[ApiKeyRecord]: ...

    @abc.abstractmethod
    async def revoke_key(self, key_id: str, revoked_at_us: int) -> bool:
        """Mark a key revoked; False when no such key exists."""


def split_window(since_us: int | None, until_us: int | None) -> tuple[int | None, int | None, list[tuple[int, int]]]:
    """Split [since, until) into whole buckets and partial edge ranges.

    Returns ``(first, last, edges)``: every bucket from ``first`` to ``last``
    (inclusive; None means unbounded) lies wholly inside the window, and
    ``edges`` are the ``(start_us, end_us)`` pieces of the at most two buckets
    the window only partly covers. Totals sum stored counts for the whole
    buckets and count rows only in the edges.
    """
    first = None if since_us is None else -(-since_us // BUCKET_US)
    last = None if until_us is None else until_us // BUCKET_US - 1
    edges: list[tuple[int, int]] = []
    if since_us is not None and since_us % BUCKET_US:
        end = (since_us // BUCKET_US + 1) * BUCKET_US
        edges.append((since_us, end if until_us is None else min(end, until_us)))
    if until_us is not None and until_us % BUCKET_US:
        start = until_us // BUCKET_US * BUCKET_US
        if since_us is None or since_us < start:
            edges.append((start if since_us is None else max(start, since_us), until_us))
    return first, last, edges


def settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    """Complete a future from a driver or writer thread's outcome (run it on the
    future's loop with call_soon_threadsafe); a waiter that gave up is skipped."""
    if future.done():
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)
