"""Inputs and outputs of the planner (the contract its callers build against).

Units: bytes, bytes per second and seconds throughout. The planner's implementation may
add fields (with defaults); callers rely on the ones here.
"""

from __future__ import annotations

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


@dataclass(frozen=True)
class SLO:
    ttft_s: float
    tpot_s: float


@dataclass(frozen=True)
class PlanRequest:
    model: ModelProfile
    slo: SLO
    max_pp: int = 4


@dataclass(frozen=True)
class StagePlacement:
    rank: int
    node: str
    gpu: int
    start_layer: int
    end_layer: int  # exclusive
    memory_bytes: int  # GPU memory reserved for this worker
    all_card: bool  # holds a whole replica's memory, so it can consolidate later
    fetch_bytes: int  # bytes this stage pulls over the node's NIC (0 when cached)
    from_cache: bool = False


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


@dataclass(frozen=True)
class Unschedulable:
    reason: str  # says what is missing (memory, bandwidth) and where
