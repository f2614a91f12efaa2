"""Shared fixtures.

- ``store``: the contract fixture, parametrized over every backend: SQLite
  committing in-process, the same merging its timeline after every commit (so
  a person's entries are split between ``timeline`` and ``recent`` at every
  point), SQLite through the writer process's socket (as the workers of
  ``serve`` use it), and Cassandra. Cassandra comes from
  tests/cassandra_support.py: skipped with a loud reason locally when it cannot
  start, a failure in CI (CI=true).
- ``workspace``: a workspace id of the test's own, so tests never see each
  other's data in a shared store (Cassandra's keyspace, a service's file).
- ``service`` (tests/service_support.py, per session and store): a real
  ``python -m service serve`` process tree (gRPC workers and gateway workers)
  on ephemeral ports, over a throwaway SQLite file or the Cassandra keyspace.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from service.store import open_store
from service.store.sqlite import SqliteStore
from service.store.sqlite_engine import Tuning
from service.store.sqlite_writer import serve_writer

pytest_plugins = ["cassandra_support", "service_support", "cluster_support"]

BACKENDS = ["sqlite", "sqlite_merging", "sqlite_writer", "cassandra"]


@pytest.fixture
async def sqlite_store(tmp_path):
    store = SqliteStore(str(tmp_path / "events.db"))
    await store.open()
    yield store
    await store.close()


@pytest.fixture
async def sqlite_merging_store(tmp_path):
    """A SqliteStore whose writer runs a timeline merge step of about two entries after every commit
    and remembers at most three committed person rows of the aggregates (it forgets them often)."""
    store = SqliteStore(str(tmp_path / "events.db"), tuning=Tuning(merge_from_rows=1, merge_step_rows=2, known_person_rows=3))
    await store.open()
    yield store
    await store.close()


@dataclass
class WriterRun:
    """A SQLite writer process's server, run in the test's event loop."""

    store_url: str
    socket_path: str  # what a worker sends its appends to
    stop: asyncio.Event
    task: asyncio.Task

    async def close(self) -> None:
        self.stop.set()
        await self.task


@pytest.fixture
async def sqlite_writer(tmp_path):
    """Start a writer for tmp_path/events.db on one socket, again after it stopped if asked
    (``start(tuning)``: with other tunables than the defaults)."""
    run_dir = tempfile.mkdtemp(prefix="fw-")  # Unix socket paths must stay short
    socket_path = str(Path(run_dir) / "appends.sock")
    url = f"sqlite:///{tmp_path / 'events.db'}"
    runs: list[WriterRun] = []

    async def start(tuning: Tuning | None = None) -> WriterRun:
        stop, ready = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(serve_writer(url, socket_path, stop, on_ready=ready.set, tuning=tuning))
        await asyncio.wait([task, asyncio.create_task(ready.wait())], return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()  # it failed to start: raise why
        runs.append(WriterRun(url, socket_path, stop, task))
        return runs[-1]

    yield start
    for run in runs:
        await run.close()
    shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture
async def sqlite_writer_store(sqlite_writer):
    """A store that sends its appends to a writer process (reads stay local), as serve's workers do."""
    writer = await sqlite_writer()
    store = open_store(writer.store_url, sqlite_writer=writer.socket_path)
    await store.open()
    yield store
    await store.close()


@pytest.fixture(params=BACKENDS)
def store(request):
    """An opened store of each backend; Cassandra's is shared by the session (write in ``workspace``)."""
    return request.getfixturevalue(f"{request.param}_store")


@pytest.fixture
def workspace(request) -> str:
    """ws_<test name>_<random>: valid for the API (at most 60 characters after ws_), unique per test."""
    name = re.sub(r"[^a-z0-9_]", "_", request.node.originalname.lower().removeprefix("test_"))[:32]
    return f"ws_{name}_{secrets.token_hex(4)}"
