"""The reconcile loop's adapter: observe the API, decide (pure code), act, write status.

One call to :meth:`Reconciler.reconcile` converges one ServerlessModel as far as it can
now and says when to try again. It is safe to call any number of times, from any trigger
(the model changed, a worker pod changed, a periodic resync, a restarted operator): calls
for one model are serialised and coalesced, and every action is derived from what exists.
"""

from __future__ import annotations

import asyncio
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
    ServerlessModelSpec,
    ServerlessModelStatus,
)
from hydraserve.control.consolidation import (
    Abandon,
    ConsolidationAction,
    FetchWholeModel,
    Promote,
    Release,
    StartStandalone,
    consolidation_plan,
)
from hydraserve.kube.client import KubeClient, KubeError, path_of
from hydraserve.logs import get_logger
from hydraserve.operator.cluster_state import cluster_state, prefetcher_urls, reserve
from hydraserve.operator.consolidation import (
    all_card_stage,
    consolidating,
    finished_record,
    pipeline_consolidation,
    pipelines,
    standalone_plan,
    standalones,
    whole_model_fetch,
)
from hydraserve.operator.manifests import (
    endpoint_url,
    instance_service,
    standalone_objects,
    worker_pod,
)
from hydraserve.operator.naming import (
    ABANDONED_ANNOTATION,
    APP_NAME,
    DRAINING_SINCE_ANNOTATION,
    FETCHED_AT_ANNOTATION,
    IDLE_SINCE_ANNOTATION,
    MANAGED_BY,
    MANAGED_BY_VALUE,
    MODEL_LABEL,
    PROMOTED_AT_ANNOTATION,
    WORKER_APP,
    InstancePlan,
    new_instance_name,
    standalone_name,
    template_hash,
)
from hydraserve.operator.planning import Planner, plan_instance, plan_request
from hydraserve.operator.reconcile import (
    VALID,
    ObservedInstance,
    build_status,
    decide,
    desired_replicas,
    observe,
    spec_errors,
)
from hydraserve.operator.settings import OperatorSettings
from hydraserve.planner.types import Plan, Unschedulable
from hydraserve.prefetcher.shm import FetchState, FetchStatus
from hydraserve.store import Manifest, ModelRef, ModelStore, StoreError
from hydraserve.store.uri import StoreURIError
from hydraserve.worker.inflight import INFLIGHT_PATH

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
        planner: Planner = plan_instance,
        manifest_loader: Callable[[str, str], Manifest] = load_manifest,
        events: EventSink = _no_events,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.settings = settings
        self.planner = planner
        self.manifest_loader = manifest_loader
        self.events = events
        self.clock = clock
        self._http = httpx.AsyncClient(timeout=settings.preload_timeout_seconds)
        self._locks: dict[tuple[str, str], asyncio.Lock] = defaultdict(asyncio.Lock)
        self._queued: dict[tuple[str, str], bool] = defaultdict(bool)
        self._manifests: dict[tuple[str, str], Manifest] = {}
        self.policy = settings.consolidation_policy()

    async def close(self) -> None:
        await self._http.aclose()

    async def reconcile(self, namespace: str, name: str) -> Outcome:
        """Converge one model. Concurrent calls coalesce: one runs, at most one waits."""
        key = (namespace, name)
        if self._queued[key]:
            return Outcome(message="coalesced with a queued reconcile")
        self._queued[key] = True
        async with self._locks[key]:
            self._queued[key] = False
            return await self._reconcile(namespace, name)

    # -- observation -------------------------------------------------------------------

    async def _observe(self, namespace: str, name: str) -> list[ObservedInstance]:
        labels = {MANAGED_BY: MANAGED_BY_VALUE, MODEL_LABEL: name}
        services, pods = await asyncio.gather(
            self.client.list(path_of("v1", "services", namespace), labels),
            self.client.list(path_of("v1", "pods", namespace), labels),
        )
        return observe(services, pods)

    async def _prefetchers(self) -> dict[str, str]:
        pods = await self.client.list(
            path_of("v1", "pods", self.settings.prefetcher_namespace),
            self.settings.prefetcher_labels,
        )
        return prefetcher_urls(pods, self.settings)

    async def _manifest(self, spec: ServerlessModelSpec) -> Manifest:
        key = (spec.source.uri, spec.source.revision)
        if key not in self._manifests:
            self._manifests[key] = await asyncio.to_thread(self.manifest_loader, *key)
        return self._manifests[key]

    # -- the loop ----------------------------------------------------------------------

    async def _reconcile(self, namespace: str, name: str) -> Outcome:
        model = await self.client.get(model_path(namespace, name))
        if model is None or (model.get("metadata") or {}).get("deletionTimestamp"):
            return Outcome(message="gone or being deleted")
        model.setdefault("metadata", {}).setdefault("namespace", namespace)
        now = self.clock()
        previous = _previous_status(model)
        instances = await self._observe(namespace, name)
        endpoints = {i.name: endpoint_url(i.name, namespace, self.settings) for i in instances}

        errors = spec_errors(model.get("spec") or {})
        if errors is not None:
            old = next((c for c in previous.conditions if c.type == VALID), None)
            if old is None or old.message != errors:
                log.warning("model.invalid", model=name, namespace=namespace, problems=errors)
                self.events(model, "Warning", "InvalidSpec", errors)
            status = build_status(name, 0, instances, endpoints, previous, now, invalid=errors)
            await self._write_status(model, previous, status)
            return Outcome(message=errors)  # nothing to retry: the user must change the spec

        spec = ServerlessModelSpec.model_validate(model["spec"])
        desired = desired_replicas(spec)
        template = template_hash(spec, self.settings.worker_image)
        actions = decide(
            desired, instances, template, now, self.settings.instance_start_timeout_seconds
        )
        by_name = {i.name: i for i in instances}
        for instance, why in actions.delete:
            await self._delete_instance(model, by_name[instance], why)

        retry: float | None = None
        invalid: str | None = None
        unschedulable: str | None = None
        if actions.create or actions.complete:
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
                self.events(model, "Warning", "ModelNotFound", invalid)
            else:
                prefetchers = await self._prefetchers()
                for instance, ranks in actions.complete:
                    inst = by_name[instance]
                    plan = inst.plan
                    assert plan is not None  # decide() only completes instances with a plan
                    log.info("instance.resume", model=name, instance=instance, stages=list(ranks))
                    await self._create_stages(
                        model, spec, instance, plan, ranks, template, prefetchers
                    )
                if actions.create:
                    unschedulable = await self._create_instances(
                        model, spec, manifest, actions.create, template, prefetchers, now
                    )
                    if unschedulable is not None:
                        retry = self.settings.retry_seconds

        instances = await self._observe(namespace, name)
        changed, finished = await self._consolidate(model, spec, template, instances)
        if changed:
            instances = await self._observe(namespace, name)
        endpoints = {i.name: endpoint_url(i.name, namespace, self.settings) for i in instances}
        status = build_status(
            name,
            desired,
            instances,
            endpoints,
            previous,
            now,
            invalid=invalid,
            invalid_reason="ModelNotFound",
            unschedulable=unschedulable,
            generation=(model.get("metadata") or {}).get("generation"),
            consolidating=consolidating(instances, self.policy),
            finished=finished,
        )
        await self._write_status(model, previous, status)
        return Outcome(retry_after=retry, message=invalid or unschedulable or status.phase.value)

    # -- consolidation (decision 0402) -------------------------------------------------

    async def _consolidate(
        self,
        model: Mapping[str, Any],
        spec: ServerlessModelSpec,
        template: str,
        instances: list[ObservedInstance],
    ) -> tuple[bool, list[ConsolidationStatus]]:
        """Observe every pipeline's consolidation, plan (shared, pure), apply. Each step is
        derived from Kubernetes objects and the HTTP probes, so any pass, by any operator
        replica, continues where the last one stopped. (Whether something changed, the
        consolidations that ended.)"""
        name = model["metadata"]["name"]
        by_pipeline = standalones(instances)
        changed = False
        finished: list[ConsolidationStatus] = []
        if not self.policy.enabled:
            # Turned off: a standalone not promoted yet goes; a draining pipeline still
            # drains (the plan releases it), its standalone serves.
            for standalone in by_pipeline.values():
                if standalone.pending:
                    await self._delete_instance(model, standalone, "consolidation is off")
                    changed = True
        # Draining pipelines always (they are released); serving ones while consolidation
        # is on and not given up for them.
        serving = [
            p
            for p in pipelines(instances)
            if p.phase == InstancePhase.DRAINING or (self.policy.enabled and p.abandoned is None)
        ]
        if not serving:
            return changed, finished
        ready = any(p.phase == InstancePhase.READY for p in serving)
        prefetchers = await self._prefetchers() if ready else {}
        now = self.clock()
        observed = []
        fetches: dict[str, FetchStatus | None] = {}
        for pipeline in serving:
            fetch = None
            stage = all_card_stage(pipeline.plan)
            if pipeline.phase == InstancePhase.READY and pipeline.abandoned is None and stage:
                url = prefetchers.get(stage.node)
                if url is None:
                    # Nothing could fetch and verify the whole model there: give up (a
                    # prefetcher that does not answer now is asked again instead).
                    fetch = FetchStatus(
                        state=FetchState.FAILED,
                        started_at=now,
                        error=f"no node prefetcher on {stage.node}",
                    )
                else:
                    fetch = whole_model_fetch(
                        await self._node_status(url), spec.source.uri, spec.source.revision
                    )
            fetches[pipeline.name] = fetch
            in_flight = None
            if pipeline.phase == InstancePhase.DRAINING:
                in_flight = await self._in_flight(pipeline)
            record = pipeline_consolidation(
                pipeline,
                by_pipeline.get(pipeline.name),
                fetch,
                in_flight,
                now,
                self.settings.instance_start_timeout_seconds,
            )
            if pipeline.phase == InstancePhase.DRAINING and record.idle_since != (
                pipeline.idle_since
            ):
                idle = None if record.idle_since is None else f"{record.idle_since:.3f}"
                await self._annotate(model, pipeline.name, {IDLE_SINCE_ANNOTATION: idle})
                changed = True
            observed.append(record)
        by_name = {i.name: i for i in instances}
        for action in consolidation_plan(observed, self.policy, now):
            pipeline = by_name[action.pipeline]
            try:
                ended = await self._apply(
                    model,
                    spec,
                    template,
                    pipeline,
                    by_pipeline.get(pipeline.name),
                    action,
                    prefetchers,
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
        return changed, finished

    async def _apply(
        self,
        model: Mapping[str, Any],
        spec: ServerlessModelSpec,
        template: str,
        pipeline: ObservedInstance,
        replacement: ObservedInstance | None,
        action: ConsolidationAction,
        prefetchers: Mapping[str, str],
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
            url = prefetchers.get(action.node or "")
            log.info("consolidation.fetch", model=name, instance=pipeline.name, node=action.node)
            await self._preload(name, pipeline.name, spec, 1, 0, url, low_priority=True)
        elif isinstance(action, StartStandalone):
            assert pipeline.plan is not None  # pipelines() only yields planned instances
            plan = standalone_plan(pipeline.plan)
            url = prefetchers.get(plan.stages[0].node)
            service, pod = standalone_objects(
                model, spec, pipeline.name, plan, template, url, now, self.settings
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
                "Normal",
                "ConsolidationStarted",
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
                "Normal",
                "ConsolidationPromoted",
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
                "Warning",
                "ConsolidationAbandoned",
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

    async def _node_status(self, url: str | None) -> dict[str, Any] | None:
        """A node prefetcher's ``GET /v1/status`` (None: no prefetcher, or no answer)."""
        if url is None:
            return None
        try:
            resp = await self._http.get(
                f"{url}/v1/status", timeout=self.settings.probe_timeout_seconds
            )
            resp.raise_for_status()
            return dict(resp.json())
        except (httpx.HTTPError, ValueError, TypeError) as exc:
            log.warning("prefetcher.status_failed", prefetcher=url, error=str(exc) or repr(exc))
            return None

    async def _in_flight(self, pipeline: ObservedInstance) -> int | None:
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
        requested_at: float,
    ) -> str | None:
        """Plan and create ``count`` instances; the planner's reason if one did not fit."""
        name = model["metadata"]["name"]
        nodes, worker_pods = await asyncio.gather(
            self.client.list(path_of("v1", "nodes")),
            self.client.list(
                path_of("v1", "pods"), {MANAGED_BY: MANAGED_BY_VALUE, APP_NAME: WORKER_APP}
            ),
        )
        cluster, skipped = cluster_state(nodes, worker_pods, self.settings)
        try:
            request = plan_request(spec, manifest)
        except ValueError as exc:  # resources.gpuMemoryGiB cannot hold the weights
            reason = f"{exc}; raise spec.resources.gpuMemoryGiB"
            self.events(model, "Warning", "Unschedulable", reason)
            return reason
        for _ in range(count):
            started = self.clock()
            plan: Plan | Unschedulable = self.planner(request, cluster)
            if isinstance(plan, Unschedulable):
                reason = plan.reason
                if skipped:
                    left_out = ", ".join(f"{n} ({why})" for n, why in sorted(skipped.items()))
                    reason += f"; nodes left out: {left_out}"
                log.warning("instance.unschedulable", model=name, reason=reason)
                self.events(model, "Warning", "Unschedulable", reason)
                return reason
            cluster = reserve(cluster, plan, self.settings)
            await self._create_instance(
                model,
                spec,
                InstancePlan.from_plan(plan),
                template,
                prefetchers,
                requested_at,
                planned_at=self.clock(),
                plan_seconds=self.clock() - started,
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
    ) -> None:
        name, namespace = model["metadata"]["name"], model["metadata"]["namespace"]
        instance = new_instance_name(name)
        record = instance_service(
            model, instance, plan, template, requested_at, planned_at, self.settings
        )
        # The record first: after a crash from here on, the next reconcile finishes this
        # instance (missing stages) instead of planning another.
        await self.client.create(path_of("v1", "services", namespace), record)
        placement = ", ".join(f"stage {s.rank} on {s.node}/gpu{s.gpu}" for s in plan.stages)
        log.info(
            "instance.planned",
            model=name,
            instance=instance,
            pp=plan.pp,
            placement=placement,
            predicted_ttft_s=round(plan.predicted_ttft_s, 2),
            plan_s=round(plan_seconds, 4),
        )
        self.events(
            model,
            "Normal",
            "InstancePlanned",
            f"{instance}: pp={plan.pp}, {placement}; predicted cold TTFT "
            f"{plan.predicted_ttft_s:.1f} s ({plan.reason})",
        )
        await self._create_stages(
            model, spec, instance, plan, tuple(range(plan.pp)), template, prefetchers
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
    ) -> None:
        """Pre-load every stage on its node, then create the stage pods."""
        name, namespace = model["metadata"]["name"], model["metadata"]["namespace"]
        urls = {r: prefetchers.get(plan.stage(r).node) for r in ranks}
        accepted = await asyncio.gather(
            *(self._preload(name, instance, spec, plan.pp, r, urls[r]) for r in ranks)
        )
        preloaded_at = self.clock()
        for rank, ok in zip(ranks, accepted, strict=True):
            # Without an accepted pre-load the worker fetches its stage itself.
            url = urls[rank] if ok else None
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
            )
            try:
                await self.client.create(path_of("v1", "pods", namespace), pod)
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
    ) -> bool:
        if url is None:
            log.warning("preload.no_prefetcher", model=name, instance=instance, stage=rank)
            return False
        # pp=1 is the whole model (null pp/rank), as the worker asks for it too.
        body = {
            "uri": spec.source.uri,
            "revision": spec.source.revision,
            "pp": pp if pp > 1 else None,
            "rank": rank if pp > 1 else None,
            "low_priority": low_priority,
        }
        try:
            resp = await self._http.post(f"{url}/v1/preload", json=body)
            resp.raise_for_status()
        except httpx.HTTPError as exc:
            log.warning(
                "preload.failed",
                model=name,
                instance=instance,
                stage=rank,
                prefetcher=url,
                error=str(exc) or type(exc).__name__,
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
        self, model: Mapping[str, Any], inst: ObservedInstance, why: str
    ) -> None:
        name, namespace = model["metadata"]["name"], model["metadata"]["namespace"]
        # The record first: pods without one are orphans that the next pass removes.
        if inst.record is not None:
            await self.client.delete(path_of("v1", "services", namespace, inst.name))
        for pod in inst.pods.values():
            await self.client.delete(path_of("v1", "pods", namespace, pod["metadata"]["name"]))
        log.info("instance.deleted", model=name, instance=inst.name, why=why)
        self.events(model, "Normal", "InstanceDeleted", f"{inst.name}: {why}")

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
