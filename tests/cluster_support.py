"""pytest plugin: the local three-node Cassandra cluster (and NATS cluster) for
the scale-out tests.

- ``cassandra_cluster`` (session): the cluster of scripts/cassandra-cluster.sh
  (127.0.0.1-3, CQL port 9142 unless CASS_CLUSTER_PORT says otherwise), started
  when it does not answer and stopped at the end of the session when this
  session started it. When it cannot start, the tests that need it are skipped
  with a loud reason, or fail when CI=true, as for the single node
  (tests/cassandra_support.py).
- ``cluster_url`` (session): a store URL for a fresh keyspace on it with
  replication factor 3 and LOCAL_QUORUM, dropped at the end.
- ``nats_cluster`` (session): the three JetStream servers of scripts/nats-cluster.sh.

Every test that uses these fixtures is marked ``cluster`` and ``cassandra`` at
collection, so ``-m 'not cassandra'`` (make test-fast) leaves it out and
``-m cluster`` picks the lane alone.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cassandra_support import _not_available, drop_keyspace

ROOT = Path(__file__).resolve().parents[1]
CASSANDRA_SCRIPT = ROOT / "scripts" / "cassandra-cluster.sh"
NATS_SCRIPT = ROOT / "scripts" / "nats-cluster.sh"
START_TIMEOUT = 400.0  # the first start fetches Cassandra; three nodes start one after another
NODES = 3
LOCAL_DC = "datacenter1"  # SimpleSnitch's one datacenter


def _run(script: Path, *args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([str(script), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@dataclass
class CassandraCluster:
    """The local cluster: node n (1-3) listens on 127.0.0.n."""

    port: int

    @property
    def hosts(self) -> list[str]:
        return [f"127.0.0.{n}" for n in range(1, NODES + 1)]

    def url(self, keyspace: str, **params: str) -> str:
        query = {"protocol_version": "3", "local_dc": LOCAL_DC, "replication": f"{LOCAL_DC}:3",
                 "consistency": "LOCAL_QUORUM", **params}
        return (f"cassandra://{','.join(self.hosts)}:{self.port}/{keyspace}?"
                + "&".join(f"{k}={v}" for k, v in query.items()))

    def script(self, *args: str, timeout: float = START_TIMEOUT) -> subprocess.CompletedProcess:
        return _run(CASSANDRA_SCRIPT, *args, timeout=timeout)

    def kill(self, n: int) -> None:
        """SIGKILL node n: a machine that dies, with no goodbye to gossip."""
        done = self.script("kill", str(n), timeout=30)
        assert done.returncode == 0, done.stdout + done.stderr

    def start(self, n: int) -> None:
        done = self.script("start", str(n))
        assert done.returncode == 0, done.stdout + done.stderr

    def signal(self, n: int, signum: int) -> None:
        """Send node n a signal: SIGSTOP makes it a node cut off the network (its
        connections stay open, nothing answers), SIGCONT brings it back."""
        done = self.script("pid", str(n), timeout=30)
        assert done.returncode == 0, f"node {n} is not running"
        os.kill(int(done.stdout.strip()), signum)

    def ensure_up(self) -> None:
        """Start every node that is not running (idempotent)."""
        done = self.script("up")
        assert done.returncode == 0, done.stdout + done.stderr


@dataclass
class NatsCluster:
    """The local JetStream cluster: server n (1-3) takes clients on 127.0.0.1:14221+n."""

    client_port: int = 14222

    @property
    def urls(self) -> list[str]:
        return [f"nats://127.0.0.1:{self.client_port + i}" for i in range(NODES)]

    def script(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return _run(NATS_SCRIPT, *args, timeout=timeout)

    def kill(self, n: int) -> None:
        done = self.script("kill", str(n))
        assert done.returncode == 0, done.stdout + done.stderr

    def start(self, n: int) -> None:
        done = self.script("start", str(n))
        assert done.returncode == 0, done.stdout + done.stderr


CLUSTER_FIXTURES = {"cassandra_cluster", "cluster_url", "nats_cluster"}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cluster: needs the local three-node clusters (started by the fixtures)")


def pytest_itemcollected(item: pytest.Item) -> None:
    if CLUSTER_FIXTURES & set(getattr(item, "fixturenames", ())):
        for marker in ("cluster", "cassandra"):
            if not item.get_closest_marker(marker):
                item.add_marker(marker)


@pytest.fixture(scope="session")
def cassandra_cluster() -> Iterator[CassandraCluster]:
    try:
        import cassandra  # noqa: F401
    except ImportError as exc:
        _not_available(f"cassandra-driver is not installed: pip install -e '.[cassandra]' ({exc})")
    cluster = CassandraCluster(port=int(os.environ.get("CASS_CLUSTER_PORT", "9142")))
    started = False
    if cluster.script("status", timeout=60).returncode != 0:
        try:
            done = cluster.script("up")
        except subprocess.TimeoutExpired:
            _not_available(f"scripts/cassandra-cluster.sh up did not finish within {START_TIMEOUT:.0f}s")
        if done.returncode != 0:
            _not_available(f"scripts/cassandra-cluster.sh up failed (exit {done.returncode}):\n"
                           f"{done.stdout}{done.stderr}")
        started = True
    yield cluster
    if started:  # 1.3 GiB of JVMs: leave the machine as this session found it
        cluster.script("down", timeout=120)


@pytest.fixture(scope="session")
def cluster_url(cassandra_cluster: CassandraCluster) -> Iterator[str]:
    keyspace = f"flameup_cluster_{os.getpid()}_{secrets.token_hex(3)}"
    yield cassandra_cluster.url(keyspace)
    cassandra_cluster.ensure_up()
    try:
        drop_keyspace(cassandra_cluster.hosts[0], cassandra_cluster.port, keyspace)
    except Exception as exc:
        print(f"could not drop test keyspace {keyspace}: {exc}")


@pytest.fixture(scope="session")
def nats_cluster() -> Iterator[NatsCluster]:
    nats = NatsCluster(client_port=int(os.environ.get("NATS_CLIENT_PORT", "14222")))
    started = False
    if nats.script("status").returncode != 0:
        done = nats.script("up")
        if done.returncode != 0:
            _not_available(f"scripts/nats-cluster.sh up failed (exit {done.returncode}):\n{done.stdout}{done.stderr}")
        started = True
    yield nats
    if started:
        nats.script("down")


def wait_for(predicate, timeout: float, interval: float = 0.25) -> float:
    """Seconds until predicate() is true; fails the test after ``timeout``."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            pytest.fail(f"not true within {timeout:.0f}s: {predicate.__doc__ or predicate}")
        time.sleep(interval)
    return time.monotonic() - started
