"""The life of one worker process: dying with its parent, freezing the start-up heap."""

from __future__ import annotations

import gc
import os
import signal
import sys

PARENT_PID_ENV = "FLAMEUP_PARENT_PID"


def exit_with_parent() -> None:
    """This process dies with the one that started it, even when that one is
    killed with SIGKILL. The starter names itself in FLAMEUP_PARENT_PID;
    without it (a process started by hand), or off Linux, this does nothing."""
    if sys.platform != "linux" or PARENT_PID_ENV not in os.environ:
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != int(os.environ[PARENT_PID_ENV]):  # the parent died before prctl
        os.kill(os.getpid(), signal.SIGTERM)


def freeze_startup_heap() -> None:
    """For a worker that starts to serve: what start-up built (modules, protobuf
    descriptors, the app) leaves the garbage collector's view.

    A full collection walks every object the collector tracks, and a gateway
    or gRPC worker holds tens of thousands of them after start-up: unfrozen,
    each full collection pauses the process for tens of milliseconds while
    its requests in flight wait; frozen, those objects are skipped and a
    collection takes a few milliseconds at most. (The collector does keep
    running: grpc.aio's server leaves a reference cycle of 6 objects behind on
    every call.) See docs/decisions/worker-runtime.md.
    """
    gc.collect()  # start-up's own garbage is freed, not frozen
    gc.freeze()
