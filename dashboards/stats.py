"""The few statistics the dashboards need, in plain Python (the same on PostgreSQL and SQLite)."""

from __future__ import annotations

import math
from collections.abc import Sequence

Z_95 = 1.959963984540054  # two-sided 95% normal quantile


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q`` percentile (0..100) by linear interpolation between closest ranks (NumPy's
    default, Excel's PERCENTILE.INC): position ``(n - 1) * q / 100`` in the sorted values. None for
    no values; the value itself for one."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def wilson(successes: int, total: int, z: float = Z_95) -> tuple[float, float] | None:
    """The Wilson score interval of a proportion (95% by default), as (low, high) in 0..1; None
    when there is nothing to count."""
    if total <= 0:
        return None
    p = successes / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def rate(successes: int, total: int) -> float | None:
    return successes / total if total else None
