"""The embedded backend: model instances as local worker processes.

Same planner and data plane as the cluster, minus Kubernetes: ``scale()`` records the
desired replica count, a reconcile loop turns the difference into start/stop actions
(:func:`plan_instances`), and a monitor moves instances Starting → Ready (``/health``
answers) or Failed (a stage process exited), collecting the cold-start timeline.
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
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from pydantic import Field
from pydantic_settings import BaseSettings

from hydraserve.api.models import ServerlessModel, StageTiming
from hydraserve.cluster.base import ClusterBackend, InstancePhase, InstanceView, ModelView
from hydraserve.cluster.reconcile import plan_instances
from hydraserve.controller import plan
from hydraserve.controller.profile import (
    model_key,
    plan_request_for,
    profile_from_manifest,
    replica_bytes,
)
from hydraserve.controller.types import ClusterState, GPUState, NodeState, Plan, Unschedulable
from hydraserve.logs import get_logger
from hydraserve.prefetcher.shm import FetchState, ModelShm, fetch_name
from hydraserve.settings import CommonSettings, component_config
from hydraserve.store import Manifest, ModelRef, ModelStore, StoreError
from hydraserve.worker.config import StageAddress, WorkerConfig
from hydraserve.worker.timeline import Timeline, read_timeline, stage_timings

log = get_logger("cluster.local")


class LocalSettings(BaseSettings):
    model_config = component_config("local")
    common: CommonSettings = Field(default_factory=CommonSettings)
    worker_host: str = "127.0.0.1"
    vllm_cache_root: Path | None = Field(
        default=None, description="vLLM compile cache; default <state_dir>/vllm-cache."
    )
    enforce_eager: bool = True
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
    kv_cache_bytes: int = 256 << 20
    max_model_len: int = 1024
    cpu_binds: list[str] = Field(
        default_factory=list,
        description="VLLM_CPU_OMP_THREADS_BIND per stage, round-robin (empty: vLLM's auto).",
    )
    prefetcher_url: str | None = None
    extra_engine_args: list[str] = Field(default_factory=list)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class _Stage:
    rank: int
    process: subprocess.Popen[bytes]
    log_path: Path


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

    def view(self, host: str) -> InstanceView:
        return InstanceView(
            name=self.name,
            model=self.model,
            pp=self.pp,
            phase=self.phase,
            endpoint=f"http://{host}:{self.port}" if self.phase == InstancePhase.READY else None,
            started_at=self.started_at,
            ready_at=self.ready_at,
            error=self.error,
            cold_start=self.cold_start,
        )


@dataclass
class _ModelState:
    model: ServerlessModel
    desired: int = 0
    instances: dict[str, _Instance] = field(default_factory=dict)
    error: str | None = None
    consecutive_failures: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    manifest: Manifest | None = None


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
                await asyncio.to_thread(self._terminate, inst)
        await self._http.aclose()

    # -- views and notifications -----------------------------------------------------------

    def _view(self, state: _ModelState) -> ModelView:
        return ModelView(
            model=state.model,
            desired_replicas=state.desired,
            instances=tuple(i.view(self.settings.worker_host) for i in state.instances.values()),
            error=state.error,
        )

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
                except Exception as exc:  # keep serving other models
                    log.exception("reconcile.error", model=state.model.name, error=str(exc))
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.poll_seconds)

    async def _reconcile(self, state: _ModelState) -> None:
        if state.error:
            return
        views = [i.view(self.settings.worker_host) for i in state.instances.values()]
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

    async def _start_instance(self, state: _ModelState) -> None:
        model = state.model
        requested = time.time()
        try:
            if state.manifest is None:
                store = ModelStore(
                    ModelRef(model.spec.source.uri, model.spec.source.revision),
                    self.settings.common.s3,
                )
                state.manifest = await asyncio.to_thread(store.manifest)
        except StoreError as exc:
            state.error = str(exc)
            log.error("instance.store_error", model=model.name, error=str(exc))
            return
        manifest = state.manifest
        planned = self._plan(state, manifest)
        if isinstance(planned, Unschedulable):
            state.error = f"cannot place {model.name} on this machine: {planned.reason}"
            log.error("instance.unschedulable", model=model.name, reason=planned.reason)
            return
        pp = planned.pp
        if self.settings.pipeline_size is not None:
            pp = min(self.settings.pipeline_size, model.spec.pipeline.max_size, manifest.num_layers)
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
        )
        timeline = Timeline(inst_dir / "timeline.jsonl", model=model.name, instance=name)
        timeline.record("placement", requested, time.time(), pp=pp)
        master_port = free_port(self.settings.worker_host)
        for rank in range(pp):
            config = WorkerConfig(
                model_name=model.name,
                uri=model.spec.source.uri,
                revision=model.spec.source.revision,
                instance=name,
                pp=pp,
                rank=rank,
                host=self.settings.worker_host,
                port=inst.port,
                rendezvous=StageAddress(
                    master_addr=self.settings.worker_host, master_port=master_port
                ),
                prefetcher_url=self.settings.prefetcher_url,
                shm_dir=self.settings.common.shm_dir,
                timeline=inst_dir / "timeline.jsonl",
                enforce_eager=self.settings.enforce_eager,
                max_model_len=self.settings.max_model_len,
                kv_cache_bytes=self.settings.kv_cache_bytes,
                engine_args=[*self.settings.extra_engine_args, *model.spec.engine.args],
            )
            inst.stages.append(self._spawn(inst, config, rank))
        state.instances[name] = inst
        log.info("instance.starting", model=model.name, instance=name, pp=pp, port=inst.port)

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
            name="local",
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

    def _spawn(self, inst: _Instance, config: WorkerConfig, rank: int) -> _Stage:
        config_path = inst.dir / f"stage{rank}.json"
        config_path.write_text(config.model_dump_json())
        env = dict(os.environ)
        env.setdefault("VLLM_HOST_IP", self.settings.worker_host)
        env["VLLM_CACHE_ROOT"] = str(
            self.settings.vllm_cache_root or self.settings.common.state_dir / "vllm-cache"
        )
        if self.settings.cpu_binds:
            env["VLLM_CPU_OMP_THREADS_BIND"] = self.settings.cpu_binds[
                rank % len(self.settings.cpu_binds)
            ]
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
            if inst.phase == InstancePhase.STARTING:
                if time.time() - inst.started_at > self.settings.startup_timeout_seconds:
                    self._fail(
                        state, inst, f"not ready after {self.settings.startup_timeout_seconds:.0f}s"
                    )
                    continue
                verified, fetch_error = self._fetch_outcome(state, inst)
                if fetch_error is not None:
                    self._fail(state, inst, fetch_error)
                    continue
                if verified and await self._healthy(inst):
                    inst.phase = InstancePhase.READY
                    inst.ready_at = time.time()
                    events = read_timeline(inst.dir / "timeline.jsonl")
                    inst.cold_start = tuple(stage_timings(events, inst.started_at))
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

    def _terminate(self, inst: _Instance) -> None:
        """Stop every process of an instance (each stage runs in its own session)."""
        for stage in inst.stages:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(stage.process.pid, signal.SIGTERM)
        deadline = time.time() + self.settings.stop_grace_seconds
        for stage in inst.stages:
            with contextlib.suppress(subprocess.TimeoutExpired):
                stage.process.wait(max(0.0, deadline - time.time()))
            with contextlib.suppress(ProcessLookupError):
                os.killpg(stage.process.pid, signal.SIGKILL)
            stage.process.wait()


def _tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except FileNotFoundError:
        return ""
    return " | ".join(text[-lines:])
