"""What message_ids cost the SQLite engine's group commit, the writer process's work alone.

    .venv/bin/python -m bench.dedup_commit [--events 200000] [--group 1000]

Commits the benchmark's rows in groups, as the writer process does (commit,
then the merge step), into a fresh database: once without message_ids, once
with a random UUID on every event, twice each, and prints the writer thread's
CPU per event (docs/idempotent-ingest.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
import uuid

from bench import data
from service.store.sqlite_engine import GroupCommitter, SqliteFile


def commit_cpu_us(rows: list, group: int) -> float:
    with tempfile.TemporaryDirectory(prefix="flameup-dedup-") as tmp:
        db = SqliteFile(f"{tmp}/events.db")
        db.migrate()
        committer = GroupCommitter(db)
        committer.open()
        try:
            started = time.thread_time()
            for i in range(0, len(rows), group):
                committer.commit(rows[i:i + group])
                committer.merge_if_due()
            return (time.thread_time() - started) / len(rows) * 1e6
        finally:
            committer.close()


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.dedup_commit", description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, default=200_000)
    p.add_argument("--group", type=int, default=1000)
    a = p.parse_args()
    plain = data.stored_rows(a.events)
    with_ids = [dataclasses.replace(r, message_id=str(uuid.uuid4())) for r in plain]
    for _ in range(2):
        without = commit_cpu_us(plain, a.group)
        ids = commit_cpu_us(with_ids, a.group)
        print(f"writer CPU per event: {without:.1f} us without message_ids, {ids:.1f} us with "
              f"({ids / without:.1f}x), groups of {a.group:,} into {a.events:,} events")


if __name__ == "__main__":
    main()
