"""What the operator reads of an instance on Kubernetes, as neutral observations (pure).

An instance is its head Service (the record: placement plan, template, times and the
consolidation steps as annotations) plus one worker pod per stage. :func:`group` groups a
model's objects into :class:`InstanceObjects`; each then says what the lifecycle and
consolidation policies (``hydraserve.control``) need as an
:class:`~hydraserve.control.instances.InstanceObservation`, and what status shows of it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from pydantic import ValidationError

from hydraserve.api.models import InstanceStatus, StageTiming, WorkerStatus
from hydraserve.control.consolidation import no_consolidation_condition
from hydraserve.control.instances import InstanceObservation
from hydraserve.control.placement import InstancePlan, StagePlan
from hydraserve.control.status import parse_time
from hydraserve.operator.naming import (
    ABANDONED_ANNOTATION,
    CONSOLIDATES_LABEL,
    DRAINING_SINCE_ANNOTATION,
    FETCHED_AT_ANNOTATION,
    IDLE_SINCE_ANNOTATION,
    INSTANCE_LABEL,
    KV_TRANSFER_ANNOTATION,
    PLAN_ANNOTATION,
    PLANNED_AT_ANNOTATION,
    PRELOADED_AT_ANNOTATION,
    PROMOTED_AT_ANNOTATION,
    REQUESTED_AT_ANNOTATION,
    STAGE_LABEL,
    TEMPLATE_HASH_ANNOTATION,
    VERIFIED_AT_ANNOTATION,
)

Obj = Mapping[str, Any]


def _annotations(obj: Obj | None) -> Mapping[str, Any]:
    return ((obj or {}).get("metadata") or {}).get("annotations") or {}


def float_annotation(obj: Obj | None, key: str) -> float | None:
    value = _annotations(obj).get(key)
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def condition_time(pod: Obj, kind: str) -> float | None:
    """When a pod condition last became True (None: not True)."""
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind and cond.get("status") == "True":
            return parse_time(cond.get("lastTransitionTime")) or 0.0
    return None


def pod_ready(pod: Obj) -> bool:
    return condition_time(pod, "Ready") is not None


def name_of(obj: Obj) -> str:
    return str((obj.get("metadata") or {}).get("name"))


@dataclass(frozen=True)
class InstanceObjects:
    """One instance's Kubernetes objects."""

    name: str
    record: Obj | None  # the head Service; None while only orphaned pods remain
    pods: Mapping[int, Obj] = field(default_factory=dict)  # rank -> pod
    # A standalone engine (consolidation): it took over its pipeline, by its own record or
    # by its pipeline's (the pipeline's Service is marked draining first: the switch).
    promoted: bool = False

    def _annotation(self, key: str) -> str | None:
        value = _annotations(self.record).get(key)
        return str(value) if value is not None else None

    @property
    def consolidates(self) -> str | None:
        """The pipeline this standalone engine replaces (None: not a standalone)."""
        labels = ((self.record or {}).get("metadata") or {}).get("labels") or {}
        value = labels.get(CONSOLIDATES_LABEL)
        return str(value) if value else None

    @property
    def pending(self) -> bool:
        return self.consolidates is not None and not self.promoted

    @property
    def draining_since(self) -> float | None:
        return float_annotation(self.record, DRAINING_SINCE_ANNOTATION)

    @property
    def idle_since(self) -> float | None:
        return float_annotation(self.record, IDLE_SINCE_ANNOTATION)

    @property
    def promoted_at(self) -> float | None:
        """A standalone's own record of its promotion (see ``promoted``)."""
        return float_annotation(self.record, PROMOTED_AT_ANNOTATION)

    @property
    def fetched_at(self) -> float | None:
        return float_annotation(self.record, FETCHED_AT_ANNOTATION)

    @property
    def abandoned(self) -> str | None:
        """Why its consolidation was given up (it then keeps serving as it is)."""
        return self._annotation(ABANDONED_ANNOTATION)

    @property
    def kv_transfer(self) -> bool:
        return self._annotation(KV_TRANSFER_ANNOTATION) == "true"

    @property
    def plan(self) -> InstancePlan | None:
        raw = self._annotation(PLAN_ANNOTATION)
        try:
            return InstancePlan.model_validate_json(raw) if raw else None
        except ValidationError:
            return None

    @property
    def template(self) -> str | None:
        return self._annotation(TEMPLATE_HASH_ANNOTATION)

    @property
    def verified_at(self) -> float | None:
        """When every stage's bytes were seen verified (recorded on the Service)."""
        return float_annotation(self.record, VERIFIED_AT_ANNOTATION)

    @property
    def requested_at(self) -> float:
        return float_annotation(self.record, REQUESTED_AT_ANNOTATION) or 0.0

    @property
    def missing_ranks(self) -> tuple[int, ...]:
        plan = self.plan
        if plan is None:
            return ()
        return tuple(r for r in range(plan.pp) if r not in self.pods)

    @property
    def head_serving(self) -> bool:
        """Stage 0 is Ready, so every stage loaded (vLLM waits for all ranks), and every
        stage pod runs."""
        plan = self.plan
        if plan is None or self.missing_ranks:
            return False
        head = self.pods.get(0)
        running = all((p.get("status") or {}).get("phase") == "Running" for p in self.pods.values())
        return head is not None and running and pod_ready(head)

    def stage_failure(self) -> str | None:
        """Why this instance cannot become (or stay) ready, from its objects alone."""
        if self.record is None:
            return "its Service (the instance record) is gone"
        if self.plan is None:
            return "its Service has no readable placement plan"
        for rank, pod in sorted(self.pods.items()):
            status = pod.get("status") or {}
            if status.get("phase") in ("Failed", "Succeeded"):
                detail = status.get("message") or status.get("reason") or status.get("phase")
                return f"stage {rank} (pod {name_of(pod)}) ended: {detail}"
            if (pod.get("metadata") or {}).get("deletionTimestamp"):
                return f"stage {rank} (pod {name_of(pod)}) is being deleted"
        return None

    def ready_at(self, verified_at: float | None) -> float | None:
        """When it could first serve: stage 0 Ready and every byte verified."""
        head = self.pods.get(0)
        if head is None or not self.head_serving or verified_at is None:
            return None
        return max(condition_time(head, "Ready") or 0.0, verified_at)

    def observation(self, verified_at: float | None) -> InstanceObservation:
        """The neutral observation. ``verified_at``: when the node prefetchers verified
        the last of its stages' bytes (None: not all verified yet)."""
        plan = self.plan
        return InstanceObservation(
            name=self.name,
            pp=plan.pp if plan is not None else max(len(self.pods), 1),
            requested_at=self.requested_at,
            template=self.template,
            recorded=self.record is not None,
            head_serving=self.head_serving,
            bytes_verified=verified_at is not None,
            missing_stages=self.missing_ranks,
            failure=self.stage_failure() if self.record is not None else None,
            consolidates=self.consolidates,
            promoted=self.promoted,
            draining_since=self.draining_since,
            ready_at=self.ready_at(verified_at),
            verified_at=verified_at,
        )

    def detail(self, endpoint: str | None) -> InstanceStatus:
        """What status shows of it beyond its lifecycle: workers, endpoint, timings."""
        plan = self.plan
        workers = []
        for rank, pod in sorted(self.pods.items()):
            stage: StagePlan | None = None
            if plan is not None and rank < plan.pp:
                stage = plan.stage(rank)
            else:
                raw = _annotations(pod).get(PLAN_ANNOTATION)
                stage = StagePlan.model_validate(json.loads(raw)) if raw else None
            workers.append(
                WorkerStatus(
                    pod=name_of(pod),
                    node=(pod.get("spec") or {}).get("nodeName") or (stage.node if stage else ""),
                    stage=rank,
                    layers=stage.layers if stage else "",
                    ready=(pod.get("status") or {}).get("phase") == "Running"
                    and (rank > 0 or pod_ready(pod)),
                )
            )
        return InstanceStatus(
            name=self.name,
            pp=plan.pp if plan else max(len(self.pods), 1),
            tp=plan.tp if plan else 1,
            workers=workers,
            endpoint=endpoint if self.record is not None else None,
            cold_start=self._cold_start(),
            kv_transfer=self.kv_transfer,
            prediction=plan.prediction() if plan is not None else None,
            consolidation=no_consolidation_condition(plan),
        )

    def _cold_start(self) -> list[StageTiming]:
        """What the operator sees of a cold start, seconds since the instance was requested."""
        t0 = self.requested_at
        if not t0:
            return []
        planned = float_annotation(self.record, PLANNED_AT_ANNOTATION)
        pods = list(self.pods.values())
        preloaded = max(
            (v for p in pods if (v := float_annotation(p, PRELOADED_AT_ANNOTATION))), default=None
        )
        scheduled = max((v for p in pods if (v := condition_time(p, "PodScheduled"))), default=None)
        initialised = max(
            (v for p in pods if (v := condition_time(p, "Initialized"))), default=None
        )
        head = self.pods.get(0)
        ready = condition_time(head, "Ready") if head is not None and self.head_serving else None
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
            timings.append(
                StageTiming(stage=stage, start=round(last - t0, 3), end=round(end - t0, 3))
            )
            last = end
        return timings


def group(services: Iterable[Obj], pods: Iterable[Obj]) -> list[InstanceObjects]:
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
    instances = [InstanceObjects(n, records.get(n), stage_pods.get(n, {})) for n in names]
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
