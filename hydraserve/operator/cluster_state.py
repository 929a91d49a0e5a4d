"""The planner's view of the cluster, built from Node objects and the workers on them.

Pure functions of the API objects (dicts), so they are tested without a cluster.
A node offers GPUs if its allocatable has the configured GPU resource. Its NIC bandwidth,
GPU type and per-GPU memory come from labels or annotations (annotations win):
``hydraserve.io/nic-gbps``, ``hydraserve.io/gpu-type`` (else ``nvidia.com/gpu.product``),
``hydraserve.io/gpu-memory-gib`` (else ``nvidia.com/gpu.memory`` in MiB, as NVIDIA's GPU
feature discovery writes it). What running workers reserve comes from their annotations
(``hydraserve.io/gpu``: the GPU indices of a worker, comma-separated, one per
tensor-parallel rank; ``hydraserve.io/gpu-memory-bytes``: its memory in all, split evenly
over them); what each node holds in host memory and fetches, from its prefetcher's status.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

from hydraserve.control.nodes import cached_models, inflight_fetches
from hydraserve.operator.naming import (
    GPU_ANNOTATION,
    GPU_COUNT_KEY,
    GPU_MEMORY_GIB_KEY,
    GPU_TYPE_KEY,
    MEMORY_ANNOTATION,
    NIC_GBPS_KEY,
    NODE_ANNOTATION,
)
from hydraserve.operator.settings import OperatorSettings
from hydraserve.planner.types import (
    ClusterState,
    GPUState,
    InflightFetch,
    NodeState,
    Plan,
    per_device_bytes,
)
from hydraserve.prefetcher.node import NodeStatus

GIB = 1 << 30
MIB = 1 << 20


def _meta_value(node: Mapping[str, Any], key: str) -> str | None:
    meta = node.get("metadata") or {}
    for section in ("annotations", "labels"):
        value = (meta.get(section) or {}).get(key)
        if value not in (None, ""):
            return str(value)
    return None


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def parse_quantity(value: Any) -> float:
    """A Kubernetes quantity (``4``, ``16Gi``, ``500m``) as a number."""
    text = str(value).strip()
    suffixes = {
        "Ki": 1 << 10,
        "Mi": 1 << 20,
        "Gi": 1 << 30,
        "Ti": 1 << 40,
        "Pi": 1 << 50,
        "k": 10**3,
        "M": 10**6,
        "G": 10**9,
        "T": 10**12,
        "P": 10**15,
        "m": 1e-3,
    }
    for suffix in sorted(suffixes, key=len, reverse=True):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * suffixes[suffix]
    return float(text)


def _tolerated(taint: Mapping[str, Any], tolerations: Iterable[Mapping[str, Any]]) -> bool:
    for tol in tolerations:
        if tol.get("effect") and tol.get("effect") != taint.get("effect"):
            continue
        if tol.get("operator") == "Exists" and (not tol.get("key") or tol["key"] == taint["key"]):
            return True
        if tol.get("key") == taint.get("key") and tol.get("value", "") == taint.get("value", ""):
            return True
    return False


def node_unusable(node: Mapping[str, Any], settings: OperatorSettings) -> str | None:
    """Why no worker can be placed on this node, or None."""
    spec = node.get("spec") or {}
    if spec.get("unschedulable"):
        return "cordoned"
    conditions = (node.get("status") or {}).get("conditions") or []
    ready = next((c for c in conditions if c.get("type") == "Ready"), None)
    if ready is None or ready.get("status") != "True":
        return "not Ready"
    for taint in spec.get("taints") or []:
        if taint.get("effect") in ("NoSchedule", "NoExecute") and not _tolerated(
            taint, settings.worker_tolerations
        ):
            return f"taint {taint.get('key')}:{taint.get('effect')} is not tolerated"
    allocatable = (node.get("status") or {}).get("allocatable") or {}
    if parse_quantity(allocatable.get(settings.gpu_resource_name, 0)) <= 0:
        return f"no allocatable {settings.gpu_resource_name}"
    return None


def gpu_indices(annotation: str | None) -> list[int]:
    """A worker's GPU indices from its ``hydraserve.io/gpu`` annotation ("0" or "0,1,2,3");
    unreadable or absent: GPU 0."""
    try:
        indices = [int(part) for part in (annotation or "0").split(",") if part.strip()]
    except ValueError:
        return [0]
    return list(dict.fromkeys(indices)) or [0]


def gpu_annotation(gpus: Iterable[int]) -> str:
    return ",".join(str(g) for g in gpus)


def worker_reservations(pods: Iterable[Mapping[str, Any]]) -> dict[tuple[str, int], int]:
    """GPU memory held by live worker pods, per (node, gpu index): a worker on ``tp`` GPUs
    holds an equal share of its memory on each."""
    held: dict[tuple[str, int], int] = defaultdict(int)
    for pod in pods:
        phase = (pod.get("status") or {}).get("phase")
        if phase in ("Succeeded", "Failed"):
            continue
        ann = (pod.get("metadata") or {}).get("annotations") or {}
        node = ann.get(NODE_ANNOTATION) or (pod.get("spec") or {}).get("nodeName")
        if not node or MEMORY_ANNOTATION not in ann:
            continue
        gpus = gpu_indices(ann.get(GPU_ANNOTATION))
        share = per_device_bytes(int(ann[MEMORY_ANNOTATION]), len(gpus))
        for index in gpus:
            held[(node, index)] += share
    return dict(held)


def node_state(
    node: Mapping[str, Any],
    held: Mapping[tuple[str, int], int],
    settings: OperatorSettings,
    prefetcher: NodeStatus | None = None,
    now: float = 0.0,
) -> NodeState:
    """One node as the planner sees it: its GPUs' free memory, its NIC, and what its
    prefetcher reports (host cache, fetches in flight with their deadlines)."""
    name = str((node.get("metadata") or {}).get("name"))
    allocatable = (node.get("status") or {}).get("allocatable") or {}
    amount = parse_quantity(allocatable.get(settings.gpu_resource_name, 0))
    if settings.gpu_resource_mode == "count":
        count = int(amount)
    else:
        count = int(
            _float(_meta_value(node, GPU_COUNT_KEY) or _meta_value(node, "nvidia.com/gpu.count"))
            or 1
        )
    per_gpu = _float(_meta_value(node, GPU_MEMORY_GIB_KEY))
    if per_gpu is not None:
        total = int(per_gpu * GIB)
    elif (mib := _float(_meta_value(node, "nvidia.com/gpu.memory"))) is not None:
        total = int(mib * MIB)
    elif settings.gpu_resource_mode == "memory":
        total = int(amount * settings.gpu_memory_unit_bytes / max(count, 1))
    else:
        total = int(settings.default_gpu_memory_gib * GIB)
    gpus = []
    for index in range(count):
        used = held.get((name, index), 0)
        # A whole-GPU resource cannot be shared: any worker takes all of it.
        free = 0 if (settings.gpu_resource_mode == "count" and used) else max(0, total - used)
        gpus.append(GPUState(index=index, total_bytes=total, free_bytes=free))
    gbps = _float(_meta_value(node, NIC_GBPS_KEY)) or settings.default_nic_gbps
    gpu_type = _meta_value(node, GPU_TYPE_KEY) or _meta_value(node, "nvidia.com/gpu.product")
    return NodeState(
        name=name,
        gpus=tuple(gpus),
        nic_bytes_per_s=gbps * 1e9 / 8,
        gpu_type=gpu_type or "generic",
        cached_models=cached_models(prefetcher),
        inflight=inflight_fetches(prefetcher, now),
    )


def cluster_state(
    nodes: Iterable[Mapping[str, Any]],
    worker_pods: Iterable[Mapping[str, Any]],
    settings: OperatorSettings,
    prefetchers: Mapping[str, NodeStatus | None] | None = None,
    now: float = 0.0,
) -> tuple[ClusterState, dict[str, str]]:
    """The usable nodes, and why each other node was left out. ``prefetchers``: each
    node's prefetcher status (absent or None: nothing known cached or in flight there)."""
    held = worker_reservations(worker_pods)
    states: list[NodeState] = []
    skipped: dict[str, str] = {}
    for node in nodes:
        name = str((node.get("metadata") or {}).get("name"))
        why = node_unusable(node, settings)
        if why is not None:
            skipped[name] = why
            continue
        states.append(node_state(node, held, settings, (prefetchers or {}).get(name), now))
    states.sort(key=lambda n: n.name)
    return ClusterState(nodes=tuple(states), store_bytes_per_s=settings.store_bytes_per_s), skipped


def reserve(cluster: ClusterState, plan: Plan, settings: OperatorSettings) -> ClusterState:
    """The cluster after a plan's workers took their memory and its fetches their links
    (for the next plan in a pass, before any prefetcher reports them)."""
    taken: dict[tuple[str, int], int] = defaultdict(int)
    fetches: dict[str, list[InflightFetch]] = defaultdict(list)
    for stage in plan.stages:
        for index in stage.devices:
            taken[(stage.node, index)] += stage.memory_per_gpu_bytes
        if stage.fetch_bytes and not stage.from_cache:
            due = stage.fetch_deadline_s if math.isfinite(stage.fetch_deadline_s) else 0.0
            fetches[stage.node].append(InflightFetch(bytes_left=stage.fetch_bytes, deadline_s=due))
    nodes = []
    for node in cluster.nodes:
        gpus = []
        for gpu in node.gpus:
            used = taken.get((node.name, gpu.index), 0)
            if used and settings.gpu_resource_mode == "count":
                gpus.append(replace(gpu, free_bytes=0))
            else:
                gpus.append(replace(gpu, free_bytes=max(0, gpu.free_bytes - used)))
        inflight = node.inflight + tuple(fetches.get(node.name, ()))
        nodes.append(replace(node, gpus=tuple(gpus), inflight=inflight))
    return replace(cluster, nodes=tuple(nodes))


def gpu_resource_amount(memory_bytes: int, settings: OperatorSettings, tp: int = 1) -> int:
    """How much of the GPU resource one worker on ``tp`` GPUs requests: ``tp`` devices, or
    in memory mode its memory (``memory_bytes`` in all) as whole units on each of them."""
    if settings.gpu_resource_mode == "count":
        return max(1, tp)
    per_gpu = per_device_bytes(memory_bytes, tp)
    return max(1, tp) * max(1, math.ceil(per_gpu / settings.gpu_memory_unit_bytes))


def prefetcher_urls(
    pods: Iterable[Mapping[str, Any]], settings: OperatorSettings
) -> dict[str, str]:
    """Node name -> base URL of the ready prefetcher pod on it."""
    urls: dict[str, str] = {}
    for pod in pods:
        spec = pod.get("spec") or {}
        status = pod.get("status") or {}
        node = spec.get("nodeName")
        conditions = status.get("conditions") or []
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
        if not node or status.get("phase") != "Running" or not ready:
            continue
        port = settings.prefetcher_port
        for container in spec.get("containers") or []:
            for p in container.get("ports") or []:
                if p.get("name") == "http":
                    wanted = p.get("hostPort") if settings.prefetcher_use_host_port else None
                    port = int(wanted or p.get("containerPort") or port)
        host = status.get("hostIP") if settings.prefetcher_use_host_port else status.get("podIP")
        if host:
            host = f"[{host}]" if ":" in host else host
            urls[node] = f"http://{host}:{port}"
    return urls
