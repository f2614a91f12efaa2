"""Ingest limits per workspace, the metrics that count them and JSON logs, against a real service (both stores)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid

import grpc
import httpx
import nats
import pytest
from google.rpc import code_pb2, error_details_pb2
from grpc_status import rpc_status

from flameup.events.v1 import events_pb2 as pb
from service.domain import RateLimit, person_id_for
from service.ratelimit import SharedBuckets
from tests.service_support import start_service, stop_service

# So slow that no token comes back while a test runs: what is admitted is exactly the burst.
SLOW = "0.001"


def uid() -> str:
    return f"user_{uuid.uuid4().hex[:12]}"


def set_limit(service, workspace: str, *args: str) -> None:
    done = service.cli("workspaces", "limit", workspace, *args)
    assert done.returncode == 0, done.stderr


def batch(n: int, external_id: str) -> pb.TrackBatchRequest:
    return pb.TrackBatchRequest(events=[pb.TrackRequest(external_id=external_id, event="e") for _ in range(n)])


def stored(service, key: str, workspace: str, external_id: str) -> int:
    reply = service.stub().ListPersonEvents(
        pb.ListPersonEventsRequest(person_id=person_id_for(workspace, external_id)),
        metadata=service.metadata(key), timeout=10)
    return reply.total


def test_a_workspace_over_its_limit_gets_resource_exhausted_with_retry_info(service, workspace):
    key = service.create_key(workspace)
    other_ws = workspace[:-1] + ("0" if workspace[-1] != "0" else "1")
    other_key = service.create_key(other_ws)
    set_limit(service, workspace, "--events-per-second", SLOW, "--burst", "5")
    stub, person = service.stub(), uid()
    assert stub.TrackBatch(batch(3, person), metadata=service.metadata(key), timeout=10).success
    # 2 tokens left: a batch of 3 is refused whole, nothing of it stored
    with pytest.raises(grpc.RpcError) as err:
        stub.TrackBatch(batch(3, person), metadata=service.metadata(key), timeout=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    status = rpc_status.from_call(err.value)
    info = error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(info)
    assert info.retry_delay.ToNanoseconds() > 0
    assert workspace in status.message
    assert stored(service, key, workspace, person) == 3
    # what is left still admits a call that fits
    stub.Track(pb.TrackRequest(external_id=person, event="e"), metadata=service.metadata(key), timeout=10)
    stub.Track(pb.TrackRequest(external_id=person, event="e"), metadata=service.metadata(key), timeout=10)
    with pytest.raises(grpc.RpcError) as err:
        stub.Track(pb.TrackRequest(external_id=person, event="e"), metadata=service.metadata(key), timeout=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert stored(service, key, workspace, person) == 5
    # reads are not limited, and another workspace is not affected
    assert stored(service, key, workspace, person) == 5
    assert stub.TrackBatch(batch(50, person), metadata=service.metadata(other_key), timeout=10).success
    # lifting the limit admits again
    set_limit(service, workspace, "--none")
    assert stub.TrackBatch(batch(3, person), metadata=service.metadata(key), timeout=10).success
    assert stored(service, key, workspace, person) == 8


def test_rest_answers_429_with_retry_after(service, workspace):
    key = service.create_key(workspace)
    set_limit(service, workspace, "--events-per-second", SLOW, "--burst", "2")
    body = {"events": [{"external_id": "u", "event": "e"}] * 2}
    with httpx.Client(base_url=service.http_url, headers={"Authorization": f"Bearer {key}"}, timeout=10) as http:
        assert http.post("/api/v1/track/batch", json=body).status_code == 200
        resp = http.post("/api/v1/track", json={"external_id": "u", "event": "e"})
    assert resp.status_code == 429
    assert int(resp.headers["Retry-After"]) >= 1
    error = resp.json()
    assert error["code"] == code_pb2.RESOURCE_EXHAUSTED
    assert error["details"][0]["@type"] == "type.googleapis.com/google.rpc.RetryInfo"


def test_a_batch_bigger_than_the_burst_needs_a_full_bucket(service, workspace):
    key = service.create_key(workspace)
    set_limit(service, workspace, "--events-per-second", SLOW, "--burst", "10")
    stub, person = service.stub(), uid()
    assert stub.TrackBatch(batch(30, person), metadata=service.metadata(key), timeout=10).success
    with pytest.raises(grpc.RpcError) as err:  # the bucket is in debt now
        stub.Track(pb.TrackRequest(external_id=person, event="e"), metadata=service.metadata(key), timeout=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_limits_cli_validates_and_lists(service, workspace):
    service.create_key(workspace)
    assert service.cli("workspaces", "limit", workspace, "--events-per-second", "0").returncode == 2
    assert service.cli("workspaces", "limit", workspace, "--events-per-second", "5", "--burst", "0").returncode == 2
    assert service.cli("workspaces", "limit", workspace).returncode == 2
    assert service.cli("workspaces", "limit", "ws_does_not_exist_here", "--events-per-second", "5").returncode == 1
    set_limit(service, workspace, "--events-per-second", "2.5")
    line = next(x for x in service.cli("workspaces", "list").stdout.splitlines() if x.startswith(workspace + " "))
    assert line.split()[1:] == ["2.5/s", "burst", "3"]


def test_metrics_count_calls_codes_events_and_refusals(service, workspace):
    key = service.create_key(workspace)
    set_limit(service, workspace, "--events-per-second", SLOW, "--burst", "1")

    def value(text: str, name: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))

    before = httpx.get(f"{service.http_url}/metrics").text
    stub = service.stub()
    stub.Track(pb.TrackRequest(external_id="u", event="e"), metadata=service.metadata(key), timeout=10)
    with pytest.raises(grpc.RpcError):
        stub.Track(pb.TrackRequest(external_id="u", event="e"), metadata=service.metadata(key), timeout=10)
    resp = httpx.get(f"{service.http_url}/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    after = resp.text
    for name, grew in (
        ('flameup_grpc_requests_total{code="OK",method="Track"}', 1),
        ('flameup_grpc_requests_total{code="RESOURCE_EXHAUSTED",method="Track"}', 1),
        ('flameup_rate_limited_requests_total{method="Track"}', 1),
        ("flameup_events_stored_total", 1),
        ('flameup_grpc_request_seconds_count{method="Track"}', 2),
    ):
        assert value(after, name) - value(before, name) == grew, name


def test_shared_buckets_are_one_bucket_for_every_process_mapping_the_file(tmp_path):
    path = str(tmp_path / "buckets")
    first, second = SharedBuckets(path), SharedBuckets(path)
    limit = RateLimit(0.001, 4)
    try:
        assert first.take("ws_a", 3, limit) == 0.0
        wait = second.take("ws_a", 2, limit)  # one token left, seen from the other mapping
        assert wait > 0
        assert second.take("ws_b", 4, limit) == 0.0  # each workspace its own bucket
        assert first.take("ws_a", 1, limit) == 0.0
        assert first.take("ws_a", 1, limit) > 0
    finally:
        first.close()
        second.close()


def test_json_logs_are_one_object_per_line(tmp_path):
    env = {**os.environ, "FLAMEUP_BOOTSTRAP_KEY": "k" * 24}
    done = subprocess.run(
        [sys.executable, "-m", "service", "migrate", "--store", f"sqlite:///{tmp_path}/events.db",
         "--log-level", "info", "--log-format", "json"],
        capture_output=True, text=True, timeout=60, env=env,
    )
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stderr.splitlines()]
    created = next(r for r in records if "bootstrap key" in r["message"])
    assert created["level"] == "INFO" and created["logger"] == "service.auth" and created["process"] > 0
    assert "time" in created


def test_delete_person_erases_the_person_everywhere_and_nothing_else(service, workspace):
    key = service.create_key(workspace, "events:read,events:write,people:delete")
    stub, md = service.stub(), service.metadata(key)
    gone, kept = uid(), uid()
    events = [pb.TrackRequest(external_id=p, event=name, timestamp=f"2026-01-0{day}T10:00:00Z")
              for p in (gone, kept) for day in (1, 2, 3) for name in ("a", "b")]
    assert stub.TrackBatch(pb.TrackBatchRequest(events=events), metadata=md, timeout=10).success
    gone_id = person_id_for(workspace, gone)
    reads = [{}, {"event": "a"}, {"since": "2026-01-02T00:00:00Z"}, {"limit": 1, "offset": 1}]

    def everything(external_id: str) -> list:
        pages = []
        for params in reads:
            request = pb.ListPersonEventsRequest(person_id=person_id_for(workspace, external_id), **{
                k: v for k, v in params.items() if k != "since"})
            if "since" in params:
                request.since.FromJsonString(params["since"])
            pages.append(stub.ListPersonEvents(request, metadata=md, timeout=10))
            pages.append(stub.ListPersonEvents(pb.ListPersonEventsRequest(
                person_id=external_id, id_type="external_id"), metadata=md, timeout=10))
        with httpx.Client(base_url=service.http_url, headers={"Authorization": f"Bearer {key}"}) as http:
            pages.append(http.get(f"/api/v1/people/{external_id}/events", params={"id_type": "external_id"}).json())
        return pages

    kept_before = everything(kept)
    reply = stub.DeletePerson(pb.DeletePersonRequest(person_id=gone_id), metadata=md, timeout=30)
    assert reply.deleted_events == 6
    for page in everything(gone):
        if isinstance(page, dict):  # REST
            assert (page["total"], page["events"]) == (0, [])
        else:
            assert (page.total, list(page.events)) == (0, [])
    assert everything(kept) == kept_before
    # repeating it is harmless; by external_id over REST too
    with httpx.Client(base_url=service.http_url, headers={"Authorization": f"Bearer {key}"}) as http:
        resp = http.delete(f"/api/v1/people/{gone}", params={"id_type": "external_id"})
        assert (resp.status_code, resp.json()) == (200, {"deleted_events": 0})
    # events tracked afterwards are kept
    stub.Track(pb.TrackRequest(external_id=gone, event="later"), metadata=md, timeout=10)
    page = stub.ListPersonEvents(pb.ListPersonEventsRequest(person_id=gone_id), metadata=md, timeout=10)
    assert page.total == 1 and [e.event for e in page.events] == ["later"]
    with httpx.Client(base_url=service.http_url, headers={"Authorization": f"Bearer {key}"}) as http:
        resp = http.delete(f"/api/v1/people/{gone_id}")
        assert (resp.status_code, resp.json()) == (200, {"deleted_events": 1})


def test_delete_person_needs_its_scope_and_a_valid_person(service, workspace):
    writer = service.create_key(workspace)
    with httpx.Client(base_url=service.http_url, headers={"Authorization": f"Bearer {writer}"}) as http:
        resp = http.delete(f"/api/v1/people/{person_id_for(workspace, 'u')}")
        assert resp.status_code == 403 and "people:delete" in resp.json()["message"]
    deleter = service.create_key(workspace, "people:delete")
    with httpx.Client(base_url=service.http_url, headers={"Authorization": f"Bearer {deleter}"}) as http:
        resp = http.delete("/api/v1/people/not-a-uuid")
        assert resp.status_code == 400
        assert resp.json()["details"][0]["field_violations"][0]["field"] == "person_id"
        assert http.delete("/api/v1/people/u", params={"id_type": "email"}).status_code == 400
        # a deleter alone cannot read
        assert http.get(f"/api/v1/people/{person_id_for(workspace, 'u')}/events").status_code == 403


def test_one_serve_instance_enforces_a_limit_across_its_processes(tmp_path):
    """The gateway calls each gRPC worker in turn: per-worker buckets would admit the burst twice."""
    svc = start_service(f"sqlite:///{tmp_path}/events.db", workers=2)
    try:
        set_limit(svc, "ws_default", "--events-per-second", SLOW, "--burst", "10")
        with httpx.Client(base_url=svc.http_url, headers={"Authorization": f"Bearer {svc.key}"}, timeout=10) as http:
            codes = [http.post("/api/v1/track", json={"external_id": "u", "event": "e"}).status_code
                     for _ in range(20)]
            assert sorted(codes) == [200] * 10 + [429] * 10
            metrics = http.get("/metrics").text
        # the REST side is counted too, by route template and status
        assert 'flameup_http_requests_total{method="POST",route="/api/v1/track",status="429"} 10.0' in metrics
        assert 'flameup_rate_limited_requests_total{method="Track"} 10.0' in metrics
    finally:
        assert stop_service(svc) == 0, "".join(svc.output)


def test_the_gateway_logs_json_too():
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "--port", "0", "--grpc-target", "unix:/nonexistent/flameup.sock",
         "--log-level", "info", "--log-format", "json"],
        stderr=subprocess.PIPE, text=True,
    )
    try:
        records = []
        for line in proc.stderr:
            records.append(json.loads(line))
            if "REST gateway listening" in records[-1]["message"]:
                break
        assert records and all({"time", "level", "logger", "message"} <= set(r) for r in records)
    finally:
        proc.terminate()
        proc.wait(30)


def test_the_feed_carries_a_deletion_notice(service, workspace):
    assert service.nats_url is not None  # serve runs the feed by default
    key = service.create_key(workspace, "events:write,people:delete")
    stub = service.stub()
    stub.Track(pb.TrackRequest(external_id="u", event="e"), metadata=service.metadata(key), timeout=10)
    reply = stub.DeletePerson(pb.DeletePersonRequest(person_id="u", id_type="external_id"),
                              metadata=service.metadata(key), timeout=30)
    assert reply.deleted_events == 1

    async def notice() -> dict:
        nc = await nats.connect(service.nats_url)
        try:
            sub = await nc.jetstream().subscribe(f"flameup.deletions.{workspace}", ordered_consumer=True)
            msg = await sub.next_msg(timeout=10)
            return json.loads(msg.data)
        finally:
            await nc.close()

    assert asyncio.run(notice()) == {"workspace_id": workspace, "person_id": person_id_for(workspace, "u"),
                                     "deleted_events": 1}
