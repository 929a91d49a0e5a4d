"""The embedded backend: model instances as local worker processes.

Same planner, policies and data plane as the cluster, minus Kubernetes. ``scale()``
records the desired replica count; a reconcile loop observes each instance (its processes,
``/health`` of stage 0, the verified watermark of its stages in the node's shared memory)
into the neutral observations of :mod:`hydraserve.control`, asks the same lifecycle and
consolidation policies as the operator what to do, applies it with processes, and derives
the model's status with the same code as the operator (``control.status``).

Nodes: this machine alone by default, or the nodes of an emulated cluster
(:mod:`hydraserve.backends.local.nodes`). Each node's prefetcher is asked to preload a
stage before its worker starts, as the operator asks a node's prefetcher on Kubernetes.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from pydantic import ValidationError

from hydraserve.api.models import (
    ConsolidationStatus,
    InstancePhase,
    ServerlessModel,
    ServerlessModelStatus,
    SloAttainmentStatus,
)
from hydraserve.backends.base import ClusterBackend, ModelView, view_of
from hydraserve.backends.local.instance import Consolidation, LocalInstance
from hydraserve.backends.local.nodes import LocalNode, cluster_view, default_memory_budget
from hydraserve.backends.local.processes import (
    WarmRuntime,
    free_port,
    log_tail,
    parse_cores,
    spawn_stage,
    split_cores,
    start_warm_runtime,
    stop_warm_runtime,
    terminate,
    worker_env,
)
from hydraserve.backends.local.sandbox import sandbox_available, sandbox_prefix, worker_view
from hydraserve.backends.local.settings import LocalSettings
from hydraserve.control import reasons
from hydraserve.control.coldstart import newly_measured, take_measurement
from hydraserve.control.consolidation import (
    Abandon,
    ConsolidationAction,
    FetchWholeModel,
    PipelineConsolidation,
    Promote,
    Release,
    StandaloneState,
    StartStandalone,
    consolidating,
    consolidation_plan,
    consolidation_target,
    next_idle_since,
)
from hydraserve.control.instances import InstanceObservation, decide_instances, timed_out
from hydraserve.control.placement import InstancePlan, StagePlan, kv_hand_over, standalone_plan
from hydraserve.control.status import build_status
from hydraserve.logs import get_logger
from hydraserve.planner import plan as plan_placement
from hydraserve.planner.calibration import (
    Calibrator,
    ColdStartRecord,
    load_calibration,
    save_calibration,
)
from hydraserve.planner.profile import (
    kv_bytes_per_token,
    model_key,
    plan_request_for,
    profile_from_manifest,
    replica_bytes,
)
from hydraserve.planner.types import ClusterState, Plan, PlanRequest, Unschedulable
from hydraserve.prefetcher.node import NodeStatus, Prefetcher, PreloadRequest
from hydraserve.prefetcher.shm import FetchState, ModelShm, fetch_name
from hydraserve.store import Manifest, ModelRef, ModelStore, StoreError
from hydraserve.store.uri import StoreURIError
from hydraserve.warm.client import write_shim
from hydraserve.warm.protocol import ENV_SOCKET
from hydraserve.warm.tree import process_tree
from hydraserve.worker.config import StageAddress, WorkerConfig
from hydraserve.worker.inflight import INFLIGHT_PATH
from hydraserve.worker.launcher import WARM_PRELOAD, WARM_RUNTIME_ENV
from hydraserve.worker.timeline import Timeline, read_timeline, stage_timings

# Worker ports on an emulated node (its namespace has nothing else on them but its
# prefetcher, on 8300).
NODE_PORTS_FROM, NODE_PORTS_TO = 20000, 29999
# How long readiness waits for the worker to record engine_init after /health answered.
ENGINE_INIT_GRACE_S = 2.0
log = get_logger("backends.local")

# Local instances are made from the spec the backend was given; it never changes.
TEMPLATE = "local"


@dataclass
class _ModelState:
    model: ServerlessModel
    desired: int = 0
    instances: dict[str, LocalInstance] = field(default_factory=dict)
    status: ServerlessModelStatus = field(default_factory=ServerlessModelStatus)
    view: ModelView | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    manifest: Manifest | None = None
    kv_bytes_per_token: int | None = None
    # A model that could not start (store unreadable, no room): why, and when to retry.
    blocked: tuple[str, str] | None = None  # (condition reason, message)
    retry_at: float = 0.0


class LocalBackend(ClusterBackend):
    def __init__(
        self,
        models: list[ServerlessModel],
        settings: LocalSettings | None = None,
        nodes: Sequence[LocalNode] | None = None,
    ) -> None:
        self.settings = settings or LocalSettings()
        self._models = {m.name: _ModelState(model=m) for m in models}
        for state in self._models.values():
            state.desired = state.model.spec.scaling.min_replicas
            state.view = self._make_view(state)
        self._given_nodes = list(nodes) if nodes else None
        self._nodes: dict[str, LocalNode] | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping: set[asyncio.Task[None]] = set()
        self._http = httpx.AsyncClient(timeout=2)
        self.instances_dir = self.settings.common.state_dir / "instances"
        self._prefetcher: Prefetcher | None = None
        self._warm: dict[str, WarmRuntime] = {}  # node -> its warm runtime
        self._next_port: dict[str, int] = {}
        # What each cold start was planned from, until it is measured (replay history).
        self._plan_inputs: dict[str, tuple[PlanRequest, ClusterState]] = {}
        self.calibration_path = self.settings.common.state_dir / "planner-calibration.json"
        self.calibrator = Calibrator(self.settings, load_calibration(self.calibration_path))
        self.policy = self.settings.consolidation_policy()
        self.lifecycle = self.settings.lifecycle_policy()
        self.passes = 0  # completed reconcile passes (tests wait on it, not on time)
        # Consolidations that ended since the model's status was last built.
        self._finished: dict[str, list[ConsolidationStatus]] = defaultdict(list)

    # -- ClusterBackend ------------------------------------------------------------------

    def list_models(self) -> list[ModelView]:
        return [s.view or self._make_view(s) for s in self._models.values()]

    def get_model(self, name: str) -> ModelView | None:
        state = self._models.get(name)
        if state is None:
            return None
        return state.view or self._make_view(state)

    async def scale(self, name: str, replicas: int) -> None:
        state = self._models[name]
        replicas = max(0, min(replicas, state.model.spec.scaling.max_replicas))
        if replicas == state.desired:
            return
        log.info("scale", model=name, replicas=replicas, previous=state.desired)
        state.desired = replicas
        state.view = self._make_view(state)
        self._wake.set()

    async def wait_for_change(self, name: str, timeout: float) -> None:
        state = self._models[name]
        event = state.changed
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)

    async def start(self) -> None:
        self.instances_dir.mkdir(parents=True, exist_ok=True)
        if self.settings.warm_runtime:
            self._start_warm_runtimes()
        self._task = asyncio.create_task(self._loop(), name="local-backend")

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for state in self._models.values():
            for inst in list(state.instances.values()):
                self._stop(state, inst, "the platform stops")
        if self._stopping:
            await asyncio.gather(*self._stopping, return_exceptions=True)
        if self._prefetcher is not None:
            self._prefetcher.close()
        for runtime in self._warm.values():
            await asyncio.to_thread(stop_warm_runtime, runtime, self.settings.stop_grace_seconds)
        await self._http.aclose()

    def instance_pids(self, name: str) -> dict[str, list[int]]:
        """Every live process of each of a model's instances (for accounting): its stages'
        and what they started, including what a warm runtime forked for them."""
        state = self._models.get(name)
        if state is None:
            return {}
        notes = [runtime.children_dir for runtime in self._warm.values()]
        return {
            i.name: process_tree([s.process.pid for s in i.stages], notes)
            for i in state.instances.values()
        }

    # -- nodes -----------------------------------------------------------------------------

    def _start_warm_runtimes(self) -> None:
        """One warm runtime per node, inside it (decision 0600): workers are forked from
        an interpreter that has imported the engine."""
        runtime_dir = self.settings.common.state_dir / "runtime"
        shim = write_shim(runtime_dir / "warm-python")
        for node in self.nodes.values():
            name = f"{os.getpid()}-{node.name}"
            env = {**os.environ, **WARM_RUNTIME_ENV, **node.env}
            self._warm[node.name] = start_warm_runtime(
                name,
                shim,
                WARM_PRELOAD,
                env,
                runtime_dir / f"warm-{node.name}.log",
                node.exec_prefix,
            )
            log.info("warm.starting", node=node.name, runtime=name)

    def _compile_cache(self, node: LocalNode) -> Path:
        """A node's vLLM cache: this machine's, or an emulated node's own (nodes do not
        share disks; what one compiled reaches another through the store, decision 0601)."""
        root = self.settings.vllm_cache_root or self.settings.common.state_dir / "vllm-cache"
        return root / "nodes" / node.name if node.exec_prefix else root

    def _warm_python(self, node: LocalNode) -> tuple[str | None, dict[str, str]]:
        """The interpreter and environment a worker on ``node`` starts with: the warm
        runtime's shim when the node has one running, else this interpreter."""
        runtime = self._warm.get(node.name)
        if runtime is None or runtime.process.poll() is not None:
            return None, {}
        shim = self.settings.common.state_dir / "runtime" / "warm-python"
        return str(shim), {ENV_SOCKET: runtime.name}

    @property
    def nodes(self) -> dict[str, LocalNode]:
        if self._nodes is None:
            given = self._given_nodes or [self._this_machine()]
            self._nodes = {n.name: n for n in given}
        return self._nodes

    def _this_machine(self) -> LocalNode:
        return LocalNode(
            name=self.settings.node_name,
            host=self.settings.worker_host,
            shm_dir=self.settings.common.shm_dir,
            memory_bytes=self._memory_budget(),
            nic_bytes_per_s=self.settings.local_read_bytes_per_s,
            prefetcher_url=self.settings.prefetcher_url,
        )

    def _free_port(self, node: LocalNode) -> int:
        """A port for a worker on ``node``. A node reached through ``exec_prefix`` (an
        emulated node's own network namespace) has no other users: hand out its ports in
        turn; this machine's come from the kernel."""
        if not node.exec_prefix:
            return free_port(node.host)
        port = self._next_port.get(node.name, NODE_PORTS_FROM)
        self._next_port[node.name] = port + 1 if port < NODE_PORTS_TO else NODE_PORTS_FROM
        return port

    def _memory_budget(self) -> int:
        if self.settings.memory_budget_bytes is not None:
            return self.settings.memory_budget_bytes
        return default_memory_budget()

    def _node_prefetcher(self) -> Prefetcher:
        if self._prefetcher is None:
            node = self.nodes[self.settings.node_name]
            self._prefetcher = Prefetcher(
                node=node.name,
                shm_dir=node.shm_dir,
                capacity_bytes=node.memory_bytes,
                s3=self.settings.common.s3,
            )
        return self._prefetcher

    async def _node_statuses(self) -> dict[str, NodeStatus | None]:
        async def one(node: LocalNode) -> NodeStatus | None:
            if node.prefetcher_url is None:
                if self._prefetcher is None:
                    return None
                return await asyncio.to_thread(self._prefetcher.status)
            try:
                resp = await self._http.get(f"{node.prefetcher_url}/v1/status")
                resp.raise_for_status()
                return NodeStatus.model_validate(resp.json())
            except (httpx.HTTPError, ValueError, ValidationError):
                return None

        nodes = list(self.nodes.values())
        answers = await asyncio.gather(*(one(n) for n in nodes))
        return {n.name: a for n, a in zip(nodes, answers, strict=True)}

    async def _preload(
        self,
        state: _ModelState,
        node: LocalNode,
        pp: int | None,
        rank: int | None,
        *,
        deadline_at: float | None = None,
        low_priority: bool = False,
    ) -> None:
        source = state.model.spec.source
        request = PreloadRequest(
            uri=source.uri,
            revision=source.revision,
            pp=pp,
            rank=rank,
            low_priority=low_priority,
            deadline=deadline_at,
        )
        if node.prefetcher_url is not None:
            resp = await self._http.post(
                f"{node.prefetcher_url}/v1/preload",
                json=request.model_dump(mode="json"),
                timeout=30,
            )
            resp.raise_for_status()
            return
        await asyncio.to_thread(self._node_prefetcher().preload, request)

    # -- views and notifications -----------------------------------------------------------

    async def report_slo_attainment(self, name: str, attainment: SloAttainmentStatus) -> None:
        state = self._models.get(name)
        if state is not None:
            self._publish(state, state.status.model_copy(update={"slo_attainment": attainment}))

    def _measured(self, record: ColdStartRecord) -> None:
        """A cold start became ready: measure, calibrate, keep the state in a file."""
        inputs = self._plan_inputs.pop(record.instance, None)
        take_measurement(self.calibrator, record, self.settings.planner, inputs, time.time(), log)
        save_calibration(self.calibration_path, self.calibrator.state)

    def _make_view(self, state: _ModelState) -> ModelView:
        # The replica count asked for lives in the spec, as the scale subresource keeps it
        # on Kubernetes.
        spec = state.model.spec.model_copy(update={"replicas": state.desired})
        model = state.model.model_copy(update={"spec": spec, "status": state.status})
        return view_of(model, kv_bytes_per_token=state.kv_bytes_per_token)

    def _publish(self, state: _ModelState, status: ServerlessModelStatus) -> None:
        """Take a new status; wake the model's waiters when what they read changed."""
        if status == state.status and state.view is not None:
            return
        for record in newly_measured(state.model.name, state.status, status):
            self._measured(record)
        if status.phase != state.status.phase:
            log.info(
                "model.phase",
                model=state.model.name,
                phase=status.phase.value,
                ready=status.ready_replicas,
            )
        state.status = status
        state.view = self._make_view(state)
        state.changed.set()
        state.changed = asyncio.Event()

    # -- the loop --------------------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            for state in list(self._models.values()):
                try:
                    await self._reconcile(state)
                except Exception as exc:  # keep serving other models
                    log.exception("reconcile.error", model=state.model.name, error=str(exc))
            self.passes += 1
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.poll_seconds)

    def _observed(self, state: _ModelState, now: float) -> list[InstanceObservation]:
        return [
            timed_out(inst.observation(), now, self.lifecycle) for inst in state.instances.values()
        ]

    async def _reconcile(self, state: _ModelState) -> None:
        now = time.time()
        await self._observe(state, now)
        observed = self._observed(state, now)
        decision = decide_instances(
            state.desired, observed, TEMPLATE, state.status.failures, now, self.lifecycle
        )
        failed = dict(decision.newly_failed)
        for name, why in decision.delete:
            inst = state.instances.get(name)
            if inst is None:
                continue
            if name in failed:
                log.error("instance.failed", model=state.model.name, instance=name,
                          error=failed[name], reason=reasons.INSTANCE_FAILED)  # fmt: skip
            self._stop(state, inst, why)
        if decision.gave_up and decision.newly_failed:
            log.error("model.gave_up", model=state.model.name, reason=decision.gave_up)
        if decision.create == 0 or state.desired == 0:
            state.blocked = None
        elif now >= state.retry_at:
            state.blocked = None
            for _ in range(decision.create):
                if not await self._cold_start(state):
                    state.retry_at = now + self.settings.retry_seconds
                    break
        records = await self._consolidate(state)
        observed = self._observed(state, time.time())
        invalid = unschedulable = None
        if state.blocked is not None:
            reason, message = state.blocked
            if reason == reasons.UNSCHEDULABLE:
                unschedulable = message
            else:
                invalid = message
        status = build_status(
            desired=state.desired,
            instances=[
                (obs, state.instances[obs.name].detail())
                for obs in observed
                if obs.name in state.instances
            ],
            previous=state.status,
            now=now,
            failures=decision.failures,
            gave_up=decision.gave_up,
            retry_in=decision.retry_in,
            invalid=invalid,
            invalid_reason=reasons.MODEL_NOT_FOUND,
            unschedulable=unschedulable,
            consolidating=consolidating(records, self.policy),
            finished=self._finished.pop(state.model.name, []),
        )
        self._publish(state, status)

    # -- observing instances ---------------------------------------------------------------

    async def _observe(self, state: _ModelState, now: float) -> None:
        """Update what is known of each instance: exited stages, failed fetches, stage 0
        serving, every byte verified (latched once true)."""
        for inst in list(state.instances.values()):
            if inst.failure is not None:
                continue
            exited = [s for s in inst.stages if s.exited() is not None]
            if exited:
                stage = exited[0]
                inst.failure = (
                    f"stage {stage.rank} exited with code {stage.process.returncode}: "
                    f"{log_tail(stage.log_path)}"
                )
                continue
            if inst.draining_since is not None or inst.ready_at is not None:
                continue
            if not inst.bytes_verified:
                verified, error = self._fetch_outcome(state, inst)
                if error is not None:
                    inst.failure = error
                    continue
                inst.bytes_verified = verified
                if verified:
                    inst.verified_at = time.time()
            if not inst.head_serving:
                inst.head_serving = await self._healthy(inst)
                if inst.head_serving:
                    inst.healthy_at = now
            if not (inst.head_serving and inst.bytes_verified):
                continue
            if inst.replaces is not None:
                # Routed only when the consolidation promotes it; first its first-call
                # paths run once, so the requests that move to it do not pay them.
                if inst.warmup is None:
                    inst.warmup = asyncio.create_task(self._warm_up(state, inst))
                    continue
                if not inst.warmup.done():
                    continue
                log.info("consolidation.standalone_warm", model=state.model.name,
                         instance=inst.name, replaces=inst.replaces,
                         warmup_s=inst.warmup.result(),
                         start_s=round(now - inst.requested_at, 3))  # fmt: skip
            events = read_timeline(inst.dir / "timeline.jsonl")
            recorded = any(e.get("stage") == "engine_init" for e in events)
            if not recorded and now - (inst.healthy_at or now) < ENGINE_INIT_GRACE_S:
                # The worker records engine_init when it sees its own /health answer (it
                # polls too): wait a moment for it so the cold start's breakdown is whole.
                continue
            inst.ready_at = now
            inst.cold_start = tuple(stage_timings(events, inst.requested_at))
            if inst.replaces is None:
                log.info(
                    "instance.ready",
                    model=state.model.name,
                    instance=inst.name,
                    cold_start_s=round(now - inst.requested_at, 3),
                    stages={t.stage: round(t.end - t.start, 3) for t in inst.cold_start},
                )

    def _fetch_outcome(self, state: _ModelState, inst: LocalInstance) -> tuple[bool, str | None]:
        """(every stage's bytes are fetched and verified, the error of a failed fetch).

        The engine may have started on early-adopted, still-arriving weights (decision
        0004): it must not serve before every byte is verified, and a failed fetch means
        it never will.
        """
        source = state.model.spec.source
        verified = True
        for stage in inst.plan.stages:
            node = self.nodes[stage.node]
            shm = ModelShm(node.shm_dir, source.uri, source.revision)
            full = shm.read_status(fetch_name(None, None))
            if full is not None and full.state == FetchState.DONE:
                continue
            pp = inst.pp if inst.pp > 1 else None
            status = shm.read_status(fetch_name(pp, stage.rank if pp else None))
            # A failure left by an earlier instance does not count: this one fetches anew.
            if (
                status is not None
                and status.state == FetchState.FAILED
                and (status.started_at or 0.0) >= inst.requested_at
            ):
                return False, f"fetching stage {stage.rank}'s weights failed: {status.error}"
            verified = verified and status is not None and status.state == FetchState.DONE
        return verified, None

    async def _healthy(self, inst: LocalInstance) -> bool:
        try:
            resp = await self._http.get(f"{inst.endpoint}/health")
        except httpx.HTTPError:
            return False
        return resp.status_code == 200

    async def _warm_up(self, state: _ModelState, inst: LocalInstance) -> float | None:
        """Run the engine's first-call paths before it takes over: two concurrent requests
        (a batched prefill of a longer prompt, then batched decode steps), as the moved
        requests will. A fresh eager engine builds kernels and touches its KV cache on first
        use. Seconds it took; None if it failed (the takeover goes on regardless)."""
        url = f"{inst.endpoint}/v1/completions"
        prompt = "HydraServe warms a standalone engine up before it takes over. " * 4
        bodies = [
            {"model": state.model.name, "prompt": f"{i} {prompt}", "max_tokens": 8,
             "temperature": 0, "ignore_eos": True}
            for i in range(2)
        ]  # fmt: skip
        started = time.perf_counter()
        try:
            answers = await asyncio.gather(
                *(self._http.post(url, json=body, timeout=60) for body in bodies)
            )
        except httpx.HTTPError as exc:
            log.warning("consolidation.warmup_failed", instance=inst.name, error=repr(exc))
            return None
        failed = [a.status_code for a in answers if a.status_code != 200]
        if failed:
            log.warning("consolidation.warmup_failed", instance=inst.name, status=failed[0])
            return None
        return round(time.perf_counter() - started, 3)

    async def _engine_in_flight(self, inst: LocalInstance) -> int | None:
        """Requests the instance's engine serves now (None: it did not answer)."""
        try:
            resp = await self._http.get(f"{inst.endpoint}{INFLIGHT_PATH}")
            return int(resp.json()["in_flight"]) if resp.status_code == 200 else None
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return None

    # -- starting and stopping instances --------------------------------------------------

    async def _load_manifest(self, state: _ModelState) -> Manifest:
        if state.manifest is None:
            source = state.model.spec.source
            store = ModelStore(ModelRef(source.uri, source.revision), self.settings.common.s3)
            state.manifest = await asyncio.to_thread(store.manifest)
            with contextlib.suppress(StoreError, ValueError):
                config = await asyncio.to_thread(store.read_config)
                state.kv_bytes_per_token = kv_bytes_per_token(config)
        return state.manifest

    async def _cold_start(self, state: _ModelState) -> bool:
        """Plan and start one instance for demand; False (and ``state.blocked``) when it
        cannot start now."""
        model = state.model
        requested = time.time()
        try:
            manifest = await self._load_manifest(state)
        except (StoreError, StoreURIError, OSError, ValidationError) as exc:
            message = (
                f"cannot read the model from the store: {exc}. Check spec.source "
                "(uri, revision); retrying."
            )
            state.blocked = (reasons.MODEL_NOT_FOUND, message)
            log.error("instance.store_error", model=model.name, error=str(exc))
            return False
        planned, inputs = await self._plan(state, manifest)
        if isinstance(planned, Unschedulable):
            reason = f"cannot place {model.name}: {planned.reason}"
            state.blocked = (reasons.UNSCHEDULABLE, reason)
            log.error("instance.unschedulable", model=model.name, reason=planned.reason)
            return False
        plan = self._forced_pp(state, manifest, InstancePlan.from_plan(planned))
        inst = await self._start_instance(state, plan, requested, deadlines=planned)
        if inputs is not None:
            self._plan_inputs[inst.name] = inputs
        return True

    async def _plan(
        self, state: _ModelState, manifest: Manifest
    ) -> tuple[Plan | Unschedulable, tuple[PlanRequest, ClusterState] | None]:
        """The planner's placement over this backend's nodes (their free memory, links,
        host caches and fetches in flight), and the inputs it was made from."""
        spec = state.model.spec
        try:
            profile = profile_from_manifest(manifest, replica_bytes(spec), model_key(spec))
        except ValueError as exc:
            return Unschedulable(reason=f"{exc}; raise spec.resources.gpuMemoryGiB"), None
        used: dict[str, int] = {}
        for s in self._models.values():
            for inst in s.instances.values():
                for stage in inst.plan.stages:
                    used[stage.node] = used.get(stage.node, 0) + stage.memory_bytes
        statuses = await self._node_statuses()
        cluster = cluster_view(
            self.nodes.values(),
            used,
            statuses,
            time.time(),
            self.settings.store_bytes_per_s,
            devices=spec.parallelism.tensor,
        )
        config = self.calibrator.config(self.settings.planner)
        request = plan_request_for(spec, profile)
        return plan_placement(request, cluster, config), (request, cluster)

    def _forced_pp(
        self, state: _ModelState, manifest: Manifest, plan: InstancePlan
    ) -> InstancePlan:
        """``pipeline_size`` (a demo setting) overrides the planner's pp: the stages of the
        store's partition, all on the planned node, stage 0 holding a whole replica (so it
        can consolidate)."""
        wanted = self.settings.pipeline_size
        if wanted is None:
            return plan
        pp = min(wanted, state.model.spec.pipeline.max_size, manifest.num_layers)
        if pp == plan.pp:
            return plan
        node = plan.stages[0].node
        whole = replica_bytes(state.model.spec)
        stages = []
        for rank in range(pp):
            info = manifest.stage(pp, rank) if pp > 1 else None
            start, end = (info.start_layer, info.end_layer) if info else (0, manifest.num_layers)
            stages.append(
                StagePlan(
                    rank=rank,
                    node=node,
                    gpu=0,
                    start_layer=start,
                    end_layer=end,
                    memory_bytes=whole if rank == 0 else whole // pp,
                    all_card=rank == 0,
                    fetch_bytes=info.nbytes if info else manifest.total_bytes,
                )
            )
        return plan.model_copy(
            update={"pp": pp, "stages": stages, "reason": f"pp={pp} forced by settings"}
        )

    async def _start_instance(
        self,
        state: _ModelState,
        plan: InstancePlan,
        requested: float,
        *,
        replaces: LocalInstance | None = None,
        deadlines: Plan | None = None,
    ) -> LocalInstance:
        """Start an instance: a cold start (the planner's placement) or the standalone
        engine that consolidates ``replaces``."""
        model = state.model
        name = f"{model.name}-{uuid.uuid4().hex[:6]}"
        inst_dir = self.instances_dir / name
        inst_dir.mkdir(parents=True, exist_ok=True)
        head = self.nodes[plan.stage(0).node]
        inst = LocalInstance(
            name=name,
            model=model.name,
            plan=plan,
            requested_at=requested,
            dir=inst_dir,
            host=head.host,
            port=self._free_port(head),
            kv_transfer=kv_hand_over(plan, self.settings.kv_transfer),
            replaces=replaces.name if replaces else None,
        )
        timeline = Timeline(inst_dir / "timeline.jsonl", model=model.name, instance=name)
        timeline.record("placement", requested, time.time(), pp=plan.pp)
        if replaces is None:
            # As the operator asks a node's prefetcher: bytes flow before the worker exists.
            due_in = {s.rank: s.fetch_deadline_s for s in (deadlines.stages if deadlines else ())}
            for stage in plan.stages:
                pp = plan.pp if plan.pp > 1 else None
                # A stage the planner did not place (pp forced by settings) has no deadline.
                due_s = due_in.get(stage.rank)
                due = requested + due_s if due_s is not None and math.isfinite(due_s) else None
                await self._preload(
                    state,
                    self.nodes[stage.node],
                    pp,
                    stage.rank if pp else None,
                    deadline_at=due,
                )
        master_port = self._free_port(head)
        eager = self.settings.consolidation_enforce_eager if replaces else None
        for stage in plan.stages:
            config = self._worker_config(state, inst, stage.rank, master_port, eager)
            node = self.nodes[stage.node]
            prefix = [*node.exec_prefix, *self._sandbox(node, config)]
            python, warm_env = self._warm_python(node)
            env = worker_env(
                os.environ,
                host=node.host,
                cache_root=self._compile_cache(node),
                cpu_bind=self._cpu_bind(plan, stage.rank, replaces),
                extra={**node.env, **warm_env},
            )
            inst.stages.append(spawn_stage(inst_dir, config, env, prefix, python))
        state.instances[name] = inst
        log.info(
            "instance.starting",
            model=model.name,
            instance=name,
            pp=plan.pp,
            port=inst.port,
            nodes=[s.node for s in plan.stages],
            origin="consolidation" if replaces else "cold_start",
            replaces=inst.replaces,
        )
        return inst

    def _sandbox(self, node: LocalNode, config: WorkerConfig) -> list[str]:
        """The prefix that shows a worker only its model (read-only) and its KV area of
        the node's shared memory; [] when sandboxing is off or unavailable here."""
        mode = self.settings.worker_sandbox
        if mode == "off" or (mode == "auto" and not sandbox_available()):
            return []
        kv_area = (config.kv_area or config.instance) if config.kv_transfer else None
        read_only, read_write = worker_view(node.shm_dir, config.uri, config.revision, kv_area)
        # Created here, by the node's owner: the worker cannot create anything there.
        for path in (*read_only, *read_write):
            path.mkdir(parents=True, exist_ok=True)
        return sandbox_prefix(node.shm_dir, read_only, read_write)

    def _worker_config(
        self,
        state: _ModelState,
        inst: LocalInstance,
        rank: int,
        master_port: int,
        enforce_eager: bool | None,
    ) -> WorkerConfig:
        model = state.model
        node = self.nodes[inst.plan.stage(rank).node]
        if enforce_eager is None:
            # A CPU pipeline stage asked to run eager gets HydraServe's worker class
            # (launcher.with_execution_mode).
            enforce_eager = self.settings.enforce_eager
        return WorkerConfig(
            model_name=model.name,
            uri=model.spec.source.uri,
            revision=model.spec.source.revision,
            instance=inst.name,
            pp=inst.pp,
            rank=rank,
            tp=inst.plan.tp,
            host=node.host,
            port=inst.port,
            rendezvous=StageAddress(master_addr=inst.host, master_port=master_port),
            prefetcher_url=node.prefetcher_url,
            shm_dir=node.shm_dir,
            timeline=inst.dir / "timeline.jsonl",
            enforce_eager=enforce_eager,
            max_model_len=self.settings.max_model_len,
            kv_cache_bytes=self.settings.kv_cache_bytes,
            kv_transfer=inst.kv_transfer,
            # A standalone loads the KV its pipeline saved: they share the pipeline's area.
            kv_area=inst.replaces or inst.name,
            block_size=self.settings.kv_block_size if inst.kv_transfer else None,
            engine_args=[*self.settings.extra_engine_args, *model.spec.engine.args],
            artifact_scope=model.metadata.namespace if self.settings.compile_artifacts else None,
        )

    def _cpu_bind(
        self, plan: InstancePlan, rank: int, replaces: LocalInstance | None = None
    ) -> str | None:
        """A stage's VLLM_CPU_OMP_THREADS_BIND: its cores (:meth:`_stage_cores`), split
        between its tensor-parallel ranks ("0|1") when it has several."""
        bind = self._stage_cores(plan, rank, replaces)
        if plan.tp <= 1 or (bind is not None and "|" in bind):
            return bind
        if bind is None:
            node = self.nodes[plan.stage(rank).node]
            cores = list(node.cpus) or sorted(os.sched_getaffinity(0))
        else:
            cores = parse_cores(bind)
        return "|".join(split_cores(cores, plan.tp))

    def _stage_cores(
        self, plan: InstancePlan, rank: int, replaces: LocalInstance | None = None
    ) -> str | None:
        """A stage's cores: the configured binds round-robin, or else the cores of its node
        (this machine's, when the node names none) split between the instance's stages on
        that node, so that their OpenMP threads do not compete; a single stage on a node
        with no cores of its own keeps vLLM's choice. A standalone takes over the cores its
        pipeline's stages had on its node."""
        if replaces is not None:
            if self.settings.consolidation_cpu_bind is not None:
                return self.settings.consolidation_cpu_bind
            head = plan.stage(0).node
            used = [
                self._stage_cores(replaces.plan, s.rank)
                for s in replaces.plan.stages
                if s.node == head
            ]
            return ",".join(dict.fromkeys(b for b in used if b)) or None
        binds = self.settings.cpu_binds
        if binds:
            return binds[rank % len(binds)]
        node = self.nodes[plan.stage(rank).node]
        here = [s.rank for s in plan.stages if s.node == node.name]
        if len(here) == 1 and not node.cpus:
            return None
        cores = list(node.cpus) or sorted(os.sched_getaffinity(0))
        return split_cores(cores, len(here))[here.index(rank)]

    def _stop(
        self, state: _ModelState, inst: LocalInstance, why: str, grace: float | None = None
    ) -> None:
        """Forget an instance and stop its processes in the background (never in the
        event loop: stopping waits up to the grace period)."""
        state.instances.pop(inst.name, None)
        if inst.warmup is not None:
            inst.warmup.cancel()
        grace_s = self.settings.stop_grace_seconds if grace is None else grace
        task = asyncio.create_task(asyncio.to_thread(terminate, inst.stages, grace_s))
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)
        log.info("instance.stopped", model=state.model.name, instance=inst.name, reason=why)

    # -- consolidation -----------------------------------------------------------------------

    async def _consolidate(self, state: _ModelState) -> list[PipelineConsolidation]:
        """Observe every pipeline's consolidation, plan (shared, pure), apply; the records
        observed (the model's phase reads them)."""
        now = time.time()
        records: list[PipelineConsolidation] = []
        for inst in list(state.instances.values()):
            obs = inst.observation()
            if inst.pp <= 1 or obs.phase not in (InstancePhase.READY, InstancePhase.DRAINING):
                continue
            if inst.consolidation is None:
                inst.consolidation = Consolidation(started_at=inst.ready_at or now)
            records.append(await self._consolidation_record(state, inst, obs.phase, now))
        # A standalone whose pipeline went away (scaled down, failed) has nothing to replace.
        for inst in list(state.instances.values()):
            if inst.replaces is not None and not inst.promoted:
                pipeline = state.instances.get(inst.replaces)
                if pipeline is None or pipeline.failure is not None:
                    self._stop(state, inst, "its pipeline is gone")
        for action in consolidation_plan(records, self.policy, now):
            await self._apply(state, action, now)
        return records

    async def _consolidation_record(
        self, state: _ModelState, pipeline: LocalInstance, phase: InstancePhase, now: float
    ) -> PipelineConsolidation:
        c = pipeline.consolidation
        assert c is not None
        source = state.model.spec.source
        node = self.nodes[pipeline.node]
        shm = ModelShm(node.shm_dir, source.uri, source.revision)
        full = shm.read_status(fetch_name(None, None))
        if full is not None and full.state == FetchState.DONE and c.fetched_at is None:
            # A whole model already on the node (an earlier fetch) took no time for this one.
            c.fetched_at = max(full.finished_at or now, c.started_at)
        standalone = state.instances.get(c.standalone) if c.standalone else None
        if phase == InstancePhase.DRAINING:
            c.in_flight = await self._engine_in_flight(pipeline)
            c.idle_since = next_idle_since(c.idle_since, c.in_flight, now)
        return PipelineConsolidation(
            pipeline=pipeline.name,
            pp=pipeline.pp,
            phase=phase,
            all_card_node=consolidation_target(pipeline.plan),
            standalone=_standalone_state(standalone, c.standalone),
            full_fetch=full.state if full is not None else None,
            draining_since=pipeline.draining_since,
            in_flight=c.in_flight,
            idle_since=c.idle_since,
            abandoned=c.abandoned,
            error=standalone.failure if standalone is not None else c.error,
        )

    async def _apply(self, state: _ModelState, action: ConsolidationAction, now: float) -> None:
        pipeline = state.instances.get(action.pipeline)
        if pipeline is None or pipeline.consolidation is None:
            return
        c = pipeline.consolidation
        model = state.model.name
        if isinstance(action, FetchWholeModel):
            log.info("consolidation.fetch", model=model, instance=pipeline.name, node=action.node)
            node = self.nodes[action.node or pipeline.node]
            await self._preload(state, node, None, None, low_priority=True)
        elif isinstance(action, StartStandalone):
            plan = standalone_plan(pipeline.plan)
            standalone = await self._start_instance(state, plan, now, replaces=pipeline)
            c.standalone = standalone.name
            log.info("consolidation.start", model=model, instance=pipeline.name,
                     standalone=standalone.name, reason=reasons.CONSOLIDATION_STARTED)  # fmt: skip
        elif isinstance(action, Promote):
            standalone = state.instances[c.standalone or ""]
            # One view change: new requests go to the standalone, the gateway moves the
            # pipeline's in-flight requests, and the pipeline takes no new ones.
            standalone.promoted = True
            standalone.ready_at = now
            pipeline.draining_since = now
            c.promoted_at = now
            log.info(
                "consolidation.promoted",
                model=model,
                instance=pipeline.name,
                standalone=standalone.name,
                since_start_s=round(now - c.started_at, 3),
                reason=reasons.CONSOLIDATION_PROMOTED,
            )
        elif isinstance(action, Release):
            self._stop(state, pipeline, action.reason, self.settings.release_grace_seconds)
            record = self._record(
                state, pipeline, time.time(), outcome="done", reason=action.reason
            )
            log.info(
                "consolidation.done",
                model=model,
                instance=pipeline.name,
                standalone=c.standalone,
                seconds=record.seconds,
                fetch_s=_since(c.started_at, c.fetched_at),
                promote_s=_since(c.started_at, c.promoted_at),
                drain_s=_since(c.promoted_at, record.released_at),
                reason=action.reason,
            )
        elif isinstance(action, Abandon):
            c.abandoned, c.error = True, action.reason
            replacement = state.instances.get(c.standalone or "")
            if replacement is not None:
                self._stop(state, replacement, "consolidation abandoned")
            self._record(state, pipeline, now, outcome="abandoned", reason=action.reason)
            log.warning("consolidation.abandoned", model=model, instance=pipeline.name,
                        reason=action.reason)  # fmt: skip

    def _record(
        self, state: _ModelState, pipeline: LocalInstance, now: float, *, outcome: str, reason: str
    ) -> ConsolidationStatus:
        c = pipeline.consolidation
        assert c is not None
        record = ConsolidationStatus(
            pipeline=pipeline.name,
            standalone=c.standalone or "",
            started_at=c.started_at,
            fetched_at=c.fetched_at,
            promoted_at=c.promoted_at,
            released_at=now if outcome == "done" else None,
            outcome=outcome,
            reason=reason,
        )
        self._finished[state.model.name].append(record)
        return record


def _standalone_state(inst: LocalInstance | None, name: str | None) -> StandaloneState:
    if name is None:
        return StandaloneState.NONE
    if inst is None or inst.failure is not None:
        return StandaloneState.FAILED
    if inst.promoted:
        return StandaloneState.SERVING
    return StandaloneState.WARM if inst.observation().warm else StandaloneState.STARTING


def _since(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else round(end - start, 3)
