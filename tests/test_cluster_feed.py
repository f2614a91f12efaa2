"""The feed on the clusters: two ``serve`` instances over the three-node Cassandra
cluster publish to a stream with three replicas on the three-node NATS cluster.
One publisher holds the lease at a time; the stream loses nothing when the
stream's NATS leader dies, nor when the instance that publishes dies.

Clients are spread over both instances and retry by ``message_id``
(tests/cluster_load.py); after each fault every acknowledged event is stored
once and on the stream. Each fault prints a ``FAULT`` line (``pytest -s``).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("service.feed", reason="the feed (service/feed) is not in this tree")

import nats  # noqa: E402
from cluster_load import Clients, Ledger, fault_line, new_ledger, start_pair, stop_pair, verify  # noqa: E402
from cluster_support import NatsCluster, wait_for  # noqa: E402
from feed_support import stream_ids  # noqa: E402
from service_support import RunningService  # noqa: E402

pytestmark = [pytest.mark.slow]

WARMUP_S = 3.0
AFTER_S = 4.0
PUBLISHER_MOVES_WITHIN = 10.0  # the promise; the lease's TTL and renewal make it about 7.5 s
STREAM_WAIT = 150.0


@pytest.fixture
def feed_pair(cluster_url: str, nats_cluster: NatsCluster) -> Iterator[tuple[list[RunningService], str]]:
    """Two instances publishing to a stream of their own (its own lease and checkpoint
    in the shared keyspace), three replicas."""
    stream = f"CLUSTER_{uuid.uuid4().hex[:8].upper()}"
    asyncio.run(_drop_streams(nats_cluster.urls))  # every stream takes all of the feed's subjects: one at a time
    args = ("--nats-url", ",".join(nats_cluster.urls), "--feed-replicas", "3", "--feed-stream", stream)
    pair = start_pair(cluster_url, extra_args=args)
    yield pair, stream
    stop_pair(pair)
    asyncio.run(_drop_streams(nats_cluster.urls))


@pytest.fixture
def whole_nats(nats_cluster: NatsCluster) -> Iterator[NatsCluster]:
    """The NATS cluster, every server running again after the test whatever happened."""
    yield nats_cluster
    done = nats_cluster.script("up")
    assert done.returncode == 0, done.stdout + done.stderr


async def _drop_streams(nats_urls: list[str]) -> None:
    """Delete the streams of earlier runs on the NATS cluster (the tests' own)."""
    nc = await nats.connect(servers=nats_urls, connect_timeout=2)
    try:
        js = nc.jetstream()
        for info in await js.streams_info():
            if info.config.name.startswith("CLUSTER_"):
                await js.delete_stream(info.config.name)
    finally:
        await nc.close()


def _tree(pid: int) -> set[int]:
    """pid and every process under it."""
    parents: dict[int, int] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                parents[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    tree, grew = {pid}, True
    while grew:
        new = {p for p, parent in parents.items() if parent in tree} - tree
        tree |= new
        grew = bool(new)
    return tree


def _kill_machine(svc: RunningService) -> None:
    """SIGKILL the instance's every process at once, as when its host dies."""
    for pid in _tree(svc.proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    svc.proc.wait(30)


def _lease_owner(store_url: str, stream: str) -> int | None:
    """The pid of the publisher holding the stream's lease (owner is host-pid-token)."""
    from cassandra.cluster import Cluster

    from service.store.cassandra import parse_url

    settings = parse_url(store_url)
    cluster = Cluster(settings.hosts, port=settings.port, protocol_version=3, schema_metadata_enabled=False)
    try:
        rows = list(cluster.connect(settings.keyspace).execute(
            "SELECT owner FROM feed_lease WHERE name = %s", (stream,)))
    finally:
        cluster.shutdown()
    return int(rows[0].owner.rsplit("-", 2)[1]) if rows and rows[0].owner else None


def _stream_check(nats_url: str, stream: str, ledgers: list[Ledger]) -> list[dict[str, int]]:
    """Per ledger: its acknowledged events found on the stream, missing from it, and
    events on the stream more than once (waits for every acknowledged event, up to
    STREAM_WAIT: the Cassandra publisher passes over late rows once more after a minute)."""
    acked = [set(ledger.acked.values()) for ledger in ledgers]
    ids = stream_ids(nats_url, stream, expect=set().union(*acked), timeout=STREAM_WAIT)
    on, twice = set(ids), len(ids) - len(set(ids))
    return [{"on_stream": len(a & on), "missing_from_stream": len(a - on), "twice_on_stream": twice} for a in acked]


async def _stream_state(nats_urls: list[str], stream: str) -> tuple[str | None, int]:
    """The stream's leader (server name) and last sequence, asked of any live server."""
    nc = await nats.connect(servers=nats_urls, connect_timeout=2, max_reconnect_attempts=1)
    try:
        info = await nc.jetstream().stream_info(stream)
        return info.cluster.leader if info.cluster else None, info.state.last_seq
    finally:
        await nc.close()


async def test_the_feed_loses_nothing_when_the_streams_nats_leader_and_then_the_publishing_instance_die(
        feed_pair: tuple[list[RunningService], str], cluster_url: str, whole_nats: NatsCluster) -> None:
    """Two faults in a row under ingest, checked together at the end (the stream check
    waits for the publisher's second pass once, not once per fault)."""
    nats_cluster = whole_nats
    pair, stream = feed_pair

    # 1. SIGKILL of the nats-server leading the stream: the feed pauses for the election.
    nats_ledger = new_ledger(pair[0])
    async with Clients(pair, [nats_ledger]):
        await asyncio.sleep(WARMUP_S)
        leader, at_kill = await _stream_state(nats_cluster.urls, stream)
        assert leader and at_kill > 0, "nothing was published before the fault"
        n = int(leader.removeprefix("n"))
        killed = time.monotonic()
        await asyncio.to_thread(nats_cluster.kill, n)
        others = [u for i, u in enumerate(nats_cluster.urls, 1) if i != n]
        while True:  # the feed resumes: a new leader takes publishes again
            try:
                new_leader, last_seq = await _stream_state(others, stream)
            except Exception:  # noqa: BLE001 - no leader yet
                new_leader, last_seq = None, at_kill
            if new_leader and new_leader != leader and last_seq > at_kill:
                break
            assert time.monotonic() - killed < 60, "the feed did not resume within 60 s"
            await asyncio.sleep(0.2)
        resumed_s = time.monotonic() - killed
        await asyncio.sleep(AFTER_S)
    assert sum(nats_ledger.failed_attempts.values()) == 0, "ingest must not notice NATS"

    # 2. SIGKILL of every process of the instance whose publisher holds the lease.
    ledgers = [new_ledger(pair[0]), new_ledger(pair[0])]  # the clients of pair[0], of pair[1]
    async with Clients(pair, ledgers):
        await asyncio.sleep(WARMUP_S)
        await asyncio.to_thread(wait_for, lambda: _lease_owner(cluster_url, stream), 30)
        owner = await asyncio.to_thread(_lease_owner, cluster_url, stream)
        victim = next(i for i, svc in enumerate(pair) if owner in _tree(svc.proc.pid))
        survivor = pair[1 - victim]
        await asyncio.to_thread(_kill_machine, pair[victim])

        def moved() -> bool:
            """the survivor's publisher holds the lease"""
            return (_lease_owner(cluster_url, stream) or -1) in _tree(survivor.proc.pid)

        moved_s = await asyncio.to_thread(wait_for, moved, 60, 0.2)
        await asyncio.sleep(AFTER_S)

    everyone = [nats_ledger, ledgers[victim], ledgers[1 - victim]]
    stored = [await verify([survivor], ledger) for ledger in everyone]
    on_stream = await asyncio.to_thread(_stream_check, others[0], stream, everyone)
    lines = [(f"NATS stream leader {leader} SIGKILL", {"feed_resumed_s": resumed_s}),
             ("serve instance SIGKILL, the killed instance's clients", {"publisher_moved_s": moved_s}),
             ("serve instance SIGKILL, the other instance's clients", {"publisher_moved_s": moved_s})]
    for (name, times), ledger, check, stream_check in zip(lines, everyone, stored, on_stream, strict=True):
        print("\n" + fault_line(name, ledger, check, **times), stream_check)
    assert all(s["lost"] == 0 and s["duplicated"] == 0 for s in stored), stored
    assert sum(ledgers[1 - victim].failed_attempts.values()) == 0, "the other instance's clients saw the fault"
    assert moved_s <= PUBLISHER_MOVES_WITHIN, f"the publisher moved after {moved_s:.1f}s"
    assert all(c["missing_from_stream"] == 0 and c["twice_on_stream"] == 0 for c in on_stream), on_stream
