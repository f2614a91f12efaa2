"""The CPU a process runs on and how the kernel schedules it.

``serve`` sets its policy before it starts anything (every process inherits
it) and gives gRPC worker i the i-th CPU; the benchmark's load generators use
the same helpers.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("flameup.procutil")

CPU_POLICIES = ("batch", "normal")
DEFAULT_CPU_POLICY = "batch"


def set_cpu_policy(policy: str) -> None:
    """The Linux scheduling policy of this process, which every process it starts inherits.

    "batch" is SCHED_BATCH: the kernel shares the CPUs as fairly as for any
    process, but a thread of ours that wakes up (an answer arrived; grpc.aio's
    completion-queue poller thread has work for the event loop) does not
    preempt the thread running on that CPU: it runs on an idle CPU, or when
    the running thread blocks or its slice ends. When every CPU is busy that
    saves context switches: under SCHED_OTHER a gRPC worker's event-loop
    thread is preempted about twice per single-event call. With an idle CPU
    at hand a woken thread runs at once, under either policy. "normal"
    (SCHED_OTHER) is every process's default: choose it when the service
    shares its CPUs with interactive work that must not wait behind it. Where
    the platform has no such policy this does nothing.
    See docs/decisions/cpu-scheduling-policy.md.
    """
    if policy not in CPU_POLICIES:
        raise ValueError(f"cpu policy must be one of {', '.join(CPU_POLICIES)}, got {policy!r}")
    if not hasattr(os, "SCHED_BATCH"):
        return
    try:
        # pid 0: the calling thread; threads and processes it starts later inherit it
        os.sched_setscheduler(0, os.SCHED_BATCH if policy == "batch" else os.SCHED_OTHER, os.sched_param(0))
    except OSError as exc:  # e.g. a seccomp profile that forbids it: run as we are
        log.warning("cannot set the CPU policy %s: %s", policy, exc)


WORKER_CPU_AFFINITIES = ("auto", "off")
DEFAULT_WORKER_CPU_AFFINITY = "auto"


def worker_cpus(count: int, affinity: str) -> list[int | None]:
    """The CPU each of ``count`` gRPC workers keeps to: with "auto", worker i
    runs on the i-th CPU this process may use (round robin past the last);
    with "off", or where the platform cannot tell, each goes where the kernel
    puts it (None).

    A gRPC worker is an event loop thread plus grpc's own threads (its
    completion-queue poller and EventEngine threads), which hand every call to
    one another. On one CPU such a hand-off is a local wake-up with warm
    caches; across CPUs it takes an inter-processor interrupt and moves the
    call's data between caches. The gateways and the SQLite writer are left
    to the kernel: pinning the gateway as well gains nothing measurable.
    See docs/decisions/worker-cpu-affinity.md.
    """
    if affinity not in WORKER_CPU_AFFINITIES:
        raise ValueError(f"worker cpu affinity must be one of {', '.join(WORKER_CPU_AFFINITIES)}, got {affinity!r}")
    if affinity == "off" or not hasattr(os, "sched_getaffinity"):
        return [None] * count
    cpus = sorted(os.sched_getaffinity(0))
    return [cpus[i % len(cpus)] for i in range(count)]


def keep_to_cpu(cpu: int) -> None:
    """Run this process on ``cpu`` only: called by a worker before it starts any
    thread, so that every thread it starts later inherits the same mask."""
    try:
        os.sched_setaffinity(0, {cpu})
    except OSError as exc:  # the CPU went away, or a cgroup forbids it: run where the kernel says
        log.warning("cannot keep to CPU %d: %s", cpu, exc)
