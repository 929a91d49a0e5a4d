"""Pure statistics the benchmarks share: spreads over repeated runs, percentiles, and
what a stream's event times say (TTFT, inter-token gaps)."""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Sequence


def spread(values: Sequence[float]) -> dict[str, float]:
    """median, min and max of repeated runs (never the best run alone)."""
    if not values:
        raise ValueError("no runs")
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "runs": float(len(values)),
    }


def rounded(values: dict[str, float], digits: int = 3) -> dict[str, float]:
    return {k: round(v, digits) for k, v in values.items()}


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank ``q`` quantile (0 < q <= 1) of ``values``."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.5) - 1))]


def stream_timing(sent_at: float, event_times: Sequence[float]) -> tuple[float, list[float]]:
    """TTFT (first token event minus the send) and the gaps between successive token
    events of one stream."""
    if not event_times:
        raise ValueError("a stream without token events")
    gaps = [b - a for a, b in itertools.pairwise(event_times)]
    return event_times[0] - sent_at, gaps


def paired_differences(gateway: Sequence[float], direct: Sequence[float]) -> list[float]:
    """Per-round added cost: each gateway round minus the direct round run beside it."""
    if len(gateway) != len(direct):
        raise ValueError("rounds must pair up")
    return [g - d for g, d in zip(gateway, direct, strict=True)]
