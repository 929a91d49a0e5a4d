"""A planner that calibrates itself from the cold starts it placed (pure).

From each measured cold start (:class:`ColdStartRecord`, built by ``control/coldstart.py``)
the calibrator takes one sample of the constant that bounded it:

* **engine-ready floor** — when the instance became ready later than its bytes were
  verified plus ``post_fetch_s`` (the engine was the bound): ``ready - serial load -
  post_fetch``;
* **fetch efficiency** — when the plan fetched over the network: the efficiency the plan
  used × predicted fetch time / measured fetch time (request to last byte verified).

``post_fetch_s`` is not separable from the ready time in what both backends observe, so it
stays a setting. A fitted constant is the median of the last ``calibration_window``
samples (robust to a straggler), applied once ``calibration_min_samples`` exist, moved at
most ``calibration_max_step``× per update and no more often than every
``calibration_min_interval_seconds`` (rate-limited), and kept within the bounds of its
``PlannerConfig`` field. ``calibration = False`` pins the configured constants. The state
is a small JSON document the backends persist (a file locally, a ConfigMap on Kubernetes).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, Field, TypeAdapter

from hydraserve.planner.config import PlannerConfig
from hydraserve.planner.types import ClusterState, PlanRequest

FLOOR = "engine_ready_floor_s"
EFFICIENCY = "fetch_efficiency"
# Cold starts kept with their planner inputs (each holds the cluster it saw).
HISTORY = 20
_REQUEST = TypeAdapter(PlanRequest)
_CLUSTER = TypeAdapter(ClusterState)
# Bounds of a fitted value (seconds; fraction of line rate).
BOUNDS = {FLOOR: (0.1, 900.0), EFFICIENCY: (0.05, 1.0)}


@dataclass(frozen=True)
class ColdStartRecord:
    model: str
    instance: str
    pp: int
    predicted_ready_s: float  # request -> ready, as the planner predicted
    measured_ready_s: float
    measured_fetch_s: float | None  # request -> last stage verified (None: not known)
    terms: dict[str, float]  # the prediction's cost-model terms
    gpu_type: str | None = None  # its nodes' GPU type (None: a mix)

    @property
    def error_s(self) -> float:
        """Measured minus predicted (positive: slower than predicted)."""
        return self.measured_ready_s - self.predicted_ready_s


class CalibrationSettings(BaseModel):
    """The calibration settings every backend has (inherited by their settings)."""

    calibration: bool = Field(
        default=True,
        description="Fit the planner's engine-ready floor and fetch efficiency from measured "
        "cold starts; off: the configured constants are used as they are (pinned).",
    )
    calibration_min_samples: int = Field(default=3, ge=1)
    calibration_window: int = Field(default=20, ge=1, description="Samples kept per constant.")
    calibration_max_step: float = Field(
        default=2.0, gt=1, description="A fitted constant moves at most this factor per update."
    )
    calibration_min_interval_seconds: float = Field(
        default=60.0, ge=0, description="Least time between two updates of a constant."
    )


class PlannedColdStart(BaseModel):
    """One cold start with the planner's inputs when it was placed (for replay)."""

    at: float
    model: str
    instance: str
    pp: int
    measured_ready_s: float
    request: str  # PlanRequest, JSON
    cluster: str  # ClusterState, JSON

    def inputs(self) -> tuple[PlanRequest, ClusterState]:
        return _REQUEST.validate_json(self.request), _CLUSTER.validate_json(self.cluster)


class CalibrationState(BaseModel):
    """What is persisted: recent samples, the fitted constants, and the last cold starts
    with their planner inputs (``hydraserve bench replay`` re-plans them)."""

    samples: dict[str, list[float]] = Field(default_factory=dict)
    fitted: dict[str, float] = Field(default_factory=dict)
    updated_at: dict[str, float] = Field(default_factory=dict)
    cold_starts: int = 0
    history: list[PlannedColdStart] = Field(default_factory=list)


class Calibrator:
    def __init__(self, settings: CalibrationSettings, state: CalibrationState | None = None):
        self.settings = settings
        self.state = state or CalibrationState()

    def remember(
        self,
        record: ColdStartRecord,
        inputs: tuple[PlanRequest, ClusterState] | None,
        now: float,
    ) -> None:
        """Keep a measured cold start with the inputs it was planned from (bounded)."""
        if inputs is None:
            return
        request, cluster = inputs
        self.state.history.append(
            PlannedColdStart(
                at=now,
                model=record.model,
                instance=record.instance,
                pp=record.pp,
                measured_ready_s=record.measured_ready_s,
                request=_REQUEST.dump_json(request).decode(),
                cluster=_CLUSTER.dump_json(cluster).decode(),
            )
        )
        del self.state.history[:-HISTORY]

    def config(self, base: PlannerConfig) -> PlannerConfig:
        """``base`` with the fitted constants (``base`` itself when calibration is off).
        Floors fitted per GPU type go to ``engine_ready_floor_by_gpu_type``."""
        if not self.settings.calibration or not self.state.fitted:
            return base
        update: dict[str, object] = {}
        by_type = dict(base.engine_ready_floor_by_gpu_type)
        for name, value in self.state.fitted.items():
            constant, _, gpu_type = name.partition("@")
            if gpu_type:
                by_type[gpu_type] = value
            else:
                update[constant] = value
        if by_type:
            update["engine_ready_floor_by_gpu_type"] = by_type
        return base.model_copy(update=update)

    def observe(self, record: ColdStartRecord, base: PlannerConfig, now: float) -> list[str]:
        """Take a measured cold start; the constants whose fitted value changed."""
        if not self.settings.calibration:
            return []
        self.state.cold_starts += 1
        current = self.config(base)
        terms = record.terms
        post = terms.get("post_fetch_s", current.post_fetch_s)
        serial = terms.get("serial_load_s", 0.0)
        samples: dict[str, float] = {}
        fetch = record.measured_fetch_s
        engine_bound = fetch is None or record.measured_ready_s > fetch + post + 0.5
        floor_key = f"{FLOOR}@{record.gpu_type}" if record.gpu_type else FLOOR
        if engine_bound:
            samples[floor_key] = record.measured_ready_s - serial - post
        predicted_fetch = terms.get("fetch_s", 0.0)
        used = terms.get(EFFICIENCY, current.fetch_efficiency)
        if fetch is not None and fetch > 0 and predicted_fetch > 0 and not engine_bound:
            samples[EFFICIENCY] = used * (predicted_fetch + terms.get("fetch_start_delay_s", 0))
            samples[EFFICIENCY] /= fetch
        changed = []
        for name, value in samples.items():
            constant, _, gpu_type = name.partition("@")
            low, high = BOUNDS[constant]
            kept = self.state.samples.setdefault(name, [])
            kept.append(min(high, max(low, value)))
            del kept[: -self.settings.calibration_window]
            now_value = current.floor_for(gpu_type) if gpu_type else getattr(current, constant)
            if self._update(name, now_value, now):
                changed.append(name)
        return changed

    def _update(self, name: str, current: float, now: float) -> bool:
        kept = self.state.samples[name]
        if len(kept) < self.settings.calibration_min_samples:
            return False
        last = self.state.updated_at.get(name)
        if last is not None and now - last < self.settings.calibration_min_interval_seconds:
            return False
        target = statistics.median(kept)
        step = self.settings.calibration_max_step
        value = min(current * step, max(current / step, target))
        low, high = BOUNDS[name.partition("@")[0]]
        value = round(min(high, max(low, value)), 4)
        if value == self.state.fitted.get(name, current):
            return False
        self.state.fitted[name] = value
        self.state.updated_at[name] = now
        return True


def load_calibration(path: Path) -> CalibrationState | None:
    """A persisted state, or None (missing or unreadable: start afresh)."""
    try:
        return CalibrationState.model_validate_json(path.read_text())
    except (OSError, ValueError):
        return None


def save_calibration(path: Path, state: CalibrationState) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(state.model_dump_json())
    tmp.replace(path)
