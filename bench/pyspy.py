"""`--profile`: py-spy on every service process during the measured window.

py-spy samples the workers from outside (``--nonblocking``: it never pauses
them), writing collapsed stacks per process to bench/out/profile/. The summary
ranks ``function (file)`` by self samples and by inclusive samples, as shares
of all samples taken while the process was running Python (idle excluded).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

_LINE = re.compile(r":\d+\)$")


def pyspy_binary() -> str:
    local = Path(sys.executable).parent / "py-spy"
    path = str(local) if local.exists() else shutil.which("py-spy")
    if not path:
        raise SystemExit(f"--profile needs py-spy: {sys.executable} -m pip install py-spy")
    return path


class Recording:
    def __init__(self, pids: dict[int, str], seconds: float, out_dir: Path, tag: str, rate: int = 200) -> None:
        self.files: dict[Path, str] = {}
        self._procs = []
        out_dir.mkdir(parents=True, exist_ok=True)
        binary = pyspy_binary()
        for pid, role in pids.items():
            if role == "supervisor":
                continue
            out = out_dir / f"{tag}-{role}-{pid}.txt"
            self.files[out] = role
            self._procs.append(subprocess.Popen(
                [binary, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))), "--rate", str(rate),
                 "--format", "raw", "--nonblocking", "--output", str(out)],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))

    def wait(self) -> None:
        for proc in self._procs:
            _, err = proc.communicate(timeout=120)
            if proc.returncode != 0:
                print(f"py-spy failed: {err.strip()[-300:]}")


def _frame(frame: str) -> str:
    return _LINE.sub(")", frame.strip())


def summarize(files: list[Path], top: int = 15) -> str:
    self_counts: Counter[str] = Counter()
    incl_counts: Counter[str] = Counter()
    total = 0
    for path in files:
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            n = int(count)
            frames = [_frame(f) for f in stack.split(";")]
            total += n
            self_counts[frames[-1]] += n
            for f in set(frames):
                incl_counts[f] += n
    if not total:
        return "  (no samples)"
    lines = [f"  {total} samples; self time:"]
    lines += [f"    {100 * n / total:5.1f}%  {f}" for f, n in self_counts.most_common(top)]
    lines.append("  inclusive (the function and what it calls):")
    skip = ("<module>", "run (asyncio/", "run_forever", "_run_once", "_run (asyncio/events.py)", "run_until_complete",
            "_run_module_as_main", "_run_code", "main (service/__main__.py)", "serve (service/server.py)")
    ranked = [(f, n) for f, n in incl_counts.most_common() if not any(s in f for s in skip)]
    lines += [f"    {100 * n / total:5.1f}%  {f}" for f, n in ranked[:top]]
    return "\n".join(lines)
