"""KV hand-over on Kubernetes: engines load the KV connector only where saved KV can move
(every stage on one node, through that node's shared memory); elsewhere streams move by
recompute, and each instance's status says which."""

from __future__ import annotations

from typing import Any

import pytest

from hydraserve.kube.client import path_of
from tests.operator.conftest import (
    NAMESPACE,
    Cluster,
    OperatorRunner,
    eventually,
    two_stage_planner,
)


async def _stage_pods(cluster: Cluster) -> list[dict[str, Any]] | None:
    pods = await cluster.pods()
    return pods if len(pods) == 2 else None


async def _instance_status(cluster: Cluster) -> dict[str, Any] | None:
    model = await cluster.model("llama")
    instances = ((model or {}).get("status") or {}).get("instances") or []
    return instances[0] if instances else None


def _args(pod: dict[str, Any]) -> list[str]:
    return list(pod["spec"]["containers"][0]["args"])


@pytest.mark.parametrize(
    ("nodes", "kv"),
    [(("gpu-a", "gpu-a"), True), (("gpu-a", "gpu-b"), False)],
    ids=["stages-share-a-node", "stages-across-nodes"],
)
async def test_kv_connector_only_where_stages_share_a_node(
    cluster: Cluster, operators: OperatorRunner, nodes: tuple[str, str], kv: bool
) -> None:
    for node in sorted(set(nodes)):
        await cluster.add_gpu_node(node, gpus=2)
        await cluster.add_prefetcher(node)
    await operators.start(plan_with=two_stage_planner(nodes), kv_block_size=48)
    await cluster.apply_model("llama", replicas=1)
    pods = await eventually(lambda: _stage_pods(cluster), what="two stage pods")
    for pod in pods:
        args = _args(pod)
        assert ("--kv-transfer" in args) is kv
        assert ("--block-size=48" in args) is kv
    (record,) = await cluster.services()
    assert record["metadata"]["annotations"]["hydraserve.io/kv-transfer"] == str(kv).lower()
    status = await eventually(lambda: _instance_status(cluster), what="instance status")
    assert status["kvTransfer"] is kv


async def test_kv_transfer_can_be_turned_off(cluster: Cluster, operators: OperatorRunner) -> None:
    await cluster.add_gpu_node("gpu-a", gpus=2)
    await cluster.add_prefetcher("gpu-a")
    await operators.start(plan_with=two_stage_planner(("gpu-a", "gpu-a")), kv_transfer=False)
    await cluster.apply_model("llama", replicas=1)
    pods = await eventually(lambda: _stage_pods(cluster), what="two stage pods")
    assert all("--kv-transfer" not in _args(p) for p in pods)
    status = await eventually(lambda: _instance_status(cluster), what="instance status")
    assert status["kvTransfer"] is False


async def test_kv_area_is_the_instances_own_and_goes_with_it(
    cluster: Cluster, operators: OperatorRunner
) -> None:
    """Its stages mount one per-instance claim (not the node's memory); the node's
    prefetcher made the area for the workers' user; deleting the instance removes it."""
    await cluster.add_gpu_node("gpu-a", gpus=2)
    prefetcher = await cluster.add_prefetcher("gpu-a")
    app = await operators.start(plan_with=two_stage_planner(("gpu-a", "gpu-a")))
    await cluster.apply_model("llama", replicas=1)
    pods = await eventually(lambda: _stage_pods(cluster), what="two stage pods")
    instance = pods[0]["metadata"]["labels"]["hydraserve.io/instance"]
    area = f"{NAMESPACE}.{instance}"
    assert prefetcher.kv_areas == {area: app.settings.worker_run_as_user}
    for pod in pods:
        assert f"--kv-area={area}" in _args(pod)
        assert pod["metadata"]["labels"]["hydraserve.io/kv-area"] == area
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        assert volumes["kv"]["persistentVolumeClaim"] == {"claimName": f"hs-kv-{instance}"}
        mount = next(m for m in pod["spec"]["containers"][0]["volumeMounts"] if m["name"] == "kv")
        assert mount["mountPath"] == f"/dev/shm/hydraserve/kv/{area}"
    pvc = await cluster.client.get(
        path_of("v1", "persistentvolumeclaims", NAMESPACE, f"hs-kv-{instance}")
    )
    assert pvc is not None
    pv = await cluster.client.get(
        path_of("v1", "persistentvolumes", None, pvc["spec"]["volumeName"])
    )
    assert pv is not None and pv["spec"]["local"]["path"] == f"/dev/shm/hydraserve/kv/{area}"
    assert pv["spec"]["claimRef"]["namespace"] == NAMESPACE

    await cluster.scale("llama", 0)

    async def released() -> bool | None:
        return True if not prefetcher.kv_areas else None

    await eventually(released, what="KV area closed")
    assert (
        await cluster.client.get(
            path_of("v1", "persistentvolumeclaims", NAMESPACE, f"hs-kv-{instance}")
        )
        is None
    )
    assert (
        await cluster.client.get(
            path_of("v1", "persistentvolumes", None, pvc["spec"]["volumeName"])
        )
        is None
    )
