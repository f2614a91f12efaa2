"""Shared fixtures.

- ``store``: the contract fixture, parametrized over every backend. Cassandra
  comes from tests/cassandra_support.py: skipped with a loud reason locally when
  it cannot start, a failure in CI (CI=true).
- ``server``: a real ``python -m service serve`` process tree (gRPC workers and
  gateway workers) on ephemeral ports, on a throwaway SQLite file.
"""

from __future__ import annotations

import pytest

from service.store.sqlite import SqliteStore

pytest_plugins = ["cassandra_support", "service_support"]

BACKENDS = ["sqlite", "cassandra"]


@pytest.fixture
async def sqlite_store(tmp_path):
    store = SqliteStore(str(tmp_path / "events.db"))
    await store.open()
    yield store
    await store.close()


@pytest.fixture(params=BACKENDS)
def store(request):
    """An opened, empty store of each backend."""
    if request.param == "cassandra":
        request.applymarker(pytest.mark.cassandra)
    return request.getfixturevalue(f"{request.param}_store")
