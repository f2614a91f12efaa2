"""pytest plugin: a real Cassandra for the tests.

- ``cassandra_url`` (session): a URL for a fresh keyspace on 127.0.0.1:9042
  (native protocol v3, what the local Cassandra 2.1 speaks). When no Cassandra
  answers, ``scripts/cassandra.sh up`` starts one (the first time it also
  fetches it, a minute or so). When it cannot start, the tests that need it are
  skipped with a loud reason, or fail when CI=true: never a silent pass. The
  keyspace is dropped at the end of the session. Nothing is started unless a
  selected test needs Cassandra.
- ``cassandra_store`` (function, async like ``sqlite_store``): the session's
  one opened CassandraStore on that keyspace, its statistics reset. Nothing is
  truncated between tests: each test writes in its own workspace (the
  ``workspace`` fixture) and asserts only on that. The store is not tied to
  one event loop: ``asyncio.run`` works with it too (see ``run``).

Every test that needs Cassandra carries the ``cassandra`` marker by the time
``-m`` selects tests (so ``-m "not cassandra"`` runs without it): the tests
that use its fixtures, and the cases of a test whose parameter (or a
fixture's) is ``"cassandra"`` (the ``store`` and ``service`` fixtures, which
request Cassandra only while they run). Tests marked ``runs_last`` (the
fault tests, which stop the node) are moved after every other test.

Env: ``FLAMEUP_TEST_CASSANDRA=host:port`` uses a Cassandra that is already
running elsewhere (then nothing is started); ``CASS_PORT`` is the local port.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import secrets
import subprocess
from collections.abc import AsyncIterator, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "cassandra.sh"
START_TIMEOUT = 300.0  # the first start downloads Cassandra (and maybe Java)


def cassandra_address() -> tuple[str, int, bool]:
    """(host, port, managed): managed when scripts/cassandra.sh owns the node."""
    if target := os.environ.get("FLAMEUP_TEST_CASSANDRA"):
        host, _, port = target.rpartition(":")
        return host or "127.0.0.1", int(port or 9042), False
    return "127.0.0.1", int(os.environ.get("CASS_PORT", "9042")), True


def script(*args: str, timeout: float = START_TIMEOUT) -> subprocess.CompletedProcess:
    """Run scripts/cassandra.sh (up, down, status) and capture its output."""
    return subprocess.run([str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def cassandra_pid() -> int | None:
    """The pid of the node scripts/cassandra.sh started, when it runs."""
    pid_file = Path(os.environ.get("CASS_DIR", ROOT / ".cassandra-local")) / "cassandra.pid"
    try:
        pid = int(pid_file.read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def ensure_cassandra() -> str | None:
    """Start the local node unless CQL answers; None when up, else why not."""
    host, port, managed = cassandra_address()
    if not managed:
        return None
    if script("status", timeout=30).returncode == 0:
        return None
    try:
        done = script("up")
    except subprocess.TimeoutExpired:
        return f"scripts/cassandra.sh up did not finish within {START_TIMEOUT:.0f}s"
    if done.returncode != 0:
        return f"scripts/cassandra.sh up failed (exit {done.returncode}):\n{done.stdout}{done.stderr}"
    return None


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from sync code, even inside a running loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def _not_available(reason: str) -> None:
    message = f"CASSANDRA NOT AVAILABLE, tests that need it cannot run: {reason}"
    if os.environ.get("CI") == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "runs_last: stops shared services (Cassandra); ordered after every other test")


CASSANDRA_FIXTURES = {"cassandra_url", "cassandra_session_store", "cassandra_store"}


def needs_cassandra(item: pytest.Item) -> bool:
    """Whether the test uses Cassandra: its fixtures, or a ``"cassandra"`` parameter (its own or a fixture's)."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    return bool(CASSANDRA_FIXTURES & set(getattr(item, "fixturenames", ()))) or "cassandra" in params.values()


def pytest_itemcollected(item: pytest.Item) -> None:
    """Mark at collection (before ``-m`` deselects) every test that needs Cassandra."""
    if needs_cassandra(item) and not item.get_closest_marker("cassandra"):
        item.add_marker(pytest.mark.cassandra)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked runs_last go to the end, in their own order."""
    last = [item for item in items if item.get_closest_marker("runs_last")]
    if last:
        items[:] = [item for item in items if not item.get_closest_marker("runs_last")] + last


def drop_keyspace(host: str, port: int, keyspace: str) -> None:
    from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile
    from cassandra.policies import RoundRobinPolicy

    profile = ExecutionProfile(load_balancing_policy=RoundRobinPolicy())
    cluster = Cluster([host], port=port, protocol_version=3, schema_metadata_enabled=False, connect_timeout=5,
                      execution_profiles={EXEC_PROFILE_DEFAULT: profile})
    try:
        session = cluster.connect()
        session.execute(f"DROP KEYSPACE IF EXISTS {keyspace}", timeout=60)  # our own generated name
    finally:
        cluster.shutdown()


@pytest.fixture(scope="session")
def cassandra_url() -> Iterator[str]:
    try:
        import cassandra  # noqa: F401
    except ImportError as exc:
        _not_available(f"cassandra-driver is not installed: pip install -e '.[cassandra]' ({exc})")
    if error := ensure_cassandra():
        _not_available(error)
    host, port, _ = cassandra_address()
    keyspace = f"flameup_test_{os.getpid()}_{secrets.token_hex(3)}"
    yield f"cassandra://{host}:{port}/{keyspace}?protocol_version=3"
    try:
        drop_keyspace(host, port, keyspace)
    except Exception as exc:  # a node stopped by a test, say: not worth failing the run for
        print(f"could not drop test keyspace {keyspace}: {exc}")


@pytest.fixture(scope="session")
async def cassandra_session_store(cassandra_url: str) -> AsyncIterator[Any]:
    """One CassandraStore for the session: opening one costs a connection and the schema check."""
    from service.store.base import StoreUnavailable
    from service.store.cassandra import CassandraStore

    store = CassandraStore.from_url(cassandra_url)
    try:
        await store.open()
    except StoreUnavailable as exc:
        _not_available(f"the store could not open {cassandra_url}: {exc}")
    yield store
    await store.close()


@pytest.fixture
async def cassandra_store(cassandra_session_store: Any) -> Any:
    await cassandra_session_store.wait_for_writebacks()  # an earlier test's, not counted in this one's stats
    cassandra_session_store.stats.reset()
    return cassandra_session_store
