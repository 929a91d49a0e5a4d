"""Pure reconcile decisions: observed instances + desired replicas -> actions and status.

No I/O here. ``observe`` groups the live Services and pods into instances; ``decide`` says
which instances to create, finish or delete; ``build_status`` writes what a user and the
gateway read. Every decision is a function of API objects and the clock.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from pydantic import ValidationError

from hydraserve.api.models import (
    Condition,
    ConsolidationStatus,
    InstanceOrigin,
    InstancePhase,
    InstanceStatus,
    ServerlessModelSpec,
    ServerlessModelStatus,
    StageTiming,
    WorkerStatus,
)
from hydraserve.control.consolidation import model_phase
from hydraserve.operator.naming import (
    ABANDONED_ANNOTATION,
    CONSOLIDATES_LABEL,
    DRAINING_SINCE_ANNOTATION,
    FETCHED_AT_ANNOTATION,
    IDLE_SINCE_ANNOTATION,
    INSTANCE_LABEL,
    PLAN_ANNOTATION,
    PLANNED_AT_ANNOTATION,
    PRELOADED_AT_ANNOTATION,
    PROMOTED_AT_ANNOTATION,
    REQUESTED_AT_ANNOTATION,
    STAGE_LABEL,
    TEMPLATE_HASH_ANNOTATION,
    InstancePlan,
    StagePlan,
    head_selector,
)

Obj = Mapping[str, Any]

# Finished consolidations kept in status (the gateway's metrics read each once).
CONSOLIDATION_HISTORY = 16

# Condition types written to status.conditions.
VALID = "Valid"
SCHEDULED = "Scheduled"
READY = "Ready"


def parse_time(value: str | None) -> float | None:
    """RFC 3339 timestamp of the API server -> epoch seconds."""
    if not value:
        return None
    try:
        return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def format_time(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _float_annotation(obj: Obj | None, key: str) -> float | None:
    if obj is None:
        return None
    value = ((obj.get("metadata") or {}).get("annotations") or {}).get(key)
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _condition_time(pod: Obj, kind: str) -> float | None:
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind and cond.get("status") == "True":
            return parse_time(cond.get("lastTransitionTime"))
    return None


def pod_ready(pod: Obj) -> bool:
    return _condition_time(pod, "Ready") is not None or any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in (pod.get("status") or {}).get("conditions") or []
    )


def _name(obj: Obj) -> str:
    return str((obj.get("metadata") or {}).get("name"))


def spec_errors(raw_spec: Any) -> str | None:
    """None when the spec is valid, else what to fix (one line per problem)."""
    try:
        ServerlessModelSpec.model_validate(raw_spec)
    except ValidationError as exc:
        return format_validation_error(exc)
    return None


def format_validation_error(exc: ValidationError) -> str:
    problems = []
    for err in exc.errors():
        where = "spec." + ".".join(str(p) for p in err["loc"]) if err["loc"] else "spec"
        given = f" (got {err['input']!r})" if err["type"] != "missing" else ""
        problems.append(f"{where}: {err['msg']}{given}")
    return "; ".join(problems) + ". Fix the spec and apply it again."


@dataclass(frozen=True)
class ObservedInstance:
    name: str
    record: Obj | None  # the head Service; None while only orphaned pods remain
    pods: Mapping[int, Obj] = field(default_factory=dict)  # rank -> pod
    # A standalone engine (consolidation): it took over its pipeline, by its own record or
    # by its pipeline's (the pipeline's Service is marked draining first: the switch).
    promoted: bool = False

    def _annotation(self, key: str) -> str | None:
        value = (((self.record or {}).get("metadata") or {}).get("annotations") or {}).get(key)
        return str(value) if value is not None else None

    @property
    def consolidates(self) -> str | None:
        """The pipeline this standalone engine replaces (None: not a standalone)."""
        labels = ((self.record or {}).get("metadata") or {}).get("labels") or {}
        value = labels.get(CONSOLIDATES_LABEL)
        return str(value) if value else None

    @property
    def pending(self) -> bool:
        """A standalone engine not promoted yet: not a replica, the consolidation owns it."""
        return self.consolidates is not None and not self.promoted

    @property
    def draining_since(self) -> float | None:
        """Set once a standalone took over: it takes no new requests and is released when
        idle (the consolidation owns it, not the replica count)."""
        return _float_annotation(self.record, DRAINING_SINCE_ANNOTATION)

    @property
    def idle_since(self) -> float | None:
        return _float_annotation(self.record, IDLE_SINCE_ANNOTATION)

    @property
    def promoted_at(self) -> float | None:
        """A standalone's own record of its promotion (see ``promoted``)."""
        return _float_annotation(self.record, PROMOTED_AT_ANNOTATION)

    @property
    def fetched_at(self) -> float | None:
        return _float_annotation(self.record, FETCHED_AT_ANNOTATION)

    @property
    def abandoned(self) -> str | None:
        """Why its consolidation was given up (it then keeps serving as it is)."""
        return self._annotation(ABANDONED_ANNOTATION)

    @property
    def origin(self) -> InstanceOrigin:
        return InstanceOrigin.CONSOLIDATION if self.consolidates else InstanceOrigin.COLD_START

    @property
    def phase(self) -> InstancePhase:
        if self.draining_since is not None:
            return InstancePhase.DRAINING
        if self.ready and not self.pending:
            return InstancePhase.READY
        return InstancePhase.STARTING

    @property
    def plan(self) -> InstancePlan | None:
        raw = (
            ((self.record or {}).get("metadata") or {}).get("annotations", {}).get(PLAN_ANNOTATION)
        )
        try:
            return InstancePlan.model_validate_json(raw) if raw else None
        except ValidationError:
            return None

    @property
    def template(self) -> str | None:
        ann = ((self.record or {}).get("metadata") or {}).get("annotations") or {}
        return ann.get(TEMPLATE_HASH_ANNOTATION)

    @property
    def requested_at(self) -> float:
        return _float_annotation(self.record, REQUESTED_AT_ANNOTATION) or 0.0

    @property
    def missing_ranks(self) -> tuple[int, ...]:
        plan = self.plan
        if plan is None:
            return ()
        return tuple(r for r in range(plan.pp) if r not in self.pods)

    @property
    def ready(self) -> bool:
        """Stage 0 serves only once every stage has loaded (vLLM waits for all ranks)."""
        plan = self.plan
        if plan is None or self.missing_ranks:
            return False
        head = self.pods.get(0)
        running = all((p.get("status") or {}).get("phase") == "Running" for p in self.pods.values())
        return head is not None and running and pod_ready(head)

    def failure(self, now: float, start_timeout_s: float) -> str | None:
        """Why this instance cannot become (or stay) ready, or None."""
        if self.record is None:
            return "its Service (the instance record) is gone"
        if self.plan is None:
            return "its Service has no readable placement plan"
        for rank, pod in sorted(self.pods.items()):
            status = pod.get("status") or {}
            if status.get("phase") in ("Failed", "Succeeded"):
                detail = status.get("message") or status.get("reason") or status.get("phase")
                return f"stage {rank} (pod {_name(pod)}) ended: {detail}"
            if (pod.get("metadata") or {}).get("deletionTimestamp"):
                return f"stage {rank} (pod {_name(pod)}) is being deleted"
        if not self.ready and self.requested_at and now - self.requested_at > start_timeout_s:
            return f"not ready {now - self.requested_at:.0f} s after it was requested"
        return None


def observe(services: Iterable[Obj], pods: Iterable[Obj]) -> list[ObservedInstance]:
    """Group a model's Services and worker pods into instances (oldest first)."""
    records: dict[str, Obj] = {}
    for svc in services:
        instance = ((svc.get("metadata") or {}).get("labels") or {}).get(INSTANCE_LABEL)
        if instance:
            records[instance] = svc
    stage_pods: dict[str, dict[int, Obj]] = {}
    for pod in pods:
        labels = (pod.get("metadata") or {}).get("labels") or {}
        instance, stage = labels.get(INSTANCE_LABEL), labels.get(STAGE_LABEL)
        if instance and stage is not None and stage.isdigit():
            stage_pods.setdefault(instance, {})[int(stage)] = pod
    names = set(records) | set(stage_pods)
    instances = [ObservedInstance(n, records.get(n), stage_pods.get(n, {})) for n in names]
    by_name = {i.name: i for i in instances}
    for k, inst in enumerate(instances):
        pipeline = by_name.get(inst.consolidates or "")
        promoted = inst.consolidates is not None and (
            inst.promoted_at is not None
            or (pipeline is not None and pipeline.draining_since is not None)
        )
        if promoted:
            instances[k] = replace(inst, promoted=True)
    return sorted(instances, key=lambda i: (i.requested_at, i.name))


@dataclass(frozen=True)
class Actions:
    create: int = 0
    complete: tuple[tuple[str, tuple[int, ...]], ...] = ()  # (instance, missing ranks)
    delete: tuple[tuple[str, str], ...] = ()  # (instance, why)

    @property
    def empty(self) -> bool:
        return not (self.create or self.complete or self.delete)


def desired_replicas(spec: ServerlessModelSpec) -> int:
    """spec.replicas (the gateway's ask), bounded by the scaling limits."""
    scaling = spec.scaling
    asked = scaling.min_replicas if spec.replicas is None else spec.replicas
    return max(scaling.min_replicas, min(asked, scaling.max_replicas))


def decide(
    desired: int,
    instances: Sequence[ObservedInstance],
    template: str,
    now: float,
    start_timeout_s: float,
) -> Actions:
    """What to change so that ``desired`` up-to-date instances exist.

    Failed instances go; outdated ones (another template) stay until enough up-to-date
    ones are ready, then go; surplus goes not-ready-first, then newest-first. Instances
    that a consolidation owns are not replicas: a draining pipeline (it goes when drained,
    or when it fails) and a standalone engine not promoted yet (it goes when its pipeline
    does; its own failure is the consolidation's to handle).
    """
    delete: list[tuple[str, str]] = []
    current: list[ObservedInstance] = []
    outdated: list[ObservedInstance] = []
    pending: list[ObservedInstance] = []
    for inst in instances:
        if inst.pending:
            pending.append(inst)
            continue
        why = inst.failure(now, start_timeout_s)
        if why is not None:
            delete.append((inst.name, f"failed: {why}"))
        elif inst.draining_since is not None:
            continue
        elif inst.template != template:
            outdated.append(inst)
        else:
            current.append(inst)
    surplus = len(current) - desired
    if surplus > 0:
        order = sorted(current, key=lambda i: (i.ready, -i.requested_at))
        for inst in order[:surplus]:
            delete.append((inst.name, f"scaled down to {desired}"))
        current = [i for i in current if i not in order[:surplus]]
    ready_current = sum(1 for i in current if i.ready)
    if outdated and (desired == 0 or ready_current >= desired):
        delete += [(i.name, "outdated: the spec changed") for i in outdated]
    going = {name for name, _ in delete}
    pipelines = {i.name for i in instances if i.record is not None and i.name not in going}
    for inst in pending:
        if inst.consolidates not in pipelines:
            delete.append((inst.name, f"its pipeline {inst.consolidates} is gone"))
    complete = tuple((i.name, i.missing_ranks) for i in current if i.missing_ranks)
    return Actions(create=max(0, desired - len(current)), complete=complete, delete=tuple(delete))


def _cold_start(inst: ObservedInstance) -> list[StageTiming]:
    """What the operator sees of a cold start, seconds since the instance was requested."""
    t0 = inst.requested_at
    if not t0:
        return []
    planned = _float_annotation(inst.record, PLANNED_AT_ANNOTATION)
    pods = list(inst.pods.values())
    preloaded = max(
        (v for p in pods if (v := _float_annotation(p, PRELOADED_AT_ANNOTATION))), default=None
    )
    scheduled = max((v for p in pods if (v := _condition_time(p, "PodScheduled"))), default=None)
    initialised = max((v for p in pods if (v := _condition_time(p, "Initialized"))), default=None)
    head = inst.pods.get(0)
    ready = _condition_time(head, "Ready") if head is not None and inst.ready else None
    marks = [
        ("plan", planned),
        ("preload", preloaded),
        ("schedule", scheduled),
        ("start", initialised),
        ("load", ready),
    ]
    timings: list[StageTiming] = []
    last = t0
    for stage, at in marks:
        if at is None:
            continue
        end = max(at, last)
        timings.append(StageTiming(stage=stage, start=round(last - t0, 3), end=round(end - t0, 3)))
        last = end
    return timings


def instance_status(inst: ObservedInstance, endpoint: str | None) -> InstanceStatus:
    plan = inst.plan
    workers = []
    for rank, pod in sorted(inst.pods.items()):
        stage: StagePlan | None = None
        if plan is not None and rank < plan.pp:
            stage = plan.stage(rank)
        else:
            raw = ((pod.get("metadata") or {}).get("annotations") or {}).get(PLAN_ANNOTATION)
            stage = StagePlan.model_validate(json.loads(raw)) if raw else None
        workers.append(
            WorkerStatus(
                pod=_name(pod),
                node=(pod.get("spec") or {}).get("nodeName") or (stage.node if stage else ""),
                stage=rank,
                layers=stage.layers if stage else "",
                ready=(pod.get("status") or {}).get("phase") == "Running"
                and (rank > 0 or pod_ready(pod)),
            )
        )
    phase = inst.phase
    return InstanceStatus(
        name=inst.name,
        pp=plan.pp if plan else max(len(inst.pods), 1),
        workers=workers,
        endpoint=endpoint if inst.record is not None else None,
        ready=phase == InstancePhase.READY,
        phase=phase,
        origin=inst.origin,
        cold_start=_cold_start(inst),
    )


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


def build_status(
    model_name: str,
    desired: int,
    instances: Sequence[ObservedInstance],
    endpoints: Mapping[str, str],
    previous: ServerlessModelStatus,
    now: float,
    *,
    invalid: str | None = None,
    invalid_reason: str = "InvalidSpec",
    unschedulable: str | None = None,
    generation: int | None = None,
    consolidating: bool = False,
    finished: Sequence[ConsolidationStatus] = (),
) -> ServerlessModelStatus:
    """What the user and the gateway read. ``consolidating``: a serving pipeline is being
    replaced by a standalone engine (see ``hydraserve.control.consolidation``); the phase
    is then Consolidating until its stages are released. ``finished``: consolidations that
    ended in this pass, added to the (bounded) history."""
    recorded = [i for i in instances if i.record is not None]
    statuses = [instance_status(i, endpoints.get(i.name)) for i in recorded]
    ready = sum(1 for s in statuses if s.ready)
    # Replicas: what the replica count owns (not a draining pipeline, nor a standalone
    # engine before it takes over).
    live = [i for i in recorded if not i.pending and i.draining_since is None]
    conditions = list(previous.conditions)
    if invalid is not None:
        conditions = set_condition(conditions, VALID, False, invalid_reason, invalid, now)
    else:
        conditions = set_condition(conditions, VALID, True, "SpecValid", "", now)
    if unschedulable is not None:
        conditions = set_condition(
            conditions, SCHEDULED, False, "Unschedulable", unschedulable, now
        )
    elif invalid is None and (live or desired == 0):
        conditions = set_condition(conditions, SCHEDULED, True, "Placed", "", now)
    if invalid is not None and not ready:
        conditions = set_condition(
            conditions, READY, False, invalid_reason, f"Not serving: {invalid}", now
        )
    elif desired == 0 and not live:
        conditions = set_condition(
            conditions,
            READY,
            False,
            "ScaledToZero",
            "No replicas asked for; the gateway scales the model up on its first request.",
            now,
        )
    elif ready >= max(desired, 1):
        conditions = set_condition(conditions, READY, True, "Serving", f"{ready} ready", now)
    else:
        conditions = set_condition(
            conditions, READY, False, "Starting", f"{ready}/{desired} instances ready", now
        )
    phase = model_phase(
        error=invalid, desired=desired, ready=ready, live=len(live), consolidating=consolidating
    )
    # The latest cold start that completed: request -> stage 0 ready.
    last_cold = previous.last_cold_start_seconds
    done = [
        s for s in statuses if s.ready and s.cold_start and s.origin == InstanceOrigin.COLD_START
    ]
    if done:
        latest = max(done, key=lambda s: next(i.requested_at for i in recorded if i.name == s.name))
        if latest.cold_start[-1].stage == "load":
            last_cold = latest.cold_start[-1].end
    again = {c.pipeline for c in finished}
    history = [c for c in previous.consolidations if c.pipeline not in again] + list(finished)
    return ServerlessModelStatus(
        phase=phase,
        replicas=len(live),
        ready_replicas=ready,
        selector=head_selector(model_name),
        instances=statuses,
        conditions=conditions,
        consolidations=history[-CONSOLIDATION_HISTORY:],
        last_cold_start_seconds=last_cold,
        observed_generation=generation if generation is not None else previous.observed_generation,
    )
