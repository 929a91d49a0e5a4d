"""The HydraServe / serverless-vLLM ratio as a band over a sweep, not a point (pure)."""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from benchmarks.stats import spread

__all__ = ["Band", "band", "point_label", "ratio", "spread"]


@dataclass(frozen=True)
class Band:
    """min / median / max of a figure over the points of a sweep, and where each end lies."""

    min: float
    median: float
    max: float
    points: int
    argmin: str
    argmax: str

    def as_dict(self, digits: int = 3) -> dict[str, Any]:
        return {
            "min": round(self.min, digits),
            "median": round(self.median, digits),
            "max": round(self.max, digits),
            "points": self.points,
            "argmin": self.argmin,
            "argmax": self.argmax,
        }


def band(values: Mapping[str, float]) -> Band:
    """The band of ``values`` (point label -> figure); the median of an even count is the
    mean of the two middle figures. Raises ValueError when empty."""
    if not values:
        raise ValueError("a band needs at least one point")
    low = min(values, key=lambda k: (values[k], k))
    high = max(values, key=lambda k: (values[k], k))
    return Band(
        min=values[low],
        median=statistics.median(values.values()),
        max=values[high],
        points=len(values),
        argmin=low,
        argmax=high,
    )


def ratio(numerator: float, denominator: float) -> float:
    """Attainment ratio; a baseline at 0 % attainment gives infinity (reported, not hidden)."""
    return numerator / denominator if denominator > 0 else float("inf")


def point_label(floor_s: float, store_gbps: float | None) -> str:
    store = "unlimited" if store_gbps is None else f"{store_gbps:g}Gbps"
    return f"floor{floor_s:g}s_store{store}"
