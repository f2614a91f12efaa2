"""Lose a machine, lose nothing: faults on the local three-node Cassandra cluster
(replication factor 3, LOCAL_QUORUM) under sustained ingest.

Two ``serve`` instances run over one keyspace; clients are spread over both and
send batches whose events carry a ``message_id``, retrying a failed request as
it was (same message_ids) until it is acknowledged, on the other instance when
theirs does not answer. After each fault every acknowledged event must be
stored exactly once, and every total must be exact. The numbers of each fault
(acknowledged, stored, lost, duplicated, failed attempts, time to recover) are
printed as one ``FAULT`` line (``pytest -s``).

These tests only touch the cluster of scripts/cassandra-cluster.sh, never the
single node the other tests share.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from cluster_support import CassandraCluster, wait_for
from service_support import RunningService, start_service, stop_service

from flameup.events.v1 import events_pb2 as pb
from flameup.events.v1 import events_pb2_grpc
from service.store.cassandra import CassandraStore

pytestmark = [pytest.mark.slow]

CALL_DEADLINE = 10.0  # the gRPC deadline of every call the clients make
RETRY_FOR = 60.0  # a client gives a request up (and the test fails) after retrying this long
RETRY_PAUSE = 0.2
PEOPLE = 6
BATCH = 10  # events per TrackBatch: the cluster writes 550-1,700 rows/s on two shared cores
CLIENTS_PER_INSTANCE = 2
EVENT_NAMES = ("view", "click", "buy")
SPREAD = timedelta(days=3)  # event times: the last three days, so totals sum several day buckets
RETRIED = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
# The share of acknowledged batches a client sends again, as one whose answer was
# lost would: every event must come back a duplicate with its first ids.
REPLAY = 0.2


@pytest.fixture(scope="module")
def instances(cluster_url: str) -> Iterator[list[RunningService]]:
    """Two serve instances over the cluster's keyspace, sharing one bootstrap key
    (a second key would revoke the first): the first prepares the keyspace."""
    first = start_service(cluster_url)
    try:
        second = start_service(cluster_url, extra_env={"FLAMEUP_BOOTSTRAP_KEY": first.key})
    except BaseException:
        stop_service(first)
        raise
    second.key = first.key
    yield [first, second]
    for svc in (first, second):
        if svc.proc.poll() is None:
            stop_service(svc)


@pytest.fixture
def whole_cluster(cassandra_cluster: CassandraCluster) -> Iterator[CassandraCluster]:
    """The cluster, every node running again after the test whatever happened."""
    yield cassandra_cluster
    cassandra_cluster.ensure_up()


@dataclass
class Sent:
    external_id: str
    event: str
    timestamp_us: int


@dataclass
class Ledger:
    """What the clients sent and what the service acknowledged."""

    run: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    sent: dict[str, Sent] = field(default_factory=dict)  # message_id -> the event
    acked: dict[str, str] = field(default_factory=dict)  # message_id -> event_id
    requests: int = 0  # acknowledged requests
    retried_requests: int = 0  # of which needed more than one attempt
    failed_attempts: Counter[str] = field(default_factory=Counter)  # status code -> attempts that failed
    duplicates_answered: int = 0  # events a retry found stored by its lost first attempt
    replays: int = 0  # acknowledged batches sent again on purpose (REPLAY)
    longest_retry_s: float = 0.0
    last_failure: float = 0.0  # time.monotonic() of the last failed attempt

    def person(self, i: int) -> str:
        return f"cl_{self.run}_{i}"

    def acked_of(self, external_id: str) -> set[str]:
        return {self.acked[m] for m, s in self.sent.items() if s.external_id == external_id and m in self.acked}

    def sent_of(self, external_id: str) -> int:
        return sum(1 for s in self.sent.values() if s.external_id == external_id)


def _rfc3339(us: int) -> str:
    return datetime.fromtimestamp(us / 1e6, UTC).isoformat().replace("+00:00", "Z")


def _batch(ledger: Ledger, rng: random.Random) -> pb.TrackBatchRequest:
    now = int(time.time() * 1e6)
    events = []
    for _ in range(BATCH):
        message_id = str(uuid.uuid4())
        sent = Sent(ledger.person(rng.randrange(PEOPLE)), rng.choice(EVENT_NAMES),
                    now - rng.randrange(int(SPREAD.total_seconds() * 1e6)))
        ledger.sent[message_id] = sent
        events.append(pb.TrackRequest(external_id=sent.external_id, event=sent.event, message_id=message_id,
                                      timestamp=_rfc3339(sent.timestamp_us)))
    return pb.TrackBatchRequest(events=events)


async def _call_with_retries(stubs: list, method: str, request, metadata, ledger: Ledger | None = None):
    """One request until it succeeds: a failed attempt is retried as it was, on the
    next instance (a client library's retry policy with a list of endpoints)."""
    first_failure = None
    attempt = 0
    while True:
        stub = stubs[attempt % len(stubs)]
        attempt += 1
        try:
            reply = await getattr(stub, method)(request, metadata=metadata, timeout=CALL_DEADLINE)
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in RETRIED:
                raise
            now = time.monotonic()
            first_failure = first_failure or now
            if ledger is not None:
                ledger.failed_attempts[exc.code().name] += 1
                ledger.last_failure = now
            if now - first_failure > RETRY_FOR:
                raise
            await asyncio.sleep(RETRY_PAUSE)
            continue
        if ledger is not None and first_failure is not None:
            ledger.retried_requests += 1
            ledger.longest_retry_s = max(ledger.longest_retry_s, time.monotonic() - first_failure)
        return reply


async def _ingest(services: list[RunningService], ledger: Ledger, stop: asyncio.Event, seed: int) -> None:
    """A client of services[0] (failing over to the others) sending batches until stopped."""
    rng = random.Random(seed)
    channels = [grpc.aio.insecure_channel(s.grpc_target) for s in services]
    stubs = [events_pb2_grpc.EventsServiceStub(c) for c in channels]
    metadata = services[0].metadata()
    try:
        while not stop.is_set():
            request = _batch(ledger, rng)
            reply = await _call_with_retries(stubs, "TrackBatch", request, metadata, ledger)
            assert reply.success and not reply.errors, reply
            ledger.requests += 1
            ledger.duplicates_answered += len(reply.duplicates)
            for event, event_id in zip(request.events, reply.event_ids, strict=True):
                previous = ledger.acked.setdefault(event.message_id, event_id)
                assert previous == event_id, f"message {event.message_id} acknowledged as two events"
            if rng.random() < REPLAY:
                again = await _call_with_retries(stubs[::-1], "TrackBatch", request, metadata, ledger)
                ledger.replays += 1
                assert list(again.duplicates) == list(range(len(request.events))), again
                assert list(again.event_ids) == list(reply.event_ids), "a replayed batch got other ids"
    finally:
        for c in channels:
            await c.close()


@dataclass
class Reads:
    """The reads made during the fault: per kind, how many answered, failed and were retried."""

    ok: Counter[str] = field(default_factory=Counter)
    slowest_s: float = 0.0  # the longest single attempt, answered or failed
    failed: Counter[str] = field(default_factory=Counter)  # "kind code"
    lower_bound_violations: list[str] = field(default_factory=list)


async def _read(services: list[RunningService], ledger: Ledger, stop: asyncio.Event, reads: Reads) -> None:
    """Reads while the fault happens: the newest page, an event filter, a time
    window, and every page of a person (a full-partition read). Every acknowledged
    event of the person must be counted by the plain total."""
    channels = [grpc.aio.insecure_channel(s.grpc_target) for s in services]
    stubs = [events_pb2_grpc.EventsServiceStub(c) for c in channels]
    metadata = services[0].metadata()
    now = datetime.now(UTC)
    window = {"since": now - timedelta(hours=36), "until": now - timedelta(hours=12)}
    try:
        i = 0
        while not stop.is_set():
            person = ledger.person(i % PEOPLE)
            i += 1
            acked_before = len(ledger.acked_of(person))
            kinds = {
                "newest": pb.ListPersonEventsRequest(person_id=person, id_type="external_id", limit=50),
                "event": pb.ListPersonEventsRequest(person_id=person, id_type="external_id", limit=20,
                                                    event=EVENT_NAMES[i % len(EVENT_NAMES)]),
                "window": _window_request(person, **window),
            }
            for kind, request in kinds.items():
                reply = await _counted_read(stubs, request, metadata, reads, kind)
                if kind == "newest" and reply.total < acked_before:
                    reads.lower_bound_violations.append(f"{person}: total {reply.total} < {acked_before} acked")
            await _all_pages(stubs, person, metadata, reads)
    finally:
        for c in channels:
            await c.close()


def _window_request(person: str, since: datetime, until: datetime) -> pb.ListPersonEventsRequest:
    request = pb.ListPersonEventsRequest(person_id=person, id_type="external_id", limit=10)
    request.since.FromDatetime(since)
    request.until.FromDatetime(until)
    return request


async def _counted_read(stubs: list, request, metadata, reads: Reads, kind: str):
    attempt = 0
    while True:
        started = time.monotonic()
        try:
            reply = await stubs[attempt % len(stubs)].ListPersonEvents(request, metadata=metadata,
                                                                       timeout=CALL_DEADLINE)
        except grpc.aio.AioRpcError as exc:
            reads.slowest_s = max(reads.slowest_s, time.monotonic() - started)
            reads.failed[f"{kind} {exc.code().name}"] += 1
            if exc.code() not in RETRIED or attempt > RETRY_FOR / RETRY_PAUSE:
                raise
            attempt += 1
            await asyncio.sleep(RETRY_PAUSE)
            continue
        reads.slowest_s = max(reads.slowest_s, time.monotonic() - started)
        reads.ok[kind] += 1
        return reply


async def _all_pages(stubs: list, person: str, metadata, reads: Reads | None) -> tuple[list, int]:
    """Every event of the person, 500 at a time, and the total of the last page."""
    events: list = []
    while True:
        request = pb.ListPersonEventsRequest(person_id=person, id_type="external_id", limit=500,
                                             offset=len(events))
        if reads is None:
            reply = await _call_with_retries(stubs, "ListPersonEvents", request, metadata)
        else:
            reply = await _counted_read(stubs, request, metadata, reads, "all_pages")
        events.extend(reply.events)
        if len(reply.events) < 500:
            return events, reply.total


async def _verify(services: list[RunningService], ledger: Ledger) -> dict[str, int]:
    """Every acknowledged event stored once, nothing else stored, every total exact."""
    channel = grpc.aio.insecure_channel(services[0].grpc_target)
    stubs = [events_pb2_grpc.EventsServiceStub(channel)]
    metadata = services[0].metadata()
    stored = lost = duplicated = 0
    try:
        for i in range(PEOPLE):
            person = ledger.person(i)
            expected = ledger.acked_of(person)
            events, total = await _all_pages(stubs, person, metadata, None)
            ids = [e.id for e in events]
            stored += len(ids)
            lost += len(expected - set(ids))
            duplicated += len(ids) - len(set(ids)) + len(set(ids) - expected)
            assert total == len(ids), f"{person}: total {total}, {len(ids)} events listed"
            for name in EVENT_NAMES:
                request = pb.ListPersonEventsRequest(person_id=person, id_type="external_id", limit=1, event=name)
                reply = await _call_with_retries(stubs, "ListPersonEvents", request, metadata)
                want = sum(1 for m, s in ledger.sent.items()
                           if s.external_id == person and s.event == name and m in ledger.acked)
                assert reply.total == want, f"{person}, event {name}: total {reply.total}, {want} acknowledged"
            now = datetime.now(UTC)
            since, until = now - timedelta(hours=36), now - timedelta(hours=12)
            reply = await _call_with_retries(stubs, "ListPersonEvents", _window_request(person, since, until), metadata)
            lo, hi = int(since.timestamp() * 1e6), int(until.timestamp() * 1e6)
            want = sum(1 for m, s in ledger.sent.items()
                       if s.external_id == person and lo <= s.timestamp_us < hi and m in ledger.acked)
            assert reply.total == want, f"{person}, window: total {reply.total}, {want} acknowledged"
    finally:
        await channel.close()
    return {"stored": stored, "lost": lost, "duplicated": duplicated}


def _pending_hints(store: CassandraStore, host: str, written_before: float | None = None) -> int:
    """Hints a node holds for others (system.hints is node-local: ask that node),
    only those written before ``written_before`` (Unix seconds) when given."""
    from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile
    from cassandra.policies import WhiteListRoundRobinPolicy

    profile = ExecutionProfile(load_balancing_policy=WhiteListRoundRobinPolicy([host]), request_timeout=10)
    cluster = Cluster([host], port=store.settings.port, protocol_version=3, schema_metadata_enabled=False,
                      token_metadata_enabled=False, execution_profiles={EXEC_PROFILE_DEFAULT: profile})
    try:
        rows = cluster.connect().execute("SELECT hint_id FROM system.hints")
        # hint_id is a time-based UUID: when the coordinator wrote the hint.
        return sum(1 for r in rows if written_before is None or _uuid_time(r.hint_id) < written_before)
    finally:
        cluster.shutdown()


def _uuid_time(u: uuid.UUID) -> float:
    return (u.time - 0x01B21DD213814000) / 1e7


def _fault_line(name: str, ledger: Ledger, verified: dict[str, int], **times: float) -> str:
    failed = sum(ledger.failed_attempts.values())
    parts = [f"acknowledged={len(ledger.acked)}", f"stored={verified['stored']}", f"lost={verified['lost']}",
             f"duplicated={verified['duplicated']}", f"requests={ledger.requests}",
             f"failed_attempts={failed} {dict(ledger.failed_attempts)}", f"retried_requests={ledger.retried_requests}",
             f"duplicates_answered={ledger.duplicates_answered}", f"replays={ledger.replays}",
             f"longest_retry_s={ledger.longest_retry_s:.1f}", *(f"{k}={v:.1f}" for k, v in times.items())]
    return f"FAULT {name}: " + " ".join(parts)


async def test_the_store_routes_each_request_to_the_replicas_of_its_partition(cluster_url: str) -> None:
    """Token-aware routing on the cluster: the driver knows the ring, the keyspace's
    replication and each statement's partition key, so a request goes to a replica."""
    from cassandra.policies import TokenAwarePolicy

    store = CassandraStore.from_url(cluster_url)
    await store.open()
    try:
        cluster = store._cluster
        assert sorted(h.address for h in cluster.metadata.all_hosts()) == ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
        assert isinstance(cluster.profile_manager.default.load_balancing_policy, TokenAwarePolicy)
        strategy = cluster.metadata.keyspaces[store.keyspace].replication_strategy
        assert strategy.dc_replication_factors == {"datacenter1": 3}
        insert = store._ps["insert_event"]
        assert insert.routing_key_indexes == [0, 1, 2]  # (workspace_id, person_id, bucket)
        bound = insert.bind(("ws", "person", 20_000, 0, "evt", "e", "x", "{}", 0))
        replicas = cluster.metadata.get_replicas(store.keyspace, bound.routing_key)
        assert len(replicas) == 3  # the token map is loaded: without it TokenAwarePolicy falls back to round robin
    finally:
        await store.close()


VICTIM = 2  # the node killed: 127.0.0.2 (not the seed, though a seed would do as well)
WARMUP_S = 3.0
DOWN_S = 15.0  # long enough for gossip to convict the node (about 12 s at phi 5): hints are written
AFTER_S = 3.0


async def test_sigkill_of_a_cassandra_node_under_ingest_loses_nothing_and_stores_nothing_twice(
        whole_cluster: CassandraCluster, instances: list[RunningService], cluster_url: str) -> None:
    cluster = whole_cluster
    ledger, reads = Ledger(), Reads()
    stop = asyncio.Event()
    # The store as the service opens it, to watch its driver find the node again.
    store = CassandraStore.from_url(cluster_url)
    await store.open()
    orders = [instances, instances[::-1]]
    tasks = [asyncio.create_task(_ingest(orders[i % 2], ledger, stop, seed=i))
             for i in range(CLIENTS_PER_INSTANCE * len(instances))]
    readers = [asyncio.create_task(_read(orders[i], ledger, stop, reads)) for i in range(2)]
    try:
        await asyncio.sleep(WARMUP_S)
        assert ledger.acked, "nothing was acknowledged before the fault"
        acked_at_kill = len(ledger.acked)
        killed = time.monotonic()
        await asyncio.to_thread(cluster.kill, VICTIM)
        await asyncio.sleep(DOWN_S)
        acked_while_down = len(ledger.acked) - acked_at_kill
        hints_at_restart = sum(_pending_hints(store, h) for h in cluster.hosts if h != f"127.0.0.{VICTIM}")
        restarting, restarting_wall = time.monotonic(), time.time()
        await asyncio.to_thread(cluster.start, VICTIM)
        restarted = time.monotonic()
        victim = next(h for h in store._cluster.metadata.all_hosts() if h.address == f"127.0.0.{VICTIM}")
        reconnect_s = await asyncio.to_thread(wait_for, lambda: victim.is_up, 30)
        await asyncio.sleep(AFTER_S)
    finally:
        stop.set()
        results = await asyncio.gather(*tasks, *readers, return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors
    assert acked_while_down > 0, "nothing was acknowledged while the node was down"

    # The survivors replay the hints they kept for the node once gossip sees it up
    # again: then it holds every write it missed while it was down. A write that
    # timed out on it while it was starting leaves a hint too, replayed by the
    # survivors' next ten-minute round (or repair): counted, not waited for.
    def hints_replayed() -> bool:
        """every hint written while the node was down replayed"""
        return all(_pending_hints(store, h, restarting_wall) == 0 for h in cluster.hosts)

    catch_up_s = await asyncio.to_thread(wait_for, hints_replayed, 120, 1.0)
    later_hints = sum(_pending_hints(store, h) for h in cluster.hosts)
    verified = await _verify(instances, ledger)
    await store.close()
    print("\n" + _fault_line(f"cassandra node {VICTIM} SIGKILL", ledger, verified,
                             down_s=restarting - killed, node_start_s=restarted - restarting,
                             driver_reconnect_s=reconnect_s,
                             hints_replayed_s=catch_up_s,
                             clients_recovered_s=max(0.0, ledger.last_failure - killed)),
          f"hints_at_restart={hints_at_restart} hints_written_after_restart={later_hints}",
          f"reads_ok={dict(reads.ok)} reads_failed={dict(reads.failed)} slowest_read_s={reads.slowest_s:.1f}")
    assert verified["lost"] == 0
    assert verified["duplicated"] == 0
    assert verified["stored"] == len(ledger.acked)
    assert not reads.lower_bound_violations, reads.lower_bound_violations
    failed_reads = {k: v for k, v in reads.failed.items() if not k.endswith("UNAVAILABLE")}
    assert not failed_reads, f"reads that did not fail fast as UNAVAILABLE: {failed_reads}"
