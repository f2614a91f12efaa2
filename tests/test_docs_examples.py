"""End to end: the documentation's own curl, Python and JavaScript examples
run against the running service and get the documented answers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parent / "docs_examples"


def example_env(service) -> dict[str, str]:
    return {**os.environ, "BASE_URL": service.http_url, "GRPC_TARGET": service.grpc_target, "API_KEY": service.key,
            "EXTERNAL_ID": f"user_{uuid.uuid4().hex[:10]}", "NATS_URL": service.nats_url or ""}


def run_example(service, *command: str) -> str:
    env = example_env(service)
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120, cwd=EXAMPLES)
    assert done.returncode == 0, done.stderr
    return done.stdout


def check_purchase_listing(listing: dict, amount=99.99) -> None:
    assert listing["total"] == 1
    (event,) = listing["events"]
    assert set(event) == {"id", "workspace_id", "person_id", "external_id", "event", "parameters",
                          "timestamp", "created_at"}
    assert event["event"] == "purchase_completed" and event["workspace_id"] == "ws_default"
    assert event["parameters"]["amount"] == amount and event["parameters"]["order_id"] == "order_789"
    assert event["timestamp"].endswith("Z") and event["created_at"].endswith("Z")


def check_client_results(results: dict) -> None:
    for name in ("page_viewed", "purchase_completed"):
        assert results[name]["success"] is True and results[name]["event_id"].startswith("evt_")
    batch = results["batch"]
    assert batch["success"] is True and batch["errors"] == [] and len(batch["event_ids"]) == 3
    check_purchase_listing(results["person_events"])
    params = results["person_events"]["events"][0]["parameters"]
    # numbers come back exactly as sent: 2 stays 2 (not 2.0), 99.99 stays 99.99
    assert params["items"] == [{"sku": "PROD-001", "name": "Widget", "quantity": 2},
                               {"sku": "PROD-002", "name": "Gadget", "quantity": 1}]
    assert all(type(item["quantity"]) is int for item in params["items"])  # JSON text 2, not 2.0


def test_curl_examples(service):
    track, retry, batch, listing = (
        json.loads(line) for line in run_example(service, "bash", "examples.sh").splitlines())
    assert track["success"] is True and track["event_id"].startswith("evt_") and track["person_id"]
    assert track["duplicate"] is False and retry == {**track, "duplicate": True}
    assert batch == {"success": True, "event_ids": batch["event_ids"], "errors": [], "duplicates": []}
    assert len(batch["event_ids"]) == 2 and all(batch["event_ids"])
    check_purchase_listing(listing)


def test_grpc_python_example_with_retries(service):
    assert run_example(service, sys.executable, "grpc_example.py").strip() == "1 ['purchase_completed']"


def test_readme_shows_the_grpc_example():
    readme = (EXAMPLES.parents[1] / "README.md").read_text()
    example = (EXAMPLES / "grpc_example.py").read_text()
    as_in_readme = example.replace("(TARGET,", '("127.0.0.1:50051",').replace("=EXTERNAL_ID,", '="user_123",')
    for line in as_in_readme.splitlines():
        if line.strip() and "harness" not in line and not line.startswith('"""'):
            assert line in readme, line


def test_python_examples(service):
    check_client_results(json.loads(run_example(service, sys.executable, "examples.py")))


@pytest.mark.skipif(shutil.which("node") is None and not os.environ.get("CI"), reason="node is not installed")
def test_javascript_examples(service):
    results = json.loads(run_example(service, "node", "examples.mjs"))
    check_client_results(results)
    assert results["plan_upgraded"]["success"] and results["nps_submitted"]["success"]


def test_campaign_and_analytics_examples(service):
    """The README's abandoned-cart condition, by one summary call and by one filtered
    list call, and its analytics calls (daily purchases and buyers, event names)."""
    summary, purchases, counts, names = (
        json.loads(line) for line in run_example(service, "bash", "aggregates.sh").splitlines())
    by_name = {e["event"]: e for e in summary["events"]}
    assert by_name["cart_updated"]["count"] == 1 and "purchase_completed" not in by_name
    cart_at = datetime.fromisoformat(by_name["cart_updated"]["last_seen"])
    assert datetime.now(timezone.utc) - cart_at > timedelta(hours=24)  # the campaign's condition holds
    assert summary["total"] == 2 and summary["last_seen"] == by_name["cart_updated"]["last_seen"]
    assert purchases["total"] == 0 and purchases["events"] == []
    assert counts["interval"] == "day" and len(counts["buckets"]) in (30, 31)
    assert all(set(b) == {"start", "count", "unique_persons"} for b in counts["buckets"])
    assert counts["total"] == sum(b["count"] for b in counts["buckets"])
    assert all(b["unique_persons"] <= b["count"] for b in counts["buckets"])
    assert {"cart_updated", "logged_in"} <= {e["event"] for e in names["events"]}


def test_readme_shows_the_campaign_and_analytics_examples():
    readme = (EXAMPLES.parents[1] / "README.md").read_text()
    script = (EXAMPLES / "aggregates.sh").read_text()
    for line in script.splitlines():
        if (line.startswith("curl -s ") or line.startswith("  -H")) and "harness" not in line:
            as_in_readme = (line.replace("$BASE_URL", "http://127.0.0.1:8080").replace("$API_KEY", "$KEY")
                            .replace("$EXTERNAL_ID", "user_123"))
            assert as_in_readme in readme, as_in_readme


# Triggering campaigns: the three feed consumers -----------------------------------------


def _purchase(service) -> str:
    """Track a purchase (the README's own curl example) and return its event id."""
    track = json.loads(run_example(service, "bash", "examples.sh").splitlines()[0])
    return track["event_id"]


def _follow(service, tmp_path, command: list[str], ready: str) -> tuple[list[str], str]:
    """Run a consumer, track a purchase once it says ``ready``; its lines up to the one with
    that event's id (a purchase tracked just before may come first), and the event id."""
    env = {**example_env(service), "WORK_DIR": str(tmp_path)}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=EXAMPLES)
    lines: list[str] = []
    tracked = ""
    try:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if not tracked and ready in line:
                tracked = _purchase(service)
            elif tracked and tracked in line:
                return lines, tracked
        raise AssertionError(f"the consumer ended early: {lines} {proc.stderr.read()}")
    finally:
        proc.kill()
        proc.wait()


def test_grpc_feed_consumer_triggers_on_a_purchase_and_keeps_its_cursor(service, tmp_path):
    lines, event_id = _follow(service, tmp_path, [sys.executable, "feed_grpc.py"], "listening")
    assert lines[-1] == f"purchase_completed {event_id}"
    assert (tmp_path / "campaigns.cursor").read_text()


def test_sse_feed_consumer_with_curl(service, tmp_path):
    lines, event_id = _follow(service, tmp_path, ["bash", "feed_sse.sh"], ": stream open")
    assert lines[-3].startswith("id: ") and lines[-2] == "event: event"
    event = json.loads(lines[-1].removeprefix("data: "))
    assert event["id"] == event_id and event["event"] == "purchase_completed"


def test_nats_durable_consumer(service):
    event_id = _purchase(service)
    out = run_example(service, sys.executable, "feed_nats.py").splitlines()
    assert out and all(line.startswith("purchase_completed evt_") for line in out)
    assert f"purchase_completed {event_id}" in out or len(out) == 100  # one fetch of the workspace's purchases


def test_readme_shows_the_feed_consumers():
    readme = (EXAMPLES.parents[1] / "README.md").read_text()
    grpc_consumer = (EXAMPLES / "feed_grpc.py").read_text().replace("(TARGET)", '("127.0.0.1:50051")')
    nats_consumer = (EXAMPLES / "feed_nats.py").read_text().replace("(NATS_URL)", '("nats://127.0.0.1:4222")')
    sse = (EXAMPLES / "feed_sse.sh").read_text().replace("$BASE_URL", "http://127.0.0.1:8080")
    for example in (grpc_consumer, nats_consumer, sse):
        for line in example.splitlines():
            quoted = line.startswith(('"""', "#")) or line.endswith('"""')
            if line.strip() and "harness" not in line and not quoted:
                assert line in readme, line
