"""Pipeline consolidation on Kubernetes, decided (pure): observations -> records, plans.

The plan itself is shared with the embedded platform
(:func:`hydraserve.control.consolidation.consolidation_plan`); this module turns what the
operator reads from the API server and over HTTP into its :class:`PipelineConsolidation`
records. Everything a consolidation needs after an operator restart is on Kubernetes
objects (see ``hydraserve.operator.naming``): the standalone engine is an instance whose
Service and pod carry ``hydraserve.io/consolidates=<pipeline>``; the pipeline's Service
carries the switch (``draining-since``), the drain (``idle-since``) and a given-up
consolidation (``consolidation-abandoned``). Only the node prefetcher's fetch state and
the head's in-flight count come over HTTP, and are read anew on every pass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from hydraserve.api.models import ConsolidationStatus, InstancePhase
from hydraserve.control.consolidation import ConsolidationPolicy, PipelineConsolidation
from hydraserve.control.consolidation import StandaloneState as Standalone
from hydraserve.operator.naming import InstancePlan, StagePlan
from hydraserve.operator.reconcile import ObservedInstance
from hydraserve.prefetcher.shm import FetchState, FetchStatus, fetch_name

WHOLE_MODEL = fetch_name(None, None)


def all_card_stage(plan: InstancePlan | None) -> StagePlan | None:
    """The stage whose GPU can hold the whole model: where the standalone engine runs."""
    if plan is None or plan.pp <= 1:
        return None
    return next((s for s in plan.stages if s.all_card), None)


def standalone_plan(pipeline: InstancePlan) -> InstancePlan:
    """pp = 1 on the all-card stage's node and GPU, holding what the whole pipeline held."""
    stage = all_card_stage(pipeline)
    if stage is None:
        raise ValueError("the pipeline has no all-card stage to consolidate on")
    last = max(s.end_layer for s in pipeline.stages)
    return InstancePlan(
        pp=1,
        stages=[
            StagePlan(
                rank=0,
                node=stage.node,
                gpu=stage.gpu,
                start_layer=0,
                end_layer=last,
                memory_bytes=sum(s.memory_bytes for s in pipeline.stages),
                all_card=True,
                fetch_bytes=sum(s.fetch_bytes for s in pipeline.stages) - stage.fetch_bytes,
                from_cache=True,
            )
        ],
        predicted_ttft_s=pipeline.predicted_ttft_s,
        predicted_tpot_s=pipeline.predicted_tpot_s,
        reason=f"consolidates {pipeline.pp}-stage pipeline on {stage.node}",
    )


def whole_model_fetch(
    node_status: Mapping[str, Any] | None, uri: str, revision: str
) -> FetchStatus | None:
    """The whole-model fetch of one model in a prefetcher's ``GET /v1/status`` answer."""
    for holding in (node_status or {}).get("models") or []:
        if holding.get("uri") != uri or holding.get("revision", "main") != revision:
            continue
        raw = (holding.get("fetches") or {}).get(WHOLE_MODEL)
        if raw is None:
            return None
        try:
            return FetchStatus.model_validate(raw)
        except ValidationError:
            return None
    return None


def fetch_state(fetch: FetchStatus | None, since: float) -> FetchState | None:
    """The whole-model fetch as the plan reads it. A failure older than ``since`` (the
    pipeline's request) is an earlier attempt's: the prefetcher starts anew when asked."""
    if fetch is None:
        return None
    if fetch.state == FetchState.FAILED and (fetch.started_at or 0.0) < since:
        return None
    return fetch.state


def standalone_state(
    standalone: ObservedInstance | None, now: float, start_timeout_s: float
) -> tuple[Standalone, str | None]:
    """(its state, why it failed). A record without its pod is not started (yet): starting
    it again is idempotent (same names)."""
    if standalone is None or standalone.record is None or 0 not in standalone.pods:
        return Standalone.NONE, None
    why = standalone.failure(now, start_timeout_s)
    if why is not None:
        return Standalone.FAILED, f"the standalone engine failed: {why}"
    if standalone.promoted:
        return Standalone.SERVING, None
    return (Standalone.WARM if standalone.ready else Standalone.STARTING), None


def next_idle_since(previous: float | None, in_flight: int | None, now: float) -> float | None:
    """When the draining engine was first seen idle (None: busy, or it did not answer)."""
    if in_flight != 0:
        return None
    return previous if previous is not None else now


def pipeline_consolidation(
    pipeline: ObservedInstance,
    standalone: ObservedInstance | None,
    fetch: FetchStatus | None,
    in_flight: int | None,
    now: float,
    start_timeout_s: float,
) -> PipelineConsolidation:
    """One pipeline's consolidation record from what the operator observed of it."""
    plan = pipeline.plan
    stage = all_card_stage(plan)
    state, error = standalone_state(standalone, now, start_timeout_s)
    if error is None and fetch is not None and fetch.state == FetchState.FAILED and fetch.error:
        error = f"the whole-model fetch failed: {fetch.error}"
    draining = pipeline.draining_since is not None
    return PipelineConsolidation(
        pipeline=pipeline.name,
        pp=plan.pp if plan is not None else 1,
        phase=pipeline.phase,
        all_card_node=stage.node if stage is not None else None,
        standalone=state,
        full_fetch=fetch_state(fetch, pipeline.requested_at),
        draining_since=pipeline.draining_since,
        in_flight=in_flight if draining else None,
        idle_since=next_idle_since(pipeline.idle_since, in_flight, now) if draining else None,
        abandoned=pipeline.abandoned is not None,
        error=error,
    )


def pipelines(instances: Sequence[ObservedInstance]) -> list[ObservedInstance]:
    """The instances a consolidation may concern: serving or draining pipelines."""
    return [
        i
        for i in instances
        if i.record is not None
        and i.consolidates is None
        and all_card_stage(i.plan) is not None
        and i.phase in (InstancePhase.READY, InstancePhase.DRAINING)
    ]


def standalones(instances: Sequence[ObservedInstance]) -> dict[str, ObservedInstance]:
    """pipeline -> the standalone engine that consolidates it."""
    return {i.consolidates: i for i in instances if i.consolidates is not None}


def consolidating(instances: Sequence[ObservedInstance], policy: ConsolidationPolicy) -> bool:
    """The model's phase is Consolidating: a serving pipeline is being replaced (while
    consolidation is on and not given up) or one drains."""
    for inst in pipelines(instances):
        if inst.phase == InstancePhase.DRAINING:
            return True
        if policy.enabled and inst.abandoned is None:
            return True
    return False


def finished_record(
    pipeline: ObservedInstance,
    standalone: ObservedInstance | None,
    now: float,
    *,
    outcome: str,
    reason: str,
) -> ConsolidationStatus:
    """The history entry of a consolidation that ends now (released or abandoned), from
    the times its records carry."""
    return ConsolidationStatus(
        pipeline=pipeline.name,
        standalone=standalone.name if standalone is not None else "",
        started_at=(standalone.requested_at if standalone is not None else 0.0) or now,
        fetched_at=pipeline.fetched_at,
        promoted_at=pipeline.draining_since,
        released_at=now if outcome == "done" else None,
        outcome=outcome,
        reason=reason,
    )
