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


def node_cores(cores: Sequence[int], nodes: int, at_least: int = 1) -> list[tuple[int, ...]]:
    """Disjoint groups of ``cores`` per node when each can get ``at_least`` of them;
    otherwise nodes share cores round-robin, ``at_least`` each (as many as there are).

    ``at_least`` is the widest tensor parallelism of the models served: on CPU a node's
    "devices" for a stage's tensor ranks are its cores (one OpenMP bind per rank), so a
    tp 2 stage needs a node of two cores even on a two-core machine."""
    ordered = sorted(cores)
    if not ordered:
        raise ValueError("no cores to give the emulated nodes")
    if len(ordered) >= nodes * at_least:
        size = len(ordered) // nodes
        return [tuple(ordered[i * size : (i + 1) * size]) for i in range(nodes)]
    width = min(at_least, len(ordered))
    return [
        tuple(sorted({ordered[(i * width + j) % len(ordered)] for j in range(width)}))
        for i in range(nodes)
    ]


def emulated_local_nodes(
    cluster: EmulatedCluster,
    memory_bytes: int,
    cores: Sequence[int] | None = None,
    cores_per_node: int = 1,
) -> list[LocalNode]:
    """The cluster's nodes for the local backend, splitting ``memory_bytes`` and the cores
    this process may use between them (at least ``cores_per_node`` each: shared when there
    are too few)."""
    available = cores if cores is not None else sorted(os.sched_getaffinity(0))
    groups = node_cores(available, len(cluster.node_list), cores_per_node)
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
