"""Cluster observer: exports instance phases, records each cold start and each
consolidation once.

It reads the same ``ModelView``s as routing does, so cold-start and consolidation metrics
come out the same whichever backend (local processes, Kubernetes) produced them. A
standalone engine that replaced a pipeline is not a cold start; its consolidation is
recorded instead, when the backend reports it finished.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable

from hydraserve.api.models import ConsolidationStatus
from hydraserve.backends.base import (
    InstanceOrigin,
    InstancePhase,
    InstanceView,
    ModelView,
)
from hydraserve.gateway.catalog import model_id
from hydraserve.gateway.metrics import GatewayMetrics
from hydraserve.logs import get_logger

log = get_logger("gateway.observer")


def newly_ready(seen: set[str], instances: Iterable[InstanceView]) -> list[InstanceView]:
    """Instances whose cold start is finished and not in ``seen`` (pure; the caller
    updates ``seen``).

    Finished means Ready *and* ``ready_at`` recorded: a backend may route to an instance a
    moment before it has read the worker's timeline (the local backend waits briefly for
    the worker's engine_init mark), and a cold start recorded then would have no stages.
    """
    return [i for i in instances if _finished(i) and i.name not in seen]


def _finished(instance: InstanceView) -> bool:
    return instance.phase == InstancePhase.READY and instance.ready_at is not None


class ClusterObserver:
    def __init__(self, metrics: GatewayMetrics, started_at: float | None = None) -> None:
        self._metrics = metrics
        # Instances that were ready before the gateway started were counted by the gateway
        # that saw them start (or by nobody); a restart must not count them again.
        self._started_at = time.time() if started_at is None else started_at
        self._ready_seen: dict[str, set[str]] = {}  # model -> instance names seen ready
        self._consolidations_seen: dict[str, set[str]] = {}  # model -> pipelines recorded
        self._phase_labels: set[tuple[str, str]] = set()

    def observe_model(self, view: ModelView) -> None:
        seen = self._ready_seen.setdefault(model_id(view), set())
        for instance in newly_ready(seen, view.instances):
            if instance.origin == InstanceOrigin.CONSOLIDATION:
                continue
            if instance.ready_at is not None and instance.ready_at >= self._started_at:
                self._record_cold_start(model_id(view), instance)
        recorded = self._consolidations_seen.setdefault(model_id(view), set())
        for record in view.consolidations:
            if record.pipeline in recorded:
                continue
            recorded.add(record.pipeline)
            if record.started_at >= self._started_at:
                self._record_consolidation(model_id(view), record)
        if len(recorded) > 4 * max(1, len(view.consolidations)):
            recorded.intersection_update(r.pipeline for r in view.consolidations)
        # Forget instances that are gone, so the set stays as small as the model.
        seen.intersection_update(i.name for i in view.instances)
        seen.update(i.name for i in view.instances if _finished(i))

    def observe(self, views: list[ModelView]) -> None:
        labels: set[tuple[str, str]] = set()
        for view in views:
            self.observe_model(view)
            counts: dict[InstancePhase, int] = dict.fromkeys(InstancePhase, 0)
            for instance in view.instances:
                counts[instance.phase] += 1
            for phase, count in counts.items():
                self._metrics.instances.labels(model_id(view), phase.value).set(count)
                labels.add((model_id(view), phase.value))
        for model, phase_name in self._phase_labels - labels:
            self._metrics.instances.remove(model, phase_name)
        self._phase_labels = labels
        for gone in set(self._ready_seen) - {model_id(v) for v in views}:
            del self._ready_seen[gone]
            self._consolidations_seen.pop(gone, None)

    def _record_consolidation(self, model: str, record: ConsolidationStatus) -> None:
        metrics = self._metrics
        metrics.consolidations.labels(model, record.outcome).inc()
        total = record.seconds
        if total is not None:
            metrics.consolidation_seconds.labels(model).observe(total)
        steps = {
            "fetch": (record.started_at, record.fetched_at),
            "promote": (record.started_at, record.promoted_at),
            "drain": (record.promoted_at, record.released_at),
        }
        durations = {}
        for stage, (start, end) in steps.items():
            if start is not None and end is not None:
                durations[stage] = round(max(0.0, end - start), 3)
                metrics.consolidation_stage_seconds.labels(model, stage).observe(durations[stage])
        log.info(
            "consolidation.recorded",
            model=model,
            pipeline=record.pipeline,
            standalone=record.standalone,
            outcome=record.outcome,
            seconds=None if total is None else round(total, 3),
            stages=durations,
            reason=record.reason,
        )

    def _record_cold_start(self, model: str, instance: InstanceView) -> None:
        self._metrics.cold_starts.labels(model).inc()
        total = None
        if instance.ready_at is not None and instance.started_at:
            total = max(0.0, instance.ready_at - instance.started_at)
            self._metrics.cold_start_seconds.labels(model).observe(total)
        predicted = instance.prediction.ready_seconds if instance.prediction else None
        if total is not None and predicted is not None:
            self._metrics.cold_start_prediction_error.labels(model).observe(total - predicted)
        stages = {}
        for timing in instance.cold_start:
            seconds = max(0.0, timing.end - timing.start)
            self._metrics.cold_start_stage_seconds.labels(model, timing.stage).observe(seconds)
            stages[timing.stage] = round(seconds, 3)
        log.info(
            "coldstart.ready",
            model=model,
            instance=instance.name,
            pp=instance.pp,
            seconds=None if total is None else round(total, 3),
            predicted_seconds=None if predicted is None else round(predicted, 3),
            stages=stages,
        )

    async def run(self, list_models: Callable[[], list[ModelView]], interval: float) -> None:
        while True:
            try:
                self.observe(list_models())
            except Exception as exc:  # keep exporting after a backend hiccup
                log.error("observer.failed", error=repr(exc))
            await asyncio.sleep(interval)
