"""Discrete-event cluster simulator: requests, cold starts, fetches, consolidation.

Every cold start is planned by the real :func:`hydraserve.planner.plan` on the
simulated cluster's state (free GPU memory, NIC fetches in flight with their deadlines,
host caches). What the simulator adds is time: fetches move bytes under max-min fair
sharing of NICs and the store (:mod:`hydraserve.sim.network`), so contention the planner
did not foresee shows up as late cold starts.

A stage is ready at ``max(t0 + engine_ready_floor, fetch end) + serial load + post_fetch``
(the cost model's timeline with the simulated fetch end), an instance when its last stage
is; inference speed comes from the same cost model (per-GPU-type profiles, compute share
following memory) with decode slowing as the batch grows.
"""

from __future__ import annotations

import heapq
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from hydraserve.logs import get_logger
from hydraserve.planner import (
    ClusterState,
    GPUState,
    NodeState,
    Plan,
    PlanRequest,
    Unschedulable,
    plan,
)
from hydraserve.planner.costmodel import (
    StageShape,
    pipeline_slowdown,
    predict_tpot_s,
    salvageable_wait_s,
)
from hydraserve.planner.types import per_device_bytes
from hydraserve.sim.cluster import ClusterSpec
from hydraserve.sim.network import Flow, FlowNetwork
from hydraserve.sim.policies import Policy
from hydraserve.sim.workload import Arrival, ModelSpec, Workload

# Prefill speed for a GPU type a model has no profile for (a 7B model on a V100).
DEFAULT_PREFILL_S_PER_TOKEN = 2e-4


@dataclass(frozen=True)
class SimConfig:
    keep_alive_s: float = 30.0  # idle time before an instance is removed (scale to zero)
    max_batch: int = 8  # requests one instance runs at once (the artifact's batch size)
    max_instances_per_model: int = 16
    batch_tpot_growth: float = 0.02  # TPOT grows by this fraction per extra running request
    consolidation_switch_s: float = 0.5  # handover to the standalone worker (KV migration)
    # "implemented": HydraServe's consolidation as built (control/consolidation.py,
    # decision 0402): once the pipeline is Ready, its all-card node fetches the rest of the
    # model at low priority while a new standalone engine starts there (taking the
    # engine-ready floor, or standalone_start_s); when both are done the standalone takes
    # over the running requests and the whole pipeline is released (one standalone per
    # pipeline). "paper": the paper's in-place takeover (each all-card worker fetches the
    # rest as soon as its own stage landed and takes over with no engine start; every
    # all-card worker becomes a standalone instance).
    consolidation_model: Literal["implemented", "paper"] = "implemented"
    standalone_start_s: float | None = None  # None: the policy's engine-ready floor
    drain_s: float = 1800.0  # simulated time after the trace for queued requests to finish
    retry_interval_s: float = 1.0  # re-plan blocked cold starts at least this often
    defer_when_busy: bool = True  # wait for the network rather than start a doomed pp = 1


@dataclass(slots=True, eq=False)
class _Node:
    index: int
    name: str
    gpu_type: str
    nic_bytes_per_s: float
    gpu_total: list[int]
    gpu_free: list[int]
    cache_capacity: int
    cache: OrderedDict[str, int] = field(default_factory=OrderedDict)
    cache_used: int = 0
    ssd_capacity: int = 0  # a second, slower tier (ServerlessLLM's local SSD)
    ssd: OrderedDict[str, int] = field(default_factory=OrderedDict)
    ssd_used: int = 0
    state: NodeState | None = None  # planner view, rebuilt when stale

    def touch(self, key: str) -> None:
        if key in self.cache:
            self.cache.move_to_end(key)
        if key in self.ssd:
            self.ssd.move_to_end(key)

    def cached(self) -> frozenset[str]:
        return frozenset(self.cache) | frozenset(self.ssd)

    def cache_insert(self, key: str, nbytes: int) -> None:
        """Keep a whole model in host memory and, with an SSD tier, write it through."""
        if self.ssd_capacity:
            self.ssd_used = _lru_insert(self.ssd, self.ssd_used, self.ssd_capacity, key, nbytes)
        self.cache_used = _lru_insert(self.cache, self.cache_used, self.cache_capacity, key, nbytes)
        self.state = None


def _lru_insert(lru: OrderedDict[str, int], used: int, capacity: int, key: str, nbytes: int) -> int:
    """Insert ``key`` (or refresh it), evicting the least recently used; returns the new
    bytes used."""
    if key in lru:
        lru.move_to_end(key)
        return used
    if nbytes > capacity:
        return used
    while used + nbytes > capacity:
        _, evicted = lru.popitem(last=False)
        used -= evicted
    lru[key] = nbytes
    return used + nbytes


@dataclass(slots=True, eq=False)
class _Stage:
    rank: int
    node: _Node
    gpus: tuple[int, ...]  # one per tensor-parallel rank, each holding memory / len(gpus)
    memory: int
    all_card: bool
    layers: int
    stage_bytes: int
    fetch_bytes: int
    from_cache: bool
    deadline: float
    consolidation_bytes: int
    reserved_at: float
    flow: Flow | None = None
    fetch_done_at: float | None = None
    consolidation_flow: Flow | None = None
    full: bool = False  # holds the whole model (consolidation fetch done, or pp = 1)
    released: bool = False
    ssd_only: bool = False  # a cache hit on the SSD tier only (loads at its rate)


@dataclass(slots=True, eq=False)
class _Request:
    arrival: Arrival
    spec: ModelSpec
    queued: bool = False  # had to wait for a cold start (or a free slot)
    instance: _Instance | None = None
    first_token_at: float = math.inf
    finish_at: float = math.inf
    tokens_left: float = 0.0
    last_update: float = 0.0
    rate: float = 0.0  # seconds per token now
    version: int = 0

    @property
    def ttft(self) -> float:
        return self.first_token_at - self.arrival.time

    @property
    def tpot(self) -> float:
        if self.finish_at == math.inf:
            return math.inf
        decoded = self.arrival.output_tokens - 1
        return (self.finish_at - self.first_token_at) / decoded if decoded > 0 else 0.0


@dataclass(slots=True, eq=False)
class _Instance:
    id: int
    runtime: _ModelRuntime
    stages: list[_Stage]
    started_at: float
    plan: Plan | None
    phase: str = "starting"  # starting | ready | gone
    ready_at: float = math.inf
    active: dict[_Request, None] = field(default_factory=dict)
    tpot_s: float = 0.0
    prefill_per_token_s: float = 0.0
    idle_version: int = 0
    consolidated: bool = False
    switch_scheduled: bool = False
    standalone_started_at: float | None = None  # implemented consolidation: engine start
    standalone_warm: bool = False

    @property
    def pp(self) -> int:
        return len(self.stages)


@dataclass(slots=True, eq=False)
class _ModelRuntime:
    spec: ModelSpec
    queue: deque[_Request] = field(default_factory=deque)
    instances: list[_Instance] = field(default_factory=list)
    cost_gb_s: float = 0.0


@dataclass(frozen=True)
class ColdStart:
    model: str
    started_at: float
    ready_s: float
    pp: int
    all_card: int
    from_cache: bool
    predicted_ttft_s: float
    meets_slo: bool
    tp: int = 1


@dataclass(frozen=True)
class RequestRecord:
    model: str
    app: str
    size: str
    arrival: float
    ttft_s: float
    tpot_s: float
    ttft_slo_s: float
    tpot_slo_s: float
    queued: bool


@dataclass
class SimResult:
    policy: str
    cluster: str
    requests: list[RequestRecord]
    cold_starts: list[ColdStart]
    cost_gb_s: float
    unschedulable: int
    plan_calls: int
    plan_seconds: float
    wall_seconds: float
    store_bytes: float

    @property
    def ttft_attainment(self) -> float:
        ok = sum(1 for r in self.requests if r.ttft_s <= r.ttft_slo_s)
        return ok / len(self.requests) if self.requests else 1.0

    @property
    def tpot_attainment(self) -> float:
        ok = sum(1 for r in self.requests if r.tpot_s <= r.tpot_slo_s)
        return ok / len(self.requests) if self.requests else 1.0

    @property
    def cost_per_request_gb_s(self) -> float:
        return self.cost_gb_s / len(self.requests) if self.requests else 0.0

    def attainment_by(self, attr: str) -> dict[str, float]:
        groups: dict[str, list[RequestRecord]] = {}
        for r in self.requests:
            groups.setdefault(str(getattr(r, attr)), []).append(r)
        return {
            k: sum(1 for r in v if r.ttft_s <= r.ttft_slo_s) / len(v)
            for k, v in sorted(groups.items())
        }

    def summary(self) -> dict[str, Any]:
        cold = self.cold_starts
        pp_hist: dict[str, int] = {}
        shapes: dict[str, int] = {}  # "pp x tp" -> cold starts
        for c in cold:
            pp_hist[str(c.pp)] = pp_hist.get(str(c.pp), 0) + 1
            shape = f"{c.pp}x{c.tp}"
            shapes[shape] = shapes.get(shape, 0) + 1
        return {
            "policy": self.policy,
            "requests": len(self.requests),
            "ttft_attainment": self.ttft_attainment,
            "tpot_attainment": self.tpot_attainment,
            "cost_gb_s_per_request": self.cost_per_request_gb_s,
            "cold_starts": len(cold),
            "cold_start_mean_s": sum(c.ready_s for c in cold) / len(cold) if cold else 0.0,
            "cold_starts_from_cache": sum(1 for c in cold if c.from_cache),
            "fallback_plans": sum(1 for c in cold if not c.meets_slo),
            "pp_histogram": pp_hist,
            "pp_x_tp_histogram": dict(sorted(shapes.items())),
            "no_consolidation_target": sum(1 for c in cold if c.pp > 1 and not c.all_card),
            "unschedulable": self.unschedulable,
            "queued_requests": sum(1 for r in self.requests if r.queued),
            "ttft_attainment_by_app": self.attainment_by("app"),
            "ttft_attainment_by_size": self.attainment_by("size"),
            "plan_calls": self.plan_calls,
            "plan_ms_mean": 1e3 * self.plan_seconds / self.plan_calls if self.plan_calls else 0,
            "store_gb": self.store_bytes / 1e9,
            "wall_seconds": self.wall_seconds,
        }


class Simulator:
    """One policy on one cluster replaying one workload."""

    def __init__(
        self,
        policy: Policy,
        cluster: ClusterSpec,
        workload: Workload,
        config: SimConfig | None = None,
    ) -> None:
        self.policy = policy
        self.config = config or SimConfig()
        self.cluster_spec = cluster
        self.workload = workload
        self.nodes = [
            _Node(
                i, n.name, n.gpu_type, n.nic_bytes_per_s, [n.gpu_bytes] * n.gpus,
                [n.gpu_bytes] * n.gpus, n.host_cache_bytes if policy.host_cache else 0,
                ssd_capacity=(
                    policy.ssd_tier.capacity_bytes if policy.host_cache and policy.ssd_tier else 0
                ),
            )
            for i, n in enumerate(cluster.nodes)
        ]  # fmt: skip
        self.by_name = {n.name: n for n in self.nodes}
        self.network = FlowNetwork(
            [n.nic_bytes_per_s for n in cluster.nodes], cluster.store_bytes_per_s
        )
        self.models = [_ModelRuntime(spec) for spec in workload.models]
        self.events: list[tuple[float, int, Callable[[float, Any], None], Any]] = []
        self.seq = 0
        self.now = 0.0
        self.requests: list[_Request] = []
        self.cold_starts: list[ColdStart] = []
        self.blocked: dict[int, None] = {}
        self.retry_pending = False
        self.unschedulable = 0
        self.plan_calls = 0
        self.plan_seconds = 0.0
        self.next_instance = 0

    # --- event loop ----------------------------------------------------------------------
    def push(self, at: float, fn: Callable[[float, Any], None], arg: Any = None) -> None:
        self.seq += 1
        heapq.heappush(self.events, (at, self.seq, fn, arg))

    def run(self) -> SimResult:
        started = time.perf_counter()
        for arrival in self.workload.arrivals:
            self.push(arrival.time, self.on_arrival, arrival)
        end = self.workload.duration_s + self.config.drain_s
        while self.events:
            at, _, fn, arg = heapq.heappop(self.events)
            if at > end:
                break
            self.now = at
            fn(at, arg)
        for runtime in self.models:
            for inst in list(runtime.instances):
                self.release_all(inst)
        result = SimResult(
            policy=self.policy.name,
            cluster=self.cluster_spec.name,
            requests=[self.record(r) for r in self.requests],
            cold_starts=self.cold_starts,
            cost_gb_s=sum(m.cost_gb_s for m in self.models),
            unschedulable=self.unschedulable,
            plan_calls=self.plan_calls,
            plan_seconds=self.plan_seconds,
            wall_seconds=time.perf_counter() - started,
            store_bytes=self.network.bytes_moved,
        )
        get_logger("sim").debug(
            "sim.done",
            policy=self.policy.name,
            requests=len(result.requests),
            ttft_attainment=round(result.ttft_attainment, 4),
            cold_starts=len(self.cold_starts),
            wall_s=round(result.wall_seconds, 2),
        )
        return result

    @staticmethod
    def record(r: _Request) -> RequestRecord:
        return RequestRecord(
            model=r.spec.name, app=r.spec.app, size=r.spec.size, arrival=r.arrival.time,
            ttft_s=r.ttft, tpot_s=r.tpot, ttft_slo_s=r.spec.slo.ttft_s,
            tpot_slo_s=r.spec.slo.tpot_s, queued=r.queued,
        )  # fmt: skip

    # --- requests ------------------------------------------------------------------------
    def on_arrival(self, now: float, arrival: Arrival) -> None:
        runtime = self.models[arrival.model]
        request = _Request(arrival, runtime.spec)
        self.requests.append(request)
        instance = self.free_instance(runtime)
        if instance is not None:
            self.start_request(now, instance, request)
            return
        request.queued = True
        runtime.queue.append(request)
        self.autoscale(now, runtime)

    def free_instance(self, runtime: _ModelRuntime) -> _Instance | None:
        best: _Instance | None = None
        for inst in runtime.instances:
            if (
                inst.phase == "ready"
                and len(inst.active) < self.config.max_batch
                and (best is None or len(inst.active) < len(best.active))
            ):
                best = inst
        return best

    def start_request(self, now: float, inst: _Instance, request: _Request) -> None:
        inst.idle_version += 1  # cancels a pending keep-alive expiry
        request.instance = inst
        request.first_token_at = now + request.arrival.prompt_tokens * inst.prefill_per_token_s
        request.last_update = request.first_token_at
        request.tokens_left = max(0, request.arrival.output_tokens - 1)
        inst.active[request] = None
        self.rerate(now, inst)

    def rerate(self, now: float, inst: _Instance) -> None:
        """New decode speed for every running request (batch size or layout changed)."""
        tpot = inst.tpot_s * (1 + self.config.batch_tpot_growth * (len(inst.active) - 1))
        for r in inst.active:
            if now > r.last_update and r.rate > 0:
                r.tokens_left = max(0.0, r.tokens_left - (now - r.last_update) / r.rate)
                r.last_update = now
            r.rate = tpot
            r.version += 1
            self.push(r.last_update + r.tokens_left * tpot, self.on_finish, (r, r.version))

    def on_finish(self, now: float, arg: tuple[_Request, int]) -> None:
        request, version = arg
        if version != request.version or request.finish_at != math.inf:
            return
        request.finish_at = now
        inst = request.instance
        assert inst is not None
        inst.active.pop(request, None)
        self.rerate(now, inst)
        self.serve_queue(now, inst)
        if not inst.active:
            self.start_idle_timer(now, inst)

    def serve_queue(self, now: float, inst: _Instance) -> None:
        queue = inst.runtime.queue
        while queue and inst.phase == "ready" and len(inst.active) < self.config.max_batch:
            self.start_request(now, inst, queue.popleft())

    def start_idle_timer(self, now: float, inst: _Instance) -> None:
        inst.idle_version += 1
        self.push(now + self.config.keep_alive_s, self.on_idle_expiry, (inst, inst.idle_version))

    def on_idle_expiry(self, now: float, arg: tuple[_Instance, int]) -> None:
        inst, version = arg
        if version != inst.idle_version or inst.active or inst.phase != "ready":
            return
        self.release_all(inst)
        self.retry_blocked(now)

    # --- scaling and planning ------------------------------------------------------------
    def autoscale(self, now: float, runtime: _ModelRuntime) -> None:
        """Start cold instances until queued requests fit in the instances starting."""
        starting = sum(1 for i in runtime.instances if i.phase == "starting")
        need = len(runtime.queue) - starting * self.config.max_batch
        while need > 0 and len(runtime.instances) < self.config.max_instances_per_model:
            result = self.plan(now, runtime)
            if isinstance(result, Unschedulable):
                self.unschedulable += 1
                self.blocked[runtime.spec.index] = None
                self.schedule_retry(now)
                return
            self.launch(now, runtime, result)
            need -= self.config.max_batch
        self.blocked.pop(runtime.spec.index, None)

    def plan(self, now: float, runtime: _ModelRuntime) -> Plan | Unschedulable:
        spec = runtime.spec
        waited = salvageable_wait_s(
            [now - r.arrival.time for r in runtime.queue], spec.slo.ttft_s, self.policy.planner
        )
        # Waiting for the network only pays while a queued request can still be served in
        # time; otherwise start now, even if slowly.
        request = PlanRequest(
            spec.profile, spec.slo, max_pp=4, waited_s=waited or 0.0,
            defer_when_busy=self.config.defer_when_busy and waited is not None,
            tp=spec.tp,
        )  # fmt: skip
        state = self.cluster_state(now)
        started = time.perf_counter()
        result = plan(request, state, self.policy.planner)
        self.plan_seconds += time.perf_counter() - started
        self.plan_calls += 1
        return result

    def cluster_state(self, now: float) -> ClusterState:
        self.network.settle(now)
        with_flows = set(self.network.nodes_with_flows())
        states = []
        for node in self.nodes:
            if node.state is None or node.index in with_flows:
                node.state = NodeState(
                    name=node.name,
                    gpus=tuple(
                        GPUState(i, total, free)
                        for i, (total, free) in enumerate(
                            zip(node.gpu_total, node.gpu_free, strict=True)
                        )
                    ),
                    nic_bytes_per_s=node.nic_bytes_per_s,
                    gpu_type=node.gpu_type,
                    cached_models=node.cached(),
                    inflight=self.network.inflight(node.index, now),
                )
            states.append(node.state)
        return ClusterState(tuple(states), self.network.store_bytes_per_s)

    def schedule_retry(self, now: float) -> None:
        if not self.retry_pending:
            self.retry_pending = True
            self.push(now + self.config.retry_interval_s, self.on_retry_tick)

    def on_retry_tick(self, now: float, _: Any) -> None:
        self.retry_pending = False
        self.retry_blocked(now)

    def retry_blocked(self, now: float) -> None:
        for index in list(self.blocked):
            runtime = self.models[index]
            if not runtime.queue:
                self.blocked.pop(index, None)
                continue
            self.autoscale(now, runtime)

    # --- cold starts ---------------------------------------------------------------------
    def launch(self, now: float, runtime: _ModelRuntime, result: Plan) -> None:
        stages = []
        for placement in result.stages:
            node = self.by_name[placement.node]
            share = placement.memory_per_gpu_bytes
            for gpu in placement.devices:
                if node.gpu_free[gpu] < share:
                    raise AssertionError(
                        f"planner over-committed {node.name} GPU {gpu}: "
                        f"{share} > {node.gpu_free[gpu]} free"
                    )
                node.gpu_free[gpu] -= share
            node.state = None
            stage_bytes = runtime.spec.profile.partitions[result.pp][placement.rank][2]
            key = runtime.spec.profile.key
            # A hit only on the SSD tier loads at its rate; it is promoted to memory.
            ssd_only = placement.from_cache and key not in node.cache and key in node.ssd
            if placement.from_cache:
                node.touch(key)
                if ssd_only:
                    node.cache_insert(key, runtime.spec.profile.total_bytes)
            consolidation = placement.consolidation_bytes if self.policy.consolidate else 0
            stages.append(
                _Stage(
                    rank=placement.rank,
                    node=node,
                    gpus=placement.devices,
                    memory=placement.memory_bytes,
                    all_card=placement.all_card,
                    layers=placement.end_layer - placement.start_layer,
                    stage_bytes=stage_bytes,
                    fetch_bytes=placement.fetch_bytes,
                    from_cache=placement.from_cache,
                    deadline=now + placement.fetch_deadline_s,
                    consolidation_bytes=consolidation,
                    reserved_at=now,
                    ssd_only=ssd_only,
                )
            )
        self.next_instance += 1
        inst = _Instance(self.next_instance, runtime, stages, now, result)
        self.set_speed(inst)
        runtime.instances.append(inst)
        config = self.policy.planner
        for stage in stages:
            if stage.from_cache or stage.fetch_bytes == 0:
                rate = config.cache_load_bytes_per_s
                done = now + (stage.stage_bytes / rate if rate else 0.0)
                tier = self.policy.ssd_tier
                if stage.ssd_only and tier is not None:
                    # Reading from SSD takes the place of reading from memory: the
                    # serial load (ready_time) already charges the memory tier's rate.
                    serial = config.serial_load_bytes_per_s
                    memory_s = stage.stage_bytes / serial if serial else 0.0
                    done = max(done, now + stage.stage_bytes / tier.load_bytes_per_s - memory_s)
                self.push(done, self.on_stage_fetched, (inst, stage))
            elif config.fetch_start_delay_s > 0:
                self.push(now + config.fetch_start_delay_s, self.start_fetch, (inst, stage))
            else:
                self.start_fetch(now, (inst, stage))

    def set_speed(self, inst: _Instance) -> None:
        profile = inst.runtime.spec.profile
        config = self.policy.planner
        shapes = [
            StageShape(
                s.layers,
                profile.replica_bytes if config.exclusive_gpus else s.memory,
                s.node.gpu_type,
                len(s.gpus),
            )
            for s in inst.stages
        ]
        inst.tpot_s = predict_tpot_s(profile, shapes, config)
        per_token = inst.runtime.spec.prefill_s_per_token
        if not config.compute_share_follows_memory:
            shapes = [StageShape(s.layers, profile.replica_bytes, s.gpu_type, s.tp) for s in shapes]
        inst.prefill_per_token_s = pipeline_slowdown(
            profile, shapes, per_token, DEFAULT_PREFILL_S_PER_TOKEN,
            config.tensor_parallel_efficiency,
        )  # fmt: skip

    def start_fetch(self, now: float, arg: tuple[_Instance, _Stage]) -> None:
        inst, stage = arg
        if inst.phase == "gone":
            return
        stage.flow = self.add_flow(
            now, stage.node, stage.fetch_bytes, False, stage.deadline,
            lambda t: self.on_stage_fetched(t, (inst, stage)),
        )  # fmt: skip

    def add_flow(
        self, now: float, node: _Node, nbytes: int, low_priority: bool, deadline: float,
        on_done: Callable[[float], None],
    ) -> Flow:  # fmt: skip
        flow, changed = self.network.add(now, node.index, nbytes, low_priority, deadline, on_done)
        node.state = None
        self.schedule_flows(changed)
        return flow

    def schedule_flows(self, flows: list[Flow]) -> None:
        for flow in flows:
            eta = flow.eta()
            if eta < math.inf:
                self.push(eta, self.on_flow_event, (flow, flow.version))

    def on_flow_event(self, now: float, arg: tuple[Flow, int]) -> None:
        flow, version = arg
        if flow.done or version != flow.version:
            return
        self.finish_flow(now, flow)
        flow.on_done(now)
        self.retry_blocked(now)

    def finish_flow(self, now: float, flow: Flow) -> None:
        self.nodes[flow.node].state = None
        self.schedule_flows(self.network.remove(now, flow))

    def cancel_flow(self, now: float, flow: Flow | None) -> None:
        if flow is not None and not flow.done:
            self.finish_flow(now, flow)

    def on_stage_fetched(self, now: float, arg: tuple[_Instance, _Stage]) -> None:
        inst, stage = arg
        if inst.phase == "gone":
            return
        stage.fetch_done_at = now
        key = inst.runtime.spec.profile.key
        if inst.pp == 1:
            stage.full = True
            if self.policy.host_cache and not stage.from_cache:
                stage.node.cache_insert(key, inst.runtime.spec.profile.total_bytes)
        elif stage.all_card and stage.consolidation_bytes > 0:
            if self.config.consolidation_model == "implemented":
                pass  # fetched once the pipeline is Ready (start_consolidation)
            else:
                self.start_consolidation_fetch(now, inst, stage)
        elif stage.all_card:
            stage.full = True  # from cache: the rest of the model is already local
        if all(s.fetch_done_at is not None for s in inst.stages):
            self.push(self.ready_time(inst), self.on_ready, inst)

    def start_consolidation_fetch(self, now: float, inst: _Instance, stage: _Stage) -> None:
        if stage.consolidation_flow is None and not stage.full:
            stage.consolidation_flow = self.add_flow(
                now, stage.node, stage.consolidation_bytes, True, math.inf,
                lambda t: self.on_consolidation_fetched(t, (inst, stage)),
            )  # fmt: skip

    def ready_time(self, inst: _Instance) -> float:
        config = self.policy.planner
        serial = config.serial_load_bytes_per_s
        ready = inst.started_at
        for stage in inst.stages:
            assert stage.fetch_done_at is not None
            stage_ready = (
                max(inst.started_at + config.engine_ready_floor_s, stage.fetch_done_at)
                + (stage.stage_bytes / len(stage.gpus) / serial if serial else 0.0)
                + config.post_fetch_s
            )
            ready = max(ready, stage_ready)
        return ready

    def on_ready(self, now: float, inst: _Instance) -> None:
        if inst.phase != "starting":
            return
        inst.phase = "ready"
        inst.ready_at = now
        plan_ = inst.plan
        assert plan_ is not None
        self.cold_starts.append(
            ColdStart(
                model=inst.runtime.spec.name, started_at=inst.started_at,
                ready_s=now - inst.started_at, pp=inst.pp, all_card=plan_.all_card,
                from_cache=any(s.from_cache for s in inst.stages),
                predicted_ttft_s=plan_.prediction.ttft_s, meets_slo=plan_.meets_slo,
                tp=plan_.tp,
            )
        )  # fmt: skip
        self.serve_queue(now, inst)
        if not inst.active:
            self.start_idle_timer(now, inst)
        self.start_consolidation(now, inst)
        self.maybe_consolidate(now, inst)

    @staticmethod
    def consolidation_head(inst: _Instance) -> _Stage | None:
        """The all-card stage the implemented consolidation targets (the first one, as
        ``control/placement.py: all_card_stage`` picks); None when there is none."""
        return next((s for s in inst.stages if s.all_card), None)

    def start_consolidation(self, now: float, inst: _Instance) -> None:
        """Implemented consolidation, at the pipeline's Ready: FetchWholeModel (low
        priority) and StartStandalone on the all-card node, at once."""
        if (
            self.config.consolidation_model != "implemented"
            or not self.policy.consolidate
            or inst.pp <= 1
            or inst.standalone_started_at is not None
        ):
            return
        head = self.consolidation_head(inst)
        if head is None:
            return  # nowhere to consolidate (decision 0106)
        if head.consolidation_bytes > 0:
            self.start_consolidation_fetch(now, inst, head)
        else:
            head.full = True
        inst.standalone_started_at = now
        start_s = self.config.standalone_start_s
        if start_s is None:
            start_s = self.policy.planner.floor_for(head.node.gpu_type)
        self.push(now + start_s, self.on_standalone_warm, inst)

    def on_standalone_warm(self, now: float, inst: _Instance) -> None:
        if inst.phase != "ready":
            return
        inst.standalone_warm = True
        self.maybe_consolidate(now, inst)

    def on_consolidation_fetched(self, now: float, arg: tuple[_Instance, _Stage]) -> None:
        inst, stage = arg
        if inst.phase == "gone":
            return
        stage.full = True
        if self.policy.host_cache:
            profile = inst.runtime.spec.profile
            stage.node.cache_insert(profile.key, profile.total_bytes)
        self.maybe_consolidate(now, inst)

    def maybe_consolidate(self, now: float, inst: _Instance) -> None:
        if (
            inst.pp <= 1
            or not self.policy.consolidate
            or inst.phase != "ready"
            or inst.switch_scheduled
        ):
            return
        if self.config.consolidation_model == "implemented":
            # Promote: the standalone is warm and the whole model verified on its node.
            head = self.consolidation_head(inst)
            ready = head is not None and head.full and inst.standalone_warm
        else:
            # A pipeline planned without an all-card stage has nowhere to consolidate.
            ready = any(s.all_card for s in inst.stages) and all(
                s.full for s in inst.stages if s.all_card
            )
        if ready:
            inst.switch_scheduled = True
            self.push(now + self.config.consolidation_switch_s, self.on_switch, inst)

    def on_switch(self, now: float, inst: _Instance) -> None:
        """The head all-card worker takes over; other all-card workers become standalone
        instances; part-card stages are released."""
        if inst.phase != "ready":
            return
        runtime = inst.runtime
        head, *others = [s for s in inst.stages if s.all_card]
        if self.config.consolidation_model == "implemented":
            # One standalone per pipeline; every other stage is released. While the new
            # engine ran beside the pipeline, the head's own stage process still held its
            # share of the replica: charged as extra memory-time (not as GPU memory the
            # planner sees: it planned the all-card reservation for the standalone).
            if inst.standalone_started_at is not None:
                profile = runtime.spec.profile
                share = profile.replica_bytes * head.stage_bytes / profile.total_bytes
                runtime.cost_gb_s += share / 1e9 * (now - inst.standalone_started_at)
            for stage in inst.stages:
                if stage is not head:
                    self.release_stage(now, stage, runtime)
            others = []
        for stage in inst.stages:
            if not stage.all_card:
                self.release_stage(now, stage, runtime)
        inst.stages = [head]
        inst.consolidated = True
        self.set_speed(inst)
        self.rerate(now, inst)
        for stage in others:
            self.next_instance += 1
            standalone = _Instance(
                self.next_instance, runtime, [stage], inst.started_at, inst.plan,
                phase="ready", ready_at=now, consolidated=True,
            )  # fmt: skip
            self.set_speed(standalone)
            runtime.instances.append(standalone)
            self.serve_queue(now, standalone)
            if not standalone.active:
                self.start_idle_timer(now, standalone)
        self.retry_blocked(now)

    # --- releasing -----------------------------------------------------------------------
    def release_stage(self, now: float, stage: _Stage, runtime: _ModelRuntime) -> None:
        """Free a worker's GPU memory (charging it to the model) and stop its fetches."""
        if stage.released:
            return
        stage.released = True
        runtime.cost_gb_s += stage.memory / 1e9 * (now - stage.reserved_at)
        self.cancel_flow(now, stage.flow)
        self.cancel_flow(now, stage.consolidation_flow)
        share = per_device_bytes(stage.memory, len(stage.gpus))
        for gpu in stage.gpus:
            stage.node.gpu_free[gpu] += share
        stage.node.state = None

    def release_all(self, inst: _Instance) -> None:
        now = self.now
        inst.phase = "gone"
        runtime = inst.runtime
        for stage in inst.stages:
            self.release_stage(now, stage, runtime)
        if inst in runtime.instances:
            runtime.instances.remove(inst)


def simulate(
    policy: Policy, cluster: ClusterSpec, workload: Workload, config: SimConfig | None = None
) -> SimResult:
    """Replay ``workload`` on ``cluster`` under ``policy``; deterministic for its inputs."""
    return Simulator(policy, cluster, workload, config).run()
