"""The nodes the embedded backend places instances on, as the planner sees them.

By default that is this machine alone (one node, its "GPU" the memory budget). An
emulated cluster (``hydraserve.emulation``) describes several nodes, each with its own
address, shared memory, cores, link rate and prefetcher; workers then run inside them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from hydraserve.control.nodes import cached_models, inflight_fetches
from hydraserve.planner.types import ClusterState, GPUState, NodeState
from hydraserve.prefetcher.node import NodeStatus


@dataclass(frozen=True)
class LocalNode:
    name: str
    host: str  # the address its workers bind and are reached at
    shm_dir: Path  # its shared memory (emulated nodes share /dev/shm: one dir each)
    memory_bytes: int  # memory the planner may give instances here (its "GPU")
    nic_bytes_per_s: float  # its link to the store
    cpus: tuple[int, ...] = ()  # cores its workers run on (empty: any)
    prefetcher_url: str | None = None  # None: the backend's in-process prefetcher
    exec_prefix: tuple[str, ...] = ()  # runs a command inside the node (netns)
    env: Mapping[str, str] = field(default_factory=dict)  # e.g. GLOO_SOCKET_IFNAME


def default_memory_budget() -> int:
    """Memory the planner may give instances on this machine by default: 80 % of what is
    available now."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(int(line.split()[1]) * 1024 * 0.8)
    return 0


def node_state(
    node: LocalNode, used_bytes: int, status: NodeStatus | None, now: float, devices: int = 1
) -> NodeState:
    """One node for the planner: free memory, its link, and what its prefetcher reports
    (host cache, fetches in flight with their deadlines), as the operator reads it too.

    A node's memory is one pool its workers' ranks share; for a model whose workers have
    ``devices`` tensor-parallel ranks it is shown as that many equal devices, so a worker
    fits exactly when its memory fits the pool."""
    free = max(0, node.memory_bytes - used_bytes)
    return NodeState(
        name=node.name,
        gpus=tuple(
            GPUState(
                index=index,
                total_bytes=node.memory_bytes // devices,
                free_bytes=free // devices,
            )
            for index in range(devices)
        ),
        nic_bytes_per_s=node.nic_bytes_per_s,
        cached_models=cached_models(status),
        inflight=inflight_fetches(status, now),
    )


def cluster_view(
    nodes: Iterable[LocalNode],
    used: Mapping[str, int],
    statuses: Mapping[str, NodeStatus | None],
    now: float,
    store_bytes_per_s: float | None,
    devices: int = 1,
) -> ClusterState:
    return ClusterState(
        nodes=tuple(
            node_state(n, used.get(n.name, 0), statuses.get(n.name), now, devices) for n in nodes
        ),
        store_bytes_per_s=store_bytes_per_s,
    )
