"""Worker pods of tensor-parallel models (spec.parallelism.tensor) against kmock.

A stage is one pod with all its ``tp`` ranks: it requests ``tp`` devices of the GPU
resource, is pinned to its node, and passes ``--tp`` to the worker (which hands vLLM its
own ``--tensor-parallel-size``). The GPUs it holds are on its annotations, and the
operator's next plans read them back per GPU.
"""

from __future__ import annotations

from typing import Any

from hydraserve.control import reasons
from hydraserve.operator.cluster_state import (
    cluster_state,
    gpu_indices,
    gpu_resource_amount,
    worker_reservations,
)
from hydraserve.operator.settings import OperatorSettings
from tests.operator.conftest import Cluster, OperatorRunner, eventually
from tests.operator.test_operator_loop import arg

GIB = 1 << 30
GPU = "nvidia.com/gpu"


def node_of(pod: dict[str, Any]) -> str:
    terms = pod["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]["nodeSelectorTerms"]
    return str(terms[0]["matchFields"][0]["values"][0])


def gpus_of(pod: dict[str, Any]) -> list[int]:
    return gpu_indices(pod["metadata"]["annotations"]["hydraserve.io/gpu"])


async def pods_when(cluster: Cluster, count: int) -> list[dict[str, Any]] | None:
    pods = await cluster.pods()
    return pods if len(pods) == count else None


async def test_tp_workers_request_tp_devices_on_one_node_and_reserve_each_gpu(
    cluster: Cluster, operators: OperatorRunner
) -> None:
    for name in ("gpu-a", "gpu-b"):
        await cluster.add_gpu_node(name, gpus=8, gpu_memory_gib=80)
        await cluster.add_prefetcher(name)
    await operators.start()
    # 160 GiB per replica: 40 GiB on each of 4 GPUs; no GPU alone could hold it.
    spec = {"resources": {"gpuMemoryGiB": 160}, "parallelism": {"tensor": 4}}
    await cluster.apply_model("big", replicas=3, **spec)
    pods = await eventually(lambda: pods_when(cluster, 3), what="three tp-4 worker pods")
    held: set[tuple[str, int]] = set()
    for pod in pods:
        container = pod["spec"]["containers"][0]
        # One pod per stage: all 4 ranks in it, so all on its node.
        assert container["resources"]["requests"][GPU] == "4"
        assert container["resources"]["limits"][GPU] == "4"
        assert arg(pod, "tp") == "4" and arg(pod, "pp") == "1"
        gpus = gpus_of(pod)
        assert len(gpus) == 4
        assert pod["metadata"]["annotations"]["hydraserve.io/gpu-memory-bytes"] == str(160 * GIB)
        # No GPU is handed out twice (whole GPUs: the count resource cannot share).
        taken = {(node_of(pod), g) for g in gpus}
        assert not taken & held
        held |= taken
    # Best fit: the second worker takes the other 4 GPUs of the first node before a new one.
    assert sorted(node_of(p) for p in pods) == ["gpu-a", "gpu-a", "gpu-b"]
    # What the next plan sees, read back from the pods' annotations.
    state, _ = cluster_state(
        [await cluster.client.get(f"/api/v1/nodes/{n}") for n in ("gpu-a", "gpu-b")],
        pods,
        OperatorSettings(),
    )
    free = {n.name: [g.free_bytes for g in n.gpus] for n in state.nodes}
    assert free["gpu-a"] == [0] * 8 and sorted(free["gpu-b"]) == [0] * 4 + [80 * GIB] * 4
    for pod in pods:
        await cluster.run_pod(pod)
    model = await eventually(lambda: _status_ready(cluster, "big", 3), what="3 ready")
    assert {i["tp"] for i in model["status"]["instances"]} == {4}


async def test_tp_x_pp_without_room_for_a_replica_serves_and_says_why_it_stays_a_pipeline(
    cluster: Cluster, operators: OperatorRunner
) -> None:
    # 4 GPUs of 24 GiB per node: a replica's quarter (40 GiB) fits nowhere, a half-model
    # stage's (about 20 GiB per GPU) does: a pipeline across the nodes, tp 4 inside each.
    for name in ("gpu-a", "gpu-b"):
        await cluster.add_gpu_node(name, gpus=4, gpu_memory_gib=24)
        await cluster.add_prefetcher(name)
    await operators.start(consolidation=True)
    spec = {"resources": {"gpuMemoryGiB": 160}, "parallelism": {"tensor": 4}}
    await cluster.apply_model("big", replicas=1, **spec)
    pods = await eventually(lambda: pods_when(cluster, 2), what="two stage pods")
    by_rank = {int(p["metadata"]["labels"]["hydraserve.io/stage"]): p for p in pods}
    assert {node_of(p) for p in pods} == {"gpu-a", "gpu-b"}
    for rank, pod in by_rank.items():
        assert pod["spec"]["containers"][0]["resources"]["limits"][GPU] == "4"
        assert (arg(pod, "tp"), arg(pod, "pp"), arg(pod, "rank")) == ("4", "2", str(rank))
        assert gpus_of(pod) == [0, 1, 2, 3]
        # Each node's prefetcher was asked for its stage once (for all 4 ranks).
        calls = cluster.prefetchers[node_of(pod)].calls
        assert [(c["pp"], c["rank"]) for c in calls] == [(2, rank)]
    for rank in (1, 0):
        await cluster.run_pod(by_rank[rank], ip=f"10.1.0.{7 + rank}")
    model = await eventually(lambda: _status_ready(cluster, "big", 1), what="Serving")
    # Consolidation is on, but there is nowhere to consolidate: Serving, and status says why.
    assert model["status"]["phase"] == "Serving"
    (instance,) = model["status"]["instances"]
    assert (instance["pp"], instance["tp"]) == (2, 4)
    condition = instance["consolidation"]
    assert condition["reason"] == reasons.NO_CONSOLIDATION_TARGET
    assert condition["status"] == "False"
    assert "no node has 4 GPUs with 40.0 GiB free each" in condition["message"]
    assert len(await cluster.pods()) == 2  # no standalone was started


async def _status_ready(cluster: Cluster, name: str, ready: int) -> dict[str, Any] | None:
    model = await cluster.model(name)
    status = (model or {}).get("status") or {}
    return model if status.get("readyReplicas") == ready else None


def test_reservations_split_a_workers_memory_over_its_gpus() -> None:
    def pod(gpus: str | None, memory: int) -> dict[str, Any]:
        ann = {"hydraserve.io/node": "n", "hydraserve.io/gpu-memory-bytes": str(memory)}
        if gpus is not None:
            ann["hydraserve.io/gpu"] = gpus
        return {"metadata": {"annotations": ann}, "status": {"phase": "Running"}}

    held = worker_reservations([pod("0,1,2,3", 160 * GIB), pod("5", 8 * GIB), pod(None, GIB)])
    assert held == {("n", 0): 41 * GIB, ("n", 1): 40 * GIB, ("n", 2): 40 * GIB,
                    ("n", 3): 40 * GIB, ("n", 5): 8 * GIB}  # fmt: skip
    assert gpu_indices("2,x") == [0] and gpu_indices("") == [0] and gpu_indices("3,3") == [3]


def test_gpu_resource_amount_is_tp_devices() -> None:
    count = OperatorSettings()
    assert [gpu_resource_amount(160 * GIB, count, tp) for tp in (1, 2, 4, 8)] == [1, 2, 4, 8]
    memory = OperatorSettings(gpu_resource_name="example.com/gpu-mem", gpu_resource_mode="memory")
    # Memory units on each of its GPUs: 4 x ceil(40.5 GiB) = 4 x 41.
    assert gpu_resource_amount(162 * GIB, memory, 4) == 4 * 41
    assert gpu_resource_amount(int(7.5 * GIB), memory) == 8
