"""The nodes the embedded backend places instances on, as the planner sees them.

By default that is this machine alone (one node, its "GPU" the memory budget). An
emulated cluster (``hydraserve.emulation``) describes several nodes, each with its own
address, shared memory, cores, link rate and prefetcher; workers then run inside them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from hydraserve.planner.profile import weights_key
from hydraserve.planner.types import ClusterState, GPUState, InflightFetch, NodeState
from hydraserve.prefetcher.node import NodeStatus
from hydraserve.prefetcher.shm import FetchState


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


def node_state(
    node: LocalNode,
    used_bytes: int,
    status: NodeStatus | None,
    now: float,
    deadlines: Mapping[tuple[str, str, str], tuple[float, bool]] | None = None,
) -> NodeState:
    """One node for the planner: free memory, its link, the whole models its prefetcher
    holds (a cache hit) and the fetches in flight on its link (``deadlines``: (uri,
    revision, fetch) -> (deadline epoch, low priority) of the fetches this backend asked
    for; others count as due now)."""
    cached: set[str] = set()
    inflight: list[InflightFetch] = []
    for holding in status.models if status is not None else ():
        if holding.complete:
            cached.add(weights_key(holding.uri, holding.revision))
        for name, fetch in holding.fetches.items():
            if fetch.state not in (FetchState.PENDING, FetchState.FETCHING):
                continue
            left = max(0, fetch.total - fetch.verified)
            if not left:
                continue
            deadline, low = (deadlines or {}).get(
                (holding.uri, holding.revision, name), (now, False)
            )
            inflight.append(
                InflightFetch(
                    bytes_left=left, deadline_s=max(0.0, deadline - now), low_priority=low
                )
            )
    return NodeState(
        name=node.name,
        gpus=(
            GPUState(
                index=0,
                total_bytes=node.memory_bytes,
                free_bytes=max(0, node.memory_bytes - used_bytes),
            ),
        ),
        nic_bytes_per_s=node.nic_bytes_per_s,
        cached_models=frozenset(cached),
        inflight=tuple(inflight),
    )


def cluster_view(
    nodes: Iterable[LocalNode],
    used: Mapping[str, int],
    statuses: Mapping[str, NodeStatus | None],
    now: float,
    store_bytes_per_s: float | None,
    deadlines: Mapping[tuple[str, str, str], tuple[float, bool]] | None = None,
) -> ClusterState:
    return ClusterState(
        nodes=tuple(
            node_state(n, used.get(n.name, 0), statuses.get(n.name), now, deadlines) for n in nodes
        ),
        store_bytes_per_s=store_bytes_per_s,
    )
