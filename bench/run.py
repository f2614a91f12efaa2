"""`make bench`: ingest and read speed of the real service, next to the store's own limit.

    .venv/bin/python -m bench.run [--stores sqlite,cassandra,cassandra_cluster] [--duration S] [--warmup S]
                                  [--concurrency N | workload=N,...] [--out bench/results.json]
    BENCH_QUICK=1 .venv/bin/python -m bench.run     # every workload briefly (CI)

For each store: the service started as `make run` starts it (one gRPC worker
per CPU, one gateway per two CPUs: 2 and 1 on the 2-CPU machine; ephemeral
ports, a fresh database), the ingest workloads over gRPC and REST with the raw
bulk insert (the store alone, the service idle) right before and right after
grpc_batch, the service's memory, list_person reads, and a check that every
acknowledged event is stored. Prints a table with the targets
and writes a flat list of records {"store", "workload", "metric", "value",
"unit"}. Exits non-zero when a workload failed to run (errors in responses,
wrong totals, a service that would not start or stop cleanly); it asserts
nothing about speed. See bench/README.md.

`make bench-cluster` runs grpc_batch and list_person on the single node and on
the local three-node cluster (replication factor 3, LOCAL_QUORUM) in one run,
prints the cluster's numbers as ratios to the single node's, and runs
grpc_batch_node_kill: grpc_batch on the cluster while one node is SIGKILLed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pickle
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

if __package__ in (None, ""):  # `python bench/run.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import aggregates, data, feed, grpc_load, reads, rest_load, service_proc  # noqa: E402
from bench.metrics import Record, percentile  # noqa: E402
from flameup.events.v1 import events_pb2 as pb  # noqa: E402
from flameup.events.v1 import events_pb2_grpc  # noqa: E402
from bench.stores import (  # noqa: E402
    CLUSTER_CASSANDRA_URL,
    DEFAULT_CASSANDRA_URL,
    BenchStore,
    CassandraBench,
    CassandraClusterBench,
    RawResult,
    SqliteBench,
)
from procutil.cpu import (  # noqa: E402
    CPU_POLICIES,
    DEFAULT_CPU_POLICY,
    DEFAULT_WORKER_CPU_AFFINITY,
    WORKER_CPU_AFFINITIES,
    set_cpu_policy,
)
from service.supervisor import default_gateway_workers, default_workers  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
INGEST = ("grpc_track", "grpc_batch", "grpc_batch_limited", "grpc_batch_msgid", "grpc_batch_replay", "rest_track",
          "rest_batch")
# Run right after RAW_BRACKETS (grpc_batch with the feed on, as serve runs by default): the same
# with --feed off, the feed's lag at half grpc_batch's rate, and the drain of a backlog.
FEED = ("grpc_batch_feed_off", "feed_lag", "feed_drain")
# grpc_batch while a node of the cluster is SIGKILLed (cassandra_cluster only): its p99 is the cost of the fault.
NODE_KILL = "grpc_batch_node_kill"
WORKLOADS = ("raw_store_insert", *INGEST, *FEED, "service_rss_mb", "list_person", "aggregates", NODE_KILL,
             "delete_person")
STORES = ("sqlite", "cassandra", "cassandra_cluster")
KILLED_NODE = 2  # of the cluster; killed a quarter into the window, started again after it
# grpc_batch_limited sends grpc_batch's calls right after it, with a key of this workspace,
# whose ingest limit is far above any load: what the limiter costs when it admits everything.
LIMITED_WORKSPACE = "ws_bench_limited"
FAR_ABOVE_LOAD = 1_000_000_000
# raw_store_insert runs right before and right after this workload, the one measured against it.
RAW_BRACKETS = "grpc_batch"
# The load generators (gRPC client processes, wrk, the list_person reader: this
# process and what it starts) run SCHED_BATCH, so that on a shared machine their
# wake-ups do not preempt the service they measure; the service sets its own policy.
LOAD_GENERATOR_CPU_POLICY = "batch"
# In-flight requests: per client process for gRPC, connections in all for wrk.
DEFAULT_CONCURRENCY = {"grpc_track": 16, "grpc_batch": 3, "grpc_batch_limited": 3, "grpc_batch_feed_off": 3,
                       "grpc_batch_msgid": 3, "grpc_batch_replay": 3, "rest_track": 32, "rest_batch": 4,
                       "delete_person": 3}
# The backlog feed_drain publishes: at least this many events (quick: a tenth).
DRAIN_BACKLOG = {"sqlite": 1_000_000, "cassandra": 100_000}
FULL = {"duration": 15.0, "warmup": 5.0, "persons": (100, 10_000, 100_000), "read_calls": 200, "raw_rows": 400_000,
        "raw_rows_cassandra": 60_000}
QUICK = {"duration": 3.0, "warmup": 1.0, "persons": (100, 1_000, 10_000), "read_calls": 30, "raw_rows": 40_000,
         "raw_rows_cassandra": 6_000}


class WorkloadFailed(Exception):
    """The workload ran but its answers were wrong (errors, bad totals)."""


@dataclass
class Settings:
    stores: list[str]
    stores_explicit: bool
    duration: float
    warmup: float
    concurrency: dict[str, int]
    clients: int
    workers: int
    gateway_workers: int
    cpu_policy: str
    worker_cpu_affinity: str
    workloads: list[str]
    out: Path
    quick: bool
    profile: Path | None
    cassandra_url: str
    cluster_url: str
    persons: tuple[int, ...]
    read_calls: int
    raw_rows: dict[str, int]
    baseline: Path | None = None


@dataclass
class Run:
    settings: Settings
    records: list[Record] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, store: str, workload: str, metric: str, value, unit: str) -> None:
        self.records.append(Record(store, workload, metric, value, unit))

    def attempt(self, store: str, workload: str, fn: Callable[[], None]) -> bool:
        print(f"\n== {store} {workload}", flush=True)
        try:
            fn()
            return True
        except Exception as exc:
            message = f"{store} {workload}: {type(exc).__name__}: {exc}"
            self.failures.append(message)
            print(f"FAILED {message}", flush=True)
            if not isinstance(exc, (WorkloadFailed, grpc.RpcError)):
                traceback.print_exc()
            return False


# Options ----------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> Settings:
    quick_env = os.environ.get("BENCH_QUICK", "") not in ("", "0")
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--stores", help="comma list of sqlite,cassandra,cassandra_cluster (default: sqlite, plus "
                                    "cassandra when reachable)")
    p.add_argument("--duration", type=float, help="measured seconds per ingest workload (default 15, quick 3)")
    p.add_argument("--warmup", type=float, help="warm-up seconds before each measured window (default 5, quick 1)")
    p.add_argument("--concurrency", default="",
                   help="in-flight requests: N for every ingest workload, or workload=N,... "
                        f"(default {','.join(f'{k}={v}' for k, v in DEFAULT_CONCURRENCY.items())}; "
                        "per client process for gRPC, connections in all for REST)")
    p.add_argument("--clients", type=int, default=2, help="gRPC client processes (default 2)")
    p.add_argument("--workers", type=int, default=default_workers(),
                   help="gRPC worker processes of the service (default: as serve, one per CPU)")
    p.add_argument("--gateway-workers", type=int, default=default_gateway_workers(),
                   help="REST gateway processes (default: as serve, one per two CPUs)")
    p.add_argument("--cpu-policy", choices=CPU_POLICIES, default=DEFAULT_CPU_POLICY,
                   help="the service's --cpu-policy (default batch, as serve); the load generators always run batch")
    p.add_argument("--worker-cpu-affinity", choices=WORKER_CPU_AFFINITIES, default=DEFAULT_WORKER_CPU_AFFINITY,
                   help="the service's --worker-cpu-affinity (default auto, as serve)")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="comma list, default all: " + ",".join(WORKLOADS))
    p.add_argument("--out", type=Path, default=BENCH_DIR / "results.json")
    p.add_argument("--quick", action="store_true", default=quick_env, help="short run (also BENCH_QUICK=1)")
    p.add_argument("--profile", nargs="?", const=BENCH_DIR / "out" / "profile", type=Path,
                   help="py-spy the service processes during each ingest window (default dir bench/out/profile)")
    p.add_argument("--cassandra-url", default=DEFAULT_CASSANDRA_URL,
                   help="Cassandra to use; the keyspace part is replaced by fresh bench keyspaces "
                        f"(default {DEFAULT_CASSANDRA_URL})")
    p.add_argument("--cluster-url", default=CLUSTER_CASSANDRA_URL,
                   help="the cluster of cassandra_cluster, its keyspace replaced likewise "
                        f"(default {CLUSTER_CASSANDRA_URL})")
    p.add_argument("--person-sizes", help="events of the list_person persons (default 100,10000,100000; quick 100,1000,10000)")
    p.add_argument("--read-calls", type=int, help="measured calls per list_person variant (default 200, quick 30)")
    p.add_argument("--baseline", type=Path,
                   help="results.json of the same bench run back to back from a clone of an earlier commit: "
                        "grpc_batch is compared with its grpc_batch")
    a = p.parse_args(argv)

    mode = QUICK if a.quick else FULL
    concurrency = dict(DEFAULT_CONCURRENCY)
    for part in filter(None, a.concurrency.split(",")):
        name, eq, value = part.partition("=")
        if not eq:
            concurrency = dict.fromkeys(concurrency, int(name))
        elif name in concurrency:
            concurrency[name] = int(value)
        else:
            p.error(f"--concurrency: unknown workload {name!r} (one of {', '.join(concurrency)})")
    workloads = [w.strip() for w in a.workloads.split(",") if w.strip()]
    if unknown := set(workloads) - set(WORKLOADS):
        p.error(f"--workloads: unknown {sorted(unknown)} (known: {', '.join(WORKLOADS)})")
    stores = [s.strip() for s in (a.stores or "sqlite,cassandra").split(",") if s.strip()]
    if unknown := set(stores) - set(STORES):
        p.error(f"--stores: unknown {sorted(unknown)} ({', '.join(STORES)})")
    persons = tuple(int(x) for x in a.person_sizes.split(",")) if a.person_sizes else mode["persons"]
    return Settings(
        stores=stores, stores_explicit=a.stores is not None,
        duration=a.duration or mode["duration"], warmup=a.warmup if a.warmup is not None else mode["warmup"],
        concurrency=concurrency, clients=max(1, a.clients), workers=a.workers, gateway_workers=a.gateway_workers,
        cpu_policy=a.cpu_policy, worker_cpu_affinity=a.worker_cpu_affinity, workloads=workloads, out=a.out,
        quick=a.quick, profile=a.profile, cassandra_url=a.cassandra_url, cluster_url=a.cluster_url,
        persons=persons, read_calls=a.read_calls or mode["read_calls"],
        raw_rows={"sqlite": mode["raw_rows"], "cassandra": mode["raw_rows_cassandra"],
                  "cassandra_cluster": mode["raw_rows_cassandra"]},
        baseline=a.baseline,
    )


# Ingest -----------------------------------------------------------------------

@dataclass
class Window:
    """Server CPU inside a measured window (and a py-spy recording when asked)."""

    run: Run
    svc: service_proc.Service
    tag: str
    seconds: float
    store_pids: list[int] = field(default_factory=list)  # a database server's processes (Cassandra)
    cpu_s: float = 0.0
    store_cpu_s: float = 0.0
    by_pid: dict[int, float] = field(default_factory=dict)  # CPU seconds of each service process
    roles: dict[int, str] = field(default_factory=dict)  # pid -> supervisor or one of service_proc.ROLES
    _cpu0: float = 0.0
    _by_pid0: dict[int, float] = field(default_factory=dict)
    _store_cpu0: float = 0.0
    _recording: object = None

    def begin(self) -> None:
        self.roles = self.svc.tree()
        self._by_pid0 = {pid: service_proc.cpu_seconds([pid]) for pid in self.roles}
        self._cpu0 = sum(self._by_pid0.values())
        self._store_cpu0 = service_proc.cpu_seconds(self.store_pids)
        if self.run.settings.profile is not None:
            from bench.pyspy import Recording

            self._recording = Recording(self.roles, self.seconds, self.run.settings.profile, self.tag)

    def end(self) -> None:
        self.by_pid = {pid: service_proc.cpu_seconds([pid]) - cpu0 for pid, cpu0 in self._by_pid0.items()}
        self.cpu_s = sum(self.by_pid.values())
        self.store_cpu_s = service_proc.cpu_seconds(self.store_pids) - self._store_cpu0
        if self._recording is not None:
            from bench.pyspy import summarize

            self._recording.wait()
            for role in service_proc.ROLES:
                files = [f for f, r in self._recording.files.items() if r == role]
                if files:
                    summary = summarize(files)
                    print(f"py-spy {self.tag} {role} ({len(files)} processes):\n{summary}")
                    self.run.notes.append(f"py-spy {self.tag} {role}:\n{summary}")


def ingest_records(run: Run, store: str, workload: str, *, events: int, seconds: float, latencies_sorted: list[float],
                   concurrency: int, client_cpu_s: float, server_cpu_s: float) -> float:
    rate = events / seconds if seconds else 0.0
    run.add(store, workload, "events_per_s", round(rate, 1), "events/s")
    run.add(store, workload, "p50_ms", round(percentile(latencies_sorted, 50), 2), "ms")
    run.add(store, workload, "p99_ms", round(percentile(latencies_sorted, 99), 2), "ms")
    run.add(store, workload, "concurrency", concurrency, "requests in flight")
    run.add(store, workload, "client_cpu", round(client_cpu_s / seconds, 2), "cores")
    run.add(store, workload, "server_cpu", round(server_cpu_s / seconds, 2), "cores")
    print(f"{workload}: {rate:,.0f} events/s, p50 {percentile(latencies_sorted, 50):.1f} ms, "
          f"p99 {percentile(latencies_sorted, 99):.1f} ms; load generator {client_cpu_s / seconds:.2f} cores, "
          f"service {server_cpu_s / seconds:.2f} cores", flush=True)
    return rate


def store_cpu_record(run: Run, store: str, workload: str, window: Window, seconds: float) -> None:
    """The service's CPU by role (and per process: SO_REUSEPORT balance), and the store server's."""
    split = []
    for role in service_proc.ROLES:
        per = [cpu / seconds for pid, cpu in window.by_pid.items() if window.roles.get(pid) == role]
        if per:
            run.add(store, workload, f"{role.replace('-', '_')}s_cpu", round(sum(per), 2), "cores")
            split.append(f"{role}s " + " + ".join(f"{c:.2f}" for c in per))
    print(f"{workload}: service CPU by process (cores): {'; '.join(split)}", flush=True)
    if window.store_pids:
        run.add(store, workload, "store_cpu", round(window.store_cpu_s / seconds, 2), "cores")
        print(f"{workload}: the store's server used {window.store_cpu_s / seconds:.2f} cores", flush=True)


def service_cli(url: str, *args: str) -> str:
    """``python -m service ARGS --store URL``: its output, or WorkloadFailed."""
    done = subprocess.run([sys.executable, "-m", "service", *args, "--store", url], capture_output=True, text=True,
                          timeout=120)
    if done.returncode != 0:
        raise WorkloadFailed(f"service {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout.strip()


def grpc_workload(run: Run, bs: BenchStore, svc: service_proc.Service, workload: str, workdir: Path,
                  acknowledged: list[int], msgid_calls: list[int], key: str | None = None,
                  fault: Fault | None = None) -> None:
    """``msgid_calls``: each client process's calls of grpc_batch_msgid (filled by that
    run), which grpc_batch_replay sends again. ``key``: another workspace's key than
    the bench's own (its events are not the ingest check's). With a ``fault``, the
    fault strikes a quarter into the measured window and is repaired after it (failed
    calls are counted, not fatal)."""
    s, store = run.settings, bs.name
    like = INGEST_OF_FAULT.get(workload, workload)
    method, per_call, payloads = data.grpc_workload(like)
    payloads_file = workdir / f"{workload}.pickle"
    payloads_file.write_bytes(pickle.dumps(payloads))
    concurrency = s.concurrency[like]
    replay = workload == "grpc_batch_replay"
    if replay and len(msgid_calls) != s.clients:
        raise WorkloadFailed("grpc_batch_replay sends grpc_batch_msgid's batches again: run grpc_batch_msgid first")
    jobs = [grpc_load.ClientJob(svc.grpc_target, method, key or svc.key, str(payloads_file), per_call, concurrency,
                                s.warmup,
                                s.duration, offset=k * len(payloads) // s.clients,
                                message_ids=k if workload in ("grpc_batch_msgid", "grpc_batch_replay") else None,
                                replay_calls=msgid_calls[k] if replay else 0)
            for k in range(s.clients)]
    clients = grpc_load.Clients(jobs)
    clients.start()
    # A killed node takes its CPU counters with it: no store CPU for a fault's window.
    window = Window(run, svc, f"{store}-{workload}", s.duration, bs.server_pids() if fault is None else [])
    time.sleep(max(0.0, clients.measure_at - time.monotonic()))
    window.begin()
    if fault is not None:
        time.sleep(s.duration / 4)
        fault.strike()
    time.sleep(max(0.0, clients.end_at - time.monotonic()))
    window.end()
    results = clients.results()
    if fault is not None:
        fault.repair()
    if workload == "grpc_batch_msgid":
        msgid_calls[:] = [r.sequence for r in results]
    if not replay and key is None:  # a replay's events are duplicates: acknowledged, but stored once before
        acknowledged.append(sum(r.acknowledged_events for r in results))
    errors = sum(r.errors for r in results)
    run.add(store, workload, "errors", errors, "calls")
    latencies = sorted(x for r in results for x in r.latencies_ms)
    ingest_records(run, store, workload, events=sum(r.events for r in results), seconds=s.duration,
                   latencies_sorted=latencies, concurrency=concurrency * s.clients,
                   client_cpu_s=sum(r.cpu_s for r in results), server_cpu_s=window.cpu_s)
    store_cpu_record(run, store, workload, window, s.duration)
    if errors and fault is not None:
        first = next(r.first_error for r in results if r.first_error)
        print(f"{workload}: {errors} calls failed during the fault; first: {first}", flush=True)
    elif errors:
        first = next(r.first_error for r in results if r.first_error)
        raise WorkloadFailed(f"{errors} failed calls; first: {first}")
    if not latencies:
        raise WorkloadFailed("no call completed inside the measured window")


def delete_person_workload(run: Run, bs: BenchStore, svc: service_proc.Service, person: data.Person, workdir: Path,
                           acknowledged: list[int]) -> None:
    """DeletePerson of ``person`` while grpc_batch's calls (other persons) run: how long
    it takes, and grpc_batch's rate while it runs next to the rate in the rest of the
    same window (back to back by construction). The delete starts a quarter into the
    window; both rates count the calls that completed in their part."""
    s, store = run.settings, bs.name
    eraser = service_cli(svc.store_url, "keys", "create", "--workspace", data.WORKSPACE, "--scopes", "people:delete")
    method, per_call, payloads = data.grpc_workload("delete_person")
    payloads_file = workdir / "delete_person.pickle"
    payloads_file.write_bytes(pickle.dumps(payloads))
    concurrency = s.concurrency["delete_person"]
    jobs = [grpc_load.ClientJob(svc.grpc_target, method, svc.key, str(payloads_file), per_call, concurrency, s.warmup,
                                s.duration, offset=k * len(payloads) // s.clients) for k in range(s.clients)]
    clients = grpc_load.Clients(jobs)
    clients.start()
    time.sleep(max(0.0, clients.measure_at + s.duration / 4 - time.monotonic()))
    with grpc.insecure_channel(svc.grpc_target) as channel:
        stub = events_pb2_grpc.EventsServiceStub(channel)
        started = time.monotonic()
        reply = stub.DeletePerson(pb.DeletePersonRequest(person_id=person.person_id),
                                  metadata=[("authorization", f"Bearer {eraser}")], timeout=600)
        ended = time.monotonic()
        left = stub.ListPersonEvents(pb.ListPersonEventsRequest(person_id=person.person_id),
                                     metadata=[("authorization", f"Bearer {svc.key}")], timeout=60)
    time.sleep(max(0.0, clients.end_at - time.monotonic()))
    results = clients.results()
    acknowledged.append(sum(r.acknowledged_events for r in results))
    done_at = [t for r in results for t in r.done_at]
    during_s = min(ended, clients.end_at) - started
    outside_s = s.duration - during_s
    during = sum(started <= t <= ended for t in done_at) * per_call
    outside = len(done_at) * per_call - during
    run.add(store, "delete_person", "seconds", round(ended - started, 3), "s")
    run.add(store, "delete_person", "deleted_events", reply.deleted_events, "events")
    run.add(store, "delete_person", "events_per_s_during", round(during / during_s, 1) if during_s > 0 else None,
            "events/s")
    run.add(store, "delete_person", "events_per_s_without", round(outside / outside_s, 1) if outside_s > 0 else None,
            "events/s")
    print(f"delete_person: {reply.deleted_events:,} events deleted in {ended - started:.2f} s; grpc_batch meanwhile "
          f"{during / max(during_s, 1e-9):,.0f} events/s, in the rest of the window "
          f"{outside / max(outside_s, 1e-9):,.0f}" + ("" if ended <= clients.end_at else " (the delete outlasted the window)"),
          flush=True)
    if errors := sum(r.errors for r in results):
        first = next(r.first_error for r in results if r.first_error)
        raise WorkloadFailed(f"{errors} failed grpc_batch calls; first: {first}")
    if reply.deleted_events != person.size or left.total != 0:
        raise WorkloadFailed(f"deleted {reply.deleted_events} of {person.size} events; {left.total} left")


def feed_lag(run: Run, store: str, svc: service_proc.Service) -> None:
    batch = _value(run.records, store, "grpc_batch", "events_per_s")
    if not batch:
        raise WorkloadFailed("feed_lag paces at half of grpc_batch's rate: grpc_batch did not run")
    s = run.settings
    result = feed.measure_lag(svc.grpc_target, svc.key, svc.nats_url, batch / 2, s.warmup, s.duration)
    run.add(store, "feed_lag", "p50_ms", round(result.p50_ms, 2), "ms")
    run.add(store, "feed_lag", "p99_ms", round(result.p99_ms, 2), "ms")
    run.add(store, "feed_lag", "max_ms", round(result.max_ms, 2), "ms")
    run.add(store, "feed_lag", "events_per_s", round(result.rate, 1), "events/s")
    run.add(store, "feed_lag", "missing", result.missing, "events")
    print(f"feed_lag: {result.events:,} events at {result.rate:,.0f} events/s (half of grpc_batch): from "
          f"acknowledgement to a JetStream consumer p50 {result.p50_ms:.1f} ms, p99 {result.p99_ms:.1f} ms, "
          f"max {result.max_ms:.1f} ms; {result.missing} never arrived", flush=True)
    if result.missing:
        raise WorkloadFailed(f"{result.missing} acknowledged events never reached the stream")


def rest_workload(run: Run, bs: BenchStore, svc: service_proc.Service, workload: str, wrk: str, workdir: Path,
                  acknowledged: list[int]) -> None:
    s, store = run.settings, bs.name
    path, per_request, bodies = data.rest_workload(workload)
    bodies_file = workdir / f"{workload}.jsonl"
    bodies_file.write_text("\n".join(bodies) + "\n")
    connections = s.concurrency[workload]
    args = (wrk, svc.http_url, path, bodies_file, svc.key)
    if s.warmup > 0:
        warm = rest_load.timed_wrk(*args, connections=connections, duration_s=s.warmup)
        acknowledged.append(warm.ok_requests * per_request)
    window = Window(run, svc, f"{store}-{workload}", s.duration, bs.server_pids())
    result = rest_load.timed_wrk(*args, connections=connections, duration_s=s.duration, on_start=window.begin)
    window.end()
    acknowledged.append(result.ok_requests * per_request)
    run.add(store, workload, "non_2xx", result.non2xx, "responses")
    run.add(store, workload, "errors", result.not_success + result.socket_errors, "requests")
    # wrk's latency percentiles, from its own histogram of every measured request
    rate = result.ok_requests * per_request / result.duration_s
    run.add(store, workload, "events_per_s", round(rate, 1), "events/s")
    run.add(store, workload, "p50_ms", round(result.p50_ms, 2), "ms")
    run.add(store, workload, "p99_ms", round(result.p99_ms, 2), "ms")
    run.add(store, workload, "concurrency", connections, "requests in flight")
    run.add(store, workload, "client_cpu", round(result.cpu_s / result.duration_s, 2), "cores")
    run.add(store, workload, "server_cpu", round(window.cpu_s / result.duration_s, 2), "cores")
    print(f"{workload}: {rate:,.0f} events/s ({result.requests:,} requests, {result.non2xx} non-2xx, "
          f"{result.not_success} without success, {result.socket_errors} socket errors), p50 {result.p50_ms:.1f} ms, "
          f"p99 {result.p99_ms:.1f} ms; wrk {result.cpu_s / result.duration_s:.2f} cores, "
          f"service {window.cpu_s / result.duration_s:.2f} cores", flush=True)
    store_cpu_record(run, store, workload, window, result.duration_s)
    if result.non2xx or result.not_success or result.socket_errors:
        raise WorkloadFailed(f"{result.non2xx} non-2xx, {result.not_success} without success, "
                             f"{result.socket_errors} socket errors; first bad response: {result.first_bad}")
    if result.requests == 0:
        raise WorkloadFailed("no request completed")


INGEST_OF_FAULT = {NODE_KILL: "grpc_batch"}  # a fault workload sends what this ingest workload sends


@dataclass
class Fault:
    """Something done to the store in the middle of a measured window, and undone after it."""

    strike: Callable[[], None]
    repair: Callable[[], None]


def node_kill(run: Run, bs: CassandraClusterBench, n: int) -> Fault:
    started: list[float] = []

    def strike() -> None:
        bs.node("kill", n)
        started.append(time.monotonic())
        print(f"{NODE_KILL}: SIGKILLed node {n}", flush=True)

    def repair() -> None:
        bs.node("start", n)
        run.add(bs.name, NODE_KILL, "node_down_s", round(time.monotonic() - started[0], 1), "s")
        print(f"{NODE_KILL}: node {n} is back after {time.monotonic() - started[0]:.0f} s", flush=True)

    return Fault(strike, repair)


# One store --------------------------------------------------------------------

def run_store(run: Run, bs: BenchStore, wrk: str | None) -> None:
    s = run.settings
    store = bs.name
    wanted = set(s.workloads)

    raws: list[RawResult] = []

    def raw(when: str) -> None:
        rows = data.stored_rows(s.raw_rows[store])
        result = bs.raw_insert(rows, max_seconds=s.duration)
        raws.append(result)
        run.add(store, "raw_store_insert", f"events_per_s_{when}", round(result.events_per_s, 1), "events/s")
        print(f"raw_store_insert {when}: {result.events:,} events ({result.events * result.rows_per_event:,.0f} rows) in "
              f"{result.seconds:.2f} s: {result.events_per_s:,.0f} events/s; loader "
              f"{result.client_cpu_s / result.seconds:.2f} cores"
              + (f", store server {result.store_cpu_s / result.seconds:.2f} cores" if bs.server_pids() else ""),
              flush=True)

    def raw_bracket(between: Callable[[], None]) -> None:
        """The raw insert right before and right after ``between`` (RAW_BRACKETS' run), so that
        the limit and the service see the store as it is then: a Cassandra node's own
        rate moves over minutes (compactions, the commit log, the JVM). The limit is both
        together: their events over their seconds."""
        if "raw_store_insert" not in wanted:
            between()
            return
        run.attempt(store, "raw_store_insert (before)", lambda: raw("before"))
        between()
        if run.attempt(store, "raw_store_insert (after)", lambda: raw("after")) and len(raws) == 2:
            events, seconds = sum(r.events for r in raws), sum(r.seconds for r in raws)
            run.add(store, "raw_store_insert", "events_per_s", round(events / seconds, 1), "events/s")
            run.add(store, "raw_store_insert", "events", events, "events")
            run.add(store, "raw_store_insert", "client_cpu", round(sum(r.client_cpu_s for r in raws) / seconds, 2),
                    "cores")
            if bs.server_pids():
                run.add(store, "raw_store_insert", "store_cpu", round(sum(r.store_cpu_s for r in raws) / seconds, 2),
                        "cores")
            print(f"raw_store_insert: {events / seconds:,.0f} events/s before and after together", flush=True)

    service_workloads = [w for w in WORKLOADS if w != "raw_store_insert" and w in wanted]
    if not service_workloads:
        raw_bracket(lambda: None)
        return
    url = bs.service_url()
    persons = [data.person(n) for n in s.persons] if wanted & {"list_person", "aggregates"} else []
    svc: service_proc.Service | None = None
    nats_dir = tempfile.mkdtemp(prefix="flameup-bench-nats-")  # the feed's stream, kept across restarts

    def serve(*extra_args: str) -> service_proc.Service:
        return service_proc.start(url, workers=s.workers, gateway_workers=s.gateway_workers, cpu_policy=s.cpu_policy,
                                  worker_cpu_affinity=s.worker_cpu_affinity, nats_data_dir=nats_dir,
                                  extra_args=extra_args)
    counts_end = aggregates.range_end(data.domain.now_us())  # the small workspace's events end there
    small_rows = aggregates.small_workspace_rows(counts_end) if "aggregates" in wanted else []
    small_key = ""

    def start() -> None:
        nonlocal svc, small_key
        if persons:
            t0 = time.perf_counter()
            rows = [r for p in persons for r in p.rows]
            asyncio.run(bs.load(url, rows))
            print(f"loaded the list_person persons ({', '.join(p.label for p in persons)} events: {len(rows):,} rows) "
                  f"through the store's append in {time.perf_counter() - t0:.1f} s", flush=True)
        if small_rows:
            asyncio.run(bs.load(url, small_rows))
            small_key = asyncio.run(bs.create_key(url, aggregates.SMALL_WORKSPACE))
        svc = serve()
        print(f"service up: gRPC {svc.grpc_target}, REST {svc.http_url}, store {url}", flush=True)

    if not run.attempt(store, "service start", start):
        for w in service_workloads:
            run.failures.append(f"{store} {w}: not run (the service did not start)")
        return

    acknowledged: list[int] = []
    msgid_calls: list[int] = []
    try:
        with tempfile.TemporaryDirectory(prefix="flameup-bench-load-") as workdir:
            def limited_key() -> str:
                key = service_cli(url, "keys", "create", "--workspace", LIMITED_WORKSPACE, "--scopes", "events:write")
                service_cli(url, "workspaces", "limit", LIMITED_WORKSPACE, "--events-per-second", str(FAR_ABOVE_LOAD),
                            "--burst", str(FAR_ABOVE_LOAD))
                return key

            def ingest(workload: str) -> None:
                if workload == "grpc_batch_limited":
                    run.attempt(store, workload, lambda: grpc_workload(run, bs, svc, workload, Path(workdir),
                                                                       acknowledged, msgid_calls, limited_key()))
                elif workload.startswith("grpc"):
                    run.attempt(store, workload, lambda: grpc_workload(run, bs, svc, workload, Path(workdir),
                                                                       acknowledged, msgid_calls))
                else:
                    run.attempt(store, workload, lambda: rest_workload(run, bs, svc, workload, wrk, Path(workdir),
                                                                       acknowledged))

            def feed_workloads() -> None:
                """grpc_batch with --feed off, the lag at half of grpc_batch's rate, the drain of a backlog."""
                nonlocal svc
                off_acked = 0
                first_seq = feed.last_seq(svc.nats_url) + 1  # the backlog goes on the stream from here
                if "grpc_batch_feed_off" in wanted:
                    service_proc.stop(svc)
                    off = svc = serve("--feed", "off")
                    before = sum(acknowledged)
                    try:
                        ingest("grpc_batch_feed_off")
                    finally:
                        service_proc.stop(off)
                    off_acked = sum(acknowledged) - before  # stored, not yet published: the drain's backlog
                    svc = serve()
                if "feed_drain" in wanted:  # first: the feed-off run's events are part of its backlog
                    run.attempt(store, "feed_drain", lambda: feed_drain(off_acked, first_seq))
                if "feed_lag" in wanted:
                    run.attempt(store, "feed_lag", lambda: feed_lag(run, store, svc))

            def feed_drain(off_acked: int, first_seq: int) -> None:
                nonlocal svc
                backlog = DRAIN_BACKLOG[store] // (10 if s.quick else 1)
                service_proc.stop(svc)
                t0 = time.perf_counter()
                loaded = max(0, backlog - off_acked)
                for i in range(0, loaded, 100_000):  # the store's own append, a chunk at a time
                    asyncio.run(bs.load(url, data.stored_rows(min(100_000, loaded - i))))
                acknowledged.append(loaded)
                print(f"feed_drain: a backlog of {off_acked + loaded:,} unpublished events ({loaded:,} loaded through "
                      f"the store's append in {time.perf_counter() - t0:.1f} s)", flush=True)
                svc = serve()
                result = feed.measure_drain(svc.nats_url, svc.grpc_target, svc.key, first_seq)
                run.add(store, "feed_drain", "events_per_s", round(result.events_per_s, 1), "events/s")
                run.add(store, "feed_drain", "events", result.events, "events")
                run.add(store, "feed_drain", "backlog", off_acked + loaded, "events")
                batch = _value(run.records, store, "grpc_batch", "events_per_s")
                print(f"feed_drain: {result.events:,} events published in {result.seconds:.1f} s: "
                      f"{result.events_per_s:,.0f} events/s"
                      + (f" ({result.events_per_s / batch:.2f}x grpc_batch)" if batch else ""), flush=True)

            for workload in INGEST:
                step = (lambda w=workload: ingest(w)) if workload in wanted else (lambda: None)
                if workload == RAW_BRACKETS:
                    raw_bracket(step)
                    if "grpc_batch_limited" in wanted:
                        ingest("grpc_batch_limited")  # right after it, back to back
                    feed_workloads()
                elif workload != "grpc_batch_limited":
                    step()

        if "service_rss_mb" in wanted:
            def rss() -> None:
                tree = svc.tree()
                by_role: dict[str, float] = {}
                for pid, role in tree.items():
                    by_role[role] = by_role.get(role, 0.0) + service_proc.rss_mb(pid)
                total = sum(by_role.values())
                run.add(store, "service_rss_mb", "rss_mb", round(total, 1), "MB")
                for role, mb in sorted(by_role.items()):
                    run.add(store, "service_rss_mb", f"{role.replace('-', '_')}_mb", round(mb, 1), "MB")
                run.add(store, "service_rss_mb", "processes", len(tree), "processes")
                print(f"service RSS after the ingest runs: {total:.0f} MB in {len(tree)} processes ("
                      + ", ".join(f"{r} {mb:.0f} MB" for r, mb in sorted(by_role.items())) + ")", flush=True)
            run.attempt(store, "service_rss_mb", rss)

        for p in persons:
            def read(p=p) -> None:
                for r in reads.measure(svc.grpc_target, svc.key, p, s.read_calls):
                    run.add(store, r.workload, "p50_ms", round(r.p50_ms, 2), "ms")
                    run.add(store, r.workload, "p99_ms", round(r.p99_ms, 2), "ms")
                    run.add(store, r.workload, "first_ms", round(r.first_ms, 2), "ms")
                    run.add(store, r.workload, "total", r.total, "events")
                    print(f"{r.workload}: p50 {r.p50_ms:.2f} ms, p99 {r.p99_ms:.2f} ms "
                          f"({r.calls} sequential calls, total {r.total:,}); the first call {r.first_ms:.2f} ms",
                          flush=True)
            if "list_person" in wanted:
                run.attempt(store, f"list_person_{p.label}", read)
        if persons and "list_person" in wanted:
            def cursor(p=persons[-1]) -> None:
                for r in reads.measure_cursor(svc.grpc_target, svc.key, p, s.read_calls):
                    run.add(store, r.workload, "p50_ms", round(r.p50_ms, 2), "ms")
                    run.add(store, r.workload, "p99_ms", round(r.p99_ms, 2), "ms")
                    run.add(store, r.workload, "first_ms", round(r.first_ms, 2), "ms")
                    run.add(store, r.workload, "page", 1 if r.workload.endswith("page1") else r.page, "page")
                    print(f"{r.workload}: p50 {r.p50_ms:.2f} ms, p99 {r.p99_ms:.2f} ms ({r.calls} sequential calls, "
                          f"limit {reads.CURSOR_LIMIT}, page {1 if r.workload.endswith('page1') else r.page})",
                          flush=True)
            run.attempt(store, f"list_person_{persons[-1].label}_cursor", cursor)

        def record_reads(results: list[reads.ReadResult]) -> None:
            for r in results:
                run.add(store, r.workload, "p50_ms", round(r.p50_ms, 2), "ms")
                run.add(store, r.workload, "p99_ms", round(r.p99_ms, 2), "ms")
                run.add(store, r.workload, "first_ms", round(r.first_ms, 2), "ms")
                print(f"{r.workload}: p50 {r.p50_ms:.2f} ms, p99 {r.p99_ms:.2f} ms ({r.calls} sequential calls); "
                      f"the first call {r.first_ms:.2f} ms", flush=True)

        if "aggregates" in wanted:
            run.attempt(store, "person_summary", lambda: record_reads(
                aggregates.measure_summaries(svc.grpc_target, svc.key, persons, s.read_calls)))
            run.attempt(store, "event_counts", lambda: record_reads(
                aggregates.measure_counts(svc.grpc_target, svc.key, "big", counts_end, s.read_calls)
                + aggregates.measure_counts(svc.grpc_target, small_key, "small", counts_end, s.read_calls,
                                            small_rows)))

        if NODE_KILL in wanted and isinstance(bs, CassandraClusterBench):
            with tempfile.TemporaryDirectory(prefix="flameup-bench-load-") as workdir:
                fault = node_kill(run, bs, KILLED_NODE)
                run.attempt(store, NODE_KILL, lambda: grpc_workload(run, bs, svc, NODE_KILL, Path(workdir),
                                                                    acknowledged, [], fault=fault))
        if "delete_person" in wanted:  # last: it deletes the biggest list_person person
            if persons:
                with tempfile.TemporaryDirectory(prefix="flameup-bench-delete-") as workdir:
                    run.attempt(store, "delete_person", lambda: delete_person_workload(
                        run, bs, svc, persons[-1], Path(workdir), acknowledged))
            else:
                run.failures.append(f"{store} delete_person: not run (it deletes the biggest list_person person)")
    finally:
        code = service_proc.stop(svc)
        if code != 0:
            run.failures.append(f"{store}: the service exited with {code} on SIGTERM:\n{svc.tail()}")
            print(f"FAILED: the service exited with {code} on SIGTERM:\n{svc.tail()}")

    if acknowledged:
        def check() -> None:
            acked = sum(acknowledged)
            person_ids = sorted({data.domain.person_id_for(data.WORKSPACE, f"user_{u:05d}") for u in range(data.USERS)})
            stored = asyncio.run(bs.totals(url, data.WORKSPACE, person_ids))
            run.add(store, "ingest_check", "acknowledged_events", acked, "events")
            run.add(store, "ingest_check", "stored_events", stored, "events")
            print(f"acknowledged {acked:,} events, the store holds {stored:,} (in-flight requests cut at the end of a "
                  f"run may add a few)", flush=True)
            if stored < acked:
                raise WorkloadFailed(f"only {stored} of {acked} acknowledged events are stored")
        run.attempt(store, "ingest_check", check)


# Targets and table ------------------------------------------------------------

def _value(records: list[Record], store: str, workload: str, metric: str):
    return next((r.value for r in records if (r.store, r.workload, r.metric) == (store, workload, metric)), None)


def targets(records: list[Record], stores: list[str], person_labels: list[str],
            baseline_batch: dict[str, float] | None = None) -> list[tuple]:
    """(store, workload, metric, measured, op, target, description) for the targets;
    ``baseline_batch``: grpc_batch events/s per store of the baseline run (--baseline)."""
    out = []
    for store in stores:
        for interval, _, _ in aggregates.RANGES:
            base = _value(records, store, f"event_counts_{interval}_small", "p50_ms")
            out.append((store, f"event_counts_{interval}_big", "p50_ms",
                        _value(records, store, f"event_counts_{interval}_big", "p50_ms"), "<=",
                        None if base is None else 2 * base, f"<= 2x event_counts_{interval}_small"))
        if store == "sqlite":
            for workload, floor in (("grpc_batch", 50_000), ("rest_batch", 20_000), ("grpc_track", 5_000),
                                    ("rest_track", 2_500)):
                out.append((store, workload, "events_per_s", _value(records, store, workload, "events_per_s"),
                            ">=", floor, f">= {floor:,} events/s"))
                out.append((store, workload, "p99_ms", _value(records, store, workload, "p99_ms"), "<", 50,
                            "p99 < 50 ms"))
        # message_ids cost at most this share of grpc_batch (run back to back); a replay of
        # the same batches (all duplicates) is at least as fast as their first send on SQLite
        plain = _value(records, store, "grpc_batch", "events_per_s")
        with_ids = _value(records, store, "grpc_batch_msgid", "events_per_s")
        floor = 0.8 if store == "sqlite" else 0.5
        out.append((store, "grpc_batch_msgid", "share_of_plain",
                    None if plain is None or with_ids is None else with_ids / plain, ">=", floor,
                    f">= {floor:.2f} of grpc_batch"))
        if store == "sqlite":
            replay = _value(records, store, "grpc_batch_replay", "events_per_s")
            out.append((store, "grpc_batch_replay", "share_of_first",
                        None if replay is None or with_ids is None else replay / with_ids, ">=", 1.0,
                        ">= 1.00 of grpc_batch_msgid"))
        # an ingest limit far above the load costs no measurable throughput (run back to back)
        limited = _value(records, store, "grpc_batch_limited", "events_per_s")
        out.append((store, "grpc_batch_limited", "share_of_plain",
                    None if plain is None or limited is None else limited / plain, ">=", 0.95,
                    ">= 0.95 of grpc_batch"))
        # deleting the biggest person leaves other persons' ingest most of its rate
        during = _value(records, store, "delete_person", "events_per_s_during")
        without = _value(records, store, "delete_person", "events_per_s_without")
        out.append((store, "delete_person", "share_while_deleting",
                    None if not during or not without else during / without, ">=", 0.8,
                    ">= 0.80 of grpc_batch without it"))
        if store == "cassandra":
            raw = _value(records, store, "raw_store_insert", "events_per_s")
            batch = _value(records, store, "grpc_batch", "events_per_s")
            out.append((store, "grpc_batch", "share_of_raw", None if raw is None or batch is None else batch / raw,
                        ">=", 0.8, ">= 0.80 of raw_store_insert"))
        if baseline_batch and store in baseline_batch:
            batch = _value(records, store, "grpc_batch", "events_per_s")
            out.append((store, "grpc_batch", "share_of_baseline", None if batch is None else batch /
                        baseline_batch[store], ">=", 0.85, ">= 0.85 of the baseline's"))
        if person_labels:
            small, big = person_labels[0], person_labels[-1]
            base = _value(records, store, f"person_summary_{small}", "p50_ms")
            out.append((store, f"person_summary_{big}", "p50_ms", _value(records, store, f"person_summary_{big}",
                                                                          "p50_ms"),
                        "<=", None if base is None else 2 * base, f"<= 2x person_summary_{small}"))
            limit = 5 if store == "sqlite" else 20
            for label in person_labels:
                out.append((store, f"person_summary_{label}", "p50_ms",
                            _value(records, store, f"person_summary_{label}", "p50_ms"), "<", limit,
                            f"p50 < {limit} ms"))
            for variant in ("", "_event", "_window"):
                base = _value(records, store, f"list_person_{small}{variant}", "p50_ms")
                out.append((store, f"list_person_{big}{variant}", "p50_ms",
                            _value(records, store, f"list_person_{big}{variant}", "p50_ms"), "<=",
                            None if base is None else 2 * base, f"<= 2x list_person_{small}{variant}"))
                if store == "sqlite":
                    for label in person_labels:
                        out.append((store, f"list_person_{label}{variant}", "p50_ms",
                                    _value(records, store, f"list_person_{label}{variant}", "p50_ms"), "<", 10,
                                    "p50 < 10 ms"))
        if person_labels:  # a deep page by token costs what the first one does
            big = person_labels[-1]
            first = _value(records, store, f"list_person_{big}_cursor_page1", "p50_ms")
            out.append((store, f"list_person_{big}_cursor_deep", "p50_ms",
                        _value(records, store, f"list_person_{big}_cursor_deep", "p50_ms"), "<=",
                        None if first is None else 2 * first, f"<= 2x list_person_{big}_cursor_page1"))
        # The feed: lag at half of grpc_batch's rate, the drain next to grpc_batch, ingest with it on and off.
        out.append((store, "feed_lag", "p99_ms", _value(records, store, "feed_lag", "p99_ms"), "<",
                    250 if store == "sqlite" else 1000, "p99 < 250 ms" if store == "sqlite" else "p99 < 1 s"))
        batch = _value(records, store, "grpc_batch", "events_per_s")
        drain = _value(records, store, "feed_drain", "events_per_s")
        floor = 0.5 if store == "sqlite" else 1.0
        out.append((store, "feed_drain", "share_of_grpc_batch", None if batch is None or drain is None else drain / batch,
                    ">=", floor, f">= {floor:.2f} of grpc_batch"))
        if store == "sqlite":
            off = _value(records, store, "grpc_batch_feed_off", "events_per_s")
            out.append((store, "grpc_batch", "share_of_feed_off", None if batch is None or off is None else batch / off,
                        ">=", 0.9, ">= 0.90 of grpc_batch_feed_off"))
        # every process serve starts, nats-server and the publisher included
        out.append((store, "service_rss_mb", "rss_mb", _value(records, store, "service_rss_mb", "rss_mb"), "<", 400,
                    "< 400 MB"))
    return out


def print_table(run: Run) -> None:
    recs = run.records
    print("\nResults" + (" (QUICK mode: short runs, smaller persons; not comparable with full runs)"
                         if run.settings.quick else ""))
    header = f"{'store':9} {'workload':28} {'events/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'in flight':>9} " \
             f"{'client cores':>12} {'server cores':>12} {'store cores':>11}"
    print(header)
    print("-" * len(header))
    seen = []
    for r in recs:
        key = (r.store, r.workload)
        if key not in seen and r.workload not in ("meta", "service_rss_mb", "ingest_check"):
            seen.append(key)

    def fmt(v, spec: str, width: int) -> str:
        return format(v, f">{width}{spec}") if isinstance(v, (int, float)) else "-".rjust(width)

    for store, workload in seen:
        get = lambda m: _value(recs, store, workload, m)  # noqa: E731
        print(f"{store:9} {workload:28} {fmt(get('events_per_s'), ',.0f', 10)} {fmt(get('p50_ms'), '.2f', 8)} "
              f"{fmt(get('p99_ms'), '.2f', 8)} {fmt(get('concurrency'), '', 9)} {fmt(get('client_cpu'), '.2f', 12)} "
              f"{fmt(get('server_cpu'), '.2f', 12)} {fmt(get('store_cpu'), '.2f', 11)}")
    for r in recs:
        if r.workload in ("service_rss_mb", "ingest_check"):
            print(f"{r.store:9} {r.workload + ' ' + r.metric:40} {r.value:>12,} {r.unit}")

    labels = sorted({r.workload.split("_")[2] for r in recs if r.workload.startswith("list_person_")},
                    key=lambda x: int(x[:-1]) * 1000 if x.endswith("k") else int(x))
    baseline = None
    if run.settings.baseline is not None:
        base_records = json.loads(run.settings.baseline.read_text())
        baseline = {r["store"]: r["value"] for r in base_records
                    if r["workload"] == "grpc_batch" and r["metric"] == "events_per_s"}
    rows = targets(recs, sorted({r.store for r in recs if r.store}, key=lambda x: x != "sqlite"), labels, baseline)
    print("\nTargets; ratio = measured / target")
    for store, workload, metric, measured, op, target, text in rows:
        if measured is None or target is None:
            print(f"  {store:9} {workload:26} {metric:13} {'not measured':>12}   target {text}")
            continue
        met = measured >= target if op == ">=" else measured <= target if op == "<=" else measured < target
        print(f"  {store:9} {workload:26} {metric:13} {measured:>12,.2f}   target {text:26} "
              f"ratio {measured / target:5.2f}  {'met' if met else 'MISSED'}")


def cluster_ratios(run: Run) -> None:
    """The cluster's numbers over the single node's of the same run (the cost of replication
    factor 3 and quorum when the three nodes share one machine), and p99 during a node kill."""
    recs = run.records
    if not any(r.store == "cassandra_cluster" for r in recs):
        return
    pairs = [("grpc_batch", "events_per_s"), ("grpc_batch", "p99_ms")]
    pairs += sorted({(r.workload, "p50_ms") for r in recs if r.workload.startswith("list_person_")})
    print("\nThe cluster (3 nodes on this machine, RF 3, LOCAL_QUORUM) next to the single node; "
          "ratio = cluster / single")
    for workload, metric in pairs:
        single = _value(recs, "cassandra", workload, metric)
        cluster = _value(recs, "cassandra_cluster", workload, metric)
        if single and cluster is not None:
            run.add("cassandra_cluster", "cluster_over_single", f"{workload}_{metric}", round(cluster / single, 2),
                    "ratio")
            print(f"  {workload:26} {metric:13} single {single:>10,.2f}  cluster {cluster:>10,.2f}  "
                  f"ratio {cluster / single:5.2f}")
    steady, killed = (_value(recs, "cassandra_cluster", w, "p99_ms") for w in ("grpc_batch", NODE_KILL))
    if steady and killed is not None:
        run.add("cassandra_cluster", "cluster_over_single", "node_kill_p99_over_steady", round(killed / steady, 2),
                "ratio")
        errors = _value(recs, "cassandra_cluster", NODE_KILL, "errors")
        print(f"  {NODE_KILL:26} p99_ms        steady {steady:>10,.2f}  killed {killed:>10,.2f}  "
              f"ratio {killed / steady:5.2f}  ({errors} failed calls)")


def meta_records(run: Run) -> None:
    s = run.settings
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=BENCH_DIR.parent, capture_output=True,
                                text=True, timeout=10).stdout.strip()
    except OSError:
        commit = ""
    for metric, value, unit in (
        ("quick", int(s.quick), "bool"),
        ("duration_s", s.duration, "s"),
        ("warmup_s", s.warmup, "s"),
        ("grpc_client_processes", s.clients, "processes"),
        ("grpc_workers", s.workers, "processes"),
        ("gateway_workers", s.gateway_workers, "processes"),
        ("service_cpu_policy", s.cpu_policy, "text"),
        ("worker_cpu_affinity", s.worker_cpu_affinity, "text"),
        ("load_generator_cpu_policy", LOAD_GENERATOR_CPU_POLICY, "text"),
        ("list_person_calls", s.read_calls, "calls"),
        ("list_person_limit", reads.LIMIT, "events"),
        ("cpus", os.cpu_count(), "cores"),
        ("machine", f"{platform.machine()} {_cpu_model()}, {_mem_gib():.0f} GiB, Python {platform.python_version()}",
         "text"),
        ("commit", commit, "text"),
    ):
        run.add("", "meta", metric, value, unit)
    for workload, n in s.concurrency.items():
        run.add("", "meta", f"concurrency_{workload}", n * (s.clients if workload.startswith("grpc") else 1),
                "requests in flight")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _mem_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    return 0.0


# Main ---------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    s = parse_args(argv)
    set_cpu_policy(LOAD_GENERATOR_CPU_POLICY)
    run = Run(s)
    started = time.monotonic()
    print(f"Flameup Events benchmark ({'QUICK: a few seconds per workload, persons of ' if s.quick else 'persons of '}"
          f"{', '.join(f'{n:,}' for n in s.persons)} events): duration {s.duration:g} s after {s.warmup:g} s warm-up, "
          f"{s.clients} gRPC client processes, service with {s.workers} gRPC + {s.gateway_workers} gateway workers"
          f" (CPU policy {s.cpu_policy}, worker CPU affinity {s.worker_cpu_affinity})",
          flush=True)
    wrk = None
    if any(w.startswith("rest_") for w in s.workloads):
        wrk = rest_load.ensure_wrk()

    stores: list[BenchStore] = []
    for name in s.stores:
        if name == "sqlite":
            stores.append(SqliteBench())
            continue
        kind, url = ((CassandraBench, s.cassandra_url) if name == "cassandra"
                     else (CassandraClusterBench, s.cluster_url))
        reason = kind.unavailable_reason(url)
        if reason is None:
            stores.append(kind(url))
        elif s.stores_explicit:
            message = f"{name}: SKIPPED, {reason}"
            print(message, flush=True)
            run.notes.append(message)
            if os.environ.get("CI") == "true":  # a store asked for in CI must run, never silently pass
                run.failures.append(message)
        else:
            print(f"{name}: not benchmarked ({reason})", flush=True)

    meta_records(run)
    for bs in stores:
        try:
            run_store(run, bs, wrk)
        finally:
            bs.cleanup()

    print_table(run)
    cluster_ratios(run)
    s.out.parent.mkdir(parents=True, exist_ok=True)
    s.out.write_text(json.dumps([r.as_dict() for r in run.records], indent=1) + "\n")
    print(f"\nwrote {s.out} ({len(run.records)} records) in {time.monotonic() - started:.0f} s")
    for note in run.notes:
        if note.startswith("cassandra"):
            print(note)
    if run.failures:
        print(f"\n{len(run.failures)} workload(s) FAILED:")
        for f in run.failures:
            print(f"  - {f}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
