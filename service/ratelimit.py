"""Per-workspace token buckets shared by every process of one ``serve`` instance.

The buckets live in a small file (``serve`` puts it in its private run
directory; a lone worker uses an unlinked temporary file), mapped into every
gRPC worker's memory. A call takes the file's lock (``flock``), refills the
workspace's bucket by the time passed since its last use, takes the events it
brings or reports how long to wait, and unlocks: a few microseconds, paid only
by workspaces that have a limit. The clock is CLOCK_MONOTONIC, one clock for
every process of the machine. Why this design: docs/decisions/rate-limits.md.

A slot: the workspace id (UTF-8, NUL-padded), the tokens left and when they
were counted. Slots are found by open addressing from a CRC of the id; when
every slot is taken (more limited workspaces than slots), a workspace shares
its home slot, which only makes its limit stricter.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import tempfile
import time
import zlib

from service.domain import RateLimit

_SLOT = struct.Struct("<64sdd")  # workspace id, tokens, counted at (monotonic seconds)
SLOTS = 4096
FILE_BYTES = _SLOT.size * SLOTS


class SharedBuckets:
    """Token buckets in a file that several processes map; see the module docstring."""

    def __init__(self, path: str | None = None) -> None:
        if path is None:
            handle = tempfile.TemporaryFile()
            self._fd = os.dup(handle.fileno())
            handle.close()
        else:
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        if os.fstat(self._fd).st_size < FILE_BYTES:
            os.ftruncate(self._fd, FILE_BYTES)  # zeros: every slot empty
        self._map = mmap.mmap(self._fd, FILE_BYTES)

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)

    def take(self, workspace_id: str, events: int, limit: RateLimit) -> float:
        """Admit ``events`` now (0.0) or say how many seconds until they would be.

        A call is admitted whole or not at all. It needs as many tokens as it
        brings, or a full bucket when it brings more than the burst (the bucket
        then goes below zero and the workspace waits for it to refill).
        """
        key = workspace_id.encode()
        need = min(events, limit.burst)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            offset = self._slot(key)
            now = time.monotonic()
            stored, tokens, counted_at = _SLOT.unpack_from(self._map, offset)
            if stored.rstrip(b"\0") != key:
                tokens = float(limit.burst)
            else:
                tokens = min(float(limit.burst), tokens + (now - counted_at) * limit.events_per_second)
            wait = 0.0
            if tokens >= need:
                tokens -= events
            else:
                wait = (need - tokens) / limit.events_per_second
            _SLOT.pack_into(self._map, offset, key, tokens, now)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        return wait

    def _slot(self, key: bytes) -> int:
        home = zlib.crc32(key) % SLOTS
        for i in range(SLOTS):
            offset = ((home + i) % SLOTS) * _SLOT.size
            stored = self._map[offset : offset + 64].rstrip(b"\0")
            if stored == key or not stored:
                return offset
        return home * _SLOT.size
