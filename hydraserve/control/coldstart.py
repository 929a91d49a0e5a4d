"""A cold start as it happened, beside what the planner predicted for it (pure).

Both backends derive these from the status they build: when an instance first shows
``ready_at``, its record joins the plan's prediction (``InstanceStatus.prediction``) with
what was measured — ready time, and when the last stage's bytes were verified. The
backends log it (``coldstart.measured``) and feed it to the planner's calibration.
"""

from __future__ import annotations

from typing import Any

from hydraserve.api.models import InstanceOrigin, InstanceStatus, ServerlessModelStatus
from hydraserve.planner.calibration import Calibrator, ColdStartRecord
from hydraserve.planner.config import PlannerConfig
from hydraserve.planner.types import ClusterState, PlanRequest


def cold_start_record(model: str, inst: InstanceStatus) -> ColdStartRecord | None:
    """The record of a ready, planner-placed cold start; None otherwise."""
    if (
        inst.origin != InstanceOrigin.COLD_START
        or inst.prediction is None
        or inst.ready_at is None
        or not inst.requested_at
    ):
        return None
    fetch = None
    if inst.verified_at is not None:
        fetch = max(0.0, inst.verified_at - inst.requested_at)
    return ColdStartRecord(
        model=model,
        instance=inst.name,
        pp=inst.pp,
        predicted_ready_s=inst.prediction.ready_seconds,
        measured_ready_s=max(0.0, inst.ready_at - inst.requested_at),
        measured_fetch_s=fetch,
        terms=dict(inst.prediction.terms),
        gpu_type=inst.prediction.gpu_type,
    )


def newly_measured(
    model: str, previous: ServerlessModelStatus, status: ServerlessModelStatus
) -> list[ColdStartRecord]:
    """Cold starts that became ready between two statuses of a model."""
    before = {i.name for i in previous.instances if i.ready_at is not None}
    records = []
    for inst in status.instances:
        if inst.name in before:
            continue
        record = cold_start_record(model, inst)
        if record is not None:
            records.append(record)
    return records


def log_cold_start(log: Any, record: ColdStartRecord) -> None:
    """The structured ``coldstart.measured`` event, the same on both backends."""
    log.info(
        "coldstart.measured",
        model=record.model,
        instance=record.instance,
        pp=record.pp,
        predicted_ready_s=round(record.predicted_ready_s, 3),
        measured_ready_s=round(record.measured_ready_s, 3),
        error_s=round(record.error_s, 3),
        measured_fetch_s=None
        if record.measured_fetch_s is None
        else round(record.measured_fetch_s, 3),
        predicted_fetch_s=round(record.terms.get("fetch_s", 0.0), 3),
        floor_s=record.terms.get("engine_ready_floor_s"),
    )


def take_measurement(
    calibrator: Calibrator,
    record: ColdStartRecord,
    base: PlannerConfig,
    inputs: tuple[PlanRequest, ClusterState] | None,
    now: float,
    log: Any,
) -> None:
    """A cold start became ready: log it beside its prediction, calibrate the planner and
    keep it with the inputs it was planned from (for replay). Both backends call this,
    then persist ``calibrator.state`` where they keep it."""
    log_cold_start(log, record)
    changed = calibrator.observe(record, base, now)
    if changed:
        fitted = calibrator.state.fitted
        log.info("planner.calibrated", fitted={name: fitted[name] for name in changed})
    calibrator.remember(record, inputs, now)
