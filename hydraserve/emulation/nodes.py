"""An emulated cluster as the embedded backend's nodes (``hydraserve up --emulated-nodes``).

Each network-namespace node (:mod:`hydraserve.emulation.netns`) becomes a
:class:`~hydraserve.backends.local.LocalNode`: its address, its shared-memory directory,
its link rate (what the planner divides a stage's bytes by), its prefetcher, the command
prefix that runs a worker inside it, and its share of this machine's cores and memory.
The planner then chooses pp and nodes itself, as on a cluster.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from hydraserve.backends.local.nodes import LocalNode
from hydraserve.emulation.netns import EmulatedCluster


def node_cores(cores: Sequence[int], nodes: int) -> list[tuple[int, ...]]:
    """Disjoint groups of ``cores`` per node when there are enough; otherwise nodes share
    cores round-robin (one core each)."""
    ordered = sorted(cores)
    if len(ordered) >= nodes:
        size = len(ordered) // nodes
        return [tuple(ordered[i * size : (i + 1) * size]) for i in range(nodes)]
    return [(ordered[i % len(ordered)],) for i in range(nodes)]


def emulated_local_nodes(
    cluster: EmulatedCluster, memory_bytes: int, cores: Sequence[int] | None = None
) -> list[LocalNode]:
    """The cluster's nodes for the local backend, splitting ``memory_bytes`` and the cores
    this process may use between them."""
    available = cores if cores is not None else sorted(os.sched_getaffinity(0))
    groups = node_cores(available, len(cluster.node_list))
    per_node = memory_bytes // max(1, len(cluster.node_list))
    credentials = {
        key: os.environ.get(key, "testing")
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    }
    return [
        LocalNode(
            name=node.name,
            host=node.ip,
            shm_dir=node.shm_dir,
            memory_bytes=per_node,
            nic_bytes_per_s=cluster.rate_mbit * 1e6 / 8,
            cpus=group,
            prefetcher_url=node.prefetcher_url,
            exec_prefix=("ip", "netns", "exec", node.ns),
            env={
                "VLLM_HOST_IP": node.ip,
                "GLOO_SOCKET_IFNAME": node.iface,
                "HYDRASERVE_S3__ENDPOINT_URL": cluster.s3_endpoint,
                **credentials,
            },
        )
        for node, group in zip(cluster.node_list, groups, strict=True)
    ]
