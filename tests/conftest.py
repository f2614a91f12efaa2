"""Shared fixtures.

- ``store``: the contract fixture, parametrized over every backend: SQLite
  committing in-process, SQLite through the writer process's socket (as the
  workers of ``serve`` use it), and Cassandra. Cassandra comes from
  tests/cassandra_support.py: skipped with a loud reason locally when it cannot
  start, a failure in CI (CI=true).
- ``server``: a real ``python -m service serve`` process tree (gRPC workers and
  gateway workers) on ephemeral ports, on a throwaway SQLite file.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path

import pytest

from service.store.sqlite import SqliteStore
from service.store.sqlite_writer import serve_writer

pytest_plugins = ["cassandra_support", "service_support"]

BACKENDS = ["sqlite", "sqlite_writer", "cassandra"]


@pytest.fixture
async def sqlite_store(tmp_path):
    store = SqliteStore(str(tmp_path / "events.db"))
    await store.open()
    yield store
    await store.close()


@pytest.fixture
async def sqlite_writer(tmp_path):
    """A writer process's server, run in this loop: (store URL for workers, stop event)."""
    run_dir = tempfile.mkdtemp(prefix="fw-")  # Unix socket paths must stay short
    socket_path = str(Path(run_dir) / "appends.sock")
    stop = asyncio.Event()
    url = f"sqlite:///{tmp_path / 'events.db'}"
    serving = asyncio.create_task(serve_writer(url, socket_path, stop))
    while not Path(socket_path).exists():
        if serving.done():
            serving.result()
        await asyncio.sleep(0.01)
    yield f"{url}?writer={socket_path}", stop
    stop.set()
    await serving
    shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture
async def sqlite_writer_store(sqlite_writer):
    """A SqliteStore that sends its appends to a writer process (reads stay local)."""
    store = SqliteStore.from_url(sqlite_writer[0])
    await store.open()
    yield store
    await store.close()


@pytest.fixture(params=BACKENDS)
def store(request):
    """An opened, empty store of each backend."""
    if request.param == "cassandra":
        request.applymarker(pytest.mark.cassandra)
    return request.getfixturevalue(f"{request.param}_store")
