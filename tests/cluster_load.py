"""Sustained ingest for the cluster tests: clients that retry by message_id, and the checks
that follow a fault (every acknowledged event stored once, every total exact).

A client sends TrackBatch requests of BATCH events, each with a fresh message_id,
to its instance; a failed attempt (UNAVAILABLE, DEADLINE_EXCEEDED) is retried
unchanged on the next instance until it succeeds or RETRY_FOR passes. A share
(REPLAY) of the acknowledged batches is sent again, as after a lost answer: the
service must answer every event as a duplicate with its first ids.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import grpc
from service_support import RunningService, start_service, stop_service

from flameup.events.v1 import events_pb2 as pb
from flameup.events.v1 import events_pb2_grpc

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


def start_pair(store_url: str, extra_args: tuple[str, ...] = (), extra_env: dict[str, str] | None = None
               ) -> list[RunningService]:
    """Two serve instances over one store, sharing one bootstrap key (a second key
    would revoke the first); the first, started alone, prepares the keyspace."""
    first = start_service(store_url, extra_args=extra_args, extra_env=extra_env)
    try:
        second = start_service(store_url, extra_args=extra_args,
                               extra_env={**(extra_env or {}), "FLAMEUP_BOOTSTRAP_KEY": first.key})
    except BaseException:
        stop_service(first)
        raise
    second.key = first.key
    return [first, second]


def stop_pair(pair: list[RunningService]) -> None:
    for svc in pair:
        if svc.proc.poll() is None:
            stop_service(svc)


@dataclass
class Sent:
    external_id: str
    event: str
    timestamp_us: int


@dataclass
class Ledger:
    """What the clients sent and what the service acknowledged, in a workspace of its
    own (so the workspace's event counts are the ledger's)."""

    key: str  # an API key of the ledger's workspace (new_ledger makes both)
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

    def acked_sent(self) -> list[Sent]:
        return [s for m, s in self.sent.items() if m in self.acked]

    @property
    def metadata(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.key}")]


def new_ledger(svc: RunningService) -> Ledger:
    """A ledger with a workspace of its own and a key for it."""
    run = uuid.uuid4().hex[:8]
    return Ledger(key=svc.create_key(f"ws_cl_{run}"), run=run)



def rfc3339(us: int) -> str:
    return datetime.fromtimestamp(us / 1e6, UTC).isoformat().replace("+00:00", "Z")


def batch(ledger: Ledger, rng: random.Random) -> pb.TrackBatchRequest:
    now = int(time.time() * 1e6)
    events = []
    for _ in range(BATCH):
        message_id = str(uuid.uuid4())
        sent = Sent(ledger.person(rng.randrange(PEOPLE)), rng.choice(EVENT_NAMES),
                    now - rng.randrange(int(SPREAD.total_seconds() * 1e6)))
        ledger.sent[message_id] = sent
        events.append(pb.TrackRequest(external_id=sent.external_id, event=sent.event, message_id=message_id,
                                      timestamp=rfc3339(sent.timestamp_us)))
    return pb.TrackBatchRequest(events=events)


async def call_with_retries(stubs: list, method: str, request, metadata, ledger: Ledger | None = None):
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


async def ingest(services: list[RunningService], ledger: Ledger, stop: asyncio.Event, seed: int) -> None:
    """A client of services[0] (failing over to the others) sending batches until stopped."""
    rng = random.Random(seed)
    channels = [grpc.aio.insecure_channel(s.grpc_target) for s in services]
    stubs = [events_pb2_grpc.EventsServiceStub(c) for c in channels]
    metadata = ledger.metadata
    try:
        while not stop.is_set():
            request = batch(ledger, rng)
            reply = await call_with_retries(stubs, "TrackBatch", request, metadata, ledger)
            assert reply.success and not reply.errors, reply
            ledger.requests += 1
            ledger.duplicates_answered += len(reply.duplicates)
            for event, event_id in zip(request.events, reply.event_ids, strict=True):
                previous = ledger.acked.setdefault(event.message_id, event_id)
                assert previous == event_id, f"message {event.message_id} acknowledged as two events"
            if rng.random() < REPLAY:
                again = await call_with_retries(stubs, "TrackBatch", request, metadata, ledger)
                ledger.replays += 1
                assert list(again.duplicates) == list(range(len(request.events))), again
                assert list(again.event_ids) == list(reply.event_ids), "a replayed batch got other ids"
    finally:
        for c in channels:
            await c.close()


class Clients:
    """CLIENTS_PER_INSTANCE ingest clients per instance of ``pair``, each failing over to
    the other instance; client i keeps its ledger in ``ledgers[i % len(ledgers)]``, so
    with two ledgers each instance's clients have their own. ``extra`` coroutines (given
    the stop event) run alongside, such as readers. Leaving the block stops them all and
    fails on any error they raised."""

    def __init__(self, pair: list[RunningService], ledgers: list[Ledger], extra=()) -> None:
        self.stop = asyncio.Event()
        orders = [pair, pair[::-1]]
        self.tasks = [asyncio.create_task(ingest(orders[i % 2], ledgers[i % len(ledgers)], self.stop, seed=i))
                      for i in range(CLIENTS_PER_INSTANCE * len(pair))]
        self.tasks += [asyncio.create_task(make(self.stop)) for make in extra]

    async def __aenter__(self) -> Clients:
        return self

    async def __aexit__(self, *exc_info) -> None:
        self.stop.set()
        results = await asyncio.gather(*self.tasks, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if exc_info[0] is None:
            assert not errors, errors


def window_request(person: str, since: datetime, until: datetime) -> pb.ListPersonEventsRequest:
    request = pb.ListPersonEventsRequest(person_id=person, id_type="external_id", limit=10)
    request.since.FromDatetime(since)
    request.until.FromDatetime(until)
    return request


async def all_pages(stubs: list, person: str, metadata, read=None) -> tuple[list, int]:
    """Every event of the person, 500 at a time, and the total of the last page;
    ``read(request)`` makes each call (default: with retries)."""
    events: list = []
    while True:
        request = pb.ListPersonEventsRequest(person_id=person, id_type="external_id", limit=500,
                                             offset=len(events))
        if read is None:
            reply = await call_with_retries(stubs, "ListPersonEvents", request, metadata)
        else:
            reply = await read(request)
        events.extend(reply.events)
        if len(reply.events) < 500:
            return events, reply.total


async def verify(services: list[RunningService], ledger: Ledger) -> dict[str, int]:
    """Every acknowledged event stored once, nothing else stored, every total exact."""
    channel = grpc.aio.insecure_channel(services[0].grpc_target)
    stubs = [events_pb2_grpc.EventsServiceStub(channel)]
    metadata = ledger.metadata
    stored = lost = duplicated = 0
    try:
        for i in range(PEOPLE):
            person = ledger.person(i)
            expected = ledger.acked_of(person)
            events, total = await all_pages(stubs, person, metadata)
            ids = [e.id for e in events]
            stored += len(ids)
            lost += len(expected - set(ids))
            duplicated += len(ids) - len(set(ids)) + len(set(ids) - expected)
            assert total == len(ids), f"{person}: total {total}, {len(ids)} events listed"
            for name in EVENT_NAMES:
                request = pb.ListPersonEventsRequest(person_id=person, id_type="external_id", limit=1, event=name)
                reply = await call_with_retries(stubs, "ListPersonEvents", request, metadata)
                want = sum(1 for m, s in ledger.sent.items()
                           if s.external_id == person and s.event == name and m in ledger.acked)
                assert reply.total == want, f"{person}, event {name}: total {reply.total}, {want} acknowledged"
            now = datetime.now(UTC)
            since, until = now - timedelta(hours=36), now - timedelta(hours=12)
            reply = await call_with_retries(stubs, "ListPersonEvents", window_request(person, since, until), metadata)
            lo, hi = int(since.timestamp() * 1e6), int(until.timestamp() * 1e6)
            want = sum(1 for m, s in ledger.sent.items()
                       if s.external_id == person and lo <= s.timestamp_us < hi and m in ledger.acked)
            assert reply.total == want, f"{person}, window: total {reply.total}, {want} acknowledged"
            await _verify_summary(stubs, metadata, ledger, person)
        await _verify_counts(stubs, metadata, ledger)
    finally:
        await channel.close()
    return {"stored": stored, "lost": lost, "duplicated": duplicated}


def _us(ts) -> int:
    return ts.seconds * 1_000_000 + ts.nanos // 1000


async def _verify_summary(stubs: list, metadata, ledger: Ledger, person: str) -> None:
    """The person's summary: total, and per event name count, first and last seen, exact."""
    mine = [s for s in ledger.acked_sent() if s.external_id == person]
    request = pb.GetPersonSummaryRequest(person_id=person, id_type="external_id")
    reply = await call_with_retries(stubs, "GetPersonSummary", request, metadata)
    assert reply.total == len(mine), f"{person}: summary total {reply.total}, {len(mine)} acknowledged"
    got = {e.event: (e.count, _us(e.first_seen), _us(e.last_seen)) for e in reply.events}
    want = {name: (len(ts), min(ts), max(ts))
            for name in EVENT_NAMES if (ts := [s.timestamp_us for s in mine if s.event == name])}
    assert got == want, f"{person}: summary {got}, acknowledged {want}"


async def _verify_counts(stubs: list, metadata, ledger: Ledger) -> None:
    """The workspace's daily event counts and distinct persons, every event and each name, exact."""
    acked = ledger.acked_sent()
    day = 86_400_000_000
    since = datetime.fromtimestamp(min(s.timestamp_us for s in acked) // day * day / 1e6, UTC)
    for name in ("", *EVENT_NAMES):
        request = pb.GetEventCountsRequest(event=name, interval="day")
        request.since.FromDatetime(since)
        reply = await call_with_retries(stubs, "GetEventCounts", request, metadata)
        mine = [s for s in acked if not name or s.event == name]
        want = {}
        for s in mine:
            n, persons = want.get(s.timestamp_us // day, (0, set()))
            want[s.timestamp_us // day] = (n + 1, persons | {s.external_id})
        got = {_us(b.start) // day: (b.count, b.unique_persons) for b in reply.buckets if b.count}
        assert got == {d: (n, len(p)) for d, (n, p) in want.items()}, f"event counts of {name or 'every event'}"
        assert reply.total == len(mine)


def fault_line(name: str, ledger: Ledger, verified: dict[str, int], **times: float) -> str:
    failed = sum(ledger.failed_attempts.values())
    parts = [f"acknowledged={len(ledger.acked)}", f"stored={verified['stored']}", f"lost={verified['lost']}",
             f"duplicated={verified['duplicated']}", f"requests={ledger.requests}",
             f"failed_attempts={failed} {dict(ledger.failed_attempts)}", f"retried_requests={ledger.retried_requests}",
             f"duplicates_answered={ledger.duplicates_answered}", f"replays={ledger.replays}",
             f"longest_retry_s={ledger.longest_retry_s:.1f}", *(f"{k}={v:.1f}" for k, v in times.items())]
    return f"FAULT {name}: " + " ".join(parts)


