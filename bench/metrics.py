"""Records, percentiles and the printed table."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass
class Record:
    store: str
    workload: str
    metric: str
    value: float | int | str
    unit: str

    def as_dict(self) -> dict:
        return asdict(self)


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return float("nan")
    rank = max(1, math.ceil(len(sorted_values) * p / 100))
    return sorted_values[rank - 1]
