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
import signal
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from cluster_load import (
    CALL_DEADLINE,
    EVENT_NAMES,
    PEOPLE,
    RETRIED,
    RETRY_FOR,
    RETRY_PAUSE,
    Clients,
    Ledger,
    all_pages,
    fault_line,
    new_ledger,
    start_pair,
    stop_pair,
    verify,
    window_request,
)
from cluster_support import CassandraCluster, wait_for
from service_support import RunningService

from flameup.events.v1 import events_pb2 as pb
from flameup.events.v1 import events_pb2_grpc
from service.store.cassandra import CassandraStore

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def instances(cluster_url: str) -> Iterator[list[RunningService]]:
    pair = start_pair(cluster_url)
    yield pair
    stop_pair(pair)


@pytest.fixture
def whole_cluster(cassandra_cluster: CassandraCluster) -> Iterator[CassandraCluster]:
    """The cluster, every node running again after the test whatever happened."""
    yield cassandra_cluster
    for n in range(1, len(cassandra_cluster.hosts) + 1):
        try:
            cassandra_cluster.signal(n, signal.SIGCONT)  # a node a failed test left stopped
        except AssertionError:
            pass  # not running: ensure_up starts it
    cassandra_cluster.ensure_up()


@dataclass
class Reads:
    """The reads made during the fault: per kind, how many answered, failed and were retried."""

    ok: Counter[str] = field(default_factory=Counter)
    slowest_s: float = 0.0  # the longest single attempt, answered or failed
    failed: Counter[str] = field(default_factory=Counter)  # "kind code"
    lower_bound_violations: list[str] = field(default_factory=list)


async def _read(services: list[RunningService], ledger: Ledger, stop: asyncio.Event, reads: Reads) -> None:
    """Reads while the fault happens: the newest page, an event filter, a time window,
    the person's summary, the workspace's daily counts, and every page of a person (a
    full-partition read). Every acknowledged event of the person must be counted by
    the plain total and the summary."""
    channels = [grpc.aio.insecure_channel(s.grpc_target) for s in services]
    stubs = [events_pb2_grpc.EventsServiceStub(c) for c in channels]
    metadata = ledger.metadata
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
                "window": window_request(person, **window),
                "summary": pb.GetPersonSummaryRequest(person_id=person, id_type="external_id"),
                "counts": pb.GetEventCountsRequest(interval="day"),
            }
            for kind, request in kinds.items():
                reply = await _counted_read(stubs, request, metadata, reads, kind)
                if kind in ("newest", "summary") and reply.total < acked_before:
                    reads.lower_bound_violations.append(f"{person} {kind}: total {reply.total} < {acked_before} acked")
            await all_pages(stubs, person, metadata,
                            lambda request: _counted_read(stubs, request, metadata, reads, "all_pages"))
    finally:
        for c in channels:
            await c.close()


READS = {pb.ListPersonEventsRequest: "ListPersonEvents", pb.GetPersonSummaryRequest: "GetPersonSummary",
         pb.GetEventCountsRequest: "GetEventCounts"}


async def _counted_read(stubs: list, request, metadata, reads: Reads, kind: str):
    attempt = 0
    while True:
        started = time.monotonic()
        try:
            method = getattr(stubs[attempt % len(stubs)], READS[type(request)])
            reply = await method(request, metadata=metadata, timeout=CALL_DEADLINE)
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
# Cassandra 2.1 retries an undelivered hint in its next round, ten minutes later.
HINT_ROUND_S = 11 * 60
AFTER_S = 3.0


@pytest.mark.parametrize("fault", ["sigkill", "sigstop"])
async def test_a_lost_cassandra_node_under_ingest_loses_nothing_and_stores_nothing_twice(
        whole_cluster: CassandraCluster, instances: list[RunningService], cluster_url: str, fault: str) -> None:
    """sigkill: the node's machine dies (its connections close at once); sigstop: the node is
    cut off (its connections stay open and nothing answers, as behind a partition), then
    comes back."""
    cluster = whole_cluster
    ledger, reads = new_ledger(instances[0]), Reads()
    # The store as the service opens it, to watch its driver find the node again.
    store = CassandraStore.from_url(cluster_url)
    await store.open()
    readers = [lambda stop, order=order: _read(order, ledger, stop, reads) for order in (instances, instances[::-1])]
    async with Clients(instances, [ledger], extra=readers):
        await asyncio.sleep(WARMUP_S)
        assert ledger.acked, "nothing was acknowledged before the fault"
        acked_at_kill = len(ledger.acked)
        killed = time.monotonic()
        if fault == "sigkill":
            await asyncio.to_thread(cluster.kill, VICTIM)
        else:
            cluster.signal(VICTIM, signal.SIGSTOP)
        await asyncio.sleep(DOWN_S)
        acked_while_down = len(ledger.acked) - acked_at_kill
        hints_at_restart = sum(_pending_hints(store, h) for h in cluster.hosts if h != f"127.0.0.{VICTIM}")
        restarting, restarting_wall = time.monotonic(), time.time()
        if fault == "sigkill":
            await asyncio.to_thread(cluster.start, VICTIM)
        else:
            cluster.signal(VICTIM, signal.SIGCONT)
        restarted = time.monotonic()
        victim = next(h for h in store._cluster.metadata.all_hosts() if h.address == f"127.0.0.{VICTIM}")
        reconnect_s = await asyncio.to_thread(wait_for, lambda: victim.is_up, 30)
        await asyncio.sleep(AFTER_S)
    assert acked_while_down > 0, "nothing was acknowledged while the node was down"

    # The survivors replay the hints they kept for the node once gossip sees it up
    # again: then it holds every write it missed while it was down. A write that
    # timed out on it while it was starting leaves a hint too, replayed by the
    # survivors' next ten-minute round (or repair): counted, not waited for.
    def hints_replayed() -> bool:
        """every hint written while the node was down replayed"""
        return all(_pending_hints(store, h, restarting_wall) == 0 for h in cluster.hosts)

    # Each survivor starts its delivery after a random pause of up to a minute; a delivery
    # that fails (the node still warming up) is tried again in the next ten-minute round,
    # so the wait covers one round.
    catch_up_s = await asyncio.to_thread(wait_for, hints_replayed, HINT_ROUND_S, 1.0)
    later_hints = sum(_pending_hints(store, h) for h in cluster.hosts)
    verified = await verify(instances, ledger)
    await store.close()
    print("\n" + fault_line(f"cassandra node {VICTIM} {fault.upper()}", ledger, verified,
                             down_s=restarting - killed, node_start_s=restarted - restarting,
                             driver_reconnect_s=reconnect_s,
                             hints_replayed_s=catch_up_s,
                             clients_recovered_s=max(0.0, ledger.last_failure - killed)),
          f"hints_at_restart={hints_at_restart} hints_written_after_restart={later_hints}",
          f"reads_ok={dict(reads.ok)} reads_failed={dict(reads.failed)} slowest_read_s={reads.slowest_s:.1f}")
    if fault == "sigstop":
        # A node that hangs costs writes nothing either: what it coordinates is sent to
        # the next host after the store's SPECULATE_AFTER, claims included.
        assert not ledger.failed_attempts, f"writes failed while a node hung: {dict(ledger.failed_attempts)}"
    assert verified["lost"] == 0
    assert verified["duplicated"] == 0
    assert verified["stored"] == len(ledger.acked)
    assert not reads.lower_bound_violations, reads.lower_bound_violations
    failed_reads = {k: v for k, v in reads.failed.items() if not k.endswith("UNAVAILABLE")}
    assert not failed_reads, f"reads that did not fail fast as UNAVAILABLE: {failed_reads}"
