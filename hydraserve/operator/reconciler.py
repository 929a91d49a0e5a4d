"""The reconcile loop's adapter: observe the API, decide (pure code), act, write status.

One call to :meth:`Reconciler.reconcile` converges one ServerlessModel as far as it can
now and says when to try again. It is safe to call any number of times, from any trigger
(the model changed, a worker pod changed, a periodic resync, a restarted operator): calls
for one model are serialised and coalesced, and every action is derived from what exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
from pydantic import ValidationError

from hydraserve.api.models import (
    GROUP,
    PLURAL,
    VERSION,
    ConsolidationStatus,
    InstancePhase,
    InstanceStatus,
    ServerlessModelSpec,
    ServerlessModelStatus,
)
from hydraserve.api.validation import desired_replicas, spec_errors
from hydraserve.control import reasons
from hydraserve.control.coldstart import newly_measured, take_measurement
from hydraserve.control.consolidation import (
    Abandon,
    ConsolidationAction,
    FetchWholeModel,
    PipelineConsolidation,
    Promote,
    Release,
    StartStandalone,
    consolidating,
    consolidation_plan,
)
from hydraserve.control.instances import (
    InstanceObservation,
    decide_instances,
    timed_out,
)
from hydraserve.control.placement import (
    InstancePlan,
    all_card_stage,
    kv_hand_over,
    standalone_plan,
)
from hydraserve.control.policy import Violation, check_spec, describe, models_ahead
from hydraserve.control.status import build_status
from hydraserve.kube.client import KubeClient, KubeError, path_of
from hydraserve.logs import get_logger
from hydraserve.operator.cluster_state import cluster_state, prefetcher_urls, reserve
from hydraserve.operator.consolidation import (
    Observed,
    finished_record,
    pipeline_consolidation,
    pipelines,
    standalones,
    whole_model_fetch,
)
from hydraserve.operator.inventory import Inventory, ListedInventory
from hydraserve.operator.manifests import (
    endpoint_url,
    instance_network_policy,
    instance_service,
    kv_volume,
    model_volume,
    standalone_objects,
    worker_pod,
)
from hydraserve.operator.naming import (
    ABANDONED_ANNOTATION,
    DRAINING_SINCE_ANNOTATION,
    FETCHED_AT_ANNOTATION,
    IDLE_SINCE_ANNOTATION,
    KV_AREA_LABEL,
    MANAGED_BY,
    MANAGED_BY_VALUE,
    MODEL_LABEL,
    NODE_LABEL,
    PROMOTED_AT_ANNOTATION,
    VERIFIED_AT_ANNOTATION,
    VOLUME_NAMESPACE_LABEL,
    head_selector,
    kv_area_name,
    new_instance_name,
    standalone_name,
    template_hash,
)
from hydraserve.operator.planning import Planner, plan_request, planner_for
from hydraserve.operator.prefetchers import Prefetchers
from hydraserve.operator.records import InstanceObjects, group
from hydraserve.operator.settings import OperatorSettings
from hydraserve.planner.calibration import CalibrationState, Calibrator, ColdStartRecord
from hydraserve.planner.types import ClusterState, Plan, PlanRequest, Unschedulable
from hydraserve.prefetcher.node import NodeStatus, PreloadRequest
from hydraserve.prefetcher.shm import FetchState, FetchStatus, fetch_name
from hydraserve.store import Manifest, ModelRef, ModelStore, StoreError
from hydraserve.store.uri import StoreURIError
from hydraserve.worker.inflight import INFLIGHT_PATH

CALIBRATION_CONFIGMAP = "hydraserve-planner-calibration"
NETWORKING_API = "networking.k8s.io/v1"
CALIBRATION_KEY = "state.json"
log = get_logger("operator")

MODELS_API = f"{GROUP}/{VERSION}"


class EventSink(Protocol):
    def __call__(self, obj: Mapping[str, Any], type_: str, reason: str, message: str) -> None: ...


def _no_events(obj: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
    return None


def load_manifest(uri: str, revision: str) -> Manifest:
    from hydraserve.settings import CommonSettings

    return ModelStore(ModelRef(uri, revision), CommonSettings().s3).manifest()


@dataclass(frozen=True)
class Outcome:
    retry_after: float | None = None  # seconds; None = converged or waiting on events
    message: str = ""


def model_path(namespace: str, name: str | None = None, sub: str | None = None) -> str:
    return path_of(MODELS_API, PLURAL, namespace, name, sub)


class Reconciler:
    def __init__(
        self,
        client: KubeClient,
        settings: OperatorSettings,
        *,
        planner: Planner | None = None,
        manifest_loader: Callable[[str, str], Manifest] = load_manifest,
        events: EventSink = _no_events,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.settings = settings
        self.planner = planner or self._plan_calibrated
        # The planner's fitted constants, kept in a ConfigMap beside the operator.
        self.calibrator = Calibrator(settings)
        self._calibration_loaded = False
        # What each cold start was planned from, until it is measured (replay history;
        # not kept across restarts).
        self._plan_inputs: dict[str, tuple[PlanRequest, ClusterState]] = {}
        self.manifest_loader = manifest_loader
        self.events = events
        self.clock = clock
        self.prefetchers = Prefetchers(
            preload_timeout_s=settings.preload_timeout_seconds,
            probe_timeout_s=settings.probe_timeout_seconds,
            clock=clock,
        )
        self._http = httpx.AsyncClient(timeout=settings.probe_timeout_seconds)
        self._locks: dict[tuple[str, str], asyncio.Lock] = defaultdict(asyncio.Lock)
        self._queued: dict[tuple[str, str], bool] = defaultdict(bool)
        self._manifests: dict[tuple[str, str], Manifest] = {}
        self.policy = settings.consolidation_policy()
        self.lifecycle = settings.lifecycle_policy()
        self.passes = 0  # completed reconcile passes (tests wait on it, not on time)
        # Listed until kopf's watch-fed indexes are bound (operator/handlers.py).
        self.inventory: Inventory = ListedInventory(client, settings)

    async def close(self) -> None:
        await self._http.aclose()
        await self.prefetchers.close()

    async def reconcile(self, namespace: str, name: str) -> Outcome:
        """Converge one model. Concurrent calls coalesce: one runs, at most one waits."""
        key = (namespace, name)
        if self._queued[key]:
            return Outcome(message="coalesced with a queued reconcile")
        self._queued[key] = True
        async with self._locks[key]:
            self._queued[key] = False
            try:
                return await self._reconcile(namespace, name)
            finally:
                self.passes += 1

    # -- observation -------------------------------------------------------------------

    async def _objects(self, namespace: str, name: str) -> list[InstanceObjects]:
        labels = {MANAGED_BY: MANAGED_BY_VALUE, MODEL_LABEL: name}
        services, pods = await asyncio.gather(
            self.client.list(path_of("v1", "services", namespace), labels),
            self.client.list(path_of("v1", "pods", namespace), labels),
        )
        return group(services, pods)

    async def _prefetcher_urls(self) -> dict[str, str]:
        return prefetcher_urls(await self.inventory.prefetcher_pods(), self.settings)

    async def _node_statuses(self, urls: Mapping[str, str]) -> dict[str, NodeStatus | None]:
        return await self.prefetchers.statuses(urls, self.settings.node_status_max_age_seconds)

    def _observe(
        self,
        objects: list[InstanceObjects],
        spec: ServerlessModelSpec,
        nodes: Mapping[str, NodeStatus | None],
        now: float,
    ) -> list[Observed]:
        """Each instance's neutral observation: its objects, plus whether its nodes'
        prefetchers verified every byte of its stages (readiness needs both)."""
        observed = []
        for inst in objects:
            verified = inst.verified_at or _verified_at(inst, spec, nodes)
            obs = inst.observation(verified)
            observed.append((inst, timed_out(obs, now, self.lifecycle)))
        return observed

    async def _record_verified(
        self,
        model: Mapping[str, Any],
        objects: list[InstanceObjects],
        spec: ServerlessModelSpec,
        nodes: Mapping[str, NodeStatus | None],
    ) -> bool:
        """Write ``verified-at`` on each instance whose stages were all verified now, so
        readiness does not depend on a prefetcher remembering its fetches. Whether any
        record changed."""
        changed = False
        for inst in objects:
            if inst.record is None or inst.verified_at is not None:
                continue
            at = _verified_at(inst, spec, nodes)
            if at is None:
                continue
            with contextlib.suppress(KubeError):  # gone meanwhile: the next pass sees it
                await self._annotate(model, inst.name, {VERIFIED_AT_ANNOTATION: f"{at:.3f}"})
                changed = True
        return changed

    async def _policy_violations(
        self, model: Mapping[str, Any], spec: ServerlessModelSpec
    ) -> list[Violation]:
        meta = model["metadata"]
        policy = self.settings.policy_for(meta["namespace"])
        ahead = 0
        if policy.max_models is not None:
            # Listed only when a quota applies: the namespace's models, oldest first.
            others = await self.client.list(model_path(meta["namespace"]))
            ahead = models_ahead(
                meta["name"],
                meta.get("creationTimestamp"),
                [
                    (o["metadata"]["name"], o["metadata"].get("creationTimestamp"))
                    for o in others
                    if not o["metadata"].get("deletionTimestamp")
                ],
            )
        return check_spec(spec, policy, self.settings.worker_image, ahead)

    async def _manifest(self, spec: ServerlessModelSpec) -> Manifest:
        key = (spec.source.uri, spec.source.revision)
        if key not in self._manifests:
            self._manifests[key] = await asyncio.to_thread(self.manifest_loader, *key)
        return self._manifests[key]

    # -- the loop ----------------------------------------------------------------------

    def _plan_calibrated(self, request: PlanRequest, cluster: ClusterState) -> Plan | Unschedulable:
        return planner_for(self.calibrator.config(self.settings.planner))(request, cluster)

    async def _load_calibration(self) -> None:
        if self._calibration_loaded:
            return
        self._calibration_loaded = True
        with contextlib.suppress(KubeError):
            found = await self.client.get(self._calibration_path())
            raw = ((found or {}).get("data") or {}).get(CALIBRATION_KEY)
            if raw:
                with contextlib.suppress(ValueError):
                    self.calibrator.state = CalibrationState.model_validate_json(raw)

    def _calibration_path(self, named: bool = True) -> str:
        ns = self.settings.prefetcher_namespace
        return path_of("v1", "configmaps", ns, CALIBRATION_CONFIGMAP if named else None)

    async def _measured(self, record: ColdStartRecord) -> None:
        """A cold start became ready: log it beside its prediction; calibrate and keep
        the fitted constants in the ConfigMap."""
        inputs = self._plan_inputs.pop(record.instance, None)
        take_measurement(self.calibrator, record, self.settings.planner, inputs, self.clock(), log)
        data = {CALIBRATION_KEY: self.calibrator.state.model_dump_json()}
        try:
            await self.client.merge_patch(self._calibration_path(), {"data": data})
        except KubeError as exc:
            if exc.status != 404:
                log.warning("calibration.save_failed", error=str(exc))
                return
            body = {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {
                    "name": CALIBRATION_CONFIGMAP,
                    "labels": {MANAGED_BY: MANAGED_BY_VALUE},
                },
                "data": data,
            }
            with contextlib.suppress(KubeError):
                await self.client.create(self._calibration_path(named=False), body)

    async def _reconcile(self, namespace: str, name: str) -> Outcome:
        await self._load_calibration()
        model = await self.client.get(model_path(namespace, name))
        if model is None or (model.get("metadata") or {}).get("deletionTimestamp"):
            return Outcome(message="gone or being deleted")
        model.setdefault("metadata", {}).setdefault("namespace", namespace)
        now = self.clock()
        previous = _previous_status(model)
        objects = await self._objects(namespace, name)
        urls = await self._prefetcher_urls()

        errors = spec_errors(model.get("spec") or {})
        if errors is not None:
            old = next((c for c in previous.conditions if c.type == reasons.VALID), None)
            if old is None or old.message != errors:
                log.warning("model.invalid", model=name, namespace=namespace, problems=errors)
                self.events(model, reasons.WARNING, reasons.INVALID_SPEC, errors)
            observed = [(i, i.observation(None)) for i in objects]
            status = build_status(
                desired=0,
                instances=self._details(observed, namespace),
                previous=previous,
                now=now,
                invalid=errors,
                selector=head_selector(name),
            )
            await self._write_status(model, previous, status)
            return Outcome(message=errors)  # nothing to retry: the user must change the spec

        spec = ServerlessModelSpec.model_validate(model["spec"])
        violations = await self._policy_violations(model, spec)
        if violations:
            # Nothing runs against the admin's policy: existing instances go too (the
            # policy may have changed under a serving model).
            message = describe(violations)
            old = next((c for c in previous.conditions if c.type == reasons.VALID), None)
            if old is None or old.message != message:
                log.warning(
                    "model.policy_violation",
                    model=name,
                    namespace=namespace,
                    rules=[v.rule for v in violations],
                    problems=message,
                )
                self.events(model, reasons.WARNING, reasons.POLICY_VIOLATION, message)
            for inst in objects:
                await self._delete_instance(model, inst, "policy violation")
            status = build_status(
                desired=0,
                instances=[],
                previous=previous,
                now=now,
                invalid=message,
                invalid_reason=reasons.POLICY_VIOLATION,
                selector=head_selector(name),
            )
            await self._write_status(model, previous, status)
            return Outcome(message=message)  # the spec or the policy must change

        desired = desired_replicas(spec)
        template = template_hash(spec, self.settings.worker_image)
        nodes = await self._node_statuses(urls)
        observed = self._observe(objects, spec, nodes, now)
        decision = decide_instances(
            desired, [o for _, o in observed], template, previous.failures, now, self.lifecycle
        )
        by_name = {i.name: i for i in objects}
        failed = dict(decision.newly_failed)
        for instance, why in decision.delete:
            if instance in failed:
                log.warning(
                    "instance.failed", model=name, instance=instance, error=failed[instance]
                )
                self.events(
                    model,
                    reasons.WARNING,
                    reasons.INSTANCE_FAILED,
                    f"{instance}: {failed[instance]}",
                )
            await self._delete_instance(model, by_name[instance], why)
        if decision.gave_up and decision.newly_failed:
            log.error("model.gave_up", model=name, namespace=namespace, reason=decision.gave_up)
            self.events(model, reasons.WARNING, reasons.INSTANCES_FAILING, decision.gave_up)

        retry: float | None = decision.retry_in
        invalid: str | None = None
        unschedulable: str | None = None
        if decision.create or decision.complete:
            try:
                manifest = await self._manifest(spec)
            except (StoreError, StoreURIError, OSError, ValidationError) as exc:
                invalid = (
                    f"cannot read the model from the store: {exc}. Check spec.source "
                    "(uri, revision) and the store credentials; retrying."
                )
                retry = self.settings.retry_seconds
                log.warning(
                    "model.source_unreadable", model=name, namespace=namespace, error=str(exc)
                )
                self.events(model, reasons.WARNING, reasons.MODEL_NOT_FOUND, invalid)
            else:
                for instance, ranks in decision.complete:
                    inst = by_name[instance]
                    plan = inst.plan
                    assert plan is not None  # only instances with a plan have missing stages
                    log.info("instance.resume", model=name, instance=instance, stages=list(ranks))
                    await self._create_stages(model, spec, instance, plan, ranks, template, urls)
                if decision.create:
                    unschedulable = await self._create_instances(
                        model, spec, manifest, decision.create, template, urls, nodes, now
                    )
                    if unschedulable is not None:
                        retry = self.settings.retry_seconds

        changed = await self._record_verified(model, objects, spec, nodes)
        if changed or not decision.empty:
            objects = await self._objects(namespace, name)
        observed = self._observe(objects, spec, nodes, now)
        changed, finished, records = await self._consolidate(model, spec, template, observed, urls)
        if changed:
            objects = await self._objects(namespace, name)
            observed = self._observe(objects, spec, nodes, now)
        status = build_status(
            desired=desired,
            instances=self._details(observed, namespace),
            previous=previous,
            now=now,
            failures=decision.failures,
            gave_up=decision.gave_up,
            retry_in=decision.retry_in,
            invalid=invalid,
            invalid_reason=reasons.MODEL_NOT_FOUND,
            unschedulable=unschedulable,
            consolidating=consolidating(records, self.policy),
            finished=finished,
            selector=head_selector(name),
            generation=(model.get("metadata") or {}).get("generation"),
        )
        await self._write_status(model, previous, status)
        message = invalid or unschedulable or decision.gave_up or status.phase.value
        return Outcome(retry_after=retry, message=message)

    def _details(
        self, observed: list[Observed], namespace: str
    ) -> list[tuple[InstanceObservation, InstanceStatus]]:
        return [
            (obs, inst.detail(endpoint_url(inst.name, namespace, self.settings)))
            for inst, obs in observed
        ]

    # -- consolidation (decision 0402) -------------------------------------------------

    async def _consolidate(
        self,
        model: Mapping[str, Any],
        spec: ServerlessModelSpec,
        template: str,
        observed: list[Observed],
        urls: Mapping[str, str],
    ) -> tuple[bool, list[ConsolidationStatus], list[PipelineConsolidation]]:
        """Observe every pipeline's consolidation, plan (shared, pure), apply. Each step is
        derived from Kubernetes objects and the HTTP probes, so any pass, by any operator
        replica, continues where the last one stopped. (Whether something changed, the
        consolidations that ended, the records observed.)"""
        name = model["metadata"]["name"]
        by_pipeline = standalones(observed)
        changed = False
        finished: list[ConsolidationStatus] = []
        if not self.policy.enabled:
            # Turned off: a standalone not promoted yet goes; a draining pipeline still
            # drains (the plan releases it), its standalone serves.
            for objects, obs in by_pipeline.values():
                if obs.pending:
                    await self._delete_instance(model, objects, "consolidation is off")
                    changed = True
        # Draining pipelines always (they are released); serving ones while consolidation
        # is on and not given up for them.
        serving = [
            (objects, obs)
            for objects, obs in pipelines(observed)
            if obs.phase == InstancePhase.DRAINING
            or (self.policy.enabled and objects.abandoned is None)
        ]
        if not serving:
            return changed, finished, []
        ready = any(obs.phase == InstancePhase.READY for _, obs in serving)
        nodes = await self._node_statuses(urls) if ready else {}
        now = self.clock()
        records = []
        fetches: dict[str, FetchStatus | None] = {}
        for objects, obs in serving:
            fetch = None
            stage = all_card_stage(objects.plan)
            if obs.phase == InstancePhase.READY and objects.abandoned is None and stage:
                if stage.node not in urls:
                    # Nothing could fetch and verify the whole model there: give up (a
                    # prefetcher that does not answer now is asked again instead).
                    fetch = FetchStatus(
                        state=FetchState.FAILED,
                        started_at=now,
                        error=f"no node prefetcher on {stage.node}",
                    )
                else:
                    fetch = whole_model_fetch(
                        nodes.get(stage.node), spec.source.uri, spec.source.revision
                    )
            fetches[objects.name] = fetch
            in_flight = None
            if obs.phase == InstancePhase.DRAINING:
                in_flight = await self._in_flight(objects)
            record = pipeline_consolidation(
                (objects, obs), by_pipeline.get(objects.name), fetch, in_flight, now
            )
            if obs.phase == InstancePhase.DRAINING and record.idle_since != objects.idle_since:
                idle = None if record.idle_since is None else f"{record.idle_since:.3f}"
                await self._annotate(model, objects.name, {IDLE_SINCE_ANNOTATION: idle})
                changed = True
            records.append(record)
        by_name = {objects.name: objects for objects, _ in observed}
        for action in consolidation_plan(records, self.policy, now):
            pipeline = by_name[action.pipeline]
            replacement = by_pipeline.get(pipeline.name)
            try:
                ended = await self._apply(
                    model,
                    spec,
                    template,
                    pipeline,
                    replacement[0] if replacement else None,
                    action,
                    urls,
                    fetches.get(pipeline.name),
                    now,
                )
            except KubeError as exc:
                # The next pass observes what happened and asks again.
                log.warning(
                    "consolidation.action_failed",
                    model=name,
                    instance=pipeline.name,
                    action=type(action).__name__,
                    error=str(exc),
                )
            else:
                if ended is not None:
                    finished.append(ended)
            changed = True
        return changed, finished, records

    async def _apply(
        self,
        model: Mapping[str, Any],
        spec: ServerlessModelSpec,
        template: str,
        pipeline: InstanceObjects,
        replacement: InstanceObjects | None,
        action: ConsolidationAction,
        urls: Mapping[str, str],
        fetch: FetchStatus | None,
        now: float,
    ) -> ConsolidationStatus | None:
        """Apply one step; ``replacement`` is the standalone engine observed for it,
        ``fetch`` the node's whole-model fetch. A history entry when the consolidation
        ended (released or abandoned)."""
        name, namespace = model["metadata"]["name"], model["metadata"]["namespace"]
        standalone = standalone_name(pipeline.name)
        if isinstance(action, FetchWholeModel):
            # Low priority: it yields to cold-start fetches on the node (decision 0101).
            url = urls.get(action.node or "")
            log.info("consolidation.fetch", model=name, instance=pipeline.name, node=action.node)
            await self._preload(name, pipeline.name, spec, 1, 0, url, low_priority=True)
        elif isinstance(action, StartStandalone):
            assert pipeline.plan is not None  # pipelines() only yields planned instances
            plan = standalone_plan(pipeline.plan)
            node = plan.stages[0].node
            url = urls.get(node)
            # It loads the KV its pipeline saved: the pipeline's area, when it had one.
            kv_area = (
                kv_area_name(namespace, pipeline.name)
                if kv_hand_over(pipeline.plan, self.settings.kv_transfer)
                else None
            )
            await self._ensure_volumes(model, spec, {node}, kv_area, node, urls)
            await self._ensure_network_policy(model, standalone)
            service, pod = standalone_objects(
                model, spec, pipeline.name, plan, template, url, now, self.settings, kv_area
            )
            for plural, obj in (("services", service), ("pods", pod)):
                try:  # same names on every try: a second standalone cannot exist
                    await self.client.create(path_of("v1", plural, namespace), obj)
                except KubeError as exc:
                    if exc.status != 409:
                        raise
            log.info(
                "consolidation.start",
                model=name,
                instance=pipeline.name,
                standalone=standalone,
                node=plan.stages[0].node,
            )
            self.events(
                model,
                reasons.NORMAL,
                reasons.CONSOLIDATION_STARTED,
                f"{standalone}: a pp=1 engine on {plan.stages[0].node} to replace "
                f"{pipeline.name} (pp={pipeline.plan.pp})",
            )
        elif isinstance(action, Promote):
            # The switch is one write, on the pipeline's record: from here on the
            # standalone counts as promoted (the next line only makes that its own).
            stamp = f"{now:.3f}"
            fetched = (fetch.finished_at if fetch is not None else None) or now
            await self._annotate(
                model,
                pipeline.name,
                {DRAINING_SINCE_ANNOTATION: stamp, FETCHED_AT_ANNOTATION: f"{fetched:.3f}"},
            )
            await self._annotate(model, standalone, {PROMOTED_AT_ANNOTATION: stamp})
            log.info(
                "consolidation.promoted",
                model=name,
                instance=pipeline.name,
                standalone=standalone,
                since_requested_s=round(now - pipeline.requested_at, 3),
            )
            self.events(
                model,
                reasons.NORMAL,
                reasons.CONSOLIDATION_PROMOTED,
                f"{standalone} serves; {pipeline.name} drains",
            )
        elif isinstance(action, Release):
            # Promoted by its own record before the pipeline's (the switch) goes; it may
            # be gone already (scaled down while the pipeline drained).
            if replacement is not None and replacement.promoted_at is None:
                stamp = f"{pipeline.draining_since or now:.3f}"
                try:
                    await self._annotate(model, standalone, {PROMOTED_AT_ANNOTATION: stamp})
                except KubeError as exc:
                    if exc.status != 404:
                        raise
            await self._delete_instance(model, pipeline, f"consolidated ({action.reason})")
            log.info(
                "consolidation.done",
                model=name,
                instance=pipeline.name,
                standalone=standalone,
                drain_s=round(now - (pipeline.draining_since or now), 3),
                reason=action.reason,
            )
            self.events(
                model,
                reasons.NORMAL,
                reasons.CONSOLIDATION_DONE,
                f"{standalone} replaced {pipeline.name} ({action.reason})",
            )
            return finished_record(pipeline, replacement, now, outcome="done", reason=action.reason)
        elif isinstance(action, Abandon):
            # Recorded first, so that no pass starts another standalone for this pipeline.
            await self._annotate(model, pipeline.name, {ABANDONED_ANNOTATION: action.reason})
            if replacement is not None:
                why = f"consolidation abandoned: {action.reason}"
                await self._delete_instance(model, replacement, why)
            log.warning(
                "consolidation.abandoned",
                model=name,
                instance=pipeline.name,
                standalone=standalone,
                reason=action.reason,
            )
            self.events(
                model,
                reasons.WARNING,
                reasons.CONSOLIDATION_ABANDONED,
                f"{pipeline.name} keeps serving: {action.reason}",
            )
            return finished_record(
                pipeline, replacement, now, outcome="abandoned", reason=action.reason
            )
        return None

    async def _annotate(
        self, model: Mapping[str, Any], service: str, annotations: Mapping[str, str | None]
    ) -> None:
        """Merge annotations into an instance's record (None removes one)."""
        namespace = model["metadata"]["namespace"]
        await self.client.merge_patch(
            path_of("v1", "services", namespace, service),
            {"metadata": {"annotations": dict(annotations)}},
        )

    async def _in_flight(self, pipeline: InstanceObjects) -> int | None:
        """Requests the pipeline's engine serves now, asked of its head pod (None: no
        answer; the drain timeout still releases it)."""
        head = pipeline.pods.get(0)
        ip = ((head or {}).get("status") or {}).get("podIP")
        if not ip:
            return None
        url = f"http://{ip}:{self.settings.worker_port}{INFLIGHT_PATH}"
        try:
            resp = await self._http.get(url, timeout=self.settings.probe_timeout_seconds)
            return int(resp.json()["in_flight"]) if resp.status_code == 200 else None
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return None

    async def _create_instances(
        self,
        model: Mapping[str, Any],
        spec: ServerlessModelSpec,
        manifest: Manifest,
        count: int,
        template: str,
        prefetchers: Mapping[str, str],
        node_statuses: Mapping[str, NodeStatus | None],
        requested_at: float,
    ) -> str | None:
        """Plan and create ``count`` instances; the planner's reason if one did not fit."""
        name = model["metadata"]["name"]
        nodes, worker_pods = await asyncio.gather(
            self.inventory.nodes(), self.inventory.worker_pods()
        )
        cluster, skipped = cluster_state(
            nodes, worker_pods, self.settings, node_statuses, self.clock()
        )
        try:
            request = plan_request(spec, manifest)
        except ValueError as exc:  # resources.gpuMemoryGiB cannot hold the weights
            reason = f"{exc}; raise spec.resources.gpuMemoryGiB"
            self.events(model, reasons.WARNING, reasons.UNSCHEDULABLE, reason)
            return reason
        for _ in range(count):
            started = self.clock()
            seen = cluster
            plan: Plan | Unschedulable = self.planner(request, cluster)
            if isinstance(plan, Unschedulable):
                reason = plan.reason
                if skipped:
                    left_out = ", ".join(f"{n} ({why})" for n, why in sorted(skipped.items()))
                    reason += f"; nodes left out: {left_out}"
                log.warning("instance.unschedulable", model=name, reason=reason)
                self.events(model, reasons.WARNING, reasons.UNSCHEDULABLE, reason)
                return reason
            cluster = reserve(cluster, plan, self.settings)
            planned_at = self.clock()
            # Each prefetcher keeps its fetch's deadline and reports it, so later plans
            # (this operator's, after a restart too) do not admit a fetch that makes it late.
            deadlines = {
                s.rank: planned_at + s.fetch_deadline_s
                for s in plan.stages
                if math.isfinite(s.fetch_deadline_s)
            }
            await self._create_instance(
                model,
                spec,
                InstancePlan.from_plan(plan),
                template,
                prefetchers,
                requested_at,
                planned_at=planned_at,
                plan_seconds=planned_at - started,
                deadlines=deadlines,
                inputs=(request, seen),
            )
        return None

    async def _create_instance(
        self,
        model: Mapping[str, Any],
        spec: ServerlessModelSpec,
        plan: InstancePlan,
        template: str,
        prefetchers: Mapping[str, str],
        requested_at: float,
        planned_at: float,
        plan_seconds: float,
        deadlines: Mapping[int, float],
        inputs: tuple[PlanRequest, ClusterState] | None = None,
    ) -> None:
        name, namespace = model["metadata"]["name"], model["metadata"]["namespace"]
        instance = new_instance_name(name)
        if inputs is not None:
            self._plan_inputs[instance] = inputs
        record = instance_service(
            model, instance, plan, template, requested_at, planned_at, self.settings
        )
        # The record first: after a crash from here on, the next reconcile finishes this
        # instance (missing stages) instead of planning another.
        await self.client.create(path_of("v1", "services", namespace), record)
        placement = ", ".join(
            f"stage {s.rank} on {s.node}/gpu{','.join(map(str, s.devices))}" for s in plan.stages
        )
        log.info(
            "instance.planned",
            model=name,
            instance=instance,
            pp=plan.pp,
            tp=plan.tp,
            placement=placement,
            predicted_ttft_s=round(plan.predicted_ttft_s, 2),
            plan_s=round(plan_seconds, 4),
        )
        self.events(
            model,
            reasons.NORMAL,
            reasons.INSTANCE_PLANNED,
            f"{instance}: pp={plan.pp}, tp={plan.tp}, {placement}; predicted cold TTFT "
            f"{plan.predicted_ttft_s:.1f} s ({plan.reason})",
        )
        await self._create_stages(
            model, spec, instance, plan, tuple(range(plan.pp)), template, prefetchers, deadlines
        )

    async def _create_stages(
        self,
        model: Mapping[str, Any],
        spec: ServerlessModelSpec,
        instance: str,
        plan: InstancePlan,
        ranks: tuple[int, ...],
        template: str,
        prefetchers: Mapping[str, str],
        deadlines: Mapping[int, float] | None = None,
    ) -> None:
        """Pre-load every stage on its node, then create the stage pods. Each worker is
        told its node's prefetcher even when the pre-load was not accepted (it asks again
        itself): the prefetcher's verified fetch is what makes the instance Ready."""
        name, namespace = model["metadata"]["name"], model["metadata"]["namespace"]
        urls = {r: prefetchers.get(plan.stage(r).node) for r in ranks}
        accepted = await asyncio.gather(
            *(
                self._preload(
                    name, instance, spec, plan.pp, r, urls[r], deadline=(deadlines or {}).get(r)
                )
                for r in ranks
            )
        )
        preloaded_at = self.clock()
        await self._ensure_network_policy(model, instance)
        kv_area = (
            kv_area_name(namespace, instance)
            if kv_hand_over(plan, self.settings.kv_transfer)
            else None
        )
        await self._ensure_volumes(
            model,
            spec,
            {plan.stage(r).node for r in ranks},
            kv_area,
            plan.stage(0).node,
            prefetchers,
        )
        for rank, ok in zip(ranks, accepted, strict=True):
            url = urls[rank]
            pod = worker_pod(
                model,
                spec,
                instance,
                plan,
                rank,
                template,
                url,
                preloaded_at if ok else None,
                self.settings,
                kv_area,
            )
            try:
                await self.client.create(path_of("v1", "pods", namespace), pod)
                self.inventory.created(pod)
            except KubeError as exc:
                if exc.status != 409:
                    raise
                log.info("pod.exists", model=name, instance=instance, stage=rank)
                continue
            log.info(
                "pod.created",
                model=name,
                instance=instance,
                stage=rank,
                pod=pod["metadata"]["name"],
                node=plan.stage(rank).node,
            )

    async def _create_once(self, path: str, body: Mapping[str, Any]) -> None:
        try:
            await self.client.create(path, body)
        except KubeError as exc:
            if exc.status != 409:
                raise

    async def _ensure_volumes(
        self,
        model: Mapping[str, Any],
        spec: ServerlessModelSpec,
        nodes: set[str],
        kv_area: str | None,
        kv_node: str,
        prefetchers: Mapping[str, str],
    ) -> None:
        """The claims a worker mounts instead of the node's shared memory (decision
        0500): the model's directory on each node, read-only, and the instance's KV area
        (created by the node's prefetcher, writable by the workers' user only)."""
        namespace = model["metadata"]["namespace"]
        size = (await self._manifest(spec)).weights_size
        pairs = [model_volume(model, spec, node, size, self.settings) for node in sorted(nodes)]
        if kv_area is not None:
            url = prefetchers.get(kv_node)
            error = (
                "no prefetcher on the node"
                if url is None
                else await self.prefetchers.open_kv_area(
                    url, kv_area, self.settings.worker_run_as_user
                )
            )
            if error is not None:
                log.warning(
                    "kv_area.unavailable",
                    model=model["metadata"]["name"],
                    area=kv_area,
                    node=kv_node,
                    error=error,
                )
            pairs.append(kv_volume(model, kv_area, kv_node, self.settings))
        for pv, pvc in pairs:
            await self._create_once(path_of("v1", "persistentvolumes"), pv)
            await self._create_once(path_of("v1", "persistentvolumeclaims", namespace), pvc)

    async def _ensure_network_policy(self, model: Mapping[str, Any], instance: str) -> None:
        if self.settings.network_policy:
            namespace = model["metadata"]["namespace"]
            await self._create_once(
                path_of(NETWORKING_API, "networkpolicies", namespace),
                instance_network_policy(model, instance, self.settings),
            )

    async def _release_kv_area(self, model: Mapping[str, Any], area: str) -> None:
        """Delete an instance's KV area once no pod mounts it (a pipeline's outlives the
        pipeline while its standalone still loads from it)."""
        namespace = model["metadata"]["namespace"]
        users = await self.client.list(path_of("v1", "pods", namespace), {KV_AREA_LABEL: area})
        if any(not (p["metadata"].get("deletionTimestamp")) for p in users):
            return
        pv, pvc = kv_volume(model, area, "", self.settings)
        pv_path = path_of("v1", "persistentvolumes", None, pv["metadata"]["name"])
        found = await self.client.get(pv_path)
        await self.client.delete(
            path_of("v1", "persistentvolumeclaims", namespace, pvc["metadata"]["name"])
        )
        await self.client.delete(pv_path)
        node = ((found or {}).get("metadata", {}).get("labels") or {}).get(NODE_LABEL)
        url = (await self._prefetcher_urls()).get(node or "")
        if url is not None:
            error = await self.prefetchers.close_kv_area(url, area)
            if error is not None:
                log.warning("kv_area.not_closed", area=area, node=node, error=error)

    async def _preload(
        self,
        name: str,
        instance: str,
        spec: ServerlessModelSpec,
        pp: int,
        rank: int,
        url: str | None,
        *,
        low_priority: bool = False,
        deadline: float | None = None,
    ) -> bool:
        if url is None:
            log.warning("preload.no_prefetcher", model=name, instance=instance, stage=rank)
            return False
        # pp=1 is the whole model (null pp/rank), as the worker asks for it too.
        request = PreloadRequest(
            uri=spec.source.uri,
            revision=spec.source.revision,
            pp=pp if pp > 1 else None,
            rank=rank if pp > 1 else None,
            low_priority=low_priority,
            deadline=deadline,
        )
        error = await self.prefetchers.preload(url, request)
        if error is not None:
            log.warning(
                "preload.failed",
                model=name,
                instance=instance,
                stage=rank,
                prefetcher=url,
                error=error,
            )
            return False
        log.info(
            "preload.accepted",
            model=name,
            instance=instance,
            stage=rank,
            prefetcher=url,
            low_priority=low_priority,
        )
        return True

    async def _delete_instance(
        self, model: Mapping[str, Any], inst: InstanceObjects, why: str
    ) -> None:
        name, namespace = model["metadata"]["name"], model["metadata"]["namespace"]
        # The record first: pods without one are orphans that the next pass removes.
        if inst.record is not None:
            await self.client.delete(path_of("v1", "services", namespace, inst.name))
        if self.settings.network_policy:
            await self.client.delete(
                path_of(NETWORKING_API, "networkpolicies", namespace, inst.name)
            )
        areas = set()
        for pod in inst.pods.values():
            await self.client.delete(path_of("v1", "pods", namespace, pod["metadata"]["name"]))
            self.inventory.deleted(namespace, pod["metadata"]["name"])
            if area := (pod["metadata"].get("labels") or {}).get(KV_AREA_LABEL):
                areas.add(area)
        for area in sorted(areas):
            await self._release_kv_area(model, area)
        log.info("instance.deleted", model=name, instance=inst.name, why=why)
        self.events(model, reasons.NORMAL, reasons.INSTANCE_DELETED, f"{inst.name}: {why}")

    async def _write_status(
        self,
        model: Mapping[str, Any],
        previous: ServerlessModelStatus,
        status: ServerlessModelStatus,
    ) -> None:
        new = status.model_dump(by_alias=True, mode="json")
        if new == previous.model_dump(by_alias=True, mode="json"):
            return
        meta = model["metadata"]
        for record in newly_measured(meta["name"], previous, status):
            await self._measured(record)
        await self.client.merge_patch(
            model_path(meta["namespace"], meta["name"], "status"), {"status": new}
        )
        if status.phase != previous.phase:
            log.info(
                "model.phase",
                model=meta["name"],
                namespace=meta["namespace"],
                phase=status.phase.value,
                ready=status.ready_replicas,
            )

    async def cleanup(self, namespace: str, name: str) -> int:
        """Delete every instance of a model (its finalizer's work); how many objects went."""
        key = (namespace, name)
        async with self._locks[key]:
            labels = {MANAGED_BY: MANAGED_BY_VALUE, MODEL_LABEL: name}
            gone = 0
            for plural in ("services", "pods"):
                for obj in await self.client.list(path_of("v1", plural, namespace), labels):
                    obj_name = obj["metadata"]["name"]
                    gone += await self.client.delete(path_of("v1", plural, namespace, obj_name))
                    if plural == "pods":
                        self.inventory.deleted(namespace, obj_name)
            # Its volumes: the claims go with the model (owner references), the
            # cluster-scoped volumes do not.
            volumes = {**labels, VOLUME_NAMESPACE_LABEL: namespace}
            for claim in await self.client.list(
                path_of("v1", "persistentvolumeclaims", namespace), labels
            ):
                gone += await self.client.delete(
                    path_of("v1", "persistentvolumeclaims", namespace, claim["metadata"]["name"])
                )
            for pv in await self.client.list(path_of("v1", "persistentvolumes"), volumes):
                gone += await self.client.delete(
                    path_of("v1", "persistentvolumes", None, pv["metadata"]["name"])
                )
            log.info("model.cleaned_up", model=name, namespace=namespace, deleted=gone)
        self._locks.pop(key, None)
        self._queued.pop(key, None)
        return gone


def _previous_status(model: Mapping[str, Any]) -> ServerlessModelStatus:
    raw = dict(model.get("status") or {})
    known = set(ServerlessModelStatus.model_fields) | {
        f.alias for f in ServerlessModelStatus.model_fields.values() if f.alias
    }
    try:
        return ServerlessModelStatus.model_validate({k: v for k, v in raw.items() if k in known})
    except ValidationError:
        return ServerlessModelStatus()


def _verified_at(
    inst: InstanceObjects, spec: ServerlessModelSpec, nodes: Mapping[str, NodeStatus | None]
) -> float | None:
    """When the last of the instance's stages was verified on its node (its own stage
    fetch, or the whole model there); None while any stage is not verified."""
    plan = inst.plan
    if plan is None:
        return None
    uri, revision = spec.source.uri, spec.source.revision
    last = 0.0
    for stage in plan.stages:
        status = nodes.get(stage.node)
        if status is None:
            return None
        own = fetch_name(plan.pp if plan.pp > 1 else None, stage.rank if plan.pp > 1 else None)
        done = [
            f
            for name in dict.fromkeys((own, fetch_name(None, None)))
            if (f := status.fetch(uri, revision, name)) is not None and f.state == FetchState.DONE
        ]
        if not done:
            return None
        last = max(last, min(f.finished_at or 0.0 for f in done))
    return last
