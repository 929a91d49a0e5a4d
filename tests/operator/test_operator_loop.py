"""The operator's whole loop against an emulated API server (kmock) and real HTTP prefetchers.

apply -> plan -> pre-load on the chosen nodes -> worker pods -> (test plays kubelet) ->
status Serving with an endpoint; scale to zero; delete with finalizer; invalid specs;
operator crashes mid-reconcile.
"""

from __future__ import annotations

from typing import Any

from hydraserve.kube.client import path_of
from hydraserve.operator.naming import FINALIZER, NODE_ANNOTATION
from hydraserve.prefetcher.shm import model_key
from tests.operator.conftest import (
    NAMESPACE,
    TMP,
    Cluster,
    OperatorRunner,
    eventually,
    two_stage_planner,
)
from tests.support.waits import operator_passes


def arg(pod: dict[str, Any], flag: str) -> str | None:
    for a in pod["spec"]["containers"][0]["args"]:
        if a.startswith(f"--{flag}="):
            return str(a.split("=", 1)[1])
    return None


def env(pod: dict[str, Any]) -> dict[str, Any]:
    return {
        e["name"]: e.get("value", e.get("valueFrom")) for e in pod["spec"]["containers"][0]["env"]
    }


async def phase_is(cluster: Cluster, name: str, phase: str) -> dict[str, Any] | None:
    model = await cluster.model(name)
    status = (model or {}).get("status") or {}
    return model if status.get("phase") == phase else None


async def serving_model(cluster: Cluster, name: str) -> dict[str, Any] | None:
    return await phase_is(cluster, name, "Serving")


async def test_apply_preload_pods_ready_serving(
    cluster: Cluster, operators: OperatorRunner
) -> None:
    await cluster.add_gpu_node("gpu-small", gpus=1, gpu_memory_gib=16)
    await cluster.add_gpu_node("gpu-big", gpus=1, gpu_memory_gib=80)
    small = await cluster.add_prefetcher("gpu-small")
    big = await cluster.add_prefetcher("gpu-big")
    await operators.start()

    await cluster.apply_model("llama", replicas=1, engine={"args": ["--dtype=bfloat16"]})
    pods = await eventually(cluster.pods, what="a worker pod")
    assert len(pods) == 1
    pod = pods[0]

    # Best fit: 8 GiB goes on the 16 GiB GPU, and that node's prefetcher was asked first.
    assert small.calls and not big.calls
    call = small.calls[0]
    assert (call["uri"], call["revision"], call["pp"], call["rank"]) == (
        cluster.store_uri,
        "main",
        None,
        None,
    )
    created = cluster.emulator.objects["v1/pods", NAMESPACE, pod["metadata"]["name"]]
    assert created is not None
    terms = pod["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]
    assert terms["nodeSelectorTerms"][0]["matchFields"][0]["values"] == ["gpu-small"]
    container = pod["spec"]["containers"][0]
    assert container["image"] == "registry.example/hydraserve/worker:test"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["command"] == ["hydraserve"]
    assert arg(pod, "name") == "llama"
    assert arg(pod, "uri") == cluster.store_uri
    assert (arg(pod, "pp"), arg(pod, "rank")) == ("1", "0")
    assert arg(pod, "prefetcher") == small.url
    assert arg(pod, "engine-arg") == "--dtype=bfloat16"
    assert arg(pod, "master-addr") is None  # pp=1 has no rendezvous
    assert env(pod)["HYDRASERVE_S3__ENDPOINT_URL"] == "http://minio.storage:9000"
    assert env(pod)["VLLM_HOST_IP"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert container["envFrom"] == [{"secretRef": {"name": "hydraserve-s3", "optional": True}}]
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert container["startupProbe"]["httpGet"]["path"] == "/health"
    # The node's copy of this model only, read-only, through a claim (no hostPath).
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert not [v for v in volumes.values() if "hostPath" in v]
    claim = volumes["model"]["persistentVolumeClaim"]
    assert claim["readOnly"] is True
    mount = next(m for m in container["volumeMounts"] if m["name"] == "model")
    key = model_key(cluster.store_uri, "main")
    assert mount == {"name": "model", "mountPath": f"/dev/shm/hydraserve/{key}", "readOnly": True}
    pvc = await cluster.client.get(
        path_of("v1", "persistentvolumeclaims", NAMESPACE, claim["claimName"])
    )
    assert pvc is not None and pvc["spec"]["accessModes"] == ["ReadOnlyMany"]
    pv = await cluster.client.get(
        path_of("v1", "persistentvolumes", None, pvc["spec"]["volumeName"])
    )
    assert pv is not None
    assert pv["spec"]["local"] == {"path": f"/dev/shm/hydraserve/{key}"}
    assert pv["spec"]["claimRef"]["namespace"] == NAMESPACE
    assert pv["spec"]["claimRef"]["name"] == claim["claimName"]
    node_terms = pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"]
    assert node_terms[0]["matchExpressions"][0]["values"] == [
        pod["metadata"]["annotations"][NODE_ANNOTATION]
    ]
    # Ingress only from the gateway (worker port) and the instance's own stages.
    instance = pod["metadata"]["labels"]["hydraserve.io/instance"]
    policy = await cluster.client.get(
        path_of("networking.k8s.io/v1", "networkpolicies", NAMESPACE, instance)
    )
    assert policy is not None
    assert policy["spec"]["podSelector"] == {"matchLabels": {"hydraserve.io/instance": instance}}
    from_gateway, from_stages = policy["spec"]["ingress"]
    assert from_gateway["ports"] == [{"protocol": "TCP", "port": 8000}]
    assert (
        from_gateway["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
        == "gateway"
    )
    assert from_stages == {
        "from": [{"podSelector": {"matchLabels": {"hydraserve.io/instance": instance}}}]
    }
    owner = pod["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["controller"]) == ("ServerlessModel", "llama", True)

    services = await cluster.services()
    assert [s["metadata"]["name"] for s in services] == [
        pod["metadata"]["labels"]["hydraserve.io/instance"]
    ]
    assert services[0]["spec"]["clusterIP"] == "None"

    # The status write follows the pod creation in the same pass: wait for it.
    model = await eventually(lambda: phase_is(cluster, "llama", "Starting"), what="phase Starting")
    assert model["status"]["selector"].endswith("hydraserve.io/stage=0")

    await cluster.run_pod(pod)
    model = await eventually(lambda: serving_model(cluster, "llama"), what="phase Serving")
    status = model["status"]
    instance = services[0]["metadata"]["name"]
    assert status["replicas"] == 1 and status["readyReplicas"] == 1
    assert status["instances"][0]["endpoint"] == (
        f"http://{instance}.{NAMESPACE}.svc.cluster.local:8000"
    )
    assert status["instances"][0]["ready"] is True
    assert status["instances"][0]["workers"][0]["node"] == "gpu-small"
    stages = [t["stage"] for t in status["instances"][0]["coldStart"]]
    assert stages[0] == "plan" and stages[-1] == "load"
    assert status["lastColdStartSeconds"] is not None
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True"

    events = await cluster.events()
    assert any(e.get("reason") == "InstancePlanned" for e in events)


async def test_pipelined_instance_stages_on_their_nodes(
    cluster: Cluster, operators: OperatorRunner
) -> None:
    for node in ("gpu-a", "gpu-b"):
        await cluster.add_gpu_node(node)
        await cluster.add_prefetcher(node)
    await operators.start(plan_with=two_stage_planner(("gpu-a", "gpu-b")))

    await cluster.apply_model("llama", replicas=1)
    pods = await eventually(lambda: _pods_if(cluster, 2), what="two stage pods")
    by_rank = {int(p["metadata"]["labels"]["hydraserve.io/stage"]): p for p in pods}
    instance = by_rank[0]["metadata"]["labels"]["hydraserve.io/instance"]
    head = f"{instance}.{NAMESPACE}.svc.cluster.local"
    for rank, node in ((0, "gpu-a"), (1, "gpu-b")):
        pod = by_rank[rank]
        recorder = cluster.prefetchers[node]
        assert [(c["pp"], c["rank"]) for c in recorder.calls] == [(2, rank)]
        # every pre-load was asked before the pod existed
        assert (arg(pod, "pp"), arg(pod, "rank")) == ("2", str(rank))
        assert arg(pod, "master-addr") == head
        assert arg(pod, "master-port") == "29500"
        assert arg(pod, "prefetcher") == recorder.url
        assert pod["metadata"]["annotations"]["hydraserve.io/node"] == node
    # Only the head serves HTTP and has probes; the rendezvous port is open on both.
    assert "readinessProbe" in by_rank[0]["spec"]["containers"][0]
    assert "readinessProbe" not in by_rank[1]["spec"]["containers"][0]
    svc = (await cluster.services())[0]
    assert svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"] == {
        "hydraserve.io/instance": instance,
        "hydraserve.io/stage": "0",
    }

    # Stage 1 running but the head not yet ready: still Starting.
    await cluster.run_pod(by_rank[1], ip="10.1.0.8")
    await cluster.run_pod(by_rank[0], ready=False)
    (app,) = [app for app, _, _ in operators.apps]
    await operator_passes(app.reconciler, NAMESPACE, "llama")
    model = await cluster.model("llama")
    assert model is not None and model["status"]["phase"] == "Starting"
    await cluster.run_pod(by_rank[0])
    model = await eventually(lambda: serving_model(cluster, "llama"), what="Serving")
    workers = model["status"]["instances"][0]["workers"]
    assert [(w["stage"], w["node"]) for w in workers] == [(0, "gpu-a"), (1, "gpu-b")]
    assert workers[0]["layers"] == "0-2" and workers[1]["layers"] == "2-4"


async def _pods_if(cluster: Cluster, count: int) -> list[dict[str, Any]] | bool:
    pods = await cluster.pods()
    if len(pods) != count:
        return False
    return pods or True


async def test_scale_to_zero_deletes_pods_then_scale_up(
    cluster: Cluster, operators: OperatorRunner
) -> None:
    await cluster.add_gpu_node("gpu-a", gpus=2)
    await cluster.add_prefetcher("gpu-a")
    await operators.start()
    await cluster.apply_model("llama", replicas=2)
    pods = await eventually(lambda: _pods_if(cluster, 2), what="two instances")
    for pod in pods:
        await cluster.run_pod(pod)
    await eventually(lambda: serving_model(cluster, "llama"), what="Serving")

    await cluster.scale("llama", 0)
    await eventually(lambda: _pods_if(cluster, 0), what="pods deleted")
    assert await cluster.services() == []
    policies = await cluster.client.list(
        path_of("networking.k8s.io/v1", "networkpolicies", NAMESPACE)
    )
    assert policies == []  # each went with its instance
    model = await eventually(lambda: phase_is(cluster, "llama", "Cold"), what="phase Cold")
    assert model["status"]["replicas"] == 0
    ready = next(c for c in model["status"]["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "ScaledToZero"

    await cluster.scale("llama", 1)
    await eventually(lambda: _pods_if(cluster, 1), what="one pod again")


async def test_delete_runs_finalizer_cleanup(cluster: Cluster, operators: OperatorRunner) -> None:
    await cluster.add_gpu_node("gpu-a")
    await cluster.add_prefetcher("gpu-a")
    await operators.start()
    await cluster.apply_model("llama", replicas=1)
    await eventually(lambda: _pods_if(cluster, 1), what="a pod")
    model = await cluster.model("llama")
    assert model is not None and FINALIZER in model["metadata"].get("finalizers", [])

    volumes = await cluster.client.list(path_of("v1", "persistentvolumes"))
    # The model's directory on its node, and the instance's KV area (pp 1: one node).
    assert sorted(v["metadata"]["labels"]["hydraserve.io/volume"] for v in volumes) == [
        "kv",
        "model",
    ]

    await cluster.delete_model("llama")
    await eventually(lambda: _gone(cluster, "llama"), what="model gone")
    assert await cluster.pods() == []
    assert await cluster.services() == []
    # Its volume (cluster-scoped: no owner reference) went with it, as did its claim.
    assert await cluster.client.list(path_of("v1", "persistentvolumes")) == []
    assert await cluster.client.list(path_of("v1", "persistentvolumeclaims", NAMESPACE)) == []


async def _gone(cluster: Cluster, name: str) -> bool:
    return await cluster.model(name) is None


async def test_invalid_spec_reports_what_to_fix_and_creates_nothing(
    cluster: Cluster, operators: OperatorRunner
) -> None:
    await cluster.add_gpu_node("gpu-a")
    await cluster.add_prefetcher("gpu-a")
    await operators.start()
    # The emulator does not validate; a real API server would already reject these.
    await cluster.apply_model(
        "broken", replicas=1, pipeline={"maxSize": 9}, scaling={"minReplicas": 3, "maxReplicas": 2}
    )
    model = await eventually(lambda: phase_is(cluster, "broken", "Failed"), what="Failed")
    valid = next(c for c in model["status"]["conditions"] if c["type"] == "Valid")
    assert valid["status"] == "False" and valid["reason"] == "InvalidSpec"
    assert (
        "spec.pipeline.maxSize: Input should be less than or equal to 4 (got 9)" in valid["message"]
    )
    assert "minReplicas must not exceed scaling.maxReplicas" in valid["message"]
    assert "Fix the spec" in valid["message"]
    (app,) = [app for app, _, _ in operators.apps]
    await operator_passes(app.reconciler, NAMESPACE, "broken")
    assert await cluster.pods() == [] and await cluster.services() == []
    assert not cluster.prefetchers["gpu-a"].calls
    events = await cluster.events()
    assert any(e.get("reason") == "InvalidSpec" and e.get("type") == "Warning" for e in events)


async def test_missing_model_in_store_says_so_and_retries(
    cluster: Cluster, operators: OperatorRunner
) -> None:
    await cluster.add_gpu_node("gpu-a")
    await operators.start()
    await cluster.apply_model("ghost", replicas=1, source={"uri": f"{TMP}/nonexistent/ghost"})
    model = await eventually(lambda: phase_is(cluster, "ghost", "Failed"), what="Failed")
    valid = next(c for c in model["status"]["conditions"] if c["type"] == "Valid")
    assert valid["reason"] == "ModelNotFound"
    assert "hydraserve model push" in valid["message"]
    assert await cluster.pods() == []


async def test_unschedulable_says_where_memory_is_missing(
    cluster: Cluster, operators: OperatorRunner
) -> None:
    await cluster.add_gpu_node("gpu-a", gpu_memory_gib=16)
    await operators.start()
    await cluster.apply_model("huge", replicas=1, resources={"gpuMemoryGiB": 40})
    model = await eventually(
        lambda: _condition(cluster, "huge", "Scheduled", "False"), what="Scheduled=False"
    )
    cond = next(c for c in model["status"]["conditions"] if c["type"] == "Scheduled")
    assert cond["reason"] == "Unschedulable"
    assert "40.0 GiB" in cond["message"] and "gpu-a" in cond["message"]
    assert model["status"]["phase"] == "Starting"
    assert await cluster.pods() == []


async def _condition(cluster: Cluster, name: str, kind: str, status: str) -> dict[str, Any] | None:
    model = await cluster.model(name)
    for cond in ((model or {}).get("status") or {}).get("conditions") or []:
        if cond["type"] == kind and cond["status"] == status:
            return model
    return None


async def test_failed_stage_replaces_the_instance(
    cluster: Cluster, operators: OperatorRunner
) -> None:
    await cluster.add_gpu_node("gpu-a", gpus=2)
    await cluster.add_prefetcher("gpu-a")
    await operators.start()
    await cluster.apply_model("llama", replicas=1)
    (pod,) = await eventually(lambda: _pods_if(cluster, 1), what="a pod")
    first = pod["metadata"]["name"]
    await cluster.fail_pod(first, "CUDA out of memory")

    async def replaced() -> list[dict[str, Any]] | None:
        pods = await cluster.pods()
        return pods if len(pods) == 1 and pods[0]["metadata"]["name"] != first else None

    await eventually(replaced, what="a replacement instance")
    events = await cluster.events()
    assert any("CUDA out of memory" in e.get("message", "") for e in events)


async def test_a_serving_pod_is_not_ready_until_its_bytes_are_verified(
    cluster: Cluster, operators: OperatorRunner
) -> None:
    """Compiled workers adopt bytes before they are verified: readiness waits for the node
    prefetcher's verified fetch, not only for the pod's /health."""
    await cluster.add_gpu_node("gpu-a")
    prefetcher = await cluster.add_prefetcher("gpu-a")
    prefetcher.verify = False  # the fetch stays in flight until finish()
    app = await operators.start()
    await cluster.apply_model("llama", replicas=1)
    (pod,) = await eventually(lambda: _pods_if(cluster, 1), what="a worker pod")
    await cluster.run_pod(pod)  # /health answers

    await operator_passes(app.reconciler, NAMESPACE, "llama", more=3)
    model = await cluster.model("llama")
    assert model is not None and model["status"]["phase"] == "Starting"
    assert model["status"]["readyReplicas"] == 0
    assert model["status"]["instances"][0]["ready"] is False

    prefetcher.finish()  # every byte verified: the readiness timer sees it
    model = await eventually(lambda: serving_model(cluster, "llama"), what="Serving")
    assert model["status"]["instances"][0]["ready"] is True
    (record,) = await cluster.services()
    assert "hydraserve.io/verified-at" in record["metadata"]["annotations"]
