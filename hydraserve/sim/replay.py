"""Replay recorded cold starts through the planner: what it chose then, and what it would
choose with other constants (e.g. the calibrated ones) on the same inputs.

Each recorded cold start (:class:`~hydraserve.planner.calibration.PlannedColdStart`) keeps
the request and the cluster the planner saw; :func:`replay` plans them again with two
configurations, so an operator sees how calibration changes pipeline sizes and predicted
start times before trusting it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from hydraserve.planner import PlannerConfig, plan
from hydraserve.planner.calibration import PlannedColdStart
from hydraserve.planner.types import Plan


@dataclass(frozen=True)
class ReplayRow:
    instance: str
    model: str
    recorded_pp: int
    measured_ready_s: float
    base_pp: int | None  # None: unschedulable with these constants
    base_ready_s: float | None
    calibrated_pp: int | None
    calibrated_ready_s: float | None


def _choice(entry: PlannedColdStart, config: PlannerConfig) -> tuple[int | None, float | None]:
    request, cluster = entry.inputs()
    result = plan(request, cluster, config)
    if not isinstance(result, Plan):
        return None, None
    t = result.prediction.terms
    return result.pp, t.get("startup_s", 0.0) + t.get("serial_load_s", 0.0) + t.get(
        "post_fetch_s", 0.0
    )


def replay(
    history: Iterable[PlannedColdStart], base: PlannerConfig, calibrated: PlannerConfig
) -> list[ReplayRow]:
    rows = []
    for entry in history:
        base_pp, base_ready = _choice(entry, base)
        cal_pp, cal_ready = _choice(entry, calibrated)
        rows.append(
            ReplayRow(
                instance=entry.instance,
                model=entry.model,
                recorded_pp=entry.pp,
                measured_ready_s=entry.measured_ready_s,
                base_pp=base_pp,
                base_ready_s=base_ready,
                calibrated_pp=cal_pp,
                calibrated_ready_s=cal_ready,
            )
        )
    return rows
