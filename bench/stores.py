"""Per-store pieces of the benchmark: a fresh database, the raw bulk insert, loading, checks.

The raw insert is the store's own fastest bulk path with the store's own
statements (imported, never copied), on its own fresh database, with no service
in the path (bench.run runs it while the service is idle): SQLite
``executemany`` in transactions of the store's group-commit size; Cassandra
``execute_concurrent_with_args`` with the store's prepared inserts. The rows are
the ones the service would write for the same requests.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from bench.service_proc import all_pids, cmdline, cpu_seconds
from service import auth
from service.domain import HOUR_US, EventQuery, StoredEvent
from service.store import open_store
from service.store.base import BUCKET_US, bucket_of

LOAD_CHUNK = 5_000  # events per store.append when loading the list_person persons


@dataclass
class RawResult:
    events: int
    seconds: float
    rows_per_event: float  # rows the store writes per event
    client_cpu_s: float = 0.0  # this process (the bulk loader; for SQLite, the store itself)
    store_cpu_s: float = 0.0  # the database server's processes, when it has any

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0


class BenchStore:
    name: str

    def service_url(self) -> str:
        """A URL for a fresh, empty database for the service under test."""
        raise NotImplementedError

    def raw_insert(self, rows: Sequence[StoredEvent], max_seconds: float) -> RawResult:
        raise NotImplementedError

    def cleanup(self) -> None:
        pass

    def server_pids(self) -> list[int]:
        """Processes of the database server (none for an embedded store)."""
        return []

    async def load(self, url: str, events: Sequence[StoredEvent]) -> None:
        """Events straight into the store through its own append (its bulk path)."""
        store = open_store(url)
        await store.open()
        try:
            for i in range(0, len(events), LOAD_CHUNK):
                await store.append(events[i:i + LOAD_CHUNK])
        finally:
            await store.close()

    async def create_key(self, url: str, workspace_id: str) -> str:
        """A read key for a workspace of the bench's own (made before the service starts)."""
        store = open_store(url)
        await store.open()
        try:
            _, key = await auth.create_key(store, workspace_id, frozenset({auth.READ}))
            return key
        finally:
            await store.close()

    async def totals(self, url: str, workspace_id: str, person_ids: Sequence[str], concurrency: int = 16) -> int:
        """The sum of the store's exact totals over these persons."""
        store = open_store(url)
        await store.open()
        sem = asyncio.Semaphore(concurrency)

        async def one(pid: str) -> int:
            async with sem:
                return (await store.list_events(EventQuery(workspace_id, pid, limit=1))).total

        try:
            return sum(await asyncio.gather(*(one(p) for p in person_ids)))
        finally:
            await store.close()


class SqliteBench(BenchStore):
    name = "sqlite"

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="flameup-bench-")
        self._n = 0

    def _fresh_path(self, stem: str) -> str:
        self._n += 1
        return os.path.join(self.dir, f"{stem}-{self._n}.db")

    def service_url(self) -> str:
        return f"sqlite:///{self._fresh_path('service')}"  # absolute path: sqlite:////tmp/...

    def raw_insert(self, rows: Sequence[StoredEvent], max_seconds: float) -> RawResult:
        from service.store.sqlite_engine import GroupCommitter, SqliteFile

        db = SqliteFile(self._fresh_path("raw"))
        # The schema, connections and checkpointer exactly as the service's writer process
        # opens them, committing on this thread: no queue, no event loop, no socket, no service.
        db.migrate()
        committer = GroupCommitter(db)
        committer.open()
        try:
            # The store's own bulk path, as the writer process drives it: one group
            # commit (person keys, multi-row inserts, entries staged in recent) per
            # max_group_rows rows, each followed by a timeline merge step when one is due.
            size = db.tuning.max_group_rows
            groups = [list(rows[i:i + size]) for i in range(0, len(rows), size)]
            done = 0
            cpu0, started = time.process_time(), time.perf_counter()
            for group in groups:
                committer.commit(group)
                committer.merge_if_due()
                done += len(group)
                if time.perf_counter() - started >= max_seconds:
                    break
            return RawResult(done, time.perf_counter() - started, 1, client_cpu_s=time.process_time() - cpu0)
        finally:
            committer.close()

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


DEFAULT_CASSANDRA_URL = "cassandra://127.0.0.1:9042/?protocol_version=3"


class CassandraBench(BenchStore):
    """Fresh keyspaces on a running Cassandra; dropped at the end."""

    name = "cassandra"

    def __init__(self, base_url: str = DEFAULT_CASSANDRA_URL) -> None:
        self.base = urlsplit(base_url)
        self.run_id = secrets.token_hex(3)
        self._keyspaces: list[str] = []

    @staticmethod
    def unavailable_reason(base_url: str = DEFAULT_CASSANDRA_URL) -> str | None:
        """None when the store module, the driver and a CQL port are all there; else why not."""
        try:
            import service.store.cassandra  # noqa: F401  (imports cassandra-driver)
        except ImportError as exc:
            return f"service.store.cassandra cannot be imported ({exc})"
        parts = urlsplit(base_url)
        host = (parts.hostname or "127.0.0.1").split(",")[0]
        port = parts.port or 9042
        try:
            with socket.create_connection((host, port), timeout=2):
                pass
        except OSError as exc:
            return f"nothing answers on {host}:{port} ({exc}); start one with scripts/cassandra.sh up"
        return None

    def _url(self, keyspace: str) -> str:
        self._keyspaces.append(keyspace)
        return urlunsplit(self.base._replace(path=f"/{keyspace}"))

    def server_pids(self) -> list[int]:
        """The local Cassandra JVM (not the cluster's nodes), to report the store's own CPU use."""
        return [pid for pid in all_pids()
                if "CassandraDaemon" in (line := cmdline(pid)) and str(CLUSTER_DIR) not in line]

    def service_url(self) -> str:
        return self._url(f"bench_{self.run_id}_svc{len(self._keyspaces)}")

    def raw_insert(self, rows: Sequence[StoredEvent], max_seconds: float) -> RawResult:
        from cassandra.concurrent import execute_concurrent_with_args

        from service.store.cassandra import CassandraStore

        store = CassandraStore.from_url(self._url(f"bench_{self.run_id}_raw{len(self._keyspaces)}"))
        asyncio.run(store.open())  # the schema and prepared statements, exactly as the service makes them
        try:
            session = store._session
            # The store's own prepared inserts (consistency, idempotence, routing as the service has them):
            # every event is one row in events_by_person, one in events_by_name and one in
            # workspace_events; each (hour or day, event key, person) of a chunk one in workspace_persons.
            by_person, by_name = store._ps["insert_event"], store._ps["insert_event_by_name"]
            ws_event, ws_person = store._ps["insert_ws_event"], store._ps["insert_ws_person"]
            chunk_size = 2_000
            chunks = []
            written = 0
            for i in range(0, len(rows), chunk_size):
                chunk = rows[i:i + chunk_size]
                person_args, name_args, ws_event_args, ws_person_args = [], [], [], set()
                for e in chunk:
                    b = bucket_of(e.timestamp_us)
                    person_args.append((e.workspace_id, e.person_id, b, e.timestamp_us, e.event_id, e.event,
                                        e.external_id, e.parameters, e.created_at_us, 0))  # 0: no TTL
                    name_args.append((e.workspace_id, e.person_id, e.event, b, e.timestamp_us, e.event_id,
                                      e.external_id, e.parameters, e.created_at_us, 0))
                    hour = e.timestamp_us - e.timestamp_us % HOUR_US
                    ws_event_args.append((e.workspace_id, hour, e.event, e.timestamp_us, e.event_id))
                    for grain, bucket in ((HOUR_US, hour), (BUCKET_US, b * BUCKET_US)):
                        for key in ("", e.event):
                            ws_person_args.add((e.workspace_id, grain, bucket, key, e.person_id))
                chunks.append((person_args, name_args, ws_event_args, sorted(ws_person_args)))
            done = 0
            server = self.server_pids()
            cpu0, server0, started = time.process_time(), cpu_seconds(server), time.perf_counter()
            for person_args, name_args, ws_event_args, ws_person_args in chunks:
                written += len(person_args) + len(name_args) + len(ws_event_args) + len(ws_person_args)
                for statement, args in ((by_person, person_args), (by_name, name_args), (ws_event, ws_event_args),
                                        (ws_person, ws_person_args)):
                    for ok, result in execute_concurrent_with_args(session, statement, args, concurrency=100,
                                                                   raise_on_first_error=True):
                        if not ok:
                            raise RuntimeError(f"cassandra insert failed: {result}")
                done += len(person_args)
                if time.perf_counter() - started >= max_seconds:
                    break
            return RawResult(done, time.perf_counter() - started, round(written / max(done, 1), 2),
                             client_cpu_s=time.process_time() - cpu0, store_cpu_s=cpu_seconds(server) - server0)
        finally:
            asyncio.run(store.close())

    def cleanup(self) -> None:
        if not self._keyspaces:
            return
        from cassandra.cluster import Cluster

        from service.store.cassandra import parse_url

        settings = parse_url(urlunsplit(self.base._replace(path="/x")))
        kwargs = {"protocol_version": settings.protocol_version} if settings.protocol_version else {}
        cluster = Cluster(settings.hosts, port=settings.port, schema_metadata_enabled=False, **kwargs)
        try:
            session = cluster.connect()
            for keyspace in self._keyspaces:  # names this class generated: [a-z0-9_] only
                session.execute(f"DROP KEYSPACE IF EXISTS {keyspace}", timeout=120)
        except Exception as exc:  # leaving a keyspace behind is not a benchmark failure
            print(f"note: could not drop the bench keyspaces {self._keyspaces}: {exc}")
        finally:
            cluster.shutdown()


ROOT = Path(__file__).resolve().parent.parent
CLUSTER_SCRIPT = ROOT / "scripts" / "cassandra-cluster.sh"
CLUSTER_DIR = Path(os.environ.get("CASS_CLUSTER_DIR", ROOT / ".cassandra-cluster"))
CLUSTER_CASSANDRA_URL = ("cassandra://127.0.0.1,127.0.0.2,127.0.0.3:9142/?protocol_version=3&local_dc=datacenter1"
                         "&replication=datacenter1:3&consistency=LOCAL_QUORUM")


class CassandraClusterBench(CassandraBench):
    """Fresh keyspaces with replication factor 3 on the local three-node cluster
    (scripts/cassandra-cluster.sh), written and read at LOCAL_QUORUM; a node can be
    killed and started again."""

    name = "cassandra_cluster"

    def __init__(self, base_url: str = CLUSTER_CASSANDRA_URL) -> None:
        super().__init__(base_url)

    @staticmethod
    def unavailable_reason(base_url: str = CLUSTER_CASSANDRA_URL) -> str | None:
        reason = CassandraBench.unavailable_reason(base_url)
        return reason and reason.replace("scripts/cassandra.sh up", "scripts/cassandra-cluster.sh up")

    def server_pids(self) -> list[int]:
        """The cluster's three JVMs."""
        return [pid for pid in all_pids()
                if "CassandraDaemon" in (line := cmdline(pid)) and str(CLUSTER_DIR) in line]

    def node(self, action: str, n: int) -> None:
        """``kill`` (SIGKILL) or ``start`` node n of the cluster."""
        done = subprocess.run([str(CLUSTER_SCRIPT), action, str(n)], capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"cassandra-cluster.sh {action} {n} failed: {done.stdout}{done.stderr}")
