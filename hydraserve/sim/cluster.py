"""Simulated clusters: GPU servers with NICs and host caches, and a model store."""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9
GBPS = 1e9 / 8  # bytes per second in one gigabit per second


@dataclass(frozen=True)
class NodeSpec:
    name: str
    gpu_type: str
    gpus: int
    gpu_bytes: int
    nic_bytes_per_s: float
    host_cache_bytes: int  # host memory the prefetcher may keep whole models in


@dataclass(frozen=True)
class ClusterSpec:
    name: str
    nodes: tuple[NodeSpec, ...]
    store_bytes_per_s: float | None  # aggregate; None = unlimited

    @property
    def gpus(self) -> int:
        return sum(n.gpus for n in self.nodes)


def paper_testbed(
    a10_servers: int = 4,
    v100_servers: int = 4,
    gpus_per_server: int = 4,
    nic_gbps: float = 16.0,
    store_gbps: float | None = 32.0,
    host_cache_gb: float = 128.0,
) -> ClusterSpec:
    """Like the paper's end-to-end testbed: A10 (24 GB) and V100 (32 GB) servers with
    four GPUs each, 16 Gbps NICs, and a model store serving 32 Gbps in all."""
    nodes = [
        NodeSpec(
            f"a10-{i}", "A10", gpus_per_server, int(24 * GB), nic_gbps * GBPS,
            int(host_cache_gb * GB),
        )
        for i in range(a10_servers)
    ] + [
        NodeSpec(
            f"v100-{i}", "V100", gpus_per_server, int(32 * GB), nic_gbps * GBPS,
            int(host_cache_gb * GB),
        )
        for i in range(v100_servers)
    ]  # fmt: skip
    store = None if store_gbps is None else store_gbps * GBPS
    return ClusterSpec("paper-testbed", tuple(nodes), store)


def large_cluster(
    nodes: int = 1000, gpus_per_node: int = 8, nic_gbps: float = 16.0,
    store_gbps: float | None = 3200.0, host_cache_gb: float = 256.0,
) -> ClusterSpec:  # fmt: skip
    """``nodes`` servers, alternating A10 and V100, for the scale benchmark. The store is
    a distributed object store (3.2 Tbps by default: 100x the testbed's)."""
    specs = tuple(
        NodeSpec(
            f"node-{i}",
            "A10" if i % 2 == 0 else "V100",
            gpus_per_node,
            int((24 if i % 2 == 0 else 32) * GB),
            nic_gbps * GBPS,
            int(host_cache_gb * GB),
        )
        for i in range(nodes)
    )
    return ClusterSpec(
        f"large-{nodes}x{gpus_per_node}", specs, None if store_gbps is None else store_gbps * GBPS
    )


def a100_h100_cluster(
    a100_servers: int = 4,
    h100_servers: int = 4,
    gpus_per_server: int = 8,
    nic_gbps: float = 100.0,
    store_gbps: float | None = 400.0,
    host_cache_gb: float = 1024.0,
) -> ClusterSpec:
    """Servers of 8 x 80 GB GPUs (A100 and H100) with 100 Gbps NICs, for models larger
    than one GPU (tensor parallel inside a server, pipelines across servers)."""
    nodes = [
        NodeSpec(
            f"{kind.lower()}-{i}", kind, gpus_per_server, int(80 * GB), nic_gbps * GBPS,
            int(host_cache_gb * GB),
        )
        for kind, count in (("A100", a100_servers), ("H100", h100_servers))
        for i in range(count)
    ]  # fmt: skip
    store = None if store_gbps is None else store_gbps * GBPS
    return ClusterSpec("a100-h100-8x80gb", tuple(nodes), store)
