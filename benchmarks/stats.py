"""Pure statistics the benchmarks share: spreads over repeated runs, percentiles, and
what a stream's event times say (TTFT, inter-token gaps)."""

from __future__ import annotations

import itertools
import math
import random
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


def bootstrap_median_interval(
    values: Sequence[float],
    confidence: float = 0.95,
    resamples: int = 10_000,
    seed: int = 0,
) -> tuple[float, float]:
    """A percentile bootstrap interval of the median of ``values``: the median of
    ``resamples`` resamples (with replacement, same size) each, and the two-sided
    ``confidence`` quantiles of those medians (linear between order statistics). Seeded:
    the same input gives the same interval, so a result file can be recomputed."""
    if not values:
        raise ValueError("no values")
    if not 0.0 < confidence < 1.0:
        raise ValueError("confidence must lie in (0, 1)")
    if resamples < 1:
        raise ValueError("at least one resample")
    if len(values) == 1:
        return (values[0], values[0])
    rng = random.Random(seed)
    n = len(values)
    medians = sorted(statistics.median(rng.choices(values, k=n)) for _ in range(resamples))
    tail = (1.0 - confidence) / 2
    return (_quantile_of_sorted(medians, tail), _quantile_of_sorted(medians, 1.0 - tail))


def _quantile_of_sorted(ordered: Sequence[float], q: float) -> float:
    """The ``q`` quantile of sorted values, linear between order statistics (numpy's
    default method)."""
    position = q * (len(ordered) - 1)
    below = math.floor(position)
    above = min(below + 1, len(ordered) - 1)
    fraction = position - below
    return ordered[below] + (ordered[above] - ordered[below]) * fraction
