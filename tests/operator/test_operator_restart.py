"""A restarted operator converges without duplicates: it finishes what a dead one started.

Three moments of death: while the prefetchers are still being asked (the instance record
exists, no pods yet), between two stage pods, and after everything converged.
"""

from __future__ import annotations

import asyncio
from typing import Any

from hydraserve.kube.client import path_of
from tests.operator.conftest import (
    NAMESPACE,
    Cluster,
    OperatorRunner,
    eventually,
    two_stage_planner,
)
from tests.support.waits import operator_passes

PLANNER = two_stage_planner(("gpu-a", "gpu-b"))


async def two_nodes(cluster: Cluster) -> None:
    for node in ("gpu-a", "gpu-b"):
        await cluster.add_gpu_node(node)
        await cluster.add_prefetcher(node)


async def pods_when(cluster: Cluster, count: int) -> list[dict[str, Any]] | bool:
    pods = await cluster.pods()
    return (pods or True) if len(pods) == count else False


def instance_of(pod: dict[str, Any]) -> str:
    return str(pod["metadata"]["labels"]["hydraserve.io/instance"])


async def test_crash_while_preloading_then_restart_finishes_the_same_instance(
    cluster: Cluster, operators: OperatorRunner
) -> None:
    await two_nodes(cluster)
    slow = cluster.prefetchers["gpu-b"]
    slow.hold = asyncio.Event()
    first = await operators.start(plan_with=PLANNER)
    await cluster.apply_model("llama", replicas=1)
    await eventually(lambda: asyncio.sleep(0, bool(slow.calls)), what="the pre-load on gpu-b")
    (record,) = await cluster.services()
    assert await cluster.pods() == []  # pods come only after every pre-load was asked

    await operators.crash(first)
    slow.hold.set()
    second = await operators.start(plan_with=PLANNER)

    pods = await eventually(lambda: pods_when(cluster, 2), what="both stage pods")
    assert {instance_of(p) for p in pods} == {record["metadata"]["name"]}
    assert [s["metadata"]["name"] for s in await cluster.services()] == [record["metadata"]["name"]]
    # The new operator asked again (pre-load is idempotent) before creating the pods.
    assert len(cluster.prefetchers["gpu-a"].calls) == 2 and len(slow.calls) == 2
    # More triggers (pod events, resync) must not add anything.
    await operator_passes(second.reconciler, NAMESPACE, "llama", kick=False)
    assert len(await cluster.pods()) == 2 and len(await cluster.services()) == 1


async def test_crash_between_stage_pods_then_restart_creates_only_the_missing_one(
    cluster: Cluster, operators: OperatorRunner
) -> None:
    await two_nodes(cluster)
    first = await operators.start(plan_with=PLANNER)
    await cluster.apply_model("llama", replicas=1)
    pods = await eventually(lambda: pods_when(cluster, 2), what="both stage pods")
    await operators.crash(first)
    # The cluster as a crash right after creating stage 0 leaves it: stage 1 never made it.
    stage1 = next(p for p in pods if p["metadata"]["labels"]["hydraserve.io/stage"] == "1")
    await cluster.client.delete(path_of("v1", "pods", NAMESPACE, stage1["metadata"]["name"]))
    assert len(await cluster.pods()) == 1
    calls_before = len(cluster.prefetchers["gpu-b"].calls)

    second = await operators.start(plan_with=PLANNER)
    pods_after = await eventually(lambda: pods_when(cluster, 2), what="stage 1 recreated")
    assert {p["metadata"]["name"] for p in pods_after} == {p["metadata"]["name"] for p in pods}
    assert len(cluster.prefetchers["gpu-b"].calls) == calls_before + 1  # only the missing stage
    assert len(cluster.prefetchers["gpu-a"].calls) == 1
    await operator_passes(second.reconciler, NAMESPACE, "llama", kick=False)
    assert len(await cluster.pods()) == 2 and len(await cluster.services()) == 1


async def test_restart_after_convergence_changes_nothing(
    cluster: Cluster, operators: OperatorRunner
) -> None:
    await two_nodes(cluster)
    first = await operators.start(plan_with=PLANNER)
    await cluster.apply_model("llama", replicas=1)
    pods = await eventually(lambda: pods_when(cluster, 2), what="both stage pods")
    for i, pod in enumerate(pods):
        await cluster.run_pod(pod, ip=f"10.1.0.{10 + i}")

    async def serving() -> bool:
        model = await cluster.model("llama")
        return bool(model and model.get("status", {}).get("phase") == "Serving")

    await eventually(serving, what="Serving")
    await operators.crash(first)
    calls = sum(len(p.calls) for p in cluster.prefetchers.values())

    second = await operators.start(plan_with=PLANNER)
    # Its start-up passes (resume, the pods it lists) change nothing.
    await operator_passes(second.reconciler, NAMESPACE, "llama", kick=False)
    assert {p["metadata"]["name"] for p in await cluster.pods()} == {
        p["metadata"]["name"] for p in pods
    }
    assert sum(len(p.calls) for p in cluster.prefetchers.values()) == calls
    assert await serving()
