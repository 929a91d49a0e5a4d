"""The gateway's Kubernetes backend against the emulated API server, with the operator
running: scale through the scale subresource, see the instance become ready, wait for it."""

from __future__ import annotations

import asyncio

from hydraserve.api.models import PLURAL
from hydraserve.backends.base import InstancePhase
from hydraserve.backends.kubernetes import KubernetesBackend
from hydraserve.kube.client import KubeClient, path_of
from tests.operator.conftest import MODELS, NAMESPACE, Cluster, OperatorRunner, eventually

LLAMA = f"{NAMESPACE}/llama"  # models are keyed by namespace and name (decision 0502)


async def test_gateway_scales_from_zero_and_sees_the_endpoint(
    cluster: Cluster, operators: OperatorRunner
) -> None:
    await cluster.add_gpu_node("gpu-a")
    await cluster.add_prefetcher("gpu-a")
    await operators.start()
    await cluster.apply_model("llama")  # minReplicas 0, no replicas: cold
    backend = KubernetesBackend(KubeClient(cluster.client.config), namespace=NAMESPACE)
    await backend.start()
    try:
        view = backend.get_model(LLAMA)
        assert view is not None and view.desired_replicas == 0 and view.instances == ()
        assert [v.name for v in backend.list_models()] == ["llama"]

        waiter = asyncio.create_task(backend.wait_for_change(LLAMA, timeout=10))
        await backend.scale(LLAMA, 1)
        await asyncio.wait_for(waiter, 10)  # the watch saw spec.replicas change
        model = await cluster.model("llama")
        assert model is not None and model["spec"]["replicas"] == 1

        pods = await eventually(cluster.pods, what="a worker pod")
        await cluster.run_pod(pods[0])

        async def ready() -> bool:
            view = backend.get_model(LLAMA)
            return bool(view and view.ready_instances)

        await eventually(ready, what="a ready instance in the gateway's view")
        view = backend.get_model(LLAMA)
        assert view is not None
        (instance,) = view.ready_instances
        assert instance.phase == InstancePhase.READY
        assert instance.endpoint is not None and instance.endpoint.endswith(
            f".{NAMESPACE}.svc.cluster.local:8000"
        )
        assert instance.cold_start and instance.cold_start[-1].stage == "load"

        await backend.scale(LLAMA, 99)  # bounded by scaling.maxReplicas (4)
        model = await eventually(lambda: cluster.model("llama"), what="model")
        await eventually(
            lambda: _replicas_is(cluster, 4), what="spec.replicas clamped to maxReplicas"
        )

        await cluster.delete_model("llama")
        await eventually(lambda: _absent(backend), what="model removed from the view")
    finally:
        await backend.close()


async def _replicas_is(cluster: Cluster, n: int) -> bool:
    model = await cluster.model("llama")
    return bool(model and model["spec"].get("replicas") == n)


async def _absent(backend: KubernetesBackend) -> bool:
    return backend.get_model(LLAMA) is None


async def test_invalid_model_is_listed_with_its_error(cluster: Cluster) -> None:
    await cluster.apply_model("broken", pipeline={"maxSize": 7})
    backend = KubernetesBackend(KubeClient(cluster.client.config))
    await backend.start()
    try:
        view = backend.get_model(f"{NAMESPACE}/broken")
        assert view is not None and view.error is not None
        assert "spec.pipeline.maxSize" in view.error
        assert view.desired_replicas == 0
    finally:
        await backend.close()


def test_the_models_phase_comes_from_its_status() -> None:
    from hydraserve.api.models import ModelPhase
    from hydraserve.backends.kubernetes import model_view

    obj = {
        "metadata": {"name": "m", "namespace": "ns"},
        "spec": {"source": {"uri": "s3://models/m"}},
        "status": {"phase": "Consolidating"},
    }
    view = model_view(obj)
    assert view is not None and view.phase == ModelPhase.CONSOLIDATING
    bare = model_view({**obj, "status": {}})
    assert bare is not None and bare.phase is None and bare.effective_phase == ModelPhase.COLD


async def test_the_same_name_in_two_namespaces_is_two_models(cluster: Cluster) -> None:
    await cluster.apply_model("llama")
    other = cluster.model_body("llama")
    other["metadata"]["namespace"] = "team-b"
    other["spec"]["scaling"] = {"maxReplicas": 2}
    await cluster.client.create(path_of(MODELS, PLURAL, "team-b"), other)
    backend = KubernetesBackend(KubeClient(cluster.client.config))
    await backend.start()
    try:
        ids = [f"{v.model.metadata.namespace}/{v.name}" for v in backend.list_models()]
        assert ids == sorted([LLAMA, "team-b/llama"])
        theirs = backend.get_model("team-b/llama")
        assert theirs is not None and theirs.model.spec.scaling.max_replicas == 2
        await backend.scale("team-b/llama", 1)
        mine = await cluster.model("llama")
        assert mine is not None and mine["spec"].get("replicas") is None  # untouched
        scaled = await cluster.client.get(path_of(MODELS, PLURAL, "team-b", "llama"))
        assert scaled is not None and scaled["spec"]["replicas"] == 1
    finally:
        await backend.close()
