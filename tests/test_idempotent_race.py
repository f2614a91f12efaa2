"""Concurrent copies of the same messages store exactly one event each.

The same batch (and the same single events) race from many clients, over gRPC
and REST at once, against a ``serve`` with several gRPC workers on SQLite, and
against two ``serve`` instances on one Cassandra keyspace. Every client is
answered with the same ids for a message; at most one answer per message says
it was stored (a client that retried after UNAVAILABLE may find its own first
attempt); each person holds exactly the events of the batch. After a restart
the messages are still remembered.
"""

from __future__ import annotations

import secrets
import threading
import uuid
from collections.abc import Callable
from urllib.parse import urlsplit

import grpc
import httpx
import pytest

from flameup.events.v1 import events_pb2 as pb
from flameup.events.v1 import events_pb2_grpc
from cassandra_support import drop_keyspace
from service_support import RunningService, start_service, stop_service

CLIENTS_PER_TRANSPORT = 4  # per service instance
PEOPLE = 5
EVENTS = 100
SINGLES = 3  # messages also raced one by one through Track


def _batch() -> tuple[list[dict], list[dict]]:
    run = uuid.uuid4().hex[:8]
    batch = [{"external_id": f"racer_{run}_{i % PEOPLE}", "event": f"e{i % 7}", "message_id": str(uuid.uuid4()),
              "parameters": {"i": i}} for i in range(EVENTS)]
    singles = [{"external_id": f"racer_{run}_{i}", "event": "single", "message_id": str(uuid.uuid4())}
               for i in range(SINGLES)]
    return batch, singles


def _with_retries(call: Callable[[], object]) -> object:
    """What a client with a retry policy does: try again on UNAVAILABLE."""
    for attempt in range(8):
        try:
            return call()
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or attempt == 7:
                raise


def _race(services: list[RunningService], batch: list[dict], singles: list[dict]) -> list[tuple[list, list]]:
    """Every client sends the batch and then each single; (event_ids, duplicate flags) per answer."""
    answers: list[tuple[list, list]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    clients = [(svc, transport) for svc in services for transport in ("grpc", "rest")
               for _ in range(CLIENTS_PER_TRANSPORT)]
    barrier = threading.Barrier(len(clients))

    def grpc_client(svc: RunningService) -> list[tuple[list, list]]:
        with grpc.insecure_channel(svc.grpc_target) as channel:
            stub = events_pb2_grpc.EventsServiceStub(channel)
            request = pb.TrackBatchRequest(events=[pb.TrackRequest(**{k: v for k, v in e.items() if k != "parameters"})
                                                   for e in batch])
            barrier.wait()
            reply = _with_retries(lambda: stub.TrackBatch(request, metadata=svc.metadata(), timeout=60))
            assert reply.success, reply.errors
            out = [(list(reply.event_ids), [i in set(reply.duplicates) for i in range(EVENTS)])]
            for e in singles:
                r = _with_retries(lambda e=e: stub.Track(pb.TrackRequest(**e), metadata=svc.metadata(), timeout=60))
                out.append(([r.event_id], [r.duplicate]))
            return out

    def rest_client(svc: RunningService) -> list[tuple[list, list]]:
        with httpx.Client(base_url=svc.http_url, headers={"Authorization": f"Bearer {svc.key}"}, timeout=60) as http:
            barrier.wait()
            for _ in range(8):
                resp = http.post("/api/v1/track/batch", json={"events": batch})
                if resp.status_code != 503:
                    break
            body = resp.json()
            assert resp.status_code == 200 and body["success"], body
            out = [(body["event_ids"], [i in set(body["duplicates"]) for i in range(EVENTS)])]
            for e in singles:
                for _ in range(8):
                    resp = http.post("/api/v1/track", json=e)
                    if resp.status_code != 503:
                        break
                assert resp.status_code == 200, resp.text
                out.append(([resp.json()["event_id"]], [resp.json()["duplicate"]]))
            return out

    def client(svc: RunningService, transport: str) -> None:
        try:
            result = (grpc_client if transport == "grpc" else rest_client)(svc)
            with lock:
                answers.append(result)
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=client, args=c) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    assert len(answers) == len(clients)
    return answers


def _check(services: list[RunningService], batch: list[dict], singles: list[dict],
           answers: list[list[tuple[list, list]]]) -> list[str]:
    """The ids every client got agree, and each message is stored once; the ids."""
    ids = []
    for part in range(1 + SINGLES):
        per_client = [a[part] for a in answers]
        (agreed,) = {tuple(event_ids) for event_ids, _ in per_client}  # every client, the same ids
        assert all(agreed)
        stored_flags = [sum(not dup[i] for _, dup in per_client) for i in range(len(agreed))]
        assert all(n <= 1 for n in stored_flags), stored_flags
        ids += agreed
    with httpx.Client(base_url=services[-1].http_url, headers={"Authorization": f"Bearer {services[-1].key}"},
                      timeout=60) as http:
        listed = []
        for e in {e["external_id"] for e in batch + singles}:
            page = http.get(f"/api/v1/people/{e}/events", params={"id_type": "external_id", "limit": 500}).json()
            assert page["total"] == len(page["events"])
            listed += [ev["id"] for ev in page["events"]]
    assert sorted(listed) == sorted(ids)  # each message once, no more, no fewer
    return ids


def test_racing_copies_store_one_event_each_on_sqlite(tmp_path):
    url = f"sqlite:///{tmp_path}/events.db"
    batch, singles = _batch()
    svc = start_service(url, workers=3)
    try:
        ids = _check([svc], batch, singles, _race([svc], batch, singles))
    finally:
        assert stop_service(svc) == 0, "".join(svc.output)
    svc = start_service(url, workers=2)  # a restart remembers the messages
    try:
        answers = _race([svc], batch, singles)
        assert _check([svc], batch, singles, answers) == ids
        assert all(all(dup) for a in answers for _, dup in a)
    finally:
        assert stop_service(svc) == 0, "".join(svc.output)


@pytest.mark.cassandra
def test_racing_copies_store_one_event_each_on_two_cassandra_instances(cassandra_url):
    # a keyspace of its own: the instances' bootstrap key replaces ws_default's key
    address = urlsplit(cassandra_url)
    keyspace = f"flameup_race_{secrets.token_hex(3)}"
    url = address._replace(path=f"/{keyspace}").geturl()
    batch, singles = _batch()
    first = start_service(url, workers=2)
    second = start_service(url, workers=2, extra_env={"FLAMEUP_BOOTSTRAP_KEY": first.key})
    second.key = first.key
    services = [first, second]
    try:
        ids = _check(services, batch, singles, _race(services, batch, singles))
        answers = _race(services[:1], batch, singles)
        assert _check(services, batch, singles, answers) == ids
        assert all(all(dup) for a in answers for _, dup in a)
    finally:
        for svc in services:
            assert stop_service(svc) == 0, "".join(svc.output)
        drop_keyspace(address.hostname, address.port, keyspace)
