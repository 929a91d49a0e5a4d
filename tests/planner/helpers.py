"""Small hand-checkable models and clusters for the planner's tests."""

from __future__ import annotations

from collections.abc import Iterable

from hydraserve.planner import (
    ClusterState,
    GPUState,
    InflightFetch,
    ModelProfile,
    NodeState,
    PlannerConfig,
)

GB = 10**9


def model(
    key: str = "m",
    *,
    tpot_s: float = 0.05,
    prefill_s: float = 0.5,
    replica_gb: int = 10,
) -> ModelProfile:
    """8 layers of 1 GB (8 GB of weights), replica 10 GB: KV 2 GB. Even partitions."""
    return ModelProfile(
        key=key,
        total_bytes=8 * GB,
        replica_bytes=replica_gb * GB,
        partitions={
            1: ((0, 8, 8 * GB),),
            2: ((0, 4, 4 * GB), (4, 8, 4 * GB)),
            4: ((0, 2, 2 * GB), (2, 4, 2 * GB), (4, 6, 2 * GB), (6, 8, 2 * GB)),
        },
        prefill_s={"gpu": prefill_s},
        tpot_s={"gpu": tpot_s},
    )


def node(
    name: str,
    free_gb: Iterable[float] = (16,),
    *,
    total_gb: float = 16,
    nic: float = 1 * GB,
    cached: Iterable[str] = (),
    inflight: Iterable[InflightFetch] = (),
    gpu_type: str = "gpu",
) -> NodeState:
    gpus = tuple(GPUState(i, int(total_gb * GB), int(free * GB)) for i, free in enumerate(free_gb))
    return NodeState(name, gpus, nic, gpu_type, frozenset(cached), tuple(inflight))


def cluster(*nodes: NodeState, store: float | None = None) -> ClusterState:
    return ClusterState(tuple(nodes), store)


# Round numbers: floor 2 s, post-fetch 1 s, no hop cost.
CONFIG = PlannerConfig(engine_ready_floor_s=2.0, post_fetch_s=1.0, stage_hop_s=0.0)
