"""Storage backends, chosen by URL and imported lazily.

- ``sqlite:///./data/events.db`` (the default): one file, WAL mode, no server.
- ``cassandra://host1,host2:9042/keyspace?consistency=LOCAL_QUORUM&protocol_version=3&local_dc=dc1``
"""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

from service.store.base import ApiKeyRecord, Store, StoreUnavailable

__all__ = ["ApiKeyRecord", "Store", "StoreUnavailable", "open_store", "with_dedup_window", "DEFAULT_STORE_URL"]

DEFAULT_STORE_URL = "sqlite:///./data/events.db"


def open_store(url: str, *, sqlite_writer: str | None = None) -> Store:
    """A Store for the URL (not yet opened: await ``store.open()``).

    ``sqlite_writer``: the Unix socket of a SQLite writer process (``serve``
    passes it to its workers); the store then sends its appends there instead
    of committing them itself. Only for sqlite URLs.
    """
    scheme = urlsplit(url).scheme
    if sqlite_writer is not None and scheme != "sqlite":
        raise ValueError(f"a SQLite writer socket was given for a {scheme!r} store URL: only sqlite:// stores use one")
    if scheme == "sqlite":
        from service.store.sqlite import SqliteClientStore, SqliteStore

        if sqlite_writer is not None:
            return SqliteClientStore.from_url(url, sqlite_writer)
        return SqliteStore.from_url(url)
    if scheme == "cassandra":
        try:
            from service.store.cassandra import CassandraStore
        except ImportError as exc:  # the driver is an optional dependency
            raise SystemExit(
                f"the cassandra store needs cassandra-driver: pip install 'flameup-events[cassandra]' ({exc})"
            ) from exc
        return CassandraStore.from_url(url)
    raise ValueError(f"unknown store URL scheme {scheme!r} in {url!r}: use sqlite:// or cassandra://")


def with_dedup_window(url: str, days: float | None) -> str:
    """The URL with ``dedup_window_days`` set (``serve --dedup-window-days``),
    unless it is None or the URL names a window itself."""
    query = urlsplit(url).query
    if days is None or "dedup_window_days" in parse_qs(query):
        return url
    return f"{url}{'&' if query else '?'}dedup_window_days={days:g}"
