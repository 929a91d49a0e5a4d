"""Pipeline consolidation, decided (pure): when to fetch, start, promote, release.

A pipelined instance (pp > 1) buys a fast cold start with TPOT and memory. Once it
serves, the node of its all-card worker (stage 0) fetches the rest of the model at low
priority, a standalone pp = 1 engine starts there from shared memory, and when that
engine is ready it takes over: the pipeline drains (the gateway moves its in-flight
requests) and its stage processes are released.

The life of one consolidation, as :func:`consolidation_plan` drives it::

    pipeline Ready ──► FetchWholeModel + StartStandalone      (at once, in parallel)
    standalone warm (healthy, whole model verified) ──► Promote
                       (standalone Ready, pipeline Draining: one atomic view change)
    pipeline idle for drain_grace_seconds, or drain_timeout_seconds ──► Release
    standalone failed / fetch failed ──► Abandon (the pipeline keeps serving)

Backends observe their instances and fetches into :class:`PipelineConsolidation` records
and apply the actions; the local backend does it with processes, the operator with pods
(see ``docs/decisions/0402``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from pydantic import BaseModel, Field

from hydraserve.api.models import Condition, InstancePhase
from hydraserve.control import reasons
from hydraserve.control.placement import InstancePlan, all_card_stage
from hydraserve.prefetcher.shm import FetchState


@dataclass(frozen=True)
class ConsolidationPolicy:
    enabled: bool = True
    # Once draining, the pipeline is released when its engine has had no request in
    # flight for this long (a request leased just before the switch may still arrive) ...
    drain_grace_seconds: float = 0.5
    # ... or after this long whatever it still serves (requests that cannot move exactly
    # finish there meanwhile; after this they are cut off).
    drain_timeout_seconds: float = 300.0


class ConsolidationSettings(BaseModel):
    """The consolidation settings every backend has (the local backend's and the
    operator's settings inherit them, so names, bounds and meaning are defined once)."""

    consolidation: bool = Field(
        default=True,
        description="Replace a serving pipeline (pp > 1) by a standalone pp = 1 engine "
        "started from shared memory on its all-card node, then release the pipeline.",
    )
    consolidation_enforce_eager: bool = Field(
        default=True,
        description="Start the standalone engine eager (fastest start; it streams weights "
        "as the background fetch verifies them) even when workers run compiled.",
    )
    drain_grace_seconds: float = Field(
        default=ConsolidationPolicy.drain_grace_seconds,
        ge=0,
        description="A draining pipeline is released once its engine has been idle this long.",
    )
    drain_timeout_seconds: float = Field(
        default=ConsolidationPolicy.drain_timeout_seconds,
        gt=0,
        description="... or this long after the switch, idle or not.",
    )

    kv_transfer: bool = Field(
        default=True,
        description="Engines whose stages all run on one node save and load KV caches "
        "through that node's shared memory (HydraServe's KV connector), so requests can "
        "move to a standalone there by KV transfer; others move by recompute.",
    )
    kv_block_size: int = Field(
        default=32,
        ge=16,
        description="KV block size of every engine when kv_transfer is on (whole blocks "
        "move; the CPU default of 128 would leave short requests nothing to move).",
    )

    def consolidation_policy(self) -> ConsolidationPolicy:
        return ConsolidationPolicy(
            enabled=self.consolidation,
            drain_grace_seconds=self.drain_grace_seconds,
            drain_timeout_seconds=self.drain_timeout_seconds,
        )


class StandaloneState(StrEnum):
    NONE = "none"  # not started
    STARTING = "starting"  # process running, not (yet) healthy with verified weights
    WARM = "warm"  # healthy and the whole model verified: ready to take over
    SERVING = "serving"  # promoted: routed, the pipeline drains or is gone
    FAILED = "failed"


@dataclass(frozen=True)
class PipelineConsolidation:
    """What a backend observed of one pipelined instance and its consolidation."""

    pipeline: str
    pp: int
    phase: InstancePhase  # the pipeline's phase
    all_card_node: str | None = "local"  # node of the worker that can hold the whole model
    standalone: StandaloneState = StandaloneState.NONE
    full_fetch: FetchState | None = None  # the whole-model fetch on that node
    draining_since: float | None = None
    in_flight: int | None = None  # requests the pipeline's engine serves (None: unknown)
    idle_since: float | None = None  # when in_flight was first seen 0 (None: not idle)
    abandoned: bool = False
    error: str | None = None  # why the standalone failed, if it did


@dataclass(frozen=True)
class FetchWholeModel:
    pipeline: str
    node: str | None


@dataclass(frozen=True)
class StartStandalone:
    pipeline: str
    node: str | None


@dataclass(frozen=True)
class Promote:
    pipeline: str


@dataclass(frozen=True)
class Release:
    pipeline: str
    reason: str


@dataclass(frozen=True)
class Abandon:
    pipeline: str
    reason: str


ConsolidationAction = FetchWholeModel | StartStandalone | Promote | Release | Abandon


def consolidation_plan(
    pipelines: Sequence[PipelineConsolidation], policy: ConsolidationPolicy, now: float
) -> list[ConsolidationAction]:
    """The next steps of every pipeline's consolidation (see the module docstring).

    Pure and idempotent: a backend may call it on every reconcile tick; an action it has
    already applied is not asked for again, because the observation then differs.
    """
    actions: list[ConsolidationAction] = []
    for p in pipelines:
        if p.pp <= 1 or p.abandoned or p.all_card_node is None:
            continue
        if p.phase == InstancePhase.READY:
            if not policy.enabled:
                continue
            if p.standalone == StandaloneState.FAILED or p.full_fetch == FetchState.FAILED:
                why = p.error or "the whole-model fetch failed"
                actions.append(Abandon(p.pipeline, why))
                continue
            if p.full_fetch is None:
                actions.append(FetchWholeModel(p.pipeline, p.all_card_node))
            if p.standalone == StandaloneState.NONE:
                actions.append(StartStandalone(p.pipeline, p.all_card_node))
            elif p.standalone == StandaloneState.WARM and p.full_fetch == FetchState.DONE:
                actions.append(Promote(p.pipeline))
        elif p.phase == InstancePhase.DRAINING and p.draining_since is not None:
            drained_for = now - p.draining_since
            if drained_for >= policy.drain_timeout_seconds:
                actions.append(
                    Release(p.pipeline, f"drain timeout ({policy.drain_timeout_seconds:.0f} s)")
                )
            elif (
                p.in_flight == 0
                and p.idle_since is not None
                and now - p.idle_since >= policy.drain_grace_seconds
                and drained_for >= policy.drain_grace_seconds
            ):
                actions.append(Release(p.pipeline, "drained"))
    return actions


def consolidation_target(plan: InstancePlan | None) -> str | None:
    """The node a pipeline consolidates on: its all-card stage's, whose ``tp`` GPUs hold a
    whole replica's memory between them (reserved at the cold start, so the standalone
    engine has them when it starts). None for pp = 1 and for a pipeline planned without an
    all-card stage (no node had ``tp`` GPUs with a replica's share free): it stays a
    pipeline, and :func:`no_consolidation_condition` says why."""
    stage = all_card_stage(plan)
    return stage.node if stage is not None else None


def no_consolidation_condition(plan: InstancePlan | None) -> Condition | None:
    """status.instances[].consolidation of a pipeline that has no consolidation target
    (None for any other instance)."""
    if plan is None or plan.pp <= 1 or consolidation_target(plan) is not None:
        return None
    why = plan.no_consolidation or "no stage of the pipeline holds a whole replica"
    return Condition(
        type=reasons.CONSOLIDATION,
        status="False",
        reason=reasons.NO_CONSOLIDATION_TARGET,
        message=f"stays a {plan.pp}-stage pipeline: {why}",
    )


def next_idle_since(previous: float | None, in_flight: int | None, now: float) -> float | None:
    """When the draining engine was first seen idle (None: busy, or it did not answer)."""
    if in_flight != 0:
        return None
    return previous if previous is not None else now


def consolidating(pipelines: Sequence[PipelineConsolidation], policy: ConsolidationPolicy) -> bool:
    """The model's phase is Consolidating: a serving pipeline is being replaced (while
    consolidation is on and not given up for it) or one drains."""
    for p in pipelines:
        if p.pp <= 1 or p.all_card_node is None:
            continue
        if p.phase == InstancePhase.DRAINING:
            return True
        if p.phase == InstancePhase.READY and policy.enabled and not p.abandoned:
            return True
    return False
