"""Pipeline consolidation on Kubernetes, observed (pure): objects and probes -> records.

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

from collections.abc import Sequence

from hydraserve.api.models import ConsolidationStatus, InstancePhase
from hydraserve.control.consolidation import PipelineConsolidation, next_idle_since
from hydraserve.control.consolidation import StandaloneState as Standalone
from hydraserve.control.instances import InstanceObservation
from hydraserve.control.placement import all_card_stage
from hydraserve.operator.records import InstanceObjects
from hydraserve.prefetcher.node import NodeStatus
from hydraserve.prefetcher.shm import FetchState, FetchStatus, fetch_name

WHOLE_MODEL = fetch_name(None, None)

Observed = tuple[InstanceObjects, InstanceObservation]


def whole_model_fetch(
    node_status: NodeStatus | None, uri: str, revision: str
) -> FetchStatus | None:
    """The whole-model fetch of one model in a prefetcher's status."""
    return None if node_status is None else node_status.fetch(uri, revision, WHOLE_MODEL)


def fetch_state(fetch: FetchStatus | None, since: float) -> FetchState | None:
    """The whole-model fetch as the plan reads it. A failure older than ``since`` (the
    pipeline's request) is an earlier attempt's: the prefetcher starts anew when asked."""
    if fetch is None:
        return None
    if fetch.state == FetchState.FAILED and (fetch.started_at or 0.0) < since:
        return None
    return fetch.state


def standalone_state(standalone: Observed | None) -> tuple[Standalone, str | None]:
    """(its state, why it failed). A record without its pod is not started (yet): starting
    it again is idempotent (same names)."""
    if standalone is None:
        return Standalone.NONE, None
    objects, obs = standalone
    if objects.record is None or 0 not in objects.pods:
        return Standalone.NONE, None
    if obs.failure is not None:
        return Standalone.FAILED, f"the standalone engine failed: {obs.failure}"
    if obs.promoted:
        return Standalone.SERVING, None
    return (Standalone.WARM if obs.warm else Standalone.STARTING), None


def pipeline_consolidation(
    pipeline: Observed,
    standalone: Observed | None,
    fetch: FetchStatus | None,
    in_flight: int | None,
    now: float,
) -> PipelineConsolidation:
    """One pipeline's consolidation record from what the operator observed of it."""
    objects, obs = pipeline
    stage = all_card_stage(objects.plan)
    state, error = standalone_state(standalone)
    if error is None and fetch is not None and fetch.state == FetchState.FAILED and fetch.error:
        error = f"the whole-model fetch failed: {fetch.error}"
    draining = objects.draining_since is not None
    return PipelineConsolidation(
        pipeline=objects.name,
        pp=obs.pp,
        phase=obs.phase,
        all_card_node=stage.node if stage is not None else None,
        standalone=state,
        full_fetch=fetch_state(fetch, objects.requested_at),
        draining_since=objects.draining_since,
        in_flight=in_flight if draining else None,
        idle_since=next_idle_since(objects.idle_since, in_flight, now) if draining else None,
        abandoned=objects.abandoned is not None,
        error=error,
    )


def pipelines(instances: Sequence[Observed]) -> list[Observed]:
    """The instances a consolidation may concern: serving or draining pipelines."""
    return [
        (objects, obs)
        for objects, obs in instances
        if objects.record is not None
        and objects.consolidates is None
        and all_card_stage(objects.plan) is not None
        and obs.phase in (InstancePhase.READY, InstancePhase.DRAINING)
    ]


def standalones(instances: Sequence[Observed]) -> dict[str, Observed]:
    """pipeline -> the standalone engine that consolidates it."""
    return {
        objects.consolidates: (objects, obs)
        for objects, obs in instances
        if objects.consolidates is not None
    }


def finished_record(
    pipeline: InstanceObjects,
    standalone: InstanceObjects | None,
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
