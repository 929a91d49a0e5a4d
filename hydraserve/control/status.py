"""A model's status, derived (pure): phase, replicas, instances and conditions.

Both backends build :class:`ServerlessModelStatus` here from their neutral observations
(the operator writes it to the ServerlessModel, the local backend keeps it in memory), and
the gateway reads both through the same view (``hydraserve.backends.base.view_of``).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from hydraserve.api.models import (
    Condition,
    ConsolidationStatus,
    FailureStatus,
    InstanceOrigin,
    InstancePhase,
    InstanceStatus,
    ModelPhase,
    ServerlessModelStatus,
)
from hydraserve.control import reasons
from hydraserve.control.instances import InstanceObservation

# Finished consolidations kept in status (the gateway's metrics read each once).
CONSOLIDATION_HISTORY = 16


def format_time(epoch: float) -> str:
    """RFC 3339, as the API server writes timestamps."""
    return dt.datetime.fromtimestamp(epoch, tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str | None) -> float | None:
    """RFC 3339 timestamp -> epoch seconds (None if absent or unreadable)."""
    if not value:
        return None
    try:
        return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def model_phase(
    *,
    error: str | None,
    desired: int,
    ready: int,
    live: int,
    consolidating: bool,
) -> ModelPhase:
    """Consolidating while a serving pipeline is being replaced by a standalone engine
    (until its stages are released), then Serving."""
    if error is not None and not ready:
        return ModelPhase.FAILED
    if ready:
        return ModelPhase.CONSOLIDATING if consolidating else ModelPhase.SERVING
    if live or desired > 0:
        return ModelPhase.STARTING
    return ModelPhase.COLD


def set_condition(
    conditions: list[Condition], kind: str, ok: bool | None, reason: str, message: str, now: float
) -> list[Condition]:
    """Replace one condition, keeping its transition time when its status did not change."""
    status = "Unknown" if ok is None else ("True" if ok else "False")
    old = next((c for c in conditions if c.type == kind), None)
    when = (
        old.last_transition_time
        if old is not None and old.status == status and old.last_transition_time
        else format_time(now)
    )
    new = Condition(
        type=kind, status=status, reason=reason, message=message, last_transition_time=when
    )
    return [c for c in conditions if c.type != kind] + [new]


def instance_status(obs: InstanceObservation, detail: InstanceStatus) -> InstanceStatus:
    """``detail`` (what only the backend knows: workers, endpoint, timings) with the
    lifecycle fields derived from the observation."""
    phase = obs.phase
    serving = phase in (InstancePhase.READY, InstancePhase.DRAINING)
    return detail.model_copy(
        update={
            "name": obs.name,
            "pp": obs.pp,
            "phase": phase,
            "ready": phase == InstancePhase.READY,
            "origin": obs.origin,
            "endpoint": detail.endpoint if serving else None,
            "requested_at": obs.requested_at or None,
            "ready_at": obs.ready_at,
            "verified_at": obs.verified_at,
            "error": obs.failure,
        }
    )


def build_status(
    *,
    desired: int,
    instances: Sequence[tuple[InstanceObservation, InstanceStatus]],
    previous: ServerlessModelStatus,
    now: float,
    failures: FailureStatus | None = None,
    gave_up: str | None = None,
    retry_in: float | None = None,
    invalid: str | None = None,
    invalid_reason: str = reasons.INVALID_SPEC,
    unschedulable: str | None = None,
    consolidating: bool = False,
    finished: Sequence[ConsolidationStatus] = (),
    selector: str | None = None,
    generation: int | None = None,
) -> ServerlessModelStatus:
    """What the user and the gateway read.

    ``gave_up``: the lifecycle policy stopped starting instances (the model is Failed with
    that reason); ``retry_in``: it backs off before the next start. ``consolidating``: a
    serving pipeline is being replaced (see ``hydraserve.control.consolidation``).
    ``finished``: consolidations that ended in this pass, added to the bounded history.
    """
    recorded = [(o, d) for o, d in instances if o.recorded]
    statuses = [instance_status(o, d) for o, d in recorded]
    ready = sum(1 for s in statuses if s.ready)
    live = [o for o, _ in recorded if o.live]
    failures = failures if failures is not None else previous.failures
    error = invalid if invalid is not None else gave_up

    conditions = list(previous.conditions)
    if invalid is not None:
        conditions = set_condition(conditions, reasons.VALID, False, invalid_reason, invalid, now)
    else:
        conditions = set_condition(conditions, reasons.VALID, True, reasons.SPEC_VALID, "", now)
    if unschedulable is not None:
        conditions = set_condition(
            conditions, reasons.SCHEDULED, False, reasons.UNSCHEDULABLE, unschedulable, now
        )
    elif invalid is None and (live or desired == 0):
        conditions = set_condition(conditions, reasons.SCHEDULED, True, reasons.PLACED, "", now)

    def ready_condition(ok: bool, reason: str, message: str) -> None:
        nonlocal conditions
        conditions = set_condition(conditions, reasons.READY, ok, reason, message, now)

    if invalid is not None and not ready:
        ready_condition(False, invalid_reason, f"Not serving: {invalid}")
    elif ready >= max(desired, 1):
        ready_condition(True, reasons.SERVING, f"{ready} ready")
    elif gave_up is not None:
        ready_condition(False, reasons.INSTANCES_FAILING, gave_up)
    elif retry_in is not None and failures.consecutive:
        # An absolute time, so that the message (and the status) stays the same while
        # the backend waits.
        at = format_time(failures.retry_at or now + retry_in)
        ready_condition(
            False,
            reasons.BACK_OFF,
            f"instance {failures.last_instance} failed ({failures.last_error}); next attempt "
            f"at {at} (failure {failures.consecutive} in a row)",
        )
    elif desired == 0 and not live:
        ready_condition(
            False,
            reasons.SCALED_TO_ZERO,
            "No replicas asked for; the gateway scales the model up on its first request.",
        )
    else:
        ready_condition(False, reasons.STARTING, f"{ready}/{desired} instances ready")

    phase = model_phase(
        error=error, desired=desired, ready=ready, live=len(live), consolidating=consolidating
    )
    # The latest cold start that completed: requested -> ready with every byte verified.
    last_cold = previous.last_cold_start_seconds
    done = [
        s
        for s in statuses
        if s.origin == InstanceOrigin.COLD_START and s.ready_at and s.requested_at
    ]
    if done:
        latest = max(done, key=lambda s: s.requested_at or 0.0)
        last_cold = round((latest.ready_at or 0.0) - (latest.requested_at or 0.0), 3)
    again = {c.pipeline for c in finished}
    history = [c for c in previous.consolidations if c.pipeline not in again] + list(finished)
    return ServerlessModelStatus(
        phase=phase,
        replicas=len(live),
        ready_replicas=ready,
        selector=selector,
        instances=statuses,
        conditions=conditions,
        consolidations=history[-CONSOLIDATION_HISTORY:],
        last_cold_start_seconds=last_cold,
        failures=failures,
        # Written by the gateway, kept by the control plane.
        slo_attainment=previous.slo_attainment,
        observed_generation=generation if generation is not None else previous.observed_generation,
    )
