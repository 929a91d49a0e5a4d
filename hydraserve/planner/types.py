"""Inputs and outputs of the planner (the contract its callers build against).

Units: bytes, bytes per second and seconds throughout. The planner's implementation may
add fields (with defaults); callers rely on the ones here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class GPUState:
    index: int
    total_bytes: int
    free_bytes: int


@dataclass(frozen=True)
class InflightFetch:
    """A fetch already using a node's NIC."""

    bytes_left: int
    deadline_s: float  # seconds from now by which it must finish
    low_priority: bool = False  # consolidation fetches yield to cold starts


@dataclass(frozen=True)
class NodeState:
    name: str
    gpus: tuple[GPUState, ...]
    nic_bytes_per_s: float
    gpu_type: str = "generic"
    cached_models: frozenset[str] = frozenset()  # model keys in the prefetcher's host cache
    inflight: tuple[InflightFetch, ...] = ()


@dataclass(frozen=True)
class ClusterState:
    nodes: tuple[NodeState, ...]
    store_bytes_per_s: float | None = None  # aggregate store bandwidth, None = unlimited


@dataclass(frozen=True)
class ModelProfile:
    """What the planner knows about a model: sizes from its manifest, speeds if profiled."""

    key: str  # identity for cache lookups ("<uri>@<revision>")
    total_bytes: int  # weights
    replica_bytes: int  # GPU memory of one full replica (weights + KV), from the spec
    # pp -> per-stage (start_layer, end_layer, weight bytes), from the store's partitions
    partitions: dict[int, tuple[tuple[int, int, int], ...]]
    prefill_s: dict[str, float] = field(default_factory=dict)  # gpu_type -> seconds
    tpot_s: dict[str, float] = field(default_factory=dict)  # gpu_type -> seconds per token

    @property
    def kv_bytes(self) -> int:
        """GPU memory of one replica beyond its weights (KV cache, activations)."""
        return max(0, self.replica_bytes - self.total_bytes)

    @property
    def num_layers(self) -> int:
        return max((stages[-1][1] for stages in self.partitions.values() if stages), default=0)


@dataclass(frozen=True)
class SLO:
    ttft_s: float
    tpot_s: float


@dataclass(frozen=True)
class PlanRequest:
    model: ModelProfile
    slo: SLO
    max_pp: int = 4
    # How long the oldest queued request this cold start can still serve in time has
    # already waited (see ``costmodel.salvageable_wait_s``); it counts toward that request's
    # TTFT, so it shrinks the budget left for fetching.
    waited_s: float = 0.0
    # All-card workers wanted: each becomes a standalone instance after consolidation.
    min_all_card: int = 1
    # When admission (a busy NIC or store) is what rules out every plan meeting the SLOs,
    # answer Unschedulable (retry when fetches finish) instead of a slow pp = 1 fallback.
    defer_when_busy: bool = False
    # Tensor parallelism: each stage (worker) runs on ``tp`` GPUs of one node, each holding
    # 1/tp of the stage's memory (spec.parallelism.tensor). Pipeline stages still go to
    # distinct nodes.
    tp: int = 1


@dataclass(frozen=True)
class StagePlacement:
    rank: int
    node: str
    gpu: int  # the first of its GPUs (the only one when tp = 1)
    start_layer: int
    end_layer: int  # exclusive
    memory_bytes: int  # GPU memory reserved for this worker
    all_card: bool  # holds a whole replica's memory, so it can consolidate later
    fetch_bytes: int  # bytes this stage pulls over the node's NIC (0 when cached)
    from_cache: bool = False
    # Predicted rate of this stage's fetch (its fair share of the NIC, capped by its share
    # of the store); for a cached stage, the host-memory load rate.
    fetch_bytes_per_s: float = 0.0
    # Seconds from now by which this fetch must finish for the plan's prediction to hold;
    # callers report it back as ``InflightFetch.deadline_s`` while the fetch runs.
    fetch_deadline_s: float = float("inf")
    # Bytes an all-card worker still fetches in the background to consolidate (low priority).
    consolidation_bytes: int = 0
    gpu_type: str = "generic"  # its node's GPU type (calibration is per type)
    # The GPUs of its node this worker runs on, one per tensor-parallel rank; empty means
    # ``(gpu,)``. ``memory_bytes`` is the worker's total: each GPU holds an equal share.
    gpus: tuple[int, ...] = ()

    @property
    def devices(self) -> tuple[int, ...]:
        return self.gpus or (self.gpu,)

    @property
    def tp(self) -> int:
        return len(self.devices)

    @property
    def memory_per_gpu_bytes(self) -> int:
        return per_device_bytes(self.memory_bytes, self.tp)


@dataclass(frozen=True)
class Prediction:
    ttft_s: float
    tpot_s: float
    terms: dict[str, float] = field(default_factory=dict)  # named parts of the estimate


@dataclass(frozen=True)
class Plan:
    pp: int
    stages: tuple[StagePlacement, ...]
    prediction: Prediction
    reason: str = ""  # why this pp (e.g. "smallest pp meeting both SLOs")
    meets_slo: bool = True  # False for a fallback plan whose prediction misses an SLO
    tp: int = 1  # GPUs per stage, all on the stage's node
    # Why the plan has no all-card worker (so the pipeline cannot consolidate); "" when it
    # has one.
    no_consolidation: str = ""

    @property
    def all_card(self) -> int:
        """Number of all-card workers (standalone instances after consolidation)."""
        return sum(1 for s in self.stages if s.all_card)

    @property
    def memory_bytes(self) -> int:
        return sum(s.memory_bytes for s in self.stages)


@dataclass(frozen=True)
class Unschedulable:
    reason: str  # says what is missing (memory, bandwidth) and where


def per_device_bytes(total_bytes: int, tp: int) -> int:
    """What each of a worker's ``tp`` GPUs holds of its ``total_bytes`` (rounded up)."""
    return math.ceil(total_bytes / max(1, tp))
