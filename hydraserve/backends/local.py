"""The embedded backend: model instances as local worker processes.

Same planner and data plane as the cluster, minus Kubernetes: ``scale()`` records the
desired replica count, a reconcile loop turns the difference into start/stop actions
(:func:`plan_instances`), and a monitor moves instances Starting → Ready (``/health``
answers) or Failed (a stage process exited), collecting the cold-start timeline.

This machine is one node with an in-process node prefetcher: stage fetches are preloaded
through it before a worker starts (as the operator asks a node's prefetcher), and once a
pipelined instance serves, it consolidates (:mod:`hydraserve.control.consolidation`): the
whole model is fetched at low priority, a standalone pp = 1 engine starts from shared
memory, takes over, and the pipeline drains and is released.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from pydantic import Field
from pydantic_settings import BaseSettings

from hydraserve.api.models import ServerlessModel, StageTiming
from hydraserve.backends.base import (
    ClusterBackend,
    ConsolidationRecord,
    InstanceOrigin,
    InstancePhase,
    InstanceView,
    ModelView,
)
from hydraserve.control.consolidation import (
    Abandon,
    ConsolidationAction,
    ConsolidationSettings,
    FetchWholeModel,
    PipelineConsolidation,
    Promote,
    Release,
    StandaloneState,
    StartStandalone,
    consolidation_plan,
    model_phase,
)
from hydraserve.control.replicas import plan_instances
from hydraserve.logs import get_logger
from hydraserve.planner import plan
from hydraserve.planner.profile import (
    kv_bytes_per_token,
    model_key,
    plan_request_for,
    profile_from_manifest,
    replica_bytes,
)
from hydraserve.planner.types import ClusterState, GPUState, NodeState, Plan, Unschedulable
from hydraserve.prefetcher.node import Prefetcher, PreloadRequest
from hydraserve.prefetcher.shm import FetchState, ModelShm, fetch_name
from hydraserve.settings import CommonSettings, component_config
from hydraserve.store import Manifest, ModelRef, ModelStore, StoreError
from hydraserve.worker.config import StageAddress, WorkerConfig
from hydraserve.worker.inflight import INFLIGHT_PATH
from hydraserve.worker.timeline import Timeline, read_timeline, stage_timings

log = get_logger("cluster.local")


class LocalSettings(BaseSettings, ConsolidationSettings):
    model_config = component_config("local")
    common: CommonSettings = Field(default_factory=CommonSettings)
    worker_host: str = "127.0.0.1"
    vllm_cache_root: Path | None = Field(
        default=None, description="vLLM compile cache; default <state_dir>/vllm-cache."
    )
    enforce_eager: bool = Field(
        default=True,
        description="Run single-stage engines eager (fastest start). Pipelines (pp > 1) always "
        "run compiled: vLLM's CPU backend fails on the first step of an eager pipeline "
        "(decision 0004).",
    )
    pipeline_size: int | None = Field(
        default=None,
        ge=1,
        le=4,
        description="Force this pp for local instances (demos, tests); None = the planner's.",
    )
    memory_budget_bytes: int | None = Field(
        default=None,
        description="Memory the planner may give instances on this machine (None: 80% of "
        "what is available at start).",
    )
    local_read_bytes_per_s: float = Field(
        default=2e9, gt=0, description="How fast this machine reads its local store."
    )
    startup_timeout_seconds: float = 600.0
    poll_seconds: float = 0.1
    stop_grace_seconds: float = 10.0
    release_grace_seconds: float = Field(
        default=1.0,
        ge=0,
        description="SIGTERM-to-SIGKILL grace for a drained pipeline's stages (idle: "
        "nothing to finish, so its memory is given back at once).",
    )
    kv_cache_bytes: int = 256 << 20
    max_model_len: int = 1024
    cpu_binds: list[str] = Field(
        default_factory=list,
        description="VLLM_CPU_OMP_THREADS_BIND per stage, round-robin (empty: a pipeline's "
        "stages split the machine's cores; a single stage uses vLLM's own choice).",
    )
    prefetcher_url: str | None = Field(
        default=None,
        description="A node prefetcher's HTTP API to fetch through; None = one in-process.",
    )
    node_name: str = "local"
    extra_engine_args: list[str] = Field(default_factory=list)

    # --- consolidation ----------------------------------------------------------------
    consolidation_cpu_bind: str | None = Field(
        default=None,
        description="VLLM_CPU_OMP_THREADS_BIND of the standalone engine; None = the "
        "pipeline stages' binds together (it takes over their cores).",
    )
    kv_transfer: bool = Field(
        default=True,
        description="Engines save and load KV caches through the node's shared memory "
        "(HydraServe's KV connector), so requests can move by KV transfer.",
    )
    kv_block_size: int = Field(
        default=32,
        ge=16,
        description="KV block size of every engine when kv_transfer is on (whole blocks "
        "move; the CPU default of 128 would leave short requests nothing to move).",
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class _Stage:
    rank: int
    process: subprocess.Popen[bytes]
    log_path: Path


def split_cores(cores: Sequence[int], parts: int) -> list[str]:
    """``cores`` in ``parts`` contiguous groups as VLLM_CPU_OMP_THREADS_BIND lists
    (``[0, 1, 2, 3]``, 2 → ``["0,1", "2,3"]``); with fewer cores than parts, groups share
    cores round-robin."""
    if not cores:
        raise ValueError("no cores to split")
    if len(cores) < parts:
        return [str(cores[i % len(cores)]) for i in range(parts)]
    size, extra = divmod(len(cores), parts)
    groups: list[str] = []
    start = 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        groups.append(",".join(str(c) for c in cores[start:end]))
        start = end
    return groups


@dataclass
class _Consolidation:
    """A pipeline's consolidation as this backend carries it out."""

    started_at: float
    standalone: str | None = None
    fetched_at: float | None = None
    promoted_at: float | None = None
    draining_since: float | None = None
    in_flight: int | None = None
    idle_since: float | None = None
    abandoned: bool = False
    error: str | None = None


@dataclass
class _Instance:
    name: str
    model: str
    pp: int
    started_at: float
    dir: Path
    port: int
    stages: list[_Stage] = field(default_factory=list)
    phase: InstancePhase = InstancePhase.STARTING
    ready_at: float | None = None
    error: str | None = None
    cold_start: tuple[StageTiming, ...] = ()
    origin: InstanceOrigin = InstanceOrigin.COLD_START
    node: str = "local"
    kv_transfer: bool = False
    replaces: str | None = None  # a standalone: the pipeline it consolidates
    warm: bool = False  # a standalone: healthy with the whole model verified, not routed yet
    warmup: asyncio.Task[float | None] | None = None  # a standalone's warm-up request
    consolidation: _Consolidation | None = None  # a pipeline: its consolidation

    @property
    def routed(self) -> bool:
        """Counts as a replica (a standalone does from its promotion on)."""
        return self.replaces is None or self.phase == InstancePhase.READY

    def view(self, host: str) -> InstanceView:
        serving = self.phase in (InstancePhase.READY, InstancePhase.DRAINING)
        return InstanceView(
            name=self.name,
            model=self.model,
            pp=self.pp,
            phase=self.phase,
            endpoint=f"http://{host}:{self.port}" if serving else None,
            started_at=self.started_at,
            ready_at=self.ready_at,
            error=self.error,
            cold_start=self.cold_start,
            origin=self.origin,
            node=self.node,
            kv_transfer=self.kv_transfer,
        )


CONSOLIDATION_HISTORY = 16


@dataclass
class _ModelState:
    model: ServerlessModel
    desired: int = 0
    instances: dict[str, _Instance] = field(default_factory=dict)
    error: str | None = None
    consecutive_failures: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    manifest: Manifest | None = None
    kv_bytes_per_token: int | None = None
    consolidations: list[ConsolidationRecord] = field(default_factory=list)


class LocalBackend(ClusterBackend):
    def __init__(self, models: list[ServerlessModel], settings: LocalSettings | None = None):
        self.settings = settings or LocalSettings()
        self._models = {m.name: _ModelState(model=m) for m in models}
        for state in self._models.values():
            state.desired = state.model.spec.scaling.min_replicas
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._http = httpx.AsyncClient(timeout=2)
        self.instances_dir = self.settings.common.state_dir / "instances"
        self._budget: int | None = None
        self._prefetcher: Prefetcher | None = None
        self.policy = self.settings.consolidation_policy()

    # -- ClusterBackend ------------------------------------------------------------------

    def list_models(self) -> list[ModelView]:
        return [self._view(s) for s in self._models.values()]

    def get_model(self, name: str) -> ModelView | None:
        state = self._models.get(name)
        return self._view(state) if state else None

    async def scale(self, name: str, replicas: int) -> None:
        state = self._models[name]
        spec = state.model.spec.scaling
        replicas = max(0, min(replicas, spec.max_replicas))
        if replicas == state.desired and state.error is None:
            return
        log.info("scale", model=name, replicas=replicas, previous=state.desired)
        state.desired = replicas
        if replicas == 0 or state.error:
            # A new request for a failed model tries again (the store may be fixed now).
            state.error = None
            state.consecutive_failures = 0
        self._wake.set()

    async def wait_for_change(self, name: str, timeout: float) -> None:
        state = self._models[name]
        event = state.changed
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)

    async def start(self) -> None:
        self.instances_dir.mkdir(parents=True, exist_ok=True)
        self._task = asyncio.create_task(self._loop(), name="local-backend")

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for state in self._models.values():
            for inst in list(state.instances.values()):
                if inst.warmup is not None:
                    inst.warmup.cancel()
                await asyncio.to_thread(self._terminate, inst)
        if self._prefetcher is not None:
            self._prefetcher.close()
        await self._http.aclose()

    def instance_pids(self, name: str) -> dict[str, list[int]]:
        """The stage processes of each of a model's instances (for accounting; a stage's
        engine may have child processes)."""
        state = self._models.get(name)
        if state is None:
            return {}
        return {i.name: [s.process.pid for s in i.stages] for i in state.instances.values()}

    # -- views and notifications -----------------------------------------------------------

    def _view(self, state: _ModelState) -> ModelView:
        instances = tuple(i.view(self.settings.worker_host) for i in state.instances.values())
        ready = sum(1 for i in instances if i.phase == InstancePhase.READY)
        live = sum(1 for i in state.instances.values() if i.routed and i.phase in (
            InstancePhase.STARTING, InstancePhase.READY))  # fmt: skip
        return ModelView(
            model=state.model,
            desired_replicas=state.desired,
            instances=instances,
            error=state.error,
            phase=model_phase(
                error=state.error,
                desired=state.desired,
                ready=ready,
                live=live,
                consolidating=self._consolidating(state),
            ),
            consolidations=tuple(state.consolidations),
            kv_bytes_per_token=state.kv_bytes_per_token,
        )

    def _consolidating(self, state: _ModelState) -> bool:
        for inst in state.instances.values():
            c = inst.consolidation
            if c is None or c.abandoned:
                continue
            if inst.phase == InstancePhase.DRAINING:
                return True
            if inst.phase == InstancePhase.READY and self.policy.enabled:
                return True
        return False

    def _notify(self, state: _ModelState) -> None:
        state.changed.set()
        state.changed = asyncio.Event()

    # -- reconcile loop -------------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            for state in list(self._models.values()):
                try:
                    await self._reconcile(state)
                    await self._monitor(state)
                    await self._consolidate(state)
                except Exception as exc:  # keep serving other models
                    log.exception("reconcile.error", model=state.model.name, error=str(exc))
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.poll_seconds)

    async def _reconcile(self, state: _ModelState) -> None:
        if state.error:
            return
        # A standalone engine that is still on its way to replace a pipeline is not a
        # replica yet: the consolidation owns it, not the replica count.
        views = [
            i.view(self.settings.worker_host)
            for i in state.instances.values()
            if i.routed and i.phase != InstancePhase.DRAINING
        ]
        actions = plan_instances(state.desired, views, state.consecutive_failures)
        for name in actions.stop:
            inst = state.instances.pop(name)
            await asyncio.to_thread(self._terminate, inst)
            log.info("instance.stopped", model=state.model.name, instance=name)
        if actions.give_up:
            state.error = actions.give_up
        for _ in range(actions.start):
            await self._start_instance(state)
        if not actions.empty:
            self._notify(state)

    async def _load_manifest(self, state: _ModelState) -> Manifest | None:
        model = state.model
        try:
            if state.manifest is None:
                store = ModelStore(
                    ModelRef(model.spec.source.uri, model.spec.source.revision),
                    self.settings.common.s3,
                )
                state.manifest = await asyncio.to_thread(store.manifest)
                with contextlib.suppress(StoreError, ValueError):
                    config = await asyncio.to_thread(store.read_config)
                    state.kv_bytes_per_token = kv_bytes_per_token(config)
        except StoreError as exc:
            state.error = str(exc)
            log.error("instance.store_error", model=model.name, error=str(exc))
            return None
        return state.manifest

    async def _start_instance(
        self, state: _ModelState, *, replaces: _Instance | None = None
    ) -> _Instance | None:
        """Start an instance: a cold start for demand (the planner's pp), or the standalone
        engine that consolidates ``replaces`` (pp = 1, on its all-card worker's node)."""
        model = state.model
        requested = time.time()
        manifest = await self._load_manifest(state)
        if manifest is None:
            return None
        if replaces is None:
            planned = self._plan(state, manifest)
            if isinstance(planned, Unschedulable):
                state.error = f"cannot place {model.name} on this machine: {planned.reason}"
                log.error("instance.unschedulable", model=model.name, reason=planned.reason)
                return None
            pp = planned.pp
            if self.settings.pipeline_size is not None:
                pp = min(
                    self.settings.pipeline_size, model.spec.pipeline.max_size, manifest.num_layers
                )
        else:
            pp = 1
        name = f"{model.name}-{uuid.uuid4().hex[:6]}"
        inst_dir = self.instances_dir / name
        inst_dir.mkdir(parents=True, exist_ok=True)
        inst = _Instance(
            name=name,
            model=model.name,
            pp=pp,
            started_at=requested,
            dir=inst_dir,
            port=free_port(self.settings.worker_host),
            origin=InstanceOrigin.CONSOLIDATION if replaces else InstanceOrigin.COLD_START,
            node=self.settings.node_name,
            kv_transfer=self.settings.kv_transfer,
            replaces=replaces.name if replaces else None,
        )
        timeline = Timeline(inst_dir / "timeline.jsonl", model=model.name, instance=name)
        timeline.record("placement", requested, time.time(), pp=pp)
        if self.settings.prefetcher_url is None:
            # As the operator asks a node's prefetcher: bytes flow before the worker exists.
            for rank in range(pp):
                await self._preload(state, pp if pp > 1 else None, rank if pp > 1 else None)
        master_port = free_port(self.settings.worker_host)
        eager = self.settings.consolidation_enforce_eager if replaces else None
        for rank in range(pp):
            config = self._worker_config(state, inst, rank, master_port, eager)
            inst.stages.append(self._spawn(inst, config, rank, self._cpu_bind(rank, pp, replaces)))
        state.instances[name] = inst
        log.info(
            "instance.starting",
            model=model.name,
            instance=name,
            pp=pp,
            port=inst.port,
            origin=inst.origin.value,
            replaces=inst.replaces,
        )
        return inst

    def _worker_config(
        self,
        state: _ModelState,
        inst: _Instance,
        rank: int,
        master_port: int,
        enforce_eager: bool | None,
    ) -> WorkerConfig:
        model = state.model
        if enforce_eager is None:
            enforce_eager = self.settings.enforce_eager and inst.pp == 1
        return WorkerConfig(
            model_name=model.name,
            uri=model.spec.source.uri,
            revision=model.spec.source.revision,
            instance=inst.name,
            pp=inst.pp,
            rank=rank,
            host=self.settings.worker_host,
            port=inst.port,
            rendezvous=StageAddress(master_addr=self.settings.worker_host, master_port=master_port),
            prefetcher_url=self.settings.prefetcher_url,
            shm_dir=self.settings.common.shm_dir,
            timeline=inst.dir / "timeline.jsonl",
            enforce_eager=enforce_eager,
            max_model_len=self.settings.max_model_len,
            kv_cache_bytes=self.settings.kv_cache_bytes,
            kv_transfer=self.settings.kv_transfer,
            block_size=self.settings.kv_block_size if self.settings.kv_transfer else None,
            engine_args=[*self.settings.extra_engine_args, *model.spec.engine.args],
        )

    def _cpu_bind(self, rank: int, pp: int, replaces: _Instance | None) -> str | None:
        if replaces is not None:
            if self.settings.consolidation_cpu_bind is not None:
                return self.settings.consolidation_cpu_bind
            # The standalone takes over the cores the pipeline's stages had.
            used = [self._stage_binds(replaces.pp)[r] for r in range(replaces.pp)]
            return ",".join(dict.fromkeys(b for b in used if b)) or None
        return self._stage_binds(pp)[rank]

    def _stage_binds(self, pp: int) -> list[str | None]:
        """Each stage's cores: the configured binds round-robin, or else (pp > 1) the
        machine's cores split between the stages, so that their OpenMP threads do not
        compete for the same cores; a single stage keeps vLLM's own choice."""
        binds = self.settings.cpu_binds
        if binds:
            return [binds[r % len(binds)] for r in range(pp)]
        if pp == 1:
            return [None]
        return list(split_cores(sorted(os.sched_getaffinity(0)), pp))

    def _node_prefetcher(self) -> Prefetcher:
        if self._prefetcher is None:
            self._prefetcher = Prefetcher(
                node=self.settings.node_name,
                shm_dir=self.settings.common.shm_dir,
                capacity_bytes=self._memory_budget(),
                s3=self.settings.common.s3,
            )
        return self._prefetcher

    async def _preload(
        self,
        state: _ModelState,
        pp: int | None,
        rank: int | None,
        *,
        low_priority: bool = False,
    ) -> None:
        source = state.model.spec.source
        request = PreloadRequest(
            uri=source.uri, revision=source.revision, pp=pp, rank=rank, low_priority=low_priority
        )
        if self.settings.prefetcher_url is not None:
            resp = await self._http.post(
                f"{self.settings.prefetcher_url}/v1/preload", json=request.model_dump(), timeout=30
            )
            resp.raise_for_status()
            return
        await asyncio.to_thread(self._node_prefetcher().preload, request)

    def _plan(self, state: _ModelState, manifest: Manifest) -> Plan | Unschedulable:
        """The controller's plan on this machine, seen as one node whose "GPU" is the
        memory budget minus what running instances were given."""
        spec = state.model.spec
        try:
            profile = profile_from_manifest(manifest, replica_bytes(spec), model_key(spec))
        except ValueError as exc:
            return Unschedulable(reason=f"{exc}; raise spec.resources.gpuMemoryGiB")
        used = sum(replica_bytes(s.model.spec) * len(s.instances) for s in self._models.values())
        budget = self._memory_budget()
        source = spec.source
        shm = ModelShm(self.settings.common.shm_dir, source.uri, source.revision)
        full = shm.read_status(fetch_name(None, None))
        cached = frozenset({model_key(spec)}) if full and full.state == FetchState.DONE else None
        node = NodeState(
            name=self.settings.node_name,
            gpus=(GPUState(index=0, total_bytes=budget, free_bytes=max(0, budget - used)),),
            nic_bytes_per_s=self.settings.local_read_bytes_per_s,
            cached_models=cached or frozenset(),
        )
        return plan(plan_request_for(spec, profile), ClusterState(nodes=(node,)))

    def _memory_budget(self) -> int:
        if self.settings.memory_budget_bytes is not None:
            return self.settings.memory_budget_bytes
        if self._budget is None:
            available = 0
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
            self._budget = int(available * 0.8)
        return self._budget

    def _spawn(
        self, inst: _Instance, config: WorkerConfig, rank: int, cpu_bind: str | None
    ) -> _Stage:
        config_path = inst.dir / f"stage{rank}.json"
        config_path.write_text(config.model_dump_json())
        env = dict(os.environ)
        env.setdefault("VLLM_HOST_IP", self.settings.worker_host)
        env["VLLM_CACHE_ROOT"] = str(
            self.settings.vllm_cache_root or self.settings.common.state_dir / "vllm-cache"
        )
        if cpu_bind:
            env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_bind
        log_path = inst.dir / f"stage{rank}.log"
        with open(log_path, "ab") as log_file:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "hydraserve.cli.main",
                    "worker",
                    "--config",
                    str(config_path),
                ],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        return _Stage(rank=rank, process=process, log_path=log_path)

    async def _monitor(self, state: _ModelState) -> None:
        for inst in list(state.instances.values()):
            if inst.phase in (InstancePhase.FAILED, InstancePhase.DRAINING):
                continue
            exited = [s for s in inst.stages if s.process.poll() is not None]
            if exited:
                stage = exited[0]
                self._fail(
                    state,
                    inst,
                    f"stage {stage.rank} exited with code "
                    f"{stage.process.returncode}: {_tail(stage.log_path)}",
                )
                continue
            if inst.phase != InstancePhase.STARTING or inst.warm:
                continue
            if time.time() - inst.started_at > self.settings.startup_timeout_seconds:
                self._fail(
                    state, inst, f"not ready after {self.settings.startup_timeout_seconds:.0f}s"
                )
                continue
            verified, fetch_error = self._fetch_outcome(state, inst)
            if fetch_error is not None:
                self._fail(state, inst, fetch_error)
                continue
            if not (verified and await self._healthy(inst)):
                continue
            now = time.time()
            events = read_timeline(inst.dir / "timeline.jsonl")
            inst.cold_start = tuple(stage_timings(events, inst.started_at))
            if inst.replaces is not None:
                # Routed only when the consolidation promotes it (with the pipeline's
                # drain, in one view change); first its first-call paths run once, so the
                # requests that move to it do not pay them.
                if inst.warmup is None:
                    inst.warmup = asyncio.create_task(self._warm_up(state, inst))
                elif inst.warmup.done():
                    inst.warm = True
                    log.info("consolidation.standalone_warm", model=state.model.name,
                             instance=inst.name, replaces=inst.replaces,
                             warmup_s=inst.warmup.result(),
                             start_s=round(now - inst.started_at, 3))  # fmt: skip
                continue
            inst.phase = InstancePhase.READY
            inst.ready_at = now
            state.consecutive_failures = 0
            log.info(
                "instance.ready",
                model=state.model.name,
                instance=inst.name,
                cold_start_s=round(inst.ready_at - inst.started_at, 3),
                stages={t.stage: round(t.end - t.start, 3) for t in inst.cold_start},
            )
            self._notify(state)

    def _fail(self, state: _ModelState, inst: _Instance, error: str) -> None:
        inst.phase = InstancePhase.FAILED
        inst.error = error
        if inst.replaces is None:  # a failed consolidation is not a failed cold start
            state.consecutive_failures += 1
        log.error("instance.failed", model=state.model.name, instance=inst.name, error=error)
        self._terminate(inst)
        self._notify(state)

    def _fetch_outcome(self, state: _ModelState, inst: _Instance) -> tuple[bool, str | None]:
        """(every stage's bytes are fetched and verified, the error of a failed fetch).

        The engine may have started on early-adopted, still-arriving weights: it must not
        serve before every byte is verified, and a failed fetch means it never will.
        """
        source = state.model.spec.source
        shm = ModelShm(self.settings.common.shm_dir, source.uri, source.revision)
        full = shm.read_status(fetch_name(None, None))
        if full is not None and full.state == FetchState.DONE:
            return True, None
        verified = True
        for rank in range(inst.pp):
            name = fetch_name(inst.pp if inst.pp > 1 else None, rank if inst.pp > 1 else None)
            status = shm.read_status(name)
            # A failure left by an earlier instance does not count: this one fetches anew.
            if (
                status is not None
                and status.state == FetchState.FAILED
                and (status.started_at or 0.0) >= inst.started_at
            ):
                return False, f"fetching stage {rank}'s weights failed: {status.error}"
            verified = verified and status is not None and status.state == FetchState.DONE
        return verified, None

    async def _healthy(self, inst: _Instance) -> bool:
        try:
            resp = await self._http.get(f"http://{self.settings.worker_host}:{inst.port}/health")
        except httpx.HTTPError:
            return False
        return resp.status_code == 200

    async def _warm_up(self, state: _ModelState, inst: _Instance) -> float | None:
        """Run the engine's first-call paths before it takes over: two concurrent requests
        (a batched prefill of a longer prompt, then batched decode steps), as the moved
        requests will. A fresh eager engine builds kernels and touches its KV cache on first
        use. Seconds it took; None if it failed (the takeover goes on regardless)."""
        url = f"http://{self.settings.worker_host}:{inst.port}/v1/completions"
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

    async def _engine_in_flight(self, inst: _Instance) -> int | None:
        """Requests the instance's engine serves now (None: it did not answer)."""
        url = f"http://{self.settings.worker_host}:{inst.port}{INFLIGHT_PATH}"
        try:
            resp = await self._http.get(url)
            return int(resp.json()["in_flight"]) if resp.status_code == 200 else None
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return None

    # -- consolidation -----------------------------------------------------------------------

    async def _consolidate(self, state: _ModelState) -> None:
        """Observe every pipeline's consolidation, plan, apply (see cluster.consolidation)."""
        now = time.time()
        observed: list[PipelineConsolidation] = []
        for inst in list(state.instances.values()):
            if inst.pp <= 1 or inst.phase not in (InstancePhase.READY, InstancePhase.DRAINING):
                continue
            if inst.consolidation is None:
                inst.consolidation = _Consolidation(started_at=inst.ready_at or now)
            observed.append(await self._observe(state, inst, now))
        # A standalone whose pipeline went away (scaled down, failed) has nothing to replace.
        for inst in list(state.instances.values()):
            if inst.replaces is not None and inst.phase != InstancePhase.READY:
                pipeline = state.instances.get(inst.replaces)
                if pipeline is None or pipeline.phase not in (
                    InstancePhase.READY,
                    InstancePhase.DRAINING,
                ):
                    await self._stop(state, inst, "its pipeline is gone")
        for action in consolidation_plan(observed, self.policy, now):
            await self._apply(state, action, now)

    async def _observe(
        self, state: _ModelState, pipeline: _Instance, now: float
    ) -> PipelineConsolidation:
        c = pipeline.consolidation
        assert c is not None
        source = state.model.spec.source
        shm = ModelShm(self.settings.common.shm_dir, source.uri, source.revision)
        full = shm.read_status(fetch_name(None, None))
        if full is not None and full.state == FetchState.DONE and c.fetched_at is None:
            # A whole model already on the node (an earlier fetch) took no time for this one.
            c.fetched_at = max(full.finished_at or now, c.started_at)
        standalone = state.instances.get(c.standalone) if c.standalone else None
        if pipeline.phase == InstancePhase.DRAINING:
            c.in_flight = await self._engine_in_flight(pipeline)
            if c.in_flight == 0:
                c.idle_since = c.idle_since or now
            else:
                c.idle_since = None
        return PipelineConsolidation(
            pipeline=pipeline.name,
            pp=pipeline.pp,
            phase=pipeline.phase,
            all_card_node=pipeline.node,
            standalone=_standalone_state(standalone, c.standalone),
            full_fetch=full.state if full is not None else None,
            draining_since=c.draining_since,
            in_flight=c.in_flight,
            idle_since=c.idle_since,
            abandoned=c.abandoned,
            error=standalone.error if standalone is not None else c.error,
        )

    async def _apply(self, state: _ModelState, action: ConsolidationAction, now: float) -> None:
        pipeline = state.instances.get(action.pipeline)
        if pipeline is None or pipeline.consolidation is None:
            return
        c = pipeline.consolidation
        model = state.model.name
        if isinstance(action, FetchWholeModel):
            log.info("consolidation.fetch", model=model, instance=pipeline.name, node=action.node)
            await self._preload(state, None, None, low_priority=True)
        elif isinstance(action, StartStandalone):
            standalone = await self._start_instance(state, replaces=pipeline)
            if standalone is None:
                c.abandoned, c.error = True, "the standalone engine could not be started"
                self._record(state, pipeline, now, outcome="abandoned", reason=c.error)
            else:
                c.standalone = standalone.name
                log.info("consolidation.start", model=model, instance=pipeline.name,
                         standalone=standalone.name)  # fmt: skip
            self._notify(state)
        elif isinstance(action, Promote):
            standalone = state.instances[c.standalone or ""]
            # One view change: new requests go to the standalone, the gateway moves the
            # pipeline's in-flight requests, and the pipeline takes no new ones.
            standalone.phase, standalone.ready_at, standalone.warm = InstancePhase.READY, now, False
            pipeline.phase = InstancePhase.DRAINING
            c.promoted_at = c.draining_since = now
            log.info(
                "consolidation.promoted",
                model=model,
                instance=pipeline.name,
                standalone=standalone.name,
                since_start_s=round(now - c.started_at, 3),
            )
            self._notify(state)
        elif isinstance(action, Release):
            await self._stop(state, pipeline, action.reason, self.settings.release_grace_seconds)
            now = time.time()  # released: its stage processes are gone
            record = self._record(state, pipeline, now, outcome="done", reason=action.reason)
            log.info(
                "consolidation.done",
                model=model,
                instance=pipeline.name,
                standalone=c.standalone,
                seconds=round(record.seconds or 0.0, 3),
                fetch_s=_since(c.started_at, c.fetched_at),
                promote_s=_since(c.started_at, c.promoted_at),
                drain_s=_since(c.promoted_at, now),
                reason=action.reason,
            )
        elif isinstance(action, Abandon):
            c.abandoned, c.error = True, action.reason
            standalone = state.instances.get(c.standalone or "")
            if standalone is not None:
                await self._stop(state, standalone, "consolidation abandoned")
            self._record(state, pipeline, now, outcome="abandoned", reason=action.reason)
            log.warning("consolidation.abandoned", model=model, instance=pipeline.name,
                        reason=action.reason)  # fmt: skip
            self._notify(state)

    def _record(
        self, state: _ModelState, pipeline: _Instance, now: float, *, outcome: str, reason: str
    ) -> ConsolidationRecord:
        c = pipeline.consolidation
        assert c is not None
        record = ConsolidationRecord(
            model=state.model.name,
            pipeline=pipeline.name,
            standalone=c.standalone or "",
            started_at=c.started_at,
            fetched_at=c.fetched_at,
            promoted_at=c.promoted_at,
            released_at=now if outcome == "done" else None,
            outcome=outcome,
            reason=reason,
        )
        state.consolidations = [*state.consolidations, record][-CONSOLIDATION_HISTORY:]
        return record

    async def _stop(
        self, state: _ModelState, inst: _Instance, why: str, grace: float | None = None
    ) -> None:
        state.instances.pop(inst.name, None)
        await asyncio.to_thread(self._terminate, inst, grace)
        log.info("instance.stopped", model=state.model.name, instance=inst.name, reason=why)
        self._notify(state)

    def _terminate(self, inst: _Instance, grace: float | None = None) -> None:
        """Stop every process of an instance (each stage runs in its own session)."""
        for stage in inst.stages:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(stage.process.pid, signal.SIGTERM)
        deadline = time.time() + (self.settings.stop_grace_seconds if grace is None else grace)
        for stage in inst.stages:
            with contextlib.suppress(subprocess.TimeoutExpired):
                stage.process.wait(max(0.0, deadline - time.time()))
            with contextlib.suppress(ProcessLookupError):
                os.killpg(stage.process.pid, signal.SIGKILL)
            stage.process.wait()


def _standalone_state(inst: _Instance | None, name: str | None) -> StandaloneState:
    if name is None:
        return StandaloneState.NONE
    if inst is None or inst.phase == InstancePhase.FAILED:
        return StandaloneState.FAILED
    if inst.phase == InstancePhase.READY:
        return StandaloneState.SERVING
    return StandaloneState.WARM if inst.warm else StandaloneState.STARTING


def _since(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else round(end - start, 3)


def _tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except FileNotFoundError:
        return ""
    return " | ".join(text[-lines:])
